//! The operator CLI over TLS, run as the built binary against a real slapd
//! with the proxy's `[tls]` configured (the PKI and lab of
//! `tests/it/support/pki.rs`): `abproxy on|status|off` over `ldaps://` and over
//! StartTLS with a bind DN and password (with `require_tls = true`), by
//! client certificate alone (`allowed_cert_subjects`), `abproxy run` over
//! ldaps with a command that sees writes held, docs/operations.md's TLS blocks as
//! written, and the exit codes of TLS failures and of a certificate that is
//! not allowed.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::pki::*;
use crate::support::*;
use abproxy::config::Config;
use testkit::user_dn;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");
const BACKUP_DN: &str = "cn=backup,dc=example,dc=org";
const CERT_SUBJECT: &str = "cn=backup,o=Example";

/// The variables the operator commands read; none leaks in from the
/// environment the tests run in.
const OUR_VARS: &[&str] = &[
    "ABPROXY_URL",
    "ABPROXY_BIND_DN",
    "ABPROXY_PASSWORD",
    "ABPROXY_STARTTLS",
    "ABPROXY_CA_FILE",
    "ABPROXY_NO_VERIFY_HOSTNAME",
    "ABPROXY_CERT_FILE",
    "ABPROXY_KEY_FILE",
    "ABPROXY_LOG",
];

/// `program ARGS` with `env` (and `abproxy` first on PATH, ldap-utils
/// reading no ldap.conf), within 60 s.
async fn run_with(program: &str, args: &[&str], env: &[(&str, &str)]) -> ToolOutput {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    for v in OUR_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied())
        .env("PATH", path)
        .env("LDAPCONF", "/dev/null")
        .env("LDAPRC", "/dev/null")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("finished within 60 s")
        .expect("run it");
    ToolOutput::from(out)
}

async fn abproxy(args: &[&str], env: &[(&str, &str)]) -> ToolOutput {
    run_with(BIN, args, env).await
}

/// Runs a docs block with `sh -e`, `replace` applied (the docs'
/// addresses and paths for the lab's).
async fn run_recipe(name: &str, replace: &[(&str, &str)]) -> ToolOutput {
    let mut script = recipe(name).to_string();
    for (from, to) in replace {
        assert!(script.contains(from), "{name} mentions {from}");
        script = script.replace(from, to);
    }
    run_with("sh", &["-ec", &script], &[]).await
}

/// The PKI directory as the docs' `/etc/abproxy/tls/`.
fn tls_dir(pki: &Pki) -> String {
    format!("{}/", pki.dir.path().display())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The proxy with TLS, the client CA and `cn=backup,o=Example` allowed to
/// freeze by certificate (the admin by bind).
async fn cert_lab(pki: &Pki, tweak: impl FnOnce(&mut Config)) -> Lab {
    tls_lab(pki, |c| {
        c.tls.client_ca_file = Some(pki.ca_file());
        c.freeze.allowed = vec![ADMIN_DN.into()];
        c.freeze.allowed_cert_subjects = vec![CERT_SUBJECT.into()];
        tweak(c)
    })
    .await
}

/// on, status, off with `env`; checks each command's output.
async fn on_status_off(env: &[(&str, &str)], holder: &str) {
    let on = abproxy(&["on", "--backend", "dc=example,dc=org"], env).await;
    assert_eq!(on.code, Some(0), "{on:?}");
    assert!(on.stdout.starts_with("frozen: dc=example,dc=org"), "{on:?}");
    let st = abproxy(&["status"], env).await;
    assert_eq!(st.code, Some(0), "{st:?}");
    assert!(st.stdout.contains("state:     frozen"), "{st:?}");
    assert!(
        st.stdout.contains(&format!("holder:    {holder}\n")),
        "{st:?}"
    );
    let off = abproxy(&["off"], env).await;
    assert_eq!(off.code, Some(0), "{off:?}");
    assert!(off.stdout.starts_with("released after"), "{off:?}");
    let st = abproxy(&["status"], env).await;
    assert!(st.stdout.contains("state:     thawed"), "{st:?}");
}

/// With `require_tls = true`: on/status/off over ldaps:// and over StartTLS
/// (flag and variable) bound with a password; the same in clear is refused
/// with confidentialityRequired; docs/operations.md's StartTLS block as written;
/// TLS options that cannot apply are usage errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_operator_over_ldaps_and_starttls_with_require_tls() {
    let pki = Pki::new();
    let lab = tls_lab(&pki, |c| {
        c.tls.require_tls = true;
        c.freeze.allowed = vec![ADMIN_DN.into(), BACKUP_DN.into()];
    })
    .await;
    let ldaps = ldaps_of(&lab);
    let ldap = lab.proxied();
    let ca = path(&pki.ca_file()).to_string();
    let bound = |url: &str| {
        vec![
            ("ABPROXY_URL", url.to_string()),
            ("ABPROXY_CA_FILE", ca.clone()),
            ("ABPROXY_BIND_DN", ADMIN_DN.to_string()),
            ("ABPROXY_PASSWORD", ADMIN_PW.to_string()),
        ]
    };
    let env = bound(&ldaps);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    on_status_off(&env, ADMIN_DN).await;

    // StartTLS from the variable.
    let mut env = bound(&ldap);
    env.push(("ABPROXY_STARTTLS", "1".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    on_status_off(&env, ADMIN_DN).await;

    // Without StartTLS the bind is refused (the proxy requires TLS); the
    // password is not in the output.
    let env = bound(&ldap);
    let env: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| *k != "ABPROXY_CA_FILE")
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let clear = abproxy(&["status"], &env).await;
    assert_eq!(clear.code, Some(4), "{clear:?}");
    assert!(
        clear.stderr.contains("confidentialityRequired (13)")
            && clear.stderr.contains("--starttls"),
        "{clear:?}"
    );
    // The flag, with the password from a file.
    let pw = pki.dir.path().join("admin.pw");
    std::fs::write(&pw, format!("{ADMIN_PW}\n")).unwrap();
    let st = abproxy(
        &[
            "status",
            "--starttls",
            "--url",
            &ldap,
            "--ca-file",
            &ca,
            "--bind-dn",
            ADMIN_DN,
            "--password-file",
            path(&pw),
        ],
        &[],
    )
    .await;
    assert_eq!(st.code, Some(0), "{st:?}");
    assert!(st.stdout.contains("state:     thawed"), "{st:?}");
    for out in [&clear, &st] {
        assert!(!out.stderr.contains(ADMIN_PW) && !out.stdout.contains(ADMIN_PW));
    }

    // docs/operations.md's StartTLS block, with cn=backup,dc=example,dc=org.
    let add = ldap_tool(
        "ldapadd",
        &["-x", "-H", &lab.direct(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&format!(
            "dn: {BACKUP_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n\
             cn: backup\nuserPassword: backup-secret\n"
        )),
    )
    .await;
    assert_eq!(add.code, Some(0), "{add:?}");
    let backup_pw = pki.dir.path().join("backup.pw");
    std::fs::write(&backup_pw, "backup-secret\n").unwrap();
    let out = run_recipe(
        "cli-starttls",
        &[
            ("ldap://127.0.0.1:3389", &ldap),
            ("/etc/abproxy/tls/", &tls_dir(&pki)),
            ("/etc/abproxy/backup.pw", path(&backup_pw)),
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("state:     thawed"), "{out:?}");

    // Usage errors: StartTLS on ldaps://, TLS options on a clear URL, a
    // certificate without its key.
    let both = abproxy(
        &["status", "--starttls", "--url", &ldaps, "--ca-file", &ca],
        &[],
    )
    .await;
    assert_eq!(both.code, Some(2), "{both:?}");
    assert!(both.stderr.contains("in TLS from the start"), "{both:?}");
    let clear_ca = abproxy(&["status", "--url", &ldap, "--ca-file", &ca], &[]).await;
    assert_eq!(clear_ca.code, Some(2), "{clear_ca:?}");
    assert!(
        clear_ca.stderr.contains("not a TLS connection"),
        "{clear_ca:?}"
    );
    let no_key = abproxy(
        &[
            "status",
            "--url",
            &ldaps,
            "--cert-file",
            path(&pki.client.0),
        ],
        &[],
    )
    .await;
    assert_eq!(no_key.code, Some(2), "{no_key:?}");
    assert!(no_key.stderr.contains("--key-file"), "{no_key:?}");
}

/// docs/operations.md's certificate block as written: on, status (holder: the
/// certificate's subject), off, with no bind and no password. A certificate
/// from the same CA whose subject is not allowed, and no certificate at
/// all, are refused with the access exit code (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_alone_freezes_and_an_unlisted_one_is_refused() {
    let pki = Pki::new();
    let lab = cert_lab(&pki, |_| {}).await;
    let ldaps = ldaps_of(&lab);
    let out = run_recipe(
        "cli-tls-cert",
        &[
            ("ldaps://127.0.0.1:3636", &ldaps),
            ("/etc/abproxy/tls/", &tls_dir(&pki)),
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("frozen: dc=example,dc=org"), "{out:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("state:     frozen")),
        "{out:?}"
    );
    assert!(
        lines.contains(&format!("holder:    {CERT_SUBJECT}").as_str()),
        "{out:?}"
    );
    assert!(
        lines.last().unwrap().starts_with("released after"),
        "{out:?}"
    );

    let ca = path(&pki.ca_file()).to_string();
    let intruder = pki
        .ca
        .issue(
            "intruder",
            "/O=Example/CN=intruder",
            "DNS:intruder.example.org",
            30,
        )
        .unwrap();
    let with_cert = |cert: &(std::path::PathBuf, std::path::PathBuf)| {
        vec![
            ("ABPROXY_URL", ldaps.clone()),
            ("ABPROXY_CA_FILE", ca.clone()),
            ("ABPROXY_CERT_FILE", path(&cert.0).to_string()),
            ("ABPROXY_KEY_FILE", path(&cert.1).to_string()),
        ]
    };
    let env = with_cert(&intruder);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let on = abproxy(&["on"], &env).await;
    assert_eq!(on.code, Some(3), "{on:?}");
    assert!(
        on.stderr.contains("insufficientAccessRights (50)")
            && on
                .stderr
                .contains("add cn=intruder,o=Example to [freeze] allowed_cert_subjects"),
        "{on:?}"
    );
    // Without a certificate: anonymous, refused too.
    let none = abproxy(&["on"], &env[..2]).await;
    assert_eq!(none.code, Some(3), "{none:?}");
    assert!(none.stderr.contains("--bind-dn"), "{none:?}");
    // Nothing was frozen.
    let env = with_cert(&pki.client);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let st = abproxy(&["status"], &env).await;
    assert_eq!(st.code, Some(0), "{st:?}");
    assert!(st.stdout.contains("state:     thawed"), "{st:?}");
}

/// A proxy certificate that names only `elsewhere.example.org`: checked
/// against the wrong CA, the commands exit 4 saying the CA is unknown; with
/// the right CA, that the name does not match (expected and presented);
/// with `--no-verify-hostname` the same command works. A client
/// certificate from a CA the proxy does not trust: exit 4, the proxy's TLS
/// alert named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_exit_unreachable_and_say_what_failed() {
    let pki = Pki::new();
    let elsewhere = pki
        .ca
        .issue(
            "elsewhere",
            "/CN=elsewhere.example.org",
            "DNS:elsewhere.example.org",
            30,
        )
        .unwrap();
    let lab = cert_lab(&pki, |c| {
        c.tls.cert_file = Some(elsewhere.0.clone());
        c.tls.key_file = Some(elsewhere.1.clone());
    })
    .await;
    let ldaps = ldaps_of(&lab);
    let cert = [
        ("ABPROXY_CERT_FILE", path(&pki.client.0)),
        ("ABPROXY_KEY_FILE", path(&pki.client.1)),
    ];
    let other_ca = pki.other_ca.ca_file();
    let ca = pki.ca_file();
    let wrong_ca = abproxy(
        &["on", "--url", &ldaps, "--ca-file", path(&other_ca)],
        &cert,
    )
    .await;
    assert_eq!(wrong_ca.code, Some(4), "{wrong_ca:?}");
    assert!(
        wrong_ca.stderr.contains(&format!(
            "TLS with {ldaps} failed: certificate signed by an unknown CA"
        )),
        "{wrong_ca:?}"
    );
    // Over StartTLS too.
    let wrong_ca = abproxy(
        &[
            "status",
            "--starttls",
            "--url",
            &lab.proxied(),
            "--ca-file",
            path(&other_ca),
        ],
        &cert,
    )
    .await;
    assert_eq!(wrong_ca.code, Some(4), "{wrong_ca:?}");
    assert!(wrong_ca.stderr.contains("unknown CA"), "{wrong_ca:?}");

    let wrong_name = abproxy(&["status", "--url", &ldaps, "--ca-file", path(&ca)], &cert).await;
    assert_eq!(wrong_name.code, Some(4), "{wrong_name:?}");
    assert!(
        wrong_name.stderr.contains(
            "certificate not valid for the server's name: expected 127.0.0.1, the certificate \
             names elsewhere.example.org"
        ),
        "{wrong_name:?}"
    );
    let unchecked = abproxy(
        &[
            "status",
            "--url",
            &ldaps,
            "--ca-file",
            path(&ca),
            "--no-verify-hostname",
        ],
        &cert,
    )
    .await;
    assert_eq!(unchecked.code, Some(0), "{unchecked:?}");
    assert!(
        unchecked.stdout.contains("state:     thawed"),
        "{unchecked:?}"
    );

    // A client certificate the proxy does not trust (another CA): the
    // proxy ends the handshake, the command says so.
    let stranger = pki
        .other_ca
        .issue("stranger", "/O=Example/CN=backup", "DNS:x.example.org", 30)
        .unwrap();
    let refused = abproxy(
        &[
            "status",
            "--url",
            &ldaps,
            "--ca-file",
            path(&ca),
            "--no-verify-hostname",
            "--cert-file",
            path(&stranger.0),
            "--key-file",
            path(&stranger.1),
        ],
        &[],
    )
    .await;
    assert_eq!(refused.code, Some(4), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("lost during status: the peer sent the TLS alert")
            && refused.stderr.contains("client_ca_file"),
        "{refused:?}"
    );
}

/// `abproxy run` over ldaps by certificate: the command starts a write
/// through the proxy, sees it queued (status over ldaps) and not on slapd;
/// after the run the write is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_over_ldaps_holds_writes_while_the_command_runs() {
    let pki = Pki::new();
    let lab = cert_lab(&pki, |_| {}).await;
    let ldaps = ldaps_of(&lab);
    let out_dir = pki.dir.path().join("run");
    std::fs::create_dir(&out_dir).unwrap();
    let script = r#"
( printf 'dn: %s\nchangetype: modify\nreplace: description\ndescription: written-during-run\n' "$USER_DN" |
  ldapmodify -x -H "$PROXY" -D "$ADMIN_DN" -w "$ADMIN_PW" > "$OUT/modify.out" 2>&1
  echo $? > "$OUT/modify.rc.tmp" && mv "$OUT/modify.rc.tmp" "$OUT/modify.rc" ) &
i=0
until abproxy status --json | grep -q '"queued_requests": 1,'; do
  i=$((i+1)); [ $i -lt 400 ] || { echo 'the write was never queued' >&2; exit 9; }
  sleep 0.05
done
test ! -e "$OUT/modify.rc"
ldapsearch -x -H "$SLAPD" -D "$ADMIN_DN" -w "$ADMIN_PW" -b "$USER_DN" -s base -LLL description > "$OUT/direct.ldif"
"#;
    let user = user_dn(3);
    let proxy = lab.proxied();
    let slapd = lab.direct();
    let ca = pki.ca_file();
    let env = [
        ("ABPROXY_URL", ldaps.as_str()),
        ("ABPROXY_CA_FILE", path(&ca)),
        ("ABPROXY_CERT_FILE", path(&pki.client.0)),
        ("ABPROXY_KEY_FILE", path(&pki.client.1)),
        ("USER_DN", user.as_str()),
        ("PROXY", proxy.as_str()),
        ("SLAPD", slapd.as_str()),
        ("ADMIN_DN", ADMIN_DN),
        ("ADMIN_PW", ADMIN_PW),
        ("OUT", path(&out_dir)),
    ];
    let run = abproxy(
        &[
            "run",
            "--backend",
            "dc=example,dc=org",
            "--",
            "sh",
            "-ec",
            script,
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stderr.contains("frozen: dc=example,dc=org") && run.stderr.contains("released after"),
        "{run:?}"
    );
    let direct = std::fs::read_to_string(out_dir.join("direct.ldif")).unwrap();
    assert!(direct.contains(&format!("dn: {user}")), "{direct}");
    assert!(!direct.contains("written-during-run"), "{direct}");
    // Released: the held write goes through.
    let rc = out_dir.join("modify.rc");
    wait_until("the held write's answer", 30, || rc.exists()).await;
    let modify = std::fs::read_to_string(out_dir.join("modify.out")).unwrap();
    assert_eq!(
        std::fs::read_to_string(&rc).unwrap().trim(),
        "0",
        "{modify}"
    );
    let after = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-H",
            &lab.direct(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-b",
            &user,
            "-s",
            "base",
            "-LLL",
            "description",
        ],
        None,
    )
    .await;
    assert!(after.stdout.contains("written-during-run"), "{after:?}");
}

/// `--starttls` against a proxy without TLS configured: its StartTLS
/// refusal is reported (exit 4), with a hint on the proxy's TLS settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_refused_by_a_proxy_without_tls_exits_unreachable() {
    let pki = Pki::new();
    let lab = Lab::with(
        testkit::SlapdOptions {
            nosync: true,
            users: 5,
            ..Default::default()
        },
        |c| c.freeze.allowed = vec![ADMIN_DN.into()],
    )
    .await;
    let out = abproxy(
        &[
            "status",
            "--starttls",
            "--url",
            &lab.proxied(),
            "--ca-file",
            path(&pki.ca_file()),
            "--bind-dn",
            ADMIN_DN,
        ],
        &[("ABPROXY_PASSWORD", ADMIN_PW)],
    )
    .await;
    assert_eq!(out.code, Some(4), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("the proxy at {} refused StartTLS", lab.proxied()))
            && out.stderr.contains("cert_file"),
        "{out:?}"
    );
}
