//! The operator's side: the admin API and its webhooks, backfills and comparisons, the
//! command line, certificates and the log writer.

pub(crate) mod admin;
pub(crate) mod backfill;
pub(crate) mod backfill_runs;
pub mod certs;
pub mod cli;
pub(crate) mod cutover;
pub mod log_writer;
pub(crate) mod page;
pub(crate) mod webhooks;
