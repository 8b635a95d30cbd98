//! Replicas sharing one PostgreSQL queue: who they are (heartbeats), whose running jobs are
//! whose (leases, renewed for the jobs in hand and taken back when they run out), whose turn it
//! is for work done alone (advisory locks), and waking each other's workers (`LISTEN`).

use std::time::Duration;

use async_trait::async_trait;

use super::super::job::{JobState, Replica};
use super::super::store::{Coordination, Turn};
use super::super::{QueueError, Wakers};
use super::{CHANNEL, PgStore};

pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// This process among the replicas: host name, process id and start time.
pub(super) fn replica_id() -> String {
    format!("{}-{}-{}", host_name(), std::process::id(), super::now_ms())
}

impl PgStore {
    /// Says this replica is alive; forgets replicas silent for a day.
    async fn heartbeat(&self, now: i64) -> Result<(), QueueError> {
        self.query_relaxed(
            "INSERT INTO replicas (id, host, version, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            &[
                &self.replica,
                &self.host,
                &env!("CARGO_PKG_VERSION"),
                &self.started_at,
                &now,
            ],
        )
        .await?;
        self.query_relaxed(
            "DELETE FROM replicas WHERE heartbeat_at < $1",
            &[&(now - 86_400_000)],
        )
        .await
        .map(|_| ())
    }

    /// Renews the leases of the jobs in hand and puts back to pending the running jobs whose
    /// lease ran out (`Standing::interrupted`, as one statement over all of them); marks the
    /// backfills of replicas silent for three leases interrupted. Idempotent.
    async fn renew_and_reclaim(&self, now: i64) -> Result<Vec<String>, QueueError> {
        self.heartbeat(now).await?;
        let until = now + self.lease.as_millis() as i64;
        let running = JobState::Running.as_str();
        let in_hand: Vec<i64> = self.in_hand.iter().map(|e| *e.key()).collect();
        if !in_hand.is_empty() {
            self.query_relaxed(
                "UPDATE jobs SET lease_until = $2 \
                 WHERE id = ANY($3) AND state = $4 AND lease_owner = $1",
                &[&self.replica, &until, &in_hand, &running],
            )
            .await?;
        }
        let rows = self
            .query_relaxed(
                "UPDATE jobs SET state = $2, next_attempt_at = $1, updated_at = $1, \
                     lease_owner = '' \
                 WHERE state = $3 AND lease_until < $1 RETURNING target",
                &[&now, &JobState::Pending.as_str(), &running],
            )
            .await?;
        // A backfill whose replica fell silent for three leases will not end.
        self.query_relaxed(
            "UPDATE backfills SET running = FALSE, interrupted = TRUE \
             WHERE running AND replica NOT IN (SELECT id FROM replicas WHERE heartbeat_at >= $1)",
            &[&(now - 3 * self.lease.as_millis() as i64)],
        )
        .await?;
        Ok(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
    }
}

#[async_trait]
impl Coordination for PgStore {
    fn replica(&self) -> Option<&str> {
        Some(&self.replica)
    }

    fn tend_every(&self) -> Option<Duration> {
        Some(self.lease / 3)
    }

    /// Only the jobs whose lease ran out: the others belong to live replicas. The first
    /// heartbeat of a server is this one.
    async fn recover(&self, now: i64) -> Result<Vec<String>, QueueError> {
        self.renew_and_reclaim(now).await
    }

    async fn tend(&self, now: i64) -> Result<Vec<String>, QueueError> {
        self.renew_and_reclaim(now).await
    }

    /// Replicas whose last heartbeat is within three leases, with the jobs each runs.
    async fn replicas(&self, now: i64) -> Result<Vec<Replica>, QueueError> {
        let since = now - 3 * self.lease.as_millis() as i64;
        let rows = self
            .query(
                "SELECT r.id, r.host, r.version, r.started_at, r.heartbeat_at, \
                        (SELECT COUNT(*) FROM jobs j WHERE j.state = $2 AND j.lease_owner = r.id) \
                 FROM replicas r WHERE r.heartbeat_at >= $1 ORDER BY r.id",
                &[&since, &JobState::Running.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Replica {
                    id: r.try_get(0)?,
                    host: r.try_get(1)?,
                    version: r.try_get(2)?,
                    started_at: r.try_get(3)?,
                    heartbeat_at: r.try_get(4)?,
                    jobs_in_hand: r.try_get::<_, i64>(5)?.max(0) as u64,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e))
    }

    /// An advisory lock on a connection taken out of the pool: when the turn is dropped the
    /// connection closes, and its session's locks go with it, so a dead replica never keeps one.
    async fn take_turn(&self, name: &str) -> Result<Option<Turn>, QueueError> {
        let client = deadpool_postgres::Object::take(self.client().await?);
        let row = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&name])
            .await
            .map_err(|e| self.error(e))?;
        let got = row.try_get::<_, bool>(0).map_err(|e| self.error(e))?;
        Ok(got.then(|| Turn::held_by(Box::new(client))))
    }
}

/// Listens for jobs recorded by any replica and wakes this one's workers for their target.
/// Reconnects after a lost connection, waking every worker then (a notification may have been
/// missed while away). Runs until its store is dropped.
pub(super) async fn listen(
    connect: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    wakers: Wakers,
    shown: String,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = match &tls {
            Some(tls) => listen_once(&connect, tls.clone(), &wakers).await,
            None => listen_once(&connect, tokio_postgres::NoTls, &wakers).await,
        };
        if let Err(e) = result {
            tracing::warn!(database = %shown, error = %e, "lost the job notifications from other replicas; reconnecting (workers poll meanwhile)");
        }
        wakers.wake_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn listen_once<T>(
    connect: &tokio_postgres::Config,
    tls: T,
    wakers: &Wakers,
) -> Result<(), tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = connect.connect(tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    // Whatever way this ends (an error, or the listener aborted with its store), the
    // connection's driver ends with it.
    let _driver_ends = AbortOnDrop(driver.abort_handle());
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    wakers.wake_all();
    while let Some(target) = rx.recv().await {
        wakers.wake(&target);
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
