//! Roles: who builds a VM's device backends and wires the VM. Only
//! `standalone` exists so far; the COLO primary and secondary will build
//! their own backends (replicated disks, proxied NICs) the same way.

pub mod standalone;
