//! Shared by the benches: local registries, a streaming HTTP client, and (from the tests'
//! harness, `tests/support/spec.rs`) regtee's config and regtee as a process.

#![allow(dead_code)]

#[path = "../tests/support/serve.rs"]
mod serve;
#[path = "../tests/support/spec.rs"]
mod spec;
pub use spec::*;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use regtee::body::ProxyBody;
use regtee::http_client::HttpClient;
use regtee::local_process::LocalProcess;
use regtee::local_registry::{LocalRegistry, RegistryOptions};

/// A work directory in memory (`/dev/shm`) where the machine has it, for registry storage:
/// docker-registry syncs every blob it writes, and the disk's flushes would be the figure
/// instead of what is measured.
pub fn memory_work_dir() -> tempfile::TempDir {
    let memory = Path::new("/dev/shm");
    if memory.is_dir() {
        tempfile::tempdir_in(memory)
    } else {
        tempfile::tempdir()
    }
    .unwrap()
}

pub fn client() -> HttpClient {
    regtee::tls::install_crypto_provider();
    regtee::http_client::build(
        &Default::default(),
        Duration::from_secs(5),
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
    .unwrap()
}

/// A body that repeats `chunk` `times` times: a large blob without holding it in memory.
pub fn repeated(chunk: Bytes, times: usize) -> ProxyBody {
    let stream = futures_util::stream::iter(
        (0..times).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    regtee::body::boxed(StreamBody::new(stream))
}

/// The digest of `chunk` repeated `times` times.
pub fn repeated_digest(chunk: &[u8], times: usize) -> String {
    let mut h = regtee::oci::digest::Hasher::new(regtee::oci::digest::Algorithm::Sha256);
    for _ in 0..times {
        h.update(chunk);
    }
    h.finish().to_string()
}

pub fn random_chunk(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    Bytes::from(v)
}

/// Uploads a blob with POST + one streaming PUT; returns the elapsed time.
pub async fn upload(
    client: &HttpClient,
    base: &str,
    repo: &str,
    chunk: &Bytes,
    times: usize,
    digest: &str,
) -> Duration {
    let started = Instant::now();
    let post = http::Request::post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .body(regtee::body::empty())
        .unwrap();
    let resp = client.request(post).await.unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = http::Request::put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .header("content-length", chunk.len() * times)
        .body(repeated(chunk.clone(), times))
        .unwrap();
    let resp = client.request(put).await.unwrap();
    assert_eq!(resp.status(), 201, "upload through {base}");
    started.elapsed()
}

/// Uploads `config` as an image's config blob to `repo` and returns an OCI image manifest of it
/// and `layers` (digest, size), not yet put.
pub async fn image_manifest(
    client: &HttpClient,
    base: &str,
    repo: &str,
    config: Bytes,
    layers: &[(String, u64)],
) -> Vec<u8> {
    let config_digest = repeated_digest(&config, 1);
    upload(client, base, repo, &config, 1, &config_digest).await;
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|(d, n)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n,
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// Downloads a blob, discarding the bytes; returns the elapsed time and the byte count.
pub async fn download(
    client: &HttpClient,
    base: &str,
    repo: &str,
    digest: &str,
) -> (Duration, u64) {
    use http_body_util::BodyExt;
    let started = Instant::now();
    let get = http::Request::get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .body(regtee::body::empty())
        .unwrap();
    let resp = client.request(get).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
        }
    }
    (started.elapsed(), n)
}

pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) a process has used so far, in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is the 1st, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

/// nginx in front of `upstream` on `port`, one worker, configured as a registry proxy should be;
/// logging each request to `dir/access.log` when `access_log`.
pub fn start_nginx(dir: &Path, port: u16, upstream: &str, access_log: bool) -> (LocalProcess, u32) {
    start_nginx_with_core(dir, port, upstream, None, access_log)
}

/// As [`start_nginx`], and `/api/` to Harbor's core at `core` when there is one, as Harbor's
/// nginx routes it.
pub fn start_nginx_with_core(
    dir: &Path,
    port: u16,
    upstream: &str,
    core: Option<std::net::SocketAddr>,
    access_log: bool,
) -> (LocalProcess, u32) {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log {log};\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  upstream registry {{ server {up}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 0;\n    chunked_transfer_encoding on;\n    location / {{\n      proxy_pass http://registry;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n      proxy_request_buffering off;\n      proxy_buffering off;\n      proxy_read_timeout 900;\n    }}\n{core}  }}\n}}\n",
            core = core.map(|c| format!("    location /api/ {{\n      proxy_pass http://{c};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n")).unwrap_or_default(),
            pid = dir.join("nginx.pid").display(),
            log = if access_log { dir.join("access.log").display().to_string() } else { "off".to_string() },
            err = dir.join("error.log").display(),
            tmp = dir.join("tmp").display(),
            up = upstream.trim_start_matches("http://"),
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new("nginx");
    command
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = LocalProcess::spawn(command).expect("nginx is installed (nginx-light)");
    let master = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let worker = loop {
        if let Some(worker) = children_of(master).first() {
            break *worker;
        }
        assert!(Instant::now() < deadline, "nginx started no worker");
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, worker)
}

pub fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && rest.split_whitespace().nth(1) == Some(&pid.to_string())
        {
            found.push(p);
        }
    }
    found
}

/// An OCI layout of one image (`image`) of random layers, for skopeo.
pub fn write_layout(dir: &Path, layers: usize, layer_bytes: usize) {
    use regtee::oci::digest::Digest;
    let image = regtee::local_registry::sample_image(&vec![layer_bytes; layers]);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for blob in std::iter::once(&image.config)
        .chain(image.layers.iter())
        .chain(std::iter::once(&image.manifest))
    {
        let d = Digest::sha256_of(blob);
        std::fs::write(dir.join("blobs/sha256").join(d.hex()), blob).unwrap();
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": image.digest.to_string(),
        "size": image.manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "image"},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// `skopeo copy` with `args`; the time it took. skopeo's blob info cache is emptied first:
/// it remembers where a blob was seen and mounts it from there instead of uploading, which
/// would time a mount, not a push.
pub fn skopeo(args: &[String]) -> Duration {
    forget_blob_locations();
    let started = Instant::now();
    let out = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet", "--retry-times=0"])
        .args(args)
        .output()
        .expect("skopeo is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Removes containers/image's blob info cache (root's and this user's).
pub fn forget_blob_locations() {
    let mut dirs = vec![std::path::PathBuf::from("/var/lib/containers/cache")];
    if let Ok(home) = std::env::var("HOME") {
        dirs.push(Path::new(&home).join(".local/share/containers/cache"));
    }
    for dir in dirs {
        for file in ["blob-info-cache-v1.boltdb", "blob-info-cache-v1.sqlite"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
    }
}

/// Starts a backfill of `project` through the admin API and long-polls it (`?wait=`, answered
/// the moment it ends); its result, which must be `finished`.
pub async fn backfill(client: &HttpClient, admin: &str, project: &str) -> serde_json::Value {
    use http_body_util::BodyExt;
    let json = |resp: http::Response<hyper::body::Incoming>| async move {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    let post = http::Request::post(format!("{admin}/api/v1/backfills"))
        .header("content-type", "application/json")
        .body(regtee::body::full(
            serde_json::json!({"project": project}).to_string(),
        ))
        .unwrap();
    let started = json(client.request(post).await.unwrap()).await;
    let id = started["id"].as_u64().expect("a backfill id");
    loop {
        let get = http::Request::get(format!("{admin}/api/v1/backfills/{id}?wait=5"))
            .body(regtee::body::empty())
            .unwrap();
        let progress = json(client.request(get).await.unwrap()).await;
        if progress["state"] != "running" {
            assert_eq!(progress["state"], "finished", "{progress}");
            return progress;
        }
    }
}

/// Two plain local registries, `harbor` and `cloud`, under `dir`.
pub async fn harbor_and_cloud(dir: &Path) -> (LocalRegistry, LocalRegistry) {
    let harbor = LocalRegistry::start(&dir.join("harbor"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let cloud = LocalRegistry::start(&dir.join("cloud"), RegistryOptions::default())
        .await
        .unwrap();
    (harbor, cloud)
}

/// What a Harbor project holds, per repository: each artifact's digest and its tags.
type Artifacts =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<String>>>;

/// Harbor's core for the benches, behind the same nginx as the registry (`/api/`): it answers
/// a project's repository list and each repository's artifact list from memory, as Harbor's
/// core answers them from its database, so the registry does no work for them (Harbor API
/// v2.0: `GET /projects/{p}/repositories`, `GET /projects/{p}/repositories/{r}/artifacts`
/// with `page` and `page_size`, at most 100). What it holds is a snapshot of the registry,
/// taken by [`HarborCore::snapshot`]: Harbor records the same at push time.
pub struct HarborCore {
    pub addr: std::net::SocketAddr,
    artifacts: std::sync::Arc<std::sync::Mutex<Artifacts>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for HarborCore {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl HarborCore {
    pub async fn start() -> HarborCore {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let artifacts = std::sync::Arc::new(std::sync::Mutex::new(Artifacts::new()));
        let held = artifacts.clone();
        let server = serve::serve(listener, move |req| {
            let answer = core_answer(&held.lock().unwrap(), &req);
            async move { answer }
        });
        HarborCore {
            addr,
            artifacts,
            server,
        }
    }

    /// Records what `registry` holds now: every repository's tags and their digests.
    pub async fn snapshot(&self, client: &HttpClient, registry: &str) {
        use http_body_util::BodyExt;
        let get = |url: String| async {
            let resp = client
                .request(http::Request::get(url).body(regtee::body::empty()).unwrap())
                .await
                .unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        };
        let names = |v: &serde_json::Value, key: &str| -> Vec<String> {
            v[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut artifacts = Artifacts::new();
        let catalog = get(format!("{registry}/v2/_catalog?n=1000")).await;
        for repository in names(&catalog, "repositories") {
            let tags = get(format!("{registry}/v2/{repository}/tags/list")).await;
            let entry = artifacts.entry(repository.clone()).or_default();
            for tag in names(&tags, "tags") {
                let head =
                    http::Request::head(format!("{registry}/v2/{repository}/manifests/{tag}"))
                        .header("accept", regtee::oci::manifest::ACCEPT_ALL)
                        .body(regtee::body::empty())
                        .unwrap();
                let resp = client.request(head).await.unwrap();
                let digest = resp.headers()["docker-content-digest"].to_str().unwrap();
                entry.entry(digest.to_string()).or_default().push(tag);
            }
        }
        *self.artifacts.lock().unwrap() = artifacts;
    }
}

/// Harbor core's answer to one API request, from what it holds.
fn core_answer(
    artifacts: &Artifacts,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Full<Bytes>> {
    let query: std::collections::BTreeMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let number = |key: &str, default: usize| {
        query
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (page, size) = (
        number("page", 1).max(1),
        number("page_size", 10).clamp(1, 100),
    );
    let path = req.uri().path();
    let listed: Option<Vec<serde_json::Value>> = path
        .strip_prefix("/api/v2.0/projects/")
        .and_then(|rest| match rest.split_once("/repositories") {
            // The project's repositories, with their full names.
            Some((project, "")) => Some(
                artifacts
                    .keys()
                    .filter(|r| r.strip_prefix(project).is_some_and(|r| r.starts_with('/')))
                    .map(|r| serde_json::json!({ "name": r }))
                    .collect(),
            ),
            // A repository's artifacts; its name within the project comes URL-encoded once
            // more after nginx decoded the path.
            Some((project, rest)) => {
                let name = rest.strip_prefix('/')?.strip_suffix("/artifacts")?;
                let name = name.replace("%2F", "/").replace("%2f", "/");
                Some(
                    artifacts
                        .get(&format!("{project}/{name}"))?
                        .iter()
                        .map(|(digest, tags)| {
                            serde_json::json!({
                                "digest": digest,
                                "tags": tags.iter().map(|t| serde_json::json!({"name": t})).collect::<Vec<_>>(),
                            })
                        })
                        .collect(),
                )
            }
            None => None,
        });
    let (status, body) = match listed {
        Some(all) => (
            200,
            serde_json::Value::Array(all.into_iter().skip((page - 1) * size).take(size).collect())
                .to_string(),
        ),
        None => (
            404,
            r#"{"errors":[{"code":"NOT_FOUND","message":"not found"}]}"#.to_string(),
        ),
    };
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap()
}

/// Runs `regtee ARGS --config CONFIG` with the spec's environment; how long it took, command
/// start to exit, and what it printed. It must succeed.
pub fn regtee_cli(config: &Path, spec: &ConfigSpec, args: &[&str]) -> (Duration, String) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_regtee"))
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(spec.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
