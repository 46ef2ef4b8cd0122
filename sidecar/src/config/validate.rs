//! Validation of a parsed [`Config`]: every rule with the field it names.

use super::*;
use std::collections::HashSet;

impl Config {
    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let uri: http::Uri = self
            .upstream
            .url
            .parse()
            .map_err(|e| invalid("upstream.url", format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                "upstream.url",
                "only http:// upstreams are supported",
            ));
        }
        if uri.authority().is_none() {
            return Err(invalid("upstream.url", "missing host"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(invalid("upstream.url", "must not have a path"));
        }
        if self.upstream.connect_timeout_ms == 0 {
            return Err(invalid("upstream.connect_timeout_ms", "must be > 0"));
        }
        if self.upstream.response_timeout_ms == 0 {
            return Err(invalid("upstream.response_timeout_ms", "must be > 0"));
        }
        for h in &self.upstream.identity_headers {
            let name = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                invalid(
                    "upstream.identity_headers",
                    format!("{h:?} is not a header name"),
                )
            })?;
            if name.as_str() != h.as_str() || crate::proxy::upstream::is_hop_by_hop(&name) {
                return Err(invalid(
                    "upstream.identity_headers",
                    format!("{h:?} must be a lowercase end-to-end header name"),
                ));
            }
        }
        if self.auth.label.is_empty()
            || !self
                .auth
                .label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b))
            || !self.auth.label.as_bytes()[0].is_ascii_lowercase()
        {
            return Err(invalid(
                "auth.label",
                "must be an RFC 8941 key (lowercase letter, then a-z 0-9 _ - . *)",
            ));
        }
        if self.auth.max_skew_secs == 0 || self.auth.max_skew_secs > 3600 {
            return Err(invalid("auth.max_skew_secs", "must be within 1..=3600"));
        }
        if self.auth.replay_cache_capacity == 0 {
            return Err(invalid("auth.replay_cache_capacity", "must be > 0"));
        }
        if self.queue.max_inflight == 0 {
            return Err(invalid("queue.max_inflight", "must be > 0"));
        }
        if self.queue.timeout_ms == 0 {
            return Err(invalid("queue.timeout_ms", "must be > 0"));
        }
        if self.leaks.injection_markers.len() > 64 {
            return Err(invalid(
                "leaks.injection_markers",
                "at most 64 (each is a label value)",
            ));
        }
        for m in &self.leaks.injection_markers {
            check_pattern("leaks.injection_markers", m, 3, 128)?;
        }
        for (field, v) in [
            ("queue.input_token_cost", self.queue.input_token_cost),
            ("queue.output_token_cost", self.queue.output_token_cost),
        ] {
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                return Err(invalid(field, "must be a number within 0..=1000000"));
            }
        }
        if self.queue.input_token_cost == 0.0 && self.queue.output_token_cost == 0.0 {
            return Err(invalid(
                "queue.input_token_cost",
                "input and output token costs cannot both be 0",
            ));
        }
        if self.http.max_header_bytes < 1024 {
            return Err(invalid("http.max_header_bytes", "must be >= 1024"));
        }
        if self.http.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be > 0"));
        }
        if self.http.header_read_timeout_ms == 0 {
            return Err(invalid("http.header_read_timeout_ms", "must be > 0"));
        }
        if self.http.body_read_timeout_ms == 0 {
            return Err(invalid("http.body_read_timeout_ms", "must be > 0"));
        }
        if self.http.max_inflight_body_bytes < self.http.max_body_bytes {
            return Err(invalid(
                "http.max_inflight_body_bytes",
                "must be >= http.max_body_bytes (or no body of the largest size could be read)",
            ));
        }
        if self.http.max_connections == 0 || self.http.max_connections > 1_000_000 {
            return Err(invalid(
                "http.max_connections",
                "must be within 1..=1000000",
            ));
        }
        if self.http.idle_timeout_ms == 0 {
            return Err(invalid("http.idle_timeout_ms", "must be > 0"));
        }
        if self.http.max_concurrent_streams == 0 || self.http.max_concurrent_streams > 10_000 {
            return Err(invalid(
                "http.max_concurrent_streams",
                "must be within 1..=10000",
            ));
        }
        if self.http.response_write_idle_timeout_ms == 0 {
            return Err(invalid(
                "http.response_write_idle_timeout_ms",
                "must be > 0",
            ));
        }
        if self.agent.max_tagged_connections_per_tenant == 0 {
            return Err(invalid(
                "agent.max_tagged_connections_per_tenant",
                "must be > 0",
            ));
        }
        if self.runtime.worker_threads > 256 {
            return Err(invalid("runtime.worker_threads", "must be within 0..=256"));
        }
        if self.tenants.is_empty() {
            return Err(invalid("tenants", "at least one tenant is required"));
        }
        for (name, t) in &self.tenants {
            let f = |k: &str| format!("tenants.{name}.{k}");
            // The rule the node agent applies too (its tenants must match these names).
            if let Err(e) = agent_common::check_tenant_name(name) {
                return Err(invalid(format!("tenants.{name}"), e.to_string()));
            }
            if t.weight == 0 || t.weight > 10_000 {
                return Err(invalid(f("weight"), "must be within 1..=10000"));
            }
            if t.requests_per_minute == Some(0) {
                return Err(invalid(
                    f("requests_per_minute"),
                    "must be > 0 (omit for no limit)",
                ));
            }
            if t.tokens_per_minute == Some(0) {
                return Err(invalid(
                    f("tokens_per_minute"),
                    "must be > 0 (omit for no limit)",
                ));
            }
            if t.max_concurrent == Some(0) {
                return Err(invalid(
                    f("max_concurrent"),
                    "must be > 0 (omit for no limit)",
                ));
            }
            if t.default_max_tokens == 0 {
                return Err(invalid(f("default_max_tokens"), "must be > 0"));
            }
            if let Some(kv) = t.max_kv_tokens
                && kv <= t.default_max_tokens
            {
                return Err(invalid(
                    f("max_kv_tokens"),
                    format!(
                        "must be larger than default_max_tokens ({}): every request reserves its \
                         prompt plus max_tokens",
                        t.default_max_tokens
                    ),
                ));
            }
            for (k, list, min) in [("canaries", &t.canaries, 8), ("keywords", &t.keywords, 3)] {
                if list.len() > 1000 {
                    return Err(invalid(f(k), "at most 1000"));
                }
                for p in list {
                    check_pattern(&f(k), p, min, 256)?;
                    let lower = p.to_ascii_lowercase();
                    if let Some((other, _)) = self.tenants.iter().find(|(o, ot)| {
                        *o != name
                            && ot
                                .canaries
                                .iter()
                                .chain(&ot.keywords)
                                .any(|q| q.to_ascii_lowercase() == lower)
                    }) {
                        return Err(invalid(
                            f(k),
                            format!("one also belongs to tenant {other}: a pattern has one owner"),
                        ));
                    }
                }
            }
            check_body_fields(&f, t, self.upstream.flavor)?;
            if t.unknown_routes == UnknownRoutes::Forward && t.isolation != Isolation::Shared {
                return Err(invalid(
                    f("unknown_routes"),
                    format!(
                        "\"forward\" is only for \"shared\" tenants: an unknown route's body is \
                         not inspected, so the {} tier could not be applied to it",
                        t.isolation.as_str()
                    ),
                ));
            }
            let flavor = self.upstream.flavor;
            match t.isolation {
                Isolation::Shared => {}
                Isolation::Salted | Isolation::Exclusive if flavor == Flavor::Openai => {
                    return Err(invalid(
                        f("isolation"),
                        format!(
                            "\"{}\" needs an upstream with cache_salt and a cache flush; \
                             upstream.flavor = \"openai\" has neither (set upstream.flavor to \
                             \"vllm\" or \"sglang\", or use \"shared\")",
                            t.isolation.as_str()
                        ),
                    ));
                }
                Isolation::Salted if self.cache.salt_key_file.is_none() => {
                    return Err(invalid(
                        "cache.salt_key_file",
                        format!("required: tenants.{name}.isolation is \"salted\""),
                    ));
                }
                Isolation::Salted | Isolation::Exclusive => {}
            }
        }
        let c = &self.cache;
        if c.exclusive_window_ms == 0 {
            return Err(invalid("cache.exclusive_window_ms", "must be > 0"));
        }
        if c.exclusive_window_max_requests == 0 {
            return Err(invalid(
                "cache.exclusive_window_max_requests",
                "must be > 0",
            ));
        }
        if c.flush_attempts == 0 || c.flush_attempts > 100 {
            return Err(invalid("cache.flush_attempts", "must be within 1..=100"));
        }
        if c.flush_timeout_ms == 0 {
            return Err(invalid("cache.flush_timeout_ms", "must be > 0"));
        }
        if c.exclusive_drain_timeout_ms == 0 {
            return Err(invalid("cache.exclusive_drain_timeout_ms", "must be > 0"));
        }
        // A request let past the gate reaches the upstream within the connect timeout; the
        // drain bound must outlast that before a flush may vouch for it.
        if c.flush_refused_while_busy
            && c.exclusive_drain_timeout_ms <= self.upstream.connect_timeout_ms
        {
            return Err(invalid(
                "cache.exclusive_drain_timeout_ms",
                "must be > upstream.connect_timeout_ms when cache.flush_refused_while_busy is set",
            ));
        }
        if let Some(m) = &self.model {
            for (k, v) in [
                ("layers", m.layers),
                ("kv_heads", m.kv_heads),
                ("head_dim", m.head_dim),
            ] {
                if v == 0 || v > 1_000_000 {
                    return Err(invalid(format!("model.{k}"), "must be within 1..=1000000"));
                }
            }
        }
        self.validate_audit()?;
        self.cost
            .check(&|t| self.tenants.contains_key(t))
            .map_err(|(field, message)| invalid(field, message))?;
        self.validate_limits()?;
        if self.agent.kv_report_interval_ms < 100 {
            return Err(invalid("agent.kv_report_interval_ms", "must be >= 100"));
        }
        if self.keys.is_empty() && self.auth.jwt.is_none() {
            return Err(invalid(
                "keys",
                "at least one key is required (or configure [auth.jwt])",
            ));
        }
        crate::auth::scope::Routes::parse(&self.auth.hmac_routes)
            .map_err(|m| invalid("auth.hmac_routes", m))?;
        if let Some(j) = &self.auth.jwt {
            self.validate_jwt(j)?;
        }
        for (i, k) in self.keys.iter().enumerate() {
            let f = |x: &str| format!("keys[{i}].{x}");
            if k.id.is_empty() || k.id.len() > 128 {
                return Err(invalid(f("id"), "must be 1-128 characters"));
            }
            if k.secret_files.is_empty() {
                return Err(invalid(f("secret_files"), "at least one file is required"));
            }
            if k.encoding != "base64" && k.encoding != "raw" {
                return Err(invalid(f("encoding"), "must be \"base64\" or \"raw\""));
            }
            if k.tenants.is_empty() {
                return Err(invalid(f("tenants"), "list the tenants, or \"*\" for any"));
            }
            for t in &k.tenants {
                if t != "*" && !self.tenants.contains_key(t) {
                    return Err(invalid(f("tenants"), format!("unknown tenant {t:?}")));
                }
            }
            Scope::from_config(&k.scope)
                .map_err(|e| invalid(f(&format!("scope.{}", e.field)), e.message))?;
            // Entries sharing an id are one key: they must not disagree on its scope.
            if let Some(first) = self.keys[..i].iter().find(|o| o.id == k.id)
                && first.scope != k.scope
            {
                return Err(invalid(
                    f("scope"),
                    format!("differs from an earlier entry with id {:?}", k.id),
                ));
            }
        }
        if let Some(o) = &self.telemetry.otlp {
            self.validate_otlp(o)?;
        }
        Ok(())
    }

    fn validate_otlp(&self, o: &super::OtlpConfig) -> Result<(), ConfigError> {
        let f = |x: &str| format!("telemetry.otlp.{x}");
        let uri: http::Uri = o
            .endpoint
            .parse()
            .map_err(|e| invalid(f("endpoint"), format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                f("endpoint"),
                "only http:// is supported (OTLP/HTTP to a collector beside the sidecar)",
            ));
        }
        if uri.authority().is_none() {
            return Err(invalid(f("endpoint"), "missing host"));
        }
        if uri.query().is_some() {
            return Err(invalid(f("endpoint"), "must not have a query"));
        }
        if !(0.0..=1.0).contains(&o.sample_ratio) {
            return Err(invalid(f("sample_ratio"), "must be between 0.0 and 1.0"));
        }
        if o.max_queue_spans == 0 || o.max_queue_spans > 1_000_000 {
            return Err(invalid(f("max_queue_spans"), "must be 1-1000000"));
        }
        if o.max_batch_spans == 0 || o.max_batch_spans > o.max_queue_spans {
            return Err(invalid(
                f("max_batch_spans"),
                "must be > 0 and at most max_queue_spans",
            ));
        }
        if o.export_interval_ms == 0 {
            return Err(invalid(f("export_interval_ms"), "must be > 0"));
        }
        if o.timeout_ms == 0 {
            return Err(invalid(f("timeout_ms"), "must be > 0"));
        }
        if o.service_name.is_empty() || o.service_name.len() > 256 {
            return Err(invalid(f("service_name"), "must be 1-256 characters"));
        }
        Ok(())
    }

    fn validate_jwt(&self, j: &JwtConfig) -> Result<(), ConfigError> {
        let f = |k: &str| format!("auth.jwt.{k}");
        let strings = |k: &str, list: &[String]| -> Result<(), ConfigError> {
            if list.is_empty() || list.len() > 64 {
                return Err(invalid(f(k), "list 1-64 values"));
            }
            if list.iter().any(|s| s.is_empty() || s.len() > 1024) {
                return Err(invalid(f(k), "values must be 1-1024 bytes"));
            }
            Ok(())
        };
        self.validate_jwt_issuers(j)?;
        strings("audiences", &j.audiences)?;
        strings("algorithms", &j.algorithms)?;
        if let Some(a) = j
            .algorithms
            .iter()
            .find(|a| !JWT_ALGORITHMS.contains(&a.as_str()))
        {
            return Err(invalid(
                f("algorithms"),
                format!("{a:?} is not one of \"RS256\", \"ES256\", \"EdDSA\""),
            ));
        }
        for realm in j.realms() {
            let f = |k: &str| format!("{}.{k}", realm.field);
            if realm.jwks_file.is_none() && realm.jwks_url.is_none() {
                return Err(invalid(f("jwks_file"), "set jwks_file, jwks_url or both"));
            }
            if let Some(u) = realm.jwks_url {
                let uri: http::Uri = u
                    .parse()
                    .map_err(|e| invalid(f("jwks_url"), format!("not a URL: {e}")))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(invalid(
                        f("jwks_url"),
                        "only http:// URLs are supported (no TLS stack): use the IdP's \
                         in-cluster service address, or a jwks_file kept up to date",
                    ));
                }
            }
        }
        for (k, v, lo, hi) in [
            ("jwks_refresh_ms", j.jwks_refresh_ms, 1000, 86_400_000),
            ("jwks_min_refresh_ms", j.jwks_min_refresh_ms, 100, 3_600_000),
            ("jwks_timeout_ms", j.jwks_timeout_ms, 1, 60_000),
            ("jwks_max_bytes", j.jwks_max_bytes as u64, 1024, 16 << 20),
            ("leeway_secs", j.leeway_secs, 0, 3600),
            ("max_token_bytes", j.max_token_bytes as u64, 256, 65_536),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(invalid(f(k), format!("must be within {lo}..={hi}")));
            }
        }
        for (k, v) in [
            ("tenant_claim", Some(&j.tenant_claim)),
            ("tier_claim", j.tier_claim.as_ref()),
            ("scope_claim", j.scope_claim.as_ref()),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 256)
            {
                return Err(invalid(f(k), "must be 1-256 bytes"));
            }
        }
        if j.tier_claim.is_none() && (!j.tiers.is_empty() || j.default_tier.is_some()) {
            return Err(invalid(
                f("tier_claim"),
                "required when tiers are configured",
            ));
        }
        if j.tier_claim.is_some() && j.tiers.is_empty() {
            return Err(invalid(f("tiers"), "list at least one tier for tier_claim"));
        }
        if let Some(d) = &j.default_tier
            && !j.tiers.contains_key(d)
        {
            return Err(invalid(
                f("default_tier"),
                format!("{d:?} is not in auth.jwt.tiers"),
            ));
        }
        for (name, t) in &j.tiers {
            Scope::from_config(t)
                .map_err(|e| invalid(f(&format!("tiers.{name}.{}", e.field)), e.message))?;
        }
        crate::auth::scope::Routes::parse(&j.routes).map_err(|m| invalid(f("routes"), m))?;
        Ok(())
    }

    /// `auth.jwt.issuers`: `iss` strings (the top-level keys), or issuer tables, each with
    /// keys of its own and the configured tenants it may name.
    fn validate_jwt_issuers(&self, j: &JwtConfig) -> Result<(), ConfigError> {
        let value = |field: &str, v: &str, max: usize| -> Result<(), ConfigError> {
            if v.is_empty() || v.len() > max {
                return Err(invalid(field, format!("values must be 1-{max} bytes")));
            }
            Ok(())
        };
        if j.issuers.is_empty() || j.issuers.len() > 64 {
            return Err(invalid("auth.jwt.issuers", "list 1-64 values"));
        }
        let tables = j
            .issuers
            .iter()
            .filter(|i| matches!(i, JwtIssuer::Table(_)))
            .count();
        if tables == 0 {
            for i in &j.issuers {
                if let JwtIssuer::Name(n) = i {
                    value("auth.jwt.issuers", n, 1024)?;
                }
            }
            return Ok(());
        }
        if let Some(at) = j
            .issuers
            .iter()
            .position(|i| matches!(i, JwtIssuer::Name(_)))
        {
            return Err(invalid(
                format!("auth.jwt.issuers[{at}]"),
                "give every issuer as a [[auth.jwt.issuers]] table (issuer, jwks_file / \
                 jwks_url, tenants), or every one as a string, not both",
            ));
        }
        for (k, set) in [
            ("jwks_file", j.jwks_file.is_some()),
            ("jwks_url", j.jwks_url.is_some()),
        ] {
            if set {
                return Err(invalid(
                    format!("auth.jwt.{k}"),
                    "with [[auth.jwt.issuers]] tables each issuer names its own jwks_file \
                     and/or jwks_url",
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, entry) in j.issuers.iter().enumerate() {
            let JwtIssuer::Table(t) = entry else {
                continue;
            };
            let f = |k: &str| format!("auth.jwt.issuers[{i}].{k}");
            value(&f("issuer"), &t.issuer, 1024)?;
            if !seen.insert(t.issuer.as_str()) {
                return Err(invalid(
                    f("issuer"),
                    format!("{:?} is listed twice", t.issuer),
                ));
            }
            if t.tenants.is_empty() {
                return Err(invalid(
                    f("tenants"),
                    "list the tenants this issuer's tokens may name",
                ));
            }
            let mut listed = HashSet::new();
            for name in &t.tenants {
                if !self.tenants.contains_key(name) {
                    return Err(invalid(
                        f("tenants"),
                        format!("{name:?} is not a configured tenant ([tenants.{name}])"),
                    ));
                }
                if !listed.insert(name.as_str()) {
                    return Err(invalid(f("tenants"), format!("{name:?} is listed twice")));
                }
            }
            if let Some(typ) = &t.typ {
                value(&f("typ"), typ, 256)?;
            }
            if let Some(azp) = &t.allowed_azp {
                if azp.is_empty() || azp.len() > 64 {
                    return Err(invalid(f("allowed_azp"), "list 1-64 values"));
                }
                for a in azp {
                    value(&f("allowed_azp"), a, 1024)?;
                }
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let Some(r) = &l.redis else {
            if l.backend == LimitsBackend::Redis {
                return Err(invalid(
                    "limits.redis",
                    "required when limits.backend = \"redis\" (set url or urls)",
                ));
            }
            return Ok(());
        };
        match (&r.url, r.urls.is_empty()) {
            (None, true) => {
                return Err(invalid(
                    "limits.redis.url",
                    "set url (or urls for a cluster)",
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "limits.redis.urls",
                    "set either url (one server) or urls (a cluster), not both",
                ));
            }
            _ => {}
        }
        let check_url = |field: String, u: &str| -> Result<(), ConfigError> {
            let Some(rest) = u.strip_prefix("redis://") else {
                return Err(invalid(
                    field,
                    "must start with redis:// (TLS, rediss://, is not built in)",
                ));
            };
            if rest.is_empty() || rest.starts_with('/') {
                return Err(invalid(field, "missing host"));
            }
            Ok(())
        };
        if let Some(u) = &r.url {
            check_url("limits.redis.url".into(), u)?;
        }
        for (i, u) in r.urls.iter().enumerate() {
            check_url(format!("limits.redis.urls[{i}]"), u)?;
        }
        if r.connect_timeout_ms == 0 || r.connect_timeout_ms > 60_000 {
            return Err(invalid(
                "limits.redis.connect_timeout_ms",
                "must be within 1..=60000",
            ));
        }
        if r.command_timeout_ms == 0 || r.command_timeout_ms > 10_000 {
            return Err(invalid(
                "limits.redis.command_timeout_ms",
                "must be within 1..=10000",
            ));
        }
        if r.key_prefix.len() > 64
            || r.key_prefix
                .bytes()
                .any(|b| b == b'{' || b == b'}' || !b.is_ascii_graphic())
        {
            return Err(invalid(
                "limits.redis.key_prefix",
                "must be at most 64 visible ASCII characters without { or } (the tenant name is \
                 the keys' hash tag)",
            ));
        }
        if r.lease_tokens == 0 {
            return Err(invalid("limits.redis.lease_tokens", "must be > 0"));
        }
        if r.lease_requests == 0 {
            return Err(invalid("limits.redis.lease_requests", "must be > 0"));
        }
        if r.concurrency_lease_ms < 300 || r.concurrency_lease_ms > 3_600_000 {
            return Err(invalid(
                "limits.redis.concurrency_lease_ms",
                "must be within 300..=3600000",
            ));
        }
        if r.concurrency_lease_ms < 3 * r.command_timeout_ms {
            return Err(invalid(
                "limits.redis.concurrency_lease_ms",
                "must be >= 3 x limits.redis.command_timeout_ms (slots are renewed every third \
                 of the lease)",
            ));
        }
        if r.expected_replicas == 0 || r.expected_replicas > 10_000 {
            return Err(invalid(
                "limits.redis.expected_replicas",
                "must be within 1..=10000",
            ));
        }
        Ok(())
    }

    fn validate_audit(&self) -> Result<(), ConfigError> {
        let a = &self.audit;
        if a.max_file_bytes < AUDIT_MIN_FILE_BYTES {
            return Err(invalid(
                "audit.max_file_bytes",
                format!("must be >= {AUDIT_MIN_FILE_BYTES} (64 KiB)"),
            ));
        }
        if a.max_file_bytes > a.max_total_bytes {
            return Err(invalid(
                "audit.max_file_bytes",
                format!(
                    "must be <= audit.max_total_bytes ({} > {})",
                    a.max_file_bytes, a.max_total_bytes
                ),
            ));
        }
        if a.max_total_bytes / a.max_file_bytes > AUDIT_MAX_FILES {
            return Err(invalid(
                "audit.max_total_bytes",
                format!(
                    "must be <= {AUDIT_MAX_FILES} x audit.max_file_bytes (raise max_file_bytes)"
                ),
            ));
        }
        // Every stream (each tenant and `_unauthenticated`) keeps a current and a rotated file.
        let streams = self.tenants.len() as u64 + 1;
        let least = streams.saturating_mul(2 * AUDIT_MIN_FILE_BYTES);
        if a.max_total_bytes < least {
            return Err(invalid(
                "audit.max_total_bytes",
                format!(
                    "must be >= {least}: {streams} streams ({} tenants and _unauthenticated) \
                     x 128 KiB each",
                    self.tenants.len()
                ),
            ));
        }
        if a.unauthenticated_per_second == 0 || a.unauthenticated_per_second > 100_000 {
            return Err(invalid(
                "audit.unauthenticated_per_second",
                "must be within 1..=100000",
            ));
        }
        if a.unauthenticated_burst == 0 || a.unauthenticated_burst > 100_000 {
            return Err(invalid(
                "audit.unauthenticated_burst",
                "must be within 1..=100000",
            ));
        }
        Ok(())
    }
}

/// A tenant's body-field settings: extra fields outside the schema (never an engine field),
/// trusted engine fields (only those the schema lists as such), and a priority only where the
/// upstream reads one.
fn check_body_fields(
    f: &dyn Fn(&str) -> String,
    t: &super::TenantConfig,
    flavor: Flavor,
) -> Result<(), ConfigError> {
    use crate::proxy::schema::{Body, Class, Engine};
    let class_anywhere = |name: &str| Body::ALL.iter().find_map(|b| b.class(name));
    if t.extra_fields.len() > 256 {
        return Err(invalid(f("extra_fields"), "at most 256"));
    }
    for x in &t.extra_fields {
        if x.is_empty() || x.len() > 256 {
            return Err(invalid(f("extra_fields"), "entries must be 1-256 bytes"));
        }
        if let Some(Class::Engine(_)) = class_anywhere(x) {
            return Err(invalid(
                f("extra_fields"),
                format!(
                    "{x:?} is an engine-control field: list it in trusted_engine_fields if the \
                     tenant may steer the engine"
                ),
            ));
        }
    }
    for x in &t.trusted_engine_fields {
        if class_anywhere(x) != Some(Class::Engine(Engine::Trusted)) {
            return Err(invalid(
                f("trusted_engine_fields"),
                format!(
                    "{x:?} is not an engine field a tenant can be trusted with (see the field \
                     classes in sidecar/README.md)"
                ),
            ));
        }
    }
    if t.priority != 0 && flavor == Flavor::Openai {
        return Err(invalid(
            f("priority"),
            "needs upstream.flavor = \"vllm\" or \"sglang\" (an engine that reads `priority`)",
        ));
    }
    Ok(())
}
