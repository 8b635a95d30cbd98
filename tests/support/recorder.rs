//! A recording host: a server on another origin that other servers name in a `Location`,
//! `Link` or `realm`. It records every request it gets and answers each with a 401 that
//! invites credentials of both kinds (a Bearer challenge naming its own token realm, and Basic),
//! so a client that hands out credentials to whoever asks is caught doing it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use regtee::body::ProxyBody;

/// One request as the recorder saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    /// Every header, as `name: value` lines.
    pub headers: Vec<String>,
}

impl Recorded {
    /// Whether it carried credentials of any kind, or `secret` anywhere.
    pub fn carries(&self, secret: &str) -> bool {
        self.target.contains(secret) || self.headers.iter().any(|h| h.contains(secret))
    }

    pub fn has_authorization(&self) -> bool {
        self.headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("authorization:"))
    }
}

/// The recording host, on a free loopback port; stopped on drop.
pub struct Recorder {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recording = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = recording.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(record(&seen, addr, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it has received so far.
    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    /// Asserts that no request carried an `Authorization` header or any of `secrets`.
    pub fn assert_no_credentials(&self, secrets: &[&str]) {
        for r in self.seen() {
            assert!(
                !r.has_authorization(),
                "the recording host got credentials: {r:?}"
            );
            for secret in secrets {
                assert!(!r.carries(secret), "the recording host got a secret: {r:?}");
            }
        }
    }
}

fn record(
    seen: &Mutex<Vec<Recorded>>,
    me: SocketAddr,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    seen.lock().unwrap().push(Recorded {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
            .collect(),
    });
    let mut r = Response::new(regtee::body::full(
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
    ));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = r.headers_mut();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.append(
        "www-authenticate",
        format!(r#"Bearer realm="http://{me}/token",service="recorder""#)
            .parse()
            .unwrap(),
    );
    headers.append(
        "www-authenticate",
        r#"Basic realm="recorder""#.parse().unwrap(),
    );
    r
}
