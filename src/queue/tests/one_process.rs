//! One process owning its SQLite file: whatever it left running when it died is its own to take
//! back at the next start, and nobody else's turn can be in the way.

use super::*;

#[tokio::test]
async fn what_a_dead_process_left_running_waits_again_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.enqueue(vec![job("a", "v1", "d1"), job("a", "v2", "d2")])
        .await
        .unwrap();
    let first = q.claim("a").await.unwrap().unwrap();
    let second = q.claim("a").await.unwrap().unwrap();
    q.finish(second.id, done()).await.unwrap();
    let backfill = q.record_backfill("{}".into()).await.unwrap();
    let ended = q.record_backfill("{}".into()).await.unwrap();
    q.save_backfill(ended, "{}".into(), false).await.unwrap();
    assert_eq!(q.replica(), None);
    assert!(q.replicas().await.unwrap().is_empty());

    drop(q);
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recover_interrupted().await.unwrap(), 1);
    let back = q.get(first.id).await.unwrap().unwrap();
    assert_eq!((back.state, back.attempts), (JobState::Pending, 1));
    assert_eq!(
        q.get(second.id).await.unwrap().unwrap().state,
        JobState::Done
    );
    // A backfill the dead process was running will not end; one that ended stays as it was.
    assert!(q.backfill(backfill).await.unwrap().unwrap().interrupted);
    assert!(!q.backfill(ended).await.unwrap().unwrap().interrupted);
    assert_eq!(q.claim("a").await.unwrap().unwrap().id, first.id);
    assert_eq!(
        q.alone("retention", async { "ran" }).await.unwrap(),
        Some("ran"),
        "alone, it is always this process's turn"
    );
}
