//! Property tests for RFC 9421 verification: for arbitrary `Signature-Input` / `Signature`
//! values and for structured mutations of validly signed requests, `verify_head` and `verify`
//! never panic, and never accept a request unless what it signs (signature bytes, signature
//! base, body) is exactly what the real key signed.

use bulkhead_sidecar::auth::signature::{
    AuthError, ReplayCache, RequestView, SignOptions, Verifier, find_signature, sign_request,
    signature_base,
};
use bulkhead_sidecar::config::{LoadedKey, TenantBinding};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use proptest::sample::Index;
use std::sync::{Arc, Mutex};

const KEY: &[u8] = b"the real gateway key, 32 bytes..";
const NOW: i64 = 1_700_000_000;
const LABEL: &str = "bulkhead";

fn verifier() -> Verifier {
    let key = LoadedKey {
        id: "gw".into(),
        secrets: vec![KEY.to_vec()],
        tenants: TenantBinding::Any,
        scope: Default::default(),
    };
    Verifier::new(
        LABEL.into(),
        vec![key],
        30,
        Arc::new(Mutex::new(ReplayCache::new(1024))),
    )
}

#[derive(Debug, Clone)]
struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Req {
    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
        }
    }

    /// What a signature over this request commits to: the signature bytes, the signature base
    /// and the body. `None` when there is no parsable signature.
    fn signed_content(&self) -> Option<(Vec<u8>, String, Vec<u8>)> {
        let f = find_signature(&self.headers, LABEL).ok()?;
        let base = signature_base(self.view(), &f.params.components, &f.params_value).ok()?;
        Some((f.signature, base, self.body.clone()))
    }

    fn components(&self) -> Vec<String> {
        find_signature(&self.headers, LABEL)
            .map(|f| f.params.components)
            .unwrap_or_default()
    }

    fn covers(&self, c: &str) -> bool {
        self.components().iter().any(|x| x == c)
    }
}

/// Optional derived components and headers to cover beyond `sign_request`'s defaults.
const EXTRA: [&str; 7] = [
    "@authority",
    "@query",
    "@target-uri",
    "@request-target",
    "@scheme",
    "content-type",
    "accept",
];

fn signed_request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]),
        "/v1/[a-z]{1,10}(/[a-z0-9]{1,4})?(\\?[a-z]{1,3}=[0-9]{1,3})?",
        "[a-z][a-z0-9-]{0,7}",
        prop_oneof![Just(Vec::new()), prop::collection::vec(any::<u8>(), 1..64)],
        "[A-Za-z0-9_-]{1,24}",
        prop::option::of("[ -~]{0,16}"),
        prop::sample::subsequence(EXTRA.to_vec(), 0..=EXTRA.len()),
        any::<bool>(),
        prop::option::of(1i64..300),
    )
        .prop_map(
            |(method, path, tenant, body, nonce, trace, extra, alg, expires)| {
                let uri: Uri = path.parse().expect("generated path is a valid URI");
                let mut headers = HeaderMap::new();
                headers.insert("host", HeaderValue::from_static("svc.local:8080"));
                headers.insert("content-type", HeaderValue::from_static("application/json"));
                headers.insert("accept", HeaderValue::from_static("*/*"));
                headers.insert("user-agent", HeaderValue::from_static("proptest"));
                headers.insert(
                    "x-bulkhead-tenant",
                    HeaderValue::from_str(&tenant).expect("valid tenant"),
                );
                if let Some(t) = trace {
                    headers.insert(
                        "x-bulkhead-trace",
                        HeaderValue::from_str(t.trim()).expect("visible ASCII"),
                    );
                }
                let mut o = SignOptions::new("gw", NOW);
                o.nonce = Some(nonce);
                o.extra_components = extra.into_iter().map(String::from).collect();
                o.include_alg = alg;
                o.expires = expires.map(|e| NOW + e);
                sign_request(&method, &uri, &mut headers, &body, KEY, &o)
                    .expect("signing a generated request");
                Req {
                    method,
                    uri,
                    headers,
                    body,
                }
            },
        )
}

/// Bytes that `HeaderValue` accepts (tab, visible ASCII and space, obs-text).
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => 0x20u8..=0x7e,
            1 => Just(b'\t'),
            1 => 0x80u8..=0xff,
        ],
        0..max,
    )
}

/// Signature-Input values: raw header bytes, or dictionaries shaped like the real thing.
fn signature_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        header_bytes(200),
        "(bulkhead|other|sig)=\\((\"[@a-z-]{1,16}\" ?){0,6}\\)(;(created|expires|nonce|keyid|alg|tag|x)=(\"[ -!#-\\[\\]-~]{0,12}\"|-?[0-9]{1,16}|\\?[01]|:[A-Za-z0-9+/=]{0,12}:|[a-z*][a-z0-9*.-]{0,8})){0,8}(, ?[a-z]{1,4}=[^,]{0,20}){0,2}"
            .prop_map(String::into_bytes),
    ]
}

/// Signature values: raw header bytes, or byte sequences of plausible lengths.
fn signature_value() -> impl Strategy<Value = Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    prop_oneof![
        header_bytes(120),
        (
            prop::sample::select(vec!["bulkhead", "other"]),
            prop::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(l, b)| format!("{l}=:{}:", STANDARD.encode(b)).into_bytes()),
    ]
}

/// Run both entry points on fresh verifiers; neither may panic. Returns `verify`'s result.
fn verify_both(r: &Req) -> Result<(), AuthError> {
    let head = verifier().verify_head(r.view(), NOW);
    let full = verifier().verify(r.view(), &r.body, NOW);
    // `verify` is `verify_head` then `finish`: it cannot pass where the head failed.
    if let Err(e) = &head {
        assert_eq!(
            full.as_ref().err(),
            Some(e),
            "verify disagrees with verify_head"
        );
    }
    full.map(|_| ())
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte of one header's value (any header, signature ones included).
    FlipHeaderByte(Index, Index, u8),
    /// Add another field line with the same value.
    DuplicateHeader(Index),
    RemoveHeader(Index),
    /// Add a header the signature does not cover.
    AddUncoveredHeader(String, String),
    /// Declare a body in the head.
    DeclareBody(bool),
    ChangeMethod(Index),
    ChangePath(String),
    FlipBodyByte(Index, u8),
    AppendBody(Vec<u8>),
    /// Drop, add, swap or duplicate covered components (signature kept).
    DropComponent(Index),
    AddComponent(Index),
    SwapComponents(Index, Index),
    /// Reorder the signature parameters (signature kept).
    ReorderParameters(Vec<Index>),
    /// Change created, expires, nonce, keyid or alg (signature kept).
    ChangeParameter(Index, i64),
    /// Flip a bit of the signature bytes.
    FlipSignatureBit(Index, u8),
    /// Sign the same request with another key.
    WrongKey(Vec<u8>),
    /// Replace Signature-Input or Signature, or both, with arbitrary values.
    ReplaceInput(Vec<u8>),
    ReplaceSignature(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), any::<Index>(), 1u8..=255).prop_map(|(a, b, c)| Mutation::FlipHeaderByte(a, b, c)),
        2 => any::<Index>().prop_map(Mutation::DuplicateHeader),
        2 => any::<Index>().prop_map(Mutation::RemoveHeader),
        1 => ("(x-bulkhead-[a-z]{1,6}|x-other|content-type|host)", "[ -~]{0,12}")
            .prop_map(|(n, v)| Mutation::AddUncoveredHeader(n, v)),
        1 => any::<bool>().prop_map(Mutation::DeclareBody),
        1 => any::<Index>().prop_map(Mutation::ChangeMethod),
        1 => "/[ -~&&[^?#]]{0,12}".prop_map(Mutation::ChangePath),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::FlipBodyByte(i, x)),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::AppendBody),
        2 => any::<Index>().prop_map(Mutation::DropComponent),
        2 => any::<Index>().prop_map(Mutation::AddComponent),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapComponents(a, b)),
        2 => prop::collection::vec(any::<Index>(), 2..8).prop_map(Mutation::ReorderParameters),
        2 => (any::<Index>(), prop_oneof![-40i64..=40, Just(i64::MAX), Just(i64::MIN)])
            .prop_map(|(i, d)| Mutation::ChangeParameter(i, d)),
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipSignatureBit(i, b)),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::WrongKey),
        1 => signature_input().prop_map(Mutation::ReplaceInput),
        1 => signature_value().prop_map(Mutation::ReplaceSignature),
    ]
}

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "get"];
const ADDABLE: [&str; 9] = [
    "@authority",
    "@query",
    "@scheme",
    "@target-uri",
    "content-type",
    "accept",
    "user-agent",
    "host",
    "x-absent",
];

/// Rebuild the labelled Signature-Input member from components and `(name, value)` parameters
/// (values already serialized).
fn input_member(components: &[String], params: &[(String, String)]) -> Option<HeaderValue> {
    let mut s = format!("{LABEL}=(");
    s.push_str(
        &components
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(" "),
    );
    s.push(')');
    for (k, v) in params {
        s.push_str(&format!(";{k}={v}"));
    }
    HeaderValue::from_str(&s).ok()
}

/// The parameters of the original signature, in order, serialized.
fn params_of(r: &Req) -> Option<Vec<(String, String)>> {
    let f = find_signature(&r.headers, LABEL).ok()?;
    let p = f.params;
    let mut out = vec![("created".to_string(), p.created.unwrap_or(0).to_string())];
    if let Some(e) = p.expires {
        out.push(("expires".into(), e.to_string()));
    }
    out.push((
        "nonce".into(),
        format!("\"{}\"", p.nonce.unwrap_or_default()),
    ));
    if let Some(a) = p.alg {
        out.push(("alg".into(), format!("\"{a}\"")));
    }
    out.push((
        "keyid".into(),
        format!("\"{}\"", p.keyid.unwrap_or_default()),
    ));
    Some(out)
}

/// `i` into a collection of `len`, or `None` when it is empty (chained mutations may empty one).
fn at(i: &Index, len: usize) -> Option<usize> {
    (len > 0).then(|| i.index(len))
}

/// Apply `m` to a copy of `orig`. Returns the mutated request and whether the mutation
/// certainly changes what is signed (so it must be refused), or `None` if it does not apply.
fn apply(orig: &Req, m: &Mutation) -> Option<(Req, bool)> {
    let mut r = orig.clone();
    let names: Vec<HeaderName> = orig.headers.keys().cloned().collect();
    // A header is covered by name, and Host also through the derived components built from it.
    let covered = |n: &HeaderName| {
        orig.covers(n.as_str())
            || (n == http::header::HOST
                && (orig.covers("@authority") || orig.covers("@target-uri")))
    };
    let must_fail = match m {
        Mutation::FlipHeaderByte(h, i, x) => {
            let name = names[at(h, names.len())?].clone();
            let v = orig.headers.get(&name)?.as_bytes().to_vec();
            if v.is_empty() {
                return None;
            }
            let mut v2 = v.clone();
            v2[at(i, v.len())?] ^= x;
            let hv = HeaderValue::from_bytes(&v2).ok()?;
            r.headers.insert(name.clone(), hv);
            // A covered value changes (field values are trimmed; the originals have no
            // surrounding whitespace, so trimming cannot make them equal again). The authority
            // is case-insensitive, so a case flip in Host changes nothing signed.
            covered(&name) && !(name == http::header::HOST && v.eq_ignore_ascii_case(&v2))
        }
        Mutation::DuplicateHeader(h) => {
            let name = names[at(h, names.len())?].clone();
            let v = orig.headers.get(&name)?.clone();
            r.headers.append(name.clone(), v);
            covered(&name)
        }
        Mutation::RemoveHeader(h) => {
            let name = names[at(h, names.len())?].clone();
            r.headers.remove(&name);
            covered(&name) || name == "signature" || name == "signature-input"
        }
        Mutation::AddUncoveredHeader(n, v) => {
            let name = HeaderName::from_bytes(n.as_bytes()).ok()?;
            let hv = HeaderValue::from_str(v).ok()?;
            r.headers.append(name.clone(), hv);
            // Appending to a covered field changes its value; the uncovered ones do not count.
            covered(&name)
        }
        Mutation::DeclareBody(chunked) => {
            if *chunked {
                r.headers.insert(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            } else {
                r.headers.insert(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from_str(&(orig.body.len() + 1).to_string()).ok()?,
                );
            }
            // Without a covered digest, a declared body is refused from the head.
            !orig.covers("content-digest")
        }
        Mutation::ChangeMethod(i) => {
            r.method = Method::from_bytes(i.get(&METHODS).as_bytes()).ok()?;
            r.method != orig.method
        }
        Mutation::ChangePath(p) => {
            let pq = match orig.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p.clone(),
            };
            r.uri = pq.parse().ok()?;
            r.uri.path() != orig.uri.path()
        }
        Mutation::FlipBodyByte(i, x) => {
            if r.body.is_empty() {
                return None;
            }
            let n = at(i, r.body.len())?;
            r.body[n] ^= x;
            true
        }
        Mutation::AppendBody(b) => {
            r.body.extend_from_slice(b);
            true
        }
        Mutation::DropComponent(i) => {
            let mut c = orig.components();
            c.remove(at(i, c.len())?);
            r.headers
                .insert("signature-input", input_member(&c, &params_of(orig)?)?);
            true
        }
        Mutation::AddComponent(i) => {
            let mut c = orig.components();
            let add = i.get(&ADDABLE).to_string();
            if c.contains(&add) {
                return None;
            }
            c.insert(i.index(c.len() + 1), add);
            r.headers
                .insert("signature-input", input_member(&c, &params_of(orig)?)?);
            true
        }
        Mutation::SwapComponents(a, b) => {
            let mut c = orig.components();
            let (a, b) = (at(a, c.len())?, at(b, c.len())?);
            if a == b {
                return None;
            }
            c.swap(a, b);
            r.headers
                .insert("signature-input", input_member(&c, &params_of(orig)?)?);
            true
        }
        Mutation::ReorderParameters(swaps) => {
            let mut p = params_of(orig)?;
            for w in swaps.windows(2) {
                let (a, b) = (at(&w[0], p.len())?, at(&w[1], p.len())?);
                p.swap(a, b);
            }
            let changed = Some(&p) != params_of(orig).as_ref();
            r.headers
                .insert("signature-input", input_member(&orig.components(), &p)?);
            changed
        }
        Mutation::ChangeParameter(i, d) => {
            let mut p = params_of(orig)?;
            let n = at(i, p.len())?;
            let (k, v) = &p[n];
            let nv = match k.as_str() {
                "created" | "expires" => {
                    let n: i64 = v.parse().ok()?;
                    // RFC 8941 integers have at most 15 digits; clamp into range.
                    n.saturating_add(*d)
                        .clamp(-999_999_999_999_999, 999_999_999_999_999)
                        .to_string()
                }
                _ => {
                    let inner = v.trim_matches('"');
                    let alt = if *d % 2 == 0 { "X" } else { "" };
                    format!("\"{inner}{alt}\"")
                }
            };
            if &nv == v {
                return None;
            }
            p[n].1 = nv;
            r.headers
                .insert("signature-input", input_member(&orig.components(), &p)?);
            true
        }
        Mutation::FlipSignatureBit(i, bit) => {
            use base64::Engine;
            use base64::engine::general_purpose::STANDARD;
            let mut sig = find_signature(&orig.headers, LABEL).ok()?.signature;
            let n = at(i, sig.len())?;
            sig[n] ^= 1 << bit;
            let v = format!("{LABEL}=:{}:", STANDARD.encode(sig));
            r.headers
                .insert("signature", HeaderValue::from_str(&v).ok()?);
            true
        }
        Mutation::WrongKey(k) => {
            if k.as_slice() == KEY {
                return None;
            }
            let f = find_signature(&orig.headers, LABEL).ok()?;
            let p = f.params;
            let mut h = orig.headers.clone();
            h.remove("signature");
            h.remove("signature-input");
            let mut o = SignOptions::new(p.keyid.clone()?, p.created?);
            o.nonce = p.nonce.clone();
            o.expires = p.expires;
            o.include_alg = p.alg.is_some();
            o.extra_components = p.components.clone();
            sign_request(&orig.method, &orig.uri, &mut h, &orig.body, k, &o).ok()?;
            r.headers = h;
            true
        }
        Mutation::ReplaceInput(v) => {
            r.headers
                .insert("signature-input", HeaderValue::from_bytes(v).ok()?);
            false
        }
        Mutation::ReplaceSignature(v) => {
            r.headers
                .insert("signature", HeaderValue::from_bytes(v).ok()?);
            false
        }
    };
    Some((r, must_fail))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary signature headers on an otherwise plausible request: never a panic, never Ok.
    #[test]
    fn arbitrary_signature_headers_are_refused(
        input in signature_input(),
        sig in signature_value(),
        body in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut headers = HeaderMap::new();
        headers.insert("x-bulkhead-tenant", HeaderValue::from_static("acme"));
        if let Ok(v) = HeaderValue::from_bytes(&input) {
            headers.insert("signature-input", v);
        }
        if let Ok(v) = HeaderValue::from_bytes(&sig) {
            headers.insert("signature", v);
        }
        let r = Req { method: Method::POST, uri: Uri::from_static("/v1/chat/completions"), headers, body };
        prop_assert!(verify_both(&r).is_err());
    }

    /// One mutation of a validly signed request: one that changes anything signed is
    /// refused; any request accepted signs exactly what the real key signed.
    #[test]
    fn a_mutated_request_verifies_only_if_signed_content_is_unchanged(
        orig in signed_request(),
        m in mutation(),
    ) {
        prop_assert_eq!(verify_both(&orig), Ok(()));
        if let Some((cur, must_fail)) = apply(&orig, &m) {
            let result = verify_both(&cur);
            if must_fail {
                prop_assert!(result.is_err(), "accepted after {:?}", m);
            }
            if result.is_ok() {
                prop_assert_eq!(cur.signed_content(), orig.signed_content(), "after {:?}", m);
            }
        }
    }

    /// Several mutations in a row (a later one may undo an earlier one, so only the oracle
    /// applies): any request accepted signs exactly what the real key signed.
    #[test]
    fn chained_mutations_verify_only_if_signed_content_is_unchanged(
        orig in signed_request(),
        mutations in prop::collection::vec(mutation(), 2..5),
    ) {
        let mut cur = orig.clone();
        for m in &mutations {
            if let Some((next, _)) = apply(&cur, m) {
                cur = next;
            }
        }
        if verify_both(&cur).is_ok() {
            prop_assert_eq!(cur.signed_content(), orig.signed_content(), "after {:?}", mutations);
        }
    }

    /// The same nonce is accepted once, however the checks interleave.
    #[test]
    fn a_signed_request_is_accepted_once(orig in signed_request(), heads in 1usize..4) {
        let v = verifier();
        let pending: Vec<_> = (0..heads).map(|_| v.verify_head(orig.view(), NOW)).collect();
        let mut ok = 0;
        for p in pending {
            if p.expect("head verifies").finish(&v, &orig.body, NOW).is_ok() {
                ok += 1;
            }
        }
        prop_assert_eq!(ok, 1);
        prop_assert_eq!(v.verify_head(orig.view(), NOW).err(), Some(AuthError::Replayed));
    }
}
