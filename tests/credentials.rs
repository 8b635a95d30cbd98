//! Credentials belong to the origin that asked for them (the second hostile round): a target's
//! password, a target's token, Harbor's robot account and the secrets in regtee's own config
//! go nowhere else, whatever another server names in a `Location`, `Link` or `realm`.

use std::time::Duration;

use crate::support::fault::{Fault, FaultFront};
use crate::support::layout::Layout;
use crate::support::recorder::Recorder;
use crate::support::*;

const BASIC_USER: &str = "basic-pusher";
const BASIC_PASSWORD: &str = "basic-target-pw-4e1d";

/// What a request to the recorder would carry if regtee handed its logins out: the target's
/// and Harbor's passwords, plain or inside a Basic header.
fn secrets() -> Vec<String> {
    use base64::Engine;
    let b64 =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    vec![
        CLOUD_PASSWORD.into(),
        BASIC_PASSWORD.into(),
        ROBOT_PASSWORD.into(),
        b64(CLOUD_USER, CLOUD_PASSWORD),
        b64(BASIC_USER, BASIC_PASSWORD),
        b64(ROBOT_USER, ROBOT_PASSWORD),
    ]
}

/// Two targets (a token-auth one like TCR, a Basic-auth one) that move their upload sessions to
/// a recording host, which answers with its own challenges. Mirroring fails, and keeps retrying,
/// but neither the token, nor the password, nor a Basic header ever reaches the recorder.
#[tokio::test(flavor = "multi_thread")]
async fn a_targets_credentials_never_follow_its_location_to_another_origin() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let basic =
        start_basic_auth_registry(&work.path().join("basic"), BASIC_USER, BASIC_PASSWORD).await;
    let (token_recorder, basic_recorder) = (Recorder::start().await, Recorder::start().await);
    let token_front = FaultFront::start(&cloud.url()).await;
    token_front.set(Fault::MoveUploadsTo(token_recorder.url()));
    let basic_front = FaultFront::start(&basic.url()).await;
    basic_front.set(Fault::MoveUploadsTo(basic_recorder.url()));
    let spec = ConfigSpec::new(&harbor, &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::at("tcr", &token_front.url()))
        .target(TargetSpec::at("plain", &basic_front.url()).login(&format!(
            "username = \"{BASIC_USER}\"\npassword = \"{BASIC_PASSWORD}\"\n"
        )));
    let regtee = Regtee::start(&spec).await;
    let config = spec.write(&work.path().join("regtee.toml"));

    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[40_000, 50_000], "amd64");
    layout.tag(&image, "v1");
    push_layout_ok(
        &layout.dir,
        "v1",
        &regtee.host(),
        "library/app:v1",
        Tls::Off,
    );

    // Each target's blob jobs reach the recorder, are refused there, and fail saying why:
    // retrying cannot make another origin's challenge one that regtee's login answers.
    for (target, recorder) in [("tcr", &token_recorder), ("plain", &basic_recorder)] {
        let job = wait_until("a failed blob job", Duration::from_secs(60), || async {
            admin_get(
                &regtee,
                &format!("/api/v1/jobs?target={target}&state=failed"),
            )
            .await["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["kind"] == "blob")
                .cloned()
        })
        .await;
        let detail = job["detail"].as_str().unwrap();
        assert!(
            detail.contains("sent to no other origin")
                && detail.contains(&recorder.addr.to_string()),
            "{target}: {job}"
        );
        assert!(
            !recorder.seen().is_empty(),
            "{target}: the uploads went there"
        );
    }
    // A retry goes the same way: still nothing for the recorder.
    let before = token_recorder.seen().len() + basic_recorder.seen().len();
    let out = tokio::task::block_in_place(|| regtee_cli(&config, &spec, &["retry", "--failed"]));
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "the retried jobs to fail again",
        Duration::from_secs(60),
        || async {
            let failed = admin_get(&regtee, "/api/v1/jobs?state=failed").await["jobs"]
                .as_array()
                .unwrap()
                .len();
            let seen = token_recorder.seen().len() + basic_recorder.seen().len();
            (failed > 0 && seen >= before + 2).then_some(())
        },
    )
    .await;
    let secrets = secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    token_recorder.assert_no_credentials(&secrets);
    basic_recorder.assert_no_credentials(&secrets);
    assert!(
        token_recorder
            .seen()
            .iter()
            .all(|r| !r.target.starts_with("/token")),
        "no token was asked for at the realm the foreign host named: {:?}",
        token_recorder.seen()
    );
    regtee.stop().await;
}

/// A Harbor whose tag list names a recording host as its next page: `regtee sync` does not
/// follow it (skopeo follows only the path, on the same host), sends it nothing, and says why.
#[tokio::test(flavor = "multi_thread")]
async fn harbors_robot_credentials_never_follow_a_link_to_another_origin() {
    let work = tempfile::tempdir().unwrap();
    let harbor = start_bare_harbor(&work.path().join("harbor")).await;
    let cloud = start_cloud(&work.path().join("cloud"), &["library"]).await;
    let recorder = Recorder::start().await;
    let front = FaultFront::start(&harbor.url()).await;
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = layout.image(&[20_000], "amd64");
    layout.tag(&image, "v1");
    // Straight to Harbor: only the backfill will know of it.
    push_layout_ok(
        &layout.dir,
        "v1",
        &harbor.host(),
        "library/app:v1",
        Tls::Off,
    );
    front.set(Fault::NextTagsPageAt(format!(
        "{}/v2/library/app/tags/list?last=v1&n=1000",
        recorder.url()
    )));
    let spec = ConfigSpec::at(&front.url(), &work.path().join("state"))
        .with_fixed_ports()
        .target(TargetSpec::cloud("tcr", &cloud));
    let regtee = Regtee::start(&spec).await;
    let config = spec.write(&work.path().join("regtee.toml"));

    let out = tokio::task::block_in_place(|| regtee_cli(&config, &spec, &["sync", "library"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, "the next page is on another origin");
    let secrets = secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    recorder.assert_no_credentials(&secrets);
    assert!(
        recorder.seen().is_empty(),
        "the link was not followed: {:?}",
        recorder.seen()
    );
    regtee.stop().await;
}

/// Configuration errors name the key and the line, never a secret written there: a syntax error
/// on the password's line, a type error, a URL with credentials, an inline token next to a bad
/// value. Each through the binary, as an operator sees it (exit 64).
#[tokio::test(flavor = "multi_thread")]
async fn config_errors_never_print_the_secrets_the_file_holds() {
    const SECRET: &str = "Zq7-inline-secret-93kd";
    let work = tempfile::tempdir().unwrap();
    let head = "[proxy]\nlisten = \"127.0.0.1:0\"\n";
    let cases = [
        format!("{head}[upstream]\nurl = \"https://h\"\nusername = \"u\"\npassword = \"{SECRET}\n"),
        format!(
            "{head}[upstream]\nurl = \"https://h\"\nusername = \"u\"\npassword = \"{SECRET}\" junk\n"
        ),
        format!("{head}[upstream]\nurl = \"http://robot:{SECRET}@harbor.example.com\"\n"),
        format!(
            "{head}[upstream]\nurl = \"https://h\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{SECRET}\"\n[webhooks]\nsecret = 7\n"
        ),
        format!(
            "{head}[upstream]\nurl = \"https://h\"\n[state]\ndatabase = \"postgres://regtee:{SECRET}@db/regtee\"\n"
        ),
        format!(
            "{head}[upstream]\nurl = \"https://h\"\n[[targets]]\nname = \"t\"\nurl = \"ftp://u:{SECRET}@cloud\"\nusername = \"u\"\npassword = \"{SECRET}\"\n"
        ),
    ];
    for (i, case) in cases.iter().enumerate() {
        let path = work.path().join(format!("case{i}.toml"));
        std::fs::write(&path, case).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_regtee"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let all = text(&out);
        assert_eq!(out.status.code(), Some(64), "case {i}: {all}");
        assert!(!all.contains(SECRET), "case {i} printed the secret: {all}");
        assert!(
            !all.contains("Zq7"),
            "case {i} printed part of the secret: {all}"
        );
    }
}
