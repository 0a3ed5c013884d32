//! The receiving end of the channels into a session's loops (commands from
//! the freeze engine, PDUs the proxy authored), polled only when it may hold
//! something.
//!
//! Each wake-up of a session task is a socket becoming readable; messages on
//! these channels are rare (a freeze, a shutdown, a notice). Polling an
//! empty tokio channel at every wake-up costs a budget check, two reads of
//! its block list and a waker registration: measurable at one wake-up per
//! LDAP message (`cargo bench --bench load`, proxy CPU per operation).
//!
//! So the inbox polls its channel with a waker of its own, which raises a
//! flag and then wakes the task. Once a poll has ended `Pending` (the
//! channel then holds that waker), later polls of the inbox only look at the
//! flag until it is up: the channel wakes that waker after a message is in
//! it (or when the last sender goes), so a raised flag always means "poll
//! the channel again". Senders are plain tokio senders. (The inbox is polled
//! in every turn of its loop's `select!`, never left out by a precondition:
//! a wake-up re-polls the same `select!`, which must include it.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio::sync::mpsc;

/// A tokio receiver the inbox can poll.
pub trait PollRecv {
    /// What the channel carries.
    type Item;
    /// `mpsc::Receiver::poll_recv` and friends.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::Item>>;
    /// A message without waiting, if one is there.
    fn try_recv(&mut self) -> Option<Self::Item>;
}

impl<T> PollRecv for mpsc::Receiver<T> {
    type Item = T;
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        mpsc::Receiver::poll_recv(self, cx)
    }
    fn try_recv(&mut self) -> Option<T> {
        mpsc::Receiver::try_recv(self).ok()
    }
}

impl<T> PollRecv for mpsc::UnboundedReceiver<T> {
    type Item = T;
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        mpsc::UnboundedReceiver::poll_recv(self, cx)
    }
    fn try_recv(&mut self) -> Option<T> {
        mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// The waker the channel holds: flag first, then the task.
#[derive(Default)]
struct Flag {
    up: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.up.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// The receiving side of a session channel.
pub struct Inbox<R> {
    rx: R,
    flag: Arc<Flag>,
    /// `flag` as a waker, made once.
    waker: Waker,
    /// The last poll ended `Pending` and the flag has stayed down since:
    /// nothing can be in the channel.
    armed: bool,
}

impl<R> Inbox<R> {
    /// Wraps a tokio receiver.
    pub fn new(rx: R) -> Self {
        let flag = Arc::new(Flag::default());
        Inbox {
            rx,
            waker: Waker::from(flag.clone()),
            flag,
            armed: false,
        }
    }
}

impl<R: PollRecv> Inbox<R> {
    /// The next message (`None` once every sender is gone); cancel-safe.
    /// One task polls a given inbox (a session loop its own): while the
    /// flag stays down, the wakers left at the last `Pending` poll are still
    /// in place, so a poll is then an atomic load. A future of its own
    /// rather than an `async fn`: made and dropped at every turn of its
    /// loop's `select!`, where an async wrapper's state machine cost about
    /// as much as the poll (callgrind).
    #[inline]
    pub fn recv(&mut self) -> Recv<'_, R> {
        Recv { inbox: self }
    }

    /// [`Inbox::recv`] as a poll, for a loop that polls its sources by
    /// hand. The usual poll, an empty inbox whose wakers are in place, is inlined
    /// into the loop: two loads, no call.
    #[inline(always)]
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<R::Item>> {
        if self.armed && !self.flag.up.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        self.poll_channel(cx)
    }

    /// [`Inbox::poll_recv`] past its fast path: the flag is up, or the
    /// last poll did not end `Pending`.
    #[inline(never)]
    fn poll_channel(&mut self, cx: &mut Context<'_>) -> Poll<Option<R::Item>> {
        if self.armed {
            self.flag.up.store(false, Ordering::Relaxed);
            self.armed = false;
        }
        // The task first: a message arriving between the two steps
        // still reaches it.
        self.flag.task.register(cx.waker());
        let p = self.rx.poll_recv(&mut Context::from_waker(&self.waker));
        self.armed = p.is_pending();
        p
    }

    /// A message already there, without waiting.
    pub fn try_recv(&mut self) -> Option<R::Item> {
        self.armed = false;
        self.rx.try_recv()
    }
}

/// The future of [`Inbox::recv`].
pub struct Recv<'a, R> {
    inbox: &'a mut Inbox<R>,
}

impl<R: PollRecv> std::future::Future for Recv<'_, R> {
    type Output = Option<R::Item>;

    #[inline]
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().inbox.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn polls_the_channel_again_only_after_a_send() {
        let (tx, rx) = mpsc::unbounded_channel::<u32>();
        let mut inbox = Inbox::new(rx);
        assert_eq!(inbox.recv().now_or_never(), None, "empty: pending");
        assert!(inbox.armed, "the channel holds the inbox's waker");
        assert_eq!(inbox.recv().now_or_never(), None);
        assert!(inbox.armed, "nothing sent: still only the flag is read");
        tx.send(7).unwrap();
        assert!(
            inbox.flag.up.load(Ordering::Relaxed),
            "a send raises the flag"
        );
        assert_eq!(inbox.recv().now_or_never(), Some(Some(7)));
        assert!(!inbox.armed, "after a message, poll until seen empty");
        tx.send(8).unwrap();
        tx.send(9).unwrap();
        assert_eq!(inbox.recv().now_or_never(), Some(Some(8)));
        assert_eq!(inbox.recv().now_or_never(), Some(Some(9)));
        assert_eq!(inbox.recv().now_or_never(), None);
        assert!(inbox.armed);
        drop(tx);
        assert_eq!(
            inbox.recv().now_or_never(),
            Some(None),
            "the last sender going wakes it too"
        );
    }

    /// The loops' pattern: one `select!` per turn, waiting on the inbox and
    /// on something else; a message sent while the `select!` waits wakes it
    /// and is received in that same `select!`.
    #[tokio::test]
    async fn a_message_wakes_a_waiting_select() {
        let (tx, rx) = mpsc::channel::<u32>(4);
        let (other_tx, mut other_rx) = mpsc::channel::<()>(1);
        let (turns_tx, mut turns) = mpsc::unbounded_channel::<()>();
        let mut inbox = Inbox::new(rx);
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 3 {
                let _ = turns_tx.send(());
                tokio::select! {
                    biased;
                    Some(v) = inbox.recv() => got.push(v),
                    Some(()) = other_rx.recv() => {}
                }
            }
            got
        });
        for v in 1..=3 {
            // Let the waiter start its turn and wait (armed) first.
            turns.recv().await.unwrap();
            other_tx.send(()).await.unwrap();
            turns.recv().await.unwrap();
            tokio::task::yield_now().await;
            tx.send(v).await.unwrap();
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("every message woke the waiting select");
        assert_eq!(got.unwrap(), vec![1, 2, 3]);
    }
}
