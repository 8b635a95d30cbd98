//! The queue in PostgreSQL, shared by every replica.
//!
//! The same rules as the SQLite queue, made safe for several processes:
//! - a job is committed (`synchronous_commit = on`) before the client's 201;
//! - a claim takes the next due row with `FOR UPDATE SKIP LOCKED`, so two replicas never take
//!   the same job, and stamps it with this replica's id and a lease;
//! - every replica renews the leases of the jobs it runs, and puts back to `pending` any running
//!   job whose lease ran out (its replica died): the work resumes within one lease period;
//! - an outcome is recorded only by the replica that still holds the lease;
//! - an enqueue sends `NOTIFY regtee_jobs, '<target>'`, so idle workers on every replica wake.
//!
//! Deduplication across replicas is the unique index on a job's identity, as in SQLite.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::Notify;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{
    Attempt, AttemptResult, ErrorClass, Job, JobFilter, JobKind, JobOrigin, JobState, NewJob,
    Outcome, QueueError, Replica, TargetCounts, Wakers, now_ms, sqlite::non_empty,
};
use crate::config::DatabaseConfig;
use crate::oci::digest::Digest;
use crate::oci::names::{RepositoryName, Tag};

/// How long connecting and creating the schema may take when regtee starts.
const STARTUP: Duration = Duration::from_secs(30);
/// The channel enqueues notify on.
const CHANNEL: &str = "regtee_jobs";
/// Serialises schema creation when several replicas start at once.
const SCHEMA_LOCK: i64 = 0x7265_6774_6565; // "regtee"

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id              BIGSERIAL PRIMARY KEY,
    target          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    repository      TEXT NOT NULL,
    tag             TEXT NOT NULL DEFAULT '',
    digest          TEXT NOT NULL DEFAULT '',
    mount_from      TEXT NOT NULL DEFAULT '',
    origin          TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    detail          TEXT NOT NULL DEFAULT '',
    error_class     TEXT NOT NULL DEFAULT '',
    target_digest   TEXT NOT NULL DEFAULT '',
    rearm           INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT NOT NULL DEFAULT '',
    lease_until     BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_identity ON jobs(target, kind, repository, tag, digest);
-- A claim's order, id included: without it every claim sorts all the jobs due at once.
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_due_in_order ON jobs(target, state, next_attempt_at, id);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(state, finished_at);
CREATE INDEX IF NOT EXISTS jobs_repository ON jobs(repository);
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs(state, lease_until);
CREATE TABLE IF NOT EXISTS attempts (
    id          BIGSERIAL PRIMARY KEY,
    job_id      BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    result      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    replica     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job_id);
CREATE TABLE IF NOT EXISTS replicas (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_homes (
    target     TEXT NOT NULL,
    digest     TEXT NOT NULL,
    repository TEXT NOT NULL,
    seen_at    BIGINT NOT NULL,
    PRIMARY KEY (target, digest, repository)
);
CREATE TABLE IF NOT EXISTS backfills (
    id          BIGSERIAL PRIMARY KEY,
    replica     TEXT NOT NULL DEFAULT '',
    running     BOOLEAN NOT NULL,
    interrupted BOOLEAN NOT NULL DEFAULT FALSE,
    progress    TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS backfill_cancels (
    id           BIGINT PRIMARY KEY,
    requested_at BIGINT NOT NULL
);
"#;

const JOB_COLUMNS: &str = "id, target, kind, repository, tag, digest, mount_from, origin, state, \
     attempts, created_at, updated_at, next_attempt_at, finished_at, detail, error_class, target_digest";

fn job_from_row(row: &Row) -> Result<Job, tokio_postgres::Error> {
    Ok(Job {
        id: row.try_get(0)?,
        target: row.try_get(1)?,
        kind: JobKind::parse(row.try_get(2)?),
        repository: row.try_get(3)?,
        tag: non_empty(row.try_get(4)?),
        digest: non_empty(row.try_get(5)?),
        mount_from: non_empty(row.try_get(6)?),
        origin: JobOrigin::parse(row.try_get(7)?),
        state: JobState::parse(row.try_get(8)?).unwrap_or(JobState::Failed),
        attempts: row.try_get::<_, i32>(9)?.max(0) as u32,
        created_at: row.try_get(10)?,
        updated_at: row.try_get(11)?,
        next_attempt_at: row.try_get(12)?,
        finished_at: row.try_get(13)?,
        detail: row.try_get(14)?,
        error_class: ErrorClass::parse(row.try_get(15)?),
        target_digest: non_empty(row.try_get(16)?),
    })
}

/// The queue in a PostgreSQL database.
pub(super) struct PgQueue {
    pool: Pool,
    /// Connections whose commits do not wait for the WAL flush: see [`PgQueue::query_relaxed`].
    relaxed: Pool,
    /// This process, as written into leases and attempts.
    replica: String,
    host: String,
    started_at: i64,
    shown: String,
    lease: Duration,
    /// How long one operation may take ([`PgQueue::within`]).
    deadline: Duration,
    /// The jobs this replica's workers claimed and have not finished, with when each was
    /// claimed: the only leases it renews. A claim whose answer was lost (the deadline passed
    /// after the database committed it) is then not renewed, and its lease runs out like a dead
    /// replica's. The claim time dates this replica's attempt in the history, even when another
    /// replica has claimed the job since.
    in_hand: DashMap<i64, i64>,
}

impl PgQueue {
    /// Connects, creates the schema if needed, and starts listening for other replicas' jobs.
    pub(super) async fn connect(
        config: &DatabaseConfig,
        wakers: Wakers,
    ) -> Result<PgQueue, QueueError> {
        let mut connect = config.connect.clone();
        // A job must be durable before the client hears of it, whatever the server's default.
        connect.options("-c synchronous_commit=on");
        connect.application_name("regtee");
        // Requests are bounded by `within`; this bounds a connection the keeper or start waits for.
        connect.connect_timeout(STARTUP.max(config.timeout));
        // A link that silently drops packets closes the connection (the pool then makes a new
        // one) instead of leaving it to wait for ever.
        connect.tcp_user_timeout(config.timeout * 2);
        connect.keepalives_idle(Duration::from_secs(30));
        let shown = config.shown.clone();
        let tls = tls_connector(config)?;
        let pool = |connect: &tokio_postgres::Config, size: usize| {
            Pool::builder(manager(connect.clone(), tls.clone()))
                .max_size(size)
                .wait_timeout(Some(config.timeout))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| QueueError::PostgresPool {
                    database: shown.clone(),
                    message: e.to_string(),
                })
        };
        let mut relaxed = connect.clone();
        relaxed.options("-c synchronous_commit=off");
        let queue = PgQueue {
            pool: pool(&connect, 16)?,
            relaxed: pool(&relaxed, 8)?,
            replica: replica_id(),
            host: host_name(),
            started_at: now_ms(),
            shown: shown.clone(),
            lease: config.lease,
            deadline: config.timeout,
            in_hand: DashMap::new(),
        };
        // No client waits on the start: it may take longer than one request may. No heartbeat
        // here: a command reading the queue (`regtee status`) is no replica; a server's first
        // comes with `recover_interrupted` at its start, then from its lease keeper.
        let startup = STARTUP.max(config.timeout);
        tokio::time::timeout(startup, queue.create_schema())
            .await
            .map_err(|_| QueueError::PostgresTimeout {
                database: shown.clone(),
                after: startup,
            })??;
        tokio::spawn(listen(connect, tls, wakers, shown));
        Ok(queue)
    }

    /// Creates the tables and indexes, one replica at a time.
    async fn create_schema(&self) -> Result<(), QueueError> {
        let pg = |e| self.error(e);
        {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await
                .map_err(pg)?;
            tx.batch_execute(SCHEMA).await.map_err(pg)?;
            tx.commit().await.map_err(pg)?;
        }
        Ok(())
    }

    /// Runs one queue operation within the deadline. Past it the caller gets
    /// [`QueueError::PostgresTimeout`] (a push: 503) and the operation is dropped: a transaction
    /// not committed yet rolls back, and one whose commit was already sent stands, which is
    /// harmless since jobs are deduplicated by identity.
    pub(super) async fn within<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(self.deadline, operation).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::PostgresTimeout {
                database: self.shown.clone(),
                after: self.deadline,
            }),
        }
    }

    /// Forgets a claim as if its answer had been lost.
    #[cfg(test)]
    pub(super) fn forget_claim(&self, id: i64) {
        self.in_hand.remove(&id);
    }

    /// How long a claim lasts without renewal.
    pub(super) fn lease(&self) -> Duration {
        self.lease
    }

    /// This replica's id.
    pub(super) fn replica(&self) -> &str {
        &self.replica
    }

    fn error(&self, source: tokio_postgres::Error) -> QueueError {
        QueueError::Postgres {
            database: self.shown.clone(),
            source,
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.connection_from(&self.pool).await
    }

    async fn connection_from(&self, pool: &Pool) -> Result<deadpool_postgres::Object, QueueError> {
        pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => QueueError::Postgres {
                database: self.shown.clone(),
                source,
            },
            other => QueueError::PostgresPool {
                database: self.shown.clone(),
                message: other.to_string(),
            },
        })
    }

    // Statements are prepared once per connection (deadpool's cache): a statement given as
    // text is otherwise parsed, planned and described again on every call, a round trip more.

    async fn execute(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<u64, QueueError> {
        let pg = |e| self.error(e);
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg)?;
        client.execute(&statement, args).await.map_err(pg)
    }

    async fn query(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, QueueError> {
        let pg = |e| self.error(e);
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg)?;
        client.query(&statement, args).await.map_err(pg)
    }

    /// Runs one statement on a connection whose commits do not wait for their WAL flush
    /// (`synchronous_commit = off`), for writes whose loss in a crash of the database server is
    /// harmless: a claim (the job is pending again and runs again), a lease renewal or takeover
    /// and a heartbeat (the next round redoes them), a mount source, a backfill's progress. The
    /// server applies them in order and never half; only the last moments before a crash can be
    /// lost. A recorded job never goes this way: its commit is what the client's 201 promises.
    /// A worker then waits for no flush but its outcome's, and a pool of its own (rather than
    /// `SET LOCAL` in a transaction) keeps each such write one round trip.
    async fn query_relaxed(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, QueueError> {
        let pg = |e| self.error(e);
        let client = self.connection_from(&self.relaxed).await?;
        let statement = client.prepare_cached(sql).await.map_err(pg)?;
        client.query(&statement, args).await.map_err(pg)
    }

    fn jobs(&self, rows: &[Row]) -> Result<Vec<Job>, QueueError> {
        rows.iter()
            .map(|r| job_from_row(r).map_err(|e| self.error(e)))
            .collect()
    }

    pub(super) async fn health(&self) -> Result<(), QueueError> {
        self.execute(
            "INSERT INTO health (id, checked_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            &[&now_ms()],
        )
        .await
        .map(|_| ())
    }

    /// See [`super::Queue::alone`].
    pub(super) async fn alone<T>(
        &self,
        name: &str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<Option<T>, QueueError> {
        // Out of the pool: when this connection closes, its session's locks go with it.
        let locked = self.within(async {
            let client = deadpool_postgres::Object::take(self.client().await?);
            let row = client
                .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&name])
                .await
                .map_err(|e| self.error(e))?;
            let got = row.try_get::<_, bool>(0).map_err(|e| self.error(e))?;
            Ok(got.then_some(client))
        });
        let Some(client) = locked.await? else {
            return Ok(None);
        };
        let done = work.await;
        drop(client);
        Ok(Some(done))
    }

    /// Says this replica is alive; forgets replicas silent for a day.
    async fn heartbeat(&self) -> Result<(), QueueError> {
        let now = now_ms();
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

    /// Replicas whose last heartbeat is within three leases, with the jobs each runs.
    pub(super) async fn replicas(&self) -> Result<Vec<Replica>, QueueError> {
        self.within(self.replicas_seen()).await
    }

    async fn replicas_seen(&self) -> Result<Vec<Replica>, QueueError> {
        let since = now_ms() - 3 * self.lease.as_millis() as i64;
        let rows = self
            .query(
                "SELECT r.id, r.host, r.version, r.started_at, r.heartbeat_at, \
                        (SELECT COUNT(*) FROM jobs j WHERE j.state = 'running' AND j.lease_owner = r.id) \
                 FROM replicas r WHERE r.heartbeat_at >= $1 ORDER BY r.id",
                &[&since],
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

    /// Renews the leases of the jobs in hand and returns jobs whose lease ran out to `pending`;
    /// returns the targets of the jobs put back. Every replica runs it; it is idempotent.
    pub(super) async fn tend_leases(&self) -> Result<Vec<String>, QueueError> {
        self.within(self.renew_and_reclaim()).await
    }

    async fn renew_and_reclaim(&self) -> Result<Vec<String>, QueueError> {
        self.heartbeat().await?;
        let now = now_ms();
        let until = now + self.lease.as_millis() as i64;
        let in_hand: Vec<i64> = self.in_hand.iter().map(|e| *e.key()).collect();
        if !in_hand.is_empty() {
            self.query_relaxed(
                "UPDATE jobs SET lease_until = $2 \
                 WHERE id = ANY($3) AND state = 'running' AND lease_owner = $1",
                &[&self.replica, &until, &in_hand],
            )
            .await?;
        }
        let rows = self
            .query_relaxed(
                "UPDATE jobs SET state = 'pending', next_attempt_at = $1, updated_at = $1, \
                     lease_owner = '' \
                 WHERE state = 'running' AND lease_until < $1 RETURNING target",
                &[&now],
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

    pub(super) async fn enqueue(
        &self,
        jobs: Vec<NewJob>,
        wakers: Vec<Arc<Notify>>,
    ) -> Result<usize, QueueError> {
        let mut client = self.client().await?;
        let now = now_ms();
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let rearm = tx
            .prepare_cached(
                "UPDATE jobs SET rearm = 1 WHERE target = $1 AND kind = $2 AND repository = $3 \
                 AND tag = $4 AND digest = $5 AND state = 'running'",
            )
            .await
            .map_err(pg)?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, origin, \
                                   state, created_at, updated_at, next_attempt_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $8, $8) \
                 ON CONFLICT (target, kind, repository, tag, digest) DO UPDATE SET \
                     state = 'pending', attempts = 0, origin = excluded.origin, \
                     mount_from = excluded.mount_from, created_at = excluded.created_at, \
                     updated_at = excluded.updated_at, next_attempt_at = excluded.next_attempt_at, \
                     started_at = NULL, finished_at = NULL, detail = '', error_class = '', \
                     rearm = 0, lease_owner = '' \
                 WHERE jobs.state NOT IN ('pending', 'running')",
            )
            .await
            .map_err(pg)?;
        let mut armed = 0;
        let mut targets: Vec<&str> = Vec::new();
        for job in &jobs {
            let (kind, repository) = (job.kind.as_str(), job.repository.as_str());
            let tag = job.tag.as_ref().map_or("", Tag::as_str);
            let digest = job.digest.as_ref().map_or("", Digest::as_str);
            let mount_from = job.mount_from.as_ref().map_or("", RepositoryName::as_str);
            let origin = job.origin.as_str();
            armed += tx
                .execute(&rearm, &[&job.target, &kind, &repository, &tag, &digest])
                .await
                .map_err(pg)?;
            armed += tx
                .execute(
                    &insert,
                    &[
                        &job.target,
                        &kind,
                        &repository,
                        &tag,
                        &digest,
                        &mount_from,
                        &origin,
                        &now,
                    ],
                )
                .await
                .map_err(pg)?;
            if !targets.contains(&job.target.as_str()) {
                targets.push(&job.target);
            }
        }
        for target in targets {
            // Delivered to every listening replica when the transaction commits.
            in_transaction(&tx, "SELECT pg_notify($1, $2)", &[&CHANNEL, &target])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        for waker in &wakers {
            super::wake_workers(waker);
        }
        Ok(armed as usize)
    }

    pub(super) async fn claim(&self, target: &str) -> Result<Option<Job>, QueueError> {
        let now = now_ms();
        let until = now + self.lease.as_millis() as i64;
        let rows = self
            .query_relaxed(
                &format!(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
                         updated_at = $2, started_at = $2, lease_owner = $3, lease_until = $4 \
                     WHERE id = (SELECT id FROM jobs WHERE target = $1 AND state = 'pending' \
                                 AND next_attempt_at <= $2 ORDER BY next_attempt_at, id LIMIT 1 \
                                 FOR UPDATE SKIP LOCKED) \
                     RETURNING {JOB_COLUMNS}"
                ),
                &[&target, &now, &self.replica, &until],
            )
            .await?;
        let job = self.jobs(&rows)?.into_iter().next();
        if let Some(job) = &job {
            self.in_hand.insert(job.id, now);
        }
        Ok(job)
    }

    pub(super) async fn next_due(&self, target: &str) -> Result<Option<i64>, QueueError> {
        let rows = self
            .query(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE target = $1 AND state = 'pending'",
                &[&target],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.try_get(0).ok()).flatten())
    }

    /// Records how an attempt ended. The attempt is always kept in the history; the job's state
    /// changes only while this replica still holds its lease (another may have taken it over).
    pub(super) async fn finish(&self, id: i64, outcome: Outcome) -> Result<(), QueueError> {
        let now = now_ms();
        let mut client = self.client().await?;
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let lock = tx
            .prepare_cached(
                "SELECT COALESCE(started_at, updated_at), lease_owner = $2 AND state = 'running', \
                        rearm = 1 \
                 FROM jobs WHERE id = $1 FOR UPDATE",
            )
            .await
            .map_err(pg)?;
        let held = tx
            .query_opt(&lock, &[&id, &self.replica])
            .await
            .map_err(pg)?;
        // Read under the row's lock: an enqueue that re-arms the job waits for this commit.
        let (started, ours, rearmed): (i64, bool, bool) = match &held {
            Some(row) => (
                row.try_get(0).map_err(pg)?,
                row.try_get(1).map_err(pg)?,
                row.try_get(2).map_err(pg)?,
            ),
            None => (now, false, false),
        };
        let started = self.in_hand.get(&id).map_or(started, |claimed| *claimed);
        let (result, detail) = match &outcome {
            Outcome::Done { note, .. } => (AttemptResult::Done, note.clone()),
            Outcome::Skipped { reason } => (AttemptResult::Skipped, reason.clone()),
            Outcome::Failed { reason, .. } => (AttemptResult::Failed, reason.clone()),
            Outcome::RetryAt { error, .. } => (AttemptResult::Retry, error.clone()),
        };
        if ours {
            match &outcome {
                Outcome::Done {
                    target_digest,
                    note,
                } => {
                    let target_digest = target_digest.as_deref().unwrap_or("");
                    in_transaction(
                        &tx,
                        "UPDATE jobs SET state = 'done', finished_at = $2, updated_at = $2, \
                         detail = $3, error_class = '', target_digest = $4, lease_owner = '' \
                         WHERE id = $1",
                        &[&id, &now, note, &target_digest],
                    )
                    .await
                }
                Outcome::Skipped { reason } => {
                    in_transaction(
                        &tx,
                        "UPDATE jobs SET state = 'skipped', finished_at = $2, updated_at = $2, \
                         detail = $3, error_class = '', lease_owner = '' WHERE id = $1",
                        &[&id, &now, reason],
                    )
                    .await
                }
                Outcome::Failed { reason, class } => {
                    in_transaction(
                        &tx,
                        "UPDATE jobs SET state = 'failed', finished_at = $2, updated_at = $2, \
                         detail = $3, error_class = $4, lease_owner = '' WHERE id = $1",
                        &[&id, &now, reason, &class.as_str()],
                    )
                    .await
                }
                Outcome::RetryAt { at, error, class } => {
                    in_transaction(
                        &tx,
                        "UPDATE jobs SET state = 'pending', next_attempt_at = $2, updated_at = $3, \
                         detail = $4, error_class = $5, lease_owner = '' WHERE id = $1",
                        &[&id, at, &now, error, &class.as_str()],
                    )
                    .await
                }
            }
            .map_err(pg)?;
            if rearmed {
                in_transaction(
                    &tx,
                    "UPDATE jobs SET state = 'pending', rearm = 0, attempts = 0, \
                         next_attempt_at = $2, started_at = NULL, finished_at = NULL \
                     WHERE id = $1",
                    &[&id, &now],
                )
                .await
                .map_err(pg)?;
            }
        }
        if held.is_some() {
            in_transaction(
                &tx,
                "INSERT INTO attempts (job_id, started_at, finished_at, result, detail, replica) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &started,
                    &now,
                    &result.as_str(),
                    &detail,
                    &self.replica,
                ],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        self.in_hand.remove(&id);
        Ok(())
    }

    pub(super) async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let rows = self
            .query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(self.jobs(&rows)?.into_iter().next())
    }

    pub(super) async fn attempts(&self, id: i64) -> Result<Vec<Attempt>, QueueError> {
        let rows = self
            .query(
                "SELECT started_at, finished_at, result, detail FROM attempts \
                 WHERE job_id = $1 ORDER BY id",
                &[&id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Attempt {
                    started_at: r.try_get(0)?,
                    finished_at: r.try_get(1)?,
                    result: AttemptResult::parse(r.try_get(2)?),
                    detail: r.try_get(3)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e))
    }

    pub(super) async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, value: Box<dyn ToSql + Sync + Send>| {
            args.push(value);
            sql.push_str(&clause.replace('?', &format!("${}", args.len())));
        };
        if let Some(state) = filter.state {
            arg(
                &mut sql,
                " AND state = ?",
                Box::new(state.as_str().to_string()),
            );
        }
        if let Some(target) = filter.target {
            arg(&mut sql, " AND target = ?", Box::new(target));
        }
        if let Some(repository) = filter.repository {
            arg(&mut sql, " AND repository = ?", Box::new(repository));
        }
        if let Some(project) = filter.project {
            arg(
                &mut sql,
                " AND starts_with(repository, ?)",
                Box::new(format!("{project}/")),
            );
        }
        if let Some(before) = filter.before_id {
            arg(&mut sql, " AND id < ?", Box::new(before));
        }
        arg(
            &mut sql,
            " ORDER BY id DESC LIMIT ?",
            Box::new(i64::from(filter.limit.clamp(1, 1000))),
        );
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self.query(&sql, &refs).await?;
        self.jobs(&rows)
    }

    pub(super) async fn retry(&self, id: i64) -> Result<bool, QueueError> {
        let now = now_ms();
        let changed = self
            .execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = $2, \
                     updated_at = $2, finished_at = NULL \
                 WHERE id = $1 AND state IN ('failed', 'skipped', 'done')",
                &[&id, &now],
            )
            .await?;
        Ok(changed > 0)
    }

    pub(super) async fn retry_failed(&self, target: Option<String>) -> Result<usize, QueueError> {
        let now = now_ms();
        self.execute(
            "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = $1, \
                 updated_at = $1, finished_at = NULL \
             WHERE state = 'failed' AND ($2::TEXT IS NULL OR target = $2)",
            &[&now, &target],
        )
        .await
        .map(|n| n as usize)
    }

    pub(super) async fn counts(
        &self,
        configured: &[String],
    ) -> Result<Vec<TargetCounts>, QueueError> {
        let rows = self
            .query(
                "SELECT target, state, COUNT(*), \
                        MIN(CASE WHEN state IN ('pending', 'running') THEN created_at END) \
                 FROM jobs GROUP BY target, state ORDER BY target",
                &[],
            )
            .await?;
        let counted = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get::<_, i64>(2)?.max(0) as u64,
                    r.try_get(3)?,
                ))
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| self.error(e))?;
        Ok(TargetCounts::tally(counted, configured))
    }

    pub(super) async fn remember_blob_home(
        &self,
        target: String,
        digest: String,
        repository: String,
    ) -> Result<(), QueueError> {
        self.query_relaxed(
            "INSERT INTO blob_homes (target, digest, repository, seen_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (target, digest, repository) DO UPDATE SET seen_at = excluded.seen_at",
            &[&target, &digest, &repository, &now_ms()],
        )
        .await
        .map(|_| ())
    }

    pub(super) async fn record_backfill(&self, progress: String) -> Result<i64, QueueError> {
        let rows = self
            .query(
                "INSERT INTO backfills (replica, running, progress, updated_at) \
                 VALUES ($1, TRUE, $2, $3) RETURNING id",
                &[&self.replica, &progress, &now_ms()],
            )
            .await?;
        let row = rows.first().ok_or_else(|| QueueError::PostgresPool {
            database: self.shown.clone(),
            message: "recording a backfill returned no id".into(),
        })?;
        row.try_get(0).map_err(|e| self.error(e))
    }

    pub(super) async fn save_backfill(
        &self,
        id: i64,
        progress: String,
        running: bool,
    ) -> Result<(), QueueError> {
        self.query_relaxed(
            "UPDATE backfills SET progress = $2, running = $3, updated_at = $4 WHERE id = $1",
            &[&id, &progress, &running, &now_ms()],
        )
        .await
        .map(|_| ())
    }

    /// Asks the running backfill `id` to stop; whether it is running.
    pub(super) async fn request_backfill_cancel(&self, id: i64) -> Result<bool, QueueError> {
        self.execute(
            "INSERT INTO backfill_cancels (id, requested_at) \
             SELECT id, $2 FROM backfills WHERE id = $1 AND running \
             ON CONFLICT (id) DO NOTHING",
            &[&id, &now_ms()],
        )
        .await?;
        let rows = self
            .query("SELECT 1 FROM backfills WHERE id = $1 AND running", &[&id])
            .await?;
        Ok(!rows.is_empty())
    }

    /// Whether someone asked backfill `id` to stop.
    pub(super) async fn backfill_cancel_requested(&self, id: i64) -> Result<bool, QueueError> {
        let rows = self
            .query("SELECT 1 FROM backfill_cancels WHERE id = $1", &[&id])
            .await?;
        Ok(!rows.is_empty())
    }

    /// The newest backfills, or the one with `id`.
    pub(super) async fn backfills(
        &self,
        id: Option<i64>,
    ) -> Result<Vec<super::BackfillRecord>, QueueError> {
        let rows = self
            .query(
                "SELECT id, progress, interrupted FROM backfills \
                 WHERE $1::BIGINT IS NULL OR id = $1 ORDER BY id DESC LIMIT 100",
                &[&id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(super::BackfillRecord {
                    id: r.try_get(0)?,
                    progress: r.try_get(1)?,
                    interrupted: r.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e))
    }

    pub(super) async fn blob_homes(
        &self,
        target: String,
        digest: String,
    ) -> Result<Vec<String>, QueueError> {
        let rows = self
            .query(
                "SELECT repository FROM blob_homes WHERE target = $1 AND digest = $2 \
                 ORDER BY seen_at DESC LIMIT $3",
                &[&target, &digest, &super::BLOB_HOMES_KEPT],
            )
            .await?;
        rows.iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    pub(super) async fn purge(&self, older_than: Duration) -> Result<usize, QueueError> {
        let cutoff = now_ms() - older_than.as_millis() as i64;
        self.execute("DELETE FROM blob_homes WHERE seen_at < $1", &[&cutoff])
            .await?;
        self.execute(
            "DELETE FROM backfills WHERE NOT running AND updated_at < $1",
            &[&cutoff],
        )
        .await?;
        self.execute(
            "DELETE FROM backfill_cancels WHERE id NOT IN (SELECT id FROM backfills WHERE running)",
            &[],
        )
        .await?;
        self.execute(
            "DELETE FROM jobs WHERE state IN ('done', 'skipped') AND finished_at < $1",
            &[&cutoff],
        )
        .await
        .map(|n| n as usize)
    }
}

impl PgQueue {
    /// Adds what another queue exported, in one transaction. A job whose identity is already
    /// here is left as it is, with its history: running the migration again adds nothing. A
    /// job that was running is pending here (no replica holds it). Mount sources already here
    /// are kept. Returns the jobs, attempts and mount sources added.
    pub(super) async fn import(
        &self,
        from: super::Exported,
    ) -> Result<(usize, usize, usize), QueueError> {
        let mut client = self.client().await?;
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let insert = tx
            .prepare(
                "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, origin,                      state, attempts, created_at, updated_at, next_attempt_at, started_at,                      finished_at, detail, error_class, target_digest)                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)                  ON CONFLICT (target, kind, repository, tag, digest) DO NOTHING RETURNING id",
            )
            .await
            .map_err(pg)?;
        let attempt = tx
            .prepare(
                "INSERT INTO attempts (job_id, started_at, finished_at, result, detail, replica)                  VALUES ($1, $2, $3, $4, $5, 'migrated')",
            )
            .await
            .map_err(pg)?;
        let mut new_ids = std::collections::HashMap::new();
        for (job, started_at) in &from.jobs {
            let state = match job.state {
                JobState::Running => JobState::Pending,
                other => other,
            };
            let attempts = i32::try_from(job.attempts).unwrap_or(i32::MAX);
            let error_class = job.error_class.map_or("", |c| c.as_str());
            let empty = String::new();
            let row = tx
                .query_opt(
                    &insert,
                    &[
                        &job.target,
                        &job.kind.as_str(),
                        &job.repository,
                        job.tag.as_ref().unwrap_or(&empty),
                        job.digest.as_ref().unwrap_or(&empty),
                        job.mount_from.as_ref().unwrap_or(&empty),
                        &job.origin.as_str(),
                        &state.as_str(),
                        &attempts,
                        &job.created_at,
                        &job.updated_at,
                        &job.next_attempt_at,
                        started_at,
                        &job.finished_at,
                        &job.detail,
                        &error_class,
                        job.target_digest.as_ref().unwrap_or(&empty),
                    ],
                )
                .await
                .map_err(pg)?;
            if let Some(row) = row {
                new_ids.insert(job.id, row.try_get::<_, i64>(0).map_err(pg)?);
            }
        }
        let mut attempts = 0;
        for (job_id, a) in &from.attempts {
            if let Some(id) = new_ids.get(job_id) {
                tx.execute(
                    &attempt,
                    &[
                        id,
                        &a.started_at,
                        &a.finished_at,
                        &a.result.as_str(),
                        &a.detail,
                    ],
                )
                .await
                .map_err(pg)?;
                attempts += 1;
            }
        }
        let mut mount_sources = 0;
        for (target, digest, repository, seen_at) in &from.blob_homes {
            mount_sources += in_transaction(
                &tx,
                "INSERT INTO blob_homes (target, digest, repository, seen_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[target, digest, repository, seen_at],
            )
            .await
            .map_err(pg)? as usize;
        }
        tx.commit().await.map_err(pg)?;
        Ok((new_ids.len(), attempts, mount_sources))
    }
}

/// Runs one statement of a transaction, prepared once per connection.
async fn in_transaction(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, args).await
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// This process among the replicas: host name, process id and start time.
fn replica_id() -> String {
    format!("{}-{}-{}", host_name(), std::process::id(), now_ms())
}

/// The pool's connection maker, with TLS when the config asks for it.
fn manager(
    connect: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
) -> Manager {
    let config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    match tls {
        Some(tls) => Manager::from_config(connect, tls, config),
        None => Manager::from_config(connect, tokio_postgres::NoTls, config),
    }
}

/// TLS to the database, verifying its certificate (against `ca_file` or the system's roots).
fn tls_connector(
    config: &DatabaseConfig,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, QueueError> {
    if !config.tls {
        return Ok(None);
    }
    let trust = crate::tls::ClientTls {
        ca_file: config.ca_file.clone(),
        ..Default::default()
    };
    let mut tls = crate::tls::client_config(&trust).map_err(|e| QueueError::PostgresPool {
        database: config.shown.clone(),
        message: format!("TLS setup: {e}"),
    })?;
    // The HTTP clients' ALPN means nothing to PostgreSQL.
    tls.alpn_protocols.clear();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
}

/// Listens for jobs recorded by any replica and wakes this one's workers for their target.
/// Reconnects after a lost connection, waking every worker then (a notification may have been
/// missed while away).
async fn listen(
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
