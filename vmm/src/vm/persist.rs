//! Snapshots, restores, dirty-page tracking and state hashes.
//!
//! Everything here runs on a paused VM: vCPUs parked (their state read and
//! written by jobs on their own threads) and the device thread parked
//! between two events, so queue indices and device registers are
//! consistent with guest memory.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use devices::Persist;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use super::state::{self, VcpuState};
use super::vcpu::VcpuCommand;
use super::{RunState, RunningVm, Vm, VmError};
use crate::snapshot::{self, Kind, MachineState, Memory, Snapshot, PAGE_SIZE};
use vm_memory::Address;

/// How long a paused vCPU may take to run a state job.
const JOB_TIMEOUT: Duration = Duration::from_secs(10);

/// Per memory slot, one bit per 4 KiB page.
type Bitmaps = Vec<Vec<u64>>;

/// Pages dirtied since the last committed snapshot: KVM's dirty log (the
/// guest's writes) ∪ vm-memory's bitmap (the VMM's writes) ∪ pages taken
/// by a snapshot that then failed.
pub(super) struct DirtyTracker {
    enabled: bool,
    carried: Option<Bitmaps>,
}

impl DirtyTracker {
    pub(super) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            carried: None,
        }
    }

    /// Reads and clears both logs; the caller commits the result or puts
    /// it back with [`DirtyTracker::put_back`].
    fn take(&mut self, vm_fd: &kvm_ioctls::VmFd, mem: &GuestMemory) -> Result<Bitmaps, VmError> {
        let mut maps = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let len = region.len() as usize;
            let mut map = vm_fd
                .get_dirty_log(slot as u32, len)
                .map_err(super::kvm_err("KVM_GET_DIRTY_LOG"))?;
            or_into(
                &mut map,
                vm_memory::MmapRegion::bitmap(region).get_and_reset(),
            );
            maps.push(map);
        }
        if let Some(carried) = self.carried.take() {
            for (map, old) in maps.iter_mut().zip(carried) {
                or_into(map, old);
            }
        }
        Ok(maps)
    }

    /// Returns bits a failed snapshot took, so the next one still sees them.
    fn put_back(&mut self, maps: Bitmaps) {
        self.carried = Some(match self.carried.take() {
            None => maps,
            Some(mut old) => {
                for (a, b) in old.iter_mut().zip(maps) {
                    or_into(a, b);
                }
                old
            }
        });
    }
}

/// Sets in `dst` every bit set in `src`.
fn or_into(dst: &mut [u64], src: Vec<u64>) {
    for (word, extra) in dst.iter_mut().zip(src) {
        *word |= extra;
    }
}

/// Guest-physical addresses of the pages set in `maps`.
fn dirty_pages(mem: &GuestMemory, maps: &Bitmaps) -> Vec<u64> {
    let mut pages = Vec::new();
    for (region, map) in mem.iter().zip(maps) {
        let base = region.start_addr().0;
        for (i, &word) in map.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                let page = i as u64 * 64 + bit;
                if page * PAGE_SIZE < region.len() {
                    pages.push(base + page * PAGE_SIZE);
                }
                w &= w - 1;
            }
        }
    }
    pages
}

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

/// Calls `f` with all RAM, in address order, a chunk of at most 1 MiB at a
/// time with the chunk's guest-physical address.
fn for_each_chunk(
    mem: &GuestMemory,
    mut f: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            let n = (region.len() - at).min(buf.len() as u64) as usize;
            let start = region.start_addr().unchecked_add(at);
            mem.read_slice(&mut buf[..n], start).map_err(mem_err)?;
            f(start.0, &mut buf[..n])?;
            at += n as u64;
        }
    }
    Ok(())
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
            Kind::Full => for_each_chunk(self.mem, |_, chunk| out.write_all(chunk))?,
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

impl RunningVm {
    /// Runs `job` on every (paused) vCPU's thread, in vCPU order.
    fn on_vcpus<T: Send + 'static>(
        &self,
        job: impl Fn(&kvm_ioctls::VcpuFd) -> Result<T, state::StateError>
            + Send
            + Sync
            + Clone
            + 'static,
    ) -> Result<Vec<T>, VmError> {
        let mut out = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            let (tx, rx) = mpsc::channel();
            let job = job.clone();
            handle.send(VcpuCommand::Job(Box::new(move |fd| {
                let _ = tx.send(job(fd));
            })));
            let result = rx.recv_timeout(JOB_TIMEOUT).map_err(|_| {
                VmError::Refused(format!("vCPU {} did not run its state job", handle.index()))
            })?;
            out.push(result?);
        }
        Ok(out)
    }

    fn require_paused(&self, what: &str) -> Result<(), VmError> {
        match self.handle.state() {
            RunState::Paused => Ok(()),
            _ => Err(VmError::Refused(format!("{what} needs a paused VM"))),
        }
    }

    /// Every vCPU and device state.
    fn machine_state(&self) -> Result<MachineState, VmError> {
        let indices = self.msr_indices.clone();
        let vcpus: Vec<VcpuState> = self.on_vcpus(move |fd| state::save_vcpu(fd, &indices))?;
        Ok(MachineState {
            vcpus,
            vm: state::save_vm(&self.vm_fd)?,
            serial: devices::lock(&self.legacy.serial).save(),
            i8042: devices::lock(&self.legacy.i8042).save(),
            virtio: self
                .virtio
                .iter()
                .map(|d| devices::lock(&d.transport).save())
                .collect(),
        })
    }

    /// Writes a snapshot of the paused VM to `path`; returns its size.
    /// A diff holds the pages dirtied since the previous snapshot (which
    /// needs `--track-dirty-pages`); a full one holds all memory and starts
    /// the next diff's count afresh. If writing fails, the dirty pages it
    /// took are put back for the next snapshot.
    pub fn snapshot(&mut self, kind: Kind, path: &Path) -> Result<u64, VmError> {
        self.require_paused("a snapshot")?;
        if kind == Kind::Diff && !self.dirty.enabled {
            return Err(VmError::Refused(
                "a diff snapshot needs dirty tracking: start vmm with --track-dirty-pages".into(),
            ));
        }
        let state = self.machine_state()?;
        let maps = if self.dirty.enabled {
            Some(self.dirty.take(&self.vm_fd, &self.mem)?)
        } else {
            None
        };
        let pages = match (&maps, kind) {
            (Some(maps), Kind::Diff) => dirty_pages(&self.mem, maps),
            _ => Vec::new(),
        };
        let source = GuestImage {
            mem: &self.mem,
            kind,
            pages,
        };
        let result = snapshot::write(path, &self.layout, &state, &source).map_err(VmError::from);
        if result.is_err() {
            if let Some(maps) = maps {
                self.dirty.put_back(maps);
            }
        }
        result
    }

    /// Guest-physical addresses dirtied since the last snapshot, without
    /// consuming them (tests and diagnostics).
    pub fn peek_dirty_pages(&mut self) -> Result<Vec<u64>, VmError> {
        if !self.dirty.enabled {
            return Err(VmError::Refused(
                "dirty tracking is off (--track-dirty-pages)".into(),
            ));
        }
        let maps = self.dirty.take(&self.vm_fd, &self.mem)?;
        let pages = dirty_pages(&self.mem, &maps);
        self.dirty.put_back(maps);
        Ok(pages)
    }

    /// A hash of guest memory and every vCPU and device state, leaving out
    /// what runs on its own while paused (TSC, clocks, timer counts). Two
    /// VMs with equal hashes are indistinguishable to their guests. The
    /// parts (memory, each vCPU, VM, each device) are hashed separately
    /// too, to tell where two VMs differ.
    pub fn state_hash(&self) -> Result<StateHash, VmError> {
        self.require_paused("a state hash")?;
        let st = self.machine_state()?;
        let encode = |what: &str, value: &dyn erased::Encode| -> Result<u64, VmError> {
            value
                .encode()
                .map(|bytes| xxhash_rust::xxh3::xxh3_64(&bytes))
                .map_err(|e| VmError::Refused(format!("cannot encode {what}: {e}")))
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
        })
        .map_err(|e| VmError::Refused(e.to_string()))?;
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
    /// Loads a verified snapshot chain (full, then diffs) into this VM,
    /// which was created with the same layout and has not started. Checks
    /// the whole chain against the VM before applying anything.
    pub fn restore(&mut self, chain: &[Snapshot], source: &Path) -> Result<(), VmError> {
        let mismatch = |what: String| {
            VmError::Snapshot(snapshot::SnapshotError::Mismatch {
                path: source.to_path_buf(),
                what,
            })
        };
        let Some(last) = chain.last() else {
            return Err(VmError::Refused("an empty restore chain".into()));
        };
        if last.layout != self.layout {
            return Err(mismatch(format!(
                "the snapshot has {} MiB, {} vCPUs and devices {:?}; this VM has {} MiB, {} vCPUs and devices {:?}",
                last.layout.mem_size >> 20,
                last.layout.vcpus,
                last.layout.devices,
                self.layout.mem_size >> 20,
                self.layout.vcpus,
                self.layout.devices
            )));
        }
        for snap in chain {
            if let Memory::Diff(pages) = &snap.memory {
                if let Some((addr, _)) = pages.iter().find(|(a, _)| {
                    !GuestMemoryBackend::check_range(
                        &self.mem,
                        GuestAddress(*a),
                        PAGE_SIZE as usize,
                    )
                }) {
                    return Err(mismatch(format!("page {addr:#x} is outside guest memory")));
                }
            }
        }
        // Memory: the full image, then each diff's pages.
        for snap in chain {
            match &snap.memory {
                Memory::Full(bytes) => {
                    let mut at = 0usize;
                    for region in self.mem.iter() {
                        let len = region.len() as usize;
                        self.mem
                            .write_slice(&bytes[at..at + len], region.start_addr())
                            .map_err(|e| {
                                VmError::Refused(format!("cannot write guest memory: {e}"))
                            })?;
                        at += len;
                    }
                }
                Memory::Diff(pages) => {
                    for (addr, page) in pages {
                        self.mem
                            .write_slice(page, GuestAddress(*addr))
                            .map_err(|e| {
                                VmError::Refused(format!("cannot write page {addr:#x}: {e}"))
                            })?;
                    }
                }
            }
        }
        // Writing the image is not a change the next diff should carry.
        for region in self.mem.iter() {
            vm_memory::MmapRegion::bitmap(region).reset();
        }
        let st = &last.state;
        state::restore_vm(&self.vm_fd, &st.vm)?;
        for (vcpu, vs) in self.vcpus.iter().zip(&st.vcpus) {
            state::restore_vcpu(vcpu.fd(), vs)?;
        }
        let restore_err = |what: &str| {
            let what = what.to_string();
            move |source| VmError::Restore { what, source }
        };
        devices::lock(&self.legacy.serial)
            .restore(&st.serial)
            .map_err(restore_err("the serial port"))?;
        devices::lock(&self.legacy.i8042)
            .restore(&st.i8042)
            .map_err(restore_err("the i8042"))?;
        for (dev, ts) in self.virtio.iter().zip(&st.virtio) {
            devices::lock(&dev.transport)
                .restore(ts)
                .map_err(restore_err(&dev.name))?;
        }
        tracing::info!(
            snapshots = chain.len(),
            source = %source.display(),
            "VM state restored"
        );
        Ok(())
    }
}
