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
//! Durability with `olcDbNoSync: TRUE`: back-mdb then skips the fsync at each
//! commit, but every committed transaction is already in the memory map and
//! the page cache; a file copy reads the page cache, and a filesystem
//! snapshot (LVM, ZFS) freezes the filesystem, which flushes it. So once the
//! drain is over and the database is read-only, a copy is consistent; the
//! driver logs a warning that the live server itself is not crash-safe in
//! that mode.

use futures::future::BoxFuture;
use ldap3::{Mod, Scope, SearchEntry};
use tracing::{info, warn};

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
                vec!["olcReadOnly", "olcDbNoSync"],
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
        if db
            .attrs
            .get("olcDbNoSync")
            .and_then(|v| v.first())
            .is_some_and(|v| v.eq_ignore_ascii_case("TRUE"))
        {
            warn!(backend = %b.suffix, "olcDbNoSync is TRUE: committed data is in the page cache (copies and filesystem snapshots see it), but the live server is not crash-safe");
        }
        Self::set_read_only(&mut ldap, &db.dn, Some("TRUE")).await?;
        info!(backend = %b.suffix, database = %db.dn, "olcReadOnly set to TRUE");
        self.saved.put(b, db.dn, previous);
        let _ = ldap.unbind().await;
        Ok(())
    }

    async fn done_inner(&self, b: &Backend) -> Result<(), String> {
        let Some((dn, previous)) = self.saved.take(b) else {
            return Ok(()); // prepare never changed anything
        };
        let mut ldap = self.connect().await?;
        let r = Self::set_read_only(&mut ldap, &dn, previous.as_deref()).await;
        if r.is_err() {
            // Keep it, so a later DONE (OFF again) can retry.
            self.saved.put(b, dn.clone(), previous.clone());
        } else {
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
