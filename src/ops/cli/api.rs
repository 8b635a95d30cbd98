//! How the commands reach the queue: a running server's admin API (the only safe way to touch
//! a live queue), or the state directory itself when no server holds it; and why they fail.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode, header};
use serde::de::DeserializeOwned;

use crate::body::{self, read_limited};
use crate::config::{AdminConfig, ClientTls, Config};
use crate::http_client::{self, HttpClient};
use crate::oci::names::NameError;
use crate::queue::state_lock::StateLock;
use crate::queue::{Queue, QueueError};
use crate::registry::RegistryError;

/// Why a command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The state directory's queue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Harbor or a target.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A name given on the command line.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A certificate or CA for a connection.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The server's admin API did not answer.
    #[error(
        "cannot reach regtee's admin API at {base} (is `regtee serve` running with this config?)"
    )]
    AdminUnreachable {
        /// Where it was asked.
        base: String,
        /// Why.
        source: hyper_util::client::legacy::Error,
    },
    /// The admin API refused the token, or got none.
    #[error(
        "the admin API wants a token: set [admin] token_env/token_file in this config as the server has it"
    )]
    AdminToken,
    /// The admin API said no.
    #[error("admin API: {status}: {message}")]
    Admin {
        /// Its status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
    /// The admin API's answer did not parse (another version of regtee?).
    #[error("admin API answer")]
    AdminAnswer(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A server runs on the state directory but cannot be asked.
    #[error(
        "a regtee server is using {0} but has no [admin] listener to ask: add one to the config"
    )]
    NoAdmin(std::path::PathBuf),
    /// The request makes no sense for this configuration or queue.
    #[error("{0}")]
    Refused(String),
}

/// A running server's admin API.
pub(super) struct AdminClient {
    base: String,
    token: Option<crate::config::Secret>,
    http: HttpClient,
}

impl AdminClient {
    pub(super) fn new(admin: &AdminConfig) -> Result<AdminClient, CliError> {
        let mut addr = admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        Ok(AdminClient {
            base: format!("http://{addr}"),
            token: admin.token.clone(),
            http: http_client::build(
                &ClientTls::default(),
                Duration::from_secs(5),
                Duration::from_secs(10),
                Duration::from_secs(30),
            )?,
        })
    }

    /// `method path` with a JSON body, as the token allows; the status and the body, whatever
    /// the status (for answers whose refusals carry more than a message).
    pub(super) async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, bytes::Bytes), CliError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let request = request
            .body(body.map(body::full).unwrap_or_else(body::empty))
            .map_err(|e| CliError::AdminAnswer(e.into()))?;
        let response =
            self.http
                .request(request)
                .await
                .map_err(|source| CliError::AdminUnreachable {
                    base: self.base.clone(),
                    source,
                })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(CliError::AdminToken);
        }
        let bytes = read_limited(response.into_body(), 64 * 1024 * 1024)
            .await
            .map_err(CliError::AdminAnswer)?;
        Ok((status, bytes))
    }

    /// The status of a bare `GET path` (a probe: `/healthz`), its body discarded.
    pub(super) async fn probe(&self, path: &str) -> Result<StatusCode, CliError> {
        Ok(self.call_raw(Method::GET, path, None).await?.0)
    }

    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, CliError> {
        let (status, bytes) = self.call_raw(method, path, body).await?;
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::AdminAnswer(e.into()))
    }
}

/// The admin API's refusal: its `error` message, else its body.
pub(super) fn refusal(status: StatusCode, bytes: &[u8]) -> CliError {
    let message = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
    CliError::Admin { status, message }
}

/// Where the CLI gets its answers.
pub(super) enum Backend {
    Api(Box<AdminClient>),
    Local(Arc<Queue>),
}

/// A PostgreSQL queue is read and written directly (replicas share it safely); a SQLite queue
/// directly only while no server holds its directory, else through that server's admin API.
pub(super) async fn backend(config: &Config) -> Result<Backend, CliError> {
    if config.state.database.is_some() {
        return Ok(Backend::Local(Arc::new(
            Queue::open_state(&config.state).await?,
        )));
    }
    if StateLock::is_held(&config.state.dir) {
        let admin = config
            .admin
            .as_ref()
            .ok_or_else(|| CliError::NoAdmin(config.state.dir.clone()))?;
        return Ok(Backend::Api(Box::new(AdminClient::new(admin)?)));
    }
    Ok(Backend::Local(Arc::new(Queue::open(&config.state.dir)?)))
}
