//! The operator's listener: health, metrics, the JSON API, and webhook intake.
//!
//! Kept off the proxy listeners so it can stay on a private address. When an admin token is
//! configured every request needs it, except the webhook endpoints, which check the webhook
//! secret instead (Harbor can send only one `Authorization` header).

mod operator;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::sync::watch;

use crate::body::read_limited;
use crate::body::{self, ProxyBody};
use crate::cache::{Cache, CacheStats};
use crate::config::{Config, Secret};
use crate::metrics::Metrics;
use crate::oci::names::{RepositoryName, Tag};
use crate::ops::backfill::{self, BackfillRequest, Backfiller, TagRow};
use crate::ops::backfill_runs::BackfillRuns;
use crate::ops::cutover::{Cutover, Switched};
use crate::ops::page::{History, Sessions};
use crate::ops::webhooks;
use crate::queue::{
    Job, JobFilter, JobOrigin, JobState, PrimaryRecord, Queue, QueueError, TargetCounts, now_ms,
};
use crate::registry::ErrorKind;

/// The largest webhook or API request body accepted.
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// `GET /api/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Status {
    /// Per-target counts.
    pub targets: Vec<TargetCounts>,
    /// The most recent failed jobs.
    pub recent_failures: Vec<Job>,
    /// The replicas sharing a PostgreSQL queue (empty with SQLite).
    #[serde(default)]
    pub replicas: Vec<crate::queue::Replica>,
    /// The pull-through cache's figures, from a running regtee with `[cache]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStats>,
    /// The registry clients are served from, since when, switched by whom (as recorded).
    #[serde(default)]
    pub primary: PrimaryRecord,
    /// What this replica serves from now (it follows the record within a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<PrimaryRecord>,
    /// When this was computed (ms).
    pub now: i64,
}

impl Status {
    /// Reads the status from the queue; `targets` are the configured target names.
    pub(crate) async fn gather(
        queue: &Queue,
        targets: &[String],
        cache: Option<&Cache>,
    ) -> Result<Status, QueueError> {
        Ok(Status {
            targets: queue.counts(targets).await?,
            recent_failures: queue
                .list(JobFilter {
                    state: Some(JobState::Failed),
                    limit: 10,
                    ..Default::default()
                })
                .await?,
            replicas: queue.replicas().await?,
            cache: cache.map(Cache::stats),
            primary: queue.primary().await?,
            serving: None,
            now: now_ms(),
        })
    }
}

/// `GET /api/v1/jobs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_before: Option<i64>,
}

impl JobPage {
    /// One page of jobs matching `filter`.
    pub(crate) async fn fetch(queue: &Queue, filter: JobFilter) -> Result<JobPage, QueueError> {
        let limit = filter.limit.clamp(1, 1000);
        let jobs = queue.list(filter).await?;
        let next_before = (jobs.len() as u32 == limit)
            .then(|| jobs.last().map(|j| j.id))
            .flatten();
        Ok(JobPage { jobs, next_before })
    }
}

/// `GET /api/v1/jobs/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobDetail {
    /// The job.
    pub job: Job,
    /// Its attempts, oldest first.
    pub attempts: Vec<crate::queue::Attempt>,
}

/// `GET /api/v1/repositories/{name}/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RepositoryStatus {
    /// Harbor repository.
    pub repository: RepositoryName,
    /// Every tag: Harbor's digest and each target's.
    pub tags: Vec<TagRow>,
    /// Tags Harbor lists that break the spec's grammar, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_tags: Vec<String>,
}

/// `PUT /api/v1/primary` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PrimaryBody {
    /// `upstream` (Harbor) or a target's name.
    pub primary: String,
    /// Switch although the gate refuses.
    #[serde(default)]
    pub force: bool,
    /// Who asks, for the record (`regtee cutover` sends the user it runs as).
    #[serde(default)]
    pub by: Option<String>,
}

/// `PUT /api/v1/primary` refused by the gate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PrimaryRefused {
    /// Why, in a sentence.
    pub error: String,
    /// What stands in the way, one line each.
    pub blocking: Vec<String>,
}

/// `POST /api/v1/backfills` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BackfillBody {
    /// Harbor project.
    pub project: String,
    /// Only this target.
    #[serde(default)]
    pub target: Option<String>,
    /// Compare only.
    #[serde(default)]
    pub dry_run: bool,
}

/// The admin API's state.
pub(crate) struct Admin {
    token: Option<Secret>,
    webhook_secret: Option<Secret>,
    queue: Arc<Queue>,
    /// Harbor, the targets and the tee: what backfills, comparisons and webhooks need.
    backfiller: Arc<Backfiller>,
    metrics: Arc<Metrics>,
    cache: Option<Cache>,
    backfills: Arc<BackfillRuns>,
    cancel: CancellationToken,
    /// Whether `[upstream] token_certificate` is set: a target can be the primary only then.
    checks_tokens: bool,
    /// What this process serves from now.
    serving: watch::Receiver<PrimaryRecord>,
    /// The page's sign-ins and its forms' anti-forgery token.
    sessions: Sessions,
    /// The page's chart.
    history: Arc<History>,
    tasks: TaskTracker,
}

type Answer = Response<ProxyBody>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    let bytes = serde_json::to_vec_pretty(value).expect("API types serialize");
    let mut r = Response::new(body::full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// The queue's database could not answer: the client may retry (503), told why.
fn queue_unavailable(e: &QueueError) -> Answer {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(body::full(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    r
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The running parts the admin API shows and steers.
pub(crate) struct AdminParts {
    pub(crate) queue: Arc<Queue>,
    pub(crate) backfiller: Arc<Backfiller>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) cache: Option<Cache>,
    /// What this process serves from now.
    pub(crate) serving: watch::Receiver<PrimaryRecord>,
}

impl Admin {
    /// Wires the API to the running parts.
    pub(crate) fn new(
        config: &Config,
        parts: AdminParts,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Admin> {
        let AdminParts {
            queue,
            backfiller,
            metrics,
            cache,
            serving,
        } = parts;
        let history = Arc::new(History::default());
        let admin = Arc::new(Admin {
            token: config.admin.as_ref().and_then(|a| a.token.clone()),
            webhook_secret: config.webhook_secret.clone(),
            backfills: Arc::new(BackfillRuns::new(
                queue.clone(),
                backfiller.clone(),
                tasks.clone(),
                cancel.clone(),
            )),
            queue,
            backfiller,
            metrics,
            cache,
            cancel,
            checks_tokens: config.upstream.token_trust.is_some(),
            serving,
            sessions: Sessions::new(),
            history: history.clone(),
            tasks,
        });
        operator::spawn_sampler(admin.clone(), history);
        admin
    }

    /// Serves one admin request. With a token set, everything needs it but webhooks (which
    /// carry their own secret) and the probes a Kubernetes kubelet sends bare: `/healthz`, and
    /// `/readyz`, which then answers its status code alone, without the reason.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Answer, Infallible> {
        let path = req.uri().path().to_string();
        let is_webhook = path.starts_with("/api/v1/webhooks/");
        if operator::is_page(&path) {
            return Ok(self.page(req, &path).await);
        }
        let Some(token) = &self.token else {
            return Ok(self.route(req, &path).await);
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(webhooks::bearer_credentials);
        let authorized = presented
            .is_some_and(|p| webhooks::constant_time_eq(p.as_bytes(), token.expose().as_bytes()));
        if authorized || is_webhook || path == "/healthz" {
            return Ok(self.route(req, &path).await);
        }
        if path == "/readyz" && req.method() == Method::GET {
            let status = self.ready().await.status();
            let word = if status.is_success() {
                "ready\n"
            } else {
                "not ready\n"
            };
            return Ok(text(status, "text/plain", word));
        }
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "admin token required: send Authorization: Bearer <token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        Ok(r)
    }

    async fn route(&self, req: Request<Incoming>, path: &str) -> Answer {
        let method = req.method().clone();
        let query = query_map(req.uri().query());
        // A repository may be given as `library%2Fapp` or `library/app`: decode as registries do.
        let Some(decoded) = crate::oci::names::percent_decode(path) else {
            return error(
                StatusCode::BAD_REQUEST,
                "the path has escapes that are not UTF-8",
            );
        };
        let segments: Vec<&str> = decoded.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => text(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, ["readyz"]) => self.ready().await,
            (&Method::GET, ["metrics"]) => self.render_metrics().await,
            (&Method::GET, ["api", "v1", "status"]) => self.status().await,
            (&Method::GET, ["api", "v1", "jobs"]) => self.jobs(&query).await,
            (&Method::POST, ["api", "v1", "jobs", "retry"]) => self.retry_all(&query).await,
            (&Method::GET, ["api", "v1", "jobs", id]) => self.job(id).await,
            (&Method::POST, ["api", "v1", "jobs", id, "retry"]) => self.retry(id).await,
            (&Method::GET, ["api", "v1", "repositories", rest @ .., "status"])
                if !rest.is_empty() =>
            {
                self.repository_status(&rest.join("/")).await
            }
            (&Method::GET, ["api", "v1", "primary"]) => match self.queue.primary().await {
                Ok(record) => json(StatusCode::OK, &record),
                Err(e) => queue_unavailable(&e),
            },
            (&Method::PUT, ["api", "v1", "primary"]) => self.switch_primary(req).await,
            (&Method::POST, ["api", "v1", "backfills"]) => self.start_backfill(req).await,
            (&Method::GET, ["api", "v1", "backfills"]) => self.list_backfills().await,
            (&Method::GET, ["api", "v1", "backfills", id]) => self.backfill(id, &query).await,
            (&Method::POST, ["api", "v1", "backfills", id, "cancel"]) => {
                self.cancel_backfill(id).await
            }
            (&Method::POST, ["api", "v1", "webhooks", sender @ ("harbor" | "registry")]) => {
                self.webhook(sender, req).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no such admin endpoint: {method} {path}"),
            ),
        }
    }

    async fn ready(&self) -> Answer {
        if let Err(e) = self.queue.health().await {
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("queue: {e}"));
        }
        if self.queue.outcome_unrecorded() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue: a job's outcome could not be recorded (is the state directory's disk full, or the queue database away?)",
            );
        }
        if !self.cancel.is_cancelled() {
            for target in &self.backfiller.targets {
                if let Some((alive, configured)) = target.workers_missing() {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "target {}: {alive} of {configured} mirror workers are running; restart regtee",
                            target.name()
                        ),
                    );
                }
            }
        }
        match &self.backfiller.upstream.ping().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n"),
            // Harbor serves HTTPS only: every request through regtee is refused until fixed.
            Err(e) if matches!(e.kind, ErrorKind::HttpsOnly { .. }) => {
                error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            // An answer of any other kind proves Harbor is reachable.
            Err(e) if e.answered() => text(StatusCode::OK, "text/plain", "ready\n"),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    fn target_names(&self) -> Vec<String> {
        self.backfiller
            .targets
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    }

    async fn render_metrics(&self) -> Answer {
        let counts = self
            .queue
            .counts(&self.target_names())
            .await
            .unwrap_or_default();
        if let Some(cache) = &self.cache {
            let stats = cache.stats();
            self.metrics.set_cache_size(stats.size_bytes, stats.entries);
        }
        let ready = self.ready().await.status().is_success();
        self.metrics.set_ready(ready);
        if let Ok(record) = self.queue.primary().await {
            self.metrics
                .set_primary(record.primary.name(), record.since);
        }
        text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            self.metrics.render(&counts, now_ms()),
        )
    }

    async fn status(&self) -> Answer {
        match Status::gather(&self.queue, &self.target_names(), self.cache.as_ref()).await {
            Ok(mut s) => {
                s.serving = Some(self.serving.borrow().clone());
                json(StatusCode::OK, &s)
            }
            Err(e) => queue_unavailable(&e),
        }
    }

    async fn jobs(&self, q: &BTreeMap<String, String>) -> Answer {
        let state = match q.get("state").map(|s| JobState::parse(s)) {
            Some(None) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "state must be pending, running, done, skipped or failed",
                );
            }
            Some(s) => s,
            None => None,
        };
        let filter = JobFilter {
            state,
            target: q.get("target").cloned(),
            repository: q.get("repository").cloned(),
            project: q.get("project").cloned(),
            before_id: q.get("before").and_then(|b| b.parse().ok()),
            limit: q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50),
        };
        match JobPage::fetch(&self.queue, filter).await {
            Ok(page) => json(StatusCode::OK, &page),
            Err(e) => queue_unavailable(&e),
        }
    }

    async fn job(&self, id: &str) -> Answer {
        let Ok(id) = id.parse::<i64>() else {
            return error(StatusCode::BAD_REQUEST, "job id must be a number");
        };
        match (self.queue.get(id).await, self.queue.attempts(id).await) {
            (Ok(Some(job)), Ok(attempts)) => json(StatusCode::OK, &JobDetail { job, attempts }),
            (Ok(None), _) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
            (Err(e), _) | (_, Err(e)) => queue_unavailable(&e),
        }
    }

    async fn retry(&self, id: &str) -> Answer {
        let Ok(id) = id.parse::<i64>() else {
            return error(StatusCode::BAD_REQUEST, "job id must be a number");
        };
        match self.queue.retry(id).await {
            Ok(true) => json(StatusCode::OK, &serde_json::json!({ "retried": 1 })),
            Ok(false) => error(
                StatusCode::CONFLICT,
                format!("job {id} does not exist or is still pending or running"),
            ),
            Err(e) => queue_unavailable(&e),
        }
    }

    async fn retry_all(&self, q: &BTreeMap<String, String>) -> Answer {
        if q.get("state").map(String::as_str).unwrap_or("failed") != "failed" {
            return error(
                StatusCode::BAD_REQUEST,
                "only state=failed can be retried in bulk",
            );
        }
        match self.queue.retry_failed(q.get("target").cloned()).await {
            Ok(n) => json(StatusCode::OK, &serde_json::json!({ "retried": n })),
            Err(e) => queue_unavailable(&e),
        }
    }

    async fn repository_status(&self, repository: &str) -> Answer {
        let repository: RepositoryName = match repository.parse() {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let upstream = &self.backfiller.upstream;
        let tags = match upstream.tags(repository.as_str()).await {
            Ok(t) => t,
            Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
        };
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        for tag in tags {
            match tag.parse::<Tag>() {
                Ok(tag) => rows.push(
                    backfill::compare_tag(upstream, &self.backfiller.targets, &repository, &tag)
                        .await,
                ),
                Err(e) => skipped.push(e.to_string()),
            }
        }
        json(
            StatusCode::OK,
            &RepositoryStatus {
                repository,
                tags: rows,
                invalid_tags: skipped,
            },
        )
    }

    async fn switch_primary(&self, req: Request<Incoming>) -> Answer {
        let bytes = match read_limited(req.into_body(), MAX_REQUEST_BODY).await {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, crate::error::error_chain(&*e)),
        };
        let body: PrimaryBody = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected {{\"primary\": \"upstream\" or a target, \"force\"?: bool}}: {e}"
                    ),
                );
            }
        };
        let by: String = body
            .by
            .as_deref()
            .unwrap_or("admin API")
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        let cutover = Cutover {
            queue: &self.queue,
            upstream: &self.backfiller.upstream,
            targets: &self.backfiller.targets,
            checks_tokens: self.checks_tokens,
        };
        match cutover.switch(&body.primary, body.force, &by).await {
            Ok(Switched::Done(record)) => json(StatusCode::OK, &record),
            Ok(Switched::Refused(blocking)) => json(
                StatusCode::CONFLICT,
                &PrimaryRefused {
                    error: format!(
                        "{} cannot become the primary yet: {} thing(s) stand in the way (force to switch anyway)",
                        body.primary,
                        blocking.len()
                    ),
                    blocking,
                },
            ),
            Err(message) => error(StatusCode::BAD_REQUEST, message),
        }
    }

    async fn start_backfill(&self, req: Request<Incoming>) -> Answer {
        let bytes = match read_limited(req.into_body(), MAX_REQUEST_BODY).await {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, crate::error::error_chain(&*e)),
        };
        let body: BackfillBody = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected {{\"project\": ..., \"target\"?: ..., \"dry_run\"?: bool}}: {e}"
                    ),
                );
            }
        };
        if let Err(e) = crate::oci::names::project(&body.project) {
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
        if let Some(t) = &body.target
            && !self.backfiller.targets.iter().any(|x| x.name() == t)
        {
            return error(StatusCode::BAD_REQUEST, format!("no target named {t}"));
        }
        let request = BackfillRequest {
            project: body.project,
            target: body.target,
            dry_run: body.dry_run,
            origin: JobOrigin::Backfill,
        };
        match self.backfills.start(request).await {
            Ok(progress) => json(StatusCode::ACCEPTED, &progress),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("could not record the backfill, nothing started: {e}"),
            ),
        }
    }

    async fn list_backfills(&self) -> Answer {
        json(StatusCode::OK, &self.backfills.list().await)
    }

    /// One backfill; with `wait=SECONDS` (at most 30), once it ends or after that long.
    async fn backfill(&self, id: &str, q: &BTreeMap<String, String>) -> Answer {
        let Ok(number) = id.parse::<u64>() else {
            return error(StatusCode::NOT_FOUND, format!("no backfill {id}"));
        };
        let wait = q
            .get("wait")
            .and_then(|w| w.parse::<u64>().ok())
            .map_or(std::time::Duration::ZERO, |s| {
                std::time::Duration::from_secs(s.min(30))
            });
        match self.backfills.wait(number, wait).await {
            Ok(Some(p)) => json(StatusCode::OK, &p),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no backfill {id}")),
            Err(e) => queue_unavailable(&e),
        }
    }

    /// Stops a running backfill, whichever replica runs it. `{"cancelled": true}`, or 404 when
    /// no such backfill is running.
    async fn cancel_backfill(&self, id: &str) -> Answer {
        let Ok(number) = id.parse::<u64>() else {
            return error(StatusCode::NOT_FOUND, format!("no backfill {id}"));
        };
        match self.backfills.cancel(number).await {
            Ok(true) => json(StatusCode::OK, &serde_json::json!({"cancelled": true})),
            Ok(false) => error(
                StatusCode::NOT_FOUND,
                format!("backfill {id} is not running"),
            ),
            Err(e) => queue_unavailable(&e),
        }
    }

    async fn webhook(&self, sender: &str, req: Request<Incoming>) -> Answer {
        let Some(secret) = &self.webhook_secret else {
            return error(
                StatusCode::FORBIDDEN,
                "webhooks are disabled: set [webhooks] secret_env (or secret_file) in regtee's config",
            );
        };
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !webhooks::authorized(auth, secret) {
            return error(StatusCode::UNAUTHORIZED, "wrong or missing webhook secret");
        }
        let bytes = match read_limited(req.into_body(), MAX_REQUEST_BODY).await {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    crate::error::error_chain(&*e),
                );
            }
        };
        let parsed = if sender == "harbor" {
            webhooks::harbor(&bytes)
        } else {
            webhooks::registry(&bytes)
        };
        let events = match parsed {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(sender, error = %e, "rejected a webhook payload");
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
        };
        if !events.rejected.is_empty() {
            tracing::warn!(
                sender,
                rejected = events.rejected.len(),
                first = %events.rejected[0],
                "webhook events left out: their names break the distribution spec's grammar (nothing was queued for them)"
            );
            if events.writes.is_empty() {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({
                        "error": "no usable event: every name, tag or digest breaks the spec's grammar",
                        "rejected": events.rejected,
                    }),
                );
            }
        }
        let armed = match self
            .backfiller
            .tee
            .record_all(&events.writes, JobOrigin::Webhook, None)
            .await
        {
            Ok(n) => n,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        tracing::info!(
            sender,
            events = events.writes.len(),
            jobs = armed,
            "webhook accepted"
        );
        json(
            StatusCode::OK,
            &serde_json::json!({
                "events": events.writes.len(),
                "jobs": armed,
                "rejected": events.rejected,
            }),
        )
    }
}
