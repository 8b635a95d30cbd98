//! The commands people type: status, jobs, retry, sync, diff, check.
//!
//! When a regtee server holds the state directory, commands go through its admin API (the
//! only safe way to touch a live queue); when none runs, they open the state directory
//! themselves. Output is a table for people, or JSON with `--json`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::body;
use crate::body::read_limited;
use crate::config::{AdminConfig, ClientTls, Config};
use crate::http_client::{self, HttpClient};
use crate::mirror::queue::{Job, JobFilter, JobOrigin, Queue, QueueError, now_ms};
use crate::mirror::state_lock::StateLock;
use crate::mirror::target::Target;
use crate::mirror::tee::Tee;
use crate::oci::digest::Digest;
use crate::oci::names::NameError;
use crate::ops::admin::{BackfillBody, JobPage, Status};
use crate::ops::backfill::{
    self, BackfillRequest, BackfillState, Backfiller, Progress, ProjectEvent, TagRow, TagStatus,
};
use crate::registry::{ErrorKind, FixContext, RegistryClient, RegistryError};

/// Why a command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The state directory's queue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Harbor or a target.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A name given on the command line.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A certificate or CA for a connection.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The server's admin API did not answer.
    #[error(
        "cannot reach regtee's admin API at {base} (is `regtee serve` running with this config?)"
    )]
    AdminUnreachable {
        /// Where it was asked.
        base: String,
        /// Why.
        source: hyper_util::client::legacy::Error,
    },
    /// The admin API refused the token, or got none.
    #[error(
        "the admin API wants a token: set [admin] token_env/token_file in this config as the server has it"
    )]
    AdminToken,
    /// The admin API said no.
    #[error("admin API: {status}: {message}")]
    Admin {
        /// Its status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
    /// The admin API's answer did not parse (another version of regtee?).
    #[error("admin API answer")]
    AdminAnswer(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A server runs on the state directory but cannot be asked.
    #[error(
        "a regtee server is using {0} but has no [admin] listener to ask: add one to the config"
    )]
    NoAdmin(std::path::PathBuf),
    /// The request makes no sense for this configuration or queue.
    #[error("{0}")]
    Refused(String),
}

/// A running server's admin API.
struct AdminClient {
    base: String,
    token: Option<crate::config::Secret>,
    http: HttpClient,
}

impl AdminClient {
    fn new(admin: &AdminConfig) -> Result<AdminClient, CliError> {
        let mut addr = admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        Ok(AdminClient {
            base: format!("http://{addr}"),
            token: admin.token.clone(),
            http: http_client::build(
                &ClientTls::default(),
                Duration::from_secs(5),
                Duration::from_secs(10),
                Duration::from_secs(30),
            )?,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, CliError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let request = request
            .body(body.map(body::full).unwrap_or_else(body::empty))
            .map_err(|e| CliError::AdminAnswer(e.into()))?;
        let response =
            self.http
                .request(request)
                .await
                .map_err(|source| CliError::AdminUnreachable {
                    base: self.base.clone(),
                    source,
                })?;
        let status = response.status();
        let bytes = read_limited(response.into_body(), 64 * 1024 * 1024)
            .await
            .map_err(CliError::AdminAnswer)?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(CliError::AdminToken);
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CliError::Admin { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::AdminAnswer(e.into()))
    }
}

/// Where the CLI gets its answers.
enum Backend {
    Api(Box<AdminClient>),
    Local(Arc<Queue>),
}

fn backend(config: &Config) -> Result<Backend, CliError> {
    if StateLock::is_held(&config.state.dir) {
        let admin = config
            .admin
            .as_ref()
            .ok_or_else(|| CliError::NoAdmin(config.state.dir.clone()))?;
        return Ok(Backend::Api(Box::new(AdminClient::new(admin)?)));
    }
    Ok(Backend::Local(Arc::new(Queue::open(&config.state.dir)?)))
}

fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("API types serialize")
    );
}

/// A duration like `3m 12s` for people.
pub fn human_age(ms: i64) -> String {
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

/// `regtee status`.
pub async fn status(config: &Config, as_json: bool) -> Result<i32, CliError> {
    let status = match backend(config)? {
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
            Status::gather(&queue, &names).await?
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
    let page = match backend(config)? {
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
    let retried: u64 = match (backend(config)?, id) {
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
    let result = match backend(config)? {
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
            loop {
                let p: Progress = api
                    .call(
                        Method::GET,
                        &format!("/api/v1/backfills/{}", started.id),
                        None,
                    )
                    .await?;
                show_progress(&bar, &p);
                if p.state != BackfillState::Running {
                    bar.finish_and_clear();
                    break summarize(&p, false);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
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

/// A backfill run by the command itself, into the state directory (no server holds it).
fn local_backfiller(config: &Config, queue: Arc<Queue>) -> Result<Backfiller, CliError> {
    Ok(Backfiller {
        upstream: Arc::new(RegistryClient::new(&config.upstream.endpoint)?),
        targets: Target::all(&config.targets)?,
        tee: Arc::new(Tee::new(queue, &config.targets)),
    })
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

/// One line of `regtee check`.
struct CheckLine {
    ok: bool,
    what: String,
    detail: String,
    hint: Option<String>,
}

fn report(lines: &[CheckLine]) -> i32 {
    for l in lines {
        println!(
            "{:<5} {}: {}",
            if l.ok { "ok" } else { "FAIL" },
            l.what,
            l.detail
        );
        if let Some(h) = &l.hint {
            println!("      hint: {h}");
        }
    }
    i32::from(lines.iter().any(|l| !l.ok))
}

/// The fix for a failed check, from the one table of fixes (see the error above otherwise).
fn hint(e: &RegistryError, section: &str, namespace: Option<&str>) -> String {
    e.fix(FixContext { section, namespace })
        .unwrap_or_else(|| "see the error above".to_string())
}

/// What a passed connection check proves: TLS only for https:// endpoints.
fn connection_ok(endpoint: &crate::config::Endpoint) -> String {
    let how = match endpoint.origin.scheme() {
        crate::origin::Scheme::Https => "reachable, TLS ok",
        crate::origin::Scheme::Http => "reachable",
    };
    let who = if endpoint.credentials.is_some() {
        "credentials accepted"
    } else {
        "anonymous access accepted"
    };
    format!("{how}, {who}")
}

/// `regtee check`: validates the config and tests every endpoint. Exit 1 when a check fails.
pub async fn check(config: &Config, config_path: &std::path::Path) -> Result<i32, CliError> {
    crate::tls::install_crypto_provider();
    let mut lines = vec![CheckLine {
        ok: true,
        what: "config".into(),
        detail: format!(
            "{} is valid ({} target(s))",
            config_path.display(),
            config.targets.len()
        ),
        hint: None,
    }];
    let upstream = RegistryClient::new(&config.upstream.endpoint)?;
    let up = &config.upstream.endpoint;
    match upstream.ping().await {
        Ok(()) => lines.push(CheckLine {
            ok: true,
            what: format!("upstream {}", up.origin),
            detail: connection_ok(up),
            hint: None,
        }),
        Err(e) => lines.push(CheckLine {
            ok: false,
            what: format!("upstream {}", up.origin),
            detail: e.kind.to_string(),
            hint: Some(hint(&e, "[upstream]", None)),
        }),
    }
    for target in &config.targets {
        let key = format!("[[targets]] \"{}\"", target.endpoint.name);
        let name = &target.endpoint.name;
        let client = RegistryClient::new(&target.endpoint)?;
        let what = format!("target {name} {}", target.endpoint.origin);
        if let Err(e) = client.ping().await {
            lines.push(CheckLine {
                ok: false,
                what,
                detail: e.kind.to_string(),
                hint: Some(hint(&e, &key, None)),
            });
            continue;
        }
        lines.push(CheckLine {
            ok: true,
            what,
            detail: connection_ok(&target.endpoint),
            hint: None,
        });
        let mut namespaces: Vec<String> = target
            .policy
            .mapped_projects()
            .map(|p| target.policy.target_namespace(p).to_string())
            .collect();
        if namespaces.is_empty()
            && let Ok(projects) = backfill::projects_for(&upstream, target).await
        {
            namespaces = projects
                .iter()
                .map(|p| target.policy.target_namespace(p).to_string())
                .collect();
        }
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() {
            lines.push(CheckLine {
                ok: true,
                what: format!("target {name} namespaces"),
                detail: "none mapped and Harbor lists no projects yet: nothing to check".into(),
                hint: None,
            });
        }
        for ns in namespaces.iter().take(20) {
            let what = format!("target {name} namespace {ns}");
            match client.check_push(&format!("{ns}/regtee-check")).await {
                Ok(()) => lines.push(CheckLine {
                    ok: true,
                    what,
                    detail: "exists and accepts pushes".into(),
                    hint: None,
                }),
                Err(mut e) => {
                    // Its credentials were just accepted: a refusal here is about the namespace.
                    if let ErrorKind::Unauthorized(m) = &e.kind {
                        e.kind = ErrorKind::Denied(m.clone());
                    }
                    lines.push(CheckLine {
                        ok: false,
                        what,
                        detail: e.kind.to_string(),
                        hint: Some(hint(&e, &key, Some(ns))),
                    });
                }
            }
        }
    }
    Ok(report(&lines))
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
