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
//!
//! Partial freezes (an ON whose dnSet leaves some backends out): 389 DS's
//! referential integrity plugin (`libreferint-plugin`, "referential
//! integrity postoperation") rewrites references to a deleted or renamed
//! entry in every backend, and the MemberOf plugin (`libmemberof-plugin`)
//! maintains `memberOf` on the members of a changed group wherever they
//! live; `nsslapd-readonly` does not stop all such internal writes. Before
//! a partial freeze the driver reads the plugin entries under
//! `cn=plugins,cn=config` and refuses, with the reason, while either plugin
//! is enabled (`nsslapd-pluginEnabled: on`), whatever its scope settings.
//! A freeze of every backend (no dnSet) is never refused for this.

use futures::future::BoxFuture;
use ldap3::{Mod, Scope, SearchEntry};
use tracing::info;

use super::cnconfig::Saved;
use super::{Driver, DriverError, DriverErrorKind};
use crate::freeze::backend::Backend;
use crate::freeze::dn::NormDn;
use crate::secret::Credentials;

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
    bind: Option<Credentials>,
    /// The backend entry's DN and its previous nsslapd-readonly (None:
    /// absent) per backend, between PREPARE and DONE.
    saved: Saved,
}

impl Ds389Driver {
    /// A driver talking to `url` (ldap:// or ldapi://), with a simple bind
    /// when `bind` is given, else SASL EXTERNAL.
    pub fn new(url: String, bind: Option<Credentials>) -> Self {
        Ds389Driver {
            url,
            bind,
            saved: Saved::default(),
        }
    }

    async fn connect(&self) -> Result<ldap3::Ldap, DriverError> {
        super::cnconfig::connect(&self.url, self.bind.as_ref()).await
    }

    /// The ldbm instance entry holding `suffix`, with its nsslapd-suffix and
    /// nsslapd-readonly values.
    async fn backend_entry(
        ldap: &mut ldap3::Ldap,
        b: &Backend,
    ) -> Result<SearchEntry, DriverError> {
        let (entries, _res) = ldap
            .search(
                LDBM_DATABASE,
                Scope::OneLevel,
                "(objectClass=nsBackendInstance)",
                vec![SUFFIX, READONLY],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| DriverError::ldap(format!("cannot read {LDBM_DATABASE}"), e))?;
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
            0 => Err(DriverError::new(
                DriverErrorKind::Config,
                format!(
                    "no backend with {SUFFIX} {} under {LDBM_DATABASE}",
                    b.suffix
                ),
            )),
            n => Err(DriverError::new(
                DriverErrorKind::Config,
                format!(
                    "{n} backends with {SUFFIX} {} under {LDBM_DATABASE}",
                    b.suffix
                ),
            )),
        }
    }

    async fn set_read_only(
        ldap: &mut ldap3::Ldap,
        dn: &str,
        value: &str,
    ) -> Result<(), DriverError> {
        ldap.modify(
            dn,
            vec![Mod::Replace(READONLY, [value].into_iter().collect())],
        )
        .await
        .and_then(|r| r.success())
        .map(|_| ())
        .map_err(|e| DriverError::ldap(format!("cannot set {READONLY}: {value} on {dn}"), e))
    }

    async fn prepare_inner(&self, b: &Backend) -> Result<(), DriverError> {
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

    async fn done_inner(&self, b: &Backend) -> Result<(), DriverError> {
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

/// Where 389 keeps its plugins.
const PLUGINS: &str = "cn=plugins,cn=config";

/// Plugins that write into other entries than the one a write names, in
/// any backend: (library, what to call it).
const LINKING_PLUGINS: [(&str, &str); 2] = [
    ("libreferint-plugin", "referential integrity"),
    ("libmemberof-plugin", "MemberOf"),
];

/// Whether a partial freeze holds with these plugin entries (cn,
/// nsslapd-pluginPath, nsslapd-pluginEnabled): not while a referential
/// integrity or MemberOf plugin is enabled; else why not.
fn partial_freeze_allowed(
    plugins: &[(String, String, String)],
    frozen: &[Backend],
    all: &[Backend],
) -> Result<(), DriverError> {
    let list = |bs: &mut dyn Iterator<Item = &Backend>| {
        bs.map(|b| b.suffix.as_str()).collect::<Vec<_>>().join(", ")
    };
    let enabled: Vec<String> = plugins
        .iter()
        .filter(|(_, _, on)| on.eq_ignore_ascii_case("on"))
        .filter_map(|(cn, path, _)| {
            // The path is a library name, or a file name ending in one.
            let lib = path.rsplit('/').next().unwrap_or(path);
            let lib = lib.strip_suffix(".so").unwrap_or(lib);
            LINKING_PLUGINS
                .iter()
                .find(|(l, _)| lib.eq_ignore_ascii_case(l))
                .map(|(_, what)| format!("the {what} plugin ({PLUGINS} entry cn={cn})"))
        })
        .collect();
    if enabled.is_empty() {
        return Ok(());
    }
    let frozen_list = list(&mut frozen.iter());
    let unfrozen = list(
        &mut all
            .iter()
            .filter(|b| !frozen.iter().any(|f| f.norm == b.norm)),
    );
    Err(DriverError::new(
        DriverErrorKind::PartialFreezeUnsafe,
        format!(
            "{} enabled: it changes entries in every backend, so it can change {frozen_list} \
             when {unfrozen} is written; freeze every backend (leave dnSet out), or disable it",
            enabled.join(" and ")
        ),
    ))
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

impl Ds389Driver {
    async fn check_partial_inner(
        &self,
        frozen: &[Backend],
        all: &[Backend],
    ) -> Result<(), DriverError> {
        let mut ldap = self.connect().await.map_err(|e| {
            e.context(format_args!(
                "cannot check {PLUGINS} for plugins linking backends"
            ))
        })?;
        let r = ldap
            .search(
                PLUGINS,
                Scope::OneLevel,
                "(objectClass=nsSlapdPlugin)",
                vec!["cn", "nsslapd-pluginPath", "nsslapd-pluginEnabled"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| DriverError::ldap(format!("cannot read {PLUGINS}"), e));
        let _ = ldap.unbind().await;
        let plugins: Vec<(String, String, String)> =
            r?.0.into_iter()
                .map(SearchEntry::construct)
                .map(|e| {
                    let get = |a| attr(&e, a).unwrap_or("").to_string();
                    (
                        get("cn"),
                        get("nsslapd-pluginPath"),
                        get("nsslapd-pluginEnabled"),
                    )
                })
                .collect();
        partial_freeze_allowed(&plugins, frozen, all)
    }
}

impl Driver for Ds389Driver {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_freezes_with_plugins_linking_backends() {
        let backend = Backend::readonly;
        let all = [backend("dc=example,dc=com"), backend("dc=other,dc=com")];
        let frozen = &all[..1];
        let plugin =
            |cn: &str, path: &str, on: &str| (cn.to_string(), path.to_string(), on.to_string());
        let defaults = [
            plugin(
                "referential integrity postoperation",
                "libreferint-plugin",
                "off",
            ),
            plugin("MemberOf Plugin", "libmemberof-plugin", "off"),
            plugin("Linked Attributes", "liblinkedattrs-plugin", "on"),
        ];
        assert!(partial_freeze_allowed(&defaults, frozen, &all).is_ok());
        let mut refint = defaults.clone();
        refint[0].2 = "on".into();
        let e = partial_freeze_allowed(&refint, frozen, &all).unwrap_err();
        assert_eq!(e.kind(), &DriverErrorKind::PartialFreezeUnsafe);
        assert_eq!(
            e.to_string(),
            "the referential integrity plugin (cn=plugins,cn=config entry cn=referential \
             integrity postoperation) enabled: it changes entries in every backend, so it can \
             change dc=example,dc=com when dc=other,dc=com is written; freeze every backend \
             (leave dnSet out), or disable it"
        );
        let both = [
            plugin(
                "refint 2",
                "/usr/lib64/dirsrv/plugins/libreferint-plugin.so",
                "On",
            ),
            plugin("MemberOf Plugin", "libmemberof-plugin", "on"),
        ];
        let e = partial_freeze_allowed(&both, frozen, &all)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the referential integrity plugin (cn=plugins,cn=config entry cn=refint 2) and the MemberOf plugin"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn unreachable_server_fails_prepare_and_done_is_a_no_op() {
        let b = Backend::readonly("dc=example,dc=org");
        let d = Ds389Driver::new("ldapi:///nonexistent/abproxy-test.socket".into(), None);
        let err = d.prepare(&b, 1).await.unwrap_err();
        assert_eq!(err.kind(), &DriverErrorKind::Connect);
        assert!(
            err.to_string()
                .starts_with("cannot connect to ldapi:///nonexistent/abproxy-test.socket: "),
            "{err}"
        );
        // Nothing was changed, so nothing to undo.
        assert!(d.done(&b, 1).await.is_ok());
    }
}
