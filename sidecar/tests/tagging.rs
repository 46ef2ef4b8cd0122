//! Socket tagging through a fake node agent speaking the real protocol (SOCK_SEQPACKET +
//! SCM_RIGHTS): client sockets are tagged and re-tagged when a keep-alive connection changes
//! tenant; upstream sockets are tagged with their pool's tenant.

mod common;
use agent_common::proto::Request as AgentRequest;
use common::*;
use http::{Method, StatusCode};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn,
    UnixAddr, accept, bind, getpeername, getsockname, listen, recvmsg, send, socket,
};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Tagged {
    tenant: String,
    local_port: u16,
    peer_port: u16,
}

fn fake_agent(path: &std::path::Path, log: Arc<Mutex<Vec<Tagged>>>) {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(64).unwrap()).unwrap();
    std::thread::spawn(move || {
        let _keep = fd;
        loop {
            let Ok(conn) = accept(_keep.as_raw_fd()) else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let (n, fds) =
                match recvmsg::<UnixAddr>(conn, &mut iov, Some(&mut cmsg), MsgFlags::empty()) {
                    Ok(msg) => {
                        let mut fds = Vec::new();
                        for c in msg.cmsgs().unwrap() {
                            if let ControlMessageOwned::ScmRights(f) = c {
                                fds.extend(f);
                            }
                        }
                        (msg.bytes, fds)
                    }
                    Err(_) => {
                        let _ = nix::unistd::close(conn);
                        continue;
                    }
                };
            let req: AgentRequest = serde_json::from_slice(&buf[..n]).unwrap();
            if let (AgentRequest::Tag { tenant }, Some(&sock)) = (&req, fds.first()) {
                let local: SockaddrIn = getsockname(sock).unwrap();
                let peer: SockaddrIn = getpeername(sock).unwrap();
                log.lock().unwrap().push(Tagged {
                    tenant: tenant.clone(),
                    local_port: local.port(),
                    peer_port: peer.port(),
                });
                let reply = format!(r#"{{"tenant":"{tenant}","tenant_id":1,"cookie":7}}"#);
                let _ = send(conn, reply.as_bytes(), MsgFlags::empty());
            }
            for f in fds {
                let _ = nix::unistd::close(f);
            }
            let _ = nix::unistd::close(conn);
        }
    });
}

#[tokio::test]
async fn sockets_are_tagged_and_retagged_per_tenant() {
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    fake_agent(&sock, log.clone());
    let h = Harness::start_with(DEFAULT_TENANTS, Default::default(), |t| {
        t.push_str(&format!("\n[agent]\nsocket = \"{}\"\n", sock.display()));
    })
    .await;
    // One keep-alive connection (sequential requests on one pooled client connection).
    for tenant in ["acme", "globex", "acme"] {
        let (p, _) = h
            .send_collect(h.signed(tenant, Method::POST, "/v1/chat/completions", &chat("x", "")))
            .await;
        assert_eq!(p.status, StatusCode::OK);
    }
    assert_eq!(
        h.metric("bulkhead_agent_tagging_available").await,
        Some(1.0)
    );
    let log = log.lock().unwrap().clone();
    let client: Vec<&Tagged> = log
        .iter()
        .filter(|t| t.local_port == h.addr.port())
        .collect();
    let upstream: Vec<&Tagged> = log
        .iter()
        .filter(|t| t.peer_port == h.sim.addr.port())
        .collect();
    assert_eq!(
        client.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>(),
        ["acme", "globex", "acme"],
        "{log:?}"
    );
    assert!(
        client.iter().all(|t| t.peer_port == client[0].peer_port),
        "one client connection"
    );
    // One upstream connection per tenant, reused for acme's second request.
    let mut up: Vec<(&str, u16)> = upstream
        .iter()
        .map(|t| (t.tenant.as_str(), t.local_port))
        .collect();
    up.sort();
    assert_eq!(up.len(), 2, "{log:?}");
    assert_eq!(up[0].0, "acme");
    assert_eq!(up[1].0, "globex");
    assert_ne!(up[0].1, up[1].1);
    // The simulator saw acme on acme's tagged connection only.
    for r in h.sim.sim.requests() {
        let tenant = r.headers["x-bulkhead-tenant"].to_str().unwrap();
        let port = r.peer.unwrap().port();
        assert!(up.contains(&(tenant, port)), "{tenant} on {port}: {up:?}");
    }
    h.shutdown().await;
}
