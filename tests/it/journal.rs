//! The roll-forward journal against a real slapd: every write that went
//! upstream is recorded with the client's own bytes and the server's
//! answer, in the order the server answered, and every freeze leaves a cut
//! between what the backup holds and what it does not.

use std::path::Path;

use abproxy::config::Config;
use abproxy::journal::reader::{read_segment, segments};
use abproxy::journal::{Body, Record};
use abproxy_proto::AllowBackupRequest;
use bytes::Bytes;
use ldap3_proto::proto::*;
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN, SUFFIX};

use crate::support::freeze::{ab, bound, call, modify, outcome, wait_status};
use crate::support::*;

/// slapd (no fsync) and a proxy journaling into `dir`, with the rootdns
/// as operators.
pub(crate) async fn journal_lab(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Lab {
    let dir = dir.to_path_buf();
    Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c| {
            c.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
            c.freeze.root_dns = c.freeze.allowed.clone();
            c.journal.dir = Some(dir);
            tweak(c);
        },
    )
    .await
}

/// Every record of the journal in `dir`, checked intact and numbered
/// without a gap.
pub(crate) fn records(dir: &Path) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for (_, p) in segments(dir).unwrap() {
        let s = read_segment(&p).unwrap();
        assert!(s.damage.is_none(), "{}: {:?}", p.display(), s.damage);
        out.extend(s.records);
    }
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "sequence without gaps");
    }
    out
}

/// A write the test sent: its bytes and the result code the client saw.
pub(crate) struct Sent {
    pub(crate) bytes: Bytes,
    pub(crate) code: i64,
}

pub(crate) async fn send_one(c: &mut RawConn, msg: LdapMsg) -> Sent {
    let id = msg.msgid;
    let bytes = encode(msg);
    c.send(&bytes).await;
    let (code, _) = outcome(c.recv_until_final(id).await.last().unwrap());
    Sent { bytes, code }
}

/// The intent record of each write, by its request bytes, with its outcome.
fn journaled(recs: &[Record]) -> Vec<(&Record, &Record)> {
    let mut out = Vec::new();
    for r in recs {
        if let Body::Intent { .. } = r.body {
            let outcomes: Vec<&Record> = recs
                .iter()
                .filter(|o| matches!(o.body, Body::Outcome { intent, .. } if intent == r.seq))
                .collect();
            assert_eq!(outcomes.len(), 1, "one outcome for intent {}", r.seq);
            out.push((r, outcomes[0]));
        }
    }
    out
}

/// Every write sent before a cut has its outcome before that cut (the
/// freeze's drain waited for it, and its outcome was appended before the
/// write left the in-flight table): a replay up to a cut's time applies
/// exactly the writes the server had at the freeze. For journals whose
/// writes all go to the frozen backend.
fn assert_cuts_follow_their_writes(recs: &[Record]) {
    let cuts: Vec<u64> = recs
        .iter()
        .filter(|r| matches!(r.body, Body::Cut { .. }))
        .map(|r| r.seq)
        .collect();
    assert!(!cuts.is_empty(), "the journal has cuts");
    for (i, o) in journaled(recs) {
        for &cut in &cuts {
            assert!(
                i.seq > cut || o.seq < cut,
                "write {} sent before cut {cut} has its outcome {} after it",
                i.seq,
                o.seq
            );
        }
    }
}

/// Each journaled write, in the order of its intent: its request bytes and
/// its result code.
pub(crate) fn journaled_writes(recs: &[Record]) -> Vec<(&[u8], i32)> {
    journaled(recs)
        .into_iter()
        .map(|(i, o)| (request_of(i), result_of(o)))
        .collect()
}

fn request_of(r: &Record) -> &[u8] {
    match &r.body {
        Body::Intent { request, .. } => request,
        b => panic!("not an intent: {b:?}"),
    }
}

fn result_of(r: &Record) -> i32 {
    match &r.body {
        Body::Outcome { result, .. } => *result,
        b => panic!("not an outcome: {b:?}"),
    }
}

#[tokio::test]
async fn every_write_is_journaled_with_its_bytes_its_answer_and_the_freezes_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let lab = journal_lab(&dir, |_| {}).await;
    let mut c = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let j1 = format!("cn=j1,{SUFFIX}");
    let j2 = format!("cn=j2,{SUFFIX}");

    // One at a time, failures included; a search and a compare are reads.
    let mut sent = vec![send_one(&mut c, add(2, &j1, "j1")).await];
    sent.push(send_one(&mut c, add(3, &j1, "j1")).await);
    let s = send_one(&mut c, search(4, SUFFIX, 2, "(cn=j1)", &["1.1"])).await;
    assert_eq!(s.code, 0);
    sent.push(send_one(&mut c, modify(5, &j1, "description", "one")).await);
    let moddn = LdapMsg::new(
        6,
        LdapOp::ModifyDNRequest(LdapModifyDNRequest {
            dn: j1.clone(),
            newrdn: "cn=j2".into(),
            deleteoldrdn: true,
            new_superior: None,
        }),
    );
    sent.push(send_one(&mut c, moddn).await);
    sent.push(send_one(&mut c, LdapMsg::new(7, LdapOp::DelRequest(j1.clone()))).await);
    sent.push(send_one(&mut c, LdapMsg::new(8, LdapOp::DelRequest(j2.clone()))).await);
    let codes: Vec<i64> = sent.iter().map(|s| s.code).collect();
    assert_eq!(codes, [0, 68, 0, 0, 32, 0]);

    // Pipelined: ten adds sent at once.
    let mut piped = Vec::new();
    for i in 0..10 {
        let b = encode(add(20 + i, &format!("cn=p{i},{SUFFIX}"), &format!("p{i}")));
        c.send(&b).await;
        piped.push(b);
    }
    let (n, piped_codes) =
        crate::support::freeze::recv_finals(&mut c, &(20..30).collect::<Vec<_>>()).await;
    assert_eq!((n, piped_codes), (10, vec![0; 10]));

    // A freeze: a write sent while frozen is held, and after the cut.
    let mut op = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let (code, on) = call(&mut op, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{on}");
    let cut: u64 = on
        .split("journal cut ")
        .nth(1)
        .unwrap_or_else(|| panic!("ON names the journal's cut: {on}"))
        .parse()
        .unwrap();
    let held = encode(add(40, &format!("cn=held,{SUFFIX}"), "held"));
    c.send(&held).await;
    wait_status(&lab, "the write held", |s| s.queued_requests == 1).await;
    let (code, off) = call(&mut op, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{off}");
    let (code, _) = outcome(c.recv_until_final(40).await.last().unwrap());
    assert_eq!(code, 0);

    let recs = records(&dir);
    assert!(matches!(recs[0].body, Body::Start { .. }));
    let writes = journaled(&recs);
    assert_eq!(
        writes.len(),
        sent.len() + piped.len() + 1,
        "reads are not journaled"
    );
    // In the order sent, each answered before the next went.
    for (i, s) in sent.iter().enumerate() {
        let (intent, out) = writes[i];
        assert_eq!(
            request_of(intent),
            &s.bytes[..],
            "write {i}: the client's own bytes"
        );
        assert_eq!(
            result_of(out) as i64,
            s.code,
            "write {i}: the answer the client saw"
        );
        if let Some((next, _)) = writes.get(i + 1) {
            assert!(
                out.seq < next.seq,
                "write {i} answered before the next was sent"
            );
        }
        match &intent.body {
            Body::Intent { identity, .. } => assert_eq!(identity, ADMIN_DN),
            _ => unreachable!(),
        }
    }
    // The pipelined ones, each once, whatever the order.
    let mut got: Vec<&[u8]> = writes[sent.len()..sent.len() + 10]
        .iter()
        .map(|(i, _)| request_of(i))
        .collect();
    let mut want: Vec<&[u8]> = piped.iter().map(|b| &b[..]).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // The cut: after every write answered before the freeze, before the
    // held one.
    let cut_rec = &recs[cut as usize - 1];
    match &cut_rec.body {
        Body::Cut {
            freeze_id,
            suffixes,
        } => {
            assert!(on.contains(&format!("freeze id {freeze_id}")), "{on}");
            assert!(suffixes.iter().any(|s| s == SUFFIX), "{suffixes:?}");
        }
        b => panic!("record {cut} is no cut: {b:?}"),
    }
    let (held_intent, held_out) = writes.last().unwrap();
    assert_eq!(request_of(held_intent), &held[..]);
    assert!(held_intent.seq > cut);
    assert_eq!(result_of(held_out), 0);
    for (intent, out) in &writes[..writes.len() - 1] {
        assert!(out.seq < cut && intent.seq < cut);
    }
    assert!(!recs.iter().any(|r| matches!(r.body, Body::Lost { .. })));
}

/// Every entry under the suffix with its user attributes, as slapd `url`
/// holds them: DN (lower case) -> attributes (lower case, values sorted),
/// `userPassword` left out (a hash with a random salt).
async fn user_data(url: &str) -> std::collections::BTreeMap<String, Vec<(String, Vec<Vec<u8>>)>> {
    let out = admin_search(url, &["*"]).await;
    abproxy::backup::ldif::read(&out)
        .unwrap()
        .into_iter()
        .map(|e| {
            let mut attrs: Vec<(String, Vec<Vec<u8>>)> = e
                .attrs
                .into_iter()
                .filter(|(a, _)| !a.eq_ignore_ascii_case("userPassword"))
                .map(|(a, mut v)| {
                    v.sort();
                    (a.to_ascii_lowercase(), v)
                })
                .collect();
            attrs.sort();
            (e.dn.to_ascii_lowercase(), attrs)
        })
        .collect()
}

pub(crate) fn modify_op(
    msgid: i32,
    dn: &str,
    changes: Vec<(LdapModifyType, &str, Vec<&str>)>,
) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::ModifyRequest(LdapModifyRequest {
            dn: dn.into(),
            changes: changes
                .into_iter()
                .map(|(operation, atype, vals)| LdapModify {
                    operation,
                    modification: LdapPartialAttribute {
                        atype: atype.into(),
                        vals: vals.into_iter().map(|v| v.as_bytes().to_vec()).collect(),
                    },
                })
                .collect(),
        }),
    )
}

/// RFC 3062 password modify with only a new password (the bound user's).
fn passwd(msgid: i32, new: &str) -> LdapMsg {
    // PasswdModifyRequestValue ::= SEQUENCE { newPasswd [2] OCTET STRING }
    let mut value = vec![0x30, (new.len() + 2) as u8, 0x82, new.len() as u8];
    value.extend_from_slice(new.as_bytes());
    crate::support::freeze::exop(msgid, "1.3.6.1.4.1.4203.1.11.1", Some(value))
}

#[tokio::test]
async fn show_ldif_into_ldapmodify_reproduces_the_writes_on_a_copy_of_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let lab = journal_lab(&dir, |_| {}).await;
    // The same sample data, untouched: what a restored backup would be.
    let copy = start_slapd(SlapdOptions {
        nosync: true,
        ..Default::default()
    })
    .await;
    assert_eq!(user_data(&lab.direct()).await, user_data(&copy.url()).await);

    let mut c = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut codes = Vec::new();
    let ou = format!("ou=moved,{SUFFIX}");
    let user1 = testkit::user_dn(1);
    let user2 = testkit::user_dn(2);
    let user3 = testkit::user_dn(3);
    codes.push(
        send_one(&mut c, add(2, &format!("cn=a,{SUFFIX}"), "a"))
            .await
            .code,
    );
    codes.push(
        send_one(&mut c, add(3, &format!("cn=a,{SUFFIX}"), "a"))
            .await
            .code,
    ); // 68: not replayed
    let org = LdapMsg::new(
        4,
        LdapOp::AddRequest(LdapAddRequest {
            dn: ou.clone(),
            attributes: vec![
                LdapAttribute {
                    atype: "objectClass".into(),
                    vals: vec![b"organizationalUnit".to_vec()],
                },
                LdapAttribute {
                    atype: "ou".into(),
                    vals: vec![b"moved".to_vec()],
                },
                LdapAttribute {
                    atype: "description".into(),
                    // Not a SAFE-STRING: base64 in the LDIF.
                    vals: vec![" leading space, and é".as_bytes().to_vec()],
                },
            ],
        }),
    );
    codes.push(send_one(&mut c, org).await.code);
    codes.push(
        send_one(
            &mut c,
            modify_op(
                5,
                &user1,
                vec![
                    (
                        LdapModifyType::Replace,
                        "description",
                        vec!["first", "second"],
                    ),
                    (LdapModifyType::Add, "mail", vec!["u1@example.org"]),
                    (LdapModifyType::Increment, "uidNumber", vec!["5"]),
                ],
            ),
        )
        .await
        .code,
    );
    codes.push(
        send_one(
            &mut c,
            modify_op(6, &user1, vec![(LdapModifyType::Delete, "mail", vec![])]),
        )
        .await
        .code,
    );
    let moddn = LdapMsg::new(
        7,
        LdapOp::ModifyDNRequest(LdapModifyDNRequest {
            dn: user2.clone(),
            newrdn: "uid=user2b".into(),
            deleteoldrdn: true,
            new_superior: Some(ou.clone()),
        }),
    );
    codes.push(send_one(&mut c, moddn).await.code);
    codes.push(
        send_one(&mut c, LdapMsg::new(8, LdapOp::DelRequest(user3.clone())))
            .await
            .code,
    );
    codes.push(
        send_one(&mut c, LdapMsg::new(9, LdapOp::DelRequest(user3.clone())))
            .await
            .code,
    ); // 32
    assert_eq!(codes, [0, 68, 0, 0, 0, 0, 0, 32]);
    // A user changes their own password (password modify, no user named).
    let user4 = testkit::user_dn(4);
    let mut u = bound(&lab, &user4, &testkit::user_pw(4)).await;
    assert_eq!(send_one(&mut u, passwd(2, "n3w-secret")).await.code, 0);

    let want = user_data(&lab.direct()).await;
    assert_ne!(want, user_data(&copy.url()).await);

    let show = std::process::Command::new(env!("CARGO_BIN_EXE_abproxy"))
        .args(["journal", "show", "--ldif", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let ldif = String::from_utf8(show.stdout).unwrap();
    assert_eq!(
        show.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    // Failed writes are not in it.
    assert_eq!(ldif.matches("changetype:").count(), 7, "{ldif}");
    let applied = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &copy.url(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&ldif),
    )
    .await;
    assert_eq!(applied.code, Some(0), "{}\n{ldif}", applied.stderr);
    assert_eq!(user_data(&copy.url()).await, want);
    // The new password works on the copy; the journal's hash is no clear text.
    assert!(!ldif.contains("n3w-secret"));
    let who = ldap_tool(
        "ldapwhoami",
        &["-x", "-H", &copy.url(), "-D", &user4, "-w", "n3w-secret"],
        None,
    )
    .await;
    assert_eq!(who.code, Some(0), "{}", who.stderr);

    // check: continuous, nothing indeterminate.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_abproxy"))
        .args(["journal", "check", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{text}");
    assert!(text.contains("writes: 7 succeeded, 2 failed"), "{text}");
}

/// How many writes a writer of the point-in-time test has had answered.
type Acks = std::sync::Arc<Vec<std::sync::atomic::AtomicUsize>>;

const PIT_WRITERS: usize = 16;

/// Writer `w` (as the admin, through the proxy) cycles through every kind
/// of write on entries of its own: adds `cn=wW-N`, replaces and increments
/// attributes of `uid=user(W+1)`, renames its add, deletes the previous
/// one, and every third round changes the user's password (password
/// modify naming the user). Every write must succeed. Returns how many
/// rounds it did.
fn pit_writer(
    addr: String,
    w: usize,
    acks: Acks,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut c = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
        let user = testkit::user_dn(w + 1);
        let mut id = 1;
        let mut next = || {
            id += 1;
            id
        };
        let mut n = 0;
        while !stop.is_cancelled() {
            n += 1;
            let entry = format!("cn=w{w}-{n},{SUFFIX}");
            let mut msgs = vec![
                add(next(), &entry, &format!("w{w}-{n}")),
                modify_op(
                    next(),
                    &user,
                    vec![(
                        LdapModifyType::Replace,
                        "description",
                        vec![&format!("w{w}-{n}")],
                    )],
                ),
                modify_op(
                    next(),
                    &user,
                    vec![(LdapModifyType::Increment, "uidNumber", vec!["1"])],
                ),
                LdapMsg::new(
                    next(),
                    LdapOp::ModifyDNRequest(LdapModifyDNRequest {
                        dn: entry.clone(),
                        newrdn: format!("cn=w{w}-{n}-r"),
                        deleteoldrdn: true,
                        new_superior: None,
                    }),
                ),
            ];
            if n > 1 {
                msgs.push(LdapMsg::new(
                    next(),
                    LdapOp::DelRequest(format!("cn=w{w}-{}-r,{SUFFIX}", n - 1)),
                ));
            }
            if n % 3 == 0 {
                msgs.push(passwd_of(next(), &user, &format!("p{w}-{n}")));
            }
            for m in msgs {
                let what = format!("{:?}", m.op);
                let code = send_one(&mut c, m).await.code;
                assert_eq!(code, 0, "writer {w}: {what}");
                acks[w].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        n
    })
}

/// RFC 3062 password modify naming the user.
pub(crate) fn passwd_of(msgid: i32, user: &str, new: &str) -> LdapMsg {
    let mut fields = vec![0x80, user.len() as u8];
    fields.extend_from_slice(user.as_bytes());
    fields.extend_from_slice(&[0x82, new.len() as u8]);
    fields.extend_from_slice(new.as_bytes());
    let mut value = vec![0x30, fields.len() as u8];
    value.extend(fields);
    crate::support::freeze::exop(msgid, "1.3.6.1.4.1.4203.1.11.1", Some(value))
}

fn total(acks: &Acks) -> usize {
    acks.iter()
        .map(|a| a.load(std::sync::atomic::Ordering::SeqCst))
        .sum()
}

/// Waits until the writers have had `n` more writes answered.
async fn more_writes(acks: &Acks, n: usize) {
    let target = total(acks) + n;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while total(acks) < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writers make no progress"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// `abproxy journal replay ARGS` (the journal in `dir`) to slapd `url`
/// as the admin: its exit status and output.
async fn replay(dir: &Path, url: &str, args: &[&str]) -> ToolOutput {
    let dir = dir.to_str().unwrap();
    replay_as(url, (ADMIN_DN, ADMIN_PW), &[&["--dir", dir], args].concat()).await
}

/// `abproxy journal replay --to URL --bind-dn DN ARGS` (the password in
/// `ABPROXY_PASSWORD`), within 120 s.
pub(crate) async fn replay_as(url: &str, (dn, pw): (&str, &str), args: &[&str]) -> ToolOutput {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_abproxy"))
        .args(["journal", "replay", "--to", url, "--bind-dn", dn])
        .args(args)
        .env("ABPROXY_PASSWORD", pw)
        .env_remove("ABPROXY_LOG")
        .kill_on_drop(true)
        .output();
    ToolOutput::from(
        tokio::time::timeout(std::time::Duration::from_secs(120), out)
            .await
            .expect("replay within 120 s")
            .unwrap(),
    )
}

/// The lab's slapd with `backup` restored in place of its databases
/// (`abproxy restore --to WORK`, slapd stopped, `--apply WORK`, started).
async fn restore_in_place(lab: &mut Lab, backup: &Path, work: &Path) {
    let config = lab.slapd.dir().join("slapd.d");
    let out = crate::support::backup::restore(&[
        backup.to_str().unwrap(),
        "--to",
        work.to_str().unwrap(),
        "--slapd-config",
        config.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    tokio::task::block_in_place(|| lab.slapd.stop()).unwrap();
    let out = crate::support::backup::restore(&["--apply", work.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    tokio::task::block_in_place(|| lab.slapd.restart()).unwrap();
}

/// Point in time: a backup at T0 under 16 writers, a freeze at T1 whose
/// data is the reference, writes on to T2. The server's database is then
/// replaced by the T0 backup (`abproxy restore`), and `journal replay
/// --after BACKUP --until T1` brings it to exactly the T1 reference; the
/// replay resumed from the position it printed brings it to the data the
/// server had at T2. Every write is applied once: a second application of
/// an add, a rename or a delete would fail and stop the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_and_the_journal_restore_any_point_in_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let mut lab = journal_lab(&dir, |_| {}).await;
    let acks: Acks = std::sync::Arc::new((0..PIT_WRITERS).map(|_| Default::default()).collect());
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..PIT_WRITERS)
        .map(|w| pit_writer(lab.proxy_addr(), w, acks.clone(), stop.clone()))
        .collect();
    more_writes(&acks, 200).await;

    // T0: a backup under the writers.
    let backup = tmp.path().join("backup");
    let out = crate::support::backup::backup_as(
        &lab,
        ADMIN_DN,
        ADMIN_PW,
        &["--to", backup.to_str().unwrap(), "--method", "ldif"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let cut0 = crate::support::backup::manifest_json(&backup)["freeze"]["journal_cut"]
        .as_u64()
        .expect("the manifest names the journal cut");
    more_writes(&acks, 300).await;

    // T1: frozen; the server's data then is the reference.
    let mut op = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let (code, on) = call(&mut op, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{on}");
    let cut1: u64 = on.rsplit("journal cut ").next().unwrap().parse().unwrap();
    let at_t1 = user_data(&lab.direct()).await;
    let (code, off) = call(&mut op, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{off}");
    more_writes(&acks, 300).await;

    // T2: the writers stop; the server's data is the final reference.
    stop.cancel();
    let mut rounds = Vec::new();
    for w in writers {
        rounds.push(w.await.expect("no writer saw an error"));
    }
    let at_t2 = user_data(&lab.direct()).await;
    assert_ne!(at_t1, at_t2);

    // The database lost: the T0 backup restored in its place.
    restore_in_place(&mut lab, &backup, &tmp.path().join("work")).await;
    let restored = user_data(&lab.direct()).await;
    assert_ne!(restored, at_t1, "the backup is from before T1");

    // To T1: the time of the freeze's cut.
    let recs = records(&dir);
    assert_cuts_follow_their_writes(&recs);
    let cut_time = abproxy::operator::journal::utc_us(recs[cut1 as usize - 1].time_us);
    let backup_s = backup.to_str().unwrap();
    let out = replay(
        &dir,
        &lab.direct(),
        &["--after", backup_s, "--until", &cut_time],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(user_data(&lab.direct()).await, at_t1, "T1 exactly");
    let next: u64 = out
        .stdout
        .split("next: --from ")
        .nth(1)
        .unwrap_or_else(|| panic!("{out:?}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        next <= cut1,
        "the last write replayed was answered before the cut: {out:?}"
    );

    // On from where it stopped: T2, each write once.
    let out = replay(
        &dir,
        &lab.direct(),
        &["--after", backup_s, "--from", &next.to_string()],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(user_data(&lab.direct()).await, at_t2, "T2 exactly");
    // Every acknowledged write, once: the two replays together applied
    // every successful write after the backup's cut.
    let replayed: usize = [&out.stdout]
        .iter()
        .map(|s| {
            s.split("replayed ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    let after_cut = journaled(&recs)
        .iter()
        .filter(|(i, o)| i.seq > cut0 && result_of(o) == 0 && o.seq >= next)
        .count();
    assert_eq!(replayed, after_cut);
    // The last password writer 0 set for user 1 works (rounds are whole:
    // the writers stop between rounds).
    assert!(rounds[0] >= 3, "writer 0 changed its password: {rounds:?}");
    let pw = format!("p0-{}", rounds[0] / 3 * 3);
    let who = ldap_tool(
        "ldapwhoami",
        &[
            "-x",
            "-H",
            &lab.direct(),
            "-D",
            &testkit::user_dn(1),
            "-w",
            &pw,
        ],
        None,
    )
    .await;
    assert_eq!(who.code, Some(0), "{pw}: {}", who.stderr);
    // Replaying the same range again is a mistake replay notices: the
    // first add, rename or delete the server already holds is answered
    // otherwise, and replay stops there, saying so.
    let again = replay(&dir, &lab.direct(), &["--after", backup_s]).await;
    assert_eq!(again.code, Some(15), "{again:?}");
    assert!(again.stdout.contains("1 mismatch(es)"), "{again:?}");
    assert!(again.stderr.contains("the server now answers"), "{again:?}");
}

/// `journal prune --before BACKUP` removes the segments the backup makes
/// unneeded (every record before its cut), never the last one; what a
/// replay after that backup needs stays, and `check` accepts the pruned
/// journal. A replay after an older backup whose cut was pruned is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_only_what_a_backup_makes_unneeded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let mut lab = journal_lab(&dir, |_| {}).await;
    let bin = env!("CARGO_BIN_EXE_abproxy");
    let journal = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .arg("journal")
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let write = |n: usize, url: String, tag: &'static str| async move {
        let mut c = bound_at(url.trim_start_matches("ldap://"), ADMIN_DN, ADMIN_PW).await;
        for i in 0..n {
            let dn = format!("cn=pr-{tag}-{i},{SUFFIX}");
            assert_eq!(send_one(&mut c, add(2 + i as i32, &dn, "pr")).await.code, 0);
        }
    };
    let backup = |name: &str| tmp.path().join(name);
    write(5, lab.proxied(), "a").await;
    let b1 = backup("b1");
    let out = crate::support::backup::backup_as(
        &lab,
        ADMIN_DN,
        ADMIN_PW,
        &["--to", b1.to_str().unwrap(), "--method", "ldif"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Its cut is in the only segment: nothing to remove.
    let (code, text) = journal(&["prune", "--before", b1.to_str().unwrap(), "--dry-run"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("0 segment(s)"), "{text}");

    // The proxy restarted: a new segment; a backup there.
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.direct(),
        ..Config::default()
    };
    config.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
    config.freeze.root_dns = config.freeze.allowed.clone();
    config.journal.dir = Some(dir.clone());
    lab.proxy.shutdown().await.unwrap();
    lab.proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    write(5, lab.proxied(), "b").await;
    let b2 = backup("b2");
    let out = crate::support::backup::backup_as(
        &lab,
        ADMIN_DN,
        ADMIN_PW,
        &["--to", b2.to_str().unwrap(), "--method", "ldif"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    write(3, lab.proxied(), "c").await;
    assert_eq!(segments(&dir).unwrap().len(), 2);
    let (code, text) = journal(&["prune", "--before", b2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("1 segment(s) removed"), "{text}");
    let left = segments(&dir).unwrap();
    assert_eq!(left.len(), 1);
    let cut2 = crate::support::backup::manifest_json(&b2)["freeze"]["journal_cut"]
        .as_u64()
        .unwrap();
    assert!(left[0].0 <= cut2, "the cut's segment stays");
    let (code, text) = journal(&["check"]);
    assert_eq!(code, Some(0), "{text}");
    // What a replay after b2 needs is there: its three writes.
    let copy = start_slapd(SlapdOptions::default()).await;
    let out = replay(
        &dir,
        &copy.url(),
        &["--after", b2.to_str().unwrap(), "--continue"],
    )
    .await;
    assert!(out.stdout.contains("replayed 3 write(s)"), "{out:?}");
    // b1's cut is gone: refused, nothing sent.
    let out = replay(&dir, &copy.url(), &["--after", b1.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("has no record"), "{out:?}");
}

/// `backup --incremental --base DIR` keeps the journal from the base's cut
/// to its own, and no data; `verify` checks the segments (intact, no gap,
/// both cuts); a chain full <- incremental <- incremental restores, by
/// replaying each increment after its base, to the data at each backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backups_chain_the_journal_and_restore_by_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let mut lab = journal_lab(&dir, |_| {}).await;
    let backup = |args: Vec<String>| {
        let lab = &lab;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::support::backup::backup_as(lab, ADMIN_DN, ADMIN_PW, &args).await
        }
    };
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let incremental = |to: &str, base: &str| {
        vec![
            "--to".to_string(),
            path(to),
            "--incremental".into(),
            "--base".into(),
            path(base),
            "--journal".into(),
            dir.to_str().unwrap().into(),
        ]
    };
    let writes = |tag: &'static str| {
        let addr = lab.proxy_addr();
        async move {
            let mut c = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
            for i in 0..4 {
                let dn = format!("cn={tag}{i},{SUFFIX}");
                assert_eq!(send_one(&mut c, add(2 + 2 * i, &dn, tag)).await.code, 0);
                let m = modify(
                    3 + 2 * i,
                    &testkit::user_dn(i as usize + 1),
                    "description",
                    tag,
                );
                assert_eq!(send_one(&mut c, m).await.code, 0);
            }
        }
    };

    let out = backup(vec![
        "--to".into(),
        path("full"),
        "--method".into(),
        "ldif".into(),
    ])
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    writes("one").await;
    let at_one = user_data(&lab.direct()).await;
    let out = backup(incremental("inc1", "full")).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    writes("two").await;
    let at_two = user_data(&lab.direct()).await;
    let out = backup(incremental("inc2", "inc1")).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let full = crate::support::backup::manifest_json(Path::new(&path("full")));
    let inc1 = crate::support::backup::manifest_json(Path::new(&path("inc1")));
    let inc2 = crate::support::backup::manifest_json(Path::new(&path("inc2")));
    assert_eq!(inc1["incremental"]["base_backup_id"], full["backup_id"]);
    assert_eq!(
        inc1["incremental"]["base_cut"],
        full["freeze"]["journal_cut"]
    );
    assert_eq!(inc1["incremental"]["writes"], 8);
    assert_eq!(inc2["incremental"]["base_backup_id"], inc1["backup_id"]);
    assert_eq!(
        inc2["incremental"]["base_cut"],
        inc1["freeze"]["journal_cut"]
    );
    assert_eq!(inc2["incremental"]["writes"], 8);
    assert_eq!(inc2["backends"].as_array().unwrap().len(), 0, "no data");
    for inc in ["inc1", "inc2"] {
        let out = crate::support::backup::verify(&[&path(inc)]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.stdout.contains("8 write(s) after"), "{out:?}");
    }
    // A segment damaged (and the checksums made to agree): verify finds it.
    let bad = tmp.path().join("bad");
    crate::support::backup::copy_backup(Path::new(&path("inc2")), &bad);
    let seg = inc2["incremental"]["segments"][0].as_str().unwrap();
    let mut bytes = std::fs::read(bad.join(seg)).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(bad.join(seg), bytes).unwrap();
    crate::support::backup::reseal(&bad);
    let out = crate::support::backup::verify(&[bad.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(10), "{out:?}");
    // A base that names no journal cut: refused before anything.
    let out = backup(incremental("inc3", "nothing-here")).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);

    // Restored: the full backup, then the increments in order; the chain
    // is checked first.
    restore_in_place(&mut lab, Path::new(&path("full")), &tmp.path().join("work")).await;
    let direct = lab.direct();
    let admin = (ADMIN_DN, ADMIN_PW);
    let out = replay_as(
        &direct,
        admin,
        &["--increments", &path("inc2"), &path("inc1")],
    )
    .await;
    assert_eq!(out.code, Some(2), "out of order: {out:?}");
    assert!(out.stderr.contains("is not based on"), "{out:?}");
    // Up to inc1's moment: its cut's time.
    let recs = records(&dir);
    let cut1 = inc1["freeze"]["journal_cut"].as_u64().unwrap();
    let t1 = abproxy::operator::journal::utc_us(recs[cut1 as usize - 1].time_us);
    let args = ["--increments", &path("inc1"), &path("inc2"), "--until", &t1];
    let out = replay_as(&direct, admin, &args).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("replayed 8 write(s)"), "{out:?}");
    assert!(
        out.stdout.contains("replayed 0 write(s)"),
        "inc2 is after T1: {out:?}"
    );
    assert_eq!(user_data(&lab.direct()).await, at_one);
    let inc2_dir = Path::new(&path("inc2")).to_path_buf();
    let out = replay(&inc2_dir, &lab.direct(), &["--after", &path("inc1")]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(user_data(&lab.direct()).await, at_two);
}

/// A replay stops at the first write the server answers otherwise, says
/// where to resume, and resumed there after the cause is fixed applies
/// every remaining write once (the ones before it are not sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_stopped_at_a_mismatch_resumes_where_it_says() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let lab = journal_lab(&dir, |_| {}).await;
    let copy = start_slapd(SlapdOptions {
        nosync: true,
        ..Default::default()
    })
    .await;
    let mut c = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let dn = |x: &str| format!("cn={x},{SUFFIX}");
    for (i, m) in [
        add(2, &dn("a"), "a"),
        add(3, &dn("b"), "b"),
        modify(4, &dn("b"), "description", "b2"),
        add(5, &dn("c"), "c"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(send_one(&mut c, m).await.code, 0, "write {i}");
    }
    let want = user_data(&lab.direct()).await;
    // The copy already has an entry b (someone wrote there): the add of b
    // is answered 68.
    let pre = ldap_tool(
        "ldapadd",
        &["-x", "-H", &copy.url(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&format!("dn: {}\nobjectClass: device\ncn: b\n", dn("b"))),
    )
    .await;
    assert_eq!(pre.code, Some(0), "{pre:?}");

    let out = replay(&dir, &copy.url(), &[]).await;
    assert_eq!(out.code, Some(15), "{out:?}");
    assert!(out.stdout.contains("replayed 1 write(s)"), "{out:?}");
    assert!(out.stderr.contains("68 entryAlreadyExists"), "{out:?}");
    let at: u64 = out
        .stdout
        .split("resume with --from ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The cause removed, resumed where it said: the rest, once each (the
    // add of a again would stop it with 68).
    let del = ldap_tool(
        "ldapdelete",
        &[
            "-x",
            "-H",
            &copy.url(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            &dn("b"),
        ],
        None,
    )
    .await;
    assert_eq!(del.code, Some(0), "{del:?}");
    let out = replay(&dir, &copy.url(), &["--from", &at.to_string()]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("replayed 3 write(s)"), "{out:?}");
    assert_eq!(user_data(&copy.url()).await, want);
}

/// Hostile but well-formed sequences: a write pipelined right behind a
/// bind is journaled with the identity that bind's answer gave; a write
/// abandoned while the server runs it is journaled with its outcome (the
/// client gets none), before the next freeze's cut; a message ID reused
/// while its write is outstanding ends the session and the second request
/// is neither sent nor journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sequences_leave_an_exact_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let lab = journal_lab(&dir, |_| {}).await;
    let user1 = testkit::user_dn(1);

    // Bind as user1 and, without waiting, modify its own entry; then bind
    // as the admin and, without waiting, add.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    let own = encode(modify(3, &user1, "description", "mine"));
    let added = encode(add(5, &format!("cn=h1,{SUFFIX}"), "h1"));
    c.send_msg(bind(2, &user1, &testkit::user_pw(1))).await;
    c.send(&own).await;
    c.send_msg(bind(4, ADMIN_DN, ADMIN_PW)).await;
    c.send(&added).await;
    let (n, codes) = crate::support::freeze::recv_finals(&mut c, &[2, 3, 4, 5]).await;
    assert_eq!((n, codes), (4, vec![0, 0, 0, 0]));

    // A slow add abandoned while the server runs it.
    let slow = encode(crate::support::freeze::slow_add(
        6,
        &format!("cn=h2,{SUFFIX}"),
        100_000,
    ));
    c.send(&slow).await;
    // In flight before the abandon and the freeze (else the freeze could
    // hold it, and the abandon would take it out of the queue unsent).
    wait_status(&lab, "the slow add in flight", |s| s.in_flight >= 1).await;
    c.send_msg(LdapMsg::new(7, LdapOp::AbandonRequest(6))).await;
    // A freeze: its drain waits for the abandoned write.
    let mut op = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let (code, on) = call(&mut op, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{on}");
    let cut: u64 = on.rsplit("journal cut ").next().unwrap().parse().unwrap();
    let (code, _) = call(&mut op, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0);

    // Two adds with one message ID, pipelined: the session ends.
    let mut d = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let first = encode(crate::support::freeze::slow_add(
        9,
        &format!("cn=h3,{SUFFIX}"),
        50_000,
    ));
    let second = encode(add(9, &format!("cn=h4,{SUFFIX}"), "h4"));
    d.send(&first).await;
    d.send(&second).await;
    let notice = d.recv().await.expect("a notice");
    let why = assert_notice(&notice, 2);
    assert!(why.contains("reused"), "{why}");

    // The first one the server still runs: the session, over for its
    // client, waits for it; slapd does not answer a connection the proxy
    // half-closed, so it ends as lost (indeterminate), never unrecorded.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let intent_of = |recs: &[Record], bytes: &[u8]| {
        recs.iter()
            .find(|r| matches!(&r.body, Body::Intent { request, .. } if request[..] == *bytes))
            .map(|r| r.seq)
    };
    let decided = |recs: &[Record], seq: u64| {
        recs.iter()
            .find(|o| match &o.body {
                Body::Outcome { intent, .. } | Body::Lost { intent, .. } => *intent == seq,
                _ => false,
            })
            .cloned()
    };
    let recs = loop {
        let recs = records(&dir);
        let seq = intent_of(&recs, &first).expect("the first add was sent and journaled");
        if decided(&recs, seq).is_some() {
            break recs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write of a session that ended is decided"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let identity = |seq: u64| match &recs[seq as usize - 1].body {
        Body::Intent { identity, .. } => identity.clone(),
        _ => unreachable!(),
    };
    let own_seq = intent_of(&recs, &own).expect("journaled");
    let added_seq = intent_of(&recs, &added).expect("journaled");
    assert_eq!(identity(own_seq), user1);
    assert_eq!(identity(added_seq), ADMIN_DN);
    let slow_seq = intent_of(&recs, &slow).expect("journaled");
    let slow_out = decided(&recs, slow_seq).expect("decided");
    assert!(
        matches!(slow_out.body, Body::Outcome { result: 0, .. }),
        "the abandoned add ran: {slow_out:?}"
    );
    assert!(
        slow_seq < cut && slow_out.seq < cut,
        "drained before the cut"
    );
    // The second add with the same ID never went out.
    assert_eq!(intent_of(&recs, &second), None);
    let direct = user_data(&lab.direct()).await;
    assert!(!direct.contains_key(&format!("cn=h4,{SUFFIX}")));
    assert!(direct.contains_key(&format!("cn=h2,{SUFFIX}")));
}
