//! Real registries on this machine: Debian's `docker-registry` (CNCF distribution) started on a
//! free loopback port, with token auth, Basic auth or notifications as asked, and sample images
//! to push. The demo, the integration tests and the benchmarks all start their registries here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::local_process::LocalProcess;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{ClientTls, Endpoint};
use crate::oci::digest::Digest;
use crate::oci::manifest::OCI_MANIFEST;
use crate::origin::{Origin, OriginError};
use crate::registry::{RegistryClient, RegistryError};

/// Why a local registry did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A file or directory for it could not be written.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The program could not run.
    #[error("cannot start docker-registry: install it with `apt-get install docker-registry`")]
    Spawn(#[source] std::io::Error),
    /// It ran and stopped.
    #[error("docker-registry exited ({status}): {last_line}")]
    Exited {
        /// How it ended.
        status: std::process::ExitStatus,
        /// The last line it logged.
        last_line: String,
    },
    /// It did not listen in time.
    #[error("docker-registry did not listen on {0} within 20s")]
    NotListening(SocketAddr),
}

/// Why [`anonymous_client`] could not make a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not a registry URL.
    #[error(transparent)]
    Url(#[from] OriginError),
    /// Its TLS configuration.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LaunchError + 'a {
    move |source| LaunchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Token authentication for a local registry, as distribution's `auth.token` section.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    /// Where clients get tokens.
    pub realm: String,
    /// The `service` (and JWT audience).
    pub service: String,
    /// The JWT issuer.
    pub issuer: String,
    /// PEM file of certificates allowed to sign tokens.
    pub root_cert_bundle: PathBuf,
}

/// A notification endpoint for a local registry.
#[derive(Clone, Debug)]
pub struct Notification {
    /// Where events are POSTed.
    pub url: String,
    /// The `Authorization` header value sent with them.
    pub authorization: String,
}

/// How to start a local registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Token auth; anonymous access when None.
    pub token_auth: Option<TokenAuth>,
    /// Send events here.
    pub notification: Option<Notification>,
    /// Basic auth from this htpasswd file (bcrypt), as ECR- or ACR-style registries answer.
    pub htpasswd: Option<PathBuf>,
    /// Listen on this port (a free one when None).
    pub port: Option<u16>,
}

/// A `docker-registry` process on a loopback port, killed on drop.
pub struct LocalRegistry {
    addr: SocketAddr,
    child: LocalProcess,
    dir: PathBuf,
    options: RegistryOptions,
}

/// A free loopback port (bound and released; good enough for local processes).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalRegistry {
    /// The registry process's id (for benchmarks that read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a registry storing its data under `dir`, and waits until it answers.
    pub async fn start(dir: &Path, options: RegistryOptions) -> Result<LocalRegistry, LaunchError> {
        let port = match options.port {
            Some(p) => p,
            None => free_port().map_err(io("no free port for", dir))?,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        std::fs::create_dir_all(dir.join("data")).map_err(io("cannot create", dir))?;
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: regtee-local-registry\n",
            dir.join("data").display()
        );
        if let Some(auth) = &options.token_auth {
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                auth.realm,
                auth.service,
                auth.issuer,
                auth.root_cert_bundle.display()
            ));
        }
        if let Some(file) = &options.htpasswd {
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                file.display()
            ));
        }
        if let Some(n) = &options.notification {
            yaml.push_str(&format!(
                "notifications:\n  endpoints:\n    - name: regtee\n      url: {}\n      headers:\n        Authorization: [\"{}\"]\n      timeout: 2s\n      threshold: 3\n      backoff: 1s\n",
                n.url, n.authorization
            ));
        }
        let config = dir.join("config.yml");
        std::fs::write(&config, yaml).map_err(io("cannot write", &config))?;
        let log = std::fs::File::create(dir.join("registry.log"))
            .map_err(io("cannot create the log in", dir))?;
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(io("cannot create the log in", dir))?,
            )
            .stderr(log);
        let child = LocalProcess::spawn(command).map_err(LaunchError::Spawn)?;
        let mut registry = LocalRegistry {
            addr,
            child,
            dir: dir.to_path_buf(),
            options,
        };
        registry.wait_ready().await?;
        Ok(registry)
    }

    async fn wait_ready(&mut self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
                return Err(LaunchError::Exited {
                    status,
                    last_line: log.lines().last().unwrap_or("").to_string(),
                });
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LaunchError::NotListening(self.addr));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where it keeps its data (distribution's filesystem storage root).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the process (its data stays).
    pub fn stop(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<(), LaunchError> {
        self.stop();
        let mut options = self.options.clone();
        options.port = Some(self.addr.port());
        let fresh = LocalRegistry::start(&self.dir, options).await?;
        *self = fresh;
        Ok(())
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An image made of random layers, ready to push.
#[derive(Clone, Debug)]
pub struct SampleImage {
    /// The config blob.
    pub config: Bytes,
    /// Layer blobs.
    pub layers: Vec<Bytes>,
    /// The OCI manifest bytes.
    pub manifest: Bytes,
    /// The manifest digest.
    pub digest: Digest,
}

/// Builds an OCI image with random layers of the given sizes.
pub fn sample_image(layer_sizes: &[usize]) -> SampleImage {
    let layers: Vec<Bytes> = layer_sizes
        .iter()
        .map(|&n| {
            let mut v = vec![0u8; n];
            rand::fill(&mut v[..]);
            Bytes::from(v)
        })
        .collect();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| Digest::sha256_of(l).to_string())
        .collect();
    let config = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Labels": {"made-by": "regtee demo"}},
        }))
        .expect("json"),
    );
    let descriptor = |media_type: &str, b: &Bytes| serde_json::json!({"mediaType": media_type, "digest": Digest::sha256_of(b).to_string(), "size": b.len()});
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        }))
        .expect("json"),
    );
    let digest = Digest::sha256_of(&manifest);
    SampleImage {
        config,
        layers,
        manifest,
        digest,
    }
}

/// Pushes an image with regtee's own client (blobs first, then the manifest under `tag`).
pub async fn push_image(
    client: &RegistryClient,
    repository: &str,
    tag: &str,
    image: &SampleImage,
) -> Result<(), RegistryError> {
    push_blobs(client, repository, image).await?;
    client
        .put_manifest(repository, tag, OCI_MANIFEST, image.manifest.clone())
        .await?;
    Ok(())
}

/// Uploads an image's config and layers, each in one request.
pub async fn push_blobs(
    client: &RegistryClient,
    repository: &str,
    image: &SampleImage,
) -> Result<(), RegistryError> {
    for blob in std::iter::once(&image.config).chain(image.layers.iter()) {
        let digest = Digest::sha256_of(blob);
        client
            .upload_blob(
                repository,
                &digest,
                crate::registry::Upload::whole(blob.clone()),
            )
            .await?;
    }
    Ok(())
}

/// A client for a registry without credentials, at `url` (`http(s)://host:port`).
pub fn anonymous_client(name: &str, url: &str) -> Result<RegistryClient, ClientError> {
    let origin = Origin::parse(url)?;
    Ok(RegistryClient::new(&Endpoint {
        name: name.to_string(),
        side: crate::config::Side::Target,
        origin,
        tls: ClientTls::default(),
        login: crate::config::Login::Anonymous,
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
        pool_idle_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(120),
        limits: Default::default(),
    })?)
}
