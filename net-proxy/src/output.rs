//! The primary's output buffer (Remus mode).
//!
//! Every frame the guest sends during epoch N is held until the secondary
//! has acknowledged checkpoint N: a client must never see output of a
//! guest state the replica could not resume from. The buffer only keeps
//! frames and epoch tags; the caller decides when an epoch is safe.
//!
//! ```text
//! new()          pass-through: push() hands every frame back (Push::Pass)
//! hold_from(N)   holding: frames pushed now are tagged N
//! close_epoch(N) with the guest paused at checkpoint N: later frames are N + 1
//! release_through(N)  the secondary acked N: frames of epochs <= N come out
//! release_all()  replication ended: everything comes out, pass-through again
//! ```
//!
//! Frames always come out in the order they were pushed: a frame waits
//! behind an earlier held frame even when its own epoch is released (which
//! can only happen if `hold_from` moved the epoch backwards).

use std::collections::VecDeque;

/// What [`OutputBuffer::push`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Not holding: send the frame now.
    Pass(Vec<u8>),
    /// Held for its epoch. `over_bound`: the held bytes now exceed the
    /// bound given to [`OutputBuffer::new`] (time for a checkpoint; the
    /// frame is held all the same).
    Held { over_bound: bool },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutputError {
    #[error("closing epoch {given} but the open epoch is {open}")]
    WrongEpoch { given: u64, open: u64 },
    #[error("closing epoch {given} but output is not held")]
    NotHolding { given: u64 },
}

/// Frames held per epoch; see the module docs.
#[derive(Debug)]
pub struct OutputBuffer {
    max_held_bytes: u64,
    /// The epoch frames pushed now belong to; `None` when passing through.
    open: Option<u64>,
    /// (epoch, frame) in push order.
    held: VecDeque<(u64, Vec<u8>)>,
    held_bytes: u64,
}

impl OutputBuffer {
    /// Not holding: [`OutputBuffer::push`] passes frames through until
    /// [`OutputBuffer::hold_from`].
    pub fn new(max_held_bytes: u64) -> Self {
        Self {
            max_held_bytes,
            open: None,
            held: VecDeque::new(),
            held_bytes: 0,
        }
    }

    /// Start holding; frames pushed from now belong to `epoch`. Frames
    /// already held keep their epochs.
    pub fn hold_from(&mut self, epoch: u64) {
        self.open = Some(epoch);
    }

    pub fn holding(&self) -> bool {
        self.open.is_some()
    }

    /// The epoch frames pushed now belong to, when holding.
    pub fn open_epoch(&self) -> Option<u64> {
        self.open
    }

    /// Holds `frame` for the open epoch, or hands it back when not holding.
    pub fn push(&mut self, frame: Vec<u8>) -> Push {
        let Some(epoch) = self.open else {
            return Push::Pass(frame);
        };
        self.held_bytes += frame.len() as u64;
        self.held.push_back((epoch, frame));
        Push::Held {
            over_bound: self.held_bytes > self.max_held_bytes,
        }
    }

    /// Frames pushed so far belong to `epoch`, which must be the open
    /// epoch; later ones belong to `epoch + 1`.
    pub fn close_epoch(&mut self, epoch: u64) -> Result<(), OutputError> {
        match self.open {
            None => Err(OutputError::NotHolding { given: epoch }),
            Some(open) if open != epoch => Err(OutputError::WrongEpoch { given: epoch, open }),
            Some(open) => {
                self.open = Some(open + 1);
                Ok(())
            }
        }
    }

    /// Every held frame of epochs <= `epoch`, in push order (stopping at
    /// the first frame of a later epoch, see the module docs).
    pub fn release_through(&mut self, epoch: u64) -> Vec<Vec<u8>> {
        let n = self.held.iter().take_while(|(e, _)| *e <= epoch).count();
        self.take_front(n)
    }

    /// Everything held, in push order; stop holding (pass-through again).
    pub fn release_all(&mut self) -> Vec<Vec<u8>> {
        self.open = None;
        self.take_front(self.held.len())
    }

    pub fn held_frames(&self) -> u64 {
        self.held.len() as u64
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    fn take_front(&mut self, n: usize) -> Vec<Vec<u8>> {
        let out: Vec<Vec<u8>> = self.held.drain(..n).map(|(_, f)| f).collect();
        self.held_bytes -= out.iter().map(|f| f.len() as u64).sum::<u64>();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn passes_through_until_holding() {
        let mut b = OutputBuffer::new(100);
        assert!(!b.holding());
        assert_eq!(b.push(vec![1, 2]), Push::Pass(vec![1, 2]));
        assert_eq!(b.held_frames(), 0);
        b.hold_from(7);
        assert!(b.holding());
        assert_eq!(b.open_epoch(), Some(7));
        assert_eq!(b.push(vec![3]), Push::Held { over_bound: false });
        assert_eq!((b.held_frames(), b.held_bytes()), (1, 1));
    }

    #[test]
    fn releases_per_epoch() {
        let mut b = OutputBuffer::new(1000);
        b.hold_from(1);
        b.push(vec![1]);
        b.push(vec![2]);
        b.close_epoch(1).unwrap();
        b.push(vec![3]);
        assert_eq!(b.release_through(0), Vec::<Vec<u8>>::new());
        assert_eq!(b.release_through(1), vec![vec![1], vec![2]]);
        assert_eq!(b.held_frames(), 1);
        b.close_epoch(2).unwrap();
        b.push(vec![4]);
        assert_eq!(b.release_through(2), vec![vec![3]]);
        assert_eq!(b.release_all(), vec![vec![4]]);
        assert!(!b.holding());
        assert_eq!(b.push(vec![5]), Push::Pass(vec![5]));
    }

    #[test]
    fn close_checks_the_open_epoch() {
        let mut b = OutputBuffer::new(10);
        assert_eq!(b.close_epoch(3), Err(OutputError::NotHolding { given: 3 }));
        b.hold_from(4);
        let err = b.close_epoch(3).unwrap_err();
        assert_eq!(err, OutputError::WrongEpoch { given: 3, open: 4 });
        assert_eq!(err.to_string(), "closing epoch 3 but the open epoch is 4");
        assert_eq!(b.open_epoch(), Some(4));
        b.close_epoch(4).unwrap();
        assert_eq!(b.open_epoch(), Some(5));
    }

    #[test]
    fn reports_going_over_the_bound() {
        let mut b = OutputBuffer::new(10);
        b.hold_from(0);
        assert_eq!(b.push(vec![0; 10]), Push::Held { over_bound: false });
        assert_eq!(b.push(vec![0; 1]), Push::Held { over_bound: true });
        assert_eq!(b.held_bytes(), 11);
        b.release_through(0);
        assert_eq!(b.push(vec![0; 1]), Push::Held { over_bound: false });
    }

    #[test]
    fn a_later_frame_waits_behind_an_earlier_held_one() {
        let mut b = OutputBuffer::new(100);
        b.hold_from(5);
        b.push(vec![5]);
        b.hold_from(2);
        b.push(vec![2]);
        assert_eq!(b.release_through(2), Vec::<Vec<u8>>::new());
        assert_eq!(b.release_through(5), vec![vec![5], vec![2]]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push(usize),
        HoldFrom(u64),
        Close,
        CloseWrong(u64),
        Release(u64),
        ReleaseAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..40).prop_map(Op::Push),
            1 => (0u64..20).prop_map(Op::HoldFrom),
            3 => Just(Op::Close),
            1 => (0u64..20).prop_map(Op::CloseWrong),
            3 => (0u64..20).prop_map(Op::Release),
            1 => Just(Op::ReleaseAll),
        ]
    }

    /// A frame numbered `id`: the id in its first 8 bytes, then `len` bytes.
    fn frame(id: u64, len: usize) -> Vec<u8> {
        let mut f = id.to_le_bytes().to_vec();
        f.resize(8 + len, id as u8);
        f
    }

    fn id_of(f: &[u8]) -> u64 {
        u64::from_le_bytes(f[..8].try_into().unwrap())
    }

    proptest! {
        /// Any interleaving keeps push order, releases no frame before its
        /// epoch, loses and duplicates nothing; the counters always equal
        /// what is held.
        #[test]
        fn holds_in_order_and_releases_by_epoch(ops in proptest::collection::vec(op(), 0..200), max in 0u64..400) {
            let mut b = OutputBuffer::new(max);
            // Model: (id, epoch tag or None for pass-through, len).
            let mut tags: Vec<Option<u64>> = Vec::new();
            let mut model_held: Vec<(u64, usize)> = Vec::new();
            let mut out: Vec<u64> = Vec::new();
            let mut open: Option<u64> = None;
            for op in ops {
                match op {
                    Op::Push(len) => {
                        let id = tags.len() as u64;
                        tags.push(open);
                        match b.push(frame(id, len)) {
                            Push::Pass(f) => {
                                prop_assert!(open.is_none());
                                prop_assert_eq!(id_of(&f), id);
                                out.push(id);
                            }
                            Push::Held { over_bound } => {
                                prop_assert!(open.is_some());
                                model_held.push((id, 8 + len));
                                let bytes: u64 = model_held.iter().map(|(_, l)| *l as u64).sum();
                                prop_assert_eq!(over_bound, bytes > max);
                            }
                        }
                    }
                    Op::HoldFrom(e) => {
                        b.hold_from(e);
                        open = Some(e);
                    }
                    Op::Close => match open {
                        Some(e) => {
                            b.close_epoch(e).unwrap();
                            open = Some(e + 1);
                        }
                        None => prop_assert!(b.close_epoch(0).is_err()),
                    },
                    Op::CloseWrong(e) => {
                        if open != Some(e) {
                            prop_assert!(b.close_epoch(e).is_err());
                            prop_assert_eq!(b.open_epoch(), open);
                        }
                    }
                    Op::Release(e) => {
                        for f in b.release_through(e) {
                            let id = id_of(&f);
                            let tag = tags[id as usize];
                            prop_assert!(tag.is_some_and(|t| t <= e), "frame {} of epoch {:?} released at {}", id, tag, e);
                            prop_assert_eq!(model_held.first().map(|(i, _)| *i), Some(id));
                            model_held.remove(0);
                            out.push(id);
                        }
                        // Whatever stays is blocked by a frame of a later epoch.
                        if let Some((first, _)) = model_held.first() {
                            prop_assert!(tags[*first as usize].is_some_and(|t| t > e));
                        }
                    }
                    Op::ReleaseAll => {
                        out.extend(b.release_all().iter().map(|f| id_of(f)));
                        model_held.clear();
                        open = None;
                    }
                }
                prop_assert_eq!(b.holding(), open.is_some());
                prop_assert_eq!(b.held_frames(), model_held.len() as u64);
                prop_assert_eq!(b.held_bytes(), model_held.iter().map(|(_, l)| *l as u64).sum::<u64>());
            }
            out.extend(b.release_all().iter().map(|f| id_of(f)));
            prop_assert_eq!(out, (0..tags.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!((b.held_frames(), b.held_bytes()), (0, 0));
        }
    }
}
