//! Pure logic of colo-test-guest, kept free of hardware access so that it is
//! unit-tested on the host (`cargo test` with the host toolchain) while the
//! kernel binary (`main.rs`) uses it on bare metal.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod bootparams;
pub mod cmdline;
pub mod entropy;
pub mod http;
pub mod isn;
pub mod kv;
pub mod mptable;
pub mod netconf;
pub mod pattern;
pub mod wire;
