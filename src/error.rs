//! Errors regtee itself answers with, shaped the way the OCI distribution spec shapes them, and
//! the one way regtee turns an error chain into a sentence.
//!
//! Upstream errors pass through byte for byte; only failures that are regtee's own (the upstream
//! cannot be reached, answers too slowly, a push cannot be recorded) are rendered here, once, so
//! every client library parses them like any registry error.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// An error response in the spec's `{"errors":[{code,message,detail}]}` form.
#[derive(Debug, Clone)]
pub struct OciError {
    status: StatusCode,
    code: &'static str,
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
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> OciError {
        OciError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 502: the upstream could not be reached or broke the connection.
    pub fn bad_gateway(message: impl Into<String>) -> OciError {
        OciError::new(StatusCode::BAD_GATEWAY, "UNAVAILABLE", message)
    }

    /// 504: the upstream did not answer in time.
    pub fn gateway_timeout(message: impl Into<String>) -> OciError {
        OciError::new(StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE", message)
    }

    /// 503: regtee cannot do its part right now; the client should retry.
    pub fn unavailable(message: impl Into<String>) -> OciError {
        OciError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let envelope = Envelope {
            errors: [Entry {
                code: self.code,
                message: &self.message,
                detail: serde_json::Value::Null,
            }],
        };
        Bytes::from(serde_json::to_vec(&envelope).expect("plain structs serialize"))
    }

    /// A complete response, body converted with `into_body`.
    pub fn into_response<B>(self, into_body: impl FnOnce(Bytes) -> B) -> Response<B> {
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

/// All messages of an error and its sources, `: `-joined.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
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
