//! kmsd: the kms daemon as a library, so tests and benchmarks can run a real daemon
//! in-process or as the `kmsd` binary.
//!
//! The request path, top to bottom (nothing below reaches back up):
//! `server` (accept, peer credentials, limits) → `connection` (frames, pipelining) →
//! `service` (one handler per request) → [`engine`] (key rules, versions, states) →
//! [`crypto`] and [`store`] (the only redb writer, group commit).

pub mod clock;
pub mod crypto;
pub mod engine;
pub mod store;
