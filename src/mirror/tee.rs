//! Turns content Harbor accepted into durable jobs, one per target that wants it.
//!
//! The request path, webhooks and backfills all describe what happened as a [`Write`]; this is
//! the one place that applies each target's filters and decides which jobs that write creates.

use std::sync::Arc;

use crate::config::TargetConfig;
use crate::mirror::queue::{JobKind, JobOrigin, NewJob, Queue, QueueError};
use crate::mirror::target::TargetPolicy;
use crate::oci::digest::Digest;
use crate::oci::names::Tag;
use crate::request::route::Write;

/// One target's routing, as far as creating jobs is concerned.
#[derive(Clone, Debug)]
struct Route {
    name: String,
    policy: TargetPolicy,
    delete: bool,
}

/// Records writes as jobs in the durable queue.
pub struct Tee {
    queue: Arc<Queue>,
    targets: Vec<Route>,
}

impl Tee {
    /// A tee for these targets.
    pub fn new(queue: Arc<Queue>, targets: &[TargetConfig]) -> Tee {
        Tee {
            queue,
            targets: targets
                .iter()
                .map(|t| Route {
                    name: t.endpoint.name.clone(),
                    policy: t.policy.clone(),
                    delete: t.delete,
                })
                .collect(),
        }
    }

    /// The jobs a write creates: for each target whose filters take it.
    pub fn jobs_for(&self, write: &Write, origin: JobOrigin) -> Vec<NewJob> {
        let repository = write.repository();
        self.targets
            .iter()
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
                };
                match write {
                    // With a tag filter the blob may belong to an image this target never
                    // gets; its manifest job copies the blobs it needs instead.
                    Write::Blob { .. } if !t.policy.takes_every_tag() => None,
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

    /// Records a write seen on the wire; returns once it is durable.
    pub async fn record(&self, write: &Write) -> Result<(), QueueError> {
        self.record_from(write, JobOrigin::Push).await.map(|_| ())
    }

    /// Records a write from any origin; returns how many jobs were armed.
    pub async fn record_from(&self, write: &Write, origin: JobOrigin) -> Result<usize, QueueError> {
        let jobs = self.jobs_for(write, origin);
        self.queue.enqueue(jobs).await
    }
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
        let jobs = tee.jobs_for(&manifest("library/app", "v1"), JobOrigin::Push);
        assert_eq!(
            names(&jobs),
            vec![("all", JobKind::Manifest), ("lib-v", JobKind::Manifest)]
        );
        let jobs = tee.jobs_for(&manifest("library/app", "latest"), JobOrigin::Push);
        assert_eq!(names(&jobs), vec![("all", JobKind::Manifest)]);
        let jobs = tee.jobs_for(&manifest("team/app", "v1"), JobOrigin::Push);
        assert_eq!(names(&jobs), vec![("all", JobKind::Manifest)]);

        // Blobs go early only where every tag is taken.
        let blob = Write::Blob {
            repository: "library/app".parse().unwrap(),
            digest: D.parse().unwrap(),
            mounted_from: None,
        };
        assert_eq!(
            names(&tee.jobs_for(&blob, JobOrigin::Push)),
            vec![("all", JobKind::Blob)]
        );

        // Deletes only where delete = true.
        let delete = Write::ManifestDeleted {
            repository: "library/app".parse().unwrap(),
            reference: D.parse().unwrap(),
        };
        let jobs = tee.jobs_for(&delete, JobOrigin::Push);
        assert_eq!(names(&jobs), vec![("all", JobKind::Delete)]);
        assert_eq!(jobs[0].digest.as_ref().map(Digest::as_str), Some(D));
    }
}
