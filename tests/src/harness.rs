//! Runs the real `bulkhead-agent` binary with its own pin directory, tagging socket and admin
//! port (so several can run side by side), scrapes it, and makes loopback traffic.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// True when `agent_bin preflight` says this machine and process can run the agent (root or
/// the BPF capabilities, cgroup v2). Otherwise the test is skipped, visibly (counted as skipped
/// by `cargo xtask test`), except under a truthy `CI`, where it fails.
pub fn require_bpf(agent_bin: &str) -> bool {
    let out = Command::new(agent_bin)
        .arg("preflight")
        .output()
        .expect("run bulkhead-agent preflight");
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
    agent_common::skip::skip(&format!("cannot load eBPF programs: {why}"));
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Names unique to this test process and call.
pub struct Paths {
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self::new()
    }
}

impl Paths {
    /// Paths unique to this process and call.
    pub fn new() -> Self {
        let id = format!(
            "test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Self::named(&id)
    }

    /// `/sys/fs/bpf/bulkhead-<name>` and `$TMPDIR/bulkhead-<name>`, emptied first.
    pub fn named(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bulkhead-{name}"));
        let paths = Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/bulkhead-{name}")),
            socket: dir.join("agent.sock"),
            dir,
        };
        paths.clear();
        std::fs::create_dir_all(&paths.dir).unwrap();
        paths
    }

    /// Removes the pins (freeing maps and links no process holds) and the temp directory.
    pub fn clear(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    pub fn config(&self, extra: &str) -> String {
        format!(
            "pin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n{extra}\n[tagging]\nsocket_path = {:?}\n\n\
             [[tenants]]\nname = \"alpha\"\n[[tenants]]\nname = \"beta\"\n",
            self.pin_dir, self.socket
        )
    }
}

impl Drop for Paths {
    fn drop(&mut self) {
        self.clear();
    }
}

pub struct Agent {
    pub child: Child,
    pub admin: SocketAddr,
    pub ready_line: serde_json::Value,
    /// Every log line up to and including the ready line.
    pub startup_log: Vec<String>,
    pub socket: PathBuf,
    log: mpsc::Receiver<String>,
    /// Signals go to the child's process group (a wrapper such as `unshare --fork` blocks
    /// SIGTERM itself and waits for the agent it forked, which is in that group).
    group: bool,
}

impl Agent {
    /// Starts the agent binary with `config` (TOML text) and waits for its ready line.
    pub fn start(agent_bin: &str, paths: &Paths, config: &str) -> Agent {
        Self::start_logged(agent_bin, paths, config, "info")
    }

    /// As [`Agent::start`], with `RUST_LOG` set to `rust_log`.
    pub fn start_logged(agent_bin: &str, paths: &Paths, config: &str, rust_log: &str) -> Agent {
        let cfg = paths.dir.join(format!(
            "agent-{}.toml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&cfg, config).unwrap();
        Self::spawn(agent_bin, paths, &cfg, rust_log)
    }

    /// Starts the agent on a config file the test keeps (to change it and send SIGHUP).
    pub fn start_file(agent_bin: &str, paths: &Paths, cfg: &std::path::Path) -> Agent {
        Self::spawn(agent_bin, paths, cfg, "info")
    }

    /// SIGHUP: the agent re-reads its config file.
    pub fn hup(&self) {
        self.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> nix::Result<()> {
        let pid = self.child.id() as i32;
        let target = if self.group { -pid } else { pid };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), sig)
    }

    /// As [`Agent::start`], with the agent run by `wrapper` (a command and its arguments, the
    /// agent's command line appended), e.g. `unshare --pid --fork --kill-child=SIGTERM`.
    pub fn start_wrapped(wrapper: &[&str], agent_bin: &str, paths: &Paths, config: &str) -> Agent {
        let cfg = paths.dir.join(format!(
            "agent-{}.toml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(agent_bin);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut agent = Self::spawn_cmd(cmd, paths, &cfg, "info");
        agent.group = true;
        agent
    }

    fn spawn(agent_bin: &str, paths: &Paths, cfg: &std::path::Path, rust_log: &str) -> Agent {
        Self::spawn_cmd(Command::new(agent_bin), paths, cfg, rust_log)
    }

    fn spawn_cmd(mut cmd: Command, paths: &Paths, cfg: &std::path::Path, rust_log: &str) -> Agent {
        let mut child = cmd
            .args(["--log-format", "json", "--config"])
            .arg(cfg)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn bulkhead-agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("BULKHEAD_SHOW_AGENT_LOG").is_some() {
                    eprintln!("[agent] {line}");
                }
                // Once nobody listens, keep draining so the agent never blocks on stderr.
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    panic!(
                        "bulkhead-agent did not become ready (exit: {status:?}); its log:\n{}",
                        log.join("\n")
                    );
                }
            };
            log.push(line.clone());
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "bulkhead-agent ready" {
                let admin = v["admin"].as_str().unwrap().parse().unwrap();
                return Agent {
                    child,
                    admin,
                    ready_line: v,
                    startup_log: log,
                    socket: paths.socket.clone(),
                    log: rx,
                    group: false,
                };
            }
        }
    }

    /// The first log line that satisfies `pred`: from start-up, or the next ones (waiting 10 s
    /// at most).
    pub fn wait_for_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.startup_log.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {what} within 10 s"),
            }
        }
    }

    /// Every log line so far: start-up, then whatever arrived since (consumed).
    pub fn log_so_far(&self) -> Vec<String> {
        let mut lines = self.startup_log.clone();
        lines.extend(self.log.try_iter());
        lines
    }

    pub fn client(&self) -> agent_common::client::AgentClient {
        agent_common::client::AgentClient::new(&self.socket)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Metrics::parse(&body)
    }

    /// Polls /metrics until `cond` holds, or panics after 10 s with the last scrape.
    pub fn wait_for(&self, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics();
            if cond(&m) {
                return m;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; last scrape:\n{}", m.text);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "agent exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "agent did not stop within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET (chunked bodies decoded): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// As [`http_get`], with an error instead of a panic when nothing answers.
pub fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if text.len() < 12 {
        return Err(std::io::Error::other(format!("short answer {text:?}")));
    }
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    Ok((status, out))
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A binary of the workspace, built next to the running test's own directory
/// (`target/<profile>/NAME`); `cargo test --workspace` builds every package's binaries first.
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// A parsed scrape: `name{labels}` -> value, labels sorted by key.
pub struct Metrics {
    pub text: String,
    values: BTreeMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut values = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let mut pairs: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
                    pairs.sort();
                    (n, pairs.join(","))
                }
                None => (series, String::new()),
            };
            values.insert(format!("{name}{{{labels}}}"), value.parse().unwrap());
        }
        Self {
            text: text.to_string(),
            values,
        }
    }

    /// The value of `name` with exactly these labels (any order), or 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        pairs.sort();
        self.values
            .get(&format!("{name}{{{}}}", pairs.join(",")))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn bytes(&self, tenant: &str, direction: &str) -> u64 {
        self.get(
            "bulkhead_network_bytes_total",
            &[("tenant", tenant), ("direction", direction)],
        ) as u64
    }

    pub fn packets(&self, tenant: &str, direction: &str) -> u64 {
        self.get(
            "bulkhead_network_packets_total",
            &[("tenant", tenant), ("direction", direction)],
        ) as u64
    }
}

/// A connected loopback TCP pair: (client, server side).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Sends `n` bytes from `from` and reads all of them at `to`, then waits until the sender has
/// nothing unacknowledged: when it returns, every data packet has left and arrived, and no
/// retransmission of it can come later.
pub fn transfer(from: &mut TcpStream, to: &mut TcpStream, n: usize) {
    let mut reader = to.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < n {
            let k = reader.read(&mut buf).unwrap();
            assert!(k > 0, "peer closed early");
            got += k;
        }
    });
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(chunk.len());
        from.write_all(&chunk[..k]).unwrap();
        sent += k;
    }
    t.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = tcp_info(from);
        if info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sender still has {} unacknowledged segments after 10 s",
            info.tcpi_unacked
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The kernel's `TCP_INFO` of a socket.
pub fn tcp_info(s: &TcpStream) -> libc::tcp_info {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, so all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given and the socket is open;
    // the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info
}

/// Payload bytes the sockets put on the wire, retransmissions included (`tcpi_bytes_sent`).
pub fn bytes_sent(sockets: &[&TcpStream]) -> u64 {
    sockets.iter().map(|s| tcp_info(s).tcpi_bytes_sent).sum()
}

/// Largest IPv4 + TCP header of one packet (20 + 60 bytes): the counted bytes of a tenant are
/// at least its payload and at most what its sockets sent (retransmissions included) plus this
/// much per counted packet.
pub const MAX_HEADER_BYTES: u64 = 80;

/// Smallest IPv4 + TCP header of one packet (20 + 20 bytes): every counted packet carries at
/// least this much besides its payload, since the hooks count from the IP header on.
pub const MIN_HEADER_BYTES: u64 = 40;

/// Asserts `payload + packets * MIN_HEADER_BYTES <= bytes <= sent + packets * MAX_HEADER_BYTES`,
/// where `sent` is the payload actually put on the wire (retransmissions included) by the
/// sockets whose packets are counted. `agent/tests/oracles.rs` has tighter bounds, from each
/// socket's TCP_INFO.
pub fn assert_payload_accounted(what: &str, bytes: u64, packets: u64, payload: u64, sent: u64) {
    assert!(packets > 0, "{what}: no packets counted");
    assert!(
        bytes >= payload + packets * MIN_HEADER_BYTES,
        "{what}: {bytes} bytes counted for {payload} bytes of payload in {packets} packets: less \
         than {MIN_HEADER_BYTES} bytes of IP and TCP headers per packet"
    );
    assert!(
        bytes <= sent + packets * MAX_HEADER_BYTES,
        "{what}: {bytes} bytes counted for {sent} bytes sent (payload {payload}, retransmissions included) in {packets} packets: more than {MAX_HEADER_BYTES} bytes of headers per packet"
    );
}

/// A TCP socket tagged with `tenant` before it connects to `addr`, so that even its SYN is the
/// tenant's. Returns the connect error as it is (e.g. EPERM when the agent drops the flow).
pub fn connect_tagged(
    client: &agent_common::client::AgentClient,
    tenant: &str,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    use std::os::fd::AsFd;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    client.tag(s.as_fd(), tenant).expect("tag the socket");
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// Tagged sockets held by a child process: one process may only hold RLIMIT_NOFILE
/// descriptors (and raising the hard limit takes CAP_SYS_RESOURCE), so tests and benchmarks
/// that need more tagged sockets spread them over several holders. The child is the calling
/// binary itself, re-run with `args` (for a test binary: `--exact NAME --nocapture`, NAME
/// being a test that calls [`hold_tagged_sockets_if_asked`] first); it tags `count` unbound
/// UDP sockets with `tenant` (a comma-separated list: round robin) and keeps them open until
/// dropped.
pub struct SocketHolder {
    child: Child,
}

const HOLDER_ENV: &str = "BULKHEAD_HOLD_TAGGED_SOCKETS";

impl SocketHolder {
    pub fn spawn(
        args: &[&str],
        agent_socket: &std::path::Path,
        tenant: &str,
        count: usize,
    ) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(args)
            .env(
                HOLDER_ENV,
                format!("{count} {tenant} {}", agent_socket.display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a socket holder");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("HOLDING ") => break,
                Some(Ok(_)) => continue,
                _ => panic!("the socket holder ended before tagging its sockets"),
            }
        }
        Self { child }
    }
}

impl Drop for SocketHolder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The child side of [`SocketHolder`]: when this process was started as one, tags its
/// sockets, says so on stdout, holds them until stdin closes, and exits. Otherwise returns.
pub fn hold_tagged_sockets_if_asked() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ' ');
    let count: usize = parts.next().unwrap().parse().unwrap();
    let tenants: Vec<String> = parts
        .next()
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    let client = agent_common::client::AgentClient::new(parts.next().unwrap());
    let sockets: Vec<OwnedFdSocket> = (0..count).map(|_| unbound_udp()).collect();
    let chunk = count / 2 + 1;
    std::thread::scope(|scope| {
        for (c, part) in sockets.chunks(chunk).enumerate() {
            let client = client.clone();
            let tenants = &tenants;
            scope.spawn(move || {
                for (i, s) in part.iter().enumerate() {
                    use std::os::fd::AsFd;
                    let tenant = &tenants[(c * chunk + i) % tenants.len()];
                    client.tag(s.as_fd(), tenant).expect("tag a held socket");
                }
            });
        }
    });
    println!("HOLDING {count}");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(sockets);
    std::process::exit(0);
}

type OwnedFdSocket = std::net::UdpSocket;

/// An AF_INET UDP socket bound to nothing (no port used up).
pub fn unbound_udp() -> std::net::UdpSocket {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a UDP socket");
    std::net::UdpSocket::from(fd)
}

/// Sends a few bytes on `stream` and reads them on the connection `listener` accepts: proof
/// that the flow works.
pub fn exchange(listener: &TcpListener, mut stream: TcpStream) {
    let (mut peer, _) = listener.accept().unwrap();
    stream.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}
