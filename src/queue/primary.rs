//! The primary: the registry clients' `/v2/` requests are carried out on. Harbor until a
//! cutover names a target; kept in the queue's database, so every replica follows a switch and
//! keeps it across restarts.

use serde::{Deserialize, Serialize};

/// The name Harbor goes by where a target's name could stand: as the primary, and as the
/// destination of what is mirrored back from a primary target. No target may take it.
pub(crate) const UPSTREAM: &str = "upstream";

/// The setting's name in the store.
pub(super) const SETTING: &str = "primary";

/// Which registry serves clients.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub(crate) enum Primary {
    /// Harbor (`[upstream]`).
    #[default]
    Upstream,
    /// The target of this name.
    Target(String),
}

impl Primary {
    /// As operators write it: `upstream` or the target's name.
    pub(crate) fn parse(name: &str) -> Primary {
        match name {
            UPSTREAM => Primary::Upstream,
            target => Primary::Target(target.to_string()),
        }
    }

    /// `upstream` or the target's name.
    pub(crate) fn name(&self) -> &str {
        match self {
            Primary::Upstream => UPSTREAM,
            Primary::Target(name) => name,
        }
    }

    /// The target serving clients, if one does.
    pub(crate) fn target(&self) -> Option<&str> {
        match self {
            Primary::Upstream => None,
            Primary::Target(name) => Some(name),
        }
    }
}

/// The primary as recorded: since when, and who switched to it how.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PrimaryRecord {
    pub(crate) primary: Primary,
    /// When it became the primary (ms since the epoch); 0 for Harbor from the start.
    pub(crate) since: i64,
    /// Who switched (the admin API's caller as it named itself, or the command line's user).
    pub(crate) by: String,
    /// Whether the switch overrode the gate (`--force`).
    pub(crate) forced: bool,
}
