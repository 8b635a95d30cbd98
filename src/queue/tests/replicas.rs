//! Several replicas on one PostgreSQL queue, as processes share it: claims racing, leases
//! running out, notifications, turns.

use super::*;

/// A replica on the database `config` names, with its store at hand.
async fn replica(config: &crate::config::StateConfig) -> (Queue, Arc<postgres::PgStore>) {
    let wakers = Wakers::default();
    let database = config.database.as_ref().expect("a PostgreSQL queue");
    let store = Arc::new(
        postgres::PgStore::connect(database, wakers.clone())
            .await
            .unwrap(),
    );
    (Queue::with(store.clone(), store.clone(), wakers), store)
}

/// Four workers on each of two replicas claim 400 jobs at once: each job is claimed exactly
/// once. (Each replica's connections are made first, so neither starts late.)
#[tokio::test(flavor = "multi_thread")]
async fn replicas_never_claim_the_same_job() {
    const WORKERS: usize = 4;
    let config = state("claims", "");
    let a = Arc::new(Queue::open_state(&config).await.unwrap());
    let b = Arc::new(Queue::open_state(&config).await.unwrap());
    let jobs: Vec<NewJob> = (0..400).map(|i| job("t", &format!("v{i}"), "d")).collect();
    assert_eq!(a.enqueue(jobs).await.unwrap(), 400);
    let start = Arc::new(tokio::sync::Barrier::new(2 * WORKERS));
    let mut workers = Vec::new();
    for (replica, q) in [(0, &a), (1, &b)] {
        for _ in 0..WORKERS {
            let (q, start) = (q.clone(), start.clone());
            workers.push(tokio::spawn(async move {
                assert!(q.claim("warm-up").await.unwrap().is_none());
                start.wait().await;
                let mut ids = Vec::new();
                while let Some(job) = q.claim("t").await.unwrap() {
                    ids.push((replica, job.id));
                }
                ids
            }));
        }
    }
    let mut claimed = Vec::new();
    for w in workers {
        claimed.extend(w.await.unwrap());
    }
    assert_eq!(claimed.len(), 400, "no job claimed twice");
    let mut ids: Vec<i64> = claimed.iter().map(|(_, id)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400, "every job claimed");
    for replica in [0, 1] {
        assert!(
            claimed.iter().any(|(r, _)| *r == replica),
            "replica {replica} took work"
        );
    }
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
    let (a, a_store) = replica(&config).await;
    let b = Queue::open_state(&config).await.unwrap();
    a.enqueue(vec![job("t", "held", "d"), job("t", "lost", "d")])
        .await
        .unwrap();
    let held = a.claim("t").await.unwrap().unwrap();
    let lost = a.claim("t").await.unwrap().unwrap();
    a_store.forget_claim(lost.id);
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
