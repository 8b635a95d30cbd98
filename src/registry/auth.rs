//! Authentication as registries ask for it: `WWW-Authenticate` challenges, the Docker token
//! protocol (token per scope, cached until shortly before it expires), and Basic.
//!
//! The challenges themselves are read with `crate::challenge`, the parser the proxy's rewriting
//! uses too.

use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Uri};
use serde::Deserialize;

use super::{ErrorKind, MAX_ERROR_BODY, RegistryClient, RegistryError};
use crate::challenge::Challenge;

/// A token service's answer. Registries use `token`, OAuth2 servers `access_token`.
#[derive(Deserialize)]
pub(super) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token, whichever field holds it.
    pub(super) fn token(&self) -> Option<&str> {
        self.token
            .as_deref()
            .or(self.access_token.as_deref())
            .filter(|t| !t.is_empty())
    }

    /// How long the token lives; without `expires_in`, 60 seconds (Docker token authentication
    /// specification, "Token Response Fields").
    pub(super) fn lifetime(&self) -> Duration {
        Duration::from_secs(self.expires_in.unwrap_or(60).max(1))
    }
}

/// How long to use a token that lives `lifetime`: until 10 seconds before it expires, or half
/// its life when it is short (tokens of a few seconds, as some clouds issue), so a token never
/// expires between the check and the registry reading the request.
fn usable_for(lifetime: Duration) -> Duration {
    if lifetime > Duration::from_secs(20) {
        lifetime - Duration::from_secs(10)
    } else {
        lifetime / 2
    }
}

/// The scope to read a repository (Docker token scope grammar: `repository:<name>:<actions>`).
pub(crate) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// The scope to write a repository.
pub(crate) fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// A token for one set of scopes.
pub(super) struct CachedToken {
    token: String,
    expires: Instant,
}

fn bearer_header(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    v.set_sensitive(true);
    v
}

impl RegistryClient {
    pub(super) fn known_challenge(&self) -> Option<Challenge> {
        self.challenge
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The `Authorization` for a request needing `scopes`, per the last challenge seen; a
    /// cached token unless `refresh`.
    pub(super) async fn authorization(
        &self,
        scopes: &[String],
        operation: &str,
        refresh: bool,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let Some(challenge) = self.known_challenge() else {
            return Ok(None);
        };
        if challenge.is_basic() {
            return Ok(self.login(operation).await?.map(|c| c.basic.clone()));
        }
        if !challenge.is_bearer() {
            return Ok(None);
        }
        let key = scopes.join(" ");
        if !refresh
            && let Some(cached) = self.tokens.get(&key)
            && cached.expires > Instant::now()
        {
            return Ok(Some(bearer_header(&cached.token)));
        }
        let token = match self.fetch_token(&challenge, scopes, operation).await {
            // A login from a helper that stopped working (rotated, expired): fetch it again
            // and ask once more.
            Err(e) if matches!(e.kind, ErrorKind::Unauthorized(_)) && self.logins.renewable() => {
                self.logins.forget();
                self.fetch_token(&challenge, scopes, operation).await?
            }
            other => other?,
        };
        let header = bearer_header(&token.token);
        self.tokens.insert(key, token);
        Ok(Some(header))
    }

    /// The actions a token this registry's token service issues regtee for `repository` grants
    /// (its `access` claim, read without verifying: only to tell an operator what regtee's login
    /// may do). `None` where no readable token is issued (Basic auth, opaque tokens). Learns the
    /// challenge first (`GET /v2/`) if no request did yet.
    pub(crate) async fn granted_actions(
        &self,
        repository: &str,
        wanted: &str,
    ) -> Result<Option<Vec<String>>, RegistryError> {
        use base64::Engine as _;
        if self.known_challenge().is_none() {
            self.ping().await?;
        }
        let scope = format!("repository:{repository}:{wanted}");
        let Some(header) = self
            .authorization(&[scope], "GET token (check)", true)
            .await?
        else {
            return Ok(None);
        };
        let claims = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|token| token.split('.').nth(1))
            .and_then(|b| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(b.trim_end_matches('='))
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let Some(claims) = claims else {
            return Ok(None);
        };
        Ok(Some(
            claims["access"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["type"] == "repository" && a["name"] == repository)
                .flat_map(|a| a["actions"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect(),
        ))
    }

    /// Asks the challenge's realm for a token (Docker token authentication specification:
    /// `service`, `account`, one `scope` per scope, Basic credentials; or, for an identity
    /// token, the OAuth2 refresh-token grant of the Docker token spec's "OAuth2" section).
    async fn fetch_token(
        &self,
        challenge: &Challenge,
        scopes: &[String],
        operation: &str,
    ) -> Result<CachedToken, RegistryError> {
        let protocol = |m: String| self.err(operation, ErrorKind::Protocol(m));
        let realm = challenge
            .param("realm")
            .ok_or_else(|| protocol("Bearer challenge without a realm".into()))?;
        let mut url = url::Url::parse(realm)
            .map_err(|_| protocol(format!("token realm `{realm}` is not a URL")))?;
        let login = self.login(operation).await?;
        let identity_token = login
            .as_ref()
            .filter(|c| c.credentials.username == super::login::IDENTITY_TOKEN_USER);
        let mut request = Request::new(crate::body::empty());
        if let Some(c) = identity_token {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", c.credentials.password.expose())
                .append_pair("client_id", "regtee");
            if let Some(service) = challenge.param("service") {
                form.append_pair("service", service);
            }
            if !scopes.is_empty() {
                form.append_pair("scope", &scopes.join(" "));
            }
            *request.method_mut() = http::Method::POST;
            *request.body_mut() = crate::body::full(form.finish());
            request.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
        } else {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            if let Some(c) = &login {
                query.append_pair("account", &c.credentials.username);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
            drop(query);
            if let Some(c) = &login {
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, c.basic.clone());
            }
        }
        *request.uri_mut() = url
            .as_str()
            .parse::<Uri>()
            .map_err(|_| protocol("bad token URL".into()))?;
        let op = format!("{operation} (token)");
        let response = self.send_once(request, &op).await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.err(
                &op,
                ErrorKind::Unauthorized(format!(
                    "the token service rejected the login from {}",
                    self.logins.describe()
                )),
            ));
        }
        if !status.is_success() {
            return Err(self.error_from(response, &op).await);
        }
        let parsed: TokenResponse = self.read_json(response, MAX_ERROR_BODY, &op).await?;
        let token = parsed
            .token()
            .ok_or_else(|| {
                self.err(
                    &op,
                    ErrorKind::Protocol("token response has no token".into()),
                )
            })?
            .to_string();
        // A token from another server is a secret regtee now holds: never show it.
        crate::redact::remember(token.as_str().into());
        Ok(CachedToken {
            token,
            expires: Instant::now() + usable_for(parsed.lifetime()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_renewed_before_they_expire() {
        assert_eq!(
            usable_for(Duration::from_secs(300)),
            Duration::from_secs(290)
        );
        assert_eq!(
            usable_for(Duration::from_secs(3)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            usable_for(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn token_response_accepts_both_fields() {
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(t.token(), Some("abc"));
        assert_eq!(t.lifetime(), Duration::from_secs(60));
        let t: TokenResponse =
            serde_json::from_str(r#"{"token":"t","expires_in":300,"issued_at":"x"}"#).unwrap();
        assert_eq!(t.token(), Some("t"));
        assert_eq!(t.lifetime(), Duration::from_secs(300));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::arbitrary::CASES))]

            #[test]
            fn any_token_response_parses_without_panicking(value in any::<String>()) {
                let _ = serde_json::from_str::<TokenResponse>(&value);
            }
        }
    }
}
