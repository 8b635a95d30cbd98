//! Header rules of a transparent proxy: what is hop-by-hop, what is added, what is rewritten.
//!
//! Only URLs that would send the client around regtee are rewritten: absolute `Location` and
//! `Link` targets on the upstream origin, and token realms. Everything else passes untouched.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::Challenge;
use crate::origin::{Origin, Scheme};

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares client request headers for the upstream: hop-by-hop removed, `Host` set to the
/// upstream, `X-Forwarded-*` describing the client's view, `Expect` handled by us already.
pub fn prepare_request(
    headers: &mut HeaderMap,
    upstream: &Origin,
    client_ip: std::net::IpAddr,
    public: &Origin,
) {
    strip_hop_by_hop(headers);
    headers.remove(header::EXPECT);
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        _ => client_ip.to_string(),
    };
    set(headers, "x-forwarded-for", &forwarded_for);
    set(headers, "x-forwarded-proto", public.scheme().as_str());
    set(headers, "x-forwarded-host", &public.authority());
    set(headers, header::HOST.as_str(), &upstream.authority());
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// Rewrites an absolute URL on `from` to the same path on `to`; other URLs yield `None`.
pub fn rebase_url(url: &str, from: &Origin, to: &Origin) -> Option<String> {
    let uri: http::Uri = url.trim().parse().ok()?;
    if Origin::of(&uri).as_ref() != Some(from) {
        return None;
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Some(format!("{to}{path}"))
}

/// Rewrites the URL targets inside a `Link` header value (`<url>; rel="next", ...`).
pub fn rebase_link(value: &str, from: &Origin, to: &Origin) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut changed = false;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let target = &rest[start + 1..start + len];
        out.push_str(&rest[..=start]);
        match rebase_url(target, from, to) {
            Some(new) => {
                out.push_str(&new);
                changed = true;
            }
            None => out.push_str(target),
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// How a token realm in an upstream challenge should appear to the client.
pub enum RealmRewrite<'a> {
    /// Leave realms on other origins alone.
    SameOriginOnly,
    /// Relay realms on other origins through regtee: the closure registers the realm and
    /// returns the relay path on the proxy (e.g. `/_regtee/token/<id>`).
    Relay(&'a dyn Fn(&str) -> String),
}

/// Rewrites the response headers that would lead the client away from regtee.
pub fn rewrite_response(
    headers: &mut HeaderMap,
    upstream: &Origin,
    public: &Origin,
    realms: RealmRewrite<'_>,
) {
    strip_hop_by_hop(headers);
    if let Some(new) = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| rebase_url(v, upstream, public))
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(header::LOCATION, new);
    }
    rewrite_all(headers, header::LINK, |v| rebase_link(v, upstream, public));
    rewrite_all(headers, header::WWW_AUTHENTICATE, |v| {
        rewrite_challenge(v, upstream, public, &realms)
    });
}

fn rewrite_all(
    headers: &mut HeaderMap,
    name: HeaderName,
    rewrite: impl Fn(&str) -> Option<String>,
) {
    if !headers.contains_key(&name) {
        return;
    }
    let values: Vec<HeaderValue> = headers
        .get_all(&name)
        .iter()
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(&rewrite)
                .and_then(|new| HeaderValue::from_str(&new).ok())
                .unwrap_or_else(|| v.clone())
        })
        .collect();
    headers.remove(&name);
    for v in values {
        headers.append(&name, v);
    }
}

fn rewrite_challenge(
    value: &str,
    upstream: &Origin,
    public: &Origin,
    realms: &RealmRewrite<'_>,
) -> Option<String> {
    let mut challenge = Challenge::parse(value)?;
    let realm = challenge.param("realm")?.to_string();
    let new_realm = match rebase_url(&realm, upstream, public) {
        Some(same_origin) => same_origin,
        None => match realms {
            RealmRewrite::Relay(register) if is_http_url(&realm) => {
                format!("{public}{}", register(&realm))
            }
            _ => return None,
        },
    };
    challenge.set_param("realm", new_realm);
    Some(challenge.to_header_value())
}

fn is_http_url(s: &str) -> bool {
    s.parse::<http::Uri>()
        .ok()
        .and_then(|u| Origin::of(&u))
        .is_some()
}

/// The origin the client used: the listener's scheme and the request's authority.
pub fn public_origin(
    scheme: Scheme,
    uri: &http::Uri,
    headers: &HeaderMap,
    local: std::net::SocketAddr,
) -> Origin {
    let host = uri.authority().map(|a| a.as_str().to_string()).or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    host.and_then(|h| Origin::from_host_header(scheme, &h))
        .or_else(|| Origin::from_host_header(scheme, &local.to_string()))
        .expect("a socket address is a valid authority")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins() -> (Origin, Origin) {
        (
            Origin::parse("https://harbor.internal").unwrap(),
            Origin::parse("http://regtee.example.com:5000").unwrap(),
        )
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn request_gets_forwarded_headers_and_upstream_host() {
        let (up, public) = origins();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert(header::HOST, "regtee.example.com:5000".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        prepare_request(&mut h, &up, "192.0.2.7".parse().unwrap(), &public);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "regtee.example.com:5000");
        assert_eq!(h[header::HOST], "harbor.internal");
        assert_eq!(h[header::AUTHORIZATION], "Bearer abc");
    }

    #[test]
    fn absolute_locations_on_the_upstream_are_rebased_and_others_kept() {
        let (up, public) = origins();
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            "https://harbor.internal:443/v2/a/blobs/uploads/1?_state=x"
                .parse()
                .unwrap(),
        );
        rewrite_response(&mut h, &up, &public, RealmRewrite::SameOriginOnly);
        assert_eq!(
            h[header::LOCATION],
            "http://regtee.example.com:5000/v2/a/blobs/uploads/1?_state=x"
        );
        for keep in [
            "/v2/a/blobs/uploads/1",
            "https://s3.amazonaws.com/bucket/blob?sig=1",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, keep.parse().unwrap());
            rewrite_response(&mut h, &up, &public, RealmRewrite::SameOriginOnly);
            assert_eq!(h[header::LOCATION], keep);
        }
    }

    #[test]
    fn link_targets_are_rebased() {
        let (up, public) = origins();
        assert_eq!(
            rebase_link(
                r#"<https://harbor.internal/v2/a/tags/list?last=b&n=1>; rel="next""#,
                &up,
                &public
            )
            .as_deref(),
            Some(r#"<http://regtee.example.com:5000/v2/a/tags/list?last=b&n=1>; rel="next""#)
        );
        assert_eq!(
            rebase_link(r#"</v2/a/tags/list?n=1>; rel="next""#, &up, &public),
            None
        );
    }

    #[test]
    fn realms_same_origin_rebased_foreign_relayed() {
        let (up, public) = origins();
        let mut h = HeaderMap::new();
        h.append(
            header::WWW_AUTHENTICATE,
            r#"Bearer realm="https://harbor.internal/service/token",service="harbor-registry""#
                .parse()
                .unwrap(),
        );
        rewrite_response(&mut h, &up, &public, RealmRewrite::SameOriginOnly);
        assert_eq!(
            h[header::WWW_AUTHENTICATE],
            r#"Bearer realm="http://regtee.example.com:5000/service/token",service="harbor-registry""#
        );

        let mut h = HeaderMap::new();
        h.append(
            header::WWW_AUTHENTICATE,
            r#"Bearer realm="https://auth.example.net/token",service="reg",scope="repository:a:pull""#
                .parse()
                .unwrap(),
        );
        let relay = |realm: &str| {
            assert_eq!(realm, "https://auth.example.net/token");
            "/_regtee/token/abc".to_string()
        };
        rewrite_response(&mut h, &up, &public, RealmRewrite::Relay(&relay));
        assert_eq!(
            h[header::WWW_AUTHENTICATE],
            r#"Bearer realm="http://regtee.example.com:5000/_regtee/token/abc",service="reg",scope="repository:a:pull""#
        );
    }

    #[test]
    fn public_origin_prefers_authority_then_host_then_socket() {
        let local: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "reg.example.com:5000".parse().unwrap());
        let o = public_origin(Scheme::Http, &"/v2/".parse().unwrap(), &h, local);
        assert_eq!(o.to_string(), "http://reg.example.com:5000");
        let o = public_origin(
            Scheme::Https,
            &"https://h2.example.com/v2/".parse().unwrap(),
            &h,
            local,
        );
        assert_eq!(o.to_string(), "https://h2.example.com");
        let o = public_origin(
            Scheme::Http,
            &"/v2/".parse().unwrap(),
            &HeaderMap::new(),
            local,
        );
        assert_eq!(o.to_string(), "http://127.0.0.1:5000");
    }
}
