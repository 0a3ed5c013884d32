//! abproxy: a transparent LDAP proxy that lets a directory be backed up while
//! it runs, by answering the Allow-Backup extended operation itself.
//!
//! Data flows one way: client bytes -> [`wire`] frame -> envelope -> gate
//! ([`freeze`]) -> upstream; responses flow back through the session and
//! close in-flight entries ([`proxy`]).

pub mod config;
pub mod endpoint;
pub mod freeze;
pub mod fuzzing;
pub mod notify;
pub mod ops;
pub mod proxy;
pub mod tls;
pub mod wire;

pub use config::Config;
pub use proxy::{ProxyHandle, Server};
