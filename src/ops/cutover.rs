//! Switching the primary, and the gate in front of it.
//!
//! A switch to a target is refused while anything mirrored differs between Harbor and that
//! target (`regtee diff`, for the target alone) or while a job toward it is unfinished; the way
//! back (to `upstream`) while a job toward Harbor (what the primary target's writes mirror
//! back) is unfinished, or anything mirrored differs. Serving from a target also needs clients'
//! tokens checked locally: `[upstream] token_certificate`. `force` switches anyway, and says so.

use std::sync::Arc;

use crate::mirror::target::Target;
use crate::oci::digest::Digest;
use crate::ops::backfill::{self, ProjectEvent, TagStatus};
use crate::queue::{Primary, PrimaryRecord, Queue, UPSTREAM, now_ms};
use crate::registry::RegistryClient;

/// Lines of what differs shown at most; the rest are counted.
const SHOWN: usize = 20;

/// What a switch needs to know.
pub(crate) struct Cutover<'a> {
    pub(crate) queue: &'a Queue,
    pub(crate) upstream: &'a RegistryClient,
    pub(crate) targets: &'a [Arc<Target>],
    /// Whether `[upstream] token_certificate` is set.
    pub(crate) checks_tokens: bool,
}

/// How a switch ended.
#[derive(Debug)]
pub(crate) enum Switched {
    /// Recorded; every replica follows within a second.
    Done(PrimaryRecord),
    /// Refused by the gate: what stands in the way, one line each.
    Refused(Vec<String>),
}

impl Cutover<'_> {
    /// Switches to `to` (`upstream` or a target's name) unless the gate refuses; `by` says who.
    pub(crate) async fn switch(&self, to: &str, force: bool, by: &str) -> Result<Switched, String> {
        let to = Primary::parse(to);
        let current = self.queue.primary().await.map_err(|e| e.to_string())?;
        if let Primary::Target(name) = &to {
            if !self.targets.iter().any(|t| t.name() == name) {
                return Err(format!(
                    "no target is named {name}: the primary is upstream or one of the configured targets"
                ));
            }
            if !self.checks_tokens {
                return Err(
                    "a target can serve clients only when regtee checks their tokens as Harbor does: set [upstream] token_certificate (Harbor's registry root.crt) first"
                        .into(),
                );
            }
        }
        if current.primary == to {
            return Ok(Switched::Done(current));
        }
        let blocking = self.gate(&to).await;
        if !blocking.is_empty() && !force {
            return Ok(Switched::Refused(blocking));
        }
        if !blocking.is_empty() {
            tracing::warn!(
                to = to.name(),
                by,
                blocking = blocking.len(),
                first = %blocking[0],
                "primary switched with --force although the gate refused"
            );
        }
        let record = PrimaryRecord {
            primary: to,
            since: now_ms(),
            by: by.to_string(),
            forced: force && !blocking.is_empty(),
        };
        self.queue
            .set_primary(&record)
            .await
            .map_err(|e| e.to_string())?;
        tracing::warn!(
            primary = record.primary.name(),
            by,
            "primary switched: clients' requests are carried out on {} within a second on every replica",
            record.primary.name()
        );
        Ok(Switched::Done(record))
    }

    /// What stands in the way of `to` becoming the primary.
    pub(crate) async fn gate(&self, to: &Primary) -> Vec<String> {
        let (jobs_toward, compared) = match to {
            Primary::Upstream => (UPSTREAM.to_string(), self.targets.to_vec()),
            Primary::Target(name) => (
                name.clone(),
                self.targets
                    .iter()
                    .filter(|t| t.name() == name)
                    .cloned()
                    .collect(),
            ),
        };
        let mut blocking = self.unfinished(&jobs_toward).await;
        blocking.extend(self.differences(&compared).await);
        blocking
    }

    /// Unfinished jobs toward `target`, as lines.
    async fn unfinished(&self, target: &str) -> Vec<String> {
        let counts = match self.queue.counts(&[target.to_string()]).await {
            Ok(c) => c,
            Err(e) => return vec![format!("the job queue cannot be read: {e}")],
        };
        let Some(c) = counts.iter().find(|c| c.target == target) else {
            return Vec::new();
        };
        [
            (c.pending, "pending"),
            (c.running, "running"),
            (c.failed, "failed"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, state)| {
            format!(
                "{n} job(s) toward {target} are {state}: wait for them, or see regtee jobs --target {target}"
            )
        })
        .collect()
    }

    /// Tags that differ between Harbor and `targets`, as lines (`regtee diff`).
    async fn differences(&self, targets: &[Arc<Target>]) -> Vec<String> {
        if targets.is_empty() {
            return Vec::new();
        }
        let projects = match backfill::all_projects(self.upstream).await {
            Ok(p) => p,
            Err(e) => return vec![format!("Harbor's projects cannot be listed: {e}")],
        };
        let mut lines = Vec::new();
        let mut more = 0usize;
        for project in &projects {
            let listed = backfill::compare_project(self.upstream, targets, project, |event| {
                let row = match event {
                    ProjectEvent::Row(row) => row,
                    ProjectEvent::Error(e) => {
                        lines.push(format!("{project}: {e}"));
                        return;
                    }
                    _ => return,
                };
                for view in &row.targets {
                    let what = match view.status {
                        TagStatus::InSync | TagStatus::NotMirrored => continue,
                        TagStatus::Missing => "missing".to_string(),
                        TagStatus::Different | TagStatus::Conflict => format!(
                            "{} there, Harbor has {}",
                            shown(view.digest.as_ref()),
                            shown(row.harbor.as_ref())
                        ),
                        TagStatus::Error => "could not be compared".to_string(),
                    };
                    if lines.len() < SHOWN {
                        lines.push(format!(
                            "{}:{} on {}: {what}",
                            row.repository, row.tag, view.target
                        ));
                    } else {
                        more += 1;
                    }
                }
            })
            .await;
            if let Err(e) = listed {
                lines.push(format!("{project}: {e}"));
            }
        }
        if more > 0 {
            lines.push(format!("... and {more} more: regtee diff lists them all"));
        }
        lines
    }
}

fn shown(digest: Option<&Digest>) -> String {
    digest.map_or_else(
        || "nothing".into(),
        |d| d.as_str().chars().take(19).collect(),
    )
}
