//! Sessions carried across a restart of the server during a `stop`-mode
//! freeze (a cold backup): clients keep their connections, their held
//! requests and their identity; what cannot be carried ends with the
//! reason.

use std::time::Duration;

use crate::support::freeze::*;
use crate::support::*;

use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::Mode;
use abproxy::wire::Envelope;
use abproxy_proto::AllowBackupRequest;
use testkit::{user_dn, user_pw, SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN};

const WHOAMI: &str = "1.3.6.1.4.1.4203.1.11.3";

async fn stop_lab(carry: bool) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c: &mut Config| {
            c.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
            c.freeze.root_dns = c.freeze.allowed.clone();
            c.backends = vec![BackendConfig::new("dc=example,dc=org", Mode::Stop)];
            c.carry_sessions = carry;
            c.upstream_retry_secs = 20;
        },
    )
    .await
}

/// A lab whose proxy carries sessions outside freezes too
/// (`upstream_reconnect`), for `retry` seconds; slapd's stats log on if
/// asked.
async fn reconnect_lab(retry: u64, stats_log: bool) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            stats_log,
            ..Default::default()
        },
        |c: &mut Config| {
            c.upstream_reconnect = true;
            c.upstream_retry_secs = retry;
        },
    )
    .await
}

/// Who the server says this connection is (through the proxy).
async fn whoami(c: &mut RawConn, msgid: i32) -> String {
    c.send_msg(exop(msgid, WHOAMI, None)).await;
    let frame = c.recv().await.expect("a Who am I? response");
    let env = Envelope::response(&frame).unwrap();
    assert_eq!(env.msgid, msgid);
    assert_eq!(env.result_code, Some(0), "{}", diagnostic(&frame));
    String::from_utf8_lossy(env.value_bytes(&frame).unwrap_or_default()).into_owned()
}

/// Stops slapd and starts it again on the same port and data (a cold
/// backup's window), off the runtime: it blocks.
async fn restart(lab: &mut Lab) {
    tokio::task::block_in_place(|| lab.slapd.restart()).expect("restart slapd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_carried_across_a_restart_during_a_stop_freeze() {
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let mut u3 = bound(&lab, &user_dn(3), &user_pw(3)).await;
    let mut anon = RawConn::connect(&lab.proxy_addr()).await;
    assert_eq!(whoami(&mut anon, 1).await, "");
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    // Held by the stop freeze: a write, a read.
    u1.send_msg(modify(2, &user_dn(1), "description", "carried"))
        .await;
    anon.send_msg(search(2, &user_dn(2), 0, "(objectClass=*)", &["uid"]))
        .await;
    wait_status(&lab, "two held requests", |s| s.queued_requests == 2).await;

    // The cold backup's window: the server stops (every upstream
    // connection closes) and starts again; meanwhile user 3's password
    // changes on the server itself.
    restart(&mut lab).await;
    let changed = ldap_tool(
        "ldappasswd",
        &[
            "-x",
            "-H",
            &lab.direct(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-s",
            "a-new-password",
            &user_dn(3),
        ],
        None,
    )
    .await;
    assert_eq!(changed.code, Some(0), "{}", changed.stderr);
    // Every session noticed, none was told.
    wait_until("four sessions waiting for the server", 10, || {
        engine.carry_counts().0 == 4
    })
    .await;
    assert_nothing_pending(&mut u1).await;
    assert_nothing_pending(&mut anon).await;
    // The status says so (asked on the operator's waiting session: the
    // proxy answers it).
    let (code, text) = call(
        &mut admin,
        exop(9, abproxy_proto::ALLOW_BACKUP_STATUS_OID, None),
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        text.ends_with("; 4 session(s) wait for the server to answer again"),
        "{text}"
    );
    let value = status(&lab).await;
    assert_eq!(
        (
            value.sessions_waiting,
            value.sessions_carried,
            value.sessions_not_carried
        ),
        (4, 0, 0)
    );

    // OFF on the operator's own connection (answered by the proxy, once
    // the server answers again), then each session goes on as it was.
    let (code, text) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("the server was restarted and answers again: 4 session(s) go on"),
        "{text}"
    );
    assert_eq!(
        result_code(&u1.recv().await.expect("the held modify's answer")),
        Some(0)
    );
    let frames = anon.recv_until_final(2).await;
    assert_eq!(frames.len(), 2, "the entry and the done");
    assert_eq!(result_code(&frames[1]), Some(0));
    assert_eq!(whoami(&mut u1, 3).await, format!("dn:{}", user_dn(1)));
    assert_eq!(whoami(&mut anon, 3).await, "");
    assert_eq!(whoami(&mut admin, 4).await, format!("dn:{ADMIN_DN}"));
    // The write landed once, after the restart.
    let read = base_direct(&lab, &user_dn(1), "description").await;
    assert!(
        read.stdout.contains("description: carried"),
        "{}",
        read.stdout
    );

    // User 3's bind no longer holds at the server: that session ends with
    // the reason at its next request, nothing of it sent.
    u3.send_msg(search(2, &user_dn(3), 0, "(objectClass=*)", &["uid"]))
        .await;
    assert_ended_with(
        &mut u3,
        &["could not be carried", "refused the replayed bind"],
    )
    .await;
    let counts = engine.clone();
    let what = format!("the counts (now {:?})", engine.carry_counts());
    wait_until(&what, 10, || counts.carry_counts() == (0, 3, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_carry_sessions_a_restart_ends_them_as_before() {
    let mut lab = stop_lab(false).await;
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    u1.send_msg(modify(2, &user_dn(1), "description", "never"))
        .await;
    wait_status(&lab, "a held write", |s| s.queued_requests == 1).await;
    restart(&mut lab).await;
    let notice = u1.recv().await.expect("a notice");
    let why = assert_notice(&notice, 52);
    assert!(why.contains("closed the connection"), "{why}");
    assert!(u1.recv().await.is_none());
    assert_eq!(lab.proxy.engine().carry_counts(), (0, 0, 0));
    // The held write was never sent.
    let read = base_direct(&lab, &user_dn(1), "description").await;
    assert!(!read.stdout.contains("never"), "{}", read.stdout);
    let _ = tokio::time::timeout(Duration::from_secs(1), admin.recv()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_a_tls_upstream_are_carried_over_tls() {
    let pki = crate::support::pki::Pki::new();
    for starttls in [false, true] {
        let mut lab = Lab::with(
            SlapdOptions {
                nosync: true,
                tls: Some(pki.slapd_tls()),
                stats_log: true,
                ..Default::default()
            },
            |_| {},
        )
        .await;
        // A second proxy, reaching the same slapd over TLS.
        let mut config = Config {
            listen: vec!["ldap://127.0.0.1:0".into()],
            upstream: if starttls {
                lab.direct()
            } else {
                lab.slapd.ldaps_url().unwrap()
            },
            ..Config::default()
        };
        config.tls.upstream_starttls = starttls;
        config.tls.upstream_ca_file = Some(pki.ca_file());
        config.freeze.allowed = vec![ADMIN_DN.into()];
        config.freeze.root_dns = config.freeze.allowed.clone();
        config.backends = vec![BackendConfig::new("dc=example,dc=org", Mode::Stop)];
        let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
        let addr = proxy.url().trim_start_matches("ldap://").to_string();
        let mut u1 = bound_at(&addr, &user_dn(1), &user_pw(1)).await;
        let mut admin = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
        assert_eq!(
            call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
            0
        );
        u1.send_msg(modify(2, &user_dn(1), "description", "over tls"))
            .await;
        let engine = proxy.engine();
        let held = engine.clone();
        wait_until("a held write", 10, || held.queued().0 == 1).await;
        restart(&mut lab).await;
        let waiting = engine.clone();
        wait_until("two sessions waiting", 10, || waiting.carry_counts().0 == 2).await;
        let log_before = std::fs::read_to_string(lab.slapd.log_path()).unwrap_or_default();
        assert_eq!(
            call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
            0
        );
        assert_eq!(result_code(&u1.recv().await.unwrap()), Some(0));
        assert_eq!(whoami(&mut u1, 3).await, format!("dn:{}", user_dn(1)));
        // The new connection is TLS too (slapd's log of its new run).
        let log = std::fs::read_to_string(lab.slapd.log_path()).unwrap();
        let tls_now = log.matches("TLS established").count();
        let tls_before = log_before.matches("TLS established").count();
        assert!(
            tls_now > tls_before,
            "starttls={starttls}: no TLS connection after the restart"
        );
        proxy.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upstream_reconnect_an_unannounced_restart_is_carried_too() {
    let mut lab = reconnect_lab(2, false).await;
    let engine = lab.proxy.engine();
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let mut anon = RawConn::connect(&lab.proxy_addr()).await;
    assert_eq!(whoami(&mut anon, 1).await, "");
    // No freeze: the server restarts under its clients.
    restart(&mut lab).await;
    let waiting = engine.clone();
    wait_until("two sessions waiting", 10, || waiting.carry_counts().0 == 2).await;
    u1.send_msg(modify(2, &user_dn(1), "description", "after a restart"))
        .await;
    assert_eq!(result_code(&u1.recv().await.unwrap()), Some(0));
    assert_eq!(whoami(&mut u1, 3).await, format!("dn:{}", user_dn(1)));
    assert_eq!(whoami(&mut anon, 2).await, "");
    let read = base_direct(&lab, &user_dn(1), "description").await;
    assert!(
        read.stdout.contains("description: after a restart"),
        "{}",
        read.stdout
    );

    // A server that stays down: after upstream_retry_secs the request is
    // answered unavailable, never sent; the session stays open.
    tokio::task::block_in_place(|| lab.slapd.stop()).unwrap();
    let waiting = engine.clone();
    wait_until("both sessions waiting again", 10, || {
        waiting.carry_counts().0 == 2
    })
    .await;
    let started = std::time::Instant::now();
    u1.send_msg(modify(4, &user_dn(1), "description", "never sent"))
        .await;
    let answer = u1.recv().await.expect("an answer");
    let env = Envelope::response(&answer).unwrap();
    assert_eq!(
        (env.msgid, env.result_code),
        (4, Some(52)),
        "{}",
        diagnostic(&answer)
    );
    let why = diagnostic(&answer);
    assert!(why.contains("not answered again within 2 s"), "{why}");
    assert!(why.contains("not sent"), "{why}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before giving up"
    );
    // Still down: the next requests are answered the same (one attempt
    // each, no new wait); a bind answered so leaves the session anonymous.
    u1.send_msg(modify(5, &user_dn(1), "description", "never sent either"))
        .await;
    u1.send_msg(bind(6, &user_dn(2), &user_pw(2))).await;
    for id in [5, 6] {
        let answer = u1.recv().await.expect("an answer");
        let env = Envelope::response(&answer).unwrap();
        assert_eq!(
            (env.msgid, env.result_code),
            (id, Some(52)),
            "{}",
            diagnostic(&answer)
        );
    }
    assert_eq!(engine.carry_counts().0, 2, "both sessions still wait");
    // Back: the sessions go on, u1 as anonymous (its last bind failed).
    tokio::task::block_in_place(|| lab.slapd.restart()).unwrap();
    assert_eq!(whoami(&mut u1, 7).await, "");
    assert_eq!(whoami(&mut anon, 3).await, "");
    u1.send_msg(bind(8, &user_dn(1), &user_pw(1))).await;
    assert_eq!(result_code(&u1.recv().await.unwrap()), Some(0));
    assert_eq!(whoami(&mut u1, 9).await, format!("dn:{}", user_dn(1)));
    // Nothing answered unavailable reached the server.
    let read = base_direct(&lab, &user_dn(1), "description").await;
    assert!(
        read.stdout.contains("description: after a restart"),
        "{}",
        read.stdout
    );
    assert_eq!(engine.carry_counts(), (0, 4, 0), "carried twice each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_replayed_is_the_last_bind_s_own() {
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    // Rebound as another user: that user is replayed.
    let mut rebound = bound(&lab, &user_dn(1), &user_pw(1)).await;
    rebound.send_msg(bind(2, &user_dn(2), &user_pw(2))).await;
    assert_eq!(result_code(&rebound.recv().await.unwrap()), Some(0));
    // A failed rebind leaves the connection anonymous (as slapd does): it
    // comes back anonymous.
    let mut failed = bound(&lab, &user_dn(4), &user_pw(4)).await;
    failed.send_msg(bind(2, &user_dn(4), "wrong")).await;
    assert_eq!(result_code(&failed.recv().await.unwrap()), Some(49));
    assert_eq!(whoami(&mut failed, 3).await, "");
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    restart(&mut lab).await;
    let waiting = engine.clone();
    wait_until("three sessions waiting", 10, || {
        waiting.carry_counts().0 == 3
    })
    .await;
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(whoami(&mut rebound, 3).await, format!("dn:{}", user_dn(2)));
    assert_eq!(whoami(&mut failed, 4).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_bind_into_a_frozen_backend_waits_for_the_freeze() {
    // user 1 lives under the stop-mode backend; the root DSE is never held.
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    restart(&mut lab).await;
    let waiting = engine.clone();
    wait_until("two sessions waiting", 10, || waiting.carry_counts().0 == 2).await;
    let csn = context_csn(&lab, "dc=example,dc=org").await;
    // A read the freeze does not hold, on a session whose carrying needs a
    // bind into the frozen backend (a bind may write there: ppolicy,
    // lastbind): it waits for the freeze, nothing is sent.
    u1.send_msg(search(2, "", 0, "(objectClass=*)", &["namingContexts"]))
        .await;
    assert_nothing_pending(&mut u1).await;
    assert_eq!(engine.carry_counts(), (2, 0, 0), "not carried yet");
    assert_eq!(context_csn(&lab, "dc=example,dc=org").await, csn);
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    let frames = u1.recv_until_final(2).await;
    assert_eq!(result_code(frames.last().unwrap()), Some(0));
    assert_eq!(whoami(&mut u1, 3).await, format!("dn:{}", user_dn(1)));
}

/// One page of a simple paged-results search (RFC 2696) of the people:
/// the entries' count and the cookie the server handed out.
async fn page(c: &mut RawConn, msgid: i32, size: i64, cookie: Vec<u8>) -> (usize, Vec<u8>) {
    use ldap3_proto::control::LdapControl;
    let mut msg = search(
        msgid,
        "ou=people,dc=example,dc=org",
        1,
        "(objectClass=*)",
        &["uid"],
    );
    msg.ctrl = vec![LdapControl::SimplePagedResults { size, cookie }];
    c.send_msg(msg).await;
    let frames = c.recv_until_final(msgid).await;
    let (done, entries) = frames.split_last().expect("a done");
    assert_eq!(result_code(done), Some(0), "{}", diagnostic(done));
    let cookie = crate::support::ds389::decode(done)
        .ctrl
        .into_iter()
        .find_map(|c| match c {
            LdapControl::SimplePagedResults { cookie, .. } => Some(cookie),
            _ => None,
        })
        .expect("the paged-results control in the done");
    (entries.len(), cookie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holding_a_paged_results_cookie_ends_with_the_reason_others_go_on() {
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    // Halfway through a paged search: the server holds its cookie.
    let mut halfway = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let (n, cookie) = page(&mut halfway, 2, 1, vec![]).await;
    assert_eq!(n, 1);
    assert!(!cookie.is_empty(), "more pages to come");
    // Paged through to the end: the last page's cookie is empty, nothing
    // is left at the server.
    let mut through = bound(&lab, &user_dn(2), &user_pw(2)).await;
    let (mut cookie, mut total, mut id) = (Vec::new(), 0, 2);
    loop {
        let (n, next) = page(&mut through, id, 2, cookie).await;
        total += n;
        id += 1;
        if next.is_empty() {
            break;
        }
        cookie = next;
    }
    assert!(total > 2, "paged through several pages ({total} entries)");
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    restart(&mut lab).await;
    // The one with the cookie is told why at once; the others wait.
    assert_ended_with(&mut halfway, &["paged-results cookie"]).await;
    let counts = engine.clone();
    wait_until("two sessions waiting, one not carried", 10, || {
        counts.carry_counts() == (2, 0, 1)
    })
    .await;
    let (code, text) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    // OFF's answer counts both.
    assert!(
        text.contains("answers again: 2 session(s) go on")
            && text.contains("; 1 session(s) ended, as they could not be carried"),
        "{text}"
    );
    assert_eq!(whoami(&mut through, 50).await, format!("dn:{}", user_dn(2)));
    // A new paged search on the carried session works from the start.
    let (n, _) = page(&mut through, 51, 2, vec![]).await;
    assert_eq!(n, 2);
    // The operator's session waits until its next request needs the server.
    assert_eq!(engine.carry_counts(), (1, 1, 1));
    assert_eq!(whoami(&mut admin, 4).await, format!("dn:{ADMIN_DN}"));
    assert_eq!(engine.carry_counts(), (0, 2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_comes_back_with_another_database_is_not_gone_on_with() {
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let mut anon = RawConn::connect(&lab.proxy_addr()).await;
    assert_eq!(whoami(&mut anon, 1).await, "");
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    u1.send_msg(modify(2, &user_dn(1), "description", "for the old data"))
        .await;
    wait_status(&lab, "the held write", |s| s.queued_requests == 1).await;
    // The server comes back on the same URL with the same users and
    // passwords (the replayed binds succeed, Who am I? answers the same),
    // but another database under dc=example,dc=org.
    tokio::task::block_in_place(|| lab.slapd.replace_example_data()).unwrap();
    let counts = engine.clone();
    wait_until("three sessions waiting", 10, || {
        counts.carry_counts().0 == 3
    })
    .await;
    let (code, text) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    // The operator's OFF is answered by the proxy itself; the session then
    // ends at its next request like the others.
    assert_eq!(code, 0, "{text}");
    // The idle ones learn it at their next request that needs the server.
    anon.send_msg(search(5, "", 0, "(objectClass=*)", &[]))
        .await;
    admin.send_msg(exop(4, WHOAMI, None)).await;
    for c in [&mut u1, &mut anon, &mut admin] {
        assert_ended_with(
            c,
            &[
                "came back as another server",
                "another database holds dc=example,dc=org",
            ],
        )
        .await;
    }
    // The held write never reached the other database.
    let read = base_direct(&lab, &user_dn(1), "description").await;
    assert!(!read.stdout.contains("for the old data"), "{}", read.stdout);
    // A new client talks to the new server, and is carried across its
    // next restart.
    let mut fresh = bound(&lab, &user_dn(2), &user_pw(2)).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    restart(&mut lab).await;
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(whoami(&mut fresh, 3).await, format!("dn:{}", user_dn(2)));
    assert_eq!(engine.carry_counts().2, 3, "three not carried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_7_when_the_server_it_stopped_does_not_answer_again() {
    let mut lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c: &mut Config| {
            c.freeze.allowed = vec![ADMIN_DN.into()];
            c.backends = vec![BackendConfig::new("dc=example,dc=org", Mode::Stop)];
            c.upstream_retry_secs = 2;
        },
    )
    .await;
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    // The backup command stops slapd (and waits until it has exited, as
    // `systemctl stop` does: a zombie of the test's) and does not start it
    // again.
    let pid = lab.slapd.pid().to_string();
    let stop =
        "kill -TERM $0 && while [ \"$(cut -d' ' -f3 /proc/$0/stat)\" != Z ]; do sleep 0.05; done";
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_abproxy"))
        .args([
            "run",
            "--backend",
            "dc=example,dc=org",
            "--",
            "sh",
            "-c",
            stop,
            &pid,
        ])
        .env_remove("ABPROXY_LOG")
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", ADMIN_DN)
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("run finishes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("the server was stopped during the freeze and does not answer again yet")
            && stderr.contains("2 session(s) wait for it"), // the client's and run's own
        "{stderr}"
    );
    // The session waits: answered unavailable while slapd is down, carried
    // once it is back.
    u1.send_msg(modify(2, &user_dn(1), "description", "while down"))
        .await;
    let answer = u1.recv().await.expect("an answer");
    assert_eq!(result_code(&answer), Some(52), "{}", diagnostic(&answer));
    tokio::task::block_in_place(|| lab.slapd.restart()).unwrap();
    assert_eq!(whoami(&mut u1, 3).await, format!("dn:{}", user_dn(1)));
    u1.send_msg(modify(4, &user_dn(1), "description", "back"))
        .await;
    assert_eq!(result_code(&u1.recv().await.unwrap()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upstream_reconnect_a_request_sent_while_the_server_is_down_goes_once_it_is_back() {
    let mut lab = reconnect_lab(20, true).await;
    let engine = lab.proxy.engine();
    let mut u1 = bound(&lab, &user_dn(1), &user_pw(1)).await;
    // Killed (no clean shutdown), no freeze.
    tokio::task::block_in_place(|| lab.slapd.kill());
    let waiting = engine.clone();
    wait_until("the session waiting", 10, || waiting.carry_counts().0 == 1).await;
    u1.send_msg(modify(2, &user_dn(1), "description", "sent while down"))
        .await;
    let held = engine.clone();
    wait_until("the write held", 10, || held.queued().0 == 1).await;
    tokio::task::block_in_place(|| lab.slapd.restart()).unwrap();
    let answer = u1.recv().await.expect("the write's answer");
    assert_eq!(
        (
            result_code(&answer),
            Envelope::response(&answer).unwrap().msgid
        ),
        (Some(0), 2),
        "{}",
        diagnostic(&answer)
    );
    assert_eq!(whoami(&mut u1, 3).await, format!("dn:{}", user_dn(1)));
    // Sent once: one MOD of that entry in slapd's log, after the restart.
    let log = std::fs::read_to_string(lab.slapd.log_path()).unwrap();
    let mods = log
        .lines()
        .filter(|l| l.contains(&format!("MOD dn=\"{}\"", user_dn(1))))
        .count();
    assert_eq!(mods, 1, "{log}");
    assert_eq!(engine.carry_counts(), (0, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upstream_reconnect_a_session_that_cannot_be_carried_is_counted_once() {
    let mut lab = reconnect_lab(20, false).await;
    let engine = lab.proxy.engine();
    // A persistent search (syncrepl refreshAndPersist) in flight.
    let mut p = RawConn::connect(&lab.proxy_addr()).await;
    let req = refresh_and_persist(search(
        1,
        &user_dn(5),
        0,
        "(objectClass=*)",
        &["description"],
    ));
    p.send_msg(req).await;
    loop {
        let f = p.recv().await.unwrap();
        if Envelope::response(&f).unwrap().op == abproxy::wire::op::INTERMEDIATE_RESPONSE {
            break; // the persist phase
        }
    }
    restart(&mut lab).await;
    // Whoever says so (slapd's own notice, or the proxy's), the session
    // ends once, and is counted once.
    let notice = p.recv().await.expect("a notice");
    assert_notice(
        &notice,
        Envelope::response(&notice).unwrap().result_code.unwrap(),
    );
    assert!(p.recv().await.is_none(), "closed after the notice");
    let counts = engine.clone();
    wait_until("one session not carried", 10, || {
        counts.carry_counts() == (0, 0, 1)
    })
    .await;
}

/// A client in the persist phase of a syncrepl refreshAndPersist search
/// (RFC 4533) when slapd restarts during a `stop` freeze: its session ends
/// at once with a Notice of Disconnection saying why it cannot be carried
/// (a persistent search lives on the connection that closed); an idle
/// client and the operator are carried after OFF (same identity, a write
/// succeeds), and the counts say exactly that: one not carried, two
/// carried. A change notification the freeze held when slapd stopped is
/// not sent: the notice is the first thing the client gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_search_ends_with_the_reason_and_the_others_go_on() {
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    // The same search through the proxy and, as a witness of what slapd
    // sends, directly.
    let mut syncing = bound(&lab, &user_dn(5), &user_pw(5)).await;
    let mut witness = bound_at(&lab.direct_addr(), &user_dn(5), &user_pw(5)).await;
    let req = refresh_and_persist(search(
        2,
        "ou=people,dc=example,dc=org",
        2,
        "(uid=user1*)",
        &["uid"],
    ));
    syncing.send_msg(req.clone()).await;
    witness.send_msg(req).await;
    // The refresh phase: entries, then the syncInfo intermediate response
    // that ends it (the persist phase begins).
    for c in [&mut syncing, &mut witness] {
        let mut refreshed = 0;
        loop {
            let f = c.recv().await.expect("the refresh phase");
            match Envelope::response(&f).unwrap().op {
                abproxy::wire::op::SEARCH_RESULT_ENTRY => refreshed += 1,
                abproxy::wire::op::INTERMEDIATE_RESPONSE => break,
                other => panic!("unexpected {}", abproxy::wire::op::name(other)),
            }
        }
        assert!(refreshed > 0, "the refresh sent the matching entries");
    }
    let mut idle = bound(&lab, &user_dn(2), &user_pw(2)).await;
    assert_eq!(whoami(&mut idle, 2).await, format!("dn:{}", user_dn(2)));
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, text) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{text}");
    // A change made on slapd itself during the freeze: syncprov notifies
    // both searches; stop mode holds the proxied one's.
    let ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: changed while frozen\n",
        user_dn(12)
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &lab.direct(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let seen = witness.recv().await.expect("the witness's notification");
    assert_eq!(
        Envelope::response(&seen).unwrap().op,
        abproxy::wire::op::SEARCH_RESULT_ENTRY
    );
    assert_nothing_pending(&mut syncing).await;

    restart(&mut lab).await;
    // A notice with the reason (and not the notification the freeze
    // holds), then the end of the connection.
    assert_ended_with(
        &mut syncing,
        &[
            "cannot be carried to a new one",
            "a persistent search was open",
        ],
    )
    .await;
    let counts = engine.clone();
    wait_until("two sessions waiting, one not carried", 10, || {
        counts.carry_counts() == (2, 0, 1)
    })
    .await;
    assert_nothing_pending(&mut idle).await;
    let value = status(&lab).await;
    assert_eq!(
        (
            value.sessions_waiting,
            value.sessions_carried,
            value.sessions_not_carried
        ),
        (2, 0, 1)
    );

    let (code, text) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("the server was restarted and answers again: 2 session(s) go on")
            && text.contains("; 1 session(s) ended, as they could not be carried"),
        "{text}"
    );
    assert_eq!(whoami(&mut idle, 3).await, format!("dn:{}", user_dn(2)));
    assert_eq!(
        call(
            &mut idle,
            modify(4, &user_dn(2), "description", "idle goes on")
        )
        .await
        .0,
        0
    );
    assert_eq!(whoami(&mut admin, 4).await, format!("dn:{ADMIN_DN}"));
    assert_eq!(engine.carry_counts(), (0, 2, 1));
    let value = status(&lab).await;
    assert_eq!(
        (
            value.sessions_waiting,
            value.sessions_carried,
            value.sessions_not_carried
        ),
        (0, 2, 1)
    );
    let read = base_direct(&lab, &user_dn(2), "description").await;
    assert!(
        read.stdout.contains("description: idle goes on"),
        "{}",
        read.stdout
    );
}

/// A page of a virtual list view over the people sorted by uid (slapd's
/// sssvlv overlay): the entries' count and the contextID handed out.
async fn vlv_page(
    c: &mut RawConn,
    msgid: i32,
    offset: u8,
    context: Option<&[u8]>,
) -> (usize, Option<Vec<u8>>) {
    use ldap3_proto::control::{LdapControl, ServerSortRequet};
    let mut msg = search(
        msgid,
        "ou=people,dc=example,dc=org",
        1,
        "(objectClass=*)",
        &["uid"],
    );
    // VirtualListViewRequest: beforeCount 0, afterCount 1, byOffset
    // { offset, contentCount 0 }, contextID.
    let mut inner = vec![
        0x02, 0x01, 0x00, 0x02, 0x01, 0x01, 0xa0, 0x06, 0x02, 0x01, offset, 0x02, 0x01, 0x00,
    ];
    if let Some(ctx) = context {
        inner.push(0x04);
        inner.push(ctx.len() as u8);
        inner.extend_from_slice(ctx);
    }
    let mut value = vec![0x30, inner.len() as u8];
    value.extend(inner);
    msg.ctrl = vec![
        LdapControl::ServerSort {
            sort_requests: vec![ServerSortRequet {
                attribute_name: "uid".into(),
                ordering_rule: Some("caseIgnoreOrderingMatch".into()),
                reverse_order: false,
            }],
        },
        LdapControl::Unknown {
            oid: "2.16.840.1.113730.3.4.9".into(),
            criticality: true,
            value: Some(value),
        },
    ];
    c.send_msg(msg).await;
    let frames = c.recv_until_final(msgid).await;
    let (done, entries) = frames.split_last().expect("a done");
    assert_eq!(result_code(done), Some(0), "{}", diagnostic(done));
    let ctrl = crate::support::ds389::decode(done).ctrl;
    let context = ctrl.into_iter().find_map(|c| match c {
        LdapControl::Unknown {
            oid,
            value: Some(v),
            ..
        } if oid == "2.16.840.1.113730.3.4.10" => {
            // SEQUENCE { INTEGER, INTEGER, ENUMERATED, contextID OCTET STRING OPTIONAL }
            let mut i = 2;
            for _ in 0..3 {
                i += 2 + v[i + 1] as usize;
            }
            (i < v.len()).then(|| v[i + 2..i + 2 + v[i + 1] as usize].to_vec())
        }
        _ => None,
    });
    (entries.len(), context)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holding_a_virtual_list_view_context_ends_with_the_reason() {
    let mut lab = stop_lab(true).await;
    let engine = lab.proxy.engine();
    // slapd's sssvlv hands out a contextID with each page, and expects it
    // back with the next.
    let mut viewing = bound(&lab, &user_dn(1), &user_pw(1)).await;
    let (n, context) = vlv_page(&mut viewing, 2, 1, None).await;
    assert_eq!(n, 2);
    let context = context.expect("slapd hands out a contextID");
    let (n, again) = vlv_page(&mut viewing, 3, 3, Some(&context)).await;
    assert_eq!(n, 2);
    assert!(again.is_some(), "and again with the next page");
    let mut idle = bound(&lab, &user_dn(2), &user_pw(2)).await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );
    restart(&mut lab).await;
    assert_ended_with(&mut viewing, &["virtual list view context"]).await;
    let counts = engine.clone();
    wait_until("two sessions waiting, one not carried", 10, || {
        counts.carry_counts() == (2, 0, 1)
    })
    .await;
    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    assert_eq!(whoami(&mut idle, 2).await, format!("dn:{}", user_dn(2)));
}
