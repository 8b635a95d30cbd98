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

/// `regtee check`: validates the config and tests every endpoint. Exit 1 when a check fails.
pub async fn check(config: &Config, config_path: &std::path::Path) -> Result<i32, CliError> {
    crate::tls::install_crypto_provider();
    let mut lines = vec![CheckLine {
        ok: true,
        what: "config".into(),
        detail: format!(
            "{} is valid ({} target(s))",
            config_path.display(),
            config.targets.len()
        ),
        hint: None,
    }];
    if let Some(database) = &config.state.database {
        let what = format!("queue database {}", database.shown);
        let opened = crate::queue::Queue::open_state(&config.state).await;
        let healthy = match opened {
            Ok(queue) => queue.health().await,
            Err(e) => Err(e),
        };
        lines.push(match healthy {
            Ok(()) => CheckLine {
                ok: true,
                what,
                detail: "connected; a write transaction commits".into(),
                hint: None,
            },
            Err(e) => CheckLine {
                ok: false,
                what,
                detail: e.to_string(),
                hint: Some("check [state] database (host, port, database, user), the password in database_password_env / _file or PGPASSWORD, and that the role may create tables in that database".into()),
            },
        });
    }
    let upstream = RegistryClient::new(&config.upstream.endpoint)?;
    let up = &config.upstream.endpoint;
    match ping(&upstream).await {
        Ok(()) => lines.push(CheckLine {
            ok: true,
            what: format!("upstream {}", up.origin),
            detail: connection_ok(up, &upstream),
            hint: None,
        }),
        Err(e) => lines.push(CheckLine {
            ok: false,
            what: format!("upstream {}", up.origin),
            detail: e.kind.to_string(),
            hint: Some(hint(&e, "[upstream]", None)),
        }),
    }
    for target in &config.targets {
        let key = format!("[[targets]] \"{}\"", target.endpoint.name);
        let name = &target.endpoint.name;
        let client = RegistryClient::new(&target.endpoint)?;
        let what = format!("target {name} {}", target.endpoint.origin);
        if let Err(e) = ping(&client).await {
            lines.push(CheckLine {
                ok: false,
                what,
                detail: e.kind.to_string(),
                hint: Some(hint(&e, &key, None)),
            });
            continue;
        }
        lines.push(CheckLine {
            ok: true,
            what,
            detail: connection_ok(&target.endpoint, &client),
            hint: None,
        });
        let mut namespaces: Vec<String> = target
            .policy
            .mapped_projects()
            .map(|p| target.policy.target_namespace(p).to_string())
            .collect();
        if namespaces.is_empty()
            && let Ok(projects) = backfill::projects_for(&upstream, target).await
        {
            namespaces = projects
                .iter()
                .map(|p| target.policy.target_namespace(p).to_string())
                .collect();
        }
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() {
            lines.push(CheckLine {
                ok: true,
                what: format!("target {name} namespaces"),
                detail: "none mapped and Harbor lists no projects yet: nothing to check".into(),
                hint: None,
            });
        }
        for ns in namespaces.iter().take(20) {
            let what = format!("target {name} namespace {ns}");
            match client.check_push(&format!("{ns}/regtee-check")).await {
                Ok(()) => lines.push(CheckLine {
                    ok: true,
                    what,
                    detail: "exists and accepts pushes".into(),
                    hint: None,
                }),
                Err(mut e) => {
                    // Its credentials were just accepted: a refusal here is about the namespace.
                    if let ErrorKind::Unauthorized(m) = &e.kind {
                        e.kind = ErrorKind::Denied(m.clone());
                    }
                    lines.push(CheckLine {
                        ok: false,
                        what,
                        detail: e.kind.to_string(),
                        hint: Some(hint(&e, &key, Some(ns))),
                    });
                }
            }
        }
    }
    Ok(report(&lines))
}
