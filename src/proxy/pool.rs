//! Sessions run as futures of a pool task, not as tokio tasks of their own.
//!
//! A proxy's work per LDAP operation is small, and each operation wakes two
//! futures (the request's arrival wakes the requests loop, the response's
//! the responses loop). As tokio tasks, each of those wake-ups goes through
//! the runtime's scheduler: the task's state word, its run queue, its
//! harness (about 300 instructions a wake-up, callgrind, search at 32
//! connections). A pool holds many sessions' futures in one task: a wake-up
//! is a flag and a push on the pool's ready list, and one poll of the pool
//! serves every future the runtime's I/O driver found ready in that turn.
//! `futures`' `FuturesUnordered` does the same with more bookkeeping (its
//! list of every future, relinked at each poll); measured here it kept
//! about a third of what the pool saves, hence this small executor.
//!
//! What a task gave a session is kept: a panic ends that future only
//! (caught, logged), the runtime's cooperative budget still bounds the I/O
//! of one poll of the pool, and a poll of the pool polls each future at
//! most once before it yields to the runtime, so a session that always has
//! work does not starve the others. With several worker threads the proxy
//! runs one pool per worker, futures dealt out in turn, and the runtime
//! moves pools between workers as it moved tasks.
//!
//! A pool ends once its [`Pools`] is dropped and its last future ended.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use tracing::error;

type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A proxy's pools, started on the runtime of the first future spawned.
#[derive(Default)]
pub struct Pools {
    pools: OnceLock<Vec<Arc<Inner>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("pools", &self.pools.get().map_or(0, Vec::len))
            .finish()
    }
}

impl Pools {
    /// Runs `f` on the next pool in turn.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let pools = self.pools.get_or_init(start);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % pools.len();
        let pool = &pools[i];
        lock(&pool.incoming).push(Box::pin(f));
        pool.has_incoming.store(true, Ordering::Release);
        pool.notify();
    }
}

impl Drop for Pools {
    fn drop(&mut self) {
        for pool in self.pools.get().into_iter().flatten() {
            pool.closed.store(true, Ordering::Release);
            pool.notify();
        }
    }
}

/// One pool per worker of the current runtime.
fn start() -> Vec<Arc<Inner>> {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    (0..workers.max(1))
        .map(|_| {
            let inner = Arc::new(Inner::default());
            tokio::spawn(run(inner.clone()));
            inner
        })
        .collect()
}

/// What a pool shares with its wakers and its [`Pools`].
struct Inner {
    /// Futures to take in.
    incoming: Mutex<Vec<Job>>,
    /// `incoming` may hold some (no lock taken to find it empty).
    has_incoming: AtomicBool,
    /// Indices of the futures woken since the pool last looked.
    ready: Mutex<Vec<usize>>,
    /// The pool's task (its waker, set at its first poll: a task's waker
    /// stays the same for its life).
    parent: OnceLock<Waker>,
    /// The pool's task was woken since its last poll began (or its first
    /// poll has not begun): later wake-ups leave it alone.
    notified: AtomicBool,
    /// No future will be spawned any more.
    closed: AtomicBool,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            incoming: Mutex::default(),
            has_incoming: AtomicBool::new(false),
            ready: Mutex::default(),
            parent: OnceLock::new(),
            // Its first poll takes whatever came before.
            notified: AtomicBool::new(true),
            closed: AtomicBool::new(false),
        }
    }
}

impl Inner {
    /// Wakes the pool's task, unless that was done since its poll began.
    #[inline]
    fn notify(&self) {
        if !self.notified.load(Ordering::Acquire) && !self.notified.swap(true, Ordering::AcqRel) {
            if let Some(parent) = self.parent.get() {
                parent.wake_by_ref();
            }
        }
    }
}

/// The waker of one future of a pool.
struct Slot {
    index: usize,
    /// On the ready list (or being taken in): a wake-up has nothing to do.
    queued: AtomicBool,
    inner: Arc<Inner>,
}

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    #[inline]
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.inner.ready).push(self.index);
            self.inner.notify();
        }
    }
}

/// A future of the pool, with its waker.
struct Entry {
    job: Job,
    slot: Arc<Slot>,
    waker: Waker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run(inner: Arc<Inner>) {
    let mut entries: Vec<Option<Entry>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut live = 0usize;
    // The ready list taken from `inner`, and given back empty (no
    // allocation per turn).
    let mut batch: Vec<usize> = Vec::new();
    std::future::poll_fn(|cx| {
        inner.parent.get_or_init(|| cx.waker().clone());
        let mut polled = 0usize;
        loop {
            // Before anything is taken: a wake-up from now on wakes the
            // task again (and asks for another round below).
            inner.notified.store(false, Ordering::Release);
            // `batch` is empty here: it takes the ready list whole, and
            // gives `inner` back an empty one with its room.
            std::mem::swap(&mut *lock(&inner.ready), &mut batch);
            if inner.has_incoming.swap(false, Ordering::AcqRel) {
                for job in std::mem::take(&mut *lock(&inner.incoming)) {
                    let index = free.pop().unwrap_or_else(|| {
                        entries.push(None);
                        entries.len() - 1
                    });
                    let slot = Arc::new(Slot {
                        index,
                        queued: AtomicBool::new(true),
                        inner: inner.clone(),
                    });
                    let waker = Waker::from(slot.clone());
                    entries[index] = Some(Entry { job, slot, waker });
                    live += 1;
                    batch.push(index);
                }
            }
            if batch.is_empty() {
                break;
            }
            for index in batch.drain(..) {
                // A stale waker of a future that ended (its index maybe
                // reused since): at worst one spurious poll.
                let Some(entry) = entries.get_mut(index).and_then(Option::as_mut) else {
                    continue;
                };
                // Before the poll: a wake-up during it queues the future again.
                entry.slot.queued.store(false, Ordering::Release);
                let mut cx = Context::from_waker(&entry.waker);
                let job = &mut entry.job;
                let done =
                    match std::panic::catch_unwind(AssertUnwindSafe(|| job.as_mut().poll(&mut cx)))
                    {
                        Ok(Poll::Pending) => false,
                        Ok(Poll::Ready(())) => true,
                        Err(panic) => {
                            error!("a session panicked and was ended: {}", what(&*panic));
                            true
                        }
                    };
                if done {
                    // Dropped here: a future's drop may panic too.
                    let entry = entries[index].take();
                    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| drop(entry))) {
                        error!("a session panicked as it ended: {}", what(&*panic));
                    }
                    free.push(index);
                    live -= 1;
                }
                polled += 1;
            }
            // Nothing woke meanwhile: nothing is ready (the usual end).
            if !inner.notified.load(Ordering::Acquire) {
                break;
            }
            if polled >= live.max(1) {
                // Each future had its turn: let the runtime run the rest
                // (its I/O driver, other tasks) before the next round; the
                // wake-up that came meanwhile polls this task again.
                return Poll::Pending;
            }
        }
        if live == 0 && inner.closed.load(Ordering::Acquire) && lock(&inner.incoming).is_empty() {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}

/// A panic's message.
fn what(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{mpsc, oneshot};

    /// Polls the runtime until `done` holds (each yield lets every task of
    /// the current-thread runtime run once), at most `turns` times.
    async fn until(turns: usize, done: impl Fn() -> bool) -> bool {
        for _ in 0..turns {
            if done() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        done()
    }

    #[tokio::test]
    async fn futures_run_to_their_end_each_when_woken() {
        let pools = Pools::default();
        let (armed_tx, mut armed) = mpsc::unbounded_channel();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut gates = Vec::new();
        for i in 0..50 {
            let (go, wait) = oneshot::channel::<()>();
            gates.push(go);
            let (armed_tx, tx) = (armed_tx.clone(), tx.clone());
            pools.spawn(async move {
                armed_tx.send(i).unwrap();
                wait.await.unwrap();
                tx.send(i).unwrap();
            });
        }
        for _ in 0..50 {
            armed.recv().await.unwrap();
        }
        // Every future waits on its gate; opened one at a time, in reverse,
        // each runs when (and only when) its own waker fires.
        for (i, go) in gates.into_iter().enumerate().rev() {
            go.send(()).unwrap();
            assert_eq!(rx.recv().await, Some(i));
            assert!(rx.try_recv().is_err());
        }
    }

    #[tokio::test]
    async fn a_panic_ends_its_future_only() {
        let pools = Pools::default();
        let (tx, rx) = oneshot::channel();
        let (go, wait) = oneshot::channel::<()>();
        pools.spawn(async move {
            wait.await.unwrap();
            tx.send("after").unwrap();
        });
        pools.spawn(async { panic!("this session only") });
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        assert_eq!(rx.await.unwrap(), "after");
    }

    /// A future that is always ready again (it wakes itself at every poll),
    /// for at most `LIMIT` polls.
    struct Busy {
        polls: Arc<AtomicUsize>,
    }

    const LIMIT: usize = 100_000;

    impl Future for Busy {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.polls.fetch_add(1, Ordering::Relaxed) + 1 >= LIMIT {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_busy_future_starves_neither_the_pool_nor_the_runtime() {
        let pools = Pools::default();
        let polls = Arc::new(AtomicUsize::new(0));
        pools.spawn(Busy {
            polls: polls.clone(),
        });
        // Another future of the same pool, and this test (a task of the
        // runtime), both get their turns while it spins: well before its
        // limit, which it would reach first if a poll of the pool polled it
        // again and again.
        let (tx, rx) = oneshot::channel();
        pools.spawn(async move {
            tokio::task::yield_now().await;
            tx.send(()).unwrap();
        });
        rx.await.unwrap();
        let seen = polls.load(Ordering::Relaxed);
        assert!((1..LIMIT / 10).contains(&seen), "{seen} polls");
    }

    #[tokio::test]
    async fn a_stale_waker_wakes_nothing_wrong() {
        let pools = Pools::default();
        let kept: Arc<Mutex<Option<Waker>>> = Arc::default();
        let k = kept.clone();
        let (tx, rx) = oneshot::channel();
        pools.spawn(async move {
            std::future::poll_fn(|cx| {
                *lock(&k) = Some(cx.waker().clone());
                Poll::Ready(())
            })
            .await;
            tx.send(()).unwrap();
        });
        rx.await.unwrap();
        // The next future takes the ended one's place; the old waker fires.
        let (go, wait) = oneshot::channel::<()>();
        let (tx, rx) = oneshot::channel();
        pools.spawn(async move {
            wait.await.unwrap();
            tx.send(()).unwrap();
        });
        tokio::task::yield_now().await;
        lock(&kept).take().unwrap().wake();
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        rx.await.unwrap();
    }

    #[test]
    fn a_pool_ends_with_its_pools_and_its_last_future() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let pools = Pools::default();
            let (go, wait) = oneshot::channel::<()>();
            pools.spawn(async move {
                let _ = wait.await;
            });
            let alive = || {
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
            };
            assert!(until(10, || alive() == 1).await, "the pool runs");
            drop(pools);
            tokio::task::yield_now().await;
            assert_eq!(alive(), 1, "a future still runs: the pool waits for it");
            go.send(()).unwrap();
            assert!(until(10, || alive() == 0).await, "then it ends");
        });
    }
}
