//! Documented behaviours of the agent, each checked the way an operator would: endpoints
//! without a port, `/readyz` before the programs are attached, and `cleanup` with and without
//! `--remove-maps`. Needs root (or the BPF capabilities); under a truthy CI it fails without
//! them, otherwise it is skipped.

use bulkhead_tests::harness::*;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");

fn flows(m: &Metrics, src: &str, dst: &str, action: &str) -> f64 {
    m.get(
        "bulkhead_cross_tenant_flows_total",
        &[("src_tenant", src), ("dst_tenant", dst), ("action", action)],
    )
}

/// A `[[cross_tenant.endpoints]]` entry; `port: None` leaves the port out (every port).
fn endpoint(tenant: &str, address: &str, port: Option<u16>, mode: &str) -> String {
    let port = port.map(|p| format!("port = {p}\n")).unwrap_or_default();
    format!(
        "[[cross_tenant.endpoints]]\ntenant = \"{tenant}\"\naddress = \"{address}\"\n{port}mode = \"{mode}\"\n"
    )
}

#[test]
fn an_endpoint_without_a_port_owns_every_port_of_its_address() {
    if !require_bpf(AGENT) {
        return;
    }
    // 127.0.0.2 is beta's, every port of it, except one port listed as alpha's own.
    let any_port = TcpListener::bind("127.0.0.2:0").unwrap();
    let alphas_port = TcpListener::bind("127.0.0.2:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.2:0").unwrap();
    // And ::1, in alert mode: alpha may reach it, but is reported.
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let paths = Paths::new();
    let config = paths.config("")
        + &endpoint("beta", "127.0.0.2", None, "enforce")
        + &endpoint(
            "alpha",
            "127.0.0.2",
            Some(alphas_port.local_addr().unwrap().port()),
            "enforce",
        )
        + &endpoint("beta", "::1", None, "alert");
    let agent = Agent::start(AGENT, &paths, &config);
    let client = agent.client();
    let addr = |l: &TcpListener| l.local_addr().unwrap();

    // alpha, to a port of 127.0.0.2 that no endpoint names: beta's by the address alone.
    let err = connect_tagged(&client, "alpha", addr(&any_port)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.tag(sender.as_fd(), "alpha").unwrap();
    let err = sender.send_to(b"x", udp.local_addr().unwrap()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    agent.wait_for("two enforced flows to the port-less endpoint", |m| {
        flows(m, "alpha", "beta", "enforce") == 2.0
    });

    // The address-and-port endpoint wins over the address alone: that port is alpha's.
    exchange(
        &alphas_port,
        connect_tagged(&client, "alpha", addr(&alphas_port)).unwrap(),
    );
    let err = connect_tagged(&client, "beta", addr(&alphas_port)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    // beta reaches every other port of its address; untagged sockets of a cgroup that need not
    // tag reach it too; other addresses are nobody's.
    exchange(
        &any_port,
        connect_tagged(&client, "beta", addr(&any_port)).unwrap(),
    );
    exchange(&any_port, TcpStream::connect(addr(&any_port)).unwrap());
    exchange(
        &elsewhere,
        connect_tagged(&client, "alpha", addr(&elsewhere)).unwrap(),
    );

    // IPv6, alert: connected and counted.
    exchange(&v6, connect_tagged(&client, "alpha", addr(&v6)).unwrap());
    let m = agent.wait_for("the IPv6 alert flow", |m| {
        flows(m, "alpha", "beta", "alert") == 1.0
    });
    assert_eq!(flows(&m, "alpha", "beta", "enforce"), 2.0, "{}", m.text);
    assert_eq!(flows(&m, "beta", "alpha", "enforce"), 1.0, "{}", m.text);
    assert_eq!(flows(&m, "untagged", "beta", "enforce"), 0.0);
    assert_eq!(flows(&m, "beta", "beta", "enforce"), 0.0);
    assert_eq!(flows(&m, "alpha", "alpha", "enforce"), 0.0);
}

fn links_pinned(pin_dir: &Path) -> usize {
    std::fs::read_dir(pin_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn readyz_answers_ok_only_once_the_programs_are_attached() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    // A fixed admin port, so that the test can ask before the agent says where it listens.
    let admin: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = paths.config("").replace(
        "admin_addr = \"127.0.0.1:0\"",
        &format!("admin_addr = \"{admin}\""),
    );
    let pin_dir = paths.pin_dir.clone();
    // Asks /readyz from before the agent starts; at the first 200, looks at once at what the
    // kernel has: the program links pinned, and the egress program counting an untagged
    // datagram sent now.
    let poller = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut not_ready = Vec::new();
        loop {
            match try_http_get(admin, "/readyz") {
                Ok((200, body)) => {
                    let links = links_pinned(&pin_dir);
                    let before = Metrics::parse(&http_get(admin, "/metrics").1);
                    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
                    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
                    tx.send_to(&[0u8; 1000], rx.local_addr().unwrap()).unwrap();
                    let after = Metrics::parse(&http_get(admin, "/metrics").1);
                    let counted =
                        after.bytes("untagged", "egress") - before.bytes("untagged", "egress");
                    return (not_ready, body, links, counted, after);
                }
                Ok((status, body)) => not_ready.push((status, body)),
                // Not listening yet.
                Err(_) => {}
            }
            assert!(Instant::now() < deadline, "/readyz never said 200");
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let agent = Agent::start(AGENT, &paths, &config);
    assert_eq!(agent.admin, admin);
    let (not_ready, body, links, counted, m) = poller.join().unwrap();
    assert_eq!(body, "ready\n");
    assert_eq!(
        links, 5,
        "/readyz said ready before all five links were pinned"
    );
    assert!(
        counted >= 1028,
        "/readyz said ready, but a 1,028-byte datagram sent then was not counted ({counted})"
    );
    assert_eq!(m.get("bulkhead_agent_up", &[]), 1.0);
    for (status, body) in &not_ready {
        assert_eq!((*status, body.as_str()), (503, "not ready\n"));
    }
}

/// `bulkhead-agent --config <config> cleanup [--remove-maps]`: the paths it printed.
fn cleanup(paths: &Paths, config: &str, remove_maps: bool) -> Vec<String> {
    let cfg = paths.dir.join("cleanup.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = std::process::Command::new(AGENT);
    cmd.arg("--config").arg(&cfg).arg("cleanup");
    if remove_maps {
        cmd.arg("--remove-maps");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut removed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.strip_prefix("removed ").unwrap_or(l).to_string())
        .collect();
    removed.sort();
    removed
}

fn pinned(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn cleanup_keeps_the_maps_and_remove_maps_deletes_them() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let config = paths.config("detach_on_shutdown = false");
    let agent = Agent::start(AGENT, &paths, &config);
    let (mut c, mut s) = tcp_pair();
    agent.client().tag(c.as_fd(), "alpha").unwrap();
    transfer(&mut c, &mut s, 100_000);
    let counted = agent
        .wait_for("alpha egress", |m| m.bytes("alpha", "egress") >= 100_000)
        .bytes("alpha", "egress");
    agent.stop();
    let all = pinned(&paths.pin_dir);
    let (links, maps): (Vec<String>, Vec<String>) = all
        .iter()
        .cloned()
        .partition(|p| p.rsplit('/').next().unwrap().starts_with("link_"));
    assert_eq!(links.len(), 5);
    for map in ["BH_TRAFFIC", "BH_SOCK_TAGS", "BH_TENANT_IDS"] {
        assert!(
            maps.iter().any(|p| p.ends_with(&format!("/{map}"))),
            "{map} pinned: {maps:?}"
        );
    }

    // Without the flag: the links go, the maps stay, and a new agent finds counters and tag.
    assert_eq!(cleanup(&paths, &config, false), links);
    assert_eq!(pinned(&paths.pin_dir), maps);
    let agent = Agent::start(AGENT, &paths, &config);
    assert_eq!(agent.metrics().bytes("alpha", "egress"), counted);
    assert_eq!(
        agent.client().lookup(c.as_fd()).unwrap().tenant.as_deref(),
        Some("alpha")
    );
    agent.stop();
    assert_eq!(pinned(&paths.pin_dir), all, "links pinned again on stop");

    // With it: links and maps go, and the pin directory with them.
    assert_eq!(cleanup(&paths, &config, true), all);
    assert!(
        !paths.pin_dir.exists(),
        "{} still exists",
        paths.pin_dir.display()
    );
    // A new agent on the same directory starts from nothing: no counters, no tags.
    let agent = Agent::start(AGENT, &paths, &config);
    let m = agent.metrics();
    assert_eq!(m.bytes("alpha", "egress"), 0, "{}", m.text);
    assert_eq!(
        m.get("bulkhead_tagged_sockets", &[("tenant", "alpha")]),
        0.0
    );
    assert_eq!(agent.client().lookup(c.as_fd()).unwrap().tenant, None);
}
