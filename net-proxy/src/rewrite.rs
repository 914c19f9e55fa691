//! The secondary's TCP rewriter: it makes the SVM's TCP connections speak
//! in the PVM's sequence numbers.
//!
//! It sits between the SVM's NIC and the world. [`Rewriter::inbound`] sees
//! the frames the world sends to the guest (the client's frames the
//! primary mirrors; the client talks to the PVM, so its acknowledgements
//! are in the PVM's sequence space); [`Rewriter::outbound`] sees the SVM's
//! frames (to the primary's compare proxy before a failover, to the world
//! after). A connection opened after the last checkpoint got different
//! initial sequence numbers (ISNs) in the two guests; the rewriter learns
//! the offset `PVM ISN - SVM ISN` (modulo 2^32) of each such connection
//! and translates:
//!
//! | direction | rewritten | unchanged |
//! | --- | --- | --- |
//! | outbound (SVM → world) | sequence number `+ offset` | acknowledgement and SACK blocks (they are in the peer's space) |
//! | inbound (world → SVM) | acknowledgement number `- offset`, the edges of every SACK block `- offset` (they acknowledge SVM data), when the ACK flag is set | sequence number |
//!
//! The TCP checksum is updated incrementally (RFC 1624, eqn. 3) over the
//! 16-bit words that changed, so a frame whose checksum was right stays
//! right, and one whose checksum was wrong stays wrong by as much. IPv4
//! and IPv6 (extension headers included), up to two VLAN tags: whatever
//! [`packet::parse`] classifies as [`Packet::Tcp`]. Anything else (other
//! protocols, fragments, frames that do not parse) passes unchanged, as do
//! connections the rewriter does not know. Frames never change size.
//!
//! # What is learnt when
//!
//! - **The guest accepts** (client SYN in, SVM SYN-ACK out): the SVM's ISN
//!   is the sequence number of its outbound SYN-ACK; the PVM's ISN is the
//!   acknowledgement number of the next inbound frame with ACK and without
//!   SYN, minus one (the client acknowledges the PVM's SYN-ACK). That
//!   frame is the first one translated.
//! - **The guest opens** (SVM SYN out, server SYN-ACK in): the SVM's ISN
//!   is the sequence number of its outbound SYN; the PVM's ISN is the
//!   inbound SYN-ACK's acknowledgement number minus one, and that SYN-ACK
//!   is already translated (it is what the SVM must see). An RST with ACK
//!   refusing the SYN teaches the same, so the SVM sees the refusal.
//! - An offset of 0 (the same ISNs) leaves every frame byte-identical: the
//!   connection is tracked, not rewritten.
//! - Connections that existed at the last checkpoint are unknown here and
//!   pass unchanged: their offset is 0, the SVM being a copy of the PVM
//!   then. [`Rewriter::reset`] (a checkpoint was loaded) forgets every
//!   offset and every half-learnt handshake.
//! - After a failover nothing changes: the caller keeps passing the frames,
//!   the rewriter keeps translating the connections it knows.
//!
//! A guest's SYN or SYN-ACK with a sequence number other than the one
//! known for its connection starts the connection over (a new connection
//! reusing the ports); the same one is a retransmission.
//!
//! # Forgetting
//!
//! A connection is closed once both FINs or an RST went through. Closed
//! connections and half-learnt handshakes are forgotten [`IDLE_LINGER`]
//! after their last frame (Linux's TIME_WAIT length: retransmitted FINs
//! and last ACKs still need translating until then). The table holds at
//! most `max_connections`; a new connection beyond that evicts a closed
//! one first, then a half-learnt handshake, then the least recently used
//! one ([`RewriteStats::evictions`] counts them). Every frame is input:
//! nothing here panics or grows without bound.
//!
//! # Limits
//!
//! - Until the offset is known, the SVM's SYN-ACK (guest accepts) or SYN
//!   (guest opens) passes with the SVM's own ISN: before a failover the
//!   compare proxy matches by offset within the connection anyway. After
//!   a failover in the middle of a handshake, the peer's next
//!   acknowledgement (of the PVM's SYN or SYN-ACK) still teaches the
//!   offset, but the SVM's retransmitted SYN or SYN-ACK before it goes
//!   out with the SVM's ISN.
//! - The first acknowledgement is taken to acknowledge exactly the SYN or
//!   SYN-ACK: data carried by a SYN (TCP Fast Open) shifts the offset.
//! - Simultaneous open (SYNs crossing) is not recognised.
//! - TCP timestamps are not translated: the two guests' TSvals differ, and
//!   a peer that checks PAWS against the PVM's last TSval may drop the
//!   SVM's segments after a failover if the SVM's clock value is behind.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::time::{Duration, Instant};

use etherparse::{SlicedPacket, TransportSlice};

use crate::packet::{self, FlowKey, Packet, TcpFlags};

/// How long a closed connection or a half-learnt handshake is remembered
/// after its last frame.
pub const IDLE_LINGER: Duration = Duration::from_secs(60);

/// A table size for [`Rewriter::new`] when nothing else is known: 16 K
/// connections, a few MiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16 * 1024;

/// Counts for metrics and `GET /status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// Connections in the table: learning, learnt (any offset) or closed
    /// and not yet forgotten.
    pub tracked: usize,
    /// Tracked connections whose offset is learnt and not 0.
    pub rewritten: usize,
    /// Frames changed since the rewriter was created.
    pub frames_rewritten: u64,
    /// Connections dropped to make room since the rewriter was created.
    pub evictions: u64,
}

/// The secondary's TCP sequence rewriter. See the module doc.
#[derive(Debug)]
pub struct Rewriter {
    max_connections: usize,
    /// Keyed by the guest's direction (source = the guest).
    conns: HashMap<FlowKey, Conn>,
    /// Eviction order: closed, then learning, then learnt; least recently
    /// used first within each.
    order: BTreeMap<(Class, u64), FlowKey>,
    next_stamp: u64,
    frames_rewritten: u64,
    evictions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Closed,
    Learning,
    Learnt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// World → SVM.
    Inbound,
    /// SVM → world.
    Outbound,
}

#[derive(Debug)]
struct Conn {
    /// The guest sent the SYN (rather than the SYN-ACK).
    guest_opened: bool,
    svm_isn: u32,
    /// `PVM ISN - SVM ISN`, once learnt.
    offset: Option<u32>,
    fin_out: bool,
    fin_in: bool,
    rst: bool,
    /// Where the connection is in `order`.
    slot: (Class, u64),
    last_seen: Instant,
}

impl Conn {
    fn class(&self) -> Class {
        if self.rst || (self.fin_in && self.fin_out) {
            Class::Closed
        } else if self.offset.is_some() {
            Class::Learnt
        } else {
            Class::Learning
        }
    }
}

/// What the rewriter needs of a TCP frame.
#[derive(Debug, Clone, Copy)]
struct Segment {
    key: FlowKey,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    /// Where the TCP header starts in the frame, and its length.
    header_at: usize,
    header_len: usize,
}

impl Segment {
    fn locate(frame: &[u8]) -> Option<Segment> {
        let Ok(Packet::Tcp {
            key,
            seq,
            ack,
            flags,
            ..
        }) = packet::parse(frame)
        else {
            return None;
        };
        // The parser found a TCP header; etherparse's slice says where.
        let sliced = SlicedPacket::from_ethernet(frame).ok()?;
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            return None;
        };
        let header = tcp.header_slice();
        let header_at = (header.as_ptr() as usize).checked_sub(frame.as_ptr() as usize)?;
        Some(Segment {
            key,
            seq,
            ack,
            flags,
            header_at,
            header_len: header.len(),
        })
    }
}

impl Rewriter {
    /// A rewriter that remembers at most `max_connections` connections
    /// (0: none, every frame passes unchanged).
    pub fn new(max_connections: usize) -> Self {
        Rewriter {
            max_connections,
            conns: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
            frames_rewritten: 0,
            evictions: 0,
        }
    }

    /// Translates, in place, a frame from the world to the SVM. A frame it
    /// cannot parse passes unchanged.
    pub fn inbound(&mut self, frame: &mut [u8]) {
        self.process(Direction::Inbound, frame, Instant::now());
    }

    /// Translates, in place, a frame from the SVM to the world. A frame it
    /// cannot parse passes unchanged.
    pub fn outbound(&mut self, frame: &mut [u8]) {
        self.process(Direction::Outbound, frame, Instant::now());
    }

    /// A checkpoint was loaded: the SVM is a copy of the PVM, every
    /// connection has offset 0. Forgets all offsets and handshakes.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.order.clear();
    }

    pub fn stats(&self) -> RewriteStats {
        RewriteStats {
            tracked: self.conns.len(),
            rewritten: self
                .conns
                .values()
                .filter(|c| c.offset.is_some_and(|o| o != 0))
                .count(),
            frames_rewritten: self.frames_rewritten,
            evictions: self.evictions,
        }
    }

    fn process(&mut self, direction: Direction, frame: &mut [u8], now: Instant) {
        self.expire(now);
        let Some(segment) = Segment::locate(frame) else {
            return;
        };
        let offset = self.learn(direction, &segment, now);
        if let Some(offset) = offset.filter(|&o| o != 0) {
            if translate(direction, frame, &segment, offset) {
                self.frames_rewritten += 1;
            }
        }
    }

    /// Updates the connection's state with `segment`; returns its offset
    /// if known.
    fn learn(&mut self, direction: Direction, segment: &Segment, now: Instant) -> Option<u32> {
        let flags = segment.flags;
        let syn = flags.contains(TcpFlags::SYN);
        let ack = flags.contains(TcpFlags::ACK);
        let key = match direction {
            Direction::Outbound => segment.key,
            Direction::Inbound => segment.key.reversed(),
        };
        match direction {
            Direction::Outbound if syn => {
                // SYN: the guest opens; SYN-ACK: it accepts.
                let guest_opened = !ack;
                let retransmitted = self.conns.get(&key).is_some_and(|c| {
                    c.guest_opened == guest_opened
                        && c.svm_isn == segment.seq
                        && c.class() != Class::Closed
                });
                if !retransmitted {
                    self.insert(key, guest_opened, segment.seq, now);
                }
            }
            Direction::Inbound if ack => {
                if let Some(c) = self.conns.get_mut(&key) {
                    // The guest's SYN is acknowledged by the SYN-ACK (or
                    // the RST refusing it); the guest's SYN-ACK by the
                    // handshake's ACK.
                    let acknowledges_isn = if c.guest_opened {
                        syn || flags.contains(TcpFlags::RST)
                    } else {
                        !syn
                    };
                    if c.offset.is_none() && acknowledges_isn {
                        let pvm_isn = segment.ack.wrapping_sub(1);
                        c.offset = Some(pvm_isn.wrapping_sub(c.svm_isn));
                    }
                }
            }
            _ => {}
        }
        let c = self.conns.get_mut(&key)?;
        c.rst |= flags.contains(TcpFlags::RST);
        if flags.contains(TcpFlags::FIN) {
            match direction {
                Direction::Outbound => c.fin_out = true,
                Direction::Inbound => c.fin_in = true,
            }
        }
        c.last_seen = now;
        // To the end of its class in the eviction order.
        self.order.remove(&c.slot);
        c.slot = (c.class(), self.next_stamp);
        self.next_stamp += 1;
        self.order.insert(c.slot, key);
        c.offset
    }

    /// Starts (or starts over) a connection.
    fn insert(&mut self, key: FlowKey, guest_opened: bool, svm_isn: u32, now: Instant) {
        if let Some(old) = self.conns.remove(&key) {
            self.order.remove(&old.slot);
        } else if self.conns.len() >= self.max_connections {
            let Some((_, victim)) = self.order.pop_first() else {
                return; // max_connections is 0
            };
            self.conns.remove(&victim);
            self.evictions += 1;
        }
        self.conns.insert(
            key,
            Conn {
                guest_opened,
                svm_isn,
                offset: None,
                fin_out: false,
                fin_in: false,
                rst: false,
                slot: (Class::Learning, self.next_stamp),
                last_seen: now,
            },
        );
        self.order.insert((Class::Learning, self.next_stamp), key);
        self.next_stamp += 1;
    }

    /// Forgets closed connections and half-learnt handshakes idle for
    /// [`IDLE_LINGER`].
    fn expire(&mut self, now: Instant) {
        for class in [Class::Closed, Class::Learning] {
            let range = (
                Bound::Included((class, 0)),
                Bound::Included((class, u64::MAX)),
            );
            while let Some((&slot, &key)) = self.order.range(range).next() {
                let idle = self
                    .conns
                    .get(&key)
                    .is_none_or(|c| now.saturating_duration_since(c.last_seen) >= IDLE_LINGER);
                if !idle {
                    break;
                }
                self.order.remove(&slot);
                self.conns.remove(&key);
            }
        }
    }
}

/// Applies `offset` to the frame's sequence number (outbound) or to its
/// acknowledgement and SACK edges (inbound, with ACK set), and updates the
/// TCP checksum. Returns whether anything changed.
fn translate(direction: Direction, frame: &mut [u8], segment: &Segment, offset: u32) -> bool {
    let Some(header) = frame.get_mut(segment.header_at..segment.header_at + segment.header_len)
    else {
        return false;
    };
    if header.len() < 20 {
        return false;
    }
    let mut checksum = Incremental::default();
    match direction {
        Direction::Outbound => {
            checksum.replace_u32(header, 4, segment.seq.wrapping_add(offset));
        }
        Direction::Inbound => {
            if !segment.flags.contains(TcpFlags::ACK) {
                return false;
            }
            checksum.replace_u32(header, 8, segment.ack.wrapping_sub(offset));
            let (edges, count) = sack_edges(header);
            for &at in &edges[..count] {
                let edge = read_u32(header, at).wrapping_sub(offset);
                checksum.replace_u32(header, at, edge);
            }
        }
    }
    checksum.apply(header);
    true
}

/// The TCP checksum field's offset in the header.
const CHECKSUM_AT: usize = 16;

/// At most 10 four-byte edges fit in 40 bytes of options.
const MAX_SACK_EDGES: usize = 10;

/// Where the edges of the SACK blocks (RFC 2018, option kind 5) are in a
/// TCP header. Options are walked until the end-of-list option or one
/// whose length is below 2 or beyond the header; a SACK option whose
/// length is not 2 + 8n is skipped.
fn sack_edges(header: &[u8]) -> ([usize; MAX_SACK_EDGES], usize) {
    let mut edges = [0; MAX_SACK_EDGES];
    let mut count = 0;
    let mut at = 20;
    while let Some(&kind) = header.get(at) {
        match kind {
            0 => break,
            1 => at += 1,
            _ => {
                let Some(&len) = header.get(at + 1) else {
                    break;
                };
                let len = usize::from(len);
                if len < 2 || at + len > header.len() {
                    break;
                }
                if kind == 5 && (len - 2) % 8 == 0 {
                    for edge in (at + 2..at + len).step_by(4) {
                        if count < MAX_SACK_EDGES {
                            edges[count] = edge;
                            count += 1;
                        }
                    }
                }
                at += len;
            }
        }
    }
    (edges, count)
}

fn read_u32(header: &[u8], at: usize) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&header[at..at + 4]);
    u32::from_be_bytes(bytes)
}

/// An RFC 1624 incremental checksum update: the one's complement sum of
/// `~old + new` over the changed 16-bit words.
#[derive(Debug, Default)]
struct Incremental {
    sum: u32,
}

impl Incremental {
    /// Writes `value` at `at` (not overlapping the checksum field) and
    /// records the change of the 16-bit words it touches (aligned on the
    /// header's start, as the checksum sums them).
    fn replace_u32(&mut self, header: &mut [u8], at: usize, value: u32) {
        let words = at & !1..(at + 5) & !1;
        self.sum += words
            .clone()
            .step_by(2)
            .map(|w| u32::from(!word(header, w)))
            .sum::<u32>();
        header[at..at + 4].copy_from_slice(&value.to_be_bytes());
        self.sum += words
            .step_by(2)
            .map(|w| u32::from(word(header, w)))
            .sum::<u32>();
    }

    /// Writes the updated checksum: `HC' = ~(~HC + ~m + m')`.
    fn apply(self, header: &mut [u8]) {
        let old = word(header, CHECKSUM_AT);
        let new = !fold(u32::from(!old) + u32::from(fold(self.sum)));
        header[CHECKSUM_AT..CHECKSUM_AT + 2].copy_from_slice(&new.to_be_bytes());
    }
}

fn word(header: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([header[at], header.get(at + 1).copied().unwrap_or(0)])
}

/// Folds the carries back in (end-around carry).
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The body of the `rewrite` fuzz target (fuzz/fuzz_targets/rewrite.rs),
/// which the unit tests also run on fuzz/regressions/rewrite/.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz {
    use super::{Rewriter, SlicedPacket, TransportSlice};
    use crate::packet::{parse, Packet};
    use etherparse::NetSlice;

    /// Any bytes as a stream of frames through a rewriter, both
    /// directions, with resets and a 4-connection table (so eviction
    /// runs): never a panic; a frame that does not parse or is not TCP is
    /// left alone; a TCP frame keeps its connection, flags, window and
    /// payload, and a right checksum stays right.
    ///
    /// Input: records of `[control, length, frame bytes...]`; control 0xff
    /// is a reset (a checkpoint), otherwise its low bit picks outbound (1)
    /// or inbound (0).
    pub fn stream(data: &[u8]) {
        let mut rewriter = Rewriter::new(4);
        let mut rest = data;
        while let [control, len, tail @ ..] = rest {
            if *control == 0xff {
                rewriter.reset();
                rest = &rest[1..];
                continue;
            }
            let len = usize::from(*len).min(tail.len());
            let mut frame = tail[..len].to_vec();
            rest = &tail[len..];
            let before = frame.clone();
            if control & 1 == 1 {
                rewriter.outbound(&mut frame);
            } else {
                rewriter.inbound(&mut frame);
            }
            match shape(&before) {
                Some(was) => assert_eq!(shape(&frame), Some(was), "tcp frame reshaped"),
                None => assert_eq!(frame, before, "a frame other than TCP changed"),
            }
            if checksum_ok(&before) == Some(true) {
                assert_eq!(checksum_ok(&frame), Some(true), "checksum broken");
            }
        }
        let stats = rewriter.stats();
        assert!(stats.tracked <= 4 && stats.rewritten <= stats.tracked);
    }

    /// What rewriting a TCP frame must not change (None: not TCP).
    fn shape(frame: &[u8]) -> Option<Packet<'_>> {
        match parse(frame).ok()? {
            Packet::Tcp {
                key,
                flags,
                window,
                payload,
                ..
            } => Some(Packet::Tcp {
                key,
                seq: 0,
                ack: 0,
                flags,
                window,
                payload,
            }),
            _ => None,
        }
    }

    /// Whether the TCP checksum is right, for TCP over IP.
    pub(crate) fn checksum_ok(frame: &[u8]) -> Option<bool> {
        let sliced = SlicedPacket::from_ethernet(frame).ok()?;
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            return None;
        };
        let expected = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => {
                tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination())
            }
            Some(NetSlice::Ipv6(ip)) => {
                tcp.calc_checksum_ipv6(ip.header().source(), ip.header().destination())
            }
            _ => return None,
        };
        Some(expected.ok()? == tcp.checksum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{
        ip_number, IpHeaders, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6Header,
        PacketBuilder, TcpHeader, VlanId,
    };
    use proptest::prelude::*;

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GUEST_V4: [u8; 4] = [10, 0, 0, 2];
    const PEER_V4: [u8; 4] = [10, 0, 0, 1];
    const GUEST_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const PEER_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const PEER_PORT: u16 = 40000;

    /// A TCP segment between the guest and its peer, as a test writes it.
    #[derive(Debug, Clone)]
    struct Seg {
        from_guest: bool,
        v6: bool,
        vlan: Option<u16>,
        guest_port: u16,
        seq: u32,
        ack: Option<u32>,
        syn: bool,
        fin: bool,
        rst: bool,
        /// SACK blocks, put after `nops` NOP options (1: the edges are not
        /// 16-bit aligned).
        sack: Vec<(u32, u32)>,
        nops: usize,
        payload: Vec<u8>,
    }

    impl Seg {
        fn new(from_guest: bool, seq: u32) -> Seg {
            Seg {
                from_guest,
                v6: false,
                vlan: None,
                guest_port: 80,
                seq,
                ack: None,
                syn: false,
                fin: false,
                rst: false,
                sack: Vec::new(),
                nops: 2,
                payload: Vec::new(),
            }
        }

        fn guest(seq: u32) -> Seg {
            Seg::new(true, seq)
        }

        fn peer(seq: u32) -> Seg {
            Seg::new(false, seq)
        }

        fn ack(self, ack: u32) -> Seg {
            Seg {
                ack: Some(ack),
                ..self
            }
        }

        fn syn(self) -> Seg {
            Seg { syn: true, ..self }
        }

        fn fin(self) -> Seg {
            Seg { fin: true, ..self }
        }

        fn rst(self) -> Seg {
            Seg { rst: true, ..self }
        }

        fn sack(self, sack: &[(u32, u32)]) -> Seg {
            Seg {
                sack: sack.to_vec(),
                ..self
            }
        }

        fn payload(self, payload: &[u8]) -> Seg {
            Seg {
                payload: payload.to_vec(),
                ..self
            }
        }

        fn frame(&self) -> Vec<u8> {
            let (src_port, dst_port) = if self.from_guest {
                (self.guest_port, PEER_PORT)
            } else {
                (PEER_PORT, self.guest_port)
            };
            let mut tcp = TcpHeader::new(src_port, dst_port, self.seq, 64240);
            tcp.syn = self.syn;
            tcp.fin = self.fin;
            tcp.rst = self.rst;
            if let Some(ack) = self.ack {
                tcp.ack = true;
                tcp.acknowledgment_number = ack;
            }
            if !self.sack.is_empty() {
                let mut options = vec![1; self.nops];
                let len = 2 + 8 * self.sack.len();
                options.extend([5, u8::try_from(len).expect("sack length")]);
                for (left, right) in &self.sack {
                    options.extend(left.to_be_bytes());
                    options.extend(right.to_be_bytes());
                }
                tcp.set_options_raw(&options).expect("tcp options");
            }
            let ip = match (self.v6, self.from_guest) {
                (false, from_guest) => {
                    let (src, dst) = if from_guest {
                        (GUEST_V4, PEER_V4)
                    } else {
                        (PEER_V4, GUEST_V4)
                    };
                    let header =
                        Ipv4Header::new(0, 64, ip_number::TCP, src, dst).expect("ipv4 header");
                    IpHeaders::Ipv4(header, Ipv4Extensions::default())
                }
                (true, from_guest) => {
                    let (source, destination) = if from_guest {
                        (GUEST_V6, PEER_V6)
                    } else {
                        (PEER_V6, GUEST_V6)
                    };
                    let header = Ipv6Header {
                        hop_limit: 64,
                        source,
                        destination,
                        ..Default::default()
                    };
                    IpHeaders::Ipv6(header, Ipv6Extensions::default())
                }
            };
            let (src_mac, dst_mac) = if self.from_guest {
                (GUEST_MAC, PEER_MAC)
            } else {
                (PEER_MAC, GUEST_MAC)
            };
            let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
            let mut frame = Vec::new();
            match self.vlan {
                None => eth.ip(ip).tcp_header(tcp).write(&mut frame, &self.payload),
                Some(id) => eth
                    .single_vlan(VlanId::try_new(id).expect("vlan id"))
                    .ip(ip)
                    .tcp_header(tcp)
                    .write(&mut frame, &self.payload),
            }
            .expect("build frame");
            // Ethernet padding, as a NIC sends it.
            if frame.len() < 60 {
                frame.resize(60, 0);
            }
            frame
        }
    }

    /// Whether the frame's TCP checksum is right (etherparse computes it).
    fn checksum_ok(frame: &[u8]) -> bool {
        fuzz::checksum_ok(frame).expect("tcp over ip")
    }

    /// The rewriter's output for `sent`, checked against `expected`
    /// byte for byte (so its checksum is the one etherparse computes).
    fn check(rw: &mut Rewriter, direction: Direction, sent: &Seg, expected: &Seg) {
        let mut frame = sent.frame();
        assert!(checksum_ok(&frame));
        match direction {
            Direction::Inbound => rw.inbound(&mut frame),
            Direction::Outbound => rw.outbound(&mut frame),
        }
        assert_eq!(frame, expected.frame(), "{direction:?} {sent:?}");
        assert!(checksum_ok(&frame));
    }

    fn inbound(rw: &mut Rewriter, sent: Seg, expected: Seg) {
        check(rw, Direction::Inbound, &sent, &expected);
    }

    fn outbound(rw: &mut Rewriter, sent: Seg, expected: Seg) {
        check(rw, Direction::Outbound, &sent, &expected);
    }

    fn unchanged(rw: &mut Rewriter, direction: Direction, seg: Seg) {
        check(rw, direction, &seg, &seg);
    }

    /// The PVM's ISN, the SVM's, the client's.
    const PVM: u32 = 1_000_000;
    const SVM: u32 = 7_000_000;
    const CLIENT: u32 = 300;

    /// The handshake of a connection the guest accepts, `pvm` and `svm`
    /// being the two guests' ISNs; `shape` sets addresses and tags.
    fn accept(rw: &mut Rewriter, pvm: u32, svm: u32, shape: &dyn Fn(Seg) -> Seg) {
        unchanged(rw, Direction::Inbound, shape(Seg::peer(CLIENT).syn()));
        // The offset is not known yet: the SVM's SYN-ACK keeps its ISN.
        unchanged(
            rw,
            Direction::Outbound,
            shape(Seg::guest(svm).syn().ack(CLIENT + 1)),
        );
        inbound(
            rw,
            shape(Seg::peer(CLIENT + 1).ack(pvm.wrapping_add(1))),
            shape(Seg::peer(CLIENT + 1).ack(svm.wrapping_add(1))),
        );
    }

    fn plain(seg: Seg) -> Seg {
        seg
    }

    /// After the handshake: data both ways, SACK from the peer (edges
    /// translated) and from the guest (edges unchanged).
    fn exchange(rw: &mut Rewriter, pvm: u32, svm: u32, shape: &dyn Fn(Seg) -> Seg) {
        let p = |rel: u32| pvm.wrapping_add(rel);
        let s = |rel: u32| svm.wrapping_add(rel);
        outbound(
            rw,
            shape(Seg::guest(s(1)).ack(CLIENT + 1).payload(b"hello")),
            shape(Seg::guest(p(1)).ack(CLIENT + 1).payload(b"hello")),
        );
        inbound(
            rw,
            shape(Seg::peer(CLIENT + 1).ack(p(1)).sack(&[(p(3), p(6))])),
            shape(Seg::peer(CLIENT + 1).ack(s(1)).sack(&[(s(3), s(6))])),
        );
        inbound(
            rw,
            shape(Seg::peer(CLIENT + 1).ack(p(6)).payload(b"world").sack(&[
                (p(1), p(2)),
                (p(3), p(4)),
                (p(5), p(6)),
            ])),
            shape(Seg::peer(CLIENT + 1).ack(s(6)).payload(b"world").sack(&[
                (s(1), s(2)),
                (s(3), s(4)),
                (s(5), s(6)),
            ])),
        );
        let peer_space = [(CLIENT + 2, CLIENT + 4)];
        outbound(
            rw,
            shape(Seg::guest(s(6)).ack(CLIENT + 1).sack(&peer_space)),
            shape(Seg::guest(p(6)).ack(CLIENT + 1).sack(&peer_space)),
        );
    }

    #[test]
    fn guest_accepts_over_ipv4() {
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &plain);
        exchange(&mut rw, PVM, SVM, &plain);
        let stats = rw.stats();
        assert_eq!((stats.tracked, stats.rewritten), (1, 1));
        assert_eq!(stats.frames_rewritten, 5);
    }

    #[test]
    fn guest_opens_over_ipv6() {
        let v6 = |seg: Seg| Seg { v6: true, ..seg };
        let mut rw = Rewriter::new(16);
        // The offset is not known yet: the SVM's SYN keeps its ISN.
        unchanged(&mut rw, Direction::Outbound, v6(Seg::guest(SVM).syn()));
        // The SYN-ACK the SVM sees acknowledges its own SYN.
        inbound(
            &mut rw,
            v6(Seg::peer(CLIENT).syn().ack(PVM + 1)),
            v6(Seg::peer(CLIENT).syn().ack(SVM + 1)),
        );
        outbound(
            &mut rw,
            v6(Seg::guest(SVM + 1).ack(CLIENT + 1)),
            v6(Seg::guest(PVM + 1).ack(CLIENT + 1)),
        );
        exchange(&mut rw, PVM, SVM, &v6);
        assert_eq!(rw.stats().rewritten, 1);
    }

    #[test]
    fn vlan_tagged_and_unaligned_sack() {
        let tagged = |seg: Seg| Seg {
            vlan: Some(42),
            nops: 1,
            ..seg
        };
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &tagged);
        exchange(&mut rw, PVM, SVM, &tagged);
        // The same ports untagged are another connection: unknown.
        unchanged(
            &mut rw,
            Direction::Outbound,
            Seg::guest(SVM + 1).ack(CLIENT + 1),
        );
    }

    #[test]
    fn ipv6_vlan_accept() {
        let shape = |seg: Seg| Seg {
            v6: true,
            vlan: Some(7),
            ..seg
        };
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &shape);
        exchange(&mut rw, PVM, SVM, &shape);
    }

    #[test]
    fn same_isn_leaves_frames_identical() {
        let mut rw = Rewriter::new(16);
        // `accept` and `exchange` expect byte-identical frames when the
        // ISNs are equal.
        accept(&mut rw, PVM, PVM, &plain);
        exchange(&mut rw, PVM, PVM, &plain);
        let stats = rw.stats();
        assert_eq!((stats.tracked, stats.rewritten), (1, 0));
        assert_eq!(stats.frames_rewritten, 0);
    }

    #[test]
    fn sequence_numbers_wrap() {
        for (pvm, svm) in [
            (u32::MAX - 2, 10),
            (10, u32::MAX - 2),
            (u32::MAX, u32::MAX - 4),
            (u32::MAX - 3, u32::MAX),
        ] {
            let mut rw = Rewriter::new(16);
            accept(&mut rw, pvm, svm, &plain);
            exchange(&mut rw, pvm, svm, &plain);
            let mut rw = Rewriter::new(16);
            let v6 = |seg: Seg| Seg { v6: true, ..seg };
            accept(&mut rw, pvm, svm, &v6);
            exchange(&mut rw, pvm, svm, &v6);
        }
    }

    #[test]
    fn reset_forgets_offsets_and_handshakes() {
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &plain);
        rw.reset();
        assert_eq!(rw.stats().tracked, 0);
        // The SVM is now a copy of the PVM: its frames carry PVM numbers.
        unchanged(
            &mut rw,
            Direction::Outbound,
            Seg::guest(PVM + 1).ack(CLIENT + 1).payload(b"x"),
        );
        unchanged(
            &mut rw,
            Direction::Inbound,
            Seg::peer(CLIENT + 1).ack(PVM + 2),
        );

        // A half-learnt handshake: the SYN-ACK went out before the reset.
        let other = |seg: Seg| Seg {
            guest_port: 81,
            ..seg
        };
        unchanged(
            &mut rw,
            Direction::Outbound,
            other(Seg::guest(SVM).syn().ack(CLIENT + 1)),
        );
        rw.reset();
        unchanged(
            &mut rw,
            Direction::Inbound,
            other(Seg::peer(CLIENT + 1).ack(PVM + 1)),
        );
        unchanged(
            &mut rw,
            Direction::Outbound,
            other(Seg::guest(PVM + 1).ack(CLIENT + 1)),
        );
        let stats = rw.stats();
        assert_eq!((stats.tracked, stats.frames_rewritten), (0, 1));
    }

    #[test]
    fn wrong_checksum_stays_wrong_by_as_much() {
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &plain);
        for (direction, seg) in [
            (Direction::Outbound, Seg::guest(SVM + 1).ack(CLIENT + 1)),
            (
                Direction::Inbound,
                Seg::peer(CLIENT + 1)
                    .ack(PVM + 1)
                    .sack(&[(PVM + 3, PVM + 9)]),
            ),
        ] {
            let mut frame = seg.payload(b"payload").frame();
            let last = frame.len() - 1;
            frame[last] ^= 0x5a;
            assert!(!checksum_ok(&frame));
            match direction {
                Direction::Inbound => rw.inbound(&mut frame),
                Direction::Outbound => rw.outbound(&mut frame),
            }
            assert!(!checksum_ok(&frame), "{direction:?}");
            // Undoing the corruption makes it right: the error was kept.
            frame[last] ^= 0x5a;
            assert!(checksum_ok(&frame), "{direction:?}");
        }
    }

    #[test]
    fn refused_guest_syn_is_translated() {
        let mut rw = Rewriter::new(16);
        unchanged(&mut rw, Direction::Outbound, Seg::guest(SVM).syn());
        inbound(
            &mut rw,
            Seg::peer(0).rst().ack(PVM + 1),
            Seg::peer(0).rst().ack(SVM + 1),
        );
    }

    #[test]
    fn retransmitted_syn_ack_is_translated_a_new_one_starts_over() {
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &plain);
        // The SVM repeats its SYN-ACK: the world must see the PVM's.
        outbound(
            &mut rw,
            Seg::guest(SVM).syn().ack(CLIENT + 1),
            Seg::guest(PVM).syn().ack(CLIENT + 1),
        );
        // Another SYN-ACK on the same ports: a new connection.
        const SVM2: u32 = 99;
        unchanged(
            &mut rw,
            Direction::Outbound,
            Seg::guest(SVM2).syn().ack(CLIENT + 1),
        );
        inbound(
            &mut rw,
            Seg::peer(CLIENT + 1).ack(PVM + 1),
            Seg::peer(CLIENT + 1).ack(SVM2 + 1),
        );
        assert_eq!(rw.stats().tracked, 1);
    }

    #[test]
    fn rst_without_ack_and_data_before_learning_pass_unchanged() {
        let mut rw = Rewriter::new(16);
        accept(&mut rw, PVM, SVM, &plain);
        // No ACK flag: the acknowledgement field means nothing.
        unchanged(&mut rw, Direction::Inbound, Seg::peer(CLIENT + 1).rst());
        // A connection the rewriter never saw open (older than the last
        // checkpoint).
        let old = |seg: Seg| Seg {
            guest_port: 22,
            ..seg
        };
        unchanged(&mut rw, Direction::Inbound, old(Seg::peer(5).ack(SVM + 1)));
        unchanged(
            &mut rw,
            Direction::Outbound,
            old(Seg::guest(SVM + 1).ack(5)),
        );
    }

    /// Handshake of connection `port` (guest accepts) at `now`.
    fn accept_at(rw: &mut Rewriter, port: u16, now: Instant) {
        let on = |seg: Seg| Seg {
            guest_port: port,
            ..seg
        };
        rw.process(
            Direction::Outbound,
            &mut on(Seg::guest(SVM).syn().ack(CLIENT + 1)).frame(),
            now,
        );
        rw.process(
            Direction::Inbound,
            &mut on(Seg::peer(CLIENT + 1).ack(PVM + 1)).frame(),
            now,
        );
    }

    /// Whether connection `port` is translated (a data frame from the SVM).
    fn translated(rw: &mut Rewriter, port: u16, now: Instant) -> bool {
        let seg = Seg {
            guest_port: port,
            ..Seg::guest(SVM + 1).ack(CLIENT + 1)
        };
        let mut frame = seg.frame();
        rw.process(Direction::Outbound, &mut frame, now);
        frame != seg.frame()
    }

    #[test]
    fn closed_and_half_open_connections_are_forgotten_after_linger() {
        let t0 = Instant::now();
        let mut rw = Rewriter::new(16);
        accept_at(&mut rw, 80, t0);
        accept_at(&mut rw, 81, t0);
        // Port 82: a SYN-ACK that is never acknowledged.
        rw.process(
            Direction::Outbound,
            &mut Seg {
                guest_port: 82,
                ..Seg::guest(SVM).syn().ack(CLIENT + 1)
            }
            .frame(),
            t0,
        );
        // Both FINs on port 80.
        let on80 = |seg: Seg| Seg {
            guest_port: 80,
            ..seg
        };
        rw.process(
            Direction::Outbound,
            &mut on80(Seg::guest(SVM + 1).ack(CLIENT + 1).fin()).frame(),
            t0,
        );
        rw.process(
            Direction::Inbound,
            &mut on80(Seg::peer(CLIENT + 1).ack(PVM + 2).fin()).frame(),
            t0,
        );
        assert_eq!(rw.stats().tracked, 3);
        // A retransmitted FIN a while later still needs translating.
        let later = t0 + IDLE_LINGER / 2;
        assert!(translated(&mut rw, 80, later));
        let t1 = later + IDLE_LINGER - Duration::from_secs(1);
        assert_eq!(rw.stats().tracked, 3);
        assert!(translated(&mut rw, 81, t1), "not idle long enough");
        assert_eq!(rw.stats().tracked, 2, "port 82 forgotten");
        let t2 = later + IDLE_LINGER;
        assert!(!translated(&mut rw, 80, t2), "port 80 forgotten");
        // An open connection is kept however long it is idle.
        assert!(translated(&mut rw, 81, t2 + IDLE_LINGER * 10));
        assert_eq!(rw.stats().tracked, 1);
        assert_eq!(rw.stats().evictions, 0);
    }

    #[test]
    fn full_table_evicts_closed_then_learning_then_least_recent() {
        let now = Instant::now();
        let mut rw = Rewriter::new(3);
        accept_at(&mut rw, 1, now);
        accept_at(&mut rw, 2, now);
        accept_at(&mut rw, 3, now);
        // Port 2 closes (RST from the guest).
        rw.process(
            Direction::Outbound,
            &mut Seg {
                guest_port: 2,
                ..Seg::guest(SVM + 1).rst()
            }
            .frame(),
            now,
        );
        accept_at(&mut rw, 4, now);
        assert_eq!(rw.stats().evictions, 1);
        assert!(!translated(&mut rw, 2, now), "the closed one went first");
        // Port 5 half-open: then port 6 evicts it rather than a learnt one.
        rw.process(
            Direction::Outbound,
            &mut Seg {
                guest_port: 5,
                ..Seg::guest(SVM).syn().ack(CLIENT + 1)
            }
            .frame(),
            now,
        );
        // Full: the least recently used learnt one (port 1, as 3 and 4
        // were used since) made room for port 5.
        assert!(translated(&mut rw, 3, now));
        assert!(translated(&mut rw, 4, now));
        accept_at(&mut rw, 6, now);
        // Port 6 evicted port 5's handshake.
        assert_eq!(rw.stats().evictions, 3);
        assert!(translated(&mut rw, 3, now));
        assert!(translated(&mut rw, 4, now));
        assert!(translated(&mut rw, 6, now));
        assert!(!translated(&mut rw, 1, now));
        assert_eq!(rw.stats().tracked, 3);
    }

    #[test]
    fn zero_capacity_tracks_nothing() {
        let mut rw = Rewriter::new(0);
        accept_at(&mut rw, 80, Instant::now());
        assert!(!translated(&mut rw, 80, Instant::now()));
        assert_eq!(rw.stats(), RewriteStats::default());
    }

    /// Inputs that once made the `rewrite` fuzz target fail
    /// (fuzz/regressions/rewrite/, see fuzz/regressions/README.md).
    #[test]
    fn fuzz_regressions_stay_fixed() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/rewrite");
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            fuzz::stream(
                &std::fs::read(entry.expect("dir entry").path()).expect("regression input"),
            );
        }
    }

    // ---- The simulation: a PVM, an SVM and their peer. ----
    //
    // Both guests are the same deterministic TCP endpoint but for their
    // ISNs, so each sends the same segments at the same relative sequence
    // numbers. The peer talks to the PVM: its frames carry acknowledgements
    // (and SACK edges) in the PVM's space; through `inbound` they must
    // become exactly the frames the peer would have sent the SVM. The
    // SVM's frames through `outbound` must become exactly the PVM's.

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum SimState {
        Idle,
        Open,
        Reset,
    }

    #[derive(Debug, Clone)]
    struct SimConn {
        guest_port: u16,
        v6: bool,
        vlan: Option<u16>,
        guest_opens: bool,
        pvm: u32,
        svm: u32,
        peer: u32,
        state: SimState,
        /// Sequence space used so far, relative to the ISNs (SYN and FIN
        /// count one).
        guest_sent: u32,
        peer_sent: u32,
        guest_fin: bool,
        peer_fin: bool,
        /// Opened since the last reset (so the rewriter knows it).
        tracked: bool,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Handshake,
        GuestData(usize),
        PeerData(usize),
        /// Acknowledge part of the guest's data, SACK a later part.
        PeerAck(prop::sample::Index, prop::sample::Index, bool),
        GuestFin,
        PeerFin,
        GuestRst,
        /// A checkpoint: the SVM becomes a copy of the PVM.
        Checkpoint,
    }

    impl SimConn {
        fn shape(&self, seg: Seg) -> Seg {
            Seg {
                guest_port: self.guest_port,
                v6: self.v6,
                vlan: self.vlan,
                ..seg
            }
        }

        /// A guest segment in the space of the guest whose ISN is `isn`.
        fn guest_seg(&self, isn: u32, rel_seq: u32, build: &dyn Fn(Seg) -> Seg) -> Seg {
            self.shape(build(Seg::guest(isn.wrapping_add(rel_seq))))
        }

        /// A peer segment acknowledging `rel_ack` (and SACKing `sack`) in
        /// the space of the guest whose ISN is `isn`.
        fn peer_seg(
            &self,
            isn: u32,
            rel_ack: Option<u32>,
            sack: Option<(u32, u32)>,
            build: &dyn Fn(Seg) -> Seg,
        ) -> Seg {
            let mut seg = Seg::peer(self.peer.wrapping_add(self.peer_sent));
            seg.ack = rel_ack.map(|a| isn.wrapping_add(a));
            seg.sack = sack
                .map(|(l, r)| (isn.wrapping_add(l), isn.wrapping_add(r)))
                .into_iter()
                .collect();
            self.shape(build(seg))
        }

        fn guest_out(&self, rw: &mut Rewriter, rel_seq: u32, build: &dyn Fn(Seg) -> Seg) {
            outbound(
                rw,
                self.guest_seg(self.svm, rel_seq, build),
                self.guest_seg(self.pvm, rel_seq, build),
            );
        }

        fn peer_in(
            &self,
            rw: &mut Rewriter,
            rel_ack: Option<u32>,
            sack: Option<(u32, u32)>,
            build: &dyn Fn(Seg) -> Seg,
        ) {
            inbound(
                rw,
                self.peer_seg(self.pvm, rel_ack, sack, build),
                self.peer_seg(self.svm, rel_ack, sack, build),
            );
        }

        fn step(&mut self, rw: &mut Rewriter, op: &Op, payload: &[u8]) {
            let peer_ack = self.peer.wrapping_add(self.peer_sent);
            match (op, self.state) {
                (Op::Handshake, SimState::Idle) => {
                    let peer_isn = self.peer;
                    if self.guest_opens {
                        let syn = self.guest_seg(self.svm, 0, &|s| s.syn());
                        unchanged(rw, Direction::Outbound, syn);
                        self.peer_in(rw, Some(1), None, &|s| s.syn());
                        self.peer_sent = 1;
                        self.guest_out(rw, 1, &|s| s.ack(peer_isn.wrapping_add(1)));
                    } else {
                        unchanged(
                            rw,
                            Direction::Inbound,
                            self.shape(Seg::peer(peer_isn).syn()),
                        );
                        let syn_ack =
                            self.guest_seg(self.svm, 0, &|s| s.syn().ack(peer_isn.wrapping_add(1)));
                        unchanged(rw, Direction::Outbound, syn_ack);
                        self.peer_sent = 1;
                        self.peer_in(rw, Some(1), None, &|s| s);
                    }
                    self.guest_sent = 1;
                    self.state = SimState::Open;
                    self.tracked = true;
                }
                (Op::GuestData(len), SimState::Open) if !self.guest_fin => {
                    let data = &payload[..*len];
                    self.guest_out(rw, self.guest_sent, &|s| s.ack(peer_ack).payload(data));
                    self.guest_sent = self.guest_sent.wrapping_add(*len as u32);
                }
                (Op::PeerData(len), SimState::Open) if !self.peer_fin => {
                    let data = &payload[..*len];
                    self.peer_in(rw, Some(self.guest_sent), None, &|s| s.payload(data));
                    self.peer_sent = self.peer_sent.wrapping_add(*len as u32);
                }
                (Op::PeerAck(ack_at, sack_at, sack), SimState::Open) => {
                    let ack = 1 + ack_at.index(self.guest_sent as usize) as u32;
                    let room = self.guest_sent - ack;
                    let sack = (*sack && room >= 2).then(|| {
                        (
                            ack + 1 + sack_at.index(room as usize - 1) as u32,
                            self.guest_sent,
                        )
                    });
                    self.peer_in(rw, Some(ack), sack, &|s| s);
                }
                (Op::GuestFin, SimState::Open) if !self.guest_fin => {
                    self.guest_out(rw, self.guest_sent, &|s| s.ack(peer_ack).fin());
                    self.guest_sent += 1;
                    self.guest_fin = true;
                }
                (Op::PeerFin, SimState::Open) if !self.peer_fin => {
                    self.peer_in(rw, Some(self.guest_sent), None, &|s| s.fin());
                    self.peer_sent += 1;
                    self.peer_fin = true;
                }
                (Op::GuestRst, SimState::Open) => {
                    self.guest_out(rw, self.guest_sent, &|s| s.rst());
                    self.state = SimState::Reset;
                }
                _ => {}
            }
        }
    }

    fn isn() -> impl Strategy<Value = u32> {
        prop_oneof![any::<u32>(), (u32::MAX - 3000)..=u32::MAX, 0u32..3000,]
    }

    fn sim_conn() -> impl Strategy<Value = SimConn> {
        (
            any::<bool>(),
            prop::option::of(0u16..4096),
            any::<bool>(),
            (isn(), isn(), isn(), any::<bool>()),
        )
            .prop_map(|(v6, vlan, guest_opens, (pvm, svm, peer, same))| SimConn {
                guest_port: 0,
                v6,
                vlan,
                guest_opens,
                pvm,
                svm: if same { pvm } else { svm },
                peer,
                state: SimState::Idle,
                guest_sent: 0,
                peer_sent: 0,
                guest_fin: false,
                peer_fin: false,
                tracked: false,
            })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Handshake),
            4 => (0usize..200).prop_map(Op::GuestData),
            4 => (0usize..200).prop_map(Op::PeerData),
            3 => (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<bool>())
                .prop_map(|(a, s, sack)| Op::PeerAck(a, s, sack)),
            1 => Just(Op::GuestFin),
            1 => Just(Op::PeerFin),
            1 => Just(Op::GuestRst),
            1 => Just(Op::Checkpoint),
        ]
    }

    proptest! {
        #[test]
        fn svm_speaks_with_the_pvm_numbers(
            mut conns in prop::collection::vec(sim_conn(), 1..4),
            ops in prop::collection::vec((any::<prop::sample::Index>(), op()), 0..60),
            payload in prop::collection::vec(any::<u8>(), 200),
        ) {
            for (i, c) in conns.iter_mut().enumerate() {
                c.guest_port = 80 + i as u16;
            }
            let mut rw = Rewriter::new(16);
            for (which, op) in &ops {
                if let Op::Checkpoint = op {
                    rw.reset();
                    for c in &mut conns {
                        if c.state != SimState::Idle {
                            c.svm = c.pvm;
                        }
                        c.tracked = false;
                    }
                    continue;
                }
                let at = which.index(conns.len());
                conns[at].step(&mut rw, op, &payload);
            }
            let stats = rw.stats();
            prop_assert_eq!(stats.tracked, conns.iter().filter(|c| c.tracked).count());
            prop_assert_eq!(
                stats.rewritten,
                conns.iter().filter(|c| c.tracked && c.pvm != c.svm).count()
            );
            prop_assert_eq!(stats.evictions, 0);
        }

        /// The fuzz target's body (and its checks) on random streams.
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4000)) {
            fuzz::stream(&data);
        }

        /// Valid frames of one learnt connection with a few bytes changed
        /// (flags, options, lengths, addresses...): no panic, only sequence,
        /// acknowledgement, SACK edges and checksum change, and a right
        /// checksum stays right.
        #[test]
        fn corrupted_frames_keep_their_shape(
            edits in prop::collection::vec(
                (any::<bool>(), any::<bool>(), prop::collection::vec(
                    (any::<prop::sample::Index>(), any::<u8>()), 0..6,
                )),
                1..30,
            ),
        ) {
            let mut rw = Rewriter::new(4);
            accept(&mut rw, PVM, SVM, &plain);
            for (out, v6, changes) in edits {
                let seg = if out {
                    Seg::guest(SVM + 1).ack(CLIENT + 1).sack(&[(CLIENT + 5, CLIENT + 9)])
                } else {
                    Seg::peer(CLIENT + 1).ack(PVM + 1).sack(&[(PVM + 5, PVM + 9), (PVM + 10, PVM + 11)])
                };
                let mut frame = Seg { v6, ..seg.payload(b"data") }.frame();
                for (at, byte) in changes {
                    let i = at.index(frame.len());
                    frame[i] = byte;
                }
                let before = frame.clone();
                if out {
                    rw.outbound(&mut frame);
                } else {
                    rw.inbound(&mut frame);
                }
                match (packet::parse(&before), packet::parse(&frame)) {
                    (Ok(Packet::Tcp { key, flags, payload, .. }), after) => {
                        let Ok(Packet::Tcp { key: k, flags: f, payload: p, .. }) = after else {
                            return Err(TestCaseError::fail("no longer tcp"));
                        };
                        prop_assert_eq!((key, flags, payload), (k, f, p));
                        let header = Segment::locate(&before).expect("tcp").header_at;
                        // Ports, data offset, flags, window, urgent pointer.
                        for range in [0..4, 12..16, 18..20] {
                            let range = header + range.start..header + range.end;
                            prop_assert_eq!(&frame[range.clone()], &before[range]);
                        }
                        prop_assert_eq!(&frame[..header], &before[..header]);
                        if checksum_ok(&before) {
                            prop_assert!(checksum_ok(&frame));
                        }
                    }
                    (_, _) => prop_assert_eq!(&frame, &before),
                }
            }
        }
    }
}
