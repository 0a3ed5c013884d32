//! The `openldap` driver: makes slapd itself refuse writes to a frozen
//! backend, so that updates that do not pass through the proxy (local ldapi
//! clients, replication consumers writing into it) cannot change the files
//! being copied either.
//!
//! PREPARE connects to slapd's `cn=config` (by default over ldapi with SASL
//! EXTERNAL, as root usually may; or with a simple bind), finds the database
//! whose `olcSuffix` is the backend's suffix, remembers its `olcReadOnly` and
//! sets it to TRUE. DONE puts the previous value back (or removes the
//! attribute if it was absent).
//!
//! Durability with `olcDbNoSync: TRUE` (or `olcDbEnvFlags` `nosync`,
//! `nometasync`, `mapasync`): back-mdb then commits without (full) fsync,
//! so committed transactions may sit in the page cache only. A copy
//! of the files reads the page cache and is consistent anyway, but the
//! proposal's PREPARE promises data on disk: a snapshot taken below the
//! host's filesystem (SAN, hypervisor, cloud disk) sees only what is on
//! disk, and would miss the last acknowledged writes. slapd 2.5/2.6 offers
//! no synchronous way to ask for that over `cn=config`
//! (servers/slapd/back-mdb/config.c): changing `olcDbNoSync` only flips the
//! environment flag (`mdb_env_set_flags`, no sync); adding `olcDbCheckpoint`
//! schedules the
//! `mdb_checkpoint` task, which calls `mdb_env_sync(env, 1)` later in a
//! pool thread and reports nothing back; the only synchronous sync is in
//! `mdb_db_close`, reached by changes that close and reopen the database
//! (`olcDbDirectory`, some `olcDbEnvFlags`), which cuts off readers and
//! stops slapd if the reopen fails. So after setting `olcReadOnly` (no
//! commit can follow), PREPARE itself calls fsync(2) on `data.mdb` in the
//! database's `olcDbDirectory` and on the directory: the kernel writes the
//! file's dirty pages, whoever dirtied them (back-mdb's `pwrite`s, or its
//! shared memory map with `writemap`). That needs the proxy to run on the
//! slapd host (`config_url` over ldapi or loopback) and to be allowed to
//! open the file for reading; otherwise PREPARE fails with a message that
//! says so, before anything is changed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::future::BoxFuture;
use ldap3::{Mod, Scope, SearchEntry};
use tracing::info;

use super::backend::Backend;
use super::cnconfig::Saved;
use super::engine::Driver;

/// How the driver reaches `cn=config`.
#[derive(Debug)]
pub struct OpenLdapDriver {
    url: String,
    bind: Option<(String, String)>,
    /// Previous olcReadOnly per database DN (None: absent), between PREPARE
    /// and DONE.
    saved: Saved,
}

impl OpenLdapDriver {
    /// A driver talking to `url` (ldap:// or ldapi://), with a simple bind
    /// when `bind` is given, else SASL EXTERNAL.
    pub fn new(url: String, bind: Option<(String, String)>) -> Self {
        OpenLdapDriver {
            url,
            bind,
            saved: Saved::default(),
        }
    }

    async fn connect(&self) -> Result<ldap3::Ldap, String> {
        super::cnconfig::connect(&self.url, self.bind.as_ref()).await
    }

    /// The cn=config entry of the database holding `suffix`, with its
    /// olcReadOnly and olcDbNoSync values.
    async fn database(ldap: &mut ldap3::Ldap, suffix: &str) -> Result<SearchEntry, String> {
        let filter = format!(
            "(&(objectClass=olcDatabaseConfig)(olcSuffix={}))",
            ldap3::ldap_escape(suffix)
        );
        let (entries, res) = ldap
            .search(
                "cn=config",
                Scope::OneLevel,
                &filter,
                vec![
                    "olcReadOnly",
                    "olcDbNoSync",
                    "olcDbEnvFlags",
                    "olcDbDirectory",
                ],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("cannot read cn=config: {e}"))?;
        let _ = res;
        let mut dbs: Vec<SearchEntry> = entries.into_iter().map(SearchEntry::construct).collect();
        match dbs.len() {
            1 => Ok(dbs.remove(0)),
            0 => Err(format!("no database with olcSuffix {suffix} in cn=config")),
            n => Err(format!(
                "{n} databases with olcSuffix {suffix} in cn=config"
            )),
        }
    }

    async fn set_read_only(
        ldap: &mut ldap3::Ldap,
        dn: &str,
        value: Option<&str>,
    ) -> Result<(), String> {
        let m = match value {
            Some(v) => Mod::Replace("olcReadOnly", [v].into_iter().collect()),
            None => Mod::Replace("olcReadOnly", Default::default()),
        };
        ldap.modify(dn, vec![m])
            .await
            .and_then(|r| r.success())
            .map(|_| ())
            .map_err(|e| format!("cannot set olcReadOnly on {dn}: {e}"))
    }

    async fn prepare_inner(&self, b: &Backend) -> Result<(), String> {
        let mut ldap = self.connect().await?;
        let db = Self::database(&mut ldap, &b.suffix).await?;
        let previous = db.attrs.get("olcReadOnly").and_then(|v| v.first()).cloned();
        let nosync = commits_skip_fsync(&db.attrs);
        // With NoSync, open the files first: when the proxy cannot make the
        // data durable, fail before changing anything.
        let files = if let Some(nosync) = nosync {
            let dir = db
                .attrs
                .get("olcDbDirectory")
                .and_then(|v| v.first())
                .map(PathBuf::from);
            Some(
                DbFiles::open(&self.url, dir.as_deref())
                    .map_err(|e| format!("{}: commits without fsync ({nosync}): {e}", db.dn))?,
            )
        } else {
            None
        };
        // Recorded first: this step may be dropped (its deadline) while the
        // modify is on its way.
        self.saved.record(b, db.dn.clone(), previous.clone()).await;
        Self::set_read_only(&mut ldap, &db.dn, Some("TRUE")).await?;
        info!(backend = %b.suffix, database = %db.dn, "olcReadOnly set to TRUE");
        if let Some(files) = files {
            // No commit can follow now; write what earlier ones left in the
            // page cache. On failure put olcReadOnly back: the engine runs
            // DONE only for the backends whose PREPARE succeeded.
            let started = Instant::now();
            let synced = tokio::task::spawn_blocking(move || files.sync())
                .await
                .map_err(|e| format!("fsync task: {e}"))
                .and_then(|r| r);
            match synced {
                Ok(path) => info!(
                    backend = %b.suffix,
                    file = %path.display(),
                    ms = started.elapsed().as_millis() as u64,
                    "commits without fsync: fsynced the database file"
                ),
                Err(e) => {
                    let undo = Self::set_read_only(&mut ldap, &db.dn, previous.as_deref()).await;
                    if undo.is_ok() {
                        self.saved.forget(b).await;
                    }
                    let _ = ldap.unbind().await;
                    return Err(match undo {
                        Ok(()) => format!("{}: {e}", db.dn),
                        Err(u) => format!("{}: {e}; and {u}", db.dn),
                    });
                }
            }
        }
        let _ = ldap.unbind().await;
        Ok(())
    }

    async fn done_inner(&self, b: &Backend) -> Result<(), String> {
        // Kept until restored, so a later DONE (OFF again, the next start)
        // can retry.
        let Some((dn, previous)) = self.saved.get(b) else {
            return Ok(()); // prepare never changed anything
        };
        let mut ldap = self.connect().await?;
        let r = Self::set_read_only(&mut ldap, &dn, previous.as_deref()).await;
        if r.is_ok() {
            self.saved.forget(b).await;
            info!(backend = %b.suffix, database = %dn, previous = ?previous, "olcReadOnly restored");
        }
        let _ = ldap.unbind().await;
        r
    }
}

impl Driver for OpenLdapDriver {
    fn prepare<'a>(
        &'a self,
        backend: &'a Backend,
        _freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.prepare_inner(backend))
    }

    fn done<'a>(
        &'a self,
        backend: &'a Backend,
        _freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.done_inner(backend))
    }

    fn attach_state(&self, state: std::sync::Arc<super::state::StateFile>, name: &'static str) {
        self.saved.attach(state, name);
    }
}

/// Why back-mdb commits of this database may not be on disk, from its
/// cn=config entry: `olcDbNoSync: TRUE`, or `olcDbEnvFlags` with `nosync`,
/// `nometasync` or `mapasync`; None: every commit is synced.
fn commits_skip_fsync(attrs: &std::collections::HashMap<String, Vec<String>>) -> Option<String> {
    let values = |a: &str| attrs.get(a).into_iter().flatten();
    if values("olcDbNoSync").any(|v| v.eq_ignore_ascii_case("TRUE")) {
        return Some("olcDbNoSync: TRUE".into());
    }
    values("olcDbEnvFlags")
        .find(|v| {
            ["nosync", "nometasync", "mapasync"]
                .iter()
                .any(|f| v.eq_ignore_ascii_case(f))
        })
        .map(|v| format!("olcDbEnvFlags: {v}"))
}

/// The files of a back-mdb database, opened for fsync(2).
struct DbFiles {
    data: File,
    data_path: PathBuf,
    dir: File,
}

impl DbFiles {
    /// Opens `DIR/data.mdb` and `DIR` for reading, if the database is on
    /// this host (`config_url` over ldapi or loopback).
    fn open(config_url: &str, dir: Option<&Path>) -> Result<DbFiles, String> {
        if !is_local(config_url) {
            return Err(format!(
                "the proxy can only make the data durable when slapd runs on its host \
                 (config_url over ldapi:// or loopback, not {config_url}); set olcDbNoSync \
                 to FALSE, or use the command driver to sync on the slapd host"
            ));
        }
        let dir = dir.ok_or("the database has no olcDbDirectory")?;
        if !dir.is_absolute() {
            return Err(format!(
                "olcDbDirectory {} is relative; cannot find its files",
                dir.display()
            ));
        }
        let advice = "run abproxy as a user that may read the database directory \
                      (e.g. as slapd's user, or with CAP_DAC_READ_SEARCH), or set \
                      olcDbNoSync to FALSE";
        let data_path = dir.join("data.mdb");
        let data = File::open(&data_path).map_err(|e| {
            format!(
                "cannot open {} to fsync it: {e}; {advice}",
                data_path.display()
            )
        })?;
        let dir = File::open(dir)
            .map_err(|e| format!("cannot open {} to fsync it: {e}; {advice}", dir.display()))?;
        Ok(DbFiles {
            data,
            data_path,
            dir,
        })
    }

    /// fsync(2) of the data file, then of the directory; returns the file's
    /// path.
    fn sync(self) -> Result<PathBuf, String> {
        self.data
            .sync_all()
            .map_err(|e| format!("fsync {}: {e}", self.data_path.display()))?;
        self.dir.sync_all().map_err(|e| {
            format!(
                "fsync of the directory of {}: {e}",
                self.data_path.display()
            )
        })?;
        Ok(self.data_path)
    }
}

/// Whether `url` reaches a server on this host: ldapi, or ldap:// to a
/// loopback address or `localhost`.
fn is_local(url: &str) -> bool {
    match crate::endpoint::Endpoint::parse(url) {
        Ok(crate::endpoint::Endpoint::Unix(_)) => true,
        Ok(crate::endpoint::Endpoint::Tcp(addr) | crate::endpoint::Endpoint::Tls(addr)) => {
            let host = match addr.rsplit_once(':') {
                Some((h, _)) => h,
                None => addr.as_str(),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_config_urls() {
        assert!(is_local("ldapi:///run/slapd/ldapi"));
        assert!(is_local("ldapi://%2Frun%2Fslapd%2Fldapi"));
        assert!(is_local("ldap://127.0.0.1:389"));
        assert!(is_local("ldap://127.0.0.2:1389"));
        assert!(is_local("ldap://localhost:389"));
        assert!(is_local("ldap://[::1]:389"));
        assert!(!is_local("ldap://192.0.2.1:389"));
        assert!(!is_local("ldap://ldap.example.org:389"));
        assert!(!is_local("not a url"));
    }

    #[test]
    fn which_databases_commit_without_fsync() {
        let attrs = |pairs: &[(&str, &str)]| {
            let mut m: std::collections::HashMap<String, Vec<String>> = Default::default();
            for (k, v) in pairs {
                m.entry(k.to_string()).or_default().push(v.to_string());
            }
            m
        };
        assert_eq!(commits_skip_fsync(&attrs(&[])), None);
        assert_eq!(
            commits_skip_fsync(&attrs(&[("olcDbNoSync", "FALSE")])),
            None
        );
        assert_eq!(
            commits_skip_fsync(&attrs(&[("olcDbNoSync", "TRUE")])).as_deref(),
            Some("olcDbNoSync: TRUE")
        );
        assert_eq!(
            commits_skip_fsync(&attrs(&[
                ("olcDbEnvFlags", "writemap"),
                ("olcDbEnvFlags", "mapasync")
            ]))
            .as_deref(),
            Some("olcDbEnvFlags: mapasync")
        );
        assert_eq!(
            commits_skip_fsync(&attrs(&[("olcDbEnvFlags", "nometasync")])).as_deref(),
            Some("olcDbEnvFlags: nometasync")
        );
        assert_eq!(
            commits_skip_fsync(&attrs(&[("olcDbEnvFlags", "writemap")])),
            None
        );
    }

    #[test]
    fn unusable_directories_are_refused_with_the_reason() {
        let e = DbFiles::open("ldap://192.0.2.1:389", Some(Path::new("/var/lib/ldap")))
            .err()
            .unwrap();
        assert!(e.contains("slapd runs on its host"), "{e}");
        let e = DbFiles::open("ldapi:///x", None).err().unwrap();
        assert!(e.contains("no olcDbDirectory"), "{e}");
        let e = DbFiles::open("ldapi:///x", Some(Path::new("var/lib/ldap")))
            .err()
            .unwrap();
        assert!(e.contains("relative"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = DbFiles::open("ldapi:///x", Some(dir.path())).err().unwrap();
        assert!(e.contains("data.mdb to fsync it"), "{e}");
        std::fs::write(dir.path().join("data.mdb"), b"x").unwrap();
        let f = DbFiles::open("ldapi:///x", Some(dir.path())).unwrap();
        assert_eq!(f.sync().unwrap(), dir.path().join("data.mdb"));
    }
}
