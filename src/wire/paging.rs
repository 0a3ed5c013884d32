//! Search state a server keeps for a connection between requests: the
//! cookie of simple paged results (RFC 2696) and the context of a virtual
//! list view (draft-ietf-ldapext-ldapv3-vlv-09). A session whose server
//! handed out either cannot be carried to a new connection: the new one
//! would not know the cookie, and the client's next page would fail.
//!
//! Read with the BER reader of `ber.rs` like the envelope: these are two
//! small fixed SEQUENCEs inside a control value, found only on searches
//! that carry controls.

use super::ber::Reader;
use super::envelope::Control;

/// Simple paged results control (RFC 2696).
pub const PAGED_RESULTS: &[u8] = b"1.2.840.113556.1.4.319";
/// Virtual list view request control.
pub const VLV_REQUEST: &[u8] = b"2.16.840.1.113730.3.4.9";
/// Virtual list view response control.
pub const VLV_RESPONSE: &[u8] = b"2.16.840.1.113730.3.4.10";

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const ENUMERATED: u8 = 0x0a;
const OCTET_STRING: u8 = 0x04;

/// The state a control names: the cookie or context a server handed out
/// (in a response) or that a client hands back (in a request). `None`
/// when the control is not one of these, names none (an empty cookie:
/// the last page) or cannot be read.
pub fn search_state<'a>(c: &Control<'a>, response: bool) -> Option<&'a [u8]> {
    let value = c.value?;
    let state = if c.oid == PAGED_RESULTS {
        paged_cookie(value)
    } else if c.oid == VLV_RESPONSE && response {
        vlv_response_context(value)
    } else if c.oid == VLV_REQUEST && !response {
        vlv_request_context(value)
    } else {
        None
    }?;
    (!state.is_empty()).then_some(state)
}

/// realSearchControlValue ::= SEQUENCE { size INTEGER, cookie OCTET STRING }
fn paged_cookie(value: &[u8]) -> Option<&[u8]> {
    let mut outer = Reader::new(value, 0, value.len());
    let seq = outer.expect(SEQUENCE, "SEQUENCE").ok()?;
    let mut r = Reader::inside(value, seq);
    r.expect(INTEGER, "size").ok()?;
    Some(r.expect(OCTET_STRING, "cookie").ok()?.value(value))
}

/// VirtualListViewResponse ::= SEQUENCE { targetPosition INTEGER,
/// contentCount INTEGER, virtualListViewResult ENUMERATED,
/// contextID OCTET STRING OPTIONAL }
fn vlv_response_context(value: &[u8]) -> Option<&[u8]> {
    let mut outer = Reader::new(value, 0, value.len());
    let seq = outer.expect(SEQUENCE, "SEQUENCE").ok()?;
    let mut r = Reader::inside(value, seq);
    r.expect(INTEGER, "targetPosition").ok()?;
    r.expect(INTEGER, "contentCount").ok()?;
    r.expect(ENUMERATED, "virtualListViewResult").ok()?;
    Some(r.optional(OCTET_STRING).ok()??.value(value))
}

/// VirtualListViewRequest ::= SEQUENCE { beforeCount INTEGER, afterCount
/// INTEGER, target CHOICE { byOffset [0] SEQUENCE, greaterThanOrEqual [1]
/// AssertionValue }, contextID OCTET STRING OPTIONAL }
fn vlv_request_context(value: &[u8]) -> Option<&[u8]> {
    let mut outer = Reader::new(value, 0, value.len());
    let seq = outer.expect(SEQUENCE, "SEQUENCE").ok()?;
    let mut r = Reader::inside(value, seq);
    r.expect(INTEGER, "beforeCount").ok()?;
    r.expect(INTEGER, "afterCount").ok()?;
    r.next_tlv().ok()?;
    Some(r.optional(OCTET_STRING).ok()??.value(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ber::tlv;

    fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(SEQUENCE, &parts.concat())
    }

    fn control<'a>(oid: &'a [u8], value: &'a [u8]) -> Control<'a> {
        Control {
            oid,
            critical: false,
            value: Some(value),
        }
    }

    #[test]
    fn a_paged_cookie_is_state_until_the_last_page_empties_it() {
        let v = seq(&[tlv(INTEGER, &[100]), tlv(OCTET_STRING, b"\x01\x02")]);
        let c = control(PAGED_RESULTS, &v);
        assert_eq!(search_state(&c, true), Some(&b"\x01\x02"[..]));
        assert_eq!(search_state(&c, false), Some(&b"\x01\x02"[..]));
        let last = seq(&[tlv(INTEGER, &[0]), tlv(OCTET_STRING, b"")]);
        assert_eq!(search_state(&control(PAGED_RESULTS, &last), true), None);
    }

    #[test]
    fn a_vlv_context_is_read_from_responses_and_requests() {
        let resp = seq(&[
            tlv(INTEGER, &[1]),
            tlv(INTEGER, &[50]),
            tlv(ENUMERATED, &[0]),
            tlv(OCTET_STRING, b"ctx"),
        ]);
        assert_eq!(
            search_state(&control(VLV_RESPONSE, &resp), true),
            Some(&b"ctx"[..])
        );
        // A response control is not read from a request, nor the reverse.
        assert_eq!(search_state(&control(VLV_RESPONSE, &resp), false), None);
        let no_ctx = seq(&[
            tlv(INTEGER, &[1]),
            tlv(INTEGER, &[50]),
            tlv(ENUMERATED, &[0]),
        ]);
        assert_eq!(search_state(&control(VLV_RESPONSE, &no_ctx), true), None);
        for target in [
            tlv(0xa0, &[tlv(INTEGER, &[1]), tlv(INTEGER, &[0])].concat()),
            tlv(0x81, b"m"),
        ] {
            let req = seq(&[
                tlv(INTEGER, &[0]),
                tlv(INTEGER, &[9]),
                target,
                tlv(OCTET_STRING, b"ctx"),
            ]);
            assert_eq!(
                search_state(&control(VLV_REQUEST, &req), false),
                Some(&b"ctx"[..])
            );
        }
    }

    #[test]
    fn unreadable_values_and_other_controls_name_no_state() {
        for v in [&b""[..], b"\x30", b"\x30\x03\x02\x01", b"\x04\x00"] {
            assert_eq!(search_state(&control(PAGED_RESULTS, v), true), None);
            assert_eq!(search_state(&control(VLV_RESPONSE, v), true), None);
            assert_eq!(search_state(&control(VLV_REQUEST, v), false), None);
        }
        let v = seq(&[tlv(INTEGER, &[1]), tlv(OCTET_STRING, b"x")]);
        assert_eq!(search_state(&control(b"1.2.3", &v), true), None);
        let none = Control {
            oid: PAGED_RESULTS,
            critical: false,
            value: None,
        };
        assert_eq!(search_state(&none, true), None);
    }
}
