//! `regtee check`: the config, Harbor and every target, one line per check with a hint.

use crate::config::Config;
use crate::ops::backfill;
use crate::registry::{ErrorKind, FixContext, RegistryClient, RegistryError};

use super::CliError;

/// One line of `regtee check`.
struct CheckLine {
    ok: bool,
    what: String,
    detail: String,
    hint: Option<String>,
}

fn report(lines: &[CheckLine]) -> i32 {
    for l in lines {
        println!(
            "{:<5} {}: {}",
            if l.ok { "ok" } else { "FAIL" },
            l.what,
            l.detail
        );
        if let Some(h) = &l.hint {
            println!("      hint: {h}");
        }
    }
    i32::from(lines.iter().any(|l| !l.ok))
}

/// The fix for a failed check, from the one table of fixes (see the error above otherwise).
fn hint(e: &RegistryError, section: &str, namespace: Option<&str>) -> String {
    e.fix(FixContext {
        section,
        namespace,
        repository: None,
    })
    .unwrap_or_else(|| "see the error above".to_string())
}

/// What a passed connection check proves: TLS only for https:// endpoints, and where the
/// accepted login came from.
fn connection_ok(endpoint: &crate::config::Endpoint, client: &RegistryClient) -> String {
    let how = match endpoint.origin.scheme() {
        crate::origin::Scheme::Https => "reachable, TLS ok",
        crate::origin::Scheme::Http => "reachable",
    };
    match endpoint.login {
        crate::config::Login::Anonymous => format!("{how}, anonymous access accepted"),
        _ => format!("{how}, credentials accepted ({})", client.login_source()),
    }
}

/// Pings a registry, having fetched its login first (so a credential helper is run even where
/// `/v2/` answers anonymously).
async fn ping(client: &RegistryClient) -> Result<(), RegistryError> {
    client.check_login().await?;
    client.ping().await
}

impl CheckLine {
    fn ok(what: impl Into<String>, detail: impl Into<String>) -> CheckLine {
        CheckLine {
            ok: true,
            what: what.into(),
            detail: detail.into(),
            hint: None,
        }
    }

    fn failed(what: impl Into<String>, detail: impl Into<String>, hint: String) -> CheckLine {
        CheckLine {
            ok: false,
            what: what.into(),
            detail: detail.into(),
            hint: Some(hint),
        }
    }
}

/// `regtee check`: validates the config and tests every endpoint. Exit 1 when a check fails.
pub async fn check(config: &Config, config_path: &std::path::Path) -> Result<i32, CliError> {
    crate::tls::install_crypto_provider();
    let mut lines = vec![CheckLine::ok(
        "config",
        format!(
            "{} is valid ({} target(s))",
            config_path.display(),
            config.targets.len()
        ),
    )];
    if let Some(database) = &config.state.database {
        lines.push(check_database(config, &database.shown).await);
    }
    let upstream = RegistryClient::new(&config.upstream.endpoint)?;
    let up = &config.upstream.endpoint;
    lines.push(match ping(&upstream).await {
        Ok(()) => CheckLine::ok(
            format!("upstream {}", up.origin),
            connection_ok(up, &upstream),
        ),
        Err(e) => CheckLine::failed(
            format!("upstream {}", up.origin),
            e.kind.to_string(),
            hint(&e, "[upstream]", None),
        ),
    });
    for target in &config.targets {
        lines.extend(check_target(target, &upstream).await?);
    }
    if config.upstream.token_trust.is_some() {
        lines.push(check_push_back(config, &upstream).await);
    }
    Ok(report(&lines))
}

/// With `token_certificate` set a target can become the primary, and its writes are then
/// mirrored back to Harbor with `[upstream]`'s login: it needs push on every project.
async fn check_push_back(config: &Config, upstream: &RegistryClient) -> CheckLine {
    let what = "upstream push rights (mirroring back from a primary target)";
    // Every project Harbor lists; a login that may not list them is asked about the projects
    // the targets' namespace mappings name.
    let mapped: Vec<String> = config
        .targets
        .iter()
        .flat_map(|t| t.policy.mapped_projects().map(str::to_string))
        .collect();
    let projects = match backfill::all_projects(upstream).await {
        Ok(p) => p,
        Err(_) if !mapped.is_empty() => mapped,
        Err(e) => return CheckLine::failed(what, e.kind.to_string(), hint(&e, "[upstream]", None)),
    };
    let mut refused = Vec::new();
    for project in projects.iter().take(50) {
        match upstream
            .granted_actions(&format!("{project}/regtee-check"), "pull,push")
            .await
        {
            Ok(Some(actions)) if actions.iter().any(|a| a == "push" || a == "*") => {}
            Ok(Some(_)) => refused.push(project.clone()),
            Ok(None) => {
                return CheckLine::ok(what, "Harbor issues no readable token: not checked");
            }
            Err(e) => {
                return CheckLine::failed(what, e.kind.to_string(), hint(&e, "[upstream]", None));
            }
        }
    }
    if refused.is_empty() {
        CheckLine::ok(
            what,
            format!(
                "regtee's login may push to all {} project(s)",
                projects.len().min(50)
            ),
        )
    } else {
        CheckLine::failed(
            what,
            format!("regtee's login may not push to {}", refused.join(", ")),
            "give regtee's robot account push on these projects before a cutover: what clients push to the primary target is mirrored back with it".into(),
        )
    }
}

/// The queue's database: it connects, and a write commits.
async fn check_database(config: &Config, shown: &str) -> CheckLine {
    let what = format!("queue database {shown}");
    let healthy = match crate::queue::Queue::open_state(&config.state).await {
        Ok(queue) => queue.health().await,
        Err(e) => Err(e),
    };
    match healthy {
        Ok(()) => CheckLine::ok(what, "connected; a write transaction commits"),
        Err(e) => CheckLine::failed(
            what,
            e.to_string(),
            "check [state] database (host, port, database, user), the password in database_password_env / _file or PGPASSWORD, and that the role may create tables in that database".into(),
        ),
    }
}

/// One target: reachable with its login, and each namespace regtee will write to accepts
/// pushes (the mapped ones, else those of Harbor's projects; at most 20).
async fn check_target(
    target: &crate::config::TargetConfig,
    upstream: &RegistryClient,
) -> Result<Vec<CheckLine>, CliError> {
    let key = format!("[[targets]] \"{}\"", target.endpoint.name);
    let name = &target.endpoint.name;
    let client = RegistryClient::new(&target.endpoint)?;
    let what = format!("target {name} {}", target.endpoint.origin);
    if let Err(e) = ping(&client).await {
        return Ok(vec![CheckLine::failed(
            what,
            e.kind.to_string(),
            hint(&e, &key, None),
        )]);
    }
    let mut lines = vec![CheckLine::ok(
        what,
        connection_ok(&target.endpoint, &client),
    )];
    let provisioner = crate::provision::Provisioner::of(target)?;
    if let Some(p) = &provisioner {
        let what = format!(
            "target {name} create_missing ({} API)",
            p.provider().as_str()
        );
        lines.push(match p.check().await {
            Ok(detail) => CheckLine::ok(what, detail),
            Err(e) => {
                let fix = p.fix(&e, &key).unwrap_or_else(|| "try again later".into());
                CheckLine::failed(what, e.to_string(), fix)
            }
        });
    }
    let namespaces = namespaces_of(target, upstream).await;
    if namespaces.is_empty() {
        lines.push(CheckLine::ok(
            format!("target {name} namespaces"),
            "none mapped and Harbor lists no projects yet: nothing to check",
        ));
    }
    for ns in namespaces.iter().take(20) {
        let what = format!("target {name} namespace {ns}");
        lines.push(
            match client.check_push(&format!("{ns}/regtee-check")).await {
                Ok(()) => CheckLine::ok(what, "exists and accepts pushes"),
                Err(mut e) => {
                    // Its credentials were just accepted: a refusal here is about the namespace.
                    if let ErrorKind::Unauthorized(m) = &e.kind {
                        e.kind = ErrorKind::Denied(m.clone());
                    }
                    match created_on_demand(provisioner.as_ref(), ns).await {
                        Some(detail) => CheckLine::ok(what, detail),
                        None => {
                            CheckLine::failed(what, e.kind.to_string(), hint(&e, &key, Some(ns)))
                        }
                    }
                }
            },
        );
    }
    Ok(lines)
}

/// When a namespace refuses the probe push and the target has `create_missing`: what regtee
/// will do about it, if the cloud's API says the namespace (or the probe repository) is absent.
async fn created_on_demand(
    provisioner: Option<&crate::provision::Provisioner>,
    namespace: &str,
) -> Option<String> {
    let p = provisioner?;
    let creation = p.creation_for(&format!("{namespace}/regtee-check"));
    match p.exists(&creation).await {
        Ok(false) => Some(match creation {
            crate::provision::Creation::Namespace(_) => format!(
                "does not exist yet: regtee creates it through the {} API before its first push (create_missing)",
                p.provider().as_str()
            ),
            crate::provision::Creation::Repository(_) => format!(
                "its repositories are created through the {} API before their first push (create_missing)",
                p.provider().as_str()
            ),
        }),
        _ => None,
    }
}

/// The namespaces a target receives: the mapped ones, else Harbor's projects under their
/// names there; sorted, once each.
async fn namespaces_of(
    target: &crate::config::TargetConfig,
    upstream: &RegistryClient,
) -> Vec<String> {
    let mut namespaces: Vec<String> = target
        .policy
        .mapped_projects()
        .map(|p| target.policy.target_namespace(p).to_string())
        .collect();
    if namespaces.is_empty()
        && let Ok(projects) = backfill::projects_for(upstream, target).await
    {
        namespaces = projects
            .iter()
            .map(|p| target.policy.target_namespace(p).to_string())
            .collect();
    }
    namespaces.sort();
    namespaces.dedup();
    namespaces
}
