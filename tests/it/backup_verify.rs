//! `abproxy verify DIR` on a real backup: `abproxy backup` taken through
//! the proxy from a real slapd (both suffixes, readonly), then verified as
//! the built binary: whole, it exits 0 with the OK verdict; copies of it
//! damaged in one way each (a flipped byte, an entry deleted from an LDIF
//! with the manifest and SHA256SUMS made to agree, a file removed, a file
//! added) exit 10 or 11 and name the problem; `--json` is one JSON object.

use std::path::Path;
use std::time::Duration;

use abproxy::backup::manifest::Manifest;
use abproxy::backup::{ldif, Entry};
use abproxy::freeze::backend::Mode;
use testkit::{ADMIN_DN, ADMIN_PW, OTHER_SUFFIX};

use crate::support::backup::*;
use crate::support::freeze::{bound, call};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");
const SUFFIX: &str = "dc=example,dc=org";

async fn lab() -> Lab {
    backup_lab(Mode::Readonly, 20, 10).await
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// The verdict line: stdout's last line.
fn verdict(out: &ToolOutput) -> &str {
    out.stdout.lines().last().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_a_real_backup_and_damaged_copies_of_it() {
    let lab = lab().await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = backup_as(&lab, ADMIN_DN, ADMIN_PW, &["--to", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let m = manifest(&dir);
    assert_eq!(m.backends.len(), 2);
    let total: u64 = m.backends.iter().map(|b| b.entries).sum();
    let main = m
        .backends
        .iter()
        .find(|b| b.suffix.eq_ignore_ascii_case(SUFFIX))
        .expect("the backend of dc=example,dc=org");
    let file = main.file.clone();

    // Whole.
    let out = verify_dir(&dir).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(
        verdict(&out),
        format!(
            "verify: OK: backup {}, 2 backends, {total} entries",
            m.backup_id
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "ok            digest {}: {}",
            main.suffix, main.digest
        )),
        "{}",
        out.stdout
    );
    assert!(out.stderr.is_empty(), "{}", out.stderr);

    // --json: one object, the verdict and each check.
    let out = verify(&["--json", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(out.stdout.trim().lines().count(), 1, "{}", out.stdout);
    assert_eq!(j["verdict"], "OK", "{j}");
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["backup_id"], m.backup_id.as_str());
    assert_eq!(j["entries"], total);
    let checks = j["checks"].as_array().expect("checks");
    assert!(
        checks.iter().all(|c| c["ok"] == true
            && c["name"].is_string()
            && c["detail"].is_string()
            && c["class"].is_null()),
        "{j}"
    );

    // A flipped byte in an LDIF.
    let bad = parent.path().join("flipped");
    copy_backup(&dir, &bad);
    let path = bad.join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let out = verify_dir(&bad).await;
    assert_eq!(out.code, Some(10), "{}", out.stdout);
    assert!(
        verdict(&out).starts_with(&format!("verify: DAMAGED: file {file}: {file} has SHA-256")),
        "{}",
        out.stdout
    );
    let out = verify(&["--json", bad.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(10));
    let j: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(j["verdict"], "DAMAGED", "{j}");
    assert!(
        j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["ok"] == false
                && c["class"] == "damaged"
                && c["name"] == format!("file {file}")),
        "{j}"
    );

    // An entry deleted from the LDIF, the manifest's size and SHA-256 (and
    // SHA256SUMS) made to agree: the files are whole, the content is not
    // what the manifest says.
    let bad = parent.path().join("deleted");
    copy_backup(&dir, &bad);
    let path = bad.join(&file);
    let mut entries: Vec<Entry> = ldif::read(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let k = entries
        .iter()
        .position(|e| e.dn.eq_ignore_ascii_case(&testkit::user_dn(7)))
        .expect("user 7");
    let gone = entries.remove(k);
    let mut text = Vec::new();
    ldif::write(&mut text, &entries).unwrap();
    std::fs::write(&path, text).unwrap();
    reseal(&bad);
    let out = verify_dir(&bad).await;
    assert_eq!(out.code, Some(11), "{}", out.stdout);
    assert_eq!(
        verdict(&out),
        format!(
            "verify: DOES NOT MATCH: count {}: {file} has {} entries, the manifest says {} (2 problems in all)",
            main.suffix,
            main.entries - 1,
            main.entries
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "MISMATCH      digest {}: {file}'s content digest",
            main.suffix
        )),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("DAMAGED"), "{}", out.stdout);

    // The entry put back before its parent: parents first.
    let bad = parent.path().join("reordered");
    copy_backup(&dir, &bad);
    entries.insert(0, gone.clone());
    let mut text = Vec::new();
    ldif::write(&mut text, &entries).unwrap();
    std::fs::write(bad.join(&file), text).unwrap();
    reseal(&bad);
    let out = verify_dir(&bad).await;
    assert_eq!(out.code, Some(11), "{}", out.stdout);
    assert!(
        verdict(&out).starts_with(&format!(
            "verify: DOES NOT MATCH: parents first {}: {file}: entry 1 `{}`: its parent",
            main.suffix, gone.dn
        )),
        "{}",
        out.stdout
    );

    // A file removed.
    let bad = parent.path().join("removed");
    copy_backup(&dir, &bad);
    std::fs::remove_file(bad.join("backup.log")).unwrap();
    let out = verify_dir(&bad).await;
    assert_eq!(out.code, Some(10), "{}", out.stdout);
    assert_eq!(
        verdict(&out),
        "verify: DAMAGED: file backup.log: backup.log is missing",
        "{}",
        out.stdout
    );

    // A file added.
    let bad = parent.path().join("added");
    copy_backup(&dir, &bad);
    std::fs::write(bad.join("notes.txt"), "hello\n").unwrap();
    let out = verify_dir(&bad).await;
    assert_eq!(out.code, Some(10), "{}", out.stdout);
    assert_eq!(
        verdict(&out),
        "verify: DAMAGED: extra files: unexpected file notes.txt",
        "{}",
        out.stdout
    );

    // No directory there.
    let out = verify_dir(&parent.path().join("none")).await;
    assert_eq!(out.code, Some(12), "{}", out.stdout);
    assert!(
        verdict(&out).starts_with("verify: CANNOT CHECK: directory: "),
        "{}",
        out.stdout
    );

    // The backup itself was not touched by any of this.
    let out = verify_dir(&dir).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
}

/// `verify --restore-test`: each backend restored into a throwaway slapd
/// with the lab's own configuration serves exactly the manifest's entries
/// (count, digest, contextCSN). A backup whose files are whole and whose
/// manifest agrees with them, but whose entries slapd refuses (an object
/// class the schema does not have, written in and resealed), passes the
/// file checks and fails the restore test: it does not restore. Without a
/// usable configuration the restore test cannot check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_restore_test_proves_the_backup_opens() {
    use abproxy::backup::{ldif, Digest};
    let lab = lab().await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = backup_as(&lab, ADMIN_DN, ADMIN_PW, &["--to", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let config = lab.slapd.dir().join("slapd.d");
    let config = config.to_str().unwrap();
    let d = dir.to_str().unwrap();
    let out = verify(&[d, "--restore-test", "--slapd-config", config]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for suffix in [SUFFIX, OTHER_SUFFIX] {
        assert!(
            out.stdout
                .contains(&format!("restore test {suffix}: a throwaway slapd served")),
            "{}",
            out.stdout
        );
    }
    // No throwaway slapd left running.
    assert!(
        !std::process::Command::new("pgrep")
            .args(["-f", "abproxy-restore-test-"])
            .status()
            .unwrap()
            .success(),
        "a throwaway slapd is still running"
    );

    let out = verify(&[d, "--restore-test", "--slapd-config", "/nonexistent"]).await;
    assert_eq!(out.code, Some(12), "{out:?}");
    assert!(
        verdict(&out).contains("CANNOT CHECK: restore test"),
        "{}",
        out.stdout
    );

    // Entries slapd refuses, resealed: whole files, no restore.
    let bad = parent.path().join("bad");
    copy_backup(&dir, &bad);
    let mut m = manifest(&bad);
    let b = m.backends.iter_mut().find(|b| b.suffix == SUFFIX).unwrap();
    let path = bad.join(&b.file);
    let mut entries = ldif::read(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let user = entries
        .iter_mut()
        .find(|e| e.dn.eq_ignore_ascii_case(&testkit::user_dn(1)))
        .unwrap();
    user.push("objectClass", "noSuchClass");
    std::fs::write(&path, ldif::to_string(&entries)).unwrap();
    b.digest = Digest::of_entries(entries).unwrap().to_string();
    std::fs::write(
        bad.join("manifest.json"),
        serde_json::to_string_pretty(&m).unwrap() + "\n",
    )
    .unwrap();
    reseal(&bad);
    let b = bad.to_str().unwrap();
    let out = verify(&[b]).await;
    assert_eq!(out.code, Some(0), "the files are consistent: {out:?}");
    let out = verify(&[b, "--restore-test", "--slapd-config", config]).await;
    assert_eq!(out.code, Some(11), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "restore test {SUFFIX}: the backup does not restore"
        )) && out.stdout.contains("noSuchClass"),
        "{}",
        out.stdout
    );
}

/// `verify --against URL` (here the proxy): the same data as the backup is
/// "exactly the backup's entries"; after an add through the proxy, how far
/// the server moved: one entry more, one added or modified since. Both are
/// information (exit 0); a server that does not answer cannot be checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_against_a_live_server_says_how_far_it_moved() {
    let lab = lab().await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bk");
    let out = backup_as(&lab, ADMIN_DN, ADMIN_PW, &["--to", dir.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let against = |url: String| {
        let dir = dir.clone();
        async move {
            let out = tokio::process::Command::new(BIN)
                .arg("verify")
                .arg(&dir)
                .args(["--against", &url, "--bind-dn", ADMIN_DN])
                .env("ABPROXY_PASSWORD", ADMIN_PW)
                .env_remove("ABPROXY_LOG")
                .output();
            ToolOutput::from(
                tokio::time::timeout(Duration::from_secs(60), out)
                    .await
                    .unwrap()
                    .unwrap(),
            )
        }
    };
    let entries = manifest(&dir)
        .backends
        .iter()
        .find(|b| b.suffix == SUFFIX)
        .unwrap()
        .entries;
    let out = against(lab.proxied()).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "against {SUFFIX}: the server holds exactly the backup's {entries} entries"
        )),
        "{}",
        out.stdout
    );
    let mut c = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, text) = call(&mut c, add(2, &format!("cn=later,{SUFFIX}"), "later")).await;
    assert_eq!(code, 0, "{text}");
    let out = against(lab.proxied()).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "against {SUFFIX}: moved since the backup: {} entries now (the backup: {entries}), 1 added or modified",
            entries + 1
        )),
        "{}",
        out.stdout
    );
    let out = against("ldap://127.0.0.1:1".into()).await;
    assert_eq!(out.code, Some(12), "{out:?}");
}
