//! Hostile inputs for property tests, shaped like what regtee parses: request paths with escapes
//! and dot segments, names near the grammar's edges, header values, and JSON built from the
//! vocabulary of manifests and webhooks (so the parsers get past "not JSON" and into the cases
//! that matter). Every parser that takes outside input runs thousands of these in CI.

use proptest::prelude::*;

/// Cases per property: enough to reach the odd corners, quick enough for every CI run.
pub(crate) const CASES: u32 = 3000;

/// Text built from the characters that matter to registry paths and names.
pub(crate) fn path_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => "[a-z0-9]{1,6}",
            2 => Just("/".to_string()),
            1 => Just("..".to_string()),
            1 => Just(".".to_string()),
            1 => Just("%2F".to_string()),
            1 => Just("%2f".to_string()),
            1 => Just("%".to_string()),
            1 => Just("%ff".to_string()),
            1 => Just("%00".to_string()),
            1 => "%[0-9a-fA-F]{2}",
            1 => Just("-".to_string()),
            1 => Just("__".to_string()),
            1 => Just(":".to_string()),
            1 => Just("sha256:".to_string()),
            1 => "[0-9a-f]{64}",
            1 => prop_oneof![
                Just("v2".to_string()),
                Just("manifests".to_string()),
                Just("blobs".to_string()),
                Just("uploads".to_string()),
                Just("tags".to_string()),
                Just("list".to_string()),
                Just("referrers".to_string()),
                Just("_catalog".to_string()),
            ],
            1 => any::<String>().prop_map(|s| s.chars().take(4).collect()),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

/// A JSON value built from manifest and webhook field names and plausible values.
pub(crate) fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        Just("mediaType"),
        Just("digest"),
        Just("size"),
        Just("layers"),
        Just("config"),
        Just("manifests"),
        Just("subject"),
        Just("blobs"),
        Just("fsLayers"),
        Just("blobSum"),
        Just("urls"),
        Just("artifactType"),
        Just("annotations"),
        Just("schemaVersion"),
        Just("type"),
        Just("event_data"),
        Just("resources"),
        Just("repository"),
        Just("repo_full_name"),
        Just("namespace"),
        Just("name"),
        Just("tag"),
        Just("events"),
        Just("action"),
        Just("target"),
        Just("url"),
        Just("errors"),
        Just("code"),
        Just("message"),
    ]
    .prop_map(str::to_string);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        path_text().prop_map(serde_json::Value::from),
        "sha256:[0-9a-f]{64}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("PUSH_ARTIFACT"),
            Just("DELETE_ARTIFACT"),
            Just("push"),
            Just("delete"),
            Just("mount"),
            Just("application/vnd.oci.image.manifest.v1+json"),
            Just("application/vnd.oci.image.index.v1+json"),
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
