//! Manifests: identity (HEAD), exact bytes (GET, verified when fetched by digest), storing them
//! byte for byte with their media type, and deletes (distribution spec, "Pulling manifests",
//! "Pushing manifests", "Deleting manifests").

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

use super::{Call, ErrorKind, RegistryClient, RegistryError, RequestBody, content_length};
use crate::error::error_chain;
use crate::oci::digest::Digest;
use crate::oci::manifest::{ACCEPT_ALL, MAX_MANIFEST_BYTES};

/// A manifest's identity as a registry reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`.
    pub digest: Digest,
    /// `Content-Type`.
    pub media_type: String,
    /// `Content-Length`.
    pub size: u64,
}

/// A manifest read whole (they are small), digest verified when fetched by digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The exact bytes: copied as they are, never re-serialised.
    pub bytes: Bytes,
    /// The media type it was served with.
    pub media_type: String,
    /// Its sha256.
    pub digest: Digest,
}

/// What a registry said after storing a manifest.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    /// The digest it reported, if it did.
    pub digest: Option<Digest>,
    /// Whether it sent `OCI-Subject` (it has the referrers API).
    pub has_referrers_api: bool,
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .unwrap_or_default()
}

impl RegistryClient {
    /// GET or HEAD of a manifest, accepting every manifest media type.
    fn manifest_call(
        &self,
        method: Method,
        repository: &str,
        reference: &str,
        operation: &str,
    ) -> Result<Call, RegistryError> {
        Ok(self
            .request(
                method,
                &format!("/v2/{repository}/manifests/{reference}"),
                operation,
            )?
            .pull(repository)
            .header(header::ACCEPT, HeaderValue::from_static(ACCEPT_ALL)))
    }

    /// The manifest's digest, media type and size, or `None` if there is none.
    pub async fn manifest_head(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<ManifestHead>, RegistryError> {
        let op = format!("HEAD manifest {repository}:{reference}");
        let call = self.manifest_call(Method::HEAD, repository, reference, &op)?;
        let response = self.send(call).await?;
        match response.status() {
            StatusCode::OK => match Digest::from_headers(response.headers()) {
                Some(digest) => Ok(Some(ManifestHead {
                    digest,
                    media_type: content_type(response.headers()),
                    size: content_length(response.headers()).unwrap_or(0),
                })),
                // Some registries omit the digest on HEAD: compute it from the bytes.
                None => Ok(self
                    .get_manifest(repository, reference)
                    .await?
                    .map(|m| ManifestHead {
                        size: m.bytes.len() as u64,
                        digest: m.digest,
                        media_type: m.media_type,
                    })),
            },
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.error_from(response, &op).await),
        }
    }

    /// The manifest's exact bytes, or `None` if there is none. Fetched by digest, the bytes
    /// are verified against it.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<FetchedManifest>, RegistryError> {
        let op = format!("GET manifest {repository}:{reference}");
        let call = self.manifest_call(Method::GET, repository, reference, &op)?;
        let response = self.send(call).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.error_from(response, &op).await),
        }
        let media_type = content_type(response.headers());
        let bytes = self
            .read_small(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.err(&op, ErrorKind::Transfer(error_chain(&*e))))?;
        let digest = Digest::sha256_of(&bytes);
        if let Ok(expected) = reference.parse::<Digest>() {
            let actual = Digest::of(expected.algorithm(), &bytes);
            if actual.contradicts(&expected) {
                return Err(self.err(
                    &op,
                    ErrorKind::Transfer(format!("manifest bytes hash to {actual}, not {expected}")),
                ));
            }
        }
        Ok(Some(FetchedManifest {
            bytes,
            media_type,
            digest,
        }))
    }

    /// Stores a manifest under a tag or digest, exactly these bytes with this media type.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<StoredManifest, RegistryError> {
        let op = format!("PUT manifest {repository}:{reference}");
        let content_type = HeaderValue::from_str(media_type).map_err(|_| {
            self.err(
                &op,
                ErrorKind::Protocol(format!("bad media type `{media_type}`")),
            )
        })?;
        let call = self
            .request(
                Method::PUT,
                &format!("/v2/{repository}/manifests/{reference}"),
                &op,
            )?
            .push(repository)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()))
            .body(RequestBody::Bytes(bytes));
        let response = self.send(call).await?;
        if !response.status().is_success() {
            return Err(self.error_from(response, &op).await);
        }
        Ok(StoredManifest {
            digest: Digest::from_headers(response.headers()),
            has_referrers_api: response.headers().contains_key("oci-subject"),
        })
    }

    /// Deletes a manifest by digest. Returns false if it was not there.
    pub async fn delete_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<bool, RegistryError> {
        let op = format!("DELETE manifest {repository}:{reference}");
        let call = self
            .request(
                Method::DELETE,
                &format!("/v2/{repository}/manifests/{reference}"),
                &op,
            )?
            .delete(repository)
            .push(repository);
        let response = self.send(call).await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error_from(response, &op).await),
        }
    }
}
