//! The checkpoint API: what replication (and the snapshot file) drives on a
//! running VM, with no file format and no KVM type in its interface.
//!
//! What a caller may rely on:
//! - Every operation but the dirty log's switch needs a **paused** VM
//!   ([`RunningVm::pause`]): vCPUs parked, the device thread parked between
//!   two events, so memory, queue indices and registers agree.
//! - [`RunningVm::save_state`] reads every vCPU (the jobs run in parallel,
//!   each on its vCPU's thread), then the VM-wide state, then the devices.
//! - [`RunningVm::take_dirty`] hands out the pages dirtied since the last
//!   take: KVM's log (the guest's writes) ∪ vm-memory's bitmap (the VMM's
//!   writes: device DMA) ∪ whatever was put back. It is transactional: if
//!   reading any slot fails, every bit already read goes back, nothing is
//!   lost; a caller that cannot use a set it took returns it with
//!   [`RunningVm::put_back_dirty`], and the next take includes it.
//!   [`RunningVm::set_dirty_logging`] switches KVM's log on or off on a
//!   running VM; pages written before it was switched on are not in it (a
//!   caller copies all memory once after switching on).
//! - [`RunningVm::copy_pages`] and [`RunningVm::copy_memory`] copy guest
//!   memory into any [`PageSink`] (a [`PageBuffer`], any `io::Write` through
//!   [`WriteSink`]: a socket, a file), in address order, with no `Seek`.
//! - [`RunningVm::load`] puts a state and pages into a live, paused VM of
//!   the same layout. Everything is validated first (layout and machine
//!   identity, page addresses, every vCPU and device state); a refusal
//!   leaves the VM untouched. Then memory, the VM-wide state (interrupt
//!   controllers, PIT, clock), the vCPUs and last the devices are applied:
//!   devices after the interrupt controllers, because a transport's restore
//!   re-raises its pending interrupt. The queues are kicked when the VM
//!   next resumes (work whose notification sat in an ioeventfd). A KVM
//!   refusal after validation leaves a half-loaded VM: the error is
//!   [`CheckpointError::Fatal`], and the VM refuses to resume (fail-stop).

use std::io;
use std::sync::mpsc;
use std::time::Duration;

use devices::{Persist, PersistError};
use kvm_ioctls::VmFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::machine::{Layout, MachineState};
use super::memory::{self, GuestMemory};
use super::state::{self, StateError, VcpuContext, VcpuState};
use super::vcpu::VcpuCommand;
use super::virtio::AttachedDevice;
use super::{Legacy, RunState, RunningVm};

/// The page size dirty sets and page buffers count in.
pub const PAGE_SIZE: u64 = 4096;

/// How long a paused vCPU may take to run a state job.
const JOB_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0} needs a paused VM")]
    NotPaused(&'static str),
    #[error("dirty logging is off")]
    LoggingOff,
    #[error("cannot read the dirty log of memory slot {slot}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot switch dirty logging")]
    Logging(#[source] memory::MemoryError),
    #[error("the state does not fit this VM: {0}")]
    Mismatch(String),
    #[error("bad page list: {0}")]
    Pages(String),
    #[error("cannot access guest memory at {addr:#x}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write to the page sink")]
    Sink(#[source] io::Error),
    #[error("{what}'s state")]
    Device {
        what: String,
        #[source]
        source: PersistError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("vCPU {0} did not run its state job")]
    VcpuJob(usize),
    #[error("loading failed half-way; the VM cannot run on")]
    Fatal(#[source] Box<CheckpointError>),
    #[error("a load failed half-way earlier: the VM cannot run on")]
    Broken,
    #[error("cannot re-register irqfd of IRQ {irq}")]
    Irqfd {
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot map a copy of guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

// ---------------------------------------------------------------------------
// The dirty log.

/// The KVM call the dirty log makes for one slot: read and clear its log.
/// A seam, so the take/put-back algebra is testable without KVM.
pub trait SlotLog {
    /// The slot's log (one bit per page, `len` bytes of memory), cleared.
    fn take_slot_log(&self, slot: u32, len: usize) -> Result<Vec<u64>, kvm_ioctls::Error>;
}

impl SlotLog for VmFd {
    fn take_slot_log(&self, slot: u32, len: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.get_dirty_log(slot, len)
    }
}

/// Pages dirtied in a span of time: per memory region, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    /// (region start, region length, bitmap).
    regions: Vec<(u64, u64, Vec<u64>)>,
}

impl DirtySet {
    /// An empty set shaped like `mem`.
    fn empty(mem: &GuestMemory) -> Self {
        Self {
            regions: mem
                .iter()
                .map(|r| {
                    let pages = r.len().div_ceil(PAGE_SIZE);
                    (
                        r.start_addr().0,
                        r.len(),
                        vec![0; pages.div_ceil(64) as usize],
                    )
                })
                .collect(),
        }
    }

    /// Adds every page of `other` (of the same shape).
    fn merge(&mut self, other: &DirtySet) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            or_into(&mut mine.2, &theirs.2);
        }
    }

    /// Guest-physical addresses of the pages, ascending.
    pub fn pages(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (base, len, map) in &self.regions {
            for (i, &word) in map.iter().enumerate() {
                let mut w = word;
                while w != 0 {
                    let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                    if page * PAGE_SIZE < *len {
                        pages.push(base + page * PAGE_SIZE);
                    }
                    w &= w - 1;
                }
            }
        }
        pages
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|(_, _, map)| map)
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// True when no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sets in `dst` every bit set in `src`.
fn or_into(dst: &mut [u64], src: &[u64]) {
    for (word, extra) in dst.iter_mut().zip(src) {
        *word |= extra;
    }
}

/// The dirty-page tracker of a VM: KVM's log ∪ the VMM's bitmap ∪ pages
/// put back.
pub(super) struct DirtyLog {
    logging: bool,
    carried: Option<DirtySet>,
}

impl DirtyLog {
    pub(super) fn new(logging: bool) -> Self {
        Self {
            logging,
            carried: None,
        }
    }

    pub(super) fn is_logging(&self) -> bool {
        self.logging
    }

    /// Reads and clears both logs, slot by slot. If a slot fails, what was
    /// read so far goes back into the carried set: nothing is lost.
    pub(super) fn take(
        &mut self,
        kvm: &dyn SlotLog,
        mem: &GuestMemory,
    ) -> Result<DirtySet, CheckpointError> {
        if !self.logging {
            return Err(CheckpointError::LoggingOff);
        }
        let mut set = DirtySet::empty(mem);
        for (slot, region) in mem.iter().enumerate() {
            match kvm.take_slot_log(slot as u32, region.len() as usize) {
                Ok(map) => or_into(&mut set.regions[slot].2, &map),
                Err(source) => {
                    self.put_back(set);
                    return Err(CheckpointError::DirtyLog {
                        slot: slot as u32,
                        source,
                    });
                }
            }
            let vmm = vm_memory::MmapRegion::bitmap(region).get_and_reset();
            or_into(&mut set.regions[slot].2, &vmm);
        }
        if let Some(carried) = self.carried.take() {
            set.merge(&carried);
        }
        Ok(set)
    }

    /// Returns a set taken and not used: the next take includes it.
    pub(super) fn put_back(&mut self, set: DirtySet) {
        match &mut self.carried {
            Some(carried) => carried.merge(&set),
            None => self.carried = Some(set),
        }
    }
}

// ---------------------------------------------------------------------------
// Page sinks.

/// Where copied guest memory goes.
pub trait PageSink {
    /// `data` is guest memory at `addr`: a whole number of pages, in
    /// ascending address order across calls.
    fn put(&mut self, addr: u64, data: &[u8]) -> io::Result<()>;
}

/// A sink that writes the bytes only (the addresses travel separately,
/// e.g. up front), to any `io::Write`.
pub struct WriteSink<W: io::Write>(pub W);

impl<W: io::Write> PageSink for WriteSink<W> {
    fn put(&mut self, _addr: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }
}

/// Pages in memory: addresses and their bytes. A sink for copying out and
/// the source [`RunningVm::load`] takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageBuffer {
    addrs: Vec<u64>,
    data: Vec<u8>,
}

impl PageBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer of `addrs` and their bytes (`PAGE_SIZE` each, in order).
    pub fn from_parts(addrs: Vec<u64>, data: Vec<u8>) -> Result<Self, CheckpointError> {
        check_room(&addrs, data.len())?;
        Ok(Self { addrs, data })
    }

    /// The page addresses, in the order they were added.
    pub fn addrs(&self) -> &[u64] {
        &self.addrs
    }

    /// The bytes of every page, in address-list order.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// (address, bytes) of each page.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.addrs
            .iter()
            .copied()
            .zip(self.data.chunks_exact(PAGE_SIZE as usize))
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// True when it holds no page.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The addresses and the bytes, taken apart.
    pub fn into_parts(self) -> (Vec<u64>, Vec<u8>) {
        (self.addrs, self.data)
    }

    /// Forgets the pages, keeping the allocation.
    pub fn clear(&mut self) {
        self.addrs.clear();
        self.data.clear();
    }
}

impl PageSink for PageBuffer {
    fn put(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 % PAGE_SIZE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a whole number of pages",
            ));
        }
        let pages = data.len() as u64 / PAGE_SIZE;
        self.addrs.extend((0..pages).map(|i| addr + i * PAGE_SIZE));
        self.data.extend_from_slice(data);
        Ok(())
    }
}

/// Largest run of memory handed to a sink in one call.
const CHUNK: usize = 1 << 20;

/// Calls `f` with all RAM, in address order, a chunk of at most 1 MiB at a
/// time with the chunk's guest-physical address.
pub(super) fn for_each_chunk(
    mem: &GuestMemory,
    mut f: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Result<(), CheckpointError> {
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            let n = (region.len() - at).min(CHUNK as u64) as usize;
            let start = region.start_addr().unchecked_add(at);
            mem.read_slice(&mut buf[..n], start)
                .map_err(|source| CheckpointError::Memory {
                    addr: start.0,
                    source,
                })?;
            f(start.0, &mut buf[..n]).map_err(CheckpointError::Sink)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Refuses a page list with an unaligned page or one outside `mem`.
pub(super) fn check_pages(mem: &GuestMemory, addrs: &[u64]) -> Result<(), CheckpointError> {
    for &addr in addrs {
        if addr % PAGE_SIZE != 0 {
            return Err(CheckpointError::Pages(format!(
                "unaligned page address {addr:#x}"
            )));
        }
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), PAGE_SIZE as usize) {
            return Err(CheckpointError::Pages(format!(
                "page {addr:#x} is outside guest memory"
            )));
        }
    }
    Ok(())
}

/// `addrs.len()` pages of room in `out`, or a refusal.
fn check_room(addrs: &[u64], bytes: usize) -> Result<(), CheckpointError> {
    if bytes as u64 == addrs.len() as u64 * PAGE_SIZE {
        return Ok(());
    }
    Err(CheckpointError::Pages(format!(
        "{bytes} bytes for {} pages",
        addrs.len()
    )))
}

/// Copies the pages at `addrs` (checked) into `out` (`addrs.len()`
/// pages, in the list's order), one read per run of consecutive pages.
/// On a running VM a page the guest writes meanwhile may be torn (live
/// pre-copy sends it again).
pub fn read_pages(mem: &GuestMemory, addrs: &[u64], out: &mut [u8]) -> Result<(), CheckpointError> {
    check_pages(mem, addrs)?;
    check_room(addrs, out.len())?;
    // A run of consecutive pages is one read (vm-memory crosses region
    // boundaries itself; every page was checked above).
    for (i, start, n) in page_runs(addrs, usize::MAX) {
        let bytes = &mut out[i * PAGE_SIZE as usize..(i + n) * PAGE_SIZE as usize];
        mem.read_slice(bytes, GuestAddress(start))
            .map_err(|source| CheckpointError::Memory {
                addr: start,
                source,
            })?;
    }
    Ok(())
}

/// The runs of consecutive pages in `addrs`, at most `max` pages each:
/// (index in `addrs`, first address, pages).
fn page_runs(addrs: &[u64], max: usize) -> impl Iterator<Item = (usize, u64, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *addrs.get(i)?;
        let mut n = 1;
        while n < max
            && addrs
                .get(i + n)
                .is_some_and(|&a| a == start + n as u64 * PAGE_SIZE)
        {
            n += 1;
        }
        i += n;
        Some((i - n, start, n))
    })
}

/// Writes `data` (`addrs.len()` pages) at `addrs`, all checked first: for
/// memory nothing runs on yet (a replica filled before its first load).
pub fn write_pages(mem: &GuestMemory, addrs: &[u64], data: &[u8]) -> Result<(), CheckpointError> {
    check_pages(mem, addrs)?;
    check_room(addrs, data.len())?;
    write_checked_pages(mem, addrs, data)
}

/// Writes pages whose addresses and length were checked.
fn write_checked_pages(
    mem: &GuestMemory,
    addrs: &[u64],
    data: &[u8],
) -> Result<(), CheckpointError> {
    for (&addr, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE as usize)) {
        mem.write_slice(page, GuestAddress(addr))
            .map_err(|source| CheckpointError::Memory { addr, source })?;
    }
    Ok(())
}

/// Copies the listed pages into `sink`.
pub(super) fn copy_pages(
    mem: &GuestMemory,
    addrs: &[u64],
    sink: &mut dyn PageSink,
) -> Result<(), CheckpointError> {
    check_pages(mem, addrs)?;
    let mut page = [0u8; PAGE_SIZE as usize];
    for &addr in addrs {
        mem.read_slice(&mut page, GuestAddress(addr))
            .map_err(|source| CheckpointError::Memory { addr, source })?;
        sink.put(addr, &page).map_err(CheckpointError::Sink)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Validating and applying a machine state: shared by the live load and
// the restore of a VM that has not started.

/// The parts of a VM a state is checked against and applied to.
pub(super) struct Target<'a> {
    pub vm_fd: &'a VmFd,
    pub mem: &'a GuestMemory,
    pub legacy: &'a Legacy,
    pub virtio: &'a [AttachedDevice],
    pub layout: &'a Layout,
    pub ctx: &'a VcpuContext,
}

fn device_err(what: &str) -> impl FnOnce(PersistError) -> CheckpointError + '_ {
    move |source| CheckpointError::Device {
        what: what.to_string(),
        source,
    }
}

impl Target<'_> {
    /// Checks everything about `state` (from `what`: "the snapshot") that
    /// can be checked without applying it.
    pub(super) fn validate(
        &self,
        layout: &Layout,
        state: &MachineState,
        what: &str,
    ) -> Result<(), CheckpointError> {
        layout
            .check_fits(self.layout, what)
            .map_err(CheckpointError::Mismatch)?;
        state
            .check_consistent(layout)
            .map_err(|e| CheckpointError::Mismatch(format!("{what} is inconsistent: {e}")))?;
        for v in &state.vcpus {
            state::check_vcpu(v, self.ctx)?;
        }
        devices::lock(&self.legacy.serial)
            .validate(&state.serial)
            .map_err(device_err("the serial port"))?;
        devices::lock(&self.legacy.i8042)
            .validate(&state.i8042)
            .map_err(device_err("the i8042"))?;
        for (dev, ts) in self.virtio.iter().zip(&state.virtio) {
            devices::lock(&dev.transport)
                .validate(ts)
                .map_err(device_err(&dev.name))?;
        }
        Ok(())
    }

    /// Applies a validated state: the VM-wide state, the vCPUs (through
    /// `restore_vcpus`), then the devices, whose restore may re-raise an
    /// interrupt and so needs the interrupt controllers in place.
    pub(super) fn apply(
        &self,
        state: &MachineState,
        restore_vcpus: impl FnOnce(&[VcpuState]) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        state::restore_vm(self.vm_fd, &state.vm)?;
        restore_vcpus(&state.vcpus)?;
        devices::lock(&self.legacy.serial)
            .restore(&state.serial)
            .map_err(device_err("the serial port"))?;
        devices::lock(&self.legacy.i8042)
            .restore(&state.i8042)
            .map_err(device_err("the i8042"))?;
        for (dev, ts) in self.virtio.iter().zip(&state.virtio) {
            devices::lock(&dev.transport)
                .restore(ts)
                .map_err(device_err(&dev.name))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The API on a running VM.

impl RunningVm {
    /// Runs `job` on every (paused) vCPU's thread, all at once; returns the
    /// results in vCPU order.
    pub(super) fn on_vcpus<T: Send + 'static>(
        &self,
        job: impl Fn(&kvm_ioctls::VcpuFd, usize) -> Result<T, StateError>
            + Send
            + Sync
            + Clone
            + 'static,
    ) -> Result<Vec<T>, CheckpointError> {
        let receivers: Vec<_> = self
            .handles
            .iter()
            .enumerate()
            .map(|(i, handle)| {
                let (tx, rx) = mpsc::channel();
                let job = job.clone();
                handle.send(VcpuCommand::Job(Box::new(move |fd| {
                    let _ = tx.send(job(fd, i));
                })));
                rx
            })
            .collect();
        let mut out = Vec::with_capacity(receivers.len());
        for (i, rx) in receivers.into_iter().enumerate() {
            let result = rx
                .recv_timeout(JOB_TIMEOUT)
                .map_err(|_| CheckpointError::VcpuJob(i))?;
            out.push(result?);
        }
        Ok(out)
    }

    pub(super) fn require_paused(&self, what: &'static str) -> Result<(), CheckpointError> {
        match self.handle.state() {
            RunState::Paused => Ok(()),
            _ => Err(CheckpointError::NotPaused(what)),
        }
    }

    /// The VM's layout: memory, vCPUs, devices and CPU identity.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Every vCPU (read in parallel), VM-wide and device state of the
    /// paused VM.
    pub fn save_state(&self) -> Result<MachineState, CheckpointError> {
        self.require_paused("saving the state")?;
        let ctx = self.vcpu_ctx.clone();
        let vcpus = self.on_vcpus(move |fd, _| state::save_vcpu(fd, &ctx))?;
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

    /// Switches KVM's dirty log on or off (the VM may run). Switching on
    /// starts an empty log; switching off forgets what was logged.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), CheckpointError> {
        memory::register(&self.vm_fd, &self.mem, on).map_err(CheckpointError::Logging)?;
        self.dirty.logging = on;
        if !on {
            self.dirty.carried = None;
        }
        Ok(())
    }

    /// Whether KVM's dirty log is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty.is_logging()
    }

    /// Waits, with the VM paused, until every interrupt a device raised
    /// before the pause has reached the irqchip.
    ///
    /// KVM injects an irqfd's interrupt from a kernel worker, so one
    /// signalled just before the pause can reach the LAPIC's IRR later,
    /// e.g. after a load set the LAPIC: the loaded VM then holds an
    /// interrupt its checkpoint does not (a COLO SVM's devices run up to
    /// the pause). Deassigning an irqfd waits for its worker; it is then
    /// assigned again. No device signals meanwhile: the VM is paused.
    pub fn settle_interrupts(&mut self) -> Result<(), CheckpointError> {
        self.require_paused("settling interrupts")?;
        let fds = std::iter::once((&self.legacy.serial_irq, devices::legacy::COM1_IRQ))
            .chain(self.virtio.iter().map(|d| (&d.irq_evt, d.irq)));
        for (evt, irq) in fds {
            let failed = |source| CheckpointError::Irqfd { irq, source };
            self.vm_fd.unregister_irqfd(evt, irq).map_err(failed)?;
            self.vm_fd.register_irqfd(evt, irq).map_err(failed)?;
        }
        Ok(())
    }

    /// The pages dirtied since the last take (see the module doc).
    /// A diff snapshot after this needs a full one first: the pages taken
    /// are no longer the snapshot file's to record.
    pub fn take_dirty(&mut self) -> Result<DirtySet, CheckpointError> {
        self.require_paused("taking the dirty pages")?;
        let set = self.dirty.take(&self.vm_fd, &self.mem)?;
        self.lineage.follows = None;
        Ok(set)
    }

    /// Like [`RunningVm::take_dirty`], on a running VM: for live pre-copy,
    /// where a page the guest writes while it is being copied is dirty
    /// again and goes again in the next round.
    pub fn take_dirty_running(&mut self) -> Result<DirtySet, CheckpointError> {
        let set = self.dirty.take(&self.vm_fd, &self.mem)?;
        self.lineage.follows = None;
        Ok(set)
    }

    /// Gives back a set [`RunningVm::take_dirty`] handed out and that was
    /// not used: the next take includes it.
    pub fn put_back_dirty(&mut self, set: DirtySet) {
        self.dirty.put_back(set);
    }

    /// Copies the pages at `addrs` into `sink`, in the list's order.
    pub fn copy_pages(
        &self,
        addrs: &[u64],
        sink: &mut dyn PageSink,
    ) -> Result<(), CheckpointError> {
        self.require_paused("copying pages")?;
        copy_pages(&self.mem, addrs, sink)
    }

    /// [`read_pages`] on the paused VM: the fast path of a checkpoint's
    /// pause, into a buffer the caller keeps warm.
    pub fn copy_pages_to(&self, addrs: &[u64], out: &mut [u8]) -> Result<(), CheckpointError> {
        self.require_paused("copying pages")?;
        read_pages(&self.mem, addrs, out)
    }

    /// Copies all guest memory into `sink`, in address order.
    pub fn copy_memory(&self, sink: &mut dyn PageSink) -> Result<(), CheckpointError> {
        self.require_paused("copying memory")?;
        for_each_chunk(&self.mem, |addr, chunk| sink.put(addr, chunk))
    }

    /// Loads `state` (of a VM of `layout`) and `pages` into this paused VM:
    /// all validated first, then applied (see the module doc).
    pub fn load(
        &mut self,
        layout: &Layout,
        state: &MachineState,
        pages: &PageBuffer,
    ) -> Result<(), CheckpointError> {
        self.load_with(layout, state, pages.addrs(), |mem| {
            write_checked_pages(mem, pages.addrs(), pages.data())
        })
    }

    /// Like [`RunningVm::load`], the pages at `addrs` coming from `from`,
    /// another mapping of this VM's layout (COLO's state cache).
    pub fn load_from(
        &mut self,
        layout: &Layout,
        state: &MachineState,
        from: &GuestMemory,
        addrs: &[u64],
    ) -> Result<(), CheckpointError> {
        check_pages(from, addrs)?;
        self.load_with(layout, state, addrs, |mem| {
            copy_checked_pages(from, mem, addrs)
        })
    }

    /// Everything [`RunningVm::load`] checks before it touches the VM,
    /// without loading.
    pub fn check_load(
        &self,
        layout: &Layout,
        state: &MachineState,
        addrs: &[u64],
    ) -> Result<(), CheckpointError> {
        self.require_paused("a load")?;
        if self.broken {
            return Err(CheckpointError::Broken);
        }
        self.target().validate(layout, state, "the checkpoint")?;
        check_pages(&self.mem, addrs)
    }

    fn target(&self) -> Target<'_> {
        Target {
            vm_fd: &self.vm_fd,
            mem: &self.mem,
            legacy: &self.legacy,
            virtio: &self.virtio,
            layout: &self.layout,
            ctx: &self.vcpu_ctx,
        }
    }

    /// The load: checks, then `write_pages` (the pages at `addrs`) and the
    /// state.
    fn load_with(
        &mut self,
        layout: &Layout,
        state: &MachineState,
        addrs: &[u64],
        write_pages: impl FnOnce(&GuestMemory) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        self.check_load(layout, state, addrs)?;
        let target = self.target();
        let applied = write_pages(target.mem).and_then(|()| {
            target.apply(state, |vcpus| {
                let vcpus = std::sync::Arc::new(vcpus.to_vec());
                let ctx = self.vcpu_ctx.clone();
                self.on_vcpus(move |fd, i| state::restore_vcpu(fd, &vcpus[i], &ctx))
                    .map(drop)
            })
        });
        if let Err(e) = applied {
            self.broken = true;
            tracing::error!("a load failed half-way: {e}; the VM cannot run on");
            return Err(CheckpointError::Fatal(Box::new(e)));
        }
        self.kick_on_resume = true;
        Ok(())
    }
}

/// Copies the pages at `addrs` (checked in both) from `from` into `to`,
/// two mappings of one layout, a run of consecutive pages at a time.
fn copy_checked_pages(
    from: &GuestMemory,
    to: &GuestMemory,
    addrs: &[u64],
) -> Result<(), CheckpointError> {
    let mut buf = vec![0u8; CHUNK];
    for (_, start, n) in page_runs(addrs, CHUNK / PAGE_SIZE as usize) {
        let bytes = &mut buf[..n * PAGE_SIZE as usize];
        let err = |source| CheckpointError::Memory {
            addr: start,
            source,
        };
        from.read_slice(bytes, GuestAddress(start)).map_err(err)?;
        to.write_slice(bytes, GuestAddress(start)).map_err(err)?;
    }
    Ok(())
}

/// A second mapping of `mem`'s layout, zero-filled (pages are allocated
/// as they are written): COLO's state cache.
pub fn same_layout(mem: &GuestMemory) -> Result<GuestMemory, CheckpointError> {
    let ranges: Vec<_> = mem
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(CheckpointError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A KVM dirty log over `slots` slots that fails on `fail_slot` once,
    /// and reports page `n` of every slot dirty on the n-th call.
    struct FakeLog {
        calls: Cell<u64>,
        fail_slot: Cell<Option<u32>>,
    }

    impl SlotLog for FakeLog {
        fn take_slot_log(&self, slot: u32, len: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
            if self.fail_slot.get() == Some(slot) {
                self.fail_slot.set(None);
                return Err(kvm_ioctls::Error::new(libc::EIO));
            }
            let n = self.calls.get();
            self.calls.set(n + 1);
            let mut map = vec![0u64; (len / PAGE_SIZE as usize).div_ceil(64)];
            map[0] |= 1 << (n % 64);
            Ok(map)
        }
    }

    /// Guest memory with two regions (RAM below and above the MMIO hole).
    fn two_slots() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])
            .unwrap()
    }

    #[test]
    fn a_failed_slot_loses_nothing_already_taken() {
        let mem = two_slots();
        let kvm = FakeLog {
            calls: Cell::new(0),
            fail_slot: Cell::new(Some(1)),
        };
        let mut log = DirtyLog::new(true);
        // VMM writes in both slots.
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(1u8, GuestAddress((1 << 32) + 0x7000))
            .unwrap();
        // Slot 0 is read (KVM page 0, VMM page 5), then slot 1 fails.
        assert!(matches!(
            log.take(&kvm, &mem),
            Err(CheckpointError::DirtyLog { slot: 1, .. })
        ));
        // The next take has slot 0's pages from the failed take, slot 0's
        // and slot 1's new KVM pages, and slot 1's VMM page.
        let set = log.take(&kvm, &mem).unwrap();
        assert_eq!(
            set.pages(),
            vec![0x0, 0x1000, 0x5000, (1 << 32) + 0x2000, (1 << 32) + 0x7000]
        );
        // Taken: gone from the logs.
        let again = log.take(&kvm, &mem).unwrap();
        assert_eq!(again.pages(), vec![0x3000, (1 << 32) + 0x4000]);
        // Put back: the next take has them again, with the new ones.
        log.put_back(set.clone());
        log.put_back(again.clone());
        let next = log.take(&kvm, &mem).unwrap().pages();
        let mut want: Vec<u64> = set.pages().into_iter().chain(again.pages()).collect();
        want.push((1 << 32) + 0x6000); // and page 5 of slot 0, already there
        want.sort_unstable();
        assert_eq!(next, want);
    }

    #[test]
    fn a_take_with_logging_off_is_refused() {
        let mem = two_slots();
        let kvm = FakeLog {
            calls: Cell::new(0),
            fail_slot: Cell::new(None),
        };
        let mut log = DirtyLog::new(false);
        assert!(matches!(
            log.take(&kvm, &mem),
            Err(CheckpointError::LoggingOff)
        ));
    }

    #[test]
    fn a_page_buffer_collects_pages_and_chunks() {
        let mut buf = PageBuffer::new();
        buf.put(0x1000, &[1u8; 4096]).unwrap();
        buf.put(0x8000, &[2u8; 8192]).unwrap();
        assert_eq!(buf.addrs(), &[0x1000, 0x8000, 0x9000]);
        assert!(buf.put(0, &[0u8; 100]).is_err());
        let mut out = Vec::new();
        let mut sink = WriteSink(&mut out);
        for (addr, data) in buf.iter() {
            sink.put(addr, data).unwrap();
        }
        assert_eq!(out.len(), 3 * 4096);
        assert!(PageBuffer::from_parts(vec![0], vec![0; 10]).is_err());
    }
}
