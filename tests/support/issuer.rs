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
                        async move { Ok::<_, Infallible>(state.answer(req)) }
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

impl State {
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
        let credentials = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                s.split_once(':')
                    .map(|(u, p)| (u.to_string(), p.to_string()))
            });
        let (status, body) = self.decide(req.uri().path(), credentials.as_ref(), &scopes);
        self.seen.lock().unwrap().push(SeenRequest {
            account: credentials.map(|(u, _)| u),
            scopes,
            forwarded_for,
            status: status.as_u16(),
        });
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        r
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
