//! The test harness: real registries, a real token service, regtee in-process or as a
//! process, skopeo as the client, and helpers that wait for conditions instead of sleeping.

#![allow(dead_code)]

pub mod browser;
pub mod cloud_api;
pub mod disk;
pub mod docker;
pub mod fault;
pub mod harbor;
pub mod issuer;
pub mod layout;
pub mod nginx;
pub mod quirks;
pub mod recorder;
pub mod serve;
mod spec;

pub use spec::*;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

use regtee::config::{ClientTls, Credentials, Endpoint, Login, Secret};
use regtee::local_registry::{LocalRegistry, RegistryOptions};
use regtee::origin::Origin;
use regtee::registry::RegistryClient;

use harbor::{HarborFront, HarborScheme};
use issuer::{TokenIssuer, User};

static TRACING: Once = Once::new();

/// Routes regtee's logs to the test output (shown for failing tests).
pub fn init_tracing() {
    TRACING.call_once(|| {
        regtee::tls::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "regtee=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A registry with token auth: Harbor-like (service `harbor-registry`) or cloud-like; with
/// Harbor's own nginx in front when `front` is set.
pub struct AuthRegistry {
    pub registry: LocalRegistry,
    pub issuer: TokenIssuer,
    pub front: Option<HarborFront>,
}

impl AuthRegistry {
    /// What clients type: Harbor's external URL, or the registry itself without a front.
    pub fn url(&self) -> String {
        match &self.front {
            Some(f) => f.external_url(),
            None => self.registry.url(),
        }
    }

    /// `host:port` for skopeo and docker references.
    pub fn host(&self) -> String {
        match &self.front {
            Some(f) => f.host(),
            None => self.registry.addr().to_string(),
        }
    }

    /// The CA that signed the front's certificate, for regtee's `ca_file`.
    pub fn ca_file(&self) -> Option<&Path> {
        self.front.as_ref().and_then(|f| f.ca_cert.as_deref())
    }

    /// Harbor cannot be reached any more (its front is stopped).
    pub fn stop(&mut self) {
        match &mut self.front {
            Some(f) => f.stop(),
            None => self.registry.stop(),
        }
    }

    /// A token straight from the token service, for raw requests.
    pub async fn token(&self, user: &str, password: &str, scopes: &[&str]) -> String {
        use base64::Engine;
        let mut url = format!("{}?service={}", self.issuer.realm(), self.issuer.service());
        for scope in scopes {
            url.push_str(&format!("&scope={scope}"));
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let (status, body) = http_request(
            &url,
            "GET",
            None,
            &[("authorization", &format!("Basic {basic}"))],
        )
        .await;
        assert_eq!(status, 200, "token for {user}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The token service's answer to a login, as a status code.
    pub async fn token_status(&self, user: &str, password: &str) -> u16 {
        use base64::Engine;
        let url = format!("{}?service={}", self.issuer.realm(), self.issuer.service());
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        http_request(
            &url,
            "GET",
            None,
            &[("authorization", &format!("Basic {basic}"))],
        )
        .await
        .0
    }

    /// An HTTP(S) client for raw requests, trusting this registry's CA.
    pub fn raw_client(&self) -> regtee::http_client::HttpClient {
        raw_http_client(self.ca_file(), false)
    }

    /// A client with the given credentials, talking to the registry directly.
    pub fn client(&self, user: &str, password: &str) -> RegistryClient {
        client_for(&self.url(), Some((user, password)))
    }
}

pub fn client_for(url: &str, creds: Option<(&str, &str)>) -> RegistryClient {
    RegistryClient::new(&Endpoint {
        name: "test-client".into(),
        side: regtee::config::Side::Target,
        origin: Origin::parse(url).unwrap(),
        tls: ClientTls {
            ca_file: None,
            insecure_skip_verify: true,
        },
        login: match creds {
            Some((u, p)) => Login::Static(Credentials {
                username: u.into(),
                password: Secret::new(p),
            }),
            None => Login::Anonymous,
        },
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
        pool_idle_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(120),
        limits: Default::default(),
    })
    .unwrap()
}

/// Harbor as deployed: HTTPS by its own nginx, token auth like Harbor's; `dev` pushes to
/// library and team, the robot reads all.
pub async fn start_harbor(dir: &Path) -> AuthRegistry {
    start_harbor_with(dir, RegistryOptions::default(), Some(HarborScheme::Https)).await
}

/// The registry and Harbor's token service without Harbor's nginx: for the spec-level
/// differential tests, which compare regtee with the registry itself.
pub async fn start_bare_harbor(dir: &Path) -> AuthRegistry {
    start_harbor_with(dir, RegistryOptions::default(), None).await
}

pub async fn start_harbor_with(
    dir: &Path,
    options: RegistryOptions,
    front: Option<HarborScheme>,
) -> AuthRegistry {
    let front = front.map(|scheme| HarborFront::plan(&dir.join("nginx"), scheme));
    start_harbor_behind(dir, options, front).await
}

/// Harbor (registry and token service) behind `front`, planned but not started yet.
pub async fn start_harbor_behind(
    dir: &Path,
    mut options: RegistryOptions,
    mut front: Option<HarborFront>,
) -> AuthRegistry {
    let issuer = TokenIssuer::start(
        &dir.join("issuer"),
        "harbor-registry",
        &["library", "team", "other"],
    )
    .await;
    let all = |actions: &[&str]| {
        ["library", "team", "other"]
            .iter()
            .map(|p| {
                (
                    p.to_string(),
                    actions.iter().map(|a| a.to_string()).collect(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    issuer.add_user(
        DEV_USER,
        User {
            password: DEV_PASSWORD.into(),
            admin: false,
            grants: all(&["pull", "push", "delete"]),
        },
    );
    issuer.add_user(
        ROBOT_USER,
        User {
            password: ROBOT_PASSWORD.into(),
            admin: true,
            grants: BTreeMap::new(),
        },
    );
    issuer.add_user(
        ADMIN_USER,
        User {
            password: ADMIN_PASSWORD.into(),
            admin: true,
            grants: BTreeMap::new(),
        },
    );
    let mut auth = issuer.registry_auth();
    if let Some(f) = &front {
        // Harbor's realm is its external URL (`ext_endpoint`), served by its nginx.
        auth.realm = format!("{}/service/token", f.external_url());
    }
    options.token_auth = Some(auth);
    let registry = LocalRegistry::start(&dir.join("registry"), options)
        .await
        .unwrap();
    if let Some(f) = &mut front {
        f.start(registry.addr(), issuer.addr).await;
        // Behind Harbor's nginx, `/api/` reaches the issuer in core's place.
        issuer.serve_harbor_api_for(registry.addr());
    }
    AuthRegistry {
        registry,
        issuer,
        front,
    }
}

/// A cloud registry (TCR-like): its own token service and credentials; `namespaces` exist.
pub async fn start_cloud(dir: &Path, namespaces: &[&str]) -> AuthRegistry {
    let issuer = TokenIssuer::start(&dir.join("issuer"), "tcr", namespaces).await;
    issuer.add_user(
        CLOUD_USER,
        User {
            password: CLOUD_PASSWORD.into(),
            admin: true,
            grants: BTreeMap::new(),
        },
    );
    let registry = LocalRegistry::start(
        &dir.join("registry"),
        RegistryOptions {
            token_auth: Some(issuer.registry_auth()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    AuthRegistry {
        registry,
        issuer,
        front: None,
    }
}

/// regtee running in this process.
pub struct Regtee {
    instance: Option<regtee::Instance>,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

impl Regtee {
    pub async fn start(spec: &ConfigSpec) -> Regtee {
        init_tracing();
        let instance = regtee::Instance::start(spec.parse()).await.unwrap();
        Regtee {
            http: instance.http_addr.unwrap(),
            https: instance.https_addr,
            admin: instance.admin_addr,
            instance: Some(instance),
        }
    }

    pub fn host(&self) -> String {
        self.http.to_string()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.unwrap())
    }

    pub async fn stop(mut self) {
        if let Some(i) = self.instance.take() {
            i.shutdown().await;
        }
    }
}

impl TargetSpec {
    pub fn cloud(name: &str, cloud: &AuthRegistry) -> TargetSpec {
        TargetSpec::at(name, &cloud.url())
    }
}

impl ConfigSpec {
    /// regtee in front of `harbor`, trusting its CA.
    pub fn new(harbor: &AuthRegistry, state_dir: &Path) -> ConfigSpec {
        let mut spec = ConfigSpec::at(&harbor.url(), state_dir);
        if let Some(ca) = harbor.ca_file() {
            spec.upstream_extra = format!("ca_file = \"{}\"\n", ca.display());
        }
        spec
    }
}

/// How skopeo should treat TLS on one side.
pub enum Tls<'a> {
    /// Plain HTTP or unverified HTTPS.
    Off,
    /// HTTPS verified with the CA in this directory (`ca.crt`).
    CertDir(&'a Path),
}

pub fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("skopeo is installed (apt-get install skopeo)")
}

pub fn skopeo_ok(args: &[&str]) -> String {
    let out = skopeo(args);
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// skopeo's TLS flags; `prefix` is `dest-`, `src-` or empty.
fn tls_args(prefix: &str, tls: &Tls<'_>) -> Vec<String> {
    match tls {
        Tls::Off => vec![format!("--{prefix}tls-verify=false")],
        Tls::CertDir(dir) => vec![format!("--{prefix}cert-dir={}", dir.display())],
    }
}

/// `skopeo copy --all --preserve-digests oci:LAYOUT:NAME docker://HOST/REPO:TAG`.
pub fn push_layout(layout: &Path, name: &str, host: &str, repo_tag: &str, tls: Tls<'_>) -> Output {
    let mut args: Vec<String> = vec![
        "copy".into(),
        "--all".into(),
        "--preserve-digests".into(),
        "--retry-times=0".into(),
    ];
    args.extend(tls_args("dest-", &tls));
    args.push(format!("--dest-creds={DEV_USER}:{DEV_PASSWORD}"));
    args.push(format!("oci:{}:{name}", layout.display()));
    args.push(format!("docker://{host}/{repo_tag}"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    skopeo(&refs)
}

pub fn push_layout_ok(layout: &Path, name: &str, host: &str, repo_tag: &str, tls: Tls<'_>) {
    let out = push_layout(layout, name, host, repo_tag, tls);
    assert!(
        out.status.success(),
        "pushing {repo_tag} to {host} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `skopeo inspect --raw`: the manifest bytes as served.
pub fn inspect_raw(host: &str, repo_ref: &str, creds: (&str, &str), tls: Tls<'_>) -> Vec<u8> {
    let mut args: Vec<String> = vec!["inspect".into(), "--raw".into()];
    args.extend(tls_args("", &tls));
    args.push(format!("--creds={}:{}", creds.0, creds.1));
    args.push(format!("docker://{host}/{repo_ref}"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = skopeo(&refs);
    assert!(
        out.status.success(),
        "skopeo inspect {repo_ref} on {host} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Copies a manifest (with all it references) from `host` into a fresh OCI layout.
pub fn pull_to_layout(host: &str, repo_tag: &str, dest: &Path, creds: (&str, &str), tls: Tls<'_>) {
    let mut args: Vec<String> = vec!["copy".into(), "--all".into(), "--preserve-digests".into()];
    args.extend(tls_args("src-", &tls));
    args.push(format!("--src-creds={}:{}", creds.0, creds.1));
    args.push(format!("docker://{host}/{repo_tag}"));
    args.push(format!("oci:{}:pulled", dest.display()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = skopeo(&refs);
    assert!(
        out.status.success(),
        "pulling {repo_tag} from {host} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `repo:reference` on `registry` has `digest`.
pub async fn wait_for_manifest(client: &RegistryClient, repo: &str, reference: &str, digest: &str) {
    wait_until(
        &format!("{repo}:{reference} = {digest}"),
        Duration::from_secs(60),
        || async {
            match client.manifest_head(repo, reference).await {
                Ok(Some(h)) if h.digest.as_str() == digest => Some(()),
                _ => None,
            }
        },
    )
    .await;
}

/// GETs JSON from the admin API.
pub async fn admin_get(regtee: &Regtee, path: &str) -> serde_json::Value {
    let (status, body) = http_request(&regtee.admin_url(path), "GET", None, &[]).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs a dry-run backfill of `project` through the admin API and returns its result, which
/// must be `finished`.
pub async fn dry_run_backfill(regtee: &Regtee, project: &str) -> serde_json::Value {
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/backfills"),
        "POST",
        Some(
            serde_json::json!({"project": project, "dry_run": true})
                .to_string()
                .into_bytes(),
        ),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    let progress = admin_get(regtee, &format!("/api/v1/backfills/{id}?wait=30")).await;
    assert_eq!(progress["state"], "finished", "{progress}");
    progress
}

/// A pooled HTTP(S) client for raw requests: trusting `ca`, or any certificate.
pub fn raw_http_client(
    ca: Option<&Path>,
    any_certificate: bool,
) -> regtee::http_client::HttpClient {
    regtee::http_client::build(
        &ClientTls {
            ca_file: ca.map(Path::to_path_buf),
            insecure_skip_verify: any_certificate,
        },
        Duration::from_secs(5),
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .unwrap()
}

/// Waits for a failed manifest job among the jobs the admin API lists for `filter` (a query
/// string such as `repository=library/app`), and returns it.
pub async fn failed_manifest_job(regtee: &Regtee, filter: &str) -> serde_json::Value {
    failed_manifest_job_at(&regtee.admin_url(""), filter).await
}

/// [`failed_manifest_job`] of the admin API at `admin` (`http://host:port`), for regtee as a
/// process.
pub async fn failed_manifest_job_at(admin: &str, filter: &str) -> serde_json::Value {
    let url = format!("{admin}/api/v1/jobs?state=failed&{filter}");
    wait_until("a failed manifest job", Duration::from_secs(30), || async {
        let (status, body) = http_request(&url, "GET", None, &[]).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "manifest")
            .cloned()
    })
    .await
}

/// A plain HTTP request; returns status and body text.
pub async fn http_request(
    url: &str,
    method: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let client = raw_http_client(None, true);
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(
            body.map(regtee::body::full)
                .unwrap_or_else(regtee::body::empty),
        )
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = regtee::body::read_limited(resp.into_body(), 64 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs the regtee binary as a CLI command.
pub fn regtee_cli(config: &Path, spec: &ConfigSpec, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regtee"))
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(spec.env())
        .output()
        .unwrap()
}

/// Asserts that a command's output (stdout and stderr) contains `needle`, showing it if not.
pub fn assert_says(out: &Output, needle: &str) {
    let all = text(out);
    assert!(all.contains(needle), "expected {needle:?} in:\n{all}");
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A registry with Basic auth (htpasswd), like registries that never issue tokens.
pub async fn start_basic_auth_registry(dir: &Path, user: &str, password: &str) -> LocalRegistry {
    std::fs::create_dir_all(dir).unwrap();
    let htpasswd = dir.join("htpasswd");
    let hash = bcrypt::hash(password, 4).unwrap();
    std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
    LocalRegistry::start(
        &dir.join("registry"),
        RegistryOptions {
            htpasswd: Some(htpasswd),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// The most common setting: Harbor, one cloud target named `tcr`, regtee in between.
pub struct World {
    pub work: tempfile::TempDir,
    pub harbor: AuthRegistry,
    pub cloud: AuthRegistry,
    pub regtee: Regtee,
}

impl World {
    /// `namespaces` exist on the cloud; `target_lines` are extra `[[targets]]` keys.
    pub async fn start(namespaces: &[&str], target_lines: &[&str]) -> World {
        let work = tempfile::tempdir().unwrap();
        let harbor = start_harbor(&work.path().join("harbor")).await;
        let cloud = start_cloud(&work.path().join("cloud"), namespaces).await;
        let target = target_lines
            .iter()
            .fold(TargetSpec::cloud("tcr", &cloud), |t, line| t.with(line));
        let spec = ConfigSpec::new(&harbor, &work.path().join("state")).target(target);
        let regtee = Regtee::start(&spec).await;
        World {
            work,
            harbor,
            cloud,
            regtee,
        }
    }

    /// A client for the cloud, with regtee's target credentials.
    pub fn target(&self) -> RegistryClient {
        self.cloud.client(CLOUD_USER, CLOUD_PASSWORD)
    }

    /// An empty OCI layout in the work directory.
    pub fn layout(&self) -> layout::Layout {
        layout::Layout::new(&self.work.path().join("layout"))
    }
}

/// Every blob a manifest references, read from the target, equals the bytes pushed.
pub async fn assert_blobs_equal(
    target: &regtee::registry::RegistryClient,
    repo: &str,
    layout: &layout::Layout,
    manifest: &layout::Written,
) {
    use http_body_util::BodyExt;
    let refs = regtee::oci::manifest::references(&manifest.bytes, None).unwrap();
    for blob in &refs.blobs {
        let digest: regtee::oci::digest::Digest = blob.digest.parse().unwrap();
        let stream = target.get_blob(repo, &digest).await.unwrap();
        let bytes = stream.body.collect().await.unwrap().to_bytes();
        let pushed = std::fs::read(layout.dir.join("blobs/sha256").join(digest.hex())).unwrap();
        assert_eq!(
            &bytes[..],
            &pushed[..],
            "{repo}@{digest} differs on the target"
        );
    }
}

/// One PostgreSQL server for the whole test binary; each test makes its own database on it.
pub fn postgres() -> &'static regtee::local_postgres::LocalPostgres {
    static SERVER: std::sync::OnceLock<regtee::local_postgres::LocalPostgres> =
        std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        regtee::local_postgres::LocalPostgres::start()
            .expect("PostgreSQL starts (apt-get install postgresql)")
    })
}
