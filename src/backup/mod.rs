//! What the backup commands build on: LDIF content records ([`ldif`]).
//!
//! No I/O beyond reading and writing LDIF text, and nothing of the proxy.

pub mod ldif;

pub use ldif::Entry;
