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
use crate::backup::manifest::{file_sha256, Manifest, MANIFEST};
use crate::backup::slapd::{self, Contents, Limits, Throwaway, Tools};

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

/// The manifest of a backup directory.
pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
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
            if let Err(e) = fs::rename(&tmp, &spec.to) {
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
    let manifest = read_manifest(&spec.backup)?;
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
    for b in &r.backends {
        let live = PathBuf::from(&b.live_db);
        let built = work.join(&b.db);
        let aside = aside(b, &r.backup_id);
        let meta = fs::metadata(&live).map_err(|e| format!("{}: {e}", live.display()))?;
        fs::rename(&live, &aside).map_err(|e| format!("moving {} aside: {e}", live.display()))?;
        if let Err(e) = fs::rename(&built, &live) {
            if e.raw_os_error() != Some(libc::EXDEV) {
                let _ = fs::rename(&aside, &live);
                return Err(format!("moving {} in: {e}", built.display()));
            }
            // Another file system: a copy (sparse, as data.mdb is).
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg("--sparse=always")
                .arg(&built)
                .arg(&live)
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                let _ = fs::remove_dir_all(&live);
                let _ = fs::rename(&aside, &live);
                return Err(format!(
                    "copying {} to {}: {status:?}",
                    built.display(),
                    live.display()
                ));
            }
        }
        own_like(&live, &meta).map_err(|e| format!("{}: {e}", live.display()))?;
        progress.line(format!(
            "restored {} ({} entries) into {}; the previous database is in {}",
            b.suffix,
            b.entries,
            live.display(),
            aside.display()
        ));
    }
    progress.line("start slapd again");
    Ok(())
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
