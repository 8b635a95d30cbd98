//! The in-sync re-check the way issue 25 measured regsync: a project of 50 repositories x 2
//! tags, everything already mirrored, Harbor and the target plain local docker-registry
//! instances on loopback. Times `regtee sync PROJECT` from command start to summary printed
//! (median of 7), the backfill as the server measures it, and the requests each registry
//! received per tag (from regtee's own request counts: HEADs and listings).
//!
//! Run: `cargo bench --bench recheck`

mod common;

use std::time::Instant;

use common::*;

const REPOSITORIES: usize = 50;
const TAGS_PER_REPOSITORY: usize = 2;

#[tokio::main]
async fn main() {
    regtee::tls::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let (harbor, cloud) = harbor_and_cloud(work.path()).await;
    let spec = ConfigSpec::at(&harbor.url(), &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::at("cloud", &cloud.url()).with("concurrency = 8"));
    let regtee = RegteeProcess::serve(&spec, work.path(), "regtee").await;
    let admin = format!("http://{}", spec.admin_addr().unwrap());
    let client = client();

    // The project: each tag its own small image, straight into Harbor, then mirrored by a
    // backfill so that both sides agree.
    for r in 0..REPOSITORIES {
        let repo = format!("proj/app-{r}");
        let layer = random_chunk(512);
        let digest = repeated_digest(&layer, 1);
        upload(&client, &harbor.url(), &repo, &layer, 1, &digest).await;
        for t in 0..TAGS_PER_REPOSITORY {
            let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{r}-{t}"}}"#);
            let manifest = image_manifest(
                &client,
                &harbor.url(),
                &repo,
                config.into(),
                &[(digest.clone(), 512)],
            )
            .await;
            let put = http::Request::put(format!("{}/v2/{repo}/manifests/v{t}", harbor.url()))
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(regtee::body::full(manifest))
                .unwrap();
            assert_eq!(client.request(put).await.unwrap().status(), 201);
        }
    }
    let config = work.path().join("regtee.toml");
    let sync = |args: &[&str]| {
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_regtee"))
            .args(args)
            .arg("--config")
            .arg(&config)
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
    };
    sync(&["sync", "proj"]);
    // Wait until every queued copy is done: the re-check then finds everything in sync.
    let tags = REPOSITORIES * TAGS_PER_REPOSITORY;
    loop {
        let (_, out) = sync(&["sync", "proj", "--dry-run"]);
        if out.contains(&format!("{tags} in sync")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let pids = [regtee.child.id(), harbor.pid(), cloud.pid()];
    let cpu_before = pids.map(cpu_seconds);
    let mut runs: Vec<std::time::Duration> = (0..7).map(|_| sync(&["sync", "proj"]).0).collect();
    let cpu_ms = |i: usize| (cpu_seconds(pids[i]) - cpu_before[i]) * 1000.0 / 7.0;
    let cpu = [cpu_ms(0), cpu_ms(1), cpu_ms(2)];
    runs.sort();
    let median = runs[runs.len() / 2];
    let started = Instant::now();
    let done = backfill(&client, &admin, "proj").await;
    let server = started.elapsed();
    assert_eq!(done["in_sync"], tags, "{done}");
    println!(
        "in-sync re-check, {REPOSITORIES} repositories x {TAGS_PER_REPOSITORY} tags (two local registries):"
    );
    println!(
        "  `regtee sync proj` end to end: median {:>5.0} ms (min {:.0}, max {:.0}; 7 runs)",
        median.as_secs_f64() * 1000.0,
        runs[0].as_secs_f64() * 1000.0,
        runs[runs.len() - 1].as_secs_f64() * 1000.0
    );
    println!(
        "  the backfill through the admin API:  {:>5.0} ms",
        server.as_secs_f64() * 1000.0
    );
    println!(
        "  CPU per re-check: regtee {:.0} ms, Harbor's registry {:.0} ms, the target's {:.0} ms ({:.2} ms per request to a registry)",
        cpu[0],
        cpu[1],
        cpu[2],
        (cpu[1] + cpu[2]) / (2 * tags + REPOSITORIES + 1) as f64
    );
    println!(
        "  regsync once (issue 25, same shape, a machine like this): 170 ms; the target is 85 ms"
    );
}
