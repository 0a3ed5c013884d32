//! The proxy in front of a real 389 Directory Server with TLS
//! (`testkit::ds389` with the test CA of `testkit::ca`): password modify
//! (which 389 refuses without TLS, confidentialityRequired) over TLS direct
//! and through the proxy, and what 389 decides depending on the proxy's
//! upstream leg.
//!
//! Skips with one line when 389-ds cannot run here (not installed, not
//! root), or fails under `ABPROXY_REQUIRE_ALL=1` (`.ci/run`, which installs
//! it).

use std::path::{Path, PathBuf};

use crate::support::ds389::skip;
use crate::support::pki::tool;
use crate::support::ToolOutput;
use abproxy::config::Config;
use abproxy::endpoint::Endpoint;
use abproxy::ProxyHandle;
use testkit::ca::TestCa;
use testkit::ds389::{user_dn, user_pw, Ds389, Ds389Options};

const CONFIDENTIALITY_REQUIRED: &str = "Result: Confidentiality required (13)\n\
                                        Additional info: Operation requires a secure connection.\n\n";

/// `tool` against `direct` and `proxied` (`URL` in `args` replaced): the
/// same exit status, output and (URL aside) stderr.
async fn same(ca: &Path, direct: &str, proxied: &str, name: &str, args: &[&str]) -> ToolOutput {
    let with = |url: &str| -> Vec<String> {
        args.iter()
            .map(|a| {
                if *a == "URL" {
                    url.into()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let (a, b) = (with(direct), with(proxied));
    let d = tool(ca, name, &a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let p = tool(ca, name, &b.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(d.code, p.code, "{name} {args:?}: exit status\n{d:?}\n{p:?}");
    assert_eq!(d.stdout, p.stdout, "{name} {args:?}: output");
    assert_eq!(
        d.stderr.replace(direct, "URL"),
        p.stderr.replace(proxied, "URL"),
        "{name} {args:?}: stderr"
    );
    d
}

/// `ldappasswd` as user `k` changing its own password to `new` at `url`
/// (`starttls`: with `-ZZ`).
async fn passwd(ca: &Path, url: &str, starttls: bool, k: usize, new: &str) -> ToolOutput {
    let (dn, old) = (user_dn(k), user_pw(k));
    let mut args = vec![
        "-x", "-H", url, "-D", &dn, "-w", &old, "-a", &old, "-s", new,
    ];
    if starttls {
        args.insert(0, "-ZZ");
    }
    tool(ca, "ldappasswd", &args).await
}

/// `ldapwhoami` as `dn` with `pw` over ldaps `url`.
async fn whoami(ca: &Path, url: &str, dn: &str, pw: &str) -> ToolOutput {
    tool(ca, "ldapwhoami", &["-x", "-H", url, "-D", dn, "-w", pw]).await
}

fn ldaps_of(proxy: &ProxyHandle) -> String {
    proxy
        .endpoints()
        .iter()
        .find(|e| matches!(e, Endpoint::Tls(_)))
        .expect("an ldaps listener")
        .url()
}

fn ldap_of(proxy: &ProxyHandle) -> String {
    proxy
        .endpoints()
        .iter()
        .find(|e| matches!(e, Endpoint::Tcp(_)))
        .expect("an ldap listener")
        .url()
}

/// The proxy with `ldap://` and `ldaps://` listeners (its own certificate
/// from the test CA) in front of `upstream`, trusting the test CA upstream.
async fn tls_proxy(
    upstream: String,
    cert: &(PathBuf, PathBuf),
    ca: &Path,
    tweak: impl FnOnce(&mut Config),
) -> ProxyHandle {
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into(), "ldaps://127.0.0.1:0".into()],
        upstream,
        ..Config::default()
    };
    config.tls.cert_file = Some(cert.0.clone());
    config.tls.key_file = Some(cert.1.clone());
    config.tls.upstream_ca_file = Some(ca.to_path_buf());
    tweak(&mut config);
    ProxyHandle::spawn(config).await.expect("start proxy")
}

/// A 389 DS with `users` users and TLS from a throwaway CA: the CA's
/// directory (removed when dropped), the CA file, a certificate for the
/// proxy, the server.
async fn ds389_with_tls(users: usize) -> (tempfile::TempDir, PathBuf, (PathBuf, PathBuf), Ds389) {
    let dir = tempfile::Builder::new()
        .prefix("abp-ds389-pki-")
        .tempdir_in("/tmp")
        .unwrap();
    let test_ca = TestCa::new(dir.path(), "ca").unwrap();
    let ca = test_ca.ca_file();
    let proxy_cert = test_ca.server("proxy").unwrap();
    let ds = tokio::task::spawn_blocking(move || {
        Ds389::start(Ds389Options {
            users,
            tls: Some(test_ca),
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("start 389-ds with TLS");
    (dir, ca, proxy_cert, ds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_modify_over_tls_through_the_proxy_matches_389_over_tls() {
    if skip() {
        return;
    }
    let (_pki, ca, proxy_cert, ds) = ds389_with_tls(20).await;
    let ds_ldaps = ds.ldaps_url().expect("389 has an LDAPS port");
    assert!(ds_ldaps.starts_with("ldaps://127.0.0.1:"), "{ds_ldaps}");

    // TLS on both legs: clients to the proxy, the proxy to 389's LDAPS port.
    let proxy = tls_proxy(ds_ldaps.clone(), &proxy_cert, &ca, |_| {}).await;
    let (p_ldaps, p_ldap) = (ldaps_of(&proxy), ldap_of(&proxy));

    // The basics over TLS: the same answers direct and through the proxy,
    // over LDAPS and over StartTLS.
    for (direct, proxied, starttls) in [
        (ds_ldaps.as_str(), p_ldaps.as_str(), false),
        (ds.url().as_str(), p_ldap.as_str(), true),
    ] {
        let zz: &[&str] = if starttls { &["-ZZ"] } else { &[] };
        let out = same(
            &ca,
            direct,
            proxied,
            "ldapsearch",
            &[zz, &["-x", "-H", "URL", "-b", "dc=example,dc=org", "-LLL"]].concat(),
        )
        .await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert_eq!(
            out.stdout.lines().filter(|l| l.starts_with("dn:")).count(),
            3 + 20 + 2,
            "the suffix, 2 OUs, 20 users, 2 groups"
        );
        let out = same(
            &ca,
            direct,
            proxied,
            "ldapsearch",
            &[
                zz,
                &[
                    "-x",
                    "-H",
                    "URL",
                    "-D",
                    &user_dn(1),
                    "-w",
                    &user_pw(1),
                    "-b",
                    "dc=example,dc=org",
                    "-LLL",
                    "-s",
                    "one",
                    "(uid=user1*)",
                    "uid",
                ],
            ]
            .concat(),
        )
        .await;
        assert_eq!(out.code, Some(0), "{out:?}");
        let out = same(
            &ca,
            direct,
            proxied,
            "ldapwhoami",
            &[
                zz,
                &["-x", "-H", "URL", "-D", &user_dn(1), "-w", &user_pw(1)],
            ]
            .concat(),
        )
        .await;
        assert_eq!(out.stdout, format!("dn: {}\n", user_dn(1)), "{out:?}");
        let out = same(
            &ca,
            direct,
            proxied,
            "ldapwhoami",
            &[zz, &["-x", "-H", "URL", "-D", &user_dn(1), "-w", "wrong"]].concat(),
        )
        .await;
        assert_eq!(out.code, Some(49), "{out:?}");
    }

    // Password modify as the user itself: 389 over TLS accepts it, and so
    // does 389 through the proxy, with the same (empty) output; users 2..5
    // change their own passwords, each once.
    let changes = [
        (2, ds_ldaps.as_str(), false, "direct over LDAPS"),
        (3, p_ldaps.as_str(), false, "through the proxy over LDAPS"),
        (4, ds.url().as_str(), true, "direct with StartTLS"),
        (5, p_ldap.as_str(), true, "through the proxy with StartTLS"),
    ]
    .map(|(k, url, zz, how)| (k, url.to_string(), zz, how));
    let mut outputs = Vec::new();
    for (k, url, zz, how) in &changes {
        let out = passwd(&ca, url, *zz, *k, "new secret").await;
        assert_eq!(out.code, Some(0), "password modify {how}: {out:?}");
        outputs.push((out.stdout, out.stderr));
    }
    assert!(
        outputs.iter().all(|o| o == &outputs[0]),
        "the same output every way: {outputs:?}"
    );
    assert_eq!(outputs[0], (String::new(), String::new()), "prints nothing");
    // The same with StartTLS issued by the proxy on 389's plain port
    // (`upstream_starttls`) instead of LDAPS upstream.
    let starttls_up = tls_proxy(ds.url(), &proxy_cert, &ca, |c| {
        c.tls.upstream_starttls = true
    })
    .await;
    for (k, url, zz) in [
        (9, ldaps_of(&starttls_up), false),
        (10, ldap_of(&starttls_up), true),
    ] {
        let out = passwd(&ca, &url, zz, k, "new secret").await;
        assert_eq!(
            (out.code, (out.stdout, out.stderr)),
            (Some(0), outputs[0].clone()),
            "password modify through the proxy, StartTLS upstream, -ZZ {zz}"
        );
    }
    // The new passwords bind and the old ones no longer do, direct and
    // through the proxy.
    changes_checked(&ca, &ds_ldaps, &p_ldaps, &changes).await;
    changes_checked(
        &ca,
        &ds_ldaps,
        &ldaps_of(&starttls_up),
        &[
            (
                9,
                String::new(),
                false,
                "through the proxy, StartTLS upstream",
            ),
            (
                10,
                String::new(),
                true,
                "through the proxy, StartTLS both legs",
            ),
        ],
    )
    .await;

    // In clear, 389 refuses, directly and through a proxy whose upstream is
    // in clear, with the same answer; and TLS between the client and the
    // proxy does not change that: 389 judges the proxy's connection.
    let clear_up = tls_proxy(ds.url(), &proxy_cert, &ca, |_| {}).await;
    let direct = passwd(&ca, &ds.url(), false, 6, "new secret").await;
    assert_eq!(
        (direct.code, direct.stdout.as_str()),
        (Some(1), CONFIDENTIALITY_REQUIRED),
        "direct in clear: {direct:?}"
    );
    for (url, zz, how) in [
        (ldap_of(&clear_up), false, "in clear"),
        (ldaps_of(&clear_up), false, "over LDAPS to the proxy"),
        (ldap_of(&clear_up), true, "with StartTLS to the proxy"),
    ] {
        let out = passwd(&ca, &url, zz, 6, "new secret").await;
        assert_eq!(
            (out.code, &out.stdout, &out.stderr),
            (direct.code, &direct.stdout, &direct.stderr),
            "clear upstream, client {how}: {out:?}"
        );
    }
    let out = whoami(&ca, &ds_ldaps, &user_dn(6), &user_pw(6)).await;
    assert_eq!(out.code, Some(0), "user6 keeps its password: {out:?}");

    // With TLS upstream, 389 sees a TLS session whatever the client used:
    // a client in clear gets its password changed. `require_tls` on the
    // proxy keeps clear clients out (its own confidentialityRequired, at the
    // bind).
    for (k, url, how) in [
        (7, p_ldap.clone(), "LDAPS upstream"),
        (11, ldap_of(&starttls_up), "StartTLS upstream"),
    ] {
        let out = passwd(&ca, &url, false, k, "new secret").await;
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), ""),
            "clear client, {how}: {out:?}"
        );
        let out = whoami(&ca, &ds_ldaps, &user_dn(k), "new secret").await;
        assert_eq!(out.code, Some(0), "user{k}'s new password: {out:?}");
    }
    let strict = tls_proxy(ds_ldaps.clone(), &proxy_cert, &ca, |c| {
        c.tls.require_tls = true
    })
    .await;
    let out = passwd(&ca, &ldap_of(&strict), false, 8, "new secret").await;
    assert_eq!(out.code, Some(13), "require_tls, clear client: {out:?}");
    assert!(
        out.stderr
            .contains("ldap_bind: Confidentiality required (13)")
            && out.stderr.contains("tls.require_tls"),
        "{out:?}"
    );
    let out = passwd(&ca, &ldaps_of(&strict), false, 8, "new secret").await;
    assert_eq!(out.code, Some(0), "require_tls, LDAPS client: {out:?}");
    let out = whoami(&ca, &ds_ldaps, &user_dn(8), "new secret").await;
    assert_eq!(out.code, Some(0), "user8's new password: {out:?}");

    for p in [proxy, starttls_up, clear_up, strict] {
        p.shutdown().await.unwrap();
    }
    drop(ds);
}

/// For each (user, _, _, how) of `changes`: the new password binds and the
/// old one no longer does, at `direct` and `proxied` (LDAPS).
async fn changes_checked(
    ca: &Path,
    direct: &str,
    proxied: &str,
    changes: &[(usize, String, bool, &str)],
) {
    for (k, _, _, how) in changes {
        for url in [direct, proxied] {
            let out = whoami(ca, url, &user_dn(*k), "new secret").await;
            assert_eq!(
                (out.code, out.stdout.as_str()),
                (Some(0), format!("dn: {}\n", user_dn(*k)).as_str()),
                "user{k} (changed {how}) with the new password at {url}: {out:?}"
            );
            let out = whoami(ca, url, &user_dn(*k), &user_pw(*k)).await;
            assert_eq!(
                out.code,
                Some(49),
                "user{k} (changed {how}) with the old password at {url}: {out:?}"
            );
        }
    }
}

/// `tls.upstream_mirror` in front of a 389 DS with
/// `nsslapd-require-secure-binds: on`: a simple bind in clear is refused
/// (13) through the proxy as direct, and accepted over StartTLS and LDAPS,
/// as direct; a password modify likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_keeps_389s_secure_binds_rule_deciding_as_direct() {
    if skip() {
        return;
    }
    let (_pki, ca, proxy_cert, ds) = ds389_with_tls(10).await;
    let ds_ldaps = ds.ldaps_url().expect("389 has an LDAPS port");
    let secure_binds = "dn: cn=config\nchangetype: modify\nreplace: nsslapd-require-secure-binds\n\
                        nsslapd-require-secure-binds: on\n";
    let out = crate::support::ldap_tool(
        "ldapmodify",
        &[
            "-x",
            "-H",
            &ds.url(),
            "-D",
            testkit::ds389::DM_DN,
            "-w",
            testkit::ds389::DM_PW,
        ],
        Some(secure_binds),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let proxy = tls_proxy(ds.url(), &proxy_cert, &ca, |c| {
        c.tls.upstream_mirror = true;
        c.tls.upstream_ldaps = Some(ds_ldaps.clone());
    })
    .await;
    let (p_ldaps, p_ldap) = (ldaps_of(&proxy), ldap_of(&proxy));
    let mut codes = Vec::new();
    for (direct, proxied, zz, how) in [
        (ds.url(), p_ldap.clone(), false, "clear"),
        (ds.url(), p_ldap.clone(), true, "StartTLS"),
        (ds_ldaps.clone(), p_ldaps.clone(), false, "LDAPS"),
    ] {
        let z: &[&str] = if zz { &["-ZZ"] } else { &[] };
        let out = same(
            &ca,
            &direct,
            &proxied,
            "ldapwhoami",
            &[
                z,
                &["-x", "-H", "URL", "-D", &user_dn(1), "-w", &user_pw(1)],
            ]
            .concat(),
        )
        .await;
        codes.push((how, out.code));
    }
    assert_eq!(
        codes,
        [
            ("clear", Some(13)),
            ("StartTLS", Some(0)),
            ("LDAPS", Some(0))
        ],
        "389 refuses the clear bind and takes the TLS ones, direct and through the proxy"
    );
    // A password modify: refused in clear through the proxy, as direct;
    // done over StartTLS through the proxy.
    let direct = passwd(&ca, &ds.url(), false, 2, "new secret").await;
    let proxied = passwd(&ca, &p_ldap, false, 3, "new secret").await;
    assert_eq!(direct.code, Some(13), "{direct:?}");
    assert_eq!((proxied.code, proxied.stdout), (direct.code, direct.stdout));
    let out = passwd(&ca, &p_ldap, true, 4, "new secret").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = whoami(&ca, &ds_ldaps, &user_dn(4), "new secret").await;
    assert_eq!(out.code, Some(0), "user4's new password: {out:?}");
    proxy.shutdown().await.unwrap();
    drop(ds);
}
