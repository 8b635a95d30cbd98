//! The durable job queue: what must reach which target, and what happened when it was tried.
//!
//! A push Harbor acknowledged must never be lost to the mirror, so a job is committed before the
//! client sees its 201: to SQLite under the state directory for one instance (`sqlite`), or to
//! PostgreSQL shared by several replicas (`postgres`). Both keep one contract (`store`): the job
//! lifecycle is decided once, in plain Rust (`lifecycle`), and only bound to SQL in each store;
//! how processes sharing a store get along (leases, heartbeats, turns) is a seam of its own,
//! which one process alone keeps trivially. Jobs are deduplicated by identity (target, kind,
//! repository, tag, digest): the same push seen twice is one job, and a finished job seen again
//! is re-armed. A process that dies mid-job leaves it `running`; it goes back to `pending` at
//! the next start (SQLite) or when its lease runs out (PostgreSQL), and because every job is
//! idempotent, redoing it is harmless.
//!
//! The tee, the workers and the operator's side all use [`Queue`], the facade below; the
//! conformance suite (`tests/`) runs every scenario on both stores.

mod job;
mod lifecycle;
mod postgres;
mod primary;
mod sqlite;
pub(crate) mod state_lock;
mod store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::Notify;

pub(crate) use job::{
    Attempt, ErrorClass, Job, JobKind, JobOrigin, NewJob, Outcome, Replica, TargetCounts,
};
pub use job::{JobFilter, JobState};
pub(crate) use primary::{Primary, PrimaryRecord, UPSTREAM};
use store::{BlobHome, Coordination, Store};

/// The database could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// PostgreSQL failed (unreachable, refused, or a statement failed).
    #[error("job queue database {database}: {source}")]
    Postgres {
        /// `host:port/dbname`.
        database: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// No connection to PostgreSQL could be had, or TLS to it could not be set up.
    #[error("job queue database {database}: {message}")]
    PostgresPool {
        /// `host:port/dbname`.
        database: String,
        /// What failed.
        message: String,
    },
    /// The database did not answer in time: it accepts connections but stalls (overloaded, a
    /// lock held for long, a storage hang), or the network to it drops packets.
    #[error(
        "job queue database {database} did not answer within {after:?}: check the database server's load, locks and disk; pushes get 503 until it answers"
    )]
    Timeout {
        /// Where it is.
        database: String,
        /// The deadline that passed (`[state] database_timeout`).
        after: Duration,
    },
    /// SQLite failed (disk full, corruption, permissions).
    #[error("job queue database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The state directory cannot be created.
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("job queue task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The database file regtee opened is no longer the one at its path: deleted, or replaced
    /// by another file. What regtee would write now would be lost at the next start.
    #[error(
        "job queue database {path} was {what} while regtee had it open: restore it, or restart regtee to start a new queue (jobs recorded since it vanished are lost)"
    )]
    FileGone {
        /// The database file.
        path: PathBuf,
        /// `deleted` or `replaced`.
        what: &'static str,
    },
    /// Something in the database regtee wrote cannot be read back.
    #[error("job queue database: {0}")]
    Corrupt(String),
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Wakes every worker waiting on `waker`, and the next one to wait if none is (a worker
/// between its claim and its wait would otherwise miss the job).
fn wake_workers(waker: &Notify) {
    waker.notify_waiters();
    waker.notify_one();
}

/// Wakes workers when dropped: at the end of an enqueue, however it ends.
struct WakeOnDrop(Vec<Arc<Notify>>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        for waker in &self.0 {
            wake_workers(waker);
        }
    }
}

/// The workers' notifiers, one per target, shared with the stores (PostgreSQL wakes them on
/// other replicas' jobs).
#[derive(Clone, Default)]
pub(crate) struct Wakers(Arc<DashMap<String, Arc<Notify>>>);

impl Wakers {
    fn get(&self, target: &str) -> Arc<Notify> {
        self.0
            .entry(target.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    fn wake(&self, target: &str) {
        wake_workers(&self.get(target));
    }

    fn wake_all(&self) {
        let targets: Vec<String> = self.0.iter().map(|e| e.key().clone()).collect();
        for t in targets {
            self.wake(&t);
        }
    }
}

/// A backfill as the queue's database keeps it, so that any replica can show it. Its progress
/// is the operator side's own JSON: the queue only stores it.
#[derive(Clone, Debug)]
pub(crate) struct BackfillRecord {
    /// Unique across replicas.
    pub id: i64,
    /// The progress, as last saved.
    pub progress: String,
    /// Its process stopped (died, or was restarted) before it ended: the progress is where it
    /// stopped.
    pub interrupted: bool,
}

/// How many repositories a blob's homes list offers as mount sources.
const BLOB_HOMES_KEPT: i64 = 8;

/// The queue, in whichever database the config names.
pub(crate) struct Queue {
    store: Arc<dyn Store>,
    coordination: Arc<dyn Coordination>,
    wakers: Wakers,
    /// Jobs whose last attempt's outcome could not be recorded yet; the instance is not ready
    /// while any is. Per job: one worker's success says nothing about another's.
    outcome_unrecorded: DashMap<i64, ()>,
}

/// What a migration did.
#[derive(Debug)]
pub(crate) struct Migrated {
    /// Jobs in the queue copied from.
    pub jobs: usize,
    /// Of those, added (the rest were there already).
    pub added: usize,
    /// Attempts added with them.
    pub attempts: usize,
    /// Mount sources (a repository on a target holding a blob) carried over.
    pub mount_sources: usize,
}

impl Queue {
    /// Opens (creating if needed) `jobs.db` in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Queue, QueueError> {
        let store = Arc::new(sqlite::SqliteStore::open(dir)?);
        Ok(Queue::with(store.clone(), store, Wakers::default()))
    }

    /// Opens the queue the config names: PostgreSQL when `[state] database` is set, else SQLite
    /// under `[state] dir`.
    pub(crate) async fn open_state(
        state: &crate::config::StateConfig,
    ) -> Result<Queue, QueueError> {
        match &state.database {
            None => Queue::open(&state.dir),
            Some(database) => {
                let wakers = Wakers::default();
                let store = Arc::new(postgres::PgStore::connect(database, wakers.clone()).await?);
                Ok(Queue::with(store.clone(), store, wakers))
            }
        }
    }

    fn with(store: Arc<dyn Store>, coordination: Arc<dyn Coordination>, wakers: Wakers) -> Queue {
        Queue {
            store,
            coordination,
            wakers,
            outcome_unrecorded: Default::default(),
        }
    }

    /// Runs one store operation within the store's deadline. Past it the caller gets
    /// [`QueueError::Timeout`] (a push: 503) and the operation is dropped: a transaction not
    /// committed yet rolls back, and one whose commit was already sent stands, which is
    /// harmless since jobs are deduplicated by identity.
    async fn within<T>(
        &self,
        operation: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        within(&*self.store, operation).await
    }

    /// This process's id among the replicas sharing a PostgreSQL queue.
    pub(crate) fn replica(&self) -> Option<&str> {
        self.coordination.replica()
    }

    /// Runs `work` unless another process sharing the queue is running work of that `name`;
    /// `None` when another one has it. One process alone always runs it.
    pub(crate) async fn alone<T>(
        &self,
        name: &str,
        work: impl Future<Output = T>,
    ) -> Result<Option<T>, QueueError> {
        let Some(turn) = self.within(self.coordination.take_turn(name)).await? else {
            return Ok(None);
        };
        let done = work.await;
        drop(turn);
        Ok(Some(done))
    }

    /// The replicas sharing this queue that sent a heartbeat lately (none for SQLite).
    pub(crate) async fn replicas(&self) -> Result<Vec<Replica>, QueueError> {
        self.within(self.coordination.replicas(now_ms())).await
    }

    /// Proves the queue can take a job now: a write transaction commits (a full disk, a
    /// damaged or replaced file, a database that is away fail it; a `SELECT` would not notice).
    pub(crate) async fn health(&self) -> Result<(), QueueError> {
        self.within(self.store.health(now_ms())).await
    }

    /// Whether an attempt's outcome is waiting to be recorded (the database refused it).
    pub(crate) fn outcome_unrecorded(&self) -> bool {
        !self.outcome_unrecorded.is_empty()
    }

    /// Puts jobs a dead process left `running` back to `pending`. One process: every running
    /// job (call once the state lock is held). Replicas: those whose lease ran out; the others
    /// belong to live replicas.
    pub(crate) async fn recover_interrupted(&self) -> Result<usize, QueueError> {
        let targets = self.within(self.coordination.recover(now_ms())).await?;
        for target in &targets {
            self.wakers.wake(target);
        }
        Ok(targets.len())
    }

    /// The notifier workers of `target` wait on.
    pub(crate) fn waker(&self, target: &str) -> Arc<Notify> {
        self.wakers.get(target)
    }

    /// Adds jobs in one transaction. A job identical to a pending one is merged into it; one
    /// identical to a running job marks it to run again when it ends; one identical to a
    /// finished job re-arms that job. Returns how many were armed.
    ///
    /// Once called, the jobs are committed even if the caller's future is dropped (a client
    /// hanging up mid-push, after Harbor took it): the work runs to its end on a task of its
    /// own, and the targets' workers are woken however it ends (a spurious wake costs one empty
    /// claim).
    pub(crate) async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<usize, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let wake = WakeOnDrop(jobs.iter().map(|j| self.waker(&j.target)).collect());
        let store = self.store.clone();
        tokio::spawn(async move {
            let armed = within(&*store, store.enqueue(jobs, now_ms())).await;
            drop(wake);
            armed
        })
        .await?
    }

    /// Takes the next due job of `target`, marking it running.
    pub(crate) async fn claim(&self, target: &str) -> Result<Option<Job>, QueueError> {
        self.within(self.store.claim(target, now_ms())).await
    }

    /// When the next pending job of `target` becomes due (ms), if any is pending.
    pub(crate) async fn next_due(&self, target: &str) -> Result<Option<i64>, QueueError> {
        self.within(self.store.next_due(target)).await
    }

    /// Records how an attempt ended; its texts are scrubbed first (they quote other servers).
    ///
    /// A job re-armed while it ran (the same write arrived again) goes back to pending at once.
    /// While the database refuses outcomes, [`Queue::outcome_unrecorded`] says so.
    pub(crate) async fn finish(&self, id: i64, outcome: Outcome) -> Result<(), QueueError> {
        let outcome = outcome.scrubbed();
        let result = self.within(self.store.finish(id, outcome, now_ms())).await;
        if result.is_ok() {
            self.outcome_unrecorded.remove(&id);
        } else {
            self.outcome_unrecorded.insert(id, ());
        }
        result
    }

    /// One job.
    pub(crate) async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        self.within(self.store.get(id)).await
    }

    /// A job's attempts, oldest first.
    pub(crate) async fn attempts(&self, id: i64) -> Result<Vec<Attempt>, QueueError> {
        self.within(self.store.attempts(id)).await
    }

    /// Jobs matching `filter`, newest first.
    pub(crate) async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
        self.within(self.store.list(filter)).await
    }

    /// Re-arms one finished (failed, skipped or done) job. Returns whether it was re-armed.
    pub(crate) async fn retry(&self, id: i64) -> Result<bool, QueueError> {
        let target = self.get(id).await?.map(|j| j.target);
        let changed = self.within(self.store.retry(id, now_ms())).await?;
        if let Some(t) = target {
            self.wakers.wake(&t);
        }
        Ok(changed)
    }

    /// Re-arms every failed job (of one target, if given). Returns how many.
    pub(crate) async fn retry_failed(&self, target: Option<String>) -> Result<usize, QueueError> {
        let changed = self
            .within(self.store.retry_failed(target.clone(), now_ms()))
            .await?;
        match &target {
            Some(t) => self.wakers.wake(t),
            None => self.wakers.wake_all(),
        }
        Ok(changed)
    }

    /// Counts per target and state, with the oldest unfinished job's age. Every name in
    /// `configured` gets a row, so a target with no jobs yet still shows (and exports zeros).
    pub(crate) async fn counts(
        &self,
        configured: &[String],
    ) -> Result<Vec<TargetCounts>, QueueError> {
        let counted = self.within(self.store.counts()).await?;
        Ok(TargetCounts::tally(counted, configured))
    }

    /// Records that `repository` on `target` holds the blob `digest`: a source for later
    /// cross-repository mounts of it, for every replica and after restarts.
    pub(crate) async fn remember_blob_home(
        &self,
        target: &str,
        digest: &crate::oci::digest::Digest,
        repository: &str,
    ) -> Result<(), QueueError> {
        let home = BlobHome {
            target: target.to_string(),
            digest: digest.to_string(),
            repository: repository.to_string(),
            seen_at: now_ms(),
        };
        self.within(self.store.remember_blob_home(home)).await
    }

    /// Repositories on `target` known to hold the blob `digest`, most recently seen first (at
    /// most eight).
    pub(crate) async fn blob_homes(
        &self,
        target: &str,
        digest: &crate::oci::digest::Digest,
    ) -> Result<Vec<String>, QueueError> {
        self.within(
            self.store
                .blob_homes(target, digest.as_str(), BLOB_HOMES_KEPT),
        )
        .await
    }

    /// Records a backfill started by this process; returns its id.
    pub(crate) async fn record_backfill(&self, progress: String) -> Result<i64, QueueError> {
        self.within(self.store.record_backfill(progress, now_ms()))
            .await
    }

    /// Saves a backfill's progress; `running` false once it ended.
    pub(crate) async fn save_backfill(
        &self,
        id: i64,
        progress: String,
        running: bool,
    ) -> Result<(), QueueError> {
        self.within(self.store.save_backfill(id, progress, running, now_ms()))
            .await
    }

    /// Asks backfill `id` to stop, whichever replica runs it; whether it is running.
    pub(crate) async fn request_backfill_cancel(&self, id: i64) -> Result<bool, QueueError> {
        self.within(self.store.request_backfill_cancel(id, now_ms()))
            .await
    }

    /// The primary as recorded (Harbor when nothing was ever switched). A record regtee cannot
    /// read is an error: serving from a guess would send clients to the wrong registry.
    pub(crate) async fn primary(&self) -> Result<PrimaryRecord, QueueError> {
        match self.within(self.store.setting(primary::SETTING)).await? {
            None => Ok(PrimaryRecord::default()),
            Some(text) => serde_json::from_str(&text).map_err(|e| QueueError::Corrupt(format!(
                "the recorded primary is not readable ({e}); set it again with regtee cutover --to"
            ))),
        }
    }

    /// Records a new primary; every replica follows within a second.
    pub(crate) async fn set_primary(&self, record: &PrimaryRecord) -> Result<(), QueueError> {
        let text = serde_json::to_string(record).unwrap_or_default();
        self.within(
            self.store
                .put_setting(primary::SETTING, &text, record.since),
        )
        .await
    }

    /// Whether someone asked backfill `id` to stop.
    pub(crate) async fn backfill_cancel_requested(&self, id: i64) -> Result<bool, QueueError> {
        self.within(self.store.backfill_cancel_requested(id)).await
    }

    /// The newest backfills (at most 100), any replica's, newest first.
    pub(crate) async fn backfills(&self) -> Result<Vec<BackfillRecord>, QueueError> {
        self.within(self.store.backfills(None)).await
    }

    /// One backfill, whichever replica runs or ran it.
    pub(crate) async fn backfill(&self, id: i64) -> Result<Option<BackfillRecord>, QueueError> {
        Ok(self
            .within(self.store.backfills(Some(id)))
            .await?
            .into_iter()
            .next())
    }

    /// Deletes done and skipped jobs that finished before `older_than` ago, and blob homes and
    /// ended backfills not touched since. Failed jobs stay until someone retries them: they are
    /// work nobody has done yet.
    pub(crate) async fn purge(&self, older_than: Duration) -> Result<usize, QueueError> {
        let cutoff = now_ms() - older_than.as_millis() as i64;
        self.within(self.store.purge(cutoff)).await
    }

    /// Copies this queue into another, whatever the two stores: every job in every state, with
    /// its attempts, and the mount sources. Jobs already there (by identity) are left alone, so
    /// it can run twice. No deadline: a large queue takes as long as it takes.
    pub(crate) async fn migrate_into(&self, to: &Queue) -> Result<Migrated, QueueError> {
        let exported = self.store.export().await?;
        let jobs = exported.jobs.len();
        let imported = to.store.import(exported).await?;
        Ok(Migrated {
            jobs,
            added: imported.jobs,
            attempts: imported.attempts,
            mount_sources: imported.blob_homes,
        })
    }
}

/// `operation` within `store`'s deadline, if it has one.
async fn within<T>(
    store: &dyn Store,
    operation: impl Future<Output = Result<T, QueueError>>,
) -> Result<T, QueueError> {
    match store.deadline() {
        None => operation.await,
        Some(after) => match tokio::time::timeout(after, operation).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Timeout {
                database: store.shown(),
                after,
            }),
        },
    }
}

/// Keeps this process's place among the replicas sharing the queue: heartbeats, renewing the
/// leases of its jobs and taking back a dead replica's, as often as the store asks (a third of
/// a lease). Nothing for one process alone.
pub(crate) fn spawn_lease_keeper(
    tasks: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
    queue: Arc<Queue>,
) {
    let Some(period) = queue.coordination.tend_every() else {
        return;
    };
    let cancel = cancel.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            match queue.within(queue.coordination.tend(now_ms())).await {
                Ok(resumed) => {
                    for target in &resumed {
                        queue.wakers.wake(target);
                    }
                    if !resumed.is_empty() {
                        tracing::info!(jobs = resumed.len(), "took over jobs whose replica stopped renewing their lease");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not renew job leases; if this lasts a lease period, other replicas will redo this replica's running jobs"),
            }
        }
    });
}

/// Purges finished jobs older than `retention` once an hour (and shortly after start); with
/// several replicas, one of them at a time.
pub(crate) fn spawn_retention(
    tasks: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
    queue: Arc<Queue>,
    retention: Duration,
) {
    let cancel = cancel.clone();
    tasks.spawn(async move {
        let mut wait = Duration::from_secs(60);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = Duration::from_secs(3600);
            match queue.alone("retention", queue.purge(retention)).await {
                Ok(None) | Ok(Some(Ok(0))) => {}
                Ok(Some(Ok(n))) => {
                    tracing::info!(jobs = n, ?retention, "purged finished jobs past retention")
                }
                Ok(Some(Err(e))) | Err(e) => tracing::warn!(error = %e, "could not purge old jobs"),
            }
        }
    });
}

/// Follows the primary recorded in the queue's database: every replica sees a switch within
/// half a second, and logs it once.
pub(crate) fn spawn_primary_follower(
    tasks: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
    queue: Arc<Queue>,
    current: tokio::sync::watch::Sender<PrimaryRecord>,
) {
    let cancel = cancel.clone();
    tasks.spawn(async move {
        let unreadable = crate::throttle::Throttle::new(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            match queue.primary().await {
                Ok(record) => {
                    current.send_if_modified(|known| {
                        if *known == record {
                            return false;
                        }
                        tracing::warn!(
                            primary = record.primary.name(),
                            by = %record.by,
                            forced = record.forced,
                            "the primary changed: clients' requests are now carried out on {}",
                            record.primary.name()
                        );
                        *known = record;
                        true
                    });
                }
                Err(e) => {
                    if let Some(held_back) = unreadable.allow() {
                        tracing::error!(error = %e, held_back, "cannot read the primary from the queue database; serving from the one known last");
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests;
