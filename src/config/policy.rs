//! A target's routing rules: what it wants (repository and tag filters) and under which name
//! (namespace mapping). Plain configuration, decided once when the file is read.
//!
//! Filters use Harbor's doublestar globs (`*` stays inside one path segment, `**` crosses them), so
//! rules copied from Harbor replication policies mean the same thing here.

use std::collections::BTreeMap;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// The routing rules of one target.
#[derive(Clone, Debug)]
pub struct TargetPolicy {
    namespaces: BTreeMap<String, String>,
    include: GlobSet,
    exclude: GlobSet,
    tags: GlobSet,
    every_tag: bool,
}

/// A rule that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TargetPolicyError {
    /// A glob that does not parse.
    #[error("`{pattern}` is not a valid glob: {message}")]
    Glob {
        /// `include`, `exclude` or `tags`.
        field: &'static str,
        /// The pattern.
        pattern: String,
        /// The parser's reason.
        message: String,
    },
    /// A mapping whose key or value is not a repository path.
    #[error(
        "`{0}` = `{1}`: the project must be one name component and the namespace a repository path, as the distribution spec spells them (lower case, no leading, trailing or double `/`)"
    )]
    Namespace(String, String),
}

fn glob_set(field: &'static str, patterns: &[String]) -> Result<GlobSet, TargetPolicyError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob: Glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| TargetPolicyError::Glob {
                field,
                pattern: pattern.clone(),
                message: e.kind().to_string(),
            })?;
        set.add(glob);
    }
    set.build().map_err(|e| TargetPolicyError::Glob {
        field,
        pattern: patterns.join(", "),
        message: e.to_string(),
    })
}

impl TargetPolicy {
    /// Builds a policy; `namespaces` maps a Harbor project to a target namespace.
    pub fn new(
        namespaces: BTreeMap<String, String>,
        include: &[String],
        exclude: &[String],
        tags: &[String],
    ) -> Result<TargetPolicy, TargetPolicyError> {
        // A project is one component of a name, a namespace one or more (the spec's grammar).
        let valid = |k: &str, v: &str| {
            crate::oci::names::project(k).is_ok()
                && v.parse::<crate::oci::names::RepositoryName>().is_ok()
        };
        if let Some((k, v)) = namespaces.iter().find(|(k, v)| !valid(k, v)) {
            return Err(TargetPolicyError::Namespace(k.clone(), v.clone()));
        }
        Ok(TargetPolicy {
            namespaces,
            include: glob_set("include", include)?,
            exclude: glob_set("exclude", exclude)?,
            tags: glob_set("tags", tags)?,
            // Tags never contain `/`, so `*` takes every tag as `**` does.
            every_tag: tags.iter().any(|t| t == "**" || t == "*"),
        })
    }

    /// Every repository and tag, under its own name: Harbor as a destination (mirroring back
    /// from a target that is the primary).
    pub fn identity() -> TargetPolicy {
        let every = ["**".to_string()];
        TargetPolicy {
            namespaces: BTreeMap::new(),
            include: glob_set("include", &every).unwrap_or_else(|_| GlobSet::empty()),
            exclude: GlobSet::empty(),
            tags: glob_set("tags", &every).unwrap_or_else(|_| GlobSet::empty()),
            every_tag: true,
        }
    }

    /// Whether pushes to this Harbor repository go to the target.
    pub fn wants_repository(&self, repository: &str) -> bool {
        self.include.is_match(repository) && !self.exclude.is_match(repository)
    }

    /// Whether pushes of this tag go to the target (pushes by digest always do).
    pub fn wants_tag(&self, tag: &str) -> bool {
        self.tags.is_match(tag)
    }

    /// Whether every tag is taken. Only then are blobs copied before their manifest arrives:
    /// with a tag filter, a blob may belong to an image the target will never receive.
    pub fn takes_every_tag(&self) -> bool {
        self.every_tag
    }

    /// The repository's name on the target: its project replaced by the mapped namespace.
    pub fn target_repository(&self, repository: &str) -> String {
        let (project, rest) = match repository.split_once('/') {
            Some((p, r)) => (p, Some(r)),
            None => (repository, None),
        };
        match (self.namespaces.get(project), rest) {
            (Some(ns), Some(rest)) => format!("{ns}/{rest}"),
            (Some(ns), None) => ns.clone(),
            (None, _) => repository.to_string(),
        }
    }

    /// The Harbor repository a repository of the target stands for ([`Self::target_repository`]
    /// undone); `None` for a name no Harbor repository lands on.
    pub fn harbor_repository(&self, target: &str) -> Option<String> {
        for (project, namespace) in &self.namespaces {
            if target == namespace {
                return Some(project.clone());
            }
            if let Some(rest) = target
                .strip_prefix(namespace.as_str())
                .and_then(|r| r.strip_prefix('/'))
            {
                return Some(format!("{project}/{rest}"));
            }
        }
        let project = target.split('/').next()?;
        (!self.namespaces.contains_key(project)).then(|| target.to_string())
    }

    /// The target namespace a Harbor project lands in.
    pub fn target_namespace<'a>(&'a self, project: &'a str) -> &'a str {
        self.namespaces
            .get(project)
            .map(String::as_str)
            .unwrap_or(project)
    }

    /// The Harbor projects named in the mapping.
    pub fn mapped_projects(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(include: &[&str], exclude: &[&str], tags: &[&str]) -> TargetPolicy {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ns = BTreeMap::from([("library".to_string(), "prod-lib".to_string())]);
        TargetPolicy::new(ns, &s(include), &s(exclude), &s(tags)).unwrap()
    }

    #[test]
    fn doublestar_crosses_segments_and_star_does_not() {
        let p = policy(&["library/*"], &[], &["**"]);
        assert!(p.wants_repository("library/nginx"));
        assert!(!p.wants_repository("library/team/nginx"));
        let p = policy(&["library/**"], &[], &["**"]);
        assert!(p.wants_repository("library/team/nginx"));
        assert!(!p.wants_repository("other/nginx"));
    }

    #[test]
    fn exclude_wins_over_include() {
        let p = policy(&["**"], &["**/tmp-*"], &["**"]);
        assert!(p.wants_repository("library/nginx"));
        assert!(!p.wants_repository("library/tmp-build"));
    }

    #[test]
    fn tag_filters() {
        let p = policy(&["**"], &[], &["v*", "release-**"]);
        assert!(!p.takes_every_tag());
        assert!(policy(&["**"], &[], &["**"]).takes_every_tag());
        assert!(p.wants_tag("v1.2.3"));
        assert!(p.wants_tag("release-2024"));
        assert!(!p.wants_tag("latest"));
    }

    #[test]
    fn namespaces_map_the_project_only() {
        let p = policy(&["**"], &[], &["**"]);
        assert_eq!(p.target_repository("library/nginx"), "prod-lib/nginx");
        assert_eq!(p.target_repository("library/a/b"), "prod-lib/a/b");
        assert_eq!(p.target_repository("other/nginx"), "other/nginx");
        assert_eq!(p.target_repository("librarything/x"), "librarything/x");
    }

    #[test]
    fn a_target_name_maps_back_to_harbors_or_to_none() {
        let p = policy(&["**"], &[], &["**"]);
        assert_eq!(
            p.harbor_repository("prod-lib/nginx").as_deref(),
            Some("library/nginx")
        );
        assert_eq!(
            p.harbor_repository("prod-lib/a/b").as_deref(),
            Some("library/a/b")
        );
        assert_eq!(
            p.harbor_repository("other/nginx").as_deref(),
            Some("other/nginx")
        );
        assert_eq!(
            p.harbor_repository("prod-libx/y").as_deref(),
            Some("prod-libx/y")
        );
        assert_eq!(
            p.harbor_repository("library/nginx"),
            None,
            "library lands elsewhere"
        );
        for name in ["library/nginx", "library/a/b", "other/x"] {
            assert_eq!(
                p.harbor_repository(&p.target_repository(name)).as_deref(),
                Some(name)
            );
        }
        let identity = TargetPolicy::identity();
        assert!(identity.wants_repository("a/b/c") && identity.wants_tag("v1"));
        assert_eq!(identity.target_repository("library/x"), "library/x");
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(TargetPolicy::new(BTreeMap::new(), &["a/[".to_string()], &[], &[]).is_err());
        for (k, v) in [
            ("Library", "x"),
            ("a/b", "x"),
            ("a", "x//y"),
            ("a", "-x"),
            ("a", ""),
        ] {
            let bad = BTreeMap::from([(k.to_string(), v.to_string())]);
            assert!(TargetPolicy::new(bad, &[], &[], &[]).is_err(), "{k} = {v}");
        }
    }
}
