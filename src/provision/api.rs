//! One small, signed request to a cloud's management API and its answer, bounded: the answer
//! is read up to 256 KiB, within a timeout, and a redirect is never followed (the API's
//! credentials belong to its endpoint, not to a host an answer names).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::config::Provider;
use crate::http_client::HttpClient;
use crate::origin::Origin;
use crate::tls::ClientTls;

/// The most of an API answer regtee reads: the answers it needs are a few hundred bytes.
const MAX_ANSWER: usize = 256 * 1024;
/// How long one API call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong calling a provider's API.
#[derive(Clone, Debug)]
pub(crate) enum ApiErrorKind {
    /// No connection, or it broke.
    Unreachable(String),
    /// No answer in time.
    Timeout,
    /// The key pair (or login) was refused: unknown key, bad signature, expired token.
    Credentials(String),
    /// The key is valid but may not do this.
    Denied(String),
    /// Too many calls.
    Throttled(String),
    /// The API failed on its side.
    Server(String),
    /// The API refused the request (a wrong instance id, a quota, an invalid name).
    Rejected(String),
    /// An answer that makes no sense (or a redirect, which is not followed).
    Protocol(String),
}

/// A failed call to a provider's management API.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{provider} API: {operation}: {kind}")]
pub(crate) struct ApiError {
    /// Whose API.
    pub(crate) provider: &'static str,
    /// What was asked, e.g. `CreateNamespace prod-lib`.
    pub(crate) operation: String,
    /// What went wrong.
    pub(crate) kind: ApiErrorKind,
}

impl std::fmt::Display for ApiErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiErrorKind::Unreachable(m) => write!(f, "unreachable: {m}"),
            ApiErrorKind::Timeout => f.write_str("timed out"),
            ApiErrorKind::Credentials(m) => write!(f, "credentials refused: {m}"),
            ApiErrorKind::Denied(m) => write!(f, "not allowed: {m}"),
            ApiErrorKind::Throttled(m) => write!(f, "throttled: {m}"),
            ApiErrorKind::Server(m) => write!(f, "server error: {m}"),
            ApiErrorKind::Rejected(m) => write!(f, "refused: {m}"),
            ApiErrorKind::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

impl ApiErrorKind {
    /// Whether asking again cannot help until an operator changes something: the key, its
    /// permission, or the request's settings (not an outage, a timeout or throttling).
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApiErrorKind::Credentials(_) | ApiErrorKind::Denied(_) | ApiErrorKind::Rejected(_)
        )
    }

    /// What an HTTP status says, for APIs that answer errors by status (Harbor's, SWR's and the
    /// API gateway in front of it): `401` the key, `403` the permission, `429`, `5xx`.
    pub(crate) fn of_status(status: StatusCode, text: String) -> ApiErrorKind {
        match status {
            StatusCode::UNAUTHORIZED => ApiErrorKind::Credentials(text),
            StatusCode::FORBIDDEN => ApiErrorKind::Denied(text),
            StatusCode::TOO_MANY_REQUESTS => ApiErrorKind::Throttled(text),
            s if s.is_server_error() => ApiErrorKind::Server(text),
            _ => ApiErrorKind::Rejected(text),
        }
    }
}

impl ApiError {
    pub(crate) fn new(provider: Provider, operation: &str, kind: ApiErrorKind) -> ApiError {
        ApiError {
            provider: provider.as_str(),
            operation: operation.to_string(),
            kind,
        }
    }

    /// Whether trying again later can help.
    pub(crate) fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ApiErrorKind::Unreachable(_)
                | ApiErrorKind::Timeout
                | ApiErrorKind::Throttled(_)
                | ApiErrorKind::Server(_)
        )
    }
}

/// Text from a provider, fit for a log line and a job's detail: regtee's own secrets scrubbed
/// out (an API may echo a key id back), and short.
pub(crate) fn shown(text: &str) -> String {
    let text = crate::redact::scrub(text.trim());
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// An answer: its status and its (small) body.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

impl Answer {
    /// The body as JSON, or `Null` when it is not JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A pooled client bound to one API endpoint.
pub(crate) struct ApiClient {
    client: HttpClient,
    /// Where every call goes; the only origin that sees the API's credentials.
    pub(crate) origin: Origin,
    provider: Provider,
}

impl ApiClient {
    pub(crate) fn new(
        provider: Provider,
        origin: Origin,
        tls: &ClientTls,
    ) -> Result<ApiClient, crate::tls::TlsError> {
        Ok(ApiClient {
            client: crate::http_client::build(
                tls,
                Duration::from_secs(10),
                Duration::from_secs(30),
                CALL_TIMEOUT,
            )?,
            origin,
            provider,
        })
    }

    /// The `Host` header value for signing: the endpoint's authority.
    pub(crate) fn host(&self) -> String {
        self.origin.authority()
    }

    /// Sends one request to `path_and_query` on the endpoint, with these headers and body.
    pub(crate) async fn call(
        &self,
        operation: &str,
        method: Method,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Answer, ApiError> {
        let error = |kind| ApiError::new(self.provider, operation, kind);
        let uri = self
            .origin
            .join(path_and_query)
            .map_err(|e| error(ApiErrorKind::Protocol(e.to_string())))?;
        let mut request = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(crate::body::full(body))
            .map_err(|e| error(ApiErrorKind::Protocol(e.to_string())))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error(ApiErrorKind::Unreachable(shown(&e.to_string()))))?;
            let status = response.status();
            let body = crate::body::read_limited(response.into_body(), MAX_ANSWER)
                .await
                .map_err(|e| error(ApiErrorKind::Unreachable(shown(&e.to_string()))))?;
            Ok(Answer { status, body })
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| error(ApiErrorKind::Timeout))??;
        if answer.status.is_redirection() {
            return Err(error(ApiErrorKind::Protocol(format!(
                "{} redirects; regtee does not follow an API's redirects (set api_url to the endpoint itself)",
                answer.status
            ))));
        }
        Ok(answer)
    }
}

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// HMAC-SHA256.
pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// The canonical request that TC3-HMAC-SHA256 and SDK-HMAC-SHA256 sign, both modelled on
/// AWS SigV4: method, path, query, the signed headers (lowercase names, trimmed values,
/// sorted), their names, and the payload's hash. Returns it with the signed header list.
pub(crate) fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    payload_sha256: &str,
) -> (String, String) {
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let signed: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    let signed = signed.join(";");
    (
        format!("{method}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{payload_sha256}"),
        signed,
    )
}

/// Seconds since the epoch, for request timestamps.
pub(crate) fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
