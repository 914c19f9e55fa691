//! The primary role: the guest runs here and serves clients; its disk
//! writes are forwarded to the secondary tagged with their epoch, its
//! network output is held until the checkpoint of its epoch is safe on the
//! secondary (Remus), and the `colo` primary engine drives checkpoints
//! through [`Guest`] (the VM), [`Disks`] and [`Output`].
//!
//! In COLO mode the output is compared with the secondary VM's instead
//! ([`colo`]).
//!
//! Epochs: the guest's work between checkpoint N-1 and checkpoint N
//! belongs to epoch N. Both the output buffers and the disk forwarders are
//! told where an epoch ends while the guest is paused for the checkpoint,
//! so nothing the guest did can fall on the wrong side.

mod colo;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ::colo::control::{Cause, CommandError, Control, Mode, Role};
use ::colo::fault::{self, Point};
use ::colo::primary::{PrimaryHandle, DEFAULT_HELD_BYTES_MAX};
use ::colo::vm::{Capture, DiskWrite, DiskWriteSink, Identity, PageBatch, VmOpError};
use block_replication::primary::Forwarder;
use devices::lock;
use devices::ratelimit::LogLimit;
use devices::virtio::{Block, BlockBackend, FileBackend, NetBackend, Tap};
use net_proxy::compare::CompareConfig;
use net_proxy::output::{OutputBuffer, Push};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

use crate::config::{VmConfig, COMPARE_TIMEOUT_MS_RANGE};
use crate::vm::checkpoint::{self, PAGE_SIZE};
use crate::vm::memory::GuestMemory;
use crate::vm::{Backends, RunState, RunningVm, VmError, VmHandle};

use self::colo::{ColoNics, ColoOutput, FrameOut};
use super::{op_err, open_console, open_disk, open_tap, virtio_block, virtio_net};

/// Pages per batch the live pre-copy hands out.
const BATCH_PAGES: usize = 1024;

/// Calls the engine for an early checkpoint (set once the engine exists).
type Trigger = Arc<OnceLock<Box<dyn Fn(Cause) + Send + Sync>>>;

/// One NIC's output: the buffer and a handle on the tap to release into.
struct NicOutput {
    /// Locked while frames go out, so releases and passed-through frames
    /// keep the guest's order.
    buffer: Mutex<OutputBuffer>,
    tap: Mutex<Tap>,
    trigger: Trigger,
}

impl NicOutput {
    fn send(&self, frames: Vec<Vec<u8>>) {
        colo::put_all(&mut *lock(&self.tap), frames);
    }
}

/// The primary's NICs: held per epoch (Remus) or compared (COLO).
#[derive(Clone)]
enum Nics {
    Remus(Vec<Arc<NicOutput>>),
    Colo(Arc<ColoNics>),
}

/// Where one NIC's output goes.
enum NicOut {
    Remus(Arc<NicOutput>),
    /// The NICs and this one's index.
    Colo(Arc<ColoNics>, usize),
}

/// The guest's NIC backend on the primary: frames in from the tap at
/// once (COLO: mirrored too); frames out through the output buffer or
/// the compare.
struct HeldNet {
    tap: Tap,
    out: NicOut,
}

impl NetBackend for HeldNet {
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.tap.fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tap.recv(buf)?;
        if let (NicOut::Colo(nics, i), Some(frame)) = (&self.out, buf.get(..n)) {
            if n > 0 {
                nics.mirror(*i, frame);
            }
        }
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let out = match &self.out {
            NicOut::Remus(out) => out,
            NicOut::Colo(nics, i) => {
                nics.primary(*i, frame);
                return Ok(());
            }
        };
        let mut buffer = lock(&out.buffer);
        match buffer.push(frame.to_vec()) {
            Push::Pass(frame) => out.send(vec![frame]),
            Push::Held { over_bound: true } => {
                if let Some(trigger) = out.trigger.get() {
                    trigger(Cause::HeldBytes);
                }
            }
            Push::Held { over_bound: false } => {}
        }
        Ok(())
    }
}

/// One disk's replication: the forwarder's state, where forwarded writes
/// go, and a descriptor on the image for hashing and reading.
struct DiskFwd {
    index: u16,
    capacity: u64,
    forwarder: Mutex<Forwarder>,
    sink: Mutex<Option<DiskWriteSink>>,
    file: File,
}

/// The guest's disk on the primary: every write is applied locally, then
/// forwarded (or, during the initial sync, remembered).
struct ReplicatedDisk {
    inner: FileBackend,
    fwd: Arc<DiskFwd>,
}

impl BlockBackend for ReplicatedDisk {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_at(offset, buf)?;
        let epoch = lock(&self.fwd.forwarder).on_write(offset, buf.len() as u64);
        if let Some(epoch) = epoch {
            if let Some(sink) = lock(&self.fwd.sink).as_ref() {
                let write = DiskWrite {
                    epoch,
                    disk: self.fwd.index,
                    offset,
                    data: buf.to_vec(),
                };
                if let Err(e) = sink(write) {
                    // The engine sees the broken stream itself and ends
                    // replication; the guest's write is done locally.
                    static LIMIT: LogLimit = LogLimit::every_ms(1000);
                    if LIMIT.allow().is_some() {
                        tracing::warn!("a disk write was not forwarded: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    fn id(&self) -> &[u8] {
        self.inner.id()
    }
}

/// What the primary keeps of its backends for the engine.
pub struct Parts {
    nics: Nics,
    disks: Vec<Arc<DiskFwd>>,
    trigger: Trigger,
}

/// Opens the primary's backends: disks that forward, NICs that hold.
pub fn backends(config: &VmConfig) -> Result<(Backends, Parts), VmError> {
    let io_err = |what| move |source| VmError::Io { what, source };
    let trigger: Trigger = Arc::default();
    let mut virtio = Vec::new();
    let mut disks = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let inner = open_disk(i, disk)?;
        let fwd = Arc::new(DiskFwd {
            index: u16::try_from(i).map_err(|_| VmError::Refused("too many disks".into()))?,
            capacity: inner.capacity(),
            forwarder: Mutex::new(Forwarder::new(inner.capacity())),
            sink: Mutex::new(None),
            file: inner
                .try_clone_file()
                .map_err(io_err("a disk image descriptor"))?,
        });
        disks.push(fwd.clone());
        let disk = ReplicatedDisk { inner, fwd };
        virtio.push(virtio_block(i, Block::new(Box::new(disk))));
    }
    let mut taps = Vec::new();
    for (i, net) in config.nets.iter().enumerate() {
        let tap = open_tap(i, net)?;
        let out = tap.try_clone().map_err(io_err("a tap descriptor"))?;
        taps.push((tap, out));
    }
    let replication = config.replication.as_ref();
    let nics = match replication.map(|r| r.mode) {
        Some(Mode::Colo) => {
            let timeout = replication.map_or(crate::config::DEFAULT_COMPARE_TIMEOUT_MS, |r| {
                r.compare_timeout_ms
            });
            let compare = CompareConfig {
                timeout: Duration::from_millis(timeout),
                held_bytes_max: DEFAULT_HELD_BYTES_MAX,
                ..CompareConfig::default()
            };
            let (taps, outs): (Vec<Tap>, Vec<Box<dyn FrameOut>>) = taps
                .into_iter()
                .map(|(tap, out)| (tap, Box::new(out) as Box<dyn FrameOut>))
                .unzip();
            let colo = ColoNics::new(outs, compare, trigger.clone());
            for (i, tap) in taps.into_iter().enumerate() {
                let out = NicOut::Colo(colo.clone(), i);
                virtio.push(nic(config, i, HeldNet { tap, out })?);
            }
            Nics::Colo(colo)
        }
        _ => {
            let mut nics = Vec::new();
            for (i, (tap, out)) in taps.into_iter().enumerate() {
                let out = Arc::new(NicOutput {
                    buffer: Mutex::new(OutputBuffer::new(DEFAULT_HELD_BYTES_MAX)),
                    tap: Mutex::new(out),
                    trigger: trigger.clone(),
                });
                nics.push(out.clone());
                let out = NicOut::Remus(out);
                virtio.push(nic(config, i, HeldNet { tap, out })?);
            }
            Nics::Remus(nics)
        }
    };
    let backends = Backends {
        console: open_console(config)?,
        virtio,
    };
    Ok((
        backends,
        Parts {
            nics,
            disks,
            trigger,
        },
    ))
}

/// NIC `i` of `config` over `backend`.
fn nic(config: &VmConfig, i: usize, backend: HeldNet) -> Result<crate::vm::VirtioBackend, VmError> {
    let mac = config.nets[i].mac_or_default(i);
    Ok(virtio_net(i, mac, Box::new(backend))?.0)
}

/// Starts the primary engine on the running VM.
pub fn start(config: &VmConfig, vm: &RunningVm, parts: Parts) -> anyhow::Result<Arc<dyn Control>> {
    use anyhow::Context;
    let replication = config
        .replication
        .as_ref()
        .context("a primary without replication settings")?;
    let identity = super::identity(
        vm.layout(),
        parts.disks.iter().map(|d| d.capacity).collect(),
    );
    let guest = Guest {
        handle: vm.handle(),
        mem: vm.memory().clone(),
        identity,
        nics: parts.nics.clone(),
        disks: parts.disks.clone(),
        staging: Arc::default(),
    };
    let engine_config = ::colo::primary::PrimaryConfig {
        peer: replication
            .peer
            .clone()
            .context("a primary needs --peer")?
            .to_string(),
        mode: replication.mode,
        checkpoint_ms: replication.checkpoint_ms,
        verify: replication.verify,
        heartbeat_ms: replication.heartbeat_ms,
        heartbeat_timeout_ms: replication.heartbeat_timeout_ms,
        held_bytes_max: DEFAULT_HELD_BYTES_MAX,
    };
    let output: Box<dyn ::colo::vm::OutputControl> = match &parts.nics {
        Nics::Remus(nics) => Box::new(Output(nics.clone())),
        Nics::Colo(nics) => {
            Box::new(ColoOutput::start(nics.clone()).context("cannot start the compare's timer")?)
        }
    };
    let handle = ::colo::primary::start(
        engine_config,
        Box::new(guest),
        Box::new(Disks(parts.disks)),
        output,
    )
    .context("cannot start replication")?;
    let early = handle.clone();
    // Set once: the engine lives as long as the VM.
    let _ = parts
        .trigger
        .set(Box::new(move |cause| early.request_checkpoint(cause)));
    Ok(match parts.nics {
        Nics::Remus(_) => handle,
        Nics::Colo(nics) => Arc::new(ColoControl {
            engine: handle,
            nics,
        }),
    })
}

/// The engine's commands and reports, with the compare's timeout (COLO).
struct ColoControl {
    engine: Arc<PrimaryHandle>,
    nics: Arc<ColoNics>,
}

impl Control for ColoControl {
    fn status(&self) -> ::colo::control::Status {
        let mut status = self.engine.status();
        status.compare_timeout_ms = Some(self.nics.timeout().as_millis() as u64);
        status
    }

    fn metrics(&self) -> ::colo::control::Metrics {
        self.engine.metrics()
    }

    fn failover(&self) -> Result<(), CommandError> {
        self.engine.failover()
    }

    fn checkpoint(&self) -> Result<(), CommandError> {
        self.engine.checkpoint()
    }

    fn set_checkpoint_ms(&self, ms: u64) -> Result<(), CommandError> {
        self.engine.set_checkpoint_ms(ms)
    }

    fn set_compare_timeout_ms(&self, ms: u64) -> Result<(), CommandError> {
        if !COMPARE_TIMEOUT_MS_RANGE.contains(&ms) {
            return Err(CommandError::Invalid(format!(
                "compare_timeout_ms {ms} is outside 1..=60000"
            )));
        }
        self.nics.set_timeout(Duration::from_millis(ms));
        Ok(())
    }
}

/// The primary's guest, as the engine drives it.
struct Guest {
    handle: VmHandle,
    mem: GuestMemory,
    identity: Identity,
    nics: Nics,
    disks: Vec<Arc<DiskFwd>>,
    /// Where a checkpoint's pages are copied during the pause.
    staging: Arc<Mutex<Vec<u8>>>,
}

impl Guest {
    /// Pauses the guest, closes epoch `epoch` everywhere, takes the dirty
    /// pages and the state, and resumes when `resume` (and the guest was
    /// running before).
    fn capture(&self, epoch: u64, verify: bool, resume: bool) -> Result<Capture, VmOpError> {
        let nics = self.nics.clone();
        let disks = self.disks.clone();
        let staging = self.staging.clone();
        let (addrs, len, state, digest, paused_for) = self
            .handle
            .run(move |vm: &mut RunningVm| {
                let started = Instant::now();
                let was_running = vm.handle().state() == RunState::Running;
                if was_running {
                    vm.pause().map_err(op_err)?;
                }
                fault::point(Role::Primary, Point::AfterPause);
                let taken = (|| {
                    close_epoch(&nics, &disks, epoch)?;
                    let dirty = vm.take_dirty().map_err(op_err)?;
                    let addrs = dirty.pages();
                    let len = addrs.len() * PAGE_SIZE as usize;
                    let mut staging = lock(&staging);
                    // Grows to the largest checkpoint once; its pages stay
                    // mapped, so a pause copies into warm memory.
                    if staging.len() < len {
                        staging.resize(len, 0);
                    }
                    if let Err(e) = vm.copy_pages_to(&addrs, &mut staging[..len]) {
                        vm.put_back_dirty(dirty);
                        return Err(op_err(e));
                    }
                    let state = vm.save_state().map_err(op_err)?;
                    let digest = match verify {
                        true => Some(super::digest(vm.state_hash_of(&state).map_err(op_err)?)),
                        false => None,
                    };
                    Ok((addrs, len, state, digest))
                })();
                if resume && was_running {
                    vm.resume().map_err(op_err)?;
                }
                let (addrs, len, state, digest) = taken?;
                Ok::<_, VmOpError>((addrs, len, state, digest, started.elapsed()))
            })
            .map_err(op_err)??;
        // The guest runs again: what follows costs no pause.
        let data = lock(&self.staging)[..len].to_vec();
        let state = postcard::to_allocvec(&state).map_err(op_err)?;
        Ok(Capture {
            pages: PageBatch { addrs, data },
            state,
            digest,
            paused_for,
        })
    }
}

/// Where epoch `epoch` ends, told while the guest is paused: NICs that do
/// not hold yet start holding (the first checkpoint), forwarders that
/// forward close it.
fn close_epoch(nics: &Nics, disks: &[Arc<DiskFwd>], epoch: u64) -> Result<(), VmOpError> {
    match nics {
        Nics::Remus(nics) => {
            for nic in nics {
                let mut buffer = lock(&nic.buffer);
                if buffer.holding() {
                    buffer.close_epoch(epoch).map_err(op_err)?;
                } else {
                    buffer.hold_from(epoch + 1);
                }
            }
        }
        Nics::Colo(nics) => nics.close_epoch(epoch),
    }
    for disk in disks {
        let mut forwarder = lock(&disk.forwarder);
        if matches!(
            forwarder.mode(),
            block_replication::primary::Mode::Forwarding(_)
        ) {
            forwarder.close_epoch(epoch).map_err(op_err)?;
        }
    }
    Ok(())
}

impl ::colo::vm::PrimaryVm for Guest {
    fn identity(&self) -> Identity {
        self.identity.clone()
    }

    fn start_tracking(&mut self) -> Result<(), VmOpError> {
        self.handle
            .run(|vm: &mut RunningVm| {
                vm.set_dirty_logging(true)?;
                vm.take_dirty_running().map(drop)
            })
            .map_err(op_err)?
            .map_err(op_err)
    }

    fn copy_live(
        &mut self,
        all: bool,
        out: &mut dyn FnMut(PageBatch) -> Result<(), VmOpError>,
    ) -> Result<u64, VmOpError> {
        let pages: Vec<u64> = if all {
            self.mem
                .iter()
                .flat_map(|r| {
                    let start = r.start_addr().0;
                    (0..r.len() / PAGE_SIZE).map(move |i| start + i * PAGE_SIZE)
                })
                .collect()
        } else {
            self.handle
                .run(|vm: &mut RunningVm| vm.take_dirty_running())
                .map_err(op_err)?
                .map_err(op_err)?
                .pages()
        };
        for chunk in pages.chunks(BATCH_PAGES) {
            let mut data = vec![0u8; chunk.len() * PAGE_SIZE as usize];
            checkpoint::read_pages(&self.mem, chunk, &mut data).map_err(op_err)?;
            out(PageBatch {
                addrs: chunk.to_vec(),
                data,
            })?;
        }
        Ok(pages.len() as u64)
    }

    fn checkpoint(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError> {
        self.capture(epoch, verify, true)
    }

    fn checkpoint_paused(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError> {
        self.capture(epoch, verify, false)
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        self.handle
            .run(|vm: &mut RunningVm| vm.resume())
            .map_err(op_err)?
            .map_err(op_err)
    }
}

/// The primary's held output.
struct Output(Vec<Arc<NicOutput>>);

impl ::colo::vm::OutputControl for Output {
    fn release(&mut self, epoch: u64) {
        for nic in &self.0 {
            let mut buffer = lock(&nic.buffer);
            let frames = buffer.release_through(epoch);
            nic.send(frames);
        }
    }

    fn release_all(&mut self) {
        for nic in &self.0 {
            let mut buffer = lock(&nic.buffer);
            let frames = buffer.release_all();
            nic.send(frames);
        }
    }

    fn held(&self) -> (u64, u64) {
        self.0.iter().fold((0, 0), |(f, b), nic| {
            let buffer = lock(&nic.buffer);
            (f + buffer.held_frames(), b + buffer.held_bytes())
        })
    }
}

/// The primary's disks.
struct Disks(Vec<Arc<DiskFwd>>);

impl Disks {
    fn disk(&self, disk: usize) -> io::Result<&Arc<DiskFwd>> {
        super::nth_disk(&self.0, disk)
    }
}

impl ::colo::vm::PrimaryDisks for Disks {
    fn capacities(&self) -> Vec<u64> {
        self.0.iter().map(|d| d.capacity).collect()
    }

    fn track(&mut self, block: u32) {
        for d in &self.0 {
            lock(&d.forwarder).track(block);
        }
    }

    fn hashes(&mut self, disk: usize, block: u32) -> io::Result<Vec<u64>> {
        let d = self.disk(disk)?;
        block_replication::sync::block_hashes(&d.file, d.capacity, block)
    }

    fn read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk(disk)?.file.read_exact_at(buf, offset)
    }

    fn take_tracked(&mut self) -> Vec<(usize, u64)> {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(i, d)| {
                lock(&d.forwarder)
                    .take_tracked()
                    .into_iter()
                    .map(move |b| (i, b))
            })
            .collect()
    }

    fn forward(&mut self, epoch: u64, sink: DiskWriteSink) {
        for d in &self.0 {
            *lock(&d.sink) = Some(sink.clone());
            lock(&d.forwarder).forward_from(epoch);
        }
    }

    fn stop(&mut self) {
        for d in &self.0 {
            lock(&d.forwarder).stop();
            *lock(&d.sink) = None;
        }
    }
}
