//! PDUs the proxy writes itself (it never re-encodes a PDU it did not author):
//! extended responses, the Notice of Disconnection and plain result messages.
//! Encoded with `ldap3_proto`'s types and codec.

use bytes::{Bytes, BytesMut};
use ldap3_proto::proto::{LdapExtendedResponse, LdapMsg, LdapOp, LdapResult, LdapResultCode};
use ldap3_proto::LdapCodec;
use tokio_util::codec::Encoder;

use super::envelope::{oid, op};

/// Encodes one message. Encoding an in-memory message cannot fail except on
/// allocation failure, which aborts anyway.
pub fn encode(msg: LdapMsg) -> Bytes {
    let mut buf = BytesMut::new();
    LdapCodec::default()
        .encode(msg, &mut buf)
        .expect("encoding an LdapMsg into memory cannot fail");
    buf.freeze()
}

/// A whole message read back with `ldap3_proto` (whatever its size);
/// `None` when it does not decode (the operator tools' view of journaled
/// requests and of their servers' answers, never the proxy's forwarding).
pub fn decode(frame: &[u8]) -> Option<LdapMsg> {
    use tokio_util::codec::Decoder;
    let mut buf = BytesMut::from(frame);
    LdapCodec::new(Some(frame.len().max(1)), None)
        .decode(&mut buf)
        .ok()
        .flatten()
}

/// A base search of `base` for `attrs`, `(objectClass=*)`: how the proxy
/// reads the root DSE and naming contexts' entries of its upstream.
pub fn base_search(msgid: i32, base: &str, attrs: &[&str]) -> Bytes {
    use ldap3_proto::proto::{LdapDerefAliases, LdapFilter, LdapSearchRequest, LdapSearchScope};
    encode(LdapMsg::new(
        msgid,
        LdapOp::SearchRequest(LdapSearchRequest {
            base: base.into(),
            scope: LdapSearchScope::Base,
            aliases: LdapDerefAliases::Never,
            sizelimit: 0,
            timelimit: 0,
            typesonly: false,
            filter: LdapFilter::Present("objectClass".into()),
            attrs: attrs.iter().map(|a| a.to_string()).collect(),
        }),
    ))
}

fn result(code: LdapResultCode, message: &str) -> LdapResult {
    LdapResult {
        code,
        matcheddn: String::new(),
        message: message.to_string(),
        referral: Vec::new(),
    }
}

/// An ExtendedResponse for `msgid`.
pub fn extended_response(
    msgid: i32,
    code: LdapResultCode,
    message: &str,
    name: Option<&str>,
    value: Option<Vec<u8>>,
) -> Bytes {
    encode(LdapMsg::new(
        msgid,
        LdapOp::ExtendedResponse(LdapExtendedResponse {
            res: result(code, message),
            name: name.map(str::to_string),
            value,
        }),
    ))
}

/// The RFC 4511 section 4.4.1 Notice of Disconnection (messageID 0).
pub fn notice_of_disconnection(code: LdapResultCode, message: &str) -> Bytes {
    let name = std::str::from_utf8(oid::NOTICE_OF_DISCONNECTION).expect("ASCII OID");
    extended_response(0, code, message, Some(name), None)
}

/// The final response matching a request operation, with a result code and a
/// message. `None` for requests that have no response (abandon, unbind).
pub fn response_for(
    request_op: u8,
    msgid: i32,
    code: LdapResultCode,
    message: &str,
) -> Option<Bytes> {
    let r = result(code, message);
    let op = match request_op {
        op::BIND_REQUEST => LdapOp::BindResponse(ldap3_proto::proto::LdapBindResponse {
            res: r,
            saslcreds: None,
        }),
        op::SEARCH_REQUEST => LdapOp::SearchResultDone(r),
        op::MODIFY_REQUEST => LdapOp::ModifyResponse(r),
        op::ADD_REQUEST => LdapOp::AddResponse(r),
        op::DEL_REQUEST => LdapOp::DelResponse(r),
        op::MODDN_REQUEST => LdapOp::ModifyDNResponse(r),
        op::COMPARE_REQUEST => LdapOp::CompareResult(r),
        op::ABANDON_REQUEST | op::UNBIND_REQUEST => return None,
        _ => LdapOp::ExtendedResponse(LdapExtendedResponse {
            res: r,
            name: None,
            value: None,
        }),
    };
    Some(encode(LdapMsg::new(msgid, op)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::envelope::Envelope;

    #[test]
    fn notice_of_disconnection_reads_back() {
        let b = notice_of_disconnection(LdapResultCode::ProtocolError, "bad PDU");
        let env = Envelope::response(&b).unwrap();
        assert_eq!(env.msgid, 0);
        assert_eq!(env.op, op::EXTENDED_RESPONSE);
        assert_eq!(env.result_code, Some(2));
        assert_eq!(env.oid_bytes(&b).unwrap(), oid::NOTICE_OF_DISCONNECTION);
    }

    #[test]
    fn responses_match_their_requests() {
        for (req, resp) in [
            (op::BIND_REQUEST, op::BIND_RESPONSE),
            (op::SEARCH_REQUEST, op::SEARCH_RESULT_DONE),
            (op::MODIFY_REQUEST, op::MODIFY_RESPONSE),
            (op::ADD_REQUEST, op::ADD_RESPONSE),
            (op::DEL_REQUEST, op::DEL_RESPONSE),
            (op::MODDN_REQUEST, op::MODDN_RESPONSE),
            (op::COMPARE_REQUEST, op::COMPARE_RESPONSE),
            (op::EXTENDED_REQUEST, op::EXTENDED_RESPONSE),
        ] {
            let b = response_for(req, 42, LdapResultCode::Busy, "busy").unwrap();
            let env = Envelope::response(&b).unwrap();
            assert_eq!((env.msgid, env.op, env.result_code), (42, resp, Some(51)));
        }
        assert!(response_for(op::ABANDON_REQUEST, 1, LdapResultCode::Success, "").is_none());
    }
}
