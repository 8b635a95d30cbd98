//! Copying one job to one target, in dependency order: blobs (already there, mounted from a
//! repository regtee put them in, or streamed from Harbor with the digest verified on the way),
//! then child manifests and the subject, then the exact manifest bytes with their media type,
//! then the tag, decided under its lock; the referrers tag where the target has no referrers API.

use bytes::Bytes;
use futures_util::stream::{self, TryStreamExt};

use super::Mirror;
use super::target::Target;
use crate::body;
use crate::oci::digest::{Digest, VerifyingBody};
use crate::oci::error_code::ErrorCode;
use crate::oci::manifest::{self, Descriptor, OCI_INDEX, References};
use crate::oci::names::{RepositoryName, Tag};
use crate::queue::Job;
use crate::registry::{
    Chunking, ErrorKind, FetchedManifest, Mount, RegistryError, Reopen, Session, Upload,
};

/// How deep indexes may nest (index of index of ...); deeper is treated as malformed.
const MAX_DEPTH: usize = 4;

/// Blobs of one manifest copied at once.
const BLOB_PARALLELISM: usize = 4;

/// A job's subject as the mirror uses it. The queue is a file: its names are checked again,
/// as anything from outside is.
/// How the mounts of a blob went.
enum Mounting {
    Mounted,
    /// Declined; the upload session one of them opened, if any.
    Declined(Option<Session>),
}

pub(super) struct Subject {
    repository: RepositoryName,
    tag: Option<Tag>,
    digest: Option<Digest>,
    mount_from: Option<RepositoryName>,
}

impl Subject {
    pub(super) fn of(job: &Job) -> Result<Subject, JobError> {
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
pub(crate) enum JobError {
    /// A registry said no or could not be reached.
    Registry(RegistryError),
    /// The content itself is wrong; retrying cannot help.
    Invalid(String),
    /// regtee itself failed (a panic, caught).
    Internal(String),
    /// The target lacked a namespace or repository, and its cloud's API did not create it.
    Create(crate::provision::ApiError),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Registry(e) => write!(f, "{e}"),
            JobError::Create(e) => write!(f, "{e}"),
            JobError::Invalid(m) | JobError::Internal(m) => f.write_str(m),
        }
    }
}

impl From<RegistryError> for JobError {
    fn from(e: RegistryError) -> Self {
        JobError::Registry(e)
    }
}

/// How a job ended well.
pub(super) enum Success {
    Done {
        target_digest: Option<String>,
        note: String,
    },
    Skipped(String),
}

impl Mirror {
    pub(super) async fn blob_job(
        &self,
        target: &Target,
        job: &Subject,
    ) -> Result<Success, JobError> {
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
                None,
                mount_hint.as_deref(),
            )
            .await?;
        Ok(Success::Done {
            target_digest: Some(digest.to_string()),
            note: how.to_string(),
        })
    }

    /// Copies a blob Harbor has just accepted to `target` now, before its client hears of it:
    /// an upload Harbor opened before a target became the primary, whose manifest the client
    /// is about to push to that target.
    pub(crate) async fn carry_over_blob(
        &self,
        target: &Target,
        repository: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), JobError> {
        let target_repo = target.config.policy.target_repository(repository.as_str());
        self.ensure_blob(
            target,
            repository.as_str(),
            &target_repo,
            digest,
            None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Makes sure the target repository has the blob. Returns how. `size` is the descriptor's,
    /// when a manifest names the blob.
    async fn ensure_blob(
        &self,
        target: &Target,
        source_repo: &str,
        target_repo: &str,
        digest: &Digest,
        size: Option<u64>,
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
            self.remember_home(target, digest, target_repo).await;
            return Ok("already present");
        }
        let session = match self
            .try_mounts(target, target_repo, digest, mount_hint)
            .await?
        {
            Mounting::Mounted => return Ok("mounted"),
            Mounting::Declined(session) => session,
        };
        self.upload(target, source_repo, target_repo, digest, size, session)
            .await?;
        Ok("uploaded")
    }

    /// Mounts the blob from a repository of the target known to hold it (the push's mount
    /// source, then those regtee put it in), at most three tries. A declined mount may open an
    /// upload session: the upload goes through the first, and any other is closed, so none is
    /// left behind.
    async fn try_mounts(
        &self,
        target: &Target,
        target_repo: &str,
        digest: &Digest,
        mount_hint: Option<&str>,
    ) -> Result<Mounting, JobError> {
        let mut candidates: Vec<String> = mount_hint.map(str::to_string).into_iter().collect();
        match self.queue.blob_homes(target.name(), digest).await {
            Ok(homes) => candidates.extend(homes),
            // Homes only save bytes: without them the blob is uploaded.
            Err(e) => tracing::debug!(error = %e, "no mount sources; uploading"),
        }
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|c| c != target_repo && seen.insert(c.clone()));
        let mut session = None;
        for from in candidates.iter().take(3) {
            match target.client.mount_blob(target_repo, digest, from).await {
                Ok(Mount::Mounted) => {
                    if let Some(s) = session {
                        target.client.cancel_upload(target_repo, s).await;
                    }
                    self.remember_home(target, digest, target_repo).await;
                    return Ok(Mounting::Mounted);
                }
                Ok(Mount::Session(s)) if session.is_none() => session = Some(s),
                Ok(Mount::Session(s)) => target.client.cancel_upload(target_repo, s).await,
                // A refused mount (no pull right on the source, say) falls back to upload.
                Err(e) if !e.retryable() => {
                    tracing::debug!(error = %e, "mount refused; uploading instead")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Mounting::Declined(session))
    }

    /// Streams the blob from Harbor to the target, its digest verified on the way, through
    /// `session` if a declined mount opened one.
    async fn upload(
        &self,
        target: &Target,
        source_repo: &str,
        target_repo: &str,
        digest: &Digest,
        size: Option<u64>,
        session: Option<Session>,
    ) -> Result<(), JobError> {
        let source = self.source.client();
        let source_repo = &self.source.repository(source_repo);
        let blob = source.get_blob(source_repo, digest).await?;
        // Every stream from another server is cut at the size regtee knows (the image spec:
        // content whose length differs "SHOULD NOT be trusted"): the descriptor's, else the
        // answer's, else what Harbor says on a HEAD. A body without any is never streamed
        // unbounded into a target.
        let size = match size.or(blob.size) {
            Some(size) => size,
            None => source
                .blob_length(source_repo, digest)
                .await?
                .ok_or_else(|| {
                    JobError::from(source.protocol_error(
                        &format!("GET blob {source_repo}@{digest}"),
                        "the source states no length for the blob, neither in its answer nor on a HEAD",
                    ))
                })?,
        };
        let verified = body::boxed(VerifyingBody::new(blob.body, digest.clone(), Some(size)));
        // A resumed upload reads the rest from Harbor again; the target checks the whole
        // blob's digest when the upload closes.
        let reopen: Reopen<'_> = Box::new(move |from| {
            Box::pin(async move { Ok(source.get_blob_from(source_repo, digest, from).await?.body) })
        });
        let upload = Upload {
            size: Some(size),
            content: verified,
            chunking: Chunking {
                size: target.config.upload_chunk_size,
                max: target.config.max_chunk_size,
            },
            session,
            reopen: Some(reopen),
        };
        target
            .client
            .upload_blob(target_repo, digest, upload)
            .await?;
        self.metrics.observe_mirrored_bytes(target.name(), size);
        self.remember_home(target, digest, target_repo).await;
        Ok(())
    }

    /// Records a repository holding the blob, in the queue's database, so every replica (and
    /// this one after a restart) can mount from it.
    async fn remember_home(&self, target: &Target, digest: &Digest, repo: &str) {
        if let Err(e) = self
            .queue
            .remember_blob_home(target.name(), digest, repo)
            .await
        {
            tracing::debug!(error = %e, "could not record a mount source; later copies of this blob may upload instead of mounting");
        }
    }

    // ---- manifests ----

    pub(super) async fn manifest_job(
        &self,
        target: &Target,
        job: &Subject,
    ) -> Result<Success, JobError> {
        let repo = job.repository.as_str();
        let target_repo = target.config.policy.target_repository(repo);
        let reference = match (&job.digest, &job.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                return Err(JobError::Invalid("job names neither tag nor digest".into()));
            }
        };
        let Some(fetched) = self
            .source
            .client()
            .get_manifest(&self.source.repository(repo), &reference)
            .await?
        else {
            return Ok(Success::Skipped(format!(
                "gone from {}: {repo}:{reference} was deleted after it was pushed",
                self.source.shown()
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
        self.set_tag(target, repo, &target_repo, tag, &fetched, &refs)
            .await
    }

    /// Stores Harbor's manifest under `tag` on the target (its references are there already).
    ///
    /// The tag is decided under its lock, right before it is written: a tag on the target only
    /// ever moves to what Harbor's tag names now. If Harbor's tag has moved on (or is gone), a
    /// newer job carries it; this one stores its manifest by digest only.
    async fn set_tag(
        &self,
        target: &Target,
        repo: &str,
        target_repo: &str,
        tag: &Tag,
        fetched: &FetchedManifest,
        refs: &References,
    ) -> Result<Success, JobError> {
        let _tag_guard = self
            .tag_locks
            .lock(format!("{}\n{target_repo}\n{tag}", target.name()))
            .await;
        let current = self
            .source
            .client()
            .manifest_head(&self.source.repository(repo), tag.as_str())
            .await?;
        if current.as_ref().map(|h| &h.digest) != Some(&fetched.digest) {
            let stored = self
                .put_manifest(target, repo, target_repo, None, fetched, refs, 0)
                .await?;
            let note = match current {
                Some(_) => format!("tag {tag} has moved on in Harbor; stored by digest only"),
                None => format!(
                    "tag {tag} was deleted in Harbor while it was copied; stored by digest only"
                ),
            };
            return Ok(Success::Done {
                target_digest: Some(stored.to_string()),
                note,
            });
        }
        let existing = target
            .client
            .manifest_head(target_repo, tag.as_str())
            .await?;
        if let Some(existing) = &existing {
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
        let stored = match self
            .put_manifest(
                target,
                repo,
                target_repo,
                Some(tag.as_str()),
                fetched,
                refs,
                0,
            )
            .await
        {
            // The tag is there with another digest and the target refuses to move it: an
            // immutable tag (Harbor and TCR answer 412 PRECONDITION, ECR 400 TAG_INVALID).
            // Retrying cannot change that; it is a decision the target's owner made.
            // Harbor's manifest is still stored by digest, so it can be pulled from the target
            // by digest and the tag can be moved by hand if the owner lifts the rule.
            Err(JobError::Registry(e)) if existing.is_some() && refuses_tag_move(&e) => {
                self.put_manifest(target, repo, target_repo, None, fetched, refs, 0)
                    .await?;
                let there = existing.map(|h| h.digest.to_string()).unwrap_or_default();
                return Ok(Success::Skipped(format!(
                    "immutable on {}: {target_repo}:{tag} is {there}, Harbor has {} (stored by digest only; {e})",
                    target.name(),
                    fetched.digest
                )));
            }
            other => other?,
        };
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
            Err(e) if e.code().is_some_and(ErrorCode::is_missing_content) => {
                // The target lost (or never committed) a blob: ensure again, then retry once.
                tracing::info!(
                    target = target.name(),
                    "target reports a missing blob; ensuring blobs again: {e}"
                );
                self.ensure_references(target, repo, target_repo, refs, depth)
                    .await?;
                put(fetched.bytes.clone()).await?
            }
            // The bytes are Harbor's, checked against their digest: a DIGEST_INVALID here is
            // distribution reading a blob's link while another upload of that blob rewrites
            // it (its filesystem driver truncates the file before writing). Once more, later.
            Err(e) if e.code() == Some(&ErrorCode::DigestInvalid) => {
                tracing::info!(
                    target = target.name(),
                    "target could not read a blob link of {target_repo} (a concurrent upload of the same blob); trying once more: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                put(fetched.bytes.clone()).await?
            }
            Err(e) if refuses_media_type(&e) => {
                let kind = match &refs.artifact_type {
                    Some(t) if *t != media_type => format!("{media_type} (artifact type {t})"),
                    _ => media_type.clone(),
                };
                return Err(JobError::Invalid(format!(
                    "target {} refuses {target_repo}@{} of media type {kind} ({e}): it does not take this kind of artifact; allow the type there (Quay: ADDITIONAL_OCI_ARTIFACT_TYPES; GitLab: REGISTRY_FF_DYNAMIC_MEDIA_TYPES), or leave these repositories or tags out of this target (include, exclude, tags)",
                    target.name(),
                    fetched.digest
                )));
            }
            other => other?,
        };
        if let Some(reported) = &stored.digest
            && reported.contradicts(&fetched.digest)
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
        // Each blob and child once, however often the manifest lists it (an index listing one
        // child 5,000 times is 5,000 HEADs otherwise).
        let mut blobs_seen = std::collections::HashSet::new();
        let blobs: Vec<(Digest, u64)> = refs
            .blobs
            .iter()
            .filter(|d| blobs_seen.insert(d.digest.as_str()))
            .map(|d| Ok((parse_digest(Some(&d.digest))?, d.size)))
            .collect::<Result<_, JobError>>()?;
        stream::iter(blobs.iter().map(Ok::<_, JobError>))
            .try_for_each_concurrent(BLOB_PARALLELISM, |(digest, size)| async move {
                self.ensure_blob(target, repo, target_repo, digest, Some(*size), None)
                    .await
                    .map(|_| ())
            })
            .await?;
        let mut children_seen = std::collections::HashSet::new();
        for child in refs
            .children
            .iter()
            .filter(|c| children_seen.insert(c.digest.as_str()))
        {
            self.ensure_child(target, repo, target_repo, child, depth + 1)
                .await?;
        }
        if let Some(subject) = &refs.subject {
            // The subject goes first when Harbor has it; a dangling subject is allowed by the spec.
            let digest = parse_digest(Some(&subject.digest))?;
            if self
                .source
                .client()
                .manifest_head(&self.source.repository(repo), digest.as_str())
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
                .source
                .client()
                .get_manifest(&self.source.repository(repo), digest.as_str())
                .await?
                .ok_or_else(|| {
                    JobError::Invalid(format!(
                        "{repo} references {digest}, which {} does not have",
                        self.source.shown()
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

    pub(super) async fn delete_job(
        &self,
        target: &Target,
        job: &Subject,
    ) -> Result<Success, JobError> {
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
/// A manifest PUT by tag refused because the tag may not move.
fn refuses_tag_move(e: &RegistryError) -> bool {
    match &e.kind {
        ErrorKind::Rejected { status: 412, .. } => true,
        ErrorKind::Rejected { code, .. } => code == &Some(ErrorCode::TagInvalid),
        _ => false,
    }
}

/// A manifest PUT refused for what it is: `415`, or `MANIFEST_INVALID` for valid bytes Harbor
/// accepted (the target does not take that media or artifact type).
fn refuses_media_type(e: &RegistryError) -> bool {
    match &e.kind {
        ErrorKind::Rejected { status: 415, .. } => true,
        ErrorKind::Rejected { code, .. } => code == &Some(ErrorCode::ManifestInvalid),
        _ => false,
    }
}

fn parse_digest(d: Option<&str>) -> Result<Digest, JobError> {
    let d = d.ok_or_else(|| JobError::Invalid("job has no digest".into()))?;
    d.parse().map_err(|e| JobError::Invalid(format!("{e}")))
}
