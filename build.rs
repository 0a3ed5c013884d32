//! The commit `abproxy --version` prints (ABPROXY_COMMIT at compile time):
//! `git rev-parse --short HEAD` in a git checkout, else the ABPROXY_COMMIT
//! environment variable (a source tarball's builder sets it), else
//! `unknown`. Rerun only when HEAD moves (a commit, a checkout) or
//! ABPROXY_COMMIT changes, not on every build.

use std::path::PathBuf;
use std::process::Command;

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ABPROXY_COMMIT");
    let from_git = git(&["rev-parse", "--short", "HEAD"]);
    let commit = from_git
        .clone()
        .or_else(|| {
            std::env::var("ABPROXY_COMMIT")
                .ok()
                .filter(|c| !c.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ABPROXY_COMMIT={commit}");

    if from_git.is_none() {
        // No git: only the variable matters (and this script).
        println!("cargo:rerun-if-changed=build.rs");
        return;
    }
    // HEAD, the branch it points to and packed-refs, wherever git keeps
    // them (--git-path: a worktree's HEAD is its own, refs are shared). A
    // path that does not exist would rerun this script on every build.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = manifest_dir().join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
