//! The workers: per target, claim a job, attempt it, record how it ended, and back off when
//! the target or the queue cannot take more. A panic inside a job ends that job, never the
//! worker.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Mirror;
use super::copy::{JobError, Subject, Success};
use super::target::{Alive, Target};
use crate::config::Side;
use crate::queue::{ErrorClass, Job, JobKind, Outcome, now_ms};
use crate::registry::{ErrorKind, FixContext, RegistryError};
use crate::throttle::Throttle;

static UNRECORDED: Throttle = Throttle::new(Duration::from_secs(60));
/// Every worker meets the same unreadable queue: one line for all of them, every 30 s.
static UNREADABLE: Throttle = Throttle::new(Duration::from_secs(30));

impl Mirror {
    /// Starts `concurrency` workers per target, and for Harbor as the destination of what a
    /// primary target's writes mirror back. When `cancel` fires they take no new job and
    /// give the job in hand up to `grace` to finish; what is still running then goes back to
    /// the queue.
    pub(crate) fn spawn_workers(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
        grace: Duration,
    ) {
        for target in self.targets.iter().chain(std::iter::once(&self.harbor)) {
            for _ in 0..target.config.concurrency {
                let alive = Alive::enter(target.clone());
                tasks.spawn(self.clone().work(alive, cancel.clone(), grace));
            }
        }
    }

    async fn work(self: Arc<Self>, alive: Alive, cancel: CancellationToken, grace: Duration) {
        let target = alive.0.clone();
        let waker = self.queue.waker(target.name());
        loop {
            let notified = waker.notified();
            tokio::pin!(notified);
            // Register for wake-ups before looking, so an enqueue in between is not missed.
            notified.as_mut().enable();
            match self.queue.claim(target.name()).await {
                Ok(Some(job)) => {
                    let execution = self.attempt(&target, &job);
                    tokio::pin!(execution);
                    let outcome = tokio::select! {
                        outcome = &mut execution => outcome,
                        () = cancel.cancelled() => {
                            match tokio::time::timeout(grace, execution).await {
                                Ok(outcome) => outcome,
                                Err(_) => Outcome::RetryAt {
                                    at: now_ms(),
                                    error: "interrupted by shutdown".into(),
                                    class: ErrorClass::Shutdown,
                                },
                            }
                        }
                    };
                    if !self.record(&target, &job, outcome, &cancel).await || cancel.is_cancelled()
                    {
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(held_back) = UNREADABLE.allow() {
                        tracing::error!(target = target.name(), held_back, error = %e, "cannot read the job queue; workers retry every 5s");
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    }
                }
            }
            let wait = match self.queue.next_due(target.name()).await {
                Ok(Some(at)) => Duration::from_millis((at - now_ms()).clamp(0, 60_000) as u64),
                _ => Duration::from_secs(60),
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Records an attempt's outcome, retrying with backoff while the database refuses it (a
    /// full disk): the job stays `running` meanwhile, this worker claims nothing new, and the
    /// instance reports not ready. Returns false when shutdown came first (the job is then
    /// resumed at the next start).
    async fn record(
        &self,
        target: &Target,
        job: &Job,
        outcome: Outcome,
        cancel: &CancellationToken,
    ) -> bool {
        let mut delay = Duration::from_secs(1);
        loop {
            let Err(e) = self.queue.finish(job.id, outcome.clone()).await else {
                return true;
            };
            if let Some(held_back) = UNRECORDED.allow() {
                tracing::error!(
                    target = target.name(),
                    job = job.id,
                    held_back,
                    error = %e,
                    "could not record a job's outcome: free space on (or repair) the state directory's disk, or bring the queue database back; the job stays queued and its worker waits, retrying"
                );
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// One attempt at a job, its outcome logged and counted. A panic inside ends the job as
    /// failed instead of taking the worker (and the job with it) down.
    async fn attempt(&self, target: &Target, job: &Job) -> Outcome {
        use futures_util::FutureExt as _;
        let what = describe(job);
        let started = now_ms();
        let result = std::panic::AssertUnwindSafe(self.execute(target, job))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                Err(JobError::Internal(message))
            });
        match result {
            Ok(Success::Done {
                target_digest,
                note,
            }) => {
                if job.kind == JobKind::Manifest && job.origin.is_live() {
                    let ms = |from: i64, to: i64| Duration::from_millis((to - from).max(0) as u64);
                    self.metrics.observe_mirror_lag(
                        target.name(),
                        ms(job.created_at, started),
                        ms(started, now_ms()),
                    );
                }
                self.metrics
                    .observe_outcome(target.name(), job.kind.as_str(), "done");
                tracing::info!(
                    target = target.name(),
                    job = job.id,
                    attempts = job.attempts,
                    "done: {what}{}",
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({note})")
                    }
                );
                Outcome::Done {
                    target_digest,
                    note,
                }
            }
            Ok(Success::Skipped(reason)) => {
                self.metrics
                    .observe_outcome(target.name(), job.kind.as_str(), "skipped");
                tracing::warn!(
                    target = target.name(),
                    job = job.id,
                    "skipped: {what}: {reason}"
                );
                Outcome::Skipped { reason }
            }
            Err(error) => self.failure(target, job, &what, error),
        }
    }

    /// Runs the job; when the target refused it for want of a namespace or repository that
    /// regtee may create, has it created and runs the job once more.
    async fn execute(&self, target: &Target, job: &Job) -> Result<Success, JobError> {
        let first = self.execute_once(target, job).await;
        let (Err(JobError::Registry(e)), Some(provisioner)) = (&first, &target.provisioner) else {
            return first;
        };
        if !super::create::may_be_missing(e) {
            return first;
        }
        match self.create_missing(target, provisioner, job).await {
            Ok(_) => self.execute_once(target, job).await,
            Err(api) => Err(JobError::Create(api)),
        }
    }

    async fn execute_once(&self, target: &Target, job: &Job) -> Result<Success, JobError> {
        let subject = Subject::of(job)?;
        let elsewhere;
        let mirror = match job.source.as_deref() {
            None => self,
            Some(name) => {
                elsewhere = self.reading_from(name).ok_or_else(|| {
                    JobError::Invalid(format!(
                        "it copies from target {name}, which is no longer configured"
                    ))
                })?;
                &elsewhere
            }
        };
        match job.kind {
            JobKind::Blob => mirror.blob_job(target, &subject).await,
            JobKind::Manifest => mirror.manifest_job(target, &subject).await,
            JobKind::Delete => mirror.delete_job(target, &subject).await,
        }
    }

    fn failure(&self, target: &Target, job: &Job, what: &str, error: JobError) -> Outcome {
        let (retryable, class, message, retry_after) = match &error {
            JobError::Registry(e) => (
                e.retryable(),
                error_class(e),
                e.to_string(),
                match e.kind {
                    ErrorKind::RateLimited { retry_after } => retry_after,
                    _ => None,
                },
            ),
            JobError::Create(e) => (e.retryable(), api_error_class(e), e.to_string(), None),
            JobError::Invalid(m) => (false, ErrorClass::Invalid, m.clone(), None),
            JobError::Internal(m) => (
                false,
                ErrorClass::Internal,
                format!(
                    "internal error: {m} (a bug in regtee: please report it with this job's details)"
                ),
                None,
            ),
        };
        self.metrics.observe_failure(target.name(), class);
        let cfg = &target.config;
        let attempts_left = cfg.max_attempts == 0 || job.attempts < cfg.max_attempts;
        if retryable && attempts_left {
            let delay = backoff(job.attempts, cfg.retry_initial, cfg.retry_max)
                .max(retry_after.unwrap_or_default());
            tracing::warn!(
                target = target.name(),
                job = job.id,
                attempt = job.attempts,
                retry_in = ?delay,
                "retrying: {what}: {message}"
            );
            return Outcome::RetryAt {
                at: now_ms() + delay.as_millis() as i64,
                error: message,
                class,
            };
        }
        let reason = match &error {
            JobError::Registry(e) if retryable => format!(
                "{e} (gave up after {} attempts: raise max_attempts, or fix the cause and `regtee retry --failed`)",
                job.attempts
            ),
            // The cloud's API made sure it exists, and the registry still says no.
            JobError::Registry(e)
                if target.provisioner.is_some() && super::create::may_be_missing(e) =>
            {
                let provisioner = target.provisioner.as_ref().map(|p| p.provider().as_str());
                format!(
                    "{e}: what the write needs exists (the {} API says so, create_missing), yet the registry refuses it: let regtee's login on {} push there, then `regtee retry --failed`",
                    provisioner.unwrap_or_default(),
                    target.name()
                )
            }
            JobError::Registry(e) => with_fix(e, target, job),
            JobError::Create(e) => {
                let section = format!("[[targets]] \"{}\"", target.name());
                match target.provisioner.as_ref().and_then(|p| p.fix(e, &section)) {
                    Some(fix) => format!("{e}: {fix}, then `regtee retry --failed`"),
                    None => message,
                }
            }
            JobError::Invalid(_) | JobError::Internal(_) => message,
        };
        self.metrics
            .observe_outcome(target.name(), job.kind.as_str(), "failed");
        tracing::error!(
            target = target.name(),
            job = job.id,
            class = class.as_str(),
            "failed: {what}: {reason}"
        );
        Outcome::Failed { reason, class }
    }
}

/// The error with what to do about it, for a job that failed for good.
fn with_fix(e: &crate::registry::RegistryError, target: &Target, job: &Job) -> String {
    let project = job.repository.split('/').next().unwrap_or("");
    let name = target.name();
    let (section, namespace) = match e.side {
        Side::Upstream => ("[upstream]".to_string(), project),
        Side::Target => (
            format!("[[targets]] \"{name}\""),
            target.config.policy.target_namespace(project),
        ),
    };
    let repository = target.config.policy.target_repository(&job.repository);
    match e.fix(FixContext {
        section: &section,
        namespace: Some(namespace),
        repository: (e.side == Side::Target).then_some(repository.as_str()),
    }) {
        Some(fix) => format!("{e}: {fix}, then `regtee retry --failed`"),
        None => e.to_string(),
    }
}

fn describe(job: &Job) -> String {
    let what = match (&job.tag, &job.digest) {
        (Some(t), Some(d)) => format!("{}:{t} ({d})", job.repository),
        (Some(t), None) => format!("{}:{t}", job.repository),
        (None, Some(d)) => format!("{}@{d}", job.repository),
        (None, None) => job.repository.clone(),
    };
    format!("{} {what}", job.kind.as_str())
}

/// Capped exponential backoff with jitter: attempt n waits between half and all of
/// `initial * 2^(n-1)`, never more than `max`.
pub(super) fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)));
    let ceiling = exp.min(max);
    let half = ceiling / 2;
    let jitter_ms = rand::random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

/// The class a failed call to a cloud's API is counted and shown under.
fn api_error_class(e: &crate::provision::ApiError) -> ErrorClass {
    use crate::provision::ApiErrorKind as K;
    match e.kind {
        K::Unreachable(_) => ErrorClass::Unreachable,
        K::Timeout => ErrorClass::Timeout,
        K::Credentials(_) => ErrorClass::Auth,
        K::Denied(_) => ErrorClass::Denied,
        K::Throttled(_) => ErrorClass::RateLimited,
        K::Server(_) => ErrorClass::Server,
        K::Rejected(_) => ErrorClass::Rejected,
        K::Protocol(_) => ErrorClass::Protocol,
    }
}

/// The class a registry failure is counted and shown under.
fn error_class(e: &RegistryError) -> ErrorClass {
    match &e.kind {
        ErrorKind::Unreachable(_) => ErrorClass::Unreachable,
        ErrorKind::Tls(_) | ErrorKind::HttpsOnly { .. } => ErrorClass::Tls,
        ErrorKind::Timeout => ErrorClass::Timeout,
        ErrorKind::Unauthorized(_) | ErrorKind::Login(_) => ErrorClass::Auth,
        ErrorKind::Denied(_) => ErrorClass::Denied,
        ErrorKind::NotFound { .. } => ErrorClass::NotFound,
        ErrorKind::RateLimited { .. } => ErrorClass::RateLimited,
        ErrorKind::Rejected { .. } => ErrorClass::Rejected,
        ErrorKind::Server { .. } => ErrorClass::Server,
        ErrorKind::Transfer(_) => ErrorClass::Transfer,
        ErrorKind::Protocol(_) => ErrorClass::Protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let i = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        for attempt in 1..30 {
            let d = backoff(attempt, i, m);
            let ceiling = (i * 2u32.pow((attempt - 1).min(20))).min(m);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }
}
