//! The envelope peek: the few fields of an LDAPMessage the proxy needs
//! (message ID, operation, target DN, OIDs, result code, controls), read in
//! place from a framed message. Nothing is copied; string fields are kept as
//! offset ranges into the frame.
//!
//! Unknown operations are not an error: they are forwarded and the server
//! answers them. What is an error is a message whose envelope (the outer
//! SEQUENCE, the messageID, the operation TLV, the fields of a known request
//! the proxy must classify, or the controls) is not well-formed BER.

use std::ops::Range;

use thiserror::Error;

use super::ber::{decode_signed, decode_unsigned, read_header, BerError, Reader, Tlv};

/// Identifier octets of the LDAP protocolOp CHOICE (RFC 4511 section 4.2+).
pub mod op {
    /// BindRequest [APPLICATION 0]
    pub const BIND_REQUEST: u8 = 0x60;
    /// BindResponse [APPLICATION 1]
    pub const BIND_RESPONSE: u8 = 0x61;
    /// UnbindRequest [APPLICATION 2] NULL
    pub const UNBIND_REQUEST: u8 = 0x42;
    /// SearchRequest [APPLICATION 3]
    pub const SEARCH_REQUEST: u8 = 0x63;
    /// SearchResultEntry [APPLICATION 4]
    pub const SEARCH_RESULT_ENTRY: u8 = 0x64;
    /// SearchResultDone [APPLICATION 5]
    pub const SEARCH_RESULT_DONE: u8 = 0x65;
    /// ModifyRequest [APPLICATION 6]
    pub const MODIFY_REQUEST: u8 = 0x66;
    /// ModifyResponse [APPLICATION 7]
    pub const MODIFY_RESPONSE: u8 = 0x67;
    /// AddRequest [APPLICATION 8]
    pub const ADD_REQUEST: u8 = 0x68;
    /// AddResponse [APPLICATION 9]
    pub const ADD_RESPONSE: u8 = 0x69;
    /// DelRequest [APPLICATION 10] LDAPDN (primitive)
    pub const DEL_REQUEST: u8 = 0x4a;
    /// DelResponse [APPLICATION 11]
    pub const DEL_RESPONSE: u8 = 0x6b;
    /// ModifyDNRequest [APPLICATION 12]
    pub const MODDN_REQUEST: u8 = 0x6c;
    /// ModifyDNResponse [APPLICATION 13]
    pub const MODDN_RESPONSE: u8 = 0x6d;
    /// CompareRequest [APPLICATION 14]
    pub const COMPARE_REQUEST: u8 = 0x6e;
    /// CompareResponse [APPLICATION 15]
    pub const COMPARE_RESPONSE: u8 = 0x6f;
    /// AbandonRequest [APPLICATION 16] MessageID (primitive)
    pub const ABANDON_REQUEST: u8 = 0x50;
    /// SearchResultReference [APPLICATION 19]
    pub const SEARCH_RESULT_REFERENCE: u8 = 0x73;
    /// ExtendedRequest [APPLICATION 23]
    pub const EXTENDED_REQUEST: u8 = 0x77;
    /// ExtendedResponse [APPLICATION 24]
    pub const EXTENDED_RESPONSE: u8 = 0x78;
    /// IntermediateResponse [APPLICATION 25]
    pub const INTERMEDIATE_RESPONSE: u8 = 0x79;

    /// A short name for logs.
    pub fn name(tag: u8) -> &'static str {
        match tag {
            BIND_REQUEST => "bind",
            BIND_RESPONSE => "bindResponse",
            UNBIND_REQUEST => "unbind",
            SEARCH_REQUEST => "search",
            SEARCH_RESULT_ENTRY => "searchEntry",
            SEARCH_RESULT_DONE => "searchDone",
            MODIFY_REQUEST => "modify",
            MODIFY_RESPONSE => "modifyResponse",
            ADD_REQUEST => "add",
            ADD_RESPONSE => "addResponse",
            DEL_REQUEST => "delete",
            DEL_RESPONSE => "deleteResponse",
            MODDN_REQUEST => "modDN",
            MODDN_RESPONSE => "modDNResponse",
            COMPARE_REQUEST => "compare",
            COMPARE_RESPONSE => "compareResponse",
            ABANDON_REQUEST => "abandon",
            SEARCH_RESULT_REFERENCE => "searchReference",
            EXTENDED_REQUEST => "extended",
            EXTENDED_RESPONSE => "extendedResponse",
            INTERMEDIATE_RESPONSE => "intermediate",
            _ => "unknown",
        }
    }

    /// True for the requests an Abandon stops at the server: searches and
    /// compares. A write the server has started runs to its end, and a
    /// bind, StartTLS or another Abandon cannot be abandoned (RFC 4511
    /// section 4.11).
    pub fn abandon_stops(request: u8) -> bool {
        matches!(request, SEARCH_REQUEST | COMPARE_REQUEST)
    }

    /// True for responses that end their request (everything but search
    /// entries, references and intermediate responses).
    pub fn is_final_response(tag: u8) -> bool {
        matches!(
            tag,
            BIND_RESPONSE
                | SEARCH_RESULT_DONE
                | MODIFY_RESPONSE
                | ADD_RESPONSE
                | DEL_RESPONSE
                | MODDN_RESPONSE
                | COMPARE_RESPONSE
                | EXTENDED_RESPONSE
        )
    }
}

/// Bind authentication choice tags.
pub mod auth {
    /// simple [0] OCTET STRING
    pub const SIMPLE: u8 = 0x80;
    /// sasl [3] SaslCredentials
    pub const SASL: u8 = 0xa3;
}

/// Well-known OIDs the proxy looks for.
pub mod oid {
    /// StartTLS extended operation (RFC 4511 section 4.14).
    pub const START_TLS: &[u8] = b"1.3.6.1.4.1.1466.20037";
    /// Notice of Disconnection unsolicited notification (RFC 4511 section 4.4.1).
    pub const NOTICE_OF_DISCONNECTION: &[u8] = b"1.3.6.1.4.1.1466.20036";
    /// Cancel extended operation (RFC 3909).
    pub const CANCEL: &[u8] = b"1.3.6.1.1.8";
    /// Who am I? (RFC 4532)
    pub const WHOAMI: &[u8] = b"1.3.6.1.4.1.4203.1.11.3";
    /// Password modify (RFC 3062).
    pub const PASSWORD_MODIFY: &[u8] = b"1.3.6.1.4.1.4203.1.11.1";
    /// Content synchronization (syncrepl) request control (RFC 4533).
    pub const SYNC_REQUEST: &[u8] = b"1.3.6.1.4.1.4203.1.9.1.1";
    /// Persistent search control (draft-ietf-ldapext-psearch).
    pub const PERSISTENT_SEARCH: &[u8] = b"2.16.840.1.113730.3.4.3";
}

/// Why an envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    /// Malformed BER somewhere in the envelope.
    #[error("malformed LDAPMessage: {0}")]
    Ber(#[from] BerError),
    /// messageID outside 0..=2^31-1.
    #[error("messageID out of range 0..2147483647")]
    MessageIdRange,
    /// Bytes after the LDAPMessage SEQUENCE inside the frame.
    #[error("trailing bytes after the LDAPMessage")]
    Trailing,
}

/// A byte range inside the frame the envelope was read from.
pub type Span = Range<u32>;

/// Where a field of the envelope is in its frame, `start..end`; `0..0`
/// when the message has no such field (none starts at 0, where the
/// LDAPMessage header is). Eight bytes, where an `Option<Span>` takes
/// twelve: the envelope is built and moved once per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct At {
    start: u32,
    end: u32,
}

impl At {
    #[inline]
    fn of(t: Tlv) -> At {
        At {
            start: t.start as u32,
            end: t.end as u32,
        }
    }

    #[inline]
    fn opt(t: Option<Tlv>) -> At {
        t.map(At::of).unwrap_or_default()
    }

    #[inline]
    fn is_some(self) -> bool {
        self.end != 0
    }

    #[inline]
    fn span(self) -> Option<Span> {
        self.is_some().then_some(self.start..self.end)
    }

    #[inline]
    fn bytes(self, frame: &[u8]) -> Option<&[u8]> {
        self.is_some()
            .then(|| &frame[self.start as usize..self.end as usize])
    }
}

/// What the proxy knows about one LDAPMessage. The byte ranges of its
/// fields are read with the `*_span` and `*_bytes` methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// messageID.
    pub msgid: i32,
    /// Identifier octet of protocolOp (see [`op`]).
    pub op: u8,
    /// Bind authentication choice tag (see [`auth`]).
    pub bind_auth: Option<u8>,
    /// Search scope (0 base, 1 one, 2 sub, 3 children...).
    pub scope: Option<u32>,
    /// Abandoned message ID of an abandon request.
    pub abandon_id: Option<i32>,
    /// Result code of a final response.
    pub result_code: Option<i64>,
    /// Target DN: bind name, search base, modify/add/delete/modDN/compare
    /// entry; for a search result entry, its objectName.
    dn: At,
    /// modDN newSuperior.
    new_superior: At,
    /// SASL mechanism of a SASL bind.
    sasl_mechanism: At,
    /// Extended request name, or extended/intermediate response name.
    oid: At,
    /// Extended request/response value; a simple bind's password.
    value: At,
    /// The value of the `[0] Controls` element, if present.
    controls: At,
}

/// One control of a message (RFC 4511 section 4.1.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control<'a> {
    /// controlType.
    pub oid: &'a [u8],
    /// criticality (absent = FALSE).
    pub critical: bool,
    /// controlValue.
    pub value: Option<&'a [u8]>,
}

fn read_control<'a>(frame: &'a [u8], seq: Tlv) -> Result<Control<'a>, BerError> {
    let mut r = Reader::inside(frame, seq);
    let oid = r.expect(0x04, "controlType")?.value(frame);
    let critical = match r.optional(0x01)? {
        Some(b) => b.value(frame).first().is_some_and(|&v| v != 0),
        None => false,
    };
    let value = r.optional(0x04)?.map(|v| v.value(frame));
    Ok(Control {
        oid,
        critical,
        value,
    })
}

impl Envelope {
    /// Reads the envelope of a request (client to server).
    #[inline]
    pub fn request(frame: &[u8]) -> Result<Envelope, EnvelopeError> {
        Self::read(frame, true)
    }

    /// Reads the envelope of a response (server to client).
    #[inline]
    pub fn response(frame: &[u8]) -> Result<Envelope, EnvelopeError> {
        Self::read(frame, false)
    }

    /// The protocolOp tag of a framed message, past its messageID, without
    /// reading the rest: for search entries the proxy forwards untracked,
    /// most of a search's responses. `None` when the head does not read
    /// (the full [`Envelope::response`] then says why).
    #[inline]
    pub fn op_of(frame: &[u8]) -> Option<u8> {
        // Two headers, no `Reader`: the SEQUENCE must hold the whole
        // messageID and at least the operation's identifier octet.
        let msg = read_header(frame).ok()??;
        let end = msg.total_len();
        if msg.tag != 0x30 || end > frame.len() {
            return None;
        }
        let id = read_header(frame.get(msg.header_len..end)?).ok()??;
        if id.tag != 0x02 {
            return None;
        }
        let at = msg.header_len.checked_add(id.total_len())?;
        (at < end).then(|| frame[at])
    }

    #[inline(always)]
    fn read(frame: &[u8], request: bool) -> Result<Envelope, EnvelopeError> {
        let mut outer = Reader::new(frame, 0, frame.len());
        let msg = outer.expect(0x30, "LDAPMessage SEQUENCE")?;
        if !outer.is_empty() {
            return Err(EnvelopeError::Trailing);
        }
        let mut r = Reader::inside(frame, msg);
        let id = r.expect(0x02, "messageID INTEGER")?;
        let msgid = decode_unsigned(id.value(frame))?;
        if msgid > i32::MAX as u32 {
            return Err(EnvelopeError::MessageIdRange);
        }
        let body = r.next_tlv()?;
        let mut env = Envelope {
            msgid: msgid as i32,
            op: body.tag,
            ..Default::default()
        };
        if request {
            env.read_request(frame, body)?;
        } else {
            env.read_response(frame, body)?;
        }
        // Controls: like slapd, anything after the operation that is not
        // [0] Controls is ignored; controls themselves must be well formed.
        if let Some(ctrls) = r.optional(0xa0)? {
            let mut cr = Reader::inside(frame, ctrls);
            while !cr.is_empty() {
                let c = cr.expect(0x30, "Control SEQUENCE")?;
                read_control(frame, c)?;
            }
            env.controls = At::of(ctrls);
        }
        Ok(env)
    }

    #[inline]
    fn read_request(&mut self, frame: &[u8], body: Tlv) -> Result<(), BerError> {
        let mut r = Reader::inside(frame, body);
        match body.tag {
            op::BIND_REQUEST => {
                r.expect(0x02, "bind version")?;
                self.dn = At::of(r.expect(0x04, "bind name")?);
                let auth = r.next_tlv()?;
                self.bind_auth = Some(auth.tag);
                if auth.tag == auth::SIMPLE {
                    self.value = At::of(auth);
                }
                if auth.tag == auth::SASL {
                    let mut s = Reader::inside(frame, auth);
                    self.sasl_mechanism = At::of(s.expect(0x04, "SASL mechanism")?);
                }
            }
            op::SEARCH_REQUEST => {
                self.dn = At::of(r.expect(0x04, "search base")?);
                let scope = r.expect(0x0a, "search scope")?;
                self.scope = Some(decode_unsigned(scope.value(frame))?);
            }
            op::MODIFY_REQUEST | op::ADD_REQUEST | op::COMPARE_REQUEST => {
                self.dn = At::of(r.expect(0x04, "entry DN")?);
            }
            op::DEL_REQUEST => self.dn = At::of(body),
            op::MODDN_REQUEST => {
                self.dn = At::of(r.expect(0x04, "modDN entry")?);
                r.expect(0x04, "modDN newrdn")?;
                r.expect(0x01, "modDN deleteoldrdn")?;
                self.new_superior = At::opt(r.optional(0x80)?);
            }
            op::ABANDON_REQUEST => {
                let id = decode_unsigned(body.value(frame))?;
                self.abandon_id = Some(id.min(i32::MAX as u32) as i32);
            }
            op::EXTENDED_REQUEST => {
                self.oid = At::of(r.expect(0x80, "extended requestName")?);
                self.value = At::opt(r.optional(0x81)?);
            }
            _ => {}
        }
        Ok(())
    }

    #[inline]
    fn read_response(&mut self, frame: &[u8], body: Tlv) -> Result<(), BerError> {
        let mut r = Reader::inside(frame, body);
        match body.tag {
            op::BIND_RESPONSE
            | op::SEARCH_RESULT_DONE
            | op::MODIFY_RESPONSE
            | op::ADD_RESPONSE
            | op::DEL_RESPONSE
            | op::MODDN_RESPONSE
            | op::COMPARE_RESPONSE
            | op::EXTENDED_RESPONSE => {
                let code = r.expect(0x0a, "resultCode")?;
                self.result_code = Some(decode_signed(code.value(frame))?);
                self.dn = At::of(r.expect(0x04, "matchedDN")?);
                r.expect(0x04, "diagnosticMessage")?;
                if body.tag == op::EXTENDED_RESPONSE {
                    r.optional(0xa3)?; // referral
                    self.oid = At::opt(r.optional(0x8a)?);
                    self.value = At::opt(r.optional(0x8b)?);
                }
            }
            op::SEARCH_RESULT_ENTRY => {
                self.dn = At::of(r.expect(0x04, "objectName")?);
            }
            op::INTERMEDIATE_RESPONSE => {
                self.oid = At::opt(r.optional(0x80)?);
                self.value = At::opt(r.optional(0x81)?);
            }
            _ => {}
        }
        Ok(())
    }

    /// The octets of a span of this envelope's frame.
    #[inline]
    pub fn slice<'a>(frame: &'a [u8], s: &Span) -> &'a [u8] {
        &frame[s.start as usize..s.end as usize]
    }

    /// Where the target DN is in the frame.
    #[inline]
    pub fn dn_span(&self) -> Option<Span> {
        self.dn.span()
    }

    /// Where the extended request/response value (a simple bind's
    /// password) is in the frame.
    #[inline]
    pub fn value_span(&self) -> Option<Span> {
        self.value.span()
    }

    /// The message carries controls.
    #[inline]
    pub fn has_controls(&self) -> bool {
        self.controls.is_some()
    }

    /// Target DN octets.
    pub fn dn_bytes<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        self.dn.bytes(frame)
    }

    /// modDN newSuperior octets.
    pub fn new_superior_bytes<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        self.new_superior.bytes(frame)
    }

    /// Extended request/response name octets.
    pub fn oid_bytes<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        self.oid.bytes(frame)
    }

    /// Extended request/response value octets.
    pub fn value_bytes<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        self.value.bytes(frame)
    }

    /// A simple bind with an empty password: unauthenticated (anonymous,
    /// or RFC 4513 section 5.1.2's unauthenticated bind with a name).
    pub fn empty_simple_password(&self) -> bool {
        self.bind_auth == Some(auth::SIMPLE)
            && self.value.is_some()
            && self.value.start == self.value.end
    }

    /// SASL mechanism octets.
    pub fn sasl_mechanism_bytes<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        self.sasl_mechanism.bytes(frame)
    }

    /// The message's controls (validated when the envelope was read).
    pub fn controls<'a>(&self, frame: &'a [u8]) -> impl Iterator<Item = Control<'a>> + 'a {
        let s = self.controls;
        let mut r = s
            .is_some()
            .then(|| Reader::new(frame, s.start as usize, s.end as usize));
        std::iter::from_fn(move || {
            let r = r.as_mut()?;
            let c = r.next_tlv().ok()?;
            read_control(frame, c).ok()
        })
    }

    /// True if the message carries a control with this OID.
    #[inline]
    pub fn has_control(&self, frame: &[u8], oid: &[u8]) -> bool {
        // Most messages carry no controls: no call, no iterator for them.
        self.controls.is_some() && self.find_control(frame, oid)
    }

    fn find_control(&self, frame: &[u8], oid: &[u8]) -> bool {
        self.controls(frame).any(|c| c.oid == oid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ber::tlv;

    fn msg(id: &[u8], body: &[u8], controls: Option<&[u8]>) -> Vec<u8> {
        let mut inner = tlv(0x02, id);
        inner.extend_from_slice(body);
        if let Some(c) = controls {
            inner.extend(tlv(0xa0, c));
        }
        tlv(0x30, &inner)
    }

    #[test]
    fn op_of_reads_the_tag_of_whole_messages_only() {
        let entry = msg(
            &[5],
            &tlv(op::SEARCH_RESULT_ENTRY, &tlv(0x04, b"cn=a")),
            None,
        );
        assert_eq!(Envelope::op_of(&entry), Some(op::SEARCH_RESULT_ENTRY));
        let long_id = msg(&[0, 0x80, 0, 0], &tlv(op::SEARCH_RESULT_DONE, &[]), None);
        assert_eq!(Envelope::op_of(&long_id), Some(op::SEARCH_RESULT_DONE));
        // Truncated, wrong outer tag, messageID not an INTEGER, no operation.
        assert_eq!(Envelope::op_of(&entry[..entry.len() - 1]), None);
        let mut not_seq = entry.clone();
        not_seq[0] = 0x31;
        assert_eq!(Envelope::op_of(&not_seq), None);
        assert_eq!(Envelope::op_of(&tlv(0x30, &tlv(0x04, &[1]))), None);
        assert_eq!(Envelope::op_of(&tlv(0x30, &tlv(0x02, &[1]))), None);
        assert_eq!(Envelope::op_of(&[]), None);
    }

    fn search(base: &str, scope: u8) -> Vec<u8> {
        let mut b = tlv(0x04, base.as_bytes());
        b.extend(tlv(0x0a, &[scope]));
        b.extend(tlv(0x0a, &[0])); // derefAliases
        b.extend(tlv(0x02, &[0])); // sizeLimit
        b.extend(tlv(0x02, &[0])); // timeLimit
        b.extend(tlv(0x01, &[0])); // typesOnly
        b.extend(tlv(0x87, b"objectClass")); // present filter
        b.extend(tlv(0x30, &[])); // attributes
        tlv(op::SEARCH_REQUEST, &b)
    }

    #[test]
    fn search_request_with_controls() {
        let mut ctrl = tlv(0x04, b"1.2.840.113556.1.4.319");
        ctrl.extend(tlv(0x01, &[0xff]));
        ctrl.extend(tlv(0x04, &[0x30, 0x05, 0x02, 0x01, 0x0a, 0x04, 0x00]));
        let mut ctrl2 = tlv(0x04, b"1.3.6.1.4.1.4203.1.9.1.1");
        ctrl2.extend(tlv(0x04, &[0x30, 0x00]));
        let mut ctrls = tlv(0x30, &ctrl);
        ctrls.extend(tlv(0x30, &ctrl2));
        let frame = msg(&[0x07], &search("dc=example,dc=org", 2), Some(&ctrls));
        let env = Envelope::request(&frame).unwrap();
        assert_eq!(env.msgid, 7);
        assert_eq!(env.op, op::SEARCH_REQUEST);
        assert_eq!(env.dn_bytes(&frame).unwrap(), b"dc=example,dc=org");
        assert_eq!(env.scope, Some(2));
        let cs: Vec<_> = env.controls(&frame).collect();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].oid, b"1.2.840.113556.1.4.319");
        assert!(cs[0].critical);
        assert!(!cs[1].critical);
        assert!(env.has_control(&frame, oid::SYNC_REQUEST));
        assert!(!env.has_control(&frame, oid::PERSISTENT_SEARCH));
    }

    #[test]
    fn moddn_with_new_superior_and_delete() {
        let mut b = tlv(0x04, b"uid=a,ou=people,dc=example,dc=org");
        b.extend(tlv(0x04, b"uid=b"));
        b.extend(tlv(0x01, &[0xff]));
        b.extend(tlv(0x80, b"ou=groups,dc=other,dc=org"));
        let frame = msg(&[0x02], &tlv(op::MODDN_REQUEST, &b), None);
        let env = Envelope::request(&frame).unwrap();
        assert_eq!(env.op, op::MODDN_REQUEST);
        assert_eq!(
            env.dn_bytes(&frame).unwrap(),
            b"uid=a,ou=people,dc=example,dc=org"
        );
        assert_eq!(
            env.new_superior_bytes(&frame).unwrap(),
            b"ou=groups,dc=other,dc=org"
        );

        let frame = msg(
            &[0x03],
            &tlv(op::DEL_REQUEST, b"cn=x,dc=other,dc=org"),
            None,
        );
        let env = Envelope::request(&frame).unwrap();
        assert_eq!(env.dn_bytes(&frame).unwrap(), b"cn=x,dc=other,dc=org");
    }

    #[test]
    fn bind_extended_abandon() {
        let mut b = tlv(0x02, &[3]);
        b.extend(tlv(0x04, b"cn=admin,dc=example,dc=org"));
        b.extend(tlv(0xa3, &tlv(0x04, b"EXTERNAL")));
        let frame = msg(&[0x01], &tlv(op::BIND_REQUEST, &b), None);
        let env = Envelope::request(&frame).unwrap();
        assert_eq!(env.bind_auth, Some(auth::SASL));
        assert_eq!(env.sasl_mechanism_bytes(&frame).unwrap(), b"EXTERNAL");

        let mut b = tlv(0x80, oid::START_TLS);
        b.extend(tlv(0x81, b"v"));
        let frame = msg(&[0x00, 0x80], &tlv(op::EXTENDED_REQUEST, &b), None);
        let env = Envelope::request(&frame).unwrap();
        assert_eq!(env.msgid, 128);
        assert_eq!(env.oid_bytes(&frame).unwrap(), oid::START_TLS);
        assert_eq!(env.value_bytes(&frame).unwrap(), b"v");

        let frame = msg(&[0x09], &tlv(op::ABANDON_REQUEST, &[0x05]), None);
        assert_eq!(Envelope::request(&frame).unwrap().abandon_id, Some(5));
    }

    #[test]
    fn responses() {
        let mut b = tlv(0x0a, &[0x31]);
        b.extend(tlv(0x04, b""));
        b.extend(tlv(0x04, b"bad"));
        let frame = msg(&[0x01], &tlv(op::BIND_RESPONSE, &b), None);
        let env = Envelope::response(&frame).unwrap();
        assert_eq!(env.result_code, Some(49));
        assert!(op::is_final_response(env.op));

        let mut b = tlv(0x0a, &[0x34]);
        b.extend(tlv(0x04, b""));
        b.extend(tlv(0x04, b""));
        b.extend(tlv(0x8a, oid::NOTICE_OF_DISCONNECTION));
        let frame = msg(&[0x00], &tlv(op::EXTENDED_RESPONSE, &b), None);
        let env = Envelope::response(&frame).unwrap();
        assert_eq!(env.msgid, 0);
        assert_eq!(env.result_code, Some(52));
        assert_eq!(env.oid_bytes(&frame).unwrap(), oid::NOTICE_OF_DISCONNECTION);

        let mut b = tlv(0x04, b"uid=a,dc=x");
        b.extend(tlv(0x30, &[]));
        let frame = msg(&[0x02], &tlv(op::SEARCH_RESULT_ENTRY, &b), None);
        let env = Envelope::response(&frame).unwrap();
        assert!(!op::is_final_response(env.op));
        assert_eq!(env.dn_bytes(&frame).unwrap(), b"uid=a,dc=x");
    }

    #[test]
    fn an_envelope_is_small() {
        // Built and moved once per message on the hot path.
        assert!(std::mem::size_of::<Envelope>() <= 88);
    }

    #[test]
    fn absent_and_empty_fields() {
        // An anonymous simple bind: an empty name and an empty password,
        // both present.
        let mut b = tlv(0x02, &[3]);
        b.extend(tlv(0x04, b""));
        b.extend(tlv(auth::SIMPLE, b""));
        let frame = msg(&[0x01], &tlv(op::BIND_REQUEST, &b), None);
        let env = Envelope::request(&frame).unwrap();
        assert_eq!(env.dn_bytes(&frame), Some(&b""[..]));
        assert!(env.dn_span().is_some());
        assert!(env.empty_simple_password());
        assert_eq!(env.oid_bytes(&frame), None);
        assert!(!env.has_controls());
        assert_eq!(env.controls(&frame).count(), 0);
    }

    #[test]
    fn unknown_operations_pass() {
        let frame = msg(&[0x04], &tlv(0x7e, &[]), None);
        assert_eq!(Envelope::request(&frame).unwrap().op, 0x7e);
    }

    #[test]
    fn malformed_envelopes() {
        // messageID over 2^31-1
        let frame = msg(&[0x00, 0x80, 0, 0, 0], &tlv(op::UNBIND_REQUEST, &[]), None);
        assert_eq!(
            Envelope::request(&frame),
            Err(EnvelopeError::MessageIdRange)
        );
        // negative messageID
        let frame = msg(&[0xff], &tlv(op::UNBIND_REQUEST, &[]), None);
        assert!(Envelope::request(&frame).is_err());
        // search base that is not an OCTET STRING
        let frame = msg(&[0x01], &tlv(op::SEARCH_REQUEST, &tlv(0x02, &[0])), None);
        assert!(matches!(
            Envelope::request(&frame),
            Err(EnvelopeError::Ber(BerError::UnexpectedTag { .. }))
        ));
        // no protocolOp
        let frame = tlv(0x30, &tlv(0x02, &[1]));
        assert!(Envelope::request(&frame).is_err());
        // a control that is not a SEQUENCE
        let frame = msg(
            &[0x01],
            &tlv(op::UNBIND_REQUEST, &[]),
            Some(&tlv(0x04, b"x")),
        );
        assert!(Envelope::request(&frame).is_err());
        // an inner length running past the message
        let mut frame = msg(&[0x01], &tlv(op::DEL_REQUEST, b"dc=x"), None);
        frame[6] = 0x7f;
        assert!(Envelope::request(&frame).is_err());
        // trailing bytes after the message inside the frame
        let mut frame = msg(&[0x01], &tlv(op::UNBIND_REQUEST, &[]), None);
        frame.push(0);
        assert_eq!(Envelope::request(&frame), Err(EnvelopeError::Trailing));
    }
}
