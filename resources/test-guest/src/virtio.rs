//! Virtio devices: the `virtio-drivers` HAL for an identity-mapped kernel,
//! and discovery of the devices the VMM declared on the command line.

use core::alloc::Layout;
use core::ptr::NonNull;

use colo_test_guest::netconf::MmioDevice;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// DMA is ordinary heap memory: guest-physical equals virtual here.
pub struct GuestHal;

fn dma_layout(pages: usize) -> Layout {
    // PAGE_SIZE is a power of two and the size cannot overflow for the
    // queue sizes the drivers ask for.
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap_or(Layout::new::<u8>())
}

// SAFETY: allocations are zeroed, page-aligned, exclusively owned until
// dma_dealloc, and identity-mapped, so the physical addresses handed to the
// device are the virtual ones.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(dma_layout(pages)) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as usize as PhysAddr, p),
            None => panic!("out of memory for {pages} DMA pages"),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: allocated by dma_alloc with the same layout.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), dma_layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// A transport to a device of the VMM's.
pub type Mmio = MmioTransport<'static>;

/// Opens the transport at `dev`, telling what kind of device is there.
pub fn open(dev: MmioDevice) -> Option<(DeviceType, Mmio)> {
    let header = NonNull::new(dev.base as usize as *mut VirtIOHeader)?;
    // SAFETY: the VMM declared a virtio-mmio window of `dev.size` bytes at
    // `dev.base`, identity-mapped, used by this transport alone.
    let transport = unsafe { MmioTransport::new(header, dev.size as usize) };
    match transport {
        Ok(t) => Some((t.device_type(), t)),
        Err(e) => {
            crate::say!("virtio-mmio at {:#x}: {e:?}", dev.base);
            None
        }
    }
}
