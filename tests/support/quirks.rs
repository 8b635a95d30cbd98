//! Cloud registries' documented behaviours, reproduced one at a time by the fault front in
//! front of a real distribution registry. Each says where the behaviour is documented. The
//! registry behind stays real: what it stores is what tests check by digest.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use regtee::body::ProxyBody;
use sha2::{Digest as _, Sha256};

use super::fault::{State, answer};

/// One documented behaviour.
#[derive(Clone, Debug)]
pub enum Quirk {
    /// AWS ECR answers the PATCH that completes a blob with `201` and then rejects the closing
    /// PUT. regclient's chunked upload (regclient `blob.go`): "distribution-spec is 202, AWS
    /// ECR returns a 201 and rejects the put". The front knows a blob is complete when the
    /// bytes forwarded in a session hash to one of `digests` (what the test pushed); it then
    /// completes the upload on the registry itself and answers `201`.
    EarlyAcceptOnPatch { digests: Vec<String> },
    /// A registry that does not mount answers the mount POST with `202` and an upload session
    /// (OCI distribution spec, "Mounting a blob from another repository": "If the registry
    /// does not support cross-repository mounting or is unable to mount the requested blob,
    /// it SHOULD return a 202. This indicates that the upload session has begun").
    MountOpensSession,
    /// AWS ECR repositories must be created before the first push; a write elsewhere is
    /// refused with `404 NAME_UNKNOWN` "The repository with name '...' does not exist in the
    /// registry with id '...'" (what `docker push` prints as "name unknown: ..."; the ECR user
    /// guide's "Pushing a Docker image" creates the repository first). TCR and SWR namespaces
    /// behave alike. Repositories made with `FaultFront::create_repository` exist.
    RepositoriesMustExist,
    /// Namespaces (TCR, SWR, Harbor projects) must be created before the first push into
    /// them; a write under one that does not exist is refused the way `refusal` says. Names
    /// made with `FaultFront::create_repository` (or through a cloud API front sharing
    /// `FaultFront::existing`) exist.
    NamespacesMustExist(NamespaceRefusal),
    /// Immutable tags: a manifest PUT that would move an existing tag is refused.
    ImmutableTags(Immutability),
    /// A registry that does not take an artifact type: a manifest whose config media type or
    /// `artifactType` is this one is refused with `400 MANIFEST_INVALID` (GitLab container
    /// registry, "Supported media types": "Any manifest or any of its references with a
    /// media type outside this list will lead to a 400 Bad Request response"; Quay takes only
    /// the types in `ADDITIONAL_OCI_ARTIFACT_TYPES` beyond its defaults).
    RefusesArtifactType(String),
    /// A registry that kept only part of a chunk (something in front of it cut the request)
    /// and answers `416` with the `Range` it holds and the session's `Location`, the answer the
    /// OCI distribution spec gives for a chunk out of order ("416 Requested Range Not
    /// Satisfiable", `Range: 0-<last valid range>`; the client resumes from there). The second
    /// PATCH of every session loses its second half.
    TakesPartOfAChunk,
    /// Tokens that expire after a few seconds (ECR's and ACR's logins are short-lived tokens):
    /// a bearer token whose `exp` has passed gets the registry's `401` and challenge, as
    /// distribution answers without its clock leeway.
    TokensExpire,
}

/// How a registry refuses a write into a namespace that does not exist.
#[derive(Clone, Copy, Debug)]
pub enum NamespaceRefusal {
    /// Harbor 2.x, and TCR Enterprise (Harbor): the project's absence is not told apart from
    /// a missing permission, `401 UNAUTHORIZED` "unauthorized to access repository: <repo>,
    /// action: push" (goharbor/harbor#13553, #20544: "You need to create a namespace
    /// (project) before pushing").
    Harbor,
    /// A registry that answers the distribution spec's `403 DENIED` ("requested access to
    /// the resource is denied"), as SWR's does for an organization the account cannot push
    /// to; its documentation does not print the exact body.
    Denied,
}

/// How a registry refuses to move an immutable tag.
#[derive(Clone, Copy, Debug)]
pub enum Immutability {
    /// Harbor's tag immutability rules (and TCR, which is Harbor): `412` with "Failed to
    /// process request due to 'repo:tag' configured as immutable." (Harbor
    /// `src/pkg/immutable/errors.go`; Harbor docs, "Create Tag Immutability Rules").
    Harbor,
    /// ECR with `imageTagMutability = IMMUTABLE`: `400 TAG_INVALID` "The image tag '...'
    /// already exists in the '...' repository and cannot be overwritten because the
    /// repository is immutable." (ECR user guide, "Image tag mutability").
    Ecr,
}

/// What the quirks remember and count.
#[derive(Default)]
pub struct QuirkState {
    /// Running hashes of upload sessions, by session id.
    hashes: Mutex<HashMap<String, Sha256>>,
    /// Paths of sessions the front completed on a PATCH, and of the blobs' Locations.
    completed: Mutex<BTreeSet<String>>,
    /// Upload locations opened instead of a mount.
    pub mount_sessions: Mutex<Vec<String>>,
    /// Repositories (or namespaces) that exist, for `RepositoriesMustExist` and
    /// `NamespacesMustExist`; shared with a cloud API front that creates them.
    pub repositories: std::sync::Arc<Mutex<BTreeSet<String>>>,
    /// PATCHes answered `201`.
    pub early_accepts: AtomicU64,
    /// Closing PUTs refused after an early accept.
    pub refused_puts: AtomicU64,
    /// Sessions whose chunk was cut.
    cut: Mutex<BTreeSet<String>>,
    /// Chunks answered 416.
    pub partial_chunks: AtomicU64,
    /// Requests refused for an expired token.
    pub expired_tokens: AtomicU64,
}

/// The session id in `/v2/<name>/blobs/uploads/<id>`.
fn session_id(path: &str) -> Option<&str> {
    let (_, id) = path.split_once("/blobs/uploads/")?;
    (!id.is_empty()).then_some(id)
}

/// The repository in `/v2/<name>/blobs/...` or `/v2/<name>/manifests/...`.
fn repository(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let end = rest.find("/blobs/").or_else(|| rest.find("/manifests/"))?;
    Some(&rest[..end])
}

/// The reference in `/v2/<name>/manifests/<reference>`.
fn manifest_reference(path: &str) -> Option<&str> {
    path.rsplit_once("/manifests/").map(|(_, r)| r)
}

fn errors(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    answer(
        status,
        serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string(),
    )
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The `exp` claim of a bearer JWT, read without verifying (the registry verifies).
fn token_expiry(req: &Request<Incoming>) -> Option<u64> {
    use base64::Engine;
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?;
    let claims = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&json).ok()?["exp"].as_u64()
}

impl State {
    /// Serves `req` as a registry with `quirk` would.
    pub(super) async fn quirk(&self, quirk: &Quirk, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let writes = matches!(
            method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        match quirk {
            Quirk::EarlyAcceptOnPatch { digests } => match (&method, session_id(&path)) {
                (&Method::PATCH, Some(id)) => {
                    let id = id.to_string();
                    return self.patch_and_maybe_complete(req, &id, digests).await;
                }
                // The closing PUT, to the session or to the blob's Location from the 201.
                (&Method::PUT, _) if self.quirks.completed.lock().unwrap().contains(&path) => {
                    self.quirks.refused_puts.fetch_add(1, Ordering::Relaxed);
                    return errors(
                        StatusCode::NOT_FOUND,
                        "BLOB_UPLOAD_UNKNOWN",
                        "blob upload unknown to registry",
                    );
                }
                _ => {}
            },
            Quirk::MountOpensSession
                if method == Method::POST
                    && req.uri().query().is_some_and(|q| q.contains("mount=")) =>
            {
                return self.open_session_instead_of_mount(req).await;
            }
            Quirk::RepositoriesMustExist if writes => {
                if let Some(repo) = repository(&path)
                    && !self.quirks.repositories.lock().unwrap().contains(repo)
                {
                    return errors(
                        StatusCode::NOT_FOUND,
                        "NAME_UNKNOWN",
                        &format!(
                            "The repository with name '{repo}' does not exist in the registry with id '123456789012'"
                        ),
                    );
                }
            }
            Quirk::NamespacesMustExist(refusal) if writes => {
                if let Some(repo) = repository(&path)
                    && let Some((namespace, _)) = repo.split_once('/')
                    && !self.quirks.repositories.lock().unwrap().contains(namespace)
                {
                    return match refusal {
                        NamespaceRefusal::Harbor => {
                            let message = format!(
                                "unauthorized to access repository: {repo}, action: push: unauthorized to access repository: {repo}, action: push"
                            );
                            errors(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", &message)
                        }
                        NamespaceRefusal::Denied => errors(
                            StatusCode::FORBIDDEN,
                            "DENIED",
                            "requested access to the resource is denied",
                        ),
                    };
                }
            }
            Quirk::ImmutableTags(style) if method == Method::PUT => {
                if let Some(reference) = manifest_reference(&path)
                    && !reference.contains(':')
                {
                    let reference = reference.to_string();
                    return self.put_unless_tag_moves(req, &reference, *style).await;
                }
            }
            Quirk::RefusesArtifactType(refused)
                if method == Method::PUT && manifest_reference(&path).is_some() =>
            {
                return self.put_unless_type(req, refused).await;
            }
            Quirk::TakesPartOfAChunk if method == Method::PATCH => {
                let starts_later = req
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|r| r.split('-').next()?.parse::<u64>().ok())
                    .is_some_and(|start| start > 0);
                if let Some(id) = session_id(&path)
                    && starts_later
                    && self.quirks.cut.lock().unwrap().insert(id.to_string())
                {
                    return self.keep_half_of_the_chunk(req).await;
                }
            }
            Quirk::TokensExpire => {
                if let Some(exp) = token_expiry(&req)
                    && exp <= super::issuer::unix_now()
                {
                    self.quirks.expired_tokens.fetch_add(1, Ordering::Relaxed);
                    // Without credentials the registry answers its own 401 and challenge.
                    let (mut parts, _) = req.into_parts();
                    parts.headers.remove(header::AUTHORIZATION);
                    parts.method = Method::GET;
                    parts.uri = "/v2/".parse().unwrap();
                    return self
                        .pass(Request::from_parts(parts, regtee::body::empty()))
                        .await;
                }
            }
            _ => {}
        }
        self.pass(req).await
    }

    async fn pass<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<regtee::body::BoxError>,
    {
        match self.forward(req).await {
            Ok(r) => r.map(regtee::body::boxed),
            Err(e) => answer(StatusCode::BAD_GATEWAY, format!("fault front: {e}")),
        }
    }

    /// Forwards a PATCH while hashing what it carries; when the session now holds a whole
    /// blob the test pushed, completes it and answers `201` as ECR does.
    async fn patch_and_maybe_complete(
        &self,
        req: Request<Incoming>,
        id: &str,
        digests: &[String],
    ) -> Response<ProxyBody> {
        let authorization = req.headers().get(header::AUTHORIZATION).cloned();
        let (parts, body) = req.into_parts();
        let mut bytes = Vec::new();
        let mut body = body;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        let so_far = {
            let mut hashes = self.quirks.hashes.lock().unwrap();
            let hash = hashes.entry(id.to_string()).or_default();
            hash.update(&bytes);
            format!("sha256:{}", hex::encode(hash.clone().finalize()))
        };
        let response = match self
            .forward(Request::from_parts(
                parts,
                http_body_util::Full::new(Bytes::from(bytes)),
            ))
            .await
        {
            Ok(r) => r,
            Err(e) => return answer(StatusCode::BAD_GATEWAY, format!("fault front: {e}")),
        };
        if response.status() != StatusCode::ACCEPTED || !digests.contains(&so_far) {
            return response.map(regtee::body::boxed);
        }
        let Some(location) = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.parse::<http::Uri>().ok())
        else {
            return answer(StatusCode::BAD_GATEWAY, "no Location on PATCH".into());
        };
        let path = location.path().to_string();
        let query = location
            .query()
            .map(|q| format!("{q}&"))
            .unwrap_or_default();
        let mut close = Request::put(format!("{path}?{query}digest={so_far}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        if let Some(a) = authorization {
            close.headers_mut().insert(header::AUTHORIZATION, a);
        }
        match self.forward(close).await {
            Ok(r) if r.status() == StatusCode::CREATED => {}
            Ok(r) => {
                return answer(
                    StatusCode::BAD_GATEWAY,
                    format!("front could not complete the upload: {}", r.status()),
                );
            }
            Err(e) => return answer(StatusCode::BAD_GATEWAY, format!("fault front: {e}")),
        }
        let repo = repository(&path).unwrap_or("");
        let blob = format!("/v2/{repo}/blobs/{so_far}");
        self.quirks
            .completed
            .lock()
            .unwrap()
            .extend([path.clone(), blob]);
        self.quirks.early_accepts.fetch_add(1, Ordering::Relaxed);
        let mut done = answer(StatusCode::CREATED, String::new());
        let headers = done.headers_mut();
        headers.insert(
            header::LOCATION,
            format!("/v2/{repo}/blobs/{so_far}").parse().unwrap(),
        );
        headers.insert("docker-content-digest", so_far.parse().unwrap());
        done
    }

    /// Forwards the first half of a chunk as if it were all, and answers `416` with what the
    /// registry then holds.
    async fn keep_half_of_the_chunk(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let Ok(collected) = body.collect().await else {
            return answer(StatusCode::BAD_REQUEST, "broken body".into());
        };
        let mut bytes = collected.to_bytes();
        let start: u64 = parts
            .headers
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.split('-').next()?.parse().ok())
            .unwrap_or(0);
        bytes.truncate(bytes.len() / 2);
        let end = start + bytes.len() as u64 - 1;
        parts.headers.insert(
            header::CONTENT_RANGE,
            format!("{start}-{end}").parse().unwrap(),
        );
        parts
            .headers
            .insert(header::CONTENT_LENGTH, bytes.len().into());
        let kept = match self
            .forward(Request::from_parts(parts, http_body_util::Full::new(bytes)))
            .await
        {
            Ok(r) if r.status() == StatusCode::ACCEPTED => r,
            Ok(r) => return r.map(regtee::body::boxed),
            Err(e) => return answer(StatusCode::BAD_GATEWAY, format!("fault front: {e}")),
        };
        self.quirks.partial_chunks.fetch_add(1, Ordering::Relaxed);
        let mut refused = answer(StatusCode::RANGE_NOT_SATISFIABLE, String::new());
        for name in [header::LOCATION, header::RANGE] {
            if let Some(v) = kept.headers().get(&name) {
                refused.headers_mut().insert(name, v.clone());
            }
        }
        refused
    }

    /// Opens a plain upload session where a mount was asked for, and remembers it.
    async fn open_session_instead_of_mount(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        parts.uri = parts.uri.path().parse().unwrap();
        let response = match self.forward(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => return answer(StatusCode::BAD_GATEWAY, format!("fault front: {e}")),
        };
        if let Some(location) = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            self.quirks
                .mount_sessions
                .lock()
                .unwrap()
                .push(location.to_string());
        }
        response.map(regtee::body::boxed)
    }

    /// Stores a manifest by tag unless the tag exists with another digest.
    async fn put_unless_tag_moves(
        &self,
        req: Request<Incoming>,
        tag: &str,
        style: Immutability,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let Ok(collected) = body.collect().await else {
            return answer(StatusCode::BAD_REQUEST, "broken body".into());
        };
        let bytes = collected.to_bytes();
        let digest = sha256(&bytes);
        let mut head = Request::head(parts.uri.path())
            .header(header::ACCEPT, regtee::oci::manifest::ACCEPT_ALL)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        if let Some(a) = parts.headers.get(header::AUTHORIZATION) {
            head.headers_mut().insert(header::AUTHORIZATION, a.clone());
        }
        let existing = match self.forward(head).await {
            Ok(r) if r.status() == StatusCode::OK => r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        };
        let repo = repository(parts.uri.path()).unwrap_or("").to_string();
        if existing.is_some_and(|e| e != digest) {
            return match style {
                Immutability::Harbor => errors(
                    StatusCode::PRECONDITION_FAILED,
                    "PRECONDITION",
                    &format!(
                        "Failed to process request due to '{repo}:{tag}' configured as immutable."
                    ),
                ),
                Immutability::Ecr => errors(
                    StatusCode::BAD_REQUEST,
                    "TAG_INVALID",
                    &format!(
                        "The image tag '{tag}' already exists in the '{repo}' repository and cannot be overwritten because the repository is immutable."
                    ),
                ),
            };
        }
        self.pass(Request::from_parts(parts, http_body_util::Full::new(bytes)))
            .await
    }

    /// Stores a manifest unless its artifact type is `refused`.
    async fn put_unless_type(&self, req: Request<Incoming>, refused: &str) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let Ok(collected) = body.collect().await else {
            return answer(StatusCode::BAD_REQUEST, "broken body".into());
        };
        let bytes = collected.to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let types = [&doc["config"]["mediaType"], &doc["artifactType"]];
        if types.iter().any(|t| t.as_str() == Some(refused)) {
            return errors(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                &format!("manifest invalid: unknown media type {refused}"),
            );
        }
        self.pass(Request::from_parts(parts, http_body_util::Full::new(bytes)))
            .await
    }
}
