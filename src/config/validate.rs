//! Validation: the file as written becomes typed values, once, with one clear error naming the
//! key at fault. Secrets are read here, from the file, the environment or a file of their own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::policy::TargetPolicyError;
use super::raw::*;
use super::*;
use crate::origin::Origin;

/// Default for `idle_timeout`: long enough for a busy registry, short enough that a stalled
/// transfer does not hold a worker for long.
pub(super) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Default for `max_chunk_size`: the largest `OCI-Chunk-Min-Length` regtee accepts from a target.
pub(super) const DEFAULT_MAX_CHUNK_SIZE: u64 = 256 * 1024 * 1024;

pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
    pub(super) base: &'a Path,
    pub(super) env: EnvLookup<'a>,
    /// When false, a secret that cannot be found is left empty instead of failing.
    pub(super) secrets_required: bool,
}

/// Where a secret may come from; at most one of the three may be set.
struct SecretSource<'r> {
    key: &'r str,
    inline: Option<&'r str>,
    env: Option<&'r str>,
    file: Option<&'r Path>,
}

impl Validator<'_> {
    pub(super) fn invalid(
        &self,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
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

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
            database: self.database(&raw.state)?,
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
        let cache = match raw.cache {
            Some(c) => self.cache(c, &state, &targets)?,
            None => None,
        };
        Ok(Config {
            proxy,
            upstream,
            state,
            admin,
            webhook_secret,
            targets,
            log,
            cache,
        })
    }

    /// `[cache]`: none without a size; its directory under the state directory by default;
    /// fallback targets must be configured targets.
    fn cache(
        &self,
        raw: RawCache,
        state: &StateConfig,
        targets: &[TargetConfig],
    ) -> Result<Option<CacheConfig>, ConfigError> {
        let max_size = raw.max_size.map_or(0, |s| s.as_u64());
        if max_size == 0 {
            if !raw.fallback_targets.is_empty() {
                return Err(self.invalid(
                    "cache.fallback_targets",
                    "fallback reads come from the cache's verified copies: set cache.max_size",
                ));
            }
            return Ok(None);
        }
        for (i, name) in raw.fallback_targets.iter().enumerate() {
            if !targets.iter().any(|t| &t.endpoint.name == name) {
                return Err(self.invalid(
                    format!("cache.fallback_targets[{i}]"),
                    format!("no target named `{name}` in [[targets]]"),
                ));
            }
        }
        Ok(Some(CacheConfig {
            max_size,
            dir: raw
                .dir
                .map(|d| self.resolve_path(&d))
                .unwrap_or_else(|| state.dir.join("cache")),
            fallback_targets: raw.fallback_targets,
        }))
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

    /// The one place a login may come from: a password, a credential helper or a docker config.
    fn login_source(
        &self,
        section: &str,
        credentials: Option<Credentials>,
        helper: Option<String>,
        docker_config: Option<PathBuf>,
    ) -> Result<Login, ConfigError> {
        match (credentials, helper, docker_config) {
            (None, None, None) => Ok(Login::Anonymous),
            (Some(c), None, None) => Ok(Login::Static(c)),
            (None, Some(h), None) => {
                let valid = !h.is_empty()
                    && (h.contains('/')
                        || h.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
                if !valid {
                    return Err(self.invalid(
                        format!("{section}.credential_helper"),
                        "name a helper as docker does (`ecr-login` runs docker-credential-ecr-login), or give its path",
                    ));
                }
                Ok(Login::Helper(h))
            }
            (None, None, Some(path)) => Ok(Login::DockerConfig(self.docker_config_path(&path))),
            _ => Err(self.invalid(
                format!("{section}.credential_helper"),
                "set one login: username and password, credential_helper, or docker_config",
            )),
        }
    }

    /// `~` expanded; a directory means its `config.json`, as `$DOCKER_CONFIG` does.
    fn docker_config_path(&self, path: &Path) -> PathBuf {
        let expanded = match path.strip_prefix("~") {
            Ok(rest) => match (self.env)("HOME") {
                Some(home) => PathBuf::from(home).join(rest),
                None => path.to_path_buf(),
            },
            Err(_) => self.resolve_path(path),
        };
        if expanded.is_dir() {
            expanded.join("config.json")
        } else {
            expanded
        }
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

    /// `max_bytes_per_second` and `max_requests_per_second` of a section (`upstream`,
    /// `targets[0]`).
    fn rate_limits(
        &self,
        section: &str,
        bytes: Option<u64>,
        requests: Option<u32>,
    ) -> Result<RateLimits, ConfigError> {
        let bytes_per_second = match bytes {
            None => None,
            Some(b) if b < 1024 => {
                return Err(self.invalid(
                    format!("{section}.max_bytes_per_second"),
                    "must be at least 1024 (bytes a second; regtee meters in KiB)",
                ));
            }
            Some(b) => std::num::NonZeroU64::new(b),
        };
        let requests_per_second = match requests {
            None => None,
            Some(0) => {
                return Err(self.invalid(
                    format!("{section}.max_requests_per_second"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
            Some(r) => std::num::NonZeroU32::new(r),
        };
        Ok(RateLimits {
            bytes_per_second,
            requests_per_second,
        })
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
        let login = self.login_source(
            "upstream",
            credentials,
            raw.credential_helper,
            raw.docker_config,
        )?;
        Ok(UpstreamConfig {
            endpoint: Endpoint {
                name: "upstream".to_string(),
                side: crate::config::Side::Upstream,
                origin,
                tls: ClientTls {
                    ca_file: self.ca_file("upstream.ca_file", raw.ca_file)?,
                    insecure_skip_verify: raw.insecure_skip_verify,
                },
                login,
                connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(10)),
                response_timeout: raw.response_timeout.unwrap_or(Duration::from_secs(600)),
                pool_idle_timeout: raw.pool_idle_timeout.unwrap_or(Duration::from_secs(50)),
                idle_timeout: self.positive(
                    "upstream.idle_timeout",
                    raw.idle_timeout,
                    DEFAULT_IDLE_TIMEOUT,
                )?,
                limits: self.rate_limits(
                    "upstream",
                    raw.max_bytes_per_second,
                    raw.max_requests_per_second,
                )?,
            },
            rewrite_token_realm: raw.rewrite_token_realm.unwrap_or(true),
            token_trust: match raw.token_certificate {
                Some(certificate) => Some(TokenTrustConfig {
                    certificate: self
                        .ca_file("upstream.token_certificate", Some(certificate))?
                        .unwrap_or_default(),
                    issuer: raw
                        .token_issuer
                        .unwrap_or_else(|| "harbor-token-issuer".to_string()),
                    service: raw
                        .token_service
                        .unwrap_or_else(|| "harbor-registry".to_string()),
                }),
                None if raw.token_issuer.is_some() || raw.token_service.is_some() => {
                    return Err(self.invalid(
                        "upstream.token_certificate",
                        "token_issuer and token_service are checked against tokens only with the certificate they are signed under: set token_certificate",
                    ));
                }
                None => None,
            },
        })
    }

    /// `[state] database`: a libpq-style URL, completed from the standard `PG*` variables
    /// as libpq would (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`,
    /// `PGSSLROOTCERT`). A password in the URL is refused: it would end up wherever the URL is
    /// shown.
    pub(super) fn database(&self, raw: &RawState) -> Result<Option<DatabaseConfig>, ConfigError> {
        let key = "state.database";
        let Some(url) = raw.database.as_deref() else {
            if raw.database_password_env.is_some() || raw.database_password_file.is_some() {
                return Err(self.invalid(key, "a database password needs `database`"));
            }
            return Ok(None);
        };
        let var = |name: &str| (self.env)(name).filter(|v| !v.is_empty());
        let (url, sslmode) = split_sslmode(url);
        let mut connect = self.database_url(&url)?;
        let password = self
            .secret(SecretSource {
                key: "state.database_password",
                inline: None,
                env: raw.database_password_env.as_deref(),
                file: raw.database_password_file.as_deref(),
            })?
            .or_else(|| var("PGPASSWORD").map(Secret::new));
        if let Some(p) = &password {
            connect.password(p.expose());
        }
        let tls = self.database_tls(sslmode.or_else(|| var("PGSSLMODE")))?;
        let ca_file = raw
            .database_ca_file
            .as_deref()
            .map(|p| self.resolve_path(p))
            .or_else(|| var("PGSSLROOTCERT").map(PathBuf::from));
        let shown = shown_database(&connect);
        let lease = raw.lease.unwrap_or(Duration::from_secs(30));
        if lease < Duration::from_secs(1) {
            return Err(self.invalid(
                "state.lease",
                "a lease shorter than 1s cannot be renewed in time",
            ));
        }
        let timeout = raw.database_timeout.unwrap_or(Duration::from_secs(5));
        if timeout < Duration::from_millis(100) {
            return Err(self.invalid(
                "state.database_timeout",
                "under 100ms, a busy but healthy database would refuse pushes",
            ));
        }
        Ok(Some(DatabaseConfig {
            connect,
            tls,
            ca_file,
            shown,
            lease,
            timeout,
        }))
    }

    /// The URL as tokio-postgres reads it, with what it leaves out taken from `PGPORT`,
    /// `PGHOST`, `PGUSER` and `PGDATABASE`; a password in it is refused.
    fn database_url(&self, url: &str) -> Result<tokio_postgres::Config, ConfigError> {
        let key = "state.database";
        let var = |name: &str| (self.env)(name).filter(|v| !v.is_empty());
        let mut url = url.to_string();
        // tokio-postgres fills in 5432 when the URL names no port, so PGPORT goes into the URL.
        if let Some(port) = var("PGPORT")
            && let Ok(mut parsed) = url::Url::parse(&url)
            && parsed.port().is_none()
            && parsed.has_host()
        {
            let port = port
                .parse::<u16>()
                .map_err(|_| self.invalid(key, format!("PGPORT `{port}` is not a port")))?;
            if parsed.set_port(Some(port)).is_ok() {
                url = parsed.to_string();
            }
        }
        let mut connect: tokio_postgres::Config = url.parse().map_err(|e| {
            self.invalid(
                key,
                format!("not a PostgreSQL URL like postgres://regtee@db:5432/regtee: {e}"),
            )
        })?;
        if connect.get_password().is_some() {
            return Err(self.invalid(
                key,
                "put the password in `database_password_env` or `database_password_file` (or PGPASSWORD), not in the URL",
            ));
        }
        if connect.get_hosts().is_empty() {
            connect.host(var("PGHOST").as_deref().unwrap_or("localhost"));
        }
        if connect.get_user().is_none() {
            connect.user(var("PGUSER").as_deref().unwrap_or("regtee"));
        }
        if connect.get_dbname().is_none() {
            connect.dbname(var("PGDATABASE").as_deref().unwrap_or("regtee"));
        }
        Ok(connect)
    }

    /// Whether to speak TLS to the database, from libpq's `sslmode`; any mode but `disable`
    /// verifies the server's certificate as `verify-full` does.
    fn database_tls(&self, sslmode: Option<String>) -> Result<bool, ConfigError> {
        match sslmode.as_deref() {
            None | Some("disable") => Ok(false),
            Some("prefer" | "require" | "verify-ca" | "verify-full") => Ok(true),
            Some(other) => Err(self.invalid(
                "state.database",
                format!("sslmode `{other}`: use disable, require or verify-full"),
            )),
        }
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
        if raw.name == "upstream" {
            return Err(self.invalid(
                key("name"),
                "`upstream` names Harbor (as the primary, and where a primary target mirrors back to): choose another name",
            ));
        }
        let origin = self.origin(&key("url"), &raw.url)?;
        let credentials = self.target_credentials(i, &raw)?;
        let create = self.target_create(i, &raw, &origin, credentials.as_ref())?;
        let login = self.login_source(
            &format!("targets[{i}]"),
            credentials,
            raw.credential_helper.clone(),
            raw.docker_config.clone(),
        )?;
        let policy = TargetPolicy::new(
            raw.namespaces.clone(),
            raw.include.as_deref().unwrap_or(&["**".to_string()]),
            &raw.exclude,
            raw.tags.as_deref().unwrap_or(&["**".to_string()]),
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
            endpoint: self.target_endpoint(i, &raw, origin, login)?,
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
            create,
        })
    }

    /// `create_missing` and the provider API it needs: each provider creates one kind of
    /// thing, and needs its region, ids and keys.
    fn target_create(
        &self,
        i: usize,
        raw: &RawTarget,
        target: &Origin,
        login: Option<&Credentials>,
    ) -> Result<Option<CreateConfig>, ConfigError> {
        let key = |k: &str| format!("targets[{i}].{k}");
        let Some(what) = raw.create_missing else {
            let stray = [
                ("provider", raw.provider.is_some()),
                ("api_url", raw.api_url.is_some()),
                ("registry_id", raw.registry_id.is_some()),
                ("immutable_tags", raw.immutable_tags.is_some()),
                ("scan_on_push", raw.scan_on_push.is_some()),
            ];
            return match stray.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(self.invalid(
                    key(name),
                    "only used with create_missing = \"namespaces\" or \"repositories\"",
                )),
                None => Ok(None),
            };
        };
        let provider = raw.provider.ok_or_else(|| {
            self.invalid(
                key("provider"),
                "create_missing needs provider = \"tcr\", \"swr\", \"ecr\" or \"harbor\"",
            )
        })?;
        let expected = match provider {
            Provider::Ecr => CreateMissing::Repositories,
            Provider::Tcr | Provider::Swr | Provider::Harbor => CreateMissing::Namespaces,
        };
        if what != expected {
            return Err(self.invalid(
                key("create_missing"),
                match provider {
                    Provider::Ecr => "ECR has no namespaces: use create_missing = \"repositories\"",
                    _ => "this provider creates namespaces, and repositories appear with their first push: use create_missing = \"namespaces\"",
                },
            ));
        }
        let region = match (provider, raw.region.as_deref()) {
            (Provider::Harbor, region) => region.unwrap_or_default().to_string(),
            (_, Some(region)) if is_region(region) => region.to_string(),
            (_, Some(region)) => {
                return Err(self.invalid(
                    key("region"),
                    format!(
                        "`{region}` is not a region like ap-guangzhou, cn-north-4 or us-east-1"
                    ),
                ));
            }
            (_, None) => {
                return Err(self.invalid(
                    key("region"),
                    format!("provider = \"{}\" needs the region", provider.as_str()),
                ));
            }
        };
        if provider == Provider::Tcr && raw.registry_id.is_none() {
            return Err(self.invalid(
                key("registry_id"),
                "provider = \"tcr\" needs the instance id (registry_id = \"tcr-...\")",
            ));
        }
        for (name, value) in [
            ("registry_id", &raw.registry_id),
            ("project_id", &raw.project_id),
        ] {
            if let Some(v) = value
                && (v.is_empty()
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            {
                return Err(self.invalid(key(name), "use letters, digits, `-` and `_` only"));
            }
        }
        let api = match raw.api_url.as_deref() {
            Some(url) => self.origin(&key("api_url"), url)?,
            None => match provider {
                Provider::Tcr => self.origin(&key("api_url"), "https://tcr.tencentcloudapi.com")?,
                Provider::Swr => self.origin(
                    &key("api_url"),
                    &format!("https://swr-api.{region}.myhuaweicloud.com"),
                )?,
                Provider::Ecr => self.origin(
                    &key("api_url"),
                    &format!("https://api.ecr.{region}.amazonaws.com"),
                )?,
                Provider::Harbor => target.clone(),
            },
        };
        let keys = match provider {
            Provider::Harbor => ApiKeys::TargetLogin(login.cloned().ok_or_else(|| {
                self.invalid(
                    key("username"),
                    "provider = \"harbor\" calls Harbor's API with the target's username and password(_env/_file)",
                )
            })?),
            _ => {
                let access_key = self.secret(SecretSource {
                    key: &key("access_key"),
                    inline: raw.access_key.as_deref(),
                    env: raw.access_key_env.as_deref(),
                    file: raw.access_key_file.as_deref(),
                })?;
                let secret_key = self.secret(SecretSource {
                    key: &key("secret_key"),
                    inline: raw.secret_key.as_deref(),
                    env: raw.secret_key_env.as_deref(),
                    file: raw.secret_key_file.as_deref(),
                })?;
                match (access_key, secret_key) {
                    (Some(access_key), Some(secret_key)) => ApiKeys::Pair {
                        access_key,
                        secret_key,
                    },
                    (None, None) if provider == Provider::Ecr => ApiKeys::AwsChain,
                    _ => {
                        return Err(self.invalid(
                            key("access_key"),
                            format!(
                                "provider = \"{}\" needs the API key pair: access_key(_env/_file) and secret_key(_env/_file)",
                                provider.as_str()
                            ),
                        ));
                    }
                }
            }
        };
        Ok(Some(CreateConfig {
            what,
            provider,
            api,
            api_tls: ClientTls {
                ca_file: self.ca_file(&key("api_ca_file"), raw.api_ca_file.clone())?,
                insecure_skip_verify: false,
            },
            region,
            registry_id: raw.registry_id.clone(),
            project_id: raw.project_id.clone(),
            keys,
            immutable_tags: raw.immutable_tags.unwrap_or(false),
            scan_on_push: raw.scan_on_push.unwrap_or(false),
        }))
    }

    /// A target's login as written: a username and password, or SWR's access key pair, from
    /// which regtee derives the long-term login.
    fn target_credentials(
        &self,
        i: usize,
        raw: &RawTarget,
    ) -> Result<Option<Credentials>, ConfigError> {
        let key = |k: &str| format!("targets[{i}].{k}");
        match raw.auth.unwrap_or(TargetAuth::Password) {
            TargetAuth::Password => {
                let password = self.secret(SecretSource {
                    key: &key("password"),
                    inline: raw.password.as_deref(),
                    env: raw.password_env.as_deref(),
                    file: raw.password_file.as_deref(),
                })?;
                self.login(&format!("targets[{i}]"), raw.username.clone(), password)
            }
            TargetAuth::SwrAksk => {
                let region = raw.region.as_deref().ok_or_else(|| {
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
                Ok(Some(super::swr::swr_login(region, &ak, &sk)))
            }
        }
    }

    /// How regtee reaches a target: its origin, TLS, login, timeouts and rate limits.
    fn target_endpoint(
        &self,
        i: usize,
        raw: &RawTarget,
        origin: Origin,
        login: Login,
    ) -> Result<Endpoint, ConfigError> {
        let key = |k: &str| format!("targets[{i}].{k}");
        Ok(Endpoint {
            name: raw.name.clone(),
            side: crate::config::Side::Target,
            origin,
            tls: ClientTls {
                ca_file: self.ca_file(&key("ca_file"), raw.ca_file.clone())?,
                insecure_skip_verify: raw.insecure_skip_verify,
            },
            login,
            connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(10)),
            response_timeout: raw.response_timeout.unwrap_or(Duration::from_secs(600)),
            pool_idle_timeout: Duration::from_secs(50),
            idle_timeout: self.positive(
                &key("idle_timeout"),
                raw.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
            )?,
            limits: self.rate_limits(
                &format!("targets[{i}]"),
                raw.max_bytes_per_second,
                raw.max_requests_per_second,
            )?,
        })
    }
}

/// `host:port/dbname`, for logs and errors (never the user or password).
fn shown_database(connect: &tokio_postgres::Config) -> String {
    format!(
        "{}:{}/{}",
        match connect.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        },
        connect.get_ports().first().copied().unwrap_or(5432),
        connect.get_dbname().unwrap_or_default()
    )
}

/// Takes libpq's `sslmode` out of a URL's query: tokio-postgres knows only some of its values,
/// and regtee decides TLS itself.
fn split_sslmode(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut mode = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("sslmode=") {
            Some(m) => {
                mode = Some(m.to_string());
                false
            }
            None => true,
        })
        .collect();
    if rest.is_empty() {
        (base.to_string(), mode)
    } else {
        (format!("{base}?{}", rest.join("&")), mode)
    }
}

/// A cloud region's name: lowercase letters, digits and `-` (it becomes part of a host name).
fn is_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}
