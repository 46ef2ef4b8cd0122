//! The tagging socket against hostile local callers: credentials checked before anything a
//! caller sends is parsed, a cap on connections, idle connections closed, `accept` backing off
//! when the agent runs out of descriptors, and callers' bytes logged escaped. With the real
//! agent; needs root (under CI=true fails without).

use agent_common::proto::ErrorCode;
use bulkhead_tests::harness::*;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");

/// A connection to the tagging socket that sends nothing.
fn raw_connection(path: &Path) -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    fd
}

/// One message to the tagging socket with `fds` attached, on a connection of its own; the
/// agent's answer (it must answer).
fn send_with_fds(path: &Path, body: &[u8], fds: &[i32]) -> serde_json::Value {
    use nix::sys::socket::{ControlMessage, MsgFlags, recv, sendmsg};
    let conn = raw_connection(path);
    let cmsgs = [ControlMessage::ScmRights(fds)];
    sendmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(body)],
        if fds.is_empty() { &[] } else { &cmsgs },
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert!(n > 0, "the agent closed the connection without an answer");
    serde_json::from_slice(&buf[..n]).unwrap()
}

fn with_tagging(paths: &Paths, fields: &str) -> String {
    paths
        .config("")
        .replace("[tagging]\n", &format!("[tagging]\n{fields}\n"))
}

#[test]
fn credentials_are_checked_before_the_message_is_parsed() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let config = with_tagging(&paths, "allowed_uids = [4242]\nallowed_gids = [4242]");
    let agent = Agent::start(AGENT, &paths, &config);
    let client = agent.client();
    let (c, _s) = tcp_pair();
    for body in [&b"{not json"[..], br#"{"op":"explode"}"#, &[b' '; 5000]] {
        let reply = client.raw_call(body, Some(c.as_fd())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(
            v["error"]["code"],
            "not_allowed",
            "{}: {v}",
            String::from_utf8_lossy(body)
        );
    }
    let m = agent.metrics();
    assert_eq!(
        m.get(
            "bulkhead_tag_requests_total",
            &[("op", "unknown"), ("result", "not_allowed")]
        ),
        3.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.get(
            "bulkhead_tag_requests_total",
            &[("op", "invalid"), ("result", "malformed")]
        ),
        0.0
    );
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    // Idle connections stay open for the test's length: the counts below are the test's own.
    let agent = Agent::start(
        AGENT,
        &paths,
        &with_tagging(&paths, "max_connections = 3\nidle_timeout_ms = 600000"),
    );
    let mut held: Vec<OwnedFd> = (0..3).map(|_| raw_connection(&paths.socket)).collect();
    agent.wait_for("three open connections", |m| {
        m.get("bulkhead_tagging_connections", &[]) == 3.0
    });
    let client = agent.client().with_timeout(Duration::from_secs(5));
    let (c, _s) = tcp_pair();
    let started = Instant::now();
    let err = client.lookup(c.as_fd()).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a connection over the cap waited instead of failing: {err}"
    );
    let m = agent.metrics();
    assert_eq!(
        m.get("bulkhead_tagging_connections_refused_total", &[]),
        1.0
    );
    held.pop();
    agent.wait_for("a free slot", |m| {
        m.get("bulkhead_tagging_connections", &[]) == 2.0
    });
    assert_eq!(client.lookup(c.as_fd()).unwrap().tenant, None);
    held.clear();
    agent.wait_for("every connection closed", |m| {
        m.get("bulkhead_tagging_connections", &[]) == 0.0
    });
}

#[test]
fn idle_connections_are_closed() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(
        AGENT,
        &paths,
        &with_tagging(&paths, "idle_timeout_ms = 200"),
    );
    let conn = raw_connection(&paths.socket);
    nix::sys::socket::setsockopt(
        &conn,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(10, 0),
    )
    .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = nix::sys::socket::recv(
        conn.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("the agent closes an idle connection (EOF), long before 10 s");
    assert_eq!(n, 0, "end of file");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(150), "closed after {took:?}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    let m = agent.metrics();
    assert_eq!(
        m.get("bulkhead_tagging_connections_idle_closed_total", &[]),
        1.0
    );
    // A caller that keeps asking is served as long as it likes.
    let client = agent.client();
    let (c, _s) = tcp_pair();
    for _ in 0..3 {
        client.tag(c.as_fd(), "alpha").unwrap();
    }
}

/// User + system CPU time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Sets the soft RLIMIT_NOFILE of another process (with util-linux `prlimit`).
fn set_nofile(pid: u32, soft: u64) {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn accept_backs_off_when_the_agent_is_out_of_descriptors() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let pid = agent.child.id();
    let soft = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    // One descriptor left: the first connection takes it, every later accept fails (EMFILE)
    // with the listener still readable.
    set_nofile(pid, open_now + 1);
    let conns: Vec<OwnedFd> = (0..5).map(|_| raw_connection(&paths.socket)).collect();
    agent.wait_for_log("the back-off", |l| {
        l.contains("accept failed for want of resources")
    });
    let before = cpu_time(pid);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let spent = cpu_time(pid) - before;
    assert!(
        spent < Duration::from_millis(300),
        "the agent spent {spent:?} of CPU in one second with accept failing: it spins"
    );
    drop(conns);
    set_nofile(pid, soft);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (c, _s) = tcp_pair();
    let client = agent.client();
    while client.lookup(c.as_fd()).is_err() {
        assert!(
            Instant::now() < deadline,
            "the tagging API did not come back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = agent.metrics();
    let errors = m.get(
        "bulkhead_accept_errors_total",
        &[("listener", "tagging"), ("error", "EMFILE")],
    );
    assert!(
        (1.0..=100.0).contains(&errors),
        "{errors} failed accepts in about a second and a half"
    );
    let again = agent
        .log_so_far()
        .iter()
        .skip(agent.startup_log.len())
        .filter(|l| l.contains("accept failed for want of resources"))
        .count();
    assert_eq!(again, 0, "the back-off was logged again and again");
}

/// Every string in a JSON value, recursively.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

#[test]
fn what_callers_send_is_logged_escaped() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let (c, _s) = tcp_pair();
    // A line break and a terminal escape inside the op name, which serde's error quotes, and
    // inside an unknown tenant's name.
    let evil = br#"{"op":"x\n2026-01-01T00:00:00Z INFO forged line \u001b[2J"}"#;
    let reply = client.raw_call(evil, Some(c.as_fd())).unwrap();
    assert!(String::from_utf8_lossy(&reply).contains("malformed"));
    let err = client
        .tag(c.as_fd(), "nobody\r\n\u{1b}[31mforged")
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownTenant));
    for (what, marker) in [
        ("the malformed request's refusal", "forged line"),
        ("the unknown tenant's refusal", "unknown_tenant"),
    ] {
        let line = agent.wait_for_log(what, |l| {
            l.contains("tagging request refused") && l.contains(marker)
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut all = Vec::new();
        strings(&v, &mut all);
        for s in all {
            assert!(
                !s.chars().any(char::is_control),
                "a caller's control characters reached the log: {s:?}"
            );
        }
    }
}

/// A message whose descriptors the kernel had to cut (more than the agent takes) is refused
/// whole: none of the sockets that did arrive is tagged.
#[test]
fn a_message_with_too_many_descriptors_is_refused_and_tags_nothing() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let pairs: Vec<_> = (0..6).map(|_| tcp_pair()).collect();
    let fds: Vec<i32> = pairs.iter().map(|(c, _)| c.as_raw_fd()).collect();
    let body = br#"{"op":"tag","tenant":"alpha"}"#;
    let v = send_with_fds(&paths.socket, body, &fds);
    assert_eq!(v["error"]["code"], "malformed", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many descriptors"),
        "{v}"
    );
    let client = agent.client();
    for (c, _) in &pairs {
        assert_eq!(client.lookup(c.as_fd()).unwrap().tenant, None);
    }
    let m = agent.metrics();
    assert_eq!(
        m.get(
            "bulkhead_tag_requests_total",
            &[("op", "invalid"), ("result", "malformed")]
        ),
        1.0,
        "{}",
        m.text
    );
    // The agent closes every descriptor such a message brought: a caller cannot run it out
    // of descriptors by sending many (the kernel's most, 253, a message).
    let open = || {
        std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
            .unwrap()
            .count()
    };
    let before = open();
    let fds: Vec<i32> = vec![pairs[0].0.as_raw_fd(); 253];
    for _ in 0..20 {
        let v = send_with_fds(&paths.socket, body, &fds);
        assert_eq!(v["error"]["code"], "malformed", "{v}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent holds {} descriptors, {before} before: it kept what callers sent",
            open()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The limits of one message are exact: 4096 bytes and 4 descriptors are handled (and
/// answered on their merits), one more of either is refused unread.
#[test]
fn a_message_at_the_limits_is_handled_and_one_past_them_is_refused() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let (c, _s) = tcp_pair();
    let call = |body: &[u8], fds: &[i32]| send_with_fds(&paths.socket, body, fds);
    let padded = |len: usize| {
        let mut body = br#"{"op":"tag","tenant":"alpha"}"#.to_vec();
        body.resize(len, b' ');
        body
    };
    let max = agent_common::proto::MAX_MESSAGE_LEN;
    let one = [c.as_raw_fd()];
    let v = call(&padded(max), &one);
    assert!(v.get("error").is_none(), "{max} bytes: {v}");
    assert_eq!(
        agent.client().lookup(c.as_fd()).unwrap().tenant.as_deref(),
        Some("alpha")
    );
    let v = call(&padded(max + 1), &one);
    assert_eq!(v["error"]["code"], "malformed", "{} bytes: {v}", max + 1);
    let four = [c.as_raw_fd(); 4];
    let v = call(&padded(100), &four);
    assert_eq!(v["error"]["code"], "missing_socket", "4 descriptors: {v}");
    let five = [c.as_raw_fd(); 5];
    let v = call(&padded(100), &five);
    assert_eq!(v["error"]["code"], "malformed", "5 descriptors: {v}");
}
