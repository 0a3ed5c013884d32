//! What the backup commands build on: LDIF content records ([`ldif`]) and
//! the content digest of a backend's entries ([`digest`]), which a backup's
//! manifest records and any later copy of the same data reproduces.
//!
//! And the manifest ([`manifest`]) that describes a backup, and the checks
//! of a backup directory by itself ([`verify`]). Files only, nothing of the
//! proxy.

pub mod digest;
pub mod ds389;
pub mod ldif;
pub mod manifest;
pub mod slapd;
pub mod verify;

pub use digest::{Digest, Digester};
pub use ldif::Entry;
