//! Classifies a request by the distribution spec's endpoints, and recognises completed writes.
//!
//! Forwarding never depends on this: every method and path goes upstream. Classification feeds
//! the request log, the metrics, and the one decision the request path makes on its own: "Harbor
//! just accepted content; record it for mirroring".

use http::{HeaderMap, Method, StatusCode};

use crate::mirror::tee::Write;
use crate::oci::digest::Digest;
use crate::oci::error_code::ErrorCode;
use crate::oci::names::{self, NameError, Reference, RepositoryName};

/// What a request addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/v2/`: the API version check and the login probe.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags {
        /// Repository.
        name: RepositoryName,
    },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository.
        name: RepositoryName,
        /// Tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository.
        name: RepositoryName,
        /// The blob.
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/`: start an upload, monolithic upload, or mount.
    UploadStart {
        /// Repository.
        name: RepositoryName,
    },
    /// `/v2/<name>/blobs/uploads/<session>`: chunk, status, complete, cancel.
    Upload {
        /// Repository.
        name: RepositoryName,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// Repository.
        name: RepositoryName,
    },
    /// A distribution endpoint whose name or reference breaks the spec's grammar. It is
    /// answered by regtee and never forwarded: the registry's own clean-up (`..`, `//`,
    /// escapes) could otherwise store it under a name regtee's filters never saw.
    Invalid(InvalidName),
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

/// Why a distribution request is refused before it reaches the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InvalidName {
    /// The spec's error code for a write: `NAME_INVALID`, `TAG_INVALID` or `DIGEST_INVALID`.
    pub code: ErrorCode,
    /// What a read is answered, when not `code`: what the registry says of a name or a manifest
    /// that cannot exist (`NAME_UNKNOWN`, `MANIFEST_UNKNOWN`, with 404). distribution's routes
    /// do not match such paths, so Harbor answers 404; a malformed blob digest does match its
    /// route, and is a 400 `DIGEST_INVALID` there too (`None`).
    pub unknown: Option<ErrorCode>,
    /// What is wrong.
    pub message: String,
}

impl InvalidName {
    fn of(error: NameError, endpoint: Endpoint) -> InvalidName {
        let (code, unknown) = match error {
            NameError::Tag(..) | NameError::Reference(..) => {
                (ErrorCode::TagInvalid, Some(endpoint.unknown()))
            }
            NameError::Repository(..) | NameError::Project(..) => {
                (ErrorCode::NameInvalid, Some(ErrorCode::NameUnknown))
            }
        };
        InvalidName {
            code,
            unknown,
            message: error.to_string(),
        }
    }

    /// The answer: a read (`GET`, `HEAD`) of something that cannot exist is not found, as the
    /// registry would say (the OCI conformance suite expects 404 for
    /// `.INVALID_MANIFEST_NAME`); a write is refused as invalid, with 400.
    pub(crate) fn status_and_code(&self, method: &Method) -> (StatusCode, ErrorCode) {
        match &self.unknown {
            Some(unknown) if matches!(*method, Method::GET | Method::HEAD) => {
                (StatusCode::NOT_FOUND, unknown.clone())
            }
            _ => (StatusCode::BAD_REQUEST, self.code.clone()),
        }
    }
}

/// Which kind of thing a `/v2/` path names, for what a read of an invalid one is answered.
#[derive(Clone, Copy)]
enum Endpoint {
    Repository,
    Manifest,
}

impl Endpoint {
    fn unknown(self) -> ErrorCode {
        match self {
            Endpoint::Repository => ErrorCode::NameUnknown,
            Endpoint::Manifest => ErrorCode::ManifestUnknown,
        }
    }
}

/// The path prefix of token realms that regtee relays.
pub(crate) const FOREIGN_TOKEN_PREFIX: &str = "/_regtee/token/";

impl Route {
    /// Classifies a request path (without query), as the registry will see it: percent-decoded.
    pub(crate) fn classify(path: &str) -> Route {
        if let Some(id) = path.strip_prefix(FOREIGN_TOKEN_PREFIX) {
            return Route::ForeignToken { id: id.to_string() };
        }
        let Some(decoded) = names::percent_decode(path) else {
            return Route::Invalid(InvalidName {
                code: ErrorCode::NameInvalid,
                unknown: Some(ErrorCode::NameUnknown),
                message: "the path has percent-escapes that are not UTF-8".into(),
            });
        };
        let path = decoded.as_ref();
        if let Some(rest) = path.strip_prefix("/v2/") {
            return classify_v2(rest);
        }
        if path == "/v2" {
            return Route::Base;
        }
        if path == "/service/token" {
            return Route::Token;
        }
        if path == "/api" || path.starts_with("/api/") {
            return Route::HarborApi;
        }
        Route::Other
    }

    /// A short stable label for logs and metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags { .. } => "tags",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::Referrers { .. } => "referrers",
            Route::Invalid(_) => "invalid",
            Route::Token | Route::ForeignToken { .. } => "token",
            Route::HarborApi => "harbor_api",
            Route::Other => "other",
        }
    }

    /// The repository a request is about, if any.
    pub(crate) fn repository(&self) -> Option<&RepositoryName> {
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

/// The endpoint a `/v2/` path ends in, and the name before it. Looks at the tail: the name itself
/// may contain words like `blobs`.
fn classify_v2(rest: &str) -> Route {
    if rest.is_empty() {
        return Route::Base;
    }
    if rest == "_catalog" {
        return Route::Catalog;
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    let at = |i: usize| -> &str { segments.get(i).copied().unwrap_or("") };
    let name_before = |k: usize| (n > k).then(|| segments[..n - k].join("/"));
    let (endpoint, name, last) = if n >= 3 && at(n - 3) == "blobs" && at(n - 2) == "uploads" {
        let endpoint = if at(n - 1).is_empty() {
            "uploads/"
        } else {
            "uploads/<id>"
        };
        (endpoint, name_before(3), "")
    } else if n >= 2 {
        let endpoint = match (at(n - 2), at(n - 1)) {
            ("tags", "list") => "tags/list",
            ("manifests", _) => "manifests",
            ("blobs", "uploads") => "uploads/",
            ("blobs", _) => "blobs",
            ("referrers", _) => "referrers",
            _ => return Route::Other,
        };
        (endpoint, name_before(2), at(n - 1))
    } else {
        return Route::Other;
    };
    let Some(name) = name else {
        return Route::Other;
    };
    let kind = match endpoint {
        "manifests" => Endpoint::Manifest,
        _ => Endpoint::Repository,
    };
    let name = match name.parse::<RepositoryName>() {
        Ok(name) => name,
        Err(e) => return Route::Invalid(InvalidName::of(e, kind)),
    };
    match endpoint {
        "tags/list" => Route::Tags { name },
        "uploads/" => Route::UploadStart { name },
        "uploads/<id>" => Route::Upload { name },
        "referrers" => Route::Referrers { name },
        "manifests" => match last.parse::<Reference>() {
            Ok(reference) => Route::Manifest { name, reference },
            Err(e) => Route::Invalid(InvalidName::of(e, kind)),
        },
        _ => match last.parse::<Digest>() {
            Ok(digest) => Route::Blob { name, digest },
            Err(e) => Route::Invalid(InvalidName {
                code: ErrorCode::DigestInvalid,
                unknown: None,
                message: e.to_string(),
            }),
        },
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Recognises a completed write from the request and Harbor's answer.
///
/// Only success statuses the spec assigns to completion count: 201 for stored content, 202
/// for deletes. Chunk PATCHes and upload starts (202) are not completions.
pub(crate) fn completed_write(
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
            let mount = query_param(query, "mount");
            let digest = query_param(query, "digest")
                .or_else(|| mount.clone())
                .and_then(|d| d.parse().ok())
                .or_else(header_digest)?;
            let mounted_from = mount
                .and(query_param(query, "from"))
                .and_then(|from| from.parse().ok());
            Some(Write::Blob {
                repository: name.clone(),
                digest,
                mounted_from,
            })
        }
        (&Method::PUT, Route::Manifest { name, reference }, StatusCode::CREATED) => {
            Some(Write::Manifest {
                repository: name.clone(),
                tag: reference.tag().cloned(),
                digest: header_digest().or_else(|| reference.digest().cloned()),
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

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn name(s: &str) -> RepositoryName {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_every_spec_endpoint() {
        assert_eq!(Route::classify("/v2/"), Route::Base);
        assert_eq!(Route::classify("/v2/_catalog"), Route::Catalog);
        assert_eq!(
            Route::classify("/v2/library/nginx/tags/list"),
            Route::Tags {
                name: name("library/nginx")
            }
        );
        assert_eq!(
            Route::classify("/v2/a/b/c/manifests/v1"),
            Route::Manifest {
                name: name("a/b/c"),
                reference: "v1".parse().unwrap()
            }
        );
        assert_eq!(
            Route::classify(&format!("/v2/a/blobs/{D}")),
            Route::Blob {
                name: name("a"),
                digest: D.parse().unwrap()
            }
        );
        assert_eq!(
            Route::classify("/v2/a/b/blobs/uploads/"),
            Route::UploadStart { name: name("a/b") }
        );
        assert_eq!(
            Route::classify("/v2/a/b/blobs/uploads/5f1c-77"),
            Route::Upload { name: name("a/b") }
        );
        assert_eq!(
            Route::classify(&format!("/v2/a/referrers/{D}")),
            Route::Referrers { name: name("a") }
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
                name: name("team/blobs"),
                reference: "latest".parse().unwrap()
            }
        );
        assert_eq!(
            Route::classify("/v2/manifests/tags/list"),
            Route::Tags {
                name: name("manifests")
            }
        );
        assert_eq!(Route::classify("/v2/manifests/x"), Route::Other);
    }

    #[test]
    fn the_decoded_path_is_classified_as_the_registry_will_store_it() {
        assert_eq!(
            Route::classify("/v2/librar%79/enc/manifests/%76%31"),
            Route::Manifest {
                name: name("library/enc"),
                reference: "v1".parse().unwrap()
            }
        );
        assert_eq!(
            Route::classify("/v2/library%2Fprivate-x/manifests/v1"),
            Route::Manifest {
                name: name("library/private-x"),
                reference: "v1".parse().unwrap()
            }
        );
        assert_eq!(
            Route::classify(&format!("/v2/a/blobs/sha256%3A{}", &D[7..])),
            Route::Blob {
                name: name("a"),
                digest: D.parse().unwrap()
            }
        );
    }

    #[test]
    fn names_and_references_that_break_the_grammar_are_refused() {
        let code = |path: &str| match Route::classify(path) {
            Route::Invalid(i) => i.code,
            other => panic!("{path}: {other:?}"),
        };
        for path in [
            "/v2/lib%20rary/manifests/v1",
            "/v2/library/has space/manifests/v1",
            "/v2/other/../library/app/manifests/v1",
            "/v2/library//app/manifests/v1",
            "/v2/Library/app/blobs/uploads/",
            "/v2/library/app%00/tags/list",
            "/v2/%ff/tags/list",
        ] {
            assert_eq!(code(path), ErrorCode::NameInvalid, "{path}");
        }
        assert_eq!(
            code("/v2/library/app/manifests/v%201"),
            ErrorCode::TagInvalid
        );
        assert_eq!(
            code("/v2/library/app/manifests/sha256:short"),
            ErrorCode::TagInvalid
        );
        assert_eq!(
            code("/v2/library/app/blobs/sha256:short"),
            ErrorCode::DigestInvalid
        );
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
        let w = completed_write(
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
        let w = completed_write(
            &Method::POST,
            &start,
            Some(&q),
            StatusCode::CREATED,
            &HeaderMap::new(),
        );
        assert_eq!(
            w,
            Some(Write::Blob {
                repository: name("a"),
                digest: D.parse().unwrap(),
                mounted_from: Some(name("lib/base"))
            })
        );
        // A mount source that is no repository name is only a hint: dropped.
        let q = format!("mount={D}&from=..%2Fx");
        let w = completed_write(
            &Method::POST,
            &start,
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

        let manifest = Route::classify("/v2/a/manifests/v1");
        let w = completed_write(
            &Method::PUT,
            &manifest,
            None,
            StatusCode::CREATED,
            &headers_with_digest(),
        );
        assert_eq!(
            w,
            Some(Write::Manifest {
                repository: name("a"),
                tag: Some("v1".parse().unwrap()),
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
                completed_write(&method, &upload, None, status, &headers_with_digest()),
                None
            );
        }
        // A mount that fell back to a new upload session is not a completion.
        let start = Route::classify("/v2/a/blobs/uploads/");
        let q = format!("mount={D}&from=b");
        assert_eq!(
            completed_write(
                &Method::POST,
                &start,
                Some(&q),
                StatusCode::ACCEPTED,
                &HeaderMap::new()
            ),
            None
        );
    }

    mod properties {
        use super::*;
        use crate::arbitrary::{CASES, path_text};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            /// Any path classifies without panicking; a name it yields is valid, and the same
            /// name spelled with escapes classifies the same way.
            #[test]
            fn classification_never_panics_and_yields_only_valid_names(path in path_text()) {
                let route = Route::classify(&format!("/v2/{path}"));
                if let Some(name) = route.repository() {
                    prop_assert!(name.as_str().parse::<RepositoryName>().is_ok());
                    prop_assert!(!name.as_str().contains('%'));
                }
                let escaped: String = path.replace('/', "%2F");
                let _ = Route::classify(&format!("/v2/{escaped}"));
            }

            #[test]
            fn completed_writes_are_recognised_without_panicking(
                path in path_text(),
                query in path_text(),
                status in 100u16..600,
            ) {
                let route = Route::classify(&format!("/v2/{path}"));
                let status = StatusCode::from_u16(status).unwrap();
                for method in [Method::PUT, Method::POST, Method::DELETE] {
                    let _ = completed_write(&method, &route, Some(&query), status, &HeaderMap::new());
                }
            }
        }
    }
}
