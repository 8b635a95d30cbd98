//! "This wait has lasted too long", for waits that start and end thousands of times a second.
//!
//! A body frame or a socket write waits briefly many times per MiB. Resetting a tokio timer for
//! each wait moves it in the timer wheel every time: a tenth of the proxy's CPU on a pull,
//! measured with callgrind. A [`WaitLimit`] only notes when each wait starts; its one timer,
//! when it fires, is moved on to the current wait's deadline if that has not passed. While
//! data flows the timer is touched at most once per `limit`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A limit on how long any one wait may last.
pub(crate) struct WaitLimit {
    limit: Duration,
    /// Created at the first wait that pends; never later than the current wait's deadline.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait began.
    since: Instant,
}

impl WaitLimit {
    /// Waits may last at most `limit`.
    pub(crate) fn new(limit: Duration) -> WaitLimit {
        WaitLimit {
            limit,
            timer: None,
            since: Instant::now(),
        }
    }

    /// The limit.
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// A new wait begins now.
    pub(crate) fn start(&mut self) {
        self.since = Instant::now();
    }

    /// Whether the current wait has lasted the limit; if not, `cx` is woken when it might have.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.since + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        while timer.as_mut().poll(cx) == Poll::Ready(()) {
            if Instant::now() >= deadline {
                return true;
            }
            timer.as_mut().reset(deadline);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expired(limit: &mut WaitLimit) -> bool {
        limit.expired(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_expires_after_the_limit_and_a_new_wait_starts_afresh() {
        let mut limit = WaitLimit::new(Duration::from_secs(10));
        limit.start();
        assert!(!expired(&mut limit));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!expired(&mut limit));
        // A new wait: the timer set for the first one fires at 10 s, and is moved on.
        limit.start();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!expired(&mut limit), "12 s in, but the wait began at 6 s");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(expired(&mut limit), "this wait has lasted 10 s");
    }
}
