//! One regtee per state directory.
//!
//! Two servers sharing a queue would each resume the other's running jobs at start-up; an
//! advisory lock on the state directory itself makes the second one refuse to start, and tells
//! the CLI whether a server is running. The directory, not a file in it: a lock file can be
//! deleted while held, and the next server would lock a new one.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

/// Held while a server owns the state directory; released on drop or process exit.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another regtee is already using state directory {0}: stop it, or give this one its own [state] dir"
    )]
    Held(PathBuf),
    /// The state directory cannot be created, opened or locked.
    #[error("cannot lock state directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn lock_file(dir: &Path) -> Result<(File, PathBuf), LockError> {
    let io = |source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = File::open(dir).map_err(io)?;
    Ok((file, dir.to_path_buf()))
}

impl StateLock {
    /// Takes the lock or reports who holds it.
    pub(crate) fn acquire(dir: &Path) -> Result<StateLock, LockError> {
        let (file, path) = lock_file(dir)?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held(dir.to_path_buf())),
            Err(TryLockError::Error(source)) => Err(LockError::Io { path, source }),
        }
    }

    /// Whether a server currently holds the lock on `dir`.
    pub(crate) fn is_held(dir: &Path) -> bool {
        matches!(StateLock::acquire(dir), Err(LockError::Held(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            StateLock::acquire(dir.path()),
            Err(LockError::Held(_))
        ));
        assert!(StateLock::is_held(dir.path()));
        // Whatever files are removed from the directory, it stays locked.
        let _ = std::fs::remove_file(dir.path().join("regtee.lock"));
        assert!(StateLock::is_held(dir.path()));
        drop(first);
        assert!(!StateLock::is_held(dir.path()));
    }
}
