//! Manifests as the mirror needs them: what they reference, and the referrers tag index.
//!
//! regtee never re-serialises a manifest it copies (that would change its digest); it reads
//! only the references (blobs, child manifests, subject) to copy them first.

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;

/// Docker image manifest v2 schema 2.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub(crate) const DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1 (signed), still found in old Harbors.
pub(crate) const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker schema 1 (unsigned).
pub(crate) const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI artifact manifest (from the 1.1 release candidates; some registries still hold them).
pub(crate) const OCI_ARTIFACT: &str = "application/vnd.oci.artifact.manifest.v1+json";

/// Every manifest media type, for `Accept` headers.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.artifact.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v1+prettyjws, \
     application/vnd.docker.distribution.manifest.v1+json";

/// The largest manifest regtee reads (distribution's own limit is 4 MiB).
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Whether a media type is a manifest (as opposed to a blob).
pub(crate) fn is_manifest_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        DOCKER_MANIFEST
            | DOCKER_MANIFEST_LIST
            | DOCKER_MANIFEST_V1_SIGNED
            | DOCKER_MANIFEST_V1
            | OCI_MANIFEST
            | OCI_INDEX
            | OCI_ARTIFACT
    )
}

/// A content descriptor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where a non-distributable layer lives instead of the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// The artifact type, for referrers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations, kept as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    /// Platform of an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    subject: Option<Descriptor>,
    #[serde(default)]
    fs_layers: Vec<FsLayer>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FsLayer {
    blob_sum: String,
}

/// What a manifest references, in the order they must exist on a target.
#[derive(Debug, Clone)]
pub struct References {
    /// The media type (from the document, else the `Content-Type` it was served with).
    pub media_type: String,
    /// Blobs: config and layers (non-distributable layers left out).
    pub blobs: Vec<Descriptor>,
    /// Child manifests of an index.
    pub children: Vec<Descriptor>,
    /// The manifest this one refers to (signatures, SBOMs).
    pub subject: Option<Descriptor>,
    /// The artifact type, for the referrers index entry.
    pub artifact_type: Option<String>,
    /// The manifest's annotations, for the referrers index entry.
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A manifest that cannot be understood.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not shaped like a manifest.
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A referenced digest that is not a digest.
    #[error("manifest references an invalid digest: {0}")]
    Digest(#[from] crate::oci::digest::DigestParseError),
}

/// Reads a manifest's references; `content_type` is what the registry served it as.
pub fn references(bytes: &[u8], content_type: Option<&str>) -> Result<References, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(bytes)?;
    let media_type = raw
        .media_type
        .clone()
        .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_string()))
        .unwrap_or_else(|| {
            if raw.manifests.is_empty() {
                OCI_MANIFEST.to_string()
            } else {
                OCI_INDEX.to_string()
            }
        });
    let mut blobs: Vec<Descriptor> = raw.config.clone().into_iter().collect();
    blobs.extend(
        raw.layers
            .into_iter()
            .chain(raw.blobs)
            .filter(|d| d.urls.as_ref().is_none_or(Vec::is_empty)),
    );
    blobs.extend(raw.fs_layers.into_iter().map(|l| Descriptor {
        media_type: "application/octet-stream".to_string(),
        digest: l.blob_sum,
        size: 0,
        urls: None,
        artifact_type: None,
        annotations: None,
        platform: None,
    }));
    let mut seen = std::collections::HashSet::new();
    blobs.retain(|d| seen.insert(d.digest.clone()));
    for d in blobs
        .iter()
        .chain(raw.manifests.iter())
        .chain(raw.subject.iter())
    {
        d.digest.parse::<Digest>()?;
    }
    let artifact_type = raw
        .artifact_type
        .or_else(|| raw.config.as_ref().map(|c| c.media_type.clone()));
    Ok(References {
        media_type,
        blobs,
        children: raw.manifests,
        subject: raw.subject,
        artifact_type,
        annotations: raw.annotations,
    })
}

/// The fallback tag for referrers of `subject`, `<alg>-<ref>` (OCI distribution spec v1.1,
/// "Referrers Tag Schema"): an index a pusher keeps up to date on registries without the
/// referrers API.
pub fn referrers_tag(subject: &Digest) -> String {
    format!(
        "{}-{}",
        subject.as_str().split(':').next().unwrap_or("sha256"),
        subject.hex()
    )
}

/// Adds (or replaces) a referrer in a referrers tag index, returning the new index bytes.
/// `existing` is the current index on the target, if there is one.
pub(crate) fn add_referrer(
    existing: Option<&[u8]>,
    referrer: Descriptor,
) -> Result<Vec<u8>, ManifestError> {
    let mut index: serde_json::Value = match existing {
        Some(bytes) => serde_json::from_slice(bytes)?,
        None => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
        }),
    };
    let entry = serde_json::to_value(&referrer)?;
    let manifests = index
        .as_object_mut()
        .map(|o| {
            o.entry("manifests")
                .or_insert_with(|| serde_json::json!([]))
        })
        .and_then(|m| m.as_array_mut());
    if let Some(list) = manifests {
        list.retain(|m| m.get("digest").and_then(|d| d.as_str()) != Some(&referrer.digest));
        list.push(entry);
    }
    Ok(serde_json::to_vec(&index)?)
}

/// Whether an index already lists `digest`.
pub fn index_lists(bytes: &[u8], digest: &str) -> bool {
    serde_json::from_slice::<RawManifest>(bytes)
        .map(|m| m.manifests.iter().any(|d| d.digest == digest))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_references_config_then_layers_without_foreign_ones() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('a'), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('b'), "size": 3},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": d('c'), "size": 4, "urls": ["https://x"]},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('b'), "size": 3}
            ]
        });
        let r = references(&serde_json::to_vec(&m).unwrap(), None).unwrap();
        let digests: Vec<_> = r.blobs.iter().map(|b| b.digest.clone()).collect();
        assert_eq!(digests, vec![d('a'), d('b')]);
        assert!(r.children.is_empty() && r.subject.is_none());
        assert_eq!(
            r.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn index_has_children_and_artifact_has_subject() {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": d('1'), "size": 10}]
        });
        let r = references(&serde_json::to_vec(&index).unwrap(), Some(OCI_INDEX)).unwrap();
        assert_eq!(r.media_type, OCI_INDEX);
        assert_eq!(r.children.len(), 1);

        let sig = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": d('e'), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d('1'), "size": 10}
        });
        let r = references(&serde_json::to_vec(&sig).unwrap(), None).unwrap();
        assert_eq!(r.subject.unwrap().digest, d('1'));
        assert_eq!(
            r.artifact_type.as_deref(),
            Some("application/vnd.example.sig")
        );
    }

    #[test]
    fn invalid_digests_and_json_are_errors() {
        assert!(references(b"not json", None).is_err());
        let bad = serde_json::json!({"schemaVersion": 2, "layers": [{"mediaType": "x", "digest": "sha256:xyz", "size": 1}]});
        assert!(references(&serde_json::to_vec(&bad).unwrap(), None).is_err());
    }

    #[test]
    fn referrers_index_is_created_then_updated_without_duplicates() {
        let subject: Digest = d('1').parse().unwrap();
        assert_eq!(
            referrers_tag(&subject),
            format!("sha256-{}", "1".repeat(64))
        );
        let entry = |c| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d(c),
            size: 5,
            urls: None,
            artifact_type: Some("application/vnd.example.sig".into()),
            annotations: None,
            platform: None,
        };
        let first = add_referrer(None, entry('a')).unwrap();
        let second = add_referrer(Some(&first), entry('b')).unwrap();
        let again = add_referrer(Some(&second), entry('a')).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&again).unwrap();
        assert_eq!(v["mediaType"], OCI_INDEX);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
        assert!(index_lists(&again, &d('b')));
        assert!(!index_lists(&again, &d('c')));
    }

    mod properties {
        use super::*;
        use crate::arbitrary::{CASES, json_value};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            /// Any document: references parse or fail, and every reference they yield is a
            /// valid digest (it goes into URLs next).
            #[test]
            fn references_are_valid_digests_or_an_error(doc in json_value(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let text = serde_json::to_vec(&doc).unwrap();
                if let Ok(refs) = references(&text, Some("application/vnd.oci.image.manifest.v1+json")) {
                    for d in refs.blobs.iter().chain(&refs.children).chain(refs.subject.iter()) {
                        prop_assert!(d.digest.parse::<Digest>().is_ok());
                    }
                }
                let _ = references(&bytes, None);
                let _ = index_lists(&text, "sha256:x");
                let entry = Descriptor {
                    media_type: OCI_MANIFEST.into(),
                    digest: format!("sha256:{}", "a".repeat(64)),
                    size: 1,
                    urls: None,
                    artifact_type: None,
                    annotations: None,
                    platform: None,
                };
                let _ = add_referrer(Some(&text), entry);
            }
        }
    }
}
