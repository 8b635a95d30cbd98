//! Turns content Harbor accepted into durable jobs, one per target that wants it.
//!
//! The request path, webhooks and backfills all describe what happened as a [`Write`]; this is
//! the one place that applies each target's filters and decides which jobs that write creates.

/// Content Harbor has just accepted, as seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    /// A blob upload finished, or a blob was mounted from another repository.
    Blob {
        /// Repository that now holds the blob.
        repository: RepositoryName,
        /// The blob.
        digest: Digest,
        /// For a mount: the repository it came from.
        mounted_from: Option<RepositoryName>,
    },
    /// A manifest was stored under a tag or a digest.
    Manifest {
        /// Repository.
        repository: RepositoryName,
        /// The tag, if pushed by tag.
        tag: Option<Tag>,
        /// The manifest digest, when Harbor or the path says it.
        digest: Option<Digest>,
    },
    /// A manifest (or tag) was deleted.
    ManifestDeleted {
        /// Repository.
        repository: RepositoryName,
        /// Tag or digest that was deleted.
        reference: Reference,
    },
}

impl Write {
    /// The repository written to.
    pub(crate) fn repository(&self) -> &RepositoryName {
        match self {
            Write::Blob { repository, .. }
            | Write::Manifest { repository, .. }
            | Write::ManifestDeleted { repository, .. } => repository,
        }
    }
}

use std::sync::Arc;

use crate::config::TargetConfig;
use crate::config::TargetPolicy;
use crate::error::OciError;
use crate::oci::digest::Digest;
use crate::oci::names::{Reference, RepositoryName, Tag};
use crate::queue::{JobKind, JobOrigin, NewJob, Queue, QueueError, UPSTREAM};

/// One target's rules, as far as creating jobs is concerned.
#[derive(Clone, Debug)]
struct Rules {
    name: String,
    policy: TargetPolicy,
    delete: bool,
}

/// Records writes as jobs in the durable queue.
pub(crate) struct Tee {
    queue: Arc<Queue>,
    targets: Vec<Rules>,
}

impl Tee {
    /// The queue jobs go to.
    pub(crate) fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// A tee for these targets.
    pub(crate) fn new(queue: Arc<Queue>, targets: &[TargetConfig]) -> Tee {
        Tee {
            queue,
            targets: targets
                .iter()
                .map(|t| Rules {
                    name: t.endpoint.name.clone(),
                    policy: t.policy.clone(),
                    delete: t.delete,
                })
                .collect(),
        }
    }

    /// The jobs a write Harbor accepted creates: for each target whose filters take it (only the
    /// target named `only`, when given: a backfill of one target).
    pub(crate) fn jobs_for(
        &self,
        write: &Write,
        origin: JobOrigin,
        only: Option<&str>,
    ) -> Vec<NewJob> {
        let destinations = self
            .targets
            .iter()
            .filter(|t| only.is_none_or(|name| name == t.name));
        jobs_to(destinations, write, origin, None)
    }

    /// The jobs a write on the primary target `primary` creates: Harbor (mirrored back, deletes
    /// when the primary propagates them) and every other target whose filters take it, each
    /// copying from `primary`.
    pub(crate) fn jobs_from_primary(&self, write: &Write, primary: &str) -> Vec<NewJob> {
        let Some(source) = self.targets.iter().find(|t| t.name == primary) else {
            return Vec::new();
        };
        let harbor = Rules {
            name: UPSTREAM.to_string(),
            policy: TargetPolicy::identity(),
            delete: source.delete,
        };
        let destinations =
            std::iter::once(&harbor).chain(self.targets.iter().filter(|t| t.name != primary));
        jobs_to(destinations, write, JobOrigin::Push, Some(primary))
    }

    /// Queues jobs made by [`Tee::jobs_for`] (a backfill batches them); returns how many were
    /// armed.
    pub(crate) async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<usize, QueueError> {
        self.queue.enqueue(jobs).await
    }

    /// Records a write seen on the wire, on Harbor or (`primary`) on the target serving
    /// clients; returns once it is durable. If it cannot be, the registry has the content but
    /// the mirror would never learn of it: the client is told to retry (503) rather than given a
    /// success regtee cannot keep its promise about.
    pub(crate) async fn record_before_answer(
        &self,
        write: &Write,
        primary: Option<&str>,
    ) -> Result<(), OciError> {
        let jobs = match primary {
            None => self.jobs_for(write, JobOrigin::Push, None),
            Some(target) => self.jobs_from_primary(write, target),
        };
        self.queue.enqueue(jobs).await.map(|_| ()).map_err(|e| {
            tracing::error!(
                error = %e,
                repository = %write.repository(),
                "could not record a completed push for mirroring; the client was told to retry. Check the state directory's disk, or the queue database the error names"
            );
            OciError::unavailable(
                "the registry accepted the push but regtee could not record it for mirroring; retry the push",
            )
        })
    }

    /// Records writes from any origin in one transaction; returns how many jobs were armed.
    pub(crate) async fn record_all(
        &self,
        writes: &[Write],
        origin: JobOrigin,
        only: Option<&str>,
    ) -> Result<usize, QueueError> {
        let jobs = writes
            .iter()
            .flat_map(|w| self.jobs_for(w, origin, only))
            .collect();
        self.queue.enqueue(jobs).await
    }
}

/// The jobs `write` creates for each of `destinations` whose filters take it, copying from
/// `source` (a target's name; `None`: Harbor).
fn jobs_to<'a>(
    destinations: impl Iterator<Item = &'a Rules>,
    write: &Write,
    origin: JobOrigin,
    source: Option<&str>,
) -> Vec<NewJob> {
    let repository = write.repository();
    destinations
        .filter(|t| t.policy.wants_repository(repository.as_str()))
        .filter_map(|t| {
            let job = |kind, tag: Option<&Tag>, digest: Option<&Digest>, from| NewJob {
                target: t.name.clone(),
                kind,
                repository: repository.clone(),
                tag: tag.cloned(),
                digest: digest.cloned(),
                mount_from: from,
                origin,
                source: source.map(str::to_string),
            };
            match write {
                // With a tag filter the blob may belong to an image this target never gets; its
                // manifest job copies the blobs it needs instead. From a primary target the
                // manifest's job carries its blobs too.
                Write::Blob { .. } if !t.policy.takes_every_tag() || source.is_some() => None,
                Write::Blob {
                    digest,
                    mounted_from,
                    ..
                } => Some(job(JobKind::Blob, None, Some(digest), mounted_from.clone())),
                Write::Manifest { tag, digest, .. } => {
                    if tag
                        .as_ref()
                        .is_some_and(|tag| !t.policy.wants_tag(tag.as_str()))
                    {
                        return None;
                    }
                    Some(job(JobKind::Manifest, tag.as_ref(), digest.as_ref(), None))
                }
                Write::ManifestDeleted { reference, .. } => t
                    .delete
                    .then(|| job(JobKind::Delete, reference.tag(), reference.digest(), None)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn tee(targets: &str) -> (Tee, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"https://h\"\n{targets}"
        );
        let config = Config::parse(&text, &dir.path().join("r.toml"), &|_| None).unwrap();
        let queue = Arc::new(Queue::open(dir.path()).unwrap());
        (Tee::new(queue, &config.targets), dir)
    }

    fn names(jobs: &[NewJob]) -> Vec<(&str, JobKind)> {
        jobs.iter().map(|j| (j.target.as_str(), j.kind)).collect()
    }

    #[test]
    fn filters_decide_which_targets_get_jobs() {
        let (tee, _dir) = tee(
            "[[targets]]\nname = \"all\"\nurl = \"https://a\"\ndelete = true\n\
             [[targets]]\nname = \"lib-v\"\nurl = \"https://b\"\ninclude = [\"library/**\"]\ntags = [\"v*\"]\n",
        );
        let manifest = |repo: &str, tag: &str| Write::Manifest {
            repository: repo.parse().unwrap(),
            tag: Some(tag.parse().unwrap()),
            digest: Some(D.parse().unwrap()),
        };
        let jobs = tee.jobs_for(&manifest("library/app", "v1"), JobOrigin::Push, None);
        assert_eq!(
            names(&jobs),
            vec![("all", JobKind::Manifest), ("lib-v", JobKind::Manifest)]
        );
        let jobs = tee.jobs_for(&manifest("library/app", "latest"), JobOrigin::Push, None);
        assert_eq!(names(&jobs), vec![("all", JobKind::Manifest)]);
        let jobs = tee.jobs_for(&manifest("team/app", "v1"), JobOrigin::Push, None);
        assert_eq!(names(&jobs), vec![("all", JobKind::Manifest)]);

        // Blobs go early only where every tag is taken.
        let blob = Write::Blob {
            repository: "library/app".parse().unwrap(),
            digest: D.parse().unwrap(),
            mounted_from: None,
        };
        assert_eq!(
            names(&tee.jobs_for(&blob, JobOrigin::Push, None)),
            vec![("all", JobKind::Blob)]
        );

        // Deletes only where delete = true.
        let delete = Write::ManifestDeleted {
            repository: "library/app".parse().unwrap(),
            reference: D.parse().unwrap(),
        };
        let jobs = tee.jobs_for(&delete, JobOrigin::Push, None);
        assert_eq!(names(&jobs), vec![("all", JobKind::Delete)]);
        assert_eq!(jobs[0].digest.as_ref().map(Digest::as_str), Some(D));

        // A backfill of one target gets that target's jobs only.
        let jobs = tee.jobs_for(
            &manifest("library/app", "v1"),
            JobOrigin::Backfill,
            Some("lib-v"),
        );
        assert_eq!(names(&jobs), vec![("lib-v", JobKind::Manifest)]);
    }
}
