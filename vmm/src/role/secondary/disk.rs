//! The secondary's disks in COLO mode: one [`ColoDisks`] over the image
//! files, shared by the SVM's virtio-blk backends (reads see the SVM's
//! overlay over the image, writes go to the overlay) and the engine's
//! [`colo::vm::ReplicaDisks`] (the initial sync on the images, the PVM's
//! writes staged per epoch, committed at each checkpoint; failover merges
//! the overlay). After failover the SVM's reads and writes go to the
//! images.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use block_replication::journal::Journal;
use block_replication::overlay::{ColoDiskError, ColoDisks, Limits};
use block_replication::secondary::Image;
use colo::control::Cause;
use colo::vm::{CheckpointAsk, DiskWrite};
use devices::ratelimit::LogLimit;
use devices::virtio::BlockBackend;

/// The bound of the SVM's disk overlay, all disks together: the SVM's
/// writes of one epoch, held in memory. Above half of it the secondary
/// asks for a checkpoint (which empties it); at it the SVM's write fails
/// with an I/O error.
pub const OVERLAY_BYTES_MAX: u64 = 256 << 20;

/// The journal of disk `image`'s commits and failover merge.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".colo-journal");
    PathBuf::from(name)
}

/// What the SVM's disks and the engine share.
pub struct Shared {
    pub disks: Mutex<ColoDisks<File>>,
    /// Where to ask for a checkpoint (set by `colo_net`).
    pub ask: OnceLock<CheckpointAsk>,
    /// A checkpoint was asked for in this epoch.
    asked: AtomicBool,
    /// The overlay's bound.
    overlay_max: u64,
}

impl Shared {
    /// The disks `files` (image, capacity) with the journal next to the
    /// first image (recovered now), bounded as documented.
    pub fn open(
        files: Vec<(File, u64)>,
        journal: &Path,
        held_bytes: u64,
    ) -> Result<Self, block_replication::journal::JournalError> {
        let mut images: Vec<File> = files
            .iter()
            .map(|(f, _)| f.try_clone())
            .collect::<io::Result<_>>()
            .map_err(|source| block_replication::journal::JournalError::Open {
                path: journal.display().to_string(),
                source,
            })?;
        let mut refs: Vec<&mut dyn Image> =
            images.iter_mut().map(|f| f as &mut dyn Image).collect();
        let (journal, recovery) = Journal::open(journal, &mut refs)?;
        tracing::info!(?recovery, "opened the COLO disk journal");
        let limits = Limits {
            overlay_bytes: OVERLAY_BYTES_MAX,
            held_bytes,
        };
        Ok(Self::new(files, Some(journal), limits))
    }

    /// The disks `files` within `limits`.
    pub fn new(files: Vec<(File, u64)>, journal: Option<Journal>, limits: Limits) -> Self {
        Self {
            disks: Mutex::new(ColoDisks::new(files, limits, journal)),
            ask: OnceLock::new(),
            asked: AtomicBool::new(false),
            overlay_max: limits.overlay_bytes,
        }
    }

    /// After an SVM write: asks for a checkpoint once per epoch when the
    /// overlay is above half its bound.
    fn check_overlay(&self, overlay_bytes: u64) {
        if overlay_bytes > self.overlay_max / 2 && !self.asked.swap(true, Ordering::Relaxed) {
            if let Some(ask) = self.ask.get() {
                ask(Cause::HeldBytes);
            }
        }
    }
}

static WRITE_FAILED: LogLimit = LogLimit::new();

/// The SVM's disk `disk`.
pub struct SvmDisk {
    pub shared: Arc<Shared>,
    pub disk: usize,
    pub capacity: u64,
    pub read_only: bool,
    pub id: Vec<u8>,
}

fn io_err(e: ColoDiskError) -> io::Error {
    io::Error::other(e)
}

impl BlockBackend for SvmDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        devices::lock(&self.shared.disks)
            .read(self.disk, offset, buf)
            .map_err(io_err)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut disks = devices::lock(&self.shared.disks);
        match disks.write(self.disk, offset, buf) {
            Ok(()) => {
                let bytes = disks.overlay_bytes();
                drop(disks);
                self.shared.check_overlay(bytes);
                Ok(())
            }
            Err(e) => {
                if let Some(suppressed) = WRITE_FAILED.allow() {
                    tracing::warn!(
                        suppressed,
                        disk = self.disk,
                        "an SVM disk write failed: {e}"
                    );
                }
                Err(io_err(e))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        devices::lock(&self.shared.disks).flush().map_err(io_err)
    }

    fn id(&self) -> &[u8] {
        &self.id
    }
}

/// The engine's side of the COLO disks.
pub struct ReplicaColoDisks {
    pub shared: Arc<Shared>,
    /// The images for the initial sync (writes straight to them).
    pub images: super::Images,
}

impl colo::vm::ReplicaDisks for ReplicaColoDisks {
    fn capacities(&self) -> Vec<u64> {
        self.images.capacities()
    }

    fn hashes(&mut self, disk: usize, block: u32) -> io::Result<Vec<u64>> {
        self.images.hashes(disk, block)
    }

    fn write_direct(&mut self, disk: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        self.images.write_direct(disk, offset, data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.images.flush()
    }

    fn stage(&mut self, write: DiskWrite) -> io::Result<()> {
        devices::lock(&self.shared.disks)
            .stage(
                write.epoch,
                usize::from(write.disk),
                write.offset,
                write.data,
            )
            .map_err(io_err)
    }

    fn commit(&mut self, epoch: u64) -> io::Result<()> {
        devices::lock(&self.shared.disks)
            .commit(epoch, &mut super::commit_progress)
            .map_err(io_err)?;
        self.shared.asked.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn take_over(&mut self) -> io::Result<()> {
        let done = devices::lock(&self.shared.disks)
            .failover()
            .map_err(io_err)?;
        tracing::info!(
            merged_bytes = done.merged_bytes,
            dropped_writes = done.dropped_writes,
            "the SVM's disks are the truth: overlay merged, uncommitted writes dropped"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo::vm::ReplicaDisks;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicUsize;

    const SIZE: u64 = 64 << 10;

    fn image(fill: u8) -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file()
            .write_all_at(&vec![fill; SIZE as usize], 0)
            .unwrap();
        let file = f.reopen().unwrap();
        (f, file)
    }

    fn on_image(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    /// The SVM's disk and the engine's, over one image with its journal,
    /// the overlay bounded at 4 KiB; and how often a checkpoint was asked.
    fn colo_disk(path: &Path, file: File) -> (SvmDisk, ReplicaColoDisks, Arc<AtomicUsize>) {
        let files = vec![(file.try_clone().unwrap(), SIZE)];
        let mut images = [file.try_clone().unwrap()];
        let mut refs: Vec<&mut dyn Image> =
            images.iter_mut().map(|f| f as &mut dyn Image).collect();
        let (journal, _) = Journal::open(&journal_path(path), &mut refs).unwrap();
        let limits = Limits {
            overlay_bytes: 4096,
            held_bytes: 1 << 20,
        };
        let shared = Arc::new(Shared::new(files, Some(journal), limits));
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        let _ = shared.ask.set(Arc::new(move |cause| {
            assert_eq!(cause, Cause::HeldBytes);
            count.fetch_add(1, Ordering::Relaxed);
        }));
        let svm = SvmDisk {
            shared: shared.clone(),
            disk: 0,
            capacity: SIZE,
            read_only: false,
            id: b"blk0".to_vec(),
        };
        let replica = ReplicaColoDisks {
            shared,
            images: super::super::Images(vec![(file, SIZE)]),
        };
        (svm, replica, asked)
    }

    #[test]
    fn svm_writes_stay_in_the_overlay_until_failover_merges_them() {
        let (tmp, file) = image(0xaa);
        let (mut svm, mut engine, asked) = colo_disk(tmp.path(), file);
        assert!(journal_path(tmp.path()).exists());
        // The SVM's write: its reads see it, the image does not.
        svm.write_at(512, &[1; 1024]).unwrap();
        let mut buf = vec![0; 2048];
        svm.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[0xaa; 512][..]);
        assert_eq!(&buf[512..1536], &[1; 1024][..]);
        assert_eq!(&buf[1536..], &[0xaa; 512][..]);
        assert_eq!(on_image(tmp.path(), 512, 1024), vec![0xaa; 1024]);
        // Above half the bound: one request per epoch.
        svm.write_at(4096, &[2; 1536]).unwrap();
        svm.write_at(8192, &[3; 512]).unwrap();
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        // At the bound the write fails.
        assert!(svm.write_at(16384, &[4; 1536]).is_err());
        // The PVM's write of epoch 1 is seen by nobody until commit 1.
        engine
            .stage(DiskWrite {
                epoch: 1,
                disk: 0,
                offset: 32768,
                data: vec![5; 512],
            })
            .unwrap();
        svm.read_at(32768, &mut buf[..512]).unwrap();
        assert_eq!(&buf[..512], &[0xaa; 512][..]);
        engine.commit(1).unwrap();
        // Commit: the overlay is gone, the PVM's epoch is on the image.
        svm.read_at(512, &mut buf[..1024]).unwrap();
        assert_eq!(&buf[..1024], &[0xaa; 1024][..]);
        assert_eq!(on_image(tmp.path(), 32768, 512), vec![5; 512]);
        svm.read_at(32768, &mut buf[..512]).unwrap();
        assert_eq!(&buf[..512], &[5; 512][..]);
        // A new epoch may ask again.
        svm.write_at(0, &[6; 2560]).unwrap();
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        // An uncommitted PVM write, then failover: the SVM's bytes are
        // merged into the image, the PVM's dropped.
        engine
            .stage(DiskWrite {
                epoch: 2,
                disk: 0,
                offset: 40960,
                data: vec![7; 512],
            })
            .unwrap();
        engine.take_over().unwrap();
        assert_eq!(on_image(tmp.path(), 0, 2560), vec![6; 2560]);
        assert_eq!(on_image(tmp.path(), 40960, 512), vec![0xaa; 512]);
        // From now on the SVM writes the image.
        svm.write_at(49152, &[8; 512]).unwrap();
        svm.flush().unwrap();
        assert_eq!(on_image(tmp.path(), 49152, 512), vec![8; 512]);
    }
}
