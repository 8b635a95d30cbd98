//! Backfills started through the admin API: run on the replica that was asked, one per project
//! and target across all replicas, their progress kept in the queue's database so that any
//! replica shows any backfill (and a restart does not forget them).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::backfill::{BackfillRequest, BackfillState, Backfiller, Progress};
use crate::queue::{BackfillRecord, Queue, QueueError, now_ms};

/// How often a running backfill's progress is saved for other replicas to read.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The backfills of this replica, and the way to everyone's.
pub(crate) struct BackfillRuns {
    queue: Arc<Queue>,
    backfiller: Arc<Backfiller>,
    /// This replica's backfills whose end is not saved yet: fresher than the database, and
    /// what is shown if it cannot be read; each with what stops it.
    local: Mutex<BTreeMap<u64, LocalRun>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Told when a backfill of this replica ends: who waits for one hears of it at once.
    ended: tokio::sync::Notify,
}

/// A backfill running on this replica: its progress, and what stops it.
type LocalRun = (Arc<Mutex<Progress>>, CancellationToken);

fn snapshot(progress: &Mutex<Progress>) -> Progress {
    progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl BackfillRuns {
    /// Backfills run by `backfiller`, recorded in `queue`.
    pub(crate) fn new(
        queue: Arc<Queue>,
        backfiller: Arc<Backfiller>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BackfillRuns {
        BackfillRuns {
            queue,
            backfiller,
            local: Mutex::new(BTreeMap::new()),
            tasks,
            cancel,
            ended: tokio::sync::Notify::new(),
        }
    }

    /// Records a backfill and starts it; returns its progress so far. Fails only when the
    /// database cannot record it (nothing is started then).
    pub(crate) async fn start(
        self: &Arc<Self>,
        request: BackfillRequest,
    ) -> Result<Progress, QueueError> {
        let started = Progress::started(0, &request);
        let id = self.queue.record_backfill(to_json(&started)).await?;
        let progress = Arc::new(Mutex::new(Progress {
            id: id as u64,
            ..started
        }));
        let stop = CancellationToken::new();
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id as u64, (progress.clone(), stop.clone()));
        let runs = self.clone();
        let task_progress = progress.clone();
        self.tasks
            .spawn(async move { runs.run(id, request, task_progress, stop).await });
        Ok(snapshot(&progress))
    }

    /// Stops a running backfill, whichever replica runs it: at once on this one, within a
    /// second ([`SAVE_EVERY`]) on another, which reads the request from the database. Jobs it
    /// already queued stay queued. Returns whether it was running.
    pub(crate) async fn cancel(&self, id: u64) -> Result<bool, QueueError> {
        let Ok(row) = i64::try_from(id) else {
            return Ok(false);
        };
        let running = self.queue.request_backfill_cancel(row).await?;
        if let Some((_, stop)) = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            stop.cancel();
            return Ok(true);
        }
        Ok(running)
    }

    /// Runs one backfill unless another replica runs one of the same project and target,
    /// saving its progress as it goes and once it ends.
    async fn run(
        &self,
        id: i64,
        request: BackfillRequest,
        progress: Arc<Mutex<Progress>>,
        stop: CancellationToken,
    ) {
        use futures_util::FutureExt as _;
        let name = format!(
            "backfill {} {}",
            request.project,
            request.target.as_deref().unwrap_or("*")
        );
        let work =
            std::panic::AssertUnwindSafe(self.backfiller.run(&request, &progress)).catch_unwind();
        let alone = self.queue.alone(&name, work);
        tokio::pin!(alone);
        let mut ticker = tokio::time::interval(SAVE_EVERY);
        let ended = loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = stop.cancelled() => break None,
                ended = &mut alone => break Some(ended),
                _ = ticker.tick() => {
                    let _ = self.save(id, &progress).await;
                    if self.queue.backfill_cancel_requested(id).await.unwrap_or(false) {
                        stop.cancel();
                    }
                }
            }
        };
        {
            let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
            let stopped = match ended {
                None => {
                    tracing::info!(backfill = id, project = %p.project, "backfill cancelled by an operator; the jobs it queued stay queued");
                    p.state = BackfillState::Cancelled;
                    p.finished_at = Some(now_ms());
                    p.errors.insert(
                        0,
                        "cancelled by an operator; the jobs it queued before stay queued".into(),
                    );
                    None
                }
                Some(Ok(Some(Ok(())))) => None,
                Some(Ok(Some(Err(_)))) => Some(
                    "internal error: the backfill stopped (a bug in regtee: please report it)"
                        .to_string(),
                ),
                Some(Ok(None)) => Some(format!(
                    "a backfill of project {} for {} is already running on another replica: see GET /api/v1/backfills",
                    request.project,
                    request.target.as_deref().unwrap_or("every target")
                )),
                Some(Err(e)) => Some(format!("could not take this backfill's turn: {e}")),
            };
            if let Some(why) = stopped {
                tracing::error!(project = %p.project, error = %why, "a backfill did not run to its end");
                p.state = BackfillState::Failed;
                p.finished_at = Some(now_ms());
                p.errors.insert(0, why);
            }
        }
        self.ended.notify_waiters();
        self.save_end(id, &progress).await;
    }

    /// Saves a backfill's end. It must reach the database, or other replicas show it running
    /// for ever: retried for about a minute.
    async fn save_end(&self, id: i64, progress: &Mutex<Progress>) {
        let mut delay = Duration::from_secs(1);
        for _ in 0..6 {
            if self.save(id, progress).await.is_ok() {
                self.local
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(id as u64));
                return;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay *= 2;
        }
        tracing::warn!(
            backfill = id,
            "could not save a finished backfill's result to the queue database; this replica shows it, the others show it running until this one stops"
        );
    }

    async fn save(&self, id: i64, progress: &Mutex<Progress>) -> Result<(), QueueError> {
        let p = snapshot(progress);
        let running = p.state == BackfillState::Running;
        self.queue.save_backfill(id, to_json(&p), running).await
    }

    /// Backfill `id` once it has ended, or as it stands after `up_to`: a command line waiting
    /// for the end hears of it at once instead of polling. One running on another replica is
    /// looked at again every second.
    pub(crate) async fn wait(
        &self,
        id: u64,
        up_to: Duration,
    ) -> Result<Option<Progress>, QueueError> {
        let deadline = tokio::time::Instant::now() + up_to;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let progress = self.get(id).await?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match &progress {
                Some(p) if p.state == BackfillState::Running && !left.is_zero() => {}
                _ => return Ok(progress),
            }
            tokio::select! {
                () = ended => {}
                () = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                () = self.cancel.cancelled() => return Ok(progress),
            }
        }
    }

    /// The newest backfills of every replica, newest first. If the database cannot be read,
    /// this replica's own.
    pub(crate) async fn list(&self) -> Vec<Progress> {
        let mut all: BTreeMap<u64, Progress> = match self.queue.backfills().await {
            Ok(records) => records
                .iter()
                .filter_map(from_record)
                .map(|p| (p.id, p))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read backfills from the queue database; showing this replica's only");
                BTreeMap::new()
            }
        };
        for (id, (p, _)) in self.local.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            all.insert(*id, snapshot(p));
        }
        all.into_values().rev().collect()
    }

    /// One backfill, whichever replica runs or ran it. `Err` when it can be on no replica's
    /// record because the database cannot be read.
    pub(crate) async fn get(&self, id: u64) -> Result<Option<Progress>, QueueError> {
        if let Some((p, _)) = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(snapshot(p)));
        }
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        Ok(self
            .queue
            .backfill(id)
            .await?
            .as_ref()
            .and_then(from_record))
    }
}

fn to_json(progress: &Progress) -> String {
    serde_json::to_string(progress).unwrap_or_default()
}

/// A saved backfill as the API shows it: one whose replica stopped before it ended is failed,
/// with the reason first.
fn from_record(record: &BackfillRecord) -> Option<Progress> {
    let mut p: Progress = match serde_json::from_str(&record.progress) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(backfill = record.id, error = %e, "a saved backfill cannot be read; left out");
            return None;
        }
    };
    p.id = u64::try_from(record.id).ok()?;
    if record.interrupted && p.state == BackfillState::Running {
        p.state = BackfillState::Failed;
        p.errors.insert(
            0,
            "interrupted: the regtee process running it stopped before it ended; start it again"
                .into(),
        );
    }
    Some(p)
}
