//! Fuzz target: any bytes as an Ethernet frame from a guest through the compare
//! proxy's parser: never a panic, and what it returns lies inside the frame.
#![no_main]

use net_proxy::packet::{parse, Packet};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(packet) = parse(data) else { return };
    if let Packet::Tcp { key, .. } | Packet::Udp { key, .. } = &packet {
        assert_eq!(key.canonical(), key.reversed().canonical());
    }
    let payload = packet.payload();
    let frame = data.as_ptr_range();
    assert!(
        payload.is_empty()
            || (frame.start <= payload.as_ptr() && payload.as_ptr_range().end <= frame.end)
    );
});
