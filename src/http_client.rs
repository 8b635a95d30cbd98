//! The pooled HTTP(S) client regtee uses toward every registry.
//!
//! One pool per remote endpoint, because TLS trust differs per endpoint. Connections are kept
//! alive (with a timer, without which hyper's idle timeout silently does nothing) and closed
//! before the remote's own keep-alive limit so a request never lands on a half-closed socket.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::stall::GuardedConnector;
use crate::tls::ClientTls;
use crate::tls::{TlsError, client_config};

/// A pooled client that speaks HTTP and HTTPS, its connections cut when the peer stops reading.
pub type HttpClient = Client<GuardedConnector<HttpsConnector<HttpConnector>>, ProxyBody>;

/// Builds a pooled client with the endpoint's TLS trust and timeouts; a write that pends for
/// `write_stall` (the peer reads nothing) fails the request.
pub fn build(
    tls: &ClientTls,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    write_stall: Duration,
) -> Result<HttpClient, TlsError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(tls)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let guarded = GuardedConnector::new(https, write_stall);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_max_idle_per_host(64)
        .build(guarded))
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No response head within the timeout after the body was sent.
    Timeout,
    /// Connection or protocol failure.
    Failed(hyper_util::client::legacy::Error),
}

/// Wraps a request body so its end is observable, for [`send_with_deadline`].
pub(crate) fn track_end(
    request: http::Request<ProxyBody>,
) -> (http::Request<ProxyBody>, tokio::sync::watch::Receiver<bool>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (parts, body) = request.into_parts();
    let body = crate::body::Tracked::new(body, Default::default()).signal_end(tx);
    (
        http::Request::from_parts(parts, crate::body::boxed(body)),
        rx,
    )
}

/// Sends a request; the response deadline starts only once the request body has been sent, so
/// a multi-gigabyte upload is never cut for taking long.
pub(crate) async fn send_with_deadline(
    client: &HttpClient,
    request: http::Request<ProxyBody>,
    mut body_sent: tokio::sync::watch::Receiver<bool>,
    timeout: Duration,
) -> Result<http::Response<hyper::body::Incoming>, SendError> {
    let deadline = async {
        // An error means the body was dropped: the request future then fails on its own.
        let _ = body_sent.wait_for(|sent| *sent).await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        result = client.request(request) => result.map_err(SendError::Failed),
        () = deadline => Err(SendError::Timeout),
    }
}
