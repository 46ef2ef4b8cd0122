//! The authentication phases: the credential from the head alone ([`authenticate`]), the
//! route's policy and the credential's route scope ([`check_route`]), and, once the body is
//! read, its digest and nonce ([`verify_body`]).

use super::exchange::Exchange;
use super::{Refusal, RefusalCode, Route};
use crate::auth::scope::Scope;
use crate::auth::signature::{NonceRecord, PendingAuth, RequestView};
use crate::limits::shared::SharedError;
use crate::runtime::{Runtime, TenantRuntime};
use bytes::Bytes;
use http::request::Parts;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How a request proved its tenant.
pub(super) enum Credential {
    /// An RFC 9421 signature over the head; the body's digest is checked once read.
    Signed(PendingAuth),
    /// A verified JWT.
    Token(crate::auth::jwt::JwtIdentity),
}

impl Credential {
    pub fn scope(&self) -> &Arc<Scope> {
        match self {
            Credential::Signed(p) => p.scope(),
            Credential::Token(t) => &t.scope,
        }
    }
}

/// What authentication proved, once the body is read.
pub(super) struct Verified {
    pub key_id: String,
    /// Lowercase names of the headers the credential covers (kept even if reserved).
    pub covered_headers: std::collections::HashSet<String>,
    /// The client body's SHA-256 prefix states (signed requests with a sha-256 digest).
    pub digest_prefixes: Option<crate::auth::digest::Sha256Prefixes>,
}

/// Phase: authenticate from the headers alone and look the tenant up once. A request with
/// `Signature` or `Signature-Input` is verified as signed (the body is checked later); one
/// with only `Authorization: Bearer` as a JWT, when `[auth.jwt]` is configured. Each method
/// only on the routes its configuration lists.
pub(super) fn authenticate(
    ex: &mut Exchange,
    rt: &Runtime,
    parts: &Parts,
) -> Result<(Credential, Arc<TenantRuntime>), Refusal> {
    let h = &parts.headers;
    let signed = h.contains_key("signature") || h.contains_key("signature-input");
    if !signed && let Some(jwt) = &rt.jwt {
        let token = crate::auth::jwt::bearer(h).map_err(|e| Refusal::auth(&e))?;
        if let Some(token) = token {
            use crate::auth::signature::AuthError;
            if !jwt.routes.allows(parts.uri.path()) {
                return Err(Refusal::auth(&AuthError::MethodNotAccepted("JWT")));
            }
            let id = jwt
                .verify(token, unix_now())
                .map_err(|e| Refusal::auth(&e))?;
            let tenant = rt
                .tenant(&id.tenant)
                .cloned()
                .ok_or_else(|| Refusal::auth(&AuthError::UnknownTenant))?;
            return Ok((Credential::Token(id), tenant));
        }
    }
    if signed && !rt.hmac_routes.allows(parts.uri.path()) {
        return Err(Refusal::auth(
            &crate::auth::signature::AuthError::MethodNotAccepted("signed"),
        ));
    }
    let view = RequestView {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let pending = rt.verifier.verify_head(view, unix_now()).map_err(|e| {
        // These come after the signature verified: the tenant header it covers is what a
        // real key signed (for tenant_mismatch, a tenant the key may not speak for).
        if e.after_signature() {
            ex.refused_signed_for(
                parts
                    .headers
                    .get(crate::auth::signature::TENANT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|name| rt.tenant(name.trim()))
                    .cloned(),
            );
        }
        Refusal::auth(&e)
    })?;
    let tenant = rt
        .tenant(pending.tenant())
        .cloned()
        .ok_or_else(|| Refusal::auth(&crate::auth::signature::AuthError::UnknownTenant))?;
    Ok((Credential::Signed(pending), tenant))
}

/// Phase: the body against the signed digest, then the nonce recorded: in this process, or in
/// the replay cache shared by the replicas. When the shared limits record it in the admission's
/// own script (one round trip for both), it is returned to be recorded there.
pub(super) async fn verify_body(
    ex: &mut Exchange,
    rt: &Runtime,
    pending: PendingAuth,
    body: &Bytes,
    tenant: &Arc<TenantRuntime>,
) -> Result<(crate::auth::signature::Verified, Option<NonceRecord>), Refusal> {
    let Some(shared) = &ex.app().shared else {
        return match pending.finish(&rt.verifier, body, unix_now()) {
            Ok(v) => Ok((v, None)),
            Err(e) => {
                ex.refused_signed_for(Some(tenant.clone()));
                Err(Refusal::auth(&e))
            }
        };
    };
    let shared = shared.clone();
    let (verified, nonce) = pending
        .finish_unrecorded(&rt.verifier, body, unix_now())
        .map_err(|e| {
            ex.refused_signed_for(Some(tenant.clone()));
            Refusal::auth(&e)
        })?;
    if tenant.shared.is_some() && shared.records_nonce_at_admission() {
        return Ok((verified, Some(nonce)));
    }
    match shared.record_nonce(&rt.verifier, &nonce).await {
        Ok(()) => Ok((verified, None)),
        Err(SharedError::Auth(e)) => {
            ex.refused_signed_for(Some(tenant.clone()));
            Err(Refusal::auth(&e))
        }
        Err(e) => Err(Refusal::shared(e)),
    }
}

/// Phase: the route's policy for this tenant, and the credential's route scope.
pub(super) fn check_route(
    route: Route,
    path: &str,
    tenant: &TenantRuntime,
    scope: &Scope,
) -> Result<(), Refusal> {
    check_route_policy(route, tenant)?;
    if !scope.routes.allows(path) {
        return Err(Refusal::denied("route", path));
    }
    // An unknown route is forwarded opaque: nothing in its body could be held to the scope.
    if route == Route::Unknown && scope.limits_body() {
        return Err(Refusal::permission(format!(
            "route {} is not inspected, so a credential limited to models, tools or \
             max_tokens cannot use it",
            crate::auth::scope::quoted(path)
        )));
    }
    Ok(())
}

fn check_route_policy(route: Route, tenant: &TenantRuntime) -> Result<(), Refusal> {
    match route {
        Route::Admin => Err(Refusal::new(
            RefusalCode::RouteForbidden,
            "this route changes the inference server for every tenant and is never forwarded",
        )),
        Route::Unknown if tenant.unknown_routes == crate::config::UnknownRoutes::Refuse => {
            Err(Refusal::new(
                RefusalCode::UnknownRoute,
                "the sidecar does not forward this route for this tenant",
            ))
        }
        _ => Ok(()),
    }
}
