//! colo-vmm: a KVM microVMM with COLO fault tolerance.
//!
//! The library holds the VMM's wiring: configuration ([`config`]), the boot
//! structures ([`arch`]) and the KVM virtual machine ([`vm`]). The `vmm`
//! binary is a thin command-line shell around it.

pub mod api;
pub mod arch;
pub mod config;
pub mod control;
pub mod role;
pub mod snapshot;
pub mod vm;
