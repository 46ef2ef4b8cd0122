//! `Signature-Input` and `Signature` (RFC 9421 section 4): finding the signature of one label
//! and parsing its parameters, strictly.

use super::{AuthError, malformed};
use bulkhead_client::signature::{SigParams, serialize_inner_list};
use http::HeaderMap;
use sfv::{InnerList, ListEntry};
use std::collections::HashSet;

/// Signature parameters from a `Signature-Input` member (an inner list): every covered
/// component once, as a string without parameters; `created`, `expires`, `nonce`, `keyid` and
/// `alg` of the right types.
pub fn parse_params(il: &InnerList) -> Result<SigParams, AuthError> {
    let mut p = SigParams::default();
    let mut seen = HashSet::new();
    for item in &il.items {
        if !item.params.is_empty() {
            return Err(malformed("component parameters are not supported"));
        }
        let s = item
            .bare_item
            .as_string()
            .ok_or_else(|| malformed("covered components must be strings"))?;
        if !seen.insert(s.as_str().to_string()) {
            return Err(malformed("a component is covered twice"));
        }
        p.components.push(s.as_str().to_string());
    }
    for (k, v) in &il.params {
        let int = || -> Result<i64, AuthError> {
            v.as_integer()
                .map(i64::from)
                .ok_or_else(|| malformed(format!("{} must be an integer", k.as_str())))
        };
        let string = || -> Result<String, AuthError> {
            v.as_string()
                .map(|s| s.as_str().to_string())
                .ok_or_else(|| malformed(format!("{} must be a string", k.as_str())))
        };
        match k.as_str() {
            "created" => p.created = Some(int()?),
            "expires" => p.expires = Some(int()?),
            "nonce" => p.nonce = Some(string()?),
            "keyid" => p.keyid = Some(string()?),
            "alg" => p.alg = Some(string()?),
            // `tag` (application-specific), like unknown parameters, is covered by the
            // signature and otherwise ignored.
            _ => {}
        }
    }
    Ok(p)
}

fn joined(headers: &HeaderMap, name: &str) -> Result<Option<String>, AuthError> {
    let mut parts = Vec::new();
    for v in headers.get_all(name) {
        parts.push(
            v.to_str()
                .map_err(|_| malformed(format!("{name} is not visible ASCII")))?
                .to_string(),
        );
    }
    Ok(if parts.is_empty() {
        None
    } else {
        Some(parts.join(", "))
    })
}

/// One signature found in a request, with its parameters and raw bytes.
#[derive(Debug, Clone)]
pub struct FoundSignature {
    pub params: SigParams,
    pub params_value: String,
    pub signature: Vec<u8>,
}

/// Find and parse the signature labelled `label`.
pub fn find_signature(headers: &HeaderMap, label: &str) -> Result<FoundSignature, AuthError> {
    let input = joined(headers, "signature-input")?
        .ok_or_else(|| AuthError::Missing("no Signature-Input header".into()))?;
    let sig = joined(headers, "signature")?
        .ok_or_else(|| AuthError::Missing("no Signature header".into()))?;
    let parse = |v: &str, what: &str| {
        sfv::Parser::new(v)
            .with_version(sfv::Version::Rfc8941)
            .parse_dictionary()
            .map_err(|_| malformed(format!("{what} is not an RFC 8941 dictionary")))
    };
    let input = parse(&input, "Signature-Input")?;
    let sig = parse(&sig, "Signature")?;
    let il = match input.into_iter().find(|(k, _)| k.as_str() == label) {
        Some((_, ListEntry::InnerList(il))) => il,
        Some(_) => return Err(malformed("Signature-Input member is not an inner list")),
        None => {
            return Err(AuthError::Missing(format!(
                "no signature labelled {label:?}"
            )));
        }
    };
    let bytes = match sig.iter().find(|(k, _)| k.as_str() == label) {
        Some((_, ListEntry::Item(item))) => item
            .bare_item
            .as_byte_sequence()
            .ok_or_else(|| malformed("Signature member is not a byte sequence"))?
            .to_vec(),
        Some(_) => return Err(malformed("Signature member is not an item")),
        None => {
            return Err(AuthError::Missing(format!(
                "no Signature member labelled {label:?}"
            )));
        }
    };
    let params = parse_params(&il)?;
    let params_value = serialize_inner_list(il)?;
    Ok(FoundSignature {
        params,
        params_value,
        signature: bytes,
    })
}
