//! Replicas sharing one PostgreSQL queue (a real server on this machine):
//! - 2,000 blob jobs (4 KiB blobs already in Harbor) completed by 1 replica, then by 3: jobs/s
//!   from the moment they are committed to the last one done;
//! - the time from a replica's SIGKILL to its running jobs being claimed by another, at two
//!   lease lengths.
//!
//! The jobs are inserted straight into the queue's table (as 2,000 recorded pushes would leave
//! them), in one transaction with the `NOTIFY` regtee sends, so the figure is the workers'
//! and not the clients'. Each run has a fresh target registry: nothing is there already.
//! Registry storage is in memory (`/dev/shm`); PostgreSQL is on disk.
//!
//! Run: `cargo bench --bench replicas`

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use regtee::local_postgres::LocalPostgres;
use regtee::local_registry::{LocalRegistry, RegistryOptions};

const JOBS: usize = 2000;
const BLOB_SIZE: usize = 4096;
const REPOSITORY: &str = "bench/blobs";

#[tokio::main]
async fn main() {
    // Registries in memory; the queue's PostgreSQL on disk, flushing every commit it must.
    let work = memory_work_dir();
    let harbor = LocalRegistry::start(&work.path().join("harbor"), RegistryOptions::default())
        .await
        .expect("docker-registry is installed");
    let postgres = LocalPostgres::start().expect("PostgreSQL is installed");
    let client = client();

    // The blobs, in Harbor before any job names them.
    let digests: Vec<String> = {
        let blobs: Vec<(bytes::Bytes, String)> = (0..JOBS)
            .map(|_| {
                let blob = random_chunk(BLOB_SIZE);
                let digest = repeated_digest(&blob, 1);
                (blob, digest)
            })
            .collect();
        let base = harbor.url();
        let uploads = blobs.iter().map(|(blob, digest)| {
            let (client, base) = (&client, &base);
            async move { upload(client, base, REPOSITORY, blob, 1, digest).await }
        });
        let began = Instant::now();
        futures_util::stream::iter(uploads)
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let took = began.elapsed();
        println!(
            "for scale: the same {JOBS} blobs uploaded straight to Harbor, 32 at a time: {} ms ({:.0} uploads/s)",
            took.as_millis(),
            JOBS as f64 / took.as_secs_f64()
        );
        blobs.into_iter().map(|(_, d)| d).collect()
    };

    let bench = Bench {
        work: work.path(),
        harbor: &harbor,
        postgres: &postgres,
    };
    println!("{JOBS} blob jobs of {BLOB_SIZE} bytes, Harbor and target docker-registry\n");
    let mut rates = Vec::new();
    // The same 12 workers in one process, to tell replicas from workers.
    for (replicas, workers) in [(1, 4), (3, 4), (1, 12)] {
        let run = bench.drain(replicas, workers, &digests).await;
        let rate = JOBS as f64 / run.elapsed.as_secs_f64();
        rates.push(rate);
        let per_job = |cpu: f64| cpu * 1000.0 / JOBS as f64;
        println!(
            "{replicas} replica(s) x {workers:>2} workers: {:>6} ms  {rate:>5.0} jobs/s  mean attempt {:>5.1} ms  \
             CPU per job: regtee {:.2} ms, PostgreSQL {:.2} ms  (done per replica: {:?})",
            run.elapsed.as_millis(),
            run.attempt_ms,
            per_job(run.regtee_cpu),
            per_job(run.postgres_cpu),
            run.per_replica
        );
    }
    println!(
        "3 replicas / 1 replica: {:.2}; 1 replica with 12 workers / 1 with 4: {:.2}\n",
        rates[1] / rates[0],
        rates[2] / rates[0]
    );

    println!("a replica SIGKILLed while it runs 4 jobs; another one idle");
    for lease in [Duration::from_secs(3), Duration::from_secs(10)] {
        let (first, last) = bench.takeover(lease).await;
        println!(
            "lease {:>2} s: its jobs claimed by the other after {:>5} ms (first) .. {:>5} ms (last)",
            lease.as_secs(),
            first.as_millis(),
            last.as_millis()
        );
    }
}

use futures_util::StreamExt as _;

struct Bench<'a> {
    work: &'a Path,
    harbor: &'a LocalRegistry,
    postgres: &'a LocalPostgres,
}

/// How one run of 2,000 jobs went.
struct Drained {
    elapsed: Duration,
    /// Jobs done by each replica.
    per_replica: Vec<i64>,
    attempt_ms: f64,
    /// CPU seconds used meanwhile: every replica together, and the database server.
    regtee_cpu: f64,
    postgres_cpu: f64,
}

/// A replica started by the bench: its process, and its id's `-<pid>-` part.
struct Replica {
    process: RegteeProcess,
}

impl Replica {
    fn marker(&self) -> String {
        format!("-{}-", self.process.child.id())
    }
}

impl Bench<'_> {
    /// `n` replicas on database `name`, mirroring to `target`, with `extra` under `[state]`
    /// and `target_extra` under the target.
    async fn replicas(
        &self,
        n: usize,
        name: &str,
        label: &str,
        target: &str,
        extra: &str,
        target_extra: &str,
    ) -> Vec<Replica> {
        let url = self.postgres.url(name);
        let mut started = Vec::new();
        for i in 0..n {
            let mut spec = ConfigSpec::at(
                &self.harbor.url(),
                &self.work.join(format!("{name}-{label}{i}")),
            )
            .with_fixed_ports()
            .on_database(&url, self.postgres.password())
            .target(TargetSpec::at("cloud", target).with(target_extra));
            spec.admin = None;
            spec.state_extra = extra.to_string();
            let process =
                RegteeProcess::serve(&spec, self.work, &format!("{name}-{label}{i}")).await;
            started.push(Replica { process });
        }
        started
    }

    async fn database(&self, name: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={} password={} dbname={name}",
                self.postgres.port(),
                regtee::local_postgres::USER,
                self.postgres.password()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Inserts a pending blob job per digest and notifies, in one transaction.
    async fn insert_jobs(&self, db: &mut tokio_postgres::Client, digests: &[String]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let tx = db.transaction().await.unwrap();
        let insert = tx
            .prepare(
                "INSERT INTO jobs (target, kind, repository, digest, origin, state, created_at, \
                 updated_at, next_attempt_at) VALUES ('cloud', 'blob', $1, $2, 'push', 'pending', $3, $3, $3)",
            )
            .await
            .unwrap();
        for digest in digests {
            tx.execute(&insert, &[&REPOSITORY, digest, &now])
                .await
                .unwrap();
        }
        tx.execute("SELECT pg_notify('regtee_jobs', 'cloud')", &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// Runs every job on `n` replicas; returns the time from commit to the last done, and how
    /// many each replica did.
    async fn drain(&self, n: usize, workers: usize, digests: &[String]) -> Drained {
        let name = format!("drain{n}x{workers}");
        self.postgres.create_database(&name).unwrap();
        let cloud = LocalRegistry::start(
            &self.work.join(format!("cloud-{name}")),
            RegistryOptions::default(),
        )
        .await
        .unwrap();
        let concurrency = format!("concurrency = {workers}\n");
        let replicas = self
            .replicas(n, &name, "r", &cloud.url(), "", &concurrency)
            .await;
        let mut db = self.database(&name).await;
        let regtee_cpu = || -> f64 {
            replicas
                .iter()
                .map(|r| cpu_seconds(r.process.child.id()))
                .sum()
        };
        let postgres_cpu = || -> f64 {
            self.postgres
                .server_pids()
                .unwrap()
                .iter()
                .filter_map(|p| p.parse().ok())
                .map(cpu_seconds)
                .sum()
        };
        let (regtee_before, postgres_before) = (regtee_cpu(), postgres_cpu());
        let started = Instant::now();
        self.insert_jobs(&mut db, digests).await;
        loop {
            let row = db
                .query_one(
                    "SELECT COUNT(*) FILTER (WHERE state = 'done'), \
                     COUNT(*) FILTER (WHERE state IN ('failed', 'skipped')) FROM jobs",
                    &[],
                )
                .await
                .unwrap();
            let (done, failed): (i64, i64) = (row.get(0), row.get(1));
            assert_eq!(failed, 0, "jobs failed: see {}", self.work.display());
            if done as usize == digests.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let elapsed = started.elapsed();
        let (regtee_cpu, postgres_cpu) = (
            regtee_cpu() - regtee_before,
            postgres_cpu() - postgres_before,
        );
        let row = db
            .query_one(
                "SELECT AVG(finished_at - started_at)::FLOAT8 FROM attempts",
                &[],
            )
            .await
            .unwrap();
        let attempt: f64 = row.get(0);
        let mut per_replica = Vec::new();
        for r in &replicas {
            let row = db
                .query_one(
                    "SELECT COUNT(*) FROM attempts WHERE result = 'done' AND replica LIKE '%' || $1 || '%'",
                    &[&r.marker()],
                )
                .await
                .unwrap();
            per_replica.push(row.get::<_, i64>(0));
        }
        Drained {
            elapsed,
            per_replica,
            attempt_ms: attempt,
            regtee_cpu,
            postgres_cpu,
        }
    }

    /// Kills a replica running 4 jobs to a slow target; returns when the other claimed the
    /// first and the last of them, counted from the kill.
    async fn takeover(&self, lease: Duration) -> (Duration, Duration) {
        let name = format!("takeover{}", lease.as_secs());
        self.postgres.create_database(&name).unwrap();
        let cloud = LocalRegistry::start(&self.work.join(&name), RegistryOptions::default())
            .await
            .unwrap();
        let extra = format!("lease = \"{}s\"\n", lease.as_secs());
        // 64 KiB/s for 1 MiB blobs: each copy runs for longer than the longest lease.
        let slow = "max_bytes_per_second = 65536\n";
        let mut doomed = self
            .replicas(1, &name, "doomed", &cloud.url(), &extra, slow)
            .await
            .remove(0);
        let mut db = self.database(&name).await;
        let client = client();
        let mut digests = Vec::new();
        for _ in 0..4 {
            let blob = random_chunk(1024 * 1024);
            let digest = repeated_digest(&blob, 1);
            upload(&client, &self.harbor.url(), REPOSITORY, &blob, 1, &digest).await;
            digests.push(digest);
        }
        self.insert_jobs(&mut db, &digests).await;
        while running_on(&db, &doomed).await < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let other = self
            .replicas(1, &name, "other", &cloud.url(), &extra, slow)
            .await
            .remove(0);
        doomed.process.kill9();
        let killed = Instant::now();
        let mut first = None;
        loop {
            let claimed = running_on(&db, &other).await;
            if claimed > 0 && first.is_none() {
                first = Some(killed.elapsed());
            }
            if claimed == 4 {
                return (first.unwrap_or_default(), killed.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// How many jobs `replica` holds running.
async fn running_on(db: &tokio_postgres::Client, replica: &Replica) -> i64 {
    db.query_one(
        "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND lease_owner LIKE '%' || $1 || '%'",
        &[&replica.marker()],
    )
    .await
    .unwrap()
    .get(0)
}
