//! The extended operations abproxy answers itself, in one table by OID (as
//! OpenLDAP's lloadd keeps its own in `servers/lloadd/extended.c`); every
//! other extended operation is forwarded to the server. The session looks
//! a request's name up here once and acts on what it finds.
//!
//! The answers to Allow-Backup and its status are made here too: what the
//! freeze engine returns (typed values, [`Granted`] or [`FreezeError`])
//! becomes the response's result code and message.

use abproxy_proto::{ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID};
use ldap3_proto::proto::LdapResultCode;

use crate::freeze::{FreezeError, Granted};

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
}
