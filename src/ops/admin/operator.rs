//! The operator's page as the admin listener serves it: who is signed in, the actions its forms
//! post, and the figures it shows (drawn by `ops::page`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{Admin, Answer, text};
use crate::body::{self, read_limited};
use crate::ops::backfill::BackfillRequest;
use crate::ops::page::{self, History, Overview, Sample, TargetRow, session};
use crate::queue::{JobFilter, JobOrigin, JobState, now_ms};

/// How often the chart gets a point.
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// The largest form accepted.
const MAX_FORM: usize = 64 * 1024;

/// Whether `path` is the page's (served with its own sign-in, not the API's bearer token).
pub(super) fn is_page(path: &str) -> bool {
    path == "/"
        || path == "/login"
        || path == "/logout"
        || path.starts_with("/jobs/")
        || path.starts_with("/actions/")
}

fn html(status: StatusCode, page: String, nonce: Option<&str>) -> Answer {
    let mut r = text(status, "text/html; charset=utf-8", page);
    let policy = page::content_security_policy(nonce.unwrap_or("none"));
    if let Ok(v) = HeaderValue::from_str(&policy) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn see_other(to: &str, cookie: Option<String>) -> Answer {
    let mut r = Response::new(body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

fn refused(status: StatusCode, why: &str) -> Answer {
    text(status, "text/plain; charset=utf-8", format!("{why}\n"))
}

/// Reached over TLS (a TLS front before the admin listener says so): the cookie is `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn nonce() -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

impl Admin {
    /// Serves the page: the login form until signed in (with a token set), the overview, a
    /// job's page, and the actions its forms post.
    pub(super) async fn page(&self, req: Request<Incoming>, path: &str) -> Answer {
        let (parts, incoming) = req.into_parts();
        let headers = &parts.headers;
        let signed_in = self.token.is_none() || self.sessions.holds(headers);
        match (&parts.method, path) {
            (&Method::POST, "/login") => return self.login(headers, incoming).await,
            (&Method::GET, "/") if !signed_in => {
                return html(StatusCode::OK, page::login_page(false), None);
            }
            (&Method::GET, _) if !signed_in => return see_other("/", None),
            _ if !signed_in => {
                return refused(StatusCode::UNAUTHORIZED, "log in on the page first");
            }
            _ => {}
        }
        if parts.method == Method::GET {
            return match path.strip_prefix("/jobs/") {
                None if path == "/" => self.overview().await,
                Some(id) => self.job_view(id).await,
                None => refused(StatusCode::NOT_FOUND, "no such page"),
            };
        }
        if parts.method != Method::POST {
            return refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "the page's actions are POSTs",
            );
        }
        // An action: from this page only.
        if !session::same_origin(headers) {
            return refused(StatusCode::FORBIDDEN, "a request from another site");
        }
        let Ok(bytes) = read_limited(incoming, MAX_FORM).await else {
            return refused(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large");
        };
        let form: BTreeMap<String, String> =
            url::form_urlencoded::parse(&bytes).into_owned().collect();
        if !self
            .sessions
            .form_is_ours(form.get("form_token").map(String::as_str))
        {
            return refused(
                StatusCode::FORBIDDEN,
                "the form is not this page's (reload the page)",
            );
        }
        self.act(path, &form, headers).await
    }

    async fn login(&self, headers: &HeaderMap, incoming: Incoming) -> Answer {
        let Some(token) = &self.token else {
            return see_other("/", None);
        };
        if !session::same_origin(headers) {
            return refused(StatusCode::FORBIDDEN, "a request from another site");
        }
        let Ok(bytes) = read_limited(incoming, MAX_FORM).await else {
            return refused(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large");
        };
        let presented = url::form_urlencoded::parse(&bytes)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if !crate::ops::webhooks::constant_time_eq(presented.as_bytes(), token.expose().as_bytes())
        {
            return html(StatusCode::UNAUTHORIZED, page::login_page(true), None);
        }
        let id = self.sessions.open();
        see_other("/", Some(session::cookie(&id, over_tls(headers))))
    }

    async fn act(
        &self,
        path: &str,
        form: &BTreeMap<String, String>,
        headers: &HeaderMap,
    ) -> Answer {
        match path {
            "/logout" => {
                self.sessions.close(headers);
                see_other("/", Some(session::expired_cookie()))
            }
            "/actions/retry-failed" => {
                let target = form.get("target").filter(|t| !t.is_empty()).cloned();
                match self.queue.retry_failed(target).await {
                    Ok(_) => see_other("/", None),
                    Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                }
            }
            "/actions/backfill" => {
                let project = form.get("project").cloned().unwrap_or_default();
                if let Err(e) = crate::oci::names::project(&project) {
                    return refused(StatusCode::BAD_REQUEST, &e.to_string());
                }
                let target = form.get("target").filter(|t| !t.is_empty()).cloned();
                if let Some(t) = &target
                    && !self.backfiller.targets.iter().any(|x| x.name() == t)
                {
                    return refused(StatusCode::BAD_REQUEST, &format!("no target named {t}"));
                }
                let request = BackfillRequest {
                    project,
                    target,
                    dry_run: form.contains_key("dry_run"),
                    origin: JobOrigin::Backfill,
                };
                match self.backfills.start(request).await {
                    Ok(_) => see_other("/", None),
                    Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                }
            }
            _ => match path
                .strip_prefix("/actions/retry/")
                .and_then(|id| id.parse::<i64>().ok())
            {
                Some(id) => match self.queue.retry(id).await {
                    Ok(true) => see_other("/", None),
                    Ok(false) => refused(
                        StatusCode::CONFLICT,
                        &format!("job {id} does not exist or is still pending or running"),
                    ),
                    Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                },
                None => refused(StatusCode::NOT_FOUND, "no such action"),
            },
        }
    }

    async fn overview(&self) -> Answer {
        let now = now_ms();
        let names = self.target_names();
        let (counts, failures, replicas, primary) = match (
            self.queue.counts(&names).await,
            self.queue
                .list(JobFilter {
                    state: Some(JobState::Failed),
                    limit: 20,
                    ..Default::default()
                })
                .await,
            self.queue.replicas().await,
            self.queue.primary().await,
        ) {
            (Ok(c), Ok(f), Ok(r), Ok(p)) => (c, f, r, p),
            (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
                return refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            }
        };
        let history = self.history.samples();
        let mut targets = Vec::new();
        for c in counts {
            let bytes = self.metrics.mirrored_bytes(&c.target);
            let throughput = history
                .iter()
                .rev()
                .find(|s| now - s.at >= 10 * 60 * 1000)
                .and_then(|s| {
                    let then = s.mirrored.get(&c.target).copied().unwrap_or(0);
                    let seconds = (now - s.at) as f64 / 1000.0;
                    (seconds > 0.0).then(|| bytes.saturating_sub(then) as f64 / seconds)
                });
            targets.push(TargetRow {
                lag: self.lag_last_hour(&c.target, now).await,
                counts: c,
                bytes,
                throughput,
            });
        }
        let backfills = self.backfills.list().await;
        let form_token = self.sessions.form_token().to_string();
        let nonce = nonce();
        let overview = Overview {
            token_set: self.token.is_some(),
            form_token: &form_token,
            now,
            targets,
            failures: &failures,
            backfills: &backfills,
            replicas: &replicas,
            cache: self.cache.as_ref().map(crate::cache::Cache::stats),
            primary: &primary,
            history,
        };
        html(
            StatusCode::OK,
            page::overview(&overview, &nonce),
            Some(&nonce),
        )
    }

    /// Mirror lag p50 and p99 of the manifests pushed and mirrored in the last hour (ms).
    async fn lag_last_hour(&self, target: &str, now: i64) -> Option<(u64, u64)> {
        let done = self
            .queue
            .list(JobFilter {
                state: Some(JobState::Done),
                target: Some(target.to_string()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .ok()?;
        let mut lags: Vec<u64> = done
            .iter()
            .filter(|j| j.origin.is_live() && j.kind.as_str() == "manifest")
            .filter_map(|j| Some((j.finished_at?, j.created_at)))
            .filter(|(finished, _)| now - finished <= 3600 * 1000)
            .map(|(finished, created)| (finished - created).max(0) as u64)
            .collect();
        if lags.is_empty() {
            return None;
        }
        lags.sort_unstable();
        let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }

    async fn job_view(&self, id: &str) -> Answer {
        let Ok(id) = id.parse::<i64>() else {
            return refused(StatusCode::BAD_REQUEST, "job id must be a number");
        };
        match (self.queue.get(id).await, self.queue.attempts(id).await) {
            (Ok(Some(job)), Ok(attempts)) => html(
                StatusCode::OK,
                page::job_page(&job, &attempts, self.sessions.form_token(), now_ms()),
                None,
            ),
            (Ok(None), _) => refused(StatusCode::NOT_FOUND, &format!("no job {id}")),
            (Err(e), _) | (_, Err(e)) => refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }
}

/// Takes a point for the chart now and every minute: the backlog, the slowest lag since the
/// last point, the bytes mirrored per target.
pub(super) fn spawn_sampler(admin: Arc<Admin>, history: Arc<History>) {
    let tasks = admin.tasks.clone();
    let cancel = admin.cancel.clone();
    tasks.spawn(async move {
        let mut last = now_ms();
        loop {
            let now = now_ms();
            let names = admin.target_names();
            let backlog = admin
                .queue
                .counts(&names)
                .await
                .map(|c| c.iter().map(|t| t.pending + t.running).sum())
                .unwrap_or(0);
            let lag_ms = admin
                .queue
                .list(JobFilter {
                    state: Some(JobState::Done),
                    limit: 500,
                    ..Default::default()
                })
                .await
                .unwrap_or_default()
                .iter()
                .filter(|j| j.origin.is_live() && j.finished_at.is_some_and(|f| f > last))
                .filter_map(|j| Some((j.finished_at? - j.created_at).max(0) as u64))
                .max()
                .unwrap_or(0);
            let mirrored = names
                .iter()
                .map(|n| (n.clone(), admin.metrics.mirrored_bytes(n)))
                .collect();
            history.record(Sample {
                at: now,
                backlog,
                lag_ms,
                mirrored,
            });
            last = now;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
        }
    });
}
