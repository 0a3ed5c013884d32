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

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::backend::Backend;
use super::engine::{Driver, Step};

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

fn key(driver: &str, b: &Backend) -> String {
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

    fn keyed(&self) -> Vec<(String, Entry)> {
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
    async fn update(
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

/// A driver whose PREPARE and DONE are recorded in the state file: the
/// entry is written before PREPARE starts and removed once DONE succeeded.
pub struct Recorded {
    name: &'static str,
    inner: Arc<dyn Driver>,
    state: Arc<StateFile>,
}

impl Recorded {
    /// Wraps `inner` (named `name` in the state file).
    pub fn new(name: &'static str, inner: Arc<dyn Driver>, state: Arc<StateFile>) -> Self {
        Recorded { name, inner, state }
    }

    /// Runs the DONE step of everything a previous run left for the
    /// backends this driver serves, each under `deadline`; entries it cannot
    /// undo stay for the next start.
    pub async fn recover(&self, backends: &[Backend], deadline: std::time::Duration) {
        for (k, e) in self.state.keyed() {
            let Some(b) = backends.iter().find(|b| key(self.name, b) == k) else {
                continue;
            };
            warn!(
                backend = %b.suffix,
                driver = self.name,
                freeze_id = e.freeze_id,
                changed = ?e.changed,
                "a previous abproxy run ended while this backend was prepared for a backup: running its DONE step now"
            );
            let done = super::engine::run_step(self, Step::Done, b, e.freeze_id, deadline);
            match done.await {
                Ok(()) => info!(backend = %b.suffix, driver = self.name, "left-over freeze undone"),
                Err(err) => error!(
                    backend = %b.suffix,
                    driver = self.name,
                    "cannot undo what a previous run left (kept for the next start): {err}"
                ),
            }
        }
    }
}

impl Driver for Recorded {
    fn prepare<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let (k, name, suffix) = (key(self.name, backend), self.name, backend.suffix.clone());
            self.state
                .update(move |m| {
                    let e = m.entry(k).or_insert_with(|| Entry {
                        driver: name.into(),
                        suffix,
                        ..Entry::default()
                    });
                    e.freeze_id = freeze_id;
                })
                .await?;
            self.inner.prepare(backend, freeze_id).await
        })
    }

    fn done<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.inner.done(backend, freeze_id).await?;
            let k = key(self.name, backend);
            self.state
                .update(move |m| {
                    m.remove(&k);
                })
                .await
        })
    }

    fn check_partial<'a>(
        &'a self,
        backend: &'a Backend,
        frozen: &'a [Backend],
        all: &'a [Backend],
    ) -> BoxFuture<'a, Result<(), String>> {
        self.inner.check_partial(backend, frozen, all)
    }

    fn attach_state(&self, state: Arc<StateFile>, name: &'static str) {
        self.inner.attach_state(state, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn backend(s: &str) -> Backend {
        Backend::readonly(s)
    }

    #[derive(Default)]
    struct Counting(AtomicUsize, AtomicUsize);
    impl Driver for Counting {
        fn prepare<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), String>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn done<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), String>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn survives_a_restart_and_is_removed_when_undone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let b = backend("dc=Example,dc=org");
        {
            let state = StateFile::open(&path).unwrap();
            assert!(!path.exists(), "nothing to undo: no file");
            let d = Recorded::new("command", Arc::new(Counting::default()), state.clone());
            d.prepare(&b, 7).await.unwrap();
            state
                .set_changed("openldap", &b, "olcDatabase={1}mdb,cn=config".into(), None)
                .await
                .unwrap();
            // "Killed" here: the file is what the next run sees.
        }
        let state = StateFile::open(&path).unwrap();
        let mut left = state.entries();
        left.sort_by(|a, b| a.driver.cmp(&b.driver));
        assert_eq!(left.len(), 2);
        assert_eq!((left[0].driver.as_str(), left[0].freeze_id), ("command", 7));
        assert_eq!(
            left[1].changed,
            Some(("olcDatabase={1}mdb,cn=config".into(), None))
        );
        let inner = Arc::new(Counting::default());
        let d = Recorded::new("command", inner.clone(), state.clone());
        let deadline = std::time::Duration::from_secs(5);
        d.recover(&[backend("dc=example,dc=org")], deadline).await;
        assert_eq!(inner.1.load(Ordering::SeqCst), 1, "DONE ran once");
        assert_eq!(
            state.entries().len(),
            1,
            "the openldap entry is not this driver's"
        );
        let d = Recorded::new("openldap", inner.clone(), state.clone());
        d.recover(&[backend("dc=other,dc=org")], deadline).await;
        assert_eq!(
            inner.1.load(Ordering::SeqCst),
            1,
            "not a configured backend"
        );
        d.recover(&[backend("dc=example,dc=org")], deadline).await;
        assert!(state.entries().is_empty());
        assert!(!path.exists());
    }

    /// A DONE that never returns holds the start-up recovery only until its
    /// deadline, and its entry stays for the next start.
    #[tokio::test(start_paused = true)]
    async fn recovery_gives_up_on_a_hung_done_at_its_deadline() {
        struct Hung;
        impl Driver for Hung {
            fn done<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), String>> {
                Box::pin(std::future::pending())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let b = backend("dc=example,dc=org");
        let state = StateFile::open(&path).unwrap();
        let d = Recorded::new("command", Arc::new(Hung), state.clone());
        d.prepare(&b, 3).await.unwrap();
        let started = tokio::time::Instant::now();
        d.recover(&[b], std::time::Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(5));
        let left = StateFile::open(&path).unwrap().entries();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].driver.as_str(), left[0].freeze_id), ("command", 3));
    }

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
