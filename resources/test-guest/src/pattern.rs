//! The memory workload's verifiable pattern.
//!
//! The workload walks its buffer page by page, rewriting each page it visits
//! with the values of the current *pass*; when it reaches the end it starts
//! the next pass from the first page. So at any moment, pages before the
//! cursor hold pass `p` and pages from the cursor on hold pass `p - 1`
//! (or are untouched, in pass 0). Each 8-byte word is a mix of its page,
//! pass and index, so a page copied from elsewhere, a stale page or a
//! flipped bit is caught.

/// The seed of page `page` in `pass`: a strong mix of both, computed once
/// per page so that filling a page costs little more than a memset (guest
/// kernel code is slow on the KVM we test on).
pub fn page_seed(page: u64, pass: u64) -> u64 {
    let mut x = page
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(pass.wrapping_mul(0xc2b2_ae3d_27d4_eb4f));
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

/// Value of word `index` of the page whose seed is `seed`.
pub fn word_from_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_mul(0x1656_67b1_9e37_79f9)
}

/// Value of word `index` of page `page` written in `pass`.
pub fn word(page: u64, pass: u64, index: u64) -> u64 {
    word_from_seed(page_seed(page, pass), index)
}

/// Words of a page that self-check `generation` verifies: one in every
/// [`CHECK_STRIDE`], starting at a different offset each generation, so
/// that every word is verified once per `CHECK_STRIDE` generations.
pub fn checked_words(generation: u64, words_per_page: u64) -> impl Iterator<Item = u64> {
    (generation % CHECK_STRIDE..words_per_page).step_by(CHECK_STRIDE as usize)
}

/// See [`checked_words`].
pub const CHECK_STRIDE: u64 = 32;

/// The pass page `page` holds when the cursor is at `cursor` in `pass`, or
/// `None` when it was never written.
pub fn expected_pass(page: u64, cursor: u64, pass: u64) -> Option<u64> {
    if page < cursor {
        Some(pass)
    } else if pass > 0 {
        Some(pass - 1)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_differ_by_page_pass_and_index() {
        let w = word(3, 4, 5);
        assert_ne!(w, word(4, 4, 5));
        assert_ne!(w, word(3, 5, 5));
        assert_ne!(w, word(3, 4, 6));
        assert_eq!(w, word(3, 4, 5));
    }

    #[test]
    fn every_word_is_checked_once_per_stride_generations() {
        let mut seen = [0u32; 512];
        for g in 0..CHECK_STRIDE {
            for i in checked_words(g, 512) {
                seen[i as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        assert_eq!(checked_words(5, 512).count(), 16);
    }

    #[test]
    fn pages_before_the_cursor_hold_the_current_pass() {
        assert_eq!(expected_pass(0, 2, 0), Some(0));
        assert_eq!(expected_pass(2, 2, 0), None);
        assert_eq!(expected_pass(5, 2, 3), Some(2));
        assert_eq!(expected_pass(1, 2, 3), Some(3));
    }
}
