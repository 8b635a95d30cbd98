//! Installing regtee as the README says: the image `deploy/image/build.sh` builds, run by the
//! real Docker engine; the compose file beside Harbor's, checked by the compose tool itself; the
//! systemd unit, checked by systemd's own verifier.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::docker::{Dockerd, dockerd};
use crate::support::layout::Layout;
use crate::support::*;

fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A container, its state volume and its image, removed however the test ends.
struct Installed<'a> {
    daemon: &'a Dockerd,
    config: PathBuf,
    name: String,
    volume: String,
    image: String,
}

impl Installed<'_> {
    fn docker(&self, args: &[&str]) -> Output {
        tokio::task::block_in_place(|| self.daemon.command(&self.config, args))
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn inspect(&self, format: &str) -> String {
        self.docker_ok(&["inspect", "--format", format, &self.name])
    }

    fn logs(&self) -> String {
        text(&self.docker(&["logs", &self.name]))
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = self.daemon.command(&self.config, &["rm", "-f", &self.name]);
        let _ = self
            .daemon
            .command(&self.config, &["volume", "rm", "-f", &self.volume]);
        let _ = self
            .daemon
            .command(&self.config, &["rmi", "-f", &self.image]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_as_non_root_mirrors_a_push_and_stops_within_the_grace() {
    let work = tempfile::tempdir().unwrap();
    let installed = Installed {
        daemon: dockerd(),
        config: work.path().join("docker-config"),
        name: format!("regtee-test-{}", std::process::id()),
        volume: format!("regtee-test-state-{}", std::process::id()),
        image: format!("regtee-test:{}", std::process::id()),
    };

    // Built by the script from the binary under test, loaded into the engine.
    let archive = work.path().join("image.tar");
    let out = Command::new("bash")
        .arg(repo_path("deploy/image/build.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_regtee"), "--tag"])
        .arg(&installed.image)
        .arg("--out")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "build.sh: {}", text(&out));
    installed.docker_ok(&["load", "-i", &archive.display().to_string()]);
    let config: serde_json::Value = serde_json::from_str(&installed.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &installed.image,
    ]))
    .unwrap();
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(config["Healthcheck"]["Test"][1], "/usr/local/bin/regtee");

    // Harbor as deployed, a cloud target, and the container between them on the host's network.
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let etc = work.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(harbor.ca_file().unwrap(), etc.join("harbor-ca.crt")).unwrap();
    let mut spec = ConfigSpec::new(&harbor, Path::new("/var/lib/regtee"))
        .target(TargetSpec::cloud("tcr", &cloud))
        .with_fixed_ports();
    spec.upstream_extra = "ca_file = \"/etc/regtee/harbor-ca.crt\"\n".into();
    spec.proxy_extra = "shutdown_grace = \"10s\"\n".into();
    spec.write(&etc.join("regtee.toml"));
    let mut run: Vec<String> = [
        "run",
        "-d",
        "--name",
        &installed.name,
        "--network",
        "host",
        // As the compose file and the Kubernetes manifest run it.
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "-v",
        &format!("{}:/etc/regtee:ro", etc.display()),
        "-v",
        &format!("{}:/var/lib/regtee", installed.volume),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (key, value) in spec.env() {
        run.extend(["-e".to_string(), format!("{key}={value}")]);
    }
    run.push(installed.image.clone());
    installed.docker_ok(&run.iter().map(String::as_str).collect::<Vec<_>>());
    let admin = spec.admin_addr().unwrap();
    let client = raw_http_client(None, false);
    wait_until(
        "the container's /healthz",
        Duration::from_secs(30),
        || async {
            assert_eq!(
                installed.inspect("{{.State.Running}}"),
                "true",
                "{}",
                installed.logs()
            );
            let probe = http::Request::get(format!("http://{admin}/healthz"))
                .body(regtee::body::empty())
                .unwrap();
            let answer = client.request(probe).await.ok()?;
            (answer.status() == 200).then_some(())
        },
    )
    .await;

    // A push through it reaches the target with Harbor's digest.
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[300_000, 40_000], "amd64");
    layout.tag(&image, "app");
    push_layout_ok(
        &layout.dir,
        "app",
        &spec.listen_addr().to_string(),
        "library/app:1",
        Tls::Off,
    );
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/app",
        "1",
        &image.digest,
    )
    .await;

    // Not root, by the kernel's account of the process.
    let pid = installed.inspect("{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65532"),
        "{uid}"
    );
    // The image's own health check (`regtee health`) says healthy.
    wait_until("Docker's health check", Duration::from_secs(60), || async {
        (installed.inspect("{{.State.Health.Status}}") == "healthy").then_some(())
    })
    .await;

    // docker stop: SIGTERM, a clean exit well within shutdown_grace (10s).
    let started = Instant::now();
    installed.docker_ok(&["stop", "-t", "30", &installed.name]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "stopped in {took:?}: {}",
        installed.logs()
    );
    assert_eq!(
        installed.inspect("{{.State.ExitCode}}"),
        "0",
        "{}",
        installed.logs()
    );
}

#[test]
fn the_compose_file_beside_harbor_passes_the_compose_tools_validation() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("compose");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["docker-compose.yml", "regtee.toml", "regtee.env.example"] {
        std::fs::copy(repo_path("deploy/compose").join(file), dir.join(file)).unwrap();
    }
    std::fs::copy(dir.join("regtee.env.example"), dir.join("regtee.env")).unwrap();
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(dir.join("docker-compose.yml"))
        .args(["config", "-q"])
        .output()
        .expect("docker-compose runs (apt-get install docker-compose)");
    assert!(out.status.success(), "{}", text(&out));
    let resolved = Command::new("docker-compose")
        .arg("-f")
        .arg(dir.join("docker-compose.yml"))
        .arg("config")
        .output()
        .unwrap();
    let resolved = String::from_utf8_lossy(&resolved.stdout);
    assert!(
        resolved.contains("external: true") && resolved.contains("name: harbor_harbor"),
        "Harbor's network, joined as an external network: {resolved}"
    );

    // The config beside it is one regtee loads, with the secrets the env file names.
    let env: Vec<(String, String)> = std::fs::read_to_string(dir.join("regtee.env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let toml = std::fs::read_to_string(dir.join("regtee.toml")).unwrap();
    let config = regtee::config::Config::parse(&toml, &dir.join("regtee.toml"), &lookup)
        .unwrap_or_else(|e| panic!("deploy/compose/regtee.toml: {e}"));
    assert_eq!(
        config.upstream.endpoint.origin.to_string(),
        "http://proxy:8080"
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let shipped = std::fs::read_to_string(repo_path("deploy/systemd/regtee.service")).unwrap();
    for hardening in [
        "User=regtee",
        "StateDirectory=regtee",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ReadWritePaths=/var/lib/regtee",
        "KillSignal=SIGTERM",
    ] {
        assert!(
            shipped.lines().any(|l| l == hardening),
            "the unit says {hardening}"
        );
    }
    assert!(
        !shipped.contains("ExecReload"),
        "regtee reloads nothing: no ExecReload"
    );
    let stop: u64 = shipped
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(stop > 30, "more than the default shutdown_grace (30s)");

    // verify checks that ExecStart's program exists: the binary under test stands in for it.
    let work = tempfile::tempdir().unwrap();
    let unit = work.path().join("regtee.service");
    let installed = "ExecStart=/usr/local/bin/regtee ";
    assert!(shipped.contains(installed));
    std::fs::write(
        &unit,
        shipped.replace(
            installed,
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_regtee")),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
}
