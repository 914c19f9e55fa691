//! Fuzz target: any bytes as a stream of frames, both directions, through
//! the secondary's TCP rewriter. The body is `net_proxy::rewrite::fuzz::stream`,
//! which the unit tests also run on random streams and on fuzz/regressions/rewrite/.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| net_proxy::rewrite::fuzz::stream(data));
