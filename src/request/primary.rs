//! While a target is the primary (`regtee cutover`), clients' `/v2/` requests are carried out
//! on it, behind the same hostname and with Harbor's logins:
//!
//! - Each request's Bearer token, which clients still get from Harbor's token service, is
//!   checked as Harbor's registry checks it (`token_check`), for the actions distribution's token
//!   authorization asks of that method: `GET`/`HEAD` pull; `POST`/`PUT`/`PATCH` pull and push;
//!   `DELETE` delete; a mount pull on its source too; the catalog `registry:catalog:*`. A
//!   refusal is the registry's: 401 `UNAUTHORIZED` with a challenge naming Harbor's token
//!   service (learned from Harbor's own `/v2/`).
//! - The request is then made on the target with regtee's own credentials there, the target's
//!   namespace mapping applied both ways: paths, `Location`, `Link`, tag lists, the catalog and
//!   error messages name Harbor's names.
//! - An upload session the target opens is handed to the client as
//!   `regtee.<target>.<its path, base64url>`: the rest of that session goes to the target,
//!   whatever the primary is by then, as sessions Harbor opened stay Harbor's.
//! - A completed write is teed (to Harbor and the other targets, from this one) before the
//!   client hears of it, as a push through Harbor is.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::{self, ProxyBody};
use crate::error::OciError;
use crate::mirror::Mirror;
use crate::mirror::target::Target;
use crate::mirror::tee::{Tee, Write};
use crate::oci::error_code::ErrorCode;
use crate::oci::manifest::MAX_MANIFEST_BYTES;
use crate::origin::Origin;
use crate::queue::PrimaryRecord;
use crate::registry::RequestBody;
use crate::request::route::{self, Route};
use crate::request::server::Connection;
use crate::request::upstream::Upstream;
use crate::token_check::{TokenTrust, Verdict};

/// How an upload session the target opened is named to clients.
const SESSION_PREFIX: &str = "regtee.";

/// The most of a tag list, a catalog or an error body read to rewrite its names.
const MAX_REWRITTEN_BODY: usize = 16 * 1024 * 1024;

/// Request headers a client's request carries on to the target; the rest (credentials, `Host`,
/// hop-by-hop) are the client's business with regtee.
const REQUEST_HEADERS: [HeaderName; 7] = [
    header::ACCEPT,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
];

/// What the primary path made of a request.
pub(crate) enum OnPrimary {
    /// The target's answer, its names made Harbor's.
    Answer(Response<ProxyBody>),
    /// Refused as Harbor's registry refuses: passed on as Harbor's answers are (its realm
    /// rewritten for the client).
    Refused(Response<ProxyBody>),
    /// regtee's own error.
    Error(OciError),
}

/// Where the request came from and what else it may need to ask: the origin the client used
/// (for URLs in answers), and Harbor (for its challenge, in refusals).
pub(crate) struct Reach<'a> {
    pub(crate) public: &'a Origin,
    pub(crate) upstream: &'a Upstream,
    pub(crate) conn: &'a Connection,
}

/// One action a request needs on one resource.
struct Need {
    kind: &'static str,
    name: String,
    action: &'static str,
}

/// The primary path: one per process.
pub(crate) struct PrimaryPath {
    current: watch::Receiver<PrimaryRecord>,
    mirror: Arc<Mirror>,
    targets: Vec<Arc<Target>>,
    trust: Option<TokenTrust>,
    tee: Option<Arc<Tee>>,
    /// Harbor's challenge (`realm`, `service`), from its `/v2/`, for refusals.
    challenge: Mutex<Option<(String, String)>>,
}

impl PrimaryPath {
    pub(crate) fn new(
        current: watch::Receiver<PrimaryRecord>,
        mirror: Arc<Mirror>,
        trust: Option<TokenTrust>,
        tee: Option<Arc<Tee>>,
    ) -> PrimaryPath {
        PrimaryPath {
            current,
            targets: mirror.targets().to_vec(),
            mirror,
            trust,
            tee,
            challenge: Mutex::new(None),
        }
    }

    /// A blob upload Harbor completed while a target is the primary (a session Harbor opened
    /// before the switch): the blob is copied to the primary before the client hears of it, so
    /// the manifest the client pushes next, to the primary, finds it there.
    pub(crate) async fn carry_over(&self, write: &Write) -> Result<(), OciError> {
        let Write::Blob {
            repository, digest, ..
        } = write
        else {
            return Ok(());
        };
        let Some(primary) = self.current.borrow().primary.target().map(str::to_string) else {
            return Ok(());
        };
        let Some(target) = self.targets.iter().find(|t| t.name() == primary) else {
            return Ok(());
        };
        self.mirror
            .carry_over_blob(target, repository, digest)
            .await
            .map_err(|e| {
                OciError::unavailable(format!(
                    "Harbor took the blob, but it could not be copied to the primary, target {primary} ({e}): retry the upload"
                ))
            })
    }

    /// The target that serves this request, if a target does: the primary's for every
    /// distribution endpoint, the target that opened an upload session for its session.
    pub(crate) fn serving(&self, route: &Route, parts: &Parts) -> Option<Arc<Target>> {
        if let Route::Upload { .. } = route {
            // A session Harbor opened stays Harbor's.
            return self.session_of(parts.uri.path()).map(|(target, _)| target);
        }
        let primary = self.current.borrow().primary.target()?.to_string();
        let target = self.targets.iter().find(|t| t.name() == primary)?.clone();
        match route {
            // The version check: answered here to a token Harbor's registry would accept;
            // anything else gets Harbor's own challenge from Harbor.
            Route::Base => self
                .trust
                .as_ref()?
                .accepts(authorization(&parts.headers), SystemTime::now())
                .then_some(target),
            Route::Catalog
            | Route::Tags { .. }
            | Route::Manifest { .. }
            | Route::Blob { .. }
            | Route::UploadStart { .. }
            | Route::Referrers { .. } => Some(target),
            _ => None,
        }
    }

    /// Carries the request out on `target`.
    pub(crate) async fn serve(
        &self,
        target: &Target,
        parts: Parts,
        incoming: Incoming,
        route: &Route,
        reach: &Reach<'_>,
    ) -> OnPrimary {
        let Reach {
            public,
            upstream: up,
            conn,
        } = *reach;
        if let Route::Base = route {
            return OnPrimary::Answer(super::version_check_passed());
        }
        let Some(trust) = &self.trust else {
            return OnPrimary::Error(OciError::unavailable(format!(
                "target {} is the primary, but [upstream] token_certificate is not set: regtee cannot check clients' tokens",
                target.name()
            )));
        };
        let query = parts.uri.query().map(str::to_string);
        let needs = needs(&parts.method, route, query.as_deref());
        let now = SystemTime::now();
        for need in &needs {
            match trust.check_access(
                authorization(&parts.headers),
                need.kind,
                &need.name,
                need.action,
                now,
            ) {
                Verdict::Grants { .. } => {}
                Verdict::Denies => return self.refuse(up, conn, &needs, true).await,
                Verdict::Invalid(_) => return self.refuse(up, conn, &needs, false).await,
            }
        }
        let policy = &target.config.policy;
        let Some(path) = target_path(route, &parts.uri, target, query.as_deref(), self) else {
            return OnPrimary::Error(OciError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BlobUploadUnknown,
                "upload session unknown",
            ));
        };
        let mut headers = HeaderMap::new();
        for name in REQUEST_HEADERS {
            for value in parts.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let body = match request_body(&parts.method, route, incoming).await {
            Ok(body) => body,
            Err(error) => return OnPrimary::Error(error),
        };
        let scopes = regtee_scopes(&parts.method, route, &needs, policy);
        let response = match target
            .client
            .relay(parts.method.clone(), &path, headers, body, scopes)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return OnPrimary::Error(OciError::bad_gateway(format!(
                    "the primary, target {}: {e}",
                    target.name()
                )));
            }
        };
        let status = response.status();
        if let (Some(tee), Some(write)) = (
            &self.tee,
            route::completed_write(
                &parts.method,
                route,
                query.as_deref(),
                status,
                response.headers(),
            ),
        ) && let Err(error) = tee.record_before_answer(&write, Some(target.name())).await
        {
            return OnPrimary::Error(error);
        }
        OnPrimary::Answer(
            self.harbor_names(target, route, &parts.method, response, public)
                .await,
        )
    }

    /// The target's answer with Harbor's names and regtee's origin in it.
    async fn harbor_names(
        &self,
        target: &Target,
        route: &Route,
        method: &Method,
        response: Response<Incoming>,
        public: &Origin,
    ) -> Response<ProxyBody> {
        let (parts, incoming) = response.into_parts();
        let mut answer = Response::new(body::empty());
        *answer.status_mut() = parts.status;
        let names = Names::of(target, route);
        for (name, value) in &parts.headers {
            let keep = matches!(
                name.as_str(),
                "content-type"
                    | "content-length"
                    | "content-range"
                    | "range"
                    | "etag"
                    | "accept-ranges"
                    | "docker-content-digest"
                    | "docker-upload-uuid"
                    | "docker-distribution-api-version"
                    | "oci-subject"
                    | "oci-filters-applied"
                    | "oci-chunk-min-length"
                    | "retry-after"
                    | "warning"
            );
            if keep {
                answer.headers_mut().append(name.clone(), value.clone());
            }
        }
        let rebased = |value: &HeaderValue| {
            value
                .to_str()
                .ok()
                .and_then(|v| names.rebase(v, target, public))
                .and_then(|v| HeaderValue::from_str(&v).ok())
        };
        if let Some(location) = parts.headers.get(header::LOCATION).and_then(rebased) {
            answer.headers_mut().insert(header::LOCATION, location);
        }
        for link in parts.headers.get_all(header::LINK) {
            if let Some(link) = link
                .to_str()
                .ok()
                .and_then(|l| names.rebase_link(l, target, public))
                && let Ok(v) = HeaderValue::from_str(&link)
            {
                answer.headers_mut().append(header::LINK, v);
            }
        }
        // An error's text is read too: the target answered regtee, not the client, and may echo
        // regtee's own credentials there (debug pages do), which the client must never see.
        let failed = parts.status.is_client_error() || parts.status.is_server_error();
        let rewrite = *method != Method::HEAD
            && (failed
                || (*method == Method::GET
                    && matches!(route, Route::Tags { .. } | Route::Catalog)));
        if !rewrite {
            *answer.body_mut() = body::boxed(incoming);
            return answer;
        }
        let Ok(bytes) = body::read_limited(incoming, MAX_REWRITTEN_BODY).await else {
            *answer.status_mut() = StatusCode::BAD_GATEWAY;
            answer.headers_mut().remove(header::CONTENT_LENGTH);
            return answer;
        };
        let bytes = match route {
            Route::Catalog if parts.status.is_success() => catalog_names(&bytes, target),
            Route::Tags { .. } if parts.status.is_success() => names.tag_list(&bytes),
            _ => Bytes::from(crate::redact::scrub(&String::from_utf8_lossy(
                &names.in_text(&bytes),
            ))),
        };
        answer
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        *answer.body_mut() = body::full(bytes);
        answer
    }

    /// The registry's refusal, with Harbor's token service in its challenge.
    async fn refuse(
        &self,
        up: &Upstream,
        conn: &Connection,
        needs: &[Need],
        insufficient: bool,
    ) -> OnPrimary {
        let detail: Vec<serde_json::Value> = needs
            .iter()
            .map(|n| serde_json::json!({"Type": n.kind, "Class": "", "Name": n.name, "Action": n.action}))
            .collect();
        let body = serde_json::json!({"errors": [{
            "code": "UNAUTHORIZED",
            "message": "authentication required",
            "detail": detail,
        }]});
        let mut answer = Response::new(body::full(body.to_string()));
        *answer.status_mut() = StatusCode::UNAUTHORIZED;
        let headers = answer.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        if let Some((realm, service)) = self.harbor_challenge(up, conn).await {
            let mut scopes: Vec<String> = Vec::new();
            for need in needs {
                let resource = format!("{}:{}:", need.kind, need.name);
                match scopes.iter_mut().find(|s| s.starts_with(&resource)) {
                    Some(scope) => {
                        scope.push(',');
                        scope.push_str(need.action);
                    }
                    None => scopes.push(format!("{resource}{}", need.action)),
                }
            }
            let mut challenge = format!(
                "Bearer realm=\"{realm}\",service=\"{service}\",scope=\"{}\"",
                scopes.join(" ")
            );
            if insufficient {
                challenge.push_str(",error=\"insufficient_scope\"");
            }
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        OnPrimary::Refused(answer)
    }

    /// Harbor's token realm and service, asked of Harbor's `/v2/` once and kept.
    async fn harbor_challenge(&self, up: &Upstream, conn: &Connection) -> Option<(String, String)> {
        if let Some(known) = self.challenge.lock().ok()?.clone() {
            return Some(known);
        }
        let answer = up
            .ask(Method::GET, "/v2/", &HeaderMap::new(), conn, false)
            .await
            .ok()?;
        let learned = answer
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(crate::challenge::Challenge::parse)
            .find(|c| c.is_bearer())
            .and_then(|c| {
                Some((
                    c.param("realm")?.to_string(),
                    c.param("service")?.to_string(),
                ))
            })?;
        if let Ok(mut known) = self.challenge.lock() {
            *known = Some(learned.clone());
        }
        Some(learned)
    }

    /// The target and its own session path a session named by regtee stands for.
    fn session_of(&self, path: &str) -> Option<(Arc<Target>, String)> {
        let (name, own) = decode_session(path)?;
        let target = self.targets.iter().find(|t| t.name() == name)?.clone();
        Some((target, own))
    }
}

/// `regtee.<target>.<base64url of the target's session path>` from a request path: the target's
/// name and the path. The name is outside input like the rest: it is checked against the route
/// before anything is sent (`own_session`).
fn decode_session(path: &str) -> Option<(String, String)> {
    let id = path.rsplit('/').next()?.strip_prefix(SESSION_PREFIX)?;
    let (name, encoded) = id.split_once('.')?;
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()?;
    Some((name.to_string(), String::from_utf8(decoded).ok()?))
}

/// A session path only if it is one of `target_repository`'s uploads: the client's token was
/// checked for the repository its request names, so a session of any other repository (a
/// crafted id) is unknown, never carried out with regtee's credentials.
fn own_session(own: &str, target_repository: &str) -> Option<String> {
    let prefix = format!("/v2/{target_repository}/blobs/uploads/");
    let session = own.strip_prefix(&prefix)?;
    let id = session.split('?').next().unwrap_or_default();
    let valid = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+'));
    valid.then(|| own.to_string())
}

/// The `Authorization` value, if readable.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// What the client's token must grant: distribution's token authorization by method.
fn needs(method: &Method, route: &Route, query: Option<&str>) -> Vec<Need> {
    let Some(name) = route.repository() else {
        return vec![Need {
            kind: "registry",
            name: "catalog".into(),
            action: "*",
        }];
    };
    let need = |action| Need {
        kind: "repository",
        name: name.as_str().to_string(),
        action,
    };
    let mut needs = match *method {
        Method::GET | Method::HEAD => vec![need("pull")],
        Method::DELETE => vec![need("delete")],
        _ => vec![need("pull"), need("push")],
    };
    if let (Route::UploadStart { .. }, Some(from)) = (route, query_param(query, "from"))
        && query_param(query, "mount").is_some()
    {
        needs.push(Need {
            kind: "repository",
            name: from,
            action: "pull",
        });
    }
    needs
}

/// The scopes regtee's own token on the target needs for this request.
fn regtee_scopes(
    method: &Method,
    route: &Route,
    needs: &[Need],
    policy: &crate::config::TargetPolicy,
) -> Vec<String> {
    if let Route::Catalog = route {
        return vec!["registry:catalog:*".into()];
    }
    let actions = match *method {
        Method::GET | Method::HEAD => "pull",
        Method::DELETE => "delete",
        _ => "pull,push",
    };
    needs
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let name = policy.target_repository(&n.name);
            match i {
                0 => format!("repository:{name}:{actions}"),
                _ => format!("repository:{name}:pull"),
            }
        })
        .collect()
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The request's path and query on the target: its names mapped, a session regtee named
/// resolved to the target's own.
fn target_path(
    route: &Route,
    uri: &http::Uri,
    target: &Target,
    query: Option<&str>,
    path: &PrimaryPath,
) -> Option<String> {
    let policy = &target.config.policy;
    let with_query = |p: String, q: Option<&str>| match q {
        Some(q) if !q.is_empty() => {
            let sep = if p.contains('?') { '&' } else { '?' };
            format!("{p}{sep}{q}")
        }
        _ => p,
    };
    let tail = |marker: &str| {
        uri.path()
            .rsplit_once(marker)
            .map(|(_, t)| t.to_string())
            .unwrap_or_default()
    };
    let mapped = |name: &crate::oci::names::RepositoryName| policy.target_repository(name.as_str());
    Some(match route {
        Route::Upload { name } => {
            let (_, own) = path.session_of(uri.path())?;
            with_query(own_session(&own, &mapped(name))?, query)
        }
        Route::Catalog => with_query("/v2/_catalog".into(), query),
        Route::Tags { name } => with_query(format!("/v2/{}/tags/list", mapped(name)), query),
        Route::Manifest { name, reference } => {
            with_query(format!("/v2/{}/manifests/{reference}", mapped(name)), query)
        }
        Route::Blob { name, digest } => {
            with_query(format!("/v2/{}/blobs/{digest}", mapped(name)), query)
        }
        Route::Referrers { name } => with_query(
            format!("/v2/{}/referrers/{}", mapped(name), tail("/referrers/")),
            query,
        ),
        Route::UploadStart { name } => {
            let query = query.map(|q| {
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| {
                        let v = match k.as_ref() {
                            "from" => policy.target_repository(&v),
                            _ => v.into_owned(),
                        };
                        (k.into_owned(), v)
                    }))
                    .finish()
            });
            with_query(
                format!("/v2/{}/blobs/uploads/", mapped(name)),
                query.as_deref(),
            )
        }
        _ => return None,
    })
}

/// The body as the target gets it: a manifest in hand (so it can be sent again after the
/// target asks for credentials), anything else streamed.
async fn request_body(
    method: &Method,
    route: &Route,
    incoming: Incoming,
) -> Result<RequestBody, OciError> {
    match (method, route) {
        (&Method::GET | &Method::HEAD | &Method::DELETE, _) => Ok(RequestBody::Empty),
        (_, Route::Manifest { .. }) => body::read_limited(incoming, MAX_MANIFEST_BYTES)
            .await
            .map(RequestBody::Bytes)
            .map_err(|_| {
                OciError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::ManifestInvalid,
                    format!("a manifest is at most {MAX_MANIFEST_BYTES} bytes"),
                )
            }),
        _ => Ok(RequestBody::Stream(body::boxed(incoming))),
    }
}

/// A repository's two names: Harbor's (the client's) and the target's.
struct Names {
    harbor: String,
    target: String,
}

impl Names {
    fn of(target: &Target, route: &Route) -> Names {
        let harbor = route
            .repository()
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        Names {
            target: target.config.policy.target_repository(&harbor),
            harbor,
        }
    }

    fn differ(&self) -> bool {
        !self.harbor.is_empty() && self.harbor != self.target
    }

    /// A URL the target answered with, as the client must see it: on the target's origin, the
    /// path with Harbor's name on regtee's origin (an upload session renamed so its next
    /// request finds the target); elsewhere (a storage redirect) as it is.
    fn rebase(&self, url: &str, target: &Target, public: &Origin) -> Option<String> {
        let base = target.config.endpoint.origin.join("/").ok()?;
        let resolved = crate::registry::resolve(&base, url)?;
        if crate::origin::Origin::of(&resolved).as_ref() != Some(&target.config.endpoint.origin) {
            return Some(url.to_string());
        }
        let path_and_query = resolved.path_and_query()?.as_str();
        let uploads = format!("/v2/{}/blobs/uploads/", self.target);
        if let Some(session) = path_and_query.strip_prefix(&uploads)
            && !session.is_empty()
        {
            let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(path_and_query);
            return Some(format!(
                "{public}/v2/{}/blobs/uploads/{SESSION_PREFIX}{}.{encoded}",
                self.harbor,
                target.name()
            ));
        }
        let own = format!("/v2/{}/", self.target);
        let path = match path_and_query.strip_prefix(&own) {
            Some(rest) if !self.harbor.is_empty() => format!("/v2/{}/{rest}", self.harbor),
            _ => path_and_query.to_string(),
        };
        Some(format!("{public}{path}"))
    }

    /// `Link: <url>; rel="next"` with its URL rebased.
    fn rebase_link(&self, link: &str, target: &Target, public: &Origin) -> Option<String> {
        let (url, rest) = link.trim().strip_prefix('<')?.split_once('>')?;
        Some(format!("<{}>{rest}", self.rebase(url, target, public)?))
    }

    /// A tag list naming Harbor's repository.
    fn tag_list(&self, bytes: &[u8]) -> Bytes {
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(mut list) if list.is_object() => {
                list["name"] = serde_json::Value::String(self.harbor.clone());
                Bytes::from(list.to_string())
            }
            _ => self.in_text(bytes),
        }
    }

    /// A text (an error's message) with the target's name replaced by Harbor's.
    fn in_text(&self, bytes: &[u8]) -> Bytes {
        match std::str::from_utf8(bytes) {
            Ok(text) if self.differ() => Bytes::from(text.replace(&self.target, &self.harbor)),
            _ => Bytes::copy_from_slice(bytes),
        }
    }
}

/// A catalog listing Harbor's names: the target's repositories that stand for one.
fn catalog_names(bytes: &[u8], target: &Target) -> Bytes {
    let Ok(mut catalog) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Bytes::copy_from_slice(bytes);
    };
    let names: Vec<serde_json::Value> = catalog["repositories"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str())
                .filter_map(|n| target.config.policy.harbor_repository(n))
                .map(serde_json::Value::String)
                .collect()
        })
        .unwrap_or_default();
    catalog["repositories"] = serde_json::Value::Array(names);
    Bytes::from(catalog.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(own: &str) -> String {
        format!(
            "/v2/library/app/blobs/uploads/{SESSION_PREFIX}tcr.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(own)
        )
    }

    #[test]
    fn a_session_id_stands_only_for_an_upload_of_the_route_s_repository() {
        let own = "/v2/mirror-lib/app/blobs/uploads/5f0c-aa?_state=x";
        let (target, decoded) = decode_session(&named(own)).unwrap();
        assert_eq!((target.as_str(), decoded.as_str()), ("tcr", own));
        assert_eq!(own_session(own, "mirror-lib/app").as_deref(), Some(own));
        for crafted in [
            "/v2/secret/app/blobs/uploads/5f0c",
            "/v2/mirror-lib/app/blobs/uploads/",
            "/v2/mirror-lib/app/blobs/uploads/../../other/blobs/uploads/x",
            "/v2/mirror-lib/app/manifests/latest",
        ] {
            let (_, decoded) = decode_session(&named(crafted)).unwrap();
            assert_eq!(own_session(&decoded, "mirror-lib/app"), None, "{crafted}");
        }
        assert!(decode_session("/v2/library/app/blobs/uploads/5f0c-aa").is_none());
        assert!(decode_session("/v2/library/app/blobs/uploads/regtee.tcr.!!").is_none());
    }
}
