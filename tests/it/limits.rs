//! Limits, each hit on purpose against a real slapd: the request size
//! before and after a bind, connections in total and per source address,
//! the idle timeout, requests outstanding per connection, and response
//! bytes buffered for a client that does not read. docs/configuration.md:
//! "Limits and failure behaviour".

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::shim::Shim;
use crate::support::*;
use abproxy::wire::{op, Envelope};
use ldap3_proto::proto::{LdapAttribute, LdapMsg, LdapOp, LdapResultCode};
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW};
use tokio::net::{TcpSocket, TcpStream};

/// An add request for a `device` entry with a `description` of `size` bytes.
fn big_add(msgid: i32, cn: &str, size: usize) -> LdapMsg {
    let mut m = add(msgid, &format!("cn={cn},dc=example,dc=org"), cn);
    if let LdapOp::AddRequest(a) = &mut m.op {
        a.attributes.push(LdapAttribute {
            atype: "description".into(),
            vals: vec![vec![b'x'; size]],
        });
    }
    m
}

/// A connection from a chosen loopback source address.
async fn connect_from(source: &str, to: &str) -> RawConn {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    RawConn::from_stream(s.connect(to.parse().unwrap()).await.unwrap())
}

#[tokio::test]
async fn request_size_limit_is_smaller_until_a_bind_succeeds() {
    // Defaults: 262143 bytes anonymous (slapd's own), 16 MiB after a bind.
    let lab = Lab::start().await;
    let size = 300 * 1024;

    // Anonymous: the request is refused from its header, with the reason.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(big_add(1, "big-anon", size)).await;
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1, "only the notice, then the end");
    let msg = assert_notice(&frames[0], LdapResultCode::ProtocolError as i64);
    assert!(
        msg.contains("262143") && msg.contains("max_pdu_bytes_anonymous"),
        "{msg}"
    );
    // slapd refuses the same bytes the same way (it closes the connection
    // without answering the add).
    let mut d = RawConn::connect(&lab.direct_addr()).await;
    d.send_msg(big_add(1, "big-anon", size)).await;
    let direct: Vec<_> = d
        .recv_all()
        .await
        .into_iter()
        .filter(|f| Envelope::response(f).is_ok_and(|e| e.msgid == 1))
        .collect();
    assert!(
        direct.is_empty(),
        "slapd answered an oversized anonymous add"
    );

    // Bound: the same request goes through and is stored.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    c.send_msg(big_add(2, "big-bound", size)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));

    // Back to anonymous (a bind with an empty DN): the small limit again.
    c.send_msg(bind(3, "", "")).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    c.send_msg(big_add(4, "big-again", size)).await;
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1);
    assert_notice(&frames[0], LdapResultCode::ProtocolError as i64);

    // A failed bind does not raise it either.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(bind(1, ADMIN_DN, "wrong")).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(49));
    c.send_msg(big_add(2, "big-failed", size)).await;
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1);
    assert_notice(&frames[0], LdapResultCode::ProtocolError as i64);

    let stored = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &lab.direct(),
            "-b",
            "dc=example,dc=org",
            "(cn=big-*)",
            "cn",
        ],
        None,
    )
    .await;
    assert_eq!(stored.code, Some(0), "{}", stored.stderr);
    assert_eq!(
        stored.stdout.matches("dn: ").count(),
        1,
        "{}",
        stored.stdout
    );
    assert!(stored.stdout.contains("cn=big-bound,"));
}

#[tokio::test]
async fn connection_limits_total_and_per_source() {
    let lab = Lab::with(
        SlapdOptions {
            stats_log: true,
            ..Default::default()
        },
        |c| {
            c.max_connections = 3;
            c.max_connections_per_source = 2;
        },
    )
    .await;
    // slapd numbers the connections it accepts in order (conn=N) and names
    // each in its log lines: the connections it accepted after a moment are
    // the numbers above the highest it had named by then. (Counting ACCEPT
    // lines is not enough: slapd may log a connection's ACCEPT after its
    // first operation, and its ldapi accepts at any time.)
    let conns = || -> std::collections::BTreeSet<u64> {
        std::fs::read_to_string(lab.slapd.log_path())
            .unwrap_or_default()
            .split("conn=")
            .skip(1)
            .filter_map(|rest| {
                let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
                digits.parse().ok()
            })
            .collect()
    };
    let to = lab.proxy_addr();

    let mut a1 = connect_from("127.0.0.1", &to).await;
    round_trip(&mut a1, 1).await;
    let mut a2 = connect_from("127.0.0.1", &to).await;
    round_trip(&mut a2, 1).await;
    // a1's and a2's connections have run a search: slapd has named them.
    let before = conns().last().copied().unwrap_or(0);
    // A third from the same address: told why, closed, no upstream made.
    let mut a3 = connect_from("127.0.0.1", &to).await;
    let frames = a3.recv_all().await;
    assert_eq!(frames.len(), 1);
    let msg = assert_notice(&frames[0], LdapResultCode::Unavailable as i64);
    assert!(msg.contains("max_connections_per_source"), "{msg}");
    assert!(msg.contains("127.0.0.1"), "{msg}");

    // Another address still gets in, up to the total.
    let mut b1 = connect_from("127.0.0.2", &to).await;
    round_trip(&mut b1, 1).await;
    let mut c1 = connect_from("127.0.0.3", &to).await;
    let frames = c1.recv_all().await;
    assert_eq!(frames.len(), 1);
    let msg = assert_notice(&frames[0], LdapResultCode::Unavailable as i64);
    assert!(msg.contains("max_connections)"), "{msg}");

    // The admitted ones are unaffected, and a closed one frees its place.
    round_trip(&mut a1, 2).await;
    assert_eq!(lab.proxy.open_connections(), 3);
    drop(a2);
    wait_until("the proxy to end the closed session", 10, || {
        lab.proxy.open_connections() == 2
    })
    .await;
    let mut c2 = connect_from("127.0.0.3", &to).await;
    round_trip(&mut c2, 1).await;
    round_trip(&mut b1, 2).await;
    // slapd accepted exactly two more upstream connections (b1's, c2's):
    // none for the refused clients.
    let after = || conns().range(before + 1..).count();
    wait_until("slapd to log the new connections", 10, || after() >= 2).await;
    assert_eq!(
        after(),
        2,
        "refused clients got no upstream; slapd's log:\n{}",
        std::fs::read_to_string(lab.slapd.log_path()).unwrap_or_default()
    );
}

#[tokio::test]
async fn idle_sessions_are_closed_busy_ones_are_not() {
    let idle = Duration::from_secs(1);
    let lab = Lab::with(SlapdOptions::default(), |c| c.idle_timeout_secs = 1).await;

    // A persistent search (syncrepl refreshAndPersist) keeps its session
    // busy however long nothing else happens on it.
    let started = Instant::now();
    let mut persist = RawConn::connect(&lab.proxy_addr()).await;
    let req = refresh_and_persist(search(
        1,
        "dc=example,dc=org",
        2,
        "(cn=idle-probe)",
        &["cn"],
    ));
    persist.send_msg(req).await;
    // End of the refresh phase: an intermediate response (syncInfo).
    let f = persist.recv().await.unwrap();
    assert_eq!(
        Envelope::response(&f).unwrap().op,
        op::INTERMEDIATE_RESPONSE
    );

    // An idle session is told and closed after the timeout.
    let mut quiet = RawConn::connect(&lab.proxy_addr()).await;
    round_trip(&mut quiet, 1).await;
    let quiet_since = Instant::now();
    let frames = quiet.recv_all().await;
    let waited = quiet_since.elapsed();
    assert_eq!(frames.len(), 1);
    let msg = assert_notice(&frames[0], LdapResultCode::Unavailable as i64);
    assert!(msg.contains("idle"), "{msg}");
    assert!(
        waited >= idle && waited < idle * 4,
        "closed after {waited:?}"
    );

    // Non-occurrence has no event to await: give the persistent session's
    // timer time to fire at least twice, then show it still works.
    tokio::time::sleep((idle * 3).saturating_sub(started.elapsed())).await;
    let add = ldap_tool(
        "ldapadd",
        &["-x", "-H", &lab.proxied(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some("dn: cn=idle-probe,dc=example,dc=org\nobjectClass: device\ncn: idle-probe\n"),
    )
    .await;
    assert_eq!(add.code, Some(0), "{}", add.stderr);
    let f = persist.recv().await.expect("persistent search still open");
    let env = Envelope::response(&f).unwrap();
    assert_eq!((env.msgid, env.op), (1, op::SEARCH_RESULT_ENTRY));
}

#[tokio::test]
async fn outstanding_requests_per_connection_are_capped_by_backpressure() {
    let lab = Lab::start().await;
    let shim = Shim::start(&lab.direct_addr()).await;
    let proxy = abproxy::ProxyHandle::spawn(abproxy::config::Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: shim.url(),
        max_outstanding_per_conn: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = proxy.url().trim_start_matches("ldap://").to_string();

    // The server answers nothing for now; the client pipelines 50 searches.
    // (The proxy read the rootDSE through the shim when it started.)
    let before = shim.counters.requests.load(Ordering::SeqCst);
    assert_eq!(shim.outstanding(), 0);
    shim.stall_responses(true);
    let mut c = RawConn::connect(&addr).await;
    let mut all = Vec::new();
    for id in 1..=50 {
        all.extend_from_slice(&encode(search(
            id,
            "dc=example,dc=org",
            0,
            "(objectClass=*)",
            &["dc"],
        )));
    }
    c.send(&all).await;
    wait_until("4 requests to reach the server", 10, || {
        shim.counters.requests.load(Ordering::SeqCst) == before + 4
    })
    .await;

    // Released: every request is answered exactly once (slapd runs them
    // on several threads, so in any order), and never more than 4 were
    // outstanding at the server.
    shim.stall_responses(false);
    let mut entries = std::collections::BTreeMap::new();
    let mut done = std::collections::BTreeMap::new();
    while done.len() < 50 {
        let f = c.recv().await.expect("all answers");
        let env = Envelope::response(&f).unwrap();
        if env.op == op::SEARCH_RESULT_ENTRY {
            *entries.entry(env.msgid).or_insert(0) += 1;
        } else {
            assert_eq!(env.op, op::SEARCH_RESULT_DONE);
            assert_eq!(env.result_code, Some(0));
            assert!(
                done.insert(env.msgid, ()).is_none(),
                "two answers to {}",
                env.msgid
            );
        }
    }
    assert_eq!(
        done.keys().copied().collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    assert!(entries.values().all(|&n| n == 1) && entries.len() == 50);
    assert_eq!(shim.counters.requests.load(Ordering::SeqCst), before + 50);
    assert_eq!(shim.counters.max_outstanding.load(Ordering::SeqCst), 4);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_does_not_read_stops_its_upstream_not_the_proxy() {
    let lab = Lab::with(SlapdOptions::default(), |c| {
        c.client_buffer_bytes = 64 * 1024;
    })
    .await;
    // 24 entries of 1 MiB: far more than the socket buffers between slapd,
    // the proxy and the client can hold.
    let mut w = RawConn::connect(&lab.proxy_addr()).await;
    w.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&w.recv().await.unwrap()), Some(0));
    for i in 0..24 {
        w.send_msg(big_add(2 + i, &format!("mib-{i}"), 1 << 20))
            .await;
        assert_eq!(result_code(&w.recv().await.unwrap()), Some(0));
    }

    // A client with a small receive buffer asks for all of it and reads nothing.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    let stream: TcpStream = sock
        .connect(lab.proxy_addr().parse().unwrap())
        .await
        .unwrap();
    let mut slow = RawConn::from_stream(stream);
    slow.send_msg(search(
        1,
        "dc=example,dc=org",
        2,
        "(cn=mib-*)",
        &["description"],
    ))
    .await;

    // The proxy stops reading that upstream connection: slapd's answer piles
    // up in the kernel on the proxy's side of it.
    let slapd_port = lab.slapd.port();
    wait_until("the proxy to stop reading the upstream", 20, || {
        kernel_sockets()
            .iter()
            .any(|s| s.remote_port == slapd_port && s.rx_queue > 256 * 1024)
    })
    .await;

    // Meanwhile the proxy serves everybody else.
    let mut other = RawConn::connect(&lab.proxy_addr()).await;
    round_trip(&mut other, 1).await;

    // The client reads at last and gets every entry, complete.
    let r = slow.recv_until_final(1).await;
    assert_eq!(r.len(), 25);
    assert_eq!(result_code(&r[24]), Some(0));
    for f in &r[..24] {
        assert!(f.len() > 1 << 20, "entry of {} bytes", f.len());
    }
}

/// Out of file descriptors (EMFILE): the listener backs off and keeps
/// going; the clients it could not accept yet are served as soon as
/// descriptors free up. The proxy runs as its own process with a small
/// open-file limit; which of accept() or the upstream connect() fails first
/// depends on how many descriptors it uses at start, so the limit is moved
/// until accept() is the one that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_listener_backs_off_and_recovers() {
    use crate::support::process::*;
    let slapd = tokio::task::spawn_blocking(|| testkit::Slapd::start(SlapdOptions::default()))
        .await
        .unwrap()
        .unwrap();
    for nofile in 40..44 {
        let port = free_port();
        let mut proxy = Running::start_with_nofile(
            &[
                "serve",
                "--listen",
                &format!("ldap://127.0.0.1:{port}"),
                "--upstream",
                &slapd.url(),
            ],
            Some(nofile),
        );
        proxy.wait_for("listening");
        let addr = format!("127.0.0.1:{port}");
        let mut open = Vec::new();
        let mut waiting = None;
        for _ in 0..nofile {
            let mut c = RawConn::connect(&addr).await;
            c.send_msg(search(
                1,
                "dc=example,dc=org",
                0,
                "(objectClass=*)",
                &["dc"],
            ))
            .await;
            // Either the answer, a notice (the upstream connect failed), or
            // the proxy logging that accept() failed while this one waits.
            let mut first = Box::pin(c.recv());
            let outcome = loop {
                tokio::select! {
                    f = &mut first => break Some(f),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {
                        if proxy.saw("accept failed") {
                            break None;
                        }
                    }
                }
            };
            drop(first);
            match outcome {
                Some(Some(f)) if Envelope::response(&f).is_ok_and(|e| e.msgid == 1) => {
                    let rest = c.recv_until_final(1).await;
                    assert_eq!(result_code(rest.last().unwrap_or(&f)), Some(0));
                    open.push(c);
                }
                Some(_) => break, // the upstream connect failed: other limit
                None => {
                    waiting = Some(c);
                    break;
                }
            }
        }
        let Some(mut waiting) = waiting else {
            continue;
        };
        assert!(open.len() > 5, "only {} sessions before EMFILE", open.len());
        // Free descriptors: the listener accepts the waiting client.
        drop(open.pop());
        let r = waiting.recv_until_final(1).await;
        assert_eq!(result_code(r.last().unwrap()), Some(0));
        assert!(proxy.saw("retrying in"));
        assert_eq!(proxy.sigterm_and_wait(), 0);
        return;
    }
    panic!("accept() never ran out of descriptors with limits 40..44");
}
