//! The vocabulary of jobs: what a job copies, where it stands, why it exists, and how its
//! attempts ended. Each is a type where decisions are made, and a stable string in the database.

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;
use crate::oci::names::{RepositoryName, Tag};

/// What a job copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobKind {
    /// One blob (layer or config), so the manifest finds it there.
    Blob,
    /// A manifest or index, with everything it references, then its tag.
    Manifest,
    /// Delete a manifest on the target (only when the target propagates deletes).
    Delete,
}

impl JobKind {
    /// The lowercase name used in the database, the API, logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobKind::Blob => "blob",
            JobKind::Manifest => "manifest",
            JobKind::Delete => "delete",
        }
    }

    pub(crate) fn parse(s: &str) -> JobKind {
        match s {
            "blob" => JobKind::Blob,
            "delete" => JobKind::Delete,
            _ => JobKind::Manifest,
        }
    }
}

/// Where a job's state stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker (possibly until its next retry time).
    Pending,
    /// A worker has it.
    Running,
    /// The target has the content, digest verified.
    Done,
    /// Deliberately not copied (e.g. the tag exists there with another digest and
    /// `overwrite = false`); the detail says why.
    Skipped,
    /// Retrying cannot help; the detail says what a person must do.
    Failed,
}

impl JobState {
    /// The lowercase name used in the database, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Skipped => "skipped",
            JobState::Failed => "failed",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "skipped" => JobState::Skipped,
            "failed" => JobState::Failed,
            _ => return None,
        })
    }

    /// Every state, in display order.
    pub const ALL: [JobState; 5] = [
        JobState::Pending,
        JobState::Running,
        JobState::Done,
        JobState::Skipped,
        JobState::Failed,
    ];
}

/// What made regtee create a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobOrigin {
    /// Seen on the wire as a completed push.
    Push,
    /// A backfill someone started.
    Backfill,
    /// The periodic comparison.
    Reconcile,
    /// A Harbor or registry webhook.
    Webhook,
}

impl JobOrigin {
    /// The stable name stored in the database.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobOrigin::Push => "push",
            JobOrigin::Backfill => "backfill",
            JobOrigin::Reconcile => "reconcile",
            JobOrigin::Webhook => "webhook",
        }
    }

    /// From the stored name (an unknown one reads as a push: it changes only what is shown).
    pub(crate) fn parse(s: &str) -> JobOrigin {
        match s {
            "backfill" => JobOrigin::Backfill,
            "reconcile" => JobOrigin::Reconcile,
            "webhook" => JobOrigin::Webhook,
            _ => JobOrigin::Push,
        }
    }

    /// Whether the job follows a push someone just made: mirror lag is measured for those.
    pub(crate) fn is_live(self) -> bool {
        matches!(self, JobOrigin::Push | JobOrigin::Webhook)
    }
}

/// Why an attempt did not succeed, in a few classes: for metrics, job records and hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorClass {
    /// No connection.
    Unreachable,
    /// No answer in time.
    Timeout,
    /// A certificate or handshake problem.
    Tls,
    /// Credentials rejected.
    Auth,
    /// Not allowed, or the namespace is missing.
    Denied,
    /// Not there.
    NotFound,
    /// Too many requests.
    RateLimited,
    /// Refused as invalid.
    Rejected,
    /// A server error.
    Server,
    /// A stream broke, or bytes did not match their digest.
    Transfer,
    /// An answer that makes no sense.
    Protocol,
    /// The content or the job itself is unusable.
    Invalid,
    /// regtee failed (a bug).
    Internal,
    /// Stopped by shutdown.
    Shutdown,
}

impl ErrorClass {
    /// Every class, for metrics and parsing.
    pub(crate) const ALL: [ErrorClass; 14] = [
        ErrorClass::Unreachable,
        ErrorClass::Timeout,
        ErrorClass::Tls,
        ErrorClass::Auth,
        ErrorClass::Denied,
        ErrorClass::NotFound,
        ErrorClass::RateLimited,
        ErrorClass::Rejected,
        ErrorClass::Server,
        ErrorClass::Transfer,
        ErrorClass::Protocol,
        ErrorClass::Invalid,
        ErrorClass::Internal,
        ErrorClass::Shutdown,
    ];

    /// The stable name stored in the database and used as a metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Unreachable => "unreachable",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Tls => "tls",
            ErrorClass::Auth => "auth",
            ErrorClass::Denied => "denied",
            ErrorClass::NotFound => "not_found",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Rejected => "rejected",
            ErrorClass::Server => "server",
            ErrorClass::Transfer => "transfer",
            ErrorClass::Protocol => "protocol",
            ErrorClass::Invalid => "invalid",
            ErrorClass::Internal => "internal",
            ErrorClass::Shutdown => "shutdown",
        }
    }

    /// From the stored name.
    pub(crate) fn parse(s: &str) -> Option<ErrorClass> {
        ErrorClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// How one attempt ended, as its history records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AttemptResult {
    /// Copied.
    Done,
    /// Deliberately not copied.
    Skipped,
    /// Retrying cannot help.
    Failed,
    /// Tried again later.
    Retry,
}

impl AttemptResult {
    /// The stable name stored in the database.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Done => "done",
            AttemptResult::Skipped => "skipped",
            AttemptResult::Failed => "failed",
            AttemptResult::Retry => "retry",
        }
    }

    /// From the stored name.
    pub(crate) fn parse(s: &str) -> AttemptResult {
        match s {
            "done" => AttemptResult::Done,
            "skipped" => AttemptResult::Skipped,
            "failed" => AttemptResult::Failed,
            _ => AttemptResult::Retry,
        }
    }
}

/// A job to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NewJob {
    /// Target name.
    pub target: String,
    /// What to copy.
    pub kind: JobKind,
    /// Harbor repository.
    pub repository: RepositoryName,
    /// Tag, if the push named one.
    pub tag: Option<Tag>,
    /// Digest, when known (a job without one resolves the tag in Harbor).
    pub digest: Option<Digest>,
    /// For blob mounts: the Harbor repository the blob came from.
    pub mount_from: Option<RepositoryName>,
    /// Why the job exists.
    pub origin: JobOrigin,
    /// Where to copy from: a target's name, when the write happened there (the primary was a
    /// target); `None` for Harbor.
    pub source: Option<String>,
}

/// A job as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Job {
    /// Stable id.
    pub id: i64,
    /// Target name.
    pub target: String,
    /// What it copies.
    pub kind: JobKind,
    /// Harbor repository.
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest, if known.
    pub digest: Option<String>,
    /// For mounts: source repository in Harbor.
    pub mount_from: Option<String>,
    /// Why it exists.
    pub origin: JobOrigin,
    /// Current state.
    pub state: JobState,
    /// Attempts started so far.
    pub attempts: u32,
    /// When Harbor acknowledged the push (ms since the epoch); mirror lag starts here.
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Earliest next attempt (ms).
    pub next_attempt_at: i64,
    /// When it reached done, skipped or failed (ms).
    pub finished_at: Option<i64>,
    /// The outcome's reason, or the last error while retrying.
    pub detail: String,
    /// The class of the last error, if the last attempt failed.
    pub error_class: Option<ErrorClass>,
    /// The digest the target reported.
    pub target_digest: Option<String>,
    /// Where it copies from: a target's name, or `None` for Harbor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One attempt at a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Attempt {
    /// When it started (ms).
    pub started_at: i64,
    /// When it ended (ms).
    pub finished_at: i64,
    /// How it ended.
    pub result: AttemptResult,
    /// What happened.
    pub detail: String,
}

/// How a finished attempt ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// Copied; the target's digest.
    Done {
        /// As the target reported it.
        target_digest: Option<String>,
        /// A note for the record (e.g. "already present").
        note: String,
    },
    /// Deliberately not copied.
    Skipped {
        /// Why, with both digests where relevant.
        reason: String,
    },
    /// Retrying cannot help.
    Failed {
        /// What a person must do.
        reason: String,
        /// The error's class.
        class: ErrorClass,
    },
    /// Try again at a later time.
    RetryAt {
        /// When (ms since the epoch).
        at: i64,
        /// The error.
        error: String,
        /// The error's class.
        class: ErrorClass,
    },
}

impl Outcome {
    /// The outcome with its texts scrubbed of anything secret-shaped: they quote other servers.
    pub(crate) fn scrubbed(self) -> Outcome {
        use crate::redact::scrub;
        match self {
            Outcome::Done {
                target_digest,
                note,
            } => Outcome::Done {
                target_digest,
                note: scrub(&note),
            },
            Outcome::Skipped { reason } => Outcome::Skipped {
                reason: scrub(&reason),
            },
            Outcome::Failed { reason, class } => Outcome::Failed {
                reason: scrub(&reason),
                class,
            },
            Outcome::RetryAt { at, error, class } => Outcome::RetryAt {
                at,
                error: scrub(&error),
                class,
            },
        }
    }
}

/// Filters for listing jobs.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this target.
    pub target: Option<String>,
    /// Only this repository.
    pub repository: Option<String>,
    /// Only repositories of this Harbor project.
    pub project: Option<String>,
    /// Only ids below this one (the next page).
    pub before_id: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// A replica sharing a PostgreSQL queue, as its heartbeats show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Replica {
    /// Host name, process id and start time.
    pub id: String,
    /// Host it runs on.
    pub host: String,
    /// regtee's version.
    pub version: String,
    /// When it started (ms).
    pub started_at: i64,
    /// Its last heartbeat (ms); every third of a lease while it lives.
    pub heartbeat_at: i64,
    /// Jobs it is running now.
    pub jobs_in_hand: u64,
}

/// How many jobs of one target in one state, and when the oldest unfinished one was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StateCount {
    pub(crate) target: String,
    pub(crate) state: JobState,
    pub(crate) jobs: u64,
    pub(crate) oldest_unfinished_at: Option<i64>,
}

/// Per-target counts for status displays and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct TargetCounts {
    /// Target name.
    pub target: String,
    /// Jobs waiting.
    pub pending: u64,
    /// Jobs being copied.
    pub running: u64,
    /// Jobs done (within retention).
    pub done: u64,
    /// Jobs skipped (within retention).
    pub skipped: u64,
    /// Jobs failed.
    pub failed: u64,
    /// When the oldest unfinished job was created (ms), if any.
    pub oldest_pending_at: Option<i64>,
}

impl TargetCounts {
    /// Counts from rows ordered by target; every name in `configured` gets a row, so a target
    /// with no jobs yet still shows (and exports zeros).
    pub(crate) fn tally(
        rows: impl IntoIterator<Item = StateCount>,
        configured: &[String],
    ) -> Vec<TargetCounts> {
        let mut out: Vec<TargetCounts> = Vec::new();
        for row in rows {
            if out.last().is_none_or(|c| c.target != row.target) {
                out.push(TargetCounts {
                    target: row.target.clone(),
                    ..Default::default()
                });
            }
            let Some(entry) = out.last_mut() else {
                continue;
            };
            let n = row.jobs;
            match row.state {
                JobState::Pending => entry.pending = n,
                JobState::Running => entry.running = n,
                JobState::Done => entry.done = n,
                JobState::Skipped => entry.skipped = n,
                JobState::Failed => entry.failed = n,
            }
            if let Some(o) = row.oldest_unfinished_at {
                entry.oldest_pending_at = Some(entry.oldest_pending_at.map_or(o, |p| p.min(o)));
            }
        }
        for name in configured {
            if !out.iter().any(|c| &c.target == name) {
                out.push(TargetCounts {
                    target: name.clone(),
                    ..Default::default()
                });
            }
        }
        out
    }
}
