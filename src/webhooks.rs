//! Webhook intake: pushes that did not pass through regtee, told by Harbor or a registry.
//!
//! Harbor's webhook payloads (`PUSH_ARTIFACT`, `DELETE_ARTIFACT`) and distribution's
//! notification envelopes become the same [`Write`]s the proxy sees on the wire, so they create
//! the same jobs through the same filters.

use serde::Deserialize;

use crate::config::Secret;
use crate::digest::Digest;
use crate::manifest::is_manifest_media_type;
use crate::route::Write;

/// A payload that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
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
pub fn harbor(payload: &[u8]) -> Result<Vec<Write>, WebhookError> {
    let event: HarborEvent =
        serde_json::from_slice(payload).map_err(|source| WebhookError::Json {
            sender: "Harbor",
            source,
        })?;
    let push = match event.kind.as_str() {
        "PUSH_ARTIFACT" | "pushImage" => true,
        "DELETE_ARTIFACT" | "deleteImage" => false,
        _ => return Ok(Vec::new()),
    };
    let Some(data) = event.event_data else {
        return Ok(Vec::new());
    };
    let Some(repository) = data.repository.and_then(|r| {
        r.repo_full_name.or_else(|| match (r.namespace, r.name) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        })
    }) else {
        return Ok(Vec::new());
    };
    let mut writes = Vec::new();
    for resource in data.resources {
        let digest = resource.digest.and_then(|d| d.parse::<Digest>().ok());
        let tag = resource.tag.filter(|t| !t.is_empty());
        if push {
            if digest.is_some() || tag.is_some() {
                writes.push(Write::Manifest {
                    repository: repository.clone(),
                    tag,
                    digest,
                });
            }
        } else if let Some(reference) = digest.map(|d| d.to_string()).or(tag) {
            writes.push(Write::ManifestDeleted {
                repository: repository.clone(),
                reference,
            });
        }
    }
    Ok(writes)
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
pub fn registry(payload: &[u8]) -> Result<Vec<Write>, WebhookError> {
    let envelope: Envelope =
        serde_json::from_slice(payload).map_err(|source| WebhookError::Json {
            sender: "registry",
            source,
        })?;
    let mut writes = Vec::new();
    for event in envelope.events {
        let target = event.target;
        let Some(repository) = target.repository else {
            continue;
        };
        let digest = target.digest.and_then(|d| d.parse::<Digest>().ok());
        let tag = target.tag.filter(|t| !t.is_empty());
        let is_manifest = target
            .media_type
            .as_deref()
            .is_some_and(is_manifest_media_type)
            || target
                .url
                .as_deref()
                .is_some_and(|u| u.contains("/manifests/"));
        match event.action.as_str() {
            "push" if is_manifest => writes.push(Write::Manifest {
                repository,
                tag,
                digest,
            }),
            "push" | "mount" => {
                if let Some(digest) = digest {
                    writes.push(Write::Blob {
                        repository,
                        digest,
                        mounted_from: None,
                    });
                }
            }
            "delete" if is_manifest || tag.is_some() => {
                if let Some(reference) = digest.map(|d| d.to_string()).or(tag) {
                    writes.push(Write::ManifestDeleted {
                        repository,
                        reference,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(writes)
}

/// Whether an `Authorization` header carries the shared secret (`Bearer <secret>` or the bare
/// secret, which is what Harbor sends when its "auth header" field holds only the secret).
pub fn authorized(header: Option<&str>, secret: &Secret) -> bool {
    let Some(value) = header else {
        return false;
    };
    let presented = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .unwrap_or(value)
        .trim();
    constant_time_eq(presented.as_bytes(), secret.expose().as_bytes())
}

/// Compares without leaking where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
            harbor(push.as_bytes()).unwrap(),
            vec![Write::Manifest {
                repository: "library/app".into(),
                tag: Some("v1".into()),
                digest: Some(D.parse().unwrap())
            }]
        );
        let delete = push.replace("PUSH_ARTIFACT", "DELETE_ARTIFACT");
        assert_eq!(
            harbor(delete.as_bytes()).unwrap(),
            vec![Write::ManifestDeleted {
                repository: "library/app".into(),
                reference: D.into()
            }]
        );
        let scan = r#"{"type":"SCANNING_COMPLETED","event_data":{}}"#;
        assert!(harbor(scan.as_bytes()).unwrap().is_empty());
        assert!(harbor(b"{").is_err());
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
        let writes = registry(env.as_bytes()).unwrap();
        assert_eq!(writes.len(), 2);
        assert!(matches!(&writes[0], Write::Manifest { tag: Some(t), .. } if t == "v2"));
        assert!(matches!(&writes[1], Write::Blob { .. }));
    }

    #[test]
    fn shared_secret_check() {
        let s = Secret::new("hunter2");
        assert!(authorized(Some("Bearer hunter2"), &s));
        assert!(authorized(Some("hunter2"), &s));
        assert!(!authorized(Some("Bearer hunter3"), &s));
        assert!(!authorized(None, &s));
    }
}
