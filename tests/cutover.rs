//! Cutover and rollback behind one hostname, on Harbor as deployed (its nginx over HTTPS, its
//! token service) and a cloud-like target that maps `library` to `mirror-lib`: the gate, an
//! upload in flight across the switch, pushes and pulls with Harbor's logins served by the
//! target, Harbor's refusals, a replica following the switch, and the way back.

use std::path::PathBuf;
use std::time::Duration;

use crate::support::docker::{dockerd, pushed_digest};
use crate::support::issuer::User;
use crate::support::layout::{Layout, OCI_MANIFEST};
use crate::support::*;

/// Harbor, its target, and regtee in front with Harbor's token certificate.
struct Cut {
    work: tempfile::TempDir,
    harbor: AuthRegistry,
    cloud: AuthRegistry,
    spec: ConfigSpec,
    config: PathBuf,
}

async fn cut(database: Option<&str>) -> Cut {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    for (name, grants) in [("puller", vec!["library"]), ("stranger", vec![])] {
        harbor.issuer.add_user(
            name,
            User {
                password: format!("{name}-password"),
                admin: false,
                grants: grants
                    .into_iter()
                    .map(|p| (p.to_string(), vec!["pull".to_string()]))
                    .collect(),
            },
        );
    }
    let cloud = start_cloud(&work.path().join("cloud"), &["mirror-lib", "team"]).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::cloud("tcr", &cloud).with("namespaces = { library = \"mirror-lib\" }"));
    spec.upstream_extra.push_str(&format!(
        "token_certificate = \"{}\"\ntoken_issuer = \"{}\"\ntoken_service = \"{}\"\n",
        harbor.issuer.root_bundle.display(),
        harbor.issuer.issuer_name(),
        harbor.issuer.service(),
    ));
    if let Some(name) = database {
        spec = spec.on_postgres(postgres(), name);
    }
    let config = spec.write(&work.path().join("regtee.toml"));
    Cut {
        work,
        harbor,
        cloud,
        spec,
        config,
    }
}

impl Cut {
    fn cutover(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["cutover"];
        all.extend_from_slice(args);
        tokio::task::block_in_place(|| regtee_cli(&self.config, &self.spec, &all))
    }

    /// Switches to `to` once the gate lets it (jobs still running a moment).
    async fn switch_to(&self, to: &str) {
        wait_until(
            &format!("the gate to let the switch to {to} through"),
            Duration::from_secs(60),
            || async {
                let out = self.cutover(&["--to", to]);
                out.status.success().then_some(())
            },
        )
        .await;
    }

    fn target(&self) -> regtee::registry::RegistryClient {
        self.cloud.client(CLOUD_USER, CLOUD_PASSWORD)
    }

    fn harbor(&self) -> regtee::registry::RegistryClient {
        self.harbor.client(ADMIN_USER, ADMIN_PASSWORD)
    }

    /// Successful blob reads of `repo` that reached Harbor.
    fn harbor_blob_reads(&self, repo: &str) -> usize {
        let request = format!("\"GET /v2/{repo}/blobs/sha256:");
        self.harbor
            .front
            .as_ref()
            .unwrap()
            .access_log()
            .lines()
            .filter(|l| l.contains(&request) && l.contains("\" 200 "))
            .count()
    }
}

/// Waits until `regtee` serves from `primary` (`upstream` or a target's name).
async fn serving(regtee: &Regtee, primary: &str) {
    wait_until(
        &format!("regtee serving from {primary}"),
        Duration::from_secs(5),
        || async {
            let status = admin_get(regtee, "/api/v1/status").await;
            let serving = &status["serving"]["primary"];
            let name = serving["name"]
                .as_str()
                .unwrap_or(serving["kind"].as_str()?);
            (name == primary).then_some(())
        },
    )
    .await;
}

/// A raw request with a bearer token: status, `errors[0].code`, `Location`.
async fn raw(
    method: &str,
    url: &str,
    token: &str,
    body: Option<(Vec<u8>, &str)>,
    ca: Option<&std::path::Path>,
) -> (u16, String, Option<String>) {
    use http_body_util::BodyExt;
    let client = raw_http_client(ca, false);
    let mut request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("accept", OCI_MANIFEST);
    let body = match body {
        Some((bytes, content_type)) => {
            request = request
                .header("content-type", content_type)
                .header("content-length", bytes.len());
            regtee::body::full(bytes)
        }
        None => regtee::body::empty(),
    };
    let response = client.request(request.body(body).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, code, location)
}

fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_switch_serves_clients_from_the_target_with_harbors_logins_and_a_rollback_brings_it_all_back()
 {
    let c = cut(None).await;
    let regtee = Regtee::start(&c.spec).await;
    let host = regtee.host();
    let origin = format!("http://{host}");
    let mut layout = Layout::new(&c.work.path().join("layout"));
    let a = layout.image(&[300_000, 20_000], "amd64");
    let b = layout.image(&[200_000], "arm64");
    let p = layout.image(&[150_000], "amd64");
    layout.tag(&a, "a");
    layout.tag(&b, "b");
    layout.tag(&p, "p");

    // `regtee check` says whether regtee's Harbor login can take what is mirrored back.
    let check = tokio::task::block_in_place(|| regtee_cli(&c.config, &c.spec, &["check"]));
    assert_says(
        &check,
        "upstream push rights (mirroring back from a primary target): regtee's login may push to all",
    );
    let pull_only = c.work.path().join("pull-only.toml");
    std::fs::write(&pull_only, c.spec.toml().replace(ROBOT_USER, "puller")).unwrap();
    let check = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_regtee"))
            .args(["check", "--config"])
            .arg(&pull_only)
            .envs(c.spec.env())
            .env("REGTEE_UPSTREAM_PASSWORD", "puller-password")
            .output()
            .unwrap()
    });
    assert_says(&check, "regtee's login may not push to library");

    // Before: a push through regtee reaches Harbor and the target.
    push_layout_ok(&layout.dir, "a", &host, "library/a:1", Tls::Off);
    wait_for_manifest(&c.target(), "mirror-lib/a", "1", &a.digest).await;

    // The gate: a tag pushed around regtee is missing on the target, and is named.
    push_layout_ok(&layout.dir, "b", &c.harbor.host(), "library/b:1", Tls::Off);
    let refused = c.cutover(&["--to", "tcr"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert_says(&refused, "library/b:1 on tcr: missing");
    let sync = tokio::task::block_in_place(|| regtee_cli(&c.config, &c.spec, &["sync", "library"]));
    assert!(sync.status.success(), "{}", text(&sync));
    wait_for_manifest(&c.target(), "mirror-lib/b", "1", &b.digest).await;

    // An upload in flight across the switch: opened on Harbor, finished after it.
    let inflight = regtee::local_registry::sample_image(&[400_000]);
    let token = c
        .harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/inflight:pull,push"],
        )
        .await;
    let uploads = format!("{origin}/v2/library/inflight/blobs/uploads/");
    let config_digest = regtee::oci::digest::Digest::sha256_of(&inflight.config).to_string();
    let (status, _, location) = raw("POST", &uploads, &token, None, None).await;
    assert_eq!(status, 202);
    let (status, _, _) = raw(
        "PUT",
        &with_digest(&location.unwrap(), &config_digest),
        &token,
        Some((inflight.config.to_vec(), "application/octet-stream")),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let layer = &inflight.layers[0];
    let layer_digest = regtee::oci::digest::Digest::sha256_of(layer).to_string();
    let (status, _, location) = raw("POST", &uploads, &token, None, None).await;
    assert_eq!(status, 202);
    let half = layer.len() / 2;
    let (status, _, location) = raw(
        "PATCH",
        &location.unwrap(),
        &token,
        Some((layer[..half].to_vec(), "application/octet-stream")),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let in_flight = location.unwrap();

    c.switch_to("tcr").await;
    serving(&regtee, "tcr").await;
    let (status, _, location) = raw(
        "PATCH",
        &in_flight,
        &token,
        Some((layer[half..].to_vec(), "application/octet-stream")),
        None,
    )
    .await;
    assert_eq!(status, 202, "the session Harbor opened goes on at Harbor");
    let (status, _, _) = raw(
        "PUT",
        &with_digest(&location.unwrap(), &layer_digest),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, 201);
    let (status, code, _) = raw(
        "PUT",
        &format!("{origin}/v2/library/inflight/manifests/1"),
        &token,
        Some((inflight.manifest.to_vec(), OCI_MANIFEST)),
        None,
    )
    .await;
    assert_eq!(status, 201, "the manifest, pushed to the target: {code}");
    let on_target = c
        .target()
        .manifest_head("mirror-lib/inflight", "1")
        .await
        .unwrap();
    assert_eq!(on_target.map(|h| h.digest), Some(inflight.digest.clone()));

    // After: a push lands on the target first, then on Harbor by digest.
    push_layout_ok(&layout.dir, "p", &host, "library/p:1", Tls::Off);
    let on_target = c.target().manifest_head("mirror-lib/p", "1").await.unwrap();
    assert_eq!(
        on_target.map(|h| h.digest.to_string()),
        Some(p.digest.clone()),
        "on the target as soon as the push returns"
    );
    wait_for_manifest(&c.harbor(), "library/p", "1", &p.digest).await;
    wait_for_manifest(
        &c.harbor(),
        "library/inflight",
        "1",
        inflight.digest.as_str(),
    )
    .await;

    // Pulls read no blob from Harbor.
    let reads = c.harbor_blob_reads("library/a");
    let dest = c.work.path().join("pulled-a");
    pull_to_layout(
        &host,
        "library/a:1",
        &dest,
        (DEV_USER, DEV_PASSWORD),
        Tls::Off,
    );
    let pulled: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
    assert_eq!(pulled["manifests"][0]["digest"], a.digest.as_str());
    assert_eq!(
        c.harbor_blob_reads("library/a"),
        reads,
        "served by the target"
    );

    // The Docker engine, with a Harbor login, pushes and pulls through the same hostname.
    let daemon = dockerd();
    let docker_config = c.work.path().join("docker-config");
    let docker =
        |args: &[&str]| tokio::task::block_in_place(|| daemon.command(&docker_config, args));
    let login = tokio::task::block_in_place(|| {
        daemon.command_with_stdin(
            &docker_config,
            &["login", "-u", DEV_USER, "--password-stdin", &host],
            Some(DEV_PASSWORD),
        )
    });
    assert!(login.status.success(), "{}", text(&login));
    let mut docker_layout = Layout::new(&c.work.path().join("docker-layout"));
    let image = docker_layout.docker_image(&[docker_layout.tar_layer(500_000)]);
    docker_layout.tag(&image, "d");
    let name = format!("cutover-d-{}", std::process::id());
    tokio::task::block_in_place(|| {
        daemon.load(&docker_config, &docker_layout, "d", &name, c.work.path())
    });
    let reference = format!("{host}/library/d:1");
    let out = docker(&["tag", &format!("{name}:latest"), &reference]);
    assert!(out.status.success(), "{}", text(&out));
    let out = docker(&["push", &reference]);
    assert!(out.status.success(), "docker push: {}", text(&out));
    let digest = pushed_digest(&out);
    let on_target = c.target().manifest_head("mirror-lib/d", "1").await.unwrap();
    assert_eq!(
        on_target.map(|h| h.digest.to_string()),
        Some(digest.clone())
    );
    let _ = docker(&["rmi", "-f", &image.config()]);
    let out = docker(&["pull", &reference]);
    assert!(out.status.success(), "docker pull: {}", text(&out));
    assert_eq!(
        c.harbor_blob_reads("library/d"),
        0,
        "pulled from the target"
    );
    let _ = docker(&["rmi", "-f", &image.config()]);

    // Lists name Harbor's repositories, not the target's.
    let token = c
        .harbor
        .token(DEV_USER, DEV_PASSWORD, &["repository:library/a:pull"])
        .await;
    let (status, body) = http_request(
        &format!("{origin}/v2/library/a/tags/list"),
        "GET",
        None,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["name"], "library/a", "{body}");
    let token = c
        .harbor
        .token(ADMIN_USER, ADMIN_PASSWORD, &["registry:catalog:*"])
        .await;
    let (status, body) = http_request(
        &format!("{origin}/v2/_catalog"),
        "GET",
        None,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let catalog: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = catalog["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        names.contains(&"library/a") && !names.iter().any(|n| n.starts_with("mirror-lib/")),
        "{names:?}"
    );

    // Harbor's rights stay: pull-only cannot push, no rights cannot pull; answers as Harbor's.
    let ca = c.harbor.ca_file();
    let puller = c
        .harbor
        .token(
            "puller",
            "puller-password",
            &["repository:library/a:pull,push"],
        )
        .await;
    let stranger = c
        .harbor
        .token(
            "stranger",
            "stranger-password",
            &["repository:library/a:pull"],
        )
        .await;
    for (who, method, path, token) in [
        (
            "pull-only, pushing",
            "POST",
            "/v2/library/a/blobs/uploads/",
            &puller,
        ),
        (
            "no rights, pulling",
            "GET",
            "/v2/library/a/manifests/1",
            &stranger,
        ),
    ] {
        let through = raw(method, &format!("{origin}{path}"), token, None, None).await;
        let direct = raw(
            method,
            &format!("{}{path}", c.harbor.url()),
            token,
            None,
            ca,
        )
        .await;
        assert_eq!(
            (through.0, &through.1),
            (direct.0, &direct.1),
            "{who}: as Harbor answers"
        );
        assert_eq!(through.0, 401, "{who}");
    }
    let (status, _, _) = raw(
        "GET",
        &format!("{origin}/v2/library/a/manifests/1"),
        &puller,
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "pull-only pulls");

    // The way back: once what the target took is mirrored back, Harbor serves it.
    c.switch_to("upstream").await;
    serving(&regtee, "upstream").await;
    for (repo, digest) in [
        ("library/p", p.digest.as_str()),
        ("library/d", digest.as_str()),
        ("library/inflight", inflight.digest.as_str()),
    ] {
        let head = c.harbor().manifest_head(repo, "1").await.unwrap();
        assert_eq!(head.map(|h| h.digest.to_string()).as_deref(), Some(digest));
    }
    let status = c.cutover(&["--status"]);
    assert_says(&status, "primary: upstream since");
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_replica_follows_the_switch_without_a_restart() {
    let c = cut(Some("cutover_replicas")).await;
    let first = Regtee::start(&c.spec).await;
    let mut second_spec = ConfigSpec::new(&c.harbor, &c.work.path().join("state-2"))
        .with_database(&c.spec)
        .target(
            TargetSpec::cloud("tcr", &c.cloud).with("namespaces = { library = \"mirror-lib\" }"),
        );
    second_spec.upstream_extra = c.spec.upstream_extra.clone();
    let second = Regtee::start(&second_spec).await;
    c.switch_to("tcr").await;
    serving(&first, "tcr").await;
    serving(&second, "tcr").await;

    let mut layout = Layout::new(&c.work.path().join("layout"));
    let image = layout.image(&[100_000], "amd64");
    layout.tag(&image, "r");
    push_layout_ok(&layout.dir, "r", &second.host(), "library/r:1", Tls::Off);
    let on_target = c.target().manifest_head("mirror-lib/r", "1").await.unwrap();
    assert_eq!(
        on_target.map(|h| h.digest.to_string()),
        Some(image.digest.clone()),
        "the second replica pushed to the target"
    );
    wait_for_manifest(&c.harbor(), "library/r", "1", &image.digest).await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_echoes_regtees_credentials_in_an_error_shows_the_client_none() {
    use crate::support::fault::{Fault, FaultFront};
    let c = cut(None).await;
    let front = FaultFront::start(&c.cloud.url()).await;
    let mut spec = ConfigSpec::new(&c.harbor, &c.work.path().join("state-echo"))
        .target(TargetSpec::at("tcr", &front.url()));
    spec.upstream_extra = c.spec.upstream_extra.clone();
    let regtee = Regtee::start(&spec).await;
    let (status, body) = http_request(
        &regtee.admin_url("/api/v1/primary"),
        "PUT",
        Some(br#"{"primary":"tcr","force":true}"#.to_vec()),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serving(&regtee, "tcr").await;

    // The target answers writes with a 500 that quotes the Authorization it got: regtee's.
    front.set(Fault::EchoAuthorization);
    let token = c
        .harbor
        .token(
            DEV_USER,
            DEV_PASSWORD,
            &["repository:library/echo:pull,push"],
        )
        .await;
    let (status, body) = http_request(
        &format!("http://{}/v2/library/echo/blobs/uploads/", regtee.host()),
        "POST",
        None,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("internal error"),
        "the target's error, passed on: {body}"
    );
    assert!(
        !body.contains("eyJ") && !body.contains(CLOUD_PASSWORD),
        "regtee's credential for the target stays with regtee: {body}"
    );
    regtee.stop().await;
}
