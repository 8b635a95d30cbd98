//! The read path: a phase between classifying a request and forwarding it, for pulls (`GET`
//! and `HEAD` of a blob or a manifest) when the cache is configured. Everything else, pushes
//! included, passes by it untouched.
//!
//! - **By digest**: a cached copy is served once this client may read this repository
//!   (`authorize`); otherwise one request reads it from Harbor with its own credentials and
//!   fills the cache while every request for the same digest reads from that fill.
//! - **By tag**: Harbor is always asked what the tag names now (one `HEAD` for all who ask at
//!   once with the same credentials), then the manifest is served by digest as above.
//! - **While Harbor cannot answer** (refused, 5xx, timeout): with `[upstream] token_certificate`,
//!   a client whose token grants `pull` is served what Harbor served that repository before,
//!   from the cache, else from a fallback target; a tag as Harbor last named it, marked stale.
//!   Without it nothing is served that Harbor has not authorized (`fallback`). `GET /v2/`,
//!   which every pull starts with, is then answered as Harbor's registry would answer it.
//!
//! A `Range` on a miss and a `HEAD` of an uncached blob are forwarded as they are.

mod authorize;
mod fallback;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::cache::{Cache, Cached, Kind, Slot};
use crate::config::CacheConfig;
use crate::error::OciError;
use crate::metrics::CacheRead;
use crate::mirror::target::Target;
use crate::oci::digest::Digest;
use crate::oci::manifest::MAX_MANIFEST_BYTES;
use crate::oci::names::{Reference, RepositoryName, Tag};
use crate::request::route::Route;
use crate::request::server::Connection;
use crate::request::upstream::Upstream;
use crate::throttle::Throttle;
use crate::token_check::TokenTrust;

use authorize::{Authorization, Decision};

/// What the read path made of a request.
pub(crate) enum Read {
    /// Not its business (pushes, listings, a range on a miss...): forward as usual.
    Forward,
    /// Served from the cache, a fill, or a target.
    Answer(Response<ProxyBody>),
    /// Harbor's own answer, passed on as the proxy passes answers on.
    Harbor(Response<ProxyBody>),
    /// regtee's own error answer.
    Error(OciError),
}

/// What the client asked for, as the read path needs it.
pub(crate) struct Ask<'a> {
    pub(crate) method: &'a Method,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) conn: &'a Connection,
}

impl Ask<'_> {
    fn head(&self) -> bool {
        *self.method == Method::HEAD
    }
}

/// What Harbor says a tag names, shared by everyone who asked at once.
#[derive(Clone)]
enum TagAnswer {
    Named {
        digest: Digest,
    },
    /// Another answer (401, 404...): the client's own request gets Harbor's exact one.
    Other,
    Unreachable(String),
}

type TagKey = (u64, String, String, String);

/// The read path's state: one per process.
pub(crate) struct ReadPath {
    cache: Cache,
    authorization: Authorization,
    fallback: Vec<Arc<Target>>,
    tag_asks: dashmap::DashMap<TagKey, Shared<BoxFuture<'static, TagAnswer>>>,
    fallback_log: Throttle,
    /// The `WWW-Authenticate` Harbor's `/v2/` sent last, to send while Harbor is away.
    challenge: std::sync::Mutex<Option<HeaderValue>>,
}

impl ReadPath {
    /// The read path over `cache`, checking tokens with `trust` while Harbor is away and reading
    /// from `targets` named in `config.fallback_targets` then.
    pub(crate) fn new(
        cache: Cache,
        trust: Option<TokenTrust>,
        config: &CacheConfig,
        targets: &[Arc<Target>],
    ) -> ReadPath {
        let fallback = config
            .fallback_targets
            .iter()
            .filter_map(|name| targets.iter().find(|t| t.name() == name).cloned())
            .collect();
        ReadPath {
            cache,
            authorization: Authorization::new(trust),
            fallback,
            tag_asks: dashmap::DashMap::new(),
            fallback_log: Throttle::new(Duration::from_secs(10)),
            challenge: std::sync::Mutex::new(None),
        }
    }

    /// The cache, for status displays.
    pub(crate) fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Serves a pull, or says to forward it.
    pub(crate) async fn read(&self, up: &Arc<Upstream>, route: &Route, ask: &Ask<'_>) -> Read {
        if !matches!(*ask.method, Method::GET | Method::HEAD) {
            return Read::Forward;
        }
        let range = match ask.headers.get(header::RANGE) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(parse_range) {
                Some(r) => Some(r),
                // A range regtee does not take apart: Harbor answers it.
                None => return Read::Forward,
            },
        };
        match route {
            Route::Blob { name, digest } => {
                self.by_digest(up, name, digest, false, range, ask).await
            }
            Route::Base => self.version_check(up, ask).await,
            Route::Manifest { name, reference } if range.is_none() => match reference {
                Reference::Digest(digest) => {
                    self.by_digest(up, name, digest, true, None, ask).await
                }
                Reference::Tag(tag) => self.by_tag(up, name, tag, ask).await,
            },
            _ => Read::Forward,
        }
    }

    /// A blob or a manifest by digest.
    async fn by_digest(
        &self,
        up: &Arc<Upstream>,
        repo: &RepositoryName,
        digest: &Digest,
        manifest: bool,
        range: Option<(u64, Option<u64>)>,
        ask: &Ask<'_>,
    ) -> Read {
        if let Some(cached) = self
            .cache
            .get(digest)
            .filter(|c| usable(c, manifest, ask.headers))
        {
            match self
                .authorization
                .decide(up, &self.cache, repo, digest, manifest, ask)
                .await
            {
                Decision::Yes => {
                    if let Some(answer) =
                        self.hit(digest, &cached, range, ask.head(), CacheRead::Hit)
                    {
                        return Read::Answer(answer);
                    }
                }
                Decision::Harbor(answer) => return refused(answer, ask),
                Decision::Unreachable(error) => {
                    return match self.authorization.locally(&self.cache, repo, digest, ask) {
                        true => self.fallback_hit(repo, digest, &cached, range, ask, &error),
                        false => Read::Error(error),
                    };
                }
            }
        }
        if ask.head() || range.is_some() {
            return Read::Forward;
        }
        match self.cache.slot(digest, repo.as_str()) {
            Slot::Join(fill) => {
                match self
                    .authorization
                    .decide(up, &self.cache, repo, digest, manifest, ask)
                    .await
                {
                    Decision::Yes => {}
                    Decision::Harbor(answer) => return refused(answer, ask),
                    Decision::Unreachable(error) => {
                        if !self.authorization.locally(&self.cache, repo, digest, ask) {
                            return Read::Error(error);
                        }
                    }
                }
                let Some((size, kind)) = fill.begun().await else {
                    return Read::Forward;
                };
                self.cache.count(manifest, CacheRead::Coalesced);
                let body = fill.reader(&self.cache, "harbor");
                Read::Answer(content(digest, &kind, size, None, body))
            }
            Slot::Start(starting) => {
                let path = content_path(repo, digest, manifest);
                let answer = match up
                    .ask(Method::GET, &path, ask.headers, ask.conn, true)
                    .await
                {
                    Ok(answer) => answer,
                    Err(error) => {
                        drop(starting);
                        return self.fallback(repo, digest, manifest, ask, error).await;
                    }
                };
                let status = answer.status();
                let size = content_length(answer.headers());
                if status.is_server_error() {
                    drop(starting);
                    let error = OciError::bad_gateway(format!("Harbor answered {status}"));
                    return match self.fallback(repo, digest, manifest, ask, error).await {
                        Read::Error(_) => Read::Harbor(answer.map(body::boxed)),
                        served => served,
                    };
                }
                let Some(size) = size.filter(|_| status == StatusCode::OK) else {
                    return Read::Harbor(answer.map(body::boxed));
                };
                let kind = match manifest {
                    false => Kind::Blob,
                    true if size > MAX_MANIFEST_BYTES as u64 => {
                        return Read::Harbor(answer.map(body::boxed));
                    }
                    true => Kind::Manifest {
                        media_type: answer
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
                            .to_string(),
                    },
                };
                self.authorization.remember(&self.cache, repo, digest, ask);
                let (parts, incoming) = answer.into_parts();
                match starting.begin(body::boxed(incoming), size, kind.clone(), "harbor") {
                    Ok(body) => {
                        self.cache.count(manifest, CacheRead::Miss);
                        Read::Answer(content(digest, &kind, size, None, body))
                    }
                    // Larger than the whole cache: streamed as Harbor sent it.
                    Err(body) => Read::Harbor(Response::from_parts(parts, body)),
                }
            }
        }
    }

    /// A manifest by tag: Harbor names the digest, the manifest is served by digest.
    async fn by_tag(
        &self,
        up: &Arc<Upstream>,
        repo: &RepositoryName,
        tag: &Tag,
        ask: &Ask<'_>,
    ) -> Read {
        match self.ask_tag(up, repo, tag, ask).await {
            TagAnswer::Named { digest } => {
                self.cache.set_tag(repo.as_str(), tag.as_str(), &digest);
                self.authorization.remember(&self.cache, repo, &digest, ask);
                if let Some(cached) = self
                    .cache
                    .get(&digest)
                    .filter(|c| usable(c, true, ask.headers))
                    && let Some(answer) =
                        self.hit(&digest, &cached, None, ask.head(), CacheRead::Hit)
                {
                    return Read::Answer(answer);
                }
                if ask.head() {
                    return Read::Forward;
                }
                self.by_digest(up, repo, &digest, true, None, ask).await
            }
            TagAnswer::Other => Read::Forward,
            TagAnswer::Unreachable(why) => {
                let error = OciError::bad_gateway(why);
                let Some(digest) = self.cache.tag(repo.as_str(), tag.as_str()) else {
                    return Read::Error(error);
                };
                if !self.authorization.grants_locally(repo, ask) {
                    return Read::Error(error);
                }
                match self
                    .cache
                    .get(&digest)
                    .filter(|c| usable(c, true, ask.headers))
                {
                    Some(cached) => self.fallback_hit(repo, &digest, &cached, None, ask, &error),
                    None => self.fallback(repo, &digest, true, ask, error).await,
                }
                .stale(&digest)
            }
        }
    }

    /// Asks Harbor what `repo:tag` names, once for everyone asking at once with the same
    /// credentials and `Accept`.
    async fn ask_tag(
        &self,
        up: &Arc<Upstream>,
        repo: &RepositoryName,
        tag: &Tag,
        ask: &Ask<'_>,
    ) -> TagAnswer {
        let accept: Vec<&str> = ask
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let key: TagKey = (
            authorize::credential_key(ask.headers),
            repo.as_str().to_string(),
            tag.as_str().to_string(),
            accept.join(","),
        );
        let shared = self
            .tag_asks
            .entry(key.clone())
            .or_insert_with(|| {
                let (up, headers, conn) = (up.clone(), ask.headers.clone(), *ask.conn);
                let path = format!("/v2/{}/manifests/{}", repo.as_str(), tag.as_str());
                async move {
                    match up.ask(Method::HEAD, &path, &headers, &conn, false).await {
                        Ok(a) if a.status() == StatusCode::OK => {
                            match Digest::from_headers(a.headers()) {
                                Some(digest) => TagAnswer::Named { digest },
                                None => TagAnswer::Other,
                            }
                        }
                        Ok(a) if a.status().is_server_error() => {
                            TagAnswer::Unreachable(format!("Harbor answered {}", a.status()))
                        }
                        Ok(_) => TagAnswer::Other,
                        Err(e) => TagAnswer::Unreachable(e.message().to_string()),
                    }
                }
                .boxed()
                .shared()
            })
            .clone();
        let answer = shared.clone().await;
        self.tag_asks
            .remove_if(&key, |_, current| current.ptr_eq(&shared));
        answer
    }

    fn remember_challenge(&self, challenge: &HeaderValue) {
        if let Ok(mut last) = self.challenge.lock() {
            *last = Some(challenge.clone());
        }
    }

    fn last_challenge(&self) -> Option<HeaderValue> {
        self.challenge.lock().ok()?.clone()
    }

    /// A cached entry as the answer (`None` if its file turned out damaged: read it again).
    fn hit(
        &self,
        digest: &Digest,
        cached: &Cached,
        range: Option<(u64, Option<u64>)>,
        head: bool,
        how: CacheRead,
    ) -> Option<Response<ProxyBody>> {
        let manifest = matches!(cached.kind, Kind::Manifest { .. });
        let range = match range {
            None => None,
            Some((start, end)) => {
                let end = end.unwrap_or(u64::MAX).min(cached.size.saturating_sub(1));
                if start > end || start >= cached.size {
                    return Some(unsatisfiable(cached.size));
                }
                Some((start, end))
            }
        };
        if head {
            self.cache.count(manifest, how);
            return Some(content(
                digest,
                &cached.kind,
                cached.size,
                range,
                body::empty(),
            ));
        }
        let read = self.cache.read(digest, range)?;
        self.cache.count(manifest, how);
        Some(content(
            digest, &read.kind, read.size, read.range, read.body,
        ))
    }
}

/// Harbor's no to the `HEAD` that authorizes a read. A `GET` is forwarded as it came, so the
/// client gets Harbor's own refusal with its body (a `HEAD`'s has none); it costs a request
/// only when Harbor refuses, and whatever Harbor then answers is Harbor's to give.
fn refused(answer: Response<ProxyBody>, ask: &Ask<'_>) -> Read {
    match ask.head() {
        true => Read::Harbor(answer),
        false => Read::Forward,
    }
}

/// What the fallback reads answer, marked when they stand for a tag Harbor could not be asked
/// about.
trait Stale {
    fn stale(self, digest: &Digest) -> Self;
}

impl Stale for Read {
    fn stale(self, digest: &Digest) -> Read {
        match self {
            Read::Answer(mut answer) => {
                tracing::warn!(%digest, "Harbor cannot be asked what a tag names now: serving the digest it named last, marked stale");
                answer.headers_mut().insert(
                    header::WARNING,
                    HeaderValue::from_static(
                        "110 regtee \"Response is Stale: the digest Harbor named last; Harbor cannot be asked now\"",
                    ),
                );
                Read::Answer(answer)
            }
            other => other,
        }
    }
}

/// Whether a cached entry can answer this request: a manifest only to a client that accepts
/// its media type (as the registry would check), and only as what was asked for.
fn usable(cached: &Cached, manifest: bool, headers: &HeaderMap) -> bool {
    match &cached.kind {
        Kind::Blob => !manifest,
        Kind::Manifest { media_type } => {
            let mut accepts = headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|v| v.split(';').next().unwrap_or("").trim())
                .peekable();
            manifest && (accepts.peek().is_none() || accepts.any(|a| a == media_type || a == "*/*"))
        }
    }
}

fn content_path(repo: &RepositoryName, digest: &Digest, manifest: bool) -> String {
    let kind = if manifest { "manifests" } else { "blobs" };
    format!("/v2/{}/{kind}/{digest}", repo.as_str())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `bytes=<start>-[<end>]`, one range (what registry clients send to resume).
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse().ok()?),
    };
    Some((start, end))
}

/// A content answer, as distribution gives it.
fn content(
    digest: &Digest,
    kind: &Kind,
    size: u64,
    range: Option<(u64, u64)>,
    body: ProxyBody,
) -> Response<ProxyBody> {
    let mut answer = Response::new(body);
    let headers = answer.headers_mut();
    let content_type = match kind {
        Kind::Blob => "application/octet-stream",
        Kind::Manifest { media_type } => media_type,
    };
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        headers.insert("docker-content-digest", v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    let length = match range {
        Some((start, end)) => {
            *answer.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
                answer.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            end - start + 1
        }
        None => size,
    };
    if matches!(kind, Kind::Blob) {
        answer
            .headers_mut()
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    // A HEAD says how long the content is: hyper keeps the length and sends no body.
    answer
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    answer
}

/// 416, with the size a valid range must stay within.
fn unsatisfiable(size: u64) -> Response<ProxyBody> {
    let mut answer = Response::new(body::empty());
    *answer.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        answer.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    answer
}
