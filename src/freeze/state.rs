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
    pub fn open(path: &Path) -> Result<Arc<StateFile>, String> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("state file {} is corrupt: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read state file {}: {e}", path.display())),
        };
        let s = StateFile {
            path: Some(path.to_owned()),
            entries: Mutex::new(entries),
            io: Mutex::new(()),
        };
        // Fail now, not in the middle of a freeze, if it cannot be written.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))
            .map_err(|e| format!("cannot write state file {}: {e}", path.display()))?;
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

    fn save(&self, entries: &BTreeMap<String, Entry>) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let fail = |what: &str, e: std::io::Error| {
            format!("cannot {what} state file {}: {e}", path.display())
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
    ) -> Result<(), String> {
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
            .unwrap_or_else(|e| Err(format!("state file write: {e}")))
    }

    /// A driver changes (or is about to change) `dn`, whose value before was
    /// `previous`, for `b`.
    pub(crate) async fn set_changed(
        self: &Arc<Self>,
        driver: &'static str,
        b: &Backend,
        dn: String,
        previous: Option<String>,
    ) -> Result<(), String> {
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
    ) -> Result<(), String> {
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
        assert!(StateFile::open(&path).unwrap_err().contains("corrupt"));
        let err = StateFile::open(Path::new("/nonexistent/dir/state.json")).unwrap_err();
        assert!(err.contains("cannot write"), "{err}");
    }
}
