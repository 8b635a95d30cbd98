//! Repository names, tags and references, as the OCI distribution spec defines them.
//!
//! Every name that enters regtee (a request path, a webhook, the admin API, the command line, a
//! row of the queue) is checked here before anything is built from it. A name that passes is safe
//! to put in a URL path, a token scope and a filter, and means what the registry will store: the
//! request path is percent-decoded first, as the registry decodes it.
//!
//! Grammar (distribution spec, "Pulling manifests"):
//! `<name>` = `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
//! `<tag>` = `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;

/// distribution's limit on a repository name (`reference.NameTotalLengthMax`).
pub(crate) const MAX_NAME_LEN: usize = 255;

/// A repository name that matches the spec's grammar, e.g. `library/nginx`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepositoryName(String);

/// A tag that matches the spec's grammar, e.g. `v1.2.3`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

/// What a manifest is addressed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Reference {
    /// By tag.
    Tag(Tag),
    /// By digest.
    Digest(Digest),
}

/// Text that is not a valid name, tag or project; the message says which rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a repository name.
    #[error("`{0}` is not a repository name: {1}")]
    Repository(String, &'static str),
    /// Not a tag.
    #[error("`{0}` is not a tag: {1}")]
    Tag(String, &'static str),
    /// Neither a tag nor a digest.
    #[error("`{0}` is neither a tag nor a digest (sha256:<64 hex>)")]
    Reference(String),
    /// Not a project (one path component).
    #[error("`{0}` is not a project name: {1}")]
    Project(String, &'static str),
}

/// Shortens hostile input for error messages: at most 80 characters, control characters shown
/// escaped, so a name can be quoted in a log line without forging another.
fn shown(text: &str) -> String {
    let mut out: String = text.chars().take(80).flat_map(char::escape_debug).collect();
    if text.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn component_error(component: &str) -> Option<&'static str> {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() {
        return Some("empty path component (leading, trailing or double `/`)");
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Some("each component must start and end with a lowercase letter or digit");
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let allowed = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !allowed {
            return Some(
                "only lowercase letters, digits and the separators `.`, `_`, `__` and `-` are allowed",
            );
        }
    }
    None
}

impl FromStr for RepositoryName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<RepositoryName, NameError> {
        let bad = |why| NameError::Repository(shown(s), why);
        if s.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 characters"));
        }
        if let Some(why) = s.split('/').find_map(component_error) {
            return Err(bad(why));
        }
        Ok(RepositoryName(s.to_string()))
    }
}

impl RepositoryName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its first component: the Harbor project, or the namespace on a cloud registry.
    pub fn project(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Tag, NameError> {
        let bad = |why| NameError::Tag(shown(s), why);
        let bytes = s.as_bytes();
        let Some(&first) = bytes.first() else {
            return Err(bad("empty"));
        };
        if bytes.len() > 128 {
            return Err(bad("longer than 128 characters"));
        }
        if !(first.is_ascii_alphanumeric() || first == b'_') {
            return Err(bad("must start with a letter, a digit or `_`"));
        }
        if !bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad("only letters, digits, `.`, `_` and `-` are allowed"));
        }
        Ok(Tag(s.to_string()))
    }
}

impl Tag {
    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Reference {
    type Err = NameError;

    /// A digest if it has the digest's shape, else a tag (a tag has no `:`).
    fn from_str(s: &str) -> Result<Reference, NameError> {
        if s.contains(':') {
            return s
                .parse()
                .map(Reference::Digest)
                .map_err(|_| NameError::Reference(shown(s)));
        }
        s.parse()
            .map(Reference::Tag)
            .map_err(|_| NameError::Reference(shown(s)))
    }
}

impl Reference {
    /// The tag, if addressed by tag.
    pub(crate) fn tag(&self) -> Option<&Tag> {
        match self {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }

    /// The digest, if addressed by digest.
    pub(crate) fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

/// Checks a Harbor project name (one component of a repository name).
pub(crate) fn project(s: &str) -> Result<&str, NameError> {
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::Project(shown(s), "longer than 255 characters"));
    }
    match component_error(s) {
        None => Ok(s),
        Some(why) => Err(NameError::Project(shown(s), why)),
    }
}

/// Decodes `%XX` escapes the way the registry does before routing. `None` for escapes that do
/// not decode to UTF-8 (no valid name or tag contains such bytes).
pub(crate) fn percent_decode(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !path.contains('%') {
        return Some(std::borrow::Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

impl TryFrom<String> for RepositoryName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<RepositoryName> for String {
    fn from(v: RepositoryName) -> String {
        v.0
    }
}

impl TryFrom<String> for Tag {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<Tag> for String {
    fn from(v: Tag) -> String {
        v.0
    }
}

impl AsRef<str> for RepositoryName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for good in [
            "a",
            "library/nginx",
            "a/b/c/d",
            "my-app",
            "my--app",
            "my.app",
            "my_app",
            "my__app",
            "0/1",
            &"a".repeat(255),
        ] {
            assert!(good.parse::<RepositoryName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "A",
            "library/Nginx",
            "has space",
            "lib rary",
            "a/../b",
            "a/./b",
            "-a",
            "a-",
            "a___b",
            "a._b",
            "a.-b",
            "a:b",
            "a%2Fb",
            "ä",
            &"a".repeat(256),
        ] {
            assert!(bad.parse::<RepositoryName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        for good in [
            "v1",
            "latest",
            "_x",
            "1.0.0-rc.1",
            "A_b-C.d",
            &"a".repeat(128),
        ] {
            assert!(good.parse::<Tag>().is_ok(), "{good}");
        }
        for bad in [
            "",
            ".v1",
            "-v1",
            "v 1",
            "v/1",
            "v:1",
            "v%31",
            &"a".repeat(129),
        ] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!("sha256:short".parse::<Reference>().is_err());
        assert!("".parse::<Reference>().is_err());
    }

    #[test]
    fn projects_are_one_component() {
        assert_eq!(project("library"), Ok("library"));
        assert!(project("lib rary").is_err());
        assert!(project("a/b").is_err());
        assert!(project("").is_err());
    }

    #[test]
    fn percent_decoding_matches_what_the_registry_stores() {
        assert_eq!(
            percent_decode("/v2/librar%79/enc/manifests/%76%31").unwrap(),
            "/v2/library/enc/manifests/v1"
        );
        assert_eq!(
            percent_decode("/v2/library%2Fprivate-x/manifests/v1").unwrap(),
            "/v2/library/private-x/manifests/v1"
        );
        // A lone or malformed escape stays as it is (and then fails the grammar).
        assert_eq!(percent_decode("/v2/a%zz").unwrap(), "/v2/a%zz");
        assert_eq!(percent_decode("/v2/a%").unwrap(), "/v2/a%");
        assert!(percent_decode("/v2/%ff").is_none());
    }

    #[test]
    fn hostile_text_is_shortened_and_escaped_in_errors() {
        let e = "a\nb".parse::<RepositoryName>().unwrap_err().to_string();
        assert!(e.contains("a\\nb"), "{e}");
        let e = "x"
            .repeat(500)
            .parse::<RepositoryName>()
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{e}");
    }

    mod properties {
        use super::*;
        use crate::arbitrary::{CASES, path_text};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            /// What passes is safe in a URL path and a token scope: it joins onto an origin,
            /// has no escapes, dot segments, empty segments or characters that need quoting.
            #[test]
            fn accepted_names_are_safe_to_build_urls_from(text in path_text()) {
                if let Ok(name) = text.parse::<RepositoryName>() {
                    prop_assert_eq!(name.as_str(), text.as_str());
                    prop_assert!(name.as_str().split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                    let origin = crate::origin::Origin::parse("https://h").unwrap();
                    let path = format!("/v2/{name}/tags/list");
                    prop_assert!(origin.join(&path).is_ok());
                    prop_assert!(!name.as_str().contains([':', '%', ' ', '?', '#']));
                }
                if let Ok(tag) = text.parse::<Tag>() {
                    prop_assert!(tag.as_str().len() <= 128 && !tag.as_str().contains(['/', ':', '%']));
                }
                let _ = text.parse::<Reference>();
                let _ = project(&text);
                let _ = percent_decode(&text);
            }

            #[test]
            fn arbitrary_unicode_never_panics(text in any::<String>()) {
                let _ = text.parse::<RepositoryName>();
                let _ = text.parse::<Tag>();
                let _ = text.parse::<Reference>();
                let _ = percent_decode(&text);
            }
        }
    }
}
