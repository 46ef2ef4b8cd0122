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

use crate::record::metrics::Reason;
use crate::record::seal::{Chain, Scratch, hex};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use ring::hmac;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
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

/// The reasons of `bulkhead_audit_dropped_total{reason}`.
pub use crate::record::metrics::AUDIT_DROP_REASONS as DROP_REASONS;

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
    /// The request body's `model` (cut to 128 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Prompt tokens the upstream served from its prefix cache, when it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// The model the answer named (the one that served it, cut to 128 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// What the request cost in `cost.currency` (usage x the tenant's price for
    /// `price_model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The price used: the served model's, else the request's `model`'s (a model of the
    /// price tables), else `other` (`[cost.default]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_model: Option<String>,
    /// Set (and written) when `route` was cut short; see [`MAX_UNAUTHENTICATED_ROUTE`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub route_truncated: bool,
    /// Set (and written) when `method` was cut short; see [`MAX_METHOD`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub method_truncated: bool,
    /// Canaries, keywords and injection markers found (by owner and index, never the text).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaks: Vec<LeakRecord>,
}

/// One canary, keyword or injection marker found, as the audit records it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeakRecord {
    /// `canary`, `keyword` or `marker`.
    pub kind: &'static str,
    /// The tenant the canary or keyword belongs to; the marker's label.
    pub owner: String,
    /// The pattern's position in the owner's `canaries` / `keywords` (or in the marker list).
    pub index: usize,
    /// `prompt` or `response`.
    pub r#where: &'static str,
    /// In the owner's record: the tenant whose traffic carried it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_by: Option<String>,
}

impl LeakRecord {
    pub fn new(h: &crate::record::leaks::Hit, seen_by: Option<&str>) -> Self {
        Self {
            kind: h.kind.as_str(),
            owner: h.owner.to_string(),
            index: h.index,
            r#where: h.seen.as_str(),
            seen_by: seen_by.map(str::to_string),
        }
    }
}

/// Cut `s` to at most `max` bytes on a character boundary; true when it was cut.
fn truncate(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let end = s.floor_char_boundary(max);
    s.truncate(end);
    true
}

impl AuditRecord {
    /// Bound every string a client can influence, so that a record's size is bounded.
    fn bound(&mut self) {
        let route_max = if self.tenant == UNAUTHENTICATED {
            MAX_UNAUTHENTICATED_ROUTE
        } else {
            MAX_ROUTE
        };
        self.route_truncated |= truncate(&mut self.route, route_max);
        self.method_truncated |= truncate(&mut self.method, MAX_METHOD);
        truncate(&mut self.request_id, MAX_SHORT);
        truncate(&mut self.tenant, MAX_SHORT);
        for s in [
            &mut self.key_id,
            &mut self.client_request_id,
            &mut self.reason,
            &mut self.prompt_hash,
            &mut self.model,
            &mut self.served_model,
            &mut self.price_model,
        ]
        .into_iter()
        .flatten()
        {
            truncate(s, MAX_SHORT);
        }
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
        let c = |reason| family.get_or_create(&Reason { reason }).clone();
        Self {
            rate_limited: c("rate_limited"),
            buffer_full: c("buffer_full"),
            oversized: c("oversized"),
            write_failed: c("write_failed"),
        }
    }
}

/// Unauthenticated records allowed: refills `rate` per second up to `burst`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn set(&mut self, rate: u32, burst: u32) {
        self.rate = f64::from(rate);
        self.burst = f64::from(burst.max(1));
        self.tokens = self.tokens.min(self.burst);
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
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
    bucket: Bucket,
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
            bucket: Bucket::new(
                limits.unauthenticated_per_second,
                limits.unauthenticated_burst,
            ),
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
            if !self.bucket.take(now) {
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
        st.bucket.set(
            limits.unauthenticated_per_second,
            limits.unauthenticated_burst,
        );
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

fn writer(mut disk: Disk, shared: Arc<Shared>) {
    let mut generation = 0;
    loop {
        let (batch, update, closed) = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let (mut st, _) = shared
                .wake
                .wait_timeout_while(st, FLUSH_EVERY, |s| !s.closed && !s.wake_now)
                .unwrap_or_else(|e| e.into_inner());
            st.wake_now = false;
            st.pending_bytes = 0;
            let update = (st.generation != generation).then(|| {
                generation = st.generation;
                (st.limits, st.tenants.clone())
            });
            let batch: Vec<(String, Pending)> = st
                .pending
                .iter_mut()
                .filter(|(_, b)| !b.data.is_empty())
                .map(|(k, b)| (k.clone(), std::mem::take(b)))
                .collect();
            (batch, update, st.closed)
        };
        if let Some((limits, tenants)) = update {
            disk.configure(limits, (*tenants).clone());
        }
        for (stream, pending) in batch {
            disk.write_batch(&stream, &pending);
        }
        if closed {
            disk.log_stream_ends();
            return;
        }
    }
}

/// One stream's files: `<name>.jsonl` (index 0) and `<name>.jsonl.<n>` (older as n grows).
#[derive(Default)]
struct Files {
    current: Option<std::fs::File>,
    current_size: u64,
    /// Rotated files: index -> size.
    rotated: BTreeMap<u64, u64>,
}

impl Files {
    fn total(&self) -> u64 {
        self.current_size + self.rotated.values().sum::<u64>()
    }
}

/// The writer's view of the directory; all disk I/O happens here, on the writer thread.
struct Disk {
    dir: PathBuf,
    limits: AuditLimits,
    tenants: HashSet<String>,
    /// Each stream's share of `max_total_bytes`.
    share: u64,
    /// The size at which a stream's current file rotates.
    file_limit: u64,
    /// Every stream with files here: configured, `_unauthenticated`, and retired ones.
    streams: HashMap<String, Files>,
    drops: Drops,
    /// Per file stream, each sealed tenant's chain (normally one: the tenant's own file).
    chains: HashMap<String, Vec<(String, Chain)>>,
    /// Reused by sealing: the lines being written, and the sealer's buffers.
    piece: Vec<u8>,
    scratch: Scratch,
}

/// `<stem>.jsonl` -> (stem, 0); `<stem>.jsonl.<n>` -> (stem, n). Other names are not ours.
fn parse_name(name: &str) -> Option<(&str, u64)> {
    let (stem, idx) = match name.strip_suffix(".jsonl") {
        Some(stem) => (stem, 0),
        None => {
            let (head, digits) = name.rsplit_once('.')?;
            let n: u64 = digits.parse().ok().filter(|n| *n > 0)?;
            if n.to_string() != digits {
                return None; // `01`, `+1`: not a name this writer makes
            }
            (head.strip_suffix(".jsonl")?, n)
        }
    };
    safe_stem(stem).then_some((stem, idx))
}

/// A name usable as a file stem: `_unauthenticated` or a config-valid tenant name.
fn safe_stem(s: &str) -> bool {
    s == UNAUTHENTICATED
        || (!s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
}

fn count_lines(data: &[u8]) -> u64 {
    data.iter().filter(|b| **b == b'\n').count() as u64
}

impl Disk {
    /// Count the audit files already in `dir` and trim every stream to its share.
    fn open(dir: PathBuf, limits: AuditLimits, tenants: HashSet<String>, drops: Drops) -> Self {
        let mut d = Disk {
            dir,
            limits,
            tenants: HashSet::new(),
            share: 0,
            file_limit: 0,
            streams: HashMap::new(),
            drops,
            chains: HashMap::new(),
            piece: Vec::new(),
            scratch: Scratch::default(),
        };
        d.scan();
        d.configure(limits, tenants);
        d
    }

    fn scan(&mut self) {
        self.streams.clear();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list the audit directory");
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some((stem, idx)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let files = self.streams.entry(stem.to_string()).or_default();
            if idx == 0 {
                files.current_size = meta.len();
            } else {
                files.rotated.insert(idx, meta.len());
            }
        }
    }

    /// Recompute the shares (for new limits or tenants) and trim every stream to its share.
    fn configure(&mut self, limits: AuditLimits, tenants: HashSet<String>) {
        self.limits = limits;
        let streams = tenants.len() as u64 + 1;
        self.tenants = tenants;
        self.share = self.limits.max_total_bytes / streams;
        self.file_limit = self.limits.max_file_bytes.min(self.share / 2);
        let mut names: Vec<String> = self
            .streams
            .keys()
            .filter(|n| self.tenants.contains(*n))
            .cloned()
            .collect();
        names.sort();
        // Each configured stream within its share, then `_unauthenticated` (with the retired).
        for name in &names {
            self.trim(name, 0);
        }
        self.trim(UNAUTHENTICATED, 0);
    }

    fn path(&self, stem: &str, idx: u64) -> PathBuf {
        if idx == 0 {
            self.dir.join(format!("{stem}.jsonl"))
        } else {
            self.dir.join(format!("{stem}.jsonl.{idx}"))
        }
    }

    /// Streams that are neither configured nor `_unauthenticated` (their files stay until the
    /// `_unauthenticated` share needs the room).
    fn retired(&self) -> Vec<String> {
        let mut r: Vec<String> = self
            .streams
            .keys()
            .filter(|n| *n != UNAUTHENTICATED && !self.tenants.contains(*n))
            .cloned()
            .collect();
        r.sort();
        r
    }

    /// Bytes counted against `stream`'s share.
    fn group_total(&self, stream: &str) -> u64 {
        let own = self.streams.get(stream).map_or(0, Files::total);
        if stream == UNAUTHENTICATED {
            own + self
                .retired()
                .iter()
                .filter_map(|n| self.streams.get(n))
                .map(Files::total)
                .sum::<u64>()
        } else {
            own
        }
    }

    /// Delete one file; false (and it stays counted) when it could not be deleted.
    fn remove(&mut self, stem: &str, idx: u64) -> bool {
        let path = self.path(stem, idx);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete an old audit file");
            return false;
        }
        if let Some(f) = self.streams.get_mut(stem) {
            if idx == 0 {
                f.current = None;
                f.current_size = 0;
            } else {
                f.rotated.remove(&idx);
            }
            if f.current.is_none() && f.current_size == 0 && f.rotated.is_empty() {
                self.streams.remove(stem);
            }
        }
        true
    }

    /// The next file to delete for room in `stream`'s share: its own oldest rotated file; for
    /// `_unauthenticated` then a retired stream's oldest file; and, only when `last_resort`, the
    /// stream's current file. Never another configured stream's file.
    fn victim(&self, stream: &str, last_resort: bool) -> Option<(String, u64)> {
        let own = self.streams.get(stream);
        if let Some(idx) = own.and_then(|f| f.rotated.keys().next_back()) {
            return Some((stream.to_string(), *idx));
        }
        if stream == UNAUTHENTICATED {
            for name in self.retired() {
                let Some(f) = self.streams.get(&name) else {
                    continue;
                };
                if let Some(idx) = f.rotated.keys().next_back() {
                    return Some((name, *idx));
                }
                if f.current_size > 0 {
                    return Some((name, 0));
                }
            }
        }
        (last_resort && own.is_some_and(|f| f.current_size > 0)).then(|| (stream.to_string(), 0))
    }

    /// Delete old files (see [`Disk::victim`]) until `need` more bytes fit `stream`'s share.
    /// With `need` 0 (a share shrank) the current file goes too when nothing else is left.
    fn trim(&mut self, stream: &str, need: u64) {
        while self.group_total(stream) + need > self.share {
            let Some((name, idx)) = self.victim(stream, need == 0) else {
                return;
            };
            if idx == 0 && name == stream {
                tracing::warn!(
                    stream,
                    "audit share shrank below the current file: deleting it"
                );
            }
            if !self.remove(&name, idx) {
                return; // could not delete: do not spin (the write is then refused)
            }
            tracing::info!(
                stream,
                file = %self.path(&name, idx).display(),
                share = self.share,
                "deleted an old audit file to stay within the stream's share"
            );
        }
    }

    /// `<stream>.jsonl` -> `.1`, `.1` -> `.2`, ... On an error, recount from the directory
    /// and return false.
    fn rotate(&mut self, stream: &str) -> bool {
        let Some(f) = self.streams.get_mut(stream) else {
            return false;
        };
        f.current = None;
        let idxs: Vec<u64> = f.rotated.keys().rev().copied().collect();
        for idx in idxs.into_iter().chain(std::iter::once(0)) {
            let (from, to) = (self.path(stream, idx), self.path(stream, idx + 1));
            if let Err(e) = std::fs::rename(&from, &to)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(from = %from.display(), error = %e, "cannot rotate an audit file");
                self.scan();
                return false;
            }
        }
        if let Some(f) = self.streams.get_mut(stream) {
            let size = f.current_size;
            f.rotated = std::mem::take(&mut f.rotated)
                .into_iter()
                .map(|(i, s)| (i + 1, s))
                .collect();
            f.rotated.insert(1, size);
            f.current_size = 0;
        }
        true
    }

    fn open_current(&mut self, stream: &str) -> bool {
        let path = self.path(stream, 0);
        if !self.streams.contains_key(stream) {
            self.streams.insert(stream.to_string(), Files::default());
        }
        let Some(f) = self.streams.get_mut(stream) else {
            return false;
        };
        if f.current.is_some() {
            return true;
        }
        match std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
        {
            Ok(mut file) => {
                if let Ok(m) = file.metadata() {
                    f.current_size = m.len();
                }
                // A line cut short (the last writer stopped mid-write) is ended here, so that
                // the next record does not run into it.
                let mut last = [b'\n'];
                if f.current_size > 0
                    && file.seek(SeekFrom::End(-1)).is_ok()
                    && file.read_exact(&mut last).is_ok()
                    && last[0] != b'\n'
                {
                    tracing::warn!(path = %path.display(), "the audit file ends in a line cut short: ending it");
                    if file.write_all(b"\n").is_ok() {
                        f.current_size += 1;
                    }
                }
                f.current = Some(file);
                true
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open audit log");
                false
            }
        }
    }

    /// The stream a record of `stream` is written to: a configured tenant's own, else
    /// `_unauthenticated`.
    fn route<'s>(&self, stream: &'s str) -> &'s str {
        if stream == UNAUTHENTICATED || self.tenants.contains(stream) {
            stream
        } else {
            UNAUTHENTICATED
        }
    }

    /// One stream's buffered lines: plain runs as they are, sealed records sealed in order.
    fn write_batch(&mut self, stream: &str, p: &Pending) {
        let mut pos = 0;
        let mut marks = p.sealed.iter().peekable();
        while let Some(m) = marks.next() {
            let mut end = m.end;
            while let Some(n) = marks.peek()
                && n.start == end
                && Arc::ptr_eq(&n.seal, &m.seal)
            {
                end = n.end;
                marks.next();
            }
            if pos < m.start {
                self.append(stream, &p.data[pos..m.start]);
            }
            self.append_sealed(stream, &m.seal, &p.data[m.start..end]);
            pos = end;
        }
        if pos < p.data.len() {
            self.append(stream, &p.data[pos..]);
        }
    }

    /// Append whole lines to `stream`, rotating and making room within its share.
    fn append(&mut self, stream: &str, data: &[u8]) {
        let stream = self.route(stream);
        let mut rest = data;
        while !rest.is_empty() {
            let cur = self.streams.get(stream).map_or(0, |f| f.current_size);
            let room = self.file_limit.saturating_sub(cur);
            // As many whole lines as fit the current file.
            let mut take = 0usize;
            for (i, b) in rest.iter().enumerate() {
                if (i + 1) as u64 > room {
                    break;
                }
                if *b == b'\n' {
                    take = i + 1;
                }
            }
            if take == 0 {
                if cur > 0 {
                    if !self.rotate(stream) {
                        self.drops.write_failed.inc_by(count_lines(rest));
                        return;
                    }
                    continue;
                }
                // One line longer than a whole file: cannot be kept within the share.
                let len = rest
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(rest.len(), |p| p + 1);
                self.drops.oversized.inc();
                rest = &rest[len..];
                continue;
            }
            let piece = &rest[..take];
            rest = &rest[take..];
            self.write_piece(stream, piece);
        }
    }

    /// Seal `data`'s lines (records of `seal.tenant`) into their chain and append them to
    /// `stream` as [`Disk::append`] does. A record counts in the chain only once written: a
    /// piece that does not reach the file is sealed again (same `seq`s) with the next one.
    fn append_sealed(&mut self, stream: &str, seal: &Sealer, data: &[u8]) {
        let stream = self.route(stream);
        let mut lines = data
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .peekable();
        let Some(mut chain) = self.chain(stream, seal) else {
            tracing::warn!(tenant = %seal.tenant, "cannot start an audit chain: records dropped");
            self.drops.write_failed.inc_by(lines.count() as u64);
            return;
        };
        let mut piece = std::mem::take(&mut self.piece);
        while lines.peek().is_some() {
            piece.clear();
            let cur = self.streams.get(stream).map_or(0, |f| f.current_size);
            let room = self.file_limit.saturating_sub(cur);
            let checkpoint = chain;
            let mut n = 0u64;
            while let Some(l) = lines.peek() {
                let (len, saved) = (piece.len(), chain);
                if !seal.keys.seal_chained(
                    &seal.tenant,
                    &mut chain,
                    l,
                    &mut piece,
                    &mut self.scratch,
                ) {
                    // Never written in the clear.
                    tracing::warn!(tenant = %seal.tenant, "cannot seal an audit record: dropped");
                    self.drops.write_failed.inc();
                    lines.next();
                    continue;
                }
                piece.push(b'\n');
                if piece.len() as u64 > room {
                    piece.truncate(len);
                    chain = saved;
                    break;
                }
                lines.next();
                n += 1;
            }
            if n == 0 {
                if lines.peek().is_none() {
                    break;
                }
                if cur > 0 {
                    if !self.rotate(stream) {
                        self.drops.write_failed.inc_by(lines.count() as u64);
                        break;
                    }
                    continue;
                }
                self.drops.oversized.inc();
                lines.next();
                continue;
            }
            if !self.write_piece(stream, &piece) {
                chain = checkpoint;
            }
        }
        self.piece = piece;
        if let Some(v) = self.chains.get_mut(stream)
            && let Some(c) = v.iter_mut().find(|(t, _)| *t == seal.tenant)
        {
            c.1 = chain;
        }
    }

    /// `seal.tenant`'s chain in `stream`: on first use a new stream, named after the last
    /// record already in the file when that is one of the tenant's that opens.
    fn chain(&mut self, stream: &str, seal: &Sealer) -> Option<Chain> {
        if let Some(v) = self.chains.get(stream)
            && let Some((_, c)) = v.iter().find(|(t, _)| *t == seal.tenant)
        {
            return Some(*c);
        }
        let last = self.last_line(stream);
        let after = last
            .as_deref()
            .and_then(|l| seal.keys.link_of(&seal.tenant, l));
        if last.is_some() && after.is_none() {
            tracing::warn!(
                tenant = %seal.tenant,
                file = stream,
                "the last audit record is not a chained record of this tenant that opens: the new audit stream names no predecessor"
            );
        }
        let chain = Chain::new(after)?;
        tracing::info!(
            tenant = %seal.tenant,
            file = stream,
            stream = %hex(&chain.stream()),
            after_stream = after.map(|a| hex(&a.stream)),
            after_seq = after.map(|a| a.seq),
            "audit stream started"
        );
        self.chains
            .entry(stream.to_string())
            .or_default()
            .push((seal.tenant.clone(), chain));
        Some(chain)
    }

    /// The last whole line of `stream`'s newest file that has one (a line cut short at the
    /// end is not one).
    fn last_line(&self, stream: &str) -> Option<Vec<u8>> {
        /// Read at most this much of a file's end: far more than a record.
        const TAIL: u64 = 64 * 1024;
        let f = self.streams.get(stream)?;
        let newest_first = std::iter::once((0, f.current_size))
            .chain(f.rotated.iter().map(|(i, s)| (*i, *s)))
            .filter(|(_, size)| *size > 0);
        for (idx, _) in newest_first {
            let Ok(mut file) = std::fs::File::open(self.path(stream, idx)) else {
                continue;
            };
            let len = file.metadata().map_or(0, |m| m.len());
            let from = len.saturating_sub(TAIL);
            let mut buf = Vec::new();
            if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut buf).is_err() {
                continue;
            }
            let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            let body = &buf[..end];
            match body.iter().rposition(|b| *b == b'\n') {
                Some(p) => return Some(body[p + 1..].to_vec()),
                None if from == 0 => return Some(body.to_vec()),
                None => continue,
            }
        }
        None
    }

    /// Log where each audit stream ended (an anchor outside the files: a reader can compare).
    fn log_stream_ends(&self) {
        for (file, v) in &self.chains {
            for (tenant, c) in v {
                tracing::info!(
                    tenant = %tenant,
                    file = %file,
                    stream = %hex(&c.stream()),
                    last_seq = c.last().map(|l| l.seq),
                    "audit stream ended"
                );
            }
        }
    }

    /// Write whole lines to `stream`'s current file after making room; true when all of
    /// them reached it.
    fn write_piece(&mut self, stream: &str, piece: &[u8]) -> bool {
        let take = piece.len() as u64;
        self.trim(stream, take);
        if self.group_total(stream) + take > self.share || !self.open_current(stream) {
            self.drops.write_failed.inc_by(count_lines(piece));
            return false;
        }
        let Some(f) = self.streams.get_mut(stream) else {
            return false;
        };
        let res = match f.current.as_mut() {
            Some(file) => file.write_all(piece),
            None => return false,
        };
        match res {
            Ok(()) => {
                f.current_size += take;
                true
            }
            Err(e) => {
                tracing::warn!(stream, error = %e, "audit write failed");
                self.drops.write_failed.inc_by(count_lines(piece));
                // Count what did reach the file, and reopen next time.
                let size = f.current.as_ref().and_then(|x| x.metadata().ok());
                f.current_size = size.map_or(f.current_size + take, |m| m.len());
                f.current = None;
                false
            }
        }
    }
}

/// A prompt hash as the audit record writes it: the HMAC tag in lowercase hex.
pub fn hex_tag(tag: &hmac::Tag) -> String {
    let mut out = String::with_capacity(64);
    for b in tag.as_ref() {
        out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
        out.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn limits(file: u64, total: u64) -> AuditLimits {
        AuditLimits {
            max_file_bytes: file,
            max_total_bytes: total,
            unauthenticated_per_second: 10,
            unauthenticated_burst: 5,
        }
    }

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn line(tag: &str, n: usize, len: usize) -> Vec<u8> {
        let mut l = format!("{{\"t\":\"{tag}\",\"n\":{n},\"pad\":\"");
        while l.len() < len - 3 {
            l.push('x');
        }
        l.push_str("\"}\n");
        l.into_bytes()
    }

    fn dir_total(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    fn lines_of(dir: &Path, stem: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if parse_name(&name).is_some_and(|(s, _)| s == stem) {
                let text = std::fs::read_to_string(e.path()).unwrap();
                out.extend(text.lines().map(str::to_string));
            }
        }
        out
    }

    #[test]
    fn truncation_is_on_a_char_boundary_and_marked() {
        let mut rec = AuditRecord {
            tenant: UNAUTHENTICATED.into(),
            route: format!("/v1/{}", "é".repeat(4000)),
            method: "X".repeat(100),
            ..Default::default()
        };
        rec.bound();
        assert!(rec.route.len() <= MAX_UNAUTHENTICATED_ROUTE && rec.route.len() >= 250);
        assert!(rec.route_truncated && rec.method_truncated);
        assert_eq!(rec.method.len(), MAX_METHOD);
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["route_truncated"], true);
        let mut short = AuditRecord {
            tenant: "acme".into(),
            route: "/v1/models".into(),
            method: "GET".into(),
            ..Default::default()
        };
        short.bound();
        let json = serde_json::to_value(&short).unwrap();
        assert!(json.get("route_truncated").is_none(), "{json}");
        assert_eq!(json["route"], "/v1/models");
    }

    #[test]
    fn names_parse() {
        assert_eq!(parse_name("acme.jsonl"), Some(("acme", 0)));
        assert_eq!(parse_name("acme.jsonl.12"), Some(("acme", 12)));
        assert_eq!(
            parse_name("_unauthenticated.jsonl.1"),
            Some((UNAUTHENTICATED, 1))
        );
        for bad in [
            "acme.jsonl.0",
            "acme.jsonl.01",
            "acme.json",
            "x",
            ".jsonl",
            "a b.jsonl",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let mut b = Bucket::new(10, 5);
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| b.take(t0)).count(), 5);
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(110)));
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..20).filter(|_| b.take(later)).count(), 5);
    }

    #[test]
    fn one_streams_burst_does_not_drop_anothers_records() {
        let drops = Drops::default();
        let mut st = State::new(set(&["a", "b"]), &limits(1 << 20, 1 << 30));
        let cap = st.stream_cap;
        let l = line("a", 0, 1000);
        let now = Instant::now();
        let mut kept = 0;
        for _ in 0..(cap / 1000 + 100) {
            if st.push("a", &l, None, now, &drops).is_ok() {
                kept += 1;
            }
        }
        assert!(kept <= cap / 1000 && kept > 0);
        assert!(drops.buffer_full.get() >= 100);
        let full = drops.buffer_full.get();
        for _ in 0..100 {
            st.push("b", &line("b", 0, 1000), None, now, &drops)
                .unwrap();
        }
        assert_eq!(drops.buffer_full.get(), full);
        // Unauthenticated: rate limited before buffering; unknown tenants go to its buffer.
        let ok = (0..50)
            .filter(|_| st.push(UNAUTHENTICATED, b"{}\n", None, now, &drops).is_ok())
            .count();
        assert_eq!(ok, 5);
        assert_eq!(drops.rate_limited.get(), 45);
        st.push("gone", b"{}\n", None, now, &drops).unwrap();
        assert_eq!(st.pending[UNAUTHENTICATED].data.len(), 6 * 3);
    }

    #[test]
    fn rotation_keeps_each_stream_within_its_share() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        // 3 streams of 30 000 bytes; files rotate at 10 000.
        let lim = limits(10_000, 90_000);
        let mut d = Disk::open(dir.clone(), lim, set(&["a", "b"]), Drops::default());
        assert_eq!((d.share, d.file_limit), (30_000, 10_000));
        let b_lines: Vec<u8> = (0..20).flat_map(|n| line("b", n, 200)).collect();
        d.append("b", &b_lines);
        for n in 0..2000 {
            d.append("a", &line("a", n, 300));
            assert!(dir_total(&dir) <= 90_000);
            assert!(d.group_total("a") <= 30_000);
        }
        assert_eq!(lines_of(&dir, "b").len(), 20, "b's records were deleted");
        assert!(dir.join("a.jsonl.1").exists() && dir.join("a.jsonl.2").exists());
        assert!(!dir.join("a.jsonl.3").exists());
        let a = lines_of(&dir, "a");
        // The newest records are kept, in order: the last one is in a.jsonl.
        assert!(a.len() >= 60, "{}", a.len());
        let cur = std::fs::read_to_string(dir.join("a.jsonl")).unwrap();
        assert!(
            cur.trim_end()
                .lines()
                .last()
                .unwrap()
                .contains("\"n\":1999")
        );
        for f in std::fs::read_dir(&dir).unwrap() {
            assert!(f.unwrap().metadata().unwrap().len() <= 10_000);
        }
        // Restart with a smaller cap: existing files are counted and trimmed at once.
        drop(d);
        let d = Disk::open(
            dir.clone(),
            limits(10_000, 60_000),
            set(&["a", "b"]),
            Drops::default(),
        );
        assert!(dir_total(&dir) <= 60_000);
        assert_eq!(lines_of(&dir, "b").len(), 20);
        drop(d);
    }

    #[test]
    fn retired_tenants_files_count_against_the_unauthenticated_share() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let lim = limits(10_000, 90_000);
        let mut d = Disk::open(dir.clone(), lim, set(&["a", "b"]), Drops::default());
        let bl: Vec<u8> = (0..40).flat_map(|n| line("b", n, 500)).collect();
        d.append("b", &bl);
        assert_eq!(d.group_total("b"), 20_000);
        // b is removed and c, d added: 4 streams of 22 500; b's 20 000 bytes now count for
        // _unauthenticated.
        d.configure(lim, set(&["a", "c", "d"]));
        assert_eq!(lines_of(&dir, "b").len(), 40);
        // A late record of b goes to _unauthenticated.jsonl.
        d.append("b", &line("late-b", 0, 200));
        assert_eq!(lines_of(&dir, UNAUTHENTICATED).len(), 1);
        for n in 0..1000 {
            d.append(UNAUTHENTICATED, &line("u", n, 300));
            assert!(d.group_total(UNAUTHENTICATED) <= 22_500);
            assert!(dir_total(&dir) <= 90_000);
        }
        // b's files went only as far as needed (its newest file stays), a was never touched.
        assert_eq!(lines_of(&dir, "b").len(), 20);
        assert!(!dir.join("b.jsonl.1").exists());
        let al: Vec<u8> = (0..10).flat_map(|n| line("a", n, 500)).collect();
        d.append("a", &al);
        for n in 0..1000 {
            d.append(UNAUTHENTICATED, &line("u", n, 300));
        }
        assert_eq!(lines_of(&dir, "a").len(), 10);
        assert!(dir_total(&dir) <= 90_000);
    }

    /// Sealing happens as records reach the file: a record dropped (too large for a file)
    /// takes no `seq`, so the chain read back has no gap, across rotations.
    #[test]
    fn a_dropped_sealed_record_leaves_no_gap_in_the_chain() {
        use crate::record::seal::{SealKeys, Verifier};
        let tmp = tempfile::tempdir().unwrap();
        let drops = Drops::default();
        let mut d = Disk::open(
            tmp.path().to_path_buf(),
            limits(1500, 1 << 20),
            set(&["a"]),
            drops.clone(),
        );
        let keys = SealKeys::parse("k1 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n").unwrap();
        let seal = Sealer {
            tenant: "a".into(),
            keys: Arc::new(keys),
        };
        let mut data = Vec::new();
        for n in 0..12 {
            // The fifth is larger than a file once sealed.
            data.extend(line("a", n, if n == 4 { 1400 } else { 200 }));
        }
        d.append_sealed("a", &seal, &data);
        assert_eq!(drops.oversized.get(), 1);
        assert!(tmp.path().join("a.jsonl.2").exists(), "no rotation");
        let mut v = Verifier::new(&seal.keys, "a");
        let mut shown = Vec::new();
        for idx in (0..=20).rev() {
            let path = d.path("a", idx);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            v.file(&path.display().to_string());
            for (i, l) in text.lines().enumerate() {
                shown.extend(v.line(i + 1, l.as_bytes(), true));
            }
        }
        v.finish();
        let notes = v.take_notes();
        assert_eq!(v.problems(), 0, "{notes:?}");
        assert_eq!(shown.len(), 11);
        assert!(
            notes
                .iter()
                .any(|n| n.text.contains("the last record read is stream")
                    && n.text.contains("seq 10:")),
            "{notes:?}"
        );
    }

    #[test]
    fn an_oversized_line_is_dropped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let drops = Drops::default();
        let mut d = Disk::open(
            tmp.path().to_path_buf(),
            limits(1000, 6000),
            set(&["a"]),
            drops.clone(),
        );
        let mut data = line("a", 0, 100);
        data.extend(line("a", 1, 5000));
        data.extend(line("a", 2, 100));
        d.append("a", &data);
        assert_eq!(drops.oversized.get(), 1);
        assert_eq!(lines_of(tmp.path(), "a").len(), 2);
    }
}
