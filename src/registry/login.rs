//! regtee's own login to a registry, from where docker users already keep it: the config, a
//! Docker credential helper (`docker-credential-<name> get`, the protocol of
//! docker/docker-credential-helpers: the registry's host on stdin, `{"Username","Secret"}` on
//! stdout), or a docker `config.json` (`credHelpers`, then `credsStore`, then `auths`, as the
//! docker CLI looks them up).
//!
//! A fetched login is cached, and fetched again when the registry stops accepting it (a 401
//! after it worked: ECR's 12-hour passwords, rotated tokens) or when the helper said it expires.
//! A helper that hangs is killed. What a helper prints never reaches a log: its secret is
//! remembered for scrubbing, and its errors are scrubbed.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use serde::Deserialize;

use crate::config::{Credentials, Login, Secret};

/// How long a helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A login in hand.
pub(super) struct Current {
    pub(super) credentials: Credentials,
    /// `Basic <base64(user:password)>`.
    pub(super) basic: HeaderValue,
    expires: Option<SystemTime>,
}

/// Why no login could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(super) struct LoginError(String);

/// The login of one registry client.
pub(super) struct Logins {
    source: Login,
    /// The registry's `host[:port]`, as helpers and `config.json` key it.
    host: String,
    current: RwLock<Option<Arc<Current>>>,
    refresh: tokio::sync::Mutex<()>,
}

/// The helper protocol's answer to `get`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
    /// Not in the protocol's core; some helpers say when the credentials expire (RFC 3339).
    expires_at: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
    #[serde(default)]
    cred_helpers: std::collections::BTreeMap<String, String>,
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    identitytoken: Option<String>,
}

/// docker's username for a Secret that is an OAuth2 refresh token (an `identitytoken`).
pub(super) const IDENTITY_TOKEN_USER: &str = "<token>";

fn current(credentials: Credentials, expires: Option<SystemTime>) -> Arc<Current> {
    Arc::new(Current {
        basic: basic_header(&credentials),
        credentials,
        expires,
    })
}

impl Logins {
    pub(super) fn new(source: &Login, host: String) -> Logins {
        let fixed = source.fixed().map(|c| current(c.clone(), None));
        Logins {
            source: source.clone(),
            host,
            current: RwLock::new(fixed),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// Where the login comes from, for `regtee check`.
    pub(super) fn describe(&self) -> String {
        match &self.source {
            Login::Anonymous => "anonymous".into(),
            Login::Static(c) => format!("the configured password of `{}`", c.username),
            Login::Helper(h) => format!("credential helper {}", helper_program(h)),
            Login::DockerConfig(p) => format!("docker config {}", p.display()),
        }
    }

    fn cached(&self) -> Option<Arc<Current>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        match current.expires {
            Some(at) if at <= SystemTime::now() => None,
            _ => Some(current),
        }
    }

    /// The login to use now, fetched if it is not cached.
    pub(super) async fn get(&self) -> Result<Option<Arc<Current>>, LoginError> {
        if matches!(self.source, Login::Anonymous) {
            return Ok(None);
        }
        if let Some(c) = self.cached() {
            return Ok(Some(c));
        }
        // One fetch at a time; whoever waited finds it cached.
        let _fetching = self.refresh.lock().await;
        if let Some(c) = self.cached() {
            return Ok(Some(c));
        }
        let fetched = match &self.source {
            Login::Anonymous | Login::Static(_) => return Ok(self.cached()),
            Login::Helper(h) => run_helper(h, &self.host, HELPER_TIMEOUT).await?,
            Login::DockerConfig(path) => from_docker_config(path, &self.host).await?,
        };
        let Some((credentials, expires)) = fetched else {
            return Ok(None);
        };
        let c = current(credentials, expires);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(Some(c))
    }

    /// The registry refused the login: the next request fetches it again (a static one stays).
    pub(super) fn forget(&self) {
        if !matches!(self.source, Login::Static(_)) {
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Whether forgetting can bring a different login.
    pub(super) fn renewable(&self) -> bool {
        matches!(self.source, Login::Helper(_) | Login::DockerConfig(_))
    }
}

fn helper_program(name: &str) -> String {
    if name.contains('/') {
        name.to_string()
    } else {
        format!("docker-credential-{name}")
    }
}

/// `docker-credential-<name> get`, killed if it takes longer than `limit`.
async fn run_helper(
    name: &str,
    host: &str,
    limit: Duration,
) -> Result<Option<(Credentials, Option<SystemTime>)>, LoginError> {
    use tokio::io::AsyncWriteExt as _;
    let program = helper_program(name);
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            LoginError(format!(
                "cannot run {program}: {e} (is it installed and on PATH?)"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(host.as_bytes()).await;
    }
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| {
            LoginError(format!(
                "{program} get did not answer within {limit:?}; it was stopped"
            ))
        })?
        .map_err(|e| LoginError(format!("{program} get failed: {e}")))?;
    if !output.status.success() {
        // The protocol's "not found" is an answer: no credentials for this host.
        let said = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if said.contains("credentials not found") || stderr.contains("credentials not found") {
            return Ok(None);
        }
        let first = stderr
            .lines()
            .chain(said.lines())
            .next()
            .unwrap_or("")
            .trim();
        return Err(LoginError(format!(
            "{program} get failed ({}): {}",
            output.status,
            crate::redact::scrub(first)
        )));
    }
    // Never quote the output: it holds the secret.
    let answer: HelperAnswer = serde_json::from_slice(&output.stdout).map_err(|_| {
        LoginError(format!(
            "{program} get answered something that is not its JSON"
        ))
    })?;
    let expires = answer
        .expires_at
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    Ok(Some((
        Credentials {
            username: answer.username,
            password: Secret::new(answer.secret),
        },
        expires,
    )))
}

/// The `host[:port]` a `config.json` key names (`https://host/v1/` and `host` alike).
fn config_key_host(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

async fn from_docker_config(
    path: &Path,
    host: &str,
) -> Result<Option<(Credentials, Option<SystemTime>)>, LoginError> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoginError(format!(
                "docker config {} does not exist",
                path.display()
            )));
        }
        Err(e) => return Err(LoginError(format!("cannot read {}: {e}", path.display()))),
    };
    let config: DockerConfig = serde_json::from_str(&text)
        .map_err(|e| LoginError(format!("{} is not a docker config: {e}", path.display())))?;
    if let Some(helper) = config
        .cred_helpers
        .iter()
        .find(|(k, _)| config_key_host(k) == host)
        .map(|(_, v)| v)
    {
        return run_helper(helper, host, HELPER_TIMEOUT).await;
    }
    if let Some(store) = &config.creds_store
        && let Some(found) = run_helper(store, host, HELPER_TIMEOUT).await?
    {
        return Ok(Some(found));
    }
    let Some(auth) = config
        .auths
        .iter()
        .find(|(k, _)| config_key_host(k) == host)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let Some(token) = &auth.identitytoken {
        return Ok(Some((
            Credentials {
                username: IDENTITY_TOKEN_USER.into(),
                password: Secret::new(token.as_str()),
            },
            None,
        )));
    }
    use base64::Engine as _;
    let decoded = auth
        .auth
        .as_deref()
        .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            LoginError(format!(
                "the auths entry for {host} in {} is not base64 of user:password",
                path.display()
            ))
        })?;
    let (user, password) = decoded.split_once(':').ok_or_else(|| {
        LoginError(format!(
            "the auths entry for {host} in {} is not user:password",
            path.display()
        ))
    })?;
    Ok(Some((
        Credentials {
            username: user.to_string(),
            password: Secret::new(password),
        },
        None,
    )))
}

/// `Basic <base64(user:password)>`; the encoded value is remembered for scrubbing, since a
/// registry that echoes the header back shows this, not the password.
fn basic_header(c: &Credentials) -> HeaderValue {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        c.username,
        c.password.expose()
    ));
    crate::redact::remember(token.as_str().into());
    let mut v = HeaderValue::from_str(&format!("Basic {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic invalid"));
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_name_hosts_as_docker_writes_them() {
        for key in [
            "r.example.com:5000",
            "https://r.example.com:5000",
            "https://r.example.com:5000/v1/",
        ] {
            assert_eq!(config_key_host(key), "r.example.com:5000");
        }
    }

    #[tokio::test]
    async fn auths_entries_and_identity_tokens_are_read() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("robot:pw-3f1a");
        std::fs::write(
            &path,
            format!(r#"{{"auths": {{"https://a.example.com": {{"auth": "{auth}"}}, "b.example.com": {{"identitytoken": "refresh-77"}}}}}}"#),
        )
        .unwrap();
        let (a, _) = from_docker_config(&path, "a.example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.username.as_str(), a.password.expose()),
            ("robot", "pw-3f1a")
        );
        let (b, _) = from_docker_config(&path, "b.example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.username, IDENTITY_TOKEN_USER);
        assert!(
            from_docker_config(&path, "c.example.com")
                .await
                .unwrap()
                .is_none()
        );
    }

    fn script(dir: &Path, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[tokio::test]
    async fn helpers_are_asked_for_the_host_and_their_output_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let good = script(
            dir.path(),
            "good",
            r#"read host; printf '{"ServerURL":"%s","Username":"u-%s","Secret":"s3cret"}' "$host" "$host""#,
        );
        let (c, _) = run_helper(&good, "r:5000", HELPER_TIMEOUT)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.expose()),
            ("u-r:5000", "s3cret")
        );
        let bad = script(dir.path(), "bad", "echo 'not json: s3cret-in-output'");
        let e = run_helper(&bad, "h", HELPER_TIMEOUT)
            .await
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("not its JSON"), "{e}");
        let none = script(
            dir.path(),
            "none",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        assert!(
            run_helper(&none, "h", HELPER_TIMEOUT)
                .await
                .unwrap()
                .is_none()
        );
        let missing = run_helper("surely-not-installed-xyz", "h", HELPER_TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("docker-credential-surely-not-installed-xyz")
        );
    }

    #[tokio::test]
    async fn a_helper_that_hangs_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let hangs = script(dir.path(), "hangs", "sleep 30");
        let e = run_helper(&hangs, "h", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("was stopped"), "{e}");
    }
}
