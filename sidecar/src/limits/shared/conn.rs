//! The connection to Redis (one server through a `ConnectionManager`, or a Cluster), every
//! command bounded by `command_timeout_ms`, and the backend's health: the first failure marks
//! it down (one log line, the gauge to 0) and starts a probe that, once Redis answers again,
//! connects afresh and marks it up (one more line).

use crate::config::RedisLimitsConfig;
use crate::limits::metrics::{BackendFault, Metrics};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisResult, ScriptInvocation};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    async fn ping(&self) -> RedisResult<()> {
        let cmd = redis::cmd("PING");
        match self {
            Conn::Single(c) => cmd.query_async::<()>(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async::<()>(&mut c.clone()).await,
        }
    }

    /// A `url` (one server) that is in fact a Cluster node: its keys would be redirected to
    /// other nodes and a script across hash tags refused, so it is never used.
    async fn single_is_cluster_node(&self) -> bool {
        let Conn::Single(c) = self else {
            return false;
        };
        redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut c.clone())
            .await
            .is_ok_and(|info| info.contains("cluster_enabled:1"))
    }
}

pub(super) struct Backend {
    url: Option<String>,
    urls: Vec<String>,
    connect_timeout: Duration,
    command_timeout: Duration,
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    probing: AtomicBool,
    /// The misconfiguration of a Cluster node given as `url` was logged.
    told_cluster: AtomicBool,
    /// Woken when the backend comes up.
    connected: tokio::sync::Notify,
    metrics: Metrics,
}

impl Backend {
    /// Starts down, with a probe connecting in the background: the first admissions go to the
    /// fallback until Redis has answered once (a start never waits on Redis).
    pub(super) fn start(cfg: &RedisLimitsConfig, metrics: Metrics) -> Arc<Backend> {
        metrics.backend_up.set(0);
        let b = Arc::new(Backend {
            url: cfg.url.clone(),
            urls: cfg.urls.clone(),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            command_timeout: Duration::from_millis(cfg.command_timeout_ms),
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            probing: AtomicBool::new(true),
            told_cluster: AtomicBool::new(false),
            connected: tokio::sync::Notify::new(),
            metrics,
        });
        tokio::spawn(probe(Arc::downgrade(&b), None));
        b
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Wait until the backend is up, at most `within`; whether it is.
    pub(super) async fn wait_up(&self, within: Duration) -> bool {
        let wait = async {
            loop {
                let woken = self.connected.notified();
                if self.is_up() {
                    return;
                }
                woken.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }

    /// Run a script within the command timeout; `None` (and the backend marked down) when it
    /// failed or took too long.
    pub(super) async fn invoke<T: FromRedisValue>(
        self: &Arc<Self>,
        inv: &ScriptInvocation<'_>,
    ) -> Option<T> {
        let conn = self
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        match tokio::time::timeout(self.command_timeout, conn.invoke(inv)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(BackendFault::Error, &e.to_string());
                None
            }
            Err(_) => {
                self.failed(
                    BackendFault::Timeout,
                    "no answer within limits.redis.command_timeout_ms",
                );
                None
            }
        }
    }

    fn failed(self: &Arc<Self>, kind: BackendFault, why: &str) {
        self.metrics.backend_error(kind);
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.backend_up.set(0);
            tracing::warn!(
                error = %why,
                "limits backend (Redis) unavailable: decisions follow \
                 limits.redis.on_backend_failure until it answers again"
            );
        }
        if !self.probing.swap(true, Ordering::AcqRel) {
            tokio::spawn(probe(Arc::downgrade(self), Some(Instant::now())));
        }
    }

    async fn connect(&self) -> RedisResult<Conn> {
        match &self.url {
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let m = ConnectionManager::new_with_config(client, cfg).await?;
                Ok(Conn::Single(m))
            }
            None => {
                let client = redis::cluster::ClusterClient::builder(self.urls.clone())
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.command_timeout)
                    .retries(1)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// Until Redis answers: connect afresh (within the connect timeout) and PING, with a backoff
/// from 50 ms to 1 s; then swap the new connection in and mark the backend up.
async fn probe(b: std::sync::Weak<Backend>, down_since: Option<Instant>) {
    let mut wait = Duration::from_millis(50);
    loop {
        let Some(backend) = b.upgrade() else { return };
        let attempt = async {
            let c = backend.connect().await?;
            c.ping().await?;
            let cluster = c.single_is_cluster_node().await;
            Ok::<_, redis::RedisError>((c, cluster))
        };
        let limit = backend.connect_timeout + backend.command_timeout;
        let answer = tokio::time::timeout(limit, attempt).await;
        if let Ok(Ok((_, true))) = &answer
            && !backend.told_cluster.swap(true, Ordering::AcqRel)
        {
            tracing::error!(
                "limits.redis.url names a Redis Cluster node: list the cluster's nodes in \
                 limits.redis.urls instead; the limits backend stays down until then"
            );
        }
        if let Ok(Ok((c, false))) = answer {
            *backend.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
            backend.probing.store(false, Ordering::Release);
            backend.up.store(true, Ordering::Release);
            backend.metrics.backend_up.set(1);
            backend.connected.notify_waiters();
            match down_since {
                Some(t) => tracing::warn!(
                    down_ms = t.elapsed().as_millis() as u64,
                    "limits backend (Redis) answers again: shared limits enforced"
                ),
                None => tracing::info!("limits backend (Redis) connected"),
            }
            return;
        }
        drop(backend);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}
