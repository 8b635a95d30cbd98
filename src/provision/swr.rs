//! Huawei Cloud SWR: organizations (namespaces) through SWR's API v2
//! (`/v2/manage/namespaces`), signed with SDK-HMAC-SHA256 (Huawei Cloud "API Signing Guide":
//! the SigV4-like canonical request, a path that ends in `/`, `X-Sdk-Date`, and the secret key
//! itself as the HMAC key).

use bytes::Bytes;
use http::{Method, StatusCode};

use super::api::{
    Answer, ApiClient, ApiError, ApiErrorKind, canonical_request, hmac_sha256, sha256_hex, shown,
};
use crate::config::{Provider, Secret};

const CONTENT_TYPE: &str = "application/json;charset=utf-8";

/// An SWR region's API.
pub(crate) struct Swr {
    pub(crate) api: ApiClient,
    pub(crate) project_id: Option<String>,
    pub(crate) access_key: Secret,
    pub(crate) secret_key: Secret,
}

/// `SDK-HMAC-SHA256`, the `X-Sdk-Date` and the hash of the canonical request.
pub(crate) fn string_to_sign(canonical_request: &str, sdk_date: &str) -> String {
    format!(
        "SDK-HMAC-SHA256\n{sdk_date}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The signature: lowercase hex of HMAC-SHA256 keyed with the secret key.
pub(crate) fn signature(secret_key: &str, string_to_sign: &str) -> String {
    hex::encode(hmac_sha256(
        secret_key.as_bytes(),
        string_to_sign.as_bytes(),
    ))
}

/// `YYYYMMDDTHHMMSSZ`, UTC.
fn sdk_date(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

impl Swr {
    async fn call(
        &self,
        operation: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Answer, ApiError> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let host = self.api.host();
        let date = sdk_date(super::api::unix_seconds());
        let mut signed_headers = vec![
            ("content-type", CONTENT_TYPE),
            ("host", host.as_str()),
            ("x-sdk-date", date.as_str()),
        ];
        if let Some(project) = &self.project_id {
            signed_headers.push(("x-project-id", project.as_str()));
        }
        // The guide's canonical URI always ends with `/`.
        let canonical_path = format!("{}/", path.trim_end_matches('/'));
        let (canonical, signed) = canonical_request(
            method.as_str(),
            &canonical_path,
            "",
            &signed_headers,
            &sha256_hex(payload.as_bytes()),
        );
        let signature = signature(self.secret_key.expose(), &string_to_sign(&canonical, &date));
        let mut headers = vec![(
            "Authorization".to_string(),
            format!(
                "SDK-HMAC-SHA256 Access={}, SignedHeaders={signed}, Signature={signature}",
                self.access_key.expose()
            ),
        )];
        headers.extend(
            signed_headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string())),
        );
        self.api
            .call(operation, method, path, &headers, Bytes::from(payload))
            .await
    }

    fn error(operation: &str, answer: &Answer) -> ApiError {
        let json = answer.json();
        // SWR answers `errorCode`/`errorMessage`; the API gateway in front `error_code`/`error_msg`.
        let code = json["errorCode"]
            .as_str()
            .or(json["error_code"].as_str())
            .unwrap_or_default();
        let message = json["errorMessage"]
            .as_str()
            .or(json["error_msg"].as_str())
            .unwrap_or_default();
        let text = shown(&format!("{} {code}: {message}", answer.status.as_u16()));
        ApiError::new(
            Provider::Swr,
            operation,
            ApiErrorKind::of_status(answer.status, text),
        )
    }

    /// Whether organization `name` exists.
    pub(crate) async fn namespace_exists(&self, name: &str) -> Result<bool, ApiError> {
        let operation = format!("show namespace {name}");
        let answer = self
            .call(
                &operation,
                Method::GET,
                &format!("/v2/manage/namespaces/{name}"),
                None,
            )
            .await?;
        match answer.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Swr::error(&operation, &answer)),
        }
    }

    /// Creates organization `name`.
    pub(crate) async fn create_namespace(&self, name: &str) -> Result<(), ApiError> {
        let operation = format!("create namespace {name}");
        let answer = self
            .call(
                &operation,
                Method::POST,
                "/v2/manage/namespaces",
                Some(serde_json::json!({ "namespace": name })),
            )
            .await?;
        match answer.status {
            s if s.is_success() => Ok(()),
            _ => Err(Swr::error(&operation, &answer)),
        }
    }

    /// A read-only call that proves the key pair: the list of organizations.
    pub(crate) async fn probe(&self) -> Result<(), ApiError> {
        let operation = "list namespaces";
        let answer = self
            .call(operation, Method::GET, "/v2/manage/namespaces", None)
            .await?;
        match answer.status {
            s if s.is_success() => Ok(()),
            _ => Err(Swr::error(operation, &answer)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Huawei's own APIG signer tests (`test_CanonicalRequest`,
    /// `test_StringToSign`, `test_SignStringToSign` in its Python SDK).
    #[test]
    fn matches_huaweis_signer_vectors() {
        let (canonical, signed) = canonical_request(
            "POST",
            "/app1/",
            "a=1",
            &[("x-stage", "RELEASE")],
            &sha256_hex(b"body"),
        );
        assert_eq!(signed, "x-stage");
        assert_eq!(
            canonical,
            "POST\n/app1/\na=1\nx-stage:RELEASE\n\nx-stage\n230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5"
        );
        // The test's canonical request is an indented string literal, indentation included.
        let indent = " ".repeat(12);
        let lines = [
            "/app1%3Fa%3D1/",
            "a=1",
            "host:30030113-3657-4fb6-a7ef-90764239b038.apigw.cn-north-1.huaweicloud.com",
            "x-sdk-date:20240326T030801Z",
            "x-stage:RELEASE",
            "",
            "host;x-sdk-date;x-stage",
            "230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5",
        ];
        let literal = std::iter::once("POST".to_string())
            .chain(lines.iter().map(|l| format!("{indent}{l}")))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            string_to_sign(&literal, "20240326T030801Z"),
            "SDK-HMAC-SHA256\n20240326T030801Z\n5847720941657701137ad8098b63585092cea7d982e14b2efd0a668460f2da2a"
        );
        assert_eq!(
            signature("abc", "abc"),
            "2f02e24ae2e1fe880399f27600afa88364e6062bf9bbe114b32fa8f23d03608a"
        );
        assert_eq!(sdk_date(1711422481), "20240326T030801Z");
    }
}
