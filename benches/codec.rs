//! Per-message CPU cost of the proxy's hot path: framing (`FrameCodec`) and
//! the envelope peek (`Envelope::request` / `Envelope::response`), compared
//! with a full decode of the same bytes by `ldap3_proto::LdapCodec`.
//!
//! Run: `cargo bench --bench codec` (add `-- <filter>` to select, e.g.
//! `-- frame/`). Every benchmark reports a time per iteration and a
//! throughput in messages (elements) per second; ns per message is
//! `1e3 / Melem/s` (the pipelined benchmarks handle 100 messages per
//! iteration).
//!
//! Messages (built with `ldap3_proto` types, encoded with
//! `abproxy::wire::pdu::encode`):
//! * `search_req`: a subtree search with an AND filter, 4 attributes and a
//!   simple paged results control (RFC 2696);
//! * `entry`: a search result entry with 11 attributes (an inetOrgPerson /
//!   posixAccount like the lab's sample users);
//! * `modify`: a modify request replacing `description` and adding `mail`.

use std::hint::black_box;
use std::time::Duration;

use abproxy::wire::{pdu, Envelope, FrameCodec};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ldap3_proto::control::LdapControl;
use ldap3_proto::proto::{
    LdapDerefAliases, LdapFilter, LdapModify, LdapModifyRequest, LdapModifyType, LdapMsg, LdapOp,
    LdapPartialAttribute, LdapSearchRequest, LdapSearchResultEntry, LdapSearchScope,
};
use ldap3_proto::LdapCodec;
use tokio_util::codec::Decoder;

/// Messages per buffer in the pipelined benchmarks.
const PIPELINE: usize = 100;

fn attr(name: &str, vals: &[&str]) -> LdapPartialAttribute {
    LdapPartialAttribute {
        atype: name.to_string(),
        vals: vals.iter().map(|v| v.as_bytes().to_vec()).collect(),
    }
}

fn search_request(msgid: i32) -> Bytes {
    let mut msg = LdapMsg::new(
        msgid,
        LdapOp::SearchRequest(LdapSearchRequest {
            base: "ou=people,dc=example,dc=org".into(),
            scope: LdapSearchScope::Subtree,
            aliases: LdapDerefAliases::Never,
            sizelimit: 0,
            timelimit: 0,
            typesonly: false,
            filter: LdapFilter::And(vec![
                LdapFilter::Equality("objectClass".into(), "inetOrgPerson".into()),
                LdapFilter::Equality("uid".into(), "user42".into()),
            ]),
            attrs: vec![
                "cn".into(),
                "mail".into(),
                "uid".into(),
                "description".into(),
            ],
        }),
    );
    msg.ctrl.push(LdapControl::SimplePagedResults {
        size: 100,
        cookie: Vec::new(),
    });
    pdu::encode(msg)
}

fn search_entry(msgid: i32) -> Bytes {
    pdu::encode(LdapMsg::new(
        msgid,
        LdapOp::SearchResultEntry(LdapSearchResultEntry {
            dn: "uid=user42,ou=people,dc=example,dc=org".into(),
            attributes: vec![
                attr(
                    "objectClass",
                    &[
                        "top",
                        "person",
                        "organizationalPerson",
                        "inetOrgPerson",
                        "posixAccount",
                    ],
                ),
                attr("uid", &["user42"]),
                attr("cn", &["User 42"]),
                attr("sn", &["User42"]),
                attr("givenName", &["Test"]),
                attr("mail", &["user42@example.org"]),
                attr("uidNumber", &["10042"]),
                attr("gidNumber", &["10000"]),
                attr("homeDirectory", &["/home/user42"]),
                attr("loginShell", &["/bin/bash"]),
                attr("description", &["initial"]),
            ],
        }),
    ))
}

fn modify_request(msgid: i32) -> Bytes {
    pdu::encode(LdapMsg::new(
        msgid,
        LdapOp::ModifyRequest(LdapModifyRequest {
            dn: "uid=user42,ou=people,dc=example,dc=org".into(),
            changes: vec![
                LdapModify {
                    operation: LdapModifyType::Replace,
                    modification: attr("description", &["changed by the codec benchmark"]),
                },
                LdapModify {
                    operation: LdapModifyType::Add,
                    modification: attr("mail", &["user42@other.example.org"]),
                },
            ],
        }),
    ))
}

/// One test message: its name, how it is built, and whether it is a request.
struct Case {
    name: &'static str,
    build: fn(i32) -> Bytes,
    request: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "search_req",
        build: search_request,
        request: true,
    },
    Case {
        name: "entry",
        build: search_entry,
        request: false,
    },
    Case {
        name: "modify",
        build: modify_request,
        request: true,
    },
];

impl Case {
    fn one(&self) -> Bytes {
        (self.build)(7)
    }

    /// `PIPELINE` messages back to back (message IDs 1..=100).
    fn pipelined(&self) -> Bytes {
        let mut buf = BytesMut::new();
        for id in 1..=PIPELINE as i32 {
            buf.extend_from_slice(&(self.build)(id));
        }
        buf.freeze()
    }

    #[inline]
    fn peek(&self, frame: &[u8]) -> Envelope {
        let env = if self.request {
            Envelope::request(frame)
        } else {
            Envelope::response(frame)
        };
        env.expect("benchmark messages are well-formed")
    }
}

/// Sanity checks, so the benchmarks measure what they claim to.
fn check(case: &Case) {
    let one = case.one();
    eprintln!("codec: {} is {} bytes", case.name, one.len());
    let mut buf = BytesMut::from(&one[..]);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert_eq!(frame, one);
    assert!(buf.is_empty());
    let env = case.peek(&frame);
    assert_eq!(env.msgid, 7);
    assert!(env.dn_span().is_some());
    if case.name == "search_req" {
        assert!(env.has_control(&frame, b"1.2.840.113556.1.4.319"));
    }
    let msg = ldap3_codec()
        .decode(&mut BytesMut::from(&one[..]))
        .unwrap()
        .unwrap();
    assert_eq!(msg.msgid, 7);
    let mut buf = BytesMut::from(&case.pipelined()[..]);
    let mut n = 0;
    while ldap3_codec().decode(&mut buf).unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, PIPELINE);
}

/// `LdapCodec` with limits large enough for the pipelined buffers (its
/// default refuses buffers over 64 KiB).
fn ldap3_codec() -> LdapCodec {
    LdapCodec::new(Some(abproxy::wire::DEFAULT_MAX_PDU), None)
}

/// `FrameCodec::decode` alone: one message in the buffer, and 100 pipelined
/// messages cut one by one.
fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for case in &CASES {
        check(case);
        let one = case.one();
        let many = case.pipelined();
        let mut codec = FrameCodec::default();

        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("one/{}", case.name), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&one[..]),
                |buf| codec.decode(buf).unwrap(),
                BatchSize::SmallInput,
            )
        });

        g.throughput(Throughput::Elements(PIPELINE as u64));
        g.bench_function(format!("pipelined100/{}", case.name), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&many[..]),
                |buf| {
                    let mut n = 0usize;
                    while let Some(f) = codec.decode(buf).unwrap() {
                        n += black_box(f).len();
                    }
                    n
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The envelope peek alone, on an already framed message.
fn peek(c: &mut Criterion) {
    let mut g = c.benchmark_group("peek");
    g.throughput(Throughput::Elements(1));
    for case in &CASES {
        let one = case.one();
        g.bench_function(case.name, |b| b.iter(|| case.peek(black_box(&one))));
    }
    g.finish();
}

/// What the proxy does per message: frame + peek, 100 pipelined messages.
fn frame_and_peek(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame+peek");
    g.throughput(Throughput::Elements(PIPELINE as u64));
    for case in &CASES {
        let many = case.pipelined();
        let mut codec = FrameCodec::default();
        g.bench_function(format!("pipelined100/{}", case.name), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&many[..]),
                |buf| {
                    let mut ids = 0i64;
                    while let Some(f) = codec.decode(buf).unwrap() {
                        ids += i64::from(case.peek(&f).msgid);
                    }
                    ids
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The alternative: a full `ldap3_proto::LdapCodec` decode of the same
/// bytes into an owned `LdapMsg` (what the proxy would pay to inspect a
/// message with the library, before even re-encoding it).
fn ldap3_proto_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ldap3_proto");
    for case in &CASES {
        let one = case.one();
        let many = case.pipelined();
        let mut codec = ldap3_codec();

        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("one/{}", case.name), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&one[..]),
                |buf| codec.decode(buf).unwrap(),
                BatchSize::SmallInput,
            )
        });

        g.throughput(Throughput::Elements(PIPELINE as u64));
        g.bench_function(format!("pipelined100/{}", case.name), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&many[..]),
                |buf| {
                    let mut ids = 0i64;
                    while let Some(m) = codec.decode(buf).unwrap() {
                        ids += i64::from(black_box(m).msgid);
                    }
                    ids
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short defaults for a small, noisy machine; `-- --measurement-time N`
    // and `-- --warm-up-time N` override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = framing, peek, frame_and_peek, ldap3_proto_decode
}
criterion_main!(benches);
