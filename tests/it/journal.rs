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
async fn journal_lab(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Lab {
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
fn records(dir: &Path) -> Vec<Record> {
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
struct Sent {
    bytes: Bytes,
    code: i64,
}

async fn send_one(c: &mut RawConn, msg: LdapMsg) -> Sent {
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
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-H",
            url,
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-b",
            SUFFIX,
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "*",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    abproxy::backup::ldif::read(&out.stdout)
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

fn modify_op(msgid: i32, dn: &str, changes: Vec<(LdapModifyType, &str, Vec<&str>)>) -> LdapMsg {
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
