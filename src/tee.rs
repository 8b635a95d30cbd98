//! Turns content Harbor accepted into durable jobs, one per target that wants it.
//!
//! The request path, webhooks and backfills all describe what happened as a [`Write`]; this is
//! the one place that applies each target's filters and decides which jobs that write creates.

use std::sync::Arc;

use crate::config::TargetConfig;
use crate::queue::{JobKind, JobOrigin, NewJob, Queue, QueueError};
use crate::route::Write;
use crate::target::TargetPolicy;

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
            .filter(|t| t.policy.wants_repository(repository))
            .filter_map(|t| {
                let job = |kind, tag: Option<&String>, digest: Option<String>, from| NewJob {
                    target: t.name.clone(),
                    kind,
                    repository: repository.to_string(),
                    tag: tag.cloned(),
                    digest,
                    mount_from: from,
                    origin,
                };
                match write {
                    Write::Blob {
                        digest,
                        mounted_from,
                        ..
                    } => Some(job(
                        JobKind::Blob,
                        None,
                        Some(digest.to_string()),
                        mounted_from.clone(),
                    )),
                    Write::Manifest { tag, digest, .. } => {
                        if tag.as_ref().is_some_and(|tag| !t.policy.wants_tag(tag)) {
                            return None;
                        }
                        Some(job(
                            JobKind::Manifest,
                            tag.as_ref(),
                            digest.as_ref().map(ToString::to_string),
                            None,
                        ))
                    }
                    Write::ManifestDeleted { reference, .. } => {
                        if !t.delete {
                            return None;
                        }
                        let (tag, digest) = if crate::digest::Digest::is_digest(reference) {
                            (None, Some(reference.clone()))
                        } else {
                            (Some(reference), None)
                        };
                        Some(job(JobKind::Delete, tag, digest, None))
                    }
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
