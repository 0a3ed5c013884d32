//! The proxy in front of a real 389 Directory Server (`testkit::ds389`):
//! transparency, backend discovery from its namingContexts, and the `389ds`
//! driver (nsslapd-readonly while frozen, restored on OFF and after a failed
//! prepare).
//!
//! Each test skips with one line when 389-ds cannot run here (not installed,
//! not root), or fails under `ABPROXY_REQUIRE_ALL=1` (`.ci/run`, which
//! installs it).

use std::time::Duration;

use crate::support::ds389::*;
use crate::support::*;
use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::drivers::DriverKind;
use abproxy::freeze::Mode;
use abproxy::operator::{FreezeRequest, Password, Session, Target};
use testkit::ds389::{user_dn, user_pw, Ds389, DM_DN, DM_PW};

const USERROOT_ENTRY: &str = "cn=userroot,cn=ldbm database,cn=plugins,cn=config";

/// Runs `tool` against `direct` and `proxied` (`URL` in `args` is replaced)
/// and asserts the same exit status, output and (URL aside) stderr.
async fn same(direct: &str, proxied: &str, tool: &str, args: &[&str]) -> ToolOutput {
    same_in(direct, proxied, tool, args, None).await
}

/// [`same`] with `stdin` fed to both runs.
async fn same_in(
    direct: &str,
    proxied: &str,
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> ToolOutput {
    let run = |url: &str| {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if *a == "URL" {
                    url.into()
                } else {
                    a.to_string()
                }
            })
            .collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ldap_tool(tool, &refs, stdin).await
        }
    };
    let d = run(direct).await;
    let p = run(proxied).await;
    assert_eq!(d.code, p.code, "{tool} {args:?}: exit status\n{d:?}\n{p:?}");
    assert_eq!(d.stdout, p.stdout, "{tool} {args:?}: output");
    assert_eq!(
        d.stderr.replace(direct, "URL"),
        p.stderr.replace(proxied, "URL"),
        "{tool} {args:?}: stderr"
    );
    d
}

fn dns(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("dn:")).count()
}

/// `nsslapd-readonly` of userroot, read over ldapi as root.
async fn userroot_readonly(ds: &Ds389) -> String {
    ldapi_search(
        &ds.ldapi_url(),
        &["-b", USERROOT_ENTRY, "-s", "base", "nsslapd-readonly"],
    )
    .await
    .lines()
    .filter_map(|l| l.strip_prefix("nsslapd-readonly: "))
    .collect::<Vec<_>>()
    .join(",")
}

/// A modify over 389's own ldapi socket as root (Directory Manager), which
/// bypasses the proxy.
async fn local_write(ds: &Ds389, dn: &str, value: &str) -> ToolOutput {
    let ldif =
        format!("dn: {dn}\nchangetype: modify\nreplace: description\ndescription: {value}\n");
    ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &ds.ldapi_url()],
        Some(&ldif),
    )
    .await
}

/// How often 389 logged a modify of userroot's config entry (the access log
/// is buffered: complete once ns-slapd has stopped).
fn userroot_config_mods(ds: &Ds389) -> usize {
    let log = std::fs::read_to_string(ds.access_log_path()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(&format!("MOD dn=\"{USERROOT_ENTRY}\"")))
        .count()
}

#[tokio::test]
async fn proxy_in_front_of_389_is_transparent_and_discovers_its_backends() {
    if skip() {
        return;
    }
    let ds = start_ds(100).await;
    let proxy = proxy(&ds, vec![example_389ds(&ds)]).await;
    let (direct, proxied) = (ds.url(), proxy.url());

    let anon = ["-x", "-LLL", "-H", "URL"];
    let dm = ["-x", "-LLL", "-H", "URL", "-D", DM_DN, "-w", DM_PW];
    let cases: Vec<(Vec<&str>, Option<usize>)> = vec![
        (
            [
                &anon[..],
                &["-b", "dc=example,dc=org", "(uid=user1*)", "cn", "mail"],
            ]
            .concat(),
            Some(12),
        ),
        // Everything, operational attributes included, as Directory Manager.
        (
            [
                &dm[..],
                &["-b", "dc=example,dc=org", "(objectClass=*)", "*", "+"],
            ]
            .concat(),
            Some(100 + 3 + 2),
        ),
        (
            [
                &dm[..],
                &["-b", "dc=other,dc=org", "-s", "one", "(objectClass=*)"],
            ]
            .concat(),
            Some(2),
        ),
        // Controls: simple paged results, server-side sort.
        (
            [
                &dm[..],
                &[
                    "-E",
                    "pr=7/noprompt",
                    "-b",
                    "ou=people,dc=example,dc=org",
                    "(objectClass=inetOrgPerson)",
                    "uid",
                ],
            ]
            .concat(),
            Some(100),
        ),
        (
            [
                &anon[..],
                &[
                    "-E",
                    "sss=-uid",
                    "-b",
                    "ou=people,dc=example,dc=org",
                    "(uid=user9*)",
                    "uid",
                ],
            ]
            .concat(),
            Some(11),
        ),
        // Errors come back the same: noSuchObject (32), with matchedDN.
        (
            [
                &anon[..],
                &["-b", "ou=nope,dc=example,dc=org", "(objectClass=*)"],
            ]
            .concat(),
            None,
        ),
    ];
    for (args, want) in &cases {
        let out = same(&direct, &proxied, "ldapsearch", args).await;
        match want {
            Some(n) => {
                assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
                assert_eq!(dns(&out.stdout), *n, "{args:?}");
            }
            None => assert_eq!(out.code, Some(32), "{args:?}: {out:?}"),
        }
    }
    let out = same(
        &direct,
        &proxied,
        "ldapwhoami",
        &["-x", "-H", "URL", "-D", &user_dn(1), "-w", &user_pw(1)],
    )
    .await;
    assert_eq!(out.stdout.trim(), format!("dn: {}", user_dn(1)));
    let out = same(
        &direct,
        &proxied,
        "ldapcompare",
        &["-x", "-H", "URL", &user_dn(7), "uidNumber:10007"],
    )
    .await;
    assert_eq!(out.code, Some(6), "compareTrue: {out:?}");
    // A write through the proxy (self-write ACI) lands in 389.
    let ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: via proxy\n",
        user_dn(3)
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &proxied, "-D", &user_dn(3), "-w", &user_pw(3)],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = same(
        &direct,
        &proxied,
        "ldapsearch",
        &[&anon[..], &["-b", &user_dn(3), "-s", "base", "description"]].concat(),
    )
    .await;
    assert!(out.stdout.contains("description: via proxy"), "{out:?}");

    // No backends configured: the proxy reads them from 389's rootDSE.
    let auto = self::proxy(&ds, vec![]).await;
    let mut s = dm_session(&auto).await;
    let status = s.status().await.expect("status");
    let mut suffixes: Vec<_> = status.backends.iter().map(|b| b.suffix.clone()).collect();
    suffixes.sort();
    assert_eq!(suffixes, ["dc=example,dc=org", "dc=other,dc=org"]);
    s.close().await;
    auto.shutdown().await.unwrap();
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn ds389_driver_makes_389_refuse_local_writes_while_frozen() {
    if skip() {
        return;
    }
    let ds = start_ds(20).await;
    let proxy = proxy(
        &ds,
        vec![
            example_389ds(&ds),
            BackendConfig::new("dc=other,dc=org", Mode::Readonly),
        ],
    )
    .await;
    let dn = user_dn(11);
    assert_eq!(userroot_readonly(&ds).await, "off");

    let out = cli(&proxy, &["on"]).await;
    assert_eq!(out.code, Some(0), "abproxy on: {out:?}");
    assert_eq!(userroot_readonly(&ds).await, "on");
    // 389 itself refuses a local write to the frozen backend...
    let out = local_write(&ds, &dn, "local while frozen").await;
    assert_eq!(out.code, Some(53), "{out:?}");
    assert!(out.stderr.contains("database is read-only"), "{out:?}");
    // ... and only to it: dc=other,dc=org is frozen by the proxy alone.
    let out = local_write(&ds, &testkit::other_user_dn(1), "other while frozen").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // A write through the proxy is held, not refused.
    let ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: held\n",
        user_dn(2)
    );
    let url = proxy.url();
    let held = tokio::spawn(async move {
        ldap_tool(
            "ldapmodify",
            &["-x", "-H", &url, "-D", &user_dn(2), "-w", &user_pw(2)],
            Some(&ldif),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held.is_finished(),
        "a write through the proxy was not held"
    );

    let out = cli(&proxy, &["off"]).await;
    assert_eq!(out.code, Some(0), "abproxy off: {out:?}");
    assert_eq!(userroot_readonly(&ds).await, "off", "the previous value");
    let out = held.await.unwrap();
    assert_eq!(out.code, Some(0), "the held write, released: {out:?}");
    let out = local_write(&ds, &dn, "local after").await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // A backend that was read-only before stays so after OFF.
    let ro = format!("dn: {USERROOT_ENTRY}\nchangetype: modify\nreplace: nsslapd-readonly\nnsslapd-readonly: on\n");
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &ds.ldapi_url()],
        Some(&ro),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(cli(&proxy, &["on"]).await.code, Some(0));
    assert_eq!(cli(&proxy, &["off"]).await.code, Some(0));
    assert_eq!(userroot_readonly(&ds).await, "on");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn failing_second_driver_leaves_389_writable() {
    if skip() {
        return;
    }
    let mut ds = start_ds(20).await;
    let mut other = BackendConfig::new("dc=other,dc=org", Mode::Readonly);
    other.driver = DriverKind::Command;
    other.prepare = vec![
        "sh".into(),
        "-c".into(),
        "echo 'no room for the snapshot' >&2; exit 1".into(),
    ];
    let proxy = proxy(&ds, vec![example_389ds(&ds), other]).await;
    let dn = user_dn(5);

    let mut s = dm_session(&proxy).await;
    let err = s
        .on(&FreezeRequest::default().with_time_limit(10))
        .await
        .expect_err("ON must fail");
    assert_eq!(err.exit_code(), abproxy::operator::exit::FAILED, "{err:?}");
    let msg = err.message.clone();
    assert!(
        msg.contains("prepare failed for backend dc=other,dc=org")
            && msg.contains("no room for the snapshot"),
        "{msg}"
    );
    assert_eq!(userroot_readonly(&ds).await, "off", "never left read-only");
    let out = local_write(&ds, &dn, "still writable").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let status = s.status().await.unwrap();
    assert_eq!(status.state.as_str(), "thawed");
    s.close().await;
    proxy.shutdown().await.unwrap();

    // userroot's prepare did run (and was undone): two modifies of its
    // config entry in 389's access log, complete once ns-slapd has stopped.
    tokio::task::spawn_blocking(move || {
        ds.stop().unwrap();
        assert_eq!(userroot_config_mods(&ds), 2);
    })
    .await
    .unwrap();
}

/// Turns a 389 plugin on or off in cn=config (root over ldapi).
async fn set_plugin(ds: &Ds389, cn: &str, on: bool) {
    let value = if on { "on" } else { "off" };
    let ldif = format!(
        "dn: cn={cn},cn=plugins,cn=config\nchangetype: modify\n\
         replace: nsslapd-pluginEnabled\nnsslapd-pluginEnabled: {value}\n"
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &ds.ldapi_url()],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[tokio::test]
async fn ds389_driver_refuses_partial_freezes_while_a_linking_plugin_is_enabled() {
    if skip() {
        return;
    }
    let ds = start_ds(20).await;
    let mut other = BackendConfig::new("dc=other,dc=org", Mode::Readonly);
    other.driver = DriverKind::Ds389;
    other.config_url = Some(ds.ldapi_url());
    let proxy = proxy(&ds, vec![example_389ds(&ds), other]).await;
    let mut s = dm_session(&proxy).await;
    let example = FreezeRequest::default().with_backends(["dc=example,dc=org"]);

    // 389's defaults (both plugins off): a partial freeze goes ahead.
    let first = s.on(&example).await.expect("partial ON").id().unwrap();
    s.off().await.unwrap();
    for (cn, what) in [
        (
            "referential integrity postoperation",
            "referential integrity",
        ),
        ("MemberOf Plugin", "MemberOf"),
    ] {
        set_plugin(&ds, cn, true).await;
        let err = s.on(&example).await.expect_err("a partial ON is refused");
        assert_eq!(
            err.kind,
            abproxy::operator::ErrorKind::Refused(53),
            "{err:?}"
        );
        assert!(
            err.message.contains(&format!(
                "partial freeze refused: the {what} plugin (cn=plugins,cn=config entry \
                 cn={cn}) enabled: it changes entries in every backend, so it can change \
                 dc=example,dc=org when dc=other,dc=org is written"
            )),
            "{err:?}"
        );
        assert_eq!(userroot_readonly(&ds).await, "off", "nothing frozen");
        assert_eq!(s.status().await.unwrap().state.as_str(), "thawed");
        set_plugin(&ds, cn, false).await;
    }
    // With one on, a full freeze goes ahead, with the next freeze id.
    set_plugin(&ds, "MemberOf Plugin", true).await;
    let full = s.on(&FreezeRequest::default()).await.expect("full ON");
    assert_eq!(full.id(), Some(first + 1), "the refusals used no freeze id");
    assert_eq!(userroot_readonly(&ds).await, "on");
    s.off().await.unwrap();
    s.close().await;
    proxy.shutdown().await.unwrap();
}

#[test]
fn config_389ds_driver_needs_config_url() {
    let text = "[[backends]]\nsuffix = \"dc=example,dc=org\"\ndriver = \"389ds\"\n";
    let config = Config::from_toml(text).unwrap();
    assert_eq!(config.backends[0].driver, DriverKind::Ds389);
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("driver \"389ds\" needs config_url"), "{err}");
    let ok = Config::from_toml(&format!(
        "{text}config_url = \"ldapi:///run/slapd-example.socket\"\n"
    ))
    .unwrap();
    ok.validate().unwrap();
}

/// OFF keeps holding writes while the done steps run (engine `end_freeze`,
/// phase Releasing): a write that reaches the proxy then waits until the
/// server is writable again instead of being refused with unwillingToPerform
/// (53). A slow done step of another backend (configured first) widens the
/// window to a second. (Found by this test: the state used to be cleared
/// before the done steps.)
#[tokio::test]
async fn writes_during_off_are_not_refused_by_the_still_read_only_server() {
    if skip() {
        return;
    }
    let ds = start_ds(20).await;
    let mut slow = BackendConfig::new("dc=other,dc=org", Mode::Readonly);
    slow.driver = DriverKind::Command;
    slow.prepare = vec!["true".into()];
    slow.done = vec!["sleep".into(), "1".into()];
    let proxy = proxy(&ds, vec![slow, example_389ds(&ds)]).await;
    assert_eq!(cli(&proxy, &["on"]).await.code, Some(0));
    let target = Target {
        url: proxy.url(),
        bind_dn: Some(DM_DN.into()),
        password: Some(Password::new(DM_PW)),
    };
    let mut watcher = Session::connect(&target).await.unwrap();
    let off = tokio::spawn(async move {
        let mut s = Session::connect(&target).await.unwrap();
        s.off().await.map(|_| ())
    });
    // While OFF runs the slow done step: the status says releasing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !watcher.status().await.unwrap().releasing {
        assert!(tokio::time::Instant::now() < deadline, "never releasing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: during off\n",
        user_dn(4)
    );
    let out = ldap_tool(
        "ldapmodify",
        &[
            "-x",
            "-H",
            &proxy.url(),
            "-D",
            &user_dn(4),
            "-w",
            &user_pw(4),
        ],
        Some(&ldif),
    )
    .await;
    off.await.unwrap().expect("OFF");
    assert_eq!(out.code, Some(0), "a write during OFF: {out:?}");
    proxy.shutdown().await.unwrap();
}

/// The DNs of `ldapsearch -LLL` output, in order.
fn dn_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("dn: uid="))
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn binds_scopes_vlv_writes_and_extended_operations_match_direct() {
    if skip() {
        return;
    }
    let ds = start_ds(100).await;
    let proxy = proxy(&ds, vec![]).await;
    let (direct, proxied) = (ds.url(), proxy.url());

    // Binds: good and bad password, unknown DN, Directory Manager, anonymous.
    for (who, args, code, want) in [
        (
            "user",
            vec!["-D", &user_dn(1) as &str, "-w", &user_pw(1) as &str],
            0,
            format!("dn: {}", user_dn(1)),
        ),
        (
            "bad password",
            vec!["-D", &user_dn(1) as &str, "-w", "wrong"],
            49,
            String::new(),
        ),
        (
            "no such user",
            vec!["-D", "uid=nobody,ou=people,dc=example,dc=org", "-w", "x"],
            49,
            String::new(),
        ),
        (
            "root",
            vec!["-D", DM_DN, "-w", DM_PW],
            0,
            "dn: cn=directory manager".into(),
        ),
        ("anonymous", vec![], 0, "anonymous".into()),
    ] {
        let out = same(
            &direct,
            &proxied,
            "ldapwhoami",
            &[&["-x", "-H", "URL"][..], &args].concat(),
        )
        .await;
        assert_eq!(out.code, Some(code), "{who}: {out:?}");
        assert_eq!(out.stdout.trim(), want, "{who}: {out:?}");
    }

    // The three scopes.
    for (scope, n) in [("base", 1), ("one", 100), ("sub", 101)] {
        let out = same(
            &direct,
            &proxied,
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-H",
                "URL",
                "-D",
                DM_DN,
                "-w",
                DM_PW,
                "-s",
                scope,
                "-b",
                "ou=people,dc=example,dc=org",
                "(objectClass=*)",
                "1.1",
            ],
        )
        .await;
        assert_eq!(out.code, Some(0), "{scope}: {out:?}");
        assert_eq!(dns(&out.stdout), n, "{scope}");
    }

    // VLV with server-side sort, as a user (389's default ACI on the VLV
    // control lets authenticated users use it; unindexed VLV is allowed).
    // ldapsearch asks for the next window on stdin after each one: by
    // offset, then by value, then an invalid one that ends it (exit 1).
    let vlv = |who: &'static [&'static str]| {
        [
            &["-x", "-LLL", "-H", "URL"][..],
            who,
            &[
                "-E",
                "sss=uid",
                "-E",
                "vlv=2/3/10/0",
                "-b",
                "ou=people,dc=example,dc=org",
                "(objectClass=inetOrgPerson)",
                "uid",
            ],
        ]
        .concat()
    };
    let user1: &'static [&'static str] =
        &["-D", "uid=user1,ou=people,dc=example,dc=org", "-w", "pass1"];
    assert_eq!(user1[1], user_dn(1));
    assert_eq!(user1[3], user_pw(1));
    let out = same_in(
        &direct,
        &proxied,
        "ldapsearch",
        &vlv(user1),
        Some("1/1/50/0\n0/2:user5\nend\n"),
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("VLV control value \"end\" invalid"),
        "{out:?}"
    );
    // uid order: user1 user10 user100 user11 ... user17 (10th) ...
    let windows = [
        "user15 user16 user17 user18 user19 user2",
        "user52 user53 user54",
        "user5 user50 user51",
    ];
    assert_eq!(dn_list(&out.stdout).join(" "), windows.join(" "), "{out:?}");
    assert_eq!(
        out.stdout
            .matches("# vlvResultpos=")
            .collect::<Vec<_>>()
            .len(),
        3
    );
    assert!(
        out.stdout.contains("# vlvResultpos=10 count=100"),
        "{out:?}"
    );
    // Anonymous: 389 refuses the control (insufficientAccessRights).
    let out = same(&direct, &proxied, "ldapsearch", &vlv(&[])).await;
    assert_eq!(out.code, Some(50), "{out:?}");

    // add/modify/modRDN/delete, and the errors of each, as Directory
    // Manager; the sequence leaves the directory as it found it, so both
    // runs see the same state.
    let ldif = "dn: uid=tx,ou=people,dc=example,dc=org
changetype: add
objectClass: inetOrgPerson
uid: tx
cn: T X
sn: X

dn: uid=tx,ou=people,dc=example,dc=org
changetype: modify
replace: description
description: changed
-
add: mail
mail: tx@example.org

dn: uid=tx,ou=people,dc=example,dc=org
changetype: modrdn
newrdn: uid=ty
deleteoldrdn: 1

dn: uid=user1,ou=people,dc=example,dc=org
changetype: add
objectClass: inetOrgPerson
uid: user1
cn: again
sn: again

dn: uid=ty,ou=people,dc=example,dc=org
changetype: modrdn
newrdn: uid=user2
deleteoldrdn: 1

dn: uid=ty,ou=people,dc=example,dc=org
changetype: modify
replace: uidNumber
uidNumber: not a number

dn: uid=nobody,ou=people,dc=example,dc=org
changetype: modify
replace: description
description: x

dn: ou=people,dc=example,dc=org
changetype: delete

dn: uid=tz,ou=people,dc=example,dc=org
changetype: add
objectClass: inetOrgPerson
uid: tz

dn: uid=ty,ou=people,dc=example,dc=org
changetype: delete
";
    let out = same_in(
        &direct,
        &proxied,
        "ldapmodify",
        &["-c", "-x", "-H", "URL", "-D", DM_DN, "-w", DM_PW],
        Some(ldif),
    )
    .await;
    for want in [
        "adding new entry \"uid=tx,ou=people,dc=example,dc=org\"",
        "modifying entry \"uid=tx,ou=people,dc=example,dc=org\"",
        "modifying rdn of entry \"uid=tx,ou=people,dc=example,dc=org\"",
        "deleting entry \"uid=ty,ou=people,dc=example,dc=org\"",
    ] {
        assert!(out.stdout.contains(want), "{want}: {out:?}");
    }
    for want in [
        "ldap_add: Already exists (68)",
        "ldap_rename: Already exists (68)",
        "attribute \"uidNumber\" not allowed",
        "ldap_modify: No such object (32)",
        "ldap_delete: Operation not allowed on non-leaf (66)",
        "ldap_add: Object class violation (65)",
    ] {
        assert!(out.stderr.contains(want), "{want}: {out:?}");
    }
    assert_eq!(out.code, Some(65), "the last error: {out:?}");

    // An extended operation 389 does not know: its own answer, unchanged.
    let out = same(
        &direct,
        &proxied,
        "ldapexop",
        &["-x", "-H", "URL", "1.3.6.1.4.1.99999.1.2"],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("Protocol error (2)\n\tadditional info: unsupported extended operation"),
        "{out:?}"
    );
    // Password modify in clear: 389 wants TLS (confidentialityRequired).
    let out = same(
        &direct,
        &proxied,
        "ldappasswd",
        &[
            "-x",
            "-H",
            "URL",
            "-D",
            &user_dn(2),
            "-w",
            &user_pw(2),
            "-a",
            &user_pw(2),
            "-s",
            "new secret",
        ],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        out.stdout,
        "Result: Confidentiality required (13)\n\
         Additional info: Operation requires a secure connection.\n\n"
    );
    proxy.shutdown().await.unwrap();
}

/// An extended request (no value when `value` is None).
fn exop(msgid: i32, name: &str, value: Option<Vec<u8>>) -> ldap3_proto::proto::LdapMsg {
    ldap3_proto::proto::LdapMsg::new(
        msgid,
        ldap3_proto::proto::LdapOp::ExtendedRequest(ldap3_proto::proto::LdapExtendedRequest {
            name: name.into(),
            value,
        }),
    )
}

/// A search of the people sorted by uid with a VLV request control whose
/// value is `vlv` (a VirtualListViewRequest).
fn vlv_search(msgid: i32, vlv: Vec<u8>) -> ldap3_proto::proto::LdapMsg {
    use ldap3_proto::control::{LdapControl, ServerSortRequet};
    let mut m = search(
        msgid,
        "ou=people,dc=example,dc=org",
        2,
        "(objectClass=inetOrgPerson)",
        &["uid", "cn"],
    );
    m.ctrl.push(LdapControl::ServerSort {
        sort_requests: vec![ServerSortRequet {
            attribute_name: "uid".into(),
            ordering_rule: None,
            reverse_order: false,
        }],
    });
    m.ctrl.push(LdapControl::Unknown {
        oid: "2.16.840.1.113730.3.4.9".into(),
        criticality: true,
        value: Some(vlv),
    });
    m
}

/// The same requests, one after the other, on a connection to 389 and one
/// to the proxy (both bound as user1): every response frame is the same
/// byte for byte. Checked: VLV by offset and by value (with the sort and
/// VLV response controls), password modify in clear (confidentialityRequired
/// from 389, passed through), an unknown extended operation, a failed and an
/// anonymous bind.
#[tokio::test]
async fn vlv_password_modify_and_unknown_exop_answers_are_byte_identical() {
    if skip() {
        return;
    }
    let ds = start_ds(100).await;
    let proxy = proxy(&ds, vec![]).await;
    let mut d = raw_bound(&addr_of(&ds.url()), &user_dn(1), &user_pw(1)).await;
    let mut p = raw_bound(&addr_of(&proxy.url()), &user_dn(1), &user_pw(1)).await;

    // VirtualListViewRequest: before 2, after 3, byOffset {10, 0}.
    let by_offset = vec![
        0x30, 0x0e, 0x02, 0x01, 0x02, 0x02, 0x01, 0x03, 0xa0, 0x06, 0x02, 0x01, 0x0a, 0x02, 0x01,
        0x00,
    ];
    // before 1, after 1, greaterThanOrEqual "user5".
    let by_value = [
        &[0x30, 0x0d, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x81, 0x05][..],
        b"user5",
    ]
    .concat();
    // RFC 3062 PasswdModifyRequestValue { oldPasswd [1], newPasswd [2] }.
    let passwd = [
        &[0x30, 0x0e, 0x81, 0x05][..],
        user_pw(1).as_bytes(),
        &[0x82, 0x05],
        b"other",
    ]
    .concat();
    let requests = [
        (vlv_search(2, by_offset), 0),
        (vlv_search(3, by_value), 0),
        (exop(4, "1.3.6.1.4.1.4203.1.11.1", Some(passwd)), 13),
        (exop(5, "1.3.6.1.4.1.99999.1.2", None), 2),
        (bind(6, &user_dn(2), "wrong"), 49),
        (bind(7, "", ""), 0),
        (exop(8, "1.3.6.1.4.1.4203.1.11.3", None), 0),
    ];
    let mut entries = Vec::new();
    for (req, code) in requests {
        let id = req.msgid;
        d.send_msg(req.clone()).await;
        p.send_msg(req).await;
        let direct = d.recv_until_final(id).await;
        let proxied = p.recv_until_final(id).await;
        assert!(direct == proxied, "request {id}: different answers");
        assert_eq!(
            result_code(direct.last().unwrap()),
            Some(code),
            "request {id}"
        );
        entries.push(
            direct[..direct.len() - 1]
                .iter()
                .map(|f| entry_dn(&decode(f)))
                .collect::<Vec<_>>(),
        );
        if id <= 3 {
            // The sort (1.2.840.113556.1.4.474) and VLV (…3.4.10) responses.
            let done = decode(direct.last().unwrap());
            let oids: Vec<String> = done
                .ctrl
                .iter()
                .map(|c| match c {
                    ldap3_proto::control::LdapControl::ServerSortResult { .. } => {
                        "sort".to_string()
                    }
                    ldap3_proto::control::LdapControl::Unknown { oid, .. } => oid.clone(),
                    other => format!("{other:?}"),
                })
                .collect();
            assert!(oids.contains(&"sort".to_string()), "{oids:?}");
            assert!(
                oids.contains(&"2.16.840.1.113730.3.4.10".to_string()),
                "{oids:?}"
            );
        }
    }
    let uid = |k: &str| format!("uid=user{k},ou=people,dc=example,dc=org");
    assert_eq!(
        entries[0],
        ["15", "16", "17", "18", "19", "2"].map(uid),
        "window around the 10th by uid"
    );
    assert_eq!(
        entries[1],
        ["49", "5", "50"].map(uid),
        "around uid >= user5"
    );
    proxy.shutdown().await.unwrap();
}

fn modify_desc(msgid: i32, dn: &str, value: &str) -> ldap3_proto::proto::LdapMsg {
    use ldap3_proto::proto::{
        LdapModify, LdapModifyRequest, LdapModifyType, LdapOp, LdapPartialAttribute,
    };
    ldap3_proto::proto::LdapMsg::new(
        msgid,
        LdapOp::ModifyRequest(LdapModifyRequest {
            dn: dn.into(),
            changes: vec![LdapModify {
                operation: LdapModifyType::Replace,
                modification: LdapPartialAttribute {
                    atype: "description".into(),
                    vals: vec![value.as_bytes().to_vec()],
                },
            }],
        }),
    )
}

/// Sends `req` on `c` and asserts it succeeded.
async fn ok(c: &mut RawConn, req: ldap3_proto::proto::LdapMsg) {
    let id = req.msgid;
    c.send_msg(req).await;
    let frames = c.recv_until_final(id).await;
    assert_eq!(result_code(frames.last().unwrap()), Some(0), "request {id}");
}

/// The next psearch entry on the direct and on the proxied connection: the
/// same bytes; returns it decoded.
async fn next_change(d: &mut RawConn, p: &mut RawConn) -> ldap3_proto::proto::LdapMsg {
    let fd = d.recv().await.expect("direct psearch entry");
    let fp = p.recv().await.expect("proxied psearch entry");
    assert!(fd == fp, "direct and proxied notifications differ");
    decode(&fd)
}

/// A persistent search (2.16.840.1.113730.3.4.3, which 389 implements)
/// opened directly and through the proxy: the same initial entries, then
/// for an add, a modify, a modRDN and a delete made through the proxy the
/// same entry change notifications, byte for byte.
#[tokio::test]
async fn persistent_search_notifications_match_direct() {
    if skip() {
        return;
    }
    let ds = start_ds(50).await;
    let proxy = proxy(&ds, vec![]).await;
    let mut d = raw_bound(&addr_of(&ds.url()), DM_DN, DM_PW).await;
    let mut p = raw_bound(&addr_of(&proxy.url()), DM_DN, DM_PW).await;
    let people = "ou=people,dc=example,dc=org";
    let mut ps = search(2, people, 2, "(|(uid=user4*)(cn=ps-*))", &["description"]);
    ps.ctrl.push(psearch_control());
    d.send_msg(ps.clone()).await;
    p.send_msg(ps).await;
    // changesOnly FALSE: the 11 matching entries first; once they are in,
    // 389 has registered the persistent search.
    let mut initial = Vec::new();
    for _ in 0..11 {
        initial.push(entry_dn(&next_change(&mut d, &mut p).await));
    }
    initial.sort();
    let mut want: Vec<String> = [4, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
        .iter()
        .map(|&k| user_dn(k))
        .collect();
    want.sort();
    assert_eq!(initial, want);

    let mut w = raw_bound(&addr_of(&proxy.url()), DM_DN, DM_PW).await;
    let new_dn = format!("cn=ps-new,{people}");
    ok(&mut w, add(2, &new_dn, "ps-new")).await;
    let m = next_change(&mut d, &mut p).await;
    assert_eq!(
        (entry_dn(&m), entry_change(&m)),
        (new_dn.clone(), (1, None))
    );

    ok(&mut w, modify_desc(3, &user_dn(42), "seen by psearch")).await;
    let m = next_change(&mut d, &mut p).await;
    assert_eq!((entry_dn(&m), entry_change(&m)), (user_dn(42), (4, None)));
    assert!(format!("{m:?}").contains("seen by psearch"));

    let moved = ldap3_proto::proto::LdapMsg::new(
        4,
        ldap3_proto::proto::LdapOp::ModifyDNRequest(ldap3_proto::proto::LdapModifyDNRequest {
            dn: user_dn(43),
            newrdn: "uid=user43x".into(),
            deleteoldrdn: true,
            new_superior: None,
        }),
    );
    ok(&mut w, moved).await;
    let m = next_change(&mut d, &mut p).await;
    assert_eq!(
        (entry_dn(&m), entry_change(&m)),
        (format!("uid=user43x,{people}"), (8, Some(user_dn(43))))
    );

    let del =
        ldap3_proto::proto::LdapMsg::new(5, ldap3_proto::proto::LdapOp::DelRequest(user_dn(44)));
    ok(&mut w, del).await;
    let m = next_change(&mut d, &mut p).await;
    assert_eq!((entry_dn(&m), entry_change(&m)), (user_dn(44), (2, None)));
    proxy.shutdown().await.unwrap();
}

/// A persistent search open through the proxy never holds up a drain: with
/// dc=example,dc=org in `stop` mode (where a search in flight is waited
/// for), `abproxy on --time-limit 30` answers at once, not after 30 s, and
/// the persistent search is not abandoned: a change made on 389 itself
/// while frozen reaches it after OFF (held until then, as stop mode wants),
/// and so does a change made through the proxy after OFF.
#[tokio::test]
async fn persistent_search_never_holds_up_a_drain_on_389() {
    if skip() {
        return;
    }
    let ds = start_ds(20).await;
    let proxy = proxy(
        &ds,
        vec![
            BackendConfig::new("dc=example,dc=org", Mode::Stop),
            BackendConfig::new("dc=other,dc=org", Mode::Readonly),
        ],
    )
    .await;
    let mut d = raw_bound(&addr_of(&ds.url()), DM_DN, DM_PW).await;
    let mut p = raw_bound(&addr_of(&proxy.url()), DM_DN, DM_PW).await;
    let mut ps = search(
        2,
        "ou=people,dc=example,dc=org",
        2,
        "(uid=user1*)",
        &["description"],
    );
    ps.ctrl.push(psearch_control());
    d.send_msg(ps.clone()).await;
    p.send_msg(ps).await;
    for _ in 0..11 {
        next_change(&mut d, &mut p).await;
    }

    let started = std::time::Instant::now();
    let out = cli(&proxy, &["on", "--time-limit", "30"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "abproxy on: {out:?}");
    assert!(
        took < Duration::from_secs(10),
        "ON took {took:?}: the drain waited for the persistent search"
    );
    let mut s = dm_session(&proxy).await;
    let status = s.status().await.unwrap();
    assert_eq!(status.state.as_str(), "frozen");

    // A change on 389 itself (not through the proxy) while frozen: 389
    // notifies both persistent searches; the proxy holds its copy.
    let out = local_write(&ds, &user_dn(12), "changed while frozen").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let direct = d.recv().await.expect("direct notification");
    assert_eq!(entry_dn(&decode(&direct)), user_dn(12));
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), p.stream.peek(&mut b)).await;
    assert!(early.is_err(), "stop mode let a notification through");

    let out = cli(&proxy, &["off"]).await;
    assert_eq!(out.code, Some(0), "abproxy off: {out:?}");
    let held = p.recv().await.expect("the held notification");
    assert!(held == direct, "the held notification, unchanged");

    // Still working after OFF.
    let mut w = raw_bound(&addr_of(&proxy.url()), DM_DN, DM_PW).await;
    ok(&mut w, modify_desc(2, &user_dn(13), "after off")).await;
    let m = next_change(&mut d, &mut p).await;
    assert_eq!((entry_dn(&m), entry_change(&m)), (user_dn(13), (4, None)));
    s.close().await;
    proxy.shutdown().await.unwrap();
}
