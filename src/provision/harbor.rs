//! Harbor as a target: projects through its REST API v2.0 (`HEAD /projects?project_name=`,
//! `POST /projects`), with the target's own login as Basic credentials, on the target's own
//! origin unless `api_url` names another.

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, StatusCode};

use super::api::{Answer, ApiClient, ApiError, ApiErrorKind, shown};
use crate::config::{Credentials, Provider};

/// A Harbor's API.
pub(crate) struct Harbor {
    pub(crate) api: ApiClient,
    pub(crate) login: Credentials,
}

/// What `regtee check` learns: whether this login may create projects.
pub(crate) struct CreationRights {
    pub(crate) admin: bool,
    /// `project_creation_restriction`: `everyone` or `adminonly`.
    pub(crate) restriction: String,
}

impl Harbor {
    async fn call(
        &self,
        operation: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Answer, ApiError> {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.login.username,
            self.login.password.expose()
        ));
        let mut headers = vec![
            ("Authorization".to_string(), format!("Basic {basic}")),
            ("Accept".to_string(), "application/json".to_string()),
        ];
        let body = match body {
            Some(b) => {
                headers.push(("Content-Type".to_string(), "application/json".to_string()));
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        self.api.call(operation, method, path, &headers, body).await
    }

    fn error(operation: &str, answer: &Answer) -> ApiError {
        let json = answer.json();
        let message = json["errors"][0]["message"].as_str().unwrap_or_default();
        let text = shown(&format!("{} {message}", answer.status.as_u16()));
        ApiError::new(
            Provider::Harbor,
            operation,
            ApiErrorKind::of_status(answer.status, text),
        )
    }

    /// Whether project `name` exists.
    pub(crate) async fn project_exists(&self, name: &str) -> Result<bool, ApiError> {
        let operation = format!("HEAD project {name}");
        let answer = self
            .call(
                &operation,
                Method::HEAD,
                &format!("/api/v2.0/projects?project_name={name}"),
                None,
            )
            .await?;
        match answer.status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Harbor::error(&operation, &answer)),
        }
    }

    /// Creates project `name`, private.
    pub(crate) async fn create_project(&self, name: &str) -> Result<(), ApiError> {
        let operation = format!("create project {name}");
        let answer = self
            .call(
                &operation,
                Method::POST,
                "/api/v2.0/projects",
                Some(serde_json::json!({"project_name": name, "metadata": {"public": "false"}})),
            )
            .await?;
        match answer.status {
            s if s.is_success() => Ok(()),
            _ => Err(Harbor::error(&operation, &answer)),
        }
    }

    /// Whether this login may create projects: a system admin may, anyone may when Harbor's
    /// `project_creation_restriction` is `everyone`.
    pub(crate) async fn rights(&self) -> Result<CreationRights, ApiError> {
        let me = self
            .call("current user", Method::GET, "/api/v2.0/users/current", None)
            .await?;
        if !me.status.is_success() {
            return Err(Harbor::error("current user", &me));
        }
        let info = self
            .call("system info", Method::GET, "/api/v2.0/systeminfo", None)
            .await?;
        if !info.status.is_success() {
            return Err(Harbor::error("system info", &info));
        }
        Ok(CreationRights {
            admin: me.json()["sysadmin_flag"] == true,
            restriction: info.json()["project_creation_restriction"]
                .as_str()
                .map(shown)
                .unwrap_or_default(),
        })
    }
}
