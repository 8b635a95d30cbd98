//! The PostgreSQL store's tables and rows: the schema, a row as a [`Job`] or a [`Standing`], and
//! the statements that write one inside a transaction.

use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::super::job::{Attempt, ErrorClass, Job, JobKind, JobOrigin, JobState};
use super::super::lifecycle::Standing;

pub(super) const SCHEMA: &str = r#"
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
-- Where a job copies from, when not Harbor: a target that was the primary.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS settings (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_identity ON jobs(target, kind, repository, tag, digest);
-- A claim's order, id included: without it every claim sorts all the jobs due at once.
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_due_in_order ON jobs(target, state, next_attempt_at, id);
-- The claim's order (CLAIM_ORDER), so a claim reads one entry.
CREATE INDEX IF NOT EXISTS jobs_due_blobs_last ON jobs(target, state, (kind = 'blob'), next_attempt_at, id);
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

pub(super) const JOB_COLUMNS: &str = "id, target, kind, repository, tag, digest, mount_from, origin, state, \
     attempts, created_at, updated_at, next_attempt_at, finished_at, detail, error_class, target_digest, \
     source";

/// The columns of [`Standing`], in its order.
pub(super) const STANDING_COLUMNS: &str = "state, attempts, next_attempt_at, started_at, finished_at, \
     updated_at, detail, error_class, target_digest, rearm";

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn job_from_row(row: &Row) -> Result<Job, tokio_postgres::Error> {
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
        source: non_empty(row.try_get(17)?),
    })
}

/// A [`Standing`] from the row's columns at `at` onwards ([`STANDING_COLUMNS`]).
pub(super) fn standing_from_row(row: &Row, at: usize) -> Result<Standing, tokio_postgres::Error> {
    Ok(Standing {
        state: JobState::parse(row.try_get(at)?).unwrap_or(JobState::Failed),
        attempts: row.try_get::<_, i32>(at + 1)?.max(0) as u32,
        next_attempt_at: row.try_get(at + 2)?,
        started_at: row.try_get(at + 3)?,
        finished_at: row.try_get(at + 4)?,
        updated_at: row.try_get(at + 5)?,
        detail: row.try_get(at + 6)?,
        error_class: ErrorClass::parse(row.try_get(at + 7)?),
        target_digest: non_empty(row.try_get(at + 8)?),
        rearm: row.try_get::<_, i32>(at + 9)? != 0,
    })
}

/// Writes a job's standing. A job not running has no lease.
pub(super) async fn write_standing(
    tx: &Transaction<'_>,
    id: i64,
    s: &Standing,
) -> Result<u64, tokio_postgres::Error> {
    let attempts = i32::try_from(s.attempts).unwrap_or(i32::MAX);
    let lease_kept = s.state == JobState::Running;
    in_transaction(
        tx,
        "UPDATE jobs SET state = $2, attempts = $3, next_attempt_at = $4, started_at = $5, \
             finished_at = $6, updated_at = $7, detail = $8, error_class = $9, \
             target_digest = $10, rearm = $11, \
             lease_owner = CASE WHEN $12 THEN lease_owner ELSE '' END \
         WHERE id = $1",
        &[
            &id,
            &s.state.as_str(),
            &attempts,
            &s.next_attempt_at,
            &s.started_at,
            &s.finished_at,
            &s.updated_at,
            &s.detail,
            &s.error_class.map_or("", ErrorClass::as_str),
            &s.target_digest.as_deref().unwrap_or(""),
            &i32::from(s.rearm),
            &lease_kept,
        ],
    )
    .await
}

/// Runs one statement of a transaction, prepared once per connection.
pub(super) async fn in_transaction(
    tx: &Transaction<'_>,
    sql: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, args).await
}

/// Adds an attempt to a job's history, with the replica that made it.
pub(super) async fn insert_attempt(
    tx: &Transaction<'_>,
    id: i64,
    a: &Attempt,
    replica: &str,
) -> Result<u64, tokio_postgres::Error> {
    in_transaction(
        tx,
        "INSERT INTO attempts (job_id, started_at, finished_at, result, detail, replica) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &id,
            &a.started_at,
            &a.finished_at,
            &a.result.as_str(),
            &a.detail,
            &replica,
        ],
    )
    .await
}

/// States as a text array, for `state = ANY($n)`: bound, never written into the SQL.
pub(super) fn state_names(states: &[JobState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

/// Adds one exported job unless its identity is here; its new id if added. A job that was
/// running arrives pending: no replica holds it.
pub(super) async fn import_job(
    tx: &Transaction<'_>,
    job: &Job,
    started_at: Option<i64>,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let state = match job.state {
        JobState::Running => JobState::Pending,
        other => other,
    };
    let attempts = i32::try_from(job.attempts).unwrap_or(i32::MAX);
    let insert = tx
        .prepare_cached(
            "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, origin, \
                 state, attempts, created_at, updated_at, next_attempt_at, started_at, \
                 finished_at, detail, error_class, target_digest, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                 $18) \
             ON CONFLICT (target, kind, repository, tag, digest) DO NOTHING RETURNING id",
        )
        .await?;
    let row = tx
        .query_opt(
            &insert,
            &[
                &job.target,
                &job.kind.as_str(),
                &job.repository,
                &job.tag.as_deref().unwrap_or(""),
                &job.digest.as_deref().unwrap_or(""),
                &job.mount_from.as_deref().unwrap_or(""),
                &job.origin.as_str(),
                &state.as_str(),
                &attempts,
                &job.created_at,
                &job.updated_at,
                &job.next_attempt_at,
                &started_at,
                &job.finished_at,
                &job.detail,
                &job.error_class.map_or("", ErrorClass::as_str),
                &job.target_digest.as_deref().unwrap_or(""),
                &job.source.as_deref().unwrap_or(""),
            ],
        )
        .await?;
    row.map(|r| r.try_get(0)).transpose()
}
