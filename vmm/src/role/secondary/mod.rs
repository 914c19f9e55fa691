//! The secondary role: an empty VM (no kernel) that the primary fills:
//! its disks are made equal by block hashes, its memory is copied live,
//! then each checkpoint is staged whole by the `colo` secondary engine and
//! loaded into this paused replica through [`Replica`]; the primary's disk
//! writes wait in an epoch buffer ([`Disks`]) and reach the images when
//! their checkpoint commits. The NICs stay off their taps (a replica that
//! never runs sends nothing, and nothing reaches it) until failover
//! attaches them and announces the guest's MACs.
//!
//! In COLO mode the replica is the SVM: it runs between checkpoints on the
//! client frames the primary mirrors ([`net`]), its disk writes go to an
//! overlay ([`disk`]), and each checkpoint brings it back to the PVM's
//! state through a state cache ([`cache`]).

pub mod cache;
mod disk;
mod net;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use block_replication::secondary::{EpochBuffer, Image};
use colo::control::{Mode, ProxyStats, Role};
use colo::fault::{self, Point};
use colo::vm::{CheckpointAsk, DiskWrite, FrameSink, Identity, PageBatch, StateDigest, VmOpError};
use devices::virtio::{BackendSwap, Block, BlockBackend, NetBackend, Tap};
use net_proxy::rewrite::Rewriter;

use crate::config::VmConfig;
use crate::vm::checkpoint::{self, PageBuffer};
use crate::vm::machine::{Layout, MachineState};
use crate::vm::memory::GuestMemory;
use crate::vm::state::VcpuState;
use crate::vm::{Backends, RunState, RunningVm, VmError, VmHandle};

use super::{op_err, open_console, open_disk, open_tap, virtio_block, virtio_net};

/// Most bytes of forwarded disk writes held for uncommitted epochs.
pub const HELD_DISK_BYTES_MAX: u64 = 512 << 20;

/// A NIC backend that receives nothing and drops what it is given: the
/// replica's NICs until failover.
struct Detached;

impl NetBackend for Detached {
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }

    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// A NIC of the replica: its tap, opened (and so checked) at start-up,
/// attached at failover.
struct Nic {
    tap: Option<Tap>,
    swap: BackendSwap,
    mac: [u8; 6],
}

/// What the secondary keeps of its backends for the engine.
pub struct Parts {
    nics: Vec<Nic>,
    files: Vec<(File, u64)>,
    /// COLO mode: the disks the SVM and the engine share.
    colo_disks: Option<Arc<disk::Shared>>,
}

fn image_fd(backend: &devices::virtio::FileBackend) -> Result<File, VmError> {
    backend.try_clone_file().map_err(|source| VmError::Io {
        what: "a disk image descriptor",
        source,
    })
}

/// Opens the secondary's backends: the disks (their images are written by
/// the replication until failover; in COLO mode the SVM's writes go to an
/// overlay over them), the taps (kept aside) and NICs that are detached
/// until failover (COLO: until the engine connects them, [`Replica`]'s
/// `colo_net`).
pub fn backends(config: &VmConfig) -> Result<(Backends, Parts), VmError> {
    let colo = config
        .replication
        .as_ref()
        .is_some_and(|r| r.mode == Mode::Colo);
    let mut virtio = Vec::new();
    let mut files = Vec::new();
    let mut opened = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let backend = open_disk(i, disk)?;
        files.push((image_fd(&backend)?, backend.capacity()));
        opened.push(backend);
    }
    let colo_disks = match (colo, config.disks.first()) {
        (true, Some(first)) => {
            let bases = opened
                .iter()
                .map(|b| Ok((image_fd(b)?, b.capacity())))
                .collect::<Result<_, VmError>>()?;
            let journal = disk::journal_path(&first.path);
            let shared = disk::Shared::open(bases, &journal, HELD_DISK_BYTES_MAX).map_err(|e| {
                VmError::Disk {
                    path: journal.display().to_string(),
                    source: io::Error::other(e),
                }
            })?;
            Some(Arc::new(shared))
        }
        _ => None,
    };
    for (i, backend) in opened.into_iter().enumerate() {
        let device: Box<dyn BlockBackend> = match &colo_disks {
            Some(shared) => Box::new(disk::SvmDisk {
                shared: shared.clone(),
                disk: i,
                capacity: backend.capacity(),
                read_only: backend.read_only(),
                id: backend.id().to_vec(),
            }),
            None => Box::new(backend),
        };
        virtio.push(virtio_block(i, Block::new(device)));
    }
    let mut nics = Vec::new();
    for (i, net) in config.nets.iter().enumerate() {
        let tap = open_tap(i, net)?;
        let mac = net.mac_or_default(i);
        let (device, swap) = virtio_net(i, mac, Box::new(Detached))?;
        virtio.push(device);
        nics.push(Nic {
            tap: Some(tap),
            swap,
            mac,
        });
    }
    let backends = Backends {
        console: open_console(config)?,
        virtio,
    };
    Ok((
        backends,
        Parts {
            nics,
            files,
            colo_disks,
        },
    ))
}

/// Starts the secondary engine on the (paused, empty) VM, listening on
/// `listener`. `fatal` is called when replication cannot even start.
pub fn start(
    config: &VmConfig,
    vm: &RunningVm,
    parts: Parts,
    listener: std::net::TcpListener,
    fatal: Box<dyn Fn(String) + Send + Sync>,
) -> anyhow::Result<Arc<dyn colo::control::Control>> {
    use anyhow::Context;
    let replication = config
        .replication
        .as_ref()
        .context("a secondary without replication settings")?;
    let (replica, disks) = replica(replication.mode, vm, parts);
    let engine_config = colo::secondary::SecondaryConfig {
        mode: replication.mode,
        failover: match replication.failover_auto {
            true => colo::secondary::Failover::Auto,
            false => colo::secondary::Failover::Manual,
        },
        heartbeat_timeout_ms: replication.heartbeat_timeout_ms,
        fatal,
    };
    let handle = colo::secondary::start(engine_config, listener, replica, disks)
        .context("cannot start replication")?;
    Ok(handle)
}

/// The replica and its disks as the secondary engine drives them, in
/// `mode`, over the (paused, empty) VM `vm` and the backends `parts`.
pub fn replica(
    mode: Mode,
    vm: &RunningVm,
    parts: Parts,
) -> (
    Box<dyn colo::vm::ReplicaVm>,
    Box<dyn colo::vm::ReplicaDisks>,
) {
    let identity = super::identity(vm.layout(), parts.files.iter().map(|f| f.1).collect());
    let colo = (mode == Mode::Colo).then(|| ColoReplica {
        cache: cache::StateCache::default(),
        rewriters: parts
            .nics
            .iter()
            .map(|_| {
                Arc::new(Mutex::new(Rewriter::new(
                    net_proxy::rewrite::DEFAULT_MAX_CONNECTIONS,
                )))
            })
            .collect(),
        mirror: None,
        sent: Arc::default(),
        replays: Vec::new(),
        ran: false,
        disks: parts.colo_disks.clone(),
    });
    let replica = Replica {
        handle: vm.handle(),
        mem: vm.memory().clone(),
        layout: vm.layout().clone(),
        identity,
        nics: parts.nics,
        loaded: Vec::new(),
        colo,
    };
    let images = Images(parts.files);
    let disks: Box<dyn colo::vm::ReplicaDisks> = match parts.colo_disks {
        Some(shared) => Box::new(disk::ReplicaColoDisks { shared, images }),
        None => {
            let capacities = images.capacities();
            Box::new(Disks {
                images,
                held: EpochBuffer::with_capacities(HELD_DISK_BYTES_MAX, capacities),
            })
        }
    };
    (Box::new(replica), disks)
}

/// The replica, as the secondary engine drives it.
struct Replica {
    handle: VmHandle,
    mem: GuestMemory,
    layout: Layout,
    identity: Identity,
    nics: Vec<Nic>,
    /// The vCPU states of the last checkpoint loaded, to name what differs
    /// when its hash does not match.
    loaded: Vec<VcpuState>,
    /// COLO mode: the SVM's parts.
    colo: Option<ColoReplica>,
}

/// What the SVM has beyond a Remus replica.
struct ColoReplica {
    cache: cache::StateCache,
    /// One per NIC, guest order.
    rewriters: Vec<net::SharedRewriter>,
    /// The mirrored client frames (once `colo_net` connected the NICs).
    mirror: Option<Arc<net::Mirror>>,
    /// Frames the SVM sent to the primary.
    sent: Arc<AtomicU64>,
    /// Each NIC's TCP output of the current epoch, for the takeover.
    replays: Vec<Arc<Mutex<net_proxy::mirror::Replay>>>,
    /// The SVM has run (its first `run`).
    ran: bool,
    disks: Option<Arc<disk::Shared>>,
}

impl colo::vm::ReplicaVm for Replica {
    fn identity(&self) -> Identity {
        self.identity.clone()
    }

    fn write_pages(&mut self, pages: &PageBatch) -> Result<(), VmOpError> {
        if let Some(colo) = &mut self.colo {
            let cache = colo.cache.get(&self.mem).map_err(op_err)?;
            checkpoint::write_pages(&cache, &pages.addrs, &pages.data).map_err(op_err)?;
        }
        checkpoint::write_pages(&self.mem, &pages.addrs, &pages.data).map_err(op_err)
    }

    fn load(&mut self, pages: PageBatch, state: Vec<u8>) -> Result<(), VmOpError> {
        let state: MachineState = postcard::from_bytes(&state)
            .map_err(|e| VmOpError(format!("the checkpoint's state does not decode: {e}")))?;
        let pages = PageBuffer::from_parts(pages.addrs, pages.data).map_err(op_err)?;
        let layout = self.layout.clone();
        self.loaded = state.vcpus.clone();
        let Some(colo) = &mut self.colo else {
            return self
                .handle
                .run(move |vm: &mut RunningVm| vm.load(&layout, &state, &pages))
                .map_err(op_err)?
                .map_err(op_err);
        };
        let cache = colo.cache.get(&self.mem).map_err(op_err)?;
        let started = Instant::now();
        let ran = colo.ran;
        let copied = self
            .handle
            .run(move |vm: &mut RunningVm| {
                if !ran {
                    // The SVM never ran: its dirty pages are the initial
                    // sync's, already equal to the cache's.
                    drop(vm.take_dirty()?);
                }
                cache::load(vm, &cache, &layout, &state, &pages)
            })
            .map_err(op_err)?
            .map_err(op_err)?;
        tracing::debug!(
            copied,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "loaded a checkpoint into the SVM"
        );
        // The connections opened since the previous checkpoint are in
        // the state now with the PVM's sequence numbers.
        for r in &colo.rewriters {
            devices::lock(r).reset();
        }
        Ok(())
    }

    fn digest(&mut self) -> Result<StateDigest, VmOpError> {
        let (hash, vcpus) = self
            .handle
            .run(|vm: &mut RunningVm| {
                let st = vm.save_state()?;
                Ok::<_, VmError>((vm.state_hash_of(&st)?, st.vcpus))
            })
            .map_err(op_err)?
            .map_err(op_err)?;
        // What re-reads differently from what was loaded: the engine only
        // compares hashes, this names the fields when they differ.
        for (i, (sent, now)) in self.loaded.iter().zip(&vcpus).enumerate() {
            let fields = sent.differences(now);
            if !fields.is_empty() {
                tracing::warn!(
                    "vcpu{i} re-reads differently after the load: {}",
                    fields.join(", ")
                );
            }
        }
        Ok(super::digest(hash))
    }

    fn take_over(&mut self) -> Result<(), VmOpError> {
        let mut announce = Vec::new();
        for (i, nic) in self.nics.iter_mut().enumerate() {
            let Some(mut tap) = nic.tap.take() else {
                continue; // attached by an earlier take-over
            };
            // Frames that reached the tap while the replica was a replica
            // were for the primary: its clients resend what it never
            // answered.
            let stale = tap.drain();
            tracing::info!(tap = tap.name(), stale, "attaching the NIC to its tap");
            // COLO: the SVM's last replies went to the dead primary's
            // compare; sent again, the clients need not wait for their
            // retransmission timeout (see net_proxy::mirror::Replay).
            if let Some(replay) = self.colo.as_ref().and_then(|c| c.replays.get(i)) {
                let frames = devices::lock(replay).take();
                let count = frames.len();
                for frame in frames {
                    if let Err(e) = tap.send(&frame) {
                        tracing::warn!(tap = tap.name(), "a replayed frame did not go out: {e}");
                        break;
                    }
                }
                tracing::info!(
                    tap = tap.name(),
                    count,
                    "sent the SVM's TCP output of this epoch again"
                );
            }
            announce.push((tap.try_clone().map_err(op_err)?, nic.mac));
            let backend: Box<dyn NetBackend> =
                match self.colo.as_ref().and_then(|c| c.rewriters.get(i)) {
                    // The SVM's connections keep their translation.
                    Some(rewriter) => Box::new(net::RewrittenTap {
                        tap,
                        rewriter: rewriter.clone(),
                    }),
                    None => Box::new(tap),
                };
            nic.swap.swap(backend).map_err(op_err)?;
        }
        if let Some(mirror) = self.colo.as_ref().and_then(|c| c.mirror.as_ref()) {
            // Nothing queued was acknowledged to a client: TCP resends it.
            mirror.clear();
        }
        // Remus: the replica resumes from the last checkpoint loaded.
        // COLO: the SVM runs on from where it is (paused only when the
        // primary was lost between a load and its run).
        self.handle
            .run(resume_if_paused)
            .map_err(op_err)?
            .map_err(op_err)?;
        std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || announce_macs(announce))
            .map_err(op_err)?;
        Ok(())
    }

    fn colo_net(&mut self, out: FrameSink, ask: CheckpointAsk) -> Result<FrameSink, VmOpError> {
        let colo = self
            .colo
            .as_mut()
            .ok_or_else(|| VmOpError("this secondary is not in COLO mode".into()))?;
        if colo.mirror.is_some() {
            return Err(VmOpError("the SVM's NICs are connected already".into()));
        }
        if let Some(disks) = &colo.disks {
            let _ = disks.ask.set(ask);
        }
        // The SVM's own writes from its first run on are what each load
        // copies back from the cache.
        self.handle
            .run(|vm: &mut RunningVm| match vm.dirty_logging() {
                true => Ok(()),
                false => vm.set_dirty_logging(true),
            })
            .map_err(op_err)?
            .map_err(op_err)?;
        let mirror = Arc::new(
            net::Mirror::new(self.nics.len(), net_proxy::mirror::DEFAULT_MIRROR_BYTES)
                .map_err(op_err)?,
        );
        for (i, (nic, rewriter)) in self.nics.iter().zip(&colo.rewriters).enumerate() {
            let replay = Arc::new(Mutex::new(net_proxy::mirror::Replay::new(
                net_proxy::mirror::DEFAULT_REPLAY_BYTES,
            )));
            colo.replays.push(replay.clone());
            let backend = net::SvmNic {
                nic: u16::try_from(i).map_err(op_err)?,
                mirror: mirror.clone(),
                rewriter: rewriter.clone(),
                out: out.clone(),
                sent: colo.sent.clone(),
                replay,
            };
            nic.swap.swap(Box::new(backend)).map_err(op_err)?;
        }
        colo.mirror = Some(mirror.clone());
        Ok(Arc::new(move |frame| mirror.push(frame)))
    }

    fn run(&mut self, epoch: u64) -> Result<(), VmOpError> {
        let mirror = self
            .colo
            .as_ref()
            .and_then(|c| c.mirror.clone())
            .ok_or_else(|| VmOpError("the SVM's NICs are not connected".into()))?;
        if let Some(colo) = &mut self.colo {
            colo.ran = true;
        }
        mirror.set_epoch(epoch + 1);
        self.handle
            .run(resume_if_paused)
            .map_err(op_err)?
            .map_err(op_err)?;
        mirror.wake_all();
        Ok(())
    }

    fn proxy_stats(&self) -> ProxyStats {
        let Some(colo) = &self.colo else {
            return ProxyStats::default();
        };
        let (queue_depth, dropped_frames) = colo.mirror.as_ref().map_or((0, 0), |m| m.counts());
        ProxyStats {
            queue_depth,
            dropped_frames,
            rewritten_connections: colo
                .rewriters
                .iter()
                .map(|r| devices::lock(r).stats().rewritten as u64)
                .sum(),
            mirrored_frames: colo.sent.load(Ordering::Relaxed),
            ..ProxyStats::default()
        }
    }
}

/// Resumes `vm` unless it runs already.
fn resume_if_paused(vm: &mut RunningVm) -> Result<(), VmError> {
    match vm.handle().state() {
        RunState::Paused => vm.resume(),
        _ => Ok(()),
    }
}

/// Sends RARP announcements of each MAC through its tap, in rounds, so
/// every switch on the segment learns the guest's new port.
fn announce_macs(mut nics: Vec<(Tap, [u8; 6])>) {
    let started = Instant::now();
    for round_ms in net_proxy::announce::ROUNDS_MS {
        // The rounds' schedule, not a synchronisation.
        std::thread::sleep(Duration::from_millis(round_ms).saturating_sub(started.elapsed()));
        for (tap, mac) in &mut nics {
            if let Err(e) = tap.send(&net_proxy::announce::rarp(*mac)) {
                tracing::warn!("cannot announce {mac:02x?} on {}: {e}", tap.name());
            }
        }
    }
    tracing::info!("announced the guest's MACs");
}

/// The secondary's images (file, capacity), guest order, as the initial
/// sync hashes and writes them, in both modes.
pub(crate) struct Images(pub(crate) Vec<(File, u64)>);

impl Images {
    fn file(&self, disk: usize) -> io::Result<&(File, u64)> {
        super::nth_disk(&self.0, disk)
    }

    pub(crate) fn capacities(&self) -> Vec<u64> {
        self.0.iter().map(|f| f.1).collect()
    }

    pub(crate) fn hashes(&self, disk: usize, block: u32) -> io::Result<Vec<u64>> {
        let (file, capacity) = self.file(disk)?;
        block_replication::sync::block_hashes(file, *capacity, block)
    }

    /// Writes an initial-sync block straight to its image; refuses one
    /// beyond the disk's end.
    pub(crate) fn write_direct(&self, disk: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        let (file, capacity) = self.file(disk)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > *capacity)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a block at {offset} beyond disk {disk}'s {capacity} bytes"),
            ));
        }
        file.write_all_at(data, offset)
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        self.0.iter().try_for_each(|(f, _)| f.sync_data())
    }
}

/// A commit's progress (`done` of `total` writes applied): the fault
/// point `mid_disk_apply` fires half-way, in both modes.
pub(crate) fn commit_progress(done: usize, total: usize) {
    if total > 0 && done == total.div_ceil(2) {
        fault::point(Role::Secondary, Point::MidDiskApply);
    }
}

/// An image file as the epoch buffer writes it.
struct ImageFile<'a>(&'a File);

impl Image for ImageFile<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// The secondary's disks: the images and the held writes.
struct Disks {
    images: Images,
    held: EpochBuffer,
}

impl colo::vm::ReplicaDisks for Disks {
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
        // The buffer knows the disks' sizes: a write for no disk, or past
        // a disk's end, is refused as it arrives.
        self.held
            .stage(
                write.epoch,
                usize::from(write.disk),
                write.offset,
                write.data,
            )
            .map_err(io::Error::other)
    }

    fn commit(&mut self, epoch: u64) -> io::Result<()> {
        let mut images: Vec<ImageFile> = self.images.0.iter().map(|(f, _)| ImageFile(f)).collect();
        let mut images: Vec<&mut dyn Image> =
            images.iter_mut().map(|i| i as &mut dyn Image).collect();
        self.held
            .commit(epoch, &mut images, &mut commit_progress)
            .map(drop)
            .map_err(io::Error::other)
    }

    fn take_over(&mut self) -> io::Result<()> {
        let dropped = self.held.discard_uncommitted();
        tracing::info!(dropped, "dropped the disk writes of uncommitted epochs");
        Ok(())
    }
}
