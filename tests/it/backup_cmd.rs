//! `abproxy backup --to DIR`, run as the built binary against a real slapd
//! (both suffixes, readonly) with the proxy in front: the backup taken while
//! writers keep writing is the state at one instant inside the command (every
//! write acknowledged before it is in, none acknowledged after it), its
//! manifest agrees with its files, its digest with `slapcat`; a failed
//! backup leaves nothing behind (no DIR, no temporary directory, no freeze).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abproxy::backup::{ldif, Digest, Entry};
use abproxy::config::Config;
use abproxy::freeze::backend::Mode;
use abproxy::operator::{State, Status};
use sha2::{Digest as _, Sha256};
use testkit::{user_dn, user_pw, SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_SUFFIX};
use tokio::task::block_in_place;

use crate::support::backup::*;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");
const SUFFIX: &str = "dc=example,dc=org";
/// Writers during the one-instant tests (users 1..=16 of the lab's 20).
const WRITERS: usize = 16;

async fn lab(mode: Mode) -> Lab {
    backup_lab(mode, 20, 10).await
}

async fn backup(lab: &Lab, args: &[&str]) -> ToolOutput {
    backup_as(lab, ADMIN_DN, ADMIN_PW, args).await
}

async fn status(lab: &Lab) -> Status {
    operator_status(lab).await
}

fn read_entries(path: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(path).expect("read the LDIF");
    ldif::read(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Names in `dir` (the parent of the backup) that are temporary directories.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.contains(".partial-"))
        .collect()
}

/// The manifest agrees with the files: per backend the entry count and
/// digest of its LDIF, and every file's size and SHA-256. The entries of
/// each backend by suffix.
async fn check_manifest(dir: &Path) -> HashMap<String, (Vec<Entry>, String)> {
    check_manifest_with(dir, None).await
}

/// The entries of a `files` backend's copy of data.mdb: built with the
/// server's configuration (abproxy's own builder) and read with slapcat.
async fn mdb_entries(config: &Path, suffix: &str, file: &Path) -> Vec<Entry> {
    use abproxy::backup::slapd;
    let work = tempfile::tempdir().unwrap();
    let tools = slapd::Tools::default();
    let entries = slapd::read_config(&tools, config, Duration::from_secs(30), work.path())
        .await
        .expect("read the configuration");
    let built = work.path().join("built");
    std::fs::create_dir(&built).unwrap();
    slapd::build(
        &tools,
        &entries,
        suffix,
        slapd::Source::Mdb(file),
        &built,
        "pw",
        &slapd::Limits::default(),
    )
    .await
    .expect("build from the copy");
    let out = std::process::Command::new(testkit::SLAPCAT)
        .arg("-F")
        .arg(built.join("slapd.d"))
        .args(["-b", suffix, "-o", "ldif_wrap=no"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ldif::read(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// [`check_manifest`]; `config`: the server's, to read `files` backends.
async fn check_manifest_with(
    dir: &Path,
    config: Option<&Path>,
) -> HashMap<String, (Vec<Entry>, String)> {
    let m = manifest_json(dir);
    assert_eq!(m["format_version"], 1);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the backup is private to its owner");
    }
    assert!(m["freeze"]["id"].as_u64().is_some(), "{m}");
    let files = m["files"].as_array().expect("files");
    for f in files {
        let name = f["name"].as_str().expect("name");
        let bytes = std::fs::read(dir.join(name)).expect("a listed file");
        assert_eq!(
            f["size"].as_u64(),
            Some(bytes.len() as u64),
            "size of {name}"
        );
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(f["sha256"].as_str(), Some(hex.as_str()), "sha256 of {name}");
    }
    let mut out = HashMap::new();
    for b in m["backends"].as_array().expect("backends") {
        let file = b["file"].as_str().expect("file");
        assert!(
            files.iter().any(|f| f["name"] == file),
            "{file} listed in files"
        );
        let entries = match b["method"].as_str() {
            Some("files") => {
                let config = config.expect("the configuration, for a files backup");
                mdb_entries(config, b["suffix"].as_str().unwrap(), &dir.join(file)).await
            }
            _ => read_entries(&dir.join(file)),
        };
        assert_eq!(b["entries"].as_u64(), Some(entries.len() as u64), "{b}");
        let digest = Digest::of_entries(entries.clone()).expect("digest");
        assert_eq!(b["digest"].as_str(), Some(digest.to_string().as_str()));
        assert!(b["mode"] == "readonly" || b["mode"] == "stop", "{b}");
        assert!(
            ["ldif", "slapcat", "files"].contains(&b["method"].as_str().unwrap()),
            "{b}"
        );
        out.insert(
            b["suffix"].as_str().expect("suffix").to_string(),
            (entries, digest.to_string()),
        );
    }
    for name in ["HEADER.txt", "backup.log"] {
        assert!(dir.join(name).is_file(), "{name}");
    }
    // coreutils checks every file, the manifest too.
    let sums = std::process::Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(dir)
        .output()
        .expect("run sha256sum");
    let listed = String::from_utf8_lossy(&sums.stdout);
    assert!(sums.status.success(), "sha256sum -c: {listed}");
    assert_eq!(listed.lines().count(), files.len() + 1, "{listed}");
    assert!(listed.contains("manifest.json: OK"), "{listed}");
    out
}

/// What one writer saw acknowledged, in order: (k, when its add was, when
/// its modify was).
type Acks = Vec<(usize, Instant, Instant)>;

/// Acknowledged (add, modify) pairs of each writer (1..=WRITERS), counted
/// as they come, for a test to await progress instead of sleeping.
struct Written {
    pairs: Vec<std::sync::atomic::AtomicUsize>,
    more: tokio::sync::Notify,
}

impl Written {
    fn new() -> Written {
        Written {
            pairs: (0..=WRITERS).map(|_| Default::default()).collect(),
            more: tokio::sync::Notify::new(),
        }
    }

    fn add(&self, w: usize) {
        self.pairs[w].fetch_add(1, Ordering::SeqCst);
        self.more.notify_waiters();
    }

    /// Each writer's count now.
    fn now(&self) -> Vec<usize> {
        self.pairs
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    }

    /// Until every writer has `more` pairs acknowledged beyond `from`
    /// (within 60 s).
    async fn beyond(&self, from: &[usize], more: usize) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let notified = self.more.notified();
                let now = self.now();
                if (1..=WRITERS).all(|w| now[w] >= from[w] + more) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a writer made no progress in 60 s: {:?}", self.now()));
    }
}

/// Writer `w`: adds `cn=wW-K,SUFFIX` and sets user W's description to
/// `wW-K`, K = 0, 1, ..., until `stop`; each acknowledged K with its time,
/// counted in `written` too.
async fn writer(url: String, w: usize, stop: Arc<AtomicBool>, written: Arc<Written>) -> Acks {
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(&url).await.expect("connect");
    ldap3::drive!(conn);
    ldap.simple_bind(ADMIN_DN, ADMIN_PW)
        .await
        .expect("bind")
        .success()
        .expect("bind");
    let mut acks = Vec::new();
    let mut k = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let name = format!("w{w}-{k}");
        let dn = format!("cn={name},{SUFFIX}");
        let add = ldap
            .add(
                &dn,
                vec![
                    ("objectClass", HashSet::from(["device"])),
                    ("cn", HashSet::from([name.as_str()])),
                ],
            )
            .await
            .expect("add")
            .rc;
        assert_eq!(add, 0, "add {dn}");
        let added = Instant::now();
        let modify = ldap
            .modify(
                &user_dn(w),
                vec![ldap3::Mod::Replace(
                    "description",
                    HashSet::from([name.as_str()]),
                )],
            )
            .await
            .expect("modify")
            .rc;
        assert_eq!(modify, 0, "modify {}", user_dn(w));
        acks.push((k, added, Instant::now()));
        written.add(w);
        k += 1;
    }
    let _ = ldap.unbind().await;
    acks
}

fn values<'a>(e: &'a Entry, attr: &str) -> Vec<&'a [u8]> {
    e.attrs
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(attr))
        .flat_map(|(_, v)| v.iter().map(Vec::as_slice))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_writers_is_one_instant_and_its_manifest_checks_out() {
    one_instant_under_writers("ldif").await;
}

/// The same with `--method slapcat`: slapd's own dump, taken while frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slapcat_backup_under_writers_is_one_instant() {
    one_instant_under_writers("slapcat").await;
}

/// The same with `--method files`: a copy of each data.mdb taken while
/// frozen, counted after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_backup_under_writers_is_one_instant() {
    one_instant_under_writers("files").await;
}

/// A backup by `method` while 16 writers write through the proxy: every
/// write acknowledged before the command is in it, none after, one instant
/// (no gap in any writer's adds); it verifies, and it opens in a throwaway
/// slapd with exactly the manifest's entries (`verify --restore-test`).
/// `slapcat` and `files` pointed at another server's configuration (a
/// second slapd with the same suffixes, created on its own) are refused:
/// the suffix entry's entryUUID read there is not the one the proxy's
/// server serves. Exit 8 naming both, no backup left, the freeze released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_methods_refuse_another_servers_database() {
    let lab = lab(Mode::Readonly).await;
    let other = other_slapd();
    let config = other.dir().join("slapd.d");
    for method in ["slapcat", "files"] {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("bk");
        let args = [
            "--to",
            dir.to_str().unwrap(),
            "--method",
            method,
            "--slapd-config",
            config.to_str().unwrap(),
        ];
        let out = backup(&lab, &args).await;
        assert_eq!(out.code, Some(8), "{method}: {out:?}");
        assert!(
            out.stderr
                .contains("is not of the database behind the proxy: its suffix entry's id"),
            "{method}: {out:?}"
        );
        assert!(!dir.exists(), "{method}: no backup");
        assert!(partials(parent.path()).is_empty(), "{method}");
        assert_eq!(status(&lab).await.state, State::Thawed, "{method}");
    }
}

/// Without --method, `backup` takes the local database when it is
/// provably the proxy's server's (`files`: mdb_copy is installed), and
/// reads through the proxy (`ldif`) when the configuration given is
/// another server's; backup.log says which and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_method_takes_the_local_database_only_when_it_is_the_proxys() {
    let lab = lab(Mode::Readonly).await;
    let other = other_slapd();
    for (config, method, why) in [
        (
            lab.slapd.dir().join("slapd.d"),
            "files",
            "method files: the slapd behind the proxy has its databases on this host",
        ),
        (
            other.dir().join("slapd.d"),
            "ldif",
            "is not the one behind the proxy (its suffix entry's id (entryUUID) is",
        ),
    ] {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("bk");
        let args = [
            "--to",
            dir.to_str().unwrap(),
            "--slapd-config",
            config.to_str().unwrap(),
        ];
        let out = backup(&lab, &args).await;
        assert_eq!(out.code, Some(0), "{method}: {out:?}");
        let m = manifest_json(&dir);
        for b in m["backends"].as_array().unwrap() {
            assert_eq!(b["method"], method, "{out:?}");
        }
        let log = std::fs::read_to_string(dir.join("backup.log")).unwrap();
        assert!(log.lines().next().unwrap().contains(why), "{log}");
        let verified = verify_dir(&dir).await;
        assert_eq!(verified.code, Some(0), "{verified:?}");
        if method == "files" {
            // With the server's configuration, verify opens the copies
            // read-only; a manifest that says otherwise does not match.
            let (d, c) = (dir.to_str().unwrap(), config.to_str().unwrap());
            let opened = verify(&[d, "--slapd-config", c]).await;
            assert_eq!(opened.code, Some(0), "{opened:?}");
            assert_eq!(
                opened
                    .stdout
                    .matches("opened read-only with slapcat")
                    .count(),
                2,
                "{opened:?}"
            );
            edit_digest(&dir, 0);
            let edited = verify(&[d, "--slapd-config", c]).await;
            assert_eq!(edited.code, Some(11), "{edited:?}");
        }
    }
}

/// A second slapd with the lab's suffixes, created on its own (other
/// entryUUIDs).
fn other_slapd() -> testkit::Slapd {
    block_in_place(|| {
        testkit::Slapd::start(SlapdOptions {
            nosync: true,
            users: 3,
            other_users: 2,
            ..Default::default()
        })
    })
    .expect("a second slapd")
}

async fn one_instant_under_writers(method: &str) {
    let lab = lab(Mode::Readonly).await;
    let config = lab.slapd.dir().join("slapd.d");
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Written::new());
    let writers: Vec<_> = (1..=WRITERS)
        .map(|w| tokio::spawn(writer(lab.proxied(), w, stop.clone(), written.clone())))
        .collect();
    // Every writer busy before the backup starts, and after it ends.
    written.beyond(&written.now(), 1).await;
    let before = Instant::now();
    let args = [
        "--to",
        dir.to_str().unwrap(),
        "--method",
        method,
        "--slapd-config",
        config.to_str().unwrap(),
    ];
    let out = backup(&lab, &args).await;
    let after = Instant::now();
    // Two: the first counted now may have been acknowledged just before
    // `after`; the second was acknowledged after the first was counted.
    written.beyond(&written.now(), 2).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for w in writers {
        acks.push(
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("writer stops")
                .expect("writer"),
        );
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(partials(parent.path()).is_empty());
    let backends = check_manifest_with(&dir, Some(&config)).await;
    assert_eq!(backends.len(), 2, "both suffixes");
    assert_eq!(manifest_json(&dir)["backends"][0]["method"], method);
    // Which database it is, as served during the freeze (and checked
    // against what the method read).
    let served_uuid = manifest_json(&dir)["backends"][0]["suffix_uuid"].clone();
    assert!(
        served_uuid.as_str().is_some_and(|u| u.len() == 36),
        "{served_uuid}"
    );
    let verified = verify(&[
        dir.to_str().unwrap(),
        "--restore-test",
        "--slapd-config",
        config.to_str().unwrap(),
    ])
    .await;
    assert_eq!(verified.code, Some(0), "{verified:?}");
    let (entries, _) = &backends[SUFFIX];
    // 10 users, ou=people and the suffix entry.
    assert!(
        backends[OTHER_SUFFIX].0.len() >= 12,
        "{}",
        backends[OTHER_SUFFIX].0.len()
    );

    let dns: HashSet<String> = entries.iter().map(|e| e.dn.to_lowercase()).collect();
    for (i, acks) in acks.iter().enumerate() {
        let w = i + 1;
        let in_backup = |k: usize| dns.contains(&format!("cn=w{w}-{k},{SUFFIX}"));
        let last_before = acks.iter().rev().find(|a| a.2 < before).map(|a| a.0);
        let first_after = acks.iter().find(|a| a.2 > after).map(|a| a.0);
        assert!(
            first_after.is_some(),
            "writer {w} wrote nothing after the backup"
        );
        let last_before = last_before.unwrap_or_else(|| panic!("writer {w}: nothing before"));
        for &(k, t, _) in acks {
            if t < before {
                assert!(in_backup(k), "w{w}-{k}, acknowledged before, is missing");
            } else if t > after {
                assert!(!in_backup(k), "w{w}-{k}, acknowledged after, is in");
            }
        }
        // The description: the value of a write acknowledged during the
        // command or the last one before, never one from after.
        let user = entries
            .iter()
            .find(|e| e.dn.eq_ignore_ascii_case(&user_dn(w)))
            .expect("user entry");
        let desc = String::from_utf8(values(user, "description")[0].to_vec()).unwrap();
        let k: usize = desc
            .rsplit('-')
            .next()
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("description {desc}"));
        assert!(k >= last_before, "{desc}: older than w{w}-{last_before}");
        // One instant: the writer's adds in the backup are w-0..=K with no
        // gap, and the description the one of add K's write (K, or K-1
        // when the freeze fell between that add and its modify).
        let added: Vec<usize> = (0..acks.len()).filter(|&k| in_backup(k)).collect();
        let top = *added.last().expect("adds in the backup");
        assert_eq!(added.len(), top + 1, "writer {w}: gaps in {added:?}");
        assert!(
            k == top || k + 1 == top,
            "writer {w}: description {desc} with adds up to w{w}-{top}: not one instant"
        );
        assert!(k < first_after.unwrap(), "{desc}: written after the backup");
    }
    // Released: the writers went on, nothing is frozen.
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_digest_equals_slapcat_of_the_live_server() {
    let lab = lab(Mode::Readonly).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = backup(&lab, &["--to", dir.to_str().unwrap(), "--method", "ldif"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let backends = check_manifest(&dir).await;
    // The admin is the rootdn of SUFFIX only (it cannot read userPassword
    // under the other suffix), so SUFFIX is the one to compare.
    let dump = block_in_place(|| lab.slapd.slapcat(SUFFIX)).expect("slapcat");
    let dumped = Digest::of_entries(ldif::read(&dump).expect("slapcat LDIF")).unwrap();
    assert_eq!(backends[SUFFIX].1, dumped.to_string());
    let m = manifest_json(&dir);
    // slapd's root DSE has no vendorName: recorded as absent (null).
    assert!(m["server"].get("vendor_name").is_some(), "{m}");
    let header = std::fs::read_to_string(dir.join("HEADER.txt")).unwrap();
    assert!(header.contains(&dumped.to_string()), "{header}");
    let uuid = m["backends"][0]["suffix_uuid"].as_str().unwrap();
    assert!(
        header.contains(&format!("    suffix entry id {uuid}\n")),
        "{header}"
    );
    let log = std::fs::read_to_string(dir.join("backup.log")).unwrap();
    assert!(
        log.contains("freeze (ON)") && log.contains("release (OFF)"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_leaves_nothing_behind() {
    let lab = lab(Mode::Readonly).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");

    // An operator not in [freeze] allowed.
    let out = backup_as(
        &lab,
        &user_dn(1),
        &user_pw(1),
        &["--to", dir.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains("insufficientAccessRights"),
        "{}",
        out.stderr
    );
    assert!(!dir.exists());
    assert!(partials(parent.path()).is_empty());
    assert_eq!(status(&lab).await.state, State::Thawed);

    // DIR exists: a usage error, DIR untouched.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep"), "x").unwrap();
    let out = backup(&lab, &["--to", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("exists"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(dir.join("keep")).unwrap(), "x");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    assert!(partials(parent.path()).is_empty());
}

/// In `stop` mode the backup reads through its own freeze: the holder's
/// searches pass, everyone else's reads are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_mode_backup_reads_through_its_own_freeze() {
    let lab = lab(Mode::Stop).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = backup(&lab, &["--to", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let backends = check_manifest(&dir).await;
    assert_eq!(backends.len(), 2);
    assert_eq!(manifest_json(&dir)["backends"][0]["mode"], "stop");
    assert_eq!(status(&lab).await.state, State::Thawed);
}

/// The rule the stop-mode backup needs, on the wire: during a `stop`
/// freeze the holder's own search and compare pass; another connection's
/// search is held until OFF, and so is the holder's own write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_freeze_passes_only_the_holders_reads() {
    use crate::support::freeze::{ab, bound, call, modify, outcome, recv_finals};
    use abproxy_proto::AllowBackupRequest;
    let lab = lab(Mode::Stop).await;
    let engine = lab.proxy.engine();
    let mut other = RawConn::connect(&lab.proxy_addr()).await;
    let mut op = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, text) = call(&mut op, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{text}");
    // Another client's read: held.
    other
        .send_msg(search(1, &user_dn(1), 0, "(objectClass=*)", &["uid"]))
        .await;
    wait_until("the other client's search held", 10, || {
        engine.queued().0 == 1
    })
    .await;
    // The holder's own search and compare: answered now.
    let frames = {
        op.send_msg(search(3, SUFFIX, 2, "(uid=user1)", &["uid"]))
            .await;
        op.recv_until_final(3).await
    };
    assert_eq!(frames.len(), 2, "one entry and the result");
    assert_eq!(outcome(frames.last().unwrap()).0, 0);
    let compare = ldap3_proto::proto::LdapMsg::new(
        4,
        ldap3_proto::proto::LdapOp::CompareRequest(ldap3_proto::proto::LdapCompareRequest {
            dn: user_dn(1),
            atype: "uid".into(),
            val: b"user1".to_vec(),
        }),
    );
    let (code, _) = call(&mut op, compare).await;
    assert_eq!(code, 6, "compareTrue");
    // The holder's write: held like anyone's.
    op.send_msg(modify(5, &user_dn(1), "description", "by the holder"))
        .await;
    wait_until("the holder's write held", 10, || engine.queued().0 == 2).await;
    assert_eq!(engine.queued().0, 2, "the holder's reads were never held");
    // OFF releases the held write: its answer and OFF's come in either
    // order.
    op.send_msg(ab(6, &AllowBackupRequest::off())).await;
    let (_, codes) = recv_finals(&mut op, &[5, 6]).await;
    assert_eq!(codes, [0, 0], "the held write and OFF");
    let got = other.recv_until_final(1).await;
    assert_eq!(got.len(), 2, "the held search answered after OFF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_while_exporting_leaves_no_freeze_and_no_dir() {
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            users: 20,
            other_users: 5000,
            ..Default::default()
        },
        |c: &mut Config| c.freeze.allowed = vec![ADMIN_DN.into()],
    )
    .await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let mut child = tokio::process::Command::new(BIN)
        .args(["backup", "--to", dir.to_str().unwrap()])
        .env_remove("ABPROXY_LOG")
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", ADMIN_DN)
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start abproxy backup");
    let pid = child.id().expect("pid");
    let tmp = parent.path().join(format!("bk.partial-{pid}"));
    // The big backend's file has begun: the export is under way (the
    // small one comes first or second, in the server's order).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(&tmp)
            .map(|d| {
                d.filter_map(Result::ok).any(|e| {
                    e.file_name().to_string_lossy().contains("dc_other_dc_org")
                        && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if started {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "the export did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(status(&lab).await.state, State::Frozen);
    child.start_kill().expect("SIGKILL");
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the killed backup exits");
    // holdUntilUnbind: the proxy ends the freeze when the connection goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&lab).await.state != State::Thawed {
        assert!(Instant::now() < deadline, "still frozen after the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dir.exists(), "a killed backup has no DIR");
}

/// A restore builds nothing from a backup that is not what its manifest
/// says: an LDIF file changed (its SHA-256), or a manifest whose digest was
/// edited (the database built does not reproduce it). `--apply` refuses
/// while slapd runs, and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_what_does_not_match_and_a_running_slapd() {
    let lab = lab(Mode::Readonly).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = backup(&lab, &["--to", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let config = lab.slapd.dir().join("slapd.d");
    let config = config.to_str().unwrap();
    let work = parent.path().join("work");
    let work_s = work.to_str().unwrap();
    let dir_s = dir.to_str().unwrap();
    let m = manifest_json(&dir);
    let file = dir.join(m["backends"][0]["file"].as_str().unwrap());

    // The manifest's digest edited: the database built does not hold it.
    let original = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let digest = m["backends"][0]["digest"].as_str().unwrap();
    let edited = original.replacen(digest, &"0".repeat(64), 1);
    std::fs::write(dir.join("manifest.json"), &edited).unwrap();
    let out = restore(&[dir_s, "--to", work_s, "--slapd-config", config]).await;
    assert_eq!(out.code, Some(9), "{out:?}");
    assert!(
        out.stderr.contains("does not hold the backup"),
        "{}",
        out.stderr
    );
    assert!(!work.exists() && partials(parent.path()).is_empty());
    std::fs::write(dir.join("manifest.json"), &original).unwrap();

    // The LDIF changed: refused before anything is built.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("uid: user1\n", "uid: user9\n", 1)).unwrap();
    let out = restore(&[dir_s, "--to", work_s, "--slapd-config", config]).await;
    assert_eq!(out.code, Some(9), "{out:?}");
    assert!(
        out.stderr.contains("is not the file the backup wrote"),
        "{}",
        out.stderr
    );
    assert!(!work.exists());
    std::fs::write(&file, text).unwrap();

    // Whole again: built; --apply refuses while slapd runs.
    let out = restore(&[dir_s, "--to", work_s, "--slapd-config", config]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = restore(&["--apply", work_s]).await;
    assert_eq!(out.code, Some(9), "{out:?}");
    assert!(out.stderr.contains("slapd is running"), "{}", out.stderr);
    let built = std::fs::read_dir(&work)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("db/data.mdb").is_file())
        .count();
    assert_eq!(built, 2, "both databases still in WORK");
}

/// `--method command`: the command runs once while frozen, in the
/// temporary backup directory (`ABPROXY_BACKUP_DIR`, the frozen suffixes in
/// `ABPROXY_BACKENDS`); the plain files it leaves are the backup's, with
/// their SHA-256s, and it verifies. A command that fails, or leaves a
/// directory, fails the backup (exit 8) and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_backup_records_what_the_command_wrote() {
    let lab = lab(Mode::Readonly).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let config = lab.slapd.dir().join("slapd.d");
    let script = format!(
        "slapcat -F {} -b {SUFFIX} -l example.ldif && printf '%s\\n' \"$ABPROXY_BACKENDS\" > \
         backends.txt && echo \"$ABPROXY_BACKUP_DIR\" > where.txt",
        config.display()
    );
    let to = dir.to_str().unwrap();
    let args = ["--to", to, "--method", "command", "--", "sh", "-c", &script];
    let out = backup(&lab, &args).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let m = manifest_json(&dir);
    for b in m["backends"].as_array().unwrap() {
        assert_eq!(b["method"], "command", "{b}");
        assert!(
            b["commands"][0].as_str().unwrap().contains("slapcat"),
            "{b}"
        );
    }
    let names: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for name in ["example.ldif", "backends.txt", "where.txt", "HEADER.txt"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let backends = std::fs::read_to_string(dir.join("backends.txt")).unwrap();
    assert_eq!(backends, format!("{SUFFIX}\n{OTHER_SUFFIX}\n"));
    let where_ = std::fs::read_to_string(dir.join("where.txt")).unwrap();
    assert!(where_.contains("bk.partial-"), "{where_}");
    // The dump is the server's data (nothing written meanwhile).
    let dumped = read_entries(&dir.join("example.ldif"));
    let live = ldif::read(&block_in_place(|| lab.slapd.slapcat(SUFFIX)).unwrap()).unwrap();
    assert_eq!(
        Digest::of_entries(dumped).unwrap(),
        Digest::of_entries(live).unwrap()
    );
    let verified = verify_dir(&dir).await;
    assert_eq!(verified.code, Some(0), "{verified:?}");
    assert!(
        verified.stdout.contains("written by a command"),
        "{verified:?}"
    );

    for (script, says) in [
        ("false", "exited with"),
        ("mkdir sub", "sub is not a plain file"),
    ] {
        let bad = parent.path().join("bad");
        let to = bad.to_str().unwrap();
        let args = ["--to", to, "--method", "command", "--", "sh", "-c", script];
        let out = backup(&lab, &args).await;
        assert_eq!(out.code, Some(8), "{script}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{script}: {}", out.stderr);
        assert!(!bad.exists() && partials(parent.path()).is_empty());
        assert_eq!(status(&lab).await.state, State::Thawed);
    }
    // A command without --method command, and the reverse: usage errors.
    let fresh = parent.path().join("fresh");
    let to = fresh.to_str().unwrap();
    for args in [
        &["--to", to, "--", "true"][..],
        &["--to", to, "--method", "command"],
    ] {
        let out = backup(&lab, args).await;
        assert_eq!(out.code, Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("goes with --method command"),
            "{}",
            out.stderr
        );
        assert!(!fresh.exists());
    }
}
