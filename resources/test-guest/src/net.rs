//! The network: smoltcp over the virtio-net driver, and the services the
//! tests talk to.
//!
//! | service | port | behaviour |
//! |---|---|---|
//! | ICMP echo | - | smoltcp answers pings itself |
//! | TCP echo | 7 | returns every byte, up to 4 connections at once |
//! | UDP echo | 7 | returns every datagram to its sender |
//! | HTTP/1.1 | 80 | `GET /count`, `GET /stats`, `POST /kv/KEY`, `GET /kv/KEY`, `GET /rand`, `POST /dial` |
//! | dialled TCP echo | - | the guest connects to `dial=IP:PORT` (command line) or the `POST /dial` body `IP:PORT`, returns every byte it receives there, and connects again when the connection closes |
//!
//! `GET /count` returns a counter that goes up by one per request.
//! `POST /kv/KEY` stores the body on the disk (see [`crate::store`]) and
//! answers only once the record is flushed. `GET /rand` returns 16 random
//! bytes as hex (header `X-Rand-Source: rdrand` or `rdtsc`, see
//! [`crate::random`]). `POST /dial` replaces the dialled address (closing
//! the connection to the old one) and answers at once; `GET /stats` counts
//! the dialled connections made.
//!
//! ## Non-determinism
//!
//! Two copies of this guest started from the same state must not open TCP
//! connections alike, so that a COLO pair's sequence-number rewriting is
//! exercised: every new connection's initial sequence number (accepted or
//! dialled) and every dialled connection's local port depend on the time
//! stamp counter (and RDRAND where the CPU has it) when it is made. smoltcp
//! draws ISNs from a generator it seeds once (`Config::random_seed`) and
//! offers no way to reseed it, so the guest skips a random number of its
//! draws first (see [`colo_test_guest::isn`]): frames are taken from the
//! NIC before smoltcp sees them, and when one is a SYN, up to
//! `ISN_SKIP_RANGE` draws are skipped before smoltcp processes it.
//! `deterministic_isn=1` on the command line turns that off: the old
//! behaviour, where the same state opens connections with the same ISNs and
//! ports.

use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt::Write;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use colo_test_guest::entropy::{self, ephemeral_port, isn_skip, ISN_SKIP_RANGE};
use colo_test_guest::isn::Skipper;
use colo_test_guest::{http, netconf, wire};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;

use crate::random::Random;
use crate::store::{PutError, Store};
use crate::virtio::{GuestHal, Mmio};

const QUEUE_SIZE: usize = 64;
const RX_BUFFER_LEN: usize = 2048;
/// `virtio_net_hdr_v1`, what the device expects before each frame.
const NET_HDR_LEN: usize = 12;
const MTU: usize = 1514;
const ECHO_PORT: u16 = 7;
const HTTP_PORT: u16 = 80;
const ECHO_SOCKETS: usize = 4;
const HTTP_SOCKETS: usize = 8;
const ECHO_BUFFER: usize = 64 * 1024;
const HTTP_BUFFER: usize = 32 * 1024;
/// Least time between two connection attempts to the dialled address.
const DIAL_RETRY_NS: u64 = 100_000_000;
/// Random bytes per `GET /rand`.
const RAND_BYTES: usize = 16;

type NetDevice = VirtIONetRaw<GuestHal, Mmio, QUEUE_SIZE>;

/// The NIC with its buffers: receive buffers posted to the device (by
/// token), and frames in flight to it, oldest first. Transmits are not
/// waited for: up to a queue's worth are in flight while the guest goes on.
struct Nic {
    dev: NetDevice,
    rx: Vec<Option<Box<[u8]>>>,
    tx: VecDeque<(u16, Vec<u8>)>,
}

impl Nic {
    fn new(mut dev: NetDevice) -> Result<Self, virtio_drivers::Error> {
        let mut rx: Vec<Option<Box<[u8]>>> = (0..QUEUE_SIZE).map(|_| None).collect();
        for _ in 0..QUEUE_SIZE {
            let mut buf = vec![0u8; RX_BUFFER_LEN].into_boxed_slice();
            // SAFETY: the buffer is kept in `rx` (its heap block never
            // moves) and not touched until the device returns it.
            let token = unsafe { dev.receive_begin(&mut buf)? };
            rx[usize::from(token)] = Some(buf);
        }
        Ok(Self {
            dev,
            rx,
            tx: VecDeque::new(),
        })
    }

    /// Takes back the buffers of completed transmits.
    fn reap(&mut self) {
        while let Some(token) = self.dev.poll_transmit() {
            match self.tx.front() {
                Some((t, _)) if *t == token => {
                    if let Some((_, buf)) = self.tx.pop_front() {
                        // SAFETY: the buffer passed to transmit_begin for
                        // this token.
                        if let Err(e) = unsafe { self.dev.transmit_complete(token, &buf) } {
                            crate::say!("net: transmit completion: {e:?}");
                        }
                    }
                }
                _ => {
                    crate::say!("net: transmit {token} completed out of order");
                    break;
                }
            }
        }
    }

    /// A received frame: its buffer and where the frame lies in it.
    fn receive(&mut self) -> Option<(Box<[u8]>, usize, usize)> {
        let token = self.dev.poll_receive()?;
        let mut buf = self.rx.get_mut(usize::from(token))?.take()?;
        // SAFETY: the buffer posted with this token.
        match unsafe { self.dev.receive_complete(token, &mut buf) } {
            Ok((hdr, len)) => Some((buf, hdr, len)),
            Err(e) => {
                crate::say!("net: receive completion: {e:?}");
                self.repost(buf);
                None
            }
        }
    }

    /// Gives a receive buffer back to the device.
    fn repost(&mut self, mut buf: Box<[u8]>) {
        // SAFETY: as in `new`.
        match unsafe { self.dev.receive_begin(&mut buf) } {
            Ok(token) => self.rx[usize::from(token)] = Some(buf),
            Err(e) => crate::say!("net: cannot repost an rx buffer: {e:?}"),
        }
    }

    /// Queues a frame of `len` bytes that `fill` writes.
    fn transmit<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        self.reap();
        while !self.dev.can_send() {
            core::hint::spin_loop();
            self.reap();
        }
        let mut buf = vec![0u8; NET_HDR_LEN + len];
        let hdr = self.dev.fill_buffer_header(&mut buf).unwrap_or(NET_HDR_LEN);
        let result = fill(&mut buf[hdr..]);
        // SAFETY: the buffer is kept in `tx` until its completion is reaped.
        match unsafe { self.dev.transmit_begin(&buf) } {
            Ok(token) => self.tx.push_back((token, buf)),
            Err(e) => crate::say!("net: send failed: {e:?}"),
        }
        result
    }
}

/// smoltcp's view of the virtio NIC. Frames reach smoltcp only through
/// `pending`, which [`Phy::fetch`] fills before each interface poll, so
/// the guest sees every frame before smoltcp processes it.
struct Phy {
    nic: RefCell<Nic>,
    pending: VecDeque<(Box<[u8]>, usize, usize)>,
}

impl Phy {
    /// Takes every frame the NIC has received into `pending`; returns how
    /// many of them open a TCP connection.
    fn fetch(&mut self) -> usize {
        let mut syns = 0;
        let nic = self.nic.get_mut();
        while let Some((buf, hdr, len)) = nic.receive() {
            syns += usize::from(buf.get(hdr..hdr + len).is_some_and(wire::is_tcp_syn));
            self.pending.push_back((buf, hdr, len));
        }
        syns
    }
}

struct Rx<'a> {
    buf: Box<[u8]>,
    range: core::ops::Range<usize>,
    nic: &'a RefCell<Nic>,
}

struct Tx<'a> {
    nic: &'a RefCell<Nic>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(&self.buf[self.range.clone()]);
        self.nic.borrow_mut().repost(self.buf);
        result
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.nic.borrow_mut().transmit(len, f)
    }
}

impl Device for Phy {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let (buf, hdr, len) = self.pending.pop_front()?;
        Some((
            Rx {
                buf,
                range: hdr..hdr + len,
                nic: &self.nic,
            },
            Tx { nic: &self.nic },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        Some(Tx { nic: &self.nic })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// Counters `GET /stats` reports.
#[derive(Default)]
struct Stats {
    http_requests: u64,
    echo_bytes: u64,
    udp_datagrams: u64,
    dial_connections: u64,
}

/// One HTTP connection slot.
struct HttpConn {
    handle: SocketHandle,
    input: Vec<u8>,
    output: Vec<u8>,
    close_after: bool,
}

/// The application state the HTTP handlers use.
struct App {
    count: u64,
    stats: Stats,
    store: Option<Store>,
    started_ns: u64,
    random: Random,
    /// A `POST /dial` target not yet acted on.
    dial_request: Option<IpEndpoint>,
}

/// The connection the guest opens itself (see the module doc).
struct Dial {
    handle: SocketHandle,
    target: Option<IpEndpoint>,
    /// No new attempt before this time.
    next_attempt_ns: u64,
    /// Local port of the current attempt or connection.
    port: u16,
    /// The current connection was established (and reported).
    up: bool,
    /// Attempts made, for deterministic ports.
    attempts: u64,
    /// A failed `connect` to this target was reported.
    failure_said: bool,
}

/// How the stack behaves, from the command line.
pub struct Options {
    /// `deterministic_isn=1`: ISNs and dialled ports follow from the
    /// guest's state alone.
    pub deterministic_isn: bool,
    /// `dial=IP:PORT`: connect there at start.
    pub dial: Option<([u8; 4], u16)>,
    /// `rand_source=rdtsc`: draw random numbers from the TSC alone, even
    /// where RDRAND works.
    pub rdtsc_only: bool,
}

/// The network stack and its services.
pub struct Net {
    phy: Phy,
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: Vec<SocketHandle>,
    udp: SocketHandle,
    http: Vec<HttpConn>,
    dial: Dial,
    app: App,
    scratch: Vec<u8>,
    deterministic_isn: bool,
    isn_skipper: Skipper,
}

fn tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer]),
        tcp::SocketBuffer::new(vec![0; buffer]),
    )
}

fn timestamp(now_ns: u64) -> Instant {
    Instant::from_micros((now_ns / 1000) as i64)
}

fn endpoint(([a, b, c, d], port): ([u8; 4], u16)) -> IpEndpoint {
    IpEndpoint::new(IpAddress::v4(a, b, c, d), port)
}

/// Echoes what `s` received while it can send; true when bytes moved.
fn echo(s: &mut tcp::Socket, scratch: &mut [u8], bytes: &mut u64) -> bool {
    let mut busy = false;
    while s.can_recv() && s.can_send() {
        let room = (s.send_capacity() - s.send_queue()).min(scratch.len());
        let n = s.recv_slice(&mut scratch[..room]).unwrap_or(0);
        if n == 0 {
            break;
        }
        let _ = s.send_slice(&scratch[..n]);
        *bytes += n as u64;
        busy = true;
    }
    if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
        s.close();
    }
    busy
}

impl Net {
    /// Brings up the NIC behind `transport` with address `ip/prefix` and an
    /// optional default gateway.
    pub fn new(
        transport: Mmio,
        ip: ([u8; 4], u8),
        gateway: Option<[u8; 4]>,
        store: Option<Store>,
        options: &Options,
        now_ns: u64,
    ) -> Result<Self, virtio_drivers::Error> {
        let dev = NetDevice::new(transport)?;
        let mac = dev.mac_address();
        let mut phy = Phy {
            nic: RefCell::new(Nic::new(dev)?),
            pending: VecDeque::new(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        // A seed from the address alone: with `deterministic_isn`, the
        // same state opens connections alike; otherwise skipped draws make
        // each connection's ISN random (see the module doc).
        config.random_seed = u64::from(u32::from_be_bytes(ip.0)) ^ 0x434f_4c4f;
        let mut iface = Interface::new(config, &mut phy, timestamp(now_ns));
        let [a, b, c, d] = ip.0;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), ip.1));
        });
        if let Some([a, b, c, d]) = gateway {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        }
        let mut sockets = SocketSet::new(Vec::new());
        let echo = (0..ECHO_SOCKETS)
            .map(|_| sockets.add(tcp_socket(ECHO_BUFFER)))
            .collect();
        let udp = sockets.add(udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 64 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 64 * 1024]),
        ));
        let http = (0..HTTP_SOCKETS)
            .map(|_| HttpConn {
                handle: sockets.add(tcp_socket(HTTP_BUFFER)),
                input: Vec::new(),
                output: Vec::new(),
                close_after: false,
            })
            .collect();
        let dial = Dial {
            handle: sockets.add(tcp_socket(ECHO_BUFFER)),
            target: options.dial.map(endpoint),
            next_attempt_ns: 0,
            port: 0,
            up: false,
            attempts: 0,
            failure_said: false,
        };
        let random = Random::new(options.rdtsc_only);
        crate::say!(
            "net up mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip {a}.{b}.{c}.{d}/{}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            ip.1
        );
        let mut net = Self {
            phy,
            iface,
            sockets,
            echo,
            udp,
            http,
            dial,
            app: App {
                count: 0,
                stats: Stats::default(),
                store,
                started_ns: now_ns,
                random,
                dial_request: None,
            },
            scratch: vec![0; 16 * 1024],
            deterministic_isn: options.deterministic_isn,
            isn_skipper: Skipper::new(Ipv4Address::new(a, b, c, d)),
        };
        net.report_randomness();
        Ok(net)
    }

    /// Says where randomness comes from and, with random ISNs, what the
    /// most draws a connection may skip cost (in TSC cycles).
    fn report_randomness(&mut self) {
        let source = self.app.random.source().name();
        if self.deterministic_isn {
            crate::say!("random source {source}, deterministic ISNs");
            return;
        }
        let draws = (ISN_SKIP_RANGE - 1) as u32;
        let start = crate::arch::rdtsc();
        let skipped = self.isn_skipper.skip(&mut self.iface, draws);
        let cycles = crate::arch::rdtsc().wrapping_sub(start);
        crate::say!(
            "random source {source}, random ISNs (skipping {skipped} draws: {cycles} TSC cycles)"
        );
    }

    /// Skips a random number of smoltcp's ISN draws, unless ISNs are to be
    /// deterministic.
    fn randomise_next_isn(&mut self) {
        if !self.deterministic_isn {
            let draws = isn_skip(self.app.random.next_u64());
            self.isn_skipper.skip(&mut self.iface, draws);
        }
    }

    /// One interface poll, over the frames received so far.
    fn poll_iface(&mut self, now: Instant) -> PollResult {
        if self.phy.fetch() > 0 {
            self.randomise_next_isn();
        }
        self.iface.poll(now, &mut self.phy, &mut self.sockets)
    }

    /// Moves packets and serves every socket once. True when anything
    /// happened (the caller polls again before it sleeps).
    pub fn poll(&mut self, now_ns: u64) -> bool {
        let now = timestamp(now_ns);
        let mut busy = self.poll_iface(now) == PollResult::SocketStateChanged;
        busy |= self.serve_echo();
        busy |= self.serve_udp();
        busy |= self.serve_http(now_ns);
        busy |= self.serve_dial(now_ns);
        if busy {
            // Send what the services queued without waiting for the next round.
            self.poll_iface(now);
        }
        busy
    }

    fn serve_echo(&mut self) -> bool {
        let mut busy = false;
        for &h in &self.echo {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if !s.is_open() {
                let _ = s.listen(ECHO_PORT);
                continue;
            }
            busy |= echo(s, &mut self.scratch, &mut self.app.stats.echo_bytes);
        }
        busy
    }

    /// The dialled connection: (re)connects when it is closed, echoes when
    /// it is up.
    fn serve_dial(&mut self, now_ns: u64) -> bool {
        if let Some(target) = self.app.dial_request.take() {
            self.sockets
                .get_mut::<tcp::Socket>(self.dial.handle)
                .abort();
            self.dial.target = Some(target);
            self.dial.next_attempt_ns = 0;
            self.dial.failure_said = false;
        }
        let Some(target) = self.dial.target else {
            return false;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(self.dial.handle);
        if s.is_open() {
            if !self.dial.up && s.state() == tcp::State::Established {
                self.dial.up = true;
                self.app.stats.dial_connections += 1;
                crate::say!("dial: connected to {target} from port {}", self.dial.port);
            }
            return echo(s, &mut self.scratch, &mut self.app.stats.echo_bytes);
        }
        if self.dial.up {
            self.dial.up = false;
            crate::say!("dial: connection to {target} closed");
        }
        if now_ns < self.dial.next_attempt_ns {
            return false;
        }
        self.dial.next_attempt_ns = now_ns + DIAL_RETRY_NS;
        self.dial.attempts += 1;
        self.dial.port = if self.deterministic_isn {
            ephemeral_port(self.dial.attempts - 1)
        } else {
            ephemeral_port(self.app.random.next_u64())
        };
        self.randomise_next_isn();
        let s = self.sockets.get_mut::<tcp::Socket>(self.dial.handle);
        if let Err(e) = s.connect(self.iface.context(), target, self.dial.port) {
            // smoltcp refuses only endpoints it cannot use: say so once.
            if !self.dial.failure_said {
                self.dial.failure_said = true;
                crate::say!("dial: cannot connect to {target}: {e:?}");
            }
            return false;
        }
        true
    }

    fn serve_udp(&mut self) -> bool {
        let s = self.sockets.get_mut::<udp::Socket>(self.udp);
        if !s.is_open() {
            let _ = s.bind(ECHO_PORT);
        }
        let mut busy = false;
        while s.can_send() {
            let Ok((n, meta)) = s.recv_slice(&mut self.scratch) else {
                break;
            };
            let _ = s.send_slice(&self.scratch[..n], meta.endpoint);
            self.app.stats.udp_datagrams += 1;
            busy = true;
        }
        busy
    }

    fn serve_http(&mut self, now_ns: u64) -> bool {
        let mut busy = false;
        for conn in &mut self.http {
            let s = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if !s.is_open() {
                conn.input.clear();
                conn.output.clear();
                conn.close_after = false;
                let _ = s.listen(HTTP_PORT);
                continue;
            }
            if s.can_recv() && conn.input.len() < http::MAX_HEAD + http::MAX_BODY + 1 {
                let _ = s.recv(|data| {
                    conn.input.extend_from_slice(data);
                    (data.len(), ())
                });
                busy = true;
            }
            // Answer requests one at a time, each once the previous answer
            // is on its way.
            while conn.output.is_empty() && !conn.close_after {
                match http::parse(&conn.input) {
                    Ok(None) => break,
                    Ok(Some((req, used))) => {
                        conn.close_after = !req.keep_alive;
                        self.app.handle(&req, &mut conn.output, now_ns);
                        conn.input.drain(..used);
                    }
                    Err(e) => {
                        let (status, reason) = e.status();
                        http::respond(
                            &mut conn.output,
                            status,
                            reason,
                            "text/plain",
                            reason.as_bytes(),
                            false,
                        );
                        conn.close_after = true;
                        conn.input.clear();
                    }
                }
                busy = true;
            }
            if !conn.output.is_empty() && s.can_send() {
                let n = s.send_slice(&conn.output).unwrap_or(0);
                conn.output.drain(..n);
                busy |= n > 0;
            }
            if conn.output.is_empty() && (conn.close_after || s.state() == tcp::State::CloseWait) {
                s.close();
            }
        }
        busy
    }
}

impl App {
    fn handle(&mut self, req: &http::Request<'_>, out: &mut Vec<u8>, now_ns: u64) {
        self.stats.http_requests += 1;
        let keep = req.keep_alive;
        let text = "text/plain";
        match (req.method, req.path) {
            ("GET", "/count") => {
                self.count += 1;
                let mut body = alloc::string::String::new();
                let _ = write!(body, "{}", self.count);
                http::respond(out, 200, "OK", text, body.as_bytes(), keep);
            }
            ("GET", "/stats") => {
                let mut body = alloc::string::String::new();
                let (disk, records) = match &self.store {
                    Some(s) if s.read_only() => ("ro", s.records()),
                    Some(s) => ("rw", s.records()),
                    None => ("none", 0),
                };
                let _ = write!(
                    body,
                    "{{\"count\":{},\"http_requests\":{},\"echo_bytes\":{},\"udp_datagrams\":{},\"dial_connections\":{},\"kv_records\":{},\"disk\":\"{}\",\"uptime_ms\":{}}}",
                    self.count,
                    self.stats.http_requests,
                    self.stats.echo_bytes,
                    self.stats.udp_datagrams,
                    self.stats.dial_connections,
                    records,
                    disk,
                    (now_ns - self.started_ns) / 1_000_000
                );
                http::respond(out, 200, "OK", "application/json", body.as_bytes(), keep);
            }
            ("GET", "/rand") => {
                let mut bytes = [0u8; RAND_BYTES];
                self.random.fill(&mut bytes);
                let mut body = entropy::hex(&bytes);
                // On the console too: a COLO test compares the answer the
                // client got with what each VM drew.
                crate::say!("rand {body}");
                body.push('\n');
                http::respond_with(
                    out,
                    200,
                    "OK",
                    text,
                    &[("X-Rand-Source", self.random.source().name())],
                    body.as_bytes(),
                    keep,
                );
            }
            ("POST", "/dial") => {
                match core::str::from_utf8(req.body)
                    .ok()
                    .and_then(netconf::parse_endpoint)
                {
                    Some(target) => {
                        let target = endpoint(target);
                        self.dial_request = Some(target);
                        let mut body = alloc::string::String::new();
                        let _ = writeln!(body, "dialling {target}");
                        http::respond(out, 200, "OK", text, body.as_bytes(), keep);
                    }
                    None => {
                        http::respond(out, 400, "Bad Request", text, b"expected IP:PORT\n", keep)
                    }
                }
            }
            (method, path) if path.starts_with("/kv/") => {
                let key = &path.as_bytes()[4..];
                let Some(store) = self.store.as_mut() else {
                    http::respond(out, 503, "Service Unavailable", text, b"no disk\n", keep);
                    return;
                };
                match method {
                    "POST" | "PUT" => match store.put(key, req.body) {
                        Ok(()) => http::respond(out, 201, "Created", text, b"stored\n", keep),
                        Err(PutError::BadKey) => {
                            http::respond(out, 400, "Bad Request", text, b"bad key\n", keep)
                        }
                        Err(PutError::TooLong) => http::respond(
                            out,
                            413,
                            "Payload Too Large",
                            text,
                            b"value too long\n",
                            keep,
                        ),
                        Err(PutError::Full) => http::respond(
                            out,
                            507,
                            "Insufficient Storage",
                            text,
                            b"disk full\n",
                            keep,
                        ),
                        Err(PutError::Disk) => http::respond(
                            out,
                            500,
                            "Internal Server Error",
                            text,
                            b"disk write failed\n",
                            keep,
                        ),
                    },
                    "GET" => match store.get(key) {
                        Ok(Some(value)) => {
                            http::respond(out, 200, "OK", "application/octet-stream", &value, keep)
                        }
                        Ok(None) => {
                            http::respond(out, 404, "Not Found", text, b"no such key\n", keep)
                        }
                        Err(()) => http::respond(
                            out,
                            500,
                            "Internal Server Error",
                            text,
                            b"disk read failed\n",
                            keep,
                        ),
                    },
                    _ => http::respond(
                        out,
                        405,
                        "Method Not Allowed",
                        text,
                        b"use GET or POST\n",
                        keep,
                    ),
                }
            }
            (_, "/count" | "/stats" | "/rand") => {
                http::respond(out, 405, "Method Not Allowed", text, b"use GET\n", keep)
            }
            (_, "/dial") => {
                http::respond(out, 405, "Method Not Allowed", text, b"use POST\n", keep)
            }
            _ => http::respond(out, 404, "Not Found", text, b"not found\n", keep),
        }
    }
}
