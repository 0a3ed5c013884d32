//! Consistent backups of a live 389 Directory Server through the proxy,
//! under continuous writes, as an operator runs them:
//!
//! * the Kolab-style flow: `abproxy hook --before`, an online LDIF export
//!   per backend (`dsconf NAME backend export`), `abproxy hook --after`;
//! * `abproxy run -- dsconf NAME backup create DIR` (the online db2bak
//!   task), restored with `dsctl NAME bak2db DIR` into a fresh instance.
//!
//! Root only, like tests/it/ds389.rs: each test skips with one line when 389-ds
//! cannot run here (fails under `ABPROXY_REQUIRE_ALL=1`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::support::ds389::*;
use crate::support::*;
use abproxy::config::BackendConfig;
use abproxy::freeze::Mode;
use abproxy::ProxyHandle;
use testkit::ds389::{Ds389, DM_DN, DM_PW, OTHERROOT, OTHER_SUFFIX, SUFFIX, USERROOT};
use tokio_util::sync::CancellationToken;

const WRITERS: usize = 16;

/// A writer's acknowledged DNs, in order, each with when its answer came.
type Acked = Vec<(String, tokio::time::Instant)>;
/// A running writer.
type Writer = tokio::task::JoinHandle<Acked>;

/// Writer `w` adds `cn=wW-N` entries (N = 1, 2, ...) through the proxy as
/// Directory Manager, one at a time, to dc=example,dc=org (even `w`) or
/// dc=other,dc=org (odd `w`), until `stop`; every write must succeed.
/// Returns the DNs acknowledged, in order, each with when its answer came.
fn spawn_writers(proxy: &ProxyHandle, stop: &CancellationToken) -> Vec<Writer> {
    (0..WRITERS)
        .map(|w| {
            let (addr, stop) = (addr_of(&proxy.url()), stop.clone());
            tokio::spawn(async move {
                let mut c = raw_bound(&addr, DM_DN, DM_PW).await;
                let suffix = if w % 2 == 0 { SUFFIX } else { OTHER_SUFFIX };
                let mut acked = Vec::new();
                let mut n: i32 = 0;
                while !stop.is_cancelled() {
                    n += 1;
                    let dn = format!("cn=w{w}-{n},{suffix}");
                    c.send_msg(add(1 + n, &dn, &format!("w{w}-{n}"))).await;
                    let frame = c.recv().await.expect("an answer");
                    assert_eq!(result_code(&frame), Some(0), "writer {w}, write {n}");
                    acked.push((dn, tokio::time::Instant::now()));
                }
                acked
            })
        })
        .collect()
}

/// How many `cn=w...` entries 389 holds in both backends.
/// The proxy in front of `ds` (dc=example,dc=org with the 389 driver,
/// dc=other,dc=org readonly) and the writers adding through it, each
/// having written twice.
async fn under_writers(ds: &Ds389) -> (ProxyHandle, CancellationToken, Vec<Writer>) {
    let proxy = proxy(
        ds,
        vec![
            example_389ds(ds),
            BackendConfig::new(OTHER_SUFFIX, Mode::Readonly),
        ],
    )
    .await;
    let stop = CancellationToken::new();
    let writers = spawn_writers(&proxy, &stop);
    // Each backend's writers have written twice (on average): a backend's
    // share of the writes is not even when only the total is awaited.
    wait_until(
        ds,
        |w| w.iter().all(|&n| n >= WRITERS),
        "writers make no progress",
    )
    .await;
    (proxy, stop, writers)
}

/// How many `cn=w...` entries each backend holds (dc=example, dc=other).
async fn written_each(ds: &Ds389) -> [usize; 2] {
    let mut n = [0; 2];
    for (i, suffix) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        n[i] = dump(ds, suffix, &["1.1"])
            .await
            .lines()
            .filter(|l| l.starts_with("dn: cn=w"))
            .count();
    }
    n
}

async fn written(ds: &Ds389) -> usize {
    written_each(ds).await.iter().sum()
}

/// Waits until 389 holds at least `n` written entries.
async fn wait_written(ds: &Ds389, n: usize, what: &str) {
    wait_until(ds, |w| w.iter().sum::<usize>() >= n, what).await
}

/// Waits until the written entries per backend satisfy `done`.
async fn wait_until(ds: &Ds389, done: impl Fn([usize; 2]) -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(written_each(ds).await) {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the writers; their acknowledged DNs (a writer that saw an error
/// panicked, and this fails).
async fn stop_writers(stop: CancellationToken, writers: Vec<Writer>) -> Vec<Acked> {
    stop.cancel();
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.expect("no writer saw an error"));
    }
    acked
}

/// `# entry-id: N` of every entry of a 389 LDIF export, by lower-case DN.
fn entry_ids(export: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for block in export.split("\n\n") {
        let id = block
            .lines()
            .find_map(|l| l.strip_prefix("# entry-id: "))
            .map(|v| v.parse::<u64>().unwrap());
        let dn = block.lines().find_map(|l| l.strip_prefix("dn: "));
        if let (Some(id), Some(dn)) = (id, dn) {
            assert!(
                out.insert(dn.to_ascii_lowercase(), id).is_none(),
                "{dn} twice"
            );
        }
    }
    out
}

/// `dsconf NAME backend export -U -l FILE BACKEND` for each backend; the
/// exports' texts. (The runtime must be multi-threaded: the tool runs in
/// `block_in_place`.)
async fn export_all(ds: &Ds389, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    for backend in [USERROOT, OTHERROOT] {
        let file = ds.ldif_dir().join(format!("{tag}-{backend}.ldif"));
        let f = file.display().to_string();
        tokio::task::block_in_place(|| ds.dsconf(&["backend", "export", "-U", "-l", &f, backend]))
            .unwrap_or_else(|e| panic!("export of {backend}: {e:#}"));
        out.push(std::fs::read_to_string(&file).unwrap());
    }
    out
}

/// Search results as 389's export writes them: a userPassword stored
/// without a `{SCHEME}` prefix (the lab's sample users) is exported with
/// `{CLEAR}`.
fn as_exported(mut entries: Entries) -> Entries {
    for attrs in entries.values_mut() {
        *attrs = std::mem::take(attrs)
            .into_iter()
            .map(|(t, v)| {
                if t == "userpassword" && !v.starts_with(b"{") {
                    (t, [&b"{CLEAR}"[..], &v].concat())
                } else {
                    (t, v)
                }
            })
            .collect();
    }
    entries
}

/// Every acknowledged write is in `final_exports` exactly once, in each
/// writer's order (389 numbers entries as it adds them), and nothing else
/// was written.
fn check_acked(acked: &[Acked], final_exports: &[String]) {
    let mut ids = HashMap::new();
    for e in final_exports {
        ids.extend(entry_ids(e));
    }
    let total_written = ids.keys().filter(|dn| dn.starts_with("cn=w")).count();
    for (w, acks) in acked.iter().enumerate() {
        let dns = acks.iter().map(|(dn, _)| dn);
        let mut last = 0;
        for dn in dns {
            let id = *ids
                .get(&dn.to_ascii_lowercase())
                .unwrap_or_else(|| panic!("acknowledged {dn} is missing"));
            assert!(id > last, "writer {w}: {dn} applied out of order");
            last = id;
        }
    }
    assert_eq!(
        total_written,
        acked.iter().map(Vec::len).sum::<usize>(),
        "nothing more, nothing less"
    );
}

/// Kolab's backup scripts, with abproxy's hooks around them: `abproxy hook
/// --before`, `dsconf NAME backend export` of each backend (the online
/// export task, cn=export,cn=tasks,cn=config), `abproxy hook --after`, with
/// 16 clients adding entries through the proxy all along and the `389ds`
/// driver on dc=example,dc=org. Each export equals the live backend at the
/// freeze (a search taken before and one after the export, both while
/// frozen); no client sees an error; after OFF every acknowledged write is
/// there exactly once, in each client's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kolab_style_hooks_around_online_exports_give_the_data_at_the_freeze() {
    if skip() {
        return;
    }
    let ds = start_ds(50).await;
    let (proxy, stop, writers) = under_writers(&ds).await;

    let out = cli(&proxy, &["hook", "--before"]).await;
    assert_eq!(out.code, Some(0), "hook --before: {out:?}");
    // Every writer now waits with one add held by the proxy.
    let mut s = dm_session(&proxy).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = s.status().await.unwrap();
        assert_eq!(st.state.as_str(), "frozen");
        if st.queued_requests == WRITERS as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "writers not held: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = [
        dump(&ds, SUFFIX, EXPORTED_OPERATIONAL).await,
        dump(&ds, OTHER_SUFFIX, EXPORTED_OPERATIONAL).await,
    ];
    let exports = export_all(&ds, "frozen").await;
    let after = [
        dump(&ds, SUFFIX, EXPORTED_OPERATIONAL).await,
        dump(&ds, OTHER_SUFFIX, EXPORTED_OPERATIONAL).await,
    ];
    let out = cli(&proxy, &["hook", "--after"]).await;
    assert_eq!(out.code, Some(0), "hook --after: {out:?}");
    assert!(s.status().await.unwrap().state.as_str() == "thawed");

    let mut frozen_written = 0;
    for i in 0..2 {
        let export = parse_ldif(&exports[i]);
        let (before, after) = (
            as_exported(parse_ldif(&before[i])),
            as_exported(parse_ldif(&after[i])),
        );
        assert!(
            export == before,
            "backend {i}: the export differs from the live data at the freeze:\n{}",
            diff_entries(&export, &before)
        );
        assert!(
            export == after,
            "backend {i}: the data changed while frozen:\n{}",
            diff_entries(&export, &after)
        );
        frozen_written += export.keys().filter(|dn| dn.starts_with("cn=w")).count();
    }
    assert!(frozen_written >= 2 * WRITERS);

    // The writers go on after OFF, then stop.
    wait_written(
        &ds,
        frozen_written + 2 * WRITERS,
        "writers make no progress after OFF",
    )
    .await;
    let acked = stop_writers(stop, writers).await;
    check_acked(&acked, &export_all(&ds, "final").await);
    s.close().await;
    proxy.shutdown().await.unwrap();
}

/// `abproxy run -- dsconf NAME backup create DIR` (the online backup task,
/// cn=backup,cn=tasks,cn=config) with 16 clients adding entries through the
/// proxy all along; the same command dumps both backends, still frozen.
/// The backup restores (`dsctl NAME bak2db DIR`, instance stopped) into a
/// fresh instance that then serves exactly the entries of that dump,
/// operational attributes included; no client sees an error and every
/// acknowledged write is on the live server once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abproxy_run_online_backup_restores_into_a_fresh_instance() {
    if skip() {
        return;
    }
    let ds = start_ds(50).await;
    let (proxy, stop, writers) = under_writers(&ds).await;

    let archive = ds.bak_dir().join("frozen");
    let live = tempfile::Builder::new()
        .prefix("abp-389-live")
        .tempdir_in("/tmp")
        .unwrap();
    // Wait (bounded) until the proxy holds a write, so that the backup
    // really races the writers; then back up and dump, all while frozen.
    let script = format!(
        "set -e
         n=0
         until {bin} status --json | grep -Eq '\"queued_requests\": ?[1-9]'; do
           n=$((n+1)); [ $n -lt 400 ] || {{ echo 'no write was held' >&2; exit 9; }}; sleep 0.05
         done
         {dsconf} {name} backup create {archive}
         for base in {SUFFIX} {OTHER_SUFFIX}; do
           ldapsearch -Q -LLL -o ldif_wrap=no -Y EXTERNAL -H {ldapi} -b $base '(objectClass=*)' '*' '+' > {live}/$base.ldif
         done",
        bin = BIN,
        dsconf = testkit::ds389::DSCONF,
        name = ds.name(),
        archive = archive.display(),
        ldapi = ds.ldapi_url(),
        live = live.path().display(),
    );
    let out = tokio::process::Command::new(BIN)
        .args(["run", "--", "sh", "-c", &script])
        .env("ABPROXY_URL", proxy.url())
        .env("ABPROXY_BIND_DN", DM_DN)
        .env("ABPROXY_PASSWORD", DM_PW)
        .env("LDAPCONF", "/dev/null")
        .env("LDAPRC", "/dev/null")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "abproxy run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at_freeze: Vec<Entries> = [SUFFIX, OTHER_SUFFIX]
        .iter()
        .map(|b| {
            parse_ldif(&std::fs::read_to_string(live.path().join(format!("{b}.ldif"))).unwrap())
        })
        .collect();
    let frozen_written: usize = at_freeze
        .iter()
        .map(|e| e.keys().filter(|dn| dn.starts_with("cn=w")).count())
        .sum();
    assert!(frozen_written >= 2 * WRITERS);

    // The writers go on after the backup, then stop.
    wait_written(
        &ds,
        frozen_written + 2 * WRITERS,
        "writers make no progress after the backup",
    )
    .await;
    let acked = stop_writers(stop, writers).await;
    check_acked(&acked, &export_all(&ds, "final").await);
    proxy.shutdown().await.unwrap();

    // A fresh instance (its own sample data), stopped, restored from the
    // backup, started again: it serves what the live one held at the freeze.
    let mut fresh = fresh_instance().await;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        fresh.stop()?;
        fresh.dsctl(&["bak2db", &archive.display().to_string()])?;
        fresh.restart()
    })
    .expect("restore with dsctl bak2db");
    for (i, base) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        let restored = parse_ldif(&dump(&fresh, base, &["*", "+"]).await);
        assert!(
            restored == at_freeze[i],
            "{base}: the restored instance differs from the live one at the freeze:\n{}",
            diff_entries(&restored, &at_freeze[i])
        );
    }
    // Over TCP, as any client.
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &fresh.url(),
            "-b",
            SUFFIX,
            "(cn=w0-1)",
            "cn",
        ],
        None,
    )
    .await;
    assert_eq!(
        out.stdout,
        format!("dn: cn=w0-1,{SUFFIX}\ncn: w0-1\n\n"),
        "{out:?}"
    );
}

/// Attribute names (lower case) of each entry, by lower-case DN.
fn attr_names(entries: &[abproxy::backup::Entry]) -> BTreeMap<String, BTreeSet<String>> {
    entries
        .iter()
        .map(|e| {
            (
                e.dn.to_ascii_lowercase(),
                e.attrs
                    .iter()
                    .map(|(k, _)| k.to_ascii_lowercase())
                    .collect(),
            )
        })
        .collect()
}

/// `abproxy backup` of a live 389 DS (the `ldif` method: every entry with
/// `*` and `+` through the proxy) verifies, and its entries give the content digest
/// 389's own export of the same data gives (`dsconf backend export`, after
/// the backup, nothing written in between), for both backends, once the
/// one difference 389's export makes is made (`{CLEAR}` before a password
/// stored without a scheme).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abproxy_backup_of_389_has_the_digest_of_389s_own_export() {
    use abproxy::backup::{ldif, Digest};
    if skip() {
        return;
    }
    let (ds, _proxy, _parent, dir) = ldif_backup_of_a_389().await;
    let manifest = crate::support::backup::manifest_json(&dir);
    // The backup checks out by itself.
    let verified = crate::support::backup::verify_dir(&dir).await;
    assert_eq!(verified.code, Some(0), "{verified:?}");
    let exports = export_all(&ds, "after-backup").await;
    for (i, export) in exports.iter().enumerate() {
        let b = &manifest["backends"][i];
        let suffix = b["suffix"].as_str().unwrap();
        assert_eq!(suffix, [SUFFIX, OTHER_SUFFIX][i]);
        let mut backed =
            ldif::read(&std::fs::read_to_string(dir.join(b["file"].as_str().unwrap())).unwrap())
                .unwrap();
        // As 389's export writes a password stored without a scheme (the
        // lab's users'): with `{CLEAR}`.
        let digest_served = Digest::of_entries(backed.clone()).unwrap().to_string();
        assert_eq!(b["digest"].as_str().unwrap(), digest_served, "{suffix}");
        for e in &mut backed {
            for (k, vals) in &mut e.attrs {
                if k.eq_ignore_ascii_case("userPassword") {
                    for v in vals.iter_mut().filter(|v| !v.starts_with(b"{")) {
                        v.splice(0..0, b"{CLEAR}".iter().copied());
                    }
                }
            }
        }
        let theirs = ldif::read(export).unwrap();
        assert_eq!(b["entries"].as_u64(), Some(theirs.len() as u64), "{suffix}");
        let (a, t) = (attr_names(&backed), attr_names(&theirs));
        let mut only = BTreeSet::new();
        for (dn, names) in &a {
            for n in names.symmetric_difference(&t[dn]) {
                only.insert(format!(
                    "{n} ({})",
                    if names.contains(n) {
                        "backup"
                    } else {
                        "export"
                    }
                ));
            }
        }
        let differ = first_difference(&backed, &theirs);
        assert_eq!(
            Digest::of_entries(backed.clone()).unwrap().to_string(),
            Digest::of_entries(theirs).unwrap().to_string(),
            "{suffix}: attributes in only one of them: {only:?}; first value that differs: {differ}"
        );
    }
}

/// The first attribute (not computed) whose values differ between two
/// dumps of the same entries, for a failure's message.
fn first_difference(a: &[abproxy::backup::Entry], b: &[abproxy::backup::Entry]) -> String {
    use abproxy::backup::digest::is_computed;
    let by_dn =
        |es: &[abproxy::backup::Entry]| -> BTreeMap<String, BTreeMap<String, Vec<Vec<u8>>>> {
            es.iter()
                .map(|e| {
                    let attrs = e
                        .attrs
                        .iter()
                        .filter(|(k, _)| !is_computed(k))
                        .map(|(k, v)| {
                            let mut v = v.clone();
                            v.sort();
                            (k.to_ascii_lowercase(), v)
                        })
                        .collect();
                    (e.dn.to_ascii_lowercase(), attrs)
                })
                .collect()
        };
    let (a, b) = (by_dn(a), by_dn(b));
    for (dn, attrs) in &a {
        let Some(other) = b.get(dn) else {
            return format!("{dn} only in the backup");
        };
        for (k, v) in attrs {
            if other.get(k) != Some(v) {
                let show = |v: Option<&Vec<Vec<u8>>>| {
                    v.map(|v| {
                        v.iter()
                            .map(|x| String::from_utf8_lossy(x).into_owned())
                            .collect::<Vec<_>>()
                    })
                };
                return format!("{dn} {k}: {:?} / {:?}", show(Some(v)), show(other.get(k)));
            }
        }
    }
    "none found".into()
}

/// `abproxy backup --method 389` under writers: 389's own online backup
/// (the task added over ldapi, straight to the server) taken while the
/// proxy holds the writes, counted with dbscan, kept as one tar file, the
/// server's copy removed. It verifies; an edited digest is found;
/// `abproxy restore --ds-instance` refuses a running instance and restores
/// into a stopped fresh one, which then serves the manifest's count and
/// digest, and for each writer an unbroken run of its
/// acknowledged writes from the first (what was acknowledged before the
/// freeze, nothing held by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abproxy_backup_method_389_verifies_and_restores_into_a_fresh_instance() {
    use crate::support::backup::{copy_backup, edit_digest, manifest_json, verify_dir};
    use abproxy::backup::{ldif, Digest};
    if skip() {
        return;
    }
    let mut ds = start_ds(50).await;
    // As production servers run: dc=example,dc=org replicated (each stored
    // value carries its replication state, which dbscan prints), the USN
    // plugin on.
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        ds.dsconf(&["plugin", "usn", "enable"])?;
        ds.restart()?;
        ds.dsconf(&[
            "replication",
            "enable",
            "--suffix",
            SUFFIX,
            "--role",
            "supplier",
            "--replica-id",
            "1",
        ])?;
        Ok(())
    })
    .expect("USN and replication on");
    let (proxy, stop, writers) = under_writers(&ds).await;

    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("389-1");
    let before = tokio::time::Instant::now();
    let out = recipe_sh("ds389-backup", &proxy, ds.name(), parent.path()).await;
    let after = tokio::time::Instant::now();
    assert_eq!(out.code, Some(0), "{out:?}");
    let manifest = manifest_json(&dir);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "389-backup.tar",
            "HEADER.txt",
            "SHA256SUMS",
            "backup.log",
            "manifest.json"
        ]
    );
    // What OFF said: the writes the freeze held (one at most per writer,
    // each waits for its answer) were resumed.
    let released = manifest["freeze"]["released"].as_str().unwrap();
    assert!(released.starts_with("released after "), "{released}");
    let resumed = manifest["freeze"]["requests_resumed"].as_u64().unwrap();
    assert!(resumed <= WRITERS as u64, "{released}");
    let header = std::fs::read_to_string(dir.join("HEADER.txt")).unwrap();
    assert!(
        header.contains(&format!("released: {released}\n")),
        "{header}"
    );
    for (i, suffix) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        let b = &manifest["backends"][i];
        assert_eq!(b["suffix"], *suffix);
        assert_eq!(b["method"], "389");
        assert_eq!(b["file"], "389-backup.tar");
        assert_eq!(b["ds389"]["backend"], [USERROOT, OTHERROOT][i]);
        // 389's own position, read while frozen, in the header too.
        let usn: i64 = b["last_usn"].as_str().expect("last_usn").parse().unwrap();
        let header = std::fs::read_to_string(dir.join("HEADER.txt")).unwrap();
        assert!(
            header.contains(&format!("    last USN {usn}\n")),
            "{header}"
        );
        // 389 numbers a backend's first write 0; each backend had at
        // least WRITERS writes before the backup.
        assert!(usn + 1 >= WRITERS as i64, "{suffix}: last USN {usn}");
        let ruv = b["ruv"].as_array().map(Vec::len).unwrap_or(0);
        if *suffix == SUFFIX {
            assert!(
                b["ruv"][1].as_str().unwrap().starts_with("{replica 1 "),
                "{}",
                b["ruv"]
            );
        } else {
            assert_eq!(ruv, 0, "{suffix} is not replicated");
        }
        let on_server = b["ds389"]["archive_dir"].as_str().unwrap();
        assert!(
            on_server.starts_with(&ds.bak_dir().display().to_string()),
            "{on_server}"
        );
        assert!(
            !std::path::Path::new(on_server).exists(),
            "the server's copy is removed once in the backup"
        );
    }
    let verified = recipe_sh("ds389-verify", &proxy, ds.name(), parent.path()).await;
    assert_eq!(verified.code, Some(0), "{verified:?}");
    assert_eq!(
        verified.stdout.matches("read with dbscan").count(),
        2,
        "{verified:?}"
    );

    // The writers go on after the backup, then stop.
    let now = written(&ds).await;
    wait_written(&ds, now + 2 * WRITERS, "writers make no progress after").await;
    let acked = stop_writers(stop, writers).await;
    let finals = export_all(&ds, "final").await;
    check_acked(&acked, &finals);

    // How far the live server moved since: by 389's USNs, exactly the
    // writes after the backup.
    let out = abproxy(&[
        "verify",
        dir.to_str().unwrap(),
        "--against",
        &proxy.url(),
        "--bind-dn",
        DM_DN,
        "--password-file",
        dm_password_file().path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for (i, suffix) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        let b = &manifest["backends"][i];
        let now = entry_ids(&finals[i]).len() as u64;
        let then = b["entries"].as_u64().unwrap();
        let usn = b["last_usn"].as_str().unwrap();
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(&format!("against {suffix}:")))
            .unwrap_or_else(|| panic!("{out:?}"));
        assert!(
            line.contains(&format!(
                "{now} entries now (the backup: {then}), {} added or modified after its last USN \
                 {usn}, last USN ",
                now - then
            )),
            "{line}"
        );
    }

    // A copy whose manifest says another digest, consistent otherwise:
    // the archive's content does not match.
    let edited = parent.path().join("edited");
    copy_backup(&dir, &edited);
    edit_digest(&edited, 1);
    let out = verify_dir(&edited).await;
    assert_eq!(out.code, Some(11), "{out:?}");
    assert!(
        out.stdout.contains(&format!("content {OTHER_SUFFIX}")),
        "{out:?}"
    );

    // Restored into a fresh instance (its own sample data) with 389's tool.
    let mut fresh = fresh_instance().await;
    // Refused while the instance runs, nothing changed.
    let restore = |dir: std::path::PathBuf, name: String| async move {
        abproxy(&[
            "restore",
            dir.to_str().unwrap(),
            "--ds-instance",
            name.as_str(),
        ])
        .await
    };
    let own = dump(&fresh, SUFFIX, &["*", "+"]).await;
    let out = restore(dir.clone(), fresh.name().to_string()).await;
    assert_eq!(out.code, Some(9), "{out:?}");
    assert!(out.stderr.contains("is running"), "{out:?}");
    assert_eq!(
        dump(&fresh, SUFFIX, &["*", "+"]).await,
        own,
        "the fresh instance still serves its own sample data"
    );
    tokio::task::block_in_place(|| fresh.stop()).unwrap();
    let db = std::path::PathBuf::from(format!("/var/lib/dirsrv/slapd-{}/db", fresh.name()));
    let aside = || -> Vec<String> {
        std::fs::read_dir(db.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("db.before-restore-"))
            .collect()
    };
    // The edited copy restores, then does not match: all undone.
    let out = restore(edited.clone(), fresh.name().to_string()).await;
    assert_eq!(out.code, Some(9), "{out:?}");
    assert!(
        out.stderr.contains("the previous database was moved back"),
        "{out:?}"
    );
    assert!(aside().is_empty(), "nothing left aside");
    tokio::task::block_in_place(|| fresh.restart()).expect("the fresh instance starts again");
    assert_eq!(
        dump(&fresh, SUFFIX, &["*", "+"]).await,
        own,
        "the failed restore left the instance as it was"
    );
    tokio::task::block_in_place(|| fresh.stop()).unwrap();
    let out = recipe_sh("ds389-restore", &proxy, fresh.name(), parent.path()).await;
    proxy.shutdown().await.unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stderr.matches("digest as in the manifest").count(),
        2,
        "{out:?}"
    );
    assert_eq!(aside().len(), 1, "the previous database is kept aside");
    assert!(
        std::fs::read_dir(fresh.bak_dir()).unwrap().next().is_none(),
        "the unpacked archive is removed"
    );
    tokio::task::block_in_place(|| fresh.restart()).expect("the restored instance starts");
    let mut restored_written: Vec<Vec<String>> = vec![Vec::new(); WRITERS];
    for (i, base) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        let entries = ldif::read(&dump(&fresh, base, &["*", "+"]).await).unwrap();
        let b = &manifest["backends"][i];
        assert_eq!(b["entries"].as_u64(), Some(entries.len() as u64), "{base}");
        for e in &entries {
            let dn = e.dn.to_ascii_lowercase();
            if let Some(rest) = dn.strip_prefix("cn=w") {
                let w: usize = rest.split('-').next().unwrap().parse().unwrap();
                restored_written[w].push(dn);
            }
        }
        assert_eq!(
            b["digest"].as_str().unwrap(),
            Digest::of_entries(entries).unwrap().to_string(),
            "{base}: the restored instance serves what the manifest says"
        );
    }
    for (w, got) in restored_written.iter_mut().enumerate() {
        let n = |dn: &str| -> u64 { dn.split(['-', ',']).nth(1).unwrap().parse().unwrap() };
        got.sort_by_key(|dn| n(dn));
        assert!(
            got.len() <= acked[w].len(),
            "writer {w}: the backup holds writes never acknowledged"
        );
        let want: Vec<String> = acked[w][..got.len()]
            .iter()
            .map(|(d, _)| d.to_ascii_lowercase())
            .collect();
        assert_eq!(
            *got,
            want,
            "writer {w}: the backup holds its first {} acknowledged writes",
            got.len()
        );
        // Everything acknowledged before `abproxy backup` started is in
        // it; nothing acknowledged after it ended.
        for (k, (dn, at)) in acked[w].iter().enumerate() {
            if *at < before {
                assert!(
                    k < got.len(),
                    "{dn}, acknowledged before the backup, is missing"
                );
            } else if *at > after {
                assert!(
                    k >= got.len(),
                    "{dn}, acknowledged after the backup, is in it"
                );
            }
        }
        assert!(
            acked[w].iter().any(|(_, at)| *at < before),
            "writer {w} wrote before the backup"
        );
        assert!(
            acked[w].iter().any(|(_, at)| *at > after),
            "writer {w} wrote after the backup"
        );
    }
}

/// docs/ds389.md's recipe `name` run as written by `sh -e`, with the
/// environment it names: the proxy's URL, Directory Manager, `INSTANCE`,
/// `BACKUP`, and the built abproxy first on PATH; bounded to 600 s.
async fn recipe_sh(
    name: &str,
    proxy: &ProxyHandle,
    instance: &str,
    backup: &std::path::Path,
) -> ToolOutput {
    let bin_dir = std::path::Path::new(BIN)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let out = tokio::process::Command::new("sh")
        .args(["-ec", crate::support::recipe(name)])
        .env_clear()
        .env(
            "PATH",
            format!("{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        )
        .env("ABPROXY_URL", proxy.url())
        .env("ABPROXY_BIND_DN", DM_DN)
        .env("ABPROXY_PASSWORD", DM_PW)
        .env("INSTANCE", instance)
        .env("BACKUP", backup)
        .env("LDAPCONF", "/dev/null")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    ToolOutput::from(
        tokio::time::timeout(Duration::from_secs(600), out)
            .await
            .unwrap_or_else(|_| panic!("recipe {name} did not finish in 600 s"))
            .unwrap(),
    )
}

/// An `ldif` backup of 389 DS (taken through the proxy) goes back into a
/// fresh, stopped instance with `abproxy restore --ds-instance`
/// (`ldif2db` per backend, over a copy kept aside), which then serves the
/// manifest's count and digest for both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abproxy_ldif_backup_of_389_restores_into_a_fresh_instance() {
    use crate::support::backup::manifest_json;
    use abproxy::backup::{ldif, Digest};
    if skip() {
        return;
    }
    let (ds, proxy, parent, dir) = ldif_backup_of_a_389().await;
    // Without --method: the 389 DS behind the proxy is an instance here,
    // found by its suffix entries' entryUUIDs: 389's own backup.
    let auto = parent.path().join("auto");
    let out = cli(&proxy, &["backup", "--to", auto.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        manifest_json(&auto)["backends"][0]["method"],
        "389",
        "{out:?}"
    );
    let log = std::fs::read_to_string(auto.join("backup.log")).unwrap();
    assert!(
        log.contains(&format!(
            "method 389: the 389 DS behind the proxy is instance {} on this host",
            ds.name()
        )),
        "{log}"
    );
    proxy.shutdown().await.unwrap();
    let manifest = manifest_json(&dir);

    // It opens in a throwaway 389 DS built from the live instance's
    // configuration (ldif2db per backend), the live one running all along;
    // without an instance to copy, it cannot be checked.
    let d = dir.to_str().unwrap();
    let out =
        crate::support::backup::verify(&[d, "--restore-test", "--ds-instance", ds.name()]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.matches("a throwaway 389 DS served").count(),
        2,
        "{out:?}"
    );
    let out = crate::support::backup::verify(&[d, "--restore-test"]).await;
    assert_eq!(out.code, Some(12), "{out:?}");
    assert!(out.stdout.contains("give --ds-instance NAME"), "{out:?}");

    let mut fresh = fresh_instance().await;
    tokio::task::block_in_place(|| fresh.stop()).unwrap();
    let out = abproxy(&[
        "restore",
        dir.to_str().unwrap(),
        "--ds-instance",
        fresh.name(),
    ])
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stderr.matches("digest as in the manifest").count(),
        2,
        "{out:?}"
    );
    tokio::task::block_in_place(|| fresh.restart()).expect("the restored instance starts");
    for (i, base) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        let entries = ldif::read(&dump(&fresh, base, &["*", "+"]).await).unwrap();
        let b = &manifest["backends"][i];
        assert_eq!(b["entries"].as_u64(), Some(entries.len() as u64), "{base}");
        assert_eq!(
            b["digest"].as_str().unwrap(),
            Digest::of_entries(entries).unwrap().to_string(),
            "{base}: the restored instance serves what the manifest says"
        );
    }
}

/// `abproxy verify DIR --restore-test --ds-instance NAME` of a `--method
/// 389` backup, the live instance NAME running all along: the archive is
/// restored into a throwaway 389 DS built from NAME's configuration and
/// served on its own loopback port; both backends are read back over LDAP
/// with the manifest's count and digest. A copy whose manifest says
/// another digest does not match (exit 11), naming the backend; without
/// --ds-instance, or with an instance that does not exist, it cannot be
/// checked (exit 12). The live instance still serves the same entries,
/// on its own port and ldapi socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abproxy_verify_restore_test_serves_a_389_backup_from_a_throwaway_instance() {
    use crate::support::backup::{copy_backup, edit_digest, manifest_json, verify};
    if skip() {
        return;
    }
    let mut ds = start_ds(20).await;
    let proxy = proxy(
        &ds,
        vec![
            example_389ds(&ds),
            BackendConfig::new(OTHER_SUFFIX, Mode::Readonly),
        ],
    )
    .await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("389-1");
    let out = cli(
        &proxy,
        &[
            "backup",
            "--method",
            "389",
            "--server",
            &ds.ldapi_url(),
            "--to",
            dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    proxy.shutdown().await.unwrap();
    let manifest = manifest_json(&dir);
    let live_before = [
        dump(&ds, SUFFIX, &["*", "+"]).await,
        dump(&ds, OTHER_SUFFIX, &["*", "+"]).await,
    ];
    let name = ds.name().to_string();
    let d = dir.to_str().unwrap();

    let out = verify(&[d, "--restore-test", "--ds-instance", &name]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    eprintln!("{}", out.stdout);
    for (i, suffix) in [SUFFIX, OTHER_SUFFIX].iter().enumerate() {
        let n = manifest["backends"][i]["entries"].as_u64().unwrap();
        assert!(n > 1, "{suffix} has entries");
        let line = format!(
            "restore test {suffix}: a throwaway 389 DS served {n} entries, digest as in the \
             manifest"
        );
        assert!(out.stdout.contains(&line), "{line}\n{out:?}");
    }

    // The live instance was not disturbed: running, same entries, over
    // ldapi and over its own TCP port.
    assert!(ds.is_running(), "the live instance still runs");
    assert_eq!(
        [
            dump(&ds, SUFFIX, &["*", "+"]).await,
            dump(&ds, OTHER_SUFFIX, &["*", "+"]).await,
        ],
        live_before,
        "the live instance serves what it served before"
    );
    let tcp = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &ds.url(),
            "-D",
            DM_DN,
            "-w",
            DM_PW,
            "-s",
            "base",
            "-b",
            SUFFIX,
            "dn",
        ],
        None,
    )
    .await;
    assert_eq!(tcp.stdout, format!("dn: {SUFFIX}\n\n"), "{tcp:?}");

    // A copy whose manifest says another digest for dc=other,dc=org.
    let edited = parent.path().join("edited");
    copy_backup(&dir, &edited);
    edit_digest(&edited, 1);
    let e = edited.to_str().unwrap();
    let out = verify(&[e, "--restore-test", "--ds-instance", &name]).await;
    assert_eq!(out.code, Some(11), "{out:?}");
    assert!(
        out.stdout.lines().any(|l| l.starts_with("MISMATCH")
            && l.contains(&format!(
                "restore test {OTHER_SUFFIX}: a throwaway 389 DS served"
            ))),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains(&format!("restore test {SUFFIX}: a throwaway 389 DS served")),
        "the other backend still passes: {out:?}"
    );

    // Without --ds-instance, or with no such instance: cannot check.
    let out = verify(&[d, "--restore-test"]).await;
    assert_eq!(out.code, Some(12), "{out:?}");
    assert!(out.stdout.contains("give --ds-instance NAME"), "{out:?}");
    let out = verify(&[d, "--restore-test", "--ds-instance", "abpnosuch"]).await;
    assert_eq!(out.code, Some(12), "{out:?}");
    assert!(
        out.stdout.contains("no 389 DS instance abpnosuch here"),
        "{out:?}"
    );
    assert!(ds.is_running(), "the live instance still runs");
}

/// A 389 DS with 30 users, the proxy in front (both suffixes readonly)
/// and an `ldif` backup of it taken through the proxy at `PARENT/bk`.
async fn ldif_backup_of_a_389() -> (Ds389, ProxyHandle, tempfile::TempDir, std::path::PathBuf) {
    let ds = start_ds(30).await;
    let proxy = proxy(
        &ds,
        vec![
            BackendConfig::new(SUFFIX, Mode::Readonly),
            BackendConfig::new(OTHER_SUFFIX, Mode::Readonly),
        ],
    )
    .await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = cli(
        &proxy,
        &["backup", "--to", dir.to_str().unwrap(), "--method", "ldif"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    (ds, proxy, parent, dir)
}

/// A fresh 389 DS with its own small sample data (3 and 1 users), to
/// restore into.
async fn fresh_instance() -> Ds389 {
    tokio::task::spawn_blocking(|| {
        Ds389::start(testkit::ds389::Ds389Options {
            users: 3,
            other_users: 1,
            tls: None,
        })
    })
    .await
    .unwrap()
    .expect("a fresh 389-ds")
}

/// `abproxy ARGS` as the built binary (stdin closed, output captured, no
/// ABPROXY_ variables of the test's environment), within 600 s.
async fn abproxy(args: &[&str]) -> ToolOutput {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("ABPROXY_LOG")
        .env_remove("ABPROXY_PASSWORD")
        .env_remove("ABPROXY_URL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    ToolOutput::from(
        tokio::time::timeout(Duration::from_secs(600), out)
            .await
            .unwrap_or_else(|_| panic!("abproxy {args:?} did not finish within 600 s"))
            .unwrap(),
    )
}

/// Directory Manager's password in a temporary file (removed when dropped).
fn dm_password_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), format!("{DM_PW}\n")).unwrap();
    f
}
