//! The queue in one SQLite file under the state directory: the embedded default for a single
//! instance. WAL with `synchronous=FULL`, so a job is on disk before the client's 201. One
//! process owns the file (the state directory's lock), so it is also the one-process
//! [`Coordination`]: nothing to lease, nobody to take turns with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::job::{
    Attempt, AttemptResult, ErrorClass, Job, JobFilter, JobState, NewJob, Outcome, Replica,
    StateCount,
};
use super::lifecycle::{self, Arrival, CLAIM_ORDER, Standing};
use super::store::{BlobHome, Coordination, Exported, Imported, Store, Turn};
use super::{BackfillRecord, QueueError};
use rows::{
    ADDED_COLUMNS, JOB_COLUMNS, SCHEMA, STANDING_COLUMNS, insert_attempt, job_from_row,
    placeholders, standing_from_row, state_values, write_standing,
};

mod rows;

/// The queue in a SQLite file, behind a mutex, used from blocking threads.
pub(super) struct SqliteStore {
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

impl SqliteStore {
    /// Opens (creating if needed) `jobs.db` in `dir`.
    pub(super) fn open(dir: &Path) -> Result<SqliteStore, QueueError> {
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
        Ok(SqliteStore {
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

    /// Runs `f` on a blocking thread with the connection. Once started it runs to its end,
    /// even if the caller's future is dropped.
    async fn with<T, F>(&self, f: F) -> Result<T, QueueError>
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
}

/// The same write arriving again, or a new one: read the job it names, let the lifecycle
/// decide, write what it decided.
fn arrive(tx: &Transaction<'_>, job: &NewJob, now: i64) -> rusqlite::Result<bool> {
    let identity = params![
        job.target,
        job.kind.as_str(),
        job.repository.as_str(),
        job.tag.as_ref().map_or("", |t| t.as_str()),
        job.digest.as_ref().map_or("", |d| d.as_str()),
    ];
    let existing = tx
        .prepare_cached(&format!(
            "SELECT id, {STANDING_COLUMNS} FROM jobs WHERE target = ?1 AND kind = ?2 \
             AND repository = ?3 AND tag = ?4 AND digest = ?5"
        ))?
        .query_row(identity, |r| {
            Ok((r.get::<_, i64>(0)?, standing_from_row(r, 1)?))
        })
        .optional()?;
    let mount_from = job.mount_from.as_ref().map_or("", |m| m.as_str());
    let Some((id, standing)) = existing else {
        let fresh = Standing::new(now);
        tx.prepare_cached(
            "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, origin, \
                               state, created_at, updated_at, next_attempt_at, source) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9, ?10)",
        )?
        .execute(params![
            job.target,
            job.kind.as_str(),
            job.repository.as_str(),
            job.tag.as_ref().map_or("", |t| t.as_str()),
            job.digest.as_ref().map_or("", |d| d.as_str()),
            mount_from,
            job.origin.as_str(),
            fresh.state.as_str(),
            now,
            job.source.as_deref().unwrap_or(""),
        ])?;
        return Ok(true);
    };
    let arrival = standing.arrival(now);
    match &arrival {
        Arrival::Merged => {}
        Arrival::RunAgain(next) => write_standing(tx, id, next)?,
        Arrival::Rearmed(next) => {
            write_standing(tx, id, next)?;
            tx.prepare_cached(
                "UPDATE jobs SET origin = ?2, mount_from = ?3, created_at = ?4, source = ?5 \
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                job.origin.as_str(),
                mount_from,
                now,
                job.source.as_deref().unwrap_or("")
            ])?;
        }
    }
    Ok(arrival.arms())
}

#[async_trait]
impl Store for SqliteStore {
    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn deadline(&self) -> Option<Duration> {
        None
    }

    /// The file is the one opened, and a write transaction commits (a full disk or a damaged
    /// file fails it; a `SELECT` would not notice).
    async fn health(&self, now: i64) -> Result<(), QueueError> {
        self.check_file()?;
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

    async fn enqueue(&self, jobs: Vec<NewJob>, now: i64) -> Result<usize, QueueError> {
        self.check_file()?;
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut armed = 0;
            for job in &jobs {
                armed += usize::from(arrive(&tx, job, now)?);
            }
            tx.commit()?;
            Ok(armed)
        })
        .await
    }

    async fn claim(&self, target: &str, now: i64) -> Result<Option<Job>, QueueError> {
        let target = target.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            let due = tx
                .prepare_cached(&format!(
                    "SELECT id, {STANDING_COLUMNS} FROM jobs WHERE target = ?1 AND state = ?2 \
                     AND next_attempt_at <= ?3 ORDER BY {CLAIM_ORDER} LIMIT 1"
                ))?
                .query_row(params![target, JobState::Pending.as_str(), now], |r| {
                    Ok((r.get::<_, i64>(0)?, standing_from_row(r, 1)?))
                })
                .optional()?;
            let Some((id, standing)) = due else {
                return Ok(None);
            };
            write_standing(&tx, id, &standing.claimed(now))?;
            let job = tx
                .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
                .query_row(params![id], job_from_row)?;
            tx.commit()?;
            Ok(Some(job))
        })
        .await
    }

    async fn next_due(&self, target: &str) -> Result<Option<i64>, QueueError> {
        let target = target.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE target = ?1 AND state = ?2",
                params![target, JobState::Pending.as_str()],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn finish(&self, id: i64, outcome: Outcome, now: i64) -> Result<(), QueueError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let standing = tx
                .prepare_cached(&format!(
                    "SELECT {STANDING_COLUMNS} FROM jobs WHERE id = ?1"
                ))?
                .query_row(params![id], |r| standing_from_row(r, 0))
                .optional()?;
            let Some(standing) = standing else {
                return Ok(());
            };
            let (next, attempt) = standing.finished(&outcome, now);
            write_standing(&tx, id, &next)?;
            insert_attempt(&tx, id, &attempt)?;
            tx.commit()
        })
        .await
    }

    async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
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

    async fn attempts(&self, id: i64) -> Result<Vec<Attempt>, QueueError> {
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

    async fn list(&self, filter: JobFilter) -> Result<Vec<Job>, QueueError> {
        self.with(move |c| {
            let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
            let mut args: Vec<Value> = Vec::new();
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

    async fn retry(&self, id: i64, now: i64) -> Result<bool, QueueError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let standing = tx
                .prepare_cached(&format!(
                    "SELECT {STANDING_COLUMNS} FROM jobs WHERE id = ?1"
                ))?
                .query_row(params![id], |r| standing_from_row(r, 0))
                .optional()?;
            let Some(next) = standing.and_then(|s| s.retried(now)) else {
                return Ok(false);
            };
            write_standing(&tx, id, &next)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn retry_failed(&self, target: Option<String>, now: i64) -> Result<usize, QueueError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let failed: Vec<(i64, Standing)> = tx
                .prepare_cached(&format!(
                    "SELECT id, {STANDING_COLUMNS} FROM jobs \
                     WHERE state = ?1 AND (?2 IS NULL OR target = ?2)"
                ))?
                .query_map(params![JobState::Failed.as_str(), target], |r| {
                    Ok((r.get(0)?, standing_from_row(r, 1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut retried = 0;
            for (id, standing) in failed {
                if let Some(next) = standing.retried(now) {
                    write_standing(&tx, id, &next)?;
                    retried += 1;
                }
            }
            tx.commit()?;
            Ok(retried)
        })
        .await
    }

    async fn counts(&self) -> Result<Vec<StateCount>, QueueError> {
        self.with(move |c| {
            let unfinished = placeholders(1, lifecycle::UNFINISHED.len());
            let mut stmt = c.prepare_cached(&format!(
                "SELECT target, state, COUNT(*), \
                        MIN(CASE WHEN state IN ({unfinished}) THEN created_at END) \
                 FROM jobs GROUP BY target, state ORDER BY target"
            ))?;
            let rows = stmt.query_map(
                rusqlite::params_from_iter(state_values(&lifecycle::UNFINISHED)),
                |r| {
                    Ok(StateCount {
                        target: r.get(0)?,
                        state: JobState::parse(&r.get::<_, String>(1)?).unwrap_or(JobState::Failed),
                        jobs: r.get::<_, i64>(2)?.max(0) as u64,
                        oldest_unfinished_at: r.get(3)?,
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }

    async fn purge(&self, cutoff: i64) -> Result<usize, QueueError> {
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
            let forgettable = placeholders(2, lifecycle::FORGETTABLE.len());
            let args = std::iter::once(Value::from(cutoff))
                .chain(state_values(&lifecycle::FORGETTABLE));
            c.execute(
                &format!("DELETE FROM jobs WHERE finished_at < ?1 AND state IN ({forgettable})"),
                rusqlite::params_from_iter(args),
            )
        })
        .await
    }

    async fn remember_blob_home(&self, home: BlobHome) -> Result<(), QueueError> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO blob_homes (target, digest, repository, seen_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (target, digest, repository) DO UPDATE SET seen_at = excluded.seen_at",
                params![home.target, home.digest, home.repository, home.seen_at],
            )
            .map(|_| ())
        })
        .await
    }

    async fn blob_homes(
        &self,
        target: &str,
        digest: &str,
        limit: i64,
    ) -> Result<Vec<String>, QueueError> {
        let (target, digest) = (target.to_string(), digest.to_string());
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT repository FROM blob_homes WHERE target = ?1 AND digest = ?2 \
                 ORDER BY seen_at DESC LIMIT ?3",
            )?;
            stmt.query_map(params![target, digest, limit], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn record_backfill(&self, progress: String, now: i64) -> Result<i64, QueueError> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO backfills (running, progress, updated_at) VALUES (1, ?1, ?2)",
                params![progress, now],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn save_backfill(
        &self,
        id: i64,
        progress: String,
        running: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        self.with(move |c| {
            c.execute(
                "UPDATE backfills SET progress = ?2, running = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, progress, running, now],
            )
            .map(|_| ())
        })
        .await
    }

    async fn backfills(&self, id: Option<i64>) -> Result<Vec<BackfillRecord>, QueueError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, progress, interrupted FROM backfills \
                 WHERE ?1 IS NULL OR id = ?1 ORDER BY id DESC LIMIT 100",
            )?;
            stmt.query_map(params![id], |r| {
                Ok(BackfillRecord {
                    id: r.get(0)?,
                    progress: r.get(1)?,
                    interrupted: r.get(2)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn request_backfill_cancel(&self, id: i64, now: i64) -> Result<bool, QueueError> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO backfill_cancels (id, requested_at) \
                 SELECT id, ?2 FROM backfills WHERE id = ?1 AND running = 1 \
                 ON CONFLICT (id) DO NOTHING",
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

    async fn backfill_cancel_requested(&self, id: i64) -> Result<bool, QueueError> {
        self.with(move |c| {
            c.query_row(
                "SELECT COUNT(*) > 0 FROM backfill_cancels WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, QueueError> {
        let name = name.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn put_setting(&self, name: &str, value: &str, now: i64) -> Result<(), QueueError> {
        let (name, value) = (name.to_string(), value.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO settings (name, value, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, \
                 updated_at = excluded.updated_at",
                params![name, value, now],
            )
            .map(|_| ())
        })
        .await
    }

    async fn export(&self) -> Result<Exported, QueueError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {JOB_COLUMNS}, started_at FROM jobs ORDER BY id"
            ))?;
            let jobs = stmt
                .query_map([], |r| Ok((job_from_row(r)?, r.get::<_, Option<i64>>(18)?)))?
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
                .query_map([], |r| {
                    Ok(BlobHome {
                        target: r.get(0)?,
                        digest: r.get(1)?,
                        repository: r.get(2)?,
                        seen_at: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Exported {
                jobs,
                attempts,
                blob_homes,
            })
        })
        .await
    }

    async fn import(&self, from: Exported) -> Result<Imported, QueueError> {
        self.check_file()?;
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut imported = Imported::default();
            let mut new_ids = std::collections::HashMap::new();
            for (job, started_at) in &from.jobs {
                let state = match job.state {
                    JobState::Running => JobState::Pending,
                    other => other,
                };
                let added = tx
                    .prepare_cached(
                        "INSERT INTO jobs (target, kind, repository, tag, digest, mount_from, \
                             origin, state, attempts, created_at, updated_at, next_attempt_at, \
                             started_at, finished_at, detail, error_class, target_digest, source) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, \
                             ?15, ?16, ?17, ?18) \
                         ON CONFLICT (target, kind, repository, tag, digest) DO NOTHING",
                    )?
                    .execute(params![
                        job.target,
                        job.kind.as_str(),
                        job.repository,
                        job.tag.as_deref().unwrap_or(""),
                        job.digest.as_deref().unwrap_or(""),
                        job.mount_from.as_deref().unwrap_or(""),
                        job.origin.as_str(),
                        state.as_str(),
                        job.attempts,
                        job.created_at,
                        job.updated_at,
                        job.next_attempt_at,
                        started_at,
                        job.finished_at,
                        job.detail,
                        job.error_class.map_or("", ErrorClass::as_str),
                        job.target_digest.as_deref().unwrap_or(""),
                        job.source.as_deref().unwrap_or(""),
                    ])?;
                if added > 0 {
                    new_ids.insert(job.id, tx.last_insert_rowid());
                }
            }
            imported.jobs = new_ids.len();
            for (job_id, a) in &from.attempts {
                if let Some(id) = new_ids.get(job_id) {
                    insert_attempt(&tx, *id, a)?;
                    imported.attempts += 1;
                }
            }
            for home in &from.blob_homes {
                imported.blob_homes += tx
                    .prepare_cached(
                        "INSERT INTO blob_homes (target, digest, repository, seen_at) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![
                        home.target,
                        home.digest,
                        home.repository,
                        home.seen_at
                    ])?;
            }
            tx.commit()?;
            Ok(imported)
        })
        .await
    }
}

#[async_trait]
impl Coordination for SqliteStore {
    fn replica(&self) -> Option<&str> {
        None
    }

    fn tend_every(&self) -> Option<Duration> {
        None
    }

    /// Every running job was the dead process's (the state directory's lock says there is one
    /// process), and so was every running backfill.
    async fn recover(&self, now: i64) -> Result<Vec<String>, QueueError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE backfills SET running = 0, interrupted = 1 WHERE running = 1",
                [],
            )?;
            let running: Vec<(i64, String, Standing)> = tx
                .prepare_cached(&format!(
                    "SELECT id, target, {STANDING_COLUMNS} FROM jobs WHERE state = ?1"
                ))?
                .query_map(params![JobState::Running.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, standing_from_row(r, 2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut targets = Vec::new();
            for (id, target, standing) in running {
                if let Some(next) = standing.interrupted(now) {
                    write_standing(&tx, id, &next)?;
                    targets.push(target);
                }
            }
            tx.commit()?;
            Ok(targets)
        })
        .await
    }

    async fn tend(&self, _now: i64) -> Result<Vec<String>, QueueError> {
        Ok(Vec::new())
    }

    async fn replicas(&self, _now: i64) -> Result<Vec<Replica>, QueueError> {
        Ok(Vec::new())
    }

    async fn take_turn(&self, _name: &str) -> Result<Option<Turn>, QueueError> {
        Ok(Some(Turn::uncontended()))
    }
}
