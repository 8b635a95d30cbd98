//! The contract every queue database keeps: one job lifecycle (`lifecycle`), bound to SQL in
//! each store, and one way for processes sharing it to take turns. `Queue` (mod.rs) is all its
//! users see; the conformance suite (`tests/`) runs every scenario against every store.
//!
//! Times come in as arguments (milliseconds since the epoch), so the same scenario can say
//! "this job finished forty days ago" to any store.

use std::time::Duration;

use async_trait::async_trait;

use super::job::{Attempt, Job, JobFilter, NewJob, Outcome, Replica, StateCount};
use super::{BackfillRecord, QueueError};

/// A repository on a target known to hold a blob: a source for later mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlobHome {
    pub(crate) target: String,
    pub(crate) digest: String,
    pub(crate) repository: String,
    pub(crate) seen_at: i64,
}

/// A queue's whole content, for a migration between any two stores: every job (with when its
/// attempt began), every attempt (with its job's id), every mount source.
#[derive(Clone, Debug, Default)]
pub(crate) struct Exported {
    pub(crate) jobs: Vec<(Job, Option<i64>)>,
    pub(crate) attempts: Vec<(i64, Attempt)>,
    pub(crate) blob_homes: Vec<BlobHome>,
}

/// What an import added (jobs already there, by identity, are left as they are).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Imported {
    pub(crate) jobs: usize,
    pub(crate) attempts: usize,
    pub(crate) blob_homes: usize,
}

/// The jobs, their attempts, mount sources and backfills, in one database.
#[async_trait]
pub(crate) trait Store: Send + Sync {
    /// Where it is, for errors and logs (`host:port/db`, or the file).
    fn shown(&self) -> String;

    /// How long one operation may take before it counts as failed; `None`: as long as it takes.
    fn deadline(&self) -> Option<Duration>;

    /// Proves a job can be recorded now: a write transaction commits.
    async fn health(&self, now: i64) -> Result<(), QueueError>;

    /// Records jobs in one transaction, durably: a new identity is a new job, one already there
    /// arrives again (`Standing::arrival`). Returns how many were armed.
    async fn enqueue(&self, jobs: Vec<NewJob>, now: i64) -> Result<usize, QueueError>;

    /// Takes the next due pending job of `target` (`Standing::claimed`).
    async fn claim(&self, target: &str, now: i64) -> Result<Option<Job>, QueueError>;

    /// When the next pending job of `target` becomes due, if any is pending.
    async fn next_due(&self, target: &str) -> Result<Option<i64>, QueueError>;

    /// Records how an attempt ended (`Standing::finished`), the attempt in the history.
    async fn finish(&self, id: i64, outcome: Outcome, now: i64) -> Result<(), QueueError>;

    /// One job.
    async fn get(&self, id: i64) -> Result<Option<Job>, QueueError>;

    /// A job's attempts, oldest first.
    async fn attempts(&self, id: i64) -> Result<Vec<Attempt>, QueueError>;

    /// Jobs matching `filter`, newest first.
    async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError>;

    /// Asks for one finished job again (`Standing::retried`); whether it was finished.
    async fn retry(&self, id: i64, now: i64) -> Result<bool, QueueError>;

    /// Asks for every failed job again (of one target, if given); how many.
    async fn retry_failed(&self, target: Option<String>, now: i64) -> Result<usize, QueueError>;

    /// Jobs per target and state, ordered by target.
    async fn counts(&self) -> Result<Vec<StateCount>, QueueError>;

    /// Forgets what retention may (`lifecycle::FORGETTABLE` jobs finished before `cutoff`, mount
    /// sources not seen since, ended backfills not touched since); how many jobs.
    async fn purge(&self, cutoff: i64) -> Result<usize, QueueError>;

    /// Records (or refreshes) a mount source.
    async fn remember_blob_home(&self, home: BlobHome) -> Result<(), QueueError>;

    /// Repositories on `target` holding `digest`, most recently seen first, at most `limit`.
    async fn blob_homes(
        &self,
        target: &str,
        digest: &str,
        limit: i64,
    ) -> Result<Vec<String>, QueueError>;

    /// Records a backfill started by this process, running; its id.
    async fn record_backfill(&self, progress: String, now: i64) -> Result<i64, QueueError>;

    /// Saves a backfill's progress; `running` false once it ended.
    async fn save_backfill(
        &self,
        id: i64,
        progress: String,
        running: bool,
        now: i64,
    ) -> Result<(), QueueError>;

    /// The newest backfills (at most 100), or the one with `id`.
    async fn backfills(&self, id: Option<i64>) -> Result<Vec<BackfillRecord>, QueueError>;

    /// Asks a running backfill to stop; whether it is running.
    async fn request_backfill_cancel(&self, id: i64, now: i64) -> Result<bool, QueueError>;

    /// Whether someone asked backfill `id` to stop.
    async fn backfill_cancel_requested(&self, id: i64) -> Result<bool, QueueError>;

    /// A setting every process sharing the store reads (the primary), if it was ever written.
    async fn setting(&self, name: &str) -> Result<Option<String>, QueueError>;

    /// Writes a setting.
    async fn put_setting(&self, name: &str, value: &str, now: i64) -> Result<(), QueueError>;

    /// Everything, for a migration.
    async fn export(&self) -> Result<Exported, QueueError>;

    /// Adds what another store exported, in one transaction; jobs already here (by identity)
    /// are left as they are, so importing twice adds nothing. A job that was running arrives
    /// pending: no process here holds it.
    async fn import(&self, from: Exported) -> Result<Imported, QueueError>;
}

/// What holds a turn of work named alone (see [`Coordination::take_turn`]); dropping it ends
/// the turn.
pub(crate) struct Turn(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl Turn {
    /// A turn nothing else could have wanted: one process.
    pub(crate) fn uncontended() -> Turn {
        Turn(None)
    }

    /// A turn held by `holder` (a database session whose lock ends with it).
    pub(crate) fn held_by(holder: Box<dyn Send + Sync>) -> Turn {
        Turn(Some(holder))
    }
}

/// How the processes sharing a store get along: who they are, whose running jobs are whose,
/// whose turn it is. One process alone (SQLite) has nothing to agree on, and says so.
#[async_trait]
pub(crate) trait Coordination: Send + Sync {
    /// This process's id among the replicas; `None` when it is the only one.
    fn replica(&self) -> Option<&str>;

    /// How often [`Coordination::tend`] must run; `None`: never.
    fn tend_every(&self) -> Option<Duration>;

    /// At start: puts back to pending the jobs a dead process left running (`Standing::
    /// interrupted`), and marks its backfills interrupted. Returns the targets of the jobs put
    /// back. One process owns them all; replicas only those whose lease ran out.
    async fn recover(&self, now: i64) -> Result<Vec<String>, QueueError>;

    /// Every so often: says this process is alive, renews the leases of the jobs in hand, puts
    /// back those whose lease ran out. Returns the targets of the jobs put back.
    async fn tend(&self, now: i64) -> Result<Vec<String>, QueueError>;

    /// The replicas heard from lately.
    async fn replicas(&self, now: i64) -> Result<Vec<Replica>, QueueError>;

    /// The turn of the work called `name`, unless another process has it (`None`).
    async fn take_turn(&self, name: &str) -> Result<Option<Turn>, QueueError>;
}
