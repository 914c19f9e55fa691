//! Randomness for the guest's non-deterministic services (`GET /rand`,
//! TCP initial sequence numbers and ephemeral ports): mixing of hardware
//! samples (RDRAND, RDTSC) into a pool, and what the services derive from
//! it. The samples themselves are read by the kernel binary.

use alloc::string::String;

/// The SplitMix64 finaliser: every input bit affects every output bit.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A 64-bit pool that samples are stirred into; each output depends on
/// every sample so far.
#[derive(Clone, Debug)]
pub struct Pool {
    state: u64,
}

impl Pool {
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Stirs `sample` in and returns the next output.
    pub fn stir(&mut self, sample: u64) -> u64 {
        self.state = mix64(self.state.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ sample);
        self.state
    }
}

/// First port of the IANA dynamic range, where connections the guest opens
/// take their local port.
pub const EPHEMERAL_FIRST: u16 = 49152;

/// An ephemeral port (49152..=65535) from a random number.
pub fn ephemeral_port(random: u64) -> u16 {
    let span = u64::from(u16::MAX - EPHEMERAL_FIRST) + 1;
    EPHEMERAL_FIRST + (random % span) as u16
}

/// How many of smoltcp's sequence-number draws to skip before a connection
/// may pick its ISN: smoltcp draws ISNs from a generator seeded once, so
/// skipping a random number of draws is how a new connection's ISN comes to
/// depend on the time (see [`crate::isn`]). Two copies of the guest pick
/// the same ISN for a connection with a chance of one in this.
pub const ISN_SKIP_RANGE: u64 = 65536;

/// The number of draws to skip, below [`ISN_SKIP_RANGE`].
pub fn isn_skip(random: u64) -> u32 {
    (random % ISN_SKIP_RANGE) as u32
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_outputs_depend_on_every_sample() {
        let mut a = Pool::new(1);
        let mut b = Pool::new(1);
        assert_eq!(a.stir(7), b.stir(7));
        // One TSC tick apart: unrelated outputs from then on.
        let (x, y) = (a.stir(1000), b.stir(1001));
        assert_ne!(x, y);
        assert!((x ^ y).count_ones() > 10, "{x:#x} {y:#x}");
        assert_ne!(a.stir(5), b.stir(5));
        // The same sample twice still moves the pool.
        let mut c = Pool::new(0);
        assert_ne!(c.stir(0), c.stir(0));
    }

    #[test]
    fn ports_and_skips_stay_in_range() {
        assert_eq!(ephemeral_port(0), 49152);
        assert_eq!(ephemeral_port(16383), 65535);
        assert_eq!(ephemeral_port(16384), 49152);
        assert_eq!(ephemeral_port(u64::MAX), 65535);
        assert_eq!(isn_skip(ISN_SKIP_RANGE + 3), 3);
        assert!(isn_skip(u64::MAX) < ISN_SKIP_RANGE as u32);
    }

    #[test]
    fn hex_of_bytes() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }
}
