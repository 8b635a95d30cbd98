//! A client's Bearer token, checked the way Harbor's registry checks it (distribution's
//! `registry/auth/token`): the signature, by a key the registry trusts; the issuer; the audience
//! (the registry's `service`); expiry and not-before, with distribution's leeway; and the
//! action asked for on the repository.
//!
//! The signing key is found as distribution finds it: from the `x5c` chain in the token's header,
//! which must end in a certificate of the trusted bundle (the test harness's issuer, and other
//! token services, sign so), or by the `kid` header, a libtrust key id, matched against the keys
//! of the bundle's certificates (Harbor's token service signs with the key of `root.crt` and
//! says which by `kid`). ES256/384 and RS256/384/512 are accepted, as distribution does.
//!
//! Used where regtee must decide without Harbor: reads served while Harbor cannot answer.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde::Deserialize;
use x509_parser::prelude::{FromDer, X509Certificate};

/// distribution's `token.Leeway`: clocks of the token service and the registry may differ.
const LEEWAY: Duration = Duration::from_secs(60);

/// Why the trusted certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenTrustError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It holds no certificate regtee can read.
    #[error(
        "{path}: no PEM certificate in it (give Harbor's root.crt, the registry's rootcertbundle)"
    )]
    Empty {
        /// The file.
        path: String,
    },
}

/// A certificate of the trusted bundle: its DER and its key's libtrust id.
struct Trusted {
    der: Vec<u8>,
    key_id: String,
}

/// What the registry trusts tokens from, and what they must say.
pub(crate) struct TokenTrust {
    trusted: Vec<Trusted>,
    issuer: String,
    service: String,
}

/// What a token says of one action on one repository.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It grants it, until this time.
    Grants { until: SystemTime },
    /// A valid token, without that action on that repository.
    Denies,
    /// No token, or one the registry would not accept (bad signature, untrusted key, another
    /// issuer or audience, expired): the client must log in again.
    Invalid(String),
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    x5c: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    aud: Audience,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(default)]
    access: Vec<Access>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

impl Audience {
    fn names(&self, service: &str) -> bool {
        match self {
            Audience::One(a) => a == service,
            Audience::Many(all) => all.iter().any(|a| a == service),
            Audience::None => false,
        }
    }
}

#[derive(Deserialize)]
struct Access {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    actions: Vec<String>,
}

/// libtrust's key id: the SHA-256 of the public key's DER (SubjectPublicKeyInfo), its first 240
/// bits in base32, in twelve groups of four separated by `:`.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(spki_der);
    let encoded = data_encoding::BASE32.encode(&hash[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn algorithm(alg: &str) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        "ES256" => &signature::ECDSA_P256_SHA256_FIXED,
        "ES384" => &signature::ECDSA_P384_SHA384_FIXED,
        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
        "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
        _ => return None,
    })
}

fn b64url(part: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| "a token part is not base64url".to_string())
}

fn seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TokenTrust {
    /// The certificates in `path` (PEM), and the issuer and audience tokens must name.
    pub(crate) fn load(
        path: &Path,
        issuer: &str,
        service: &str,
    ) -> Result<TokenTrust, TokenTrustError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TokenTrustError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut trusted = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(&pem).flatten() {
            if block.label != "CERTIFICATE" {
                continue;
            }
            let Ok((_, cert)) = X509Certificate::from_der(&block.contents) else {
                continue;
            };
            trusted.push(Trusted {
                key_id: libtrust_key_id(cert.public_key().raw),
                der: block.contents.clone(),
            });
        }
        if trusted.is_empty() {
            return Err(TokenTrustError::Empty { path: shown });
        }
        Ok(TokenTrust {
            trusted,
            issuer: issuer.to_string(),
            service: service.to_string(),
        })
    }

    /// What the `Authorization` value says of `action` on `repository` at `now`.
    pub(crate) fn check(
        &self,
        authorization: Option<&str>,
        repository: &str,
        action: &str,
        now: SystemTime,
    ) -> Verdict {
        self.check_access(authorization, "repository", repository, action, now)
    }

    /// What the `Authorization` value says of `action` on the resource `kind`/`name` at `now`
    /// (`repository`/`library/app`, or `registry`/`catalog` for the catalog).
    pub(crate) fn check_access(
        &self,
        authorization: Option<&str>,
        kind: &str,
        name: &str,
        action: &str,
        now: SystemTime,
    ) -> Verdict {
        let Some(token) = bearer(authorization) else {
            return Verdict::Invalid("no Bearer token".into());
        };
        let claims = match self.verified_claims(token, now) {
            Ok(c) => c,
            Err(why) => return Verdict::Invalid(why),
        };
        let granted = claims.access.iter().any(|a| {
            a.kind == kind && a.name == name && a.actions.iter().any(|x| x == action || x == "*")
        });
        if !granted {
            return Verdict::Denies;
        }
        let until = claims
            .exp
            .map_or(now, |exp| UNIX_EPOCH + Duration::from_secs(exp));
        Verdict::Grants { until }
    }

    /// Whether the registry would accept the `Authorization` value at all, as for `GET /v2/`,
    /// which needs a valid token and no particular access (distribution's token
    /// `accessController.Authorized` with no access items).
    pub(crate) fn accepts(&self, authorization: Option<&str>, now: SystemTime) -> bool {
        bearer(authorization).is_some_and(|token| self.verified_claims(token, now).is_ok())
    }

    /// The claims of a token whose signature, issuer, audience and times hold.
    fn verified_claims(&self, token: &str, now: SystemTime) -> Result<Claims, String> {
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let header: Header =
            serde_json::from_slice(&b64url(head)?).map_err(|_| "a JWT header that is not JSON")?;
        let algorithm = algorithm(&header.alg)
            .ok_or_else(|| format!("signing algorithm {} is not accepted", header.alg))?;
        let key = self.signing_key(&header, now)?;
        UnparsedPublicKey::new(algorithm, key)
            .verify(format!("{head}.{body}").as_bytes(), &b64url(sig)?)
            .map_err(|_| "the signature does not verify".to_string())?;
        let claims: Claims =
            serde_json::from_slice(&b64url(body)?).map_err(|_| "claims that are not JSON")?;
        if claims.iss != self.issuer {
            return Err("issued by another token service".into());
        }
        if !claims.aud.names(&self.service) {
            return Err("for another registry (audience)".into());
        }
        let now = seconds(now);
        let leeway = LEEWAY.as_secs();
        match claims.exp {
            Some(exp) if now <= exp.saturating_add(leeway) => {}
            Some(_) => return Err("expired".into()),
            None => return Err("no expiry".into()),
        }
        if claims
            .nbf
            .is_some_and(|nbf| now.saturating_add(leeway) < nbf)
        {
            return Err("not valid yet".into());
        }
        Ok(claims)
    }

    /// The raw public key that signed the token (what ring verifies with).
    fn signing_key(&self, header: &Header, now: SystemTime) -> Result<Vec<u8>, String> {
        if let Some(chain) = &header.x5c {
            return self.key_of_chain(chain, now);
        }
        let kid = header.kid.as_deref().ok_or("neither x5c nor kid")?;
        let trusted = self
            .trusted
            .iter()
            .find(|t| t.key_id == kid)
            .ok_or("signed by a key the registry does not trust (kid)")?;
        let (_, cert) = X509Certificate::from_der(&trusted.der)
            .map_err(|_| "a trusted certificate does not parse")?;
        Ok(cert.public_key().subject_public_key.data.to_vec())
    }

    /// The leaf's key, if every certificate of the chain is signed by the next, the last by a
    /// trusted one (or is one), and all are valid now.
    fn key_of_chain(&self, chain: &[String], now: SystemTime) -> Result<Vec<u8>, String> {
        let ders: Vec<Vec<u8>> = chain
            .iter()
            .map(|c| base64::engine::general_purpose::STANDARD.decode(c))
            .collect::<Result<_, _>>()
            .map_err(|_| "an x5c certificate is not base64")?;
        let certs: Vec<X509Certificate<'_>> = ders
            .iter()
            .map(|d| X509Certificate::from_der(d).map(|(_, c)| c))
            .collect::<Result<_, _>>()
            .map_err(|_| "an x5c certificate does not parse")?;
        let leaf = certs.first().ok_or("an empty x5c chain")?;
        let at = x509_parser::time::ASN1Time::from_timestamp(seconds(now) as i64)
            .map_err(|_| "the clock")?;
        for (i, cert) in certs.iter().enumerate() {
            if !cert.validity().is_valid_at(at) {
                return Err("a certificate of the x5c chain is not valid now".into());
            }
            if let Some(issuer) = certs.get(i + 1) {
                cert.verify_signature(Some(issuer.public_key()))
                    .map_err(|_| "the x5c chain does not verify")?;
            }
        }
        let last = certs.last().ok_or("an empty x5c chain")?;
        let anchored = self.trusted.iter().any(|t| {
            t.der == ders[ders.len() - 1]
                || X509Certificate::from_der(&t.der)
                    .is_ok_and(|(_, root)| last.verify_signature(Some(root.public_key())).is_ok())
        });
        if !anchored {
            return Err("the x5c chain ends in no certificate the registry trusts".into());
        }
        Ok(leaf.public_key().subject_public_key.data.to_vec())
    }
}

/// When a token says it expires, without checking it: only to shorten how long a decision made
/// with it is remembered, never to grant anything.
/// The token of a `Bearer` `Authorization` value.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

pub(crate) fn unverified_expiry(authorization: &str) -> Option<SystemTime> {
    let token = authorization.split_once(' ')?.1.trim();
    let body = token.split('.').nth(1)?;
    let claims: serde_json::Value = serde_json::from_slice(&b64url(body).ok()?).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
}

#[cfg(test)]
mod tests;
