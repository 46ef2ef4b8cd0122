//! Oracles for the byte and packet counters, from the kernel's own view of each socket.
//!
//! Each test tags one end of a loopback connection (or both ends with different tenants), moves
//! known payloads both ways, and pins what the tenant was charged between bounds computed from
//! the kernel's `TCP_INFO` of the tagged socket (segments and payload bytes, retransmissions
//! included) and the fixed sizes of the IP and TCP/UDP headers. UDP is exact. Needs root (or the
//! BPF capabilities); under a truthy CI it fails without them, otherwise it is skipped.
//!
//! Where the numbers come from:
//! * `skb->len` at the cgroup hooks starts at the IP header (the ingress hook pushes the IP
//!   header back before running the program), so a counted packet is IP header + transport
//!   header + payload.
//! * IPv4 header: 20 bytes (a socket without `IP_OPTIONS` sends none); IPv6: 40, plus an
//!   8-byte hop-by-hop jumbo option on a TCP buffer of more than 65,535 bytes of payload,
//!   which loopback builds (BIG TCP: seen here as +8 bytes on such buffers at egress, and the
//!   buffer arriving in pieces at the receiver). UDP header: 8. TCP header: 20 to 60 bytes;
//!   with timestamps negotiated (`tcpi_options & TCPI_OPT_TIMESTAMPS`, Linux's default) every
//!   segment carries the 12-byte option block, so at least 32, and exactly 32 when no SACK
//!   blocks are sent (no loss, no reordering: no retransmission and no out-of-order packet).
//! * `tcpi_segs_out` grows by `tcp_skb_pcount(skb)` for every buffer TCP transmits (data,
//!   pure ACKs, window updates, FIN, retransmissions) and `tcpi_segs_in` by
//!   `max(1, gso_segs)` for every buffer that reaches the socket; `tcpi_bytes_sent` counts
//!   payload put on the wire, retransmissions included; `tcpi_bytes_received` counts payload
//!   received in order (duplicates not).
//! * A buffer (what the hooks see, and count as one packet) carries one segment or, with GSO,
//!   several, and its headers once. Loopback builds such buffers even at its default MSS (seen
//!   here over IPv4 and IPv6: fewer buffers than segments, and buffers of more than 64 KiB),
//!   and may hand the receiver a large one in pieces. A buffer holds at most 512 KiB of
//!   payload (loopback's TSO limit), and a buffer without payload (ACK, window update) is
//!   always one segment (`tcpi_data_segs_out`/`_in` count the segments with payload). So, over
//!   a window in which the connection starts and ends quiet, the packets P charged for a
//!   socket lie in `[segments without payload + ceil(payload / 512 KiB), segments]`, and its
//!   bytes in `[payload + P * min_header, payload incl. retransmissions + P * max_header]`,
//!   `max_header` being `min_header` (+ 8 over IPv6) when no SACK blocks can have been sent:
//!   over IPv4, then, exactly payload + 52 bytes a packet. Dropping the IP header (20 bytes a
//!   packet) falls below the lower bound; counting a packet twice exceeds the segment count
//!   and the upper bound.
//! * With a small MSS (`TCP_MAXSEG`) TCP hands the IP layer GSO buffers of many segments: each
//!   is one counted packet with its headers once, as the sender's hook and the receiver's see
//!   it, while the kernel counts its segments.

use bulkhead_tests::harness::*;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_bulkhead-agent");

const IPV4_HEADER: u64 = 20;
const IPV6_HEADER: u64 = 40;
const UDP_HEADER: u64 = 8;
const TCP_MIN_HEADER: u64 = 20;
const TCP_MAX_HEADER: u64 = 60;
/// Timestamps option (10 bytes) padded with two NOPs.
const TCP_TIMESTAMPS: u64 = 12;
/// `TCPI_OPT_TIMESTAMPS` in `tcpi_options` (linux/tcp.h).
const TCPI_OPT_TIMESTAMPS: u8 = 1;

/// Client to server, and back: different, odd sizes, so that a swap of directions or of ends
/// cannot pass.
const UP: usize = (1 << 20) + 7;
const DOWN: usize = (256 << 10) + 3;

/// What the kernel says a TCP socket did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kernel {
    segs_out: u64,
    segs_in: u64,
    data_segs_out: u64,
    data_segs_in: u64,
    bytes_sent: u64,
    bytes_received: u64,
    total_retrans: u64,
    /// Out-of-order packets received (`tcpi_rcv_ooopack`): what makes a receiver send SACK
    /// blocks.
    out_of_order: u64,
    timestamps: bool,
}

fn kernel(s: &TcpStream) -> Kernel {
    let i = tcp_info(s);
    Kernel {
        segs_out: u64::from(i.tcpi_segs_out),
        segs_in: u64::from(i.tcpi_segs_in),
        data_segs_out: u64::from(i.tcpi_data_segs_out),
        data_segs_in: u64::from(i.tcpi_data_segs_in),
        bytes_sent: i.tcpi_bytes_sent,
        bytes_received: i.tcpi_bytes_received,
        total_retrans: u64::from(i.tcpi_total_retrans),
        out_of_order: u64::from(i.tcpi_rcv_ooopack),
        timestamps: i.tcpi_options & TCPI_OPT_TIMESTAMPS != 0,
    }
}

impl Kernel {
    fn since(self, before: Kernel) -> Kernel {
        Kernel {
            segs_out: self.segs_out - before.segs_out,
            segs_in: self.segs_in - before.segs_in,
            data_segs_out: self.data_segs_out - before.data_segs_out,
            data_segs_in: self.data_segs_in - before.data_segs_in,
            bytes_sent: self.bytes_sent - before.bytes_sent,
            bytes_received: self.bytes_received - before.bytes_received,
            total_retrans: self.total_retrans - before.total_retrans,
            out_of_order: self.out_of_order - before.out_of_order,
            timestamps: self.timestamps,
        }
    }
}

/// Bytes and packets charged to one tenant in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Charged {
    bytes: u64,
    packets: u64,
}

fn charged(m: &Metrics, tenant: &str, direction: &str) -> Charged {
    Charged {
        bytes: m.bytes(tenant, direction),
        packets: m.packets(tenant, direction),
    }
}

fn delta(before: &Metrics, after: &Metrics, tenant: &str, direction: &str) -> Charged {
    let (b, a) = (
        charged(before, tenant, direction),
        charged(after, tenant, direction),
    );
    Charged {
        bytes: a.bytes - b.bytes,
        packets: a.packets - b.packets,
    }
}

/// A scrape taken while none of `sockets` sent or received anything (their TCP_INFO is the
/// same before and after it), and their TCP_INFO: counters and kernel counts that belong
/// together.
fn quiet_snapshot(agent: &Agent, sockets: &[&TcpStream]) -> (Metrics, Vec<Kernel>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before: Vec<Kernel> = sockets.iter().map(|s| kernel(s)).collect();
        let m = agent.metrics();
        let after: Vec<Kernel> = sockets.iter().map(|s| kernel(s)).collect();
        if before == after {
            return (m, after);
        }
        assert!(
            Instant::now() < deadline,
            "the sockets did not go quiet within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A connected loopback TCP pair on `ip` (127.0.0.1 or ::1): (client, server side).
fn tcp_pair_on(ip: &str) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// What the IP layer adds to, and allows in, one TCP buffer.
#[derive(Clone, Copy)]
struct Ip {
    header: u64,
    /// Extension header the kernel may insert: 8 bytes of hop-by-hop jumbo option on an IPv6
    /// buffer of more than 65,535 bytes of payload ("BIG TCP"), removed again on receipt.
    extension: u64,
    /// Largest payload of one buffer: loopback's TSO limit (`ip -d link show lo`:
    /// `tso_max_size 524280`; 512 KiB as a round bound).
    max_buffer_payload: u64,
}

fn ip_of(s: &TcpStream) -> Ip {
    match s.local_addr().unwrap() {
        SocketAddr::V4(_) => Ip {
            header: IPV4_HEADER,
            extension: 0,
            max_buffer_payload: 512 << 10,
        },
        SocketAddr::V6(_) => Ip {
            header: IPV6_HEADER,
            extension: 8,
            max_buffer_payload: 512 << 10,
        },
    }
}

/// The fewest buffers that can carry `segs` segments, `data_segs` of them with `payload` bytes
/// of payload: one per segment without payload, and `ip.max_buffer_payload` at most in each
/// other.
fn fewest_buffers(ip: Ip, segs: u64, data_segs: u64, payload: u64) -> u64 {
    segs - data_segs + payload.div_ceil(ip.max_buffer_payload)
}

/// Asserts that `c` (one tenant, one direction, over a quiet window) is the TCP buffers of one
/// socket, which the kernel counts as `segs` segments, `data_segs` of them with payload (see
/// the module doc), each buffer with an IP header of `ip` bytes and a TCP header, carrying
/// between `payload_min` and `payload_max` bytes of payload in all.
#[allow(clippy::too_many_arguments)]
fn assert_tcp_charged(
    what: &str,
    c: Charged,
    segs: u64,
    data_segs: u64,
    payload_min: u64,
    payload_max: u64,
    ip: Ip,
    timestamps: bool,
    clean: bool,
) {
    let fewest = fewest_buffers(ip, segs, data_segs, payload_min);
    assert!(
        (fewest..=segs).contains(&c.packets),
        "{what}: {} packets charged; the kernel sent {segs} segments ({data_segs} with payload, \
         {payload_min} bytes of it), so at least {fewest} buffers and at most {segs}",
        c.packets
    );
    let min_header = ip.header + TCP_MIN_HEADER + if timestamps { TCP_TIMESTAMPS } else { 0 };
    // Without loss or reordering no segment carries SACK blocks, and with timestamps every
    // segment's TCP header is exactly 32 bytes: then the bytes are exact up to the extension
    // headers (none over IPv4).
    let max_header = if clean && timestamps {
        min_header + ip.extension
    } else {
        ip.header + ip.extension + TCP_MAX_HEADER
    };
    let low = payload_min + c.packets * min_header;
    let high = payload_max + c.packets * max_header;
    assert!(
        (low..=high).contains(&c.bytes),
        "{what}: {} bytes charged; {} buffers with {payload_min}..={payload_max} bytes of \
         payload and {min_header}..={max_header} bytes of headers each make {low}..={high}",
        c.bytes,
        c.packets
    );
}

/// Asserts that an untagged end's traffic reached the untagged counters (which also hold every
/// other untagged socket of the machine, so only a lower bound holds).
fn assert_untagged_at_least(
    what: &str,
    c: Charged,
    segs: u64,
    data_segs: u64,
    payload: u64,
    ip: Ip,
) {
    let fewest = fewest_buffers(ip, segs, data_segs, payload);
    let low = payload + fewest * (ip.header + TCP_MIN_HEADER);
    assert!(
        c.packets >= fewest && c.bytes >= low,
        "{what}: {c:?} charged to untagged; the untagged end alone made at least {fewest} \
         buffers and {low} bytes"
    );
}

/// One end of the pair: its tenant (None: untagged), its kernel deltas, and its peer's.
struct End<'a> {
    name: &'static str,
    tenant: Option<&'a str>,
    own: Kernel,
    peer: Kernel,
}

/// Runs the transfer on a pair whose ends carry `client_tenant` and `server_tenant` and checks
/// each end's charges against its own TCP_INFO. Tenants of the config that tag neither end
/// must not be charged a byte.
fn one_connection(ip: &str, client_tenant: Option<&str>, server_tenant: Option<&str>) {
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let (mut c, mut s) = tcp_pair_on(ip);
    for (sock, tenant) in [(&c, client_tenant), (&s, server_tenant)] {
        if let Some(t) = tenant {
            assert_eq!(
                client.tag(sock.as_fd(), t).unwrap().tenant.as_deref(),
                Some(t)
            );
        }
    }
    let (m0, k0) = quiet_snapshot(&agent, &[&c, &s]);
    transfer(&mut c, &mut s, UP);
    transfer(&mut s, &mut c, DOWN);
    let (m1, k1) = quiet_snapshot(&agent, &[&c, &s]);
    let (kc, ks) = (k1[0].since(k0[0]), k1[1].since(k0[1]));
    // The payloads really went: the kernel agrees with the test before the test trusts it.
    assert!(kc.bytes_sent >= UP as u64 && ks.bytes_received == UP as u64);
    assert!(ks.bytes_sent >= DOWN as u64 && kc.bytes_received == DOWN as u64);
    let ip_bytes = ip_of(&c);
    let clean = [kc, ks]
        .iter()
        .all(|k| k.total_retrans == 0 && k.out_of_order == 0);

    let ends = [
        End {
            name: "client",
            tenant: client_tenant,
            own: kc,
            peer: ks,
        },
        End {
            name: "server",
            tenant: server_tenant,
            own: ks,
            peer: kc,
        },
    ];
    for end in &ends {
        let label = end.tenant.unwrap_or("untagged");
        let out = delta(&m0, &m1, label, "egress");
        let inn = delta(&m0, &m1, label, "ingress");
        if end.tenant.is_some() {
            assert_tcp_charged(
                &format!("{label} egress ({} end)", end.name),
                out,
                end.own.segs_out,
                end.own.data_segs_out,
                end.own.bytes_sent,
                end.own.bytes_sent,
                ip_bytes,
                end.own.timestamps,
                clean,
            );
            // In: at least what arrived in order, at most what the peer sent (its
            // retransmissions included).
            assert_tcp_charged(
                &format!("{label} ingress ({} end)", end.name),
                inn,
                end.own.segs_in,
                end.own.data_segs_in,
                end.own.bytes_received,
                end.peer.bytes_sent,
                ip_bytes,
                end.own.timestamps,
                clean,
            );
        } else {
            assert_untagged_at_least(
                &format!("untagged egress ({} end)", end.name),
                out,
                end.own.segs_out,
                end.own.data_segs_out,
                end.own.bytes_sent,
                ip_bytes,
            );
            assert_untagged_at_least(
                &format!("untagged ingress ({} end)", end.name),
                inn,
                end.own.segs_in,
                end.own.data_segs_in,
                end.own.bytes_received,
                ip_bytes,
            );
        }
    }
    for tenant in ["alpha", "beta"] {
        if client_tenant != Some(tenant) && server_tenant != Some(tenant) {
            for dir in ["egress", "ingress"] {
                assert_eq!(
                    delta(&m0, &m1, tenant, dir),
                    Charged {
                        bytes: 0,
                        packets: 0
                    },
                    "{tenant} tags neither end, yet was charged {dir} bytes"
                );
            }
        }
    }
}

#[test]
fn only_the_client_end_tagged_pays_for_its_own_bytes_both_ways() {
    if !require_bpf(AGENT) {
        return;
    }
    one_connection("127.0.0.1", Some("alpha"), None);
}

#[test]
fn only_the_server_end_tagged_pays_for_its_own_bytes_both_ways() {
    if !require_bpf(AGENT) {
        return;
    }
    one_connection("127.0.0.1", None, Some("alpha"));
}

#[test]
fn each_end_pays_its_own_tenant_and_one_ends_egress_is_the_others_ingress() {
    if !require_bpf(AGENT) {
        return;
    }
    one_connection("127.0.0.1", Some("alpha"), Some("beta"));
}

#[test]
fn ipv6_tcp_is_charged_with_the_40_byte_ipv6_header() {
    if !require_bpf(AGENT) {
        return;
    }
    one_connection("::1", Some("beta"), Some("alpha"));
    one_connection("::1", None, Some("alpha"));
}

/// Datagram payload sizes: empty, small, a full Ethernet-MTU payload, and larger than an
/// Ethernet frame (loopback's MTU is 65,536, so none is fragmented).
const DATAGRAMS: [usize; 5] = [0, 1, 100, 1472, 8000];

/// Sends each of `DATAGRAMS` from `tx` to `rx`, one at a time (each read before the next is
/// sent, so none can be dropped for want of buffer space).
fn ping_datagrams(tx: &UdpSocket, rx: &UdpSocket) {
    let to = rx.local_addr().unwrap();
    let buf = vec![0xa5u8; 8192];
    let mut got = vec![0u8; 8192];
    for n in DATAGRAMS {
        assert_eq!(tx.send_to(&buf[..n], to).unwrap(), n);
        let (k, from) = rx.recv_from(&mut got).unwrap();
        assert_eq!((k, from), (n, tx.local_addr().unwrap()));
    }
}

#[test]
fn udp_is_charged_exactly_ip_and_udp_header_plus_payload_over_ipv4_and_ipv6() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    for (ip, ip_bytes) in [("127.0.0.1", IPV4_HEADER), ("::1", IPV6_HEADER)] {
        // Sender tagged alpha, receiver tagged beta: each datagram is one of alpha's egress
        // packets and one of beta's ingress packets, of exactly IP + UDP header + payload.
        let tx = UdpSocket::bind((ip, 0)).unwrap();
        let rx = UdpSocket::bind((ip, 0)).unwrap();
        client.tag(tx.as_fd(), "alpha").unwrap();
        client.tag(rx.as_fd(), "beta").unwrap();
        let m0 = agent.metrics();
        ping_datagrams(&tx, &rx);
        let m1 = agent.metrics();
        let want = Charged {
            bytes: DATAGRAMS
                .iter()
                .map(|n| ip_bytes + UDP_HEADER + *n as u64)
                .sum(),
            packets: DATAGRAMS.len() as u64,
        };
        let none = Charged {
            bytes: 0,
            packets: 0,
        };
        assert_eq!(delta(&m0, &m1, "alpha", "egress"), want, "{ip}: sender");
        assert_eq!(delta(&m0, &m1, "beta", "ingress"), want, "{ip}: receiver");
        assert_eq!(delta(&m0, &m1, "alpha", "ingress"), none, "{ip}");
        assert_eq!(delta(&m0, &m1, "beta", "egress"), none, "{ip}");
    }
}

/// `setsockopt(fd, level, name, value)` for an int option.
fn set_int_option(fd: &impl AsRawFd, level: i32, name: i32, value: i32) {
    // SAFETY: `value` is a live c_int and its size is passed; the descriptor is open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_tcp_gso_buffer_is_one_packet_with_its_headers_once() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    // A 1,000-byte MSS: TCP hands the IP layer buffers of up to ~64 KiB, i.e. of many segments.
    const MSS: usize = 1000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    set_int_option(&sock, libc::IPPROTO_TCP, libc::TCP_MAXSEG, MSS as i32);
    sock.connect(&listener.local_addr().unwrap().into())
        .unwrap();
    let mut c: TcpStream = sock.into();
    let (mut s, _) = listener.accept().unwrap();
    client.tag(c.as_fd(), "alpha").unwrap();
    client.tag(s.as_fd(), "beta").unwrap();
    let (m0, k0) = quiet_snapshot(&agent, &[&c, &s]);
    transfer(&mut c, &mut s, UP);
    let (m1, k1) = quiet_snapshot(&agent, &[&c, &s]);
    let (kc, ks) = (k1[0].since(k0[0]), k1[1].since(k0[1]));
    assert!(
        kc.segs_out >= (UP / MSS) as u64,
        "the kernel cut {UP} bytes into {} segments: the MSS is not {MSS}",
        kc.segs_out
    );
    let ip = ip_of(&c);
    let clean = [kc, ks]
        .iter()
        .all(|k| k.total_retrans == 0 && k.out_of_order == 0);
    let out = delta(&m0, &m1, "alpha", "egress");
    assert!(
        out.packets * 4 <= kc.segs_out,
        "{} packets charged for {} segments: GSO buffers were counted per segment (or the \
         kernel built none)",
        out.packets,
        kc.segs_out
    );
    // Headers once per buffer (exactly 52 bytes each: IPv4 + TCP with timestamps).
    assert_tcp_charged(
        "alpha egress (GSO)",
        out,
        kc.segs_out,
        kc.data_segs_out,
        kc.bytes_sent,
        kc.bytes_sent,
        ip,
        kc.timestamps,
        clean,
    );
    // Counting a header per segment would charge at least this much.
    let min_header = IPV4_HEADER + TCP_MIN_HEADER + TCP_TIMESTAMPS;
    assert!(out.bytes < kc.bytes_sent + kc.segs_out * min_header);
    // The receiver's tenant is charged the buffers as they arrive, while the kernel counts
    // their segments.
    let inn = delta(&m0, &m1, "beta", "ingress");
    assert!(inn.packets * 4 <= ks.segs_in, "{inn:?} for {ks:?}");
    assert_tcp_charged(
        "beta ingress (GSO)",
        inn,
        ks.segs_in,
        ks.data_segs_in,
        ks.bytes_received,
        kc.bytes_sent,
        ip,
        ks.timestamps,
        clean,
    );
}

#[test]
fn a_udp_gso_buffer_is_one_packet_out_and_its_segments_in() {
    if !require_bpf(AGENT) {
        return;
    }
    let paths = Paths::new();
    let agent = Agent::start(AGENT, &paths, &paths.config(""));
    let client = agent.client();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.tag(tx.as_fd(), "alpha").unwrap();
    client.tag(rx.as_fd(), "beta").unwrap();
    // UDP_SEGMENT: one send of 10,500 bytes leaves as one GSO buffer of 11 datagrams (10 of
    // 1,000 bytes and one of 500).
    const SEGMENT: usize = 1000;
    const SENT: usize = 10 * SEGMENT + 500;
    set_int_option(&tx, libc::SOL_UDP, libc::UDP_SEGMENT, SEGMENT as i32);
    let m0 = agent.metrics();
    assert_eq!(
        tx.send_to(&vec![7u8; SENT], rx.local_addr().unwrap())
            .unwrap(),
        SENT
    );
    let mut sizes = Vec::new();
    let mut buf = vec![0u8; 2 * SEGMENT];
    while sizes.iter().sum::<usize>() < SENT {
        sizes.push(rx.recv(&mut buf).unwrap());
    }
    assert_eq!(sizes.len(), 11, "{sizes:?}");
    let m1 = agent.metrics();
    // The sender's buffer passes the egress hook whole: one packet, one IP and UDP header.
    assert_eq!(
        delta(&m0, &m1, "alpha", "egress"),
        Charged {
            bytes: IPV4_HEADER + UDP_HEADER + SENT as u64,
            packets: 1
        }
    );
    // A socket without UDP_GRO gets it cut into its datagrams before its ingress hook runs:
    // each is a packet with its own headers.
    assert_eq!(
        delta(&m0, &m1, "beta", "ingress"),
        Charged {
            bytes: 11 * (IPV4_HEADER + UDP_HEADER) + SENT as u64,
            packets: 11
        }
    );
}
