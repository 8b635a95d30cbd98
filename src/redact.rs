//! Secrets out of text that came from elsewhere, before it is stored, logged or shown.
//!
//! regtee never prints a secret of its own ([`crate::config::Secret`] shows `<redacted>`), but
//! error bodies from Harbor or a target are other servers' words, and some echo the request's
//! `Authorization` back. Every such text passes through [`scrub`]: every secret regtee knows
//! (configured passwords and tokens, derived logins, the Basic credentials built from them),
//! anything after `Bearer`/`Basic`, JWT-shaped strings and long opaque tokens are replaced, and
//! the text is bounded in length.

use std::sync::{Arc, OnceLock, RwLock};

/// What replaces a secret.
pub(crate) const REDACTED: &str = "<redacted>";

/// Longest text kept, in characters.
const MAX_CHARS: usize = 1000;

/// Opaque tokens at least this long are redacted (lower-case names and digests excepted).
const LONG_TOKEN: usize = 40;

/// Secrets known at most; the oldest are forgotten first (a bound, not an expected size).
const MAX_KNOWN: usize = 1024;

/// A secret and when it was learnt.
type Learnt = (u64, Arc<str>);

/// Known secrets, longest first (so one that contains a shorter one is replaced whole), each
/// with the order it was learnt in (the oldest is forgotten first).
fn known() -> &'static RwLock<Vec<Learnt>> {
    static KNOWN: OnceLock<RwLock<Vec<Learnt>>> = OnceLock::new();
    KNOWN.get_or_init(|| RwLock::new(Vec::new()))
}

/// Remembers a secret so that [`scrub`] removes it wherever it appears.
pub(crate) fn remember(secret: Arc<str>) {
    if secret.len() < 3 {
        return;
    }
    static LEARNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut known = known().write().unwrap_or_else(|p| p.into_inner());
    if known.iter().any(|(_, k)| **k == *secret) {
        return;
    }
    if known.len() >= MAX_KNOWN
        && let Some(oldest) = (0..known.len()).min_by_key(|&i| known[i].0)
    {
        known.remove(oldest);
    }
    let at = known.partition_point(|(_, k)| k.len() >= secret.len());
    let order = LEARNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    known.insert(at, (order, secret));
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '_' | '.' | '-' | '~')
}

/// Whether `word` is a secret; `next` is the character after it.
fn looks_secret(word: &str, after_scheme: bool, next: Option<char>) -> bool {
    // `Basic realm="..."` is a challenge, not a credential.
    let auth_param = word
        .strip_suffix('=')
        .is_some_and(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase()))
        && next == Some('"');
    if after_scheme {
        return !auth_param;
    }
    let jwt = word.starts_with("eyJ") && word.contains('.');
    // Base64 and random tokens mix cases and digits; names, paths and digests are lower case.
    let mixed = word.bytes().any(|b| b.is_ascii_uppercase())
        && word
            .bytes()
            .any(|b| b.is_ascii_digit() || matches!(b, b'+' | b'/' | b'='));
    jwt || (word.len() >= LONG_TOKEN && mixed)
}

/// `text` with the user information of every URL in it (`scheme://user:password@host`)
/// replaced: whoever wrote it there, it is a credential.
fn without_url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let authority_end = after
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace() || c == '"')
            .unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str(REDACTED);
                rest = &after[userinfo_end..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// `text` with every secret regtee knows and every credential in a URL replaced, nothing else:
/// for regtee's own words (configuration errors), where the heuristics of [`scrub`] would
/// take ordinary words for tokens.
pub(crate) fn remove_known(text: &str) -> String {
    let mut text = if text.contains("://") {
        without_url_credentials(text)
    } else {
        text.to_string()
    };
    for (_, secret) in known().read().unwrap_or_else(|p| p.into_inner()).iter() {
        if text.contains(&**secret) {
            text = text.replace(&**secret, REDACTED);
        }
    }
    text
}

/// `text` with every secret replaced by `<redacted>` and cut to a bounded length.
pub(crate) fn scrub(text: &str) -> String {
    let text: String = text.chars().take(MAX_CHARS * 2).collect();
    let text = remove_known(&text);
    let mut out = String::with_capacity(text.len());
    let mut after_scheme = false;
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let end = rest.find(|c| !is_token_char(c)).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        if !word.is_empty() {
            if looks_secret(word, after_scheme, tail.chars().next()) {
                out.push_str(REDACTED);
            } else {
                out.push_str(word);
            }
            after_scheme =
                word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
        }
        let Some(separator) = tail.chars().next() else {
            break;
        };
        // A scheme covers the one credential after it, across blanks (and a quote or `=`).
        if !(separator.is_whitespace() || matches!(separator, '"' | '\'' | ':')) {
            after_scheme = false;
        }
        out.push(separator);
        rest = &tail[separator.len_utf8()..];
    }
    if out.chars().count() > MAX_CHARS {
        out = out.chars().take(MAX_CHARS).collect();
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_credentials_are_removed() {
        let cases = [
            (
                r#"{"errors":[{"code":"DENIED","message":"bad header Authorization: Basic dGNyLXN5bmM6czNjcmV0"}]}"#,
                "dGNyLXN5bmM6czNjcmV0",
            ),
            (
                "authorization=bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln rejected",
                "eyJhbGciOiJFUzI1NiJ9",
            ),
            (
                "token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln expired",
                "eyJhbGciOiJFUzI1NiJ9",
            ),
            (
                "session AKIAIOSFODNN7EXAMPLEwJalrXUtnFEMIK7MDENGbPxRfiCY invalid",
                "AKIAIOSFODNN7EXAMPLE",
            ),
        ];
        for (text, secret) in cases {
            let clean = scrub(text);
            assert!(!clean.contains(secret), "{clean}");
            assert!(clean.contains(REDACTED), "{clean}");
        }
    }

    #[test]
    fn known_secrets_are_removed_wherever_they_are() {
        remember(Arc::from("hunter2-secret"));
        let clean = scrub("login failed for password=hunter2-secret; try again");
        assert_eq!(clean, "login failed for password=<redacted>; try again");
    }

    #[test]
    fn useful_text_is_kept() {
        let digest = format!("sha256:{}", "ab12".repeat(16));
        let text = format!(
            "404 MANIFEST_UNKNOWN: manifest unknown: library/app@{digest} (upload 5f1c0c3e-6b7a-4b8e-9a57-1a2b3c4d5e6f)"
        );
        assert_eq!(scrub(&text), text);
        let long_name =
            "exists: prod-lib/a-very-long-repository-name-for-the-backend-service:v1.2.3";
        assert_eq!(scrub(long_name), long_name);
        // The word after a scheme, not the rest of the sentence.
        assert_eq!(
            scrub("Basic realm=\"harbor\", then more"),
            "Basic realm=\"harbor\", then more"
        );
        assert_eq!(scrub("Basic dXNlcjpwYXNz"), "Basic <redacted>");
    }

    #[test]
    fn credentials_in_urls_are_removed() {
        assert_eq!(
            scrub(
                "url http://robot:pa55word@harbor.example.com:8080/v2/ must not carry credentials"
            ),
            "url http://<redacted>@harbor.example.com:8080/v2/ must not carry credentials"
        );
        assert_eq!(
            scrub("postgres://regtee:pw@db:5432/regtee and https://h/x@y"),
            "postgres://<redacted>@db:5432/regtee and https://h/x@y"
        );
    }

    #[test]
    fn text_is_bounded() {
        let long = "word ".repeat(1000);
        assert!(scrub(&long).chars().count() <= MAX_CHARS + 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::arbitrary::CASES))]

            /// Wherever a known secret or a Basic credential sits in another server's text, it
            /// does not survive, and the text stays bounded.
            #[test]
            fn secrets_never_survive(before in any::<String>(), after in any::<String>(), secret in "[A-Za-z0-9+/=]{12,40}") {
                remember(Arc::from(secret.as_str()));
                for text in [
                    format!("{before}{secret}{after}"),
                    format!("{before} Basic {secret} {after}"),
                    format!("{before}authorization: Bearer {secret}{after}"),
                ] {
                    let clean = scrub(&text);
                    prop_assert!(!clean.contains(&secret), "{}", clean);
                    prop_assert!(clean.chars().count() <= MAX_CHARS + 1);
                }
            }
        }
    }
}
