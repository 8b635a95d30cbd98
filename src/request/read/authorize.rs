//! Who may read what the read path serves: exactly whom Harbor lets read it.
//!
//! Harbor decides, asked with the client's own credentials: a `HEAD` of the same repository and
//! digest. Its yes is remembered per credential and repository for at most a minute, never past
//! the token's expiry, and only for content Harbor has served for that repository (a blob
//! cached through one repository is served for another only after that one's yes). Its no is
//! passed on as it is, and never remembered. While Harbor cannot answer, only a token checked as
//! Harbor's registry checks it (`[upstream] token_certificate`) can say yes.

use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};

use super::{Ask, content_path};
use crate::body::{self, ProxyBody};
use crate::cache::Cache;
use crate::error::OciError;
use crate::oci::digest::Digest;
use crate::oci::names::RepositoryName;
use crate::request::upstream::Upstream;
use crate::token_check::{TokenTrust, Verdict, unverified_expiry};

/// How long Harbor's yes is remembered.
const REMEMBERED: Duration = Duration::from_secs(60);

/// Yeses remembered at most; beyond, the stale ones are dropped first.
const MAX_REMEMBERED: usize = 100_000;

/// What to do with a read.
pub(super) enum Decision {
    /// Serve it.
    Yes,
    /// Harbor's no (401, 403, 404): pass it on.
    Harbor(Response<ProxyBody>),
    /// Harbor cannot be asked (refused, 5xx, timeout).
    Unreachable(OciError),
}

pub(super) struct Authorization {
    trust: Option<TokenTrust>,
    /// Harbor's yes, by credential and repository, until when.
    yes: DashMap<(u64, String), Instant>,
}

/// The client's credential, as a key (a hash: the credential itself is not kept).
pub(super) fn credential_key(headers: &HeaderMap) -> u64 {
    use sha2::Digest as _;
    let value = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or(b"");
    let hash = sha2::Sha256::digest(value);
    u64::from_le_bytes(hash[..8].try_into().unwrap_or_default())
}

impl Authorization {
    pub(super) fn new(trust: Option<TokenTrust>) -> Authorization {
        Authorization {
            trust,
            yes: DashMap::new(),
        }
    }

    /// Whether this client may read `digest` in `repo`, by Harbor's own answer.
    pub(super) async fn decide(
        &self,
        up: &Upstream,
        cache: &Cache,
        repo: &RepositoryName,
        digest: &Digest,
        manifest: bool,
        ask: &Ask<'_>,
    ) -> Decision {
        let key = (credential_key(ask.headers), repo.as_str().to_string());
        let remembered = self
            .yes
            .get(&key)
            .is_some_and(|until| *until > Instant::now());
        if remembered && cache.is_linked(digest, repo.as_str()) {
            return Decision::Yes;
        }
        let path = content_path(repo, digest, manifest);
        match up
            .ask(Method::HEAD, &path, ask.headers, ask.conn, true)
            .await
        {
            Ok(answer) if answer.status() == StatusCode::OK => {
                self.remember(cache, repo, digest, ask);
                Decision::Yes
            }
            Ok(answer) if answer.status().is_server_error() => Decision::Unreachable(
                OciError::bad_gateway(format!("Harbor answered {}", answer.status())),
            ),
            Ok(answer) => Decision::Harbor(answer.map(body::boxed)),
            Err(error) => Decision::Unreachable(error),
        }
    }

    /// Harbor has just let this client read `digest` in `repo`.
    pub(super) fn remember(
        &self,
        cache: &Cache,
        repo: &RepositoryName,
        digest: &Digest,
        ask: &Ask<'_>,
    ) {
        cache.link(digest, repo.as_str());
        let now = Instant::now();
        let mut until = now + REMEMBERED;
        if let Some(expires) = ask
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(unverified_expiry)
        {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            until = until.min(now + left);
        }
        if self.yes.len() >= MAX_REMEMBERED {
            self.yes.retain(|_, u| *u > now);
        }
        if self.yes.len() < MAX_REMEMBERED {
            self.yes.insert(
                (credential_key(ask.headers), repo.as_str().to_string()),
                until,
            );
        }
    }

    /// Whether tokens are checked locally (`[upstream] token_certificate`).
    pub(super) fn checks_tokens(&self) -> bool {
        self.trust.is_some()
    }

    /// Whether Harbor's registry would accept the client's token at all.
    pub(super) fn accepts_locally(&self, ask: &Ask<'_>) -> bool {
        let authorization = ask
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.trust
            .as_ref()
            .is_some_and(|trust| trust.accepts(authorization, SystemTime::now()))
    }

    /// Whether the client's token, checked as Harbor's registry checks it, grants `pull` on
    /// `repo` (never without `token_certificate`).
    pub(super) fn grants_locally(&self, repo: &RepositoryName, ask: &Ask<'_>) -> bool {
        let Some(trust) = &self.trust else {
            return false;
        };
        let authorization = ask
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        matches!(
            trust.check(authorization, repo.as_str(), "pull", SystemTime::now()),
            Verdict::Grants { .. }
        )
    }

    /// Whether, without Harbor, this client may read `digest` in `repo`: its token grants
    /// `pull` there, and Harbor served that digest for that repository before.
    pub(super) fn locally(
        &self,
        cache: &Cache,
        repo: &RepositoryName,
        digest: &Digest,
        ask: &Ask<'_>,
    ) -> bool {
        self.grants_locally(repo, ask) && cache.is_linked(digest, repo.as_str())
    }
}
