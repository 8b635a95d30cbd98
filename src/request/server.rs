//! Listeners: accept, TLS, HTTP/1.1 and HTTP/2, and a graceful drain on shutdown.
//!
//! The same accept loop serves the proxy listeners and the admin listener; only the service
//! differs. On shutdown a loop stops accepting, asks every connection to finish its in-flight
//! requests, and gives them the grace period before dropping what remains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::origin::Scheme;
use crate::stall::WriteStall;
use crate::throttle::Throttle;

/// Facts about the client connection a request arrived on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connection {
    /// Which listener: decides the scheme of rewritten URLs.
    pub scheme: Scheme,
    /// The client's address, for `X-Forwarded-For`.
    pub peer: SocketAddr,
    /// Our address, the fallback public origin when a request has no `Host`.
    pub local: SocketAddr,
}

/// Limits that apply to every connection of a listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    /// Longest wait for a request head (and for a TLS handshake); also ends idle keep-alives.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may continue after shutdown begins.
    pub shutdown_grace: Duration,
    /// How long a write to the client may stay pending (it reads nothing) before the connection
    /// is cut.
    pub write_stall: Duration,
}

/// Serves `listener` until `cancel` fires, then drains.
pub(crate) async fn serve<S, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    cancel: CancellationToken,
    service: S,
) where
    S: Fn(Request<Incoming>, Connection) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send + 'static,
{
    let scheme = if tls.is_some() {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, %local, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            scheme,
            peer,
            local,
        };
        let service = service.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let svc = service_fn(move |req| service(req, conn));
            match tls {
                // Registry clients speak HTTP/1.1 in the clear. The first bytes are looked at
                // as they pass (no extra read, no wait) to tell a client that tried TLS here.
                None => {
                    let io = Watched::new(stream, limits.write_stall, None, Some(peer));
                    serve_connection(io, svc, limits, false, watcher).await
                }
                Some(acceptor) => {
                    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
                    if !starts_like_tls(&mut stream, peer, deadline).await {
                        return;
                    }
                    let handshake =
                        tokio::time::timeout_at(deadline, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(tls_stream)) => {
                            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            // HTTP/2 has no request-head timeout: bound the wait for the preface.
                            let limit = h2.then_some(limits.header_read_timeout);
                            let io = Watched::new(tls_stream, limits.write_stall, limit, None);
                            serve_connection(io, svc, limits, h2, watcher).await
                        }
                        Ok(Err(e)) => handshake_failed(peer, &e),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            %local,
            grace = ?limits.shutdown_grace,
            "connections still busy after the grace period were closed"
        );
    }
}

async fn serve_connection<IO, S>(
    io: IO,
    service: S,
    limits: ConnectionLimits,
    h2: bool,
    watcher: hyper_util::server::graceful::Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = if h2 {
        let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(TokioIo::new(io), service);
        watcher.watch(conn.into_owned()).await
    } else {
        let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        watcher.watch(conn.into_owned()).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Watches a client connection. Its first read: fails if the peer sends nothing at all within
/// the deadline (HTTP/2, where a silent client would otherwise hold a connection forever), and
/// recognises a TLS ClientHello on the plain listener. Its writes: cut when the client stops
/// reading ([`WriteStall`]). Otherwise a plain pass-through.
struct Watched<IO> {
    io: IO,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set on the plain listener: the peer, to name in the warning.
    sniff_tls_from: Option<SocketAddr>,
    stall: WriteStall,
}

impl<IO> Watched<IO> {
    fn new(
        io: IO,
        write_stall: Duration,
        first_read: Option<Duration>,
        sniff_tls_from: Option<SocketAddr>,
    ) -> Self {
        Watched {
            io,
            deadline: first_read.map(|l| Box::pin(tokio::time::sleep(l))),
            sniff_tls_from,
            stall: WriteStall::new(write_stall),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let first = &buf.filled()[before..];
                if !first.is_empty() {
                    this.deadline = None;
                    if let Some(peer) = this.sniff_tls_from.take()
                        && is_tls_client_hello(first)
                    {
                        tls_on_plain_listener(peer);
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if let Some(deadline) = this.deadline.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client sent nothing after connecting",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

/// A TLS record header: handshake (22), protocol major version 3 (RFC 8446 §5.1).
fn is_tls_client_hello(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}

static TLS_ON_PLAIN: Throttle = Throttle::new(Duration::from_secs(60));
static PLAIN_ON_TLS: Throttle = Throttle::new(Duration::from_secs(60));
static HANDSHAKE_FAILED: Throttle = Throttle::new(Duration::from_secs(60));

fn tls_on_plain_listener(peer: SocketAddr) {
    // Docker probes HTTPS first even for insecure registries and falls back to HTTP, so this is
    // also seen from clients that work: info, not warn.
    if let Some(held_back) = TLS_ON_PLAIN.allow() {
        tracing::info!(
            %peer,
            held_back,
            "a client tried TLS on the plain listener: use the HTTPS port, or add regtee to the client's insecure-registries (docker falls back to HTTP by itself once it is there)"
        );
    }
}

/// Waits (until `deadline`) for the first byte on the TLS listener. A client speaking plain HTTP
/// gets a plain-text 400 that says so, as Go's servers answer; returns whether to go on with the
/// handshake.
async fn starts_like_tls(
    stream: &mut tokio::net::TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => {}
        Ok(Ok(1)) => return true,
        // Closed, failed or silent: nothing to serve.
        _ => return false,
    }
    if let Some(held_back) = PLAIN_ON_TLS.allow() {
        tracing::warn!(
            %peer,
            held_back,
            "a client spoke plain HTTP to the HTTPS listener: use https:// for this port, or the plain listener"
        );
    }
    const BODY: &str = "This is regtee's HTTPS port: the client sent plain HTTP. Use https://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // Take the request off the wire first: closing a socket with unread bytes resets it, and
    // the reset can destroy the answer before the client reads it.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut request = [0u8; 4096];
    let exchange = async {
        let _ = stream.read(&mut request).await;
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut request).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout_at(deadline, exchange).await;
    false
}

fn handshake_failed(peer: SocketAddr, error: &std::io::Error) {
    let Some(held_back) = HANDSHAKE_FAILED.allow() else {
        return;
    };
    let reason = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    let hint = match reason {
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateUnknown,
        )) => {
            "the client does not trust regtee's certificate: give it the CA that signed tls_cert (see certs/README.md), or use a certificate it already trusts"
        }
        Some(rustls::Error::PeerIncompatible(_)) => {
            "the client offers no TLS version or cipher regtee accepts (TLS 1.2 or 1.3)"
        }
        _ => "see the reason",
    };
    tracing::warn!(%peer, held_back, reason = %error, "TLS handshake failed: {hint}");
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        this.stall.watch(cx, polled)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.io).poll_flush(cx);
        this.stall.watch(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.stall.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Binds a TCP listener, naming the address in the error.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Wraps a rustls config as an acceptor.
pub(crate) fn acceptor(config: rustls::ServerConfig) -> TlsAcceptor {
    TlsAcceptor::from(Arc::new(config))
}
