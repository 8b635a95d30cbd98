//! Rate limits: measured rates against the configured ones.
//!
//! 1. A 256 MiB blob pushed through regtee is mirrored to a target with
//!    `max_bytes_per_second = 64 MiB`: the copy's rate, from the blob's 201 to its presence on
//!    the target (the real mirror path: Harbor GET, target PUT, through regtee as a process).
//! 2. regtee's own read of that blob from Harbor with `[upstream] max_bytes_per_second = 64 MiB`.
//! 3. 500 small requests (blob HEADs) with `max_requests_per_second = 100`.
//!
//! Run: `cargo bench --bench limits`

mod common;

use std::num::{NonZeroU32, NonZeroU64};
use std::time::{Duration, Instant};

use common::*;
use regtee::config::Side;
use regtee::config::{ClientTls, Endpoint, Login, RateLimits};
use regtee::local_registry::{LocalRegistry, RegistryOptions, anonymous_client};
use regtee::oci::digest::Digest;
use regtee::origin::Origin;
use regtee::registry::RegistryClient;

const MIB: u64 = 1024 * 1024;
const BLOB: u64 = 256 * MIB;
const BYTE_LIMIT: u64 = 64 * MIB;
const REQUESTS: u32 = 500;
const REQUEST_LIMIT: u32 = 100;

fn limited_client(url: &str, side: Side, limits: RateLimits) -> RegistryClient {
    RegistryClient::new(&Endpoint {
        name: "bench".into(),
        side,
        origin: Origin::parse(url).unwrap(),
        tls: ClientTls::default(),
        login: Login::Anonymous,
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
        pool_idle_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(120),
        limits,
    })
    .unwrap()
}

fn report(what: &str, measured: f64, limit: f64, unit: &str) {
    println!(
        "{what:<46} {measured:>8.1} {unit} (limit {limit:.0}, {:+.1}%)",
        (measured / limit - 1.0) * 100.0
    );
}

#[tokio::main]
async fn main() {
    regtee::tls::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let harbor = LocalRegistry::start(&work.path().join("harbor"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let cloud = LocalRegistry::start(&work.path().join("cloud"), RegistryOptions::default())
        .await
        .unwrap();
    let spec = ConfigSpec::at(&harbor.url(), &work.path().join("state"))
        .with_fixed_ports()
        .target(
            TargetSpec::at("cloud", &cloud.url())
                .with(&format!("max_bytes_per_second = {BYTE_LIMIT}")),
        );
    let _regtee = RegteeProcess::serve(&spec, work.path(), "regtee").await;
    let port = spec.listen_addr().port();
    println!("regtee rate-limit bench: local docker-registry instances, regtee as a process\n");

    let chunk = random_chunk(MIB as usize);
    let times = (BLOB / MIB) as usize;
    let digest = repeated_digest(&chunk, times);
    let http = client();
    upload(
        &http,
        &format!("http://127.0.0.1:{port}"),
        "library/big",
        &chunk,
        times,
        &digest,
    )
    .await;
    let acknowledged = Instant::now();
    let parsed: Digest = digest.parse().unwrap();
    let cloud_client = anonymous_client("cloud", &cloud.url()).unwrap();
    while cloud_client
        .blob_exists("library/big", &parsed)
        .await
        .unwrap()
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let copy = acknowledged.elapsed();
    report(
        "mirror copy to a target, 256 MiB blob",
        mib_per_s(BLOB, copy),
        (BYTE_LIMIT / MIB) as f64,
        "MiB/s",
    );

    let upstream = limited_client(
        &harbor.url(),
        Side::Upstream,
        RateLimits {
            bytes_per_second: NonZeroU64::new(BYTE_LIMIT),
            requests_per_second: None,
        },
    );
    let started = Instant::now();
    let stream = upstream.get_blob("library/big", &parsed).await.unwrap();
    let mut body = stream.body;
    let mut read = 0u64;
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            read += data.len() as u64;
        }
    }
    assert_eq!(read, BLOB);
    report(
        "regtee's read from Harbor, 256 MiB blob",
        mib_per_s(BLOB, started.elapsed()),
        (BYTE_LIMIT / MIB) as f64,
        "MiB/s",
    );

    let target = limited_client(
        &cloud.url(),
        Side::Target,
        RateLimits {
            bytes_per_second: None,
            requests_per_second: NonZeroU32::new(REQUEST_LIMIT),
        },
    );
    let started = Instant::now();
    for _ in 0..REQUESTS {
        assert!(
            target
                .blob_exists("library/big", &parsed)
                .await
                .unwrap()
                .is_some()
        );
    }
    report(
        "500 blob HEADs to a target",
        f64::from(REQUESTS) / started.elapsed().as_secs_f64(),
        f64::from(REQUEST_LIMIT),
        "req/s",
    );
}
