//! Log lines that a scanner, a misconfigured client or a retry loop cannot turn into a flood.
//!
//! Some warnings are worth one line, not one per connection: a client speaking TLS to the plain
//! port retries in a loop, and a port scanner sends garbage to every listener. A [`Throttle`]
//! lets one line through per interval and counts the rest, so the next line can say how many
//! were held back.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one event through per interval.
pub(crate) struct Throttle {
    interval_ms: u64,
    /// Milliseconds since [`epoch`] when the last line was allowed, plus one (0 = never).
    last: AtomicU64,
    held_back: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Throttle {
    /// One line per `interval`.
    pub(crate) const fn new(interval: Duration) -> Throttle {
        Throttle {
            interval_ms: interval.as_millis() as u64,
            last: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` when this one is held back.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed().as_millis() as u64 + 1)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_a_count_of_the_rest() {
        let t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.allow_at(1_000), Some(0));
        assert_eq!(t.allow_at(2_000), None);
        assert_eq!(t.allow_at(60_999), None);
        assert_eq!(t.allow_at(61_000), Some(2));
        assert_eq!(t.allow_at(61_001), None);
        assert_eq!(t.allow_at(200_000), Some(1));
    }
}
