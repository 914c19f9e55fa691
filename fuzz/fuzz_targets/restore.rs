//! Fuzz target: postcard bytes as each device's saved state: validated, restored, run.
//! The body is `devices::fuzz::restore`, which the unit tests also run briefly.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzz::restore(data));
