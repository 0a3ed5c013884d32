//! Sessions carried across a restart of a real 389 Directory Server behind
//! the proxy (`testkit::ds389`): during a `stop`-mode freeze (a cold
//! backup) and, with `upstream_reconnect`, outside one. 389 answers Who am
//! I? as `dn: <normalised DN>` (a space after the colon, the DN in lower
//! case): the proxy's identity check must see the client's bind DN in it.
//! A persistent search cannot be carried: its session ends with a Notice
//! of Disconnection saying why, while the others go on.
//!
//! Each test skips with one line when 389-ds cannot run here (not
//! installed, not root), or fails under `ABPROXY_REQUIRE_ALL=1`.

use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::Mode;
use abproxy::wire::Envelope;
use abproxy::ProxyHandle;
use abproxy_proto::{AllowBackupRequest, AllowBackupStatus, ALLOW_BACKUP_STATUS_OID};
use testkit::ds389::{user_dn, user_pw, Ds389, DM_DN, DM_PW};

use crate::support::ds389::*;
use crate::support::freeze::{ab, assert_nothing_pending, call, exop, modify, recv_finals};
use crate::support::*;

const WHOAMI: &str = "1.3.6.1.4.1.4203.1.11.3";
const PEOPLE: &str = "ou=people,dc=example,dc=org";

/// The proxy in front of `ds`: `dc=example,dc=org` in `stop` mode,
/// Directory Manager allowed to freeze, sessions carried (the default),
/// OFF and sessions waiting up to 60 s for the restarted server; `tweak`
/// adjusts the rest.
async fn carry_proxy(ds: &Ds389, tweak: impl FnOnce(&mut Config)) -> ProxyHandle {
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: ds.url(),
        backends: vec![
            BackendConfig::new("dc=example,dc=org", Mode::Stop),
            BackendConfig::new("dc=other,dc=org", Mode::Readonly),
        ],
        upstream_retry_secs: 60,
        ..Config::default()
    };
    config.freeze.allowed = vec![DM_DN.into()];
    config.freeze.root_dns = vec![DM_DN.into()];
    assert!(config.carry_sessions, "sessions are carried by default");
    tweak(&mut config);
    ProxyHandle::spawn(config).await.expect("start proxy")
}

/// Stops ns-slapd and starts it again on the same port and data (SIGTERM,
/// as `dsctl stop` would, then a new ns-slapd), off the runtime: it
/// blocks. Every connection 389 had is closed.
async fn restart(ds: &mut Ds389) {
    tokio::task::block_in_place(|| ds.restart()).expect("restart 389-ds");
}

/// Who 389 says this connection is (through the proxy): the raw authzId.
async fn whoami(c: &mut RawConn, msgid: i32) -> String {
    c.send_msg(exop(msgid, WHOAMI, None)).await;
    let frame = c.recv().await.expect("a Who am I? response");
    let env = Envelope::response(&frame).unwrap();
    assert_eq!(env.msgid, msgid);
    assert_eq!(env.result_code, Some(0), "{}", diagnostic(&frame));
    String::from_utf8_lossy(env.value_bytes(&frame).unwrap_or_default()).into_owned()
}

/// The proxy's status, asked on a new connection bound as Directory
/// Manager (its bind is held by no freeze).
async fn status(proxy: &ProxyHandle) -> AllowBackupStatus {
    let mut c = raw_bound(&addr_of(&proxy.url()), DM_DN, DM_PW).await;
    c.send_msg(exop(2, ALLOW_BACKUP_STATUS_OID, None)).await;
    let f = c.recv().await.unwrap();
    let env = Envelope::response(&f).unwrap();
    assert_eq!(env.result_code, Some(0));
    abproxy_proto::decode_status(env.value_bytes(&f).expect("status value")).unwrap()
}

fn carry_status(s: &AllowBackupStatus) -> (u64, u64, u64) {
    (
        s.sessions_waiting,
        s.sessions_carried,
        s.sessions_not_carried,
    )
}

/// Turns off the buffering of 389's access log (over its ldapi socket, as
/// root), so that each operation is in the file once 389 has answered it.
async fn unbuffered_access_log(ds: &Ds389) {
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &ds.ldapi_url()],
        Some("dn: cn=config\nchangetype: modify\nreplace: nsslapd-accesslog-logbuffering\nnsslapd-accesslog-logbuffering: off\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// How many `OP dn="DN"` lines 389's access log has (every run of the
/// instance, the log survives restarts): how many times 389 ran that
/// operation on that entry.
fn operations_on(ds: &Ds389, op: &str, dn: &str) -> usize {
    let log = std::fs::read_to_string(ds.access_log_path()).unwrap_or_default();
    let needle = format!(" {op} dn=\"{dn}\"").to_ascii_lowercase();
    log.lines()
        .filter(|l| l.to_ascii_lowercase().contains(&needle))
        .count()
}

/// The requests 389's access log shows on the connection that ran the
/// last request logged with `request` in it (`MOD dn="..."`, `SRCH
/// base="..."`), from the connection's first request to that one, in the
/// order the client sent them (389 may log pipelined requests out of that
/// order), each as logged after `op=N ` (`BIND dn="..." method=128
/// version=3`, ...).
fn requests_up_to(ds: &Ds389, request: &str) -> Vec<String> {
    let log = std::fs::read_to_string(ds.access_log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let needle = request.to_ascii_lowercase();
    let at = lines
        .iter()
        .rposition(|l| l.to_ascii_lowercase().contains(&needle))
        .unwrap_or_else(|| panic!("no {request} in 389's access log"));
    // `[date +0000] conn=N op=M WHAT ...`
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let conn = words(lines[at])[2].clone();
    let op_of = |w: &[String]| w[3].strip_prefix("op=").and_then(|n| n.parse::<i64>().ok());
    let last = op_of(&words(lines[at])).expect("an op=N");
    let mut out = Vec::new();
    // Back to the connection's first request (conn=N of an earlier run of
    // the instance lies before it).
    for l in lines[..=at].iter().rev() {
        let w = words(l);
        if w.len() < 5 || w[2] != conn || w[4] == "RESULT" {
            continue;
        }
        let Some(op) = op_of(&w) else {
            continue;
        };
        if !(0..=last).contains(&op) {
            continue;
        }
        out.push((op, w[4..].join(" ")));
        if op == 0 {
            break;
        }
    }
    out.sort();
    out.into_iter().map(|(_, r)| r).collect()
}

/// An attribute's values of `dn`, read on 389 itself over ldapi (not
/// through the proxy): `attr: value` lines.
async fn read_direct(ds: &Ds389, dn: &str, attr: &str) -> Vec<String> {
    let prefix = format!("{}:", attr.to_ascii_lowercase());
    ldapi_search(&ds.ldapi_url(), &["-b", dn, "-s", "base", attr])
        .await
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Whether `dn` exists on 389 (over ldapi, as root).
async fn exists_direct(ds: &Ds389, dn: &str) -> bool {
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-Q",
            "-LLL",
            "-Y",
            "EXTERNAL",
            "-H",
            &ds.ldapi_url(),
            "-b",
            dn,
            "-s",
            "base",
            "1.1",
        ],
        None,
    )
    .await;
    match out.code {
        Some(0) => true,
        Some(32) => false,
        _ => panic!("{out:?}"),
    }
}

/// Clients of different identities (two users, one bound with another
/// spelling of its DN, Directory Manager, anonymous) with writes and reads
/// held by a `stop` freeze; 389 restarted meanwhile; OFF: every session
/// goes on on a new connection with no error and the same identity as
/// before (Who am I?), the held requests answered, each write run by 389
/// once, after OFF. A user whose password changed on 389 meanwhile is not
/// carried: its session ends with the reason (389 refuses the replayed
/// bind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_carried_across_a_389_restart_during_a_stop_freeze() {
    if skip() {
        return;
    }
    let mut ds = start_ds(20).await;
    unbuffered_access_log(&ds).await;
    let proxy = carry_proxy(&ds, |_| {}).await;
    let addr = addr_of(&proxy.url());
    let engine = proxy.engine();

    let mut u1 = raw_bound(&addr, &user_dn(1), &user_pw(1)).await;
    // Bound with another spelling of its DN: 389 answers Who am I? with
    // its own (normalised) one.
    let u2_spelled = "UID=user2, ou=People,DC=example,dc=org";
    let mut u2 = raw_bound(&addr, u2_spelled, &user_pw(2)).await;
    let mut dm = raw_bound(&addr, DM_DN, DM_PW).await;
    let mut anon = RawConn::connect(&addr).await;
    let mut admin = raw_bound(&addr, DM_DN, DM_PW).await;
    // Its password changes on 389 while it is stopped behind the proxy.
    let mut u6 = raw_bound(&addr, &user_dn(6), &user_pw(6)).await;
    let mut before = Vec::new();
    for c in [&mut u1, &mut u2, &mut dm, &mut anon, &mut admin] {
        before.push(whoami(c, 100).await);
    }
    // What 389 says (the identity check must cope with it).
    assert_eq!(
        before[..4],
        [
            format!("dn: {}", user_dn(1)),
            format!("dn: {}", user_dn(2)),
            "dn: cn=directory manager".to_string(),
            String::new(),
        ]
    );

    let (code, text) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{text}");
    // Held by the stop freeze: the users' writes to their own entries,
    // Directory Manager's add and then a read, an anonymous read.
    let added = format!("cn=carried-dm,{PEOPLE}");
    u1.send_msg(modify(2, &user_dn(1), "description", "carried u1"))
        .await;
    u2.send_msg(modify(2, &user_dn(2), "description", "carried u2"))
        .await;
    dm.send_msg(add(2, &added, "carried-dm")).await;
    // (389 may run a connection's pipelined requests side by side: this
    // read is not of the entry being added.)
    dm.send_msg(search(3, &user_dn(5), 0, "(objectClass=*)", &["uid"]))
        .await;
    anon.send_msg(search(2, &user_dn(4), 0, "(objectClass=*)", &["uid"]))
        .await;
    let held = engine.clone();
    wait_until("five held requests", 20, || held.queued().0 == 5).await;

    // The cold backup's window: 389 stops (every upstream connection
    // closes) and starts again.
    restart(&mut ds).await;
    let waiting = engine.clone();
    wait_until("six sessions waiting for the server", 20, || {
        waiting.carry_counts().0 == 6
    })
    .await;
    assert_eq!(engine.carry_counts(), (6, 0, 0));
    // None was told anything, none of the writes reached 389.
    for c in [&mut u1, &mut u2, &mut dm, &mut anon] {
        assert_nothing_pending(c).await;
    }
    assert_eq!(
        read_direct(&ds, &user_dn(1), "description").await,
        ["description: initial"]
    );
    assert!(!exists_direct(&ds, &added).await);
    assert_eq!(operations_on(&ds, "MOD", &user_dn(1)), 0);
    assert_eq!(carry_status(&status(&proxy).await), (6, 0, 0));
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &ds.ldapi_url()],
        Some(&format!(
            "dn: {}\nchangetype: modify\nreplace: userPassword\nuserPassword: a-new-password\n",
            user_dn(6)
        )),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // OFF on the operator's own (waiting) session.
    let (code, text) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("5 queued request(s) resumed")
            && text.contains("the server was restarted and answers again: 6 session(s) go on")
            && !text.contains("ended"),
        "{text}"
    );
    let answered = |c: Option<bytes::Bytes>| result_code(&c.expect("an answer"));
    assert_eq!(answered(u1.recv().await), Some(0));
    assert_eq!(answered(u2.recv().await), Some(0));
    let (frames, codes) = recv_finals(&mut dm, &[2, 3]).await;
    assert_eq!(
        (frames, codes),
        (3, vec![0, 0]),
        "the add's answer, the entry read and the search's done"
    );
    let frames = anon.recv_until_final(2).await;
    assert_eq!(frames.len(), 2, "the entry and the done");
    assert_eq!(result_code(&frames[1]), Some(0));

    // The same identities as before the restart.
    let mut after = Vec::new();
    for c in [&mut u1, &mut u2, &mut dm, &mut anon, &mut admin] {
        after.push(whoami(c, 101).await);
    }
    assert_eq!(after, before);
    // (User 6's session waits for its next request.)
    assert_eq!(engine.carry_counts(), (1, 5, 0));
    assert_eq!(carry_status(&status(&proxy).await), (1, 5, 0));

    // Each write landed, once.
    assert_eq!(
        read_direct(&ds, &user_dn(1), "description").await,
        ["description: carried u1"]
    );
    assert_eq!(
        read_direct(&ds, &user_dn(2), "description").await,
        ["description: carried u2"]
    );
    assert!(exists_direct(&ds, &added).await);
    assert_eq!(operations_on(&ds, "MOD", &user_dn(1)), 1);
    assert_eq!(operations_on(&ds, "MOD", &user_dn(2)), 1);
    assert_eq!(operations_on(&ds, "ADD", &added), 1);
    // Each on a new connection that got the client's bind (as the client
    // spelled it), then the proxy's Who am I?, then at most the proxy's
    // own reads of what identifies the server (its root DSE's naming
    // contexts, each one's entry: base searches), and nothing of the
    // client's before its request.
    let whoami_logged = format!("EXT oid=\"{WHOAMI}\" name=\"whoami-plugin\"");
    let proxy_read = |r: &str| {
        r.starts_with("SRCH base=")
            && r.contains(" scope=0 filter=\"(objectClass=*)\" attrs=")
            && (r.ends_with(" attrs=\"namingContexts\"")
                || r.ends_with(" attrs=\"entryUUID nsUniqueId\""))
    };
    for (request, bind_dn) in [
        (format!("MOD dn=\"{}\"", user_dn(1)), Some(user_dn(1))),
        // (389 logs it without the space after the comma.)
        (
            format!("MOD dn=\"{}\"", user_dn(2)),
            Some(u2_spelled.replace(", ", ",")),
        ),
        (format!("ADD dn=\"{added}\""), Some(DM_DN.into())),
        (format!("SRCH base=\"{}\"", user_dn(4)), None),
    ] {
        let mut want: Vec<String> = bind_dn
            .map(|dn| format!("BIND dn=\"{dn}\" method=128 version=3"))
            .into_iter()
            .collect();
        want.push(whoami_logged.clone());
        let got = requests_up_to(&ds, &request);
        let (last, first) = got.split_last().expect("requests");
        assert!(first.starts_with(&want), "{request}: {got:?}");
        assert!(
            first[want.len()..].iter().all(|r| proxy_read(r)),
            "{request}: {got:?}"
        );
        assert!(last.starts_with(&request), "{request}: {got:?}");
    }
    // And the sessions go on as usual.
    u1.send_msg(modify(3, &user_dn(1), "description", "later"))
        .await;
    assert_eq!(answered(u1.recv().await), Some(0));

    // User 6's bind no longer holds on 389: that session ends with the
    // reason at its next request, nothing of it sent.
    u6.send_msg(search(2, &user_dn(6), 0, "(objectClass=*)", &["uid"]))
        .await;
    assert_ended_with(
        &mut u6,
        &["could not be carried", "refused the replayed bind"],
    )
    .await;
    let counts = engine.clone();
    wait_until("one session not carried", 20, || {
        counts.carry_counts() == (0, 5, 1)
    })
    .await;
    assert_eq!(carry_status(&status(&proxy).await), (0, 5, 1));
    proxy.shutdown().await.unwrap();
}

/// With `upstream_reconnect`, outside any freeze: 389 restarts under idle
/// clients; each one's next request goes to a new connection with its
/// identity, and succeeds. A persistent search open meanwhile ends at once
/// with a Notice of Disconnection giving the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upstream_reconnect_idle_sessions_survive_a_389_restart() {
    if skip() {
        return;
    }
    let mut ds = start_ds(20).await;
    let proxy = carry_proxy(&ds, |c| {
        c.backends.clear();
        c.upstream_reconnect = true;
    })
    .await;
    let addr = addr_of(&proxy.url());
    let engine = proxy.engine();
    let mut u1 = raw_bound(&addr, &user_dn(1), &user_pw(1)).await;
    let mut dm = raw_bound(&addr, DM_DN, DM_PW).await;
    let mut anon = RawConn::connect(&addr).await;
    let mut before = Vec::new();
    for c in [&mut u1, &mut dm, &mut anon] {
        before.push(whoami(c, 100).await);
    }
    // And a persistent search, which cannot be carried.
    let mut ps_client = raw_bound(&addr, DM_DN, DM_PW).await;
    let mut ps = search(2, PEOPLE, 2, "(uid=user1*)", &["description"]);
    ps.ctrl.push(psearch_control());
    ps_client.send_msg(ps).await;
    for _ in 0..11 {
        let f = ps_client.recv().await.expect("an initial entry");
        entry_dn(&decode(&f));
    }

    restart(&mut ds).await;
    assert_ended_with(&mut ps_client, &["cannot be carried to a new one"]).await;
    let waiting = engine.clone();
    wait_until("three sessions waiting for the server", 20, || {
        waiting.carry_counts() == (3, 0, 1)
    })
    .await;
    for c in [&mut u1, &mut dm, &mut anon] {
        assert_nothing_pending(c).await;
    }

    // Each one's next request: a write, an add, a read.
    u1.send_msg(modify(2, &user_dn(1), "description", "after a restart"))
        .await;
    assert_eq!(result_code(&u1.recv().await.unwrap()), Some(0));
    let added = format!("cn=after-restart,{PEOPLE}");
    dm.send_msg(add(2, &added, "after-restart")).await;
    assert_eq!(result_code(&dm.recv().await.unwrap()), Some(0));
    anon.send_msg(search(2, &user_dn(4), 0, "(objectClass=*)", &["uid"]))
        .await;
    let frames = anon.recv_until_final(2).await;
    assert_eq!(
        (frames.len(), result_code(&frames[1])),
        (2, Some(0)),
        "the entry and the done"
    );
    let mut after = Vec::new();
    for c in [&mut u1, &mut dm, &mut anon] {
        after.push(whoami(c, 101).await);
    }
    assert_eq!(after, before);
    assert_eq!(engine.carry_counts(), (0, 3, 1));
    assert_eq!(carry_status(&status(&proxy).await), (0, 3, 1));
    assert_eq!(
        read_direct(&ds, &user_dn(1), "description").await,
        ["description: after a restart"]
    );
    assert!(exists_direct(&ds, &added).await);
    proxy.shutdown().await.unwrap();
}

/// A persistent search (2.16.840.1.113730.3.4.3) open through the proxy
/// during a `stop` freeze when 389 restarts: its session ends at once with
/// a Notice of Disconnection saying why it cannot be carried; an idle
/// client and the operator are carried after OFF (same identity, a write
/// succeeds); the counts say one not carried and two carried. A change
/// notification the freeze held when 389 stopped is not sent: the notice
/// is the first thing the client gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_search_ends_with_the_reason_and_the_others_go_on() {
    if skip() {
        return;
    }
    let mut ds = start_ds(20).await;
    let proxy = carry_proxy(&ds, |_| {}).await;
    let addr = addr_of(&proxy.url());
    let engine = proxy.engine();

    // The same persistent search through the proxy and, as a witness of
    // what 389 sends, directly.
    let mut ps_client = raw_bound(&addr, DM_DN, DM_PW).await;
    let mut witness = raw_bound(&addr_of(&ds.url()), DM_DN, DM_PW).await;
    let mut ps = search(2, PEOPLE, 2, "(uid=user1*)", &["description"]);
    ps.ctrl.push(psearch_control());
    ps_client.send_msg(ps.clone()).await;
    witness.send_msg(ps).await;
    // changesOnly FALSE: the 11 matching entries first; then 389 has the
    // persistent search registered.
    for c in [&mut ps_client, &mut witness] {
        for _ in 0..11 {
            let f = c.recv().await.expect("an initial entry");
            entry_dn(&decode(&f));
        }
    }
    let mut idle = raw_bound(&addr, &user_dn(3), &user_pw(3)).await;
    let idle_before = whoami(&mut idle, 100).await;
    assert_eq!(idle_before, format!("dn: {}", user_dn(3)));
    let mut admin = raw_bound(&addr, DM_DN, DM_PW).await;
    let (code, text) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{text}");

    // A change made on 389 itself during the freeze: 389 notifies both
    // persistent searches; stop mode holds the proxied one's.
    let ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: changed while frozen\n",
        user_dn(12)
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &ds.ldapi_url()],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let seen = witness.recv().await.expect("the witness's notification");
    assert_eq!(entry_dn(&decode(&seen)), user_dn(12));
    assert_nothing_pending(&mut ps_client).await;

    restart(&mut ds).await;
    // The persistent search's session: a notice with the reason (and not
    // the notification the freeze holds), then the end of the connection.
    assert_ended_with(
        &mut ps_client,
        &[
            "cannot be carried to a new one",
            "a persistent search was open",
        ],
    )
    .await;
    let waiting = engine.clone();
    wait_until("two sessions waiting for the server", 20, || {
        waiting.carry_counts() == (2, 0, 1)
    })
    .await;
    assert_nothing_pending(&mut idle).await;
    assert_eq!(carry_status(&status(&proxy).await), (2, 0, 1));

    let (code, text) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("the server was restarted and answers again: 2 session(s) go on")
            && text.contains("; 1 session(s) ended, as they could not be carried"),
        "{text}"
    );
    assert_eq!(whoami(&mut idle, 101).await, idle_before);
    idle.send_msg(modify(2, &user_dn(3), "description", "idle goes on"))
        .await;
    assert_eq!(result_code(&idle.recv().await.unwrap()), Some(0));
    assert_eq!(
        whoami(&mut admin, 101).await,
        "dn: cn=directory manager",
        "the operator's session too"
    );
    assert_eq!(engine.carry_counts(), (0, 2, 1));
    assert_eq!(carry_status(&status(&proxy).await), (0, 2, 1));
    assert_eq!(
        read_direct(&ds, &user_dn(3), "description").await,
        ["description: idle goes on"]
    );
    proxy.shutdown().await.unwrap();
}
