//! Which tenant a stored Responses API answer belongs to, remembered in Redis so that every
//! replica refuses another tenant's `previous_response_id`.

use super::{SharedLimits, scripts};
use std::time::Duration;

impl SharedLimits {
    /// Remember in Redis that `tenant` was handed the stored response `id`, for `ttl`. Best
    /// effort: the replica remembers it too, and an id nobody remembers is refused.
    pub async fn record_response(&self, tenant: &str, id: &str, ttl: Duration) {
        if !self.backend.is_up() {
            return;
        }
        let mut inv = scripts::RESPONSE_RECORD.prepare_invoke();
        inv.key(scripts::response_key(&self.cfg.key_prefix, tenant, id))
            .arg(ttl.as_millis() as u64);
        self.backend.invoke::<i64>(&inv).await;
    }

    /// Whether Redis remembers `id` as `tenant`'s; `None` while Redis cannot answer.
    pub async fn owns_response(&self, tenant: &str, id: &str) -> Option<bool> {
        if !self.backend.is_up() {
            return None;
        }
        let mut inv = scripts::RESPONSE_OWNED.prepare_invoke();
        inv.key(scripts::response_key(&self.cfg.key_prefix, tenant, id));
        self.backend.invoke::<i64>(&inv).await.map(|n| n == 1)
    }
}
