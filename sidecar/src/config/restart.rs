//! The fields a reload cannot change: read once at start (listeners, the runtime, the server's
//! connection limits, the tagging client, the replay cache, the limits backend, telemetry and
//! the audit log's place and hash key).

use super::Config;

/// Sets one restart-only field of the new configuration (first) back to the running one's.
pub type KeepField = fn(&mut Config, &Config);

/// Every restart-only field: on reload each keeps its running value (also in the stored
/// configuration), with a warning naming the field when the new file changed it.
pub const RESTART_ONLY: [(&str, KeepField); 15] = [
    ("listen.addr", |n, r| n.listen.addr = r.listen.addr),
    ("listen.admin_addr", |n, r| {
        n.listen.admin_addr = r.listen.admin_addr
    }),
    ("runtime.worker_threads", |n, r| {
        n.runtime.worker_threads = r.runtime.worker_threads
    }),
    ("http.max_header_bytes", |n, r| {
        n.http.max_header_bytes = r.http.max_header_bytes
    }),
    ("http.header_read_timeout_ms", |n, r| {
        n.http.header_read_timeout_ms = r.http.header_read_timeout_ms
    }),
    ("http.drain_timeout_ms", |n, r| {
        n.http.drain_timeout_ms = r.http.drain_timeout_ms
    }),
    ("http.max_inflight_body_bytes", |n, r| {
        n.http.max_inflight_body_bytes = r.http.max_inflight_body_bytes
    }),
    ("http.max_connections", |n, r| {
        n.http.max_connections = r.http.max_connections
    }),
    ("http.max_concurrent_streams", |n, r| {
        n.http.max_concurrent_streams = r.http.max_concurrent_streams
    }),
    ("agent.socket", |n, r| {
        n.agent.socket.clone_from(&r.agent.socket)
    }),
    ("auth.replay_cache_capacity", |n, r| {
        n.auth.replay_cache_capacity = r.auth.replay_cache_capacity
    }),
    ("limits", |n, r| n.limits.clone_from(&r.limits)),
    ("telemetry", |n, r| n.telemetry.clone_from(&r.telemetry)),
    ("audit.dir", |n, r| n.audit.dir.clone_from(&r.audit.dir)),
    ("audit.hash_key_file", |n, r| {
        n.audit.hash_key_file.clone_from(&r.audit.hash_key_file)
    }),
];

/// `new` with every [`RESTART_ONLY`] field set back to its running value, and the names of
/// those that `new` had changed.
pub fn keep_restart_only(running: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut changed = Vec::new();
    for (field, keep) in RESTART_ONLY {
        let before = new.clone();
        keep(&mut new, running);
        if new != before {
            changed.push(field);
        }
    }
    (new, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each entry keeps exactly its own field: changed in the new file, it is named and set
    /// back; nothing else is touched (the reloadable fields of the new file stay new).
    #[test]
    fn restart_only_fields_keep_their_running_values() {
        let running = Config::from_toml(super::super::EXAMPLE_CONFIG).unwrap();
        let (same, kept) = keep_restart_only(&running, running.clone());
        assert!(kept.is_empty(), "{kept:?}");
        assert_eq!(same, running);
        // A new file changing every restart-only field and one reloadable field.
        let mut new = running.clone();
        new.listen.addr = "127.0.0.1:1".parse().unwrap();
        new.listen.admin_addr = "127.0.0.1:2".parse().unwrap();
        new.runtime.worker_threads += 1;
        new.http.max_header_bytes += 1;
        new.http.header_read_timeout_ms += 1;
        new.http.drain_timeout_ms += 1;
        new.http.max_inflight_body_bytes += 1;
        new.http.max_connections += 1;
        new.http.max_concurrent_streams += 1;
        new.agent.socket = Some("/elsewhere.sock".into());
        new.auth.replay_cache_capacity += 1;
        new.limits.backend = super::super::LimitsBackend::Redis;
        new.telemetry.otlp = Some(Default::default());
        new.audit.dir = Some("/elsewhere".into());
        new.audit.hash_key_file = Some("/elsewhere.key".into());
        new.queue.max_inflight += 1;
        let (kept_config, kept) = keep_restart_only(&running, new.clone());
        let names: Vec<&str> = RESTART_ONLY.iter().map(|(f, _)| *f).collect();
        assert_eq!(kept, names, "every field changed, each named once");
        let mut want = running.clone();
        want.queue.max_inflight = new.queue.max_inflight;
        assert_eq!(kept_config, want, "only the reloadable field changed");
    }
}
