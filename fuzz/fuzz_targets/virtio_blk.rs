//! Fuzz target: virtio-blk request chains, well-formed or not, with pokes into the rings.
//! The body is `devices::fuzz::virtio_blk`, which the unit tests also run briefly.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzz::virtio_blk(data));
