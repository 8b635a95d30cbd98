//! The store alone: fills, joins, hits, ranges, verification, eviction and restarts, on a real
//! directory.

use std::time::Duration;

use http_body_util::BodyExt;

use super::*;
use crate::body::ProxyBody;

fn cache(dir: &Path, max: u64) -> Cache {
    Cache::open(
        dir,
        max,
        Arc::new(Metrics::new()),
        tokio_util::task::TaskTracker::new(),
    )
    .unwrap()
}

/// `content` as a body of `frames` frames that arrive `pause` apart.
fn body(content: &[u8], frames: usize, pause: Duration) -> ProxyBody {
    let chunks: Vec<Bytes> = content
        .chunks(content.len().div_ceil(frames).max(1))
        .map(Bytes::copy_from_slice)
        .collect();
    let stream = futures_util::stream::iter(chunks).then(move |c| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))
    });
    crate::body::boxed(http_body_util::StreamBody::new(stream))
}

use bytes::Bytes;
use futures_util::StreamExt as _;

fn content(n: usize) -> (Vec<u8>, Digest) {
    let v: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let d = Digest::sha256_of(&v);
    (v, d)
}

async fn all(body: ProxyBody) -> Result<Vec<u8>, String> {
    body.collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .map_err(|e| e.to_string())
}

/// Waits until the fill of `digest` has ended (it is no longer in progress).
async fn settled(c: &Cache, digest: &Digest) {
    for _ in 0..500 {
        if !c.inner.filling.contains_key(digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the fill never ended");
}

/// Starts the fill of `digest` (for `repo`) from `bytes` sent in `frames` frames; its first reader.
fn fill_from(c: &Cache, digest: &Digest, repo: &str, bytes: &[u8], frames: usize) -> ProxyBody {
    let Slot::Start(start) = c.slot(digest, repo) else {
        panic!("{digest} is not being filled yet")
    };
    start
        .begin(
            body(bytes, frames, Duration::ZERO),
            bytes.len() as u64,
            Kind::Blob,
            "harbor",
        )
        .ok()
        .unwrap()
}

#[tokio::test]
async fn a_fill_serves_its_starter_and_joiners_then_hits_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 30);
    let (bytes, digest) = content(3 << 20);
    let Slot::Start(start) = c.slot(&digest, "library/a") else {
        panic!("nobody fills it yet")
    };
    let Slot::Join(joined) = c.slot(&digest, "library/b") else {
        panic!("a second request joins")
    };
    let first = start
        .begin(
            body(&bytes, 30, Duration::from_millis(2)),
            bytes.len() as u64,
            Kind::Blob,
            "harbor",
        )
        .ok()
        .unwrap();
    assert_eq!(joined.begun().await, Some((bytes.len() as u64, Kind::Blob)));
    let second = joined.reader(&c, "harbor");
    let (a, b) = tokio::join!(all(first), all(second));
    assert_eq!(a.unwrap(), bytes);
    assert_eq!(b.unwrap(), bytes);
    settled(&c, &digest).await;
    assert!(c.get(&digest).is_some(), "cached once verified");
    assert!(c.is_linked(&digest, "library/a"));
    assert!(
        !c.is_linked(&digest, "library/b"),
        "only what Harbor served"
    );
    let hit = c.read(&digest, None).unwrap();
    assert_eq!(all(hit.body).await.unwrap(), bytes);
    let part = c.read(&digest, Some((10, 19))).unwrap();
    assert_eq!(all(part.body).await.unwrap(), &bytes[10..20]);
    assert!(
        c.read(&digest, Some((5, bytes.len() as u64))).is_none(),
        "out of range"
    );
}

#[tokio::test]
async fn wrong_bytes_are_never_cached_and_their_readers_are_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 30);
    let (bytes, digest) = content(1 << 20);
    let mut wrong = bytes.clone();
    wrong[1000] ^= 1;
    let reader = fill_from(&c, &digest, "library/a", &wrong, 8);
    let got = reader.collect().await;
    assert!(got.is_err(), "ended short, not delivered whole");
    settled(&c, &digest).await;
    assert!(c.get(&digest).is_none());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn the_least_recently_used_go_first_and_an_entry_being_read_stays() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 250_000);
    let mut digests = Vec::new();
    for n in [100_000, 100_001] {
        let (bytes, digest) = content(n);
        let Slot::Start(start) = c.slot(&digest, "r") else {
            panic!()
        };
        let reader = start
            .begin(
                body(&bytes, 2, Duration::ZERO),
                n as u64,
                Kind::Blob,
                "harbor",
            )
            .ok()
            .unwrap();
        all(reader).await.unwrap();
        settled(&c, &digest).await;
        digests.push(digest);
    }
    // The first is older; but it is being read while the third arrives.
    let reading = c.read(&digests[0], None).unwrap();
    let (bytes, third) = content(100_002);
    let reader = fill_from(&c, &third, "r", &bytes, 2);
    all(reader).await.unwrap();
    settled(&c, &third).await;
    assert!(c.get(&digests[0]).is_some(), "being read: kept");
    assert!(
        c.get(&digests[1]).is_none(),
        "the least recently used other entry went"
    );
    assert!(c.get(&third).is_some());
    drop(reading);
    assert!(c.stats().size_bytes <= 250_000);
    // Larger than the whole cache: not cached, handed back.
    let (big, big_digest) = content(300_000);
    let Slot::Start(start) = c.slot(&big_digest, "r") else {
        panic!()
    };
    assert!(
        start
            .begin(
                body(&big, 1, Duration::ZERO),
                big.len() as u64,
                Kind::Blob,
                "harbor"
            )
            .is_err()
    );
    assert!(
        matches!(c.slot(&big_digest, "r"), Slot::Start(_)),
        "the slot was freed"
    );
}

#[tokio::test]
async fn entries_outlive_a_restart_and_a_damaged_one_is_discarded_on_its_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, digest) = content(200_000);
    let (manifest, manifest_digest) = content(1_000);
    {
        let c = cache(dir.path(), 1 << 30);
        for (content, digest, kind) in [
            (&bytes, &digest, Kind::Blob),
            (
                &manifest,
                &manifest_digest,
                Kind::Manifest {
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                },
            ),
        ] {
            let Slot::Start(start) = c.slot(digest, "library/a") else {
                panic!()
            };
            let reader = start
                .begin(
                    body(content, 3, Duration::ZERO),
                    content.len() as u64,
                    kind,
                    "harbor",
                )
                .ok()
                .unwrap();
            all(reader).await.unwrap();
            settled(&c, digest).await;
        }
        c.set_tag("library/a", "v1", &manifest_digest);
        c.link(&digest, "library/b");
        c.inner.tasks.close();
        c.inner.tasks.wait().await;
    }
    let c = cache(dir.path(), 1 << 30);
    assert_eq!(c.tag("library/a", "v1"), Some(manifest_digest.clone()));
    assert!(c.is_linked(&digest, "library/b"), "links are kept");
    let Cached { kind, size } = c.get(&manifest_digest).unwrap();
    assert_eq!(
        (size, kind),
        (
            1_000,
            Kind::Manifest {
                media_type: "application/vnd.oci.image.manifest.v1+json".into()
            }
        )
    );
    assert_eq!(
        all(c.read(&manifest_digest, None).unwrap().body)
            .await
            .unwrap(),
        manifest
    );
    // Damage the blob on disk (same size): its first whole read fails and discards it.
    let path = c.inner.path(&Kind::Blob, &digest);
    let mut damaged = std::fs::read(&path).unwrap();
    damaged[5] ^= 0xff;
    std::fs::write(&path, damaged).unwrap();
    assert!(all(c.read(&digest, None).unwrap().body).await.is_err());
    assert!(c.get(&digest).is_none());
    assert!(!path.exists());
    // A truncated file is noticed at open: not served, discarded.
    let kind = Kind::Manifest {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
    };
    let path = c.inner.path(&kind, &manifest_digest);
    std::fs::write(&path, &manifest[..10]).unwrap();
    assert!(c.read(&manifest_digest, None).is_none());
    assert!(c.get(&manifest_digest).is_none());
}
