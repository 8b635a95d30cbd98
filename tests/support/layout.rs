//! OCI image layouts on disk for skopeo to push: images with random layers, a multi-arch
//! index, a Helm chart artifact, and an artifact with a `subject`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A descriptor of something written into the layout.
#[derive(Clone, Debug)]
pub struct Written {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
    pub bytes: Vec<u8>,
}

impl Written {
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    /// The config digest of a written image manifest: the image ID docker shows.
    pub fn config(&self) -> String {
        let v: Value = serde_json::from_slice(&self.bytes).unwrap();
        v["config"]["digest"].as_str().unwrap().to_string()
    }

    /// The layer digests of a written image manifest.
    pub fn layers(&self) -> Vec<String> {
        let v: Value = serde_json::from_slice(&self.bytes).unwrap();
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }
}

/// An OCI layout directory being built.
pub struct Layout {
    pub dir: PathBuf,
    refs: Vec<Value>,
}

fn sha256(bytes: &[u8]) -> String {
    regtee::oci::digest::Digest::sha256_of(bytes).to_string()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layout = Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        };
        layout.write_index();
        layout
    }

    /// A layout already written, to read its blobs (its index is left as it is).
    pub fn open(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        }
    }

    /// Writes a blob and returns its descriptor.
    pub fn blob(&self, media_type: &str, bytes: Vec<u8>) -> Written {
        let digest = sha256(&bytes);
        let path = self
            .dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(path, &bytes).unwrap();
        Written {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len(),
            bytes,
        }
    }

    fn json_blob(&self, media_type: &str, value: &Value) -> Written {
        self.blob(media_type, serde_json::to_vec(value).unwrap())
    }

    /// An image with random layers of the given sizes; not tagged.
    pub fn image(&self, layer_sizes: &[usize], arch: &str) -> Written {
        let layers: Vec<Written> = layer_sizes
            .iter()
            .map(|&n| {
                self.blob(
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    random_bytes(n),
                )
            })
            .collect();
        let config = self.json_blob(
            "application/vnd.oci.image.config.v1+json",
            &json!({
                "architecture": arch,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
            }),
        );
        self.json_blob(
            OCI_MANIFEST,
            &json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": layers.iter().map(Written::descriptor).collect::<Vec<_>>(),
            }),
        )
    }

    /// A layer the Docker engine can load: a real (uncompressed) tar holding one file of `size`
    /// random bytes.
    pub fn tar_layer(&self, size: usize) -> Written {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(size as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        let name = format!("data/{}", &sha256(&random_bytes(16))[7..19]);
        tar.append_data(&mut header, name, &random_bytes(size)[..])
            .unwrap();
        self.blob(
            "application/vnd.oci.image.layer.v1.tar",
            tar.into_inner().unwrap(),
        )
    }

    /// An image of tar layers: the config's `diff_ids` are the layers' digests, as
    /// `docker load` checks.
    pub fn docker_image(&self, layers: &[Written]) -> Written {
        let config = self.json_blob(
            "application/vnd.oci.image.config.v1+json",
            &json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
            }),
        );
        self.json_blob(
            OCI_MANIFEST,
            &json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": layers.iter().map(Written::descriptor).collect::<Vec<_>>(),
            }),
        )
    }

    /// A two-platform index over fresh images.
    pub fn multi_arch(&self, layer_sizes: &[usize]) -> Written {
        let amd = self.image(layer_sizes, "amd64");
        let arm = self.image(layer_sizes, "arm64");
        let entry = |w: &Written, arch: &str| {
            let mut d = w.descriptor();
            d["platform"] = json!({"architecture": arch, "os": "linux"});
            d
        };
        self.json_blob(
            OCI_INDEX,
            &json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [entry(&amd, "amd64"), entry(&arm, "arm64")],
            }),
        )
    }

    /// A Helm chart as OCI artifact.
    pub fn helm_chart(&self) -> Written {
        let config = self.json_blob(
            "application/vnd.cncf.helm.config.v1+json",
            &json!({"name": "demo", "version": "0.1.0", "apiVersion": "v2"}),
        );
        let chart = self.blob(
            "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
            random_bytes(4096),
        );
        self.json_blob(
            OCI_MANIFEST,
            &json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [chart.descriptor()],
            }),
        )
    }

    /// A signature-like artifact whose `subject` is `subject`.
    pub fn artifact_for(&self, subject: &Written) -> Written {
        let empty = self.blob("application/vnd.oci.empty.v1+json", b"{}".to_vec());
        let payload = self.blob("application/vnd.example.signature.v1", random_bytes(256));
        self.json_blob(
            OCI_MANIFEST,
            &json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.signature.v1",
                "config": empty.descriptor(),
                "layers": [payload.descriptor()],
                "subject": subject.descriptor(),
                "annotations": {"org.opencontainers.image.created": "2026-11-23T00:00:00Z"},
            }),
        )
    }

    /// Names a manifest in `index.json` so `oci:DIR:name` finds it.
    pub fn tag(&mut self, manifest: &Written, name: &str) {
        let mut d = manifest.descriptor();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": name});
        self.refs.push(d);
        self.write_index();
    }

    fn write_index(&self) {
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": self.refs})).unwrap(),
        )
        .unwrap();
    }
}
