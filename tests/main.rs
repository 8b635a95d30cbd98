//! Integration tests: real distribution registries, a real token service, real skopeo.
//! One binary, so the crate links once.

mod support;

mod bounds;
mod cache;
mod clouds;
mod create;
mod credentials;
mod cutover;
mod deploy;
mod docker;
mod harbor;
mod hostile;
mod install;
mod mirror;
mod operations;
mod operator;
mod proxy;
mod replicas;
