//! The real Docker engine as a client: Debian's dockerd (20.10) without any networking
//! features, started once per test binary on its own socket, data root and exec root.
//!
//! dockerd treats every registry on 127.0.0.0/8 as insecure (plain HTTP allowed, TLS not
//! verified). To test a verified TLS connection, [`secure_address`] adds an address from the
//! benchmarking range (RFC 2544, 198.18.0.0/15) to the loopback interface: a registry there is
//! "secure" to dockerd, which then trusts only `/etc/docker/certs.d/HOST:PORT/ca.crt`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use regtee::local_process::{self, LocalProcess};

/// A running dockerd, shared by the test binary: kept in a `static`, so it is stopped (and its
/// directories deleted) by the process watchdog when the binary exits.
pub struct Dockerd {
    pub socket: PathBuf,
    dir: PathBuf,
    _process: LocalProcess,
}

/// The docker CLI that matches the daemon (Debian's), else whatever is on PATH.
fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// The shared daemon, started on first use.
pub fn dockerd() -> &'static Dockerd {
    static DAEMON: OnceLock<Dockerd> = OnceLock::new();
    DAEMON.get_or_init(Dockerd::start)
}

impl Dockerd {
    fn start() -> Dockerd {
        let dir = std::env::temp_dir().join(format!("regtee-dockerd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let config = dir.join("daemon.json");
        std::fs::write(&config, "{}").unwrap();
        local_process::remove_dir_at_exit(&dir);
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let mut command = Command::new("dockerd");
        command
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ])
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let process =
            LocalProcess::spawn(command).expect("dockerd runs (apt-get install docker.io)");
        let daemon = Dockerd {
            socket,
            dir,
            _process: process,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = daemon.command(&daemon.dir, &["version", "--format", "{{.Server.Version}}"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not start (apt-get install docker.io): {}",
                std::fs::read_to_string(daemon.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        daemon
    }

    /// Runs the docker CLI with its own client configuration directory (credentials live there).
    pub fn command(&self, config_dir: &Path, args: &[&str]) -> Output {
        self.command_with_stdin(config_dir, args, None)
    }

    pub fn command_with_stdin(
        &self,
        config_dir: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Output {
        let mut child = Command::new(docker_cli())
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", config_dir)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the docker CLI runs");
        if let Some(input) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Makes `image` of `layout` (a docker image: tar layers) an image of this daemon named
    /// `name:latest`, through a `docker-archive` written by skopeo under `work`.
    pub fn load(
        &self,
        config_dir: &Path,
        layout: &crate::support::layout::Layout,
        tag: &str,
        name: &str,
        work: &Path,
    ) {
        let archive = work.join(format!("{}.tar", name.replace('/', "-")));
        crate::support::skopeo_ok(&[
            "copy",
            &format!("oci:{}:{tag}", layout.dir.display()),
            &format!("docker-archive:{}:{name}:latest", archive.display()),
        ]);
        let out = self.command(config_dir, &["load", "-i", &archive.display().to_string()]);
        assert!(
            out.status.success(),
            "docker load: {}",
            crate::support::text(&out)
        );
    }

    /// What dockerd logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}

/// The digest docker reports at the end of a push (`TAG: digest: sha256:... size: N`).
pub fn pushed_digest(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split("digest: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest in: {stdout}"))
        .to_string()
}

/// An address dockerd verifies TLS for (see the module comment). Added once, left in place.
pub fn secure_address() -> &'static str {
    const ADDRESS: &str = "198.18.0.1";
    static ADDED: OnceLock<()> = OnceLock::new();
    ADDED.get_or_init(|| {
        let shown = Command::new("ip")
            .args(["-4", "addr", "show", "dev", "lo"])
            .output()
            .expect("iproute2 is installed");
        if !String::from_utf8_lossy(&shown.stdout).contains(ADDRESS) {
            let added = Command::new("ip")
                .args(["addr", "add", &format!("{ADDRESS}/32"), "dev", "lo"])
                .output()
                .unwrap();
            assert!(
                added.status.success(),
                "adding {ADDRESS} to lo needs root: {}",
                String::from_utf8_lossy(&added.stderr)
            );
        }
    });
    ADDRESS
}

/// `/etc/docker/certs.d/HOST/ca.crt` (dockerd reads no other place), removed on drop.
pub struct TrustedCa {
    dir: PathBuf,
}

impl TrustedCa {
    pub fn install(host: &str, ca: &Path) -> TrustedCa {
        let dir = Path::new("/etc/docker/certs.d").join(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(ca, dir.join("ca.crt")).unwrap();
        TrustedCa { dir }
    }
}

impl Drop for TrustedCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
