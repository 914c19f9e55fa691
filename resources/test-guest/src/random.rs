//! The guest's randomness: RDRAND when CPUID reports it and it delivers,
//! always mixed with the time-stamp counter, so that two copies of the
//! guest started from the same state draw different numbers (see
//! `colo_test_guest::entropy` for the mixing).

use colo_test_guest::entropy::Pool;

use crate::arch::{cpuid, rdrand, rdtsc};

const CPUID_ECX_RDRAND: u32 = 1 << 30;
/// Intel's advice: RDRAND may transiently fail; retry a few times.
const RDRAND_TRIES: usize = 10;
/// Iterations of the loop timed for jitter, see [`tsc_sample`].
const JITTER_LOOP: u64 = 64;

/// Where random numbers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Rdrand,
    Rdtsc,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Rdrand => "rdrand",
            Source::Rdtsc => "rdtsc",
        }
    }
}

/// A random-number generator for ring 3.
pub struct Random {
    source: Source,
    pool: Pool,
}

fn rdrand_retrying() -> Option<u64> {
    (0..RDRAND_TRIES).find_map(|_| rdrand())
}

/// The TSC now, and how many cycles a short loop took (which varies with
/// caches, interrupts and the host): two reads of the counter folded into
/// one sample.
fn tsc_sample() -> u64 {
    let start = rdtsc();
    let mut x = start;
    for i in 0..JITTER_LOOP {
        x = core::hint::black_box(x.rotate_left(5) ^ i);
    }
    let took = rdtsc().wrapping_sub(start);
    start ^ took.rotate_left(32) ^ x
}

impl Random {
    /// Probes RDRAND: used when CPUID has it and two reads give numbers
    /// that differ (a broken RDRAND returns a constant, all ones on some
    /// CPUs), unless `tsc_only` (`rand_source=rdtsc`, to test the
    /// fallback where RDRAND exists).
    pub fn new(tsc_only: bool) -> Self {
        let has_rdrand = !tsc_only && cpuid(1).2 & CPUID_ECX_RDRAND != 0;
        let works = has_rdrand
            && matches!((rdrand_retrying(), rdrand_retrying()), (Some(a), Some(b)) if a != b);
        let source = if works { Source::Rdrand } else { Source::Rdtsc };
        Self {
            source,
            pool: Pool::new(tsc_sample()),
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// The next random number: a fresh TSC sample (and RDRAND's number when
    /// it is the source) stirred into the pool.
    pub fn next_u64(&mut self) -> u64 {
        let mut sample = tsc_sample();
        if self.source == Source::Rdrand {
            sample ^= rdrand_retrying().unwrap_or(0).rotate_left(17);
        }
        self.pool.stir(sample)
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}
