//! Test support for abproxy, outside the product: throwaway directory
//! servers and a certificate authority for the integration tests, the
//! benchmarks and `abproxy demo`.
//!
//! * the crate root (module [`slapd`]): OpenLDAP `slapd` instances
//!   ([`Slapd`], [`SlapdOptions`]) and the sample directory's names and
//!   credentials ([`SUFFIX`], [`ADMIN_DN`], [`user_dn`], ...);
//! * [`ds389`]: 389 Directory Server instances;
//! * [`ca`]: a throwaway CA made with `openssl`.
//!
//! Nothing here depends on abproxy.
#![warn(unreachable_pub)]

pub mod ca;
pub mod ds389;
pub mod slapd;

pub use slapd::*;
