//! Amazon ECR: repositories through its JSON 1.1 API (`DescribeRepositories`,
//! `CreateRepository`, target prefix `AmazonEC2ContainerRegistry_V20150921`), signed with
//! AWS's own SigV4 signer (`aws-sigv4`). Errors carry `__type`, sometimes with a namespace
//! before a `#`.

use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http::Method;
use serde_json::json;

use super::api::{Answer, ApiClient, ApiError, ApiErrorKind, shown};
use crate::config::{ApiKeys, Provider, Secret};

const TARGET_PREFIX: &str = "AmazonEC2ContainerRegistry_V20150921";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// An ECR region's API.
pub(crate) struct Ecr {
    pub(crate) api: ApiClient,
    pub(crate) region: String,
    pub(crate) registry_id: Option<String>,
    pub(crate) keys: ApiKeys,
    pub(crate) immutable_tags: bool,
    pub(crate) scan_on_push: bool,
}

/// An AWS key, as the chain found it.
struct AwsKey {
    id: Secret,
    secret: Secret,
    session_token: Option<Secret>,
}

/// The usual chain on this host: the environment, then the shared credentials file.
fn chain(env: impl Fn(&str) -> Option<String>) -> Option<AwsKey> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
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

impl Ecr {
    fn key(&self, operation: &str) -> Result<AwsKey, ApiError> {
        match &self.keys {
            ApiKeys::Pair {
                access_key,
                secret_key,
            } => Ok(AwsKey {
                id: access_key.clone(),
                secret: secret_key.clone(),
                session_token: None,
            }),
            _ => chain(|name| std::env::var(name).ok()).ok_or_else(|| {
                ApiError::new(
                    Provider::Ecr,
                    operation,
                    ApiErrorKind::Credentials(
                        "no AWS key: set access_key and secret_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a shared credentials file".into(),
                    ),
                )
            }),
        }
    }

    async fn call(
        &self,
        action: &str,
        operation: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        let payload = body.to_string();
        let key = self.key(operation)?;
        let target = format!("{TARGET_PREFIX}.{action}");
        let host = self.api.host();
        let uri = format!("{}/", self.api.origin);
        let unsigned = [
            ("content-type", CONTENT_TYPE),
            ("host", host.as_str()),
            ("x-amz-target", target.as_str()),
        ];
        let identity = aws_credential_types::Credentials::new(
            key.id.expose(),
            key.secret.expose(),
            key.session_token.as_ref().map(|t| t.expose().to_string()),
            None,
            "regtee",
        )
        .into();
        let signing_failed = |e: &dyn std::fmt::Display| {
            ApiError::new(
                Provider::Ecr,
                operation,
                ApiErrorKind::Protocol(format!("cannot sign: {e}")),
            )
        };
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ecr")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| signing_failed(&e))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            uri.as_str(),
            unsigned.iter().copied(),
            SignableBody::Bytes(payload.as_bytes()),
        )
        .map_err(|e| signing_failed(&e))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| signing_failed(&e))?
            .into_parts();
        let mut headers: Vec<(String, String)> = unsigned
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        headers.extend(
            instructions
                .headers()
                .map(|(n, v)| (n.to_string(), v.to_string())),
        );
        let answer = self
            .api
            .call(operation, Method::POST, "/", &headers, Bytes::from(payload))
            .await?;
        if answer.status.is_success() {
            return Ok(answer.json());
        }
        Err(ApiError::new(Provider::Ecr, operation, error_kind(&answer)))
    }

    /// Whether repository `name` exists.
    pub(crate) async fn repository_exists(&self, name: &str) -> Result<bool, ApiError> {
        let mut body = json!({ "repositoryNames": [name] });
        if let Some(id) = &self.registry_id {
            body["registryId"] = json!(id);
        }
        match self
            .call(
                "DescribeRepositories",
                &format!("DescribeRepositories {name}"),
                body,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(ApiError {
                kind: ApiErrorKind::Rejected(m),
                ..
            }) if m.starts_with("RepositoryNotFoundException") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates repository `name` with the configured tag mutability and scanning.
    pub(crate) async fn create_repository(&self, name: &str) -> Result<(), ApiError> {
        let mut body = json!({
            "repositoryName": name,
            "imageTagMutability": if self.immutable_tags { "IMMUTABLE" } else { "MUTABLE" },
            "imageScanningConfiguration": { "scanOnPush": self.scan_on_push },
        });
        if let Some(id) = &self.registry_id {
            body["registryId"] = json!(id);
        }
        self.call(
            "CreateRepository",
            &format!("CreateRepository {name}"),
            body,
        )
        .await
        .map(drop)
    }

    /// A read-only call that proves the key: one repository of the registry.
    pub(crate) async fn probe(&self) -> Result<(), ApiError> {
        let mut body = json!({ "maxResults": 1 });
        if let Some(id) = &self.registry_id {
            body["registryId"] = json!(id);
        }
        self.call("DescribeRepositories", "DescribeRepositories", body)
            .await
            .map(drop)
    }
}

/// An error answer's kind, from its `__type` (AWS's JSON protocol errors and ECR's own).
fn error_kind(answer: &Answer) -> ApiErrorKind {
    let json = answer.json();
    let kind = json["__type"].as_str().unwrap_or_default();
    let kind = kind.rsplit('#').next().unwrap_or(kind);
    let message = json["message"]
        .as_str()
        .or(json["Message"].as_str())
        .unwrap_or_default();
    let text = shown(&format!("{kind}: {message}"));
    match kind {
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "InvalidClientTokenId" => ApiErrorKind::Credentials(text),
        "AccessDeniedException" => ApiErrorKind::Denied(text),
        "ThrottlingException" | "TooManyRequestsException" => ApiErrorKind::Throttled(text),
        _ if answer.status.is_server_error() => ApiErrorKind::Server(text),
        _ if answer.status == http::StatusCode::FORBIDDEN => ApiErrorKind::Denied(text),
        _ => ApiErrorKind::Rejected(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's worked example of a SigV4 signature ("Create a signed AWS API request": IAM
    /// ListUsers, GET, 20150830T123600Z, key AKIDEXAMPLE) through the signer regtee uses.
    #[test]
    fn the_signer_matches_awss_worked_example() {
        let identity = aws_credential_types::Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "example",
        )
        .into();
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("iam")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let request = SignableRequest::new(
            "GET",
            "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08",
            [(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )]
            .into_iter(),
            SignableBody::Bytes(b""),
        )
        .unwrap();
        let (_, signature) = sign(request, &params).unwrap().into_parts();
        assert_eq!(
            signature,
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn the_chain_reads_the_environment_then_the_named_profile() {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKIAENV".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_string()),
            _ => None,
        };
        assert_eq!(chain(env).unwrap().id.expose(), "AKIAENV");
        let file = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n\n[ci]\naws_access_key_id=AKIACI\naws_secret_access_key=c\naws_session_token = t\n";
        let ci = shared_file_profile(file, "ci").unwrap();
        assert_eq!((ci.id.expose(), ci.secret.expose()), ("AKIACI", "c"));
        assert_eq!(ci.session_token.unwrap().expose(), "t");
        assert!(shared_file_profile(file, "missing").is_none());
    }
}
