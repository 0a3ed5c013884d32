//! `abproxy backup --method 389 --server URL`: 389 Directory Server's own
//! online backup, taken while the proxy holds the writes.
//!
//! The backup task is added over a direct connection to the server (the
//! proxy rightly holds a write under `cn=config` during a freeze: a task
//! may rewrite a frozen database), bound as the operator:
//! `cn=abproxy-ID,cn=backup,cn=tasks,cn=config` with `nsArchiveDir` in the
//! server's `nsslapd-bakdir`, as `dsconf INSTANCE backup create` does. The
//! freeze lasts until the task reports its exit code (polled every 100 ms,
//! within the freeze's lease). After the release, on the server's host,
//! each frozen backend's `id2entry.db` in the archive is counted and
//! digested with 389's `dbscan` ([`crate::backup::ds389`]), the archive
//! directory becomes one file of the backup (`389-backup.tar`, what
//! `dsctl INSTANCE bak2db` restores once unpacked) and the server's copy
//! is removed.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ldap3::{Scope, SearchEntry};

use super::{exit, first, BackendRecord, Fail, Log, Session, DATA_LIMIT, SMALL_TIMEOUT};
use crate::backup::ds389;
use crate::backup::manifest::Ds389Archive;

pub(super) use crate::backup::ds389::ARCHIVE;

/// How often the task's entry is read.
const POLL: Duration = Duration::from_millis(100);

/// The frozen suffixes' backends (`cn` of each `nsBackendInstance` under
/// `cn=ldbm database,cn=plugins,cn=config`), in the order of `suffixes`;
/// a suffix that is not a 389 DS database is an error.
pub(super) async fn backends(
    server: &mut Session,
    suffixes: &[String],
) -> Result<Vec<String>, Fail> {
    let step = "389 backends";
    let search = server.ldap().search(
        "cn=ldbm database,cn=plugins,cn=config",
        Scope::OneLevel,
        "(objectClass=nsBackendInstance)",
        vec!["cn", "nsslapd-suffix"],
    );
    let (entries, _) = tokio::time::timeout(SMALL_TIMEOUT, search)
        .await
        .map_err(|_| Fail::new(step, "no answer within 30 s", exit::TIMEOUT))?
        .map_err(|e| Fail::new(step, e, exit::UNREACHABLE))?
        .success()
        .map_err(|e| {
            Fail::new(
                step,
                format!("{e} (the bind DN must read cn=config: Directory Manager)"),
                exit::BACKUP_FAILED,
            )
        })?;
    let found: Vec<(String, String)> = entries
        .into_iter()
        .map(SearchEntry::construct)
        .filter_map(|e| Some((first(&e, "cn")?, first(&e, "nsslapd-suffix")?)))
        .collect();
    let norm = |s: &str| crate::freeze::dn::NormDn::parse(s.as_bytes());
    suffixes
        .iter()
        .map(|suffix| {
            found
                .iter()
                .find(|(_, s)| norm(s).is_some() && norm(s) == norm(suffix))
                .map(|(name, _)| name.clone())
                .ok_or_else(|| {
                    let known: Vec<&str> = found.iter().map(|(_, s)| s.as_str()).collect();
                    Fail::new(
                        step,
                        format!(
                            "{suffix} is not a database of this 389 DS server (its databases: {})",
                            known.join(", ")
                        ),
                        exit::BACKUP_FAILED,
                    )
                })
        })
        .collect()
}

/// The server's backup directory (`nsslapd-bakdir` of `cn=config`).
pub(super) async fn bakdir(server: &mut Session) -> Result<String, Fail> {
    let step = "389 backup directory";
    let e = super::base_entry(server, step, "cn=config", vec!["nsslapd-bakdir"]).await?;
    e.as_ref()
        .and_then(|e| first(e, "nsslapd-bakdir"))
        .ok_or_else(|| {
            Fail::new(
                step,
                "cn=config has no nsslapd-bakdir (not a 389 DS server, or the bind DN cannot \
                 read cn=config)",
                exit::BACKUP_FAILED,
            )
        })
}

/// Adds the backup task `cn=NAME,cn=backup,cn=tasks,cn=config` writing to
/// `archive` and waits for its exit code (the caller's deadline bounds the
/// wait). Its status line, or the task's log in the error.
pub(super) async fn backup_task(
    server: &mut Session,
    name: &str,
    archive: &str,
) -> Result<String, Fail> {
    let step = "389 backup task";
    let dn = format!("cn={name},cn=backup,cn=tasks,cn=config");
    let set = |v: &str| HashSet::from([v.to_string()]);
    let attrs = vec![
        ("objectClass".to_string(), {
            let mut s = set("top");
            s.insert("extensibleObject".into());
            s
        }),
        ("cn".to_string(), set(name)),
        ("nsArchiveDir".to_string(), set(archive)),
        ("nsDatabaseType".to_string(), set("ldbm database")),
    ];
    tokio::time::timeout(SMALL_TIMEOUT, server.ldap().add(&dn, attrs))
        .await
        .map_err(|_| Fail::new(step, "no answer within 30 s", exit::TIMEOUT))?
        .map_err(|e| Fail::new(step, e, exit::UNREACHABLE))?
        .success()
        .map_err(|e| Fail::new(step, format!("adding {dn}: {e}"), exit::BACKUP_FAILED))?;
    loop {
        let e = super::base_entry(
            server,
            step,
            &dn,
            vec!["nsTaskExitCode", "nsTaskStatus", "nsTaskLog"],
        )
        .await?
        .ok_or_else(|| Fail::new(step, format!("{dn} is gone"), exit::BACKUP_FAILED))?;
        if let Some(code) = first(&e, "nsTaskExitCode") {
            let status = first(&e, "nsTaskStatus").unwrap_or_default();
            if code.trim() == "0" {
                return Ok(format!("{dn}: {status}"));
            }
            let log = first(&e, "nsTaskLog").unwrap_or_default();
            return Err(Fail::new(
                step,
                format!("{dn} ended with exit code {code}: {status}\n{log}"),
                exit::BACKUP_FAILED,
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// After the release: each backend counted and digested from the archive,
/// the archive written into `tmp` as [`ARCHIVE`], the server's copy
/// removed.
pub(super) async fn complete(
    backends: &mut [BackendRecord],
    tmp: &Path,
    log: &mut Log,
) -> Result<(), Fail> {
    let Some(archive) = backends
        .iter()
        .find_map(|b| b.ds389.as_ref())
        .map(|d| d.archive_dir.clone())
    else {
        return Ok(());
    };
    let dir = Path::new(&archive);
    if !dir.is_dir() {
        return Err(Fail::new(
            "389 archive",
            format!(
                "{archive} (written by the server) is not on this host: run abproxy backup \
                 --method 389 on the server's host, or use --method ldif; the archive stays \
                 on the server"
            ),
            exit::BACKUP_FAILED,
        ));
    }
    for b in backends.iter_mut() {
        let Some(d) = &b.ds389 else { continue };
        let t = log.begin();
        let step = format!("count {}", b.suffix);
        let scratch = tempfile::tempdir().map_err(|e| Fail::io(step.clone(), tmp, e))?;
        let c = ds389::contents(
            &ds389::id2entry(dir, &d.backend),
            &b.suffix,
            scratch.path(),
            DATA_LIMIT,
        )
        .await
        .map_err(|e| Fail::new(step.clone(), e, exit::BACKUP_FAILED))?;
        super::same_database(b, c.suffix_uuid.as_deref(), "the 389 archive")?;
        (b.entries, b.digest) = (c.entries, c.digest);
        log.end(
            t,
            &step,
            &format!(
                "dbscan of {}: {} entries, digest {}",
                d.backend, b.entries, b.digest
            ),
        );
    }
    let t = log.begin();
    let to = tmp.join(ARCHIVE);
    let out = File::create(&to).map_err(|e| Fail::io("389 archive", &to, e))?;
    let out = tar_tree(out, dir).map_err(|e| Fail::io("389 archive", dir, e))?;
    out.sync_all()
        .map_err(|e| Fail::io("389 archive", &to, e))?;
    let size = fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
    fs::remove_dir_all(dir).map_err(|e| Fail::io("389 archive", dir, e))?;
    log.end(
        t,
        "389 archive",
        &format!("{archive} to {ARCHIVE} ({size} bytes); the server's copy removed"),
    );
    Ok(())
}

/// A failed backup: the archive the server wrote for it is removed (it is
/// not a backup anyone asked for, and a failing nightly run would fill the
/// server's disk), and said.
pub(super) fn discard(backends: &[BackendRecord], progress: &super::Progress) {
    let Some(dir) = backends
        .iter()
        .find_map(|b| b.ds389.as_ref())
        .map(|d| d.archive_dir.clone())
    else {
        return;
    };
    match fs::remove_dir_all(&dir) {
        Ok(()) => progress.line(format!("removed the server's archive {dir}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => progress.line(format!(
            "error: cannot remove the server's archive {dir}: {e}; remove it by hand"
        )),
    }
}

/// The tree below `dir` as a tar archive, names relative to `dir`, sorted,
/// directories before what they hold; modes and times as on disk, owner
/// as numbers (root restores it; `dsctl bak2db` wants the server's user).
pub(super) fn tar_tree<W: Write>(out: W, dir: &Path) -> std::io::Result<W> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(dir.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = dir.join(&rel);
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                b.append_dir(&rel, &path)?;
                subdirs.push(rel);
            } else if meta.is_file() {
                b.append_path_with_name(&path, &rel)?;
            } else {
                return Err(std::io::Error::other(format!(
                    "{}: neither a file nor a directory",
                    path.display()
                )));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    b.into_inner()
}

/// The record of a backend backed up by the task.
pub(super) fn archive_record(backend: &str, archive_dir: &str) -> Ds389Archive {
    Ds389Archive {
        backend: backend.into(),
        archive_dir: archive_dir.into(),
    }
}
