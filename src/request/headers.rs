//! Header rules of a transparent proxy: what is hop-by-hop, what is added, what is rewritten.
//!
//! Only URLs that would send the client around regtee are rewritten: absolute `Location` and
//! `Link` targets on the upstream origin, and token realms. Everything else passes untouched.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::challenge::Challenge;
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

/// Removes hop-by-hop headers, including those the `Connection` header names. Most messages
/// carry none: one pass over the names decides, and only a message that has one pays for the
/// removals.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !any {
        return;
    }
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

/// Headers a client may send that would let it choose the host or scheme the upstream builds
/// absolute URLs from (distribution reads both). regtee is the edge: it alone describes the
/// client's view, and it describes it only by `X-Forwarded-For` and `X-Forwarded-Proto`.
const CLIENT_FORWARDED: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("forwarded"),
];

/// Prepares client request headers for the upstream: hop-by-hop removed, `Host` set to the
/// upstream, `X-Forwarded-For`/`-Proto` describing the client, `Expect` handled by us already.
///
/// No `X-Forwarded-Host`: Harbor's nginx overwrites `X-Forwarded-Proto` with its own scheme and
/// passes `X-Forwarded-Host` through, so the registry would build URLs from regtee's host and
/// Harbor's scheme, an origin nobody listens on. Without it, the registry builds them from `Host`
/// (the upstream's authority), which [`Rebase`] recognises whatever scheme a front put on it;
/// and no header a client chooses can steer a URL that regtee later follows.
///
/// `upstream_host` is the upstream's authority as a header value, built once per process.
pub(crate) fn prepare_request(
    headers: &mut HeaderMap,
    upstream_host: &HeaderValue,
    client_ip: std::net::IpAddr,
    scheme: Scheme,
) {
    strip_hop_by_hop(headers);
    let client_chosen = headers
        .keys()
        .any(|name| name == header::EXPECT || CLIENT_FORWARDED.contains(name));
    if client_chosen {
        headers.remove(header::EXPECT);
        for name in &CLIENT_FORWARDED {
            headers.remove(name);
        }
    }
    let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        _ => client_ip.to_string(),
    };
    // One allocation: the string becomes the header value's bytes.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded_for)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    headers.insert(header::HOST, upstream_host.clone());
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Whether a response carries a header [`rewrite_response`] may change beyond hop-by-hop ones:
/// only then is the client's public origin worth working out.
pub(crate) fn may_point_back(headers: &HeaderMap) -> bool {
    headers.contains_key(header::LOCATION)
        || headers.contains_key(header::LINK)
        || headers.contains_key(header::WWW_AUTHENTICATE)
}

/// Which absolute URLs point back into the registry, and the origin they are rebased onto.
///
/// A URL points back if its authority is the upstream's (what the registry builds from `Host`)
/// or the client's own (what it builds when a front adds `X-Forwarded-Host`), whatever scheme a
/// front in between put on it. It is rewritten to the origin the client used: the listener's
/// scheme and the client's `Host`.
pub(crate) struct Rebase<'a> {
    /// Harbor, as regtee reaches it.
    pub upstream: &'a Origin,
    /// regtee, as this client reached it.
    pub public: &'a Origin,
}

impl Rebase<'_> {
    /// Whether a URL on `origin` leads into the registry regtee fronts.
    pub(crate) fn points_back(&self, origin: &Origin) -> bool {
        origin.same_authority(self.upstream) || origin.same_authority(self.public)
    }

    /// The URL on the client's origin, or `None` for URLs elsewhere (object storage, another
    /// token service), relative references, and URLs already right.
    pub(crate) fn url(&self, url: &str) -> Option<String> {
        let uri: http::Uri = url.trim().parse().ok()?;
        let origin = Origin::of(&uri)?;
        if !self.points_back(&origin) || origin == *self.public {
            return None;
        }
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        Some(format!("{}{path}", self.public))
    }

    /// Rewrites the URL targets inside a `Link` header value (`<url>; rel="next", ...`).
    pub(crate) fn link(&self, value: &str) -> Option<String> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        let mut changed = false;
        while let Some(start) = rest.find('<') {
            let Some(len) = rest[start..].find('>') else {
                break;
            };
            let target = &rest[start + 1..start + len];
            out.push_str(&rest[..=start]);
            match self.url(target) {
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
}

/// How a token realm in an upstream challenge should appear to the client.
pub(crate) enum RealmRewrite<'a> {
    /// Leave realms on other origins alone.
    SameOriginOnly,
    /// Relay realms on other origins through regtee: the closure registers the realm and
    /// returns the relay path on the proxy (e.g. `/_regtee/token/<id>`), or `None` when it
    /// cannot (the realm is left as it is).
    Relay(&'a dyn Fn(&str) -> Option<String>),
}

/// Rewrites the response headers that would lead the client away from regtee.
pub(crate) fn rewrite_response(
    headers: &mut HeaderMap,
    rebase: &Rebase<'_>,
    realms: RealmRewrite<'_>,
) {
    strip_hop_by_hop(headers);
    if let Some(new) = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| rebase.url(v))
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(header::LOCATION, new);
    }
    rewrite_all(headers, header::LINK, |v| rebase.link(v));
    rewrite_all(headers, header::WWW_AUTHENTICATE, |v| {
        rewrite_challenge(v, rebase, &realms)
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

/// A `WWW-Authenticate` challenge and the origin of its realm; `None` unless the header is a
/// challenge whose realm is an absolute http(s) URL.
pub(crate) fn challenge_realm(value: &str) -> Option<(Challenge, Origin)> {
    let challenge = Challenge::parse(value)?;
    let origin = challenge
        .param("realm")?
        .trim()
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| Origin::of(&u))?;
    Some((challenge, origin))
}

fn rewrite_challenge(
    value: &str,
    rebase: &Rebase<'_>,
    realms: &RealmRewrite<'_>,
) -> Option<String> {
    let (mut challenge, origin) = challenge_realm(value)?;
    let realm = challenge.param("realm")?;
    let new_realm = if rebase.points_back(&origin) {
        rebase.url(realm)?
    } else {
        match realms {
            RealmRewrite::Relay(register) => format!("{}{}", rebase.public, register(realm)?),
            RealmRewrite::SameOriginOnly => return None,
        }
    };
    challenge.set_param("realm", new_realm);
    Some(challenge.to_header_value())
}

/// The origin the client used: the listener's scheme and the request's authority (its URI's, or
/// its `Host` value, kept after the headers went upstream).
pub(crate) fn public_origin(
    scheme: Scheme,
    uri: &http::Uri,
    host: Option<&HeaderValue>,
    local: std::net::SocketAddr,
) -> Origin {
    let host = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| host.and_then(|v| v.to_str().ok()));
    host.and_then(|h| Origin::from_host_header(scheme, h))
        .unwrap_or_else(|| Origin::of_socket(scheme, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> Origin {
        Origin::parse(s).unwrap()
    }

    fn location_after(upstream: &str, public: &str, location: &str) -> String {
        let (upstream, public) = (o(upstream), o(public));
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, location.parse().unwrap());
        let rebase = Rebase {
            upstream: &upstream,
            public: &public,
        };
        rewrite_response(&mut h, &rebase, RealmRewrite::SameOriginOnly);
        h[header::LOCATION].to_str().unwrap().to_string()
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
    fn request_gets_forwarded_for_and_proto_and_the_upstream_host_only() {
        let (up, public) = (
            o("https://harbor.internal"),
            o("http://regtee.example.com:5000"),
        );
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        // What a client chooses must not decide the origin the registry builds URLs from.
        h.insert("x-forwarded-host", "evil.example.net".parse().unwrap());
        h.insert(
            "forwarded",
            "host=evil.example.net;proto=https".parse().unwrap(),
        );
        h.insert(header::HOST, "regtee.example.com:5000".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        let host = HeaderValue::from_str(&up.authority()).unwrap();
        prepare_request(&mut h, &host, "192.0.2.7".parse().unwrap(), public.scheme());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-host"));
        assert!(!h.contains_key("forwarded"));
        assert_eq!(h[header::HOST], "harbor.internal");
        assert_eq!(h[header::AUTHORIZATION], "Bearer abc");
    }

    /// Every scheme combination of listener × Harbor × what Harbor's front wrote.
    #[test]
    fn locations_pointing_back_are_rebased_whatever_scheme_a_front_put_on_them() {
        let path = "/v2/a/blobs/uploads/1?_state=x";
        for (upstream, public, location) in [
            // HTTPS Harbor, plain listener: nginx's $scheme on the upstream's Host.
            (
                "https://harbor.internal",
                "http://regtee:5000",
                "https://harbor.internal",
            ),
            // The same with the default port written out.
            (
                "https://harbor.internal",
                "http://regtee:5000",
                "https://harbor.internal:443",
            ),
            // A front that also set X-Forwarded-Host: regtee's host with Harbor's scheme.
            (
                "https://harbor.internal",
                "http://regtee:5000",
                "https://regtee:5000",
            ),
            // HTTP Harbor behind regtee's HTTPS listener.
            (
                "http://harbor.internal:8080",
                "https://regtee:5443",
                "http://harbor.internal:8080",
            ),
            (
                "http://harbor.internal:8080",
                "https://regtee:5443",
                "http://regtee:5443",
            ),
            // HTTP Harbor that passed X-Forwarded-Proto through (Harbor's HTTP template).
            (
                "http://harbor.internal:8080",
                "https://regtee:5443",
                "https://harbor.internal:8080",
            ),
            // A TLS-terminating balancer before Harbor: plain scheme, default ports omitted.
            (
                "https://harbor.internal",
                "http://regtee:5000",
                "http://harbor.internal",
            ),
            // Default ports on the client's side.
            (
                "https://harbor.internal",
                "https://registry.example.com",
                "https://harbor.internal",
            ),
            (
                "https://harbor.internal",
                "http://registry.example.com",
                "https://registry.example.com",
            ),
            // IPv6 literals on both sides.
            (
                "https://[fd00::5]:8443",
                "http://[::1]:5000",
                "https://[fd00::5]:8443",
            ),
            (
                "https://[fd00::5]:8443",
                "https://[::1]:5443",
                "http://[::1]:5443",
            ),
        ] {
            assert_eq!(
                location_after(upstream, public, &format!("{location}{path}")),
                format!("{public}{path}"),
                "Harbor {upstream}, client at {public}, Location {location}"
            );
        }
    }

    #[test]
    fn relative_foreign_and_already_right_locations_are_kept() {
        for keep in [
            "/v2/a/blobs/uploads/1",
            "https://s3.amazonaws.com/bucket/blob?sig=1",
            "https://harbor.internal:9443/elsewhere",
            "http://regtee:5000/v2/a/blobs/uploads/1",
            "not a url",
        ] {
            assert_eq!(
                location_after("https://harbor.internal", "http://regtee:5000", keep),
                keep
            );
        }
    }

    #[test]
    fn link_targets_are_rebased() {
        let (up, public) = (
            o("https://harbor.internal"),
            o("http://regtee.example.com:5000"),
        );
        let rebase = Rebase {
            upstream: &up,
            public: &public,
        };
        assert_eq!(
            rebase
                .link(r#"<https://harbor.internal/v2/a/tags/list?last=b&n=1>; rel="next""#)
                .as_deref(),
            Some(r#"<http://regtee.example.com:5000/v2/a/tags/list?last=b&n=1>; rel="next""#)
        );
        assert_eq!(
            rebase
                .link(r#"<https://regtee.example.com:5000/v2/a/tags/list?n=1>; rel="next""#)
                .as_deref(),
            Some(r#"<http://regtee.example.com:5000/v2/a/tags/list?n=1>; rel="next""#)
        );
        assert_eq!(rebase.link(r#"</v2/a/tags/list?n=1>; rel="next""#), None);
    }

    fn challenge_after(
        upstream: &str,
        public: &str,
        value: &str,
        relay: RealmRewrite<'_>,
    ) -> String {
        let (upstream, public) = (o(upstream), o(public));
        let mut h = HeaderMap::new();
        h.append(header::WWW_AUTHENTICATE, value.parse().unwrap());
        let rebase = Rebase {
            upstream: &upstream,
            public: &public,
        };
        rewrite_response(&mut h, &rebase, relay);
        h[header::WWW_AUTHENTICATE].to_str().unwrap().to_string()
    }

    #[test]
    fn realms_pointing_back_are_rebased_and_foreign_ones_relayed() {
        let harbor =
            r#"Bearer realm="https://harbor.internal/service/token",service="harbor-registry""#;
        assert_eq!(
            challenge_after(
                "https://harbor.internal",
                "http://regtee:5000",
                harbor,
                RealmRewrite::SameOriginOnly
            ),
            r#"Bearer realm="http://regtee:5000/service/token",service="harbor-registry""#
        );
        // Harbor's ext_endpoint on HTTP while regtee reaches it over HTTPS, same host.
        let plain =
            r#"Bearer realm="http://harbor.internal/service/token",service="harbor-registry""#;
        assert_eq!(
            challenge_after(
                "https://harbor.internal",
                "https://[::1]:5443",
                plain,
                RealmRewrite::SameOriginOnly
            ),
            r#"Bearer realm="https://[::1]:5443/service/token",service="harbor-registry""#
        );
        let foreign = r#"Bearer realm="https://auth.example.net/token",service="reg",scope="repository:a:pull""#;
        let relay = |realm: &str| {
            assert_eq!(realm, "https://auth.example.net/token");
            Some("/_regtee/token/abc".to_string())
        };
        assert_eq!(
            challenge_after(
                "https://harbor.internal",
                "http://regtee:5000",
                foreign,
                RealmRewrite::Relay(&relay)
            ),
            r#"Bearer realm="http://regtee:5000/_regtee/token/abc",service="reg",scope="repository:a:pull""#
        );
        // A full relay table leaves the realm as it was.
        let full = |_: &str| None;
        assert_eq!(
            challenge_after(
                "https://harbor.internal",
                "http://regtee:5000",
                foreign,
                RealmRewrite::Relay(&full)
            ),
            foreign
        );
        assert_eq!(
            challenge_after(
                "https://harbor.internal",
                "http://regtee:5000",
                foreign,
                RealmRewrite::SameOriginOnly
            ),
            foreign
        );
    }

    #[test]
    fn public_origin_prefers_authority_then_host_then_socket() {
        let local: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "reg.example.com:5000".parse().unwrap());
        let o = public_origin(
            Scheme::Http,
            &"/v2/".parse().unwrap(),
            h.get(header::HOST),
            local,
        );
        assert_eq!(o.to_string(), "http://reg.example.com:5000");
        let o = public_origin(
            Scheme::Https,
            &"https://h2.example.com/v2/".parse().unwrap(),
            h.get(header::HOST),
            local,
        );
        assert_eq!(o.to_string(), "https://h2.example.com");
        let o = public_origin(Scheme::Http, &"/v2/".parse().unwrap(), None, local);
        assert_eq!(o.to_string(), "http://127.0.0.1:5000");
        let mut bad = HeaderMap::new();
        bad.insert(header::HOST, "a b".parse().unwrap());
        let v6: std::net::SocketAddr = "[::1]:5443".parse().unwrap();
        let o = public_origin(
            Scheme::Https,
            &"/v2/".parse().unwrap(),
            bad.get(header::HOST),
            v6,
        );
        assert_eq!(o.to_string(), "https://[::1]:5443");
    }

    mod properties {
        use super::*;
        use crate::arbitrary::{CASES, path_text};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            /// Whatever an upstream puts in Location, Link or a challenge, rewriting does not
            /// panic, and a rewritten URL points at the client's origin.
            #[test]
            fn rewriting_never_panics_and_only_points_at_the_client(
                tail in path_text(),
                scheme in prop_oneof![Just("http"), Just("https"), Just("ftp"), Just("")],
                host in prop_oneof![Just("harbor.internal"), Just("regtee:5000"), Just("[::1]:5443"), Just("elsewhere")],
                junk in any::<String>(),
            ) {
                let upstream = Origin::parse("https://harbor.internal").unwrap();
                let public = Origin::parse("http://regtee:5000").unwrap();
                let rebase = Rebase { upstream: &upstream, public: &public };
                let url = format!("{scheme}://{host}/{tail}");
                if let Some(new) = rebase.url(&url) {
                    prop_assert!(new.starts_with("http://regtee:5000/"));
                }
                let _ = rebase.link(&format!("<{url}>; rel=\"next\", <{junk}>"));
                let _ = rebase.url(&junk);
                let mut h = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&format!("Bearer realm=\"{url}\",service=\"{tail}\"")) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
                if let Ok(v) = HeaderValue::from_str(&url) {
                    h.insert(header::LOCATION, v);
                }
                let relay = |_: &str| Some("/_regtee/token/x".to_string());
                rewrite_response(&mut h, &rebase, RealmRewrite::Relay(&relay));
            }
        }
    }
}
