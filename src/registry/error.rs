//! What went wrong talking to a registry: classified where it happens, by type, so that retry
//! decisions, metrics and the sentence a person reads all come from the same facts. The fixes
//! live here once, for the mirror's failed jobs and for `regtee check` alike.

use std::time::Duration;

use crate::config::Side;
use crate::oci::error_code::ErrorCode;
use crate::tls::TlsFailure;

/// What went wrong.
#[derive(Debug, Clone)]
pub enum ErrorKind {
    /// No connection (refused, DNS, reset).
    Unreachable(String),
    /// TLS failed: the certificate was refused, or the handshake broke.
    Tls(TlsFailure),
    /// A plain-HTTP URL answered with a redirect to the same request on HTTPS: the registry
    /// serves HTTPS only (Harbor's nginx answers its plain port with 308).
    HttpsOnly {
        /// Where it redirects.
        https: String,
    },
    /// No answer in time.
    Timeout,
    /// The credentials were rejected.
    Unauthorized(String),
    /// No login could be had (a credential helper failed, a docker config is unusable).
    Login(String),
    /// Authenticated, but not allowed (or the namespace does not exist).
    Denied(String),
    /// 404 with the registry's error code.
    NotFound {
        /// e.g. `NAME_UNKNOWN`, `MANIFEST_UNKNOWN`.
        code: Option<ErrorCode>,
        /// The registry's message.
        message: String,
    },
    /// 429.
    RateLimited {
        /// What `Retry-After` asked for.
        retry_after: Option<Duration>,
    },
    /// Another 4xx: the request was refused as invalid.
    Rejected {
        /// Status code.
        status: u16,
        /// e.g. `MANIFEST_BLOB_UNKNOWN`, `MANIFEST_INVALID`, `DIGEST_INVALID`.
        code: Option<ErrorCode>,
        /// The registry's message.
        message: String,
    },
    /// 5xx.
    Server {
        /// Status code.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// A stream broke mid-transfer, or content did not match its digest.
    Transfer(String),
    /// The registry answered something that makes no sense.
    Protocol(String),
}

/// An error from one registry operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{registry}: {operation}: {kind}")]
pub struct RegistryError {
    /// Which registry (`upstream` or a target's name), for people.
    pub registry: String,
    /// Which side of regtee it is on, for decisions.
    pub side: Side,
    /// What was being done, e.g. `PUT manifest prod-lib/nginx:v1`.
    pub operation: String,
    /// What went wrong.
    pub kind: ErrorKind,
}

fn with_code(code: &Option<ErrorCode>, message: &str) -> String {
    match (code, message.is_empty()) {
        (None, _) => message.to_string(),
        (Some(c), true) => c.to_string(),
        (Some(c), false) => format!("{c}: {message}"),
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Unreachable(m) => write!(f, "unreachable: {m}"),
            ErrorKind::Tls(t) => write!(f, "TLS: {t}"),
            ErrorKind::HttpsOnly { https } => {
                write!(
                    f,
                    "plain HTTP is redirected to {https}: it serves HTTPS only"
                )
            }
            ErrorKind::Timeout => f.write_str("timed out"),
            ErrorKind::Login(m) => write!(f, "no login: {m}"),
            ErrorKind::Unauthorized(m) if m.is_empty() => f.write_str("credentials rejected"),
            ErrorKind::Unauthorized(m) => write!(f, "credentials rejected: {m}"),
            ErrorKind::Denied(m) if m.is_empty() => f.write_str("access denied"),
            ErrorKind::Denied(m) => write!(f, "access denied: {m}"),
            ErrorKind::NotFound { code, message } => write!(f, "404 {}", with_code(code, message)),
            ErrorKind::RateLimited { retry_after } => match retry_after {
                Some(d) => write!(f, "rate limited (retry after {d:?})"),
                None => f.write_str("rate limited"),
            },
            ErrorKind::Rejected {
                status,
                code,
                message,
            } => write!(f, "{status} {}", with_code(code, message)),
            ErrorKind::Server { status, message } => write!(f, "server error {status}: {message}"),
            ErrorKind::Transfer(m) => write!(f, "transfer failed: {m}"),
            ErrorKind::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

/// Where a fix applies: the config section of the registry at fault and, when known, the
/// namespace (a target's) or project (Harbor's) the operation was about.
#[derive(Clone, Copy, Debug)]
pub struct FixContext<'a> {
    /// `[upstream]`, or `[[targets]] "tcr"`.
    pub section: &'a str,
    /// The target namespace or Harbor project concerned.
    pub namespace: Option<&'a str>,
    /// The repository concerned (on the target, after mapping).
    pub repository: Option<&'a str>,
}

impl RegistryError {
    /// Whether trying again later can help.
    pub(crate) fn retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Tls(t) => !t.is_certificate(),
            // A helper that failed may answer next time (it asks a cloud API itself).
            ErrorKind::Login(_)
            | ErrorKind::Unreachable(_)
            | ErrorKind::Timeout
            | ErrorKind::RateLimited { .. }
            | ErrorKind::Server { .. }
            | ErrorKind::Transfer(_) => true,
            ErrorKind::Rejected { code, status, .. } => {
                *status == 408 || code.as_ref().is_some_and(ErrorCode::is_missing_content)
            }
            ErrorKind::Unauthorized(_)
            | ErrorKind::Denied(_)
            | ErrorKind::NotFound { .. }
            | ErrorKind::HttpsOnly { .. }
            | ErrorKind::Protocol(_) => false,
        }
    }

    /// Whether the registry answered at all (with an HTTP status), as opposed to a connection,
    /// TLS or transfer failure.
    pub fn answered(&self) -> bool {
        !matches!(
            self.kind,
            ErrorKind::Unreachable(_)
                | ErrorKind::Tls(_)
                | ErrorKind::Timeout
                | ErrorKind::Transfer(_)
        )
    }

    /// The registry's error code, if it sent one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match &self.kind {
            ErrorKind::NotFound { code, .. } | ErrorKind::Rejected { code, .. } => code.as_ref(),
            _ => None,
        }
    }

    /// What a person should do about it, when regtee knows; the one table of fixes that failed
    /// jobs and `regtee check` both show.
    pub fn fix(&self, at: FixContext<'_>) -> Option<String> {
        let section = at.section;
        let fix = match (&self.kind, self.side) {
            (ErrorKind::Tls(t), _) => t.fix(section),
            (ErrorKind::HttpsOnly { https }, _) => format!(
                "set url = \"{https}\" in {section} (and ca_file there if its CA is private)"
            ),
            (ErrorKind::Unreachable(_) | ErrorKind::Timeout, _) => {
                format!("check the url in {section}, DNS and firewalls from this host")
            }
            (ErrorKind::Login(_), _) => format!(
                "check the credential_helper or docker_config in {section}: run the helper by hand (`echo HOST | docker-credential-NAME get`)"
            ),
            (ErrorKind::Unauthorized(_), _) => format!(
                "the username or password is wrong: fix username and password(_env/_file) in {section}"
            ),
            (ErrorKind::Denied(_), Side::Upstream) => format!(
                "give regtee's Harbor account pull access to project {}",
                at.namespace.unwrap_or("(the project)")
            ),
            // ECR has no namespaces: each repository must be created before the first push.
            (
                ErrorKind::NotFound {
                    code: Some(ErrorCode::NameUnknown),
                    ..
                },
                Side::Target,
            ) if at.repository.is_some() => format!(
                "create repository {} on {} (or namespace {} where the registry has namespaces), or fix namespaces in {section}",
                at.repository.unwrap_or_default(),
                self.registry,
                at.namespace.unwrap_or("(the namespace)")
            ),
            // `regtee check` probes a namespace with a made-up repository: on a registry where
            // each repository is created beforehand (ECR) that is refused the same way.
            (
                ErrorKind::NotFound {
                    code: Some(ErrorCode::NameUnknown),
                    ..
                },
                Side::Target,
            ) => format!(
                "create namespace {ns} on {target}, or, where each repository must exist before its first push (ECR), create the repositories regtee will push under {ns}; or fix namespaces in {section}",
                ns = at.namespace.unwrap_or("(the namespace)"),
                target = self.registry
            ),
            (ErrorKind::Denied(_) | ErrorKind::NotFound { .. }, Side::Target) => match at.namespace
            {
                Some(ns) => format!(
                    "create namespace {ns} on {target} (or fix namespaces in {section}), and let regtee's account push to it (namespace {ns} does not exist on target {target}, or regtee may not push to it)",
                    target = self.registry
                ),
                None => "the account exists but lacks rights: grant it access".to_string(),
            },
            _ => return None,
        };
        Some(fix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: ErrorKind) -> RegistryError {
        RegistryError {
            registry: "tcr".into(),
            side: Side::Target,
            operation: "op".into(),
            kind,
        }
    }

    #[test]
    fn error_kinds_decide_retries() {
        assert!(e(ErrorKind::Unreachable("connection refused".into())).retryable());
        assert!(!e(ErrorKind::Tls(TlsFailure::UnknownIssuer)).retryable());
        assert!(e(ErrorKind::Tls(TlsFailure::Handshake("reset".into()))).retryable());
        assert!(!e(ErrorKind::Denied("x".into())).retryable());
        assert!(e(ErrorKind::RateLimited { retry_after: None }).retryable());
        let rejected = |code| ErrorKind::Rejected {
            status: 400,
            code: Some(code),
            message: String::new(),
        };
        assert!(e(rejected(ErrorCode::ManifestBlobUnknown)).retryable());
        assert!(!e(rejected(ErrorCode::ManifestInvalid)).retryable());
    }

    #[test]
    fn fixes_name_the_section_and_the_namespace() {
        let at = FixContext {
            section: "[[targets]] \"tcr\"",
            namespace: Some("prod-lib"),
            repository: Some("prod-lib/app"),
        };
        let denied = e(ErrorKind::Denied("no".into())).fix(at).unwrap();
        assert!(
            denied.contains("create namespace prod-lib on tcr"),
            "{denied}"
        );
        let wrong = e(ErrorKind::Unauthorized("no".into())).fix(at).unwrap();
        assert!(
            wrong.contains("password(_env/_file) in [[targets]] \"tcr\""),
            "{wrong}"
        );
        assert!(e(ErrorKind::Protocol("?".into())).fix(at).is_none());
        let unknown = e(ErrorKind::NotFound {
            code: Some(ErrorCode::NameUnknown),
            message: "repository prod-lib/app not found".into(),
        })
        .fix(at)
        .unwrap();
        assert!(
            unknown.contains("create repository prod-lib/app on tcr"),
            "{unknown}"
        );
    }
}
