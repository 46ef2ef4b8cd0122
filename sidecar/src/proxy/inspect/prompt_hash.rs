//! The audit's keyed prompt hash: HMAC-SHA256 over `<field>=<JSON>\n` for each prompt-bearing
//! field in key order, the JSON as serde_json writes the value (compact, keys sorted).
//!
//! A short prompt's hash is taken during inspection. A long prompt's is not needed before the
//! request goes out (only the audit record reads it), so inspection only records its input:
//! ranges of the client's bytes, where they are canonical already, and the few bytes the
//! sidecar writes itself. [`PromptHash::start`] hashes that input in a task of its own, spawned
//! just before the request is handed to the upstream; [`PromptHash::value`] (the finish step)
//! takes the result, or hashes the input itself when the task has not run.

use crate::proxy::scan::Out;
use bytes::Bytes;
use ring::hmac;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Prompt fields of at least this many bytes are hashed off the request path; shorter ones
/// (about 16 us of hashing, against a task's 1-2 us) during inspection.
pub const DEFER_FROM: usize = 32 * 1024;

/// A request's prompt hash, taken or to be taken.
pub struct PromptHash(Inner);

enum Inner {
    Ready(String),
    Deferred(Arc<Mutex<State>>),
}

enum State {
    Pending(Box<Input>),
    Done(String),
}

/// What a deferred hash reads: the client's bytes and the pieces that make up its input.
struct Input {
    key: hmac::Key,
    body: Bytes,
    pieces: Vec<Piece>,
    own: Vec<u8>,
}

/// A piece of the hash's input: a range of the client's bytes or of [`Input::own`].
enum Piece {
    Body(Range<usize>),
    Own(Range<usize>),
}

impl Input {
    fn hash(&self) -> String {
        let mut h = hmac::Context::with_key(&self.key);
        for p in &self.pieces {
            match p {
                Piece::Body(r) => h.update(&self.body[r.clone()]),
                Piece::Own(r) => h.update(&self.own[r.clone()]),
            }
        }
        crate::record::audit::hex_tag(&h.sign())
    }
}

impl PromptHash {
    pub fn ready(hex: String) -> Self {
        Self(Inner::Ready(hex))
    }

    /// Hash in a task of its own (a no-op for a hash taken already, or outside a runtime).
    /// Spawned before the request is sent, the task runs after the connection's task, which
    /// the request wakes: the request's bytes go out first, and the hashing overlaps the
    /// upstream's work.
    pub fn start(&self) {
        if let Inner::Deferred(state) = &self.0
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let state = state.clone();
            rt.spawn(async move {
                take(&state);
            });
        }
    }

    /// The hex tag: taken now if no task took it.
    pub fn value(&self) -> String {
        match &self.0 {
            Inner::Ready(hex) => hex.clone(),
            Inner::Deferred(state) => take(state),
        }
    }
}

/// The hash, computed here unless done: under the lock, so it is computed once.
fn take(state: &Mutex<State>) -> String {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let hex = match &*st {
        State::Done(hex) => return hex.clone(),
        State::Pending(input) => input.hash(),
    };
    *st = State::Done(hex.clone());
    hex
}

impl std::fmt::Debug for PromptHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Ready(hex) => write!(f, "PromptHash({hex})"),
            Inner::Deferred(_) => f.write_str("PromptHash(deferred)"),
        }
    }
}

/// Records the hash's input as it is written: bytes that lie in the client's body as their
/// range, others copied.
pub struct Recorder<'a> {
    body: &'a Bytes,
    pieces: Vec<Piece>,
    own: Vec<u8>,
}

impl<'a> Recorder<'a> {
    pub fn new(body: &'a Bytes) -> Self {
        Self {
            body,
            pieces: Vec::new(),
            own: Vec::new(),
        }
    }

    /// The deferred hash of what was recorded, under `key`.
    pub fn finish(self, key: &hmac::Key) -> PromptHash {
        PromptHash(Inner::Deferred(Arc::new(Mutex::new(State::Pending(
            Box::new(Input {
                key: key.clone(),
                body: self.body.clone(),
                pieces: self.pieces,
                own: self.own,
            }),
        )))))
    }
}

impl Out for Recorder<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let base = self.body.as_ptr() as usize;
        let at = bytes.as_ptr() as usize;
        if at >= base && at + bytes.len() <= base + self.body.len() {
            let r = at - base..at - base + bytes.len();
            match self.pieces.last_mut() {
                Some(Piece::Body(last)) if last.end == r.start => last.end = r.end,
                _ => self.pieces.push(Piece::Body(r)),
            }
        } else {
            let start = self.own.len();
            self.own.extend_from_slice(bytes);
            match self.pieces.last_mut() {
                // `own` grows only here: the last piece of it ends where this one starts.
                Some(Piece::Own(last)) => last.end = self.own.len(),
                _ => self.pieces.push(Piece::Own(start..self.own.len())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorded input is the written input: pieces of the body and copies alike.
    #[test]
    fn a_deferred_hash_is_the_hash_of_what_was_written() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef");
        let body = Bytes::from_static(b"{\"messages\":[{\"content\":\"hi\"}]}");
        let mut rec = Recorder::new(&body);
        let mut ctx = hmac::Context::with_key(&key);
        let written: [&[u8]; 6] = [
            b"messages",
            b"=",
            &body[12..20],
            &body[20..31],
            &body[12..13],
            b"\n",
        ];
        for w in written {
            rec.put(w);
            ctx.update(w);
        }
        // Copied: what is not in the body. Adjacent ranges of the body are one piece, a range
        // that does not follow the last is another: `messages=`, 12..31, 12..13, `\n`.
        assert_eq!(rec.own, b"messages=\n");
        let pieces: Vec<(bool, Range<usize>)> = rec
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Body(r) => (true, r.clone()),
                Piece::Own(r) => (false, r.clone()),
            })
            .collect();
        assert_eq!(
            pieces,
            vec![
                (false, 0..9),
                (true, 12..31),
                (true, 12..13),
                (false, 9..10)
            ]
        );
        let want = crate::record::audit::hex_tag(&ctx.sign());
        let h = rec.finish(&key);
        assert_eq!(format!("{h:?}"), "PromptHash(deferred)");
        assert_eq!(h.value(), want);
        // Taken once, read again alike.
        assert_eq!(h.value(), want);
        assert_eq!(PromptHash::ready(want.clone()).value(), want);
    }

    /// A started hash is taken by its task: the value is there before anyone asks for it.
    #[tokio::test]
    async fn a_started_hash_is_taken_by_its_task() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef");
        let body = Bytes::from(vec![b'a'; 1000]);
        let mut rec = Recorder::new(&body);
        rec.put(&body[..]);
        let h = rec.finish(&key);
        h.start();
        let Inner::Deferred(state) = &h.0 else {
            panic!("deferred")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !matches!(&*state.lock().unwrap(), State::Done(_)) {
            assert!(std::time::Instant::now() < deadline, "the task never ran");
            tokio::task::yield_now().await;
        }
        let want = crate::record::audit::hex_tag(&hmac::sign(&key, &body));
        assert_eq!(h.value(), want);
    }
}
