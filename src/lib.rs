//! abproxy: a transparent LDAP proxy that lets a directory be backed up while
//! it runs, by answering the Allow-Backup extended operation itself.
//!
//! Data flows one way: client bytes -> [`wire`] frame -> envelope -> gate
//! ([`freeze`]) -> upstream; responses flow back through the session and
//! close in-flight entries ([`proxy`]).
//!
//! The public API is what the binary, the fuzz crate (`fuzz/`, with the
//! `fuzzing` feature) and the integration tests use; the test labs live in
//! the `testkit` crate.
#![warn(unreachable_pub)]

mod backoff;
pub mod backup;
pub mod config;
pub mod counters;
pub mod docgen;
pub mod endpoint;
pub mod freeze;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod journal;
pub mod metrics;
pub mod notify;
pub mod operator;
pub mod proxy;
pub mod secret;
mod sync;
pub mod tls;
pub mod wire;

pub use config::Config;
pub use proxy::{ProxyHandle, Server};
