//! The tagging API server: one JSON request per SOCK_SEQPACKET message, the socket to act on
//! attached with SCM_RIGHTS (see `agent_common::proto`). The tag is written through the
//! received descriptor itself (socket storage is keyed by descriptor), so a caller can only tag
//! sockets it holds, and the caller's credentials (SO_PEERCRED) are checked against the
//! configured allow rule on every request, before it is parsed. KV reports are passed on to
//! the GPU module (`GpuState::kv_report`).

use crate::config::TaggingConfig;
use crate::datapath::Maps;
use crate::metrics::AgentMetrics;
use crate::sys::{SocketKind, inspect_socket};
use crate::tenants::TenantRegistry;
use agent_common::proto::{ErrorCode, MAX_MESSAGE_LEN, Request, Response};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr, UnixCredentials, bind,
    getsockopt, listen, send, socket, sockopt,
};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio::io::Interest;

#[derive(Debug, thiserror::Error)]
pub enum TaggingError {
    #[error("tagging socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "tagging socket {path} is in use by a running agent; stop it or set tagging.socket_path"
    )]
    InUse { path: PathBuf },
}

/// What a request handler needs; shared by all connections.
pub struct TagService {
    pub maps: Arc<Maps>,
    pub gpu: Arc<crate::gpu::GpuState>,
    pub tenants: Arc<RwLock<TenantRegistry>>,
    /// The `[tagging]` settings in force: the allow rule and the connection limits (replaced
    /// on reload; the socket path and mode are kept, they take a restart).
    pub allow: RwLock<TaggingConfig>,
    pub metrics: AgentMetrics,
}

impl TagService {
    /// Answers one request. `fds` are the descriptors that came with it (closed afterwards:
    /// they are the agent's duplicates, the caller's sockets stay open).
    pub fn handle(
        &self,
        body: &[u8],
        fds: &[OwnedFd],
        conn: BorrowedFd<'_>,
        creds: Option<UnixCredentials>,
    ) -> (&'static str, Response) {
        let (op, result) = self.handle_inner(body, fds, conn, creds);
        let response = match result {
            Ok(r) => r,
            Err((code, message)) => {
                // The message can quote the caller's input (serde names an unknown op as
                // sent): logged escaped (Debug), so no control character or line break of a
                // caller's reaches the log as such.
                tracing::info!(op, code = code.as_str(), reason = ?message, pid = creds.map(|c| c.pid()), "tagging request refused");
                Response::error(code, message)
            }
        };
        let outcome = match &response {
            Response::Ok { .. } | Response::Accepted { .. } => "ok",
            Response::Err { error } => error.code.as_str(),
        };
        self.metrics.tag_request(op, outcome);
        (op, response)
    }

    /// The caller may use the API at all: checked on every message before its bytes are
    /// parsed, so a caller outside the allow rule never reaches the JSON parser.
    fn check_caller(
        &self,
        creds: Option<UnixCredentials>,
    ) -> Result<UnixCredentials, (ErrorCode, String)> {
        let Some(creds) = creds else {
            return Err((
                ErrorCode::NotAllowed,
                "the caller's credentials could not be read".into(),
            ));
        };
        if !self.allow.read().unwrap().allows(creds.uid(), creds.gid()) {
            return Err((
                ErrorCode::NotAllowed,
                format!(
                    "uid {} gid {} may not tag sockets (tagging.allowed_uids / allowed_gids)",
                    creds.uid(),
                    creds.gid()
                ),
            ));
        }
        Ok(creds)
    }

    fn handle_inner(
        &self,
        body: &[u8],
        fds: &[OwnedFd],
        conn: BorrowedFd<'_>,
        creds: Option<UnixCredentials>,
    ) -> (&'static str, Result<Response, (ErrorCode, String)>) {
        let creds = match self.check_caller(creds) {
            Ok(c) => c,
            Err(e) => return ("unknown", Err(e)),
        };
        let request: Request = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return (
                    "invalid",
                    Err((
                        ErrorCode::Malformed,
                        format!(
                            "request is not valid JSON of the form {{\"op\":\"tag\",\"tenant\":NAME}}, {{\"op\":\"untag\"}} or {{\"op\":\"lookup\"}}: {e}"
                        ),
                    )),
                );
            }
        };
        let op = request.op();
        (op, self.execute(&request, fds, conn, creds))
    }

    fn execute(
        &self,
        request: &Request,
        fds: &[OwnedFd],
        conn: BorrowedFd<'_>,
        creds: UnixCredentials,
    ) -> Result<Response, (ErrorCode, String)> {
        if let Request::KvReport { tenants, tokens } = request {
            let caller = crate::gpu::ReportCaller { conn, creds };
            let registry = self.tenants.read().unwrap();
            let accepted = self
                .gpu
                .kv_report(&caller, tenants, tokens.as_ref(), &|t| {
                    registry.id(t).is_some()
                })?;
            return Ok(Response::Accepted { accepted });
        }
        let fd = match fds {
            [fd] => fd,
            _ => {
                return Err((
                    ErrorCode::MissingSocket,
                    format!(
                        "attach exactly one socket descriptor (SCM_RIGHTS); got {}",
                        fds.len()
                    ),
                ));
            }
        };
        let cookie = match inspect_socket(fd.as_fd()) {
            Ok(SocketKind::Inet { cookie }) => cookie,
            Ok(SocketKind::NotASocket) => {
                return Err((
                    ErrorCode::NotASocket,
                    "the attached descriptor is not a socket".into(),
                ));
            }
            Ok(SocketKind::Unsupported { family }) => {
                return Err((
                    ErrorCode::UnsupportedSocket,
                    format!(
                        "the attached socket is of address family {family}; only AF_INET and AF_INET6 sockets carry counted traffic"
                    ),
                ));
            }
            Err(e) => {
                return Err((
                    ErrorCode::Internal,
                    format!("cannot inspect the attached descriptor: {e}"),
                ));
            }
        };
        let internal =
            |e: aya::maps::MapError| (ErrorCode::Internal, format!("socket tag map: {e}"));
        let tenants = self.tenants.read().unwrap();
        match request {
            Request::Tag { tenant } => {
                let Some(id) = tenants.id(tenant) else {
                    return Err((
                        ErrorCode::UnknownTenant,
                        format!("tenant {tenant:?} is not configured on this agent"),
                    ));
                };
                self.maps.tag(fd.as_fd(), id).map_err(internal)?;
                tracing::debug!(tenant = %tenant, cookie, pid = creds.pid(), "tagged socket");
                Ok(Response::Ok {
                    tenant: Some(tenant.clone()),
                    tenant_id: id,
                    cookie,
                })
            }
            Request::Untag => {
                self.maps.untag(fd.as_fd()).map_err(internal)?;
                Ok(Response::Ok {
                    tenant: None,
                    tenant_id: agent_common::UNTAGGED_TENANT_ID,
                    cookie,
                })
            }
            Request::KvReport { .. } => unreachable!("answered above"),
            Request::Lookup => {
                let id = self.maps.lookup_tag(fd.as_fd()).map_err(internal)?;
                Ok(Response::Ok {
                    tenant: id.and_then(|id| tenants.name(id).map(str::to_string)),
                    tenant_id: id.unwrap_or(agent_common::UNTAGGED_TENANT_ID),
                    cookie,
                })
            }
        }
    }
}

/// Binds the tagging socket, replacing a stale socket file but never a live agent's.
pub fn bind_socket(cfg: &TaggingConfig) -> Result<OwnedFd, TaggingError> {
    let path = &cfg.socket_path;
    let err = |what, source: io::Error| TaggingError::Socket {
        path: path.clone(),
        what,
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("creating its directory", e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() || seqpacket_connects(path) {
            return Err(TaggingError::InUse { path: path.clone() });
        }
        std::fs::remove_file(path).map_err(|e| err("removing a stale socket file", e))?;
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err("socket", e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| err("address", e.into()))?;
    bind(fd.as_raw_fd(), &addr).map_err(|e| err("bind", e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.socket_mode))
        .map_err(|e| err("chmod", e))?;
    listen(&fd, Backlog::new(128).unwrap()).map_err(|e| err("listen", e.into()))?;
    Ok(fd)
}

fn seqpacket_connects(path: &Path) -> bool {
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    nix::sys::socket::connect(fd.as_raw_fd(), &addr).is_ok()
}

/// Accepts connections until `shutdown` resolves.
///
/// Against hostile local callers: at most `tagging.max_connections` connections are served at
/// once (one over the cap is accepted and closed at once, so it fails fast instead of waiting in
/// the backlog); a connection that sends nothing, or does not take its answer, for
/// `tagging.idle_timeout_ms` is closed; an `accept` that fails for want of descriptors or
/// memory backs off (10 ms, doubling to 1 s) instead of spinning on the still-readable listener.
pub async fn serve(
    listener: OwnedFd,
    service: Arc<TagService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let listener = crate::sys::async_fd(listener, Interest::READABLE | Interest::WRITABLE)?;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut backoff = crate::sys::AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            guard = listener.readable() => {
                let mut guard = guard?;
                match guard.try_io(|fd| crate::sys::accept(fd.get_ref().as_fd())) {
                    Ok(Ok(conn)) => {
                        backoff.succeeded();
                        let (max, idle) = {
                            let cfg = service.allow.read().unwrap();
                            (cfg.max_connections, std::time::Duration::from_millis(cfg.idle_timeout_ms))
                        };
                        if open.load(std::sync::atomic::Ordering::Acquire) >= max {
                            service.metrics.tagging_connection_refused();
                            drop(conn);
                            continue;
                        }
                        let slot = ConnectionSlot::take(open.clone(), service.metrics.clone());
                        let service = service.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = serve_connection(conn, service, idle).await {
                                tracing::debug!(error = %e, "tagging connection ended with an error");
                            }
                        });
                    }
                    Ok(Err(e)) => {
                        let label = backoff.failed(&e, "tagging").await;
                        service.metrics.accept_error("tagging", label);
                    }
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

/// One served connection, counted in the open-connection count (and gauge) while it lives.
struct ConnectionSlot {
    open: Arc<std::sync::atomic::AtomicUsize>,
    metrics: AgentMetrics,
}

impl ConnectionSlot {
    fn take(open: Arc<std::sync::atomic::AtomicUsize>, metrics: AgentMetrics) -> Self {
        let n = open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        metrics.tagging_connections(n);
        Self { open, metrics }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let n = self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) - 1;
        self.metrics.tagging_connections(n);
    }
}

async fn serve_connection(
    conn: OwnedFd,
    service: Arc<TagService>,
    idle: std::time::Duration,
) -> io::Result<()> {
    let creds = getsockopt(&conn, sockopt::PeerCredentials).ok();
    let conn = crate::sys::async_fd(conn, Interest::READABLE | Interest::WRITABLE)?;
    let mut buf = vec![0u8; MAX_MESSAGE_LEN + 1];
    let idle_out = |service: &TagService| {
        service.metrics.tagging_idle_closed();
        Ok(())
    };
    loop {
        let received = tokio::time::timeout(idle, async {
            loop {
                let mut guard = conn.readable().await?;
                match guard.try_io(|fd| receive(fd.get_ref().as_fd(), &mut buf)) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        })
        .await;
        let (len, truncated, fds) = match received {
            Ok(r) => r?,
            Err(_elapsed) => return idle_out(&service),
        };
        if len == 0 && !truncated && fds.is_empty() {
            return Ok(()); // orderly close
        }
        let (_, response) = if truncated {
            // Refused unparsed; the caller's uid is checked first all the same.
            let (op, code, message) = match service.check_caller(creds) {
                Err((code, message)) => ("unknown", code, message),
                Ok(_) => (
                    "invalid",
                    ErrorCode::Malformed,
                    format!(
                        "request longer than {MAX_MESSAGE_LEN} bytes or with too many descriptors"
                    ),
                ),
            };
            service.metrics.tag_request(op, code.as_str());
            (op, Response::error(code, message))
        } else {
            service.handle(&buf[..len], &fds, conn.get_ref().as_fd(), creds)
        };
        drop(fds);
        let body = serde_json::to_vec(&response).expect("responses serialize");
        let sent = tokio::time::timeout(idle, async {
            loop {
                let mut guard = conn.writable().await?;
                match guard.try_io(|fd| {
                    send(fd.as_raw_fd(), &body, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
                }) {
                    Ok(r) => return r.map(|_| ()),
                    Err(_would_block) => continue,
                }
            }
        })
        .await;
        match sent {
            Ok(r) => r?,
            Err(_elapsed) => return idle_out(&service),
        }
    }
}

/// The most descriptors one message may carry (a request attaches one socket).
const MAX_FDS: usize = 4;

/// One recvmsg: the bytes, whether the message is over the limits (data cut, or more than
/// [`MAX_FDS`] descriptors), and the descriptors.
fn receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, bool, Vec<OwnedFd>)> {
    let got = crate::sys::recv_with_fds(fd, buf)?;
    // `buf` is one byte longer than the limit, so a message cut to fit it (MSG_TRUNC) is
    // over the limit too; control data is never cut (the sys layer's buffer holds the
    // kernel's own limit of descriptors), else `control_cut`.
    let truncated = got.control_cut || got.bytes > MAX_MESSAGE_LEN || got.fds.len() > MAX_FDS;
    Ok((got.bytes, truncated, got.fds))
}
