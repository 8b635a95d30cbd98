//! `WWW-Authenticate` challenges (RFC 9110 §11.6.1): a scheme and its parameters.
//!
//! The proxy rewrites them (so clients fetch tokens through regtee) and the registry client
//! answers them (to push to targets); both read and write challenges with this one parser.

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
    pub(crate) fn set_param(&mut self, key: &str, value: String) {
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
    }

    /// Whether this is a Bearer (token) challenge.
    pub(crate) fn is_bearer(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("bearer")
    }

    /// Whether this is a Basic challenge.
    pub(crate) fn is_basic(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("basic")
    }

    /// The header value, parameters quoted.
    pub(crate) fn to_header_value(&self) -> String {
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
            }
        }
    }
}
