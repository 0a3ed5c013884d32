//! Hostile and unlucky clients against the freeze (issue 18): raw BER over a
//! socket, a real slapd behind the proxy, one test (and one lab) per attack.
//!
//! abproxy promises two things: between ON's success and OFF nothing reaches
//! a frozen backend, and only the configured operators can freeze, resume or
//! read the status. Each test here tries to break one of them the way the
//! issue reproduced it (message-ID reuse, abandon of a write in flight,
//! binds pipelined behind writes, empty-password binds, critical controls,
//! quoted DN spellings, cn=config and DNs under no backend, an operator bind
//! queued behind held requests, a client closing behind a slow write) and
//! checks, read directly from slapd (never through the proxy), that the
//! frozen backend did not change while ON reported success (contextCSN of
//! the suffix and the data itself, by `slapcat`), and that clients whose
//! requests would succeed without a freeze saw no error.
//!
//! Slow writes are an add with 250,000 `member` values ([`slow_add`]), which
//! slapd takes about 1.5 s to commit here. States are awaited by polling
//! the proxy's status (bounded) or by awaiting responses; only the
//! message-ID race (a timing attack) is a bounded loop.

use std::time::{Duration, Instant};

use crate::support::freeze::*;
use crate::support::*;
use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::Mode;
use abproxy::wire::{op, Envelope};
use abproxy_proto::{AllowBackupRequest, FreezeState, ALLOW_BACKUP_STATUS_OID};
use bytes::Bytes;
use ldap3_proto::proto::*;
use testkit::{user_dn, SlapdOptions, ADMIN_DN, ADMIN_PW, CONFIG_ADMIN_DN, OTHER_ADMIN_DN};

const SUFFIX: &str = "dc=example,dc=org";
/// The DN of the slow add.
const SLOW_DN: &str = "cn=slow,ou=groups,dc=example,dc=org";
/// Values of the slow add (about 1.5 s in slapd).
const SLOW_VALUES: usize = 250_000;
/// The "Who am I?" extended operation (RFC 4532).
const WHOAMI: &str = "1.3.6.1.4.1.4203.1.11.3";

/// slapd (nosync) and the proxy, both root DNs allowed to freeze.
async fn lab(tweak: impl FnOnce(&mut Config)) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c| {
            c.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
            tweak(c)
        },
    )
    .await
}

fn modify(msgid: i32, dn: &str, attr: &str, val: &str) -> LdapMsg {
    modify_op(msgid, dn, LdapModifyType::Replace, attr, val)
}

fn modify_op(msgid: i32, dn: &str, how: LdapModifyType, attr: &str, val: &str) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::ModifyRequest(LdapModifyRequest {
            dn: dn.into(),
            changes: vec![LdapModify {
                operation: how,
                modification: LdapPartialAttribute {
                    atype: attr.into(),
                    vals: vec![val.as_bytes().to_vec()],
                },
            }],
        }),
    )
}

/// A raw connection straight to slapd, bound as `dn`.
async fn direct_bound(lab: &Lab, dn: &str, pw: &str) -> RawConn {
    let mut c = RawConn::connect(&lab.direct_addr()).await;
    c.send_msg(bind(1, dn, pw)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    c
}

/// What a backend holds, read from slapd itself: contextCSN, a slapcat
/// dump of the database, and the LMDB meta pages of its `data.mdb` (the
/// first two 4 KiB pages: they carry the last committed transaction, so
/// any write to the file moves them, index rebuilds included).
#[derive(PartialEq, Eq)]
struct Backend {
    csn: String,
    ldif: String,
    meta: Vec<u8>,
}

/// The first 8 KiB of a database's `data.mdb` (a 4 GiB sparse file).
fn mdb_meta(lab: &Lab, suffix: &str) -> Vec<u8> {
    use std::io::Read;
    let db = if suffix == SUFFIX {
        "db-example"
    } else {
        "db-other"
    };
    let mut meta = vec![0; 8192];
    std::fs::File::open(lab.slapd.dir().join(db).join("data.mdb"))
        .unwrap()
        .read_exact(&mut meta)
        .unwrap();
    meta
}

async fn backend(lab: &Lab, suffix: &str) -> Backend {
    let out = tokio::process::Command::new(testkit::SLAPCAT)
        .arg("-F")
        .arg(lab.slapd.dir().join("slapd.d"))
        .arg("-b")
        .arg(suffix)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("slapcat");
    assert!(out.status.success(), "slapcat: {out:?}");
    Backend {
        csn: context_csn(lab, suffix).await,
        ldif: String::from_utf8(out.stdout).unwrap(),
        meta: mdb_meta(lab, suffix),
    }
}

/// Asserts the backend is as it was when ON succeeded.
async fn assert_unchanged(lab: &Lab, suffix: &str, at_on: &Backend) {
    let now = backend(lab, suffix).await;
    assert_eq!(
        now.csn, at_on.csn,
        "{suffix}: contextCSN moved between ON's success and OFF"
    );
    if now.ldif != at_on.ldif {
        let was: std::collections::HashSet<&str> = at_on.ldif.lines().collect();
        let new: Vec<&str> = now
            .ldif
            .lines()
            .filter(|l| !was.contains(l))
            .take(5)
            .map(|l| &l[..l.len().min(120)])
            .collect();
        panic!("{suffix}: the data changed between ON's success and OFF; new lines: {new:?}");
    }
    assert!(
        now.meta == at_on.meta,
        "{suffix}: data.mdb was written (its meta pages changed) between ON's success and OFF"
    );
}

/// The slow add is still running at slapd: an operator's ON must wait for
/// it (the entry exists when ON succeeds: `what` says which add, if not),
/// and dc=example must not change until OFF.
async fn freeze_behind_the_slow_add(lab: &Lab, what: &str) {
    assert!(
        !exists_direct(lab, SLOW_DN).await,
        "precondition: the add is still running when ON is sent"
    );
    let mut op = operator(lab).await;
    let at_on = freeze(lab, &mut op, AllowBackupRequest::on()).await;
    assert!(
        exists_direct(lab, SLOW_DN).await,
        "ON succeeded before {what}"
    );
    assert_unchanged(lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
}

/// Whether `dn` exists at slapd (a base search straight to it).
async fn exists_direct(lab: &Lab, dn: &str) -> bool {
    let out = base_direct(lab, dn, "1.1").await;
    match out.code {
        Some(0) => true,
        Some(32) => false,
        _ => panic!("{out:?}"),
    }
}

/// `attr` of `dn` as slapd itself returns it (as the root DN).
async fn read_direct(lab: &Lab, dn: &str, attr: &str) -> String {
    let out = base_direct(lab, dn, attr).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
}

/// The `description` of sample user `k`, read straight from slapd.
async fn description(lab: &Lab, k: usize) -> String {
    read_direct(lab, &user_dn(k), "description").await
}

/// An operator connection (through the proxy).
async fn operator(lab: &Lab) -> RawConn {
    bound(lab, OTHER_ADMIN_DN, ADMIN_PW).await
}

/// ON from `op` (must succeed); returns the frozen backend's state then.
async fn freeze(lab: &Lab, op: &mut RawConn, req: AllowBackupRequest) -> Backend {
    let (code, msg) = call(op, ab(50, &req)).await;
    assert_eq!(code, 0, "ON: {msg}");
    backend(lab, SUFFIX).await
}

async fn thaw(op: &mut RawConn) {
    let (code, msg) = call(op, ab(51, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "OFF: {msg}");
}

/// Sends the slow add on `c` (bound with write rights) and waits until the
/// proxy has admitted it (status: in flight).
async fn start_slow_add(lab: &Lab, c: &mut RawConn, msgid: i32) {
    c.send_msg(slow_add(msgid, SLOW_DN, SLOW_VALUES)).await;
    wait_status(lab, "the slow add in flight", |s| s.in_flight >= 1).await;
}

/// Reads frames until each of `ids` has its final response or `secs`
/// pass; returns the final responses seen, in arrival order.
async fn finals_within(c: &mut RawConn, ids: &[i32], secs: u64) -> Vec<(i32, i64, Bytes)> {
    let mut got: Vec<(i32, i64, Bytes)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !ids.iter().all(|id| got.iter().any(|g| g.0 == *id)) {
        let Ok(Some(f)) = tokio::time::timeout_at(deadline, c.recv()).await else {
            break;
        };
        let env = Envelope::response(&f).unwrap();
        if op::is_final_response(env.op) {
            got.push((env.msgid, env.result_code.unwrap_or(-1), f));
        }
    }
    got
}

/// The responseValue of an extended response.
fn value_of(frame: &[u8]) -> String {
    let env = Envelope::response(frame).unwrap();
    String::from_utf8_lossy(env.value_bytes(frame).unwrap_or_default()).into_owned()
}

/// Item 1: an anonymous bind and a wrong-password bind as an operator, both
/// with message ID 7. The proxy took the identity from the first bind's
/// success matched to the second bind's DN (when the second reached the
/// proxy after slapd answered the first, before the proxy read that answer;
/// slapd itself drops the first answer when both arrive together). A
/// request reusing an outstanding ID must end the session (protocolError
/// notice); ON must never succeed, and no freeze may name the operator.
/// Measured on the old code: ON succeeds in about 7 % of the tries with a
/// gap of 100-900 µs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_id_reuse_never_turns_a_wrong_password_into_the_operator() {
    let lab = lab(|_| {}).await;
    let anon = encode(bind(7, "", ""));
    let wrong = encode(bind(7, ADMIN_DN, "wrong password"));
    // Answered after both binds (slapd and the proxy keep a bind's order).
    let who = encode(exop(8, WHOAMI, None));
    let mut together = anon.to_vec();
    together.extend_from_slice(&wrong);
    together.extend_from_slice(&who);
    let mut ended = 0;
    for attempt in 0..200u32 {
        let mut c = RawConn::connect(&lab.proxy_addr()).await;
        let gap = Duration::from_micros(u64::from(attempt % 10) * 100);
        if gap.is_zero() {
            // The second bind surely reaches the proxy while the first is
            // outstanding.
            c.send(&together).await;
        } else {
            c.send(&anon).await;
            let t = Instant::now();
            while t.elapsed() < gap {
                std::hint::spin_loop();
            }
            c.send(&wrong).await;
            c.send(&who).await;
        }
        // Until whoami's answer, or the notice and the end of the session.
        let mut notice = None;
        let mut answered = false;
        while let Some(f) = c.recv().await {
            let env = Envelope::response(&f).unwrap();
            if env.msgid == 0 {
                notice = Some(f);
                break;
            }
            if env.op == op::BIND_RESPONSE {
                assert_eq!(env.msgid, 7);
                assert!(
                    matches!(env.result_code, Some(0 | 49)),
                    "attempt {attempt}: bind answered {:?}",
                    env.result_code
                );
            }
            if env.msgid == 8 && op::is_final_response(env.op) {
                answered = true;
                break;
            }
        }
        if let Some(f) = notice {
            let msg = assert_notice(&f, 2);
            assert!(
                c.recv_all().await.is_empty(),
                "nothing after the notice: {msg}"
            );
            ended += 1;
            continue;
        }
        assert!(answered, "attempt {attempt}: closed without a notice");
        // The session is anonymous: ON and status are refused.
        let (code, msg) = call(&mut c, ab(9, &AllowBackupRequest::on())).await;
        assert_ne!(
            code, 0,
            "attempt {attempt} ({gap:?} apart): ON succeeded after an anonymous bind and a wrong \
             password for {ADMIN_DN} shared message ID 7: {msg}"
        );
        assert_eq!(code, 50, "attempt {attempt}: {msg}");
        c.send_msg(exop(10, ALLOW_BACKUP_STATUS_OID, None)).await;
        let f = c.recv_until_final(10).await;
        assert_eq!(
            result_code(f.last().unwrap()),
            Some(50),
            "attempt {attempt}"
        );
    }
    let s = status(&lab).await;
    assert_eq!((s.state, s.holder), (FreezeState::Thawed, None));
    assert!(
        ended > 0,
        "no attempt (20 of 200 sent both binds in one write) ended with a protocolError \
         notice for reusing message ID 7"
    );
}

/// Items 1 and 2: a slow add, then a root DSE search with the same message
/// ID. The reuse ends the session (protocolError notice), but the add still
/// runs in slapd: the drain of the next ON waits for it.
#[tokio::test]
async fn reusing_the_message_id_of_a_write_in_flight_does_not_hide_it_from_the_drain() {
    let lab = lab(|_| {}).await;
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    start_slow_add(&lab, &mut a, 5).await;
    a.send_msg(search(5, "", 0, "(objectClass=*)", &["namingContexts"]))
        .await;
    let first = a
        .recv()
        .await
        .expect("a notice (or, today, the search's entry)");
    freeze_behind_the_slow_add(&lab, "the add whose message ID was reused had committed").await;
    let msg = assert_notice(&first, 2);
    assert!(a.recv_all().await.is_empty(), "the session ended: {msg}");
}

/// A write reusing the message ID of a read in flight, held by a freeze:
/// the session ends at once, as it does without a freeze. It used to be
/// queued, and went upstream once the read had left the in-flight table,
/// which the drain time limit of a later freeze does (it abandons the read)
/// while the server may still answer the read: the write's answer was then
/// dropped as the abandoned read's, the write stayed in flight for good
/// and every later drain waited on it (the session fuzzer's finding of
/// 2026-12-05, `fuzz/seeds/session/regression-a-held-write-reusing-the-id-of-a-read-in-flight-*`).
/// The read here is a syncrepl refreshAndPersist search, in flight for as
/// long as the connection lasts.
#[tokio::test]
async fn a_held_write_reusing_the_id_of_a_read_in_flight_ends_the_session() {
    held_write_reusing_the_id_of_a_persistent_search(false).await;
}

/// The same with the search abandoned by the client first: the server may
/// still answer it, so its ID stays taken (until a bind's response) and a
/// write reusing it ends the session at once, held or not.
#[tokio::test]
async fn a_held_write_reusing_the_id_of_an_abandoned_read_ends_the_session() {
    held_write_reusing_the_id_of_a_persistent_search(true).await;
}

async fn held_write_reusing_the_id_of_a_persistent_search(abandon_it: bool) {
    let lab = lab(|_| {}).await;
    let dn = user_dn(3);
    let before = read_direct(&lab, &dn, "description").await;
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    a.send_msg(refresh_and_persist(search(
        6,
        SUFFIX,
        2,
        "(cn=nobody)",
        &["1.1"],
    )))
    .await;
    loop {
        let f = a.recv().await.expect("the search's refresh phase");
        if Envelope::response(&f).unwrap().op == op::INTERMEDIATE_RESPONSE {
            break; // the persist phase: the search stays in flight
        }
    }
    if abandon_it {
        a.send_msg(LdapMsg::new(7, LdapOp::AbandonRequest(6))).await;
        // The proxy has seen the Abandon once it answers a later request.
        a.send_msg(search(8, "", 0, "(objectClass=*)", &["namingContexts"]))
            .await;
        a.recv_until_final(8).await;
    }
    let mut op = operator(&lab).await;
    let at_on = freeze(&lab, &mut op, AllowBackupRequest::on()).await;
    a.send_msg(modify(6, &dn, "description", "reused")).await;
    let frames = a.recv_all().await;
    let notice = frames.last().expect("a Notice of Disconnection");
    let msg = assert_notice(notice, 2);
    assert!(msg.contains("message ID 6 reused"), "{msg}");
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    assert_eq!(
        read_direct(&lab, &dn, "description").await,
        before,
        "the write that reused the ID reached the server"
    );
}

/// Item 3: a slow add, then an Abandon of it. slapd does not stop a write it
/// has started, so the proxy must not forward the Abandon: the add completes,
/// its response is dropped, and the drain waits for it.
#[tokio::test]
async fn abandoning_a_write_in_flight_does_not_hide_it_from_the_drain() {
    let lab = lab(|_| {}).await;
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    start_slow_add(&lab, &mut a, 5).await;
    a.send_msg(LdapMsg::new(6, LdapOp::AbandonRequest(5))).await;
    // The proxy has seen the Abandon once it answers a later request.
    a.send_msg(search(7, "", 0, "(objectClass=*)", &["namingContexts"]))
        .await;
    let mut frames = a.recv_until_final(7).await;
    freeze_behind_the_slow_add(&lab, "the abandoned add had committed").await;
    // The session goes on, and never hears of the abandoned add.
    a.send_msg(search(8, SUFFIX, 0, "(objectClass=*)", &["dc"]))
        .await;
    frames.extend(a.recv_until_final(8).await);
    assert_eq!(result_code(frames.last().unwrap()), Some(0));
    assert!(
        frames
            .iter()
            .all(|f| Envelope::response(f).unwrap().msgid != 5),
        "a response to the abandoned add reached the client"
    );
}

/// Item 1's last case: a client sends a slow add and closes its socket at
/// once. The write still runs in slapd; the next ON must wait for it. (The
/// code of 991977b already passes this one: after a client's EOF it keeps
/// the session's in-flight requests counted until slapd closes, up to 10 s;
/// the reset below is what it misses.)
#[tokio::test]
async fn closing_the_socket_behind_a_slow_write_does_not_hide_it_from_the_drain() {
    close_behind_a_slow_write(false).await;
}

/// The same with an abortive close (RST, `SO_LINGER` 0): the proxy reads
/// an error instead of EOF. The write still runs in slapd; the next ON must
/// wait for it.
#[tokio::test]
async fn resetting_the_connection_behind_a_slow_write_does_not_hide_it_from_the_drain() {
    close_behind_a_slow_write(true).await;
}

/// A client sends a slow add and closes its socket (with a reset when
/// `reset`); the next ON must not succeed before the add committed.
async fn close_behind_a_slow_write(reset: bool) {
    let lab = lab(|_| {}).await;
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    start_slow_add(&lab, &mut a, 5).await;
    if reset {
        a.stream.set_zero_linger().unwrap();
    }
    drop(a);
    freeze_behind_the_slow_add(
        &lab,
        &format!("the closed (reset: {reset}) client's add had committed"),
    )
    .await;
}

/// Item 4: a modify, a bind and a whoami pipelined in one write. slapd ends
/// operations outstanding when a bind arrives (it applies the modify but
/// drops its response), so the proxy counted the modify in flight for good
/// and every ON failed "write in progress". The proxy must hold the bind
/// until the modify is answered, and the whoami until the bind is: the
/// client gets all three answers, in order, and whoami names the new
/// identity.
#[tokio::test]
async fn a_bind_pipelined_behind_a_write_waits_for_it() {
    let lab = lab(|_| {}).await;
    let mut c = bound(&lab, &user_dn(3), "pass3").await;
    let mut pipelined = encode(modify(2, &user_dn(3), "description", "pipelined")).to_vec();
    pipelined.extend_from_slice(&encode(bind(3, &user_dn(5), "pass5")));
    pipelined.extend_from_slice(&encode(exop(4, WHOAMI, None)));
    c.send(&pipelined).await;
    let got = finals_within(&mut c, &[2, 3, 4], 5).await;
    let order: Vec<(i32, i64)> = got.iter().map(|g| (g.0, g.1)).collect();
    assert_eq!(
        order,
        [(2, 0), (3, 0), (4, 0)],
        "modify, bind and whoami answered, in order"
    );
    assert_eq!(value_of(&got[2].2), format!("dn:{}", user_dn(5)));
    assert!(read_direct(&lab, &user_dn(3), "description")
        .await
        .contains("description: pipelined"));
    // Nothing is left counted in flight, and a backup can start.
    wait_status(&lab, "nothing in flight", |s| s.in_flight == 0).await;
    let mut op = operator(&lab).await;
    let at_on = freeze(&lab, &mut op, AllowBackupRequest::on()).await;
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    // The session goes on as user5.
    let (code, _) = call(&mut c, exop(5, WHOAMI, None)).await;
    assert_eq!(code, 0);
}

/// Item 5: a simple bind with an operator's DN and an empty password is an
/// unauthenticated (anonymous) bind; with `olcAllows: bind_anon_dn` slapd
/// accepts it. It must not make the session that operator.
#[tokio::test]
async fn a_dn_with_an_empty_password_is_not_an_operator() {
    let lab = lab(|_| {}).await;
    // Without bind_anon_dn slapd refuses it (53); allow it, on cn=config.
    let mut d = RawConn::connect(&lab.direct_addr()).await;
    d.send_msg(bind(1, ADMIN_DN, "")).await;
    assert_eq!(result_code(&d.recv().await.unwrap()), Some(53));
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
        Some("dn: cn=config\nchangetype: modify\nadd: olcAllows\nolcAllows: bind_anon_dn\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // slapd now accepts it, as anonymous.
    d.send_msg(bind(2, ADMIN_DN, "")).await;
    assert_eq!(result_code(&d.recv().await.unwrap()), Some(0));
    d.send_msg(exop(3, WHOAMI, None)).await;
    let f = d.recv().await.unwrap();
    assert_eq!((result_code(&f), value_of(&f)), (Some(0), String::new()));

    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(bind(1, ADMIN_DN, "")).await;
    assert_eq!(
        result_code(&c.recv().await.unwrap()),
        Some(0),
        "the bind itself succeeds, as it does at slapd"
    );
    c.send_msg(exop(2, ALLOW_BACKUP_STATUS_OID, None)).await;
    let (code, msg) = outcome(c.recv_until_final(2).await.last().unwrap());
    assert_eq!(code, 50, "status after an empty-password bind: {msg}");
    let (code, msg) = call(&mut c, ab(3, &AllowBackupRequest::on())).await;
    assert_eq!(code, 50, "ON after an empty-password bind: {msg}");
    let (code, msg) = call(&mut c, ab(4, &AllowBackupRequest::off())).await;
    assert_eq!(code, 50, "OFF after an empty-password bind: {msg}");
    let s = status(&lab).await;
    assert_eq!((s.state, s.holder), (FreezeState::Thawed, None));
}

/// Item 7: a critical control the proxy does not implement, on requests it
/// answers itself: unavailableCriticalExtension (12), and no freeze starts.
/// A non-critical one is ignored.
#[tokio::test]
async fn a_critical_unknown_control_on_allow_backup_is_refused() {
    let lab = lab(|_| {}).await;
    let mut op = operator(&lab).await;
    op.send(&with_control(
        ab(2, &AllowBackupRequest::on()),
        "1.2.3.4",
        true,
    ))
    .await;
    let (code, msg) = outcome(op.recv_until_final(2).await.last().unwrap());
    assert_eq!(code, 12, "ON with a critical unknown control: {msg}");
    let s = status(&lab).await;
    assert_eq!((s.state, s.freeze_id), (FreezeState::Thawed, None));
    op.send(&with_control(
        exop(3, ALLOW_BACKUP_STATUS_OID, None),
        "1.2.3.4",
        true,
    ))
    .await;
    let (code, msg) = outcome(op.recv_until_final(3).await.last().unwrap());
    assert_eq!(code, 12, "status with a critical unknown control: {msg}");
    // Not critical: ignored, the freeze works.
    op.send(&with_control(
        ab(4, &AllowBackupRequest::on()),
        "1.2.3.4",
        false,
    ))
    .await;
    let (code, msg) = outcome(op.recv_until_final(4).await.last().unwrap());
    assert_eq!(code, 0, "ON with a non-critical unknown control: {msg}");
    let at_on = backend(&lab, SUFFIX).await;
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    w.send_msg(modify(2, &user_dn(7), "description", "after OFF"))
        .await;
    wait_status(&lab, "the write held", |s| s.queued_requests == 1).await;
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    assert_eq!(result_code(&w.recv().await.unwrap()), Some(0));
}

/// Item 8: slapd accepts LDAPv2 quoting, so
/// `uid=user20,ou=people,dc="example",dc=org` is user20; the proxy saw a DN
/// under no backend and let the write through a freeze.
#[tokio::test]
async fn a_quoted_dn_of_a_frozen_entry_is_held() {
    let lab = lab(|_| {}).await;
    let quoted = r#"uid=user20,ou=people,dc="example",dc=org"#;
    // slapd takes it for user20 (unfrozen, straight to it).
    let mut d = direct_bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut d, modify(2, quoted, "description", "direct"))
            .await
            .0,
        0
    );
    assert!(read_direct(&lab, &user_dn(20), "description")
        .await
        .contains("description: direct"));

    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut op = operator(&lab).await;
    let at_on = freeze(&lab, &mut op, AllowBackupRequest::on()).await;
    w.send_msg(modify(2, quoted, "description", "frozen")).await;
    assert_nothing_pending(&mut w).await;
    wait_status(&lab, "the quoted write held", |s| s.queued_requests == 1).await;
    assert!(read_direct(&lab, &user_dn(20), "description")
        .await
        .contains("description: direct"));
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    assert_eq!(result_code(&w.recv().await.unwrap()), Some(0));
    assert!(read_direct(&lab, &user_dn(20), "description")
        .await
        .contains("description: frozen"));
}

/// Item 8 with a partial freeze (only dc=example,dc=org of two configured
/// backends): spellings the proxy cannot normalise for certain are held
/// like writes to every frozen backend. slapd accepts the quoted ones; it
/// refuses the BER hex spelling `dc=#04076578616d706c65` (invalidDNSyntax,
/// 34), which must be held all the same and then get slapd's answer.
#[tokio::test]
async fn quoted_and_hex_dn_spellings_are_held_by_a_partial_freeze() {
    let lab = lab(|c| {
        c.backends = vec![
            BackendConfig::new("dc=example,dc=org", Mode::Readonly),
            BackendConfig::new("dc=other,dc=org", Mode::Readonly),
        ];
    })
    .await;
    // (user, spelling, slapd's own answer unfrozen).
    let spellings = [
        (21, r#"uid=user21,ou=people,dc="example",dc=org"#, 0),
        (22, r#"uid=user22,ou=people,dc="EXAMPLE";dc="org""#, 0),
        (23, "uid=user23,ou=people,dc=#04076578616d706c65,dc=org", 34),
    ];
    // What slapd answers each, unfrozen and straight to it.
    let mut d = direct_bound(&lab, ADMIN_DN, ADMIN_PW).await;
    for (k, dn, code) in spellings {
        let (got, msg) = call(&mut d, modify(2, dn, "description", "direct")).await;
        assert_eq!(got, code, "slapd's answer to {dn}: {msg}");
        let want = if code == 0 { "direct" } else { "initial" };
        assert!(description(&lab, k)
            .await
            .contains(&format!("description: {want}")));
    }

    let mut op = operator(&lab).await;
    let req = AllowBackupRequest::on().with_dn_set(["dc=example,dc=org"]);
    let at_on = freeze(&lab, &mut op, req).await;
    let mut writers = Vec::new();
    for (n, (_, dn, _)) in spellings.iter().enumerate() {
        let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
        w.send_msg(modify(2, dn, "description", "frozen")).await;
        assert_nothing_pending(&mut w).await;
        wait_status(&lab, "the write held", |s| {
            s.queued_requests == n as u64 + 1
        })
        .await;
        writers.push(w);
    }
    // The unfrozen backend takes writes meanwhile.
    let mut o = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let other = testkit::other_user_dn(2);
    let (code, msg) = call(&mut o, modify(2, &other, "description", "free")).await;
    assert_eq!(code, 0, "{msg}");
    for (k, _, code) in spellings {
        let want = if code == 0 { "direct" } else { "initial" };
        assert!(description(&lab, k)
            .await
            .contains(&format!("description: {want}")));
    }
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    for (w, (k, dn, code)) in writers.iter_mut().zip(spellings) {
        assert_eq!(
            result_code(&w.recv().await.unwrap()),
            Some(code),
            "{dn}: as slapd answers it unfrozen"
        );
        if code == 0 {
            assert!(description(&lab, k).await.contains("description: frozen"));
        }
    }
}

/// Item 9: a write to cn=config while frozen (an index added to the frozen
/// database makes slapd rewrite its data.mdb) is held until OFF, and so is
/// a write to a DN under no known backend.
#[tokio::test]
async fn writes_to_cn_config_and_unknown_dns_are_held() {
    let lab = lab(|_| {}).await;
    let db = "olcDatabase={1}mdb,cn=config";
    let index = |lab: &Lab| {
        let url = lab.slapd.ldapi_url();
        async move { ldapi_search(&url, &["-b", db, "-s", "base", "olcDbIndex"]).await }
    };
    let before = index(&lab).await;
    assert!(before.contains("olcDbIndex: cn,sn,mail eq,sub"), "{before}");
    assert!(!before.contains("description"));
    // What slapd answers a write under no backend (unfrozen).
    let nowhere = "cn=x,dc=nowhere";
    let mut d = direct_bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (direct_code, _) = call(&mut d, add(2, nowhere, "x")).await;
    assert_eq!(direct_code, 53, "no global superior knowledge");

    let mut cfg = bound(&lab, CONFIG_ADMIN_DN, ADMIN_PW).await;
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut op = operator(&lab).await;
    let at_on = freeze(&lab, &mut op, AllowBackupRequest::on()).await;
    cfg.send_msg(modify_op(
        2,
        db,
        LdapModifyType::Add,
        "olcDbIndex",
        "description eq",
    ))
    .await;
    assert_nothing_pending(&mut cfg).await;
    wait_status(&lab, "the cn=config write held", |s| s.queued_requests == 1).await;
    w.send_msg(add(2, nowhere, "x")).await;
    assert_nothing_pending(&mut w).await;
    wait_status(&lab, "the write under no backend held", |s| {
        s.queued_requests == 2
    })
    .await;
    assert_eq!(index(&lab).await, before, "cn=config changed while frozen");
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    assert_eq!(result_code(&cfg.recv().await.unwrap()), Some(0));
    assert!(index(&lab).await.contains("olcDbIndex: description eq"));
    assert_eq!(result_code(&w.recv().await.unwrap()), Some(direct_code));
}

/// Item 10: as user13, a modify of user14 (held by the freeze), then on the
/// same connection a bind as an operator. Order on a connection is
/// absolute: the bind waits behind the modify, and after OFF the modify
/// runs as user13 (insufficientAccessRights, as unfrozen), then the bind
/// succeeds.
#[tokio::test]
async fn an_operator_bind_queued_behind_a_held_write_keeps_its_place() {
    let lab = lab(|_| {}).await;
    // What user13 gets for it unfrozen, straight from slapd.
    let mut d = direct_bound(&lab, &user_dn(13), "pass13").await;
    let (direct_code, _) = call(&mut d, modify(2, &user_dn(14), "description", "by 13")).await;
    assert_eq!(direct_code, 50);

    let mut c = bound(&lab, &user_dn(13), "pass13").await;
    let mut op = operator(&lab).await;
    let at_on = freeze(&lab, &mut op, AllowBackupRequest::on()).await;
    c.send_msg(modify(2, &user_dn(14), "description", "by 13"))
        .await;
    wait_status(&lab, "the modify held", |s| s.queued_requests == 1).await;
    c.send_msg(bind(3, ADMIN_DN, ADMIN_PW)).await;
    assert_nothing_pending(&mut c).await;
    wait_status(&lab, "the bind held behind it", |s| s.queued_requests == 2).await;
    assert_unchanged(&lab, SUFFIX, &at_on).await;
    thaw(&mut op).await;
    let got = finals_within(&mut c, &[2, 3], 5).await;
    let order: Vec<(i32, i64)> = got.iter().map(|g| (g.0, g.1)).collect();
    assert_eq!(
        order,
        [(2, direct_code), (3, 0)],
        "the modify first, as user13; then the bind"
    );
    assert!(read_direct(&lab, &user_dn(14), "description")
        .await
        .contains("description: initial"));
}

/// An Abandon of a search goes to slapd, which may still answer the search
/// (it had sent the answer, or does, before it reads the Abandon). Until the
/// server is known to be done with it, its message ID stays taken (the
/// session fuzz target found that its late answer otherwise ended the
/// in-flight entry of a request reusing the ID, while slapd still ran that
/// one: with a write, ON then succeeded over it; the fuzz seeds
/// `regression-reused-id-after-an-abandoned-read-*` replay it with a
/// scripted server). A bind completes or abandons every earlier operation
/// (RFC 4511 section 4.2.1): after its response the ID is free again, for a
/// client that reuses it as the RFC allows.
#[tokio::test]
async fn an_abandoned_searchs_id_is_free_again_after_a_bind_and_never_answers_another_request() {
    let lab = lab(|_| {}).await;
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    a.send_msg(search(5, SUFFIX, 2, "(objectClass=*)", &["cn"]))
        .await;
    a.send_msg(LdapMsg::new(6, LdapOp::AbandonRequest(5))).await;
    a.send_msg(bind(7, ADMIN_DN, ADMIN_PW)).await;
    let frames = a.recv_until_final(7).await;
    assert_eq!(result_code(frames.last().unwrap()), Some(0));
    // ID 5 again, for a different operation: its answer is the base
    // search's own, whatever came of the abandoned one before the bind.
    a.send_msg(search(5, "", 0, "(objectClass=*)", &["namingContexts"]))
        .await;
    let frames = a.recv_until_final(5).await;
    let done = Envelope::response(frames.last().unwrap()).unwrap();
    assert_eq!(done.result_code, Some(0));
    let entries: Vec<_> = frames
        .iter()
        .filter(|f| Envelope::response(f).unwrap().op == op::SEARCH_RESULT_ENTRY)
        .collect();
    assert_eq!(entries.len(), 1, "the root DSE alone: {frames:?}");

    // Reused before any bind: either the abandoned search's final answer
    // had already come (the ID was free: the compare is answered), or the
    // session ends as for any reused ID. (Which one is slapd's timing; the
    // fuzz seeds make the late answer come after the reuse every time.)
    let mut b = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    b.send_msg(search(5, SUFFIX, 2, "(objectClass=*)", &["cn"]))
        .await;
    b.send_msg(LdapMsg::new(6, LdapOp::AbandonRequest(5))).await;
    b.send_msg(LdapMsg::new(
        5,
        LdapOp::CompareRequest(ldap3_proto::proto::LdapCompareRequest {
            dn: SUFFIX.to_string(),
            atype: "dc".to_string(),
            val: b"example".to_vec(),
        }),
    ))
    .await;
    let mut seen = Vec::new();
    loop {
        let Some(f) = b.recv().await else {
            panic!("closed without a notice: {seen:?}");
        };
        let env = Envelope::response(&f).unwrap();
        if env.msgid == 0 {
            let why = assert_notice(&f, 2);
            assert!(why.contains("message ID 5 reused"), "{why}");
            assert!(b.recv_all().await.is_empty());
            break;
        }
        if env.msgid == 5 && env.op == op::COMPARE_RESPONSE {
            assert_eq!(env.result_code, Some(6), "compareTrue");
            break;
        }
        // Before: only what the abandoned search sent first.
        assert!(
            env.msgid == 5 && matches!(env.op, op::SEARCH_RESULT_ENTRY | op::SEARCH_RESULT_DONE),
            "unexpected: {env:?}"
        );
        seen.push(f);
    }
}
