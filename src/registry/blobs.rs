//! Blobs: existence, streaming download (following redirects to object storage), mounts, and
//! uploads in one request or in streamed chunks (distribution spec, "Pushing blobs").

use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Uri};

use super::{Call, ErrorKind, RegistryClient, RegistryError, RequestBody, content_length, resolve};
use crate::body::{self, ProxyBody};
use crate::oci::digest::Digest;
use crate::origin::Origin;

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
    /// The blob's size if the repository has it.
    pub async fn blob_exists(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
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
                Ok(Some(content_length(response.headers()).unwrap_or(0)))
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
        let op = format!("GET blob {repository}@{digest}");
        let mut call = self.request(
            Method::GET,
            &format!("/v2/{repository}/blobs/{digest}"),
            &op,
        )?;
        for _ in 0..8 {
            let url = call.url.clone();
            let response = if Origin::of(&url).as_ref() == Some(&self.origin) {
                self.send(call.pull(repository)).await?
            } else {
                let mut request = http::Request::new(body::empty());
                *request.uri_mut() = url.clone();
                self.send_once(request, &op).await?
            };
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
            if status == StatusCode::OK {
                return Ok(BlobStream {
                    size: content_length(response.headers()),
                    body: body::boxed(
                        body::Tracked::new(response.into_body(), Default::default())
                            .idle_timeout(self.idle_timeout),
                    ),
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

    /// Closes a session regtee will not use (so none is left behind on the registry).
    pub async fn cancel_upload(&self, repository: &str, session: Session) {
        let op = format!("cancel upload in {repository}");
        let _ = self
            .send(Call::to(Method::DELETE, session.location, &op).push(repository))
            .await;
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
        size: Option<u64>,
        content: ProxyBody,
        chunking: Chunking,
        session: Option<Session>,
    ) -> Result<(), RegistryError> {
        let op = format!("upload blob {repository}@{digest}");
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
                match self
                    .upload_chunks(repository, location, content, size, chunk, &op)
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
            Some(reported) if reported != *digest => Err(self.err(
                &op,
                ErrorKind::Protocol(format!("registry stored {reported}, expected {digest}")),
            )),
            _ => Ok(()),
        }
    }

    /// PATCHes `size` bytes of `content` in chunks of `chunk` bytes (the last one shorter), each
    /// with its `Content-Range`.
    async fn upload_chunks(
        &self,
        repository: &str,
        mut location: Uri,
        content: ProxyBody,
        size: u64,
        chunk: u64,
        op: &str,
    ) -> Result<Chunked, RegistryError> {
        let chunks = body::Chunks::new(content);
        let mut offset: u64 = 0;
        while offset < size {
            let len = chunk.min(size - offset);
            let end = offset + len - 1;
            let mut call = Call::to(Method::PATCH, location.clone(), op)
                .push(repository)
                .header(header::CONTENT_TYPE, octets())
                .header(header::CONTENT_LENGTH, HeaderValue::from(len))
                .body(RequestBody::Stream(chunks.next(len)));
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
                _ => return Err(self.error_from(response, op).await),
            }
            location = self.location(&response).unwrap_or(location);
            offset = end + 1;
        }
        Ok(Chunked::Open(location))
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
    pub async fn check_push(&self, repository: &str) -> Result<(), RegistryError> {
        let op = format!("start upload in {repository}");
        let session = self.start_upload(repository, &op).await?;
        self.cancel_upload(repository, session).await;
        Ok(())
    }
}
