//! `tls.upstream_mirror`: each session's upstream connection as secure as
//! its client's, so that slapd's own confidentiality rules decide through
//! the proxy as they decide direct. slapd with TLS, `olcSecurity: tls=1` on
//! `dc=example,dc=org` and an ACL with `ssf=128` on `dc=other,dc=org`; the
//! same ldap-utils operations in clear, with StartTLS (`-ZZ`) and over
//! `ldaps://`, direct and through the proxy: the same result codes and
//! output; slapd's log shows TLS on exactly the proxied sessions whose
//! clients used TLS; a failed upstream handshake ends the session with a
//! notice, never in clear; a server that refuses StartTLS refuses it to
//! the client as it would direct.

use std::path::Path;

use crate::support::pki::*;
use crate::support::*;
use abproxy::config::Config;
use ldap3_proto::proto::{LdapExtendedRequest, LdapMsg, LdapOp};
use testkit::{SlapdOptions, OTHER_SUFFIX};

const START_TLS: &str = "1.3.6.1.4.1.1466.20037";

/// The mirror settings: TLS to slapd checked against the test CA; ldaps
/// clients' sessions to slapd's ldaps:// port when `ldaps` is given.
fn mirror(c: &mut Config, ca: &Path, ldaps: Option<String>) {
    c.tls.upstream_mirror = true;
    c.tls.upstream_ca_file = Some(ca.to_path_buf());
    c.tls.upstream_ldaps = ldaps;
}

/// The cn=config DN of the database of `suffix`.
async fn database_of(lab: &Lab, suffix: &str) -> String {
    let out = ldapi_search(
        &lab.slapd.ldapi_url(),
        &["-b", "cn=config", &format!("(olcSuffix={suffix})"), "1.1"],
    )
    .await;
    out.lines()
        .find_map(|l| l.strip_prefix("dn: "))
        .unwrap_or_else(|| panic!("no database for {suffix}: {out}"))
        .to_string()
}

/// slapd's confidentiality rules: TLS required on dc=example,dc=org (every
/// operation, binds included), and `description` under dc=other,dc=org
/// readable only at ssf 128 or more.
async fn require_confidentiality(lab: &Lab) {
    let example = database_of(lab, "dc=example,dc=org").await;
    let other = database_of(lab, OTHER_SUFFIX).await;
    let ldif = format!(
        "dn: {example}\n\
         changetype: modify\n\
         add: olcSecurity\n\
         olcSecurity: tls=1\n\
         \n\
         dn: {other}\n\
         changetype: modify\n\
         add: olcAccess\n\
         olcAccess: {{0}}to attrs=description by ssf=128 read by * none\n"
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// The same ldap-utils tool with `-x` and the transport's options.
async fn run(ca: &Path, tool_name: &str, url: &str, tls: &str, args: &[&str]) -> ToolOutput {
    let mut all = vec!["-x", "-H", url];
    if !tls.is_empty() {
        all.push(tls);
    }
    all.extend_from_slice(args);
    tool(ca, tool_name, &all).await
}

/// `TLS established` lines in slapd's log.
fn tls_lines(lab: &Lab) -> usize {
    std::fs::read_to_string(lab.slapd.log_path())
        .unwrap_or_default()
        .matches("TLS established")
        .count()
}

/// slapd with TLS (its own certificate), stats logged.
async fn tls_slapd(pki: &Pki) -> testkit::Slapd {
    start_slapd(SlapdOptions {
        nosync: true,
        tls: Some(pki.slapd_tls()),
        stats_log: true,
        ..Default::default()
    })
    .await
}

/// The README's drop-in configuration as written, with the test's files
/// and ports: the proxy presents slapd's own certificate.
fn readme_config(pki: &Pki, slapd: &testkit::Slapd) -> Config {
    let text = recipe("tls-drop-in")
        .replace("0.0.0.0:389", "127.0.0.1:0")
        .replace("0.0.0.0:636", "127.0.0.1:0")
        .replace("ldap://127.0.0.1:1389", &slapd.url())
        .replace("ldaps://127.0.0.1:1636", &slapd.ldaps_url().unwrap())
        .replace("/etc/ldap/tls/cert.pem", pki.slapd.0.to_str().unwrap())
        .replace("/etc/ldap/tls/key.pem", pki.slapd.1.to_str().unwrap())
        .replace("/etc/ldap/tls/ca.pem", pki.ca_file().to_str().unwrap())
        .replace("ldap.example.org", "localhost");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A lab of `slapd` and a proxy spawned with `config`.
async fn lab_of(slapd: testkit::Slapd, config: Config) -> Lab {
    let proxy = abproxy::ProxyHandle::spawn(config).await.expect("proxy");
    Lab {
        slapd,
        proxy,
        recorder: None,
    }
}

/// slapd's log lines of connections accepted on `url`'s port.
fn accepted_on(lab: &Lab, url: &str) -> usize {
    let port = url.rsplit(':').next().unwrap().trim_end_matches('/');
    std::fs::read_to_string(lab.slapd.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" ACCEPT from ") && l.contains(&format!(":{port})")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slapds_confidentiality_rules_decide_through_the_mirror_as_direct() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    let slapd = tls_slapd(&pki).await;
    let config = readme_config(&pki, &slapd);
    let lab = lab_of(slapd, config).await;
    require_confidentiality(&lab).await;
    let user = testkit::user_dn(1);
    let user_pw = testkit::user_pw(1);
    let other_user = testkit::other_user_dn(1);
    let proxied_ldaps = ldaps_of(&lab);
    let direct_ldaps = lab.slapd.ldaps_url().unwrap();
    let mut seen = Vec::new();
    for (transport, tls, direct, proxied) in [
        ("clear", "", lab.direct(), lab.proxied()),
        ("StartTLS", "-ZZ", lab.direct(), lab.proxied()),
        ("ldaps", "", direct_ldaps.clone(), proxied_ldaps.clone()),
    ] {
        let ops: Vec<(&str, Vec<&str>)> = vec![
            // A bind into the database that requires TLS.
            ("ldapwhoami", vec!["-D", &user, "-w", &user_pw]),
            // Its entries, anonymously.
            (
                "ldapsearch",
                vec!["-LLL", "-b", "dc=example,dc=org", "(uid=user2)", "cn"],
            ),
            // An attribute the ACL gives at ssf 128 only.
            (
                "ldapsearch",
                vec!["-LLL", "-b", &other_user, "-s", "base", "description", "cn"],
            ),
        ];
        for (tool_name, args) in &ops {
            let d = run(&ca, tool_name, &direct, tls, args).await;
            let p = run(&ca, tool_name, &proxied, tls, args).await;
            assert_eq!(
                (d.code, &d.stdout),
                (p.code, &p.stdout),
                "{transport} {tool_name} {args:?}: direct {d:?} proxied {p:?}"
            );
            seen.push((transport, *tool_name, d.code, d.stdout));
        }
    }
    // The rules did decide: refused in clear, allowed over TLS.
    let of = |t: &str, i: usize| seen.iter().filter(|s| s.0 == t).nth(i).unwrap();
    assert_eq!(of("clear", 0).2, Some(13), "{seen:?}");
    assert_eq!(of("clear", 1).2, Some(13), "{seen:?}");
    assert!(!of("clear", 2).3.contains("description:"), "{seen:?}");
    for t in ["StartTLS", "ldaps"] {
        assert_eq!(of(t, 0).2, Some(0), "{seen:?}");
        assert!(of(t, 1).3.contains("cn: "), "{seen:?}");
        assert!(of(t, 2).3.contains("description: initial"), "{seen:?}");
    }

    // slapd's log: proxied sessions of TLS clients are TLS at slapd, those
    // of clear clients are not; ldaps:// clients' go to its ldaps:// port.
    let before = tls_lines(&lab);
    let ldaps_before = accepted_on(&lab, &direct_ldaps);
    for tls in ["", "", "-ZZ"] {
        let out = run(&ca, "ldapwhoami", &lab.proxied(), tls, &[]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
    }
    let out = run(&ca, "ldapwhoami", &proxied_ldaps, "", &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_until("slapd logs two TLS sessions", 10, || {
        tls_lines(&lab) >= before + 2
    })
    .await;
    assert_eq!(accepted_on(&lab, &direct_ldaps), ldaps_before + 1);
    // Settled: a clear one more adds none.
    let out = run(&ca, "ldapwhoami", &lab.proxied(), "", &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(tls_lines(&lab), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstream_ldaps_an_ldaps_client_gets_starttls_upstream() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    let slapd = tls_slapd(&pki).await;
    let mut config = readme_config(&pki, &slapd);
    config.tls.upstream_ldaps = None;
    let lab = lab_of(slapd, config).await;
    require_confidentiality(&lab).await;
    let ldaps = lab.slapd.ldaps_url().unwrap();
    let (before, ldaps_before) = (tls_lines(&lab), accepted_on(&lab, &ldaps));
    let user = testkit::user_dn(1);
    let out = run(
        &ca,
        "ldapwhoami",
        &ldaps_of(&lab),
        "",
        &["-D", &user, "-w", &testkit::user_pw(1)],
    )
    .await;
    assert_eq!(out.code, Some(0), "a bind that needs TLS: {out:?}");
    assert_eq!(out.stdout.trim(), format!("dn:{user}"));
    wait_until("slapd logs a TLS session", 10, || tls_lines(&lab) > before).await;
    assert_eq!(
        accepted_on(&lab, &ldaps),
        ldaps_before,
        "not its ldaps port"
    );
}

/// StartTLS as a raw client: the connection and its first answer.
async fn raw_starttls(addr: &str) -> (RawConn, bytes::Bytes) {
    let mut c = RawConn::connect(addr).await;
    c.send_msg(LdapMsg::new(
        1,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: START_TLS.into(),
            value: None,
        }),
    ))
    .await;
    let first = c.recv().await.expect("an answer");
    (c, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_handshake_ends_the_session_and_a_refusal_is_the_servers() {
    // The proxy does not trust slapd's certificate (another CA).
    let pki = Pki::new();
    let other = pki.other_ca.ca_file();
    let lab = tls_lab(&pki, |c| mirror(c, &other, None)).await;
    let (mut c, first) = raw_starttls(&lab.proxy_addr()).await;
    let text = assert_notice(&first, 52);
    assert!(c.recv().await.is_none(), "closed after the notice");
    assert!(
        text.contains("TLS handshake with the LDAP server failed")
            && text.contains("does not go on in clear"),
        "{text}"
    );

    // A slapd without TLS refuses StartTLS: through the proxy the client
    // gets that refusal (and goes on in clear), as direct.
    let pki = Pki::new();
    let ca = pki.ca_file();
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c| {
            pki.proxy_tls(c);
            mirror(c, &ca, None);
        },
    )
    .await;
    let (_, direct) = raw_starttls(&lab.direct_addr()).await;
    let (_, proxied) = raw_starttls(&lab.proxy_addr()).await;
    assert_eq!(proxied, direct, "the server's own answer");
    assert_ne!(result_code(&direct), Some(0));
    let d = run(&ca, "ldapwhoami", &lab.direct(), "-ZZ", &[]).await;
    let p = run(&ca, "ldapwhoami", &lab.proxied(), "-ZZ", &[]).await;
    assert_eq!((d.code, d.stdout), (p.code, p.stdout));
    let p = run(&ca, "ldapwhoami", &lab.proxied(), "-Z", &[]).await;
    assert_eq!(p.code, Some(0), "-Z goes on in clear: {p:?}");
}

/// The Rust client over TLS to the proxy (`ldaps://`, or StartTLS on
/// `ldap://`), bound as `dn`.
async fn ldap3_bound(url: &str, ca: &Path, dn: &str, pw: &str) -> ldap3::Ldap {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let settings = ldap3::LdapConnSettings::new()
        .set_config(std::sync::Arc::new(cfg))
        .set_starttls(url.starts_with("ldap://"))
        .set_conn_timeout(std::time::Duration::from_secs(10));
    let (conn, mut ldap) = ldap3::LdapConnAsync::with_settings(settings, url)
        .await
        .unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(dn, pw).await.unwrap().success().unwrap();
    ldap
}

async fn ldap3_whoami(ldap: &mut ldap3::Ldap) -> String {
    let (exop, _) = ldap
        .extended(ldap3::exop::WhoAmI)
        .await
        .unwrap()
        .success()
        .unwrap();
    exop.parse::<ldap3::exop::WhoAmIResp>().authzid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_carried_across_a_restart_keep_their_clients_transport() {
    let pki = Pki::new();
    let ca = pki.ca_file();
    let slapd = tls_slapd(&pki).await;
    let mut config = readme_config(&pki, &slapd);
    config.upstream_reconnect = true;
    config.upstream_retry_secs = 20;
    let mut lab = lab_of(slapd, config).await;
    let engine = lab.proxy.engine();
    let (u1, u2, u3) = (
        testkit::user_dn(1),
        testkit::user_dn(2),
        testkit::user_dn(3),
    );
    let mut starttls = ldap3_bound(&lab.proxied(), &ca, &u1, &testkit::user_pw(1)).await;
    let mut ldaps = ldap3_bound(&ldaps_of(&lab), &ca, &u2, &testkit::user_pw(2)).await;
    let mut clear = bound_at(&lab.proxy_addr(), &u3, &testkit::user_pw(3)).await;
    tokio::task::block_in_place(|| lab.slapd.restart()).expect("restart slapd");
    let waiting = engine.clone();
    wait_until("three sessions waiting", 10, || {
        waiting.carry_counts().0 == 3
    })
    .await;
    let before = tls_lines(&lab);
    assert_eq!(ldap3_whoami(&mut starttls).await, format!("dn:{u1}"));
    assert_eq!(ldap3_whoami(&mut ldaps).await, format!("dn:{u2}"));
    clear
        .send_msg(LdapMsg::new(
            2,
            LdapOp::ExtendedRequest(LdapExtendedRequest {
                name: "1.3.6.1.4.1.4203.1.11.3".into(),
                value: None,
            }),
        ))
        .await;
    let frame = clear.recv().await.unwrap();
    assert_eq!(result_code(&frame), Some(0));
    // The two TLS clients' new connections are TLS at slapd, the clear
    // one's is not.
    wait_until("slapd logs the two TLS sessions", 10, || {
        tls_lines(&lab) >= before + 2
    })
    .await;
    assert_eq!(tls_lines(&lab), before + 2);
    let _ = (starttls.unbind().await, ldaps.unbind().await);
}
