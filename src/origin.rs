//! Where a registry lives: scheme, host and port, compared the way browsers and registries do.
//!
//! Rewriting `Location`, `Link` and token realms hinges on one question, "does this URL point at
//! that origin?", so the answer lives in one small type instead of string prefixes scattered about.

use std::fmt;

use http::Uri;

/// `http` or `https`, the only schemes a registry speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP: the insecure-registry drop-in.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// The scheme as it appears in a URL and in `X-Forwarded-Proto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A URL origin with the default port made explicit, so `https://h` equals `https://h:443`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: Scheme,
    host: String,
    port: u16,
}

/// Why a string is not a usable registry origin.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The text does not parse as a URI.
    #[error("`{0}` is not a URL")]
    NotAUrl(String),
    /// Only `http://` and `https://` make sense for a registry.
    #[error("`{0}` must start with http:// or https://")]
    Scheme(String),
    /// A registry lives at the root of its host.
    #[error(
        "`{0}` must not have a path, query or credentials: a registry lives at the root of its host"
    )]
    NotRoot(String),
}

impl Origin {
    /// Parses a registry base URL such as `https://harbor.example.com` (a trailing `/` is allowed).
    pub fn parse(text: &str) -> Result<Origin, OriginError> {
        let uri: Uri = text
            .parse()
            .map_err(|_| OriginError::NotAUrl(text.to_string()))?;
        let path_is_root = matches!(uri.path(), "" | "/") && uri.query().is_none();
        if !path_is_root || text.contains('@') {
            return Err(OriginError::NotRoot(text.to_string()));
        }
        Origin::of(&uri).ok_or_else(|| OriginError::Scheme(text.to_string()))
    }

    /// The origin of an absolute URI, or `None` for relative references and other schemes.
    pub fn of(uri: &Uri) -> Option<Origin> {
        let scheme = match uri.scheme_str()? {
            s if s.eq_ignore_ascii_case("http") => Scheme::Http,
            s if s.eq_ignore_ascii_case("https") => Scheme::Https,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        Some(Origin { scheme, host, port })
    }

    /// The origin a client used to reach us: our listener's scheme and its `Host` header.
    pub(crate) fn from_host_header(scheme: Scheme, host: &str) -> Option<Origin> {
        let uri: Uri = format!("{}://{host}/", scheme.as_str()).parse().ok()?;
        Origin::of(&uri)
    }

    /// The origin of a listening socket, for a request that names no host.
    pub(crate) fn of_socket(scheme: Scheme, addr: std::net::SocketAddr) -> Origin {
        let host = match addr.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        Origin {
            scheme,
            host,
            port: addr.port(),
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// `host[:port]` as it belongs in a `Host` header (the port only when not the default).
    pub(crate) fn authority(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether `other` names the same host and port as this origin, whatever its scheme.
    ///
    /// Fronts in the path disagree about the scheme: Harbor's nginx overwrites
    /// `X-Forwarded-Proto` with its own `$scheme`, a TLS-terminating load balancer before it
    /// says `http`, and the registry builds absolute URLs from what reaches it. The authority is
    /// what all of them keep, so URLs are recognised by it: the same host and port, or the same
    /// host with each side on its own scheme's default port (`http://h` matches `https://h`).
    pub(crate) fn same_authority(&self, other: &Origin) -> bool {
        self.host == other.host
            && (self.port == other.port
                || (self.port == self.scheme.default_port()
                    && other.port == other.scheme.default_port()))
    }

    /// An absolute URI for `path_and_query` (which starts with `/`) on this origin.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::uri::InvalidUri> {
        format!("{self}{path_and_query}").parse()
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

/// The HTTPS origin an upstream reached over plain HTTP redirects this request to, if it does.
///
/// Harbor configured for HTTPS answers its plain port with `308 https://<hostname>$request_uri`
/// (its nginx template), whatever the path: the same request, upgraded. A redirect to another
/// path (a blob on object storage) is not this.
pub(crate) fn redirect_to_https(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    upstream: &Origin,
    request: &http::Uri,
) -> Option<Origin> {
    if !status.is_redirection() || upstream.scheme() != Scheme::Http {
        return None;
    }
    let location: http::Uri = headers
        .get(http::header::LOCATION)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let target = Origin::of(&location)?;
    let same_request = location.path_and_query() == request.path_and_query();
    (target.scheme() == Scheme::Https && same_request).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports_are_equal_to_explicit_ones() {
        let a = Origin::parse("https://Harbor.Example.com").unwrap();
        let b = Origin::of(&"https://harbor.example.com:443/v2/".parse().unwrap()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "https://harbor.example.com");
        assert_eq!(a.authority(), "harbor.example.com");
    }

    #[test]
    fn non_default_port_is_kept() {
        let a = Origin::parse("http://127.0.0.1:5000/").unwrap();
        assert_eq!(a.to_string(), "http://127.0.0.1:5000");
        assert_ne!(a, Origin::parse("http://127.0.0.1:5001").unwrap());
        assert_ne!(a, Origin::parse("https://127.0.0.1:5000").unwrap());
    }

    #[test]
    fn rejects_paths_schemes_and_credentials() {
        assert!(matches!(
            Origin::parse("https://h/harbor"),
            Err(OriginError::NotRoot(_))
        ));
        assert!(matches!(
            Origin::parse("ftp://h"),
            Err(OriginError::Scheme(_))
        ));
        assert!(Origin::parse("https://u:p@h").is_err());
        assert!(Origin::parse("not a url").is_err());
    }

    #[test]
    fn relative_references_have_no_origin() {
        assert_eq!(Origin::of(&"/v2/x/blobs/uploads/1".parse().unwrap()), None);
    }

    #[test]
    fn authorities_match_across_schemes() {
        let o = |s: &str| Origin::parse(s).unwrap();
        // Harbor's nginx put its own scheme on regtee's authority.
        assert!(
            o("http://regtee.example.com:5000")
                .same_authority(&o("https://regtee.example.com:5000"))
        );
        // Default ports left out on both sides match whatever the scheme.
        assert!(o("https://harbor.internal").same_authority(&o("http://harbor.internal")));
        assert!(o("https://harbor.internal").same_authority(&o("https://harbor.internal:443")));
        // The same host and port is the same authority, whatever the scheme says.
        assert!(o("https://harbor.internal").same_authority(&o("http://harbor.internal:443")));
        assert!(!o("https://harbor.internal").same_authority(&o("http://harbor.internal:8443")));
        assert!(!o("http://h:5000").same_authority(&o("http://h:5001")));
        assert!(!o("http://h:5000").same_authority(&o("http://g:5000")));
        assert!(o("http://[::1]:5000").same_authority(&o("https://[::1]:5000")));
        assert!(!o("http://[::1]:5000").same_authority(&o("http://[::2]:5000")));
    }

    #[test]
    fn host_header_with_ipv6_and_port() {
        let o = Origin::from_host_header(Scheme::Https, "[::1]:5443").unwrap();
        assert_eq!(o.to_string(), "https://[::1]:5443");
    }
}
