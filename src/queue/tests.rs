//! The queue against a real SQLite file.
use super::*;
use crate::oci::digest::Digest;
use rusqlite::params;

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
    }
}

/// Deduplication and re-arming, the same on every store: what a push seen twice, a push seen
/// while its job runs, and a push seen after its job finished each do.
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
    let done = || Outcome::Done {
        target_digest: Some(digest("d1").to_string()),
        note: String::new(),
    };
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
    // Every attempt stays in the history; counts and listings see the same jobs.
    let attempts = q.attempts(claimed.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.result == AttemptResult::Done));
    let counts = q
        .counts(&["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    let pending: Vec<(&str, u64)> = counts
        .iter()
        .map(|c| (c.target.as_str(), c.pending))
        .collect();
    assert_eq!(pending, vec![("a", 1), ("b", 1), ("c", 0)]);
    let listed = q
        .list(JobFilter {
            project: Some("library".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
}

#[tokio::test]
async fn enqueue_dedups_and_rearms_finished_jobs() {
    let dir = tempfile::tempdir().unwrap();
    dedups_and_rearms(&Queue::open(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn retry_later_waits_and_interrupted_jobs_recover() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
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
        "retry is not due yet"
    );
    assert!(q.next_due("a").await.unwrap().unwrap() > now_ms());
    let backfill = q.record_backfill("{}".into()).await.unwrap();
    let ended = q.record_backfill("{}".into()).await.unwrap();
    q.save_backfill(ended, "{}".into(), false).await.unwrap();

    drop(q);
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recover_interrupted().await.unwrap(), 1);
    // A backfill the dead process was running will not end; one that ended stays as it was.
    assert!(q.backfill(backfill).await.unwrap().unwrap().interrupted);
    assert!(!q.backfill(ended).await.unwrap().unwrap().interrupted);
    assert_eq!(q.claim("a").await.unwrap().unwrap().id, second.id);
    let attempts = q.attempts(first.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].result, AttemptResult::Retry);
}

#[tokio::test]
async fn counts_list_retry_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.enqueue(vec![job("a", "v1", "d1"), job("a", "v2", "d2")])
        .await
        .unwrap();
    let j = q.claim("a").await.unwrap().unwrap();
    q.finish(
        j.id,
        Outcome::Failed {
            reason: "namespace missing".into(),
            class: ErrorClass::Denied,
        },
    )
    .await
    .unwrap();
    let counts = q.counts(&["a".into(), "idle".into()]).await.unwrap();
    assert_eq!(counts.len(), 2);
    assert_eq!((counts[1].target.as_str(), counts[1].pending), ("idle", 0));
    assert_eq!((counts[0].pending, counts[0].failed), (1, 1));
    assert!(counts[0].oldest_pending_at.is_some());

    let failed = q
        .list(JobFilter {
            state: Some(JobState::Failed),
            project: Some("library".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].detail, "namespace missing");
    let other_project = q
        .list(JobFilter {
            project: Some("lib".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(other_project.is_empty());

    assert_eq!(q.retry_failed(None).await.unwrap(), 1);
    assert_eq!(q.counts(&[]).await.unwrap()[0].failed, 0);
}

#[tokio::test]
async fn purge_deletes_old_finished_jobs_and_keeps_failed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.enqueue(vec![
        job("a", "old", "d1"),
        job("a", "broken", "d2"),
        job("a", "new", "d3"),
    ])
    .await
    .unwrap();
    let mut ids = Vec::new();
    for outcome in [
        Outcome::Done {
            target_digest: None,
            note: String::new(),
        },
        Outcome::Failed {
            reason: "no namespace".into(),
            class: ErrorClass::Denied,
        },
        Outcome::Done {
            target_digest: None,
            note: String::new(),
        },
    ] {
        let j = q.claim("a").await.unwrap().unwrap();
        q.finish(j.id, outcome).await.unwrap();
        ids.push(j.id);
    }
    // The first two finished long ago; the third just now.
    let long_ago = now_ms() - 40 * 86_400_000;
    let (old, broken) = (ids[0], ids[1]);
    q.sqlite()
        .with(move |c| {
            c.execute(
                "UPDATE jobs SET finished_at = ?1 WHERE id IN (?2, ?3)",
                params![long_ago, old, broken],
            )
        })
        .await
        .unwrap();
    assert_eq!(q.purge(Duration::from_secs(30 * 86_400)).await.unwrap(), 1);
    assert!(
        q.get(ids[0]).await.unwrap().is_none(),
        "the old done job is gone"
    );
    assert_eq!(
        q.get(ids[1]).await.unwrap().unwrap().state,
        JobState::Failed,
        "failed jobs stay until retried"
    );
    assert!(q.get(ids[2]).await.unwrap().is_some(), "a recent job stays");
    assert!(
        q.attempts(ids[0]).await.unwrap().is_empty(),
        "its attempts go with it"
    );
}

/// The same queue on a real PostgreSQL server, shared by the tests of this binary (one database
/// each), as several replicas use it.
mod on_postgres {
    use super::*;
    use crate::config::Config;
    use crate::local_postgres::LocalPostgres;

    fn server() -> &'static LocalPostgres {
        static SERVER: std::sync::OnceLock<LocalPostgres> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| LocalPostgres::start().expect("PostgreSQL starts"))
    }

    /// A config whose queue is a new database `name`, with `extra` lines under `[state]`.
    fn state(name: &str, extra: &str) -> StateConfig {
        let pg = server();
        let url = pg.create_database(name).unwrap();
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"https://h\"\n[state]\ndir = \"/nonexistent\"\ndatabase = \"{url}\"\ndatabase_password_env = \"DB_PASSWORD\"\n{extra}"
        );
        let password = pg.password().to_string();
        let env = move |k: &str| (k == "DB_PASSWORD").then(|| password.clone());
        Config::parse(&text, std::path::Path::new("/r.toml"), &env)
            .unwrap()
            .state
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dedups_rearms_and_keeps_attempts_like_sqlite() {
        let q = Queue::open_state(&state("dedups", "")).await.unwrap();
        q.health().await.unwrap();
        dedups_and_rearms(&q).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn replicas_never_claim_the_same_job() {
        let config = state("claims", "");
        let a = Arc::new(Queue::open_state(&config).await.unwrap());
        let b = Arc::new(Queue::open_state(&config).await.unwrap());
        let jobs: Vec<NewJob> = (0..200).map(|i| job("t", &format!("v{i}"), "d")).collect();
        assert_eq!(a.enqueue(jobs).await.unwrap(), 200);
        let claim_all = |q: Arc<Queue>| async move {
            let mut ids = Vec::new();
            while let Some(job) = q.claim("t").await.unwrap() {
                ids.push(job.id);
            }
            ids
        };
        let (from_a, from_b) = tokio::join!(
            tokio::spawn(claim_all(a.clone())),
            tokio::spawn(claim_all(b.clone()))
        );
        let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
        assert!(
            !from_a.is_empty() && !from_b.is_empty(),
            "both replicas took work"
        );
        let mut all: Vec<i64> = from_a.iter().chain(&from_b).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 200, "every job claimed exactly once");
        assert_eq!(from_a.len() + from_b.len(), 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dead_replicas_job_is_taken_over_once_its_lease_runs_out() {
        let config = state("leases", "lease = \"1s\"\n");
        let dead = Queue::open_state(&config).await.unwrap();
        let alive = Queue::open_state(&config).await.unwrap();
        dead.enqueue(vec![job("t", "v1", "d")]).await.unwrap();
        let taken = dead.claim("t").await.unwrap().unwrap();
        // `dead` renews nothing from here on. Within a lease, the job stays its own.
        assert_eq!(alive.recover_interrupted().await.unwrap(), 0);
        assert!(alive.claim("t").await.unwrap().is_none());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let resumed = loop {
            if alive.recover_interrupted().await.unwrap() == 1 {
                break alive.claim("t").await.unwrap().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "lease never ran out");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!((resumed.id, resumed.attempts), (taken.id, 2));
        // The dead replica's late outcome is history, not state: the job is the other's now.
        dead.finish(
            taken.id,
            Outcome::Failed {
                reason: "late".into(),
                class: ErrorClass::Unreachable,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            alive.get(taken.id).await.unwrap().unwrap().state,
            JobState::Running
        );
        alive
            .finish(
                taken.id,
                Outcome::Done {
                    target_digest: None,
                    note: String::new(),
                },
            )
            .await
            .unwrap();
        let results: Vec<AttemptResult> = alive
            .attempts(taken.id)
            .await
            .unwrap()
            .iter()
            .map(|a| a.result)
            .collect();
        assert_eq!(results, vec![AttemptResult::Failed, AttemptResult::Done]);
        assert_eq!(
            alive.get(taken.id).await.unwrap().unwrap().state,
            JobState::Done
        );
    }

    /// A replica renews the leases of the jobs its workers hold, and only those: a claim whose
    /// answer never reached it (its deadline passed after the database committed) runs out like
    /// a dead replica's and is taken over, while the job in hand stays its own.
    #[tokio::test(flavor = "multi_thread")]
    async fn only_jobs_in_hand_are_renewed_so_a_lost_claim_runs_again() {
        let config = state("lost_claim", "lease = \"1s\"\n");
        let a = Queue::open_state(&config).await.unwrap();
        let b = Queue::open_state(&config).await.unwrap();
        a.enqueue(vec![job("t", "held", "d"), job("t", "lost", "d")])
            .await
            .unwrap();
        let held = a.claim("t").await.unwrap().unwrap();
        let lost = a.claim("t").await.unwrap().unwrap();
        let Store::Postgres(pg) = &a.store else {
            unreachable!()
        };
        pg.forget_claim(lost.id);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let taken = loop {
            // Either replica may be the one to put it back.
            let put_back =
                a.recover_interrupted().await.unwrap() + b.recover_interrupted().await.unwrap();
            if put_back > 0 {
                break b.claim("t").await.unwrap().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "lease never ran out");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(taken.id, lost.id);
        // Renewed all along: still running, nobody else can claim it.
        assert_eq!(
            a.get(held.id).await.unwrap().unwrap().state,
            JobState::Running
        );
        assert!(b.claim("t").await.unwrap().is_none());
    }

    /// A backfill is seen by every replica as its replica saved it; once that replica has been
    /// silent for three leases, the backfill is marked interrupted.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_silent_replicas_backfill_is_marked_interrupted() {
        let config = state("backfills", "lease = \"1s\"\n");
        let dead = Queue::open_state(&config).await.unwrap();
        let alive = Queue::open_state(&config).await.unwrap();
        // Both start as servers do.
        dead.recover_interrupted().await.unwrap();
        alive.recover_interrupted().await.unwrap();
        let id = dead.record_backfill("{\"n\":1}".into()).await.unwrap();
        dead.save_backfill(id, "{\"n\":2}".into(), true)
            .await
            .unwrap();
        let seen = alive.backfill(id).await.unwrap().unwrap();
        assert_eq!(
            (seen.progress.as_str(), seen.interrupted),
            ("{\"n\":2}", false)
        );
        // Both heartbeat now; only `alive` goes on.
        alive.recover_interrupted().await.unwrap();
        assert!(!alive.backfill(id).await.unwrap().unwrap().interrupted);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !alive.backfill(id).await.unwrap().unwrap().interrupted {
            assert!(
                std::time::Instant::now() < deadline,
                "never marked interrupted"
            );
            alive.recover_interrupted().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(alive.backfills().await.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_job_recorded_on_one_replica_wakes_the_others_workers() {
        let config = state("notify", "");
        let recorder = Queue::open_state(&config).await.unwrap();
        let worker = Queue::open_state(&config).await.unwrap();
        let waker = worker.waker("t");
        // Wait until the worker's replica listens, then drain the wake-up it gives on connecting.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while server()
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'notify' AND query LIKE 'LISTEN%'",
            )
            .unwrap()
            .trim()
            == "0"
        {
            assert!(std::time::Instant::now() < deadline, "never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while tokio::time::timeout(Duration::from_millis(300), waker.notified())
            .await
            .is_ok()
        {}
        recorder.enqueue(vec![job("t", "v1", "d")]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waker.notified())
            .await
            .expect("the other replica's worker was woken");
        assert!(worker.claim("t").await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn work_named_alone_runs_on_one_replica_at_a_time_and_a_dropped_turn_frees_it() {
        let config = state("alone", "");
        let a = Queue::open_state(&config).await.unwrap();
        let b = Queue::open_state(&config).await.unwrap();
        {
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
            let holding = a.alone("reconcile tcr", async move {
                let _ = started_tx.send(());
                let _ = release_rx.await;
                "a ran"
            });
            tokio::pin!(holding);
            tokio::select! {
                _ = &mut holding => panic!("released too early"),
                _ = started_rx => {}
            }
            assert_eq!(
                b.alone("reconcile tcr", async { "b ran" }).await.unwrap(),
                None
            );
            assert_eq!(
                b.alone("retention", async { "other work" }).await.unwrap(),
                Some("other work"),
                "other names are free"
            );
            let _ = release_tx.send(());
            assert_eq!(holding.await.unwrap(), Some("a ran"));
        }
        let a = Arc::new(a);
        assert_eq!(
            b.alone("reconcile tcr", async { "b ran" }).await.unwrap(),
            Some("b ran")
        );

        // A turn whose future is dropped (shutdown, a panic) leaves nothing held.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let abandoned = tokio::spawn(async move {
            a.alone("reconcile tcr", async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await
            })
            .await
        });
        started_rx.await.unwrap();
        abandoned.abort();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while b.alone("reconcile tcr", async {}).await.unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the dropped turn kept its lock"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
