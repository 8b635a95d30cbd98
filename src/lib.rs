//! regtee: a transparent Docker Registry v2 / OCI proxy in front of Harbor that tees every
//! completed push to cloud registries.
//!
//! ```text
//!  client ──► request::server ──► request::proxy ───────────────► Harbor (upstream)
//!                                   │ completed write (mirror::tee::Write)   ▲
//!                                   ▼                                        │ reads back
//!                      mirror::tee ──► queue (SQLite, or ──► mirror::worker ──► targets
//!                                            ▲   PostgreSQL)   (registry client)
//!        ops: admin API, CLI, backfill ──────┘  status, metrics, retry, webhooks
//! ```
//!
//! Two paths, kept apart, in two folders, with the durable queue between them. The **request
//! path** (`request/`: server, proxy, route, headers; with `body`) streams every request to
//! Harbor and back; when Harbor answers a completed write it asks the tee to record jobs,
//! durably, before the client sees the answer. The **queue** (`queue/`) keeps one contract on
//! SQLite (one instance) and PostgreSQL (several replicas). The **mirror path** (`mirror/`: tee,
//! worker, copy) claims jobs and copies content with the registry client (`registry/`) in
//! dependency order, verifying digests, retrying until done or clearly impossible. The
//! operator's side (`ops/`: admin, backfill, webhooks, cli) feeds and observes the queue.
//! `config/` is plain data; `oci/` holds the specs' vocabulary (digests, names, manifests, error
//! codes), checked. Every import points down, and inside the crate everything is `pub(crate)`:
//! what is public below is what the binary, the tests and the benches use.
//!
//! [`Instance::start`] wires everything from a [`config::Config`]; [`run`] adds a shutdown signal.

#![warn(missing_docs, unreachable_pub)]

// The two paths, the cache pulls read from, and the operator's side: internal.
mod cache;
mod metrics;
mod mirror;
mod ops;
mod provision;
mod queue;
mod request;

// Building blocks regtee is made of and its tests, benches and demo use.
pub mod body;
pub mod config;
pub mod http_client;
#[cfg(any(test, feature = "test-support"))]
pub mod local_postgres;
pub mod local_process;
pub mod local_registry;
pub mod oci;
pub mod origin;
pub mod registry;
pub mod tls;

// Small mechanisms, internal.
#[cfg(test)]
mod arbitrary;
mod challenge;
mod error;
mod redact;
mod stall;
mod throttle;
mod token_check;
mod wait_limit;

// A running regtee, and the whole of it on one machine.
pub mod demo;
mod instance;

pub use challenge::Challenge;
pub use instance::{Instance, StartError, run};

// The operator's commands, for the binary.
pub use ops::{certs, cli, log_writer};
pub use queue::{JobFilter, JobState};
