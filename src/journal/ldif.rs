//! A journaled write as an LDIF change record (RFC 2849) that `ldapmodify`
//! takes, for `abproxy journal show --ldif`.
//!
//! The journal keeps the client's own LDAPMessage and the server's final
//! response. Add, delete, modify (RFC 4525 increment included) and modify DN
//! requests map one to one onto change records. The operation is decoded with
//! `ldap3_proto`; the controls are read from the request's own bytes with the
//! proxy's envelope reader, since `ldap3_proto` decodes some controls into
//! typed forms that drop or rewrite parts of them (a value, the criticality),
//! and a control is only printed as it was sent (at most one per record:
//! ldapmodify reads no more). Only the four write operations reach
//! `ldap3_proto`'s decoder, which prints unknown operations to stdout. A
//! password modify extended
//! operation (RFC 3062) is written as a `userPassword` replace holding an
//! `{SSHA}` hash of the new password, so the cleartext never reaches the
//! server's storage; any other extended operation has no LDIF form.
//!
//! Values and DNs that are not RFC 2849 SAFE-STRINGs are written in base64,
//! so every line is ASCII but the password modify's comment, which names the
//! DN as it is; lines fold at 76 columns
//! ([`write_line`](crate::backup::ldif::write_line)).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::BytesMut;
use ldap3_proto::proto::{LdapModifyType, LdapMsg, LdapOp, LdapPartialAttribute};
use ldap3_proto::LdapCodec;
use sha1::{Digest as _, Sha1};
use tokio_util::codec::Decoder as _;

use crate::backup::ldif::{needs_base64, write_line};
use crate::wire::ber::{write_len, Reader};
use crate::wire::envelope::{oid, op, Envelope};

/// Why a journaled request has no LDIF form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLdif {
    /// An extended operation LDIF cannot express (only `journal replay` can run it).
    #[error("extended operation {0}: LDIF cannot express it (journal replay runs it)")]
    Extended(String),
    /// The request is not an LDAP write request (or not decodable).
    #[error("not a write request LDIF can express: {0}")]
    Unreadable(String),
}

fn unreadable(why: impl Into<String>) -> NotLdif {
    NotLdif::Unreadable(why.into())
}

/// Line width LDIF lines fold at (as the backup's writer does).
const WIDTH: usize = 76;

/// Length of the `{SSHA}` salt.
const SALT_LEN: usize = 8;

/// The LDIF change record (RFC 2849 `ldif-change-record`, ending in an empty line)
/// of a journaled write request: `request` is the client's LDAPMessage, `response`
/// the server's final response to it (None when unknown), `bound_dn` the session's
/// identity when the request was sent ("" for anonymous).
pub fn change_record(
    request: &[u8],
    response: Option<&[u8]>,
    bound_dn: &str,
) -> Result<String, NotLdif> {
    let env = Envelope::request(request).map_err(|e| unreadable(e.to_string()))?;
    let controls = controls(&env, request)?;
    let mut out = Vec::new();
    match env.op {
        op::ADD_REQUEST | op::DEL_REQUEST | op::MODIFY_REQUEST | op::MODDN_REQUEST => {
            let msg = decode_op(request)?;
            record(&mut out, &msg.op, &env, request, &controls)?;
        }
        op::EXTENDED_REQUEST => {
            let name = env.oid_bytes(request).unwrap_or_default();
            if name != oid::PASSWORD_MODIFY {
                return Err(NotLdif::Extended(
                    String::from_utf8_lossy(name).into_owned(),
                ));
            }
            password_modify(&mut out, &env, request, response, bound_dn, &controls)?;
        }
        other => {
            return Err(unreadable(format!(
                "a {} request (0x{other:02x}) is not a write",
                op::name(other)
            )))
        }
    }
    // Everything written is ASCII but a comment's DN, which is a `String`.
    String::from_utf8(out).map_err(|_| unreadable("the record is not UTF-8"))
}

/// The request's control as `control:` line contents (without the name):
/// none or one.
fn controls(env: &Envelope, request: &[u8]) -> Result<Vec<Vec<u8>>, NotLdif> {
    let mut lines = Vec::new();
    for c in env.controls(request) {
        // ldapmodify reads the OID as digits and dots up to a space.
        if c.oid.is_empty() || !c.oid.iter().all(|&b| b.is_ascii_digit() || b == b'.') {
            return Err(unreadable(format!(
                "control type {:?} is not a numeric OID",
                String::from_utf8_lossy(c.oid)
            )));
        }
        let mut line = c.oid.to_vec();
        // The criticality is always written: ldapmodify wants a space after
        // the OID before a value.
        line.extend_from_slice(if c.critical { b" true" } else { b" false" });
        match c.value {
            None => {}
            Some(v) if needs_base64(v) => {
                line.extend_from_slice(b":: ");
                line.extend_from_slice(STANDARD.encode(v).as_bytes());
            }
            Some([]) => line.push(b':'),
            Some(v) => {
                line.extend_from_slice(b": ");
                line.extend_from_slice(v);
            }
        }
        lines.push(line);
    }
    // RFC 2849 allows any number of `control:` lines, but ldapmodify (its
    // ldifutil.c) reads only the first and then fails the record.
    if lines.len() > 1 {
        return Err(unreadable(format!(
            "{} controls: ldapmodify reads one `control:` line per record",
            lines.len()
        )));
    }
    Ok(lines)
}

/// Decodes the messageID and protocolOp of `request` with `ldap3_proto`,
/// leaving the controls out (they are read from the bytes, see the module
/// documentation). The envelope was read, so the outer SEQUENCE is sound.
fn decode_op(request: &[u8]) -> Result<LdapMsg, NotLdif> {
    let mut outer = Reader::new(request, 0, request.len());
    let seq = outer
        .expect(0x30, "LDAPMessage SEQUENCE")
        .map_err(|e| unreadable(e.to_string()))?;
    let mut r = Reader::inside(request, seq);
    r.next_tlv().map_err(|e| unreadable(e.to_string()))?;
    let body = r.next_tlv().map_err(|e| unreadable(e.to_string()))?;
    let inner = &request[seq.start..body.end];
    let mut msg = Vec::with_capacity(inner.len() + 6);
    msg.push(0x30);
    write_len(&mut msg, inner.len());
    msg.extend_from_slice(inner);

    let mut buf = BytesMut::from(&msg[..]);
    // The default codec refuses messages over 32 KiB; a journaled add may be
    // larger (photos, certificates).
    let max = msg.len().max(ldap3_proto::DEFAULT_MAX_BER_SIZE);
    match LdapCodec::new(Some(max), None).decode(&mut buf) {
        Ok(Some(m)) if buf.is_empty() => Ok(m),
        Ok(Some(_)) => Err(unreadable("trailing bytes after the operation")),
        Ok(None) => Err(unreadable("the message is truncated")),
        Err(e) => Err(unreadable(format!("the operation does not decode: {e}"))),
    }
}

/// An attribute description ldapmodify reads back as written: a name or
/// numeric OID, then `;options` (RFC 2849 AttributeDescription).
fn check_attr(name: &str) -> Result<(), NotLdif> {
    let ok = name.split(';').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    }) && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(unreadable(format!("attribute description {name:?}")))
    }
}

fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    // Writing to a Vec does not fail.
    let _ = write_line(out, name, value);
}

/// Writes `text` as is, folded at [`WIDTH`] columns on character boundaries.
fn folded(out: &mut Vec<u8>, text: &str) {
    let mut rest = text;
    let mut width = WIDTH;
    let mut first = true;
    loop {
        let mut cut = rest.len().min(width);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(&rest.as_bytes()[..cut]);
        out.push(b'\n');
        rest = &rest[cut..];
        if rest.is_empty() {
            break;
        }
        first = false;
        width = WIDTH - 1;
    }
}

/// `dn:` and the `control:` lines.
fn head(out: &mut Vec<u8>, dn: &str, controls: &[Vec<u8>]) {
    line(out, "dn", dn.as_bytes());
    for c in controls {
        let mut text = b"control: ".to_vec();
        text.extend_from_slice(c);
        // ASCII (numeric OID, true/false, base64 or a safe ASCII value).
        folded(out, &String::from_utf8_lossy(&text));
    }
}

fn values(out: &mut Vec<u8>, attr: &LdapPartialAttribute) -> Result<(), NotLdif> {
    check_attr(&attr.atype)?;
    for v in &attr.vals {
        line(out, &attr.atype, v);
    }
    Ok(())
}

fn record(
    out: &mut Vec<u8>,
    operation: &LdapOp,
    env: &Envelope,
    request: &[u8],
    controls: &[Vec<u8>],
) -> Result<(), NotLdif> {
    match operation {
        LdapOp::AddRequest(add) => {
            head(out, &add.dn, controls);
            line(out, "changetype", b"add");
            for a in &add.attributes {
                values(out, a)?;
            }
        }
        LdapOp::DelRequest(dn) => {
            head(out, dn, controls);
            line(out, "changetype", b"delete");
        }
        LdapOp::ModifyRequest(m) => {
            head(out, &m.dn, controls);
            line(out, "changetype", b"modify");
            for change in &m.changes {
                let kind = match change.operation {
                    LdapModifyType::Add => "add",
                    LdapModifyType::Delete => "delete",
                    LdapModifyType::Replace => "replace",
                    LdapModifyType::Increment => "increment",
                };
                check_attr(&change.modification.atype)?;
                line(out, kind, change.modification.atype.as_bytes());
                values(out, &change.modification)?;
                out.extend_from_slice(b"-\n");
            }
        }
        LdapOp::ModifyDNRequest(m) => {
            // ldap3_proto reads a newSuperior that is not UTF-8 as none: the
            // envelope says whether one was sent.
            let sent = env.new_superior_bytes(request);
            if sent != m.new_superior.as_deref().map(str::as_bytes) {
                return Err(unreadable("the newSuperior does not decode"));
            }
            head(out, &m.dn, controls);
            line(out, "changetype", b"modrdn");
            line(out, "newrdn", m.newrdn.as_bytes());
            line(
                out,
                "deleteoldrdn",
                if m.deleteoldrdn { b"1" } else { b"0" },
            );
            if let Some(sup) = &m.new_superior {
                line(out, "newsuperior", sup.as_bytes());
            }
        }
        _ => return Err(unreadable("not a write request")),
    }
    out.push(b'\n');
    Ok(())
}

/// The fields of an RFC 3062 PasswdModifyRequestValue, as sent.
#[derive(Default)]
struct PasswdModify<'a> {
    user_identity: Option<&'a [u8]>,
    new_passwd: Option<&'a [u8]>,
}

fn passwd_request(value: Option<&[u8]>) -> Result<PasswdModify<'_>, NotLdif> {
    let bad = |e: crate::wire::ber::BerError| unreadable(format!("password modify request: {e}"));
    let Some(v) = value else {
        // No value: the bound user's password, generated by the server.
        return Ok(PasswdModify::default());
    };
    let mut outer = Reader::new(v, 0, v.len());
    let seq = outer
        .expect(0x30, "PasswdModifyRequestValue")
        .map_err(bad)?;
    if !outer.is_empty() {
        return Err(unreadable("password modify request: trailing bytes"));
    }
    let mut r = Reader::inside(v, seq);
    let user_identity = r.optional(0x80).map_err(bad)?.map(|t| t.value(v));
    r.optional(0x81).map_err(bad)?; // oldPasswd: a replace does not check it
    let new_passwd = r.optional(0x82).map_err(bad)?.map(|t| t.value(v));
    if !r.is_empty() {
        return Err(unreadable(
            "password modify request: unexpected field after newPasswd",
        ));
    }
    Ok(PasswdModify {
        user_identity,
        new_passwd,
    })
}

/// genPasswd of an RFC 3062 response, if the response is one and has it.
fn generated_password(request: &Envelope, response: &[u8]) -> Result<Vec<u8>, NotLdif> {
    let env = Envelope::response(response)
        .map_err(|e| unreadable(format!("password modify response: {e}")))?;
    if env.op != op::EXTENDED_RESPONSE || env.msgid != request.msgid {
        return Err(unreadable(
            "the response is not the password modify's extended response",
        ));
    }
    let bad = |e: crate::wire::ber::BerError| unreadable(format!("password modify response: {e}"));
    let v = env.value_bytes(response).unwrap_or_default();
    if v.is_empty() {
        return Err(unreadable(
            "no new password: the request has none and the response no genPasswd",
        ));
    }
    let mut outer = Reader::new(v, 0, v.len());
    let seq = outer
        .expect(0x30, "PasswdModifyResponseValue")
        .map_err(bad)?;
    let mut r = Reader::inside(v, seq);
    match r.optional(0x80).map_err(bad)? {
        Some(t) if t.start < t.end => Ok(t.value(v).to_vec()),
        _ => Err(unreadable(
            "no new password: the request has none and the response no genPasswd",
        )),
    }
}

/// `{SSHA}` of `password` (RFC 2307 style): base64 of SHA-1(password || salt)
/// followed by the salt.
fn ssha(password: &[u8]) -> Result<String, NotLdif> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut salt)
        .map_err(|e| unreadable(format!("no random salt for the hash: {e}")))?;
    let mut h = Sha1::new();
    h.update(password);
    h.update(salt);
    let mut raw = h.finalize().to_vec();
    raw.extend_from_slice(&salt);
    Ok(format!("{{SSHA}}{}", STANDARD.encode(raw)))
}

fn password_modify(
    out: &mut Vec<u8>,
    env: &Envelope,
    request: &[u8],
    response: Option<&[u8]>,
    bound_dn: &str,
    controls: &[Vec<u8>],
) -> Result<(), NotLdif> {
    let req = passwd_request(env.value_bytes(request))?;
    let dn = match req.user_identity {
        Some(id) => {
            let id = std::str::from_utf8(id)
                .map_err(|_| unreadable("password modify: userIdentity is not UTF-8"))?;
            // A DN has `=` and no `:` before it; an authzId (`u:name`,
            // `dn:...`) names its user in a form LDIF has no target for.
            match id.find('=') {
                Some(eq) if !id[..eq].contains(':') => id,
                _ => {
                    return Err(unreadable(format!(
                        "password modify of {id:?}, which is not a DN"
                    )))
                }
            }
        }
        None if bound_dn.is_empty() => {
            return Err(unreadable(
                "password modify of the session's own entry, but the session was anonymous",
            ))
        }
        None => bound_dn,
    };
    let password = match req.new_passwd {
        Some(p) if !p.is_empty() => p.to_vec(),
        // An empty or absent newPasswd asks the server to generate one.
        _ => match response {
            Some(r) => generated_password(env, r)?,
            None => {
                return Err(unreadable(
                    "no new password: the request has none and the response is unknown",
                ))
            }
        },
    };
    let hash = ssha(&password)?;
    // The DN as it is, but for control characters (a line end would end the
    // comment).
    let printable: String = dn
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    folded(
        out,
        &format!(
            "# password modify (RFC 3062) of {printable}, as a userPassword replace with an {{SSHA}} hash"
        ),
    );
    head(out, dn, controls);
    line(out, "changetype", b"modify");
    line(out, "replace", b"userPassword");
    line(out, "userPassword", hash.as_bytes());
    out.extend_from_slice(b"-\n\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pdu::encode;
    use ldap3_proto::control::LdapControl;
    use ldap3_proto::proto::{
        LdapAddRequest, LdapDerefAliases, LdapExtendedRequest, LdapExtendedResponse, LdapFilter,
        LdapModify, LdapModifyDNRequest, LdapModifyRequest, LdapPasswordModifyRequest,
        LdapPasswordModifyResponse, LdapResult, LdapResultCode, LdapSearchRequest, LdapSearchScope,
    };

    fn attr(name: &str, vals: &[&[u8]]) -> LdapPartialAttribute {
        LdapPartialAttribute {
            atype: name.into(),
            vals: vals.iter().map(|v| v.to_vec()).collect(),
        }
    }

    fn ldif(op: LdapOp) -> Result<String, NotLdif> {
        change_record(&encode(LdapMsg::new(7, op)), None, "")
    }

    #[test]
    fn add_with_several_values_a_binary_one_and_folding() {
        let long = "x".repeat(100);
        let text = ldif(LdapOp::AddRequest(LdapAddRequest {
            dn: "cn=Jürgen,dc=example,dc=org".into(),
            attributes: vec![
                attr("objectClass", &[b"top", b"person"]),
                attr("cn", &[b"J\xc3\xbcrgen", b" lead"]),
                attr("sn", &[b"M"]),
                attr("jpegPhoto;binary", &[b"\xff\xd8\x00\x01"]),
                attr("description", &[long.as_bytes()]),
            ],
        }))
        .unwrap();
        let want = format!(
            "dn:: Y249SsO8cmdlbixkYz1leGFtcGxlLGRjPW9yZw==\n\
             changetype: add\n\
             objectClass: top\n\
             objectClass: person\n\
             cn:: SsO8cmdlbg==\n\
             cn:: IGxlYWQ=\n\
             sn: M\n\
             jpegPhoto;binary:: /9gAAQ==\n\
             description: {}\n {}\n\n",
            &long[..76 - "description: ".len()],
            &long[76 - "description: ".len()..],
        );
        assert_eq!(text, want);
    }

    #[test]
    fn add_larger_than_the_default_codec_limit() {
        let photo = vec![0xffu8; 40 << 10];
        let text = ldif(LdapOp::AddRequest(LdapAddRequest {
            dn: "cn=big,dc=example,dc=org".into(),
            attributes: vec![attr("jpegPhoto", &[&photo])],
        }))
        .unwrap();
        let entry = &crate::backup::ldif::read(&text.replace("changetype: add\n", "")).unwrap()[0];
        assert_eq!(entry.attrs, vec![("jpegPhoto".to_string(), vec![photo])]);
    }

    #[test]
    fn delete() {
        let text = ldif(LdapOp::DelRequest("cn=old,dc=example,dc=org".into())).unwrap();
        assert_eq!(text, "dn: cn=old,dc=example,dc=org\nchangetype: delete\n\n");
    }

    #[test]
    fn modify_add_delete_replace_increment() {
        let change = |operation, a| LdapModify {
            operation,
            modification: a,
        };
        let text = ldif(LdapOp::ModifyRequest(LdapModifyRequest {
            dn: "uid=u1,ou=people,dc=example,dc=org".into(),
            changes: vec![
                change(LdapModifyType::Add, attr("mail", &[b"a@x", b"b@x"])),
                change(LdapModifyType::Delete, attr("description", &[])),
                change(LdapModifyType::Delete, attr("telephoneNumber", &[b"1"])),
                change(LdapModifyType::Replace, attr("sn", &[b"New"])),
                change(LdapModifyType::Replace, attr("title", &[])),
                change(LdapModifyType::Increment, attr("uidNumber", &[b"1"])),
            ],
        }))
        .unwrap();
        assert_eq!(
            text,
            "dn: uid=u1,ou=people,dc=example,dc=org\n\
             changetype: modify\n\
             add: mail\nmail: a@x\nmail: b@x\n-\n\
             delete: description\n-\n\
             delete: telephoneNumber\ntelephoneNumber: 1\n-\n\
             replace: sn\nsn: New\n-\n\
             replace: title\n-\n\
             increment: uidNumber\nuidNumber: 1\n-\n\n"
        );
    }

    #[test]
    fn modrdn_with_and_without_newsuperior() {
        let moddn = |new_superior: Option<&str>| {
            ldif(LdapOp::ModifyDNRequest(LdapModifyDNRequest {
                dn: "cn=a,ou=x,dc=example,dc=org".into(),
                newrdn: "cn=b".into(),
                deleteoldrdn: new_superior.is_none(),
                new_superior: new_superior.map(str::to_string),
            }))
            .unwrap()
        };
        assert_eq!(
            moddn(None),
            "dn: cn=a,ou=x,dc=example,dc=org\nchangetype: modrdn\nnewrdn: cn=b\n\
             deleteoldrdn: 1\n\n"
        );
        assert_eq!(
            moddn(Some("ou=y,dc=example,dc=org")),
            "dn: cn=a,ou=x,dc=example,dc=org\nchangetype: modrdn\nnewrdn: cn=b\n\
             deleteoldrdn: 0\nnewsuperior: ou=y,dc=example,dc=org\n\n"
        );
    }

    fn with_control(control: LdapControl) -> Result<String, NotLdif> {
        let msg = LdapMsg::new_with_ctrls(
            3,
            LdapOp::DelRequest("cn=ref,dc=example,dc=org".into()),
            vec![control],
        );
        change_record(&encode(msg), None, "")
    }

    #[test]
    fn a_control_as_sent() {
        let unknown = |oid: &str, criticality, value: Option<&[u8]>| LdapControl::Unknown {
            oid: oid.into(),
            criticality,
            value: value.map(<[u8]>::to_vec),
        };
        let cases = [
            (
                LdapControl::ManageDsaIT { criticality: true },
                "2.16.840.1.113730.3.4.2 true",
            ),
            (
                unknown("1.3.6.1.4.1.4203.666.5.12", false, None),
                "1.3.6.1.4.1.4203.666.5.12 false",
            ),
            (
                unknown("1.2.3.4", false, Some(b"plain")),
                "1.2.3.4 false: plain",
            ),
            (unknown("1.2.3.4", true, Some(b"")), "1.2.3.4 true:"),
            (
                unknown(
                    "1.3.6.1.1.13.1",
                    true,
                    Some(&[0x30, 0x03, 0x01, 0x01, 0xff]),
                ),
                "1.3.6.1.1.13.1 true:: MAMBAf8=",
            ),
        ];
        for (control, line) in cases {
            assert_eq!(
                with_control(control).unwrap(),
                format!("dn: cn=ref,dc=example,dc=org\ncontrol: {line}\nchangetype: delete\n\n")
            );
        }
        // A long value folds like any line.
        let text = with_control(unknown("1.2.3.5", false, Some(&[0xff; 80]))).unwrap();
        let b64 = STANDARD.encode([0xff; 80]);
        let first = 76 - "control: 1.2.3.5 false:: ".len();
        assert_eq!(
            text,
            format!(
                "dn: cn=ref,dc=example,dc=org\ncontrol: 1.2.3.5 false:: {}\n {}\nchangetype: delete\n\n",
                &b64[..first],
                &b64[first..]
            )
        );
    }

    #[test]
    fn two_controls_are_refused() {
        let msg = LdapMsg::new_with_ctrls(
            3,
            LdapOp::DelRequest("cn=ref,dc=example,dc=org".into()),
            vec![
                LdapControl::ManageDsaIT { criticality: true },
                LdapControl::Unknown {
                    oid: "1.2.3.4".into(),
                    criticality: false,
                    value: None,
                },
            ],
        );
        assert!(matches!(
            change_record(&encode(msg), None, ""),
            Err(NotLdif::Unreadable(_))
        ));
    }

    fn passwd(user: Option<&str>, new: Option<&str>) -> Vec<u8> {
        let ext: LdapExtendedRequest = LdapPasswordModifyRequest {
            user_identity: user.map(str::to_string),
            old_password: Some("old".into()),
            new_password: new.map(str::to_string),
        }
        .into();
        encode(LdapMsg::new(9, LdapOp::ExtendedRequest(ext))).to_vec()
    }

    /// The record without its hash, and the hash checked against `password`.
    fn split_ssha(text: &str, password: &[u8]) -> String {
        let (before, after) = text.split_once("userPassword: {SSHA}").unwrap();
        let (hash, rest) = after.split_once('\n').unwrap();
        let raw = STANDARD.decode(hash).unwrap();
        assert_eq!(raw.len(), 20 + SALT_LEN);
        let (digest, salt) = raw.split_at(20);
        let mut h = Sha1::new();
        h.update(password);
        h.update(salt);
        assert_eq!(digest, &h.finalize()[..]);
        format!("{before}userPassword: {{SSHA}}HASH\n{rest}")
    }

    #[test]
    fn password_modify_with_user_identity_and_new_password() {
        let req = passwd(Some("uid=u1,ou=people,dc=example,dc=org"), Some("s3cret"));
        let text = change_record(&req, None, "cn=admin,dc=example,dc=org").unwrap();
        assert!(!text.contains("s3cret"));
        assert_eq!(
            split_ssha(&text, b"s3cret"),
            "# password modify (RFC 3062) of uid=u1,ou=people,dc=example,dc=org, as a use\n \
             rPassword replace with an {SSHA} hash\n\
             dn: uid=u1,ou=people,dc=example,dc=org\n\
             changetype: modify\n\
             replace: userPassword\n\
             userPassword: {SSHA}HASH\n\
             -\n\n"
        );
        // A fresh salt each time.
        let again = change_record(&req, None, "cn=admin,dc=example,dc=org").unwrap();
        assert_ne!(text, again);
    }

    #[test]
    fn password_modify_generated_for_the_bound_user() {
        let req = passwd(None, None);
        let resp: LdapExtendedResponse = LdapPasswordModifyResponse {
            res: LdapResult {
                code: LdapResultCode::Success,
                matcheddn: String::new(),
                message: String::new(),
                referral: Vec::new(),
            },
            gen_password: Some("gen-Pw1".into()),
        }
        .into();
        let resp = encode(LdapMsg::new(9, LdapOp::ExtendedResponse(resp)));
        let text = change_record(&req, Some(&resp), "uid=me,dc=example,dc=org").unwrap();
        assert_eq!(
            split_ssha(&text, b"gen-Pw1"),
            "# password modify (RFC 3062) of uid=me,dc=example,dc=org, as a userPassword \n \
             replace with an {SSHA} hash\n\
             dn: uid=me,dc=example,dc=org\n\
             changetype: modify\n\
             replace: userPassword\n\
             userPassword: {SSHA}HASH\n\
             -\n\n"
        );
        // No response: no password to hash.
        assert!(matches!(
            change_record(&req, None, "uid=me,dc=example,dc=org"),
            Err(NotLdif::Unreadable(_))
        ));
        // Anonymous: no entry to change.
        assert!(matches!(
            change_record(&req, Some(&resp), ""),
            Err(NotLdif::Unreadable(_))
        ));
    }

    #[test]
    fn password_modify_of_an_authz_id_is_unreadable() {
        for id in ["u:jdoe", "dn:uid=jdoe,dc=example,dc=org", "jdoe"] {
            let req = passwd(Some(id), Some("pw"));
            assert!(
                matches!(
                    change_record(&req, None, "cn=admin,dc=example,dc=org"),
                    Err(NotLdif::Unreadable(_))
                ),
                "{id}"
            );
        }
    }

    #[test]
    fn other_extended_operation() {
        let err = ldif(LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: "1.3.6.1.4.1.4203.1.11.3".into(),
            value: None,
        }))
        .unwrap_err();
        assert_eq!(err, NotLdif::Extended("1.3.6.1.4.1.4203.1.11.3".into()));
    }

    #[test]
    fn search_is_not_a_write() {
        let err = ldif(LdapOp::SearchRequest(LdapSearchRequest {
            base: "dc=example,dc=org".into(),
            scope: LdapSearchScope::Subtree,
            aliases: LdapDerefAliases::Never,
            sizelimit: 0,
            timelimit: 0,
            typesonly: false,
            filter: LdapFilter::Present("objectClass".into()),
            attrs: Vec::new(),
        }))
        .unwrap_err();
        assert!(matches!(err, NotLdif::Unreadable(_)), "{err:?}");
    }

    #[test]
    fn garbage_is_unreadable() {
        let good = encode(LdapMsg::new(
            1,
            LdapOp::DelRequest("cn=x,dc=example,dc=org".into()),
        ));
        let mut inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\x00".to_vec(),
            b"not ber at all".to_vec(),
            vec![0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            vec![0x30, 0x80, 0x00, 0x00],
            // An unknown operation.
            vec![0x30, 0x05, 0x02, 0x01, 0x01, 0x7f, 0x00],
        ];
        // Every truncation and a trailing byte.
        inputs.extend((0..good.len()).map(|n| good[..n].to_vec()));
        let mut trailing = good.to_vec();
        trailing.push(0);
        inputs.push(trailing);
        for input in inputs {
            assert!(
                matches!(change_record(&input, None, ""), Err(NotLdif::Unreadable(_))),
                "{input:02x?}"
            );
        }
    }

    #[test]
    fn bad_attribute_names_and_control_oids_are_refused() {
        let err = ldif(LdapOp::AddRequest(LdapAddRequest {
            dn: "cn=x".into(),
            attributes: vec![attr("cn: y\ndn", &[b"v"])],
        }))
        .unwrap_err();
        assert!(matches!(err, NotLdif::Unreadable(_)));
        let msg = LdapMsg::new_with_ctrls(
            1,
            LdapOp::DelRequest("cn=x".into()),
            vec![LdapControl::Unknown {
                oid: "not.an oid".into(),
                criticality: false,
                value: None,
            }],
        );
        assert!(matches!(
            change_record(&encode(msg), None, ""),
            Err(NotLdif::Unreadable(_))
        ));
    }
}
