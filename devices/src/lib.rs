//! Guest-visible devices of colo-vmm.
//!
//! Everything a vCPU reaches by port I/O or MMIO is a [`bus::BusDevice`]
//! placed on a [`bus::Bus`]. The legacy PC devices live in [`legacy`]. This
//! crate never depends on `vmm`: the VMM wires devices to KVM (irqfds,
//! eventfds) and to its own lifecycle through the small types exported here.

pub mod bus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod legacy;
pub mod persist;
pub mod ratelimit;
pub mod virtio;

pub use bus::{lock, Bus, BusDevice, BusError};
pub use persist::{Persist, PersistError};
