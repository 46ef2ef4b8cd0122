//! W3C Trace Context: the `traceparent` header parsed strictly, the sidecar's own ids, and the
//! parent-based ratio sampler. No I/O and no clock: tested alone.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// A parsed `traceparent` (W3C Trace Context level 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        // Upper case is not valid in a traceparent.
        _ => None,
    }
}

fn hex_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (hex_nibble(pair[0])? << 4) | hex_nibble(pair[1])?;
    }
    Some(())
}

impl TraceParent {
    /// Parse a header value; `None` for anything the specification says to ignore: wrong
    /// lengths or separators, upper-case or non-hex digits, version `ff`, an all-zero trace id
    /// or parent id, or (version 00) anything after the flags.
    pub fn parse(v: &[u8]) -> Option<TraceParent> {
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let mut version = [0u8; 1];
        hex_into(&v[0..2], &mut version)?;
        match version[0] {
            0xff => return None,
            0 if v.len() != 55 => return None,
            // A later version may append fields after a dash.
            _ if v.len() > 55 && v[55] != b'-' => return None,
            _ => {}
        }
        let mut trace_id = [0u8; 16];
        hex_into(&v[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        hex_into(&v[36..52], &mut parent_id)?;
        let mut flags = [0u8; 1];
        hex_into(&v[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The header value (version 00).
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            u8::from(self.sampled)
        )
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[usize::from(x >> 4)] as char);
        s.push(D[usize::from(x & 15)] as char);
    }
    s
}

/// Unpredictable, unique trace and span ids: keyed SipHash of a counter (keys drawn at start).
#[derive(Debug, Default)]
pub struct Ids {
    keys: (RandomState, RandomState),
    seq: AtomicU64,
}

impl Ids {
    fn next64(&self, key: &RandomState) -> u64 {
        loop {
            let v = key.hash_one(self.seq.fetch_add(1, Ordering::Relaxed));
            if v != 0 {
                return v;
            }
        }
    }
    pub fn trace_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next64(&self.keys.0).to_be_bytes());
        id[8..].copy_from_slice(&self.next64(&self.keys.1).to_be_bytes());
        id
    }
    pub fn span_id(&self) -> [u8; 8] {
        self.next64(&self.keys.0).to_be_bytes()
    }
}

/// Parent-based ratio sampling: a continued parent's flag is followed; a new trace is sampled
/// when its id's low 8 bytes fall below `ratio` (the `TraceIdRatioBased` rule), so every
/// service using the rule samples the same traces.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    bound: u64,
    all: bool,
}

impl Sampler {
    pub fn new(ratio: f64) -> Self {
        Sampler {
            bound: (ratio.clamp(0.0, 1.0) * (u64::MAX as f64)) as u64,
            all: ratio >= 1.0,
        }
    }
    pub fn sample(&self, parent: Option<&TraceParent>, trace_id: &[u8; 16]) -> bool {
        if let Some(p) = parent {
            return p.sampled;
        }
        let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
        self.all || low < self.bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back() {
        let p = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert!(p.sampled);
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.parent_id), "00f067aa0ba902b7");
        assert_eq!(p.header(), GOOD);
        let q = TraceParent::parse(
            &GOOD.as_bytes()[..53]
                .iter()
                .chain(b"00")
                .copied()
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(!q.sampled);
    }

    #[test]
    fn anything_the_specification_rejects_is_ignored() {
        let bad = [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b}");
        }
        // A later version may carry more, after a dash.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceParent::parse(later.as_bytes()).is_some());
    }

    #[test]
    fn sampling_follows_a_parent_and_otherwise_the_ratio() {
        let parent = TraceParent::parse(GOOD.as_bytes()).unwrap();
        let unsampled = TraceParent {
            sampled: false,
            ..parent
        };
        let none = Sampler::new(0.0);
        let all = Sampler::new(1.0);
        let id = [0xffu8; 16];
        assert!(none.sample(Some(&parent), &id));
        assert!(!all.sample(Some(&unsampled), &id));
        assert!(all.sample(None, &id));
        assert!(!none.sample(None, &[1u8; 16]));
        // About a quarter of random ids at 0.25.
        let ids = Ids::default();
        let quarter = Sampler::new(0.25);
        let n = (0..4000)
            .filter(|_| quarter.sample(None, &ids.trace_id()))
            .count();
        assert!((800..1200).contains(&n), "{n}");
    }

    #[test]
    fn ids_are_never_zero_and_do_not_repeat() {
        let ids = Ids::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let t = ids.trace_id();
            assert_ne!(t, [0; 16]);
            assert!(seen.insert(t));
            assert_ne!(ids.span_id(), [0; 8]);
        }
    }
}
