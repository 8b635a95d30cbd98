//! What recording a push costs: manifest PUT latency through regtee with no target (nothing
//! recorded), with a target and the queue in SQLite, and with the queue in PostgreSQL (a real
//! server on this machine, `synchronous_commit = on`), in one run. The target is an address
//! nobody answers, so jobs wait and no copy competes for the CPU.
//!
//! Run: `cargo bench --bench queue`

mod common;

use std::time::Duration;

use common::*;
use regtee::local_postgres::LocalPostgres;
use regtee::local_registry::{LocalRegistry, RegistryOptions, free_port};

const PUTS: usize = 500;

#[tokio::main]
async fn main() {
    let work = tempfile::tempdir().unwrap();
    let harbor = LocalRegistry::start(&work.path().join("harbor"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let postgres = LocalPostgres::start().expect("PostgreSQL is installed");
    let url = postgres.create_database("bench").unwrap();
    let client = client();

    // One small image in Harbor; each PUT tags it anew, so each records a new job.
    let config = bytes::Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let manifest = image_manifest(&client, &harbor.url(), "bench/app", config, &[]).await;

    // A target nobody answers, retried rarely: jobs are recorded and stay pending.
    let nobody = TargetSpec::at(
        "cloud",
        &format!("http://127.0.0.1:{}", free_port().unwrap()),
    )
    .retry("10m", "1h");
    let spec = |i: usize| {
        ConfigSpec::at(&harbor.url(), &work.path().join(format!("state-{i}"))).with_fixed_ports()
    };
    let setups = [
        ("no target (nothing recorded)", spec(0)),
        ("target, queue in SQLite", spec(1).target(nobody.clone())),
        (
            "target, queue in PostgreSQL",
            spec(2)
                .target(nobody.clone())
                .on_database(&url, postgres.password()),
        ),
    ];
    println!("manifest PUT through regtee, {PUTS} sequential, docker-registry as Harbor\n");
    println!("{:<32} {:>10} {:>10}", "", "p50 (ms)", "p99 (ms)");
    for (i, (name, spec)) in setups.iter().enumerate() {
        let _regtee = RegteeProcess::serve(spec, work.path(), &format!("regtee-{i}")).await;
        let port = spec.listen_addr().port();
        let mut latencies = Vec::with_capacity(PUTS);
        for n in 0..PUTS + 20 {
            let put = http::Request::put(format!(
                "http://127.0.0.1:{port}/v2/bench/app/manifests/s{i}-{n}"
            ))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(regtee::body::full(manifest.clone()))
            .unwrap();
            let started = std::time::Instant::now();
            let status = client.request(put).await.unwrap().status();
            assert_eq!(status, 201, "{name}");
            // The first PUTs warm connections and caches.
            if n >= 20 {
                latencies.push(started.elapsed());
            }
        }
        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{name:<32} {:>10.2} {:>10.2}",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99))
        );
    }
}
