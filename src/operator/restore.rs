//! `abproxy restore`: a backup's LDIF made into an OpenLDAP database
//! again, offline, then put in place while the server is stopped.
//!
//! Two steps, so that the slow one never needs the server down:
//!
//! 1. `abproxy restore DIR --to WORK --slapd-config PATH`: for each backend
//!    of the backup, the database is built in `WORK/SUFFIX/` with the
//!    server's own configuration (see [`crate::backup::slapd`]), read back
//!    with `slapcat`, and its entry count, content digest and `contextCSN`
//!    compared with the manifest: a restore that does not reproduce the
//!    backup stops here. `WORK/restore.json` records what was built and
//!    where each database lives on the server. WORK is written as
//!    `WORK.partial-PID` and renamed once whole.
//! 2. `abproxy restore --apply WORK`, with the server stopped: each live
//!    database directory is moved aside (`DIR.before-restore-BACKUP_ID`),
//!    the built one moved (or copied) into its place with the old one's
//!    owner and mode. The server is started again by the caller.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::backup::file_part;
use super::{exit, Password, Progress, Session, Target};
use crate::backup::manifest::{file_sha256, Manifest};
use crate::backup::slapd::{self, Contents, Limits, Throwaway, Tools};

pub mod ds389;

/// `WORK/restore.json`'s name.
pub const RECORD: &str = "restore.json";

/// `abproxy restore DIR --to WORK`.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub backup: PathBuf,
    pub to: PathBuf,
    /// Only these suffixes (all the backup's when empty).
    pub backends: Vec<String>,
    /// The server's `slapd.d` directory or `slapd.conf`.
    pub slapd_config: PathBuf,
}

/// `WORK/restore.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub backup_id: String,
    pub backup_dir: String,
    pub slapd_config: String,
    /// The server's pid file (`olcPidFile`), if its configuration names one.
    pub pid_file: Option<String>,
    pub backends: Vec<BuiltBackend>,
}

/// One database built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuiltBackend {
    pub suffix: String,
    /// The built database directory, relative to WORK.
    pub db: String,
    /// Where the server keeps this database (`olcDbDirectory`).
    pub live_db: String,
    pub entries: u64,
    pub digest: String,
}

/// How a backend's file of a backup is made into a database: LDIF (the
/// `ldif` and `slapcat` methods) or a copy of `data.mdb` (`files`); `None`
/// for a method abproxy does not restore.
pub fn source<'a>(method: &str, file: &'a Path) -> Option<slapd::Source<'a>> {
    match method {
        "ldif" | "slapcat" => Some(slapd::Source::Ldif(file)),
        "files" => Some(slapd::Source::Mdb(file)),
        _ => None,
    }
}

/// `abproxy restore DIR --to WORK`. Returns the exit status.
pub async fn build(spec: BuildSpec, progress: &Progress) -> u8 {
    if fs::symlink_metadata(&spec.to).is_ok() {
        progress.line(format!(
            "error: {} exists; give a new directory to build the restore in",
            spec.to.display()
        ));
        return exit::USAGE;
    }
    let Some(name) = spec.to.file_name() else {
        progress.line(format!("error: {} names no directory", spec.to.display()));
        return exit::USAGE;
    };
    let tmp = spec.to.with_file_name(format!(
        "{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if let Err(e) = fs::create_dir(&tmp) {
        progress.line(format!("error: cannot create {}: {e}", tmp.display()));
        return exit::RESTORE_FAILED;
    }
    match build_in(&spec, &tmp, progress).await {
        Ok(record) => {
            if let Err(e) = crate::backup::manifest::rename_noreplace(&tmp, &spec.to) {
                progress.line(format!("error: rename to {}: {e}", spec.to.display()));
                let _ = fs::remove_dir_all(&tmp);
                return exit::RESTORE_FAILED;
            }
            print_steps(&record, &spec.to, progress);
            exit::OK
        }
        Err(message) => {
            progress.line(format!("error: {message}"));
            let _ = fs::remove_dir_all(&tmp);
            progress.line(format!("nothing built at {}", spec.to.display()));
            exit::RESTORE_FAILED
        }
    }
}

async fn build_in(spec: &BuildSpec, tmp: &Path, progress: &Progress) -> Result<Record, String> {
    let manifest = Manifest::read(&spec.backup)?;
    let chosen: Vec<_> = manifest
        .backends
        .iter()
        .filter(|b| {
            spec.backends.is_empty()
                || spec
                    .backends
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(&b.suffix))
        })
        .collect();
    if chosen.is_empty() {
        return Err(format!(
            "the backup {} holds none of {}",
            manifest.backup_id,
            spec.backends.join("; ")
        ));
    }
    if let Some(b) = chosen
        .iter()
        .find(|b| source(&b.method, Path::new("")).is_none())
    {
        return Err(format!(
            "{}: method {} is not restored by abproxy (ldif, slapcat and files are)",
            b.suffix, b.method
        ));
    }
    let tools = Tools::default();
    let limits = Limits::default();
    let t = Instant::now();
    let config = slapd::read_config(&tools, &spec.slapd_config, limits.config, tmp)
        .await
        .map_err(|e| format!("reading the server's configuration: {e}"))?;
    let _ = fs::remove_file(tmp.join("server-config.ldif"));
    progress.line(format!(
        "read the configuration of {} ({} entries, {} ms)",
        spec.slapd_config.display(),
        config.len(),
        t.elapsed().as_millis()
    ));
    let pid_file = config
        .iter()
        .find(|e| e.dn.eq_ignore_ascii_case("cn=config"))
        .and_then(|e| {
            e.attrs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("olcPidFile"))
        })
        .and_then(|(_, v)| v.first())
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let mut built = Vec::new();
    for b in chosen {
        let t = Instant::now();
        let file = spec.backup.join(&b.file);
        // The file must be the one the backup wrote.
        let listed = manifest.files.iter().find(|f| f.name == b.file);
        let (size, sha) = file_sha256(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        match listed {
            Some(f) if f.size == size && f.sha256 == sha => {}
            Some(_) => {
                return Err(format!(
                    "{} is not the file the backup wrote (size or SHA-256 differs): \
                     run abproxy verify {}",
                    file.display(),
                    spec.backup.display()
                ))
            }
            None => return Err(format!("{} is not in the manifest's files", b.file)),
        }
        let (_, live) = slapd::database_for(&config, &b.suffix).map_err(|e| e.to_string())?;
        let part = file_part(&b.suffix);
        let work = tmp.join(&part);
        fs::create_dir(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let done = slapd::build(
            &tools,
            &config,
            &b.suffix,
            source(&b.method, &file).expect("checked above"),
            &work,
            &slapd::random_password(),
            &limits,
        )
        .await
        .map_err(|e| format!("building {}: {e}", b.suffix))?;
        let c = &done.contents;
        if c.entries != b.entries || c.digest != b.digest || c.context_csn != b.context_csn {
            return Err(format!(
                "the database built for {} does not hold the backup: {} entries, digest {}, \
                 contextCSN {:?}; the manifest says {} entries, digest {}, contextCSN {:?}",
                b.suffix, c.entries, c.digest, c.context_csn, b.entries, b.digest, b.context_csn
            ));
        }
        // Only the database is kept; the throwaway configuration holds a
        // password.
        fs::remove_dir_all(work.join("slapd.d")).map_err(|e| format!("{}: {e}", work.display()))?;
        let _ = fs::remove_file(work.join("config.ldif"));
        progress.line(format!(
            "built {}: {} entries, digest {} as in the manifest ({} ms)",
            b.suffix,
            c.entries,
            c.digest,
            t.elapsed().as_millis()
        ));
        built.push(BuiltBackend {
            suffix: b.suffix.clone(),
            db: format!("{part}/db"),
            live_db: live.display().to_string(),
            entries: c.entries,
            digest: c.digest.clone(),
        });
    }
    let record = Record {
        backup_id: manifest.backup_id.clone(),
        backup_dir: spec.backup.display().to_string(),
        slapd_config: spec.slapd_config.display().to_string(),
        pid_file,
        backends: built,
    };
    let json = serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?;
    let path = tmp.join(RECORD);
    fs::write(&path, format!("{json}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(record)
}

fn print_steps(r: &Record, work: &Path, progress: &Progress) {
    progress.line(format!(
        "backup {} built in {}; to put it in place, with slapd stopped:",
        r.backup_id,
        work.display()
    ));
    progress.line(format!("  abproxy restore --apply {}", work.display()));
    for b in &r.backends {
        progress.line(format!(
            "    ({}: {} moves to {}.before-restore-{}, {} takes its place)",
            b.suffix,
            b.live_db,
            b.live_db,
            r.backup_id,
            work.join(&b.db).display()
        ));
    }
}

/// Whether the process of a pid file is alive.
fn running(pid_file: &Path) -> Option<u32> {
    let pid: i32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    // SAFETY: kill(2) with signal 0 only checks the process exists.
    let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    alive.then_some(pid as u32)
}

/// `abproxy restore --apply WORK`. Returns the exit status.
pub fn apply(work: &Path, progress: &Progress) -> u8 {
    match apply_in(work, progress) {
        Ok(()) => exit::OK,
        Err(m) => {
            progress.line(format!("error: {m}"));
            exit::RESTORE_FAILED
        }
    }
}

fn apply_in(work: &Path, progress: &Progress) -> Result<(), String> {
    let path = work.join(RECORD);
    let text = fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (give the WORK directory `abproxy restore DIR --to WORK` built)",
            path.display()
        )
    })?;
    let r: Record = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match &r.pid_file {
        None => {
            return Err(
                "the server's configuration names no olcPidFile: cannot tell that slapd is \
                 stopped; move the databases by hand (the steps `abproxy restore` printed)"
                    .into(),
            )
        }
        Some(p) => {
            if let Some(pid) = running(Path::new(p)) {
                return Err(format!(
                    "slapd is running (pid {pid}, from {p}): stop it first"
                ));
            }
        }
    }
    // Everything checked before anything moves.
    for b in &r.backends {
        let built = work.join(&b.db);
        if !built.join("data.mdb").is_file() {
            return Err(format!(
                "{}: no data.mdb (already applied?)",
                built.display()
            ));
        }
        let aside = aside(b, &r.backup_id);
        if fs::symlink_metadata(&aside).is_ok() {
            return Err(format!("{} exists already", aside.display()));
        }
    }
    // One database after another; on a failure, those already swapped go
    // back (the restore is all or nothing).
    let mut swapped: Vec<(PathBuf, PathBuf, PathBuf)> = Vec::new();
    for b in &r.backends {
        let live = PathBuf::from(&b.live_db);
        let built = work.join(&b.db);
        let aside = aside(b, &r.backup_id);
        if let Err(e) = swap_in(&live, &built, &aside) {
            for (live, built, aside) in swapped.iter().rev() {
                let _ = fs::rename(live, built).or_else(|_| fs::remove_dir_all(live));
                let _ = fs::rename(aside, live);
            }
            let undone = if swapped.is_empty() {
                String::new()
            } else {
                format!(
                    "; the {} database(s) already put in place were moved back",
                    swapped.len()
                )
            };
            return Err(format!("{e}{undone}"));
        }
        progress.line(format!(
            "restored {} ({} entries) into {}; the previous database is in {}",
            b.suffix,
            b.entries,
            live.display(),
            aside.display()
        ));
        swapped.push((live, built, aside));
    }
    progress.line("start slapd again");
    Ok(())
}

/// Limit of copying a built database onto another file system.
const COPY_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Moves `live` aside and `built` into its place, with the old one's owner
/// and mode; puts `live` back if that fails.
fn swap_in(live: &Path, built: &Path, aside: &Path) -> Result<(), String> {
    let meta = fs::metadata(live).map_err(|e| format!("{}: {e}", live.display()))?;
    fs::rename(live, aside).map_err(|e| format!("moving {} aside: {e}", live.display()))?;
    let undo = |e: String| {
        let _ = fs::remove_dir_all(live);
        let _ = fs::rename(aside, live);
        e
    };
    match fs::rename(built, live) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // Another file system: a copy (sparse, as data.mdb is), within
            // a deadline.
            copy_dir(built, live).map_err(undo)?;
        }
        Err(e) => {
            let _ = fs::rename(aside, live);
            return Err(format!("moving {} in: {e}", built.display()));
        }
    }
    own_like(live, &meta).map_err(|e| undo(format!("{}: {e}", live.display())))
}

/// `cp -a --sparse=always FROM TO`, killed past [`COPY_LIMIT`].
fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    let what = || format!("copying {} to {}", from.display(), to.display());
    let mut child = std::process::Command::new("cp")
        .arg("-a")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .spawn()
        .map_err(|e| format!("{}: {e}", what()))?;
    let deadline = std::time::Instant::now() + COPY_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{}: cp exited with {s}", what())),
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{}: not done within {} s",
                    what(),
                    COPY_LIMIT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => return Err(format!("{}: {e}", what())),
        }
    }
}

fn aside(b: &BuiltBackend, id: &str) -> PathBuf {
    PathBuf::from(format!("{}.before-restore-{id}", b.live_db))
}

/// Gives `dir` and what is in it the owner of `like`, and `dir` its mode.
fn own_like(dir: &Path, like: &fs::Metadata) -> std::io::Result<()> {
    let (uid, gid) = (like.uid(), like.gid());
    for entry in fs::read_dir(dir)? {
        std::os::unix::fs::chown(entry?.path(), Some(uid), Some(gid))?;
    }
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(like.mode() & 0o7777))
}

/// What a throwaway slapd served for one backend of a backup.
#[derive(Debug)]
pub struct Served {
    pub suffix: String,
    /// What it served, or why it could not be built or served.
    pub result: Result<Contents, TestFail>,
}

/// Why a restore test did not serve a backend.
#[derive(Debug)]
pub enum TestFail {
    /// The backup's entries do not load into slapd with this configuration:
    /// the backup does not restore.
    DoesNotLoad(String),
    /// Anything else (no slapd, the configuration, a port, a deadline):
    /// the test could not be run.
    Cannot(String),
}

impl std::fmt::Display for TestFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestFail::DoesNotLoad(m) | TestFail::Cannot(m) => f.write_str(m),
        }
    }
}

/// The restore test of `abproxy verify --restore-test`: each `ldif`
/// backend of the backup built in a temporary directory as
/// [`build`] does, served by a throwaway slapd on a loopback port, and
/// read back over LDAP (a paged search for `*` and `+`, as the backup
/// read it), counted and digested. The temporary directories are removed.
pub async fn restore_test(backup: &Path, manifest: &Manifest, slapd_config: &Path) -> Vec<Served> {
    let tools = Tools::default();
    let limits = Limits::default();
    let mut out = Vec::new();
    let scratch = match tempfile::Builder::new()
        .prefix("abproxy-restore-test-")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            return vec![Served {
                suffix: String::new(),
                result: Err(TestFail::Cannot(format!("a temporary directory: {e}"))),
            }]
        }
    };
    let config = match slapd::read_config(&tools, slapd_config, limits.config, scratch.path()).await
    {
        Ok(c) => c,
        Err(e) => {
            return vec![Served {
                suffix: String::new(),
                result: Err(TestFail::Cannot(format!("reading the configuration: {e}"))),
            }]
        }
    };
    for (i, b) in manifest.backends.iter().enumerate() {
        let file = backup.join(&b.file);
        let result = match source(&b.method, &file) {
            None => Err(TestFail::Cannot(format!(
                "method {} is not restore-tested",
                b.method
            ))),
            Some(data) => {
                let work = scratch
                    .path()
                    .join(format!("{}-{}", i + 1, file_part(&b.suffix)));
                serve_one(&tools, &limits, &config, data, &b.suffix, &work).await
            }
        };
        out.push(Served {
            suffix: b.suffix.clone(),
            result,
        });
    }
    out
}

async fn serve_one(
    tools: &Tools,
    limits: &Limits,
    config: &[crate::backup::Entry],
    data: slapd::Source<'_>,
    suffix: &str,
    work: &Path,
) -> Result<Contents, TestFail> {
    fs::create_dir(work).map_err(|e| TestFail::Cannot(format!("{}: {e}", work.display())))?;
    let password = slapd::random_password();
    slapd::build(tools, config, suffix, data, work, &password, limits)
        .await
        .map_err(|e| match e {
            slapd::Error::Load(_) => TestFail::DoesNotLoad(e.to_string()),
            e => TestFail::Cannot(format!("building: {e}")),
        })?;
    let server = Throwaway::start(tools, work, limits)
        .await
        .map_err(|e| TestFail::Cannot(format!("serving: {e}")))?;
    let target = Target {
        url: server.url.clone(),
        bind_dn: Some(slapd::root_dn(suffix)),
        password: Some(Password::new(&password)),
    };
    let read = async {
        let mut session = Session::connect(&target)
            .await
            .map_err(|e| format!("connecting to the throwaway slapd: {e}"))?;
        let csn = super::backup::context_csn(&mut session, suffix)
            .await
            .map_err(|f| f.to_string())?;
        let (entries, digest) =
            super::backup::export(&mut session, suffix, &work.join("served.ldif"))
                .await
                .map_err(|(m, _)| format!("reading it back: {m}"))?;
        session.close().await;
        Ok::<_, String>(Contents {
            entries,
            digest,
            context_csn: csn,
            suffix_uuid: None,
        })
    };
    let r = tokio::time::timeout(limits.data, read)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "reading it back took over {} s",
                limits.data.as_secs()
            ))
        });
    server.stop().await;
    r.map_err(TestFail::Cannot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WORK with two built databases for two live directories, slapd's
    /// pid file absent (stopped).
    fn work_for(root: &Path, second_live_exists: bool) -> PathBuf {
        let work = root.join("work");
        let mut backends = Vec::new();
        for (i, suffix) in ["dc=a", "dc=b"].iter().enumerate() {
            let built = work.join(format!("{i}/db"));
            fs::create_dir_all(&built).unwrap();
            fs::write(built.join("data.mdb"), format!("restored {i}")).unwrap();
            let live = root.join(format!("live{i}"));
            if i == 0 || second_live_exists {
                fs::create_dir(&live).unwrap();
                fs::write(live.join("data.mdb"), format!("live {i}")).unwrap();
            }
            backends.push(BuiltBackend {
                suffix: suffix.to_string(),
                db: format!("{i}/db"),
                live_db: live.display().to_string(),
                entries: 1,
                digest: String::new(),
            });
        }
        let record = Record {
            backup_id: "B".into(),
            backup_dir: "x".into(),
            slapd_config: "x".into(),
            pid_file: Some(root.join("slapd.pid").display().to_string()),
            backends,
        };
        fs::write(work.join(RECORD), serde_json::to_string(&record).unwrap()).unwrap();
        work
    }

    #[test]
    fn restore_apply_swaps_every_database_or_none() {
        let progress = Progress::stderr("test");
        let root = tempfile::tempdir().unwrap();
        let work = work_for(root.path(), true);
        assert_eq!(apply(&work, &progress), exit::OK);
        for i in 0..2 {
            let live = root.path().join(format!("live{i}"));
            let aside = root.path().join(format!("live{i}.before-restore-B"));
            assert_eq!(
                fs::read_to_string(live.join("data.mdb")).unwrap(),
                format!("restored {i}")
            );
            assert_eq!(
                fs::read_to_string(aside.join("data.mdb")).unwrap(),
                format!("live {i}")
            );
        }
        // Applied already: refused, nothing moves.
        assert_eq!(apply(&work, &progress), exit::RESTORE_FAILED);

        // The second cannot be put in place: the first goes back.
        let root = tempfile::tempdir().unwrap();
        let work = work_for(root.path(), false);
        assert_eq!(apply(&work, &progress), exit::RESTORE_FAILED);
        let live0 = root.path().join("live0");
        assert_eq!(
            fs::read_to_string(live0.join("data.mdb")).unwrap(),
            "live 0"
        );
        assert!(!root.path().join("live0.before-restore-B").exists());
        assert_eq!(
            fs::read_to_string(work.join("0/db/data.mdb")).unwrap(),
            "restored 0"
        );
    }

    #[test]
    fn restore_apply_refuses_while_slapd_runs() {
        let root = tempfile::tempdir().unwrap();
        let work = work_for(root.path(), true);
        // Our own pid: a live process.
        fs::write(
            root.path().join("slapd.pid"),
            std::process::id().to_string(),
        )
        .unwrap();
        assert_eq!(
            apply(&work, &Progress::stderr("test")),
            exit::RESTORE_FAILED
        );
        assert_eq!(
            fs::read_to_string(root.path().join("live0/data.mdb")).unwrap(),
            "live 0"
        );
    }
}
