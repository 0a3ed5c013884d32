//! The integration tests: one test binary (linked once) with one module per
//! area, most of them against a real slapd or 389 Directory Server with the
//! proxy in front (docs/testing.md says what each module checks).
//!
//! ```text
//! cargo test --test it                 # all of them
//! cargo test --test it freeze::        # one module
//! ```
//!
//! libtest runs the tests of every module side by side in this one process:
//! a test must not change process-wide state (environment, current
//! directory, signal dispositions, a global tracing subscriber; the one
//! exception, the open-file limit, `floods` raises once for all) or count
//! machine-wide things (sockets, processes, memory) that are not its own.

mod support;

mod backup_cmd;
mod backup_digest;
mod backup_restore;
mod backup_tar;
mod backup_verify;
mod carry;
mod cli;
mod cli_ops;
mod cli_tls;
mod cold_backup;
mod crash;
mod deb;
mod docs_links;
mod ds389;
mod ds389_backup;
mod ds389_carry;
mod ds389_journal;
mod ds389_tls;
mod faults;
mod floods;
mod freeze;
mod fuzz_seeds;
mod hostile;
mod journal;
mod journal_crash;
mod ldap_utils;
mod limits;
mod malformed;
mod metrics;
mod multi_proxy;
mod nosync;
mod rust_client;
mod systemd;
mod tls;
mod tls_mirror;
mod wire;
