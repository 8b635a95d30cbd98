//! Harbor's own REST API (`/api/v2.0`), for what the distribution API does not say: the projects
//! regtee's account can see (Harbor robot accounts may not read the catalog) and a project's
//! repositories. A registry without it answers 404, and callers fall back to the catalog.

use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use serde::Deserialize;

use super::{RegistryClient, RegistryError};

/// An item of a Harbor API list (a project or a repository).
#[derive(Deserialize)]
struct Named {
    name: String,
}

/// Harbor's page size limit.
const PAGE: usize = 100;

/// The most pages one list may take (a million projects or repositories); an API that sends
/// full pages beyond that is looping.
const MAX_PAGES: usize = 10_000;

impl RegistryClient {
    /// A project's repositories from Harbor's REST API, or `None` when this registry has no
    /// such API (plain distribution) so the caller falls back to the catalog.
    pub(crate) async fn harbor_repositories(
        &self,
        project: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        self.harbor_names(
            &format!("/api/v2.0/projects/{project}/repositories"),
            &format!("list Harbor repositories of project {project}"),
        )
        .await
    }

    /// The projects regtee's account can see, from Harbor's REST API; `None` without one.
    pub(crate) async fn harbor_projects(&self) -> Result<Option<Vec<String>>, RegistryError> {
        self.harbor_names("/api/v2.0/projects", "list Harbor projects")
            .await
    }

    /// The `name` of every item of a paginated Harbor API list (Basic auth, as Harbor's API wants).
    async fn harbor_names(
        &self,
        path: &str,
        op: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        let mut names = Vec::new();
        for page in 1..=MAX_PAGES + 1 {
            if page > MAX_PAGES {
                return Err(self.err(
                    op,
                    super::ErrorKind::Protocol(format!(
                        "more than {MAX_PAGES} full pages: the API's pagination does not end"
                    )),
                ));
            }
            let call = self.request(
                Method::GET,
                &format!("{path}?page={page}&page_size={PAGE}"),
                op,
            )?;
            let mut request = http::Request::new(crate::body::empty());
            *request.uri_mut() = call.url;
            request
                .headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            if let Some(login) = self.login(op).await? {
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, login.basic.clone());
            }
            let response = self.send_once(request, op).await?;
            match response.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => return Ok(None),
                _ => return Err(self.error_from(response, op).await),
            }
            // Something that answers 200 with other JSON is not Harbor's API.
            let Ok(batch) = self.read_json::<Vec<Named>>(response, 16 << 20, op).await else {
                return Ok(None);
            };
            let done = batch.len() < PAGE;
            names.extend(batch.into_iter().map(|r| r.name));
            if done {
                break;
            }
        }
        Ok(Some(names))
    }
}
