//! One direction of a TCP connection (the guest's side sending), compared
//! as a byte stream by sequence number. See the parent module's doc for the
//! rules; this is their bookkeeping.
//!
//! Positions are offsets from the stream's start (`base`, in the PVM's
//! sequence space): the SYN is at -1, the first payload byte at 0, a FIN
//! takes the position after the last byte. `verified` is the frontier:
//! every position below it was produced identically by both VMs. Bytes at
//! or above it wait as runs, per side, until the other side produced the
//! same positions.

use std::collections::{BTreeMap, VecDeque};

use super::SvmQueue;
use crate::packet::TcpFlags;

/// A TCP segment's fields the compare uses.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment<'a> {
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: &'a [u8],
}

/// The two sides told apart where they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Pvm,
    /// `pending`: the SVM frame's entry in the [`SvmQueue`] that every
    /// piece kept from it refers to.
    Svm {
        pending: u64,
    },
}

/// The two VMs produced different output on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mismatch;

/// Bytes of one side not yet verified: `data[skip..]` at the run's key.
#[derive(Debug)]
struct Run {
    data: Vec<u8>,
    skip: usize,
    /// SVM runs: the queue entry to release once the run is consumed.
    pending: Option<u64>,
}

impl Run {
    fn bytes(&self) -> &[u8] {
        self.data.get(self.skip..).unwrap_or_default()
    }

    fn len(&self) -> i64 {
        self.bytes().len() as i64
    }
}

/// What one VM sent on the connection.
#[derive(Debug, Default)]
struct Side {
    /// The ISN of its SYN, in its own sequence space.
    syn: Option<u32>,
    fin: Option<i64>,
    rst: bool,
    runs: BTreeMap<i64, Run>,
    /// SVM only: queue entries of the SYN, FIN and RST until the PVM
    /// produced them too.
    pending_syn: Option<u64>,
    pending_fin: Option<u64>,
    pending_rst: Option<u64>,
}

/// A held PVM segment and what its release waits for.
#[derive(Debug)]
struct Held {
    id: u64,
    /// Every position below this verified (None: no stream position, a
    /// pure ACK or an RST).
    end: Option<i64>,
    /// Its ACK number, when it has the ACK flag: the SVM must have
    /// acknowledged as much.
    ack: Option<u32>,
    /// An RST: the SVM must have reset the connection too.
    rst: bool,
}

#[derive(Debug, Default)]
pub(super) struct TcpFlow {
    /// Whether the flow started with a SYN (None before its first segment).
    syn_flow: Option<bool>,
    /// The PVM sequence number of position 0.
    base: Option<u32>,
    verified: i64,
    pvm: Side,
    svm: Side,
    /// The highest ACK number the SVM sent (wrapping order).
    svm_ack: Option<u32>,
    held: VecDeque<Held>,
    /// SVM segments after its SYN that came before the PVM's SYN: their
    /// positions are known once the PVM's ISN is.
    early: Vec<Early>,
    diverged: bool,
}

#[derive(Debug)]
struct Early {
    pending: u64,
    seq: u32,
    payload: Vec<u8>,
    fin: bool,
}

impl TcpFlow {
    /// A PVM segment, held as `id`; the ids of held segments that are now
    /// ready go to `release`, in the PVM's order.
    pub fn pvm(
        &mut self,
        id: u64,
        seg: Segment<'_>,
        queue: &mut SvmQueue,
        release: &mut Vec<u64>,
    ) -> Result<(), Mismatch> {
        if self.diverged {
            return Ok(());
        }
        let end = self.accept(Who::Pvm, seg, queue)?;
        let rst = seg.flags.contains(TcpFlags::RST);
        let ack = (!rst && seg.flags.contains(TcpFlags::ACK)).then_some(seg.ack);
        self.held.push_back(Held { id, end, ack, rst });
        self.settle(queue, release)
    }

    /// An SVM segment, charged to the queue entry `pending`.
    pub fn svm(
        &mut self,
        pending: u64,
        seg: Segment<'_>,
        queue: &mut SvmQueue,
        release: &mut Vec<u64>,
    ) -> Result<(), Mismatch> {
        if self.diverged {
            return Ok(());
        }
        if seg.flags.contains(TcpFlags::ACK) && !seg.flags.contains(TcpFlags::RST) {
            self.svm_ack = Some(match self.svm_ack {
                Some(high) if wrapping_le(seg.ack, high) => high,
                _ => seg.ack,
            });
        }
        self.accept(Who::Svm { pending }, seg, queue)?;
        self.settle(queue, release)
    }

    /// Records a segment's SYN, payload, FIN and RST; returns the end of
    /// its stream positions (None when it has none).
    fn accept(
        &mut self,
        who: Who,
        seg: Segment<'_>,
        queue: &mut SvmQueue,
    ) -> Result<Option<i64>, Mismatch> {
        let flags = seg.flags;
        if flags.contains(TcpFlags::RST) {
            self.reset(who, queue);
            return Ok(None);
        }
        let start = if flags.contains(TcpFlags::SYN) {
            self.syn(who, seg.seq, queue)?;
            if who == Who::Pvm {
                self.replay_early(queue);
            }
            0
        } else {
            match (self.syn_flow, self.base) {
                (None, _) => {
                    // Seen first without a SYN: it existed at the checkpoint.
                    self.syn_flow = Some(false);
                    self.base = Some(seg.seq);
                    self.verified = 0;
                    0
                }
                // Only the SVM's SYN so far: its later segments are in
                // the PVM's space, not known yet.
                (Some(_), None) => match who {
                    Who::Pvm => return Err(self.diverge()),
                    Who::Svm { pending } => {
                        queue.retain(pending);
                        self.early.push(Early {
                            pending,
                            seq: seg.seq,
                            payload: seg.payload.to_vec(),
                            fin: flags.contains(TcpFlags::FIN),
                        });
                        return Ok(None);
                    }
                },
                (Some(_), Some(_)) => self.offset(seg.seq),
            }
        };
        let fin = flags.contains(TcpFlags::FIN);
        let len = seg.payload.len() as i64;
        let pure_ack = len == 0 && !fin && !flags.contains(TcpFlags::SYN);
        self.insert(who, start, seg.payload, queue);
        if fin {
            self.fin(who, start + len, queue);
        }
        Ok((!pure_ack).then_some(start + len + i64::from(fin)))
    }

    fn syn(&mut self, who: Who, isn: u32, queue: &mut SvmQueue) -> Result<(), Mismatch> {
        match self.syn_flow {
            None => {
                self.syn_flow = Some(true);
                self.verified = -1;
            }
            Some(false) => return Err(self.diverge()),
            Some(true) => {}
        }
        let side = self.side(who);
        match side.syn {
            None => side.syn = Some(isn),
            Some(known) if known == isn => return Ok(()), // retransmitted
            // A new connection on the same ports in the same epoch.
            Some(_) => return Err(self.diverge()),
        }
        match who {
            Who::Pvm => self.base = Some(isn.wrapping_add(1)),
            Who::Svm { pending } if self.verified < 0 => {
                queue.retain(pending);
                self.svm.pending_syn = Some(pending);
            }
            Who::Svm { .. } => {}
        }
        Ok(())
    }

    /// Places the SVM's early segments now that the PVM's ISN is known.
    fn replay_early(&mut self, queue: &mut SvmQueue) {
        for early in std::mem::take(&mut self.early) {
            let who = Who::Svm {
                pending: early.pending,
            };
            let at = self.offset(early.seq);
            self.insert(who, at, &early.payload, queue);
            if early.fin {
                self.fin(who, at + early.payload.len() as i64, queue);
            }
            queue.release(early.pending);
        }
    }

    fn fin(&mut self, who: Who, at: i64, queue: &mut SvmQueue) {
        let verified = self.verified;
        let side = self.side(who);
        if side.fin.is_some() || at < verified {
            return;
        }
        side.fin = Some(at);
        if let Who::Svm { pending } = who {
            queue.retain(pending);
            side.pending_fin = Some(pending);
        }
    }

    fn reset(&mut self, who: Who, queue: &mut SvmQueue) {
        match who {
            Who::Pvm => {
                self.pvm.rst = true;
                if let Some(p) = self.svm.pending_rst.take() {
                    queue.release(p);
                }
            }
            Who::Svm { pending } => {
                if !self.svm.rst && !self.pvm.rst {
                    queue.retain(pending);
                    self.svm.pending_rst = Some(pending);
                }
                self.svm.rst = true;
            }
        }
    }

    /// Keeps the payload's positions that are neither verified nor already
    /// held from this side (a retransmission adds nothing).
    fn insert(&mut self, who: Who, at: i64, payload: &[u8], queue: &mut SvmQueue) {
        let end = at + payload.len() as i64;
        let verified = self.verified.max(0);
        let side = self.side(who);
        let mut cur = at.max(verified);
        if let Some((&start, run)) = side.runs.range(..=cur).next_back() {
            cur = cur.max(start + run.len());
        }
        let mut gaps = Vec::new();
        if cur < end {
            for (&start, run) in side.runs.range(cur..end) {
                if start > cur {
                    gaps.push((cur, start));
                }
                cur = cur.max(start + run.len());
            }
            if cur < end {
                gaps.push((cur, end));
            }
        }
        for (from, to) in gaps {
            // In bounds: at <= from < to <= end.
            let data = payload[(from - at) as usize..(to - at) as usize].to_vec();
            let pending = match who {
                Who::Pvm => None,
                Who::Svm { pending } => {
                    queue.retain(pending);
                    Some(pending)
                }
            };
            side.runs.insert(
                from,
                Run {
                    data,
                    skip: 0,
                    pending,
                },
            );
        }
    }

    /// Moves the frontier over what both sides produced identically, then
    /// hands out the held segments now ready, in order.
    /// On a mismatch, what matched before the difference is still handed
    /// out.
    fn settle(&mut self, queue: &mut SvmQueue, release: &mut Vec<u64>) -> Result<(), Mismatch> {
        let result = self.advance(queue);
        while let Some(front) = self.held.front() {
            if !self.ready(front) {
                break;
            }
            release.extend(self.held.pop_front().map(|h| h.id));
        }
        result
    }

    fn advance(&mut self, queue: &mut SvmQueue) -> Result<(), Mismatch> {
        loop {
            let v = self.verified;
            if v < 0 {
                if self.pvm.syn.is_none() || self.svm.syn.is_none() {
                    return Ok(());
                }
                self.verified = 0;
                if let Some(p) = self.svm.pending_syn.take() {
                    queue.release(p);
                }
                continue;
            }
            let fins = (self.pvm.fin == Some(v), self.svm.fin == Some(v));
            let runs = (
                self.pvm.runs.contains_key(&v),
                self.svm.runs.contains_key(&v),
            );
            if (fins.0 || fins.1) && (runs.0 || runs.1) {
                return Err(self.diverge()); // data where the other side ended
            }
            if fins == (true, true) {
                self.verified += 1;
                if let Some(p) = self.svm.pending_fin.take() {
                    queue.release(p);
                }
                continue;
            }
            if runs != (true, true) {
                return Ok(());
            }
            let (Some(mut p), Some(mut s)) = (self.pvm.runs.remove(&v), self.svm.runs.remove(&v))
            else {
                return Ok(());
            };
            let n = p.bytes().len().min(s.bytes().len());
            if p.bytes()[..n] != s.bytes()[..n] {
                return Err(self.diverge());
            }
            p.skip += n;
            s.skip += n;
            let next = v + n as i64;
            self.verified = next;
            if !p.bytes().is_empty() {
                self.pvm.runs.insert(next, p);
            }
            if s.bytes().is_empty() {
                if let Some(pending) = s.pending {
                    queue.release(pending);
                }
            } else {
                self.svm.runs.insert(next, s);
            }
        }
    }

    fn ready(&self, held: &Held) -> bool {
        held.end.is_none_or(|end| end <= self.verified)
            && held.ack.is_none_or(|ack| {
                self.svm_ack
                    .is_some_and(|svm_ack| wrapping_le(ack, svm_ack))
            })
            && (!held.rst || self.svm.rst)
    }

    /// The position of `seq`, taken within 2^31 of the frontier.
    fn offset(&self, seq: u32) -> i64 {
        let anchor = self.verified.max(0);
        let anchor_seq = self.base.unwrap_or(0).wrapping_add(anchor as u32);
        anchor + i64::from(seq.wrapping_sub(anchor_seq) as i32)
    }

    fn side(&mut self, who: Who) -> &mut Side {
        match who {
            Who::Pvm => &mut self.pvm,
            Who::Svm { .. } => &mut self.svm,
        }
    }

    fn diverge(&mut self) -> Mismatch {
        self.diverged = true;
        Mismatch
    }
}

/// `a <= b` in sequence-number order (RFC 9293: within 2^31).
fn wrapping_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}
