//! What a session fuzz input asks for, as steps: read from the raw command
//! format (client bytes as they come: the recorded seeds) or from the
//! structured one (a grammar of LDAP message sequences: every message whole
//! and well formed, so that nearly every input reaches the gate instead of
//! ending in the framer). The formats are documented in
//! `src/fuzzing/session.rs`.

use std::borrow::Cow;

use crate::wire::ber::{put_tlv, write_len};
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

/// A seeded xorshift generator: the same numbers every run, for the
/// generated inputs of the tests and of `examples/fuzz_session.rs`.
pub(super) struct Seeded(u64);

impl Seeded {
    #[inline]
    pub(super) fn new(seed: u64) -> Self {
        Seeded(seed)
    }

    /// A number below `n`.
    #[inline]
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `n` random structured inputs, the same every run: a header with the
/// structured flag, then a body of 19 to `19 + longer - 1` random bytes.
#[inline]
pub fn generated_inputs(n: usize, longer: u64) -> Vec<Vec<u8>> {
    let mut rng = Seeded::new(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            let len = 16 + rng.below(longer) as usize;
            let mut input = vec![STRUCTURED | rng.below(32) as u8];
            input.extend((0..3 + len).map(|_| rng.below(256) as u8));
            input
        })
        .collect()
}

/// The steps of an input's body (after the 4-byte header), read one at a
/// time as the check runs them: it stops reading (and generating messages)
/// once the session has ended.
#[inline]
pub(super) fn steps(flags: u8, body: &[u8]) -> Box<dyn Iterator<Item = Step<'_>> + '_> {
    if flags & STRUCTURED != 0 {
        Box::new(structured(body))
    } else {
        Box::new(raw(body))
    }
}

#[inline]
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = rest.split_at(n.min(rest.len()));
    *rest = b;
    a
}

/// The raw format (see `session.rs`).
#[inline]
fn raw(mut rest: &[u8]) -> impl Iterator<Item = Step<'_>> {
    std::iter::from_fn(move || raw_step(&mut rest)).take(MAX_STEPS)
}

/// The next raw command, if any.
#[inline]
fn raw_step<'a>(rest: &mut &'a [u8]) -> Option<Step<'a>> {
    let (&c, tail) = rest.split_first()?;
    if c == 0x30 {
        let n = match codec::frame_len(rest, usize::MAX) {
            Ok(Some(n)) => n,
            _ => rest.len(),
        };
        return Some(Step::Client(Cow::Borrowed(take(rest, n))));
    }
    *rest = tail;
    let byte = |rest: &mut &[u8]| take(rest, 1).first().copied().unwrap_or(0);
    Some(match c % 8 {
        0 => {
            let len = take(rest, 2);
            let n = len.iter().fold(0usize, |n, b| n << 8 | *b as usize);
            Step::Client(Cow::Borrowed(take(rest, n)))
        }
        1 => Step::Up(UpCmd::Answer(1 + byte(rest) as usize % 16)),
        2 => Step::On(byte(rest)),
        3 => Step::Off(None),
        4 => Step::Settle { check: true },
        5 => Step::Up(UpCmd::Auto(c & 8 != 0)),
        6 => {
            let n = byte(rest) as usize;
            Step::Client(Cow::Borrowed(take(rest, n)))
        }
        _ => Step::Settle { check: false },
    })
}

/// Reads a structured body: bytes past its end read as zeros.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    #[inline]
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    #[inline]
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

/// Writes BER into one buffer: a constructed element is opened, filled and
/// closed, its length set at the close. The generator writes each message
/// with it, so a message costs one allocation (its copy out of the
/// buffer) instead of one or more per element.
struct Ber {
    buf: Vec<u8>,
    /// Where the contents of each open element start.
    open: Vec<usize>,
}

impl Ber {
    #[inline]
    fn new() -> Self {
        Ber {
            buf: Vec::with_capacity(512),
            open: Vec::with_capacity(8),
        }
    }

    #[inline]
    fn open(&mut self, tag: u8) {
        self.buf.push(tag);
        self.buf.push(0);
        self.open.push(self.buf.len());
    }

    /// Closes the element opened last: its length in the shortest form.
    #[inline]
    fn close(&mut self) {
        let start = self.open.pop().expect("an open element");
        let len = self.buf.len() - start;
        if len < 0x80 {
            self.buf[start - 1] = len as u8;
        } else {
            let mut l = Vec::with_capacity(9);
            write_len(&mut l, len);
            self.buf[start - 1] = l[0];
            self.buf.splice(start..start, l[1..].iter().copied());
        }
    }

    /// A primitive element.
    #[inline]
    fn put(&mut self, tag: u8, value: &[u8]) {
        put_tlv(&mut self.buf, tag, value);
    }

    #[inline]
    fn octets(&mut self, value: &[u8]) {
        self.put(0x04, value);
    }

    /// An INTEGER (or another tag with an integer's contents), minimal.
    #[inline]
    fn int(&mut self, tag: u8, v: i64) {
        let bytes = v.to_be_bytes();
        self.put(tag, &bytes[int_skip(&bytes)..]);
    }

    /// An attribute (type and values) as in add and modify.
    #[inline]
    fn attribute(&mut self, atype: &str, vals: &[&[u8]]) {
        self.open(0x30);
        self.octets(atype.as_bytes());
        self.open(0x31);
        for v in vals {
            self.octets(v);
        }
        self.close();
        self.close();
    }

    /// An extended request (name, maybe a value).
    #[inline]
    fn extended(&mut self, name: &[u8], value: Option<&[u8]>) {
        self.open(0x77);
        self.put(0x80, name);
        if let Some(v) = value {
            self.put(0x81, v);
        }
        self.close();
    }
}

/// Request controls: none, ManageDsaIT, an unknown critical one, an unknown
/// non-critical one, the proxied authorization of the operator, the
/// relax rules, dontUseCopy, and two at once: the `[0] Controls`, nothing
/// for none.
#[inline]
fn controls(w: &mut Ber, which: u8) {
    let one = |w: &mut Ber, oid: &str, critical: bool, value: Option<&[&[u8]]>| {
        w.open(0x30);
        w.octets(oid.as_bytes());
        if critical {
            w.put(0x01, &[0xff]);
        }
        if let Some(parts) = value {
            w.open(0x04);
            for p in parts {
                w.buf.extend_from_slice(p);
            }
            w.close();
        }
        w.close();
    };
    if which % 8 == 0 {
        return;
    }
    w.open(0xa0);
    match which % 8 {
        1 => one(w, "2.16.840.1.113730.3.4.2", false, None),
        2 => one(w, "1.2.3.4.5.6.7.8.9", true, Some(&[b"x"])),
        3 => one(w, "1.2.3.4.5.6.7.8.9", false, None),
        4 => one(
            w,
            "2.16.840.1.113730.3.4.18",
            true,
            Some(&[b"dn:", OPERATOR.as_bytes()]),
        ),
        5 => one(w, "1.3.6.1.4.1.4203.666.5.12", true, None),
        6 => one(w, "1.3.6.1.1.22", true, None),
        _ => {
            one(w, "2.16.840.1.113730.3.4.2", false, None);
            one(w, "1.2.3.4.5.6.7.8.9", false, None);
        }
    }
    w.close();
}

/// How many leading bytes of a big-endian `i64` a minimal INTEGER skips.
#[inline]
pub(super) fn int_skip(bytes: &[u8; 8]) -> usize {
    let mut skip = 0;
    while skip < 7
        && ((bytes[skip] == 0 && bytes[skip + 1] & 0x80 == 0)
            || (bytes[skip] == 0xff && bytes[skip + 1] & 0x80 != 0))
    {
        skip += 1;
    }
    skip
}

/// A BER INTEGER's contents, minimal.
#[cfg(test)]
fn int(v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    bytes[int_skip(&bytes)..].to_vec()
}

#[inline]
fn bind(r: &mut Reader, w: &mut Ber) {
    let p = r.byte();
    w.open(0x60);
    w.put(0x02, &[3]);
    match p % 8 {
        // SASL: EXTERNAL (no credentials), DIGEST-MD5 (a security layer
        // may follow: the client's later bytes are not LDAP).
        5 => {
            w.octets(b"");
            w.open(0xa3);
            w.octets(b"EXTERNAL");
            w.close();
        }
        6 => {
            w.octets(b"");
            w.open(0xa3);
            w.octets(b"DIGEST-MD5");
            w.octets(b"response");
            w.close();
        }
        n => {
            let who = WHO[n as usize % WHO.len()];
            w.octets(who.as_bytes());
            let password: &[u8] = if who.is_empty() || p & 8 != 0 {
                b""
            } else {
                b"secret"
            };
            w.put(0x80, password);
        }
    }
    w.close();
}

/// A search request; its parameter byte (a persistent search's control
/// is written from it).
#[inline]
fn search(r: &mut Reader, w: &mut Ber) -> u8 {
    let p = r.byte();
    w.open(0x63);
    w.octets(DNS[p as usize % DNS.len()].as_bytes());
    w.put(0x0a, &[(p >> 3) % 3]); // scope
    w.put(0x0a, &[0]); // derefAliases
    w.put(0x02, &[0]); // sizeLimit
    w.put(0x02, &[0]); // timeLimit
    w.put(0x01, &[0]); // typesOnly
    w.put(0x87, b"objectClass"); // (objectClass=*)
    w.open(0x30);
    if p & 0x20 != 0 {
        w.octets(b"supportedExtension");
    }
    w.close();
    w.close();
    p
}

/// The control of a persistent search: the sync request control
/// (refreshAndPersist), or the older persistent search control.
#[inline]
fn persistent_search(w: &mut Ber, p: u8) {
    w.open(0xa0);
    w.open(0x30);
    if p & 0x40 != 0 {
        w.octets(oid::PERSISTENT_SEARCH);
        w.open(0x04);
        w.open(0x30);
        w.put(0x02, &[0x0f]); // changeTypes: all
        w.put(0x01, &[0]); // changesOnly
        w.put(0x01, &[0]); // returnECs
        w.close();
        w.close();
    } else {
        w.octets(oid::SYNC_REQUEST);
        w.open(0x04);
        w.open(0x30);
        w.put(0x0a, &[3]); // refreshAndPersist
        w.close();
        w.close();
    }
    w.close();
    w.close();
}

#[inline]
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

#[inline]
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

/// The structured format (see `session.rs`): one command byte, its kind
/// the low four bits, then its parameters.
#[inline]
fn structured(body: &[u8]) -> impl Iterator<Item = Step<'_>> {
    let mut r = Reader { data: body };
    let mut w = Ber::new();
    std::iter::from_fn(move || (!r.data.is_empty()).then(|| structured_step(&mut r, &mut w)))
        .take(MAX_STEPS)
}

/// The next structured command (the body is not empty).
#[inline]
fn structured_step<'a>(r: &mut Reader<'a>, w: &mut Ber) -> Step<'a> {
    let c = r.byte();
    let kind = c & 0x0f;
    match kind {
        13 => {
            // The operator, through the engine.
            let p = r.byte();
            return if c & 0x10 != 0 {
                Step::Off(match p % 4 {
                    0 => None,
                    n => Some(u64::from(n)),
                })
            } else {
                Step::On(p)
            };
        }
        14 => {
            // The upstream.
            let p = r.byte();
            return Step::Up(match c >> 4 {
                0..=5 => UpCmd::Answer(1 + p as usize % 4),
                6..=9 => UpCmd::AnswerAt(p as usize),
                10 | 11 => UpCmd::Auto(true),
                12..=14 => UpCmd::Auto(false),
                _ => UpCmd::Close,
            });
        }
        15 => {
            return if c & 0xf0 == 0xf0 {
                // Raw client bytes (1-byte length): whatever else.
                let n = r.byte() as usize;
                Step::Client(Cow::Borrowed(r.bytes(n)))
            } else {
                Step::Settle {
                    check: c & 0x10 != 0,
                }
            };
        }
        _ => {}
    }
    // A message: its ID first, then its operation's parameters, then
    // (the command's high bit, on the operations that take them) a
    // byte of request controls.
    let id = |r: &mut Reader| IDS[r.byte() as usize % IDS.len()];
    let dn = |b: u8| DNS[b as usize % DNS.len()].as_bytes();
    let ctrl = |r: &mut Reader, w: &mut Ber| {
        if c & 0x80 != 0 {
            controls(w, r.byte());
        }
    };
    w.buf.clear();
    w.open(0x30);
    w.int(0x02, id(r).into());
    match kind {
        0 => bind(r, w),
        1 => {
            w.open(0x68);
            w.octets(dn(r.byte()));
            w.open(0x30);
            w.attribute("objectClass", &[b"organizationalRole"]);
            w.attribute("cn", &[b"a"]);
            w.close();
            w.close();
            ctrl(r, w);
        }
        2 => {
            w.put(0x4a, dn(r.byte()));
            ctrl(r, w);
        }
        3 => {
            let p = r.byte();
            w.open(0x66);
            w.octets(dn(p));
            w.open(0x30);
            w.open(0x30);
            w.put(0x0a, &[(p >> 3) % 3]);
            let who = if p & 0x40 != 0 {
                "userPassword"
            } else {
                "description"
            };
            w.attribute(who, &[b"x"]);
            w.close();
            w.close();
            w.close();
            ctrl(r, w);
        }
        4 => {
            let p = r.byte();
            w.open(0x6c);
            w.octets(dn(p));
            w.octets(b"cn=moved");
            w.put(0x01, &[0xff]);
            if p & 0x80 != 0 {
                // newSuperior: maybe another backend.
                w.put(0x80, dn(p >> 4));
            }
            w.close();
            ctrl(r, w);
        }
        5 => {
            w.open(0x6e);
            w.octets(dn(r.byte()));
            w.open(0x30);
            w.octets(b"cn");
            w.octets(b"a");
            w.close();
            w.close();
            ctrl(r, w);
        }
        6 | 7 => {
            let p = search(r, w);
            if kind == 7 {
                persistent_search(w, p);
            } else {
                ctrl(r, w);
            }
        }
        8 => {
            let target = id(r);
            w.int(0x50, target.into());
        }
        9 => {
            // Unbind, rarely (it ends the session): otherwise WhoAmI.
            if c & 0x70 == 0x70 {
                w.put(0x42, &[]);
            } else {
                w.extended(oid::WHOAMI, None);
            }
        }
        10 => {
            // Allow-Backup ON from the client.
            let (p, q) = (r.byte(), r.byte());
            let name = abproxy_proto::ALLOW_BACKUP_OID.as_bytes();
            w.extended(name, Some(&allow_backup_on(p, q)));
        }
        11 => {
            // Allow-Backup OFF or status from the client.
            let (p, q) = (r.byte(), r.byte());
            if p & 0x80 != 0 {
                w.extended(abproxy_proto::ALLOW_BACKUP_STATUS_OID.as_bytes(), None);
            } else {
                let name = abproxy_proto::ALLOW_BACKUP_OID.as_bytes();
                w.extended(name, Some(&allow_backup_off(p, q)));
            }
        }
        _ => {
            // 12: other extended operations: a password modify (of
            // the bound identity, or of an entry of either backend),
            // Cancel of an ID, StartTLS, an unknown one.
            let p = r.byte();
            w.open(0x77);
            match p % 4 {
                0 => {
                    w.put(0x80, oid::PASSWORD_MODIFY);
                    w.open(0x81);
                    w.open(0x30);
                    if p & 4 != 0 {
                        w.put(0x80, dn(p >> 3));
                    }
                    w.put(0x82, b"new");
                    w.close();
                    w.close();
                }
                1 => {
                    w.put(0x80, oid::CANCEL);
                    w.open(0x81);
                    w.open(0x30);
                    w.int(0x02, IDS[(p >> 2) as usize % IDS.len()].into());
                    w.close();
                    w.close();
                }
                2 => w.put(0x80, oid::START_TLS),
                _ => {
                    w.put(0x80, b"1.2.3.4.5");
                    w.put(0x81, b"?");
                }
            }
            w.close();
            ctrl(r, w);
        }
    }
    w.close();
    Step::Client(Cow::Owned(w.buf.as_slice().to_vec()))
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
                for step in structured(&input).take(1) {
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
