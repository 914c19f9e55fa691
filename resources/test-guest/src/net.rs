//! The network: smoltcp over the virtio-net driver, and the services the
//! tests talk to.
//!
//! | service | port | behaviour |
//! |---|---|---|
//! | ICMP echo | - | smoltcp answers pings itself |
//! | TCP echo | 7 | returns every byte, up to 4 connections at once |
//! | UDP echo | 7 | returns every datagram to its sender |
//! | HTTP/1.1 | 80 | `GET /count`, `GET /stats`, `POST /kv/KEY`, `GET /kv/KEY` |
//!
//! `GET /count` returns a counter that goes up by one per request.
//! `POST /kv/KEY` stores the body on the disk (see [`crate::store`]) and
//! answers only once the record is flushed.

use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt::Write;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use colo_test_guest::http;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;

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

/// smoltcp's view of the virtio NIC.
struct Phy {
    nic: RefCell<Nic>,
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
        let (buf, hdr, len) = self.nic.borrow_mut().receive()?;
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
}

/// The network stack and its services.
pub struct Net {
    phy: Phy,
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: Vec<SocketHandle>,
    udp: SocketHandle,
    http: Vec<HttpConn>,
    app: App,
    scratch: Vec<u8>,
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

impl Net {
    /// Brings up the NIC behind `transport` with address `ip/prefix` and an
    /// optional default gateway.
    pub fn new(
        transport: Mmio,
        ip: ([u8; 4], u8),
        gateway: Option<[u8; 4]>,
        store: Option<Store>,
        now_ns: u64,
    ) -> Result<Self, virtio_drivers::Error> {
        let dev = NetDevice::new(transport)?;
        let mac = dev.mac_address();
        let mut phy = Phy {
            nic: RefCell::new(Nic::new(dev)?),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        // Deterministic: a replica of this guest must pick the same ports
        // and sequence numbers from the same state.
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
        Ok(Self {
            phy,
            iface,
            sockets,
            echo,
            udp,
            http,
            app: App {
                count: 0,
                stats: Stats::default(),
                store,
                started_ns: now_ns,
            },
            scratch: vec![0; 16 * 1024],
        })
    }

    /// Moves packets and serves every socket once. True when anything
    /// happened (the caller polls again before it sleeps).
    pub fn poll(&mut self, now_ns: u64) -> bool {
        let now = timestamp(now_ns);
        let mut busy = self.iface.poll(now, &mut self.phy, &mut self.sockets)
            == PollResult::SocketStateChanged;
        busy |= self.serve_echo();
        busy |= self.serve_udp();
        busy |= self.serve_http(now_ns);
        if busy {
            // Send what the services queued without waiting for the next round.
            self.iface.poll(now, &mut self.phy, &mut self.sockets);
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
            while s.can_recv() && s.can_send() {
                let room = (s.send_capacity() - s.send_queue()).min(self.scratch.len());
                let n = s.recv_slice(&mut self.scratch[..room]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let _ = s.send_slice(&self.scratch[..n]);
                self.app.stats.echo_bytes += n as u64;
                busy = true;
            }
            if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
                s.close();
            }
        }
        busy
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
                    "{{\"count\":{},\"http_requests\":{},\"echo_bytes\":{},\"udp_datagrams\":{},\"kv_records\":{},\"disk\":\"{}\",\"uptime_ms\":{}}}",
                    self.count,
                    self.stats.http_requests,
                    self.stats.echo_bytes,
                    self.stats.udp_datagrams,
                    records,
                    disk,
                    (now_ns - self.started_ns) / 1_000_000
                );
                http::respond(out, 200, "OK", "application/json", body.as_bytes(), keep);
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
            (_, "/count" | "/stats") => {
                http::respond(out, 405, "Method Not Allowed", text, b"use GET\n", keep)
            }
            _ => http::respond(out, 404, "Not Found", text, b"not found\n", keep),
        }
    }
}
