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
//!
//! Partial freezes (an ON whose dnSet leaves some backends out): `refint`
//! rewrites references to a deleted or renamed entry and `memberof`
//! maintains `memberOf` on the members of a changed group, as internal
//! writes that `olcReadOnly` does not stop. Configured on the frontend
//! database (`olcDatabase={-1}frontend`, global), refint searches and
//! rewrites every database: deleting an entry in an unfrozen database
//! changes a frozen one (verified with slapd 2.5). Configured on one
//! database, both search and write that database only (refint from the
//! database's suffix, memberof through the database itself; verified too),
//! which with glue includes the databases subordinate to it. Before a
//! partial freeze the driver reads every overlay entry under `cn=config`,
//! takes the database each is configured on (the entry's parent) and
//! refuses the freeze, with the reason, when a `refint` or `memberof`
//! overlay is
//! - global: a write to any unfrozen database can change a frozen one;
//! - on a database that is not frozen (a suffix whose backend is not in the
//!   freeze) while a frozen backend lies below one of its suffixes (a
//!   subordinate database, reached through glue);
//! - under an entry that is no database the driver can find.
//!
//! An overlay on frozen databases is fine (the writes that trigger it are
//! held), and so is one on an unfrozen database with no frozen backend
//! below it. A freeze of every backend (no dnSet) is never refused for
//! this: every write that could trigger an overlay is held.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::future::BoxFuture;
use ldap3::{Mod, Scope, SearchEntry};
use tracing::info;

use super::cnconfig::Saved;
use super::{Driver, DriverError, DriverErrorKind};
use crate::freeze::backend::Backend;
use crate::secret::Credentials;

/// How the driver reaches `cn=config`.
#[derive(Debug)]
pub struct OpenLdapDriver {
    url: String,
    bind: Option<Credentials>,
    /// Previous olcReadOnly per database DN (None: absent), between PREPARE
    /// and DONE.
    saved: Saved,
}

impl OpenLdapDriver {
    /// A driver talking to `url` (ldap:// or ldapi://), with a simple bind
    /// when `bind` is given, else SASL EXTERNAL.
    pub fn new(url: String, bind: Option<Credentials>) -> Self {
        OpenLdapDriver {
            url,
            bind,
            saved: Saved::default(),
        }
    }

    async fn connect(&self) -> Result<ldap3::Ldap, DriverError> {
        super::cnconfig::connect(&self.url, self.bind.as_ref()).await
    }

    /// The cn=config entry of the database holding `suffix`, with its
    /// olcReadOnly and olcDbNoSync values.
    async fn database(ldap: &mut ldap3::Ldap, suffix: &str) -> Result<SearchEntry, DriverError> {
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
                    "olcLastBind",
                    "olcDbNoSync",
                    "olcDbEnvFlags",
                    "olcDbDirectory",
                ],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| DriverError::ldap("cannot read cn=config", e))?;
        let _ = res;
        let mut dbs: Vec<SearchEntry> = entries.into_iter().map(SearchEntry::construct).collect();
        match dbs.len() {
            1 => Ok(dbs.remove(0)),
            0 => Err(DriverError::new(
                DriverErrorKind::Config,
                format!("no database with olcSuffix {suffix} in cn=config"),
            )),
            n => Err(DriverError::new(
                DriverErrorKind::Config,
                format!("{n} databases with olcSuffix {suffix} in cn=config"),
            )),
        }
    }

    async fn set_read_only(
        ldap: &mut ldap3::Ldap,
        dn: &str,
        value: Option<&str>,
    ) -> Result<(), DriverError> {
        let m = match value {
            Some(v) => Mod::Replace("olcReadOnly", [v].into_iter().collect()),
            None => Mod::Replace("olcReadOnly", Default::default()),
        };
        ldap.modify(dn, vec![m])
            .await
            .and_then(|r| r.success())
            .map(|_| ())
            .map_err(|e| DriverError::ldap(format!("cannot set olcReadOnly on {dn}"), e))
    }

    async fn prepare_inner(&self, b: &Backend) -> Result<(), DriverError> {
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
            Some(DbFiles::open(&self.url, dir.as_deref()).map_err(|e| {
                e.context(format_args!("{}: commits without fsync ({nosync})", db.dn))
            })?)
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
                .map_err(|e| DriverError::with_source(DriverErrorKind::Io, "fsync task", e))
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
                    let e = e.context(&db.dn);
                    return Err(match undo {
                        Ok(()) => e,
                        Err(u) => e.undo_failed(u),
                    });
                }
            }
        }
        let _ = ldap.unbind().await;
        Ok(())
    }

    async fn done_inner(&self, b: &Backend) -> Result<(), DriverError> {
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

    /// The `refint` and `memberof` overlays in `cn=config`, with where each
    /// is configured.
    async fn linking_overlays(ldap: &mut ldap3::Ldap) -> Result<Vec<LinkingOverlay>, DriverError> {
        let (entries, _res) = ldap
            .search(
                "cn=config",
                Scope::Subtree,
                "(objectClass=olcOverlayConfig)",
                vec!["olcOverlay", "objectClass"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| DriverError::ldap("cannot read the overlays in cn=config", e))?;
        let overlays: Vec<(String, String)> = entries
            .into_iter()
            .map(SearchEntry::construct)
            .filter_map(|e| {
                let kind = linking_kind(&e.attrs)?;
                let parent = e.dn.split_once(',').map(|(_, p)| p.to_string())?;
                Some((kind.to_string(), parent))
            })
            .collect();
        if overlays.is_empty() {
            return Ok(Vec::new());
        }
        let (entries, _res) = ldap
            .search(
                "cn=config",
                Scope::OneLevel,
                "(objectClass=olcDatabaseConfig)",
                vec!["olcDatabase", "olcSuffix"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| DriverError::ldap("cannot read the databases in cn=config", e))?;
        let dbs: Vec<SearchEntry> = entries.into_iter().map(SearchEntry::construct).collect();
        Ok(overlays
            .into_iter()
            .map(|(name, parent)| {
                let db = dbs.iter().find(|d| d.dn.eq_ignore_ascii_case(&parent));
                let values = |a: &str| db.and_then(|d| d.attrs.get(a)).cloned().unwrap_or_default();
                let frontend = values("olcDatabase")
                    .iter()
                    .any(|v| without_order(v).eq_ignore_ascii_case("frontend"));
                LinkingOverlay {
                    name,
                    on: if db.is_none() {
                        Place::Unknown { parent }
                    } else if frontend {
                        Place::Frontend
                    } else {
                        Place::Database {
                            dn: parent,
                            suffixes: values("olcSuffix"),
                        }
                    },
                }
            })
            .collect())
    }

    async fn check_partial_inner(
        &self,
        frozen: &[Backend],
        all: &[Backend],
    ) -> Result<(), DriverError> {
        let mut ldap = self
            .connect()
            .await
            .map_err(|e| e.context("cannot check cn=config for overlays linking databases"))?;
        let overlays = Self::linking_overlays(&mut ldap).await;
        let _ = ldap.unbind().await;
        partial_freeze_allowed(&overlays?, frozen, all)
    }
}

/// Overlays that write into other entries than the one a write names,
/// possibly in other databases.
const LINKING: [(&str, &str); 2] = [
    ("refint", "olcRefintConfig"),
    ("memberof", "olcMemberOfConfig"),
];

/// `refint` or `memberof` if an overlay entry's attributes (olcOverlay,
/// objectClass) say it is one of those.
fn linking_kind(attrs: &std::collections::HashMap<String, Vec<String>>) -> Option<&'static str> {
    let values = |a: &str| attrs.get(a).into_iter().flatten();
    LINKING.iter().find_map(|&(name, class)| {
        let named = values("olcOverlay").any(|v| without_order(v).eq_ignore_ascii_case(name));
        let classed = values("objectClass").any(|v| {
            v.eq_ignore_ascii_case(class)
                || (name == "memberof" && v.eq_ignore_ascii_case("olcMemberOf"))
        });
        (named || classed).then_some(name)
    })
}

/// A cn=config value without its `{n}` ordering prefix.
fn without_order(v: &str) -> &str {
    match v.strip_prefix('{').and_then(|r| r.split_once('}')) {
        Some((n, rest))
            if n.trim_start_matches('-')
                .bytes()
                .all(|b| b.is_ascii_digit()) =>
        {
            rest
        }
        _ => v,
    }
}

/// A `refint` or `memberof` overlay and where it is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkingOverlay {
    /// `refint` or `memberof`.
    name: String,
    on: Place,
}

/// The database an overlay is configured on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// The frontend database: every database.
    Frontend,
    /// Another database: its cn=config DN and its `olcSuffix` values.
    Database { dn: String, suffixes: Vec<String> },
    /// The overlay entry's parent (this DN) is no database in cn=config.
    Unknown { parent: String },
}

/// Whether a freeze of `frozen` (some of `all`) holds with these overlays
/// (see the module documentation); else why not.
fn partial_freeze_allowed(
    overlays: &[LinkingOverlay],
    frozen: &[Backend],
    all: &[Backend],
) -> Result<(), DriverError> {
    let list = |bs: &mut dyn Iterator<Item = &Backend>| {
        bs.map(|b| b.suffix.as_str()).collect::<Vec<_>>().join(", ")
    };
    let is_frozen = |b: &Backend| frozen.iter().any(|f| f.norm == b.norm);
    let frozen_list = list(&mut frozen.iter());
    let unfrozen = list(&mut all.iter().filter(|b| !is_frozen(b)));
    let mut reasons = Vec::new();
    for o in overlays {
        let name = &o.name;
        match &o.on {
            Place::Frontend => reasons.push(format!(
                "overlay {name} on the frontend database (global) can change {frozen_list} \
                 when {unfrozen} is written; freeze every backend (leave dnSet out)"
            )),
            Place::Unknown { parent } => reasons.push(format!(
                "overlay {name} under {parent}, which is no database in cn=config: cannot tell \
                 what it changes; freeze every backend (leave dnSet out)"
            )),
            Place::Database { dn, suffixes } => {
                for suffix in suffixes {
                    // Unparsable: as if every frozen backend lay below it.
                    let norm = crate::freeze::dn::NormDn::parse(suffix.as_bytes());
                    // Writes under `suffix` are held when the backend
                    // holding it (the longest suffix containing it) is
                    // frozen.
                    let held = norm.as_ref().is_some_and(|n| {
                        all.iter()
                            .filter(|b| n.is_within(&b.norm))
                            .max_by_key(|b| b.norm.depth())
                            .is_some_and(is_frozen)
                    });
                    if held {
                        continue;
                    }
                    let below: Vec<&Backend> = frozen
                        .iter()
                        .filter(|f| {
                            norm.as_ref().is_none_or(|n| {
                                f.norm.within(n) != crate::freeze::dn::Within::No && f.norm != *n
                            })
                        })
                        .collect();
                    if below.is_empty() {
                        continue;
                    }
                    reasons.push(format!(
                        "overlay {name} on database {dn} ({suffix}) can change {} (below it, \
                         through glue) when {suffix} is written; freeze {suffix} too, or leave \
                         dnSet out",
                        list(&mut below.into_iter())
                    ));
                }
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(DriverError::new(
            DriverErrorKind::PartialFreezeUnsafe,
            reasons.join("; "),
        ))
    }
}

/// What a bind records in a database, from its cn=config entry's
/// attributes and the overlays configured on it: `olcLastBind: TRUE` (the
/// last successful bind's time), a `lastbind` or `ppolicy` overlay.
fn bind_recording(
    db: &std::collections::HashMap<String, Vec<String>>,
    overlays: &[std::collections::HashMap<String, Vec<String>>],
) -> Option<String> {
    let is_true = |a: &str| {
        db.get(a)
            .into_iter()
            .flatten()
            .any(|v| v.eq_ignore_ascii_case("TRUE"))
    };
    if is_true("olcLastBind") {
        return Some("olcLastBind: TRUE (each bind records its time)".into());
    }
    for o in overlays {
        let values = |a: &str| o.get(a).into_iter().flatten();
        for (name, class, what) in [
            ("lastbind", "olcLastBindConfig", "records each bind's time"),
            ("ppolicy", "olcPPolicyConfig", "records failed binds"),
        ] {
            let named = values("olcOverlay").any(|v| without_order(v).eq_ignore_ascii_case(name));
            let classed = values("objectClass").any(|v| v.eq_ignore_ascii_case(class));
            if named || classed {
                return Some(format!("the {name} overlay ({what})"));
            }
        }
    }
    None
}

impl OpenLdapDriver {
    async fn bind_writes_inner(&self, b: &Backend) -> Result<Option<String>, DriverError> {
        let mut ldap = self.connect().await?;
        let read = async {
            let db = Self::database(&mut ldap, &b.suffix).await?;
            let (entries, _res) = ldap
                .search(
                    &db.dn,
                    Scope::OneLevel,
                    "(objectClass=olcOverlayConfig)",
                    vec!["olcOverlay", "objectClass"],
                )
                .await
                .and_then(|r| r.success())
                .map_err(|e| {
                    DriverError::ldap(format!("cannot read the overlays of {}", db.dn), e)
                })?;
            let overlays: Vec<_> = entries
                .into_iter()
                .map(|e| SearchEntry::construct(e).attrs)
                .collect();
            Ok(bind_recording(&db.attrs, &overlays).map(|why| format!("{}: {why}", db.dn)))
        }
        .await;
        let _ = ldap.unbind().await;
        read
    }
}

impl Driver for OpenLdapDriver {
    fn bind_writes<'a>(
        &'a self,
        backend: &'a Backend,
    ) -> BoxFuture<'a, Result<Option<String>, DriverError>> {
        Box::pin(self.bind_writes_inner(backend))
    }

    fn check_partial<'a>(
        &'a self,
        _backend: &'a Backend,
        frozen: &'a [Backend],
        all: &'a [Backend],
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.check_partial_inner(frozen, all))
    }

    fn prepare<'a>(
        &'a self,
        backend: &'a Backend,
        _freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.prepare_inner(backend))
    }

    fn done<'a>(
        &'a self,
        backend: &'a Backend,
        _freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.done_inner(backend))
    }

    fn attach_state(
        &self,
        state: std::sync::Arc<crate::freeze::state::StateFile>,
        name: &'static str,
    ) {
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
    fn open(config_url: &str, dir: Option<&Path>) -> Result<DbFiles, DriverError> {
        let config = |msg: String| DriverError::new(DriverErrorKind::Config, msg);
        if !is_local(config_url) {
            return Err(config(format!(
                "the proxy can only make the data durable when slapd runs on its host \
                 (config_url over ldapi:// or loopback, not {config_url}); set olcDbNoSync \
                 to FALSE, or use the command driver to sync on the slapd host"
            )));
        }
        let dir = dir.ok_or_else(|| config("the database has no olcDbDirectory".into()))?;
        if !dir.is_absolute() {
            return Err(config(format!(
                "olcDbDirectory {} is relative; cannot find its files",
                dir.display()
            )));
        }
        let cannot_open = |path: &Path, e: std::io::Error| {
            DriverError::with_source(
                DriverErrorKind::Io,
                format!("cannot open {} to fsync it", path.display()),
                e,
            )
            .hint(
                "run abproxy as a user that may read the database directory (e.g. as slapd's \
                 user, or with CAP_DAC_READ_SEARCH), or set olcDbNoSync to FALSE",
            )
        };
        let data_path = dir.join("data.mdb");
        let data = File::open(&data_path).map_err(|e| cannot_open(&data_path, e))?;
        let dir = File::open(dir).map_err(|e| cannot_open(dir, e))?;
        Ok(DbFiles {
            data,
            data_path,
            dir,
        })
    }

    /// fsync(2) of the data file, then of the directory; returns the file's
    /// path.
    fn sync(self) -> Result<PathBuf, DriverError> {
        self.data.sync_all().map_err(|e| {
            DriverError::with_source(
                DriverErrorKind::Io,
                format!("fsync {}", self.data_path.display()),
                e,
            )
        })?;
        self.dir.sync_all().map_err(|e| {
            DriverError::with_source(
                DriverErrorKind::Io,
                format!("fsync of the directory of {}", self.data_path.display()),
                e,
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

    fn backend(suffix: &str) -> Backend {
        Backend {
            suffix: suffix.into(),
            norm: crate::freeze::dn::NormDn::parse(suffix.as_bytes()).unwrap(),
            mode: crate::freeze::Mode::Readonly,
        }
    }

    /// [`partial_freeze_allowed`], its refusal as the client reads it.
    fn allowed(
        overlays: &[LinkingOverlay],
        frozen: &[Backend],
        all: &[Backend],
    ) -> Result<(), String> {
        partial_freeze_allowed(overlays, frozen, all).map_err(|e| {
            assert_eq!(e.kind(), &DriverErrorKind::PartialFreezeUnsafe);
            e.to_string()
        })
    }

    fn on_db(name: &str, dn: &str, suffixes: &[&str]) -> LinkingOverlay {
        LinkingOverlay {
            name: name.into(),
            on: Place::Database {
                dn: dn.into(),
                suffixes: suffixes.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    #[test]
    fn partial_freezes_with_overlays_linking_databases() {
        let example = backend("dc=example,dc=org");
        let other = backend("dc=other,dc=org");
        let sub = backend("ou=sub,dc=other,dc=org");
        let all = [example.clone(), other.clone(), sub.clone()];
        let only = |b: &Backend| vec![b.clone()];
        let ex_db = "olcDatabase={1}mdb,cn=config";
        let other_db = "olcDatabase={2}mdb,cn=config";
        // No linking overlay: anything goes.
        assert_eq!(allowed(&[], &only(&example), &all), Ok(()));
        // Global: refused, whatever is frozen.
        let global = LinkingOverlay {
            name: "refint".into(),
            on: Place::Frontend,
        };
        let e = allowed(std::slice::from_ref(&global), &only(&example), &all).unwrap_err();
        assert_eq!(
            e,
            "overlay refint on the frontend database (global) can change dc=example,dc=org \
             when dc=other,dc=org, ou=sub,dc=other,dc=org is written; freeze every backend \
             (leave dnSet out)"
        );
        // On one database: it changes that database (and those glued below
        // it) only. Frozen or not, dc=example's overlays touch no other
        // frozen backend; nor do dc=other's while dc=example alone is frozen.
        let per_db = [
            on_db("refint", ex_db, &["dc=example,dc=org"]),
            on_db("memberof", ex_db, &["DC=Example, dc=org"]),
            on_db("refint", other_db, &["dc=other,dc=org"]),
        ];
        assert_eq!(allowed(&per_db, &only(&example), &all), Ok(()));
        assert_eq!(allowed(&per_db[..2], &only(&other), &all), Ok(()));
        // ou=sub,dc=other,dc=org lies below dc=other's database: frozen
        // without it, refused; with it, fine.
        let e = allowed(&per_db, &only(&sub), &all).unwrap_err();
        assert_eq!(
            e,
            "overlay refint on database olcDatabase={2}mdb,cn=config (dc=other,dc=org) can \
             change ou=sub,dc=other,dc=org (below it, through glue) when dc=other,dc=org is \
             written; freeze dc=other,dc=org too, or leave dnSet out"
        );
        assert_eq!(
            allowed(&per_db, &[other.clone(), sub.clone()], &all),
            Ok(())
        );
        // A database below a frozen backend but not a backend itself: its
        // writes are held with that backend.
        let inner = on_db(
            "memberof",
            "olcDatabase={3}mdb,cn=config",
            &["ou=in,dc=example,dc=org"],
        );
        assert_eq!(
            allowed(std::slice::from_ref(&inner), &only(&example), &all),
            Ok(())
        );
        // A second suffix outside the frozen backends, one that does not
        // parse, a database without a suffix, a parent that is no database.
        let two = on_db("refint", "x", &["dc=example,dc=org", "dc=org"]);
        let e = allowed(&[two], &only(&example), &all).unwrap_err();
        assert!(
            e.starts_with(
                "overlay refint on database x (dc=org) can change dc=example,dc=org (below it"
            ),
            "{e}"
        );
        let bad = on_db("refint", "x", &["=="]);
        assert!(allowed(&[bad], &only(&example), &all).is_err());
        let monitor = on_db("refint", "olcDatabase={4}monitor,cn=config", &[]);
        assert_eq!(allowed(&[monitor], &only(&example), &all), Ok(()));
        let lost = LinkingOverlay {
            name: "memberof".into(),
            on: Place::Unknown {
                parent: "olcDatabase={9}mdb,cn=config".into(),
            },
        };
        let e = allowed(std::slice::from_ref(&lost), &only(&example), &all).unwrap_err();
        assert!(e.contains("which is no database in cn=config"), "{e}");
        // Every reason, when several apply.
        let e = allowed(&[global, lost], &only(&example), &all).unwrap_err();
        assert!(
            e.contains("(global)") && e.contains("; overlay memberof under"),
            "{e}"
        );
    }

    /// An entry's attributes as a search returns them.
    fn attrs(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, Vec<String>> {
        let mut m: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (k, v) in pairs {
            m.entry(k.to_string()).or_default().push(v.to_string());
        }
        m
    }

    #[test]
    fn what_a_bind_records_from_the_database_and_its_overlays() {
        let plain = attrs(&[("olcReadOnly", "FALSE")]);
        let syncprov = attrs(&[("olcOverlay", "{0}syncprov")]);
        assert_eq!(
            bind_recording(&plain, std::slice::from_ref(&syncprov)),
            None
        );
        let said = bind_recording(&attrs(&[("olcLastBind", "true")]), &[]).unwrap();
        assert!(said.starts_with("olcLastBind: TRUE"), "{said}");
        let lastbind = attrs(&[("objectClass", "olcLastBindConfig"), ("olcOverlay", "{3}x")]);
        let said = bind_recording(&plain, &[syncprov.clone(), lastbind]).unwrap();
        assert!(said.contains("lastbind overlay"), "{said}");
        let ppolicy = attrs(&[("olcOverlay", "{2}ppolicy")]);
        let said = bind_recording(&plain, &[ppolicy]).unwrap();
        assert!(said.contains("ppolicy overlay"), "{said}");
    }

    #[test]
    fn linking_overlays_by_name_or_object_class() {
        let overlay = |name: &str, class: &str| {
            attrs(&[
                ("olcOverlay", name),
                ("objectClass", "olcOverlayConfig"),
                ("objectClass", class),
            ])
        };
        assert_eq!(
            linking_kind(&overlay("{0}refint", "olcRefintConfig")),
            Some("refint")
        );
        assert_eq!(
            linking_kind(&overlay("{3}memberof", "olcMemberOf")),
            Some("memberof")
        );
        assert_eq!(linking_kind(&overlay("memberOf", "x")), Some("memberof"));
        assert_eq!(
            linking_kind(&overlay("{1}other", "olcMemberOfConfig")),
            Some("memberof")
        );
        assert_eq!(
            linking_kind(&overlay("{0}syncprov", "olcSyncProvConfig")),
            None
        );
        assert_eq!(linking_kind(&overlay("{0}refintx", "x")), None);
        assert_eq!(without_order("{-1}frontend"), "frontend");
        assert_eq!(without_order("{12}mdb"), "mdb");
        assert_eq!(without_order("mdb"), "mdb");
        assert_eq!(without_order("{x}mdb"), "{x}mdb");
    }

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
        let refused = |url: &str, dir: Option<&Path>| {
            let e = DbFiles::open(url, dir).err().unwrap();
            (e.kind().clone(), e.to_string())
        };
        let (kind, e) = refused("ldap://192.0.2.1:389", Some(Path::new("/var/lib/ldap")));
        assert_eq!(kind, DriverErrorKind::Config);
        assert!(e.contains("slapd runs on its host"), "{e}");
        let (kind, e) = refused("ldapi:///x", None);
        assert_eq!(kind, DriverErrorKind::Config);
        assert!(e.contains("no olcDbDirectory"), "{e}");
        let (kind, e) = refused("ldapi:///x", Some(Path::new("var/lib/ldap")));
        assert_eq!(kind, DriverErrorKind::Config);
        assert!(e.contains("relative"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let (kind, e) = refused("ldapi:///x", Some(dir.path()));
        assert_eq!(kind, DriverErrorKind::Io);
        let data = dir.path().join("data.mdb");
        assert!(
            e.starts_with(&format!("cannot open {} to fsync it: ", data.display()))
                && e.ends_with(
                    "; run abproxy as a user that may read the database directory (e.g. as \
                     slapd's user, or with CAP_DAC_READ_SEARCH), or set olcDbNoSync to FALSE"
                ),
            "{e}"
        );
        std::fs::write(dir.path().join("data.mdb"), b"x").unwrap();
        let f = DbFiles::open("ldapi:///x", Some(dir.path())).unwrap();
        assert_eq!(f.sync().unwrap(), dir.path().join("data.mdb"));
    }
}
