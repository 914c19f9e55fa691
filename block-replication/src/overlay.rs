//! The secondary's disks in COLO mode: the SVM runs and writes to an
//! overlay, the PVM's forwarded writes are held per epoch and reach the
//! base at each checkpoint.
//!
//! ```text
//!            SVM read ──→ overlay sector? ──yes──→ overlay
//!                               │ no
//!                               ▼
//!  base image ◄── commit(N): epochs ≤ N's PVM writes (journaled), overlay dropped
//!             ◄── failover(): overlay merged (journaled), PVM writes > last commit dropped
//! ```
//!
//! The life of a write:
//! - An SVM write ([`ColoDisks::write`], whole 512-byte sectors) goes to
//!   the overlay, in memory; the base is not touched. A read sees the
//!   overlay's sectors over the base's.
//! - A PVM write ([`ColoDisks::stage`], tagged with its epoch) is held and
//!   seen by nobody: the SVM's disk is its own until the next checkpoint.
//! - Checkpoint N ([`ColoDisks::commit`], after the SVM has loaded the
//!   PVM's state N): epochs ≤ N's PVM writes go to the base, and the
//!   overlay is dropped: the SVM now runs from the PVM's state, whose disk
//!   is the base.
//! - Failover ([`ColoDisks::failover`]): the PVM is gone and the SVM
//!   carries on from its current state, so its disk becomes the truth:
//!   the held writes of uncommitted epochs are dropped and the overlay is
//!   merged into the base. From then on SVM writes go straight to the base
//!   and [`ColoDisks::flush`] syncs it.
//!
//! The overlay is bounded ([`Limits::overlay_bytes`]): an SVM write that
//! needs more sectors than are left fails with [`ColoDiskError::OverlayFull`]
//! and changes nothing. The caller answers it by requesting a checkpoint,
//! which empties the overlay, and retries the write after it (the SVM's
//! request waits; with a paused SVM nothing is lost).
//!
//! What a crash leaves: with a journal ([`crate::journal`]) a commit and a
//! failover merge are each all-or-nothing, so the base is always the PVM's
//! disk at some committed checkpoint (or, once a failover merge completed,
//! the SVM's disk at failover). The overlay lives only in memory: before
//! failover the SVM's writes are not the truth, and a crashed secondary
//! is synced again like a new one. Without a journal a crash during a
//! commit leaves a prefix of it (see [`crate::secondary`]).

use std::collections::BTreeMap;

use crate::journal::{self, Entry, JournalError};
use crate::secondary::{CommitError, EpochBuffer, Image, ReadImage, StageError};

/// The overlay's unit, bytes.
pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum ColoDiskError {
    #[error("disk {disk}, there are {disks} disks")]
    NoSuchDisk { disk: usize, disks: usize },
    #[error("{len} bytes at offset {offset} end beyond disk {disk}'s {capacity} bytes")]
    Range {
        disk: usize,
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("a write of {len} bytes at offset {offset} is not whole 512-byte sectors")]
    Unaligned { offset: u64, len: u64 },
    #[error("overlay full: a write needs {needed} more bytes, {held} of {max} held (a checkpoint empties it)")]
    OverlayFull { needed: u64, held: u64, max: u64 },
    #[error("the disks failed over: PVM writes and checkpoints are over")]
    FailedOver,
    #[error("reading disk {disk} at offset {offset}")]
    Read {
        disk: usize,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("writing disk {disk} at offset {offset}")]
    Write {
        disk: usize,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("syncing disk {disk}")]
    Sync {
        disk: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("holding a PVM write")]
    Stage(#[source] StageError),
    #[error("committing a checkpoint")]
    Commit(#[source] CommitError),
    #[error("merging the overlay into the base")]
    Merge(#[source] JournalError),
}

/// The bounds of what is held in memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The SVM's overlay, all disks together; a multiple of [`SECTOR`]
    /// counts whole sectors.
    pub overlay_bytes: u64,
    /// The PVM's held writes (see [`EpochBuffer::new`]).
    pub held_bytes: u64,
}

/// What [`ColoDisks::failover`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failover {
    /// Held PVM writes of uncommitted epochs, dropped.
    pub dropped_writes: usize,
    /// Overlay bytes written to the base.
    pub merged_bytes: u64,
}

/// One disk's overlay: sector index → the SVM's bytes.
type Overlay = BTreeMap<u64, Box<[u8; SECTOR as usize]>>;

/// The secondary's disks in COLO mode; see the module docs.
#[derive(Debug)]
pub struct ColoDisks<B> {
    bases: Vec<B>,
    capacities: Vec<u64>,
    overlays: Vec<Overlay>,
    overlay_bytes: u64,
    max_overlay_bytes: u64,
    held: EpochBuffer,
    failed_over: bool,
}

impl<B: ReadImage> ColoDisks<B> {
    /// The disks `bases` (image, capacity in bytes), guest order. A
    /// `journal` (opened with [`journal::Journal::open`], which recovers
    /// the bases) makes commits and the failover merge crash-safe.
    pub fn new(bases: Vec<(B, u64)>, limits: Limits, journal: Option<journal::Journal>) -> Self {
        let (bases, capacities): (Vec<B>, Vec<u64>) = bases.into_iter().unzip();
        let mut held = EpochBuffer::with_capacities(limits.held_bytes, capacities.clone());
        if let Some(j) = journal {
            held = held.with_journal(j);
        }
        Self {
            overlays: vec![Overlay::new(); bases.len()],
            bases,
            capacities,
            overlay_bytes: 0,
            max_overlay_bytes: limits.overlay_bytes,
            held,
            failed_over: false,
        }
    }

    fn check(&self, disk: usize, offset: u64, len: u64) -> Result<(), ColoDiskError> {
        let capacity = *self.capacities.get(disk).ok_or(ColoDiskError::NoSuchDisk {
            disk,
            disks: self.capacities.len(),
        })?;
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(ColoDiskError::Range {
                disk,
                offset,
                len,
                capacity,
            });
        }
        Ok(())
    }

    /// The SVM's read: `buf.len()` bytes at `offset` of disk `disk`, the
    /// overlay's sectors over the base's bytes (any offset and length).
    pub fn read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), ColoDiskError> {
        let len = buf.len() as u64;
        self.check(disk, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / SECTOR, (offset + len - 1) / SECTOR);
        let overlay = self.overlays[disk].range(first..=last);
        // Every sector from the overlay: the base is not read.
        if overlay.clone().count() as u64 != last - first + 1 {
            self.bases[disk]
                .read_at(offset, buf)
                .map_err(|source| ColoDiskError::Read {
                    disk,
                    offset,
                    source,
                })?;
        }
        for (&sector, data) in overlay {
            let start = (sector * SECTOR).max(offset);
            let end = ((sector + 1) * SECTOR).min(offset + len);
            let from = (start - sector * SECTOR) as usize..(end - sector * SECTOR) as usize;
            buf[(start - offset) as usize..(end - offset) as usize].copy_from_slice(&data[from]);
        }
        Ok(())
    }

    /// The SVM's write of whole sectors: to the overlay, or after failover
    /// to the base. Fails without a change when the overlay would go over
    /// its bound ([`ColoDiskError::OverlayFull`]: request a checkpoint).
    pub fn write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), ColoDiskError> {
        let len = data.len() as u64;
        self.check(disk, offset, len)?;
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(ColoDiskError::Unaligned { offset, len });
        }
        if self.failed_over {
            return self.bases[disk].write_at(offset, data).map_err(|source| {
                ColoDiskError::Write {
                    disk,
                    offset,
                    source,
                }
            });
        }
        let overlay = &mut self.overlays[disk];
        let first = offset / SECTOR;
        let sectors = len / SECTOR;
        let present = overlay.range(first..first + sectors).count() as u64;
        let needed = (sectors - present) * SECTOR;
        if self.overlay_bytes + needed > self.max_overlay_bytes {
            return Err(ColoDiskError::OverlayFull {
                needed,
                held: self.overlay_bytes,
                max: self.max_overlay_bytes,
            });
        }
        for (i, chunk) in data.chunks_exact(SECTOR as usize).enumerate() {
            let sector = overlay
                .entry(first + i as u64)
                .or_insert_with(|| Box::new([0; SECTOR as usize]));
            sector.copy_from_slice(chunk);
        }
        self.overlay_bytes += needed;
        Ok(())
    }

    /// The SVM's flush: after failover its writes are the truth and the
    /// bases are synced; before, the overlay is not meant to last and
    /// there is nothing to do.
    pub fn flush(&mut self) -> Result<(), ColoDiskError> {
        if !self.failed_over {
            return Ok(());
        }
        for (disk, base) in self.bases.iter_mut().enumerate() {
            base.sync()
                .map_err(|source| ColoDiskError::Sync { disk, source })?;
        }
        Ok(())
    }

    /// Holds a PVM write of `epoch` until that epoch commits; the SVM does
    /// not see it. Refused as [`EpochBuffer::stage`] refuses, and after
    /// failover.
    pub fn stage(
        &mut self,
        epoch: u64,
        disk: usize,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), ColoDiskError> {
        if self.failed_over {
            return Err(ColoDiskError::FailedOver);
        }
        self.held
            .stage(epoch, disk, offset, data)
            .map_err(ColoDiskError::Stage)
    }

    /// Checkpoint `epoch`, loaded into the SVM: the PVM writes of epochs ≤
    /// `epoch` go to the bases (through the journal, if any) and the
    /// overlay is dropped. `progress` as in [`EpochBuffer::commit`].
    /// Returns how many PVM writes it applied. On an error the overlay and
    /// the held writes stay; the SVM must not run on these disks until a
    /// commit succeeded.
    pub fn commit(
        &mut self,
        epoch: u64,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, ColoDiskError> {
        if self.failed_over {
            return Err(ColoDiskError::FailedOver);
        }
        let mut images: Vec<&mut dyn Image> =
            self.bases.iter_mut().map(|b| b as &mut dyn Image).collect();
        let applied = self
            .held
            .commit(epoch, &mut images, progress)
            .map_err(ColoDiskError::Commit)?;
        self.overlays.iter_mut().for_each(Overlay::clear);
        self.overlay_bytes = 0;
        Ok(applied)
    }

    /// The SVM takes over: held PVM writes of uncommitted epochs are
    /// dropped and the overlay is merged into the bases (through the
    /// journal, if any), synced. On an error the overlay stays (reads are
    /// unchanged) and failover may be tried again.
    pub fn failover(&mut self) -> Result<Failover, ColoDiskError> {
        if self.failed_over {
            return Err(ColoDiskError::FailedOver);
        }
        let dropped_writes = self.held.discard_uncommitted();
        // Adjacent sectors merged into one write each.
        let mut runs: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        for (disk, overlay) in self.overlays.iter().enumerate() {
            for (&sector, data) in overlay {
                match runs.last_mut() {
                    Some((d, offset, run))
                        if *d == disk && *offset + run.len() as u64 == sector * SECTOR =>
                    {
                        run.extend_from_slice(&data[..]);
                    }
                    _ => runs.push((disk, sector * SECTOR, data.to_vec())),
                }
            }
        }
        let writes = runs.iter().map(|(d, o, data)| (*d, *o, &data[..]));
        let mut images: Vec<&mut dyn Image> =
            self.bases.iter_mut().map(|b| b as &mut dyn Image).collect();
        match self.held.journal() {
            Some(j) => j.write_through(Entry::Failover, writes, &mut images, &mut |_, _| {}),
            None => journal::apply(writes, &mut images, &mut |_| {}),
        }
        .map_err(ColoDiskError::Merge)?;
        self.overlays.iter_mut().for_each(Overlay::clear);
        let merged_bytes = std::mem::take(&mut self.overlay_bytes);
        self.failed_over = true;
        Ok(Failover {
            dropped_writes,
            merged_bytes,
        })
    }

    /// The SVM's bytes in the overlay.
    pub fn overlay_bytes(&self) -> u64 {
        self.overlay_bytes
    }

    /// The PVM's bytes held for uncommitted epochs.
    pub fn held_bytes(&self) -> u64 {
        self.held.held_bytes()
    }

    pub fn held_writes(&self) -> usize {
        self.held.held_writes()
    }

    /// The last committed epoch.
    pub fn committed(&self) -> Option<u64> {
        self.held.committed()
    }

    pub fn failed_over(&self) -> bool {
        self.failed_over
    }

    /// The base images (after failover, the SVM's disks).
    pub fn into_bases(self) -> Vec<B> {
        self.bases
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, Recovery};
    use crate::testing::{Fake, Loss, Shared, World};
    use proptest::prelude::*;

    const S: usize = SECTOR as usize;

    /// `disks` images of `sectors` sectors (byte i holds i % 251) and an
    /// empty journal file after them.
    fn world(disks: usize, sectors: usize) -> Shared {
        let image: Vec<u8> = (0..sectors * S).map(|i| (i % 251) as u8).collect();
        let mut files = vec![image; disks];
        files.push(Vec::new());
        World::new(files)
    }

    fn disks(
        w: &Shared,
        n: usize,
        sectors: usize,
        limits: Limits,
        journaled: bool,
    ) -> ColoDisks<Fake> {
        let mut bases: Vec<Fake> = (0..n).map(|d| Fake::new(w, d)).collect();
        let journal = journaled.then(|| {
            let mut refs: Vec<&mut dyn Image> =
                bases.iter_mut().map(|b| b as &mut dyn Image).collect();
            let (j, r) = Journal::recover(Box::new(Fake::new(w, n)), &mut refs).unwrap();
            assert_eq!(r, Recovery::Clean);
            j.with_chunk(100)
        });
        let bases = bases
            .into_iter()
            .map(|b| (b, (sectors * S) as u64))
            .collect();
        ColoDisks::new(bases, limits, journal)
    }

    const LIMITS: Limits = Limits {
        overlay_bytes: 4 * SECTOR,
        held_bytes: 1 << 20,
    };

    fn read(d: &mut ColoDisks<Fake>, disk: usize, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        d.read(disk, offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn reads_see_the_overlay_over_the_base() {
        let w = world(1, 4);
        let base = World::lock(&w).contents(0);
        let mut d = disks(&w, 1, 4, LIMITS, true);
        d.write(0, SECTOR, &[7; S]).unwrap();
        // Across sectors 0..=2 at odd ends: base, overlay, base.
        let got = read(&mut d, 0, 500, 2 * S);
        let mut want = base[500..500 + 2 * S].to_vec();
        want[12..12 + S].fill(7);
        assert_eq!(got, want);
        // Inside the overlay only.
        assert_eq!(read(&mut d, 0, SECTOR + 3, 5), [7; 5]);
        assert_eq!(read(&mut d, 0, 0, 0), [0u8; 0]);
        assert_eq!(World::lock(&w).contents(0), base, "the base is untouched");
        assert_eq!(d.overlay_bytes(), SECTOR);
    }

    #[test]
    fn pvm_writes_stay_hidden_until_their_commit_which_drops_the_overlay() {
        let w = world(2, 4);
        let base = World::lock(&w).contents(0);
        let mut d = disks(&w, 2, 4, LIMITS, true);
        d.write(1, 0, &[1; 2 * S]).unwrap();
        d.stage(1, 1, 10, vec![2; 4]).unwrap();
        d.stage(2, 0, 0, vec![3; 4]).unwrap();
        assert_eq!(read(&mut d, 1, 8, 8), [1; 8]);
        assert_eq!(read(&mut d, 0, 0, 4), base[..4]);
        assert_eq!((d.held_writes(), d.held_bytes()), (2, 8));
        let mut calls = Vec::new();
        assert_eq!(d.commit(1, &mut |a, b| calls.push((a, b))).unwrap(), 1);
        assert_eq!(calls, [(1, 1)]);
        assert_eq!(d.overlay_bytes(), 0);
        assert_eq!(d.committed(), Some(1));
        // The SVM's sectors are gone; epoch 1's write is in the base, epoch 2's still held.
        let mut want = base[..16].to_vec();
        want[10..14].fill(2);
        assert_eq!(read(&mut d, 1, 0, 16), want);
        assert_eq!(World::lock(&w).contents(1)[..16], want);
        assert_eq!(read(&mut d, 0, 0, 4), base[..4]);
        assert_eq!(d.held_bytes(), 4);
    }

    #[test]
    fn failover_merges_the_overlay_and_drops_uncommitted_writes() {
        let w = world(2, 4);
        let base = World::lock(&w).contents(0);
        let mut d = disks(&w, 2, 4, LIMITS, true);
        d.stage(1, 0, 0, vec![9; 3]).unwrap();
        d.commit(1, &mut |_, _| {}).unwrap();
        d.stage(2, 0, 0, vec![8; 600]).unwrap();
        d.stage(3, 1, 0, vec![8; 600]).unwrap();
        d.write(0, SECTOR, &[5; 2 * S]).unwrap();
        d.write(1, 3 * SECTOR, &[6; S]).unwrap();
        let f = d.failover().unwrap();
        assert_eq!(
            f,
            Failover {
                dropped_writes: 2,
                merged_bytes: 3 * SECTOR
            }
        );
        let mut want0 = base.clone();
        want0[..3].fill(9);
        want0[S..3 * S].fill(5);
        let mut want1 = base.clone();
        want1[3 * S..].fill(6);
        {
            let g = World::lock(&w);
            assert_eq!(g.contents(0), want0);
            assert_eq!(g.contents(1), want1);
            assert!(g.contents(2).is_empty(), "the journal is emptied");
        }
        assert_eq!((d.overlay_bytes(), d.held_bytes()), (0, 0));
        assert!(d.failed_over());
        // The SVM's disk is now the base: writes go there, flush syncs.
        d.write(0, 0, &[4; S]).unwrap();
        d.flush().unwrap();
        assert_eq!(
            World::lock(&w)
                .reboot(Loss::All)
                .lock()
                .unwrap()
                .contents(0)[..S],
            [4; S]
        );
        assert_eq!(read(&mut d, 0, 0, 2), [4, 4]);
        for e in [
            d.stage(4, 0, 0, vec![1]).unwrap_err(),
            d.commit(4, &mut |_, _| {}).unwrap_err(),
            d.failover().unwrap_err(),
        ] {
            assert!(matches!(e, ColoDiskError::FailedOver), "{e:?}");
        }
    }

    #[test]
    fn refuses_bad_svm_io_and_writes_over_the_bound() {
        let w = world(1, 8);
        let mut d = disks(&w, 1, 8, LIMITS, false);
        d.write(0, 0, &[1; 3 * S]).unwrap();
        d.write(0, 2 * SECTOR, &[2; 2 * S]).unwrap();
        assert_eq!(d.overlay_bytes(), 4 * SECTOR);
        // Rewriting held sectors needs nothing more; a new one is refused.
        d.write(0, SECTOR, &[3; S]).unwrap();
        let e = d.write(0, 3 * SECTOR, &[4; 2 * S]).unwrap_err();
        assert!(
            matches!(
                e,
                ColoDiskError::OverlayFull {
                    needed: 512,
                    held: 2048,
                    max: 2048
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "overlay full: a write needs 512 more bytes, 2048 of 2048 held (a checkpoint empties it)"
        );
        assert_eq!(
            read(&mut d, 0, 3 * SECTOR, S),
            [2; S],
            "nothing of it applied"
        );
        let e = d.write(0, 1, &[0; S]).unwrap_err();
        assert!(
            matches!(
                e,
                ColoDiskError::Unaligned {
                    offset: 1,
                    len: 512
                }
            ),
            "{e:?}"
        );
        let e = d.write(0, 0, &[0; 100]).unwrap_err();
        assert!(matches!(e, ColoDiskError::Unaligned { .. }), "{e:?}");
        let e = d.write(0, 7 * SECTOR, &[0; 2 * S]).unwrap_err();
        assert!(matches!(e, ColoDiskError::Range { disk: 0, .. }), "{e:?}");
        let mut buf = [0u8; 2];
        let e = d.read(0, u64::MAX, &mut buf).unwrap_err();
        assert!(matches!(e, ColoDiskError::Range { .. }), "{e:?}");
        let e = d.read(1, 0, &mut buf).unwrap_err();
        assert!(
            matches!(e, ColoDiskError::NoSuchDisk { disk: 1, disks: 1 }),
            "{e:?}"
        );
        let e = d.stage(1, 0, 8 * SECTOR - 1, vec![0; 2]).unwrap_err();
        assert!(
            matches!(e, ColoDiskError::Stage(StageError::Range { .. })),
            "{e:?}"
        );
        // A checkpoint empties the overlay: the refused write fits now.
        d.commit(1, &mut |_, _| {}).unwrap();
        d.write(0, 3 * SECTOR, &[4; 2 * S]).unwrap();
        assert_eq!(d.overlay_bytes(), 2 * SECTOR);
    }

    const SECTORS: usize = 4;
    const DISK: usize = SECTORS * S;

    #[derive(Clone, Debug)]
    enum Op {
        SvmWrite {
            disk: usize,
            sector: u64,
            sectors: u64,
            fill: u8,
        },
        SvmRead {
            disk: usize,
            offset: u64,
            len: usize,
        },
        /// A PVM write for the newest epoch + `step`.
        Stage {
            step: u64,
            disk: usize,
            offset: u64,
            data: Vec<u8>,
        },
        /// Commit the next epoch + `step` - 1 (a step of 0 is refused).
        Commit {
            step: u64,
        },
        Failover,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..2, 0u64..SECTORS as u64 + 1, 1u64..3, any::<u8>())
                .prop_map(|(disk, sector, sectors, fill)| Op::SvmWrite { disk, sector, sectors, fill }),
            4 => (0usize..3, 0u64..DISK as u64 + 8, 0usize..1200)
                .prop_map(|(disk, offset, len)| Op::SvmRead { disk, offset, len }),
            5 => (0u64..3, 0usize..2, 0u64..DISK as u64, proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(step, disk, offset, data)| Op::Stage { step, disk, offset, data }),
            3 => (0u64..3).prop_map(|step| Op::Commit { step }),
            1 => Just(Op::Failover),
        ]
    }

    /// The SVM's overlay bound in the model test: 5 sectors of 16.
    const MODEL_OVERLAY: u64 = 5 * SECTOR;

    proptest! {
        /// Against a model of (base, what the SVM sees, overlay sectors,
        /// held PVM writes): every read equals the model's SVM view, the
        /// base image equals the model's base after every operation (the
        /// SVM never writes it before failover), refused operations change
        /// nothing.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(op(), 0..60), journaled in any::<bool>()) {
            let w = world(2, SECTORS);
            let limits = Limits { overlay_bytes: MODEL_OVERLAY, held_bytes: 1 << 20 };
            let mut d = disks(&w, 2, SECTORS, limits, journaled);
            let mut base = bases(&w);
            let mut view = base.clone();
            let mut dirty = std::collections::BTreeSet::new();
            let mut pending: Vec<(u64, usize, u64, Vec<u8>)> = Vec::new();
            let mut committed: Option<u64> = None;
            let mut failed_over = false;
            for op in ops {
                let next = committed.map_or(0, |c| c + 1);
                match op {
                    Op::SvmWrite { disk, sector, sectors, fill } => {
                        let r = d.write(disk, sector * SECTOR, &vec![fill; sectors as usize * S]);
                        let range = (sector * SECTOR) as usize..((sector + sectors) * SECTOR) as usize;
                        let new: Vec<_> = (sector..sector + sectors).filter(|s| !dirty.contains(&(disk, *s))).collect();
                        if range.end > DISK {
                            prop_assert!(matches!(r, Err(ColoDiskError::Range { .. })), "{:?}", r);
                        } else if failed_over {
                            prop_assert!(r.is_ok(), "{:?}", r);
                            base[disk][range.clone()].fill(fill);
                            view[disk][range].fill(fill);
                        } else if (dirty.len() + new.len()) as u64 * SECTOR > MODEL_OVERLAY {
                            prop_assert!(matches!(r, Err(ColoDiskError::OverlayFull { .. })), "{:?}", r);
                        } else {
                            prop_assert!(r.is_ok(), "{:?}", r);
                            view[disk][range].fill(fill);
                            dirty.extend(new.into_iter().map(|s| (disk, s)));
                        }
                    }
                    Op::SvmRead { disk, offset, len } => {
                        let mut buf = vec![0; len];
                        let r = d.read(disk, offset, &mut buf);
                        if disk >= 2 {
                            prop_assert!(matches!(r, Err(ColoDiskError::NoSuchDisk { .. })), "{:?}", r);
                        } else if offset as usize + len > DISK {
                            prop_assert!(matches!(r, Err(ColoDiskError::Range { .. })), "{:?}", r);
                        } else {
                            prop_assert!(r.is_ok(), "{:?}", r);
                            prop_assert_eq!(&buf[..], &view[disk][offset as usize..offset as usize + len]);
                        }
                    }
                    Op::Stage { step, disk, offset, data } => {
                        let epoch = pending.last().map_or(next, |p| p.0.max(next)) + step;
                        let r = d.stage(epoch, disk, offset, data.clone());
                        if failed_over {
                            prop_assert!(matches!(r, Err(ColoDiskError::FailedOver)), "{:?}", r);
                        } else if offset as usize + data.len() > DISK {
                            prop_assert!(matches!(r, Err(ColoDiskError::Stage(StageError::Range { .. }))), "{:?}", r);
                        } else {
                            prop_assert!(r.is_ok(), "{:?}", r);
                            pending.push((epoch, disk, offset, data));
                        }
                    }
                    Op::Commit { step } => {
                        let epoch = (next + step).saturating_sub(1);
                        let r = d.commit(epoch, &mut |_, _| {});
                        if failed_over {
                            prop_assert!(matches!(r, Err(ColoDiskError::FailedOver)), "{:?}", r);
                        } else if committed.is_some_and(|c| epoch <= c) {
                            prop_assert!(matches!(r, Err(ColoDiskError::Commit(CommitError::NotAfter { .. }))), "{:?}", r);
                        } else {
                            let (done, rest): (Vec<_>, Vec<_>) = pending.drain(..).partition(|p| p.0 <= epoch);
                            prop_assert_eq!(r.unwrap(), done.len());
                            for (_, disk, offset, data) in done {
                                base[disk][offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                            }
                            pending = rest;
                            committed = Some(epoch);
                            view = base.clone();
                            dirty.clear();
                        }
                    }
                    Op::Failover => {
                        let r = d.failover();
                        if failed_over {
                            prop_assert!(matches!(r, Err(ColoDiskError::FailedOver)), "{:?}", r);
                        } else {
                            prop_assert_eq!(r.unwrap(), Failover {
                                dropped_writes: pending.len(),
                                merged_bytes: dirty.len() as u64 * SECTOR,
                            });
                            pending.clear();
                            dirty.clear();
                            base = view.clone();
                            failed_over = true;
                        }
                    }
                }
                prop_assert_eq!(&World::lock(&w).contents(0), &base[0]);
                prop_assert_eq!(&World::lock(&w).contents(1), &base[1]);
                prop_assert_eq!(d.overlay_bytes(), dirty.len() as u64 * SECTOR);
                prop_assert_eq!(d.held_writes(), pending.len());
                prop_assert_eq!(d.held_bytes(), pending.iter().map(|p| p.3.len() as u64).sum::<u64>());
                prop_assert_eq!(d.committed(), committed);
                prop_assert_eq!(d.failed_over(), failed_over);
            }
        }
    }

    /// One epoch of the crash test: the SVM's sector writes (disk, sector,
    /// fill), then the PVM's writes (disk, offset, data), then its commit.
    type Epoch = (Vec<(usize, u64, u8)>, Vec<(usize, u64, Vec<u8>)>);

    #[derive(Clone, Debug)]
    struct Scenario {
        epochs: Vec<Epoch>,
        /// SVM writes after the last commit, then a failover.
        failover: Option<Vec<(usize, u64, u8)>>,
        /// The commit of this epoch (index) fails with an I/O error on its
        /// first base write, after its journal is durable; the next
        /// epoch's commit (or a retry, for the last) replays that journal
        /// before writing its own.
        flaky: Option<usize>,
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        let svm =
            || proptest::collection::vec((0usize..2, 0u64..SECTORS as u64, any::<u8>()), 0..3);
        let pvm = proptest::collection::vec(
            (
                0usize..2,
                0u64..DISK as u64,
                proptest::collection::vec(any::<u8>(), 1..40),
            ),
            0..4,
        )
        .prop_map(|ws| {
            ws.into_iter()
                .map(|(d, o, mut data)| {
                    data.truncate(DISK - o as usize);
                    (d, o, data)
                })
                .collect::<Vec<_>>()
        });
        (
            proptest::collection::vec((svm(), pvm), 1..4),
            proptest::option::of(svm()),
            proptest::option::of(0usize..4),
        )
            .prop_map(|(epochs, failover, flaky)| Scenario {
                epochs,
                failover,
                flaky,
            })
    }

    /// The bases after each batch (commit or failover), the initial ones
    /// first.
    fn expected(s: &Scenario, initial: Vec<Vec<u8>>) -> Vec<Vec<Vec<u8>>> {
        let mut states = vec![initial];
        for (_, pvm) in &s.epochs {
            let mut base = states.last().cloned().unwrap_or_default();
            for (disk, offset, data) in pvm {
                base[*disk][*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            states.push(base);
        }
        if let Some(svm) = &s.failover {
            let mut base = states.last().cloned().unwrap_or_default();
            for (disk, sector, fill) in svm {
                base[*disk][(*sector * SECTOR) as usize..][..S].fill(*fill);
            }
            states.push(base);
        }
        states
    }

    /// Plays `s` on the disks of `w` until the end or the first error (the
    /// crash); returns how many batches completed.
    fn play(w: &Shared, s: &Scenario) -> usize {
        let limits = Limits {
            overlay_bytes: 1 << 20,
            held_bytes: 1 << 20,
        };
        let mut d = disks(w, 2, SECTORS, limits, true);
        let svm_writes = |d: &mut ColoDisks<Fake>, svm: &[(usize, u64, u8)]| {
            for (disk, sector, fill) in svm {
                d.write(*disk, sector * SECTOR, &[*fill; S]).unwrap();
            }
        };
        let mut done = 0;
        for (i, (svm, pvm)) in s.epochs.iter().enumerate() {
            let epoch = i as u64 + 1;
            svm_writes(&mut d, svm);
            for (disk, offset, data) in pvm {
                d.stage(epoch, *disk, *offset, data.clone()).unwrap();
            }
            let mut carried = false;
            if let (Some(true), Some((disk, ..))) = (s.flaky.map(|f| f == i), pvm.first()) {
                World::lock(w).fail_next_write(*disk);
                let failed = d.commit(epoch, &mut |_, _| {}).is_err();
                if World::lock(w).crashed() {
                    return done;
                }
                assert!(failed, "the injected error");
                // Its journal is durable: a recovery would finish it. The
                // next epoch's commit carries it (the last one is retried).
                done += 1;
                carried = true;
                if i + 1 < s.epochs.len() {
                    continue;
                }
            }
            if d.commit(epoch, &mut |_, _| {}).is_err() {
                return done;
            }
            if !carried {
                done += 1;
            }
        }
        if let Some(svm) = &s.failover {
            svm_writes(&mut d, svm);
            if d.failover().is_err() {
                return done;
            }
            done += 1;
        }
        done
    }

    /// Recovers the journal of `w` (crashing at operation `crash`, if
    /// any); true if it finished.
    fn recover(w: &Shared, crash: Option<usize>) -> bool {
        if let Some(c) = crash {
            World::lock(w).crash_at(c, true);
        }
        let mut bases = [Fake::new(w, 0), Fake::new(w, 1)];
        let [b0, b1] = &mut bases;
        Journal::recover(Box::new(Fake::new(w, 2)), &mut [b0, b1]).is_ok()
    }

    fn bases(w: &Shared) -> Vec<Vec<u8>> {
        let g = World::lock(w);
        vec![g.contents(0), g.contents(1)]
    }

    /// Where `got` differs from each of the two whole states.
    fn mixture(got: &[Vec<u8>], whole: [&Vec<Vec<u8>>; 2]) -> String {
        let first_diff = |want: &Vec<Vec<u8>>| -> Vec<Option<usize>> {
            got.iter()
                .zip(want)
                .map(|(g, w)| g.iter().zip(w).position(|(a, b)| a != b))
                .collect()
        };
        format!(
            "first differing byte per disk: from the earlier state {:?}, from the later {:?}",
            first_diff(whole[0]),
            first_diff(whole[1])
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Commits and a failover through the journal, a crash at every
        /// write, truncate and sync of them, with the unsynced writes all
        /// kept, all lost, some lost, the crashing write torn, and a
        /// second crash at every operation of the recovery: recovery
        /// leaves the bases exactly as after the last completed batch or
        /// the one in flight, never a mixture.
        #[test]
        fn a_crash_anywhere_leaves_a_whole_checkpoint(s in scenario(), mask in any::<u64>()) {
            let clean = world(2, SECTORS);
            let states = expected(&s, bases(&clean));
            prop_assert_eq!(play(&clean, &s), states.len() - 1);
            prop_assert_eq!(&bases(&clean), states.last().unwrap());
            let total = World::lock(&clean).ops();
            for crash in 0..total {
                for (loss, torn) in [(Loss::None, false), (Loss::All, false), (Loss::Some(mask), false), (Loss::Some(!mask), true)] {
                    let w = world(2, SECTORS);
                    World::lock(&w).crash_at(crash, torn);
                    let done = play(&w, &s);
                    prop_assert!(World::lock(&w).crashed());
                    let whole = [&states[done], &states[(done + 1).min(states.len() - 1)]];
                    let after = World::lock(&w).reboot(loss);
                    // A second crash during recovery, at each of its operations.
                    let again = World::lock(&after).reboot(Loss::None);
                    prop_assert!(recover(&again, None));
                    let got = bases(&again);
                    prop_assert!(whole.contains(&&got), "crash at {} of {}, {:?}: done {}, {}", crash, total, loss, done, mixture(&got, whole));
                    let recovery_ops = World::lock(&again).ops();
                    for crash2 in 0..recovery_ops {
                        let w2 = World::lock(&after).reboot(Loss::None);
                        prop_assert!(!recover(&w2, Some(crash2)));
                        let w3 = World::lock(&w2).reboot(loss);
                        prop_assert!(recover(&w3, None));
                        let got2 = bases(&w3);
                        prop_assert!(whole.contains(&&got2), "crash at {} then {} in recovery: {}", crash, crash2, mixture(&got2, whole));
                    }
                }
            }
        }
    }
}
