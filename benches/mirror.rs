//! Mirror lag: from the 201 of the manifest PUT a client sees until the manifest is pullable on
//! the target, for an image of 20 x 5 MiB layers pushed through regtee; compared in the same run
//! with `skopeo copy` of the same image from Harbor to the target after the fact.
//!
//! Run: `cargo bench --bench mirror`

mod common;

use std::time::{Duration, Instant};

use common::*;
use regtee::local_registry::{
    LocalRegistry, RegistryOptions, anonymous_client, free_port, sample_image,
};

#[tokio::main]
async fn main() {
    regtee::tls::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let harbor = LocalRegistry::start(&work.path().join("harbor"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let cloud = LocalRegistry::start(&work.path().join("cloud"), RegistryOptions::default())
        .await
        .unwrap();
    let port = free_port().unwrap();
    let config = work.path().join("regtee.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n[[targets]]\nname = \"cloud\"\nurl = \"{}\"\nconcurrency = 4\n",
            harbor.url(),
            work.path().join("state").display(),
            cloud.url()
        ),
    )
    .unwrap();
    let _regtee = RegteeProcess::start(&config, &work.path().join("regtee.log"));
    wait_listening(&format!("127.0.0.1:{port}")).await;
    let through = anonymous_client("regtee", &format!("http://127.0.0.1:{port}")).unwrap();
    let cloud_client = anonymous_client("cloud", &cloud.url()).unwrap();

    println!(
        "regtee mirror bench: image of 20 x 5 MiB layers, Harbor and cloud are local docker-registry instances\n"
    );
    let image = sample_image(&[5 * 1024 * 1024; 20]);
    let push_started = Instant::now();
    regtee::local_registry::push_image(&through, "library/big", "1.0", &image)
        .await
        .unwrap();
    let acknowledged = Instant::now();
    let push_time = acknowledged - push_started;
    loop {
        if let Some(h) = cloud_client
            .manifest_head("library/big", "1.0")
            .await
            .unwrap()
        {
            assert_eq!(h.digest, image.digest);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lag = acknowledged.elapsed();

    let started = Instant::now();
    let out = std::process::Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{}/library/big:1.0", harbor.addr()))
        .arg(format!("docker://{}/after/big:1.0", cloud.addr()))
        .output()
        .expect("skopeo is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let skopeo_time = started.elapsed();

    println!(
        "push through regtee (client's view):          {:>8.0} ms",
        push_time.as_secs_f64() * 1000.0
    );
    println!(
        "mirror lag (manifest 201 -> pullable on cloud): {:>6.0} ms",
        lag.as_secs_f64() * 1000.0
    );
    println!(
        "skopeo copy Harbor -> cloud after the fact:    {:>7.0} ms",
        skopeo_time.as_secs_f64() * 1000.0
    );
    println!(
        "\nlag / skopeo copy: {:.3}",
        lag.as_secs_f64() / skopeo_time.as_secs_f64()
    );
}
