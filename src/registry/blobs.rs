//! Blobs: existence, streaming download (following redirects to object storage), mounts, and
//! uploads in one request or in streamed chunks (distribution spec, "Pushing blobs").

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Uri};

use super::{Call, ErrorKind, RegistryClient, RegistryError, RequestBody, content_length, resolve};
use crate::body::{self, ProxyBody};
use crate::oci::digest::Digest;

/// A blob stream on its way from a registry.
pub struct BlobStream {
    /// Its length, when the registry said.
    pub size: Option<u64>,
    /// The bytes; the stream fails if the registry sends nothing for the idle timeout.
    pub body: ProxyBody,
}

/// What a mount request did.
#[derive(Debug)]
pub enum Mount {
    /// The blob is in the repository now.
    Mounted,
    /// The registry opened an upload session instead (the spec allows it: `202` with a
    /// `Location`); upload through it with [`RegistryClient::upload_blob`].
    Session(Session),
}

/// An open upload session.
#[derive(Debug)]
pub struct Session {
    location: Uri,
    min_chunk: Option<u64>,
}

/// How a blob goes up: in one request, or in chunks.
#[derive(Clone, Copy, Debug)]
pub struct Chunking {
    /// Bytes per chunk; 0 for one request (unless the registry asks for chunks).
    pub size: u64,
    /// The largest minimum chunk a registry may ask for.
    pub max: u64,
}

impl Chunking {
    /// One request unless the registry asks for chunks, of up to 256 MiB.
    pub const WHOLE: Chunking = Chunking {
        size: 0,
        max: 256 * 1024 * 1024,
    };
}

/// Reads a blob again from a byte offset (a ranged GET from Harbor), for a target that asks
/// to resume an upload.
pub(crate) type Reopen<'a> =
    Box<dyn Fn(u64) -> BoxFuture<'a, Result<ProxyBody, RegistryError>> + Send + Sync + 'a>;

/// One blob to upload.
pub struct Upload<'a> {
    /// Its length, when known (chunks need it).
    pub size: Option<u64>,
    /// Its bytes.
    pub content: ProxyBody,
    /// In one request or in chunks.
    pub chunking: Chunking,
    /// A session already open (from a declined mount), or `None` to open one.
    pub session: Option<Session>,
    /// How to read the blob again from an offset; without it a resume is an error.
    pub reopen: Option<Reopen<'a>>,
}

impl Upload<'_> {
    /// Bytes in hand, in one request.
    pub fn whole(content: Bytes) -> Upload<'static> {
        Upload {
            size: Some(content.len() as u64),
            content: body::full(content),
            chunking: Chunking::WHOLE,
            session: None,
            reopen: None,
        }
    }
}

/// How many times one upload may resume before regtee starts it over.
const MAX_RESUMES: u32 = 3;

/// A blob on its way up in chunks.
struct Chunks<'a> {
    content: ProxyBody,
    size: u64,
    chunk: u64,
    reopen: Option<Reopen<'a>>,
}

/// The length an upload's `Range: 0-<last>` reports (distribution reports `0-0` for an empty
/// upload too; resuming from 0 is then right, or answered with another 416).
fn upload_length(headers: &http::HeaderMap) -> Option<u64> {
    let range = headers.get(header::RANGE)?.to_str().ok()?;
    let (start, last) = range.trim().trim_start_matches("bytes=").split_once('-')?;
    let last: u64 = last.parse().ok()?;
    match (start.parse::<u64>().ok()?, last) {
        (0, 0) => Some(0),
        (0, last) => last.checked_add(1),
        _ => None,
    }
}

/// Where chunks left the upload.
enum Chunked {
    /// Open at this location, for the closing PUT.
    Open(Uri),
    /// Completed by the registry on the last chunk.
    Complete,
}

fn octets() -> HeaderValue {
    HeaderValue::from_static("application/octet-stream")
}

impl RegistryClient {
    /// The blob's size if the repository has it (0 when the answer states none).
    pub async fn blob_exists(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        Ok(self
            .head_blob(repository, digest)
            .await?
            .map(|length| length.unwrap_or(0)))
    }

    /// The blob's length as the registry states it: `None` if it has no such blob or states
    /// no length.
    pub(crate) async fn blob_length(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        Ok(self.head_blob(repository, digest).await?.flatten())
    }

    async fn head_blob(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<Option<u64>>, RegistryError> {
        let op = format!("HEAD blob {repository}@{digest}");
        let call = self
            .request(
                Method::HEAD,
                &format!("/v2/{repository}/blobs/{digest}"),
                &op,
            )?
            .pull(repository);
        let response = self.send(call).await?;
        match response.status() {
            // A redirect to storage means it is there; a HEAD answer has no error body.
            s if s.is_success() || s.is_redirection() => {
                Ok(Some(content_length(response.headers())))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.error_from(response, &op).await),
        }
    }

    /// Streams a blob, following redirects to object storage. Credentials are sent only to the
    /// registry's own origin.
    pub async fn get_blob(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobStream, RegistryError> {
        self.get_blob_from(repository, digest, 0).await
    }

    /// Streams a blob from byte `from` on (RFC 9110 `Range: bytes=<from>-`, answered `206`).
    pub(crate) async fn get_blob_from(
        &self,
        repository: &str,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobStream, RegistryError> {
        let op = format!("GET blob {repository}@{digest} from byte {from}");
        let range = (from > 0)
            .then(|| HeaderValue::from_str(&format!("bytes={from}-")).ok())
            .flatten();
        let expected = if from > 0 {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        let mut call = self.request(
            Method::GET,
            &format!("/v2/{repository}/blobs/{digest}"),
            &op,
        )?;
        for _ in 0..8 {
            let url = call.url.clone();
            if let Some(range) = &range {
                call = call.header(header::RANGE, range.clone());
            }
            // `send` gives credentials to the registry's origin only, never to storage.
            let response = self.send(call.pull(repository)).await?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        self.err(&op, ErrorKind::Protocol("redirect without Location".into()))
                    })?;
                let next = resolve(&url, location).ok_or_else(|| {
                    self.err(
                        &op,
                        ErrorKind::Protocol(format!("bad redirect `{location}`")),
                    )
                })?;
                call = Call::to(Method::GET, next, &op);
                continue;
            }
            if status == expected {
                return Ok(BlobStream {
                    size: content_length(response.headers()),
                    body: self.limits.throttle(body::boxed(
                        body::Tracked::new(response.into_body(), Default::default())
                            .idle_timeout(self.idle_timeout),
                    )),
                });
            }
            return Err(self.error_from(response, &op).await);
        }
        Err(self.err(&op, ErrorKind::Protocol("too many redirects".into())))
    }

    /// Asks the registry to mount a blob from another repository.
    pub async fn mount_blob(
        &self,
        repository: &str,
        digest: &Digest,
        from: &str,
    ) -> Result<Mount, RegistryError> {
        let op = format!("mount blob {digest} from {from} into {repository}");
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("mount", digest.as_str())
            .append_pair("from", from)
            .finish();
        let call = self
            .request(
                Method::POST,
                &format!("/v2/{repository}/blobs/uploads/?{query}"),
                &op,
            )?
            .push(repository)
            .pull(from)
            .header(header::CONTENT_LENGTH, HeaderValue::from(0));
        let response = self.send(call).await?;
        match response.status() {
            StatusCode::CREATED => Ok(Mount::Mounted),
            StatusCode::ACCEPTED => Ok(Mount::Session(self.session(&response, &op)?)),
            _ => Err(self.error_from(response, &op).await),
        }
    }

    /// Closes a session regtee will not use (so none is left behind on the registry). An
    /// account without delete rights cannot; the registry then expires the session itself
    /// (distribution: after a week), so the refusal is worth a debug line only.
    pub(crate) async fn cancel_upload(&self, repository: &str, session: Session) {
        let op = format!("cancel upload in {repository}");
        let call = Call::to(Method::DELETE, session.location, &op)
            .delete(repository)
            .push(repository);
        match self.send(call).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => {
                let e = self.error_from(r, &op).await;
                tracing::debug!(error = %e, "upload session left to expire");
            }
            Err(e) => tracing::debug!(error = %e, "upload session left to expire"),
        }
    }

    fn session(
        &self,
        response: &http::Response<hyper::body::Incoming>,
        op: &str,
    ) -> Result<Session, RegistryError> {
        let min_chunk = response
            .headers()
            .get("oci-chunk-min-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let location = self.location(response).ok_or_else(|| {
            self.err(
                op,
                ErrorKind::Protocol("upload session without a Location".into()),
            )
        })?;
        Ok(Session {
            location,
            min_chunk,
        })
    }

    /// Opens an upload session.
    async fn start_upload(&self, repository: &str, op: &str) -> Result<Session, RegistryError> {
        let call = self
            .request(
                Method::POST,
                &format!("/v2/{repository}/blobs/uploads/"),
                op,
            )?
            .push(repository)
            .header(header::CONTENT_LENGTH, HeaderValue::from(0));
        let response = self.expect(call, StatusCode::ACCEPTED).await?;
        self.session(&response, op)
    }

    /// Uploads a blob from a stream, through `session` or a new one: one PUT, or PATCH chunks
    /// when `chunking` or the registry (`OCI-Chunk-Min-Length`) asks for them. Chunks are
    /// streamed too: memory use does not grow with the chunk size, whatever the registry asks.
    pub async fn upload_blob(
        &self,
        repository: &str,
        digest: &Digest,
        upload: Upload<'_>,
    ) -> Result<(), RegistryError> {
        let op = format!("upload blob {repository}@{digest}");
        let Upload {
            size,
            content,
            chunking,
            session,
            reopen,
        } = upload;
        let content = self.limits.throttle(content);
        let Session {
            location,
            min_chunk,
        } = match session {
            Some(s) => s,
            None => self.start_upload(repository, &op).await?,
        };
        if let Some(min) = min_chunk
            && min > chunking.max
        {
            return Err(self.err(
                &op,
                ErrorKind::Protocol(format!(
                    "the registry asks for chunks of at least {min} bytes (OCI-Chunk-Min-Length), more than max_chunk_size = {}: raise max_chunk_size for this target if that is intended",
                    chunking.max
                )),
            ));
        }
        let chunk = chunking.size.max(min_chunk.unwrap_or(0));
        let (location, last, last_len) = match (chunk, size) {
            (0, _) => (location, RequestBody::Stream(content), size),
            (chunk, Some(size)) => {
                let chunks = Chunks {
                    content,
                    size,
                    chunk,
                    reopen,
                };
                match self
                    .upload_chunks(repository, location, chunks, &op)
                    .await?
                {
                    Chunked::Open(location) => (location, RequestBody::Empty, Some(0)),
                    Chunked::Complete => return self.confirm(repository, digest, &op).await,
                }
            }
            // Without a length there is no Content-Range to send: one request, if allowed.
            (_, None) if min_chunk.is_none() => (location, RequestBody::Stream(content), None),
            (_, None) => {
                return Err(self.err(
                    &op,
                    ErrorKind::Protocol(
                        "the registry wants chunks, and the blob's length is unknown (Harbor sent no Content-Length)".into(),
                    ),
                ));
            }
        };
        let mut url = url::Url::parse(&location.to_string()).map_err(|_| {
            self.err(
                &op,
                ErrorKind::Protocol(format!("unusable upload location `{location}`")),
            )
        })?;
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let url: Uri = url.as_str().parse().map_err(|_| {
            self.err(
                &op,
                ErrorKind::Protocol(format!("unusable upload location `{location}`")),
            )
        })?;
        let mut call = Call::to(Method::PUT, url, &op)
            .push(repository)
            .header(header::CONTENT_TYPE, octets())
            .body(last);
        if let Some(len) = last_len {
            call = call.header(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let response = self.expect(call, StatusCode::CREATED).await?;
        match Digest::from_headers(response.headers()) {
            Some(reported) if reported.contradicts(digest) => Err(self.err(
                &op,
                ErrorKind::Protocol(format!("registry stored {reported}, expected {digest}")),
            )),
            _ => Ok(()),
        }
    }

    /// PATCHes the blob in chunks (the last one shorter), each with its `Content-Range`.
    async fn upload_chunks(
        &self,
        repository: &str,
        mut location: Uri,
        chunks: Chunks<'_>,
        op: &str,
    ) -> Result<Chunked, RegistryError> {
        let Chunks {
            content,
            size,
            chunk,
            reopen,
        } = chunks;
        let mut source = body::Chunks::new(content);
        let mut offset: u64 = 0;
        let mut resumes = 0;
        while offset < size {
            let len = chunk.min(size - offset);
            let end = offset + len - 1;
            let mut call = Call::to(Method::PATCH, location.clone(), op)
                .push(repository)
                .header(header::CONTENT_TYPE, octets())
                .header(header::CONTENT_LENGTH, HeaderValue::from(len))
                .body(RequestBody::Stream(source.next(len)));
            if let Ok(range) = HeaderValue::from_str(&format!("{offset}-{end}")) {
                call = call.header(header::CONTENT_RANGE, range);
            }
            let response = self.send(call).await?;
            match response.status() {
                StatusCode::ACCEPTED => {}
                // AWS ECR accepts the blob on the last chunk and then rejects the closing PUT
                // (regclient's blob upload notes it: "distribution-spec is 202, AWS ECR returns
                // a 201"); the caller confirms with a HEAD instead.
                StatusCode::CREATED if end + 1 == size => return Ok(Chunked::Complete),
                StatusCode::CREATED => {
                    return Err(self.err(
                        op,
                        ErrorKind::Protocol(format!(
                            "the registry answered 201 to the chunk ending at {end}, before the blob's end ({size} bytes)"
                        )),
                    ));
                }
                // OCI distribution spec, "Pushing a blob in chunks": a chunk that does not
                // start where the upload ends is answered 416; the client resumes from the
                // offset the registry reports (its `Range`, or the upload's status).
                StatusCode::RANGE_NOT_SATISFIABLE if resumes < MAX_RESUMES => {
                    location = self.location(&response).unwrap_or(location);
                    let have = match upload_length(response.headers()) {
                        Some(have) => have,
                        None => self.upload_status(repository, &location, op).await?,
                    };
                    let Some(reopen) = &reopen else {
                        return Err(self.err(
                            op,
                            ErrorKind::Transfer(format!(
                                "the registry asks to resume at byte {have}, and this stream cannot be read again"
                            )),
                        ));
                    };
                    if have > size {
                        return Err(self.err(
                            op,
                            ErrorKind::Protocol(format!(
                                "the registry reports {have} bytes of a {size}-byte blob"
                            )),
                        ));
                    }
                    tracing::info!(
                        registry = %self.name,
                        "{op}: the registry has {have} of {size} bytes; resuming there"
                    );
                    resumes += 1;
                    source = body::Chunks::new(self.limits.throttle(reopen(have).await?));
                    offset = have;
                    continue;
                }
                _ => return Err(self.error_from(response, op).await),
            }
            location = self.location(&response).unwrap_or(location);
            offset = end + 1;
        }
        Ok(Chunked::Open(location))
    }

    /// How many bytes an upload session holds (`GET` on it: `204` with `Range: 0-<last>`).
    async fn upload_status(
        &self,
        repository: &str,
        location: &Uri,
        op: &str,
    ) -> Result<u64, RegistryError> {
        let call = Call::to(Method::GET, location.clone(), op).push(repository);
        let response = self.expect(call, StatusCode::NO_CONTENT).await?;
        upload_length(response.headers()).ok_or_else(|| {
            self.err(
                op,
                ErrorKind::Protocol("upload status without a Range".into()),
            )
        })
    }

    /// Checks that an upload the registry completed on its own holds the blob.
    async fn confirm(
        &self,
        repository: &str,
        digest: &Digest,
        op: &str,
    ) -> Result<(), RegistryError> {
        match self.blob_exists(repository, digest).await? {
            Some(_) => Ok(()),
            None => Err(self.err(
                op,
                ErrorKind::Protocol(format!(
                    "the registry said the upload was complete, but has no {digest}"
                )),
            )),
        }
    }

    /// Checks that regtee may push to `repository` by opening and cancelling an upload.
    pub(crate) async fn check_push(&self, repository: &str) -> Result<(), RegistryError> {
        let op = format!("start upload in {repository}");
        let session = self.start_upload(repository, &op).await?;
        self.cancel_upload(repository, session).await;
        Ok(())
    }
}
