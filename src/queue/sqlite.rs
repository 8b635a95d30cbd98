//! The queue in one SQLite file under the state directory: the embedded default for a single
//! instance. WAL with `synchronous=FULL`, so a job is on disk before the client's 201.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;

use super::{
    Attempt, AttemptResult, ErrorClass, Job, JobFilter, JobKind, JobOrigin, JobState, NewJob,
    Outcome, QueueError, TargetCounts, now_ms,
};
use crate::oci::digest::Digest;
use crate::oci::names::{RepositoryName, Tag};

/// The queue in a SQLite file, behind a mutex, used from blocking threads.
pub(super) struct SqliteQueue {
    path: PathBuf,
    /// The database file's identity when opened (device, inode), to notice it vanishing.
    identity: (u64, u64),
    conn: Arc<Mutex<Connection>>,
}

fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

const SCHEMA: &str = r#"
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
CREATE TABLE IF NOT EXISTS backfill_cancels (
    id           INTEGER PRIMARY KEY,
    requested_at INTEGER NOT NULL
);
"#;

/// Columns added after the first release, with their definitions; added to older databases at
/// open.
const ADDED_COLUMNS: [(&str, &str); 1] = [
    // Set when the same write arrives while the job runs: it runs again once it ends, so what it
    // copies is never older than the last push.
    ("rearm", "INTEGER NOT NULL DEFAULT 0"),
];

const JOB_COLUMNS: &str = "id, target, kind, repository, tag, digest, mount_from, origin, state, \
     attempts, created_at, updated_at, next_attempt_at, finished_at, detail, error_class, target_digest";

pub(super) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
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
    })
}

impl SqliteQueue {
    /// Opens (creating if needed) `jobs.db` in `dir`, and returns interrupted jobs to pending.
    pub(super) fn open(dir: &Path) -> Result<SqliteQueue, QueueError> {
        std::fs::create_dir_all(dir).map_err(|source| QueueError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("jobs.db");
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        for (column, definition) in ADDED_COLUMNS {
            let present: bool = conn
                .query_row(
                    "SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = ?1",
                    params![column],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            if !present {
                conn.execute_batch(&format!(
                    "ALTER TABLE jobs ADD COLUMN {column} {definition}"
                ))
                .map_err(sql)?;
            }
        }
        let identity = file_identity(&path).map_err(|source| QueueError::Dir {
            path: path.clone(),
            source,
        })?;
        Ok(SqliteQueue {
            path,
            identity,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Fails when the database file at the path is not the one regtee opened.
    fn check_file(&self) -> Result<(), QueueError> {
        let what = match file_identity(&self.path) {
            Ok(id) if id == self.identity => return Ok(()),
            Ok(_) => "replaced",
            Err(_) => "deleted",
        };
        Err(QueueError::FileGone {
            path: self.path.clone(),
            what,
        })
    }

    /// Proves the queue can take a job now: the file is the one opened, and a write transaction
    /// commits (a full disk or a damaged file fails it; a `SELECT` would not notice).
    pub(super) async fn health(&self) -> Result<(), QueueError> {
        self.check_file()?;
        let now = now_ms();
        self.with(move |c| {
            c.execute(
                "INSERT INTO health (id, checked_at) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                params![now],
            )
            .map(|_| ())
        })
        .await
    }

    /// Puts jobs a dead process left `running` back to `pending`, and marks its backfills
    /// interrupted. Call once the state lock is held.
    pub(super) async fn recover_interrupted(&self) -> Result<usize, QueueError> {
        let now = now_ms();
        self.with(move |c| {
            c.execute(
                "UPDATE backfills SET running = 0, interrupted = 1 WHERE running = 1",
                [],
            )?;
            c.execute(
                "UPDATE jobs SET state = 'pending', next_attempt_at = ?1, updated_at = ?1 \
                 WHERE state = 'running'",
                params![now],
            )
        })
        .await
    }

    /// Runs `f` on a blocking thread with the connection.
    pub(super) async fn with<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard).map_err(|source| QueueError::Sqlite { path, source })
        })
        .await?
    }

    /// Adds jobs in one transaction. A job identical to a pending one is merged into it; one
    /// identical to a running job marks it to run again when it ends; one identical to a
    /// finished job re-arms that job. Returns how many were armed.
    ///
    /// Once called, the jobs are committed even if the caller's future is dropped (a client
    /// hanging up mid-push): the work runs to completion on a blocking thread, workers included.
    pub(super) async fn enqueue(
        &self,
        jobs: Vec<NewJob>,
        wakers: Vec<Arc<Notify>>,
    ) -> Result<usize, QueueError> {
        self.check_file()?;
        let now = now_ms();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut armed = 0;
            {
                // A job running now may already have read what this write replaced: it runs
                // again when it ends.
                let mut rearm = tx.prepare_cached(
                    "UPDATE jobs SET rearm = 1 WHERE target = ?1 AND kind = ?2 AND repository = ?3 \
                     AND tag = ?4 AND digest = ?5 AND state = 'running'",
                )?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, origin, \
                                       state, created_at, updated_at, next_attempt_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?8, ?8) \
                     ON CONFLICT (target, kind, repository, tag, digest) DO UPDATE SET \
                         state = 'pending', attempts = 0, origin = excluded.origin, \
                         mount_from = excluded.mount_from, created_at = excluded.created_at, \
                         updated_at = excluded.updated_at, next_attempt_at = excluded.next_attempt_at, \
                         started_at = NULL, finished_at = NULL, detail = '', error_class = '', \
                         rearm = 0 \
                     WHERE jobs.state NOT IN ('pending', 'running')",
                )?;
                for job in &jobs {
                    armed += rearm.execute(params![
                        job.target,
                        job.kind.as_str(),
                        job.repository.as_str(),
                        job.tag.as_ref().map_or("", Tag::as_str),
                        job.digest.as_ref().map_or("", Digest::as_str),
                    ])?;
                    armed += insert.execute(params![
                        job.target,
                        job.kind.as_str(),
                        job.repository.as_str(),
                        job.tag.as_ref().map_or("", Tag::as_str),
                        job.digest.as_ref().map_or("", Digest::as_str),
                        job.mount_from.as_ref().map_or("", RepositoryName::as_str),
                        job.origin.as_str(),
                        now,
                    ])?;
                }
            }
            tx.commit()?;
            for waker in &wakers {
                super::wake_workers(waker);
            }
            Ok(armed)
        })
        .await
    }

    /// Takes the next due job of `target`, marking it running.
    pub(super) async fn claim(&self, target: &str) -> Result<Option<Job>, QueueError> {
        let target = target.to_string();
        let now = now_ms();
        self.with(move |c| {
            c.query_row(
                &format!(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
                         updated_at = ?2, started_at = ?2 \
                     WHERE id = (SELECT id FROM jobs WHERE target = ?1 AND state = 'pending' \
                                 AND next_attempt_at <= ?2 ORDER BY next_attempt_at, id LIMIT 1) \
                     RETURNING {JOB_COLUMNS}"
                ),
                params![target, now],
                job_from_row,
            )
            .optional()
        })
        .await
    }

    /// When the next pending job of `target` becomes due (ms), if any is pending.
    pub(super) async fn next_due(&self, target: &str) -> Result<Option<i64>, QueueError> {
        let target = target.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE target = ?1 AND state = 'pending'",
                params![target],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Records how an attempt ended.
    ///
    /// A job re-armed while it ran (the same write arrived again) goes back to pending at once.
    pub(super) async fn finish(&self, id: i64, outcome: Outcome) -> Result<(), QueueError> {
        let now = now_ms();
        let outcome = outcome.scrubbed();
        self.with(move |c| {
            let tx = c.transaction()?;
            let started: i64 = tx
                .query_row(
                    "SELECT COALESCE(started_at, updated_at) FROM jobs WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(now);
            let (result, detail) = match &outcome {
                Outcome::Done {
                    target_digest,
                    note,
                } => {
                    tx.execute(
                        "UPDATE jobs SET state = 'done', finished_at = ?2, updated_at = ?2, \
                         detail = ?3, error_class = '', target_digest = ?4 WHERE id = ?1",
                        params![id, now, note, target_digest.as_deref().unwrap_or("")],
                    )?;
                    (AttemptResult::Done, note.clone())
                }
                Outcome::Skipped { reason } => {
                    tx.execute(
                        "UPDATE jobs SET state = 'skipped', finished_at = ?2, updated_at = ?2, \
                         detail = ?3, error_class = '' WHERE id = ?1",
                        params![id, now, reason],
                    )?;
                    (AttemptResult::Skipped, reason.clone())
                }
                Outcome::Failed { reason, class } => {
                    tx.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = ?2, updated_at = ?2, \
                         detail = ?3, error_class = ?4 WHERE id = ?1",
                        params![id, now, reason, class.as_str()],
                    )?;
                    (AttemptResult::Failed, reason.clone())
                }
                Outcome::RetryAt { at, error, class } => {
                    tx.execute(
                        "UPDATE jobs SET state = 'pending', next_attempt_at = ?2, updated_at = ?3, \
                         detail = ?4, error_class = ?5 WHERE id = ?1",
                        params![id, at, now, error, class.as_str()],
                    )?;
                    (AttemptResult::Retry, error.clone())
                }
            };
            tx.execute(
                "INSERT INTO attempts (job_id, started_at, finished_at, result, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, started, now, result.as_str(), detail],
            )?;
            tx.execute(
                "UPDATE jobs SET state = 'pending', rearm = 0, attempts = 0, next_attempt_at = ?2, \
                     started_at = NULL, finished_at = NULL \
                 WHERE id = ?1 AND rearm = 1",
                params![id, now],
            )?;
            tx.commit()
        })
        .await
    }

    /// One job.
    pub(super) async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                job_from_row,
            )
            .optional()
        })
        .await
    }

    /// A job's attempts, oldest first.
    pub(super) async fn attempts(&self, id: i64) -> Result<Vec<Attempt>, QueueError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT started_at, finished_at, result, detail FROM attempts \
                 WHERE job_id = ?1 ORDER BY rowid",
            )?;
            stmt.query_map(params![id], |r| {
                Ok(Attempt {
                    started_at: r.get(0)?,
                    finished_at: r.get(1)?,
                    result: AttemptResult::parse(&r.get::<_, String>(2)?),
                    detail: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Jobs matching `filter`, newest first.
    pub(super) async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
        self.with(move |c| {
            let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(state) = filter.state {
                sql.push_str(" AND state = ?");
                args.push(state.as_str().to_string().into());
            }
            if let Some(target) = filter.target {
                sql.push_str(" AND target = ?");
                args.push(target.into());
            }
            if let Some(repository) = filter.repository {
                sql.push_str(" AND repository = ?");
                args.push(repository.into());
            }
            if let Some(project) = filter.project {
                sql.push_str(" AND substr(repository, 1, length(?) + 1) = ? || '/'");
                args.push(project.clone().into());
                args.push(project.into());
            }
            if let Some(before) = filter.before_id {
                sql.push_str(" AND id < ?");
                args.push(before.into());
            }
            sql.push_str(" ORDER BY id DESC LIMIT ?");
            args.push(i64::from(filter.limit.clamp(1, 1000)).into());
            let mut stmt = c.prepare(&sql)?;
            stmt.query_map(rusqlite::params_from_iter(args), job_from_row)?
                .collect()
        })
        .await
    }

    /// Re-arms one finished (failed or skipped) job. Returns whether it was re-armed.
    pub(super) async fn retry(&self, id: i64) -> Result<bool, QueueError> {
        let now = now_ms();
        let changed = self
            .with(move |c| {
                c.execute(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?2, \
                         updated_at = ?2, finished_at = NULL \
                     WHERE id = ?1 AND state IN ('failed', 'skipped', 'done')",
                    params![id, now],
                )
            })
            .await?;
        Ok(changed > 0)
    }

    /// Re-arms every failed job (of one target, if given). Returns how many.
    pub(super) async fn retry_failed(&self, target: Option<String>) -> Result<usize, QueueError> {
        let now = now_ms();
        let t = target;
        self.with(move |c| {
            c.execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?1, \
                         updated_at = ?1, finished_at = NULL \
                     WHERE state = 'failed' AND (?2 IS NULL OR target = ?2)",
                params![now, t],
            )
        })
        .await
    }

    /// Counts per target and state, with the oldest unfinished job's age. Every name in
    /// `configured` gets a row, so a target with no jobs yet still shows (and exports zeros).
    pub(super) async fn counts(
        &self,
        configured: &[String],
    ) -> Result<Vec<TargetCounts>, QueueError> {
        let configured = configured.to_vec();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT target, state, COUNT(*), \
                        MIN(CASE WHEN state IN ('pending', 'running') THEN created_at END) \
                 FROM jobs GROUP BY target, state ORDER BY target",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?.max(0) as u64,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(TargetCounts::tally(rows, &configured))
        })
        .await
    }

    /// Deletes done and skipped jobs that finished before `older_than` ago. Failed jobs stay
    /// until someone retries them: they are work nobody has done yet.
    pub(super) async fn purge(&self, older_than: Duration) -> Result<usize, QueueError> {
        let cutoff = now_ms() - older_than.as_millis() as i64;
        self.with(move |c| {
            c.execute("DELETE FROM blob_homes WHERE seen_at < ?1", params![cutoff])?;
            c.execute(
                "DELETE FROM backfills WHERE running = 0 AND updated_at < ?1",
                params![cutoff],
            )?;
            c.execute(
                "DELETE FROM backfill_cancels WHERE id NOT IN (SELECT id FROM backfills WHERE running = 1)",
                [],
            )?;
            c.execute(
                "DELETE FROM jobs WHERE state IN ('done', 'skipped') AND finished_at < ?1",
                params![cutoff],
            )
        })
        .await
    }

    pub(super) async fn remember_blob_home(
        &self,
        target: String,
        digest: String,
        repository: String,
    ) -> Result<(), QueueError> {
        let now = now_ms();
        self.with(move |c| {
            c.execute(
                "INSERT INTO blob_homes (target, digest, repository, seen_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (target, digest, repository) DO UPDATE SET seen_at = excluded.seen_at",
                params![target, digest, repository, now],
            )
            .map(|_| ())
        })
        .await
    }

    pub(super) async fn record_backfill(&self, progress: String) -> Result<i64, QueueError> {
        let now = now_ms();
        self.with(move |c| {
            c.execute(
                "INSERT INTO backfills (running, progress, updated_at) VALUES (1, ?1, ?2)",
                params![progress, now],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    pub(super) async fn save_backfill(
        &self,
        id: i64,
        progress: String,
        running: bool,
    ) -> Result<(), QueueError> {
        let now = now_ms();
        self.with(move |c| {
            c.execute(
                "UPDATE backfills SET progress = ?2, running = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, progress, running, now],
            )
            .map(|_| ())
        })
        .await
    }

    /// Asks the running backfill `id` to stop; whether it is running.
    pub(super) async fn request_backfill_cancel(&self, id: i64) -> Result<bool, QueueError> {
        let now = now_ms();
        self.with(move |c| {
            c.execute(
                "INSERT INTO backfill_cancels (id, requested_at)                  SELECT id, ?2 FROM backfills WHERE id = ?1 AND running = 1                  ON CONFLICT (id) DO NOTHING",
                params![id, now],
            )?;
            c.query_row(
                "SELECT COUNT(*) > 0 FROM backfills WHERE id = ?1 AND running = 1",
                params![id],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Whether someone asked backfill `id` to stop.
    pub(super) async fn backfill_cancel_requested(&self, id: i64) -> Result<bool, QueueError> {
        self.with(move |c| {
            c.query_row(
                "SELECT COUNT(*) > 0 FROM backfill_cancels WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
        })
        .await
    }

    /// The newest backfills, or the one with `id`.
    pub(super) async fn backfills(
        &self,
        id: Option<i64>,
    ) -> Result<Vec<super::BackfillRecord>, QueueError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, progress, interrupted FROM backfills \
                 WHERE ?1 IS NULL OR id = ?1 ORDER BY id DESC LIMIT 100",
            )?;
            stmt.query_map(params![id], |r| {
                Ok(super::BackfillRecord {
                    id: r.get(0)?,
                    progress: r.get(1)?,
                    interrupted: r.get(2)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub(super) async fn blob_homes(
        &self,
        target: String,
        digest: String,
    ) -> Result<Vec<String>, QueueError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT repository FROM blob_homes WHERE target = ?1 AND digest = ?2 \
                 ORDER BY seen_at DESC LIMIT ?3",
            )?;
            stmt.query_map(params![target, digest, super::BLOB_HOMES_KEPT], |r| {
                r.get(0)
            })?
            .collect()
        })
        .await
    }

    /// Every job (with when its attempt began) and every attempt (with its job's id), for a
    /// migration to another database.
    pub(super) async fn export(&self) -> Result<super::Exported, QueueError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {JOB_COLUMNS}, started_at FROM jobs ORDER BY id"
            ))?;
            let jobs = stmt
                .query_map([], |r| Ok((job_from_row(r)?, r.get::<_, Option<i64>>(17)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = c.prepare(
                "SELECT job_id, started_at, finished_at, result, detail FROM attempts ORDER BY rowid",
            )?;
            let attempts = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        Attempt {
                            started_at: r.get(1)?,
                            finished_at: r.get(2)?,
                            result: AttemptResult::parse(&r.get::<_, String>(3)?),
                            detail: r.get(4)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt =
                c.prepare("SELECT target, digest, repository, seen_at FROM blob_homes")?;
            let blob_homes = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(super::Exported {
                jobs,
                attempts,
                blob_homes,
            })
        })
        .await
    }
}
