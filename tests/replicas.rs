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
    // A command reading the queue is no replica: `regtee status` lists the two and stays out.
    let config = a_spec.write(&work.path().join("a.toml"));
    let out = regtee_cli(&config, &a_spec, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    for r in replicas {
        assert_says(&out, r["id"].as_str().unwrap());
    }
    let ids = |status: &serde_json::Value| -> Vec<String> {
        status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["id"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(ids(&status(&a).await), ids(&seen_by_a));

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
    spec.state_extra = "database_timeout = \"2s\"\n".into();
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

    // A burst while it is away: each push refused at least once, then retried by its client
    // until acknowledged once the database is back; a client pulls all along and never fails.
    let burst: Vec<_> = (0..3)
        .map(|i| {
            let image = layout.image(&[60_000 + i], "amd64");
            layout.tag(&image, &format!("burst{i}"));
            image
        })
        .collect();
    let refusals: Vec<std::sync::atomic::AtomicUsize> =
        (0..burst.len()).map(|_| Default::default()).collect();
    let burst_done = std::sync::atomic::AtomicBool::new(false);
    let host = regtee.host();
    let pulls = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let puller = scope.spawn(|| {
                let mut pulls = 0;
                while !burst_done.load(std::sync::atomic::Ordering::SeqCst) {
                    let dest = work.path().join(format!("pulled-{pulls}"));
                    pull_to_layout(
                        &host,
                        "library/app:before",
                        &dest,
                        (DEV_USER, DEV_PASSWORD),
                        Tls::Off,
                    );
                    pulls += 1;
                }
                pulls
            });
            let pushers: Vec<_> = (0..burst.len())
                .map(|i| {
                    let (dir, host, refused) = (&layout.dir, &host, &refusals[i]);
                    scope.spawn(move || {
                        let deadline = std::time::Instant::now() + Duration::from_secs(90);
                        loop {
                            let tag = format!("burst{i}");
                            let out = push_layout(
                                dir,
                                &tag,
                                host,
                                &format!("library/app:{tag}"),
                                Tls::Off,
                            );
                            if out.status.success() {
                                return;
                            }
                            refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            assert!(
                                std::time::Instant::now() < deadline,
                                "push {i} never acknowledged: {}",
                                text(&out)
                            );
                            // A client's pause between retries.
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    })
                })
                .collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while refusals
                .iter()
                .any(|r| r.load(std::sync::atomic::Ordering::SeqCst) == 0)
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "burst pushes were not refused"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            match how {
                Away::Stopped => database.restart().unwrap(),
                Away::Stalled => database.thaw().unwrap(),
            }
            database.wait_ready(Duration::from_secs(30)).unwrap();
            for pusher in pushers {
                pusher.join().unwrap();
            }
            burst_done.store(true, std::sync::atomic::Ordering::SeqCst);
            puller.join().unwrap()
        })
    });
    assert!(pulls >= 1, "pulls ran during the burst");
    // The refused push, retried, is acknowledged too; all of it reaches the target.
    push_layout_ok(
        &layout.dir,
        "during",
        &regtee.host(),
        "library/app:during",
        Tls::Off,
    );
    for (tag, image) in std::iter::once(("during".to_string(), &during)).chain(
        burst
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("burst{i}"), b)),
    ) {
        wait_for_manifest(&target, "library/app", &tag, &image.digest).await;
        assert_blobs_equal(&target, "library/app", &layout, image).await;
    }
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

    // The mount sources come along: the first copy of a blob after the move can still mount.
    let homes = "SELECT target || '|' || digest || '|' || repository FROM blob_homes ORDER BY 1";
    let homes_before = rows(homes);
    assert!(!homes_before.is_empty(), "the mirrored blobs' homes");
    assert_says(
        &first,
        &format!("{} mount sources added", homes_before.len()),
    );
    let homes_in_postgres = postgres().psql("migrated", homes).unwrap();
    assert_eq!(homes_in_postgres.lines().collect::<Vec<_>>(), homes_before);

    let second = migrate(&config, &spec, &url);
    assert!(second.status.success(), "{}", text(&second));
    assert_says(&second, "0 copied into");
    assert_says(&second, "0 mount sources added");
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
    let realm = regtee::Challenge::parse(header)
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

/// One push as a client makes it: retried (up to five times, as a CI job would) while it fails.
/// Returns what the acknowledged try printed (none if no try was), and how many tries failed.
fn push_with_retries(
    push: impl Fn() -> std::process::Output,
) -> (Option<std::process::Output>, usize) {
    for failed in 0..5 {
        let out = push();
        if out.status.success() {
            return (Some(out), failed);
        }
    }
    (None, 5)
}

/// The nginx front of `deploy/nginx/regtee-replicas.conf`, as shipped, with its listen address
/// and upstream servers set to this test's.
fn balancer_config(listen: &str, replicas: &[&str]) -> String {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/regtee-replicas.conf"),
    )
    .unwrap();
    let servers: String = replicas
        .iter()
        .map(|r| format!("    server {r} max_fails=2 fail_timeout=5s;\n"))
        .collect();
    let mut out = String::new();
    let mut servers_written = false;
    for line in shipped.lines() {
        if line.trim_start().starts_with("server 127.0.0.1:") {
            if !std::mem::replace(&mut servers_written, true) {
                out.push_str(&servers);
            }
        } else if line.trim() == "listen 5000;" {
            out.push_str(&format!("    listen {listen};\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(servers_written && out.contains(listen), "{out}");
    out
}

/// Three replicas on one database behind nginx doing round-robin (the shipped front), Harbor as
/// deployed (HTTPS, its nginx) behind them; skopeo and the Docker engine push a burst through
/// the front. One replica is SIGKILLed in the middle of the burst, another while it mirrors.
/// Every push a client saw succeed reaches the target with Harbor's digest, no job ever had two
/// attempts at once, and the second replica's running jobs run again within a lease.
#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_behind_nginx_lose_nothing_when_two_are_killed() {
    const LEASE: Duration = Duration::from_secs(4);
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    // A slow target (256 KiB/s per replica), so copies are still running when a replica dies.
    let target = TargetSpec::cloud("tcr", &cloud).with("max_bytes_per_second = 262144");
    let first =
        ConfigSpec::new(&harbor, &work.path().join("r0")).on_postgres(postgres(), "three_replicas");
    let specs: Vec<ConfigSpec> = (0..3)
        .map(|i| {
            let mut spec = ConfigSpec::new(&harbor, &work.path().join(format!("r{i}")))
                .target(target.clone())
                .with_database(&first);
            spec.listen = format!("127.0.0.1:{}", regtee::local_registry::free_port().unwrap());
            spec.admin = Some(format!(
                "127.0.0.1:{}",
                regtee::local_registry::free_port().unwrap()
            ));
            spec.state_extra = format!("lease = \"{}s\"\n", LEASE.as_secs());
            spec
        })
        .collect();
    let mut replicas: Vec<RegteeProcess> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            RegteeProcess::spawn(
                &spec.write(&work.path().join(format!("r{i}.toml"))),
                spec,
                &work.path().join(format!("r{i}.log")),
            )
        })
        .collect();
    for spec in &specs {
        wait_listening(spec.listen.parse().unwrap()).await;
    }
    let front_addr = format!("127.0.0.1:{}", regtee::local_registry::free_port().unwrap());
    let listens: Vec<&str> = specs.iter().map(|s| s.listen.as_str()).collect();
    let _front = crate::support::nginx::Nginx::start(
        &work.path().join("front"),
        &balancer_config(&front_addr, &listens),
        front_addr.parse().unwrap(),
    )
    .await;

    // The burst: skopeo images and Docker engine images, all through the front.
    let mut layout = Layout::new(&work.path().join("layout"));
    let skopeo_images: Vec<_> = (0..4)
        .map(|i| {
            let image = layout.image(&[200_000 + i, 100_000 + i], "amd64");
            layout.tag(&image, &format!("s{i}"));
            image
        })
        .collect();
    let daemon = crate::support::docker::dockerd();
    let docker_config = work.path().join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let docker_images: Vec<_> = (0..2)
        .map(|i| {
            let image =
                layout.docker_image(&[layout.tar_layer(250_000), layout.tar_layer(20_000 + i)]);
            layout.tag(&image, &format!("d{i}"));
            daemon.load(
                &docker_config,
                &layout,
                &format!("d{i}"),
                &format!("regtee-burst/d{i}"),
                work.path(),
            );
            image
        })
        .collect();
    let login = tokio::task::block_in_place(|| {
        daemon.command_with_stdin(
            &docker_config,
            &["login", "-u", DEV_USER, "--password-stdin", &front_addr],
            Some(DEV_PASSWORD),
        )
    });
    assert!(login.status.success(), "docker login: {}", text(&login));

    let pid = |i: usize| replicas[i].child.id();
    let pids: Vec<u32> = (0..3).map(pid).collect();
    let database = postgres();
    let running_on = |pid: u32| {
        let rows = database
            .psql(
                "three_replicas",
                &format!(
                    "SELECT id FROM jobs WHERE state = 'running' AND lease_owner LIKE '%-{pid}-%'"
                ),
            )
            .unwrap();
        rows.lines()
            .filter_map(|l| l.trim().parse::<i64>().ok())
            .collect::<Vec<i64>>()
    };
    let (results, killed) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let skopeo_pushes: Vec<_> = (0..skopeo_images.len())
                .map(|i| {
                    let (dir, host) = (&layout.dir, &front_addr);
                    scope.spawn(move || {
                        push_with_retries(|| {
                            push_layout(
                                dir,
                                &format!("s{i}"),
                                host,
                                &format!("library/s{i}:1"),
                                Tls::Off,
                            )
                        })
                    })
                })
                .collect();
            let docker_pushes: Vec<_> = (0..docker_images.len())
                .map(|i| {
                    let (config, host) = (&docker_config, &front_addr);
                    scope.spawn(move || {
                        let reference = format!("{host}/library/d{i}:1");
                        let tagged = daemon.command(
                            config,
                            &["tag", &format!("regtee-burst/d{i}:latest"), &reference],
                        );
                        assert!(tagged.status.success(), "{}", text(&tagged));
                        push_with_retries(|| daemon.command(config, &["push", &reference]))
                    })
                })
                .collect();
            // Mid-burst: replica 0 dies once the first job is recorded.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while database
                .psql("three_replicas", "SELECT COUNT(*) FROM jobs")
                .unwrap()
                .trim()
                == "0"
            {
                assert!(std::time::Instant::now() < deadline, "no job recorded");
                std::thread::sleep(Duration::from_millis(20));
            }
            replicas[0].kill9();
            // Mid-mirroring: replica 1 dies while it holds running jobs.
            let held = loop {
                let held = running_on(pids[1]);
                if !held.is_empty() {
                    break held;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "replica 1 never ran a job"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            replicas[1].kill9();
            let killed_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let results: Vec<(Option<std::process::Output>, usize)> = skopeo_pushes
                .into_iter()
                .chain(docker_pushes)
                .map(|h| h.join().unwrap())
                .collect();
            (results, (held, killed_at))
        })
    });
    let retried: Vec<usize> = results.iter().map(|(_, failed)| *failed).collect();
    assert!(
        results
            .iter()
            .all(|(acknowledged, _)| acknowledged.is_some()),
        "every push acknowledged within five tries (failed tries per push: {retried:?})"
    );
    eprintln!("failed tries per push before it was acknowledged: {retried:?}");

    // Every acknowledged push is on the target with Harbor's digest.
    let on_harbor = harbor.client(DEV_USER, DEV_PASSWORD);
    let on_target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    // skopeo pushes the layout's manifest as it is; docker writes its own, and says its digest.
    let acknowledged: Vec<(String, String)> = (0..skopeo_images.len())
        .map(|i| (format!("library/s{i}"), skopeo_images[i].digest.clone()))
        .chain((0..docker_images.len()).map(|i| {
            let out = results[skopeo_images.len() + i].0.as_ref().unwrap();
            (
                format!("library/d{i}"),
                crate::support::docker::pushed_digest(out),
            )
        }))
        .collect();
    for (repository, digest) in &acknowledged {
        let harbors = on_harbor
            .manifest_head(repository, "1")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{repository}:1 on Harbor"));
        assert_eq!(harbors.digest.as_str(), digest, "{repository}");
        wait_for_manifest(&on_target, repository, "1", digest).await;
    }
    for (i, image) in skopeo_images.iter().enumerate() {
        assert_blobs_equal(&on_target, &format!("library/s{i}"), &layout, image).await;
    }

    // Replica 1's running jobs ran again elsewhere, once its leases ran out.
    let (held, killed_at) = killed;
    for id in &held {
        let resumed_at = wait_until(
            "a killed replica's job resumed and done",
            Duration::from_secs(60),
            || async {
                let rows = database
                    .psql(
                        "three_replicas",
                        &format!(
                            "SELECT MIN(a.started_at) FROM attempts a JOIN jobs j ON j.id = a.job_id \
                             WHERE a.job_id = {id} AND a.replica NOT LIKE '%-{}-%' AND j.state = 'done'",
                            pids[1]
                        ),
                    )
                    .ok()?;
                rows.trim().parse::<i64>().ok()
            },
        )
        .await;
        // Its lease runs out at most a lease after the kill, and a live replica's keeper takes
        // it back within a third of a lease more: within two leases, scheduling included.
        let waited = Duration::from_millis((resumed_at - killed_at).max(0) as u64);
        assert!(
            waited <= 2 * LEASE,
            "job {id} resumed {waited:?} after its replica was killed (lease {LEASE:?})"
        );
    }
    // No job ever had two attempts at once.
    let overlapping = database
        .psql(
            "three_replicas",
            "SELECT COUNT(*) FROM attempts a JOIN attempts b ON a.job_id = b.job_id AND a.id < b.id \
             AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
        )
        .unwrap();
    assert_eq!(overlapping.trim(), "0", "overlapping attempts");
    let docker_out = tokio::task::block_in_place(|| {
        for i in 0..docker_images.len() {
            let _ = daemon.command(
                &docker_config,
                &["rmi", "-f", &format!("regtee-burst/d{i}:latest")],
            );
        }
        daemon.command(&docker_config, &["logout", &front_addr])
    });
    assert!(docker_out.status.success(), "{}", text(&docker_out));
    replicas[2].kill9();
}
