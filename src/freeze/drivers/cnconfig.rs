//! The connection the `openldap` and `389ds` drivers open to the server's
//! `cn=config`: ldapi with SASL EXTERNAL (root is the directory's manager
//! there on both servers), or ldap:// with a simple bind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::error;

use ldap3::{LdapConnAsync, LdapConnSettings, StdStream};

use super::{DriverError, DriverErrorKind};
use crate::freeze::backend::Backend;
use crate::freeze::state::StateFile;

use crate::endpoint::Endpoint;
use crate::secret::Credentials;

/// Connects to `url` and binds (simple with `bind`, else SASL EXTERNAL).
/// Everything is asynchronous, the connect included: a server that does not
/// answer (or a `config_url` whose SYNs are dropped) holds only this step,
/// which the engine drops at the backend's deadline, never a runtime thread.
pub(crate) async fn connect(
    url: &str,
    bind: Option<&Credentials>,
) -> Result<ldap3::Ldap, DriverError> {
    let ep = Endpoint::parse(url)
        .map_err(|e| DriverError::new(DriverErrorKind::Config, format!("config_url: {e}")))?;
    let cannot = |e: std::io::Error| {
        DriverError::with_source(
            DriverErrorKind::Connect,
            format!("cannot connect to {url}"),
            e,
        )
    };
    // ldap3 takes the connected socket as a std one (it makes it
    // non-blocking again and hands it to tokio).
    let (stream, ldap_url) = match &ep {
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .and_then(|s| s.into_std())
                .map_err(cannot)?;
            (StdStream::Tcp(s), format!("ldap://{addr}"))
        }
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .and_then(|s| s.into_std())
                .map_err(cannot)?;
            (StdStream::Unix(s), "ldapi:///".to_string())
        }
        Endpoint::Tls(_) => {
            return Err(DriverError::new(
                DriverErrorKind::Config,
                format!("{url}: ldaps:// is not supported for config_url; use ldapi:// or ldap://"),
            ))
        }
    };
    let settings = LdapConnSettings::new().set_std_stream(stream);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &ldap_url)
        .await
        .map_err(|e| {
            DriverError::with_source(
                DriverErrorKind::Connect,
                format!("cannot connect to {url}"),
                e,
            )
        })?;
    ldap3::drive!(conn);
    let res = match bind {
        Some(c) => ldap.simple_bind(&c.dn, c.password.expose()).await,
        None => ldap.sasl_external_bind().await,
    }
    .map_err(|e| DriverError::ldap(format!("bind to {url} failed"), e))?;
    if res.rc != 0 {
        return Err(DriverError::refused(format!("bind to {url} failed"), res));
    }
    Ok(ldap)
}

/// What a read-only-switching driver changed, per backend, between PREPARE
/// and DONE: the config entry's DN and the switch's previous value (None:
/// absent). Kept in the state file once one is attached, so that a proxy
/// killed in between can restore it at its next start.
///
/// Recorded before the change is sent and forgotten only once DONE has
/// restored it: a step dropped at its deadline (or a crash) at any point
/// leaves what a later DONE needs. Restoring is idempotent, so a record of
/// a change that never reached the server costs one needless modify.
#[derive(Debug, Default)]
pub(crate) struct Saved {
    memory: Mutex<HashMap<String, (String, Option<String>)>>,
    file: OnceLock<(Arc<StateFile>, &'static str)>,
}

impl Saved {
    /// Keeps what the driver `name` changes in `state` from now on.
    pub(crate) fn attach(&self, state: Arc<StateFile>, name: &'static str) {
        let _ = self.file.set((state, name));
    }

    /// PREPARE is about to set `dn`'s switch for `b`; `previous` is its value
    /// now. If an earlier step left a record for the same entry (a DONE that
    /// failed or timed out, a PREPARE that timed out), its previous value is
    /// kept: the value read now may be the one that step set.
    pub(crate) async fn record(&self, b: &Backend, dn: String, previous: Option<String>) {
        let previous = match self.get(b) {
            Some((old_dn, old_previous)) if old_dn == dn => old_previous,
            _ => previous,
        };
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(b.norm.to_string(), (dn.clone(), previous.clone()));
        if let Some((state, name)) = self.file.get() {
            if let Err(e) = state.set_changed(name, b, dn, previous).await {
                // Still undone by OFF; only a crash would lose it.
                error!(backend = %b.suffix, "{e}");
            }
        }
    }

    /// What PREPARE changed for `b` (None: nothing), still kept; after a
    /// restart, what the state file says a previous run changed.
    pub(crate) fn get(&self, b: &Backend) -> Option<(String, Option<String>)> {
        let mem = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&b.norm.to_string())
            .cloned();
        mem.or_else(|| {
            let (state, name) = self.file.get()?;
            state.changed(name, b)
        })
    }

    /// DONE restored what PREPARE changed for `b`.
    pub(crate) async fn forget(&self, b: &Backend) {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&b.norm.to_string());
        if let Some((state, name)) = self.file.get() {
            if let Err(e) = state.clear_changed(name, b).await {
                error!(backend = %b.suffix, "{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::drivers::openldap::OpenLdapDriver;
    use crate::freeze::drivers::{run_step, DriverOp, Step};
    use std::time::Duration;

    fn backend() -> Backend {
        Backend::readonly("dc=example,dc=org")
    }

    #[tokio::test]
    async fn a_later_record_keeps_the_value_from_before_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(&dir.path().join("state.json")).unwrap();
        let saved = Saved::default();
        saved.attach(state.clone(), "openldap");
        let b = backend();
        saved.record(&b, "olcDatabase={1}mdb".into(), None).await;
        // A second PREPARE after one that did not finish reads TRUE, which
        // that one may have set: the value from before it is kept.
        saved
            .record(&b, "olcDatabase={1}mdb".into(), Some("TRUE".into()))
            .await;
        let want = Some(("olcDatabase={1}mdb".to_string(), None));
        assert_eq!(saved.get(&b), want);
        assert_eq!(state.changed("openldap", &b), want);
        saved.forget(&b).await;
        assert_eq!(saved.get(&b), None);
        assert_eq!(state.changed("openldap", &b), None);
        // A different entry is a new record.
        saved.record(&b, "olcDatabase={2}mdb".into(), None).await;
        saved
            .record(&b, "olcDatabase={3}mdb".into(), Some("FALSE".into()))
            .await;
        assert_eq!(
            saved.get(&b),
            Some(("olcDatabase={3}mdb".to_string(), Some("FALSE".to_string())))
        );
    }

    /// A DONE dropped at its deadline (cn=config accepts and never answers)
    /// forgets nothing: the record stays for the next DONE or start.
    #[tokio::test]
    async fn a_done_dropped_at_its_deadline_keeps_what_it_must_undo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = StateFile::open(&path).unwrap();
        let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ldap://{}", hole.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                conns.push(hole.accept().await.unwrap());
            }
        });
        let d = OpenLdapDriver::new(
            url,
            Some(crate::secret::Credentials {
                dn: "cn=admin,cn=config".into(),
                password: crate::secret::Password::new("x"),
            }),
        );
        crate::freeze::Driver::attach_state(&d, state.clone(), "openldap");
        let b = backend();
        state
            .set_changed("openldap", &b, "olcDatabase={1}mdb".into(), None)
            .await
            .unwrap();
        let err = run_step(&d, Step::Done, &b, 1, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            &DriverErrorKind::TimedOut {
                op: DriverOp::Done,
                deadline: Duration::from_millis(300)
            }
        );
        let want = Some(("olcDatabase={1}mdb".to_string(), None));
        assert_eq!(state.changed("openldap", &b), want);
        let reopened = StateFile::open(&path).unwrap();
        assert_eq!(reopened.changed("openldap", &b), want, "on disk too");
        held.abort();
    }
}
