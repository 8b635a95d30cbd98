//! The in-sync re-check the way issue 25 measured regsync: a project of 50 repositories x 2
//! tags, everything already mirrored. Times `regtee sync PROJECT` from command start to summary
//! printed (median of 7), the backfill as the server measures it, each process's CPU, and the
//! requests per tag, in two settings:
//! - two plain local docker-registry instances on loopback, as regsync was measured: each
//!   side answers a tag's digest only to a HEAD;
//! - both sides Harbor (the source always is; a target may be, or be built on it, as TCR Enterprise is): the same
//!   registries behind nginx with Harbor's `/api/` location, where a stand-in for Harbor's core
//!   answers artifact lists from memory as Harbor's answers them from its database.
//!
//! Run: `cargo bench --bench recheck`

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const REPOSITORIES: usize = 50;
const TAGS_PER_REPOSITORY: usize = 2;
const TAGS: usize = REPOSITORIES * TAGS_PER_REPOSITORY;
const RUNS: usize = 7;

/// What one setting measured.
struct Measured {
    runs: Vec<Duration>,
    server: Duration,
    /// CPU milliseconds per re-check, per process measured.
    cpu: Vec<(String, f64)>,
    /// What each access log recorded over the timed re-checks.
    logged: Vec<Vec<String>>,
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// regtee in front of `harbor` with `cloud` as its target: brings the project in sync, then
/// times re-checks of it, reading the CPU of `processes` and the lines `logs` gain over them.
async fn measure(
    dir: &Path,
    harbor: &str,
    cloud: &str,
    processes: &[(&str, u32)],
    logs: &[std::path::PathBuf],
) -> Measured {
    std::fs::create_dir_all(dir).unwrap();
    let spec = ConfigSpec::at(harbor, &dir.join("state"))
        .with_fixed_ports()
        .target(TargetSpec::at("cloud", cloud).with("concurrency = 8"));
    let regtee = RegteeProcess::serve(&spec, dir, "regtee").await;
    let admin = format!("http://{}", spec.admin_addr().unwrap());
    let config = dir.join("regtee.toml");
    let sync = |args: &[&str]| regtee_cli(&config, &spec, args);
    sync(&["sync", "proj"]);
    // Wait until every queued copy is done: the re-check then finds everything in sync.
    loop {
        let (_, out) = sync(&["sync", "proj", "--dry-run"]);
        if out.contains(&format!("{TAGS} in sync")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut pids = vec![("regtee".to_string(), regtee.child.id())];
    pids.extend(processes.iter().map(|(n, p)| (n.to_string(), *p)));
    let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let logged_before: Vec<usize> = logs.iter().map(|l| lines(l).len()).collect();
    let mut runs: Vec<Duration> = (0..RUNS).map(|_| sync(&["sync", "proj"]).0).collect();
    // nginx writes its log line as each request ends: all of them have ended here.
    let logged = logs
        .iter()
        .zip(logged_before)
        .map(|(l, n)| lines(l).split_off(n))
        .collect();
    let cpu = pids
        .iter()
        .zip(before)
        .map(|((name, pid), b)| (name.clone(), (cpu_seconds(*pid) - b) * 1000.0 / RUNS as f64))
        .collect();
    runs.sort();
    let started = Instant::now();
    let done = backfill(&client(), &admin, "proj").await;
    let server = started.elapsed();
    assert_eq!(done["in_sync"], TAGS, "{done}");
    Measured {
        runs,
        server,
        cpu,
        logged,
    }
}

fn report(setting: &str, m: &Measured, requests: &str) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("{setting}:");
    println!(
        "  `regtee sync proj` end to end: median {:>5.0} ms (min {:.0}, max {:.0}; {RUNS} runs)",
        ms(m.runs[m.runs.len() / 2]),
        ms(m.runs[0]),
        ms(m.runs[m.runs.len() - 1]),
    );
    println!(
        "  the backfill through the admin API:    {:>5.0} ms",
        ms(m.server)
    );
    let cpu: Vec<String> = m
        .cpu
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.0} ms"))
        .collect();
    println!("  CPU per re-check: {}", cpu.join(", "));
    println!("  requests per re-check: {requests}");
}

#[tokio::main]
async fn main() {
    regtee::tls::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let (harbor, cloud) = harbor_and_cloud(work.path()).await;
    let client = client();

    // The project: each tag its own small image, straight into Harbor.
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

    println!("in-sync re-check, {REPOSITORIES} repositories x {TAGS_PER_REPOSITORY} tags:");
    let plain = measure(
        &work.path().join("plain"),
        &harbor.url(),
        &cloud.url(),
        &[
            ("Harbor's registry", harbor.pid()),
            ("the target's", cloud.pid()),
        ],
        &[],
    )
    .await;
    // Each side: a catalog, a tag list per repository and a HEAD per tag; Harbor's API asked
    // once (404).
    report(
        "two plain registries",
        &plain,
        &format!(
            "{} (a HEAD per tag on each side, a tag list per repository, a catalog, one 404 per side for Harbor's API)",
            2 * TAGS + REPOSITORIES + 1 + 2
        ),
    );

    // Both sides Harbor: the same registries, now in sync, behind nginx with Harbor's core.
    let mut fronts = Vec::new();
    for (name, registry) in [("harbor", &harbor), ("cloud", &cloud)] {
        let core = HarborCore::start().await;
        core.snapshot(&client, &registry.url()).await;
        let port = regtee::local_registry::free_port().unwrap();
        let dir = work.path().join(format!("{name}-nginx"));
        let (nginx, worker) =
            start_nginx_with_core(&dir, port, &registry.url(), Some(core.addr), true);
        wait_listening(([127, 0, 0, 1], port).into()).await;
        fronts.push((core, nginx, worker, dir, format!("http://127.0.0.1:{port}")));
    }
    let logs: Vec<std::path::PathBuf> = fronts.iter().map(|f| f.3.join("access.log")).collect();
    let harbors = measure(
        &work.path().join("harbors"),
        &fronts[0].4,
        &fronts[1].4,
        &[
            ("Harbor's registry", harbor.pid()),
            ("the target's", cloud.pid()),
            ("Harbor's nginx", fronts[0].2),
            ("the target's nginx", fronts[1].2),
        ],
        &logs,
    )
    .await;
    let all: Vec<&String> = harbors.logged.iter().flatten().collect();
    let count = |what: &str| all.iter().filter(|l| l.contains(what)).count() as f64 / RUNS as f64;
    let (requests, heads, lists) = (
        all.len() as f64 / RUNS as f64,
        count("\"HEAD "),
        count("/artifacts?"),
    );
    report(
        "both sides Harbor (nginx, Harbor's core answering from memory)",
        &harbors,
        &format!(
            "{requests:.0} ({lists:.0} artifact lists, {heads:.0} HEADs; {:.2} per tag)",
            requests / TAGS as f64
        ),
    );
    println!(
        "regsync once (issue 25, two plain registries, a machine like this): 170 ms; the target is 85 ms"
    );
    drop(fronts);
}
