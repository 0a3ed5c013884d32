//! A driver whose steps are recorded in the state file ([`StateFile`]), so
//! that what it changed on the server is undone after a crash.

use std::sync::Arc;

use futures::future::BoxFuture;
use tracing::{error, info, warn};

use super::{Driver, DriverError, Step};
use crate::freeze::backend::Backend;
use crate::freeze::state::{key, Entry, StateFile};

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
            let done = super::run_step(self, Step::Done, b, e.freeze_id, deadline);
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

/// Every method of [`Driver`] goes to the wrapped driver: the proxy wraps
/// each configured one, so a method left to its default here would never
/// reach it.
impl Driver for Recorded {
    fn prepare<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
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
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.inner.done(backend, freeze_id).await?;
            let k = key(self.name, backend);
            self.state
                .update(move |m| {
                    m.remove(&k);
                })
                .await
                .map_err(DriverError::from)
        })
    }

    fn bind_writes<'a>(
        &'a self,
        backend: &'a Backend,
    ) -> BoxFuture<'a, Result<Option<String>, DriverError>> {
        self.inner.bind_writes(backend)
    }

    fn check_partial<'a>(
        &'a self,
        backend: &'a Backend,
        frozen: &'a [Backend],
        all: &'a [Backend],
    ) -> BoxFuture<'a, Result<(), DriverError>> {
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
        fn prepare<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), DriverError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn done<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), DriverError>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    /// The proxy wraps every configured driver in `Recorded`: what the
    /// engine asks a driver before a freeze must reach the one inside.
    #[tokio::test]
    async fn the_questions_before_a_freeze_reach_the_wrapped_driver() {
        struct Says;
        impl Driver for Says {
            fn bind_writes<'a>(
                &'a self,
                _: &'a Backend,
            ) -> BoxFuture<'a, Result<Option<String>, DriverError>> {
                Box::pin(async { Ok(Some("olcLastBind: TRUE".into())) })
            }
            fn check_partial<'a>(
                &'a self,
                _: &'a Backend,
                _: &'a [Backend],
                _: &'a [Backend],
            ) -> BoxFuture<'a, Result<(), DriverError>> {
                Box::pin(async { Err(DriverError::other("refint")) })
            }
        }
        let b = backend("dc=example,dc=org");
        let d = Recorded::new("openldap", Arc::new(Says), StateFile::memory());
        assert_eq!(
            d.bind_writes(&b).await.unwrap(),
            Some("olcLastBind: TRUE".into())
        );
        let refused = d.check_partial(&b, &[], std::slice::from_ref(&b)).await;
        assert_eq!(refused.unwrap_err().to_string(), "refint");
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
            fn done<'a>(
                &'a self,
                _: &'a Backend,
                _: u64,
            ) -> BoxFuture<'a, Result<(), DriverError>> {
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
}
