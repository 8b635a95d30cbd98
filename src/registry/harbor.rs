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

/// An artifact of Harbor's artifact list: its digest and its tags (`with_tag=true`).
#[derive(Deserialize)]
struct Artifact {
    digest: String,
    #[serde(default)]
    tags: Option<Vec<Named>>,
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

    /// Every tag of `repository` with its digest, from Harbor's artifact list (a page of 100
    /// artifacts per request, where the registry API needs a HEAD per tag), or `None` when
    /// this registry has no such API. Harbor wants the repository's name within the project
    /// URL-encoded twice ("a/b" as `a%252Fb`, Harbor API v2.0 reference).
    pub(crate) async fn harbor_tag_digests(
        &self,
        repository: &str,
    ) -> Result<Option<Vec<(String, String)>>, RegistryError> {
        let Some((project, name)) = repository.split_once('/') else {
            return Ok(None);
        };
        let twice = name.replace('/', "%252F");
        let artifacts: Option<Vec<Artifact>> = self
            .harbor_pages(
                &format!("/api/v2.0/projects/{project}/repositories/{twice}/artifacts"),
                "with_tag=true&with_label=false&with_scan_overview=false&with_signature=false&with_immutable_status=false&",
                &format!("list Harbor artifacts of {repository}"),
            )
            .await?;
        Ok(artifacts.map(|artifacts| {
            artifacts
                .into_iter()
                .flat_map(|a| {
                    let digest = a.digest;
                    a.tags
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |t| (t.name, digest.clone()))
                })
                .collect()
        }))
    }

    /// The `name` of every item of a paginated Harbor API list (Basic auth, as Harbor's API wants).
    async fn harbor_names(
        &self,
        path: &str,
        op: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        let items: Option<Vec<Named>> = self.harbor_pages(path, "", op).await?;
        Ok(items.map(|items| items.into_iter().map(|n| n.name).collect()))
    }

    /// Every item of a paginated Harbor API list; `None` when the registry has no such API.
    async fn harbor_pages<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &str,
        op: &str,
    ) -> Result<Option<Vec<T>>, RegistryError> {
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
                &format!("{path}?{query}page={page}&page_size={PAGE}"),
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
            let Ok(batch) = self.read_json::<Vec<T>>(response, 16 << 20, op).await else {
                return Ok(None);
            };
            let done = batch.len() < PAGE;
            names.extend(batch);
            if done {
                break;
            }
        }
        Ok(Some(names))
    }
}
