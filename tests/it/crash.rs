//! A proxy killed (SIGKILL) while frozen, with drivers that changed the
//! server: the next start finds what they left in the state file and undoes
//! it, and says so in its log.

use crate::support::process::*;
use crate::support::*;
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_frozen_is_undone_at_the_next_start() {
    let slapd = start_slapd(SlapdOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let marks = dir.path().join("marks");
    let (config, addr) = write_config(
        dir.path(),
        &slapd.url(),
        &format!(
            r#"state_file = "{state}"
[freeze]
allowed = ["{ADMIN_DN}"]
root_dns = ["{ADMIN_DN}"]
[[backends]]
suffix = "dc=example,dc=org"
driver = "openldap"
config_url = "{ldapi}"
[[backends]]
suffix = "dc=other,dc=org"
driver = "command"
prepare = ["sh", "-c", "echo prepare $ABPROXY_FREEZE_ID >> {marks}"]
done = ["sh", "-c", "echo done $ABPROXY_FREEZE_ID >> {marks}"]
"#,
            state = state.display(),
            ldapi = slapd.ldapi_url(),
            marks = marks.display(),
        ),
    );
    let config = config.as_str();
    let url = format!("ldap://{addr}");
    let on = |url: &str| {
        std::process::Command::new(BIN)
            .args([
                "on",
                "--url",
                url,
                "--bind-dn",
                ADMIN_DN,
                "--password",
                ADMIN_PW,
            ])
            .output()
            .unwrap()
    };

    let mut proxy = Running::start(&["serve", "--config", config]);
    proxy.wait_for("listening");
    let out = on(&url);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(olc_read_only(&slapd.ldapi_url()).await, "olcReadOnly: TRUE");
    proxy.kill9();

    // What the crash left: slapd still read-only, the command's DONE never
    // ran, and the state file says both.
    assert_eq!(olc_read_only(&slapd.ldapi_url()).await, "olcReadOnly: TRUE");
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "prepare 1\n");
    let left = std::fs::read_to_string(&state).unwrap();
    assert!(
        left.contains("\"openldap\"") && left.contains("\"command\""),
        "{left}"
    );
    assert!(left.contains("olcDatabase="), "{left}");

    // The next start undoes it before serving, and logs it.
    let mut proxy = Running::start(&["serve", "--config", config]);
    proxy.wait_for("listening");
    proxy.wait_for("a previous abproxy run ended while this backend was prepared");
    proxy.wait_for("left-over freeze undone");
    proxy.wait_for("a previous abproxy run ended while this backend was prepared");
    proxy.wait_for("left-over freeze undone");
    assert!(!state.exists(), "nothing left to undo");
    assert_eq!(
        olc_read_only(&slapd.ldapi_url()).await,
        "",
        "previous (absent) value back"
    );
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "prepare 1\ndone 1\n"
    );
    // And it serves: a write through the proxy, a new freeze cycle.
    let add = ldap_tool(
        "ldapadd",
        &["-x", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some("dn: cn=after-crash,dc=example,dc=org\nobjectClass: device\ncn: after-crash\n"),
    )
    .await;
    assert_eq!(add.code, Some(0), "{add:?}");
    assert!(on(&url).status.success());
    assert!(std::fs::read_to_string(&state)
        .unwrap()
        .contains("openldap"));
    let off = std::process::Command::new(BIN)
        .args([
            "off",
            "--url",
            &url,
            "--bind-dn",
            ADMIN_DN,
            "--password",
            ADMIN_PW,
        ])
        .output()
        .unwrap();
    assert!(off.status.success(), "{off:?}");
    assert!(!state.exists());
    assert_eq!(olc_read_only(&slapd.ldapi_url()).await, "");
    assert_eq!(proxy.sigterm_and_wait(), 0);
}
