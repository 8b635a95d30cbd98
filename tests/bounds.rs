//! Everything another server sends is bounded (the second hostile round): a client that never
//! reads, a Harbor whose blob never ends or whose pagination never does, an index that lists one
//! child thousands of times. And what that round found on the way: digests of two algorithms,
//! reads of names that cannot exist, a tag deleted mid-copy, probes without the admin token.

use std::net::SocketAddr;
use std::time::Duration;

use regtee::local_registry::{push_blobs, sample_image};

use crate::support::fault::{Fault, FaultFront};
use crate::support::layout::Layout;
use crate::support::*;

/// Established TCP connections to `peer` on this machine (`/proc/net/tcp`): regtee's
/// connections to Harbor, when `peer` is Harbor's address and regtee is the only client.
fn connections_to(peer: SocketAddr) -> usize {
    let SocketAddr::V4(peer) = peer else {
        panic!("IPv4 expected")
    };
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(peer.ip().octets()),
        peer.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&wanted.as_str()) && f.get(3) == Some(&"01")
        })
        .count()
}

/// An HTTP/2 client whose streams get no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0)
/// asks for 20 blobs on one connection and never reads them. hyper never polls those bodies;
/// regtee still cuts each after `body_idle_timeout`, and the 20 connections to Harbor under
/// them are closed, however long the client stays.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_never_opens_its_window_holds_no_harbor_connection() {
    use rustls::pki_types::pem::PemObject;
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let image = sample_image(&[512 * 1024]);
    push_blobs(
        &harbor.client(DEV_USER, DEV_PASSWORD),
        "library/big",
        &image,
    )
    .await
    .unwrap();
    let layer = regtee::oci::digest::Digest::sha256_of(&image.layers[0]);
    let files =
        regtee::certs::generate(&["localhost".into()], &work.path().join("certs"), 30).unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.tls = Some((
        "127.0.0.1:0".into(),
        files.server_cert.clone(),
        files.server_key.clone(),
    ));
    spec.proxy_extra = "body_idle_timeout = \"2s\"\n".into();
    let regtee = Regtee::start(&spec).await;
    let harbor_addr = harbor.registry.addr();
    let token = harbor
        .token(DEV_USER, DEV_PASSWORD, &["repository:library/big:pull"])
        .await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&files.ca_cert).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(regtee.https.unwrap())
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let port = regtee.https.unwrap().port();
    let mut held = Vec::new();
    for _ in 0..20 {
        let request = http::Request::get(format!(
            "https://localhost:{port}/v2/library/big/blobs/{layer}"
        ))
        .header("authorization", format!("Bearer {token}"))
        .body(regtee::body::empty())
        .unwrap();
        let response = send.clone().send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    wait_until(
        "regtee to hold 20 connections to Harbor",
        Duration::from_secs(10),
        || async { (connections_to(harbor_addr) >= 20).then_some(()) },
    )
    .await;
    // The client stays, its streams open, and never grants a byte of window.
    wait_until(
        "regtee to let go of Harbor's connections",
        Duration::from_secs(30),
        || async { (connections_to(harbor_addr) == 0).then_some(()) },
    )
    .await;
    drop(held);
    regtee.stop().await;
}

/// A Harbor whose blob answers never end and state no length: regtee cuts the copy at the size
/// it knows (the image spec: content whose length differs "SHOULD NOT be trusted"), so the
/// target receives at most that much per attempt instead of an endless upload.
#[tokio::test(flavor = "multi_thread")]
async fn an_endless_blob_from_harbor_is_cut_at_its_known_size() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&harbor.url()).await;
    let spec = ConfigSpec::at(&front.url(), &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud));
    let regtee = Regtee::start(&spec).await;
    front.set(Fault::EndlessBlobs);
    let through = client_for(
        &format!("http://{}", regtee.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    let image = sample_image(&[2048]);
    push_blobs(&through, "library/endless", &image)
        .await
        .unwrap();

    let attempt = wait_until(
        "a blob copy cut at its size",
        Duration::from_secs(60),
        || async {
            let jobs = admin_get(&regtee, "/api/v1/jobs?repository=library/endless").await;
            jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| {
                    j["detail"]
                        .as_str()
                        .unwrap_or("")
                        .contains("content length mismatch")
                })
                .cloned()
        },
    )
    .await;
    assert!(
        attempt["detail"]
            .as_str()
            .unwrap()
            .contains("expected 2048 bytes")
            || attempt["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("expected {} bytes", image.config.len())),
        "{attempt}"
    );
    // Nothing beyond the blobs' own sizes reached the target's storage (uploads included).
    let stored = dir_size(&cloud.registry.data_dir());
    assert!(
        stored < 1 << 20,
        "the target holds {stored} bytes for blobs of a few KiB"
    );
    regtee.stop().await;
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// A tag list whose `Link` names itself: `regtee sync` stops at the repeat and says so, instead
/// of listing for ever; a backfill can be cancelled, and a cancelled one says so.
#[tokio::test(flavor = "multi_thread")]
async fn endless_pagination_ends_the_listing_and_a_backfill_can_be_cancelled() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[10_000], "amd64");
    layout.tag(&image, "v1");
    push_layout_ok(
        &layout.dir,
        "v1",
        &harbor.host(),
        "library/app:v1",
        Tls::Off,
    );
    let front = FaultFront::start(&harbor.url()).await;
    let spec = ConfigSpec::at(&front.url(), &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::cloud("tcr", &cloud));
    let regtee = Regtee::start(&spec).await;
    let config = spec.write(&work.path().join("regtee.toml"));

    front.set(Fault::TagsLinkToThemselves);
    let out = tokio::task::block_in_place(|| regtee_cli(&config, &spec, &["sync", "library"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "the registry's pagination loops");

    // A backfill held on Harbor's answer is cancelled from the command line.
    front.set(Fault::Hold("/tags/list".into()));
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/backfills"),
        "POST",
        Some(br#"{"project":"library"}"#.to_vec()),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap()
        .to_string();
    wait_until(
        "the backfill to wait on Harbor",
        Duration::from_secs(30),
        || async { (front.held() > 0).then_some(()) },
    )
    .await;
    let out =
        tokio::task::block_in_place(|| regtee_cli(&config, &spec, &["sync", "--cancel", &id]));
    assert!(out.status.success(), "{}", text(&out));
    let progress = wait_until("the backfill to stop", Duration::from_secs(10), || async {
        let p = admin_get(&regtee, &format!("/api/v1/backfills/{id}")).await;
        (p["state"] != "running").then_some(p)
    })
    .await;
    assert_eq!(progress["state"], "cancelled", "{progress}");
    assert!(
        progress["errors"][0]
            .as_str()
            .unwrap()
            .contains("cancelled by an operator"),
        "{progress}"
    );
    let out =
        tokio::task::block_in_place(|| regtee_cli(&config, &spec, &["sync", "--cancel", &id]));
    assert!(!out.status.success(), "{}", text(&out));
    assert_says(&out, "is not running");
    front.release();
    regtee.stop().await;
}

/// distribution answers a `sha512:` upload with its canonical `sha256:` digest: a blob pushed
/// by sha512 is mirrored and done, not failed for comparing digests of two algorithms.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_pushed_by_sha512_is_mirrored() {
    use sha2::Digest as _;
    let world = World::start(&["library"], &[]).await;
    let blob = layout_bytes(30_000);
    let digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&blob)));
    let token = world
        .harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/sha:pull,push"],
        )
        .await;
    let base = format!("http://{}", world.regtee.host());
    let auth = format!("Bearer {token}");
    let client = raw_http_client(None, true);
    let start = client
        .request(
            http::Request::post(format!("{base}/v2/library/sha/blobs/uploads/"))
                .header("authorization", &auth)
                .body(regtee::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(start.status(), 202);
    let location = start.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let (status, body) = http_request(
        &format!("{location}{separator}digest={digest}"),
        "PUT",
        Some(blob.clone()),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let job = wait_until(
        "the sha512 blob's job to end",
        Duration::from_secs(60),
        || async {
            admin_get(&world.regtee, "/api/v1/jobs?repository=library/sha").await["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["kind"] == "blob" && j["state"] != "pending" && j["state"] != "running")
                .cloned()
        },
    )
    .await;
    assert_eq!(job["state"], "done", "{job}");
    let parsed: regtee::oci::digest::Digest = digest.parse().unwrap();
    assert!(
        world
            .target()
            .blob_exists("library/sha", &parsed)
            .await
            .unwrap()
            .is_some()
    );
    world.regtee.stop().await;
}

fn layout_bytes(n: usize) -> Vec<u8> {
    crate::support::layout::random_bytes(n)
}

/// An index that lists one child 5,000 times costs a handful of requests to the target, not
/// one HEAD per entry.
#[tokio::test(flavor = "multi_thread")]
async fn an_index_listing_one_child_thousands_of_times_is_checked_once() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()));
    let regtee = Regtee::start(&spec).await;
    let through = client_for(
        &format!("http://{}", regtee.host()),
        Some((DEV_USER, DEV_PASSWORD)),
    );
    let image = sample_image(&[5_000]);
    push_blobs(&through, "library/dup", &image).await.unwrap();
    through
        .put_manifest(
            "library/dup",
            image.digest.as_str(),
            "application/vnd.oci.image.manifest.v1+json",
            image.manifest.clone(),
        )
        .await
        .unwrap();
    let child = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": image.digest.to_string(),
        "size": image.manifest.len(),
        "platform": {"architecture": "amd64", "os": "linux"},
    });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": vec![child; 5_000],
    });
    let bytes = bytes::Bytes::from(serde_json::to_vec(&index).unwrap());
    let index_digest = regtee::oci::digest::Digest::sha256_of(&bytes);
    through
        .put_manifest(
            "library/dup",
            "many",
            "application/vnd.oci.image.index.v1+json",
            bytes,
        )
        .await
        .unwrap();
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    wait_for_manifest(&target, "library/dup", "many", index_digest.as_str()).await;
    let requests = front.requests();
    assert!(
        requests < 100,
        "{requests} requests to the target for an index of one child"
    );
    regtee.stop().await;
}

/// A tag deleted in Harbor while its manifest is being copied: the job says it was deleted
/// (not that it "moved on"), and the manifest is stored by digest only.
#[tokio::test(flavor = "multi_thread")]
async fn a_tag_deleted_during_its_copy_is_said_to_be_deleted() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    // With a tag filter the manifest job copies its blobs itself: the only uploads are its own.
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()).with("tags = [\"v*\"]"));
    let regtee = Regtee::start(&spec).await;
    front.set(Fault::Hold("/blobs/uploads/".into()));
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[8_000], "amd64");
    layout.tag(&image, "v1");
    push_layout_ok(
        &layout.dir,
        "v1",
        &regtee.host(),
        "library/gone:v1",
        Tls::Off,
    );
    wait_until("the copy to upload", Duration::from_secs(30), || async {
        (front.held() > 0).then_some(())
    })
    .await;
    let deleted = harbor
        .client(ADMIN_USER, ADMIN_PASSWORD)
        .delete_manifest("library/gone", &image.digest)
        .await
        .unwrap();
    assert!(deleted);
    front.release();
    let job = wait_until(
        "the manifest job to end",
        Duration::from_secs(60),
        || async {
            admin_get(&regtee, "/api/v1/jobs?repository=library/gone").await["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["kind"] == "manifest" && j["state"] == "done")
                .cloned()
        },
    )
    .await;
    assert!(
        job["detail"]
            .as_str()
            .unwrap()
            .contains("tag v1 was deleted in Harbor while it was copied"),
        "{job}"
    );
    let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    assert!(
        target
            .manifest_head("library/gone", "v1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        target
            .manifest_head("library/gone", &image.digest)
            .await
            .unwrap()
            .is_some()
    );
    regtee.stop().await;
}

/// A read of a name or reference that cannot exist is answered as Harbor answers it, not
/// found (the OCI conformance suite's `.INVALID_MANIFEST_NAME`), with the spec's code; a write
/// of it is still refused as invalid. Nothing is forwarded either way.
#[tokio::test(flavor = "multi_thread")]
async fn reads_of_names_that_cannot_exist_are_not_found_as_harbor_says() {
    let world = World::start(&["library"], &[]).await;
    let token = world
        .harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/app:pull,push"],
        )
        .await;
    let auth = format!("Bearer {token}");
    let through = format!("http://{}", world.regtee.host());
    // (distribution's routes do not match an invalid name or manifest reference: 404; a
    // malformed digest matches the blob route and is refused there: 400.)
    let cases = [
        (
            "/v2/library/app/manifests/.INVALID_MANIFEST_NAME",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/library/App/manifests/v1", 404, "NAME_UNKNOWN"),
        ("/v2/library/App/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/library/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ];
    for (path, expected, code) in cases {
        for method in ["GET", "HEAD"] {
            let request = |base: &str| {
                http::Request::builder()
                    .method(method)
                    .uri(format!("{base}{path}"))
                    .header("authorization", &auth)
                    .body(regtee::body::empty())
                    .unwrap()
            };
            let direct = world
                .harbor
                .raw_client()
                .request(request(&world.harbor.url()))
                .await
                .unwrap()
                .status();
            let (status, body) = http_request(
                &format!("{through}{path}"),
                method,
                None,
                &[("authorization", &auth)],
            )
            .await;
            assert_eq!(status, direct.as_u16(), "{method} {path}: {body}");
            assert_eq!(status, expected, "{method} {path}");
            if method == "GET" {
                assert!(body.contains(code), "{method} {path}: {body}");
            }
        }
    }
    let (status, body) = http_request(
        &format!("{through}/v2/library/app/manifests/.INVALID_MANIFEST_NAME"),
        "PUT",
        Some(b"{}".to_vec()),
        &[
            ("authorization", &auth),
            ("content-type", "application/vnd.oci.image.manifest.v1+json"),
        ],
    )
    .await;
    assert_eq!(
        (status, body.contains("TAG_INVALID")),
        (400, true),
        "{body}"
    );
    world.regtee.stop().await;
}

/// With an admin token set, a kubelet's bare probes still work: `/healthz` answers, `/readyz`
/// answers its status code alone (the reason needs the token), everything else needs it.
#[tokio::test(flavor = "multi_thread")]
async fn probes_need_no_admin_token_and_say_nothing_more() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.admin_token = Some("admin-token-for-probes".into());
    let regtee = Regtee::start(&spec).await;
    let (status, body) = http_request(&regtee.admin_url("/healthz"), "GET", None, &[]).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    for path in ["/metrics", "/api/v1/status", "/api/v1/jobs", "/healthz/x"] {
        let (status, _) = http_request(&regtee.admin_url(path), "GET", None, &[]).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = http_request(
        &regtee.admin_url("/metrics"),
        "GET",
        None,
        &[("authorization", "Bearer admin-token-for-probes")],
    )
    .await;
    assert_eq!(status, 200);
    // Not ready: the status code, not the reason (which names Harbor's address).
    let mut harbor = harbor;
    harbor.stop();
    let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!((status, body.as_str()), (503, "not ready\n"));
    regtee.stop().await;
}
