//! What a job does when its target refuses a write for want of a namespace or repository and
//! the target has `create_missing`: have it created (once, whichever worker or replica meets
//! it first), then let the job run again.

use std::time::Duration;

use super::Mirror;
use super::target::Target;
use crate::config::Side;
use crate::metrics::Metrics;
use crate::oci::error_code::ErrorCode;
use crate::provision::{ApiError, ApiErrorKind, Creation, Ensured, Provisioner};
use crate::queue::Job;
use crate::registry::{ErrorKind, RegistryError};

/// How long a worker waits for another replica that is creating the same thing.
const WAIT_FOR_OTHER: Duration = Duration::from_secs(60);

/// Whether the target's refusal may mean a missing namespace or repository. Registries say it
/// differently: ECR `404 NAME_UNKNOWN`; Harbor (and TCR, which is Harbor) `401 UNAUTHORIZED`
/// "unauthorized to access repository" for a project that does not exist; others `DENIED`.
/// The management API then decides: only what it says is absent is created.
pub(super) fn may_be_missing(e: &RegistryError) -> bool {
    e.side == Side::Target
        && match &e.kind {
            ErrorKind::NotFound { code, .. } => *code == Some(ErrorCode::NameUnknown),
            ErrorKind::Denied(_) | ErrorKind::Unauthorized(_) => true,
            _ => false,
        }
}

impl Mirror {
    /// Has what `job` needs on `target` created; `Ok` means the job may run again. One process
    /// at a time asks the API for one creation (per-key locks here, the queue's turns across
    /// replicas); the others wait, then find it known.
    pub(super) async fn create_missing(
        &self,
        target: &Target,
        provisioner: &Provisioner,
        job: &Job,
    ) -> Result<Ensured, ApiError> {
        let repository = target.config.policy.target_repository(&job.repository);
        let creation = provisioner.creation_for(&repository);
        let key = format!("create {creation} on {}", target.name());
        let deadline = tokio::time::Instant::now() + WAIT_FOR_OTHER;
        loop {
            let held = self.create_locks.lock(key.clone()).await;
            let turn = self.queue.alone(&key, provisioner.ensure(&creation)).await;
            drop(held);
            let outcome = match turn {
                Ok(Some(outcome)) => outcome,
                // The queue cannot say who has the turn: the API's own answer ("exists")
                // still keeps a second creation from happening.
                Err(_) => provisioner.ensure(&creation).await,
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Ok(None) => {
                    return Err(ApiError {
                        provider: provisioner.provider().as_str(),
                        operation: format!("create {creation}"),
                        kind: ApiErrorKind::Timeout,
                    });
                }
            };
            if let Ok(Ensured::Created) = outcome {
                created(&self.metrics, target, provisioner, &creation, job);
            }
            return outcome;
        }
    }
}

/// One log line and one count per creation.
fn created(metrics: &Metrics, target: &Target, provisioner: &Provisioner, c: &Creation, job: &Job) {
    metrics.count_creation(target.name(), c);
    tracing::info!(
        target = target.name(),
        job = job.id,
        provider = provisioner.provider().as_str(),
        "created {c} on {} through its API (create_missing); the job runs again",
        target.name()
    );
}
