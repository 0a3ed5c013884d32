//! `abproxy restore DIR --ds-instance NAME`: a `--method 389` backup put
//! back into a stopped 389 DS instance with 389's own restore, checked,
//! all or nothing.
//!
//! 1. The backup is checked first (sizes and SHA-256 of every file, as
//!    `abproxy verify` does); every backend must be of the `389` method.
//! 2. The instance is read from its `dse.ldif` (database and backup
//!    directories) and must be stopped (its pid file names no live
//!    process).
//! 3. The archive is unpacked into `BAKDIR/abproxy-restore-ID`, owned by
//!    the database directory's owner (the server's user).
//! 4. The live database directory is moved aside to
//!    `DB.before-restore-ID` and an empty one put in its place (same owner
//!    and mode); `ns-slapd archive2db -D CONFIG -a ARCHIVE` (what
//!    `dsctl NAME bak2db` runs) restores into it, within a deadline.
//! 5. Each backend of the backup is read back from the restored database
//!    with `dbscan`: count and digest must be the manifest's.
//!
//! A failure at 4 or 5 removes what was restored and moves the old
//! database back. The unpacked archive is removed in every case. The
//! instance is started again by the caller (`dsctl NAME start`).

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::{exit, running, Progress};
use crate::backup::ds389::{self, Instance};
use crate::backup::manifest::Manifest;
use crate::backup::slapd;
use crate::backup::verify::{self, Class};

/// Limit of `archive2db` and of each backend's `dbscan`.
const LIMIT: Duration = Duration::from_secs(3600);

/// `abproxy restore DIR --ds-instance NAME` under [`ds389::CONFIG_ROOT`].
/// Returns the exit status.
pub async fn restore(backup: &Path, instance: &str, progress: &Progress) -> u8 {
    restore_under(backup, Path::new(ds389::CONFIG_ROOT), instance, progress).await
}

/// [`restore`] with the instances' configurations under `config_root`.
pub async fn restore_under(
    backup: &Path,
    config_root: &Path,
    instance: &str,
    progress: &Progress,
) -> u8 {
    match restore_in(backup, config_root, instance, progress).await {
        Ok(()) => exit::OK,
        Err(m) => {
            progress.line(format!("error: {m}"));
            exit::RESTORE_FAILED
        }
    }
}

async fn restore_in(
    backup: &Path,
    config_root: &Path,
    name: &str,
    progress: &Progress,
) -> Result<(), String> {
    // 1. The backup.
    let report = verify::verify(backup);
    if report.verdict() == Some(Class::Damaged) {
        let problems: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        return Err(format!(
            "{} is damaged, nothing restored: {}",
            backup.display(),
            problems.join("; ")
        ));
    }
    let manifest = Manifest::read(backup)?;
    if manifest.backends.is_empty() {
        return Err(format!(
            "{}: the manifest lists no backend",
            backup.display()
        ));
    }
    if let Some(b) = manifest.backends.iter().find(|b| b.ds389.is_none()) {
        return Err(format!(
            "{}: method {}; --ds-instance restores backups taken with --method 389 (the ldif \
             method's LDIF goes back into 389 DS with `dsctl NAME ldif2db`)",
            b.suffix, b.method
        ));
    }
    let file = backup.join(&manifest.backends[0].file);

    // 2. The instance, stopped.
    let inst = Instance::read(config_root, name)?;
    if let Some(pid) = running(&inst.pid_file) {
        return Err(format!(
            "389 DS instance {name} is running (pid {pid}, from {}): stop it first (dsctl {name} \
             stop)",
            inst.pid_file.display()
        ));
    }
    let id = &manifest.backup_id;
    let archive = inst.bak_dir.join(format!("abproxy-restore-{id}"));
    let aside = PathBuf::from(format!("{}.before-restore-{id}", inst.db_dir.display()));
    for p in [&archive, &aside] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(format!("{} exists already", p.display()));
        }
    }
    let db_meta =
        fs::metadata(&inst.db_dir).map_err(|e| format!("{}: {e}", inst.db_dir.display()))?;

    // 3. The archive, unpacked for the server's user.
    let unpacked = unpack(&file, &archive, &db_meta);
    let result = match unpacked {
        Ok(()) => {
            progress.line(format!(
                "unpacked {} into {}",
                file.display(),
                archive.display()
            ));
            swap_and_restore(&inst, &archive, &aside, &db_meta, &manifest, progress).await
        }
        Err(e) => Err(e),
    };
    let _ = fs::remove_dir_all(&archive);
    result?;
    progress.line(format!(
        "restored backup {id} into 389 DS instance {name}; the previous database is in {}; \
         start the instance again (dsctl {name} start)",
        aside.display()
    ));
    Ok(())
}

/// Steps 4 and 5, undone on failure.
async fn swap_and_restore(
    inst: &Instance,
    archive: &Path,
    aside: &Path,
    db_meta: &fs::Metadata,
    manifest: &Manifest,
    progress: &Progress,
) -> Result<(), String> {
    let db = &inst.db_dir;
    fs::rename(db, aside).map_err(|e| format!("moving {} aside: {e}", db.display()))?;
    let undo = |e: String| {
        let back = fs::remove_dir_all(db).and_then(|()| fs::rename(aside, db));
        match back {
            Ok(()) => format!("{e}; the previous database was moved back"),
            Err(b) => format!(
                "{e}; moving the previous database back failed ({b}): it is in {}",
                aside.display()
            ),
        }
    };
    let fresh = fs::create_dir(db)
        .and_then(|()| std::os::unix::fs::chown(db, Some(db_meta.uid()), Some(db_meta.gid())))
        .and_then(|()| fs::set_permissions(db, fs::Permissions::from_mode(db_meta.mode() & 0o7777)))
        .map_err(|e| format!("{}: {e}", db.display()));
    if let Err(e) = fresh {
        return Err(undo(e));
    }
    let mut cmd = Command::new(ds389::NS_SLAPD);
    cmd.arg("archive2db")
        .arg("-D")
        .arg(&inst.config_dir)
        .arg("-a")
        .arg(archive);
    let line = format!(
        "{} archive2db -D {} -a {}",
        ds389::NS_SLAPD,
        inst.config_dir.display(),
        archive.display()
    );
    if let Err(e) = slapd::run(cmd, &line, LIMIT, None).await {
        return Err(undo(format!("{e}")));
    }
    progress.line(format!("ran {line}"));
    for b in &manifest.backends {
        let Some(d) = &b.ds389 else { continue };
        let scratch = tempfile::tempdir().map_err(|e| undo(e.to_string()))?;
        let c = ds389::contents(
            &ds389::id2entry(db, &d.backend),
            &b.suffix,
            scratch.path(),
            LIMIT,
        )
        .await
        .map_err(|e| undo(format!("reading back {}: {e}", b.suffix)))?;
        if c.entries != b.entries || c.digest != b.digest {
            return Err(undo(format!(
                "{}: the restored database has {} entries, digest {}; the manifest says {} \
                 entries, digest {}",
                b.suffix, c.entries, c.digest, b.entries, b.digest
            )));
        }
        progress.line(format!(
            "{} ({}): {} entries, digest as in the manifest",
            b.suffix, d.backend, c.entries
        ));
    }
    Ok(())
}

/// Unpacks the tar file `file` into the new directory `to`, everything
/// owned like `like` (the server's user): `archive2db` runs as it.
fn unpack(file: &Path, to: &Path, like: &fs::Metadata) -> Result<(), String> {
    let what =
        |e: std::io::Error| format!("unpacking {} into {}: {e}", file.display(), to.display());
    fs::create_dir(to).map_err(what)?;
    let f = fs::File::open(file).map_err(what)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(f));
    tar.set_preserve_permissions(true);
    tar.set_overwrite(false);
    tar.unpack(to).map_err(what)?;
    chown_tree(to, like.uid(), like.gid()).map_err(what)
}

/// `chown -R UID:GID dir` (no symlink followed).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path(), uid, gid)?;
        } else {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}
