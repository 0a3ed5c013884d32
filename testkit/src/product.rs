//! The abproxy binary as users get it, built for the benchmarks.
//!
//! Not `CARGO_BIN_EXE_abproxy`: `cargo bench` and `cargo test` build the
//! package's binary with the features its dev-dependencies turn on (tokio's
//! `test-util`, whose clock takes a lock at every read, and abproxy's
//! `fuzzing` entry points), which the product does not have. Nor
//! `target/release/abproxy`: those builds and `cargo build --release` all
//! write that path, so what is there is whichever ran last. The product is
//! built the way the Debian package builds it (`--release
//! --no-default-features`) into a target directory of its own,
//! `target/product`, which nothing else writes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long the build may take: a first build of the whole tree with
/// link-time optimisation takes minutes on two cores; after that it is a
/// check of a few seconds.
pub const BUILD_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The target directory of the product build, inside `target` (the
/// workspace's target directory).
pub fn product_dir(target: &Path) -> PathBuf {
    target.join("product")
}

/// The arguments of `cargo` that build the product into `dir`.
pub fn build_args(dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "build",
        "--release",
        "--no-default-features",
        "--package",
        "abproxy",
        "--bin",
        "abproxy",
        "--quiet",
        "--target-dir",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(dir.as_os_str().to_owned());
    args
}

/// The workspace's target directory: `CARGO_TARGET_DIR` (relative to the
/// workspace) when set, else `target` in the workspace.
pub fn target_dir(workspace: &Path, env: Option<OsString>) -> PathBuf {
    match env {
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    }
}

/// True for a variable cargo sets for the target it runs (`cargo bench`,
/// `cargo run`: the package's description, its directories, the build
/// script's `rustc-env`, here ABPROXY_COMMIT) and not for one the user set
/// for cargo (CARGO_HOME, CARGO_TARGET_DIR, CARGO_BUILD_JOBS, ...). Left in
/// the build's environment, build scripts that watch them (ring's watches
/// CARGO_MANIFEST_DIR) see another value than a build from a shell has,
/// and the two builds of `target/product` undo each other: minutes each.
pub fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
                // abproxy's build script: the commit, which a build in the
                // checkout takes from git anyway.
                | "ABPROXY_COMMIT"
        )
}

/// Builds the product (see the module's documentation) and returns its
/// binary; `cargo` is the one running the caller (`CARGO`), else the one
/// on the path. The build's own output goes to the caller's stderr; it is
/// killed at [`BUILD_LIMIT`].
pub fn binary() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace of testkit")?;
    let dir = product_dir(&target_dir(workspace, std::env::var_os("CARGO_TARGET_DIR")));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building abproxy as the Debian package does (cargo build --release \
         --no-default-features) into {}",
        dir.display()
    );
    let mut command = Command::new(&cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            command.env_remove(&name);
        }
    }
    let mut child = command
        .args(build_args(&dir))
        .current_dir(workspace)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    let deadline = Instant::now() + BUILD_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("building abproxy took longer than {BUILD_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!("building abproxy failed ({status})");
    }
    let bin = dir.join("release").join("abproxy");
    if !bin.is_file() {
        bail!("the build left no {}", bin.display());
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_is_built_as_the_package_is_into_its_own_directory() {
        let dir = product_dir(Path::new("/w/target"));
        assert_eq!(dir, Path::new("/w/target/product"));
        let args: Vec<String> = build_args(&dir)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        // The package's build (Cargo.toml, [package.metadata.deb]): release,
        // without the default features; and not the test build's path.
        for a in ["--release", "--no-default-features", "--bin", "abproxy"] {
            assert!(args.iter().any(|x| x == a), "{a} missing from {args:?}");
        }
        let at = args.iter().position(|a| a == "--target-dir").unwrap();
        assert_eq!(args[at + 1], "/w/target/product");
        assert!(!args
            .iter()
            .any(|a| a == "--features" || a.contains("fuzzing")));
    }

    #[test]
    fn what_cargo_sets_for_a_bench_is_not_passed_to_the_build() {
        for v in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_VERSION",
            "CARGO_PKG_NAME",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
            "ABPROXY_COMMIT",
        ] {
            assert!(set_by_cargo_run(v), "{v}");
        }
        for v in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
            "RUSTFLAGS",
        ] {
            assert!(!set_by_cargo_run(v), "{v}");
        }
    }

    #[test]
    fn the_target_directory_follows_cargo_target_dir() {
        let w = Path::new("/w");
        assert_eq!(target_dir(w, None), Path::new("/w/target"));
        assert_eq!(target_dir(w, Some("/t".into())), Path::new("/t"));
        assert_eq!(target_dir(w, Some("out".into())), Path::new("/w/out"));
    }
}
