//! The writer thread and the files it writes: one `<stream>.jsonl` per stream, rotated to
//! `.1`, `.2`, ... and trimmed to the stream's share of `max_total_bytes`.

use super::{AuditLimits, Drops, FLUSH_EVERY, Pending, Shared, UNAUTHENTICATED};
use crate::record::seal::{Chain, Scratch, hex};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

pub(super) fn writer(mut disk: Disk, shared: Arc<Shared>) {
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
pub(super) struct Files {
    current: Option<std::fs::File>,
    pub(super) current_size: u64,
    /// Rotated files: index -> size.
    pub(super) rotated: BTreeMap<u64, u64>,
}

impl Files {
    fn total(&self) -> u64 {
        self.current_size + self.rotated.values().sum::<u64>()
    }
}

/// The writer's view of the directory; all disk I/O happens here, on the writer thread.
pub(super) struct Disk {
    dir: PathBuf,
    limits: AuditLimits,
    tenants: HashSet<String>,
    /// Each stream's share of `max_total_bytes`.
    pub(super) share: u64,
    /// The size at which a stream's current file rotates.
    pub(super) file_limit: u64,
    /// Every stream with files here: configured, `_unauthenticated`, and retired ones.
    pub(super) streams: HashMap<String, Files>,
    pub(super) drops: Drops,
    /// Per file stream, each sealed tenant's chain (normally one: the tenant's own file).
    pub(super) chains: HashMap<String, Vec<(String, Chain)>>,
    /// Reused by sealing: the lines being written, and the sealer's buffers.
    pub(super) piece: Vec<u8>,
    pub(super) scratch: Scratch,
}

/// `<stem>.jsonl` -> (stem, 0); `<stem>.jsonl.<n>` -> (stem, n). Other names are not ours.
pub(super) fn parse_name(name: &str) -> Option<(&str, u64)> {
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
    pub(super) fn open(
        dir: PathBuf,
        limits: AuditLimits,
        tenants: HashSet<String>,
        drops: Drops,
    ) -> Self {
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
    pub(super) fn configure(&mut self, limits: AuditLimits, tenants: HashSet<String>) {
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

    pub(super) fn path(&self, stem: &str, idx: u64) -> PathBuf {
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
    pub(super) fn group_total(&self, stream: &str) -> u64 {
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
    pub(super) fn rotate(&mut self, stream: &str) -> bool {
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
    pub(super) fn route<'s>(&self, stream: &'s str) -> &'s str {
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
    pub(super) fn append(&mut self, stream: &str, data: &[u8]) {
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
    pub(super) fn write_piece(&mut self, stream: &str, piece: &[u8]) -> bool {
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
