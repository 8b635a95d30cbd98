//! `create_missing`: a target that lacks a namespace (TCR, SWR) or a repository (ECR) gets it
//! through its cloud's management API (tests/support/cloud_api.rs, which checks signatures as
//! the providers document them) in front of a real registry that refuses writes until the
//! name exists (the fault front's `...MustExist` quirks).

use std::time::Duration;

use crate::support::cloud_api::{CloudApi, Flavor, Imds};
use crate::support::fault::{Fault, FaultFront};
use crate::support::quirks::{NamespaceRefusal, Quirk};
use crate::support::*;

const ECR_KEY: &str = "AKIAREGTEETEST000001";
const ECR_SECRET: &str = "ecr-secret-wJalrXUtnFEMI-regtee";
const TCR_ID: &str = "AKIDregteetest0000000001";
const TCR_KEY: &str = "tcr-secret-Gu5t9xGARNpq86cd98-regtee";
const SWR_AK: &str = "QTWAOYTTINDUT2QVKYUC";
const SWR_SK: &str = "swr-secret-MFyfvK41ba2giqM7Uio6Pz-regtee";

/// A TCR target's `create_missing` lines (the key's secret half left to `more`), and `more`.
fn tcr_lines(more: &[&str]) -> Vec<String> {
    let mut lines = vec![
        "create_missing = \"namespaces\"".to_string(),
        "provider = \"tcr\"".into(),
        "region = \"ap-guangzhou\"".into(),
        "registry_id = \"tcr-regtee01\"".into(),
        format!("access_key = \"{TCR_ID}\""),
    ];
    lines.extend(more.iter().map(|l| l.to_string()));
    lines
}

/// An SWR target's `create_missing` lines with its key pair, and `more`.
fn swr_lines(more: &[&str]) -> Vec<String> {
    let mut lines = vec![
        "create_missing = \"namespaces\"".to_string(),
        "provider = \"swr\"".into(),
        "region = \"cn-north-4\"".into(),
        format!("access_key = \"{SWR_AK}\""),
        format!("secret_key = \"{SWR_SK}\""),
    ];
    lines.extend(more.iter().map(|l| l.to_string()));
    lines
}

/// The SWR API front, accepting the test's key pair.
fn swr_flavor() -> Flavor {
    Flavor::Swr {
        access_key: SWR_AK.into(),
        secret_key: SWR_SK.into(),
    }
}

/// The TCR API front, accepting the test's key pair.
fn tcr_flavor() -> Flavor {
    Flavor::Tcr {
        secret_id: TCR_ID.into(),
        secret_key: TCR_KEY.into(),
    }
}

/// Harbor, a cloud registry behind a fault front with `quirk`, its API front, and the
/// target's config lines (`namespaces`, `create_missing`, the provider's settings).
struct Setup {
    work: tempfile::TempDir,
    harbor: AuthRegistry,
    cloud: AuthRegistry,
    front: FaultFront,
    api: CloudApi,
    spec: ConfigSpec,
}

impl Setup {
    async fn start(quirk: Quirk, flavor: Flavor, lines: &[String]) -> Setup {
        let work = tempfile::tempdir().unwrap();
        let harbor = start_harbor(&work.path().join("harbor")).await;
        let cloud = start_cloud(&work.path().join("cloud"), &["prod-lib", "team"]).await;
        let front = FaultFront::start(&cloud.url()).await;
        front.set(Fault::Quirk(quirk));
        let api = CloudApi::start(flavor, front.existing()).await;
        let mut target = TargetSpec::at("cloud", &front.url())
            .with("namespaces = { library = \"prod-lib\" }")
            .with(&format!("api_url = \"{}\"", api.url()));
        for line in lines {
            target = target.with(line);
        }
        let spec = ConfigSpec::new(&harbor, &work.path().join("state")).target(target);
        Setup {
            work,
            harbor,
            cloud,
            front,
            api,
            spec,
        }
    }

    /// Pushes a small new image to `repo_tag` through regtee at `host`; returns it.
    fn push(
        &self,
        host: &str,
        layout_dir: &str,
        repo_tag: &str,
    ) -> crate::support::layout::Written {
        let dir = self.work.path().join(layout_dir);
        let mut layout = crate::support::layout::Layout::new(&dir);
        let image = layout.image(&[20_000], "amd64");
        layout.tag(&image, "image");
        push_layout_ok(&dir, "image", host, repo_tag, Tls::Off);
        image
    }

    fn target(&self) -> regtee::registry::RegistryClient {
        self.cloud.client(CLOUD_USER, CLOUD_PASSWORD)
    }
}

/// Every job ended `done` on its first attempt: the creation happened inside the attempt.
async fn assert_all_done_first_time(regtee_admin: &str) {
    let page = wait_until("every job to end", Duration::from_secs(60), || async {
        let (_, body) = http_request(
            &format!("{regtee_admin}/api/v1/jobs?limit=500"),
            "GET",
            None,
            &[],
        )
        .await;
        let page: serde_json::Value = serde_json::from_str(&body).ok()?;
        let ended = page["jobs"]
            .as_array()?
            .iter()
            .all(|j| j["state"] != "running" && j["state"] != "pending");
        ended.then_some(page)
    })
    .await;
    for job in page["jobs"].as_array().unwrap() {
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ecr_repositories_are_created_once_with_the_configured_settings_and_then_left_alone() {
    let s = Setup::start(
        Quirk::RepositoriesMustExist,
        Flavor::Ecr {
            key_id: ECR_KEY.into(),
            secret: ECR_SECRET.into(),
            session_token: None,
        },
        &[
            "create_missing = \"repositories\"".into(),
            "provider = \"ecr\"".into(),
            "region = \"eu-west-1\"".into(),
            format!("access_key = \"{ECR_KEY}\""),
            format!("secret_key = \"{ECR_SECRET}\""),
            "immutable_tags = true".into(),
            "scan_on_push = true".into(),
        ],
    )
    .await;
    let regtee = Regtee::start(&s.spec).await;
    let image = s.push(&regtee.host(), "one", "library/app:1");
    wait_for_manifest(&s.target(), "prod-lib/app", "1", &image.digest).await;
    assert_all_done_first_time(&regtee.admin_url("")).await;
    assert_eq!(
        s.api.calls("CreateRepository"),
        1,
        "{:?}",
        s.api.all_calls()
    );
    let settings = s.api.seen.lock().unwrap().settings["prod-lib/app"].clone();
    assert_eq!(settings["imageTagMutability"], "IMMUTABLE", "{settings}");
    assert_eq!(
        settings["imageScanningConfiguration"]["scanOnPush"], true,
        "{settings}"
    );
    assert!(s.api.seen.lock().unwrap().refused.is_empty());

    // The repository exists now: another push there asks the API nothing.
    let calls = s.api.all_calls().len();
    let second = s.push(&regtee.host(), "two", "library/app:2");
    wait_for_manifest(&s.target(), "prod-lib/app", "2", &second.digest).await;
    assert_all_done_first_time(&regtee.admin_url("")).await;
    assert_eq!(s.api.all_calls().len(), calls, "{:?}", s.api.all_calls());
    // The API saw a signature, never the secret, and never the registry's password.
    for headers in &s.api.seen.lock().unwrap().headers {
        assert!(
            !headers.contains(ECR_SECRET) && !headers.contains(CLOUD_PASSWORD),
            "{headers}"
        );
    }
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_pushes_under_one_missing_tcr_namespace_create_it_once_and_log_it_once() {
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Harbor),
        tcr_flavor(),
        &tcr_lines(&["secret_key_env = \"TCR_API_SECRET\"", "concurrency = 8"]),
    )
    .await;
    let mut spec = s.spec.clone().with_fixed_ports();
    spec.extra_env
        .push(("TCR_API_SECRET".into(), TCR_KEY.into()));
    let config = spec.write(&s.work.path().join("regtee.toml"));
    let process = RegteeProcess::spawn(&config, &spec, &s.work.path().join("regtee.log"));
    wait_listening(spec.listen_addr()).await;
    let host = spec.listen_addr().to_string();
    let pushed: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (s, host) = (&s, &host);
                scope.spawn(move || {
                    let image = s.push(host, &format!("layout-{i}"), &format!("library/app-{i}:1"));
                    (i, image)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, image) in &pushed {
        wait_for_manifest(
            &s.target(),
            &format!("prod-lib/app-{i}"),
            "1",
            &image.digest,
        )
        .await;
    }
    assert_eq!(s.api.calls("CreateNamespace"), 1, "{:?}", s.api.all_calls());
    assert!(s.api.seen.lock().unwrap().refused.is_empty());
    let log = process.log_text();
    assert_eq!(
        log.matches("created namespace prod-lib on cloud").count(),
        1,
        "one line per creation:\n{log}"
    );
    assert!(!log.contains(TCR_KEY), "the API's secret key is in the log");
    drop(process);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_api_key_fails_the_job_at_once_naming_the_fix_and_creates_nothing() {
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Harbor),
        tcr_flavor(),
        &tcr_lines(&["secret_key = \"not-the-secret-key-0042\""]),
    )
    .await;
    let regtee = Regtee::start(&s.spec).await;
    s.push(&regtee.host(), "one", "library/app:1");
    let failed = failed_manifest_job(&regtee, "repository=library/app").await;
    let detail = failed["detail"].as_str().unwrap();
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert!(detail.contains("AuthFailure.SignatureFailure"), "{detail}");
    assert!(
        detail.contains("fix access_key and secret_key(_env/_file) in [[targets]] \"cloud\""),
        "{detail}"
    );
    assert!(!detail.contains("not-the-secret-key-0042"), "{detail}");
    assert_eq!(s.api.calls("CreateNamespace"), 0);
    assert!(!s.front.existing().lock().unwrap().contains("prod-lib"));
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn swr_organizations_are_created_and_check_and_dry_run_say_what_would_be() {
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Denied),
        swr_flavor(),
        &swr_lines(&[]),
    )
    .await;
    // regtee at once on its fixed ports (nothing else takes them meanwhile), and an image
    // pushed to Harbor around it: the dry run compares it with the target.
    let spec = s.spec.clone().with_fixed_ports();
    let config = spec.write(&s.work.path().join("regtee.toml"));
    let regtee = Regtee::start(&spec).await;
    let image = s.push(&s.harbor.host(), "before", "library/app:1");

    let check = regtee_cli(&config, &spec, &["check"]);
    assert_says(&check, "create_missing (swr API)");
    assert_says(&check, "the API key pair works");
    assert_says(
        &check,
        "does not exist yet: regtee creates it through the swr API",
    );
    let dry = regtee_cli(&config, &spec, &["sync", "library", "--dry-run"]);
    assert_says(
        &dry,
        "would create namespace prod-lib on cloud (create_missing)",
    );
    assert!(!text(&dry).contains(SWR_SK) && !text(&check).contains(SWR_SK));
    assert_eq!(
        s.api.calls("POST"),
        0,
        "a dry run creates nothing: {:?}",
        s.api.all_calls()
    );

    let sync = regtee_cli(&config, &spec, &["sync", "library"]);
    assert_says(&sync, "1 queued");
    wait_for_manifest(&s.target(), "prod-lib/app", "1", &image.digest).await;
    assert_eq!(
        s.api.calls("POST /v2/manage/namespaces"),
        1,
        "{:?}",
        s.api.all_calls()
    );
    assert!(s.api.seen.lock().unwrap().refused.is_empty());
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_postgresql_create_a_missing_namespace_once_between_them() {
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Denied),
        swr_flavor(),
        &swr_lines(&["concurrency = 8"]),
    )
    .await;
    // Each API answer takes 300 ms: both replicas are inside "is it there? then create" at once.
    s.api.set_delay(Duration::from_millis(300));
    let first_spec = s.spec.clone().on_postgres(postgres(), "create_twins");
    let mut second_spec = first_spec.clone();
    second_spec.state_dir = s.work.path().join("state-2");
    let (first, second) = (
        Regtee::start(&first_spec).await,
        Regtee::start(&second_spec).await,
    );
    let hosts = [first.host(), second.host()];
    let pushed: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let (s, host) = (&s, &hosts[i % 2]);
                scope.spawn(move || {
                    let image =
                        s.push(host, &format!("layout-{i}"), &format!("library/twin-{i}:1"));
                    (i, image)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, image) in &pushed {
        wait_for_manifest(
            &s.target(),
            &format!("prod-lib/twin-{i}"),
            "1",
            &image.digest,
        )
        .await;
    }
    assert_eq!(
        s.api.calls("POST /v2/manage/namespaces"),
        1,
        "{:?}",
        s.api.all_calls()
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_harbor_target_gets_its_project_with_the_targets_own_login_and_check_tells_a_non_admin() {
    let lines = |_: ()| -> Vec<String> {
        vec![
            "create_missing = \"namespaces\"".into(),
            "provider = \"harbor\"".into(),
        ]
    };
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Harbor),
        Flavor::Harbor {
            user: CLOUD_USER.into(),
            password: CLOUD_PASSWORD.into(),
            admin: true,
        },
        &lines(()),
    )
    .await;
    let spec = s.spec.clone().with_fixed_ports();
    let config = spec.write(&s.work.path().join("regtee.toml"));
    assert_says(
        &regtee_cli(&config, &spec, &["check"]),
        "this login may create projects (a system admin)",
    );
    let regtee = Regtee::start(&spec).await;
    let image = s.push(&regtee.host(), "one", "library/app:1");
    wait_for_manifest(&s.target(), "prod-lib/app", "1", &image.digest).await;
    assert_eq!(
        s.api.calls("POST /api/v2.0/projects"),
        1,
        "{:?}",
        s.api.all_calls()
    );
    regtee.stop().await;

    // A robot-like login that may not create projects: check says so before any push.
    let robot = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Harbor),
        Flavor::Harbor {
            user: CLOUD_USER.into(),
            password: CLOUD_PASSWORD.into(),
            admin: false,
        },
        &lines(()),
    )
    .await;
    let spec = robot.spec.clone().with_fixed_ports();
    let config = spec.write(&robot.work.path().join("regtee.toml"));
    let check = regtee_cli(&config, &spec, &["check"]);
    assert_says(
        &check,
        "only admins may create projects here (project_creation_restriction = adminonly)",
    );
    assert_says(
        &check,
        "system admin, or set project_creation_restriction to everyone",
    );

    // Pushed anyway: the job fails at once naming the fix, and the refusal, which echoes the
    // login back, reaches neither the job's detail nor the log with the password in it.
    let process = RegteeProcess::spawn(&config, &spec, &robot.work.path().join("regtee.log"));
    wait_listening(spec.listen_addr()).await;
    robot.push(&spec.listen_addr().to_string(), "one", "library/app:1");
    let admin = format!("http://{}", spec.admin_addr().unwrap());
    let failed = failed_manifest_job_at(&admin, "repository=library/app").await;
    let detail = failed["detail"].as_str().unwrap();
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert!(
        detail.contains("Only system admin can create project"),
        "{detail}"
    );
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLOUD_USER}:{CLOUD_PASSWORD}"));
    let log = process.log_text();
    for (place, text) in [("the job's detail", detail), ("the log", log.as_str())] {
        assert!(
            !text.contains(CLOUD_PASSWORD),
            "the password in {place}:\n{text}"
        );
        assert!(
            !text.contains(&basic),
            "the Basic credentials in {place}:\n{text}"
        );
    }
    // One refusal serves every job of the push (remembered as a creation is); nothing is
    // created.
    assert_eq!(
        robot.api.calls("POST /api/v2.0/projects"),
        1,
        "{:?}",
        robot.api.all_calls()
    );
    assert!(!robot.front.existing().lock().unwrap().contains("prod-lib"));
    drop(process);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_key_configured_ecr_takes_the_instance_roles_key_from_imdsv2() {
    let role_key = (
        "ASIAREGTEEROLE000001",
        "role-secret-from-imds-0001",
        "role-session-token-0001",
    );
    let s = Setup::start(
        Quirk::RepositoriesMustExist,
        Flavor::Ecr {
            key_id: role_key.0.into(),
            secret: role_key.1.into(),
            session_token: Some(role_key.2.into()),
        },
        &[
            "create_missing = \"repositories\"".into(),
            "provider = \"ecr\"".into(),
            "region = \"eu-west-1\"".into(),
        ],
    )
    .await;
    let imds = Imds::start("regtee-mirror", role_key.0, role_key.1, role_key.2).await;
    let mut spec = s.spec.clone().with_fixed_ports();
    // Nothing of this machine's own AWS setup: the chain must reach the instance role.
    spec.extra_env.extend([
        ("AWS_ACCESS_KEY_ID".to_string(), String::new()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), String::new()),
        (
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI".to_string(),
            String::new(),
        ),
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_string(),
            String::new(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".to_string(),
            s.work.path().join("no-such-file").display().to_string(),
        ),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(), imds.url()),
    ]);
    let config = spec.write(&s.work.path().join("regtee.toml"));
    let process = RegteeProcess::spawn(&config, &spec, &s.work.path().join("regtee.log"));
    wait_listening(spec.listen_addr()).await;
    let image = s.push(&spec.listen_addr().to_string(), "one", "library/app:1");
    wait_for_manifest(&s.target(), "prod-lib/app", "1", &image.digest).await;
    assert_eq!(
        s.api.calls("CreateRepository"),
        1,
        "{:?}",
        s.api.all_calls()
    );
    assert!(s.api.seen.lock().unwrap().refused.is_empty());
    assert_eq!(
        *imds.gets_without_token.lock().unwrap(),
        0,
        "IMDSv1-style reads"
    );
    let log = process.log_text();
    assert!(
        !log.contains(role_key.1) && !log.contains(role_key.2),
        "{log}"
    );
    drop(process);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_that_redirects_elsewhere_gets_no_request_followed_and_the_job_names_api_url() {
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Harbor),
        tcr_flavor(),
        &tcr_lines(&[&format!("secret_key = \"{TCR_KEY}\""), "max_attempts = 1"]),
    )
    .await;
    let elsewhere = crate::support::recorder::Recorder::start().await;
    s.api.redirect_to(&format!("http://{}/", elsewhere.addr));
    let regtee = Regtee::start(&s.spec).await;
    s.push(&regtee.host(), "one", "library/app:1");
    let failed = failed_manifest_job(&regtee, "repository=library/app").await;
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("does not follow an API's redirects"),
        "{detail}"
    );
    assert!(
        detail.contains("check api_url (or region) in [[targets]] \"cloud\""),
        "{detail}"
    );
    assert!(s.api.calls("redirected") >= 1);
    assert!(
        elsewhere.seen().is_empty(),
        "the host the API named got: {:?}",
        elsewhere.seen()
    );
    assert!(!s.front.existing().lock().unwrap().contains("prod-lib"));
    regtee.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_the_api_says_exists_but_the_registry_refuses_fails_once_saying_so() {
    let s = Setup::start(
        Quirk::NamespacesMustExist(NamespaceRefusal::Denied),
        swr_flavor(),
        &swr_lines(&[]),
    )
    .await;
    // An API whose account sees the organization, while the registry refuses regtee's login
    // there (another account's organization, or no push rights on it).
    let elsewhere: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>> =
        std::sync::Arc::new(std::sync::Mutex::new(["prod-lib".to_string()].into()));
    let api = CloudApi::start(swr_flavor(), elsewhere).await;
    let mut spec = s.spec.clone();
    spec.targets[0].extra = spec.targets[0].extra.replace(&s.api.url(), &api.url());
    let regtee = Regtee::start(&spec).await;
    s.push(&regtee.host(), "one", "library/app:1");
    let failed = failed_manifest_job(&regtee, "repository=library/app").await;
    let detail = failed["detail"].as_str().unwrap();
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert!(
        detail
            .contains("exists (the swr API says so, create_missing), yet the registry refuses it"),
        "{detail}"
    );
    assert_eq!(api.calls("POST"), 0, "nothing is created over what exists");
    regtee.stop().await;
}
