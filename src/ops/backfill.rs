//! Comparing Harbor with targets, tag by tag, and queueing what differs.
//!
//! One comparison serves four features: `regtee sync` (backfill a project), the periodic
//! reconcile, `regtee diff` (the cutover report) and the per-repository status API. It uses
//! listings and HEAD requests only, so a project already in sync finishes fast.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TargetConfig;
use crate::mirror::target::Target;
use crate::mirror::tee::{Tee, Write};
use crate::oci::digest::Digest;
use crate::oci::names::{NameError, RepositoryName, Tag};
use crate::queue::{JobOrigin, now_ms};
use crate::registry::{RegistryClient, RegistryError};

/// HEAD requests in flight at once during a comparison.
const COMPARE_PARALLELISM: usize = 16;
/// Repositories whose tag lists are asked for ahead of the comparisons.
const LISTINGS_AHEAD: usize = 4;

/// One tag as seen on one target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct TargetView {
    /// Target name.
    pub target: String,
    /// The repository there (after namespace mapping).
    pub repository: String,
    /// Its digest there, if the tag exists.
    pub digest: Option<Digest>,
    /// What the comparison concludes.
    pub status: TagStatus,
}

/// How a tag on a target compares with Harbor.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TagStatus {
    /// Same digest.
    InSync,
    /// Missing on the target.
    Missing,
    /// Another digest on the target.
    Different,
    /// Another digest on the target, left alone because `overwrite = false`.
    Conflict,
    /// The target's filters do not take this repository or tag.
    NotMirrored,
    /// The target could not be asked.
    Error,
}

/// One tag: Harbor's digest and every target's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TagRow {
    /// Harbor repository.
    pub repository: RepositoryName,
    /// Tag.
    pub tag: Tag,
    /// Harbor's digest (None if the tag vanished while comparing).
    pub harbor: Option<Digest>,
    /// Each target's view.
    pub targets: Vec<TargetView>,
    /// Errors met while comparing this tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl TagRow {
    /// Whether every target that mirrors this tag has Harbor's digest.
    pub(crate) fn in_sync(&self) -> bool {
        self.targets
            .iter()
            .all(|t| matches!(t.status, TagStatus::InSync | TagStatus::NotMirrored))
    }
}

/// A backfill's request.
#[derive(Clone, Debug)]
pub(crate) struct BackfillRequest {
    /// The Harbor project.
    pub project: String,
    /// Only this target (all when None).
    pub target: Option<String>,
    /// Compare only; queue nothing.
    pub dry_run: bool,
    /// Backfill or reconcile.
    pub origin: JobOrigin,
}

/// Where a backfill stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackfillState {
    /// Comparing.
    #[default]
    Running,
    /// Compared, and what differs is queued.
    Finished,
    /// Stopped by an error (see `errors`).
    Failed,
    /// Stopped by an operator (`regtee sync --cancel`, `POST /api/v1/backfills/{id}/cancel`).
    Cancelled,
}

/// A backfill's progress and result.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// Id, for the API.
    pub id: u64,
    /// The Harbor project.
    pub project: String,
    /// Only this target, if set.
    pub target: Option<String>,
    /// Whether nothing is queued.
    pub dry_run: bool,
    /// Where it stands.
    pub state: BackfillState,
    /// Repositories found.
    pub repositories: usize,
    /// Repositories whose tags were listed.
    pub repositories_done: usize,
    /// Tags found.
    pub tags: usize,
    /// Tags compared so far.
    pub tags_compared: usize,
    /// (tag, target) pairs already equal.
    pub in_sync: usize,
    /// (tag, target) pairs queued (or that would be, in a dry run).
    pub queued: usize,
    /// (tag, target) pairs left alone (overwrite = false).
    pub skipped: usize,
    /// (tag, target) pairs that could not be compared.
    pub failed: usize,
    /// The first errors, for people.
    pub errors: Vec<String>,
    /// In a dry run: what targets with `create_missing` lack and regtee would create there
    /// (`namespace prod-lib on tcr`), as their cloud's API says now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub would_create: Vec<String>,
    /// Start time (ms).
    pub started_at: i64,
    /// End time (ms).
    pub finished_at: Option<i64>,
}

/// The repositories of a Harbor project: Harbor's API, or the catalog of a plain registry.
pub(crate) async fn project_repositories(
    upstream: &RegistryClient,
    project: &str,
) -> Result<Vec<String>, RegistryError> {
    if let Some(repos) = upstream.harbor_repositories(project).await? {
        return Ok(repos);
    }
    let prefix = format!("{project}/");
    Ok(upstream
        .catalog()
        .await?
        .into_iter()
        .filter(|r| r.starts_with(&prefix))
        .collect())
}

/// Every project: Harbor's project list, or the first path component of every catalog entry.
pub(crate) async fn all_projects(upstream: &RegistryClient) -> Result<Vec<String>, RegistryError> {
    let mut projects = match upstream.harbor_projects().await? {
        Some(projects) => projects,
        None => upstream
            .catalog()
            .await?
            .into_iter()
            .filter_map(|r| r.split_once('/').map(|(p, _)| p.to_string()))
            .collect(),
    };
    // A listing is outside input: a name regtee cannot use is left out here, not fed to URLs.
    projects.retain(|p| crate::oci::names::project(p).is_ok());
    projects.sort();
    projects.dedup();
    Ok(projects)
}

/// Compares one tag with each target.
pub(crate) async fn compare_tag(
    upstream: &RegistryClient,
    targets: &[Arc<Target>],
    repository: &RepositoryName,
    tag: &Tag,
) -> TagRow {
    compare_tag_knowing(upstream, targets, repository, tag, None, &[]).await
}

/// Compares one tag with each target. A side's digest is asked for with a HEAD unless a listing
/// of that side gave it just now: `harbor` for Harbor, `listed[i]` for `targets[i]`.
async fn compare_tag_knowing(
    upstream: &RegistryClient,
    targets: &[Arc<Target>],
    repository: &RepositoryName,
    tag: &Tag,
    harbor: Option<Digest>,
    listed: &[TargetListing],
) -> TagRow {
    let mut row = TagRow {
        repository: repository.clone(),
        tag: tag.clone(),
        harbor: None,
        targets: Vec::new(),
        errors: Vec::new(),
    };
    let (repository, tag) = (repository.as_str(), tag.as_str());
    // Harbor and every target are asked at once: a tag costs one round trip, not 1 + targets.
    let on_targets = targets.iter().enumerate().map(|(i, target)| async move {
        let policy = &target.config.policy;
        let wanted = policy.wants_repository(repository) && policy.wants_tag(tag);
        let target_repo = policy.target_repository(repository);
        let digest = match listed.get(i).and_then(Option::as_ref) {
            _ if !wanted => None,
            // A tag the target's listing leaves out is not there.
            Some(listing) => Some(Ok(listing.get(tag).cloned())),
            None => Some(
                target
                    .client
                    .manifest_head(&target_repo, tag)
                    .await
                    .map(|head| head.map(|h| h.digest)),
            ),
        };
        (target, target_repo, digest)
    });
    let on_harbor = async {
        match harbor {
            Some(digest) => Ok(Some(digest)),
            None => upstream
                .manifest_head(repository, tag)
                .await
                .map(|head| head.map(|h| h.digest)),
        }
    };
    let (harbor, on_targets) =
        futures_util::future::join(on_harbor, futures_util::future::join_all(on_targets)).await;
    match harbor {
        Ok(digest) => row.harbor = digest,
        Err(e) => {
            row.errors.push(e.to_string());
            return row;
        }
    }
    for (target, target_repo, digest) in on_targets {
        let mut view = TargetView {
            target: target.name().to_string(),
            repository: target_repo,
            digest: None,
            status: TagStatus::NotMirrored,
        };
        match digest {
            None => {}
            Some(Ok(digest)) => {
                view.digest = digest;
                view.status = match (&view.digest, &row.harbor) {
                    (None, _) => TagStatus::Missing,
                    (Some(t), Some(h)) if t == h => TagStatus::InSync,
                    (Some(_), _) if !target.config.overwrite => TagStatus::Conflict,
                    (Some(_), _) => TagStatus::Different,
                };
            }
            Some(Err(e)) => {
                view.status = TagStatus::Error;
                row.errors.push(e.to_string());
            }
        }
        row.targets.push(view);
    }
    row
}

/// Compares every tag of every repository of `project`, reporting events as they happen.
pub(crate) async fn compare_project(
    upstream: &RegistryClient,
    targets: &[Arc<Target>],
    project: &str,
    mut on_progress: impl FnMut(ProjectEvent) + Send,
) -> Result<(), RegistryError> {
    let listed = project_repositories(upstream, project).await?;
    let repositories: Vec<RepositoryName> = valid(listed, "repository", &mut on_progress)
        .into_iter()
        .filter(|r: &RepositoryName| {
            targets
                .iter()
                .any(|t| t.config.policy.wants_repository(r.as_str()))
        })
        .collect();
    on_progress(ProjectEvent::Repositories(repositories.len()));
    // Tag listings run a few repositories ahead, and the comparisons of every listed tag share
    // one pool: a project of many small repositories is not one round trip per repository
    // after another.
    // Whether each side serves Harbor's artifact list, learnt from its first listing: a plain
    // registry is asked once per comparison, not once per repository.
    let harbor_api = ArtifactApi::default();
    let target_apis: Vec<ArtifactApi> = targets.iter().map(|_| ArtifactApi::default()).collect();
    let mut unlisted = repositories.iter();
    let mut listings = futures_util::stream::FuturesOrdered::new();
    let mut waiting: std::collections::VecDeque<Listed> = Default::default();
    let mut unfinished: std::collections::HashMap<&RepositoryName, usize> = Default::default();
    let mut comparing = futures_util::stream::FuturesUnordered::new();
    loop {
        while listings.len() < LISTINGS_AHEAD
            && let Some(repository) = unlisted.next()
        {
            let (harbor_api, target_apis) = (&harbor_api, &target_apis);
            listings.push_back(async move {
                // Both sides at once: a repository's listings cost one round trip.
                let (on_harbor, on_targets) = futures_util::future::join(
                    list(upstream, repository, harbor_api),
                    list_targets(targets, target_apis, repository),
                )
                .await;
                (repository, on_harbor, on_targets)
            });
        }
        while comparing.len() < COMPARE_PARALLELISM
            && let Some(Listed {
                repository,
                tag,
                harbor,
                on_targets,
            }) = waiting.pop_front()
        {
            comparing.push(async move {
                (
                    repository,
                    compare_tag_knowing(upstream, targets, repository, &tag, harbor, &on_targets)
                        .await,
                )
            });
        }
        if listings.is_empty() && waiting.is_empty() && comparing.is_empty() {
            break;
        }
        tokio::select! {
            Some(listed) = listings.next(), if !listings.is_empty() && waiting.len() < COMPARE_PARALLELISM => {
                match listed {
                    (repository, Ok(listed), on_targets) => {
                        let tags = usable(listed, &mut on_progress);
                        on_progress(ProjectEvent::Tags(tags.len()));
                        if tags.is_empty() {
                            on_progress(ProjectEvent::RepositoryDone);
                        } else {
                            unfinished.insert(repository, tags.len());
                            let on_targets = Arc::new(on_targets);
                            waiting.extend(tags.into_iter().map(|(tag, harbor)| Listed {
                                repository,
                                tag,
                                harbor,
                                on_targets: on_targets.clone(),
                            }));
                        }
                    }
                    (_, Err(e), _) => on_progress(ProjectEvent::Error(e.to_string())),
                }
            }
            Some((repository, row)) = comparing.next(), if !comparing.is_empty() => {
                on_progress(ProjectEvent::Row(row));
                if let Some(left) = unfinished.get_mut(repository) {
                    *left -= 1;
                    if *left == 0 {
                        unfinished.remove(repository);
                        on_progress(ProjectEvent::RepositoryDone);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A repository's tags as Harbor lists them: with their digests from Harbor's artifact API
/// (one request per 100 artifacts), else (no such API, or it failed) names only from the
/// registry API (each then needs a HEAD). Either is Harbor's answer now.
async fn list(
    upstream: &RegistryClient,
    repository: &RepositoryName,
    harbor_api: &ArtifactApi,
) -> Result<Vec<(String, Option<String>)>, RegistryError> {
    match harbor_api.list(upstream, repository.as_str()).await {
        Ok(Some(pairs)) => return Ok(pairs.into_iter().map(|(t, d)| (t, Some(d))).collect()),
        Ok(None) => {}
        // The registry API says the same, and says why if it cannot either.
        Err(e) => {
            tracing::debug!(%repository, error = %e, "Harbor's artifact list failed; listing tags instead")
        }
    }
    Ok(upstream
        .tags(repository.as_str())
        .await?
        .into_iter()
        .map(|t| (t, None))
        .collect())
}

/// A listed tag waiting for its comparison, with what the listings said of it.
struct Listed<'a> {
    repository: &'a RepositoryName,
    tag: Tag,
    /// Harbor's digest, when Harbor's listing gave it.
    harbor: Option<Digest>,
    /// Each target's listing of the repository.
    on_targets: Arc<Vec<TargetListing>>,
}

/// Every tag of a repository on one target with its digest, from that target's own listing (a
/// tag it leaves out is not there); `None` when the target has no such listing, so each tag
/// takes a HEAD.
type TargetListing = Option<std::collections::HashMap<String, Digest>>;

/// Whether a registry serves Harbor's artifact list, as its first answer in this comparison
/// said. Harbor has it, and so does a target that is a Harbor (or built on one, as TCR
/// Enterprise is, where its instance serves Harbor's API);
/// a plain registry answers 404 once and is not asked again.
#[derive(Default)]
struct ArtifactApi(tokio::sync::OnceCell<bool>);

impl ArtifactApi {
    /// `repository`'s tags and digests from the artifact list, or `None` without one. The
    /// first call learns whether there is one while the others wait for its answer.
    async fn list(
        &self,
        client: &RegistryClient,
        repository: &str,
    ) -> Result<Option<Vec<(String, String)>>, RegistryError> {
        let mut first = None;
        let served = *self
            .0
            .get_or_init(|| async {
                let answer = client.harbor_tag_digests(repository).await;
                let served = matches!(answer, Ok(Some(_)));
                first = Some(answer);
                served
            })
            .await;
        match first {
            Some(answer) => answer,
            None if served => client.harbor_tag_digests(repository).await,
            None => Ok(None),
        }
    }
}

/// Each target's listing of `repository` (mapped to its name there), where the target serves
/// one. Anything else, an error or an unreadable digest included, leaves that target to HEADs.
async fn list_targets(
    targets: &[Arc<Target>],
    apis: &[ArtifactApi],
    repository: &RepositoryName,
) -> Vec<TargetListing> {
    let listings = targets.iter().zip(apis).map(|(target, api)| async move {
        let policy = &target.config.policy;
        if !policy.wants_repository(repository.as_str()) {
            return None;
        }
        let there = policy.target_repository(repository.as_str());
        let pairs = api.list(&target.client, &there).await.ok()??;
        // A listing with a digest regtee cannot read is not used at all.
        let listing: TargetListing = pairs
            .into_iter()
            .map(|(tag, digest)| Some((tag, digest.parse().ok()?)))
            .collect();
        if listing.is_none() {
            tracing::warn!(target = %target.name(), repository = %there, "the target's artifact list gives a digest regtee cannot read; its tags are compared by HEAD instead (check the target's Harbor API)");
        }
        listing
    });
    futures_util::future::join_all(listings).await
}

/// The tags (and digests) of a listing regtee can use; each other one is reported as an error.
fn usable(
    listed: Vec<(String, Option<String>)>,
    on_progress: &mut impl FnMut(ProjectEvent),
) -> Vec<(Tag, Option<Digest>)> {
    let mut tags = Vec::with_capacity(listed.len());
    for (tag, digest) in listed {
        let tag = match tag.parse::<Tag>() {
            Ok(tag) => tag,
            Err(e) => {
                on_progress(ProjectEvent::Error(format!(
                    "Harbor lists a tag regtee cannot use: {e}"
                )));
                continue;
            }
        };
        match digest.map(|d| d.parse::<Digest>()) {
            None => tags.push((tag, None)),
            Some(Ok(digest)) => tags.push((tag, Some(digest))),
            Some(Err(e)) => on_progress(ProjectEvent::Error(format!(
                "Harbor lists tag {tag} with a digest regtee cannot use: {e}"
            ))),
        }
    }
    tags
}

/// The names of a listing that follow the spec's grammar; each other one is reported as an error
/// (a registry's listing is outside input like any other).
fn valid<T: std::str::FromStr<Err = NameError>>(
    listed: Vec<String>,
    what: &str,
    on_progress: &mut impl FnMut(ProjectEvent),
) -> Vec<T> {
    listed
        .into_iter()
        .filter_map(|item| match item.parse::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                on_progress(ProjectEvent::Error(format!(
                    "Harbor lists a {what} regtee cannot use: {e}"
                )));
                None
            }
        })
        .collect()
}

/// What [`compare_project`] reports as it goes.
pub(crate) enum ProjectEvent {
    /// How many repositories will be compared.
    Repositories(usize),
    /// A repository's tag count.
    Tags(usize),
    /// One compared tag.
    Row(TagRow),
    /// A repository finished.
    RepositoryDone,
    /// Something could not be listed.
    Error(String),
}

/// What a backfill needs: Harbor to list and compare, the targets to compare with, and the tee
/// that turns what is missing into jobs.
pub(crate) struct Backfiller {
    /// Harbor.
    pub upstream: Arc<RegistryClient>,
    /// Every configured target.
    pub targets: Vec<Arc<Target>>,
    /// Where jobs are made.
    pub tee: Arc<Tee>,
}

impl Backfiller {
    /// What the targets with `create_missing` lack, of what these writes need: each creation
    /// once, as the cloud's API answers now (an API that cannot answer is named instead).
    async fn would_create(
        &self,
        targets: &[Arc<Target>],
        unwritten: &std::collections::BTreeSet<(String, String)>,
    ) -> Vec<String> {
        let mut asked = std::collections::BTreeSet::new();
        let mut lines = Vec::new();
        for (name, repository) in unwritten {
            let Some(p) = targets
                .iter()
                .find(|t| t.name() == name)
                .and_then(|t| t.provisioner.as_ref())
            else {
                continue;
            };
            let creation = p.creation_for(repository);
            if !asked.insert((name.clone(), creation.clone())) {
                continue;
            }
            match p.exists(&creation).await {
                Ok(true) => {}
                Ok(false) => lines.push(format!("{creation} on {name}")),
                Err(e) => lines.push(format!("{creation} on {name}, if missing: {e}")),
            }
        }
        lines
    }

    /// Runs a backfill: compares, then queues a manifest job for each tag a target lacks or
    /// holds with another digest (unless `overwrite = false`). `progress` is updated as it goes.
    pub(crate) async fn run(&self, request: &BackfillRequest, progress: &Mutex<Progress>) {
        let targets: Vec<Arc<Target>> = self
            .targets
            .iter()
            .filter(|t| request.target.as_deref().is_none_or(|n| n == t.name()))
            .cloned()
            .collect();
        let mut jobs = Vec::new();
        // (target, repository there) that a dry run asks the cloud's API about.
        let mut unwritten = std::collections::BTreeSet::new();
        let result = compare_project(&self.upstream, &targets, &request.project, |event| {
            let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
            match event {
                ProjectEvent::Repositories(n) => p.repositories = n,
                ProjectEvent::Tags(n) => p.tags += n,
                ProjectEvent::RepositoryDone => p.repositories_done += 1,
                ProjectEvent::Error(e) => {
                    p.failed += 1;
                    p.note_error(e);
                }
                ProjectEvent::Row(row) => {
                    p.tags_compared += 1;
                    let write = Write::Manifest {
                        repository: row.repository.clone(),
                        tag: Some(row.tag.clone()),
                        digest: row.harbor.clone(),
                    };
                    for view in &row.targets {
                        if request.dry_run
                            && matches!(
                                view.status,
                                TagStatus::Missing | TagStatus::Different | TagStatus::Error
                            )
                        {
                            unwritten.insert((view.target.clone(), view.repository.clone()));
                        }
                        match view.status {
                            TagStatus::InSync => p.in_sync += 1,
                            TagStatus::Missing | TagStatus::Different => {
                                p.queued += 1;
                                if row.harbor.is_some() {
                                    jobs.extend(self.tee.jobs_for(
                                        &write,
                                        request.origin,
                                        Some(&view.target),
                                    ));
                                }
                            }
                            TagStatus::Conflict => p.skipped += 1,
                            TagStatus::Error => p.failed += 1,
                            TagStatus::NotMirrored => {}
                        }
                    }
                    for e in row.errors {
                        p.note_error(e);
                    }
                }
            }
        })
        .await;
        if request.dry_run {
            let would_create = self.would_create(&targets, &unwritten).await;
            progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .would_create = would_create;
        }
        let enqueued = if request.dry_run {
            Ok(0)
        } else {
            self.tee.enqueue(jobs).await
        };
        let p = {
            let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
            p.finished_at = Some(now_ms());
            p.state = BackfillState::Finished;
            if let Err(e) = &result {
                p.state = BackfillState::Failed;
                p.errors.insert(0, e.to_string());
            }
            if let Err(e) = &enqueued {
                p.state = BackfillState::Failed;
                p.errors.insert(0, format!("could not queue jobs: {e}"));
            }
            p.clone()
        };
        tracing::info!(
            project = %p.project,
            target = p.target.as_deref().unwrap_or("all"),
            dry_run = p.dry_run,
            state = ?p.state,
            repositories = p.repositories,
            tags = p.tags,
            in_sync = p.in_sync,
            queued = p.queued,
            skipped = p.skipped,
            failed = p.failed,
            "{} of project {} finished",
            match request.origin {
                JobOrigin::Reconcile => "reconcile",
                _ => "backfill",
            },
            p.project
        );
    }

    /// Starts the periodic reconcile of each target that has a `reconcile_interval`.
    pub(crate) fn spawn_reconcilers(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
        targets: &[TargetConfig],
    ) {
        for target in targets {
            let Some(interval) = target.reconcile_interval else {
                continue;
            };
            let interval = interval.max(Duration::from_secs(1));
            let (cancel, this, target) = (cancel.clone(), self.clone(), target.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(interval) => {}
                    }
                    // With several replicas, one reconciles a target at a time.
                    let name = format!("reconcile {}", target.endpoint.name);
                    let round = this.tee.queue().alone(&name, this.reconcile(&target));
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        ran = round => if let Err(e) = ran {
                            tracing::warn!(target = %target.endpoint.name, error = %e, "reconcile could not take its turn; trying again next interval");
                        }
                    }
                }
            });
        }
    }
}

impl Backfiller {
    /// One reconcile round of `target`: a backfill of each project it mirrors.
    async fn reconcile(&self, target: &TargetConfig) {
        let projects = match projects_for(&self.upstream, target).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(target = %target.endpoint.name, error = %e, "reconcile could not list projects; trying again next interval");
                return;
            }
        };
        for project in projects {
            let request = BackfillRequest {
                project: project.clone(),
                target: Some(target.endpoint.name.clone()),
                dry_run: false,
                origin: JobOrigin::Reconcile,
            };
            let progress = Mutex::new(Progress::started(0, &request));
            self.run(&request, &progress).await;
        }
    }
}

impl Progress {
    /// The progress of a backfill that starts now.
    pub(crate) fn started(id: u64, request: &BackfillRequest) -> Progress {
        Progress {
            id,
            project: request.project.clone(),
            target: request.target.clone(),
            dry_run: request.dry_run,
            state: BackfillState::Running,
            started_at: now_ms(),
            ..Default::default()
        }
    }

    /// Keeps the first 20 errors.
    fn note_error(&mut self, e: String) {
        if self.errors.len() < 20 {
            self.errors.push(e);
        }
    }
}

/// The projects a target mirrors: its mapped projects, else every project Harbor lists.
pub(crate) async fn projects_for(
    upstream: &RegistryClient,
    target: &TargetConfig,
) -> Result<Vec<String>, RegistryError> {
    let mapped: Vec<String> = target
        .policy
        .mapped_projects()
        .map(str::to_string)
        .collect();
    if !mapped.is_empty() {
        return Ok(mapped);
    }
    // Every project; the comparison applies the target's repository rules itself.
    all_projects(upstream).await
}
