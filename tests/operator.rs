//! The operator's side as people meet it: the page in a real browser (log in, a failed job and
//! its reason, retry, a backfill), its refusals, the alert rules under promtool, and the
//! dashboard's and rules' metrics against what a running regtee exports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::browser::Browser;
use crate::support::fault::{Fault, FaultFront};
use crate::support::layout::Layout;
use crate::support::*;

const TOKEN: &str = "page-admin-token-3f9d";

fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Pushes `library/app:1` (one layer of `size`) through regtee while the target answers every
/// write with a 500: its copies fail until the fault is cleared.
fn push_refused_by_the_target(
    front: &FaultFront,
    regtee: &Regtee,
    work: &Path,
    size: usize,
) -> crate::support::layout::Written {
    front.set(Fault::EchoAuthorization);
    let mut layout = Layout::new(&work.join("layout"));
    let image = layout.image(&[size], "amd64");
    layout.tag(&image, "app");
    push_layout_ok(
        &layout.dir,
        "app",
        &regtee.host(),
        "library/app:1",
        Tls::Off,
    );
    image
}

/// Waits until the page, loaded again, contains `needle`.
async fn page_shows(browser: &Browser, url: &str, needle: &str) -> String {
    wait_until(
        &format!("the page to show {needle}"),
        Duration::from_secs(30),
        || async {
            browser.goto(url).await;
            let text = browser.text().await;
            text.contains(needle).then_some(text)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_in_a_real_browser_logs_in_retries_a_failed_job_and_starts_a_backfill() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()).with("max_attempts = 1"));
    spec.admin_token = Some(TOKEN.into());
    let regtee = Regtee::start(&spec).await;
    let page = regtee.admin_url("/");

    // The target refuses every write: the push's jobs fail on their one attempt.
    let image = push_refused_by_the_target(&front, &regtee, work.path(), 100_000);

    let browser = Browser::start(work.path()).await;
    browser.goto(&page).await;
    assert!(
        browser.source().await.contains("admin token"),
        "asked to log in"
    );
    browser.type_into("input[name=token]", TOKEN).await;
    browser.click("form[action=\"/login\"] button").await;
    let text = page_shows(&browser, &page, "Recent failures").await;
    assert!(text.contains("tcr"), "{text}");
    let failed = wait_until("a failed job", Duration::from_secs(30), || async {
        let (_, body) = http_request(
            &regtee.admin_url("/api/v1/jobs?state=failed"),
            "GET",
            None,
            &[("authorization", &format!("Bearer {TOKEN}"))],
        )
        .await;
        let page: serde_json::Value = serde_json::from_str(&body).ok()?;
        page["jobs"][0]["detail"].as_str().map(str::to_string)
    })
    .await;
    let reason: String = failed.chars().take(60).collect();
    let text = page_shows(&browser, &page, &reason).await;
    assert!(text.contains("then retry"), "what to do: {text}");
    browser.click("a[href^=\"/jobs/\"]").await;
    let job = browser.text().await;
    assert!(
        job.contains("Attempts") && job.contains(&reason),
        "the job's page: {job}"
    );
    browser.goto(&page).await;
    assert!(
        !text.contains(TOKEN) && !text.contains(CLOUD_PASSWORD),
        "no secret on the page: {text}"
    );

    // The target is mended; one job retried from its button, the rest with the target's.
    front.set(Fault::None);
    browser
        .click("form[action^=\"/actions/retry/\"] button")
        .await;
    browser.goto(&page).await;
    browser
        .click("form[action=\"/actions/retry-failed\"] button")
        .await;
    let text = page_shows(&browser, &page, "None.").await;
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/app",
        "1",
        &image.digest,
    )
    .await;
    assert!(text.contains("Targets"), "{text}");

    // A backfill, started from the page, shows its progress there.
    browser.type_into("input[name=project]", "library").await;
    browser
        .click("form[action=\"/actions/backfill\"] button")
        .await;
    let text = page_shows(&browser, &page, "finished (in sync)").await;
    assert!(text.contains("library"), "{text}");

    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    let artifacts = repo_path("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("operator-page.png"), &shot).unwrap();
    browser.quit().await;

    // Without the session, and from another site, actions are refused.
    let host = regtee.admin.unwrap().to_string();
    let post = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let url = regtee.admin_url("/actions/retry-failed");
        async move {
            let client = raw_http_client(None, false);
            let mut request = http::Request::post(url)
                .header("content-type", "application/x-www-form-urlencoded");
            for (k, v) in headers {
                request = request.header(k, v);
            }
            client
                .request(request.body(regtee::body::full(body)).unwrap())
                .await
                .unwrap()
        }
    };
    let login = post(vec![], "").await;
    assert_eq!(login.status(), 401, "no session: refused");
    let client = raw_http_client(None, false);
    let session = client
        .request(
            http::Request::post(regtee.admin_url("/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(regtee::body::full(format!("token={TOKEN}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(session.status(), 303);
    let cookie = session.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    let cross_site = post(
        vec![
            ("cookie", cookie.clone()),
            ("origin", "https://evil.example".into()),
        ],
        "target=tcr",
    )
    .await;
    assert_eq!(cross_site.status(), 403, "a cross-site POST");
    let forged = post(
        vec![
            ("cookie", cookie.clone()),
            ("origin", format!("http://{host}")),
        ],
        "target=tcr&form_token=guessed",
    )
    .await;
    assert_eq!(forged.status(), 403, "a form that is not the page's");
    regtee.stop().await;
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo_path("deploy/prometheus");
    for args in [
        vec!["check", "rules", "regtee-rules.yml"],
        vec!["test", "rules", "regtee-rules.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs (apt-get install prometheus)");
        assert!(out.status.success(), "promtool {args:?}: {}", text(&out));
    }
}

/// Every `regtee_*` metric name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("regtee_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_and_the_rules_query_is_exported() {
    // A push whose copy fails once and then succeeds, and a pull through the cache: every
    // series the dashboard and the rules read exists then.
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let front = FaultFront::start(&cloud.url()).await;
    let mut spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .target(TargetSpec::at("tcr", &front.url()).retry("100ms", "200ms"));
    spec.cache = Some("max_size = \"1GiB\"\n".into());
    let regtee = Regtee::start(&spec).await;
    let image = push_refused_by_the_target(&front, &regtee, work.path(), 50_000);
    wait_until("a failed attempt", Duration::from_secs(30), || async {
        let (_, m) = http_request(&regtee.admin_url("/metrics"), "GET", None, &[]).await;
        m.contains("regtee_mirror_failures_total{").then_some(())
    })
    .await;
    front.set(Fault::None);
    wait_for_manifest(
        &cloud.client(CLOUD_USER, CLOUD_PASSWORD),
        "library/app",
        "1",
        &image.digest,
    )
    .await;
    pull_to_layout(
        &regtee.host(),
        "library/app:1",
        &work.path().join("pulled"),
        (DEV_USER, DEV_PASSWORD),
        Tls::Off,
    );
    let (_, exported) = http_request(&regtee.admin_url("/metrics"), "GET", None, &[]).await;
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("deploy/grafana/regtee.json")).unwrap(),
    )
    .unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(queries.len() >= 10, "the dashboard has its panels");
    let rules = std::fs::read_to_string(repo_path("deploy/prometheus/regtee-rules.yml")).unwrap();
    let named = metric_names(&format!("{}\n{rules}", queries.join("\n")));
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        let family = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            families.contains(&family),
            "{name} is queried but regtee exports no {family}: {families:?}"
        );
    }
    regtee.stop().await;
}
