//! Allow-Backup from a test's side: the extended requests, their outcome,
//! a bound raw connection and the proxy's status.

use std::collections::HashSet;
use std::time::Duration;

use abproxy::wire::Envelope;
use abproxy_proto::{
    AllowBackupRequest, AllowBackupStatus, ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID,
};
use ldap3_proto::proto::*;
use testkit::{user_dn, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN};

use super::*;

pub fn exop(msgid: i32, name: &str, value: Option<Vec<u8>>) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: name.into(),
            value,
        }),
    )
}

pub fn ab(msgid: i32, req: &AllowBackupRequest) -> LdapMsg {
    exop(
        msgid,
        ALLOW_BACKUP_OID,
        Some(abproxy_proto::encode_request(req)),
    )
}

/// Result code and diagnostic message of a final response, via ldap3_proto.
pub fn outcome(frame: &[u8]) -> (i64, String) {
    use tokio_util::codec::Decoder;
    let code = result_code(frame).expect("a final response");
    let mut buf = bytes::BytesMut::from(frame);
    let msg = ldap3_proto::LdapCodec::new(Some(1 << 26), None)
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    let text = match msg.op {
        LdapOp::ExtendedResponse(r) => r.res.message,
        LdapOp::SearchResultDone(r)
        | LdapOp::ModifyResponse(r)
        | LdapOp::AddResponse(r)
        | LdapOp::DelResponse(r) => r.message,
        other => format!("{other:?}"),
    };
    (code, text)
}

pub async fn bound(lab: &Lab, dn: &str, pw: &str) -> RawConn {
    bound_at(&lab.proxy_addr(), dn, pw).await
}

/// Sends a request and returns its final response.
pub async fn call(c: &mut RawConn, msg: LdapMsg) -> (i64, String) {
    let id = msg.msgid;
    c.send_msg(msg).await;
    outcome(c.recv_until_final(id).await.last().unwrap())
}

/// The proxy's status, asked as cn=admin,dc=other,dc=org (binds into a
/// stop-mode dc=example,dc=org are held while it is frozen).
pub async fn status(lab: &Lab) -> AllowBackupStatus {
    let mut c = bound(lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    c.send_msg(exop(2, ALLOW_BACKUP_STATUS_OID, None)).await;
    let f = c.recv().await.unwrap();
    let env = Envelope::response(&f).unwrap();
    assert_eq!(env.result_code, Some(0));
    abproxy_proto::decode_status(env.value_bytes(&f).expect("status value")).unwrap()
}

/// Waits (bounded, polling the proxy's status) until `pred` holds.
pub async fn wait_status(
    lab: &Lab,
    what: &str,
    pred: impl Fn(&AllowBackupStatus) -> bool,
) -> AllowBackupStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(lab).await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// No frame arrives on `c` while the proxy reports the request queued:
/// the queued request really is held.
pub async fn assert_nothing_pending(c: &mut RawConn) {
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(200), c.stream.peek(&mut b)).await;
    assert!(r.is_err(), "a response arrived for a held request");
}

/// Reads until every message ID in `ids` has its final response; returns
/// (frames seen, final result code per ID in `ids` order).
pub async fn recv_finals(c: &mut RawConn, ids: &[i32]) -> (usize, Vec<i64>) {
    let mut codes = vec![None; ids.len()];
    let mut n = 0;
    while codes.iter().any(Option::is_none) {
        let f = c.recv().await.expect("connection closed early");
        n += 1;
        let env = Envelope::response(&f).unwrap();
        if abproxy::wire::op::is_final_response(env.op) {
            if let Some(i) = ids.iter().position(|&id| id == env.msgid) {
                codes[i] = env.result_code;
            }
        }
    }
    (n, codes.into_iter().map(Option::unwrap).collect())
}

/// A slow write: an add of a `groupOfNames` entry `dn` with `n` distinct
/// `member` values (`uid=mI,ou=people,dc=example,dc=org`, about 40 octets
/// each; `member` is indexed). Measured on the lab slapd (nosync, 2 cores):
/// 250,000 values (10 MB) take about 1.5 s from the last octet sent to the
/// response; 100,000 (short values) about 0.4 s.
pub fn slow_add(msgid: i32, dn: &str, n: usize) -> LdapMsg {
    let cn = dn
        .split(',')
        .next()
        .and_then(|r| r.split_once('='))
        .map_or("slow", |(_, v)| v);
    let members = (0..n)
        .map(|i| format!("uid=m{i},ou=people,dc=example,dc=org").into_bytes())
        .collect();
    LdapMsg::new(
        msgid,
        LdapOp::AddRequest(LdapAddRequest {
            dn: dn.into(),
            attributes: vec![
                LdapAttribute {
                    atype: "objectClass".into(),
                    vals: vec![b"groupOfNames".to_vec()],
                },
                LdapAttribute {
                    atype: "cn".into(),
                    vals: vec![cn.as_bytes().to_vec()],
                },
                LdapAttribute {
                    atype: "member".into(),
                    vals: members,
                },
            ],
        }),
    )
}

/// BER definite length octets.
fn ber_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let bytes: Vec<u8> = n
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|&b| b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// `msg` encoded with one more control appended (`controls [0]`): `oid`,
/// `critical`, no value. ldap3_proto has no generic control to build one.
pub fn with_control(msg: LdapMsg, control_oid: &str, critical: bool) -> bytes::Bytes {
    assert!(msg.ctrl.is_empty(), "only for a message without controls");
    let frame = encode(msg);
    assert_eq!(frame[0], 0x30);
    let header = if frame[1] < 0x80 {
        2
    } else {
        2 + (frame[1] & 0x7f) as usize
    };
    let mut ctrl = vec![0x04];
    ctrl.extend(ber_len(control_oid.len()));
    ctrl.extend_from_slice(control_oid.as_bytes());
    if critical {
        ctrl.extend_from_slice(&[0x01, 0x01, 0xff]);
    }
    let mut seq = vec![0x30];
    seq.extend(ber_len(ctrl.len()));
    seq.extend(ctrl);
    let mut controls = vec![0xa0];
    controls.extend(ber_len(seq.len()));
    controls.extend(seq);
    let mut body = frame[header..].to_vec();
    body.extend(controls);
    let mut out = vec![0x30];
    out.extend(ber_len(body.len()));
    out.extend(body);
    out.into()
}

/// A base search of `dn` for `attr` at slapd itself (not through the
/// proxy), as its root DN.
pub async fn base_direct(lab: &Lab, dn: &str, attr: &str) -> ToolOutput {
    ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &lab.direct(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-b",
            dn,
            "-s",
            "base",
            attr,
        ],
        None,
    )
    .await
}

/// contextCSN of a suffix as slapd serves it (syncprov keeps it in memory).
pub async fn context_csn(lab: &Lab, suffix: &str) -> String {
    let out = base_direct(lab, suffix, "contextCSN").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .filter(|l| l.starts_with("contextCSN:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A modify replacing `attr` with `val`.
pub fn modify(msgid: i32, dn: &str, attr: &str, val: &str) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::ModifyRequest(LdapModifyRequest {
            dn: dn.into(),
            changes: vec![LdapModify {
                operation: LdapModifyType::Replace,
                modification: LdapPartialAttribute {
                    atype: attr.into(),
                    vals: vec![val.as_bytes().to_vec()],
                },
            }],
        }),
    )
}

/// A modify of user `k`'s description through `url` (as the admin), in a
/// task; its result code.
pub fn modify_in_background(url: &str, k: usize, value: &str) -> tokio::task::JoinHandle<u32> {
    let url = url.to_string();
    let value = value.to_string();
    tokio::spawn(async move {
        let (conn, mut ldap) = ldap3::LdapConnAsync::new(&url).await.unwrap();
        ldap3::drive!(conn);
        ldap.simple_bind(ADMIN_DN, ADMIN_PW)
            .await
            .unwrap()
            .success()
            .unwrap();
        let rc = ldap
            .modify(
                &user_dn(k),
                vec![ldap3::Mod::Replace(
                    "description",
                    HashSet::from([value.as_str()]),
                )],
            )
            .await
            .unwrap()
            .rc;
        let _ = ldap.unbind().await;
        rc
    })
}

/// User `k`'s description, read from the server at `direct` (slapd
/// itself: `lab.direct()`).
pub async fn description(direct: &str, k: usize) -> Option<String> {
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(direct).await.unwrap();
    ldap3::drive!(conn);
    let (entries, _) = ldap
        .search(
            &user_dn(k),
            ldap3::Scope::Base,
            "(objectClass=*)",
            vec!["description"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    let entry = ldap3::SearchEntry::construct(entries.into_iter().next()?);
    entry.attrs.get("description")?.first().cloned()
}

pub async fn join<T>(h: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(20), h)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 20 s"))
        .unwrap()
}
