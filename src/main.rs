//! The `regtee` command: parse arguments, load the config, set up logging, call the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use regtee::config::{Config, LogFormat};
use regtee::{JobFilter, JobState};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// A transparent registry proxy in front of Harbor that mirrors every push to cloud registries.
#[derive(Parser)]
#[command(name = "regtee", version, about, long_about = None)]
struct Cli {
    /// The config file (every command takes it).
    #[arg(long, short = 'c', default_value = "./regtee.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, the mirror workers and the admin API.
    Serve,
    /// Run a local demo: two registries as Harbor and cloud, regtee between them.
    Demo {
        /// Exit after the demo push instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// The queue's database.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Development certificates for the HTTPS listener.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Per-target job counts, oldest unfinished job, recent failures.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only failed jobs.
        #[arg(long)]
        failed: bool,
        /// Only jobs in this state (pending, running, done, skipped, failed).
        #[arg(long, conflicts_with = "failed")]
        state: Option<String>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Only this Harbor project.
        #[arg(long)]
        project: Option<String>,
        /// Only this repository.
        #[arg(long)]
        repository: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Jobs with ids below this one (next page).
        #[arg(long)]
        before: Option<i64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue a failed (or finished) job again, or every failed job.
    Retry {
        /// The job id.
        #[arg(required_unless_present = "failed")]
        id: Option<i64>,
        /// Every failed job.
        #[arg(long, conflicts_with = "id")]
        failed: bool,
        /// With --failed: only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Backfill a Harbor project: queue every tag a target lacks or holds with another digest.
    Sync {
        /// The Harbor project.
        #[arg(required_unless_present = "cancel")]
        project: Option<String>,
        /// Stop the running backfill with this id instead (jobs it queued stay queued).
        #[arg(long, value_name = "ID", conflicts_with_all = ["project", "target", "dry_run"])]
        cancel: Option<u64>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Compare and report; queue nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cutover report: Harbor's digest and each target's, per tag; exit 1 while any differs.
    Diff {
        /// Harbor projects (all in the catalog when none).
        projects: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and test Harbor and every target.
    Check,
    /// Switch the registry clients are served from: a target (`--to tcr`), or back to Harbor
    /// (`--to upstream`); refused while they differ or jobs toward it are unfinished.
    Cutover {
        /// `upstream` or a target's name.
        #[arg(long, required_unless_present = "status")]
        to: Option<String>,
        /// Switch although the gate refuses (it says so in the log).
        #[arg(long, requires = "to")]
        force: bool,
        /// Show the primary, since when, switched by whom.
        #[arg(long, conflicts_with = "to")]
        status: bool,
    },
    /// Exit 0 when the server of this config answers /healthz on its admin listener (for
    /// container health checks).
    Health,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Copy the SQLite queue under [state] dir (all jobs, all states, their history) into
    /// PostgreSQL, before running several replicas. The password comes from PGPASSWORD.
    Migrate {
        /// postgres://user@host:port/database (libpq's URL; PG* variables fill what it leaves out).
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA and a server certificate for the given hosts.
    Generate {
        /// A host name or IP address clients use (repeat for several).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Validity of the server certificate in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

/// Exit code for configuration errors (EX_CONFIG would be 78; 64 is EX_USAGE, as linkerd uses).
const EXIT_CONFIG: u8 = 64;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    report(Config::load(path))
}

fn report(loaded: Result<Config, regtee::config::ConfigError>) -> Result<Config, ExitCode> {
    loaded.map_err(|e| {
        eprintln!("regtee: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `RUST_LOG` when it holds a filter, else the config's level: an empty or unparsable
/// `RUST_LOG` must not silence regtee.
///
/// Lines are formatted where they happen and written to stderr in batches by a thread of their
/// own (`ops::log_writer`); the returned guard writes what is left when `main` ends. If that
/// thread cannot start, lines go straight to stderr.
fn init_logging(format: LogFormat, level: &str) -> Option<regtee::log_writer::LogFlush> {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok());
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::stderr().is_terminal();
    let (writer, flush) = match regtee::log_writer::start(std::io::stderr()) {
        Ok((writer, flush)) => (BoxMakeWriter::new(writer), Some(flush)),
        Err(e) => {
            eprintln!("regtee: log writer thread: {e}; writing log lines directly");
            (BoxMakeWriter::new(std::io::stderr), None)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    flush
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    regtee::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    runtime.block_on(dispatch(cli))
}

fn code(result: anyhow::Result<i32>) -> ExitCode {
    match result {
        Ok(c) => ExitCode::from(c.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("regtee: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> ExitCode {
    let path = cli.config;
    match cli.command {
        Command::Serve => serve(&path).await,
        Command::Demo { exit } => {
            let _log = init_logging(LogFormat::Text, "warn");
            code(
                regtee::demo::run(!exit)
                    .await
                    .map(|()| 0)
                    .map_err(Into::into),
            )
        }
        Command::Certs {
            command: CertsCommand::Generate { hosts, out, days },
        } => code(
            regtee::certs::generate(&hosts, &out, days)
                .map(|files| {
                    print!("{}", regtee::certs::next_steps(&files, &hosts, &path));
                    0
                })
                .map_err(Into::into),
        ),
        Command::State {
            command: StateCommand::Migrate { to },
        } => {
            with_queue_config(&path, |c| async move {
                regtee::cli::migrate_state(&c, &to).await
            })
            .await
        }
        Command::Status { json } => {
            with_queue_config(
                &path,
                |c| async move { regtee::cli::status(&c, json).await },
            )
            .await
        }
        Command::Jobs {
            failed,
            state,
            target,
            project,
            repository,
            limit,
            before,
            json,
        } => {
            let Some(state) = job_state(failed, state.as_deref()) else {
                eprintln!("regtee: --state must be pending, running, done, skipped or failed");
                return ExitCode::from(2);
            };
            let filter = JobFilter {
                state,
                target,
                repository,
                project,
                before_id: before,
                limit,
            };
            with_queue_config(&path, |c| async move {
                regtee::cli::jobs(&c, filter, json).await
            })
            .await
        }
        Command::Retry { id, target, .. } => {
            with_queue_config(&path, |c| async move {
                regtee::cli::retry(&c, id, target).await
            })
            .await
        }
        Command::Sync {
            cancel: Some(id), ..
        } => {
            with_queue_config(&path, |c| async move {
                regtee::cli::cancel_backfill(&c, id).await
            })
            .await
        }
        Command::Sync {
            project,
            target,
            dry_run,
            ..
        } => {
            let project = project.unwrap_or_default();
            with_config(&path, |c| async move {
                regtee::cli::sync(&c, &project, target, dry_run).await
            })
            .await
        }
        Command::Diff { projects, json } => {
            with_config(&path, |c| async move {
                regtee::cli::diff(&c, projects, json).await
            })
            .await
        }
        Command::Cutover { to, force, .. } => {
            with_config(&path, |c| async move {
                regtee::cli::cutover(&c, to, force).await
            })
            .await
        }
        Command::Health => {
            with_queue_config(&path, |c| async move { regtee::cli::health(&c).await }).await
        }
        Command::Check => {
            let shown = path.clone();
            with_config(
                &path,
                |c| async move { regtee::cli::check(&c, &shown).await },
            )
            .await
        }
    }
}

/// `regtee serve`: the proxy, the workers and the admin API until SIGTERM or SIGINT.
async fn serve(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _log = init_logging(config.log.format, &config.log.level);
    code(
        regtee::run(config, shutdown_signal())
            .await
            .map(|()| 0)
            .context("regtee could not start"),
    )
}

/// The state `regtee jobs` lists: `--failed`, else `--state`, else any (`Some(None)`); `None`
/// when `--state` names no state.
fn job_state(failed: bool, state: Option<&str>) -> Option<Option<JobState>> {
    if failed {
        return Some(Some(JobState::Failed));
    }
    match state {
        None => Some(None),
        Some(s) => JobState::parse(s).map(Some),
    }
}

/// Runs a CLI command with the full config (registry secrets needed).
async fn with_config<F, Fut>(path: &std::path::Path, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<i32, regtee::cli::CliError>>,
{
    run_cli(load(path), f).await
}

/// Runs a CLI command that only needs the queue or the admin API.
async fn with_queue_config<F, Fut>(path: &std::path::Path, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<i32, regtee::cli::CliError>>,
{
    run_cli(report(Config::load_for_queue_commands(path)), f).await
}

async fn run_cli<F, Fut>(config: Result<Config, ExitCode>, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<i32, regtee::cli::CliError>>,
{
    let config = match config {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _log = init_logging(config.log.format, "warn");
    code(f(config).await.map_err(Into::into))
}
