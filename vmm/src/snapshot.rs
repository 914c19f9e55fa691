//! The snapshot file format.
//!
//! ```text
//! header   32 bytes: magic "COLOSNAP", version u32, kind u32 (0 full,
//!          1 diff), guest memory bytes u64, section count u32 (3: those before
//!          END.), CRC-32 of
//!          the 28 bytes before it
//! section  tag [u8; 4], payload length u64, CRC-32 of the payload u32,
//!          payload
//!   LAYT   postcard(Layout): memory size, vCPUs, devices in order
//!   STAT   postcard(MachineState): vCPUs, VM, serial, i8042, virtio
//!   MEMF   full: every RAM range's bytes in address order
//!   MEMD   diff: page count u64, that many page addresses u64, the pages
//!   END.   empty: the file is complete
//! ```
//!
//! Each section appears once; an unknown, repeated or missing section, or
//! bytes after `END.`, make the file malformed. Files are written to a
//! unique temporary name (O_EXCL, O_NOFOLLOW, mode 0600) and renamed into
//! place; only a regular file is read, its size and magic checked first.
//!
//! All integers are little-endian. A reader checks everything (magic,
//! version, every checksum, the end marker, the layout against the VM it
//! would restore into) before it hands out a single byte, so a truncated,
//! corrupt or foreign file is refused with nothing applied.

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

/// Passes bytes on while it counts them and folds them into a CRC-32.
struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a section whose payload `fill` streams; its length and CRC are
/// patched in once the payload is written.
fn streamed_section<W: Write + Seek>(
    out: &mut W,
    tag: &[u8; 4],
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let start = out.stream_position()?;
    out.write_all(tag)?;
    out.write_all(&[0u8; 12])?;
    let mut w = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    fill(&mut w)?;
    let (len, crc) = (w.len, w.crc.finalize());
    let end = out.stream_position()?;
    out.seek(SeekFrom::Start(start + 4))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&crc.to_le_bytes())?;
    out.seek(SeekFrom::Start(end))?;
    Ok(())
}

/// A verified snapshot file.
pub struct Snapshot {
    pub kind: Kind,
    pub layout: Layout,
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
    #[error("a restore chain starts with a full snapshot; {path} is a diff")]
    ChainStart { path: PathBuf },
    #[error("a restore chain continues with diffs; {path} is a full snapshot")]
    ChainFull { path: PathBuf },
}

fn section(out: &mut impl Write, tag: &[u8; 4], payload: &[u8]) -> io::Result<()> {
    out.write_all(tag)?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(&crc32fast::hash(payload).to_le_bytes())?;
    out.write_all(payload)
}

fn to_io(e: postcard::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The sections a snapshot holds, besides `END.`.
const SECTIONS: u32 = 3;

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
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let result = (|| -> io::Result<u64> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(kind as u32).to_le_bytes());
        header.extend_from_slice(&layout.mem_size.to_le_bytes());
        header.extend_from_slice(&SECTIONS.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        out.write_all(&header)?;
        section(
            &mut out,
            b"LAYT",
            &postcard::to_stdvec(layout).map_err(to_io)?,
        )?;
        section(
            &mut out,
            b"STAT",
            &postcard::to_stdvec(state).map_err(to_io)?,
        )?;
        match kind {
            Kind::Full => streamed_section(&mut out, b"MEMF", |w| memory.write_bytes(w))?,
            Kind::Diff => streamed_section(&mut out, b"MEMD", |w| {
                w.write_all(&memory.page_count().to_le_bytes())?;
                memory.write_addresses(w)?;
                memory.write_bytes(w)
            })?,
        }
        section(&mut out, b"END.", &[])?;
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

/// Reads and verifies a snapshot file.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let p = || path.to_path_buf();
    let (mut file, size) = open_snapshot(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|source| SnapshotError::Read { path: p(), source })?;
    let version = le_u32(&bytes[8..]);
    if version != VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
        });
    }
    if crc32fast::hash(&bytes[..28]) != le_u32(&bytes[28..]) {
        return Err(SnapshotError::Checksum {
            path: p(),
            what: "the header".into(),
        });
    }
    let kind = match le_u32(&bytes[12..]) {
        0 => Kind::Full,
        1 => Kind::Diff,
        k => {
            return Err(SnapshotError::Malformed {
                path: p(),
                what: format!("unknown kind {k}"),
            })
        }
    };
    let mem_size = le_u64(&bytes[16..]);

    let mut at = HEADER_LEN;
    let mut sections: Vec<([u8; 4], &[u8])> = Vec::new();
    loop {
        let Some(head) = bytes.get(at..at + 16) else {
            return Err(SnapshotError::Truncated {
                path: p(),
                what: format!("section header at byte {at}"),
            });
        };
        let tag: [u8; 4] = [head[0], head[1], head[2], head[3]];
        let len = le_u64(&head[4..]);
        let crc = le_u32(&head[12..]);
        let name = String::from_utf8_lossy(&tag).into_owned();
        let start = at + 16;
        let Some(payload) = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .and_then(|end| bytes.get(start..end))
        else {
            return Err(SnapshotError::Truncated {
                path: p(),
                what: format!("section {name} ({len} bytes at byte {start})"),
            });
        };
        if crc32fast::hash(payload) != crc {
            return Err(SnapshotError::Checksum {
                path: p(),
                what: format!("section {name}"),
            });
        }
        at = start + payload.len();
        if &tag == b"END." {
            break;
        }
        if !matches!(&tag, b"LAYT" | b"STAT" | b"MEMF" | b"MEMD") {
            return Err(SnapshotError::Malformed {
                path: p(),
                what: format!("unknown section {name}"),
            });
        }
        if sections.iter().any(|(t, _)| *t == tag) {
            return Err(SnapshotError::Malformed {
                path: p(),
                what: format!("a second {name} section"),
            });
        }
        sections.push((tag, payload));
    }
    if at != bytes.len() {
        return Err(SnapshotError::Malformed {
            path: p(),
            what: format!("{} bytes after the end marker", bytes.len() - at),
        });
    }
    let count = le_u32(&bytes[24..]);
    if count != SECTIONS || sections.len() != SECTIONS as usize {
        return Err(SnapshotError::Malformed {
            path: p(),
            what: format!(
                "{} sections; the header says {count}, a snapshot has {SECTIONS}",
                sections.len()
            ),
        });
    }
    let find = |tag: &[u8; 4]| {
        sections
            .iter()
            .find(|(t, _)| t == tag)
            .map(|(_, payload)| *payload)
            .ok_or_else(|| SnapshotError::Malformed {
                path: p(),
                what: format!("no {} section", String::from_utf8_lossy(tag)),
            })
    };
    let malformed = |what: String| SnapshotError::Malformed { path: p(), what };
    let layout: Layout =
        postcard::from_bytes(find(b"LAYT")?).map_err(|e| malformed(format!("layout: {e}")))?;
    let state: MachineState =
        postcard::from_bytes(find(b"STAT")?).map_err(|e| malformed(format!("state: {e}")))?;
    if layout.mem_size != mem_size {
        return Err(malformed(
            "header and layout disagree on memory size".into(),
        ));
    }
    state.check_consistent(&layout).map_err(malformed)?;
    let memory = match kind {
        Kind::Full => {
            let mem = find(b"MEMF")?;
            if mem.len() as u64 != mem_size {
                return Err(malformed(format!(
                    "{} bytes of memory for a {mem_size}-byte guest",
                    mem.len()
                )));
            }
            Memory::Full(mem.to_vec())
        }
        Kind::Diff => {
            let mem = find(b"MEMD")?;
            if mem.len() < 8 {
                return Err(malformed("empty diff section".into()));
            }
            let count = le_u64(mem);
            let expect = count
                .checked_mul(8 + PAGE_SIZE)
                .and_then(|n| n.checked_add(8))
                .ok_or_else(|| malformed("page count overflows".into()))?;
            if expect != mem.len() as u64 {
                return Err(malformed(format!("{count} pages in {} bytes", mem.len())));
            }
            let count = count as usize;
            let data = &mem[8 + count * 8..];
            let mut pages = Vec::with_capacity(count);
            for i in 0..count {
                let addr = le_u64(&mem[8 + i * 8..]);
                // Whether the page lies in guest memory is checked against
                // the VM at restore, before anything is written.
                if addr % PAGE_SIZE != 0 {
                    return Err(malformed(format!("unaligned page address {addr:#x}")));
                }
                let page = &data[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
                pages.push((addr, page.to_vec()));
            }
            Memory::Diff(pages)
        }
    };
    Ok(Snapshot {
        kind,
        layout,
        state,
        memory,
    })
}

/// Reads a restore chain (one full snapshot, then diffs, oldest first) and
/// checks every file and the chain's consistency before anything is used.
pub fn read_chain(paths: &[PathBuf]) -> Result<Vec<Snapshot>, SnapshotError> {
    let mut chain = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let snap = read(path)?;
        match (i, snap.kind) {
            (0, Kind::Diff) => return Err(SnapshotError::ChainStart { path: path.clone() }),
            (1.., Kind::Full) => return Err(SnapshotError::ChainFull { path: path.clone() }),
            _ => {}
        }
        if let Some(first) = chain.first() {
            let first: &Snapshot = first;
            if first.layout != snap.layout {
                return Err(SnapshotError::Mismatch {
                    path: path.clone(),
                    what: "its layout differs from the full snapshot's".into(),
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
        write(&full, &layout(), &state(2), &Memory::Full(mem.clone())).unwrap();
        let snap = read(&full).unwrap();
        assert_eq!((snap.kind, snap.layout), (Kind::Full, layout()));
        assert_eq!(snap.state.vcpus[1].regs.rip, 0x1234);
        assert!(matches!(snap.memory, Memory::Full(ref m) if *m == mem));

        let diff = dir.path().join("d");
        let page = vec![0xabu8; PAGE_SIZE as usize];
        write(
            &diff,
            &layout(),
            &state(2),
            &Memory::Diff(vec![(4096, page.clone())]),
        )
        .unwrap();
        let snap = read(&diff).unwrap();
        assert!(matches!(snap.memory, Memory::Diff(ref p) if *p == vec![(4096, page)]));
        assert_eq!(read_chain(&[full.clone(), diff.clone()]).unwrap().len(), 2);
        assert!(matches!(
            read_chain(std::slice::from_ref(&diff)),
            Err(SnapshotError::ChainStart { .. })
        ));
        assert!(matches!(
            read_chain(&[full.clone(), full.clone()]),
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
        write(&path, &layout(), &state(2), &Memory::Full(vec![1; 8192])).unwrap();
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
        write(&path, &layout(), &state(1), &Memory::Full(vec![1; 8192])).unwrap();
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
            section(&mut out, tag, payload).unwrap();
        }
        section(&mut out, b"END.", &[]).unwrap();
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn unknown_repeated_and_miscounted_sections_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let layt = postcard::to_stdvec(&layout()).unwrap();
        let stat = postcard::to_stdvec(&state(2)).unwrap();
        let mem = vec![1u8; 8192];
        crafted(
            &path,
            3,
            &[
                (b"LAYT", layt.clone()),
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
                    (b"STAT", stat.clone()),
                    (b"XTRA", vec![1]),
                    (b"MEMF", mem.clone()),
                ],
                "unknown section XTRA",
            ),
            (
                4,
                vec![
                    (b"LAYT", layt.clone()),
                    (b"STAT", stat.clone()),
                    (b"MEMF", vec![9u8; 8192]),
                    (b"MEMF", mem.clone()),
                ],
                "a second MEMF",
            ),
            (
                7,
                vec![(b"LAYT", layt), (b"STAT", stat), (b"MEMF", mem)],
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
                write(target, &layout(), &state(2), &mem).is_err(),
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
}
