//! A real PostgreSQL server on this machine, for tests and benches: Debian's `postgresql`
//! package, `initdb` and `pg_ctl` run as an unprivileged user (PostgreSQL refuses root) in a
//! temporary directory, on a free loopback port, password authentication (SCRAM) required.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
pub struct LocalPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    /// Whether commands run as `nobody` (regtee's tests run as root).
    as_nobody: bool,
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
        let as_nobody = is_root();
        let password = format!("pg-{}", crate::mirror::queue::now_ms());
        std::fs::write(dir.join("pwfile"), &password).map_err(io("password file"))?;
        if as_nobody {
            let (uid, gid) = nobody().ok_or_else(|| PostgresError::Failed {
                command: "looking up nobody".into(),
                output: "no nobody in /etc/passwd".into(),
            })?;
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
        server.stop_with_this_process();
        server.psql("postgres", &format!("CREATE DATABASE {USER}"))?;
        Ok(server)
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<String, PostgresError> {
        let path = self.bin.join(program);
        let mut command = if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            .env("PGPASSWORD", &self.password)
            .current_dir(&self.dir);
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

    /// A server shared by a whole test binary lives in a `static`, whose `Drop` never runs: a
    /// watcher stops the server and deletes its files once this process is gone, however it
    /// ended.
    fn stop_with_this_process(&self) {
        let runner = if self.as_nobody {
            "runuser -u nobody -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {runner}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.dir.join("data").display(),
            dir = self.dir.display(),
        );
        let watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = watcher {
            tracing::warn!(error = %e, "no watcher for the test PostgreSQL: stop it by hand if this process dies");
        }
    }

    fn start_server(&self) -> Result<(), PostgresError> {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let options = format!(
            "-k {} -h 127.0.0.1 -p {} -c fsync=on -c max_connections=200",
            self.dir.display(),
            self.port
        );
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )?;
        Ok(())
    }

    /// Stops the server (fast shutdown: connections cut, nothing committed lost).
    pub fn stop(&self) -> Result<(), PostgresError> {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
        .map(|_| ())
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
        let pid_file = self.dir.join("data/postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .map_err(io(format!("reading {}", pid_file.display())))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
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

    /// Sends `signal` to the server's processes.
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
        let data = self.dir.join("data");
        let _ = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
