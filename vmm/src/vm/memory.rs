//! Guest memory: anonymous mappings with a dirty bitmap for the VMM's own
//! writes, registered with KVM as memory slots.
//!
//! Every region carries vm-memory's `AtomicBitmap`: writes the VMM makes
//! through the `Bytes` API (device DMA, boot structures) are marked there.
//! KVM's dirty log covers the guest's own writes once a slot is registered
//! with `KVM_MEM_LOG_DIRTY_PAGES`. The union of the two is what a checkpoint
//! must send.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::ram_ranges;

/// Guest memory as the VMM sees it.
pub type GuestMemory = devices::virtio::GuestMemoryMmap;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot get the host address of guest memory at {0:#x}")]
    HostAddress(u64),
    #[error("KVM refused memory slot {slot} ({start:#x}+{len:#x})")]
    SetRegion {
        slot: u32,
        start: u64,
        len: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem_size` bytes of guest RAM around the MMIO hole.
pub fn create(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<_> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        mib: mem_size >> 20,
        source,
    })
}

/// Registers every region as a KVM memory slot (slot N = region N), with the
/// dirty log on when `track_dirty` is set.
pub fn register(vm: &VmFd, mem: &GuestMemory, track_dirty: bool) -> Result<(), MemoryError> {
    let flags = if track_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in mem.iter().enumerate() {
        let start = region.start_addr().raw_value();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress(start))?;
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: start,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by
        // `mem`, which the VM keeps alive (and unmoved: the mapping, not the
        // Rust value, is what KVM uses) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::SetRegion {
            slot,
            start,
            len: region.len(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_follow_the_layout_and_track_vmm_writes() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
        mem.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        let region = mem.iter().next().unwrap();
        use vm_memory::bitmap::Bitmap;
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x4000));
    }
}
