//! Snapshots, restores, dirty-page tracking and state hashes.
//!
//! Everything here runs on a paused VM: vCPUs parked (their state read and
//! written by jobs on their own threads) and the device thread parked
//! between two events, so queue indices and device registers are
//! consistent with guest memory.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::checkpoint::{check_pages, for_each_chunk, CheckpointError, Target, PAGE_SIZE};
use super::machine::MachineState;
use super::memory::GuestMemory;
use super::state;
use super::{RunningVm, Vm, VmError};
use crate::snapshot::{self, Kind, SnapshotFile};

/// Guest memory streamed into a snapshot file straight from the guest's
/// RAM: all of it, or the listed pages.
struct GuestImage<'a> {
    mem: &'a GuestMemory,
    kind: Kind,
    pages: Vec<u64>,
}

fn mem_err(e: vm_memory::GuestMemoryError) -> std::io::Error {
    std::io::Error::other(format!("cannot read guest memory: {e}"))
}

fn to_io(e: CheckpointError) -> std::io::Error {
    match e {
        CheckpointError::Sink(e) => e,
        e => std::io::Error::other(e),
    }
}

impl snapshot::MemorySource for GuestImage<'_> {
    fn kind(&self) -> Kind {
        self.kind
    }

    fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    fn write_addresses(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for addr in &self.pages {
            out.write_all(&addr.to_le_bytes())?;
        }
        Ok(())
    }

    fn write_bytes(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        match self.kind {
            Kind::Full => {
                for_each_chunk(self.mem, |_, chunk| out.write_all(chunk)).map_err(to_io)?
            }
            Kind::Diff => {
                let mut page = [0u8; PAGE_SIZE as usize];
                let page = &mut page[..];
                for &addr in &self.pages {
                    self.mem
                        .read_slice(page, GuestAddress(addr))
                        .map_err(mem_err)?;
                    out.write_all(page)?;
                }
            }
        }
        Ok(())
    }
}

/// What a VM's snapshots record about where they stand: the VM instance
/// (a restored VM continues its chain's), the snapshot its dirty log
/// counts from (what a diff follows), and its disks.
pub(super) struct SnapshotLineage {
    pub instance: snapshot::Id,
    pub follows: Option<snapshot::Id>,
    pub disks: Vec<std::path::PathBuf>,
}

impl SnapshotLineage {
    pub(super) fn new(disks: Vec<std::path::PathBuf>) -> Self {
        Self {
            instance: snapshot::new_id(),
            follows: None,
            disks,
        }
    }

    fn stamps(&self) -> std::io::Result<Vec<snapshot::DiskStamp>> {
        self.disks
            .iter()
            .map(|d| snapshot::DiskStamp::of(d))
            .collect()
    }
}

impl RunningVm {
    /// Writes a snapshot of the paused VM to `path`; returns its size.
    /// A diff holds the pages dirtied since the previous snapshot (which
    /// needs `--track-dirty-pages`); a full one holds all memory and starts
    /// the next diff's count afresh. If writing fails, the dirty pages it
    /// took are put back for the next snapshot.
    pub fn snapshot(&mut self, kind: Kind, path: &Path) -> Result<u64, VmError> {
        self.require_paused("a snapshot")?;
        if kind == Kind::Diff && !self.dirty.is_logging() {
            return Err(VmError::Refused(
                "a diff snapshot needs dirty tracking: start vmm with --track-dirty-pages".into(),
            ));
        }
        let parent = match kind {
            Kind::Full => None,
            Kind::Diff => Some(self.lineage.follows.ok_or_else(|| {
                VmError::Refused(
                    "a diff snapshot follows a full one or a restore: take a full snapshot first"
                        .into(),
                )
            })?),
        };
        let lineage = snapshot::Lineage {
            id: snapshot::new_id(),
            instance: self.lineage.instance,
            parent,
            disks: self.lineage.stamps().map_err(|source| {
                VmError::Snapshot(snapshot::SnapshotError::Write {
                    path: path.to_path_buf(),
                    source,
                })
            })?,
        };
        let state = self.save_state()?;
        let maps = if self.dirty.is_logging() {
            Some(self.dirty.take(&self.vm_fd, &self.mem)?)
        } else {
            None
        };
        let pages = match (&maps, kind) {
            (Some(set), Kind::Diff) => set.pages(),
            _ => Vec::new(),
        };
        let source = GuestImage {
            mem: &self.mem,
            kind,
            pages,
        };
        let result =
            snapshot::write(path, &self.layout, &lineage, &state, &source).map_err(VmError::from);
        match (&result, maps) {
            (Ok(_), _) => self.lineage.follows = Some(lineage.id),
            (Err(_), Some(set)) => self.put_back_dirty(set),
            (Err(_), None) => {}
        }
        result
    }

    /// Guest-physical addresses dirtied since the last snapshot, without
    /// consuming them (tests and diagnostics).
    pub fn peek_dirty_pages(&mut self) -> Result<Vec<u64>, VmError> {
        let set = self.take_dirty()?;
        let pages = set.pages();
        self.put_back_dirty(set);
        Ok(pages)
    }

    /// A hash of guest memory and every vCPU and device state, leaving out
    /// what runs on its own while paused (TSC, clocks, timer counts). Two
    /// VMs with equal hashes are indistinguishable to their guests. The
    /// parts (memory, each vCPU, VM, each device) are hashed separately
    /// too, to tell where two VMs differ.
    pub fn state_hash(&self) -> Result<StateHash, VmError> {
        self.require_paused("a state hash")?;
        let st = self.save_state()?;
        self.state_hash_of(&st)
    }

    /// The state hash of `st` (a state [`RunningVm::save_state`] returned)
    /// with this paused VM's memory: the hash of exactly what a checkpoint
    /// sent, even if the paused VM's own state has moved since (an
    /// interrupt KVM delivered late).
    pub fn state_hash_of(&self, st: &MachineState) -> Result<StateHash, VmError> {
        self.require_paused("a state hash")?;
        let encode = |what: &str, value: &dyn erased::Encode| -> Result<u64, VmError> {
            value
                .encode()
                .map(|bytes| xxhash_rust::xxh3::xxh3_64(&bytes))
                .map_err(|e| VmError::Io {
                    what: "the state hash's encoding",
                    source: std::io::Error::other(format!("{what}: {e}")),
                })
        };
        let mut parts = Vec::new();
        for (i, v) in st.vcpus.iter().enumerate() {
            parts.push((format!("vcpu{i}"), encode("a vCPU", &v.timeless())?));
        }
        parts.push(("vm".to_string(), encode("the VM", &st.vm.timeless())?));
        parts.push(("serial".to_string(), encode("the serial port", &st.serial)?));
        parts.push(("i8042".to_string(), encode("the i8042", &st.i8042)?));
        for (dev, ts) in self.virtio.iter().zip(&st.virtio) {
            parts.push((dev.name.clone(), encode(&dev.name, ts)?));
        }
        // KVM rewrites each vCPU's kvmclock area whenever it likes (on
        // restore, on entry): time, like the TSC, is not part of the hash.
        let clocks: Vec<(u64, u64)> = st
            .vcpus
            .iter()
            .flat_map(|v| v.msrs.iter())
            .filter_map(|&(index, value)| state::kvm_time_area(index, value))
            .collect();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for_each_chunk(&self.mem, |start, chunk| {
            let end = start + chunk.len() as u64;
            for &(addr, len) in &clocks {
                let (lo, hi) = (addr.max(start), (addr + len).min(end));
                if lo < hi {
                    chunk[(lo - start) as usize..(hi - start) as usize].fill(0);
                }
            }
            h.update(chunk);
            Ok(())
        })?;
        parts.insert(0, ("memory".to_string(), h.digest()));
        let mut total = xxhash_rust::xxh3::Xxh3::new();
        for (name, part) in &parts {
            total.update(name.as_bytes());
            total.update(&part.to_le_bytes());
        }
        Ok(StateHash {
            hash: total.digest(),
            parts,
        })
    }
}

/// A state hash and its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHash {
    pub hash: u64,
    /// (part, hash): memory, vcpuN, vm, serial, i8042, each virtio device.
    pub parts: Vec<(String, u64)>,
}

impl StateHash {
    /// `{"hash": "<hex>", "parts": {"memory": "<hex>", ...}}`.
    pub fn to_json(&self) -> String {
        let parts: serde_json::Map<String, serde_json::Value> = self
            .parts
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(format!("{v:016x}"))))
            .collect();
        serde_json::json!({ "hash": format!("{:016x}", self.hash), "parts": parts }).to_string()
    }
}

/// Postcard encoding behind a trait object.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Result<Vec<u8>, postcard::Error>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
            postcard::to_stdvec(self)
        }
    }
}

impl Vm {
    /// Loads a snapshot chain (full, then diffs), opened and checked by
    /// [`snapshot::open_chain`], into this VM, which was created with the
    /// same layout and has not started. Checks the chain against the VM
    /// (layout, machine identity, page addresses, every vCPU and device
    /// state) before applying anything, then streams each file's memory
    /// straight into the guest, every chunk verified before it is written.
    /// A chunk that fails its check half-way leaves a VM that must not run:
    /// the caller discards it.
    pub fn restore(&mut self, chain: Vec<SnapshotFile>, source: &Path) -> Result<(), VmError> {
        let Some(last) = chain.last() else {
            return Err(VmError::Refused("an empty restore chain".into()));
        };
        let mismatch = |what: String| {
            VmError::Snapshot(snapshot::SnapshotError::Mismatch {
                path: source.to_path_buf(),
                what,
            })
        };
        let target = Target {
            vm_fd: &self.vm_fd,
            mem: &self.mem,
            legacy: &self.legacy,
            virtio: &self.virtio,
            layout: &self.layout,
            ctx: &self.vcpu_ctx,
        };
        target
            .validate(&last.layout, &last.state, "the snapshot")
            .map_err(|e| mismatch(super::error_chain(&e)))?;
        for snap in &chain {
            check_pages(&self.mem, &snap.pages).map_err(|e| mismatch(e.to_string()))?;
        }
        // The disks must be those the snapshot was taken with, unchanged:
        // the guest's memory holds what it knows of them (acknowledged
        // writes, caches), and a disk written since would contradict it.
        if last.lineage.disks.len() != self.lineage.disks.len() {
            return Err(mismatch(format!(
                "it was taken with {} disks, this VM has {}",
                last.lineage.disks.len(),
                self.lineage.disks.len()
            )));
        }
        for (i, (then, path)) in last
            .lineage
            .disks
            .iter()
            .zip(&self.lineage.disks)
            .enumerate()
        {
            let now = snapshot::DiskStamp::of(path).map_err(|e| {
                mismatch(format!(
                    "cannot check disk blk{i} ({}): {e}",
                    path.display()
                ))
            })?;
            if (now.dev, now.ino) != (then.dev, then.ino) {
                return Err(mismatch(format!(
                    "disk blk{i} ({}) is not the file the snapshot was taken with",
                    path.display()
                )));
            }
            if now != *then {
                return Err(mismatch(format!(
                    "disk blk{i} ({}) changed since the snapshot was taken \
                     (restoring would lose or contradict what was written since)",
                    path.display()
                )));
            }
        }
        let (instance, follows) = (last.lineage.instance, last.lineage.id);
        let state = last.state.clone();
        for mut snap in chain {
            match snap.kind {
                snapshot::Kind::Full => {
                    let mut regions = Vec::new();
                    for region in self.mem.iter() {
                        let host = region
                            .get_host_address(vm_memory::MemoryRegionAddress(0))
                            .map_err(|e| VmError::Io {
                                what: "guest memory's host mapping",
                                source: std::io::Error::other(e),
                            })?;
                        // SAFETY: a live mapping of `region.len()` bytes that
                        // `self.mem` owns; the VM has not started, so no vCPU
                        // or device thread touches it while this slice lives.
                        regions.push(unsafe {
                            std::slice::from_raw_parts_mut(host, region.len() as usize)
                        });
                    }
                    snap.read_full_into(&mut regions)?;
                }
                snapshot::Kind::Diff => {
                    let mem = &self.mem;
                    snap.read_memory(|addr, page| write_guest(mem, addr, page, source))?;
                }
            }
            snap.finish()?;
        }
        // Writing the image is not a change the next diff should carry.
        for region in self.mem.iter() {
            vm_memory::MmapRegion::bitmap(region).reset();
        }
        target.apply(&state, |states| {
            for (vcpu, vs) in self.vcpus.iter().zip(states) {
                state::restore_vcpu(vcpu.fd(), vs, &self.vcpu_ctx)?;
            }
            Ok(())
        })?;
        // The restored VM continues the chain: its next diff follows the
        // last snapshot restored.
        self.lineage.instance = instance;
        self.lineage.follows = Some(follows);
        tracing::info!(source = %source.display(), "VM state restored");
        Ok(())
    }
}

/// Writes verified snapshot bytes at `addr`, which may span regions only
/// as the full image does (a piece never crosses a region's end: pieces
/// are at most 1 MiB and regions are MiB-aligned).
fn write_guest(
    mem: &GuestMemory,
    addr: u64,
    bytes: &[u8],
    path: &Path,
) -> Result<(), snapshot::SnapshotError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| snapshot::SnapshotError::Malformed {
            path: path.to_path_buf(),
            what: format!("cannot write guest memory at {addr:#x}: {e}"),
        })
}
