//! `--method auto` (the default): the method chosen before the freeze from
//! what the proxy's server is and whether its database is on this host.
//!
//! Over a short connection to the proxy (not frozen yet): the backends to
//! be frozen (`--backend`, or every backend the proxy has), the root DSE's
//! `vendorName`, and each suffix entry's `entryUUID` (which database it
//! is). Then:
//!
//! * a 389 DS (`vendorName` says 389): the local instance under
//!   [`ds389::CONFIG_ROOT`] that has every suffix and, over its LDAPI
//!   socket (bound as the operator), the same `entryUUID`s: `389`
//!   (389's own backup, the freeze as long as its task);
//! * otherwise (slapd publishes no `vendorName`): when the configuration
//!   at `--slapd-config` (default `/etc/ldap/slapd.d`) has a database for
//!   every suffix and its suffix entries have the same `entryUUID`s (read
//!   with `slapcat`): `files` when `mdb_copy` is installed, else
//!   `slapcat`;
//! * else `ldif`, which reads through the proxy and works for any server.
//!
//! The reason is logged. A local database is taken only when it is
//! provably the one behind the proxy: a slapd or 389 DS on this host with
//! the same suffix but other data does not count.

use std::path::Path;

use super::{
    base_entry, exit, first, suffix_uuid, BackupSpec, Fail, Method, Session, Target, SMALL_TIMEOUT,
};
use crate::backup::{ds389, slapd};

/// The method for `spec` and why.
pub(super) async fn choose(
    spec: &BackupSpec,
    slapd_config: &Path,
) -> Result<(Method, String), Fail> {
    let step = "choose the method";
    let mut session =
        tokio::time::timeout(SMALL_TIMEOUT, Session::connect_tls(&spec.target, &spec.tls))
            .await
            .map_err(|_| Fail::new(step, "no answer within 30 s", exit::TIMEOUT))?
            .map_err(|e| Fail::new(step, &e, e.exit_code()))?;
    let seen = async {
        let status = tokio::time::timeout(SMALL_TIMEOUT, session.status())
            .await
            .map_err(|_| Fail::new(step, "no answer within 30 s", exit::TIMEOUT))?
            .map_err(|e| Fail::new(step, &e, e.exit_code()))?;
        let suffixes: Vec<String> = if spec.request.backends.is_empty() {
            status.backends.iter().map(|b| b.suffix.clone()).collect()
        } else {
            spec.request.backends.clone()
        };
        let root = base_entry(&mut session, step, "", vec!["vendorName"]).await?;
        let vendor = root.and_then(|e| first(&e, "vendorName"));
        let mut uuids = Vec::new();
        for s in &suffixes {
            uuids.push(suffix_uuid(&mut session, s).await?);
        }
        Ok::<_, Fail>((suffixes, vendor, uuids))
    }
    .await;
    session.close().await;
    let (suffixes, vendor, uuids) = seen?;
    if suffixes.is_empty() {
        return Ok((Method::Ldif, "ldif: the proxy lists no backend".into()));
    }
    if uuids.iter().any(Option::is_none) {
        return Ok((
            Method::Ldif,
            "ldif: a suffix entry has no entryUUID (nor nsUniqueId), so no local database can be \
             shown to be the one behind the proxy"
                .into(),
        ));
    }
    let uuids: Vec<String> = uuids.into_iter().flatten().collect();
    if vendor.as_deref().is_some_and(|v| v.contains("389")) {
        return Ok(
            match local_389(spec, &suffixes, &uuids, Path::new(ds389::CONFIG_ROOT)).await {
                Some((server, name)) => (
                    Method::Ds389 { server },
                    format!("389: the 389 DS behind the proxy is instance {name} on this host"),
                ),
                None => (
                    Method::Ldif,
                    "ldif: the 389 DS behind the proxy is not an instance on this host".into(),
                ),
            },
        );
    }
    match local_slapd(slapd_config, &suffixes, &uuids).await {
        Ok(()) if Path::new(slapd::MDB_COPY).exists() => Ok((
            Method::Files {
                config: slapd_config.to_path_buf(),
            },
            format!(
                "files: the slapd behind the proxy has its databases on this host ({})",
                slapd_config.display()
            ),
        )),
        Ok(()) => Ok((
            Method::Slapcat {
                config: slapd_config.to_path_buf(),
            },
            format!(
                "slapcat: the slapd behind the proxy has its databases on this host ({}; no \
                 {} for the files method)",
                slapd_config.display(),
                slapd::MDB_COPY
            ),
        )),
        Err(why) => Ok((Method::Ldif, format!("ldif: {why}"))),
    }
}

/// The local 389 DS instance holding `suffixes` with these suffix entries:
/// its LDAPI URL and name.
async fn local_389(
    spec: &BackupSpec,
    suffixes: &[String],
    uuids: &[String],
    config_root: &Path,
) -> Option<(String, String)> {
    for name in ds389::instances(config_root) {
        let Ok(inst) = ds389::Instance::read(config_root, &name) else {
            continue;
        };
        let Some(socket) = inst.ldapi.as_deref().filter(|p| p.exists()) else {
            continue;
        };
        if suffixes.iter().any(|s| inst.backend_of(s).is_none()) {
            continue;
        }
        let url = ds389::ldapi_url(socket);
        let target = Target {
            url: url.clone(),
            ..spec.target.clone()
        };
        let Ok(Ok(mut direct)) =
            tokio::time::timeout(SMALL_TIMEOUT, Session::connect(&target)).await
        else {
            continue;
        };
        let mut same = true;
        for (s, want) in suffixes.iter().zip(uuids) {
            match suffix_uuid(&mut direct, s).await {
                Ok(Some(u)) if u.eq_ignore_ascii_case(want) => {}
                _ => {
                    same = false;
                    break;
                }
            }
        }
        direct.close().await;
        if same {
            return Some((url, name));
        }
    }
    None
}

/// Whether the slapd configuration at `config` has a database for every
/// suffix whose suffix entry is the one behind the proxy; why not.
async fn local_slapd(config: &Path, suffixes: &[String], uuids: &[String]) -> Result<(), String> {
    if !config.exists() {
        return Err(format!("no slapd configuration at {}", config.display()));
    }
    let tools = slapd::Tools::default();
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let entries = slapd::read_config(&tools, config, SMALL_TIMEOUT, scratch.path())
        .await
        .map_err(|e| format!("the slapd configuration at {}: {e}", config.display()))?;
    for (s, want) in suffixes.iter().zip(uuids) {
        slapd::database_for(&entries, s).map_err(|e| format!("{}: {e}", config.display()))?;
        let here = slapd::suffix_uuid(&tools, config, s, scratch.path(), SMALL_TIMEOUT)
            .await
            .map_err(|e| format!("{s} in {}: {e}", config.display()))?;
        if !here
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(want))
        {
            return Err(format!(
                "the database of {s} at {} is not the one behind the proxy (its suffix entry's \
                 id (entryUUID) is {}, the proxy's server has {want})",
                config.display(),
                here.as_deref().unwrap_or("absent")
            ));
        }
    }
    Ok(())
}
