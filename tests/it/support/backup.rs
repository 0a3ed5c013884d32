//! What the backup commands' tests share: a lab with both suffixes frozen
//! in one mode and the admin allowed, `abproxy backup` run as the built
//! binary, the operator's view of the freeze.

use std::process::Stdio;
use std::time::Duration;

use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::backend::Mode;
use abproxy::operator::{self, Status, Target};
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_SUFFIX, SUFFIX};

use super::{Lab, ToolOutput};

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

/// slapd (`users` users under dc=example,dc=org, `other_users` under
/// dc=other,dc=org) and the proxy, both suffixes in `mode`,
/// `cn=admin,dc=example,dc=org` (the rootdn of the first) allowed.
pub async fn backup_lab(mode: Mode, users: usize, other_users: usize) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            users,
            other_users,
            ..Default::default()
        },
        |c: &mut Config| {
            c.freeze.allowed = vec![ADMIN_DN.into()];
            c.backends = vec![
                BackendConfig::new(SUFFIX, mode),
                BackendConfig::new(OTHER_SUFFIX, mode),
            ];
        },
    )
    .await
}

/// `abproxy backup ARGS` as `dn` against the lab's proxy (stdin closed,
/// stdout and stderr captured), not yet run.
pub fn backup_command(lab: &Lab, dn: &str, pw: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("backup")
        .args(args)
        .env_remove("ABPROXY_LOG")
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", dn)
        .env("ABPROXY_PASSWORD", pw)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// `abproxy backup ARGS` as `dn`, within 120 s.
pub async fn backup_as(lab: &Lab, dn: &str, pw: &str, args: &[&str]) -> ToolOutput {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        backup_command(lab, dn, pw, args).output(),
    )
    .await
    .expect("abproxy backup did not finish within 120 s")
    .expect("run abproxy");
    ToolOutput::from(out)
}

/// The proxy's freeze status, asked as the admin.
pub async fn operator_status(lab: &Lab) -> Status {
    let admin = Target {
        url: lab.proxied(),
        bind_dn: Some(ADMIN_DN.into()),
        password: Some(operator::Password::new(ADMIN_PW)),
    };
    operator::with_session(&admin, Duration::from_secs(10), "", async |s| {
        s.status().await
    })
    .await
    .expect("status")
}

/// `DIR/manifest.json` as JSON (the tests read it as the user would, not
/// through the product's own types).
pub fn manifest_json(dir: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

/// `abproxy verify ARGS` (stdin closed, output captured), within 120 s
/// (a restore test builds and serves every backend).
pub async fn verify(args: &[&str]) -> ToolOutput {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("verify")
        .args(args)
        .env_remove("ABPROXY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("abproxy verify did not finish within 120 s")
        .expect("run abproxy");
    ToolOutput::from(out)
}

/// `abproxy verify DIR`.
pub async fn verify_dir(dir: &std::path::Path) -> ToolOutput {
    verify(&[dir.to_str().expect("a UTF-8 path")]).await
}

/// The manifest's files re-recorded from the disk, SHA256SUMS rewritten as
/// `abproxy backup` writes it: an edit that leaves the files consistent.
pub fn reseal(dir: &std::path::Path) {
    use abproxy::backup::manifest::{file_sha256, Manifest};
    let mut m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    for f in &mut m.files {
        let (size, sha) = file_sha256(&dir.join(&f.name)).unwrap();
        f.size = size;
        f.sha256 = sha;
    }
    let json = serde_json::to_string_pretty(&m).unwrap();
    std::fs::write(dir.join("manifest.json"), format!("{json}\n")).unwrap();
    let mut sums = String::new();
    for f in &m.files {
        sums.push_str(&format!("{}  {}\n", f.sha256, f.name));
    }
    let (_, sha) = file_sha256(&dir.join("manifest.json")).unwrap();
    sums.push_str(&format!("{sha}  manifest.json\n"));
    std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
}

/// A copy of the backup directory `from` at `to` (plain files only, as a
/// backup holds).
pub fn copy_backup(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Backend `i`'s digest in `dir`'s manifest replaced by another, the
/// backup resealed ([`reseal`]): consistent files whose content no longer
/// matches the manifest.
pub fn edit_digest(dir: &std::path::Path, i: usize) {
    let mut m = manifest_json(dir);
    m["backends"][i]["digest"] = serde_json::Value::String("0".repeat(64));
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
    reseal(dir);
}

/// `abproxy restore ARGS`, within 120 s.
pub async fn restore(args: &[&str]) -> ToolOutput {
    let out = tokio::process::Command::new(BIN)
        .arg("restore")
        .args(args)
        .env_remove("ABPROXY_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    ToolOutput::from(
        tokio::time::timeout(Duration::from_secs(120), out)
            .await
            .expect("abproxy restore did not finish within 120 s")
            .expect("run abproxy"),
    )
}
