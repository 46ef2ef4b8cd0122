//! Blocking client for the agent's tagging API (see [`crate::proto`]).
//!
//! ```no_run
//! use bulkhead_agent_common::client::AgentClient;
//! use std::os::fd::AsFd;
//! let stream = std::net::TcpStream::connect("127.0.0.1:8000").unwrap();
//! let client = AgentClient::new("/run/bulkhead/agent.sock");
//! let tag = client.tag(stream.as_fd(), "acme").unwrap();
//! println!("socket {} is tenant {:?}", tag.cookie, tag.tenant);
//! ```

use crate::proto::{ErrorCode, MAX_MESSAGE_LEN, Request, Response};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, sendmsg,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::time::Duration;

/// What the agent answered for a successful request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketTagInfo {
    /// The socket's tenant after the request; `None` when untagged.
    pub tenant: Option<String>,
    pub tenant_id: u32,
    /// The kernel's cookie of the socket (`SO_COOKIE`).
    pub cookie: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the bulkhead agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("talking to the bulkhead agent at {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the bulkhead agent refused the request ({}): {message}", code.as_str())]
    Rejected { code: ErrorCode, message: String },
    #[error("the bulkhead agent sent an unreadable reply: {0}")]
    BadReply(String),
}

fn unexpected(answer: &Response) -> ClientError {
    ClientError::BadReply(std::format!("unexpected answer {answer:?}"))
}

impl ClientError {
    /// The agent's error code, when the agent answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A client of one agent socket. Each call opens its own connection, so a client can be
/// shared between threads freely; a call takes two round trips on a local socket.
#[derive(Clone, Debug)]
pub struct AgentClient {
    path: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(2),
        }
    }

    /// How long a call waits for the agent before failing (default 2 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tag `sock` with `tenant`; a socket already tagged is re-tagged.
    pub fn tag(&self, sock: BorrowedFd<'_>, tenant: &str) -> Result<SocketTagInfo, ClientError> {
        self.call(
            &Request::Tag {
                tenant: tenant.to_string(),
            },
            Some(sock),
        )
    }

    /// Remove `sock`'s tag.
    pub fn untag(&self, sock: BorrowedFd<'_>) -> Result<SocketTagInfo, ClientError> {
        self.call(&Request::Untag, Some(sock))
    }

    /// Report `sock`'s current tag.
    pub fn lookup(&self, sock: BorrowedFd<'_>) -> Result<SocketTagInfo, ClientError> {
        self.call(&Request::Lookup, Some(sock))
    }

    /// Report the KV-cache bytes each tenant holds in this (shared) inference server, as its
    /// sidecar sees them. Returns how many tenants the agent accepted.
    pub fn report_kv(
        &self,
        tenants: &std::collections::BTreeMap<String, u64>,
    ) -> Result<u32, ClientError> {
        self.report_kv_tokens(tenants, None)
    }

    /// [`Self::report_kv`] with the weighted tokens each tenant had the server process since
    /// the previous report (an agent that predates them refuses the report as `malformed`).
    pub fn report_kv_tokens(
        &self,
        tenants: &std::collections::BTreeMap<String, u64>,
        tokens: Option<&std::collections::BTreeMap<String, u64>>,
    ) -> Result<u32, ClientError> {
        match self.exchange(
            &Request::KvReport {
                tenants: tenants.clone(),
                tokens: tokens.cloned(),
            },
            None,
        )? {
            Response::Accepted { accepted } => Ok(accepted),
            other => Err(unexpected(&other)),
        }
    }

    /// Send one request, with `sock` attached when given, and decode the answer.
    pub fn call(
        &self,
        request: &Request,
        sock: Option<BorrowedFd<'_>>,
    ) -> Result<SocketTagInfo, ClientError> {
        match self.exchange(request, sock)? {
            Response::Ok {
                tenant,
                tenant_id,
                cookie,
            } => Ok(SocketTagInfo {
                tenant,
                tenant_id,
                cookie,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// One request and its decoded answer; an error answer becomes `ClientError::Rejected`.
    fn exchange(
        &self,
        request: &Request,
        sock: Option<BorrowedFd<'_>>,
    ) -> Result<Response, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::BadReply(e.to_string()))?;
        match serde_json::from_slice::<Response>(&self.raw_call(&body, sock)?) {
            Ok(Response::Err { error }) => Err(ClientError::Rejected {
                code: error.code,
                message: error.message,
            }),
            Ok(answer) => Ok(answer),
            Err(e) => Err(ClientError::BadReply(e.to_string())),
        }
    }

    /// Send raw bytes (and an optional descriptor) and return the raw reply. Exposed so that
    /// tests and tools can exercise the agent's handling of malformed requests.
    pub fn raw_call(
        &self,
        body: &[u8],
        sock: Option<BorrowedFd<'_>>,
    ) -> Result<std::vec::Vec<u8>, ClientError> {
        let conn = self.connect()?;
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let fds;
        let cmsgs: &[ControlMessage<'_>] = match sock {
            Some(fd) => {
                fds = [fd.as_raw_fd()];
                &[ControlMessage::ScmRights(&fds)]
            }
            None => &[],
        };
        sendmsg::<UnixAddr>(
            conn.as_raw_fd(),
            &[IoSlice::new(body)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io_err)?;
        let mut buf = std::vec![0u8; MAX_MESSAGE_LEN];
        let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io_err)?;
        if n == 0 {
            return Err(ClientError::BadReply(
                "the agent closed the connection without answering".into(),
            ));
        }
        buf.truncate(n);
        Ok(buf)
    }

    fn connect(&self) -> Result<OwnedFd, ClientError> {
        let err = |source| ClientError::Connect {
            path: self.path.clone(),
            source,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        let tv = TimeVal::new(
            self.timeout.as_secs() as i64,
            self.timeout.subsec_micros() as i64,
        );
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(err)?;
        setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(err)?;
        let addr = UnixAddr::new(&self.path).map_err(err)?;
        connect(fd.as_raw_fd(), &addr).map_err(err)?;
        Ok(fd)
    }
}
