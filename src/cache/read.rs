//! Reading a cached entry: whole or a range of it, streamed from its file in chunks. An entry
//! being read is not evicted. An entry not verified since this process started is hashed on its
//! first whole read: if it does not match, its last chunk is never sent and it is discarded.

use std::sync::Arc;

use bytes::Bytes;

use super::{Inner, Kind};
use crate::body::{BoxError, ProxyBody};
use crate::oci::digest::{Digest, Hasher};

/// Bytes read from the file at a time.
const CHUNK: u64 = 512 << 10;

/// A cached entry being read.
pub(crate) struct EntryRead {
    /// What it is.
    pub(crate) kind: Kind,
    /// The whole entry's size.
    pub(crate) size: u64,
    /// The bytes `start..=end` being sent, when a range was asked for.
    pub(crate) range: Option<(u64, u64)>,
    /// The bytes.
    pub(crate) body: ProxyBody,
}

/// Counts the entry as read while it lives.
struct Reading {
    inner: Arc<Inner>,
    digest: Digest,
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut index = self.inner.lock();
        if let Some(entry) = index.entries.get_mut(&self.digest) {
            entry.readers = entry.readers.saturating_sub(1);
        }
    }
}

struct Stream {
    file: Arc<std::fs::File>,
    at: u64,
    end: u64,
    /// Hashing a whole read of an entry not verified yet.
    hasher: Option<Hasher>,
    /// The chunk held back until the hash is known.
    held: Option<Bytes>,
    reading: Reading,
}

pub(super) fn open(
    inner: &Arc<Inner>,
    digest: &Digest,
    range: Option<(u64, u64)>,
) -> Option<EntryRead> {
    let (kind, size, verified) = {
        let tick = inner.tick();
        let mut index = inner.lock();
        let entry = index.entries.get_mut(digest)?;
        entry.readers += 1;
        entry.last_used = tick;
        (entry.record.kind.clone(), entry.record.size, entry.verified)
    };
    let reading = Reading {
        inner: inner.clone(),
        digest: digest.clone(),
    };
    let file = std::fs::File::open(inner.path(&kind, digest));
    let intact = file
        .as_ref()
        .ok()
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| m.len() == size);
    let (Ok(file), true) = (file, intact) else {
        drop(reading);
        inner.discard(digest);
        return None;
    };
    let (start, end) = match range {
        Some((start, end)) if start <= end && end < size => (start, end + 1),
        Some(_) => return None,
        None => (0, size),
    };
    let stream = Stream {
        file: Arc::new(file),
        at: start,
        end,
        hasher: (!verified && range.is_none()).then(|| Hasher::new(digest.algorithm())),
        held: None,
        reading,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let next = s.next().await?;
        Some((next.map(hyper::body::Frame::data), s))
    });
    Some(EntryRead {
        kind,
        size,
        range,
        body: crate::body::boxed(http_body_util::StreamBody::new(body)),
    })
}

impl Stream {
    async fn next(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            if self.at >= self.end {
                let held = self.held.take()?;
                let last = self.verdict().map(|()| held);
                if let Ok(chunk) = &last {
                    self.count(chunk.len());
                }
                return Some(last);
            }
            let chunk = match self.read_chunk().await {
                Ok(chunk) => chunk,
                Err(e) => return Some(Err(e)),
            };
            let Some(hasher) = self.hasher.as_mut() else {
                self.count(chunk.len());
                return Some(Ok(chunk));
            };
            hasher.update(&chunk);
            if let Some(previous) = self.held.replace(chunk) {
                self.count(previous.len());
                return Some(Ok(previous));
            }
        }
    }

    async fn read_chunk(&mut self) -> Result<Bytes, BoxError> {
        let len = (self.end - self.at).min(CHUNK);
        let (file, at) = (self.file.clone(), self.at);
        let bytes = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt as _;
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
        })
        .await??;
        self.at += len;
        Ok(bytes)
    }

    /// Whether the whole entry, now hashed, matches its digest; marks it verified, or discards it.
    fn verdict(&mut self) -> Result<(), BoxError> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        let inner = &self.reading.inner;
        let digest = &self.reading.digest;
        if hasher.finish().contradicts(digest) {
            inner.discard(digest);
            return Err(format!("the cached copy of {digest} is damaged").into());
        }
        if let Some(entry) = inner.lock().entries.get_mut(digest) {
            entry.verified = true;
        }
        Ok(())
    }

    fn count(&self, bytes: usize) {
        if bytes > 0 {
            self.reading
                .inner
                .metrics
                .observe_cache_bytes("cache", bytes as u64);
        }
    }
}
