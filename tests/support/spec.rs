//! regtee's config file as tests and benches write it (`ConfigSpec`), the accounts the
//! harness's registries know, and regtee as a process of its own. Shared by the integration
//! tests and the benches (which include this file), so both start regtee one way.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regtee::config::Config;
use regtee::local_process::LocalProcess;

pub const DEV_USER: &str = "dev";
pub const DEV_PASSWORD: &str = "dev-password-7f3a";
pub const ROBOT_USER: &str = "robot$regtee";
pub const ROBOT_PASSWORD: &str = "robot-secret-91c2";
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "Harbor12345-admin";
pub const CLOUD_USER: &str = "100012345";
pub const CLOUD_PASSWORD: &str = "tcr-access-credential-55d1";

/// A `[[targets]]` entry.
#[derive(Clone)]
pub struct TargetSpec {
    pub name: String,
    pub url: String,
    pub extra: String,
    /// The login lines; `None`: the cloud's user with `CLOUD_PASSWORD`.
    pub login: Option<String>,
    /// `retry_initial` and `retry_max`: short, so tests see retries quickly.
    pub retry: (String, String),
}

impl TargetSpec {
    pub fn at(name: &str, url: &str) -> TargetSpec {
        TargetSpec {
            name: name.into(),
            url: url.into(),
            extra: String::new(),
            login: None,
            retry: ("100ms".into(), "500ms".into()),
        }
    }

    /// Retrying after `initial`, doubling up to `max`.
    pub fn retry(mut self, initial: &str, max: &str) -> TargetSpec {
        self.retry = (initial.into(), max.into());
        self
    }

    /// With these login lines instead of the cloud's user and password.
    pub fn login(mut self, lines: &str) -> TargetSpec {
        self.login = Some(lines.to_string());
        self
    }

    pub fn with(mut self, line: &str) -> TargetSpec {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }
}

/// Builds a regtee config file for tests.
#[derive(Clone)]
pub struct ConfigSpec {
    pub listen: String,
    pub tls: Option<(String, PathBuf, PathBuf)>,
    pub upstream: String,
    pub upstream_extra: String,
    pub state_dir: PathBuf,
    pub admin: Option<String>,
    pub admin_token: Option<String>,
    pub webhook_secret: Option<String>,
    pub proxy_extra: String,
    pub targets: Vec<TargetSpec>,
    /// What `CLOUD_PASSWORD` holds for the targets.
    pub cloud_password: String,
    /// The queue in PostgreSQL: its URL and the role's password, and `[state]` lines to add.
    pub database: Option<(String, String)>,
    pub state_extra: String,
    /// The `[cache]` section's lines, when there is one.
    pub cache: Option<String>,
    /// More environment for the secrets the config reads (`*_env`).
    pub extra_env: Vec<(String, String)>,
}

impl ConfigSpec {
    /// regtee in front of whatever listens at `upstream`.
    pub fn at(upstream: &str, state_dir: &Path) -> ConfigSpec {
        ConfigSpec {
            listen: "127.0.0.1:0".into(),
            tls: None,
            upstream: upstream.into(),
            upstream_extra: String::new(),
            state_dir: state_dir.to_path_buf(),
            admin: Some("127.0.0.1:0".into()),
            admin_token: None,
            webhook_secret: None,
            proxy_extra: String::new(),
            targets: Vec::new(),
            cloud_password: CLOUD_PASSWORD.into(),
            database: None,
            state_extra: String::new(),
            cache: None,
            extra_env: Vec::new(),
        }
    }

    /// With the proxy and the admin API on fixed free ports, so the CLI can find the admin API.
    pub fn with_fixed_ports(mut self) -> ConfigSpec {
        self.listen = format!("127.0.0.1:{}", regtee::local_registry::free_port().unwrap());
        self.admin = Some(format!(
            "127.0.0.1:{}",
            regtee::local_registry::free_port().unwrap()
        ));
        self
    }

    /// The queue in a database of `server` (a new one, named `database`).
    pub fn on_postgres(
        self,
        server: &regtee::local_postgres::LocalPostgres,
        database: &str,
    ) -> ConfigSpec {
        let url = server.create_database(database).unwrap();
        self.on_database(&url, server.password())
    }

    /// The queue in the PostgreSQL database at `url` (which exists).
    pub fn on_database(mut self, url: &str, password: &str) -> ConfigSpec {
        self.database = Some((url.to_string(), password.to_string()));
        self
    }

    /// The plain listener's address (a fixed port: see [`ConfigSpec::with_fixed_ports`]).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().expect("a fixed listen address")
    }

    /// The admin listener's address, if fixed.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.parse().ok())
    }

    /// The same queue database as `other` (another replica of it).
    pub fn with_database(mut self, other: &ConfigSpec) -> ConfigSpec {
        self.database = other.database.clone();
        self
    }

    pub fn target(mut self, t: TargetSpec) -> ConfigSpec {
        self.targets.push(t);
        self
    }

    pub fn toml(&self) -> String {
        let mut s = format!("[proxy]\nlisten = \"{}\"\n", self.listen);
        if let Some((addr, cert, key)) = &self.tls {
            s.push_str(&format!(
                "tls_listen = \"{addr}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                cert.display(),
                key.display()
            ));
        }
        s.push_str(&self.proxy_extra);
        s.push_str(&format!(
            "[upstream]\nurl = \"{}\"\nusername = \"{ROBOT_USER}\"\npassword_env = \"REGTEE_UPSTREAM_PASSWORD\"\n{}",
            self.upstream, self.upstream_extra
        ));
        s.push_str(&format!(
            "[state]\ndir = \"{}\"\n",
            self.state_dir.display()
        ));
        if let Some((url, _)) = &self.database {
            s.push_str(&format!(
                "database = \"{url}\"\ndatabase_password_env = \"REGTEE_DB_PASSWORD\"\n"
            ));
        }
        s.push_str(&self.state_extra);
        if let Some(admin) = &self.admin {
            s.push_str(&format!("[admin]\nlisten = \"{admin}\"\n"));
            if self.admin_token.is_some() {
                s.push_str("token_env = \"REGTEE_ADMIN_TOKEN\"\n");
            }
        }
        if self.webhook_secret.is_some() {
            s.push_str("[webhooks]\nsecret_env = \"REGTEE_WEBHOOK_SECRET\"\n");
        }
        if let Some(lines) = &self.cache {
            s.push_str(&format!("[cache]\n{lines}"));
        }
        for t in &self.targets {
            let login = t.login.clone().unwrap_or_else(|| {
                format!("username = \"{CLOUD_USER}\"\npassword_env = \"CLOUD_PASSWORD\"\n")
            });
            s.push_str(&format!(
                "[[targets]]\nname = \"{}\"\nurl = \"{}\"\n{login}retry_initial = \"{}\"\nretry_max = \"{}\"\n{}",
                t.name, t.url, t.retry.0, t.retry.1, t.extra
            ));
        }
        s
    }

    /// The environment the config reads secrets from.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "REGTEE_UPSTREAM_PASSWORD".to_string(),
                ROBOT_PASSWORD.to_string(),
            ),
            ("CLOUD_PASSWORD".to_string(), self.cloud_password.clone()),
        ];
        if let Some(t) = &self.admin_token {
            env.push(("REGTEE_ADMIN_TOKEN".into(), t.clone()));
        }
        if let Some(s) = &self.webhook_secret {
            env.push(("REGTEE_WEBHOOK_SECRET".into(), s.clone()));
        }
        if let Some((_, password)) = &self.database {
            env.push(("REGTEE_DB_PASSWORD".into(), password.clone()));
        }
        env.extend(self.extra_env.iter().cloned());
        env
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.toml()).unwrap();
        path.to_path_buf()
    }

    pub fn parse(&self) -> Config {
        let env = self.env();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Config::parse(&self.toml(), &self.state_dir.join("regtee.toml"), &lookup).unwrap()
    }
}

/// regtee as a separate process (for SIGKILL and SIGTERM), logging to a file.
pub struct RegteeProcess {
    pub child: LocalProcess,
    pub log: PathBuf,
}

impl RegteeProcess {
    pub fn spawn(config: &Path, spec: &ConfigSpec, log: &Path) -> RegteeProcess {
        RegteeProcess::spawn_with_log_filter(config, spec, log, Some("regtee=debug"))
    }

    /// With `RUST_LOG` set to `filter`, or, without one, logging as deployed (the config's
    /// level, a line per request).
    pub fn spawn_with_log_filter(
        config: &Path,
        spec: &ConfigSpec,
        log: &Path,
        filter: Option<&str>,
    ) -> RegteeProcess {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_regtee"));
        command
            .args(["serve", "--config"])
            .arg(config)
            .envs(spec.env())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(filter) = filter {
            command.env("RUST_LOG", filter);
        }
        let child = LocalProcess::spawn(command).unwrap();
        RegteeProcess {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill();
    }

    pub fn sigterm(&self) {
        assert!(self.child.signal_leader("-TERM"));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    /// Current resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl RegteeProcess {
    /// Writes `spec` into `dir` as `<name>.toml` and serves it, logging to `<name>.log` as
    /// deployed (the config's level, a line per request); returns once its fixed listeners
    /// listen.
    pub async fn serve(spec: &ConfigSpec, dir: &Path, name: &str) -> RegteeProcess {
        let config = spec.write(&dir.join(format!("{name}.toml")));
        let process = RegteeProcess::spawn_with_log_filter(
            &config,
            spec,
            &dir.join(format!("{name}.log")),
            None,
        );
        for addr in std::iter::once(spec.listen_addr()).chain(spec.admin_addr()) {
            wait_listening(addr).await;
        }
        process
    }
}

impl Drop for RegteeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until a TCP port accepts connections.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} did not listen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
