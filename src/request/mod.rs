//! The request path: every client request to Harbor and back, as transparent and as fast as a
//! wire. It streams bodies, rewrites only what must point at regtee, and records a job when Harbor
//! answers a completed write; nothing else happens inline.

pub(crate) mod headers;
pub(crate) mod primary;
pub(crate) mod proxy;
pub(crate) mod read;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod upstream;

/// `GET /v2/` as the registry answers a token it accepts: `200 {}` (the distribution spec's
/// version check), for the read path while Harbor is away and a primary target.
pub(crate) fn version_check_passed() -> http::Response<crate::body::ProxyBody> {
    use http::header::{CONTENT_TYPE, HeaderValue};
    let mut answer = http::Response::new(crate::body::full(bytes::Bytes::from_static(b"{}")));
    let headers = answer.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    answer
}
