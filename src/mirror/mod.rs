//! The mirror path: workers that claim jobs and copy content to targets, in dependency order.
//!
//! Completed writes become jobs in the tee (`tee`), durably (in `crate::queue`); per target,
//! `concurrency` workers (`worker`) claim them and copy them (`copy`), under per-blob and per-tag
//! locks (`locks`), each target by its own rules and client (`target`). Each target has its own
//! workers, so a target that is down delays only its own jobs.

mod copy;
mod create;
mod locks;
pub(crate) mod target;
pub(crate) mod tee;
mod worker;

use std::sync::Arc;

use crate::config::{TargetConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::registry::{RegistryClient, RegistryError};
use locks::KeyedLocks;
use target::Target;

/// Where a job's content is read from: Harbor, or a target that was the primary (where the
/// content lives under the target's names).
#[derive(Clone)]
enum Source {
    Harbor(Arc<RegistryClient>),
    Target(Arc<Target>),
}

impl Source {
    fn client(&self) -> &RegistryClient {
        match self {
            Source::Harbor(client) => client,
            Source::Target(target) => &target.client,
        }
    }

    /// `repository` (Harbor's name) as the source names it.
    fn repository(&self, repository: &str) -> String {
        match self {
            Source::Harbor(_) => repository.to_string(),
            Source::Target(target) => target.config.policy.target_repository(repository),
        }
    }

    /// Says what the source is, in notes: "Harbor" or the target's name.
    fn shown(&self) -> &str {
        match self {
            Source::Harbor(_) => "Harbor",
            Source::Target(target) => target.name(),
        }
    }
}

/// The mirror: targets, the queue they work from, and where to read from.
pub(crate) struct Mirror {
    queue: Arc<Queue>,
    source: Source,
    targets: Vec<Arc<Target>>,
    /// Harbor, as the destination of what is mirrored back from a primary target.
    harbor: Arc<Target>,
    metrics: Arc<Metrics>,
    blob_locks: Arc<KeyedLocks>,
    tag_locks: Arc<KeyedLocks>,
    /// One creation of a missing namespace or repository at a time, per name.
    create_locks: Arc<KeyedLocks>,
}

impl Mirror {
    /// Builds clients for every target, and for Harbor as a destination.
    pub(crate) fn new(
        queue: Arc<Queue>,
        upstream: Arc<RegistryClient>,
        upstream_config: &UpstreamConfig,
        targets: &[TargetConfig],
        metrics: Arc<Metrics>,
    ) -> Result<Mirror, RegistryError> {
        Ok(Mirror {
            queue,
            source: Source::Harbor(upstream),
            targets: Target::all(targets)?,
            harbor: Target::one(upstream_config.as_destination())?,
            metrics,
            blob_locks: Arc::default(),
            tag_locks: Arc::default(),
            create_locks: Arc::default(),
        })
    }

    /// The targets, in configuration order.
    pub(crate) fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// This mirror reading from the target `name` instead (a job written there while it was
    /// the primary); the locks are shared.
    fn reading_from(&self, name: &str) -> Option<Mirror> {
        let target = self.targets.iter().find(|t| t.name() == name)?;
        Some(Mirror {
            queue: self.queue.clone(),
            source: Source::Target(target.clone()),
            targets: self.targets.clone(),
            harbor: self.harbor.clone(),
            metrics: self.metrics.clone(),
            blob_locks: self.blob_locks.clone(),
            tag_locks: self.tag_locks.clone(),
            create_locks: self.create_locks.clone(),
        })
    }
}
