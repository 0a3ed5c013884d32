//! The Allow-Backup extended operation against a real slapd through the
//! proxy: ON/OFF, refusals, holding and releasing, ordering, abandon,
//! disconnects, the drain time limit, lease expiry, holdUntilUnbind and a
//! consistency check under continuous writes.

use std::time::Duration;

use crate::support::freeze::*;
use crate::support::*;
use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::Mode;
use abproxy::wire::Envelope;
use abproxy_proto::{AllowBackupRequest, FreezeState, ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID};
use ldap3_proto::proto::*;
use testkit::{user_dn, SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN};

/// The lab's rootdns as operators (and in root_dns: they can connect
/// during a freeze).
fn allow_admin(c: &mut Config) {
    c.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
    c.freeze.root_dns = c.freeze.allowed.clone();
}

async fn freeze_lab(tweak: impl FnOnce(&mut Config)) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c| {
            allow_admin(c);
            tweak(c)
        },
    )
    .await
}

/// `[[backends]]` entries.
fn backends(list: &[(&str, Mode)]) -> Vec<BackendConfig> {
    list.iter()
        .map(|(suffix, mode)| BackendConfig::new(suffix, *mode))
        .collect()
}

#[tokio::test]
async fn ldapexop_on_status_off() {
    let lab = freeze_lab(|_| {}).await;
    let exop_args = |value: &str| {
        vec![
            "-x".to_string(),
            "-H".into(),
            lab.proxied(),
            "-D".into(),
            ADMIN_DN.into(),
            "-w".into(),
            ADMIN_PW.into(),
            format!("{ALLOW_BACKUP_OID}::{value}"),
        ]
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ldap_tool("ldapexop", &refs, None).await
    };
    let on = run(exop_args("MAMBAf8=")).await;
    assert_eq!(on.code, Some(0), "{on:?}");
    let s = status(&lab).await;
    assert_eq!(s.state, FreezeState::Frozen);
    assert_eq!(s.backends.len(), 2);
    assert!(s.backends.iter().all(|b| b.frozen));
    assert_eq!(s.holder.as_deref(), Some(ADMIN_DN.as_bytes()));
    assert!(s.lease_expires.is_some() && s.freeze_id.is_some());

    let again = run(exop_args("MAMBAf8=")).await;
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("Server is busy (51)"), "{again:?}");
    assert!(
        again.stderr.contains(ADMIN_DN),
        "names the holder: {again:?}"
    );

    let off = run(exop_args("MAMBAQA=")).await;
    assert_eq!(off.code, Some(0), "{off:?}");
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    let off = run(exop_args("MAMBAQA=")).await;
    assert_eq!(off.code, Some(0), "{off:?}");
    assert!(
        off.stdout.contains("not frozen") || off.stderr.contains("not frozen"),
        "{off:?}"
    );
}

#[tokio::test]
async fn refusals() {
    let lab = freeze_lab(|c| {
        c.backends = backends(&[
            ("dc=example,dc=org", Mode::Readonly),
            ("dc=other,dc=org", Mode::Unimplemented),
        ]);
    })
    .await;
    // Anonymous and a non-allowed user: insufficientAccessRights (50).
    let mut anon = RawConn::connect(&lab.proxy_addr()).await;
    let (code, msg) = call(&mut anon, ab(1, &AllowBackupRequest::on())).await;
    assert_eq!(code, 50, "{msg}");
    let mut user = bound(&lab, &user_dn(1), "pass1").await;
    let (code, msg) = call(&mut user, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 50);
    assert!(msg.contains(&user_dn(1)), "{msg}");

    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    // No value, or a value that is not an AllowBackupRequest: protocolError (2).
    let (code, msg) = call(&mut admin, exop(2, ALLOW_BACKUP_OID, None)).await;
    assert_eq!(code, 2, "{msg}");
    let (code, msg) = call(
        &mut admin,
        exop(3, ALLOW_BACKUP_OID, Some(vec![0x04, 0x00])),
    )
    .await;
    assert_eq!(code, 2);
    assert!(msg.contains("AllowBackupRequest"), "{msg}");
    // A DN under no backend: noSuchObject (32); nothing frozen.
    let req = AllowBackupRequest::on().with_dn_set(["dc=nowhere"]);
    let (code, msg) = call(&mut admin, ab(4, &req)).await;
    assert_eq!(code, 32, "{msg}");
    // An unimplemented backend: unwillingToPerform (53); also when implied by "all".
    let req = AllowBackupRequest::on().with_dn_set(["ou=people,dc=other,dc=org"]);
    assert_eq!(call(&mut admin, ab(5, &req)).await.0, 53);
    assert_eq!(
        call(&mut admin, ab(6, &AllowBackupRequest::on())).await.0,
        53
    );
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    // The implemented one alone works, by a DN under its suffix.
    let req = AllowBackupRequest::on().with_dn_set(["OU=People, DC=Example,DC=org"]);
    let (code, msg) = call(&mut admin, ab(7, &req)).await;
    assert_eq!(code, 0, "{msg}");
    let s = status(&lab).await;
    assert_eq!(s.backends.iter().filter(|b| b.frozen).count(), 1);
    // Status and OFF need the right too.
    user.send_msg(exop(3, ALLOW_BACKUP_STATUS_OID, None)).await;
    assert_eq!(result_code(&user.recv().await.unwrap()), Some(50));
    assert_eq!(
        call(&mut user, ab(4, &AllowBackupRequest::off())).await.0,
        50
    );
    assert_eq!(
        call(&mut admin, ab(8, &AllowBackupRequest::off())).await.0,
        0
    );
}

#[tokio::test]
async fn readonly_holds_writes_lets_reads_through_and_keeps_order() {
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            stats_log: true,
            ..Default::default()
        },
        allow_admin,
    )
    .await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");

    // A writer: modify, then (pipelined) a search of what it wrote.
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let dn = user_dn(3);
    w.send_msg(modify(2, &dn, "description", "written during the freeze"))
        .await;
    w.send_msg(search(3, &dn, 0, "(objectClass=*)", &["description"]))
        .await;
    wait_status(&lab, "two queued requests", |s| s.queued_requests == 2).await;
    assert_nothing_pending(&mut w).await;

    // Another client reads freely, and sees the old value.
    let mut r = RawConn::connect(&lab.proxy_addr()).await;
    r.send_msg(search(1, &dn, 0, "(objectClass=*)", &["description"]))
        .await;
    let frames = r.recv_until_final(1).await;
    assert_eq!(frames.len(), 2);
    assert!(String::from_utf8_lossy(&frames[0]).contains("initial"));
    // The server has not seen the write.
    let direct = base_direct(&lab, &dn, "description").await;
    assert!(direct.stdout.contains("description: initial"), "{direct:?}");

    let (code, msg) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{msg}");
    assert!(msg.contains("2 queued"), "{msg}");
    // Both are answered; the server received them in the client's order.
    let (_, codes) = recv_finals(&mut w, &[2, 3]).await;
    assert_eq!(codes, [0, 0]);
    let log = std::fs::read_to_string(lab.slapd.log_path()).unwrap();
    let op_of = |needle: &str| -> (String, u64) {
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not in slapd log"));
        let conn = line
            .split_whitespace()
            .find(|w| w.starts_with("conn="))
            .unwrap()
            .to_string();
        let op = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("op="))
            .unwrap()
            .parse()
            .unwrap();
        (conn, op)
    };
    let (mconn, mop) = op_of(&format!("MOD dn=\"{dn}\""));
    let searches: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&mconn) && l.contains(&format!("SRCH base=\"{dn}\"")))
        .collect();
    assert_eq!(searches.len(), 1, "{searches:?}");
    let sop: u64 = searches[0]
        .split_whitespace()
        .find_map(|w| w.strip_prefix("op="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        mop < sop,
        "modify (op {mop}) reached slapd before the search (op {sop})"
    );
    // And a later read on that connection sees the write.
    let f = w_search(&mut w, &dn).await;
    assert!(f.contains("written during the freeze"));
    assert_eq!(status(&lab).await.queued_requests, 0);
}

async fn w_search(c: &mut RawConn, dn: &str) -> String {
    c.send_msg(search(9, dn, 0, "(objectClass=*)", &["description"]))
        .await;
    let frames = c.recv_until_final(9).await;
    String::from_utf8_lossy(&frames[0]).into_owned()
}

#[tokio::test]
async fn stop_mode_holds_searches_too() {
    let lab = freeze_lab(|c| {
        c.backends = backends(&[
            ("dc=example,dc=org", Mode::Stop),
            ("dc=other,dc=org", Mode::Readonly),
        ]);
    })
    .await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    let mut r = RawConn::connect(&lab.proxy_addr()).await;
    r.send_msg(search(1, &user_dn(1), 0, "(objectClass=*)", &["uid"]))
        .await;
    wait_status(&lab, "a queued search", |s| s.queued_requests == 1).await;
    assert_nothing_pending(&mut r).await;
    // The readonly backend still answers reads; the root DSE is never held.
    let mut o = RawConn::connect(&lab.proxy_addr()).await;
    o.send_msg(search(1, "dc=other,dc=org", 0, "(objectClass=*)", &["dc"]))
        .await;
    assert_eq!(
        result_code(o.recv_until_final(1).await.last().unwrap()),
        Some(0)
    );
    o.send_msg(search(2, "", 0, "(objectClass=*)", &["namingContexts"]))
        .await;
    assert_eq!(
        result_code(o.recv_until_final(2).await.last().unwrap()),
        Some(0)
    );

    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    let frames = r.recv_until_final(1).await;
    assert_eq!(frames.len(), 2);
    assert_eq!(result_code(&frames[1]), Some(0));
}

#[tokio::test]
async fn abandon_and_disconnect_of_queued_requests_leave_no_trace() {
    let lab = freeze_lab(|_| {}).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );

    // Abandoned while queued: removed, never sent.
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    a.send_msg(modify(2, &user_dn(4), "description", "abandoned"))
        .await;
    wait_status(&lab, "queued modify", |s| s.queued_requests == 1).await;
    a.send_msg(LdapMsg::new(3, LdapOp::AbandonRequest(2))).await;
    wait_status(&lab, "abandon removes it", |s| s.queued_requests == 0).await;

    // Cancelled while queued (RFC 3909): canceled (118) and success.
    a.send_msg(modify(4, &user_dn(4), "description", "cancelled"))
        .await;
    wait_status(&lab, "queued modify", |s| s.queued_requests == 1).await;
    let mut cancel_value = vec![0x30, 0x03, 0x02, 0x01, 0x04];
    a.send_msg(exop(
        5,
        "1.3.6.1.1.8",
        Some(std::mem::take(&mut cancel_value)),
    ))
    .await;
    let first = a.recv().await.unwrap();
    let second = a.recv().await.unwrap();
    let mut got = [
        (
            Envelope::response(&first).unwrap().msgid,
            result_code(&first),
        ),
        (
            Envelope::response(&second).unwrap().msgid,
            result_code(&second),
        ),
    ];
    got.sort();
    assert_eq!(got, [(4, Some(118)), (5, Some(0))]);

    // A client that goes away while queued: discarded.
    let mut d = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    d.send_msg(add(2, "cn=ghost,dc=example,dc=org", "ghost"))
        .await;
    wait_status(&lab, "queued add", |s| s.queued_requests == 1).await;
    drop(d);
    wait_status(&lab, "discarded", |s| s.queued_requests == 0).await;

    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    // The session that abandoned goes on; nothing reached the server.
    let (code, _) = call(
        &mut a,
        search(
            6,
            "dc=example,dc=org",
            2,
            "(|(cn=ghost)(description=abandoned)(description=cancelled))",
            &["1.1"],
        ),
    )
    .await;
    assert_eq!(code, 0);
    let direct = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &lab.direct(),
            "-b",
            "dc=example,dc=org",
            "(|(cn=ghost)(description=abandoned)(description=cancelled))",
            "1.1",
        ],
        None,
    )
    .await;
    assert_eq!(direct.code, Some(0));
    assert!(direct.stdout.trim().is_empty(), "{direct:?}");
}

#[tokio::test]
async fn lease_expiry_resumes_and_off_reports_it() {
    let lab = freeze_lab(|c| c.freeze.lease_secs = 1).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    // Held, then released by the lease without any OFF.
    let (code, _) = call(&mut w, modify(2, &user_dn(5), "description", "after lease")).await;
    assert_eq!(code, 0);
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    let (code, msg) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 80, "{msg}");
    assert!(
        msg.contains("freeze expired after 1 s; the backup may be inconsistent"),
        "{msg}"
    );
    // Reported once.
    assert_eq!(
        call(&mut admin, ab(4, &AllowBackupRequest::off())).await,
        (0, "not frozen".into())
    );
}

/// The id in a message ending "...; freeze id N".
fn freeze_id_in(msg: &str) -> u64 {
    let (_, tail) = msg.rsplit_once("freeze id ").expect("a freeze id");
    tail.trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or_else(|_| panic!("no id in {msg:?}"))
}

#[tokio::test]
async fn off_naming_a_freeze_releases_only_that_freeze() {
    let lab = freeze_lab(|c| c.freeze.lease_secs = 1).await;
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut b = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let on = AllowBackupRequest::on;
    let off = AllowBackupRequest::off;

    // A's freeze ends by its lease; B freezes; A's OFF names A's freeze.
    let (code, msg) = call(&mut a, ab(2, &on())).await;
    assert_eq!(code, 0, "{msg}");
    let first = freeze_id_in(&msg);
    wait_status(&lab, "the lease to expire", |s| {
        s.state == FreezeState::Thawed
    })
    .await;
    let (code, msg) = call(&mut b, ab(2, &on())).await;
    assert_eq!(code, 0, "{msg}");
    let second = freeze_id_in(&msg);
    assert_eq!(second, first + 1);
    let (code, msg) = call(&mut a, ab(3, &off().with_freeze_id(first))).await;
    assert_eq!(code, 80, "{msg}");
    assert!(
        msg.contains(&format!(
            "freeze {first} is not the current freeze (current: freeze {second}); \
             it ended: its lease expired after 1 s"
        )) && msg.contains("nothing released"),
        "{msg}"
    );
    let s = status(&lab).await;
    assert_eq!((s.state, s.freeze_id), (FreezeState::Frozen, Some(second)));
    // An id never given out, and ON with an id.
    let (code, msg) = call(&mut a, ab(4, &off().with_freeze_id(second + 10))).await;
    assert_eq!(code, 80, "{msg}");
    assert!(msg.contains("was set up"), "{msg}");
    let (code, msg) = call(&mut a, ab(5, &on().with_freeze_id(second))).await;
    assert_eq!(code, 2, "{msg}");
    assert_eq!(status(&lab).await.freeze_id, Some(second));
    // B's own OFF releases it, and says which.
    let (code, msg) = call(&mut b, ab(3, &off().with_freeze_id(second))).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(freeze_id_in(&msg), second);
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    // Named again after it ended: who released it.
    let (code, msg) = call(&mut b, ab(4, &off().with_freeze_id(second))).await;
    assert_eq!(code, 80, "{msg}");
    assert!(
        msg.contains(&format!("it ended: released by {OTHER_ADMIN_DN} (conn")),
        "{msg}"
    );

    // A plain OFF (ldapexop) still ends whatever freeze is current; the
    // holder's OFF naming it then learns who did.
    let (code, msg) = call(&mut a, ab(6, &on())).await;
    assert_eq!(code, 0, "{msg}");
    let third = freeze_id_in(&msg);
    assert_eq!(third, second + 1);
    assert_eq!(call(&mut b, ab(5, &off())).await.0, 0);
    let (code, msg) = call(&mut a, ab(7, &off().with_freeze_id(third))).await;
    assert_eq!(code, 80, "{msg}");
    assert!(
        msg.contains(&format!("it ended: released by {OTHER_ADMIN_DN} (conn"))
            && msg.contains("an OFF that named no freeze"),
        "{msg}"
    );
}

#[tokio::test]
async fn off_with_a_dn_set_releases_only_the_frozen_set() {
    let lab = freeze_lab(|_| {}).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let example = AllowBackupRequest::on().with_dn_set(["dc=example,dc=org"]);
    assert_eq!(call(&mut admin, ab(2, &example)).await.0, 0);
    let frozen = |s: &abproxy_proto::AllowBackupStatus| {
        s.backends
            .iter()
            .filter(|b| b.frozen)
            .map(|b| String::from_utf8_lossy(&b.suffix).into_owned())
            .collect::<Vec<_>>()
    };
    // Naming a backend that is not frozen: refused, nothing released.
    for (msgid, dns) in [
        (3, &["dc=other,dc=org"][..]),
        (4, &["dc=example,dc=org", "dc=other,dc=org"]),
    ] {
        let req = AllowBackupRequest::off().with_dn_set(dns);
        let (code, msg) = call(&mut admin, ab(msgid, &req)).await;
        assert_eq!(code, 53, "{msg}");
        assert!(
            msg.starts_with("dc=other,dc=org not frozen (frozen: dc=example,dc=org;")
                && msg.ends_with("nothing released"),
            "{msg}"
        );
        let s = status(&lab).await;
        assert_eq!(s.state, FreezeState::Frozen);
        assert_eq!(frozen(&s), ["dc=example,dc=org"]);
    }
    // Under no backend: noSuchObject.
    let req = AllowBackupRequest::off().with_dn_set(["dc=nowhere"]);
    assert_eq!(call(&mut admin, ab(5, &req)).await.0, 32);
    // The frozen set (by a DN under it) releases.
    let req = AllowBackupRequest::off().with_dn_set(["ou=people,dc=example,dc=org"]);
    let (code, msg) = call(&mut admin, ab(6, &req)).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);

    // Everything frozen: naming one backend is a partial release, refused.
    assert_eq!(
        call(&mut admin, ab(7, &AllowBackupRequest::on())).await.0,
        0
    );
    let req = AllowBackupRequest::off().with_dn_set(["dc=example,dc=org"]);
    let (code, msg) = call(&mut admin, ab(8, &req)).await;
    assert_eq!(code, 53, "{msg}");
    assert!(msg.contains("partial release is not supported"), "{msg}");
    assert_eq!(frozen(&status(&lab).await).len(), 2);
    let req = AllowBackupRequest::off().with_dn_set(["dc=other,dc=org", "dc=example,dc=org"]);
    assert_eq!(call(&mut admin, ab(9, &req)).await.0, 0);
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
}

#[tokio::test]
async fn empty_dn_set_is_a_protocol_error_and_refusals_use_no_freeze_id() {
    let lab = freeze_lab(|_| {}).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let none: [&str; 0] = [];
    let (code, msg) = call(
        &mut admin,
        ab(2, &AllowBackupRequest::on().with_dn_set(none)),
    )
    .await;
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("empty dnSet"), "{msg}");
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);

    let (code, msg) = call(&mut admin, ab(3, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    let first = freeze_id_in(&msg);
    // Refused: busy, empty dnSet (also for OFF), no such backend.
    assert_eq!(
        call(&mut admin, ab(4, &AllowBackupRequest::on())).await.0,
        51
    );
    let (code, _) = call(
        &mut admin,
        ab(5, &AllowBackupRequest::off().with_dn_set(none)),
    )
    .await;
    assert_eq!(code, 2);
    assert_eq!(status(&lab).await.freeze_id, Some(first));
    assert_eq!(
        call(&mut admin, ab(6, &AllowBackupRequest::off())).await.0,
        0
    );
    let (code, _) = call(
        &mut admin,
        ab(7, &AllowBackupRequest::on().with_dn_set(["dc=nowhere"])),
    )
    .await;
    assert_eq!(code, 32);
    let (code, _) = call(
        &mut admin,
        ab(8, &AllowBackupRequest::on().with_dn_set(none)),
    )
    .await;
    assert_eq!(code, 2);
    // The next freeze has the next id.
    let (code, msg) = call(&mut admin, ab(9, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(freeze_id_in(&msg), first + 1);
    assert_eq!(status(&lab).await.freeze_id, Some(first + 1));
}

#[tokio::test]
async fn hold_until_unbind_releases_when_the_holder_leaves() {
    let lab = freeze_lab(|_| {}).await;
    let mut holder = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let req = AllowBackupRequest::on().with_hold_until_unbind(true);
    assert_eq!(call(&mut holder, ab(2, &req)).await.0, 0);
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    w.send_msg(modify(2, &user_dn(6), "description", "after holder"))
        .await;
    wait_status(&lab, "queued", |s| s.queued_requests == 1).await;
    holder
        .send_msg(LdapMsg::new(3, LdapOp::UnbindRequest))
        .await;
    let m = w.recv().await.unwrap();
    assert_eq!(
        (Envelope::response(&m).unwrap().msgid, result_code(&m)),
        (2, Some(0))
    );
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
}

#[tokio::test]
async fn rust_client_freezes_and_resumes() {
    let lab = freeze_lab(|_| {}).await;
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(&lab.proxied()).await.unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(ADMIN_DN, ADMIN_PW)
        .await
        .unwrap()
        .success()
        .unwrap();
    let on = ldap3::exop::Exop {
        name: Some(ALLOW_BACKUP_OID.into()),
        val: Some(abproxy_proto::encode_request(
            &AllowBackupRequest::on().with_time_limit(5),
        )),
    };
    let res = ldap.extended(on).await.unwrap();
    assert_eq!(res.1.rc, 0, "{:?}", res.1);
    assert!(
        res.1
            .text
            .starts_with("frozen: dc=example,dc=org; dc=other,dc=org"),
        "{}",
        res.1.text
    );
    let st = ldap
        .extended(ldap3::exop::Exop {
            name: Some(ALLOW_BACKUP_STATUS_OID.into()),
            val: None,
        })
        .await
        .unwrap();
    let value = abproxy_proto::decode_status(st.0.val.as_deref().unwrap()).unwrap();
    assert_eq!(value.state, FreezeState::Frozen);
    let off = ldap3::exop::Exop {
        name: Some(ALLOW_BACKUP_OID.into()),
        val: Some(abproxy_proto::encode_request(&AllowBackupRequest::off())),
    };
    assert_eq!(ldap.extended(off).await.unwrap().1.rc, 0);
    ldap.unbind().await.unwrap();
}

/// A client that stops reading a large result keeps its search in flight.
async fn stalled_search(lab: &Lab) -> RawConn {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock
        .connect(lab.proxy_addr().parse().unwrap())
        .await
        .unwrap();
    let mut c = RawConn::from_stream(stream);
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    c.send_msg(search(
        2,
        "ou=people,dc=example,dc=org",
        1,
        "(objectClass=*)",
        &["*"],
    ))
    .await;
    c
}

/// Waits until slapd has over 1 MiB queued on one of its sockets: the
/// stalled search really is stuck (a kernel-visible event).
async fn wait_slapd_blocked(port: u16) {
    wait_until("slapd blocked on the stalled client", 20, || {
        kernel_sockets()
            .iter()
            .any(|s| s.local_port == port && s.tx_queue > 1 << 20)
    })
    .await;
}

/// Adds `n` entries with a 1 MiB description each (so a search of them
/// cannot fit in socket buffers).
async fn add_big_entries(lab: &Lab, n: usize) {
    let mut c = bound(lab, ADMIN_DN, ADMIN_PW).await;
    let big = "x".repeat(1 << 20);
    for i in 0..n {
        let mut m = add(
            10 + i as i32,
            &format!("uid=big{i},ou=people,dc=example,dc=org"),
            "big",
        );
        if let LdapOp::AddRequest(a) = &mut m.op {
            a.attributes = vec![
                LdapAttribute {
                    atype: "objectClass".into(),
                    vals: vec![b"inetOrgPerson".to_vec()],
                },
                LdapAttribute {
                    atype: "uid".into(),
                    vals: vec![format!("big{i}").into_bytes()],
                },
                LdapAttribute {
                    atype: "cn".into(),
                    vals: vec![b"big".to_vec()],
                },
                LdapAttribute {
                    atype: "sn".into(),
                    vals: vec![b"big".to_vec()],
                },
                LdapAttribute {
                    atype: "description".into(),
                    vals: vec![big.clone().into_bytes()],
                },
            ];
        }
        assert_eq!(call(&mut c, m).await.0, 0);
    }
}

#[tokio::test]
async fn drain_time_limit_abandons_reads_in_stop_mode() {
    let lab = freeze_lab(|c| {
        c.backends = backends(&[("dc=example,dc=org", Mode::Stop)]);
    })
    .await;
    add_big_entries(&lab, 32).await;
    let mut slow = stalled_search(&lab).await;
    wait_status(&lab, "search in flight", |s| s.in_flight >= 1).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, msg) = call(
        &mut admin,
        ab(2, &AllowBackupRequest::on().with_time_limit(1)),
    )
    .await;
    assert_eq!(code, 0, "{msg}");
    // The stalled client, reading at last: what was already on its way, then
    // timeLimitExceeded from the proxy, and nothing more from the server.
    let frames = slow.recv_until_final(2).await;
    let last = frames.last().unwrap();
    assert_eq!(outcome(last).0, 3, "timeLimitExceeded");
    assert!(
        frames.len() < 100 + 32,
        "the search was cut short ({} frames)",
        frames.len()
    );
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    // Its session goes on.
    let (code, _) = call(&mut slow, exop(9, "1.3.6.1.4.1.4203.1.11.3", None)).await;
    assert_eq!(code, 0);
    // The client may reuse ID 2 (it got a final response), but slapd, sent
    // an Abandon, may still answer the search: until the proxy knows it is
    // done, a request with that ID is answered busy and not forwarded (or
    // it passes, if slapd's own final answer came after all).
    let (code, msg) = call(&mut slow, exop(2, "1.3.6.1.4.1.4203.1.11.3", None)).await;
    assert!(
        code == 0 || (code == 51 && msg.contains("message ID 2 is still in use")),
        "{code} {msg}"
    );
    // Before a bind slapd completes or abandons every operation of the
    // connection (RFC 4511 section 4.2.1): after its response ID 2 is free.
    assert_eq!(call(&mut slow, bind(4, "", "")).await.0, 0);
    let (code, msg) = call(&mut slow, exop(2, "1.3.6.1.4.1.4203.1.11.3", None)).await;
    assert_eq!(code, 0, "{msg}");
}

#[tokio::test]
async fn write_outlasting_the_drain_makes_on_fail_and_resume() {
    let lab = freeze_lab(|_| {}).await;
    add_big_entries(&lab, 32).await;
    // The modify is answered by slapd, but its response is stuck behind the
    // unread search on the same connection: in flight for the proxy.
    let mut slow = stalled_search(&lab).await;
    wait_slapd_blocked(lab.slapd.port()).await;
    slow.send_msg(modify(3, &user_dn(7), "description", "stuck"))
        .await;
    wait_status(&lab, "search and modify in flight", |s| s.in_flight >= 2).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, msg) = call(
        &mut admin,
        ab(2, &AllowBackupRequest::on().with_time_limit(1)),
    )
    .await;
    assert_eq!(code, 80, "{msg}");
    assert!(msg.contains("write in progress"), "{msg}");
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    // Writes go on at once.
    let (code, _) = call(&mut admin, modify(3, &user_dn(8), "description", "free")).await;
    assert_eq!(code, 0);
    // The stalled client gets everything, including its modify's success.
    let (frames, codes) = recv_finals(&mut slow, &[2, 3]).await;
    assert_eq!(codes, [0, 0]);
    assert_eq!(frames, 100 + 32 + 2, "every entry, both results");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_backup_under_continuous_writes() {
    const WRITERS: usize = 16;
    let lab = freeze_lab(|_| {}).await;
    let addr = lab.proxy_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let addr = addr.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = RawConn::connect(&addr).await;
            c.send_msg(bind(1, OTHER_ADMIN_DN, ADMIN_PW)).await;
            assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
            let mut acked = Vec::new();
            let mut n: i32 = 0;
            while !stop.is_cancelled() {
                n += 1;
                let dn = format!("cn=w{w}-{n},dc=other,dc=org");
                let (code, msg) = call(&mut c, add(1 + n, &dn, &format!("w{w}-{n}"))).await;
                assert_eq!(code, 0, "writer {w} write {n}: {msg}");
                acked.push(n);
            }
            acked
        }));
    }
    // Let the writers get going: the server has seen writes.
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let entries = |lab: &Lab| {
        lab.slapd
            .slapcat("dc=other,dc=org")
            .unwrap()
            .matches("\ndn: cn=w")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while entries(&lab) < 2 * WRITERS {
        assert!(
            std::time::Instant::now() < deadline,
            "writers make no progress"
        );
    }
    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    // Every writer now waits with one write queued.
    wait_status(&lab, "all writers held", |s| {
        s.queued_requests == WRITERS as u64
    })
    .await;
    let first = lab.slapd.slapcat("dc=other,dc=org").unwrap();
    let first_ex = lab.slapd.slapcat("dc=example,dc=org").unwrap();
    let csn = context_csn(&lab, "dc=other,dc=org").await;
    assert!(csn.starts_with("contextCSN: "), "{csn}");
    // Some time apart, with the writers still pushing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = lab.slapd.slapcat("dc=other,dc=org").unwrap();
    let second_ex = lab.slapd.slapcat("dc=example,dc=org").unwrap();
    assert!(first == second, "the backup changed while frozen");
    assert!(first_ex == second_ex);
    assert_eq!(
        csn,
        context_csn(&lab, "dc=other,dc=org").await,
        "contextCSN moved"
    );
    let frozen_entries = first.matches("\ndn: cn=w").count();

    let (code, msg) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{msg}");
    // Writers go on after the release; stop them once they all have more.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while entries(&lab) < frozen_entries + 2 * WRITERS {
        assert!(
            std::time::Instant::now() < deadline,
            "writers make no progress after OFF"
        );
    }
    stop.cancel();
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("no writer saw an error"));
    }
    // Every acknowledged write is there exactly once, in each writer's order.
    let dump = lab.slapd.slapcat("dc=other,dc=org").unwrap();
    let mut csn_of = std::collections::HashMap::new();
    for entry in dump.split("\n\n") {
        let dn = entry.lines().find_map(|l| l.strip_prefix("dn: "));
        let csn = entry.lines().find_map(|l| l.strip_prefix("entryCSN: "));
        if let (Some(dn), Some(csn)) = (dn, csn) {
            assert!(
                csn_of.insert(dn.to_string(), csn.to_string()).is_none(),
                "{dn} twice"
            );
        }
    }
    let mut total = 0;
    for (w, ns) in acked.iter().enumerate() {
        let mut last = String::new();
        for n in ns {
            let dn = format!("cn=w{w}-{n},dc=other,dc=org");
            let csn = csn_of
                .get(&dn)
                .unwrap_or_else(|| panic!("acknowledged {dn} is missing"));
            assert!(*csn > last, "writer {w}: write {n} applied out of order");
            last = csn.clone();
            total += 1;
        }
    }
    assert!(total > frozen_entries, "writes went on after OFF");
}

/// A modify adding one more `description` value to `dn` (each such request
/// leaves its own trace, so lost or repeated ones show).
fn add_value(msgid: i32, dn: &str, value: &str) -> LdapMsg {
    let mut m = modify(msgid, dn, "description", value);
    if let LdapOp::ModifyRequest(r) = &mut m.op {
        r.changes[0].operation = LdapModifyType::Add;
    }
    m
}

#[tokio::test]
async fn full_queue_stops_reading_and_releases_everything() {
    let lab = freeze_lab(|c| c.freeze.queue_max_requests_per_conn = 5).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let dn = user_dn(9);
    let mut all = Vec::new();
    for v in 1..=20 {
        // Each adds its own value: all twenty must be there once at the end.
        all.extend_from_slice(&encode(add_value(1 + v, &dn, &format!("v{v}"))));
    }
    w.send(&all).await;
    wait_status(&lab, "a full queue", |s| s.queued_requests == 5).await;
    // The rest waits in the socket, not in the proxy's memory.
    assert_nothing_pending(&mut w).await;
    assert_eq!(status(&lab).await.queued_requests, 5);
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    let ids: Vec<i32> = (2..=21).collect();
    let (_, codes) = recv_finals(&mut w, &ids).await;
    assert!(codes.iter().all(|&c| c == 0), "{codes:?}");
    let direct = base_direct(&lab, &dn, "description").await;
    let mut values: Vec<&str> = direct
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("description: v"))
        .collect();
    values.sort_by_key(|v| v.parse::<u32>().unwrap());
    let want: Vec<String> = (1..=20).map(|v| v.to_string()).collect();
    assert_eq!(values, want, "every queued write applied exactly once");
}

#[tokio::test]
async fn binds_can_count_as_writes() {
    let lab = freeze_lab(|c| {
        c.freeze.bind_is_write = true.into();
        // No rootdn named: the operator's binds are writes like any.
        c.freeze.root_dns.clear();
    })
    .await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(
            &mut admin,
            // dc=other stays thawed: the status helper binds there.
            ab(
                2,
                &AllowBackupRequest::on().with_dn_set(["dc=example,dc=org"])
            )
        )
        .await
        .0,
        0
    );
    let mut u = RawConn::connect(&lab.proxy_addr()).await;
    u.send_msg(bind(1, &user_dn(2), "pass2")).await;
    wait_status(&lab, "a held bind", |s| s.queued_requests == 1).await;
    assert_nothing_pending(&mut u).await;
    // An operator's DN is no exception: anyone can send a bind naming it
    // with a wrong password, which would write into the frozen backend
    // (ppolicy's failure counter).
    let mut intruder = RawConn::connect(&lab.proxy_addr()).await;
    intruder.send_msg(bind(1, ADMIN_DN, "wrong")).await;
    wait_status(&lab, "two held binds", |s| s.queued_requests == 2).await;
    assert_nothing_pending(&mut intruder).await;
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(result_code(&u.recv().await.unwrap()), Some(0));
    assert_eq!(
        result_code(&intruder.recv().await.unwrap()),
        Some(49),
        "invalidCredentials, once thawed"
    );
}

#[tokio::test]
async fn binds_to_a_rootdn_pass_a_freeze_and_write_nothing() {
    // The default (`auto`, slapd with ppolicy: binds are writes), and the
    // lab's rootdns in root_dns, as an admin would configure them.
    let lab = freeze_lab(|_| {}).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let csn = context_csn(&lab, "dc=example,dc=org").await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    // A user's bind is held; a wrong password for the rootdn is answered
    // at once (slapd's ppolicy skips its rootdn: nothing is written).
    let mut u = RawConn::connect(&lab.proxy_addr()).await;
    u.send_msg(bind(1, &user_dn(2), "wrong")).await;
    wait_status(&lab, "a held bind", |s| s.queued_requests == 1).await;
    let mut intruder = RawConn::connect(&lab.proxy_addr()).await;
    intruder
        .send_msg(bind(1, "CN=admin, dc=example,dc=org", "wrong"))
        .await;
    assert_eq!(result_code(&intruder.recv().await.unwrap()), Some(49));
    // The operator connects during the freeze, reads the status, ends it.
    let mut op = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(context_csn(&lab, "dc=example,dc=org").await, csn);
    assert_nothing_pending(&mut u).await;
    assert_eq!(call(&mut op, ab(2, &AllowBackupRequest::off())).await.0, 0);
    assert_eq!(result_code(&u.recv().await.unwrap()), Some(49));
}

/// A driver whose prepare fails, or that counts its done calls.
struct TestDriver {
    fail: bool,
    done: std::sync::atomic::AtomicUsize,
}

impl abproxy::freeze::Driver for TestDriver {
    fn prepare<'a>(
        &'a self,
        _b: &'a abproxy::freeze::backend::Backend,
        _id: u64,
    ) -> futures::future::BoxFuture<'a, Result<(), abproxy::freeze::drivers::DriverError>> {
        Box::pin(async move {
            if self.fail {
                Err(abproxy::freeze::drivers::DriverError::other("boom"))
            } else {
                Ok(())
            }
        })
    }
    fn done<'a>(
        &'a self,
        _b: &'a abproxy::freeze::backend::Backend,
        _id: u64,
    ) -> futures::future::BoxFuture<'a, Result<(), abproxy::freeze::drivers::DriverError>> {
        self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn failed_prepare_runs_done_and_resumes() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let lab = freeze_lab(|_| {}).await;
    let ok = Arc::new(TestDriver {
        fail: false,
        done: AtomicUsize::new(0),
    });
    let bad = Arc::new(TestDriver {
        fail: true,
        done: AtomicUsize::new(0),
    });
    let engine = lab.proxy.engine();
    let deadline = Duration::from_secs(10);
    engine.set_driver("dc=example,dc=org", ok.clone(), deadline);
    engine.set_driver("DC=Other, DC=Org", bad.clone(), deadline);
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 80);
    assert_eq!(
        msg,
        "prepare failed for backend dc=other,dc=org: boom; freeze undone"
    );
    assert_eq!(
        ok.done.load(Ordering::SeqCst),
        1,
        "the prepared backend is done"
    );
    assert_eq!(bad.done.load(Ordering::SeqCst), 0);
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    assert_eq!(
        call(&mut admin, modify(3, &user_dn(2), "description", "x"))
            .await
            .0,
        0
    );
    // A freeze of the good backend alone works, and OFF runs its done step.
    let req = AllowBackupRequest::on().with_dn_set(["dc=example,dc=org"]);
    assert_eq!(call(&mut admin, ab(4, &req)).await.0, 0);
    assert_eq!(
        call(&mut admin, ab(5, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(ok.done.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn persistent_search_never_holds_the_drain_and_is_held_in_stop_mode() {
    let lab = freeze_lab(|c| {
        c.backends = backends(&[
            ("dc=example,dc=org", Mode::Stop),
            ("dc=other,dc=org", Mode::Readonly),
        ]);
    })
    .await;
    let dn = user_dn(5);
    // syncrepl refreshAndPersist (RFC 4533): mode ENUMERATED 3.
    let mut p = RawConn::connect(&lab.proxy_addr()).await;
    let req = refresh_and_persist(search(1, &dn, 0, "(objectClass=*)", &["description"]));
    p.send_msg(req).await;
    loop {
        let f = p.recv().await.unwrap();
        if Envelope::response(&f).unwrap().op == abproxy::wire::op::INTERMEDIATE_RESPONSE {
            break; // refresh done: persist phase
        }
    }
    let mut admin = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let started = std::time::Instant::now();
    let (code, msg) = call(
        &mut admin,
        ab(2, &AllowBackupRequest::on().with_time_limit(10)),
    )
    .await;
    assert_eq!(code, 0, "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain did not wait for the persistent search"
    );
    // A change made on the server itself (not through the proxy): held.
    let ldif =
        format!("dn: {dn}\nchangetype: modify\nreplace: description\ndescription: persisted\n");
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &lab.direct(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_nothing_pending(&mut p).await;
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    let f = p.recv().await.unwrap();
    let env = Envelope::response(&f).unwrap();
    assert_eq!(
        (env.msgid, env.op),
        (1, abproxy::wire::op::SEARCH_RESULT_ENTRY)
    );
    assert!(String::from_utf8_lossy(&f).contains("persisted"));
}

#[tokio::test]
async fn command_driver_runs_prepare_and_done_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("steps");
    let step = |what: &str| {
        vec![
            "sh".to_string(),
            "-c".to_string(),
            format!(
                "echo \"{what} $ABPROXY_STEP $ABPROXY_BACKEND $ABPROXY_MODE $ABPROXY_FREEZE_ID\" >> {}",
                log.display()
            ),
        ]
    };
    let mut example = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
    example.driver = abproxy::freeze::drivers::DriverKind::Command;
    example.prepare = step("example");
    example.done = step("example");
    let mut other = BackendConfig::new("dc=other,dc=org", Mode::Stop);
    other.driver = abproxy::freeze::drivers::DriverKind::Command;
    // Fails while a flag file exists.
    let flag = dir.path().join("fail");
    other.prepare = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "if [ -e {} ]; then echo 'snapshot volume is full' >&2; exit 4; fi",
            flag.display()
        ),
    ];
    other.done = step("other");
    let lab = freeze_lab(|c| c.backends = vec![example, other]).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();

    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(read(), "example prepare dc=example,dc=org readonly 1\n");
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(
        read(),
        "example prepare dc=example,dc=org readonly 1\nexample done dc=example,dc=org readonly 1\nother done dc=other,dc=org stop 1\n"
    );

    // A failing prepare: ON fails with the command's stderr, the backend
    // already prepared is done again, nothing stays frozen.
    std::fs::write(&flag, "").unwrap();
    std::fs::remove_file(&log).unwrap();
    let (code, msg) = call(&mut admin, ab(4, &AllowBackupRequest::on())).await;
    assert_eq!(code, 80);
    assert!(
        msg.contains("prepare failed for backend dc=other,dc=org")
            && msg.contains("snapshot volume is full"),
        "{msg}"
    );
    assert_eq!(
        read(),
        "example prepare dc=example,dc=org readonly 2\nexample done dc=example,dc=org readonly 2\n"
    );
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    assert_eq!(
        call(&mut admin, modify(5, &user_dn(3), "description", "free"))
            .await
            .0,
        0
    );
}

/// A modify straight into slapd over its own ldapi socket as root (SASL
/// EXTERNAL): a write that does not pass through the proxy.
async fn local_write(lab: &Lab, dn: &str, value: &str) -> ToolOutput {
    let ldif =
        format!("dn: {dn}\nchangetype: modify\nreplace: description\ndescription: {value}\n");
    ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
        Some(&ldif),
    )
    .await
}

#[tokio::test]
async fn openldap_driver_reads_what_a_bind_records_in_cn_config() {
    use abproxy::freeze::drivers::openldap::OpenLdapDriver;
    use abproxy::freeze::{BackendMap, Driver};
    let lab = freeze_lab(|_| {}).await;
    let map = BackendMap::new([
        ("dc=example,dc=org".to_string(), Mode::Readonly),
        ("dc=other,dc=org".to_string(), Mode::Readonly),
    ])
    .unwrap();
    let (example, other) = (&map.backends()[0], &map.backends()[1]);
    // Root over ldapi, as a driver without config_bind_dn binds.
    let driver = OpenLdapDriver::new(lab.slapd.ldapi_url(), None);
    // The lab has ppolicy on dc=example only.
    let said = driver.bind_writes(example).await.unwrap();
    assert!(
        said.as_deref()
            .is_some_and(|s| s.contains("olcDatabase={1}mdb,cn=config") && s.contains("ppolicy")),
        "{said:?}"
    );
    assert_eq!(driver.bind_writes(other).await.unwrap(), None);
    // slapd 2.5's lastbind in the database itself: invisible in the root
    // DSE, visible in cn=config.
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
        Some("dn: olcDatabase={2}mdb,cn=config\nchangetype: modify\nreplace: olcLastBind\nolcLastBind: TRUE\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let said = driver.bind_writes(other).await.unwrap();
    assert!(
        said.as_deref()
            .is_some_and(|s| s.contains("olcLastBind: TRUE")),
        "{said:?}"
    );
}

#[tokio::test]
async fn openldap_driver_makes_slapd_refuse_local_writes_while_frozen() {
    use abproxy::freeze::drivers::DriverKind;
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    // The proxy needs slapd's ldapi URL in its config: start a second proxy
    // in front of the same slapd with the driver configured.
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.direct(),
        ..Config::default()
    };
    allow_admin(&mut config);
    let mut example = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
    example.driver = DriverKind::Openldap;
    example.config_url = Some(lab.slapd.ldapi_url());
    let mut other = BackendConfig::new("dc=other,dc=org", Mode::Readonly);
    other.driver = DriverKind::Command;
    let flag = tempfile::NamedTempFile::new().unwrap();
    other.prepare = vec![
        "sh".into(),
        "-c".into(),
        format!("test ! -s {}", flag.path().display()),
    ];
    config.backends = vec![example, other];
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    let addr = proxy.url().trim_start_matches("ldap://").to_string();
    let dn = user_dn(11);

    assert_eq!(olc_read_only(&lab.slapd.ldapi_url()).await, "");
    let mut admin = RawConn::connect(&addr).await;
    admin.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&admin.recv().await.unwrap()), Some(0));
    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(
        olc_read_only(&lab.slapd.ldapi_url()).await,
        "olcReadOnly: TRUE"
    );
    // slapd itself refuses a local write now: unwillingToPerform (53).
    let out = local_write(&lab, &dn, "local while frozen").await;
    assert_eq!(out.code, Some(53), "{out:?}");
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(
        olc_read_only(&lab.slapd.ldapi_url()).await,
        "",
        "the previous (absent) value is back"
    );
    let out = local_write(&lab, &dn, "local after").await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // A failure after the prepare of dc=example,dc=org: it is undone too.
    std::fs::write(flag.path(), "fail").unwrap();
    let (code, msg) = call(&mut admin, ab(4, &AllowBackupRequest::on())).await;
    assert_eq!(code, 80, "{msg}");
    assert_eq!(
        olc_read_only(&lab.slapd.ldapi_url()).await,
        "",
        "never left read-only"
    );
    assert_eq!(local_write(&lab, &dn, "still writable").await.code, Some(0));
    proxy.shutdown().await.unwrap();
}

/// Changes slapd's cn=config over its ldapi socket as root (SASL EXTERNAL).
async fn config_change(lab: &Lab, ldif: &str) {
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
        Some(ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// The `member` values of `dn`, as slapd itself returns them.
async fn members(lab: &Lab, dn: &str) -> Vec<String> {
    let out = base_direct(lab, dn, "member").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("member: "))
        .map(str::to_string)
        .collect()
}

/// The proxy's status over `c` (bound as an operator).
async fn status_over(c: &mut RawConn, msgid: i32) -> abproxy_proto::AllowBackupStatus {
    c.send_msg(exop(msgid, ALLOW_BACKUP_STATUS_OID, None)).await;
    let f = c.recv_until_final(msgid).await.pop().unwrap();
    let env = Envelope::response(&f).unwrap();
    assert_eq!(env.result_code, Some(0));
    abproxy_proto::decode_status(env.value_bytes(&f).expect("status value")).unwrap()
}

#[tokio::test]
async fn openldap_driver_refuses_partial_freezes_that_linking_overlays_would_break() {
    use abproxy::freeze::drivers::DriverKind;
    let lab = freeze_lab(|_| {}).await;
    // A second proxy in front of the same slapd, with the openldap driver on
    // both backends (the lab's own proxy has no driver).
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.direct(),
        ..Config::default()
    };
    allow_admin(&mut config);
    config.backends = ["dc=example,dc=org", "dc=other,dc=org"]
        .iter()
        .map(|suffix| {
            let mut b = BackendConfig::new(suffix, Mode::Readonly);
            b.driver = DriverKind::Openldap;
            b.config_url = Some(lab.slapd.ldapi_url());
            b
        })
        .collect();
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    let addr = proxy.url().trim_start_matches("ldap://").to_string();
    let mut admin = RawConn::connect(&addr).await;
    admin.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&admin.recv().await.unwrap()), Some(0));
    let example = || AllowBackupRequest::on().with_dn_set(["dc=example,dc=org"]);
    let other = || AllowBackupRequest::on().with_dn_set(["dc=other,dc=org"]);
    let off = AllowBackupRequest::off;

    // refint on dc=example,dc=org's database only: it searches and rewrites
    // that database alone, so a partial freeze of either backend holds.
    // A group in dc=other naming a user of dc=example stays as it is when
    // the user is deleted while dc=other is frozen; dc=example's own group
    // loses the user (refint ran).
    config_change(
        &lab,
        "dn: cn=module{0},cn=config\nchangetype: modify\nadd: olcModuleLoad\n\
         olcModuleLoad: refint\n\n\
         dn: olcOverlay=refint,olcDatabase={1}mdb,cn=config\nchangetype: add\n\
         objectClass: olcOverlayConfig\nobjectClass: olcRefintConfig\nolcOverlay: refint\n\
         olcRefintAttribute: member\n",
    )
    .await;
    let user = user_dn(5);
    let other_group = "cn=linked,ou=groups,dc=other,dc=org";
    let out = ldap_tool(
        "ldapadd",
        &[
            "-x",
            "-H",
            &lab.direct(),
            "-D",
            OTHER_ADMIN_DN,
            "-w",
            ADMIN_PW,
        ],
        Some(&format!(
            "dn: {other_group}\nobjectClass: groupOfNames\ncn: linked\n\
             member: uid=user1,ou=people,dc=other,dc=org\nmember: {user}\n"
        )),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let before = members(&lab, other_group).await;
    let (code, msg) = call(&mut admin, ab(2, &other())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(freeze_id_in(&msg), 1);
    let del = LdapMsg::new(3, LdapOp::DelRequest(user.clone()));
    assert_eq!(call(&mut admin, del).await.0, 0, "dc=example is not frozen");
    let group1 = "cn=group1,ou=groups,dc=example,dc=org";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while members(&lab, group1).await.contains(&user) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refint never rewrote {group1}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(members(&lab, other_group).await, before);
    assert_eq!(call(&mut admin, ab(4, &off())).await.0, 0);
    let (code, msg) = call(&mut admin, ab(5, &example())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(call(&mut admin, ab(6, &off())).await.0, 0);

    // refint on the frontend (global): a partial freeze is refused, changes
    // nothing and uses no freeze id; a full one goes ahead.
    config_change(
        &lab,
        "dn: olcOverlay=refint,olcDatabase={-1}frontend,cn=config\nchangetype: add\n\
         objectClass: olcOverlayConfig\nobjectClass: olcRefintConfig\nolcOverlay: refint\n\
         olcRefintAttribute: member\n",
    )
    .await;
    let (code, msg) = call(&mut admin, ab(7, &example())).await;
    assert_eq!(code, 53, "{msg}");
    assert_eq!(
        msg,
        "partial freeze refused: overlay refint on the frontend database (global) can change \
         dc=example,dc=org when dc=other,dc=org is written; freeze every backend (leave dnSet \
         out); nothing frozen"
    );
    let s = status_over(&mut admin, 8).await;
    assert_eq!((s.state, s.freeze_id), (FreezeState::Thawed, None));
    assert_eq!(olc_read_only(&lab.slapd.ldapi_url()).await, "");
    let (code, msg) = call(&mut admin, ab(9, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(freeze_id_in(&msg), 3, "the refusal used no freeze id");
    assert_eq!(
        olc_read_only(&lab.slapd.ldapi_url()).await,
        "olcReadOnly: TRUE"
    );
    assert_eq!(call(&mut admin, ab(10, &off())).await.0, 0);
    proxy.shutdown().await.unwrap();

    // What the refusal prevents, shown through the lab's proxy (no driver,
    // so no check: docs/allow-backup.md leaves partial freezes to the administrator
    // there): with only dc=example frozen, a delete in dc=other passes and
    // slapd's refint rewrites a group in the frozen dc=example.
    let group = "cn=linked,ou=groups,dc=example,dc=org";
    let victim = "uid=user6,ou=people,dc=other,dc=org";
    let out = ldap_tool(
        "ldapadd",
        &["-x", "-H", &lab.direct(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&format!(
            "dn: {group}\nobjectClass: groupOfNames\ncn: linked\nmember: {}\nmember: {victim}\n",
            user_dn(1)
        )),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut a = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(call(&mut a, ab(2, &example())).await.0, 0);
    let mut o = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let del = LdapMsg::new(2, LdapOp::DelRequest(victim.into()));
    assert_eq!(call(&mut o, del).await.0, 0, "dc=other is not frozen");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while members(&lab, group).await.len() == 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refint never rewrote {group}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(members(&lab, group).await, [user_dn(1)]);
    assert_eq!(status(&lab).await.state, FreezeState::Frozen);
    assert_eq!(call(&mut a, ab(3, &off())).await.0, 0);
}

/// Local ports of the proxy's connections to slapd (kernel view).
fn upstream_ports(slapd_port: u16) -> std::collections::HashSet<u16> {
    kernel_sockets()
        .iter()
        .filter(|s| s.established && s.remote_port == slapd_port)
        .map(|s| s.local_port)
        .collect()
}

#[tokio::test]
async fn losing_one_upstream_connection_while_frozen_ends_only_that_session() {
    let lab = freeze_lab(|_| {}).await;
    let slapd_port = lab.slapd.port();
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut other = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let before = upstream_ports(slapd_port);
    let mut victim = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut new = std::collections::HashSet::new();
    wait_until("the victim's upstream connection", 10, || {
        new = &upstream_ports(slapd_port) - &before;
        new.len() == 1
    })
    .await;
    let port = *new.iter().next().unwrap();
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    victim
        .send_msg(modify(2, &user_dn(12), "description", "never"))
        .await;
    wait_status(&lab, "queued", |s| s.queued_requests == 1).await;
    // Kill that one TCP connection (as a network failure would).
    let out = std::process::Command::new("ss")
        .args([
            "-K",
            "dst",
            "127.0.0.1",
            "dport",
            "=",
            &slapd_port.to_string(),
            "sport",
            "=",
            &port.to_string(),
        ])
        .output()
        .expect("ss (iproute2)");
    assert!(out.status.success(), "{out:?}");
    let frames = victim.recv_all().await;
    assert_eq!(frames.len(), 1, "a notice, then the end");
    assert_eq!(
        Envelope::response(&frames[0]).unwrap().result_code,
        Some(52)
    );
    // The freeze and the other sessions are untouched; the queued write was
    // discarded, never sent.
    let s = wait_status(&lab, "discarded", |s| s.queued_requests == 0).await;
    assert_eq!(s.state, FreezeState::Frozen);
    let (code, _) = call(
        &mut other,
        search(2, &user_dn(12), 0, "(objectClass=*)", &["uid"]),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    let out = base_direct(&lab, &user_dn(12), "description").await;
    assert!(out.stdout.contains("description: initial"), "{out:?}");
}

#[tokio::test]
async fn holder_connection_dying_ends_only_a_hold_until_unbind_freeze() {
    let lab = freeze_lab(|_| {}).await;
    // With holdUntilUnbind: the holder's connection drops (no unbind, as
    // when a backup host dies): the freeze ends, the held write goes on.
    let mut holder = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let req = AllowBackupRequest::on().with_hold_until_unbind(true);
    assert_eq!(call(&mut holder, ab(2, &req)).await.0, 0);
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    w.send_msg(modify(2, &user_dn(8), "description", "after drop"))
        .await;
    wait_status(&lab, "queued", |s| s.queued_requests == 1).await;
    drop(holder);
    let m = w.recv().await.unwrap();
    assert_eq!(
        (Envelope::response(&m).unwrap().msgid, result_code(&m)),
        (2, Some(0))
    );
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);

    // Without it: the freeze outlives its requester (it ends by OFF from
    // anyone allowed, or by the lease), and nothing held is lost.
    let mut holder = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut holder, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    w.send_msg(modify(3, &user_dn(8), "description", "after second drop"))
        .await;
    wait_status(&lab, "queued", |s| s.queued_requests == 1).await;
    drop(holder);
    let s = wait_status(&lab, "the holder's session to end", |s| {
        s.state == FreezeState::Frozen && s.queued_requests == 1
    })
    .await;
    assert_eq!(s.state, FreezeState::Frozen);
    assert_nothing_pending(&mut w).await;
    let mut other = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut other, ab(2, &AllowBackupRequest::off())).await.0,
        0
    );
    let m = w.recv().await.unwrap();
    assert_eq!(
        (Envelope::response(&m).unwrap().msgid, result_code(&m)),
        (3, Some(0))
    );
    let out = base_direct(&lab, &user_dn(8), "description").await;
    assert!(
        out.stdout.contains("description: after second drop"),
        "{out:?}"
    );
}

#[tokio::test]
async fn shutdown_while_frozen_discards_queued_requests_tells_clients_and_runs_done() {
    use abproxy::freeze::drivers::DriverKind;
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let lab = freeze_lab(|c| {
        let mut b = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
        b.driver = DriverKind::Command;
        b.done = vec![
            "sh".into(),
            "-c".into(),
            format!("echo done $ABPROXY_FREEZE_ID >> {}", marks.display()),
        ];
        c.backends = vec![b];
    })
    .await;
    let before = base_direct(&lab, &user_dn(9), "description").await;
    let mut holder = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut holder, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    w.send_msg(modify(2, &user_dn(9), "description", "never sent"))
        .await;
    wait_status(&lab, "queued", |s| s.queued_requests == 1).await;

    // SIGTERM's path: stop accepting, end the sessions, then the freeze.
    let Lab { slapd, proxy, .. } = lab;
    proxy.shutdown().await.unwrap();
    for c in [&mut w, &mut holder] {
        let frames = c.recv_all().await;
        assert_eq!(frames.len(), 1, "only the notice, no answer to the write");
        let msg = assert_notice(&frames[0], 52);
        assert!(msg.contains("shutting down"), "{msg}");
    }
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "done 1\n");
    // The queued modify never reached slapd.
    let after = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &slapd.url(),
            "-b",
            &user_dn(9),
            "-s",
            "base",
            "description",
        ],
        None,
    )
    .await;
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dying_while_frozen_tells_clients_and_the_freeze_still_ends_cleanly() {
    let mut lab = freeze_lab(|_| {}).await;
    let before = base_direct(&lab, &user_dn(12), "description").await;
    let mut holder = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut holder, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    w.send_msg(modify(
        2,
        &user_dn(12),
        "description",
        "queued when slapd died",
    ))
    .await;
    wait_status(&lab, "queued", |s| s.queued_requests == 1).await;

    lab.slapd.kill();
    // Every session loses its upstream: told, closed; the queued write is
    // discarded with its session, never sent.
    for c in [&mut w, &mut holder] {
        let frames = c.recv_all().await;
        assert_eq!(frames.len(), 1, "only the notice");
        assert_notice(&frames[0], 52);
    }
    tokio::task::block_in_place(|| lab.slapd.restart()).unwrap();
    // The freeze outlived the server (nothing could reach it anyway); an
    // operator ends it as usual and writes flow again.
    let s = status(&lab).await;
    assert_eq!((s.state, s.queued_requests), (FreezeState::Frozen, 0));
    let mut op = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    assert_eq!(call(&mut op, ab(2, &AllowBackupRequest::off())).await.0, 0);
    assert_eq!(base_direct(&lab, &user_dn(12), "description").await, before);
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, _) = call(&mut w, modify(2, &user_dn(12), "description", "after")).await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn a_client_closing_behind_its_full_queue_has_nothing_sent() {
    let lab = freeze_lab(|c| c.freeze.queue_max_requests_per_conn = 5).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let dn = user_dn(10);
    let before = base_direct(&lab, &dn, "description").await;
    let mut all = Vec::new();
    for v in 1..=12 {
        all.extend_from_slice(&encode(add_value(1 + v, &dn, &format!("gone{v}"))));
    }
    w.send(&all).await;
    wait_status(&lab, "a full queue", |s| s.queued_requests == 5).await;
    // The client goes away while the proxy is not reading it.
    drop(w);
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    // Its session ends without sending anything: the queue is discarded.
    wait_status(&lab, "the closed session's queue to go", |s| {
        s.queued_requests == 0 && s.in_flight == 0
    })
    .await;
    assert_eq!(base_direct(&lab, &dn, "description").await, before);
}

/// A stand-in for a server's cn=config between the proxy's drivers and
/// slapd: it forwards connections to `target` until told to hang, and from
/// then on accepts connections and never answers (nor closes them).
struct ConfigRelay {
    url: String,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ConfigRelay {
    /// Forwards to `target` (host:port); `None`: hangs from the start.
    async fn start(target: Option<String>) -> ConfigRelay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ldap://{}", l.local_addr().unwrap());
        let hang = std::sync::Arc::new(AtomicBool::new(target.is_none()));
        let h = hang.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                match &target {
                    Some(t) if !h.load(Ordering::SeqCst) => {
                        let t = t.clone();
                        tokio::spawn(async move {
                            let mut up = tokio::net::TcpStream::connect(t).await.unwrap();
                            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                        });
                    }
                    _ => held.push(s),
                }
            }
        });
        ConfigRelay { url, hang, task }
    }

    fn hang(&self) {
        self.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for ConfigRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// dc=example,dc=org with the `openldap` driver reaching cn=config at
/// `config_url` by a simple bind as cn=admin,cn=config (password in
/// `dir`), with a 2 s deadline per driver step; dc=other,dc=org without a
/// driver; a state file in `dir`.
fn openldap_at(c: &mut Config, config_url: &str, dir: &std::path::Path) {
    use abproxy::freeze::drivers::DriverKind;
    let pw = dir.join("config.pw");
    std::fs::write(&pw, ADMIN_PW).unwrap();
    let mut example = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
    example.driver = DriverKind::Openldap;
    example.config_url = Some(config_url.into());
    example.config_bind_dn = Some(testkit::CONFIG_ADMIN_DN.into());
    example.config_password_file = Some(pw);
    example.driver_timeout_secs = 2;
    c.backends = vec![
        example,
        BackendConfig::new("dc=other,dc=org", Mode::Readonly),
    ];
    c.state_file = Some(dir.join("state.json"));
    allow_admin(c);
}

/// A cn=config that accepts connections and never answers: the prepare
/// step runs into its deadline, ON fails naming the backend and the step,
/// the writes held meanwhile go on, and the state file still says that
/// the backend's prepare began (its DONE runs at the next start).
#[tokio::test]
async fn hung_prepare_fails_on_within_the_driver_deadline_and_releases_writes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = ConfigRelay::start(None).await;
    let lab = Lab::with(SlapdOptions::default(), |c| {
        openldap_at(c, &relay.url, dir.path())
    })
    .await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let started = std::time::Instant::now();
    admin.send_msg(ab(2, &AllowBackupRequest::on())).await;
    wait_status(&lab, "ON preparing", |s| s.state == FreezeState::Draining).await;
    let mut w = bound(&lab, OTHER_ADMIN_DN, ADMIN_PW).await;
    let dn = testkit::other_user_dn(1);
    w.send_msg(modify(2, &dn, "description", "held during prepare"))
        .await;
    wait_status(&lab, "the write queued", |s| s.queued_requests == 1).await;

    let answer = tokio::time::timeout(Duration::from_secs(10), admin.recv_until_final(2))
        .await
        .expect("ON answered within 10 s (driver_timeout_secs is 2)");
    let (code, msg) = outcome(answer.last().unwrap());
    let took = started.elapsed();
    assert_eq!(code, 80, "{msg}");
    assert!(
        msg.contains("dc=example,dc=org") && msg.contains("prepare") && msg.contains("2 s"),
        "{msg}"
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert_eq!(
        outcome(w.recv_until_final(2).await.last().unwrap()).0,
        0,
        "the held write went on after ON failed"
    );
    assert_eq!(status(&lab).await.state, FreezeState::Thawed);
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(
        state.contains("\"openldap\"") && state.contains("\"dc=example,dc=org\""),
        "{state}"
    );
}

/// Polls the status on `c` (bound as an operator) until `pred` holds.
async fn status_on(
    c: &mut RawConn,
    pred: impl Fn(&abproxy_proto::AllowBackupStatus) -> bool,
) -> abproxy_proto::AllowBackupStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        c.send_msg(exop(2, ALLOW_BACKUP_STATUS_OID, None)).await;
        let f = c.recv().await.unwrap();
        let env = Envelope::response(&f).unwrap();
        let s = abproxy_proto::decode_status(env.value_bytes(&f).unwrap()).unwrap();
        if pred(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// cn=config stops answering between PREPARE and DONE: OFF's done step
/// runs into its deadline, OFF answers with the failure, the freeze is
/// released all the same, and the state file keeps what DONE must undo, so
/// that the next start (cn=config answering again) undoes it.
#[tokio::test]
async fn hung_done_fails_off_within_the_driver_deadline_and_the_next_start_retries() {
    let dir = tempfile::tempdir().unwrap();
    let slapd = start_slapd(SlapdOptions::default()).await;
    let relay = ConfigRelay::start(Some(slapd.url().trim_start_matches("ldap://").into())).await;
    let config = |relay: &ConfigRelay| {
        let mut c = Config {
            listen: vec!["ldap://127.0.0.1:0".into()],
            upstream: slapd.url(),
            ..Config::default()
        };
        openldap_at(&mut c, &relay.url, dir.path());
        c
    };
    let proxy = abproxy::ProxyHandle::spawn(config(&relay)).await.unwrap();
    let addr = proxy.url().trim_start_matches("ldap://").to_string();
    let connect = |dn: &'static str| {
        let addr = addr.clone();
        async move {
            let mut c = RawConn::connect(&addr).await;
            c.send_msg(bind(1, dn, ADMIN_PW)).await;
            assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
            c
        }
    };
    let mut admin = connect(ADMIN_DN).await;
    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");
    assert_eq!(olc_read_only(&slapd.ldapi_url()).await, "olcReadOnly: TRUE");

    relay.hang();
    let started = std::time::Instant::now();
    admin.send_msg(ab(3, &AllowBackupRequest::off())).await;
    let mut watcher = connect(OTHER_ADMIN_DN).await;
    // The done step is running into its deadline.
    status_on(&mut watcher, |s| s.releasing).await;
    let mut w = connect(OTHER_ADMIN_DN).await;
    let dn = testkit::other_user_dn(2);
    w.send_msg(modify(2, &dn, "description", "held during done"))
        .await;
    let s = status_on(&mut watcher, |s| s.queued_requests == 1).await;
    assert!(s.releasing, "held while releasing: {s:?}");
    let answer = tokio::time::timeout(Duration::from_secs(10), admin.recv_until_final(3))
        .await
        .expect("OFF answered within 10 s (driver_timeout_secs is 2)");
    let (code, msg) = outcome(answer.last().unwrap());
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(code, 80, "{msg}");
    assert!(
        msg.starts_with("released, but done steps failed: dc=example,dc=org")
            && msg.contains("done")
            && msg.contains("2 s"),
        "{msg}"
    );
    assert_eq!(
        outcome(w.recv_until_final(2).await.last().unwrap()).0,
        0,
        "released: the held write went on"
    );
    // slapd is still read-only: DONE never reached it; the state file says
    // what to undo.
    assert_eq!(olc_read_only(&slapd.ldapi_url()).await, "olcReadOnly: TRUE");
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(state.contains("olcDatabase="), "{state}");
    proxy.shutdown().await.unwrap();

    // The next start, with cn=config answering, undoes it.
    let relay = ConfigRelay::start(Some(slapd.url().trim_start_matches("ldap://").into())).await;
    let proxy = abproxy::ProxyHandle::spawn(config(&relay)).await.unwrap();
    assert_eq!(olc_read_only(&slapd.ldapi_url()).await, "");
    assert!(!dir.path().join("state.json").exists());
    proxy.shutdown().await.unwrap();
}

/// With `threads = 1` (one thread runs everything), a prepare step stuck
/// connecting to cn=config (a listener whose accept queue is full: the
/// kernel drops the proxy's SYNs) leaves the other clients served.
#[tokio::test]
async fn a_prepare_stuck_connecting_does_not_stall_a_one_thread_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let slapd = start_slapd(SlapdOptions::default()).await;
    // Backlog 0: one connection fills the accept queue, the next ones hang.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = sock.listen(0).unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    let _filler = tokio::net::TcpStream::connect(hole.local_addr().unwrap())
        .await
        .unwrap();
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: slapd.url(),
        threads: 1,
        ..Config::default()
    };
    openldap_at(
        &mut config,
        &format!("ldap://127.0.0.1:{hole_port}"),
        dir.path(),
    );
    // The proxy on its own runtime, as `abproxy serve` builds it.
    let (url_tx, url_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = abproxy::proxy::runtime(config.threads).unwrap();
        rt.block_on(async move {
            let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
            url_tx.send(proxy.url()).unwrap();
            let _ = stop_rx.await;
            proxy.shutdown().await.unwrap();
        })
    });
    let addr = url_rx
        .await
        .unwrap()
        .trim_start_matches("ldap://")
        .to_string();
    let mut admin = RawConn::connect(&addr).await;
    admin.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&admin.recv().await.unwrap()), Some(0));
    admin.send_msg(ab(2, &AllowBackupRequest::on())).await;
    // The prepare step is connecting: its SYN is unanswered.
    wait_until("the driver connecting to cn=config", 10, || {
        kernel_sockets()
            .iter()
            .any(|s| s.remote_port == hole_port && !s.established)
    })
    .await;
    let search = async {
        let mut c = RawConn::connect(&addr).await;
        c.send_msg(search(1, &user_dn(1), 0, "(objectClass=*)", &["cn"]))
            .await;
        outcome(c.recv_until_final(1).await.last().unwrap())
    };
    let (code, msg) = tokio::time::timeout(Duration::from_secs(1), search)
        .await
        .expect("a search answered during the stuck prepare");
    assert_eq!(code, 0, "{msg}");
    let answer = tokio::time::timeout(Duration::from_secs(10), admin.recv_until_final(2))
        .await
        .expect("ON answered within 10 s (driver_timeout_secs is 2)");
    let (code, msg) = outcome(answer.last().unwrap());
    assert_eq!(code, 80, "{msg}");
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
}

/// A shutdown while ON is still preparing waits for that request (tracked
/// with the sessions), so the freeze it sets up is ended and its done step
/// runs, instead of being left prepared behind a stopped proxy.
#[tokio::test]
async fn shutdown_during_a_prepare_waits_for_it_and_runs_done() {
    use abproxy::freeze::drivers::DriverKind;
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let lab = freeze_lab(|c| {
        let mut b = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
        b.driver = DriverKind::Command;
        let mark = |what: &str| {
            vec![
                "sh".to_string(),
                "-c".to_string(),
                format!("{what}echo $ABPROXY_STEP >> {}", marks.display()),
            ]
        };
        b.prepare = mark("sleep 1; ");
        b.done = mark("");
        c.backends = vec![b];
    })
    .await;
    let mut holder = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    holder.send_msg(ab(2, &AllowBackupRequest::on())).await;
    wait_status(&lab, "ON preparing", |s| s.state == FreezeState::Draining).await;
    let Lab { proxy, slapd, .. } = lab;
    proxy.shutdown().await.unwrap();
    let read = || std::fs::read_to_string(&marks).unwrap_or_default();
    wait_until("the prepare step to finish", 5, || !read().is_empty()).await;
    assert_eq!(
        read(),
        "prepare\ndone\n",
        "done ran before the proxy stopped"
    );
    drop(slapd);
}
