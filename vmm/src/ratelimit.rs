//! Rate limiting for warnings a guest or a client can repeat at will.

use std::time::{Duration, Instant};

/// At most one warning per this period for something that can repeat.
const WARN_PERIOD: Duration = Duration::from_secs(10);

/// Lets a warning through at most once per [`WARN_PERIOD`], counting the
/// ones it held back.
#[derive(Debug, Default)]
pub struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(n)` when a warning may go out now, `n` being how many were
    /// held back since the last one; `None` to stay quiet.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_PERIOD)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_period_and_the_rest_counted() {
        let mut limit = RateLimit::default();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        limit.last = Instant::now().checked_sub(WARN_PERIOD);
        assert_eq!(limit.allow(), Some(2));
    }
}
