//! Upstream faults, injected by a TCP shim between the proxy and a real
//! slapd (loopback only): a slow server, a server that accepts and drops
//! connections, a server dying in the middle of an operation. Affected
//! clients get their complete answers or a Notice of Disconnection; the
//! proxy keeps serving once the server is back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::shim::Shim;
use crate::support::*;
use abproxy::config::Config;
use abproxy::ProxyHandle;
use ldap3_proto::proto::LdapResultCode;
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW};

/// slapd, a shim in front of it, the proxy in front of the shim.
async fn shimmed() -> (Lab, Shim, ProxyHandle, String) {
    let lab = Lab::with(SlapdOptions::default(), |_| {}).await;
    let shim = Shim::start(&lab.direct_addr()).await;
    let proxy = ProxyHandle::spawn(Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: shim.url(),
        ..Config::default()
    })
    .await
    .unwrap();
    let addr = proxy.url().trim_start_matches("ldap://").to_string();
    (lab, shim, proxy, addr)
}

fn subtree(msgid: i32) -> ldap3_proto::proto::LdapMsg {
    search(
        msgid,
        "dc=example,dc=org",
        2,
        "(uid=user1*)",
        &["cn", "uid"],
    )
}

#[tokio::test]
async fn a_slow_server_is_waited_for_and_its_answers_arrive_whole() {
    let (lab, shim, _proxy, addr) = shimmed().await;
    let mut direct = RawConn::connect(&lab.direct_addr()).await;
    direct.send_msg(subtree(1)).await;
    let want = direct.recv_until_final(1).await;
    assert!(want.len() > 5);

    let delay = Duration::from_millis(150);
    shim.delay_responses(delay);
    let mut c = RawConn::connect(&addr).await;
    let t = Instant::now();
    c.send_msg(subtree(1)).await;
    let got = c.recv_until_final(1).await;
    assert!(t.elapsed() >= delay * want.len() as u32);
    assert_eq!(got, want, "byte-identical to direct, however slow");
}

#[tokio::test]
async fn a_server_dropping_connections_gives_notices_then_recovers() {
    let (_lab, shim, _proxy, addr) = shimmed().await;
    shim.refuse(true);
    for _ in 0..3 {
        let mut c = RawConn::connect(&addr).await;
        c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
        let frames = c.recv_all().await;
        assert_eq!(frames.len(), 1, "the notice only");
        let msg = assert_notice(&frames[0], LdapResultCode::Unavailable as i64);
        assert!(msg.contains("LDAP server"), "{msg}");
    }
    shim.refuse(false);
    let mut c = RawConn::connect(&addr).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
}

#[tokio::test]
async fn a_server_dying_mid_operation_ends_only_those_sessions() {
    let (_lab, shim, _proxy, addr) = shimmed().await;
    let mut c = RawConn::connect(&addr).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));

    // The search reaches the server, whose answer is held, then it dies.
    shim.stall_responses(true);
    let before = shim.counters.requests.load(Ordering::SeqCst);
    c.send_msg(subtree(2)).await;
    wait_until("the search to reach the server", 10, || {
        shim.counters.requests.load(Ordering::SeqCst) == before + 1
    })
    .await;
    shim.kill_all();
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1, "no partial answer, only the notice");
    assert_notice(&frames[0], LdapResultCode::Unavailable as i64);

    // New sessions get a new upstream connection and are served.
    shim.stall_responses(false);
    let mut c = RawConn::connect(&addr).await;
    c.send_msg(subtree(1)).await;
    let r = c.recv_until_final(1).await;
    assert_eq!(result_code(r.last().unwrap()), Some(0));
}
