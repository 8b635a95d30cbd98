//! The pull-through cache on Harbor as deployed (its nginx on HTTPS, its token service): one
//! read of Harbor per blob however many pull at once, reads authorized for each client and
//! repository as Harbor authorizes them, pulls that survive Harbor's registry going down, and a
//! cache that never holds wrong bytes, survives a full disk, keeps its cap and its content
//! across a restart. What reached Harbor is read from its nginx's access log.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::support::disk::SmallDisk;
use crate::support::docker::dockerd;
use crate::support::fault::{Fault, FaultFront};
use crate::support::issuer::User;
use crate::support::layout::{self, Layout, Written};
use crate::support::*;

/// `[cache]` lines with `max_size`.
fn cache_of(max_size: &str) -> Option<String> {
    Some(format!("max_size = \"{max_size}\"\n"))
}

/// `skopeo copy docker://HOST/REFERENCE oci:DEST:pulled` as `creds`; the output, to check.
fn pull(host: &str, reference: &str, dest: &Path, creds: (&str, &str)) -> Output {
    skopeo(&[
        "copy",
        "--retry-times=0",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("--src-creds={}:{}", creds.0, creds.1),
        &format!("docker://{host}/{reference}"),
        &format!("oci:{}:pulled", dest.display()),
    ])
}

/// A layout in `work` holding one image of random layers of `sizes` (as `image`), pushed as dev
/// to `host` as `repo_tag`.
fn pushed_image(work: &Path, sizes: &[usize], host: &str, repo_tag: &str) -> (Layout, Written) {
    let mut layout = Layout::new(&work.join("layout"));
    let image = layout.image(sizes, "amd64");
    layout.tag(&image, "image");
    push_layout_ok(&layout.dir, "image", host, repo_tag, Tls::Off);
    (layout, image)
}

/// [`pull`] as dev, which must succeed.
fn pull_ok(host: &str, reference: &str, dest: &Path) {
    let out = pull(host, reference, dest, (DEV_USER, DEV_PASSWORD));
    assert!(out.status.success(), "pull {reference}: {}", text(&out));
}

/// The pull into `dest` holds `image` byte for byte: its manifest and every blob.
fn assert_pulled(dest: &Path, layout: &Layout, image: &Written) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(image.digest.as_str()),
        "the manifest pulled into {} is the one pushed",
        dest.display()
    );
    let mut blobs = image.layers();
    blobs.push(image.config());
    for digest in blobs {
        let hex = digest.trim_start_matches("sha256:");
        let pulled = std::fs::read(dest.join("blobs/sha256").join(hex)).unwrap();
        let pushed = std::fs::read(layout.dir.join("blobs/sha256").join(hex)).unwrap();
        assert!(pulled == pushed, "{digest} pulled into {}", dest.display());
    }
}

/// Successful `GET`s of `repo`'s blob `digest` that reached Harbor, by its nginx's log.
fn blob_reads(harbor: &AuthRegistry, repo: &str, digest: &str) -> usize {
    let request = format!("\"GET /v2/{repo}/blobs/{digest} HTTP/");
    harbor
        .front
        .as_ref()
        .expect("Harbor's nginx")
        .access_log()
        .lines()
        .filter(|l| l.contains(&request) && l.contains("\" 200 "))
        .count()
}

/// Every blob of `image` (config and layers).
fn blobs_of(image: &Written) -> Vec<String> {
    let mut blobs = image.layers();
    blobs.push(image.config());
    blobs
}

/// A metric's value from regtee's `/metrics`, summed over the series whose labels contain
/// `labels` (0 when none does).
async fn metric(regtee: &Regtee, name: &str, labels: &str) -> f64 {
    let (_, text) = http_request(&regtee.admin_url("/metrics"), "GET", None, &[]).await;
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The cache's part of `/api/v1/status`.
async fn cache_status(regtee: &Regtee) -> serde_json::Value {
    admin_get(regtee, "/api/v1/status").await["cache"].clone()
}

/// Files in the cache's folder `kind` (`blobs` or `manifests`) and `tmp`, as names.
fn cache_files(cache_dir: &Path, folder: &str) -> Vec<String> {
    let dir = match folder {
        "tmp" => cache_dir.join("tmp"),
        kind => cache_dir.join(kind).join("sha256"),
    };
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| !name.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_pulls_read_each_blob_from_harbor_once_and_a_second_pull_none() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.cache = cache_of("1GiB");
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let layers = [layout.tar_layer(64 << 20), layout.tar_layer(200_000)];
    let image = layout.docker_image(&layers);
    layout.tag(&image, "big");
    push_layout_ok(
        &layout.dir,
        "big",
        &harbor.host(),
        "library/big:1",
        Tls::Off,
    );

    // The Docker engine logged in to regtee, pulling with seven skopeo clients at once.
    let daemon = dockerd();
    let docker_config = work.path().join("docker-config");
    let host = regtee.host();
    let login = tokio::task::block_in_place(|| {
        daemon.command_with_stdin(
            &docker_config,
            &["login", "-u", DEV_USER, "--password-stdin", &host],
            Some(DEV_PASSWORD),
        )
    });
    assert!(login.status.success(), "docker login: {}", text(&login));
    let reference = format!("{host}/library/big:1");
    let pull_round = |round: &str, skopeos: usize| {
        let mut pulls = Vec::new();
        for i in 0..skopeos {
            let (host, dest) = (host.clone(), work.path().join(format!("{round}-{i}")));
            pulls.push(tokio::task::spawn_blocking(move || {
                let out = pull(&host, "library/big:1", &dest, (DEV_USER, DEV_PASSWORD));
                (format!("skopeo {}", dest.display()), out, Some(dest))
            }));
        }
        let (config, reference) = (docker_config.clone(), reference.clone());
        pulls.push(tokio::task::spawn_blocking(move || {
            let out = daemon.command(&config, &["pull", &reference]);
            ("docker pull".to_string(), out, None)
        }));
        futures_util::future::join_all(pulls)
    };
    for pulled in pull_round("first", 7).await {
        let (who, out, dest) = pulled.unwrap();
        assert!(out.status.success(), "{who}: {}", text(&out));
        if let Some(dest) = dest {
            assert_pulled(&dest, &layout, &image);
        }
    }
    let image_id = |daemon: &crate::support::docker::Dockerd| {
        let out = daemon.command(
            &docker_config,
            &["image", "inspect", "--format", "{{.Id}}", &reference],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        tokio::task::block_in_place(|| image_id(daemon)),
        image.config(),
        "the Docker engine holds the image pushed"
    );
    for digest in blobs_of(&image) {
        wait_until(
            &format!("Harbor's log of {digest}"),
            Duration::from_secs(10),
            || async { (blob_reads(&harbor, "library/big", &digest) > 0).then_some(()) },
        )
        .await;
        assert_eq!(
            blob_reads(&harbor, "library/big", &digest),
            1,
            "eight pulls at once read {digest} from Harbor once"
        );
    }

    // A second round, the engine's copy removed first: no blob from Harbor.
    let rmi = tokio::task::block_in_place(|| {
        daemon.command(&docker_config, &["rmi", "-f", &image.config()])
    });
    assert!(rmi.status.success(), "{}", text(&rmi));
    for pulled in pull_round("second", 2).await {
        let (who, out, dest) = pulled.unwrap();
        assert!(out.status.success(), "{who}: {}", text(&out));
        if let Some(dest) = dest {
            assert_pulled(&dest, &layout, &image);
        }
    }
    for digest in blobs_of(&image) {
        assert_eq!(
            blob_reads(&harbor, "library/big", &digest),
            1,
            "a second pull reads {digest} from regtee's cache"
        );
    }
    let status = cache_status(&regtee).await;
    assert_eq!(status["entries"], 4, "three blobs and a manifest: {status}");
    assert!(status["hit_ratio"].as_f64().unwrap() > 0.5, "{status}");
    assert!(metric(&regtee, "regtee_cache_reads_total", "result=\"coalesced\"").await > 0.0);
    let _ = tokio::task::block_in_place(|| {
        daemon.command(&docker_config, &["rmi", "-f", &image.config()])
    });
    regtee.stop().await;
}

/// A raw read with an optional bearer token: status, `errors[0].code` and body.
async fn read_as(url: &str, ca: Option<&Path>, token: Option<&str>) -> (u16, String, Vec<u8>) {
    use http_body_util::BodyExt;
    let client = raw_http_client(ca, false);
    let mut request = http::Request::get(url).header(
        "accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
    );
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = client
        .request(request.body(regtee::body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, code, body.to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_read_is_served_only_to_whom_harbor_serves_it_in_that_repository() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    for (name, grants) in [("stranger", vec![]), ("teamer", vec!["team"])] {
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
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.cache = cache_of("1GiB");
    let regtee = Regtee::start(&spec).await;
    let (layout, image) = pushed_image(work.path(), &[300_000], &harbor.host(), "library/app:1");
    push_layout_ok(&layout.dir, "image", &harbor.host(), "team/app:1", Tls::Off);
    // dev's pull fills the cache through library/app.
    let dest = work.path().join("pulled");
    pull_ok(&regtee.host(), "library/app:1", &dest);
    let layer = image.layers()[0].clone();
    let layer_bytes = std::fs::read(
        layout
            .dir
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:")),
    )
    .unwrap();
    let reads_before = blob_reads(&harbor, "library/app", &layer);

    let ca = harbor.ca_file();
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("anonymous", None, "library/app"),
        (
            "a user without rights",
            Some(
                harbor
                    .token(
                        "stranger",
                        "stranger-password",
                        &["repository:library/app:pull"],
                    )
                    .await,
            ),
            "library/app",
        ),
        (
            "a user with rights on team/ only, asking library/",
            Some(
                harbor
                    .token(
                        "teamer",
                        "teamer-password",
                        &["repository:library/app:pull"],
                    )
                    .await,
            ),
            "library/app",
        ),
        (
            "a user with rights on team/ only, asking team/other for what library/app holds",
            Some(
                harbor
                    .token("teamer", "teamer-password", &["repository:team/other:pull"])
                    .await,
            ),
            "team/other",
        ),
    ];
    for (who, token, repo) in &cases {
        for (what, path) in [
            ("the layer", format!("blobs/{layer}")),
            ("the manifest", format!("manifests/{}", image.digest)),
        ] {
            let direct = read_as(
                &format!("{}/v2/{repo}/{path}", harbor.url()),
                ca,
                token.as_deref(),
            )
            .await;
            let through = read_as(
                &format!("http://{}/v2/{repo}/{path}", regtee.host()),
                None,
                token.as_deref(),
            )
            .await;
            assert!(
                matches!(direct.0, 401 | 403 | 404),
                "{who}, {what}: Harbor refuses ({})",
                direct.0
            );
            assert_eq!(
                (through.0, &through.1),
                (direct.0, &direct.1),
                "{who}, {what}: regtee answers as Harbor does"
            );
            let content = if what == "the layer" {
                &layer_bytes[..]
            } else {
                &image.bytes[..]
            };
            assert!(
                !through
                    .2
                    .windows(content.len().min(64))
                    .any(|w| w == &content[..w.len()]),
                "{who}, {what}: no byte of content in the refusal"
            );
        }
    }

    // Rights on team/app read team/app's blob: Harbor says yes, the bytes come from the cache.
    let token = harbor
        .token("teamer", "teamer-password", &["repository:team/app:pull"])
        .await;
    let (status, _, body) = read_as(
        &format!("http://{}/v2/team/app/blobs/{layer}", regtee.host()),
        None,
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body == layer_bytes, "the layer's bytes");
    assert_eq!(
        blob_reads(&harbor, "team/app", &layer),
        0,
        "team/app's read was authorized by Harbor and served from the cache"
    );
    assert_eq!(blob_reads(&harbor, "library/app", &layer), reads_before);
    regtee.stop().await;
}

/// Harbor and its cloud target, two regtees in front, both caching: one checking tokens with
/// Harbor's certificate, one not.
struct Outage {
    work: tempfile::TempDir,
    harbor: AuthRegistry,
    cloud: AuthRegistry,
    checking: Regtee,
    trusting_harbor_only: Regtee,
}

async fn outage() -> Outage {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    harbor.issuer.add_user(
        "teamer",
        User {
            password: "teamer-password".into(),
            admin: false,
            grants: [("team".to_string(), vec!["pull".to_string()])].into(),
        },
    );
    let regtee_with = |name: &str, token_certificate: bool| {
        let mut spec = ConfigSpec::new(&harbor, &work.path().join(name))
            .target(TargetSpec::cloud("tcr", &cloud));
        spec.cache = Some("max_size = \"1GiB\"\nfallback_targets = [\"tcr\"]\n".into());
        if token_certificate {
            spec.upstream_extra.push_str(&format!(
                "token_certificate = \"{}\"\ntoken_issuer = \"{}\"\ntoken_service = \"{}\"\n",
                harbor.issuer.root_bundle.display(),
                harbor.issuer.issuer_name(),
                harbor.issuer.service(),
            ));
        }
        spec
    };
    let checking = Regtee::start(&regtee_with("checking", true)).await;
    let trusting_harbor_only = Regtee::start(&regtee_with("harbor-only", false)).await;
    Outage {
        work,
        harbor,
        cloud,
        checking,
        trusting_harbor_only,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_harbor_down_for_tokens_that_grant_them_from_the_cache_and_the_target() {
    let mut o = outage().await;
    let mut layout = Layout::new(&o.work.path().join("layout"));
    let pulled = layout.image(&[500_000, 20_000], "amd64");
    let never_pulled = layout.image(&[400_000], "arm64");
    layout.tag(&pulled, "pulled");
    layout.tag(&never_pulled, "never");
    let cloud = o.cloud.client(CLOUD_USER, CLOUD_PASSWORD);
    for (name, repo) in [("pulled", "library/pulled"), ("never", "library/never")] {
        push_layout_ok(
            &layout.dir,
            name,
            &o.checking.host(),
            &format!("{repo}:1"),
            Tls::Off,
        );
    }
    wait_for_manifest(&cloud, "library/pulled", "1", &pulled.digest).await;
    wait_for_manifest(&cloud, "library/never", "1", &never_pulled.digest).await;
    let dev = (DEV_USER, DEV_PASSWORD);
    for regtee in [&o.checking, &o.trusting_harbor_only] {
        let dest = o.work.path().join(format!("before-{}", regtee.host()));
        pull_ok(&regtee.host(), "library/pulled:1", &dest);
    }

    // Harbor's registry stops; its nginx answers 502, its token service still answers.
    o.harbor.registry.stop();
    let direct = o.work.path().join("direct");
    let out = pull(&o.harbor.host(), "library/pulled:1", &direct, dev);
    assert!(!out.status.success(), "Harbor itself cannot serve a pull");

    let by_digest = format!("library/pulled@{}", pulled.digest);
    for (what, reference, image) in [
        (
            "by tag, from the cache",
            "library/pulled:1".to_string(),
            &pulled,
        ),
        ("by digest, from the cache", by_digest.clone(), &pulled),
        (
            "by digest, never pulled: from the target",
            format!("library/never@{}", never_pulled.digest),
            &never_pulled,
        ),
    ] {
        let dest = o.work.path().join(format!("outage-{}", what.len()));
        let out = pull(&o.checking.host(), &reference, &dest, dev);
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert_pulled(&dest, &layout, image);

        let dest = o.work.path().join(format!("harbor-only-{}", what.len()));
        let out = pull(&o.trusting_harbor_only.host(), &reference, &dest, dev);
        assert!(
            !out.status.success(),
            "{what}: without token_certificate, nothing Harbor does not authorize"
        );
    }

    // A token without pull on library/pulled: refused, cached or not.
    let dest = o.work.path().join("teamer");
    let out = pull(
        &o.checking.host(),
        &by_digest,
        &dest,
        ("teamer", "teamer-password"),
    );
    assert!(!out.status.success(), "a token without pull is refused");
    let token = o
        .harbor
        .token(
            "teamer",
            "teamer-password",
            &["repository:library/pulled:pull"],
        )
        .await;
    let (status, _, body) = read_as(
        &format!(
            "http://{}/v2/library/pulled/blobs/{}",
            o.checking.host(),
            pulled.layers()[0]
        ),
        None,
        Some(&token),
    )
    .await;
    assert!(status >= 400 && body.len() < 1000, "refused: {status}");

    // A tag read while Harbor is away says it is stale.
    let token = o
        .harbor
        .token(DEV_USER, DEV_PASSWORD, &["repository:library/pulled:pull"])
        .await;
    let client = raw_http_client(None, false);
    let answer = client
        .request(
            http::Request::get(format!(
                "http://{}/v2/library/pulled/manifests/1",
                o.checking.host()
            ))
            .header("authorization", format!("Bearer {token}"))
            .header("accept", layout::OCI_MANIFEST)
            .body(regtee::body::empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let warning = answer.headers().get("warning").unwrap().to_str().unwrap();
    assert!(warning.starts_with("110 "), "{warning}");
    assert!(
        metric(
            &o.checking,
            "regtee_cache_fallback_reads_total",
            "source=\"tcr\""
        )
        .await
            > 0.0
    );
    assert!(
        metric(
            &o.checking,
            "regtee_cache_fallback_reads_total",
            "source=\"cache\""
        )
        .await
            > 0.0
    );
    o.checking.stop().await;
    o.trusting_harbor_only.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_from_harbor_are_never_cached_and_fail_the_pull() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let front = FaultFront::start(&harbor.url()).await;
    let mut spec = ConfigSpec::at(&front.url(), &work.path().join("state"));
    spec.cache = cache_of("1GiB");
    let regtee = Regtee::start(&spec).await;
    let (layout, image) = pushed_image(work.path(), &[2_000_000], &harbor.host(), "library/app:1");

    front.set(Fault::CorruptBlobs);
    let out = pull(
        &regtee.host(),
        "library/app:1",
        &work.path().join("bad"),
        (DEV_USER, DEV_PASSWORD),
    );
    assert!(!out.status.success(), "a pull of damaged bytes fails");
    let cache_dir = work.path().join("state/cache");
    wait_until("the fills to end", Duration::from_secs(10), || async {
        cache_files(&cache_dir, "tmp").is_empty().then_some(())
    })
    .await;
    assert_eq!(
        cache_files(&cache_dir, "blobs"),
        Vec::<String>::new(),
        "no blob entered the cache"
    );
    assert!(metric(&regtee, "regtee_cache_verification_failures_total", "").await >= 1.0);

    front.set(Fault::None);
    let dest = work.path().join("good");
    pull_ok(&regtee.host(), "library/app:1", &dest);
    assert_pulled(&dest, &layout, &image);
    let mut cached = cache_files(&cache_dir, "blobs");
    cached.sort();
    let mut expected: Vec<String> = blobs_of(&image)
        .iter()
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect();
    expected.sort();
    assert_eq!(cached, expected, "the right bytes, once sent, are cached");
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_during_a_fill_costs_the_cache_not_the_pull() {
    let work = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&work.path().join("cache"), "4m");
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.cache = Some(format!(
        "max_size = \"1GiB\"\ndir = \"{}\"\n",
        disk.0.display()
    ));
    let regtee = Regtee::start(&spec).await;
    let (mut layout, image) =
        pushed_image(work.path(), &[12 << 20], &harbor.host(), "library/big:1");

    let dest = work.path().join("pulled");
    pull_ok(&regtee.host(), "library/big:1", &dest);
    assert_pulled(&dest, &layout, &image);
    let layer = image.layers()[0].trim_start_matches("sha256:").to_string();
    wait_until("the fill to give up", Duration::from_secs(10), || async {
        cache_files(&disk.0, "tmp").is_empty().then_some(())
    })
    .await;
    assert!(
        !cache_files(&disk.0, "blobs").contains(&layer),
        "nothing partial is cached"
    );

    // The failed fill gave its space back: what fits is cached again.
    let small = layout.image(&[300_000], "arm64");
    layout.tag(&small, "small");
    push_layout_ok(
        &layout.dir,
        "small",
        &harbor.host(),
        "library/small:1",
        Tls::Off,
    );
    let dest = work.path().join("small");
    pull_ok(&regtee.host(), "library/small:1", &dest);
    let small_layer = small.layers()[0].trim_start_matches("sha256:").to_string();
    wait_until(
        "the small layer cached",
        Duration::from_secs(10),
        || async {
            cache_files(&disk.0, "blobs")
                .contains(&small_layer)
                .then_some(())
        },
    )
    .await;
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cap_holds_while_pulls_run_and_a_restart_keeps_what_was_cached() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"));
    spec.cache = cache_of("4MiB");
    let regtee = Regtee::start(&spec).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let images: Vec<Written> = (0..6)
        .map(|i| {
            let image = layout.image(&[1 << 20], "amd64");
            layout.tag(&image, &format!("i{i}"));
            image
        })
        .collect();
    for i in 0..images.len() {
        push_layout_ok(
            &layout.dir,
            &format!("i{i}"),
            &harbor.host(),
            &format!("library/i{i}:1"),
            Tls::Off,
        );
    }

    // Six pulls at once of 6 MiB in all, through a 4 MiB cache.
    let pulls: Vec<_> = (0..images.len())
        .map(|i| {
            let (host, dest) = (regtee.host(), work.path().join(format!("p{i}")));
            tokio::task::spawn_blocking(move || {
                let out = pull(
                    &host,
                    &format!("library/i{i}:1"),
                    &dest,
                    (DEV_USER, DEV_PASSWORD),
                );
                (out, dest)
            })
        })
        .collect();
    for (i, done) in futures_util::future::join_all(pulls)
        .await
        .into_iter()
        .enumerate()
    {
        let (out, dest) = done.unwrap();
        assert!(out.status.success(), "i{i}: {}", text(&out));
        assert_pulled(&dest, &layout, &images[i]);
    }
    let status = cache_status(&regtee).await;
    assert!(
        status["size_bytes"].as_u64().unwrap() <= 4 << 20,
        "under the cap: {status}"
    );
    assert!(metric(&regtee, "regtee_cache_evictions_total", "").await > 0.0);

    // The last image pulled is the most recently used: it stays, and outlives a restart.
    let last = &images[5];
    pull_ok(&regtee.host(), "library/i5:1", &work.path().join("again"));
    let reads: Vec<usize> = blobs_of(last)
        .iter()
        .map(|d| blob_reads(&harbor, "library/i5", d))
        .collect();
    let entries = cache_status(&regtee).await["entries"].clone();
    regtee.stop().await;
    let regtee = Regtee::start(&spec).await;
    assert_eq!(cache_status(&regtee).await["entries"], entries);
    let dest = work.path().join("after-restart");
    pull_ok(&regtee.host(), "library/i5:1", &dest);
    assert_pulled(&dest, &layout, last);
    let after: Vec<usize> = blobs_of(last)
        .iter()
        .map(|d| blob_reads(&harbor, "library/i5", d))
        .collect();
    assert_eq!(
        after, reads,
        "served from what the cache kept across the restart"
    );
    regtee.stop().await;
}
