//! Audit log: one JSON line per request, written per tenant to `<dir>/<tenant>.jsonl` so one
//! tenant's log can be handed over without the others'. Requests without a verified tenant go
//! to `_unauthenticated.jsonl`. Prompts are never written, only a keyed hash (HMAC-SHA256).

use ring::hmac;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// The file stem for requests that carried no verified tenant.
pub const UNAUTHENTICATED: &str = "_unauthenticated";

#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    pub ts_unix_ms: u64,
    pub tenant: String,
    pub key_id: Option<String>,
    pub request_id: String,
    pub method: String,
    pub route: String,
    pub status: u16,
    pub reason: Option<String>,
    pub stream: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub reserved_tokens: Option<u64>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub queue_ms: Option<f64>,
    /// HMAC-SHA256 (hex) of the prompt part of the body under the audit key.
    pub prompt_hash: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot create audit directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<AuditRecord>>,
    key: hmac::Key,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl AuditLog {
    /// A log that writes nothing (no `audit.dir` configured).
    pub fn disabled(key: &[u8]) -> Self {
        Self {
            tx: None,
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            dropped: Default::default(),
        }
    }

    /// Start the writer on its own thread (plain blocking file I/O, off the async workers);
    /// it ends when every sender is gone.
    pub fn start(
        dir: PathBuf,
        key: &[u8],
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<(Self, std::thread::JoinHandle<()>), AuditError> {
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Dir {
            path: dir.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(8192);
        let handle = std::thread::Builder::new()
            .name("bulkhead-audit".into())
            .spawn(move || writer(dir, rx))
            .map_err(|source| AuditError::Dir {
                path: PathBuf::from("<audit writer thread>"),
                source,
            })?;
        Ok((
            Self {
                tx: Some(tx),
                key: hmac::Key::new(hmac::HMAC_SHA256, key),
                dropped,
            },
            handle,
        ))
    }

    pub fn prompt_hash(&self, prompt: &[u8]) -> String {
        let tag = hmac::sign(&self.key, prompt);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Queue a record; never blocks the request path (drops and counts when behind).
    pub fn record(&self, rec: AuditRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(rec).is_err()
        {
            self.dropped.inc();
        }
    }
}

fn writer(dir: PathBuf, mut rx: mpsc::Receiver<AuditRecord>) {
    let mut files: HashMap<String, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let mut line = Vec::with_capacity(512);
    while let Some(first) = rx.blocking_recv() {
        let mut touched: Vec<String> = Vec::new();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(rec) = next.take() {
            n += 1;
            if !files.contains_key(&rec.tenant) {
                let path = dir.join(format!("{}.jsonl", rec.tenant));
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    Ok(f) => {
                        files.insert(rec.tenant.clone(), std::io::BufWriter::new(f));
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot open audit log");
                    }
                }
            }
            if let Some(f) = files.get_mut(&rec.tenant) {
                line.clear();
                if serde_json::to_writer(&mut line, &rec).is_ok() {
                    line.push(b'\n');
                    if let Err(e) = f.write_all(&line) {
                        tracing::warn!(tenant = %rec.tenant, error = %e, "audit write failed");
                    }
                }
                if !touched.contains(&rec.tenant) {
                    touched.push(rec.tenant);
                }
            }
            if n < 4096 {
                next = rx.try_recv().ok();
            }
        }
        // Flush once the queue is drained: whole lines reach the files promptly.
        for t in touched {
            if let Some(f) = files.get_mut(&t)
                && let Err(e) = f.flush()
            {
                tracing::warn!(tenant = %t, error = %e, "audit flush failed");
            }
        }
    }
}
