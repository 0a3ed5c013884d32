//! The extended operations abproxy answers itself, in one table by OID (as
//! OpenLDAP's lloadd keeps its own in `servers/lloadd/extended.c`); every
//! other extended operation is forwarded to the server. The session looks
//! a request's name up here once and acts on what it finds.
//!
//! The answers to Allow-Backup and its status are made here too: what the
//! freeze engine returns (typed values: [`Granted`], [`Status`] or
//! [`FreezeError`]) becomes the response's result code, message and, for
//! the status, its value (AllowBackupStatus in BER).

use std::time::{SystemTime, UNIX_EPOCH};

use abproxy_proto::{ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID};
use ldap3_proto::proto::LdapResultCode;

use crate::freeze::status::Phase;
use crate::freeze::{FreezeError, Granted, Mode, Status};

/// An extended operation the proxy answers (or may answer) itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exop {
    /// StartTLS (RFC 4511 4.14): the proxy terminates TLS itself, so it
    /// must see every request in clear; never forwarded.
    StartTls,
    /// Allow-Backup ON/OFF: the freeze.
    AllowBackup,
    /// The freeze's status.
    Status,
    /// Cancel (RFC 3909): answered here when its target is a request the
    /// proxy holds (never sent), forwarded otherwise.
    Cancel,
}

/// When the proxy lists an operation in the root DSE's
/// `supportedExtension`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// Always.
    Yes,
    /// When the proxy has a TLS certificate.
    WithTls,
    /// Never (the server's own, when it has it).
    No,
}

/// The StartTLS OID.
pub const START_TLS_OID: &str = "1.3.6.1.4.1.1466.20037";
/// The Cancel OID.
pub const CANCEL_OID: &str = "1.3.6.1.1.8";

/// OID, what it is, whether the root DSE lists it.
const TABLE: [(&str, Exop, Listed); 4] = [
    (START_TLS_OID, Exop::StartTls, Listed::WithTls),
    (ALLOW_BACKUP_OID, Exop::AllowBackup, Listed::Yes),
    (ALLOW_BACKUP_STATUS_OID, Exop::Status, Listed::Yes),
    (CANCEL_OID, Exop::Cancel, Listed::No),
];

/// What `name` (an extended request's OID) is to the proxy; `None`: the
/// server's business.
pub fn lookup(name: &[u8]) -> Option<Exop> {
    TABLE
        .iter()
        .find(|(oid, _, _)| oid.as_bytes() == name)
        .map(|&(_, exop, _)| exop)
}

/// The OIDs the proxy adds to the root DSE's `supportedExtension`
/// (`tls`: it has a certificate), in table order.
pub fn listed(tls: bool) -> &'static [&'static str] {
    const WITH_TLS: [&str; 3] = [START_TLS_OID, ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID];
    if tls {
        &WITH_TLS
    } else {
        &WITH_TLS[1..]
    }
}

/// The result code and message of the response to an Allow-Backup
/// request, from what the engine did or why it failed.
pub fn allow_backup_answer(r: Result<Granted, FreezeError>) -> (LdapResultCode, String) {
    match r {
        Ok(granted) => (LdapResultCode::Success, granted.to_string()),
        Err(e) => (e.result_code(), e.to_string()),
    }
}

/// The result code, message and value of the response to a status
/// query.
pub fn status_answer(r: Result<Status, FreezeError>) -> (LdapResultCode, String, Option<Vec<u8>>) {
    match r {
        Ok(status) => (
            LdapResultCode::Success,
            status.to_string(),
            Some(status_value(&status)),
        ),
        Err(e) => (e.result_code(), e.to_string(), None),
    }
}

/// The status as the response's value: AllowBackupStatus, DER.
pub fn status_value(status: &Status) -> Vec<u8> {
    abproxy_proto::encode_status(&to_proto(status))
}

/// The status as abproxy-proto's AllowBackupStatus. A releasing freeze is
/// `frozen` with `releasing` set (the extension decoders of the first
/// version ignore).
fn to_proto(s: &Status) -> abproxy_proto::AllowBackupStatus {
    let f = s.freeze.as_ref();
    abproxy_proto::AllowBackupStatus {
        state: match f.map(|f| f.phase) {
            None => abproxy_proto::FreezeState::Thawed,
            Some(Phase::Draining) => abproxy_proto::FreezeState::Draining,
            Some(Phase::Frozen | Phase::Releasing) => abproxy_proto::FreezeState::Frozen,
        },
        backends: s
            .backends
            .iter()
            .map(|b| abproxy_proto::BackendStatus::new(&b.suffix, backend_mode(b.mode), b.frozen))
            .collect(),
        holder: f
            .and_then(|f| f.holder.as_deref())
            .map(|d| abproxy_proto::LdapDn::from(d.as_bytes().to_vec())),
        since: f.map(|f| epoch_secs(f.since)),
        queued_requests: s.queued_requests,
        queued_bytes: s.queued_bytes,
        in_flight: s.in_flight,
        lease_expires: f.and_then(|f| f.lease_expires).map(epoch_secs),
        freeze_id: f.map(|f| f.id),
        releasing: f.is_some_and(|f| f.phase == Phase::Releasing),
        sessions_waiting: s.carry.0,
        sessions_carried: s.carry.1,
        sessions_not_carried: s.carry.2,
    }
}

fn backend_mode(mode: Mode) -> abproxy_proto::BackendMode {
    match mode {
        Mode::Readonly => abproxy_proto::BackendMode::Readonly,
        Mode::Stop => abproxy_proto::BackendMode::Stop,
        Mode::Unimplemented => abproxy_proto::BackendMode::Unimplemented,
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_oid_is_found_and_nothing_else() {
        for (oid, exop, _) in TABLE {
            assert_eq!(lookup(oid.as_bytes()), Some(exop));
        }
        assert_eq!(
            lookup(b"1.3.6.1.4.1.4203.1.11.3"),
            None,
            "whoami: the server's"
        );
        assert_eq!(lookup(b""), None);
        // The wire's byte OIDs are the same.
        assert_eq!(
            lookup(crate::wire::envelope::oid::START_TLS),
            Some(Exop::StartTls)
        );
        assert_eq!(
            lookup(crate::wire::envelope::oid::CANCEL),
            Some(Exop::Cancel)
        );
    }

    #[test]
    fn the_root_dse_lists_what_the_table_says() {
        for tls in [false, true] {
            let want: Vec<&str> = TABLE
                .iter()
                .filter(|(_, _, l)| *l == Listed::Yes || (tls && *l == Listed::WithTls))
                .map(|(oid, _, _)| *oid)
                .collect();
            assert_eq!(listed(tls), want.as_slice(), "tls {tls}");
        }
    }

    #[test]
    fn allow_backup_answers_are_the_code_and_message_of_what_happened() {
        use crate::freeze::error::{Busy, Suffixes};
        use std::time::Duration;
        let (code, msg) = allow_backup_answer(Ok(Granted::Frozen {
            id: 7,
            backends: Suffixes(vec!["dc=example,dc=org".into(), "dc=other,dc=org".into()]),
            drained: Duration::from_millis(12),
            lease: Duration::from_secs(600),
            cut: None,
        }));
        assert_eq!(code, LdapResultCode::Success);
        assert_eq!(
            msg,
            "frozen: dc=example,dc=org; dc=other,dc=org; drained in 12 ms; lease 600 s; freeze id 7"
        );
        let (code, msg) = allow_backup_answer(Ok(Granted::Released {
            id: 7,
            after: Duration::from_millis(2345),
            queued: 3,
            restart: None,
        }));
        assert_eq!(code, LdapResultCode::Success);
        assert_eq!(
            msg,
            "released after 2.3 s; 3 queued request(s) resumed; freeze id 7"
        );
        assert_eq!(
            allow_backup_answer(Ok(Granted::NotFrozen)),
            (LdapResultCode::Success, "not frozen".to_string())
        );
        assert_eq!(
            allow_backup_answer(Err(Busy::Releasing.into())),
            (
                LdapResultCode::Busy,
                "the freeze is being released (done steps running); retry OFF in a moment"
                    .to_string()
            )
        );
    }

    fn status(freeze: Option<crate::freeze::status::CurrentFreeze>) -> Status {
        use crate::freeze::status::BackendStatus;
        let frozen = freeze.is_some();
        Status {
            backends: vec![
                BackendStatus {
                    suffix: "dc=example,dc=org".into(),
                    mode: Mode::Readonly,
                    frozen,
                },
                BackendStatus {
                    suffix: "dc=other,dc=org".into(),
                    mode: Mode::Stop,
                    frozen: false,
                },
                BackendStatus {
                    suffix: "cn=unimpl".into(),
                    mode: Mode::Unimplemented,
                    frozen: false,
                },
            ],
            freeze,
            queued_requests: 3,
            queued_bytes: 300,
            in_flight: 1,
            carry: (2, 5, 1),
        }
    }

    #[test]
    fn the_status_value_round_trips_through_the_decoder() {
        use crate::freeze::status::CurrentFreeze;
        use abproxy_proto::{AllowBackupStatus, BackendMode, BackendStatus, FreezeState};
        use std::time::Duration;
        let backends = |frozen| {
            vec![
                BackendStatus::new("dc=example,dc=org", BackendMode::Readonly, frozen),
                BackendStatus::new("dc=other,dc=org", BackendMode::Stop, false),
                BackendStatus::new("cn=unimpl", BackendMode::Unimplemented, false),
            ]
        };
        let decoded = |s: &Status| abproxy_proto::decode_status(&status_value(s)).unwrap();
        // Thawed.
        assert_eq!(
            decoded(&status(None)),
            AllowBackupStatus {
                queued_requests: 3,
                queued_bytes: 300,
                in_flight: 1,
                sessions_waiting: 2,
                sessions_carried: 5,
                sessions_not_carried: 1,
                ..AllowBackupStatus::thawed(backends(false))
            }
        );
        // Each phase.
        let since = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for (phase, state, releasing) in [
            (Phase::Draining, FreezeState::Draining, false),
            (Phase::Frozen, FreezeState::Frozen, false),
            (Phase::Releasing, FreezeState::Frozen, true),
        ] {
            let s = status(Some(CurrentFreeze {
                id: 7,
                phase,
                holder: Some("cn=admin,dc=example,dc=org".into()),
                holder_name: "cn=admin,dc=example,dc=org (conn 2)".into(),
                since,
                age: Duration::from_secs(5),
                lease_expires: (phase != Phase::Draining).then(|| since + Duration::from_secs(600)),
            }));
            assert_eq!(
                decoded(&s),
                AllowBackupStatus {
                    state,
                    backends: backends(true),
                    holder: Some(b"cn=admin,dc=example,dc=org".to_vec().into()),
                    since: Some(1_700_000_000),
                    queued_requests: 3,
                    queued_bytes: 300,
                    in_flight: 1,
                    lease_expires: (phase != Phase::Draining).then_some(1_700_000_600),
                    freeze_id: Some(7),
                    releasing,
                    sessions_waiting: 2,
                    sessions_carried: 5,
                    sessions_not_carried: 1,
                },
                "{phase}"
            );
            let (code, msg, value) = status_answer(Ok(s.clone()));
            assert_eq!(code, LdapResultCode::Success);
            assert_eq!(
                msg,
                format!(
                    "{phase} by cn=admin,dc=example,dc=org (conn 2) for 5 s: dc=example,dc=org; \
                     2 session(s) wait for the server to answer again"
                )
            );
            assert_eq!(value, Some(status_value(&s)));
        }
        // A holder without an identity: no holder in the value.
        let s = status(Some(CurrentFreeze {
            id: 1,
            phase: Phase::Frozen,
            holder: None,
            holder_name: "anonymous (conn 1)".into(),
            since,
            age: Duration::ZERO,
            lease_expires: None,
        }));
        assert_eq!(decoded(&s).holder, None);
        // Refused: no value.
        let refused = status_answer(Err(crate::freeze::error::NotAuthorised::Anonymous.into()));
        assert_eq!(refused.0, LdapResultCode::InsufficentAccessRights);
        assert!(refused.2.is_none());
    }
}
