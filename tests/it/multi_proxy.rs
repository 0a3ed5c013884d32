//! Several proxies frozen together (`--url` repeated): two proxies in
//! front of two slapds (replicated servers each behind its own proxy), and
//! two proxies in front of one slapd (an HA pair). `on`, `off`, `status`,
//! `run`, `backup` and `hook` through both, as the built binary; all or
//! nothing: one proxy refusing leaves neither frozen.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use abproxy::config::Config;
use abproxy::operator::{self, State, Status, Target};
use abproxy::ProxyHandle;
use testkit::{user_dn, SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN};

use crate::support::freeze::{description, join, modify_in_background};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

fn opts() -> SlapdOptions {
    SlapdOptions {
        nosync: true,
        users: 20,
        ..Default::default()
    }
}

/// slapd (20 users) and a proxy in front of it that lets `allowed` freeze.
async fn lab(allowed: &str) -> Lab {
    let allowed = allowed.to_string();
    Lab::with(opts(), |c| c.freeze.allowed = vec![allowed]).await
}

/// A second proxy in front of `lab`'s slapd (the other half of an HA
/// pair), configured as the lab's.
async fn second_proxy(lab: &Lab) -> ProxyHandle {
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.direct(),
        ..Config::default()
    };
    config.freeze.root_dns = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
    config.freeze.allowed = vec![ADMIN_DN.into()];
    ProxyHandle::spawn(config).await.expect("start proxy")
}

/// `abproxy ARGS` as the admin, no ABPROXY_URL (the URLs are in `args`),
/// bounded to 120 s.
async fn abproxy(args: &[&str]) -> ToolOutput {
    abproxy_env(args, &[]).await
}

async fn abproxy_env(args: &[&str], env: &[(&str, &str)]) -> ToolOutput {
    let mut cmd = command(args);
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("abproxy did not finish within 120 s")
        .expect("run abproxy");
    ToolOutput::from(out)
}

fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("ABPROXY_LOG")
        .env_remove("ABPROXY_URL")
        .env_remove("ABPROXY_HOOK_STATE")
        .env("ABPROXY_BIND_DN", ADMIN_DN)
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The status of the proxy at `url`, read as the admin.
async fn status(url: &str) -> Status {
    let admin = Target {
        url: url.into(),
        bind_dn: Some(ADMIN_DN.into()),
        password: Some(operator::Password::new(ADMIN_PW)),
    };
    operator::with_session(&admin, Duration::from_secs(10), "", async |s| {
        s.status().await
    })
    .await
    .expect("status")
}

/// A write through each lab's proxy, waited for until its proxy holds it.
async fn held_writes(labs: &[&Lab], value: &str) -> Vec<tokio::task::JoinHandle<u32>> {
    let mut writes = Vec::new();
    for (i, lab) in labs.iter().enumerate() {
        writes.push(modify_in_background(&lab.proxied(), 2, value));
        let engine = lab.proxy.engine();
        wait_until(&format!("the write through proxy {i} held"), 20, || {
            engine.queued().0 == 1
        })
        .await;
    }
    for w in &writes {
        assert!(!w.is_finished(), "a write went through a frozen proxy");
    }
    writes
}

/// Each held write answered success once released, and in its server.
async fn writes_landed(labs: &[&Lab], writes: Vec<tokio::task::JoinHandle<u32>>, value: &str) {
    for (lab, w) in labs.iter().zip(writes) {
        assert_eq!(join(w, "the held modify").await, 0);
        assert_eq!(description(&lab.direct(), 2).await.as_deref(), Some(value));
        assert_eq!(lab.proxy.engine().queued().0, 0);
    }
}

async fn assert_thawed(urls: &[&str]) {
    for url in urls {
        let s = status(url).await;
        assert_eq!(s.state, State::Thawed, "{url}: {s:?}");
    }
}

async fn assert_frozen(labs: &[&Lab]) {
    for lab in labs {
        assert!(lab.proxy.engine().established().is_some());
        let s = status(&lab.proxied()).await;
        assert_eq!(s.state, State::Frozen, "{}: {s:?}", lab.proxied());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_and_off_through_two_proxies_in_front_of_two_servers() {
    let (a, b) = tokio::join!(lab(ADMIN_DN), lab(ADMIN_DN));
    let (ua, ub) = (a.proxied(), b.proxied());

    let out = abproxy(&["on", "--url", &ua, "--proxy", &ub, "--time-limit", "5"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(lines[0].starts_with(&format!("{ua}: frozen: ")), "{out:?}");
    assert!(lines[1].starts_with(&format!("{ub}: frozen: ")), "{out:?}");
    assert_frozen(&[&a, &b]).await;
    let writes = held_writes(&[&a, &b], "held by two proxies").await;

    // One block per proxy; --json: an array, each object with its url.
    let out = abproxy(&["status", "--url", &ua, "--url", &ub]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.matches("state:     frozen").count(),
        2,
        "{out:?}"
    );
    assert!(out.stdout.contains(&format!("proxy:     {ub}")), "{out:?}");
    let out = abproxy(&["status", "--json", "--url", &ua, "--url", &ub]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let urls: Vec<&str> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| {
            assert_eq!(s["state"], "frozen", "{s}");
            s["url"].as_str().unwrap()
        })
        .collect();
    assert_eq!(urls, [ua.as_str(), ub.as_str()]);

    // ABPROXY_URL with both, separated by a comma.
    let both = format!("{ua},{ub}");
    let out = abproxy_env(&["off"], &[("ABPROXY_URL", &both)]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(
        lines[0].starts_with(&format!("{ua}: released after"))
            && lines[1].starts_with(&format!("{ub}: released after")),
        "{out:?}"
    );
    assert!(out.stdout.contains("1 queued request(s)"), "{out:?}");
    writes_landed(&[&a, &b], writes, "held by two proxies").await;
    assert_thawed(&[&ua, &ub]).await;

    // Nothing frozen: off through both is 0, each "not frozen"; one URL
    // still prints as before.
    let out = abproxy(&["off", "--url", &ua, "--url", &ub]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.matches("not frozen").count(), 2, "{out:?}");
    let out = abproxy(&["off", "--url", &ua]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "not frozen (nothing to release)\n", "{out:?}");
}

/// Neither proxy frozen: A's status (as the admin) says thawed, and so do
/// both engines (B does not let the admin ask).
async fn neither_frozen(a: &Lab, b: &Lab) {
    assert_thawed(&[&a.proxied()]).await;
    for lab in [a, b] {
        assert!(lab.proxy.engine().established().is_none());
        assert_eq!(lab.proxy.engine().queued().0, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_proxy_refusing_leaves_neither_frozen() {
    // B does not let the admin freeze (insufficientAccessRights).
    let (a, b) = tokio::join!(lab(ADMIN_DN), lab("cn=someone else,dc=example,dc=org"));
    let (ua, ub) = (a.proxied(), b.proxied());

    let out = abproxy(&["on", "--url", &ua, "--url", &ub]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    // Neither left frozen (without the release, A would stay frozen: the
    // connection of a plain ON does not hold the freeze).
    neither_frozen(&a, &b).await;
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "{ub}: error: ON refused: insufficientAccessRights (50)"
        )),
        "{out:?}"
    );
    // A had frozen: released again, naming its freeze.
    assert!(
        out.stderr.contains(&format!(
            "{ua}: released again (all or nothing): released after"
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("the freeze failed at 1 of 2 proxies"),
        "{out:?}"
    );
    neither_frozen(&a, &b).await;

    // run: CMD is not run, nothing stays frozen.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    let out = abproxy(&["run", "--url", &ua, "--url", &ub, "--", "sh", "-c", &script]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(!marker.exists(), "CMD ran: {out:?}");
    assert!(out.stderr.contains("was not run"), "{out:?}");
    neither_frozen(&a, &b).await;

    // hook --before: fails, records nothing, leaves nothing frozen.
    let state = dir.path().join("hook");
    let state = state.to_str().unwrap();
    let out = abproxy(&[
        "hook",
        "--before",
        "--state-file",
        state,
        "--url",
        &ua,
        "--url",
        &ub,
    ])
    .await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(!Path::new(state).exists(), "{out:?}");
    neither_frozen(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_holds_both_proxies_while_the_command_runs() {
    let (a, b) = tokio::join!(lab(ADMIN_DN), lab(ADMIN_DN));
    let (ua, ub) = (a.proxied(), b.proxied());
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let go = dir.path().join("go");
    let script = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.05; done",
        ready.display(),
        go.display()
    );
    let run = command(&["run", "--url", &ua, "--url", &ub, "--", "sh", "-c", &script])
        .spawn()
        .expect("run abproxy run");
    wait_until("CMD to start", 30, || ready.exists()).await;
    assert_frozen(&[&a, &b]).await;
    let writes = held_writes(&[&a, &b], "held during run").await;
    std::fs::write(&go, "").unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), run.wait_with_output())
        .await
        .expect("run did not end")
        .expect("run's output");
    let out = ToolOutput::from(out);
    assert_eq!(out.code, Some(0), "{out:?}");
    for url in [&ua, &ub] {
        assert!(
            out.stderr.contains(&format!("{url}: released after")),
            "{out:?}"
        );
    }
    writes_landed(&[&a, &b], writes, "held during run").await;
    assert_thawed(&[&ua, &ub]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_through_an_ha_pair_records_both_freezes() {
    let a = lab(ADMIN_DN).await;
    let b = second_proxy(&a).await;
    let (ua, ub) = (a.proxied(), b.url());
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("backup");
    let started = Instant::now();
    let out = abproxy(&[
        "backup",
        "--to",
        to.to_str().unwrap(),
        "--url",
        &ua,
        "--url",
        &ub,
    ])
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let text = std::fs::read_to_string(to.join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["proxy_url"], ua.as_str(), "{m}");
    let proxies = m["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 2, "{m}");
    for (p, url) in proxies.iter().zip([&ua, &ub]) {
        assert_eq!(p["url"], url.as_str(), "{m}");
        assert!(p["freeze_id"].as_u64().is_some(), "{m}");
        assert!(
            p["message"].as_str().unwrap().starts_with("frozen: "),
            "{m}"
        );
    }
    assert_eq!(m["freeze"]["id"], proxies[0]["freeze_id"], "{m}");
    let header = std::fs::read_to_string(to.join("HEADER.txt")).unwrap();
    assert!(
        header.contains("proxies:  2 frozen together") && header.contains(&ub),
        "{header}"
    );
    // Both were released.
    assert!(
        out.stderr.contains(&format!("{ua}: released after"))
            && out.stderr.contains(&format!("{ub}: released after")),
        "{out:?}"
    );
    assert_thawed(&[&ua, &ub]).await;
    assert!(b.engine().established().is_none());
    let verify = abproxy(&["verify", to.to_str().unwrap()]).await;
    assert_eq!(verify.code, Some(0), "{verify:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_before_and_after_through_two_proxies() {
    let (a, b) = tokio::join!(lab(ADMIN_DN), lab(ADMIN_DN));
    let (ua, ub) = (a.proxied(), b.proxied());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("job");
    let state = state.to_str().unwrap();
    let both = format!("{ua} {ub}");
    let env = [("ABPROXY_URL", both.as_str())];

    let out = abproxy_env(&["hook", "--before", "--state-file", state], &env).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(lines[0].starts_with(&format!("{ua}: frozen: ")), "{out:?}");
    assert!(lines[1].starts_with(&format!("{ub}: frozen: ")), "{out:?}");
    let record = std::fs::read_to_string(state).unwrap();
    assert!(record.starts_with("freeze-id "), "{record}");
    assert!(record.contains("\nholder "), "{record}");
    for url in [&ua, &ub] {
        assert!(record.contains(&format!(" {url}\n")), "{record}");
    }
    // --before has exited; its holder keeps both.
    assert_frozen(&[&a, &b]).await;
    let writes = held_writes(&[&a, &b], "held by the hook").await;

    let out = abproxy_env(&["hook", "--after", "--state-file", state], &env).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for url in [&ua, &ub] {
        assert!(
            out.stdout.contains(&format!("{url}: released after")),
            "{out:?}"
        );
    }
    assert!(!Path::new(state).exists());
    writes_landed(&[&a, &b], writes, "held by the hook").await;
    assert_thawed(&[&ua, &ub]).await;
}

#[tokio::test]
async fn too_many_or_repeated_proxies_are_usage_errors() {
    let urls: Vec<String> = (0..17)
        .map(|i| format!("ldap://127.0.0.1:{}", 20000 + i))
        .collect();
    let mut args = vec!["on"];
    for u in &urls {
        args.extend(["--url", u.as_str()]);
    }
    let out = abproxy(&args).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("at most 16"), "{out:?}");
    let out = abproxy(&["off", "--url", &urls[0], "--url", &urls[0]]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("given twice"), "{out:?}");
    let out = abproxy(&[
        "off",
        "--url",
        &urls[0],
        "--url",
        &urls[1],
        "--freeze-id",
        "3",
    ])
    .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("one --freeze-id per --url"), "{out:?}");
}

/// The other half of an HA pair is frozen while the backup reads through
/// the first: a write through B sent during the export is held until the
/// backup has released, and is not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_other_proxy_waits_for_the_backup() {
    let a = Lab::with(
        SlapdOptions {
            users: 5000,
            ..opts()
        },
        |c| c.freeze.allowed = vec![ADMIN_DN.into()],
    )
    .await;
    let b = second_proxy(&a).await;
    let (ua, ub) = (a.proxied(), b.url());
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let mut child = command(&[
        "backup",
        "--to",
        dir.to_str().unwrap(),
        "--backend",
        "dc=example,dc=org",
        "--url",
        &ua,
        "--url",
        &ub,
    ])
    .stdout(Stdio::null())
    .spawn()
    .expect("start abproxy backup");
    let pid = child.id().expect("pid");
    let tmp = parent.path().join(format!("bk.partial-{pid}"));
    // The export is under way (its file has begun).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(&tmp)
            .map(|d| {
                d.filter_map(Result::ok).any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .contains("dc_example_dc_org")
                        && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if started {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended early"
        );
        assert!(Instant::now() < deadline, "the export did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let value = "written through B during the backup";
    let write = modify_in_background(&ub, 2, value);
    let engine = b.engine();
    wait_until("the write through B held", 20, || engine.queued().0 == 1).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup had already released"
    );
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the backup ends")
        .unwrap();
    let out = ToolOutput::from(out);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(join(write, "the held modify").await, 0);
    assert_eq!(description(&a.direct(), 2).await.as_deref(), Some(value));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let backends = m["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1, "{m}");
    assert!(backends[0]["entries"].as_u64().unwrap() > 5000, "{m}");
    let file = dir.join(backends[0]["file"].as_str().unwrap());
    let ldif = std::fs::read_to_string(&file).unwrap();
    assert!(ldif.contains(&format!("dn: {}\n", user_dn(2))));
    assert!(!ldif.contains(value), "{} has B's write", file.display());
    assert_thawed(&[&ua, &ub]).await;
}
