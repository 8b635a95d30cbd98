//! Where log lines go: a buffer that a thread of its own writes to stderr in batches.
//!
//! A request must not wait on `write(2)` to a slow terminal, pipe or journal, and it must not
//! pay for waking a writer thread either: with one wake-up per line (a channel to a writer
//! thread, as `tracing-appender` does), logging cost a HEAD 1.75 context switches and ~30 µs of
//! CPU, measured with `perf stat`. Here the first line of a batch wakes the writer, which waits
//! [`BATCH_WINDOW`] for more before writing them all with one call; later lines of that batch
//! only append to the buffer.
//!
//! Nothing is dropped: a producer finding [`MAX_BUFFERED`] bytes waiting blocks until the writer
//! has taken them (as a blocking writer would), and [`LogFlush`] writes what is left when it is
//! dropped at the end of `main`.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the writer lets lines gather after the first of a batch.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Bytes waiting after which producers wait for the writer.
pub(crate) const MAX_BUFFERED: usize = 1 << 20;

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when a batch starts and when the sink closes.
    started: Condvar,
    /// Signalled when the writer has taken a batch.
    taken: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves plain bytes behind: still writable.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The producers' side: a `MakeWriter` for `tracing_subscriber`.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Stops the writer and writes every line still buffered when dropped.
pub struct LogFlush {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn start(out: impl Write + Send + 'static) -> std::io::Result<(BatchedStderr, LogFlush)> {
    let shared = Arc::new(Shared::default());
    let writer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("regtee-log".into())
            .spawn(move || write_batches(&shared, out))?
    };
    Ok((
        BatchedStderr {
            shared: shared.clone(),
        },
        LogFlush {
            shared,
            writer: Some(writer),
        },
    ))
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.lines.is_empty() && !pending.closed {
            pending = shared
                .started
                .wait(pending)
                .unwrap_or_else(|p| p.into_inner());
        }
        if pending.lines.is_empty() {
            return; // closed, nothing left
        }
        if !pending.closed && pending.lines.len() < MAX_BUFFERED {
            drop(pending);
            std::thread::sleep(BATCH_WINDOW);
            pending = shared.lock();
        }
        std::mem::swap(&mut pending.lines, &mut spare);
        drop(pending);
        shared.taken.notify_all();
        // stderr gone is nothing a log line could report.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
    }
}

impl Write for &BatchedStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = &self.shared;
        let mut pending = shared.lock();
        while pending.lines.len() >= MAX_BUFFERED && !pending.closed {
            pending = shared
                .taken
                .wait(pending)
                .unwrap_or_else(|p| p.into_inner());
        }
        let first = pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        drop(pending);
        if first {
            shared.started.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = &'a BatchedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.started.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink tests can read back.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl Write for Collected {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_and_flushed_at_the_end() {
        let out = Collected::default();
        let (sink, flush) = start(out.clone()).unwrap();
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        // Lines larger in total than MAX_BUFFERED: producers wait, nothing drops.
                        let line = format!("{p} {i} {}\n", "x".repeat(100));
                        (&sink).write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        drop(flush);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4 * 5000);
        for p in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{p} ")))
                .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5000).collect::<Vec<_>>(), "producer {p}");
        }
    }

    #[test]
    fn a_line_reaches_the_output_without_a_flush() {
        let out = Collected::default();
        let (sink, _flush) = start(out.clone()).unwrap();
        (&sink).write_all(b"one line\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"one line\n");
    }
}
