//! Long-lived state: [`App`] (per process) and [`Runtime`] (per configuration generation), with
//! one [`TenantRuntime`] per configured tenant holding everything a request of that tenant
//! needs (limits, upstream pool, metric handles, salt, policy), looked up once after
//! authentication.

use crate::auth::jwt::{IssuerKeys, JwtVerifier, UrlKeys, UrlSettings};
use crate::auth::scope::Routes;
use crate::auth::signature::{ReplayCache, Verifier};
use crate::cache::{CacheGate, GateSettings, derive_salt};
use crate::config::{Config, ConfigError, Isolation, TenantConfig, UnknownRoutes};
use crate::limits::local::{LimitNumbers, SharedClock, TenantLimits};
use crate::limits::shared::{SharedLimits, SharedTenant};
use crate::limits::wfq::Scheduler;
use crate::node::kv::KvSettings;
use crate::node::tagging::Tagger;
use crate::proxy::upstream::{UpstreamClient, upstream_client};
use crate::record::audit::AuditLog;
use crate::registry::{Metrics, TenantMetrics};
use http::Uri;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Everything a request of one tenant needs, built once per configuration.
pub struct TenantRuntime {
    pub name: Arc<str>,
    pub limits: Arc<TenantLimits>,
    /// The limits shared by all replicas (`limits.backend = "redis"`); `limits` is then unused
    /// but for its numbers.
    pub shared: Option<Arc<SharedTenant>>,
    pub client: UpstreamClient,
    pub metrics: Arc<TenantMetrics>,
    /// The `cache_salt` of a `salted` tenant (secret: never log).
    pub salt: Option<Arc<str>>,
    pub isolation: Isolation,
    pub unknown_routes: UnknownRoutes,
    pub default_max_tokens: u64,
    pub weight: u32,
    /// `extra_fields`, `priority`, `trusted_engine_fields`, `store_responses`.
    pub extra_fields: Vec<String>,
    pub priority: i64,
    pub trusted_engine_fields: Vec<String>,
    pub store_responses: bool,
    /// `trust_traceparent`: a client's trace context is continued.
    pub trust_traceparent: bool,
    /// The tenant's prices (`[cost]`), with their counters.
    pub cost: crate::record::cost::TenantCost,
}

impl std::fmt::Debug for TenantRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRuntime")
            .field("name", &self.name)
            .field("isolation", &self.isolation)
            .finish_non_exhaustive()
    }
}

/// Everything derived from one configuration; replaced as a whole on reload.
pub struct Runtime {
    pub config: Arc<Config>,
    pub verifier: Verifier,
    pub tenants: HashMap<String, Arc<TenantRuntime>>,
    pub upstream: Uri,
    /// KV-cache bytes per token from `[model]`; 0 when not configured.
    pub kv_bytes_per_token: u64,
    /// Canaries, keywords and injection markers, compiled.
    pub leaks: Arc<crate::record::leaks::LeakPatterns>,
    /// Tenants whose audit records are sealed, with their keys.
    pub audit_seals: crate::record::audit::Seals,
    /// `[auth.jwt]`, when configured.
    pub jwt: Option<JwtVerifier>,
    /// Routes that accept an RFC 9421 signature (`auth.hmac_routes`).
    pub hmac_routes: Routes,
}

impl Runtime {
    pub fn tenant(&self, name: &str) -> Option<&Arc<TenantRuntime>> {
        self.tenants.get(name)
    }

    /// The cache-gate settings this configuration asks for.
    pub fn gate_settings(&self) -> GateSettings {
        let c = &self.config.cache;
        GateSettings {
            exclusive: self
                .config
                .tenants
                .iter()
                .filter(|(_, t)| t.isolation == Isolation::Exclusive)
                .map(|(k, _)| k.clone())
                .collect(),
            window: Duration::from_millis(c.exclusive_window_ms),
            window_max_requests: c.exclusive_window_max_requests,
            flavor: self.config.upstream.flavor,
            upstream: self.upstream.clone(),
            flush_attempts: c.flush_attempts,
            flush_retry: Duration::from_millis(c.flush_retry_ms),
            flush_timeout: Duration::from_millis(c.flush_timeout_ms),
            on_failure: c.on_flush_failure,
            drain_timeout: Duration::from_millis(c.exclusive_drain_timeout_ms),
            flush_proves_idle: c.flush_refused_while_busy,
            max_inflight: self.config.queue.max_inflight,
        }
    }

    fn kv_settings(&self) -> KvSettings {
        let c = &self.config;
        KvSettings {
            socket: c.agent.socket.clone(),
            interval: Duration::from_millis(c.agent.kv_report_interval_ms),
            has_model: c.model.is_some(),
            tenants: c.tenants.keys().cloned().collect(),
            input_cost: c.queue.input_token_cost,
            output_cost: c.queue.output_token_cost,
        }
    }
}

/// Per-process state shared by all connections.
pub struct App {
    runtime: RwLock<Arc<Runtime>>,
    pub sched: Arc<Scheduler>,
    pub gate: Arc<CacheGate>,
    pub metrics: Metrics,
    pub audit: AuditLog,
    pub tagger: Arc<Tagger>,
    /// Request-body bytes that may be held in memory at once (`http.max_inflight_body_bytes`).
    pub body_budget: Arc<Semaphore>,
    kv_settings: tokio::sync::watch::Sender<KvSettings>,
    clock: SharedClock,
    replay: Arc<Mutex<ReplayCache>>,
    /// The shared limits backend and replay cache (`limits.backend = "redis"`).
    pub shared: Option<Arc<SharedLimits>>,
    ids: RequestIds,
    /// Which tenant each stored Responses API answer belongs to.
    pub responses: crate::proxy::responses::ResponseOwners,
    pub ready: AtomicBool,
    /// `[telemetry.otlp]`: spans for the requests (read at start only).
    pub tracer: Option<Arc<crate::telemetry::Tracer>>,
    /// When each (owner, seen by) pair last wrote a leak record to the owner's audit.
    leak_records: Mutex<HashMap<(String, String, &'static str), std::time::Instant>>,
}

/// The shortest interval between two leak records one tenant's traffic writes into another
/// tenant's audit (the metric counts every hit): another tenant cannot flood the owner's audit
/// stream and rotate its own records out.
pub const LEAK_RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// Per client connection.
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// A duplicate of the client socket, kept only when tagging is on.
    pub fd: Option<OwnedFd>,
    /// The tenant the socket is tagged with now, and its slot under the per-tenant cap.
    pub tag: tokio::sync::Mutex<Option<crate::node::tagging::TagSlot>>,
}

/// Unpredictable request ids: a keyed 128-bit hash of a counter (two SipHash keys drawn at
/// start), so ids are unique per process and cannot be guessed or chosen by a client.
struct RequestIds {
    keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    seq: AtomicU64,
}

impl RequestIds {
    fn next(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let a = self.keys.0.hash_one(n);
        let b = self.keys.1.hash_one(n);
        format!("{a:016x}{b:016x}")
    }
}

impl App {
    pub fn new(
        config: Config,
        metrics: Metrics,
        audit: AuditLog,
        clock: SharedClock,
    ) -> Result<Arc<App>, ConfigError> {
        if config.agent.max_tagged_connections_per_tenant.is_some() {
            tracing::warn!(
                "agent.max_tagged_connections_per_tenant is deprecated and ignored: every client \
                 connection is tagged (the agent keeps tags in socket storage, which nothing \
                 evicts); remove it from the configuration"
            );
        }
        let tagger = Arc::new(Tagger::new(
            config.agent.socket.clone(),
            metrics.tagging.available.clone(),
        ));
        let replay = Arc::new(Mutex::new(ReplayCache::new(
            config.auth.replay_cache_capacity,
        )));
        metrics.cost.set_gpu_hour_price(&config.cost);
        let gauges = metrics.queue.clone();
        let sched = Scheduler::new(
            config.queue.max_inflight,
            config.queue.max_queue_per_tenant,
            queue_costs(&config),
            queue_tenants(&config),
            move |t| gauges.gauges(t),
        );
        let body_budget = Arc::new(Semaphore::new(config.http.max_inflight_body_bytes));
        let tracer = config
            .telemetry
            .otlp
            .as_ref()
            .map(|o| crate::telemetry::Tracer::new(o, metrics.telemetry.clone()));
        let shared = match (&config.limits.backend, &config.limits.redis) {
            (crate::config::LimitsBackend::Redis, Some(r)) => Some(SharedLimits::start(
                r.clone(),
                metrics.limits.clone(),
                clock.clone(),
            )),
            _ => None,
        };
        let runtime = build_runtime(
            config,
            None,
            &replay,
            shared.as_ref(),
            &tagger,
            &clock,
            &metrics,
        )?;
        audit.set_seals(runtime.audit_seals.clone());
        let gate = CacheGate::new(runtime.gate_settings(), metrics.cache.clone());
        let (kv_settings, _) = tokio::sync::watch::channel(runtime.kv_settings());
        Ok(Arc::new(App {
            runtime: RwLock::new(Arc::new(runtime)),
            sched,
            gate,
            metrics,
            audit,
            tagger,
            body_budget,
            kv_settings,
            clock,
            replay,
            shared,
            ids: RequestIds {
                keys: Default::default(),
                seq: AtomicU64::new(0),
            },
            responses: Default::default(),
            ready: AtomicBool::new(true),
            tracer,
            leak_records: Mutex::new(HashMap::new()),
        }))
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The KV report loop's inputs, updated on reload.
    pub fn kv_settings(&self) -> tokio::sync::watch::Receiver<KvSettings> {
        self.kv_settings.subscribe()
    }

    /// May `seen_by`'s traffic write a `kind` leak record into `owner`'s audit now (at most one
    /// per [`LEAK_RECORD_INTERVAL`] per owner, tenant and kind)?
    pub fn leak_record_allowed(&self, owner: &str, seen_by: &str, kind: &'static str) -> bool {
        let now = std::time::Instant::now();
        let mut m = self.leak_records.lock().unwrap_or_else(|e| e.into_inner());
        let key = (owner.to_string(), seen_by.to_string(), kind);
        match m.get(&key) {
            Some(last) if now.duration_since(*last) < LEAK_RECORD_INTERVAL => false,
            _ => {
                m.insert(key, now);
                true
            }
        }
    }

    /// A fresh request id (the one the upstream and the audit log see).
    pub fn request_id(&self) -> String {
        self.ids.next()
    }

    /// Apply a new (validated) configuration completely or not at all.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        let old = self.runtime();
        // Restart-only fields keep their running values, in the stored configuration too;
        // what the new file says must still agree with them.
        let (config, kept) = crate::config::keep_restart_only(&old.config, config);
        config.validate()?;
        let rt = build_runtime(
            config,
            Some(&old),
            &self.replay,
            self.shared.as_ref(),
            &self.tagger,
            &self.clock,
            &self.metrics,
        )?;
        for field in kept {
            tracing::warn!(
                field,
                "changing this field takes a restart; keeping the running value"
            );
        }
        let c = rt.config.clone();
        self.audit.set_seals(rt.audit_seals.clone());
        self.gate.update(rt.gate_settings());
        let _ = self.kv_settings.send(rt.kv_settings());
        self.metrics.cost.set_gpu_hour_price(&c.cost);
        *self.runtime.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rt);
        self.sched.update(
            c.queue.max_inflight,
            c.queue.max_queue_per_tenant,
            queue_costs(&c),
            queue_tenants(&c),
        );
        Ok(())
    }
}

fn queue_costs(c: &Config) -> crate::limits::wfq::Costs {
    crate::limits::wfq::Costs {
        fairness: c.queue.fairness,
        input: c.queue.input_token_cost,
        output: c.queue.output_token_cost,
    }
}

fn queue_tenants(
    c: &Config,
) -> impl Iterator<Item = (String, crate::limits::wfq::TenantSettings)> + '_ {
    c.tenants.iter().map(|(k, v)| {
        (
            k.clone(),
            crate::limits::wfq::TenantSettings {
                weight: v.weight,
                max_kv_tokens: v.max_kv_tokens,
            },
        )
    })
}

fn build_runtime(
    config: Config,
    prev: Option<&Runtime>,
    replay: &Arc<Mutex<ReplayCache>>,
    shared: Option<&Arc<SharedLimits>>,
    tagger: &Arc<Tagger>,
    clock: &SharedClock,
    metrics: &Metrics,
) -> Result<Runtime, ConfigError> {
    let keys = config.load_keys()?;
    let salt_key = config.load_salt_key()?;
    let kv_bytes_per_token = config
        .model
        .as_ref()
        .map_or(0, crate::config::ModelConfig::kv_bytes_per_token);
    let verifier = Verifier::new(
        config.auth.label.clone(),
        keys,
        config.auth.max_skew_secs,
        replay.clone(),
    );
    let jwt = match &config.auth.jwt {
        Some(j) => {
            let files = crate::auth::jwt::load_jwks_files(&config)?;
            let mut keys = Vec::new();
            for (realm, file) in j.realms().iter().zip(files) {
                let url = match realm.jwks_url {
                    Some(u) => {
                        let settings = UrlSettings {
                            url: u.parse().map_err(|_| ConfigError::Invalid {
                                field: format!("{}.jwks_url", realm.field),
                                message: "not a URL".into(),
                            })?,
                            refresh: Duration::from_millis(j.jwks_refresh_ms),
                            min_refresh: Duration::from_millis(j.jwks_min_refresh_ms),
                            timeout: Duration::from_millis(j.jwks_timeout_ms),
                            max_bytes: j.jwks_max_bytes,
                        };
                        // The same URL settings keep the keys fetched so far (and their task).
                        let kept = prev
                            .and_then(|p| p.jwt.as_ref())
                            .and_then(|v| v.url_keys().find(|k| *k.settings() == settings))
                            .cloned();
                        Some(kept.unwrap_or_else(|| {
                            UrlKeys::start(settings, metrics.auth.jwks_refreshes.clone())
                        }))
                    }
                    None => None,
                };
                keys.push(IssuerKeys { file, url });
            }
            Some(JwtVerifier::new(j, keys)?)
        }
        None => None,
    };
    let hmac_routes =
        Routes::parse(&config.auth.hmac_routes).map_err(|m| ConfigError::Invalid {
            field: "auth.hmac_routes".into(),
            message: m,
        })?;
    let upstream: Uri = config
        .upstream
        .url
        .parse()
        .map_err(|_| ConfigError::Invalid {
            field: "upstream.url".into(),
            message: "not a URL".into(),
        })?;
    let same_upstream = prev.is_some_and(|p| p.config.upstream == config.upstream);
    let mut tenants = HashMap::new();
    for (name, t) in &config.tenants {
        let prev_tenant = prev.and_then(|p| p.tenants.get(name));
        let salt = match t.isolation {
            Isolation::Salted => {
                let key = salt_key.as_deref().ok_or_else(|| ConfigError::Invalid {
                    field: "cache.salt_key_file".into(),
                    message: format!("required: tenants.{name}.isolation is \"salted\""),
                })?;
                Some(Arc::from(
                    derive_salt(key, config.cache.salt_generation, name).as_str(),
                ))
            }
            _ => None,
        };
        tenants.insert(
            name.clone(),
            Arc::new(tenant_runtime(
                name,
                t,
                salt,
                prev_tenant.map(|p| &**p),
                same_upstream,
                &config,
                shared,
                tagger,
                clock,
                metrics,
            )),
        );
    }
    let leaks = Arc::new(crate::record::leaks::LeakPatterns::new(&config));
    let audit_seals = Arc::new(config.load_audit_seals()?);
    Ok(Runtime {
        config: Arc::new(config),
        verifier,
        tenants,
        upstream,
        kv_bytes_per_token,
        leaks,
        audit_seals,
        jwt,
        hmac_routes,
    })
}

#[allow(clippy::too_many_arguments)]
fn tenant_runtime(
    name: &str,
    t: &TenantConfig,
    salt: Option<Arc<str>>,
    prev: Option<&TenantRuntime>,
    same_upstream: bool,
    config: &Config,
    shared: Option<&Arc<SharedLimits>>,
    tagger: &Arc<Tagger>,
    clock: &SharedClock,
    metrics: &Metrics,
) -> TenantRuntime {
    metrics.init_tenant(name);
    // A limiter is kept (with its buckets) unless its own numbers changed.
    let numbers = LimitNumbers::of(t);
    let limits = match prev {
        Some(p) if *p.limits.numbers() == numbers => p.limits.clone(),
        _ => Arc::new(TenantLimits::new(numbers, clock.clone())),
    };
    // The shared state lives in Redis; what a replica holds (its lease, its fallback's
    // buckets) is kept unless the numbers changed.
    let shared = shared.map(|s| match prev.and_then(|p| p.shared.as_ref()) {
        Some(p) if *p.numbers() == numbers => p.clone(),
        _ => s.tenant(name, numbers),
    });
    let client = match prev {
        Some(p) if same_upstream => p.client.clone(),
        _ => upstream_client(&config.upstream, name, tagger.clone()),
    };
    TenantRuntime {
        name: Arc::from(name),
        limits,
        shared,
        client,
        metrics: Arc::new(metrics.tenant(name)),
        salt,
        isolation: t.isolation,
        unknown_routes: t.unknown_routes,
        default_max_tokens: t.default_max_tokens,
        weight: t.weight,
        extra_fields: t.extra_fields.clone(),
        priority: t.priority,
        trusted_engine_fields: t.trusted_engine_fields.clone(),
        store_responses: t.store_responses,
        trust_traceparent: t.trust_traceparent,
        cost: crate::record::cost::TenantCost::new(&config.cost, name, &metrics.cost),
    }
}
