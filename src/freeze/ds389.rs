//! The `389ds` driver: makes 389 Directory Server itself refuse writes to a
//! frozen backend, so that updates that do not pass through the proxy (local
//! ldapi clients, replication suppliers, plugins writing internally) cannot
//! change the files being copied either.
//!
//! PREPARE connects to the server's `cn=config` (by default over ldapi with
//! SASL EXTERNAL, where root autobinds as `cn=Directory Manager`; or with a
//! simple bind), finds the ldbm instance
//! `cn=<backend>,cn=ldbm database,cn=plugins,cn=config` whose
//! `nsslapd-suffix` is the backend's suffix (compared as DNs), remembers its
//! `nsslapd-readonly` and sets it to `on`. While it is on, ns-slapd answers
//! every write to that backend with unwillingToPerform (53), "database is
//! read-only", whoever asks. DONE puts the previous value back (`off`, 389's
//! default, if the attribute was absent).
//!
//! Like the `openldap` driver's `olcReadOnly`, the setting is stored in
//! `dse.ldif`: a proxy killed while frozen leaves the backend read-only until
//! an operator sets `nsslapd-readonly: off` again (or runs OFF through a new
//! proxy, which only resets what it set itself).

use futures::future::BoxFuture;
use ldap3::{Mod, Scope, SearchEntry};
use tracing::info;

use super::backend::Backend;
use super::cnconfig::Saved;
use super::dn::NormDn;
use super::engine::Driver;

/// Parent of the ldbm backend instances in 389's cn=config.
pub const LDBM_DATABASE: &str = "cn=ldbm database,cn=plugins,cn=config";
/// The per-backend read-only switch.
const READONLY: &str = "nsslapd-readonly";
/// The attribute naming a backend's suffix.
const SUFFIX: &str = "nsslapd-suffix";
/// 389's default for `nsslapd-readonly`.
const DEFAULT_READONLY: &str = "off";

/// How the driver reaches 389's `cn=config`.
#[derive(Debug)]
pub struct Ds389Driver {
    url: String,
    bind: Option<(String, String)>,
    /// The backend entry's DN and its previous nsslapd-readonly (None:
    /// absent) per backend, between PREPARE and DONE.
    saved: Saved,
}

impl Ds389Driver {
    /// A driver talking to `url` (ldap:// or ldapi://), with a simple bind
    /// when `bind` is given, else SASL EXTERNAL.
    pub fn new(url: String, bind: Option<(String, String)>) -> Self {
        Ds389Driver {
            url,
            bind,
            saved: Saved::default(),
        }
    }

    async fn connect(&self) -> Result<ldap3::Ldap, String> {
        super::cnconfig::connect(&self.url, self.bind.as_ref()).await
    }

    /// The ldbm instance entry holding `suffix`, with its nsslapd-suffix and
    /// nsslapd-readonly values.
    async fn backend_entry(ldap: &mut ldap3::Ldap, b: &Backend) -> Result<SearchEntry, String> {
        let (entries, _res) = ldap
            .search(
                LDBM_DATABASE,
                Scope::OneLevel,
                "(objectClass=nsBackendInstance)",
                vec![SUFFIX, READONLY],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("cannot read {LDBM_DATABASE}: {e}"))?;
        let mut found: Vec<SearchEntry> = entries
            .into_iter()
            .map(SearchEntry::construct)
            .filter(|e| {
                attr(e, SUFFIX)
                    .and_then(|s| NormDn::parse(s.as_bytes()))
                    .is_some_and(|n| n == b.norm)
            })
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(format!(
                "no backend with {SUFFIX} {} under {LDBM_DATABASE}",
                b.suffix
            )),
            n => Err(format!(
                "{n} backends with {SUFFIX} {} under {LDBM_DATABASE}",
                b.suffix
            )),
        }
    }

    async fn set_read_only(ldap: &mut ldap3::Ldap, dn: &str, value: &str) -> Result<(), String> {
        ldap.modify(
            dn,
            vec![Mod::Replace(READONLY, [value].into_iter().collect())],
        )
        .await
        .and_then(|r| r.success())
        .map(|_| ())
        .map_err(|e| format!("cannot set {READONLY}: {value} on {dn}: {e}"))
    }

    async fn prepare_inner(&self, b: &Backend) -> Result<(), String> {
        let mut ldap = self.connect().await?;
        let r = async {
            let entry = Self::backend_entry(&mut ldap, b).await?;
            let previous = attr(&entry, READONLY).map(str::to_string);
            // Recorded first: this step may be dropped (its deadline) while
            // the modify is on its way.
            self.saved.record(b, entry.dn.clone(), previous.clone()).await;
            Self::set_read_only(&mut ldap, &entry.dn, "on").await?;
            info!(backend = %b.suffix, entry = %entry.dn, previous = ?previous, "nsslapd-readonly set to on");
            Ok(())
        }
        .await;
        let _ = ldap.unbind().await;
        r
    }

    async fn done_inner(&self, b: &Backend) -> Result<(), String> {
        // Kept until restored, so a later DONE (OFF again, the next start)
        // can retry.
        let Some((dn, previous)) = self.saved.get(b) else {
            return Ok(()); // prepare never changed anything
        };
        let value = previous.as_deref().unwrap_or(DEFAULT_READONLY);
        let r = match self.connect().await {
            Ok(mut ldap) => {
                let r = Self::set_read_only(&mut ldap, &dn, value).await;
                let _ = ldap.unbind().await;
                r
            }
            Err(e) => Err(e),
        };
        if r.is_ok() {
            self.saved.forget(b).await;
            info!(backend = %b.suffix, entry = %dn, value, "nsslapd-readonly restored");
        }
        r
    }
}

/// The first value of `name` (case-insensitive) in `entry`.
fn attr<'a>(entry: &'a SearchEntry, name: &str) -> Option<&'a str> {
    entry
        .attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(String::as_str)
}

impl Driver for Ds389Driver {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::Mode;

    #[tokio::test]
    async fn unreachable_server_fails_prepare_and_done_is_a_no_op() {
        let b = Backend {
            suffix: "dc=example,dc=org".into(),
            norm: NormDn::parse(b"dc=example,dc=org").unwrap(),
            mode: Mode::Readonly,
        };
        let d = Ds389Driver::new("ldapi:///nonexistent/abproxy-test.socket".into(), None);
        let err = d.prepare(&b, 1).await.unwrap_err();
        assert!(err.contains("cannot connect to"), "{err}");
        // Nothing was changed, so nothing to undo.
        assert_eq!(d.done(&b, 1).await, Ok(()));
    }
}
