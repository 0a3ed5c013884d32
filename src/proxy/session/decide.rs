//! The per-request decision: what happens to one client request, as a pure
//! function of the request (its envelope and bytes) and of what the session
//! holds ([`View`]): refuse it, end the session, answer it here, queue it,
//! or take it to the freeze's gate. The requests loop carries the decision
//! out (`requests.rs`); nothing here does I/O or changes state, so every
//! rule is unit-tested below without sockets.
//!
//! The gate itself ([`crate::freeze::Engine::admit`]) is not decided here:
//! whether a freeze holds a request must be settled atomically with
//! recording it in flight, or a freeze starting between the two would miss
//! it in its drain.

use ldap3_proto::proto::LdapResultCode;

use super::end::{reused_id, End};
use crate::freeze::participant::LocalOp;
use crate::proxy::exops::{self, Exop};
use crate::wire::ber::{decode_unsigned, Reader};
use crate::wire::envelope::auth;
use crate::wire::{op, Envelope};

/// What a session holds when a request arrives, read without changing it.
pub(super) trait View {
    /// `tls.require_tls` refuses this connection's clear requests (a TCP
    /// client not in TLS).
    fn clear_refused(&self) -> bool;
    /// Why a SASL EXTERNAL bind must not be forwarded (the server would
    /// authenticate the proxy's own identity), or `None`.
    fn external_refused(&self) -> Option<&'static str>;
    /// No request waits in the session's queue.
    fn queue_empty(&self) -> bool;
    /// A request with this message ID waits in the queue.
    fn queued(&self, msgid: i32) -> bool;
    /// A bind waits in the queue.
    fn bind_queued(&self) -> bool;
    /// The proxy is still answering a request with this message ID (an
    /// Allow-Backup during its drain).
    fn answering(&self, msgid: i32) -> bool;
    /// The operation (protocolOp tag) of the request in flight upstream
    /// with this message ID.
    fn in_flight(&self, msgid: i32) -> Option<u8>;
    /// A request with this ID could not go upstream (the in-flight table
    /// refuses it): one with the ID is in flight, or an abandoned read with
    /// it may still be answered.
    fn id_taken(&self, msgid: i32) -> bool;
    /// A bind is in flight upstream.
    fn bind_in_flight(&self) -> bool;
    /// Requests in flight upstream (persistent searches not counted).
    fn outstanding(&self) -> usize;
    /// The server closed the session's upstream connection and the session
    /// waits to be carried to a new one.
    fn upstream_lost(&self) -> bool;
    /// The server may still answer an earlier request with this message ID:
    /// a read a drain's time limit abandoned, which the proxy answered
    /// itself (the client may reuse the ID, but the server's answer to the
    /// old read would be taken for the new request's).
    fn answer_pending(&self, msgid: i32) -> bool;
}

/// What to do with one request.
#[derive(Debug)]
pub(super) enum Decision {
    /// Never forwarded: answered with this result in a response of the
    /// request's type.
    Refuse(LdapResultCode, String),
    /// An Abandon request.
    Abandon(Abandon),
    /// Forwarded; the session then ends, its queue discarded (never sent).
    Unbind,
    /// The session ends (a protocol error: a message ID reused).
    End(End),
    /// StartTLS: answered here, then the handshake.
    StartTls,
    /// A Cancel whose target waits in the queue: the target is answered
    /// `canceled` (never sent), the Cancel `success`.
    CancelQueued(i32),
    /// Allow-Backup or status, answered here now.
    Answer(LocalOp),
    /// Joins the queue (behind a request already waiting, a bind in flight,
    /// or, for a bind, the connection's outstanding requests); one the
    /// proxy answers itself (`Some`) waits for a pending bind's identity.
    Queue(Option<LocalOp>),
    /// To the freeze's gate: forwarded unless a freeze holds it.
    Gate,
}

/// What an Abandon does to its target.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Abandon {
    /// No target could be read: nothing to do (an Abandon has no response).
    Ignore,
    /// The target waits in the queue: dropped there, nothing sent.
    Queued(i32),
    /// The target may be running at the server and changing it (a write,
    /// an extended operation, a bind): the Abandon is not forwarded, the
    /// target stays in flight (a drain waits for it) and its response is
    /// dropped.
    Running(i32),
    /// A read in flight, or nothing known: forwarded to the server. The
    /// read's ID stays taken until the server is known to be done with it
    /// (`InFlightTable::abandon_read`).
    Forward(i32),
}

/// The text of the `require_tls` refusal.
pub(super) const TLS_REQUIRED: &str =
    "abproxy requires TLS on this connection (tls.require_tls): use ldaps:// or StartTLS first \
     (ldapsearch -ZZ)";

/// Decides what happens to `env` (the envelope of `frame`) on a session
/// that holds what `view` says.
#[inline]
pub(super) fn decide(env: &Envelope, frame: &[u8], view: &impl View) -> Decision {
    if view.clear_refused() && !exempt_from_tls(env, frame) {
        return Decision::Refuse(LdapResultCode::ConfidentialityRequired, TLS_REQUIRED.into());
    }
    match env.op {
        op::ABANDON_REQUEST => return Decision::Abandon(abandon(env, view)),
        op::UNBIND_REQUEST => return Decision::Unbind,
        _ => {}
    }
    // RFC 4511 section 4.1.1.1: a message ID must not be reused while its
    // request is outstanding (here: queued or answered later by the proxy;
    // in flight is checked where it matters below, by the in-flight table
    // itself at the gate, and for a request the gate holds, by the requests
    // loop: the lookup costs a lock, so a request that passes pays it once).
    let msgid = env.msgid;
    if (!view.queue_empty() && view.queued(msgid)) || view.answering(msgid) {
        return Decision::End(reused_id(msgid));
    }
    if env.op == op::BIND_REQUEST && is_sasl_external(env, frame) {
        if let Some(why) = view.external_refused() {
            return Decision::Refuse(
                LdapResultCode::AuthMethodNotSupported,
                format!("abproxy refuses SASL EXTERNAL here: {why}, not as this client"),
            );
        }
    }
    if view.answer_pending(msgid) {
        // The client may reuse the ID (the proxy gave the old read its final
        // response), but the server, which was sent an Abandon, may still
        // answer the old read: that answer would end the new request's
        // in-flight entry while the server runs it (a drain would not wait
        // for it, a bind would overlap it). Nothing goes upstream with this
        // ID until the server is known to be done with the old read (its
        // answer, a bind's response, a new upstream connection).
        return Decision::Refuse(
            LdapResultCode::Busy,
            format!(
                "abproxy: message ID {msgid} is still in use at the server (a read with this \
                 ID was abandoned at a backup's drain time limit and may still be answered): \
                 send the request with another message ID"
            ),
        );
    }
    let mut local = None;
    if env.op == op::EXTENDED_REQUEST {
        let exop = exops::lookup(env.oid_bytes(frame).unwrap_or_default());
        // A Cancel is answered here only when its target waits in the queue.
        let cancel_queued = (exop == Some(Exop::Cancel))
            .then(|| cancel_target(env.value_bytes(frame)))
            .flatten()
            .filter(|&t| !view.queue_empty() && view.queued(t));
        let answered_here = match exop {
            Some(Exop::StartTls | Exop::AllowBackup | Exop::Status) => true,
            Some(Exop::Cancel) => cancel_queued.is_some(),
            None => false,
        };
        if answered_here {
            if let Some(c) = env.controls(frame).find(|c| c.critical) {
                // RFC 4511 section 4.1.11: the proxy answers this operation
                // and implements none of its controls.
                return Decision::Refuse(
                    LdapResultCode::UnavailableCriticalExtension,
                    format!(
                        "abproxy answers this extended operation itself and does not support \
                         the critical control {}",
                        String::from_utf8_lossy(c.oid)
                    ),
                );
            }
        }
        match exop {
            Some(Exop::StartTls) => return Decision::StartTls,
            Some(Exop::AllowBackup) => local = Some(LocalOp::AllowBackup),
            Some(Exop::Status) => local = Some(LocalOp::Status),
            Some(Exop::Cancel) | None => {}
        }
        if let Some(target) = cancel_queued {
            return Decision::CancelQueued(target);
        }
    }
    if let Some(what) = local {
        if view.in_flight(msgid).is_some() {
            return Decision::End(reused_id(msgid));
        }
        // Answered at once, unless a bind is pending: then after it, with
        // the identity it gives (an operator's OFF on a connection with
        // held writes is answered at once).
        if view.bind_queued() || view.bind_in_flight() {
            return Decision::Queue(Some(what));
        }
        return Decision::Answer(what);
    }
    // Order per connection is absolute: once one request waits, every later
    // one waits behind it.
    if !view.queue_empty() || held_by_session(env.op, view) || view.upstream_lost() {
        if view.id_taken(msgid) {
            return Decision::End(reused_id(msgid));
        }
        return Decision::Queue(None);
    }
    Decision::Gate
}

/// The session's own order holds a request of operation `op` back:
/// everything waits for a bind in flight, and a bind waits until nothing of
/// its connection is in flight (RFC 4511 section 4.2.1; the server would
/// drop what it overlaps, and it may still be running a write).
#[inline]
pub(super) fn held_by_session(op: u8, view: &impl View) -> bool {
    view.bind_in_flight() || (op == op::BIND_REQUEST && view.outstanding() > 0)
}

/// What an Abandon does (see [`Abandon`]).
fn abandon(env: &Envelope, view: &impl View) -> Abandon {
    let Some(target) = env.abandon_id else {
        return Abandon::Ignore;
    };
    if !view.queue_empty() && view.queued(target) {
        return Abandon::Queued(target);
    }
    match view.in_flight(target) {
        Some(o) if !op::abandon_stops(o) => Abandon::Running(target),
        _ => Abandon::Forward(target),
    }
}

fn is_sasl_external(env: &Envelope, frame: &[u8]) -> bool {
    env.bind_auth == Some(auth::SASL)
        && env
            .sasl_mechanism_bytes(frame)
            .is_some_and(|m| m.eq_ignore_ascii_case(b"EXTERNAL"))
}

/// Allowed in clear under `require_tls`: StartTLS, the root DSE read (how
/// clients discover StartTLS) and the anonymous bind that ldap-utils send
/// before it (no secret in it), and unbind and abandon (no response).
fn exempt_from_tls(env: &Envelope, frame: &[u8]) -> bool {
    match env.op {
        op::UNBIND_REQUEST | op::ABANDON_REQUEST => true,
        op::BIND_REQUEST => {
            env.bind_auth == Some(auth::SIMPLE)
                && env.dn_bytes(frame).is_some_and(|d| d.is_empty())
                && env.empty_simple_password()
        }
        op::EXTENDED_REQUEST => {
            exops::lookup(env.oid_bytes(frame).unwrap_or_default()) == Some(Exop::StartTls)
        }
        op::SEARCH_REQUEST => {
            env.scope == Some(0) && env.dn_bytes(frame).is_some_and(|d| d.is_empty())
        }
        _ => false,
    }
}

/// The cancelID of a cancel request value (RFC 3909:
/// `SEQUENCE { cancelID MessageID }`).
fn cancel_target(value: Option<&[u8]>) -> Option<i32> {
    let v = value?;
    let mut r = Reader::new(v, 0, v.len());
    let seq = r.expect(0x30, "cancel value").ok()?;
    let id = Reader::inside(v, seq).expect(0x02, "cancelID").ok()?;
    decode_unsigned(id.value(v))
        .ok()
        .and_then(|n| i32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    //! Each rule of the decision, and the hostile sequences it must stand:
    //! reused message IDs, pipelining around binds, abandons of running
    //! writes, SASL EXTERNAL where the server would see the proxy.
    use std::collections::HashMap;

    use bytes::Bytes;
    use ldap3_proto::control::LdapControl;
    use ldap3_proto::proto::*;

    use super::*;
    use crate::wire::pdu::encode;

    /// A session's holdings, as plain values.
    #[derive(Default)]
    struct Fake {
        require_tls_in_clear: bool,
        external: Option<&'static str>,
        queued: Vec<(i32, u8)>,
        answering: Vec<i32>,
        in_flight: HashMap<i32, u8>,
        /// IDs of abandoned reads the server may still answer.
        abandoned: Vec<i32>,
        upstream_lost: bool,
        answer_pending: Vec<i32>,
    }

    impl View for Fake {
        fn clear_refused(&self) -> bool {
            self.require_tls_in_clear
        }
        fn external_refused(&self) -> Option<&'static str> {
            self.external
        }
        fn queue_empty(&self) -> bool {
            self.queued.is_empty()
        }
        fn queued(&self, msgid: i32) -> bool {
            self.queued.iter().any(|&(id, _)| id == msgid)
        }
        fn bind_queued(&self) -> bool {
            self.queued.iter().any(|&(_, op)| op == op::BIND_REQUEST)
        }
        fn answering(&self, msgid: i32) -> bool {
            self.answering.contains(&msgid)
        }
        fn in_flight(&self, msgid: i32) -> Option<u8> {
            self.in_flight.get(&msgid).copied()
        }
        fn id_taken(&self, msgid: i32) -> bool {
            self.in_flight.contains_key(&msgid) || self.abandoned.contains(&msgid)
        }
        fn bind_in_flight(&self) -> bool {
            self.in_flight.values().any(|&op| op == op::BIND_REQUEST)
        }
        fn outstanding(&self) -> usize {
            self.in_flight.len()
        }
        fn upstream_lost(&self) -> bool {
            self.upstream_lost
        }
        fn answer_pending(&self, msgid: i32) -> bool {
            self.answer_pending.contains(&msgid)
        }
    }

    fn on(view: &Fake, frame: Bytes) -> Decision {
        let env = Envelope::request(&frame).expect("a request");
        decide(&env, &frame, view)
    }

    fn msg(msgid: i32, op: LdapOp) -> Bytes {
        encode(LdapMsg::new(msgid, op))
    }

    fn simple_bind(msgid: i32, dn: &str, pw: &str) -> Bytes {
        msg(
            msgid,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: dn.into(),
                cred: LdapBindCred::Simple(pw.into()),
            }),
        )
    }

    fn sasl_bind(msgid: i32, mechanism: &str) -> Bytes {
        msg(
            msgid,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: String::new(),
                cred: LdapBindCred::SASL(SaslCredentials {
                    mechanism: mechanism.into(),
                    credentials: vec![],
                }),
            }),
        )
    }

    fn search(msgid: i32, base: &str, scope: LdapSearchScope) -> Bytes {
        msg(
            msgid,
            LdapOp::SearchRequest(LdapSearchRequest {
                base: base.into(),
                scope,
                aliases: LdapDerefAliases::Never,
                sizelimit: 0,
                timelimit: 0,
                typesonly: false,
                filter: LdapFilter::Present("objectClass".into()),
                attrs: vec![],
            }),
        )
    }

    fn modify(msgid: i32) -> Bytes {
        msg(
            msgid,
            LdapOp::ModifyRequest(LdapModifyRequest {
                dn: "uid=a,dc=example,dc=org".into(),
                changes: vec![],
            }),
        )
    }

    fn exop(msgid: i32, oid: &str, value: Option<Vec<u8>>, ctrl: Vec<LdapControl>) -> Bytes {
        encode(LdapMsg::new_with_ctrls(
            msgid,
            LdapOp::ExtendedRequest(LdapExtendedRequest {
                name: oid.into(),
                value,
            }),
            ctrl,
        ))
    }

    fn cancel(msgid: i32, target: u8) -> Bytes {
        exop(
            msgid,
            exops::CANCEL_OID,
            Some(vec![0x30, 0x03, 0x02, 0x01, target]),
            vec![],
        )
    }

    fn allow_backup(msgid: i32) -> Bytes {
        exop(msgid, abproxy_proto::ALLOW_BACKUP_OID, None, vec![])
    }

    fn is_reused(d: &Decision, id: i32) -> bool {
        matches!(d, Decision::End(End::ClientProtocol(m)) if m.contains(&format!("message ID {id} reused")))
    }

    #[test]
    fn an_idle_session_takes_requests_to_the_gate() {
        let v = Fake::default();
        assert!(matches!(on(&v, modify(1)), Decision::Gate));
        assert!(matches!(
            on(&v, search(2, "dc=example,dc=org", LdapSearchScope::Subtree)),
            Decision::Gate
        ));
        assert!(matches!(
            on(&v, simple_bind(3, "cn=a", "pw")),
            Decision::Gate
        ));
        // An extended operation the proxy does not know is the server's.
        assert!(matches!(
            on(&v, exop(4, "1.3.6.1.4.1.4203.1.11.3", None, vec![])),
            Decision::Gate
        ));
        assert!(matches!(
            on(&v, msg(5, LdapOp::UnbindRequest)),
            Decision::Unbind
        ));
    }

    #[test]
    fn require_tls_refuses_clear_requests_except_how_to_get_tls() {
        let v = Fake {
            require_tls_in_clear: true,
            ..Fake::default()
        };
        for frame in [
            modify(1),
            simple_bind(2, "cn=a", "secret"),
            // Not anonymous: it names a DN, even with no password.
            simple_bind(3, "cn=a", ""),
            search(4, "dc=example,dc=org", LdapSearchScope::Base),
            search(5, "", LdapSearchScope::Subtree),
            allow_backup(6),
        ] {
            match on(&v, frame) {
                Decision::Refuse(LdapResultCode::ConfidentialityRequired, m) => {
                    assert_eq!(m, TLS_REQUIRED)
                }
                d => panic!("not refused: {d:?}"),
            }
        }
        assert!(matches!(
            on(&v, exop(7, exops::START_TLS_OID, None, vec![])),
            Decision::StartTls
        ));
        assert!(matches!(
            on(&v, search(8, "", LdapSearchScope::Base)),
            Decision::Gate
        ));
        assert!(matches!(on(&v, simple_bind(9, "", "")), Decision::Gate));
        assert!(matches!(
            on(&v, msg(10, LdapOp::AbandonRequest(1))),
            Decision::Abandon(Abandon::Forward(1))
        ));
        assert!(matches!(
            on(&v, msg(11, LdapOp::UnbindRequest)),
            Decision::Unbind
        ));
    }

    #[test]
    fn a_reused_message_id_ends_the_session() {
        // Queued.
        let v = Fake {
            queued: vec![(7, op::MODIFY_REQUEST)],
            ..Fake::default()
        };
        assert!(is_reused(&on(&v, search(7, "", LdapSearchScope::Base)), 7));
        // Being answered by the proxy (an Allow-Backup in its drain).
        let v = Fake {
            answering: vec![3],
            ..Fake::default()
        };
        assert!(is_reused(&on(&v, modify(3)), 3));
        // In flight, for a request that would be queued or answered here
        // (one going to the gate is checked by the in-flight table).
        let v = Fake {
            in_flight: HashMap::from([(1, op::BIND_REQUEST), (2, op::MODIFY_REQUEST)]),
            ..Fake::default()
        };
        assert!(is_reused(&on(&v, modify(2)), 2));
        assert!(is_reused(&on(&v, allow_backup(1)), 1));
        let v = Fake {
            in_flight: HashMap::from([(2, op::MODIFY_REQUEST)]),
            ..Fake::default()
        };
        assert!(matches!(on(&v, modify(2)), Decision::Gate));
        // The ID of an abandoned read the server may still answer, for a
        // request that would be queued (behind a bind in flight).
        let v = Fake {
            in_flight: HashMap::from([(1, op::BIND_REQUEST)]),
            abandoned: vec![4],
            ..Fake::default()
        };
        assert!(is_reused(&on(&v, modify(4)), 4));
        assert!(matches!(on(&v, modify(5)), Decision::Queue(None)));
    }

    #[test]
    fn an_id_the_server_may_still_answer_is_refused_busy_not_forwarded() {
        // A read abandoned at a drain's time limit (answered by the proxy,
        // the server sent an Abandon): a request reusing its ID, of any
        // kind that would go upstream, is answered `busy` and never sent,
        // so the old read's late answer cannot end its entry.
        let v = Fake {
            answer_pending: vec![1],
            ..Fake::default()
        };
        for frame in [
            search(1, "dc=example,dc=org", LdapSearchScope::Subtree),
            modify(1),
            simple_bind(1, "cn=u,dc=example,dc=org", "secret"),
            exop(1, "1.3.6.1.4.1.4203.1.11.3", None, vec![]),
        ] {
            match on(&v, frame) {
                Decision::Refuse(LdapResultCode::Busy, m) => {
                    assert!(m.contains("message ID 1 is still in use"), "{m}")
                }
                d => panic!("{d:?}"),
            }
        }
        // Other IDs go on as usual; an Abandon or Unbind takes no ID.
        assert!(matches!(on(&v, modify(2)), Decision::Gate));
        assert!(matches!(
            on(&v, msg(1, LdapOp::UnbindRequest)),
            Decision::Unbind
        ));
        assert!(matches!(
            on(&v, msg(1, LdapOp::AbandonRequest(5))),
            Decision::Abandon(_)
        ));
    }

    #[test]
    fn pipelining_around_a_bind_keeps_the_session_order() {
        // Everything behind a bind in flight waits, the operator's ON too
        // (it must be authorised as the bind's identity, not the last one).
        let v = Fake {
            in_flight: HashMap::from([(1, op::BIND_REQUEST)]),
            ..Fake::default()
        };
        assert!(matches!(on(&v, modify(2)), Decision::Queue(None)));
        assert!(matches!(
            on(&v, search(3, "", LdapSearchScope::Base)),
            Decision::Queue(None)
        ));
        assert!(matches!(
            on(&v, allow_backup(4)),
            Decision::Queue(Some(LocalOp::AllowBackup))
        ));
        // A bind waits until nothing of the connection is in flight.
        let v = Fake {
            in_flight: HashMap::from([(1, op::MODIFY_REQUEST)]),
            ..Fake::default()
        };
        assert!(matches!(
            on(&v, simple_bind(2, "cn=a", "pw")),
            Decision::Queue(None)
        ));
        assert!(matches!(on(&v, modify(3)), Decision::Gate));
        // A bind waiting in the queue: the status waits for its identity,
        // and once anything waits every later request waits behind it.
        let v = Fake {
            queued: vec![(2, op::BIND_REQUEST)],
            ..Fake::default()
        };
        assert!(matches!(
            on(
                &v,
                exop(3, abproxy_proto::ALLOW_BACKUP_STATUS_OID, None, vec![])
            ),
            Decision::Queue(Some(LocalOp::Status))
        ));
        assert!(matches!(on(&v, modify(4)), Decision::Queue(None)));
        // A held write queued ahead (not a bind): the status is answered
        // at once, the operator's OFF too.
        let v = Fake {
            queued: vec![(2, op::MODIFY_REQUEST)],
            ..Fake::default()
        };
        assert!(matches!(
            on(&v, allow_backup(3)),
            Decision::Answer(LocalOp::AllowBackup)
        ));
    }

    #[test]
    fn an_abandon_of_a_running_write_is_not_forwarded() {
        let v = Fake {
            queued: vec![(9, op::ADD_REQUEST)],
            in_flight: HashMap::from([
                (1, op::MODIFY_REQUEST),
                (2, op::SEARCH_REQUEST),
                (3, op::EXTENDED_REQUEST),
                (4, op::COMPARE_REQUEST),
                (5, op::DEL_REQUEST),
            ]),
            ..Fake::default()
        };
        let abandon = |target| on(&v, msg(20, LdapOp::AbandonRequest(target)));
        let Decision::Abandon(a) = abandon(1) else {
            panic!()
        };
        assert_eq!(a, Abandon::Running(1));
        for (target, want) in [
            (2, Abandon::Forward(2)),
            (3, Abandon::Running(3)),
            (4, Abandon::Forward(4)),
            (5, Abandon::Running(5)),
            (9, Abandon::Queued(9)),
            // Unknown: the server's business (it ignores it).
            (42, Abandon::Forward(42)),
        ] {
            match abandon(target) {
                Decision::Abandon(a) => assert_eq!(a, want, "target {target}"),
                d => panic!("{d:?}"),
            }
        }
    }

    #[test]
    fn sasl_external_is_refused_where_the_server_would_see_the_proxy() {
        let v = Fake {
            external: Some("the upstream is ldapi://"),
            ..Fake::default()
        };
        for mech in ["EXTERNAL", "external"] {
            match on(&v, sasl_bind(1, mech)) {
                Decision::Refuse(LdapResultCode::AuthMethodNotSupported, m) => {
                    assert!(m.contains("the upstream is ldapi://"), "{m}")
                }
                d => panic!("{d:?}"),
            }
        }
        assert!(matches!(
            on(&v, sasl_bind(2, "SCRAM-SHA-256")),
            Decision::Gate
        ));
        let v = Fake::default();
        assert!(matches!(on(&v, sasl_bind(3, "EXTERNAL")), Decision::Gate));
    }

    #[test]
    fn a_cancel_is_answered_here_only_for_a_queued_target() {
        let v = Fake {
            queued: vec![(5, op::MODIFY_REQUEST)],
            in_flight: HashMap::from([(6, op::MODIFY_REQUEST)]),
            ..Fake::default()
        };
        assert!(matches!(on(&v, cancel(7, 5)), Decision::CancelQueued(5)));
        // In flight or unknown: the server's (behind the queue, in order).
        assert!(matches!(on(&v, cancel(8, 6)), Decision::Queue(None)));
        let v = Fake {
            in_flight: HashMap::from([(6, op::MODIFY_REQUEST)]),
            ..Fake::default()
        };
        assert!(matches!(on(&v, cancel(8, 6)), Decision::Gate));
        // A value that is not a cancel's: forwarded, the server answers.
        assert!(matches!(
            on(&v, exop(9, exops::CANCEL_OID, Some(vec![1, 2]), vec![])),
            Decision::Gate
        ));
    }

    #[test]
    fn critical_controls_on_operations_answered_here_are_refused() {
        let v = Fake::default();
        let critical = vec![LdapControl::ManageDsaIT { criticality: true }];
        for oid in [
            abproxy_proto::ALLOW_BACKUP_OID,
            abproxy_proto::ALLOW_BACKUP_STATUS_OID,
            exops::START_TLS_OID,
        ] {
            match on(&v, exop(1, oid, None, critical.clone())) {
                Decision::Refuse(LdapResultCode::UnavailableCriticalExtension, m) => {
                    assert!(m.contains("2.16.840.1.113730.3.4.2"), "{m}")
                }
                d => panic!("{oid}: {d:?}"),
            }
        }
        // Not critical: ignored, as RFC 4511 allows.
        let plain = vec![LdapControl::ManageDsaIT { criticality: false }];
        assert!(matches!(
            on(&v, exop(2, abproxy_proto::ALLOW_BACKUP_OID, None, plain)),
            Decision::Answer(LocalOp::AllowBackup)
        ));
        // The server's own extended operations keep their controls.
        assert!(matches!(
            on(&v, exop(3, "1.3.6.1.4.1.4203.1.11.1", None, critical)),
            Decision::Gate
        ));
    }
}
