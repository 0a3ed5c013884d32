//! The requests loop: client frames -> envelope -> decision -> upstream,
//! or the per-connection queue, or an answer from the proxy itself.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use ldap3_proto::proto::{LdapMsg, LdapOp, LdapResultCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::freeze::participant::InFlight;
use crate::freeze::{Class, Control, Engine, Requester};
use crate::proxy::exops::{self, Exop};
use crate::proxy::mailbox::Inbox;
use crate::tls::ClientStream;
use crate::wire::envelope::{auth, oid};
use crate::wire::{op, pdu, Envelope, FrameError};

use super::decide::{cancel_target, exempt_from_tls};
use super::end::{reused_id, End, IoAt, Side};
use super::state::SessionState;
use super::{
    count, feed_waiting, flush_now, flush_waiting, frame_buffered, lock, ClientIn, Close, Local,
    Next, Shared, UpOut, BATCH, PROXY_ABANDON_ID, TO_UPSTREAM, UPSTREAM_CLOSE_WAIT,
};

/// A request held by a freeze, or for the session's own order (behind a
/// bind, or a bind behind the connection's outstanding requests).
pub(super) struct Queued {
    pub(super) frame: Bytes,
    pub(super) env: Envelope,
    pub(super) class: Class,
    /// Answered by the proxy itself once released (an Allow-Backup or
    /// status request behind a bind: it needs the bind's identity).
    pub(super) local: Option<LocalOp>,
}

/// Extended operations the proxy answers itself that depend on the
/// session's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LocalOp {
    AllowBackup,
    Status,
}

pub(super) struct Requests<'a> {
    pub(super) id: u64,
    /// Peer credentials (uid, gid) of a client on a unix socket.
    pub(super) cred: Option<(u32, u32)>,
    /// The client's TCP stream, which StartTLS can turn to TLS.
    pub(super) client: Option<ClientStream>,
    /// The session is in TLS.
    pub(super) tls: bool,
    /// The client is on TCP (not ldapi): `require_tls` applies in clear.
    pub(super) tcp: bool,
    /// The verified client certificate's subject.
    pub(super) cert_subject: Option<String>,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) engine: &'a Arc<Engine>,
    pub(super) state: &'a Arc<SessionState>,
    pub(super) client_in: ClientIn,
    pub(super) up_out: UpOut,
    pub(super) local: mpsc::Sender<Local>,
    pub(super) control: Inbox<mpsc::UnboundedReceiver<Control>>,
    pub(super) epoch: watch::Receiver<u64>,
    pub(super) queue: VecDeque<Queued>,
    pub(super) queued_bytes: usize,
    /// Binds in `queue`.
    pub(super) queued_binds: usize,
    pub(super) close: &'a Close,
    pub(super) abort: &'a CancellationToken,
}

/// What happened to one request frame.
pub(super) enum Step {
    Continue,
    End(End),
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

impl Requests<'_> {
    pub(super) async fn run(mut self) -> End {
        let end = self.pump().await;
        self.discard_queue(&end);
        match &end {
            End::ClientClosed | End::Unbind => {
                // Like a direct client: the server sees EOF and closes.
                self.state.client_gone.store(true, Ordering::Relaxed);
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
            End::Shutdown => {
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    "abproxy is shutting down",
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
        end
    }

    /// Ends the session: the responses loop writes what it has, then closes.
    pub(super) fn end_session(&self) {
        self.close.cancel();
        let _ = self.local.try_send(Local::Close);
    }

    /// Requests still queued when the session ends are never sent upstream.
    pub(super) fn discard_queue(&mut self, end: &End) {
        if self.queue.is_empty() {
            return;
        }
        let n = self.queue.len();
        warn!(
            conn = self.id,
            discarded = n,
            "session ended ({}) with queued requests: discarded, never sent upstream",
            end.describe()
        );
        self.queue.clear();
        self.engine.queue_sub(n, self.queued_bytes);
        self.queued_bytes = 0;
        self.queued_binds = 0;
        self.queue_changed();
    }

    /// The queue's length changed: publish it.
    pub(super) fn queue_changed(&self) {
        self.state.queued.store(self.queue.len(), Ordering::Relaxed);
        self.state.set_settle_waiting(!self.queue.is_empty());
    }

    /// A bind is waiting in the queue or in flight: the session's identity
    /// is unknown until its response.
    pub(super) fn bind_pending(&self) -> bool {
        self.queued_binds > 0 || self.state.bind_in_flight()
    }

    /// The session's own order holds this request back: everything waits
    /// for a bind in flight, and a bind waits until nothing of its
    /// connection is in flight (RFC 4511 section 4.2.1; the server would
    /// drop what it overlaps, and it may still be running a write).
    pub(super) fn held_by_session(&self, env: &Envelope) -> bool {
        self.state.bind_in_flight() || (env.op == op::BIND_REQUEST && self.state.outstanding() > 0)
    }

    /// RFC 4511 section 4.1.1.1: a request reusing the message ID of one
    /// that is still outstanding (queued here, answered later by the proxy,
    /// or, when `table`, in flight at the server). The in-flight insert
    /// checks the table itself for requests that go straight upstream.
    pub(super) fn reused(&self, msgid: i32, table: bool) -> bool {
        (!self.queue.is_empty() && self.queue.iter().any(|q| q.env.msgid == msgid))
            || (self.state.local_pending.load(Ordering::Acquire) > 0
                && lock(&self.state.local_ids).contains(&msgid))
            || (table && self.state.inflight().get(msgid).is_some())
    }

    /// Room to read another request: per-connection and total queue limits.
    /// The total only stops sessions that already hold queued requests: one
    /// with nothing queued always reads, so an operator can still send OFF
    /// or ask the status, and queues at most one request over the total.
    pub(super) fn has_room(&self) -> bool {
        let cfg = self.engine.config();
        self.queue.len() < cfg.queue_max_requests_per_conn
            && self.queued_bytes < cfg.queue_max_bytes_per_conn
            && (self.queue.is_empty() || self.engine.queue_has_room())
            && self.state.below_outstanding_limit()
    }

    pub(super) async fn pump(&mut self) -> End {
        let idle = self.shared.config.idle_timeout();
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
            let state = self.state;
            let event = tokio::select! {
                biased;
                Some(c) = self.control.recv() => match c {
                    Control::Close => return End::Closed,
                    Control::Shutdown => return self.drain_for_shutdown().await,
                    c => Event::Control(c),
                },
                Ok(()) = self.epoch.changed(), if waiting => Event::Epoch,
                // A bind ended, or nothing is left in flight: requests held
                // for the session's own order may go.
                _ = async { state.settle.notified().await }, if !self.queue.is_empty() => Event::Epoch,
                f = self.client_in.next_message(), if room => Event::Frame(f),
                // Created only when polled: no waiter made and dropped per
                // request while there is room.
                _ = async { state.room.notified().await }, if !room => Event::Room,
                _ = &mut idle_timer, if idle.is_some() => Event::IdleCheck,
            };
            let step = match event {
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
                    self.on_frames(f).await
                }
            };
            if let Step::End(e) = step {
                return e;
            }
            if let Step::End(e) = self.flush().await {
                return e;
            }
        }
    }

    /// Handles a frame and whatever else the client already sent.
    pub(super) async fn on_frames(&mut self, first: Next) -> Step {
        if let Step::End(e) = self.handle(first).await {
            return Step::End(e);
        }
        for _ in 0..BATCH {
            if !self.has_room() || !frame_buffered(&self.client_in) {
                break;
            }
            match self.client_in.next_message().now_or_never() {
                Some(next) => {
                    if let Step::End(e) = self.handle(next).await {
                        return Step::End(e);
                    }
                }
                None => break,
            }
        }
        Step::Continue
    }

    pub(super) async fn flush(&mut self) -> Step {
        let flushed = match flush_now(&mut self.up_out, TO_UPSTREAM) {
            Some(r) => r,
            None => flush_waiting(&mut self.up_out, self.close, TO_UPSTREAM).await,
        };
        match flushed {
            Ok(()) => Step::Continue,
            Err(e) => Step::End(e),
        }
    }

    pub(super) async fn handle(&mut self, next: Next) -> Step {
        let frame = match next {
            Ok(None) => return Step::End(End::ClientClosed),
            Ok(Some(n)) => self.client_in.take(n),
            Err(FrameError::Io(e)) => return Step::End(End::Io(IoAt::Read(Side::Client), e)),
            Err(FrameError::TruncatedAtEof(n)) => {
                debug!(conn = self.id, "client closed inside a message ({n} bytes)");
                return Step::End(End::ClientClosed);
            }
            Err(e) => {
                if self.state.sasl_bound.load(Ordering::Relaxed) {
                    return Step::End(End::SaslLayer(Side::Client));
                }
                if matches!(e, FrameError::TooLarge { .. }) && !self.state.authenticated() {
                    return Step::End(End::ClientProtocol(format!(
                        "{e} before a successful bind (max_pdu_bytes_anonymous)"
                    )));
                }
                return Step::End(End::ClientProtocol(e.to_string()));
            }
        };
        let env = match Envelope::request(&frame) {
            Ok(env) => env,
            Err(e) => return Step::End(End::ClientProtocol(e.to_string())),
        };
        count(&self.state.requests);
        debug!(
            conn = self.id,
            msgid = env.msgid,
            op = op::name(env.op),
            dn = %String::from_utf8_lossy(env.dn_bytes(&frame).unwrap_or_default()),
            "request"
        );
        // A client reusing the ID of a request the proxy answered itself.
        if self.state.any_suppressed.load(Ordering::Relaxed) {
            let mut s = lock(&self.state.suppressed);
            s.remove(&env.msgid);
            self.state
                .any_suppressed
                .store(!s.is_empty(), Ordering::Relaxed);
        }

        if self.shared.config.tls.require_tls
            && self.tcp
            && !self.tls
            && !exempt_from_tls(&env, &frame)
        {
            debug!(
                conn = self.id,
                msgid = env.msgid,
                "refused in clear: tls.require_tls"
            );
            return match pdu::response_for(
                env.op,
                env.msgid,
                LdapResultCode::ConfidentialityRequired,
                "abproxy requires TLS on this connection (tls.require_tls): use ldaps:// or \
                 StartTLS first (ldapsearch -ZZ)",
            ) {
                Some(r) => self.reply_locally(r).await,
                None => Step::Continue,
            };
        }
        match env.op {
            op::ABANDON_REQUEST => return self.client_abandon(&env, frame).await,
            op::UNBIND_REQUEST => {
                self.discard_queue(&End::Unbind);
                if let Step::End(e) = self.feed(frame).await {
                    return Step::End(e);
                }
                return Step::End(End::Unbind);
            }
            _ => {}
        }
        if self.reused(env.msgid, false) {
            return Step::End(reused_id(env.msgid));
        }
        if env.op == op::BIND_REQUEST {
            if env.bind_auth == Some(auth::SASL)
                && env
                    .sasl_mechanism_bytes(&frame)
                    .is_some_and(|m| m.eq_ignore_ascii_case(b"EXTERNAL"))
            {
                if let Some(why) = self.shared.external_is_the_proxy() {
                    // Never forwarded: the server would take the proxy's
                    // identity for the client's. The connection keeps the
                    // identity it had at the server.
                    warn!(conn = self.id, "SASL EXTERNAL bind refused: {why}");
                    let r = pdu::response_for(
                        op::BIND_REQUEST,
                        env.msgid,
                        LdapResultCode::AuthMethodNotSupported,
                        &format!("abproxy refuses SASL EXTERNAL here: {why}, not as this client"),
                    );
                    return match r {
                        Some(r) => self.reply_locally(r).await,
                        None => Step::Continue,
                    };
                }
            }
            // The identity is the one this bind's own response gives.
            self.state.unbind_for_bind();
        }
        let mut local = None;
        if env.op == op::EXTENDED_REQUEST {
            let exop = exops::lookup(env.oid_bytes(&frame).unwrap_or_default());
            // A cancel of a queued request is answered here too.
            let cancel_queued = (exop == Some(Exop::Cancel))
                .then(|| cancel_target(env.value_bytes(&frame)))
                .flatten()
                .filter(|&t| self.queue.iter().any(|q| q.env.msgid == t));
            let answered_here = match exop {
                Some(Exop::StartTls | Exop::AllowBackup | Exop::Status) => true,
                Some(Exop::Cancel) => cancel_queued.is_some(),
                None => false,
            };
            if answered_here {
                if let Some(c) = env.controls(&frame).find(|c| c.critical) {
                    // RFC 4511 section 4.1.11: the proxy answers this
                    // operation and implements none of its controls.
                    let r = pdu::extended_response(
                        env.msgid,
                        LdapResultCode::UnavailableCriticalExtension,
                        &format!(
                            "abproxy answers this extended operation itself and does not \
                             support the critical control {}",
                            String::from_utf8_lossy(c.oid)
                        ),
                        None,
                        None,
                    );
                    return self.reply_locally(r).await;
                }
            }
            match exop {
                Some(Exop::StartTls) => {
                    // Answered here, never forwarded: the proxy must read
                    // every request, so it terminates TLS itself.
                    // Boxed: the handshake's future is large (1.6 KB), and
                    // inline it would make every request's `handle` future
                    // as large, built and moved at each request.
                    return Box::pin(self.start_tls(&env)).await;
                }
                Some(Exop::AllowBackup) => local = Some(LocalOp::AllowBackup),
                Some(Exop::Status) => local = Some(LocalOp::Status),
                Some(Exop::Cancel) | None => {}
            }
            if let Some(q) = cancel_queued.and_then(|t| self.unqueue(t)) {
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
                let ok = pdu::extended_response(env.msgid, LdapResultCode::Success, "", None, None);
                return self.reply_locally(ok).await;
            }
        }
        if let Some(what) = local {
            // Answered at once, unless a bind is pending: then after it, with
            // the identity it gives (an operator's OFF on a connection with
            // held writes is answered at once).
            if self.state.inflight().get(env.msgid).is_some() {
                return Step::End(reused_id(env.msgid));
            }
            if !self.bind_pending() {
                return self.answer_locally(what, &env, &frame).await;
            }
            self.enqueue(frame, env, Class::NEVER, Some(what));
            return Step::Continue;
        }
        // Order per connection is absolute: once one request waits, every
        // later one waits behind it.
        if !self.queue.is_empty() || self.held_by_session(&env) {
            if self.state.inflight().get(env.msgid).is_some() {
                return Step::End(reused_id(env.msgid));
            }
            let class = self.classify(&env, &frame);
            self.enqueue(frame, env, class, None);
            return Step::Continue;
        }
        match self.admit(&env, &frame, None) {
            Ok(true) => self.feed(frame).await,
            Ok(false) => Step::End(reused_id(env.msgid)),
            Err(class) => {
                self.enqueue(frame, env, class, None);
                Step::Continue
            }
        }
    }

    /// An Abandon from the client. A queued request is dropped here; a read
    /// in flight is abandoned at the server; anything else in flight (a
    /// write, an extended operation, a bind) may be running at the server,
    /// which does not stop a write it has started: the Abandon is not
    /// forwarded, the request stays in flight (a drain waits for it) and its
    /// response, which the client asked not to get, is dropped.
    pub(super) async fn client_abandon(&mut self, env: &Envelope, frame: Bytes) -> Step {
        let Some(target) = env.abandon_id else {
            return Step::Continue;
        };
        if self.unqueue(target).is_some() {
            debug!(conn = self.id, target, "abandoned a queued request");
            return Step::Continue;
        }
        {
            let mut table = self.state.inflight();
            if let Some(e) = table.get_mut(target) {
                if !matches!(e.op, op::SEARCH_REQUEST | op::COMPARE_REQUEST) {
                    e.abandoned = true;
                    debug!(
                        conn = self.id,
                        target,
                        op = op::name(e.op),
                        "abandon of a request the server may be running: not forwarded, its response will be dropped"
                    );
                    return Step::Continue;
                }
            }
        }
        if self.state.abandon(target).is_some() {
            self.state.signal_completed();
            self.engine.completed();
        }
        self.feed(frame).await
    }

    /// Answers an Allow-Backup or status request.
    pub(super) async fn answer_locally(
        &mut self,
        what: LocalOp,
        env: &Envelope,
        frame: &Bytes,
    ) -> Step {
        match what {
            LocalOp::AllowBackup => {
                self.allow_backup(env, frame);
                Step::Continue
            }
            LocalOp::Status => {
                let (code, msg, value) = self.engine.status(&self.requester());
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
    pub(super) async fn start_tls(&mut self, env: &Envelope) -> Step {
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
        let (flushed_tx, flushed_rx) = oneshot::channel();
        let (resume_tx, resume_rx) = oneshot::channel();
        let start = Local::StartTls {
            pdu: answer(LdapResultCode::Success, ""),
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

    pub(super) fn classify(&self, env: &Envelope, frame: &[u8]) -> Class {
        // Copied out of the lock (classification happens only while a
        // freeze is on).
        let bound = self.state.bound_dn_bytes();
        self.engine.classify(env, frame, bound.as_deref())
    }

    pub(super) fn requester(&self) -> Requester {
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
    pub(super) fn admit(
        &self,
        env: &Envelope,
        frame: &Bytes,
        known: Option<Class>,
    ) -> Result<bool, Class> {
        self.engine.admit(
            || known.unwrap_or_else(|| self.classify(env, frame)),
            |class| {
                let mut entry = InFlight::new(env.op, class);
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
                            entry.bind_dn_span = env.dn.clone();
                        }
                    }
                    op::SEARCH_REQUEST => {
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

    pub(super) fn enqueue(
        &mut self,
        frame: Bytes,
        env: Envelope,
        class: Class,
        local: Option<LocalOp>,
    ) {
        debug!(
            conn = self.id,
            msgid = env.msgid,
            op = op::name(env.op),
            "held (by the freeze, or behind a bind)"
        );
        if env.op == op::BIND_REQUEST {
            self.queued_binds += 1;
        }
        self.queued_bytes += frame.len();
        self.engine.queue_add(frame.len());
        self.queue.push_back(Queued {
            frame,
            env,
            class,
            local,
        });
        self.queue_changed();
    }

    /// Takes a request out of the queue's accounting.
    pub(super) fn dequeued(&mut self, q: &Queued) {
        if q.env.op == op::BIND_REQUEST {
            self.queued_binds -= 1;
        }
        self.queued_bytes -= q.frame.len();
        self.engine.queue_sub(1, q.frame.len());
    }

    /// Removes a queued request by message ID.
    pub(super) fn unqueue(&mut self, msgid: i32) -> Option<Queued> {
        let pos = self.queue.iter().position(|q| q.env.msgid == msgid)?;
        let q = self.queue.remove(pos)?;
        self.dequeued(&q);
        self.queue_changed();
        Some(q)
    }

    /// Reads what a client sent while its session was not reading it (what
    /// the kernel holds for the socket, and at most another
    /// `queue_max_bytes_per_conn`; the requests join the queue behind the
    /// others): if the client has gone meanwhile, the session ends and its
    /// queue is discarded, never sent, as when a close is seen during the
    /// freeze.
    pub(super) async fn catch_up(&mut self) -> Step {
        let cfg = self.engine.config();
        let limit = self.queued_bytes + cfg.queue_max_bytes_per_conn;
        // Requests answered by the proxy itself do not queue: bound the
        // frames too.
        let mut frames = 4 * cfg.queue_max_requests_per_conn.max(256);
        while self.queued_bytes < limit && frames > 0 {
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
    pub(super) async fn release(&mut self) -> Step {
        let mut sent = 0;
        while let Some(head) = self.queue.front() {
            if let Some(what) = head.local {
                if self.state.bind_in_flight() {
                    break;
                }
                let q = self.queue.pop_front().expect("front exists");
                self.dequeued(&q);
                if let Step::End(e) = self.answer_locally(what, &q.env, &q.frame).await {
                    return Step::End(e);
                }
                continue;
            }
            if self.held_by_session(&head.env) {
                break;
            }
            match self.admit(&head.env, &head.frame, Some(head.class)) {
                Err(_) => break,
                // Cannot happen: an ID is checked against the table and the
                // queue when it arrives.
                Ok(false) => return Step::End(reused_id(head.env.msgid)),
                Ok(true) => {}
            }
            let q = self.queue.pop_front().expect("front exists");
            self.dequeued(&q);
            sent += 1;
            if let Step::End(e) = self.feed(q.frame).await {
                return Step::End(e);
            }
        }
        self.queue_changed();
        if sent > 0 {
            debug!(
                conn = self.id,
                sent,
                left = self.queue.len(),
                "released queued requests"
            );
        }
        Step::Continue
    }

    pub(super) async fn feed(&mut self, frame: Bytes) -> Step {
        if self.up_out.append(&frame) {
            return Step::Continue;
        }
        match feed_waiting(&mut self.up_out, &frame, self.close, TO_UPSTREAM).await {
            Ok(()) => Step::Continue,
            Err(e) => Step::End(e),
        }
    }

    /// Starts an Allow-Backup request; its answer comes when the drain is
    /// over, while the session goes on.
    pub(super) fn allow_backup(&self, env: &Envelope, frame: &Bytes) {
        let engine = self.engine.clone();
        let shared = self.shared.clone();
        let who = self.requester();
        let value = env
            .value
            .as_ref()
            .map(|s| frame.slice(s.start as usize..s.end as usize));
        let local = self.local.clone();
        let msgid = env.msgid;
        let state = self.state.clone();
        lock(&state.local_ids).push(msgid);
        state.local_pending.fetch_add(1, Ordering::AcqRel);
        self.shared.tasks.spawn(async move {
            // Backends from the rootDSE, and whether the server has a
            // password policy, are re-read before each freeze.
            let is_on = value
                .as_deref()
                .is_some_and(|v| abproxy_proto::decode_request(v).is_ok_and(|r| r.mode));
            if is_on {
                super::super::refresh_from_root_dse(
                    &engine,
                    &shared.upstream,
                    shared.upstream_tls.as_ref(),
                    shared.config.upstream_connect_timeout(),
                    shared.auto_backends,
                    false,
                )
                .await;
            }
            let (code, msg) = engine.allow_backup(who, value.as_deref()).await;
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

    pub(super) async fn on_control(&mut self, c: Control) -> Step {
        match c {
            Control::AbandonReads(ids) => {
                for msgid in ids {
                    let Some(entry) = self.state.abandon(msgid) else {
                        continue;
                    };
                    lock(&self.state.suppressed).insert(msgid);
                    self.state.any_suppressed.store(true, Ordering::Relaxed);
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

    pub(super) async fn reply_locally(&mut self, pdu: Bytes) -> Step {
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
    pub(super) async fn drain_for_shutdown(&mut self) -> End {
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
