//! Audit log: one JSON line per request, written per tenant to `<dir>/<tenant>.jsonl` so one
//! tenant's log can be handed over without the others'. Requests without a verified tenant go
//! to `_unauthenticated.jsonl`. Prompts are never written, only a keyed hash (HMAC-SHA256).

use ring::hmac;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The file stem for requests that carried no verified tenant.
pub const UNAUTHENTICATED: &str = "_unauthenticated";

#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    pub ts_unix_ms: u64,
    pub tenant: String,
    pub key_id: Option<String>,
    /// The sidecar's own id (also sent upstream and to the client as `x-request-id`).
    pub request_id: String,
    /// The client's `x-request-id`, kept for correlation only (never sent upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
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

/// Buffers shared between request handlers and the writer thread.
struct Shared {
    state: Mutex<Buffers>,
    wake: Condvar,
}

#[derive(Default)]
struct Buffers {
    per_tenant: HashMap<String, Vec<u8>>,
    bytes: usize,
    closed: bool,
}

/// Flush at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Wake the writer early when this much is buffered.
const WAKE_AT: usize = 256 * 1024;
/// Drop records (and count them) beyond this much unwritten data.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;

/// The recording side; cheap to clone. Records are serialized on the request path into a
/// per-tenant buffer and written by one thread at least every 50 ms, so the request path
/// never waits on the disk and rarely wakes another thread.
#[derive(Clone)]
pub struct AuditLog {
    shared: Option<Arc<Shared>>,
    _closer: Option<Arc<Closer>>,
    key: hmac::Key,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// Tells the writer to finish when the last `AuditLog` clone goes away.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.0.wake.notify_one();
    }
}

impl AuditLog {
    /// A log that writes nothing (no `audit.dir` configured).
    pub fn disabled(key: &[u8]) -> Self {
        Self {
            shared: None,
            _closer: None,
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            dropped: Default::default(),
        }
    }

    /// Start the writer thread; it writes what is left and ends when every clone is dropped.
    pub fn start(
        dir: PathBuf,
        key: &[u8],
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<(Self, std::thread::JoinHandle<()>), AuditError> {
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Dir {
            path: dir.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(Buffers::default()),
            wake: Condvar::new(),
        });
        let w = shared.clone();
        let handle = std::thread::Builder::new()
            .name("bulkhead-audit".into())
            .spawn(move || writer(dir, w))
            .map_err(|source| AuditError::Dir {
                path: PathBuf::from("<audit writer thread>"),
                source,
            })?;
        Ok((
            Self {
                _closer: Some(Arc::new(Closer(shared.clone()))),
                shared: Some(shared),
                key: hmac::Key::new(hmac::HMAC_SHA256, key),
                dropped,
            },
            handle,
        ))
    }

    pub fn prompt_hash(&self, prompt: &[u8]) -> String {
        let tag = hmac::sign(&self.key, prompt);
        let mut out = String::with_capacity(64);
        for b in tag.as_ref() {
            out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            out.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
        }
        out
    }

    /// Buffer a record; never blocks on I/O (drops and counts when the writer is far behind).
    pub fn record(&self, rec: AuditRecord) {
        let Some(shared) = &self.shared else { return };
        let mut line = match serde_json::to_vec(&rec) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.bytes + line.len() > MAX_BUFFERED {
            drop(st);
            self.dropped.inc();
            return;
        }
        st.bytes += line.len();
        let wake = st.bytes >= WAKE_AT;
        match st.per_tenant.get_mut(&rec.tenant) {
            Some(buf) => buf.extend_from_slice(&line),
            None => {
                st.per_tenant.insert(rec.tenant, line);
            }
        }
        drop(st);
        if wake {
            shared.wake.notify_one();
        }
    }
}

fn writer(dir: PathBuf, shared: Arc<Shared>) {
    let mut files: HashMap<String, std::fs::File> = HashMap::new();
    loop {
        let (batch, closed) = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let (mut st, _) = shared
                .wake
                .wait_timeout_while(st, FLUSH_EVERY, |b| !b.closed && b.bytes < WAKE_AT)
                .unwrap_or_else(|e| e.into_inner());
            st.bytes = 0;
            (std::mem::take(&mut st.per_tenant), st.closed)
        };
        for (tenant, data) in batch {
            if data.is_empty() {
                continue;
            }
            if !files.contains_key(&tenant) {
                let path = dir.join(format!("{tenant}.jsonl"));
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    Ok(f) => {
                        files.insert(tenant.clone(), f);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot open audit log");
                        continue;
                    }
                }
            }
            if let Some(f) = files.get_mut(&tenant)
                && let Err(e) = f.write_all(&data)
            {
                tracing::warn!(tenant = %tenant, error = %e, "audit write failed");
            }
        }
        if closed {
            return;
        }
    }
}
