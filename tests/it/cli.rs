//! The `abproxy` binary: flags, config files, TCP and ldapi listeners on both
//! sides, start-up warnings and SIGTERM.

use std::process::Command;

use crate::support::process::*;
use crate::support::*;
use testkit::SlapdOptions;

#[test]
fn bad_flags_and_configs_are_refused_with_a_reason() {
    let out = Command::new(BIN)
        .args(["serve", "--lisen", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lisen"));

    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "ldaps://127.0.0.1:3636",
            "--check-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs tls.cert_file"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("abproxy.toml");
    std::fs::write(&file, "upstream = \"ldap://127.0.0.1:1\"\nmax_pdu = 5\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--check-config",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `max_pdu`"), "{err}");

    std::fs::write(
        &file,
        "upstream = \"ldap://127.0.0.1:1\"\nmax_pdu_bytes = 65536\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--check-config",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "configuration OK", "{stdout}");
    assert!(lines[1].starts_with("threads = "), "{stdout}");
    assert_eq!(lines.len(), 2, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_with_tcp_and_ldapi_on_both_sides() {
    let slapd = start_slapd(SlapdOptions::default()).await;
    let dir = tempfile::Builder::new()
        .prefix("abp")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("ldapi");
    let port = free_port();
    let file = dir.path().join("abproxy.toml");
    // The file names a dead upstream; the flag overrides it with slapd's
    // ldapi socket. Listeners: TCP and a unix socket.
    std::fs::write(
        &file,
        format!(
            "listen = [\"ldap://127.0.0.1:{port}\", \"ldapi://{}\"]\nupstream = \"ldap://127.0.0.1:1\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let mut proxy = Running::start(&[
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--upstream",
        &slapd.ldapi_url(),
    ]);
    proxy.wait_for("upstream reachable");
    let ldapi = abproxy::endpoint::Endpoint::Unix(sock.clone()).url();
    for url in [format!("ldap://127.0.0.1:{port}"), ldapi.clone()] {
        let out = ldap_tool(
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-H",
                &url,
                "-b",
                "ou=people,dc=example,dc=org",
                "(uid=user7)",
                "uid",
            ],
            None,
        )
        .await;
        assert_eq!(out.code, Some(0), "{url}: {out:?}");
        assert!(out.stdout.contains("uid: user7"), "{url}: {out:?}");
    }
    // SASL EXTERNAL through the proxy would reach slapd over its ldapi
    // socket, where slapd would authenticate the proxy's own uid (root here,
    // with write access to cn=config): refused, never forwarded.
    let out = ldap_tool("ldapwhoami", &["-Q", "-Y", "EXTERNAL", "-H", &ldapi], None).await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("abproxy refuses SASL EXTERNAL here"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("uidNumber=0"), "{out:?}");

    let code = tokio::task::spawn_blocking(move || {
        proxy.wait_for("connection closed");
        proxy.sigterm_and_wait()
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "SIGTERM is a clean stop");
    assert!(!sock.exists(), "the ldapi socket is removed on exit");
}

/// The default `threads` (auto) leaves half the CPUs to a server on this
/// host and takes every CPU in front of another host; `--check-config`
/// and the start-up log say which and why. In front of a local slapd on
/// a machine of one or two CPUs that is one thread in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_threads_follow_the_cpus_and_where_the_server_runs() {
    use abproxy::proxy::runtime::{cores, decide, Upstream};
    let check = |upstream: &str| {
        let out = Command::new(BIN)
            .args(["serve", "--upstream", upstream, "--check-config"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let local = decide(0, cores(), Upstream::Local);
    let remote = decide(0, cores(), Upstream::Remote);
    assert!(check("ldap://127.0.0.1:389").contains(&local.why));
    assert!(check("ldapi:///run/slapd/ldapi").contains(&local.why));
    // TEST-NET-1 (RFC 5737): never this host's.
    assert!(check("ldap://192.0.2.1:389").contains(&remote.why));

    let slapd = start_slapd(SlapdOptions::default()).await;
    let url = format!("ldap://127.0.0.1:{}", free_port());
    let mut proxy = Running::start(&["serve", "--listen", &url, "--upstream", &slapd.url()]);
    assert!(proxy.wait_for("threads = 0 (auto)").contains(&local.why));
    proxy.wait_for("upstream reachable");
    let threads = std::fs::read_dir(format!("/proc/{}/task", proxy.child.id()))
        .unwrap()
        .count();
    if local.workers == 1 {
        assert_eq!(
            threads, 1,
            "a current-thread runtime: the main thread alone"
        );
    } else {
        assert!(threads > local.workers, "{threads} threads");
    }
    let code = tokio::task::spawn_blocking(move || proxy.sigterm_and_wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "SIGTERM is a clean stop");
}

/// `threads = 1` runs the proxy on a current-thread runtime: one thread in
/// all, serving reads and writes as slapd answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thread_serves_on_a_single_thread() {
    use testkit::{ADMIN_DN, ADMIN_PW};
    let slapd = start_slapd(SlapdOptions::default()).await;
    let port = free_port();
    let url = format!("ldap://127.0.0.1:{port}");
    let mut proxy = Running::start(&[
        "serve",
        "--listen",
        &url,
        "--upstream",
        &slapd.url(),
        "--threads",
        "1",
    ]);
    proxy.wait_for("upstream reachable");
    let modify = "dn: uid=user3,ou=people,dc=example,dc=org\nchangetype: modify\nreplace: description\ndescription: one thread\n";
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(modify),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let search = |u: String| async move {
        ldap_tool(
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-H",
                &u,
                "-b",
                "uid=user3,ou=people,dc=example,dc=org",
                "-s",
                "base",
                "description",
            ],
            None,
        )
        .await
    };
    let (proxied, direct) = (search(url.clone()).await, search(slapd.url()).await);
    assert_eq!(proxied.code, Some(0), "{proxied:?}");
    assert!(
        proxied.stdout.contains("description: one thread"),
        "{proxied:?}"
    );
    assert_eq!(proxied.stdout, direct.stdout, "same answer as slapd's");
    let pid = proxy.child.id();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert_eq!(
        threads, 1,
        "a current-thread runtime: the main thread alone"
    );
    let code = tokio::task::spawn_blocking(move || proxy.sigterm_and_wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "SIGTERM is a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_warning_then_a_notice() {
    let port = free_port();
    let dead = free_port();
    let mut proxy = Running::start(&[
        "serve",
        "--listen",
        &format!("ldap://127.0.0.1:{port}"),
        "--upstream",
        &format!("ldap://127.0.0.1:{dead}"),
    ]);
    proxy.wait_for("listening");
    let warn = proxy.wait_for("upstream not reachable at start-up");
    assert!(warn.contains("WARN"), "{warn}");
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-H",
            &format!("ldap://127.0.0.1:{port}"),
            "-b",
            "",
            "-s",
            "base",
        ],
        None,
    )
    .await;
    assert_ne!(out.code, Some(0));
    proxy.wait_for("cannot connect to upstream");
    let code = tokio::task::spawn_blocking(move || proxy.sigterm_and_wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
}

#[test]
fn the_example_config_lists_every_default_and_validates() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/abproxy.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let parsed = abproxy::Config::from_toml(&text).unwrap();
    assert_eq!(
        parsed,
        abproxy::Config::default(),
        "contrib/abproxy.toml shows the defaults"
    );
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "--config", path])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    // Every commented backend example is valid once uncommented (one driver at a time).
    for driver in ["command", "openldap"] {
        let mut lines = Vec::new();
        let mut on = false;
        for l in text.lines() {
            if l.trim() == "# [[backends]]" {
                on = true;
            }
            let uncommented = l.strip_prefix("# ").unwrap_or(l);
            let key = uncommented.split('=').next().unwrap_or("").trim();
            let keep = on
                && (uncommented.starts_with("[[backends]]")
                    || ["suffix", "mode"].contains(&key)
                    || (driver == "command"
                        && ["prepare", "done", "driver_timeout_secs"].contains(&key))
                    || (driver == "openldap" && key == "config_url"));
            if keep {
                lines.push(
                    uncommented
                        .split('#')
                        .next()
                        .unwrap()
                        .trim_end()
                        .to_string(),
                );
            }
        }
        lines.push(format!("driver = \"{driver}\""));
        let c = abproxy::Config::from_toml(&lines.join("\n")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.backends.len(), 1, "{driver}");
    }
}

/// `abproxy demo`, the README's first command: a throwaway slapd behind the
/// proxy on the default threads (logged with the reason, as `serve` does),
/// and the commands its banner advertises: a search, a freeze by the lab's
/// admin with `ldapexop`, its status, its end, then a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_what_its_banner_advertises() {
    use abproxy::proxy::runtime::{cores, decide, Upstream};
    use abproxy_proto::{ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID};
    use testkit::{ADMIN_DN, ADMIN_PW};
    let port = free_port();
    let url = format!("ldap://127.0.0.1:{port}");
    let mut demo = Running::start(&["demo", "--port", &port.to_string(), "--users", "5"]);
    let local = decide(0, cores(), Upstream::Local);
    assert!(demo.wait_for("threads = 0 (auto)").contains(&local.why));
    demo.wait_for("upstream reachable");

    let user1 = testkit::user_dn(1);
    let found = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-H",
            &url,
            "-b",
            "dc=example,dc=org",
            "(uid=user1)",
            "dn",
        ],
        None,
    )
    .await;
    assert_eq!(found.code, Some(0), "{found:?}");
    assert!(found.stdout.contains(&format!("dn: {user1}")), "{found:?}");

    let exop = |value: String| {
        let url = url.clone();
        async move {
            ldap_tool(
                "ldapexop",
                &["-x", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW, &value],
                None,
            )
            .await
        }
    };
    let on = exop(format!("{ALLOW_BACKUP_OID}::MAMBAf8=")).await;
    assert_eq!(on.code, Some(0), "ON: {on:?}");
    let frozen = demo.wait_for("Allow-Backup ON: frozen");
    assert!(frozen.contains(ADMIN_DN), "the lab's admin froze: {frozen}");
    let status = exop(ALLOW_BACKUP_STATUS_OID.to_string()).await;
    assert_eq!(status.code, Some(0), "status: {status:?}");
    let off = exop(format!("{ALLOW_BACKUP_OID}::MAMBAQA=")).await;
    assert_eq!(off.code, Some(0), "OFF: {off:?}");
    demo.wait_for("Allow-Backup OFF: released");

    let modify = format!(
        "dn: {user1}\nchangetype: modify\nreplace: description\ndescription: via the demo\n"
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&modify),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let code = tokio::task::spawn_blocking(move || demo.sigterm_and_wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "SIGTERM stops the demo cleanly");
}
