//! The vocabulary of the OCI specs, checked: digests, repository names and tags, manifests and
//! what they reference.

pub mod digest;
pub mod error_code;
pub mod manifest;
pub(crate) mod names;
