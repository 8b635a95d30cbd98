//! Classifies a request by the distribution spec's endpoints, and recognises completed writes.
//!
//! Forwarding never depends on this: every method and path goes upstream. Classification feeds
//! the request log, the metrics, and the one decision the request path makes on its own: "Harbor
//! just accepted content; record it for mirroring".

use http::{HeaderMap, Method, StatusCode};

use crate::digest::Digest;

/// What a request addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check and the login probe.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository.
        name: String,
        /// Tag or digest.
        reference: String,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository.
        name: String,
        /// As written in the path; may not be a valid digest.
        digest: String,
    },
    /// `/v2/<name>/blobs/uploads/`: start an upload, monolithic upload, or mount.
    UploadStart {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/blobs/uploads/<session>`: chunk, status, complete, cancel.
    Upload {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// Repository.
        name: String,
    },
    /// `/service/token`: Harbor's token service.
    Token,
    /// `/_regtee/token/<id>`: a token realm on another origin, reached through regtee.
    ForeignToken {
        /// The realm's key in the realm table.
        id: String,
    },
    /// `/api/...`: Harbor's REST API.
    HarborApi,
    /// Anything else (Harbor UI, `/c/` login, health checks).
    Other,
}

/// The path prefix of token realms that regtee relays.
pub const FOREIGN_TOKEN_PREFIX: &str = "/_regtee/token/";

impl Route {
    /// Classifies a request path (without query).
    pub fn classify(path: &str) -> Route {
        if let Some(rest) = path.strip_prefix("/v2/") {
            return classify_v2(rest);
        }
        if path == "/v2" {
            return Route::Base;
        }
        if path == "/service/token" {
            return Route::Token;
        }
        if let Some(id) = path.strip_prefix(FOREIGN_TOKEN_PREFIX) {
            return Route::ForeignToken { id: id.to_string() };
        }
        if path == "/api" || path.starts_with("/api/") {
            return Route::HarborApi;
        }
        Route::Other
    }

    /// A short stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags { .. } => "tags",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::Referrers { .. } => "referrers",
            Route::Token | Route::ForeignToken { .. } => "token",
            Route::HarborApi => "harbor_api",
            Route::Other => "other",
        }
    }

    /// The repository a request is about, if any.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Tags { name }
            | Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name }
            | Route::Referrers { name } => Some(name),
            _ => None,
        }
    }
}

fn classify_v2(rest: &str) -> Route {
    if rest.is_empty() {
        return Route::Base;
    }
    if rest == "_catalog" {
        return Route::Catalog;
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    let name_before = |k: usize| -> Option<String> {
        (k >= 1 && n > k)
            .then(|| segments[..n - k].join("/"))
            .filter(|s| !s.is_empty())
    };
    let at = |i: usize| -> &str { if i < n { segments[i] } else { "" } };
    // Look at the tail of the path: the name itself may contain words like "blobs".
    if n >= 3 && at(n - 3) == "blobs" && at(n - 2) == "uploads" {
        let name = name_before(3);
        return match (name, at(n - 1).is_empty()) {
            (Some(name), true) => Route::UploadStart { name },
            (Some(name), false) => Route::Upload { name },
            (None, _) => Route::Other,
        };
    }
    if n >= 2 {
        let name = name_before(2);
        let last = at(n - 1).to_string();
        let route = match at(n - 2) {
            "tags" if last == "list" => name.map(|name| Route::Tags { name }),
            "manifests" => name.map(|name| Route::Manifest {
                name,
                reference: last,
            }),
            "blobs" if last == "uploads" => name.map(|name| Route::UploadStart { name }),
            "blobs" => name.map(|name| Route::Blob { name, digest: last }),
            "referrers" => name.map(|name| Route::Referrers { name }),
            _ => None,
        };
        if let Some(route) = route {
            return route;
        }
    }
    Route::Other
}

/// Content Harbor has just accepted, as seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A blob upload finished, or a blob was mounted from another repository.
    Blob {
        /// Repository that now holds the blob.
        repository: String,
        /// The blob.
        digest: Digest,
        /// For a mount: the repository it came from.
        mounted_from: Option<String>,
    },
    /// A manifest was stored under a tag or a digest.
    Manifest {
        /// Repository.
        repository: String,
        /// The tag, if pushed by tag.
        tag: Option<String>,
        /// The manifest digest, when Harbor or the path says it.
        digest: Option<Digest>,
    },
    /// A manifest (or tag) was deleted.
    ManifestDeleted {
        /// Repository.
        repository: String,
        /// Tag or digest that was deleted.
        reference: String,
    },
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

impl Write {
    /// Recognises a completed write from the request and Harbor's answer.
    ///
    /// Only success statuses the spec assigns to completion count: 201 for stored content, 202
    /// for deletes. Chunk PATCHes and upload starts (202) are not completions.
    pub fn recognise(
        method: &Method,
        route: &Route,
        query: Option<&str>,
        status: StatusCode,
        response_headers: &HeaderMap,
    ) -> Option<Write> {
        let header_digest = || Digest::from_headers(response_headers);
        match (method, route, status) {
            (&Method::PUT, Route::Upload { name }, StatusCode::CREATED)
            | (&Method::POST, Route::UploadStart { name }, StatusCode::CREATED) => {
                let from = query_param(query, "from");
                let digest = query_param(query, "digest")
                    .or_else(|| query_param(query, "mount"))
                    .and_then(|d| d.parse().ok())
                    .or_else(header_digest)?;
                let mounted_from = from.filter(|_| query_param(query, "mount").is_some());
                Some(Write::Blob {
                    repository: name.clone(),
                    digest,
                    mounted_from,
                })
            }
            (&Method::PUT, Route::Manifest { name, reference }, StatusCode::CREATED) => {
                let by_digest = reference.parse::<Digest>().ok();
                Some(Write::Manifest {
                    repository: name.clone(),
                    tag: by_digest.is_none().then(|| reference.clone()),
                    digest: header_digest().or(by_digest),
                })
            }
            (&Method::DELETE, Route::Manifest { name, reference }, StatusCode::ACCEPTED) => {
                Some(Write::ManifestDeleted {
                    repository: name.clone(),
                    reference: reference.clone(),
                })
            }
            _ => None,
        }
    }

    /// The repository written to.
    pub fn repository(&self) -> &str {
        match self {
            Write::Blob { repository, .. }
            | Write::Manifest { repository, .. }
            | Write::ManifestDeleted { repository, .. } => repository,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[test]
    fn classifies_every_spec_endpoint() {
        assert_eq!(Route::classify("/v2/"), Route::Base);
        assert_eq!(Route::classify("/v2/_catalog"), Route::Catalog);
        assert_eq!(
            Route::classify("/v2/library/nginx/tags/list"),
            Route::Tags {
                name: "library/nginx".into()
            }
        );
        assert_eq!(
            Route::classify("/v2/a/b/c/manifests/v1"),
            Route::Manifest {
                name: "a/b/c".into(),
                reference: "v1".into()
            }
        );
        assert_eq!(
            Route::classify(&format!("/v2/a/blobs/{D}")),
            Route::Blob {
                name: "a".into(),
                digest: D.into()
            }
        );
        assert_eq!(
            Route::classify("/v2/a/b/blobs/uploads/"),
            Route::UploadStart { name: "a/b".into() }
        );
        assert_eq!(
            Route::classify("/v2/a/b/blobs/uploads/5f1c-77"),
            Route::Upload { name: "a/b".into() }
        );
        assert_eq!(
            Route::classify(&format!("/v2/a/referrers/{D}")),
            Route::Referrers { name: "a".into() }
        );
        assert_eq!(Route::classify("/service/token"), Route::Token);
        assert_eq!(Route::classify("/api/v2.0/projects"), Route::HarborApi);
        assert_eq!(Route::classify("/c/login"), Route::Other);
        assert_eq!(
            Route::classify("/_regtee/token/abc"),
            Route::ForeignToken { id: "abc".into() }
        );
    }

    #[test]
    fn names_may_contain_endpoint_words() {
        assert_eq!(
            Route::classify("/v2/team/blobs/manifests/latest"),
            Route::Manifest {
                name: "team/blobs".into(),
                reference: "latest".into()
            }
        );
        assert_eq!(
            Route::classify("/v2/manifests/tags/list"),
            Route::Tags {
                name: "manifests".into()
            }
        );
        assert_eq!(Route::classify("/v2/manifests/x"), Route::Other);
    }

    fn headers_with_digest() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("docker-content-digest", D.parse().unwrap());
        h
    }

    #[test]
    fn recognises_completed_uploads_mounts_and_manifests() {
        let upload = Route::classify("/v2/a/blobs/uploads/123");
        let q = format!("digest={D}");
        let w = Write::recognise(
            &Method::PUT,
            &upload,
            Some(&q),
            StatusCode::CREATED,
            &HeaderMap::new(),
        );
        assert!(matches!(
            w,
            Some(Write::Blob {
                mounted_from: None,
                ..
            })
        ));

        let start = Route::classify("/v2/a/blobs/uploads/");
        let q = format!("mount={D}&from=lib%2Fbase");
        let w = Write::recognise(
            &Method::POST,
            &start,
            Some(&q),
            StatusCode::CREATED,
            &HeaderMap::new(),
        );
        assert_eq!(
            w,
            Some(Write::Blob {
                repository: "a".into(),
                digest: D.parse().unwrap(),
                mounted_from: Some("lib/base".into())
            })
        );

        let manifest = Route::classify("/v2/a/manifests/v1");
        let w = Write::recognise(
            &Method::PUT,
            &manifest,
            None,
            StatusCode::CREATED,
            &headers_with_digest(),
        );
        assert_eq!(
            w,
            Some(Write::Manifest {
                repository: "a".into(),
                tag: Some("v1".into()),
                digest: Some(D.parse().unwrap())
            })
        );
    }

    #[test]
    fn ignores_partial_and_failed_writes() {
        let upload = Route::classify("/v2/a/blobs/uploads/123");
        for (method, status) in [
            (Method::PATCH, StatusCode::ACCEPTED),
            (Method::PUT, StatusCode::BAD_REQUEST),
            (Method::GET, StatusCode::NO_CONTENT),
        ] {
            assert_eq!(
                Write::recognise(&method, &upload, None, status, &headers_with_digest()),
                None
            );
        }
        // A mount that fell back to a new upload session is not a completion.
        let start = Route::classify("/v2/a/blobs/uploads/");
        let q = format!("mount={D}&from=b");
        assert_eq!(
            Write::recognise(
                &Method::POST,
                &start,
                Some(&q),
                StatusCode::ACCEPTED,
                &HeaderMap::new()
            ),
            None
        );
    }
}
