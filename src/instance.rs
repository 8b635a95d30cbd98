//! A running regtee: everything wired from a [`Config`], and the way to stop it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::request::server::ConnectionLimits;
use crate::{cache, metrics, mirror, ops, queue, registry, request, tls, token_check};

/// Why regtee could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("{0}")]
    Bind(std::io::Error),
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The job queue cannot be opened.
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    /// Another regtee holds the state directory.
    #[error(transparent)]
    Lock(#[from] queue::state_lock::LockError),
    /// A target's client could not be built.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// The proxy toward Harbor could not be built.
    #[error(transparent)]
    Proxy(#[from] request::upstream::UpstreamError),
    /// The cache directory is unusable.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// `[upstream] token_certificate` cannot be read.
    #[error(transparent)]
    TokenTrust(#[from] token_check::TokenTrustError),
}

/// A running regtee: its bound addresses and the handles that stop it.
pub struct Instance {
    /// The plain HTTP proxy listener, if configured.
    pub http_addr: Option<SocketAddr>,
    /// The HTTPS proxy listener, if configured.
    pub https_addr: Option<SocketAddr>,
    /// The admin listener, if configured.
    pub admin_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    _lock: queue::state_lock::StateLock,
}

/// The listeners, bound before anything starts (a port in use fails the start, not a task).
struct Listeners {
    http: Option<tokio::net::TcpListener>,
    https: Option<tokio::net::TcpListener>,
    admin: Option<tokio::net::TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let tls = match &config.proxy.tls {
            Some(t) => Some(request::server::acceptor(tls::server_config(
                &t.cert, &t.key,
            )?)),
            None => None,
        };
        let bind = |addr: Option<SocketAddr>| async move {
            match addr {
                Some(addr) => request::server::bind(addr)
                    .await
                    .map(Some)
                    .map_err(StartError::Bind),
                None => Ok(None),
            }
        };
        Ok(Listeners {
            http: bind(config.proxy.listen).await?,
            https: bind(config.proxy.tls.as_ref().map(|t| t.listen)).await?,
            admin: bind(config.admin.as_ref().map(|a| a.listen)).await?,
            tls,
        })
    }

    fn addresses(&self) -> [Option<SocketAddr>; 3] {
        let local =
            |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        [local(&self.http), local(&self.https), local(&self.admin)]
    }
}

/// Opens the queue the config names and takes back what a previous run left running.
async fn open_queue(config: &Config) -> Result<Arc<queue::Queue>, StartError> {
    let queue = Arc::new(queue::Queue::open_state(&config.state).await?);
    if let Some(replica) = queue.replica() {
        tracing::info!(
            replica,
            "job queue in PostgreSQL, shared with any other replica"
        );
    }
    let recovered = queue.recover_interrupted().await?;
    if recovered > 0 {
        tracing::info!(
            jobs = recovered,
            "resuming jobs interrupted by the previous shutdown"
        );
    }
    Ok(queue)
}

/// The parts that serve: the proxy (which tees completed pushes), the mirror and what the
/// operator's side drives.
struct Parts {
    proxy: Arc<request::proxy::Proxy>,
    mirror: Arc<mirror::Mirror>,
    backfiller: Arc<ops::backfill::Backfiller>,
    metrics: Arc<metrics::Metrics>,
    cache: Option<cache::Cache>,
    primary: tokio::sync::watch::Receiver<queue::PrimaryRecord>,
}

impl Parts {
    fn build(
        config: &Config,
        queue: &Arc<queue::Queue>,
        tasks: &TaskTracker,
        primary: tokio::sync::watch::Receiver<queue::PrimaryRecord>,
    ) -> Result<Parts, StartError> {
        let metrics = Arc::new(metrics::Metrics::new());
        let tee = Arc::new(mirror::tee::Tee::new(queue.clone(), &config.targets));
        let upstream = Arc::new(registry::RegistryClient::new(&config.upstream.endpoint)?);
        let mirror = Arc::new(mirror::Mirror::new(
            queue.clone(),
            upstream.clone(),
            &config.upstream,
            &config.targets,
            metrics.clone(),
        )?);
        let read_path = match &config.cache {
            Some(settings) => Some(Arc::new(read_path(
                config, settings, &mirror, &metrics, tasks,
            )?)),
            None => None,
        };
        let cache = read_path.as_ref().map(|r| r.cache().clone());
        let primary_path = request::primary::PrimaryPath::new(
            primary.clone(),
            mirror.clone(),
            token_trust(config)?,
            Some(tee.clone()),
        );
        let proxy = Arc::new(request::proxy::Proxy::new(
            &config.proxy,
            &config.upstream,
            Some(tee.clone()),
            Some(metrics.clone()),
            read_path,
            Some(Arc::new(primary_path)),
        )?);
        let backfiller = Arc::new(ops::backfill::Backfiller {
            upstream,
            targets: mirror.targets().to_vec(),
            tee,
        });
        Ok(Parts {
            proxy,
            mirror,
            backfiller,
            metrics,
            cache,
            primary,
        })
    }
}

/// Harbor's token certificate, when configured: clients' tokens checked as Harbor checks them.
fn token_trust(config: &Config) -> Result<Option<token_check::TokenTrust>, StartError> {
    Ok(match &config.upstream.token_trust {
        Some(t) => Some(token_check::TokenTrust::load(
            &t.certificate,
            &t.issuer,
            &t.service,
        )?),
        None => None,
    })
}

/// The pull-through cache and what decides who may read from it.
fn read_path(
    config: &Config,
    settings: &crate::config::CacheConfig,
    mirror: &mirror::Mirror,
    metrics: &Arc<metrics::Metrics>,
    tasks: &TaskTracker,
) -> Result<request::read::ReadPath, StartError> {
    let cache = cache::Cache::open(
        &settings.dir,
        settings.max_size,
        metrics.clone(),
        tasks.clone(),
    )?;
    let trust = token_trust(config)?;
    let stats = cache.stats();
    tracing::info!(
        dir = %settings.dir.display(),
        entries = stats.entries,
        bytes = stats.size_bytes,
        token_check = trust.is_some(),
        "pull-through cache open"
    );
    Ok(request::read::ReadPath::new(
        cache,
        trust,
        settings,
        mirror.targets(),
    ))
}

impl Instance {
    /// Binds every listener, opens the queue and starts the mirror workers. Everything that can
    /// fail (lock, queue, certificates, binds) happens before the first task starts.
    pub async fn start(config: Config) -> Result<Instance, StartError> {
        tls::install_crypto_provider();
        let lock = queue::state_lock::StateLock::acquire(&config.state.dir)?;
        let queue = open_queue(&config).await?;
        let listeners = Listeners::bind(&config).await?;
        let [http_addr, https_addr, admin_addr] = listeners.addresses();
        let tasks = TaskTracker::new();
        let (primary_tx, primary) = tokio::sync::watch::channel(queue.primary().await?);
        let parts = Parts::build(&config, &queue, &tasks, primary)?;
        let cancel = CancellationToken::new();
        queue::spawn_primary_follower(&tasks, &cancel, queue.clone(), primary_tx);
        spawn_all(&config, listeners, parts, queue, &tasks, &cancel);
        tasks.close();
        let shown =
            |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_string(), |a| a.to_string());
        tracing::info!(
            http = %shown(http_addr),
            https = %shown(https_addr),
            admin = %shown(admin_addr),
            upstream = %config.upstream.endpoint.origin,
            targets = config.targets.len(),
            "regtee is serving"
        );
        Ok(Instance {
            http_addr,
            https_addr,
            admin_addr,
            cancel,
            tasks,
            _lock: lock,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, stops workers
    /// (their unfinished jobs stay queued), and returns when everything has ended.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.wait().await;
        tracing::info!("regtee stopped");
    }
}

/// Starts every task on `tasks`, each ending when `cancel` fires: the listeners, the mirror's
/// workers and reconcilers, retention, the lease keeper.
fn spawn_all(
    config: &Config,
    listeners: Listeners,
    parts: Parts,
    queue: Arc<queue::Queue>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    let limits = ConnectionLimits {
        header_read_timeout: config.proxy.header_read_timeout,
        shutdown_grace: config.proxy.shutdown_grace,
        write_stall: config.proxy.body_idle_timeout,
    };
    for (listener, acceptor) in [(listeners.http, None), (listeners.https, listeners.tls)] {
        if let Some(listener) = listener {
            let proxy = parts.proxy.clone();
            tasks.spawn(request::server::serve(
                listener,
                acceptor,
                limits,
                cancel.clone(),
                move |req, conn| proxy.clone().handle(req, conn),
            ));
        }
    }
    parts
        .mirror
        .spawn_workers(tasks, cancel, config.proxy.shutdown_grace);
    parts
        .backfiller
        .spawn_reconcilers(tasks, cancel, &config.targets);
    queue::spawn_retention(tasks, cancel, queue.clone(), config.state.retention);
    queue::spawn_lease_keeper(tasks, cancel, queue.clone());
    if let Some(listener) = listeners.admin {
        let admin = ops::admin::Admin::new(
            config,
            ops::admin::AdminParts {
                queue,
                backfiller: parts.backfiller,
                metrics: parts.metrics,
                cache: parts.cache,
                serving: parts.primary,
            },
            tasks.clone(),
            cancel.clone(),
        );
        tasks.spawn(request::server::serve(
            listener,
            None,
            limits,
            cancel.clone(),
            move |req, _conn| admin.clone().handle(req),
        ));
    }
}

/// Runs regtee until `shutdown` completes, then drains and stops.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let instance = Instance::start(config).await?;
    shutdown.await;
    tracing::info!("shutdown requested: draining in-flight requests");
    instance.shutdown().await;
    Ok(())
}
