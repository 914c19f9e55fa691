//! The primary's per-disk write forwarder: a state machine the vmm's
//! block backend consults on every guest write.
//!
//! ```text
//! Off ──track(block)──→ Tracking ──forward_from(N)──→ Forwarding(N) ──close_epoch(N)──→ Forwarding(N+1)
//!  ↑                                                       │
//!  └────────────────────────── stop() ─────────────────────┘
//! ```
//!
//! - Tracking (initial sync): the disk is being copied while the guest
//!   runs; every block the guest writes is remembered and sent again during
//!   the stop-and-copy ([`Forwarder::take_tracked`]).
//! - Forwarding: every write is sent to the secondary tagged with the open
//!   epoch; the checkpoint of epoch N closes it (with the guest paused), so
//!   the writes the guest made before the pause are N's.
//!
//! `forward_from` keeps the blocks tracked so far: the stop-and-copy may
//! take them before or after it, with the guest paused either way.

/// Which stage of replication a disk is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    Tracking,
    /// Writes are tagged with this (open) epoch.
    Forwarding(u64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("closing epoch {given} but the open epoch is {open}")]
    WrongEpoch { given: u64, open: u64 },
    #[error("closing epoch {given} but writes are not forwarded")]
    NotForwarding { given: u64 },
}

/// Blocks written, one bit per block.
#[derive(Debug)]
struct Tracked {
    block: u64,
    bits: Vec<u64>,
}

/// The write forwarder of one disk; see the module docs.
#[derive(Debug)]
pub struct Forwarder {
    capacity: u64,
    mode: Mode,
    tracked: Option<Tracked>,
}

impl Forwarder {
    /// A disk of `capacity` bytes, `Off`.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            mode: Mode::Off,
            tracked: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// -> Tracking: from now on remember which `block`-byte blocks the
    /// guest writes (forgetting any earlier ones). A `block` of 0 counts
    /// as 1.
    pub fn track(&mut self, block: u32) {
        let block = u64::from(block.max(1));
        let words = self.capacity.div_ceil(block).div_ceil(64);
        self.tracked = Some(Tracked {
            block,
            bits: vec![0; usize::try_from(words).unwrap_or(usize::MAX)],
        });
        self.mode = Mode::Tracking;
    }

    /// Indices of the blocks written since [`Forwarder::track`] or the
    /// previous call, ascending.
    pub fn take_tracked(&mut self) -> Vec<u64> {
        let Some(t) = &mut self.tracked else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (w, word) in t.bits.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                out.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// -> Forwarding at `epoch`.
    pub fn forward_from(&mut self, epoch: u64) {
        self.mode = Mode::Forwarding(epoch);
    }

    /// Writes so far belong to `epoch` (must be the open one), later ones
    /// to `epoch + 1`.
    pub fn close_epoch(&mut self, epoch: u64) -> Result<(), ForwardError> {
        match self.mode {
            Mode::Forwarding(open) if open == epoch => {
                self.mode = Mode::Forwarding(open + 1);
                Ok(())
            }
            Mode::Forwarding(open) => Err(ForwardError::WrongEpoch { given: epoch, open }),
            Mode::Off | Mode::Tracking => Err(ForwardError::NotForwarding { given: epoch }),
        }
    }

    /// -> Off (the peer is gone); forgets tracked blocks.
    pub fn stop(&mut self) {
        self.mode = Mode::Off;
        self.tracked = None;
    }

    /// Called on every guest write of `len` bytes at `offset`: marks the
    /// blocks it touches when tracking (the part beyond the capacity is
    /// ignored); returns the epoch to tag it with when forwarding.
    pub fn on_write(&mut self, offset: u64, len: u64) -> Option<u64> {
        match self.mode {
            Mode::Off => None,
            Mode::Forwarding(epoch) => Some(epoch),
            Mode::Tracking => {
                let end = offset.saturating_add(len).min(self.capacity);
                if let Some(t) = &mut self.tracked {
                    if offset < end {
                        for b in offset / t.block..=(end - 1) / t.block {
                            t.bits[(b / 64) as usize] |= 1 << (b % 64);
                        }
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn off_until_told() {
        let mut f = Forwarder::new(1 << 20);
        assert_eq!(f.mode(), Mode::Off);
        assert_eq!(f.on_write(0, 4096), None);
        assert_eq!(f.take_tracked(), Vec::<u64>::new());
        assert_eq!(
            f.close_epoch(1),
            Err(ForwardError::NotForwarding { given: 1 })
        );
    }

    #[test]
    fn tracks_the_blocks_a_write_touches() {
        let mut f = Forwarder::new(10 * 4096 + 100);
        f.track(4096);
        assert_eq!(f.mode(), Mode::Tracking);
        assert_eq!(f.on_write(4095, 2), None); // blocks 0 and 1
        f.on_write(3 * 4096, 4096); // block 3 exactly
        f.on_write(10 * 4096 + 99, 1000); // the short last block, clipped
        f.on_write(20 * 4096, 10); // beyond the capacity: ignored
        f.on_write(5 * 4096, 0); // empty: nothing
        assert_eq!(f.take_tracked(), vec![0, 1, 3, 10]);
        assert_eq!(f.take_tracked(), Vec::<u64>::new());
        f.on_write(u64::MAX - 1, 10); // no overflow
        assert_eq!(f.take_tracked(), Vec::<u64>::new());
    }

    #[test]
    fn forwarding_tags_writes_with_the_open_epoch() {
        let mut f = Forwarder::new(1 << 20);
        f.track(4096);
        f.on_write(8192, 1);
        f.forward_from(5);
        assert_eq!(f.on_write(0, 512), Some(5));
        // Blocks tracked before forwarding are still there; writes while
        // forwarding are not tracked (they are forwarded).
        assert_eq!(f.take_tracked(), vec![2]);
        assert_eq!(
            f.close_epoch(4),
            Err(ForwardError::WrongEpoch { given: 4, open: 5 })
        );
        f.close_epoch(5).unwrap();
        assert_eq!(f.on_write(0, 512), Some(6));
        assert_eq!(f.mode(), Mode::Forwarding(6));
        f.stop();
        assert_eq!(f.mode(), Mode::Off);
        assert_eq!(f.on_write(0, 512), None);
    }

    #[test]
    fn stop_forgets_tracked_blocks() {
        let mut f = Forwarder::new(1 << 20);
        f.track(4096);
        f.on_write(0, 1);
        f.stop();
        assert_eq!(f.take_tracked(), Vec::<u64>::new());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Track,
        Forward(u64),
        Close(u64),
        CloseOpen,
        Stop,
        Write,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Track),
            1 => (0u64..10).prop_map(Op::Forward),
            1 => (0u64..12).prop_map(Op::Close),
            3 => Just(Op::CloseOpen),
            1 => Just(Op::Stop),
            4 => Just(Op::Write),
        ]
    }

    proptest! {
        /// In any sequence of transitions a write is tagged with the open
        /// epoch exactly when forwarding, and a refused close changes
        /// nothing.
        #[test]
        fn tags_follow_the_open_epoch(ops in proptest::collection::vec(op(), 0..100)) {
            let mut f = Forwarder::new(1 << 16);
            let mut model = Mode::Off;
            for op in ops {
                match op {
                    Op::Track => {
                        f.track(512);
                        model = Mode::Tracking;
                    }
                    Op::Forward(e) => {
                        f.forward_from(e);
                        model = Mode::Forwarding(e);
                    }
                    Op::Close(e) => {
                        let ok = model == Mode::Forwarding(e);
                        prop_assert_eq!(f.close_epoch(e).is_ok(), ok);
                        if ok {
                            model = Mode::Forwarding(e + 1);
                        }
                    }
                    Op::CloseOpen => {
                        if let Mode::Forwarding(e) = model {
                            f.close_epoch(e).unwrap();
                            model = Mode::Forwarding(e + 1);
                        }
                    }
                    Op::Stop => {
                        f.stop();
                        model = Mode::Off;
                    }
                    Op::Write => {
                        let want = match model {
                            Mode::Forwarding(e) => Some(e),
                            Mode::Off | Mode::Tracking => None,
                        };
                        prop_assert_eq!(f.on_write(4096, 512), want);
                    }
                }
                prop_assert_eq!(f.mode(), model);
            }
        }

        /// The tracked blocks are exactly those some write touched within
        /// the capacity, in any block size.
        #[test]
        fn tracked_blocks_match_a_model(
            capacity in 0u64..100_000,
            block in 1u32..10_000,
            writes in proptest::collection::vec((0u64..120_000, 0u64..30_000), 0..50),
        ) {
            let mut f = Forwarder::new(capacity);
            f.track(block);
            // Model: one flag per block, set byte by byte.
            let mut model = vec![false; capacity.div_ceil(u64::from(block)) as usize];
            for (off, len) in writes {
                prop_assert_eq!(f.on_write(off, len), None);
                for byte in off..(off + len).min(capacity) {
                    model[(byte / u64::from(block)) as usize] = true;
                }
            }
            let want: Vec<u64> = (0..model.len() as u64).filter(|&i| model[i as usize]).collect();
            prop_assert_eq!(f.take_tracked(), want);
        }
    }
}
