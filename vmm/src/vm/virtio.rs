//! Virtio devices of a VM: each one on the MMIO bus with its queue-notify
//! ioeventfds and its irqfd registered with KVM, and declared to the guest
//! on the kernel command line (`virtio_mmio.device=4K@ADDR:IRQ`).

use std::sync::{Arc, Mutex};

use devices::virtio::{
    DeviceCounters, MmioTransport, VirtioDevice, MMIO_WINDOW_LEN, QUEUE_NOTIFY_OFFSET,
};
use devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::GuestMemory;
use super::{io_err, kvm_err, VmError};
use crate::arch::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE};

/// One attached virtio device.
pub struct AttachedDevice {
    /// `blk0`, `net0`, ...
    pub name: String,
    /// `virtio-blk` or `virtio-net`.
    pub kind: &'static str,
    /// Base of its MMIO window.
    pub base: u64,
    /// Its IRQ line.
    pub irq: u32,
    /// Its irqfd (a second descriptor of the transport's), for
    /// [`super::RunningVm::settle_interrupts`].
    pub irq_evt: EventFd,
    /// The transport, shared by the MMIO bus and the device thread.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Its counters.
    pub counters: Arc<DeviceCounters>,
}

/// A virtio device built by the caller (see `crate::role`), not yet
/// attached.
pub struct VirtioBackend {
    /// `blk0`, `net0`, ...
    pub name: String,
    /// `virtio-blk` or `virtio-net`.
    pub kind: &'static str,
    pub device: Box<dyn VirtioDevice>,
}

/// Places `made` on `mmio_bus` in order and wires them to KVM. Returns
/// them and the text to append to the kernel command line.
pub fn attach(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    made: Vec<VirtioBackend>,
    mmio_bus: &mut Bus,
) -> Result<(Vec<AttachedDevice>, String), VmError> {
    let mut attached = Vec::with_capacity(made.len());
    let mut cmdline = String::new();
    for (index, made) in made.into_iter().enumerate() {
        let VirtioBackend { name, kind, device } = made;
        let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW_LEN;
        let irq = VIRTIO_IRQ_BASE + index as u32;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("a virtio irqfd"))?;
        vm_fd
            .register_irqfd(&irq_evt, irq)
            .map_err(kvm_err("a virtio irqfd"))?;
        let counters = device.counters();
        let irqfd = irq_evt.try_clone().map_err(io_err("a virtio irqfd"))?;
        let transport =
            MmioTransport::new(device, mem.clone(), irq_evt).map_err(VmError::Virtio)?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm_fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(kvm_err("a virtio queue ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus.insert(transport.clone(), base, MMIO_WINDOW_LEN)?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        attached.push(AttachedDevice {
            name,
            kind,
            base,
            irq,
            irq_evt: irqfd,
            transport,
            counters,
        });
    }
    Ok((attached, cmdline))
}
