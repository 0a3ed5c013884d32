//! Byte-level behaviour of the proxy against a real slapd: responses are
//! byte-identical to direct ones, bad input ends only the offending session
//! with a Notice of Disconnection, and upstream failures reach the client.

use std::time::Duration;

use crate::support::*;
use abproxy::wire::envelope::oid;
use abproxy::wire::{op, Envelope};
use bytes::Bytes;
use ldap3_proto::proto::{LdapExtendedRequest, LdapMsg, LdapOp};
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW};
use tokio::io::AsyncWriteExt;

fn extended(msgid: i32, name: &str, value: Option<Vec<u8>>) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: name.into(),
            value,
        }),
    )
}

/// A mix of requests whose answers do not depend on time or connection.
fn script() -> Vec<LdapMsg> {
    let mut v = vec![
        bind(1, ADMIN_DN, ADMIN_PW),
        search(
            2,
            "dc=example,dc=org",
            2,
            "(uid=user1*)",
            &["cn", "uid", "mail"],
        ),
        search(
            3,
            "ou=people,dc=example,dc=org",
            1,
            "(objectClass=*)",
            &["1.1"],
        ),
        search(
            4,
            "",
            0,
            "(objectClass=*)",
            &["namingContexts", "supportedControl"],
        ),
        search(5, "dc=nowhere", 2, "(objectClass=*)", &[]),
        extended(6, "1.3.6.1.4.1.4203.1.11.3", None),
        extended(7, "1.2.3.4.5.6", Some(b"x".to_vec())),
        bind(8, &testkit::user_dn(3), "wrong"),
        LdapMsg::new(
            9,
            LdapOp::CompareRequest(ldap3_proto::proto::LdapCompareRequest {
                dn: testkit::user_dn(2),
                atype: "uid".into(),
                val: b"user2".to_vec(),
            }),
        ),
    ];
    // A search with a critical paged-results control (size 5, empty cookie).
    let mut paged = search(10, "ou=people,dc=example,dc=org", 1, "(uid=*)", &["uid"]);
    paged
        .ctrl
        .push(ldap3_proto::control::LdapControl::SimplePagedResults {
            size: 5,
            cookie: Vec::new(),
        });
    v.push(paged);
    v
}

async fn run_script(addr: &str, msgs: &[LdapMsg]) -> Vec<Bytes> {
    let mut c = RawConn::connect(addr).await;
    let mut out = Vec::new();
    for m in msgs {
        let id = m.msgid;
        c.send_msg(m.clone()).await;
        out.extend(c.recv_until_final(id).await);
    }
    out
}

#[tokio::test]
async fn responses_are_byte_identical_to_direct() {
    let lab = Lab::start().await;
    let msgs = script();
    let direct = run_script(&lab.direct_addr(), &msgs).await;
    let proxied = run_script(&lab.proxy_addr(), &msgs).await;
    assert!(direct.len() > 20, "the script returns real data");
    assert_eq!(direct.len(), proxied.len());
    for (i, (d, p)) in direct.iter().zip(&proxied).enumerate() {
        assert_eq!(d, p, "response frame {i} differs");
    }
    // After a bind, the other requests pipelined in one write (a bind would
    // abandon what is outstanding, so none is pipelined): the same frames.
    let pipelined = |addr: String| {
        let msgs = msgs.clone();
        async move {
            let mut c = RawConn::connect(&addr).await;
            c.send_msg(msgs[0].clone()).await;
            assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
            let rest: Vec<_> = msgs[1..]
                .iter()
                .filter(|m| !matches!(m.op, LdapOp::BindRequest(_)))
                .cloned()
                .collect();
            let mut all = Vec::new();
            for m in &rest {
                all.extend_from_slice(&encode(m.clone()));
            }
            c.send(&all).await;
            let mut got = Vec::new();
            let mut finals = 0;
            while finals < rest.len() {
                let f = c.recv().await.unwrap();
                if op::is_final_response(Envelope::response(&f).unwrap().op) {
                    finals += 1;
                }
                got.push(f);
            }
            got.sort();
            got
        }
    };
    let want = pipelined(lab.direct_addr()).await;
    let got = pipelined(lab.proxy_addr()).await;
    assert!(want.len() > 20);
    assert_eq!(want, got);
}

#[tokio::test]
async fn large_search_is_streamed_identically() {
    let lab = Lab::with(
        SlapdOptions {
            users: 10_000,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let msgs = [
        bind(1, ADMIN_DN, ADMIN_PW),
        search(
            2,
            "ou=people,dc=example,dc=org",
            1,
            "(objectClass=person)",
            &["uid", "cn"],
        ),
    ];
    let direct = run_script(&lab.direct_addr(), &msgs).await;
    let proxied = run_script(&lab.proxy_addr(), &msgs).await;
    // bind response + 10,000 entries + done
    assert_eq!(direct.len(), 10_002);
    assert!(
        direct == proxied,
        "10k-entry search differs through the proxy"
    );
}

#[tokio::test]
async fn garbage_gets_protocol_error_notice_and_others_go_on() {
    let lab = Lab::start().await;
    let mut good = RawConn::connect(&lab.proxy_addr()).await;
    good.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&good.recv().await.unwrap()), Some(0));

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not BER", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        (
            "indefinite length",
            vec![0x30, 0x80, 0x02, 0x01, 0x01, 0x42, 0x00, 0, 0],
        ),
        ("5 length octets", vec![0x30, 0x85, 0, 0, 0, 0, 5]),
        // messageID -1
        (
            "negative id",
            vec![0x30, 0x05, 0x02, 0x01, 0xff, 0x42, 0x00],
        ),
        // search whose base is an INTEGER
        (
            "bad search",
            vec![0x30, 0x08, 0x02, 0x01, 0x01, 0x63, 0x03, 0x02, 0x01, 0x00],
        ),
    ];
    for (what, bytes) in cases {
        let mut bad = RawConn::connect(&lab.proxy_addr()).await;
        bad.send(&bytes).await;
        let frames = bad.recv_all().await;
        assert_eq!(frames.len(), 1, "{what}: exactly one notice, then close");
        let msg = assert_notice(&frames[0], 2);
        assert!(msg.starts_with("abproxy: "), "{what}: {msg}");
    }
    // The healthy session and new sessions are unaffected.
    good.send_msg(search(
        2,
        "dc=example,dc=org",
        0,
        "(objectClass=*)",
        &["dc"],
    ))
    .await;
    let r = good.recv_until_final(2).await;
    assert_eq!(r.len(), 2);
    assert_eq!(result_code(&r[1]), Some(0));
    let again = run_script(&lab.proxy_addr(), &[bind(1, ADMIN_DN, ADMIN_PW)]).await;
    assert_eq!(result_code(&again[0]), Some(0));
}

#[tokio::test]
async fn oversized_pdu_is_refused_before_it_is_read() {
    let lab = Lab::with(SlapdOptions::default(), |c| c.max_pdu_bytes = 4096).await;
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    // Declares 1 MiB and sends only the header: refused at once, not buffered.
    c.send(&[0x30, 0x83, 0x10, 0x00, 0x00]).await;
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1);
    let msg = assert_notice(&frames[0], 2);
    assert!(msg.contains("maximum PDU size of 4096"), "{msg}");

    // A real request just over the limit, and one under it.
    let mut big = search(1, "dc=example,dc=org", 2, "(objectClass=*)", &[]);
    if let LdapOp::SearchRequest(s) = &mut big.op {
        s.attrs = (0..500).map(|i| format!("attr{i}")).collect();
    }
    let bytes = encode(big);
    assert!(bytes.len() > 4096);
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send(&bytes).await;
    assert_notice(&c.recv().await.unwrap(), 2);
    let ok = run_script(
        &lab.proxy_addr(),
        &[search(
            1,
            "dc=example,dc=org",
            0,
            "(objectClass=*)",
            &["dc"],
        )],
    )
    .await;
    assert_eq!(result_code(ok.last().unwrap()), Some(0));
}

#[tokio::test]
async fn truncated_pdu_then_close_leaves_the_proxy_serving() {
    let lab = Lab::start().await;
    for cut in [1, 2, 5, 13] {
        let mut c = RawConn::connect(&lab.proxy_addr()).await;
        let b = encode(bind(1, ADMIN_DN, ADMIN_PW));
        c.send(&b[..cut]).await;
        c.stream.shutdown().await.unwrap();
        assert!(c.recv_all().await.is_empty(), "no answer to half a PDU");
    }
    let r = run_script(&lab.proxy_addr(), &[bind(1, ADMIN_DN, ADMIN_PW)]).await;
    assert_eq!(result_code(&r[0]), Some(0));
    // Nothing is left open towards slapd.
    wait_upstream_conns(lab.slapd.port(), 0).await;
}

#[tokio::test]
async fn start_tls_is_answered_by_the_proxy() {
    let lab = Lab::start().await;
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(extended(1, "1.3.6.1.4.1.1466.20037", None))
        .await;
    let f = c.recv().await.unwrap();
    let env = Envelope::response(&f).unwrap();
    assert_eq!(
        (env.msgid, env.op, env.result_code),
        (1, op::EXTENDED_RESPONSE, Some(52))
    );
    assert_eq!(env.oid_bytes(&f), Some(oid::START_TLS));
    assert!(diagnostic(&f).contains("TLS is not configured on the proxy"));
    // The session goes on in clear.
    c.send_msg(bind(2, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
}

/// Waits (bounded) until the number of connections to slapd is `want`.
async fn wait_upstream_conns(port: u16, want: usize) {
    let count = || {
        kernel_sockets()
            .iter()
            .filter(|s| s.established && s.remote_port == port)
            .count()
    };
    wait_until(&format!("{want} connections to slapd"), 10, || {
        count() == want
    })
    .await;
}

#[tokio::test]
async fn one_upstream_connection_per_client_closed_with_it() {
    let lab = Lab::start().await;
    let port = lab.slapd.port();
    wait_upstream_conns(port, 0).await;
    let mut conns = Vec::new();
    for i in 0..5 {
        let mut c = RawConn::connect(&lab.proxy_addr()).await;
        c.send_msg(bind(1, &testkit::user_dn(i + 1), &testkit::user_pw(i + 1)))
            .await;
        assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
        conns.push(c);
    }
    wait_upstream_conns(port, 5).await;
    // Client closes -> its upstream connection closes.
    drop(conns.pop());
    wait_upstream_conns(port, 4).await;
    // Unbind -> closed too.
    let mut c = conns.pop().unwrap();
    c.send_msg(LdapMsg::new(2, LdapOp::UnbindRequest)).await;
    assert!(c.recv_all().await.is_empty());
    wait_upstream_conns(port, 3).await;
    drop(conns);
    wait_upstream_conns(port, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_loss_gives_unavailable_notice_and_recovers() {
    let mut lab = Lab::start().await;
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));

    lab.slapd.kill();
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1, "a notice, then close");
    assert!(assert_notice(&frames[0], 52).contains("closed the connection"));

    // While slapd is down, a new client is told why and closed.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1);
    assert!(assert_notice(&frames[0], 52).contains("cannot reach the LDAP server"));

    // Back up: the proxy serves again without a restart.
    tokio::task::block_in_place(|| lab.slapd.restart()).unwrap();
    let r = run_script(&lab.proxy_addr(), &[bind(1, ADMIN_DN, ADMIN_PW)]).await;
    assert_eq!(result_code(&r[0]), Some(0));
}

#[tokio::test]
async fn abandon_of_a_running_search() {
    let lab = Lab::with(
        SlapdOptions {
            users: 3000,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    c.send_msg(search(2, "dc=example,dc=org", 2, "(objectClass=*)", &["*"]))
        .await;
    let first = c.recv().await.unwrap();
    assert_eq!(
        Envelope::response(&first).unwrap().op,
        op::SEARCH_RESULT_ENTRY
    );
    c.send_msg(LdapMsg::new(3, LdapOp::AbandonRequest(2))).await;
    c.send_msg(extended(4, "1.3.6.1.4.1.4203.1.11.3", None))
        .await;
    // Entries already on their way may still arrive; no SearchResultDone for
    // an abandoned search; the whoami answer arrives.
    let mut entries = 1;
    loop {
        let f = c.recv().await.expect("session must survive the abandon");
        let env = Envelope::response(&f).unwrap();
        match env.op {
            op::SEARCH_RESULT_ENTRY => entries += 1,
            op::EXTENDED_RESPONSE => {
                assert_eq!(env.msgid, 4);
                break;
            }
            // slapd may have finished before it read the abandon.
            op::SEARCH_RESULT_DONE if env.msgid == 2 => {}
            other => panic!("unexpected {} for {}", op::name(other), env.msgid),
        }
    }
    assert!(entries >= 1);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_operations() {
    let Lab { slapd, proxy, .. } = Lab::with(
        SlapdOptions {
            users: 3000,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let addr = proxy.url().trim_start_matches("ldap://").to_string();
    let mut c = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
    c.send_msg(search(
        2,
        "dc=example,dc=org",
        2,
        "(objectClass=person)",
        &["uid"],
    ))
    .await;
    let first = c.recv().await.unwrap();
    assert_eq!(
        Envelope::response(&first).unwrap().op,
        op::SEARCH_RESULT_ENTRY
    );
    // Shut down while the search is streaming (client reads nothing yet).
    let stopping = tokio::spawn(proxy.shutdown());
    let mut entries = 1;
    let rest = c.recv_all().await;
    let mut iter = rest.iter();
    for f in iter.by_ref() {
        let env = Envelope::response(f).unwrap();
        if env.op == op::SEARCH_RESULT_ENTRY {
            entries += 1;
        } else {
            assert_eq!(
                (env.msgid, env.op, env.result_code),
                (2, op::SEARCH_RESULT_DONE, Some(0))
            );
            break;
        }
    }
    assert_eq!(entries, 3000, "the in-flight search completed");
    let tail: Vec<_> = iter.collect();
    assert_eq!(tail.len(), 1, "then one notice");
    assert!(assert_notice(tail[0], 52).contains("shutting down"));
    stopping.await.unwrap().unwrap();
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    drop(slapd);
}

/// With an ldapi upstream, slapd would authenticate a SASL EXTERNAL bind as
/// the proxy's own uid (root here): the proxy refuses it itself
/// (authMethodNotSupported), and the session goes on. Non-LDAP bytes with no
/// SASL layer negotiated are a protocol error (the quiet end after a
/// negotiated layer is `fuzzing::session` `a_sasl_security_layer_ends_the_session_quietly`).
#[tokio::test]
async fn sasl_external_over_an_ldapi_upstream_is_refused_and_garbage_is_a_protocol_error() {
    let dir = tempfile::Builder::new()
        .prefix("abp")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("ldapi");
    let slapd = tokio::task::spawn_blocking(|| testkit::Slapd::start(SlapdOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let config = abproxy::Config {
        listen: vec![format!("ldapi://{}", sock.display())],
        upstream: slapd.ldapi_url(),
        ..Default::default()
    };
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    let sasl_external = LdapMsg::new(
        1,
        LdapOp::BindRequest(ldap3_proto::proto::LdapBindRequest {
            version: 3,
            dn: String::new(),
            cred: ldap3_proto::proto::LdapBindCred::SASL(ldap3_proto::proto::SaslCredentials {
                mechanism: "EXTERNAL".into(),
                credentials: Vec::new(),
            }),
        }),
    );
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    use tokio::io::AsyncReadExt;
    w.write_all(&encode(sasl_external)).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = r.read(&mut buf).await.unwrap();
    assert_eq!(result_code(&buf[..n]), Some(7), "authMethodNotSupported");
    assert!(
        diagnostic(&buf[..n]).contains("abproxy refuses SASL EXTERNAL"),
        "{}",
        diagnostic(&buf[..n])
    );
    // The session goes on, anonymous as before at the server.
    w.write_all(&encode(search(
        2,
        "",
        0,
        "(objectClass=*)",
        &["namingContexts"],
    )))
    .await
    .unwrap();
    let mut got = bytes::BytesMut::new();
    let mut codec = abproxy::wire::FrameCodec::default();
    'done: loop {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "the session goes on");
        got.extend_from_slice(&buf[..n]);
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut codec, &mut got).unwrap() {
            if Envelope::response(&f).unwrap().op == op::SEARCH_RESULT_DONE {
                assert_eq!(result_code(&f), Some(0));
                break 'done;
            }
        }
    }
    // What a SASL security layer looks like: a 4-octet length, then a token.
    w.write_all(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
        .await
        .expect("the session ends")
        .unwrap();
    assert_notice(&rest, 2);
    proxy.shutdown().await.unwrap();
}

/// RFC 4511 reserves messageID 0 for unsolicited notifications, but slapd
/// answers a request that uses it, and so does the proxy: the answer is the
/// same as direct, and the request leaves the in-flight table (it used to
/// stay there, and a write sent that way made every freeze drain time out).
/// Found by the session fuzz target.
#[tokio::test]
async fn request_with_message_id_zero_is_answered_and_not_left_in_flight() {
    let lab = Lab::with(SlapdOptions::default(), |c| {
        c.freeze.allowed = vec![ADMIN_DN.into()];
    })
    .await;
    let msgs = [
        bind(1, ADMIN_DN, ADMIN_PW),
        add(0, "cn=zero,dc=example,dc=org", "zero"),
    ];
    let mut answers = Vec::new();
    for addr in [lab.direct_addr(), lab.proxy_addr()] {
        let mut c = RawConn::connect(&addr).await;
        for m in &msgs {
            c.send_msg(m.clone()).await;
        }
        c.recv_until_final(1).await;
        let resp = c.recv().await.expect("an answer to messageID 0");
        let env = Envelope::response(&resp).unwrap();
        assert_eq!((env.msgid, env.op), (0, op::ADD_RESPONSE));
        answers.push(env.result_code);
        if addr == lab.proxy_addr() {
            let who = abproxy::freeze::Requester {
                conn: 0,
                bound_dn: Some(ADMIN_DN.into()),
                peer_uid: None,
                cert_subject: None,
            };
            let status = lab.proxy.engine().status(&who).unwrap();
            assert_eq!(
                status.in_flight, 0,
                "the answered request is still in flight"
            );
        }
    }
    // Added directly, then already there through the proxy.
    assert_eq!(answers, [Some(0), Some(68)]);
}
