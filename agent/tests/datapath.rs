//! The real agent, with its eBPF programs attached, counting real loopback traffic.
//! These need root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON); under CI=true they fail without.

use agent_common::proto::ErrorCode;
use bulkhead_tests::harness::*;

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");

fn require_bpf() -> bool {
    bulkhead_tests::harness::require_bpf(AGENT)
}
use std::os::fd::AsFd;

#[test]
fn counts_each_tenants_bytes_in_both_directions() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();

    let (mut a_client, mut a_server) = tcp_pair();
    let (mut b_client, mut b_server) = tcp_pair();
    let (mut u_client, mut u_server) = tcp_pair();
    for s in [&a_client, &a_server] {
        let tag = client.tag(s.as_fd(), "alpha").unwrap();
        assert_eq!(tag.tenant.as_deref(), Some("alpha"));
    }
    for s in [&b_client, &b_server] {
        client.tag(s.as_fd(), "beta").unwrap();
    }
    // Both ends of a pair belong to the tenant, so each of its payload bytes is counted once
    // on the way out (egress) and once on the way in (ingress).
    transfer(&mut a_client, &mut a_server, 1 << 20);
    transfer(&mut a_server, &mut a_client, 256 << 10);
    transfer(&mut b_client, &mut b_server, 300_000);
    transfer(&mut b_server, &mut b_client, 100_000);
    transfer(&mut u_client, &mut u_server, 200_000);

    let alpha_payload = (1u64 << 20) + (256 << 10);
    let beta_payload = 400_000;
    let m = agent.wait_for("alpha and beta counters", |m| {
        m.bytes("alpha", "ingress") >= alpha_payload && m.bytes("beta", "ingress") >= beta_payload
    });
    for dir in ["egress", "ingress"] {
        // Both ends are the tenant's, so what it receives is what it sent.
        assert_payload_accounted(
            &format!("alpha {dir}"),
            m.bytes("alpha", dir),
            m.packets("alpha", dir),
            alpha_payload,
            bytes_sent(&[&a_client, &a_server]),
        );
        assert_payload_accounted(
            &format!("beta {dir}"),
            m.bytes("beta", dir),
            m.packets("beta", dir),
            beta_payload,
            bytes_sent(&[&b_client, &b_server]),
        );
        // Untagged sockets of the whole machine land here, so only a lower bound holds.
        assert!(
            m.bytes("untagged", dir) >= 200_000,
            "untagged {dir}: {}",
            m.bytes("untagged", dir)
        );
    }
    assert_eq!(m.get("bulkhead_agent_up", &[]), 1.0);
    assert_eq!(
        m.get("bulkhead_map_entries", &[("map", "BH_SOCK_TAGS")]),
        4.0,
        "four tagged sockets"
    );
    for tenant in ["alpha", "beta"] {
        assert_eq!(
            m.get("bulkhead_tagged_sockets", &[("tenant", tenant)]),
            2.0,
            "{tenant}'s two sockets"
        );
    }
    assert_eq!(
        m.get("bulkhead_kernel_events_total", &[("event", "bad_tag")]),
        0.0
    );
    assert_eq!(
        m.get("bulkhead_map_entries", &[("map", "BH_TENANT_IDS")]),
        2.0,
        "two tenants have ids"
    );
    assert_eq!(
        m.get(
            "bulkhead_tag_requests_total",
            &[("op", "tag"), ("result", "ok")]
        ),
        4.0
    );
}

#[test]
fn retagging_moves_later_bytes_and_untagging_stops_counting() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let (mut c, mut s) = tcp_pair();

    client.tag(c.as_fd(), "alpha").unwrap();
    transfer(&mut c, &mut s, 100_000);
    let before = agent.wait_for("alpha egress", |m| m.bytes("alpha", "egress") >= 100_000);
    let alpha_egress = before.bytes("alpha", "egress");

    // A keep-alive connection handed to another tenant: later bytes are the new tenant's.
    let sent_as_alpha = bytes_sent(&[&c]);
    let re = client.tag(c.as_fd(), "beta").unwrap();
    assert_eq!(re.tenant.as_deref(), Some("beta"));
    let counts = agent.metrics();
    let tagged = |m: &Metrics, t: &str| m.get("bulkhead_tagged_sockets", &[("tenant", t)]);
    assert_eq!(tagged(&counts, "alpha"), 0.0, "the re-tag moved the count");
    assert_eq!(tagged(&counts, "beta"), 1.0);
    transfer(&mut c, &mut s, 200_000);
    let after = agent.wait_for("beta egress", |m| m.bytes("beta", "egress") >= 200_000);
    assert_eq!(
        after.bytes("alpha", "egress"),
        alpha_egress,
        "no byte sent after the re-tag may be charged to alpha"
    );
    assert_payload_accounted(
        "beta egress",
        after.bytes("beta", "egress"),
        after.packets("beta", "egress"),
        200_000,
        bytes_sent(&[&c]) - sent_as_alpha,
    );

    let untagged = client.untag(c.as_fd()).unwrap();
    assert_eq!(untagged.tenant, None);
    assert_eq!(client.lookup(c.as_fd()).unwrap().tenant, None);
    assert_eq!(tagged(&agent.metrics(), "beta"), 0.0);
    let beta_egress = after.bytes("beta", "egress");
    transfer(&mut c, &mut s, 50_000);
    let last = agent.metrics();
    assert_eq!(last.bytes("beta", "egress"), beta_egress);
    assert_eq!(last.bytes("alpha", "egress"), alpha_egress);
}

#[test]
fn closed_sockets_lose_their_tags() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let (c1, s1) = tcp_pair();
    let (c2, _s2) = tcp_pair();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [c1.as_fd(), s1.as_fd(), c2.as_fd(), udp.as_fd()] {
        client.tag(s, "alpha").unwrap();
    }
    let tags = |m: &Metrics| m.get("bulkhead_map_entries", &[("map", "BH_SOCK_TAGS")]);
    assert_eq!(tags(&agent.metrics()), 4.0);
    drop(c1);
    drop(s1);
    drop(udp);
    let m = agent.wait_for("closed sockets' tags to go", |m| tags(m) == 1.0);
    assert!(m.get("bulkhead_kernel_events_total", &[("event", "tag_released")]) >= 3.0);
    assert_eq!(
        client.lookup(c2.as_fd()).unwrap().tenant.as_deref(),
        Some("alpha")
    );
}

#[test]
fn restart_keeps_counters_and_tags() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let config = paths.config("");
    let agent = Agent::start(AGENT, &paths, &config);
    let (mut c, mut s) = tcp_pair();
    agent.client().tag(c.as_fd(), "beta").unwrap();
    transfer(&mut c, &mut s, 500_000);
    let before = agent.wait_for("beta egress", |m| m.bytes("beta", "egress") >= 500_000);
    agent.stop();

    // Same pin directory: the new agent finds the maps, the counters and the tag.
    let agent = Agent::start(AGENT, &paths, &config);
    let m = agent.metrics();
    assert_eq!(m.bytes("beta", "egress"), before.bytes("beta", "egress"));
    assert_eq!(
        m.packets("beta", "egress"),
        before.packets("beta", "egress")
    );
    let tag = agent.client().lookup(c.as_fd()).unwrap();
    assert_eq!(tag.tenant.as_deref(), Some("beta"));
    // The tag lives on the socket, in the pinned socket-storage map; its count is pinned too.
    assert_eq!(m.get("bulkhead_tagged_sockets", &[("tenant", "beta")]), 1.0);
    let sent_before = bytes_sent(&[&c]);
    transfer(&mut c, &mut s, 300_000);
    let m = agent.wait_for("beta egress to grow", |m| {
        m.bytes("beta", "egress") >= before.bytes("beta", "egress") + 300_000
    });
    assert_payload_accounted(
        "beta egress after restart",
        m.bytes("beta", "egress") - before.bytes("beta", "egress"),
        m.packets("beta", "egress") - before.packets("beta", "egress"),
        300_000,
        bytes_sent(&[&c]) - sent_before,
    );
    drop(c);
    agent.wait_for("the closed socket to leave the count", |m| {
        m.get("bulkhead_tagged_sockets", &[("tenant", "beta")]) == 0.0
    });
}

#[test]
fn programs_left_attached_keep_counting_and_are_taken_over_without_double_counting() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let config = paths.config("detach_on_shutdown = false");
    let agent = Agent::start(AGENT, &paths, &config);
    assert_eq!(agent.ready_line["replaced_links"], 0);
    let (mut c, mut s) = tcp_pair();
    agent.client().tag(c.as_fd(), "alpha").unwrap();
    transfer(&mut c, &mut s, 100_000);
    agent.stop();

    // The agent is down, but its programs stay attached and keep counting.
    transfer(&mut c, &mut s, 400_000);

    let agent = Agent::start(AGENT, &paths, &config);
    assert_eq!(
        agent.ready_line["replaced_links"], 5,
        "all five links taken over"
    );
    let m = agent.metrics();
    assert_payload_accounted(
        "alpha egress across the restart",
        m.bytes("alpha", "egress"),
        m.packets("alpha", "egress"),
        500_000,
        bytes_sent(&[&c]),
    );
    // After the take-over exactly one program per hook counts: no double counting.
    let (b0, p0) = (m.bytes("alpha", "egress"), m.packets("alpha", "egress"));
    let sent_before = bytes_sent(&[&c]);
    transfer(&mut c, &mut s, 300_000);
    let m = agent.wait_for("alpha egress to grow", |m| {
        m.bytes("alpha", "egress") >= b0 + 300_000
    });
    assert_payload_accounted(
        "alpha egress after take-over",
        m.bytes("alpha", "egress") - b0,
        m.packets("alpha", "egress") - p0,
        300_000,
        bytes_sent(&[&c]) - sent_before,
    );
    agent.stop();
    let links: Vec<_> = std::fs::read_dir(&paths.pin_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .collect();
    assert_eq!(
        links.len(),
        5,
        "links stay pinned when detach_on_shutdown = false"
    );
    // `cleanup` reads the pin directory from the same config.
    std::fs::write(paths.dir.join("agent-cleanup.toml"), &config).unwrap();
    let out = std::process::Command::new(AGENT)
        .args(["--config"])
        .arg(paths.dir.join("agent-cleanup.toml"))
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
    // Detached: traffic no longer counts.
    transfer(&mut c, &mut s, 100_000);
    let agent = Agent::start(AGENT, &paths, &config);
    assert_eq!(agent.ready_line["replaced_links"], 0);
    let after = agent.metrics();
    assert_eq!(
        after.bytes("alpha", "egress"),
        m.bytes("alpha", "egress"),
        "bytes sent while detached were counted"
    );
}

#[test]
fn bad_tagging_requests_get_their_error() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let (c, _s) = tcp_pair();
    let code = |r: Result<_, agent_common::client::ClientError>| r.unwrap_err().code().unwrap();

    assert_eq!(
        code(client.tag(c.as_fd(), "nobody")),
        ErrorCode::UnknownTenant
    );
    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert_eq!(
        code(client.tag(file.as_fd(), "alpha")),
        ErrorCode::NotASocket
    );
    let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(
        code(client.tag(unix.as_fd(), "alpha")),
        ErrorCode::UnsupportedSocket
    );
    let err = client
        .call(
            &agent_common::proto::Request::Tag {
                tenant: "alpha".into(),
            },
            None,
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MissingSocket));
    assert!(err.to_string().contains("got 0"), "{err}");

    let malformed = |body: &[u8]| {
        let reply = client.raw_call(body, Some(c.as_fd())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        v["error"]["code"].as_str().unwrap().to_string()
    };
    assert_eq!(malformed(b"{not json"), "malformed");
    assert_eq!(malformed(br#"{"op":"tag"}"#), "malformed");
    assert_eq!(malformed(br#"{"op":"explode"}"#), "malformed");
    assert_eq!(malformed(&vec![b' '; 5000]), "malformed");
    // The socket is still untagged after all that.
    assert_eq!(client.lookup(c.as_fd()).unwrap().tenant, None);

    let m = agent.metrics();
    assert_eq!(
        m.get(
            "bulkhead_tag_requests_total",
            &[("op", "tag"), ("result", "unknown_tenant")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "bulkhead_tag_requests_total",
            &[("op", "invalid"), ("result", "malformed")]
        ),
        4.0
    );

    // A caller outside the allow rule is refused, whatever it asks.
    let strict = Paths::new();
    let config = strict.config("").replace(
        "[tagging]\n",
        "[tagging]\nallowed_uids = [4242]\nallowed_gids = [4242]\n",
    );
    let agent = Agent::start(AGENT, &strict, &config);
    let err = agent.client().tag(c.as_fd(), "alpha").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotAllowed));
    assert!(err.to_string().contains("uid 0"), "{err}");
}

#[test]
fn admin_endpoints_answer() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    assert_eq!(agent.get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(agent.get("/readyz"), (200, "ready\n".to_string()));
    assert_eq!(agent.get("/nope").0, 404);
    let (_, body) = agent.get("/metrics");
    assert!(
        body.contains("# TYPE bulkhead_network_bytes counter"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"));
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let _agent = Agent::start(AGENT, &paths, &paths.config(""));
    let other = Paths::new();
    let config = other.config("").replace(
        &format!("{:?}", other.socket),
        &format!("{:?}", paths.socket),
    );
    let cfg = other.dir.join("second.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = std::process::Command::new(AGENT)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is in use by a running agent"), "{stderr}");
}

#[test]
fn kernel_side_logs_reach_the_agent_log() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start_logged(AGENT, &paths, &paths.config(""), "info,bulkhead=debug");
    let (c, _s) = tcp_pair();
    let tag = agent.client().tag(c.as_fd(), "alpha").unwrap();
    drop(c);
    let cookie = tag.cookie.to_string();
    let line = agent.wait_for_log("the release of the socket's tag", |l| {
        l.contains("released the tag of closed socket") && l.contains(&cookie)
    });
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "DEBUG", "{line}");
}

#[test]
fn mounts_bpffs_where_there_is_none() {
    if !require_bpf() {
        return;
    }
    let paths = Paths::new();
    let bpffs = paths.dir.join("bpffs");
    let config = format!(
        "bpffs = {:?}\npin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n[tagging]\nsocket_path = {:?}\n[[tenants]]\nname = \"alpha\"\n",
        bpffs,
        bpffs.join("bulkhead"),
        paths.socket
    );
    let agent = Agent::start(AGENT, &paths, &config);
    assert!(
        agent
            .startup_log
            .iter()
            .any(|l| l.contains("mounted bpffs")),
        "{:?}",
        agent.startup_log
    );
    let magic = nix::sys::statfs::statfs(&bpffs)
        .unwrap()
        .filesystem_type()
        .0;
    assert_eq!(
        magic as u64,
        0xcafe_4a11,
        "a bpffs is mounted at {}",
        bpffs.display()
    );
    assert!(bpffs.join("bulkhead/BH_TRAFFIC").exists());
    agent.stop();
    nix::mount::umount(&bpffs).unwrap();
}

/// Not a test of its own: the child side of the socket holders below (does nothing unless
/// started as one).
#[test]
fn socket_holder() {
    hold_tagged_sockets_if_asked();
}

#[test]
fn a_tenant_with_many_sockets_cannot_evict_another_tenants_tags() {
    if !require_bpf() {
        return;
    }
    // More sockets than the 65,536 entries of the LRU hash tags used to live in, held by four
    // processes (one process may hold fewer descriptors than that).
    const MANY: usize = 70_000;
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let (mut c, mut s) = tcp_pair();
    client.tag(c.as_fd(), "alpha").unwrap();

    let holders: Vec<SocketHolder> = std::thread::scope(|scope| {
        let spawned: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    SocketHolder::spawn(
                        &["--exact", "socket_holder", "--nocapture"],
                        &paths.socket,
                        "beta",
                        MANY / 4,
                    )
                })
            })
            .collect();
        spawned.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let m = agent.metrics();
    assert_eq!(
        m.get("bulkhead_tagged_sockets", &[("tenant", "beta")]),
        MANY as f64
    );
    assert_eq!(
        m.get("bulkhead_tagged_sockets", &[("tenant", "alpha")]),
        1.0
    );
    assert_eq!(
        client.lookup(c.as_fd()).unwrap().tenant.as_deref(),
        Some("alpha"),
        "alpha's tag was evicted by beta's sockets"
    );
    transfer(&mut c, &mut s, 100_000);
    let m = agent.wait_for("alpha's bytes", |m| m.bytes("alpha", "egress") >= 100_000);
    assert_payload_accounted(
        "alpha egress",
        m.bytes("alpha", "egress"),
        m.packets("alpha", "egress"),
        100_000,
        bytes_sent(&[&c]),
    );
    drop(holders);
    agent.wait_for("beta's closed sockets to leave the count", |m| {
        m.get("bulkhead_tagged_sockets", &[("tenant", "beta")]) == 0.0
    });
}
