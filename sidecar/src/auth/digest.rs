//! RFC 9530 `Content-Digest` (sha-256 and sha-512).

use ring::digest;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("Content-Digest is not a structured dictionary")]
    Malformed,
    #[error("Content-Digest has no sha-256 or sha-512 member")]
    NoKnownAlgorithm,
    #[error("Content-Digest does not match the body")]
    Mismatch,
}

/// `sha-256=:<base64>:` for `body` (what a signer sets; `bulkhead-client`'s).
pub use bulkhead_client::digest::content_digest_sha256;

/// Check every known member of a `Content-Digest` value against `body`. At least one member
/// must use a known algorithm; unknown ones are ignored as RFC 9530 allows.
pub fn verify(value: &str, body: &[u8]) -> Result<(), DigestError> {
    verify_keeping(value, body).map(|_| ())
}

/// [`verify`], keeping the SHA-256 state at every [`Sha256Prefixes::EVERY`] bytes of `body`
/// when the value has a `sha-256` member, so that the digest of a body that shares a prefix
/// with this one (the forwarded body) does not hash that prefix again.
pub fn verify_keeping(value: &str, body: &[u8]) -> Result<Option<Sha256Prefixes>, DigestError> {
    let dict = sfv::Parser::new(value)
        .parse_dictionary()
        .map_err(|_| DigestError::Malformed)?;
    let mut any_known = false;
    let mut prefixes = None;
    for (k, entry) in &dict {
        let alg = match k.as_str() {
            "sha-256" => &digest::SHA256,
            "sha-512" => &digest::SHA512,
            _ => continue,
        };
        let sfv::ListEntry::Item(item) = entry else {
            return Err(DigestError::Malformed);
        };
        let expected = item
            .bare_item
            .as_byte_sequence()
            .ok_or(DigestError::Malformed)?;
        any_known = true;
        let actual = if alg == &digest::SHA256 {
            let (p, d) = Sha256Prefixes::hash(body);
            prefixes = Some(p);
            d
        } else {
            digest::digest(alg, body)
        };
        if actual.as_ref() != expected {
            return Err(DigestError::Mismatch);
        }
    }
    if !any_known {
        return Err(DigestError::NoKnownAlgorithm);
    }
    Ok(prefixes)
}

/// The SHA-256 states of a body's prefixes, one every [`Sha256Prefixes::EVERY`] bytes.
#[derive(Clone)]
pub struct Sha256Prefixes {
    /// `(n, state after the first n bytes)`, `n` ascending from 0.
    states: Vec<(usize, digest::Context)>,
}

impl std::fmt::Debug for Sha256Prefixes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sha256Prefixes")
            .field("ends", &self.ends())
            .finish()
    }
}

impl Sha256Prefixes {
    /// Where hashing `new` resumes: the last kept state within the prefix `old` and `new`
    /// share.
    fn resume_point(&self, old: &[u8], new: &[u8]) -> (usize, &digest::Context) {
        let shared = shared_prefix(old, new);
        let (at, ctx) = self
            .states
            .iter()
            .rev()
            .find(|(n, _)| *n <= shared)
            .expect("the state of the empty prefix is kept");
        (*at, ctx)
    }

    /// The ends of the kept prefixes.
    fn ends(&self) -> Vec<usize> {
        self.states.iter().map(|(n, _)| *n).collect()
    }
}

/// The length of the prefix `a` and `b` share: compared a page at a time (slice equality is a
/// `memcmp`), then byte by byte within the first page that differs.
fn shared_prefix(a: &[u8], b: &[u8]) -> usize {
    const PAGE: usize = 4096;
    let n = a.len().min(b.len());
    let mut at = 0;
    while at < n {
        let end = (at + PAGE).min(n);
        if a[at..end] != b[at..end] {
            return at
                + a[at..end]
                    .iter()
                    .zip(&b[at..end])
                    .take_while(|(x, y)| x == y)
                    .count();
        }
        at = end;
    }
    n
}

/// Equal when the same prefixes were kept with the same hashes.
impl PartialEq for Sha256Prefixes {
    fn eq(&self, other: &Self) -> bool {
        self.states.len() == other.states.len()
            && self
                .states
                .iter()
                .zip(&other.states)
                .all(|((n, a), (m, b))| {
                    n == m && a.clone().finish().as_ref() == b.clone().finish().as_ref()
                })
    }
}

impl Eq for Sha256Prefixes {}

impl Sha256Prefixes {
    /// Bytes between two kept states (a multiple of SHA-256's 64-byte block).
    pub const EVERY: usize = 16 * 1024;

    /// The digest of `body`, keeping a state every [`Self::EVERY`] bytes.
    pub fn hash(body: &[u8]) -> (Self, digest::Digest) {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut states = Vec::with_capacity(body.len() / Self::EVERY + 1);
        states.push((0, ctx.clone()));
        let mut at = 0;
        for chunk in body.chunks(Self::EVERY) {
            ctx.update(chunk);
            at += chunk.len();
            if chunk.len() == Self::EVERY && at < body.len() {
                states.push((at, ctx.clone()));
            }
        }
        (Self { states }, ctx.finish())
    }

    /// `sha-256=:<base64>:` for `new`, where `old` is the body these states were kept from:
    /// hashing starts from the last kept state within the prefix the two bodies share.
    pub fn content_digest(&self, old: &[u8], new: &[u8]) -> String {
        let (at, ctx) = self.resume_point(old, new);
        let mut ctx = ctx.clone();
        ctx.update(&new[at..]);
        bulkhead_client::digest::sha256_member(ctx.finish().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 9530 section 2 / appendix examples: the body `{"hello": "world"}`.
    const HELLO: &[u8] = br#"{"hello": "world"}"#;

    #[test]
    fn rfc9530_example_sha256() {
        assert_eq!(
            content_digest_sha256(HELLO),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
        verify(
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
            HELLO,
        )
        .unwrap();
    }

    #[test]
    fn rfc9421_test_request_sha512() {
        // The Content-Digest of RFC 9421's test request (appendix B.2).
        let v = "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";
        verify(v, HELLO).unwrap();
    }

    #[test]
    fn mismatch_and_garbage() {
        let v = content_digest_sha256(b"other");
        assert_eq!(verify(&v, HELLO), Err(DigestError::Mismatch));
        assert_eq!(verify("sha-256=abc", HELLO), Err(DigestError::Malformed));
        assert_eq!(
            verify("md5=:AAAA:", HELLO),
            Err(DigestError::NoKnownAlgorithm)
        );
        assert_eq!(verify("((", HELLO), Err(DigestError::Malformed));
    }

    /// The forwarded body's digest from the client's kept states is the digest of the
    /// forwarded body, whatever prefix the two share (none, part of a kept stretch, all).
    #[test]
    fn a_digest_resumed_from_a_shared_prefix_is_the_digest_of_the_new_body() {
        let e = Sha256Prefixes::EVERY;
        let old: Vec<u8> = (0..5 * e + 100).map(|i| (i % 251) as u8).collect();
        let (p, d) = Sha256Prefixes::hash(&old);
        assert_eq!(d.as_ref(), digest::digest(&digest::SHA256, &old).as_ref());
        let cases: Vec<Vec<u8>> = vec![
            old.clone(),
            old[..old.len() - 1].to_vec(),
            [&old[..], b"},\"cache_salt\":\"x\"}"].concat(),
            [&old[..3 * e], b"changed", &old[3 * e + 7..]].concat(),
            [&old[..3 * e + 5], b"!", &old[3 * e + 6..]].concat(),
            [b"X".as_slice(), &old[1..]].concat(),
            Vec::new(),
            b"short".to_vec(),
        ];
        for new in cases {
            assert_eq!(
                p.content_digest(&old, &new),
                content_digest_sha256(&new),
                "a body of {} bytes",
                new.len()
            );
        }
        // An empty old body keeps only the empty prefix.
        let (p, _) = Sha256Prefixes::hash(b"");
        assert_eq!(p.content_digest(b"", b"{}"), content_digest_sha256(b"{}"));
    }

    /// A state every 16 KiB strictly inside the body, and hashing resumes from the last one
    /// within the shared prefix: a long prompt with members added at its end is not hashed
    /// again (the saving is the point; the digest is right either way).
    #[test]
    fn states_are_kept_every_16_kib_and_the_latest_shared_one_is_resumed() {
        let e = Sha256Prefixes::EVERY;
        assert_eq!(e % 64, 0, "a whole number of SHA-256 blocks");
        let old = vec![b'a'; 3 * e];
        let (p, _) = Sha256Prefixes::hash(&old);
        assert_eq!(p.ends(), vec![0, e, 2 * e]);
        assert_eq!(
            format!("{p:?}"),
            format!("Sha256Prefixes {{ ends: [0, {e}, {}] }}", 2 * e)
        );
        let (p, _) = Sha256Prefixes::hash(&old[..3 * e - 1]);
        assert_eq!(p.ends(), vec![0, e, 2 * e]);
        let longer = vec![b'a'; 3 * e + 1];
        let (p, _) = Sha256Prefixes::hash(&longer);
        assert_eq!(p.ends(), vec![0, e, 2 * e, 3 * e]);
        let appended = [&old[..], b"tail"].concat();
        assert_eq!(p.resume_point(&longer, &appended).0, 3 * e);
        let (p, _) = Sha256Prefixes::hash(&old);
        assert_eq!(p.resume_point(&old, &appended).0, 2 * e);
        let mut changed = old.clone();
        changed[2 * e - 1] = b'b';
        assert_eq!(p.resume_point(&old, &changed).0, e);
        changed[e] = b'b';
        assert_eq!(p.resume_point(&old, &changed).0, e);
        changed[e - 1] = b'b';
        assert_eq!(p.resume_point(&old, &changed).0, 0);
        // Equal: the same prefixes kept with the same hashes.
        assert_eq!(p, Sha256Prefixes::hash(&old).0);
        assert_ne!(p, Sha256Prefixes::hash(&changed).0);
        assert_ne!(p, Sha256Prefixes::hash(&longer).0);
    }

    #[test]
    fn the_shared_prefix_is_found_across_and_within_pages() {
        let a: Vec<u8> = (0..10_000).map(|i| (i % 253) as u8).collect();
        assert_eq!(shared_prefix(&a, &a), a.len());
        assert_eq!(shared_prefix(&a, &a[..5_000]), 5_000);
        assert_eq!(shared_prefix(&a[..4_096], &a), 4_096);
        assert_eq!(shared_prefix(b"", &a), 0);
        for at in [0, 1, 4_095, 4_096, 4_097, 8_191, 8_192, 9_999] {
            let mut b = a.clone();
            b[at] ^= 0xff;
            assert_eq!(shared_prefix(&a, &b), at, "first difference at {at}");
            assert_eq!(shared_prefix(&b, &a), at);
        }
    }

    #[test]
    fn only_a_sha256_member_keeps_states() {
        let v = content_digest_sha256(HELLO);
        assert!(verify_keeping(&v, HELLO).unwrap().is_some());
        let v = "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";
        assert!(verify_keeping(v, HELLO).unwrap().is_none());
    }
}
