//! Tencent Cloud TCR Enterprise: namespaces through TencentCloud API 3.0 (`tcr`, version
//! 2019-09-24), `DescribeNamespaces` and `CreateNamespace`, signed with TC3-HMAC-SHA256
//! ("Signature v3", Tencent Cloud API documentation). Errors come back with HTTP 200 and
//! `Response.Error.{Code,Message}`.

use bytes::Bytes;
use http::Method;
use serde_json::json;

use super::api::{
    Answer, ApiClient, ApiError, ApiErrorKind, canonical_request, hmac_sha256, sha256_hex, shown,
    unix_seconds,
};
use crate::config::{Provider, Secret};

const SERVICE: &str = "tcr";
const VERSION: &str = "2019-09-24";
const CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// A TCR instance's API.
pub(crate) struct Tcr {
    pub(crate) api: ApiClient,
    pub(crate) region: String,
    pub(crate) instance: String,
    pub(crate) secret_id: Secret,
    pub(crate) secret_key: Secret,
}

/// TC3-HMAC-SHA256 over a canonical request: the key is derived from the secret key, the
/// UTC date and the service (`TC3` + SecretKey, then date, service, `tc3_request`).
pub(crate) fn tc3_signature(
    secret_key: &str,
    timestamp: i64,
    service: &str,
    canonical_request: &str,
) -> (String, String) {
    let date = time::OffsetDateTime::from_unix_timestamp(timestamp)
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN);
    let date = format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
    let scope = format!("{date}/{service}/tc3_request");
    let string_to_sign = format!(
        "TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let key = hmac_sha256(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let key = hmac_sha256(&key, service.as_bytes());
    let key = hmac_sha256(&key, b"tc3_request");
    (
        hex::encode(hmac_sha256(&key, string_to_sign.as_bytes())),
        scope,
    )
}

impl Tcr {
    /// Calls `action` with a JSON body; an answer with `Response.Error` is an error.
    async fn call(
        &self,
        action: &str,
        operation: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        let payload = body.to_string();
        let host = self.api.host();
        let timestamp = unix_seconds();
        let (canonical, signed) = canonical_request(
            "POST",
            "/",
            "",
            &[
                ("content-type", CONTENT_TYPE),
                ("host", &host),
                ("x-tc-action", &action.to_ascii_lowercase()),
            ],
            &sha256_hex(payload.as_bytes()),
        );
        let (signature, scope) =
            tc3_signature(self.secret_key.expose(), timestamp, SERVICE, &canonical);
        let authorization = format!(
            "TC3-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
            self.secret_id.expose()
        );
        let headers = [
            ("Authorization".to_string(), authorization),
            ("Content-Type".to_string(), CONTENT_TYPE.to_string()),
            ("Host".to_string(), host),
            ("X-TC-Action".to_string(), action.to_string()),
            ("X-TC-Version".to_string(), VERSION.to_string()),
            ("X-TC-Timestamp".to_string(), timestamp.to_string()),
            ("X-TC-Region".to_string(), self.region.clone()),
        ];
        let answer = self
            .api
            .call(operation, Method::POST, "/", &headers, Bytes::from(payload))
            .await?;
        self.outcome(operation, answer)
    }

    fn outcome(&self, operation: &str, answer: Answer) -> Result<serde_json::Value, ApiError> {
        let error = |kind| ApiError::new(Provider::Tcr, operation, kind);
        if answer.status.is_server_error() {
            return Err(error(ApiErrorKind::Server(answer.status.to_string())));
        }
        let json = answer.json();
        let Some(response) = json.get("Response") else {
            return Err(error(ApiErrorKind::Protocol(format!(
                "{} without a Response object",
                answer.status
            ))));
        };
        let Some(e) = response.get("Error") else {
            return Ok(response.clone());
        };
        let code = e["Code"].as_str().unwrap_or_default();
        let text = shown(&format!(
            "{code}: {}",
            e["Message"].as_str().unwrap_or_default()
        ));
        // Tencent Cloud API 3.0 common error codes.
        let kind = if code == "AuthFailure.UnauthorizedOperation"
            || code.starts_with("UnauthorizedOperation")
        {
            ApiErrorKind::Denied(text)
        } else if code.starts_with("AuthFailure") {
            ApiErrorKind::Credentials(text)
        } else if code.starts_with("RequestLimitExceeded") {
            ApiErrorKind::Throttled(text)
        } else if code.starts_with("InternalError") {
            ApiErrorKind::Server(text)
        } else {
            ApiErrorKind::Rejected(text)
        };
        Err(error(kind))
    }

    /// Whether namespace `name` exists in the instance.
    pub(crate) async fn namespace_exists(&self, name: &str) -> Result<bool, ApiError> {
        let response = self
            .call(
                "DescribeNamespaces",
                &format!("DescribeNamespaces {name}"),
                json!({"RegistryId": self.instance, "NamespaceName": name, "Limit": 100}),
            )
            .await?;
        // The name filter matches by substring: look for the exact name.
        Ok(response["NamespaceList"]
            .as_array()
            .is_some_and(|list| list.iter().any(|n| n["Name"] == name)))
    }

    /// Creates namespace `name`, private.
    pub(crate) async fn create_namespace(&self, name: &str) -> Result<(), ApiError> {
        self.call(
            "CreateNamespace",
            &format!("CreateNamespace {name}"),
            json!({"RegistryId": self.instance, "NamespaceName": name, "IsPublic": false}),
        )
        .await
        .map(drop)
    }

    /// A read-only call that proves the key pair and the instance id.
    pub(crate) async fn probe(&self) -> Result<(), ApiError> {
        self.call(
            "DescribeNamespaces",
            "DescribeNamespaces",
            json!({"RegistryId": self.instance, "Limit": 1}),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Tencent Cloud's "Signature v3" page (DescribeInstances on CVM at
    /// 1551113065, the masked example keys as printed there, signed headers content-type and
    /// host): hashed payload, hashed canonical request and signature as the page gives them.
    #[test]
    fn matches_tencent_clouds_worked_example() {
        let payload = r#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        let payload_hash = sha256_hex(payload.as_bytes());
        assert_eq!(
            payload_hash,
            "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
        );
        let (canonical, signed) = canonical_request(
            "POST",
            "/",
            "",
            &[
                ("Host", "cvm.tencentcloudapi.com"),
                ("Content-Type", "application/json; charset=utf-8"),
            ],
            &payload_hash,
        );
        assert_eq!(signed, "content-type;host");
        assert_eq!(
            sha256_hex(canonical.as_bytes()),
            "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
        );
        let (signature, scope) = tc3_signature(
            "Gu5t9xGARNpq86cd98joQYCN3*******",
            1551113065,
            "cvm",
            &canonical,
        );
        assert_eq!(scope, "2019-02-25/cvm/tc3_request");
        assert_eq!(
            signature,
            "2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"
        );
    }
}
