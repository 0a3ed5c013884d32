//! Backend drivers configured per backend: the proposal's BACKUP_PREPARE
//! (after the drain, before ON answers) and BACKUP_DONE (on OFF, and on any
//! failure after PREPARE).
//!
//! - `none` (the default): the proxy-level freeze alone.
//! - `command`: runs configured commands; the environment
//!   names the backend (`ABPROXY_BACKEND`), its mode (`ABPROXY_MODE`), the
//!   step (`ABPROXY_STEP`: `prepare` or `done`) and the freeze id
//!   (`ABPROXY_FREEZE_ID`). A non-zero exit is a failure, reported with the
//!   tail of the command's stderr.
//! - `openldap` ([`openldap`]) and `389ds` ([`ds389`]): make
//!   the LDAP server itself refuse writes to the backend while it is frozen.
//!
//! Every step of every driver runs under the backend's `driver_timeout_secs`,
//! applied by the engine through [`run_step`]: a step that outlives
//! it is dropped (a command is killed) and reported as failed.

//! This module holds what every driver is: the [`Driver`] trait, its steps
//! and [`run_step`], the deadline around each; how a driver fails
//! ([`DriverError`], in [`error`]); [`recorded::Recorded`] wraps a driver
//! so that what it changed survives a crash (the state file).

pub mod cnconfig;
pub mod command;
pub mod ds389;
pub mod error;
pub mod openldap;
pub mod recorded;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::backend::Backend;
use super::state::StateFile;
pub use command::CommandDriver;
pub use error::{DriverError, DriverErrorKind, DriverOp};

/// The `driver` of a `[[backends]]` entry.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Proxy-level freeze only.
    #[default]
    None,
    /// Run the entry's `prepare` and `done` commands.
    Command,
    /// Set `olcReadOnly` on the backend's database in slapd's cn=config.
    Openldap,
    /// Set `nsslapd-readonly` on the backend's ldbm instance in 389
    /// Directory Server's cn=config.
    #[serde(rename = "389ds")]
    Ds389,
}

/// A backend driver: the proposal's BACKUP_PREPARE and BACKUP_DONE. The
/// default does nothing (the proxy-level freeze alone).
///
/// The engine runs each step under the backend's deadline
/// ([`Engine::set_driver`]) and drops a step that outlives it: a driver
/// must leave, at every await point, a record of what it changed (or is
/// about to change) that a later `done` can undo.
pub trait Driver: Send + Sync {
    /// Makes the backend consistent on disk (after the drain) for freeze
    /// `freeze_id`.
    fn prepare<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        let _ = (backend, freeze_id);
        Box::pin(async { Ok(()) })
    }
    /// Undoes `prepare` (on OFF, and on any failure after `prepare`).
    fn done<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        let _ = (backend, freeze_id);
        Box::pin(async { Ok(()) })
    }
    /// What the server records in `backend` on a bind, as the driver can
    /// see in the server's configuration: `Some(reason)` when a bind
    /// writes there (a last-bind time, a password policy's failure
    /// counter), `None` when nothing says so. Asked before each freeze
    /// with `bind_is_write = "auto"`; the default sees nothing.
    fn bind_writes<'a>(
        &'a self,
        backend: &'a Backend,
    ) -> BoxFuture<'a, Result<Option<String>, DriverError>> {
        let _ = backend;
        Box::pin(async { Ok(None) })
    }
    /// Before a partial freeze (`frozen`: the backends ON names, fewer
    /// than `all`; `backend`: the one this driver serves, frozen or not):
    /// `Err(reason)` when the server can change a frozen backend by itself
    /// while another one is written (overlays or plugins linking
    /// databases), so the freeze would not hold
    /// ([`DriverErrorKind::PartialFreezeUnsafe`]), or when the driver
    /// cannot tell. The reason is sent to the client. The default accepts.
    fn check_partial<'a>(
        &'a self,
        backend: &'a Backend,
        frozen: &'a [Backend],
        all: &'a [Backend],
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        let _ = (backend, frozen, all);
        Box::pin(async { Ok(()) })
    }
    /// Keeps what the driver changes on the server in `state` (under the
    /// driver's name), for a restart after a crash. Drivers that change
    /// nothing a command cannot redo ignore it.
    fn attach_state(&self, state: Arc<StateFile>, name: &'static str) {
        let _ = (state, name);
    }
}

/// The no-op driver.
#[derive(Debug, Default)]
pub struct NoopDriver;
impl Driver for NoopDriver {}

/// The deadline of a driver step when none was given (the default of
/// `driver_timeout_secs`).
pub const DEFAULT_DRIVER_DEADLINE: Duration = Duration::from_secs(60);

/// A driver step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// BACKUP_PREPARE.
    Prepare,
    /// BACKUP_DONE.
    Done,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Prepare => "prepare",
            Step::Done => "done",
        })
    }
}

/// Runs `step` of `driver` for backend `b` under `deadline`.
pub async fn run_step(
    driver: &dyn Driver,
    step: Step,
    b: &Backend,
    freeze_id: u64,
    deadline: Duration,
) -> Result<(), DriverError> {
    let fut = match step {
        Step::Prepare => driver.prepare(b, freeze_id),
        Step::Done => driver.done(b, freeze_id),
    };
    with_deadline(step.into(), deadline, fut).await
}

/// Runs `fut`, what a driver was asked (`op`), under `deadline`: past it,
/// `fut` is dropped and the answer is [`DriverErrorKind::TimedOut`].
pub async fn with_deadline<T>(
    op: DriverOp,
    deadline: Duration,
    fut: impl Future<Output = Result<T, DriverError>>,
) -> Result<T, DriverError> {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| Err(DriverError::timed_out(op, deadline)))
}
