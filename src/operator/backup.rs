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
//! Only the `ldif` method. In `readonly` and in `stop` mode: the proxy
//! lets the freeze holder's own searches through a `stop` freeze.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Scope, SearchEntry};

use super::{
    exit, format_utc, freeze_held, release_held, BackendModeName, ClientTls, FreezeRequest,
    Progress, Session, Signals, Target,
};
use crate::backup::manifest::{
    file_sha256, BackendRecord, FileRecord, FreezeInfo, Manifest, ServerInfo, FORMAT_VERSION,
    MANIFEST, SHA256SUMS,
};
use crate::backup::{ldif, Digester, Entry};

/// Entries per page of the export search.
pub const PAGE_SIZE: i32 = 500;
/// Limit of the small searches (root DSE, contextCSN) and of the status.
const SMALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `abproxy backup`: where to connect, what to freeze, where to write.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// The proxy.
    pub target: Target,
    /// TLS to the proxy.
    pub tls: ClientTls,
    /// The freeze (holdUntilUnbind is set whatever this says).
    pub request: FreezeRequest,
    /// Limit for connecting, binding and ON.
    pub on_timeout: Duration,
    /// Limit for OFF.
    pub off_timeout: Duration,
    /// The backup directory (must not exist).
    pub to: PathBuf,
}

/// A failed step: what to print and the exit status.
pub(super) struct Fail {
    step: String,
    message: String,
    code: u8,
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
    let (_, tail) = message.split_once("drained in ")?;
    let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
    tail[..digits].parse().ok()
}

/// `abproxy backup`. Returns the exit status.
pub async fn backup(spec: BackupSpec, progress: &Progress) -> u8 {
    let to = &spec.to;
    if fs::symlink_metadata(to).is_ok() {
        progress.line(format!(
            "error: {} exists; a backup is never written over anything: give a new directory",
            to.display()
        ));
        return exit::USAGE;
    }
    let Some(name) = to.file_name() else {
        progress.line(format!(
            "error: {} does not name a directory to create",
            to.display()
        ));
        return exit::USAGE;
    };
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        "{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            progress.line(format!("error: cannot catch signals: {e}"));
            return 1;
        }
    };
    if let Err(e) = fs::create_dir(&tmp) {
        progress.line(format!(
            "error: cannot create the temporary directory {}: {e}",
            tmp.display()
        ));
        return exit::BACKUP_FAILED;
    }
    match take(&spec, &tmp, &mut signals, progress).await {
        Ok(()) => exit::OK,
        Err(f) => {
            if !f.message.is_empty() {
                progress.line(format!("error: {} failed: {}", f.step, f.message));
            }
            match fs::remove_dir_all(&tmp) {
                Ok(()) => progress.line(format!("no backup written at {}", to.display())),
                Err(e) => progress.line(format!(
                    "error: cannot remove the temporary directory {}: {e}",
                    tmp.display()
                )),
            }
            f.code
        }
    }
}

/// Freeze, export, release, write the backup into `tmp`, rename it.
async fn take(
    spec: &BackupSpec,
    tmp: &Path,
    signals: &mut Signals,
    progress: &Progress,
) -> Result<(), Fail> {
    let mut log = Log {
        lines: Vec::new(),
        progress: progress.clone(),
    };
    let started = SystemTime::now();
    let url = &spec.target.url;

    let t = log.begin();
    let (mut session, frozen) = freeze_held(
        &spec.target,
        &spec.tls,
        &spec.request,
        spec.on_timeout,
        signals,
        "nothing was backed up",
        progress,
    )
    .await
    // freeze_held has said why.
    .map_err(|code| Fail::new("freeze (ON)", "", code))?;
    let frozen_from = SystemTime::now();
    log.end(t, "freeze (ON)", &frozen.message);

    let exported = tokio::select! {
        r = export_all(&mut session, tmp, &mut log) => r,
        sig = signals.recv() => Err(Fail::new(
            "export",
            format!("signal {sig} received"),
            128u8.wrapping_add(sig as u8),
        )),
    };

    // OFF, always, on the same connection.
    let t = log.begin();
    let off = release_held(
        &mut session,
        &frozen,
        url,
        spec.off_timeout,
        "the export ended",
        progress,
    )
    .await;
    let frozen_to = SystemTime::now();
    session.close().await;
    let (server, backends) = exported?;
    if let Some(code) = off {
        return Err(Fail::new(
            "release (OFF)",
            "the freeze did not last until the export ended, or could not be released: \
             the export may be inconsistent and is not kept",
            code,
        ));
    }
    log.end(t, "release (OFF)", "released");

    // The files.
    let t = log.begin();
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
            frozen_from: utc(frozen_from),
            frozen_to: utc(frozen_to),
            message: frozen.message.clone(),
        },
        backends,
        files: Vec::new(),
    };
    let header = header(&manifest);
    write_file(tmp, "HEADER.txt", header.as_bytes())?;
    log.end(t, "write HEADER.txt", &format!("{} bytes", header.len()));
    let mut text = log.lines.join("\n");
    text.push('\n');
    write_file(tmp, "backup.log", text.as_bytes())?;
    let mut names: Vec<String> = manifest.backends.iter().map(|b| b.file.clone()).collect();
    names.push("HEADER.txt".into());
    names.push("backup.log".into());
    for name in names {
        let path = tmp.join(&name);
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
    let (_, sha) = file_sha256(&path).map_err(|e| Fail::io("checksums", &path, e))?;
    let _ = writeln!(sums, "{sha}  {MANIFEST}");
    write_file(tmp, SHA256SUMS, sums.as_bytes())?;
    sync_dir(tmp).map_err(|e| Fail::io("sync", tmp, e))?;
    if fs::symlink_metadata(&spec.to).is_ok() {
        return Err(Fail::new(
            "rename",
            format!("{} appeared during the backup", spec.to.display()),
            exit::BACKUP_FAILED,
        ));
    }
    fs::rename(tmp, &spec.to).map_err(|e| Fail::io("rename", &spec.to, e))?;
    if let Some(parent) = spec.to.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = sync_dir(parent);
    }
    progress.line(format!(
        "backup {} written to {}",
        manifest.backup_id,
        spec.to.display()
    ));
    Ok(())
}

/// The frozen backends' exports, with the server's root DSE.
async fn export_all(
    session: &mut Session,
    tmp: &Path,
    log: &mut Log,
) -> Result<(ServerInfo, Vec<BackendRecord>), Fail> {
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

    let work = async {
        let mut out = Vec::new();
        for (i, (suffix, mode)) in suffixes.iter().enumerate() {
            let t = log.begin();
            let context_csn = context_csn(session, suffix).await?;
            let file = format!("{}-{}.ldif", i + 1, file_part(suffix));
            let step = format!("export {suffix}");
            let (entries, digest) = export(session, suffix, &tmp.join(&file))
                .await
                .map_err(|(m, code)| Fail::new(step.clone(), m, code))?;
            log.end(
                t,
                &step,
                &format!("{entries} entries to {file}, digest {digest}"),
            );
            out.push(BackendRecord {
                suffix: suffix.clone(),
                mode: mode.as_str().into(),
                method: "ldif".into(),
                entries,
                context_csn,
                digest,
                file,
            });
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
    Ok((server, backends))
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
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
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
    let mut s = String::new();
    let _ = writeln!(s, "abproxy backup {}", m.backup_id);
    let _ = writeln!(s, "format:   {}", m.format_version);
    let _ = writeln!(s, "abproxy:  {}", m.abproxy_version);
    let _ = writeln!(s, "proxy:    {}", m.proxy_url);
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
    let _ = writeln!(s, "backends:");
    for b in &m.backends {
        let _ = writeln!(
            s,
            "  {}  {} {}  {} entries  {}  digest {}",
            b.suffix, b.mode, b.method, b.entries, b.file, b.digest
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
            utc(UNIX_EPOCH + Duration::from_millis(951_782_400_042)),
            "2000-02-29T00:00:00.042Z"
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
