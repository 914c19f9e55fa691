//! Pure logic of colo-test-guest, kept free of hardware access so that it is
//! unit-tested on the host (`cargo test` with the host toolchain) while the
//! kernel binary (`main.rs`) uses it on bare metal.

#![cfg_attr(not(test), no_std)]

pub mod bootparams;
pub mod cmdline;
pub mod mptable;
pub mod pattern;
