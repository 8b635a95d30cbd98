//! Bodies on their way through regtee: boxed, counted, and cut when they stall.
//!
//! Bodies are never collected whole. [`Tracked`] forwards frames as they come, counting bytes for
//! the request log and metrics, signalling when the last byte has passed, and failing a stream
//! that makes no progress for the idle timeout. It measures only time spent waiting on the
//! stream itself, so a slow reader on the other side never trips it.

use std::any::Any;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::watch;

use crate::wait_limit::WaitLimit;

/// The error type of every body regtee produces.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of any origin.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body with no bytes.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of bytes already in hand (small things: manifests, JSON, error bodies).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose errors convert to [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Reads a body whole, up to `limit` bytes; a longer body is an error (for small things only:
/// manifests, listings, error bodies).
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    Ok(http_body_util::Limited::new(body, limit)
        .collect()
        .await?
        .to_bytes())
}

/// A stream that made no progress for too long.
#[derive(Debug, thiserror::Error)]
#[error("body made no progress for {0:?}")]
pub(crate) struct IdleTimeout(pub Duration);

/// Wraps a body to count, time out and signal its end. Build with [`Tracked::new`].
pub(crate) struct Tracked<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    /// How long the inner body may stay pending (see [`WaitLimit`] for why not a plain timer).
    idle: Option<WaitLimit>,
    waiting: bool,
    finished: Option<watch::Sender<bool>>,
    _guard: Option<Arc<dyn Any + Send + Sync>>,
}

impl<B> Tracked<B> {
    /// Counts bytes into `bytes`.
    pub(crate) fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Tracked {
            inner,
            bytes,
            idle: None,
            waiting: false,
            finished: None,
            _guard: None,
        }
    }

    /// Fails the stream when the inner body stays pending this long. An empty body (a GET, a
    /// HEAD answer) needs no timer, and gets none.
    pub(crate) fn idle_timeout(mut self, limit: Duration) -> Self
    where
        B: Body,
    {
        if !self.inner.is_end_stream() {
            self.idle = Some(WaitLimit::new(limit));
        }
        self
    }

    /// Sets `true` on the channel once the last byte has been handed on.
    pub(crate) fn signal_end(mut self, finished: watch::Sender<bool>) -> Self
    where
        B: Body,
    {
        if self.inner.is_end_stream() {
            finished.send_replace(true);
        }
        self.finished = Some(finished);
        self
    }

    /// Keeps `guard` alive for as long as the body; its `Drop` runs when the body is done with.
    pub(crate) fn hold(mut self, guard: Arc<dyn Any + Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }

    fn mark_finished(&self) {
        if let Some(tx) = &self.finished {
            tx.send_replace(true);
        }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.waiting {
            this.waiting = true;
            if let Some(idle) = this.idle.as_mut() {
                idle.start();
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if this.inner.is_end_stream() {
                    this.mark_finished();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.waiting = false;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.waiting = false;
                this.mark_finished();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(idle) = this.idle.as_mut()
                    && idle.expired(cx)
                {
                    return Poll::Ready(Some(Err(IdleTimeout(idle.limit()).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.mark_finished();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose idleness is timed by a task of its own, not by whoever polls it.
///
/// [`Tracked`]'s timer runs only while the body is polled. hyper's HTTP/2 server polls a
/// stream's body only when the client's flow-control window has room, so a client that never
/// opens its window would keep the body, and the upstream connection under it, for as long as
/// it stays. Here a task checks the time of the last frame handed on; when nothing has moved
/// for the limit, it drops the inner body (hyper then closes that upstream connection) and the
/// next poll, if one ever comes, is an [`IdleTimeout`] error. The task ends with the body.
pub(crate) struct Watched {
    shared: Arc<WatchedShared>,
}

struct WatchedShared {
    /// `None` once cut.
    inner: std::sync::Mutex<Option<ProxyBody>>,
    born: tokio::time::Instant,
    /// Milliseconds from `born` to the last frame handed on.
    last_progress_ms: AtomicU64,
    limit: Duration,
    dropped: tokio::sync::Notify,
}

impl Watched {
    /// Watches `inner`, which is cut after `limit` without a frame. A body with nothing to send
    /// needs no watching, and gets none.
    pub(crate) fn body<B>(inner: B, limit: Duration) -> ProxyBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if inner.is_end_stream() {
            return boxed(inner);
        }
        let shared = Arc::new(WatchedShared {
            inner: std::sync::Mutex::new(Some(boxed(inner))),
            born: tokio::time::Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            limit,
            dropped: tokio::sync::Notify::new(),
        });
        tokio::spawn(watch(shared.clone()));
        boxed(Watched { shared })
    }
}

/// Wakes when the current deadline passes; cuts the body if nothing moved since the last check.
async fn watch(shared: Arc<WatchedShared>) {
    let mut deadline = shared.born + shared.limit;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = shared.dropped.notified() => return,
        }
        let last =
            shared.born + Duration::from_millis(shared.last_progress_ms.load(Ordering::Relaxed));
        if tokio::time::Instant::now() >= last + shared.limit {
            let cut = shared
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(cut);
            return;
        }
        deadline = last + shared.limit;
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let shared = &self.shared;
        let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(body) = inner.as_mut() else {
            return Poll::Ready(Some(Err(IdleTimeout(shared.limit).into())));
        };
        let polled = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            let elapsed = shared.born.elapsed().as_millis() as u64;
            shared.last_progress_ms.store(elapsed, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.shared.dropped.notify_one();
    }
}

/// Cuts one stream into consecutive bodies of given lengths, without holding a chunk: each chunk
/// body pulls its bytes from the stream as it is sent. A frame that crosses a chunk boundary is
/// split (a cheap `Bytes` slice), its rest kept for the next chunk.
pub struct Chunks {
    state: Arc<std::sync::Mutex<ChunkSource>>,
}

struct ChunkSource {
    body: ProxyBody,
    leftover: Bytes,
}

/// A stream that ended before the length it promised.
#[derive(Debug, thiserror::Error)]
#[error("the stream ended {0} bytes before the chunk's end")]
pub(crate) struct EndedEarly(pub u64);

impl Chunks {
    /// Chunks of `body`.
    pub fn new(body: ProxyBody) -> Chunks {
        Chunks {
            state: Arc::new(std::sync::Mutex::new(ChunkSource {
                body,
                leftover: Bytes::new(),
            })),
        }
    }

    /// The next `len` bytes of the stream, as a body of exactly that length.
    pub fn next(&self, len: u64) -> ProxyBody {
        boxed(Chunk {
            state: self.state.clone(),
            remaining: len,
        })
    }
}

struct Chunk {
    state: Arc<std::sync::Mutex<ChunkSource>>,
    remaining: u64,
}

impl Body for Chunk {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let state = self.state.clone();
        let mut source = state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if !source.leftover.is_empty() {
                let take = source.leftover.len().min(self.remaining as usize);
                let data = source.leftover.split_to(take);
                self.remaining -= take as u64;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match Pin::new(&mut source.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        source.leftover = data;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    return Poll::Ready(Some(Err(EndedEarly(self.remaining).into())));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_bytes_and_signals_the_end() {
        let bytes = Arc::new(AtomicU64::new(0));
        let (tx, rx) = watch::channel(false);
        let body =
            Tracked::new(Full::new(Bytes::from_static(b"12345")), bytes.clone()).signal_end(tx);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), 5);
        assert_eq!(bytes.load(Ordering::Relaxed), 5);
        assert!(*rx.borrow());
    }

    #[tokio::test]
    async fn empty_body_is_finished_at_once() {
        let (tx, rx) = watch::channel(false);
        let _body = Tracked::new(Empty::<Bytes>::new(), Arc::default()).signal_end(tx);
        assert!(*rx.borrow());
    }

    /// A body that never yields, like a client that stopped sending.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn chunks_split_a_stream_across_frame_boundaries() {
        let frames = futures_util::stream::iter(
            [&b"abcde"[..], b"fgh", b"ijklmnop"]
                .map(|b| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b)))),
        );
        let chunks = Chunks::new(boxed(http_body_util::StreamBody::new(frames)));
        let mut got = Vec::new();
        for len in [4, 4, 4, 4] {
            got.push(chunks.next(len).collect().await.unwrap().to_bytes());
        }
        assert_eq!(got, ["abcd", "efgh", "ijkl", "mnop"]);
        let short = chunks.next(1).collect().await.unwrap_err();
        assert!(
            short.to_string().contains("ended 1 bytes before"),
            "{short}"
        );
    }

    /// Records its drop, as an upstream connection's body would be released.
    struct Held(Arc<std::sync::atomic::AtomicBool>);

    impl Body for Held {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_nobody_polls_is_cut_and_its_source_released() {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut body = Watched::body(Held(released.clone()), Duration::from_secs(5));
        // Read once: progress at 0 s. Then nobody polls, as hyper with a closed window.
        assert!(body.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!released.load(Ordering::SeqCst), "cut before the limit");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(released.load(Ordering::SeqCst), "the source is released");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("no progress"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_moves_is_never_cut() {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut body = Watched::body(Held(released.clone()), Duration::from_secs(5));
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert!(!released.load(Ordering::SeqCst));
        drop(body);
        tokio::task::yield_now().await;
        assert!(released.load(Ordering::SeqCst), "dropped with the body");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_is_cut() {
        let body = Tracked::new(Stalled, Arc::default()).idle_timeout(Duration::from_secs(5));
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("no progress"), "{err}");
    }
}
