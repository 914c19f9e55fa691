//! What the engines drive: the guest (primary or replica), its disks and,
//! on the primary, its held output. `vmm` implements these over KVM, tests
//! over plain memory.
//!
//! This module is the contract between `colo` and `vmm`: change it only
//! together with both sides.

use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{Cause, ProxyStats};
use crate::PAGE_SIZE;

/// What must be equal on both sides before anything is replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    pub vcpus: u8,
    /// Virtio devices in guest order: (name, kind), e.g. ("blk0", "virtio-blk").
    pub devices: Vec<(String, String)>,
    /// Capacity in bytes of each disk, in guest order.
    pub disks: Vec<u64>,
    pub cpu_template: String,
    pub cpuid_hash: u64,
    pub tsc_khz: u32,
}

impl Identity {
    /// Every difference between the primary's identity (`self`) and the
    /// secondary's (`secondary`), one line each, e.g. "memory: primary
    /// 512 MiB, secondary 256 MiB". Empty when they match.
    pub fn differences(&self, secondary: &Identity) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |what: &str, p: String, s: String| {
            if p != s {
                out.push(format!("{what}: primary {p}, secondary {s}"));
            }
        };
        differ("memory", size(self.mem_size), size(secondary.mem_size));
        differ("vCPUs", self.vcpus.to_string(), secondary.vcpus.to_string());
        let devices = |d: &[(String, String)]| {
            let list: Vec<String> = d.iter().map(|(n, k)| format!("{n} ({k})")).collect();
            format!("[{}]", list.join(", "))
        };
        differ(
            "devices",
            devices(&self.devices),
            devices(&secondary.devices),
        );
        if self.disks.len() != secondary.disks.len() {
            differ(
                "disks",
                self.disks.len().to_string(),
                secondary.disks.len().to_string(),
            );
        }
        for (i, (p, s)) in self.disks.iter().zip(&secondary.disks).enumerate() {
            differ(&format!("disk {i}"), size(*p), size(*s));
        }
        differ(
            "CPU template",
            format!("{:?}", self.cpu_template),
            format!("{:?}", secondary.cpu_template),
        );
        differ(
            "CPUID hash",
            format!("{:#018x}", self.cpuid_hash),
            format!("{:#018x}", secondary.cpuid_hash),
        );
        differ(
            "TSC frequency",
            format!("{} kHz", self.tsc_khz),
            format!("{} kHz", secondary.tsc_khz),
        );
        out
    }
}

/// `bytes` as "N MiB" when a whole number of MiB, else "N bytes".
fn size(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Guest pages: `data` holds `addrs.len()` pages of [`PAGE_SIZE`] bytes,
/// in the order of `addrs` (guest-physical, page-aligned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBatch {
    pub addrs: Vec<u64>,
    pub data: Vec<u8>,
}

impl PageBatch {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Whether `data` holds exactly one page per address.
    pub fn is_well_formed(&self) -> bool {
        self.data.len() as u64 == self.addrs.len() as u64 * PAGE_SIZE
    }
}

/// A state hash as `GET /state-hash` computes it: the total and its parts
/// (memory, vcpuN, vm, serial, i8042, each virtio device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    pub hash: u64,
    pub parts: Vec<(String, u64)>,
}

impl StateDigest {
    /// The names of the parts that differ between `self` and `other`.
    pub fn differing_parts(&self, other: &StateDigest) -> Vec<String> {
        let mut names: Vec<String> = self
            .parts
            .iter()
            .filter(|(name, h)| {
                other.parts.iter().find(|(n, _)| n == name).map(|(_, o)| o) != Some(h)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for (name, _) in &other.parts {
            if !self.parts.iter().any(|(n, _)| n == name) {
                names.push(name.clone());
            }
        }
        names
    }
}

/// One checkpoint as the primary captured it while the guest was paused.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    /// The pages dirtied since the previous capture (or since tracking began).
    pub pages: PageBatch,
    /// vCPU, VM-wide and device state, opaque to `colo` (vmm's encoding).
    pub state: Vec<u8>,
    /// The state hash at the capture, when asked for (verified checkpoints).
    pub digest: Option<StateDigest>,
    /// How long the guest was paused.
    pub paused_for: Duration,
}

/// An operation on the VM failed; the text has the causes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VmOpError(pub String);

impl VmOpError {
    pub fn new(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// The primary's guest, running.
pub trait PrimaryVm: Send {
    fn identity(&self) -> Identity;

    /// Switches dirty tracking on (and clears it): later calls to
    /// [`PrimaryVm::copy_live`] with `all = false` and [`PrimaryVm::checkpoint`]
    /// see the pages written from now on.
    fn start_tracking(&mut self) -> Result<(), VmOpError>;

    /// Live pre-copy, the guest running: all of guest memory (`all`) or the
    /// pages dirtied since the previous copy, handed to `out` in batches.
    /// A page the guest writes meanwhile may be torn: it is dirty again and
    /// goes again. Returns the number of pages copied.
    fn copy_live(
        &mut self,
        all: bool,
        out: &mut dyn FnMut(PageBatch) -> Result<(), VmOpError>,
    ) -> Result<u64, VmOpError>;

    /// One checkpoint: pauses the guest (vCPUs and device threads); while
    /// paused closes epoch `epoch` of the output buffer and of the disk
    /// forwarders (what the guest did before the pause belongs to `epoch`,
    /// what it does after to `epoch + 1`); takes the dirty pages and the
    /// whole state (and the digest when `verify`); resumes the guest at
    /// once and returns what it took. On error the guest runs on.
    fn checkpoint(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError>;

    /// Stop-and-copy of the initial sync: like [`PrimaryVm::checkpoint`]
    /// but leaves the guest paused (the engine sends the disks' last
    /// blocks, then calls [`PrimaryVm::resume`]).
    fn checkpoint_paused(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError>;

    /// Resumes after [`PrimaryVm::checkpoint_paused`].
    fn resume(&mut self) -> Result<(), VmOpError>;
}

/// A network frame on the peer link's mirror connection (COLO mode).
///
/// Primary -> secondary: a frame a guest NIC received from its tap (a
/// client's frame), tagged with the PVM's epoch when it received it: the
/// SVM that loaded checkpoint N runs in epoch N + 1 and is given exactly
/// the frames of epoch N + 1 (older ones are in the checkpoint's state,
/// later ones wait for the next checkpoint).
/// Secondary -> primary: a frame the SVM sent, already in the PVM's TCP
/// sequence space (the rewriter), tagged with the epoch the SVM ran in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerFrame {
    pub epoch: u64,
    /// The NIC's index in guest order.
    pub nic: u16,
    pub data: Vec<u8>,
}

/// Where frames go to the peer (the engine's mirror connection).
/// Callable from any thread (device threads) and never blocks: when the
/// connection is behind by more than its bound, the frame is dropped and
/// an error returned. (A client frame the SVM never gets makes it diverge;
/// the compare then sees a mismatch or a timeout and a checkpoint realigns
/// the two VMs.)
pub type FrameSink = std::sync::Arc<dyn Fn(PeerFrame) -> io::Result<()> + Send + Sync>;

/// The secondary asks the primary for a checkpoint (COLO: the SVM's disk
/// overlay nears its bound, [`Cause::HeldBytes`]). Callable from any
/// thread, never blocks.
pub type CheckpointAsk = std::sync::Arc<dyn Fn(Cause) + Send + Sync>;

/// The primary's output: held per epoch (Remus: every frame the guest
/// sends waits for the checkpoint of its epoch) or compared with the SVM's
/// (COLO: a frame goes out once the SVM sent the same; a difference asks
/// for a checkpoint, and the frames held at it wait for its ack).
pub trait OutputControl: Send {
    /// Checkpoint `epoch` is safe on the secondary: release every frame
    /// of epochs ≤ `epoch`.
    fn release(&mut self, epoch: u64);
    /// Replication ended: release everything held, stop holding (and
    /// comparing, and mirroring).
    fn release_all(&mut self);
    /// Frames and bytes held now.
    fn held(&self) -> (u64, u64);
    /// COLO: from now on mirror every frame the guest's NICs receive to
    /// `sink`, tagged with the epoch the guest is in. Called once per
    /// session, before the stop-and-copy.
    fn mirror(&mut self, _sink: FrameSink) {}
    /// COLO: a frame the SVM sent.
    fn secondary_frame(&mut self, _frame: PeerFrame) {}
    /// COLO: the compare's counts.
    fn proxy_stats(&self) -> ProxyStats {
        ProxyStats::default()
    }
}

/// One write the primary's guest made, forwarded to the secondary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    pub epoch: u64,
    pub disk: u16,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Where the primary's disk forwarders put writes (the engine's outgoing
/// stream). Cloneable, callable from the device threads.
pub type DiskWriteSink = std::sync::Arc<dyn Fn(DiskWrite) -> io::Result<()> + Send + Sync>;

/// The primary's disks.
pub trait PrimaryDisks: Send {
    /// Capacity in bytes of each disk, guest order.
    fn capacities(&self) -> Vec<u64>;
    /// From now on remember which blocks of `block` bytes the guest writes
    /// (initial sync: those are sent again during the stop-and-copy).
    fn track(&mut self, block: u32);
    /// Hashes of every `block`-byte block of disk `disk` (the last block
    /// may be short), read now.
    fn hashes(&mut self, disk: usize, block: u32) -> io::Result<Vec<u64>>;
    /// Reads `buf.len()` bytes of disk `disk` at `offset`.
    fn read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// (disk, block index) of every block written since [`PrimaryDisks::track`]
    /// or the previous call.
    fn take_tracked(&mut self) -> Vec<(usize, u64)>;
    /// From now on forward every write to `sink`, tagged with the epoch it
    /// belongs to, starting with `epoch` (the VM side closes epochs at
    /// checkpoints, see [`PrimaryVm::checkpoint`]). Called with the guest
    /// paused.
    fn forward(&mut self, epoch: u64, sink: DiskWriteSink);
    /// Stop forwarding (the peer is gone).
    fn stop(&mut self);
}

/// The secondary's guest: a paused replica (Remus) or the SVM, which runs
/// between checkpoints on the client frames the primary mirrors (COLO).
pub trait ReplicaVm: Send {
    fn identity(&self) -> Identity;
    /// Initial sync: writes pages straight into the replica's memory (it
    /// has never run, and nothing is claimed until the first checkpoint is
    /// loaded).
    fn write_pages(&mut self, pages: &PageBatch) -> Result<(), VmOpError>;
    /// Validates, then loads `pages` and `state` into the paused replica.
    /// A refusal leaves it untouched.
    /// Takes the checkpoint by value: the pages go into guest memory
    /// without another copy.
    ///
    /// COLO: the SVM may be running; it is paused first. `pages` are the
    /// pages the PVM dirtied since the previous checkpoint: they go into
    /// the state cache (PVM memory as of the last checkpoint), then every
    /// page the PVM or the SVM dirtied is copied from the cache into the
    /// SVM, then the state is loaded. The SVM stays paused until
    /// [`ReplicaVm::run`].
    fn load(&mut self, pages: PageBatch, state: Vec<u8>) -> Result<(), VmOpError>;
    /// The paused replica's state hash.
    fn digest(&mut self) -> Result<StateDigest, VmOpError>;
    /// Failover: attach every NIC to its tap, announce the guest's MACs,
    /// resume the replica from the last loaded checkpoint (Remus), or let
    /// the SVM run on from where it is (COLO; the rewriter stays in the
    /// NICs' path).
    fn take_over(&mut self) -> Result<(), VmOpError>;
    /// COLO: connects the SVM's NICs to the peer link. The SVM's frames
    /// go to `out`, rewritten into the PVM's sequence space and tagged
    /// with the epoch the SVM runs in; `ask` asks the primary for a
    /// checkpoint. Returns where the primary's mirrored client frames go
    /// (the SVM's NICs, see [`PeerFrame`]). Called once, before the
    /// first [`ReplicaVm::load`].
    fn colo_net(&mut self, _out: FrameSink, _ask: CheckpointAsk) -> Result<FrameSink, VmOpError> {
        Err(VmOpError("COLO mode is not supported here".into()))
    }
    /// COLO: the SVM runs from checkpoint `epoch`, just loaded, in epoch
    /// `epoch + 1`.
    fn run(&mut self, _epoch: u64) -> Result<(), VmOpError> {
        Err(VmOpError("COLO mode is not supported here".into()))
    }
    /// COLO: the rewriter's and the mirror's counts.
    fn proxy_stats(&self) -> ProxyStats {
        ProxyStats::default()
    }
}

/// The secondary's disks. COLO: the SVM's own writes go to an overlay
/// (its reads see the overlay over the images) which each commit drops.
pub trait ReplicaDisks: Send {
    /// Capacity in bytes of each disk, guest order.
    fn capacities(&self) -> Vec<u64>;
    /// Hashes of every `block`-byte block of disk `disk`.
    fn hashes(&mut self, disk: usize, block: u32) -> io::Result<Vec<u64>>;
    /// Initial sync: writes straight to the image.
    fn write_direct(&mut self, disk: usize, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the initial sync's writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Holds a forwarded write until its epoch commits.
    fn stage(&mut self, write: DiskWrite) -> io::Result<()>;
    /// Applies every held write of epochs ≤ `epoch`, in the order they
    /// came, and makes them durable. COLO: called with the SVM paused;
    /// drops the overlay first.
    fn commit(&mut self, epoch: u64) -> io::Result<()>;
    /// Failover: drops the held writes of epochs not committed; COLO:
    /// also merges the SVM's overlay into the images (the SVM's disk is
    /// the truth from now on). An error fails the failover.
    fn take_over(&mut self) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            mem_size: 512 << 20,
            vcpus: 2,
            devices: vec![("blk0".into(), "virtio-blk".into())],
            disks: vec![64 << 20],
            cpu_template: "host".into(),
            cpuid_hash: 1,
            tsc_khz: 2_000_000,
        }
    }

    #[test]
    fn differences_name_every_field_that_differs() {
        let p = identity();
        assert!(p.differences(&p).is_empty());
        let s = Identity {
            mem_size: 256 << 20,
            vcpus: 1,
            devices: vec![],
            disks: vec![32 << 20 | 1],
            cpu_template: "t2".into(),
            cpuid_hash: 2,
            tsc_khz: 1,
        };
        assert_eq!(
            p.differences(&s),
            [
                "memory: primary 512 MiB, secondary 256 MiB",
                "vCPUs: primary 2, secondary 1",
                "devices: primary [blk0 (virtio-blk)], secondary []",
                "disk 0: primary 64 MiB, secondary 33554433 bytes",
                "CPU template: primary \"host\", secondary \"t2\"",
                "CPUID hash: primary 0x0000000000000001, secondary 0x0000000000000002",
                "TSC frequency: primary 2000000 kHz, secondary 1 kHz",
            ]
        );
        let fewer = Identity {
            disks: vec![],
            ..identity()
        };
        assert_eq!(p.differences(&fewer), ["disks: primary 1, secondary 0"]);
    }
}
