//! Per-key async locks: one blob copy per (target, repository, digest) at a time, one writer
//! per tag, without a map that grows forever.

use std::sync::Arc;

use dashmap::DashMap;

/// Per-key async locks whose entries disappear when nobody holds or waits for them.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    map: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

pub(crate) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, key: String) -> KeyedGuard<'_> {
        let mutex = self.map.entry(key.clone()).or_default().clone();
        let guard = mutex.lock_owned().await;
        KeyedGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the map's own reference left: nobody holds or awaits this key.
        self.locks
            .map
            .remove_if(&self.key, |_, m| Arc::strong_count(m) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keyed_locks_serialize_and_clean_up() {
        let locks = Arc::new(KeyedLocks::default());
        let g = locks.lock("a".into()).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a".into()).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        assert!(locks.map.is_empty());
    }
}
