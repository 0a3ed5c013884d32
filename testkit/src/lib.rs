//! Test support for abproxy, outside the product: throwaway directory
//! servers and a certificate authority for the integration tests, the
//! benchmarks and `abproxy demo`, and the rule for a test that cannot run
//! on this machine.
//!
//! * the crate root (module [`slapd`]): OpenLDAP `slapd` instances
//!   ([`Slapd`], [`SlapdOptions`]) and the sample directory's names and
//!   credentials ([`SUFFIX`], [`ADMIN_DN`], [`user_dn`], ...);
//! * [`ds389`]: 389 Directory Server instances;
//! * [`ca`]: a throwaway CA made with `openssl`;
//! * [`product`]: the abproxy binary as users get it, built for the
//!   benchmarks;
//! * [`skip`]: skip a test with a visible line, or fail it when
//!   `ABPROXY_REQUIRE_ALL=1` (or `CI=true`) says everything must run.
//!
//! Nothing here depends on abproxy (the product build runs `cargo`).
#![warn(unreachable_pub)]

pub mod ca;
pub mod ds389;
pub mod product;
pub mod slapd;
mod unavailable;

pub use slapd::*;
pub use unavailable::{skip, verdict, Verdict, REQUIRE_ALL};
