//! Mirror lag under a burst of pushes: images of 3 x 5 MiB pushed through regtee 8 at a time,
//! then 32 at a time (target `concurrency = 4`); the lag of each manifest from Harbor's 201 to
//! the manifest on the target, read from regtee's job records (created when Harbor answered,
//! finished when the target had it), split into waiting for a worker and copying.
//!
//! Run: `cargo bench --bench lag`

mod common;

use std::time::Duration;

use common::*;
use regtee::local_registry::{anonymous_client, sample_image};

const MIB: usize = 1024 * 1024;

fn quantile(sorted: &[i64], q: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Pushes `images` images, `parallel` at a time, into repositories named `prefix-N`.
async fn burst(proxy: &str, prefix: &str, images: usize, parallel: usize) {
    let through = std::sync::Arc::new(anonymous_client("regtee", proxy).unwrap());
    let mut pending = Vec::new();
    for i in 0..images {
        let through = through.clone();
        let repo = format!("burst/{prefix}-{i}");
        pending.push(tokio::spawn(async move {
            let image = sample_image(&[5 * MIB; 3]);
            regtee::local_registry::push_image(&through, &repo, "1", &image)
                .await
                .unwrap();
        }));
        if pending.len() == parallel {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
}

/// Lags of the burst's manifests (ms): total, waiting, copying, once every job is done.
async fn lags(admin: &str, prefix: &str, images: usize) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let client = client();
    let get = |path: String| {
        let client = client.clone();
        async move {
            use http_body_util::BodyExt;
            let request = http::Request::get(path)
                .body(regtee::body::empty())
                .unwrap();
            let body = client.request(request).await.unwrap().into_body();
            serde_json::from_slice::<serde_json::Value>(&body.collect().await.unwrap().to_bytes())
                .unwrap()
        }
    };
    loop {
        let page = get(format!(
            "{admin}/api/v1/jobs?state=done&project=burst&limit=1000"
        ))
        .await;
        let manifests: Vec<serde_json::Value> = page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["kind"] == "manifest")
            .filter(|j| {
                j["repository"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("burst/{prefix}-")))
            })
            .cloned()
            .collect();
        if manifests.len() == images {
            let (mut total, mut waiting, mut copying) = (Vec::new(), Vec::new(), Vec::new());
            for job in &manifests {
                let detail = get(format!("{admin}/api/v1/jobs/{}", job["id"])).await;
                let created = job["created_at"].as_i64().unwrap();
                let finished = job["finished_at"].as_i64().unwrap();
                let attempts = detail["attempts"].as_array().unwrap();
                let started = attempts.last().unwrap()["started_at"].as_i64().unwrap();
                total.push(finished - created);
                waiting.push(started - created);
                copying.push(finished - started);
            }
            for v in [&mut total, &mut waiting, &mut copying] {
                v.sort_unstable();
            }
            return (total, waiting, copying);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let work = memory_work_dir();
    let (harbor, cloud) = harbor_and_cloud(work.path()).await;
    let spec = ConfigSpec::at(&harbor.url(), &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::at("cloud", &cloud.url()).with("concurrency = 4"));
    let regtee = RegteeProcess::serve(&spec, work.path(), "regtee").await;
    let pids = [
        regtee.child.id(),
        harbor.pid(),
        cloud.pid(),
        std::process::id(),
    ];
    let proxy = format!("http://{}", spec.listen_addr());
    let admin = format!("http://{}", spec.admin_addr().unwrap());
    println!(
        "regtee lag bench: images of 3 x 5 MiB pushed through regtee, target concurrency = 4, docker-registry as Harbor and target (storage in memory)\n"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>14} {:>14}",
        "", "p50 (ms)", "p99 (ms)", "max (ms)", "waiting p99", "copying p99"
    );
    let mut busy = Vec::new();
    for (prefix, images, parallel) in [("eight", 16, 8), ("thirtytwo", 32, 32)] {
        let (cpu_before, started) = (pids.map(cpu_seconds), std::time::Instant::now());
        burst(&proxy, prefix, images, parallel).await;
        let (total, waiting, copying) = lags(&admin, prefix, images).await;
        let wall = started.elapsed().as_secs_f64();
        let cpu: Vec<f64> = pids
            .iter()
            .zip(cpu_before)
            .map(|(p, b)| cpu_seconds(*p) - b)
            .collect();
        busy.push((images, parallel, wall, cpu));
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>14} {:>14}",
            format!("{images} images, {parallel} at a time"),
            quantile(&total, 0.5),
            quantile(&total, 0.99),
            total.last().unwrap(),
            quantile(&waiting, 0.99),
            quantile(&copying, 0.99),
        );
    }
    println!("\nCPU over each burst, from the first push to the last job's end (seconds):");
    for (images, parallel, wall, cpu) in busy {
        println!(
            "{images} images, {parallel} at a time: wall {wall:.2}; regtee {:.2}, Harbor's registry {:.2}, the target's {:.2}, the pushing client {:.2}; {:.2} of 2 cores busy",
            cpu[0],
            cpu[1],
            cpu[2],
            cpu[3],
            cpu.iter().sum::<f64>() / wall
        );
    }
}
