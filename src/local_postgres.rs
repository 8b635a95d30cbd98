//! A real PostgreSQL server on this machine, for tests and benches: Debian's `postgresql`
//! package, `initdb` and `pg_ctl` run as an unprivileged user (PostgreSQL refuses root) in a
//! temporary directory, on a free loopback port, password authentication (SCRAM) required.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::local_process::{self, LocalProcess};
use crate::local_registry::free_port;

/// The role tests connect as.
pub const USER: &str = "regtee";

/// Why the server could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// No server binaries.
    #[error(
        "PostgreSQL is not installed: `apt-get install postgresql` (looked in /usr/lib/postgresql/*/bin)"
    )]
    NotInstalled,
    /// A file or directory could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {output}")]
    Failed {
        /// The command.
        command: String,
        /// What it printed.
        output: String,
    },
}

/// A running server; stopped and deleted on drop.
///
/// The postmaster is a child of this process (not started through `pg_ctl`, which detaches
/// it), so it stops with its owner and, if the owner is a `static`, with this process.
pub struct LocalPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    /// `nobody`'s uid and gid when this process is root (PostgreSQL refuses to run as root).
    as_nobody: Option<(u32, u32)>,
    postmaster: std::sync::Mutex<Option<LocalProcess>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

/// The newest installed server's binaries.
fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// `nobody`'s uid and gid, from `/etc/passwd`.
fn nobody() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("nobody:"))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl LocalPostgres {
    /// Initialises a cluster in a new temporary directory and starts it.
    pub fn start() -> Result<LocalPostgres, PostgresError> {
        let bin = server_bin().ok_or(PostgresError::NotInstalled)?;
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("regtee-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        local_process::remove_dir_at_exit(&dir);
        let as_nobody = if is_root() {
            Some(nobody().ok_or_else(|| PostgresError::Failed {
                command: "looking up nobody".into(),
                output: "no nobody in /etc/passwd".into(),
            })?)
        } else {
            None
        };
        let password = format!("pg-{}", crate::queue::now_ms());
        std::fs::write(dir.join("pwfile"), &password).map_err(io("password file"))?;
        if let Some((uid, gid)) = as_nobody {
            for p in [dir.clone(), dir.join("pwfile")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(io(format!("chown {}", p.display())))?;
            }
        }
        let port = free_port().map_err(io("a free port"))?;
        let server = LocalPostgres {
            dir,
            bin,
            port,
            password,
            as_nobody,
            postmaster: std::sync::Mutex::new(None),
        };
        let data = server.dir.join("data");
        let pwfile = server.dir.join("pwfile");
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                USER.as_ref(),
                "--auth=scram-sha-256".as_ref(),
                "--pwfile".as_ref(),
                pwfile.as_os_str(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        server.start_server()?;
        server.psql("postgres", &format!("CREATE DATABASE {USER}"))?;
        Ok(server)
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<String, PostgresError> {
        let mut command = self.command(program);
        command.args(args).env("PGPASSWORD", &self.password);
        let out = command.output().map_err(io(format!("running {program}")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(PostgresError::Failed {
                command: program.to_string(),
                output: text,
            });
        }
        Ok(text)
    }

    /// One of the server's programs, as the user the server runs as, in its directory.
    fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.as_nobody {
            command.uid(uid).gid(gid);
        }
        command.current_dir(&self.dir);
        command
    }

    /// Starts the postmaster and waits until it says it is ready (the status line of
    /// `postmaster.pid`, as `pg_ctl -w` reads it).
    fn start_server(&self) -> Result<(), PostgresError> {
        let data = self.dir.join("data");
        let log = std::fs::File::create(self.dir.join("server.log")).map_err(io("server log"))?;
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&self.dir)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-c", "fsync=on", "-c", "max_connections=200"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io("server log"))?)
            .stderr(log);
        let mut postmaster = LocalProcess::spawn(command).map_err(io("starting postgres"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = postmaster.try_wait() {
                return Err(PostgresError::Failed {
                    command: format!("postgres ({status})"),
                    output: std::fs::read_to_string(self.dir.join("server.log"))
                        .unwrap_or_default(),
                });
            }
            let ready = std::fs::read_to_string(data.join("postmaster.pid"))
                .is_ok_and(|pid| pid.lines().nth(7).is_some_and(|l| l.trim() == "ready"));
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(PostgresError::Failed {
                    command: "postgres".into(),
                    output: "not ready within 60 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.postmaster.lock().unwrap_or_else(|p| p.into_inner()) = Some(postmaster);
        Ok(())
    }

    /// Stops the server (fast shutdown: connections cut, nothing committed lost).
    pub fn stop(&self) -> Result<(), PostgresError> {
        let taken = self
            .postmaster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut postmaster) = taken {
            postmaster.signal_leader("-INT");
            postmaster
                .wait()
                .map_err(io("waiting for postgres to stop"))?;
        }
        Ok(())
    }

    /// Starts the server again after [`LocalPostgres::stop`].
    pub fn restart(&self) -> Result<(), PostgresError> {
        self.start_server()
    }

    /// Stops every server process with SIGSTOP: connections stay open and accepted, nothing
    /// answers. A database that stalls, as an overloaded or storage-hung server does.
    pub fn freeze(&self) -> Result<(), PostgresError> {
        self.signal("-STOP")
    }

    /// Lets the processes [`LocalPostgres::freeze`] stopped run on.
    pub fn thaw(&self) -> Result<(), PostgresError> {
        self.signal("-CONT")
    }

    /// The server's processes: the postmaster and its children (the backends serving
    /// connections, the WAL writer, the checkpointer...).
    pub fn server_pids(&self) -> Result<Vec<String>, PostgresError> {
        let postmaster = self
            .postmaster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|p| p.id().to_string())
            .ok_or_else(|| PostgresError::Failed {
                command: "listing the server's processes".into(),
                output: "the server is stopped".into(),
            })?;
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc")
            .map_err(io("listing /proc"))?
            .flatten()
        {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
            let parent = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1));
            if parent == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(pids)
    }

    /// Sends `signal` to the server's processes. Not to its process group: every child of the
    /// postmaster makes itself a group leader (`InitPostmasterChild`).
    fn signal(&self, signal: &str) -> Result<(), PostgresError> {
        let pids = self.server_pids()?;
        let out = Command::new("kill")
            .arg(signal)
            .args(&pids)
            .output()
            .map_err(io("running kill"))?;
        if !out.status.success() {
            return Err(PostgresError::Failed {
                command: format!("kill {signal} {}", pids.join(" ")),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// Runs one SQL statement with `psql` in `database`; returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, PostgresError> {
        let port = self.port.to_string();
        self.run(
            "psql",
            &[
                "-X".as_ref(),
                "-A".as_ref(),
                "-t".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                USER.as_ref(),
                "-d".as_ref(),
                database.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
        )
    }

    /// A new empty database (one per test, on a shared server).
    pub fn create_database(&self, name: &str) -> Result<String, PostgresError> {
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    /// `postgres://regtee@127.0.0.1:PORT/DATABASE` (the password is separate).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Where the server keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until the server accepts connections again (after a restart).
    pub fn wait_ready(&self, within: Duration) -> Result<(), PostgresError> {
        let deadline = Instant::now() + within;
        loop {
            match self.psql("postgres", "SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // A frozen server would not hear the stop.
        let _ = self.thaw();
        let taken = self
            .postmaster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut postmaster) = taken {
            // Immediate shutdown removes the shared memory, which a killed server leaves
            // behind; its children follow the postmaster.
            postmaster.stop("-QUIT", Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        local_process::forget_dir(&self.dir);
    }
}
