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
use super::aws_credentials::AwsKey;
use crate::config::{ApiKeys, Provider};

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
    /// Where a key comes from when the config gives none.
    pub(crate) chain: super::aws_credentials::Chain,
}

impl Ecr {
    async fn key(&self, operation: &str) -> Result<AwsKey, ApiError> {
        match &self.keys {
            ApiKeys::Pair {
                access_key,
                secret_key,
            } => Ok(AwsKey {
                id: access_key.clone(),
                secret: secret_key.clone(),
                session_token: None,
            }),
            _ => self.chain.key().await.map_err(|why| {
                ApiError::new(Provider::Ecr, operation, ApiErrorKind::Credentials(why))
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
        let key = self.key(operation).await?;
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
}
