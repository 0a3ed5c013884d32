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
