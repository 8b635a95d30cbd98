//! The operator's side: the admin API and its webhooks, backfills and comparisons, the
//! command line, certificates, the demo and the log writer.

pub mod admin;
pub mod backfill;
pub mod backfill_runs;
pub mod certs;
pub mod cli;
pub mod log_writer;
pub mod webhooks;
