//! Replication of a running guest between two `vmm` processes: the peer
//! protocol, the checkpoint engines of the primary and the secondary, the
//! secondary's staging of a checkpoint, the heartbeat and failover.
//!
//! The engines drive the VM, its disks and its output through the small
//! traits in [`vm`], which `vmm` implements over KVM and which tests
//! implement over plain memory: nothing here needs KVM.
//!
//! [`control`] is what the control API sees: status, metrics, commands.
//! [`fault`] makes either side die at a chosen protocol step (tests).

pub mod control;
pub mod fault;
mod link;
pub mod primary;
pub mod secondary;
pub mod staging;
pub mod vm;
pub mod wire;

pub use link::SYNC_BLOCK;

/// The page size pages travel in.
pub const PAGE_SIZE: u64 = 4096;
