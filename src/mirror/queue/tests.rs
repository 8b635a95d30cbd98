//! The queue against a real SQLite file.
use super::*;

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

#[tokio::test]
async fn enqueue_dedups_and_rearms_finished_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
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

    drop(q);
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recover_interrupted().await.unwrap(), 1);
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
    q.with(move |c| {
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
