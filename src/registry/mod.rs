//! The client side of the distribution protocol, used to read from Harbor and write to targets.
//!
//! This file holds the client and its request plumbing: one [`Call`] describes a request (method,
//! URL, headers, body, token scopes), `RegistryClient::send` authenticates it as the registry
//! asks, and failures become typed [`RegistryError`]s. The operations live beside it: `blobs`,
//! `manifests`, `listings` (tags, catalog) and `harbor` (Harbor's own REST API); `auth` answers
//! challenges. Blob bytes are streamed; only manifests (at most 4 MiB), listings and error bodies
//! (at most 64 KiB) are read into memory.

mod auth;
mod blobs;
mod error;
mod harbor;
mod listings;
mod login;
mod manifests;
mod rate_limit;

use std::sync::RwLock;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::{self, ProxyBody, read_limited};
use crate::config::{Endpoint, Side};
use crate::error::error_chain;
use crate::http_client::{self, HttpClient, SendError};
use crate::oci::error_code::ErrorCode;
use crate::origin::Origin;
use crate::tls::TlsFailure;

pub(crate) use auth::{pull_scope, push_scope};
pub(crate) use blobs::Reopen;
pub use blobs::{BlobStream, Chunking, Mount, Session, Upload};
pub use error::{ErrorKind, FixContext, RegistryError};
pub use manifests::{FetchedManifest, ManifestHead, StoredManifest};

use crate::challenge::Challenge;
use auth::CachedToken;

/// How many bytes of an error body are worth reading.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A request body the client may need to send twice (after a 401), or a stream it cannot.
pub(crate) enum RequestBody {
    /// No body.
    Empty,
    /// Small bytes in hand: replayable.
    Bytes(Bytes),
    /// A stream: sent once.
    Stream(ProxyBody),
}

/// One request to a registry: what each operation differs in.
pub(crate) struct Call {
    method: Method,
    url: Uri,
    headers: HeaderMap,
    body: RequestBody,
    /// Token scopes the request needs (Docker token spec), e.g. `repository:a/b:pull`.
    scopes: Vec<String>,
    operation: String,
}

impl Call {
    /// A request to `url`, described as `operation` in errors.
    pub(crate) fn to(method: Method, url: Uri, operation: &str) -> Call {
        Call {
            method,
            url,
            headers: HeaderMap::new(),
            body: RequestBody::Empty,
            scopes: Vec::new(),
            operation: operation.to_string(),
        }
    }

    /// Needs this token scope.
    pub(crate) fn scope(mut self, scope: String) -> Call {
        self.scopes.push(scope);
        self
    }

    /// Needs pull access to `repository`.
    pub(crate) fn pull(self, repository: &str) -> Call {
        self.scope(pull_scope(repository))
    }

    /// Needs pull and push access to `repository`.
    pub(crate) fn push(self, repository: &str) -> Call {
        self.scope(push_scope(repository))
    }

    /// Needs delete access to `repository` too (distribution asks for it on any DELETE,
    /// cancelling an upload included).
    pub(crate) fn delete(self, repository: &str) -> Call {
        self.scope(format!("repository:{repository}:delete"))
    }

    /// With this header.
    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Call {
        self.headers.insert(name, value);
        self
    }

    /// With this body.
    pub(crate) fn body(mut self, body: RequestBody) -> Call {
        self.body = body;
        self
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// A registry as a client sees it.
pub struct RegistryClient {
    name: String,
    side: Side,
    origin: Origin,
    http: HttpClient,
    /// regtee's login there, fetched when needed.
    logins: login::Logins,
    response_timeout: Duration,
    idle_timeout: Duration,
    challenge: RwLock<Option<Challenge>>,
    tokens: DashMap<String, CachedToken>,
    /// The configured rate limits, shared by every transfer through this client.
    limits: rate_limit::Limits,
}

impl RegistryClient {
    /// A client for `endpoint`, with its own connection pool.
    pub fn new(endpoint: &Endpoint) -> Result<RegistryClient, RegistryError> {
        let http = http_client::build(
            &endpoint.tls,
            endpoint.connect_timeout,
            endpoint.pool_idle_timeout,
            endpoint.idle_timeout,
        )
        .map_err(|e| RegistryError {
            registry: endpoint.name.clone(),
            side: endpoint.side,
            operation: "configure TLS".into(),
            kind: ErrorKind::Unreachable(e.to_string()),
        })?;
        Ok(RegistryClient {
            name: endpoint.name.clone(),
            side: endpoint.side,
            origin: endpoint.origin.clone(),
            http,
            logins: login::Logins::new(&endpoint.login, endpoint.origin.authority()),
            response_timeout: endpoint.response_timeout,
            idle_timeout: endpoint.idle_timeout,
            challenge: RwLock::new(None),
            tokens: DashMap::new(),
            limits: rate_limit::Limits::new(&endpoint.limits),
        })
    }

    /// The registry's name in errors and logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where regtee's login there comes from, for people.
    pub(crate) fn login_source(&self) -> String {
        self.logins.describe()
    }

    /// Fetches regtee's login (runs a credential helper, reads a docker config), proving it can.
    pub(crate) async fn check_login(&self) -> Result<(), RegistryError> {
        self.login("fetch the login").await.map(|_| ())
    }

    /// regtee's login now, fetched if needed (`None`: anonymous).
    async fn login(
        &self,
        operation: &str,
    ) -> Result<Option<std::sync::Arc<login::Current>>, RegistryError> {
        self.logins
            .get()
            .await
            .map_err(|e| self.err(operation, ErrorKind::Login(e.to_string())))
    }

    /// A request for a path on this registry. Names are validated where they enter regtee, so
    /// building the URL fails only on a bug; it fails as an error, never as a panic.
    fn request(&self, method: Method, path: &str, operation: &str) -> Result<Call, RegistryError> {
        let url = self.origin.join(path).map_err(|_| {
            self.err(
                operation,
                ErrorKind::Protocol(format!(
                    "`{}` is not a valid request path",
                    path.chars().take(200).collect::<String>()
                )),
            )
        })?;
        Ok(Call::to(method, url, operation))
    }

    /// An answer from this registry that breaks the protocol, as an error for `operation`.
    pub(crate) fn protocol_error(&self, operation: &str, message: &str) -> RegistryError {
        self.err(operation, ErrorKind::Protocol(message.to_string()))
    }

    fn err(&self, operation: &str, kind: ErrorKind) -> RegistryError {
        RegistryError {
            registry: self.name.clone(),
            side: self.side,
            operation: operation.to_string(),
            kind,
        }
    }

    /// Whether `url` is on this registry's own origin: the only one its login, its challenge
    /// and its tokens belong to (RFC 7617 §2.2's protection space; containerd keeps an
    /// authorizer per host). A `Location`, `Link` or redirect naming another origin gets a
    /// request with no credentials at all, and its challenges teach nothing.
    fn is_home(&self, url: &Uri) -> bool {
        Origin::of(url).as_ref() == Some(&self.origin)
    }

    /// Sends a call, authenticating as the registry asks. A 401 from the registry's origin
    /// teaches the challenge and triggers one retry with a fresh token when the body can be
    /// replayed; a 401 from another origin is an error, answered with nothing.
    async fn send(&self, call: Call) -> Result<Response<Incoming>, RegistryError> {
        let Call {
            method,
            url,
            headers,
            body,
            scopes,
            operation,
        } = call;
        let home = self.is_home(&url);
        let mut body = Some(body);
        let mut refresh = false;
        loop {
            let auth = if home {
                self.authorization(&scopes, &operation, refresh).await?
            } else {
                None
            };
            let (this_body, replay) = match body.take() {
                None | Some(RequestBody::Empty) => (body::empty(), Some(RequestBody::Empty)),
                Some(RequestBody::Bytes(b)) => (body::full(b.clone()), Some(RequestBody::Bytes(b))),
                Some(RequestBody::Stream(s)) => (s, None),
            };
            let mut request = Request::new(this_body);
            *request.method_mut() = method.clone();
            *request.uri_mut() = url.clone();
            *request.headers_mut() = headers.clone();
            if let Some(auth) = auth {
                request.headers_mut().insert(header::AUTHORIZATION, auth);
            }
            let response = self.send_once(request, &operation).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            if !home {
                let elsewhere = Origin::of(&url).map_or_else(|| "?".to_string(), |o| o.to_string());
                return Err(self.err(
                    &operation,
                    ErrorKind::Unauthorized(format!(
                        "{elsewhere} asked for credentials; regtee's login is for {} and is sent to no other origin",
                        self.origin
                    )),
                ));
            }
            // Whatever token was used is no good any more (expired early, revoked).
            self.tokens.remove(&scopes.join(" "));
            let challenge = response
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(Challenge::parse)
                .find(|c| c.is_bearer() || c.is_basic());
            // RFC 6750 §3.1: the token was valid but did not cover the scope asked for.
            let insufficient_scope =
                challenge.as_ref().and_then(|c| c.param("error")) == Some("insufficient_scope");
            if let Some(c) = challenge {
                *self.challenge.write().unwrap_or_else(|p| p.into_inner()) = Some(c);
            }
            if !refresh && replay.is_some() {
                refresh = true;
                body = replay;
                continue;
            }
            // Refused twice: the next attempt fetches the login again, if it can change.
            self.logins.forget();
            let message = match self.error_from(response, &operation).await.kind {
                ErrorKind::Unauthorized(m) => m,
                other => other.to_string(),
            };
            let kind = if insufficient_scope {
                ErrorKind::Denied(message)
            } else if replay.is_none() {
                // A streamed body cannot be sent twice; the caller retries the operation,
                // which then starts with the token this 401 taught us to fetch.
                ErrorKind::Transfer(format!("authentication required mid-stream: {message}"))
            } else {
                ErrorKind::Unauthorized(message)
            };
            return Err(self.err(&operation, kind));
        }
    }

    /// Sends a call and insists on one status; anything else is read as the registry's error.
    async fn expect(
        &self,
        call: Call,
        status: StatusCode,
    ) -> Result<Response<Incoming>, RegistryError> {
        let operation = call.operation.clone();
        let response = self.send(call).await?;
        if response.status() == status {
            Ok(response)
        } else {
            Err(self.error_from(response, &operation).await)
        }
    }

    async fn send_once(
        &self,
        request: Request<ProxyBody>,
        operation: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        self.limits.request().await;
        let (request, sent) = http_client::track_end(request);
        http_client::send_with_deadline(&self.http, request, sent, self.response_timeout)
            .await
            .map_err(|e| match e {
                SendError::Timeout => self.err(operation, ErrorKind::Timeout),
                SendError::Failed(e) => {
                    let kind = match TlsFailure::find(&e) {
                        Some(tls) => ErrorKind::Tls(tls),
                        None if e.is_connect() => ErrorKind::Unreachable(error_chain(&e)),
                        None => ErrorKind::Transfer(error_chain(&e)),
                    };
                    self.err(operation, kind)
                }
            })
    }

    /// Turns a non-success response into an error, reading the spec's error body.
    async fn error_from(&self, response: Response<Incoming>, operation: &str) -> RegistryError {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = self
            .read_small(response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        let (code, message) = serde_json::from_slice::<ErrorEnvelope>(&bytes)
            .ok()
            .and_then(|e| e.errors.into_iter().next())
            .map(|e| (e.code, e.message))
            .unwrap_or_else(|| {
                (
                    String::new(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
                        .trim()
                        .to_string(),
                )
            });
        // Another server's words: they may echo what regtee sent, credentials included.
        let code = (!code.is_empty()).then(|| ErrorCode::parse(&crate::redact::scrub(&code)));
        let message = crate::redact::scrub(&message);
        let coded = || match &code {
            Some(c) if message.is_empty() => c.to_string(),
            Some(c) => format!("{c}: {message}"),
            None => message.clone(),
        };
        let kind = match status.as_u16() {
            401 => ErrorKind::Unauthorized(coded()),
            403 => ErrorKind::Denied(coded()),
            404 => ErrorKind::NotFound { code, message },
            429 => ErrorKind::RateLimited { retry_after },
            s @ 400..=499 => ErrorKind::Rejected {
                status: s,
                code,
                message,
            },
            s => ErrorKind::Server {
                status: s,
                message: coded(),
            },
        };
        self.err(operation, kind)
    }
    /// A small answer's whole body (JSON, an error, a manifest), at most `limit` bytes, given up
    /// on once the server sends nothing for `idle_timeout`: a server that sent its headers and
    /// then stalls must not hold a listing or a job for ever.
    pub(crate) async fn read_small(
        &self,
        response: Response<Incoming>,
        limit: usize,
    ) -> Result<Bytes, crate::body::BoxError> {
        let body = crate::body::Tracked::new(response.into_body(), Default::default())
            .idle_timeout(self.idle_timeout);
        read_limited(body, limit).await
    }

    /// Reads a JSON body of at most `limit` bytes.
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        response: Response<Incoming>,
        limit: usize,
        operation: &str,
    ) -> Result<T, RegistryError> {
        let bytes = self
            .read_small(response, limit)
            .await
            .map_err(|e| self.err(operation, ErrorKind::Transfer(error_chain(&*e))))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.err(operation, ErrorKind::Protocol(format!("invalid JSON: {e}"))))
    }

    /// The `Location` of an answer, resolved against the registry.
    fn location(&self, response: &Response<Incoming>) -> Option<Uri> {
        let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
        resolve(&self.origin.join("/").ok()?, location)
    }

    /// Carries a client's request out as regtee on this registry (a target that is the
    /// primary): `path_and_query` on its own origin, regtee's credentials for `scopes`, the
    /// answer as it comes. A streamed body can be sent once only, so the challenge is learned
    /// first (`GET /v2/`) when none is known yet.
    pub(crate) async fn relay(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: RequestBody,
        scopes: Vec<String>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let path = path_and_query.split('?').next().unwrap_or_default();
        let op = format!("{method} {path}");
        if matches!(body, RequestBody::Stream(_)) && self.known_challenge().is_none() {
            self.ping().await?;
        }
        let mut call = self.request(method, path_and_query, &op)?.body(body);
        call.headers = headers;
        call.scopes = scopes;
        self.send(call).await
    }

    /// `GET /v2/` with credentials: proves reachability, TLS and authentication.
    pub(crate) async fn ping(&self) -> Result<(), RegistryError> {
        let op = "GET /v2/";
        let call = self.request(Method::GET, "/v2/", op)?;
        let url = call.url.clone();
        let response = self.send(call).await?;
        if response.status().is_success() {
            return Ok(());
        }
        match crate::origin::redirect_to_https(
            response.status(),
            response.headers(),
            &self.origin,
            &url,
        ) {
            Some(https) => Err(self.err(
                op,
                ErrorKind::HttpsOnly {
                    https: https.to_string(),
                },
            )),
            None => Err(self.error_from(response, op).await),
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Resolves a possibly relative URL against `base`.
pub(crate) fn resolve(base: &Uri, reference: &str) -> Option<Uri> {
    let base = url::Url::parse(&base.to_string()).ok()?;
    base.join(reference).ok()?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("30"), Some(Duration::from_secs(30)));
        let future = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn relative_and_absolute_locations_resolve() {
        let base: Uri = "https://r.example.com/v2/a/tags/list?n=2".parse().unwrap();
        assert_eq!(
            resolve(&base, "/v2/a/tags/list?last=b&n=2").unwrap(),
            "https://r.example.com/v2/a/tags/list?last=b&n=2"
        );
        assert_eq!(
            resolve(&base, "https://s3.example.com/x?sig=1").unwrap(),
            "https://s3.example.com/x?sig=1"
        );
    }
}
