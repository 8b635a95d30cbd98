//! AWS's usual credential chain on this host, in the order AWS's SDKs follow: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the shared credentials
//! file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, profile `AWS_PROFILE`), the
//! container endpoint (ECS and EKS Pod Identity: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or
//! `_FULL_URI` with `AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)`), then the EC2 instance role
//! through IMDSv2 (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, `AWS_EC2_METADATA_DISABLED`). Keys from
//! an endpoint are kept until five minutes before they expire.

use std::time::Duration;

use bytes::Bytes;
use http::Method;

use crate::config::Secret;
use crate::http_client::HttpClient;

/// The ECS agent's credentials host, for a relative URI.
const ECS_HOST: &str = "http://169.254.170.2";
/// The instance metadata service.
const IMDS: &str = "http://169.254.169.254";
/// How long an endpoint on this host may take.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(5);

/// An AWS key.
#[derive(Clone)]
pub(crate) struct AwsKey {
    pub(crate) id: Secret,
    pub(crate) secret: Secret,
    pub(crate) session_token: Option<Secret>,
}

/// The chain, with what an endpoint last gave.
pub(crate) struct Chain {
    env: fn(&str) -> Option<String>,
    cached: tokio::sync::Mutex<Option<(AwsKey, std::time::SystemTime)>>,
}

impl Default for Chain {
    fn default() -> Chain {
        Chain {
            env: |name| std::env::var(name).ok(),
            cached: tokio::sync::Mutex::new(None),
        }
    }
}

impl Chain {
    fn var(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    /// A key, or why there is none (no secret in the reason).
    pub(crate) async fn key(&self) -> Result<AwsKey, String> {
        if let Some(key) = from_env_or_file(|name| self.var(name)) {
            return Ok(key);
        }
        let mut cached = self.cached.lock().await;
        if let Some((key, expires)) = cached.as_ref()
            && std::time::SystemTime::now() + Duration::from_secs(300) < *expires
        {
            return Ok(key.clone());
        }
        let client = crate::http_client::build(
            &crate::tls::ClientTls::default(),
            Duration::from_secs(1),
            Duration::from_secs(5),
            ENDPOINT_TIMEOUT,
        )
        .map_err(|e| e.to_string())?;
        let fetched = match self.container_endpoint()? {
            Some((uri, token)) => container(&client, &uri, token.as_deref()).await,
            None if self.var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) => {
                Err("no AWS key: none in the config, the environment or the shared credentials file, and AWS_EC2_METADATA_DISABLED is set".into())
            }
            None => {
                let endpoint = self
                    .var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                    .unwrap_or_else(|| IMDS.to_string());
                instance_role(&client, endpoint.trim_end_matches('/')).await
            }
        }?;
        *cached = Some(fetched.clone());
        Ok(fetched.0)
    }

    /// The container credentials endpoint and its authorization token, if this is a container.
    fn container_endpoint(&self) -> Result<Option<(String, Option<String>)>, String> {
        let token = match self.var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            Some(file) => Some(
                std::fs::read_to_string(&file)
                    .map_err(|e| {
                        format!("cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: {e}")
                    })?
                    .trim()
                    .to_string(),
            ),
            None => self.var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        };
        if let Some(relative) = self.var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            return Ok(Some((format!("{ECS_HOST}{relative}"), token)));
        }
        let Some(full) = self.var("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
            return Ok(None);
        };
        // As AWS's SDKs: plain HTTP only to this host or the ECS and EKS agents' addresses.
        let uri: http::Uri = full
            .parse()
            .map_err(|_| "AWS_CONTAINER_CREDENTIALS_FULL_URI is not a URL".to_string())?;
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"].contains(&host);
        if uri.scheme_str() != Some("https") && !local {
            return Err(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI must be HTTPS unless it is this host or the ECS/EKS agent"
                    .into(),
            );
        }
        Ok(Some((full, token)))
    }
}

/// The environment, then the shared credentials file.
pub(crate) fn from_env_or_file(var: impl Fn(&str) -> Option<String>) -> Option<AwsKey> {
    if let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        return Some(AwsKey {
            id: Secret::new(id),
            secret: Secret::new(secret),
            session_token: var("AWS_SESSION_TOKEN").map(Secret::new),
        });
    }
    let file = var("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| var("HOME").map(|h| std::path::Path::new(&h).join(".aws/credentials")))?;
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
    shared_file_profile(&std::fs::read_to_string(file).ok()?, &profile)
}

/// One profile of an INI-style shared credentials file.
fn shared_file_profile(text: &str, profile: &str) -> Option<AwsKey> {
    let (mut id, mut secret, mut token, mut inside) = (None, None, None, false);
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == profile;
        } else if inside && let Some((key, value)) = line.split_once('=') {
            let value = Some(value.trim().to_string());
            match key.trim() {
                "aws_access_key_id" => id = value,
                "aws_secret_access_key" => secret = value,
                "aws_session_token" => token = value,
                _ => {}
            }
        }
    }
    Some(AwsKey {
        id: Secret::new(id?),
        secret: Secret::new(secret?),
        session_token: token.map(Secret::new),
    })
}

/// One small request to an endpoint on this host; its body, when it answers 2xx.
async fn fetch(
    client: &HttpClient,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<Bytes, String> {
    let mut request = http::Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let request = request
        .body(crate::body::empty())
        .map_err(|e| format!("{uri}: {e}"))?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = crate::body::read_limited(response.into_body(), 64 * 1024)
            .await
            .map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        Ok(body)
    };
    tokio::time::timeout(ENDPOINT_TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{}: {e}", super::api::shown(uri)))
}

/// `{AccessKeyId, SecretAccessKey, Token, Expiration}`, as both endpoints answer.
fn parse_key(body: &[u8]) -> Result<(AwsKey, std::time::SystemTime), String> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "credentials that are not JSON".to_string())?;
    let field = |name: &str| {
        json[name]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let (Some(id), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("credentials without AccessKeyId and SecretAccessKey".into());
    };
    let expires = field("Expiration")
        .and_then(|e| {
            time::OffsetDateTime::parse(&e, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64))
        .unwrap_or_else(|| std::time::SystemTime::now() + Duration::from_secs(900));
    Ok((
        AwsKey {
            id: Secret::new(id),
            secret: Secret::new(secret),
            session_token: field("Token").map(Secret::new),
        },
        expires,
    ))
}

async fn container(
    client: &HttpClient,
    uri: &str,
    token: Option<&str>,
) -> Result<(AwsKey, std::time::SystemTime), String> {
    let headers: Vec<(&str, &str)> = token.map(|t| ("authorization", t)).into_iter().collect();
    let body = fetch(client, Method::GET, uri, &headers)
        .await
        .map_err(|e| format!("no AWS key from the container endpoint: {e}"))?;
    parse_key(&body)
}

/// IMDSv2: a session token (PUT), the role's name, then the role's key.
async fn instance_role(
    client: &HttpClient,
    endpoint: &str,
) -> Result<(AwsKey, std::time::SystemTime), String> {
    let failed = |e: String| {
        format!(
            "no AWS key in the config, the environment or ~/.aws/credentials, and none from the instance metadata service: {e}"
        )
    };
    let token = fetch(
        client,
        Method::PUT,
        &format!("{endpoint}/latest/api/token"),
        &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )
    .await
    .map_err(failed)?;
    let token = String::from_utf8_lossy(&token).trim().to_string();
    let session = [("x-aws-ec2-metadata-token", token.as_str())];
    let roles = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let role = fetch(client, Method::GET, &roles, &session)
        .await
        .map_err(failed)?;
    let role = String::from_utf8_lossy(&role)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    if role.is_empty()
        || !role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
    {
        return Err(failed("the instance has no usable IAM role".into()));
    }
    let body = fetch(client, Method::GET, &format!("{roles}{role}"), &session)
        .await
        .map_err(failed)?;
    parse_key(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_comes_before_the_named_profile() {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKIAENV".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_string()),
            _ => None,
        };
        assert_eq!(from_env_or_file(env).unwrap().id.expose(), "AKIAENV");
        let file = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n\n[ci]\naws_access_key_id=AKIACI\naws_secret_access_key=c\naws_session_token = t\n";
        let ci = shared_file_profile(file, "ci").unwrap();
        assert_eq!((ci.id.expose(), ci.secret.expose()), ("AKIACI", "c"));
        assert_eq!(ci.session_token.unwrap().expose(), "t");
        assert!(shared_file_profile(file, "missing").is_none());
    }

    #[test]
    fn a_full_container_uri_on_another_host_must_be_https() {
        let chain = |uri: &'static str| Chain {
            env: match uri {
                "remote" => |n| {
                    (n == "AWS_CONTAINER_CREDENTIALS_FULL_URI")
                        .then(|| "http://example.com/creds".into())
                },
                _ => |n| {
                    (n == "AWS_CONTAINER_CREDENTIALS_FULL_URI")
                        .then(|| "http://127.0.0.1:9911/creds".into())
                },
            },
            cached: Default::default(),
        };
        assert!(chain("remote").container_endpoint().is_err());
        assert_eq!(
            chain("local").container_endpoint().unwrap().unwrap().0,
            "http://127.0.0.1:9911/creds"
        );
    }

    #[test]
    fn endpoint_keys_carry_their_session_token_and_expiry() {
        let (key, expires) = parse_key(
            br#"{"Code":"Success","AccessKeyId":"ASIAROLE","SecretAccessKey":"s","Token":"tok","Expiration":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(key.session_token.unwrap().expose(), "tok");
        assert_eq!(
            expires,
            std::time::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
        );
        assert!(parse_key(b"{}").is_err());
    }
}
