//! The snapshot file format.
//!
//! ```text
//! header   32 bytes: magic "COLOSNAP", version u32, kind u32 (0 full,
//!          1 diff), guest memory bytes u64, section count u32 (4: those
//!          before END.), CRC-32 of the 28 bytes before it
//! section  tag [u8; 4], payload length u64, then the payload in chunks
//!          of at most 1 MiB, each followed by its CRC-32
//!   LAYT   postcard(Layout): memory, vCPUs, devices, CPU identity
//!   LINE   postcard(Lineage): this snapshot's id, the one it follows, the
//!          VM instance, the disks' identity when it was taken
//!   STAT   postcard(MachineState): vCPUs, VM, serial, i8042, virtio
//!   MEMF   full: every RAM range's bytes in address order
//!   MEMD   diff: page count u64, that many page addresses u64, the pages
//!   END.   empty: the file is complete
//! ```
//!
//! Every length is known before its bytes are written (the memory size,
//! 8 + n·(8 + 4096) for a diff), so a snapshot streams to any `io::Write`
//! with no `Seek`, and a reader knows the whole file's size from its first
//! sections: a truncated file is refused before any memory is applied.
//! The sections come in that order, once each; anything else (an unknown,
//! repeated or missing section, bytes after `END.`) is malformed. A reader
//! verifies each chunk's CRC before it hands the chunk on, so restore
//! streams memory straight into the guest, 1 MiB at a time, and never
//! holds a second copy of guest RAM. A restore writes into a VM that has
//! not run: if a chunk fails its CRC half-way, the VM is discarded.
//!
//! Files are written to a unique temporary name (O_EXCL, O_NOFOLLOW, mode
//! 0600), synced, renamed into place and the directory synced; only a
//! regular file is read, its size and magic checked first.
//!
//! All integers are little-endian.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"COLOSNAP";
/// Format version this build reads and writes.
pub const VERSION: u32 = 2;
/// Guest page size the diff sections count in.
pub use crate::vm::checkpoint::PAGE_SIZE;
const HEADER_LEN: usize = 32;

/// Full (all memory) or diff (pages dirtied since the previous snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Diff,
}

pub use crate::vm::machine::{Layout, MachineState};

/// 16 random bytes naming a snapshot or a VM instance.
pub type Id = [u8; 16];

/// A fresh random id.
pub fn new_id() -> Id {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // No entropy source: time and pid still tell VMs and snapshots apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    id
}

/// The first bytes of an id, for messages.
pub fn short(id: &Id) -> String {
    id[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A disk image's identity and generation: the same file, unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl DiskStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Where a snapshot stands in its chain, and the disks it goes with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// This snapshot.
    pub id: Id,
    /// The VM instance whose full snapshot starts the chain.
    pub instance: Id,
    /// The snapshot a diff follows; none for a full one.
    pub parent: Option<Id>,
    /// Each disk as it was when the snapshot was taken, in device order.
    pub disks: Vec<DiskStamp>,
}

/// Guest memory in a snapshot.
pub enum Memory {
    /// All RAM, ranges in address order.
    Full(Vec<u8>),
    /// (guest-physical page address, page bytes).
    Diff(Vec<(u64, Vec<u8>)>),
}

/// Where a snapshot's memory section comes from when it is written: the
/// writer streams it, so a snapshot never holds a second copy of guest RAM.
pub trait MemorySource {
    /// Full or diff.
    fn kind(&self) -> Kind;
    /// Number of pages a diff holds (ignored for a full image).
    fn page_count(&self) -> u64;
    /// Writes the page addresses of a diff, little-endian u64 each.
    fn write_addresses(&self, out: &mut dyn Write) -> io::Result<()>;
    /// Writes the memory bytes: all RAM, or each listed page.
    fn write_bytes(&self, out: &mut dyn Write) -> io::Result<()>;
}

impl MemorySource for Memory {
    fn kind(&self) -> Kind {
        match self {
            Memory::Full(_) => Kind::Full,
            Memory::Diff(_) => Kind::Diff,
        }
    }

    fn page_count(&self) -> u64 {
        match self {
            Memory::Full(_) => 0,
            Memory::Diff(pages) => pages.len() as u64,
        }
    }

    fn write_addresses(&self, out: &mut dyn Write) -> io::Result<()> {
        if let Memory::Diff(pages) = self {
            for (addr, _) in pages {
                out.write_all(&addr.to_le_bytes())?;
            }
        }
        Ok(())
    }

    fn write_bytes(&self, out: &mut dyn Write) -> io::Result<()> {
        match self {
            Memory::Full(bytes) => out.write_all(bytes),
            Memory::Diff(pages) => pages.iter().try_for_each(|(_, page)| out.write_all(page)),
        }
    }
}

/// Largest chunk of a section's payload; each is followed by its CRC-32.
const CHUNK: usize = 1 << 20;
/// Bounds on the sections read whole, checked before allocating.
const MAX_LAYOUT: u64 = 1 << 20;
const MAX_STATE: u64 = 64 << 20;

/// The bytes a payload of `len` bytes takes in the file.
fn framed_len(len: u64) -> u64 {
    len + 4 * len.div_ceil(CHUNK as u64)
}

/// Cuts what is written into chunks of [`CHUNK`] bytes, each followed by
/// its CRC-32; counts the payload bytes.
struct ChunkWriter<'a, W: Write> {
    out: &'a mut W,
    buf: Vec<u8>,
    len: u64,
}

impl<W: Write> ChunkWriter<'_, W> {
    fn emit(out: &mut W, chunk: &[u8]) -> io::Result<()> {
        out.write_all(chunk)?;
        out.write_all(&crc32fast::hash(chunk).to_le_bytes())
    }

    /// Writes the last, partial chunk; returns the payload length.
    fn finish(mut self) -> io::Result<u64> {
        if !self.buf.is_empty() {
            Self::emit(self.out, &self.buf)?;
            self.buf.clear();
        }
        Ok(self.len)
    }
}

impl<W: Write> Write for ChunkWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = if self.buf.is_empty() && data.len() >= CHUNK {
            // A whole chunk straight from the caller's buffer.
            Self::emit(self.out, &data[..CHUNK])?;
            CHUNK
        } else {
            let n = data.len().min(CHUNK - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            if self.buf.len() == CHUNK {
                Self::emit(self.out, &self.buf)?;
                self.buf.clear();
            }
            n
        };
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Writes a section of `len` payload bytes that `fill` streams.
fn section<W: Write>(
    out: &mut W,
    tag: &[u8; 4],
    len: u64,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    out.write_all(tag)?;
    out.write_all(&len.to_le_bytes())?;
    let mut w = ChunkWriter {
        out,
        buf: Vec::new(),
        len: 0,
    };
    fill(&mut w)?;
    let written = w.finish()?;
    if written != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "section {} has {written} bytes, announced {len}",
                String::from_utf8_lossy(tag)
            ),
        ));
    }
    Ok(())
}

fn small_section<W: Write>(out: &mut W, tag: &[u8; 4], payload: &[u8]) -> io::Result<()> {
    section(out, tag, payload.len() as u64, |w| w.write_all(payload))
}

/// A verified snapshot file.
pub struct Snapshot {
    pub kind: Kind,
    pub layout: Layout,
    pub lineage: Lineage,
    pub state: MachineState,
    pub memory: Memory,
}

/// Why a snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write snapshot {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a colo-vmm snapshot (bad magic)")]
    Magic { path: PathBuf },
    #[error("{path} is snapshot format version {found}; this vmm reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: checksum mismatch in {what}")]
    Checksum { path: PathBuf, what: String },
    #[error("{path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("snapshot {path} does not fit this VM: {what}")]
    Mismatch { path: PathBuf, what: String },
    #[error("{path} does not continue the restore chain: {what}")]
    Chain { path: PathBuf, what: String },
    #[error("a restore chain starts with a full snapshot; {path} is a diff")]
    ChainStart { path: PathBuf },
    #[error("a restore chain continues with diffs; {path} is a full snapshot")]
    ChainFull { path: PathBuf },
}

fn to_io(e: postcard::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The sections a snapshot holds, besides `END.`.
const SECTIONS: u32 = 4;

/// Temporary files of this process get a number each, so two snapshots
/// written at once (to `a.full` and `a.diff`, or twice to one target) never
/// share one.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Creates a fresh temporary file next to `path`: a name unique to this
/// process and call, opened exclusively (O_EXCL), without following a link
/// (O_NOFOLLOW), readable by the owner only (it holds guest RAM).
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let seq = TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{seq}.partial", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    Ok((tmp, file))
}

/// Refuses a target that exists and is not a regular file (a directory,
/// a link, a device, a FIFO): a snapshot replaces only a snapshot.
fn check_target(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the target exists and is not a regular file",
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes a snapshot to `path` atomically (a temporary file, unique and
/// mode 0600, renamed into place once complete and synced, then the
/// directory synced); returns its size. The temporary file is removed on
/// every error; a target that is not a regular file is refused.
pub fn write(
    path: &Path,
    layout: &Layout,
    lineage: &Lineage,
    state: &MachineState,
    memory: &dyn MemorySource,
) -> Result<u64, SnapshotError> {
    let err = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    check_target(path).map_err(err)?;
    let kind = memory.kind();
    let (tmp, file) = create_temp(path).map_err(err)?;
    let mut out = BufWriter::with_capacity(64 << 10, file);
    let result = (|| -> io::Result<u64> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(kind as u32).to_le_bytes());
        header.extend_from_slice(&layout.mem_size.to_le_bytes());
        header.extend_from_slice(&SECTIONS.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        out.write_all(&header)?;
        small_section(
            &mut out,
            b"LAYT",
            &postcard::to_stdvec(layout).map_err(to_io)?,
        )?;
        small_section(
            &mut out,
            b"LINE",
            &postcard::to_stdvec(lineage).map_err(to_io)?,
        )?;
        small_section(
            &mut out,
            b"STAT",
            &postcard::to_stdvec(state).map_err(to_io)?,
        )?;
        match kind {
            Kind::Full => section(&mut out, b"MEMF", layout.mem_size, |w| {
                memory.write_bytes(w)
            })?,
            Kind::Diff => {
                let n = memory.page_count();
                let len = n
                    .checked_mul(8 + PAGE_SIZE)
                    .and_then(|b| b.checked_add(8))
                    .ok_or_else(|| io::Error::other("page count overflows"))?;
                section(&mut out, b"MEMD", len, |w| {
                    w.write_all(&n.to_le_bytes())?;
                    memory.write_addresses(w)?;
                    memory.write_bytes(w)
                })?
            }
        }
        small_section(&mut out, b"END.", &[])?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let len = file.metadata()?.len();
        check_target(path)?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Opens `path` for reading: a regular file only (no FIFO or device that
/// could block or never end), with at least a header, starting with the
/// magic. Nothing is allocated for the contents before these checks.
fn open_snapshot(path: &Path) -> Result<(File, u64), SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        // Not blocking on a FIFO's open; the type is checked right after.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(SnapshotError::Malformed {
            path: path.to_path_buf(),
            what: "not a regular file".into(),
        });
    }
    let mut magic = [0u8; MAGIC.len()];
    if meta.len() < MAGIC.len() as u64 || file.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(SnapshotError::Magic {
            path: path.to_path_buf(),
        });
    }
    if meta.len() < HEADER_LEN as u64 {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            what: "header".into(),
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    Ok((file, meta.len()))
}

/// The little-endian u32 at the start of `b` (the caller checked its length).
fn le_u32(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[..4]);
    u32::from_le_bytes(v)
}

/// The little-endian u64 at the start of `b` (the caller checked its length).
fn le_u64(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    u64::from_le_bytes(v)
}

/// A snapshot file being read: header, layout and state verified, the
/// memory section next. [`SnapshotFile::read_memory`] streams it, each
/// chunk verified before it is handed on; [`SnapshotFile::finish`] checks
/// the end marker.
pub struct SnapshotFile {
    stream: Stream,
    pub kind: Kind,
    pub layout: Layout,
    pub lineage: Lineage,
    pub state: MachineState,
    /// A diff's page addresses (aligned); empty for a full snapshot.
    pub pages: Vec<u64>,
}

/// A snapshot file's bytes: raw reads and verified section payloads.
struct Stream {
    path: PathBuf,
    file: File,
    /// The current section's chunk being served, how much of it was
    /// served, and the payload bytes of the section not yet loaded.
    chunk: Vec<u8>,
    served: usize,
    left: u64,
}

impl SnapshotFile {
    /// Opens `path` and verifies everything but the memory bytes: the
    /// header, layout, state and (for a diff) page addresses, and that the
    /// file's size is exactly what they announce.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let p = || path.to_path_buf();
        let (file, size) = open_snapshot(path)?;
        let mut f = Stream {
            path: p(),
            file,
            chunk: Vec::new(),
            served: 0,
            left: 0,
        };
        let mut header = [0u8; HEADER_LEN];
        f.raw(&mut header, "header")?;
        let version = le_u32(&header[8..]);
        if version != VERSION {
            return Err(SnapshotError::Version {
                path: p(),
                found: version,
            });
        }
        if crc32fast::hash(&header[..28]) != le_u32(&header[28..]) {
            return Err(SnapshotError::Checksum {
                path: p(),
                what: "the header".into(),
            });
        }
        let kind = match le_u32(&header[12..]) {
            0 => Kind::Full,
            1 => Kind::Diff,
            k => return Err(f.malformed(format!("unknown kind {k}"))),
        };
        let mem_size = le_u64(&header[16..]);
        let count = le_u32(&header[24..]);
        if count != SECTIONS {
            return Err(f.malformed(format!(
                "the header says {count} sections, a snapshot has {SECTIONS}"
            )));
        }
        let mut at = HEADER_LEN as u64;
        let layout = f.whole_section(b"LAYT", MAX_LAYOUT, size, &mut at)?;
        let layout: Layout =
            postcard::from_bytes(&layout).map_err(|e| f.malformed(format!("layout: {e}")))?;
        let lineage = f.whole_section(b"LINE", MAX_LAYOUT, size, &mut at)?;
        let lineage: Lineage =
            postcard::from_bytes(&lineage).map_err(|e| f.malformed(format!("lineage: {e}")))?;
        if (kind == Kind::Full) != lineage.parent.is_none() {
            return Err(f.malformed("a full snapshot follows none, a diff one".into()));
        }
        let state = f.whole_section(b"STAT", MAX_STATE, size, &mut at)?;
        let state: MachineState =
            postcard::from_bytes(&state).map_err(|e| f.malformed(format!("state: {e}")))?;
        if layout.mem_size != mem_size {
            return Err(f.malformed("header and layout disagree on memory size".into()));
        }
        state
            .check_consistent(&layout)
            .map_err(|e| f.malformed(e))?;
        let tag = match kind {
            Kind::Full => b"MEMF",
            Kind::Diff => b"MEMD",
        };
        let len = f.section_head(tag)?;
        at += 12;
        // The whole file: this section, then END. (12 bytes).
        let want = framed_len(len)
            .checked_add(at + 12)
            .ok_or_else(|| f.malformed("memory section length overflows".into()))?;
        if size < want {
            return Err(f.truncated(format!("{size} bytes; its sections need {want}")));
        }
        if size > want {
            return Err(f.malformed(format!("{} bytes after the end marker", size - want)));
        }
        f.left = len;
        let mut pages = Vec::new();
        match kind {
            Kind::Full if len != mem_size => {
                return Err(
                    f.malformed(format!("{len} bytes of memory for a {mem_size}-byte guest"))
                )
            }
            Kind::Full => {}
            Kind::Diff => {
                let mut n = [0u8; 8];
                f.read_exact(&mut n)?;
                let count = u64::from_le_bytes(n);
                if count > mem_size / PAGE_SIZE
                    || count
                        .checked_mul(8 + PAGE_SIZE)
                        .and_then(|b| b.checked_add(8))
                        != Some(len)
                {
                    return Err(f.malformed(format!("{count} pages in {len} bytes")));
                }
                let mut addrs = vec![0u8; count as usize * 8];
                f.read_exact(&mut addrs)?;
                pages = addrs.chunks_exact(8).map(le_u64).collect();
                // Whether a page lies in guest memory (not only below its
                // size) is checked against the VM before anything is written.
                if let Some(a) = pages
                    .iter()
                    .find(|&&a| a % PAGE_SIZE != 0 || a >= (1 << 52))
                {
                    return Err(f.malformed(format!("bad page address {a:#x}")));
                }
            }
        }
        Ok(SnapshotFile {
            stream: f,
            kind,
            layout,
            lineage,
            state,
            pages,
        })
    }
}

impl Stream {
    fn malformed(&self, what: String) -> SnapshotError {
        SnapshotError::Malformed {
            path: self.path.clone(),
            what,
        }
    }

    fn truncated(&self, what: String) -> SnapshotError {
        SnapshotError::Truncated {
            path: self.path.clone(),
            what,
        }
    }

    /// Reads raw bytes (no chunk framing).
    fn raw(&mut self, buf: &mut [u8], what: &str) -> Result<(), SnapshotError> {
        self.file.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => self.truncated(what.to_string()),
            _ => SnapshotError::Read {
                path: self.path.clone(),
                source: e,
            },
        })
    }

    /// Reads a section's tag and length; the tag must be `tag`.
    fn section_head(&mut self, tag: &[u8; 4]) -> Result<u64, SnapshotError> {
        let name = String::from_utf8_lossy(tag).into_owned();
        let mut head = [0u8; 12];
        self.raw(&mut head, &format!("section {name}"))?;
        if &head[..4] != tag {
            return Err(self.malformed(format!(
                "section {} where {name} belongs",
                String::from_utf8_lossy(&head[..4])
            )));
        }
        Ok(le_u64(&head[4..]))
    }

    /// Reads a whole small section (at most `max` bytes) at file offset
    /// `*at` of a `size`-byte file.
    fn whole_section(
        &mut self,
        tag: &[u8; 4],
        max: u64,
        size: u64,
        at: &mut u64,
    ) -> Result<Vec<u8>, SnapshotError> {
        let len = self.section_head(tag)?;
        let name = String::from_utf8_lossy(tag).into_owned();
        if len > max {
            return Err(self.malformed(format!("section {name} of {len} bytes")));
        }
        *at += 12 + framed_len(len);
        if *at > size {
            return Err(self.truncated(format!("section {name} ({len} bytes)")));
        }
        self.left = len;
        let mut out = vec![0u8; len as usize];
        self.read_exact(&mut out)?;
        Ok(out)
    }

    /// Loads and verifies the next chunk of the current section.
    fn next_chunk(&mut self) -> Result<(), SnapshotError> {
        let n = self.left.min(CHUNK as u64) as usize;
        self.chunk.resize(n + 4, 0);
        let mut chunk = std::mem::take(&mut self.chunk);
        let r = self.raw(&mut chunk, "a chunk");
        self.chunk = chunk;
        r?;
        if crc32fast::hash(&self.chunk[..n]) != le_u32(&self.chunk[n..]) {
            return Err(SnapshotError::Checksum {
                path: self.path.clone(),
                what: format!(
                    "the chunk ending {} bytes before its section's end",
                    self.left - n as u64
                ),
            });
        }
        self.chunk.truncate(n);
        self.served = 0;
        self.left -= n as u64;
        Ok(())
    }

    /// Hands on the next `len` verified payload bytes, in pieces.
    fn stream(
        &mut self,
        mut len: u64,
        mut put: impl FnMut(&[u8]) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        while len > 0 {
            if self.served == self.chunk.len() {
                if self.left == 0 {
                    return Err(self.malformed("a section ends early".into()));
                }
                self.next_chunk()?;
            }
            let n = (self.chunk.len() - self.served).min(len as usize);
            put(&self.chunk[self.served..self.served + n])?;
            self.served += n;
            len -= n as u64;
        }
        Ok(())
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), SnapshotError> {
        let mut at = 0;
        self.stream(out.len() as u64, |piece| {
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
            Ok(())
        })
    }
}

impl SnapshotFile {
    /// Streams the memory: `put(offset, bytes)` with the offset in the
    /// full image (all RAM ranges back to back) or, for a diff, `put(page
    /// address, page)` for each page of [`SnapshotFile::pages`].
    pub fn read_memory(
        &mut self,
        mut put: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        match self.kind {
            Kind::Full => {
                let mut offset = 0u64;
                let len = self.stream.left;
                self.stream.stream(len, |piece| {
                    put(offset, piece)?;
                    offset += piece.len() as u64;
                    Ok(())
                })
            }
            Kind::Diff => {
                let pages = std::mem::take(&mut self.pages);
                let mut page = vec![0u8; PAGE_SIZE as usize];
                let result = pages.iter().try_for_each(|&addr| {
                    self.stream.read_exact(&mut page)?;
                    put(addr, &page)
                });
                self.pages = pages;
                result
            }
        }
    }

    /// Reads a full image straight into `regions` (guest RAM, its ranges
    /// in address order, as long as the image together), each chunk's CRC
    /// checked over the bytes where they landed. On an error the regions
    /// hold part of the image: the caller discards them.
    pub fn read_full_into(&mut self, regions: &mut [&mut [u8]]) -> Result<(), SnapshotError> {
        let s = &mut self.stream;
        let total: u64 = regions.iter().map(|r| r.len() as u64).sum();
        if self.kind != Kind::Full || s.served != s.chunk.len() || total != s.left {
            return Err(s.malformed(format!(
                "{} bytes of memory for {total} bytes of RAM",
                s.left
            )));
        }
        let (mut region, mut at) = (0usize, 0usize);
        while s.left > 0 {
            let n = s.left.min(CHUNK as u64) as usize;
            let mut crc = crc32fast::Hasher::new();
            let mut need = n;
            while need > 0 {
                while at == regions[region].len() {
                    region += 1;
                    at = 0;
                }
                let dst = &mut regions[region][at..];
                let k = need.min(dst.len());
                s.raw(&mut dst[..k], "the memory")?;
                crc.update(&dst[..k]);
                at += k;
                need -= k;
            }
            let mut want = [0u8; 4];
            s.raw(&mut want, "the memory")?;
            if crc.finalize() != u32::from_le_bytes(want) {
                return Err(SnapshotError::Checksum {
                    path: s.path.clone(),
                    what: format!(
                        "the memory chunk ending {} bytes before its end",
                        s.left - n as u64
                    ),
                });
            }
            s.left -= n as u64;
        }
        Ok(())
    }

    /// Checks the end marker after the memory.
    pub fn finish(self) -> Result<(), SnapshotError> {
        let mut s = self.stream;
        if s.left != 0 || s.served != s.chunk.len() {
            return Err(s.malformed("memory left unread".into()));
        }
        if s.section_head(b"END.")? != 0 {
            return Err(s.malformed("a non-empty end marker".into()));
        }
        Ok(())
    }
}

/// Reads and verifies a whole snapshot file into memory (tests and tools;
/// a restore streams with [`SnapshotFile`] instead).
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let mut f = SnapshotFile::open(path)?;
    let memory = match f.kind {
        Kind::Full => {
            let mut bytes = Vec::new();
            f.read_memory(|_, piece| {
                bytes.extend_from_slice(piece);
                Ok(())
            })?;
            Memory::Full(bytes)
        }
        Kind::Diff => {
            let mut pages = Vec::new();
            f.read_memory(|addr, page| {
                pages.push((addr, page.to_vec()));
                Ok(())
            })?;
            Memory::Diff(pages)
        }
    };
    let (kind, layout, lineage, state) =
        (f.kind, f.layout.clone(), f.lineage.clone(), f.state.clone());
    f.finish()?;
    Ok(Snapshot {
        kind,
        layout,
        lineage,
        state,
        memory,
    })
}

/// Opens a restore chain (one full snapshot, then diffs, oldest first) and
/// checks every file's header, layout, state and page list, and the
/// chain's consistency, before any memory is read.
pub fn open_chain(paths: &[PathBuf]) -> Result<Vec<SnapshotFile>, SnapshotError> {
    let mut chain: Vec<SnapshotFile> = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let snap = SnapshotFile::open(path)?;
        match (i, snap.kind) {
            (0, Kind::Diff) => return Err(SnapshotError::ChainStart { path: path.clone() }),
            (1.., Kind::Full) => return Err(SnapshotError::ChainFull { path: path.clone() }),
            _ => {}
        }
        if let Some(first) = chain.first() {
            if first.layout != snap.layout {
                return Err(SnapshotError::Mismatch {
                    path: path.clone(),
                    what: "its layout differs from the full snapshot's".into(),
                });
            }
        }
        if let Some(prev) = chain.last() {
            let follows = snap.lineage.parent.unwrap_or_default();
            if follows != prev.lineage.id {
                let whose = if snap.lineage.instance == prev.lineage.instance {
                    "a snapshot of the same VM"
                } else {
                    "a snapshot of another VM"
                };
                return Err(SnapshotError::Chain {
                    path: path.clone(),
                    what: format!(
                        "it follows snapshot {} ({whose}), not {} ({}): \
                         a chain out of order, with a gap, or of another VM",
                        short(&follows),
                        short(&prev.lineage.id),
                        paths[chain.len() - 1].display()
                    ),
                });
            }
        }
        chain.push(snap);
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::state::{VcpuState, VmState};
    use devices::legacy::{I8042Snapshot, SerialSnapshot};

    fn state(vcpus: usize) -> MachineState {
        let vcpu = VcpuState {
            cpuid: vec![],
            tsc_khz: 1000,
            mp_state: Default::default(),
            events: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: vec![7; 1024],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![(0x10, 99)],
        };
        MachineState {
            vcpus: vec![vcpu; vcpus],
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial: SerialSnapshot {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            i8042: I8042Snapshot {
                status: 0x14,
                ctr: 0x64,
                out: vec![],
                pending: None,
            },
            virtio: vec![],
        }
    }

    const A: Id = [1; 16];
    const B: Id = [2; 16];
    const C: Id = [3; 16];

    fn line(id: Id, parent: Option<Id>) -> Lineage {
        Lineage {
            id,
            instance: [9; 16],
            parent,
            disks: vec![],
        }
    }

    fn layout() -> Layout {
        Layout {
            mem_size: 8192,
            vcpus: 2,
            devices: vec![],
            cpu_template: "host".into(),
            cpuid_hash: crate::vm::machine::cpuid_hash([&[][..], &[][..]]),
            tsc_khz: 1000,
        }
    }

    #[test]
    fn full_and_diff_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("f");
        let mem: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        write(
            &full,
            &layout(),
            &line(A, None),
            &state(2),
            &Memory::Full(mem.clone()),
        )
        .unwrap();
        let snap = read(&full).unwrap();
        assert_eq!((snap.kind, snap.layout), (Kind::Full, layout()));
        assert_eq!(snap.state.vcpus[1].regs.rip, 0x1234);
        assert!(matches!(snap.memory, Memory::Full(ref m) if *m == mem));

        let diff = dir.path().join("d");
        let page = vec![0xabu8; PAGE_SIZE as usize];
        write(
            &diff,
            &layout(),
            &line(B, Some(A)),
            &state(2),
            &Memory::Diff(vec![(4096, page.clone())]),
        )
        .unwrap();
        let snap = read(&diff).unwrap();
        assert!(matches!(snap.memory, Memory::Diff(ref p) if *p == vec![(4096, page)]));
        assert_eq!(open_chain(&[full.clone(), diff.clone()]).unwrap().len(), 2);
        assert!(matches!(
            open_chain(std::slice::from_ref(&diff)),
            Err(SnapshotError::ChainStart { .. })
        ));
        assert!(matches!(
            open_chain(&[full.clone(), full.clone()]),
            Err(SnapshotError::ChainFull { .. })
        ));
        // No temporary file is left behind, and a snapshot is the owner's.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&full).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn every_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write(
            &path,
            &layout(),
            &line(A, None),
            &state(2),
            &Memory::Full(vec![1; 8192]),
        )
        .unwrap();
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad");
        // Any single flipped byte and any truncation is refused.
        for i in (0..good.len()).step_by(97) {
            let mut b = good.clone();
            b[i] ^= 0x01;
            std::fs::write(&bad, &b).unwrap();
            assert!(read(&bad).is_err(), "flipped byte {i} accepted");
        }
        for len in (0..good.len()).step_by(101) {
            std::fs::write(&bad, &good[..len]).unwrap();
            assert!(read(&bad).is_err(), "truncated to {len} accepted");
        }
        let mut b = good.clone();
        b[8] = 9;
        std::fs::write(&bad, &b).unwrap();
        assert!(matches!(
            read(&bad),
            Err(SnapshotError::Version { found: 9, .. })
        ));
        // A state for 1 vCPU in a 2-vCPU layout is inconsistent.
        write(
            &path,
            &layout(),
            &line(A, None),
            &state(1),
            &Memory::Full(vec![1; 8192]),
        )
        .unwrap();
        assert!(matches!(read(&path), Err(SnapshotError::Malformed { .. })));
    }

    type Sections<'a> = Vec<(&'a [u8; 4], Vec<u8>)>;

    /// A file of `sections` (tag, payload) after a header that claims
    /// `count` sections, then END.
    fn crafted(path: &Path, count: u32, sections: &[(&[u8; 4], Vec<u8>)]) {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&8192u64.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        for (tag, payload) in sections {
            small_section(&mut out, tag, payload).unwrap();
        }
        small_section(&mut out, b"END.", &[]).unwrap();
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn unknown_repeated_and_miscounted_sections_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let layt = postcard::to_stdvec(&layout()).unwrap();
        let lin = postcard::to_stdvec(&line(A, None)).unwrap();
        let stat = postcard::to_stdvec(&state(2)).unwrap();
        let mem = vec![1u8; 8192];
        crafted(
            &path,
            4,
            &[
                (b"LAYT", layt.clone()),
                (b"LINE", lin.clone()),
                (b"STAT", stat.clone()),
                (b"MEMF", mem.clone()),
            ],
        );
        assert!(read(&path).is_ok());
        let cases: Vec<(u32, Sections, &str)> = vec![
            (
                4,
                vec![
                    (b"LAYT", layt.clone()),
                    (b"LINE", lin.clone()),
                    (b"STAT", stat.clone()),
                    (b"XTRA", vec![1]),
                    (b"MEMF", mem.clone()),
                ],
                "section XTRA where MEMF belongs",
            ),
            (
                4,
                vec![
                    (b"LAYT", layt.clone()),
                    (b"LAYT", layt.clone()),
                    (b"LINE", lin.clone()),
                    (b"STAT", stat.clone()),
                    (b"MEMF", mem.clone()),
                ],
                "section LAYT where LINE belongs",
            ),
            (
                4,
                vec![
                    (b"LAYT", layt.clone()),
                    (b"LINE", lin.clone()),
                    (b"STAT", stat.clone()),
                    (b"MEMF", mem.clone()),
                    (b"MEMF", mem.clone()),
                ],
                "after the end marker",
            ),
            (
                7,
                vec![
                    (b"LAYT", layt),
                    (b"LINE", lin),
                    (b"STAT", stat),
                    (b"MEMF", mem),
                ],
                "the header says 7",
            ),
        ];
        for (count, sections, want) in cases {
            crafted(&path, count, &sections);
            let Err(e) = read(&path) else {
                panic!("{want}: accepted")
            };
            let e = e.to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn only_regular_files_are_written_over_or_read() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Memory::Full(vec![1; 8192]);
        // A directory, a dangling link and a FIFO as targets.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for target in [&sub, &link, &fifo] {
            assert!(
                write(target, &layout(), &line(A, None), &state(2), &mem).is_err(),
                "{} written over",
                target.display()
            );
        }
        assert!(!dir.path().join("elsewhere").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        // Reading a FIFO nobody writes returns at once, refused.
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read(&f).is_err());
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(true),
            "reading a FIFO blocked or was accepted"
        );
        assert!(read(&sub).is_err());
    }

    /// A sweep in the manner of a fuzzer: single-byte changes and
    /// truncations all over a small full and a small diff file are refused.
    #[test]
    fn every_byte_of_full_and_diff_files_is_checked() {
        // Tens of thousands of small files: in memory, not on a disk.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let full = dir.path().join("f");
        write(
            &full,
            &layout(),
            &line(A, None),
            &state(2),
            &Memory::Full(vec![3; 8192]),
        )
        .unwrap();
        let diff = dir.path().join("d");
        let pages = vec![(4096, vec![5u8; 4096])];
        write(
            &diff,
            &layout(),
            &line(B, Some(A)),
            &state(2),
            &Memory::Diff(pages),
        )
        .unwrap();
        let bad = dir.path().join("bad");
        for good in [std::fs::read(&full).unwrap(), std::fs::read(&diff).unwrap()] {
            assert!(read(&full).is_ok());
            // Every byte of the header and the first section head, then
            // every 7th (a stride prime to the chunk and page sizes).
            for i in (0..64).chain((64..good.len()).step_by(7)) {
                let mut b = good.clone();
                b[i] ^= 0x80;
                std::fs::write(&bad, &b).unwrap();
                assert!(read(&bad).is_err(), "flipped byte {i} accepted");
            }
            for len in (0..good.len()).step_by(11) {
                std::fs::write(&bad, &good[..len]).unwrap();
                assert!(read(&bad).is_err(), "truncated to {len} accepted");
            }
        }
    }

    #[test]
    fn chains_out_of_order_with_a_gap_or_of_another_vm_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let page = || Memory::Diff(vec![(4096, vec![1u8; 4096])]);
        let full = Memory::Full(vec![0; 8192]);
        write(&p("f"), &layout(), &line(A, None), &state(2), &full).unwrap();
        write(&p("d1"), &layout(), &line(B, Some(A)), &state(2), &page()).unwrap();
        write(&p("d2"), &layout(), &line(C, Some(B)), &state(2), &page()).unwrap();
        let other = Lineage {
            instance: [7; 16],
            ..line([8; 16], None)
        };
        write(&p("g"), &layout(), &other, &state(2), &full).unwrap();
        assert_eq!(open_chain(&[p("f"), p("d1"), p("d2")]).unwrap().len(), 3);
        for (chain, want) in [
            (
                vec![p("f"), p("d2"), p("d1")],
                "(a snapshot of the same VM)",
            ),
            (vec![p("f"), p("d2")], "(a snapshot of the same VM)"),
            (vec![p("g"), p("d1"), p("d2")], "(a snapshot of another VM)"),
        ] {
            let Err(e) = open_chain(&chain) else {
                panic!("{chain:?} accepted")
            };
            assert!(matches!(e, SnapshotError::Chain { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn a_full_image_reads_straight_into_regions_chunk_by_chunk_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mem: Vec<u8> = (0..8192u32).map(|i| (i / 3) as u8).collect();
        write(
            &path,
            &layout(),
            &line(A, None),
            &state(2),
            &Memory::Full(mem.clone()),
        )
        .unwrap();
        let (mut lo, mut hi) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut f = SnapshotFile::open(&path).unwrap();
        f.read_full_into(&mut [&mut lo, &mut hi]).unwrap();
        f.finish().unwrap();
        assert_eq!([lo, hi].concat(), mem);
        // A flipped memory byte: refused by the chunk's CRC.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 12 - 4 - 100;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut f = SnapshotFile::open(&path).unwrap();
        let (mut lo, mut hi) = (vec![0u8; 4096], vec![0u8; 4096]);
        assert!(matches!(
            f.read_full_into(&mut [&mut lo, &mut hi]),
            Err(SnapshotError::Checksum { .. })
        ));
        // Regions that do not add up to the image: refused before reading.
        let mut f = SnapshotFile::open(&path).unwrap();
        assert!(f.read_full_into(&mut [&mut [0u8; 4096][..]]).is_err());
    }
}
