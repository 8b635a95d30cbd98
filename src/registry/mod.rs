//! The client side of the distribution protocol: token auth, blobs, manifests, tags.
//!
//! Used to read from Harbor and write to targets. Authentication follows the Docker token
//! protocol: the first 401 teaches the client the realm; tokens are fetched per scope, cached
//! until shortly before they expire, and refreshed on a 401. Basic auth is used where the
//! registry asks for it. Blob bytes are streamed; only manifests (at most 4 MiB) and error
//! bodies (at most 64 KiB) are read into memory.

pub mod auth;
pub mod credentials;

use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::{self, ProxyBody};
use crate::config::{Credentials, Endpoint};
use crate::error::error_chain;
use crate::http_client::{self, HttpClient, SendError};
use crate::oci::digest::Digest;
use crate::oci::manifest::{ACCEPT_ALL, MAX_MANIFEST_BYTES};
use crate::origin::Origin;
use crate::registry::auth::{Challenge, TokenResponse};
use crate::tls::TlsFailure;

/// What went wrong talking to a registry, classified for retry decisions and for people.
#[derive(Debug, Clone)]
pub enum ErrorKind {
    /// No connection (refused, DNS, reset).
    Unreachable(String),
    /// TLS failed: the certificate was refused, or the handshake broke.
    Tls(TlsFailure),
    /// A plain-HTTP URL answered with a redirect to the same request on HTTPS: the registry
    /// serves HTTPS only (Harbor's nginx answers its plain port with 308).
    HttpsOnly {
        /// Where it redirects.
        https: String,
    },
    /// No answer in time.
    Timeout,
    /// The credentials were rejected.
    Unauthorized(String),
    /// Authenticated, but not allowed (or the namespace does not exist).
    Denied(String),
    /// 404 with the registry's error code.
    NotFound {
        /// e.g. `NAME_UNKNOWN`, `MANIFEST_UNKNOWN`.
        code: String,
        /// The registry's message.
        message: String,
    },
    /// 429.
    RateLimited {
        /// What `Retry-After` asked for.
        retry_after: Option<Duration>,
    },
    /// Another 4xx: the request was refused as invalid.
    Rejected {
        /// Status code.
        status: u16,
        /// e.g. `MANIFEST_BLOB_UNKNOWN`, `MANIFEST_INVALID`, `DIGEST_INVALID`.
        code: String,
        /// The registry's message.
        message: String,
    },
    /// 5xx.
    Server {
        /// Status code.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// A stream broke mid-transfer, or content did not match its digest.
    Transfer(String),
    /// The registry answered something that makes no sense.
    Protocol(String),
}

/// An error from one registry operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{registry}: {operation}: {kind}")]
pub struct RegistryError {
    /// Which registry (`upstream` or a target's name).
    pub registry: String,
    /// What was being done, e.g. `PUT manifest prod-lib/nginx:v1`.
    pub operation: String,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Unreachable(m) => write!(f, "unreachable: {m}"),
            ErrorKind::Tls(t) => write!(f, "TLS: {t}"),
            ErrorKind::HttpsOnly { https } => {
                write!(
                    f,
                    "plain HTTP is redirected to {https}: it serves HTTPS only"
                )
            }
            ErrorKind::Timeout => f.write_str("timed out"),
            ErrorKind::Unauthorized(m) => write!(f, "credentials rejected: {m}"),
            ErrorKind::Denied(m) => write!(f, "access denied: {m}"),
            ErrorKind::NotFound { code, message } => write!(f, "404 {code}: {message}"),
            ErrorKind::RateLimited { retry_after } => match retry_after {
                Some(d) => write!(f, "rate limited (retry after {d:?})"),
                None => f.write_str("rate limited"),
            },
            ErrorKind::Rejected {
                status,
                code,
                message,
            } => write!(f, "{status} {code}: {message}"),
            ErrorKind::Server { status, message } => write!(f, "server error {status}: {message}"),
            ErrorKind::Transfer(m) => write!(f, "transfer failed: {m}"),
            ErrorKind::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

impl RegistryError {
    fn new(registry: &str, operation: &str, kind: ErrorKind) -> RegistryError {
        RegistryError {
            registry: registry.to_string(),
            operation: operation.to_string(),
            kind,
        }
    }

    /// Whether trying again later can help.
    pub fn retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Tls(t) => !t.is_certificate(),
            ErrorKind::Unreachable(_)
            | ErrorKind::Timeout
            | ErrorKind::RateLimited { .. }
            | ErrorKind::Server { .. }
            | ErrorKind::Transfer(_) => true,
            ErrorKind::Rejected { code, status, .. } => {
                *status == 408 || code == "MANIFEST_BLOB_UNKNOWN" || code == "BLOB_UNKNOWN"
            }
            ErrorKind::Unauthorized(_)
            | ErrorKind::Denied(_)
            | ErrorKind::NotFound { .. }
            | ErrorKind::HttpsOnly { .. }
            | ErrorKind::Protocol(_) => false,
        }
    }

    /// Whether the registry answered at all (with an HTTP status), as opposed to a connection,
    /// TLS or transfer failure.
    pub fn answered(&self) -> bool {
        !matches!(
            self.kind,
            ErrorKind::Unreachable(_)
                | ErrorKind::Tls(_)
                | ErrorKind::Timeout
                | ErrorKind::Transfer(_)
        )
    }

    /// A short class for metrics and job records.
    pub fn class(&self) -> &'static str {
        match &self.kind {
            ErrorKind::Tls(_) | ErrorKind::HttpsOnly { .. } => "tls",
            ErrorKind::Unreachable(_) => "unreachable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unauthorized(_) => "auth",
            ErrorKind::Denied(_) => "denied",
            ErrorKind::NotFound { .. } => "not_found",
            ErrorKind::RateLimited { .. } => "rate_limited",
            ErrorKind::Rejected { .. } => "rejected",
            ErrorKind::Server { .. } => "server",
            ErrorKind::Transfer(_) => "transfer",
            ErrorKind::Protocol(_) => "protocol",
        }
    }

    /// The registry's error code, if it sent one.
    pub fn code(&self) -> Option<&str> {
        match &self.kind {
            ErrorKind::NotFound { code, .. } | ErrorKind::Rejected { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A manifest's identity as a registry reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`.
    pub digest: Digest,
    /// `Content-Type`.
    pub media_type: String,
    /// `Content-Length`.
    pub size: u64,
}

/// A manifest read whole (they are small), digest verified when fetched by digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The exact bytes: copied as they are, never re-serialised.
    pub bytes: Bytes,
    /// The media type it was served with.
    pub media_type: String,
    /// Its sha256.
    pub digest: Digest,
}

/// What a registry said after storing a manifest.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    /// The digest it reported, if it did.
    pub digest: Option<Digest>,
    /// Whether it sent `OCI-Subject` (it has the referrers API).
    pub has_referrers_api: bool,
}

/// A blob stream on its way from a registry.
pub struct BlobStream {
    /// Its length, when the registry said.
    pub size: Option<u64>,
    /// The bytes; the stream fails if the registry sends nothing for the idle timeout.
    pub body: ProxyBody,
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

#[derive(Deserialize)]
struct Catalog {
    #[serde(default)]
    repositories: Vec<String>,
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// An item of a Harbor API list (a project or a repository).
#[derive(Deserialize)]
struct HarborNamed {
    name: String,
}

struct CachedToken {
    token: String,
    expires: Instant,
}

/// How many bytes of an error body are worth reading.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How a blob goes up: in one request, or in chunks.
#[derive(Clone, Copy, Debug)]
pub struct Chunking {
    /// Bytes per chunk; 0 for one request (unless the registry asks for chunks).
    pub size: u64,
    /// The largest minimum chunk a registry may ask for.
    pub max: u64,
}

impl Chunking {
    /// One request unless the registry asks for chunks, of up to 256 MiB.
    pub const WHOLE: Chunking = Chunking {
        size: 0,
        max: 256 * 1024 * 1024,
    };
}

/// A request body the client may need to send twice (after a 401), or a stream it cannot.
pub enum RequestBody {
    /// No body.
    Empty,
    /// Small bytes in hand: replayable.
    Bytes(Bytes),
    /// A stream: sent once.
    Stream(ProxyBody),
}

/// A registry as a client sees it.
pub struct RegistryClient {
    name: String,
    origin: Origin,
    http: HttpClient,
    credentials: Option<Credentials>,
    /// `Basic <base64(user:password)>`, built once (and remembered for scrubbing).
    basic: Option<HeaderValue>,
    response_timeout: Duration,
    idle_timeout: Duration,
    challenge: RwLock<Option<Challenge>>,
    tokens: DashMap<String, CachedToken>,
}

/// The scope to read a repository.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// The scope to write a repository.
pub fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
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
        .map_err(|e| {
            RegistryError::new(
                &endpoint.name,
                "configure TLS",
                ErrorKind::Unreachable(e.to_string()),
            )
        })?;
        Ok(RegistryClient {
            name: endpoint.name.clone(),
            origin: endpoint.origin.clone(),
            http,
            basic: endpoint.credentials.as_ref().map(basic_header),
            credentials: endpoint.credentials.clone(),
            response_timeout: endpoint.response_timeout,
            idle_timeout: endpoint.idle_timeout,
            challenge: RwLock::new(None),
            tokens: DashMap::new(),
        })
    }

    /// The registry's name in errors and logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of a request path on this registry. Names are validated where they enter regtee,
    /// so this fails only on a bug; it fails as an error, never as a panic.
    fn url(&self, path_and_query: &str, operation: &str) -> Result<Uri, RegistryError> {
        self.origin.join(path_and_query).map_err(|_| {
            self.err(
                operation,
                ErrorKind::Protocol(format!(
                    "`{}` is not a valid request path",
                    path_and_query.chars().take(200).collect::<String>()
                )),
            )
        })
    }

    fn err(&self, operation: &str, kind: ErrorKind) -> RegistryError {
        RegistryError::new(&self.name, operation, kind)
    }

    // ---- authentication ----

    fn known_challenge(&self) -> Option<Challenge> {
        self.challenge
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn authorization(
        &self,
        scopes: &[String],
        operation: &str,
        refresh: bool,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let Some(challenge) = self.known_challenge() else {
            return Ok(None);
        };
        if challenge.is_basic() {
            return Ok(self.basic.clone());
        }
        if !challenge.is_bearer() {
            return Ok(None);
        }
        let key = scopes.join(" ");
        if !refresh
            && let Some(cached) = self.tokens.get(&key)
            && cached.expires > Instant::now()
        {
            return Ok(Some(bearer_header(&cached.token)));
        }
        let token = self.fetch_token(&challenge, scopes, operation).await?;
        let header = bearer_header(&token.token);
        self.tokens.insert(key, token);
        Ok(Some(header))
    }

    async fn fetch_token(
        &self,
        challenge: &Challenge,
        scopes: &[String],
        operation: &str,
    ) -> Result<CachedToken, RegistryError> {
        let realm = challenge.param("realm").ok_or_else(|| {
            self.err(
                operation,
                ErrorKind::Protocol("Bearer challenge without a realm".into()),
            )
        })?;
        let mut url = url::Url::parse(realm).map_err(|_| {
            self.err(
                operation,
                ErrorKind::Protocol(format!("token realm `{realm}` is not a URL")),
            )
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            if let Some(c) = &self.credentials {
                query.append_pair("account", &c.username);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
        }
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|_| self.err(operation, ErrorKind::Protocol("bad token URL".into())))?;
        let mut request = get_request(uri);
        if let Some(basic) = &self.basic {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, basic.clone());
        }
        let op = format!("{operation} (token)");
        let response = self.send_once(request, &op).await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.err(
                &op,
                ErrorKind::Unauthorized(format!(
                    "the token service rejected the credentials of `{}`",
                    self.credentials
                        .as_ref()
                        .map(|c| c.username.as_str())
                        .unwrap_or("anonymous")
                )),
            ));
        }
        if !status.is_success() {
            return Err(self.error_from(response, &op).await);
        }
        let parsed: TokenResponse = self.read_json(response, MAX_ERROR_BODY, &op).await?;
        let token = parsed
            .token()
            .ok_or_else(|| {
                self.err(
                    &op,
                    ErrorKind::Protocol("token response has no token".into()),
                )
            })?
            .to_string();
        // Refresh a little early so a token never expires between check and use.
        let life = parsed.lifetime().saturating_sub(Duration::from_secs(10));
        Ok(CachedToken {
            token,
            expires: Instant::now() + life.max(Duration::from_secs(1)),
        })
    }

    /// Sends one request, authenticating as the registry asks. A 401 teaches the realm and
    /// triggers one retry with a fresh token when the body can be replayed.
    async fn call(
        &self,
        method: Method,
        url: Uri,
        headers: HeaderMap,
        body: RequestBody,
        scopes: &[String],
        operation: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut body = Some(body);
        let mut refresh = false;
        for attempt in 0..2 {
            let auth = self.authorization(scopes, operation, refresh).await?;
            let (this_body, replay) = match body.take().expect("body present until sent") {
                RequestBody::Empty => (body::empty(), Some(RequestBody::Empty)),
                RequestBody::Bytes(b) => (body::full(b.clone()), Some(RequestBody::Bytes(b))),
                RequestBody::Stream(s) => (s, None),
            };
            let mut request = Request::builder()
                .method(method.clone())
                .uri(url.clone())
                .body(this_body)
                .expect("valid request");
            *request.headers_mut() = headers.clone();
            if let Some(auth) = auth {
                request.headers_mut().insert(header::AUTHORIZATION, auth);
            }
            let response = self.send_once(request, operation).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let challenge = response
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(Challenge::parse)
                .find(|c| c.is_bearer() || c.is_basic());
            let insufficient_scope =
                challenge.as_ref().and_then(|c| c.param("error")) == Some("insufficient_scope");
            if let Some(c) = challenge {
                *self.challenge.write().unwrap_or_else(|p| p.into_inner()) = Some(c);
            }
            if attempt == 0 && replay.is_some() {
                refresh = true;
                body = replay;
                continue;
            }
            let message = self.error_from(response, operation).await.kind.to_string();
            let kind = if insufficient_scope {
                ErrorKind::Denied(message)
            } else if replay.is_none() {
                // A streamed body cannot be sent twice; the caller retries the operation,
                // which then starts with the token this 401 taught us to fetch.
                ErrorKind::Transfer(format!("authentication required mid-stream: {message}"))
            } else {
                ErrorKind::Unauthorized(message)
            };
            return Err(self.err(operation, kind));
        }
        unreachable!("the loop returns on its second pass")
    }
    async fn send_once(
        &self,
        request: Request<ProxyBody>,
        operation: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let (request, sent) = http_client::track_end(request);
        http_client::send_with_deadline(&self.http, request, sent, self.response_timeout)
            .await
            .map_err(|e| match e {
                SendError::Timeout => self.err(operation, ErrorKind::Timeout),
                SendError::Failed(e) => {
                    let chain = error_chain(&e);
                    if let Some(tls) = TlsFailure::find(&e) {
                        self.err(operation, ErrorKind::Tls(tls))
                    } else if e.is_connect() {
                        self.err(operation, ErrorKind::Unreachable(chain))
                    } else {
                        self.err(operation, ErrorKind::Transfer(chain))
                    }
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
        let bytes = read_limited(response.into_body(), MAX_ERROR_BODY)
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
        let (code, message) = (crate::redact::scrub(&code), crate::redact::scrub(&message));
        let kind = match status.as_u16() {
            401 => ErrorKind::Unauthorized(join_code(&code, &message)),
            403 => ErrorKind::Denied(join_code(&code, &message)),
            404 => ErrorKind::NotFound { code, message },
            429 => ErrorKind::RateLimited { retry_after },
            s @ 400..=499 => ErrorKind::Rejected {
                status: s,
                code,
                message,
            },
            s => ErrorKind::Server {
                status: s,
                message: join_code(&code, &message),
            },
        };
        self.err(operation, kind)
    }

    /// Reads a JSON body of at most `limit` bytes.
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        response: Response<Incoming>,
        limit: usize,
        operation: &str,
    ) -> Result<T, RegistryError> {
        let bytes = read_limited(response.into_body(), limit)
            .await
            .map_err(|e| self.err(operation, ErrorKind::Transfer(e)))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.err(operation, ErrorKind::Protocol(format!("invalid JSON: {e}"))))
    }

    /// GET or HEAD of a manifest, accepting every manifest media type.
    async fn manifest_request(
        &self,
        method: Method,
        repository: &str,
        reference: &str,
        operation: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT_ALL));
        self.call(
            method,
            self.url(
                &format!("/v2/{repository}/manifests/{reference}"),
                operation,
            )?,
            headers,
            RequestBody::Empty,
            &[pull_scope(repository)],
            operation,
        )
        .await
    }

    // ---- operations ----

    /// `GET /v2/` with credentials: proves reachability, TLS and authentication.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let op = "GET /v2/";
        let response = self
            .call(
                Method::GET,
                self.url("/v2/", op)?,
                HeaderMap::new(),
                RequestBody::Empty,
                &[],
                op,
            )
            .await?;
        if response.status().is_success() {
            return Ok(());
        }
        let url = self.url("/v2/", op)?;
        match crate::request::headers::redirect_to_https(
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

    /// The blob's size if the repository has it.
    pub async fn blob_exists(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let op = format!("HEAD blob {repository}@{digest}");
        let response = self
            .call(
                Method::HEAD,
                self.url(&format!("/v2/{repository}/blobs/{digest}"), &op)?,
                HeaderMap::new(),
                RequestBody::Empty,
                &[pull_scope(repository)],
                &op,
            )
            .await?;
        match response.status() {
            s if s.is_success() => Ok(Some(content_length(response.headers()).unwrap_or(0))),
            StatusCode::NOT_FOUND => Ok(None),
            // A HEAD answer has no body to read the error code from.
            s if s.is_redirection() => Ok(Some(content_length(response.headers()).unwrap_or(0))),
            _ => Err(self.error_from(response, &op).await),
        }
    }

    /// Streams a blob, following redirects to object storage. Credentials are sent only to the
    /// registry's own origin.
    pub async fn get_blob(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobStream, RegistryError> {
        let op = format!("GET blob {repository}@{digest}");
        let mut url = self.url(&format!("/v2/{repository}/blobs/{digest}"), &op)?;
        for _ in 0..8 {
            let same_origin = Origin::of(&url).as_ref() == Some(&self.origin);
            let response = if same_origin {
                self.call(
                    Method::GET,
                    url.clone(),
                    HeaderMap::new(),
                    RequestBody::Empty,
                    &[pull_scope(repository)],
                    &op,
                )
                .await?
            } else {
                self.send_once(get_request(url.clone()), &op).await?
            };
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        self.err(&op, ErrorKind::Protocol("redirect without Location".into()))
                    })?;
                url = resolve(&url, location).ok_or_else(|| {
                    self.err(
                        &op,
                        ErrorKind::Protocol(format!("bad redirect `{location}`")),
                    )
                })?;
                continue;
            }
            if status == StatusCode::OK {
                return Ok(BlobStream {
                    size: content_length(response.headers()),
                    body: body::boxed(
                        body::Tracked::new(response.into_body(), Default::default())
                            .idle_timeout(self.idle_timeout),
                    ),
                });
            }
            return Err(self.error_from(response, &op).await);
        }
        Err(self.err(&op, ErrorKind::Protocol("too many redirects".into())))
    }

    /// The manifest's digest, media type and size, or `None` if there is none.
    pub async fn manifest_head(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<ManifestHead>, RegistryError> {
        let op = format!("HEAD manifest {repository}:{reference}");
        let response = self
            .manifest_request(Method::HEAD, repository, reference, &op)
            .await?;
        match response.status() {
            StatusCode::OK => {
                let digest = Digest::from_headers(response.headers());
                let media_type = content_type(response.headers());
                let size = content_length(response.headers()).unwrap_or(0);
                match digest {
                    Some(digest) => Ok(Some(ManifestHead {
                        digest,
                        media_type,
                        size,
                    })),
                    // Some registries omit the digest on HEAD: compute it from the bytes.
                    None => {
                        Ok(self
                            .get_manifest(repository, reference)
                            .await?
                            .map(|m| ManifestHead {
                                size: m.bytes.len() as u64,
                                digest: m.digest,
                                media_type: m.media_type,
                            }))
                    }
                }
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.error_from(response, &op).await),
        }
    }

    /// The manifest's exact bytes, or `None` if there is none. Fetched by digest, the bytes
    /// are verified against it.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<FetchedManifest>, RegistryError> {
        let op = format!("GET manifest {repository}:{reference}");
        let response = self
            .manifest_request(Method::GET, repository, reference, &op)
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.error_from(response, &op).await),
        }
        let media_type = content_type(response.headers());
        let bytes = read_limited(response.into_body(), MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.err(&op, ErrorKind::Transfer(e)))?;
        let digest = Digest::sha256_of(&bytes);
        if let Ok(expected) = reference.parse::<Digest>()
            && expected != digest
            && expected.algorithm() == digest.algorithm()
        {
            return Err(self.err(
                &op,
                ErrorKind::Transfer(format!("manifest bytes hash to {digest}, not {expected}")),
            ));
        }
        Ok(Some(FetchedManifest {
            bytes,
            media_type,
            digest,
        }))
    }

    /// Stores a manifest under a tag or digest, exactly these bytes with this media type.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<StoredManifest, RegistryError> {
        let op = format!("PUT manifest {repository}:{reference}");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|_| {
                self.err(
                    &op,
                    ErrorKind::Protocol(format!("bad media type `{media_type}`")),
                )
            })?,
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let response = self
            .call(
                Method::PUT,
                self.url(&format!("/v2/{repository}/manifests/{reference}"), &op)?,
                headers,
                RequestBody::Bytes(bytes),
                &[push_scope(repository)],
                &op,
            )
            .await?;
        if response.status() != StatusCode::CREATED && !response.status().is_success() {
            return Err(self.error_from(response, &op).await);
        }
        let digest = Digest::from_headers(response.headers());
        let has_referrers_api = response.headers().contains_key("oci-subject");
        Ok(StoredManifest {
            digest,
            has_referrers_api,
        })
    }

    /// Deletes a manifest by digest. Returns false if it was not there.
    pub async fn delete_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<bool, RegistryError> {
        let op = format!("DELETE manifest {repository}:{reference}");
        let response = self
            .call(
                Method::DELETE,
                self.url(&format!("/v2/{repository}/manifests/{reference}"), &op)?,
                HeaderMap::new(),
                RequestBody::Empty,
                &[
                    format!("repository:{repository}:delete"),
                    push_scope(repository),
                ],
                &op,
            )
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error_from(response, &op).await),
        }
    }

    /// Asks the registry to mount a blob from another repository. Returns false when the
    /// registry declined (then the blob must be uploaded).
    pub async fn mount_blob(
        &self,
        repository: &str,
        digest: &Digest,
        from: &str,
    ) -> Result<bool, RegistryError> {
        let op = format!("mount blob {digest} from {from} into {repository}");
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("mount", digest.as_str())
            .append_pair("from", from)
            .finish();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        let response = self
            .call(
                Method::POST,
                self.url(&format!("/v2/{repository}/blobs/uploads/?{query}"), &op)?,
                headers,
                RequestBody::Empty,
                &[push_scope(repository), pull_scope(from)],
                &op,
            )
            .await?;
        match response.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // The registry opened an upload session instead; close it.
                if let Some(location) = self.location(&response) {
                    let _ = self
                        .call(
                            Method::DELETE,
                            location,
                            HeaderMap::new(),
                            RequestBody::Empty,
                            &[push_scope(repository)],
                            &op,
                        )
                        .await;
                }
                Ok(false)
            }
            _ => Err(self.error_from(response, &op).await),
        }
    }

    fn location(&self, response: &Response<Incoming>) -> Option<Uri> {
        let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
        resolve(&self.url("/", "resolve Location").ok()?, location)
    }

    /// Opens an upload session; returns its URL and the registry's minimum chunk size.
    async fn start_upload(
        &self,
        repository: &str,
        op: &str,
    ) -> Result<(Uri, Option<u64>), RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        let response = self
            .call(
                Method::POST,
                self.url(&format!("/v2/{repository}/blobs/uploads/"), op)?,
                headers,
                RequestBody::Empty,
                &[push_scope(repository)],
                op,
            )
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.error_from(response, op).await);
        }
        let min_chunk = response
            .headers()
            .get("oci-chunk-min-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let location = self.location(&response).ok_or_else(|| {
            self.err(
                op,
                ErrorKind::Protocol("upload started without a Location".into()),
            )
        })?;
        Ok((location, min_chunk))
    }

    /// Uploads a blob from a stream: one PUT, or PATCH chunks when `chunking` or the registry
    /// (`OCI-Chunk-Min-Length`) asks for them. Chunks are streamed too: memory use does not
    /// grow with the chunk size, whatever the registry asks for.
    pub async fn upload_blob(
        &self,
        repository: &str,
        digest: &Digest,
        size: Option<u64>,
        content: ProxyBody,
        chunking: Chunking,
    ) -> Result<(), RegistryError> {
        let op = format!("upload blob {repository}@{digest}");
        let (location, min_chunk) = self.start_upload(repository, &op).await?;
        if let Some(min) = min_chunk
            && min > chunking.max
        {
            return Err(self.err(
                &op,
                ErrorKind::Protocol(format!(
                    "the registry asks for chunks of at least {min} bytes (OCI-Chunk-Min-Length), more than max_chunk_size = {}: raise max_chunk_size for this target if that is intended",
                    chunking.max
                )),
            ));
        }
        let chunk = chunking.size.max(min_chunk.unwrap_or(0));
        let (location, last) = match (chunk, size) {
            (0, _) => (location, RequestBody::Stream(content)),
            (chunk, Some(size)) => {
                let location = self
                    .upload_chunks(repository, location, content, size, chunk, &op)
                    .await?;
                (location, RequestBody::Empty)
            }
            // Without a length there is no Content-Range to send: one request, if allowed.
            (_, None) if min_chunk.is_none() => (location, RequestBody::Stream(content)),
            (_, None) => {
                return Err(self.err(
                    &op,
                    ErrorKind::Protocol(
                        "the registry wants chunks, and the blob's length is unknown (Harbor sent no Content-Length)".into(),
                    ),
                ));
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        match (&last, size) {
            (RequestBody::Stream(_), Some(size)) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            }
            (RequestBody::Empty, _) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            }
            _ => {}
        }
        let url = with_query(&location, "digest", digest.as_str()).ok_or_else(|| {
            self.err(
                &op,
                ErrorKind::Protocol(format!("unusable upload location `{location}`")),
            )
        })?;
        let response = self
            .call(
                Method::PUT,
                url,
                headers,
                last,
                &[push_scope(repository)],
                &op,
            )
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.error_from(response, &op).await);
        }
        match Digest::from_headers(response.headers()) {
            Some(reported) if reported != *digest => Err(self.err(
                &op,
                ErrorKind::Protocol(format!("registry stored {reported}, expected {digest}")),
            )),
            _ => Ok(()),
        }
    }

    /// PATCHes `size` bytes of `content` in chunks of `chunk` bytes (the last one shorter), each
    /// with its `Content-Range`; returns where to send the closing PUT.
    async fn upload_chunks(
        &self,
        repository: &str,
        mut location: Uri,
        content: ProxyBody,
        size: u64,
        chunk: u64,
        op: &str,
    ) -> Result<Uri, RegistryError> {
        let chunks = crate::body::Chunks::new(content);
        let mut offset: u64 = 0;
        while offset < size {
            let len = chunk.min(size - offset);
            let end = offset + len - 1;
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            if let Ok(range) = HeaderValue::from_str(&format!("{offset}-{end}")) {
                headers.insert(header::CONTENT_RANGE, range);
            }
            let response = self
                .call(
                    Method::PATCH,
                    location.clone(),
                    headers,
                    RequestBody::Stream(chunks.next(len)),
                    &[push_scope(repository)],
                    op,
                )
                .await?;
            if response.status() != StatusCode::ACCEPTED {
                return Err(self.error_from(response, op).await);
            }
            location = self.location(&response).unwrap_or(location);
            offset = end + 1;
        }
        Ok(location)
    }

    /// Checks that regtee may push to `repository` by opening and cancelling an upload.
    pub async fn check_push(&self, repository: &str) -> Result<(), RegistryError> {
        let op = format!("start upload in {repository}");
        let (location, _) = self.start_upload(repository, &op).await?;
        let _ = self
            .call(
                Method::DELETE,
                location,
                HeaderMap::new(),
                RequestBody::Empty,
                &[push_scope(repository)],
                &op,
            )
            .await;
        Ok(())
    }

    /// Every tag of a repository (following pagination); empty if the repository is unknown.
    pub async fn tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        let op = format!("list tags of {repository}");
        let mut tags = Vec::new();
        let mut next = Some(self.url(&format!("/v2/{repository}/tags/list?n=1000"), &op)?);
        while let Some(url) = next.take() {
            let response = self
                .call(
                    Method::GET,
                    url.clone(),
                    HeaderMap::new(),
                    RequestBody::Empty,
                    &[pull_scope(repository)],
                    &op,
                )
                .await?;
            match response.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(tags),
                _ => return Err(self.error_from(response, &op).await),
            }
            next = next_link(response.headers()).and_then(|l| resolve(&url, &l));
            let page: TagList = self.read_json(response, 16 << 20, &op).await?;
            tags.extend(page.tags.unwrap_or_default());
        }
        Ok(tags)
    }

    /// Every repository in the registry's catalog (following pagination).
    pub async fn catalog(&self) -> Result<Vec<String>, RegistryError> {
        let op = "list catalog";
        let mut repositories = Vec::new();
        let mut next = Some(self.url("/v2/_catalog?n=1000", op)?);
        while let Some(url) = next.take() {
            let response = self
                .call(
                    Method::GET,
                    url.clone(),
                    HeaderMap::new(),
                    RequestBody::Empty,
                    &["registry:catalog:*".to_string()],
                    op,
                )
                .await?;
            if response.status() != StatusCode::OK {
                return Err(self.error_from(response, op).await);
            }
            next = next_link(response.headers()).and_then(|l| resolve(&url, &l));
            let page: Catalog = self.read_json(response, 64 << 20, op).await?;
            repositories.extend(page.repositories);
        }
        Ok(repositories)
    }

    /// A project's repositories from Harbor's REST API, or `None` when this registry has no
    /// such API (plain distribution) so the caller falls back to the catalog.
    pub async fn harbor_repositories(
        &self,
        project: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        self.harbor_names(
            &format!("/api/v2.0/projects/{project}/repositories"),
            &format!("list Harbor repositories of project {project}"),
        )
        .await
    }

    /// The projects regtee's account can see, from Harbor's REST API; `None` without one.
    /// Harbor robot accounts may not read the catalog, but they may list their projects.
    pub async fn harbor_projects(&self) -> Result<Option<Vec<String>>, RegistryError> {
        self.harbor_names("/api/v2.0/projects", "list Harbor projects")
            .await
    }

    /// The `name` of every item of a paginated Harbor API list (Basic auth, as Harbor's API wants).
    async fn harbor_names(
        &self,
        path: &str,
        op: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        const PAGE: usize = 100;
        let mut names = Vec::new();
        for page in 1.. {
            let url = self.url(&format!("{path}?page={page}&page_size={PAGE}"), op)?;
            let mut request = get_request(url);
            request
                .headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            if let Some(basic) = &self.basic {
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, basic.clone());
            }
            let response = self.send_once(request, op).await?;
            match response.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => return Ok(None),
                _ => return Err(self.error_from(response, op).await),
            }
            // Something that answers 200 with other JSON is not Harbor's API.
            let Ok(batch) = self
                .read_json::<Vec<HarborNamed>>(response, 16 << 20, op)
                .await
            else {
                return Ok(None);
            };
            let done = batch.len() < PAGE;
            names.extend(batch.into_iter().map(|r| r.name));
            if done {
                break;
            }
        }
        Ok(Some(names))
    }
}

fn join_code(code: &str, message: &str) -> String {
    match (code.is_empty(), message.is_empty()) {
        (true, _) => message.to_string(),
        (false, true) => code.to_string(),
        (false, false) => format!("{code}: {message}"),
    }
}

fn basic_header(c: &Credentials) -> HeaderValue {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        c.username,
        c.password.expose()
    ));
    // A registry that echoes the header back shows this, not the password.
    crate::redact::remember(token.as_str().into());
    let mut v = HeaderValue::from_str(&format!("Basic {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic invalid"));
    v.set_sensitive(true);
    v
}

fn bearer_header(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    v.set_sensitive(true);
    v
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .unwrap_or_default()
}

/// Reads a body up to `limit` bytes; longer bodies are an error.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, String>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
{
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| error_chain(&*e))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
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
fn resolve(base: &Uri, reference: &str) -> Option<Uri> {
    let base = url::Url::parse(&base.to_string()).ok()?;
    base.join(reference).ok()?.as_str().parse().ok()
}

/// A GET of `uri` with no body (infallible, unlike the request builder).
fn get_request(uri: Uri) -> Request<ProxyBody> {
    let mut request = Request::new(body::empty());
    *request.uri_mut() = uri;
    request
}

/// `url` with `key=value` appended to its query; `None` if a registry's URL does not survive
/// the round trip.
fn with_query(url: &Uri, key: &str, value: &str) -> Option<Uri> {
    let mut parsed = url::Url::parse(&url.to_string()).ok()?;
    parsed.query_pairs_mut().append_pair(key, value);
    parsed.as_str().parse().ok()
}

/// The `rel="next"` target of a `Link` header.
fn next_link(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::LINK)?.to_str().ok()?;
    value.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
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
    fn next_link_and_resolution() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            r#"</v2/a/tags/list?last=b&n=2>; rel="next""#.parse().unwrap(),
        );
        let next = next_link(&h).unwrap();
        let base: Uri = "https://r.example.com/v2/a/tags/list?n=2".parse().unwrap();
        assert_eq!(
            resolve(&base, &next).unwrap(),
            "https://r.example.com/v2/a/tags/list?last=b&n=2"
        );
        assert_eq!(
            resolve(&base, "https://s3.example.com/x?sig=1").unwrap(),
            "https://s3.example.com/x?sig=1"
        );
    }

    #[test]
    fn digest_query_is_appended_to_existing_state() {
        let u: Uri = "https://r/v2/a/blobs/uploads/1?_state=abc".parse().unwrap();
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            with_query(&u, "digest", &d).unwrap().to_string(),
            format!(
                "https://r/v2/a/blobs/uploads/1?_state=abc&digest=sha256%3A{}",
                "a".repeat(64)
            )
        );
    }

    #[test]
    fn error_classes_decide_retries() {
        let e = |kind| RegistryError::new("t", "op", kind);
        assert!(e(ErrorKind::Unreachable("connection refused".into())).retryable());
        assert!(!e(ErrorKind::Tls(TlsFailure::UnknownIssuer)).retryable());
        assert!(e(ErrorKind::Tls(TlsFailure::Handshake("reset".into()))).retryable());
        assert_eq!(
            e(ErrorKind::Tls(TlsFailure::CaUsedAsEndEntity)).class(),
            "tls"
        );
        assert!(!e(ErrorKind::Denied("x".into())).retryable());
        assert!(e(ErrorKind::RateLimited { retry_after: None }).retryable());
        assert!(
            e(ErrorKind::Rejected {
                status: 400,
                code: "MANIFEST_BLOB_UNKNOWN".into(),
                message: String::new()
            })
            .retryable()
        );
        assert!(
            !e(ErrorKind::Rejected {
                status: 400,
                code: "MANIFEST_INVALID".into(),
                message: String::new()
            })
            .retryable()
        );
    }
}
