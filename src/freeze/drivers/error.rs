//! Why a driver failed: [`DriverError`], a kind the engine and the tests
//! can match on ([`DriverErrorKind`]), the context the driver adds as the
//! error travels up (what it was doing: "cannot read cn=config"), and the
//! error underneath when there is one (an I/O error, ldap3's error, the
//! state file's), reachable through [`std::error::Error::source`].
//!
//! Its `Display` is the message the client gets (inside the freeze error
//! that names the backend and the step): the context, then the source's
//! own message, as `context: source`.

use std::borrow::Cow;
use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;

use crate::freeze::state::StateError;

use super::Step;

/// What the engine asked a driver: one of the two steps, or one of the
/// questions before a freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverOp {
    /// BACKUP_PREPARE ([`super::Driver::prepare`]).
    Prepare,
    /// BACKUP_DONE ([`super::Driver::done`]).
    Done,
    /// Whether a partial freeze would hold ([`super::Driver::check_partial`]).
    CheckPartial,
    /// Whether a bind writes into the backend ([`super::Driver::bind_writes`]).
    BindWrites,
}

impl From<Step> for DriverOp {
    fn from(step: Step) -> DriverOp {
        match step {
            Step::Prepare => DriverOp::Prepare,
            Step::Done => DriverOp::Done,
        }
    }
}

impl fmt::Display for DriverOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverOp::Prepare => "prepare step",
            DriverOp::Done => "done step",
            DriverOp::CheckPartial => "check before a partial freeze",
            DriverOp::BindWrites => "check of what a bind records",
        })
    }
}

/// What kind of failure a [`DriverError`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverErrorKind {
    /// The server could not be reached or bound to, or the connection to
    /// it failed midway (no LDAP result to show).
    Connect,
    /// The server answered an operation with an error result (`code`, its
    /// diagnostic `text`).
    Refused {
        /// The LDAP result code.
        code: u32,
        /// The server's diagnostic message.
        text: String,
    },
    /// A configured command ran and failed.
    CommandFailed {
        /// How it ended (a non-zero exit, a signal).
        status: ExitStatus,
        /// The end of what it wrote to stderr, trimmed.
        stderr_tail: String,
    },
    /// The step or question outlived the backend's deadline
    /// (`driver_timeout_secs`) and was dropped.
    TimedOut {
        /// What was asked.
        op: DriverOp,
        /// The deadline it outlived.
        deadline: Duration,
    },
    /// The driver cannot do its job as configured: a `config_url` it
    /// cannot use, no (or several) server databases for the backend's
    /// suffix, data it cannot make durable from where the proxy runs.
    Config,
    /// A partial freeze would not hold: the server can change a frozen
    /// backend by itself while another one is written (overlays or
    /// plugins linking databases).
    PartialFreezeUnsafe,
    /// Local I/O failed: starting or waiting for a command, fsync.
    Io,
    /// The state file could not be written.
    StateFile,
    /// Anything else (a driver's own reason).
    Other,
}

/// A driver's failure: kind, context and source, shown to the client as
/// `context: source`. One pointer wide (the freeze errors carrying it stay
/// small).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DriverError(Box<Inner>);

#[derive(Debug, thiserror::Error)]
struct Inner {
    kind: DriverErrorKind,
    /// What the driver was doing, outermost first (`a: b: c`).
    context: Option<Cow<'static, str>>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// Advice after everything else (`; advice`).
    hint: Option<Cow<'static, str>>,
    /// Undoing what the failed step had changed failed too.
    undo: Option<DriverError>,
}

impl DriverError {
    /// An error of `kind` described by `context` alone.
    pub fn new(kind: DriverErrorKind, context: impl Into<Cow<'static, str>>) -> DriverError {
        DriverError(Box::new(Inner {
            kind,
            context: Some(context.into()),
            source: None,
            hint: None,
            undo: None,
        }))
    }

    /// An error of `kind`: `context: source`.
    pub fn with_source(
        kind: DriverErrorKind,
        context: impl Into<Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> DriverError {
        let mut e = DriverError::new(kind, context);
        e.0.source = Some(Box::new(source));
        e
    }

    /// A driver's own reason, of no particular kind.
    pub fn other(reason: impl Into<Cow<'static, str>>) -> DriverError {
        DriverError::new(DriverErrorKind::Other, reason)
    }

    /// `op` outlived `deadline`.
    pub fn timed_out(op: DriverOp, deadline: Duration) -> DriverError {
        DriverError(Box::new(Inner {
            kind: DriverErrorKind::TimedOut { op, deadline },
            context: None,
            source: None,
            hint: None,
            undo: None,
        }))
    }

    /// An ldap3 error while `context`: the server's refusal when it
    /// answered with an error result, else a connection failure.
    pub fn ldap(context: impl Into<Cow<'static, str>>, e: ldap3::LdapError) -> DriverError {
        let kind = match &e {
            ldap3::LdapError::LdapResult { result } => DriverErrorKind::Refused {
                code: result.rc,
                text: result.text.clone(),
            },
            _ => DriverErrorKind::Connect,
        };
        DriverError::with_source(kind, context, e)
    }

    /// The server answered `context` with the error result `res`.
    pub fn refused(context: impl Into<Cow<'static, str>>, res: ldap3::LdapResult) -> DriverError {
        let kind = DriverErrorKind::Refused {
            code: res.rc,
            text: res.text.clone(),
        };
        DriverError::with_source(kind, context, res)
    }

    /// The same error, as what happened while `outer` (`outer: ...`).
    #[must_use]
    pub fn context(mut self, outer: impl fmt::Display) -> DriverError {
        self.0.context = Some(match self.0.context.take() {
            Some(inner) => format!("{outer}: {inner}").into(),
            None => outer.to_string().into(),
        });
        self
    }

    /// The same error, followed by advice (`...; hint`).
    #[must_use]
    pub fn hint(mut self, hint: impl Into<Cow<'static, str>>) -> DriverError {
        self.0.hint = Some(hint.into());
        self
    }

    /// The same error, and undoing what the step had changed failed with
    /// `undo` (`...; and undo`).
    #[must_use]
    pub fn undo_failed(mut self, undo: DriverError) -> DriverError {
        self.0.undo = Some(undo);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> &DriverErrorKind {
        &self.0.kind
    }

    /// The step or question outlived its deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self.0.kind, DriverErrorKind::TimedOut { .. })
    }
}

impl From<StateError> for DriverError {
    fn from(e: StateError) -> DriverError {
        DriverError(Box::new(Inner {
            kind: DriverErrorKind::StateFile,
            context: None,
            source: Some(Box::new(e)),
            hint: None,
            undo: None,
        }))
    }
}

impl fmt::Display for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let context = self.context.as_deref();
        match &self.kind {
            DriverErrorKind::TimedOut { op, deadline } => {
                if let Some(c) = context {
                    write!(f, "{c}: ")?;
                }
                write!(
                    f,
                    "the {op} did not finish within {} (driver_timeout_secs)",
                    secs(*deadline)
                )?;
                if matches!(op, DriverOp::Prepare | DriverOp::Done) {
                    f.write_str(
                        " and was abandoned; what it may have changed stays in the state file, \
                         undone by the next done step or the next start",
                    )?;
                }
            }
            DriverErrorKind::CommandFailed {
                status,
                stderr_tail,
            } => {
                write!(
                    f,
                    "{} failed ({status}): {stderr_tail}",
                    context.unwrap_or("command")
                )?;
            }
            _ => match (context, &self.source) {
                (Some(c), Some(s)) => write!(f, "{c}: {s}")?,
                (Some(c), None) => f.write_str(c)?,
                (None, Some(s)) => write!(f, "{s}")?,
                (None, None) => write!(f, "{:?}", self.kind)?,
            },
        }
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        if let Some(u) = &self.undo {
            write!(f, "; and {u}")?;
        }
        Ok(())
    }
}

/// "2 s", "1.5 s".
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_timeout_says_which_step_and_its_deadline() {
        let e = DriverError::timed_out(DriverOp::Prepare, Duration::from_millis(1500));
        assert_eq!(
            e.to_string(),
            "the prepare step did not finish within 1.5 s (driver_timeout_secs) and was \
             abandoned; what it may have changed stays in the state file, undone by the next \
             done step or the next start"
        );
        assert!(e.is_timeout());
        assert_eq!(
            e.kind(),
            &DriverErrorKind::TimedOut {
                op: DriverOp::Prepare,
                deadline: Duration::from_millis(1500)
            }
        );
        let e = DriverError::timed_out(DriverOp::CheckPartial, Duration::from_secs(2))
            .context("the driver of dc=example,dc=org");
        assert_eq!(
            e.to_string(),
            "the driver of dc=example,dc=org: the check before a partial freeze did not \
             finish within 2 s (driver_timeout_secs)"
        );
    }

    #[test]
    fn context_source_hint_and_undo_in_order() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = DriverError::with_source(DriverErrorKind::Io, "cannot open data.mdb", io)
            .hint("run abproxy as slapd's user")
            .context("olcDatabase={1}mdb,cn=config")
            .undo_failed(DriverError::other("cannot set olcReadOnly"));
        assert_eq!(
            e.to_string(),
            "olcDatabase={1}mdb,cn=config: cannot open data.mdb: denied; run abproxy as \
             slapd's user; and cannot set olcReadOnly"
        );
        assert_eq!(e.kind(), &DriverErrorKind::Io);
        assert_eq!(e.source().unwrap().to_string(), "denied");
    }

    #[test]
    fn ldap_errors_are_refusals_when_the_server_answered() {
        let result = ldap3::LdapResult {
            rc: 50,
            matched: String::new(),
            text: "no write access".into(),
            refs: Vec::new(),
            ctrls: Vec::new(),
        };
        let e = DriverError::ldap(
            "cannot set olcReadOnly on x",
            ldap3::LdapError::from(result.clone()),
        );
        assert_eq!(
            e.kind(),
            &DriverErrorKind::Refused {
                code: 50,
                text: "no write access".into()
            }
        );
        assert!(
            e.to_string().starts_with(
                "cannot set olcReadOnly on x: LDAP operation result: rc=50 (insufficientAccessRights)"
            ),
            "{e}"
        );
        let e = DriverError::refused("bind to ldapi:/// failed", result);
        assert!(
            e.to_string()
                .starts_with("bind to ldapi:/// failed: rc=50 (insufficientAccessRights)"),
            "{e}"
        );
        let e = DriverError::ldap("cannot read cn=config", ldap3::LdapError::EndOfStream);
        assert_eq!(e.kind(), &DriverErrorKind::Connect);
        assert_eq!(
            e.to_string(),
            "cannot read cn=config: premature end of search stream"
        );
    }

    #[test]
    fn a_state_file_error_is_shown_as_it_is() {
        let e = DriverError::from(StateError::Write {
            action: "sync",
            path: "/var/lib/abproxy/state.json".into(),
            source: std::io::Error::other("no space left"),
        });
        assert_eq!(e.kind(), &DriverErrorKind::StateFile);
        assert_eq!(
            e.to_string(),
            "cannot sync state file /var/lib/abproxy/state.json: no space left"
        );
    }
}
