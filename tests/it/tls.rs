//! TLS through the proxy against a real slapd with TLS: a throwaway CA made
//! with `openssl` (`testkit::ca`), slapd with its own certificate
//! (ldaps:// and StartTLS), the proxy with another, `ldapsearch -ZZ` and
//! `ldaps://` proxied vs direct, the Rust client over TLS, `require_tls`,
//! StartTLS refusals, upstream TLS (ldaps:// and StartTLS, wrong CA, wrong
//! name), client certificates in the freeze authorisation, certificate
//! reload on SIGHUP, and a freeze with writers on TLS sessions.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::pki::*;
use crate::support::*;
use abproxy::config::Config;
use abproxy::wire::Envelope;
use ldap3::exop::Exop;
use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use ldap3_proto::proto::{LdapExtendedRequest, LdapMsg, LdapOp};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::{SlapdOptions, SlapdTls, OTHER_ADMIN_DN};

const START_TLS: &str = "1.3.6.1.4.1.1466.20037";

/// A rustls client configuration trusting `ca`, with an optional client
/// certificate.
fn client_config(ca: &Path, cert: Option<&(PathBuf, PathBuf)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    Arc::new(match cert {
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// The Rust client over TLS: `ldaps://` URL, or StartTLS on `ldap://`.
async fn ldap3_tls(
    url: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> ldap3::result::Result<ldap3::Ldap> {
    let settings = LdapConnSettings::new()
        .set_config(cfg)
        .set_starttls(url.starts_with("ldap://"))
        .set_conn_timeout(Duration::from_secs(10));
    let (conn, ldap) = LdapConnAsync::with_settings(settings, url).await?;
    ldap3::drive!(conn);
    Ok(ldap)
}

async fn search_users(ldap: &mut ldap3::Ldap, filter: &str) -> Vec<(String, Vec<String>)> {
    let (entries, _) = ldap
        .search(
            "dc=example,dc=org",
            Scope::Subtree,
            filter,
            vec!["uid", "cn"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let mut out: Vec<_> = entries
        .into_iter()
        .map(|e| {
            let e = SearchEntry::construct(e);
            let mut attrs: Vec<String> =
                e.attrs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            attrs.sort();
            (e.dn, attrs)
        })
        .collect();
    out.sort();
    out
}

/// Result code and message of a response frame.
fn outcome(frame: &[u8]) -> (i64, String) {
    use tokio_util::codec::Decoder;
    let code = Envelope::response(frame).unwrap().result_code.unwrap_or(-1);
    let mut buf = bytes::BytesMut::from(frame);
    let msg = match ldap3_proto::LdapCodec::default().decode(&mut buf) {
        Ok(Some(m)) => match m.op {
            LdapOp::BindResponse(r) => r.res.message,
            LdapOp::SearchResultDone(r) | LdapOp::AddResponse(r) => r.message,
            LdapOp::ExtendedResponse(r) => r.res.message,
            other => format!("{other:?}"),
        },
        _ => String::new(),
    };
    (code, msg)
}

/// Whatever the peer sends until it closes (at most 10 s: then panics).
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the proxy closed the connection");
    out
}

fn start_tls(msgid: i32) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: START_TLS.into(),
            value: None,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldapsearch_over_starttls_and_ldaps_equals_direct() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |_| {}).await;
    let ca = pki.ca_file();
    let ldaps_proxy = ldaps_of(&lab);
    let ldaps_direct = lab.slapd.ldaps_url().unwrap();
    for (direct, proxied, tls) in [
        (lab.direct(), lab.proxied(), "-ZZ"),
        (ldaps_direct, ldaps_proxy, "-x"),
    ] {
        let args = |url: &str| -> Vec<String> {
            [
                "-x",
                tls,
                "-H",
                url,
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PW,
                "-b",
                "dc=example,dc=org",
                "-LLL",
                "(uid=user1*)",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let d = args(&direct);
        let p = args(&proxied);
        let d = tool(
            &ca,
            "ldapsearch",
            &d.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        let p = tool(
            &ca,
            "ldapsearch",
            &p.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        assert_eq!(d.code, Some(0), "direct {tls}: {}", d.stderr);
        assert_eq!(p.code, Some(0), "proxied {tls}: {}", p.stderr);
        assert!(d
            .stdout
            .contains("dn: uid=user1,ou=people,dc=example,dc=org"));
        assert_eq!(d.stdout, p.stdout, "{tls}");
    }
    // docs/tls.md's lines, as written, with the test's CA and ports: the same
    // output through the proxy as from slapd's own TLS.
    let run = |ldap: String, ldaps: String| {
        let script = recipe("tls-ldapsearch")
            .replace("/etc/abproxy/tls/ca.pem", ca.to_str().unwrap())
            .replace("ldap://127.0.0.1:3389", &ldap)
            .replace("ldaps://127.0.0.1:3636", &ldaps);
        async move {
            let out = tokio::process::Command::new("sh")
                .args(["-e", "-c", &script])
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{script}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let direct = run(lab.direct(), lab.slapd.ldaps_url().unwrap()).await;
    let proxied = run(lab.proxied(), ldaps_of(&lab)).await;
    assert_eq!(direct.matches("dn: uid=user1,ou=people").count(), 2);
    assert_eq!(direct, proxied);
    // The client really spoke TLS to the proxy: a CA that did not sign the
    // proxy's certificate makes the same command fail.
    let bad = tool(
        &pki.other_ca.ca_file(),
        "ldapsearch",
        &["-x", "-ZZ", "-H", &lab.proxied(), "-b", "", "-s", "base"],
    )
    .await;
    assert_ne!(bad.code, Some(0), "{}", bad.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_over_ldaps_and_starttls() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |_| {}).await;
    let cfg = client_config(&pki.ca_file(), None);
    let mut direct = ldap3_tls(&lab.slapd.ldaps_url().unwrap(), cfg.clone())
        .await
        .unwrap();
    let want = search_users(&mut direct, "(uid=user2*)").await;
    assert_eq!(want.len(), 11, "user2, user20..user29");
    for url in [ldaps_of(&lab), lab.proxied()] {
        let mut ldap = ldap3_tls(&url, cfg.clone()).await.unwrap();
        ldap.simple_bind(ADMIN_DN, ADMIN_PW)
            .await
            .unwrap()
            .success()
            .unwrap();
        assert_eq!(search_users(&mut ldap, "(uid=user2*)").await, want, "{url}");
        let who = ldap.extended(ldap3::exop::WhoAmI).await.unwrap().1;
        assert_eq!(who.rc, 0);
        ldap.unbind().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_refuses_clear_operations_with_confidentiality_required() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |c| c.tls.require_tls = true).await;
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    // A bind and a search in clear: 13, with the proper response types.
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    let f = c.recv().await.unwrap();
    let env = Envelope::response(&f).unwrap();
    assert_eq!(env.op, abproxy::wire::op::BIND_RESPONSE);
    let (code, msg) = outcome(&f);
    assert_eq!(code, 13, "{msg}");
    assert!(msg.contains("requires TLS"), "{msg}");
    c.send_msg(search(2, "dc=example,dc=org", 2, "(uid=user1)", &[]))
        .await;
    let f = c.recv().await.unwrap();
    assert_eq!(
        Envelope::response(&f).unwrap().op,
        abproxy::wire::op::SEARCH_RESULT_DONE
    );
    assert_eq!(outcome(&f).0, 13);
    // The root DSE read is allowed (clients discover StartTLS with it).
    c.send_msg(search(3, "", 0, "(objectClass=*)", &["supportedExtension"]))
        .await;
    let frames = c.recv_until_final(3).await;
    assert_eq!(outcome(frames.last().unwrap()).0, 0);
    assert!(frames.len() == 2, "the root DSE entry, then done");
    // An anonymous bind carries no secret: allowed, so ldapsearch -x (which
    // sends one first) can read the root DSE in clear; nothing else.
    let ca = pki.ca_file();
    let root = tool(
        &ca,
        "ldapsearch",
        &[
            "-x",
            "-H",
            &lab.proxied(),
            "-b",
            "",
            "-s",
            "base",
            "-LLL",
            "supportedExtension",
        ],
    )
    .await;
    assert_eq!(root.code, Some(0), "{root:?}");
    assert!(
        root.stdout
            .contains("supportedExtension: 1.3.6.1.4.1.1466.20037"),
        "{}",
        root.stdout
    );
    let anon = tool(
        &ca,
        "ldapsearch",
        &[
            "-x",
            "-H",
            &lab.proxied(),
            "-b",
            "dc=example,dc=org",
            "-LLL",
            "(uid=user1)",
        ],
    )
    .await;
    assert_eq!(anon.code, Some(13), "{anon:?}");
    // ldap-utils: in clear refused with the message, with -ZZ and ldaps fine.
    let clear = tool(
        &ca,
        "ldapwhoami",
        &["-x", "-H", &lab.proxied(), "-D", ADMIN_DN, "-w", ADMIN_PW],
    )
    .await;
    assert_eq!(clear.code, Some(13), "{clear:?}");
    assert!(
        clear.stderr.contains("Confidentiality required"),
        "{}",
        clear.stderr
    );
    assert!(clear.stderr.contains("requires TLS"), "{}", clear.stderr);
    for args in [
        vec![
            "-x",
            "-ZZ",
            "-H",
            &lab.proxied(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
        ],
        vec!["-x", "-H", &ldaps_of(&lab), "-D", ADMIN_DN, "-w", ADMIN_PW],
    ] {
        let ok = tool(&ca, "ldapwhoami", &args).await;
        assert_eq!(ok.code, Some(0), "{ok:?}");
        assert_eq!(ok.stdout.trim(), format!("dn:{ADMIN_DN}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_outstanding_operations_is_refused_and_the_session_goes_on_in_clear() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |_| {}).await;
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    // A search and StartTLS in one write: the search is outstanding when
    // StartTLS is read.
    let mut both = encode(search(1, "dc=example,dc=org", 2, "(objectClass=*)", &[])).to_vec();
    both.extend_from_slice(&encode(start_tls(2)));
    c.send(&both).await;
    let mut tls_answer = None;
    let mut done = false;
    while tls_answer.is_none() || !done {
        let f = c.recv().await.expect("connection open");
        let env = Envelope::response(&f).unwrap();
        match env.msgid {
            2 => tls_answer = Some(outcome(&f)),
            1 if env.op == abproxy::wire::op::SEARCH_RESULT_DONE => {
                assert_eq!(env.result_code, Some(0));
                done = true;
            }
            1 => {}
            other => panic!("unexpected message {other}"),
        }
    }
    let (code, msg) = tls_answer.unwrap();
    assert_eq!(code, 1, "operationsError: {msg}");
    assert!(msg.contains("outstanding"), "{msg}");
    // Still in clear, still working.
    c.send_msg(bind(3, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));

    // Bytes after StartTLS before its answer: the proxy cannot tell TLS
    // from LDAP there, so the session ends with a protocolError notice.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    let mut both = encode(start_tls(1)).to_vec();
    both.extend_from_slice(&encode(search(2, "", 0, "(objectClass=*)", &[])));
    c.send(&both).await;
    let frames = c.recv_all().await;
    let last = frames.last().expect("a notice");
    let env = Envelope::response(last).unwrap();
    assert_eq!((env.msgid, env.result_code), (0, Some(2)));
    assert!(outcome(last).1.contains("after the StartTLS request"));

    // StartTLS answered, then no TLS from the client: the handshake fails
    // and the connection closes; the same for garbage on ldaps://.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    c.send_msg(start_tls(1)).await;
    let f = c.recv().await.unwrap();
    assert_eq!(outcome(&f).0, 0);
    c.send(b"this is not a TLS ClientHello\r\n").await;
    let rest = read_to_close(&mut c.stream).await;
    assert!(
        rest.first() != Some(&0x30),
        "an LDAP message after a failed handshake"
    );
    let ldaps = ldaps_of(&lab);
    let mut c = RawConn::connect(ldaps.trim_start_matches("ldaps://")).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    let rest = read_to_close(&mut c.stream).await;
    assert!(
        rest.first() != Some(&0x30),
        "LDAP in clear on ldaps:// answered"
    );
    // The proxy still serves TLS clients.
    let out = tool(&pki.ca_file(), "ldapwhoami", &["-x", "-H", &ldaps]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_starttls_is_refused_and_tls_goes_on() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |_| {}).await;
    let cfg = client_config(&pki.ca_file(), None);
    for url in [lab.proxied(), ldaps_of(&lab)] {
        let mut ldap = ldap3_tls(&url, cfg.clone()).await.unwrap();
        let r = ldap
            .extended(Exop {
                name: Some(START_TLS.into()),
                val: None,
            })
            .await
            .unwrap()
            .1;
        assert_eq!(r.rc, 1, "{url}: {r:?}");
        assert!(r.text.contains("already"), "{}", r.text);
        ldap.simple_bind(ADMIN_DN, ADMIN_PW)
            .await
            .unwrap()
            .success()
            .unwrap();
        assert_eq!(search_users(&mut ldap, "(uid=user3)").await.len(), 1);
    }
    // Without a certificate on the proxy, StartTLS stays `unavailable`.
    // slapd without TLS: the proxy with a certificate announces StartTLS in
    // the root DSE and does it.
    let no_tls = Lab::with(SlapdOptions::default(), |c| pki.proxy_tls(c)).await;
    let root = |url: String| async move {
        ldap_tool(
            "ldapsearch",
            &[
                "-x",
                "-H",
                &url,
                "-b",
                "",
                "-s",
                "base",
                "-LLL",
                "supportedExtension",
            ],
            None,
        )
        .await
        .stdout
    };
    assert!(!root(no_tls.direct()).await.contains(START_TLS));
    assert!(root(no_tls.proxied()).await.contains(START_TLS));
    let out = tool(
        &pki.ca_file(),
        "ldapwhoami",
        &["-x", "-ZZ", "-H", &no_tls.proxied()],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let plain = Lab::start().await;
    let out = ldap_tool(
        "ldapsearch",
        &["-x", "-ZZ", "-H", &plain.proxied(), "-b", "", "-s", "base"],
        None,
    )
    .await;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("TLS is not configured on the proxy"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_over_ldaps_and_over_starttls() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    for starttls in [false, true] {
        let slapd_opts = SlapdOptions {
            nosync: true,
            tls: Some(pki.slapd_tls()),
            stats_log: true,
            ..Default::default()
        };
        let lab = Lab::with(slapd_opts, |_| {}).await;
        // The same slapd, reached over TLS by a second proxy.
        let upstream = if starttls {
            lab.direct()
        } else {
            lab.slapd.ldaps_url().unwrap()
        };
        let mut config = Config {
            listen: vec!["ldap://127.0.0.1:0".into()],
            upstream,
            ..Config::default()
        };
        config.tls.upstream_starttls = starttls;
        config.tls.upstream_ca_file = Some(ca.clone());
        let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
        let args = |url: String| {
            vec![
                "-x".to_string(),
                "-H".into(),
                url,
                "-b".into(),
                "dc=example,dc=org".into(),
                "-LLL".into(),
                "(uid=user4*)".into(),
            ]
        };
        let run = |a: Vec<String>| async move {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            ldap_tool("ldapsearch", &refs, None).await
        };
        let d = run(args(lab.direct())).await;
        let p = run(args(proxy.url())).await;
        assert_eq!(p.code, Some(0), "starttls={starttls}: {}", p.stderr);
        assert_eq!(d.stdout, p.stdout);
        // slapd saw TLS from the proxy.
        let log = std::fs::read_to_string(lab.slapd.log_path()).unwrap();
        assert!(log.contains("TLS established"), "starttls={starttls}");
        if starttls {
            assert!(log.contains("EXT oid=1.3.6.1.4.1.1466.20037"));
        }
        proxy.shutdown().await.unwrap();
    }
}

/// A proxy whose upstream TLS check fails: the client gets a Notice of
/// Disconnection (unavailable) saying why.
async fn upstream_notice(lab: &Lab, tweak: impl FnOnce(&mut Config)) -> String {
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.slapd.ldaps_url().unwrap(),
        ..Config::default()
    };
    tweak(&mut config);
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    let mut c = RawConn::connect(proxy.url().trim_start_matches("ldap://")).await;
    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    let frames = c.recv_all().await;
    assert_eq!(frames.len(), 1, "only the notice");
    let env = Envelope::response(&frames[0]).unwrap();
    assert_eq!((env.msgid, env.result_code), (0, Some(52)));
    let msg = outcome(&frames[0]).1;
    proxy.shutdown().await.unwrap();
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_failures_end_the_session_with_a_reason() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |_| {}).await;
    let other = pki.other_ca.ca_file();
    let msg = upstream_notice(&lab, |c| c.tls.upstream_ca_file = Some(other.clone())).await;
    assert!(msg.contains("unknown CA"), "{msg}");
    let msg = upstream_notice(&lab, |c| {
        c.tls.upstream_starttls = true;
        c.upstream = lab.direct();
        c.tls.upstream_ca_file = Some(other.clone());
    })
    .await;
    assert!(msg.contains("unknown CA"), "{msg}");
    let ca = pki.ca_file();
    let msg = upstream_notice(&lab, |c| {
        c.tls.upstream_ca_file = Some(ca.clone());
        c.tls.upstream_server_name = Some("ldap.example.org".into());
    })
    .await;
    assert!(msg.contains("not valid for the server's name"), "{msg}");
    assert!(msg.contains("expected ldap.example.org"), "{msg}");
    assert!(
        msg.contains("the certificate names localhost, 127.0.0.1"),
        "{msg}"
    );
    // With the name check off, the same works.
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.slapd.ldaps_url().unwrap(),
        ..Config::default()
    };
    config.tls.upstream_ca_file = Some(ca.clone());
    config.tls.upstream_server_name = Some("ldap.example.org".into());
    config.tls.upstream_verify_hostname = false;
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    let out = ldap_tool(
        "ldapwhoami",
        &["-x", "-H", &proxy.url(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_subject_can_freeze_without_a_bind() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |c| {
        c.tls.client_ca_file = Some(pki.ca_file());
        c.freeze.allowed_cert_subjects = vec!["cn=backup,o=Example".into()];
    })
    .await;
    let status = || Exop {
        name: Some(abproxy_proto::ALLOW_BACKUP_STATUS_OID.into()),
        val: None,
    };
    let with_cert = client_config(&pki.ca_file(), Some(&pki.client));
    for url in [ldaps_of(&lab), lab.proxied()] {
        let mut ldap = ldap3_tls(&url, with_cert.clone()).await.unwrap();
        let r = ldap.extended(status()).await.unwrap().1;
        assert_eq!(r.rc, 0, "{url}: {}", r.text);
        // Freeze and release by certificate.
        let on = Exop {
            name: Some(abproxy_proto::ALLOW_BACKUP_OID.into()),
            val: Some(abproxy_proto::encode_request(
                &abproxy_proto::AllowBackupRequest::on(),
            )),
        };
        let r = ldap.extended(on).await.unwrap().1;
        assert_eq!(r.rc, 0, "{}", r.text);
        let st = lab.proxy.engine().status(&abproxy::freeze::Requester {
            conn: 0,
            bound_dn: None,
            peer_uid: None,
            cert_subject: Some("cn=backup,o=Example".into()),
        });
        let holder = st.unwrap().freeze.and_then(|f| f.holder);
        assert_eq!(holder.as_deref(), Some("cn=backup,o=Example"));
        let off = Exop {
            name: Some(abproxy_proto::ALLOW_BACKUP_OID.into()),
            val: Some(abproxy_proto::encode_request(
                &abproxy_proto::AllowBackupRequest::off(),
            )),
        };
        assert_eq!(ldap.extended(off).await.unwrap().1.rc, 0);
    }
    // ldap-utils with the client certificate, no password (docs/tls.md's
    // example).
    let env = [
        ("LDAPTLS_CERT", pki.client.0.as_path()),
        ("LDAPTLS_KEY", pki.client.1.as_path()),
    ];
    let out = tool_env(
        &pki.ca_file(),
        &env,
        "ldapexop",
        &[
            "-x",
            "-H",
            &ldaps_of(&lab),
            abproxy_proto::ALLOW_BACKUP_STATUS_OID,
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = tool(
        &pki.ca_file(),
        "ldapexop",
        &[
            "-x",
            "-H",
            &ldaps_of(&lab),
            abproxy_proto::ALLOW_BACKUP_STATUS_OID,
        ],
    )
    .await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("Insufficient access (50)"),
        "{}",
        out.stderr
    );
    // Without a certificate: refused.
    let mut ldap = ldap3_tls(&ldaps_of(&lab), client_config(&pki.ca_file(), None))
        .await
        .unwrap();
    let r = ldap.extended(status()).await.unwrap().1;
    assert_eq!(r.rc, 50, "{}", r.text);
    // A certificate from another CA is refused at the handshake.
    let stranger = pki
        .other_ca
        .issue("stranger", "/O=Example/CN=backup", "DNS:x.example.org", 30)
        .unwrap();
    let r = ldap3_tls(
        &ldaps_of(&lab),
        client_config(&pki.ca_file(), Some(&stranger)),
    )
    .await;
    let refused = match r {
        Err(_) => true,
        Ok(mut l) => l.extended(status()).await.is_err(),
    };
    assert!(refused, "a certificate from an unknown CA was accepted");
}

/// The certificate a new ldaps handshake with `addr` presents.
async fn presented_cert(addr: &str, cfg: Arc<rustls::ClientConfig>) -> Option<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_keeps_sessions() {
    let pki = Pki::new();
    let slapd = tokio::task::spawn_blocking(|| {
        testkit::Slapd::start(SlapdOptions {
            nosync: true,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cert = pki.dir.path().join("live.pem");
    let key = pki.dir.path().join("live.key");
    std::fs::copy(&pki.proxy.0, &cert).unwrap();
    std::fs::copy(&pki.proxy.1, &key).unwrap();
    let file = pki.dir.path().join("abproxy.toml");
    std::fs::write(
        &file,
        format!(
            "listen = [\"ldaps://127.0.0.1:{port}\"]\nupstream = \"{}\"\n\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            slapd.url(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_abproxy"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("ABPROXY_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let wait_line = |needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?}"),
            }
        }
    };
    wait_line("listening");
    let addr = format!("127.0.0.1:{port}");
    let url = format!("ldaps://{addr}");
    let cfg = client_config(&pki.ca_file(), None);
    assert_eq!(
        presented_cert(&addr, cfg.clone()).await,
        Some(pem_der(&pki.proxy.0))
    );

    // Sessions searching continuously over TLS while the certificate changes.
    let stop = tokio_util::sync::CancellationToken::new();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut ldap = ldap3_tls(&url, cfg.clone()).await.unwrap();
        ldap.simple_bind(ADMIN_DN, ADMIN_PW)
            .await
            .unwrap()
            .success()
            .unwrap();
        let stop = stop.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                assert_eq!(search_users(&mut ldap, "(uid=user5)").await.len(), 1);
                done.fetch_add(1, Ordering::Relaxed);
            }
            ldap.unbind().await.unwrap();
        }));
    }
    wait_until("searches over TLS", 20, || {
        done.load(Ordering::Relaxed) > 20
    })
    .await;

    // A new certificate: renamed into place, then SIGHUP.
    let (new_cert, new_key) = pki.ca.server("renewed").unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_line("TLS certificate and key reloaded");
    let renewed = pem_der(&cert);
    assert_ne!(renewed, pem_der(&pki.proxy.0));
    assert_eq!(
        presented_cert(&addr, cfg.clone()).await,
        Some(renewed.clone())
    );
    let before = done.load(Ordering::Relaxed);
    wait_until("searches after the reload", 20, || {
        done.load(Ordering::Relaxed) > before + 20
    })
    .await;

    // A broken certificate: logged, the renewed one stays.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let line = wait_line("TLS reload failed");
    assert!(line.contains("keeping the previous certificate"), "{line}");
    assert_eq!(presented_cert(&addr, cfg.clone()).await, Some(renewed));

    stop.cancel();
    for t in tasks {
        t.await.expect("no session saw an error");
    }
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_with_writers_on_tls_sessions_keeps_every_acknowledged_write_once() {
    const WRITERS: usize = 8;
    let pki = Pki::new();
    let lab = tls_lab(&pki, |c| c.freeze.allowed = vec![ADMIN_DN.into()]).await;
    let cfg = client_config(&pki.ca_file(), None);
    let stop = tokio_util::sync::CancellationToken::new();
    let acked_total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        // Half over ldaps://, half over StartTLS.
        let url = if w % 2 == 0 {
            ldaps_of(&lab)
        } else {
            lab.proxied()
        };
        let mut ldap = ldap3_tls(&url, cfg.clone()).await.unwrap();
        ldap.simple_bind(OTHER_ADMIN_DN, ADMIN_PW)
            .await
            .unwrap()
            .success()
            .unwrap();
        let stop = stop.clone();
        let acked_total = acked_total.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let dn = format!("cn=t{w}-{n},dc=other,dc=org");
                let cn = format!("t{w}-{n}");
                let r = ldap
                    .add(
                        &dn,
                        vec![
                            ("objectClass", ["device"].into()),
                            ("cn", [cn.as_str()].into()),
                        ],
                    )
                    .await
                    .unwrap();
                assert_eq!(r.rc, 0, "writer {w} write {n}: {}", r.text);
                acked.push(n);
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            acked
        }));
    }
    wait_until("writes", 30, || {
        acked_total.load(Ordering::Relaxed) >= 2 * WRITERS as u64
    })
    .await;
    let target = abproxy::operator::Target {
        url: lab.proxied(),
        bind_dn: Some(ADMIN_DN.into()),
        password: Some(abproxy::operator::Password::new(ADMIN_PW)),
    };
    let mut op = abproxy::operator::Session::connect(&target).await.unwrap();
    op.on(&abproxy::operator::FreezeRequest::default())
        .await
        .unwrap();
    let engine = lab.proxy.engine();
    let who = abproxy::freeze::Requester {
        conn: 0,
        bound_dn: Some(ADMIN_DN.into()),
        peer_uid: None,
        cert_subject: None,
    };
    let queued = || engine.status(&who).unwrap().queued_requests;
    wait_until("every writer held", 30, || queued() == WRITERS as u64).await;
    let first = lab.slapd.slapcat("dc=other,dc=org").unwrap();
    let acked_frozen = acked_total.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        acked_total.load(Ordering::Relaxed),
        acked_frozen,
        "a write was acknowledged while frozen"
    );
    assert!(
        first == lab.slapd.slapcat("dc=other,dc=org").unwrap(),
        "the database changed while frozen"
    );
    op.off().await.unwrap();
    wait_until("writes after OFF", 30, || {
        acked_total.load(Ordering::Relaxed) >= acked_frozen + 2 * WRITERS as u64
    })
    .await;
    stop.cancel();
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("no writer saw an error"));
    }
    let dump = lab.slapd.slapcat("dc=other,dc=org").unwrap();
    let mut seen = std::collections::HashMap::new();
    for entry in dump.split("\n\n") {
        if let Some(dn) = entry.lines().find_map(|l| l.strip_prefix("dn: cn=t")) {
            *seen.entry(dn.to_string()).or_insert(0) += 1;
        }
    }
    let mut total = 0;
    for (w, ns) in acked.iter().enumerate() {
        for n in ns {
            let dn = format!("{w}-{n},dc=other,dc=org");
            assert_eq!(
                seen.get(&dn),
                Some(&1),
                "acknowledged t{dn} not there exactly once"
            );
            total += 1;
        }
    }
    assert_eq!(
        total,
        seen.len(),
        "no write there that was not acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_is_refused_when_the_proxy_presents_its_own_certificate_upstream() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |_| {}).await;
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.slapd.ldaps_url().unwrap(),
        ..Config::default()
    };
    config.tls.upstream_ca_file = Some(pki.ca_file());
    config.tls.upstream_cert_file = Some(pki.client.0.clone());
    config.tls.upstream_key_file = Some(pki.client.1.clone());
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    // SASL EXTERNAL would authenticate the proxy's certificate at slapd,
    // not the client: refused by the proxy, never forwarded (before, slapd
    // answered whoami with dn:cn=backup,o=example for any client).
    // (ldapwhoami -Y EXTERNAL refuses to try it without TLS of its own.)
    let whoami = |url: String| async move {
        let (conn, mut ldap) = LdapConnAsync::new(&url).await.unwrap();
        ldap3::drive!(conn);
        let bind = ldap.sasl_external_bind().await.unwrap();
        if bind.rc != 0 {
            return Err((bind.rc, bind.text));
        }
        let r = ldap.extended(ldap3::exop::WhoAmI).await.unwrap();
        let who: ldap3::exop::WhoAmIResp = r.0.parse();
        Ok(who.authzid)
    };
    let refused = whoami(proxy.url()).await.unwrap_err();
    assert_eq!(refused.0, 7, "authMethodNotSupported: {refused:?}");
    assert!(
        refused.1.contains("abproxy refuses SASL EXTERNAL"),
        "{refused:?}"
    );
    // Through a proxy without a client certificate upstream the bind is
    // forwarded, and slapd has no certificate to authenticate.
    let plain = whoami(lab.proxied()).await.unwrap_err();
    assert!(!plain.1.contains("abproxy"), "{plain:?}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_expired_certificate_is_named() {
    let pki = Pki::new();
    // Valid for 0 days: notAfter is the time of issue.
    let (cert, key) = pki
        .ca
        .issue("expired", "/CN=localhost", "DNS:localhost,IP:127.0.0.1", 0)
        .unwrap();
    let opts = SlapdOptions {
        tls: Some(SlapdTls {
            cert_file: cert,
            key_file: key,
            ca_file: pki.ca_file(),
        }),
        ..Default::default()
    };
    let lab = Lab::with(opts, |_| {}).await;
    // notAfter has whole seconds: one more second and it is in the past.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ca = pki.ca_file();
    let msg = upstream_notice(&lab, |c| c.tls.upstream_ca_file = Some(ca)).await;
    assert!(msg.contains("certificate expired"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificate_files_are_reloaded_with_reload_check_secs() {
    let pki = Pki::new();
    let cert = pki.dir.path().join("watched.pem");
    let key = pki.dir.path().join("watched.key");
    std::fs::copy(&pki.proxy.0, &cert).unwrap();
    std::fs::copy(&pki.proxy.1, &key).unwrap();
    let lab = Lab::with(SlapdOptions::default(), |c| {
        c.listen = vec!["ldaps://127.0.0.1:0".into()];
        c.tls.cert_file = Some(cert.clone());
        c.tls.key_file = Some(key.clone());
        c.tls.reload_check_secs = 1;
    })
    .await;
    let url = lab.proxied();
    let addr = url.trim_start_matches("ldaps://").to_string();
    let cfg = client_config(&pki.ca_file(), None);
    assert_eq!(
        presented_cert(&addr, cfg.clone()).await,
        Some(pem_der(&pki.proxy.0))
    );
    let mut session = ldap3_tls(&url, cfg.clone()).await.unwrap();
    session
        .simple_bind(ADMIN_DN, ADMIN_PW)
        .await
        .unwrap()
        .success()
        .unwrap();
    let (new_cert, new_key) = pki.ca.server("renewed").unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    let renewed = pem_der(&cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while presented_cert(&addr, cfg.clone()).await != Some(renewed.clone()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the changed files were not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The session opened before goes on.
    assert_eq!(search_users(&mut session, "(uid=user6)").await.len(), 1);
}
