//! A fill: one read of a digest from Harbor (or a target), written to a temporary file while
//! every client that asked for the digest meanwhile reads from it, at the speed it grows.
//!
//! The fill owns the upstream body, so a client that goes away takes nothing with it. Recent
//! bytes are kept in a bounded window in memory as well as written to the file; a reader that
//! falls behind the window reads the file. If the file cannot be written (a full disk), the fill
//! goes on for the readers it has from memory alone, waiting for the slowest (the window stays
//! bounded), and nothing is cached. No reader is given the last byte before the whole content
//! has matched its digest: content that does not match ends every reader short, so a client's
//! own verification fails instead of accepting it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use super::{Inner, Kind, Record};
use crate::body::{BoxError, ProxyBody};
use crate::oci::digest::{Digest, Hasher};

/// Bytes kept in memory per fill beyond what readers and the file have taken.
const WINDOW: usize = 8 << 20;

/// Bytes a reader takes from the file at a time.
const FILE_READ: usize = 256 << 10;

/// How a fill ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FillOutcome {
    /// The content matched its digest (cached, unless the disk refused it).
    Verified,
    /// It did not, or the stream broke: readers are cut, nothing is kept.
    Failed(String),
}

#[derive(Debug)]
enum Phase {
    /// Claimed; the upstream's answer is awaited.
    Pending,
    /// Streaming.
    Running { size: u64, kind: Kind },
    /// The starter did not begin it (Harbor said no, or the content cannot be cached).
    Abandoned,
}

struct State {
    phase: Phase,
    window: VecDeque<Bytes>,
    window_start: u64,
    window_bytes: usize,
    received: u64,
    /// Bytes in the file, readable; `None`: the file failed (or never opened).
    file: Option<(Arc<std::fs::File>, u64)>,
    end: Option<FillOutcome>,
    /// Each reader's offset, for pruning the window.
    readers: HashMap<u64, u64>,
    next_reader: u64,
}

/// A fill in progress (or about to be).
pub(crate) struct Fill {
    digest: Digest,
    repository: String,
    state: Mutex<State>,
    changed: Notify,
}

impl Fill {
    pub(super) fn pending(digest: Digest, repository: &str) -> Fill {
        Fill {
            digest,
            repository: repository.to_string(),
            state: Mutex::new(State {
                phase: Phase::Pending,
                window: VecDeque::new(),
                window_start: 0,
                window_bytes: 0,
                received: 0,
                file: None,
                end: None,
                readers: HashMap::new(),
                next_reader: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The repository Harbor served the content for, to the request that started the fill.
    pub(crate) fn repository(&self) -> &str {
        &self.repository
    }

    /// Waits until the fill begins: its size and kind, or `None` if it never will.
    pub(crate) async fn begun(&self) -> Option<(u64, Kind)> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match &self.lock().phase {
                Phase::Pending => {}
                Phase::Running { size, kind } => return Some((*size, kind.clone())),
                Phase::Abandoned => return None,
            }
            notified.await;
        }
    }

    /// A body reading the content from the start, as it arrives; `source` names where it comes
    /// from in the metrics.
    pub(crate) fn reader(self: &Arc<Self>, cache: &super::Cache, source: &str) -> ProxyBody {
        self.reader_for(&cache.inner, source)
    }

    fn reader_for(self: &Arc<Self>, inner: &Arc<Inner>, source: &str) -> ProxyBody {
        let id = {
            let mut state = self.lock();
            let id = state.next_reader;
            state.next_reader += 1;
            state.readers.insert(id, 0);
            id
        };
        let reader = Reader {
            fill: self.clone(),
            id,
            offset: 0,
            inner: inner.clone(),
            source: source.to_string(),
        };
        let stream = futures_util::stream::unfold(reader, |mut reader| async move {
            let next = reader.next().await?;
            Some((next.map(hyper::body::Frame::data), reader))
        });
        crate::body::boxed(http_body_util::StreamBody::new(stream))
    }

    fn set_end(&self, outcome: FillOutcome) {
        self.lock().end = Some(outcome);
        self.changed.notify_waiters();
    }
}

/// A fill claimed by one request, until it begins it (dropping it abandons the fill).
pub(crate) struct Starting {
    inner: Arc<Inner>,
    fill: Arc<Fill>,
    begun: bool,
}

impl Starting {
    pub(super) fn new(inner: Arc<Inner>, fill: Arc<Fill>) -> Starting {
        Starting {
            inner,
            fill,
            begun: false,
        }
    }

    /// Begins the fill with the content `body` of `size` bytes (the upstream's answer): the fill
    /// reads it to its end whoever stays. Returns this request's reader of it (`source` names
    /// where it comes from in the metrics), or `Err(body)` when it cannot be cached (larger than
    /// the cache): the caller streams it itself.
    pub(crate) fn begin(
        mut self,
        body: ProxyBody,
        size: u64,
        kind: Kind,
        source: &str,
    ) -> Result<ProxyBody, ProxyBody> {
        if !self.inner.reserve(size) {
            return Err(body);
        }
        self.begun = true;
        let tmp = self.inner.dir.join("tmp").join(format!(
            "{}-{}",
            self.fill.digest.hex(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&tmp);
        let (reading, writing) = match file.and_then(|f| Ok((Arc::new(f.try_clone()?), f))) {
            Ok((reading, writing)) => {
                (Some((reading, 0)), Some(tokio::fs::File::from_std(writing)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write to the cache directory; this read is streamed without caching");
                (None, None)
            }
        };
        {
            let mut state = self.fill.lock();
            state.phase = Phase::Running {
                size,
                kind: kind.clone(),
            };
            state.file = reading;
        }
        // This request's reader exists before the fill runs: a fill nobody reads may stop.
        let reader = self.fill.reader_for(&self.inner, source);
        self.fill.changed.notify_waiters();
        let run = Run {
            inner: self.inner.clone(),
            fill: self.fill.clone(),
            tmp,
            size,
            kind,
        };
        self.inner.tasks.spawn(run.run(body, writing));
        Ok(reader)
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if self.begun {
            return;
        }
        self.fill.lock().phase = Phase::Abandoned;
        self.inner.filling.remove(&self.fill.digest);
        self.fill.changed.notify_waiters();
    }
}

/// The fill's own task.
struct Run {
    inner: Arc<Inner>,
    fill: Arc<Fill>,
    tmp: PathBuf,
    size: u64,
    kind: Kind,
}

impl Run {
    async fn run(self, mut body: ProxyBody, mut file: Option<tokio::fs::File>) {
        let mut hasher = Hasher::new(self.fill.digest.algorithm());
        let mut received = 0u64;
        let failed = loop {
            let frame = match body.frame().await {
                None => break None,
                Some(Err(e)) => break Some(format!("the stream broke: {e}")),
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len() as u64;
            if received > self.size {
                break Some(format!("more than the {} bytes announced", self.size));
            }
            hasher.update(&data);
            if let Some(f) = file.as_mut()
                && let Err(e) = f.write_all(&data).await
            {
                tracing::warn!(error = %e, digest = %self.fill.digest, "cannot write to the cache (is its disk full?); the readers get the rest from memory, nothing is cached");
                file = None;
            }
            if let Some(why) = self.publish(data, file.is_some()).await {
                break Some(why);
            }
        };
        let outcome = match failed {
            Some(why) => FillOutcome::Failed(why),
            None if received != self.size => {
                FillOutcome::Failed(format!("{received} bytes of the {} announced", self.size))
            }
            None => {
                let actual = hasher.finish();
                if actual.contradicts(&self.fill.digest) {
                    self.inner.metrics.observe_verification_failure();
                    tracing::warn!(expected = %self.fill.digest, %actual, "content did not match its digest: not cached, and its readers were cut short");
                    FillOutcome::Failed(format!("the content hashes to {actual}"))
                } else {
                    FillOutcome::Verified
                }
            }
        };
        // Readers finish now; the file is synced and put in place after.
        self.fill.set_end(outcome.clone());
        let cached = outcome == FillOutcome::Verified
            && match file {
                Some(f) => self.commit(f).await,
                None => false,
            };
        if !cached {
            self.inner.unreserve(self.size);
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        self.inner.filling.remove(&self.fill.digest);
    }

    /// Makes `data` readable; waits while the window is full and the file cannot take over.
    /// `Some(reason)` if the fill should stop.
    async fn publish(&self, data: Bytes, file_ok: bool) -> Option<String> {
        {
            let mut state = self.fill.lock();
            let len = data.len();
            state.window.push_back(data);
            state.window_bytes += len;
            state.received += len as u64;
            if file_ok {
                let received = state.received;
                if let Some((_, on_file)) = state.file.as_mut() {
                    *on_file = received;
                }
            } else {
                state.file = None;
            }
            prune(&mut state);
        }
        self.fill.changed.notify_waiters();
        loop {
            let notified = self.fill.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.fill.lock();
                prune(&mut state);
                if !file_ok && state.readers.is_empty() {
                    return Some("nobody reads it and the cache cannot keep it".into());
                }
                if state.window_bytes <= WINDOW {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Syncs the file and puts it in place; whether the entry is cached.
    async fn commit(&self, file: tokio::fs::File) -> bool {
        let record = Record {
            kind: self.kind.clone(),
            size: self.size,
            repositories: [self.fill.repository.clone()].into(),
        };
        let path = self.inner.path(&self.kind, &self.fill.digest);
        let synced = file.sync_all().await;
        drop(file);
        let placed = synced.and_then(|()| {
            std::fs::write(
                self.inner.record_path(&self.kind, &self.fill.digest),
                serde_json::to_vec(&record).unwrap_or_default(),
            )?;
            std::fs::rename(&self.tmp, &path)
        });
        match placed {
            Ok(()) => {
                self.inner.insert(&self.fill.digest, record, self.size);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot put a filled entry in place; it is not cached");
                false
            }
        }
    }
}

/// Drops what every reader has passed; with a file, also what it holds once the window is full
/// (a reader behind then reads the file).
fn prune(state: &mut State) {
    let readers_floor = state
        .readers
        .values()
        .copied()
        .min()
        .unwrap_or(state.received);
    let floor = match &state.file {
        Some((_, on_file)) if state.window_bytes > WINDOW => *on_file,
        Some((_, on_file)) => readers_floor.min(*on_file),
        None => readers_floor,
    };
    while let Some(front) = state.window.front() {
        let end = state.window_start + front.len() as u64;
        if end > floor {
            break;
        }
        state.window_start = end;
        state.window_bytes -= front.len();
        state.window.pop_front();
    }
}

/// One client's read of a fill.
struct Reader {
    fill: Arc<Fill>,
    id: u64,
    offset: u64,
    inner: Arc<Inner>,
    source: String,
}

/// What a reader may take now.
enum Take {
    Bytes(Bytes),
    File(Arc<std::fs::File>, u64),
    Wait,
    Done,
    Cut(String),
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            let notified = self.fill.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let take = self.take();
            let bytes = match take {
                Take::Done => return None,
                Take::Cut(why) => {
                    return Some(Err(format!(
                        "the cached read of {} failed: {why}",
                        self.fill.digest
                    )
                    .into()));
                }
                Take::Wait => {
                    notified.await;
                    continue;
                }
                Take::Bytes(bytes) => bytes,
                Take::File(file, len) => {
                    let offset = self.offset;
                    let read = tokio::task::spawn_blocking(move || {
                        use std::os::unix::fs::FileExt as _;
                        let mut buf = vec![0u8; len as usize];
                        file.read_exact_at(&mut buf, offset)
                            .map(|()| Bytes::from(buf))
                    })
                    .await;
                    match read {
                        Ok(Ok(bytes)) => bytes,
                        Ok(Err(e)) => return Some(Err(e.into())),
                        Err(e) => return Some(Err(e.into())),
                    }
                }
            };
            self.offset += bytes.len() as u64;
            self.fill.lock().readers.insert(self.id, self.offset);
            self.fill.changed.notify_waiters();
            self.inner
                .metrics
                .observe_cache_bytes(&self.source, bytes.len() as u64);
            return Some(Ok(bytes));
        }
    }

    /// Decides under the lock; reads the file outside it.
    fn take(&self) -> Take {
        let state = self.fill.lock();
        let size = match &state.phase {
            Phase::Running { size, .. } => *size,
            Phase::Pending => return Take::Wait,
            Phase::Abandoned => return Take::Cut("the fill did not begin".into()),
        };
        if let Some(FillOutcome::Failed(why)) = &state.end {
            return Take::Cut(why.clone());
        }
        if self.offset >= size {
            return Take::Done;
        }
        // The last byte only once the whole has matched its digest.
        let verified = state.end == Some(FillOutcome::Verified);
        let limit = if verified {
            state.received
        } else {
            state.received.min(size - 1)
        };
        if self.offset >= limit {
            return Take::Wait;
        }
        if self.offset >= state.window_start {
            let mut at = state.window_start;
            for frame in &state.window {
                let end = at + frame.len() as u64;
                if self.offset < end {
                    let from = (self.offset - at) as usize;
                    let to = (limit.min(end) - at) as usize;
                    return Take::Bytes(frame.slice(from..to));
                }
                at = end;
            }
            return Take::Wait;
        }
        match &state.file {
            Some((file, on_file)) if self.offset < *on_file => {
                let len = (limit.min(*on_file) - self.offset).min(FILE_READ as u64);
                Take::File(file.clone(), len)
            }
            _ => Take::Cut("fell behind what the cache keeps".into()),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.fill.lock().readers.remove(&self.id);
        self.fill.changed.notify_waiters();
    }
}
