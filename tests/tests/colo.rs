//! Issue 10's acceptance tests that only COLO mode has: deterministic
//! traffic is released by the compare without checkpoints, a
//! non-deterministic answer forces one (and the client gets the PVM's
//! answer), and hostile frames from the client neither crash nor wedge
//! the compare proxy. The failover suite runs in COLO mode in
//! `failover.rs` (`colo::*`), the guest-opened connection in `network.rs`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use colo_tests::http::Client;
use colo_tests::net::guest_ip;
use colo_tests::pair::{Pair, PairOptions, Side, GUEST_INDEX, STATE_TIMEOUT};

/// For any one reply.
const REPLY: Duration = Duration::from_secs(30);

/// The checkpoint causes `GET /metrics` counts.
const CAUSES: [&str; 5] = ["mismatch", "timeout", "periodic", "held_bytes", "requested"];

fn guest(port: u16) -> SocketAddr {
    SocketAddr::from((guest_ip(GUEST_INDEX), port))
}

/// The primary's committed checkpoints by cause.
fn checkpoints(pair: &Pair) -> Vec<(&'static str, u64)> {
    CAUSES
        .iter()
        .map(|&cause| {
            let series = format!("colo_checkpoints_total{{cause=\"{cause}\"}}");
            let n = pair
                .metric(Side::Primary, &series)
                .unwrap_or_else(|| panic!("no {series} in the primary's metrics"));
            (cause, n as u64)
        })
        .collect()
}

/// `after - before`, cause by cause.
fn since(
    before: &[(&'static str, u64)],
    after: &[(&'static str, u64)],
) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after)
        .map(|((cause, b), (_, a))| (*cause, a - b))
        .collect()
}

fn count_of(counts: &[(&'static str, u64)], cause: &str) -> u64 {
    counts.iter().find(|(c, _)| *c == cause).map_or(0, |c| c.1)
}

/// A keep-alive HTTP connection from the client to the guest.
fn http(pair: &Pair) -> Client<TcpStream> {
    pair.topo().client().enter(|| {
        let stream = TcpStream::connect_timeout(&guest(80), REPLY).unwrap();
        stream.set_read_timeout(Some(REPLY)).unwrap();
        Client::new(stream, &guest_ip(GUEST_INDEX).to_string())
    })
}

/// `GET /count` once on `client`: the counter's value.
fn count(client: &mut Client<TcpStream>) -> u64 {
    let r = client.request("GET", "/count", b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.text().trim().parse().unwrap()
}

#[test]
fn deterministic_traffic_is_released_without_a_mismatch_checkpoint() {
    let pair = Pair::start(PairOptions::colo());
    let before = checkpoints(&pair);
    let started = Instant::now();

    // 1000 ordered requests on one connection: each answer one above the
    // one before.
    let mut client = http(&pair);
    let first = count(&mut client);
    for i in 1..1000 {
        let n = count(&mut client);
        assert_eq!(n, first + i, "request {i} of 1000\n{}", pair.logs());
    }
    drop(client);

    // 1 MiB through the echo service in 4 KiB writes, every byte checked.
    let mut echo = pair.topo().client().enter(|| {
        let s = TcpStream::connect_timeout(&guest(7), REPLY).unwrap();
        s.set_read_timeout(Some(REPLY)).unwrap();
        s
    });
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 4096];
    let mut back = vec![0u8; 4096];
    while sent < 1 << 20 {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (sent as usize + i).wrapping_mul(31) as u8;
        }
        echo.write_all(&chunk).unwrap();
        echo.read_exact(&mut back).unwrap();
        assert_eq!(back, chunk, "echo at byte {sent}\n{}", pair.logs());
        sent += chunk.len() as u64;
    }
    drop(echo);

    let took = started.elapsed();
    let counts = since(&before, &checkpoints(&pair));
    eprintln!("1000 GET /count + 1 MiB echo in {took:?}: checkpoints by cause {counts:?}");
    assert_eq!(
        count_of(&counts, "mismatch"),
        0,
        "deterministic traffic caused mismatch checkpoints: {counts:?}\n{}",
        pair.logs()
    );
    // Both VMs answered the same: the proxy released most frames on a
    // match, not at checkpoints (a compare timeout on a loaded machine
    // releases an epoch's frames at its checkpoint instead).
    let matched = pair
        .metric(Side::Primary, "colo_matched_frames_total")
        .unwrap();
    let compared = pair
        .metric(Side::Primary, "colo_compared_frames_total")
        .unwrap();
    eprintln!("compared {compared} PVM frames, {matched} released on a match");
    assert!(
        compared >= 2000.0 && matched * 2.0 >= compared,
        "only {matched} of {compared} frames matched\n{}",
        pair.logs()
    );
    assert_eq!(pair.status(Side::Primary).state, "protected");
}

/// The `rand HEX` lines a guest printed on its console.
fn rand_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.split("rand ").nth(1))
        .map(|hex| hex.trim().to_string())
        .collect()
}

#[test]
fn rand_forces_a_checkpoint_and_the_client_gets_the_pvms_answer() {
    let pair = Pair::start(PairOptions::colo());
    let mut client = http(&pair);
    // A deterministic request first: the connection is compared and
    // released without a checkpoint.
    count(&mut client);
    let before = checkpoints(&pair);
    let r = client.request("GET", "/rand", b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.text().trim().to_string();
    assert_eq!(answer.len(), 32, "{answer:?}");
    let counts = since(&before, &checkpoints(&pair));
    eprintln!("GET /rand: checkpoints by cause {counts:?}");
    assert!(
        count_of(&counts, "mismatch") >= 1,
        "GET /rand was answered without a mismatch checkpoint: {counts:?}\n{}",
        pair.logs()
    );
    // Each VM drew its own number: the client got the PVM's.
    let pvm = rand_lines(&pair.serial(Side::Primary));
    let svm = rand_lines(&pair.serial(Side::Secondary));
    assert_eq!(pvm, std::slice::from_ref(&answer), "{}", pair.logs());
    assert_eq!(
        svm.len(),
        1,
        "the SVM did not answer /rand\n{}",
        pair.logs()
    );
    assert_ne!(svm[0], answer, "both VMs drew the same number");

    // The connection goes on after the checkpoint, compared again.
    let n = count(&mut client);
    assert_eq!(count(&mut client), n + 1);
    assert_eq!(pair.status(Side::Primary).state, "protected");
}

/// Frames a hostile client can put on the wire to the guest's MAC: each
/// parses badly or oddly. The guest ignores them (or answers them); the
/// proxy compares whatever the two guests send back.
fn hostile_frames(guest_mac: [u8; 6], client_mac: [u8; 6]) -> Vec<Vec<u8>> {
    let eth = |ethertype: u16, payload: &[u8]| {
        let mut f = Vec::new();
        f.extend_from_slice(&guest_mac);
        f.extend_from_slice(&client_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let ip = guest_ip(GUEST_INDEX).octets();
    let src = colo_tests::net::CLIENT_IP.octets();
    let ipv4 = |proto: u8, frag: u16, total: u16, body: &[u8]| {
        let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&ip);
        let sum = checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h.extend_from_slice(body);
        h
    };
    let tcp_syn_to = |port: u16| {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02;
        t
    };
    let mut frames = vec![
        // Truncated: an Ethernet header alone, and half an IPv4 header.
        eth(0x0800, &[]),
        eth(0x0800, &[0x45, 0, 0]),
        // An IPv4 header whose total length exceeds the frame.
        eth(0x0800, &ipv4(6, 0, 1400, &tcp_syn_to(80))),
        // An IHL below 5, and a TCP data offset beyond the segment.
        eth(0x0800, &{
            let mut p = ipv4(6, 0, 40, &tcp_syn_to(80));
            p[0] = 0x43;
            p
        }),
        eth(0x0800, &{
            let mut t = tcp_syn_to(80);
            t[12] = 15 << 4;
            ipv4(6, 0, 40, &t)
        }),
        // Fragments: a first fragment with more to come, a lone middle one.
        eth(
            0x0800,
            &ipv4(
                17,
                0x2000,
                36,
                &[0x9c, 0x40, 0, 7, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            ),
        ),
        eth(0x0800, &ipv4(17, 0x2003, 28, &[1, 2, 3, 4, 5, 6, 7, 8])),
        // IPv6 with a chain of extension headers (hop-by-hop, routing,
        // fragment) and one whose chain runs off the end.
        eth(
            0x86dd,
            &ipv6(
                &[
                    0, 0, 1, 4, 0, 0, 0, 0, 43, 0, 0, 0, 0, 0, 0, 0, 44, 0, 0, 1, 0, 0, 0, 1, 17,
                    0, 0, 0, 0, 0, 0, 0,
                ],
                0,
            ),
        ),
        eth(0x86dd, &ipv6(&[60, 255], 0)),
        // VLAN tags: one (802.1Q), two (QinQ), and a tag with nothing after it.
        eth(0x8100, &[0, 5, 0x08, 0x00, 0x45, 0, 0, 20]),
        eth(0x88a8, &[0, 5, 0x81, 0x00, 0, 6, 0x08, 0x06, 0, 1]),
        eth(0x8100, &[0, 5]),
        // An ARP request with a bad hardware length, and an unknown ethertype.
        eth(0x0806, &[0, 1, 8, 0, 200, 4, 0, 1]),
        eth(0x88b5, &[0xff; 60]),
    ];
    // A full-sized frame of junk behind an IPv4 type.
    frames.push(eth(0x0800, &[0x45; 1500]));
    frames
}

/// The guest NIC's MAC (vmm's default for the first NIC).
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xc0, 0x10, 0x00];

/// A packet socket on one interface of the calling thread's namespace:
/// sends whole Ethernet frames as given.
struct RawLink {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl RawLink {
    fn open(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: socket takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        Self {
            // SAFETY: a descriptor just returned, owned by nothing else.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            ifindex: ifindex as i32,
        }
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        for (d, b) in addr.sll_addr.iter_mut().zip(frame.iter().take(6)) {
            *d = *b;
        }
        // SAFETY: `frame` and `addr` are live for the call; the lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        // The kernel refuses frames shorter than a link header or longer
        // than the MTU: those never reach the wire, which is fine here.
        if n < 0 {
            eprintln!(
                "a {}-byte frame was not sent: {}",
                frame.len(),
                std::io::Error::last_os_error()
            );
        }
    }
}

fn ipv6(ext: &[u8], payload_len_extra: u16) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(ext.len() as u16 + payload_len_extra).to_be_bytes());
    h.push(0); // next header: hop-by-hop
    h.push(64);
    h.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h.extend_from_slice(ext);
    h
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn hostile_frames_from_a_client_neither_crash_nor_wedge_the_proxy() {
    let pair = Pair::start(PairOptions::colo());
    let mut client = http(&pair);
    let n = count(&mut client);
    let sent = pair.topo().client().enter(|| {
        let frames = hostile_frames(GUEST_MAC, [0x02, 0, 0, 0, 0, 0x99]);
        let raw = RawLink::open("eth0");
        for _ in 0..20 {
            for f in &frames {
                raw.send(f);
            }
        }
        frames.len() * 20
    });
    eprintln!("sent {sent} hostile frames");
    // The guest still answers on the same connection, both vmms live, the
    // pair is protected.
    for i in 1..=50 {
        assert_eq!(count(&mut client), n + i, "{}", pair.logs());
    }
    let status = pair.wait_state(Side::Primary, &["protected"], STATE_TIMEOUT);
    assert!(status.error.is_none(), "{}", status.raw);
    assert_eq!(pair.status(Side::Secondary).state, "protected");
}
