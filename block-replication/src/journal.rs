//! A write-ahead journal that makes a batch of image writes atomic across
//! a crash: an epoch's commit of forwarded PVM writes, or the overlay merge
//! at failover.
//!
//! The life of a batch ([`Journal::write_through`]):
//! 1. If the previous batch's journal is still there (its apply failed
//!    after the journal was made durable), it is replayed first: the
//!    images may hold a prefix of it, and a complete journal is never
//!    overwritten before its writes are durable in the images.
//! 2. The batch is written to the journal file: a header naming it (the
//!    epoch of a commit, or a failover), one record per write (at most
//!    [`MAX_RECORD`] bytes each, a longer write is split) with its own
//!    CRC, and an end record with the number of records and a CRC over
//!    every byte before it. Then the journal is synced.
//! 3. The writes go to the images, in order; every image touched is synced.
//! 4. The journal is truncated to nothing and synced.
//!
//! A batch without writes, with no failed batch waiting, skips all four.
//! The cost, against writing in place: the data twice and two more
//! fsyncs per batch (`cargo bench -p block-replication --bench commit`).
//!
//! What a crash leaves, found by [`Journal::recover`] at the next open:
//! - before 2's sync completes: a journal without a valid end record, or
//!   failing a CRC (some of its unsynced writes lost). It is discarded:
//!   its batch never happened, and the images were not touched (3 has not
//!   started).
//! - between 2's sync and 4's: a complete journal. It is replayed: writing
//!   the same bytes again gives the same images whatever prefix of them 3
//!   had written (idempotent).
//! - after 4: an empty journal, the images hold the batch.
//!
//! So the images hold either all of a batch or none of it, never a part.
//!
//! Layout (little-endian):
//! ```text
//! header  magic "COLOJRN1" | kind u32 (1 commit, 2 failover) | 0 u32 | epoch u64
//! write   tag 1 u32 | disk u32 | offset u64 | len u32 | crc32(tag..len, data) u32 | data
//! end     tag 2 u32 | records u64 | crc32(every byte before this field) u32
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use crate::secondary::{Image, ReadImage};

/// The journal's first bytes.
pub const MAGIC: [u8; 8] = *b"COLOJRN1";
/// The longest record's data; longer writes take several records.
pub const MAX_RECORD: usize = 1 << 20;
const HEADER: usize = 24;
const RECORD: usize = 24;
const END: usize = 16;
const TAG_WRITE: u32 = 1;
const TAG_END: u32 = 2;
const KIND_COMMIT: u32 = 1;
const KIND_FAILOVER: u32 = 2;
/// Journal bytes gathered before one write to the file.
const CHUNK: usize = 256 << 10;

/// The file a journal lives in: a real file, or a fake in tests.
pub trait JournalFile: ReadImage + Send {
    /// The file's length in bytes.
    fn size(&mut self) -> io::Result<u64>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

impl JournalFile for File {
    fn size(&mut self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// What a batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The forwarded writes of the epochs up to this one.
    Commit(u64),
    /// The SVM's overlay merged into the base at failover.
    Failover,
}

/// Why a journal's batch is not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Defect {
    #[error("no valid header")]
    Header,
    #[error("ends inside a record at byte {0}")]
    Torn(u64),
    #[error("unknown record tag {tag} at byte {at}")]
    Tag { at: u64, tag: u32 },
    #[error("record at byte {at} holds {len} bytes, over the limit")]
    TooLong { at: u64, len: u32 },
    #[error("record at byte {0} fails its CRC")]
    RecordCrc(u64),
    #[error("the end record counts {counted} records, {found} came before it")]
    Count { counted: u64, found: u64 },
    #[error("the end record's CRC does not match the journal")]
    Crc,
}

/// What [`decode`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// No bytes.
    Empty,
    /// A whole batch of `records` records.
    Complete { entry: Entry, records: u64 },
    /// Bytes that are no whole batch.
    Incomplete(Defect),
}

/// What [`Journal::recover`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The journal was empty.
    Clean,
    /// A complete batch was (again) written to the images.
    Replayed { entry: Entry, records: u64 },
    /// An incomplete batch was dropped; it never reached the images.
    Discarded(Defect),
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("opening journal {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the journal")]
    Read(#[source] io::Error),
    #[error("writing the journal")]
    Write(#[source] io::Error),
    #[error("syncing the journal")]
    Sync(#[source] io::Error),
    #[error("truncating the journal")]
    Truncate(#[source] io::Error),
    #[error("a journaled write is for disk {disk}, there are {disks} disks")]
    NoSuchDisk { disk: usize, disks: usize },
    #[error("writing disk {disk} at offset {offset}")]
    WriteImage {
        disk: usize,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("syncing disk {disk}")]
    SyncImage {
        disk: usize,
        #[source]
        source: io::Error,
    },
}

/// What [`decode`] calls for each record: disk, offset, data.
pub type Visit<'v> = dyn FnMut(usize, u64, &[u8]) -> Result<(), JournalError> + 'v;

/// One write of a batch: disk, offset, data.
pub type Write<'a> = (usize, u64, &'a [u8]);

/// The write-ahead journal; see the module docs.
pub struct Journal {
    file: Box<dyn JournalFile>,
    chunk: usize,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` and recovers it into
    /// `images` (see [`Journal::recover`]). Creating it syncs its
    /// directory, so the file survives a crash.
    pub fn open(
        path: &Path,
        images: &mut [&mut dyn Image],
    ) -> Result<(Self, Recovery), JournalError> {
        let open_err = |source| JournalError::Open {
            path: path.display().to_string(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        if !existed {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(open_err)?;
        }
        Self::recover(Box::new(file), images)
    }

    /// Brings `images` to a whole batch: a complete journal in `file` is
    /// replayed into them (and synced), an incomplete one is discarded;
    /// then the journal is emptied. Run it before anything reads the
    /// images.
    pub fn recover(
        file: Box<dyn JournalFile>,
        images: &mut [&mut dyn Image],
    ) -> Result<(Self, Recovery), JournalError> {
        let mut journal = Self { file, chunk: CHUNK };
        let recovery = journal.replay(images)?;
        Ok((journal, recovery))
    }

    /// Gathers `bytes` of journal before each write to the file (tests use
    /// a small one to get many writes).
    pub fn with_chunk(mut self, bytes: usize) -> Self {
        self.chunk = bytes.max(1);
        self
    }

    /// Writes the batch `writes` to `images` through the journal, in
    /// order; see the module docs. `progress(done, total)` is called after
    /// each image write. Returns how many writes it applied. On an error
    /// nothing is claimed: the caller keeps the batch and may retry it, or
    /// a later batch that includes it. But once its journal was durable
    /// the batch will reach the images: the next `write_through` (or
    /// [`Journal::recover`], after a crash) replays it first, even if the
    /// caller has given it up since (a commit whose checkpoint the replica
    /// already loaded is the disk that goes with its memory).
    pub fn write_through<'a, I>(
        &mut self,
        entry: Entry,
        writes: I,
        images: &mut [&mut dyn Image],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, JournalError>
    where
        I: Iterator<Item = Write<'a>> + Clone,
    {
        if let Some((disk, ..)) = writes.clone().find(|w| w.0 >= images.len()) {
            return Err(JournalError::NoSuchDisk {
                disk,
                disks: images.len(),
            });
        }
        // No writes and no failed batch waiting: nothing to journal (an
        // idle guest's epochs cost no sync).
        if writes.clone().next().is_none() && self.file.size().map_err(JournalError::Read)? == 0 {
            return Ok(0);
        }
        // A failed batch's complete journal goes to the images first; an
        // incomplete one (its write or sync failed) is dropped.
        self.replay(images)?;
        self.write_journal(entry, writes.clone())?;
        let total = writes.clone().count();
        let applied = apply(writes, images, &mut |done| progress(done, total))?;
        self.truncate()?;
        Ok(applied)
    }

    fn write_journal<'a>(
        &mut self,
        entry: Entry,
        writes: impl Iterator<Item = Write<'a>>,
    ) -> Result<(), JournalError> {
        let mut w = Writer {
            file: &mut *self.file,
            buf: Vec::with_capacity(self.chunk.min(CHUNK)),
            chunk: self.chunk,
            pos: 0,
            crc: crc32fast::Hasher::new(),
        };
        let (kind, epoch) = match entry {
            Entry::Commit(epoch) => (KIND_COMMIT, epoch),
            Entry::Failover => (KIND_FAILOVER, 0),
        };
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&kind.to_le_bytes());
        header[16..24].copy_from_slice(&epoch.to_le_bytes());
        w.put(&header)?;
        let mut records = 0u64;
        for (disk, offset, data) in writes {
            let disk = u32::try_from(disk).map_err(|_| {
                JournalError::Write(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "disk index over 2^32",
                ))
            })?;
            let mut at = offset;
            for piece in data.chunks(MAX_RECORD) {
                let mut head = [0u8; RECORD];
                head[0..4].copy_from_slice(&TAG_WRITE.to_le_bytes());
                head[4..8].copy_from_slice(&disk.to_le_bytes());
                head[8..16].copy_from_slice(&at.to_le_bytes());
                // At most MAX_RECORD: fits.
                head[16..20].copy_from_slice(&(piece.len() as u32).to_le_bytes());
                let mut crc = crc32fast::Hasher::new();
                crc.update(&head[..20]);
                crc.update(piece);
                head[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
                w.put(&head)?;
                w.put(piece)?;
                at = at.wrapping_add(piece.len() as u64);
                records += 1;
            }
        }
        let mut end = [0u8; END - 4];
        end[0..4].copy_from_slice(&TAG_END.to_le_bytes());
        end[4..12].copy_from_slice(&records.to_le_bytes());
        w.put(&end)?;
        let total = w.crc.clone().finalize();
        w.put(&total.to_le_bytes())?;
        w.flush()?;
        self.file.sync().map_err(JournalError::Sync)
    }

    /// Replays a complete journal into `images`, discards an incomplete
    /// one, and leaves the file empty.
    fn replay(&mut self, images: &mut [&mut dyn Image]) -> Result<Recovery, JournalError> {
        let disks = images.len();
        let recovery = match decode(&mut *self.file, &mut |disk, _, _| check_disk(disk, disks))? {
            Decoded::Empty => return Ok(Recovery::Clean),
            Decoded::Incomplete(defect) => Recovery::Discarded(defect),
            Decoded::Complete { entry, records } => {
                let mut touched = vec![false; disks];
                decode(&mut *self.file, &mut |disk, offset, data| {
                    check_disk(disk, disks)?;
                    images[disk].write_at(offset, data).map_err(|source| {
                        JournalError::WriteImage {
                            disk,
                            offset,
                            source,
                        }
                    })?;
                    touched[disk] = true;
                    Ok(())
                })?;
                sync_touched(images, &touched)?;
                Recovery::Replayed { entry, records }
            }
        };
        self.truncate()?;
        Ok(recovery)
    }

    fn truncate(&mut self) -> Result<(), JournalError> {
        self.file.set_len(0).map_err(JournalError::Truncate)?;
        self.file.sync().map_err(JournalError::Sync)
    }
}

fn check_disk(disk: usize, disks: usize) -> Result<(), JournalError> {
    match disk < disks {
        true => Ok(()),
        false => Err(JournalError::NoSuchDisk { disk, disks }),
    }
}

/// Writes `writes` to `images` in order, then syncs every image touched;
/// `progress(done)` after each write. Without a journal this is the whole
/// commit (a crash leaves a prefix). Disks must be in range.
pub(crate) fn apply<'a>(
    writes: impl Iterator<Item = Write<'a>>,
    images: &mut [&mut dyn Image],
    progress: &mut dyn FnMut(usize),
) -> Result<usize, JournalError> {
    let mut touched = vec![false; images.len()];
    let mut done = 0;
    for (disk, offset, data) in writes {
        check_disk(disk, images.len())?;
        images[disk]
            .write_at(offset, data)
            .map_err(|source| JournalError::WriteImage {
                disk,
                offset,
                source,
            })?;
        touched[disk] = true;
        done += 1;
        progress(done);
    }
    sync_touched(images, &touched)?;
    Ok(done)
}

fn sync_touched(images: &mut [&mut dyn Image], touched: &[bool]) -> Result<(), JournalError> {
    for (disk, image) in images.iter_mut().enumerate() {
        if touched[disk] {
            image
                .sync()
                .map_err(|source| JournalError::SyncImage { disk, source })?;
        }
    }
    Ok(())
}

/// Gathers journal bytes and their running CRC, writes them in chunks.
struct Writer<'f> {
    file: &'f mut dyn JournalFile,
    buf: Vec<u8>,
    chunk: usize,
    pos: u64,
    crc: crc32fast::Hasher,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), JournalError> {
        self.crc.update(bytes);
        let mut bytes = bytes;
        while !bytes.is_empty() {
            let take = (self.chunk - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == self.chunk {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), JournalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_at(self.pos, &self.buf)
            .map_err(JournalError::Write)?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Reads the journal in `file`, calling `visit(disk, offset, data)` for
/// each write record that passes its CRC, in order, until the end record
/// or a defect. So a caller that must act only on a complete batch decodes
/// twice: once to check, once to act. Any bytes are accepted: a record's
/// length is checked against the limit and the file before anything is
/// read or allocated for it.
pub fn decode(file: &mut dyn JournalFile, visit: &mut Visit<'_>) -> Result<Decoded, JournalError> {
    let len = file.size().map_err(JournalError::Read)?;
    if len == 0 {
        return Ok(Decoded::Empty);
    }
    let mut read = |at: u64, buf: &mut [u8]| file.read_at(at, buf).map_err(JournalError::Read);
    let mut crc = crc32fast::Hasher::new();
    let mut header = [0u8; HEADER];
    if len < HEADER as u64 {
        return Ok(Decoded::Incomplete(Defect::Header));
    }
    read(0, &mut header)?;
    crc.update(&header);
    let entry = match (le32(&header[8..]), le32(&header[12..]), le64(&header[16..])) {
        _ if header[..8] != MAGIC => return Ok(Decoded::Incomplete(Defect::Header)),
        (KIND_COMMIT, 0, epoch) => Entry::Commit(epoch),
        (KIND_FAILOVER, 0, 0) => Entry::Failover,
        _ => return Ok(Decoded::Incomplete(Defect::Header)),
    };
    let mut pos = HEADER as u64;
    let mut records = 0u64;
    let mut data = Vec::new();
    loop {
        let at = pos;
        let left = len - pos;
        if left < 4 {
            return Ok(Decoded::Incomplete(Defect::Torn(at)));
        }
        let mut tag = [0u8; 4];
        read(pos, &mut tag)?;
        match le32(&tag) {
            TAG_WRITE => {
                if left < RECORD as u64 {
                    return Ok(Decoded::Incomplete(Defect::Torn(at)));
                }
                let mut head = [0u8; RECORD];
                read(pos, &mut head)?;
                let n = le32(&head[16..]);
                if n as usize > MAX_RECORD {
                    return Ok(Decoded::Incomplete(Defect::TooLong { at, len: n }));
                }
                if left < (RECORD as u64) + u64::from(n) {
                    return Ok(Decoded::Incomplete(Defect::Torn(at)));
                }
                data.resize(n as usize, 0);
                read(pos + RECORD as u64, &mut data)?;
                let mut rc = crc32fast::Hasher::new();
                rc.update(&head[..20]);
                rc.update(&data);
                if rc.finalize() != le32(&head[20..]) {
                    return Ok(Decoded::Incomplete(Defect::RecordCrc(at)));
                }
                crc.update(&head);
                crc.update(&data);
                pos += RECORD as u64 + u64::from(n);
                records += 1;
                // A u32 disk index always fits a usize on the hosts we run.
                let disk = le32(&head[4..]) as usize;
                visit(disk, le64(&head[8..]), &data)?;
            }
            TAG_END => {
                if left < END as u64 {
                    return Ok(Decoded::Incomplete(Defect::Torn(at)));
                }
                let mut end = [0u8; END];
                read(pos, &mut end)?;
                crc.update(&end[..12]);
                let counted = le64(&end[4..]);
                if crc.finalize() != le32(&end[12..]) {
                    return Ok(Decoded::Incomplete(Defect::Crc));
                }
                if counted != records {
                    return Ok(Decoded::Incomplete(Defect::Count {
                        counted,
                        found: records,
                    }));
                }
                return Ok(Decoded::Complete { entry, records });
            }
            tag => return Ok(Decoded::Incomplete(Defect::Tag { at, tag })),
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fake, Shared, World};
    use proptest::prelude::*;

    /// Files 0..disks are images of `size` bytes (byte i holds i), the
    /// last one the (empty) journal.
    fn world(disks: usize, size: usize) -> Shared {
        let image: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let mut files = vec![image; disks];
        files.push(Vec::new());
        World::new(files)
    }

    fn fakes(w: &Shared, disks: usize) -> Vec<Fake> {
        (0..disks).map(|d| Fake::new(w, d)).collect()
    }

    fn refs(images: &mut [Fake]) -> Vec<&mut dyn Image> {
        images.iter_mut().map(|i| i as &mut dyn Image).collect()
    }

    /// A journal on file `disks` of `w`, recovered into the images.
    fn journal(w: &Shared, disks: usize) -> (Journal, Recovery) {
        let mut images = fakes(w, disks);
        Journal::recover(Box::new(Fake::new(w, disks)), &mut refs(&mut images)).unwrap()
    }

    fn encoded(entry: Entry, writes: &[(usize, u64, Vec<u8>)], chunk: usize) -> Vec<u8> {
        let w = World::new(vec![Vec::new()]);
        let mut j = Journal::recover(Box::new(Fake::new(&w, 0)), &mut [])
            .unwrap()
            .0
            .with_chunk(chunk);
        j.write_journal(entry, writes.iter().map(|(d, o, x)| (*d, *o, &x[..])))
            .unwrap();
        let bytes = World::lock(&w).contents(0);
        bytes
    }

    fn decoded(bytes: Vec<u8>) -> (Decoded, Vec<(usize, u64, Vec<u8>)>) {
        let w = World::new(vec![bytes]);
        let mut seen = Vec::new();
        let d = decode(&mut Fake::new(&w, 0), &mut |disk, offset, data| {
            seen.push((disk, offset, data.to_vec()));
            Ok(())
        })
        .unwrap();
        (d, seen)
    }

    #[test]
    fn a_batch_round_trips_and_long_writes_are_split() {
        let long: Vec<u8> = (0..MAX_RECORD + 10).map(|i| (i % 251) as u8).collect();
        let writes = vec![
            (1, 7, vec![1, 2, 3]),
            (0, 100, long.clone()),
            (0, 0, vec![]),
        ];
        let bytes = encoded(Entry::Commit(42), &writes, 1000);
        let (d, seen) = decoded(bytes);
        assert_eq!(
            d,
            Decoded::Complete {
                entry: Entry::Commit(42),
                records: 3
            }
        );
        let split = 100 + MAX_RECORD as u64;
        assert_eq!(
            seen,
            vec![
                (1, 7, vec![1, 2, 3]),
                (0, 100, long[..MAX_RECORD].to_vec()),
                (0, split, long[MAX_RECORD..].to_vec()),
            ]
        );
        let (d, _) = decoded(encoded(Entry::Failover, &[], 7));
        assert_eq!(
            d,
            Decoded::Complete {
                entry: Entry::Failover,
                records: 0
            }
        );
    }

    #[test]
    fn recover_replays_a_complete_journal_and_empties_it() {
        let bytes = encoded(Entry::Commit(3), &[(1, 2, vec![9, 9]), (0, 0, vec![7])], 5);
        let image: Vec<u8> = (0..8).collect();
        let w = World::new(vec![image.clone(), image, bytes]);
        let (_, r) = journal(&w, 2);
        assert_eq!(
            r,
            Recovery::Replayed {
                entry: Entry::Commit(3),
                records: 2
            }
        );
        let g = World::lock(&w);
        assert_eq!(g.contents(0), [7, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(g.contents(1), [0, 1, 9, 9, 4, 5, 6, 7]);
        assert!(g.contents(2).is_empty());
    }

    #[test]
    fn recover_discards_every_torn_journal_untouched() {
        let bytes = encoded(
            Entry::Commit(1),
            &[(0, 0, vec![5; 6]), (0, 4, vec![6; 3])],
            4,
        );
        for cut in 1..bytes.len() {
            let w = World::new(vec![vec![0; 8], bytes[..cut].to_vec()]);
            let (_, r) = journal(&w, 1);
            assert!(matches!(r, Recovery::Discarded(_)), "cut {cut}: {r:?}");
            let g = World::lock(&w);
            assert_eq!(g.contents(0), [0; 8], "cut {cut}");
            assert!(g.contents(1).is_empty());
        }
    }

    #[test]
    fn a_journaled_write_for_no_disk_is_refused() {
        let bytes = encoded(Entry::Commit(1), &[(3, 0, vec![1])], 64);
        let w = World::new(vec![vec![0; 4], bytes]);
        let e =
            Journal::recover(Box::new(Fake::new(&w, 1)), &mut refs(&mut fakes(&w, 1))).unwrap_err();
        assert!(
            matches!(e, JournalError::NoSuchDisk { disk: 3, disks: 1 }),
            "{e:?}"
        );
        assert_eq!(World::lock(&w).contents(0), [0; 4]);
    }

    /// An image write fails after the journal was synced: the journal
    /// stays, and the next batch replays it before writing its own, so a
    /// crash in between can never lose it.
    #[test]
    fn a_failed_batch_is_replayed_before_the_next() {
        let w = world(1, 8);
        let (mut j, _) = journal(&w, 1);
        let mut images = fakes(&w, 1);
        let batch = [(0, 0, &[1u8, 1][..]), (0, 4, &[2u8][..])];
        World::lock(&w).fail_next_write(0);
        let e = j
            .write_through(
                Entry::Commit(1),
                batch.iter().copied(),
                &mut refs(&mut images),
                &mut |_, _| {},
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::WriteImage {
                    disk: 0,
                    offset: 0,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!World::lock(&w).contents(1).is_empty());
        // Replaying by hand shows what is in it.
        let (d, _) = decoded(World::lock(&w).contents(1));
        assert_eq!(
            d,
            Decoded::Complete {
                entry: Entry::Commit(1),
                records: 2
            }
        );
        let mut calls = Vec::new();
        let n = j
            .write_through(
                Entry::Commit(2),
                [(0, 1, &[3u8][..])].into_iter(),
                &mut refs(&mut images),
                &mut |d, t| calls.push((d, t)),
            )
            .unwrap();
        assert_eq!((n, calls), (1, vec![(1, 1)]));
        let g = World::lock(&w);
        assert_eq!(g.contents(0), [1, 3, 2, 3, 2, 5, 6, 7]);
        assert!(g.contents(1).is_empty());
    }

    /// An epoch without writes (most, between checkpoints of an idle
    /// guest) costs no journal write and no sync.
    #[test]
    fn an_empty_batch_touches_nothing() {
        let w = world(1, 4);
        let (mut j, _) = journal(&w, 1);
        let before = World::lock(&w).ops();
        let n = j
            .write_through(
                Entry::Commit(1),
                std::iter::empty(),
                &mut refs(&mut fakes(&w, 1)),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!((n, World::lock(&w).ops()), (0, before));
    }

    #[test]
    fn an_empty_journal_file_is_clean() {
        let w = world(1, 4);
        assert_eq!(journal(&w, 1).1, Recovery::Clean);
    }

    #[test]
    fn open_creates_the_file_beside_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.journal");
        let mut image = tempfile::tempfile().unwrap();
        image.set_len(8).unwrap();
        let (mut j, r) = Journal::open(&path, &mut [&mut image]).unwrap();
        assert_eq!(r, Recovery::Clean);
        j.write_through(
            Entry::Commit(1),
            [(0, 2, &b"ab"[..])].into_iter(),
            &mut [&mut image],
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let mut buf = [0u8; 8];
        image.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"\0\0ab\0\0\0\0");
        let e = Journal::open(&dir.path().join("no/such/dir/j"), &mut []).unwrap_err();
        assert!(matches!(e, JournalError::Open { .. }), "{e:?}");
    }

    fn writes() -> impl Strategy<Value = Vec<(usize, u64, Vec<u8>)>> {
        proptest::collection::vec(
            (
                0usize..3,
                0u64..1 << 40,
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            0..6,
        )
    }

    proptest! {
        /// Any bytes, raw or behind a valid header: no panic, and nothing
        /// but a complete batch counts.
        #[test]
        fn decode_takes_any_bytes(
            header in 0u8..3,
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut all = match header {
                0 => Vec::new(),
                1 => MAGIC.to_vec(),
                _ => encoded(Entry::Commit(0), &[], 64)[..HEADER].to_vec(),
            };
            all.extend_from_slice(&bytes);
            let (d, _) = decoded(all);
            prop_assert!(!matches!(d, Decoded::Complete { .. }), "{:?}", d);
        }

        /// A journal that starts right and goes wrong anywhere: a cut, a
        /// changed byte, or garbage in place of its tail.
        #[test]
        fn decode_rejects_damaged_journals(
            writes in writes(),
            epoch in any::<u64>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
            damage in 0u8..3,
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = encoded(Entry::Commit(epoch), &writes, 64);
            let (d, seen) = decoded(bytes.clone());
            // An empty write takes no record.
            let writes: Vec<_> = writes.into_iter().filter(|w| !w.2.is_empty()).collect();
            prop_assert_eq!(d, Decoded::Complete { entry: Entry::Commit(epoch), records: writes.len() as u64 });
            prop_assert_eq!(&seen, &writes);
            let i = at.index(bytes.len());
            match damage {
                0 => bytes.truncate(i),
                1 => bytes[i] ^= flip,
                _ => {
                    // Garbage from i on, its first byte a different one.
                    let mut tail = tail;
                    tail.insert(0, bytes[i] ^ flip);
                    bytes.truncate(i);
                    bytes.extend_from_slice(&tail);
                }
            }
            let (d, _) = decoded(bytes);
            prop_assert!(!matches!(d, Decoded::Complete { .. }), "{:?}", d);
        }
    }
}
