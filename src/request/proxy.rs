//! The request path: forward to Harbor, stream both ways, rewrite only what must point at regtee.
//!
//! This path has to be as transparent and as fast as a wire. Bodies stream through [`Tracked`]
//! without being collected; upstream answers pass through unchanged except for the headers that
//! would send the client around regtee. regtee answers on its own only when it must: 502 when
//! Harbor cannot be reached, 504 when it does not answer in time.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::{self, ProxyBody, Tracked, Watched};
use crate::config::{ProxyConfig, UpstreamConfig};
use crate::error::OciError;
use crate::mirror::tee::Tee;
use crate::oci::error_code::ErrorCode;
use crate::origin::Origin;
use crate::request::headers::{self, RealmRewrite};
use crate::request::primary::{OnPrimary, PrimaryPath, Reach};
use crate::request::read::{Ask, Read, ReadPath};
use crate::request::route::{self, FOREIGN_TOKEN_PREFIX, Route};
use crate::request::server::Connection;
use crate::request::upstream::{Upstream, UpstreamError};
use crate::throttle::Throttle;

/// Token realms on other origins that upstream challenges named, so clients that can reach only
/// regtee can still log in. Only realms the upstream advertised can be relayed to: regtee is not
/// an open proxy. A registry names a handful of realms; the table is bounded all the same.
#[derive(Default)]
pub(crate) struct RealmRelay {
    realms: DashMap<String, Uri>,
}

/// More distinct realms than any registry advertises.
const MAX_RELAYED_REALMS: usize = 32;

static RELAY_FULL: Throttle = Throttle::new(Duration::from_secs(300));

impl RealmRelay {
    /// Registers a realm and returns the path that relays to it; `None` if the realm is not an
    /// absolute http(s) URL or the table is full.
    pub(crate) fn register(&self, realm: &str) -> Option<String> {
        let uri: Uri = realm.trim().parse().ok()?;
        Origin::of(&uri)?;
        let id = crate::oci::digest::Digest::sha256_of(realm.as_bytes()).hex()[..16].to_string();
        if !self.realms.contains_key(&id) {
            if self.realms.len() >= MAX_RELAYED_REALMS {
                if let Some(held_back) = RELAY_FULL.allow() {
                    tracing::warn!(
                        realm,
                        held_back,
                        "Harbor named more than {MAX_RELAYED_REALMS} token realms on other origins; this one is passed to the client as it is"
                    );
                }
                return None;
            }
            self.realms.insert(id.clone(), uri);
        }
        Some(format!("{FOREIGN_TOKEN_PREFIX}{id}"))
    }

    /// The realm's origin and URL for a relay id, with the client's query appended.
    pub(crate) fn resolve(&self, id: &str, query: Option<&str>) -> Option<(Origin, Uri)> {
        let realm = self.realms.get(id)?.clone();
        let origin = Origin::of(&realm)?;
        let url = match query {
            Some(q) if !q.is_empty() => {
                let sep = if realm.query().is_some() { '&' } else { '?' };
                format!("{realm}{sep}{q}").parse().ok()?
            }
            _ => realm,
        };
        Some((origin, url))
    }
}

/// The request path's state: one per process, shared by every connection.
pub(crate) struct Proxy {
    upstream: Arc<Upstream>,
    body_idle_timeout: Duration,
    /// Pulls served through the cache, when it is configured.
    read_path: Option<Arc<ReadPath>>,
    /// Requests carried out on a target while it is the primary.
    primary: Option<Arc<PrimaryPath>>,
    relay: Option<RealmRelay>,
    /// Made-up relay ids cost Harbor at most one challenge a second.
    learning: Throttle,
    tee: Option<Arc<Tee>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Proxy {
    /// Builds the proxy for `upstream`; `tee` records completed pushes for mirroring.
    pub(crate) fn new(
        proxy: &ProxyConfig,
        upstream: &UpstreamConfig,
        tee: Option<Arc<Tee>>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
        read_path: Option<Arc<ReadPath>>,
        primary: Option<Arc<PrimaryPath>>,
    ) -> Result<Proxy, UpstreamError> {
        Ok(Proxy {
            upstream: Arc::new(Upstream::new(upstream, proxy.body_idle_timeout)?),
            body_idle_timeout: proxy.body_idle_timeout,
            read_path,
            primary,
            relay: upstream.rewrite_token_realm.then(RealmRelay::default),
            learning: Throttle::new(Duration::from_secs(1)),
            tee,
            metrics,
        })
    }

    /// Serves one request, phase by phase: where it goes, Harbor's answer, the completed write
    /// recorded, the answer shaped for the client. Never fails: every error becomes a response.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Connection,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let (parts, incoming) = req.into_parts();
        if parts.method == Method::OPTIONS && parts.uri.path() == "*" {
            return Ok(options_asterisk());
        }
        let route = Route::classify(parts.uri.path());
        let log = Arc::new(RequestLog::new(&parts.method, &route, self.metrics.clone()));
        let client = ClientRequest {
            method: parts.method.clone(),
            // A refcounted clone: recognising completed writes needs its query.
            uri: parts.uri.clone(),
            // What the client's origin is worked out from, if a response needs it.
            host: parts.headers.get(http::header::HOST).cloned(),
            conn,
        };
        if let Some(primary) = &self.primary
            && let Some(target) = primary.serving(&route, &parts)
        {
            let public = headers::public_origin(
                client.conn.scheme,
                &client.uri,
                client.host.as_ref(),
                client.conn.local,
            );
            let reach = Reach {
                public: &public,
                upstream: &self.upstream,
                conn: &client.conn,
            };
            let served = primary
                .serve(&target, parts, incoming, &route, &reach)
                .await;
            return Ok(match served {
                OnPrimary::Answer(answer) => log.served(answer, self.body_idle_timeout),
                OnPrimary::Refused(answer) => {
                    log.upstream_answered();
                    self.respond(answer, &client, log)
                }
                OnPrimary::Error(error) => log.answer(error),
            });
        }
        if let Some(read_path) = &self.read_path {
            let ask = Ask {
                method: &parts.method,
                headers: &parts.headers,
                conn: &client.conn,
            };
            match read_path.read(&self.upstream, &route, &ask).await {
                Read::Forward => {}
                Read::Answer(answer) => return Ok(log.served(answer, self.body_idle_timeout)),
                Read::Harbor(answer) => {
                    log.upstream_answered();
                    return Ok(self.respond(answer, &client, log));
                }
                Read::Error(error) => return Ok(log.answer(error)),
            }
        }
        let (request, end_rx) = match self
            .upstream_request(parts, incoming, &route, &client, &log)
            .await
        {
            Ok(prepared) => prepared,
            Err(error) => return Ok(log.answer(error)),
        };
        let response = match self.upstream.send(request, end_rx).await {
            Ok(response) => response,
            Err(error) => return Ok(log.answer(error)),
        };
        log.upstream_answered();
        // A completed write is durable (and, when a target is the primary, its blob there)
        // before the client hears of it.
        if let Some(write) = route::completed_write(
            &client.method,
            &route,
            client.uri.query(),
            response.status(),
            response.headers(),
        ) {
            if let Some(tee) = &self.tee
                && let Err(error) = tee.record_before_answer(&write, None).await
            {
                return Ok(log.answer(error));
            }
            if let Some(primary) = &self.primary
                && let Err(error) = primary.carry_over(&write).await
            {
                return Ok(log.answer(error));
            }
        }
        Ok(self.respond(response, &client, log))
    }

    /// The request as it goes upstream: to Harbor or a relayed realm, its headers prepared,
    /// its body tracked, with a signal for when its last byte has gone.
    async fn upstream_request(
        &self,
        mut parts: http::request::Parts,
        incoming: Incoming,
        route: &Route,
        client: &ClientRequest,
        log: &RequestLog,
    ) -> Result<(Request<ProxyBody>, watch::Receiver<bool>), OciError> {
        let found = match self.destination(&parts.method, route, &parts.uri) {
            Err(_) if matches!(route, Route::ForeignToken { .. }) && self.learn_realms().await => {
                self.destination(&parts.method, route, &parts.uri)
            }
            found => found,
        };
        let (destination, uri) = found?;
        let host = if destination == self.upstream.origin {
            self.upstream.host.clone()
        } else {
            http::HeaderValue::from_str(&destination.authority())
                .map_err(|_| OciError::bad_gateway("invalid token realm host"))?
        };
        headers::prepare_request(
            &mut parts.headers,
            &host,
            client.conn.peer.ip(),
            client.conn.scheme,
        );
        let (end_tx, end_rx) = watch::channel(false);
        let body = Tracked::new(incoming, log.bytes_in.clone())
            .idle_timeout(self.body_idle_timeout)
            .signal_end(end_tx);
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        Ok((Request::from_parts(parts, body::boxed(body)), end_rx))
    }

    /// Harbor's answer as the client gets it: URLs that would send it around regtee rewritten
    /// to the origin it used, its body streamed, counted and cut when it stalls.
    fn respond<B>(
        &self,
        response: Response<B>,
        client: &ClientRequest,
        log: Arc<RequestLog>,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<body::BoxError>,
    {
        let status = response.status();
        let (mut parts, upstream_body) = response.into_parts();
        if let Some(https) = crate::origin::redirect_to_https(
            status,
            &parts.headers,
            &self.upstream.origin,
            &client.uri,
        ) {
            return log.answer(self.upgrade_redirect(&https));
        }
        let relay = self
            .relay
            .as_ref()
            .map(|r| move |realm: &str| r.register(realm));
        let realms = match &relay {
            Some(register) => RealmRewrite::Relay(register),
            None => RealmRewrite::SameOriginOnly,
        };
        if headers::may_point_back(&parts.headers) {
            let public = headers::public_origin(
                client.conn.scheme,
                &client.uri,
                client.host.as_ref(),
                client.conn.local,
            );
            let rebase = headers::Rebase {
                upstream: &self.upstream.origin,
                public: &public,
            };
            headers::rewrite_response(&mut parts.headers, &rebase, realms);
        } else {
            headers::strip_hop_by_hop(&mut parts.headers);
        }
        log.status.store(status.as_u16(), Ordering::Relaxed);
        let body = Tracked::new(upstream_body, log.bytes_out.clone())
            .idle_timeout(self.body_idle_timeout)
            .hold(log);
        // Timed apart from polling too: an HTTP/2 client that never opens its window is never
        // polled for, and would hold the upstream connection as long as it stays.
        Response::from_parts(parts, Watched::body(body, self.body_idle_timeout))
    }

    /// A relay id this process never handed out: another replica did (or this process before a
    /// restart). Ids are derived from the realms, and the realms are Harbor's, so asking Harbor
    /// for a challenge (`GET /v2/`, anonymous) teaches this process the same ones: no state to
    /// share between replicas. Returns whether a realm was learned.
    async fn learn_realms(&self) -> bool {
        let Some(relay) = &self.relay else {
            return false;
        };
        if self.learning.allow().is_none() {
            return false;
        }
        let Ok(uri) = self
            .upstream
            .uri(http::uri::PathAndQuery::from_static("/v2/"))
        else {
            return false;
        };
        let Ok(request) = Request::get(uri)
            .header(http::header::HOST, self.upstream.host.clone())
            .body(body::empty())
        else {
            return false;
        };
        let Ok(response) = self.upstream.send_bodyless(request).await else {
            return false;
        };
        let mut learned = false;
        for value in response.headers().get_all(http::header::WWW_AUTHENTICATE) {
            let Some((challenge, origin)) = value.to_str().ok().and_then(headers::challenge_realm)
            else {
                continue;
            };
            if let Some(realm) = challenge.param("realm")
                && !self.upstream.origin.same_authority(&origin)
            {
                learned |= relay.register(realm).is_some();
            }
        }
        learned
    }

    /// Where a request goes: Harbor, or a relayed token realm.
    fn destination(
        &self,
        method: &Method,
        route: &Route,
        uri: &Uri,
    ) -> Result<(Origin, Uri), OciError> {
        if uri.path() == "*" {
            // `OPTIONS *` asks about regtee itself (RFC 9110 §9.3.7); nothing to forward.
            return Err(OciError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported,
                "`*` is a request target for OPTIONS only, which regtee answers itself",
            ));
        }
        if let Route::Invalid(invalid) = route {
            let (status, code) = invalid.status_and_code(method);
            return Err(OciError::new(status, code, invalid.message.clone()));
        }
        if let Route::ForeignToken { id } = route {
            return self
                .relay
                .as_ref()
                .and_then(|relay| relay.resolve(id, uri.query()))
                .ok_or_else(|| {
                    OciError::new(
                        StatusCode::NOT_FOUND,
                        ErrorCode::Unauthorized,
                        "unknown token realm: request /v2/ again to get a fresh challenge",
                    )
                });
        }
        // The client's path and query as they are (a refcounted clone), on the upstream.
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let target = self.upstream.uri(path).map_err(|_| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported,
                "invalid request path",
            )
        })?;
        Ok((self.upstream.origin.clone(), target))
    }
}

impl Proxy {
    /// Harbor answered with a redirect to its own HTTPS port: it serves only HTTPS (its nginx
    /// answers 308 on the plain port). Passing the redirect on would send clients straight to
    /// Harbor, around regtee, and their pushes would never be mirrored.
    fn upgrade_redirect(&self, https: &Origin) -> OciError {
        let message = format!(
            "upstream {} redirects to {https}: Harbor serves HTTPS only; set [upstream] url = \"{https}\" in regtee's config (and ca_file if its CA is private)",
            self.upstream.origin
        );
        if let Some(held_back) = UPGRADE_REDIRECT.allow() {
            tracing::error!(held_back, "{message}");
        }
        OciError::bad_gateway(message)
    }
}

static UPGRADE_REDIRECT: Throttle = Throttle::new(Duration::from_secs(60));

/// The answer to `OPTIONS *`: what regtee accepts, about itself (RFC 9110 §9.3.7).
fn options_asterisk() -> Response<ProxyBody> {
    let mut response = Response::new(body::empty());
    response.headers_mut().insert(
        http::header::ALLOW,
        http::HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(0));
    response
}

/// What a response is shaped for: the client's request as it arrived.
struct ClientRequest {
    method: Method,
    uri: Uri,
    host: Option<http::HeaderValue>,
    conn: Connection,
}

/// One request's facts; the log line (and metrics) are written when the response body is done.
struct RequestLog {
    method: Method,
    kind: &'static str,
    repository: Option<String>,
    started: Instant,
    upstream_latency: std::sync::OnceLock<Duration>,
    status: AtomicU16,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl RequestLog {
    fn new(method: &Method, route: &Route, metrics: Option<Arc<crate::metrics::Metrics>>) -> Self {
        RequestLog {
            method: method.clone(),
            kind: route.kind(),
            repository: route.repository().map(|r| r.as_str().to_string()),
            started: Instant::now(),
            upstream_latency: std::sync::OnceLock::new(),
            status: AtomicU16::new(0),
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            metrics,
        }
    }

    fn upstream_answered(&self) {
        let _ = self.upstream_latency.set(self.started.elapsed());
    }

    /// Answers with content the read path served: counted, logged when done, its body cut if
    /// it stalls (even when nobody polls it).
    fn served(self: Arc<Self>, answer: Response<ProxyBody>, idle: Duration) -> Response<ProxyBody> {
        self.status
            .store(answer.status().as_u16(), Ordering::Relaxed);
        let (parts, b) = answer.into_parts();
        let b = Tracked::new(b, self.bytes_out.clone())
            .idle_timeout(idle)
            .hold(self);
        Response::from_parts(parts, Watched::body(b, idle))
    }

    /// Answers with regtee's own error; the log line is written when the response is dropped.
    fn answer(self: Arc<Self>, error: OciError) -> Response<ProxyBody> {
        self.status
            .store(error.status().as_u16(), Ordering::Relaxed);
        tracing::warn!(
            method = %self.method,
            route = self.kind,
            repository = self.repository.as_deref().unwrap_or("-"),
            status = error.status().as_u16(),
            "{}",
            error.message()
        );
        let response = error.into_response(body::full);
        let (parts, b) = response.into_parts();
        let b = Tracked::new(b, self.bytes_out.clone()).hold(self);
        Response::from_parts(parts, body::boxed(b))
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let status = self.status.load(Ordering::Relaxed);
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let bytes_out = self.bytes_out.load(Ordering::Relaxed);
        let duration = self.started.elapsed();
        tracing::info!(
            target: "regtee::request",
            method = %self.method,
            route = self.kind,
            repository = self.repository.as_deref().unwrap_or("-"),
            status,
            bytes_in,
            bytes_out,
            duration_ms = duration.as_millis() as u64,
            "request"
        );
        if let Some(metrics) = &self.metrics {
            metrics.observe_request(
                &self.method,
                self.kind,
                status,
                bytes_in,
                bytes_out,
                self.upstream_latency.get().copied(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_registers_only_what_it_saw() {
        let relay = RealmRelay::default();
        let path = relay.register("https://auth.example.net/token").unwrap();
        let id = path.strip_prefix(FOREIGN_TOKEN_PREFIX).unwrap();
        let (origin, url) = relay
            .resolve(id, Some("service=reg&scope=repository%3Aa%3Apull"))
            .unwrap();
        assert_eq!(origin.to_string(), "https://auth.example.net");
        assert_eq!(
            url,
            "https://auth.example.net/token?service=reg&scope=repository%3Aa%3Apull"
        );
        assert!(relay.resolve("0123456789abcdef", None).is_none());
        assert_eq!(
            relay.register("https://auth.example.net/token").unwrap(),
            path
        );
        assert_eq!(relay.register("ftp://auth.example.net/token"), None);
    }

    #[test]
    fn relay_table_is_bounded() {
        let relay = RealmRelay::default();
        for i in 0..MAX_RELAYED_REALMS {
            assert!(
                relay
                    .register(&format!("https://auth{i}.example.net/token"))
                    .is_some()
            );
        }
        assert_eq!(
            relay.register("https://one-too-many.example.net/token"),
            None
        );
        // Realms already known keep working.
        assert!(relay.register("https://auth0.example.net/token").is_some());
        assert_eq!(relay.realms.len(), MAX_RELAYED_REALMS);
    }
}
