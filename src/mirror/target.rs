//! A target: its configuration (with its rules, `config::TargetPolicy`), the client that talks
//! to it, and how many of its workers are alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::TargetConfig;
use crate::provision::Provisioner;
use crate::registry::{ErrorKind, RegistryClient, RegistryError};

/// One target: its rules and its client.
pub(crate) struct Target {
    /// As configured.
    pub config: TargetConfig,
    /// Talks to it.
    pub client: RegistryClient,
    /// Creates what it lacks through its cloud's API (`create_missing`).
    pub provisioner: Option<Provisioner>,
    /// Workers of this target running now (readiness: all of them should be).
    workers_alive: AtomicUsize,
}

/// Counts a worker of a target as alive from its spawning until it ends, however it ends.
pub(crate) struct Alive(pub(crate) Arc<Target>);

impl Alive {
    pub(crate) fn enter(target: Arc<Target>) -> Alive {
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
    pub(crate) fn all(configs: &[TargetConfig]) -> Result<Vec<Arc<Target>>, RegistryError> {
        configs
            .iter()
            .map(|config| Target::one(config.clone()))
            .collect()
    }

    /// A client for one registry as a destination.
    pub(crate) fn one(config: TargetConfig) -> Result<Arc<Target>, RegistryError> {
        let provisioner = Provisioner::of(&config).map_err(|e| RegistryError {
            registry: config.endpoint.name.clone(),
            side: config.endpoint.side,
            operation: "configure TLS toward the cloud API (api_ca_file)".into(),
            kind: ErrorKind::Unreachable(e.to_string()),
        })?;
        Ok(Arc::new(Target {
            client: RegistryClient::new(&config.endpoint)?,
            provisioner,
            config,
            workers_alive: AtomicUsize::new(0),
        }))
    }

    /// The target's name.
    pub(crate) fn name(&self) -> &str {
        &self.config.endpoint.name
    }

    /// `Some((alive, configured))` when fewer workers run than are configured.
    pub(crate) fn workers_missing(&self) -> Option<(usize, usize)> {
        let alive = self.workers_alive.load(Ordering::Relaxed);
        (alive < self.config.concurrency).then_some((alive, self.config.concurrency))
    }
}
