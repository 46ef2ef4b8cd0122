//! RFC 9530 `Content-Digest` of a body, as a signer sets it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest;

/// `sha-256=:<base64>:` for `body`.
pub fn content_digest_sha256(body: &[u8]) -> String {
    sha256_member(digest::digest(&digest::SHA256, body).as_ref())
}

/// `sha-256=:<base64>:` for a SHA-256 `digest` already taken (the `Content-Digest` value).
pub fn sha256_member(digest: &[u8]) -> String {
    format!("sha-256=:{}:", STANDARD.encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9530_example_sha256() {
        // RFC 9530 section 2: the body `{"hello": "world"}`.
        assert_eq!(
            content_digest_sha256(br#"{"hello": "world"}"#),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
    }
}
