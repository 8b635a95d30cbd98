//! The commands people type: status, jobs, retry, sync, diff, check.
//!
//! When a regtee server holds the state directory, commands go through its admin API (the
//! only safe way to touch a live queue); when none runs, they open the state directory
//! themselves. Output is a table for people, or JSON with `--json`.

mod api;
mod check;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde::Serialize;

use crate::config::Config;
use crate::mirror::target::Target;
use crate::mirror::tee::Tee;
use crate::oci::digest::Digest;
use crate::ops::admin::{BackfillBody, JobPage, PrimaryBody, PrimaryRefused, Status};
use crate::ops::backfill::{
    self, BackfillRequest, BackfillState, Backfiller, Progress, ProjectEvent, TagRow, TagStatus,
};
use crate::ops::cutover::{Cutover, Switched};
use crate::queue::{Job, JobFilter, JobOrigin, PrimaryRecord, Queue, now_ms};
use crate::registry::RegistryClient;
use api::{AdminClient, Backend, backend};

pub use api::CliError;
pub use check::check;

fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("API types serialize")
    );
}

/// A duration like `3m 12s` for people.
pub(crate) fn human_age(ms: i64) -> String {
    let secs = (ms / 1000).max(0) as u64;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d {}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

fn short_digest(d: Option<&str>) -> String {
    match d {
        Some(d) => {
            let (alg, hex) = d.split_once(':').unwrap_or(("", d));
            format!("{alg}:{}", &hex[..hex.len().min(12)])
        }
        None => "-".to_string(),
    }
}

fn job_subject(job: &Job) -> String {
    match (&job.tag, &job.digest) {
        (Some(t), _) => format!("{}:{t}", job.repository),
        (None, Some(d)) => format!("{}@{}", job.repository, short_digest(Some(d))),
        (None, None) => job.repository.clone(),
    }
}

/// `regtee health`: whether the server this config describes answers its liveness probe
/// (`/healthz` on the admin listener); 0 when it does, 1 when not. For container health checks,
/// where no curl is at hand.
pub async fn health(config: &Config) -> Result<i32, CliError> {
    let admin = config
        .admin
        .as_ref()
        .ok_or_else(|| CliError::NoAdmin(config.state.dir.clone()))?;
    let status = AdminClient::new(admin)?.probe("/healthz").await?;
    println!("healthz: {status}");
    Ok(if status == http::StatusCode::OK { 0 } else { 1 })
}

/// `regtee cutover`: shows the primary (`to` absent), or switches it to `to` (`upstream` or a
/// target) unless the gate refuses (exit 1, with what stands in the way); `force` switches
/// anyway. Through the running server's admin API, or the queue itself when none runs.
pub async fn cutover(config: &Config, to: Option<String>, force: bool) -> Result<i32, CliError> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "someone".into());
    let by = format!("{user} (regtee cutover)");
    let outcome = match (backend(config).await?, to) {
        (Backend::Api(api), None) => {
            Switched::Done(api.call(Method::GET, "/api/v1/primary", None).await?)
        }
        (Backend::Local(queue), None) => Switched::Done(queue.primary().await?),
        (Backend::Api(api), Some(to)) => {
            let body = serde_json::to_vec(&PrimaryBody {
                primary: to,
                force,
                by: Some(by),
            })
            .unwrap_or_default();
            let (status, bytes) = api
                .call_raw(Method::PUT, "/api/v1/primary", Some(body))
                .await?;
            match status {
                http::StatusCode::OK => Switched::Done(
                    serde_json::from_slice(&bytes).map_err(|e| CliError::AdminAnswer(e.into()))?,
                ),
                http::StatusCode::CONFLICT => {
                    let refused: PrimaryRefused = serde_json::from_slice(&bytes)
                        .map_err(|e| CliError::AdminAnswer(e.into()))?;
                    Switched::Refused(refused.blocking)
                }
                status => return Err(api::refusal(status, &bytes)),
            }
        }
        (Backend::Local(queue), Some(to)) => {
            let upstream = RegistryClient::new(&config.upstream.endpoint)?;
            let targets = Target::all(&config.targets)?;
            Cutover {
                queue: &queue,
                upstream: &upstream,
                targets: &targets,
                checks_tokens: config.upstream.token_trust.is_some(),
            }
            .switch(&to, force, &by)
            .await
            .map_err(CliError::Refused)?
        }
    };
    match outcome {
        Switched::Done(record) => {
            println!("{}", describe_primary(&record));
            Ok(0)
        }
        Switched::Refused(blocking) => {
            println!(
                "refused: the switch would serve clients from a registry that is not in step yet:"
            );
            for line in &blocking {
                println!("  {line}");
            }
            println!(
                "wait for the mirror (regtee status, regtee diff), or switch anyway with --force"
            );
            Ok(1)
        }
    }
}

/// `primary: tcr since 2026-12-07T14:00:00Z, switched by ...`.
fn describe_primary(record: &PrimaryRecord) -> String {
    let since = match record.since {
        0 => "from the start".to_string(),
        ms => format!(
            "since {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
            )
        ),
    };
    let by = match record.by.as_str() {
        "" => String::new(),
        by => format!(
            ", switched by {by}{}",
            if record.forced { " with --force" } else { "" }
        ),
    };
    format!("primary: {} {since}{by}", record.primary.name())
}

/// `regtee status`.
pub async fn status(config: &Config, as_json: bool) -> Result<i32, CliError> {
    let status = match backend(config).await? {
        Backend::Api(api) => {
            api.call::<Status>(Method::GET, "/api/v1/status", None)
                .await?
        }
        Backend::Local(queue) => {
            let names: Vec<String> = config
                .targets
                .iter()
                .map(|t| t.endpoint.name.clone())
                .collect();
            Status::gather(&queue, &names, None).await?
        }
    };
    if as_json {
        print_json(&status);
        return Ok(0);
    }
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8}  OLDEST UNFINISHED",
        "TARGET", "PENDING", "RUNNING", "DONE", "SKIPPED", "FAILED"
    );
    for c in &status.targets {
        println!(
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8}  {}",
            c.target,
            c.pending,
            c.running,
            c.done,
            c.skipped,
            c.failed,
            c.oldest_pending_at
                .map(|t| human_age(status.now - t))
                .unwrap_or_else(|| "-".into())
        );
    }
    if !status.replicas.is_empty() {
        println!(
            "\n{:<40} {:<10} {:>8}  LAST HEARTBEAT",
            "REPLICA", "VERSION", "RUNNING"
        );
        for r in &status.replicas {
            println!(
                "{:<40} {:<10} {:>8}  {} ago",
                r.id,
                r.version,
                r.jobs_in_hand,
                human_age(status.now - r.heartbeat_at)
            );
        }
    }
    if status.primary != PrimaryRecord::default() {
        println!("\n{}", describe_primary(&status.primary));
    }
    if let Some(cache) = &status.cache {
        println!(
            "\ncache: {} in {} entries (max {}), {} hits, {} misses, hit ratio {:.2}",
            bytesize::ByteSize(cache.size_bytes),
            cache.entries,
            if cache.max_size_bytes == 0 {
                "none".to_string()
            } else {
                bytesize::ByteSize(cache.max_size_bytes).to_string()
            },
            cache.hits,
            cache.misses,
            cache.hit_ratio
        );
    }
    if !status.recent_failures.is_empty() {
        println!("\nrecent failures (retry with `regtee retry --failed` once fixed):");
        for j in &status.recent_failures {
            println!(
                "  #{:<6} {:<10} {:<8} {}: {}",
                j.id,
                j.target,
                j.kind.as_str(),
                job_subject(j),
                j.detail
            );
        }
    }
    Ok(0)
}

/// `regtee jobs`.
pub async fn jobs(config: &Config, filter: JobFilter, as_json: bool) -> Result<i32, CliError> {
    let page = match backend(config).await? {
        Backend::Api(api) => {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if let Some(s) = filter.state {
                q.append_pair("state", s.as_str());
            }
            if let Some(t) = &filter.target {
                q.append_pair("target", t);
            }
            if let Some(r) = &filter.repository {
                q.append_pair("repository", r);
            }
            if let Some(p) = &filter.project {
                q.append_pair("project", p);
            }
            if let Some(b) = filter.before_id {
                q.append_pair("before", &b.to_string());
            }
            q.append_pair("limit", &filter.limit.to_string());
            api.call::<JobPage>(Method::GET, &format!("/api/v1/jobs?{}", q.finish()), None)
                .await?
        }
        Backend::Local(queue) => JobPage::fetch(&queue, filter).await?,
    };
    if as_json {
        print_json(&page);
        return Ok(0);
    }
    println!(
        "{:<7} {:<8} {:<12} {:<8} {:<44} {:>4} {:>8}  DETAIL",
        "ID", "STATE", "TARGET", "KIND", "WHAT", "TRY", "AGE"
    );
    let now = now_ms();
    for j in &page.jobs {
        println!(
            "{:<7} {:<8} {:<12} {:<8} {:<44} {:>4} {:>8}  {}",
            j.id,
            j.state.as_str(),
            j.target,
            j.kind.as_str(),
            job_subject(j),
            j.attempts,
            human_age(now - j.created_at),
            j.detail
        );
    }
    if let Some(next) = page.next_before {
        println!("(more: add --before {next})");
    }
    Ok(0)
}

/// `regtee retry ID` or `regtee retry --failed`.
pub async fn retry(
    config: &Config,
    id: Option<i64>,
    target: Option<String>,
) -> Result<i32, CliError> {
    let retried: u64 = match (backend(config).await?, id) {
        (Backend::Api(api), Some(id)) => {
            let v: serde_json::Value = api
                .call(Method::POST, &format!("/api/v1/jobs/{id}/retry"), None)
                .await?;
            v["retried"].as_u64().unwrap_or(0)
        }
        (Backend::Api(api), None) => {
            let path = match &target {
                Some(t) => format!(
                    "/api/v1/jobs/retry?state=failed&target={}",
                    url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
                ),
                None => "/api/v1/jobs/retry?state=failed".into(),
            };
            let v: serde_json::Value = api.call(Method::POST, &path, None).await?;
            v["retried"].as_u64().unwrap_or(0)
        }
        (Backend::Local(queue), Some(id)) => {
            if !queue.retry(id).await? {
                return Err(CliError::Refused(format!(
                    "job {id} does not exist or is still pending or running"
                )));
            }
            1
        }
        (Backend::Local(queue), None) => queue.retry_failed(target).await? as u64,
    };
    println!("{retried} job(s) queued again");
    Ok(0)
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} tags  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn show_progress(bar: &indicatif::ProgressBar, p: &Progress) {
    bar.set_length(p.tags as u64);
    bar.set_position(p.tags_compared as u64);
    bar.set_message(format!(
        "repos {}/{}  in sync {}  queued {}  skipped {}  failed {}",
        p.repositories_done, p.repositories, p.in_sync, p.queued, p.skipped, p.failed
    ));
}

fn summarize(p: &Progress, local: bool) -> i32 {
    println!(
        "{} {}: {} repositories, {} tags: {} in sync, {} {}, {} skipped (overwrite = false), {} failed",
        if p.dry_run { "dry run of" } else { "sync of" },
        p.project,
        p.repositories,
        p.tags,
        p.in_sync,
        p.queued,
        if p.dry_run {
            "would be queued"
        } else {
            "queued"
        },
        p.skipped,
        p.failed
    );
    for c in &p.would_create {
        println!("  would create {c} (create_missing)");
    }
    for e in &p.errors {
        println!("  error: {e}");
    }
    if local && !p.dry_run && p.queued > 0 {
        println!("no regtee server is running: the jobs are copied when `regtee serve` starts");
    }
    i32::from(p.state != BackfillState::Finished || p.failed > 0)
}

/// `regtee sync PROJECT`.
pub async fn sync(
    config: &Config,
    project: &str,
    target: Option<String>,
    dry_run: bool,
) -> Result<i32, CliError> {
    crate::oci::names::project(project)?;
    if let Some(t) = &target
        && !config.targets.iter().any(|x| &x.endpoint.name == t)
    {
        return Err(CliError::Refused(format!(
            "no target named {t} in the config"
        )));
    }
    let bar = progress_bar();
    let result = match backend(config).await? {
        Backend::Api(api) => {
            let body = serde_json::to_vec(&BackfillBody {
                project: project.to_string(),
                target,
                dry_run,
            })
            .expect("serializable");
            let started: Progress = api
                .call(Method::POST, "/api/v1/backfills", Some(body))
                .await?;
            println!(
                "backfill {} started on the server (`regtee sync --cancel {}` stops it)",
                started.id, started.id
            );
            // The server answers once the backfill ends, or after a second with its progress.
            loop {
                let p: Progress = api
                    .call(
                        Method::GET,
                        &format!("/api/v1/backfills/{}?wait=1", started.id),
                        None,
                    )
                    .await?;
                show_progress(&bar, &p);
                if p.state != BackfillState::Running {
                    bar.finish_and_clear();
                    break summarize(&p, false);
                }
            }
        }
        Backend::Local(queue) => {
            let backfiller = local_backfiller(config, queue)?;
            let request = BackfillRequest {
                project: project.to_string(),
                target,
                dry_run,
                origin: JobOrigin::Backfill,
            };
            let progress = Mutex::new(Progress::started(0, &request));
            let run = backfiller.run(&request, &progress);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    () = &mut run => break,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        show_progress(&bar, &progress.lock().unwrap_or_else(|p| p.into_inner()));
                    }
                }
            }
            bar.finish_and_clear();
            let p = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
            summarize(&p, true)
        }
    };
    Ok(result)
}

/// `regtee sync --cancel ID`: stops a running backfill, through the admin API, or, with a
/// PostgreSQL queue, by writing the request in the database the replicas read.
pub async fn cancel_backfill(config: &Config, id: u64) -> Result<i32, CliError> {
    let running = match backend(config).await? {
        Backend::Api(api) => {
            let v: serde_json::Value = api
                .call(
                    Method::POST,
                    &format!("/api/v1/backfills/{id}/cancel"),
                    None,
                )
                .await?;
            v["cancelled"].as_bool().unwrap_or(false)
        }
        Backend::Local(queue) => match i64::try_from(id) {
            Ok(row) => queue.request_backfill_cancel(row).await?,
            Err(_) => false,
        },
    };
    if !running {
        return Err(CliError::Refused(format!(
            "backfill {id} is not running (regtee sync shows its result; GET /api/v1/backfills lists them)"
        )));
    }
    println!(
        "backfill {id} stops within a second; the jobs it queued stay queued (regtee status shows them)"
    );
    Ok(0)
}

/// A backfill run by the command itself, into the state directory (no server holds it).
fn local_backfiller(config: &Config, queue: Arc<Queue>) -> Result<Backfiller, CliError> {
    Ok(Backfiller {
        upstream: Arc::new(RegistryClient::new(&config.upstream.endpoint)?),
        targets: Target::all(&config.targets)?,
        tee: Arc::new(Tee::new(queue, &config.targets)),
    })
}

/// `regtee state migrate --to URL`: copies the SQLite queue under `[state] dir` (every job in
/// every state, with its attempts) into PostgreSQL. Refuses while a regtee serves on that
/// directory, and holds its lock meanwhile so none starts; running it again adds nothing.
pub async fn migrate_state(config: &Config, to: &str) -> Result<i32, CliError> {
    let dir = &config.state.dir;
    let _lock = crate::queue::state_lock::StateLock::acquire(dir).map_err(|_| {
        CliError::Refused(format!(
            "a regtee is serving on {}: stop it first, so no push lands in SQLite after the copy",
            dir.display()
        ))
    })?;
    let database = crate::config::DatabaseConfig::from_url(to, &|k| std::env::var(k).ok())
        .map_err(|e| CliError::Refused(e.to_string()))?;
    let from = Queue::open(dir)?;
    let into = Queue::open_state(&crate::config::StateConfig {
        dir: dir.clone(),
        retention: config.state.retention,
        database: Some(database.clone()),
    })
    .await?;
    let m = from.migrate_into(&into).await?;
    println!(
        "{} jobs in {}: {} copied into {} with {} attempts, {} already there; {} mount sources added",
        m.jobs,
        dir.join("jobs.db").display(),
        m.added,
        database.shown,
        m.attempts,
        m.jobs - m.added,
        m.mount_sources
    );
    println!(
        "next: set [state] database = \"{to}\" (password in database_password_env or _file) and start the replicas"
    );
    Ok(0)
}

/// `regtee diff [PROJECT...]`: exit 0 when every mirrored tag matches, 1 when any differs,
/// 2 when something could not be compared.
pub async fn diff(config: &Config, projects: Vec<String>, as_json: bool) -> Result<i32, CliError> {
    for project in &projects {
        crate::oci::names::project(project)?;
    }
    let upstream = RegistryClient::new(&config.upstream.endpoint)?;
    let targets = Target::all(&config.targets)?;
    let projects = if projects.is_empty() {
        backfill::all_projects(&upstream).await.map_err(|e| {
            CliError::Refused(format!(
                "cannot list Harbor projects ({e}); name them: regtee diff PROJECT..."
            ))
        })?
    } else {
        projects
    };
    let mut rows: Vec<TagRow> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for project in &projects {
        let listed = backfill::compare_project(&upstream, &targets, project, |e| match e {
            ProjectEvent::Row(row) => rows.push(row),
            ProjectEvent::Error(e) => errors.push(e),
            _ => {}
        })
        .await;
        if let Err(e) = listed {
            errors.push(e.to_string());
        }
    }
    rows.sort_by(|a, b| (&a.repository, &a.tag).cmp(&(&b.repository, &b.tag)));
    let differing = rows.iter().filter(|r| !r.in_sync()).count();
    errors.extend(rows.iter().flat_map(|r| r.errors.iter().cloned()));
    if as_json {
        print_json(&serde_json::json!({
            "projects": projects,
            "tags": rows,
            "differing": differing,
            "errors": errors,
        }));
    } else {
        let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
        print!("{:<48} {:<20}", "REPOSITORY:TAG", "HARBOR");
        for n in &names {
            print!(" {:<30}", n.to_uppercase());
        }
        println!();
        for row in &rows {
            print!(
                "{:<48} {:<20}",
                format!("{}:{}", row.repository, row.tag),
                short_digest(row.harbor.as_ref().map(Digest::as_str))
            );
            for view in &row.targets {
                let mark = match view.status {
                    TagStatus::InSync => "in sync",
                    TagStatus::Missing => "MISSING",
                    TagStatus::Different => "DIFFERENT",
                    TagStatus::Conflict => "CONFLICT (overwrite = false)",
                    TagStatus::NotMirrored => "not mirrored",
                    TagStatus::Error => "ERROR",
                };
                let cell = match view.status {
                    TagStatus::Missing | TagStatus::NotMirrored | TagStatus::Error => {
                        mark.to_string()
                    }
                    _ => format!(
                        "{} {mark}",
                        short_digest(view.digest.as_ref().map(Digest::as_str))
                    ),
                };
                print!(" {cell:<30}");
            }
            println!();
        }
        println!(
            "\n{} tags compared in {} project(s): {} differ",
            rows.len(),
            projects.len(),
            differing
        );
        for e in &errors {
            println!("error: {e}");
        }
    }
    Ok(if !errors.is_empty() {
        2
    } else if differing > 0 {
        1
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_digests_for_people() {
        assert_eq!(human_age(59_000), "59s");
        assert_eq!(human_age(61_000), "1m 1s");
        assert_eq!(human_age(3_600_000 * 25), "1d 1h");
        assert_eq!(
            short_digest(Some(&format!("sha256:{}", "ab".repeat(32)))),
            "sha256:abababababab"
        );
        assert_eq!(short_digest(None), "-");
    }
}
