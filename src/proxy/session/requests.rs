//! The requests loop: client frames -> envelope -> decision -> upstream,
//! or the per-connection queue, or an answer from the proxy itself.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use ldap3_proto::proto::{LdapMsg, LdapOp, LdapResultCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::freeze::participant::{AbandonedRead, InFlight, LocalOp, Queue, Queued};
use crate::freeze::{Class, Control, Engine, Requester};
use crate::journal::{Body as JournalBody, JournalError};
use crate::proxy::exops::{self};
use crate::proxy::mailbox::Inbox;
use crate::tls::{ClientSecurity, ClientStream, Mirror, UpstreamStream};
use crate::wire::envelope::{auth, oid};
use crate::wire::{op, paging, pdu, Envelope, FrameError};

use super::carry::{self, Refused};
use super::decide::{decide, held_by_session, Abandon, Decision, View};
use super::end::{reused_id, End, IoAt, Side};
use super::print;
use super::state::SessionState;
use super::{
    buffered_frame, count, feed_waiting, flush_now, flush_waiting, lock, open_upstream, ClientIn,
    Close, Local, LoopEnd, Next, Shared, UpOut, BATCH, PROXY_ABANDON_ID, TO_UPSTREAM,
    UPSTREAM_CLOSE_WAIT,
};

pub(super) struct Requests {
    pub(super) id: u64,
    /// Peer credentials (uid, gid) of a client on a unix socket.
    pub(super) cred: Option<(u32, u32)>,
    /// The client's TCP stream, which StartTLS can turn to TLS.
    pub(super) client: Option<ClientStream>,
    /// The upstream stream a client's StartTLS turns to TLS
    /// (`tls.upstream_mirror`, a clear client).
    pub(super) upstream_stream: Option<UpstreamStream>,
    /// The session is in TLS.
    pub(super) tls: bool,
    /// The client is on TCP (not ldapi): `require_tls` applies in clear.
    pub(super) tcp: bool,
    /// The verified client certificate's subject.
    pub(super) cert_subject: Option<String>,
    pub(super) shared: Arc<Shared>,
    pub(super) engine: Arc<Engine>,
    pub(super) state: Arc<SessionState>,
    pub(super) client_in: ClientIn,
    pub(super) up_out: UpOut,
    pub(super) local: mpsc::Sender<Local>,
    pub(super) control: Inbox<mpsc::UnboundedReceiver<Control>>,
    pub(super) epoch: watch::Receiver<u64>,
    /// Requests held by a freeze or for the session's own order.
    pub(super) queue: Queue,
    pub(super) close: Close,
    pub(super) abort: CancellationToken,
    /// The server did not come back within `upstream_retry_secs` the last
    /// time the session waited for it: until it is back, one attempt per
    /// request, no waiting.
    pub(super) retry_spent: bool,
}

/// The most requests a session reads past its full queue before releasing
/// it ([`Requests::catch_up`]); requests the proxy answers itself do not
/// queue, so the frames are bounded as well as the bytes.
pub(crate) fn catch_up_frames(queue_max_requests_per_conn: usize) -> usize {
    4 * queue_max_requests_per_conn.max(256)
}

/// Why a session waiting for its server was not carried.
pub(super) enum NotBack {
    /// The server did not answer within the retry time: the session waits
    /// on, its requests are answered `unavailable`.
    Down(String),
    /// The session ends.
    End(End),
}

/// What happened to one request frame.
pub(super) enum Step {
    Continue,
    End(End),
}

/// What [`Requests::handle_now`] did.
pub(super) enum Handled {
    Done(Step),
    /// Left to [`Requests::handle_later`].
    Later(Later),
}

/// A request whose handling waits for something.
pub(super) enum Later {
    /// Admitted by the gate (it is in flight): to the journal, or to a
    /// full upstream buffer.
    Send(Envelope, Bytes),
    /// Decided: to be carried out.
    Decided(Slow, Envelope, Bytes),
}

/// What [`Requests::on_frames_now`] did with the frames it read.
pub(super) enum Frames {
    Done(Step),
    /// A request left to [`Requests::handle_later`], and how many more
    /// frames the batch may take after it.
    Later(Later, usize),
}

/// The decisions [`Requests::handle_later`] carries out: the other ones
/// ([`Decision::Gate`], [`Decision::Queue`], [`Decision::End`]) are
/// carried out by [`Requests::handle_now`].
pub(super) enum Slow {
    Answer(LocalOp),
    Refuse(LdapResultCode, String),
    Abandon(Abandon),
    Unbind,
    StartTls,
    CancelQueued(i32),
}

/// What woke the requests loop.
pub(super) enum Event {
    Frame(Next),
    Control(Control),
    Epoch,
    /// A response made room under `max_outstanding_per_conn`.
    Room,
    /// The idle timer fired.
    IdleCheck,
}

impl Requests {
    /// Runs the loop to its end, which it sends on `done` once all of it
    /// (the sockets' halves it holds) is dropped.
    pub(super) async fn run(mut self, done: LoopEnd) {
        let end = self.pump().await;
        self.discard_queue(&end);
        match &end {
            End::ClientClosed | End::Unbind if self.state.upstream_lost.load(Ordering::SeqCst) => {
                // No upstream connection to close: the session waited to be
                // carried.
                self.state.client_gone.store(true, Ordering::Relaxed);
                self.end_session();
            }
            End::ClientClosed | End::Unbind => {
                // Like a direct client: the server sees EOF and closes.
                self.state.client_gone.store(true, Ordering::Relaxed);
                // When the inbox is full the responses loop has messages to
                // wake it, and it checks `client_gone` at every hold.
                let _ = self.local.try_send(Local::ClientGone);
                let _ = self.up_out.flush().await;
                let _ = self.up_out.get_mut().shutdown().await;
                // The responses loop ends when the upstream closes; do not
                // wait for ever on an upstream that keeps the socket open.
                if tokio::time::timeout(UPSTREAM_CLOSE_WAIT, self.close.cancelled())
                    .await
                    .is_err()
                {
                    self.end_session();
                }
            }
            End::Closed => {}
            End::ClientProtocol(m) => {
                warn!(
                    conn = self.id,
                    "closing client session: protocol error: {m}"
                );
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::ProtocolError,
                    &format!("abproxy: {m}"),
                );
                let _ = self.local.try_send(Local::Pdu(notice));
                self.end_session();
            }
            End::UpstreamTls(m) => {
                warn!(conn = self.id, "closing client session: {m}");
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!("abproxy: {m}; the session does not go on in clear"),
                );
                let _ = self.local.try_send(Local::Pdu(notice));
                self.end_session();
            }
            End::Shutdown => {
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    "abproxy is shutting down",
                );
                let _ = self.local.try_send(Local::Pdu(notice));
                self.end_session();
            }
            End::NotCarried(why) => {
                warn!(
                    conn = self.id,
                    "session not carried to a new upstream connection: {why}"
                );
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!(
                        "abproxy: the LDAP server went away and this session could not be \
                         carried to a new connection: {why}"
                    ),
                );
                let _ = self.local.try_send(Local::Pdu(notice));
                self.end_session();
            }
            End::Idle(d) => {
                info!(
                    conn = self.id,
                    "closing idle session after {} s",
                    d.as_secs()
                );
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!("abproxy: session idle for {} s, closing", d.as_secs()),
                );
                let _ = self.local.try_send(Local::Pdu(notice));
                self.end_session();
            }
            _ => self.end_session(),
        }
        drop(self);
        done.send(end);
    }

    /// Ends the session: the responses loop writes what it has, then closes.
    fn end_session(&self) {
        self.close.cancel();
        let _ = self.local.try_send(Local::Close);
    }

    /// Requests still queued when the session ends are never sent upstream.
    fn discard_queue(&mut self, end: &End) {
        if self.queue.is_empty() {
            return;
        }
        let n = self.queue.clear(&self.engine);
        warn!(
            conn = self.id,
            discarded = n,
            "session ended ({}) with queued requests: discarded, never sent upstream",
            end.describe()
        );
        self.queue_changed();
    }

    /// The queue's length changed: the responses loop must say when a bind
    /// ends or nothing is left in flight while requests wait.
    fn queue_changed(&self) {
        self.state.set_settle_waiting(!self.queue.is_empty());
    }

    /// Room to read another request: the queue's limits (per connection,
    /// and the total for a session that already holds queued requests) and
    /// `max_outstanding_per_conn`.
    fn has_room(&self) -> bool {
        self.queue.has_room(&self.engine) && self.state.below_outstanding_limit()
    }

    async fn pump(&mut self) -> End {
        let idle = self.shared.settings.idle_timeout;
        // One timer for the session, re-armed only when it fires (not per
        // request): the session closes between `idle` and twice `idle`
        // after its last activity.
        let far = Duration::from_secs(86400 * 365);
        let idle_timer = tokio::time::sleep(idle.unwrap_or(far));
        tokio::pin!(idle_timer);
        let mut active = false;
        loop {
            let room = self.has_room();
            let waiting = !self.queue.is_empty() || !room;
            if self.close.is_cancelled() {
                return End::Closed;
            }
            // Close and shutdown arrive on the control channel too, so the
            // loop polls no cancellation future per request.
            let state = &self.state;
            let event = if waiting {
                tokio::select! {
                    biased;
                    Some(c) = self.control.recv() => Event::Control(c),
                    Ok(()) = self.epoch.changed() => Event::Epoch,
                    // A bind ended, or nothing is left in flight: requests
                    // held for the session's own order may go.
                    _ = async { state.settle.notified().await }, if !self.queue.is_empty() => Event::Epoch,
                    f = self.client_in.next_message(), if room => Event::Frame(f),
                    // Created only when polled: no waiter made and dropped
                    // per request while there is room.
                    _ = async { state.room.notified().await }, if !room => Event::Room,
                    _ = &mut idle_timer, if idle.is_some() => Event::IdleCheck,
                }
            } else {
                // The usual turn (nothing queued, room to read): the
                // sources of the `select!` above that are then enabled, in
                // the same order, polled by hand (no `select!` built per
                // turn).
                let (control, client_in) = (&mut self.control, &mut self.client_in);
                let mut timer = idle.map(|_| idle_timer.as_mut());
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(Some(c)) = control.poll_recv(cx) {
                        return Poll::Ready(Event::Control(c));
                    }
                    if let Poll::Ready(f) = client_in.poll_message(cx) {
                        return Poll::Ready(Event::Frame(f));
                    }
                    match timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                        Some(Poll::Ready(())) => Poll::Ready(Event::IdleCheck),
                        _ => Poll::Pending,
                    }
                })
                .await
            };
            let step = match event {
                // Close and shutdown end the loop here.
                Event::Control(Control::Close) => return End::Closed,
                Event::Control(Control::Shutdown) => return self.drain_for_shutdown().await,
                Event::Control(c) => self.on_control(c).await,
                Event::Epoch => {
                    // A session that stopped reading cannot have seen its
                    // client close: look before its queue goes upstream.
                    let releasable = self
                        .queue
                        .front()
                        .is_some_and(|h| !self.engine.holds(h.class));
                    match (room, releasable) {
                        (false, true) => match self.catch_up().await {
                            Step::Continue => self.release().await,
                            end => end,
                        },
                        _ => self.release().await,
                    }
                }
                Event::Room => Step::Continue,
                Event::IdleCheck => {
                    let idle = idle.unwrap_or(far);
                    let busy =
                        active || !self.queue.is_empty() || !self.state.inflight().is_empty();
                    if !busy {
                        return End::Idle(idle);
                    }
                    active = false;
                    idle_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + idle);
                    Step::Continue
                }
                Event::Frame(f) => {
                    active = true;
                    // `on_frames_now`, then `on_frames_rest` only if a
                    // request waits for something: no future built per
                    // read otherwise.
                    let step = match self.on_frames_now(f) {
                        Frames::Done(step) => step,
                        Frames::Later(later, left) => self.on_frames_rest(later, left).await,
                    };
                    match step {
                        // Requests queued while the session waits to be
                        // carried go once the freeze no longer holds them.
                        Step::Continue if self.state.upstream_lost.load(Ordering::Relaxed) => {
                            self.release().await
                        }
                        step => step,
                    }
                }
            };
            if let Step::End(e) = step {
                return e;
            }
            // As `flush`, without its future when the socket takes it all.
            let flushed = match flush_now(&mut self.up_out, TO_UPSTREAM) {
                Some(r) => r,
                None => flush_waiting(&mut self.up_out, &self.close, TO_UPSTREAM).await,
            };
            if let Err(e) = flushed {
                return e;
            }
        }
    }

    /// Handles a frame and whatever else the client already sent (a batch
    /// at most): the part that needs no waiting, the usual case, without
    /// building [`Requests::on_frames_rest`]'s future.
    #[inline]
    fn on_frames_now(&mut self, first: Next) -> Frames {
        match self.handle_now(first) {
            Handled::Done(Step::Continue) => self.more_frames_now(BATCH),
            Handled::Done(end) => Frames::Done(end),
            Handled::Later(later) => Frames::Later(later, BATCH),
        }
    }

    /// The frames already buffered, `left` at most (see
    /// [`Requests::on_frames_now`]).
    #[inline]
    fn more_frames_now(&mut self, mut left: usize) -> Frames {
        while left > 0 {
            left -= 1;
            if !self.has_room() {
                break;
            }
            let Some(next) = buffered_frame(&self.client_in) else {
                break;
            };
            match self.handle_now(next) {
                Handled::Done(Step::Continue) => {}
                Handled::Done(end) => return Frames::Done(end),
                Handled::Later(later) => return Frames::Later(later, left),
            }
        }
        Frames::Done(Step::Continue)
    }

    /// The rest of [`Requests::on_frames_now`]: a request that waits for
    /// something, then the batch's others.
    async fn on_frames_rest(&mut self, mut later: Later, mut left: usize) -> Step {
        loop {
            if let Step::End(e) = self.handle_later(later).await {
                return Step::End(e);
            }
            match self.more_frames_now(left) {
                Frames::Done(step) => return step,
                Frames::Later(l, n) => (later, left) = (l, n),
            }
        }
    }

    async fn flush(&mut self) -> Step {
        let flushed = match flush_now(&mut self.up_out, TO_UPSTREAM) {
            Some(r) => r,
            None => flush_waiting(&mut self.up_out, &self.close, TO_UPSTREAM).await,
        };
        match flushed {
            Ok(()) => Step::Continue,
            Err(e) => Step::End(e),
        }
    }

    /// One request frame: framed, read, decided ([`decide`]), then the
    /// decision carried out.
    async fn handle(&mut self, next: Next) -> Step {
        match self.handle_now(next) {
            Handled::Done(step) => step,
            Handled::Later(later) => self.handle_later(later).await,
        }
    }

    /// The part of [`Requests::handle`] that needs no waiting: a request
    /// the gate admits with room in the upstream buffer and no journal (the
    /// usual case), one that ends the session, joins the queue or is
    /// refused by the gate's held check is done here, without building
    /// the async path's future; anything else is left to
    /// [`Requests::handle_later`].
    #[inline]
    fn handle_now(&mut self, next: Next) -> Handled {
        let frame = match next {
            Ok(None) => return Handled::Done(Step::End(End::ClientClosed)),
            Ok(Some(n)) => self.client_in.take(n),
            Err(FrameError::Io(e)) => {
                return Handled::Done(Step::End(End::Io(IoAt::Read(Side::Client), e)))
            }
            Err(FrameError::TruncatedAtEof(n)) => {
                debug!(conn = self.id, "client closed inside a message ({n} bytes)");
                return Handled::Done(Step::End(End::ClientClosed));
            }
            Err(e) => {
                if self.state.sasl_bound.load(Ordering::Relaxed) {
                    return Handled::Done(Step::End(End::SaslLayer(Side::Client)));
                }
                if matches!(e, FrameError::TooLarge { .. }) && !self.state.authenticated() {
                    return Handled::Done(Step::End(End::ClientProtocol(format!(
                        "{e} before a successful bind (max_pdu_bytes_anonymous)"
                    ))));
                }
                return Handled::Done(Step::End(End::ClientProtocol(e.to_string())));
            }
        };
        let env = match Envelope::request(&frame) {
            Ok(env) => env,
            Err(e) => return Handled::Done(Step::End(End::ClientProtocol(e.to_string()))),
        };
        count(&self.state.requests);
        if let Some(m) = &self.shared.metrics {
            m.request(env.op, frame.len());
        }
        debug!(
            conn = self.id,
            msgid = env.msgid,
            op = op::name(env.op),
            dn = %String::from_utf8_lossy(env.dn_bytes(&frame).unwrap_or_default()),
            "request"
        );
        let decision = decide(&env, &frame, &*self);
        let later = match decision {
            Decision::Gate => {
                if env.op == op::BIND_REQUEST {
                    // The identity is the one this bind's own response gives.
                    self.state.unbind_for_bind();
                }
                return match self.admit(&env, &frame, None) {
                    Ok(true) => {
                        // Unjournaled with room in the upstream buffer (the
                        // usual case): nothing to wait for.
                        if self.shared.journal.is_none() && self.up_out.append(&frame) {
                            Handled::Done(Step::Continue)
                        } else {
                            Handled::Later(Later::Send(env, frame))
                        }
                    }
                    Ok(false) => Handled::Done(Step::End(reused_id(env.msgid))),
                    // Held: the in-flight table did not see the ID. A
                    // request reusing the ID of one in flight (or of an
                    // abandoned read) ends the session here too: queued, it
                    // would go upstream once the other is gone from the
                    // table, which an abandon at the drain time limit does
                    // while the server may still answer it, and its answer
                    // would be taken for this request's (or this one's,
                    // dropped, for that one's).
                    Err(_) if self.id_taken(env.msgid) => {
                        Handled::Done(Step::End(reused_id(env.msgid)))
                    }
                    Err(class) => {
                        self.enqueue(frame, env, class, None);
                        Handled::Done(Step::Continue)
                    }
                };
            }
            Decision::Queue(local) => {
                if env.op == op::BIND_REQUEST {
                    self.state.unbind_for_bind();
                }
                let class = match local {
                    Some(_) => Class::NEVER,
                    None => self.classify(&env, &frame),
                };
                self.enqueue(frame, env, class, local);
                return Handled::Done(Step::Continue);
            }
            Decision::End(end) => return Handled::Done(Step::End(end)),
            Decision::Answer(what) => Slow::Answer(what),
            Decision::Refuse(code, message) => Slow::Refuse(code, message),
            Decision::Abandon(what) => Slow::Abandon(what),
            Decision::Unbind => Slow::Unbind,
            Decision::StartTls => Slow::StartTls,
            Decision::CancelQueued(target) => Slow::CancelQueued(target),
        };
        Handled::Later(Later::Decided(later, env, frame))
    }

    /// The rest of [`Requests::handle`] (see [`Requests::handle_now`]).
    async fn handle_later(&mut self, later: Later) -> Step {
        let (decision, env, frame) = match later {
            Later::Send(env, frame) => return self.send_admitted(&env, frame).await,
            Later::Decided(decision, env, frame) => (decision, env, frame),
        };
        match decision {
            Slow::Answer(what) => self.answer_locally(what, &env, &frame).await,
            Slow::Refuse(code, message) => {
                debug!(conn = self.id, msgid = env.msgid, "refused: {message}");
                match pdu::response_for(env.op, env.msgid, code, &message) {
                    Some(r) => self.reply_locally(r).await,
                    None => Step::Continue,
                }
            }
            Slow::Abandon(what) => self.client_abandon(what, frame).await,
            Slow::Unbind => {
                self.discard_queue(&End::Unbind);
                if let Step::End(e) = self.feed(frame).await {
                    return Step::End(e);
                }
                Step::End(End::Unbind)
            }
            // Boxed: the handshake's future is large (1.6 KB), and inline it
            // would make every request's `handle` future as large, built and
            // moved at each request.
            Slow::StartTls => Box::pin(self.start_tls(&env, &frame)).await,
            Slow::CancelQueued(target) => {
                if let Some(q) = self.unqueue(target) {
                    // RFC 3909: the cancelled operation ends with `canceled`,
                    // the cancel request with success.
                    if let Some(r) = pdu::response_for(
                        q.env.op,
                        q.env.msgid,
                        LdapResultCode::Canceled,
                        "cancelled while held by abproxy (never sent to the server)",
                    ) {
                        if let Step::End(e) = self.reply_locally(r).await {
                            return Step::End(e);
                        }
                    }
                }
                let ok = pdu::extended_response(env.msgid, LdapResultCode::Success, "", None, None);
                self.reply_locally(ok).await
            }
        }
    }

    /// Carries out an Abandon (see [`Abandon`]).
    async fn client_abandon(&mut self, what: Abandon, frame: Bytes) -> Step {
        match what {
            Abandon::Ignore => Step::Continue,
            Abandon::Queued(target) => {
                self.unqueue(target);
                debug!(conn = self.id, target, "abandoned a queued request");
                Step::Continue
            }
            Abandon::Running(target) => {
                self.keep_abandoned(target);
                Step::Continue
            }
            Abandon::Forward(target) => match self.state.abandon_read(target) {
                AbandonedRead::Full => {
                    // Too many abandoned reads the server may still answer:
                    // this one runs to its end, as a write would.
                    self.keep_abandoned(target);
                    Step::Continue
                }
                gone => {
                    if matches!(gone, AbandonedRead::Gone(_)) {
                        self.state.signal_completed();
                        self.engine.completed();
                    }
                    self.feed(frame).await
                }
            },
        }
    }

    /// The client abandoned a request the server keeps running: the Abandon
    /// is not forwarded, the request stays in flight (a drain waits for it)
    /// and its response is dropped.
    fn keep_abandoned(&self, target: i32) {
        if let Some(e) = self.state.inflight().get_mut(target) {
            e.abandoned = true;
        }
        debug!(
            conn = self.id,
            target,
            "abandon of a request the server may be running: not forwarded, its response \
             will be dropped"
        );
    }

    /// Answers an Allow-Backup or status request.
    async fn answer_locally(&mut self, what: LocalOp, env: &Envelope, frame: &Bytes) -> Step {
        match what {
            LocalOp::AllowBackup => {
                self.allow_backup(env, frame);
                Step::Continue
            }
            LocalOp::Status => {
                let (code, msg, value) =
                    exops::status_answer(self.engine.status(&self.requester()));
                let resp = pdu::extended_response(
                    env.msgid,
                    code,
                    &msg,
                    Some(abproxy_proto::ALLOW_BACKUP_STATUS_OID),
                    value,
                );
                self.reply_locally(resp).await
            }
        }
    }

    /// StartTLS (RFC 4511 section 4.14): success, then the TLS handshake
    /// on this connection; operationsError (the session goes on as it was)
    /// when TLS is already on or operations are outstanding.
    async fn start_tls(&mut self, env: &Envelope, frame: &Bytes) -> Step {
        let name = Some(exops::START_TLS_OID);
        let answer = |code, msg: &str| pdu::extended_response(env.msgid, code, msg, name, None);
        if self.tls {
            let r = answer(
                LdapResultCode::OperationsError,
                "TLS is already established on this connection",
            );
            return self.reply_locally(r).await;
        }
        let (Some(stream), Some(server)) = (self.client.clone(), self.shared.server_tls.clone())
        else {
            let msg = if self.shared.server_tls.is_none() {
                "StartTLS is not available through abproxy: TLS is not configured on the proxy"
            } else {
                "StartTLS is not available on an ldapi:// listener"
            };
            return self
                .reply_locally(answer(LdapResultCode::Unavailable, msg))
                .await;
        };
        let outstanding = self.state.inflight().len()
            + self.queue.len()
            + self.state.local_pending.load(Ordering::Acquire);
        if outstanding > 0 {
            let r = answer(
                LdapResultCode::OperationsError,
                &format!(
                    "StartTLS refused: {outstanding} operation(s) outstanding on this connection; \
                     retry once they have completed"
                ),
            );
            return self.reply_locally(r).await;
        }
        if !self.client_in.read_buffer().is_empty() {
            return Step::End(End::ClientProtocol(
                "data sent after the StartTLS request, before its response".into(),
            ));
        }
        let mut success = answer(LdapResultCode::Success, "");
        if let (Some(up), Some(mirror)) = (self.upstream_stream.clone(), self.shared.mirror.clone())
        {
            if !self.state.upstream_lost.load(Ordering::SeqCst) {
                match self.upstream_start_tls(env, frame, &up, &mirror).await {
                    Ok(Ok(server_answer)) => success = server_answer,
                    // The server refused: the client gets its answer, and
                    // both connections stay clear, as with the server itself.
                    Ok(Err(refusal)) => return self.reply_locally(refusal).await,
                    Err(end) => return Step::End(end),
                }
            }
            // (A session waiting for its server is carried over TLS once
            // its client has it: `reestablish`.)
        }
        let (flushed_tx, flushed_rx) = oneshot::channel();
        let (resume_tx, resume_rx) = oneshot::channel();
        let start = Local::StartTls {
            pdu: success,
            flushed: flushed_tx,
            resume: resume_rx,
        };
        let sent = tokio::select! {
            r = self.local.send(start) => r.is_ok(),
            _ = self.close.cancelled() => false,
        };
        let flushed = sent
            && tokio::select! {
                r = flushed_rx => r.is_ok(),
                _ = self.close.cancelled() => false,
            };
        if !flushed {
            return Step::End(End::Closed);
        }
        let handshake = tokio::select! {
            r = stream.start_tls(&server) => r,
            _ = self.close.cancelled() => return Step::End(End::Closed),
        };
        if let Some(m) = &self.shared.metrics {
            m.handshake(
                crate::proxy::metrics::Handshake::StartTls,
                handshake.is_ok(),
            );
        }
        match handshake {
            Ok(subject) => {
                info!(
                    conn = self.id,
                    subject = subject.as_deref().unwrap_or("none"),
                    "TLS established (StartTLS)"
                );
                self.tls = true;
                self.cert_subject = subject;
                let _ = resume_tx.send(());
                Step::Continue
            }
            Err(e) => Step::End(End::Tls(e)),
        }
    }

    /// `tls.upstream_mirror`: the client's StartTLS, nothing outstanding,
    /// goes to the server as the client sent it; on the server's success
    /// the proxy runs the TLS handshake with it on the session's
    /// connection before the client gets that success (`Ok(Ok(answer))`).
    /// The server's refusal is the client's answer (`Ok(Err(answer))`). A
    /// failed handshake ends the session: never on in clear.
    async fn upstream_start_tls(
        &mut self,
        env: &Envelope,
        frame: &Bytes,
        up: &UpstreamStream,
        mirror: &Mirror,
    ) -> Result<Result<Bytes, Bytes>, End> {
        if !self.state.start(
            env.msgid,
            InFlight::new(op::EXTENDED_REQUEST, Some(Class::NEVER)),
        ) {
            return Err(reused_id(env.msgid));
        }
        let (tx, rx) = oneshot::channel();
        *lock(&self.state.upstream_starttls) = Some((env.msgid, tx));
        self.up_out.append_always(frame);
        flush_waiting(&mut self.up_out, &self.close, TO_UPSTREAM).await?;
        let limit = mirror.tls.timeout();
        let (answer, resume) = tokio::select! {
            r = tokio::time::timeout(limit, rx) => match r {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => return Err(End::Closed),
                Err(_) => {
                    return Err(End::UpstreamTls(format!(
                        "the LDAP server did not answer StartTLS within {} s",
                        limit.as_secs()
                    )))
                }
            },
            _ = self.close.cancelled() => return Err(End::Closed),
        };
        let code = Envelope::response(&answer).ok().and_then(|e| e.result_code);
        if code != Some(0) {
            info!(
                conn = self.id,
                code, "the LDAP server refused StartTLS: its answer goes to the client"
            );
            let _ = resume.send(());
            return Ok(Err(answer));
        }
        let handshake = tokio::select! {
            r = up.start_tls(&mirror.tls) => r,
            _ = self.close.cancelled() => return Err(End::Closed),
        };
        match handshake {
            Ok(()) => {
                info!(
                    conn = self.id,
                    "TLS established with the LDAP server (StartTLS)"
                );
                let _ = resume.send(());
                Ok(Ok(answer))
            }
            Err(e) => Err(End::UpstreamTls(format!(
                "the TLS handshake with the LDAP server failed: {e}"
            ))),
        }
    }

    /// The security a new upstream connection of this session needs.
    fn security(&self) -> ClientSecurity {
        ClientSecurity::of(self.tls, self.client.is_some())
    }

    fn classify(&self, env: &Envelope, frame: &[u8]) -> Class {
        // Copied out of the lock (classification happens only while a
        // freeze is on).
        let bound = self.state.bound_dn_bytes();
        self.engine.classify(env, frame, bound.as_deref())
    }

    fn requester(&self) -> Requester {
        Requester {
            conn: self.id,
            bound_dn: self.state.bound_dn(),
            peer_uid: self.cred,
            cert_subject: self.cert_subject.clone(),
        }
    }

    /// The gate: records the request as in flight unless a freeze holds it
    /// (then returns its class). `known` is the class of a queued request.
    /// `Ok(false)`: not recorded, its message ID is in flight already.
    fn admit(&self, env: &Envelope, frame: &Bytes, known: Option<Class>) -> Result<bool, Class> {
        let reader = matches!(env.op, op::SEARCH_REQUEST | op::COMPARE_REQUEST).then_some(self.id);
        self.engine.admit(
            reader,
            || known.unwrap_or_else(|| self.classify(env, frame)),
            |class| {
                let mut entry = InFlight::new(env.op, class);
                if self.shared.metrics.is_some() || tracing::level_enabled!(tracing::Level::DEBUG) {
                    entry.started = Some(std::time::Instant::now());
                }
                if class.is_none() || env.op == op::BIND_REQUEST {
                    entry.request = Some(frame.clone());
                }
                match env.op {
                    op::BIND_REQUEST => {
                        entry.sasl_bind = env.bind_auth == Some(auth::SASL);
                        // A simple bind with an empty password is
                        // unauthenticated (RFC 4513 section 5.1.2), whatever
                        // name it gives: it names no identity.
                        if env.bind_auth == Some(auth::SIMPLE) && !env.empty_simple_password() {
                            entry.bind_dn_span = env.dn_span().unwrap_or_default();
                        }
                    }
                    op::SEARCH_REQUEST => {
                        if env.has_controls() && self.state.search_state.load(Ordering::SeqCst) {
                            self.hand_back_search_state(env, frame);
                        }
                        entry.persistent = env.has_control(frame, oid::SYNC_REQUEST)
                            || env.has_control(frame, oid::PERSISTENT_SEARCH);
                        entry.root_dse = env.scope == Some(0)
                            && env.dn_bytes(frame).is_some_and(|d| d.is_empty());
                    }
                    _ => {}
                }
                self.state.start(env.msgid, entry)
            },
        )
    }

    /// A search hands back a paged-results cookie or VLV context the
    /// server handed out: no longer outstanding (its answer hands out the
    /// next one, if any).
    fn hand_back_search_state(&self, env: &Envelope, frame: &[u8]) {
        let mut carry = lock(&self.state.carry);
        let mut holds = true;
        for c in env.controls(frame) {
            if let Some(state) = paging::search_state(&c, false) {
                holds = carry.handed_back(state);
            }
        }
        self.state.search_state.store(holds, Ordering::SeqCst);
    }

    fn enqueue(&mut self, frame: Bytes, env: Envelope, class: Class, local: Option<LocalOp>) {
        debug!(
            conn = self.id,
            msgid = env.msgid,
            op = op::name(env.op),
            "held (by the freeze, or behind a bind)"
        );
        let q = Queued {
            frame,
            env,
            class,
            local,
        };
        self.queue.push(q, &self.engine);
        self.queue_changed();
    }

    /// Removes a queued request by message ID.
    fn unqueue(&mut self, msgid: i32) -> Option<Queued> {
        let q = self.queue.remove(msgid, &self.engine)?;
        self.queue_changed();
        Some(q)
    }

    /// Reads what a client sent while its session was not reading it (what
    /// the kernel holds for the socket, and at most another
    /// `queue_max_bytes_per_conn` and [`catch_up_frames`] requests, within
    /// the total limits; the requests join the queue behind the others):
    /// if the client has gone meanwhile, the session ends and its queue is
    /// discarded, never sent, as when a close is seen during the freeze.
    /// So at a release a connection's queue may hold up to twice its byte
    /// limit, and its requests limit plus that many requests. The bounds
    /// are the queue's, not this read's: a queue that waits behind a bind
    /// is caught up again at each later release and must not grow by
    /// another allowance each time (the session fuzz check found it).
    async fn catch_up(&mut self) -> Step {
        let cfg = self.engine.config();
        let limit = 2 * cfg.queue_max_bytes_per_conn;
        let extra = catch_up_frames(cfg.queue_max_requests_per_conn);
        let max_queued = cfg.queue_max_requests_per_conn + extra;
        let mut frames = extra;
        while self.queue.bytes() < limit
            && self.queue.len() < max_queued
            && frames > 0
            && self.engine.queue_has_room()
        {
            frames -= 1;
            match self.client_in.next_message().now_or_never() {
                None => break,
                Some(next) => {
                    if let Step::End(e) = self.handle(next).await {
                        return Step::End(e);
                    }
                }
            }
        }
        Step::Continue
    }

    /// The freeze changed, a bind ended or the connection has nothing in
    /// flight: send what is no longer held, oldest first, stopping at the
    /// first request still held.
    async fn release(&mut self) -> Step {
        let mut sent = 0;
        // The server is not back (the retry time is over): why.
        let mut down: Option<String> = None;
        while let Some(head) = self.queue.front() {
            if let Some(what) = head.local {
                if self.state.bind_in_flight() {
                    break;
                }
                let q = self.queue.pop_front(&self.engine).expect("front exists");
                if let Step::End(e) = self.answer_locally(what, &q.env, &q.frame).await {
                    return Step::End(e);
                }
                continue;
            }
            if held_by_session(head.env.op, &*self) {
                break;
            }
            if self.state.upstream_lost.load(Ordering::SeqCst) {
                // The server closed the connection: a new one once the
                // freeze holds neither the request nor the bind that gives
                // the new connection the session's identity.
                if self.engine.holds(head.class) || self.replay_held() {
                    break;
                }
                if let Some(why) = &down {
                    // The server did not come back within the retry time:
                    // the request was never sent, and is answered so.
                    let q = self.queue.pop_front(&self.engine).expect("front exists");
                    let why = why.clone();
                    if let Step::End(e) = self.unavailable(q, &why).await {
                        return Step::End(e);
                    }
                    continue;
                }
                // Boxed: rarely run, and large.
                match Box::pin(self.reestablish()).await {
                    Ok(()) => {}
                    Err(NotBack::Down(why)) => down = Some(why),
                    Err(NotBack::End(end)) => return Step::End(end),
                }
                continue;
            }
            // Cannot happen: an ID is checked against the table and the
            // queue when it arrives, and only an ID in flight is suppressed.
            // Were the server still to answer another request with it, that
            // answer would be taken for this one's: fail closed.
            if self.answer_pending(head.env.msgid) {
                return Step::End(reused_id(head.env.msgid));
            }
            match self.admit(&head.env, &head.frame, Some(head.class)) {
                Err(_) => break,
                // Cannot happen either (as above).
                Ok(false) => return Step::End(reused_id(head.env.msgid)),
                Ok(true) => {}
            }
            let q = self.queue.pop_front(&self.engine).expect("front exists");
            sent += 1;
            if let Step::End(e) = self.send_admitted(&q.env, q.frame).await {
                return Step::End(e);
            }
        }
        self.queue_changed();
        if sent > 0 {
            self.engine.released(sent);
            debug!(
                conn = self.id,
                sent,
                left = self.queue.len(),
                "released queued requests"
            );
        }
        Step::Continue
    }

    /// A freeze holds the bind that would give a new connection this
    /// session's identity (a bind into a frozen backend may write there,
    /// as any bind the gate holds).
    fn replay_held(&self) -> bool {
        // Copied out: the carry lock is never held while the engine's is
        // taken (the gate takes them in the other order).
        let Some(request) = lock(&self.state.carry)
            .bind_request()
            .map(carry::Secret::new)
        else {
            return false;
        };
        let request = request.bytes();
        match Envelope::request(request) {
            Ok(env) => self.engine.holds(self.engine.classify(&env, request, None)),
            Err(_) => true,
        }
    }

    /// Carries the session to a new upstream connection: connects (with
    /// backoff, for up to `upstream_retry_secs`), gives the connection the
    /// session's identity (`carry::reestablish`: the bind replayed, checked
    /// with Who am I?), then hands its input to the responses loop. A
    /// server that answers differently ends the session at once; one that
    /// does not answer within the retry time leaves it waiting
    /// ([`NotBack::Down`]), and until it is back each later attempt is a
    /// single one.
    async fn reestablish(&mut self) -> Result<(), NotBack> {
        if !self.state.inflight().is_empty() {
            // Sent on the connection that closed (it passed the gate as the
            // connection went): the server may have run it or not.
            return Err(NotBack::End(End::NotCarried(
                "a request was in flight when the connection closed".into(),
            )));
        }
        let settings = &self.shared.settings;
        let replay = lock(&self.state.carry).replay();
        let window = if self.retry_spent {
            Duration::ZERO
        } else {
            settings.upstream_retry
        };
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), window);
        let security = self.security();
        loop {
            let shared = &self.shared;
            let attempt = async {
                let (mut up_in, mut up_out, stream) = open_upstream(shared, security)
                    .await
                    .map_err(|e| Refused::Lost(e.to_string()))?;
                carry::reestablish(&mut up_in, &mut up_out, &replay).await?;
                let (generation, why) = shared
                    .prints
                    .observe(print::read(&mut up_in, &mut up_out).await?);
                if generation != self.state.server_generation.load(Ordering::SeqCst) {
                    return Err(Refused::Differs(format!(
                        "the server came back as another server: {why}"
                    )));
                }
                Ok::<_, Refused>((up_in, up_out, stream))
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout(settings.upstream_connect_timeout, attempt) => r,
                _ = self.close.cancelled() => return Err(NotBack::End(End::Closed)),
                _ = self.abort.cancelled() => return Err(NotBack::End(End::Shutdown)),
            };
            let why = match outcome {
                Ok(Ok((up_in, up_out, stream))) => {
                    let handover = lock(&self.state.new_upstream).take();
                    if handover.is_none_or(|tx| tx.send(up_in).is_err()) {
                        return Err(NotBack::End(End::Closed));
                    }
                    self.up_out = up_out;
                    self.upstream_stream = stream;
                    self.retry_spent = false;
                    self.state.upstream_lost.store(false, Ordering::SeqCst);
                    // Nothing of the old connection can be answered on
                    // this one.
                    self.state.suppressed.clear();
                    info!(
                        conn = self.id,
                        "session carried to a new upstream connection"
                    );
                    return Ok(());
                }
                Ok(Err(Refused::Differs(why))) => return Err(NotBack::End(End::NotCarried(why))),
                Ok(Err(Refused::Lost(why))) => why,
                Err(_) => "timed out".to_string(),
            };
            let Some(pause) = backoff.next_pause() else {
                self.retry_spent = true;
                let why = format!(
                    "the LDAP server has not answered again within {} s (upstream_retry_secs): \
                     {why}",
                    settings.upstream_retry.as_secs()
                );
                info!(conn = self.id, "{why}");
                return Err(NotBack::Down(why));
            };
            debug!(conn = self.id, "upstream not back yet: {why}");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.close.cancelled() => return Err(NotBack::End(End::Closed)),
                _ = self.abort.cancelled() => return Err(NotBack::End(End::Shutdown)),
            }
        }
    }

    /// Answers a request the proxy did not send because the server is down
    /// with `unavailable`; the session stays, and is carried once the server
    /// is back. A bind answered so leaves the session anonymous, as any
    /// failed bind (RFC 4511 section 4.2.1).
    async fn unavailable(&mut self, q: Queued, why: &str) -> Step {
        if q.env.op == op::BIND_REQUEST {
            lock(&self.state.carry).anonymous();
            self.state.set_authenticated(false);
            self.state.set_bound_dn(None);
        }
        let message = format!(
            "abproxy: {why}; this request was not sent to it (the session stays open and goes on \
             once the server is back)"
        );
        match pdu::response_for(q.env.op, q.env.msgid, LdapResultCode::Unavailable, &message) {
            Some(r) => self.reply_locally(r).await,
            None => Step::Continue,
        }
    }

    /// Sends a request the gate admitted (it is in flight): a write gets
    /// its journal intent record first, when the journal is on. A write
    /// the journal cannot record is taken out of flight and answered
    /// `unavailable`, never sent: no write the journal does not hold
    /// reaches the server.
    async fn send_admitted(&mut self, env: &Envelope, frame: Bytes) -> Step {
        if let Some(journal) = &self.shared.journal {
            if self.engine.journals(env, &frame) {
                let identity = self.state.bound_dn().unwrap_or_default();
                let body = JournalBody::Intent {
                    identity,
                    request: frame.to_vec(),
                };
                match journal.append(self.id, body) {
                    Ok(seq) => {
                        if let Some(e) = self.state.inflight().get_mut(env.msgid) {
                            e.journal = seq;
                        }
                    }
                    Err(e) => return self.unjournaled(env, &e).await,
                }
            }
        }
        self.feed(frame).await
    }

    /// A write the journal could not record: out of flight, answered
    /// `unavailable`.
    async fn unjournaled(&mut self, env: &Envelope, e: &JournalError) -> Step {
        warn!(conn = self.id, msgid = env.msgid, "write refused: {e}");
        let entry = self.state.inflight().abandon(env.msgid);
        if let Some(entry) = entry {
            self.state.forget(&entry);
            self.state.signal_completed();
            self.engine.completed();
        }
        let message = format!("abproxy: {e}; this write was not sent to the server");
        match pdu::response_for(env.op, env.msgid, LdapResultCode::Unavailable, &message) {
            Some(r) => self.reply_locally(r).await,
            None => Step::Continue,
        }
    }

    async fn feed(&mut self, frame: Bytes) -> Step {
        if self.up_out.append(&frame) {
            return Step::Continue;
        }
        match feed_waiting(&mut self.up_out, &frame, &self.close, TO_UPSTREAM).await {
            Ok(()) => Step::Continue,
            Err(e) => Step::End(e),
        }
    }

    /// Starts an Allow-Backup request; its answer comes when the drain is
    /// over, while the session goes on.
    fn allow_backup(&self, env: &Envelope, frame: &Bytes) {
        let engine = self.engine.clone();
        let who = self.requester();
        let value = env
            .value_span()
            .map(|s| frame.slice(s.start as usize..s.end as usize));
        let local = self.local.clone();
        let msgid = env.msgid;
        let state = self.state.clone();
        lock(&state.local_ids).push(msgid);
        state.local_pending.fetch_add(1, Ordering::AcqRel);
        self.shared.tasks.spawn(async move {
            let (code, msg) =
                exops::allow_backup_answer(engine.allow_backup(who, value.as_deref()).await);
            let resp = pdu::extended_response(
                msgid,
                code,
                &msg,
                Some(abproxy_proto::ALLOW_BACKUP_OID),
                None,
            );
            let _ = local.send(Local::Pdu(resp)).await;
            lock(&state.local_ids).retain(|&id| id != msgid);
            state.local_pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    async fn on_control(&mut self, c: Control) -> Step {
        match c {
            Control::AbandonReads(ids) => {
                for msgid in ids {
                    // Only what an Abandon stops (a bind, for one, runs on
                    // at the server, and the next bind would overlap it).
                    // The rest stays in flight: the drain waits for it a
                    // little longer, then ON fails.
                    let target = self.state.inflight().get(msgid).map(|e| e.op);
                    if !target.is_some_and(op::abandon_stops) {
                        continue;
                    }
                    let Some(entry) = self.state.abandon(msgid) else {
                        continue;
                    };
                    self.state.suppressed.insert(msgid);
                    let abandon = pdu::encode(LdapMsg::new(
                        PROXY_ABANDON_ID,
                        LdapOp::AbandonRequest(msgid),
                    ));
                    if let Step::End(e) = self.feed(abandon).await {
                        return Step::End(e);
                    }
                    warn!(
                        conn = self.id,
                        msgid,
                        op = op::name(entry.op),
                        "abandoned by the backup drain time limit"
                    );
                    if let Some(r) = pdu::response_for(
                        entry.op,
                        msgid,
                        LdapResultCode::TimeLimitExceeded,
                        "abproxy: abandoned at the Allow-Backup drain time limit",
                    ) {
                        if let Step::End(e) = self.reply_locally(r).await {
                            return Step::End(e);
                        }
                    }
                    self.state.signal_completed();
                    self.engine.completed();
                }
                Step::Continue
            }
            // Handled where the loops wait.
            Control::Shutdown | Control::Close => Step::Continue,
        }
    }

    async fn reply_locally(&mut self, pdu: Bytes) -> Step {
        tokio::select! {
            biased;
            r = self.local.send(Local::Pdu(pdu)) => match r {
                Ok(()) => Step::Continue,
                Err(_) => Step::End(End::Closed),
            },
            _ = self.close.cancelled() => Step::End(End::Closed),
        }
    }

    /// Shutdown: stop reading the client, let in-flight requests finish (up
    /// to the grace period, enforced by `abort`), then end the session.
    async fn drain_for_shutdown(&mut self) -> End {
        if let Step::End(e) = self.flush().await {
            return e;
        }
        let pending = self.state.inflight().len();
        if pending > 0 {
            debug!(
                conn = self.id,
                pending, "shutdown: waiting for in-flight requests"
            );
        }
        loop {
            tokio::select! {
                _ = self.close.cancelled() => return End::Closed,
                _ = self.abort.cancelled() => break,
                _ = self.state.wait_drained() => break,
                // Keep serving the drain time limit while waiting.
                Some(c) = self.control.recv() => match c {
                    Control::Close => return End::Closed,
                    Control::Shutdown => {}
                    c @ Control::AbandonReads(_) => {
                        self.on_control(c).await;
                        let _ = self.flush().await;
                    }
                },
            }
        }
        End::Shutdown
    }
}

/// What the decision reads of the session.
impl View for Requests {
    #[inline]
    fn clear_refused(&self) -> bool {
        self.tcp && !self.tls && self.shared.settings.tls.require_tls
    }

    fn external_refused(&self) -> Option<&'static str> {
        self.shared.external_is_the_proxy()
    }

    #[inline]
    fn queue_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn queued(&self, msgid: i32) -> bool {
        self.queue.contains(msgid)
    }

    fn bind_queued(&self) -> bool {
        self.queue.binds() > 0
    }

    #[inline]
    fn answering(&self, msgid: i32) -> bool {
        self.state.local_pending.load(Ordering::Acquire) > 0
            && lock(&self.state.local_ids).contains(&msgid)
    }

    fn in_flight(&self, msgid: i32) -> Option<u8> {
        self.state.inflight().get(msgid).map(|e| e.op)
    }

    #[inline]
    fn id_taken(&self, msgid: i32) -> bool {
        self.state.inflight().taken(msgid)
    }

    #[inline]
    fn bind_in_flight(&self) -> bool {
        self.state.bind_in_flight()
    }

    #[inline]
    fn outstanding(&self) -> usize {
        self.state.outstanding()
    }

    #[inline]
    fn upstream_lost(&self) -> bool {
        self.state.upstream_lost.load(Ordering::Relaxed)
    }

    #[inline]
    fn answer_pending(&self, msgid: i32) -> bool {
        self.state.suppressed.contains(msgid)
    }
}
