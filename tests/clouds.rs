//! Cloud registries as they behave: each test puts one documented quirk (tests/support/quirks.rs)
//! in front of a real registry, and checks that what reaches it is Harbor's content, by digest,
//! or that the job ends the way an operator can act on.

use std::time::Duration;

use crate::support::fault::{Fault, FaultFront};
use crate::support::issuer::Rotating;
use crate::support::layout::Written;
use crate::support::quirks::{Immutability, Quirk};
use crate::support::*;

/// Harbor, a cloud target behind the fault front (as `tcr`, `library` mapped to `prod-lib`),
/// and regtee.
struct Cloud {
    world: World,
    front: FaultFront,
    spec: ConfigSpec,
}

impl Cloud {
    async fn start(target_lines: &[&str]) -> Cloud {
        Cloud::with_login(target_lines, None).await
    }

    async fn with_login(target_lines: &[&str], login: Option<&str>) -> Cloud {
        let work = tempfile::tempdir().unwrap();
        let harbor = start_harbor(&work.path().join("harbor")).await;
        let cloud = start_cloud(&work.path().join("cloud"), &["prod-lib", "team"]).await;
        let front = FaultFront::start(&cloud.url()).await;
        let mut target =
            TargetSpec::at("tcr", &front.url()).with("namespaces = { library = \"prod-lib\" }");
        for line in target_lines {
            target = target.with(line);
        }
        if let Some(lines) = login {
            target = target.login(lines);
        }
        let spec = ConfigSpec::new(&harbor, &work.path().join("state")).target(target);
        let regtee = Regtee::start(&spec).await;
        Cloud {
            world: World {
                work,
                harbor,
                cloud,
                regtee,
            },
            front,
            spec,
        }
    }

    fn push(&self, layout_name: &str, repo_tag: &str) {
        push_layout_ok(
            &self.world.work.path().join("layout"),
            layout_name,
            &self.world.regtee.host(),
            repo_tag,
            Tls::Off,
        );
    }

    /// Waits until the target has `manifest` under `tag`, then compares every blob's bytes.
    async fn assert_mirrored(&self, target_repo: &str, tag: &str, manifest: &Written) {
        let target = self.world.target();
        wait_for_manifest(&target, target_repo, tag, &manifest.digest).await;
        assert_blobs_equal(&target, target_repo, &self.layout_files(), manifest).await;
    }

    /// The layout's files as tests wrote them (a fresh `Layout` would empty its index).
    fn layout_files(&self) -> crate::support::layout::Layout {
        crate::support::layout::Layout::open(&self.world.work.path().join("layout"))
    }

    /// Every job so far succeeded on its first attempt. A job's outcome is recorded a moment
    /// after its manifest is on the target: it is waited for, not assumed.
    async fn assert_no_job_retried(&self) {
        let page = wait_until("every job to end", Duration::from_secs(30), || async {
            let page = admin_get(&self.world.regtee, "/api/v1/jobs").await;
            let ended = page["jobs"]
                .as_array()?
                .iter()
                .all(|j| j["state"] != "running" && j["state"] != "pending");
            ended.then_some(page)
        })
        .await;
        for job in page["jobs"].as_array().unwrap() {
            assert_eq!(job["state"], "done", "{job}");
            assert_eq!(job["attempts"], 1, "{job}");
        }
    }

    async fn job_in(
        &self,
        state: &str,
        what: &str,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let path = format!("/api/v1/jobs?state={state}");
        wait_until(what, Duration::from_secs(60), || async {
            admin_get(&self.world.regtee, &path).await["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| pick(j))
                .cloned()
        })
        .await
    }
}

fn quirks_count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread")]
async fn ecr_completing_a_blob_on_its_last_patch_needs_no_closing_put() {
    let c = Cloud::start(&["upload_chunk_size = 65536"]).await;
    let mut layout = c.world.layout();
    let image = layout.image(&[300_000, 150_000, 40_000], "amd64");
    layout.tag(&image, "image");
    let refs = regtee::oci::manifest::references(&image.bytes, None).unwrap();
    c.front.set(Fault::Quirk(Quirk::EarlyAcceptOnPatch {
        digests: refs.blobs.iter().map(|b| b.digest.clone()).collect(),
    }));
    c.push("image", "library/app:1");
    c.assert_mirrored("prod-lib/app", "1", &image).await;
    let q = c.front.quirks();
    assert!(
        quirks_count(&q.early_accepts) >= 3,
        "every layer's last PATCH was answered 201 ({} were)",
        quirks_count(&q.early_accepts)
    );
    assert_eq!(
        quirks_count(&q.refused_puts),
        0,
        "regtee sent a closing PUT after a 201"
    );
    c.assert_no_job_retried().await;
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_the_target_kept_only_part_of_resumes_from_the_offset_it_reports() {
    let c = Cloud::start(&["upload_chunk_size = 65536"]).await;
    c.front.set(Fault::Quirk(Quirk::TakesPartOfAChunk));
    let mut layout = c.world.layout();
    let image = layout.image(&[300_000, 200_000], "amd64");
    layout.tag(&image, "image");
    c.push("image", "library/app:1");
    c.assert_mirrored("prod-lib/app", "1", &image).await;
    assert!(
        quirks_count(&c.front.quirks().partial_chunks) >= 2,
        "each layer's upload was cut once"
    );
    c.assert_no_job_retried().await;
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_answered_with_an_upload_session_uploads_through_it_and_leaves_none_open() {
    let c = Cloud::start(&[]).await;
    let mut layout = c.world.layout();
    let image = layout.image(&[200_000, 80_000], "amd64");
    layout.tag(&image, "image");
    for repo in ["app", "b"] {
        c.push("image", &format!("library/{repo}:1"));
        c.assert_mirrored(&format!("prod-lib/{repo}"), "1", &image)
            .await;
    }
    // The blobs are in two repositories on the target already: regtee asks to mount them
    // from both, gets two sessions for each, uploads through one and must close the other.
    c.front.set(Fault::Quirk(Quirk::MountOpensSession));
    c.push("image", "library/other:1");
    c.assert_mirrored("prod-lib/other", "1", &image).await;
    let sessions = c.front.quirks().mount_sessions.lock().unwrap().clone();
    let blobs = regtee::oci::manifest::references(&image.bytes, None)
        .unwrap()
        .blobs
        .len();
    assert!(
        sessions.len() > blobs,
        "more sessions opened than blobs uploaded ({} for {blobs})",
        sessions.len()
    );
    let token = c
        .world
        .cloud
        .token(
            CLOUD_USER,
            CLOUD_PASSWORD,
            &["repository:prod-lib/other:pull,push"],
        )
        .await;
    for location in sessions {
        let path = location
            .parse::<http::Uri>()
            .unwrap()
            .path_and_query()
            .unwrap()
            .to_string();
        let url = format!("{}{path}", c.world.cloud.url());
        let (status, body) = http_request(
            &url,
            "GET",
            None,
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(status, 404, "upload session {path} is still open: {body}");
        assert!(body.contains("BLOB_UPLOAD_UNKNOWN"), "{body}");
    }
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_not_created_on_the_target_fails_at_once_naming_it_and_retry_mirrors() {
    let c = Cloud::start(&[]).await;
    c.front.set(Fault::Quirk(Quirk::RepositoriesMustExist));
    let mut layout = c.world.layout();
    let image = layout.image(&[120_000], "amd64");
    layout.tag(&image, "image");
    c.push("image", "library/app:1");
    let failed = failed_manifest_job(&c.world.regtee, "repository=library/app").await;
    assert_eq!(
        failed["attempts"], 1,
        "retrying cannot create a repository: {failed}"
    );
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("create repository prod-lib/app on tcr"),
        "{detail}"
    );
    c.front.create_repository("prod-lib/app");
    let (status, body) = http_request(
        &c.world.regtee.admin_url("/api/v1/jobs/retry?state=failed"),
        "POST",
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    c.assert_mirrored("prod-lib/app", "1", &image).await;
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immutable_tag_ends_skipped_with_both_digests_and_the_new_manifest_kept_by_digest() {
    let c = Cloud::start(&[]).await;
    let mut layout = c.world.layout();
    let first = layout.image(&[50_000], "amd64");
    let second = layout.image(&[60_000], "arm64");
    layout.tag(&first, "first");
    layout.tag(&second, "second");
    for tag in ["harbor-rule", "ecr-rule"] {
        c.push("first", &format!("library/app:{tag}"));
        c.assert_mirrored("prod-lib/app", tag, &first).await;
    }
    let target = c.world.target();
    for (tag, style) in [
        ("harbor-rule", Immutability::Harbor),
        ("ecr-rule", Immutability::Ecr),
    ] {
        c.front.set(Fault::Quirk(Quirk::ImmutableTags(style)));
        c.push("second", &format!("library/app:{tag}"));
        let job = c
            .job_in("skipped", "the tag move to be skipped", |j| {
                j["kind"] == "manifest" && j["tag"] == tag
            })
            .await;
        let detail = job["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!(
                "immutable on tcr: prod-lib/app:{tag} is {}, Harbor has {}",
                first.digest, second.digest
            )),
            "{detail}"
        );
        assert_eq!(job["attempts"], 1, "{job}");
        let head = target
            .manifest_head("prod-lib/app", tag)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(head.digest.as_str(), first.digest, "the tag did not move");
        let by_digest = target
            .manifest_head("prod-lib/app", &second.digest)
            .await
            .unwrap();
        assert!(
            by_digest.is_some(),
            "Harbor's manifest is on the target by digest"
        );
    }
    assert_blobs_equal(&target, "prod-lib/app", &layout, &second).await;
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_artifact_type_fails_naming_it_and_images_still_mirror() {
    let c = Cloud::start(&[]).await;
    let helm = "application/vnd.cncf.helm.config.v1+json";
    c.front
        .set(Fault::Quirk(Quirk::RefusesArtifactType(helm.into())));
    let mut layout = c.world.layout();
    let chart = layout.helm_chart();
    let image = layout.image(&[70_000], "amd64");
    layout.tag(&chart, "chart");
    layout.tag(&image, "image");
    c.push("chart", "team/charts/demo:0.1.0");
    c.push("image", "library/app:1");
    c.assert_mirrored("prod-lib/app", "1", &image).await;
    let failed = failed_manifest_job(&c.world.regtee, "repository=team/charts/demo").await;
    assert_eq!(failed["attempts"], 1, "{failed}");
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("artifact type {helm}")),
        "{detail}"
    );
    assert!(detail.contains("include, exclude, tags"), "{detail}");
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_three_seconds_are_renewed_during_a_slow_chunked_copy() {
    let c = Cloud::start(&["upload_chunk_size = 65536", "max_bytes_per_second = 131072"]).await;
    c.world.cloud.issuer.set_token_lifetime(3);
    c.front.set(Fault::Quirk(Quirk::TokensExpire));
    let mut layout = c.world.layout();
    // About five seconds at 128 KiB/s: tokens expire several times during the copy.
    let image = layout.image(&[640_000], "amd64");
    layout.tag(&image, "image");
    let before = c.world.cloud.issuer.seen().len();
    c.push("image", "library/app:1");
    c.assert_mirrored("prod-lib/app", "1", &image).await;
    let job = c
        .job_in("done", "the manifest job", |j| j["kind"] == "manifest")
        .await;
    assert_eq!(
        job["attempts"], 1,
        "no attempt failed on an expired token: {job}"
    );
    let issued = c.world.cloud.issuer.seen()[before..]
        .iter()
        .filter(|s| s.status == 200 && s.account.as_deref() == Some(CLOUD_USER))
        .count();
    assert!(
        issued >= 3,
        "tokens were renewed during the copy ({issued} issued)"
    );
    c.world.regtee.stop().await;
}

/// A credential helper like `docker-credential-ecr-login`: mints a short-lived password the
/// token service accepts for a few seconds, and counts its runs.
fn rotating_helper(dir: &std::path::Path, rotating: &Rotating) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let runs = dir.join("helper-runs");
    let script = dir.join("docker-credential-rotating");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread host\nt=$(date +%s)\necho \"$t $host\" >> '{runs}'\nmac=$(printf '%s' \"{seed}$t\" | sha256sum | cut -c1-32)\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"%s-%s\"}}\\n' \"$host\" \"$t\" \"$mac\"\n",
            runs = runs.display(),
            seed = rotating.seed,
            user = CLOUD_USER,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test(flavor = "multi_thread")]
async fn a_credential_helper_is_asked_again_when_its_password_expires() {
    let helper_dir = tempfile::tempdir().unwrap();
    let rotating = Rotating {
        seed: "seed-rotating-4411".into(),
        valid_for: 3,
    };
    let script = rotating_helper(helper_dir.path(), &rotating);
    let c = Cloud::with_login(
        &[],
        Some(&format!("credential_helper = \"{}\"\n", script.display())),
    )
    .await;
    c.world
        .cloud
        .issuer
        .add_rotating_user(CLOUD_USER, rotating.clone());
    c.world.cloud.issuer.set_token_lifetime(2);
    c.front.set(Fault::Quirk(Quirk::TokensExpire));
    let mut layout = c.world.layout();
    let first = layout.image(&[30_000], "amd64");
    let second = layout.image(&[40_000], "arm64");
    layout.tag(&first, "first");
    layout.tag(&second, "second");
    // Each run of the helper, as the unix time it minted its password at.
    let minted = || -> Vec<u64> {
        std::fs::read_to_string(helper_dir.path().join("helper-runs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect()
    };
    c.push("first", "library/app:1");
    c.assert_mirrored("prod-lib/app", "1", &first).await;
    let first_runs = minted();
    assert!(!first_runs.is_empty(), "the helper was run");
    // Until the token service refuses the password regtee holds (its rule: a few seconds).
    let held = rotating.password(*first_runs.last().unwrap());
    wait_until(
        "the helper's first password to expire",
        Duration::from_secs(10),
        || async {
            let status = c.world.cloud.token_status(CLOUD_USER, &held).await;
            (status == 401).then_some(())
        },
    )
    .await;
    c.push("second", "library/app:2");
    c.assert_mirrored("prod-lib/app", "2", &second).await;
    let runs = minted();
    assert!(
        runs.len() > first_runs.len(),
        "the helper was asked again after its password expired"
    );
    let refused = c
        .world
        .cloud
        .issuer
        .seen()
        .iter()
        .any(|s| s.status == 401 && s.account.as_deref() == Some(CLOUD_USER));
    assert!(refused, "the token service refused the expired password");
    // `regtee check` runs the helper too, and says where the login came from.
    let config = c.spec.write(&c.world.work.path().join("regtee.toml"));
    let out = regtee_cli(&config, &c.spec, &["check"]);
    assert_says(
        &out,
        &format!(
            "credentials accepted (credential helper {})",
            script.display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    // The passwords never show in what regtee tells operators.
    let jobs = admin_get(&c.world.regtee, "/api/v1/jobs").await.to_string();
    let status = admin_get(&c.world.regtee, "/api/v1/status")
        .await
        .to_string();
    let checked = text(&out);
    for t in minted() {
        let password = rotating.password(t);
        let secret = password.split('-').nth(1).unwrap();
        assert!(!jobs.contains(secret) && !status.contains(secret) && !checked.contains(secret));
    }
    c.world.regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_target_delays_neither_another_target_nor_pulls_through_regtee() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["prod-lib", "team"]).await;
    // About sixteen seconds for the slow target to copy the layer.
    let slow = TargetSpec::cloud("slow", &cloud)
        .with("namespaces = { library = \"prod-lib\" }")
        .with("max_bytes_per_second = 65536");
    let fast = TargetSpec::cloud("fast", &cloud).with("namespaces = { library = \"team\" }");
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(slow)
        .target(fast);
    let regtee = Regtee::start(&spec).await;
    let mut layout = crate::support::layout::Layout::new(&work.path().join("layout"));
    let image = layout.image(&[1024 * 1024], "amd64");
    layout.tag(&image, "image");
    push_layout_ok(
        &layout.dir,
        "image",
        &regtee.host(),
        "library/app:1",
        Tls::Off,
    );
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&target, "team/app", "1", &image.digest).await;
    let pulled = work.path().join("pulled");
    pull_to_layout(
        &regtee.host(),
        "library/app:1",
        &pulled,
        (DEV_USER, DEV_PASSWORD),
        Tls::Off,
    );
    let pulled_index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        pulled_index["manifests"][0]["digest"],
        image.digest.as_str()
    );
    assert!(
        target
            .manifest_head("prod-lib/app", "1")
            .await
            .unwrap()
            .is_none(),
        "the fast target and the pull finished while the slow target was still copying"
    );
    wait_until(
        "the slow target to finish",
        Duration::from_secs(90),
        || async {
            target
                .manifest_head("prod-lib/app", "1")
                .await
                .unwrap()
                .filter(|h| h.digest.as_str() == image.digest)
        },
    )
    .await;
    assert_blobs_equal(&target, "prod-lib/app", &layout, &image).await;
    regtee.stop().await;
}
