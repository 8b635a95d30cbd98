//! The link to Harbor every request regtee forwards goes over: its origin as URIs and `Host` need
//! it (built once), the pooled client, the response deadline, and failures turned into regtee's
//! own error answers. The proxy forwards through it; the read path asks through it.

use std::time::Duration;

use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::{self, ProxyBody};
use crate::config::UpstreamConfig;
use crate::error::{OciError, error_chain};
use crate::http_client::{self, HttpClient, SendError};
use crate::oci::error_code::ErrorCode;
use crate::origin::{Origin, Scheme};
use crate::request::headers;
use crate::request::server::Connection;
use crate::tls::TlsFailure;

/// Why the link to Harbor cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream URL cannot be sent as a request's authority or `Host`.
    #[error("[upstream] url {0}: not usable as a request authority")]
    UpstreamAuthority(String),
    /// The client toward Harbor could not be built (its TLS settings).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Harbor, as the request path reaches it.
pub(crate) struct Upstream {
    pub(crate) origin: Origin,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// `Host` for requests to Harbor.
    pub(crate) host: http::HeaderValue,
    client: HttpClient,
    response_timeout: Duration,
}

impl Upstream {
    /// The link for `upstream`; bodies idle `body_idle_timeout` are cut.
    pub(crate) fn new(
        upstream: &UpstreamConfig,
        body_idle_timeout: Duration,
    ) -> Result<Upstream, UpstreamError> {
        let e = &upstream.endpoint;
        let authority = e.origin.authority();
        let invalid = || UpstreamError::UpstreamAuthority(e.origin.to_string());
        Ok(Upstream {
            origin: e.origin.clone(),
            scheme: match e.origin.scheme() {
                Scheme::Http => http::uri::Scheme::HTTP,
                Scheme::Https => http::uri::Scheme::HTTPS,
            },
            authority: authority.parse().map_err(|_| invalid())?,
            host: http::HeaderValue::from_str(&authority).map_err(|_| invalid())?,
            client: http_client::build(
                &e.tls,
                e.connect_timeout,
                e.pool_idle_timeout,
                body_idle_timeout,
            )?,
            response_timeout: e.response_timeout,
        })
    }

    /// `path` on the upstream, from the parts built once at start.
    pub(crate) fn uri(
        &self,
        path: http::uri::PathAndQuery,
    ) -> Result<Uri, http::uri::InvalidUriParts> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        Uri::from_parts(parts)
    }

    /// Asks Harbor `method path` with the client's own headers (its credentials, `Accept`),
    /// prepared as the proxy prepares them; without its conditions and range when `whole`.
    pub(crate) async fn ask(
        &self,
        method: http::Method,
        path: &str,
        client: &http::HeaderMap,
        conn: &Connection,
        whole: bool,
    ) -> Result<Response<Incoming>, OciError> {
        let invalid = || OciError::bad_gateway("invalid request path");
        let path: http::uri::PathAndQuery = path.parse().map_err(|_| invalid())?;
        let uri = self.uri(path).map_err(|_| invalid())?;
        let mut headers = client.clone();
        headers.remove(http::header::CONTENT_LENGTH);
        headers.remove(http::header::TRANSFER_ENCODING);
        if whole {
            for name in [
                http::header::RANGE,
                http::header::IF_RANGE,
                http::header::IF_NONE_MATCH,
                http::header::IF_MODIFIED_SINCE,
                http::header::IF_MATCH,
                http::header::IF_UNMODIFIED_SINCE,
            ] {
                headers.remove(name);
            }
        }
        headers::prepare_request(&mut headers, &self.host, conn.peer.ip(), conn.scheme);
        let mut request = Request::new(body::empty());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        self.send_bodyless(request).await
    }

    /// Sends a request without a body (its answer within the response deadline).
    pub(crate) async fn send_bodyless(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, OciError> {
        let (_, sent) = watch::channel(true);
        self.send(request, sent).await
    }

    /// Sends upstream, turning failures into regtee's own error answers.
    pub(crate) async fn send(
        &self,
        request: Request<ProxyBody>,
        body_sent: watch::Receiver<bool>,
    ) -> Result<Response<Incoming>, OciError> {
        match http_client::send_with_deadline(
            &self.client,
            request,
            body_sent,
            self.response_timeout,
        )
        .await
        {
            Ok(response) => Ok(response),
            Err(SendError::Failed(e)) => Err(self.explain(&e)),
            Err(SendError::Timeout) => Err(OciError::gateway_timeout(format!(
                "upstream {} did not answer within {:?}",
                self.origin, self.response_timeout
            ))),
        }
    }

    fn explain(&self, error: &hyper_util::client::legacy::Error) -> OciError {
        let chain = error_chain(error);
        if crate::error::find::<body::IdleTimeout>(error).is_some() {
            return OciError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::Unavailable,
                format!("request body stalled: {chain}"),
            );
        }
        if let Some(tls) = TlsFailure::find(error) {
            return OciError::bad_gateway(format!(
                "TLS to upstream {} failed: {tls}: {}",
                self.origin,
                tls.fix("[upstream]")
            ));
        }
        let timed_out = crate::error::timed_out(error);
        let message = if error.is_connect() {
            format!("cannot reach upstream {}: {chain}", self.origin)
        } else {
            format!("upstream {} failed: {chain}", self.origin)
        };
        if timed_out {
            OciError::gateway_timeout(message)
        } else {
            OciError::bad_gateway(message)
        }
    }
}
