//! The Docker engine through regtee: what `docker` prints and how it exits is the same through
//! either listener as directly against Harbor as deployed, and every push reaches the target.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::docker::{Dockerd, TrustedCa, dockerd, pushed_digest, secure_address};
use crate::support::layout::{Layout, Written};
use crate::support::*;

/// The images every script pushes, as `docker load` archives.
struct Images {
    /// Three layers.
    a: Written,
    /// Two of a's layers and one of its own.
    b: Written,
    /// Pushed three at once.
    c: Vec<Written>,
    archives: Vec<PathBuf>,
}

fn images(work: &Path) -> Images {
    let layout = Layout::new(&work.join("layout"));
    let shared = [layout.tar_layer(900_000), layout.tar_layer(200_000)];
    let a = layout.docker_image(&[
        shared[0].clone(),
        shared[1].clone(),
        layout.tar_layer(40_000),
    ]);
    let b = layout.docker_image(&[
        shared[0].clone(),
        shared[1].clone(),
        layout.tar_layer(60_000),
    ]);
    let c: Vec<Written> = (0..3)
        .map(|_| layout.docker_image(&[layout.tar_layer(300_000), layout.tar_layer(5_000)]))
        .collect();
    let mut layout = layout;
    let mut archives = Vec::new();
    for (name, image) in [
        ("a", &a),
        ("b", &b),
        ("c0", &c[0]),
        ("c1", &c[1]),
        ("c2", &c[2]),
    ] {
        layout.tag(image, name);
        let archive = work.join(format!("{name}.tar"));
        skopeo_ok(&[
            "copy",
            &format!("oci:{}:{name}", layout.dir.display()),
            &format!(
                "docker-archive:{}:regtee-test/{name}:latest",
                archive.display()
            ),
        ]);
        archives.push(archive);
    }
    Images { a, b, c, archives }
}

/// One step of a script: what docker printed, reduced to what does not depend on which
/// registry it talked to or on timing.
#[derive(Debug, PartialEq, Eq)]
struct Step {
    what: &'static str,
    exit: Option<i32>,
    lines: Vec<String>,
}

/// Progress lines come in an order that depends on timing; the final status of each layer does not.
const PROGRESS: [&str; 8] = [
    ": Preparing",
    ": Waiting",
    ": Pushing",
    ": Pulling fs layer",
    ": Downloading",
    ": Verifying Checksum",
    ": Download complete",
    ": Extracting",
];

fn step(what: &'static str, out: &Output, host: &str, config: &Path) -> Step {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = all
        .lines()
        .filter(|l| !PROGRESS.iter().any(|p| l.ends_with(p)))
        .map(|l| {
            l.replace(&format!("https://{host}"), "REGISTRY")
                .replace(&format!("http://{host}"), "REGISTRY")
                .replace(host, "REGISTRY")
                .replace(&config.display().to_string(), "CONFIG")
        })
        .collect();
    lines.sort();
    Step {
        what,
        exit: out.status.code(),
        lines,
    }
}

fn docker(daemon: &Dockerd, config: &Path, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| daemon.command(config, args))
}

/// Everything a user does with a registry, in order; returns each step and the digests pushed.
fn script(
    daemon: &Dockerd,
    host: &str,
    work: &Path,
    images: &Images,
) -> (Vec<Step>, Vec<(String, String)>) {
    let config = work.join(format!("docker-config-{}", host.replace([':', '.'], "-")));
    std::fs::create_dir_all(&config).unwrap();
    let mut steps = Vec::new();
    let mut pushed = Vec::new();
    for archive in &images.archives {
        let out = docker(
            daemon,
            &config,
            &["load", "-i", &archive.display().to_string()],
        );
        assert!(out.status.success(), "docker load: {}", text(&out));
    }
    let login = |password: &str| {
        tokio::task::block_in_place(|| {
            daemon.command_with_stdin(
                &config,
                &["login", "-u", DEV_USER, "--password-stdin", host],
                Some(password),
            )
        })
    };
    steps.push(step(
        "login with a wrong password",
        &login("wrong"),
        host,
        &config,
    ));
    steps.push(step("login", &login(DEV_PASSWORD), host, &config));
    for (what, source, target) in [
        ("push a multi-layer image", "a", "library/app:1"),
        ("push a second tag sharing layers", "b", "library/app:2"),
        ("push into another project (mount)", "a", "team/other:1"),
    ] {
        let reference = format!("{host}/{target}");
        let out = docker(
            daemon,
            &config,
            &["tag", &format!("regtee-test/{source}:latest"), &reference],
        );
        assert!(out.status.success(), "{}", text(&out));
        let out = docker(daemon, &config, &["push", &reference]);
        assert!(
            out.status.success(),
            "{what} to {host}: {}\n{}",
            text(&out),
            daemon.log()
        );
        pushed.push((target.to_string(), pushed_digest(&out)));
        steps.push(step(what, &out, host, &config));
    }
    // Three pushes at once.
    let concurrent: Vec<Output> = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|i| {
                    let reference = format!("{host}/library/c{i}:1");
                    let config = &config;
                    scope.spawn(move || {
                        let tagged = daemon.command(
                            config,
                            &["tag", &format!("regtee-test/c{i}:latest"), &reference],
                        );
                        assert!(tagged.status.success(), "{}", text(&tagged));
                        daemon.command(config, &["push", &reference])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    });
    for (i, out) in concurrent.iter().enumerate() {
        assert!(out.status.success(), "concurrent push {i}: {}", text(out));
        pushed.push((format!("library/c{i}:1"), pushed_digest(out)));
        steps.push(step("three pushes at once", out, host, &config));
    }
    // Remove the image entirely, pull it back (layers downloaded), then by digest.
    let out = docker(daemon, &config, &["rmi", "-f", &images.a.config()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = docker(daemon, &config, &["pull", &format!("{host}/library/app:1")]);
    steps.push(step("pull after rmi", &out, host, &config));
    let digest = &pushed[0].1;
    let out = docker(
        daemon,
        &config,
        &["pull", &format!("{host}/library/app@{digest}")],
    );
    steps.push(step("pull by digest", &out, host, &config));
    let out = docker(
        daemon,
        &config,
        &[
            "inspect",
            "--format",
            "{{.Id}}",
            &format!("{host}/library/app:1"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        images.a.config(),
        "the pulled image is the pushed one"
    );
    steps.push(step(
        "logout",
        &docker(daemon, &config, &["logout", host]),
        host,
        &config,
    ));
    // Leave the daemon as it was for the next script.
    for image in [&images.a, &images.b].into_iter().chain(images.c.iter()) {
        let _ = docker(daemon, &config, &["rmi", "-f", &image.config()]);
    }
    (steps, pushed)
}

/// Harbor, its cloud target and regtee in front of it.
struct Mirrored {
    harbor: AuthRegistry,
    cloud: AuthRegistry,
    regtee: Regtee,
}

async fn mirrored(work: &Path, https_on: Option<&str>) -> Mirrored {
    let harbor = start_harbor(&work.join("harbor")).await;
    let cloud = start_cloud(&work.join("cloud"), &["library", "team"]).await;
    let mut spec =
        ConfigSpec::new(&harbor, &work.join("state")).target(TargetSpec::cloud("tcr", &cloud));
    if let Some(address) = https_on {
        let files =
            regtee::certs::generate(&[address.to_string()], &work.join("certs"), 30).unwrap();
        spec.tls = Some((format!("{address}:0"), files.server_cert, files.server_key));
    }
    let regtee = Regtee::start(&spec).await;
    Mirrored {
        harbor,
        cloud,
        regtee,
    }
}

async fn assert_mirrored(m: &Mirrored, pushed: &[(String, String)]) {
    let harbor = m.harbor.client(ADMIN_USER, ADMIN_PASSWORD);
    let target = m.cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    for (repo_tag, digest) in pushed {
        let (repo, tag) = repo_tag.split_once(':').unwrap();
        let on_harbor = harbor.manifest_head(repo, tag).await.unwrap().unwrap();
        assert_eq!(on_harbor.digest.as_str(), digest, "{repo_tag} on Harbor");
        wait_for_manifest(&target, repo, tag, digest).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_through_either_listener_prints_and_exits_as_it_does_against_harbor() {
    let work = tempfile::tempdir().unwrap();
    let daemon = tokio::task::block_in_place(dockerd);
    let images = images(work.path());

    // Directly against Harbor as deployed (HTTPS by its nginx; on 127.0.0.1, so docker
    // does not verify it).
    let direct = start_harbor(&work.path().join("direct")).await;
    let (expected, _) = script(daemon, &direct.host(), work.path(), &images);
    assert!(
        expected.iter().take(1).all(|s| s.exit == Some(1)),
        "a wrong password fails: {expected:?}"
    );
    assert!(
        expected.iter().skip(1).all(|s| s.exit == Some(0)),
        "{expected:#?}"
    );

    // Through the plain listener (an insecure registry to docker, as 127.0.0.1 is).
    let plain = mirrored(&work.path().join("plain"), None).await;
    let (through_plain, pushed) = script(daemon, &plain.regtee.host(), work.path(), &images);
    assert_eq!(
        through_plain, expected,
        "docker through regtee's plain listener"
    );
    assert_mirrored(&plain, &pushed).await;

    // Through the HTTPS listener on an address docker verifies, trusting regtee's CA only.
    let address = secure_address();
    let secure = mirrored(&work.path().join("secure"), Some(address)).await;
    let host = format!("{address}:{}", secure.regtee.https.unwrap().port());
    let _trust = TrustedCa::install(&host, &work.path().join("secure/certs/ca.crt"));
    let (through_tls, pushed) = script(daemon, &host, work.path(), &images);
    assert_eq!(
        through_tls, expected,
        "docker through regtee's HTTPS listener"
    );
    assert_mirrored(&secure, &pushed).await;

    // A 200 MiB layer through the plain listener.
    let layout = Layout::new(&work.path().join("big"));
    let big = layout.docker_image(&[layout.tar_layer(200 << 20), layout.tar_layer(1_000)]);
    let mut layout = layout;
    layout.tag(&big, "big");
    let archive = work.path().join("big.tar");
    skopeo_ok(&[
        "copy",
        &format!("oci:{}:big", layout.dir.display()),
        &format!(
            "docker-archive:{}:regtee-test/big:latest",
            archive.display()
        ),
    ]);
    let config = work.path().join("docker-config-big");
    let out = tokio::task::block_in_place(|| {
        daemon.command_with_stdin(
            &config,
            &[
                "login",
                "-u",
                DEV_USER,
                "--password-stdin",
                &plain.regtee.host(),
            ],
            Some(DEV_PASSWORD),
        )
    });
    assert!(out.status.success(), "{}", text(&out));
    let out = docker(
        daemon,
        &config,
        &["load", "-i", &archive.display().to_string()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let reference = format!("{}/library/big:1", plain.regtee.host());
    assert!(
        docker(
            daemon,
            &config,
            &["tag", "regtee-test/big:latest", &reference]
        )
        .status
        .success()
    );
    let out = docker(daemon, &config, &["push", &reference]);
    assert!(out.status.success(), "{}", text(&out));
    let digest = pushed_digest(&out);
    let _ = docker(daemon, &config, &["rmi", "-f", &big.config()]);
    assert_mirrored(&plain, &[("library/big:1".to_string(), digest)]).await;

    for m in [plain, secure] {
        m.regtee.stop().await;
    }
    drop(direct);
}
