//! Virtio devices on the MMIO transport (virtio 1.x, "modern" MMIO v2).
//!
//! A device ([`VirtioDevice`]) knows its queues' meaning and its config
//! space; the transport ([`mmio::MmioTransport`]) owns the register file,
//! the queues, the guest-memory handle, the queue-notify eventfds and the
//! interrupt eventfd. The transport is a [`crate::BusDevice`] for the vCPUs
//! and an event-manager subscriber for the device thread, so one lock
//! serialises register accesses against queue processing.
//!
//! Every byte the device writes into guest memory goes through vm-memory's
//! bitmap-aware `Bytes` API on [`GuestMemoryMmap`], so dirty tracking sees
//! VMM writes (rx buffers, used rings, block read data) as well as the
//! guest's own.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

pub use block::{Block, BlockBackend, FileBackend};
pub use mmio::MmioTransport;
pub use net::{BackendSwap, Net, NetBackend};
pub use tap::Tap;

/// Guest memory as every device sees it: mmap-backed, with a dirty bitmap
/// that vm-memory's write paths mark.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Size of one device's MMIO window (registers + config space).
pub const MMIO_WINDOW_LEN: u64 = 0x1000;

/// Offset of the QueueNotify register, where the VMM places the queue
/// ioeventfds (data match = queue index).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// `[addr, addr + len)` lies wholly in guest memory.
pub(crate) fn in_memory(mem: &GuestMemoryMmap, addr: vm_memory::GuestAddress, len: usize) -> bool {
    vm_memory::GuestMemoryBackend::check_range(mem, addr, len)
}

/// Serves a read of a device's config space from its bytes; bytes past the
/// end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// Counters a device keeps; read without locking the device.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests (block) or frames (net, both directions) handled.
    pub requests: AtomicU64,
    /// Bytes read from the backend into the guest (block reads, net rx).
    pub read_bytes: AtomicU64,
    /// Bytes the guest sent to the backend (block writes, net tx).
    pub write_bytes: AtomicU64,
    /// Requests answered with an error or frames dropped.
    pub errors: AtomicU64,
}

impl DeviceCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What one round of queue processing did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    /// Entries were added to a used ring: the driver should be interrupted.
    pub used: bool,
}

impl Processed {
    /// Nothing was returned to the driver.
    pub const NOTHING: Self = Self { used: false };
    /// Buffers were returned to the driver.
    pub const USED: Self = Self { used: true };

    /// Combines two rounds.
    pub fn or(self, other: Self) -> Self {
        Self {
            used: self.used || other.used,
        }
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the number of entries is the number of
    /// queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads the device config space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space; read-only config ignores writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these acknowledged features.
    fn activate(&mut self, _acked_features: u64) {}
    /// The driver reset the device: forget per-session state.
    fn reset(&mut self) {}
    /// Processes queue `index` after the driver notified it.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Processed;
    /// A file descriptor the device thread watches for the backend
    /// (edge-triggered, readable), if the device has one.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The backend fd became readable.
    fn process_backend(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Processed {
        Processed::NOTHING
    }
    /// An eventfd the device thread watches (level-triggered) for requests
    /// from other threads, such as a backend swap, if the device takes any.
    fn control_fd(&self) -> Option<RawFd> {
        None
    }
    /// The control fd became readable: applies what other threads asked
    /// for. When the backend was replaced, returns the old one, which the
    /// transport drops only after its fd left the device thread's epoll
    /// set (then [`VirtioDevice::backend_fd`] is the new backend's).
    fn process_control(&mut self) -> Option<Box<dyn Send>> {
        None
    }
    /// The device's counters.
    fn counters(&self) -> Arc<DeviceCounters>;
    /// Device-specific state beyond the transport and queues.
    fn save_state(&self) -> DeviceState;
    /// Checks that `state` is one this device could have saved; changes
    /// nothing.
    fn validate_state(&self, state: &DeviceState) -> Result<(), crate::PersistError>;
    /// Applies what [`VirtioDevice::save_state`] returned after
    /// [`VirtioDevice::validate_state`] accepted it; cannot fail then.
    fn restore_state(&mut self, state: &DeviceState);
}

/// Device-specific state of a virtio device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// virtio-blk holds nothing between requests.
    Block,
    /// virtio-net: a received frame (with its virtio header) that waits for
    /// a guest buffer; empty when none waits.
    Net { pending_rx: Vec<u8> },
    /// A device of another kind (tests).
    Other(Vec<u8>),
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testing;
