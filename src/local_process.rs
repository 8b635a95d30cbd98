//! Processes the demo, tests and benches start (registries, PostgreSQL, nginx, dockerd, regtee
//! itself), each stopped with its owner and with this process, however this process ends.
//!
//! Each runs as the leader of a process group of its own, so stopping the group stops whatever
//! it forked too (nginx's workers, PostgreSQL's backends). Dropping a [`LocalProcess`] kills its
//! group and reaps it. Two owners never drop: a `static` (a server a whole test binary shares)
//! and a process killed by a signal. For both, one watchdog per process, a bash reading a pipe
//! that only this process holds, kills every group still listed, and then deletes the
//! directories listed with them, once the pipe closes, which the kernel does when this process
//! ends, whatever the reason. Nothing here relies on a process's own config (a daemonizing nginx
//! leaves its group: run it in the foreground).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};

/// A child process leading its own process group, killed (group and all) on drop.
pub struct LocalProcess {
    child: Child,
    reaped: bool,
}

impl LocalProcess {
    /// Starts `command` in a new process group listed with the watchdog.
    pub fn spawn(mut command: Command) -> std::io::Result<LocalProcess> {
        command.process_group(0);
        let child = command.spawn()?;
        watchdog::list(Entry::Group(child.id()));
        Ok(LocalProcess {
            child,
            reaped: false,
        })
    }

    /// The leader's process id, which is also the group's id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The leader's exit status, if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the leader to exit.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Sends `signal` (`-TERM`, `-STOP`...) to the leader only.
    pub fn signal_leader(&self, signal: &str) -> bool {
        send(signal, &self.child.id().to_string())
    }

    /// Sends `signal` to every process of the group.
    pub(crate) fn signal_group(&self, signal: &str) -> bool {
        send(signal, &format!("-{}", self.child.id()))
    }

    /// Asks the leader to stop with `signal`, waits up to `grace` for it, then kills the group.
    pub fn stop(&mut self, signal: &str, grace: std::time::Duration) {
        if self.reaped {
            return;
        }
        let deadline = std::time::Instant::now() + grace;
        if self.signal_leader(signal) {
            while std::time::Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        self.kill();
    }

    /// Kills the group and reaps the leader; the watchdog forgets it.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        self.signal_group("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        watchdog::unlist(Entry::Group(self.child.id()));
        self.reaped = true;
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kill SIGNAL -- TARGET`; a target that is gone is not an error worth reporting.
fn send(signal: &str, target: &str) -> bool {
    Command::new("kill")
        .args([signal, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deletes `dir` when this process ends, if nothing deleted it before ([`forget_dir`]).
pub fn remove_dir_at_exit(dir: &Path) {
    watchdog::list(Entry::Dir(dir.to_path_buf()));
}

/// No longer deletes `dir` at exit (its owner deleted it).
pub fn forget_dir(dir: &Path) {
    watchdog::unlist(Entry::Dir(dir.to_path_buf()));
}

/// What the watchdog cleans up: process groups first, then directories.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Group(u32),
    Dir(PathBuf),
}

mod watchdog {
    use super::*;

    /// Once stdin closes: asks the listed groups to stop (SIGTERM: PostgreSQL removes its
    /// shared memory, dockerd stops containerd), kills what is left after 2 s, waits (at most
    /// 10 s) until they are gone, then deletes the listed directories (unmounting what was
    /// left mounted below them first) and its own. Terminal
    /// signals are ignored: Ctrl-C on a test run reaches that run's group, and the watchdog must
    /// outlive it.
    const SCRIPT: &str = r#"trap '' INT TERM HUP QUIT
read -r _
dir=$1
groups=() dirs=()
load() {
  groups=() dirs=()
  while read -r kind arg; do
    case $kind in g) groups+=("$arg") ;; d) dirs+=("$arg") ;; esac
  done < "$dir/list"
}
signal() { local g; for g in "${groups[@]}"; do kill "$1" -- "-$g" 2>/dev/null; done; }
# Whether a listed group still has a process that is not a zombie (reaping those is not ours
# to wait for). Builtins only: this runs every 50 ms.
alive() {
  local listed=" ${groups[*]} " st line
  for st in /proc/[0-9]*/stat; do
    { read -r line < "$st"; } 2>/dev/null || continue
    set -- ${line##*) }
    [[ $1 != Z && $listed == *" $3 "* ]] && return 0
  done
  return 1
}
wait_gone() { local n=0; while (( n < $1 )) && alive; do n=$((n+1)); sleep 0.05; done; }
# What a dead daemon left mounted below a directory (dockerd's netns of a host-network
# container, its data root's bind mount), deepest first: rm cannot delete a mount point.
unmount_below() {
  local m
  while read -r _ m _; do [[ $m == "$1"/* ]] && echo "$m"; done < /proc/mounts |
    sort -r | while read -r m; do umount -l -- "$m" 2>/dev/null; done
}
load
signal -TERM; wait_gone 40
signal -KILL; wait_gone 200
for d in "${dirs[@]}"; do unmount_below "$d"; rm -rf -- "$d"; done
rm -rf -- "$dir""#;

    struct Watchdog {
        dir: PathBuf,
        entries: Mutex<BTreeSet<Entry>>,
        /// The write end only this process holds: its close is the signal.
        _pipe: ChildStdin,
        _shell: Child,
    }

    fn get() -> Option<&'static Watchdog> {
        static WATCHDOG: OnceLock<Option<Watchdog>> = OnceLock::new();
        WATCHDOG
            .get_or_init(|| match start() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "no watchdog: processes started here outlive this one if it is killed");
                    None
                }
            })
            .as_ref()
    }

    fn start() -> std::io::Result<Watchdog> {
        let dir = std::env::temp_dir().join(format!("regtee-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("list"), "")?;
        let mut child = Command::new("bash")
            .args(["-c", SCRIPT, "watchdog"])
            .arg(&dir)
            // Its own group: signals meant for this process's group do not reach it.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("the watchdog has no stdin"))?;
        Ok(Watchdog {
            dir,
            entries: Mutex::new(BTreeSet::new()),
            _pipe: stdin,
            _shell: child,
        })
    }

    pub(super) fn list(entry: Entry) {
        update(|entries| {
            entries.insert(entry);
        });
    }

    pub(super) fn unlist(entry: Entry) {
        update(|entries| {
            entries.remove(&entry);
        });
    }

    /// Rewrites the list whole (a new file renamed over the old one, so the watchdog never
    /// reads half of it).
    fn update(change: impl FnOnce(&mut BTreeSet<Entry>)) {
        let Some(watchdog) = get() else { return };
        let mut entries = watchdog.entries.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut entries);
        let mut text = String::new();
        for entry in entries.iter() {
            match entry {
                Entry::Group(id) => text.push_str(&format!("g {id}\n")),
                Entry::Dir(path) => text.push_str(&format!("d {}\n", path.display())),
            }
        }
        let fresh = watchdog.dir.join("list.new");
        let written = std::fs::File::create(&fresh)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|_| std::fs::rename(&fresh, watchdog.dir.join("list")));
        if let Err(e) = written {
            tracing::warn!(error = %e, "the watchdog's list could not be written");
        }
    }
}
