//! The queue in PostgreSQL, shared by every replica.
//!
//! The same contract as the SQLite store, made safe for several processes:
//! - a job is committed (`synchronous_commit = on`) before the client's 201;
//! - a claim takes the next due row with `FOR UPDATE SKIP LOCKED`, so two replicas never take
//!   the same job, and stamps it with this replica's id and a lease;
//! - an outcome changes the job only while this replica still holds its lease (`replicas.rs`
//!   renews leases and takes back those that ran out);
//! - an enqueue sends `NOTIFY regtee_jobs, '<target>'`, so idle workers on every replica wake.
//!
//! Deduplication across replicas is the unique index on a job's identity, as in SQLite.

mod replicas;
mod rows;

use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::job::{Attempt, AttemptResult, Job, JobFilter, JobState, NewJob, Outcome, StateCount};
use super::lifecycle::{self, Arrival, CLAIM_ORDER, Standing};
use super::store::{BlobHome, Exported, Imported, Store};
use super::{BackfillRecord, QueueError, Wakers, now_ms};
use crate::config::DatabaseConfig;
use rows::{
    JOB_COLUMNS, SCHEMA, STANDING_COLUMNS, import_job, in_transaction, insert_attempt,
    job_from_row, standing_from_row, state_names, write_standing,
};

/// How long connecting and creating the schema may take when regtee starts.
const STARTUP: Duration = Duration::from_secs(30);
/// The channel enqueues notify on.
const CHANNEL: &str = "regtee_jobs";
/// Serialises schema creation when several replicas start at once.
const SCHEMA_LOCK: i64 = 0x7265_6774_6565; // "regtee"

/// The queue in a PostgreSQL database.
pub(super) struct PgStore {
    pool: Pool,
    /// Connections whose commits do not wait for the WAL flush: see [`PgStore::query_relaxed`].
    relaxed: Pool,
    /// This process, as written into leases and attempts.
    replica: String,
    host: String,
    started_at: i64,
    shown: String,
    lease: Duration,
    /// How long one operation may take.
    deadline: Duration,
    /// The jobs this replica's workers claimed and have not finished, with when each was
    /// claimed: the only leases it renews. A claim whose answer was lost (the deadline passed
    /// after the database committed it) is then not renewed, and its lease runs out like a dead
    /// replica's. The claim time dates this replica's attempt in the history, even when another
    /// replica has claimed the job since.
    in_hand: DashMap<i64, i64>,
    /// The task listening for other replicas' jobs; it ends with the store.
    listener: tokio::task::AbortHandle,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgStore {
    /// Connects, creates the schema if needed, and starts listening for other replicas' jobs.
    pub(super) async fn connect(
        config: &DatabaseConfig,
        wakers: Wakers,
    ) -> Result<PgStore, QueueError> {
        let mut connect = config.connect.clone();
        // A job must be durable before the client hears of it, whatever the server's default.
        connect.options("-c synchronous_commit=on");
        connect.application_name("regtee");
        // Requests are bounded by the queue's deadline; this bounds a connection the keeper or
        // the start waits for.
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
        let store = PgStore {
            pool: pool(&connect, 16)?,
            relaxed: pool(&relaxed, 8)?,
            replica: replicas::replica_id(),
            host: replicas::host_name(),
            started_at: now_ms(),
            shown: shown.clone(),
            lease: config.lease,
            deadline: config.timeout,
            in_hand: DashMap::new(),
            listener: tokio::spawn(replicas::listen(connect, tls, wakers, shown.clone()))
                .abort_handle(),
        };
        // No client waits on the start: it may take longer than one request may. No heartbeat
        // here: a command reading the queue (`regtee status`) is no replica; a server's first
        // comes with `recover` at its start, then from its lease keeper.
        let startup = STARTUP.max(config.timeout);
        tokio::time::timeout(startup, store.create_schema())
            .await
            .map_err(|_| QueueError::Timeout {
                database: shown.clone(),
                after: startup,
            })??;
        Ok(store)
    }

    /// Creates the tables and indexes, one replica at a time.
    async fn create_schema(&self) -> Result<(), QueueError> {
        let pg = |e| self.error(e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute(SCHEMA).await.map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    /// Forgets a claim as if its answer had been lost.
    #[cfg(test)]
    pub(super) fn forget_claim(&self, id: i64) {
        self.in_hand.remove(&id);
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

    /// The same write arriving again, or a new one: read the job it names (locked), let the
    /// lifecycle decide, write what it decided. Two replicas recording the same new job at
    /// once: the second insert finds the first and reads it again.
    async fn arrive(
        &self,
        tx: &Transaction<'_>,
        job: &NewJob,
        now: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let (kind, repository) = (job.kind.as_str(), job.repository.as_str());
        let tag = job.tag.as_ref().map_or("", |t| t.as_str());
        let digest = job.digest.as_ref().map_or("", |d| d.as_str());
        let mount_from = job.mount_from.as_ref().map_or("", |m| m.as_str());
        let origin = job.origin.as_str();
        let source = job.source.as_deref().unwrap_or("");
        let select = tx
            .prepare_cached(&format!(
                "SELECT id, {STANDING_COLUMNS} FROM jobs WHERE target = $1 AND kind = $2 \
                 AND repository = $3 AND tag = $4 AND digest = $5 FOR UPDATE"
            ))
            .await?;
        for _ in 0..3 {
            let existing = tx
                .query_opt(&select, &[&job.target, &kind, &repository, &tag, &digest])
                .await?;
            let Some(row) = existing else {
                let fresh = Standing::new(now);
                let inserted = in_transaction(
                    tx,
                    "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, origin, \
                                       state, created_at, updated_at, next_attempt_at, source) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9, $10) \
                     ON CONFLICT (target, kind, repository, tag, digest) DO NOTHING",
                    &[
                        &job.target,
                        &kind,
                        &repository,
                        &tag,
                        &digest,
                        &mount_from,
                        &origin,
                        &fresh.state.as_str(),
                        &now,
                        &source,
                    ],
                )
                .await?;
                if inserted > 0 {
                    return Ok(true);
                }
                continue;
            };
            let id: i64 = row.try_get(0)?;
            let arrival = standing_from_row(&row, 1)?.arrival(now);
            match &arrival {
                Arrival::Merged => {}
                Arrival::RunAgain(next) => {
                    write_standing(tx, id, next).await?;
                }
                Arrival::Rearmed(next) => {
                    write_standing(tx, id, next).await?;
                    in_transaction(
                        tx,
                        "UPDATE jobs SET origin = $2, mount_from = $3, created_at = $4, \
                         source = $5 WHERE id = $1",
                        &[&id, &origin, &mount_from, &now, &source],
                    )
                    .await?;
                }
            }
            return Ok(arrival.arms());
        }
        // Inserted and gone again three times over: it is recorded by whoever keeps doing so.
        Ok(false)
    }
}

#[async_trait]
impl Store for PgStore {
    fn shown(&self) -> String {
        self.shown.clone()
    }

    fn deadline(&self) -> Option<Duration> {
        Some(self.deadline)
    }

    async fn health(&self, now: i64) -> Result<(), QueueError> {
        self.execute(
            "INSERT INTO health (id, checked_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            &[&now],
        )
        .await
        .map(|_| ())
    }

    async fn enqueue(&self, jobs: Vec<NewJob>, now: i64) -> Result<usize, QueueError> {
        let mut client = self.client().await?;
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let mut armed = 0;
        let mut targets: Vec<&str> = Vec::new();
        for job in &jobs {
            armed += usize::from(self.arrive(&tx, job, now).await.map_err(pg)?);
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
        Ok(armed)
    }

    /// One statement, for the claim rate several replicas need: the transition is
    /// `Standing::claimed` (running, one more attempt, started now), with this replica's lease.
    async fn claim(&self, target: &str, now: i64) -> Result<Option<Job>, QueueError> {
        let until = now + self.lease.as_millis() as i64;
        let rows = self
            .query_relaxed(
                &format!(
                    "UPDATE jobs SET state = $5, attempts = attempts + 1, \
                         updated_at = $2, started_at = $2, lease_owner = $3, lease_until = $4 \
                     WHERE id = (SELECT id FROM jobs WHERE target = $1 AND state = $6 \
                                 AND next_attempt_at <= $2 ORDER BY {CLAIM_ORDER} LIMIT 1 \
                                 FOR UPDATE SKIP LOCKED) \
                     RETURNING {JOB_COLUMNS}"
                ),
                &[
                    &target,
                    &now,
                    &self.replica,
                    &until,
                    &JobState::Running.as_str(),
                    &JobState::Pending.as_str(),
                ],
            )
            .await?;
        let job = self.jobs(&rows)?.into_iter().next();
        if let Some(job) = &job {
            self.in_hand.insert(job.id, now);
        }
        Ok(job)
    }

    async fn next_due(&self, target: &str) -> Result<Option<i64>, QueueError> {
        let rows = self
            .query(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE target = $1 AND state = $2",
                &[&target, &JobState::Pending.as_str()],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.try_get(0).ok()).flatten())
    }

    /// The attempt is always kept in the history; the job's standing changes only while this
    /// replica still holds its lease (another may have taken it over). The attempt is dated by
    /// this replica's own claim.
    async fn finish(&self, id: i64, outcome: Outcome, now: i64) -> Result<(), QueueError> {
        let mut client = self.client().await?;
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let lock = tx
            .prepare_cached(&format!(
                "SELECT {STANDING_COLUMNS}, lease_owner = $2 AND state = $3 \
                 FROM jobs WHERE id = $1 FOR UPDATE"
            ))
            .await
            .map_err(pg)?;
        // Read under the row's lock: an enqueue that re-arms the job waits for this commit.
        let row = tx
            .query_opt(&lock, &[&id, &self.replica, &JobState::Running.as_str()])
            .await
            .map_err(pg)?;
        if let Some(row) = row {
            let mut standing = standing_from_row(&row, 0).map_err(pg)?;
            let ours: bool = row.try_get(10).map_err(pg)?;
            if let Some(claimed) = self.in_hand.get(&id) {
                standing.started_at = Some(*claimed);
            }
            let (next, attempt) = standing.finished(&outcome, now);
            if ours {
                write_standing(&tx, id, &next).await.map_err(pg)?;
            }
            insert_attempt(&tx, id, &attempt, &self.replica)
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        self.in_hand.remove(&id);
        Ok(())
    }

    async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let rows = self
            .query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(self.jobs(&rows)?.into_iter().next())
    }

    async fn attempts(&self, id: i64) -> Result<Vec<Attempt>, QueueError> {
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

    async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
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

    async fn retry(&self, id: i64, now: i64) -> Result<bool, QueueError> {
        let mut client = self.client().await?;
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                &format!("SELECT {STANDING_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"),
                &[&id],
            )
            .await
            .map_err(pg)?;
        let next = match row {
            Some(row) => standing_from_row(&row, 0).map_err(pg)?.retried(now),
            None => None,
        };
        let Some(next) = next else {
            return Ok(false);
        };
        write_standing(&tx, id, &next).await.map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    /// One statement over every failed job (there may be thousands): `Standing::retried` of
    /// each, bound as SQL.
    async fn retry_failed(&self, target: Option<String>, now: i64) -> Result<usize, QueueError> {
        self.execute(
            "UPDATE jobs SET state = $3, attempts = 0, next_attempt_at = $1, \
                 updated_at = $1, finished_at = NULL, lease_owner = '' \
             WHERE state = $4 AND ($2::TEXT IS NULL OR target = $2)",
            &[
                &now,
                &target,
                &JobState::Pending.as_str(),
                &JobState::Failed.as_str(),
            ],
        )
        .await
        .map(|n| n as usize)
    }

    async fn counts(&self) -> Result<Vec<StateCount>, QueueError> {
        let rows = self
            .query(
                "SELECT target, state, COUNT(*), \
                        MIN(CASE WHEN state = ANY($1) THEN created_at END) \
                 FROM jobs GROUP BY target, state ORDER BY target",
                &[&state_names(&lifecycle::UNFINISHED)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StateCount {
                    target: r.try_get(0)?,
                    state: JobState::parse(r.try_get(1)?).unwrap_or(JobState::Failed),
                    jobs: r.try_get::<_, i64>(2)?.max(0) as u64,
                    oldest_unfinished_at: r.try_get(3)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e))
    }

    async fn purge(&self, cutoff: i64) -> Result<usize, QueueError> {
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
            "DELETE FROM jobs WHERE state = ANY($2) AND finished_at < $1",
            &[&cutoff, &state_names(&lifecycle::FORGETTABLE)],
        )
        .await
        .map(|n| n as usize)
    }

    async fn remember_blob_home(&self, home: BlobHome) -> Result<(), QueueError> {
        self.query_relaxed(
            "INSERT INTO blob_homes (target, digest, repository, seen_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (target, digest, repository) DO UPDATE SET seen_at = excluded.seen_at",
            &[&home.target, &home.digest, &home.repository, &home.seen_at],
        )
        .await
        .map(|_| ())
    }

    async fn blob_homes(
        &self,
        target: &str,
        digest: &str,
        limit: i64,
    ) -> Result<Vec<String>, QueueError> {
        let rows = self
            .query(
                "SELECT repository FROM blob_homes WHERE target = $1 AND digest = $2 \
                 ORDER BY seen_at DESC LIMIT $3",
                &[&target, &digest, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    async fn record_backfill(&self, progress: String, now: i64) -> Result<i64, QueueError> {
        let rows = self
            .query(
                "INSERT INTO backfills (replica, running, progress, updated_at) \
                 VALUES ($1, TRUE, $2, $3) RETURNING id",
                &[&self.replica, &progress, &now],
            )
            .await?;
        let row = rows.first().ok_or_else(|| QueueError::PostgresPool {
            database: self.shown.clone(),
            message: "recording a backfill returned no id".into(),
        })?;
        row.try_get(0).map_err(|e| self.error(e))
    }

    async fn save_backfill(
        &self,
        id: i64,
        progress: String,
        running: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        self.query_relaxed(
            "UPDATE backfills SET progress = $2, running = $3, updated_at = $4 WHERE id = $1",
            &[&id, &progress, &running, &now],
        )
        .await
        .map(|_| ())
    }

    async fn backfills(&self, id: Option<i64>) -> Result<Vec<BackfillRecord>, QueueError> {
        let rows = self
            .query(
                "SELECT id, progress, interrupted FROM backfills \
                 WHERE $1::BIGINT IS NULL OR id = $1 ORDER BY id DESC LIMIT 100",
                &[&id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(BackfillRecord {
                    id: r.try_get(0)?,
                    progress: r.try_get(1)?,
                    interrupted: r.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(e))
    }

    async fn request_backfill_cancel(&self, id: i64, now: i64) -> Result<bool, QueueError> {
        self.execute(
            "INSERT INTO backfill_cancels (id, requested_at) \
             SELECT id, $2 FROM backfills WHERE id = $1 AND running \
             ON CONFLICT (id) DO NOTHING",
            &[&id, &now],
        )
        .await?;
        let rows = self
            .query("SELECT 1 FROM backfills WHERE id = $1 AND running", &[&id])
            .await?;
        Ok(!rows.is_empty())
    }

    async fn backfill_cancel_requested(&self, id: i64) -> Result<bool, QueueError> {
        let rows = self
            .query("SELECT 1 FROM backfill_cancels WHERE id = $1", &[&id])
            .await?;
        Ok(!rows.is_empty())
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, QueueError> {
        let rows = self
            .query("SELECT value FROM settings WHERE name = $1", &[&name])
            .await?;
        rows.first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| self.error(e))
    }

    async fn put_setting(&self, name: &str, value: &str, now: i64) -> Result<(), QueueError> {
        self.execute(
            "INSERT INTO settings (name, value, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, \
             updated_at = excluded.updated_at",
            &[&name, &value, &now],
        )
        .await
        .map(|_| ())
    }

    async fn export(&self) -> Result<Exported, QueueError> {
        let pg = |e| self.error(e);
        let rows = self
            .query(
                &format!("SELECT {JOB_COLUMNS}, started_at FROM jobs ORDER BY id"),
                &[],
            )
            .await?;
        let jobs = rows
            .iter()
            .map(|r| Ok((job_from_row(r)?, r.try_get::<_, Option<i64>>(18)?)))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        let rows = self
            .query(
                "SELECT job_id, started_at, finished_at, result, detail FROM attempts ORDER BY id",
                &[],
            )
            .await?;
        let attempts = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, i64>(0)?,
                    Attempt {
                        started_at: r.try_get(1)?,
                        finished_at: r.try_get(2)?,
                        result: AttemptResult::parse(r.try_get(3)?),
                        detail: r.try_get(4)?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        let rows = self
            .query(
                "SELECT target, digest, repository, seen_at FROM blob_homes",
                &[],
            )
            .await?;
        let blob_homes = rows
            .iter()
            .map(|r| {
                Ok(BlobHome {
                    target: r.try_get(0)?,
                    digest: r.try_get(1)?,
                    repository: r.try_get(2)?,
                    seen_at: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        Ok(Exported {
            jobs,
            attempts,
            blob_homes,
        })
    }

    async fn import(&self, from: Exported) -> Result<Imported, QueueError> {
        let mut client = self.client().await?;
        let pg = |e| self.error(e);
        let tx = client.transaction().await.map_err(pg)?;
        let mut imported = Imported::default();
        let mut new_ids = std::collections::HashMap::new();
        for (job, started_at) in &from.jobs {
            if let Some(id) = import_job(&tx, job, *started_at).await.map_err(pg)? {
                new_ids.insert(job.id, id);
            }
        }
        imported.jobs = new_ids.len();
        for (job_id, a) in &from.attempts {
            if let Some(id) = new_ids.get(job_id) {
                insert_attempt(&tx, *id, a, "migrated").await.map_err(pg)?;
                imported.attempts += 1;
            }
        }
        for home in &from.blob_homes {
            imported.blob_homes += in_transaction(
                &tx,
                "INSERT INTO blob_homes (target, digest, repository, seen_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&home.target, &home.digest, &home.repository, &home.seen_at],
            )
            .await
            .map_err(pg)? as usize;
        }
        tx.commit().await.map_err(pg)?;
        Ok(imported)
    }
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
