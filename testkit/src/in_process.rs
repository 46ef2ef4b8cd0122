//! The sidecar in the test's own runtime (`bulkhead_sidecar::run_with` on two listeners of
//! 127.0.0.1:0), for tests that reach into it (options, reload polling, the task's result).

use std::net::SocketAddr;
use std::time::Duration;

/// A sidecar serving in this process until [`InProcess::shutdown`].
pub struct InProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), bulkhead_sidecar::SidecarError>>>,
}

impl InProcess {
    /// Parse `config` (panics with the text when it is refused), start the sidecar on it with
    /// `opts`, and return once `/readyz` answers 200 (10 s at most).
    pub async fn start(config: &str, opts: bulkhead_sidecar::Options) -> InProcess {
        let config = bulkhead_sidecar::Config::from_toml(config)
            .unwrap_or_else(|e| panic!("sidecar config: {e}\n{config}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin_l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(bulkhead_sidecar::run_with(
            listener,
            admin_l,
            config,
            opts,
            async move {
                let _ = rx.await;
            },
        ));
        crate::http::wait_ready(admin, Duration::from_secs(10), || None).await;
        InProcess {
            addr,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Start draining (without waiting for the end).
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Drain and wait for the end: panics unless the sidecar ended without an error.
    pub async fn shutdown(&mut self) {
        self.trigger_shutdown();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// Drain and wait for the end, whatever it returned.
    pub async fn stop(&mut self) {
        self.trigger_shutdown();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
