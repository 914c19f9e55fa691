//! The kernel heap (smoltcp's socket buffers, virtio queues and buffers):
//! a linked-list allocator over RAM the kernel sets aside at boot.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Size of the heap.
pub const HEAP_BYTES: u64 = 16 << 20;

/// Hands `[start, start + HEAP_BYTES)` to the allocator.
///
/// # Safety
/// The range must be identity-mapped RAM that nothing else uses, and this
/// must be called once, before anything allocates.
pub unsafe fn init(start: u64) {
    // SAFETY: the caller guarantees the range is ours alone.
    unsafe { HEAP.lock().init(start as *mut u8, HEAP_BYTES as usize) };
}
