//! The job lifecycle, decided once: where a job stands, what happened (a worker took it, an
//! attempt ended, the same write arrived again, an operator asked for it again, its process
//! died) and when, in; where it stands next, out. The stores only read and write these columns,
//! and name states in their SQL only through these values, bound as parameters.

use super::job::{Attempt, AttemptResult, ErrorClass, JobState, Outcome};

/// The states of a finished job: an operator may ask for any of them again.
pub(crate) const FINISHED: [JobState; 3] = [JobState::Done, JobState::Skipped, JobState::Failed];

/// The finished states retention may forget. A failed job stays until someone retries it: it is
/// work nobody has done yet.
pub(crate) const FORGETTABLE: [JobState; 2] = [JobState::Done, JobState::Skipped];

/// The states of a job not finished yet.
pub(crate) const UNFINISHED: [JobState; 2] = [JobState::Pending, JobState::Running];

/// Which due job a worker takes first: manifests and deletes (in the order they became due)
/// before blobs. A manifest's job copies its blobs itself, so a blob job only saves time when a
/// worker is free; a manifest never waits behind the blob jobs of other pushes. The same in
/// every store, with an index on exactly this order.
pub(crate) const CLAIM_ORDER: &str = "(kind = 'blob'), next_attempt_at, id";

/// Where a job stands: the columns of its row that its events change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) state: JobState,
    pub(crate) attempts: u32,
    pub(crate) next_attempt_at: i64,
    pub(crate) started_at: Option<i64>,
    pub(crate) finished_at: Option<i64>,
    pub(crate) updated_at: i64,
    pub(crate) detail: String,
    pub(crate) error_class: Option<ErrorClass>,
    pub(crate) target_digest: Option<String>,
    /// The same write arrived while the job ran: it runs again once this attempt ends, so what
    /// it copies is never older than the last push.
    pub(crate) rearm: bool,
}

/// What the same write arriving again does to the job it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The job is waiting already: one job, nothing changes.
    Merged,
    /// The job runs now and may have read Harbor before this push: it runs again when it ends.
    RunAgain(Standing),
    /// The job had finished: it starts over, as if new (its origin and creation time are the
    /// new write's).
    Rearmed(Standing),
}

impl Arrival {
    /// Whether the job was armed by it (counted in what `enqueue` returns).
    pub(crate) fn arms(&self) -> bool {
        !matches!(self, Arrival::Merged)
    }
}

impl Standing {
    /// A new job: waiting, due now.
    pub(crate) fn new(now: i64) -> Standing {
        Standing {
            state: JobState::Pending,
            attempts: 0,
            next_attempt_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            detail: String::new(),
            error_class: None,
            target_digest: None,
            rearm: false,
        }
    }

    /// The same write arrives again.
    pub(crate) fn arrival(&self, now: i64) -> Arrival {
        match self.state {
            JobState::Pending => Arrival::Merged,
            JobState::Running => Arrival::RunAgain(Standing {
                rearm: true,
                ..self.clone()
            }),
            JobState::Done | JobState::Skipped | JobState::Failed => Arrival::Rearmed(Standing {
                target_digest: self.target_digest.clone(),
                ..Standing::new(now)
            }),
        }
    }

    /// A worker takes it (it was pending and due): running, one more attempt.
    pub(crate) fn claimed(&self, now: i64) -> Standing {
        Standing {
            state: JobState::Running,
            attempts: self.attempts + 1,
            started_at: Some(now),
            updated_at: now,
            ..self.clone()
        }
    }

    /// An attempt ended with `outcome`: where the job stands next, and the attempt as its
    /// history records it. A job re-armed while it ran goes back to pending at once.
    pub(crate) fn finished(&self, outcome: &Outcome, now: i64) -> (Standing, Attempt) {
        let mut next = Standing {
            updated_at: now,
            ..self.clone()
        };
        let (result, detail) = match outcome {
            Outcome::Done {
                target_digest,
                note,
            } => {
                next.state = JobState::Done;
                next.finished_at = Some(now);
                next.error_class = None;
                next.target_digest = target_digest.clone();
                (AttemptResult::Done, note)
            }
            Outcome::Skipped { reason } => {
                next.state = JobState::Skipped;
                next.finished_at = Some(now);
                next.error_class = None;
                (AttemptResult::Skipped, reason)
            }
            Outcome::Failed { reason, class } => {
                next.state = JobState::Failed;
                next.finished_at = Some(now);
                next.error_class = Some(*class);
                (AttemptResult::Failed, reason)
            }
            Outcome::RetryAt { at, error, class } => {
                next.state = JobState::Pending;
                next.next_attempt_at = *at;
                next.error_class = Some(*class);
                (AttemptResult::Retry, error)
            }
        };
        next.detail = detail.clone();
        if self.rearm {
            next = Standing {
                state: JobState::Pending,
                rearm: false,
                attempts: 0,
                next_attempt_at: now,
                started_at: None,
                finished_at: None,
                ..next
            };
        }
        let attempt = Attempt {
            started_at: self.started_at.unwrap_or(self.updated_at),
            finished_at: now,
            result,
            detail: detail.clone(),
        };
        (next, attempt)
    }

    /// An operator asks for a finished job again; a job not finished is left as it is.
    pub(crate) fn retried(&self, now: i64) -> Option<Standing> {
        FINISHED.contains(&self.state).then(|| Standing {
            state: JobState::Pending,
            attempts: 0,
            next_attempt_at: now,
            updated_at: now,
            finished_at: None,
            ..self.clone()
        })
    }

    /// The process running it died (or its lease ran out): waiting again, due now.
    pub(crate) fn interrupted(&self, now: i64) -> Option<Standing> {
        (self.state == JobState::Running).then(|| Standing {
            state: JobState::Pending,
            next_attempt_at: now,
            updated_at: now,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> Outcome {
        Outcome::Done {
            target_digest: Some("sha256:t".into()),
            note: "uploaded".into(),
        }
    }

    #[test]
    fn a_job_runs_then_finishes_and_its_attempt_is_dated_by_its_claim() {
        let job = Standing::new(10);
        let running = job.claimed(20);
        assert_eq!((running.state, running.attempts), (JobState::Running, 1));
        let (finished, attempt) = running.finished(&done(), 30);
        assert_eq!(finished.state, JobState::Done);
        assert_eq!(finished.finished_at, Some(30));
        assert_eq!(finished.target_digest.as_deref(), Some("sha256:t"));
        assert_eq!(
            (attempt.started_at, attempt.finished_at, attempt.result),
            (20, 30, AttemptResult::Done)
        );
    }

    #[test]
    fn a_retry_waits_and_keeps_counting_attempts() {
        let running = Standing::new(0).claimed(5);
        let (waiting, attempt) = running.finished(
            &Outcome::RetryAt {
                at: 100,
                error: "refused".into(),
                class: ErrorClass::Unreachable,
            },
            6,
        );
        assert_eq!(
            (waiting.state, waiting.next_attempt_at, waiting.attempts),
            (JobState::Pending, 100, 1)
        );
        assert_eq!(waiting.error_class, Some(ErrorClass::Unreachable));
        assert_eq!(attempt.result, AttemptResult::Retry);
        assert_eq!(waiting.claimed(100).attempts, 2);
    }

    #[test]
    fn the_same_write_merges_reruns_or_rearms_by_where_the_job_stands() {
        let pending = Standing::new(0);
        assert_eq!(pending.arrival(1), Arrival::Merged);
        let running = pending.claimed(1);
        let Arrival::RunAgain(marked) = running.arrival(2) else {
            panic!("a running job runs again")
        };
        assert!(marked.rearm && marked.state == JobState::Running);
        // The attempt under way ends as it ends, in the history; the job then waits again.
        let (again, attempt) = marked.finished(&done(), 3);
        assert_eq!(attempt.result, AttemptResult::Done);
        assert_eq!(
            (again.state, again.attempts, again.rearm, again.finished_at),
            (JobState::Pending, 0, false, None)
        );
        let (finished, _) = again.claimed(4).finished(&done(), 5);
        let Arrival::Rearmed(fresh) = finished.arrival(6) else {
            panic!("a finished job starts over")
        };
        assert_eq!(
            (fresh.state, fresh.attempts, fresh.next_attempt_at),
            (JobState::Pending, 0, 6)
        );
    }

    #[test]
    fn only_finished_jobs_are_retried_and_only_running_ones_interrupted() {
        let pending = Standing::new(0);
        assert_eq!(pending.retried(1), None);
        assert_eq!(pending.interrupted(1), None);
        let running = pending.claimed(1);
        assert_eq!(running.retried(2), None);
        let back = running.interrupted(2).unwrap();
        assert_eq!((back.state, back.attempts), (JobState::Pending, 1));
        for outcome in [
            done(),
            Outcome::Skipped {
                reason: "exists".into(),
            },
            Outcome::Failed {
                reason: "denied".into(),
                class: ErrorClass::Denied,
            },
        ] {
            let (finished, _) = running.finished(&outcome, 3);
            let again = finished.retried(4).unwrap();
            assert_eq!(
                (again.state, again.attempts, again.finished_at),
                (JobState::Pending, 0, None)
            );
        }
    }
}
