//! A minimal virtio driver for unit tests: lays out split queues in a small
//! guest memory and drives an [`MmioTransport`] through its registers, the
//! way a guest would. The unit tests and the fuzz targets use it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is a finding

use vm_memory::{Bytes, GuestAddress};

use super::mmio::MmioTransport;
use super::GuestMemoryMmap;
use crate::BusDevice;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};

/// Guest memory size of the tests: 1 MiB at address 0.
pub const MEM_SIZE: usize = 1 << 20;
/// Where queue 0 lives; queue `q` is at `QUEUE_BASE + q * QUEUE_STRIDE`.
pub const QUEUE_BASE: u64 = 0x8_0000;
const QUEUE_STRIDE: u64 = 0x4000;
/// Descriptors per chain the simulator reserves.
const CHAIN_SLOTS: u16 = 4;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A fresh 1 MiB guest memory with a dirty bitmap.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test guest memory")
}

/// A transport over `device` that a driver brought up: `features`
/// negotiated, queues `0..queues` of 16 entries set up, DRIVER_OK.
pub fn live_transport(
    device: Box<dyn super::VirtioDevice>,
    mem: GuestMemoryMmap,
    features: u64,
    queues: u16,
) -> MmioTransport {
    let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
        .expect("irq eventfd");
    let mut t = MmioTransport::new(device, mem, irq).expect("transport");
    let mut sim = DriverSim::new(&mut t);
    sim.negotiate(features);
    for q in 0..queues {
        sim.setup_queue(q, 16);
    }
    sim.driver_ok();
    assert!(t.is_activated());
    t
}

/// Drives one transport.
pub struct DriverSim<'a> {
    t: &'a mut MmioTransport,
    mem: GuestMemoryMmap,
    sizes: [u16; 4],
    bases: [u64; 4],
}

impl<'a> DriverSim<'a> {
    pub fn new(t: &'a mut MmioTransport) -> Self {
        let mem = t.mem.clone();
        let mut bases = [0; 4];
        let mut sizes = [0; 4];
        for (q, (base, size)) in bases.iter_mut().zip(sizes.iter_mut()).enumerate() {
            if let Some(queue) = t.queues.get(q) {
                use virtio_queue::QueueT;
                *base = queue.desc_table();
                *size = queue.size();
            }
        }
        Self {
            t,
            mem,
            sizes,
            bases,
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    pub fn status(&mut self, value: u32) {
        self.write32(0x70, value);
    }

    pub fn read_status(&mut self) -> u32 {
        let mut b = [0; 4];
        self.t.read(0x70, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn driver_features(&mut self, features: u64) {
        self.write32(0x24, 0);
        self.write32(0x20, features as u32);
        self.write32(0x24, 1);
        self.write32(0x20, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) {
        self.status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.driver_features(features);
        self.status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
    }

    pub fn setup_queue(&mut self, q: u16, size: u16) {
        self.setup_queue_at(q, size, QUEUE_BASE + u64::from(q) * QUEUE_STRIDE);
    }

    pub fn setup_queue_at(&mut self, q: u16, size: u16, base: u64) {
        self.write32(0x30, u32::from(q));
        self.write32(0x38, u32::from(size));
        for (reg, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            self.write32(reg, addr as u32);
            self.write32(reg + 4, (addr >> 32) as u32);
        }
        self.write32(0x44, 1);
        self.bases[usize::from(q)] = base;
        self.sizes[usize::from(q)] = size;
    }

    pub fn driver_ok(&mut self) {
        let s = self.read_status();
        self.status(s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    fn avail_idx(&self, q: u16) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.bases[usize::from(q)] + 0x1000 + 2))
            .expect("avail idx")
    }

    /// Makes a chain of `(addr, len, device_writable)` buffers available on
    /// queue `q`; returns its head index. Does not notify.
    pub fn add_buffer(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= usize::from(CHAIN_SLOTS));
        let size = self.sizes[usize::from(q)];
        let base = self.bases[usize::from(q)];
        let idx = self.avail_idx(q);
        let head = (idx.wrapping_mul(CHAIN_SLOTS)) % size;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let slot = head + i as u16;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let d = base + u64::from(slot) * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(slot + 1, GuestAddress(d + 14)).unwrap();
        }
        let ring = base + 0x1000 + 4 + u64::from(idx % size) * 2;
        self.mem.write_obj(head, GuestAddress(ring)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(base + 0x1000 + 2))
            .unwrap();
        head
    }

    /// Every used-ring entry of queue `q` so far, as (id, len).
    #[cfg_attr(not(test), allow(dead_code))] // the fuzz targets do not read it
    pub fn used(&self, q: u16) -> Vec<(u32, u32)> {
        let size = self.sizes[usize::from(q)];
        let base = self.bases[usize::from(q)] + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let e = base + 4 + u64::from(i % size) * 8;
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }
}
