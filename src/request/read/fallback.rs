//! Reads while Harbor cannot answer: what Harbor served this repository before, from the cache,
//! else from a fallback target, where regtee mirrored it (the target's namespace mapping
//! applied; its digest verified while it streams, and cached on the way). Only for a client
//! whose token grants `pull` on the repository, checked locally (`authorize`); one log line per
//! ten seconds, however many reads.

use http::header;
use http::{Response, StatusCode};

use super::{Ask, Read, ReadPath, Upstream, content};
use crate::body::{self, ProxyBody};
use crate::cache::{Cached, Kind, Slot};
use crate::error::OciError;
use crate::metrics::CacheRead;
use crate::mirror::target::Target;
use crate::oci::digest::{Digest, VerifyingBody};
use crate::oci::error_code::ErrorCode;
use crate::oci::names::RepositoryName;

impl ReadPath {
    /// `GET /v2/`, which every pull starts with: Harbor's answer; while Harbor cannot answer
    /// and tokens are checked locally, the registry's own (200 to a token it would accept, else
    /// 401 with the challenge Harbor sent last, so the client fetches a token from Harbor's
    /// token service, which may well be up).
    pub(super) async fn version_check(&self, up: &Upstream, ask: &Ask<'_>) -> Read {
        if !self.authorization.checks_tokens() {
            return Read::Forward;
        }
        let error = match up
            .ask(ask.method.clone(), "/v2/", ask.headers, ask.conn, false)
            .await
        {
            Ok(answer) if !answer.status().is_server_error() => {
                if let Some(challenge) = answer.headers().get(header::WWW_AUTHENTICATE) {
                    self.remember_challenge(challenge);
                }
                return Read::Harbor(answer.map(body::boxed));
            }
            Ok(answer) => OciError::bad_gateway(format!("Harbor answered {}", answer.status())),
            Err(error) => error,
        };
        if self.authorization.accepts_locally(ask) {
            return Read::Answer(crate::request::version_check_passed());
        }
        let Some(challenge) = self.last_challenge() else {
            return Read::Error(error);
        };
        let mut answer = OciError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "authentication required",
        )
        .into_response(body::full);
        answer
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
        // As if Harbor had said it: the proxy rewrites its realm as it rewrites Harbor's.
        Read::Harbor(answer)
    }

    /// A cached entry, served while Harbor cannot be asked (the caller checked the client).
    pub(super) fn fallback_hit(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        cached: &Cached,
        range: Option<(u64, Option<u64>)>,
        ask: &Ask<'_>,
        error: &OciError,
    ) -> Read {
        match self.hit(digest, cached, range, ask.head(), CacheRead::Fallback) {
            Some(answer) => {
                self.served_without_harbor(repo, digest, "cache", error);
                Read::Answer(answer)
            }
            None => Read::Error(error.clone()),
        }
    }

    /// Content nobody cached, from the first fallback target that has it; Harbor's failure
    /// (`error`) when none does or the client's token does not grant the read.
    pub(super) async fn fallback(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        manifest: bool,
        ask: &Ask<'_>,
        error: OciError,
    ) -> Read {
        if !self.authorization.grants_locally(repo, ask) {
            return Read::Error(error);
        }
        for target in &self.fallback {
            let target_repo = target.config.policy.target_repository(repo.as_str());
            let served = if manifest {
                self.manifest_from(target, &target_repo, repo, digest, ask)
                    .await
            } else {
                self.blob_from(target, &target_repo, repo, digest, ask)
                    .await
            };
            if let Some(answer) = served {
                self.served_without_harbor(repo, digest, target.name(), &error);
                self.cache.count(manifest, CacheRead::Fallback);
                return Read::Answer(answer);
            }
        }
        Read::Error(error)
    }

    async fn manifest_from(
        &self,
        target: &Target,
        target_repo: &str,
        repo: &RepositoryName,
        digest: &Digest,
        ask: &Ask<'_>,
    ) -> Option<Response<ProxyBody>> {
        // Fetched by digest, the bytes are verified against it.
        let fetched = target
            .client
            .get_manifest(target_repo, digest.as_str())
            .await
            .ok()??;
        let kind = Kind::Manifest {
            media_type: fetched.media_type.clone(),
        };
        if !super::usable(
            &Cached {
                kind: kind.clone(),
                size: fetched.bytes.len() as u64,
            },
            true,
            ask.headers,
        ) {
            return None;
        }
        let size = fetched.bytes.len() as u64;
        if ask.head() {
            return Some(content(digest, &kind, size, None, body::empty()));
        }
        let body = match self.cache.slot(digest, repo.as_str()) {
            Slot::Start(starting) => {
                match starting.begin(
                    body::full(fetched.bytes.clone()),
                    size,
                    kind.clone(),
                    target.name(),
                ) {
                    Ok(reader) => reader,
                    Err(_) => body::full(fetched.bytes),
                }
            }
            Slot::Join(_) => body::full(fetched.bytes),
        };
        Some(content(digest, &kind, size, None, body))
    }

    async fn blob_from(
        &self,
        target: &Target,
        target_repo: &str,
        repo: &RepositoryName,
        digest: &Digest,
        ask: &Ask<'_>,
    ) -> Option<Response<ProxyBody>> {
        let blob = match ask.head() {
            true => None,
            false => Some(target.client.get_blob(target_repo, digest).await.ok()?),
        };
        let size = match blob.as_ref().and_then(|b| b.size) {
            Some(size) => size,
            None => target
                .client
                .blob_length(target_repo, digest)
                .await
                .ok()??,
        };
        let Some(blob) = blob else {
            return Some(content(digest, &Kind::Blob, size, None, body::empty()));
        };
        let body = match self.cache.slot(digest, repo.as_str()) {
            // The fill verifies the digest, and caches it.
            Slot::Start(starting) => {
                match starting.begin(blob.body, size, Kind::Blob, target.name()) {
                    Ok(reader) => reader,
                    Err(body) => body::boxed(VerifyingBody::new(body, digest.clone(), Some(size))),
                }
            }
            Slot::Join(fill) => match fill.begun().await {
                Some(_) => fill.reader(&self.cache, target.name()),
                None => body::boxed(VerifyingBody::new(blob.body, digest.clone(), Some(size))),
            },
        };
        Some(content(digest, &Kind::Blob, size, None, body))
    }

    fn served_without_harbor(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        source: &str,
        error: &OciError,
    ) {
        self.cache.metrics().observe_fallback(source);
        if let Some(held_back) = self.fallback_log.allow() {
            tracing::warn!(
                repository = %repo,
                %digest,
                source,
                held_back,
                harbor = %error.message(),
                "Harbor cannot answer: serving a read from regtee's verified copies to a client whose token grants it"
            );
        }
    }
}
