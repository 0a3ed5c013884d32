//! Where sessions run: the first few on each thread as tokio tasks of their
//! own, the others as futures of one pool task per thread.
//!
//! A proxy's work per LDAP operation is small, and each operation wakes two
//! futures (the request's arrival wakes the requests loop, the response's
//! the responses loop). As tokio tasks, each of those wake-ups goes through
//! the runtime's scheduler: the task's state word, its run queue, its
//! harness (about 300 instructions a wake-up, callgrind, search at 32
//! connections). A pool holds many sessions' futures in one task: a wake-up
//! is a flag and a push on the pool's lock-free ready list ([`Ready`]), and
//! one poll of the pool serves every future the runtime's I/O driver found
//! ready in that turn. `futures`' `FuturesUnordered` does the same with
//! more bookkeeping (its list of every future, relinked at each poll);
//! measured here it kept about a third of what the pool saves, hence this
//! small executor. With one session alone nothing else is ready in the
//! same turn, and the pool's wake-up and poll only add to the runtime's
//! (about 6 % more instructions per operation at one connection): so the
//! first `session_tasks_per_thread` sessions of each thread run as tasks
//! of their own ([`Pools::seat`]).
//!
//! What a task gave a session is kept: a panic ends that future only
//! (caught, logged), the runtime's cooperative budget still bounds the I/O
//! of one poll of the pool, and a poll of the pool polls each future at
//! most once before it yields to the runtime, so a session that always has
//! work does not starve the others. With several worker threads the proxy
//! runs one pool per worker, each new session seated in the pool with the
//! fewest, and the runtime moves pools between workers as it moves tasks.
//!
//! A pool ends once its [`Pools`] is dropped and its last future ended.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use tracing::error;

use crate::sync::lock;

type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A proxy's pools, started on the runtime of the first session placed in
/// one.
#[derive(Default)]
pub struct Pools {
    pools: OnceLock<Vec<Arc<Inner>>>,
    /// Sessions that run as tasks of their own, per worker, before new
    /// ones join a pool.
    tasks_per_worker: usize,
    /// Sessions running as tasks of their own, not yet ended.
    tasks: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("pools", &self.pools.get().map_or(0, Vec::len))
            .field("tasks_per_worker", &self.tasks_per_worker)
            .field("tasks", &self.tasks.load(Ordering::Relaxed))
            .finish()
    }
}

impl Pools {
    /// Pools that let the first `tasks_per_worker` sessions per worker
    /// thread run as tasks of their own (0: every session in a pool).
    pub fn new(tasks_per_worker: usize) -> Pools {
        Pools {
            pools: OnceLock::new(),
            tasks_per_worker,
            tasks: Arc::default(),
        }
    }

    /// Where a new session runs: as tokio tasks of its own while fewer
    /// than `tasks_per_worker` per worker thread do (with few sessions
    /// nothing else is likely ready in the same turn, and a pool would only
    /// add its own wake-up and poll to the runtime's), else in the pool
    /// with the fewest sessions. Its place is kept until the [`Seat`] is
    /// dropped.
    pub fn seat(&self) -> Seat {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let limit = self.tasks_per_worker.saturating_mul(workers.max(1));
        if self.tasks.fetch_add(1, Ordering::Relaxed) < limit {
            return Seat(Seated::Task(self.tasks.clone()));
        }
        self.tasks.fetch_sub(1, Ordering::Relaxed);
        let pools = self.pools.get_or_init(start);
        let pool = pools
            .iter()
            .min_by_key(|p| p.sessions.load(Ordering::Relaxed))
            .expect("at least one pool");
        pool.sessions.fetch_add(1, Ordering::Relaxed);
        Seat(Seated::Pool(pool.clone()))
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

/// A session's seat: where it runs ([`Seat::place`]), counted there until
/// this is dropped.
pub struct Seat(Seated);

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.place().fmt(f)
    }
}

enum Seated {
    /// As tasks of its own, one of the count of them.
    Task(Arc<AtomicUsize>),
    /// In this pool, one of its sessions.
    Pool(Arc<Inner>),
}

impl Seat {
    /// Where the session's futures run.
    pub fn place(&self) -> Place {
        match &self.0 {
            Seated::Task(_) => Place(None),
            Seated::Pool(pool) => Place(Some(pool.clone())),
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        match &self.0 {
            Seated::Task(tasks) => tasks.fetch_sub(1, Ordering::Relaxed),
            Seated::Pool(pool) => pool.sessions.fetch_sub(1, Ordering::Relaxed),
        };
    }
}

/// Where one session's futures run: tokio tasks of their own, or a pool.
#[derive(Clone)]
pub struct Place(Option<Arc<Inner>>);

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "pool" } else { "task" })
    }
}

impl Place {
    /// Tasks of their own.
    pub fn task() -> Place {
        Place(None)
    }

    /// Runs `f` here.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        match &self.0 {
            None => {
                tokio::spawn(f);
            }
            Some(pool) => {
                lock(&pool.incoming).push(Box::pin(f));
                pool.has_incoming.store(true, Ordering::Release);
                pool.notify();
            }
        }
    }

    /// The session runs in a pool.
    pub fn pooled(&self) -> bool {
        self.0.is_some()
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
    /// The futures woken since the pool last looked (see [`Ready`]).
    ready: Ready,
    /// The pool's task (its waker, set at its first poll: a task's waker
    /// stays the same for its life).
    parent: OnceLock<Waker>,
    /// The pool's task was woken since its last poll began (or its first
    /// poll has not begun): later wake-ups leave it alone.
    notified: AtomicBool,
    /// No future will be spawned any more.
    closed: AtomicBool,
    /// Sessions seated here and not yet ended (to seat new ones evenly).
    sessions: AtomicUsize,
    /// The pool's task ended: what is pushed on `ready` from now on is
    /// taken (and dropped) by the wake-up that pushed it.
    ended: AtomicBool,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            incoming: Mutex::default(),
            has_incoming: AtomicBool::new(false),
            ready: Ready::default(),
            parent: OnceLock::new(),
            // Its first poll takes whatever came before.
            notified: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
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
    /// The slot below this one on the ready list (written by the wake-up
    /// that pushes it, read by the pool that takes the list).
    next: AtomicPtr<Slot>,
    inner: Arc<Inner>,
}

/// The ready list: a stack of slots linked through [`Slot::next`], pushed
/// by wake-ups (from any thread) and only ever taken whole by the pool.
/// Without a lock a wake-up is a compare-and-swap. Taking it whole is what
/// makes the stack safe without more: no slot is popped alone, so none
/// can leave and come back between a push's read of the top and its swap
/// (the ABA problem of such stacks); and a slot is on it at most once (its
/// `queued` flag), each holding one count of its `Arc` from push to take.
#[derive(Default)]
struct Ready {
    top: AtomicPtr<Slot>,
}

impl Ready {
    /// Pushes `slot` (whose `queued` flag this caller set).
    #[inline]
    fn push(&self, slot: Arc<Slot>) {
        let node = Arc::into_raw(slot).cast_mut();
        let mut top = self.top.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` came from `Arc::into_raw` just above and is
            // not on the list yet: no one else writes its `next`.
            unsafe { (*node).next.store(top, Ordering::Relaxed) };
            match self
                .top
                .compare_exchange_weak(top, node, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(now) => top = now,
            }
        }
    }

    /// Takes every slot on the list into `into`, in the order pushed.
    fn take(&self, into: &mut Vec<Arc<Slot>>) {
        let start = into.len();
        // AcqRel with the pushes' AcqRel: a push after the pool's last
        // take (which follows its store of `ended`) sees that store.
        let mut node = self.top.swap(std::ptr::null_mut(), Ordering::AcqRel);
        while !node.is_null() {
            // SAFETY: every node on the list came from `Arc::into_raw` in
            // `push` and is owned by the list until taken, here, once; its
            // `next` was written before the push that published it (the
            // swap above acquires that).
            let slot = unsafe { Arc::from_raw(node) };
            node = slot.next.load(Ordering::Relaxed);
            into.push(slot);
        }
        into[start..].reverse();
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        let mut left = Vec::new();
        self.take(&mut left);
    }
}

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    #[inline]
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.inner.ready.push(self.clone());
            self.inner.notify();
            if self.inner.ended.load(Ordering::Acquire) {
                // The pool ended before this push: no one will take it.
                // (Either the pool's last take or this one gets it.)
                self.inner.ready.take(&mut Vec::new());
            }
        }
    }
}

/// A future of the pool, with its waker.
struct Entry {
    job: Job,
    slot: Arc<Slot>,
    waker: Waker,
}

async fn run(inner: Arc<Inner>) {
    let mut entries: Vec<Option<Entry>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut live = 0usize;
    // The ready list taken from `inner` (kept: no allocation per turn).
    let mut batch: Vec<Arc<Slot>> = Vec::new();
    std::future::poll_fn(|cx| {
        inner.parent.get_or_init(|| cx.waker().clone());
        let mut polled = 0usize;
        loop {
            // Before anything is taken: a wake-up from now on wakes the
            // task again (and asks for another round below).
            inner.notified.store(false, Ordering::Release);
            inner.ready.take(&mut batch);
            if inner.has_incoming.swap(false, Ordering::AcqRel) {
                for job in std::mem::take(&mut *lock(&inner.incoming)) {
                    let index = free.pop().unwrap_or_else(|| {
                        entries.push(None);
                        entries.len() - 1
                    });
                    let slot = Arc::new(Slot {
                        index,
                        queued: AtomicBool::new(true),
                        next: AtomicPtr::default(),
                        inner: inner.clone(),
                    });
                    let waker = Waker::from(slot.clone());
                    batch.push(slot.clone());
                    entries[index] = Some(Entry { job, slot, waker });
                    live += 1;
                }
            }
            if batch.is_empty() {
                break;
            }
            for slot in batch.drain(..) {
                let index = slot.index;
                // A stale waker's slot (its future ended, its index maybe
                // another's since): nothing to poll.
                let Some(entry) = entries
                    .get_mut(index)
                    .and_then(Option::as_mut)
                    .filter(|e| Arc::ptr_eq(&e.slot, &slot))
                else {
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
            // Stale wakers may still push: they take back what they push
            // from now on (see `Slot::wake_by_ref`), this takes the rest.
            inner.ended.store(true, Ordering::Release);
            inner.ready.take(&mut Vec::new());
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

    /// Seats a session in `pools` and runs `f` there for it.
    fn spawn(pools: &Pools, f: impl Future<Output = ()> + Send + 'static) {
        let seat = pools.seat();
        seat.place().spawn(async move {
            f.await;
            drop(seat);
        });
    }

    #[tokio::test]
    async fn the_first_sessions_run_as_tasks_the_others_in_a_pool() {
        let pools = Pools::new(2);
        let a = pools.seat();
        let b = pools.seat();
        let c = pools.seat();
        assert!(!a.place().pooled() && !b.place().pooled());
        assert!(c.place().pooled());
        // A seat is counted until dropped: one of the first two ended, the
        // next session runs as a task again.
        drop(a);
        let d = pools.seat();
        assert!(!d.place().pooled());
        let e = pools.seat();
        assert!(e.place().pooled());
        drop((b, c, d, e));
        assert_eq!(pools.tasks.load(Ordering::Relaxed), 0);
        let p = pools.pools.get().unwrap();
        assert_eq!(p[0].sessions.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_are_seated_in_the_emptiest_pool() {
        let pools = Pools::new(0);
        let sessions = |seats: &[Seat]| {
            let mut n: Vec<usize> = pools
                .pools
                .get()
                .unwrap()
                .iter()
                .map(|p| {
                    seats
                        .iter()
                        .filter(|s| s.place().0.is_some_and(|q| Arc::ptr_eq(p, &q)))
                        .count()
                })
                .collect();
            n.sort();
            n
        };
        let mut seats: Vec<Seat> = (0..6).map(|_| pools.seat()).collect();
        assert_eq!(sessions(&seats), [3, 3]);
        // Three sessions of one pool end: the next three go to it.
        let first = seats[0].place().0.unwrap();
        seats.retain(|s| !Arc::ptr_eq(&s.place().0.unwrap(), &first));
        assert_eq!(sessions(&seats), [0, 3]);
        seats.extend((0..3).map(|_| pools.seat()));
        assert_eq!(sessions(&seats), [3, 3]);
    }

    fn slot(inner: &Arc<Inner>, index: usize) -> Arc<Slot> {
        Arc::new(Slot {
            index,
            queued: AtomicBool::new(false),
            next: AtomicPtr::default(),
            inner: inner.clone(),
        })
    }

    #[test]
    fn the_ready_list_gives_each_wake_up_once_in_order() {
        let inner = Arc::new(Inner::default());
        let slots: Vec<_> = (0..4).map(|i| slot(&inner, i)).collect();
        for i in [2, 0, 3] {
            Waker::from(slots[i].clone()).wake_by_ref();
            // Queued already: a second wake-up adds nothing.
            Waker::from(slots[i].clone()).wake();
        }
        let mut got = Vec::new();
        inner.ready.take(&mut got);
        assert_eq!(got.iter().map(|s| s.index).collect::<Vec<_>>(), [2, 0, 3]);
        inner.ready.take(&mut got);
        assert_eq!(got.len(), 3, "taken once");
        drop(got);
        // The list held one count of each slot's Arc, given back.
        assert!(slots.iter().all(|s| Arc::strong_count(s) == 1));
    }

    #[test]
    fn wake_ups_from_many_threads_are_all_taken() {
        let inner = Arc::new(Inner::default());
        let slots: Vec<_> = (0..4000).map(|i| slot(&inner, i)).collect();
        let mut seen = vec![0u32; slots.len()];
        std::thread::scope(|scope| {
            for part in slots.chunks(1000) {
                scope.spawn(move || {
                    for s in part {
                        Waker::from(s.clone()).wake();
                    }
                });
            }
            let mut got = Vec::new();
            let mut taken = 0;
            while taken < slots.len() {
                inner.ready.take(&mut got);
                taken += got.len();
                for s in got.drain(..) {
                    seen[s.index] += 1;
                }
                std::thread::yield_now();
            }
        });
        assert!(seen.iter().all(|&n| n == 1), "each slot taken exactly once");
        assert!(slots.iter().all(|s| Arc::strong_count(s) == 1));
    }

    #[test]
    fn a_wake_up_after_the_pool_ended_is_taken_back() {
        let inner = Arc::new(Inner::default());
        inner.ended.store(true, Ordering::Release);
        let s = slot(&inner, 0);
        Waker::from(s.clone()).wake();
        assert!(inner.ready.top.load(Ordering::Acquire).is_null());
        assert_eq!(Arc::strong_count(&s), 1, "nothing left holding it");
    }

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
            spawn(&pools, async move {
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
        spawn(&pools, async move {
            wait.await.unwrap();
            tx.send("after").unwrap();
        });
        spawn(&pools, async { panic!("this session only") });
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
        spawn(
            &pools,
            Busy {
                polls: polls.clone(),
            },
        );
        // Another future of the same pool, and this test (a task of the
        // runtime), both get their turns while it spins: well before its
        // limit, which it would reach first if a poll of the pool polled it
        // again and again.
        let (tx, rx) = oneshot::channel();
        spawn(&pools, async move {
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
        spawn(&pools, async move {
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
        spawn(&pools, async move {
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
            spawn(&pools, async move {
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
