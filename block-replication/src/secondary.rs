//! The secondary's forwarded writes, held per epoch until the checkpoint
//! of their epoch commits.
//!
//! Writes arrive tagged with the primary's epoch, in the order the primary
//! made them, epochs never decreasing. [`EpochBuffer::commit`]`(N)` runs
//! after checkpoint N is complete and loaded, before its ack: it applies
//! every held write of epochs <= N to the images in arrival order and syncs
//! them; only then does N count as committed.
//!
//! What a failure or crash leaves:
//! - An I/O error during a commit: the writes stay held, nothing is
//!   committed. The image may hold a prefix of them; committing again
//!   replays them all in order, which gives the same result as one clean
//!   pass (a later write of the same bytes wins either way).
//! - A crash (the process dies) during a commit, without a journal: the
//!   image holds epoch N-1's state plus a prefix of N's writes, i.e. no
//!   checkpoint at all. Nothing on disk says otherwise: the secondary
//!   keeps no durable record of what it committed, the ack of N was not
//!   sent, so the primary still holds N's output. After a restart the
//!   secondary claims nothing and is synced again from block hashes like a
//!   new one.
//! - The same crash with a journal ([`EpochBuffer::with_journal`]): the
//!   commit's writes reach the images only after the journal holding them
//!   all is durable, so [`crate::journal::Journal::recover`] at the next
//!   open leaves the images at N-1 (an incomplete journal, discarded) or N
//!   (a complete one, replayed), never between.
//! - Failover: [`EpochBuffer::discard_uncommitted`] drops the writes of
//!   epochs whose checkpoint never committed; the replica resumes on the
//!   image of the last commit, which matches its memory.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::journal::{self, Entry, Journal, JournalError};

/// Where committed writes go: an image file, or a fake in tests.
pub trait Image {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the writes so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

impl Image for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// An image that can also be read: the base under the COLO overlay, and
/// the journal.
pub trait ReadImage: Image {
    /// Fills `buf` from `offset`; short of bytes is an error.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ReadImage for File {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("write for epoch {epoch}, but epoch {committed} is already committed")]
    Committed { epoch: u64, committed: u64 },
    #[error("write for epoch {epoch} after one for epoch {last}")]
    OutOfOrder { epoch: u64, last: u64 },
    #[error("write of {len} bytes over the bound: {held} of {max} bytes held")]
    Full { len: u64, held: u64, max: u64 },
    #[error("write of {len} bytes at offset {offset} ends beyond disk {disk}'s {capacity} bytes")]
    Range {
        disk: usize,
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("write for disk {disk}, there are {disks} disks")]
    NoSuchDisk { disk: usize, disks: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("committing epoch {epoch}, but epoch {committed} is already committed")]
    NotAfter { epoch: u64, committed: u64 },
    #[error("a held write is for disk {disk}, there are {disks} disks")]
    NoSuchDisk { disk: usize, disks: usize },
    #[error("writing disk {disk} at offset {offset}")]
    Write {
        disk: usize,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("syncing disk {disk}")]
    Sync {
        disk: usize,
        #[source]
        source: io::Error,
    },
    #[error("committing through the journal")]
    Journal(#[source] JournalError),
}

impl From<JournalError> for CommitError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::WriteImage {
                disk,
                offset,
                source,
            } => Self::Write {
                disk,
                offset,
                source,
            },
            JournalError::SyncImage { disk, source } => Self::Sync { disk, source },
            JournalError::NoSuchDisk { disk, disks } => Self::NoSuchDisk { disk, disks },
            e => Self::Journal(e),
        }
    }
}

#[derive(Debug)]
struct Held {
    epoch: u64,
    disk: usize,
    offset: u64,
    data: Vec<u8>,
}

/// The secondary's forwarded writes, held per epoch; see the module docs.
#[derive(Debug)]
pub struct EpochBuffer {
    max_bytes: u64,
    /// Capacity of each disk, when known: writes are checked against them.
    capacities: Option<Vec<u64>>,
    /// In arrival order, epochs non-decreasing.
    held: VecDeque<Held>,
    held_bytes: u64,
    committed: Option<u64>,
    journal: Option<Journal>,
}

impl EpochBuffer {
    /// An empty buffer that holds at most `max_bytes` of write data.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            capacities: None,
            held: VecDeque::new(),
            held_bytes: 0,
            committed: None,
            journal: None,
        }
    }

    /// Commits through `journal` (recovered by the caller before anything
    /// read the images): a crash during a commit leaves the images at the
    /// epoch before or at this one, never between; see [`crate::journal`].
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// The journal, for a batch that is not a commit (the failover merge).
    pub(crate) fn journal(&mut self) -> Option<&mut Journal> {
        self.journal.as_mut()
    }

    /// Like [`EpochBuffer::new`], and refuses at [`EpochBuffer::stage`] a
    /// write for a disk not in `capacities` (bytes, per disk) or beyond its
    /// end: the peer's mistake is caught when it arrives, not at the commit.
    pub fn with_capacities(max_bytes: u64, capacities: Vec<u64>) -> Self {
        Self {
            capacities: Some(capacities),
            ..Self::new(max_bytes)
        }
    }

    /// Holds a write of `data` at `offset` of disk `disk` until `epoch`
    /// commits. Refuses a write for an epoch already committed, for an
    /// epoch before the last write's, one beyond its disk's end (or 2^64,
    /// when the capacities are not known), and one that would take the held
    /// bytes over the bound.
    pub fn stage(
        &mut self,
        epoch: u64,
        disk: usize,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), StageError> {
        let len = data.len() as u64;
        if let Some(committed) = self.committed.filter(|&c| epoch <= c) {
            return Err(StageError::Committed { epoch, committed });
        }
        if let Some(last) = self.held.back().map(|h| h.epoch).filter(|&l| epoch < l) {
            return Err(StageError::OutOfOrder { epoch, last });
        }
        let capacity = match &self.capacities {
            None => u64::MAX,
            Some(caps) => *caps.get(disk).ok_or(StageError::NoSuchDisk {
                disk,
                disks: caps.len(),
            })?,
        };
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(StageError::Range {
                disk,
                offset,
                len,
                capacity,
            });
        }
        if self.held_bytes.saturating_add(len) > self.max_bytes {
            return Err(StageError::Full {
                len,
                held: self.held_bytes,
                max: self.max_bytes,
            });
        }
        self.held_bytes += len;
        self.held.push_back(Held {
            epoch,
            disk,
            offset,
            data,
        });
        Ok(())
    }

    /// Applies every held write of epochs <= `epoch` to `images[disk]`, in
    /// arrival order, then syncs each image it touched; `progress(done,
    /// total)` is called after each write. Returns how many writes it
    /// applied. `epoch` must be after the last committed one. A disk index
    /// out of range is an error before anything is written. On an error
    /// the writes stay held and `epoch` is not committed.
    pub fn commit(
        &mut self,
        epoch: u64,
        images: &mut [&mut dyn Image],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, CommitError> {
        if let Some(committed) = self.committed.filter(|&c| epoch <= c) {
            return Err(CommitError::NotAfter { epoch, committed });
        }
        let total = self.held.iter().take_while(|h| h.epoch <= epoch).count();
        let writes = self.held.range(..total);
        if let Some(h) = writes.clone().find(|h| h.disk >= images.len()) {
            return Err(CommitError::NoSuchDisk {
                disk: h.disk,
                disks: images.len(),
            });
        }
        let writes = writes.map(|h| (h.disk, h.offset, &h.data[..]));
        match &mut self.journal {
            Some(j) => j.write_through(Entry::Commit(epoch), writes, images, progress)?,
            None => journal::apply(writes, images, &mut |done| progress(done, total))?,
        };
        let applied: u64 = self.held.drain(..total).map(|h| h.data.len() as u64).sum();
        self.held_bytes -= applied;
        self.committed = Some(epoch);
        Ok(total)
    }

    /// Drops the held writes of uncommitted epochs (all held ones); returns
    /// how many.
    pub fn discard_uncommitted(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        self.held_bytes = 0;
        n
    }

    /// The last committed epoch.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn held_writes(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An image in memory of a fixed size; counts syncs, can fail.
    #[derive(Clone, Debug, Default)]
    struct MemImage {
        data: Vec<u8>,
        syncs: usize,
        /// Writes that succeed before one fails.
        fail_after: Option<usize>,
        fail_sync: bool,
    }

    impl MemImage {
        fn new(size: usize) -> Self {
            Self {
                data: vec![0; size],
                ..Self::default()
            }
        }
    }

    impl Image for MemImage {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            if let Some(n) = &mut self.fail_after {
                if *n == 0 {
                    return Err(io::Error::other("injected write error"));
                }
                *n -= 1;
            }
            let at = offset as usize;
            self.data
                .get_mut(at..at + data.len())
                .ok_or_else(|| io::Error::other("beyond the image"))?
                .copy_from_slice(data);
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            if self.fail_sync {
                return Err(io::Error::other("injected sync error"));
            }
            self.syncs += 1;
            Ok(())
        }
    }

    fn commit(
        b: &mut EpochBuffer,
        epoch: u64,
        images: &mut [MemImage],
    ) -> Result<usize, CommitError> {
        let mut refs: Vec<&mut dyn Image> =
            images.iter_mut().map(|i| i as &mut dyn Image).collect();
        b.commit(epoch, &mut refs, &mut |_, _| {})
    }

    #[test]
    fn commits_writes_of_epochs_up_to_n_in_order() {
        let mut b = EpochBuffer::new(1000);
        let mut imgs = vec![MemImage::new(16), MemImage::new(16)];
        b.stage(1, 0, 0, vec![1; 4]).unwrap();
        b.stage(1, 1, 2, vec![2; 2]).unwrap();
        b.stage(2, 0, 2, vec![3; 4]).unwrap();
        b.stage(3, 0, 0, vec![4; 1]).unwrap();
        assert_eq!(b.held_bytes(), 11);
        let mut calls = Vec::new();
        {
            let mut refs: Vec<&mut dyn Image> =
                imgs.iter_mut().map(|i| i as &mut dyn Image).collect();
            let n = b
                .commit(2, &mut refs, &mut |d, t| calls.push((d, t)))
                .unwrap();
            assert_eq!(n, 3);
        }
        assert_eq!(calls, vec![(1, 3), (2, 3), (3, 3)]);
        assert_eq!(imgs[0].data[..8], [1, 1, 3, 3, 3, 3, 0, 0]);
        assert_eq!(imgs[1].data[..4], [0, 0, 2, 2]);
        assert_eq!((imgs[0].syncs, imgs[1].syncs), (1, 1));
        assert_eq!(b.committed(), Some(2));
        assert_eq!((b.held_bytes(), b.held_writes()), (1, 1));
        // Epoch 3 touches only disk 0: disk 1 is not synced again.
        assert_eq!(commit(&mut b, 3, &mut imgs).unwrap(), 1);
        assert_eq!((imgs[0].syncs, imgs[1].syncs), (2, 1));
        assert_eq!(imgs[0].data[0], 4);
        // An epoch without writes commits too.
        assert_eq!(commit(&mut b, 4, &mut imgs).unwrap(), 0);
        assert_eq!(b.committed(), Some(4));
    }

    #[test]
    fn refuses_bad_writes() {
        let mut b = EpochBuffer::new(10);
        b.stage(5, 0, 0, vec![0; 6]).unwrap();
        let e = b.stage(4, 0, 0, vec![0]).unwrap_err();
        assert!(
            matches!(e, StageError::OutOfOrder { epoch: 4, last: 5 }),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "write for epoch 4 after one for epoch 5");
        let e = b.stage(5, 0, 0, vec![0; 5]).unwrap_err();
        assert!(
            matches!(
                e,
                StageError::Full {
                    len: 5,
                    held: 6,
                    max: 10
                }
            ),
            "{e:?}"
        );
        let e = b.stage(5, 0, u64::MAX, vec![0; 2]).unwrap_err();
        assert!(matches!(e, StageError::Range { .. }), "{e:?}");
        assert_eq!(b.held_bytes(), 6);
        commit(&mut b, 5, &mut [MemImage::new(8)]).unwrap();
        let e = b.stage(5, 0, 0, vec![0]).unwrap_err();
        assert!(
            matches!(
                e,
                StageError::Committed {
                    epoch: 5,
                    committed: 5
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "write for epoch 5, but epoch 5 is already committed"
        );
        let e = commit(&mut b, 5, &mut [MemImage::new(8)]).unwrap_err();
        assert!(
            matches!(
                e,
                CommitError::NotAfter {
                    epoch: 5,
                    committed: 5
                }
            ),
            "{e:?}"
        );
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn refuses_writes_beyond_known_disks() {
        let mut b = EpochBuffer::with_capacities(100, vec![8, 4]);
        b.stage(1, 0, 4, vec![0; 4]).unwrap();
        b.stage(1, 1, 0, vec![0; 4]).unwrap();
        let e = b.stage(1, 1, 1, vec![0; 4]).unwrap_err();
        assert!(
            matches!(
                e,
                StageError::Range {
                    disk: 1,
                    offset: 1,
                    len: 4,
                    capacity: 4
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "write of 4 bytes at offset 1 ends beyond disk 1's 4 bytes"
        );
        let e = b.stage(1, 2, 0, vec![0]).unwrap_err();
        assert!(
            matches!(e, StageError::NoSuchDisk { disk: 2, disks: 2 }),
            "{e:?}"
        );
        assert_eq!((b.held_writes(), b.held_bytes()), (2, 8));
    }

    #[test]
    fn a_missing_disk_fails_before_any_write() {
        let mut b = EpochBuffer::new(100);
        b.stage(1, 0, 0, vec![1]).unwrap();
        b.stage(1, 2, 0, vec![1]).unwrap();
        let mut imgs = vec![MemImage::new(4), MemImage::new(4)];
        let e = commit(&mut b, 1, &mut imgs).unwrap_err();
        assert!(
            matches!(e, CommitError::NoSuchDisk { disk: 2, disks: 2 }),
            "{e:?}"
        );
        assert_eq!(imgs[0].data, [0; 4]);
        assert_eq!((b.committed(), b.held_writes()), (None, 2));
    }

    #[test]
    fn an_io_error_keeps_the_writes_held() {
        let mut b = EpochBuffer::new(100);
        b.stage(1, 0, 0, vec![1, 1]).unwrap();
        b.stage(1, 0, 1, vec![2, 2]).unwrap();
        let mut imgs = vec![MemImage::new(4)];
        imgs[0].fail_after = Some(1);
        let e = commit(&mut b, 1, &mut imgs).unwrap_err();
        assert!(
            matches!(
                e,
                CommitError::Write {
                    disk: 0,
                    offset: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            (b.committed(), b.held_writes(), b.held_bytes()),
            (None, 2, 4)
        );
        imgs[0].fail_after = None;
        imgs[0].fail_sync = true;
        let e = commit(&mut b, 1, &mut imgs).unwrap_err();
        assert!(matches!(e, CommitError::Sync { disk: 0, .. }), "{e:?}");
        assert_eq!((b.committed(), b.held_writes()), (None, 2));
        imgs[0].fail_sync = false;
        assert_eq!(commit(&mut b, 1, &mut imgs).unwrap(), 2);
        assert_eq!(imgs[0].data, [1, 2, 2, 0]);
        assert_eq!(b.committed(), Some(1));
    }

    /// The vmm injects a crash in `progress`; unwinding out of it (the
    /// nearest a unit test gets to dying there) leaves the epoch claimed by
    /// nobody: not committed, its writes still held.
    #[test]
    fn a_crash_mid_commit_claims_nothing() {
        let mut b = EpochBuffer::new(100);
        b.stage(1, 0, 0, vec![1]).unwrap();
        b.stage(1, 0, 1, vec![2]).unwrap();
        let mut img = MemImage::new(4);
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut refs: [&mut dyn Image; 1] = [&mut img];
            b.commit(1, &mut refs, &mut |done, _| {
                if done == 1 {
                    panic!("injected crash");
                }
            })
        }));
        assert!(crashed.is_err());
        assert_eq!((b.committed(), b.held_writes()), (None, 2));
        assert_eq!(img.syncs, 0);
    }

    /// The vmm's crash point (half of the writes applied) with a journal
    /// on real files: recovery at the next open finishes the epoch, where
    /// without one the image would hold half of it.
    #[test]
    fn a_crash_mid_commit_through_a_journal_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut image = tempfile::tempfile().unwrap();
        image.set_len(4).unwrap();
        let (journal, _) = Journal::open(&path, &mut [&mut image]).unwrap();
        let mut b = EpochBuffer::new(100).with_journal(journal);
        for (offset, byte) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
            b.stage(1, 0, offset, vec![byte]).unwrap();
        }
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut refs: [&mut dyn Image; 1] = [&mut image];
            b.commit(1, &mut refs, &mut |done, total| {
                if done == total.div_ceil(2) {
                    panic!("injected crash");
                }
            })
        }));
        assert!(crashed.is_err());
        let mut buf = [0u8; 4];
        image.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1, 2, 0, 0], "half applied when it died");
        let (_, r) = Journal::open(&path, &mut [&mut image]).unwrap();
        assert_eq!(
            r,
            journal::Recovery::Replayed {
                entry: Entry::Commit(1),
                records: 4
            }
        );
        image.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn discard_drops_uncommitted_writes() {
        let mut b = EpochBuffer::new(100);
        let mut imgs = vec![MemImage::new(4)];
        b.stage(1, 0, 0, vec![1]).unwrap();
        commit(&mut b, 1, &mut imgs).unwrap();
        b.stage(2, 0, 1, vec![2]).unwrap();
        b.stage(3, 0, 2, vec![3]).unwrap();
        assert_eq!(b.discard_uncommitted(), 2);
        assert_eq!((b.held_writes(), b.held_bytes()), (0, 0));
        assert_eq!(commit(&mut b, 3, &mut imgs).unwrap(), 0);
        assert_eq!(imgs[0].data, [1, 0, 0, 0]);
    }

    #[test]
    fn image_on_a_file() {
        let mut files = [tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap()];
        files[1].set_len(4).unwrap();
        let mut b = EpochBuffer::new(100);
        b.stage(1, 0, 3, b"abc".to_vec()).unwrap();
        b.stage(1, 1, 1, b"xy".to_vec()).unwrap();
        b.stage(1, 0, 0, b"012".to_vec()).unwrap();
        let [f0, f1] = &mut files;
        let mut refs: [&mut dyn Image; 2] = [f0, f1];
        assert_eq!(b.commit(1, &mut refs, &mut |_, _| {}).unwrap(), 3);
        let mut buf = [0u8; 6];
        files[0].read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"012abc");
        let mut buf = [0u8; 4];
        files[1].read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0xy\0");
    }

    const DISK: usize = 64;

    #[derive(Clone, Debug)]
    enum Op {
        /// A write to the newest epoch + `step` (0: the same epoch).
        Stage {
            step: u64,
            disk: usize,
            offset: usize,
            data: Vec<u8>,
        },
        /// A write for an epoch at or before the last committed one.
        StageCommitted {
            back: u64,
        },
        /// Commit the committed epoch + `step` (0: refused).
        Commit {
            step: u64,
        },
        /// The same, but the first try fails after `ok` writes (or at the
        /// sync), and is retried.
        FlakyCommit {
            step: u64,
            ok: usize,
        },
        Discard,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u64..3, 0usize..2, 0usize..DISK, proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(step, disk, offset, mut data)| {
                    data.truncate(DISK - offset);
                    Op::Stage { step, disk, offset, data }
                }),
            1 => (0u64..3).prop_map(|back| Op::StageCommitted { back }),
            3 => (0u64..4).prop_map(|step| Op::Commit { step }),
            1 => (1u64..4, 0usize..6).prop_map(|(step, ok)| Op::FlakyCommit { step, ok }),
            1 => Just(Op::Discard),
        ]
    }

    proptest! {
        /// Against a model: after commit(N) the images equal the model
        /// disks with exactly the writes of epochs <= N applied in arrival
        /// order; refused operations change nothing; discard drops the rest.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(op(), 0..80)) {
            let mut b = EpochBuffer::with_capacities(256, vec![DISK as u64; 2]);
            let mut imgs = vec![MemImage::new(DISK), MemImage::new(DISK)];
            let mut model = vec![vec![0u8; DISK]; 2];
            let mut pending: Vec<(u64, usize, usize, Vec<u8>)> = Vec::new();
            let mut committed: Option<u64> = None;
            for op in ops {
                let next = committed.map_or(0, |c| c + 1);
                match op {
                    Op::Stage { step, disk, offset, data } => {
                        let epoch = pending.last().map_or(next, |p| p.0.max(next)) + step;
                        let held: usize = pending.iter().map(|p| p.3.len()).sum();
                        let r = b.stage(epoch, disk, offset as u64, data.clone());
                        if held + data.len() > 256 {
                            prop_assert!(matches!(r, Err(StageError::Full { .. })), "{:?}", r);
                        } else {
                            prop_assert!(r.is_ok(), "{:?}", r);
                            pending.push((epoch, disk, offset, data));
                        }
                    }
                    Op::StageCommitted { back } => {
                        if let Some(c) = committed {
                            let r = b.stage(c.saturating_sub(back), 0, 0, vec![1]);
                            prop_assert!(matches!(r, Err(StageError::Committed { .. })), "{:?}", r);
                        }
                    }
                    Op::Commit { step } | Op::FlakyCommit { step, .. } => {
                        let epoch = (next + step).saturating_sub(1);
                        let refused = committed.is_some_and(|c| epoch <= c);
                        let n = pending.iter().filter(|p| p.0 <= epoch).count();
                        if let (Op::FlakyCommit { ok, .. }, false, true) = (&op, refused, n > 0) {
                            // Fail the write after the first `ok`, or the sync when
                            // there are no more writes.
                            let due: Vec<_> = pending.iter().filter(|p| p.0 <= epoch).collect();
                            if let Some(w) = due.get(*ok) {
                                let before = due[..*ok].iter().filter(|p| p.1 == w.1).count();
                                imgs[w.1].fail_after = Some(before);
                            } else {
                                imgs.iter_mut().for_each(|i| i.fail_sync = true);
                            }
                            let before = (b.held_writes(), b.held_bytes());
                            let r = commit(&mut b, epoch, &mut imgs);
                            prop_assert!(r.is_err());
                            prop_assert_eq!(b.committed(), committed);
                            prop_assert_eq!((b.held_writes(), b.held_bytes()), before);
                            for i in imgs.iter_mut() {
                                i.fail_after = None;
                                i.fail_sync = false;
                            }
                        }
                        let r = commit(&mut b, epoch, &mut imgs);
                        if refused {
                            prop_assert!(matches!(r, Err(CommitError::NotAfter { .. })), "{:?}", r);
                            continue;
                        }
                        let n = r.unwrap();
                        let (done, rest): (Vec<_>, Vec<_>) = pending.drain(..).partition(|p| p.0 <= epoch);
                        prop_assert_eq!(n, done.len());
                        for (_, disk, offset, data) in done {
                            model[disk][offset..offset + data.len()].copy_from_slice(&data);
                        }
                        pending = rest;
                        committed = Some(epoch);
                        prop_assert_eq!(&imgs[0].data, &model[0]);
                        prop_assert_eq!(&imgs[1].data, &model[1]);
                    }
                    Op::Discard => {
                        prop_assert_eq!(b.discard_uncommitted(), pending.len());
                        pending.clear();
                    }
                }
                prop_assert_eq!(b.committed(), committed);
                prop_assert_eq!(b.held_writes(), pending.len());
                prop_assert_eq!(b.held_bytes(), pending.iter().map(|p| p.3.len() as u64).sum::<u64>());
            }
        }
    }
}
