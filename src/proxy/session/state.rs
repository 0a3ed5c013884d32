//! State both loops of a session share.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, Notify};

use super::carry::Carry;
use super::{lock, UpIn};

use crate::freeze::participant::{AbandonedRead, InFlight, InFlightTable, Participant, Suppressed};
use crate::wire::op;

/// State both loops of a session share; what the freeze engine reads of
/// it (the in-flight table, the bound DN) is its [`Participant`].
#[derive(Default)]
pub(super) struct SessionState {
    /// Shared with the freeze engine (the session's `SessionHandle`).
    pub(super) participant: Arc<Participant>,
    /// Signalled whenever a request leaves the in-flight table.
    pub(super) completed: Notify,
    /// Message IDs answered by the proxy (drain time limit) whose server
    /// responses must not reach the client any more.
    pub(super) suppressed: Suppressed,
    /// A shutdown waits for the in-flight table to empty: only then are
    /// completions signalled (a Notify takes a lock even with no waiter).
    pub(super) shutdown_waiting: AtomicBool,
    /// In-flight root DSE reads and persistent searches: only while there
    /// are some do search entries need a look at the in-flight table.
    pub(super) specials: AtomicUsize,
    /// A SASL bind succeeded: later non-LDAP bytes are probably a SASL
    /// security layer.
    pub(super) sasl_bound: AtomicBool,
    /// The client went away (EOF or unbind): no notice on upstream close.
    pub(super) client_gone: AtomicBool,
    /// The upstream sent its own Notice of Disconnection.
    pub(super) upstream_noticed: AtomicBool,
    /// Requests the proxy answers itself later (Allow-Backup during its
    /// drain): outstanding for StartTLS.
    pub(super) local_pending: AtomicUsize,
    /// The request size limit in force (read by the client codec at each
    /// header): `pdu_limits.0` until a bind succeeds, then `pdu_limits.1`.
    pub(super) pdu_limit: Arc<AtomicUsize>,
    /// Request size limits (anonymous, authenticated).
    pub(super) pdu_limits: (usize, usize),
    /// Requests in flight upstream, persistent searches not counted.
    pub(super) outstanding: AtomicUsize,
    /// `max_outstanding_per_conn`.
    pub(super) max_outstanding: usize,
    /// Signalled (one permit) when `outstanding` falls below the limit.
    pub(super) room: Notify,
    /// A bind is in flight: every later request of the connection waits for
    /// its response (RFC 4511 section 4.2.1: a bind must not overlap other
    /// operations; slapd drops the operations it overlaps).
    pub(super) bind_in_flight: AtomicBool,
    /// The requests loop holds requests in its queue for the session's own
    /// order (a bind, or requests behind it): tell it when a bind ends or
    /// nothing is left in flight (`settle`).
    pub(super) settle_waiting: AtomicBool,
    /// Signalled (one permit) for `settle_waiting`.
    pub(super) settle: Notify,
    /// Message IDs of Allow-Backup requests the proxy is still answering.
    pub(super) local_ids: Mutex<Vec<i32>>,
    /// What the upstream connection holds, to carry the session to a new
    /// one (`carry.rs`).
    pub(super) carry: Mutex<Carry>,
    /// The session holds a paged-results cookie or a VLV context (see
    /// `Carry::handed_out`): its searches' controls are read for them.
    pub(super) search_state: AtomicBool,
    /// The upstream connection closed and the session waits to be carried
    /// to a new one: nothing is sent upstream meanwhile.
    pub(super) upstream_lost: AtomicBool,
    /// Where the requests loop hands the responses loop the new
    /// connection's input, once it holds the session's identity.
    pub(super) new_upstream: Mutex<Option<oneshot::Sender<UpIn>>>,
    /// The generation of the server print (`print::Prints`) the session
    /// talks to: carried only to a server of the same.
    pub(super) server_generation: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) responses: AtomicU64,
    /// A client's StartTLS forwarded to a mirrored upstream: its message
    /// ID, and where the responses loop hands the server's answer (and
    /// waits, not reading the upstream, until the requests loop is done
    /// turning the connection to TLS).
    pub(super) upstream_starttls: Mutex<Option<(i32, oneshot::Sender<TlsAnswer>)>>,
}

/// The server's answer to a forwarded StartTLS, and what resumes the
/// responses loop's reading of the upstream.
pub(super) type TlsAnswer = (bytes::Bytes, oneshot::Sender<()>);

impl SessionState {
    /// A new session's state with the configured limits.
    pub(super) fn new(limits: &crate::config::Limits) -> Self {
        let anonymous = limits.pdu_limit(false);
        SessionState {
            pdu_limit: Arc::new(AtomicUsize::new(anonymous)),
            pdu_limits: (anonymous, limits.pdu_limit(true)),
            max_outstanding: limits.max_outstanding_per_conn,
            ..SessionState::default()
        }
    }

    /// Room for another request upstream.
    #[inline]
    pub(super) fn below_outstanding_limit(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) < self.max_outstanding
    }

    /// A bind ended: the request size limit follows the session's new
    /// authentication state.
    pub(super) fn set_authenticated(&self, yes: bool) {
        let limit = if yes {
            self.pdu_limits.1
        } else {
            self.pdu_limits.0
        };
        self.pdu_limit.store(limit, Ordering::Relaxed);
    }

    pub(super) fn authenticated(&self) -> bool {
        self.pdu_limit.load(Ordering::Relaxed) == self.pdu_limits.1
    }

    /// The in-flight table (a short critical section; never held across await).
    #[inline]
    pub(super) fn inflight(&self) -> MutexGuard<'_, InFlightTable> {
        self.participant.inflight()
    }

    /// Records a request about to be sent upstream; false (and nothing
    /// recorded) when a request with the same message ID is outstanding.
    /// A bind ends the connection's persistent searches (as slapd does).
    #[inline]
    pub(super) fn start(&self, msgid: i32, entry: InFlight) -> bool {
        let special = entry.root_dse || entry.persistent;
        let persistent = entry.persistent;
        let bind = entry.op == op::BIND_REQUEST;
        if self.inflight().start(msgid, entry).is_err() {
            return false;
        }
        if special {
            self.specials.fetch_add(1, Ordering::Relaxed);
        }
        if !persistent {
            self.outstanding.fetch_add(1, Ordering::SeqCst);
        }
        if bind {
            self.bind_in_flight.store(true, Ordering::SeqCst);
            // Only while some persistent search or root DSE read is in
            // flight (`specials`) can there be one to end.
            if self.specials.load(Ordering::Relaxed) > 0 {
                self.end_persistent();
            }
        }
        true
    }

    /// The upstream connection is gone: nothing is sent upstream until the
    /// requests loop hands the new one's input over on the returned channel.
    pub(super) fn await_upstream(&self) -> oneshot::Receiver<UpIn> {
        let (tx, rx) = oneshot::channel();
        *lock(&self.new_upstream) = Some(tx);
        self.upstream_lost.store(true, Ordering::SeqCst);
        rx
    }

    /// The forwarded StartTLS whose answer this is, if it is one.
    pub(super) fn take_upstream_starttls(&self, msgid: i32) -> Option<oneshot::Sender<TlsAnswer>> {
        let mut g = lock(&self.upstream_starttls);
        match g.take() {
            Some((id, tx)) if id == msgid => Some(tx),
            other => {
                *g = other;
                None
            }
        }
    }

    /// Requests in flight upstream, persistent searches not counted.
    pub(super) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// A bind was sent and its response has not come yet.
    pub(super) fn bind_in_flight(&self) -> bool {
        self.bind_in_flight.load(Ordering::SeqCst)
    }

    /// The requests loop holds requests for the session's own order: it
    /// must hear when a bind ends or the connection has nothing in flight.
    pub(super) fn set_settle_waiting(&self, yes: bool) {
        if self.settle_waiting.load(Ordering::Relaxed) != yes {
            self.settle_waiting.store(yes, Ordering::SeqCst);
            // A bind that ended (or the last request that completed) after
            // the requests loop decided to queue, before this store, found
            // no one waiting and gave no signal (`forget` stores, then
            // loads this flag; this stores it, then loads theirs: one of
            // the two sees the other). Its signal is given here; a spare
            // one only makes the loop look at its queue.
            if yes && (!self.bind_in_flight() || self.outstanding() == 0) {
                self.settle.notify_one();
            }
        }
    }

    /// A bind sent upstream ends the persistent searches of its connection
    /// at the server (slapd abandons every operation of a connection that
    /// binds): they leave the table.
    fn end_persistent(&self) {
        let mut table = self.inflight();
        let ids: Vec<i32> = table
            .iter()
            .filter(|(_, e)| e.persistent)
            .map(|(id, _)| id)
            .collect();
        let gone: Vec<InFlight> = ids.into_iter().filter_map(|id| table.abandon(id)).collect();
        drop(table);
        for e in &gone {
            self.forget(e);
        }
    }

    /// The client's Abandon of a read goes to the server (see
    /// [`InFlightTable::abandon_read`]; at most `max_outstanding_per_conn`
    /// abandoned reads' IDs at a time).
    pub(super) fn abandon_read(&self, msgid: i32) -> AbandonedRead {
        let r = self.inflight().abandon_read(msgid, self.max_outstanding);
        if let AbandonedRead::Gone(e) = &r {
            self.forget(e);
        }
        r
    }

    /// An abandoned request leaves the table.
    pub(super) fn abandon(&self, msgid: i32) -> Option<InFlight> {
        let gone = self.inflight().abandon(msgid)?;
        self.forget(&gone);
        Some(gone)
    }

    pub(super) fn forget(&self, e: &InFlight) {
        if e.root_dse || e.persistent {
            self.specials.fetch_sub(1, Ordering::Relaxed);
        }
        let mut idle = false;
        if !e.persistent {
            let before = self.outstanding.fetch_sub(1, Ordering::SeqCst);
            if before >= self.max_outstanding {
                // The requests loop may be waiting for room: one permit,
                // kept if it is not waiting yet.
                self.room.notify_one();
            }
            idle = before == 1;
        }
        let bind = e.op == op::BIND_REQUEST;
        if bind {
            self.bind_in_flight.store(false, Ordering::SeqCst);
        }
        if (bind || idle) && self.settle_waiting.load(Ordering::SeqCst) {
            self.settle.notify_one();
        }
    }

    /// The session's bound DN, if a simple bind succeeded.
    pub(super) fn bound_dn(&self) -> Option<String> {
        self.participant.bound_dn()
    }

    /// The session's bound DN, copied out of the lock; `None` from the
    /// moment a bind is received until its response.
    #[inline]
    pub(super) fn bound_dn_bytes(&self) -> Option<Vec<u8>> {
        self.participant.bound_dn_bytes()
    }

    /// A bind was received: no identity until its response.
    #[inline]
    pub(super) fn unbind_for_bind(&self) {
        self.participant.unbind_for_bind()
    }

    /// A bind ended: `dn` (a successful simple bind's name) is the
    /// session's identity from now on.
    #[inline]
    pub(super) fn set_bound_dn(&self, dn: Option<&[u8]>) {
        self.participant.set_bound_dn(dn)
    }

    /// Wakes a shutdown waiting for the in-flight table to empty.
    #[inline]
    pub(super) fn signal_completed(&self) {
        if self.shutdown_waiting.load(Ordering::Acquire) {
            self.completed.notify_waiters();
        }
    }

    /// Waits until no request is in flight (persistent searches never end
    /// by themselves, so they do not count).
    pub(super) async fn wait_drained(&self) {
        self.shutdown_waiting.store(true, Ordering::Release);
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight().iter().all(|(_, e)| e.persistent) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn bind_sent(state: &SessionState) -> InFlight {
        state.bind_in_flight.store(true, Ordering::SeqCst);
        state.outstanding.store(1, Ordering::SeqCst);
        InFlight::new(op::BIND_REQUEST, None)
    }

    /// The lost wake-up the hostile tests found under load: the requests
    /// loop decided to queue a request behind a bind, the bind's response
    /// ended it before the loop said it waits; the loop must still hear.
    #[test]
    fn a_bind_that_ends_before_the_queue_waits_still_releases_it() {
        let state = SessionState {
            max_outstanding: 8,
            ..Default::default()
        };
        let bind = bind_sent(&state);
        state.forget(&bind);
        assert!(state.settle.notified().now_or_never().is_none());
        state.set_settle_waiting(true);
        assert!(state.settle.notified().now_or_never().is_some());
    }

    /// While the bind still runs, queueing gives no signal; its end does.
    #[test]
    fn a_queue_behind_a_running_bind_hears_its_end() {
        let state = SessionState {
            max_outstanding: 8,
            ..Default::default()
        };
        let bind = bind_sent(&state);
        state.set_settle_waiting(true);
        assert!(state.settle.notified().now_or_never().is_none());
        state.forget(&bind);
        assert!(state.settle.notified().now_or_never().is_some());
    }
}
