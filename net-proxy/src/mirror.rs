//! The secondary's inbound queue in COLO mode: the client frames the
//! primary mirrors, each tagged with the epoch the PVM received it in,
//! waiting for the SVM.
//!
//! The SVM that loaded checkpoint N runs in epoch E = N + 1
//! ([`MirrorQueue::set_epoch`]). A frame of epoch
//! - `< E` is dropped: the PVM had received it before checkpoint N, so its
//!   effect is in the state the SVM loaded;
//! - `== E` is delivered ([`MirrorQueue::pop`]), in the order the frames
//!   came, per NIC;
//! - `> E` waits until the epoch moves there.
//!
//! Before the first `set_epoch` nothing is delivered (the SVM has not run;
//! frames wait and the first epoch decides). The queue is bounded in bytes
//! (all NICs together): a frame beyond the bound is dropped and counted
//! ([`MirrorQueue::dropped`]); the SVM then misses a client frame, diverges,
//! and the primary's compare asks for a checkpoint that realigns it.

use std::collections::VecDeque;

/// Default bound of the queued frames' bytes: what the mirror connection's
/// outbox holds on the primary.
pub const DEFAULT_MIRROR_BYTES: u64 = 8 << 20;

/// What [`MirrorQueue::push`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued, and deliverable now: the NIC should be woken.
    Deliverable,
    /// Queued for a later epoch (or the first run).
    Waiting,
    /// Of an epoch the SVM's state already includes: dropped.
    Stale,
    /// Beyond the bound, or for a NIC the SVM does not have: dropped and
    /// counted.
    Dropped,
}

/// The frames waiting for the SVM's NICs; see the module docs.
#[derive(Debug)]
pub struct MirrorQueue {
    /// The SVM's epoch; `None` before its first run.
    epoch: Option<u64>,
    /// Per NIC, (epoch, frame) in epoch order, then arrival order.
    nics: Vec<VecDeque<(u64, Vec<u8>)>>,
    bytes: u64,
    max_bytes: u64,
    dropped: u64,
    stale: u64,
}

impl MirrorQueue {
    /// An empty queue for `nics` NICs holding at most `max_bytes` of
    /// frames.
    pub fn new(nics: usize, max_bytes: u64) -> Self {
        Self {
            epoch: None,
            nics: vec![VecDeque::new(); nics],
            bytes: 0,
            max_bytes,
            dropped: 0,
            stale: 0,
        }
    }

    /// The SVM's epoch, `None` before the first run.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// The SVM now runs in epoch `epoch`: older frames are dropped, this
    /// epoch's are deliverable. Returns whether any NIC has a frame to
    /// deliver.
    pub fn set_epoch(&mut self, epoch: u64) -> bool {
        self.epoch = Some(epoch);
        let mut any = false;
        for queue in &mut self.nics {
            while let Some((e, frame)) = queue.front() {
                if *e >= epoch {
                    any |= *e == epoch;
                    break;
                }
                self.bytes -= frame.len() as u64;
                self.stale += 1;
                queue.pop_front();
            }
        }
        any
    }

    /// A mirrored frame for NIC `nic`, received by the PVM in `epoch`.
    pub fn push(&mut self, epoch: u64, nic: usize, frame: Vec<u8>) -> Pushed {
        if self.epoch.is_some_and(|e| epoch < e) {
            self.stale += 1;
            return Pushed::Stale;
        }
        let len = frame.len() as u64;
        let Some(queue) = self.nics.get_mut(nic) else {
            self.dropped += 1;
            return Pushed::Dropped;
        };
        if self.bytes + len > self.max_bytes {
            self.dropped += 1;
            return Pushed::Dropped;
        }
        // The primary tags in epoch order; a frame from an older epoch
        // than the last queued still goes before the newer ones.
        let at = queue
            .iter()
            .rposition(|(e, _)| *e <= epoch)
            .map_or(0, |i| i + 1);
        queue.insert(at, (epoch, frame));
        self.bytes += len;
        match self.epoch {
            Some(e) if e == epoch => Pushed::Deliverable,
            _ => Pushed::Waiting,
        }
    }

    /// NIC `nic`'s next deliverable frame.
    pub fn pop(&mut self, nic: usize) -> Option<Vec<u8>> {
        let epoch = self.epoch?;
        let queue = self.nics.get_mut(nic)?;
        while let Some((e, _)) = queue.front() {
            if *e > epoch {
                return None;
            }
            let (e, frame) = queue.pop_front()?;
            self.bytes -= frame.len() as u64;
            if e == epoch {
                return Some(frame);
            }
            self.stale += 1;
        }
        None
    }

    /// Whether NIC `nic` has a frame to deliver now.
    pub fn deliverable(&self, nic: usize) -> bool {
        match (self.epoch, self.nics.get(nic).and_then(|q| q.front())) {
            (Some(epoch), Some((e, _))) => *e == epoch,
            _ => false,
        }
    }

    /// Frames queued, all NICs.
    pub fn depth(&self) -> u64 {
        self.nics.iter().map(|q| q.len() as u64).sum()
    }

    /// Bytes queued, all NICs.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Frames dropped beyond the bound (or for no NIC) so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Frames dropped because their epoch was already loaded (they came
    /// late, or were not delivered before the epoch moved on) so far.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    /// Forgets every queued frame (failover: clients resend).
    pub fn clear(&mut self) {
        self.nics.iter_mut().for_each(VecDeque::clear);
        self.bytes = 0;
    }
}

/// Bytes of its own TCP output each SVM NIC keeps for a failover
/// ([`Replay`]).
pub const DEFAULT_REPLAY_BYTES: u64 = 1 << 20;

/// The SVM's TCP frames of its current epoch, already in the PVM's
/// sequence space, kept for a failover.
///
/// When the primary dies, the SVM's replies to what the client sent last
/// went to the dead primary's compare: the client would wait for its own
/// retransmission timeout (200 ms at least on Linux) to hear them. Sent
/// again on the tap at takeover, they reach it at once. Only TCP: a
/// receiver drops a segment it already has, so a duplicate of what the
/// PVM's twin already delivered is harmless; a datagram sent twice is
/// not. Frames of earlier epochs are in the checkpoint the SVM loaded
/// since, and their PVM twins were released at its ack.
#[derive(Debug)]
pub struct Replay {
    max_bytes: u64,
    epoch: u64,
    frames: VecDeque<Vec<u8>>,
    bytes: u64,
}

impl Replay {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            epoch: 0,
            frames: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keeps `frame`, sent in `epoch`, if it is TCP; a new epoch forgets
    /// the old one's; beyond the bound the oldest frames go.
    pub fn record(&mut self, epoch: u64, frame: &[u8]) {
        if epoch != self.epoch {
            self.frames.clear();
            self.bytes = 0;
            self.epoch = epoch;
        }
        if !matches!(
            crate::packet::parse(frame),
            Ok(crate::packet::Packet::Tcp { .. })
        ) {
            return;
        }
        let len = frame.len() as u64;
        if len > self.max_bytes {
            return;
        }
        while self.bytes + len > self.max_bytes {
            match self.frames.pop_front() {
                Some(old) => self.bytes -= old.len() as u64,
                None => break,
            }
        }
        self.bytes += len;
        self.frames.push_back(frame.to_vec());
    }

    /// The frames kept, oldest first; forgets them.
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        self.bytes = 0;
        self.frames.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    #[test]
    fn frames_wait_for_their_epoch_and_older_ones_are_dropped() {
        let mut q = MirrorQueue::new(2, 1 << 20);
        // Before the first run: held, nothing delivered.
        assert_eq!(q.push(1, 0, frame(1, 60)), Pushed::Waiting);
        assert_eq!(q.push(2, 0, frame(2, 60)), Pushed::Waiting);
        assert_eq!(q.push(3, 1, frame(3, 60)), Pushed::Waiting);
        assert_eq!(q.pop(0), None);
        // Checkpoint 1 loaded: epoch 2 runs; epoch 1's frame is in the state.
        assert!(q.set_epoch(2));
        assert_eq!(q.depth(), 2);
        assert_eq!(q.pop(0), Some(frame(2, 60)));
        assert_eq!(q.pop(0), None);
        assert!(!q.deliverable(1));
        assert_eq!(q.pop(1), None, "epoch 3 waits");
        assert_eq!(q.push(2, 0, frame(4, 60)), Pushed::Deliverable);
        assert_eq!(q.push(1, 0, frame(5, 60)), Pushed::Stale);
        assert!(q.set_epoch(3));
        assert_eq!(q.pop(0), None, "epoch 2's undelivered frame is dropped");
        assert_eq!(q.pop(1), Some(frame(3, 60)));
        assert_eq!((q.depth(), q.bytes(), q.dropped()), (0, 0, 0));
        assert_eq!(
            q.stale(),
            3,
            "epoch 1's, the late one, epoch 2's undelivered"
        );
    }

    #[test]
    fn beyond_the_bound_the_newest_frame_is_dropped() {
        let mut q = MirrorQueue::new(1, 150);
        q.set_epoch(1);
        assert_eq!(q.push(1, 0, frame(1, 100)), Pushed::Deliverable);
        assert_eq!(q.push(1, 0, frame(2, 60)), Pushed::Dropped);
        assert_eq!(q.push(1, 0, frame(3, 50)), Pushed::Deliverable);
        assert_eq!(q.push(1, 3, frame(4, 1)), Pushed::Dropped, "no NIC 3");
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.bytes(), 150);
        assert_eq!(q.pop(0), Some(frame(1, 100)));
        assert_eq!(q.pop(0), Some(frame(3, 50)));
        q.push(2, 0, frame(5, 10));
        q.clear();
        assert_eq!((q.depth(), q.bytes()), (0, 0));
        assert!(!q.set_epoch(2));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push { epoch: u64, nic: usize, len: usize },
        Pop(usize),
        Run(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6u64, 0..3usize, 1..80usize)
                .prop_map(|(epoch, nic, len)| Op::Push { epoch, nic, len }),
            4 => (0..3usize).prop_map(Op::Pop),
            1 => (0..6u64).prop_map(Op::Run),
        ]
    }

    proptest! {
        /// Against a model: every frame popped is of the SVM's epoch, per
        /// NIC in arrival order among its epoch, each at most once; a
        /// frame of the current epoch that was kept is popped before a pop
        /// returns None; the bytes stay within the bound.
        #[test]
        fn delivery_follows_the_epoch_rule(ops in proptest::collection::vec(op(), 0..200)) {
            const MAX: u64 = 400;
            let mut q = MirrorQueue::new(2, MAX);
            // Model: per NIC, the kept frames (epoch, id).
            let mut model: Vec<Vec<(u64, u32)>> = vec![Vec::new(); 2];
            let mut epoch: Option<u64> = None;
            let mut next_id = 0u32;
            let mut dropped = 0;
            for op in ops {
                match op {
                    Op::Push { epoch: e, nic, len } => {
                        next_id += 1;
                        let mut data = vec![0u8; len.max(4)];
                        data[..4].copy_from_slice(&next_id.to_le_bytes());
                        let before = q.bytes();
                        let got = q.push(e, nic, data.clone());
                        let stale = epoch.is_some_and(|cur| e < cur);
                        let fits = nic < 2 && before + data.len() as u64 <= MAX;
                        let want = match (stale, fits) {
                            (true, _) => Pushed::Stale,
                            (false, false) => { dropped += 1; Pushed::Dropped }
                            (false, true) if epoch == Some(e) => Pushed::Deliverable,
                            (false, true) => Pushed::Waiting,
                        };
                        prop_assert_eq!(got, want);
                        if matches!(want, Pushed::Deliverable | Pushed::Waiting) {
                            let m = &mut model[nic];
                            let at = m.iter().rposition(|(x, _)| *x <= e).map_or(0, |i| i + 1);
                            m.insert(at, (e, next_id));
                        }
                    }
                    Op::Pop(nic) => {
                        let got = q.pop(nic).map(|f| u32::from_le_bytes(f[..4].try_into().unwrap()));
                        let want = match (epoch, model.get_mut(nic)) {
                            (Some(cur), Some(m)) => {
                                m.retain(|(e, _)| *e >= cur);
                                match m.first() {
                                    Some((e, id)) if *e == cur => { let id = *id; m.remove(0); Some(id) }
                                    _ => None,
                                }
                            }
                            _ => None,
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Run(e) => {
                        // Epochs only move forward.
                        let e = epoch.map_or(e, |cur| cur.max(e));
                        epoch = Some(e);
                        let any = q.set_epoch(e);
                        for m in &mut model {
                            m.retain(|(x, _)| *x >= e);
                        }
                        prop_assert_eq!(any, model.iter().any(|m| m.first().is_some_and(|(x, _)| *x == e)));
                    }
                }
                prop_assert!(q.bytes() <= MAX);
                prop_assert_eq!(q.dropped(), dropped);
            }
        }
    }

    #[test]
    fn replay_keeps_the_current_epochs_tcp_frames_within_its_bound() {
        let tcp = |seq: u32| {
            let mut f = Vec::new();
            etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
                .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
                .tcp(80, 40000, seq, 1000)
                .write(&mut f, &[7u8; 100])
                .unwrap();
            f
        };
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .udp(7, 40000)
            .write(&mut udp, &[1, 2, 3])
            .unwrap();
        let size = tcp(0).len() as u64;
        let mut r = Replay::new(3 * size);
        r.record(1, &tcp(1));
        r.record(2, &tcp(2));
        r.record(2, &udp);
        r.record(2, &[0u8; 10]);
        r.record(2, &tcp(3));
        // Epoch 1's frame went with the new epoch; UDP and junk never came in.
        assert_eq!(r.take(), [tcp(2), tcp(3)]);
        assert!(r.take().is_empty());
        for seq in 10..15 {
            r.record(2, &tcp(seq));
        }
        // The bound keeps the newest three.
        assert_eq!(r.take(), [tcp(12), tcp(13), tcp(14)]);
    }
}
