//! Why an Allow-Backup request (ON, OFF) or a status query failed:
//! [`FreezeError`]. Its `Display` is the diagnostic message the client
//! reads, and [`FreezeError::result_code`] the LDAP result code; the proxy
//! turns them into a response at the protocol edge (`proxy::exops`), the
//! engine deals in these values only.

use std::fmt;
use std::time::Duration;

use ldap3_proto::proto::LdapResultCode;

use super::drivers::{DriverError, Step};

/// Backend suffixes, shown as `a; b`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suffixes(pub Vec<String>);

impl fmt::Display for Suffixes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// Why an Allow-Backup request or a status query failed.
///
/// State file errors have no variant of their own: the engine never
/// touches the state file, the drivers do (around their steps), so one
/// reaches the client as the source of the failed step's [`DriverError`],
/// in [`FreezeError::PrepareFailed`] or [`FreezeError::DoneFailed`] (see
/// [`StateError`](super::state::StateError)).
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The request value is missing, undecodable or inconsistent.
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
    /// The requester may not use Allow-Backup (nor read its status).
    #[error(transparent)]
    NotAuthorised(#[from] NotAuthorised),
    /// No backends are configured, and the server's root DSE named none.
    #[error(
        "no backends known (none configured and the server's namingContexts could not be read)"
    )]
    NoBackends,
    /// dnSet names a DN under none of the backends.
    #[error(
        "{dn} is not under any backend suffix (known: {known}){}",
        if *.off { "; nothing released" } else { "" }
    )]
    UnknownBackend {
        /// The DN as the request spelled it.
        dn: String,
        /// The backends there are.
        known: Suffixes,
        /// In an OFF (nothing was released).
        off: bool,
    },
    /// ON names backends whose mode is `unimplemented`.
    #[error("backend(s) {} cannot be frozen (mode unimplemented)", .backends.join(", "))]
    Unimplemented {
        /// Their suffixes.
        backends: Vec<String>,
    },
    /// A backend's driver says a partial freeze would not hold (or could
    /// not tell in time); nothing was frozen.
    #[error("partial freeze refused: {source}; nothing frozen")]
    PartialFreezeRefused {
        /// The backend whose driver refused.
        backend: String,
        /// Why.
        source: DriverError,
    },
    /// Another freeze is in the way, or this one is between states.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The drain did not end in time; the freeze was undone.
    #[error(transparent)]
    Drain(#[from] DrainError),
    /// The freeze ended (its holder's connection closed, holdUntilUnbind)
    /// before its ON answered.
    #[error("the freeze ended while {0} (holder connection closed)")]
    EndedDuringOn(OnStage),
    /// A backend's prepare step failed: the backends prepared before it
    /// were done again and the freeze undone.
    #[error(
        "prepare failed for backend {}: {}; freeze undone",
        .0.backend,
        .0.source
    )]
    PrepareFailed(#[source] StepFailure),
    /// OFF released the freeze, but some done steps failed.
    #[error("released, but done steps failed: {}", StepFailures(.0))]
    DoneFailed(Vec<StepFailure>),
    /// The journal could not record the freeze's cut: the backup could not
    /// be tied to it. The prepared backends were done again and the
    /// freeze undone.
    #[error("the journal could not record the freeze's cut: {0}; freeze undone")]
    Journal(String),
    /// OFF names some of the frozen backends only.
    #[error(
        "OFF names only some of the frozen backends ({named} of {frozen}): a partial release \
         is not supported; send OFF without dnSet, or naming every frozen backend (freeze id \
         {id}); nothing released"
    )]
    PartialRelease {
        /// The frozen backends the OFF names.
        named: Suffixes,
        /// Every frozen backend.
        frozen: Suffixes,
        /// The current freeze.
        id: u64,
    },
    /// OFF names backends that are not frozen.
    #[error("{not_frozen} not frozen (frozen: {frozen}; freeze id {id}); nothing released")]
    BackendsNotFrozen {
        /// The backends named and not frozen.
        not_frozen: Suffixes,
        /// The frozen backends.
        frozen: Suffixes,
        /// The current freeze.
        id: u64,
    },
    /// OFF names a freeze (its freezeId) that is not the current one:
    /// nothing was released.
    #[error(
        "freeze {id} is not the current freeze ({}){}",
        Current(*.current),
        .ended.tail(*.id)
    )]
    NotCurrent {
        /// The freeze the OFF names.
        id: u64,
        /// The current freeze, if any.
        current: Option<u64>,
        /// What became of freeze `id`.
        ended: PastFreeze,
    },
    /// A plain OFF after the lease ended the freeze: the backup may be
    /// inconsistent.
    #[error("freeze expired after {secs} s; the backup may be inconsistent (freeze id {id})")]
    Expired {
        /// The freeze.
        id: u64,
        /// How long it had lasted.
        secs: u64,
    },
}

impl FreezeError {
    /// The result code of the response carrying this error.
    pub fn result_code(&self) -> LdapResultCode {
        match self {
            FreezeError::BadRequest(_) => LdapResultCode::ProtocolError,
            FreezeError::NotAuthorised(_) => LdapResultCode::InsufficentAccessRights,
            FreezeError::NoBackends | FreezeError::UnknownBackend { .. } => {
                LdapResultCode::NoSuchObject
            }
            FreezeError::Unimplemented { .. }
            | FreezeError::PartialFreezeRefused { .. }
            | FreezeError::PartialRelease { .. }
            | FreezeError::BackendsNotFrozen { .. } => LdapResultCode::UnwillingToPerform,
            FreezeError::Busy(_) => LdapResultCode::Busy,
            FreezeError::Drain(_)
            | FreezeError::EndedDuringOn(_)
            | FreezeError::PrepareFailed(_)
            | FreezeError::Journal(_)
            | FreezeError::DoneFailed(_)
            | FreezeError::NotCurrent { .. }
            | FreezeError::Expired { .. } => LdapResultCode::Other,
        }
    }
}

/// A malformed Allow-Backup request (protocolError).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    /// No requestValue.
    #[error("Allow-Backup request has no requestValue (expected AllowBackupRequest)")]
    NoValue,
    /// The value is no AllowBackupRequest.
    #[error(transparent)]
    Undecodable(#[from] abproxy_proto::DecodeError),
    /// An empty dnSet (leaving it out means every backend).
    #[error(
        "Allow-Backup request has an empty dnSet: name at least one backend, or leave dnSet \
         out to mean all of them"
    )]
    EmptyDnSet,
    /// ON with a freezeId (the proxy chooses the id of a new freeze).
    #[error(
        "Allow-Backup ON (mode TRUE) with a freezeId: freezeId names the freeze an OFF ends, \
         the proxy chooses the id of a new freeze"
    )]
    FreezeIdInOn,
}

/// Why a requester may not use Allow-Backup (insufficientAccessRights).
#[derive(Debug, thiserror::Error)]
pub enum NotAuthorised {
    /// No bound DN, and a client certificate that is not allowed.
    #[error(
        "Allow-Backup requires an authenticated identity: the client certificate {subject} is \
         not in freeze.allowed_cert_subjects, and no DN in freeze.allowed is bound"
    )]
    Certificate {
        /// The certificate's subject.
        subject: String,
    },
    /// Anonymous (no allowed uid on ldapi, no certificate).
    #[error(
        "Allow-Backup requires an authenticated identity listed in freeze.allowed (or, on an \
         ldapi listener, a uid in freeze.allowed_uids; over TLS, a client certificate in \
         freeze.allowed_cert_subjects); anonymous is never allowed"
    )]
    Anonymous,
    /// A bound DN that is not in `freeze.allowed`.
    #[error("{dn} is not allowed to use Allow-Backup (freeze.allowed)")]
    Dn {
        /// The bound DN.
        dn: String,
    },
}

/// Another freeze is in the way, or the current one is between states
/// (busy).
#[derive(Debug, thiserror::Error)]
pub enum Busy {
    /// ON while a freeze is in place.
    #[error(
        "already {} by {holder} since {since} (unix time, {secs} s ago; freeze id {id})",
        if *.draining { "draining" } else { "frozen" }
    )]
    AlreadyFrozen {
        /// Still draining (else frozen, or releasing).
        draining: bool,
        /// Who holds it, with the connection number.
        holder: String,
        /// When its ON came, in seconds since the epoch.
        since: u64,
        /// How long ago that was, in seconds.
        secs: u64,
        /// Its id.
        id: u64,
    },
    /// OFF while the done steps of the freeze run.
    #[error("the freeze is being released (done steps running); retry OFF in a moment")]
    Releasing,
    /// OFF before ON has answered.
    #[error("a freeze is still draining; retry OFF once ON has answered")]
    Draining,
}

/// Why the drain failed (the freeze was undone).
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// Writes were still in flight at the time limit.
    #[error(
        "write in progress after the drain time limit of {} s ({writes} write(s) in flight on \
         {backends}); freeze undone, try again later",
        .limit.as_secs()
    )]
    WritesInFlight {
        /// The drain time limit.
        limit: Duration,
        /// How many writes.
        writes: usize,
        /// The backends being frozen.
        backends: Suffixes,
    },
    /// A write came into flight while the reads past the time limit were
    /// being abandoned.
    #[error("write in progress after the drain time limit; freeze undone")]
    WriteWhileAbandoning,
    /// The reads past the time limit did not end in time (binds among
    /// them: an Abandon cannot stop a bind, the drain waits for it).
    #[error(
        "in-flight reads (or binds, which an Abandon cannot stop) did not end in time after \
         the drain time limit; freeze undone"
    )]
    ReadsNotAbandoned,
}

/// Where an ON was when its freeze ended under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStage {
    /// Draining.
    Draining,
    /// Running the prepare steps.
    Preparing,
}

impl fmt::Display for OnStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnStage::Draining => "draining",
            OnStage::Preparing => "it was being prepared",
        })
    }
}

/// A driver step that failed for a backend.
#[derive(Debug, thiserror::Error)]
#[error("{backend}: {source}")]
pub struct StepFailure {
    /// The backend's suffix.
    pub backend: String,
    /// The step.
    pub step: Step,
    /// Why.
    pub source: DriverError,
}

/// Step failures, as `backend: why; backend: why`.
struct StepFailures<'a>(&'a [StepFailure]);

impl fmt::Display for StepFailures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// What became of a freeze an OFF names that is not the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PastFreeze {
    /// No freeze of that id was set up since abproxy started.
    NeverSetUp,
    /// It ended, this way ("released by ...", "its lease expired ...").
    Ended(String),
    /// It ended too long ago to remember how.
    Forgotten,
}

impl PastFreeze {
    /// The end of the message about freeze `id`.
    fn tail(&self, id: u64) -> String {
        let how = match self {
            PastFreeze::NeverSetUp => {
                return format!(
                    ": no freeze {id} was set up since abproxy started; nothing released"
                )
            }
            PastFreeze::Ended(how) => how.as_str(),
            PastFreeze::Forgotten => "earlier (how is no longer known)",
        };
        format!(
            "; it ended: {how}; nothing released, and a backup taken under freeze {id} may be \
             inconsistent"
        )
    }
}

/// "current: freeze N", "current: none".
struct Current(Option<u64>);

impl fmt::Display for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(m) => write!(f, "current: freeze {m}"),
            None => f.write_str("current: none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::drivers::{DriverOp, Step};

    fn s(v: &[&str]) -> Suffixes {
        Suffixes(v.iter().map(|x| x.to_string()).collect())
    }

    fn timed_out(step: Step) -> StepFailure {
        StepFailure {
            backend: "dc=example,dc=org".into(),
            step,
            source: DriverError::timed_out(step.into(), Duration::from_secs(2)),
        }
    }

    /// Every kind of failure, its result code and its message as the
    /// client reads it (the wording clients, tests and docs rely on).
    #[test]
    fn each_error_has_its_result_code_and_message() {
        use LdapResultCode as C;
        let decode = abproxy_proto::decode_request(b"").unwrap_err();
        let cases: Vec<(FreezeError, LdapResultCode, &str)> = vec![
            (
                BadRequest::NoValue.into(),
                C::ProtocolError,
                "Allow-Backup request has no requestValue (expected AllowBackupRequest)",
            ),
            (
                BadRequest::Undecodable(decode).into(),
                C::ProtocolError,
                "Allow-Backup request value is not a valid AllowBackupRequest: ",
            ),
            (
                BadRequest::EmptyDnSet.into(),
                C::ProtocolError,
                "Allow-Backup request has an empty dnSet: ",
            ),
            (
                BadRequest::FreezeIdInOn.into(),
                C::ProtocolError,
                "Allow-Backup ON (mode TRUE) with a freezeId: ",
            ),
            (
                NotAuthorised::Anonymous.into(),
                C::InsufficentAccessRights,
                "Allow-Backup requires an authenticated identity listed in freeze.allowed (or, on \
                 an ldapi listener",
            ),
            (
                NotAuthorised::Certificate {
                    subject: "cn=x".into(),
                }
                .into(),
                C::InsufficentAccessRights,
                "Allow-Backup requires an authenticated identity: the client certificate cn=x is \
                 not in freeze.allowed_cert_subjects",
            ),
            (
                NotAuthorised::Dn {
                    dn: "cn=u,dc=example,dc=org".into(),
                }
                .into(),
                C::InsufficentAccessRights,
                "cn=u,dc=example,dc=org is not allowed to use Allow-Backup (freeze.allowed)",
            ),
            (
                FreezeError::NoBackends,
                C::NoSuchObject,
                "no backends known (none configured and the server's namingContexts could not be \
                 read)",
            ),
            (
                FreezeError::UnknownBackend {
                    dn: "dc=nope".into(),
                    known: s(&["dc=example,dc=org", "dc=other,dc=org"]),
                    off: false,
                },
                C::NoSuchObject,
                "dc=nope is not under any backend suffix (known: dc=example,dc=org; \
                 dc=other,dc=org)",
            ),
            (
                FreezeError::UnknownBackend {
                    dn: "dc=nope".into(),
                    known: s(&["dc=example,dc=org"]),
                    off: true,
                },
                C::NoSuchObject,
                "dc=nope is not under any backend suffix (known: dc=example,dc=org); nothing \
                 released",
            ),
            (
                FreezeError::Unimplemented {
                    backends: vec!["dc=a".into(), "dc=b".into()],
                },
                C::UnwillingToPerform,
                "backend(s) dc=a, dc=b cannot be frozen (mode unimplemented)",
            ),
            (
                FreezeError::PartialFreezeRefused {
                    backend: "dc=example,dc=org".into(),
                    source: DriverError::new(
                        crate::freeze::drivers::DriverErrorKind::PartialFreezeUnsafe,
                        "overlay refint on the frontend database (global) can change x",
                    ),
                },
                C::UnwillingToPerform,
                "partial freeze refused: overlay refint on the frontend database (global) can \
                 change x; nothing frozen",
            ),
            (
                FreezeError::PartialRelease {
                    named: s(&["dc=a"]),
                    frozen: s(&["dc=a", "dc=b"]),
                    id: 3,
                },
                C::UnwillingToPerform,
                "OFF names only some of the frozen backends (dc=a of dc=a; dc=b): a partial \
                 release is not supported; send OFF without dnSet, or naming every frozen \
                 backend (freeze id 3); nothing released",
            ),
            (
                FreezeError::BackendsNotFrozen {
                    not_frozen: s(&["dc=c"]),
                    frozen: s(&["dc=a"]),
                    id: 3,
                },
                C::UnwillingToPerform,
                "dc=c not frozen (frozen: dc=a; freeze id 3); nothing released",
            ),
            (
                Busy::AlreadyFrozen {
                    draining: true,
                    holder: "cn=admin (conn 4)".into(),
                    since: 1_700_000_000,
                    secs: 5,
                    id: 2,
                }
                .into(),
                C::Busy,
                "already draining by cn=admin (conn 4) since 1700000000 (unix time, 5 s ago; \
                 freeze id 2)",
            ),
            (
                Busy::Releasing.into(),
                C::Busy,
                "the freeze is being released (done steps running); retry OFF in a moment",
            ),
            (
                Busy::Draining.into(),
                C::Busy,
                "a freeze is still draining; retry OFF once ON has answered",
            ),
            (
                DrainError::WritesInFlight {
                    limit: Duration::from_secs(30),
                    writes: 2,
                    backends: s(&["dc=example,dc=org"]),
                }
                .into(),
                C::Other,
                "write in progress after the drain time limit of 30 s (2 write(s) in flight on \
                 dc=example,dc=org); freeze undone, try again later",
            ),
            (
                DrainError::WriteWhileAbandoning.into(),
                C::Other,
                "write in progress after the drain time limit; freeze undone",
            ),
            (
                DrainError::ReadsNotAbandoned.into(),
                C::Other,
                "in-flight reads (or binds, which an Abandon cannot stop) did not end in time \
                 after the drain time limit; freeze undone",
            ),
            (
                FreezeError::EndedDuringOn(OnStage::Draining),
                C::Other,
                "the freeze ended while draining (holder connection closed)",
            ),
            (
                FreezeError::EndedDuringOn(OnStage::Preparing),
                C::Other,
                "the freeze ended while it was being prepared (holder connection closed)",
            ),
            (
                FreezeError::PrepareFailed(timed_out(Step::Prepare)),
                C::Other,
                "prepare failed for backend dc=example,dc=org: the prepare step did not finish \
                 within 2 s (driver_timeout_secs) and was abandoned",
            ),
            (
                FreezeError::DoneFailed(vec![
                    timed_out(Step::Done),
                    StepFailure {
                        backend: "dc=other,dc=org".into(),
                        step: Step::Done,
                        source: DriverError::other("boom"),
                    },
                ]),
                C::Other,
                "released, but done steps failed: dc=example,dc=org: the done step did not \
                 finish within 2 s (driver_timeout_secs) and was abandoned; what it may have \
                 changed stays in the state file, undone by the next done step or the next \
                 start; dc=other,dc=org: boom",
            ),
            (
                FreezeError::NotCurrent {
                    id: 9,
                    current: None,
                    ended: PastFreeze::NeverSetUp,
                },
                C::Other,
                "freeze 9 is not the current freeze (current: none): no freeze 9 was set up \
                 since abproxy started; nothing released",
            ),
            (
                FreezeError::NotCurrent {
                    id: 1,
                    current: Some(2),
                    ended: PastFreeze::Ended("its lease expired after 600 s".into()),
                },
                C::Other,
                "freeze 1 is not the current freeze (current: freeze 2); it ended: its lease \
                 expired after 600 s; nothing released, and a backup taken under freeze 1 may \
                 be inconsistent",
            ),
            (
                FreezeError::NotCurrent {
                    id: 1,
                    current: None,
                    ended: PastFreeze::Forgotten,
                },
                C::Other,
                "freeze 1 is not the current freeze (current: none); it ended: earlier (how is \
                 no longer known); nothing released",
            ),
            (
                FreezeError::Expired { id: 4, secs: 601 },
                C::Other,
                "freeze expired after 601 s; the backup may be inconsistent (freeze id 4)",
            ),
        ];
        for (e, code, msg) in cases {
            assert_eq!(e.result_code(), code, "{e:?}");
            assert!(e.to_string().starts_with(msg), "{e}\n  wanted {msg}");
        }
    }

    #[test]
    fn a_failed_step_names_its_backend_step_and_deadline() {
        let e = FreezeError::PrepareFailed(timed_out(Step::Prepare));
        let FreezeError::PrepareFailed(f) = &e else {
            unreachable!()
        };
        assert_eq!(f.step, Step::Prepare);
        assert_eq!(
            f.source.kind(),
            &crate::freeze::drivers::DriverErrorKind::TimedOut {
                op: DriverOp::Prepare,
                deadline: Duration::from_secs(2)
            }
        );
        let msg = e.to_string();
        for part in ["dc=example,dc=org", "prepare step", "within 2 s"] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
        // The chain of sources reaches the driver's error.
        let source = std::error::Error::source(&e).unwrap();
        assert_eq!(
            source.to_string(),
            format!("dc=example,dc=org: {}", f.source)
        );
    }
}
