//! The virtio-mmio transport, version 2 (virtio 1.x "modern" layout).
//!
//! Register offsets follow the virtio 1.2 specification, section 4.2.2.
//! Queue configuration is accepted only while the queue is not ready and the
//! device not yet live; feature negotiation only before FEATURES_OK; and a
//! status write of zero resets the device. Anything else the driver does
//! out of order is ignored and logged, never applied half-way.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{GuestMemoryMmap, Processed, VirtioDevice, QUEUE_NOTIFY_OFFSET};
use crate::ratelimit::warn_limited;
use crate::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x434f_4c4f; // "COLO"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;

/// Event data of the backend fd in the device thread (queue indices use
/// their own index as data).
const BACKEND_EVENT: u32 = u32::MAX;
/// Event data of the device's control eventfd (backend swaps).
const CONTROL_EVENT: u32 = u32::MAX - 1;

/// Errors from building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A device declared a queue size that virtio-queue refuses.
    #[error("queue {index} of size {size}: {source}")]
    Queue {
        index: usize,
        size: u16,
        source: virtio_queue::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio device on the MMIO transport.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// A restore happened: the next kick raises a pending interrupt again.
    reraise_on_kick: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd the VMM registered as the
    /// device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|source| MmioError::Queue {
                    index,
                    size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            irq,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            reraise_on_kick: false,
        })
    }

    /// The queue-notify eventfds, one per queue in queue order; the VMM
    /// registers each as an ioeventfd at [`QUEUE_NOTIFY_OFFSET`] with the
    /// queue index as data match.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device is live: the driver set DRIVER_OK and the queues are valid.
    pub fn is_activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn features_negotiable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
    }

    /// Queue registers may change only before the device goes live and
    /// while the selected queue is not ready.
    fn with_config_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            // A driver that stopped a queue (QueueReady = 0) clears its
            // registers next; without VIRTIO_F_RING_RESET they stay unused.
            if self.selected_queue().is_some_and(|q| !q.ready()) {
                tracing::debug!("virtio-mmio: stopped queue written after DRIVER_OK; ignored");
            } else {
                warn_limited!("virtio-mmio: queue register written after DRIVER_OK; ignored");
            }
            return;
        }
        match self.selected_queue() {
            Some(q) if !q.ready() => f(q),
            Some(_) => warn_limited!("virtio-mmio: ready queue reconfigured; ignored"),
            None => warn_limited!("virtio-mmio: no queue selected; ignored"),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if !self.features_negotiable() {
                    warn_limited!("virtio-mmio: features written out of negotiation; ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = lo(self.driver_features),
                    1 => self.driver_features = hi(self.driver_features),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => self.with_config_queue(|q| q.set_size(size)),
                Err(_) => warn_limited!("virtio-mmio: queue size {value:#x} ignored"),
            },
            // Zero stops and resets the queue at any time (virtio 1.2,
            // 4.2.2.2); a driver waits until it reads back 0.
            REG_QUEUE_READY if value == 0 => {
                if let Some(q) = self.selected_queue() {
                    q.reset();
                }
            }
            REG_QUEUE_READY => self.with_config_queue(|q| q.set_ready(value == 1)),
            REG_QUEUE_DESC_LOW => {
                self.with_config_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.with_config_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.with_config_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.with_config_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.with_config_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.with_config_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            QUEUE_NOTIFY_OFFSET => {
                // Normally caught by the ioeventfd; handled here when the
                // VMM did not register one (tests) or KVM let it through.
                self.process_queue(value as usize);
            }
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            _ => tracing::debug!("virtio-mmio: write {value:#x} to register {offset:#x} ignored"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & !STATUS_KNOWN != 0 {
            warn_limited!("virtio-mmio: undefined status bits {value:#x} ignored");
        }
        let value = value & STATUS_KNOWN;
        // The driver only ever adds bits (virtio 1.2, 3.1.1).
        if value & self.status != self.status {
            warn_limited!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut value = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.driver_features & !offered != 0 || self.driver_features & version_1 == 0 {
                warn_limited!(
                    "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.driver_features
                );
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let order =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            if value & order != order {
                warn_limited!("virtio-mmio: DRIVER_OK before FEATURES_OK; device failed");
                value = (value & !VIRTIO_CONFIG_S_DRIVER_OK) | VIRTIO_CONFIG_S_FAILED;
            } else if let Some(bad) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.mem))
            {
                warn_limited!("virtio-mmio: queue {bad} is not valid in guest memory");
                value |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.is_activated() {
            self.device.activate(self.driver_features);
            tracing::debug!(
                device = self.device.device_type(),
                features = format_args!("{:#x}", self.driver_features),
                "virtio device activated"
            );
            // Notifications the driver sent before DRIVER_OK, and frames
            // that waited on the backend, are served now.
            self.kick();
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// Processes queue `index` if the device is live.
    pub fn process_queue(&mut self, index: usize) {
        if !self.is_activated() || index >= self.queues.len() {
            return;
        }
        if !self.queues[index].ready() {
            return;
        }
        let done = self
            .device
            .process_queue(index, &mut self.queues, &self.mem);
        self.signal(done);
    }

    /// Serves every queue and the backend as if all had been notified: at
    /// activation (notifications sent before DRIVER_OK), and when the device
    /// thread starts (a notification pending in an ioeventfd is not part of
    /// a snapshot, so a restored device starts with this).
    ///
    /// After a restore it first signals the irqfd again if an interrupt is
    /// pending (see [`crate::Persist::restore`] on this type).
    pub fn kick(&mut self) {
        if std::mem::take(&mut self.reraise_on_kick) {
            self.reraise_interrupt();
        }
        if !self.is_activated() {
            return;
        }
        let mut done = Processed::NOTHING;
        for index in 0..self.queues.len() {
            if self.queues[index].ready() {
                done = done.or(self
                    .device
                    .process_queue(index, &mut self.queues, &self.mem));
            }
        }
        done = done.or(self.device.process_backend(&mut self.queues, &self.mem));
        self.signal(done);
    }

    /// The backend became readable.
    pub fn process_backend(&mut self) {
        if !self.is_activated() {
            return;
        }
        let done = self.device.process_backend(&mut self.queues, &self.mem);
        self.signal(done);
    }

    /// Test hook: the pending interrupt count, if the irq eventfd fired.
    #[cfg(test)]
    pub(crate) fn irq_pending(&self) -> Option<u64> {
        self.irq.read().ok()
    }

    fn signal(&mut self, done: Processed) {
        if !done.used {
            return;
        }
        self.interrupt_status |= INT_VRING;
        self.raise();
    }

    /// Signals the irqfd again if the transport has an interrupt pending
    /// (`interrupt_status` non-zero); the first [`MmioTransport::kick`]
    /// after a restore does this itself.
    pub fn reraise_interrupt(&self) {
        if self.interrupt_status != 0 {
            self.raise();
        }
    }

    fn raise(&self) {
        if let Err(e) = self.irq.write(1) {
            tracing::error!("virtio-mmio: cannot raise the interrupt: {e}");
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(&*data) {
            Ok(_) if offset % 4 == 0 => {
                data.copy_from_slice(&self.read_register(offset).to_le_bytes());
            }
            _ => warn_limited!(
                "virtio-mmio: {}-byte read at register {offset:#x}; registers are 32-bit",
                data.len()
            ),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => warn_limited!(
                "virtio-mmio: {}-byte write at register {offset:#x}; registers are 32-bit",
                data.len()
            ),
        }
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            let event = Events::with_data(evt, index as u32, EventSet::IN);
            if let Err(e) = ops.add(event) {
                tracing::error!("virtio-mmio: cannot watch queue {index}: {e:?}");
            }
        }
        self.watch_backend(ops);
        if let Some(fd) = self.device.control_fd() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, CONTROL_EVENT, EventSet::IN)) {
                tracing::error!("virtio-mmio: cannot watch the device's control fd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            BACKEND_EVENT => self.process_backend(),
            CONTROL_EVENT => self.process_control(ops),
            index => {
                let index = index as usize;
                if let Some(evt) = self.queue_evts.get(index) {
                    // Drain the counter; a read error only means "nothing
                    // pending", which process_queue copes with.
                    let _ = evt.read();
                    debug_assert_eq!(evt.as_raw_fd(), events.fd());
                    self.process_queue(index);
                }
            }
        }
    }
}

impl MmioTransport {
    fn backend_event(fd: std::os::fd::RawFd) -> Events {
        Events::with_data_raw(fd, BACKEND_EVENT, EventSet::IN | EventSet::EDGE_TRIGGERED)
    }

    fn watch_backend(&self, ops: &mut EventOps) {
        if let Some(fd) = self.device.backend_fd() {
            if let Err(e) = ops.add(Self::backend_event(fd)) {
                tracing::error!("virtio-mmio: cannot watch the backend: {e:?}");
            }
        }
    }

    /// Applies a device's control request; a replaced backend's fd leaves
    /// the epoll set before the old backend is dropped (closing it), and
    /// the new backend is read at once: frames that arrived before it was
    /// watched raised no edge.
    fn process_control(&mut self, ops: &mut EventOps) {
        let old_fd = self.device.backend_fd();
        let Some(old) = self.device.process_control() else {
            return;
        };
        if let Some(fd) = old_fd {
            if let Err(e) = ops.remove(Self::backend_event(fd)) {
                tracing::error!("virtio-mmio: cannot stop watching the old backend: {e:?}");
            }
        }
        drop(old);
        self.watch_backend(ops);
        self.process_backend();
    }
}

/// A queue's configuration and ring positions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

/// Everything guest-visible of a virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: super::DeviceState,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(s: virtio_queue::QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// Every status bit a driver may set (virtio 1.2, 2.1).
const STATUS_KNOWN: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

impl MmioTransport {
    /// The queues `s` describes, each checked against this transport (max
    /// size), the virtio rules (size a power of two within the max, ring
    /// alignment) and, for a live device, guest memory.
    fn restored_queues(&self, s: &TransportSnapshot) -> Result<Vec<Queue>, crate::PersistError> {
        use crate::PersistError::{Invalid, Mismatch};
        if s.queues.len() != self.queues.len() {
            return Err(Mismatch(format!(
                "{} queues saved, {} here",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let live = s.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && s.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
        let event_idx = s.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, here)) in s.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != here.max_size() {
                return Err(Mismatch(format!(
                    "queue {i}: max size {} saved, {} here",
                    q.max_size,
                    here.max_size()
                )));
            }
            if q.event_idx_enabled && !event_idx {
                return Err(Invalid(format!("queue {i}: event index not negotiated")));
            }
            let queue = Queue::try_from(virtio_queue::QueueState::from(q))
                .map_err(|e| Invalid(format!("queue {i}: {e}")))?;
            // As at run time: a live device's ready queues lie in guest
            // memory; one that did not got NEEDS_RESET instead.
            if live && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(Invalid(format!("queue {i} lies outside guest memory")));
            }
            queues.push(queue);
        }
        Ok(queues)
    }
}

impl crate::Persist for MmioTransport {
    type State = TransportSnapshot;

    fn save(&self) -> TransportSnapshot {
        TransportSnapshot {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.device.save_state(),
        }
    }

    /// Checks the device type and queue layout against this transport, the
    /// status against the order a driver can reach it in (FEATURES_OK only
    /// with DRIVER and accepted features, DRIVER_OK only after FEATURES_OK),
    /// negotiated features against the offered ones, the interrupt status
    /// against the bits the transport raises, every queue, and the
    /// device's own state.
    fn validate(&self, s: &TransportSnapshot) -> Result<(), crate::PersistError> {
        use crate::PersistError::{Invalid, Mismatch};
        if s.device_type != self.device.device_type() {
            return Err(Mismatch(format!(
                "virtio device type {} saved, {} here",
                s.device_type,
                self.device.device_type()
            )));
        }
        if s.status & !STATUS_KNOWN != 0 {
            return Err(Invalid(format!("device status {:#x}", s.status)));
        }
        if s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            if s.status & VIRTIO_CONFIG_S_DRIVER == 0
                || s.driver_features & !offered != 0
                || s.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                return Err(Invalid(format!(
                    "features {:#x} accepted with status {:#x} (offered {offered:#x})",
                    s.driver_features, s.status
                )));
            }
        }
        let before_driver_ok =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        if s.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && s.status & before_driver_ok != before_driver_ok
        {
            return Err(Invalid(format!("device status {:#x}", s.status)));
        }
        if s.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(Invalid(format!(
                "interrupt status {:#x}",
                s.interrupt_status
            )));
        }
        self.restored_queues(s)?;
        self.device.validate_state(&s.device)
    }

    /// Validates `s`, then applies it.
    ///
    /// Interrupts: one the saved transport had raised (`interrupt_status`
    /// non-zero) may be missing from the LAPIC/IOAPIC state KVM saved
    /// (irqfds inject asynchronously), and a lost one hangs the driver. So
    /// the next [`MmioTransport::kick`] signals the irqfd again; a spurious
    /// virtio-mmio interrupt is harmless. Not here: a restored VM that is
    /// still paused keeps exactly the saved state (state hashes compare
    /// it). The VMM restores devices after KVM's irqchip state and kicks
    /// every transport when the device thread starts or resumes after a
    /// load.
    fn restore(&mut self, s: &TransportSnapshot) -> Result<(), crate::PersistError> {
        self.validate(s)?;
        self.queues = self.restored_queues(s)?;
        self.device.restore_state(&s.device);
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if self.is_activated() {
            self.device.activate(self.driver_features);
        }
        self.reraise_on_kick = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, DriverSim};
    use crate::virtio::{DeviceCounters, Processed};
    use std::sync::Arc;

    /// A device with two queues that returns every chain with length 7.
    struct Echo {
        counters: Arc<DeviceCounters>,
        activated: Option<u64>,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn activate(&mut self, acked: u64) {
            self.activated = Some(acked);
        }
        fn process_queue(
            &mut self,
            index: usize,
            queues: &mut [Queue],
            mem: &GuestMemoryMmap,
        ) -> Processed {
            let q = &mut queues[index];
            let mut done = Processed::NOTHING;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                q.add_used(mem, chain.head_index(), 7).unwrap();
                done = Processed::USED;
            }
            done
        }
        fn counters(&self) -> Arc<DeviceCounters> {
            self.counters.clone()
        }
        fn save_state(&self) -> crate::virtio::DeviceState {
            crate::virtio::DeviceState::Other(vec![7])
        }
        fn validate_state(
            &self,
            s: &crate::virtio::DeviceState,
        ) -> Result<(), crate::PersistError> {
            match s {
                crate::virtio::DeviceState::Other(v) if v == &[7] => Ok(()),
                _ => Err(crate::PersistError::Mismatch("not an echo".into())),
            }
        }
        fn restore_state(&mut self, _: &crate::virtio::DeviceState) {}
    }

    fn transport() -> MmioTransport {
        let dev = Echo {
            counters: Arc::default(),
            activated: None,
        };
        MmioTransport::new(
            Box::new(dev),
            guest_memory(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identification_registers() {
        let mut t = transport();
        assert_eq!(read32(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read32(&mut t, REG_VERSION), 2);
        assert_eq!(read32(&mut t, REG_DEVICE_ID), 42);
        t.write(REG_DEVICE_FEATURES_SEL, &1u32.to_le_bytes());
        assert_eq!(read32(&mut t, REG_DEVICE_FEATURES), 1);
        t.write(REG_DEVICE_FEATURES_SEL, &0u32.to_le_bytes());
        assert_eq!(read32(&mut t, REG_DEVICE_FEATURES), 0b101);
        t.write(REG_QUEUE_SEL, &1u32.to_le_bytes());
        assert_eq!(read32(&mut t, REG_QUEUE_NUM_MAX), 8);
        t.write(REG_QUEUE_SEL, &9u32.to_le_bytes());
        assert_eq!(read32(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 3];
        t.read(CONFIG_SPACE + 4, &mut cfg);
        assert_eq!(cfg, [4, 5, 6]);
    }

    #[test]
    fn narrow_register_access_is_ignored() {
        let mut t = transport();
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        sim.driver_features(0b1);
        sim.status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(sim.read_status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        sim.driver_features((1 << VIRTIO_F_VERSION_1) | 0b10);
        sim.status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(sim.read_status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn activation_processes_and_interrupts() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate((1 << VIRTIO_F_VERSION_1) | 0b100);
        sim.setup_queue(0, 16);
        sim.add_buffer(0, &[(0x10_000, 64, false)]);
        sim.driver_ok();
        assert!(t.is_activated());
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), INT_VRING);
        assert_eq!(t.irq.read().unwrap(), 1);
        let sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(0), vec![(0, 7)]);
        t.write(REG_INTERRUPT_ACK, &INT_VRING.to_le_bytes());
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_cannot_change_once_live_and_reset_clears() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate(1 << VIRTIO_F_VERSION_1);
        sim.setup_queue(0, 16);
        sim.driver_ok();
        t.write(REG_QUEUE_SEL, &0u32.to_le_bytes());
        t.write(REG_QUEUE_DESC_LOW, &0x5000u32.to_le_bytes());
        assert_eq!(t.queues[0].desc_table(), crate::virtio::testing::QUEUE_BASE);
        t.write(REG_STATUS, &0u32.to_le_bytes());
        assert_eq!(t.status(), 0);
        assert!(!t.queues[0].ready());
        assert!(!t.is_activated());
    }

    #[test]
    fn saved_state_restores_into_a_fresh_transport_over_the_same_memory() {
        use crate::Persist;
        let (a, saved) = live_saved();
        assert_eq!(saved.queues[0].next_avail, 1);
        assert_eq!(saved.queues[0].next_used, 1);

        let mut b = MmioTransport::new(
            Box::new(Echo {
                counters: Arc::default(),
                activated: None,
            }),
            a.mem.clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        assert!(b.is_activated());
        // The restored device goes on where the first one stopped.
        let mut sim = DriverSim::new(&mut b);
        sim.add_buffer(0, &[(0x11_000, 64, false)]);
        b.process_queue(0);
        let sim = DriverSim::new(&mut b);
        assert_eq!(sim.used(0).len(), 2);

        // Refusals leave the transport as it was.
        let before = b.save();
        let mut wrong = saved.clone();
        wrong.queues.pop();
        assert!(b.restore(&wrong).is_err());
        let mut wrong = saved.clone();
        wrong.device_type = 1;
        assert!(b.restore(&wrong).is_err());
        let mut wrong = saved.clone();
        wrong.queues[0].desc_table = 0xffff_0000;
        assert!(b.restore(&wrong).is_err());
        assert_eq!(b.save(), before);
    }

    #[test]
    fn kick_serves_work_whose_notification_was_lost() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate(1 << VIRTIO_F_VERSION_1);
        sim.setup_queue(0, 16);
        sim.driver_ok();
        let mut sim = DriverSim::new(&mut t);
        sim.add_buffer(0, &[(0x10_000, 64, false)]);
        assert!(sim.used(0).is_empty());
        t.kick();
        assert_eq!(DriverSim::new(&mut t).used(0).len(), 1);
        assert_eq!(t.irq.read().unwrap(), 1);
    }

    /// A transport whose driver placed queue 0 outside guest memory.
    fn needing_reset() -> MmioTransport {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate(1 << VIRTIO_F_VERSION_1);
        sim.setup_queue_at(0, 16, 0xffff_0000);
        sim.driver_ok();
        t
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let mut t = needing_reset();
        assert!(!t.is_activated());
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // A notify on a dead device does nothing.
        t.process_queue(0);
        assert!(t.irq.read().is_err());
    }

    /// A live transport that served one chain on queue 0, and its state.
    fn live_saved() -> (MmioTransport, TransportSnapshot) {
        use crate::Persist;
        let mut a = transport();
        let mut sim = DriverSim::new(&mut a);
        sim.negotiate((1 << VIRTIO_F_VERSION_1) | 0b100);
        sim.setup_queue(0, 16);
        sim.add_buffer(0, &[(0x10_000, 64, false)]);
        sim.driver_ok();
        let saved = a.save();
        (a, saved)
    }

    #[test]
    fn restore_refuses_states_a_driver_cannot_reach_and_changes_nothing() {
        use crate::Persist;
        let (a, saved) = live_saved();
        let mut b = transport();
        let before = b.save();
        let mut bad = Vec::new();
        let mut s = saved.clone();
        s.driver_features |= 0b10; // not offered
        bad.push(s);
        let mut s = saved.clone();
        s.driver_features &= !(1 << VIRTIO_F_VERSION_1);
        bad.push(s);
        let mut s = saved.clone();
        s.status |= 0x100; // no such bit
        bad.push(s);
        let mut s = saved.clone();
        s.status &= !VIRTIO_CONFIG_S_FEATURES_OK; // DRIVER_OK without it
        bad.push(s);
        let mut s = saved.clone();
        s.interrupt_status = 0x4;
        bad.push(s);
        let mut s = saved.clone();
        s.queues[0].size = 12; // not a power of two
        bad.push(s);
        let mut s = saved.clone();
        s.queues[1].size = 16; // above the max of 8
        bad.push(s);
        let mut s = saved.clone();
        s.queues[0].event_idx_enabled = true; // never negotiated
        bad.push(s);
        let mut s = saved.clone();
        s.device = crate::virtio::DeviceState::Block;
        bad.push(s);
        for s in &bad {
            assert!(a.validate(s).is_err(), "{s:?}");
            assert!(b.restore(s).is_err(), "{s:?}");
            assert_eq!(b.save(), before, "a refused state changed the transport");
        }
        a.validate(&saved).unwrap();
        b.restore(&saved).unwrap();
    }

    #[test]
    fn a_device_that_needed_reset_restores_as_it_was() {
        use crate::Persist;
        let saved = needing_reset().save();
        assert_ne!(saved.status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        let mut b = transport();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        assert!(!b.is_activated());
    }

    #[test]
    fn restore_raises_a_pending_interrupt_again() {
        use crate::Persist;
        let (a, saved) = live_saved();
        assert_eq!(saved.interrupt_status, INT_VRING);
        assert_eq!(a.irq.read().unwrap(), 1);
        let mut b = transport();
        b.restore(&saved).unwrap();
        // A restored, still paused device leaves KVM's state as saved ...
        assert!(b.irq.read().is_err());
        // ... and raises the interrupt when it starts again.
        b.kick();
        assert_eq!(
            b.irq.read().unwrap(),
            1,
            "the pending interrupt was not raised"
        );
        b.kick();
        assert!(b.irq.read().is_err(), "raised again without a restore");
        // Nothing pending: nothing raised.
        let mut quiet = saved.clone();
        quiet.interrupt_status = 0;
        let mut c = transport();
        c.restore(&quiet).unwrap();
        c.kick();
        assert!(c.irq.read().is_err());
    }

    #[test]
    fn queue_num_that_does_not_fit_16_bits_is_ignored() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate(1 << VIRTIO_F_VERSION_1);
        t.write(REG_QUEUE_SEL, &0u32.to_le_bytes());
        t.write(REG_QUEUE_NUM, &0x1_0008u32.to_le_bytes());
        assert_eq!(t.queues[0].size(), 16, "0x1_0008 was truncated");
        t.write(REG_QUEUE_NUM, &8u32.to_le_bytes());
        assert_eq!(t.queues[0].size(), 8);
    }

    #[test]
    fn queue_ready_zero_resets_a_live_queue() {
        let mut t = transport();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate(1 << VIRTIO_F_VERSION_1);
        sim.setup_queue(0, 8);
        sim.add_buffer(0, &[(0x10_000, 64, false)]);
        sim.driver_ok();
        assert_eq!(t.queues[0].next_avail(), 1);
        t.write(REG_QUEUE_SEL, &0u32.to_le_bytes());
        t.write(REG_QUEUE_READY, &0u32.to_le_bytes());
        assert_eq!(
            read32(&mut t, REG_QUEUE_READY),
            0,
            "QueueReady reads back 1"
        );
        assert_eq!(t.queues[0].next_avail(), 0);
        assert_eq!(t.queues[0].size(), 16, "queue state not cleared");
        // The other queue and the device stay as they were.
        assert!(t.is_activated());
    }

    /// Found by the mmio fuzz target: a status write with undefined bits
    /// was stored as is, and the device's own state then failed `validate`.
    #[test]
    fn undefined_status_bits_are_dropped() {
        use crate::Persist;
        let mut t = transport();
        t.write(REG_STATUS, &0x95c9_bd11u32.to_le_bytes());
        assert_eq!(t.status() & !STATUS_KNOWN, 0, "{:#x}", t.status());
        t.validate(&t.save()).unwrap();
    }
}
