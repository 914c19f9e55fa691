//! Rate-limited logging for anything a guest or a client can trigger: a
//! driver that misbehaves in a loop must not flood the VMM's log. The
//! macros serve call sites in this crate; [`LogLimit`] serves the VMM's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Least time between two messages of one call site, in milliseconds.
const INTERVAL_MS: u64 = 1000;

/// One call site's budget: a message per interval (a second unless
/// [`LogLimit::every_ms`] says otherwise), counting the ones it held back.
#[derive(Debug)]
pub struct LogLimit {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
    interval_ms: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let ms = START.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

impl LogLimit {
    pub const fn new() -> Self {
        Self::every_ms(INTERVAL_MS)
    }

    /// At most one message per `interval_ms`.
    pub const fn every_ms(interval_ms: u64) -> Self {
        Self {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            interval_ms,
        }
    }

    /// `Some(messages held back since the last one)` when this one may be
    /// logged.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// A `tracing` event of `$level` at most once a second per call site; the
/// next message after a quiet spell says how many were held back
/// (`suppressed`).
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            tracing::event!(tracing::Level::$level, suppressed, $($arg)+);
        }
    }};
}

/// [`log_limited`] at WARN.
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::ratelimit::log_limited!(WARN, $($arg)+) };
}

/// [`log_limited`] at ERROR.
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::ratelimit::log_limited!(ERROR, $($arg)+) };
}

pub(crate) use {error_limited, log_limited, warn_limited};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_interval_and_the_rest_counted() {
        let limit = LogLimit::new();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        // Open the window again without waiting a second.
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(2));
    }
}
