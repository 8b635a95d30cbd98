//! Who may act on the page: with an admin token set, a browser presents it once (`POST /login`)
//! and gets a session, an `HttpOnly`, `SameSite=Strict` cookie (`Secure` on TLS) holding a
//! random id, never the token. Every action is a `POST` carrying the page's anti-forgery token
//! in its form, which a page on another site cannot read; a `POST` whose `Origin` names another
//! site is refused before that.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header;

use crate::ops::webhooks::constant_time_eq;

/// The cookie's name.
pub(crate) const COOKIE: &str = "regtee_session";

/// How long a session lasts without a new login.
const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Sessions kept at most; the oldest go first beyond.
const MAX_SESSIONS: usize = 1000;

pub(crate) struct Sessions {
    live: Mutex<HashMap<String, Instant>>,
    /// The anti-forgery token every form carries (one per process: it only has to be
    /// unreadable from another site).
    form_token: String,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    pub(crate) fn new() -> Sessions {
        Sessions {
            live: Mutex::new(HashMap::new()),
            form_token: random_hex(),
        }
    }

    /// The token forms carry.
    pub(crate) fn form_token(&self) -> &str {
        &self.form_token
    }

    /// A new session id for a browser that presented the admin token.
    pub(crate) fn open(&self) -> String {
        let id = random_hex();
        let now = Instant::now();
        if let Ok(mut live) = self.live.lock() {
            live.retain(|_, until| *until > now);
            if live.len() >= MAX_SESSIONS
                && let Some(oldest) = live.iter().min_by_key(|(_, u)| **u).map(|(k, _)| k.clone())
            {
                live.remove(&oldest);
            }
            live.insert(id.clone(), now + LIFETIME);
        }
        id
    }

    /// Ends the request's session.
    pub(crate) fn close(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut live)) = (session_id(headers), self.live.lock()) {
            live.remove(id);
        }
    }

    /// Whether the request carries a live session.
    pub(crate) fn holds(&self, headers: &HeaderMap) -> bool {
        let Some(id) = session_id(headers) else {
            return false;
        };
        self.live
            .lock()
            .ok()
            .and_then(|live| live.get(id).copied())
            .is_some_and(|until| until > Instant::now())
    }

    /// Whether a form's anti-forgery field is this page's.
    pub(crate) fn form_is_ours(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), self.form_token.as_bytes()))
    }
}

/// The cookie that opens a session; `Secure` when the page was reached over TLS.
pub(crate) fn cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        LIFETIME.as_secs()
    )
}

/// The cookie that ends one.
pub(crate) fn expired_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Whether a `POST` comes from this page: no `Origin` (not a browser's cross-site request) or
/// one naming the host the request was sent to.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_session_is_its_cookie_and_ends_on_close() {
        let s = Sessions::new();
        let id = s.open();
        let cookie = format!("other=1; {COOKIE}={id}");
        let h = with(&[("cookie", &cookie)]);
        assert!(s.holds(&h));
        assert!(!s.holds(&with(&[("cookie", &format!("{COOKIE}=guess"))])));
        assert!(!s.holds(&HeaderMap::new()));
        s.close(&h);
        assert!(!s.holds(&h));
        assert!(cookie_is_strict(&super::cookie(&id, true)));
    }

    fn cookie_is_strict(c: &str) -> bool {
        c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure")
    }

    #[test]
    fn forms_and_origins_are_checked() {
        let s = Sessions::new();
        assert!(s.form_is_ours(Some(s.form_token())));
        assert!(!s.form_is_ours(Some("x")) && !s.form_is_ours(None));
        assert!(same_origin(&with(&[("host", "127.0.0.1:5001")])));
        assert!(same_origin(&with(&[
            ("host", "127.0.0.1:5001"),
            ("origin", "http://127.0.0.1:5001")
        ])));
        assert!(!same_origin(&with(&[
            ("host", "127.0.0.1:5001"),
            ("origin", "https://evil.example")
        ])));
    }
}
