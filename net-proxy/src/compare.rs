//! The compare proxy of COLO mode (primary side): each frame the PVM sends
//! is held until the SVM has sent the same output, then released to the
//! tap. A difference, a timeout or too many held bytes asks for a
//! checkpoint, after which both VMs are equal again and the comparison
//! starts afresh.
//!
//! Epochs as in Remus mode: checkpoint N closes epoch N. The SVM's frames
//! arrive over the peer link tagged with the epoch it produced them in
//! (after loading checkpoint N it runs in epoch N + 1); a frame of an older
//! epoch than the one compared is dropped (counted in
//! [`CompareStats::stale_dropped`]).
//!
//! ```text
//! new(config, N)    compare epoch N
//! primary(frame)    a PVM frame: held, or released with its SVM twin
//! secondary(e, f)   an SVM frame of epoch e: may release held PVM frames
//! poll(now)         timeouts (next_deadline() says when)
//! checkpoint(N)     PVM paused for checkpoint N: the held frames wait for
//!                   committed(N); epoch N + 1 is compared from a fresh start
//! committed(N)      the secondary acked N: its frames, in PVM order
//! release_all()     the secondary is gone: everything, then pass-through
//! ```
//!
//! Every [`Outcome`] carries the frames to send now and, once per epoch,
//! the [`Cause`] of a checkpoint to take; after that the epoch's later
//! outcomes carry none (frames keep being compared and held) until
//! [`Compare::checkpoint`].
//!
//! # What is compared
//!
//! Frames are classified by [`packet::parse`](crate::packet::parse); a
//! frame that does not parse is compared whole, with the frames of class
//! Other (keyed by the ethertype in its bytes 12-13).
//!
//! | class | key (one "connection") | a PVM frame is released when |
//! | --- | --- | --- |
//! | TCP | [`FlowKey`] as sent (guest side is the source), VLAN tags included | (a) its payload positions and FIN were produced identically by the SVM, in any segmentation, and (b) its ACK number is not beyond the highest ACK the SVM sent on the flow; an RST: once the SVM sent an RST |
//! | UDP | [`FlowKey`] | the SVM's next unmatched datagram of the flow has the same payload |
//! | ICMP (v4, v6, so IPv6 ND) | [`IcmpKey`] | the next one has the same bytes 5-8 of the header and payload |
//! | IP fragment | [`FragmentKey`] | the next one is the same whole frame |
//! | Other (ARP, RARP, unknown protocols, unparsable frames) | ethertype | the next one is the same whole frame |
//! | any, connection table full | one shared queue | the next one is the same whole frame (counted in [`CompareStats::untracked`]) |
//!
//! Not compared: window, TCP options, IP ID, TTL, checksums, padding.
//!
//! ## TCP as a byte stream
//!
//! The secondary's rewriter translates the SVM's sequence numbers into the
//! PVM's space, except in a SYN (the two guests pick different ISNs and
//! the offset is learnt only later). So a SYN (or SYN-ACK) matches the
//! other side's SYN whatever its sequence number, and the stream starts at
//! the PVM's ISN + 1. A connection first seen without a SYN (it existed at
//! the last checkpoint) starts at the first sequence number either side
//! sends. Bytes are compared position by position as both sides produce
//! them; a retransmission of matched bytes releases at once (PVM) or is
//! dropped (SVM). Condition (b) keeps the PVM from acknowledging to a
//! client data the SVM has not received: after a failover that data would
//! be lost. A pure ACK waits only for (b).
//!
//! SVM segments that follow its SYN but come before the PVM's SYN wait
//! until the PVM's ISN places them. A second SYN with another ISN on the
//! same flow within an epoch (the ports reused by a new connection), data
//! after a FIN, or PVM data after the SVM's SYN but before its own count
//! as a mismatch: the checkpoint that follows restarts the comparison on
//! equal VMs. A connection seen without a SYN whose first segment of the
//! epoch is a retransmission on one side but new data on the other has no
//! common start: it waits for the timeout.
//!
//! ## Order
//!
//! Released frames keep the PVM's order within a connection (a frame that
//! matched waits behind an earlier one of the same connection that did
//! not). Across connections a matched frame does not wait for an unmatched
//! one, as in QEMU: each connection is its own ordered stream for its
//! peer, no protocol orders frames across connections (the network
//! reorders them anyway), and one slow or divergent connection would
//! otherwise delay them all. After a mismatch the connection compares
//! nothing more and holds its later frames until the checkpoint; other
//! connections keep releasing what matched (output the SVM produced too,
//! so a failover loses none of it).
//! [`Compare::committed`] and [`Compare::release_all`] release in the
//! PVM's order.
//!
//! # Bounds
//!
//! Everything either VM sends is input. A PVM frame held longer than
//! [`CompareConfig::timeout`], or an SVM frame that no PVM output matched
//! within it, asks for a checkpoint ([`Cause::Timeout`]); so do more held
//! PVM bytes of the compared epoch than [`CompareConfig::held_bytes_max`]
//! ([`Cause::HeldBytes`]). SVM frames queue within the same byte bound
//! (each costs its length plus [`SVM_FRAME_OVERHEAD`]): one beyond it is
//! dropped and asks for a checkpoint. At most
//! [`CompareConfig::max_connections`] keys are tracked per epoch; the table
//! is emptied at each checkpoint (datagram keys as soon as nothing waits
//! on them).

mod tcp;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::output::OutputBuffer;
use crate::packet::{self, FlowKey, FragmentKey, IcmpKey, Packet};
use tcp::{Mismatch, Segment, TcpFlow};

/// The default compare timeout. The SVM runs on the same inputs a peer
/// link behind the PVM, so its twin of a frame normally arrives within a
/// millisecond or two on one host or a LAN; 20 ms leaves room for
/// scheduling on a loaded host while staying well below a client's
/// minimum TCP retransmission timeout (200 ms on Linux), so a reply the
/// SVM never matches costs a checkpoint, not a retransmission. QEMU waits
/// 3 s. To be refined from measurements (colo-bench).
pub const DEFAULT_COMPARE_TIMEOUT_MS: u64 = 20;

/// The default bound on held bytes (colo's `DEFAULT_HELD_BYTES_MAX`).
pub const DEFAULT_HELD_BYTES_MAX: u64 = 4 << 20;

/// The default size of the connection table.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// What a queued SVM frame costs beyond its length (bookkeeping), so that a
/// flood of empty frames is bounded too.
pub const SVM_FRAME_OVERHEAD: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareConfig {
    /// How long a PVM frame may wait for its SVM twin, and an SVM frame
    /// for its PVM twin, before a checkpoint is asked for.
    pub timeout: Duration,
    /// Held PVM bytes of the compared epoch above this ask for a
    /// checkpoint (frames of closed epochs waiting for `committed` do not
    /// count: their checkpoint is already on its way); also the bound of
    /// queued SVM frames.
    pub held_bytes_max: u64,
    /// Keys tracked per epoch; beyond, frames are compared whole.
    pub max_connections: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(DEFAULT_COMPARE_TIMEOUT_MS),
            held_bytes_max: DEFAULT_HELD_BYTES_MAX,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why a checkpoint is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The VMs produced different output.
    Mismatch,
    /// A frame waited too long for its twin.
    Timeout,
    /// Too many bytes held or queued.
    HeldBytes,
}

impl Cause {
    pub const ALL: [Cause; 3] = [Cause::Mismatch, Cause::Timeout, Cause::HeldBytes];

    /// The metric label (`colo_checkpoints_total{cause}`).
    pub fn name(self) -> &'static str {
        match self {
            Cause::Mismatch => "mismatch",
            Cause::Timeout => "timeout",
            Cause::HeldBytes => "held_bytes",
        }
    }
}

/// What a call produced: frames to send now, in order, and whether a
/// checkpoint is needed.
#[must_use]
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub release: Vec<Vec<u8>>,
    pub checkpoint: Option<Cause>,
}

/// Counters and gauges (issue 10's metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareStats {
    /// PVM frames compared (given to `primary` while comparing).
    pub compared: u64,
    /// PVM frames released because the SVM matched them.
    pub matched: u64,
    /// PVM frames held now (compared or waiting for `committed`).
    pub held_frames: u64,
    pub held_bytes: u64,
    /// SVM frames waiting for a PVM twin, and their cost.
    pub queue_depth: u64,
    pub queue_bytes: u64,
    /// Keys in the connection table.
    pub connections: u64,
    /// Frames compared whole because the table was full.
    pub untracked: u64,
    /// SVM frames of an older epoch, dropped.
    pub stale_dropped: u64,
    /// SVM frames dropped otherwise: a future epoch, the queue full, or
    /// after `release_all`.
    pub dropped: u64,
    /// Checkpoints asked for, per cause.
    pub mismatch: u64,
    pub timeout: u64,
    pub held_bytes_checkpoints: u64,
}

impl CompareStats {
    /// Checkpoints asked for because of `cause`.
    pub fn checkpoints(&self, cause: Cause) -> u64 {
        match cause {
            Cause::Mismatch => self.mismatch,
            Cause::Timeout => self.timeout,
            Cause::HeldBytes => self.held_bytes_checkpoints,
        }
    }
}

/// The connection-table key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Tcp(FlowKey),
    Udp(FlowKey),
    Icmp(IcmpKey),
    Fragment(FragmentKey),
    Other(u16),
    /// The table was full: compared whole, in one queue.
    Untracked,
}

/// How a frame is compared: as a TCP segment, or by these bytes of it.
enum Class<'a> {
    Tcp(Segment<'a>),
    Bytes(Range<usize>),
}

/// Datagrams (and whole frames) of one key, matched in order.
#[derive(Debug, Default)]
struct Datagrams {
    /// Held PVM frames without an SVM twin yet, with the bytes compared.
    pvm: VecDeque<(u64, Range<usize>)>,
    /// SVM frames without a PVM twin yet: queue entry and bytes.
    svm: VecDeque<(u64, Vec<u8>)>,
    diverged: bool,
}

#[derive(Debug)]
enum Flow {
    Tcp(Box<TcpFlow>),
    Datagrams(Datagrams),
}

/// SVM frames waiting for a PVM twin, oldest first: each frame is one
/// entry, kept while some of its bytes (or its SYN, FIN or RST) wait.
#[derive(Debug, Default)]
pub(crate) struct SvmQueue {
    entries: BTreeMap<u64, SvmEntry>,
    next: u64,
    bytes: u64,
}

#[derive(Debug)]
struct SvmEntry {
    since: Instant,
    cost: u64,
    refs: u32,
}

impl SvmQueue {
    fn open(&mut self, since: Instant, cost: u64) -> u64 {
        let id = self.next;
        self.next += 1;
        self.entries.insert(
            id,
            SvmEntry {
                since,
                cost,
                refs: 0,
            },
        );
        self.bytes += cost;
        id
    }

    /// One more piece of the frame waits.
    fn retain(&mut self, id: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.refs += 1;
        }
    }

    /// One piece of the frame matched (or was dropped).
    fn release(&mut self, id: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.refs = e.refs.saturating_sub(1);
            if e.refs == 0 {
                self.remove(id);
            }
        }
    }

    /// The frame was processed: forget it if nothing of it waits.
    fn close(&mut self, id: u64) {
        if self.entries.get(&id).is_some_and(|e| e.refs == 0) {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(e) = self.entries.remove(&id) {
            self.bytes -= e.cost;
        }
    }

    /// The first entry's arrival: entries are numbered in arrival order.
    fn oldest(&self) -> Option<Instant> {
        self.entries.values().next().map(|e| e.since)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// A held PVM frame of the epoch being compared.
#[derive(Debug)]
struct Held {
    frame: Vec<u8>,
    since: Instant,
}

/// The compare proxy; see the module doc.
#[derive(Debug)]
pub struct Compare {
    config: CompareConfig,
    /// The epoch compared now.
    epoch: u64,
    /// False after `release_all`: pass-through.
    comparing: bool,
    /// A checkpoint was asked for in this epoch.
    asked: bool,
    next_id: u64,
    /// This epoch's held PVM frames, by arrival (id).
    held: BTreeMap<u64, Held>,
    held_bytes: u64,
    /// Frames of closed epochs, waiting for `committed`.
    waiting: OutputBuffer,
    flows: HashMap<Key, Flow>,
    svm: SvmQueue,
    stats: CompareStats,
}

impl Compare {
    /// Compares epoch `epoch` from a fresh start.
    pub fn new(config: CompareConfig, epoch: u64) -> Self {
        Self {
            config,
            epoch,
            comparing: true,
            asked: false,
            next_id: 0,
            held: BTreeMap::new(),
            held_bytes: 0,
            waiting: OutputBuffer::new(u64::MAX),
            flows: HashMap::new(),
            svm: SvmQueue::default(),
            stats: CompareStats::default(),
        }
    }

    /// Changes the timeout from now on; frames already waiting get the
    /// new one too (counted from their arrival).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.config.timeout = timeout;
    }

    /// The epoch compared now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A frame the PVM sent in the current epoch.
    pub fn primary(&mut self, frame: Vec<u8>, now: Instant) -> Outcome {
        let mut out = Outcome::default();
        if !self.comparing {
            out.release.push(frame);
            return out;
        }
        self.stats.compared += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.held_bytes += frame.len() as u64;
        let (key, class) = self.track(&frame);
        let mut ready = Vec::new();
        let result = match (self.flows.get_mut(&key), class) {
            (Some(Flow::Tcp(flow)), Class::Tcp(seg)) => {
                flow.pvm(id, seg, &mut self.svm, &mut ready)
            }
            (Some(Flow::Datagrams(flow)), Class::Bytes(range)) => {
                flow.pvm(id, &frame, range, &mut self.svm, &mut ready)
            }
            _ => Ok(()),
        };
        self.held.insert(id, Held { frame, since: now });
        self.finish(key, result, ready, now, &mut out);
        out
    }

    /// A frame the SVM sent in epoch `epoch`.
    pub fn secondary(&mut self, epoch: u64, frame: &[u8], now: Instant) -> Outcome {
        let mut out = Outcome::default();
        if !self.comparing {
            self.stats.dropped += 1;
            return out;
        }
        if epoch < self.epoch {
            self.stats.stale_dropped += 1;
        } else if epoch > self.epoch {
            self.stats.dropped += 1;
            tracing::debug!(epoch, compared = self.epoch, "SVM frame of a future epoch");
        } else {
            let cost = frame.len() as u64 + SVM_FRAME_OVERHEAD;
            if self.svm.bytes.saturating_add(cost) > self.config.held_bytes_max {
                self.stats.dropped += 1;
                self.ask(Cause::HeldBytes, &mut out);
            } else {
                let pending = self.svm.open(now, cost);
                let (key, class) = self.track(frame);
                let mut ready = Vec::new();
                let result = match (self.flows.get_mut(&key), class) {
                    (Some(Flow::Tcp(flow)), Class::Tcp(seg)) => {
                        flow.svm(pending, seg, &mut self.svm, &mut ready)
                    }
                    (Some(Flow::Datagrams(flow)), Class::Bytes(range)) => {
                        let bytes = frame.get(range).unwrap_or_default();
                        flow.svm(pending, bytes, &self.held, &mut self.svm, &mut ready)
                    }
                    _ => Ok(()),
                };
                self.svm.close(pending);
                self.finish(key, result, ready, now, &mut out);
                return out;
            }
        }
        self.check(now, &mut out);
        out
    }

    /// Checks the timeouts (and bounds).
    pub fn poll(&mut self, now: Instant) -> Outcome {
        let mut out = Outcome::default();
        self.check(now, &mut out);
        out
    }

    /// When [`Compare::poll`] has something to do: the oldest held PVM or
    /// queued SVM frame times out. None when nothing waits, when not
    /// comparing, or once this epoch's checkpoint was asked for.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.comparing || self.asked {
            return None;
        }
        let pvm = self.held.values().next().map(|h| h.since);
        let oldest = match (pvm, self.svm.oldest()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        // A timeout too large for the clock never comes.
        oldest.checked_add(self.config.timeout)
    }

    /// The PVM paused for checkpoint `epoch` (the current one): what is
    /// held now waits for [`Compare::committed`]`(epoch)`, the SVM's
    /// leftovers are dropped, and epoch + 1 is compared from a fresh start.
    pub fn checkpoint(&mut self, epoch: u64) {
        if !self.comparing {
            return;
        }
        if epoch != self.epoch {
            tracing::warn!(epoch, compared = self.epoch, "checkpoint of another epoch");
        }
        self.waiting.hold_from(epoch);
        for (_, held) in std::mem::take(&mut self.held) {
            let _ = self.waiting.push(held.frame);
        }
        let _ = self.waiting.close_epoch(epoch);
        self.held_bytes = 0;
        self.flows.clear();
        self.svm.clear();
        self.asked = false;
        self.epoch = epoch.saturating_add(1);
    }

    /// The frames held up to checkpoint `epoch`, in the PVM's order.
    pub fn committed(&mut self, epoch: u64) -> Vec<Vec<u8>> {
        self.waiting.release_through(epoch)
    }

    /// The secondary is gone: everything held, in the PVM's order; the
    /// comparison stops (later PVM frames pass at once).
    pub fn release_all(&mut self) -> Vec<Vec<u8>> {
        let mut out = self.waiting.release_all();
        out.extend(
            std::mem::take(&mut self.held)
                .into_values()
                .map(|h| h.frame),
        );
        self.held_bytes = 0;
        self.flows.clear();
        self.svm.clear();
        self.comparing = false;
        out
    }

    pub fn stats(&self) -> CompareStats {
        let tracked = self.flows.len() - usize::from(self.flows.contains_key(&Key::Untracked));
        CompareStats {
            held_frames: self.held.len() as u64 + self.waiting.held_frames(),
            held_bytes: self.held_bytes + self.waiting.held_bytes(),
            queue_depth: self.svm.entries.len() as u64,
            queue_bytes: self.svm.bytes,
            connections: tracked as u64,
            ..self.stats
        }
    }

    /// The frame's key and class, its flow created (or the untracked queue
    /// when the table is full).
    fn track<'a>(&mut self, frame: &'a [u8]) -> (Key, Class<'a>) {
        let (key, class) = classify(frame);
        if self.flows.contains_key(&key) {
            return (key, class);
        }
        let tracked = self.flows.len() - usize::from(self.flows.contains_key(&Key::Untracked));
        if tracked >= self.config.max_connections {
            self.stats.untracked += 1;
            self.flows
                .entry(Key::Untracked)
                .or_insert_with(|| Flow::Datagrams(Datagrams::default()));
            return (Key::Untracked, Class::Bytes(0..frame.len()));
        }
        let flow = match class {
            Class::Tcp(_) => Flow::Tcp(Box::default()),
            Class::Bytes(_) => Flow::Datagrams(Datagrams::default()),
        };
        self.flows.insert(key, flow);
        (key, class)
    }

    /// Releases the ready frames, asks for a checkpoint on a mismatch,
    /// forgets an idle datagram key, checks the bounds.
    fn finish(
        &mut self,
        key: Key,
        result: Result<(), Mismatch>,
        ready: Vec<u64>,
        now: Instant,
        out: &mut Outcome,
    ) {
        for id in ready {
            if let Some(held) = self.held.remove(&id) {
                self.held_bytes -= held.frame.len() as u64;
                self.stats.matched += 1;
                out.release.push(held.frame);
            }
        }
        if result.is_err() {
            self.ask(Cause::Mismatch, out);
        }
        if let Some(Flow::Datagrams(d)) = self.flows.get(&key) {
            if d.pvm.is_empty() && d.svm.is_empty() && !d.diverged {
                self.flows.remove(&key);
            }
        }
        self.check(now, out);
    }

    fn check(&mut self, now: Instant, out: &mut Outcome) {
        if !self.comparing || self.asked {
            return;
        }
        if self.held_bytes > self.config.held_bytes_max {
            self.ask(Cause::HeldBytes, out);
        } else if self.next_deadline().is_some_and(|deadline| deadline <= now) {
            self.ask(Cause::Timeout, out);
        }
    }

    fn ask(&mut self, cause: Cause, out: &mut Outcome) {
        if self.asked {
            return;
        }
        self.asked = true;
        out.checkpoint = Some(cause);
        match cause {
            Cause::Mismatch => self.stats.mismatch += 1,
            Cause::Timeout => self.stats.timeout += 1,
            Cause::HeldBytes => self.stats.held_bytes_checkpoints += 1,
        }
        tracing::debug!(
            cause = cause.name(),
            epoch = self.epoch,
            "compare asks for a checkpoint"
        );
    }
}

impl Datagrams {
    fn pvm(
        &mut self,
        id: u64,
        frame: &[u8],
        range: Range<usize>,
        queue: &mut SvmQueue,
        ready: &mut Vec<u64>,
    ) -> Result<(), Mismatch> {
        if self.diverged {
            return Ok(());
        }
        match self.svm.pop_front() {
            None => {
                self.pvm.push_back((id, range));
                Ok(())
            }
            Some((pending, twin)) => {
                queue.release(pending);
                if frame.get(range) == Some(&twin[..]) {
                    ready.push(id);
                    Ok(())
                } else {
                    self.diverge()
                }
            }
        }
    }

    fn svm(
        &mut self,
        pending: u64,
        bytes: &[u8],
        held: &BTreeMap<u64, Held>,
        queue: &mut SvmQueue,
        ready: &mut Vec<u64>,
    ) -> Result<(), Mismatch> {
        if self.diverged {
            return Ok(());
        }
        match self.pvm.pop_front() {
            None => {
                queue.retain(pending);
                self.svm.push_back((pending, bytes.to_vec()));
                Ok(())
            }
            Some((id, range)) => {
                let twin = held.get(&id).and_then(|h| h.frame.get(range));
                if twin == Some(bytes) {
                    ready.push(id);
                    Ok(())
                } else {
                    self.diverge()
                }
            }
        }
    }

    fn diverge(&mut self) -> Result<(), Mismatch> {
        self.diverged = true;
        Err(Mismatch)
    }
}

/// The key of a frame and how it is compared (module doc's table).
fn classify(frame: &[u8]) -> (Key, Class<'_>) {
    let whole = Class::Bytes(0..frame.len());
    match packet::parse(frame) {
        Ok(Packet::Tcp {
            key,
            seq,
            ack,
            flags,
            payload,
            ..
        }) => (
            Key::Tcp(key),
            Class::Tcp(Segment {
                seq,
                ack,
                flags,
                payload,
            }),
        ),
        Ok(Packet::Udp { key, payload }) => (Key::Udp(key), Class::Bytes(range_in(frame, payload))),
        Ok(Packet::Icmp {
            key,
            rest_of_header,
            payload,
        }) => {
            // The ICMP header's bytes 5-8 lie right before its payload.
            let range = range_in(frame, payload);
            let header = range.start.checked_sub(4).map(|s| s..range.end);
            let class = match header {
                Some(r) if frame.get(r.start..r.start + 4) == Some(&rest_of_header[..]) => {
                    Class::Bytes(r)
                }
                _ => whole,
            };
            (Key::Icmp(key), class)
        }
        Ok(Packet::Fragment { key }) => (Key::Fragment(key), whole),
        Ok(Packet::Other { ethertype }) => (Key::Other(ethertype), whole),
        Err(_) => {
            let ethertype = frame
                .get(12..14)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            (Key::Other(ethertype), whole)
        }
    }
}

/// Where `part` (a sub-slice of `frame`) lies in it.
fn range_in(frame: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(frame.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= frame.len() => start..end,
        _ => 0..frame.len(),
    }
}

#[cfg(test)]
mod tests;
