//! Webhook intake: pushes that did not pass through regtee, told by Harbor or a registry.
//!
//! Harbor's webhook payloads (`PUSH_ARTIFACT`, `DELETE_ARTIFACT`) and distribution's
//! notification envelopes become the same [`Write`]s the proxy sees on the wire, so they create
//! the same jobs through the same filters.

use serde::Deserialize;

use crate::config::Secret;
use crate::mirror::tee::Write;
use crate::oci::digest::Digest;
use crate::oci::manifest::is_manifest_media_type;
use crate::oci::names::{NameError, Reference, RepositoryName, Tag};

/// What a payload described: the writes it names, and the events left out because a name,
/// tag or digest in them breaks the spec's grammar (each one reason).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Events {
    /// Valid events, as writes.
    pub writes: Vec<Write>,
    /// Why the others were left out.
    pub rejected: Vec<String>,
}

impl Events {
    fn reject(&mut self, e: NameError) {
        if self.rejected.len() < 20 {
            self.rejected.push(e.to_string());
        }
    }
}

/// A digest field: absent, valid, or a reason to reject the event.
fn digest_field(d: Option<String>) -> Result<Option<Digest>, NameError> {
    match d.filter(|d| !d.is_empty()) {
        None => Ok(None),
        Some(d) => d
            .parse::<Digest>()
            .map(Some)
            .map_err(|_| NameError::Reference(d.chars().take(80).collect())),
    }
}

fn tag_field(t: Option<String>) -> Result<Option<Tag>, NameError> {
    t.filter(|t| !t.is_empty()).map(|t| t.parse()).transpose()
}

/// A payload that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebhookError {
    /// Not the JSON shape of the sender.
    #[error("payload is not a valid {sender} webhook: {source}")]
    Json {
        /// `Harbor` or `registry`.
        sender: &'static str,
        /// The parser's reason.
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct HarborEvent {
    #[serde(rename = "type")]
    kind: String,
    event_data: Option<HarborEventData>,
}

#[derive(Deserialize)]
struct HarborEventData {
    #[serde(default)]
    resources: Vec<HarborResource>,
    repository: Option<HarborRepository>,
}

#[derive(Deserialize)]
struct HarborResource {
    digest: Option<String>,
    tag: Option<String>,
}

#[derive(Deserialize)]
struct HarborRepository {
    name: Option<String>,
    namespace: Option<String>,
    repo_full_name: Option<String>,
}

/// Reads a Harbor webhook payload. Events other than artifact pushes and deletes yield nothing.
pub(crate) fn harbor(payload: &[u8]) -> Result<Events, WebhookError> {
    let event: HarborEvent =
        serde_json::from_slice(payload).map_err(|source| WebhookError::Json {
            sender: "Harbor",
            source,
        })?;
    let mut events = Events::default();
    let push = match event.kind.as_str() {
        "PUSH_ARTIFACT" | "pushImage" => true,
        "DELETE_ARTIFACT" | "deleteImage" => false,
        _ => return Ok(events),
    };
    let Some(data) = event.event_data else {
        return Ok(events);
    };
    let Some(name) = data.repository.and_then(|r| {
        r.repo_full_name.or_else(|| match (r.namespace, r.name) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        })
    }) else {
        return Ok(events);
    };
    let repository = match name.parse::<RepositoryName>() {
        Ok(r) => r,
        Err(e) => {
            events.reject(e);
            return Ok(events);
        }
    };
    for resource in data.resources {
        let fields = digest_field(resource.digest).and_then(|d| Ok((d, tag_field(resource.tag)?)));
        let (digest, tag) = match fields {
            Ok(f) => f,
            Err(e) => {
                events.reject(e);
                continue;
            }
        };
        if push {
            if digest.is_some() || tag.is_some() {
                events.writes.push(Write::Manifest {
                    repository: repository.clone(),
                    tag,
                    digest,
                });
            }
        } else if let Some(reference) = digest.map(Reference::Digest).or(tag.map(Reference::Tag)) {
            events.writes.push(Write::ManifestDeleted {
                repository: repository.clone(),
                reference,
            });
        }
    }
    Ok(events)
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    events: Vec<RegistryEvent>,
}

#[derive(Deserialize)]
struct RegistryEvent {
    action: String,
    target: RegistryTarget,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistryTarget {
    media_type: Option<String>,
    digest: Option<String>,
    repository: Option<String>,
    tag: Option<String>,
    url: Option<String>,
}

/// Reads a distribution notification envelope (`application/vnd.docker.distribution.events.v1+json`).
pub(crate) fn registry(payload: &[u8]) -> Result<Events, WebhookError> {
    let envelope: Envelope =
        serde_json::from_slice(payload).map_err(|source| WebhookError::Json {
            sender: "registry",
            source,
        })?;
    let mut events = Events::default();
    for event in envelope.events {
        let target = event.target;
        let Some(name) = target.repository else {
            continue;
        };
        let fields = name
            .parse::<RepositoryName>()
            .and_then(|r| Ok((r, digest_field(target.digest)?, tag_field(target.tag)?)));
        let (repository, digest, tag) = match fields {
            Ok(f) => f,
            Err(e) => {
                events.reject(e);
                continue;
            }
        };
        let is_manifest = target
            .media_type
            .as_deref()
            .is_some_and(is_manifest_media_type)
            || target
                .url
                .as_deref()
                .is_some_and(|u| u.contains("/manifests/"));
        let write = match event.action.as_str() {
            "push" if is_manifest => Some(Write::Manifest {
                repository,
                tag,
                digest,
            }),
            "push" | "mount" => digest.map(|digest| Write::Blob {
                repository,
                digest,
                mounted_from: None,
            }),
            "delete" if is_manifest || tag.is_some() => digest
                .map(Reference::Digest)
                .or(tag.map(Reference::Tag))
                .map(|reference| Write::ManifestDeleted {
                    repository,
                    reference,
                }),
            _ => None,
        };
        events.writes.extend(write);
    }
    Ok(events)
}

/// Whether an `Authorization` header carries the shared secret (`Bearer <secret>` or the bare
/// secret, which is what Harbor sends when its "auth header" field holds only the secret).
pub(crate) fn authorized(header: Option<&str>, secret: &Secret) -> bool {
    let Some(value) = header else {
        return false;
    };
    let presented = bearer_credentials(value).unwrap_or(value).trim();
    constant_time_eq(presented.as_bytes(), secret.expose().as_bytes())
}

/// The credentials of an `Authorization: Bearer ...` value; the scheme is case-insensitive
/// (RFC 9110 §11.1).
pub(crate) fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Compares without leaking where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[test]
    fn harbor_push_and_delete() {
        let push = format!(
            r#"{{"type":"PUSH_ARTIFACT","occur_at":1680501893,"operator":"admin",
               "event_data":{{"resources":[{{"digest":"{D}","tag":"v1","resource_url":"harbor.example.com/library/app:v1"}}],
               "repository":{{"date_created":1680501893,"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}}}}"#
        );
        assert_eq!(
            harbor(push.as_bytes()).unwrap().writes,
            vec![Write::Manifest {
                repository: "library/app".parse().unwrap(),
                tag: Some("v1".parse().unwrap()),
                digest: Some(D.parse().unwrap())
            }]
        );
        let delete = push.replace("PUSH_ARTIFACT", "DELETE_ARTIFACT");
        assert_eq!(
            harbor(delete.as_bytes()).unwrap().writes,
            vec![Write::ManifestDeleted {
                repository: "library/app".parse().unwrap(),
                reference: D.parse().unwrap()
            }]
        );
        let scan = r#"{"type":"SCANNING_COMPLETED","event_data":{}}"#;
        assert_eq!(harbor(scan.as_bytes()).unwrap(), Events::default());
        assert!(harbor(b"{").is_err());
    }

    #[test]
    fn invalid_names_tags_and_digests_are_rejected_one_event_at_a_time() {
        let payload = |name: &str, tag: &str, digest: &str| {
            format!(
                r#"{{"type":"PUSH_ARTIFACT","event_data":{{"resources":[{{"digest":"{digest}","tag":"{tag}"}}],"repository":{{"repo_full_name":"{name}"}}}}}}"#
            )
        };
        for (name, tag, digest) in [
            ("library/has space", "v1", D),
            ("library/../x", "v1", D),
            ("Library/app", "v1", D),
            ("library/app", "v 1", D),
            ("library/app", "v1", "sha256:nothex"),
        ] {
            let events = harbor(payload(name, tag, digest).as_bytes()).unwrap();
            assert!(events.writes.is_empty(), "{name} {tag} {digest}");
            assert_eq!(events.rejected.len(), 1, "{name} {tag} {digest}");
        }
        let env = format!(
            r#"{{"events":[
              {{"action":"push","target":{{"mediaType":"application/octet-stream","digest":"{D}","repository":"lib rary/app"}}}},
              {{"action":"push","target":{{"mediaType":"application/octet-stream","digest":"{D}","repository":"library/app"}}}}
            ]}}"#
        );
        let events = registry(env.as_bytes()).unwrap();
        assert_eq!(events.writes.len(), 1);
        assert_eq!(events.rejected.len(), 1);
    }

    #[test]
    fn registry_envelope_manifest_and_blob_events() {
        let env = format!(
            r#"{{"events":[
              {{"id":"1","action":"push","target":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":7,"digest":"{D}","length":7,"repository":"library/app","url":"http://r/v2/library/app/manifests/{D}","tag":"v2"}}}},
              {{"id":"2","action":"push","target":{{"mediaType":"application/octet-stream","size":7,"digest":"{D}","repository":"library/app","url":"http://r/v2/library/app/blobs/{D}"}}}},
              {{"id":"3","action":"pull","target":{{"mediaType":"application/octet-stream","digest":"{D}","repository":"library/app"}}}}
            ]}}"#
        );
        let writes = registry(env.as_bytes()).unwrap().writes;
        assert_eq!(writes.len(), 2);
        assert!(matches!(&writes[0], Write::Manifest { tag: Some(t), .. } if t.as_str() == "v2"));
        assert!(matches!(&writes[1], Write::Blob { .. }));
    }

    #[test]
    fn shared_secret_check() {
        let s = Secret::new("hunter2");
        assert!(authorized(Some("Bearer hunter2"), &s));
        assert!(authorized(Some("hunter2"), &s));
        assert!(authorized(Some("bearer hunter2"), &s));
        assert!(authorized(Some("BEARER  hunter2"), &s));
        assert_eq!(bearer_credentials("bEaReR tok"), Some("tok"));
        assert_eq!(bearer_credentials("Basic tok"), None);
        assert!(!authorized(Some("Bearer hunter3"), &s));
        assert!(!authorized(None, &s));
    }

    mod properties {
        use super::*;
        use crate::arbitrary::{CASES, json_value};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            /// Any payload: parsed or refused, and every write it yields carries valid names
            /// (the types make that so; this checks nothing panics on the way).
            #[test]
            fn payloads_never_panic(doc in json_value(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let text = serde_json::to_vec(&doc).unwrap();
                for parse in [harbor, registry] {
                    if let Ok(events) = parse(&text) {
                        prop_assert!(events.rejected.len() <= 20);
                    }
                    let _ = parse(&bytes);
                }
                let _ = authorized(std::str::from_utf8(&bytes).ok(), &Secret::new("s3cret"));
            }
        }
    }
}
