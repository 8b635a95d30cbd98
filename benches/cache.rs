//! The pull-through cache: "Harbor" is a local distribution registry behind nginx (which logs
//! every request, so upstream reads are counted outside regtee); regtee with `[cache]` in front.
//!
//! - eight clients pulling one 256 MiB blob at once, cold cache: reads of Harbor (must be 1) and
//!   wall time, against eight clients pulling it from Harbor directly;
//! - a cached pull against a direct one, with regtee's own streaming client and with skopeo
//!   (a 16 × 8 MiB image), five rounds interleaved, medians;
//! - blob HEAD latency p50/p99 on a hit against direct, one connection;
//! - regtee's RSS before and after (peak) the whole run.
//!
//! Registry storage and the cache are both in `/dev/shm` where it exists, so neither side is
//! measured against a disk.
//!
//! Run: `cargo bench --bench cache`

mod common;

use std::time::{Duration, Instant};

use common::*;
use regtee::local_registry::{LocalRegistry, RegistryOptions, free_port};

const MIB: usize = 1024 * 1024;
const BLOB_MIB: usize = 256;
const CLIENTS: usize = 8;
const ROUNDS: usize = 5;
const LAYERS: usize = 16;
const LAYER_MIB: usize = 8;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `CLIENTS` downloads of `digest` from `base` at once; the wall time.
async fn concurrent_downloads(base: &str, digest: &str) -> Duration {
    let started = Instant::now();
    let pulls: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (base, digest) = (base.to_string(), digest.to_string());
            tokio::spawn(async move {
                let (_, n) = download(&client(), &base, "bench/cache", &digest).await;
                assert_eq!(n, (BLOB_MIB * MIB) as u64);
            })
        })
        .collect();
    for pull in pulls {
        pull.await.unwrap();
    }
    started.elapsed()
}

/// Sequential blob `HEAD`s on one connection: p50 and p99.
async fn head_latencies(base: &str, digest: &str, requests: usize) -> (Duration, Duration) {
    let client = client();
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        let head = http::Request::head(format!("{base}/v2/bench/cache/blobs/{digest}"))
            .body(regtee::body::empty())
            .unwrap();
        let resp = client.request(head).await.unwrap();
        assert_eq!(resp.status(), 200);
        latencies.push(t.elapsed());
    }
    latencies.sort();
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

#[tokio::main]
async fn main() {
    let work = memory_work_dir();
    let registry = LocalRegistry::start(&work.path().join("registry"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let harbor_port = free_port().unwrap();
    let nginx_dir = work.path().join("nginx");
    let (_nginx, _) = start_nginx(&nginx_dir, harbor_port, &registry.url(), true);
    wait_listening(([127, 0, 0, 1], harbor_port).into()).await;
    let harbor = format!("http://127.0.0.1:{harbor_port}");
    let mut spec = ConfigSpec::at(&harbor, &work.path().join("state")).with_fixed_ports();
    spec.cache = Some("max_size = \"4GiB\"\n".into());
    let regtee = RegteeProcess::serve(&spec, work.path(), "regtee").await;
    let through = format!("http://{}", spec.listen_addr());
    let rss_before = regtee.rss_kib();

    let chunk = random_chunk(MIB);
    let digest = repeated_digest(&chunk, BLOB_MIB);
    upload(
        &client(),
        &registry.url(),
        "bench/cache",
        &chunk,
        BLOB_MIB,
        &digest,
    )
    .await;
    println!(
        "regtee cache bench: docker-registry behind nginx plays Harbor; regtee (release) with [cache] in front; storage and cache in memory\n"
    );

    let upstream_reads = || {
        let request = format!("\"GET /v2/bench/cache/blobs/{digest} ");
        std::fs::read_to_string(nginx_dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&request) && l.contains("\" 200 "))
            .count()
    };
    let direct_wall = concurrent_downloads(&harbor, &digest).await;
    let reads_before = upstream_reads();
    let cold_wall = concurrent_downloads(&through, &digest).await;
    let reads = upstream_reads() - reads_before;
    let total = (CLIENTS * BLOB_MIB * MIB) as u64;
    println!(
        "{CLIENTS} clients pulling one {BLOB_MIB} MiB blob at once (cold cache):\n  reads of Harbor: {reads} through regtee, {CLIENTS} direct\n  wall: regtee {:.2} s ({:.0} MiB/s delivered), direct {:.2} s ({:.0} MiB/s); ratio {:.2}\n",
        cold_wall.as_secs_f64(),
        mib_per_s(total, cold_wall),
        direct_wall.as_secs_f64(),
        mib_per_s(total, direct_wall),
        direct_wall.as_secs_f64() / cold_wall.as_secs_f64(),
    );

    // Cached pulls against direct, interleaved.
    let layout = work.path().join("layout");
    write_layout(&layout, LAYERS, LAYER_MIB * MIB);
    skopeo(&[
        "--dest-tls-verify=false".into(),
        format!("oci:{}:image", layout.display()),
        format!(
            "docker://127.0.0.1:{}/bench/image:1",
            registry.addr().port()
        ),
    ]);
    let pull_with_skopeo = |base: &str, round: usize, name: &str| {
        let dest = work.path().join(format!("pulled-{name}-{round}"));
        let took = skopeo(&[
            "--src-tls-verify=false".into(),
            format!(
                "docker://{}/bench/image:1",
                base.trim_start_matches("http://")
            ),
            format!("oci:{}:image", dest.display()),
        ]);
        std::fs::remove_dir_all(&dest).unwrap();
        took
    };
    // Warm the cache with the image once.
    pull_with_skopeo(&through, 0, "warm");
    let image_bytes = (LAYERS * LAYER_MIB * MIB) as u64;
    let (mut blob, mut blob_direct, mut sk, mut sk_direct) = (vec![], vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        let (t, n) = download(&client(), &through, "bench/cache", &digest).await;
        blob.push(mib_per_s(n, t));
        let (t, n) = download(&client(), &harbor, "bench/cache", &digest).await;
        blob_direct.push(mib_per_s(n, t));
        sk.push(mib_per_s(
            image_bytes,
            pull_with_skopeo(&through, round, "regtee"),
        ));
        sk_direct.push(mib_per_s(
            image_bytes,
            pull_with_skopeo(&harbor, round, "direct"),
        ));
    }
    let (blob, blob_direct) = (median(&mut blob), median(&mut blob_direct));
    let (sk, sk_direct) = (median(&mut sk), median(&mut sk_direct));
    println!(
        "cached pull vs direct ({ROUNDS} rounds, medians):\n  {BLOB_MIB} MiB blob, regtee's client: regtee {blob:.0} MiB/s, direct {blob_direct:.0} MiB/s; ratio {:.2}\n  skopeo, {LAYERS} x {LAYER_MIB} MiB image: regtee {sk:.0} MiB/s, direct {sk_direct:.0} MiB/s; ratio {:.2}\n",
        blob / blob_direct,
        sk / sk_direct,
    );

    let (hit50, hit99) = head_latencies(&through, &digest, 2000).await;
    let (direct50, direct99) = head_latencies(&harbor, &digest, 2000).await;
    println!(
        "blob HEAD, 2000 sequential on one connection:\n  hit: p50 {} us, p99 {} us; direct: p50 {} us, p99 {} us\n",
        hit50.as_micros(),
        hit99.as_micros(),
        direct50.as_micros(),
        direct99.as_micros(),
    );
    println!(
        "regtee RSS: {} MiB at start, peak {} MiB after {:.1} GiB served",
        rss_before / 1024,
        regtee.peak_rss_kib() / 1024,
        (total + (ROUNDS as u64) * ((BLOB_MIB * MIB) as u64 + image_bytes)) as f64
            / (1024.0 * 1024.0 * 1024.0),
    );
}
