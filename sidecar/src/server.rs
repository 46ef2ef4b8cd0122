//! Serving: the proxy listener (HTTP/1.1 and h2c), the admin listener, configuration reload
//! (SIGHUP or file change) and graceful shutdown.

use crate::config::{Config, ConfigError};
use crate::http_util::{ProxyBody, full};
use crate::limits::local::SharedClock;
use crate::record::audit::{AuditLimits, AuditLog};
use crate::record::metrics::ResultLabel;
use crate::registry::Metrics;
use crate::runtime::{App, ConnCtx};
use agent_common::ReloadResult;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Audit(#[from] crate::record::audit::AuditError),
    #[error("I/O error on {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How to run besides the configuration itself.
#[derive(Clone)]
pub struct Options {
    /// The file the configuration came from; enables reload on change and on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// How often to look at the file (and the key files) for changes.
    pub reload_poll: Duration,
    /// Reload on SIGHUP (the binary sets this; tests usually do not).
    pub sighup: bool,
    /// The limits' clock.
    pub clock: SharedClock,
    /// Key for the audit log's prompt hash; random per process when `None` and not configured.
    pub audit_key: Option<Vec<u8>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config_path: None,
            reload_poll: Duration::from_secs(2),
            sighup: false,
            clock: SharedClock::system(),
            audit_key: None,
        }
    }
}

/// Run with default options until `shutdown` resolves; then drain in-flight requests.
pub async fn run(
    listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SidecarError> {
    run_with(
        listener,
        admin_listener,
        config,
        Options::default(),
        shutdown,
    )
    .await
}

fn audit_key(config: &Config, opts: &Options) -> Result<Vec<u8>, SidecarError> {
    if let Some(k) = &opts.audit_key {
        return Ok(k.clone());
    }
    if let Some(p) = &config.audit.hash_key_file {
        return Ok(crate::config::read_key_file(p, "audit.hash_key_file")?);
    }
    use ring::rand::SecureRandom;
    let mut k = vec![0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut k)
        .expect("system RNG available");
    tracing::info!("no audit.hash_key_file: prompt hashes use a per-process random key");
    Ok(k)
}

/// Run until `shutdown` resolves; then stop accepting, drain (at most `http.drain_timeout_ms`).
pub async fn run_with(
    listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SidecarError> {
    config.validate()?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let key = audit_key(&config, &opts)?;
    let (audit, audit_thread) = match &config.audit.dir {
        Some(dir) => {
            let (a, t) = AuditLog::start(
                dir.clone(),
                &key,
                AuditLimits::from(&config.audit),
                config.tenants.keys().cloned(),
                metrics.audit.dropped.clone(),
            )?;
            (a, Some(t))
        }
        None => (AuditLog::disabled(&key), None),
    };
    let http_limits = config.http.clone();
    let app = App::new(config, metrics.clone(), audit, opts.clock.clone())?;
    if let Some(shared) = &app.shared
        && !shared.wait_connected().await
    {
        tracing::warn!(
            "limits backend (Redis) not reachable at start: decisions follow \
             limits.redis.on_backend_failure until it answers"
        );
    }
    let registry = Arc::new(registry);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let admin = tokio::spawn(serve_admin(
        admin_listener,
        app.clone(),
        registry.clone(),
        stop_rx.clone(),
    ));
    // The fingerprint of the files as loaded, taken before anything can change them.
    let loaded = opts.config_path.as_deref().and_then(fingerprint);
    // Listen for SIGHUP before serving, so a signal never finds the default action.
    let hup = if opts.sighup && opts.config_path.is_some() {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        }
    } else {
        None
    };
    // Spans and GenAI metrics over OTLP: one background task; a last export at shutdown.
    let exporter = app.tracer.as_ref().map(|t| {
        tokio::spawn(t.exporter(
            app.metrics.genai.clone(),
            app.metrics.telemetry.clone(),
            stop_rx.clone(),
        ))
    });
    let kv_reporter = tokio::spawn(crate::node::kv::report_loop(
        app.metrics.kv.clone(),
        app.metrics.tokens.clone(),
        app.kv_settings(),
        stop_rx.clone(),
    ));
    let reloader = tokio::spawn(reload_loop(
        app.clone(),
        opts.clone(),
        loaded,
        hup,
        stop_rx.clone(),
    ));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http_limits.header_read_timeout_ms))
        .max_buf_size(http_limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http_limits.max_concurrent_streams)
        .max_header_list_size(http_limits.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let timeouts = ConnTimeouts {
        first_request: Duration::from_millis(http_limits.header_read_timeout_ms),
        idle: Duration::from_millis(http_limits.idle_timeout_ms),
    };
    // Connections beyond `http.max_connections` are accepted and closed at once (counted), so
    // a flood of idle connections cannot exhaust file descriptors or memory; and a connection
    // that starts no request in time, or stays idle, is closed (see `serve_client`).
    let max_conns = u32::try_from(http_limits.max_connections).unwrap_or(u32::MAX);
    let connections = Arc::new(tokio::sync::Semaphore::new(max_conns as usize));
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            app.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let fd = if app.tagger.enabled() {
            stream.as_fd().try_clone_to_owned().ok()
        } else {
            None
        };
        let conn = Arc::new(ConnCtx {
            peer,
            fd,
            tag: tokio::sync::Mutex::new(None),
        });
        let open = app.metrics.client_connections.clone();
        open.inc();
        tokio::spawn(serve_client(
            builder.clone(),
            stream,
            app.clone(),
            conn,
            timeouts,
            drain_rx.clone(),
            OpenConn {
                gauge: open,
                _slot: slot,
            },
        ));
    }
    tracing::info!("shutting down: draining in-flight requests");
    drop(listener);
    app.ready.store(false, Ordering::SeqCst);
    let _ = drain_tx.send(true);
    let drain = Duration::from_millis(http_limits.drain_timeout_ms);
    // Every connection task holds a permit until it ends.
    if tokio::time::timeout(drain, connections.acquire_many(max_conns))
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing remaining connections");
    }
    let _ = stop_tx.send(true);
    let _ = admin.await;
    let _ = reloader.await;
    let _ = kv_reporter.await;
    if let Some(e) = exporter {
        let _ = e.await;
    }
    // Let the audit writer write what is buffered (it ends once the last handle is gone).
    drop(app);
    if let Some(t) = audit_thread {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !t.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct ConnTimeouts {
    /// A new connection must start its first request within this long.
    first_request: Duration,
    /// Closed (gracefully) after this long without a new request and none in progress.
    idle: Duration,
}

/// Requests of one connection: how many are being handled, and when the last one started or
/// ended (milliseconds since the connection was accepted).
#[derive(Default)]
struct Activity {
    active: std::sync::atomic::AtomicUsize,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn touch(&self, since: tokio::time::Instant) {
        self.last_ms
            .store(since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Marks a request of the connection done when dropped.
struct Done {
    act: Arc<Activity>,
    since: tokio::time::Instant,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.act.active.fetch_sub(1, Ordering::Relaxed);
        self.act.touch(self.since);
    }
}

/// A response body that keeps its request counted as in progress until it ends.
struct Tracked {
    body: ProxyBody,
    _done: Done,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = crate::http_util::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts the connection open until dropped, and holds its slot under `http.max_connections`.
struct OpenConn {
    gauge: prometheus_client::metrics::gauge::Gauge,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serve one client connection until it ends. A connection that starts no request within
/// `first_request` (silence, or a partial HTTP/2 preface) or that then stays idle for `idle`
/// is shut down gracefully (HTTP/2: GOAWAY, in-flight streams finish), so connections cannot
/// be held open by clients that send nothing; so is every connection when the server drains.
async fn serve_client(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: tokio::net::TcpStream,
    app: Arc<App>,
    conn: Arc<ConnCtx>,
    timeouts: ConnTimeouts,
    mut drain: tokio::sync::watch::Receiver<bool>,
    _open: OpenConn,
) {
    let since = tokio::time::Instant::now();
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let conn = conn.clone();
        act.active.fetch_add(1, Ordering::Relaxed);
        act.touch(since);
        // In progress until its response body is done (or the request is dropped).
        let done = Done {
            act: act.clone(),
            since,
        };
        async move {
            let resp = crate::proxy::handle(app, conn, req).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked { body, _done: done }))
        }
    });
    let c = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(c);
    let mut shutting = false;
    // A connection shut for idleness gets this long to close before it is dropped (a client
    // may never answer HTTP/2's shutdown PING); nothing is in progress on it by then.
    let mut hard_stop: Option<tokio::time::Instant> = None;
    loop {
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let wait = if last.is_zero() {
            timeouts.first_request
        } else {
            timeouts.idle
        };
        let idle_at = since + last + wait;
        tokio::select! {
            r = c.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = drain.wait_for(|d| *d), if !shutting => {
                c.as_mut().graceful_shutdown();
                shutting = true;
            }
            _ = tokio::time::sleep_until(idle_at), if !shutting => {
                let now_last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
                if activity.active.load(Ordering::Relaxed) == 0 && now_last == last {
                    c.as_mut().graceful_shutdown();
                    shutting = true;
                    hard_stop = Some(tokio::time::Instant::now() + timeouts.first_request);
                }
            }
            _ = async { tokio::time::sleep_until(hard_stop.unwrap_or(idle_at)).await }, if hard_stop.is_some() => {
                if activity.active.load(Ordering::Relaxed) == 0 {
                    return;
                }
                hard_stop = None;
            }
        }
    }
}

async fn serve_admin(
    listener: TcpListener,
    app: Arc<App>,
    registry: Arc<Registry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let app = app.clone();
        let registry = registry.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let r = admin_response(&app, &registry, req.uri().path());
            async move { Ok::<_, std::convert::Infallible>(r) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let fut = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = fut.await;
        });
    }
    // Close keep-alive scrapers too, so nothing outlives the server.
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

fn admin_response(app: &App, registry: &Registry, path: &str) -> Response<ProxyBody> {
    let (status, body, ctype) = match path {
        "/metrics" => (
            StatusCode::OK,
            crate::record::metrics::encode(registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" | "/live" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" | "/ready" => {
            if app.ready.load(Ordering::SeqCst) {
                (StatusCode::OK, "ready\n".to_string(), "text/plain")
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "draining\n".to_string(),
                    "text/plain",
                )
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found\n".to_string(),
            "text/plain",
        ),
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

/// A fingerprint of the config file and every key file it names (HMAC secrets, the salt key
/// and each issuer's JWKS file): a changed JWKS file reloads the configuration like any key file.
fn fingerprint(path: &std::path::Path) -> Option<Vec<u8>> {
    let text = std::fs::read(path).ok()?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&text);
    if let Ok(cfg) = toml::from_str::<Config>(&String::from_utf8_lossy(&text)) {
        let files = cfg.keys.iter().flat_map(|k| k.secret_files.iter());
        let jwks: Vec<PathBuf> = cfg
            .auth
            .jwt
            .as_ref()
            .map(|j| {
                j.realms()
                    .iter()
                    .filter_map(|r| r.jwks_file.cloned())
                    .collect()
            })
            .unwrap_or_default();
        for f in files.chain(cfg.cache.salt_key_file.iter()).chain(&jwks) {
            ctx.update(f.as_os_str().as_encoded_bytes());
            ctx.update(&std::fs::read(f).unwrap_or_default());
        }
    }
    Some(ctx.finish().as_ref().to_vec())
}

fn try_reload(app: &App, metrics: &Metrics, path: &std::path::Path) {
    let res = Config::from_file(path).and_then(|c| app.reload(c));
    let result = if res.is_ok() {
        ReloadResult::Ok
    } else {
        ReloadResult::Invalid
    };
    metrics
        .config_reloads
        .get_or_create(&ResultLabel {
            result: result.as_str(),
        })
        .inc();
    match res {
        Ok(()) => {
            let config = app.runtime().config.clone();
            // New or removed tenants get (or give up) their own audit stream and share.
            app.audit.update(
                AuditLimits::from(&config.audit),
                config.tenants.keys().cloned(),
            );
            tracing::info!(path = %path.display(), "configuration reloaded");
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "configuration reload rejected; keeping the previous configuration");
        }
    }
}

async fn reload_loop(
    app: Arc<App>,
    opts: Options,
    mut last: Option<Vec<u8>>,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(path) = opts.config_path.clone() else {
        return;
    };
    let metrics = app.metrics.clone();
    // The files as loaded are the baseline: the first look is one interval from now.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + opts.reload_poll,
        opts.reload_poll,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A change is applied once the files look the same on two looks in a row, so a file
    // caught half-written (which might even parse) is never applied.
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let forced = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => false,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let fp = fingerprint(&path);
        if forced {
            last = fp;
            pending = None;
            try_reload(&app, &metrics, &path);
            continue;
        }
        if fp.is_none() || fp == last {
            pending = None;
            continue;
        }
        if pending != fp {
            pending = fp;
            continue;
        }
        last = pending.take();
        try_reload(&app, &metrics, &path);
    }
}
