//! Several replicas on one PostgreSQL queue (a real server from Debian's `postgresql`), and the
//! database going away under them.

use std::time::Duration;

use regtee::oci::digest::Digest;

use crate::support::layout::Layout;
use crate::support::*;

/// Two replicas in front of one Harbor, sharing a queue: a push through either is mirrored, and
/// either answers for the whole queue.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_through_either_replica_are_mirrored_and_both_see_the_queue() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let spec = |name: &str| {
        ConfigSpec::new(&harbor, &work.path().join(name)).target(TargetSpec::cloud("tcr", &cloud))
    };
    let a_spec = spec("a").on_postgres(postgres(), "two_replicas");
    let b_spec = spec("b").with_database(&a_spec);
    let a = Regtee::start(&a_spec).await;
    let b = Regtee::start(&b_spec).await;

    let mut layout = Layout::new(&work.path().join("layout"));
    let first = layout.image(&[300_000, 50_000], "amd64");
    layout.tag(&first, "first");
    let second = layout.image(&[200_000], "arm64");
    layout.tag(&second, "second");
    push_layout_ok(&layout.dir, "first", &a.host(), "library/app:1", Tls::Off);
    push_layout_ok(&layout.dir, "second", &b.host(), "library/app:2", Tls::Off);

    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&target, "library/app", "1", &first.digest).await;
    wait_for_manifest(&target, "library/app", "2", &second.digest).await;
    assert_blobs_equal(&target, "library/app", &layout, &first).await;
    assert_blobs_equal(&target, "library/app", &layout, &second).await;

    // Each replica lists the jobs the other recorded, and counts the same queue.
    for r in [&a, &b] {
        let tags = wait_until(
            "both manifest jobs done",
            Duration::from_secs(30),
            || async {
                let page = admin_get(r, "/api/v1/jobs?target=tcr&state=done").await;
                let mut tags: Vec<String> = page["jobs"]
                    .as_array()?
                    .iter()
                    .filter(|j| j["kind"] == "manifest")
                    .filter_map(|j| j["tag"].as_str().map(str::to_string))
                    .collect();
                tags.sort();
                (tags.len() == 2).then_some(tags)
            },
        )
        .await;
        assert_eq!(tags, vec!["1", "2"]);
    }
    let status = |r| async move { admin_get(r, "/api/v1/status").await };
    let (seen_by_a, seen_by_b) = (status(&a).await, status(&b).await);
    assert_eq!(seen_by_a["targets"], seen_by_b["targets"]);
    // The cluster, whichever replica answers: both replicas, each once, with their version.
    assert_eq!(seen_by_a["replicas"], seen_by_b["replicas"]);
    let replicas = seen_by_a["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    assert_ne!(replicas[0]["id"], replicas[1]["id"]);
    assert!(
        replicas
            .iter()
            .all(|r| r["version"] == env!("CARGO_PKG_VERSION"))
    );

    // Metrics of queue state are the cluster's, the same on both; work done is per replica.
    let queue_gauges = |r: &Regtee| {
        let url = r.admin_url("/metrics");
        async move {
            let (status, text) = http_request(&url, "GET", None, &[]).await;
            assert_eq!(status, 200);
            // The exposition's order of label sets is not fixed.
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("regtee_jobs{"))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        }
    };
    let settled = wait_until("the queue settled", Duration::from_secs(30), || async {
        let gauges = queue_gauges(&a).await;
        let busy = gauges.iter().any(|l| {
            (l.contains("\"pending\"") || l.contains("\"running\"")) && !l.ends_with(" 0")
        });
        (!busy).then_some(gauges)
    })
    .await;
    assert!(
        settled
            .iter()
            .any(|l| l.contains("\"done\"") && !l.ends_with(" 0")),
        "{settled:?}"
    );
    assert_eq!(queue_gauges(&b).await, settled);

    // A backfill started on one replica is seen, as it goes and once ended, on the other.
    let (status, body) = http_request(
        &a.admin_url("/api/v1/backfills"),
        "POST",
        Some(br#"{"project": "library"}"#.to_vec()),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].clone();
    let on_b = wait_until(
        "the backfill ended, seen from b",
        Duration::from_secs(30),
        || async {
            let p = admin_get(&b, &format!("/api/v1/backfills/{id}")).await;
            (p["state"] == "finished").then_some(p)
        },
    )
    .await;
    assert_eq!(
        (on_b["tags"].as_u64(), on_b["in_sync"].as_u64()),
        (Some(2), Some(2)),
        "{on_b}"
    );
    assert_eq!(
        admin_get(&a, &format!("/api/v1/backfills/{id}")).await,
        on_b
    );
    assert_eq!(admin_get(&b, "/api/v1/backfills").await[0], on_b);

    a.stop().await;
    b.stop().await;

    // Where a blob lives on the target is shared, and outlives the processes: a replica that
    // never copied it mounts it from there. The client uploads the bytes again (no mount of
    // its own for regtee to follow), so only the recorded home can make it a mount.
    let c = Regtee::start(&spec("c").with_database(&a_spec)).await;
    let layer: Digest = first.layers()[0].parse().unwrap();
    let bytes = std::fs::read(layout.dir.join("blobs/sha256").join(layer.hex())).unwrap();
    client_for(
        &format!("http://{}", c.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    )
    .upload_blob(
        "library/copy",
        &layer,
        regtee::registry::Upload::whole(bytes.into()),
    )
    .await
    .unwrap();
    let how = wait_until(
        "the copy's blob job done",
        Duration::from_secs(30),
        || async {
            let page = admin_get(
                &c,
                "/api/v1/jobs?target=tcr&state=done&repository=library/copy",
            )
            .await;
            page["jobs"].as_array()?.first()?["detail"]
                .as_str()
                .map(str::to_string)
        },
    )
    .await;
    assert_eq!(how, "mounted");
    assert!(
        target
            .blob_exists("library/copy", &layer)
            .await
            .unwrap()
            .is_some()
    );
    c.stop().await;
}

/// How the database goes away under a running replica.
#[derive(Clone, Copy, Debug)]
enum Away {
    /// Shut down: connections refused.
    Stopped,
    /// Every server process SIGSTOPped: connections accepted, nothing answers.
    Stalled,
}

/// The database restarted while clients push: a push whose job cannot be recorded gets a 503
/// (and succeeds when retried), pulls never fail, nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread")]
async fn while_the_database_is_away_pushes_get_503_and_pulls_keep_flowing() {
    database_away(Away::Stopped).await;
}

/// The same when the database accepts and then stalls: the push gets its 503 once
/// `database_timeout` passes instead of hanging with it.
#[tokio::test(flavor = "multi_thread")]
async fn while_the_database_stalls_pushes_get_503_within_the_deadline() {
    database_away(Away::Stalled).await;
}

async fn database_away(how: Away) {
    let work = tempfile::tempdir().unwrap();
    // A server of its own: this test stops it.
    let database = regtee::local_postgres::LocalPostgres::start().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud))
        .on_postgres(&database, "away");
    spec.state_extra = "database_timeout = \"1s\"\n".into();
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let before = layout.image(&[150_000], "amd64");
    layout.tag(&before, "before");
    let during = layout.image(&[120_000], "arm64");
    layout.tag(&during, "during");
    push_layout_ok(
        &layout.dir,
        "before",
        &regtee.host(),
        "library/app:before",
        Tls::Off,
    );
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&target, "library/app", "before", &before.digest).await;

    match how {
        Away::Stopped => database.stop().unwrap(),
        Away::Stalled => database.freeze().unwrap(),
    }
    // Pulls go on: they need Harbor, not the queue.
    let pulled = work.path().join("pulled");
    pull_to_layout(
        &regtee.host(),
        "library/app:before",
        &pulled,
        (DEV_USER, DEV_PASSWORD),
        Tls::Off,
    );
    // A push's blobs and manifest reach Harbor, but regtee cannot record them: 503, retry.
    let began = std::time::Instant::now();
    let refused = push_layout(
        &layout.dir,
        "during",
        &regtee.host(),
        "library/app:during",
        Tls::Off,
    );
    assert!(
        !refused.status.success(),
        "the push must not be acknowledged"
    );
    // A liveness bound, not a timing target: without the deadline a stalled database holds
    // the push for as long as it stalls.
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "the push waited {:?} on the database",
        began.elapsed()
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("503") || said.contains("could not record"),
        "told why: {said}"
    );
    let ready = raw_http_client(None, false)
        .request(
            http::Request::get(regtee.admin_url("/readyz"))
                .body(regtee::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready while the queue is away");

    match how {
        Away::Stopped => database.restart().unwrap(),
        Away::Stalled => database.thaw().unwrap(),
    }
    database.wait_ready(Duration::from_secs(30)).unwrap();
    // The client's retry, once the database is back, is acknowledged and mirrored.
    wait_until(
        "the retried push to succeed",
        Duration::from_secs(30),
        || async {
            push_layout(
                &layout.dir,
                "during",
                &regtee.host(),
                "library/app:during",
                Tls::Off,
            )
            .status
            .success()
            .then_some(())
        },
    )
    .await;
    wait_for_manifest(&target, "library/app", "during", &during.digest).await;
    assert_blobs_equal(&target, "library/app", &layout, &during).await;
    regtee.stop().await;
}

/// One row per job, with its attempt history's length, comparable across both databases: what
/// a migration must carry over (a running job arrives pending: no replica holds it).
const JOB_ROWS: &str = "SELECT target || '|' || kind || '|' || repository || '|' || tag || '|' || \
     digest || '|' || CASE state WHEN 'running' THEN 'pending' ELSE state END || '|' || \
     attempts || '|' || detail || '|' || error_class || '|' || target_digest || '|' || \
     (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id) FROM jobs j ORDER BY 1";

fn migrate(config: &std::path::Path, spec: &ConfigSpec, url: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_regtee"))
        .args(["state", "migrate", "--to", url, "--config"])
        .arg(config)
        .envs(spec.env())
        .env("PGPASSWORD", postgres().password())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn state_migrate_copies_a_populated_queue_once_and_refuses_while_served() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    // A target nobody answers for: its jobs wait, retried, with attempts in their history.
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud))
        .target(TargetSpec::at(
            "gone",
            &format!(
                "http://127.0.0.1:{}",
                regtee::local_registry::free_port().unwrap()
            ),
        ));
    let config = spec.write(&work.path().join("regtee.toml"));
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[100_000, 20_000], "amd64");
    layout.tag(&image, "x");
    push_layout_ok(&layout.dir, "x", &regtee.host(), "library/app:1", Tls::Off);
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&target, "library/app", "1", &image.digest).await;
    wait_until(
        "the gone target's jobs to have been tried",
        Duration::from_secs(30),
        || async {
            let page = admin_get(&regtee, "/api/v1/jobs?target=gone").await;
            let jobs = page["jobs"].as_array()?.clone();
            (!jobs.is_empty() && jobs.iter().all(|j| j["attempts"].as_u64() >= Some(1)))
                .then_some(())
        },
    )
    .await;

    let url = postgres().create_database("migrated").unwrap();
    let refused = migrate(&config, &spec, &url);
    assert!(!refused.status.success());
    assert_says(&refused, "stop it first");
    regtee.stop().await;

    let sqlite = rusqlite::Connection::open(work.path().join("state/jobs.db")).unwrap();
    let rows = |sql: &str| -> Vec<String> {
        let mut stmt = sqlite.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let before = rows(JOB_ROWS);
    assert!(before.len() >= 4, "jobs on both targets: {before:?}");

    let first = migrate(&config, &spec, &url);
    assert!(first.status.success(), "{}", text(&first));
    assert_says(&first, &format!("{} jobs in", before.len()));
    assert_says(&first, "0 already there");
    let in_postgres = || -> Vec<String> {
        let out = postgres().psql("migrated", JOB_ROWS).unwrap();
        out.lines().map(str::to_string).collect()
    };
    assert_eq!(
        in_postgres(),
        before,
        "every job and its history, as it was"
    );

    let second = migrate(&config, &spec, &url);
    assert!(second.status.success(), "{}", text(&second));
    assert_says(&second, "0 copied into");
    assert_eq!(in_postgres(), before, "a second run adds nothing");
}

/// A replica SIGKILLed in the middle of mirroring: its running jobs are resumed by the other
/// once their lease runs out, everything acknowledged reaches the target with Harbor's digest,
/// and no job ever had two attempts at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_mirroring_has_its_jobs_resumed_by_another() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    // A slow target (256 KiB/s), so copies are still running when the replica dies.
    let target = TargetSpec::cloud("tcr", &cloud).with("max_bytes_per_second = 262144");
    let replica = |name: &str| {
        let mut spec = ConfigSpec::new(&harbor, &work.path().join(name)).target(target.clone());
        spec.listen = format!("127.0.0.1:{}", regtee::local_registry::free_port().unwrap());
        spec.admin = Some(format!(
            "127.0.0.1:{}",
            regtee::local_registry::free_port().unwrap()
        ));
        spec.state_extra = "lease = \"2s\"\n".into();
        spec
    };
    let doomed_spec = replica("doomed").on_postgres(postgres(), "killed_replica");
    let survivor_spec = replica("survivor").with_database(&doomed_spec);
    let mut doomed = RegteeProcess::spawn(
        &doomed_spec.write(&work.path().join("doomed.toml")),
        &doomed_spec,
        &work.path().join("doomed.log"),
    );
    wait_listening(doomed_spec.listen.parse().unwrap()).await;

    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[1_000_000, 300_000], "amd64");
    layout.tag(&image, "x");
    let host = doomed_spec.listen.clone();
    push_layout_ok(&layout.dir, "x", &host, "library/app:1", Tls::Off);
    let admin =
        |spec: &ConfigSpec, path: &str| format!("http://{}{path}", spec.admin.as_ref().unwrap());
    let client = raw_http_client(None, false);
    let get = |url: String| {
        let client = client.clone();
        async move {
            let resp = client
                .request(http::Request::get(url).body(regtee::body::empty()).unwrap())
                .await
                .ok()?;
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok()?;
            serde_json::from_slice::<serde_json::Value>(&body.to_bytes()).ok()
        }
    };
    let running = wait_until("a running job", Duration::from_secs(30), || async {
        let page = get(admin(&doomed_spec, "/api/v1/jobs?state=running")).await?;
        let jobs = page["jobs"].as_array()?.clone();
        (!jobs.is_empty()).then_some(jobs)
    })
    .await;
    doomed.kill9();

    let mut survivor = RegteeProcess::spawn(
        &survivor_spec.write(&work.path().join("survivor.toml")),
        &survivor_spec,
        &work.path().join("survivor.log"),
    );
    wait_listening(survivor_spec.listen.parse().unwrap()).await;
    let cloud_client = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&cloud_client, "library/app", "1", &image.digest).await;
    assert_blobs_equal(&cloud_client, "library/app", &layout, &image).await;

    // The jobs the dead replica held ran again, on the survivor, one attempt at a time.
    for job in &running {
        let id = job["id"].as_i64().unwrap();
        let detail = wait_until(
            "the resumed job to finish",
            Duration::from_secs(60),
            || async {
                let detail = get(admin(&survivor_spec, &format!("/api/v1/jobs/{id}"))).await?;
                (detail["job"]["state"] == "done" || detail["state"] == "done").then_some(detail)
            },
        )
        .await;
        let attempts = detail["attempts"].as_array().cloned().unwrap_or_default();
        assert!(!attempts.is_empty(), "{detail}");
        let mut spans: Vec<(i64, i64)> = attempts
            .iter()
            .map(|a| {
                (
                    a["started_at"].as_i64().unwrap(),
                    a["finished_at"].as_i64().unwrap(),
                )
            })
            .collect();
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "overlapping attempts: {spans:?}"
        );
    }
    survivor.kill9();
}

/// Harbor's token service on another origin: the challenge from one replica names a relay path
/// on it, and the client's token request lands on another replica, which has never seen that
/// realm: it learns it from Harbor and relays the request.
#[tokio::test(flavor = "multi_thread")]
async fn a_login_challenged_by_one_replica_gets_its_token_through_another() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let a = Regtee::start(&ConfigSpec::new(&harbor, &work.path().join("a"))).await;
    let b = Regtee::start(&ConfigSpec::new(&harbor, &work.path().join("b"))).await;
    let client = raw_http_client(None, false);
    let challenge = client
        .request(
            http::Request::get(format!("http://{}/v2/", a.host()))
                .body(regtee::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(challenge.status(), 401);
    let header = challenge.headers()["www-authenticate"].to_str().unwrap();
    let realm = regtee::registry::auth::Challenge::parse(header)
        .and_then(|c| c.param("realm").map(str::to_string))
        .unwrap();
    let on_a = format!("http://{}/", a.host());
    assert!(
        realm.starts_with(&on_a),
        "the realm is relayed by regtee: {realm}"
    );
    // The balancer sends the token request to the other replica.
    let on_b = realm.replacen(&on_a, &format!("http://{}/", b.host()), 1);
    assert!(
        on_b.len() > 16
            && on_b[on_b.len() - 16..]
                .chars()
                .all(|c| c.is_ascii_hexdigit())
    );
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{DEV_USER}:{DEV_PASSWORD}"));
    let (status, body) = http_request(
        &format!("{on_b}?service=registry&scope=repository:library/app:pull"),
        "GET",
        None,
        &[("authorization", &format!("Basic {basic}"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        token["token"].as_str().is_some_and(|t| !t.is_empty()) || token["access_token"].is_string(),
        "{body}"
    );
    // A relay id no Harbor realm has stays unknown, and nothing is fetched for it.
    let (status, _) = http_request(
        &format!("{}0000000000000000", &on_b[..on_b.len() - 16]),
        "GET",
        None,
        &[],
    )
    .await;
    assert_eq!(status, 404);
    a.stop().await;
    b.stop().await;
}
