#![allow(clippy::unwrap_used)]
//! The networked test guest on virtio-net and virtio-blk, reached from the
//! `client` namespace across the rig's switch: echo, ping, the HTTP
//! counter, the key-value store on a real disk file, `GET /rand` and random
//! TCP ISNs (two copies of one snapshot differ), and the connection the
//! guest dials out itself (also across a Remus failover).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use colo_tests::http::{api_request, Client};
use colo_tests::net::{guest_ip, Host, Topology, CLIENT_IP};
use colo_tests::{guest_artifact, Vmm};

const BOOT: Duration = Duration::from_secs(20);
const TAP: &str = "tap0";

/// A test guest on host-a's tap with a disk, and the topology around it.
struct Guest {
    topo: Topology,
    vmm: Vmm,
}

fn disk_file(sectors: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors * 512).unwrap();
    f
}

/// Boots the guest on `topo`'s tap with `ip=` and `cmdline` on its command
/// line, an optional disk and `extra` flags; returns once it is ready.
fn start_guest(topo: &Topology, disk: Option<(&Path, bool)>, cmdline: &str, extra: &[&str]) -> Vmm {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        guest_artifact("test-guest").display().to_string(),
        "--net".into(),
        format!("tap={TAP}"),
        "--cmdline".into(),
        format!("ip={}/24 {cmdline}", guest_ip(0)),
    ];
    if let Some((path, ro)) = disk {
        args.push("--disk".into());
        args.push(format!(
            "{}{}",
            path.display(),
            if ro { ",readonly" } else { "" }
        ));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut vmm = Vmm::spawn_in(topo.host(Host::A), &args);
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    vmm
}

impl Guest {
    fn new(disk: Option<(&Path, bool)>) -> Self {
        let topo = Topology::builder().host_b(false).build();
        topo.add_tap(Host::A, TAP);
        let vmm = start_guest(&topo, disk, "", &[]);
        Self { topo, vmm }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((guest_ip(0), port))
    }

    /// Runs `f` with a keep-alive HTTP connection from the client.
    fn http<R: Send>(&self, f: impl FnOnce(&mut Client<TcpStream>) -> R + Send) -> R {
        self.topo.client().enter(|| {
            let stream = TcpStream::connect_timeout(&Self::addr(80), BOOT).unwrap();
            stream.set_read_timeout(Some(BOOT)).unwrap();
            let mut client = Client::new(stream, &guest_ip(0).to_string());
            f(&mut client)
        })
    }
}

#[test]
fn ping_tcp_and_udp_echo_from_the_client() {
    let g = Guest::new(None);
    assert!(
        g.topo.client_ping(guest_ip(0), 3),
        "the guest does not answer pings"
    );

    let sent: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let got = g.topo.client().enter(|| {
        let stream = TcpStream::connect_timeout(&Guest::addr(7), BOOT).unwrap();
        stream.set_read_timeout(Some(BOOT)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let data = sent.clone();
        let w = std::thread::spawn(move || {
            writer.write_all(&data).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&stream).read_to_end(&mut got).unwrap();
        w.join().unwrap();
        got
    });
    assert_eq!(
        got.len(),
        sent.len(),
        "echo returned {} of {} bytes",
        got.len(),
        sent.len()
    );
    assert!(got == sent, "echoed bytes differ");

    g.topo.client().enter(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..20u32 {
            let msg = format!("datagram {i}");
            sock.send_to(msg.as_bytes(), Guest::addr(7)).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (msg.as_bytes(), Guest::addr(7)));
        }
    });
}

#[test]
fn a_thousand_counter_requests_come_back_in_order() {
    let g = Guest::new(None);
    let counts = g.http(|c| {
        (0..1000)
            .map(|_| {
                let r = c.request("GET", "/count", b"").unwrap();
                assert_eq!(r.status, 200);
                r.text().parse::<u64>().unwrap()
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(counts, (1..=1000).collect::<Vec<u64>>());
    // A new connection sees the same counter, and /stats agrees.
    let (next, stats) = g.http(|c| {
        let next = c.request("GET", "/count", b"").unwrap().text();
        (next, c.request("GET", "/stats", b"").unwrap().text())
    });
    assert_eq!(next, "1001");
    assert!(stats.contains("\"count\":1001"), "{stats}");
    // Unknown paths and methods get HTTP errors, and the service goes on.
    let statuses = g.http(|c| {
        [
            c.request("GET", "/nope", b"").unwrap().status,
            c.request("DELETE", "/count", b"").unwrap().status,
            c.request("GET", "/count", b"").unwrap().status,
        ]
    });
    assert_eq!(statuses, [404, 405, 200]);
}

/// One record of the guest's on-disk log (see the guest's `kv` module).
fn expected_record(seq: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut rec = vec![0u8; (32 + key.len() + value.len()).div_ceil(512) * 512];
    rec[..4].copy_from_slice(b"CKV1");
    rec[4..8].copy_from_slice(&seq.to_le_bytes());
    rec[8..10].copy_from_slice(&(key.len() as u16).to_le_bytes());
    rec[12..16].copy_from_slice(&(value.len() as u32).to_le_bytes());
    rec[32..32 + key.len()].copy_from_slice(key);
    rec[32 + key.len()..32 + key.len() + value.len()].copy_from_slice(value);
    let mut crc = 0xffff_ffffu32;
    for &b in rec[..16].iter().chain(key).chain(value) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    rec[16..20].copy_from_slice(&(!crc).to_le_bytes());
    rec
}

#[test]
fn key_value_records_survive_a_restart_at_the_expected_offsets() {
    let disk = disk_file(4096);
    let alpha: Vec<u8> = b"first value".to_vec();
    let beta: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, TAP);
    let api = ["--api-sock", sock.to_str().unwrap()];
    let vmm = start_guest(&topo, Some((disk.path(), false)), "", &api);
    let mut g = Guest { topo, vmm };
    let statuses = g.http(|c| {
        [
            c.request("POST", "/kv/alpha", &alpha).unwrap().status,
            c.request("POST", "/kv/beta", &beta).unwrap().status,
            c.request("POST", "/kv/bad key", b"x").unwrap().status,
        ]
    });
    assert_eq!(statuses, [201, 201, 400]);
    // An orderly shutdown over the API.
    let r = api_request(&sock, "PUT", "/actions", r#"{"action":"shutdown"}"#).unwrap();
    assert_eq!(r.status, 202);
    assert!(g.vmm.wait_exit(BOOT).success());

    // The host sees both records, flushed, where the format puts them.
    let bytes = std::fs::read(disk.path()).unwrap();
    let first = expected_record(1, b"alpha", &alpha);
    let second = expected_record(2, b"beta", &beta);
    assert_eq!(
        &bytes[512..512 + first.len()],
        &first[..],
        "record 1 at byte 512"
    );
    let at = 512 + first.len();
    assert_eq!(
        &bytes[at..at + second.len()],
        &second[..],
        "record 2 at byte {at}"
    );

    g.vmm = start_guest(&g.topo, Some((disk.path(), false)), "", &[]);
    let (a, b, missing) = g.http(|c| {
        (
            c.request("GET", "/kv/alpha", b"").unwrap(),
            c.request("GET", "/kv/beta", b"").unwrap(),
            c.request("GET", "/kv/gamma", b"").unwrap().status,
        )
    });
    assert_eq!((a.status, a.body), (200, alpha));
    assert_eq!((b.status, b.body), (200, beta));
    assert_eq!(missing, 404);
}

#[test]
fn a_readonly_disk_refuses_guest_writes() {
    let disk = disk_file(64);
    std::fs::write(disk.path(), vec![0x5au8; 64 * 512]).unwrap();
    let before = std::fs::read(disk.path()).unwrap();
    let g = Guest::new(Some((disk.path(), true)));
    let (put, stats) = g.http(|c| {
        (
            c.request("POST", "/kv/key", b"value").unwrap(),
            c.request("GET", "/stats", b"").unwrap().text(),
        )
    });
    assert_eq!(put.status, 500, "{}", put.text());
    assert_eq!(put.text(), "disk write failed\n");
    assert!(stats.contains("\"disk\":\"ro\""), "{stats}");
    assert_eq!(
        std::fs::read(disk.path()).unwrap(),
        before,
        "the read-only disk changed"
    );
}

/// A raw TCP socket: a copy of every TCP segment the calling thread's
/// namespace receives from the moment it is opened.
struct TcpTap(std::os::fd::OwnedFd);

/// A segment's source port, destination port, sequence number and flags.
type Segment = (u16, u16, u32, u8);

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

impl TcpTap {
    fn open() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: socket takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor just returned, owned by nothing else.
        Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// The first segment from `from` for which `wanted` holds, waiting up
    /// to [`BOOT`] for it.
    fn find(&self, from: std::net::Ipv4Addr, wanted: impl Fn(Segment) -> bool) -> Segment {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + BOOT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no such segment from {from}");
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, count 1.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 1000) as i32) } <= 0 {
                continue;
            }
            let mut buf = [0u8; 2048];
            // SAFETY: `buf` is live and writable for its whole length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(n) = usize::try_from(n) else { continue };
            // A raw IPv4 socket hands over the IP header too.
            let packet = &buf[..n];
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let Some(tcp) = packet.get(ihl..ihl + 20) else {
                continue;
            };
            let segment = (
                u16::from_be_bytes([tcp[0], tcp[1]]),
                u16::from_be_bytes([tcp[2], tcp[3]]),
                u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
                tcp[13],
            );
            if packet[12..16] == from.octets() && wanted(segment) {
                return segment;
            }
        }
    }
}

/// Connects from the calling thread's namespace to the guest's `port`;
/// returns the stream and the guest's initial sequence number, read from
/// its SYN-ACK.
fn connect_reading_isn(port: u16) -> (TcpStream, u32) {
    let tap = TcpTap::open();
    // One attempt, however long a restored guest takes to run: a second
    // connection would cost the guest a second ISN.
    let stream = TcpStream::connect_timeout(&Guest::addr(port), BOOT).unwrap();
    stream.set_read_timeout(Some(BOOT)).unwrap();
    let local = stream.local_addr().unwrap().port();
    let (_, _, isn, _) = tap.find(guest_ip(0), |(from, to, _, flags)| {
        (from, to) == (port, local) && flags & (SYN | ACK) == SYN | ACK
    });
    (stream, isn)
}

/// What two copies of the guest, restored one after the other from the
/// same full snapshot, did: each copy's ISNs of three connections to port
/// 80 and of two it dialled, those two's local ports, and its two
/// `GET /rand` answers per connection to port 80.
struct Copies {
    isns: [Vec<u32>; 2],
    dial_ports: [Vec<u16>; 2],
    rand: [Vec<String>; 2],
    /// `X-Rand-Source` of every `/rand` answer.
    rand_sources: Vec<String>,
}

/// Boots the guest with `cmdline`, snapshots it, and restores it twice.
fn two_copies_of_one_state(cmdline: &str) -> Copies {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, TAP);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("full.snap");
    let sock = dir.path().join("api.sock");
    let api = |method: &str, path: &str, body: &str| {
        let r = api_request(&sock, method, path, body).unwrap();
        assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
    };
    let sock_arg = ["--api-sock", sock.to_str().unwrap()];
    let mut vmm = start_guest(&topo, None, cmdline, &sock_arg);
    // The client and the guest know each other's MAC before the snapshot.
    assert!(
        topo.client_ping(guest_ip(0), 1),
        "the guest does not answer"
    );
    api("PUT", "/vm", r#"{"state":"paused"}"#);
    let body = format!(r#"{{"type":"full","path":"{}"}}"#, snap.display());
    api("PUT", "/snapshot", &body);
    vmm.kill();

    let listener = client_listener(&topo);
    let target = listener.local_addr().unwrap();
    let mut copies = Copies {
        isns: [Vec::new(), Vec::new()],
        dial_ports: [Vec::new(), Vec::new()],
        rand: [Vec::new(), Vec::new()],
        rand_sources: Vec::new(),
    };
    for copy in 0..2 {
        std::fs::remove_file(&sock).unwrap();
        let mut restored = colo_tests::Vmm::spawn_in(
            topo.host(Host::A),
            [
                &sock_arg[..],
                &[
                    "--net",
                    &format!("tap={TAP}"),
                    "--restore",
                    snap.to_str().unwrap(),
                ],
            ]
            .concat(),
        );
        topo.client().enter(|| {
            let mut client = None;
            for _ in 0..3 {
                let (stream, isn) = connect_reading_isn(80);
                copies.isns[copy].push(isn);
                let c = client.insert(Client::new(stream, "guest"));
                for _ in 0..2 {
                    let r = c.request("GET", "/rand", b"").unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                    copies.rand[copy].push(r.text());
                    copies
                        .rand_sources
                        .push(r.header("x-rand-source").unwrap_or("none").to_string());
                }
            }
            // Twice: each POST replaces the dialled connection by a new one.
            // The accepted connections stay open: one the test closed would
            // be dialled again by the guest, and that SYN could be the one
            // the tap sees next.
            let client = client.as_mut().unwrap();
            let mut accepted = Vec::new();
            for _ in 0..2 {
                let tap = TcpTap::open();
                let r = client
                    .request("POST", "/dial", target.to_string().as_bytes())
                    .unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                let (port, _, isn, _) = tap.find(guest_ip(0), |(_, to, _, flags)| {
                    to == target.port() && flags & (SYN | ACK) == SYN
                });
                let (stream, peer) = accept_within(&listener, BOOT);
                assert_eq!(peer.port(), port);
                accepted.push(stream);
                copies.isns[copy].push(isn);
                copies.dial_ports[copy].push(port);
            }
        });
        restored.kill();
    }
    copies
}

impl Copies {
    /// Every `/rand` answer is 16 bytes in hex, all from `source`, and no
    /// two are alike.
    fn assert_rand_answers_differ(&self, source: &str) {
        assert!(
            self.rand_sources.iter().all(|s| s == source),
            "{:?}",
            self.rand_sources
        );
        let all: Vec<&String> = self.rand.iter().flatten().collect();
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a.len(), 33, "not 16 bytes in hex and a newline: {a:?}");
            assert!(a.trim_end().bytes().all(|b| b.is_ascii_hexdigit()), "{a:?}");
            for b in &all[i + 1..] {
                assert_ne!(a, b, "GET /rand answered the same twice");
            }
        }
    }
}

#[test]
fn copies_of_one_state_answer_rand_and_pick_isns_and_ports_differently() {
    // The guest's default source: RDRAND where the CPU has it (these
    // machines do), else the TSC. With `rand_source=rdtsc` forced, two
    // copies answered their first `/rand` alike about once in ten runs
    // under load (the same 16 bytes in separate runs, so the TSC samples
    // were equal): the TSC-only fallback is not enough here, and is not
    // what this test can rely on.
    let copies = two_copies_of_one_state("");
    copies.assert_rand_answers_differ(default_source());
    assert_ne!(
        copies.isns[0], copies.isns[1],
        "two copies of one state opened connections with the same ISNs"
    );
    for isns in &copies.isns {
        let mut distinct = isns.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), isns.len(), "{isns:?}");
    }
    assert_ne!(
        copies.dial_ports[0], copies.dial_ports[1],
        "two copies of one state dialled from the same ports"
    );
}

#[test]
fn deterministic_isn_makes_copies_of_one_state_pick_the_same_isns_and_ports() {
    // The control for the test above: with the switch on, the same state
    // opens connections alike, so equal ISNs and ports are what that test
    // would see if they were not random. `/rand` stays random (from RDRAND
    // where the CPU has it).
    let copies = two_copies_of_one_state("deterministic_isn=1");
    assert_eq!(copies.isns[0], copies.isns[1]);
    assert_eq!(copies.dial_ports[0], copies.dial_ports[1]);
    copies.assert_rand_answers_differ(default_source());
}

/// The random source the guest picks by default on this host.
fn default_source() -> &'static str {
    let has_rdrand = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .contains(" rdrand");
    if has_rdrand {
        "rdrand"
    } else {
        "rdtsc"
    }
}

/// Accepts one connection on `listener`, waiting up to `timeout`.
fn accept_within(listener: &std::net::TcpListener, timeout: Duration) -> (TcpStream, SocketAddr) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, count 1.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    assert_eq!(ready, 1, "no connection within {timeout:?}");
    let (stream, peer) = listener.accept().unwrap();
    stream.set_read_timeout(Some(BOOT)).unwrap();
    (stream, peer)
}

/// Sends `count` messages of varied lengths on `stream`, each once the
/// previous one came back whole, and checks every byte of every echo.
fn echo_messages(stream: &mut TcpStream, count: usize) {
    for i in 0..count {
        let msg = format!("message {i} {}\n", "x".repeat(i % 97));
        stream.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0; msg.len()];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes(), "echo of message {i}");
    }
}

/// A listener in the client namespace, on the client's address.
fn client_listener(topo: &Topology) -> std::net::TcpListener {
    topo.client()
        .enter(|| std::net::TcpListener::bind((CLIENT_IP, 0)).unwrap())
}

#[test]
fn the_guest_dials_out_echoes_and_dials_again_when_closed() {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, TAP);
    let listener = client_listener(&topo);
    let target = listener.local_addr().unwrap();
    let _vmm = start_guest(&topo, None, &format!("dial={target}"), &[]);

    // When the client ends a connection, the guest closes its side and
    // opens a new one, which echoes too.
    for messages in [1000, 10] {
        let (mut conn, peer) = accept_within(&listener, BOOT);
        assert_eq!(peer.ip(), guest_ip(0));
        assert!(peer.port() >= 49152, "local port {peer} not ephemeral");
        echo_messages(&mut conn, messages);
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after the end", rest.len());
    }
}

#[test]
fn post_dial_moves_the_dialled_connection_and_refuses_bad_addresses() {
    let g = Guest::new(None);
    let listeners = [client_listener(&g.topo), client_listener(&g.topo)];
    let targets: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let post = |body: &str| {
        g.http(|c| {
            let r = c.request("POST", "/dial", body.as_bytes()).unwrap();
            (r.status, r.text())
        })
    };
    for bad in [
        "",
        "10.77.0.1",
        "10.77.0.1:0",
        "10.77.0.1:99999",
        "0.0.0.0:80",
        "224.0.0.1:80",
        "nonsense:80",
    ] {
        assert_eq!(post(bad).0, 400, "POST /dial {bad:?}");
    }
    assert_eq!(
        g.http(|c| c.request("GET", "/dial", b"").unwrap().status),
        405
    );

    let (status, text) = post(&format!("{}\n", targets[0]));
    assert_eq!(
        (status, text.trim()),
        (200, format!("dialling {}", targets[0]).as_str())
    );
    let (mut first, _) = accept_within(&listeners[0], BOOT);
    echo_messages(&mut first, 10);

    // A new address replaces the old: that connection ends, one to the
    // new address echoes.
    assert_eq!(post(&targets[1].to_string()).0, 200);
    let (mut second, _) = accept_within(&listeners[1], BOOT);
    echo_messages(&mut second, 10);
    let mut rest = Vec::new();
    let _ = first.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the old connection still carried {rest:?}");
    let stats = g.http(|c| c.request("GET", "/stats", b"").unwrap().text());
    assert!(stats.contains("\"dial_connections\":2"), "{stats}");
}

#[test]
fn a_dialled_connection_survives_a_remus_failover() {
    dialled_connection_survives_a_failover("remus");
}

/// Issue 10: the rewriter learns the offset of a connection the guest
/// opened (from the server's SYN-ACK), with no checkpoint per connection,
/// and keeps translating after the failover.
#[test]
fn a_dialled_connection_survives_a_colo_failover() {
    dialled_connection_survives_a_failover("colo");
}

fn dialled_connection_survives_a_failover(mode: &'static str) {
    use colo_tests::pair::{Pair, PairOptions};
    // A connection the guest opened carries on on the secondary after the
    // primary is SIGKILLed with a message in flight: nothing lost, nothing
    // duplicated, and no new connection.
    let mut pair = Pair::start(PairOptions::default().in_mode(mode));
    let listener = client_listener(pair.topo());
    let target = listener.local_addr().unwrap();
    let status = pair.topo().client().enter(|| {
        let stream = TcpStream::connect_timeout(&Guest::addr(80), BOOT).unwrap();
        stream.set_read_timeout(Some(BOOT)).unwrap();
        let mut client = Client::new(stream, "guest");
        client
            .request("POST", "/dial", target.to_string().as_bytes())
            .unwrap()
            .status
    });
    assert_eq!(status, 200);
    // Each round trip waits for a checkpoint (Remus holds the guest's
    // output until then): a few messages, not thousands.
    let (mut conn, _) = accept_within(&listener, BOOT);
    echo_messages(&mut conn, 10);
    if mode == "colo" {
        // The rewriter learnt the connection's offset from the server's
        // SYN-ACK: its SYN and data matched without a checkpoint.
        let series = "colo_checkpoints_total{cause=\"mismatch\"}";
        let mismatches = pair.metric(colo_tests::pair::Side::Primary, series);
        assert_eq!(mismatches, Some(0.0), "{}", pair.logs());
    }

    let msg = b"in flight when the primary died";
    conn.write_all(msg).unwrap();
    pair.kill_primary();
    pair.failover();
    let mut got = vec![0; msg.len()];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
    echo_messages(&mut conn, 10);

    let stats = pair.topo().client().enter(|| {
        let stream = TcpStream::connect_timeout(&Guest::addr(80), BOOT).unwrap();
        stream.set_read_timeout(Some(BOOT)).unwrap();
        Client::new(stream, "guest")
            .request("GET", "/stats", b"")
            .unwrap()
            .text()
    });
    assert!(stats.contains("\"dial_connections\":1,"), "{stats}");
}
