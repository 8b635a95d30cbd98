//! `regtee demo`: Harbor and a cloud registry on this machine, regtee between them.
//!
//! A first run should show the point of regtee without a Harbor at hand: two real distribution
//! registries (Debian's `docker-registry`, started by [`crate::local_registry`]) play Harbor and
//! the cloud, an image is pushed through regtee, and it appears on the cloud side with the same
//! digest. Then it is pulled twice through regtee: the second pull comes from regtee's cache.

use std::time::{Duration, Instant};

use crate::local_registry::{
    ClientError, LaunchError, LocalRegistry, RegistryOptions, anonymous_client, free_port,
    push_image, sample_image,
};
use crate::registry::RegistryError;

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A registry did not start.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// A registry refused something.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A client could not be made.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The demo's configuration (a bug if it happens).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// regtee did not start.
    #[error(transparent)]
    Start(#[from] crate::StartError),
    /// A file or port.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The image did not reach the cloud registry.
    #[error("the image did not reach the cloud registry within 60s")]
    NeverArrived,
    /// It arrived with another digest.
    #[error("the digests differ")]
    DigestsDiffer,
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
    let proxy_port = free_port()?;
    let admin_port = free_port()?;
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
[cache]
max_size = "1GiB"
"#,
        harbor = harbor.url(),
        cloud = cloud.url(),
        state = work.join("state").display(),
    );
    let config_path = work.join("regtee.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = crate::config::Config::parse(&config_text, &config_path, &|_| None)?;
    let instance = crate::Instance::start(config).await?;
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
            return Err(DemoError::NeverArrived);
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

    println!("3. pulling library/hello:1.0 through regtee, twice ...");
    for round in ["first ", "second"] {
        let started = Instant::now();
        let bytes = pull_image(&through_regtee, "library/hello", "1.0", &image).await?;
        println!("   {round} pull: {bytes} bytes in {:?}", started.elapsed());
    }
    println!("4. regtee status (the second pull read nothing from Harbor: see the cache's hits):");
    let config = crate::config::Config::parse(&config_text, &config_path, &|_| None)?;
    if let Err(e) = crate::ops::cli::status(&config, false).await {
        println!("   (status unavailable: {e})");
    }
    println!();

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
        return Err(DemoError::DigestsDiffer);
    }
    Ok(())
}

/// Pulls `image` (pushed as `repository:tag`) with regtee's own client: the manifest by tag,
/// every blob by digest, each checked; returns the bytes read.
async fn pull_image(
    client: &crate::registry::RegistryClient,
    repository: &str,
    tag: &str,
    image: &crate::local_registry::SampleImage,
) -> Result<u64, DemoError> {
    use http_body_util::BodyExt as _;
    let manifest = client
        .get_manifest(repository, tag)
        .await?
        .ok_or(DemoError::DigestsDiffer)?;
    if manifest.digest != image.digest {
        return Err(DemoError::DigestsDiffer);
    }
    let mut bytes = manifest.bytes.len() as u64;
    for blob in image.layers.iter().chain([&image.config]) {
        let digest = crate::oci::digest::Digest::sha256_of(blob);
        let stream = client.get_blob(repository, &digest).await?;
        let got = stream
            .body
            .collect()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .to_bytes();
        if got != *blob {
            return Err(DemoError::DigestsDiffer);
        }
        bytes += got.len() as u64;
    }
    Ok(bytes)
}
