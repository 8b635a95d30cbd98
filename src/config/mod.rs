//! The TOML file, validated once into typed values.
//!
//! Everything the rest of regtee reads from configuration is checked here, at start-up, so a
//! mistake surfaces as one clear line before any listener opens. Secrets come from the file, an
//! environment variable or a file of their own; the environment is read through a function that
//! tests can fake, never through `set_var`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

mod policy;
mod raw;
mod swr;
mod validate;

use raw::RawConfig;
use validate::DEFAULT_MAX_CHUNK_SIZE;
use validate::Validator;

pub use policy::{TargetPolicy, TargetPolicyError};
#[cfg(test)]
use validate::DEFAULT_IDLE_TIMEOUT;

use crate::origin::Origin;
pub use crate::tls::ClientTls;

/// A value that must never be printed: `Debug` and `Display` show `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value, and remembers it so that text from other servers that echoes it
    /// is scrubbed (the redact module).
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

/// Where regtee's login to a registry comes from.
#[derive(Clone, Debug)]
pub enum Login {
    /// No credentials.
    Anonymous,
    /// A username and password from the config (or derived, as SWR's).
    Static(Credentials),
    /// A Docker credential helper: `docker-credential-<name> get` (or the program at this path,
    /// when it has a `/`), asked when needed and again when the registry stops accepting it.
    Helper(String),
    /// A Docker client config (`config.json`): its `credHelpers`, `credsStore` and `auths`, read
    /// as docker reads them, when needed and again when the registry stops accepting them.
    DockerConfig(PathBuf),
}

impl Login {
    /// The static credentials, if that is what the login is.
    pub fn fixed(&self) -> Option<&Credentials> {
        match self {
            Login::Static(c) => Some(c),
            _ => None,
        }
    }
}

/// A registry regtee talks to as a client: Harbor or a target.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// A short name used in logs and errors (`upstream`, or the target's name).
    pub name: String,
    /// Harbor or a target.
    pub side: Side,
    /// Where the registry lives.
    pub origin: Origin,
    /// How to verify its certificate.
    pub tls: ClientTls,
    /// Who regtee is there, and where that login comes from.
    pub login: Login,
    /// How long to wait for a TCP + TLS connection.
    pub connect_timeout: Duration,
    /// How long to wait for response headers once the request body is sent.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept; below the server's own limit.
    pub pool_idle_timeout: Duration,
    /// A mirror transfer that moves no byte for this long (a blob from Harbor that stalls, a
    /// registry that stops reading what regtee sends) is cut and retried.
    pub idle_timeout: Duration,
    /// How fast regtee may go there, shared by all its transfers.
    pub limits: RateLimits,
}

/// A registry's rate limits (`max_bytes_per_second`, `max_requests_per_second`); none by
/// default. They keep regtee's copies from saturating a shared uplink or a registry's quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Blob bytes a second, to or from the registry, metered in KiB.
    pub bytes_per_second: Option<std::num::NonZeroU64>,
    /// HTTP requests a second, token requests included.
    pub requests_per_second: Option<std::num::NonZeroU32>,
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
    /// The pull-through cache, if any.
    pub cache: Option<CacheConfig>,
}

/// `[cache]`: pulls served from verified copies on local disk.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The most bytes the cached entries may take; least recently used ones go first.
    pub max_size: u64,
    /// Where they are kept.
    pub dir: PathBuf,
    /// Targets to read from when Harbor cannot answer, in order.
    pub fallback_targets: Vec<String>,
}

/// How Harbor's registry trusts the tokens of Harbor's token service: what regtee checks a
/// client's Bearer token against to authorize reads Harbor cannot be asked about.
#[derive(Clone, Debug)]
pub struct TokenTrustConfig {
    /// The certificates Harbor's registry trusts (Harbor's `root.crt`, distribution's
    /// `rootcertbundle`).
    pub certificate: PathBuf,
    /// The tokens' `iss`.
    pub issuer: String,
    /// The tokens' `aud` (distribution's `service`).
    pub service: String,
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
    /// Checking clients' tokens locally, as Harbor's registry does.
    pub token_trust: Option<TokenTrustConfig>,
}

impl UpstreamConfig {
    /// Harbor as the destination of what is mirrored back from a target that is the primary:
    /// every repository under its own name, regtee's Harbor login (which then needs push
    /// rights), the default pace of a target.
    pub fn as_destination(&self) -> TargetConfig {
        TargetConfig {
            endpoint: self.endpoint.clone(),
            policy: TargetPolicy::identity(),
            overwrite: true,
            delete: true,
            concurrency: 4,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_attempts: 0,
            upload_chunk_size: 0,
            max_chunk_size: DEFAULT_MAX_CHUNK_SIZE,
            reconcile_interval: None,
            create: None,
        }
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// Holds the lock that keeps two servers on one directory apart, and the queue's SQLite
    /// file unless `database` names a PostgreSQL one.
    pub dir: PathBuf,
    /// How long finished jobs stay queryable.
    pub retention: Duration,
    /// The queue in PostgreSQL instead of SQLite, shared by every replica.
    pub database: Option<DatabaseConfig>,
}

/// A PostgreSQL server holding the queue.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    /// Where and as whom to connect; its `Debug` hides the password.
    pub connect: tokio_postgres::Config,
    /// Whether TLS is used (`sslmode` other than `disable`). When it is, the server's
    /// certificate is always verified, as libpq's `verify-full` does.
    pub tls: bool,
    /// CA certificates for the server's certificate (PEM); the system's roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// `host:port/dbname`, for logs and errors.
    pub shown: String,
    /// How long a claimed job stays a replica's without renewal: a dead replica's jobs run
    /// elsewhere within this.
    pub lease: Duration,
    /// How long one queue operation may take, connection included: past it, a push gets a 503
    /// instead of waiting on a database that accepts and then stalls.
    pub timeout: Duration,
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
    /// What regtee creates through the cloud's own API when the registry says it is missing.
    pub create: Option<CreateConfig>,
}

/// `create_missing`: what a target may lack that regtee creates before writing to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CreateMissing {
    /// The first path segment of a repository: a TCR or SWR namespace (organization), a
    /// Harbor project.
    Namespaces,
    /// Each repository (ECR, where every repository is created before its first push).
    Repositories,
}

/// `provider`: whose management API creates what is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// Tencent Cloud TCR Enterprise (TC3-HMAC-SHA256 signed API 2019-09-24).
    Tcr,
    /// Huawei Cloud SWR (SDK-HMAC-SHA256 signed API v2).
    Swr,
    /// Amazon ECR (SigV4 signed JSON 1.1 API).
    Ecr,
    /// Harbor as a target (its REST API v2.0, with the target's own login).
    Harbor,
}

impl Provider {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Tcr => "tcr",
            Provider::Swr => "swr",
            Provider::Ecr => "ecr",
            Provider::Harbor => "harbor",
        }
    }
}

/// Where the API's credentials come from.
#[derive(Clone, Debug)]
pub enum ApiKeys {
    /// An access key pair from the config (`access_key`, `secret_key`): TCR's SecretId and
    /// SecretKey, SWR's AK/SK, AWS's access key id and secret.
    Pair {
        /// Identifies the key; secret too, since it names the account.
        access_key: Secret,
        /// Signs requests; never sent.
        secret_key: Secret,
    },
    /// AWS's usual chain on this host, read at each call: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else the shared credentials file
    /// (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, profile `AWS_PROFILE`).
    AwsChain,
    /// The target's own username and password (Harbor's API takes the registry login).
    TargetLogin(Credentials),
}

/// `create_missing` with the provider API it uses.
#[derive(Clone, Debug)]
pub struct CreateConfig {
    /// Namespaces or repositories.
    pub what: CreateMissing,
    /// Whose API.
    pub provider: Provider,
    /// The API's endpoint: credentials go there and nowhere else.
    pub api: Origin,
    /// How to verify the API endpoint's certificate.
    pub api_tls: ClientTls,
    /// The cloud region (TCR's `X-TC-Region`, SWR's and ECR's endpoint and signing scope).
    pub region: String,
    /// TCR's instance id (`tcr-...`), ECR's registry (account) id.
    pub registry_id: Option<String>,
    /// SWR's project id (`X-Project-Id`), where the account needs one.
    pub project_id: Option<String>,
    /// The API's credentials.
    pub keys: ApiKeys,
    /// ECR: create repositories with `imageTagMutability = IMMUTABLE`.
    pub immutable_tags: bool,
    /// ECR: scan images on push.
    pub scan_on_push: bool,
}

/// Which side of regtee a registry is on: it decides whose configuration a fix names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Harbor, which regtee reads from.
    Upstream,
    /// A cloud registry, which regtee writes to.
    Target,
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
        .map_err(|e| e.without_secrets(&text))
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
        .map_err(|e| e.without_secrets(text))
    }
}

impl DatabaseConfig {
    /// A database named on the command line (`regtee state migrate --to URL`): the URL
    /// completed from the `PG*` variables as `[state] database` is, the password from
    /// `PGPASSWORD`.
    pub fn from_url(url: &str, env: EnvLookup<'_>) -> Result<DatabaseConfig, ConfigError> {
        let path = Path::new("--to");
        let raw = raw::RawState {
            database: Some(url.to_string()),
            ..Default::default()
        };
        let validator = Validator {
            path,
            base: Path::new("."),
            env,
            secrets_required: true,
        };
        validator
            .database(&raw)
            .and_then(|found| found.ok_or_else(|| validator.invalid("database", "no database URL")))
            .map_err(|e| e.without_secrets(url))
    }
}

impl ConfigError {
    /// The error with every secret of the config text taken out of its message: the values of
    /// keys that hold secrets (found line by line, so even text that is not valid TOML is
    /// covered), credentials in URLs, and every secret [`crate::redact`] knows.
    fn without_secrets(self, text: &str) -> ConfigError {
        let secrets = secret_values(text);
        let clean = |message: String| {
            let mut message = message;
            for secret in &secrets {
                message = message.replace(secret.as_str(), crate::redact::REDACTED);
            }
            crate::redact::remove_known(&message)
        };
        match self {
            ConfigError::Parse { path, message } => ConfigError::Parse {
                path,
                message: clean(message),
            },
            ConfigError::Invalid { path, key, message } => ConfigError::Invalid {
                path,
                key,
                message: clean(message),
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

/// The values of every `key = value` in `text` whose key holds a secret (`password`,
/// `secret`, `token`, `access_key`...; not `*_env`, `*_file` or `tls_key`, which name where a
/// secret is), quoted or not, inline tables included: what no error may show.
fn secret_values(text: &str) -> Vec<String> {
    const SECRET_KEYS: [&str; 4] = ["password", "secret", "token", "key"];
    let holds_secret = |key: &str| {
        SECRET_KEYS.iter().any(|k| key.contains(k))
            && !key.ends_with("_env")
            && !key.ends_with("_file")
            && key != "tls_key"
    };
    let mut found = Vec::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some(eq) = rest.find('=') {
            let key = rest[..eq]
                .trim_end()
                .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            let after = rest[eq + 1..].trim_start();
            let value = match after.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let body = &after[1..];
                    body.find(q).map_or(body, |end| &body[..end])
                }
                _ => after
                    .split(|c: char| c == ',' || c == '}' || c == '#' || c.is_whitespace())
                    .next()
                    .unwrap_or(""),
            };
            if holds_secret(&key) && value.len() >= 3 {
                found.push(value.to_string());
            }
            rest = &rest[eq + 1..];
        }
    }
    // Longest first, so a secret containing another is replaced whole.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The file as written. A syntax or type error names its line and column and never quotes the
/// line: it may hold a secret.
fn parse_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!("{at}{}", e.message().trim_end().replace('\n', " ")),
        }
        .without_secrets(text)
    })
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
    fn a_postgres_queue_is_completed_from_pg_variables_and_never_shows_its_password() {
        let with_env = |text: &str, vars: &'static [(&'static str, &'static str)]| {
            let env = move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            };
            Config::parse(text, Path::new("/etc/regtee/regtee.toml"), &env)
        };
        let state = |lines: &str| format!("{MINIMAL}\n[state]\n{lines}\n");
        let c = with_env(
            &state(r#"database = "postgres://db.internal/mirror?sslmode=verify-full""#),
            &[
                ("PGUSER", "svc"),
                ("PGPASSWORD", "pg-s3cret"),
                ("PGPORT", "6432"),
            ],
        )
        .unwrap();
        let db = c.state.database.unwrap();
        assert_eq!(db.shown, "db.internal:6432/mirror");
        assert_eq!(db.connect.get_user(), Some("svc"));
        assert_eq!(db.connect.get_password(), Some(&b"pg-s3cret"[..]));
        assert!(db.tls, "verify-full means TLS, verified");
        assert_eq!(db.lease, Duration::from_secs(30));
        assert!(!format!("{db:?}").contains("pg-s3cret"), "{db:?}");

        let e = with_env(&state(r#"database = "postgres://u:inline@db/x""#), &[]).unwrap_err();
        assert!(e.to_string().contains("database_password_env"), "{e}");
        assert!(!e.to_string().contains("inline"), "{e}");
        let e = with_env(&state(r#"database = "postgres://db/x?sslmode=allow""#), &[]).unwrap_err();
        assert!(e.to_string().contains("sslmode `allow`"), "{e}");
        let e = with_env(&state(r#"database_password_env = "X""#), &[]).unwrap_err();
        assert!(e.to_string().contains("needs `database`"), "{e}");
        assert!(
            with_env(
                &state(
                    r#"database = "postgres://db/x"
lease = "100ms""#
                ),
                &[]
            )
            .is_err()
        );
        assert_eq!(db.timeout, Duration::from_secs(5));
        let e = with_env(
            &state(
                r#"database = "postgres://db/x"
database_timeout = "50ms""#,
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("database_timeout"), "{e}");
        assert!(
            parse(MINIMAL).unwrap().state.database.is_none(),
            "SQLite by default"
        );
    }

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
        let creds = c.upstream.endpoint.login.fixed().unwrap();
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

    /// A secret written in the file appears in no error about the file: not in a syntax
    /// error (which would quote its line), a type error, or a URL that must not carry it.
    #[test]
    fn config_errors_never_show_the_secrets_written_in_the_file() {
        const SECRET: &str = "pa55-Wq9-zz71";
        let cases = [
            format!("[upstream]\nurl = \"https://h\"\npassword = \"{SECRET}\nusername = \"u\"\n"),
            format!(
                "[upstream]\nurl = \"https://h\"\nusername = \"u\"\npassword = \"{SECRET}\" x\n"
            ),
            format!("[upstream]\nurl = \"http://robot:{SECRET}@harbor.example.com\"\n"),
            format!(
                "[upstream]\nurl = \"https://h\"\n[[targets]]\nname = \"t\"\nurl = \"https://c\"\nusername = \"u\"\npassword = {{ v = \"{SECRET}\" }}\n"
            ),
            format!("[admin]\ntoken = \"{SECRET}\"\nlisten = 5\n[upstream]\nurl = \"https://h\"\n"),
            format!(
                "[state]\ndatabase = \"postgres://regtee:{SECRET}@db/regtee\"\n[upstream]\nurl = \"https://h\"\n"
            ),
        ];
        for case in cases {
            let text = format!("[proxy]\nlisten = \"127.0.0.1:5000\"\n{case}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(!err.contains(SECRET), "{err}");
            assert!(!err.contains("pa55"), "{err}");
        }
        let url = format!("postgres://regtee:{SECRET}@db/regtee");
        let err = DatabaseConfig::from_url(&url, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains(SECRET), "{err}");
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
        assert_eq!(c.upstream.endpoint.login.fixed().unwrap().username, "u");
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
    fn rate_limits_are_read_and_checked() {
        let c = parse(&format!(
            "{MINIMAL}max_bytes_per_second = 1048576
[[targets]]
name = \"a\"
url = \"https://a\"
max_requests_per_second = 20
"
        ))
        .unwrap();
        assert_eq!(
            c.upstream.endpoint.limits.bytes_per_second.map(|b| b.get()),
            Some(1_048_576)
        );
        assert_eq!(
            c.targets[0]
                .endpoint
                .limits
                .requests_per_second
                .map(|r| r.get()),
            Some(20)
        );
        assert!(c.targets[0].endpoint.limits.bytes_per_second.is_none());
        let err = parse(&format!(
            "{MINIMAL}max_bytes_per_second = 100
"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("upstream.max_bytes_per_second"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}
[[targets]]
name = \"a\"
url = \"https://a\"
max_requests_per_second = 0
"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("targets[0].max_requests_per_second"),
            "{err}"
        );
    }

    #[test]
    fn swr_credentials_are_derived() {
        let c = parse(&format!(
            "{MINIMAL}\n[[targets]]\nname = \"swr\"\nurl = \"https://swr.cn-north-4.myhuaweicloud.com\"\nauth = \"swr-aksk\"\nregion = \"cn-north-4\"\naccess_key = \"AK\"\nsecret_key = \"SK\"\n"
        ))
        .unwrap();
        let creds = c.targets[0].endpoint.login.fixed().unwrap();
        assert_eq!(creds.username, "cn-north-4@AK");
    }

    #[test]
    fn create_missing_needs_a_provider_that_creates_that_kind_and_its_settings() {
        let target = |lines: &str| {
            parse(&format!(
                "{MINIMAL}\n[[targets]]\nname = \"t\"\nurl = \"https://t\"\n{lines}"
            ))
        };
        let refused = |lines: &str, key: &str, says: &str| {
            let err = target(lines).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(says), "{lines}: {err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        };
        refused(
            "create_missing = \"namespaces\"",
            "targets[0].provider",
            "needs provider",
        );
        refused(
            "create_missing = \"namespaces\"\nprovider = \"ecr\"\nregion = \"us-east-1\"",
            "targets[0].create_missing",
            "ECR has no namespaces",
        );
        refused(
            "create_missing = \"namespaces\"\nprovider = \"tcr\"\nregion = \"ap-guangzhou\"\naccess_key = \"id\"\nsecret_key = \"s3cr3t\"",
            "targets[0].registry_id",
            "instance id",
        );
        refused(
            "create_missing = \"namespaces\"\nprovider = \"swr\"\nregion = \"cn-north-4/../x\"\naccess_key = \"id\"\nsecret_key = \"s3cr3t\"",
            "targets[0].region",
            "not a region",
        );
        refused(
            "create_missing = \"namespaces\"\nprovider = \"swr\"\nregion = \"cn-north-4\"\nsecret_key = \"s3cr3t\"",
            "targets[0].access_key",
            "API key pair",
        );
        refused(
            "immutable_tags = true",
            "targets[0].immutable_tags",
            "only used with create_missing",
        );
        let ecr = target("create_missing = \"repositories\"\nprovider = \"ecr\"\nregion = \"eu-west-1\"\nimmutable_tags = true").unwrap();
        let create = ecr.targets[0].create.as_ref().unwrap();
        assert_eq!(
            create.api.to_string(),
            "https://api.ecr.eu-west-1.amazonaws.com"
        );
        assert!(matches!(create.keys, ApiKeys::AwsChain) && create.immutable_tags);
        let swr = target("create_missing = \"namespaces\"\nprovider = \"swr\"\nregion = \"cn-north-4\"\naccess_key = \"id\"\nsecret_key = \"s3cr3t\"").unwrap();
        assert_eq!(
            swr.targets[0].create.as_ref().unwrap().api.to_string(),
            "https://swr-api.cn-north-4.myhuaweicloud.com"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let env = |name: &str| Some(format!("value-of-{name}"));
        let c = Config::parse(
            include_str!("../../regtee.example.toml"),
            Path::new("/etc/regtee/regtee.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(c.targets[0].max_chunk_size, DEFAULT_MAX_CHUNK_SIZE);
        assert_eq!(c.upstream.endpoint.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    }
}
