//! Push mirroring: every push Harbor accepts reaches the targets, digests and bytes equal.

use std::time::Duration;

use regtee::oci::digest::Digest;

use crate::support::layout::{self, Layout, Written};
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_content_reaches_the_target_with_equal_digests_and_bytes() {
    let world = World::start(
        &["prod-lib", "team"],
        &["namespaces = { library = \"prod-lib\" }"],
    )
    .await;
    let (cloud, regtee) = (&world.cloud, &world.regtee);
    let mut layout = world.layout();
    let image = layout.image(&[400_000, 90_000, 1_500_000], "amd64");
    let index = layout.multi_arch(&[60_000, 25_000]);
    let chart = layout.helm_chart();
    let signature = layout.artifact_for(&image);
    for (m, name) in [
        (&image, "image"),
        (&index, "index"),
        (&chart, "chart"),
        (&signature, "sig"),
    ] {
        layout.tag(m, name);
    }
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    for (name, manifest, repo, tag, target_repo) in [
        ("image", &image, "library/app", "1.0", "prod-lib/app"),
        ("index", &index, "library/multi", "1.0", "prod-lib/multi"),
        (
            "chart",
            &chart,
            "team/charts/demo",
            "0.1.0",
            "team/charts/demo",
        ),
        ("sig", &signature, "library/app", "sig", "prod-lib/app"),
    ] {
        push_layout_ok(
            &layout.dir,
            name,
            &regtee.host(),
            &format!("{repo}:{tag}"),
            Tls::Off,
        );
        wait_for_manifest(&target, target_repo, tag, &manifest.digest).await;
        let copied = target
            .get_manifest(target_repo, tag)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &copied.bytes[..],
            &manifest.bytes[..],
            "{target_repo}:{tag} bytes"
        );
        assert_eq!(copied.media_type, manifest.media_type);
        assert_blobs_equal(&target, target_repo, &layout, manifest).await;
    }
    // The index's children are there, by digest, with their blobs.
    let refs = regtee::oci::manifest::references(&index.bytes, None).unwrap();
    for child in &refs.children {
        let head = target
            .manifest_head("prod-lib/multi", &child.digest)
            .await
            .unwrap();
        assert_eq!(head.unwrap().digest.as_str(), child.digest);
    }
    // distribution 2.8 has no referrers API, so regtee keeps the spec's referrers tag there.
    let subject: Digest = image.digest.parse().unwrap();
    let referrers = target
        .get_manifest(
            "prod-lib/app",
            &regtee::oci::manifest::referrers_tag(&subject),
        )
        .await
        .unwrap()
        .expect("referrers tag index on the target");
    assert!(regtee::oci::manifest::index_lists(
        &referrers.bytes,
        &signature.digest
    ));
    let v: serde_json::Value = serde_json::from_slice(&referrers.bytes).unwrap();
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.signature.v1"
    );
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_are_copied_as_soon_as_their_upload_completes() {
    let world = World::start(&["library"], &[]).await;
    let (cloud, regtee) = (&world.cloud, &world.regtee);
    let through = client_for(
        &format!("http://{}", regtee.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    let blob = layout::random_bytes(300_000);
    let digest = Digest::sha256_of(&blob);
    through
        .upload_blob(
            "library/early",
            &digest,
            regtee::registry::Upload::whole(blob.into()),
        )
        .await
        .unwrap();
    // No manifest was pushed: the blob arrives on its own.
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_until(
        "the blob on the target",
        Duration::from_secs(30),
        || async {
            target
                .blob_exists("library/early", &digest)
                .await
                .unwrap()
                .filter(|n| *n == 300_000)
        },
    )
    .await;
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_whose_blobs_are_there_is_not_held_behind_other_pushes_blob_jobs() {
    // One worker, held on the first push's first layer while a second push queues its jobs.
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = crate::support::fault::FaultFront::start(&cloud.url()).await;
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()).with("concurrency = 1"));
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let held = layout.image(&[120_000], "amd64");
    let second = layout.image(&[100_000, 90_000, 80_000], "arm64");
    layout.tag(&held, "held");
    layout.tag(&second, "second");
    let held_layer: Digest = held.layers()[0].parse().unwrap();
    front.set(crate::support::fault::Fault::Hold(
        held_layer.hex().to_string(),
    ));
    push_layout_ok(
        &layout.dir,
        "held",
        &regtee.host(),
        "library/held:1",
        Tls::Off,
    );
    wait_until("the worker held", Duration::from_secs(30), || async {
        (front.held() > 0).then_some(())
    })
    .await;
    push_layout_ok(
        &layout.dir,
        "second",
        &regtee.host(),
        "library/second:1",
        Tls::Off,
    );
    front.release();
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/second",
        "1",
        &second.digest,
    )
    .await;
    let jobs = wait_until(
        "the second push's jobs done",
        Duration::from_secs(30),
        || async {
            let page = admin_get(&regtee, "/api/v1/jobs?repository=library/second").await;
            let jobs = page["jobs"].as_array()?.clone();
            (jobs.len() == 5 && jobs.iter().all(|j| j["state"] == "done")).then_some(jobs)
        },
    )
    .await;
    let mut first_attempts = Vec::new();
    for job in &jobs {
        let detail = admin_get(&regtee, &format!("/api/v1/jobs/{}", job["id"])).await;
        let started = detail["attempts"][0]["started_at"].as_i64().unwrap();
        first_attempts.push((started, job["kind"].as_str().unwrap().to_string()));
    }
    first_attempts.sort();
    assert_eq!(
        first_attempts[0].1, "manifest",
        "the manifest went before its push's queued blob jobs: {first_attempts:?}"
    );
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repository_and_tag_filters_decide_what_is_mirrored() {
    let world = World::start(
        &["library", "team"],
        &[
            "include = [\"library/**\"]",
            "exclude = [\"library/tmp-*\"]",
            "tags = [\"v*\"]",
        ],
    )
    .await;
    let (cloud, regtee) = (&world.cloud, &world.regtee);
    let mut layout = world.layout();
    let images: Vec<Written> = (0..4)
        .map(|i| layout.image(&[10_000 + i], "amd64"))
        .collect();
    for (i, m) in images.iter().enumerate() {
        layout.tag(m, &format!("i{i}"));
    }
    let pushes = [
        ("i0", "library/app:v1"),     // mirrored
        ("i1", "library/app:latest"), // tag filter
        ("i2", "library/tmp-x:v1"),   // excluded
        ("i3", "team/x:v1"),          // not included
    ];
    for (name, repo_tag) in pushes {
        push_layout_ok(&layout.dir, name, &regtee.host(), repo_tag, Tls::Off);
    }
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&target, "library/app", "v1", &images[0].digest).await;
    // Jobs are recorded before the client sees its 201, so their absence is already final.
    let jobs = admin_get(regtee, "/api/v1/jobs?limit=1000").await;
    let jobs = jobs["jobs"].as_array().unwrap();
    let manifest_jobs: Vec<_> = jobs.iter().filter(|j| j["kind"] == "manifest").collect();
    assert_eq!(manifest_jobs.len(), 1, "{manifest_jobs:?}");
    assert_eq!(manifest_jobs[0]["tag"], "v1");
    assert!(
        jobs.iter().all(|j| j["repository"] == "library/app"),
        "{jobs:?}"
    );
    assert_eq!(
        target.manifest_head("library/app", "latest").await.unwrap(),
        None
    );
    assert_eq!(
        target.manifest_head("library/tmp-x", "v1").await.unwrap(),
        None
    );
    assert_eq!(target.manifest_head("team/x", "v1").await.unwrap(), None);
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overwrite_false_leaves_a_conflicting_tag_and_records_both_digests() {
    let world = World::start(&["library"], &["overwrite = false"]).await;
    let (cloud, regtee) = (&world.cloud, &world.regtee);
    let mut layout = world.layout();
    let theirs = layout.image(&[5_000], "amd64");
    let ours = layout.image(&[6_000], "amd64");
    layout.tag(&theirs, "theirs");
    layout.tag(&ours, "ours");
    // Someone already put another image under the tag on the target.
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    regtee::local_registry::push_image(
        &target,
        "library/app",
        "v1",
        &sample_from(&layout, &theirs),
    )
    .await
    .unwrap();
    push_layout_ok(
        &layout.dir,
        "ours",
        &regtee.host(),
        "library/app:v1",
        Tls::Off,
    );
    let job = wait_until(
        "the manifest job to be skipped",
        Duration::from_secs(30),
        || async {
            let page = admin_get(regtee, "/api/v1/jobs?state=skipped").await;
            page["jobs"].as_array().unwrap().first().cloned()
        },
    )
    .await;
    let detail = job["detail"].as_str().unwrap();
    assert!(detail.starts_with("exists:"), "{detail}");
    assert!(
        detail.contains(&theirs.digest) && detail.contains(&ours.digest),
        "{detail}"
    );
    let head = target
        .manifest_head("library/app", "v1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        head.digest.as_str(),
        theirs.digest,
        "the target's tag was left alone"
    );
    world.regtee.stop().await;
}

/// Turns a layout image into something `push_image` can push.
fn sample_from(layout: &Layout, manifest: &Written) -> regtee::local_registry::SampleImage {
    let refs = regtee::oci::manifest::references(&manifest.bytes, None).unwrap();
    let read = |d: &str| {
        bytes::Bytes::from(
            std::fs::read(
                layout
                    .dir
                    .join("blobs/sha256")
                    .join(d.trim_start_matches("sha256:")),
            )
            .unwrap(),
        )
    };
    regtee::local_registry::SampleImage {
        config: read(&refs.blobs[0].digest),
        layers: refs.blobs[1..].iter().map(|b| read(&b.digest)).collect(),
        manifest: bytes::Bytes::from(manifest.bytes.clone()),
        digest: manifest.digest.parse().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_targets_one_down_during_the_push_both_end_in_sync() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let up = start_cloud(&work.path().join("up"), &["library"]).await;
    let mut down = start_cloud(&work.path().join("down"), &["library"]).await;
    down.registry.stop();
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("up", &up))
        // The second target also takes blobs in chunks, as some clouds require.
        .target(TargetSpec::cloud("down", &down).with("upload_chunk_size = 100000"));
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[350_000, 120_000], "amd64");
    layout.tag(&image, "x");
    push_layout_ok(
        &layout.dir,
        "x",
        &regtee.host(),
        "library/app:2.0",
        Tls::Off,
    );
    let up_client = up.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&up_client, "library/app", "2.0", &image.digest).await;
    // The down target's jobs wait and retry, each saying why: its registry is unreachable.
    let waiting = wait_until(
        "the down target's jobs to retry as unreachable",
        Duration::from_secs(30),
        || async {
            let page = admin_get(&regtee, "/api/v1/jobs?target=down").await;
            let jobs = page["jobs"].as_array().unwrap().clone();
            let retried = !jobs.is_empty()
                && jobs
                    .iter()
                    .all(|j| j["state"] == "pending" && j["error_class"] == "unreachable");
            retried.then_some(jobs)
        },
    )
    .await;
    assert!(
        waiting.iter().any(|j| j["kind"] == "manifest"),
        "{waiting:?}"
    );
    down.registry.restart().await.unwrap();
    let down_client = down.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&down_client, "library/app", "2.0", &image.digest).await;
    assert_blobs_equal(&down_client, "library/app", &layout, &image).await;
    assert_blobs_equal(&up_client, "library/app", &layout, &image).await;
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_pushes_and_during_mirroring_loses_no_acknowledged_push() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    // The cloud is down while pushes happen, so jobs pile up and mirroring is caught mid-way.
    cloud.registry.stop();
    let port = regtee::local_registry::free_port().unwrap();
    let admin_port = regtee::local_registry::free_port().unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud).with("concurrency = 1"));
    spec.listen = format!("127.0.0.1:{port}");
    spec.admin = Some(format!("127.0.0.1:{admin_port}"));
    let config = spec.write(&work.path().join("regtee.toml"));
    let log = work.path().join("regtee.log");
    let host = format!("127.0.0.1:{port}");
    let mut layout = Layout::new(&work.path().join("layout"));
    let images: Vec<Written> = (0..10)
        .map(|_| layout.image(&[400_000, 200_000], "amd64"))
        .collect();
    for (i, m) in images.iter().enumerate() {
        layout.tag(m, &format!("i{i}"));
    }

    let mut regtee = RegteeProcess::spawn(&config, &spec, &log);
    wait_listening(host.parse().unwrap()).await;
    // Push from another thread; kill regtee once three pushes have succeeded.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pusher = {
        let (dir, host) = (layout.dir.clone(), host.clone());
        std::thread::spawn(move || {
            for i in 0..10 {
                let ok = push_layout(
                    &dir,
                    &format!("i{i}"),
                    &host,
                    &format!("library/app:i{i}"),
                    Tls::Off,
                )
                .status
                .success();
                let _ = tx.send((i, ok));
            }
        })
    };
    let mut acknowledged = Vec::new();
    while let Some((i, ok)) = rx.recv().await {
        if ok {
            acknowledged.push(i);
        }
        if acknowledged.len() == 3 {
            regtee.kill9();
            break;
        }
    }
    while let Some((i, ok)) = rx.recv().await {
        if ok {
            acknowledged.push(i);
        }
    }
    pusher.join().unwrap();
    assert!(acknowledged.len() >= 3, "{acknowledged:?}");

    // Back up: push what did not make it, then let mirroring start and kill it mid-way.
    let mut regtee = RegteeProcess::spawn(&config, &spec, &log);
    wait_listening(host.parse().unwrap()).await;
    let missing: Vec<usize> = (0..10).filter(|i| !acknowledged.contains(i)).collect();
    for i in missing {
        push_layout_ok(
            &layout.dir,
            &format!("i{i}"),
            &host,
            &format!("library/app:i{i}"),
            Tls::Off,
        );
        acknowledged.push(i);
    }
    cloud.registry.restart().await.unwrap();
    let status_url = format!("http://127.0.0.1:{admin_port}/api/v1/status");
    wait_until(
        "mirroring to be under way",
        Duration::from_secs(60),
        || async {
            let (_, body) = http_request(&status_url, "GET", None, &[]).await;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let t = &v["targets"][0];
            let (done, left) = (
                t["done"].as_u64()?,
                t["pending"].as_u64()? + t["running"].as_u64()?,
            );
            (done >= 3 && left > 0).then_some(())
        },
    )
    .await;
    regtee.kill9();

    let _regtee = RegteeProcess::spawn(&config, &spec, &log);
    wait_listening(host.parse().unwrap()).await;
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    for i in acknowledged {
        wait_for_manifest(&target, "library/app", &format!("i{i}"), &images[i].digest).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_with_basic_auth_gets_the_push_too() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let basic =
        start_basic_auth_registry(&work.path().join("basic"), CLOUD_USER, CLOUD_PASSWORD).await;
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("acr", &basic.url()));
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[80_000, 9_000], "amd64");
    layout.tag(&image, "x");
    push_layout_ok(
        &layout.dir,
        "x",
        &regtee.host(),
        "library/basic:1",
        Tls::Off,
    );
    let target = client_for(&basic.url(), Some((CLOUD_USER, CLOUD_PASSWORD)));
    wait_for_manifest(&target, "library/basic", "1", &image.digest).await;
    assert_blobs_equal(&target, "library/basic", &layout, &image).await;
    regtee.stop().await;

    // With a wrong password the job fails at once, as a credentials failure: not a retry loop.
    let mut wrong = ConfigSpec::new(&harbor, &work.path().join("state-wrong"))
        .target(TargetSpec::at("acr", &basic.url()));
    wrong.cloud_password = "wrong".into();
    let regtee = Regtee::start(&wrong).await;
    push_layout_ok(
        &layout.dir,
        "x",
        &regtee.host(),
        "library/basic:2",
        Tls::Off,
    );
    let failed = wait_until("the job to fail", Duration::from_secs(30), || async {
        let page = admin_get(
            &regtee,
            "/api/v1/jobs?state=failed&repository=library/basic",
        )
        .await;
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "manifest")
            .cloned()
    })
    .await;
    assert_eq!(failed["error_class"], "auth", "{failed}");
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("password(_env/_file) in [[targets]] \"acr\""),
        "{failed}"
    );
    regtee.stop().await;
}
