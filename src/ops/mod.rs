//! The operator's side: the admin API and its webhooks, backfills and comparisons, metrics, the
//! command line, certificates and the demo.

pub mod admin;
pub mod backfill;
pub mod certs;
pub mod cli;
pub mod demo;
pub mod metrics;
pub mod webhooks;
