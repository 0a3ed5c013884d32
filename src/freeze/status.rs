//! The status of the freeze as a typed value ([`Status`]), what
//! [`Engine::status`](super::Engine::status) returns. Its `Display` is the
//! status response's message; the proxy encodes the value
//! (AllowBackupStatus, BER) at the protocol edge (`proxy::exops`).

use std::fmt;
use std::time::{Duration, SystemTime};

use super::backend::Mode;

/// Where a freeze stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// ON is waiting for the requests in flight to end (and then runs the
    /// prepare steps).
    Draining,
    /// ON has answered: the backup may be taken.
    Frozen,
    /// OFF (or the lease, or the holder leaving) is running the done steps:
    /// requests are still held until the servers accept writes again.
    Releasing,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Draining => "draining",
            Phase::Frozen => "frozen",
            Phase::Releasing => "releasing",
        })
    }
}

/// The status of the freeze and the queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Every backend, in the backend map's order.
    pub backends: Vec<BackendStatus>,
    /// The freeze in place; `None`: thawed.
    pub freeze: Option<CurrentFreeze>,
    /// Requests held by the freeze.
    pub queued_requests: u64,
    /// Their total size in bytes.
    pub queued_bytes: u64,
    /// Requests forwarded and not yet answered.
    pub in_flight: u64,
    /// Sessions whose upstream connection the server closed, waiting to be
    /// carried to a new one; carried since start; not carried since start.
    pub carry: (u64, u64, u64),
}

/// One backend in a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// Its suffix, as configured (or as the root DSE names it).
    pub suffix: String,
    /// How it is frozen.
    pub mode: Mode,
    /// The freeze in place covers it.
    pub frozen: bool,
}

/// The freeze in place, in a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentFreeze {
    /// Its id.
    pub id: u64,
    /// Where it stands.
    pub phase: Phase,
    /// Its holder's identity (bound DN, certificate subject, or ldapi
    /// peer credentials); `None`: anonymous.
    pub holder: Option<String>,
    /// Its holder as the logs name it (identity and connection number).
    pub holder_name: String,
    /// When its ON came.
    pub since: SystemTime,
    /// How long ago that was.
    pub age: Duration,
    /// When its lease ends it, once frozen.
    pub lease_expires: Option<SystemTime>,
}

impl Status {
    /// The phase of the freeze in place; `None`: thawed.
    pub fn phase(&self) -> Option<Phase> {
        self.freeze.as_ref().map(|f| f.phase)
    }
}

/// "thawed", or "frozen by HOLDER for N s: SUFFIX; SUFFIX".
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(freeze) = &self.freeze else {
            f.write_str("thawed")?;
            return self.fmt_carry(f);
        };
        write!(
            f,
            "{} by {} for {} s: ",
            freeze.phase,
            freeze.holder_name,
            freeze.age.as_secs()
        )?;
        let frozen = self.backends.iter().filter(|b| b.frozen);
        for (i, b) in frozen.enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(&b.suffix)?;
        }
        self.fmt_carry(f)
    }
}

impl Status {
    fn fmt_carry(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.carry.0 {
            0 => Ok(()),
            n => write!(f, "; {n} session(s) wait for the server to answer again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_phase_holder_and_frozen_backends() {
        let backend = |suffix: &str, frozen| BackendStatus {
            suffix: suffix.into(),
            mode: Mode::Readonly,
            frozen,
        };
        let mut s = Status {
            backends: vec![
                backend("dc=example,dc=org", true),
                backend("dc=other,dc=org", false),
                backend("dc=third,dc=org", true),
            ],
            freeze: None,
            queued_requests: 0,
            queued_bytes: 0,
            in_flight: 0,
            carry: (0, 0, 0),
        };
        assert_eq!(s.to_string(), "thawed");
        s.carry = (2, 5, 1);
        assert_eq!(
            s.to_string(),
            "thawed; 2 session(s) wait for the server to answer again"
        );
        s.carry = (0, 5, 1);
        assert_eq!(s.phase(), None);
        s.freeze = Some(CurrentFreeze {
            id: 2,
            phase: Phase::Releasing,
            holder: Some("cn=admin,dc=example,dc=org".into()),
            holder_name: "cn=admin,dc=example,dc=org (conn 3)".into(),
            since: SystemTime::UNIX_EPOCH,
            age: Duration::from_millis(4500),
            lease_expires: None,
        });
        assert_eq!(
            s.to_string(),
            "releasing by cn=admin,dc=example,dc=org (conn 3) for 4 s: dc=example,dc=org; \
             dc=third,dc=org"
        );
        assert_eq!(s.phase(), Some(Phase::Releasing));
    }
}
