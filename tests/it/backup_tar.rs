//! `abproxy backup --tar -` and `--history FILE`, run as the built binary
//! against a real slapd with the proxy in front: the tar stream holds one
//! directory with the files a `--to` backup has (checked with tar and
//! sha256sum), a reader that goes away makes the backup fail naming the
//! step with no freeze and no staging directory left, stdout on a terminal
//! is refused, and every attempt appends one JSON line to the history.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use abproxy::freeze::backend::Mode;
use abproxy::operator::{State, Status};
use sha2::{Digest as _, Sha256};
use testkit::{user_dn, ADMIN_DN, ADMIN_PW};
use tokio::io::AsyncReadExt;
use tokio::task::block_in_place;

use crate::support::backup::{backup_lab, manifest_json, operator_status};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

async fn lab(users: usize, other_users: usize) -> Lab {
    backup_lab(Mode::Readonly, users, other_users).await
}

/// `abproxy backup ARGS` as `dn` (stdout to `stdout`), not yet run.
fn backup_cmd(lab: &Lab, dn: &str, pw: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("backup")
        .args(args)
        .env_remove("ABPROXY_LOG")
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", dn)
        .env("ABPROXY_PASSWORD", pw)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// `abproxy backup ARGS` as the admin, stdout and stderr captured.
fn backup(lab: &Lab, args: &[&str]) -> std::process::Output {
    block_in_place(|| {
        backup_cmd(lab, ADMIN_DN, ADMIN_PW, args)
            .stdout(Stdio::piped())
            .output()
            .expect("run abproxy backup")
    })
}

async fn status(lab: &Lab) -> Status {
    operator_status(lab).await
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// The manifest's sizes and SHA-256s match the files, and `sha256sum -c
/// SHA256SUMS` passes. The digests by suffix.
fn check_files(dir: &Path) -> BTreeMap<String, String> {
    let m = manifest_json(dir);
    for f in m["files"].as_array().expect("files") {
        let name = f["name"].as_str().expect("name");
        let bytes = std::fs::read(dir.join(name)).expect("a listed file");
        assert_eq!(f["size"].as_u64(), Some(bytes.len() as u64), "{name}");
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(f["sha256"].as_str(), Some(hex.as_str()), "{name}");
    }
    let sums = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(dir)
        .output()
        .expect("run sha256sum");
    assert!(
        sums.status.success(),
        "sha256sum -c: {}",
        String::from_utf8_lossy(&sums.stdout)
    );
    m["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["suffix"].as_str().unwrap().to_string(),
                b["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_tar_holds_the_files_of_a_to_backup() {
    let lab = lab(20, 10).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("bk");
    let staging = work.path().join("staging");
    let x = work.path().join("x");
    std::fs::create_dir(&staging).unwrap();
    std::fs::create_dir(&x).unwrap();

    let out = backup(&lab, &["--to", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "--to writes nothing on stdout");

    // `abproxy backup --tar - | tee OUT | tar -x -C X`.
    let archive = work.path().join("out.tar");
    let out = block_in_place(|| {
        backup_cmd(
            &lab,
            ADMIN_DN,
            ADMIN_PW,
            &["--tar", "-", "--tmp-dir", staging.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut backup| {
            let tee = Command::new("tee")
                .arg(&archive)
                .stdin(Stdio::from(backup.stdout.take().unwrap()))
                .stdout(Stdio::piped())
                .spawn()?;
            let tar = Command::new("tar")
                .args(["-x", "-C", x.to_str().unwrap()])
                .stdin(Stdio::from(tee.stdout.unwrap()))
                .status()?;
            assert!(tar.success(), "tar -x: {tar}");
            backup.wait_with_output()
        })
        .expect("run the pipe")
    });
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("streamed on stdout as tar"),
        "{}",
        stderr(&out)
    );
    assert!(
        names(&staging).is_empty(),
        "staging left: {:?}",
        names(&staging)
    );
    // Nothing but the archive on stdout: a whole number of tar blocks,
    // every entry owned by 0/0 with the fixed modes.
    let bytes = std::fs::read(&archive).unwrap();
    assert_eq!(bytes.len() % 512, 0, "{}", bytes.len());
    let listing = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&archive)
        .output()
        .expect("tar -tv");
    assert!(listing.status.success());
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for line in listing.lines() {
        assert!(
            line.starts_with("drwxr-xr-x 0/0") || line.starts_with("-rw-r--r-- 0/0"),
            "{line}"
        );
    }
    std::fs::remove_file(&archive).unwrap();

    // One top-level directory, named after the backup id.
    let top = names(&x);
    assert_eq!(top.len(), 1, "{top:?}");
    let top = top.into_iter().next().unwrap();
    let extracted = x.join(&top);
    assert_eq!(manifest_json(&extracted)["backup_id"], top.as_str());
    assert!(
        top.starts_with(|c: char| c.is_ascii_digit()) && top.contains("Z-f"),
        "{top}"
    );
    assert_eq!(listing.lines().count(), names(&extracted).len() + 1);

    // The same files as the --to backup, whole, with the same digests.
    assert_eq!(names(&extracted), names(&dir));
    let tar_digests = check_files(&extracted);
    let dir_digests = check_files(&dir);
    assert_eq!(tar_digests.len(), 2);
    assert_eq!(tar_digests, dir_digests);
    assert_eq!(status(&lab).await.state, State::Thawed);
}

/// `abproxy backup --tar - --tmp-dir STAGING`, its stdout piped and not
/// read yet.
fn start_tar_backup(lab: &Lab, staging: &Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["backup", "--tar", "-", "--tmp-dir"])
        .arg(staging)
        .env_remove("ABPROXY_LOG")
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", ADMIN_DN)
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start abproxy backup")
}

/// Waits until the backup has frozen and released while nobody reads its
/// stdout (the archive does not fit in the pipe): the freeze never waits
/// on the reader. The backup is then still running, blocked on stdout.
async fn released_before_the_reader_reads(lab: &Lab, child: &mut tokio::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_frozen = false;
    loop {
        match status(lab).await.state {
            State::Thawed if seen_frozen => break,
            State::Thawed => {}
            _ => seen_frozen = true,
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before its reader read"
        );
        assert!(Instant::now() < deadline, "not released within 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup waits for its reader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_tar_to_a_reader_that_goes_away_fails_naming_the_step() {
    // A few MB of LDIF: far more than a pipe holds.
    let lab = lab(5000, 10).await;
    let work = tempfile::tempdir().unwrap();
    let staging = work.path();
    let mut child = start_tar_backup(&lab, staging);
    let mut stdout = child.stdout.take().unwrap();
    released_before_the_reader_reads(&lab, &mut child).await;
    // `| head -c 100`: read 100 bytes, then close.
    let mut head = [0u8; 100];
    let read = tokio::time::timeout(Duration::from_secs(120), stdout.read_exact(&mut head))
        .await
        .expect("the tar stream starts within 120 s");
    drop(stdout);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the backup ends once its reader is gone")
        .expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    read.unwrap_or_else(|e| panic!("100 bytes: {e}; {err}"));
    // Its own exit status, not killed by SIGPIPE.
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(
        err.contains("stream tar to stdout failed") && err.contains("Broken pipe"),
        "{err}"
    );
    // The archive began with the directory named after the backup id.
    let name = String::from_utf8_lossy(&head[..100]);
    assert!(name.contains("Z-f") && name.contains('/'), "{name}");
    assert!(names(staging).is_empty(), "{:?}", names(staging));
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_tar_ended_by_a_signal_while_streaming_cleans_up() {
    let lab = lab(5000, 10).await;
    let work = tempfile::tempdir().unwrap();
    let staging = work.path();
    let mut child = start_tar_backup(&lab, staging);
    let stdout = child.stdout.take().unwrap();
    released_before_the_reader_reads(&lab, &mut child).await;
    let pid = child.id().expect("pid") as libc::pid_t;
    // SAFETY: a signal to our own child, still running.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("a SIGTERM ends the stream")
        .expect("wait");
    drop(stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(
        err.contains("stream tar to stdout failed: signal 15"),
        "{err}"
    );
    assert!(names(staging).is_empty(), "{:?}", names(staging));
    assert_eq!(status(&lab).await.state, State::Thawed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_tar_refuses_a_terminal_and_other_values() {
    let lab = lab(20, 10).await;
    let work = tempfile::tempdir().unwrap();
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the two ints.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both are open and owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let out = block_in_place(|| {
        backup_cmd(
            &lab,
            ADMIN_DN,
            ADMIN_PW,
            &["--tar", "-", "--tmp-dir", work.path().to_str().unwrap()],
        )
        .stdout(Stdio::from(slave))
        .output()
        .expect("run abproxy backup")
    });
    drop(master);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stdout is a terminal"),
        "{}",
        stderr(&out)
    );
    assert!(names(work.path()).is_empty());

    // Only `-`; and --to or --tar, one of them.
    for args in [
        &["--tar", "/tmp/x.tar"][..],
        &[][..],
        &["--to", "/tmp/nowhere", "--tar", "-"][..],
    ] {
        let out = backup(&lab, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let out = backup(&lab, &["--tar", "x"]);
    assert!(
        stderr(&out).contains("only `-` (stdout)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(status(&lab).await.state, State::Thawed);
}

fn history(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("read the history")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_history_has_one_json_line_per_attempt() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab(20, 10).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("bk");
    let hist = work.path().join("history.jsonl");
    let h = hist.to_str().unwrap();

    // A backup.
    let out = backup(&lab, &["--to", dir.to_str().unwrap(), "--history", h]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mode = std::fs::metadata(&hist).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "{mode:o}");
    // DIR exists now: refused.
    let out = backup(&lab, &["--to", dir.to_str().unwrap(), "--history", h]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A bad password: cannot bind.
    let out = block_in_place(|| {
        backup_cmd(
            &lab,
            &user_dn(1),
            "wrong",
            &["--to", work.path().join("bk2").to_str().unwrap()],
        )
        .args(["--history", h])
        .stdout(Stdio::piped())
        .output()
        .unwrap()
    });
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // A tar backup.
    let out = backup(
        &lab,
        &[
            "--tar",
            "-",
            "--tmp-dir",
            work.path().to_str().unwrap(),
            "--history",
            h,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let lines = history(&hist);
    assert_eq!(lines.len(), 4, "{lines:?}");
    let ok = &lines[0];
    let m = manifest_json(&dir);
    assert_eq!(ok["result"], "ok");
    assert_eq!(ok["exit"], 0);
    assert!(ok["failed_step"].is_null(), "{ok}");
    assert_eq!(ok["backup_id"], m["backup_id"]);
    assert_eq!(ok["destination"], dir.to_str().unwrap());
    let backends = ok["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "{ok}");
    for (b, mb) in backends.iter().zip(m["backends"].as_array().unwrap()) {
        assert_eq!(b["suffix"], mb["suffix"]);
        assert_eq!(b["entries"], mb["entries"]);
        assert_eq!(b["digest"], mb["digest"]);
    }
    let total: u64 = names(&dir)
        .iter()
        .map(|n| std::fs::metadata(dir.join(n)).unwrap().len())
        .sum();
    assert_eq!(ok["bytes"].as_u64(), Some(total), "{ok}");
    assert!(ok["frozen_ms"].as_u64().is_some(), "{ok}");
    assert!(
        ok["duration_ms"].as_u64() >= ok["frozen_ms"].as_u64(),
        "{ok}"
    );
    assert!(ok["time"].as_str().unwrap().ends_with('Z'), "{ok}");

    let exists = &lines[1];
    assert_eq!(exists["result"], "failed");
    assert_eq!(exists["exit"], 2);
    assert!(exists["backup_id"].is_null(), "{exists}");
    assert_eq!(exists["failed_step"], "check DIR");
    assert!(exists["frozen_ms"].is_null(), "{exists}");

    let unbound = &lines[2];
    assert_eq!(unbound["result"], "failed");
    assert_eq!(unbound["exit"], 4);
    assert!(unbound["backup_id"].is_null(), "{unbound}");
    // The first contact with the proxy: `--method auto` (the default)
    // reads what it is before the freeze.
    assert_eq!(unbound["failed_step"], "choose the method");

    let tar = &lines[3];
    assert_eq!(tar["result"], "ok");
    assert_eq!(tar["destination"], "tar:-");
    assert!(tar["backup_id"].as_str().unwrap().contains("Z-f"), "{tar}");
    assert_ne!(tar["backup_id"], ok["backup_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_history_that_cannot_be_written_fails_a_kept_backup() {
    let lab = lab(20, 10).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("bk");
    // A directory is no file to append to.
    let out = backup(
        &lab,
        &[
            "--to",
            dir.to_str().unwrap(),
            "--history",
            work.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot append to the history"),
        "{}",
        stderr(&out)
    );
    // The backup is kept, whole.
    assert_eq!(check_files(&dir).len(), 2);
    assert_eq!(status(&lab).await.state, State::Thawed);
}
