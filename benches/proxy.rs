//! The request path against the wire and against nginx: direct to a local distribution
//! registry, through regtee, and through nginx (`proxy_pass`, request and response buffering
//! off, upstream keep-alive), interleaved in one run, five rounds, medians.
//!
//! - push and pull of a 256 MiB blob with regtee's own streaming client;
//! - push and pull of a 16-layer image (128 MiB) with skopeo, and push of a 1 GiB one (16 x 64 MiB);
//! - manifest HEAD latency p50/p99 sequentially on one connection, and with 8 and 64 connections;
//! - CPU-seconds per GiB of each proxy process over the blob transfers (`/proc/<pid>/stat`);
//! - regtee's peak RSS while a 1 GiB blob streams up and down.
//!
//! Registry storage is in `/dev/shm` where it exists.
//!
//! Run: `cargo bench --bench proxy`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use regtee::local_registry::{LocalRegistry, RegistryOptions, free_port};

const MIB: usize = 1024 * 1024;
const ROUNDS: usize = 5;
const BLOB_MIB: usize = 256;
const LAYERS: usize = 16;
const LAYER_MIB: usize = 8;
const BIG_LAYER_MIB: usize = 64;

/// One way to reach the registry, and the process whose CPU it costs.
struct Endpoint {
    name: &'static str,
    base: String,
    host: String,
    pids: Vec<u32>,
}

/// Every measurement of one endpoint, one value per round.
#[derive(Default)]
struct Samples {
    push: Vec<f64>,
    pull: Vec<f64>,
    skopeo_push: Vec<f64>,
    skopeo_pull: Vec<f64>,
    skopeo_push_gib: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    head: [Vec<(Duration, Duration)>; 3],
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn median_latency(v: &[(Duration, Duration)]) -> (Duration, Duration) {
    let mut p50: Vec<Duration> = v.iter().map(|x| x.0).collect();
    let mut p99: Vec<Duration> = v.iter().map(|x| x.1).collect();
    p50.sort();
    p99.sort();
    (p50[p50.len() / 2], p99[p99.len() / 2])
}

async fn head_latencies(base: &str, connections: usize, requests: usize) -> (Duration, Duration) {
    let client = client();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(requests)));
    let mut workers = Vec::new();
    for w in 0..connections {
        let (client, base, latencies) = (client.clone(), base.to_string(), latencies.clone());
        workers.push(tokio::spawn(async move {
            for _ in (w..requests).step_by(connections) {
                let t = Instant::now();
                let head = http::Request::head(format!("{base}/v2/bench/heads/manifests/latest"))
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .body(regtee::body::empty())
                    .unwrap();
                let resp = client.request(head).await.unwrap();
                assert_eq!(resp.status(), 200);
                latencies.lock().unwrap().push(t.elapsed());
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    (percentile(&l, 0.5), percentile(&l, 0.99))
}

#[tokio::main]
async fn main() {
    // Registry storage in memory where the machine has it: the disk's write-back pauses are
    // larger than anything a proxy adds, and would decide which endpoint looks fastest.
    let work = memory_work_dir();
    let registry = LocalRegistry::start(&work.path().join("registry"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let mut spec = ConfigSpec::at(&registry.url(), &work.path().join("state")).with_fixed_ports();
    spec.admin = None;
    let regtee = RegteeProcess::serve(&spec, work.path(), "regtee").await;
    let port = spec.listen_addr().port();
    let nginx_port = free_port().unwrap();
    let (mut nginx, nginx_worker) = start_nginx(
        &work.path().join("nginx"),
        nginx_port,
        &registry.url(),
        false,
    );
    wait_listening(([127, 0, 0, 1], nginx_port).into()).await;
    let endpoints = [
        Endpoint {
            name: "direct",
            base: registry.url(),
            host: registry.addr().to_string(),
            pids: vec![],
        },
        Endpoint {
            name: "regtee",
            base: format!("http://127.0.0.1:{port}"),
            host: format!("127.0.0.1:{port}"),
            pids: vec![regtee.child.id()],
        },
        Endpoint {
            name: "nginx",
            base: format!("http://127.0.0.1:{nginx_port}"),
            host: format!("127.0.0.1:{nginx_port}"),
            pids: vec![nginx_worker],
        },
    ];
    let client = client();
    println!(
        "regtee proxy bench: docker-registry upstream; regtee (release) and nginx (1 worker, buffering off) in front; {ROUNDS} rounds, medians\n"
    );

    // A manifest to HEAD.
    let layer = random_chunk(1024);
    let layer_digest = repeated_digest(&layer, 1);
    upload(
        &client,
        &registry.url(),
        "bench/heads",
        &layer,
        1,
        &layer_digest,
    )
    .await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer_digest, "size": 1024},
        "layers": [],
    }))
    .unwrap();
    let put = http::Request::put(format!(
        "{}/v2/bench/heads/manifests/latest",
        registry.url()
    ))
    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
    .body(regtee::body::full(manifest))
    .unwrap();
    assert_eq!(client.request(put).await.unwrap().status(), 201);
    let layout = work.path().join("layout");
    write_layout(&layout, LAYERS, LAYER_MIB * MIB);
    let big_layout = work.path().join("layout-gib");
    write_layout(&big_layout, LAYERS, BIG_LAYER_MIB * MIB);

    let mut samples: Vec<Samples> = endpoints.iter().map(|_| Samples::default()).collect();
    let connections = [1, 8, 64];
    for round in 0..ROUNDS {
        for (e, s) in endpoints.iter().zip(samples.iter_mut()) {
            // Fresh content per endpoint and round, so nothing hits a cache.
            let repo = format!("bench/{}-{round}", e.name);
            let chunk = random_chunk(MIB);
            let digest = repeated_digest(&chunk, BLOB_MIB);
            let cpu_before: f64 = e.pids.iter().map(|p| cpu_seconds(*p)).sum();
            let up = upload(&client, &e.base, &repo, &chunk, BLOB_MIB, &digest).await;
            let (down, n) = download(&client, &e.base, &repo, &digest).await;
            let cpu_after: f64 = e.pids.iter().map(|p| cpu_seconds(*p)).sum();
            assert_eq!(n, (MIB * BLOB_MIB) as u64);
            s.push.push(mib_per_s(n, up));
            s.pull.push(mib_per_s(n, down));
            let gib_moved = 2.0 * n as f64 / (1u64 << 30) as f64;
            s.cpu_per_gib.push((cpu_after - cpu_before) / gib_moved);

            let image_bytes = (LAYERS * LAYER_MIB * MIB) as u64;
            let pushed = skopeo(&[
                "--dest-tls-verify=false".into(),
                format!("oci:{}:image", layout.display()),
                format!("docker://{}/{repo}/image:1", e.host),
            ]);
            let pulled_dir = work.path().join(format!("pulled-{}-{round}", e.name));
            let pulled = skopeo(&[
                "--src-tls-verify=false".into(),
                format!("docker://{}/{repo}/image:1", e.host),
                format!("oci:{}:image", pulled_dir.display()),
            ]);
            let _ = std::fs::remove_dir_all(&pulled_dir);
            s.skopeo_push.push(mib_per_s(image_bytes, pushed));
            s.skopeo_pull.push(mib_per_s(image_bytes, pulled));
            let big = skopeo(&[
                "--dest-tls-verify=false".into(),
                format!("oci:{}:image", big_layout.display()),
                format!("docker://{}/{repo}/big:1", e.host),
            ]);
            s.skopeo_push_gib
                .push(mib_per_s((LAYERS * BIG_LAYER_MIB * MIB) as u64, big));

            for (i, c) in connections.iter().enumerate() {
                let requests = if *c == 1 { 2000 } else { 4000 };
                s.head[i].push(head_latencies(&e.base, *c, requests).await);
            }
        }
    }

    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "", "direct", "regtee", "nginx", "r/direct", "r/nginx"
    );
    let row = |what: &str, unit: &str, v: [f64; 3], lower_is_better: bool| {
        let (vs_direct, vs_nginx) = if lower_is_better {
            (v[1] - v[0], v[1] / v[2])
        } else {
            (v[1] / v[0], v[1] / v[2])
        };
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>8} {:>8.2}",
            format!("{what} ({unit})"),
            format!("{:.1}", v[0]),
            format!("{:.1}", v[1]),
            format!("{:.1}", v[2]),
            if lower_is_better {
                format!("{vs_direct:+.0}")
            } else {
                format!("{vs_direct:.2}")
            },
            vs_nginx
        );
    };
    let pick = |f: &dyn Fn(&Samples) -> f64| [f(&samples[0]), f(&samples[1]), f(&samples[2])];
    row(
        "push 256 MiB blob, own client",
        "MiB/s",
        pick(&|s| median(&s.push)),
        false,
    );
    row(
        "pull 256 MiB blob, own client",
        "MiB/s",
        pick(&|s| median(&s.pull)),
        false,
    );
    row(
        "skopeo push, 16 x 8 MiB layers",
        "MiB/s",
        pick(&|s| median(&s.skopeo_push)),
        false,
    );
    row(
        "skopeo pull, 16 x 8 MiB layers",
        "MiB/s",
        pick(&|s| median(&s.skopeo_pull)),
        false,
    );
    row(
        "skopeo push, 16 x 64 MiB layers (1 GiB)",
        "MiB/s",
        pick(&|s| median(&s.skopeo_push_gib)),
        false,
    );
    for (i, c) in connections.iter().enumerate() {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        row(
            &format!("HEAD p50, {c} connection(s)"),
            "us",
            pick(&|s| us(median_latency(&s.head[i]).0)),
            true,
        );
        row(
            &format!("HEAD p99, {c} connection(s)"),
            "us",
            pick(&|s| us(median_latency(&s.head[i]).1)),
            true,
        );
    }
    let cpu = pick(&|s| median(&s.cpu_per_gib));
    println!(
        "{:<40} {:>10} {:>10.3} {:>10.3} {:>8} {:>8.2}",
        "proxy CPU per GiB moved (s)",
        "-",
        cpu[1],
        cpu[2],
        "",
        cpu[1] / cpu[2]
    );
    println!(
        "(r/direct: ratio for rates, difference in us for latencies; r/nginx: regtee / nginx)"
    );

    // Memory: 1 GiB up and down through regtee.
    let through = &endpoints[1].base;
    let before = regtee.rss_kib();
    let peak_before = regtee.peak_rss_kib();
    let chunk = random_chunk(MIB);
    let digest = repeated_digest(&chunk, 1024);
    let up = upload(&client, through, "bench/gib", &chunk, 1024, &digest).await;
    let (down, n) = download(&client, through, "bench/gib", &digest).await;
    assert_eq!(n, 1 << 30);
    let peak_after = regtee.peak_rss_kib();
    println!(
        "\n1 GiB through regtee: push {:.0} MiB/s, pull {:.0} MiB/s; regtee RSS before {} MiB, peak before {} MiB, peak after {} MiB",
        mib_per_s(n, up),
        mib_per_s(n, down),
        before / 1024,
        peak_before / 1024,
        peak_after / 1024
    );
    // SIGTERM to the master stops its worker too.
    nginx.stop("-TERM", Duration::from_secs(10));
}
