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

use super::{exit, running, Progress, Served, TestFail};
use crate::backup::ds389::{self, Instance};
use crate::backup::ldif::{self, Entry};
use crate::backup::manifest::{BackendRecord, Manifest};
use crate::backup::slapd;
use crate::backup::verify::{self, Class};
use crate::operator::{Password, Session, Target};

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
    let cmd = ds389::archive2db(&inst.config_dir, archive);
    let line = slapd::command_line(&cmd);
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
        let cmd = ds389::ldif2db(&inst.config_dir, name, file);
        let line = slapd::command_line(&cmd);
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

/// How long the throwaway's `archive2db` may take.
const TEST_RESTORE_LIMIT: Duration = Duration::from_secs(3600);
/// How long the throwaway may take to answer on its port.
const TEST_START_LIMIT: Duration = Duration::from_secs(120);
/// How long reading one backend back may take.
const TEST_READ_LIMIT: Duration = Duration::from_secs(3600);
/// How long the throwaway may take to stop on SIGTERM (then SIGKILL).
const TEST_STOP_LIMIT: Duration = Duration::from_secs(30);
/// Ports tried when the one chosen is taken meanwhile.
const TEST_START_ATTEMPTS: usize = 3;

/// The restore test of a `--method 389` backup (`abproxy verify DIR
/// --restore-test --ds-instance NAME`): the archive restored into a
/// throwaway 389 DS built from the configuration of the local instance
/// `name` (under `config_root`), which is read and never touched (it may
/// be running):
///
/// 1. a temporary directory T, owned by the instance's user
///    (`nsslapd-localuser`): its schema and `*.conf` files copied into
///    `T/config`, its `dse.ldif` rewritten there
///    ([`ds389::throwaway_dse`]: a free 127.0.0.1 port, everything in T,
///    a new Directory Manager password, no replication);
/// 2. the archive unpacked into `T/archive` (its `dse_instance.ldif`
///    pointed into T too) and restored with `ns-slapd archive2db`;
/// 3. `ns-slapd -d 0` started on T, awaited on its port;
/// 4. each 389 backend of the backup read back over LDAP as Directory
///    Manager (a paged search for `*` and `+`, as a backup reads),
///    counted and digested;
/// 5. the server stopped (SIGTERM, SIGKILL past a deadline), T removed.
///
/// One [`Served`] per `389` backend of the manifest; a failure before 4
/// is every backend's. `archive2db` refusing the archive is
/// [`TestFail::DoesNotLoad`]; anything else that stops the test is
/// [`TestFail::Cannot`], with the step that failed.
pub async fn restore_test(
    backup: &Path,
    manifest: &Manifest,
    config_root: &Path,
    name: &str,
) -> Vec<Served> {
    let backends: Vec<_> = manifest
        .backends
        .iter()
        .filter(|b| b.ds389.is_some() || LDIF_METHODS.contains(&b.method.as_str()))
        .collect();
    if backends.is_empty() {
        return Vec::new();
    }
    match test_in(backup, &backends, config_root, name).await {
        Ok(served) => served,
        Err(e) => {
            let (does_not_load, text) = match e {
                TestFail::DoesNotLoad(m) => (true, m),
                TestFail::Cannot(m) => (false, m),
            };
            backends
                .iter()
                .map(|b| Served {
                    suffix: b.suffix.clone(),
                    result: Err(if does_not_load {
                        TestFail::DoesNotLoad(text.clone())
                    } else {
                        TestFail::Cannot(text.clone())
                    }),
                })
                .collect()
        }
    }
}

async fn test_in(
    backup: &Path,
    backends: &[&BackendRecord],
    config_root: &Path,
    name: &str,
) -> Result<Vec<Served>, TestFail> {
    let cannot = TestFail::Cannot;
    if !Path::new(ds389::NS_SLAPD).exists() {
        return Err(cannot(format!(
            "{} not found: the 389 DS restore test runs 389 Directory Server (Debian: \
             389-ds-base)",
            ds389::NS_SLAPD
        )));
    }
    // 1. The instance's configuration, copied and rewritten.
    let live_dir = config_root.join(format!("slapd-{name}"));
    let dse_path = live_dir.join("dse.ldif");
    let dse_text = fs::read(&dse_path).map_err(|e| {
        cannot(format!(
            "{}: {e} (no 389 DS instance {name} here: see `dsctl -l`; --ds-instance names the \
             local instance whose configuration the throwaway copies)",
            dse_path.display()
        ))
    })?;
    let live: Vec<Entry> = ldif::Reader::new(dse_text.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| cannot(format!("reading {}: {e}", dse_path.display())))?;
    let root = tempfile::Builder::new()
        .prefix("abproxy-389-test-")
        .tempdir()
        .map_err(|e| cannot(format!("a temporary directory: {e}")))?;
    let layout = ds389::Layout {
        root: root.path().to_path_buf(),
    };
    let password = slapd::random_password();
    let mut salt = [0u8; 8];
    salt.copy_from_slice(&slapd::random_password().as_bytes()[..8]);
    let hashed = ds389::ssha512(&password, &salt);
    let port = slapd::free_port().map_err(|e| cannot(format!("a free loopback port: {e}")))?;
    let dse = ds389::throwaway_dse(&live, &live_dir, &layout, port, &hashed)
        .map_err(|e| cannot(format!("the throwaway's configuration: {e}")))?;
    // A 389 archive names its backends; an LDIF goes to the backend of its
    // suffix in the instance's configuration.
    let archived = backends.iter().all(|b| b.ds389.is_some());
    let inst = Instance::read(config_root, name).map_err(cannot)?;
    let mut names = Vec::new();
    for b in backends {
        let backend = match &b.ds389 {
            Some(d) => Some(d.backend.clone()),
            None => inst.backend_of(&b.suffix).map(str::to_string),
        };
        match backend {
            Some(n) if dse.backends.contains(&n.to_ascii_lowercase()) => names.push(n),
            _ => {
                return Err(cannot(format!(
                    "389 DS instance {name} has no backend for {} (the backup's {}): the \
                     throwaway is built from {name}'s configuration (backends {})",
                    b.suffix,
                    b.ds389.as_ref().map_or("LDIF", |d| d.backend.as_str()),
                    dse.backends.join(", ")
                )));
            }
        }
    }
    let (uid, gid) = user_ids(&dse.user).map_err(cannot)?;
    prepare(&layout, &live_dir, uid, gid).map_err(|e| cannot(format!("preparing {e}")))?;
    write_dse(&layout, &dse.entries, uid, gid).map_err(cannot)?;

    // 2. The archive restored, or each LDIF imported.
    if !archived {
        for (i, (b, backend)) in backends.iter().zip(&names).enumerate() {
            let file = layout.root.join(format!("import-{}.ldif", i + 1));
            without_computed(&backup.join(&b.file), &file).map_err(cannot)?;
            std::os::unix::fs::chown(&file, Some(uid), Some(gid))
                .map_err(|e| cannot(format!("{}: {e}", file.display())))?;
            let cmd = ds389::ldif2db(&layout.config(), backend, &file);
            let line = format!("ldif2db -n {backend} of {}", b.file);
            match slapd::run(cmd, &line, TEST_RESTORE_LIMIT, None).await {
                Ok(()) => {}
                Err(e @ slapd::Error::Tool { .. }) => {
                    return Err(TestFail::DoesNotLoad(format!(
                        "{e}{}",
                        errors_tail(&layout)
                    )))
                }
                Err(e) => return Err(cannot(format!("{line}: {e}"))),
            }
            let _ = fs::remove_file(&file);
        }
    }
    if archived {
        let file = backup.join(&backends[0].file);
        unpack_archive(&file, &layout, uid, gid).map_err(cannot)?;
        let cmd = ds389::archive2db(&layout.config(), &layout.archive());
        let line = slapd::command_line(&cmd);
        match slapd::run(cmd, &line, TEST_RESTORE_LIMIT, None).await {
            Ok(()) => {}
            Err(e @ slapd::Error::Tool { .. }) => {
                let why = format!("{e}{}", errors_tail(&layout));
                // ns-slapd refusing the copied configuration says nothing of
                // the archive.
                if [
                    "init_dse_file",
                    "dse_read_one_file",
                    "Could not load config file",
                ]
                .iter()
                .any(|m| why.contains(m))
                {
                    return Err(cannot(format!(
                        "ns-slapd refused the throwaway's configuration (copied from {name}): {why}"
                    )));
                }
                return Err(TestFail::DoesNotLoad(format!(
                    "archive2db refused the archive: {why}"
                )));
            }
            Err(e) => return Err(cannot(format!("archive2db: {e}"))),
        }
        // The archive is not needed any more.
        let _ = fs::remove_dir_all(layout.archive());
    }

    // 3. The throwaway, started.
    let mut server = None;
    let mut port = port;
    let mut last = String::new();
    for attempt in 0..TEST_START_ATTEMPTS {
        if attempt > 0 {
            port = slapd::free_port().map_err(|e| cannot(format!("a free loopback port: {e}")))?;
            let dse = ds389::throwaway_dse(&live, &live_dir, &layout, port, &hashed)
                .map_err(|e| cannot(format!("the throwaway's configuration: {e}")))?;
            write_dse(&layout, &dse.entries, uid, gid).map_err(cannot)?;
        }
        match Server::start(&layout, port).await {
            Ok(s) => {
                server = Some(s);
                break;
            }
            Err((e, retry)) => {
                last = e;
                if !retry {
                    break;
                }
            }
        }
    }
    let Some(server) = server else {
        return Err(cannot(format!("starting the throwaway 389 DS: {last}")));
    };

    // 4. Each backend, read back.
    let target = Target {
        url: format!("ldap://127.0.0.1:{port}"),
        bind_dn: Some(dse.root_dn.clone()),
        password: Some(Password::new(&password)),
    };
    let mut served = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let out = layout.root.join(format!("served-{}.ldif", i + 1));
        let read = async {
            let mut session = Session::connect(&target)
                .await
                .map_err(|e| format!("connecting to the throwaway 389 DS: {e}"))?;
            let r = crate::operator::backup::export(&mut session, &b.suffix, &out)
                .await
                .map_err(|(m, _)| format!("reading it back: {m}"));
            session.close().await;
            let (entries, digest) = r?;
            let _ = fs::remove_file(&out);
            Ok::<_, String>(slapd::Contents {
                entries,
                digest,
                context_csn: Vec::new(),
                suffix_uuid: None,
            })
        };
        let result = tokio::time::timeout(TEST_READ_LIMIT, read)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "reading it back took over {} s",
                    TEST_READ_LIMIT.as_secs()
                ))
            })
            .map_err(TestFail::Cannot);
        served.push(Served {
            suffix: b.suffix.clone(),
            result,
        });
    }

    // 5. Stopped; T goes with `root`.
    server.stop().await;
    drop(root);
    Ok(served)
}

/// The uid and gid of `user` (the instance's `nsslapd-localuser`).
fn user_ids(user: &str) -> Result<(u32, u32), String> {
    let c = std::ffi::CString::new(user).map_err(|_| format!("bad user name {user:?}"))?;
    // SAFETY: getpwnam with a NUL-terminated name; the fields are copied
    // out at once (no other thread of abproxy calls getpwnam).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(format!(
            "no user {user} here (nsslapd-localuser of the instance: ns-slapd runs as it)"
        ));
    }
    // SAFETY: non-null, from getpwnam.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// T's directories (T private to the server's user), the live
/// instance's schema and `*.conf` files copied into `T/config` (not its
/// NSS database, keys or password files: the throwaway has no TLS).
fn prepare(layout: &ds389::Layout, live_dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| format!("{}: {e}", p.display())
    };
    for d in layout.dirs() {
        fs::create_dir_all(&d).map_err(at(&d))?;
    }
    let schema = live_dir.join("schema");
    copy_tree(&schema, &layout.config().join("schema")).map_err(at(&schema))?;
    for entry in fs::read_dir(live_dir).map_err(at(live_dir))? {
        let entry = entry.map_err(at(live_dir))?;
        let path = entry.path();
        let is_conf = path.extension().is_some_and(|x| x == "conf");
        if is_conf && entry.file_type().map_err(at(&path))?.is_file() {
            fs::copy(&path, layout.config().join(entry.file_name())).map_err(at(&path))?;
        }
    }
    chown_tree(&layout.root, uid, gid).map_err(at(&layout.root))?;
    fs::set_permissions(&layout.root, fs::Permissions::from_mode(0o700)).map_err(at(&layout.root))
}

/// `cp -r from to` of regular files and directories.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        } else if t.is_file() {
            fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// `T/config/dse.ldif`, readable by the server's user only.
fn write_dse(layout: &ds389::Layout, entries: &[Entry], uid: u32, gid: u32) -> Result<(), String> {
    let path = layout.config().join("dse.ldif");
    let what = |e: std::io::Error| format!("writing {}: {e}", path.display());
    fs::write(&path, ldif::to_string(entries)).map_err(what)?;
    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(what)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(what)
}

/// The backup's archive unpacked into `T/archive`, its
/// `dse_instance.ldif` pointed into T, everything the server user's.
fn unpack_archive(file: &Path, layout: &ds389::Layout, uid: u32, gid: u32) -> Result<(), String> {
    let to = layout.archive();
    let what =
        |e: std::io::Error| format!("unpacking {} into {}: {e}", file.display(), to.display());
    let f = fs::File::open(file).map_err(what)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(f));
    tar.set_overwrite(false);
    tar.unpack(&to).map_err(what)?;
    let instances = to.join("dse_instance.ldif");
    if instances.is_file() {
        let at = |e: String| format!("{}: {e}", instances.display());
        let text = fs::read(&instances).map_err(|e| at(e.to_string()))?;
        let mut entries: Vec<Entry> = ldif::Reader::new(text.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| at(e.to_string()))?;
        ds389::throwaway_archive_instances(&mut entries, &layout.db());
        fs::write(&instances, ldif::to_string(&entries)).map_err(|e| at(e.to_string()))?;
    }
    chown_tree(&to, uid, gid).map_err(what)
}

/// The last lines of the throwaway's error log, for a message.
fn errors_tail(layout: &ds389::Layout) -> String {
    let text = fs::read_to_string(layout.logs().join("errors")).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("slapd_system_isFIPS"))
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        " (its error log ends: {})",
        lines[lines.len().saturating_sub(4)..].join(" / ")
    )
}

/// The throwaway ns-slapd, in the foreground (`-d 0`) as our child;
/// killed if dropped.
struct Server {
    child: tokio::process::Child,
}

impl Server {
    /// Starts it and waits (within [`TEST_START_LIMIT`]) until it accepts
    /// connections on `port`. On failure: why, and whether another port
    /// is worth a try (this one was taken).
    async fn start(layout: &ds389::Layout, port: u16) -> Result<Server, (String, bool)> {
        let log = layout.logs().join("ns-slapd.out");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| (format!("{}: {e}", log.display()), false))?;
        let err = out
            .try_clone()
            .map_err(|e| (format!("{}: {e}", log.display()), false))?;
        let child = Command::new(ds389::NS_SLAPD)
            .arg("-D")
            .arg(layout.config())
            .arg("-i")
            .arg(layout.pid_file())
            .arg("-d")
            .arg("0")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| (format!("{}: {e}", ds389::NS_SLAPD), false))?;
        let mut server = Server { child };
        let deadline = tokio::time::Instant::now() + TEST_START_LIMIT;
        let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let tail = errors_tail(layout);
                let taken = tail.contains("already in use") || tail.contains("Address in use");
                return Err((
                    format!(
                        "ns-slapd -D {} exited with {status}{tail}",
                        layout.config().display()
                    ),
                    taken,
                ));
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(server);
            }
            if tokio::time::Instant::now() >= deadline {
                server.stop().await;
                return Err((
                    format!(
                        "ns-slapd did not answer on 127.0.0.1:{port} within {} s{}",
                        TEST_START_LIMIT.as_secs(),
                        errors_tail(layout)
                    ),
                    false,
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL past [`TEST_STOP_LIMIT`].
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            if tokio::time::timeout(TEST_STOP_LIMIT, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}
