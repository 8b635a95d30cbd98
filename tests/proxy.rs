//! The request path: a spec-conformant client sees through regtee what it sees on Harbor.

use std::time::Duration;

use crate::support::layout::{self, Layout};
use crate::support::*;

/// Pushes every kind of content through regtee with skopeo, pulls it back, and checks the
/// digests against what Harbor itself serves.
async fn push_and_pull_all_kinds(
    host: &str,
    harbor: &AuthRegistry,
    work: &std::path::Path,
    tls: impl Fn() -> Tls<'static>,
) {
    let mut layout = Layout::new(&work.join("layout"));
    let image = layout.image(&[300_000, 70_000, 1_200_000], "amd64");
    let index = layout.multi_arch(&[50_000, 20_000]);
    let chart = layout.helm_chart();
    let signature = layout.artifact_for(&image);
    layout.tag(&image, "image");
    layout.tag(&index, "index");
    layout.tag(&chart, "chart");
    layout.tag(&signature, "signature");
    let direct = harbor.client(ADMIN_USER, ADMIN_PASSWORD);
    for (name, manifest, repo_tag) in [
        ("image", &image, "library/app:1.0"),
        ("index", &index, "library/multi:1.0"),
        ("chart", &chart, "team/charts/demo:0.1.0"),
        ("signature", &signature, "library/app:sig"),
    ] {
        push_layout_ok(&layout.dir, name, host, repo_tag, tls());
        let (repo, tag) = repo_tag.split_once(':').unwrap();
        let through = inspect_raw(host, repo_tag, (DEV_USER, DEV_PASSWORD), tls());
        assert_eq!(
            regtee::oci::digest::Digest::sha256_of(&through).to_string(),
            manifest.digest,
            "{repo_tag}: digest through regtee"
        );
        assert_eq!(through, manifest.bytes, "{repo_tag}: bytes through regtee");
        let on_harbor = direct.get_manifest(repo, tag).await.unwrap().unwrap();
        assert_eq!(
            on_harbor.digest.to_string(),
            manifest.digest,
            "{repo_tag}: digest on Harbor"
        );
        let pulled = work.join(format!("pulled-{name}"));
        pull_to_layout(host, repo_tag, &pulled, (DEV_USER, DEV_PASSWORD), tls());
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], manifest.digest.as_str());
    }
    // Every blob of the image came back byte for byte.
    let pulled_blobs = work.join("pulled-image/blobs/sha256");
    for entry in std::fs::read_dir(work.join("layout/blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let theirs = pulled_blobs.join(entry.file_name());
        if theirs.exists() {
            assert_eq!(
                std::fs::read(entry.path()).unwrap(),
                std::fs::read(theirs).unwrap()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_and_pulls_every_kind_of_content_over_http() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let regtee = Regtee::start(&ConfigSpec::new(&harbor, &work.path().join("state"))).await;
    push_and_pull_all_kinds(&regtee.host(), &harbor, work.path(), || Tls::Off).await;
    // Every token the client used was fetched through regtee.
    let seen = harbor.issuer.seen();
    let dev_requests: Vec<_> = seen
        .iter()
        .filter(|r| r.account.as_deref() == Some(DEV_USER))
        .collect();
    assert!(!dev_requests.is_empty());
    assert!(
        dev_requests.iter().all(|r| r.forwarded_for.is_some()),
        "{dev_requests:?}"
    );
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_and_pulls_over_https_with_a_generated_certificate() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let files = regtee::certs::generate(&["localhost".into()], &certs, 30).unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.tls = Some((
        "127.0.0.1:0".into(),
        files.server_cert.clone(),
        files.server_key.clone(),
    ));
    let regtee = Regtee::start(&spec).await;
    let host = format!("localhost:{}", regtee.https.unwrap().port());
    // What a Docker host gets: only the CA, as /etc/docker/certs.d/HOST/ca.crt.
    let trust = work.path().join("certs.d");
    std::fs::create_dir_all(&trust).unwrap();
    std::fs::copy(&files.ca_cert, trust.join("ca.crt")).unwrap();
    let certs_static: &'static std::path::Path = Box::leak(trust.into_boxed_path());
    push_and_pull_all_kinds(&host, &harbor, work.path(), || Tls::CertDir(certs_static)).await;
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reaches_only_regtee_logs_in_through_it() {
    // The bare registry names its token service on another origin: the realm is relayed.
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let regtee = Regtee::start(&ConfigSpec::new(&harbor, &work.path().join("state"))).await;
    // The challenge names regtee, not the token service on its own origin.
    let (status, _) =
        http_request(&format!("http://{}/v2/", regtee.host()), "GET", None, &[]).await;
    assert_eq!(status, 401);
    let auth_file = work.path().join("auth.json");
    let out = std::process::Command::new("skopeo")
        .args(["login", "--tls-verify=false", "--authfile"])
        .arg(&auth_file)
        .args(["-u", DEV_USER, "-p", DEV_PASSWORD, &regtee.host()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = std::process::Command::new("skopeo")
        .args(["login", "--tls-verify=false", "--authfile"])
        .arg(work.path().join("bad.json"))
        .args(["-u", DEV_USER, "-p", "wrong", &regtee.host()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong password must not log in");
    let seen = harbor.issuer.seen();
    assert!(seen.len() >= 2);
    assert!(
        seen.iter().all(|r| r.forwarded_for.is_some()),
        "every token request came through regtee: {seen:?}"
    );
    regtee.stop().await;
}

/// One HTTP exchange, reduced to what a spec-conformant client may depend on.
#[derive(Debug, PartialEq, Eq)]
struct Exchange {
    step: &'static str,
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// Speaks the distribution API over raw HTTP, recording each exchange.
struct Speaker {
    client: regtee::http_client::HttpClient,
    base: String,
    token: String,
    repo: String,
    other: String,
    log: Vec<Exchange>,
}

const COMPARED_HEADERS: [&str; 9] = [
    "content-type",
    "content-length",
    "docker-content-digest",
    "docker-distribution-api-version",
    "range",
    "location",
    "link",
    "www-authenticate",
    "content-range",
];

impl Speaker {
    /// A request with no extra headers and no body.
    async fn bare(
        &mut self,
        step: &'static str,
        method: &str,
        path: &str,
    ) -> (u16, http::HeaderMap, Vec<u8>) {
        self.send(step, method, path, &[], vec![]).await
    }

    /// Sends a request; `path` may be a full URL (from a Location or Link header).
    async fn send(
        &mut self,
        step: &'static str,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (u16, http::HeaderMap, Vec<u8>) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(regtee::body::full(body)).unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let resp_headers = resp.headers().clone();
        let bytes = regtee::body::read_limited(resp.into_body(), 64 << 20)
            .await
            .unwrap()
            .to_vec();
        let uuid = resp_headers
            .get("docker-upload-uuid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let normalize = |v: &str| -> String {
            let mut v = v
                .replace(&self.base, "")
                .replace(&self.other, "OTHER")
                .replace(&self.repo, "REPO");
            if let Some(u) = &uuid {
                v = v.replace(u, "UUID");
            }
            // The upload state token is opaque and differs per session.
            if let Some(i) = v.find("_state=") {
                let end = v[i..].find('&').map(|e| i + e).unwrap_or(v.len());
                v.replace_range(i..end, "_state=STATE");
            }
            v
        };
        let mut kept: Vec<(String, String)> = COMPARED_HEADERS
            .iter()
            .filter_map(|name| {
                resp_headers
                    .get(*name)
                    .map(|v| (name.to_string(), normalize(v.to_str().unwrap())))
            })
            .collect();
        if let Some(loc) = resp_headers.get("location").and_then(|v| v.to_str().ok())
            && loc.starts_with("http")
        {
            assert!(
                loc.starts_with(&self.base),
                "{step}: absolute Location {loc} must point at {}",
                self.base
            );
        }
        kept.push(("has-upload-uuid".into(), uuid.is_some().to_string()));
        self.log.push(Exchange {
            step,
            status,
            headers: kept,
            body: normalize(&String::from_utf8_lossy(&bytes)),
        });
        (status, resp_headers, bytes)
    }
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name).unwrap().to_str().unwrap().to_string()
}

fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

/// Walks every endpoint of the distribution spec, writes included.
async fn walk_the_spec(s: &mut Speaker, a: &[u8], b: &[u8], mono: &[u8]) {
    let other = s.other.clone();
    let other_repo = other.as_str();
    use regtee::oci::digest::Digest;
    let octet = || ("content-type", "application/octet-stream".to_string());
    let repo = s.repo.clone();
    let unknown = Digest::sha256_of(b"never pushed").to_string();
    let whole = [a, b].concat();
    let d_whole = Digest::sha256_of(&whole).to_string();
    let d_mono = Digest::sha256_of(mono).to_string();

    s.bare("base", "GET", "/v2/").await;
    s.bare(
        "head unknown blob",
        "HEAD",
        &format!("/v2/{repo}/blobs/{unknown}"),
    )
    .await;
    s.bare(
        "get unknown blob",
        "GET",
        &format!("/v2/{repo}/blobs/{unknown}"),
    )
    .await;

    // Chunked upload with a status check in the middle.
    let (_, h, _) = s
        .bare(
            "start upload",
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
        )
        .await;
    let loc = header(&h, "location");
    let (_, h, _) = s
        .send(
            "patch chunk 1",
            "PATCH",
            &loc,
            &[octet(), ("content-range", format!("0-{}", a.len() - 1))],
            a.to_vec(),
        )
        .await;
    let loc = header(&h, "location");
    s.bare("upload status", "GET", &loc).await;
    let (_, h, _) = s
        .send(
            "patch chunk 2",
            "PATCH",
            &loc,
            &[
                octet(),
                ("content-range", format!("{}-{}", a.len(), whole.len() - 1)),
            ],
            b.to_vec(),
        )
        .await;
    let loc = header(&h, "location");
    s.send(
        "complete upload",
        "PUT",
        &with_digest(&loc, &d_whole),
        &[octet()],
        vec![],
    )
    .await;
    s.bare("head blob", "HEAD", &format!("/v2/{repo}/blobs/{d_whole}"))
        .await;
    let (_, _, got) = s
        .bare("get blob", "GET", &format!("/v2/{repo}/blobs/{d_whole}"))
        .await;
    assert_eq!(got, whole, "blob bytes");
    s.send(
        "get blob range",
        "GET",
        &format!("/v2/{repo}/blobs/{d_whole}"),
        &[("range", "bytes=0-9".into())],
        vec![],
    )
    .await;

    // Monolithic uploads (POST, then one PUT with every byte), then a mount from another
    // repository. (A single-request POST ?digest= upload is optional in the spec, and
    // distribution 2.8 answers it by opening a session: that case is compared too.)
    s.send(
        "single-request upload",
        "POST",
        &format!("/v2/{repo}/blobs/uploads/?digest={d_mono}"),
        &[octet()],
        mono.to_vec(),
    )
    .await;
    for (step, target, bytes, digest) in [
        ("monolithic upload", repo.as_str(), mono, &d_mono),
        (
            "monolithic upload elsewhere",
            other_repo,
            &whole[..],
            &d_whole,
        ),
    ] {
        let (_, h, _) = s
            .send(
                step,
                "POST",
                &format!("/v2/{target}/blobs/uploads/"),
                &[],
                vec![],
            )
            .await;
        s.send(
            step,
            "PUT",
            &with_digest(&header(&h, "location"), digest),
            &[octet()],
            bytes.to_vec(),
        )
        .await;
    }
    s.bare(
        "mount",
        "POST",
        &format!("/v2/{repo}/blobs/uploads/?mount={d_whole}&from={other_repo}"),
    )
    .await;
    let (_, h, _) = s
        .bare(
            "mount of unknown blob falls back to upload",
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?mount={unknown}&from={other_repo}"),
        )
        .await;
    s.bare("cancel upload", "DELETE", &header(&h, "location"))
        .await;
    let (_, h, _) = s
        .bare(
            "start upload 2",
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
        )
        .await;
    s.send(
        "wrong digest",
        "PUT",
        &with_digest(&header(&h, "location"), &unknown),
        &[octet()],
        b"mismatch".to_vec(),
    )
    .await;

    // Manifests, tags, pagination.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d_mono, "size": mono.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d_whole, "size": whole.len()}],
    }))
    .unwrap();
    let d_manifest = Digest::sha256_of(&manifest).to_string();
    let mt = || {
        (
            "content-type",
            "application/vnd.oci.image.manifest.v1+json".to_string(),
        )
    };
    for tag in ["v1", "v2", "v3", "v4"] {
        s.send(
            "put manifest",
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[mt()],
            manifest.clone(),
        )
        .await;
    }
    s.send(
        "head manifest by tag",
        "HEAD",
        &format!("/v2/{repo}/manifests/v1"),
        &[(
            "accept",
            "application/vnd.oci.image.manifest.v1+json".into(),
        )],
        vec![],
    )
    .await;
    let (_, _, got) = s
        .send(
            "get manifest by digest",
            "GET",
            &format!("/v2/{repo}/manifests/{d_manifest}"),
            &[(
                "accept",
                "application/vnd.oci.image.manifest.v1+json".into(),
            )],
            vec![],
        )
        .await;
    assert_eq!(got, manifest);
    // distribution 2.8 ignores n/last on tags (Harbor honours them); the catalog below
    // carries a Link either way. Whatever the upstream does, regtee must do the same.
    let (_, h, _) = s
        .bare("tags page 1", "GET", &format!("/v2/{repo}/tags/list?n=2"))
        .await;
    if let Some(link) = h.get("link").and_then(|v| v.to_str().ok()) {
        let next = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_string();
        s.bare("tags page 2 via Link", "GET", &next).await;
    }
    s.bare(
        "tags after last",
        "GET",
        &format!("/v2/{repo}/tags/list?n=2&last=v2"),
    )
    .await;
    let missing_blob = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": unknown, "size": 3},
        "layers": [],
    }))
    .unwrap();
    s.send(
        "manifest with unknown blob",
        "PUT",
        &format!("/v2/{repo}/manifests/bad"),
        &[mt()],
        missing_blob,
    )
    .await;
    s.send(
        "invalid manifest",
        "PUT",
        &format!("/v2/{repo}/manifests/bad"),
        &[mt()],
        b"{not json".to_vec(),
    )
    .await;
    s.bare(
        "referrers",
        "GET",
        &format!("/v2/{repo}/referrers/{d_manifest}"),
    )
    .await;
    s.bare(
        "delete manifest",
        "DELETE",
        &format!("/v2/{repo}/manifests/{d_manifest}"),
    )
    .await;
    s.bare(
        "get deleted manifest",
        "GET",
        &format!("/v2/{repo}/manifests/v1"),
    )
    .await;
    s.bare(
        "delete blob",
        "DELETE",
        &format!("/v2/{repo}/blobs/{d_whole}"),
    )
    .await;
    s.bare(
        "head deleted blob",
        "HEAD",
        &format!("/v2/{repo}/blobs/{d_whole}"),
    )
    .await;
    s.bare(
        "tags of unknown repository",
        "GET",
        "/v2/library/nothing-here/tags/list",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_spec_endpoint_answers_through_regtee_as_it_does_directly() {
    let work = tempfile::tempdir().unwrap();
    // The registry itself, then Harbor as deployed (its nginx over HTTPS) in front of it.
    spec_walk_direct_and_through_regtee(
        start_bare_harbor(&work.path().join("bare")).await,
        work.path(),
    )
    .await;
    spec_walk_direct_and_through_regtee(
        start_harbor(&work.path().join("harbor")).await,
        work.path(),
    )
    .await;
}

async fn spec_walk_direct_and_through_regtee(harbor: AuthRegistry, work: &std::path::Path) {
    let work = tempfile::tempdir_in(work).unwrap();
    let regtee = Regtee::start(&ConfigSpec::new(&harbor, &work.path().join("state"))).await;
    // One token for both walks, fetched from the token service directly.
    let scopes = [
        "repository:library/conf-a:pull,push,delete",
        "repository:library/conf-b:pull,push,delete",
        "repository:library/src-a:pull,push",
        "repository:library/src-b:pull,push",
        "repository:library/nothing-here:pull",
    ];
    let token = harbor.token(ADMIN_USER, ADMIN_PASSWORD, &scopes).await;
    let client = harbor.raw_client();
    let a = layout::random_bytes(70_000);
    let b = layout::random_bytes(33_333);
    let mono = layout::random_bytes(1_000);
    let mut direct = Speaker {
        client: client.clone(),
        base: harbor.url(),
        token: token.clone(),
        repo: "library/conf-a".into(),
        other: "library/src-a".into(),
        log: vec![],
    };
    walk_the_spec(&mut direct, &a, &b, &mono).await;
    let mut proxied = Speaker {
        client,
        base: format!("http://{}", regtee.host()),
        token,
        repo: "library/conf-b".into(),
        other: "library/src-b".into(),
        log: vec![],
    };
    walk_the_spec(&mut proxied, &a, &b, &mono).await;
    assert_eq!(direct.log.len(), proxied.log.len());
    for (d, p) in direct.log.iter().zip(&proxied.log) {
        assert_eq!(d, p, "step `{}` differs through regtee", d.step);
    }
    // The catalog (and its Link) is the same registry-wide view both ways.
    let mut catalog_direct = Speaker {
        repo: "-".into(),
        log: vec![],
        ..direct
    };
    let mut catalog_proxied = Speaker {
        repo: "-".into(),
        log: vec![],
        ..proxied
    };
    let admin_token = harbor
        .token(ADMIN_USER, ADMIN_PASSWORD, &["registry:catalog:*"])
        .await;
    catalog_direct.token = admin_token.clone();
    catalog_proxied.token = admin_token;
    catalog_direct
        .bare("catalog", "GET", "/v2/_catalog?n=1")
        .await;
    catalog_proxied
        .bare("catalog", "GET", "/v2/_catalog?n=1")
        .await;
    assert_eq!(catalog_direct.log, catalog_proxied.log);
    assert!(
        catalog_proxied.log[0]
            .headers
            .iter()
            .any(|(k, _)| k == "link")
    );
    regtee.stop().await;
}

fn oci_error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_is_a_502_with_an_oci_body_and_service_resumes() {
    let work = tempfile::tempdir().unwrap();
    let port = regtee::local_registry::free_port().unwrap();
    let regtee = Regtee::start(&ConfigSpec::at(
        &format!("http://127.0.0.1:{port}"),
        &work.path().join("state"),
    ))
    .await;
    let url = format!("http://{}/v2/", regtee.host());
    let (status, body) = http_request(&url, "GET", None, &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(oci_error_code(&body), "UNAVAILABLE");
    assert!(
        body.contains(&format!("127.0.0.1:{port}")),
        "the message names the upstream: {body}"
    );

    let harbor = start_harbor_with(
        &work.path().join("harbor"),
        regtee::local_registry::RegistryOptions {
            port: Some(port),
            ..Default::default()
        },
        None,
    )
    .await;
    let (status, _) = http_request(&url, "GET", None, &[]).await;
    assert_eq!(
        status, 401,
        "Harbor's own answer passes through once it is up"
    );
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[10_000], "amd64");
    layout.tag(&image, "x");
    push_layout_ok(&layout.dir, "x", &regtee.host(), "library/back:1", Tls::Off);
    drop(harbor);
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_is_a_504_after_the_response_timeout() {
    let work = tempfile::tempdir().unwrap();
    // Accepts connections and reads, but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut spec = ConfigSpec::at(&format!("http://{addr}"), &work.path().join("state"));
    spec.upstream_extra = "response_timeout = \"1s\"\n".into();
    let regtee = Regtee::start(&spec).await;
    let started = std::time::Instant::now();
    let (status, body) =
        http_request(&format!("http://{}/v2/", regtee.host()), "GET", None, &[]).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(oci_error_code(&body), "UNAVAILABLE");
    assert!(started.elapsed() >= Duration::from_secs(1));
    holder.abort();
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_an_upload_in_flight_finish_and_refuses_new_connections() {
    use futures_util::StreamExt;
    use http_body_util::StreamBody;
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let regtee = Regtee::start(&ConfigSpec::new(&harbor, &work.path().join("state"))).await;
    let host = regtee.host();
    let direct = harbor.client(DEV_USER, DEV_PASSWORD);
    let token = harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/drain:pull,push"],
        )
        .await;
    let client = harbor.raw_client();
    let start = http::Request::post(format!("http://{host}/v2/library/drain/blobs/uploads/"))
        .header("authorization", format!("Bearer {token}"))
        .body(regtee::body::empty())
        .unwrap();
    let resp = client.request(start).await.unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let resp_uuid = resp.headers()["docker-upload-uuid"]
        .to_str()
        .unwrap()
        .to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
                rx,
            )
        })
    });
    let chunk = layout::random_bytes(200_000);
    let digest = regtee::oci::digest::Digest::sha256_of(&chunk).to_string();
    let put = http::Request::put(with_digest(&location, &digest))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/octet-stream")
        .header("content-length", chunk.len())
        .body(regtee::body::boxed(StreamBody::new(stream.boxed())))
        .unwrap();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.request(put).await.map(|r| r.status().as_u16()) }
    });
    tx.send(bytes::Bytes::copy_from_slice(&chunk[..100_000]))
        .await
        .unwrap();
    // Wait until bytes have reached Harbor's storage: the request is mid-flight.
    let uuid = resp_uuid.clone();
    let partial = harbor
        .registry
        .data_dir()
        .join("docker/registry/v2/repositories/library/drain/_uploads")
        .join(&uuid)
        .join("data");
    wait_until(
        "the first bytes of the upload to reach Harbor",
        Duration::from_secs(10),
        || async {
            std::fs::metadata(&partial)
                .ok()
                .filter(|m| m.len() > 0)
                .map(|_| ())
        },
    )
    .await;
    // Shut down while the upload is half sent.
    let stopping = tokio::spawn(regtee.stop());
    wait_until("the listener to close", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(&host)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    tx.send(bytes::Bytes::copy_from_slice(&chunk[100_000..]))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        201,
        "the in-flight upload completed"
    );
    stopping.await.unwrap();
    assert_eq!(
        direct
            .blob_exists("library/drain", &digest.parse().unwrap())
            .await
            .unwrap(),
        Some(200_000)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_have_one_line_per_request_and_never_a_secret_and_sigterm_exits_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let port = regtee::local_registry::free_port().unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::cloud("tcr", &cloud));
    spec.listen = format!("127.0.0.1:{port}");
    spec.admin = None;
    let config = spec.write(&work.path().join("regtee.toml"));
    // An empty RUST_LOG falls back to [log] level (info) instead of silencing regtee.
    let process =
        RegteeProcess::spawn_with_log_filter(&config, &spec, &work.path().join("regtee.log"), None);
    let host = format!("127.0.0.1:{port}");
    wait_listening(host.parse().unwrap()).await;
    let plainly = format!("http={host} https=off admin=off");
    wait_until(
        "the start-up line, naming the listeners plainly",
        Duration::from_secs(10),
        || async { process.log_text().contains(&plainly).then_some(()) },
    )
    .await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[20_000, 30_000], "amd64");
    layout.tag(&image, "x");
    push_layout_ok(&layout.dir, "x", &host, "library/logged:1", Tls::Off);
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/logged",
        "1",
        &image.digest,
    )
    .await;
    process.sigterm();
    let mut process = process;
    let status = wait_until(
        "regtee to exit after SIGTERM",
        Duration::from_secs(30),
        || {
            let s = process.child.try_wait().unwrap();
            async move { s }
        },
    )
    .await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let log = process.log_text();
    for secret in [DEV_PASSWORD, ROBOT_PASSWORD, CLOUD_PASSWORD] {
        assert!(!log.contains(secret), "a password leaked into the log");
    }
    assert!(
        !log.contains("Bearer ey") && !log.contains("Basic "),
        "an Authorization value leaked"
    );
    let manifest_put = log
        .lines()
        .find(|l| l.contains("method=PUT") && l.contains("route=\"manifest\""))
        .expect("a request line for the manifest PUT");
    for field in [
        "repository=\"library/logged\"",
        "status=201",
        "bytes_in=",
        "bytes_out=",
        "duration_ms=",
    ] {
        assert!(
            manifest_put.contains(field),
            "missing {field} in: {manifest_put}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_listener_speaks_http2_via_alpn_and_rewrites_for_its_own_origin() {
    use rustls::pki_types::pem::PemObject;
    let work = tempfile::tempdir().unwrap();
    let files =
        regtee::certs::generate(&["localhost".into()], &work.path().join("certs"), 30).unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.tls = Some((
        "127.0.0.1:0".into(),
        files.server_cert.clone(),
        files.server_key.clone(),
    ));
    let regtee = Regtee::start(&spec).await;
    let port = regtee.https.unwrap().port();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&files.ca_cert).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("https://localhost:{port}/v2/"))
        .body(regtee::body::empty())
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 401);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(&format!("realm=\"https://localhost:{port}/service/token\"")),
        "Harbor's realm is rebased onto the origin the client used: {challenge}"
    );
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_clients_are_cut_by_the_header_and_body_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let files =
        regtee::certs::generate(&["localhost".into()], &work.path().join("certs"), 30).unwrap();
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.tls = Some((
        "127.0.0.1:0".into(),
        files.server_cert.clone(),
        files.server_key.clone(),
    ));
    spec.proxy_extra = "header_read_timeout = \"1s\"\nbody_idle_timeout = \"1s\"\n".into();
    let regtee = Regtee::start(&spec).await;

    // A client that connects and never sends a request head is disconnected.
    let mut idle = tokio::net::TcpStream::connect(regtee.http).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the connection is closed, not left open")
        .unwrap_or(0);
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"));

    // The same over TLS with HTTP/2 negotiated: no preface, no connection.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(<rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_file(&files.ca_cert).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(regtee.https.unwrap())
        .await
        .unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut all = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut all)).await;
    assert!(closed.is_ok(), "a silent HTTP/2 client is disconnected");

    // A client whose body stalls mid-upload gets an OCI error, and Harbor's session survives.
    let token = harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/stall:pull,push"],
        )
        .await;
    let start = http::Request::post(format!(
        "http://{}/v2/library/stall/blobs/uploads/",
        regtee.host()
    ))
    .header("authorization", format!("Bearer {token}"))
    .body(regtee::body::empty())
    .unwrap();
    let resp = harbor.raw_client().request(start).await.unwrap();
    assert_eq!(resp.status(), 202);
    let location: http::Uri = resp.headers()["location"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(regtee.http).await.unwrap();
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n0123456789",
        location.path_and_query().unwrap(),
        regtee.host()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&chunk[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}]}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "regtee answered a stalled body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("\"code\":\"UNAVAILABLE\"") && answer.contains("stalled"),
        "{answer}"
    );
    regtee.stop().await;
}
