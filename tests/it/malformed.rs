//! Malformed PDUs against a live proxy (`abproxy serve`) in front of a real
//! slapd: 10,000+ mutations of valid requests (bit flips, length edits,
//! truncation, wrong tags, huge declared lengths, nesting, junk after a
//! valid PDU, tiny writes). Each bad session must end with the proxy's
//! Notice of Disconnection (protocolError), or give exactly what slapd
//! gives for the same bytes; the proxy never crashes or hangs, and a client
//! working alongside is never disturbed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::process::*;
use crate::support::shim::Shim;
use crate::support::*;
use abproxy::wire::envelope::oid;
use abproxy::wire::{op, Envelope};
use bytes::Bytes;
use ldap3_proto::proto::*;
use testkit::{user_dn, SlapdOptions, ADMIN_DN, ADMIN_PW};
use tokio::io::AsyncWriteExt;

const MUTANTS: usize = 10_000;
/// Whoami, sent after each mutant: its answer (or the end of the session)
/// says the mutant has been dealt with.
const PROBE_ID: i32 = 4242;

/// A small deterministic PRNG (xorshift), so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn valid_requests() -> Vec<Bytes> {
    let mut paged = search(
        2,
        "ou=people,dc=example,dc=org",
        1,
        "(&(uid=user1*)(!(cn=x)))",
        &["uid", "cn"],
    );
    paged
        .ctrl
        .push(ldap3_proto::control::LdapControl::SimplePagedResults {
            size: 3,
            cookie: Vec::new(),
        });
    let modify = LdapMsg::new(
        3,
        LdapOp::ModifyRequest(LdapModifyRequest {
            dn: user_dn(2),
            changes: vec![LdapModify {
                operation: LdapModifyType::Replace,
                modification: LdapPartialAttribute {
                    atype: "description".into(),
                    vals: vec![b"mutant".to_vec()],
                },
            }],
        }),
    );
    let moddn = LdapMsg::new(
        4,
        LdapOp::ModifyDNRequest(LdapModifyDNRequest {
            dn: "uid=nobody,ou=people,dc=example,dc=org".into(),
            newrdn: "uid=nobody2".into(),
            deleteoldrdn: true,
            new_superior: Some("ou=groups,dc=example,dc=org".into()),
        }),
    );
    let compare = LdapMsg::new(
        5,
        LdapOp::CompareRequest(LdapCompareRequest {
            dn: user_dn(3),
            atype: "uid".into(),
            val: b"user3".to_vec(),
        }),
    );
    let ext = LdapMsg::new(
        6,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: "1.3.6.1.4.1.4203.1.11.1".into(),
            value: Some(vec![0x30, 0x05, 0x80, 0x03, b'x', b'=', b'y']),
        }),
    );
    [
        bind(1, &user_dn(1), "pass1"),
        paged,
        modify,
        moddn,
        compare,
        ext,
        LdapMsg::new(7, LdapOp::DelRequest("cn=ghost,dc=example,dc=org".into())),
        LdapMsg::new(8, LdapOp::AbandonRequest(3)),
        search(9, "", 0, "(objectClass=*)", &["namingContexts"]),
    ]
    .into_iter()
    .map(encode)
    .collect()
}

/// Nested constructed elements (a filter of nested ANDs, `depth` deep).
fn nested_search(depth: usize) -> Vec<u8> {
    let mut filter = vec![0x87, 0x03, b'u', b'i', b'd'];
    for _ in 0..depth {
        let mut f = vec![0xa0];
        abproxy::wire::ber::write_len(&mut f, filter.len());
        f.extend_from_slice(&filter);
        filter = f;
    }
    let mut body = vec![
        0x04, 0x00, 0x0a, 0x01, 0x02, 0x0a, 0x01, 0x00, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00, 0x01,
        0x01, 0x00,
    ];
    body.extend_from_slice(&filter);
    body.extend_from_slice(&[0x30, 0x00]);
    let mut op = vec![0x63];
    abproxy::wire::ber::write_len(&mut op, body.len());
    op.extend_from_slice(&body);
    let mut inner = vec![0x02, 0x01, 0x0b];
    inner.extend_from_slice(&op);
    let mut msg = vec![0x30];
    abproxy::wire::ber::write_len(&mut msg, inner.len());
    msg.extend_from_slice(&inner);
    msg
}

fn mutate(rng: &mut Rng, valid: &[Bytes]) -> (Vec<u8>, bool) {
    let base = valid[rng.below(valid.len())].to_vec();
    let mut m = base.clone();
    let tiny_writes = rng.below(50) == 0;
    match rng.below(9) {
        0 | 1 => {
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            // A length octet (one of the first few headers) changed.
            let i = 1 + rng.below(m.len().min(12) - 1);
            m[i] = rng.next() as u8;
        }
        3 => m.truncate(rng.below(m.len())),
        4 => {
            // A wrong tag somewhere.
            let i = rng.below(m.len());
            m[i] = [0x04, 0x30, 0x31, 0x02, 0x0a, 0x80, 0xa0, 0x1f, 0x00][rng.below(9)];
        }
        5 => {
            // A huge declared length.
            let n = 1 + rng.below(5);
            let mut h = vec![0x30, 0x80 | n as u8];
            h.extend(std::iter::repeat_n(0xff, n));
            h.extend_from_slice(&m[2.min(m.len())..]);
            m = h;
        }
        6 => m = nested_search(1 + rng.below(200)),
        7 => {
            // Junk after a valid PDU.
            for _ in 0..1 + rng.below(16) {
                m.push(rng.next() as u8);
            }
        }
        _ => {
            // Random bytes spliced in.
            let i = rng.below(m.len());
            let junk: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
            m.splice(i..i, junk);
        }
    }
    (m, tiny_writes)
}

fn probe() -> Vec<u8> {
    encode(LdapMsg::new(
        PROBE_ID,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: "1.3.6.1.4.1.4203.1.11.3".into(),
            value: None,
        }),
    ))
    .to_vec()
}

/// Sends `bytes` then the probe; returns the frames until the probe's answer
/// and the mutant's own final answer (when it can expect one), or the end of
/// the session (and whether it ended). slapd may answer the two in either
/// order, so both are awaited.
async fn exchange(addr: &str, bytes: &[u8], tiny: bool) -> (Vec<Bytes>, bool) {
    // The mutant's message ID and whether it expects an answer, as the
    // proxy reads it (if it can).
    let own = Envelope::request(bytes)
        .ok()
        .filter(|e| {
            e.msgid != PROBE_ID && !matches!(e.op, op::ABANDON_REQUEST | op::UNBIND_REQUEST)
        })
        .map(|e| e.msgid);
    let mut c = RawConn::connect(addr).await;
    if tiny {
        for chunk in bytes.chunks(3) {
            if c.stream.write_all(chunk).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    } else {
        let _ = c.stream.write_all(bytes).await;
    }
    let _ = c.stream.write_all(&probe()).await;
    let mut frames = Vec::new();
    let (mut probe_done, mut own_done) = (false, own.is_none());
    while !(probe_done && own_done) {
        let Some(f) = c.recv().await else {
            return (frames, true);
        };
        if let Ok(e) = Envelope::response(&f) {
            probe_done |= e.msgid == PROBE_ID;
            // A final answer, or slapd giving up on the message (a Notice
            // of Disconnection, after which it may keep the session).
            own_done |= (Some(e.msgid) == own && op::is_final_response(e.op)) || e.msgid == 0;
        }
        frames.push(f);
    }
    (frames, false)
}

/// The frames of one message ID, in order.
fn of(frames: &[Bytes], msgid: i32) -> Vec<Bytes> {
    frames
        .iter()
        .filter(|f| Envelope::response(f).is_ok_and(|e| e.msgid == msgid))
        .cloned()
        .collect()
}

/// True unless the probe after `mutant` is a message of its own (or a
/// framing error comes first): when the mutant's declared length runs into
/// or past the probe, the server (and the proxy) rightly wait for more bytes
/// or take the probe as part of the mutant, and the probe is never answered.
fn probe_swallowed(mutant: &[u8], stream: &[u8]) -> bool {
    let mut pos = 0;
    while pos < mutant.len() {
        match abproxy::wire::codec::frame_len(&stream[pos..], 64 * 1024) {
            Ok(Some(n)) => pos += n,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
    pos != mutant.len()
}

/// An incomplete message, then the client closes: the proxy must close too
/// (the upstream sees the EOF), never hang.
async fn close_after(addr: &str, bytes: &[u8]) {
    let mut c = RawConn::connect(addr).await;
    let _ = c.stream.write_all(bytes).await;
    let _ = c.stream.shutdown().await;
    let _ = c.recv_all().await;
}

fn is_notice(frame: &[u8], code: i64) -> bool {
    Envelope::response(frame).is_ok_and(|e| {
        e.msgid == 0
            && e.op == op::EXTENDED_RESPONSE
            && e.oid_bytes(frame) == Some(oid::NOTICE_OF_DISCONNECTION)
            && e.result_code == Some(code)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_pdus() {
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            users: 20,
            ..Default::default()
        },
        |c| c.max_pdu_bytes = 64 * 1024,
    )
    .await;
    let valid = Arc::new(valid_requests());
    // The proxy under test talks to slapd through a shim that checks every
    // byte it forwards is a whole, readable LDAPMessage.
    let shim = Shim::start(&lab.direct_addr()).await;
    // It runs as its own process (the built binary): its resident memory is
    // measured alone, not with this test process's, which every other test
    // of the binary shares.
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy) = write_config(dir.path(), &shim.url(), "max_pdu_bytes = 65536\n");
    let mut under_test = Running::start(&["serve", "--config", &config]);
    under_test.wait_for("listening");
    let pid = under_test.child.id();
    let direct = lab.direct_addr();
    let rss_before = rss_kib(pid);

    // A client working alongside the whole time.
    let stop = tokio_util::sync::CancellationToken::new();
    let bystander = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = RawConn::connect(&proxy).await;
            c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
            assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                c.send_msg(search(n + 1, &user_dn(1), 0, "(objectClass=*)", &["uid"]))
                    .await;
                let r = c.recv_until_final(n + 1).await;
                assert_eq!(
                    result_code(r.last().unwrap()),
                    Some(0),
                    "bystander search {n}"
                );
            }
            n
        })
    };

    let refused = Arc::new(AtomicUsize::new(0));
    let waited = Arc::new(AtomicUsize::new(0));
    let by_server = Arc::new(AtomicUsize::new(0));
    let same = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    const WORKERS: usize = 16;
    for w in 0..WORKERS {
        let (valid, proxy, direct) = (valid.clone(), proxy.clone(), direct.clone());
        let (refused, same, waited) = (refused.clone(), same.clone(), waited.clone());
        let by_server = by_server.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
            for i in 0..MUTANTS / WORKERS {
                let (m, tiny) = mutate(&mut rng, &valid);
                let mut stream = m.clone();
                stream.extend_from_slice(&probe());
                if probe_swallowed(&m, &stream) {
                    tokio::time::timeout(Duration::from_secs(30), close_after(&proxy, &stream))
                        .await
                        .unwrap_or_else(|_| {
                            panic!("worker {w} mutant {i}: no close after EOF: {m:02x?}")
                        });
                    waited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let (p, p_closed) =
                    tokio::time::timeout(Duration::from_secs(30), exchange(&proxy, &m, tiny))
                        .await
                        .unwrap_or_else(|_| panic!("worker {w} mutant {i} hung: {m:02x?}"));
                // The proxy ended the bad session with its notice.
                if p_closed && p.last().is_some_and(|f| is_notice(f, 2)) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // An unbind (however malformed its NULL): the session ends
                // there, nothing after it is forwarded (RFC 4511 4.3; slapd
                // may still answer a request that raced with it).
                if Envelope::request(&m).is_ok_and(|e| e.op == op::UNBIND_REQUEST) {
                    assert!(
                        p_closed && p.is_empty(),
                        "worker {w} mutant {i}: unbind answered: {p:02x?}"
                    );
                    waited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Forwarded. slapd rejecting it (a notice, or closing) is
                // timing-dependent (how the bytes arrive in its reads), so
                // then only a clean end is required; otherwise the mutant's
                // answer is exactly what slapd gives for the same bytes.
                let (d, d_closed) = exchange(&direct, &m, false).await;
                let rejected = |frames: &[Bytes], closed: bool| {
                    closed
                        || frames
                            .iter()
                            .any(|f| Envelope::response(f).is_ok_and(|e| e.msgid == 0))
                };
                if rejected(&p, p_closed) || rejected(&d, d_closed) {
                    by_server.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let msgid = Envelope::request(&m).map(|e| e.msgid).unwrap_or(-1);
                assert!(
                    of(&p, msgid) == of(&d, msgid),
                    "worker {w} mutant {i} {m:02x?}: proxy {p:02x?} vs direct {d:02x?}"
                );
                same.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("a worker failed");
    }
    stop.cancel();
    let searches = bystander.await.expect("the bystander was disturbed");
    let (refused, same) = (
        refused.load(Ordering::Relaxed),
        same.load(Ordering::Relaxed),
    );
    let waited = waited.load(Ordering::Relaxed);
    let by_server = by_server.load(Ordering::Relaxed);
    eprintln!(
        "{MUTANTS} mutants: {refused} refused by the proxy with a notice, {same} answered as slapd \
         answers them, {by_server} rejected by slapd, {waited} ended by the client (unbind, or a \
         message waiting for more bytes)"
    );
    assert_eq!(refused + same + by_server + waited, MUTANTS);
    assert!(
        refused > MUTANTS / 10 && same > MUTANTS / 10,
        "refused {refused}, forwarded {same}"
    );
    assert!(searches > 10);
    // No malformed byte reached slapd, and the proxy still serves.
    assert_eq!(shim.counters.malformed.load(Ordering::SeqCst), 0);
    assert!(shim.counters.accepted.load(Ordering::SeqCst) > MUTANTS / 2);
    let r = ldap_tool(
        "ldapwhoami",
        &["-x", "-H", &format!("ldap://{proxy}")],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "anonymous");
    // Every session is gone, and so is its memory (allocator slack aside).
    wait_until("all shim connections to close", 30, || {
        shim.counters.open.load(Ordering::SeqCst) == 0
    })
    .await;
    let grown = rss_kib(pid).saturating_sub(rss_before);
    eprintln!("the proxy's resident memory grew by {grown} KiB over the run");
    assert!(grown < 64 * 1024, "resident memory grew by {grown} KiB");
    assert_eq!(under_test.sigterm_and_wait(), 0);
}
