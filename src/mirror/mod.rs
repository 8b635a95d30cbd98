//! The mirror path: workers that claim jobs and copy content to targets, in dependency order.
//!
//! Completed writes become jobs in the tee (`tee`), durably (in `crate::queue`); per target,
//! `concurrency` workers (`worker`) claim them and copy them (`copy`), under per-blob and per-tag
//! locks (`locks`), each target by its own rules and client (`target`). Each target has its own
//! workers, so a target that is down delays only its own jobs.

mod copy;
mod locks;
pub(crate) mod target;
pub(crate) mod tee;
mod worker;

use std::sync::Arc;

use crate::config::TargetConfig;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::registry::{RegistryClient, RegistryError};
use locks::KeyedLocks;
use target::Target;

/// The mirror: targets, the queue they work from, and Harbor to read from.
pub(crate) struct Mirror {
    queue: Arc<Queue>,
    upstream: Arc<RegistryClient>,
    targets: Vec<Arc<Target>>,
    metrics: Arc<Metrics>,
    blob_locks: KeyedLocks,
    tag_locks: KeyedLocks,
}

impl Mirror {
    /// Builds clients for every target.
    pub(crate) fn new(
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
        })
    }

    /// The targets, in configuration order.
    pub(crate) fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }
}
