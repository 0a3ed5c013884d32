//! End to end: file-level backups of a live slapd taken while clients keep
//! writing through the proxy, restored into a second slapd.
//!
//! The recipes of docs/recipes.md are run as written: each block marked
//! `<!-- recipe: NAME -->` is read from docs/recipes.md at compile time and
//! run with `sh` (Bacula's and borgmatic's hook lines: the commands those
//! tools would run, in their order), with the test's paths in the variables
//! docs/recipes.md names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use abproxy::config::Config;
use testkit::{Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");
const WRITERS: usize = 8;
/// The operator the recipes bind as.
const BACKUP_DN: &str = "cn=backup,dc=example,dc=org";
const BACKUP_PW: &str = "backup-secret";

/// DN -> entryCSN of every `cn=w...` entry in an LDIF dump.
fn written(ldif: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for entry in ldif.split("\n\n") {
        let dn = entry.lines().find_map(|l| l.strip_prefix("dn: cn=w"));
        let csn = entry.lines().find_map(|l| l.strip_prefix("entryCSN: "));
        if let (Some(dn), Some(csn)) = (dn, csn) {
            assert!(
                out.insert(format!("cn=w{dn}"), csn.to_string()).is_none(),
                "cn=w{dn} twice"
            );
        }
    }
    out
}

fn live_count(slapd: &Slapd) -> usize {
    written(&slapd.slapcat("dc=example,dc=org").unwrap()).len()
}

/// Clients adding numbered entries through the proxy, each on its own
/// connection, until stopped; each returns the DNs slapd acknowledged, in
/// order, and panics on any error.
struct Writers {
    stop: CancellationToken,
    handles: Vec<JoinHandle<Vec<String>>>,
}

impl Writers {
    fn start(addr: &str) -> Writers {
        let stop = CancellationToken::new();
        let handles = (0..WRITERS)
            .map(|w| {
                let (addr, stop) = (addr.to_string(), stop.clone());
                tokio::spawn(async move {
                    let mut c = RawConn::connect(&addr).await;
                    c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
                    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
                    let mut acked = Vec::new();
                    let mut n: i32 = 0;
                    while !stop.is_cancelled() {
                        n += 1;
                        let dn = format!("cn=w{w}-{n},dc=example,dc=org");
                        c.send_msg(add(1 + n, &dn, &format!("w{w}-{n}"))).await;
                        let frame = c.recv().await.expect("answer");
                        assert_eq!(result_code(&frame), Some(0), "writer {w} write {n} failed");
                        acked.push(dn);
                    }
                    acked
                })
            })
            .collect();
        Writers { stop, handles }
    }

    /// Waits until slapd holds at least `n` written entries.
    async fn wait_for(&self, slapd: &Slapd, n: usize, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while live_count(slapd) < n {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lets the writers go on past `frozen` entries, stops them and checks
    /// that every acknowledged write is on the live server exactly once, in
    /// each writer's order, and nothing else.
    async fn finish(self, slapd: &Slapd, frozen: usize) -> Vec<Vec<String>> {
        self.wait_for(
            slapd,
            frozen + 2 * WRITERS,
            "writers make no progress after the backup",
        )
        .await;
        self.stop.cancel();
        let mut acked = Vec::new();
        for w in self.handles {
            acked.push(w.await.expect("no writer saw an error"));
        }
        let live = written(&slapd.slapcat("dc=example,dc=org").unwrap());
        for (w, dns) in acked.iter().enumerate() {
            let mut last = String::new();
            for dn in dns {
                let csn = live
                    .get(dn)
                    .unwrap_or_else(|| panic!("acknowledged {dn} is missing"));
                assert!(*csn > last, "writer {w}: {dn} applied out of order");
                last = csn.clone();
            }
        }
        assert_eq!(
            live.len(),
            acked.iter().map(Vec::len).sum::<usize>(),
            "nothing more, nothing less"
        );
        acked
    }
}

/// A slapd whose `cn=backup,dc=example,dc=org` may freeze, the proxy in
/// front of it (in process, or configured by `tweak`), the recipes'
/// variables pointing at it, and writers running.
struct Scene {
    lab: Lab,
    backup: tempfile::TempDir,
    /// Password file of the operator (for Bacula's --password-file).
    pw_file: PathBuf,
    writers: Writers,
}

/// Adds the operator entry the recipes bind as.
async fn add_backup_operator(slapd: &Slapd) {
    let ldif = format!(
        "dn: {BACKUP_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: backup\nuserPassword: {BACKUP_PW}\n"
    );
    let out = ldap_tool(
        "ldapadd",
        &["-x", "-H", &slapd.url(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

impl Scene {
    async fn start() -> Scene {
        Self::start_with(None, |_| {}).await
    }

    /// [`Scene::start`] with slapd's files in `dir` and the proxy's
    /// configuration adjusted by `tweak`.
    async fn start_with(dir: Option<PathBuf>, tweak: impl FnOnce(&mut Config)) -> Scene {
        let lab = Lab::with(
            SlapdOptions {
                nosync: true,
                dir,
                ..Default::default()
            },
            |c| {
                // The rootdn too (in root_dns): it reads the status on
                // new connections during freezes, where cn=backup's binds
                // are held (binds count as writes: slapd has ppolicy).
                c.freeze.allowed = vec![BACKUP_DN.into(), ADMIN_DN.into()];
                tweak(c)
            },
        )
        .await;
        add_backup_operator(&lab.slapd).await;
        let backup = tempfile::Builder::new()
            .prefix("abp-bak")
            .tempdir_in("/tmp")
            .unwrap();
        let pw_file = backup.path().join("abproxy.pw");
        std::fs::write(&pw_file, format!("{BACKUP_PW}\n")).unwrap();
        let writers = Writers::start(&lab.proxy_addr());
        writers
            .wait_for(&lab.slapd, 2 * WRITERS, "writers make no progress")
            .await;
        Scene {
            lab,
            backup,
            pw_file,
            writers,
        }
    }

    /// The recipes' variables for this lab, and `abproxy` on PATH.
    fn vars(&self) -> Vec<(String, String)> {
        recipe_vars(
            self.lab.slapd.dir(),
            &self.lab.proxied(),
            self.backup.path(),
        )
    }

    /// Runs `script` with `sh -c` and the recipes' variables.
    async fn sh(&self, script: &str) -> ToolOutput {
        run(
            "sh",
            &["-c", script],
            &self
                .vars()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        )
        .await
    }

    /// `abproxy status --json` as the rootdn.
    async fn status_json(&self) -> ToolOutput {
        self.sh(&format!(
            "ABPROXY_BIND_DN='{ADMIN_DN}' ABPROXY_PASSWORD='{ADMIN_PW}' abproxy status --json"
        ))
        .await
    }

    /// Waits until the proxy holds at least one write (the backup then runs
    /// while clients are waiting).
    async fn wait_held(&self) {
        for _ in 0..1000 {
            let out = self.status_json().await;
            assert_eq!(out.code, Some(0), "{out:?}");
            let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(s["state"], "frozen", "{s}");
            if s["queued_requests"].as_u64() > Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no write was held");
    }

    /// The backup tool's own work between its hooks (for Bacula and
    /// borgmatic: what their file daemon or `borg create` would read).
    async fn copy(&self) {
        let out = self
            .sh(r#"tar -C "$DB" -cSf "$BACKUP/ldap-db.tar" data.mdb &&
                   slapcat -F "$SLAPD_D" -b dc=example,dc=org -l "$BACKUP/live.ldif""#)
            .await;
        assert_eq!(out.code, Some(0), "{out:?}");
    }

    async fn state(&self) -> String {
        let out = self.status_json().await;
        assert_eq!(out.code, Some(0), "{out:?}");
        let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        s["state"].as_str().unwrap().to_string()
    }

    /// Restores `$BACKUP/ldap-db.tar` with docs/recipes.md's restore recipe into
    /// a new slapd and checks it holds what `$BACKUP/live.ldif` (the dump
    /// taken in the same freeze) holds; returns the number of written
    /// entries in it.
    async fn restore_and_compare(&self) -> usize {
        restore_and_compare(&self.lab.slapd, &self.lab.proxied(), self.backup.path()).await
    }

    async fn finish(self, frozen: usize) -> Vec<Vec<String>> {
        self.writers.finish(&self.lab.slapd, frozen).await
    }
}

/// The recipes' variables: ABPROXY_URL, ABPROXY_BIND_DN, ABPROXY_PASSWORD,
/// SLAPD_D, DB, BACKUP; and PATH with `abproxy` and slapcat.
fn recipe_vars(slapd_dir: &Path, proxy_url: &str, backup: &Path) -> Vec<(String, String)> {
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    let path = format!("{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    [
        ("ABPROXY_URL", proxy_url.to_string()),
        ("ABPROXY_BIND_DN", BACKUP_DN.to_string()),
        ("ABPROXY_PASSWORD", BACKUP_PW.to_string()),
        ("SLAPD_D", slapd_dir.join("slapd.d").display().to_string()),
        ("DB", slapd_dir.join("db-example").display().to_string()),
        ("BACKUP", backup.display().to_string()),
        ("PATH", path),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Runs `prog args` with exactly the environment `env`, bounded to 120 s.
async fn run(prog: &str, args: &[&str], env: &[(&str, &str)]) -> ToolOutput {
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{prog} {args:?} timed out"))
        .unwrap();
    ToolOutput::from(out)
}

/// Runs docs/recipes.md's restore lines on `$BACKUP/ldap-db.tar` into a new
/// directory and starts a second slapd on it; its dump.
async fn restore(live: &Slapd, proxy_url: &str, backup: &Path) -> String {
    let db = tempfile::tempdir().unwrap();
    let mut vars = recipe_vars(live.dir(), proxy_url, backup);
    for (k, v) in &mut vars {
        if k == "DB" {
            *v = db.path().display().to_string();
        }
    }
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run("sh", &["-c", recipe("restore")], &vars).await;
    assert_eq!(out.code, Some(0), "restore recipe: {out:?}");
    let from = db.path().to_path_buf();
    let restored = tokio::task::spawn_blocking(move || {
        Slapd::start(SlapdOptions {
            restore_example: Some(from),
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("the copied database opens");
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &restored.url(),
            "-b",
            "ou=people,dc=example,dc=org",
            "(uid=user7)",
            "uid",
        ],
        None,
    )
    .await;
    assert!(
        out.stdout.contains("uid: user7"),
        "the restored server serves: {out:?}"
    );
    restored.slapcat("dc=example,dc=org").unwrap()
}

/// See [`Scene::restore_and_compare`].
async fn restore_and_compare(live: &Slapd, proxy_url: &str, backup: &Path) -> usize {
    let at_backup = std::fs::read_to_string(backup.join("live.ldif")).unwrap();
    let restored_dump = restore(live, proxy_url, backup).await;
    assert!(
        restored_dump == at_backup,
        "the restored database differs from the live one at the freeze"
    );
    let n = written(&at_backup).len();
    assert!(n >= 2 * WRITERS, "the backup has the writes made before it");
    n
}

/// N in "released after S s; N queued request(s) resumed" (`abproxy run`'s
/// stderr, `hook --after`'s stdout).
fn resumed(run_stderr: &str) -> u64 {
    let at = run_stderr
        .find(" queued request(s) resumed")
        .unwrap_or_else(|| panic!("no release line in {run_stderr:?}"));
    let head = &run_stderr[..at];
    head[head.rfind(' ').unwrap() + 1..].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tar_recipe_backs_up_and_restores_under_writes() {
    let scene = Scene::start().await;
    let out = scene.sh(recipe("tar")).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        resumed(&out.stderr) > 0,
        "writes were held while tar ran: {out:?}"
    );
    let frozen = scene.restore_and_compare().await;
    scene.finish(frozen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_script_recipe_backs_up_and_releases_on_failure() {
    let scene = Scene::start().await;
    let out = scene.sh(recipe("script")).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // `hook --after` reports the release on stdout.
    assert!(resumed(&out.stdout) > 0, "writes were held: {out:?}");
    let frozen = scene.restore_and_compare().await;

    // The copy fails (no backup directory): the script fails, and the
    // freeze is released by the trap.
    let failing = recipe("script").replace("\"$BACKUP/", "\"$BACKUP/missing/");
    let out = scene.sh(&failing).await;
    assert_eq!(out.code, Some(2), "tar's failure is the script's: {out:?}");
    assert_eq!(scene.state().await, "thawed", "{out:?}");
    scene.finish(frozen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_script_recipe_fails_when_the_freeze_expired_during_the_copy() {
    let scene = Scene::start_with(None, |c| c.freeze.lease_secs = 1).await;
    // The script as written, with a `tar` on PATH that copies, then
    // outlasts the lease: the copy succeeded, the script must still fail.
    let slow = tempfile::tempdir().unwrap();
    let tar = slow.path().join("tar");
    std::fs::write(&tar, "#!/bin/sh\n/usr/bin/tar \"$@\" && sleep 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tar, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut vars = scene.vars();
    for (k, v) in &mut vars {
        if k == "PATH" {
            *v = format!("{}:{v}", slow.path().display());
        }
    }
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run("sh", &["-c", recipe("script")], &vars).await;
    assert_eq!(out.code, Some(6), "hook --after's status: {out:?}");
    assert!(out.stderr.contains("expired"), "{out:?}");
    assert_eq!(scene.state().await, "thawed");
    let frozen = live_count(&scene.lab.slapd);
    scene.finish(frozen).await;
}

/// `Key = "command"` lines of a Bacula resource.
fn bacula_commands(block: &str) -> HashMap<&str, &str> {
    block
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            Some((k.trim(), v.trim().strip_prefix('"')?.strip_suffix('"')?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_bacula_hooks_around_a_backup_job() {
    let scene = Scene::start().await;
    let cmds = bacula_commands(recipe("bacula"));
    // Bacula runs the commands itself (no shell), split at spaces; the
    // director's environment has only ABPROXY_URL of ours.
    let url = scene.lab.proxied();
    let pw = scene.pw_file.display().to_string();
    let job = |key: &str| {
        let line = cmds
            .get(key)
            .unwrap_or_else(|| panic!("the Bacula recipe has {key}"))
            .replace("/usr/local/bin/abproxy", BIN)
            .replace("/etc/bacula/abproxy.pw", &pw);
        let url = url.clone();
        async move {
            let argv: Vec<&str> = line.split_whitespace().collect();
            run(argv[0], &argv[1..], &[("ABPROXY_URL", url.as_str())]).await
        }
    };

    // A job that succeeds: RunBeforeJob, the file daemon's copy, RunAfterJob.
    let out = job("RunBeforeJob").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    scene.wait_held().await;
    scene.copy().await;
    let out = job("RunAfterJob").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(scene.state().await, "thawed");
    let frozen = scene.restore_and_compare().await;

    // A job that fails after RunBeforeJob: RunAfterFailedJob releases.
    let out = job("RunBeforeJob").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(scene.state().await, "frozen");
    let out = job("RunAfterFailedJob").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(scene.state().await, "thawed");
    scene.finish(frozen).await;
}

/// borgmatic 2.x `commands:`: (before|after, point, run commands).
fn borgmatic2_hooks(block: &str) -> Vec<(String, String, Vec<String>)> {
    let mut hooks: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in block.lines() {
        let l = line.trim();
        if let Some(item) = l.strip_prefix("- ") {
            let (when, point) = item.split_once(": ").expect("- before|after: POINT");
            hooks.push((when.to_string(), point.to_string(), Vec::new()));
        } else if let Some(list) = l.strip_prefix("run: ") {
            let cmds: Vec<String> = serde_json::from_str(list).expect("run: [\"...\"]");
            hooks.last_mut().expect("run: inside an item").2 = cmds;
        }
    }
    hooks
}

/// borgmatic 1.x: key -> its commands.
fn borgmatic1_hooks(block: &str) -> HashMap<String, Vec<String>> {
    let mut hooks: HashMap<String, Vec<String>> = HashMap::new();
    let mut key = String::new();
    for line in block.lines() {
        if let Some(cmd) = line.trim().strip_prefix("- ") {
            hooks.get_mut(&key).expect("a key first").push(cmd.into());
        } else if let Some(k) = line.strip_suffix(':') {
            key = k.to_string();
            hooks.insert(key.clone(), Vec::new());
        }
    }
    hooks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_borgmatic_hooks_around_a_backup() {
    let scene = Scene::start().await;
    let v2 = borgmatic2_hooks(recipe("borgmatic"));
    let pick = |when: &str, point: &str| -> Vec<String> {
        v2.iter()
            .filter(|(w, p, _)| w == when && p == point)
            .flat_map(|(_, _, c)| c.clone())
            .collect()
    };
    let v1 = borgmatic1_hooks(recipe("borgmatic-1"));
    let v1 = |key: &str| v1.get(key).cloned().unwrap_or_default();
    // borgmatic runs each command with a shell, in the order listed.
    let hooks = async |cmds: Vec<String>| {
        assert!(!cmds.is_empty());
        for c in cmds {
            let out = scene.sh(&c).await;
            assert_eq!(out.code, Some(0), "{c}: {out:?}");
        }
    };

    let mut frozen = 0;
    for (before, after, on_error) in [
        (
            pick("before", "action"),
            pick("after", "action"),
            pick("after", "error"),
        ),
        (v1("before_backup"), v1("after_backup"), v1("on_error")),
    ] {
        // `borgmatic create` succeeds.
        hooks(before.clone()).await;
        scene.wait_held().await;
        scene.copy().await;
        hooks(after).await;
        assert_eq!(scene.state().await, "thawed");
        frozen = scene.restore_and_compare().await;
        // It fails after the before hook: the error hook releases.
        hooks(before).await;
        assert_eq!(scene.state().await, "frozen");
        hooks(on_error).await;
        assert_eq!(scene.state().await, "thawed");
    }
    scene.finish(frozen).await;
}

/// Kills the proxy if the test fails half-way.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `abproxy serve` (the binary, from a config file) with the `openldap`
/// driver; `abproxy run` around a script that sees slapd refuse a local
/// write and copies the database, while clients write through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_the_openldap_driver_refuses_local_writes_and_restores_the_old_value() {
    let slapd = tokio::task::spawn_blocking(|| {
        Slapd::start(SlapdOptions {
            nosync: true,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    add_backup_operator(&slapd).await;
    // A present previous value, to see it put back (not just removed).
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &slapd.ldapi_url()],
        Some(
            "dn: olcDatabase={1}mdb,cn=config\nchangetype: modify\nreplace: olcReadOnly\nolcReadOnly: FALSE\n",
        ),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        olc_read_only(&slapd.ldapi_url()).await,
        "olcReadOnly: FALSE"
    );

    let etc = tempfile::tempdir().unwrap();
    let port = crate::support::process::free_port();
    let url = format!("ldap://127.0.0.1:{port}");
    let toml = etc.path().join("abproxy.toml");
    std::fs::write(
        &toml,
        format!(
            r#"listen = ["{url}"]
upstream = "{upstream}"
[freeze]
allowed = ["{BACKUP_DN}"]
[[backends]]
suffix = "dc=example,dc=org"
driver = "openldap"
config_url = "{ldapi}"
[[backends]]
suffix = "dc=other,dc=org"
"#,
            upstream = slapd.url(),
            ldapi = slapd.ldapi_url(),
        ),
    )
    .unwrap();
    let _serve = KillOnDrop(
        std::process::Command::new(BIN)
            .args(["serve", "--config", toml.to_str().unwrap()])
            .env("ABPROXY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_until("abproxy serve listens", 20, || {
        std::net::TcpStream::connect(&addr).is_ok()
    })
    .await;

    let writers = Writers::start(&addr);
    writers
        .wait_for(&slapd, 2 * WRITERS, "writers make no progress")
        .await;
    let backup = tempfile::Builder::new()
        .prefix("abp-bak")
        .tempdir_in("/tmp")
        .unwrap();
    let mut vars = recipe_vars(slapd.dir(), &url, backup.path());
    vars.push(("LDAPI".into(), slapd.ldapi_url()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // (a) a write over slapd's own ldapi socket, bypassing the proxy, is
    // refused by slapd: unwillingToPerform (53) is ldapmodify's status;
    // (b) the copy and a dump.
    let script = r#"
        ldapmodify -Q -Y EXTERNAL -H "$LDAPI" <<EOF
dn: uid=user3,ou=people,dc=example,dc=org
changetype: modify
replace: description
description: written behind the proxy's back
EOF
        rc=$?
        [ $rc -eq 53 ] || { echo "local write: status $rc, not 53" >&2; exit 9; }
        tar -C "$DB" -cSf "$BACKUP/ldap-db.tar" data.mdb &&
        slapcat -F "$SLAPD_D" -b dc=example,dc=org -l "$BACKUP/live.ldif""#;
    let out = run(
        BIN,
        &[
            "run",
            "--backend",
            "dc=example,dc=org",
            "--",
            "sh",
            "-c",
            script,
        ],
        &vars,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(resumed(&out.stderr) > 0, "writes were held: {out:?}");

    // After run: the old value is back and local writes work again.
    assert_eq!(
        olc_read_only(&slapd.ldapi_url()).await,
        "olcReadOnly: FALSE"
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &slapd.ldapi_url()],
        Some("dn: uid=user3,ou=people,dc=example,dc=org\nchangetype: modify\nreplace: description\ndescription: local, after\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let live = slapd.slapcat("dc=example,dc=org").unwrap();
    assert!(!live.contains("behind the proxy's back"));

    let frozen = restore_and_compare(&slapd, &url, backup.path()).await;
    writers.finish(&slapd, frozen).await;
}

/// A btrfs filesystem in a loop device, mounted; unmounted and detached on
/// drop.
struct Btrfs {
    dir: tempfile::TempDir,
    dev: String,
}

impl Btrfs {
    /// Why not, when this machine cannot (not root, no btrfs-progs, no loop
    /// device, no btrfs in the kernel).
    fn create() -> Result<Btrfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (losetup, mount)".into());
        }
        let sh = |cmd: &str| -> Result<String, String> {
            let out = std::process::Command::new("sh")
                .args(["-c", cmd])
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "{cmd}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        sh("command -v mkfs.btrfs && command -v btrfs && command -v losetup")?;
        let dir = tempfile::Builder::new()
            .prefix("abp-btrfs")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let d = dir.path().display().to_string();
        sh(&format!("truncate -s 1G {d}/img && mkdir {d}/mnt"))?;
        let dev = sh(&format!("losetup -f --show {d}/img"))?;
        let fs = Btrfs { dir, dev };
        sh(&format!(
            "mkfs.btrfs -q {dev} && mount {dev} {d}/mnt && btrfs subvolume create {d}/mnt/ldap",
            dev = fs.dev
        ))?;
        Ok(fs)
    }

    /// The subvolume for slapd's files.
    fn subvolume(&self) -> PathBuf {
        self.dir.path().join("mnt").join("ldap")
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let d = self.dir.path().display();
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "umount {d}/mnt 2>/dev/null; losetup -d {} 2>/dev/null",
                    self.dev
                ),
            ])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_btrfs_snapshot_recipe_backs_up_under_writes() {
    let fs = match Btrfs::create() {
        Ok(fs) => fs,
        Err(why) => {
            testkit::skip(format_args!("cannot make a btrfs filesystem here: {why}"));
            return;
        }
    };
    let scene = Scene::start_with(Some(fs.subvolume()), |_| {}).await;
    let mut vars = scene.vars();
    vars.push(("VOL".into(), fs.subvolume().display().to_string()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run("sh", &["-ec", recipe("btrfs")], &vars).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        resumed(&out.stderr) > 0,
        "writes were held while the snapshot was taken: {out:?}"
    );
    assert!(
        !fs.subvolume().join(".backup-snap").exists(),
        "the snapshot is deleted"
    );

    let restored =
        written(&restore(&scene.lab.slapd, &scene.lab.proxied(), scene.backup.path()).await);
    assert!(restored.len() >= 2 * WRITERS, "the writes made before it");
    let acked = scene.finish(restored.len()).await;
    // Consistent: for each client, exactly its first N acknowledged writes.
    let mut total = 0;
    for (w, dns) in acked.iter().enumerate() {
        let n = dns
            .iter()
            .take_while(|dn| restored.contains_key(*dn))
            .count();
        assert!(
            dns[n..].iter().all(|dn| !restored.contains_key(dn)),
            "writer {w}: a gap in the snapshot after its write {n}"
        );
        total += n;
    }
    assert_eq!(
        total,
        restored.len(),
        "nothing in the snapshot that no client wrote"
    );
}

/// The variables the recipes use are the recipes' settings, and the ones
/// the tests set.
#[test]
fn readme_recipes_use_the_settings_variables() {
    let settings: Vec<&str> = recipe("settings")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .flat_map(|l| l.split('#').next().unwrap().split_whitespace())
        .map(|kv| kv.split_once('=').expect("NAME=value").0)
        .collect();
    let mut set: Vec<&str> = settings.clone();
    set.sort();
    let vars = recipe_vars(Path::new("/lab"), "ldap://proxy", Path::new("/backup"));
    let mut expected: Vec<&str> = vars
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| *k != "PATH")
        .collect();
    expected.sort();
    assert_eq!(
        set, expected,
        "the variables recipe_vars() sets, PATH aside"
    );
    for name in ["tar", "restore", "script", "btrfs"] {
        let body = recipe(name);
        for (i, _) in body.match_indices('$') {
            let var: String = body[i + 1..]
                .trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if body[i + 1..].starts_with('?') {
                continue; // $?, the shell's own
            }
            assert!(
                settings.contains(&var.as_str()) || (name == "btrfs" && var == "VOL"),
                "recipe {name} uses ${var}, not in the settings"
            );
        }
    }
}
