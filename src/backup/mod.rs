//! What the backup commands build on: LDIF content records ([`ldif`]) and
//! the content digest of a backend's entries ([`digest`]), which a backup's
//! manifest records and any later copy of the same data reproduces.
//!
//! No I/O beyond reading and writing LDIF text, and nothing of the proxy.

pub mod digest;
pub mod ldif;

pub use digest::{Digest, Digester};
pub use ldif::Entry;
