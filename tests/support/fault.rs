//! A fault front: a small HTTP proxy in front of a real registry that misbehaves on purpose,
//! one way at a time, as deployed registries and networks do. The registry behind stays real:
//! what reaches it is stored, and tests check it by digest.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use regtee::body::{BoxError, ProxyBody};

use super::quirks::{Quirk, QuirkState};

/// How the front misbehaves.
#[derive(Clone, Debug, Default)]
pub enum Fault {
    /// Forward everything unchanged.
    #[default]
    None,
    /// Stop reading a request body (PUT/PATCH of an upload) after this many bytes, and never
    /// answer: a registry that accepted the connection and hung.
    StallUploads { after: u64 },
    /// Pass this many bytes of a blob download, then send nothing more.
    StallDownloads { after: u64 },
    /// Answer writes (PUT, PATCH, POST) with a 500 whose message echoes the request's
    /// `Authorization`, as some registries' debug error pages do.
    EchoAuthorization,
    /// Add `OCI-Chunk-Min-Length` to every answer that opens an upload session.
    ChunkMinLength(u64),
    /// Hold requests whose path and query contain this text until [`FaultFront::release`].
    Hold(String),
    /// Behave as a cloud registry is documented to (see [`Quirk`]).
    Quirk(Quirk),
    /// Move every upload session to another origin: the `Location` of each answer that opens
    /// or continues one names this origin (`http://host:port`) instead, path and query kept.
    MoveUploadsTo(String),
    /// Add `Link: <this>; rel="next"` to every tag list.
    NextTagsPageAt(String),
    /// Add a `Link` to every tag list that names the tag list itself: pagination without end.
    TagsLinkToThemselves,
    /// Answer every blob `GET` with a body that never ends and states no length.
    EndlessBlobs,
    /// Send every blob `GET`'s body with its first byte changed: the stated length, other
    /// bytes (a storage backend that returns damaged content).
    CorruptBlobs,
}

pub(super) struct State {
    upstream: String,
    fault: Mutex<Fault>,
    released: tokio::sync::Notify,
    requests: AtomicU64,
    held: AtomicU64,
    client: regtee::http_client::HttpClient,
    pub(super) quirks: QuirkState,
}

/// The front, on a free loopback port; stopped on drop.
pub struct FaultFront {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultFront {
    /// A front for the registry at `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> FaultFront {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            fault: Mutex::new(Fault::None),
            released: tokio::sync::Notify::new(),
            requests: AtomicU64::new(0),
            held: AtomicU64::new(0),
            client: super::raw_http_client(None, true),
            quirks: QuirkState::default(),
        });
        let serving = state.clone();
        let task = super::serve::serve(listener, move |req| serving.clone().handle(req));
        FaultFront { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Lets held requests go on (and future ones: the fault is cleared).
    pub fn release(&self) {
        self.set(Fault::None);
        self.state.released.notify_waiters();
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Requests held by [`Fault::Hold`] so far.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::Relaxed)
    }

    /// What the quirks saw and remember.
    pub fn quirks(&self) -> &QuirkState {
        &self.state.quirks
    }

    /// Creates a repository, for [`Quirk::RepositoriesMustExist`].
    /// The names that exist for the `...MustExist` quirks, for a cloud API front to share.
    pub fn existing(&self) -> std::sync::Arc<Mutex<std::collections::BTreeSet<String>>> {
        self.state.quirks.repositories.clone()
    }

    pub fn create_repository(&self, name: &str) {
        self.state
            .quirks
            .repositories
            .lock()
            .unwrap()
            .insert(name.to_string());
    }
}

fn is_upload(req: &Request<Incoming>) -> bool {
    req.uri().path().contains("/blobs/uploads/")
}

pub(super) fn answer(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(regtee::body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

impl State {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fault = self.fault.lock().unwrap().clone();
        let method = req.method().clone();
        let writes = matches!(
            method,
            http::Method::PUT | http::Method::PATCH | http::Method::POST
        );
        match &fault {
            Fault::Quirk(quirk) => return self.quirk(quirk, req).await,
            Fault::StallUploads { after }
                if is_upload(&req) && matches!(method, http::Method::PUT | http::Method::PATCH) =>
            {
                let mut body = req.into_body();
                let mut seen = 0u64;
                while seen < *after {
                    match body.frame().await {
                        Some(Ok(f)) => seen += f.data_ref().map_or(0, |d| d.len() as u64),
                        _ => break,
                    }
                }
                // Hold the body unread, and never answer.
                std::future::pending::<()>().await;
                unreachable!()
            }
            Fault::EchoAuthorization if writes => {
                let auth = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                return answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"errors": [{"code": "UNKNOWN", "message": format!("internal error handling request with Authorization: {auth}")}]}).to_string(),
                );
            }
            Fault::Hold(needle) => {
                let target = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                if target.contains(needle.as_str()) {
                    let released = self.released.notified();
                    tokio::pin!(released);
                    released.as_mut().enable();
                    if matches!(&*self.fault.lock().unwrap(), Fault::Hold(_)) {
                        self.held.fetch_add(1, Ordering::Relaxed);
                        released.await;
                    }
                }
            }
            _ => {}
        }
        let target_path = req.uri().path().to_string();
        let target_path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let response = match self.forward(req).await {
            Ok(r) => r,
            Err(e) => return answer(StatusCode::BAD_GATEWAY, format!("fault front: {e}")),
        };
        let (mut parts, body) = response.into_parts();
        let is_tag_list = method == http::Method::GET
            && parts.status == StatusCode::OK
            && target_path.ends_with("/tags/list");
        match fault {
            Fault::MoveUploadsTo(origin) if parts.status == StatusCode::ACCEPTED => {
                if let Some(location) = parts
                    .headers
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| l.parse::<http::Uri>().ok())
                {
                    let path = location.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                    parts
                        .headers
                        .insert("location", format!("{origin}{path}").parse().unwrap());
                }
                Response::from_parts(parts, regtee::body::boxed(body))
            }
            Fault::NextTagsPageAt(next) if is_tag_list => {
                parts
                    .headers
                    .insert("link", format!("<{next}>; rel=\"next\"").parse().unwrap());
                Response::from_parts(parts, regtee::body::boxed(body))
            }
            Fault::TagsLinkToThemselves if is_tag_list => {
                parts.headers.insert(
                    "link",
                    format!("<{target_path_and_query}>; rel=\"next\"")
                        .parse()
                        .unwrap(),
                );
                Response::from_parts(parts, regtee::body::boxed(body))
            }
            Fault::EndlessBlobs
                if method == http::Method::GET
                    && parts.status == StatusCode::OK
                    && target_path.contains("/blobs/sha") =>
            {
                parts.headers.remove("content-length");
                let endless = futures_util::stream::repeat_with(|| {
                    Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))
                });
                Response::from_parts(
                    parts,
                    regtee::body::boxed(http_body_util::StreamBody::new(endless)),
                )
            }
            Fault::CorruptBlobs
                if method == http::Method::GET
                    && parts.status == StatusCode::OK
                    && target_path.contains("/blobs/sha") =>
            {
                let mut first = true;
                let corrupted = body.map_frame(move |frame| match frame.into_data() {
                    Ok(data) if first && !data.is_empty() => {
                        first = false;
                        let mut bytes = data.to_vec();
                        bytes[0] ^= 0xff;
                        Frame::data(Bytes::from(bytes))
                    }
                    Ok(data) => Frame::data(data),
                    Err(frame) => frame,
                });
                Response::from_parts(parts, regtee::body::boxed(corrupted))
            }
            Fault::ChunkMinLength(n) if parts.status == StatusCode::ACCEPTED => {
                if parts.headers.contains_key("docker-upload-uuid") && method == http::Method::POST
                {
                    parts
                        .headers
                        .insert("oci-chunk-min-length", n.to_string().parse().unwrap());
                }
                Response::from_parts(parts, regtee::body::boxed(body))
            }
            Fault::StallDownloads { after }
                if method == http::Method::GET && parts.status == StatusCode::OK =>
            {
                Response::from_parts(parts, regtee::body::boxed(StallAfter::new(body, after)))
            }
            _ => Response::from_parts(parts, regtee::body::boxed(body)),
        }
    }

    pub(super) async fn forward<B>(&self, req: Request<B>) -> Result<Response<Incoming>, BoxError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = format!("{}{path}", self.upstream).parse()?;
        let request = Request::from_parts(parts, regtee::body::boxed(body));
        Ok(self.client.request(request).await?)
    }
}

/// A body that passes `after` bytes, then stays pending forever.
struct StallAfter<B> {
    inner: B,
    left: u64,
}

impl<B> StallAfter<B> {
    fn new(inner: B, after: u64) -> Self {
        StallAfter { inner, left: after }
    }
}

impl<B> http_body::Body for StallAfter<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Pending;
        }
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    let take = data.len().min(self.left as usize);
                    self.left -= take as u64;
                    std::task::Poll::Ready(Some(Ok(Frame::data(data.split_to(take)))))
                }
                Err(frame) => std::task::Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }
}
