//! The pull-through cache's store: content-addressed files on local disk, an index of them in
//! memory, a size cap kept by evicting the least recently used, and the fills in progress. No
//! HTTP here: the read path (`request::read`) decides what to serve and who may see it.
//!
//! Layout under the cache's directory:
//! - `blobs/<algorithm>/<hex>` and `manifests/<algorithm>/<hex>`: verified content, each with a
//!   `<hex>.json` beside it (its size, a manifest's media type, the repositories Harbor served it
//!   for);
//! - `tmp/`: fills in progress; an entry becomes visible only once its digest is verified, its
//!   file synced and renamed into place (emptied at start: what a crash left is incomplete);
//! - `tags.json`: the digest Harbor last named for each tag, for reads while Harbor is away.
//!
//! Entries found at start are trusted only once read whole: their first full read hashes them,
//! and a file that does not match (or is shorter than its record) is discarded.

mod fill;
mod read;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

pub(crate) use fill::{Fill, Starting};
pub(crate) use read::EntryRead;

use crate::metrics::Metrics;
use crate::oci::digest::Digest;

/// Tags remembered at most (a bound, not an expected size).
const MAX_TAGS: usize = 100_000;

/// Why the cache cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cache directory {path}: {source}")]
pub struct CacheError {
    path: PathBuf,
    source: std::io::Error,
}

/// What a cached digest is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Kind {
    /// A layer or config.
    Blob,
    /// A manifest or index, served with its media type.
    Manifest {
        /// `Content-Type` as Harbor served it.
        media_type: String,
    },
}

impl Kind {
    fn folder(&self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest { .. } => "manifests",
        }
    }
}

/// What is recorded of an entry beside its file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    kind: Kind,
    size: u64,
    /// Repositories Harbor served it for: reads elsewhere must be authorized first, and while
    /// Harbor is away only these are served.
    #[serde(default)]
    repositories: BTreeSet<String>,
}

struct Entry {
    record: Record,
    /// When last used (a counter, not a clock).
    last_used: u64,
    /// Readers now: an entry being read is never evicted.
    readers: u32,
    /// Read whole and matched since this process started (or filled by it).
    verified: bool,
}

struct Index {
    entries: HashMap<Digest, Entry>,
    /// Bytes of the entries, and of the fills in progress.
    used: u64,
    reserved: u64,
}

/// An entry as a reader sees it.
#[derive(Clone, Debug)]
pub(crate) struct Cached {
    pub(crate) kind: Kind,
    pub(crate) size: u64,
}

/// The cache's figures, for status displays.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct CacheStats {
    pub(crate) size_bytes: u64,
    pub(crate) max_size_bytes: u64,
    pub(crate) entries: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    /// Hits over hits and misses (coalesced reads count as hits: they read no Harbor of their
    /// own); 0 before the first read.
    pub(crate) hit_ratio: f64,
}

/// The cache (a handle: clones share it).
#[derive(Clone)]
pub(crate) struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    clock: AtomicU64,
    filling: DashMap<Digest, Arc<Fill>>,
    tags: Mutex<HashMap<(String, String), Digest>>,
    hits: AtomicU64,
    misses: AtomicU64,
    metrics: Arc<Metrics>,
    tasks: tokio_util::task::TaskTracker,
}

/// What to do about a digest nobody has cached.
pub(crate) enum Slot {
    /// Nobody fills it: this request starts the fill (and clears the slot if it does not).
    Start(Starting),
    /// Another request fills it, or is about to: wait for it to begin, then read from it.
    Join(Arc<Fill>),
}

impl Cache {
    /// Opens (creating) the cache in `dir`: indexes what earlier runs left complete, empties
    /// `tmp/`, evicts down to `max_size`.
    pub(crate) fn open(
        dir: &Path,
        max_size: u64,
        metrics: Arc<Metrics>,
        tasks: tokio_util::task::TaskTracker,
    ) -> Result<Cache, CacheError> {
        let io = |source| CacheError {
            path: dir.to_path_buf(),
            source,
        };
        let _ = std::fs::remove_dir_all(dir.join("tmp"));
        std::fs::create_dir_all(dir.join("tmp")).map_err(io)?;
        let mut entries = HashMap::new();
        let mut used = 0;
        for folder in ["blobs", "manifests"] {
            for algorithm in ["sha256", "sha512"] {
                let path = dir.join(folder).join(algorithm);
                std::fs::create_dir_all(&path).map_err(io)?;
                for (digest, record) in scan(&path, algorithm) {
                    used += record.size;
                    entries.insert(
                        digest,
                        Entry {
                            record,
                            last_used: 0,
                            readers: 0,
                            verified: false,
                        },
                    );
                }
            }
        }
        let tags = std::fs::read(dir.join("tags.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<(String, String, String)>>(&b).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(repo, tag, digest)| Some(((repo, tag), digest.parse().ok()?)))
            .collect();
        let cache = Cache {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                max_size,
                index: Mutex::new(Index {
                    entries,
                    used,
                    reserved: 0,
                }),
                clock: AtomicU64::new(1),
                filling: DashMap::new(),
                tags: Mutex::new(tags),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                metrics,
                tasks,
            }),
        };
        cache.inner.make_room(0);
        Ok(cache)
    }

    /// The entry for `digest`, if cached whole.
    pub(crate) fn get(&self, digest: &Digest) -> Option<Cached> {
        let index = self.inner.lock();
        index.entries.get(digest).map(|e| Cached {
            kind: e.record.kind.clone(),
            size: e.record.size,
        })
    }

    /// Whether Harbor served `digest` for `repository` (when it was cached, or since).
    pub(crate) fn is_linked(&self, digest: &Digest, repository: &str) -> bool {
        let index = self.inner.lock();
        index
            .entries
            .get(digest)
            .is_some_and(|e| e.record.repositories.contains(repository))
            || self
                .inner
                .filling
                .get(digest)
                .is_some_and(|f| f.repository() == repository)
    }

    /// Remembers that Harbor serves `digest` for `repository`.
    pub(crate) fn link(&self, digest: &Digest, repository: &str) {
        let record = {
            let mut index = self.inner.lock();
            let Some(entry) = index.entries.get_mut(digest) else {
                return;
            };
            if !entry.record.repositories.insert(repository.to_string()) {
                return;
            }
            entry.record.clone()
        };
        self.inner.write_record(digest, &record);
    }

    /// Reads the entry for `digest` (`range`: the bytes `start..=end` of it); `None` if it is
    /// not cached or its file is damaged (then discarded).
    pub(crate) fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> Option<EntryRead> {
        read::open(&self.inner, digest, range)
    }

    /// Claims the fill of `digest`, or joins the one under way.
    pub(crate) fn slot(&self, digest: &Digest, repository: &str) -> Slot {
        match self.inner.filling.entry(digest.clone()) {
            dashmap::Entry::Occupied(fill) => Slot::Join(fill.get().clone()),
            dashmap::Entry::Vacant(vacant) => {
                let fill = Arc::new(Fill::pending(digest.clone(), repository));
                vacant.insert(fill.clone());
                Slot::Start(Starting::new(self.inner.clone(), fill))
            }
        }
    }

    /// The digest Harbor last named for `repository:tag`, if regtee has seen it.
    pub(crate) fn tag(&self, repository: &str, tag: &str) -> Option<Digest> {
        self.inner
            .tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(repository.to_string(), tag.to_string()))
            .cloned()
    }

    /// Remembers what Harbor named `repository:tag` now.
    pub(crate) fn set_tag(&self, repository: &str, tag: &str, digest: &Digest) {
        let snapshot = {
            let mut tags = self.inner.tags.lock().unwrap_or_else(|p| p.into_inner());
            let key = (repository.to_string(), tag.to_string());
            if tags.get(&key) == Some(digest)
                || (tags.len() >= MAX_TAGS && !tags.contains_key(&key))
            {
                return;
            }
            tags.insert(key, digest.clone());
            tags.iter()
                .map(|((r, t), d)| (r.clone(), t.clone(), d.to_string()))
                .collect::<Vec<_>>()
        };
        let dir = self.inner.dir.clone();
        // Off the request's way; a lost write costs a stale read's chance, nothing more.
        self.inner.tasks.spawn_blocking(move || {
            let _ = write_atomically(
                &dir.join("tags.json"),
                &serde_json::to_vec(&snapshot).unwrap_or_default(),
            );
        });
    }

    /// Counts a read for the hit ratio and the metrics.
    pub(crate) fn count(&self, manifest: bool, how: crate::metrics::CacheRead) {
        use crate::metrics::CacheRead;
        match how {
            CacheRead::Hit | CacheRead::Coalesced => &self.inner.hits,
            CacheRead::Miss => &self.inner.misses,
            CacheRead::Fallback => {
                self.inner.metrics.observe_cache_read(manifest, how);
                return;
            }
        }
        .fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.observe_cache_read(manifest, how);
    }

    /// The metrics the cache reports to.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Size, entries, hit ratio.
    pub(crate) fn stats(&self) -> CacheStats {
        let (size, entries) = {
            let index = self.inner.lock();
            (index.used, index.entries.len() as u64)
        };
        self.inner.metrics.set_cache_size(size, entries);
        let hits = self.inner.hits.load(Ordering::Relaxed);
        let misses = self.inner.misses.load(Ordering::Relaxed);
        CacheStats {
            size_bytes: size,
            max_size_bytes: self.inner.max_size,
            entries,
            hits,
            misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn path(&self, kind: &Kind, digest: &Digest) -> PathBuf {
        self.dir
            .join(kind.folder())
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn record_path(&self, kind: &Kind, digest: &Digest) -> PathBuf {
        self.dir
            .join(kind.folder())
            .join(digest.algorithm().name())
            .join(format!("{}.json", digest.hex()))
    }

    fn write_record(&self, digest: &Digest, record: &Record) {
        let path = self.record_path(&record.kind, digest);
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        if let Err(e) = write_atomically(&path, &bytes) {
            tracing::debug!(error = %e, "could not update a cache record");
        }
    }

    /// Reserves `size` bytes for a fill, evicting what it must; false if it cannot fit.
    fn reserve(&self, size: u64) -> bool {
        if size > self.max_size {
            return false;
        }
        self.make_room(size);
        let mut index = self.lock();
        if index.used + index.reserved + size > self.max_size {
            return false;
        }
        index.reserved += size;
        true
    }

    fn unreserve(&self, size: u64) {
        let mut index = self.lock();
        index.reserved = index.reserved.saturating_sub(size);
    }

    /// Evicts the least recently used entries nobody reads until `extra` more bytes fit.
    fn make_room(&self, extra: u64) {
        let victims: Vec<(Digest, Kind)> = {
            let mut index = self.lock();
            let mut candidates: Vec<(u64, Digest)> = index
                .entries
                .iter()
                .filter(|(_, e)| e.readers == 0)
                .map(|(d, e)| (e.last_used, d.clone()))
                .collect();
            candidates.sort();
            let mut victims = Vec::new();
            for (_, digest) in candidates {
                if index.used + index.reserved + extra <= self.max_size {
                    break;
                }
                if let Some(entry) = index.entries.remove(&digest) {
                    index.used -= entry.record.size;
                    victims.push((digest, entry.record.kind));
                }
            }
            victims
        };
        if victims.is_empty() {
            return;
        }
        self.metrics.observe_evictions(victims.len() as u64);
        for (digest, kind) in victims {
            let _ = std::fs::remove_file(self.path(&kind, &digest));
            let _ = std::fs::remove_file(self.record_path(&kind, &digest));
        }
    }

    /// Adds a verified entry whose file is in place.
    fn insert(&self, digest: &Digest, record: Record, reserved: u64) {
        let last_used = self.tick();
        let mut index = self.lock();
        index.reserved = index.reserved.saturating_sub(reserved);
        index.used += record.size;
        if let Some(old) = index.entries.insert(
            digest.clone(),
            Entry {
                record,
                last_used,
                readers: 0,
                verified: true,
            },
        ) {
            index.used -= old.record.size;
        }
    }

    /// Forgets a damaged entry and deletes its files.
    fn discard(&self, digest: &Digest) {
        let removed = {
            let mut index = self.lock();
            index.entries.remove(digest).inspect(|e| {
                index.used -= e.record.size;
            })
        };
        if let Some(entry) = removed {
            tracing::warn!(%digest, "a cached file does not match its digest or its record; discarded, it is read from Harbor again");
            self.metrics.observe_verification_failure();
            let _ = std::fs::remove_file(self.path(&entry.record.kind, digest));
            let _ = std::fs::remove_file(self.record_path(&entry.record.kind, digest));
        }
    }
}

/// The entries of one `<folder>/<algorithm>` directory: each file whose record reads and whose
/// size matches it. What does not is removed.
fn scan(dir: &Path, algorithm: &str) -> Vec<(Digest, Record)> {
    let mut found = Vec::new();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in listing.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            continue;
        }
        let Ok(digest) = format!("{algorithm}:{name}").parse::<Digest>() else {
            let _ = std::fs::remove_file(entry.path());
            continue;
        };
        let record = std::fs::read(dir.join(format!("{name}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
        let size = entry.metadata().map(|m| m.len()).ok();
        match record {
            Some(record) if Some(record.size) == size => found.push((digest, record)),
            _ => {
                let _ = std::fs::remove_file(entry.path());
                let _ = std::fs::remove_file(dir.join(format!("{name}.json")));
            }
        }
    }
    found
}

/// Writes `bytes` to `path` through a temporary file renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests;
