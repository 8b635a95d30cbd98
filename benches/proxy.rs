//! Proxy overhead, measured end to end: a 256 MiB blob pushed and pulled, and 2,000 manifest
//! HEADs, directly against a local distribution registry and through regtee, in one run. Then
//! regtee's peak memory while a 1 GiB blob streams through it.
//!
//! Run: `cargo bench --bench proxy`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use regtee::local_registry::{LocalRegistry, RegistryOptions, free_port};

const MIB: usize = 1024 * 1024;

#[tokio::main]
async fn main() {
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start(&work.path().join("registry"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let port = free_port().unwrap();
    let config = work.path().join("regtee.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
            registry.url(),
            work.path().join("state").display()
        ),
    )
    .unwrap();
    let regtee = RegteeProcess::start(&config, &work.path().join("regtee.log"));
    wait_listening(&format!("127.0.0.1:{port}")).await;
    let direct = registry.url();
    let through = format!("http://127.0.0.1:{port}");
    let client = client();

    println!(
        "regtee proxy bench: upstream {direct} (docker-registry), regtee {through} (release build)\n"
    );

    // 256 MiB push and pull, each side on fresh content so neither hits a cache.
    let times = 256;
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "direct", "regtee", "ratio"
    );
    let mut push = Vec::new();
    let mut pull = Vec::new();
    for (base, repo) in [(&direct, "bench/direct"), (&through, "bench/proxied")] {
        let chunk = random_chunk(MIB);
        let digest = repeated_digest(&chunk, times);
        let up = upload(&client, base, repo, &chunk, times, &digest).await;
        let (down, n) = download(&client, base, repo, &digest).await;
        assert_eq!(n, (MIB * times) as u64);
        push.push(mib_per_s(n, up));
        pull.push(mib_per_s(n, down));
    }
    println!(
        "{:<34} {:>8.0} MiB/s {:>6.0} MiB/s {:>8.2}",
        "push 256 MiB blob",
        push[0],
        push[1],
        push[1] / push[0]
    );
    println!(
        "{:<34} {:>8.0} MiB/s {:>6.0} MiB/s {:>8.2}",
        "pull 256 MiB blob",
        pull[0],
        pull[1],
        pull[1] / pull[0]
    );

    // A manifest to HEAD.
    let layer = random_chunk(1024);
    let layer_digest = repeated_digest(&layer, 1);
    upload(&client, &direct, "bench/heads", &layer, 1, &layer_digest).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer_digest, "size": 1024},
        "layers": [],
    }))
    .unwrap();
    let put = http::Request::put(format!("{direct}/v2/bench/heads/manifests/latest"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(regtee::body::full(manifest))
        .unwrap();
    assert_eq!(client.request(put).await.unwrap().status(), 201);

    let requests = 2000;
    let concurrency = 8;
    let mut rows = Vec::new();
    for base in [&direct, &through] {
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(requests)));
        let started = Instant::now();
        let mut workers = Vec::new();
        for w in 0..concurrency {
            let (client, base, latencies) = (client.clone(), base.clone(), latencies.clone());
            workers.push(tokio::spawn(async move {
                for _ in (w..requests).step_by(concurrency) {
                    let t = Instant::now();
                    let head =
                        http::Request::head(format!("{base}/v2/bench/heads/manifests/latest"))
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
        let elapsed = started.elapsed();
        let mut l = latencies.lock().unwrap().clone();
        l.sort();
        rows.push((
            requests as f64 / elapsed.as_secs_f64(),
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            percentile(&l, 0.999),
        ));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:<34} {:>8.0} req/s {:>6.0} req/s {:>8.2}",
        "2000 HEAD manifest (8 at a time)",
        rows[0].0,
        rows[1].0,
        rows[1].0 / rows[0].0
    );
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms {:>8.2}",
        "  latency p50",
        ms(rows[0].1),
        ms(rows[1].1),
        ms(rows[1].1) / ms(rows[0].1)
    );
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms {:>8.2}",
        "  latency p99",
        ms(rows[0].2),
        ms(rows[1].2),
        ms(rows[1].2) / ms(rows[0].2)
    );
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms {:>8.2}",
        "  latency p99.9",
        ms(rows[0].3),
        ms(rows[1].3),
        ms(rows[1].3) / ms(rows[0].3)
    );

    // Memory: 1 GiB up and down through regtee.
    let before = regtee.rss_kib();
    let peak_before = regtee.peak_rss_kib();
    let chunk = random_chunk(MIB);
    let digest = repeated_digest(&chunk, 1024);
    let up = upload(&client, &through, "bench/gib", &chunk, 1024, &digest).await;
    let (down, n) = download(&client, &through, "bench/gib", &digest).await;
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
    assert!(
        peak_after < peak_before + 64 * 1024,
        "regtee's memory grew by {} MiB while streaming 1 GiB",
        (peak_after - peak_before) / 1024
    );
}
