//! Replay nonces in the cache every replica shares: a verified request's nonce recorded in
//! Redis by its own call (or by the admission's script, see [`SharedTenant::admit`]), and in
//! this process's replay cache as well.
//!
//! [`SharedTenant::admit`]: super::SharedTenant::admit

use super::{SharedError, SharedLimits, scripts};
use crate::auth::signature::{AuthError, NonceRecord, Verifier};
use crate::config::BackendFailure;

impl SharedLimits {
    /// Record a verified request's nonce in Redis (or, while Redis is down, as
    /// `on_backend_failure` says). A nonce Redis accepts is recorded in this process's replay
    /// cache too ([`SharedLimits::remember_locally`]).
    pub async fn record_nonce(
        &self,
        verifier: &Verifier,
        n: &NonceRecord,
    ) -> Result<(), SharedError> {
        if self.backend.is_up() {
            let key = scripts::replay_key(&self.cfg.key_prefix, &n.key_id);
            let member = scripts::replay_member(&n.key_id, &n.nonce);
            let mut inv = scripts::REPLAY.prepare_invoke();
            inv.key(key)
                .arg(member)
                .arg(n.forget_at.saturating_mul(1000))
                .arg(n.key_share);
            match self.backend.invoke::<i64>(&inv).await {
                Some(0) => return Self::remember_locally(verifier, n),
                Some(1) => return Err(SharedError::Auth(AuthError::Replayed)),
                Some(_) => return Err(SharedError::Auth(AuthError::ReplayCacheFull)),
                None => {}
            }
        }
        match self.degraded() {
            BackendFailure::Local => verifier.record_local(n).map_err(SharedError::Auth),
            BackendFailure::Deny => Err(SharedError::Unavailable),
        }
    }

    /// Record a nonce Redis has recorded in this process's replay cache as well, so that while
    /// Redis is down (`on_backend_failure = "local"` checks nonces here alone) this replica
    /// still refuses a replay of a request it served. Fails closed as the local cache does
    /// (`ReplayCacheFull` when its key id's share is full: better refuse than forget a live
    /// nonce).
    pub(super) fn remember_locally(
        verifier: &Verifier,
        n: &NonceRecord,
    ) -> Result<(), SharedError> {
        verifier.record_local(n).map_err(SharedError::Auth)
    }
}
