//! The operator's page on the admin listener: server-rendered HTML with no asset from elsewhere,
//! readable without JavaScript (a few lines of it only refresh the page's content every ten
//! seconds). Per target: jobs by state, the oldest unfinished job, mirror lag, bytes and
//! throughput; recent failures with what to do and a retry; backfills and a form to start one;
//! the primary, replicas and the cache; a chart of backlog and lag over the last hours. The
//! admin API builds the figures (`admin.rs`); this module only draws them.

mod chart;
pub(crate) mod session;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::cache::CacheStats;
use crate::ops::backfill::{BackfillState, Progress};
use crate::queue::{Attempt, ErrorClass, Job, JobState, PrimaryRecord, Replica, TargetCounts};

pub(crate) use session::Sessions;

/// Samples kept: six hours at one a minute.
const SAMPLES: usize = 360;

/// The whole install at one moment, for the chart and the throughput.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    /// When (ms).
    pub(crate) at: i64,
    /// Jobs pending or running, all targets.
    pub(crate) backlog: u64,
    /// The slowest mirror lag of the jobs done since the previous sample (ms).
    pub(crate) lag_ms: u64,
    /// Blob bytes copied to each target so far.
    pub(crate) mirrored: BTreeMap<String, u64>,
}

/// Samples of the last hours, oldest first.
#[derive(Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub(crate) fn record(&self, sample: Sample) {
        if let Ok(mut s) = self.samples.lock() {
            if s.len() >= SAMPLES {
                s.pop_front();
            }
            s.push_back(sample);
        }
    }

    pub(crate) fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// One target's row.
pub(crate) struct TargetRow {
    pub(crate) counts: TargetCounts,
    /// Mirror lag of the manifests done in the last hour: p50 and p99 (ms).
    pub(crate) lag: Option<(u64, u64)>,
    /// Blob bytes copied there since this process started.
    pub(crate) bytes: u64,
    /// Bytes a second over the last ten minutes, when there is a sample that old.
    pub(crate) throughput: Option<f64>,
}

/// Everything the overview shows.
pub(crate) struct Overview<'a> {
    pub(crate) token_set: bool,
    pub(crate) form_token: &'a str,
    pub(crate) now: i64,
    pub(crate) targets: Vec<TargetRow>,
    pub(crate) failures: &'a [Job],
    pub(crate) backfills: &'a [Progress],
    pub(crate) replicas: &'a [Replica],
    pub(crate) cache: Option<CacheStats>,
    pub(crate) primary: &'a PrimaryRecord,
    pub(crate) history: Vec<Sample>,
}

/// HTML-escapes text from anywhere (names, reasons, errors: all outside input).
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:.3em .7em;text-align:left}\
th{background:#f4f4f4}.num{text-align:right}.bad{color:#b00}.warn{background:#fff4d6;padding:.5em;border:1px solid #e0c060}\
form.inline{display:inline}button{cursor:pointer}h2{margin-top:1.2em}code{background:#f4f4f4;padding:0 .2em}";

/// The page around `body`; `nonce` allows the one refreshing script.
fn document(title: &str, body: &str, nonce: Option<&str>) -> String {
    let script = nonce.map_or_else(String::new, |n| {
        format!(
            "<script nonce=\"{n}\">setInterval(function(){{fetch(location.href,{{credentials:'same-origin'}}).then(function(r){{return r.ok?r.text():null}}).then(function(t){{if(!t)return;var d=new DOMParser().parseFromString(t,'text/html');var m=d.querySelector('main');if(m)document.querySelector('main').replaceWith(m)}})}},10000)</script>"
        )
    });
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>{body}{script}</body></html>",
        escape(title)
    )
}

/// The content-security policy a page goes out with: nothing from elsewhere, no inline script
/// but the one carrying `nonce`.
pub(crate) fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
}

fn age(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

fn bytes(n: f64) -> String {
    bytesize::ByteSize(n.max(0.0) as u64).to_string()
}

fn hidden(form_token: &str) -> String {
    format!("<input type=\"hidden\" name=\"form_token\" value=\"{form_token}\">")
}

/// What to do about a failure of this class.
fn what_to_do(class: Option<ErrorClass>) -> &'static str {
    match class {
        Some(ErrorClass::Unreachable | ErrorClass::Timeout) => {
            "check that the target is up and reachable from regtee, then retry"
        }
        Some(ErrorClass::Tls) => {
            "fix the target's certificate or ca_file (regtee check), then retry"
        }
        Some(ErrorClass::Auth) => "fix the target's credentials (regtee check), then retry",
        Some(ErrorClass::Denied) => {
            "give the credentials push rights, or create the namespace the reason names, then retry"
        }
        Some(ErrorClass::RateLimited) => {
            "lower the target's rate limits or concurrency, then retry"
        }
        Some(ErrorClass::Rejected | ErrorClass::Invalid) => {
            "the target refuses this content: see the reason; retrying alone will not help"
        }
        _ => "see the reason, then retry",
    }
}

/// The overview: `GET /`.
pub(crate) fn overview(o: &Overview<'_>, nonce: &str) -> String {
    let mut b = String::new();
    b.push_str("<main><h1>regtee</h1>");
    if !o.token_set {
        b.push_str("<p class=\"warn\">No admin token is set: anyone who can reach this listener can act here, as through the API. Set <code>[admin] token_env</code> to require a login.</p>");
    }
    let serving = match o.primary.primary.target() {
        None => "Harbor (upstream)".to_string(),
        Some(t) => format!("target <b>{}</b>", escape(t)),
    };
    let _ = write!(
        b,
        "<p>Clients are served from {serving}{}.</p>",
        match o.primary.since {
            0 => String::new(),
            since => format!(
                " since {} ago, switched by {}{}",
                age(o.now - since),
                escape(&o.primary.by),
                if o.primary.forced {
                    " with --force"
                } else {
                    ""
                }
            ),
        }
    );

    b.push_str("<h2>Targets</h2><table><tr><th>target</th><th class=num>pending</th><th class=num>running</th><th class=num>done</th><th class=num>skipped</th><th class=num>failed</th><th>oldest unfinished</th><th>lag p50 / p99 (last hour)</th><th class=num>mirrored</th><th class=num>throughput</th><th></th></tr>");
    for row in &o.targets {
        let c = &row.counts;
        let _ = write!(
            b,
            "<tr><td>{name}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=\"num{bad}\">{}</td><td>{}</td><td>{}</td><td class=num>{}</td><td class=num>{}</td><td>{retry}</td></tr>",
            c.pending,
            c.running,
            c.done,
            c.skipped,
            c.failed,
            c.oldest_pending_at.map_or("-".into(), |at| age(o.now - at)),
            row.lag.map_or("-".into(), |(p50, p99)| format!(
                "{} / {}",
                age_ms(p50),
                age_ms(p99)
            )),
            bytes(row.bytes as f64),
            row.throughput
                .map_or("-".into(), |t| format!("{}/s", bytes(t))),
            name = escape(&c.target),
            bad = if c.failed > 0 { " bad" } else { "" },
            retry = if c.failed > 0 {
                format!(
                    "<form class=inline method=post action=\"/actions/retry-failed\">{}<input type=hidden name=target value=\"{}\"><button>retry {} failed</button></form>",
                    hidden(o.form_token),
                    escape(&c.target),
                    c.failed
                )
            } else {
                String::new()
            },
        );
    }
    b.push_str("</table>");

    let backlog: Vec<f64> = o.history.iter().map(|s| s.backlog as f64).collect();
    let lag: Vec<f64> = o.history.iter().map(|s| s.lag_ms as f64).collect();
    let _ = write!(
        b,
        "<h2>Backlog and lag, last {}</h2>{}",
        age(o.history.first().map_or(0, |s| o.now - s.at)),
        chart::svg(
            "backlog and mirror lag",
            &[
                chart::Line {
                    name: "jobs pending or running",
                    colour: "#1f6fb2",
                    values: backlog
                },
                chart::Line {
                    name: "slowest mirror lag (ms)",
                    colour: "#c05000",
                    values: lag
                },
            ],
        )
    );

    b.push_str("<h2>Recent failures</h2>");
    if o.failures.is_empty() {
        b.push_str("<p>None.</p>");
    } else {
        b.push_str("<table><tr><th>job</th><th>target</th><th>what</th><th>reason</th><th>what to do</th><th></th></tr>");
        for job in o.failures {
            let _ = write!(
                b,
                "<tr><td><a href=\"/jobs/{id}\">{id}</a></td><td>{}</td><td>{}</td><td class=bad>{}</td><td>{}</td><td><form class=inline method=post action=\"/actions/retry/{id}\">{}<button>retry</button></form></td></tr>",
                escape(&job.target),
                escape(&subject(job)),
                escape(&job.detail),
                what_to_do(job.error_class),
                hidden(o.form_token),
                id = job.id,
            );
        }
        b.push_str("</table>");
    }

    b.push_str("<h2>Projects</h2>");
    let _ = write!(
        b,
        "<form method=post action=\"/actions/backfill\">{}<label>project <input name=project required pattern=\"[a-z0-9._-]+\"></label> <label>target <input name=target placeholder=\"all\"></label> <label><input type=checkbox name=dry_run value=1> compare only</label> <button>start a backfill</button></form>",
        hidden(o.form_token)
    );
    if !o.backfills.is_empty() {
        b.push_str("<table><tr><th>id</th><th>project</th><th>target</th><th>state</th><th>compared</th><th class=num>in sync</th><th class=num>missing or different (queued)</th><th class=num>left alone</th><th class=num>could not compare</th></tr>");
        for p in o.backfills.iter().take(20) {
            let state = match p.state {
                BackfillState::Running => "running",
                BackfillState::Finished if p.dry_run => "compared",
                BackfillState::Finished => "finished",
                BackfillState::Failed => "failed",
                BackfillState::Cancelled => "cancelled",
            };
            let verdict = match (p.state, p.queued + p.failed) {
                (BackfillState::Finished, 0) => " (in sync)",
                _ => "",
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{state}{verdict}</td><td>{} of {} tags, {} of {} repositories</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td></tr>",
                p.id,
                escape(&p.project),
                escape(p.target.as_deref().unwrap_or("all")),
                p.tags_compared,
                p.tags,
                p.repositories_done,
                p.repositories,
                p.in_sync,
                p.queued,
                p.skipped,
                p.failed,
            );
        }
        b.push_str("</table>");
    }

    if !o.replicas.is_empty() {
        b.push_str("<h2>Replicas</h2><table><tr><th>replica</th><th>version</th><th>last heard</th><th class=num>jobs in hand</th></tr>");
        for r in o.replicas {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{} ago</td><td class=num>{}</td></tr>",
                escape(&r.id),
                escape(&r.version),
                age(o.now - r.heartbeat_at),
                r.jobs_in_hand
            );
        }
        b.push_str("</table>");
    }
    if let Some(c) = &o.cache {
        let _ = write!(
            b,
            "<h2>Pull-through cache</h2><p>{} in {} entries (max {}), {} hits, {} misses, hit ratio {:.2}</p>",
            bytes(c.size_bytes as f64),
            c.entries,
            bytes(c.max_size_bytes as f64),
            c.hits,
            c.misses,
            c.hit_ratio
        );
    }
    if o.token_set {
        let _ = write!(
            b,
            "<form method=post action=\"/logout\">{}<button>log out</button></form>",
            hidden(o.form_token)
        );
    }
    b.push_str("</main>");
    document("regtee", &b, Some(nonce))
}

fn age_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        age(ms as i64)
    }
}

fn subject(job: &Job) -> String {
    let what = match (&job.tag, &job.digest) {
        (Some(t), _) => format!("{}:{t}", job.repository),
        (None, Some(d)) => format!("{}@{d}", job.repository),
        (None, None) => job.repository.clone(),
    };
    format!("{} {what}", job.kind.as_str())
}

/// One job and its attempts: `GET /jobs/{id}`.
pub(crate) fn job_page(job: &Job, attempts: &[Attempt], form_token: &str, now: i64) -> String {
    let mut b = format!(
        "<main><p><a href=\"/\">&larr; overview</a></p><h1>Job {}</h1><table><tr><th>target</th><td>{}</td></tr><tr><th>what</th><td>{}</td></tr><tr><th>state</th><td>{}</td></tr><tr><th>attempts</th><td>{}</td></tr><tr><th>created</th><td>{} ago</td></tr><tr><th>reason</th><td>{}</td></tr>",
        job.id,
        escape(&job.target),
        escape(&subject(job)),
        job.state.as_str(),
        job.attempts,
        age(now - job.created_at),
        escape(&job.detail),
    );
    if job.state == JobState::Failed {
        let _ = write!(
            b,
            "<tr><th>what to do</th><td>{}</td></tr>",
            what_to_do(job.error_class)
        );
    }
    b.push_str("</table>");
    if matches!(
        job.state,
        JobState::Failed | JobState::Done | JobState::Skipped
    ) {
        let _ = write!(
            b,
            "<form method=post action=\"/actions/retry/{}\">{}<button>retry</button></form>",
            job.id,
            hidden(form_token)
        );
    }
    b.push_str("<h2>Attempts</h2><table><tr><th>started</th><th>took</th><th>result</th><th>detail</th></tr>");
    for a in attempts {
        let _ = write!(
            b,
            "<tr><td>{} ago</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            age(now - a.started_at),
            age_ms((a.finished_at - a.started_at).max(0) as u64),
            a.result.as_str(),
            escape(&a.detail)
        );
    }
    b.push_str("</table></main>");
    document(&format!("regtee: job {}", job.id), &b, None)
}

/// The login form, asked once per browser when an admin token is set.
pub(crate) fn login_page(refused: bool) -> String {
    let message = if refused {
        "<p class=bad>That is not the admin token.</p>"
    } else {
        ""
    };
    document(
        "regtee: log in",
        &format!(
            "<main><h1>regtee</h1>{message}<form method=post action=\"/login\"><label>admin token <input type=password name=token autocomplete=current-password required autofocus></label> <button>log in</button></form><p>The token is the one in <code>[admin] token_env</code> or <code>token_file</code>. It is sent once; the browser then keeps a session cookie.</p></main>"
        ),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::JobKind;

    fn hostile_job() -> Job {
        Job {
            id: 7,
            target: "tcr".into(),
            kind: JobKind::Manifest,
            repository: "library/app".into(),
            tag: Some("1".into()),
            digest: None,
            mount_from: None,
            origin: crate::queue::JobOrigin::Push,
            state: JobState::Failed,
            attempts: 1,
            created_at: 0,
            updated_at: 0,
            next_attempt_at: 0,
            finished_at: Some(0),
            detail: "<script>alert('x')</script> & \"quoted\"".into(),
            error_class: Some(ErrorClass::Auth),
            target_digest: None,
            source: None,
        }
    }

    #[test]
    fn text_from_outside_is_escaped_and_forms_carry_the_token() {
        let failures = [hostile_job()];
        let shown = Overview {
            token_set: false,
            form_token: "f0rm",
            now: 1000,
            targets: Vec::new(),
            failures: &failures,
            backfills: &[],
            replicas: &[],
            cache: None,
            primary: &PrimaryRecord::default(),
            history: Vec::new(),
        };
        let html = overview(&shown, "n0nce");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(
            html.contains(
                "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;quoted&quot;"
            )
        );
        assert!(html.contains("name=\"form_token\" value=\"f0rm\""));
        assert!(
            html.contains("<script nonce=\"n0nce\">"),
            "only the nonce'd script"
        );
        assert!(html.contains("anyone who can reach this listener can act"));
        assert!(html.contains("fix the target's credentials"), "what to do");
        let job = job_page(&failures[0], &[], "f0rm", 1000);
        assert!(!job.contains("<script"), "{job}");
    }
}
