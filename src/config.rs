//! The TOML file, validated once into typed values.
//!
//! Everything the rest of regtee reads from configuration is checked here, at start-up, so a
//! mistake surfaces as one clear line before any listener opens. Secrets come from the file, an
//! environment variable or a file of their own; the environment is read through a function that
//! tests can fake, never through `set_var`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::mirror::target::{TargetPolicy, TargetPolicyError};
use crate::origin::Origin;

/// A value that must never be printed: `Debug` and `Display` show `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value, and remembers it so that text from other servers that echoes it
    /// is scrubbed ([`crate::redact`]).
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        let value = value.into();
        crate::redact::remember(value.clone());
        Secret(value)
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A username and password for a registry (Basic, or exchanged for a Bearer token).
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The account name; not secret, may be logged.
    pub username: String,
    /// The password or access token.
    pub password: Secret,
}

/// TLS settings for connections regtee makes to a registry.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate: for labs only.
    pub insecure_skip_verify: bool,
}

/// A registry regtee talks to as a client: Harbor or a target.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// A short name used in logs and errors (`upstream`, or the target's name).
    pub name: String,
    /// Harbor or a target.
    pub side: crate::registry::Side,
    /// Where the registry lives.
    pub origin: Origin,
    /// How to verify its certificate.
    pub tls: ClientTls,
    /// Who regtee is there, if anyone.
    pub credentials: Option<Credentials>,
    /// How long to wait for a TCP + TLS connection.
    pub connect_timeout: Duration,
    /// How long to wait for response headers once the request body is sent.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept; below the server's own limit.
    pub pool_idle_timeout: Duration,
    /// A mirror transfer that moves no byte for this long (a blob from Harbor that stalls, a
    /// registry that stops reading what regtee sends) is cut and retried.
    pub idle_timeout: Duration,
}

/// The whole configuration, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The client-facing listeners and their limits.
    pub proxy: ProxyConfig,
    /// Harbor, as clients and regtee reach it.
    pub upstream: UpstreamConfig,
    /// Where the durable queue lives.
    pub state: StateConfig,
    /// The operator's listener, if any.
    pub admin: Option<AdminConfig>,
    /// The shared secret that webhook senders present.
    pub webhook_secret: Option<Secret>,
    /// The cloud registries every push is teed to.
    pub targets: Vec<TargetConfig>,
    /// Log format and level.
    pub log: LogConfig,
}

/// The client-facing side.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Plain HTTP listener.
    pub listen: Option<SocketAddr>,
    /// HTTPS listener with its certificate.
    pub tls: Option<TlsListener>,
    /// Longest wait for a request head, including on idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// A body that moves no byte for this long is cut; there is no limit on total duration.
    pub body_idle_timeout: Duration,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// An HTTPS listener and its PEM files.
#[derive(Clone, Debug)]
pub struct TlsListener {
    /// Address to bind.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Harbor.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// How regtee connects and who it is there.
    pub endpoint: Endpoint,
    /// Send token requests for realms on other origins through regtee.
    pub rewrite_token_realm: bool,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// Holds the queue database and the lock that keeps two servers apart.
    pub dir: PathBuf,
    /// How long finished jobs stay queryable.
    pub retention: Duration,
}

/// The operator's listener.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Address to bind; keep it private.
    pub listen: SocketAddr,
    /// When set, every admin request needs `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
}

/// Log output.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Human text or one JSON object per line.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `regtee=debug`.
    pub level: String,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people at a terminal.
    Text,
    /// For log shippers.
    Json,
}

/// How regtee authenticates to a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetAuth {
    /// Username and password, sent as Basic or exchanged for Bearer tokens as the target asks.
    Password,
    /// Huawei SWR long-term login derived from an access key pair.
    SwrAksk,
}

/// One cloud registry.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// How regtee connects and who it is there.
    pub endpoint: Endpoint,
    /// Which repositories and tags go there, under which names.
    pub policy: TargetPolicy,
    /// Replace a tag that exists there with another digest.
    pub overwrite: bool,
    /// Propagate manifest deletes.
    pub delete: bool,
    /// Jobs copied at once for this target.
    pub concurrency: usize,
    /// First retry delay; doubles up to `retry_max`, with jitter.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Attempts before a job fails; 0 retries until success.
    pub max_attempts: u32,
    /// Upload blobs in chunks of this size (0: one request, unless the target asks for chunks).
    pub upload_chunk_size: u64,
    /// The largest chunk a target may ask for (`OCI-Chunk-Min-Length`); more fails the job.
    pub max_chunk_size: u64,
    /// Compare Harbor with this target this often, catching pushes that went around regtee.
    pub reconcile_interval: Option<Duration>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type, or an unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, with line and key.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key at fault.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Looks up an environment variable; tests pass a map instead of mutating the process.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Reads and validates a config file, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], for commands that only read the queue or ask the admin API
    /// (`status`, `jobs`, `retry`): a registry password that is not at hand does not stop
    /// them. Secrets that cannot be found are left empty; everything else is validated.
    pub fn load_for_queue_commands(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let raw = parse_toml(&text, path)?;
        Validator {
            path,
            base: path.parent().unwrap_or(Path::new(".")),
            env: &|name| std::env::var(name).ok(),
            secrets_required: false,
        }
        .config(raw)
    }

    /// Validates config text; relative paths are taken from the directory of `path`.
    pub fn parse(text: &str, path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let raw = parse_toml(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Validator {
            path,
            base,
            env,
            secrets_required: true,
        }
        .config(raw)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    proxy: RawProxy,
    upstream: RawUpstream,
    #[serde(default)]
    state: RawState,
    admin: Option<RawAdmin>,
    webhooks: Option<RawWebhooks>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    targets: Vec<RawTarget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<String>,
    tls_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pool_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    rewrite_token_realm: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    retention: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    token: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    secret: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    url: String,
    auth: Option<TargetAuth>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    region: Option<String>,
    access_key: Option<String>,
    access_key_env: Option<String>,
    access_key_file: Option<PathBuf>,
    secret_key: Option<String>,
    secret_key_env: Option<String>,
    secret_key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
    #[serde(default)]
    namespaces: BTreeMap<String, String>,
    include: Option<Vec<String>>,
    #[serde(default)]
    exclude: Vec<String>,
    tags: Option<Vec<String>>,
    overwrite: Option<bool>,
    #[serde(default)]
    delete: bool,
    concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    retry_initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
    max_attempts: Option<u32>,
    upload_chunk_size: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    reconcile_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    max_chunk_size: Option<u64>,
}

/// Default for `idle_timeout`: long enough for a busy registry, short enough that a stalled
/// transfer does not hold a worker for long.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Default for `max_chunk_size`: the largest `OCI-Chunk-Min-Length` regtee accepts from a target.
const DEFAULT_MAX_CHUNK_SIZE: u64 = 256 * 1024 * 1024;

// ---- validation ----

struct Validator<'a> {
    path: &'a Path,
    base: &'a Path,
    env: EnvLookup<'a>,
    /// When false, a secret that cannot be found is left empty instead of failing.
    secrets_required: bool,
}

/// Where a secret may come from; at most one of the three may be set.
struct SecretSource<'r> {
    key: &'r str,
    inline: Option<&'r str>,
    env: Option<&'r str>,
    file: Option<&'r Path>,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse()
            .map_err(|_| self.invalid(key, format!("`{text}` is not an address like 0.0.0.0:5000")))
    }

    fn secret(&self, s: SecretSource<'_>) -> Result<Option<Secret>, ConfigError> {
        let given = [s.inline.is_some(), s.env.is_some(), s.file.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(self.invalid(
                s.key,
                format!("set only one of `{0}`, `{0}_env` and `{0}_file`", s.key),
            ));
        }
        if let Some(v) = s.inline {
            return Ok(Some(Secret::new(v)));
        }
        let found = if let Some(var) = s.env {
            (self.env)(var).ok_or_else(|| {
                self.invalid(
                    format!("{}_env", s.key),
                    format!("environment variable {var} is not set"),
                )
            })
        } else if let Some(file) = s.file {
            let file = self.resolve_path(file);
            std::fs::read_to_string(&file)
                .map(|v| v.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| {
                    self.invalid(
                        format!("{}_file", s.key),
                        format!("cannot read {}: {e}", file.display()),
                    )
                })
        } else {
            return Ok(None);
        };
        match found {
            Ok(value) => Ok(Some(Secret::new(value))),
            Err(_) if !self.secrets_required => Ok(Some(Secret::new(""))),
            Err(e) => Err(e),
        }
    }

    /// A username and a password go together, or neither is set (anonymous access).
    fn login(
        &self,
        section: &str,
        username: Option<String>,
        password: Option<Secret>,
    ) -> Result<Option<Credentials>, ConfigError> {
        match (username, password) {
            (Some(username), Some(password)) => Ok(Some(Credentials { username, password })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(self.invalid(
                format!("{section}.username"),
                "a username needs password, password_env or password_file",
            )),
            (None, Some(_)) => {
                Err(self.invalid(format!("{section}.password"), "a password needs a username"))
            }
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let proxy = self.proxy(raw.proxy)?;
        let upstream = self.upstream(raw.upstream)?;
        let state = StateConfig {
            dir: self.resolve_path(
                raw.state
                    .dir
                    .as_deref()
                    .unwrap_or(Path::new("./regtee-data")),
            ),
            retention: raw
                .state
                .retention
                .unwrap_or(Duration::from_secs(30 * 86_400)),
        };
        let admin = raw.admin.map(|a| self.admin(a)).transpose()?;
        let webhook_secret = match raw.webhooks {
            Some(w) => self.secret(SecretSource {
                key: "webhooks.secret",
                inline: w.secret.as_deref(),
                env: w.secret_env.as_deref(),
                file: w.secret_file.as_deref(),
            })?,
            None => None,
        };
        let mut targets = Vec::new();
        for (i, t) in raw.targets.into_iter().enumerate() {
            let target = self.target(i, t)?;
            if targets
                .iter()
                .any(|o: &TargetConfig| o.endpoint.name == target.endpoint.name)
            {
                return Err(self.invalid(
                    format!("targets[{i}].name"),
                    format!("target name `{}` is used twice", target.endpoint.name),
                ));
            }
            targets.push(target);
        }
        let log = LogConfig {
            format: raw.log.format.unwrap_or(LogFormat::Text),
            level: raw.log.level.unwrap_or_else(|| "info".to_string()),
        };
        Ok(Config {
            proxy,
            upstream,
            state,
            admin,
            webhook_secret,
            targets,
            log,
        })
    }

    fn proxy(&self, raw: RawProxy) -> Result<ProxyConfig, ConfigError> {
        let listen = raw
            .listen
            .as_deref()
            .map(|t| self.addr("proxy.listen", t))
            .transpose()?;
        let tls = match (raw.tls_listen.as_deref(), raw.tls_cert, raw.tls_key) {
            (None, None, None) => None,
            (Some(addr), Some(cert), Some(key)) => Some(TlsListener {
                listen: self.addr("proxy.tls_listen", addr)?,
                cert: self.resolve_path(&cert),
                key: self.resolve_path(&key),
            }),
            _ => {
                return Err(self.invalid(
                    "proxy.tls_listen",
                    "tls_listen, tls_cert and tls_key go together (see `regtee certs generate`)",
                ));
            }
        };
        if listen.is_none() && tls.is_none() {
            return Err(self.invalid("proxy", "set `listen` (HTTP), `tls_listen` (HTTPS) or both"));
        }
        Ok(ProxyConfig {
            listen,
            tls,
            header_read_timeout: raw.header_read_timeout.unwrap_or(Duration::from_secs(30)),
            body_idle_timeout: raw.body_idle_timeout.unwrap_or(Duration::from_secs(300)),
            shutdown_grace: raw.shutdown_grace.unwrap_or(Duration::from_secs(30)),
        })
    }

    fn positive(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            Some(d) if d.is_zero() => Err(self.invalid(key, "must be more than zero")),
            Some(d) => Ok(d),
            None => Ok(default),
        }
    }

    fn origin(&self, key: &str, url: &str) -> Result<Origin, ConfigError> {
        Origin::parse(url).map_err(|e| self.invalid(key, e.to_string()))
    }

    fn ca_file(&self, key: &str, ca: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
        let Some(ca) = ca else { return Ok(None) };
        let ca = self.resolve_path(&ca);
        if !ca.is_file() {
            return Err(self.invalid(key, format!("{} does not exist", ca.display())));
        }
        Ok(Some(ca))
    }

    fn upstream(&self, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let origin = self.origin("upstream.url", &raw.url)?;
        let password = self.secret(SecretSource {
            key: "upstream.password",
            inline: raw.password.as_deref(),
            env: raw.password_env.as_deref(),
            file: raw.password_file.as_deref(),
        })?;
        let credentials = self.login("upstream", raw.username, password)?;
        Ok(UpstreamConfig {
            endpoint: Endpoint {
                name: "upstream".to_string(),
                side: crate::registry::Side::Upstream,
                origin,
                tls: ClientTls {
                    ca_file: self.ca_file("upstream.ca_file", raw.ca_file)?,
                    insecure_skip_verify: raw.insecure_skip_verify,
                },
                credentials,
                connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(10)),
                response_timeout: raw.response_timeout.unwrap_or(Duration::from_secs(600)),
                pool_idle_timeout: raw.pool_idle_timeout.unwrap_or(Duration::from_secs(50)),
                idle_timeout: self.positive(
                    "upstream.idle_timeout",
                    raw.idle_timeout,
                    DEFAULT_IDLE_TIMEOUT,
                )?,
            },
            rewrite_token_realm: raw.rewrite_token_realm.unwrap_or(true),
        })
    }

    fn admin(&self, raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
        Ok(AdminConfig {
            listen: self.addr("admin.listen", &raw.listen)?,
            token: self.secret(SecretSource {
                key: "admin.token",
                inline: raw.token.as_deref(),
                env: raw.token_env.as_deref(),
                file: raw.token_file.as_deref(),
            })?,
        })
    }

    fn target(&self, i: usize, raw: RawTarget) -> Result<TargetConfig, ConfigError> {
        let key = |k: &str| format!("targets[{i}].{k}");
        let name_ok = !raw.name.is_empty()
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(self.invalid(
                key("name"),
                "use letters, digits, `-` and `_` only (it appears in metrics and URLs)",
            ));
        }
        let origin = self.origin(&key("url"), &raw.url)?;
        let credentials = match raw.auth.unwrap_or(TargetAuth::Password) {
            TargetAuth::Password => {
                let password = self.secret(SecretSource {
                    key: &key("password"),
                    inline: raw.password.as_deref(),
                    env: raw.password_env.as_deref(),
                    file: raw.password_file.as_deref(),
                })?;
                self.login(&format!("targets[{i}]"), raw.username, password)?
            }
            TargetAuth::SwrAksk => {
                let region = raw.region.ok_or_else(|| {
                    self.invalid(
                        key("region"),
                        "auth = \"swr-aksk\" needs the SWR region, e.g. cn-north-4",
                    )
                })?;
                let ak = self.secret(SecretSource {
                    key: &key("access_key"),
                    inline: raw.access_key.as_deref(),
                    env: raw.access_key_env.as_deref(),
                    file: raw.access_key_file.as_deref(),
                })?;
                let sk = self.secret(SecretSource {
                    key: &key("secret_key"),
                    inline: raw.secret_key.as_deref(),
                    env: raw.secret_key_env.as_deref(),
                    file: raw.secret_key_file.as_deref(),
                })?;
                let (Some(ak), Some(sk)) = (ak, sk) else {
                    return Err(self.invalid(
                        key("access_key"),
                        "auth = \"swr-aksk\" needs access_key(_env/_file) and secret_key(_env/_file)",
                    ));
                };
                Some(crate::registry::credentials::swr_login(&region, &ak, &sk))
            }
        };
        let policy = TargetPolicy::new(
            raw.namespaces,
            &raw.include.unwrap_or_else(|| vec!["**".to_string()]),
            &raw.exclude,
            &raw.tags.unwrap_or_else(|| vec!["**".to_string()]),
        )
        .map_err(|e| match e {
            TargetPolicyError::Glob { field, .. } => self.invalid(key(field), e.to_string()),
            TargetPolicyError::Namespace(..) => self.invalid(key("namespaces"), e.to_string()),
        })?;
        let concurrency = raw.concurrency.unwrap_or(4);
        if concurrency == 0 {
            return Err(self.invalid(key("concurrency"), "must be at least 1"));
        }
        let retry_initial = raw.retry_initial.unwrap_or(Duration::from_secs(1));
        let retry_max = raw.retry_max.unwrap_or(Duration::from_secs(300));
        if retry_initial.is_zero() || retry_max < retry_initial {
            return Err(self.invalid(
                key("retry_max"),
                "retry_initial must be positive and retry_max at least retry_initial",
            ));
        }
        Ok(TargetConfig {
            endpoint: Endpoint {
                name: raw.name,
                side: crate::registry::Side::Target,
                origin,
                tls: ClientTls {
                    ca_file: self.ca_file(&key("ca_file"), raw.ca_file)?,
                    insecure_skip_verify: raw.insecure_skip_verify,
                },
                credentials,
                connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(10)),
                response_timeout: raw.response_timeout.unwrap_or(Duration::from_secs(600)),
                pool_idle_timeout: Duration::from_secs(50),
                idle_timeout: self.positive(
                    &key("idle_timeout"),
                    raw.idle_timeout,
                    DEFAULT_IDLE_TIMEOUT,
                )?,
            },
            policy,
            overwrite: raw.overwrite.unwrap_or(true),
            delete: raw.delete,
            concurrency,
            retry_initial,
            retry_max,
            max_attempts: raw.max_attempts.unwrap_or(0),
            upload_chunk_size: raw.upload_chunk_size.unwrap_or(0),
            max_chunk_size: raw.max_chunk_size.unwrap_or(DEFAULT_MAX_CHUNK_SIZE),
            reconcile_interval: raw.reconcile_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let env = |name: &str| match name {
            "UP_PW" => Some("s3cret".to_string()),
            "TCR_PW" => Some("tcr-pw".to_string()),
            _ => None,
        };
        Config::parse(text, Path::new("/etc/regtee/regtee.toml"), &env)
    }

    const MINIMAL: &str = r#"
        [proxy]
        listen = "127.0.0.1:5000"
        [upstream]
        url = "https://harbor.example.com"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen, Some("127.0.0.1:5000".parse().unwrap()));
        assert!(c.proxy.tls.is_none());
        assert_eq!(
            c.upstream.endpoint.origin.to_string(),
            "https://harbor.example.com"
        );
        assert_eq!(c.state.dir, Path::new("/etc/regtee/./regtee-data"));
        assert!(c.targets.is_empty());
        assert!(c.upstream.rewrite_token_realm);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{MINIMAL}\nlisten_port = 3\n")).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn secrets_come_from_env_and_never_print() {
        let c = parse(
            r#"
            [proxy]
            listen = "127.0.0.1:5000"
            [upstream]
            url = "https://harbor.example.com"
            username = "robot$regtee"
            password_env = "UP_PW"
            [[targets]]
            name = "tcr"
            url = "https://x.tencentcloudcr.com"
            username = "100012345"
            password_env = "TCR_PW"
            namespaces = { library = "prod-lib" }
        "#,
        )
        .unwrap();
        let creds = c.upstream.endpoint.credentials.as_ref().unwrap();
        assert_eq!(creds.password.expose(), "s3cret");
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cret") && !printed.contains("tcr-pw"));
        assert_eq!(c.targets[0].endpoint.name, "tcr");
    }

    #[test]
    fn missing_env_var_is_reported_with_its_name() {
        let err = parse(
            r#"
            [proxy]
            listen = "127.0.0.1:5000"
            [upstream]
            url = "https://harbor.example.com"
            username = "u"
            password_env = "NOPE"
        "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("NOPE"), "{err}");
    }

    #[test]
    fn queue_commands_do_not_need_registry_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regtee.toml");
        std::fs::write(
            &path,
            "[proxy]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"https://h\"\nusername = \"u\"\npassword_env = \"REGTEE_TEST_SURELY_UNSET_VAR\"\n",
        )
        .unwrap();
        assert!(Config::load(&path).is_err());
        let c = Config::load_for_queue_commands(&path).unwrap();
        assert_eq!(c.upstream.endpoint.credentials.unwrap().username, "u");
    }

    #[test]
    fn two_secret_sources_are_refused() {
        let err = parse(
            r#"
            [proxy]
            listen = "127.0.0.1:5000"
            [upstream]
            url = "https://harbor.example.com"
            username = "u"
            password = "a"
            password_env = "UP_PW"
        "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("only one"), "{err}");
    }

    #[test]
    fn needs_a_listener_and_a_root_url() {
        let err = parse("[proxy]\n[upstream]\nurl = \"https://h\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = parse("[proxy]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"https://h/x\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("upstream.url"), "{err}");
    }

    #[test]
    fn duplicate_target_names_are_refused() {
        let err = parse(&format!(
            "{MINIMAL}\n[[targets]]\nname = \"a\"\nurl = \"https://a\"\n[[targets]]\nname = \"a\"\nurl = \"https://b\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("used twice"), "{err}");
    }

    #[test]
    fn swr_credentials_are_derived() {
        let c = parse(&format!(
            "{MINIMAL}\n[[targets]]\nname = \"swr\"\nurl = \"https://swr.cn-north-4.myhuaweicloud.com\"\nauth = \"swr-aksk\"\nregion = \"cn-north-4\"\naccess_key = \"AK\"\nsecret_key = \"SK\"\n"
        ))
        .unwrap();
        let creds = c.targets[0].endpoint.credentials.as_ref().unwrap();
        assert_eq!(creds.username, "cn-north-4@AK");
    }

    #[test]
    fn the_example_config_is_valid() {
        let env = |name: &str| Some(format!("value-of-{name}"));
        let c = Config::parse(
            include_str!("../regtee.example.toml"),
            Path::new("/etc/regtee/regtee.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(c.targets[0].max_chunk_size, DEFAULT_MAX_CHUNK_SIZE);
        assert_eq!(c.upstream.endpoint.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    }
}
