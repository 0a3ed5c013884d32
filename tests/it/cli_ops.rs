//! The operator CLI (`abproxy on|off|status|run|hook`), run as the built
//! binary against a real slapd with the proxy in front of it: exit codes,
//! messages, `status --json`, `run` releasing in every case (command fails,
//! SIGTERM, wrapper killed), and the backup-tool hooks.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::freeze::{description, join, modify_in_background};
use crate::support::*;
use abproxy::config::Config;
use abproxy::operator::{self, BackendModeName, Session, State, Status, Target};
use testkit::{user_dn, user_pw, SlapdOptions, ADMIN_DN, ADMIN_PW};

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

/// slapd (20 users) and the proxy, `cn=admin,dc=example,dc=org` allowed.
async fn lab(tweak: impl FnOnce(&mut Config)) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            users: 20,
            ..Default::default()
        },
        |c| {
            c.freeze.allowed = vec![ADMIN_DN.into()];
            tweak(c)
        },
    )
    .await
}

/// `abproxy ARGS` with the lab's proxy and the admin in the environment
/// (ABPROXY_URL, ABPROXY_BIND_DN, ABPROXY_PASSWORD), nothing else of ours.
fn command(lab: &Lab, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("ABPROXY_LOG")
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", ADMIN_DN)
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: tokio::process::Command) -> ToolOutput {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("abproxy did not finish within 60 s")
        .expect("run abproxy");
    ToolOutput::from(out)
}

async fn abproxy(lab: &Lab, args: &[&str]) -> ToolOutput {
    output(command(lab, args)).await
}

/// `abproxy ARGS` with some environment variables removed.
async fn abproxy_without(lab: &Lab, unset: &[&str], args: &[&str]) -> ToolOutput {
    let mut cmd = command(lab, args);
    for v in unset {
        cmd.env_remove(v);
    }
    output(cmd).await
}

fn admin(lab: &Lab) -> Target {
    Target {
        url: lab.proxied(),
        bind_dn: Some(ADMIN_DN.into()),
        password: Some(operator::Password::new(ADMIN_PW)),
    }
}

/// The proxy's status through the library (what the binary prints too).
async fn status(lab: &Lab) -> Status {
    operator::with_session(&admin(lab), Duration::from_secs(10), "", async |s| {
        s.status().await
    })
    .await
    .expect("status")
}

/// Polls the status (10 ms) until `pred` holds; panics after 20 s.
async fn wait_status(lab: &Lab, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(lab).await;
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn parse_status(json: &str) -> Status {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("bad status JSON ({e}): {json}"))
}

#[tokio::test]
async fn on_status_off_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let lab = lab(|c| {
        c.listen.push(format!("ldapi://{}", sock.display()));
    })
    .await;

    let out = abproxy(&lab, &["status", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let s = parse_status(&out.stdout);
    assert_eq!(s.state, State::Thawed);
    assert_eq!(
        (s.holder.as_deref(), s.since, s.freeze_id),
        (None, None, None)
    );
    let suffixes: Vec<&str> = s.backends.iter().map(|b| b.suffix.as_str()).collect();
    assert_eq!(suffixes, ["dc=example,dc=org", "dc=other,dc=org"]);
    assert!(s
        .backends
        .iter()
        .all(|b| !b.frozen && b.mode == BackendModeName::Readonly));

    let out = abproxy(&lab, &["on", "--time-limit", "5"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .starts_with("frozen: dc=example,dc=org; dc=other,dc=org; drained in"),
        "{out:?}"
    );

    let out = abproxy(&lab, &["status", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for key in [
        "state",
        "holder",
        "since",
        "lease_expires",
        "freeze_id",
        "queued_requests",
        "queued_bytes",
        "in_flight",
        "backends",
    ] {
        assert!(json.get(key).is_some(), "no {key} in {json}");
    }
    assert_eq!(json["state"], "frozen");
    assert_eq!(json["backends"][0]["mode"], "readonly");
    let s = parse_status(&out.stdout);
    assert_eq!(s.state, State::Frozen);
    assert_eq!(s.holder.as_deref(), Some(ADMIN_DN));
    assert!(s.freeze_id.is_some());
    let (since, lease) = (s.since.unwrap(), s.lease_expires.unwrap());
    assert!(lease >= since + 590, "lease {lease}, since {since}");
    assert!(s.backends.iter().all(|b| b.frozen));
    assert_eq!((s.queued_requests, s.queued_bytes), (0, 0));

    let out = abproxy(&lab, &["status"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for needle in [
        "state:     frozen (freeze id",
        &format!("holder:    {ADMIN_DN}"),
        "since:     20",
        "lease:     20",
        "queued:    0 request(s), 0 byte(s)",
        "in flight:",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in {}", out.stdout);
    }
    assert!(
        out.stdout.lines().any(|l| l.contains("dc=other,dc=org")
            && l.contains("readonly")
            && l.ends_with(" frozen")),
        "{}",
        out.stdout
    );

    let out = abproxy(&lab, &["off"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("released after "), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);
    let out = abproxy(&lab, &["off"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("not frozen"), "{out:?}");

    // One backend, over the ldapi listener, password from a file (and
    // neither the environment's URL nor its password).
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{ADMIN_PW}\nignored second line\n")).unwrap();
    let ldapi = format!("ldapi://{}", sock.display());
    let pwfile = pwfile.to_str().unwrap();
    let conn = ["--url", &ldapi, "--password-file", pwfile];
    let mut args = vec!["on", "--backend", "dc=other,dc=org"];
    args.extend(conn);
    let out = abproxy_without(&lab, &["ABPROXY_URL", "ABPROXY_PASSWORD"], &args).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("frozen: dc=other,dc=org;"),
        "{out:?}"
    );
    let mut args = vec!["status", "--json"];
    args.extend(conn);
    let out = abproxy_without(&lab, &["ABPROXY_URL", "ABPROXY_PASSWORD"], &args).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let frozen: Vec<(String, bool)> = parse_status(&out.stdout)
        .backends
        .into_iter()
        .map(|b| (b.suffix, b.frozen))
        .collect();
    assert_eq!(
        frozen,
        [
            ("dc=example,dc=org".to_string(), false),
            ("dc=other,dc=org".to_string(), true)
        ]
    );
    let mut args = vec!["off"];
    args.extend(conn);
    let out = abproxy_without(&lab, &["ABPROXY_URL", "ABPROXY_PASSWORD"], &args).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn refusals_and_unreachable_proxies_have_their_exit_codes() {
    let lab = lab(|_| {}).await;

    // Wrong password: 4, and the password is never echoed.
    let out = abproxy(&lab, &["on", "--password", "wrong-pw-4711"]).await;
    assert_eq!(out.code, Some(4), "{out:?}");
    assert!(out.stderr.contains("invalid credentials (49)"), "{out:?}");
    assert!(out.stderr.contains("check --bind-dn and the password"));
    assert!(!out.stderr.contains("wrong-pw-4711") && !out.stdout.contains("wrong-pw-4711"));

    // An identity that may not freeze: 3.
    let (dn, pw) = (user_dn(1), user_pw(1));
    let out = abproxy(&lab, &["on", "--bind-dn", &dn, "--password", &pw]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(
        out.stderr.contains("insufficientAccessRights (50)")
            && out.stderr.contains("[freeze] allowed"),
        "{out:?}"
    );
    // Anonymous: 3, told to bind.
    let out = abproxy_without(&lab, &["ABPROXY_BIND_DN", "ABPROXY_PASSWORD"], &["status"]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("--bind-dn"), "{out:?}");
    // A DN without a password, a bad number: usage, 2.
    let out = abproxy_without(&lab, &["ABPROXY_PASSWORD"], &["on"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("without a password"), "{out:?}");
    let out = abproxy(&lab, &["on", "--time-limit", "soon"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = abproxy(&lab, &["run", "true"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);

    // Second ON: busy, 3, naming the holder and what to do.
    assert_eq!(abproxy(&lab, &["on"]).await.code, Some(0));
    let out = abproxy(&lab, &["on"]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    for needle in [
        "busy (51)",
        "already frozen by",
        ADMIN_DN,
        "since 20",
        "abproxy off",
    ] {
        assert!(out.stderr.contains(needle), "{needle:?} in {out:?}");
    }
    // `run` does not run its command when ON fails.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let out = abproxy(&lab, &["run", "--", "touch", marker.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("was not run"), "{out:?}");
    assert!(!marker.exists());
    assert_eq!(abproxy(&lab, &["off"]).await.code, Some(0));

    // No such backend: 3.
    let out = abproxy(&lab, &["on", "--backend", "dc=nowhere"]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(
        out.stderr.contains("noSuchObject (32)") && out.stderr.contains("dc=nowhere"),
        "{out:?}"
    );
    assert_eq!(status(&lab).await.state, State::Thawed);

    // The LDAP server itself instead of the proxy: protocolError, 3.
    let out = abproxy(&lab, &["status", "--url", &lab.direct()]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("not the LDAP server itself"), "{out:?}");

    // Nothing listening: 4.
    let url = format!("ldap://127.0.0.1:{}", closed_port());
    // (`hook --after` with no freeze recorded connects to nothing.)
    for args in [vec!["status"], vec!["on"], vec!["hook", "--before"]] {
        let mut args = args;
        args.extend(["--url", &url]);
        let out = abproxy(&lab, &args).await;
        assert_eq!(out.code, Some(4), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("cannot connect") && out.stderr.contains("is the proxy running"),
            "{out:?}"
        );
    }

    // Something that accepts connections and never answers: 5.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ldap://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let out = abproxy(&lab, &["status", "--url", &url, "--timeout", "0.5"]).await;
    assert_eq!(out.code, Some(5), "{out:?}");
    assert!(out.stderr.contains("timed out after 0.5 s"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn run_holds_the_freeze_while_the_command_runs() {
    let lab = lab(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("status.json");
    // The command asks the proxy for its status while it runs.
    let out = abproxy(
        &lab,
        &[
            "run",
            "--time-limit",
            "5",
            "--",
            "sh",
            "-c",
            r#""$0" status --json > "$1""#,
            BIN,
            seen.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let during = parse_status(&std::fs::read_to_string(&seen).unwrap());
    assert_eq!(during.state, State::Frozen);
    assert_eq!(during.holder.as_deref(), Some(ADMIN_DN));
    assert!(during.backends.iter().all(|b| b.frozen));
    assert!(out.stderr.contains("frozen: dc=example,dc=org"), "{out:?}");
    assert!(out.stderr.contains("released after"), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);

    // The command's exit status is run's.
    let out = abproxy(&lab, &["run", "--", "sh", "-c", "exit 7"]).await;
    assert_eq!(out.code, Some(7), "{out:?}");
    assert!(out.stderr.contains("exited with status 7"), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn run_releases_when_the_command_fails_or_cannot_start() {
    let lab = lab(|_| {}).await;
    let out = abproxy(&lab, &["run", "--", "false"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("released after"), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);

    let out = abproxy(&lab, &["run", "--", "/nonexistent/backup-tool"]).await;
    assert_eq!(out.code, Some(127), "{out:?}");
    assert!(out.stderr.contains("cannot run"), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn sigterm_to_run_is_forwarded_then_the_freeze_is_released() {
    let lab = lab(|_| {}).await;
    let mut cmd = command(&lab, &["run", "--", "sleep", "30"]);
    cmd.stdout(Stdio::null());
    let child = cmd.spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    let started = Instant::now();
    wait_status(&lab, "the freeze by run", |s| {
        s.state == State::Frozen && s.holder.as_deref() == Some(ADMIN_DN)
    })
    .await;

    // A write through the proxy is held meanwhile.
    let write = modify_in_background(&lab.proxied(), 3, "queued during run");
    wait_status(&lab, "the modify queued", |s| s.queued_requests == 1).await;
    assert!(!write.is_finished());

    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("run did not end after SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // sleep died of the forwarded SIGTERM: 128 + 15.
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(
        stderr.contains("SIGTERM received: forwarding it to sleep 30"),
        "{stderr}"
    );
    assert!(stderr.contains("killed by SIGTERM"), "{stderr}");
    assert!(
        stderr.contains("released after") && stderr.contains("1 queued request(s) resumed"),
        "{stderr}"
    );
    assert_eq!(join(write, "the queued modify").await, 0);
    assert_eq!(
        description(&lab.direct(), 3).await.as_deref(),
        Some("queued during run")
    );
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn a_command_that_terminates_its_wrapper_still_gets_the_release() {
    let lab = lab(|_| {}).await;
    let mut cmd = command(
        &lab,
        &["run", "--", "sh", "-c", "kill -TERM $PPID; sleep 5"],
    );
    // The shell's sleep may outlive it: do not wait for its stdio.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let started = Instant::now();
    let st = tokio::time::timeout(Duration::from_secs(20), cmd.status())
        .await
        .expect("run did not end")
        .unwrap();
    assert_eq!(st.code(), Some(143));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn a_killed_wrapper_releases_the_freeze() {
    let lab = lab(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let mut cmd = command(
        &lab,
        &[
            "run",
            "--",
            "sh",
            "-c",
            r#"echo $$ > "$0"; exec sleep 30"#,
            pidfile.to_str().unwrap(),
        ],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    wait_status(&lab, "the freeze by run", |s| s.state == State::Frozen).await;
    let write = modify_in_background(&lab.proxied(), 4, "after SIGKILL");
    wait_status(&lab, "the modify queued", |s| s.queued_requests == 1).await;
    child.start_kill().unwrap(); // SIGKILL: no OFF, the connection just closes
    child.wait().await.unwrap();
    // holdUntilUnbind: the proxy ends the freeze when the connection closes.
    assert_eq!(join(write, "the queued modify").await, 0);
    wait_status(&lab, "thawed", |s| s.state == State::Thawed).await;
    // The orphaned command.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[tokio::test]
async fn hook_before_holds_writes_until_hook_after() {
    let lab = lab(|_| {}).await;
    let out = abproxy(&lab, &["hook", "--before", "--time-limit", "5"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("frozen: "), "{out:?}");
    // The process has exited; the freeze stays.
    assert_eq!(status(&lab).await.state, State::Frozen);
    // A second --before on the same state file leaves the first job's
    // record and holder alone.
    let again = abproxy(&lab, &["hook", "--before"]).await;
    assert_eq!(again.code, Some(3), "{again:?}");
    assert!(
        again.stderr.contains("is still held (holder process"),
        "{again:?}"
    );

    let write = modify_in_background(&lab.proxied(), 2, "held by the hook");
    let s = wait_status(&lab, "the modify queued", |s| s.queued_requests == 1).await;
    assert!(s.queued_bytes > 0);
    assert!(!write.is_finished());
    assert_ne!(
        description(&lab.direct(), 2).await.as_deref(),
        Some("held by the hook")
    );

    let out = abproxy(&lab, &["hook", "--after"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("released after") && out.stdout.contains("1 queued request(s)"),
        "{out:?}"
    );
    assert_eq!(join(write, "the held modify").await, 0);
    assert_eq!(
        description(&lab.direct(), 2).await.as_deref(),
        Some("held by the hook")
    );
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn a_killed_hook_holder_ends_its_freeze_and_after_says_so() {
    let lab = lab(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("job");
    let state = state.to_str().unwrap();
    let out = abproxy(&lab, &["hook", "--before", "--state-file", state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let record = std::fs::read_to_string(state).unwrap();
    let pid: i32 = record
        .lines()
        .find_map(|l| l.strip_prefix("holder "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{record:?}"));
    assert_eq!(status(&lab).await.state, State::Frozen);
    // The holder dies: its connection ends, and the freeze with it
    // (holdUntilUnbind): nothing stays frozen for a dead job.
    // SAFETY: a plain kill of the holder this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_status(&lab, "the freeze to end with its holder", |s| {
        s.state == State::Thawed
    })
    .await;
    let out = abproxy(&lab, &["hook", "--after", "--state-file", state]).await;
    assert_eq!(out.code, Some(6), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("its holder (process {pid}) is gone"))
            && out.stderr.contains("may be inconsistent"),
        "{out:?}"
    );
    // Reported once.
    let out = abproxy(&lab, &["hook", "--after", "--state-file", state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("nothing to release"), "{out:?}");
}

#[tokio::test]
async fn hook_after_alone_or_after_a_failed_before_exits_0() {
    let lab = lab(|_| {}).await;
    let out = abproxy(&lab, &["hook", "--after"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("nothing to release"), "{out:?}");

    let out = abproxy(&lab, &["hook", "--before", "--backend", "dc=nowhere"]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    let out = abproxy(&lab, &["hook", "--after"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("OFF not sent"), "{out:?}");

    // --after takes no freeze options; one of --before/--after is required.
    let out = abproxy(&lab, &["hook", "--after", "--time-limit", "3"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = abproxy(&lab, &["hook"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
}

#[tokio::test]
async fn hook_after_warns_when_the_freeze_expired() {
    let lab = lab(|c| c.freeze.lease_secs = 1).await;
    let out = abproxy(&lab, &["hook", "--before"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(status(&lab).await.state, State::Frozen);
    // The lease ends the freeze by itself.
    wait_status(&lab, "the lease to expire", |s| s.state == State::Thawed).await;
    let out = abproxy(&lab, &["hook", "--after"]).await;
    assert_eq!(out.code, Some(6), "{out:?}");
    assert!(
        out.stderr.contains("warning: freeze 1 is not the current freeze (current: none); it ended: its lease expired after 1 s")
            && out.stderr.contains("may be inconsistent"),
        "{out:?}"
    );
    assert!(out.stderr.contains("lease_secs"), "{out:?}");
    // Reported once.
    let out = abproxy(&lab, &["hook", "--after"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // A plain `abproxy off` was told already too.
    let out = abproxy(&lab, &["off"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// The freeze id at the end of "...; freeze id N".
fn freeze_id_in(text: &str) -> u64 {
    let (_, tail) = text.rsplit_once("freeze id ").expect("a freeze id");
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no id in {text:?}"))
}

#[tokio::test]
async fn run_whose_freeze_expired_does_not_release_the_next_jobs_freeze() {
    // Issue 18, item 13 (a).
    let lab = lab(|c| c.freeze.lease_secs = 3).await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let b_state = dir.path().join("b.state");
    let b_state = b_state.to_str().unwrap();
    // Job A: `run` around a command that lasts until the test says so.
    let a = command(
        &lab,
        &[
            "run",
            "--",
            "sh",
            "-c",
            r#"until [ -e "$0" ]; do sleep 0.05; done"#,
            go.to_str().unwrap(),
        ],
    )
    .spawn()
    .unwrap();
    let s = wait_status(&lab, "A's freeze", |s| s.state == State::Frozen).await;
    let first = s.freeze_id.unwrap();
    // A loses its freeze to the lease; job B freezes.
    wait_status(&lab, "the lease to expire", |s| s.state == State::Thawed).await;
    let out = abproxy(&lab, &["hook", "--before", "--state-file", b_state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let second = freeze_id_in(&out.stdout);
    assert_eq!(second, first + 1, "{out:?}");
    // A's command ends: A's OFF must not end B's freeze, and A fails.
    std::fs::write(&go, "").unwrap();
    let out = ToolOutput::from(
        tokio::time::timeout(Duration::from_secs(30), a.wait_with_output())
            .await
            .expect("run ends")
            .unwrap(),
    );
    assert_eq!(out.code, Some(6), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "freeze {first} is not the current freeze (current: freeze {second}); it ended: its lease expired"
        )),
        "{out:?}"
    );
    let s = status(&lab).await;
    assert_eq!((s.state, s.freeze_id), (State::Frozen, Some(second)));
    // B's own release works.
    let out = abproxy(&lab, &["hook", "--after", "--state-file", b_state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("released after"), "{out:?}");
    assert_eq!(freeze_id_in(&out.stdout), second);
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test]
async fn a_hook_whose_before_was_busy_does_not_release_another_jobs_freeze() {
    // Issue 18, item 13 (b), with a state file per job.
    let lab = lab(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (a_state, b_state) = (dir.path().join("a"), dir.path().join("b"));
    let (a_state, b_state) = (a_state.to_str().unwrap(), b_state.to_str().unwrap());
    let out = abproxy(&lab, &["hook", "--before", "--state-file", a_state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let a_id = freeze_id_in(&out.stdout);
    // The record: the freeze's id and the holder keeping its connection.
    let record = std::fs::read_to_string(a_state).unwrap();
    let holder: i32 = record
        .strip_prefix(&format!("freeze-id {a_id}\nholder "))
        .and_then(|pid| pid.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{record:?}"));
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(holder, 0) }, 0, "the holder runs");
    let out = abproxy(&lab, &["hook", "--before", "--state-file", b_state]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("busy (51)"), "{out:?}");
    // B's on-error hook: nothing recorded, nothing sent.
    let out = abproxy(&lab, &["hook", "--after", "--state-file", b_state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("OFF not sent"), "{out:?}");
    let s = status(&lab).await;
    assert_eq!((s.state, s.freeze_id), (State::Frozen, Some(a_id)));
    // `off --freeze-id` of another freeze: 6, nothing released.
    let other = (a_id + 5).to_string();
    let out = abproxy(&lab, &["off", "--freeze-id", &other]).await;
    assert_eq!(out.code, Some(6), "{out:?}");
    assert!(out.stderr.contains("nothing released"), "{out:?}");
    assert_eq!(status(&lab).await.freeze_id, Some(a_id));
    // A's own --after releases A's freeze, and spends the record.
    let out = abproxy(&lab, &["hook", "--after", "--state-file", a_state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(freeze_id_in(&out.stdout), a_id);
    assert!(!Path::new(a_state).exists());
    assert_eq!(status(&lab).await.state, State::Thawed);

    // A's freeze released by an operator's plain `abproxy off`: A's --after
    // fails (6) and says who released it.
    let out = abproxy(&lab, &["hook", "--before", "--state-file", a_state]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = abproxy(&lab, &["off"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = abproxy(&lab, &["hook", "--after", "--state-file", a_state]).await;
    assert_eq!(out.code, Some(6), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("it ended: released by {ADMIN_DN} (conn")),
        "{out:?}"
    );
}

#[tokio::test]
async fn an_empty_password_is_refused_before_connecting() {
    // Nothing listens there: a connection attempt would exit 4.
    let url = format!("ldap://127.0.0.1:{}", closed_port());
    for args in [
        &["on", "--url", &url, "--password", ""][..],
        &["status", "--url", &url, "--password", ""],
        &["hook", "--before", "--url", &url, "--password", ""],
        &["run", "--url", &url, "--password", "", "--", "true"],
    ] {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(args)
            .env_remove("ABPROXY_PASSWORD")
            .env_remove("ABPROXY_URL")
            .env("ABPROXY_BIND_DN", ADMIN_DN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = output(cmd).await;
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(out.stderr.contains("the password is empty"), "{out:?}");
    }
    // Through the library too.
    let err = Session::connect(&Target {
        url,
        bind_dn: Some(ADMIN_DN.into()),
        password: Some(operator::Password::new("")),
    })
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
}

#[tokio::test]
async fn the_library_and_the_help_agree_on_exit_codes() {
    let out = std::process::Command::new(BIN)
        .args(["on", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains(operator::EXIT_STATUS_HELP), "{help}");
    assert_eq!(
        (
            operator::exit::OK,
            operator::exit::USAGE,
            operator::exit::REFUSED,
            operator::exit::UNREACHABLE,
            operator::exit::TIMEOUT,
            operator::exit::FAILED
        ),
        (0, 2, 3, 4, 5, 6)
    );
    // A session on nothing: the library's error carries the same code.
    let err = Session::connect(&Target {
        url: format!("ldap://127.0.0.1:{}", closed_port()),
        bind_dn: None,
        password: None,
    })
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 4);
    assert!(Path::new(BIN).exists());
}

#[tokio::test]
async fn local_users_by_uid_on_ldapi_without_a_bind() {
    let dir = tempfile::Builder::new()
        .prefix("abp")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("admin");
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let ldapi = format!("ldapi://{}", sock.display());
    let lab = lab(|c| {
        c.listen.push(format!("ldapi://{}", sock.display()));
        c.freeze.allowed_uids = vec![uid];
    })
    .await;
    // No bind DN, no password: the kernel's word for the uid is enough.
    let none = ["ABPROXY_BIND_DN", "ABPROXY_PASSWORD"];
    let on = abproxy_without(&lab, &none, &["on", "--url", &ldapi]).await;
    assert_eq!(on.code, Some(0), "{on:?}");
    let st = abproxy_without(&lab, &none, &["status", "--json", "--url", &ldapi]).await;
    let status: Status = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(
        status.holder.as_deref(),
        Some(format!("gidNumber={gid}+uidNumber={uid},cn=peercred,cn=external,cn=auth").as_str())
    );
    assert_eq!(
        abproxy_without(&lab, &none, &["off", "--url", &ldapi])
            .await
            .code,
        Some(0)
    );
    // Over TCP the same anonymous client is refused.
    let tcp = abproxy_without(&lab, &none, &["on"]).await;
    assert_eq!(tcp.code, Some(3), "{tcp:?}");
}

#[tokio::test]
async fn uids_not_listed_are_refused_on_ldapi() {
    let dir = tempfile::Builder::new()
        .prefix("abp")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("admin");
    let ldapi = format!("ldapi://{}", sock.display());
    let lab = lab(|c| c.listen.push(format!("ldapi://{}", sock.display()))).await;
    let none = ["ABPROXY_BIND_DN", "ABPROXY_PASSWORD"];
    let on = abproxy_without(&lab, &none, &["on", "--url", &ldapi]).await;
    assert_eq!(on.code, Some(3), "{on:?}");
    assert!(on.stderr.contains("allowed_uids"), "{on:?}");
}

/// docs/allow-backup.md's `ldapexop` lines, run as written (with the lab's proxy for
/// `ldap://proxy:389`): each ON value decodes to what its comment says (and
/// to the hex shown), freezes what it says, and the OFF line releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_ldapexop_lines_work_as_written() {
    // The lab's rootdn (password "secret") is an operator, in root_dns.
    let lab = lab(|_| {}).await;

    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/allow-backup.md"));
    let marker = "<!-- recipe: ldapexop -->\n```sh\n";
    let block = &readme[readme.find(marker).expect("the marked block") + marker.len()..];
    let block = &block[..block.find("```").unwrap()];
    let prelude: String = block
        .lines()
        .filter(|l| l.starts_with("OID=") || l.starts_with("AUTH="))
        .map(|l| l.replace("ldap://proxy:389", &lab.proxied()) + "\n")
        .collect();
    assert_eq!(prelude.lines().count(), 2, "{block}");
    // (command, comment), a comment continued on the next line joined.
    let mut lines: Vec<(String, String)> = Vec::new();
    for l in block.lines() {
        if l.starts_with("ldapexop") {
            let (cmd, comment) = l.split_once('#').unwrap_or((l, ""));
            lines.push((cmd.trim().to_string(), comment.trim().to_string()));
        } else if let Some(c) = l.trim_start().strip_prefix('#') {
            lines.last_mut().unwrap().1 = c.trim().to_string();
        }
    }
    let sh = |cmd: String| {
        let script = format!("{prelude}{cmd}");
        async move {
            let out = tokio::process::Command::new("sh")
                .args(["-c", &script])
                .output()
                .await
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let value = |cmd: &str| {
        let b64 = cmd.split("$OID::").nth(1)?.trim();
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s '{b64}' | base64 -d")])
            .output()
            .unwrap();
        assert!(out.status.success());
        Some(out.stdout)
    };
    let off = lines
        .iter()
        .find(|(_, c)| c.starts_with("OFF"))
        .expect("an OFF line")
        .0
        .clone();
    assert_eq!(
        abproxy_proto::decode_request(&value(&off).unwrap()).unwrap(),
        abproxy_proto::AllowBackupRequest::off()
    );
    let mut ons = 0;
    for (cmd, comment) in &lines {
        let Some(bytes) = value(cmd) else {
            // The status line.
            assert!(comment.starts_with("status"), "{cmd} # {comment}");
            sh(cmd.clone()).await;
            continue;
        };
        // The hex at the end of the comment, where shown, is the value.
        let mut hex: Vec<u8> = comment
            .split_whitespace()
            .rev()
            .map_while(|t| (t.len() == 2).then(|| u8::from_str_radix(t, 16).ok())?)
            .collect();
        hex.reverse();
        if !hex.is_empty() {
            assert_eq!(hex, bytes, "{cmd} # {comment}");
        }
        let req = abproxy_proto::decode_request(&bytes).unwrap();
        if !comment.starts_with("ON") {
            continue;
        }
        ons += 1;
        assert!(req.mode, "{comment}");
        assert_eq!(
            req.time_limit,
            comment.contains("timeLimit 30").then_some(30),
            "{comment}"
        );
        let only_example = comment.contains("dnSet {dc=example,dc=org}");
        assert_eq!(req.dn_set.is_some(), only_example, "{comment}");
        sh(cmd.clone()).await;
        let s = status(&lab).await;
        assert_eq!(s.state, State::Frozen, "{comment}");
        for b in &s.backends {
            assert_eq!(
                b.frozen,
                !only_example || b.suffix == "dc=example,dc=org",
                "{comment}: {b:?}"
            );
        }
        sh(off.clone()).await;
        assert_eq!(status(&lab).await.state, State::Thawed, "{comment}");
    }
    assert_eq!(ons, 3, "{block}");
}
