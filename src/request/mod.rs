//! The request path: every client request to Harbor and back, as transparent and as fast as a
//! wire. It streams bodies, rewrites only what must point at regtee, and records a job when Harbor
//! answers a completed write; nothing else happens inline.

pub(crate) mod headers;
pub(crate) mod primary;
pub(crate) mod proxy;
pub(crate) mod read;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod upstream;
