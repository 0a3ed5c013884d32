//! What a session fuzz input asks for, as steps: read from the raw command
//! format (client bytes as they come: the recorded seeds) or from the
//! structured one (a grammar of LDAP message sequences: every message whole
//! and well formed, so that nearly every input reaches the gate instead of
//! ending in the framer). The formats are documented in
//! `src/fuzzing/session.rs`.

use std::borrow::Cow;

use crate::wire::ber::put_tlv;
use crate::wire::codec;
use crate::wire::envelope::oid;

/// Steps an input runs at most (bounds the time of one input).
pub(super) const MAX_STEPS: usize = 512;

/// The identity allowed to freeze (`testkit::ADMIN_DN`, as in the
/// integration tests, so recorded streams freeze too).
pub(super) const OPERATOR: &str = "cn=admin,dc=example,dc=org";

/// What the scripted upstream is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpCmd {
    /// Answer this many of the pending requests, oldest first.
    Answer(usize),
    /// Answer one pending request, the one at this index (modulo the number
    /// pending): out of order.
    AnswerAt(usize),
    /// Answer at once from now on (true) or only when told (false).
    Auto(bool),
    /// Close the connection, as a server that stops or drops the client:
    /// what it has not answered is never answered.
    Close,
}

/// One step of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step<'a> {
    /// Bytes the client writes to the proxy.
    Client(Cow<'a, [u8]>),
    /// A command to the scripted upstream.
    Up(UpCmd),
    /// An operator's ON through the engine; its parameter byte: 1
    /// dc=example, 2 dc=other (none: all), 4 timeLimit 0, 8 holdUntilUnbind
    /// on the session's connection.
    On(u8),
    /// An operator's OFF through the engine, of this freeze if given.
    Off(Option<u64>),
    /// Let every task run until each waits; then check the bounds if asked.
    Settle { check: bool },
}

/// The header flag that selects the structured format.
pub(super) const STRUCTURED: u8 = 0x80;

/// The steps of an input's body (after the 4-byte header).
pub(super) fn steps(flags: u8, body: &[u8]) -> Vec<Step<'_>> {
    if flags & STRUCTURED != 0 {
        structured(body)
    } else {
        raw(body)
    }
}

/// The raw format (see `session.rs`).
fn raw(mut rest: &[u8]) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (a, b) = rest.split_at(n.min(rest.len()));
        *rest = b;
        a
    }
    while out.len() < MAX_STEPS {
        let Some((&c, tail)) = rest.split_first() else {
            break;
        };
        if c == 0x30 {
            let n = match codec::frame_len(rest, usize::MAX) {
                Ok(Some(n)) => n,
                _ => rest.len(),
            };
            out.push(Step::Client(Cow::Borrowed(take(&mut rest, n))));
            continue;
        }
        rest = tail;
        let byte = |rest: &mut &[u8]| take(rest, 1).first().copied().unwrap_or(0);
        out.push(match c % 8 {
            0 => {
                let len = take(&mut rest, 2);
                let n = len.iter().fold(0usize, |n, b| n << 8 | *b as usize);
                Step::Client(Cow::Borrowed(take(&mut rest, n)))
            }
            1 => Step::Up(UpCmd::Answer(1 + byte(&mut rest) as usize % 16)),
            2 => Step::On(byte(&mut rest)),
            3 => Step::Off(None),
            4 => Step::Settle { check: true },
            5 => Step::Up(UpCmd::Auto(c & 8 != 0)),
            6 => {
                let n = byte(&mut rest) as usize;
                Step::Client(Cow::Borrowed(take(&mut rest, n)))
            }
            _ => Step::Settle { check: false },
        });
    }
    out
}

/// Reads a structured body: bytes past its end read as zeros.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
}

/// Message IDs: a small set, so that they collide (a reused ID, an abandon
/// of a running request), and the ID 0 that RFC 4511 forbids.
const IDS: [i32; 8] = [1, 2, 3, 4, 5, 6, 7, 0];

/// Entry DNs: in either backend, a suffix itself, spelled oddly (case,
/// spaces, quoting, escapes), in no backend, cn=config, the root.
const DNS: [&str; 8] = [
    "cn=a,dc=example,dc=org",
    "cn=b,dc=other,dc=org",
    "CN=C , DC=Example,dc=ORG",
    "dc=example,dc=org",
    "cn=d\\2ce,dc=\"other\",dc=org",
    "olcDatabase={1}mdb,cn=config",
    "cn=f,dc=nowhere",
    "",
];

/// Identities a client binds as: anonymous, users of either backend, the
/// operator, and the operator spelled otherwise.
const WHO: [&str; 5] = [
    "",
    "cn=u,dc=example,dc=org",
    "cn=v,dc=other,dc=org",
    OPERATOR,
    "CN=Admin, DC=example,DC=org",
];

/// Suffixes an Allow-Backup dnSet names.
const SUFFIXES: [&str; 4] = [
    "dc=example,dc=org",
    "dc=other,dc=org",
    "DC=Example,DC=Org",
    "dc=nowhere",
];

/// Request controls: none, ManageDsaIT, an unknown critical one, an unknown
/// non-critical one, the proxied authorization of the operator, the
/// relax rules, dontUseCopy, and two at once: the encoded `[0] Controls`,
/// empty for none.
fn controls(which: u8) -> Vec<u8> {
    let one = |out: &mut Vec<u8>, oid: &str, critical: bool, value: Option<&[u8]>| {
        let mut c = Vec::new();
        put_tlv(&mut c, 0x04, oid.as_bytes());
        if critical {
            put_tlv(&mut c, 0x01, &[0xff]);
        }
        if let Some(v) = value {
            put_tlv(&mut c, 0x04, v);
        }
        put_tlv(out, 0x30, &c);
    };
    let mut list = Vec::new();
    match which % 8 {
        0 => return Vec::new(),
        1 => one(&mut list, "2.16.840.1.113730.3.4.2", false, None),
        2 => one(&mut list, "1.2.3.4.5.6.7.8.9", true, Some(b"x")),
        3 => one(&mut list, "1.2.3.4.5.6.7.8.9", false, None),
        4 => one(
            &mut list,
            "2.16.840.1.113730.3.4.18",
            true,
            Some(format!("dn:{OPERATOR}").as_bytes()),
        ),
        5 => one(&mut list, "1.3.6.1.4.1.4203.666.5.12", true, None),
        6 => one(&mut list, "1.3.6.1.1.22", true, None),
        _ => {
            one(&mut list, "2.16.840.1.113730.3.4.2", false, None);
            one(&mut list, "1.2.3.4.5.6.7.8.9", false, None);
        }
    }
    let mut out = Vec::new();
    put_tlv(&mut out, 0xa0, &list);
    out
}

/// A BER INTEGER's contents, minimal.
pub(super) fn int(v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut skip = 0;
    while skip < 7
        && ((bytes[skip] == 0 && bytes[skip + 1] & 0x80 == 0)
            || (bytes[skip] == 0xff && bytes[skip + 1] & 0x80 != 0))
    {
        skip += 1;
    }
    bytes[skip..].to_vec()
}

/// One LDAPMessage: its ID, its operation (tag and contents), its encoded
/// controls (empty: none).
fn message(msgid: i32, tag: u8, op: &[u8], controls: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(op.len() + controls.len() + 8);
    put_tlv(&mut body, 0x02, &int(msgid.into()));
    put_tlv(&mut body, tag, op);
    body.extend_from_slice(controls);
    let mut out = Vec::with_capacity(body.len() + 4);
    put_tlv(&mut out, 0x30, &body);
    out
}

fn octets(out: &mut Vec<u8>, v: &[u8]) {
    put_tlv(out, 0x04, v);
}

/// An attribute (type and values) as in add and modify.
fn attribute(atype: &str, vals: &[&[u8]]) -> Vec<u8> {
    let mut set = Vec::new();
    for v in vals {
        octets(&mut set, v);
    }
    let mut a = Vec::new();
    octets(&mut a, atype.as_bytes());
    put_tlv(&mut a, 0x31, &set);
    let mut out = Vec::new();
    put_tlv(&mut out, 0x30, &a);
    out
}

fn bind(r: &mut Reader) -> (u8, Vec<u8>) {
    let p = r.byte();
    let mut op = Vec::new();
    put_tlv(&mut op, 0x02, &[3]);
    match p % 8 {
        // SASL: EXTERNAL (no credentials), DIGEST-MD5 (a security layer
        // may follow: the client's later bytes are not LDAP).
        5 => {
            octets(&mut op, b"");
            let mut sasl = Vec::new();
            octets(&mut sasl, b"EXTERNAL");
            put_tlv(&mut op, 0xa3, &sasl);
        }
        6 => {
            octets(&mut op, b"");
            let mut sasl = Vec::new();
            octets(&mut sasl, b"DIGEST-MD5");
            octets(&mut sasl, b"response");
            put_tlv(&mut op, 0xa3, &sasl);
        }
        n => {
            let who = WHO[n as usize % WHO.len()];
            octets(&mut op, who.as_bytes());
            let password: &[u8] = if who.is_empty() || p & 8 != 0 {
                b""
            } else {
                b"secret"
            };
            put_tlv(&mut op, 0x80, password);
        }
    }
    (0x60, op)
}

fn search(r: &mut Reader, persistent: bool) -> (u8, Vec<u8>, Option<Vec<u8>>) {
    let p = r.byte();
    let mut op = Vec::new();
    octets(&mut op, DNS[p as usize % DNS.len()].as_bytes());
    put_tlv(&mut op, 0x0a, &[(p >> 3) % 3]); // scope
    put_tlv(&mut op, 0x0a, &[0]); // derefAliases
    put_tlv(&mut op, 0x02, &[0]); // sizeLimit
    put_tlv(&mut op, 0x02, &[0]); // timeLimit
    put_tlv(&mut op, 0x01, &[0]); // typesOnly
    put_tlv(&mut op, 0x87, b"objectClass"); // (objectClass=*)
    let mut attrs = Vec::new();
    if p & 0x20 != 0 {
        octets(&mut attrs, b"supportedExtension");
    }
    put_tlv(&mut op, 0x30, &attrs);
    // A persistent search: the sync request control (refreshAndPersist),
    // or the older persistent search control.
    let ctrl = persistent.then(|| {
        let mut c = Vec::new();
        if p & 0x40 != 0 {
            octets(&mut c, oid::PERSISTENT_SEARCH);
            let mut v = Vec::new();
            put_tlv(&mut v, 0x02, &[0x0f]); // changeTypes: all
            put_tlv(&mut v, 0x01, &[0]); // changesOnly
            put_tlv(&mut v, 0x01, &[0]); // returnECs
            let mut seq = Vec::new();
            put_tlv(&mut seq, 0x30, &v);
            octets(&mut c, &seq);
        } else {
            octets(&mut c, oid::SYNC_REQUEST);
            let mut v = Vec::new();
            put_tlv(&mut v, 0x0a, &[3]); // refreshAndPersist
            let mut seq = Vec::new();
            put_tlv(&mut seq, 0x30, &v);
            octets(&mut c, &seq);
        }
        let mut one = Vec::new();
        put_tlv(&mut one, 0x30, &c);
        let mut list = Vec::new();
        put_tlv(&mut list, 0xa0, &one);
        list
    });
    (0x63, op, ctrl)
}

fn allow_backup_on(p: u8, q: u8) -> Vec<u8> {
    let mut req = abproxy_proto::AllowBackupRequest::on();
    match p % 4 {
        0 => {}
        1 => req = req.with_dn_set([SUFFIXES[q as usize % 4]]),
        2 => req = req.with_dn_set([SUFFIXES[0], SUFFIXES[1]]),
        _ => req = req.with_dn_set(Vec::<&str>::new()),
    }
    match (p >> 2) % 4 {
        0 => {}
        1 => req = req.with_time_limit(0),
        2 => req = req.with_time_limit(1),
        _ => req = req.with_time_limit(abproxy_proto::MAX_INT),
    }
    if p & 0x10 != 0 {
        req = req.with_hold_until_unbind(true);
    }
    abproxy_proto::encode_request(&req)
}

fn allow_backup_off(p: u8, q: u8) -> Vec<u8> {
    let mut req = abproxy_proto::AllowBackupRequest::off();
    match p % 4 {
        0 => {}
        1 => req = req.with_dn_set([SUFFIXES[q as usize % 4]]),
        _ => {}
    }
    // The freeze IDs an engine hands out start at 1.
    match (p >> 2) % 4 {
        0 => {}
        n => req = req.with_freeze_id(u64::from(n)),
    }
    abproxy_proto::encode_request(&req)
}

fn extended(name: &[u8], value: Option<&[u8]>) -> Vec<u8> {
    let mut op = Vec::new();
    put_tlv(&mut op, 0x80, name);
    if let Some(v) = value {
        put_tlv(&mut op, 0x81, v);
    }
    op
}

/// The structured format (see `session.rs`): one command byte, its kind
/// the low four bits, then its parameters.
fn structured(body: &[u8]) -> Vec<Step<'_>> {
    let mut r = Reader { data: body };
    let mut out = Vec::new();
    while out.len() < MAX_STEPS && !r.data.is_empty() {
        let c = r.byte();
        let id = |r: &mut Reader| IDS[r.byte() as usize % IDS.len()];
        // Controls on the operations that take them: the command's high
        // bit, then a byte.
        let ctrl = |r: &mut Reader| {
            if c & 0x80 != 0 {
                controls(r.byte())
            } else {
                Vec::new()
            }
        };
        let dn = |b: u8| DNS[b as usize % DNS.len()].as_bytes();
        let msg = match c & 0x0f {
            0 => {
                let msgid = id(&mut r);
                let (tag, op) = bind(&mut r);
                message(msgid, tag, &op, &[])
            }
            1 => {
                let msgid = id(&mut r);
                let mut op = Vec::new();
                octets(&mut op, dn(r.byte()));
                let mut attrs = attribute("objectClass", &[b"organizationalRole"]);
                attrs.extend(attribute("cn", &[b"a"]));
                put_tlv(&mut op, 0x30, &attrs);
                message(msgid, 0x68, &op, &ctrl(&mut r))
            }
            2 => {
                let msgid = id(&mut r);
                let d = dn(r.byte());
                message(msgid, 0x4a, d, &ctrl(&mut r))
            }
            3 => {
                let msgid = id(&mut r);
                let p = r.byte();
                let mut op = Vec::new();
                octets(&mut op, dn(p));
                let mut change = Vec::new();
                put_tlv(&mut change, 0x0a, &[(p >> 3) % 3]);
                let who = if p & 0x40 != 0 {
                    "userPassword"
                } else {
                    "description"
                };
                change.extend(attribute(who, &[b"x"]));
                let mut changes = Vec::new();
                put_tlv(&mut changes, 0x30, &change);
                put_tlv(&mut op, 0x30, &changes);
                message(msgid, 0x66, &op, &ctrl(&mut r))
            }
            4 => {
                let msgid = id(&mut r);
                let p = r.byte();
                let mut op = Vec::new();
                octets(&mut op, dn(p));
                octets(&mut op, b"cn=moved");
                put_tlv(&mut op, 0x01, &[0xff]);
                if p & 0x80 != 0 {
                    // newSuperior: maybe another backend.
                    put_tlv(&mut op, 0x80, dn(p >> 4));
                }
                message(msgid, 0x6c, &op, &ctrl(&mut r))
            }
            5 => {
                let msgid = id(&mut r);
                let mut op = Vec::new();
                octets(&mut op, dn(r.byte()));
                let mut ava = Vec::new();
                octets(&mut ava, b"cn");
                octets(&mut ava, b"a");
                put_tlv(&mut op, 0x30, &ava);
                message(msgid, 0x6e, &op, &ctrl(&mut r))
            }
            6 | 7 => {
                let msgid = id(&mut r);
                let (tag, op, persistent) = search(&mut r, c & 0x0f == 7);
                match persistent {
                    Some(list) => message(msgid, tag, &op, &list),
                    None => message(msgid, tag, &op, &ctrl(&mut r)),
                }
            }
            8 => {
                let msgid = id(&mut r);
                let target = id(&mut r);
                message(msgid, 0x50, &int(target.into()), &[])
            }
            9 => {
                // Unbind, rarely (it ends the session): otherwise WhoAmI.
                let msgid = id(&mut r);
                if c & 0x70 == 0x70 {
                    message(msgid, 0x42, &[], &[])
                } else {
                    message(msgid, 0x77, &extended(oid::WHOAMI, None), &[])
                }
            }
            10 => {
                // Allow-Backup ON from the client.
                let msgid = id(&mut r);
                let (p, q) = (r.byte(), r.byte());
                let name = abproxy_proto::ALLOW_BACKUP_OID.as_bytes();
                let value = allow_backup_on(p, q);
                message(msgid, 0x77, &extended(name, Some(&value)), &[])
            }
            11 => {
                // Allow-Backup OFF or status from the client.
                let msgid = id(&mut r);
                let (p, q) = (r.byte(), r.byte());
                if p & 0x80 != 0 {
                    let name = abproxy_proto::ALLOW_BACKUP_STATUS_OID.as_bytes();
                    message(msgid, 0x77, &extended(name, None), &[])
                } else {
                    let name = abproxy_proto::ALLOW_BACKUP_OID.as_bytes();
                    let value = allow_backup_off(p, q);
                    message(msgid, 0x77, &extended(name, Some(&value)), &[])
                }
            }
            12 => {
                // Other extended operations: a password modify (of the
                // bound identity, or of an entry of either backend),
                // Cancel of an ID, StartTLS, an unknown one.
                let msgid = id(&mut r);
                let p = r.byte();
                let op = match p % 4 {
                    0 => {
                        let mut v = Vec::new();
                        if p & 4 != 0 {
                            put_tlv(&mut v, 0x80, dn(p >> 3));
                        }
                        put_tlv(&mut v, 0x82, b"new");
                        let mut seq = Vec::new();
                        put_tlv(&mut seq, 0x30, &v);
                        extended(oid::PASSWORD_MODIFY, Some(&seq))
                    }
                    1 => {
                        let mut v = Vec::new();
                        put_tlv(
                            &mut v,
                            0x02,
                            &int(IDS[(p >> 2) as usize % IDS.len()].into()),
                        );
                        let mut seq = Vec::new();
                        put_tlv(&mut seq, 0x30, &v);
                        extended(oid::CANCEL, Some(&seq))
                    }
                    2 => extended(oid::START_TLS, None),
                    _ => extended(b"1.2.3.4.5", Some(b"?")),
                };
                message(msgid, 0x77, &op, &ctrl(&mut r))
            }
            13 => {
                // The operator, through the engine.
                let p = r.byte();
                out.push(if c & 0x10 != 0 {
                    Step::Off(match p % 4 {
                        0 => None,
                        n => Some(u64::from(n)),
                    })
                } else {
                    Step::On(p)
                });
                continue;
            }
            14 => {
                // The upstream.
                let p = r.byte();
                out.push(Step::Up(match c >> 4 {
                    0..=5 => UpCmd::Answer(1 + p as usize % 4),
                    6..=9 => UpCmd::AnswerAt(p as usize),
                    10 | 11 => UpCmd::Auto(true),
                    12..=14 => UpCmd::Auto(false),
                    _ => UpCmd::Close,
                }));
                continue;
            }
            _ => {
                if c & 0xf0 == 0xf0 {
                    // Raw client bytes (1-byte length): whatever else.
                    let n = r.byte() as usize;
                    out.push(Step::Client(Cow::Borrowed(r.bytes(n))));
                } else {
                    out.push(Step::Settle {
                        check: c & 0x10 != 0,
                    });
                }
                continue;
            }
        };
        out.push(Step::Client(Cow::Owned(msg)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{op, Envelope};

    #[test]
    fn integers_are_minimal() {
        assert_eq!(int(0), [0]);
        assert_eq!(int(127), [127]);
        assert_eq!(int(128), [0, 128]);
        assert_eq!(int(-1), [0xff]);
        assert_eq!(int(i32::MAX.into()), [0x7f, 0xff, 0xff, 0xff]);
    }

    /// Every kind of message the grammar writes reads back as a request
    /// (the proxy's own envelope reader and `ldap3_proto` agree).
    #[test]
    fn generated_messages_are_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for c in 0..=255u8 {
            for p in [0u8, 1, 2, 3, 7, 0x10, 0x27, 0x45, 0x80, 0x9c, 0xff] {
                let input = [c, p, p, p, p.wrapping_mul(3), p ^ 0x55];
                for step in structured(&input).into_iter().take(1) {
                    let Step::Client(m) = step else { continue };
                    if c & 0x0f == 15 {
                        continue;
                    }
                    let env = Envelope::request(&m)
                        .unwrap_or_else(|e| panic!("{c:#x} {p:#x}: {e}: {m:02x?}"));
                    assert!(
                        crate::wire::pdu::decode(&m).is_some(),
                        "{c:#x} {p:#x}: ldap3_proto cannot read {m:02x?}"
                    );
                    seen.insert(env.op);
                }
            }
        }
        for o in [
            op::BIND_REQUEST,
            op::UNBIND_REQUEST,
            op::SEARCH_REQUEST,
            op::MODIFY_REQUEST,
            op::ADD_REQUEST,
            op::DEL_REQUEST,
            op::MODDN_REQUEST,
            op::COMPARE_REQUEST,
            op::ABANDON_REQUEST,
            op::EXTENDED_REQUEST,
        ] {
            assert!(seen.contains(&o), "no {o:#x} generated");
        }
    }
}
