//! Audit log: one JSON line per request, written per tenant to `<dir>/<tenant>.jsonl` so one
//! tenant's log can be handed over without the others'. Requests without a verified tenant go
//! to `_unauthenticated.jsonl`. Prompts are never written, only a keyed hash (HMAC-SHA256).
//!
//! Bounded against floods (nobody can fill the disk, and one stream cannot push out another's
//! records):
//! * a *stream* is a configured tenant or `_unauthenticated`; each has its own share of the
//!   in-memory buffer and of the disk (`max_total_bytes / streams`);
//! * `<stream>.jsonl` rotates to `<stream>.jsonl.1`, `.2`, ... at `min(max_file_bytes, share / 2)`
//!   bytes; making room deletes only the same stream's oldest rotated files, so the directory
//!   never holds more than `max_total_bytes` of audit files;
//! * unauthenticated records are rate limited (a token bucket) and their client-controlled
//!   strings are cut short (`route` to 256 bytes, marked `route_truncated: true`);
//! * everything not written is counted in `bulkhead_audit_dropped_total{reason}`.
//!
//! Records of a tenant that is not (or no longer) configured are written to the
//! `_unauthenticated` stream (their `tenant` field kept), and files left by tenants that are no
//! longer configured count against the `_unauthenticated` share: they are deleted, oldest first,
//! only after `_unauthenticated`'s own rotated files, when that share needs the room.

mod chain;
mod disk;
mod record;

pub use record::{AuditRecord, LeakRecord, hex_tag};

use crate::record::metrics::Reason;
use agent_common::bucket::TokenBucket;
use disk::{Disk, writer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use ring::hmac;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The file stem for requests that carried no verified tenant.
pub const UNAUTHENTICATED: &str = "_unauthenticated";

/// `route` of an unauthenticated record is cut to at most this many bytes.
pub const MAX_UNAUTHENTICATED_ROUTE: usize = 256;
/// `route` of any other record is cut to at most this many bytes (a record always fits a file).
pub const MAX_ROUTE: usize = 2048;
/// `method` is cut to at most this many bytes (marked `method_truncated: true`).
pub const MAX_METHOD: usize = 32;
/// Other strings (`request_id`, `key_id`, `reason`) are cut to this many bytes.
const MAX_SHORT: usize = 128;

/// Why an audit record was not written (`bulkhead_audit_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Unauthenticated, over `audit.unauthenticated_per_second`.
    RateLimited,
    /// The stream's buffer share was full.
    BufferFull,
    Oversized,
    WriteFailed,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::RateLimited,
        DropReason::BufferFull,
        DropReason::Oversized,
        DropReason::WriteFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RateLimited => "rate_limited",
            DropReason::BufferFull => "buffer_full",
            DropReason::Oversized => "oversized",
            DropReason::WriteFailed => "write_failed",
        }
    }
}

/// The audit log's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Audit records not written, by [`DropReason`].
    pub dropped: Family<Reason, Counter>,
}

impl Metrics {
    /// Create the families and register them (`r` is the `bulkhead_` sub-registry).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "audit_dropped",
            "Audit records not written, by reason (rate_limited: unauthenticated over \
             audit.unauthenticated_per_second; buffer_full: the stream's buffer share was full; \
             oversized; write_failed)",
            m.dropped.clone(),
        );
        for reason in DropReason::ALL {
            let _ = m.dropped.get_or_create(&Reason {
                reason: reason.as_str(),
            });
        }
        m
    }
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

/// Size and rate bounds (from `[audit]`; a reload applies them through [`AuditLog::update`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditLimits {
    /// A file rotates at this size (or at half its stream's share, when that is smaller).
    pub max_file_bytes: u64,
    /// All audit files together stay within this; each stream gets an equal share.
    pub max_total_bytes: u64,
    /// Unauthenticated records per second (token bucket refill) ...
    pub unauthenticated_per_second: u32,
    /// ... and the bucket's size.
    pub unauthenticated_burst: u32,
}

impl From<&crate::config::AuditConfig> for AuditLimits {
    fn from(c: &crate::config::AuditConfig) -> Self {
        Self {
            max_file_bytes: c.max_file_bytes,
            max_total_bytes: c.max_total_bytes,
            unauthenticated_per_second: c.unauthenticated_per_second,
            unauthenticated_burst: c.unauthenticated_burst,
        }
    }
}

/// One counter per drop reason, looked up once.
#[derive(Clone, Default)]
struct Drops {
    rate_limited: Counter,
    buffer_full: Counter,
    oversized: Counter,
    write_failed: Counter,
}

impl Drops {
    fn new(family: &Family<Reason, Counter>) -> Self {
        let c = |r: DropReason| family.get_or_create(&Reason { reason: r.as_str() }).clone();
        Self {
            rate_limited: c(DropReason::RateLimited),
            buffer_full: c(DropReason::BufferFull),
            oversized: c(DropReason::Oversized),
            write_failed: c(DropReason::WriteFailed),
        }
    }
}

/// The bucket of unauthenticated records: its capacity (`burst`, at least 1) and its refill
/// per second (`rate`).
fn bucket_numbers(rate: u32, burst: u32) -> (f64, f64) {
    (f64::from(burst.max(1)), f64::from(rate))
}

/// Flush at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Wake the writer early when this much is buffered (all streams together).
const WAKE_AT: usize = 256 * 1024;
/// The buffer all streams share at most: each stream may hold this divided by the number of
/// streams unwritten, ...
const MAX_BUFFERED: usize = 16 * 1024 * 1024;
/// ... but never less than this.
const MIN_STREAM_BUFFER: usize = 64 * 1024;

fn buffer_share(streams: usize) -> usize {
    (MAX_BUFFERED / streams.max(1)).max(MIN_STREAM_BUFFER)
}

/// Buffers shared between request handlers and the writer thread.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    limits: AuditLimits,
    /// The configured tenants (each its own stream; `_unauthenticated` is always one).
    tenants: Arc<HashSet<String>>,
    /// Bumped by `update`, so the writer knows to recompute the shares.
    generation: u64,
    /// Unwritten lines per stream.
    pending: HashMap<String, Pending>,
    pending_bytes: usize,
    /// How much one stream may hold unwritten.
    stream_cap: usize,
    /// Unauthenticated records allowed (see [`bucket_numbers`]).
    bucket: TokenBucket<Instant>,
    wake_now: bool,
    closed: bool,
}

/// A stream's unwritten lines, and which of them the writer is to seal.
#[derive(Default)]
struct Pending {
    data: Vec<u8>,
    /// In order: each a record of a sealed tenant (its bytes in `data`, newline included).
    sealed: Vec<SealMark>,
}

struct SealMark {
    start: usize,
    end: usize,
    seal: Arc<Sealer>,
}

/// A sealed tenant's keys with its name (the associated data). The writer seals (off the
/// request path), so that each record's place in its chain is the order it reaches the file,
/// and a record dropped before it is written leaves no gap.
struct Sealer {
    tenant: String,
    keys: Arc<crate::record::seal::SealKeys>,
}

impl State {
    fn new(tenants: HashSet<String>, limits: &AuditLimits) -> Self {
        Self {
            limits: *limits,
            stream_cap: buffer_share(tenants.len() + 1),
            tenants: Arc::new(tenants),
            generation: 0,
            pending: HashMap::new(),
            pending_bytes: 0,
            bucket: {
                let (capacity, per_sec) = bucket_numbers(
                    limits.unauthenticated_per_second,
                    limits.unauthenticated_burst,
                );
                TokenBucket::full(capacity, per_sec)
            },
            wake_now: false,
            closed: false,
        }
    }

    /// Buffer one serialized record: `Ok(true)` when the writer should be woken now, `Err`
    /// when the record was dropped (and counted).
    fn push(
        &mut self,
        tenant: &str,
        line: &[u8],
        seal: Option<Arc<Sealer>>,
        now: Instant,
        drops: &Drops,
    ) -> Result<bool, ()> {
        let stream = if tenant == UNAUTHENTICATED {
            if !self.bucket.take(1.0, now) {
                drops.rate_limited.inc();
                return Err(());
            }
            UNAUTHENTICATED
        } else if self.tenants.contains(tenant) {
            tenant
        } else {
            UNAUTHENTICATED
        };
        let cap = self.stream_cap;
        let buf = match self.pending.get_mut(stream) {
            Some(b) => b,
            None => self.pending.entry(stream.to_string()).or_default(),
        };
        if buf.data.len() + line.len() > cap {
            drops.buffer_full.inc();
            return Err(());
        }
        let start = buf.data.len();
        buf.data.extend_from_slice(line);
        if let Some(seal) = seal {
            buf.sealed.push(SealMark {
                start,
                end: buf.data.len(),
                seal,
            });
        }
        let half_full = buf.data.len() >= cap / 2;
        self.pending_bytes += line.len();
        if !self.wake_now && (half_full || self.pending_bytes >= WAKE_AT) {
            self.wake_now = true;
            return Ok(true);
        }
        Ok(false)
    }
}

/// The tenants whose records are sealed, with their keys.
pub type Seals = Arc<std::collections::HashMap<String, Arc<crate::record::seal::SealKeys>>>;

/// The recording side; cheap to clone. Records are serialized on the request path into a
/// per-stream buffer and written by one thread at least every 50 ms, so the request path
/// never waits on the disk and rarely wakes another thread. A sealed tenant's records are
/// sealed and chained by that thread as they are written (see [`crate::record::seal`]).
#[derive(Clone)]
pub struct AuditLog {
    shared: Option<Arc<Shared>>,
    _closer: Option<Arc<Closer>>,
    key: hmac::Key,
    drops: Drops,
    seals: Arc<std::sync::RwLock<HashMap<String, Arc<Sealer>>>>,
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
            drops: Drops::default(),
            seals: Default::default(),
        }
    }

    /// Start the writer thread; it writes what is left and ends when every clone is dropped.
    /// `tenants` are the configured tenants (each gets its own buffer and disk share). Files
    /// already in `dir` are counted (and trimmed to the shares) before this returns.
    pub fn start<I, S>(
        dir: PathBuf,
        key: &[u8],
        limits: AuditLimits,
        tenants: I,
        dropped: Family<Reason, Counter>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), AuditError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Dir {
            path: dir.clone(),
            source,
        })?;
        let drops = Drops::new(&dropped);
        let tenants: HashSet<String> = tenants.into_iter().map(Into::into).collect();
        let disk = Disk::open(dir, limits, tenants.clone(), drops.clone());
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(tenants, &limits)),
            wake: Condvar::new(),
        });
        let w = shared.clone();
        let handle = std::thread::Builder::new()
            .name("bulkhead-audit".into())
            .spawn(move || writer(disk, w))
            .map_err(|source| AuditError::Dir {
                path: PathBuf::from("<audit writer thread>"),
                source,
            })?;
        Ok((
            Self {
                _closer: Some(Arc::new(Closer(shared.clone()))),
                shared: Some(shared),
                key: hmac::Key::new(hmac::HMAC_SHA256, key),
                drops,
                seals: Default::default(),
            },
            handle,
        ))
    }

    /// Apply a reloaded configuration: new limits and the configured tenants. The buffer and
    /// disk shares are recomputed, and the writer trims every stream to its new share on its
    /// next round. Files of tenants no longer listed then count against `_unauthenticated`'s
    /// share. (`audit.dir` and `audit.hash_key_file` are read at start only.)
    pub fn update<I, S>(&self, limits: AuditLimits, tenants: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let Some(shared) = &self.shared else { return };
        let tenants: HashSet<String> = tenants.into_iter().map(Into::into).collect();
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if *st.tenants == tenants && st.limits == limits {
            return;
        }
        let (capacity, per_sec) = bucket_numbers(
            limits.unauthenticated_per_second,
            limits.unauthenticated_burst,
        );
        st.bucket.set_rate(capacity, per_sec);
        st.limits = limits;
        st.stream_cap = buffer_share(tenants.len() + 1);
        st.tenants = Arc::new(tenants);
        st.generation += 1;
        st.wake_now = true;
        drop(st);
        shared.wake.notify_one();
    }

    /// Seal these tenants' records from now on (configuration load and reload).
    pub fn set_seals(&self, seals: Seals) {
        let seals = seals
            .iter()
            .map(|(tenant, keys)| {
                let s = Sealer {
                    tenant: tenant.clone(),
                    keys: keys.clone(),
                };
                (tenant.clone(), Arc::new(s))
            })
            .collect();
        *self.seals.write().unwrap_or_else(|e| e.into_inner()) = seals;
    }

    pub fn prompt_hash(&self, prompt: &[u8]) -> String {
        hex_tag(&hmac::sign(&self.key, prompt))
    }

    /// The prompt hash's key, for hashing the prompt fields as inspection serialises them.
    pub fn prompt_key(&self) -> &hmac::Key {
        &self.key
    }

    /// Buffer a record; never blocks on I/O (drops and counts when rate limited or when the
    /// stream's buffer share is full).
    pub fn record(&self, mut rec: AuditRecord) {
        let Some(shared) = &self.shared else { return };
        rec.bound();
        let mut line = match serde_json::to_vec(&rec) {
            Ok(l) => l,
            Err(_) => return,
        };
        // Sealed (and chained) by the writer; a record that cannot be sealed is never written
        // in the clear.
        let seal = self
            .seals
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rec.tenant)
            .cloned();
        line.push(b'\n');
        let now = Instant::now();
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let wake = st.push(&rec.tenant, &line, seal, now, &self.drops);
        drop(st);
        if wake == Ok(true) {
            shared.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
