//! The state file: what backend drivers have changed on the servers and not
//! yet undone, so that a proxy killed (SIGKILL, power loss) while a driver
//! had, say, set a backend read-only finds it at its next start and runs the
//! DONE step then.
//!
//! One small JSON file, rewritten atomically (temporary file, fsync,
//! rename, fsync of the directory) before each PREPARE and after each DONE;
//! removed when nothing is left to undo. Entries are keyed by driver and
//! normalised suffix. The writes run on tokio's blocking pool, one at a
//! time and in order, never on a runtime thread; one that has begun
//! completes even if the step that asked for it is dropped (its deadline).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::backend::Backend;

/// Why the state file cannot be read or written.
///
/// A type of its own rather than variants of
/// [`FreezeError`](super::engine::FreezeError): the engine never touches the
/// state file. It is opened at start-up (where a failure stops the proxy
/// before any freeze) and written by the drivers around their steps
/// ([`Recorded`](super::drivers::recorded::Recorded), the `cn=config`
/// drivers' record of what they changed), so during ON and OFF a state file
/// error reaches the client as the source of the failed step's
/// [`DriverError`](super::drivers::DriverError), inside
/// `FreezeError::PrepareFailed` or `FreezeError::DoneFailed`, with the
/// backend and the step.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but cannot be read.
    #[error("cannot read state file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what abproxy writes.
    #[error("state file {} is corrupt: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Writing, syncing, replacing or removing the file failed.
    #[error("cannot {action} state file {}: {source}", path.display())]
    Write {
        /// What was being done: `write`, `sync`, `replace` or `remove`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The blocking task writing the file panicked or was cancelled.
    #[error("state file write: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What one driver left on one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The driver (`command`, `openldap`, `389ds`).
    pub driver: String,
    /// The backend's suffix as configured.
    pub suffix: String,
    /// The freeze whose PREPARE started.
    pub freeze_id: u64,
    /// `openldap`/`389ds`: the config entry changed and the previous value
    /// of its read-only switch (None: absent), once PREPARE changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<(String, Option<String>)>,
}

/// The state file (or, without a path, the same bookkeeping in memory).
#[derive(Debug)]
pub struct StateFile {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Held by the blocking task that applies a change and writes the file,
    /// so that changes reach the file in the order they were applied.
    io: Mutex<()>,
}

pub(crate) fn key(driver: &str, b: &Backend) -> String {
    format!("{driver} {}", b.norm)
}

impl StateFile {
    /// In memory only (no `state_file` configured).
    pub fn memory() -> Arc<StateFile> {
        Arc::new(StateFile {
            path: None,
            entries: Mutex::new(BTreeMap::new()),
            io: Mutex::new(()),
        })
    }

    /// Opens `path`, reading what a previous run left (a missing file is an
    /// empty state; an unreadable one is an error: its contents matter).
    pub fn open(path: &Path) -> Result<Arc<StateFile>, StateError> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.to_owned(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let s = StateFile {
            path: Some(path.to_owned()),
            entries: Mutex::new(entries),
            io: Mutex::new(()),
        };
        // Fail now, not in the middle of a freeze, if it cannot be written.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(|source| {
            StateError::Write {
                action: "write",
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(Arc::new(s))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is left to undo.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn keyed(&self) -> Vec<(String, Entry)> {
        self.lock()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    fn save(&self, entries: &BTreeMap<String, Entry>) -> Result<(), StateError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let fail = |action: &'static str, source: std::io::Error| StateError::Write {
            action,
            path: path.clone(),
            source,
        };
        if entries.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(fail("remove", e)),
                _ => Ok(()),
            };
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| fail("write", e))?;
        let json = serde_json::to_vec_pretty(entries).expect("state serialises");
        tmp.write_all(&json).map_err(|e| fail("write", e))?;
        tmp.as_file().sync_all().map_err(|e| fail("sync", e))?;
        tmp.persist(path).map_err(|e| fail("replace", e.error))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Applies `f` to the entries and writes the file, off the runtime
    /// (tokio's blocking pool): a write and two fsyncs can take long on a
    /// busy disk, and must not stall the sessions.
    pub(crate) async fn update(
        self: &Arc<Self>,
        f: impl FnOnce(&mut BTreeMap<String, Entry>) + Send + 'static,
    ) -> Result<(), StateError> {
        let apply = {
            let me = self.clone();
            move || {
                let _io = me.io.lock().unwrap_or_else(|e| e.into_inner());
                let snapshot = {
                    let mut entries = me.lock();
                    f(&mut entries);
                    entries.clone()
                };
                me.save(&snapshot)
            }
        };
        if self.path.is_none() {
            return apply();
        }
        tokio::task::spawn_blocking(apply)
            .await
            .unwrap_or_else(|e| Err(StateError::Task(e)))
    }

    /// A driver changes (or is about to change) `dn`, whose value before was
    /// `previous`, for `b`.
    pub(crate) async fn set_changed(
        self: &Arc<Self>,
        driver: &'static str,
        b: &Backend,
        dn: String,
        previous: Option<String>,
    ) -> Result<(), StateError> {
        let (k, suffix) = (key(driver, b), b.suffix.clone());
        self.update(move |m| {
            let e = m.entry(k).or_insert_with(|| Entry {
                driver: driver.into(),
                suffix,
                ..Entry::default()
            });
            e.changed = Some((dn, previous));
        })
        .await
    }

    /// What a driver changed for `b`, if anything (kept until
    /// [`StateFile::clear_changed`]).
    pub(crate) fn changed(&self, driver: &str, b: &Backend) -> Option<(String, Option<String>)> {
        self.lock()
            .get(&key(driver, b))
            .and_then(|e| e.changed.clone())
    }

    /// What a driver changed for `b` is undone (the entry itself stays until
    /// DONE succeeded).
    pub(crate) async fn clear_changed(
        self: &Arc<Self>,
        driver: &str,
        b: &Backend,
    ) -> Result<(), StateError> {
        let k = key(driver, b);
        self.update(move |m| {
            if let Some(e) = m.get_mut(&k) {
                e.changed = None;
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn corrupt_or_unwritable_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = StateFile::open(&path).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("state file {} is corrupt: ", path.display())),
            "{err}"
        );
        let err = StateFile::open(Path::new("/nonexistent/dir/state.json")).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Write {
                    action: "write",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("cannot write state file /nonexistent/dir/state.json: "),
            "{err}"
        );
    }
}
