//! Authentication as registries ask for it: `WWW-Authenticate` challenges, the Docker token
//! protocol (token per scope, cached until shortly before it expires), and Basic.
//!
//! The proxy rewrites challenges (so clients fetch tokens through regtee) and the registry client
//! answers them (to push to targets); both read and write challenges with this one parser.

use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Uri};
use serde::Deserialize;

use super::{ErrorKind, MAX_ERROR_BODY, RegistryClient, RegistryError};
use crate::config::Credentials;

/// One `WWW-Authenticate` challenge: a scheme and its parameters, order preserved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `Bearer` or `Basic` (as sent; compare case-insensitively).
    pub scheme: String,
    /// `realm`, `service`, `scope`, `error`, ... in the order received.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses a header value holding one challenge, e.g.
    /// `Bearer realm="https://h/service/token",service="harbor-registry",scope="repository:a:pull"`.
    pub fn parse(value: &str) -> Option<Challenge> {
        let value = value.trim();
        let (scheme, rest) = match value.find(char::is_whitespace) {
            Some(i) => (&value[..i], value[i..].trim_start()),
            None => (value, ""),
        };
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return None;
        }
        let mut params = Vec::new();
        let mut chars = rest.chars().peekable();
        loop {
            while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
                chars.next();
            }
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' || c.is_whitespace() || c == ',' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if key.is_empty() {
                break;
            }
            while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() != Some(&'=') {
                return None;
            }
            chars.next();
            while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
                chars.next();
            }
            let mut val = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => val.extend(chars.next()),
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => val.push(c),
                    }
                }
                if !closed {
                    return None;
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' || c.is_whitespace() {
                        break;
                    }
                    val.push(c);
                    chars.next();
                }
            }
            params.push((key.to_ascii_lowercase(), val));
        }
        Some(Challenge {
            scheme: scheme.to_string(),
            params,
        })
    }

    /// A parameter's value.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces (or adds) a parameter, keeping its position.
    pub fn set_param(&mut self, key: &str, value: String) {
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
    }

    /// Whether this is a Bearer (token) challenge.
    pub fn is_bearer(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("bearer")
    }

    /// Whether this is a Basic challenge.
    pub fn is_basic(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("basic")
    }

    /// The header value, parameters quoted.
    pub fn to_header_value(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        if params.is_empty() {
            self.scheme.clone()
        } else {
            format!("{} {}", self.scheme, params.join(","))
        }
    }
}

/// A token service's answer. Registries use `token`, OAuth2 servers `access_token`.
#[derive(Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token, whichever field holds it.
    pub fn token(&self) -> Option<&str> {
        self.token
            .as_deref()
            .or(self.access_token.as_deref())
            .filter(|t| !t.is_empty())
    }

    /// How long the token lives; without `expires_in`, 60 seconds (Docker token authentication
    /// specification, "Token Response Fields").
    pub fn lifetime(&self) -> Duration {
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
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// The scope to write a repository.
pub fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// A token for one set of scopes.
pub(super) struct CachedToken {
    token: String,
    expires: Instant,
}

/// `Basic <base64(user:password)>`; the encoded value is remembered for scrubbing, since a
/// registry that echoes the header back shows this, not the password.
pub(super) fn basic_header(c: &Credentials) -> HeaderValue {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        c.username,
        c.password.expose()
    ));
    crate::redact::remember(token.as_str().into());
    let mut v = HeaderValue::from_str(&format!("Basic {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic invalid"));
    v.set_sensitive(true);
    v
}

fn bearer_header(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    v.set_sensitive(true);
    v
}

impl RegistryClient {
    fn known_challenge(&self) -> Option<Challenge> {
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
    fn parses_a_harbor_challenge_and_round_trips() {
        let v = r#"Bearer realm="https://harbor.example.com/service/token",service="harbor-registry",scope="repository:library/nginx:pull,push""#;
        let c = Challenge::parse(v).unwrap();
        assert!(c.is_bearer());
        assert_eq!(
            c.param("realm"),
            Some("https://harbor.example.com/service/token")
        );
        assert_eq!(c.param("scope"), Some("repository:library/nginx:pull,push"));
        assert_eq!(c.to_header_value(), v);
    }

    #[test]
    fn tolerates_spaces_unquoted_values_and_escapes() {
        let c = Challenge::parse(r#"Basic realm = "a \"b\", c" , charset=UTF-8"#).unwrap();
        assert!(c.is_basic());
        assert_eq!(c.param("realm"), Some(r#"a "b", c"#));
        assert_eq!(c.param("charset"), Some("UTF-8"));
        assert_eq!(Challenge::parse("Bearer").unwrap().params.len(), 0);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Challenge::parse(""), None);
        assert_eq!(Challenge::parse(r#"Bearer realm="unterminated"#), None);
        assert_eq!(Challenge::parse("Bearer realm"), None);
    }

    #[test]
    fn set_param_keeps_order() {
        let mut c = Challenge::parse(r#"Bearer realm="x",service="s""#).unwrap();
        c.set_param("realm", "y".into());
        assert_eq!(c.to_header_value(), r#"Bearer realm="y",service="s""#);
    }

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

            /// A challenge that parses survives its own rendering.
            #[test]
            fn challenges_round_trip_or_are_refused(value in "[A-Za-z]{0,7}( [a-z]{1,6}=(\"[^\"\\\\]{0,12}\"|[a-z0-9]{0,6}),?){0,4}") {
                if let Some(c) = Challenge::parse(&value) {
                    let again = Challenge::parse(&c.to_header_value());
                    prop_assert_eq!(again, Some(c));
                }
            }

            #[test]
            fn any_text_parses_without_panicking(value in any::<String>()) {
                let _ = Challenge::parse(&value);
                let _ = serde_json::from_str::<TokenResponse>(&value);
            }
        }
    }
}
