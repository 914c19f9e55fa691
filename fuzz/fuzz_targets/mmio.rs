//! Fuzz target: register reads and writes of any width and offset on a virtio-mmio transport.
//! The body is `devices::fuzz::mmio`, which the unit tests also run briefly.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzz::mmio(data));
