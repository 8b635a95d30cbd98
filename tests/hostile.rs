//! Hostile input and faults, each from a hostile test run against an earlier regtee: a push a
//! client saw succeed is never lost, a secret is never printed, and nothing hangs or spins.

use std::time::Duration;

use regtee::local_registry::{push_blobs, sample_image};

use crate::support::disk::SmallDisk;
use crate::support::fault::{Fault, FaultFront};
use crate::support::layout::Layout;
use crate::support::*;

/// `PUT <base><path>` of a manifest with a bearer token, the path sent exactly as given.
async fn put_manifest_raw(base: &str, path: &str, token: &str, manifest: &[u8]) -> (u16, String) {
    http_request(
        &format!("{base}{path}"),
        "PUT",
        Some(manifest.to_vec()),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/vnd.oci.image.manifest.v1+json"),
        ],
    )
    .await
}

/// The first attempt at a job of `repository` whose detail contains `needle`.
async fn attempt_saying(
    regtee: &Regtee,
    repository: &str,
    needle: &str,
) -> Option<serde_json::Value> {
    for job in jobs_of(regtee, repository).await {
        let id = job["id"].as_i64()?;
        let detail = admin_get(regtee, &format!("/api/v1/jobs/{id}")).await;
        if let Some(a) = detail["attempts"]
            .as_array()?
            .iter()
            .find(|a| a["detail"].as_str().unwrap_or("").contains(needle))
        {
            return Some(a.clone());
        }
    }
    None
}

async fn jobs_of(regtee: &Regtee, repository: &str) -> Vec<serde_json::Value> {
    admin_get(regtee, &format!("/api/v1/jobs?repository={repository}")).await["jobs"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn percent_encoded_names_pass_the_same_filters_as_their_plain_spelling() {
    let world = World::start(
        &["prod-lib"],
        &[
            "namespaces = { library = \"prod-lib\" }",
            "tags = [\"v*\"]",
            "exclude = [\"library/private-*\"]",
        ],
    )
    .await;
    let base = format!("http://{}", world.regtee.host());
    let through = client_for(&base, Some((DEV_USER, DEV_PASSWORD)));
    let harbor = world.harbor.client(ADMIN_USER, ADMIN_PASSWORD);
    let target = world.target();
    let image = sample_image(&[10_000]);
    for repo in ["library/enc", "library/private-x"] {
        push_blobs(&through, repo, &image).await.unwrap();
    }
    let token = world
        .harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &[
                "repository:library/enc:pull,push",
                "repository:library/private-x:pull,push",
            ],
        )
        .await;

    // `librar%79/enc` is stored by Harbor as library/enc, `%76%31` as v1: the tag filter and
    // the namespace mapping apply as to the plain spelling.
    let (status, body) = put_manifest_raw(
        &base,
        "/v2/librar%79/enc/manifests/%76%31",
        &token,
        &image.manifest,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let stored = harbor
        .manifest_head("library/enc", "v1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.digest, image.digest);
    wait_for_manifest(&target, "prod-lib/enc", "v1", image.digest.as_str()).await;

    // `library%2Fprivate-x` is library/private-x, which the target excludes.
    let (status, body) = put_manifest_raw(
        &base,
        "/v2/library%2Fprivate-x/manifests/v1",
        &token,
        &image.manifest,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        harbor
            .manifest_head("library/private-x", "v1")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        jobs_of(&world.regtee, "library/private-x")
            .await
            .iter()
            .all(|j| j["kind"] != "manifest"),
        "an excluded repository gets no manifest job, however it is spelled"
    );

    // Spellings that Harbor's front would clean up into another name are refused outright.
    for path in [
        "/v2/other/../library/sneaky/manifests/v1",
        "/v2/library//sneaky/manifests/v1",
        "/v2/library/Sneaky/manifests/v1",
        "/v2/lib%20rary/sneaky/manifests/v1",
    ] {
        let (status, body) = put_manifest_raw(&base, path, &token, &image.manifest).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("NAME_INVALID"), "{path}: {body}");
    }
    assert!(
        harbor
            .manifest_head("library/sneaky", "v1")
            .await
            .unwrap()
            .is_none()
    );
    let (status, body) = put_manifest_raw(
        &base,
        "/v2/library/enc/manifests/v%201",
        &token,
        &image.manifest,
    )
    .await;
    assert_eq!(
        (status, body.contains("TAG_INVALID")),
        (400, true),
        "{body}"
    );
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_from_webhooks_the_api_the_cli_or_the_queue_stop_nothing() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let state = work.path().join("state");
    let mut spec = ConfigSpec::new(&harbor, &state).target(TargetSpec::cloud("tcr", &cloud));
    spec.webhook_secret = Some("hook-secret".into());
    // A queue that holds a job no valid push could make (an older regtee, a hand edit).
    {
        Regtee::start(&spec).await.stop().await;
        let db = rusqlite::Connection::open(state.join("jobs.db")).unwrap();
        db.execute(
            "INSERT INTO jobs (target, kind, repository, tag, digest, origin, state, created_at, \
             updated_at, next_attempt_at) VALUES ('tcr', 'manifest', 'library/has space', 'v1', '', \
             'push', 'running', 0, 0, 0)",
            [],
        )
        .unwrap();
    }
    let regtee = Regtee::start(&spec).await;
    let poison = wait_until("the bad job to fail", Duration::from_secs(30), || async {
        let page = admin_get(&regtee, "/api/v1/jobs?state=failed").await;
        page["jobs"].as_array().unwrap().first().cloned()
    })
    .await;
    assert_eq!(poison["error_class"], "invalid", "{poison}");
    assert!(
        poison["detail"]
            .as_str()
            .unwrap()
            .contains("not a repository name"),
        "{poison}"
    );

    // A Harbor webhook naming it: refused, nothing queued.
    let hook = |name: &str| {
        format!(
            r#"{{"type":"PUSH_ARTIFACT","event_data":{{"resources":[{{"tag":"v1"}}],"repository":{{"repo_full_name":"{name}"}}}}}}"#
        )
    };
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/webhooks/harbor"),
        "POST",
        Some(hook("library/has space").into_bytes()),
        &[("authorization", "hook-secret")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a repository name"), "{body}");

    // A backfill of a project that is no project: refused at once, not `running` forever.
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/backfills"),
        "POST",
        Some(br#"{"project": "lib rary"}"#.to_vec()),
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let config = spec.write(&work.path().join("regtee.toml"));
    let out = regtee_cli(&config, &spec, &["sync", "lib rary"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "not a project name");

    // Everything else goes on: a push is mirrored, and regtee is ready.
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[5_000], "amd64");
    layout.tag(&image, "i");
    push_layout_ok(&layout.dir, "i", &regtee.host(), "library/fine:1", Tls::Off);
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/fine",
        "1",
        &image.digest,
    )
    .await;
    let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!(status, 200, "{body}");
    regtee.stop().await;

    // And after a restart, the same.
    let regtee = Regtee::start(&spec).await;
    let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!(status, 200, "{body}");
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_on_the_target_never_moves_behind_harbors() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()));
    let regtee = Regtee::start(&spec).await;
    let base = format!("http://{}", regtee.host());
    let through = client_for(&base, Some((DEV_USER, DEV_PASSWORD)));
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    let (a, c) = (sample_image(&[20_000]), sample_image(&[30_000]));

    // A's copy to the target is held up on its layer; meanwhile C takes the tag in Harbor and
    // reaches the target. When A's copy resumes, Harbor's tag is C: A is stored by digest only.
    let a_layer = regtee::oci::digest::Digest::sha256_of(&a.layers[0]);
    front.set(Fault::Hold(a_layer.hex().to_string()));
    regtee::local_registry::push_image(&through, "library/race", "v1", &a)
        .await
        .unwrap();
    regtee::local_registry::push_image(&through, "library/race", "v1", &c)
        .await
        .unwrap();
    wait_for_manifest(&target, "library/race", "v1", c.digest.as_str()).await;
    front.release();
    let a_job = wait_until("A's job to finish", Duration::from_secs(30), || async {
        jobs_of(&regtee, "library/race")
            .await
            .into_iter()
            .find(|j| {
                j["kind"] == "manifest" && j["digest"] == a.digest.as_str() && j["state"] == "done"
            })
    })
    .await;
    assert!(
        a_job["detail"].as_str().unwrap().contains("moved on"),
        "{a_job}"
    );
    let on_target = target
        .manifest_head("library/race", "v1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(on_target.digest, c.digest, "the target's tag is Harbor's");
    assert!(
        target
            .manifest_head("library/race", a.digest.as_str())
            .await
            .unwrap()
            .is_some(),
        "A is there by digest"
    );

    // The same write arriving while its job runs re-arms it: it runs once more.
    let d = sample_image(&[40_000]);
    front.set(Fault::Hold(
        regtee::oci::digest::Digest::sha256_of(&d.layers[0])
            .hex()
            .to_string(),
    ));
    regtee::local_registry::push_image(&through, "library/again", "v1", &d)
        .await
        .unwrap();
    let running = wait_until("D's job to run", Duration::from_secs(30), || async {
        jobs_of(&regtee, "library/again")
            .await
            .into_iter()
            .find(|j| j["kind"] == "manifest" && j["state"] == "running")
    })
    .await;
    regtee::local_registry::push_image(&through, "library/again", "v1", &d)
        .await
        .unwrap();
    front.release();
    let id = running["id"].as_i64().unwrap();
    let detail = wait_until(
        "D's job to finish twice",
        Duration::from_secs(30),
        || async {
            let detail = admin_get(&regtee, &format!("/api/v1/jobs/{id}")).await;
            (detail["job"]["state"] == "done").then_some(detail)
        },
    )
    .await;
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 2, "{detail}");
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_a_target_echoes_back_never_reach_the_log_the_queue_or_the_api() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let basic =
        start_basic_auth_registry(&work.path().join("basic"), CLOUD_USER, CLOUD_PASSWORD).await;
    let token_front = FaultFront::start(&cloud.url()).await;
    let basic_front = FaultFront::start(&basic.url()).await;
    for f in [&token_front, &basic_front] {
        f.set(Fault::EchoAuthorization);
    }
    let port = regtee::local_registry::free_port().unwrap();
    let admin = regtee::local_registry::free_port().unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &token_front.url()))
        .target(TargetSpec::at("acr", &basic_front.url()));
    spec.listen = format!("127.0.0.1:{port}");
    spec.admin = Some(format!("127.0.0.1:{admin}"));
    let config = spec.write(&work.path().join("regtee.toml"));
    let mut process = RegteeProcess::spawn(&config, &spec, &work.path().join("regtee.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[8_000], "amd64");
    layout.tag(&image, "i");
    push_layout_ok(
        &layout.dir,
        "i",
        &format!("127.0.0.1:{port}"),
        "library/echo:1",
        Tls::Off,
    );

    let admin_url = |path: &str| format!("http://127.0.0.1:{admin}{path}");
    let jobs = wait_until(
        "retries on both targets",
        Duration::from_secs(30),
        || async {
            let (_, body) = http_request(&admin_url("/api/v1/jobs"), "GET", None, &[]).await;
            let page: serde_json::Value = serde_json::from_str(&body).unwrap();
            let echoed = page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| j["detail"].as_str().unwrap_or("").contains("Authorization"))
                .count();
            (echoed >= 2).then_some(body)
        },
    )
    .await;
    use base64::Engine as _;
    let basic_token =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLOUD_USER}:{CLOUD_PASSWORD}"));
    let (_, status) = http_request(&admin_url("/api/v1/status"), "GET", None, &[]).await;
    let cli = text(&regtee_cli(&config, &spec, &["jobs"]));
    process.kill9();
    let log = process.log_text();
    for (what, text) in [
        ("jobs API", &jobs),
        ("status API", &status),
        ("regtee jobs", &cli),
        ("log", &log),
    ] {
        // Retrying jobs show the echo (scrubbed); the status lists only failed ones.
        assert!(
            what == "status API" || text.contains("<redacted>"),
            "{what} shows the echo, scrubbed:\n{text}"
        );
        for secret in [
            CLOUD_PASSWORD,
            basic_token.as_str(),
            "Bearer ey",
            "Basic dG",
        ] {
            assert!(!text.contains(secret), "{what} shows `{secret}`:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_transfers_are_cut_and_retried_in_both_directions() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let harbor_front = FaultFront::start(&harbor.url()).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let cloud_front = FaultFront::start(&cloud.url()).await;
    let mut spec = ConfigSpec::at(&harbor_front.url(), &work.path().join("state")).target(
        TargetSpec::at("tcr", &cloud_front.url())
            // A small upload stalled in the same way is fully sent: then the answer that
            // never comes is what times out.
            .with("idle_timeout = \"1s\"\nresponse_timeout = \"2s\""),
    );
    spec.upstream_extra = "idle_timeout = \"1s\"\n".into();
    spec.proxy_extra = "body_idle_timeout = \"1s\"\n".into();
    let regtee = Regtee::start(&spec).await;
    let through = client_for(
        &format!("http://{}", regtee.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);

    // A target that stops reading the upload.
    // (Large enough that socket buffers cannot take it all: the writes must pend.)
    cloud_front.set(Fault::StallUploads { after: 100_000 });
    let image = sample_image(&[32 << 20]);
    regtee::local_registry::push_image(&through, "library/stall", "1", &image)
        .await
        .unwrap();
    let retried = wait_until("a retry after the stall", Duration::from_secs(30), || {
        attempt_saying(&regtee, "library/stall", "read nothing for 1s")
    })
    .await;
    assert_eq!(retried["result"], "retry", "{retried}");
    cloud_front.set(Fault::None);
    wait_for_manifest(&target, "library/stall", "1", image.digest.as_str()).await;

    // Harbor stalling mid-blob while regtee reads it back.
    harbor_front.set(Fault::StallDownloads { after: 50_000 });
    let image = sample_image(&[1_500_000]);
    let direct = harbor.client(DEV_USER, DEV_PASSWORD);
    regtee::local_registry::push_image(&direct, "library/slow-harbor", "1", &image)
        .await
        .unwrap();
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/backfills"),
        "POST",
        Some(br#"{"project": "library"}"#.to_vec()),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    wait_until(
        "a retry after Harbor stalled",
        Duration::from_secs(30),
        || attempt_saying(&regtee, "library/slow-harbor", "no progress for 1s"),
    )
    .await;
    harbor_front.set(Fault::None);
    wait_for_manifest(&target, "library/slow-harbor", "1", image.digest.as_str()).await;

    // Harbor sending a listing's headers and then nothing: the re-check gives up on it after
    // idle_timeout and ends, saying so, instead of waiting for ever.
    harbor_front.set(Fault::StallDownloads { after: 0 });
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/backfills"),
        "POST",
        Some(br#"{"project": "library", "dry_run": true}"#.to_vec()),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    let ended = admin_get(&regtee, &format!("/api/v1/backfills/{id}?wait=20")).await;
    assert_eq!(ended["state"], "failed", "{ended}");
    assert!(
        ended["errors"].to_string().contains("no progress for 1s"),
        "{ended}"
    );
    harbor_front.set(Fault::None);

    // A client that stops reading a response is cut too (it would hold a Harbor connection).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let big = sample_image(&[32 << 20]);
    regtee::local_registry::push_image(&direct, "library/big", "1", &big)
        .await
        .unwrap();
    let layer = regtee::oci::digest::Digest::sha256_of(&big.layers[0]);
    let token = harbor
        .token(DEV_USER, DEV_PASSWORD, &["repository:library/big:pull"])
        .await;
    let mut stream = tokio::net::TcpStream::connect(regtee.http).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /v2/library/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The client reads nothing; regtee gives up on it once a write has pended for
    // body_idle_timeout, and the request is counted as finished.
    wait_until(
        "regtee to cut the silent client",
        Duration::from_secs(30),
        || async {
            let (_, metrics) = http_request(&regtee.admin_url("/metrics"), "GET", None, &[]).await;
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("regtee_proxy_requests_total")
                        && l.contains("route=\"blob\"")
                        && l.contains("method=\"GET\"")
                })
                .then_some(())
        },
    )
    .await;
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received).await;
    assert!(
        received.len() < big.layers[0].len(),
        "the answer was cut: {} of {} bytes",
        received.len(),
        big.layers[0].len()
    );
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_chunk_minimum_is_refused_and_chunks_stream_in_bounded_memory() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    front.set(Fault::ChunkMinLength(1 << 30));
    let port = regtee::local_registry::free_port().unwrap();
    let admin = regtee::local_registry::free_port().unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()).with("max_chunk_size = 134217728"));
    spec.listen = format!("127.0.0.1:{port}");
    spec.admin = Some(format!("127.0.0.1:{admin}"));
    let config = spec.write(&work.path().join("regtee.toml"));
    let process = RegteeProcess::spawn(&config, &spec, &work.path().join("regtee.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let host = format!("127.0.0.1:{port}");
    let through = client_for(&format!("http://{host}"), Some((DEV_USER, DEV_PASSWORD)));

    let small = sample_image(&[10_000]);
    regtee::local_registry::push_image(&through, "library/chunky", "1", &small)
        .await
        .unwrap();
    let admin_url = format!("http://127.0.0.1:{admin}/api/v1/jobs?state=failed");
    let failed = wait_until(
        "the job to fail on the chunk size",
        Duration::from_secs(30),
        || async {
            let (_, body) = http_request(&admin_url, "GET", None, &[]).await;
            let page: serde_json::Value = serde_json::from_str(&body).unwrap();
            page["jobs"].as_array().unwrap().first().cloned()
        },
    )
    .await;
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("OCI-Chunk-Min-Length") && detail.contains("max_chunk_size"),
        "{failed}"
    );

    // 64 MiB chunks asked for, a 150 MiB layer: streamed chunk by chunk, so regtee's memory
    // does not grow with the chunk.
    front.set(Fault::ChunkMinLength(64 << 20));
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[150 << 20], "amd64");
    layout.tag(&image, "big");
    push_layout_ok(&layout.dir, "big", &host, "library/big:1", Tls::Off);
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/big",
        "1",
        &image.digest,
    )
    .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib < 48 * 1024,
        "peak RSS {peak_kib} KiB while 64 MiB chunks streamed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_state_disk_refuses_pushes_and_parks_workers_without_spinning() {
    let work = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&work.path().join("state"), "2m");
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    let spec = ConfigSpec::new(&harbor, &disk.0).target(TargetSpec::at("tcr", &front.url()));
    let regtee = Regtee::start(&spec).await;
    let through = client_for(
        &format!("http://{}", regtee.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);

    // A push is recorded while the target is held up; then the disk fills.
    let held = sample_image(&[5_000]);
    front.set(Fault::Hold(
        regtee::oci::digest::Digest::sha256_of(&held.layers[0])
            .hex()
            .to_string(),
    ));
    regtee::local_registry::push_image(&through, "library/full", "1", &held)
        .await
        .unwrap();
    // Every job of the push claimed first: a claim is a write, and one racing the fill would
    // leave the manifest unclaimed until space comes back (the test saw that in CI).
    wait_until(
        "the push's jobs in hand",
        Duration::from_secs(30),
        || async {
            let jobs = jobs_of(&regtee, "library/full").await;
            (!jobs.is_empty() && jobs.iter().all(|j| j["state"] != "pending")).then_some(())
        },
    )
    .await;
    disk.fill();

    // A new push: Harbor takes it, regtee cannot record it, the client is told to retry.
    let later = sample_image(&[6_000]);
    let refused = regtee::local_registry::push_image(&through, "library/later", "1", &later).await;
    let e = refused.unwrap_err().to_string();
    assert!(e.contains("503") || e.contains("retry"), "{e}");

    // The held copy finishes, but its outcome cannot be recorded: the worker waits, not spins.
    front.release();
    wait_for_manifest(&target, "library/full", "1", held.digest.as_str()).await;
    let (status, body) = wait_until("readyz to say so", Duration::from_secs(30), || async {
        let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let before = front.requests();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = front.requests() - before;
    assert!(
        during < 20,
        "{during} requests to the target in 3 s with a full disk"
    );

    // Space again: the outcome is recorded, the refused push goes through when retried.
    disk.free();
    wait_until("readyz to recover", Duration::from_secs(60), || async {
        let (status, _) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
        (status == 200).then_some(())
    })
    .await;
    regtee::local_registry::push_image(&through, "library/later", "1", &later)
        .await
        .unwrap();
    wait_for_manifest(&target, "library/later", "1", later.digest.as_str()).await;
    let jobs = jobs_of(&regtee, "library/full").await;
    assert!(jobs.iter().all(|j| j["state"] == "done"), "{jobs:?}");
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_queue_database_and_a_deleted_lock_are_noticed() {
    let world = World::start(&["library"], &[]).await;
    let state = world.work.path().join("state");
    // The lock is on the directory: removing files in it does not let a second server in.
    let _ = std::fs::remove_file(state.join("regtee.lock"));
    let second = regtee::Instance::start(ConfigSpec::new(&world.harbor, &state).parse()).await;
    assert!(
        matches!(second, Err(regtee::StartError::Lock(_))),
        "a second server must not start"
    );

    for f in ["jobs.db", "jobs.db-wal", "jobs.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let (status, body) = http_request(&world.regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("deleted"), "{body}");
    // A push Harbor accepts now could not be kept: the client is told to retry.
    let through = client_for(
        &format!("http://{}", world.regtee.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    let refused =
        regtee::local_registry::push_image(&through, "library/lost", "1", &sample_image(&[1_000]))
            .await;
    assert!(refused.unwrap_err().to_string().contains("503"));
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_header_steers_the_urls_harbor_builds_and_options_asterisk_is_answered() {
    let world = World::start(&["library"], &[]).await;
    let token = world
        .harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/steer:pull,push"],
        )
        .await;
    let host = world.regtee.host();
    let client = raw_http_client(None, true);
    let request = http::Request::post(format!("http://{host}/v2/library/steer/blobs/uploads/"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-forwarded-host", "evil.example.net")
        .header("forwarded", "host=evil.example.net;proto=https")
        .body(regtee::body::empty())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap();
    assert!(
        location.starts_with(&format!("http://{host}/v2/library/steer/blobs/uploads/")),
        "{location}"
    );

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(world.regtee.http)
        .await
        .unwrap();
    stream
        .write_all(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("allow: get, head"),
        "{answer}"
    );
    let log = world.harbor.front.as_ref().unwrap().access_log();
    assert!(
        !log.contains("OPTIONS"),
        "OPTIONS * never reached Harbor: {log}"
    );
    world.regtee.stop().await;
}
