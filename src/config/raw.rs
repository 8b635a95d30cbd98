//! The configuration file as written: serde's view of the TOML, every key optional where it
//! has a default, unknown keys refused. Nothing here is checked beyond its type; `validate` does
//! that.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{CreateMissing, LogFormat, Provider, TargetAuth};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) proxy: RawProxy,
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) state: RawState,
    pub(super) admin: Option<RawAdmin>,
    pub(super) webhooks: Option<RawWebhooks>,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) targets: Vec<RawTarget>,
    pub(super) cache: Option<RawCache>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) max_size: Option<bytesize::ByteSize>,
    pub(super) dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) fallback_targets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) listen: Option<String>,
    pub(super) tls_listen: Option<String>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub(super) header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) body_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_grace: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: String,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) insecure_skip_verify: bool,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) credential_helper: Option<String>,
    pub(super) docker_config: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub(super) connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) pool_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_bytes_per_second: Option<u64>,
    pub(super) max_requests_per_second: Option<u32>,
    pub(super) rewrite_token_realm: Option<bool>,
    pub(super) token_certificate: Option<PathBuf>,
    pub(super) token_issuer: Option<String>,
    pub(super) token_service: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) dir: Option<PathBuf>,
    pub(super) database: Option<String>,
    pub(super) database_password_env: Option<String>,
    pub(super) database_password_file: Option<PathBuf>,
    pub(super) database_ca_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub(super) lease: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) database_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retention: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: String,
    pub(super) token: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhooks {
    pub(super) secret: Option<String>,
    pub(super) secret_env: Option<String>,
    pub(super) secret_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) level: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) auth: Option<TargetAuth>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) credential_helper: Option<String>,
    pub(super) docker_config: Option<PathBuf>,
    pub(super) region: Option<String>,
    pub(super) access_key: Option<String>,
    pub(super) access_key_env: Option<String>,
    pub(super) access_key_file: Option<PathBuf>,
    pub(super) secret_key: Option<String>,
    pub(super) secret_key_env: Option<String>,
    pub(super) secret_key_file: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) insecure_skip_verify: bool,
    #[serde(default)]
    pub(super) namespaces: BTreeMap<String, String>,
    pub(super) include: Option<Vec<String>>,
    #[serde(default)]
    pub(super) exclude: Vec<String>,
    pub(super) tags: Option<Vec<String>>,
    pub(super) overwrite: Option<bool>,
    #[serde(default)]
    pub(super) delete: bool,
    pub(super) concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_max: Option<Duration>,
    pub(super) max_attempts: Option<u32>,
    pub(super) upload_chunk_size: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) reconcile_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_chunk_size: Option<u64>,
    pub(super) max_bytes_per_second: Option<u64>,
    pub(super) max_requests_per_second: Option<u32>,
    pub(super) create_missing: Option<CreateMissing>,
    pub(super) provider: Option<Provider>,
    pub(super) api_url: Option<String>,
    pub(super) api_ca_file: Option<PathBuf>,
    pub(super) registry_id: Option<String>,
    pub(super) project_id: Option<String>,
    pub(super) immutable_tags: Option<bool>,
    pub(super) scan_on_push: Option<bool>,
}
