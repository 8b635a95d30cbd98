//! A Docker token service like Harbor's (and TCR's, which is Harbor): users with passwords,
//! projects, per-repository grants, ES256 JWTs with an `x5c` chain that distribution verifies
//! against its `rootcertbundle`. It is the auth half of a real registry, not a mock of one.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

/// What a user may do.
#[derive(Clone, Debug)]
pub struct User {
    pub password: String,
    /// May list the catalog and do anything anywhere.
    pub admin: bool,
    /// Projects (first path component) and the actions allowed there.
    pub grants: BTreeMap<String, Vec<String>>,
}

/// One token request as the issuer saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub account: Option<String>,
    pub scopes: Vec<String>,
    /// `X-Forwarded-For`: present when the request came through regtee.
    pub forwarded_for: Option<String>,
    pub status: u16,
}

struct State {
    service: String,
    issuer: String,
    users: Mutex<BTreeMap<String, User>>,
    projects: Mutex<BTreeSet<String>>,
    seen: Mutex<Vec<SeenRequest>>,
    key: EcdsaKeyPair,
    leaf_der: Vec<u8>,
    rng: SystemRandom,
    token_lifetime: AtomicU64,
    rotating: Mutex<BTreeMap<String, Rotating>>,
    /// The registry this service is Harbor's core for (`/api/v2.0` reads it).
    registry: Mutex<Option<SocketAddr>>,
    /// Artifact list requests answered.
    pub artifact_lists: AtomicU64,
    /// Artifact lists answer digests no client can read (a hostile or broken Harbor).
    garbled_digests: std::sync::atomic::AtomicBool,
    /// Artifact lists answer 500, as Harbor's core does when its database is away.
    failing_lists: std::sync::atomic::AtomicBool,
}

/// A user whose passwords are short-lived tokens, as ECR's (`aws ecr get-login-password`,
/// 12 hours) and ACR's are: `<issued at>-<sha256(seed, issued at)>`, good for `valid_for`
/// seconds. The harness's credential helper mints them with the same seed.
#[derive(Clone, Debug)]
pub struct Rotating {
    pub seed: String,
    pub valid_for: u64,
}

impl Rotating {
    /// The password minted at `issued_at` (what the helper script computes).
    pub fn password(&self, issued_at: u64) -> String {
        use sha2::Digest;
        let mac = sha2::Sha256::digest(format!("{}{issued_at}", self.seed));
        format!("{issued_at}-{}", &hex::encode(mac)[..32])
    }

    /// Whether `password` is one of ours and still good.
    fn accepts(&self, password: &str) -> bool {
        let Some(issued_at) = password.split('-').next().and_then(|t| t.parse().ok()) else {
            return false;
        };
        password == self.password(issued_at) && unix_now() < issued_at + self.valid_for
    }
}

/// A running token service.
pub struct TokenIssuer {
    pub addr: SocketAddr,
    pub root_bundle: PathBuf,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenIssuer {
    /// Starts a token service for `service`; `projects` are the namespaces that exist.
    pub async fn start(dir: &Path, service: &str, projects: &[&str]) -> TokenIssuer {
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{service} token CA"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, format!("{service} token signer"));
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf_key = KeyPair::generate().unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let root_bundle = dir.join("token-ca.pem");
        std::fs::write(&root_bundle, ca_cert.pem()).unwrap();
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &leaf_key.serialize_der(),
            &rng,
        )
        .unwrap();
        let state = Arc::new(State {
            service: service.to_string(),
            issuer: format!("{service}-issuer"),
            users: Mutex::new(BTreeMap::new()),
            projects: Mutex::new(projects.iter().map(|p| p.to_string()).collect()),
            seen: Mutex::new(Vec::new()),
            key,
            leaf_der: leaf.der().to_vec(),
            rng,
            token_lifetime: AtomicU64::new(300),
            rotating: Mutex::new(BTreeMap::new()),
            registry: Mutex::new(None),
            artifact_lists: AtomicU64::new(0),
            garbled_digests: Default::default(),
            failing_lists: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = serving.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            let answer = if req.uri().path().starts_with("/api/v2.0/") {
                                state.harbor_api(req).await
                            } else {
                                state.answer(req)
                            };
                            Ok::<_, Infallible>(answer)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TokenIssuer {
            addr,
            root_bundle,
            state,
            task,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://{}/service/token", self.addr)
    }

    pub fn service(&self) -> &str {
        &self.state.service
    }

    pub fn issuer_name(&self) -> &str {
        &self.state.issuer
    }

    pub fn add_user(&self, name: &str, user: User) {
        self.state
            .users
            .lock()
            .unwrap()
            .insert(name.to_string(), user);
    }

    /// Adds an admin whose passwords rotate (see [`Rotating`]).
    pub fn add_rotating_user(&self, name: &str, rotating: Rotating) {
        self.state
            .rotating
            .lock()
            .unwrap()
            .insert(name.to_string(), rotating);
    }

    /// Tokens issued from now on live this long (`expires_in` says so too).
    pub fn set_token_lifetime(&self, seconds: u64) {
        self.state.token_lifetime.store(seconds, Ordering::Relaxed);
    }

    pub fn add_project(&self, project: &str) {
        self.state
            .projects
            .lock()
            .unwrap()
            .insert(project.to_string());
    }

    /// Serves Harbor's artifact list (`/api/v2.0/projects/.../artifacts`) from `registry`, as
    /// Harbor's core does behind the same nginx location.
    pub fn serve_harbor_api_for(&self, registry: SocketAddr) {
        *self.state.registry.lock().unwrap() = Some(registry);
    }

    /// Artifact lists answered so far.
    /// From now on, artifact lists give each digest garbled.
    pub fn garble_artifact_digests(&self) {
        self.state.garbled_digests.store(true, Ordering::Relaxed);
    }

    /// From now on, artifact lists fail with a 500, and the registry API still works.
    pub fn fail_artifact_lists(&self) {
        self.state.failing_lists.store(true, Ordering::Relaxed);
    }

    pub fn artifact_lists(&self) -> u64 {
        self.state.artifact_lists.load(Ordering::Relaxed)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The distribution `auth.token` settings for a registry trusting this issuer.
    pub fn registry_auth(&self) -> regtee::local_registry::TokenAuth {
        regtee::local_registry::TokenAuth {
            realm: self.realm(),
            service: self.state.service.clone(),
            issuer: self.state.issuer.clone(),
            root_cert_bundle: self.root_bundle.clone(),
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Basic credentials of a request, as (user, password).
fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        })
}

fn json_answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    r
}

impl State {
    /// Harbor API v2.0 `GET /projects/{project_name}/repositories/{repository_name}/artifacts`
    /// (`with_tag`, `page`, `page_size`; the repository's name within the project arrives
    /// URL-encoded once more after nginx decoded it): each artifact with its digest and tags,
    /// read from the registry with a token of the caller's own rights (Harbor's API reference).
    async fn harbor_api(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let not_found = || {
            json_answer(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"NOT_FOUND","message":"not found"}]}"#.into(),
            )
        };
        let Some(registry) = *self.registry.lock().unwrap() else {
            return not_found();
        };
        let path = req.uri().path().to_string();
        let Some((project, name)) = path
            .strip_prefix("/api/v2.0/projects/")
            .and_then(|rest| rest.strip_suffix("/artifacts"))
            .and_then(|rest| rest.split_once("/repositories/"))
        else {
            return not_found();
        };
        let name = name.replace("%2F", "/").replace("%2f", "/");
        let repository = format!("{project}/{name}");
        let query: BTreeMap<String, String> =
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let page: usize = query
            .get("page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1)
            .max(1);
        let size: usize = query
            .get("page_size")
            .and_then(|p| p.parse().ok())
            .unwrap_or(10)
            .clamp(1, 100);
        let credentials = basic_credentials(&req);
        let (status, body) = self.decide(
            "/service/token",
            credentials.as_ref(),
            &[format!("repository:{repository}:pull")],
        );
        if status != StatusCode::OK {
            return json_answer(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"unauthorized"}]}"#.into(),
            );
        }
        let token = serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        if !self.token_grants_pull(&token) {
            return json_answer(
                StatusCode::FORBIDDEN,
                r#"{"errors":[{"code":"FORBIDDEN","message":"forbidden"}]}"#.into(),
            );
        }
        self.artifact_lists.fetch_add(1, Ordering::Relaxed);
        if self.failing_lists.load(Ordering::Relaxed) {
            return json_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"errors":[{"code":"UNKNOWN","message":"internal server error"}]}"#.into(),
            );
        }
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        let get = |method: http::Method, uri: String, accept: bool| {
            let mut r = Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {token}"));
            if accept {
                r = r.header(
                    "accept",
                    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
                );
            }
            r.body(http_body_util::Empty::<Bytes>::new()).unwrap()
        };
        use http_body_util::BodyExt as _;
        let listed = client
            .request(get(
                http::Method::GET,
                format!("http://{registry}/v2/{repository}/tags/list"),
                false,
            ))
            .await
            .unwrap();
        if listed.status() == StatusCode::NOT_FOUND {
            return not_found();
        }
        let listed = listed.into_body().collect().await.unwrap().to_bytes();
        let tags: Vec<String> =
            serde_json::from_slice::<serde_json::Value>(&listed).unwrap()["tags"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|t| t.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
        let mut artifacts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for tag in tags {
            let head = client
                .request(get(
                    http::Method::HEAD,
                    format!("http://{registry}/v2/{repository}/manifests/{tag}"),
                    true,
                ))
                .await
                .unwrap();
            if let Some(digest) = head
                .headers()
                .get("docker-content-digest")
                .and_then(|d| d.to_str().ok())
            {
                artifacts.entry(digest.to_string()).or_default().push(tag);
            }
        }
        let page: Vec<serde_json::Value> = artifacts
            .into_iter()
            .skip((page - 1) * size)
            .take(size)
            .map(|(digest, tags)| {
                let digest = if self.garbled_digests.load(Ordering::Relaxed) {
                    digest.replace("sha256:", "sha256:../")
                } else {
                    digest
                };
                serde_json::json!({
                    "digest": digest,
                    "tags": tags.iter().map(|t| serde_json::json!({"name": t})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json_answer(StatusCode::OK, serde_json::Value::Array(page).to_string())
    }

    /// Whether a token this service signed grants `pull` (its `access` claim).
    fn token_grants_pull(&self, token: &str) -> bool {
        token
            .split('.')
            .nth(1)
            .and_then(|c| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
            })
            .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
            .is_some_and(|claims| claims["access"].to_string().contains("\"pull\""))
    }

    fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let query: Vec<(String, String)> =
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let scopes: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_string))
            .collect();
        let forwarded_for = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let credentials = basic_credentials(&req);
        let (status, body) = self.decide(req.uri().path(), credentials.as_ref(), &scopes);
        self.seen.lock().unwrap().push(SeenRequest {
            account: credentials.map(|(u, _)| u),
            scopes,
            forwarded_for,
            status: status.as_u16(),
        });
        json_answer(status, body)
    }

    fn decide(
        &self,
        path: &str,
        credentials: Option<&(String, String)>,
        scopes: &[String],
    ) -> (StatusCode, String) {
        if path != "/service/token" {
            return (
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"NOT_FOUND"}]}"#.into(),
            );
        }
        let rotating = credentials.and_then(|(name, password)| {
            let r = self.rotating.lock().unwrap().get(name).cloned()?;
            r.accepts(password).then(|| {
                let admin = User {
                    password: String::new(),
                    admin: true,
                    grants: BTreeMap::new(),
                };
                (name.clone(), admin)
            })
        });
        let user = match credentials {
            None => None,
            Some(_) if rotating.is_some() => rotating,
            Some((name, password)) => match self.users.lock().unwrap().get(name) {
                Some(u) if &u.password == password => Some((name.clone(), u.clone())),
                _ => {
                    return (
                        StatusCode::UNAUTHORIZED,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.into(),
                    );
                }
            },
        };
        let projects = self.projects.lock().unwrap().clone();
        let mut access = Vec::new();
        for scope in scopes {
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let requested: Vec<&str> = actions.split(',').collect();
            let granted: Vec<String> = match (&user, kind) {
                (Some((_, u)), "registry") if u.admin => {
                    requested.iter().map(|a| a.to_string()).collect()
                }
                (Some((_, u)), "repository") => {
                    let project = name.split('/').next().unwrap_or("");
                    if !projects.contains(project) {
                        Vec::new()
                    } else if u.admin {
                        requested.iter().map(|a| a.to_string()).collect()
                    } else {
                        let allowed = u.grants.get(project).cloned().unwrap_or_default();
                        requested
                            .iter()
                            .filter(|a| allowed.iter().any(|x| x == *a || x == "*"))
                            .map(|a| a.to_string())
                            .collect()
                    }
                }
                _ => Vec::new(),
            };
            if !granted.is_empty() {
                access.push(serde_json::json!({"type": kind, "name": name, "actions": granted}));
            }
        }
        let now = unix_now();
        let lifetime = self.token_lifetime.load(Ordering::Relaxed);
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.leaf_der)],
        });
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": user.as_ref().map(|(n, _)| n.as_str()).unwrap_or(""),
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 5,
            "iat": now,
            "jti": format!("{}", rand::random::<u64>()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signature = self.key.sign(&self.rng, signing_input.as_bytes()).unwrap();
        let token = format!("{signing_input}.{}", b64url(signature.as_ref()));
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": lifetime,
        });
        (StatusCode::OK, body.to_string())
    }
}
