//! The SQLite store's tables and rows: the schema (and the columns added since the first
//! release), a row as a [`Job`] or a [`Standing`], and the statements that write one.

use rusqlite::types::Value;
use rusqlite::{Transaction, params};

use super::super::job::{Attempt, ErrorClass, Job, JobKind, JobOrigin, JobState};
use super::super::lifecycle::Standing;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id              INTEGER PRIMARY KEY,
    target          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    repository      TEXT NOT NULL,
    tag             TEXT NOT NULL DEFAULT '',
    digest          TEXT NOT NULL DEFAULT '',
    mount_from      TEXT NOT NULL DEFAULT '',
    origin          TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    detail          TEXT NOT NULL DEFAULT '',
    error_class     TEXT NOT NULL DEFAULT '',
    target_digest   TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_identity ON jobs(target, kind, repository, tag, digest);
-- A claim's order, id included: without it every claim sorts all the jobs due at once.
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_due_in_order ON jobs(target, state, next_attempt_at, id);
-- The claim's order (CLAIM_ORDER), so a claim reads one entry.
CREATE INDEX IF NOT EXISTS jobs_due_blobs_last ON jobs(target, state, kind = 'blob', next_attempt_at, id);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(state, finished_at);
CREATE INDEX IF NOT EXISTS jobs_repository ON jobs(repository);
CREATE TABLE IF NOT EXISTS attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    result      TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job_id);
CREATE TABLE IF NOT EXISTS health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_homes (
    target     TEXT NOT NULL,
    digest     TEXT NOT NULL,
    repository TEXT NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (target, digest, repository)
);
CREATE TABLE IF NOT EXISTS backfills (
    id          INTEGER PRIMARY KEY,
    running     INTEGER NOT NULL,
    interrupted INTEGER NOT NULL DEFAULT 0,
    progress    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS backfill_cancels (
    id           INTEGER PRIMARY KEY,
    requested_at INTEGER NOT NULL
);
"#;

/// Columns added after the first release, with their definitions; added to older databases at
/// open.
pub(super) const ADDED_COLUMNS: [(&str, &str); 2] = [
    // Set when the same write arrives while the job runs: it runs again once it ends, so what it
    // copies is never older than the last push.
    ("rearm", "INTEGER NOT NULL DEFAULT 0"),
    // Where the job copies from, when not Harbor: a target that was the primary.
    ("source", "TEXT NOT NULL DEFAULT ''"),
];

pub(super) const JOB_COLUMNS: &str = "id, target, kind, repository, tag, digest, mount_from, origin, state, \
     attempts, created_at, updated_at, next_attempt_at, finished_at, detail, error_class, target_digest, \
     source";

/// The columns of [`Standing`], in its order.
pub(super) const STANDING_COLUMNS: &str = "state, attempts, next_attempt_at, started_at, finished_at, \
     updated_at, detail, error_class, target_digest, rearm";

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: row.get(0)?,
        target: row.get(1)?,
        kind: JobKind::parse(&row.get::<_, String>(2)?),
        repository: row.get(3)?,
        tag: non_empty(row.get(4)?),
        digest: non_empty(row.get(5)?),
        mount_from: non_empty(row.get(6)?),
        origin: JobOrigin::parse(&row.get::<_, String>(7)?),
        state: JobState::parse(&row.get::<_, String>(8)?).unwrap_or(JobState::Failed),
        attempts: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        next_attempt_at: row.get(12)?,
        finished_at: row.get(13)?,
        detail: row.get(14)?,
        error_class: ErrorClass::parse(&row.get::<_, String>(15)?),
        target_digest: non_empty(row.get(16)?),
        source: non_empty(row.get(17)?),
    })
}

/// A [`Standing`] from the row's columns at `at` onwards ([`STANDING_COLUMNS`]).
pub(super) fn standing_from_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Standing> {
    Ok(Standing {
        state: JobState::parse(&row.get::<_, String>(at)?).unwrap_or(JobState::Failed),
        attempts: row.get(at + 1)?,
        next_attempt_at: row.get(at + 2)?,
        started_at: row.get(at + 3)?,
        finished_at: row.get(at + 4)?,
        updated_at: row.get(at + 5)?,
        detail: row.get(at + 6)?,
        error_class: ErrorClass::parse(&row.get::<_, String>(at + 7)?),
        target_digest: non_empty(row.get(at + 8)?),
        rearm: row.get::<_, i64>(at + 9)? != 0,
    })
}

/// Writes a job's standing.
pub(super) fn write_standing(tx: &Transaction<'_>, id: i64, s: &Standing) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE jobs SET state = ?2, attempts = ?3, next_attempt_at = ?4, started_at = ?5, \
             finished_at = ?6, updated_at = ?7, detail = ?8, error_class = ?9, \
             target_digest = ?10, rearm = ?11 \
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        s.state.as_str(),
        s.attempts,
        s.next_attempt_at,
        s.started_at,
        s.finished_at,
        s.updated_at,
        s.detail,
        s.error_class.map_or("", ErrorClass::as_str),
        s.target_digest.as_deref().unwrap_or(""),
        s.rearm,
    ])
    .map(|_| ())
}

/// Adds an attempt to a job's history.
pub(super) fn insert_attempt(tx: &Transaction<'_>, id: i64, a: &Attempt) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO attempts (job_id, started_at, finished_at, result, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        id,
        a.started_at,
        a.finished_at,
        a.result.as_str(),
        a.detail
    ])
    .map(|_| ())
}

/// `?n, ?n+1, ...` for `count` values from `first`: states bound as parameters, never written
/// into the SQL.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn state_values(states: &[JobState]) -> impl Iterator<Item = Value> + '_ {
    states.iter().map(|s| Value::from(s.as_str().to_string()))
}
