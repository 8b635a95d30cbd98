//! Shared by the benches: local registries, a streaming HTTP client, and (from the tests'
//! harness, `tests/support/spec.rs`) regtee's config and regtee as a process.

#![allow(dead_code)]

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
