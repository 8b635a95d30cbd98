//! Connections whose peer stops reading are cut, on every socket regtee writes to.
//!
//! A peer that accepts a connection and then stops reading leaves writes pending forever: no
//! timeout regtee has for answers or bodies fires, because nothing is waiting to be read. A write
//! only pends while the peer reads nothing, so a write that stays pending for the limit is a
//! stall: it fails with `TimedOut`, the request fails, and the job retries or the client is cut.
//! The timer exists only while a write is pending; a connection that writes freely never has one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};

use crate::wait_limit::WaitLimit;

/// The write-stall timer of one connection.
pub(crate) struct WriteStall {
    limit: WaitLimit,
    /// A write is pending.
    armed: bool,
}

impl WriteStall {
    /// Writes may stay pending for at most `limit`.
    pub(crate) fn new(limit: Duration) -> WriteStall {
        WriteStall {
            limit: WaitLimit::new(limit),
            armed: false,
        }
    }

    /// Passes a write's poll result through, arming the timer while it is pending and failing
    /// it once the timer has run out.
    pub(crate) fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.armed = true;
            self.limit.start();
        }
        if self.limit.expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {:?}", self.limit.limit()),
            )));
        }
        Poll::Pending
    }
}

/// A client connection (hyper's I/O traits) with a [`WriteStall`].
pub struct Guarded<IO> {
    io: IO,
    stall: WriteStall,
}

impl<IO: hyper::rt::Read + Unpin> hyper::rt::Read for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: hyper::rt::Write + Unpin> hyper::rt::Write for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.stall.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.stall.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.stall.watch(cx, polled)
    }
}

impl<IO: Connection> Connection for Guarded<IO> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

/// A connector whose connections are [`Guarded`].
#[derive(Clone)]
pub struct GuardedConnector<C> {
    inner: C,
    limit: Duration,
}

impl<C> GuardedConnector<C> {
    /// Wraps `inner`; writes on its connections may pend for at most `limit`.
    pub fn new(inner: C, limit: Duration) -> Self {
        GuardedConnector { inner, limit }
    }
}

impl<C> tower_service::Service<http::Uri> for GuardedConnector<C>
where
    C: tower_service::Service<http::Uri>,
    C::Future: Send + 'static,
{
    type Response = Guarded<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            Ok(Guarded {
                io: connecting.await?,
                stall: WriteStall::new(limit),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_past_the_limit_fails_and_progress_disarms_it() {
        let mut stall = WriteStall::new(Duration::from_secs(10));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(stall.watch::<()>(&mut cx, Poll::Pending).is_pending());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(stall.watch::<()>(&mut cx, Poll::Pending).is_pending());
        // Progress: the clock starts again with the next pending write.
        assert!(stall.watch(&mut cx, Poll::Ready(Ok(()))).is_ready());
        assert!(stall.watch::<()>(&mut cx, Poll::Pending).is_pending());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(stall.watch::<()>(&mut cx, Poll::Pending).is_pending());
        tokio::time::advance(Duration::from_secs(5)).await;
        match stall.watch::<()>(&mut cx, Poll::Pending) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("{other:?}"),
        }
    }
}
