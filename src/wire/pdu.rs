//! PDUs the proxy writes itself (it never re-encodes a PDU it did not author):
//! extended responses, the Notice of Disconnection and plain result messages.
//! Built with `ldap3_proto`'s types, written from its BER tree
//! ([`encode`]); read back with its codec.

use bytes::{Bytes, BytesMut};
use ldap3_lber::structure::{StructureTag, PL};
use ldap3_proto::proto::{LdapExtendedResponse, LdapMsg, LdapOp, LdapResult, LdapResultCode};
use ldap3_proto::LdapCodec;

use super::ber;
use super::envelope::{oid, op};

/// Encodes one message: `ldap3_proto` turns it into its BER tree
/// (`StructureTag`), which is written here into one buffer of the exact
/// size, computed first. Why not `LdapCodec::encode`: its writer
/// (`ldap3_lber::write::encode_into`) encodes every constructed element
/// into a vector of its own, copies it into its parent's, and appends the
/// whole message to the buffer a byte at a time: about 2,700 instructions
/// of a 30-byte result, which a session answering refusals or Allow-Backup
/// requests pays per message. The bytes are the same (DER lengths, the
/// high-tag-number form): a test compares the two writers.
pub fn encode(msg: LdapMsg) -> Bytes {
    let tag: StructureTag = msg.into();
    let mut buf = Vec::with_capacity(tag_len(&tag));
    put_tag(&mut buf, &tag);
    Bytes::from(buf)
}

/// The length of an element's contents.
fn content_len(tag: &StructureTag) -> usize {
    match &tag.payload {
        PL::P(v) => v.len(),
        PL::C(inner) => inner.iter().map(tag_len).sum(),
    }
}

/// The bytes of a tag number past 30 (the high-tag-number form: seven
/// bits a byte, after the first byte's 0x1f).
fn high_tag_bytes(id: u64) -> usize {
    (64 - id.leading_zeros() as usize).div_ceil(7)
}

/// The length of a whole element: identifier, length, contents.
fn tag_len(tag: &StructureTag) -> usize {
    let high = if tag.id > 30 {
        high_tag_bytes(tag.id)
    } else {
        0
    };
    high + ber::tlv_len(content_len(tag))
}

/// Writes an element as `ldap3_lber` does (see [`encode`]).
fn put_tag(buf: &mut Vec<u8>, tag: &StructureTag) {
    let constructed = matches!(tag.payload, PL::C(_));
    let first = (tag.class as u8) << 6 | u8::from(constructed) << 5;
    if tag.id <= 30 {
        buf.push(first | tag.id as u8);
    } else {
        buf.push(first | 0x1f);
        for g in (0..high_tag_bytes(tag.id)).rev() {
            let more = if g > 0 { 0x80 } else { 0 };
            buf.push(((tag.id >> (7 * g)) & 0x7f) as u8 | more);
        }
    }
    ber::write_len(buf, content_len(tag));
    match &tag.payload {
        PL::P(v) => buf.extend_from_slice(v),
        PL::C(inner) => inner.iter().for_each(|t| put_tag(buf, t)),
    }
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

    /// [`encode`] writes the bytes `ldap3_proto`'s codec writes: every
    /// PDU the proxy authors, short and long lengths (a 127, 128, 255, 256
    /// and 70,000-byte message or value), message IDs of every size, and
    /// tags past 30 (the high-tag-number form), written both ways.
    #[test]
    fn the_writer_is_ldap3_protos() {
        use ldap3_lber::common::TagClass;
        use tokio_util::codec::Encoder;
        let theirs = |msg: LdapMsg| {
            let mut buf = BytesMut::new();
            LdapCodec::default().encode(msg, &mut buf).unwrap();
            buf.freeze()
        };
        let mut msgs = Vec::new();
        for msgid in [0, 1, 127, 128, 255, 256, 65_535, 1 << 24, i32::MAX] {
            for size in [0, 1, 100, 127, 128, 255, 256, 70_000] {
                let text = "m".repeat(size);
                for req in [op::BIND_REQUEST, op::SEARCH_REQUEST, op::EXTENDED_REQUEST] {
                    let r = response_for(req, msgid, LdapResultCode::Busy, &text).unwrap();
                    msgs.push(r);
                }
                msgs.push(extended_response(
                    msgid,
                    LdapResultCode::Success,
                    &text,
                    Some("1.3.6.1.4.1.4203.1.11.3"),
                    Some(text.clone().into_bytes()),
                ));
                msgs.push(base_search(msgid, &text, &["namingContexts", "*"]));
            }
        }
        msgs.push(notice_of_disconnection(
            LdapResultCode::ProtocolError,
            "bad",
        ));
        for (mine, msg) in msgs.iter().map(|m| (m, decode(m).unwrap())) {
            assert_eq!(mine, &theirs(msg));
        }
        for id in [
            0,
            30,
            31,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            for payload in [PL::P(vec![7; 3]), PL::C(vec![])] {
                let tag = StructureTag {
                    class: TagClass::Context,
                    id,
                    payload,
                };
                let mut want = BytesMut::new();
                ldap3_lber::write::encode_into(&mut want, tag.clone()).unwrap();
                let mut got = Vec::with_capacity(tag_len(&tag));
                put_tag(&mut got, &tag);
                assert_eq!(
                    (got.len(), &got[..]),
                    (tag_len(&tag), &want[..]),
                    "tag {id}"
                );
            }
        }
    }

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
