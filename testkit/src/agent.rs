//! A fake node agent speaking the real tagging protocol (`SOCK_SEQPACKET`, the socket passed
//! with `SCM_RIGHTS`, JSON requests of `agent_common::proto`): every tag, untag and lookup is
//! logged with the socket's ports and answered (tags of a refused tenant with
//! `unknown_tenant`), every KV report is recorded and accepted.

use agent_common::proto::Request as AgentRequest;
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn,
    UnixAddr, accept, bind, getpeername, getsockname, listen, recvmsg, send, socket,
};
use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

/// One call on a socket, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCall {
    /// "tag", "untag", "lookup"
    pub op: &'static str,
    pub tenant: Option<String>,
    /// The passed socket's local and peer ports.
    pub local_port: u16,
    pub peer_port: u16,
    /// Answered with success (not refused).
    pub accepted: bool,
}

pub type CallLog = Arc<Mutex<Vec<AgentCall>>>;
/// The `tenants` (KV-cache bytes) of each accepted KV report.
pub type KvLog = Arc<Mutex<Vec<BTreeMap<String, u64>>>>;
/// The `tokens` of each accepted KV report (`None`: the report had none).
pub type TokenLog = Arc<Mutex<Vec<Option<BTreeMap<String, u64>>>>>;

/// How the fake agent answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentOptions {
    /// Tags of these tenants are refused with `unknown_tenant`.
    pub refuse: &'static [&'static str],
    /// An agent that predates token counts: a KV report with `tokens` is refused as
    /// malformed (as its closed request schema did), and not recorded.
    pub predates_tokens: bool,
}

/// The fake agent's logs; its thread serves until the test process ends.
#[derive(Debug, Clone, Default)]
pub struct FakeAgent {
    pub calls: CallLog,
    pub kv: KvLog,
    pub tokens: TokenLog,
}

impl FakeAgent {
    /// Serve the tagging protocol at `path`.
    pub fn start(path: &std::path::Path, opts: AgentOptions) -> FakeAgent {
        let agent = FakeAgent::default();
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        listen(&fd, Backlog::new(64).unwrap()).unwrap();
        let logs = agent.clone();
        std::thread::spawn(move || {
            let listener = fd;
            loop {
                let Ok(conn) = accept(listener.as_raw_fd()) else {
                    return;
                };
                logs.serve_one(conn, opts);
            }
        });
        agent
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<AgentCall> {
        self.calls.lock().unwrap().clone()
    }

    fn serve_one(&self, conn: RawFd, opts: AgentOptions) {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<UnixAddr>(conn, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        else {
            let _ = nix::unistd::close(conn);
            return;
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(f) = c {
                fds.extend(f);
            }
        }
        let n = msg.bytes;
        let req: AgentRequest = serde_json::from_slice(&buf[..n]).unwrap();
        let reply = match (&req, fds.first()) {
            (AgentRequest::KvReport { tenants, tokens }, _) => {
                assert!(fds.is_empty(), "a KV report carries no socket");
                if opts.predates_tokens && tokens.is_some() {
                    r#"{"error":{"code":"malformed","message":"unknown field `tokens`"}}"#
                        .to_string()
                } else {
                    self.kv.lock().unwrap().push(tenants.clone());
                    self.tokens.lock().unwrap().push(tokens.clone());
                    format!(r#"{{"accepted":{}}}"#, tenants.len())
                }
            }
            (_, Some(&sock)) => {
                let local: SockaddrIn = getsockname(sock).unwrap();
                let peer: SockaddrIn = getpeername(sock).unwrap();
                let (op, tenant) = match &req {
                    AgentRequest::Tag { tenant } => ("tag", Some(tenant.clone())),
                    AgentRequest::Untag => ("untag", None),
                    _ => ("lookup", None),
                };
                let refused = tenant.as_deref().is_some_and(|t| opts.refuse.contains(&t));
                self.calls.lock().unwrap().push(AgentCall {
                    op,
                    tenant: tenant.clone(),
                    local_port: local.port(),
                    peer_port: peer.port(),
                    accepted: !refused,
                });
                if refused {
                    format!(
                        r#"{{"error":{{"code":"unknown_tenant","message":"tenant {} is not configured on this agent"}}}}"#,
                        tenant.unwrap()
                    )
                } else {
                    let t = tenant.map_or("null".to_string(), |t| format!("\"{t}\""));
                    format!(r#"{{"tenant":{t},"tenant_id":1,"cookie":7}}"#)
                }
            }
            _ => r#"{"error":{"code":"missing_socket","message":"no socket"}}"#.to_string(),
        };
        let _ = send(conn, reply.as_bytes(), MsgFlags::empty());
        for f in fds {
            let _ = nix::unistd::close(f);
        }
        let _ = nix::unistd::close(conn);
    }
}
