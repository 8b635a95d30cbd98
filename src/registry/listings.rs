//! Listings: a repository's tags and the registry's catalog, following `Link` pagination
//! (distribution spec, "Listing tags"; the catalog is distribution's extension).

use http::header::HeaderMap;
use http::{Method, StatusCode, Uri, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Call, ErrorKind, RegistryClient, RegistryError, resolve};

/// The most pages one listing may take: a million tags at distribution's default page size of
/// 100, far beyond any real repository; a registry sending more is looping.
const MAX_PAGES: usize = 10_000;

#[derive(Deserialize)]
struct Catalog {
    #[serde(default)]
    repositories: Vec<String>,
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// The `rel="next"` target of a `Link` header (RFC 8288).
fn next_link(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::LINK)?.to_str().ok()?;
    value.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

impl RegistryClient {
    /// Every tag of a repository (following pagination); empty if the repository is unknown.
    pub async fn tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        let op = format!("list tags of {repository}");
        let first = self.request(
            Method::GET,
            &format!("/v2/{repository}/tags/list?n=1000"),
            &op,
        )?;
        let scope = super::pull_scope(repository);
        let pages: Option<Vec<TagList>> = self.pages(first.url, &scope, 16 << 20, &op).await?;
        Ok(pages
            .unwrap_or_default()
            .into_iter()
            .flat_map(|p| p.tags.unwrap_or_default())
            .collect())
    }

    /// Every repository in the registry's catalog (following pagination).
    pub async fn catalog(&self) -> Result<Vec<String>, RegistryError> {
        let op = "list catalog";
        let first = self.request(Method::GET, "/v2/_catalog?n=1000", op)?;
        let pages: Option<Vec<Catalog>> = self
            .pages(first.url, "registry:catalog:*", 64 << 20, op)
            .await?;
        match pages {
            Some(pages) => Ok(pages.into_iter().flat_map(|p| p.repositories).collect()),
            None => Err(self.err(
                op,
                super::ErrorKind::NotFound {
                    code: None,
                    message: "the registry has no catalog".into(),
                },
            )),
        }
    }

    /// Every page of a listing, each at most `limit` bytes; `None` if the first answers 404.
    /// The next page is followed only on this registry's origin (skopeo does the same), and a
    /// next page seen before, or more than [`MAX_PAGES`], ends the listing with an error.
    async fn pages<T: DeserializeOwned>(
        &self,
        first: Uri,
        scope: &str,
        limit: usize,
        op: &str,
    ) -> Result<Option<Vec<T>>, RegistryError> {
        let mut pages = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = Some(first);
        while let Some(url) = next.take() {
            let refuse = |why: String| self.err(op, ErrorKind::Protocol(why));
            if !self.is_home(&url) {
                return Err(refuse(format!(
                    "the next page is on another origin ({}): not followed",
                    crate::redact::scrub(&url.to_string())
                )));
            }
            if !seen.insert(url.clone()) {
                return Err(refuse(format!(
                    "the next page repeats an earlier one ({}): the registry's pagination loops",
                    crate::redact::scrub(&url.to_string())
                )));
            }
            if pages.len() >= MAX_PAGES {
                return Err(refuse(format!(
                    "more than {MAX_PAGES} pages: the registry's pagination does not end"
                )));
            }
            let call = Call::to(Method::GET, url.clone(), op).scope(scope.to_string());
            let response = self.send(call).await?;
            match response.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND if pages.is_empty() => return Ok(None),
                _ => return Err(self.error_from(response, op).await),
            }
            next = next_link(response.headers()).and_then(|l| resolve(&url, &l));
            pages.push(self.read_json(response, limit, op).await?);
        }
        Ok(Some(pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_is_found() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            r#"</v2/a/tags/list?last=b&n=2>; rel="next""#.parse().unwrap(),
        );
        assert_eq!(next_link(&h).unwrap(), "/v2/a/tags/list?last=b&n=2");
        assert_eq!(next_link(&HeaderMap::new()), None);
    }
}
