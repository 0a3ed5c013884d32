//! The per-request decision: a pure function of the request, what the
//! session holds and what the session may do, with its unit tests.

use crate::proxy::exops::{self, Exop};
use crate::wire::envelope::auth;
use crate::wire::{op, Envelope};

/// Allowed in clear under `require_tls`: StartTLS, the root DSE read (how
/// clients discover StartTLS) and the anonymous bind that ldap-utils send
/// before it (no secret in it), and unbind and abandon (no response).
pub(super) fn exempt_from_tls(env: &Envelope, frame: &[u8]) -> bool {
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
pub(super) fn cancel_target(value: Option<&[u8]>) -> Option<i32> {
    use crate::wire::ber::{decode_unsigned, Reader};
    let v = value?;
    let mut r = Reader::new(v, 0, v.len());
    let seq = r.expect(0x30, "cancel value").ok()?;
    let id = Reader::inside(v, seq).expect(0x02, "cancelID").ok()?;
    decode_unsigned(id.value(v))
        .ok()
        .and_then(|n| i32::try_from(n).ok())
}
