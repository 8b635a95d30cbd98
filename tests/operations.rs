//! Operating regtee: backfill, diff, reconcile, webhooks, metrics, the admin API and the CLI.

use std::time::Duration;

use crate::support::layout::{Layout, Written};
use crate::support::*;

/// A spec whose proxy and admin listen on fixed free ports, so the CLI can find the admin API.
fn spec_with_ports(harbor: &AuthRegistry, state: &std::path::Path) -> ConfigSpec {
    ConfigSpec::new(harbor, state).with_fixed_ports()
}

fn images(layout: &mut Layout, n: usize) -> Vec<Written> {
    (0..n)
        .map(|i| {
            let m = layout.image(&[20_000 + i, 3_000], "amd64");
            layout.tag(&m, &format!("i{i}"));
            m
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_copies_what_predates_regtee_diff_tells_and_a_second_run_queues_nothing() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["prod-lib", "other"]).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let imgs = images(&mut layout, 4);
    // Pushed straight to Harbor before regtee exists.
    let pre = [
        ("i0", "library/a:1"),
        ("i1", "library/b:1"),
        ("i2", "library/b:2"),
        ("i3", "other/c:1"),
    ];
    for (name, repo_tag) in pre {
        push_layout_ok(&layout.dir, name, &harbor.host(), repo_tag, Tls::Off);
    }
    let spec = spec_with_ports(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud).with("namespaces = { library = \"prod-lib\" }"));
    let config = spec.write(&work.path().join("regtee.toml"));

    // The cutover report sees the gap (no server needed).
    let out = regtee_cli(&config, &spec, &["diff", "library"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "MISSING");
    let out = regtee_cli(&config, &spec, &["diff", "library", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["differing"], 3);

    let regtee = Regtee::start(&spec).await;
    let out = regtee_cli(&config, &spec, &["sync", "library", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_says(&out, "3 would be queued");
    assert_eq!(
        admin_get(&regtee, "/api/v1/jobs").await["jobs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let out = regtee_cli(&config, &spec, &["sync", "library"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_says(&out, "2 repositories, 3 tags: 0 in sync, 3 queued");
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    for (i, repo, tag) in [
        (0, "prod-lib/a", "1"),
        (1, "prod-lib/b", "1"),
        (2, "prod-lib/b", "2"),
    ] {
        wait_for_manifest(&target, repo, tag, &imgs[i].digest).await;
    }
    // The other project was not part of this backfill.
    assert_eq!(target.manifest_head("other/c", "1").await.unwrap(), None);

    let out = regtee_cli(&config, &spec, &["sync", "library"]);
    assert_says(&out, "3 in sync, 0 queued");
    let out = regtee_cli(&config, &spec, &["diff", "library"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Per-repository status: every tag, Harbor's digest and the target's.
    let status = admin_get(&regtee, "/api/v1/repositories/library/b/status").await;
    let tags = status["tags"].as_array().unwrap();
    assert_eq!(tags.len(), 2);
    for t in tags {
        assert_eq!(t["targets"][0]["status"], "in_sync");
        assert_eq!(t["targets"][0]["digest"], t["harbor"]);
        assert_eq!(t["targets"][0]["repository"], "prod-lib/b");
    }
    // The same repository with its `/` escaped, as API clients often send it.
    let escaped = admin_get(&regtee, "/api/v1/repositories/library%2Fb/status").await;
    assert_eq!(escaped["repository"], "library/b");
    assert_eq!(escaped["tags"], status["tags"]);
    let (code, body) = http_request(
        &regtee.admin_url("/api/v1/repositories/lib%20rary/status"),
        "GET",
        None,
        &[],
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a repository name"), "{body}");
    // Job history is queryable per project.
    let jobs = admin_get(&regtee, "/api/v1/jobs?project=library").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(
        admin_get(&regtee, "/api/v1/jobs?project=other").await["jobs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_catches_pushes_that_went_around_regtee() {
    let world = World::start(&["library"], &["reconcile_interval = \"1s\""]).await;
    let (harbor, cloud, regtee) = (&world.harbor, &world.cloud, &world.regtee);
    let mut layout = world.layout();
    let imgs = images(&mut layout, 1);
    push_layout_ok(
        &layout.dir,
        "i0",
        &harbor.host(),
        "library/around:1",
        Tls::Off,
    );
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/around",
        "1",
        &imgs[0].digest,
    )
    .await;
    let jobs = admin_get(regtee, "/api/v1/jobs").await;
    assert_eq!(jobs["jobs"][0]["origin"], "reconcile");
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_from_harbor_and_from_the_registry_become_mirrored_images() {
    let work = tempfile::tempdir().unwrap();
    let admin_port = regtee::local_registry::free_port().unwrap();
    let secret = "hook-secret-3b9e";
    // The registry itself notifies regtee, as a distribution behind Harbor can be told to.
    let harbor = start_harbor_with(
        &work.path().join("harbor"),
        regtee::local_registry::RegistryOptions {
            notification: Some(regtee::local_registry::Notification {
                url: format!("http://127.0.0.1:{admin_port}/api/v1/webhooks/registry"),
                authorization: format!("Bearer {secret}"),
            }),
            ..Default::default()
        },
        Some(harbor::HarborScheme::Https),
    )
    .await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud));
    spec.admin = Some(format!("127.0.0.1:{admin_port}"));
    spec.webhook_secret = Some(secret.into());
    let regtee = Regtee::start(&spec).await;
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    let mut layout = Layout::new(&work.path().join("layout"));
    let imgs = images(&mut layout, 2);
    let harbor_host = harbor.host();

    // 1. Distribution's notification envelope, sent by the registry on a direct push.
    push_layout_ok(
        &layout.dir,
        "i0",
        &harbor_host,
        "library/notified:1",
        Tls::Off,
    );
    wait_for_manifest(&target, "library/notified", "1", &imgs[0].digest).await;

    // 2. Harbor's webhook payload, as documented for PUSH_ARTIFACT.
    push_layout_ok(
        &layout.dir,
        "i1",
        &harbor_host,
        "library/hooked:2",
        Tls::Off,
    );
    let payload = serde_json::json!({
        "type": "PUSH_ARTIFACT",
        "occur_at": 1_700_000_000,
        "operator": "admin",
        "event_data": {
            "resources": [{"digest": imgs[1].digest, "tag": "2", "resource_url": format!("{harbor_host}/library/hooked:2")}],
            "repository": {"date_created": 1_700_000_000, "name": "hooked", "namespace": "library", "repo_full_name": "library/hooked", "repo_type": "private"}
        }
    });
    let url = regtee.admin_url("/api/v1/webhooks/harbor");
    let body = serde_json::to_vec(&payload).unwrap();
    let (status, _) = http_request(
        &url,
        "POST",
        Some(body.clone()),
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(status, 401, "a wrong secret is refused");
    let (status, answer) =
        http_request(&url, "POST", Some(body), &[("authorization", secret)]).await;
    assert_eq!(status, 200, "{answer}");
    wait_for_manifest(&target, "library/hooked", "2", &imgs[1].digest).await;
    let (status, _) = http_request(
        &url,
        "POST",
        Some(b"{oops".to_vec()),
        &[("authorization", secret)],
    )
    .await;
    assert_eq!(status, 400, "a malformed payload is refused");
    regtee.stop().await;
}

/// Parses Prometheus text format strictly enough to catch malformed output; returns samples.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment line: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels: {line}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        samples.push((series.to_string(), v));
    }
    samples
}

fn sum(samples: &[(String, f64)], prefix: &str, containing: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.starts_with(prefix) && s.contains(containing))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_move_when_work_happens() {
    let mut world = World::start(&["library"], &[]).await;
    let (cloud, regtee) = (&world.cloud, &world.regtee);
    let metrics = || async { http_request(&regtee.admin_url("/metrics"), "GET", None, &[]).await };
    let (status, before) = metrics().await;
    assert_eq!(status, 200);
    let before = parse_prometheus(&before);
    assert_eq!(sum(&before, "regtee_proxy_requests_total", ""), 0.0);
    assert!(
        before
            .iter()
            .any(|(s, _)| s == "regtee_jobs{target=\"tcr\",state=\"pending\"}")
    );

    let mut layout = world.layout();
    let imgs = images(&mut layout, 1);
    push_layout_ok(&layout.dir, "i0", &regtee.host(), "library/m:1", Tls::Off);
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/m",
        "1",
        &imgs[0].digest,
    )
    .await;
    let after = wait_until(
        "the manifest job to be counted",
        Duration::from_secs(10),
        || async {
            let samples = parse_prometheus(&metrics().await.1);
            (sum(
                &samples,
                "regtee_jobs_finished_total",
                "kind=\"manifest\",outcome=\"done\"",
            ) >= 1.0)
                .then_some(samples)
        },
    )
    .await;
    assert!(
        sum(
            &after,
            "regtee_proxy_requests_total",
            "route=\"manifest\",status=\"201\""
        ) >= 1.0
    );
    assert!(sum(&after, "regtee_proxy_body_bytes_total", "direction=\"in\"") > 20_000.0);
    assert!(sum(&after, "regtee_upstream_response_seconds_count", "") > 0.0);
    assert!(sum(&after, "regtee_mirror_lag_seconds_count", "tcr") >= 1.0);
    assert!(sum(&after, "regtee_mirrored_bytes_total", "tcr") > 20_000.0);
    assert_eq!(
        sum(&after, "regtee_jobs{", "state=\"done\""),
        4.0,
        "config, 1 layer... and the manifest"
    );

    // Health and readiness.
    assert_eq!(
        http_request(&regtee.admin_url("/healthz"), "GET", None, &[])
            .await
            .0,
        200
    );
    assert_eq!(
        http_request(&regtee.admin_url("/readyz"), "GET", None, &[])
            .await
            .0,
        200
    );
    world.harbor.stop();
    assert_eq!(
        http_request(&world.regtee.admin_url("/readyz"), "GET", None, &[])
            .await
            .0,
        503,
        "Harbor is down"
    );
    world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_is_enforced_and_the_cli_uses_it() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = spec_with_ports(&harbor, &work.path().join("state"));
    spec.admin_token = Some("admin-token-8c1f".into());
    let config = spec.write(&work.path().join("regtee.toml"));
    let regtee = Regtee::start(&spec).await;
    // (The probes, /healthz and /readyz, need none: bounds::probes_need_no_admin_token...)
    for path in ["/api/v1/status", "/metrics", "/api/v1/jobs"] {
        let url = regtee.admin_url(path);
        assert_eq!(
            http_request(&url, "GET", None, &[]).await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            http_request(&url, "GET", None, &[("authorization", "Bearer nope")])
                .await
                .0,
            401
        );
        // The scheme is case-insensitive (RFC 9110 §11.1).
        for scheme in ["Bearer", "bearer", "BEARER"] {
            assert_eq!(
                http_request(
                    &url,
                    "GET",
                    None,
                    &[("authorization", &format!("{scheme} admin-token-8c1f"))]
                )
                .await
                .0,
                200,
                "{scheme}"
            );
        }
    }
    let out = regtee_cli(&config, &spec, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_says(&out, "TARGET");
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_namespace_fails_the_job_with_a_hint_and_retry_fixes_it() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let spec = spec_with_ports(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud).with("namespaces = { library = \"prod-lib\" }"));
    let config = spec.write(&work.path().join("regtee.toml"));
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let imgs = images(&mut layout, 1);
    push_layout_ok(&layout.dir, "i0", &regtee.host(), "library/app:1", Tls::Off);
    let failed = failed_manifest_job(&regtee, "").await;
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("namespace prod-lib does not exist on target tcr")
            && detail.contains("create namespace prod-lib on tcr"),
        "{detail}"
    );
    assert_eq!(failed["error_class"], "denied");
    // One attempt: retrying cannot fix a missing namespace.
    let detail_page = admin_get(&regtee, &format!("/api/v1/jobs/{}", failed["id"])).await;
    assert_eq!(detail_page["attempts"].as_array().unwrap().len(), 1);

    let out = regtee_cli(&config, &spec, &["status"]);
    assert_says(&out, "create namespace prod-lib on tcr");
    let out = regtee_cli(&config, &spec, &["jobs", "--failed"]);
    assert_says(&out, "library/app:1");

    cloud.issuer.add_project("prod-lib");
    let out = regtee_cli(&config, &spec, &["retry", "--failed"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "prod-lib/app",
        "1",
        &imgs[0].digest,
    )
    .await;
    regtee.stop().await;
    // With no server running, the CLI reads the state directory itself.
    let out = regtee_cli(&config, &spec, &["jobs", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "done"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_a_wrong_password_and_a_missing_namespace_with_hints() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let good = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud).with("namespaces = { library = \"library\" }"));
    let config = good.write(&work.path().join("good.toml"));
    let out = regtee_cli(&config, &good, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_says(
        &out,
        "ok    target tcr namespace library: exists and accepts pushes",
    );
    // TLS is claimed only where there is TLS: Harbor is HTTPS, the target plain HTTP.
    assert_says(
        &out,
        &format!(
            "ok    upstream {}: reachable, TLS ok, credentials accepted",
            harbor.url()
        ),
    );
    assert_says(
        &out,
        &format!(
            "ok    target tcr {}: reachable, credentials accepted",
            cloud.url()
        ),
    );

    // A wrong password for the target.
    let mut wrong = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud));
    wrong.cloud_password = "not-it".into();
    let wrong_path = wrong.write(&work.path().join("wrong.toml"));
    let out = regtee_cli(&wrong_path, &wrong, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "FAIL  target tcr");
    assert_says(&out, "hint: the username or password is wrong");
    assert!(
        !text(&out).contains("not-it"),
        "the password is never printed"
    );

    // A namespace that does not exist there.
    let missing = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud).with("namespaces = { library = \"prod-lib\" }"));
    let path = missing.write(&work.path().join("missing.toml"));
    let out = regtee_cli(&path, &missing, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "FAIL  target tcr namespace prod-lib");
    assert_says(&out, "hint: create namespace prod-lib on tcr");

    // A config that does not parse: exit 64, one line naming the key.
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, format!("{}\nlisten_port = 1\n", good.toml())).unwrap();
    let out = regtee_cli(&bad, &good, &["check"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert_says(&out, "listen_port");
}

#[test]
fn the_demo_mirrors_a_push_and_serves_the_second_pull_from_the_cache() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regtee"))
        .args(["demo", "--exit"])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("(same digest)"), "{said}");
    let cache_line = said
        .lines()
        .find(|l| l.starts_with("cache: "))
        .unwrap_or_else(|| panic!("a cache line in {said}"));
    assert!(
        cache_line.contains("5 hits, 5 misses"),
        "the second pull, manifest and four blobs, came from the cache: {cache_line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recheck_of_an_in_sync_project_lists_harbor_and_a_harbor_target_a_page_at_a_time_and_heads_a_plain_target_once_per_tag()
 {
    use crate::support::fault::FaultFront;
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    // A second Harbor as a target (TCR Enterprise is built on Harbor): its own nginx, token service and
    // artifact API, reached with its own login.
    let harbor_target = start_harbor(&work.path().join("harbor-target")).await;
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()))
        .target(
            TargetSpec::at("tcr-ee", &harbor_target.url()).login(&format!(
                "username = \"{DEV_USER}\"\npassword = \"{DEV_PASSWORD}\"\nca_file = \"{}\"\n",
                harbor_target.ca_file().unwrap().display()
            )),
        );
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let imgs = images(&mut layout, 3);
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    // Straight to its registry: the test's own HEADs stay out of the nginx log counted below.
    let other_target = client_for(
        &harbor_target.registry.url(),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    for (i, image) in imgs.iter().enumerate() {
        for tag in ["1", "2"] {
            let repo_tag = format!("library/r{i}:{tag}");
            push_layout_ok(
                &layout.dir,
                &format!("i{i}"),
                &regtee.host(),
                &repo_tag,
                Tls::Off,
            );
            wait_for_manifest(&target, &format!("library/r{i}"), tag, &image.digest).await;
            wait_for_manifest(&other_target, &format!("library/r{i}"), tag, &image.digest).await;
        }
    }
    let tags = 6;

    // What the two Harbors' nginx and the plain target's front see of one re-check, nothing
    // else running.
    let heads = |harbor: &AuthRegistry| {
        harbor
            .front
            .as_ref()
            .unwrap()
            .access_log()
            .lines()
            .filter(|l| l.contains("\"HEAD /v2/library/r") && l.contains("/manifests/"))
            .count()
    };
    let artifact_lists = |harbor: &AuthRegistry| {
        harbor
            .front
            .as_ref()
            .unwrap()
            .access_log()
            .lines()
            .filter(|l| {
                l.contains("\"GET /api/v2.0/projects/library/repositories/")
                    && l.contains("/artifacts?")
            })
            .count()
    };
    let (heads_before, lists_before, target_before) =
        (heads(&harbor), artifact_lists(&harbor), front.requests());
    let (other_heads_before, other_lists_before) =
        (heads(&harbor_target), artifact_lists(&harbor_target));
    let progress = dry_run_backfill(&regtee, "library").await;
    assert_eq!(progress["in_sync"], 2 * tags, "{progress}");
    // Harbor's artifact list gives every tag's digest, a page of 100 artifacts per request:
    // one request per repository here, and no manifest HEAD, on either Harbor.
    for (side, harbor, lists_before, heads_before) in [
        ("Harbor", &harbor, lists_before, heads_before),
        (
            "the Harbor target",
            &harbor_target,
            other_lists_before,
            other_heads_before,
        ),
    ] {
        let lists = wait_until(
            &format!("{side}'s log of the re-check"),
            Duration::from_secs(10),
            || async {
                let n = artifact_lists(harbor) - lists_before;
                (n >= imgs.len()).then_some(n)
            },
        )
        .await;
        assert_eq!(
            lists,
            imgs.len(),
            "one artifact list per repository on {side}"
        );
        assert_eq!(
            heads(harbor) - heads_before,
            0,
            "no manifest HEAD on {side}"
        );
    }
    let on_target = front.requests() - target_before;
    // The plain target: one HEAD per tag, one artifact list that it answers 404 (it is asked
    // once), and at most the version check that learns its challenge.
    assert!(
        (tags + 1..=tags + 2).contains(&(on_target as usize)),
        "{on_target} requests to the plain target for {tags} tags"
    );

    // A Harbor target whose list gives digests regtee cannot read is not believed: its tags
    // are HEADed, and still found in sync (nothing queued on its word).
    harbor_target.issuer.garble_artifact_digests();
    let other_heads_before = heads(&harbor_target);
    let progress = dry_run_backfill(&regtee, "library").await;
    assert_eq!(progress["in_sync"], 2 * tags, "{progress}");
    assert_eq!(progress["queued"], 0, "{progress}");
    let garbled_heads = wait_until(
        "the Harbor target's log of the HEADs",
        Duration::from_secs(10),
        || async {
            let n = heads(&harbor_target) - other_heads_before;
            (n >= tags).then_some(n)
        },
    )
    .await;
    assert_eq!(garbled_heads, tags, "one HEAD per tag on the Harbor target");

    // Harbor's artifact list failing (its core's database away, its registry up): each
    // repository is listed through the registry API instead, and every tag is still compared.
    harbor.issuer.fail_artifact_lists();
    let heads_before = heads(&harbor);
    let progress = dry_run_backfill(&regtee, "library").await;
    assert_eq!(progress["in_sync"], 2 * tags, "{progress}");
    assert_eq!(progress["failed"], 0, "{progress}");
    let harbor_heads = wait_until(
        "Harbor's log of the HEADs",
        Duration::from_secs(10),
        || async {
            let n = heads(&harbor) - heads_before;
            (n >= tags).then_some(n)
        },
    )
    .await;
    assert_eq!(harbor_heads, tags, "one HEAD per tag on Harbor");
    regtee.stop().await;
}
