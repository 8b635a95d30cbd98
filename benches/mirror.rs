//! The mirror side, against skopeo in the same run (Harbor and the cloud are local
//! docker-registry instances):
//!
//! - mirror lag: from the 201 of the manifest PUT a client sees until the manifest is pullable on
//!   the target, for an image of 20 x 5 MiB layers pushed through regtee, vs `skopeo copy` of the
//!   same image from Harbor to the target after the fact;
//! - one 1 GiB layer: a backfill copying it Harbor -> cloud vs `skopeo copy`;
//! - an already-mirrored project of 200 tags: a backfill (HEAD only) vs `skopeo sync`.
//!
//! Run: `cargo bench --bench mirror`

mod common;

use std::time::{Duration, Instant};

use common::*;
use regtee::local_registry::{anonymous_client, sample_image};

#[tokio::main]
async fn main() {
    regtee::tls::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let (harbor, cloud) = harbor_and_cloud(work.path()).await;
    let spec = ConfigSpec::at(&harbor.url(), &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::at("cloud", &cloud.url()).with("concurrency = 4"));
    let _regtee = RegteeProcess::serve(&spec, work.path(), "regtee").await;
    let port = spec.listen_addr().port();
    let admin = format!("http://{}", spec.admin_addr().unwrap());
    let through = anonymous_client("regtee", &format!("http://127.0.0.1:{port}")).unwrap();
    let cloud_client = anonymous_client("cloud", &cloud.url()).unwrap();

    println!(
        "regtee mirror bench: image of 20 x 5 MiB layers, Harbor and cloud are local docker-registry instances\n"
    );
    let image = sample_image(&[5 * 1024 * 1024; 20]);
    let push_started = Instant::now();
    regtee::local_registry::push_image(&through, "library/big", "1.0", &image)
        .await
        .unwrap();
    let acknowledged = Instant::now();
    let push_time = acknowledged - push_started;
    wait_for_manifest(&cloud_client, "library/big", "1.0", &image.digest).await;
    let lag = acknowledged.elapsed();

    let skopeo_time = skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        &format!("docker://{}/library/big:1.0", harbor.addr()),
        &format!("docker://{}/after/big:1.0", cloud.addr()),
    ]);

    println!(
        "push through regtee (client's view):             {:>8.0} ms",
        push_time.as_secs_f64() * 1000.0
    );
    println!(
        "mirror lag (manifest 201 -> pullable on cloud):  {:>8.0} ms",
        lag.as_secs_f64() * 1000.0
    );
    println!(
        "skopeo copy Harbor -> cloud after the fact:      {:>8.0} ms   (lag / skopeo {:.3})",
        skopeo_time.as_secs_f64() * 1000.0,
        lag.as_secs_f64() / skopeo_time.as_secs_f64()
    );

    // One 1 GiB layer already in Harbor: a backfill copies it, then skopeo does.
    let client = client();
    let chunk = random_chunk(1024 * 1024);
    let layer = repeated_digest(&chunk, 1024);
    upload(&client, &harbor.url(), "bulk/gib", &chunk, 1024, &layer).await;
    let gib_image = put_image(&client, &harbor.url(), "bulk/gib", "1", &[(layer, 1 << 30)]).await;
    let started = Instant::now();
    let done = backfill(&client, &admin, "bulk").await;
    assert_eq!(done["queued"], 1, "{done}");
    wait_for_manifest(&cloud_client, "bulk/gib", "1", &gib_image).await;
    let regtee_gib = started.elapsed();
    let skopeo_gib = skopeo(&[
        "copy",
        "--preserve-digests",
        &format!("docker://{}/bulk/gib:1", harbor.addr()),
        &format!("docker://{}/skopeo/gib:1", cloud.addr()),
    ]);
    println!(
        "\n1 GiB layer, Harbor -> cloud: backfill {:>6.0} ms ({:.0} MiB/s), skopeo copy {:>6.0} ms ({:.0} MiB/s), skopeo / regtee {:.2}",
        regtee_gib.as_secs_f64() * 1000.0,
        mib_per_s(1 << 30, regtee_gib),
        skopeo_gib.as_secs_f64() * 1000.0,
        mib_per_s(1 << 30, skopeo_gib),
        skopeo_gib.as_secs_f64() / regtee_gib.as_secs_f64()
    );

    // A project of 200 tags, each its own small image, mirrored by skopeo sync; then both check
    // it again: regtee's backfill HEADs each tag on both sides, skopeo sync copies each image.
    const TAGS: usize = 200;
    for i in 0..TAGS {
        let blob = random_chunk(1024);
        let digest = repeated_digest(&blob, 1);
        upload(&client, &harbor.url(), "synced/app", &blob, 1, &digest).await;
        put_image(
            &client,
            &harbor.url(),
            "synced/app",
            &format!("t{i}"),
            &[(digest, 1024)],
        )
        .await;
    }
    let sync_args = [
        "sync",
        "--preserve-digests",
        "--src",
        "docker",
        "--dest",
        "docker",
        &format!("{}/synced/app", harbor.addr()),
        &format!("{}/synced", cloud.addr()),
    ];
    skopeo(&sync_args);
    let started = Instant::now();
    let done = backfill(&client, &admin, "synced").await;
    let regtee_sync = started.elapsed();
    assert_eq!(
        done["in_sync"], TAGS,
        "every tag was mirrored by skopeo sync: {done}"
    );
    assert_eq!(done["queued"], 0, "{done}");
    // The same re-check as people run it: `regtee sync` from command start to summary printed
    // (the server tells the command line when it ends; median of three).
    let config = work.path().join("regtee.toml");
    let mut cli_runs: Vec<f64> = (0..3)
        .map(|_| {
            regtee_cli(&config, &spec, &["sync", "synced"])
                .0
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    cli_runs.sort_by(f64::total_cmp);
    println!(
        "in-sync project of {TAGS} tags, `regtee sync` end to end: {:>6.0} ms (the backfill itself: {:.0} ms)",
        cli_runs[1],
        regtee_sync.as_secs_f64() * 1000.0
    );
    let skopeo_sync = skopeo(&sync_args);
    println!(
        "in-sync project of {TAGS} tags: backfill {:>6.0} ms, skopeo sync {:>6.0} ms, skopeo / regtee {:.1}",
        regtee_sync.as_secs_f64() * 1000.0,
        skopeo_sync.as_secs_f64() * 1000.0,
        skopeo_sync.as_secs_f64() / regtee_sync.as_secs_f64()
    );
}

/// Runs `skopeo` with plain HTTP on both sides; returns how long it took.
fn skopeo(args: &[&str]) -> Duration {
    forget_blob_locations();
    let mut command = std::process::Command::new("skopeo");
    command.args(["--insecure-policy"]).arg(args[0]);
    command.args(["--src-tls-verify=false", "--dest-tls-verify=false"]);
    command.args(&args[1..]);
    let started = Instant::now();
    let out = command.output().expect("skopeo is installed");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Puts an OCI manifest of `layers` (digest, size) with a small config into `repo:tag`; returns
/// its digest.
async fn put_image(
    client: &regtee::http_client::HttpClient,
    base: &str,
    repo: &str,
    tag: &str,
    layers: &[(String, u64)],
) -> regtee::oci::digest::Digest {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}"}}"#);
    let manifest = image_manifest(client, base, repo, config.into(), layers).await;
    let digest = regtee::oci::digest::Digest::sha256_of(&manifest);
    let put = http::Request::put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(regtee::body::full(manifest))
        .unwrap();
    assert_eq!(client.request(put).await.unwrap().status(), 201);
    digest
}

/// Waits until `repo:tag` on `registry` is `digest`.
async fn wait_for_manifest(
    registry: &regtee::registry::RegistryClient,
    repo: &str,
    tag: &str,
    digest: &regtee::oci::digest::Digest,
) {
    loop {
        if let Some(h) = registry.manifest_head(repo, tag).await.unwrap() {
            assert_eq!(&h.digest, digest);
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
