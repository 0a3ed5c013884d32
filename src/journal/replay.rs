//! What `journal replay` sends, and in which order: pure functions over
//! the records (the connection is the operator CLI's).

use std::collections::HashMap;

use super::record::{Body, Record};
use crate::wire::ber::{put_tlv as tlv, write_len, Reader};
use crate::wire::envelope::oid;
use crate::wire::op;

/// Where a range of records ends (or starts): a sequence number, or a
/// time in microseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Seq(u64),
    Time(i64),
}

/// One step of a replay, at its position (`at`): the sequence number of
/// the record that decided it (a write's outcome, a lost record), so that
/// positions increase along the plan and `--from at` resumes exactly there.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// A write the server answered with success: to be sent again.
    Write {
        intent: &'a Record,
        outcome: &'a Record,
    },
    /// A write whose answer never came: the server may have run it or not.
    Indeterminate {
        intent: &'a Record,
        at: u64,
        time_us: i64,
        why: &'a str,
    },
}

impl Item<'_> {
    /// Its position (see [`Item`]).
    pub fn at(&self) -> u64 {
        match self {
            Item::Write { outcome, .. } => outcome.seq,
            Item::Indeterminate { at, .. } => *at,
        }
    }

    fn time_us(&self) -> i64 {
        match self {
            Item::Write { outcome, .. } => outcome.time_us,
            Item::Indeterminate { time_us, .. } => *time_us,
        }
    }

    pub fn intent(&self) -> &Record {
        match self {
            Item::Write { intent, .. } | Item::Indeterminate { intent, .. } => intent,
        }
    }
}

/// What to replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct Range {
    /// Only writes sent after this cut (a backup's `journal_cut`).
    pub after_cut: Option<u64>,
    /// From this position on (a previous replay's "next").
    pub from: Option<u64>,
    /// Up to this position or time (answers after it are left out).
    pub until: Option<Bound>,
}

/// The steps of a replay of `records` (the whole journal, in sequence
/// order) over `range`, in the order the server answered the writes.
/// Writes that failed are not in it (they changed nothing); writes whose
/// answer never came are, as [`Item::Indeterminate`].
pub fn plan<'a>(records: &'a [Record], range: &Range) -> Vec<Item<'a>> {
    let mut intents: HashMap<u64, &Record> = HashMap::new();
    let mut decided: HashMap<u64, ()> = HashMap::new();
    let mut items = Vec::new();
    for r in records {
        match &r.body {
            Body::Intent { .. } => {
                intents.insert(r.seq, r);
            }
            Body::Outcome { intent, result, .. } => {
                decided.insert(*intent, ());
                if let (Some(i), 0) = (intents.get(intent), *result) {
                    items.push(Item::Write {
                        intent: i,
                        outcome: r,
                    });
                }
            }
            Body::Lost { intent, why } => {
                if decided.insert(*intent, ()).is_none() {
                    if let Some(i) = intents.get(intent) {
                        items.push(Item::Indeterminate {
                            intent: i,
                            at: r.seq,
                            time_us: r.time_us,
                            why,
                        });
                    }
                }
            }
            Body::Start { .. } => {
                // The proxy started again: what the last run left without
                // an answer will never get one.
                let mut open: Vec<&Record> = intents
                    .values()
                    .filter(|i| !decided.contains_key(&i.seq))
                    .copied()
                    .collect();
                open.sort_by_key(|i| i.seq);
                for i in open {
                    decided.insert(i.seq, ());
                    items.push(Item::Indeterminate {
                        intent: i,
                        at: r.seq,
                        time_us: r.time_us,
                        why: "the proxy stopped before its answer came",
                    });
                }
            }
            Body::Cut { .. } => {}
        }
    }
    items.retain(|item| {
        range.after_cut.is_none_or(|cut| item.intent().seq > cut)
            && range.from.is_none_or(|from| item.at() >= from)
            && match range.until {
                None => true,
                Some(Bound::Seq(n)) => item.at() <= n,
                Some(Bound::Time(t)) => item.time_us() <= t,
            }
    });
    items
}

/// The bytes replay sends for a journaled write: the client's request
/// with message ID `msgid`, controls included. A password modify names its
/// user and its new password, so that it changes the same password to the
/// same value whoever replays it: the user is the request's own, else the
/// identity the write was sent as; the password is the request's own,
/// else the one the server generated (its response).
pub fn request_bytes(
    request: &[u8],
    response: &[u8],
    identity: &str,
    msgid: i32,
) -> Result<Vec<u8>, String> {
    let bad = |e: crate::wire::ber::BerError| format!("the journaled request is not LDAP: {e}");
    let mut top = Reader::new(request, 0, request.len());
    let seq = top.expect(0x30, "LDAPMessage").map_err(bad)?;
    let mut inner = Reader::inside(request, seq);
    let id = inner.expect(0x02, "messageID").map_err(bad)?;
    let op_start = id.end;
    let op_tlv = inner.next_tlv().map_err(bad)?;
    let mut rest = Vec::with_capacity(request.len());
    let op_bytes = &request[op_start..op_tlv.end];
    let controls = &request[op_tlv.end..seq.end];
    if op_tlv.tag == op::EXTENDED_REQUEST
        && exop_name(request, op_tlv) == Some(oid::PASSWORD_MODIFY)
    {
        rest.extend(password_modify(request, op_tlv, response, identity)?);
    } else {
        rest.extend_from_slice(op_bytes);
    }
    rest.extend_from_slice(controls);
    let mut id_tlv = Vec::new();
    integer(&mut id_tlv, msgid);
    let mut out = vec![0x30];
    write_len(&mut out, id_tlv.len() + rest.len());
    out.extend(id_tlv);
    out.extend(rest);
    Ok(out)
}

fn integer(out: &mut Vec<u8>, n: i32) {
    let bytes = n.to_be_bytes();
    let mut skip = 0;
    while skip < 3
        && ((bytes[skip] == 0 && bytes[skip + 1] & 0x80 == 0)
            || (bytes[skip] == 0xff && bytes[skip + 1] & 0x80 != 0))
    {
        skip += 1;
    }
    out.push(0x02);
    out.push((4 - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

fn exop_name(buf: &[u8], op_tlv: crate::wire::ber::Tlv) -> Option<&[u8]> {
    let mut r = Reader::inside(buf, op_tlv);
    r.expect(0x80, "requestName").ok().map(|t| t.value(buf))
}

/// The password modify request replay sends (see [`request_bytes`]).
fn password_modify(
    buf: &[u8],
    op_tlv: crate::wire::ber::Tlv,
    response: &[u8],
    identity: &str,
) -> Result<Vec<u8>, String> {
    let bad = |e: crate::wire::ber::BerError| format!("password modify request: {e}");
    let mut r = Reader::inside(buf, op_tlv);
    r.expect(0x80, "requestName").map_err(bad)?;
    let (mut user, mut new): (Option<&[u8]>, Option<&[u8]>) = (None, None);
    if let Some(v) = r.optional(0x81).map_err(bad)? {
        let mut vr = Reader::inside(buf, v);
        let s = vr.expect(0x30, "PasswdModifyRequestValue").map_err(bad)?;
        let mut f = Reader::inside(buf, s);
        user = f.optional(0x80).map_err(bad)?.map(|t| t.value(buf));
        f.optional(0x81).map_err(bad)?;
        new = f.optional(0x82).map_err(bad)?.map(|t| t.value(buf));
    }
    let user: &[u8] = match user.filter(|u| !u.is_empty()) {
        Some(u) => u,
        None if !identity.is_empty() => identity.as_bytes(),
        None => {
            return Err(
                "a password modify of an anonymous session's own password names no user".into(),
            )
        }
    };
    let generated = generated_password(response);
    let new: &[u8] = match new.filter(|n| !n.is_empty()) {
        Some(n) => n,
        None => generated.as_deref().ok_or(
            "a password modify without a new password, and no generated one in its answer",
        )?,
    };
    let mut fields = Vec::new();
    tlv(&mut fields, 0x80, user);
    tlv(&mut fields, 0x82, new);
    let mut value = Vec::new();
    tlv(&mut value, 0x30, &fields);
    let mut body = Vec::new();
    tlv(&mut body, 0x80, oid::PASSWORD_MODIFY);
    tlv(&mut body, 0x81, &value);
    let mut out = Vec::new();
    tlv(&mut out, op::EXTENDED_REQUEST, &body);
    Ok(out)
}

/// genPasswd of a password modify response (RFC 3062), if any.
fn generated_password(response: &[u8]) -> Option<Vec<u8>> {
    let mut top = Reader::new(response, 0, response.len());
    let seq = top.expect(0x30, "LDAPMessage").ok()?;
    let mut inner = Reader::inside(response, seq);
    inner.expect(0x02, "messageID").ok()?;
    let ext = inner
        .expect(op::EXTENDED_RESPONSE, "ExtendedResponse")
        .ok()?;
    let mut e = Reader::inside(response, ext);
    e.next_tlv().ok()?; // resultCode
    e.next_tlv().ok()?; // matchedDN
    e.next_tlv().ok()?; // diagnosticMessage
    e.optional(0xa3).ok()?; // referral
    e.optional(0x8a).ok()?; // responseName
    let v = e.optional(0x8b).ok()??;
    let mut vr = Reader::inside(response, v);
    let s = vr.expect(0x30, "PasswdModifyResponseValue").ok()?;
    let mut f = Reader::inside(response, s);
    f.optional(0x80).ok()?.map(|t| t.value(response).to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pdu::encode;
    use crate::wire::Envelope;
    use ldap3_proto::proto::*;

    fn rec(seq: u64, body: Body) -> Record {
        Record {
            seq,
            time_us: seq as i64 * 1000,
            conn: 1,
            body,
        }
    }
    fn intent(seq: u64) -> Record {
        rec(
            seq,
            Body::Intent {
                identity: "cn=admin".into(),
                request: vec![seq as u8],
            },
        )
    }
    fn outcome(seq: u64, intent: u64, result: i32) -> Record {
        rec(
            seq,
            Body::Outcome {
                intent,
                result,
                response: vec![],
            },
        )
    }

    #[test]
    fn a_plan_follows_the_answers_skips_failures_and_keeps_the_unknown() {
        let start = |seq| {
            rec(
                seq,
                Body::Start {
                    version: "x".into(),
                    pid: 1,
                },
            )
        };
        let records = vec![
            start(1),
            intent(2),
            intent(3),
            outcome(4, 3, 0), // answered first
            outcome(5, 2, 0),
            intent(6),
            outcome(7, 6, 68), // failed: never replayed
            intent(8),
            rec(
                9,
                Body::Cut {
                    freeze_id: 1,
                    suffixes: vec![],
                },
            ),
            intent(10),
            rec(
                11,
                Body::Lost {
                    intent: 8,
                    why: "lost".into(),
                },
            ),
            outcome(12, 10, 0),
            intent(13),
            start(14), // 13 never answered
            intent(15),
            outcome(16, 15, 0),
            intent(17), // still in flight: not yet anything
        ];
        let at = |items: Vec<Item>| -> Vec<(u64, u64, bool)> {
            items
                .iter()
                .map(|i| (i.at(), i.intent().seq, matches!(i, Item::Write { .. })))
                .collect()
        };
        assert_eq!(
            at(plan(&records, &Range::default())),
            vec![
                (4, 3, true),
                (5, 2, true),
                (11, 8, false),
                (12, 10, true),
                (14, 13, false),
                (16, 15, true)
            ]
        );
        let after = Range {
            after_cut: Some(9),
            ..Range::default()
        };
        assert_eq!(
            at(plan(&records, &after)),
            vec![(12, 10, true), (14, 13, false), (16, 15, true)]
        );
        let resumed = Range {
            after_cut: Some(9),
            from: Some(13),
            until: Some(Bound::Seq(15)),
        };
        assert_eq!(at(plan(&records, &resumed)), vec![(14, 13, false)]);
        let by_time = Range {
            until: Some(Bound::Time(5000)),
            ..Range::default()
        };
        assert_eq!(
            at(plan(&records, &by_time)),
            vec![(4, 3, true), (5, 2, true)]
        );
    }

    #[test]
    fn replayed_requests_keep_their_bytes_but_the_message_id() {
        let req = encode(LdapMsg::new(
            7,
            LdapOp::DelRequest("cn=x,dc=example,dc=org".into()),
        ));
        for id in [1, 127, 128, 255, 256, 65_535, i32::MAX] {
            let out = request_bytes(&req, &[], "", id).unwrap();
            let env = Envelope::request(&out).unwrap();
            assert_eq!(env.msgid, id);
            assert_eq!(env.dn_bytes(&out).unwrap(), b"cn=x,dc=example,dc=org");
            // Only the message ID differs.
            assert!(out.ends_with(&req[5..]), "{out:02x?}");
        }
        assert!(request_bytes(b"\x30\x03\x02\x01", &[], "", 1).is_err());
    }

    fn passwd_value(user: Option<&str>, new: Option<&str>) -> Vec<u8> {
        let mut f = Vec::new();
        if let Some(u) = user {
            tlv(&mut f, 0x80, u.as_bytes());
        }
        tlv(&mut f, 0x81, b"old");
        if let Some(n) = new {
            tlv(&mut f, 0x82, n.as_bytes());
        }
        let mut v = Vec::new();
        tlv(&mut v, 0x30, &f);
        v
    }

    fn passwd_req(user: Option<&str>, new: Option<&str>) -> bytes::Bytes {
        encode(LdapMsg::new(
            3,
            LdapOp::ExtendedRequest(LdapExtendedRequest {
                name: "1.3.6.1.4.1.4203.1.11.1".into(),
                value: Some(passwd_value(user, new)),
            }),
        ))
    }

    /// (userIdentity, newPasswd) of a replayed password modify.
    fn fields(out: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let env = Envelope::request(out).unwrap();
        assert_eq!(env.oid_bytes(out).unwrap(), oid::PASSWORD_MODIFY);
        let v = env.value_bytes(out).unwrap();
        let mut r = Reader::new(v, 0, v.len());
        let s = r.expect(0x30, "v").unwrap();
        let mut f = Reader::inside(v, s);
        let u = f.expect(0x80, "u").unwrap().value(v).to_vec();
        let n = f.expect(0x82, "n").unwrap().value(v).to_vec();
        assert!(f.is_empty(), "no old password");
        (u, n)
    }

    #[test]
    fn a_password_modify_names_its_user_and_its_password() {
        let me = "uid=u,dc=example,dc=org";
        // Own password, new one given.
        let out = request_bytes(&passwd_req(None, Some("n3w")), &[], me, 9).unwrap();
        assert_eq!(fields(&out), (me.as_bytes().to_vec(), b"n3w".to_vec()));
        // Another user's, generated by the server.
        let mut gen = Vec::new();
        tlv(&mut gen, 0x80, b"g3n");
        let mut gv = Vec::new();
        tlv(&mut gv, 0x30, &gen);
        let resp = encode(LdapMsg::new(
            3,
            LdapOp::ExtendedResponse(LdapExtendedResponse {
                res: LdapResult {
                    code: LdapResultCode::Success,
                    matcheddn: String::new(),
                    message: String::new(),
                    referral: vec![],
                },
                name: None,
                value: Some(gv),
            }),
        ));
        let out = request_bytes(&passwd_req(Some("uid=v,dc=x"), None), &resp, me, 9).unwrap();
        assert_eq!(fields(&out), (b"uid=v,dc=x".to_vec(), b"g3n".to_vec()));
        // Nothing to name.
        assert!(request_bytes(&passwd_req(None, Some("x")), &[], "", 9).is_err());
        assert!(request_bytes(&passwd_req(None, None), &[], me, 9).is_err());
    }
}
