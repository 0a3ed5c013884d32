//! `abproxy backup --to DIR`: a consistent LDIF backup taken through the
//! proxy. It freezes (ON with holdUntilUnbind, as `abproxy run` does, so a
//! killed backup leaves no freeze behind), exports every frozen backend over
//! the same connection (a paged subtree search for `*` and `+`), writing its
//! LDIF and computing its content digest as the entries arrive, releases
//! (OFF naming the freeze), then writes `manifest.json`, `SHA256SUMS`, `HEADER.txt` and
//! `backup.log` and renames the temporary directory `DIR.partial-PID` to
//! DIR. On any failure it releases, removes the temporary directory and
//! exits non-zero: DIR is a whole backup or does not exist.
//!
//! `abproxy backup --tar -` takes the same backup into a staging directory
//! (under `--tmp-dir`) and, once released, streams it on stdout as one tar
//! archive (one top-level directory named after the backup id), then
//! removes the staging directory: the freeze never waits on the reader.
//! `--history FILE` appends one JSON line per attempt, success or failure.
//!
//! Only the `ldif` method. In `readonly` and in `stop` mode: the proxy
//! lets the freeze holder's own searches through a `stop` freeze.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Scope, SearchEntry};
use serde::Serialize;

use super::{
    close_all, exit, format_utc, freeze_held, release_held, BackendModeName, ClientTls,
    FreezeRequest, Progress, Session, Signals, Target,
};
use crate::backup::manifest::{
    file_sha256, rename_noreplace, BackendRecord, FileRecord, FreezeInfo, Manifest, ProxyFreeze,
    ServerInfo, FORMAT_VERSION, MANIFEST, SHA256SUMS,
};
use crate::backup::{ldif, slapd, Digester, Entry};

mod auto;
mod ds389;
mod incremental;

/// Entries per page of the export search.
pub const PAGE_SIZE: i32 = 500;
/// Limit of the small searches (root DSE, contextCSN) and of the status.
const SMALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `abproxy backup`: where to connect, what to freeze, where to write.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// The proxy the export reads through (the first given).
    pub target: Target,
    /// The other proxies frozen with it, all or nothing (HA pairs in
    /// front of one server, replicated servers each behind its proxy: the
    /// data is the same behind each, so it is read through `target` only).
    pub more_targets: Vec<Target>,
    /// TLS to the proxy.
    pub tls: ClientTls,
    /// The freeze (holdUntilUnbind is set whatever this says).
    pub request: FreezeRequest,
    /// Limit for connecting, binding and ON.
    pub on_timeout: Duration,
    /// Limit for OFF.
    pub off_timeout: Duration,
    /// Where the backup goes.
    pub dest: Destination,
    /// `--history FILE`: one JSON line appended per attempt.
    pub history: Option<PathBuf>,
    /// `--method`.
    pub method: Method,
    /// Why `--method auto` chose `method` (for the log).
    pub method_reason: Option<String>,
}

/// How each backend's data is read (`--method`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Every entry, user and operational attributes, through the proxy on
    /// the freeze's connection (any server, local or remote).
    Ldif,
    /// `slapcat -b SUFFIX` of the local slapd, with its configuration (a
    /// `slapd.d` directory or `slapd.conf`): back-mdb's own consistent
    /// dump, read while the freeze holds writes.
    Slapcat { config: PathBuf },
    /// A compacted copy of the backend's database (`mdb_copy -c` of its
    /// `olcDbDirectory`, from the configuration), taken while frozen;
    /// counted and digested after the release, from a throwaway
    /// configuration.
    Files { config: PathBuf },
    /// The user's command, run once while frozen with the backup
    /// directory as its working directory (and `ABPROXY_BACKUP_DIR`); the
    /// files it leaves there are the backup's.
    Command { argv: Vec<std::ffi::OsString> },
    /// 389 DS's own online backup, a task added over a direct connection
    /// to the server at `server` (an LDAP URL, bound as the operator),
    /// while frozen; counted with `dbscan` and kept as one tar file after
    /// the release ([`ds389`]).
    Ds389 { server: String },
    /// An incremental backup: no data, the proxy's journal (in `journal`,
    /// on this host) from the cut of the backup in `base` to this
    /// backup's own cut ([`incremental`]).
    Incremental { journal: PathBuf, base: PathBuf },
    /// Chosen before the freeze from what the proxy's server is and
    /// whether its database is on this host ([`auto`]): `389`, `files`
    /// or `slapcat` (with the configuration at `slapd_config`), else
    /// `ldif`.
    Auto { slapd_config: PathBuf },
}

impl Method {
    /// Its name in the manifest.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Ldif => "ldif",
            Method::Slapcat { .. } => "slapcat",
            Method::Files { .. } => "files",
            Method::Command { .. } => "command",
            Method::Ds389 { .. } => "389",
            Method::Incremental { .. } => "incremental",
            Method::Auto { .. } => "auto",
        }
    }
}

/// Where a backup goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// `--to DIR`: a new directory (must not exist).
    Dir(PathBuf),
    /// `--tar -`: one tar stream on stdout, staged in a temporary
    /// directory under `tmp_dir` first.
    TarStdout {
        /// `--tmp-dir` (default `$TMPDIR` or /tmp).
        tmp_dir: PathBuf,
    },
}

impl Destination {
    /// As the history records it: DIR, or `tar:-`.
    pub fn describe(&self) -> String {
        match self {
            Destination::Dir(p) => p.display().to_string(),
            Destination::TarStdout { .. } => "tar:-".into(),
        }
    }
}

/// A failed step: what to print and the exit status.
pub(super) struct Fail {
    step: String,
    message: String,
    code: u8,
    /// Printed as `error: MESSAGE`, without the step (the arguments' checks).
    plain: bool,
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

impl Fail {
    fn new(step: impl Into<String>, message: impl std::fmt::Display, code: u8) -> Fail {
        Fail {
            step: step.into(),
            message: message.to_string(),
            code,
            plain: false,
        }
    }

    fn usage(step: impl Into<String>, message: impl std::fmt::Display) -> Fail {
        Fail {
            plain: true,
            ..Fail::new(step, message, exit::USAGE)
        }
    }

    fn io(step: impl Into<String>, path: &Path, e: std::io::Error) -> Fail {
        Fail::new(
            step,
            format!("{}: {e}", path.display()),
            exit::BACKUP_FAILED,
        )
    }
}

/// UTC time with milliseconds: `2026-12-03T17:27:11.042Z`.
fn utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = format_utc(d.as_secs());
    format!("{}.{:03}Z", s.trim_end_matches('Z'), d.subsec_millis())
}

/// The steps done, each with its UTC start and duration (`backup.log`).
struct Log {
    lines: Vec<String>,
    progress: Progress,
}

impl Log {
    fn begin(&self) -> (SystemTime, Instant) {
        (SystemTime::now(), Instant::now())
    }

    fn end(&mut self, (at, start): (SystemTime, Instant), step: &str, detail: &str) {
        let ms = start.elapsed().as_millis();
        self.progress.line(format!("{step}: {detail} ({ms} ms)"));
        self.lines
            .push(format!("{} {step}: {detail} ({ms} ms)", utc(at)));
    }
}

/// A backend's suffix as a file-name part: every character other than
/// ASCII letters, digits, `.` and `-` becomes `_`.
pub fn file_part(suffix: &str) -> String {
    let s: String = suffix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "root".into()
    } else {
        s
    }
}

/// "drained in N ms" of an ON answer.
fn drained_ms(message: &str) -> Option<u64> {
    number_after(message, "drained in ")
}

/// The journal cut ON's answer names (`...; journal cut 1042`).
fn journal_cut(message: &str) -> Option<u64> {
    number_after(message, "journal cut ")
}

/// The number right after `label` in a proxy's answer.
fn number_after(message: &str, label: &str) -> Option<u64> {
    let (_, tail) = message.split_once(label)?;
    let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
    tail[..digits].parse().ok()
}

/// What an attempt got to, for the history line.
#[derive(Debug, Default)]
struct Attempt {
    backup_id: Option<String>,
    backends: Vec<HistoryBackend>,
    bytes: Option<u64>,
    frozen_ms: Option<u64>,
}

/// One backend in a history line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryBackend {
    pub suffix: String,
    pub entries: u64,
    pub digest: String,
}

/// One line of `--history FILE` (JSON Lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryLine {
    /// When the attempt ended (UTC, milliseconds).
    pub time: String,
    /// `null` when it failed before the freeze was set up.
    pub backup_id: Option<String>,
    /// `ok` or `failed`.
    pub result: &'static str,
    /// The exit status.
    pub exit: u8,
    /// The step that failed, if any.
    pub failed_step: Option<String>,
    /// Why, when the step said so.
    pub error: Option<String>,
    /// DIR, or `tar:-`.
    pub destination: String,
    pub backends: Vec<HistoryBackend>,
    /// The size of every file of the backup, manifest and SHA256SUMS
    /// included (`null` if not written).
    pub bytes: Option<u64>,
    /// From ON's success to OFF (`null` if never frozen).
    pub frozen_ms: Option<u64>,
    /// The whole attempt.
    pub duration_ms: u64,
}

impl HistoryLine {
    /// The line, without its newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a history line serialises")
    }
}

/// Appends `line` and a newline to `path` in one write (created 0644 if
/// missing, O_APPEND), then fsyncs it.
pub fn append_history(path: &Path, line: &HistoryLine) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)?;
    let mut text = line.to_json();
    text.push('\n');
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The history line of an attempt that failed before it began (the
/// arguments); a failure to write it is said, the status stays `code`.
pub fn record_early_failure(
    path: &Path,
    dest: &Destination,
    step: &str,
    error: impl std::fmt::Display,
    code: u8,
    progress: &Progress,
) {
    let line = HistoryLine {
        time: utc(SystemTime::now()),
        backup_id: None,
        result: "failed",
        exit: code,
        failed_step: Some(step.into()),
        error: Some(error.to_string()),
        destination: dest.describe(),
        backends: Vec::new(),
        bytes: None,
        frozen_ms: None,
        duration_ms: 0,
    };
    if let Err(e) = append_history(path, &line) {
        progress.line(format!(
            "error: cannot append to the history {}: {e}",
            path.display()
        ));
    }
}

/// The staging directory of `--tar -` under `tmp_dir`.
pub fn staging_dir(tmp_dir: &Path, pid: u32) -> PathBuf {
    tmp_dir.join(format!("abproxy-backup.partial-{pid}"))
}

/// `abproxy backup`. Returns the exit status.
pub async fn backup(spec: BackupSpec, progress: &Progress) -> u8 {
    let began = Instant::now();
    let mut attempt = Attempt::default();
    let result = attempt_backup(&spec, &mut attempt, progress).await;
    let code = match &result {
        Ok(()) => exit::OK,
        Err(f) => f.code,
    };
    let Some(path) = &spec.history else {
        return code;
    };
    let (failed_step, error) = match result {
        Ok(()) => (None, None),
        Err(f) => (Some(f.step), Some(f.message).filter(|m| !m.is_empty())),
    };
    let line = HistoryLine {
        time: utc(SystemTime::now()),
        backup_id: attempt.backup_id,
        result: if code == exit::OK { "ok" } else { "failed" },
        exit: code,
        failed_step,
        error,
        destination: spec.dest.describe(),
        backends: attempt.backends,
        bytes: attempt.bytes,
        frozen_ms: attempt.frozen_ms,
        duration_ms: began.elapsed().as_millis() as u64,
    };
    match append_history(path, &line) {
        Ok(()) => code,
        Err(e) => {
            progress.line(format!(
                "error: cannot append to the history {}: {e}",
                path.display()
            ));
            if code == exit::OK {
                progress.line(format!(
                    "the backup itself is whole ({}); only its history line is missing",
                    spec.dest.describe()
                ));
                exit::BACKUP_FAILED
            } else {
                code
            }
        }
    }
}

/// Says why a step failed (a step that said it itself has no message).
fn say(f: &Fail, progress: &Progress) {
    if f.plain {
        progress.line(format!("error: {}", f.message));
    } else if !f.message.is_empty() {
        progress.line(format!("error: {} failed: {}", f.step, f.message));
    }
}

/// One attempt: the checks, the backup into a new directory, then its
/// rename to DIR, or its tar stream on stdout (and the staging directory
/// removed).
async fn attempt_backup(
    spec: &BackupSpec,
    attempt: &mut Attempt,
    progress: &Progress,
) -> Result<(), Fail> {
    let chosen;
    let spec = match &spec.method {
        Method::Auto { slapd_config } => {
            let (method, why) = auto::choose(spec, slapd_config)
                .await
                .inspect_err(|f| say(f, progress))?;
            progress.line(format!("method {why}"));
            chosen = BackupSpec {
                method,
                method_reason: Some(why),
                ..spec.clone()
            };
            &chosen
        }
        _ => spec,
    };
    let (tmp, mut signals) = prepare(spec).inspect_err(|f| say(f, progress))?;
    let mut result = take(spec, &tmp, &mut signals, progress, attempt).await;
    if let (Ok(manifest), Destination::TarStdout { .. }) = (&result, &spec.dest) {
        // Released: the reader's pace holds no freeze.
        let mtime = parse_utc_secs(&manifest.started).unwrap_or(0);
        let t = Instant::now();
        match stream_tar(&tmp, &manifest.backup_id, mtime, &mut signals).await {
            Ok(bytes) => progress.line(format!(
                "backup {} streamed on stdout as tar: {bytes} bytes ({} ms)",
                manifest.backup_id,
                t.elapsed().as_millis()
            )),
            Err(f) => result = Err(f),
        }
    }
    if let Err(f) = &result {
        say(f, progress);
    }
    let failed = result.is_err();
    if failed || matches!(spec.dest, Destination::TarStdout { .. }) {
        if let Err(e) = fs::remove_dir_all(&tmp) {
            progress.line(format!(
                "error: cannot remove the temporary directory {}: {e}",
                tmp.display()
            ));
        }
    }
    if failed {
        match &spec.dest {
            Destination::Dir(to) => progress.line(format!("no backup written at {}", to.display())),
            Destination::TarStdout { .. } => progress
                .line("no whole backup written on stdout: whatever the reader got is incomplete"),
        }
    }
    result.map(|_| ())
}

/// The checks before anything is done; the temporary directory (created)
/// and the signals caught.
fn prepare(spec: &BackupSpec) -> Result<(PathBuf, Signals), Fail> {
    let pid = std::process::id();
    let tmp = match &spec.dest {
        Destination::Dir(to) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(Fail::usage(
                    "check DIR",
                    format!(
                        "{} exists; a backup is never written over anything: give a new directory",
                        to.display()
                    ),
                ));
            }
            let Some(name) = to.file_name() else {
                return Err(Fail::usage(
                    "check DIR",
                    format!("{} does not name a directory to create", to.display()),
                ));
            };
            let parent = match to.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            parent.join(format!("{}.partial-{pid}", name.to_string_lossy()))
        }
        Destination::TarStdout { tmp_dir } => {
            if std::io::stdout().is_terminal() {
                return Err(Fail::usage(
                    "check stdout",
                    "stdout is a terminal: --tar - writes a tar archive there; pipe it into a \
                     program (`| borg import-tar ...`, `| tar -x`) or redirect it to a file",
                ));
            }
            staging_dir(tmp_dir, pid)
        }
    };
    let signals = Signals::new()
        .map_err(|e| Fail::new("catch signals", format!("cannot catch signals: {e}"), 1))?;
    // 0700: a backup holds what the directory holds, passwords included.
    std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
        .create(&tmp)
        .map_err(|e| {
            Fail::new(
                "create the temporary directory",
                format!("{}: {e}", tmp.display()),
                exit::BACKUP_FAILED,
            )
        })?;
    Ok((tmp, signals))
}

/// `2026-12-03T17:27:11.042Z` (or without the milliseconds) as seconds
/// since the epoch.
pub(crate) fn parse_utc_secs(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, se) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

/// The step name of the tar stream, in messages and the history.
const STREAM_STEP: &str = "stream tar to stdout";

/// Streams `dir` on stdout as tar (see [`write_tar`]) from a thread of its
/// own, so that a signal still ends the command while a slow reader holds
/// the stream. The bytes written.
async fn stream_tar(dir: &Path, id: &str, mtime: u64, signals: &mut Signals) -> Result<u64, Fail> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (dir, id) = (dir.to_path_buf(), id.to_string());
    std::thread::Builder::new()
        .name("tar".into())
        .spawn(move || {
            let out = Counting {
                inner: BufWriter::with_capacity(1 << 16, std::io::stdout().lock()),
                count: 0,
            };
            let r = write_tar(out, &dir, &id, mtime).and_then(|mut out| {
                out.flush()?;
                Ok(out.count)
            });
            let _ = tx.send(r);
        })
        .map_err(|e| Fail::new(STREAM_STEP, e, exit::BACKUP_FAILED))?;
    tokio::select! {
        r = rx => match r {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(Fail::new(
                STREAM_STEP,
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    format!("{e}: the reader closed stdout before the end of the archive")
                } else {
                    e.to_string()
                },
                exit::BACKUP_FAILED,
            )),
            Err(_) => Err(Fail::new(STREAM_STEP, "the tar writer ended", exit::BACKUP_FAILED)),
        },
        sig = signals.recv() => Err(Fail::new(
            STREAM_STEP,
            format!("signal {sig} received"),
            128u8.wrapping_add(sig as u8),
        )),
    }
}

/// A writer that counts the bytes written through it.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The archive's entries: the top-level directory `ID/`, then `ID/NAME`
/// for every name, sorted.
pub fn tar_names(id: &str, names: &[String]) -> Vec<String> {
    let mut sorted: Vec<&String> = names.iter().collect();
    sorted.sort();
    std::iter::once(format!("{id}/"))
        .chain(sorted.into_iter().map(|n| format!("{id}/{n}")))
        .collect()
}

/// Writes the files of `dir` to `out` as a tar archive with one top-level
/// directory `id`: deterministic headers (mode 0755 for the directory,
/// 0644 for the files, mtime `mtime`, uid and gid 0, no user or group
/// names, names sorted). Returns `out`.
pub fn write_tar<W: Write>(out: W, dir: &Path, id: &str, mtime: u64) -> std::io::Result<W> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e
            .file_name()
            .into_string()
            .map_err(|n| std::io::Error::other(format!("{}: not UTF-8", n.to_string_lossy())))?;
        names.push(name);
    }
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let mut b = tar::Builder::new(out);
    for (i, path) in tar_names(id, &names).into_iter().enumerate() {
        if i == 0 {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut h, &path, std::io::empty())?;
            continue;
        }
        let file = dir.join(&path[id.len() + 1..]);
        let f = File::open(&file)?;
        let mut h = header(tar::EntryType::Regular, 0o644, f.metadata()?.len());
        b.append_data(&mut h, &path, f)?;
    }
    b.into_inner()
}

/// Freeze, export, release, write the backup into `tmp`; for `--to DIR`,
/// rename it to DIR. Its manifest.
async fn take(
    spec: &BackupSpec,
    tmp: &Path,
    signals: &mut Signals,
    progress: &Progress,
    attempt: &mut Attempt,
) -> Result<Manifest, Fail> {
    let mut log = Log {
        lines: Vec::new(),
        progress: progress.clone(),
    };
    let started = SystemTime::now();
    if let Some(why) = &spec.method_reason {
        log.lines.push(format!("{} method {why}", utc(started)));
    }
    let url = &spec.target.url;
    let targets: Vec<Target> = std::iter::once(spec.target.clone())
        .chain(spec.more_targets.iter().cloned())
        .collect();

    // The local server's configuration, for the methods that read its
    // files: read before the freeze, which need not wait for it.
    let server_config = match &spec.method {
        Method::Slapcat { config } | Method::Files { config } => {
            let t = log.begin();
            let entries = read_config(config).await?;
            log.end(
                t,
                "read the configuration",
                &format!("{} ({} entries)", config.display(), entries.len()),
            );
            Some(entries)
        }
        _ => None,
    };

    let base = match &spec.method {
        Method::Incremental { base, .. } => {
            let t = log.begin();
            let b = incremental::read_base(base)?;
            log.end(
                t,
                "read the base backup",
                &format!("{}: {}, journal cut {}", base.display(), b.backup_id, b.cut),
            );
            Some(b)
        }
        _ => None,
    };

    let t = log.begin();
    let t_requested = t.0;
    let mut held = freeze_held(
        &targets,
        &spec.tls,
        &spec.request,
        spec.on_timeout,
        spec.off_timeout,
        signals,
        "nothing was backed up",
        progress,
    )
    .await
    // freeze_held has said why.
    .map_err(|code| Fail::new("freeze (ON)", "", code))?;
    let frozen_from = SystemTime::now();
    let frozen_at = Instant::now();
    let several = held.len() > 1;
    for h in &held {
        log.end(
            t,
            "freeze (ON)",
            &format!("{}{}", h.prefix(several), h.frozen.message),
        );
    }
    let mut proxies: Vec<ProxyFreeze> = held
        .iter()
        .map(|h| ProxyFreeze {
            url: h.url.clone(),
            freeze_id: h.frozen.id(),
            message: h.frozen.message.clone(),
            released: String::new(),
            journal_cut: journal_cut(&h.frozen.message),
        })
        .collect();
    let frozen = held[0].frozen.clone();
    let id = frozen.id();
    let compact: String = format_utc(
        started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
    .chars()
    .filter(|c| *c != '-' && *c != ':')
    .collect();
    let backup_id = match id {
        Some(id) => format!("{compact}-f{id}"),
        None => compact,
    };
    attempt.backup_id = Some(backup_id.clone());

    // The same data is behind every proxy: read through the first.
    let exported = tokio::select! {
        r = export_all(
            &mut held[0].session,
            tmp,
            spec,
            server_config.as_deref(),
            &backup_id,
            &mut log,
        ) => r,
        sig = signals.recv() => Err(Fail::new(
            "export",
            format!("signal {sig} received"),
            128u8.wrapping_add(sig as u8),
        )),
    };

    // OFF, always, on the same connections.
    let t = log.begin();
    let off = release_held(&mut held, spec.off_timeout, "the export ended", progress).await;
    let frozen_to = SystemTime::now();
    attempt.frozen_ms = Some(frozen_at.elapsed().as_millis() as u64);
    if off.is_none() {
        log.end(
            t,
            "release (OFF)",
            held[0].released.as_deref().unwrap_or("released"),
        );
    }
    for (p, h) in proxies.iter_mut().zip(&held) {
        p.released = h.released.clone().unwrap_or_default();
    }
    close_all(held).await;
    let (server, mut backends) = exported?;
    let mut increment = None;
    if let (Method::Incremental { journal, .. }, Some(base), None) = (&spec.method, &base, off) {
        let Some(cut) = proxies[0].journal_cut else {
            return Err(Fail::new(
                "copy the journal",
                "the proxy's answer to ON names no journal cut: it keeps no journal ([journal] dir)",
                exit::BACKUP_FAILED,
            ));
        };
        increment = Some(incremental::copy_segments(
            journal, base, cut, id, tmp, &mut log,
        )?);
    }
    if off.is_none() {
        // What only the release let wait: the database copies counted.
        if let Err(f) = complete(
            &mut backends,
            tmp,
            &spec.method,
            server_config.as_deref(),
            &mut log,
        )
        .await
        {
            ds389::discard(&backends, progress);
            return Err(f);
        }
    }
    attempt.backends = backends
        .iter()
        .map(|b| HistoryBackend {
            suffix: b.suffix.clone(),
            entries: b.entries,
            digest: b.digest.clone(),
        })
        .collect();
    if let Some(code) = off {
        ds389::discard(&backends, progress);
        return Err(Fail::new(
            "release (OFF)",
            if several {
                "a freeze did not last until the export ended, or could not be released: \
                 the export may be inconsistent and is not kept"
            } else {
                "the freeze did not last until the export ended, or could not be released: \
                 the export may be inconsistent and is not kept"
            },
            code,
        ));
    }

    // The files.
    let t = log.begin();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        backup_id,
        abproxy_version: env!("CARGO_PKG_VERSION").into(),
        proxy_url: url.clone(),
        server,
        started: utc(started),
        ended: String::new(),
        freeze: FreezeInfo {
            id,
            drained_ms: drained_ms(&frozen.message),
            requested: utc(t_requested),
            frozen_from: utc(frozen_from),
            frozen_to: utc(frozen_to),
            message: frozen.message.clone(),
            requests_resumed: requests_resumed(&proxies[0].released),
            released: proxies[0].released.clone(),
            journal_cut: proxies[0].journal_cut,
        },
        backends,
        files: Vec::new(),
        proxies,
        incremental: increment,
    };
    let header = header(&manifest);
    write_file(tmp, "HEADER.txt", header.as_bytes())?;
    log.end(t, "write HEADER.txt", &format!("{} bytes", header.len()));
    let mut text = log.lines.join("\n");
    text.push('\n');
    write_file(tmp, "backup.log", text.as_bytes())?;
    // Every file in the directory now: the backends' (and what a command
    // wrote), HEADER.txt and backup.log. Nothing but plain files.
    let mut names = Vec::new();
    for entry in fs::read_dir(tmp).map_err(|e| Fail::io("checksums", tmp, e))? {
        let entry = entry.map_err(|e| Fail::io("checksums", tmp, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry
            .file_type()
            .map_err(|e| Fail::io("checksums", tmp, e))?;
        if !kind.is_file() {
            return Err(Fail::new(
                "checksums",
                format!(
                    "{name} is not a plain file: a backup holds plain files only (a command \
                     writes an archive, e.g. tar, rather than a directory)"
                ),
                exit::BACKUP_FAILED,
            ));
        }
        names.push(name);
    }
    names.sort();
    for name in names {
        let path = tmp.join(&name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Fail::io("sync", &path, e))?;
        let (size, sha256) = file_sha256(&path).map_err(|e| Fail::io("checksums", &path, e))?;
        manifest.files.push(FileRecord { name, size, sha256 });
    }
    manifest.ended = utc(SystemTime::now());
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Fail::new("manifest", e, exit::BACKUP_FAILED))?;
    write_file(tmp, MANIFEST, format!("{json}\n").as_bytes())?;
    // Every file, the manifest too, as `sha256sum -c SHA256SUMS` checks them.
    let mut sums = String::new();
    for f in &manifest.files {
        let _ = writeln!(sums, "{}  {}", f.sha256, f.name);
    }
    let path = tmp.join(MANIFEST);
    let (manifest_size, sha) = file_sha256(&path).map_err(|e| Fail::io("checksums", &path, e))?;
    let _ = writeln!(sums, "{sha}  {MANIFEST}");
    write_file(tmp, SHA256SUMS, sums.as_bytes())?;
    sync_dir(tmp).map_err(|e| Fail::io("sync", tmp, e))?;
    attempt.bytes = Some(
        manifest.files.iter().map(|f| f.size).sum::<u64>() + manifest_size + sums.len() as u64,
    );
    let Destination::Dir(to) = &spec.dest else {
        return Ok(manifest);
    };
    rename_noreplace(tmp, to).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Fail::new(
                "rename",
                format!("{} appeared during the backup", to.display()),
                exit::BACKUP_FAILED,
            )
        } else {
            Fail::io("rename", to, e)
        }
    })?;
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = sync_dir(parent);
    }
    progress.line(format!(
        "backup {} written to {}",
        manifest.backup_id,
        to.display()
    ));
    Ok(manifest)
}

/// The frozen backends' exports, with the server's root DSE.
async fn export_all(
    session: &mut Session,
    tmp: &Path,
    spec: &BackupSpec,
    server_config: Option<&[Entry]>,
    backup_id: &str,
    log: &mut Log,
) -> Result<(ServerInfo, Vec<BackendRecord>), Fail> {
    let method = &spec.method;
    let t = log.begin();
    let status = tokio::time::timeout(SMALL_TIMEOUT, session.status())
        .await
        .map_err(|_| Fail::new("status", "no answer within 30 s", exit::TIMEOUT))?
        .map_err(|e| Fail::new("status", &e, e.exit_code()))?;
    let frozen: Vec<_> = status.backends.iter().filter(|b| b.frozen).collect();
    if frozen.is_empty() {
        return Err(Fail::new(
            "status",
            "the proxy reports no backend frozen",
            exit::FAILED,
        ));
    }
    if let Some(b) = frozen
        .iter()
        .find(|b| b.mode == BackendModeName::Unimplemented)
    {
        return Err(Fail::new(
            "check modes",
            format!("backend {} cannot be frozen (unimplemented)", b.suffix),
            exit::BACKUP_FAILED,
        ));
    }
    // Without a lease, a deadline all the same.
    let deadline = match status.lease_expires {
        Some(at) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Duration::from_secs(at.saturating_sub(now) + 5)
        }
        None => Duration::from_secs(600),
    };
    let suffixes: Vec<(String, BackendModeName)> =
        frozen.iter().map(|b| (b.suffix.clone(), b.mode)).collect();
    let names: Vec<String> = suffixes
        .iter()
        .map(|(s, m)| format!("{s} ({})", m.as_str()))
        .collect();
    log.end(t, "status", &format!("frozen: {}", names.join("; ")));

    let t = log.begin();
    let server = root_dse(session).await?;
    log.end(t, "root DSE", &server.to_string());
    if let Method::Incremental { .. } = method {
        // The data is the journal's, copied once the freeze is over.
        return Ok((server, Vec::new()));
    }

    // The local server's configuration (read before the freeze), for the
    // methods that read its files.
    let config = match (method, server_config) {
        (Method::Slapcat { config } | Method::Files { config }, Some(entries)) => {
            Some((config.as_path(), entries))
        }
        _ => None,
    };
    let work = async {
        let mut out = Vec::new();
        if let Method::Command { argv } = method {
            let t = log.begin();
            let line = run_command(argv, tmp, &suffixes).await?;
            log.end(t, "command", &line);
            for (suffix, mode) in &suffixes {
                out.push(BackendRecord {
                    suffix: suffix.clone(),
                    mode: mode.as_str().into(),
                    method: method.name().into(),
                    entries: 0,
                    context_csn: context_csn(session, suffix).await?,
                    digest: String::new(),
                    file: String::new(),
                    commands: vec![line.clone()],
                    suffix_uuid: suffix_uuid(session, suffix).await?,
                    ruv: Vec::new(),
                    last_usn: None,
                    ds389: None,
                });
            }
            return Ok(out);
        }
        if let Method::Ds389 { server } = method {
            let mut served = Vec::new();
            for (suffix, _) in &suffixes {
                served.push(suffix_uuid(session, suffix).await?);
            }
            return ds389_task(spec, server, backup_id, &suffixes, served, log).await;
        }
        for (i, (suffix, mode)) in suffixes.iter().enumerate() {
            let t = log.begin();
            let served_csn = context_csn(session, suffix).await?;
            let step = format!("export {suffix}");
            let fail = |e: slapd::Error| Fail::new(step.clone(), e, exit::BACKUP_FAILED);
            let mut record = BackendRecord {
                suffix: suffix.clone(),
                mode: mode.as_str().into(),
                method: method.name().into(),
                entries: 0,
                context_csn: served_csn,
                digest: String::new(),
                file: String::new(),
                commands: Vec::new(),
                suffix_uuid: suffix_uuid(session, suffix).await?,
                ruv: Vec::new(),
                last_usn: None,
                ds389: None,
            };
            match (method, &config) {
                (Method::Slapcat { .. }, Some((path, _))) => {
                    record.file = format!("{}-{}.ldif", i + 1, file_part(suffix));
                    let out = tmp.join(&record.file);
                    let tools = slapd::Tools::default();
                    let line = slapd::slapcat_live(&tools, path, suffix, &out, DATA_LIMIT)
                        .await
                        .map_err(fail)?;
                    record.commands.push(line);
                    let c = slapd::contents_of(&out, suffix).map_err(fail)?;
                    same_database(&record, c.suffix_uuid.as_deref(), "the slapcat")?;
                    // What a restore gets: the file's own contextCSN (slapd
                    // writes the one it serves at checkpoints).
                    (record.entries, record.digest, record.context_csn) =
                        (c.entries, c.digest, c.context_csn);
                    log.end(
                        t,
                        &step,
                        &format!(
                            "slapcat: {} entries to {}, digest {}",
                            record.entries, record.file, record.digest
                        ),
                    );
                }
                (Method::Files { .. }, Some((_, entries))) => {
                    let (_, live) = slapd::database_for(entries, suffix).map_err(fail)?;
                    record.file = format!("{}-{}.data.mdb", i + 1, file_part(suffix));
                    let to = tmp.join(&record.file);
                    let line = slapd::mdb_copy(&live, &to, DATA_LIMIT)
                        .await
                        .map_err(fail)?;
                    record.commands.push(line);
                    log.end(
                        t,
                        &step,
                        &format!("mdb_copy -c of {} to {}", live.display(), record.file),
                    );
                }
                _ => {
                    record.file = format!("{}-{}.ldif", i + 1, file_part(suffix));
                    let (entries, digest) = export(session, suffix, &tmp.join(&record.file))
                        .await
                        .map_err(|(m, code)| Fail::new(step.clone(), m, code))?;
                    (record.entries, record.digest) = (entries, digest);
                    log.end(
                        t,
                        &step,
                        &format!(
                            "{} entries to {}, digest {}",
                            record.entries, record.file, record.digest
                        ),
                    );
                }
            }
            out.push(record);
        }
        Ok(out)
    };
    let backends = tokio::time::timeout(deadline, work).await.map_err(|_| {
        Fail::new(
            "export",
            "not done before the freeze's lease ends",
            exit::FAILED,
        )
    })??;
    let mut backends = backends;
    if server
        .vendor_name
        .as_deref()
        .is_some_and(|v| v.contains("389"))
    {
        let t = log.begin();
        let suffixes: Vec<String> = backends.iter().map(|b| b.suffix.clone()).collect();
        // The backends' names, for their USNs (cn=config is read through
        // the proxy: a search that changes nothing passes the freeze).
        let names = ds389::backends(session, &suffixes).await.ok();
        let mut said = Vec::new();
        for (i, b) in backends.iter_mut().enumerate() {
            let name = names.as_ref().map(|n| n[i].as_str());
            (b.ruv, b.last_usn) = ds389_position(session, &b.suffix, name).await?;
            said.push(format!(
                "{}: {} RUV element(s), last USN {}",
                b.suffix,
                b.ruv.len(),
                b.last_usn.as_deref().unwrap_or("none")
            ));
        }
        log.end(t, "389 position", &said.join("; "));
    }
    Ok((server, backends))
}

/// The 389 DS backend holding `suffix` (`cn=ldbm database,cn=plugins,
/// cn=config`, read through `session`), if the server says.
pub(super) async fn ds389_backend_of(session: &mut Session, suffix: &str) -> Option<String> {
    ds389::backends(session, &[suffix.to_string()])
        .await
        .ok()
        .and_then(|mut v| v.pop())
}

/// 389 DS's own position of a backend, read during the freeze: its replica
/// update vector (`nsds50ruv` of the suffix's RUV entry, when replicated)
/// and its highest USN (`lastusn;BACKEND` of the root DSE, with the USN
/// plugin on). Either is empty where the server keeps none.
pub(super) async fn ds389_position(
    session: &mut Session,
    suffix: &str,
    backend: Option<&str>,
) -> Result<(Vec<String>, Option<String>), Fail> {
    let step = format!("389 position of {suffix}");
    // 389's documented RUV search: the suffix, this filter (the server
    // answers with the replica's entry under cn=mapping tree).
    let base = suffix;
    let search = session.ldap().search(
        base,
        Scope::Subtree,
        "(&(nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff)(objectClass=nsTombstone))",
        vec!["nsds50ruv"],
    );
    let res = tokio::time::timeout(SMALL_TIMEOUT, search)
        .await
        .map_err(|_| Fail::new(step.clone(), "no answer within 30 s", exit::TIMEOUT))?
        .map_err(|e| Fail::new(step.clone(), e, exit::UNREACHABLE))?;
    let ruv = match res.1.rc {
        0 => res
            .0
            .into_iter()
            .map(SearchEntry::construct)
            .flat_map(|e| e.attrs.into_iter())
            .filter(|(k, _)| k.eq_ignore_ascii_case("nsds50ruv"))
            .flat_map(|(_, v)| v)
            .collect(),
        // No such suffix entry yet.
        32 => Vec::new(),
        rc => {
            return Err(Fail::new(
                step,
                format!("the RUV search of {base} answered {rc}: {}", res.1.text),
                exit::BACKUP_FAILED,
            ))
        }
    };
    let usn = match backend {
        Some(name) => {
            let want = format!("lastusn;{}", name.to_ascii_lowercase());
            base_entry(session, &step, "", vec!["lastusn"])
                .await?
                .and_then(|e| {
                    e.attrs
                        .into_iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&want))
                        .and_then(|(_, v)| v.into_iter().next())
                })
        }
        None => None,
    };
    Ok((ruv, usn))
}

/// `--method 389`: 389 DS's backup task over a direct connection to the
/// server, one archive for the frozen backends.
async fn ds389_task(
    spec: &BackupSpec,
    server: &str,
    backup_id: &str,
    suffixes: &[(String, BackendModeName)],
    served: Vec<Option<String>>,
    log: &mut Log,
) -> Result<Vec<BackendRecord>, Fail> {
    let t = log.begin();
    let target = Target {
        url: server.into(),
        ..spec.target.clone()
    };
    let mut direct = tokio::time::timeout(SMALL_TIMEOUT, Session::connect_tls(&target, &spec.tls))
        .await
        .map_err(|_| Fail::new("389 server", "no answer within 30 s", exit::TIMEOUT))?
        .map_err(|e| Fail::new("389 server", format!("{server}: {e}"), e.exit_code()))?;
    let result = async {
        let names: Vec<String> = suffixes.iter().map(|(s, _)| s.clone()).collect();
        let backends = ds389::backends(&mut direct, &names).await?;
        let bakdir = ds389::bakdir(&mut direct).await?;
        let mut records: Vec<BackendRecord> = suffixes
            .iter()
            .zip(served)
            .map(|((suffix, mode), uuid)| BackendRecord {
                suffix: suffix.clone(),
                mode: mode.as_str().into(),
                method: spec.method.name().into(),
                entries: 0,
                context_csn: Vec::new(),
                digest: String::new(),
                file: ds389::ARCHIVE.into(),
                commands: Vec::new(),
                suffix_uuid: uuid,
                ruv: Vec::new(),
                last_usn: None,
                ds389: None,
            })
            .collect();
        // Before the task: --server is the server behind the proxy.
        for r in &records {
            let direct_uuid = suffix_uuid(&mut direct, &r.suffix).await?;
            same_database(r, direct_uuid.as_deref(), &format!("--server {server}"))?;
        }
        let task = format!("abproxy-{backup_id}");
        let archive = format!("{}/{task}", bakdir.trim_end_matches('/'));
        if fs::symlink_metadata(&archive).is_ok() {
            return Err(Fail::new(
                "389 server",
                format!("{archive} exists already"),
                exit::BACKUP_FAILED,
            ));
        }
        log.end(
            t,
            "389 server",
            &format!(
                "{server}: backends {}; archive {archive}",
                backends.join(", ")
            ),
        );
        let t = log.begin();
        let line = ds389::backup_task(&mut direct, &task, &archive).await?;
        log.end(t, "389 backup task", &line);
        for (r, backend) in records.iter_mut().zip(&backends) {
            r.commands.push(line.clone());
            r.ds389 = Some(ds389::archive_record(backend, &archive));
        }
        Ok(records)
    }
    .await;
    // Closed beside the rest of the freeze, not inside it: the unbind is
    // answered by the connection's end, which 389 DS notices on its next
    // wake-up (up to 250 ms on an idle server).
    tokio::spawn(direct.close());
    result
}

/// Runs the user's command in `tmp` (stdin closed, its stdout to our
/// stderr: `--tar -` owns stdout), with `ABPROXY_BACKUP_DIR` and
/// `ABPROXY_BACKENDS` (the frozen suffixes, one a line); killed if the
/// caller's deadline (the lease) passes. Its command line, or why it
/// failed.
async fn run_command(
    argv: &[std::ffi::OsString],
    tmp: &Path,
    suffixes: &[(String, BackendModeName)],
) -> Result<String, Fail> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(Fail::new("command", "no command given", exit::USAGE));
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .current_dir(tmp)
        .env("ABPROXY_BACKUP_DIR", tmp)
        .env(
            "ABPROXY_BACKENDS",
            suffixes
                .iter()
                .map(|(s, _)| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(std::process::Stdio::from(fd));
    }
    let line = slapd::command_line(&cmd);
    let status = cmd
        .status()
        .await
        .map_err(|e| Fail::new("command", format!("{line}: {e}"), exit::BACKUP_FAILED))?;
    if !status.success() {
        return Err(Fail::new(
            "command",
            format!("{line} exited with {status}"),
            exit::BACKUP_FAILED,
        ));
    }
    Ok(line)
}

/// Limit of one backend's slapcat or copy.
const DATA_LIMIT: Duration = Duration::from_secs(3600);

/// The local server's configuration (`slapcat -n 0`).
async fn read_config(config: &Path) -> Result<Vec<Entry>, Fail> {
    let scratch = tempfile::tempdir()
        .map_err(|e| Fail::new("read the configuration", e, exit::BACKUP_FAILED))?;
    slapd::read_config(
        &slapd::Tools::default(),
        config,
        SMALL_TIMEOUT,
        scratch.path(),
    )
    .await
    .map_err(|e| Fail::new("read the configuration", e, exit::BACKUP_FAILED))
}

/// After the release: each `files` backend's copy counted and digested
/// (built with a throwaway configuration and read back with `slapcat`).
async fn complete(
    backends: &mut [BackendRecord],
    tmp: &Path,
    method: &Method,
    server_config: Option<&[Entry]>,
    log: &mut Log,
) -> Result<(), Fail> {
    if let Method::Ds389 { .. } = method {
        return ds389::complete(backends, tmp, log).await;
    }
    let (Method::Files { .. }, Some(entries)) = (method, server_config) else {
        return Ok(());
    };
    for b in backends.iter_mut() {
        let t = log.begin();
        let step = format!("count {}", b.suffix);
        let fail = |e: slapd::Error| Fail::new(step.clone(), e, exit::BACKUP_FAILED);
        let scratch = tempfile::tempdir().map_err(|e| Fail::io(step.clone(), tmp, e))?;
        let built = slapd::build(
            &slapd::Tools::default(),
            entries,
            &b.suffix,
            slapd::Source::Mdb(&tmp.join(&b.file)),
            scratch.path(),
            &slapd::random_password(),
            &slapd::Limits::default(),
        )
        .await
        .map_err(fail)?;
        let c = built.contents;
        same_database(b, c.suffix_uuid.as_deref(), "the database copied")?;
        (b.entries, b.digest, b.context_csn) = (c.entries, c.digest, c.context_csn);
        log.end(
            t,
            &step,
            &format!("{}: {} entries, digest {}", b.file, b.entries, b.digest),
        );
    }
    Ok(())
}

/// A base search with a deadline; the first entry, if any.
async fn base_entry(
    session: &mut Session,
    step: &str,
    base: &str,
    attrs: Vec<&str>,
) -> Result<Option<SearchEntry>, Fail> {
    let search = session
        .ldap()
        .search(base, Scope::Base, "(objectClass=*)", attrs);
    let res = tokio::time::timeout(SMALL_TIMEOUT, search)
        .await
        .map_err(|_| Fail::new(step, "no answer within 30 s", exit::TIMEOUT))?
        .map_err(|e| Fail::new(step, e, exit::UNREACHABLE))?;
    let (entries, result) = res
        .success()
        .map_err(|e| Fail::new(step, e, exit::BACKUP_FAILED))?;
    let _ = result;
    Ok(entries.into_iter().next().map(SearchEntry::construct))
}

fn first(e: &SearchEntry, attr: &str) -> Option<String> {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first().cloned())
}

async fn root_dse(session: &mut Session) -> Result<ServerInfo, Fail> {
    let e = base_entry(session, "root DSE", "", vec!["vendorName", "vendorVersion"]).await?;
    Ok(match e {
        Some(e) => ServerInfo {
            vendor_name: first(&e, "vendorName"),
            vendor_version: first(&e, "vendorVersion"),
        },
        None => ServerInfo::default(),
    })
}

pub(super) async fn context_csn(session: &mut Session, suffix: &str) -> Result<Vec<String>, Fail> {
    let step = format!("contextCSN of {suffix}");
    let e = base_entry(session, &step, suffix, vec!["contextCSN"]).await?;
    let mut v: Vec<String> = e
        .into_iter()
        .flat_map(|e| e.attrs.into_iter())
        .filter(|(k, _)| k.eq_ignore_ascii_case("contextCSN"))
        .flat_map(|(_, v)| v)
        .collect();
    v.sort();
    Ok(v)
}

/// The held requests OFF resumed, from its answer ("...; N queued
/// request(s) resumed; ...").
fn requests_resumed(released: &str) -> Option<u64> {
    released
        .split(';')
        .find_map(|part| part.trim().strip_suffix(" queued request(s) resumed"))
        .and_then(|n| n.trim().parse().ok())
}

/// The suffix entry's `entryUUID` (or, where it has none, 389 DS's
/// `nsUniqueId`, which every 389 entry has): which database this is.
async fn suffix_uuid(session: &mut Session, suffix: &str) -> Result<Option<String>, Fail> {
    let step = format!("entryUUID of {suffix}");
    let e = base_entry(session, &step, suffix, vec!["entryUUID", "nsUniqueId"]).await?;
    Ok(e.and_then(|e| first(&e, "entryUUID").or_else(|| first(&e, "nsUniqueId"))))
}

/// Fails unless what a local method read (`read`: its suffix entry's
/// `entryUUID`) is the database the proxy's server served: a wrong
/// `--slapd-config` or `--server` would otherwise back up another
/// server's data under this one's name. Nothing to compare when the
/// server served no `entryUUID`.
fn same_database(b: &BackendRecord, read: Option<&str>, what: &str) -> Result<(), Fail> {
    let Some(served) = &b.suffix_uuid else {
        return Ok(());
    };
    if read.is_some_and(|r| r.eq_ignore_ascii_case(served)) {
        return Ok(());
    }
    Err(Fail::new(
        format!("check {}", b.suffix),
        format!(
            "{what} is not of the database behind the proxy: its suffix entry's id (entryUUID, \
             or 389's nsUniqueId) is {}, the one the proxy's server holds is {served} (the \
             configuration or --server of another server?)",
            read.unwrap_or("absent")
        ),
        exit::BACKUP_FAILED,
    ))
}

/// An ldap3 entry as an LDIF entry (attributes by name, binary values as
/// they came).
fn to_entry(se: SearchEntry) -> Entry {
    let mut attrs: Vec<(String, Vec<Vec<u8>>)> = se
        .attrs
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(String::into_bytes).collect()))
        .chain(se.bin_attrs)
        .collect();
    attrs.sort_by(|a, b| a.0.cmp(&b.0));
    Entry { dn: se.dn, attrs }
}

/// How many entries under `suffix` match `filter` (a paged search for no
/// attributes).
pub(super) async fn count(
    session: &mut Session,
    suffix: &str,
    filter: &str,
) -> Result<u64, (String, u8)> {
    let adapters: Vec<Box<dyn Adapter<&str, Vec<&str>>>> = vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(PAGE_SIZE)),
    ];
    let mut stream = session
        .ldap()
        .streaming_search_with(adapters, suffix, Scope::Subtree, filter, vec!["1.1"])
        .await
        .map_err(|e| (format!("search: {e}"), exit::UNREACHABLE))?;
    let mut n = 0u64;
    while stream
        .next()
        .await
        .map_err(|e| (format!("search: {e}"), exit::UNREACHABLE))?
        .is_some()
    {
        n += 1;
    }
    let res = stream.finish().await;
    if res.rc != 0 {
        return Err((
            format!(
                "search ended with {} ({})",
                super::code_name(res.rc),
                res.rc
            ),
            exit::UNREACHABLE,
        ));
    }
    Ok(n)
}

/// Exports the subtree of `suffix` to `path` (a paged search for `*` and
/// `+`), digesting as the entries arrive. The entry count and digest, or
/// what failed and the exit status.
pub(super) async fn export(
    session: &mut Session,
    suffix: &str,
    path: &Path,
) -> Result<(u64, String), (String, u8)> {
    let io = |e: std::io::Error| (format!("{}: {e}", path.display()), exit::BACKUP_FAILED);
    let file = File::create_new(path).map_err(io)?;
    let mut out = BufWriter::new(file);
    let adapters: Vec<Box<dyn Adapter<&str, Vec<&str>>>> = vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(PAGE_SIZE)),
    ];
    let mut stream = session
        .ldap()
        .streaming_search_with(
            adapters,
            suffix,
            Scope::Subtree,
            "(objectClass=*)",
            vec!["*", "+"],
        )
        .await
        .map_err(|e| (format!("search: {e}"), exit::UNREACHABLE))?;
    let mut digester = Digester::default();
    let mut count = 0u64;
    loop {
        match stream.next().await {
            Ok(Some(re)) => {
                let entry = to_entry(SearchEntry::construct(re));
                digester
                    .add(&entry)
                    .map_err(|e| (e.to_string(), exit::BACKUP_FAILED))?;
                ldif::write(&mut out, [&entry]).map_err(io)?;
                count += 1;
            }
            Ok(None) => break,
            Err(e) => return Err((format!("search: {e}"), exit::UNREACHABLE)),
        }
    }
    let res = stream.finish().await;
    if res.rc != 0 {
        return Err((
            format!(
                "search ended with {} ({}){}",
                super::code_name(res.rc),
                res.rc,
                if res.text.is_empty() {
                    String::new()
                } else {
                    format!(": {}", res.text)
                }
            ),
            exit::BACKUP_FAILED,
        ));
    }
    // Written, not yet synced: the backup syncs its files after the
    // release (the freeze need not wait for the disk).
    out.into_inner().map_err(|e| io(e.into_error()))?;
    Ok((count, digester.finish().to_string()))
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Fail> {
    let path = dir.join(name);
    let mut f = File::create_new(&path).map_err(|e| Fail::io("write", &path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Fail::io("write", &path, e))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `HEADER.txt`: the backup at a glance.
fn header(m: &Manifest) -> String {
    let proxies = &m.proxies;
    let mut s = String::new();
    let _ = writeln!(s, "abproxy backup {}", m.backup_id);
    let _ = writeln!(s, "format:   {}", m.format_version);
    let _ = writeln!(s, "abproxy:  {}", m.abproxy_version);
    let _ = writeln!(s, "proxy:    {}", m.proxy_url);
    if proxies.len() > 1 {
        let _ = writeln!(
            s,
            "proxies:  {} frozen together, exported through the first",
            proxies.len()
        );
        for p in proxies {
            let _ = writeln!(
                s,
                "  {}  freeze id {}",
                p.url,
                p.freeze_id.map_or("?".into(), |i| i.to_string())
            );
        }
    }
    let _ = writeln!(s, "server:   {}", m.server);
    let _ = writeln!(s, "started:  {}", m.started);
    let _ = writeln!(
        s,
        "frozen:   {} to {} (freeze id {}, drained in {} ms)",
        m.freeze.frozen_from,
        m.freeze.frozen_to,
        m.freeze.id.map_or("?".into(), |i| i.to_string()),
        m.freeze.drained_ms.map_or("?".into(), |i| i.to_string()),
    );
    if !m.freeze.released.is_empty() {
        let _ = writeln!(s, "released: {}", m.freeze.released);
    }
    if let Some(inc) = &m.incremental {
        let _ = writeln!(
            s,
            "incremental: after {} (journal cut {}): {} write(s), in {}",
            inc.base_backup_id,
            inc.base_cut,
            inc.writes,
            inc.segments.join(" ")
        );
        let _ = writeln!(
            s,
            "restore:  the base restored, then abproxy journal replay --dir THIS --after BASE"
        );
    }
    if let Some(cut) = m.freeze.journal_cut {
        let _ = writeln!(
            s,
            "journal:  cut {cut} (the writes after it: abproxy journal show --from {})",
            cut + 1
        );
    }
    let _ = writeln!(s, "backends:");
    for b in &m.backends {
        let _ = writeln!(
            s,
            "  {}  {} {}  {} entries  {}  digest {}",
            b.suffix, b.mode, b.method, b.entries, b.file, b.digest
        );
        // Where the server stood, as it says it (what a roll-forward or a
        // replica compares with).
        if let Some(u) = &b.suffix_uuid {
            let _ = writeln!(s, "    suffix entry id {u}");
        }
        if !b.context_csn.is_empty() {
            let _ = writeln!(s, "    contextCSN {}", b.context_csn.join(" "));
        }
        if !b.ruv.is_empty() {
            let _ = writeln!(s, "    RUV {}", b.ruv.join("; "));
        }
        if let Some(usn) = &b.last_usn {
            let _ = writeln!(s, "    last USN {usn}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_resumed_is_read_from_offs_answer() {
        assert_eq!(
            requests_resumed("released after 2.3 s; 3 queued request(s) resumed; freeze id 7"),
            Some(3)
        );
        assert_eq!(requests_resumed("released"), None);
        assert_eq!(requests_resumed(""), None);
    }

    #[test]
    fn backup_file_names_and_times() {
        assert_eq!(file_part("dc=example,dc=org"), "dc_example_dc_org");
        assert_eq!(file_part("o=Ä b/../x"), "o___b_.._x");
        assert_eq!(file_part(""), "root");
        assert_eq!(
            drained_ms("frozen: dc=x; drained in 12 ms; lease 600 s; freeze id 3"),
            Some(12)
        );
        assert_eq!(drained_ms("frozen"), None);
        assert_eq!(
            journal_cut(
                "frozen: dc=x; drained in 12 ms; lease 600 s; freeze id 3; journal cut 1042"
            ),
            Some(1042)
        );
        assert_eq!(journal_cut("frozen: dc=x; freeze id 3"), None);
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_millis(951_782_400_042)),
            "2000-02-29T00:00:00.042Z"
        );
    }

    #[test]
    fn backup_history_line_is_one_json_object() {
        let line = HistoryLine {
            time: "2026-12-03T17:27:12.000Z".into(),
            backup_id: Some("20261203T172711Z-f3".into()),
            result: "ok",
            exit: 0,
            failed_step: None,
            error: None,
            destination: "tar:-".into(),
            backends: vec![HistoryBackend {
                suffix: "dc=example,dc=org".into(),
                entries: 12,
                digest: "ab".repeat(32),
            }],
            bytes: Some(4096),
            frozen_ms: Some(31),
            duration_ms: 57,
        };
        let text = line.to_json();
        assert!(!text.contains('\n'), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["backup_id"], "20261203T172711Z-f3");
        assert_eq!(v["result"], "ok");
        assert_eq!(v["exit"], 0);
        assert!(v["failed_step"].is_null());
        assert_eq!(v["destination"], "tar:-");
        assert_eq!(v["backends"][0]["entries"], 12);
        assert_eq!(v["bytes"], 4096);
        assert_eq!(v["frozen_ms"], 31);
        assert_eq!(v["duration_ms"], 57);

        let failed = HistoryLine {
            backup_id: None,
            result: "failed",
            exit: 2,
            failed_step: Some("check DIR".into()),
            error: Some("/b exists".into()),
            destination: "/b".into(),
            backends: Vec::new(),
            bytes: None,
            frozen_ms: None,
            ..line
        };
        let v: serde_json::Value = serde_json::from_str(&failed.to_json()).unwrap();
        assert!(v["backup_id"].is_null() && v["bytes"].is_null() && v["frozen_ms"].is_null());
        assert_eq!(v["failed_step"], "check DIR");
        assert_eq!(v["exit"], 2);

        // Appended, one line each, created 0644.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        append_history(&path, &failed).unwrap();
        append_history(&path, &failed).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "{mode:o}");
    }

    #[test]
    fn backup_tar_names_and_headers() {
        assert_eq!(
            tar_names(
                "abproxy-X",
                &["b".into(), "SHA256SUMS".into(), "1-a.ldif".into()]
            ),
            [
                "abproxy-X/",
                "abproxy-X/1-a.ldif",
                "abproxy-X/SHA256SUMS",
                "abproxy-X/b"
            ]
        );
        assert_eq!(
            staging_dir(Path::new("/var/tmp"), 42),
            Path::new("/var/tmp/abproxy-backup.partial-42")
        );
        assert_eq!(
            parse_utc_secs("2000-02-29T00:00:01.042Z"),
            Some(951_782_401)
        );
        assert_eq!(parse_utc_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc_secs("nonsense"), None);

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("manifest.json"), "{}\n").unwrap();
        fs::write(dir.path().join("1-dc_x.ldif"), "dn: dc=x\n\n").unwrap();
        let long = format!("2-{}.ldif", "dc_x_".repeat(30));
        fs::write(dir.path().join(&long), "").unwrap();
        let bytes =
            write_tar(Vec::new(), dir.path(), "20261203T172711Z-f3", 1_796_318_831).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let again =
            write_tar(Vec::new(), dir.path(), "20261203T172711Z-f3", 1_796_318_831).unwrap();
        assert_eq!(bytes, again, "deterministic");
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            assert_eq!(h.mtime().unwrap(), 1_796_318_831, "{path}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{path}");
            let mut body = String::new();
            std::io::Read::read_to_string(&mut e, &mut body).unwrap();
            if path.ends_with('/') {
                assert_eq!(h.entry_type(), tar::EntryType::Directory);
                assert_eq!(h.mode().unwrap(), 0o755);
            } else {
                assert_eq!(h.mode().unwrap(), 0o644, "{path}");
                let name = path.rsplit('/').next().unwrap();
                assert_eq!(body, fs::read_to_string(dir.path().join(name)).unwrap());
            }
            seen.push(path);
        }
        let id = "20261203T172711Z-f3";
        assert_eq!(
            seen,
            [
                format!("{id}/"),
                format!("{id}/1-dc_x.ldif"),
                format!("{id}/{long}"),
                format!("{id}/manifest.json"),
            ]
        );
    }

    #[test]
    fn backup_entry_keeps_binary_values() {
        let mut se = SearchEntry {
            dn: "cn=a,dc=x".into(),
            attrs: Default::default(),
            bin_attrs: Default::default(),
        };
        se.attrs.insert("cn".into(), vec!["a".into()]);
        se.bin_attrs
            .insert("jpegPhoto".into(), vec![vec![0xff, 0, 1]]);
        let e = to_entry(se);
        assert_eq!(
            e.attrs,
            vec![
                ("cn".to_string(), vec![b"a".to_vec()]),
                ("jpegPhoto".to_string(), vec![vec![0xff, 0, 1]])
            ]
        );
    }
}
