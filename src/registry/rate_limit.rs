//! A registry's rate limits (`max_bytes_per_second`, `max_requests_per_second`) as token
//! buckets (governor's GCRA) owned by its client, so one limit holds for the registry as a
//! whole, however many of its workers are copying. Waiting is a timer, never a blocked thread:
//! a throttled target delays only its own transfers, not the proxy path or another target.

use std::num::{NonZeroU32, NonZeroU64};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::body::{self, ProxyBody};
use crate::config::RateLimits;

/// Bytes are metered in cells of this size: the bucket's arithmetic stays exact at any rate
/// from 1 KiB/s to terabytes a second.
const CELL: u64 = 1024;

/// One bucket: `rate` cells a second, bursting at most a tenth of a second's worth, so a
/// measured rate is within a few percent of the limit over any stretch of a second or more.
struct Bucket {
    limiter: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
    clock: DefaultClock,
    burst: NonZeroU32,
}

impl Bucket {
    fn new(rate: NonZeroU32) -> Bucket {
        let burst = NonZeroU32::new(rate.get() / 10).unwrap_or(NonZeroU32::MIN);
        let clock = DefaultClock::default();
        let quota = Quota::per_second(rate).allow_burst(burst);
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            burst,
        }
    }

    /// Takes up to a burst of `cells`: how many were taken, or how long until they can be.
    fn try_take(&self, cells: u64) -> Result<u64, Duration> {
        let n = cells.min(u64::from(self.burst.get()));
        let Some(wanted) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return Ok(0);
        };
        match self.limiter.check_n(wanted) {
            Ok(Ok(())) => Ok(n),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            // Cannot happen (n is at most the burst); taking nothing keeps a transfer moving.
            Err(_) => Ok(n),
        }
    }

    async fn take(&self, mut cells: u64) {
        while cells > 0 {
            match self.try_take(cells) {
                Ok(taken) => cells -= taken,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// The buckets of one registry client.
#[derive(Clone, Default)]
pub(super) struct Limits {
    bytes: Option<Arc<Bucket>>,
    requests: Option<Arc<Bucket>>,
}

impl Limits {
    pub(super) fn new(config: &RateLimits) -> Limits {
        let kib = |b: NonZeroU64| {
            let cells = (b.get() / CELL).clamp(1, u64::from(u32::MAX));
            NonZeroU32::new(cells as u32).unwrap_or(NonZeroU32::MIN)
        };
        Limits {
            bytes: config
                .bytes_per_second
                .map(|b| Arc::new(Bucket::new(kib(b)))),
            requests: config.requests_per_second.map(|r| Arc::new(Bucket::new(r))),
        }
    }

    /// Waits for the right to send one request.
    pub(super) async fn request(&self) {
        if let Some(bucket) = &self.requests {
            bucket.take(1).await;
        }
    }

    /// `content`, paced to the byte limit (unchanged without one).
    pub(super) fn throttle(&self, content: ProxyBody) -> ProxyBody {
        match &self.bytes {
            Some(bucket) => body::boxed(Throttled {
                inner: content,
                bucket: bucket.clone(),
                held: None,
                owed: 0,
                carry: 0,
                sleep: None,
            }),
            None => content,
        }
    }
}

/// A body whose data frames wait for their share of a byte bucket before they go.
struct Throttled {
    inner: ProxyBody,
    bucket: Arc<Bucket>,
    /// A frame read from `inner`, waiting for `owed` cells.
    held: Option<Frame<Bytes>>,
    owed: u64,
    /// Bytes seen that do not yet make a whole cell.
    carry: u64,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Body for Throttled {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, body::BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = &mut this.sleep {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            if this.held.is_some() {
                while this.owed > 0 {
                    match this.bucket.try_take(this.owed) {
                        Ok(taken) => this.owed -= taken,
                        Err(wait) => {
                            this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                            break;
                        }
                    }
                }
                if this.owed == 0 {
                    return Poll::Ready(this.held.take().map(Ok));
                }
                continue;
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.carry += data.len() as u64;
                        this.owed = this.carry / CELL;
                        this.carry %= CELL;
                    }
                    this.held = Some(frame);
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self
            .held
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn limits(bytes: Option<u64>, requests: Option<u32>) -> Limits {
        Limits::new(&RateLimits {
            bytes_per_second: bytes.and_then(NonZeroU64::new),
            requests_per_second: requests.and_then(NonZeroU32::new),
        })
    }

    #[tokio::test]
    async fn a_throttled_body_keeps_every_byte_in_order() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let frames = data
            .chunks(7_000)
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>();
        let source = body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let throttled = limits(Some(10 * 1024 * 1024), None).throttle(source);
        let out = throttled.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], &data[..]);
    }

    #[tokio::test]
    async fn a_burst_beyond_the_bucket_waits() {
        // 20 requests a second bursts 2: the third of three requests must wait ~50 ms.
        let l = limits(None, Some(20));
        let start = std::time::Instant::now();
        for _ in 0..3 {
            l.request().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn no_limits_change_nothing() {
        let l = limits(None, None);
        assert!(l.bytes.is_none() && l.requests.is_none());
        l.request().await;
        let out = l
            .throttle(body::full("abc"))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&out[..], b"abc");
    }
}
