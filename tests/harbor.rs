//! Harbor as its installer deploys it (HTTPS or HTTP by its own nginx), behind both of
//! regtee's listeners: every push works in every scheme combination, and the failures a person
//! meets on the way say what happened and what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use regtee::oci::digest::Digest;

use crate::support::harbor::{HarborCertificate, HarborFront, HarborScheme};
use crate::support::layout::{self, Layout};
use crate::support::*;

/// regtee with both listeners in front of `harbor`, mirroring to `cloud`.
struct BothListeners {
    regtee: Regtee,
    /// Trust for the HTTPS listener, as `/etc/docker/certs.d/HOST/` holds it (`ca.crt`).
    trust: PathBuf,
    ca_cert: PathBuf,
}

async fn both_listeners(harbor: &AuthRegistry, cloud: &AuthRegistry, work: &Path) -> BothListeners {
    let files = regtee::certs::generate(&["localhost".into()], &work.join("certs"), 30).unwrap();
    let mut spec =
        ConfigSpec::new(harbor, &work.join("state")).target(TargetSpec::cloud("tcr", cloud));
    spec.tls = Some(("127.0.0.1:0".into(), files.server_cert, files.server_key));
    let regtee = Regtee::start(&spec).await;
    let trust = work.join("certs.d");
    std::fs::create_dir_all(&trust).unwrap();
    std::fs::copy(&files.ca_cert, trust.join("ca.crt")).unwrap();
    BothListeners {
        regtee,
        trust,
        ca_cert: files.ca_cert,
    }
}

/// A raw request with a bearer token; returns the status and the `Location` header.
async fn raw(url: &str, method: &str, token: &str, ca: Option<&Path>) -> (u16, Option<String>) {
    let client = raw_http_client(ca, false);
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .body(regtee::body::empty())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (response.status().as_u16(), location)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_push_works_through_both_listeners_in_front_of_https_and_http_harbor() {
    let work = tempfile::tempdir().unwrap();
    for harbor_scheme in [HarborScheme::Https, HarborScheme::Http] {
        let dir = work.path().join(format!("{harbor_scheme:?}"));
        let harbor =
            start_harbor_with(&dir.join("harbor"), Default::default(), Some(harbor_scheme)).await;
        let cloud = start_cloud(&dir.join("cloud"), &["library"]).await;
        let both = both_listeners(&harbor, &cloud, &dir).await;
        let target = cloud.client(CLOUD_USER, CLOUD_PASSWORD);
        let direct = harbor.client(ADMIN_USER, ADMIN_PASSWORD);
        let trust: &'static Path = Box::leak(both.trust.clone().into_boxed_path());
        let listeners = [
            (
                "http",
                both.regtee.http.to_string(),
                None,
                Box::new(|| Tls::Off) as Box<dyn Fn() -> Tls<'static>>,
            ),
            (
                "https",
                format!("localhost:{}", both.regtee.https.unwrap().port()),
                Some(both.ca_cert.as_path()),
                Box::new(move || Tls::CertDir(trust)),
            ),
        ];
        for (scheme, host, ca, tls) in listeners {
            let case = format!("Harbor on {harbor_scheme:?}, client on regtee's {scheme} listener");
            let origin = format!("{scheme}://{host}");
            let repo = format!("library/app-{}", scheme);

            // What every push starts with: the upload session's Location names the origin the
            // client used, not Harbor's, and not a mix of both.
            let token = harbor
                .token(
                    DEV_USER,
                    DEV_PASSWORD,
                    &[&format!("repository:{repo}:pull,push,delete")],
                )
                .await;
            let (status, location) = raw(
                &format!("{origin}/v2/{repo}/blobs/uploads/"),
                "POST",
                &token,
                ca,
            )
            .await;
            assert_eq!(status, 202, "{case}");
            let location = location.unwrap();
            assert!(
                location.starts_with(&format!("{origin}/v2/{repo}/blobs/uploads/")),
                "{case}: Location {location}"
            );
            let (status, _) = raw(&location, "DELETE", &token, ca).await;
            assert_eq!(
                status, 204,
                "{case}: the session is reachable through regtee"
            );

            // Login through the listener.
            let auth = dir.join(format!("auth-{scheme}.json"));
            let mut login = std::process::Command::new("skopeo");
            login.args(["login", "--authfile"]).arg(&auth);
            match ca {
                None => login.arg("--tls-verify=false"),
                Some(_) => login.arg(format!("--cert-dir={}", trust.display())),
            };
            let out = login
                .args(["-u", DEV_USER, "-p", DEV_PASSWORD, &host])
                .output()
                .unwrap();
            assert!(out.status.success(), "{case}: login: {}", text(&out));

            // A multi-layer push, then the same image under another repository (skopeo mounts
            // what the registry already has), then a pull back.
            let mut layout = Layout::new(&dir.join(format!("layout-{scheme}")));
            let image = layout.image(&[400_000, 90_000, 1_500_000], "amd64");
            layout.tag(&image, "image");
            push_layout_ok(&layout.dir, "image", &host, &format!("{repo}:1"), tls());
            push_layout_ok(
                &layout.dir,
                "image",
                &host,
                &format!("{repo}-copy:1"),
                tls(),
            );
            let pulled = dir.join(format!("pulled-{scheme}"));
            pull_to_layout(
                &host,
                &format!("{repo}:1"),
                &pulled,
                (DEV_USER, DEV_PASSWORD),
                tls(),
            );
            let index: serde_json::Value =
                serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap()).unwrap();
            assert_eq!(
                index["manifests"][0]["digest"],
                image.digest.as_str(),
                "{case}"
            );

            // regtee's own client through the listener: an explicit cross-repository mount,
            // and a chunked upload (several PATCHes, then the closing PUT).
            let through = client_for(&origin, Some((DEV_USER, DEV_PASSWORD)));
            let layer: Digest = image.layers()[0].parse().unwrap();
            let mounted_into = format!("{repo}-mounted");
            let mount = through
                .mount_blob(&mounted_into, &layer, &repo)
                .await
                .unwrap();
            assert!(
                matches!(mount, regtee::registry::Mount::Mounted),
                "{case}: mount: {mount:?}"
            );
            let bytes = layout::random_bytes(700_000);
            let chunked = Digest::sha256_of(&bytes);
            through
                .upload_blob(
                    &repo,
                    &chunked,
                    regtee::registry::Upload {
                        chunking: regtee::registry::Chunking {
                            size: 256 * 1024,
                            ..regtee::registry::Chunking::WHOLE
                        },
                        ..regtee::registry::Upload::whole(bytes.clone().into())
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{case}: chunked upload: {e}"));

            // Harbor has it all, and so does the target, with the same digests.
            let on_harbor = direct.manifest_head(&repo, "1").await.unwrap().unwrap();
            assert_eq!(on_harbor.digest.as_str(), image.digest, "{case}");
            for r in [repo.clone(), format!("{repo}-copy")] {
                wait_for_manifest(&target, &r, "1", &image.digest).await;
            }
            for (r, d) in [(&mounted_into, &layer), (&repo, &chunked)] {
                assert!(
                    direct.blob_exists(r, d).await.unwrap().is_some(),
                    "{case}: {r}@{d}"
                );
                wait_until(
                    &format!("{case}: {r}@{d} on the target"),
                    Duration::from_secs(30),
                    || async { target.blob_exists(r, d).await.ok().flatten() },
                )
                .await;
            }
            let mirrored = target.get_blob(&repo, &chunked).await.unwrap();
            let copied = regtee::body::read_limited(mirrored.body, 1 << 20)
                .await
                .unwrap();
            assert_eq!(copied, bytes, "{case}: chunked blob bytes on the target");
        }
        both.regtee.stop().await;
    }
}

/// Counts the lines of `log` that contain `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_on_the_wrong_port_or_protocol_is_told_so_once() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let files =
        regtee::certs::generate(&["localhost".into()], &work.path().join("certs"), 30).unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    let (plain, tls) = (
        regtee::local_registry::free_port().unwrap(),
        regtee::local_registry::free_port().unwrap(),
    );
    spec.listen = format!("127.0.0.1:{plain}");
    spec.tls = Some((
        format!("127.0.0.1:{tls}"),
        files.server_cert.clone(),
        files.server_key.clone(),
    ));
    let config = spec.write(&work.path().join("regtee.toml"));
    let process = RegteeProcess::spawn(&config, &spec, &work.path().join("regtee.log"));
    wait_listening(format!("127.0.0.1:{plain}").parse().unwrap()).await;
    wait_listening(format!("127.0.0.1:{tls}").parse().unwrap()).await;

    // TLS on the plain listener, ten times: one line.
    for _ in 0..10 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", plain))
            .await
            .unwrap();
        let _ = tls_connector(Some(&files.ca_cert))
            .connect("localhost".try_into().unwrap(), tcp)
            .await;
    }
    // Plain HTTP on the TLS listener: a readable answer, and one line.
    for _ in 0..10 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls))
            .await
            .unwrap();
        tcp.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("regtee's HTTPS port"), "{answer}");
    }
    // A client that does not trust regtee's certificate: the handshake fails, and the line says
    // why.
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls))
            .await
            .unwrap();
        let refused = tls_connector(None)
            .connect("localhost".try_into().unwrap(), tcp)
            .await;
        assert!(refused.is_err());
    }
    let log = wait_until("the three diagnostics", Duration::from_secs(10), || async {
        let log = process.log_text();
        (log.contains("tried TLS on the plain listener")
            && log.contains("spoke plain HTTP to the HTTPS listener")
            && log.contains("does not trust regtee's certificate"))
        .then_some(log)
    })
    .await;
    assert_eq!(
        lines_with(&log, "tried TLS on the plain listener"),
        1,
        "{log}"
    );
    assert_eq!(
        lines_with(&log, "spoke plain HTTP to the HTTPS listener"),
        1,
        "{log}"
    );
    assert_eq!(lines_with(&log, "TLS handshake failed"), 1, "{log}");
    assert!(
        log.contains("insecure-registries"),
        "the line says what to do: {log}"
    );
}

/// A rustls client trusting `ca` (or nothing).
fn tls_connector(ca: Option<&Path>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_self_signed_ca_certificate_on_harbor_is_explained_in_check_readyz_and_the_502() {
    let work = tempfile::tempdir().unwrap();
    let front = HarborFront::plan_with(
        &work.path().join("harbor/nginx"),
        HarborScheme::Https,
        HarborCertificate::SelfSignedCa,
    );
    let harbor =
        start_harbor_behind(&work.path().join("harbor"), Default::default(), Some(front)).await;
    // The operator trusts the certificate itself, as `openssl req -x509` guides say.
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    let config = spec.write(&work.path().join("regtee.toml"));
    let out = regtee_cli(&config, &spec, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "FAIL  upstream");
    assert_says(&out, "CaUsedAsEndEntity");
    assert_says(&out, "hint: issue a server certificate signed by a CA");

    let regtee = Regtee::start(&spec).await;
    let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("CaUsedAsEndEntity"), "{body}");
    let (status, body) =
        http_request(&format!("http://{}/v2/", regtee.host()), "GET", None, &[]).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("CaUsedAsEndEntity"), "{body}");
    assert!(
        body.contains("ca_file"),
        "the answer says what to do: {body}"
    );
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn harbors_plain_port_redirect_is_refused_with_the_fix_instead_of_bypassing_regtee() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let front = harbor.front.as_ref().unwrap();
    let plain = format!("http://{}:{}", harbor::HOST, front.redirect_port.unwrap());
    let spec = ConfigSpec::at(&plain, &work.path().join("state"));
    let config = spec.write(&work.path().join("regtee.toml"));
    let out = regtee_cli(&config, &spec, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "serves HTTPS only");
    assert_says(
        &out,
        &format!("set url = \"{}\" in [upstream]", harbor.url()),
    );

    let regtee = Regtee::start(&spec).await;
    for path in ["/v2/", "/v2/library/app/blobs/uploads/"] {
        let (status, body) = http_request(
            &format!("http://{}{path}", regtee.host()),
            "POST",
            None,
            &[],
        )
        .await;
        assert_eq!(status, 502, "{path}: {body}");
        assert!(
            body.contains(&format!("[upstream] url = \\\"{}\\\"", harbor.url())),
            "{path}: {body}"
        );
    }
    let (status, body) = http_request(&regtee.admin_url("/readyz"), "GET", None, &[]).await;
    assert_eq!(status, 503, "{body}");
    regtee.stop().await;
}
