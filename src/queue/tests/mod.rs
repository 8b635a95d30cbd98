//! The queue's contract, on every store: each scenario below runs against a SQLite file and a
//! real PostgreSQL server (`on_every_store!`). What only several processes can show (claims
//! racing, leases running out, notifications) is in `replicas.rs`, on PostgreSQL; what only one
//! process owning its file can show, in `one_process.rs`.

mod one_process;
mod replicas;

use super::job::AttemptResult;
use super::lifecycle::Standing;
use super::*;
use crate::local_postgres::LocalPostgres;
use crate::oci::digest::Digest;

fn digest(n: &str) -> Digest {
    Digest::sha256_of(n.as_bytes())
}

fn job(target: &str, tag: &str, d: &str) -> NewJob {
    NewJob {
        target: target.into(),
        kind: JobKind::Manifest,
        repository: "library/app".parse().unwrap(),
        tag: Some(tag.parse().unwrap()),
        digest: Some(digest(d)),
        mount_from: None,
        origin: JobOrigin::Push,
        source: None,
    }
}

fn done() -> Outcome {
    Outcome::Done {
        target_digest: Some(digest("d1").to_string()),
        note: String::new(),
    }
}

fn failed(reason: &str) -> Outcome {
    Outcome::Failed {
        reason: reason.into(),
        class: ErrorClass::Denied,
    }
}

/// A queue in a new SQLite file (kept while the directory lives).
fn sqlite() -> (Queue, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (Queue::open(dir.path()).unwrap(), dir)
}

/// The PostgreSQL server the tests of this binary share; each test makes its own database.
fn server() -> &'static LocalPostgres {
    static SERVER: std::sync::OnceLock<LocalPostgres> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| LocalPostgres::start().expect("PostgreSQL starts"))
}

/// A config whose queue is a new database `name` on the shared server, with `extra` lines under
/// `[state]`.
fn state(name: &str, extra: &str) -> crate::config::StateConfig {
    let pg = server();
    let url = pg.create_database(name).unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"https://h\"\n[state]\ndir = \"/nonexistent\"\ndatabase = \"{url}\"\ndatabase_password_env = \"DB_PASSWORD\"\n{extra}"
    );
    let password = pg.password().to_string();
    let env = move |k: &str| (k == "DB_PASSWORD").then(|| password.clone());
    crate::config::Config::parse(&text, std::path::Path::new("/r.toml"), &env)
        .unwrap()
        .state
}

/// A queue in a new PostgreSQL database `name`.
async fn postgres(name: &str) -> Queue {
    Queue::open_state(&state(name, "")).await.unwrap()
}

/// Runs each scenario (an `async fn(&Queue)`) on a SQLite file and on PostgreSQL.
macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    let (queue, _dir) = super::sqlite();
                    super::$scenario(&queue).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    let queue = super::postgres(stringify!($scenario)).await;
                    super::$scenario(&queue).await;
                }
            )*
        }
    };
}

on_every_store!(
    dedups_and_rearms,
    claims_and_outcomes_follow_the_lifecycle,
    a_retry_waits_until_it_is_due,
    counts_and_listings_see_every_job,
    operators_retry_finished_jobs_and_only_those,
    retention_forgets_old_finished_jobs_and_keeps_failed_ones,
    mount_sources_are_kept_newest_first_and_bounded,
    backfills_are_saved_listed_and_cancelled,
    everything_migrates_into_either_store_once,
    health_commits_a_write,
    the_primary_and_a_jobs_source_are_kept,
    manifests_are_claimed_before_blobs,
);

/// What a push seen twice, a push seen while its job runs, and a push seen after its job
/// finished each do.
async fn dedups_and_rearms(q: &Queue) {
    assert_eq!(q.enqueue(vec![job("a", "v1", "d1")]).await.unwrap(), 1);
    assert_eq!(q.enqueue(vec![job("a", "v1", "d1")]).await.unwrap(), 0);
    assert_eq!(q.enqueue(vec![job("b", "v1", "d1")]).await.unwrap(), 1);

    let claimed = q.claim("a").await.unwrap().unwrap();
    assert_eq!(claimed.state, JobState::Running);
    assert_eq!(claimed.attempts, 1);
    assert!(q.claim("a").await.unwrap().is_none());
    // A duplicate of a running job is merged into it, and re-arms it: the attempt under way
    // may have read Harbor before this push.
    assert_eq!(q.enqueue(vec![job("a", "v1", "d1")]).await.unwrap(), 1);
    q.finish(claimed.id, done()).await.unwrap();
    let rearmed = q.get(claimed.id).await.unwrap().unwrap();
    assert_eq!((rearmed.state, rearmed.attempts), (JobState::Pending, 0));
    assert_eq!(
        q.attempts(claimed.id).await.unwrap()[0].result,
        AttemptResult::Done
    );
    let claimed = q.claim("a").await.unwrap().unwrap();
    q.finish(claimed.id, done()).await.unwrap();
    assert_eq!(
        q.get(claimed.id).await.unwrap().unwrap().state,
        JobState::Done
    );
    // Seen again after it finished: re-armed.
    assert_eq!(q.enqueue(vec![job("a", "v1", "d1")]).await.unwrap(), 1);
    let again = q.get(claimed.id).await.unwrap().unwrap();
    assert_eq!((again.state, again.attempts), (JobState::Pending, 0));
    let attempts = q.attempts(claimed.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.result == AttemptResult::Done));
}

/// What the store writes is what the lifecycle decides: every column of the job a claim
/// returns and an outcome leaves equals the model's (`Standing`), stepped at the same times.
async fn claims_and_outcomes_follow_the_lifecycle(q: &Queue) {
    fn same(job: &Job, model: &Standing) {
        assert_eq!(
            (
                job.state,
                job.attempts,
                job.next_attempt_at,
                job.finished_at,
                job.updated_at,
                job.detail.as_str(),
                job.error_class,
                job.target_digest.as_deref(),
            ),
            (
                model.state,
                model.attempts,
                model.next_attempt_at,
                model.finished_at,
                model.updated_at,
                model.detail.as_str(),
                model.error_class,
                model.target_digest.as_deref(),
            )
        );
    }
    let store = &q.store;
    store
        .enqueue(vec![job("t", "v1", "d1")], 1_000)
        .await
        .unwrap();
    let mut model = Standing::new(1_000);
    let id = store
        .list(JobFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .id;
    same(&store.get(id).await.unwrap().unwrap(), &model);
    let retry = Outcome::RetryAt {
        at: 5_000,
        error: "refused".into(),
        class: ErrorClass::Unreachable,
    };
    for (claim_at, outcome, end_at) in [(2_000, retry, 3_000), (5_000, done(), 6_000)] {
        if claim_at > 2_000 {
            assert!(
                store.claim("t", claim_at - 1).await.unwrap().is_none(),
                "not due yet"
            );
        }
        model = model.claimed(claim_at);
        same(&store.claim("t", claim_at).await.unwrap().unwrap(), &model);
        let attempt;
        (model, attempt) = model.finished(&outcome, end_at);
        store.finish(id, outcome, end_at).await.unwrap();
        same(&store.get(id).await.unwrap().unwrap(), &model);
        let last = store.attempts(id).await.unwrap().pop().unwrap();
        assert_eq!(
            (last.started_at, last.finished_at, last.result, last.detail),
            (
                attempt.started_at,
                attempt.finished_at,
                attempt.result,
                attempt.detail
            )
        );
    }
    // The same write again, finished: the model and the store start it over alike.
    let super::lifecycle::Arrival::Rearmed(again) = model.arrival(7_000) else {
        panic!("a finished job is re-armed")
    };
    assert_eq!(
        store
            .enqueue(vec![job("t", "v1", "d1")], 7_000)
            .await
            .unwrap(),
        1
    );
    same(&store.get(id).await.unwrap().unwrap(), &again);
}

async fn a_retry_waits_until_it_is_due(q: &Queue) {
    q.enqueue(vec![job("a", "v1", "d1"), job("a", "v2", "d2")])
        .await
        .unwrap();
    let first = q.claim("a").await.unwrap().unwrap();
    q.finish(
        first.id,
        Outcome::RetryAt {
            at: now_ms() + 60_000,
            error: "connection refused".into(),
            class: ErrorClass::Unreachable,
        },
    )
    .await
    .unwrap();
    let second = q.claim("a").await.unwrap().unwrap();
    assert_ne!(second.id, first.id);
    assert!(
        q.claim("a").await.unwrap().is_none(),
        "the retry is not due yet"
    );
    assert!(q.next_due("a").await.unwrap().unwrap() > now_ms());
    let attempts = q.attempts(first.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].result, AttemptResult::Retry);
    assert_eq!(attempts[0].detail, "connection refused");
}

async fn counts_and_listings_see_every_job(q: &Queue) {
    q.enqueue(vec![
        job("a", "v1", "d1"),
        job("a", "v2", "d2"),
        job("b", "v1", "d1"),
    ])
    .await
    .unwrap();
    let j = q.claim("a").await.unwrap().unwrap();
    q.finish(j.id, failed("namespace missing")).await.unwrap();
    let counts = q
        .counts(&["a".into(), "b".into(), "idle".into()])
        .await
        .unwrap();
    let rows: Vec<(&str, u64, u64)> = counts
        .iter()
        .map(|c| (c.target.as_str(), c.pending, c.failed))
        .collect();
    assert_eq!(rows, vec![("a", 1, 1), ("b", 1, 0), ("idle", 0, 0)]);
    assert!(counts[0].oldest_pending_at.is_some());
    assert!(counts[2].oldest_pending_at.is_none());

    let listed = |filter: JobFilter| async move { q.list(filter).await.unwrap() };
    let failed = listed(JobFilter {
        state: Some(JobState::Failed),
        project: Some("library".into()),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].detail, "namespace missing");
    assert!(
        listed(JobFilter {
            project: Some("lib".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .is_empty(),
        "a project is a whole name component"
    );
    let page = listed(JobFilter {
        target: Some("a".into()),
        limit: 1,
        ..Default::default()
    })
    .await;
    assert_eq!(page.len(), 1);
    let next = listed(JobFilter {
        target: Some("a".into()),
        before_id: Some(page[0].id),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(next.len(), 1);
    assert!(next[0].id < page[0].id, "newest first, then older");
}

async fn operators_retry_finished_jobs_and_only_those(q: &Queue) {
    q.enqueue(vec![
        job("a", "v1", "d1"),
        job("a", "v2", "d2"),
        job("b", "v1", "d1"),
    ])
    .await
    .unwrap();
    let a1 = q.claim("a").await.unwrap().unwrap();
    q.finish(a1.id, failed("denied")).await.unwrap();
    let b1 = q.claim("b").await.unwrap().unwrap();
    q.finish(b1.id, failed("denied")).await.unwrap();
    let a2 = q.claim("a").await.unwrap().unwrap();
    assert!(
        !q.retry(a2.id).await.unwrap(),
        "a running job is not retried"
    );
    assert!(
        !q.retry(9_999_999).await.unwrap(),
        "nor one that does not exist"
    );
    q.finish(a2.id, done()).await.unwrap();
    assert!(q.retry(a2.id).await.unwrap(), "a done job is");
    assert_eq!(q.retry_failed(Some("a".into())).await.unwrap(), 1);
    assert_eq!(
        q.get(b1.id).await.unwrap().unwrap().state,
        JobState::Failed,
        "another target's failures stay"
    );
    assert_eq!(q.retry_failed(None).await.unwrap(), 1);
    for id in [a1.id, a2.id, b1.id] {
        let j = q.get(id).await.unwrap().unwrap();
        assert_eq!(
            (j.state, j.attempts, j.finished_at),
            (JobState::Pending, 0, None)
        );
    }
}

async fn retention_forgets_old_finished_jobs_and_keeps_failed_ones(q: &Queue) {
    let store = &q.store;
    let long_ago = now_ms() - 40 * 86_400_000;
    store
        .enqueue(
            vec![
                job("a", "old", "d1"),
                job("a", "broken", "d2"),
                job("a", "new", "d3"),
            ],
            long_ago,
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (outcome, at) in [
        (done(), long_ago),
        (failed("no namespace"), long_ago),
        (done(), now_ms()),
    ] {
        let j = store.claim("a", at).await.unwrap().unwrap();
        store.finish(j.id, outcome, at).await.unwrap();
        ids.push(j.id);
    }
    store
        .remember_blob_home(BlobHome {
            target: "a".into(),
            digest: "sha256:old".into(),
            repository: "x".into(),
            seen_at: long_ago,
        })
        .await
        .unwrap();
    assert_eq!(q.purge(Duration::from_secs(30 * 86_400)).await.unwrap(), 1);
    assert!(
        q.get(ids[0]).await.unwrap().is_none(),
        "the old done job is gone"
    );
    assert!(
        q.attempts(ids[0]).await.unwrap().is_empty(),
        "its attempts go with it"
    );
    assert_eq!(
        q.get(ids[1]).await.unwrap().unwrap().state,
        JobState::Failed,
        "failed jobs stay until retried"
    );
    assert!(q.get(ids[2]).await.unwrap().is_some(), "a recent job stays");
    assert!(
        store
            .blob_homes("a", "sha256:old", 8)
            .await
            .unwrap()
            .is_empty(),
        "a mount source not seen since is forgotten"
    );
}

async fn mount_sources_are_kept_newest_first_and_bounded(q: &Queue) {
    let d = digest("blob");
    for i in 0..12 {
        q.store
            .remember_blob_home(BlobHome {
                target: "a".into(),
                digest: d.to_string(),
                repository: format!("lib/r{i}"),
                seen_at: 1_000 + i,
            })
            .await
            .unwrap();
    }
    // Seen again: most recent.
    q.remember_blob_home("a", &d, "lib/r0").await.unwrap();
    let homes = q.blob_homes("a", &d).await.unwrap();
    assert_eq!(homes.len(), BLOB_HOMES_KEPT as usize);
    assert_eq!(homes[0], "lib/r0");
    assert_eq!(homes[1], "lib/r11");
    assert!(q.blob_homes("b", &d).await.unwrap().is_empty());
}

async fn backfills_are_saved_listed_and_cancelled(q: &Queue) {
    let running = q.record_backfill("{\"n\":1}".into()).await.unwrap();
    let ended = q.record_backfill("{\"n\":1}".into()).await.unwrap();
    assert_ne!(running, ended);
    q.save_backfill(running, "{\"n\":2}".into(), true)
        .await
        .unwrap();
    q.save_backfill(ended, "{\"n\":3}".into(), false)
        .await
        .unwrap();
    let seen = q.backfill(running).await.unwrap().unwrap();
    assert_eq!(
        (seen.progress.as_str(), seen.interrupted),
        ("{\"n\":2}", false)
    );
    let all = q.backfills().await.unwrap();
    assert_eq!(
        all.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ended, running],
        "newest first"
    );
    assert!(q.backfill(12_345).await.unwrap().is_none());

    assert!(!q.backfill_cancel_requested(running).await.unwrap());
    assert!(q.request_backfill_cancel(running).await.unwrap());
    assert!(
        q.request_backfill_cancel(running).await.unwrap(),
        "asking twice is fine"
    );
    assert!(q.backfill_cancel_requested(running).await.unwrap());
    assert!(
        !q.request_backfill_cancel(ended).await.unwrap(),
        "an ended backfill is not running"
    );
    assert!(!q.backfill_cancel_requested(ended).await.unwrap());
}

/// `regtee state migrate`, through the contract: whatever this store is, its content goes into
/// a new SQLite file and a new PostgreSQL database alike, once.
async fn everything_migrates_into_either_store_once(q: &Queue) {
    q.enqueue(vec![
        job("a", "v1", "d1"),
        job("a", "v2", "d2"),
        job("a", "v3", "d3"),
    ])
    .await
    .unwrap();
    let failed_job = q.claim("a").await.unwrap().unwrap();
    q.finish(failed_job.id, failed("denied")).await.unwrap();
    let running = q.claim("a").await.unwrap().unwrap();
    q.remember_blob_home("a", &digest("blob"), "lib/x")
        .await
        .unwrap();

    static MIGRATIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MIGRATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (into_sqlite, _dir) = sqlite();
    let into_postgres = postgres(&format!("migrated_{n}_{}", std::process::id())).await;
    for into in [&into_sqlite, &into_postgres] {
        let first = q.migrate_into(into).await.unwrap();
        assert_eq!(
            (first.jobs, first.added, first.attempts, first.mount_sources),
            (3, 3, 1, 1)
        );
        let again = q.migrate_into(into).await.unwrap();
        assert_eq!(
            (again.added, again.attempts, again.mount_sources),
            (0, 0, 0),
            "a second run adds nothing"
        );
        let counts = into.counts(&[]).await.unwrap();
        assert_eq!(
            (counts[0].pending, counts[0].running, counts[0].failed),
            (2, 0, 1),
            "the running job arrives pending"
        );
        let listed = into
            .list(JobFilter {
                state: Some(JobState::Failed),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed[0].detail, "denied");
        assert_eq!(into.attempts(listed[0].id).await.unwrap().len(), 1);
        assert_eq!(
            into.blob_homes("a", &digest("blob")).await.unwrap(),
            vec!["lib/x".to_string()]
        );
    }
    assert_eq!(
        q.get(running.id).await.unwrap().unwrap().state,
        JobState::Running
    );
}

async fn health_commits_a_write(q: &Queue) {
    q.health().await.unwrap();
    q.health().await.unwrap();
}

async fn the_primary_and_a_jobs_source_are_kept(q: &Queue) {
    assert_eq!(
        q.primary().await.unwrap(),
        PrimaryRecord::default(),
        "Harbor at first"
    );
    let record = PrimaryRecord {
        primary: Primary::Target("tcr".into()),
        since: 1_700_000_000_000,
        by: "ops".into(),
        forced: true,
    };
    q.set_primary(&record).await.unwrap();
    assert_eq!(q.primary().await.unwrap(), record);
    let back = PrimaryRecord {
        primary: Primary::Upstream,
        since: 1_700_000_100_000,
        by: "ops".into(),
        forced: false,
    };
    q.set_primary(&back).await.unwrap();
    assert_eq!(q.primary().await.unwrap(), back);

    let mut from_target = job("upstream", "v1", "d1");
    from_target.source = Some("tcr".into());
    q.enqueue(vec![from_target, job("other", "v1", "d1")])
        .await
        .unwrap();
    let claimed = q.claim("upstream").await.unwrap().unwrap();
    assert_eq!(claimed.source.as_deref(), Some("tcr"));
    let claimed = q.claim("other").await.unwrap().unwrap();
    assert_eq!(claimed.source, None, "Harbor's");
}

async fn manifests_are_claimed_before_blobs(q: &Queue) {
    let blob = |d: &str| NewJob {
        kind: JobKind::Blob,
        tag: None,
        ..job("tcr", "x", d)
    };
    // Blob jobs of one push, then the manifest of another: the manifest goes first, then the
    // blobs in the order they came.
    q.enqueue(vec![blob("b1"), blob("b2")]).await.unwrap();
    q.enqueue(vec![job("tcr", "v1", "m1")]).await.unwrap();
    q.enqueue(vec![blob("b3")]).await.unwrap();
    let mut order = Vec::new();
    while let Some(claimed) = q.claim("tcr").await.unwrap() {
        order.push(claimed.digest.unwrap_or_default());
    }
    let expected: Vec<String> = ["m1", "b1", "b2", "b3"]
        .iter()
        .map(|d| digest(d).to_string())
        .collect();
    assert_eq!(order, expected);
}
