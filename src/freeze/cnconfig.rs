//! The connection the `openldap` and `389ds` drivers open to the server's
//! `cn=config`: ldapi with SASL EXTERNAL (root is the directory's manager
//! there on both servers), or ldap:// with a simple bind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::error;

use ldap3::{LdapConnAsync, LdapConnSettings, StdStream};

use super::backend::Backend;
use super::state::StateFile;

use crate::endpoint::Endpoint;

/// Connects to `url` and binds (simple with `bind`, else SASL EXTERNAL).
pub(crate) async fn connect(
    url: &str,
    bind: Option<&(String, String)>,
) -> Result<ldap3::Ldap, String> {
    let ep = Endpoint::parse(url).map_err(|e| format!("config_url: {e}"))?;
    let (stream, ldap_url) = match &ep {
        Endpoint::Tcp(addr) => {
            let s = std::net::TcpStream::connect(addr.as_str())
                .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            (StdStream::Tcp(s), format!("ldap://{addr}"))
        }
        Endpoint::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            (StdStream::Unix(s), "ldapi:///".to_string())
        }
        Endpoint::Tls(_) => {
            return Err(format!(
                "{url}: ldaps:// is not supported for config_url; use ldapi:// or ldap://"
            ))
        }
    };
    let settings = LdapConnSettings::new().set_std_stream(stream);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &ldap_url)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    ldap3::drive!(conn);
    let res = match bind {
        Some((dn, pw)) => ldap.simple_bind(dn, pw).await,
        None => ldap.sasl_external_bind().await,
    }
    .map_err(|e| format!("bind to {url} failed: {e}"))?;
    if res.rc != 0 {
        return Err(format!("bind to {url} failed: {res}"));
    }
    Ok(ldap)
}

/// What a read-only-switching driver changed, per backend, between PREPARE
/// and DONE: the config entry's DN and the switch's previous value (None:
/// absent). Kept in the state file once one is attached, so that a proxy
/// killed in between can restore it at its next start.
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

    /// Remembers what PREPARE changed for `b`.
    pub(crate) fn put(&self, b: &Backend, dn: String, previous: Option<String>) {
        if let Some((state, name)) = self.file.get() {
            if let Err(e) = state.set_changed(name, b, dn.clone(), previous.clone()) {
                // Still undone by OFF; only a crash would lose it.
                error!(backend = %b.suffix, "{e}");
            }
        }
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(b.norm.to_string(), (dn, previous));
    }

    /// What PREPARE changed for `b` (None: nothing), forgotten; `put` it
    /// back when DONE fails, so a later DONE can retry. After a restart,
    /// what the state file says a previous run changed.
    pub(crate) fn take(&self, b: &Backend) -> Option<(String, Option<String>)> {
        let mem = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&b.norm.to_string());
        let Some((state, name)) = self.file.get() else {
            return mem;
        };
        match state.take_changed(name, b) {
            Ok(file) => mem.or(file),
            Err(e) => {
                error!(backend = %b.suffix, "{e}");
                mem
            }
        }
    }
}
