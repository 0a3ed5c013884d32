//! `abproxy restore DIR --ds-instance NAME`: a backup put back into a
//! stopped 389 DS instance with 389's own offline tools, checked, all or
//! nothing.
//!
//! 1. The backup is checked first (sizes and SHA-256 of every file, as
//!    `abproxy verify` does). Its backends are all of the `389` method (one
//!    archive), or all LDIF (`ldif`, `slapcat`).
//! 2. The instance is read from its `dse.ldif` (database and backup
//!    directories, its backends) and must be stopped (its pid file names no
//!    live process).
//! 3. A `389` backup: the archive is unpacked into
//!    `BAKDIR/abproxy-restore-ID`, owned by the database directory's owner
//!    (the server's user); the live database directory is moved aside to
//!    `DB.before-restore-ID` and an empty one put in its place (same owner
//!    and mode); `ns-slapd archive2db -D CONFIG -a ARCHIVE` (what
//!    `dsctl NAME bak2db` runs) restores every backend of the archive.
//!    An LDIF backup: each backend's LDIF, without the attributes a server
//!    computes, is written into `BAKDIR/abproxy-restore-ID`; the database
//!    directory is copied aside (`DB.before-restore-ID`: the instance's
//!    other backends stay as they are) and `ns-slapd ldif2db -n BACKEND`
//!    imports each, the backend found by its suffix.
//! 4. Each backend of the backup is read back from the restored database
//!    with `dbscan`: count and digest must be the manifest's.
//!
//! A failure at 3 or 4 removes what was restored and puts the old database
//! back. `BAKDIR/abproxy-restore-ID` is removed in every case. Every tool
//! runs under a deadline. The instance is started again by the caller
//! (`dsctl NAME start`).

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

/// Methods whose files are LDIF, imported with `ldif2db`.
const LDIF_METHODS: &[&str] = &["ldif", "slapcat"];

/// Limit of `archive2db`, of each `ldif2db` and of each backend's `dbscan`.
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
    let archived = manifest.backends.iter().all(|b| b.ds389.is_some());
    let as_ldif = manifest
        .backends
        .iter()
        .all(|b| b.ds389.is_none() && LDIF_METHODS.contains(&b.method.as_str()));
    if !archived && !as_ldif {
        let methods: Vec<String> = manifest
            .backends
            .iter()
            .map(|b| format!("{} ({})", b.suffix, b.method))
            .collect();
        return Err(format!(
            "{}: {}; --ds-instance restores backups of the 389, ldif and slapcat methods, one \
             kind per backup",
            backup.display(),
            methods.join(", ")
        ));
    }

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
    let work = inst.bak_dir.join(format!("abproxy-restore-{id}"));
    let aside = PathBuf::from(format!("{}.before-restore-{id}", inst.db_dir.display()));
    for p in [&work, &aside] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(format!("{} exists already", p.display()));
        }
    }
    let db_meta =
        fs::metadata(&inst.db_dir).map_err(|e| format!("{}: {e}", inst.db_dir.display()))?;

    let result = if archived {
        // 3. The archive, unpacked for the server's user.
        let file = backup.join(&manifest.backends[0].file);
        match unpack(&file, &work, &db_meta) {
            Ok(()) => {
                progress.line(format!(
                    "unpacked {} into {}",
                    file.display(),
                    work.display()
                ));
                swap_and_restore(&inst, &work, &aside, &db_meta, &manifest, progress).await
            }
            Err(e) => Err(e),
        }
    } else {
        import_ldif(&inst, backup, &work, &aside, &db_meta, &manifest, progress).await
    };
    let _ = fs::remove_dir_all(&work);
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
    let undo = |e: String| put_back(db, aside, e);
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
    let names: Vec<&str> = manifest
        .backends
        .iter()
        .map(|b| b.ds389.as_ref().map_or("", |d| d.backend.as_str()))
        .collect();
    check_restored(db, manifest, &names, progress)
        .await
        .map_err(undo)
}

/// LDIF and slapcat backups: each backend's LDIF, without the attributes a
/// server computes, imported with `ns-slapd ldif2db -n BACKEND` over a
/// copy of the database kept aside (the instance's other backends stay as
/// they are), then read back.
async fn import_ldif(
    inst: &Instance,
    backup: &Path,
    work: &Path,
    aside: &Path,
    db_meta: &fs::Metadata,
    manifest: &Manifest,
    progress: &Progress,
) -> Result<(), String> {
    let names = manifest
        .backends
        .iter()
        .map(|b| {
            inst.backend_of(&b.suffix).ok_or_else(|| {
                let known: Vec<&str> = inst.backends.iter().map(|(_, s)| s.as_str()).collect();
                format!(
                    "389 DS instance {} has no database for {} (its databases: {})",
                    inst.name,
                    b.suffix,
                    known.join(", ")
                )
            })
        })
        .collect::<Result<Vec<&str>, String>>()?;
    fs::create_dir(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut files = Vec::new();
    for (i, b) in manifest.backends.iter().enumerate() {
        let to = work.join(format!("{}.ldif", i + 1));
        let n = without_computed(&backup.join(&b.file), &to)?;
        progress.line(format!("{}: {n} entries to import", b.suffix));
        files.push(to);
    }
    chown_tree(work, db_meta.uid(), db_meta.gid())
        .map_err(|e| format!("{}: {e}", work.display()))?;
    let db = &inst.db_dir;
    super::copy_dir(db, aside)?;
    let undo = |e: String| put_back(db, aside, e);
    for (name, file) in names.iter().zip(&files) {
        let mut cmd = Command::new(ds389::NS_SLAPD);
        cmd.arg("ldif2db")
            .arg("-D")
            .arg(&inst.config_dir)
            .arg("-n")
            .arg(name)
            .arg("-i")
            .arg(file);
        let line = format!(
            "{} ldif2db -D {} -n {name} -i {}",
            ds389::NS_SLAPD,
            inst.config_dir.display(),
            file.display()
        );
        if let Err(e) = slapd::run(cmd, &line, LIMIT, None).await {
            return Err(undo(format!("{e}")));
        }
        progress.line(format!("ran {line}"));
    }
    check_restored(db, manifest, &names, progress)
        .await
        .map_err(undo)
}

/// Each backend of `manifest` (its 389 backend in `names`) read back from
/// the database directory `db` with `dbscan`: the manifest's count and
/// digest, or why not.
async fn check_restored(
    db: &Path,
    manifest: &Manifest,
    names: &[&str],
    progress: &Progress,
) -> Result<(), String> {
    for (b, name) in manifest.backends.iter().zip(names) {
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let c = ds389::contents(&ds389::id2entry(db, name), &b.suffix, scratch.path(), LIMIT)
            .await
            .map_err(|e| format!("reading back {}: {e}", b.suffix))?;
        if c.entries != b.entries || c.digest != b.digest {
            return Err(format!(
                "{}: the restored database has {} entries, digest {}; the manifest says {} \
                 entries, digest {}",
                b.suffix, c.entries, c.digest, b.entries, b.digest
            ));
        }
        progress.line(format!(
            "{} ({name}): {} entries, digest as in the manifest",
            b.suffix, c.entries
        ));
    }
    Ok(())
}

/// Removes what was restored at `db` and moves `aside` back; the message
/// `e` with what became of the previous database.
fn put_back(db: &Path, aside: &Path, e: String) -> String {
    let back = fs::remove_dir_all(db).and_then(|()| fs::rename(aside, db));
    match back {
        Ok(()) => format!("{e}; the previous database was moved back"),
        Err(b) => format!(
            "{e}; moving the previous database back failed ({b}): it is in {}",
            aside.display()
        ),
    }
}

/// Copies the LDIF at `from` to `to` without the attributes a server
/// computes ([`crate::backup::digest::is_computed`]: `ldif2db` would store
/// them as user data); the number of entries.
fn without_computed(from: &Path, to: &Path) -> Result<u64, String> {
    use crate::backup::digest::is_computed;
    use crate::backup::ldif;
    use std::io::Write as _;
    let input = fs::File::open(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let out = fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut out = std::io::BufWriter::new(out);
    let mut n = 0;
    for e in ldif::Reader::new(std::io::BufReader::new(input)) {
        let mut e = e.map_err(|e| format!("{}: {e}", from.display()))?;
        e.attrs.retain(|(name, _)| !is_computed(name));
        ldif::write(&mut out, [&e]).map_err(|e| format!("{}: {e}", to.display()))?;
        n += 1;
    }
    out.flush()
        .and_then(|()| out.get_ref().sync_all())
        .map_err(|e| format!("{}: {e}", to.display()))?;
    Ok(n)
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
