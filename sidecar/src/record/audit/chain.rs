//! The sealed audit chain on disk: sealing records into their tenant's chain as they reach
//! the file, and picking a chain up again from the file's last line.

use super::Sealer;
use super::disk::Disk;
use crate::record::seal::{Chain, hex};
use std::io::{Read, Seek, SeekFrom};

impl Disk {
    /// Seal `data`'s lines (records of `seal.tenant`) into their chain and append them to
    /// `stream` as [`Disk::append`] does. A record counts in the chain only once written: a
    /// piece that does not reach the file is sealed again (same `seq`s) with the next one.
    pub(super) fn append_sealed(&mut self, stream: &str, seal: &Sealer, data: &[u8]) {
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
}
