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
    let dict = sfv::Parser::new(value)
        .parse_dictionary()
        .map_err(|_| DigestError::Malformed)?;
    let mut any_known = false;
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
        if digest::digest(alg, body).as_ref() != expected {
            return Err(DigestError::Mismatch);
        }
    }
    if !any_known {
        return Err(DigestError::NoKnownAlgorithm);
    }
    Ok(())
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
}
