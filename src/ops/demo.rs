//! `regtee demo`: Harbor and a cloud registry on this machine, regtee between them.
//!
//! A first run should show the point of regtee without a Harbor at hand: two real distribution
//! registries (Debian's `docker-registry`) play Harbor and the cloud, an image is pushed through
//! regtee, and it appears on the cloud side with the same digest. [`LocalRegistry`] is also what
//! the integration tests and benchmarks start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{ClientTls, Endpoint};
use crate::oci::digest::Digest;
use crate::oci::manifest::OCI_MANIFEST;
use crate::origin::Origin;
use crate::registry::{RegistryClient, RegistryError};

/// Something the demo (or a local registry) could not do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DemoError(pub String);

impl From<RegistryError> for DemoError {
    fn from(e: RegistryError) -> Self {
        DemoError(e.to_string())
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
    child: Child,
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
    /// Starts a registry storing its data under `dir`, and waits until it answers.
    pub async fn start(dir: &Path, options: RegistryOptions) -> Result<LocalRegistry, DemoError> {
        let port = match options.port {
            Some(p) => p,
            None => free_port().map_err(|e| DemoError(format!("no free port: {e}")))?,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        std::fs::create_dir_all(dir.join("data"))
            .map_err(|e| DemoError(format!("cannot create {}: {e}", dir.display())))?;
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
        std::fs::write(&config, yaml)
            .map_err(|e| DemoError(format!("cannot write {}: {e}", config.display())))?;
        let log = std::fs::File::create(dir.join("registry.log"))
            .map_err(|e| DemoError(format!("cannot create registry log: {e}")))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| DemoError(e.to_string()))?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                DemoError(format!(
                    "cannot start docker-registry ({e}): install it with `apt-get install docker-registry`"
                ))
            })?;
        let mut registry = LocalRegistry {
            addr,
            child,
            dir: dir.to_path_buf(),
            options,
        };
        registry.wait_ready().await?;
        Ok(registry)
    }

    async fn wait_ready(&mut self) -> Result<(), DemoError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
                return Err(DemoError(format!(
                    "docker-registry exited ({status}): {}",
                    log.lines().last().unwrap_or("")
                )));
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DemoError(format!(
                    "docker-registry did not listen on {} within 20s",
                    self.addr
                )));
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<(), DemoError> {
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
    for blob in std::iter::once(&image.config).chain(image.layers.iter()) {
        let digest = Digest::sha256_of(blob);
        client
            .upload_blob(
                repository,
                &digest,
                Some(blob.len() as u64),
                crate::body::full(blob.clone()),
                crate::registry::Chunking::WHOLE,
            )
            .await?;
    }
    client
        .put_manifest(repository, tag, OCI_MANIFEST, image.manifest.clone())
        .await?;
    Ok(())
}

/// A client for a registry without credentials.
pub fn anonymous_client(name: &str, url: &str) -> Result<RegistryClient, DemoError> {
    let origin = Origin::parse(url).map_err(|e| DemoError(e.to_string()))?;
    Ok(RegistryClient::new(&Endpoint {
        name: name.to_string(),
        side: crate::registry::Side::Target,
        origin,
        tls: ClientTls::default(),
        credentials: None,
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
        pool_idle_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(120),
    })?)
}

/// Runs the demo; when `keep_running`, regtee keeps serving until Ctrl-C.
pub async fn run(keep_running: bool) -> Result<(), DemoError> {
    crate::tls::install_crypto_provider();
    let work = std::env::temp_dir().join(format!("regtee-demo-{}", std::process::id()));
    println!(
        "regtee demo: two local registries play Harbor and the cloud; regtee sits between them.\n"
    );
    let harbor = LocalRegistry::start(&work.join("harbor"), RegistryOptions::default()).await?;
    let cloud = LocalRegistry::start(&work.join("cloud"), RegistryOptions::default()).await?;
    println!("  \"Harbor\"  {}   (docker-registry)", harbor.url());
    println!("  \"cloud\"   {}   (docker-registry)", cloud.url());
    let proxy_port = free_port().map_err(|e| DemoError(e.to_string()))?;
    let admin_port = free_port().map_err(|e| DemoError(e.to_string()))?;
    let config_text = format!(
        r#"[proxy]
listen = "127.0.0.1:{proxy_port}"
[upstream]
url = "{harbor}"
[state]
dir = "{state}"
[admin]
listen = "127.0.0.1:{admin_port}"
[[targets]]
name = "cloud"
url = "{cloud}"
namespaces = {{ library = "mirror" }}
retry_max = "2s"
"#,
        harbor = harbor.url(),
        cloud = cloud.url(),
        state = work.join("state").display(),
    );
    let config_path = work.join("regtee.toml");
    std::fs::write(&config_path, &config_text).map_err(|e| DemoError(e.to_string()))?;
    let config = crate::config::Config::parse(&config_text, &config_path, &|_| None)
        .map_err(|e| DemoError(e.to_string()))?;
    let instance = crate::Instance::start(config)
        .await
        .map_err(|e| DemoError(e.to_string()))?;
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    println!(
        "  regtee    {proxy_url}   (admin: http://127.0.0.1:{admin_port}, config: {})\n",
        config_path.display()
    );

    let image = sample_image(&[512 * 1024, 2 * 1024 * 1024, 64 * 1024]);
    println!("1. pushing library/hello:1.0 (3 random layers) through regtee ...");
    let through_regtee = anonymous_client("regtee", &proxy_url)?;
    push_image(&through_regtee, "library/hello", "1.0", &image).await?;
    println!("   pushed: {}", image.digest);

    println!("2. waiting for it on the cloud side as mirror/hello:1.0 ...");
    let cloud_client = anonymous_client("cloud", &cloud.url())?;
    let started = Instant::now();
    let arrived = loop {
        if let Some(head) = cloud_client.manifest_head("mirror/hello", "1.0").await? {
            break head;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(DemoError(
                "the image did not reach the cloud registry within 60s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "   arrived after {:?}: {}  ({})",
        started.elapsed(),
        arrived.digest,
        if arrived.digest == image.digest {
            "same digest"
        } else {
            "DIFFERENT DIGEST"
        }
    );
    let harbor_client = anonymous_client("harbor", &harbor.url())?;
    let in_harbor = harbor_client.manifest_head("library/hello", "1.0").await?;
    println!(
        "   in Harbor: {}\n",
        in_harbor.map(|h| h.digest.to_string()).unwrap_or_default()
    );

    println!("To point regtee at your own Harbor:");
    println!("  cp regtee.example.toml regtee.toml   # set [upstream] url and your [[targets]]");
    println!("  cargo run --release -- check --config regtee.toml");
    println!("  cargo run --release -- serve --config regtee.toml\n");
    if keep_running {
        println!("regtee keeps running. Try it with any client, for example:");
        println!(
            "  skopeo copy --dest-tls-verify=false docker://docker.io/library/alpine:latest docker://127.0.0.1:{proxy_port}/library/alpine:latest"
        );
        println!("  curl -s http://127.0.0.1:{admin_port}/api/v1/status");
        println!("Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    instance.shutdown().await;
    drop((harbor, cloud));
    let _ = std::fs::remove_dir_all(&work);
    if arrived.digest != image.digest {
        return Err(DemoError("digests differ".into()));
    }
    Ok(())
}
