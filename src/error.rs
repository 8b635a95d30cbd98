//! Errors regtee itself answers with, shaped the way the OCI distribution spec shapes them, and
//! the one way regtee turns an error chain into a sentence.
//!
//! Upstream errors pass through byte for byte; only failures that are regtee's own (the upstream
//! cannot be reached, answers too slowly, a push cannot be recorded) are rendered here, once, so
//! every client library parses them like any registry error.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::oci::error_code::ErrorCode;

/// An error response in the spec's `{"errors":[{code,message,detail}]}` form.
#[derive(Debug, Clone)]
pub(crate) struct OciError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'a str,
    message: &'a str,
    detail: serde_json::Value,
}

impl OciError {
    /// An error with a status, a spec error code and a message for people.
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> OciError {
        OciError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 502: the upstream could not be reached or broke the connection.
    pub(crate) fn bad_gateway(message: impl Into<String>) -> OciError {
        OciError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, message)
    }

    /// 504: the upstream did not answer in time.
    pub(crate) fn gateway_timeout(message: impl Into<String>) -> OciError {
        OciError::new(StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable, message)
    }

    /// 503: regtee cannot do its part right now; the client should retry.
    pub(crate) fn unavailable(message: impl Into<String>) -> OciError {
        OciError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        )
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The human message.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> Bytes {
        let envelope = Envelope {
            errors: [Entry {
                code: self.code.as_str(),
                message: &self.message,
                detail: serde_json::Value::Null,
            }],
        };
        Bytes::from(serde_json::to_vec(&envelope).expect("plain structs serialize"))
    }

    /// A complete response, body converted with `into_body`.
    pub(crate) fn into_response<B>(self, into_body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let body = self.body();
        let mut response = Response::new(into_body(body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        response
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

/// An error and each of its sources, stepping into the errors `std::io::Error`s wrap (whose own
/// `source()` skips them): rustls, hyper-util and tokio errors travel inside those.
pub(crate) fn sources<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| match e.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static)),
        None => e.source(),
    })
}

/// The first error of type `E` in the chain.
pub(crate) fn find<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    sources(error).find_map(|e| e.downcast_ref::<E>())
}

/// Whether something in the chain timed out (a connect timeout, a stalled write, a deadline).
pub(crate) fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    sources(error).any(|e| {
        e.is::<tokio::time::error::Elapsed>()
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// All messages of an error and its sources, `: `-joined.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_wrapped_errors_are_found_by_type() {
        let inner = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout");
        let wrapped = std::io::Error::other(inner);
        assert!(timed_out(&wrapped));
        assert!(!timed_out(&std::io::Error::other("refused")));
        let tls = std::io::Error::other(rustls::Error::General("x".into()));
        assert!(find::<rustls::Error>(&tls).is_some());
    }

    #[test]
    fn body_is_the_spec_envelope() {
        let e = OciError::bad_gateway("upstream https://h unreachable");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
        assert_eq!(v["errors"][0]["message"], "upstream https://h unreachable");
        let r = e.into_response(|b| b);
        assert_eq!(r.status(), 502);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
    }
}
