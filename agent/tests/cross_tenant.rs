//! Cross-tenant flows, with the real programs: a tenant's socket reaching an endpoint another
//! tenant owns is counted and reported (alert) or cannot connect or send (enforce); its own
//! tenant's endpoint is untouched. Needs root; under CI=true fails without.

use bulkhead_tests::harness::*;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");

fn flows(m: &Metrics, src: &str, dst: &str, action: &str) -> f64 {
    m.get(
        "bulkhead_cross_tenant_flows_total",
        &[("src_tenant", src), ("dst_tenant", dst), ("action", action)],
    )
}

fn endpoint(tenant: &str, addr: SocketAddr, mode: &str) -> String {
    format!(
        "[[cross_tenant.endpoints]]\ntenant = \"{tenant}\"\naddress = \"{}\"\nport = {}\nmode = \"{mode}\"\n",
        addr.ip(),
        addr.port()
    )
}

#[test]
fn a_tenant_reaching_another_tenants_endpoint_is_counted_and_reported() {
    if !require_bpf(AGENT) {
        return;
    }
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let unowned = TcpListener::bind("127.0.0.1:0").unwrap();
    let paths = Paths::new();
    let config = paths.config("")
        + &endpoint("beta", v4.local_addr().unwrap(), "alert")
        + &endpoint("beta", v6.local_addr().unwrap(), "alert");
    let agent = Agent::start(AGENT, &paths, &config);
    assert_eq!(agent.ready_line["endpoints"], 2);
    let client = agent.client();

    // alpha -> beta's IPv4 endpoint: allowed (alert), counted once, reported.
    let s = connect_tagged(&client, "alpha", v4.local_addr().unwrap()).unwrap();
    let src = s.local_addr().unwrap();
    exchange(&v4, s);
    let line = agent.wait_for_log("the flow event", |l| l.contains("cross-tenant flow"));
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["level"], "WARN");
    assert_eq!(ev["src_tenant"], "alpha");
    assert_eq!(ev["dst_tenant"], "beta");
    assert_eq!(ev["action"], "alert");
    assert_eq!(ev["src"], src.to_string());
    assert_eq!(ev["dst"], v4.local_addr().unwrap().to_string());
    let m = agent.wait_for("the alert flow", |m| {
        flows(m, "alpha", "beta", "alert") == 1.0
    });
    assert_eq!(flows(&m, "alpha", "beta", "enforce"), 0.0);

    // IPv6 too.
    let s = connect_tagged(&client, "alpha", v6.local_addr().unwrap()).unwrap();
    exchange(&v6, s);
    agent.wait_for("the IPv6 flow", |m| {
        flows(m, "alpha", "beta", "alert") == 2.0
    });

    // beta to its own endpoint, alpha to an address nobody owns, and an untagged socket of a
    // cgroup that need not tag: none of them is a cross-tenant flow.
    exchange(
        &v4,
        connect_tagged(&client, "beta", v4.local_addr().unwrap()).unwrap(),
    );
    exchange(
        &unowned,
        connect_tagged(&client, "alpha", unowned.local_addr().unwrap()).unwrap(),
    );
    exchange(
        &v4,
        std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap(),
    );
    let m = agent.metrics();
    assert_eq!(flows(&m, "alpha", "beta", "alert"), 2.0, "{}", m.text);
    assert_eq!(flows(&m, "beta", "beta", "alert"), 0.0);
    assert_eq!(flows(&m, "untagged", "beta", "alert"), 0.0);
}

#[test]
fn enforce_mode_stops_connects_and_sends_but_not_the_owner() {
    if !require_bpf(AGENT) {
        return;
    }
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let paths = Paths::new();
    let config = paths.config("")
        + &endpoint("beta", tcp.local_addr().unwrap(), "enforce")
        + &endpoint("beta", udp.local_addr().unwrap(), "enforce");
    let agent = Agent::start(AGENT, &paths, &config);
    let client = agent.client();

    let err = connect_tagged(&client, "alpha", tcp.local_addr().unwrap()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    agent.wait_for("the enforced flow", |m| {
        flows(m, "alpha", "beta", "enforce") == 1.0
    });

    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.tag(sender.as_fd(), "alpha").unwrap();
    let err = sender.send_to(b"x", udp.local_addr().unwrap()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");

    // The owner's own traffic passes untouched.
    exchange(
        &tcp,
        connect_tagged(&client, "beta", tcp.local_addr().unwrap()).unwrap(),
    );
    let owner = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.tag(owner.as_fd(), "beta").unwrap();
    owner.send_to(b"ok", udp.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 2];
    udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
    let m = agent.wait_for("the UDP flow", |m| {
        flows(m, "alpha", "beta", "enforce") == 2.0
    });
    assert_eq!(flows(&m, "beta", "beta", "enforce"), 0.0);
    assert_eq!(flows(&m, "alpha", "beta", "alert"), 0.0);
}

/// This process's cgroup, as a path under the agent's cgroup root.
fn own_cgroup(root: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    std::path::Path::new(root).join(rel.trim_start_matches('/'))
}

#[test]
fn untagged_sockets_of_must_tag_cgroups_and_reload_with_bad_files() {
    if !require_bpf(AGENT) {
        return;
    }
    let db = TcpListener::bind("127.0.0.1:0").unwrap();
    let paths = Paths::new();
    let base = paths.config("") + &endpoint("beta", db.local_addr().unwrap(), "alert");
    let cfg = paths.dir.join("reloaded.toml");
    std::fs::write(&cfg, &base).unwrap();
    let agent = Agent::start_file(AGENT, &paths, &cfg);
    exchange(
        &db,
        std::net::TcpStream::connect(db.local_addr().unwrap()).unwrap(),
    );
    assert_eq!(flows(&agent.metrics(), "untagged", "beta", "alert"), 0.0);

    // Reload: this test's own cgroup must now tag its sockets.
    let cgroup = own_cgroup(agent.ready_line["cgroup"].as_str().unwrap());
    let with_must_tag = base.replace(
        "[tagging]",
        &format!("[cross_tenant]\nmust_tag_cgroups = [{cgroup:?}]\n\n[tagging]"),
    );
    std::fs::write(&cfg, &with_must_tag).unwrap();
    agent.hup();
    agent.wait_for_log("the reload", |l| l.contains("configuration reloaded"));
    exchange(
        &db,
        std::net::TcpStream::connect(db.local_addr().unwrap()).unwrap(),
    );
    agent.wait_for("the untagged flow", |m| {
        flows(m, "untagged", "beta", "alert") == 1.0
    });

    // A bad file changes nothing: the old endpoints and must-tag rule stay in force.
    std::fs::write(
        &cfg,
        base.replace("tenant = \"beta\"", "tenant = \"nobody\""),
    )
    .unwrap();
    agent.hup();
    let line = agent.wait_for_log("the refused reload", |l| l.contains("not reloaded"));
    assert!(
        line.contains("tenant \\\"nobody\\\" is not in `tenants`"),
        "{line}"
    );
    exchange(
        &db,
        std::net::TcpStream::connect(db.local_addr().unwrap()).unwrap(),
    );
    let m = agent.wait_for("a second untagged flow", |m| {
        flows(m, "untagged", "beta", "alert") == 2.0
    });
    assert_eq!(
        m.get("bulkhead_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        m.get("bulkhead_config_reloads_total", &[("result", "invalid")]),
        1.0
    );
}

#[test]
fn flow_events_are_rate_limited_but_every_flow_is_counted() {
    if !require_bpf(AGENT) {
        return;
    }
    let db = TcpListener::bind("127.0.0.1:0").unwrap();
    let paths = Paths::new();
    let config = paths.config("").replace(
        "[tagging]",
        "[cross_tenant]\nevent_log_per_second = 1\n\n[tagging]",
    ) + &endpoint("beta", db.local_addr().unwrap(), "alert");
    let agent = Agent::start(AGENT, &paths, &config);
    let client = agent.client();
    for _ in 0..6 {
        exchange(
            &db,
            connect_tagged(&client, "alpha", db.local_addr().unwrap()).unwrap(),
        );
    }
    let m = agent.wait_for("six flows and suppressed events", |m| {
        flows(m, "alpha", "beta", "alert") == 6.0
            && m.get("bulkhead_cross_tenant_events_suppressed_total", &[]) >= 3.0
    });
    assert!(m.get("bulkhead_cross_tenant_events_suppressed_total", &[]) <= 5.0);
}
