//! `salted` tenants: each gets a keyed `cache_salt`, so its cache blocks are never shared.

/// The `cache_salt` of a `salted` tenant: base64url(HMAC-SHA256(key, domain || generation ||
/// tenant)). Not derivable from the tenant name without the key; a new key or generation
/// changes every salt. Never log it.
pub fn derive_salt(key: &[u8], generation: u64, tenant: &str) -> String {
    use base64::Engine;
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    ctx.update(b"bulkhead cache_salt v1\0");
    ctx.update(&generation.to_be_bytes());
    ctx.update(tenant.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ctx.sign().as_ref())
}
