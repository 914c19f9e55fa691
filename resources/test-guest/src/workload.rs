//! The memory workload: dirties a buffer at a chosen rate with a verifiable
//! pattern (see `colo_test_guest::pattern`) and checks all of it every
//! second. Under COLO or snapshot/restore, a page the VMM failed to carry
//! over shows up as a self-check failure.

use colo_test_guest::pattern::{checked_words, expected_pass, page_seed, word_from_seed};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;

/// A buffer of guest pages and where the workload is in it.
pub struct Workload {
    base: u64,
    pages: u64,
    pages_per_s: u64,
    cursor: u64,
    pass: u64,
    written: u64,
    start_ns: u64,
    pub generation: u64,
}

/// A word that did not hold what the pattern says.
pub struct Mismatch {
    pub page: u64,
    pub index: u64,
    pub expected: u64,
    pub found: u64,
}

impl Workload {
    /// A workload over `[base, base + bytes)` dirtying `mib_per_s` MiB/s.
    ///
    /// # Safety
    /// The range must be identity-mapped RAM that nothing else uses.
    pub unsafe fn new(base: u64, bytes: u64, mib_per_s: u64, start_ns: u64) -> Self {
        Self {
            base,
            pages: bytes / PAGE,
            pages_per_s: mib_per_s * (1 << 20) / PAGE,
            cursor: 0,
            pass: 0,
            written: 0,
            start_ns,
            generation: 0,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn page_ptr(&self, page: u64) -> *mut u64 {
        (self.base + page * PAGE) as *mut u64
    }

    /// Writes the pages due at the configured rate, stopping early when
    /// `clock()` passes `deadline_ns`: a rate the CPU cannot sustain slows
    /// the workload down instead of starving everything else.
    pub fn step(&mut self, clock: impl Fn() -> u64, deadline_ns: u64) {
        let now_ns = clock();
        let due = u128::from(now_ns - self.start_ns) * u128::from(self.pages_per_s) / 1_000_000_000;
        while u128::from(self.written) < due && clock() < deadline_ns {
            let ptr = self.page_ptr(self.cursor);
            let seed = page_seed(self.cursor, self.pass);
            for i in 0..WORDS {
                // SAFETY: the page is inside the buffer `new`'s caller vouched for.
                unsafe { ptr.add(i as usize).write_volatile(word_from_seed(seed, i)) };
            }
            self.written += 1;
            self.cursor += 1;
            if self.cursor == self.pages {
                self.cursor = 0;
                self.pass += 1;
            }
        }
    }

    /// Verifies every written page (a rotating sample of its words, see
    /// `checked_words`); counts a generation when all is well.
    pub fn self_check(&mut self) -> Result<u64, Mismatch> {
        for page in 0..self.pages {
            let Some(pass) = expected_pass(page, self.cursor, self.pass) else {
                continue;
            };
            let ptr = self.page_ptr(page);
            let seed = page_seed(page, pass);
            for index in checked_words(self.generation, WORDS) {
                // SAFETY: as in `step`.
                let found = unsafe { ptr.add(index as usize).read_volatile() };
                let expected = word_from_seed(seed, index);
                if found != expected {
                    return Err(Mismatch {
                        page,
                        index,
                        expected,
                        found,
                    });
                }
            }
        }
        self.generation += 1;
        Ok(self.generation)
    }

    /// MiB written so far.
    pub fn written_mib(&self) -> u64 {
        self.written * PAGE >> 20
    }
}
