//! virtio-blk: one request queue over a [`BlockBackend`].
//!
//! A request is a chain: a 16-byte driver-readable header (type, reserved,
//! sector), data buffers (device-writable for reads, driver-readable for
//! writes), and a one-byte device-writable status. Every buffer is checked
//! against guest memory and the request against the disk size before any
//! byte moves, so a malformed request answers IOERR (or, when even its
//! status byte is unusable, comes back with length 0) and never touches
//! memory outside its own buffers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

use super::{DeviceCounters, GuestMemoryMmap, Processed, VirtioDevice};
use crate::ratelimit::{error_limited, warn_limited};

/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID a GET_ID request returns.
pub const ID_LEN: usize = 20;
const QUEUE_SIZES: &[u16] = &[256];
const HEADER_LEN: u32 = 16;
/// Bytes a request moves at a time between the disk and guest memory.
pub const BOUNCE_LEN: usize = 128 << 10;

/// Storage behind a virtio-blk device. `vmm` adapts the replicated backend
/// of block-replication to this trait; [`FileBackend`] is the plain one.
pub trait BlockBackend: Send {
    /// Size of the disk in bytes.
    fn capacity(&self) -> u64;
    /// Writes are refused.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset` (within capacity).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset` (within capacity).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The device ID (serial) the guest reads with GET_ID, at most 20 bytes.
    fn id(&self) -> &[u8];
}

/// A disk backed by a raw image file.
pub struct FileBackend {
    file: File,
    capacity: u64,
    read_only: bool,
    id: Vec<u8>,
}

impl FileBackend {
    /// Opens the raw image at `path`. The disk's size is the file's,
    /// rounded down to whole sectors; its ID is derived from the file's
    /// device and inode numbers, stable across restarts.
    ///
    /// An image has one writer: a read-write open takes an exclusive
    /// `flock`, a read-only one a shared lock, both without waiting, held
    /// as long as the backend lives. An image another VM (or another disk
    /// of this one) holds fails with `ErrorKind::WouldBlock`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let mode = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor `file` owns; no memory is
        // passed.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock => io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "in use by another VM (the image is locked)",
                ),
                _ => e,
            });
        }
        let mut id = format!("colo{:x}-{:x}", meta.dev(), meta.ino()).into_bytes();
        id.truncate(ID_LEN);
        Ok(Self {
            file,
            capacity: meta.len() / SECTOR_SIZE * SECTOR_SIZE,
            read_only,
            id,
        })
    }

    /// A second descriptor on the same open image (it shares the lock):
    /// for positional reads and writes beside the device, e.g. the
    /// replication's block hashes and commits.
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

impl BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn id(&self) -> &[u8] {
        &self.id
    }
}

/// A virtio-blk device.
pub struct Block {
    backend: Box<dyn BlockBackend>,
    counters: Arc<DeviceCounters>,
    /// The one buffer request data passes through, [`BOUNCE_LEN`] bytes.
    bounce: Vec<u8>,
}

/// Why a request failed, as the status byte tells the driver.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    IoErr,
    Unsupported,
}

impl Block {
    /// A device over `backend`.
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        Self {
            backend,
            counters: Arc::default(),
            bounce: vec![0; BOUNCE_LEN],
        }
    }

    /// Executes one request; returns the number of bytes written into
    /// device-writable buffers (the used length), or None when the chain
    /// has no usable status byte.
    fn execute(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Option<u32> {
        let (status_desc, rest) = descs.split_last()?;
        let (header_desc, data) = rest.split_first()?;
        if !status_desc.is_write_only()
            || status_desc.len() < 1
            || !super::in_memory(mem, status_desc.addr(), 1)
        {
            return None;
        }
        let (status, written) = match self.request(header_desc, data, mem) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(Failure::IoErr) => (VIRTIO_BLK_S_IOERR, 0),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if status != VIRTIO_BLK_S_OK {
            DeviceCounters::add(&self.counters.errors, 1);
        }
        mem.write_obj(status as u8, status_desc.addr()).ok()?;
        Some(written + 1)
    }

    fn request(
        &mut self,
        header: &Descriptor,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<u32, Failure> {
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(Failure::IoErr);
        }
        let mut raw = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| Failure::IoErr)?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]);
        // Every data buffer must lie in guest memory and point the right way.
        let device_writes = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
        for d in data {
            if d.is_write_only() != device_writes
                || !super::in_memory(mem, d.addr(), d.len() as usize)
            {
                return Err(Failure::IoErr);
            }
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let start = self.checked_range(sector, total)?;
                if kind == VIRTIO_BLK_T_IN {
                    self.transfer(Direction::FromDisk, start, data, mem)?;
                    DeviceCounters::add(&self.counters.read_bytes, total);
                    u32::try_from(total).map_err(|_| Failure::IoErr)
                } else {
                    if self.backend.read_only() {
                        return Err(Failure::IoErr);
                    }
                    self.transfer(Direction::ToDisk, start, data, mem)?;
                    DeviceCounters::add(&self.counters.write_bytes, total);
                    Ok(0)
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.backend.read_only() {
                    self.backend.flush().map_err(|e| {
                        tracing::error!("virtio-blk: flush failed: {e}");
                        Failure::IoErr
                    })?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let [d] = data else {
                    return Err(Failure::IoErr);
                };
                let mut id = [0u8; ID_LEN];
                let src = self.backend.id();
                let n = src.len().min(ID_LEN);
                id[..n].copy_from_slice(&src[..n]);
                let len = (d.len() as usize).min(ID_LEN);
                mem.write_slice(&id[..len], d.addr())
                    .map_err(|_| Failure::IoErr)?;
                Ok(len as u32)
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte offset of `sector` when `[sector, sector + len)` is whole
    /// sectors inside the disk.
    fn checked_range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(Failure::IoErr)?;
        let end = start.checked_add(len).ok_or(Failure::IoErr)?;
        if len % SECTOR_SIZE != 0 || end > self.backend.capacity() {
            return Err(Failure::IoErr);
        }
        Ok(start)
    }

    /// Moves the data of a read or write request between the disk at
    /// `offset` and the chain's data buffers, through the device's bounded
    /// bounce buffer: never more than [`BOUNCE_LEN`] bytes at a time,
    /// whatever length the descriptors claim.
    fn transfer(
        &mut self,
        dir: Direction,
        mut offset: u64,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<(), Failure> {
        for d in data {
            let mut done = 0u64;
            let len = u64::from(d.len());
            while done < len {
                let n = (len - done).min(BOUNCE_LEN as u64) as usize;
                let buf = &mut self.bounce[..n];
                let addr = d.addr().checked_add(done).ok_or(Failure::IoErr)?;
                let moved = match dir {
                    Direction::FromDisk => self
                        .backend
                        .read_at(offset, buf)
                        .map_err(Some)
                        .and_then(|()| mem.write_slice(buf, addr).map_err(|_| None)),
                    Direction::ToDisk => mem
                        .read_slice(buf, addr)
                        .map_err(|_| None)
                        .and_then(|()| self.backend.write_at(offset, buf).map_err(Some)),
                };
                match moved {
                    Ok(()) => {}
                    Err(Some(e)) => {
                        error_limited!("virtio-blk: {dir:?} at {offset:#x} failed: {e}");
                        return Err(Failure::IoErr);
                    }
                    // Checked against guest memory before any byte moved.
                    Err(None) => return Err(Failure::IoErr),
                }
                done += n as u64;
                offset += n as u64;
            }
        }
        Ok(())
    }
}

/// Which way a request's data moves.
#[derive(Debug, Clone, Copy)]
enum Direction {
    FromDisk,
    ToDisk,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
        if self.backend.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: only `capacity` (in sectors) is offered.
        let config = (self.backend.capacity() / SECTOR_SIZE).to_le_bytes();
        super::read_config_bytes(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Processed {
        let Some(queue) = queues.get_mut(index) else {
            return Processed::NOTHING;
        };
        let mut done = Processed::NOTHING;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            DeviceCounters::add(&self.counters.requests, 1);
            let len = self.execute(&descs, mem).unwrap_or_else(|| {
                warn_limited!("virtio-blk: request {head} has no usable status byte");
                DeviceCounters::add(&self.counters.errors, 1);
                0
            });
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::error!("virtio-blk: cannot return request {head}: {e}");
            }
            done = Processed::USED;
        }
        done
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    fn save_state(&self) -> super::DeviceState {
        super::DeviceState::Block
    }

    fn validate_state(&self, state: &super::DeviceState) -> Result<(), crate::PersistError> {
        match state {
            super::DeviceState::Block => Ok(()),
            other => Err(crate::PersistError::Mismatch(format!(
                "{other:?} for a virtio-blk device"
            ))),
        }
    }

    fn restore_state(&mut self, _state: &super::DeviceState) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing::{guest_memory, live_transport, DriverSim, MEM_SIZE};
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x3000;

    struct Disk {
        file: tempfile::NamedTempFile,
        t: MmioTransport,
    }

    fn disk(sectors: u64, read_only: bool) -> Disk {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        file.write_all(&bytes).unwrap();
        let backend = FileBackend::open(file.path(), read_only).unwrap();
        let t = block_over(Box::new(backend), guest_memory());
        Disk { file, t }
    }

    fn block_over(backend: Box<dyn BlockBackend>, mem: GuestMemoryMmap) -> MmioTransport {
        live_transport(
            Box::new(Block::new(backend)),
            mem,
            1 << VIRTIO_F_VERSION_1,
            1,
        )
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits one chain and returns (status byte, used length).
    fn submit(d: &mut Disk, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mut sim = DriverSim::new(&mut d.t);
        header(sim.mem(), kind, sector);
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        sim.add_buffer(0, &chain);
        let before = sim.used(0).len();
        d.t.process_queue(0);
        let sim = DriverSim::new(&mut d.t);
        let used = sim.used(0);
        assert_eq!(used.len(), before + 1);
        (
            sim.mem().read_obj(GuestAddress(STATUS)).unwrap(),
            used[before].1,
        )
    }

    fn file_bytes(d: &Disk) -> Vec<u8> {
        let mut f = d.file.reopen().unwrap();
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn read_returns_file_bytes_and_marks_them_dirty() {
        let mut d = disk(8, false);
        let mem = d.t.mem.clone();
        let (status, len) = submit(&mut d, VIRTIO_BLK_T_IN, 2, &[(DATA, 1024, true)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 1025));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, file_bytes(&d)[1024..2048]);
        let region = mem.find_region(GuestAddress(DATA)).unwrap();
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        assert!(region.bitmap().dirty_at(DATA as usize));
    }

    #[test]
    fn write_lands_in_the_file_and_flush_succeeds() {
        let mut d = disk(8, false);
        let mem = d.t.mem.clone();
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 0x800))
            .unwrap();
        let chain = [(DATA, 512, false), (DATA + 0x800, 512, false)];
        assert_eq!(submit(&mut d, VIRTIO_BLK_T_OUT, 3, &chain), (0, 1));
        assert_eq!(submit(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]), (0, 1));
        let bytes = file_bytes(&d);
        assert!(bytes[1536..2048].iter().all(|&b| b == 0xab));
        assert!(bytes[2048..2560].iter().all(|&b| b == 0xcd));
        assert_eq!(bytes[1535], (1535 % 251) as u8);
    }

    #[test]
    fn out_of_range_requests_fail_without_touching_anything() {
        let mut d = disk(8, false);
        let before = file_bytes(&d);
        let mem = d.t.mem.clone();
        mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        // Past the end of the disk, straddling it, and a sector overflow.
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_OUT, 8, &[(DATA, 512, false)]).0,
            ioerr
        );
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_OUT, 7, &[(DATA, 1024, false)]).0,
            ioerr
        );
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_IN, u64::MAX / 2, &[(DATA, 512, true)]).0,
            ioerr
        );
        // Not whole sectors.
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_OUT, 0, &[(DATA, 100, false)]).0,
            ioerr
        );
        // A buffer outside guest memory, and one pointing the wrong way.
        let outside = MEM_SIZE as u64 - 256;
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_IN, 0, &[(outside, 512, true)]).0,
            ioerr
        );
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]).0,
            ioerr
        );
        assert_eq!(file_bytes(&d), before);
        let mut untouched = vec![0u8; 1024];
        mem.read_slice(&mut untouched, GuestAddress(DATA)).unwrap();
        assert!(untouched.iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn unknown_type_is_unsupported_and_get_id_works() {
        let mut d = disk(1, false);
        assert_eq!(submit(&mut d, 99, 0, &[]).0, VIRTIO_BLK_S_UNSUPP as u8);
        let (status, len) = submit(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!((status, len), (0, 21));
        let mut id = [0u8; 20];
        d.t.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert!(id.starts_with(b"colo"));
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut d = disk(4, true);
        assert_ne!(d.t.device().features() & (1 << VIRTIO_BLK_F_RO), 0);
        let before = file_bytes(&d);
        let (status, _) = submit(&mut d, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(file_bytes(&d), before);
        assert_eq!(
            submit(&mut d, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
            0
        );
    }

    #[test]
    fn chain_without_status_comes_back_empty() {
        let mut d = disk(1, false);
        let mut sim = DriverSim::new(&mut d.t);
        header(sim.mem(), VIRTIO_BLK_T_IN, 0);
        sim.add_buffer(0, &[(HDR, 16, false)]);
        d.t.process_queue(0);
        let sim = DriverSim::new(&mut d.t);
        assert_eq!(sim.used(0), vec![(0, 0)]);
        assert_eq!(
            d.t.device()
                .counters()
                .errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn capacity_in_config_space() {
        let d = disk(6, false);
        let mut cap = [0u8; 8];
        d.t.device().read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 6);
        let mut past = [0xffu8; 4];
        d.t.device().read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
    }

    /// A disk that keeps nothing and records the largest buffer it was
    /// handed and the bytes it saw.
    #[derive(Clone, Default)]
    struct Recorder {
        largest: Arc<std::sync::atomic::AtomicUsize>,
        bytes: Arc<std::sync::atomic::AtomicU64>,
    }

    impl BlockBackend for Recorder {
        fn capacity(&self) -> u64 {
            1 << 40
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&mut self, _: u64, buf: &mut [u8]) -> io::Result<()> {
            self.write_at(0, buf)
        }
        fn write_at(&mut self, _: u64, buf: &[u8]) -> io::Result<()> {
            use std::sync::atomic::Ordering::Relaxed;
            self.largest.fetch_max(buf.len(), Relaxed);
            self.bytes.fetch_add(buf.len() as u64, Relaxed);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn id(&self) -> &[u8] {
            b"recorder"
        }
    }

    #[test]
    fn a_huge_request_moves_through_a_bounded_buffer() {
        use std::sync::atomic::Ordering::Relaxed;
        const BIG: u32 = 256 << 20;
        let recorder = Recorder::default();
        // Guest memory large enough for the data buffer; untouched pages
        // cost nothing.
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BIG as usize + MEM_SIZE)]).unwrap();
        let mut t = block_over(Box::new(recorder.clone()), mem);
        let big = MEM_SIZE as u64;
        for (kind, writable, used) in [
            (VIRTIO_BLK_T_OUT, false, 1),
            (VIRTIO_BLK_T_IN, true, BIG + 1),
        ] {
            let mut sim = DriverSim::new(&mut t);
            header(sim.mem(), kind, 8);
            sim.add_buffer(
                0,
                &[(HDR, 16, false), (big, BIG, writable), (STATUS, 1, true)],
            );
            t.process_queue(0);
            let sim = DriverSim::new(&mut t);
            assert_eq!(sim.mem().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
            assert_eq!(sim.used(0).last().unwrap().1, used);
        }
        assert_eq!(recorder.bytes.load(Relaxed), 2 * u64::from(BIG));
        assert!(
            recorder.largest.load(Relaxed) <= BOUNCE_LEN,
            "the backend was handed {} bytes at once",
            recorder.largest.load(Relaxed)
        );
    }

    #[test]
    fn an_image_has_one_writer() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(4 * SECTOR_SIZE).unwrap();
        let path = file.path();
        let writer = FileBackend::open(path, false).unwrap();
        for read_only in [false, true] {
            let e = FileBackend::open(path, read_only)
                .err()
                .expect("a second open succeeded");
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            assert!(e.to_string().contains("in use by another VM"), "{e}");
        }
        drop(writer);
        // Readers share an image, and keep writers out.
        let r1 = FileBackend::open(path, true).unwrap();
        let _r2 = FileBackend::open(path, true).unwrap();
        assert!(FileBackend::open(path, false).is_err());
        drop((r1, _r2));
        FileBackend::open(path, false).unwrap();
    }
}
