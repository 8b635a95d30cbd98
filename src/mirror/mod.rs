//! The mirror path: workers that claim jobs and copy content to targets, in dependency order.
//!
//! For a manifest, everything it references must exist on the target first: blobs (already
//! there, mounted from another repository regtee put them in, or streamed from Harbor with the
//! digest verified on the way), child manifests of an index, and the subject of a signature or
//! SBOM. Then the exact manifest bytes are stored with their media type, and the digest the
//! target reports must equal Harbor's. Each target has its own workers, so a target that is
//! down delays only its own jobs.

pub mod queue;
pub mod state_lock;
pub mod target;
pub mod tee;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::stream::{self, TryStreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body;
use crate::config::TargetConfig;
use crate::mirror::queue::{Job, JobKind, Outcome, Queue, now_ms};
use crate::oci::digest::{Digest, VerifyingBody};
use crate::oci::manifest::{self, Descriptor, OCI_INDEX, References};
use crate::oci::names::{RepositoryName, Tag};
use crate::ops::metrics::Metrics;
use crate::throttle::Throttle;

static UNRECORDED: Throttle = Throttle::new(Duration::from_secs(60));
use crate::registry::{Chunking, ErrorKind, FetchedManifest, RegistryClient, RegistryError};

/// How deep indexes may nest (index of index of ...); deeper is treated as malformed.
const MAX_DEPTH: usize = 4;

/// Blobs of one manifest copied at once.
const BLOB_PARALLELISM: usize = 4;

/// One target: its rules and its client.
pub struct Target {
    /// As configured.
    pub config: TargetConfig,
    /// Talks to it.
    pub client: RegistryClient,
    /// Workers of this target running now (readiness: all of them should be).
    workers_alive: AtomicUsize,
}

/// Counts a worker of a target as alive from its spawning until it ends, however it ends.
struct Alive(Arc<Target>);

impl Alive {
    fn enter(target: Arc<Target>) -> Alive {
        target.workers_alive.fetch_add(1, Ordering::Relaxed);
        Alive(target)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.workers_alive.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Target {
    /// Clients for every configured target.
    pub fn all(configs: &[TargetConfig]) -> Result<Vec<Arc<Target>>, RegistryError> {
        configs
            .iter()
            .map(|config| {
                Ok(Arc::new(Target {
                    client: RegistryClient::new(&config.endpoint)?,
                    config: config.clone(),
                    workers_alive: AtomicUsize::new(0),
                }))
            })
            .collect()
    }

    /// The target's name.
    pub fn name(&self) -> &str {
        &self.config.endpoint.name
    }

    /// `Some((alive, configured))` when fewer workers run than are configured.
    pub fn workers_missing(&self) -> Option<(usize, usize)> {
        let alive = self.workers_alive.load(Ordering::Relaxed);
        (alive < self.config.concurrency).then_some((alive, self.config.concurrency))
    }
}

/// A job's subject as the mirror uses it. The queue is a file: its names are checked again,
/// as anything from outside is.
struct Subject {
    repository: RepositoryName,
    tag: Option<Tag>,
    digest: Option<Digest>,
    mount_from: Option<RepositoryName>,
}

impl Subject {
    fn of(job: &Job) -> Result<Subject, JobError> {
        let invalid = |e: &dyn std::fmt::Display| {
            JobError::Invalid(format!(
                "the queue holds a job regtee cannot use ({e}); nothing was copied"
            ))
        };
        fn optional(v: &Option<String>) -> Option<&str> {
            v.as_deref().filter(|s| !s.is_empty())
        }
        Ok(Subject {
            repository: job.repository.parse().map_err(|e| invalid(&e))?,
            tag: optional(&job.tag)
                .map(str::parse)
                .transpose()
                .map_err(|e| invalid(&e))?,
            digest: optional(&job.digest)
                .map(str::parse)
                .transpose()
                .map_err(|e| invalid(&e))?,
            // Only a hint: a bad one is dropped, not fatal.
            mount_from: optional(&job.mount_from).and_then(|m| m.parse().ok()),
        })
    }
}

/// Why a job did not succeed.
#[derive(Debug)]
enum JobError {
    /// A registry said no or could not be reached.
    Registry(RegistryError),
    /// The content itself is wrong; retrying cannot help.
    Invalid(String),
    /// regtee itself failed (a panic, caught).
    Internal(String),
}

impl From<RegistryError> for JobError {
    fn from(e: RegistryError) -> Self {
        JobError::Registry(e)
    }
}

/// How a job ended well.
enum Success {
    Done {
        target_digest: Option<String>,
        note: String,
    },
    Skipped(String),
}

/// Per-key async locks whose entries disappear when nobody holds or waits for them.
#[derive(Default)]
struct KeyedLocks {
    map: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> KeyedGuard<'_> {
        let mutex = self.map.entry(key.clone()).or_default().clone();
        let guard = mutex.lock_owned().await;
        KeyedGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the map's own reference left: nobody holds or awaits this key.
        self.locks
            .map
            .remove_if(&self.key, |_, m| Arc::strong_count(m) == 1);
    }
}

/// The mirror: targets, the queue they work from, and Harbor to read from.
pub struct Mirror {
    queue: Arc<Queue>,
    upstream: Arc<RegistryClient>,
    targets: Vec<Arc<Target>>,
    metrics: Arc<Metrics>,
    blob_locks: KeyedLocks,
    tag_locks: KeyedLocks,
    /// Target repositories where a blob is known to exist, for cross-repository mounts.
    blob_homes: DashMap<(String, String), Vec<String>>,
}

impl Mirror {
    /// Builds clients for every target.
    pub fn new(
        queue: Arc<Queue>,
        upstream: Arc<RegistryClient>,
        targets: &[TargetConfig],
        metrics: Arc<Metrics>,
    ) -> Result<Mirror, RegistryError> {
        Ok(Mirror {
            queue,
            upstream,
            targets: Target::all(targets)?,
            metrics,
            blob_locks: KeyedLocks::default(),
            tag_locks: KeyedLocks::default(),
            blob_homes: DashMap::new(),
        })
    }

    /// The targets, in configuration order.
    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// Harbor's client.
    pub fn upstream(&self) -> &Arc<RegistryClient> {
        &self.upstream
    }

    /// The queue.
    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// Starts `concurrency` workers per target. When `cancel` fires they take no new job and
    /// give the job in hand up to `grace` to finish; what is still running then goes back to
    /// the queue.
    pub fn spawn_workers(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
        grace: Duration,
    ) {
        for target in &self.targets {
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
                                    class: "shutdown".into(),
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
                    tracing::error!(target = target.name(), error = %e, "cannot read the job queue; retrying in 5s");
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
                    "could not record a job's outcome: free space on (or repair) the state directory's disk; the job stays queued and its worker waits, retrying"
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
                if job.kind == JobKind::Manifest
                    && matches!(job.origin.as_str(), "push" | "webhook")
                {
                    let lag = (now_ms() - job.created_at).max(0) as u64;
                    self.metrics
                        .observe_mirror_lag(target.name(), Duration::from_millis(lag));
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

    async fn execute(&self, target: &Target, job: &Job) -> Result<Success, JobError> {
        let subject = Subject::of(job)?;
        match job.kind {
            JobKind::Blob => self.blob_job(target, &subject).await,
            JobKind::Manifest => self.manifest_job(target, &subject).await,
            JobKind::Delete => self.delete_job(target, &subject).await,
        }
    }

    fn failure(&self, target: &Target, job: &Job, what: &str, error: JobError) -> Outcome {
        let (retryable, class, message, retry_after) = match &error {
            JobError::Registry(e) => (
                e.retryable(),
                e.class().to_string(),
                e.to_string(),
                match e.kind {
                    ErrorKind::RateLimited { retry_after } => retry_after,
                    _ => None,
                },
            ),
            JobError::Invalid(m) => (false, "invalid".to_string(), m.clone(), None),
            JobError::Internal(m) => (
                false,
                "internal".to_string(),
                format!(
                    "internal error: {m} (a bug in regtee: please report it with this job's details)"
                ),
                None,
            ),
        };
        self.metrics.observe_failure(target.name(), &class);
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
            JobError::Registry(e) => hint(e, target, job),
            JobError::Invalid(_) | JobError::Internal(_) => message,
        };
        self.metrics
            .observe_outcome(target.name(), job.kind.as_str(), "failed");
        tracing::error!(
            target = target.name(),
            job = job.id,
            class,
            "failed: {what}: {reason}"
        );
        Outcome::Failed { reason, class }
    }

    // ---- blobs ----

    async fn blob_job(&self, target: &Target, job: &Subject) -> Result<Success, JobError> {
        let digest = job
            .digest
            .as_ref()
            .ok_or_else(|| JobError::Invalid("blob job without a digest".into()))?;
        let policy = &target.config.policy;
        let target_repo = policy.target_repository(job.repository.as_str());
        let mount_hint = job
            .mount_from
            .as_ref()
            .filter(|from| policy.wants_repository(from.as_str()))
            .map(|from| policy.target_repository(from.as_str()));
        let how = self
            .ensure_blob(
                target,
                job.repository.as_str(),
                &target_repo,
                digest,
                mount_hint.as_deref(),
            )
            .await?;
        Ok(Success::Done {
            target_digest: Some(digest.to_string()),
            note: how.to_string(),
        })
    }

    /// Makes sure the target repository has the blob. Returns how.
    async fn ensure_blob(
        &self,
        target: &Target,
        source_repo: &str,
        target_repo: &str,
        digest: &Digest,
        mount_hint: Option<&str>,
    ) -> Result<&'static str, JobError> {
        let _guard = self
            .blob_locks
            .lock(format!("{}\n{target_repo}\n{digest}", target.name()))
            .await;
        if target
            .client
            .blob_exists(target_repo, digest)
            .await?
            .is_some()
        {
            self.remember_home(target, digest, target_repo);
            return Ok("already present");
        }
        let key = (target.name().to_string(), digest.to_string());
        let mut candidates: Vec<String> = mount_hint.map(str::to_string).into_iter().collect();
        if let Some(homes) = self.blob_homes.get(&key) {
            candidates.extend(homes.iter().cloned());
        }
        candidates.retain(|c| c != target_repo);
        candidates.dedup();
        for from in candidates.iter().take(3) {
            match target.client.mount_blob(target_repo, digest, from).await {
                Ok(true) => {
                    self.remember_home(target, digest, target_repo);
                    return Ok("mounted");
                }
                Ok(false) => {}
                // A refused mount (no pull right on the source, say) falls back to upload.
                Err(e) if !e.retryable() => {
                    tracing::debug!(error = %e, "mount refused; uploading instead")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let blob = self.upstream.get_blob(source_repo, digest).await?;
        let size = blob.size;
        let verified = body::boxed(VerifyingBody::new(blob.body, digest.clone(), size));
        target
            .client
            .upload_blob(
                target_repo,
                digest,
                size,
                verified,
                Chunking {
                    size: target.config.upload_chunk_size,
                    max: target.config.max_chunk_size,
                },
            )
            .await?;
        self.metrics
            .observe_mirrored_bytes(target.name(), size.unwrap_or(0));
        self.remember_home(target, digest, target_repo);
        Ok("uploaded")
    }

    fn remember_home(&self, target: &Target, digest: &Digest, repo: &str) {
        let mut homes = self
            .blob_homes
            .entry((target.name().to_string(), digest.to_string()))
            .or_default();
        if !homes.iter().any(|h| h == repo) {
            homes.push(repo.to_string());
            if homes.len() > 8 {
                homes.remove(0);
            }
        }
    }

    // ---- manifests ----

    async fn manifest_job(&self, target: &Target, job: &Subject) -> Result<Success, JobError> {
        let repo = job.repository.as_str();
        let target_repo = target.config.policy.target_repository(repo);
        let reference = match (&job.digest, &job.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                return Err(JobError::Invalid("job names neither tag nor digest".into()));
            }
        };
        let Some(fetched) = self.upstream.get_manifest(repo, &reference).await? else {
            return Ok(Success::Skipped(format!(
                "gone from Harbor: {repo}:{reference} was deleted after it was pushed"
            )));
        };
        // Everything it references first: the long part, done without holding the tag.
        let refs = self
            .prepare_manifest(target, repo, &target_repo, &fetched, 0)
            .await?;
        let Some(tag) = &job.tag else {
            let stored = self
                .put_manifest(target, repo, &target_repo, None, &fetched, &refs, 0)
                .await?;
            return Ok(Success::Done {
                target_digest: Some(stored.to_string()),
                note: String::new(),
            });
        };
        // The tag is decided under its lock, right before it is written: a tag on the target
        // only ever moves to what Harbor's tag names now. If Harbor's tag has moved on, a newer
        // job carries it; this one stores its manifest by digest only.
        let _tag_guard = self
            .tag_locks
            .lock(format!("{}\n{target_repo}\n{tag}", target.name()))
            .await;
        let current = self.upstream.manifest_head(repo, tag.as_str()).await?;
        if current.as_ref().map(|h| &h.digest) != Some(&fetched.digest) {
            let stored = self
                .put_manifest(target, repo, &target_repo, None, &fetched, &refs, 0)
                .await?;
            return Ok(Success::Done {
                target_digest: Some(stored.to_string()),
                note: format!("tag {tag} has moved on in Harbor; stored by digest only"),
            });
        }
        if let Some(existing) = target
            .client
            .manifest_head(&target_repo, tag.as_str())
            .await?
        {
            if existing.digest == fetched.digest {
                return Ok(Success::Done {
                    target_digest: Some(existing.digest.to_string()),
                    note: "already in sync".into(),
                });
            }
            if !target.config.overwrite {
                return Ok(Success::Skipped(format!(
                    "exists: {target_repo}:{tag} on {} is {}, Harbor has {} (overwrite = false)",
                    target.name(),
                    existing.digest,
                    fetched.digest
                )));
            }
        }
        let stored = self
            .put_manifest(
                target,
                repo,
                &target_repo,
                Some(tag.as_str()),
                &fetched,
                &refs,
                0,
            )
            .await?;
        Ok(Success::Done {
            target_digest: Some(stored.to_string()),
            note: String::new(),
        })
    }

    /// Ensures everything `fetched` references, stores it by digest, checks the digest.
    async fn store_manifest(
        &self,
        target: &Target,
        repo: &str,
        target_repo: &str,
        fetched: &FetchedManifest,
        depth: usize,
    ) -> Result<Digest, JobError> {
        let refs = self
            .prepare_manifest(target, repo, target_repo, fetched, depth)
            .await?;
        self.put_manifest(target, repo, target_repo, None, fetched, &refs, depth)
            .await
    }

    /// Reads what a manifest references and makes all of it exist on the target.
    async fn prepare_manifest(
        &self,
        target: &Target,
        repo: &str,
        target_repo: &str,
        fetched: &FetchedManifest,
        depth: usize,
    ) -> Result<References, JobError> {
        if depth > MAX_DEPTH {
            return Err(JobError::Invalid(format!(
                "{repo}@{}: indexes nest deeper than {MAX_DEPTH} levels",
                fetched.digest
            )));
        }
        let refs = manifest::references(&fetched.bytes, Some(&fetched.media_type))
            .map_err(|e| JobError::Invalid(format!("{repo}@{} in Harbor: {e}", fetched.digest)))?;
        self.ensure_references(target, repo, target_repo, &refs, depth)
            .await?;
        Ok(refs)
    }

    /// Stores the exact manifest bytes under `tag` (or its digest), checks the digest the
    /// target reports, and maintains the referrers tag when the target needs it.
    #[allow(clippy::too_many_arguments)]
    async fn put_manifest(
        &self,
        target: &Target,
        repo: &str,
        target_repo: &str,
        tag: Option<&str>,
        fetched: &FetchedManifest,
        refs: &References,
        depth: usize,
    ) -> Result<Digest, JobError> {
        let reference = tag
            .map(str::to_string)
            .unwrap_or_else(|| fetched.digest.to_string());
        let media_type = if fetched.media_type.is_empty() {
            refs.media_type.clone()
        } else {
            fetched.media_type.clone()
        };
        let put = |bytes: Bytes| {
            target
                .client
                .put_manifest(target_repo, &reference, &media_type, bytes)
        };
        let stored = match put(fetched.bytes.clone()).await {
            Err(e) if matches!(e.code(), Some("MANIFEST_BLOB_UNKNOWN" | "BLOB_UNKNOWN")) => {
                // The target lost (or never committed) a blob: ensure again, then retry once.
                tracing::info!(
                    target = target.name(),
                    "target reports a missing blob; ensuring blobs again: {e}"
                );
                self.ensure_references(target, repo, target_repo, refs, depth)
                    .await?;
                put(fetched.bytes.clone()).await?
            }
            other => other?,
        };
        if let Some(reported) = &stored.digest
            && *reported != fetched.digest
        {
            return Err(JobError::Invalid(format!(
                "target {} stored {target_repo}:{reference} as {reported} but Harbor's digest is {}: the target rewrote the manifest",
                target.name(),
                fetched.digest
            )));
        }
        if let Some(subject) = &refs.subject
            && !stored.has_referrers_api
        {
            self.add_to_referrers_tag(target, target_repo, subject, fetched, refs)
                .await?;
        }
        Ok(fetched.digest.clone())
    }

    async fn ensure_references(
        &self,
        target: &Target,
        repo: &str,
        target_repo: &str,
        refs: &References,
        depth: usize,
    ) -> Result<(), JobError> {
        let blobs: Vec<Digest> = refs
            .blobs
            .iter()
            .map(|d| parse_digest(Some(&d.digest)))
            .collect::<Result<_, _>>()?;
        stream::iter(blobs.iter().map(Ok::<_, JobError>))
            .try_for_each_concurrent(BLOB_PARALLELISM, |digest| async move {
                self.ensure_blob(target, repo, target_repo, digest, None)
                    .await
                    .map(|_| ())
            })
            .await?;
        for child in &refs.children {
            self.ensure_child(target, repo, target_repo, child, depth + 1)
                .await?;
        }
        if let Some(subject) = &refs.subject {
            // The subject goes first when Harbor has it; a dangling subject is allowed by the spec.
            let digest = parse_digest(Some(&subject.digest))?;
            if self
                .upstream
                .manifest_head(repo, digest.as_str())
                .await?
                .is_some()
            {
                self.ensure_child(target, repo, target_repo, subject, depth + 1)
                    .await?;
            }
        }
        Ok(())
    }

    /// Makes sure a manifest referenced by digest exists on the target.
    fn ensure_child<'a>(
        &'a self,
        target: &'a Target,
        repo: &'a str,
        target_repo: &'a str,
        child: &'a Descriptor,
        depth: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let digest = parse_digest(Some(&child.digest))?;
            if target
                .client
                .manifest_head(target_repo, digest.as_str())
                .await?
                .is_some()
            {
                return Ok(());
            }
            let fetched = self
                .upstream
                .get_manifest(repo, digest.as_str())
                .await?
                .ok_or_else(|| {
                    JobError::Invalid(format!(
                        "{repo} references {digest}, which Harbor does not have"
                    ))
                })?;
            self.store_manifest(target, repo, target_repo, &fetched, depth)
                .await
                .map(|_| ())
        })
    }

    /// Adds a referrer to the spec's `sha256-<hex>` tag index on a target without the
    /// referrers API.
    async fn add_to_referrers_tag(
        &self,
        target: &Target,
        target_repo: &str,
        subject: &Descriptor,
        referrer: &FetchedManifest,
        refs: &References,
    ) -> Result<(), JobError> {
        let subject = parse_digest(Some(&subject.digest))?;
        let tag = manifest::referrers_tag(&subject);
        let _guard = self
            .tag_locks
            .lock(format!("{}\n{target_repo}\n{tag}", target.name()))
            .await;
        let existing = target.client.get_manifest(target_repo, &tag).await?;
        if let Some(index) = &existing
            && manifest::index_lists(&index.bytes, referrer.digest.as_str())
        {
            return Ok(());
        }
        let entry = Descriptor {
            media_type: refs.media_type.clone(),
            digest: referrer.digest.to_string(),
            size: referrer.bytes.len() as u64,
            urls: None,
            artifact_type: refs.artifact_type.clone(),
            annotations: refs.annotations.clone(),
            platform: None,
        };
        let index = manifest::add_referrer(existing.as_ref().map(|m| &m.bytes[..]), entry)
            .map_err(|e| JobError::Invalid(format!("referrers index {tag} on target: {e}")))?;
        target
            .client
            .put_manifest(target_repo, &tag, OCI_INDEX, Bytes::from(index))
            .await?;
        Ok(())
    }

    // ---- deletes ----

    async fn delete_job(&self, target: &Target, job: &Subject) -> Result<Success, JobError> {
        let target_repo = target
            .config
            .policy
            .target_repository(job.repository.as_str());
        let reference = job
            .digest
            .as_ref()
            .map(Digest::to_string)
            .or_else(|| job.tag.as_ref().map(Tag::to_string))
            .ok_or_else(|| JobError::Invalid("delete names neither tag nor digest".into()))?;
        match target
            .client
            .delete_manifest(&target_repo, &reference)
            .await
        {
            Ok(true) => Ok(Success::Done {
                target_digest: None,
                note: "deleted".into(),
            }),
            Ok(false) => Ok(Success::Done {
                target_digest: None,
                note: "was not on the target".into(),
            }),
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::Rejected {
                        status: 400 | 405,
                        ..
                    }
                ) =>
            {
                Ok(Success::Skipped(format!(
                    "target {} refused to delete {target_repo}:{reference}: {e}",
                    target.name()
                )))
            }
            Err(e) => Err(e.into()),
        }
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

fn parse_digest(d: Option<&str>) -> Result<Digest, JobError> {
    let d = d.ok_or_else(|| JobError::Invalid("job has no digest".into()))?;
    d.parse().map_err(|e| JobError::Invalid(format!("{e}")))
}

/// Capped exponential backoff with jitter: attempt n waits between half and all of
/// `initial * 2^(n-1)`, never more than `max`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)));
    let ceiling = exp.min(max);
    let half = ceiling / 2;
    let jitter_ms = rand::random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

/// A sentence a person can act on, for errors retrying cannot fix.
fn hint(e: &RegistryError, target: &Target, job: &Job) -> String {
    let on_upstream = e.registry == "upstream";
    let project = job.repository.split('/').next().unwrap_or("");
    let namespace = target.config.policy.target_namespace(project);
    let name = target.name();
    match (&e.kind, on_upstream) {
        (ErrorKind::Unauthorized(_), true) => format!(
            "Harbor rejected regtee's credentials ({e}): fix [upstream] username/password, then `regtee retry --failed`"
        ),
        (ErrorKind::Denied(_), true) => format!(
            "regtee's Harbor account may not read {} ({e}): give it pull access to project {project}",
            job.repository
        ),
        (ErrorKind::Unauthorized(_), false) => format!(
            "target {name} rejected regtee's credentials ({e}): fix its username/password, then `regtee retry --failed`"
        ),
        (ErrorKind::Denied(_), false) | (ErrorKind::NotFound { .. }, false) => format!(
            "namespace {namespace} does not exist on target {name} or regtee may not push to it ({e}): create it there (or fix `namespaces`), then `regtee retry --failed`"
        ),
        (ErrorKind::Tls(t), _) => {
            let (who, section) = if on_upstream {
                ("Harbor".to_string(), "[upstream]".to_string())
            } else {
                (format!("target {name}"), format!("[[targets]] \"{name}\""))
            };
            format!(
                "TLS to {who} failed: {t}: {}, then `regtee retry --failed`",
                t.fix(&section)
            )
        }
        _ => e.to_string(),
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

    #[tokio::test]
    async fn keyed_locks_serialize_and_clean_up() {
        let locks = Arc::new(KeyedLocks::default());
        let g = locks.lock("a".into()).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a".into()).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        assert!(locks.map.is_empty());
    }
}
