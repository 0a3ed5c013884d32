//! The responses loop: upstream frames -> envelope -> close in-flight
//! entries -> client; PDUs the proxy authors join here.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use ldap3_proto::proto::LdapResultCode;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::freeze::participant::HeldResponses;
use crate::freeze::{Carried, Control, Engine};
use crate::journal::{Body as JournalBody, Journal, JournalError};
use crate::proxy::mailbox::Inbox;
use crate::proxy::metrics::ProxyMetrics;
use crate::wire::{op, paging, pdu, rootdse, Envelope, FrameError};

use super::end::{End, IoAt, Side};
use super::state::{SessionState, TlsAnswer};
use super::{
    buffered_frame, count, feed_waiting, flush_now, flush_waiting, is_notice, lock, ClientOut,
    Close, Local, LoopEnd, Next, UpIn, BATCH, LINGER_MAX, TO_CLIENT,
};

pub(super) struct Responses {
    pub(super) id: u64,
    pub(super) engine: Arc<Engine>,
    pub(super) state: Arc<SessionState>,
    pub(super) up_in: UpIn,
    pub(super) client_out: ClientOut,
    pub(super) local: Inbox<mpsc::Receiver<Local>>,
    pub(super) control: mpsc::UnboundedSender<Control>,
    pub(super) epoch: watch::Receiver<u64>,
    /// The extended operations the proxy adds to the root DSE's
    /// `supportedExtension` (StartTLS too when it has a certificate).
    pub(super) extensions: &'static [&'static str],
    /// Persistent-search responses held while a stop-mode freeze lasts.
    pub(super) held: HeldResponses,
    pub(super) close: Close,
    /// The proxy sent the client a Notice of Disconnection: nothing may
    /// follow it (RFC 4511 section 4.4.1).
    pub(super) told: bool,
    /// The last response forwarded was a search entry or reference (its
    /// search's final response is probably close behind).
    pub(super) partial: bool,
    /// The shutdown grace period is over.
    pub(super) abort: CancellationToken,
    /// `carry_sessions`.
    pub(super) carry_sessions: bool,
    /// `upstream_reconnect`: carry outside freezes too.
    pub(super) reconnect: bool,
    /// The session started without an upstream connection: where the
    /// requests loop hands over its first one.
    pub(super) pending: Option<oneshot::Receiver<UpIn>>,
    /// The roll-forward journal, when on.
    pub(super) journal: Option<Arc<Journal>>,
    /// The proxy's counters, when metrics are on.
    pub(super) metrics: Option<Arc<ProxyMetrics>>,
    /// The intent and outcome records of the write whose response is
    /// being forwarded, durable as the journal's durability says before
    /// the client sees it (0: none).
    pub(super) outcome: Cell<(u64, u64)>,
    /// Recording the outcome of the response being forwarded failed.
    pub(super) outcome_failed: Cell<Option<JournalError>>,
}

impl Responses {
    /// Runs the loop to its end, which it sends on `done` once all of it
    /// (the sockets' halves it holds) is dropped.
    pub(super) async fn run(mut self, done: LoopEnd) {
        let mut not_carried = None;
        let end = loop {
            let end = match self.pending.is_some() {
                // No connection yet: as if the server had just closed one.
                true => End::UpstreamClosed,
                false => self.pump().await,
            };
            match self.carriable(&end) {
                Ok(()) => {
                    self.engine.carried(Carried::Waiting);
                    match self.await_new_upstream().await {
                        Ok(up_in) => {
                            self.engine.carried(Carried::Yes);
                            self.up_in = up_in;
                            continue;
                        }
                        Err(e) => {
                            let left = self.state.client_gone.load(Ordering::SeqCst);
                            self.engine
                                .carried(if left { Carried::Left } else { Carried::No });
                            break e;
                        }
                    }
                }
                Err(Some(why)) => {
                    self.engine.carried(Carried::Cannot);
                    not_carried = Some(why);
                    info!(
                        conn = self.id,
                        "the server closed the connection: session not carried: {why}"
                    );
                    break end;
                }
                Err(None) => break end,
            }
        };
        // Whatever the proxy still has to say (a notice), then close.
        while let Some(l) = self.local.try_recv() {
            if let Local::Pdu(pdu) = l {
                self.feed_last(pdu).await;
            }
        }
        match &end {
            End::UpstreamClosed
                if !self.state.client_gone.load(Ordering::Relaxed)
                    && !self.state.upstream_noticed.load(Ordering::Relaxed) =>
            {
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &match not_carried {
                        None => "abproxy: the LDAP server closed the connection".to_string(),
                        Some(why) => format!(
                            "abproxy: the LDAP server closed the connection and this session \
                             cannot be carried to a new one: {why}"
                        ),
                    },
                );
                self.feed_last(notice).await;
            }
            End::Io(IoAt::Read(Side::Upstream), e)
                if !self.state.client_gone.load(Ordering::Relaxed) =>
            {
                warn!(conn = self.id, "connection to the upstream lost: {e}");
                let carry = not_carried
                    .map(|why| format!("; this session cannot be carried to a new one: {why}"))
                    .unwrap_or_default();
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!("abproxy: the connection to the LDAP server was lost: {e}{carry}"),
                );
                self.feed_last(notice).await;
            }
            End::Journal(m) => {
                tracing::error!(conn = self.id, "{m}");
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!(
                        "abproxy: the journal could not record the result of a write, so it \
                         is not passed on (the server may have applied it): {m}"
                    ),
                );
                self.feed_last(notice).await;
            }
            End::UpstreamProtocol(m) => {
                warn!(conn = self.id, "upstream protocol error: {m}");
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!("abproxy: the LDAP server sent an invalid message: {m}"),
                );
                self.feed_last(notice).await;
            }
            _ => {}
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.client_out.flush().await;
            let _ = self.client_out.get_mut().shutdown().await;
        })
        .await;
        let upstream_gone = matches!(
            end,
            End::UpstreamClosed
                | End::Io(IoAt::Read(Side::Upstream), _)
                | End::UpstreamProtocol(_)
                | End::SaslLayer(_)
        );
        if !upstream_gone {
            self.linger().await;
        }
        self.close.cancel();
        let _ = self.control.send(Control::Close);
        drop(self);
        done.send(end);
    }

    /// The client's side of the session is over, but the server may still
    /// be running requests of this connection (a write it does not stop,
    /// whose client left or broke the protocol): keep reading the upstream,
    /// dropping the responses, until nothing is in flight, the server closes
    /// (it does once its running operations are done, after the proxy's
    /// half-close) or `LINGER_MAX` passes. The session stays registered
    /// meanwhile, so a freeze's drain still waits for those requests.
    async fn linger(&mut self) {
        let left = self.state.outstanding();
        if left == 0 {
            return;
        }
        debug!(
            conn = self.id,
            left, "session over: waiting for what the server is still running"
        );
        let deadline = tokio::time::sleep(LINGER_MAX);
        tokio::pin!(deadline);
        while self.state.outstanding() > 0 {
            let next = tokio::select! {
                next = self.up_in.next_message() => next,
                _ = &mut deadline => {
                    warn!(
                        conn = self.id,
                        left = self.state.outstanding(),
                        "request(s) of a closed session still unanswered by the server after {} s: \
                         no longer waited for",
                        LINGER_MAX.as_secs()
                    );
                    return;
                }
                _ = self.abort.cancelled() => return,
            };
            let Ok(Some(n)) = next else {
                // The server closed: nothing of this connection runs there.
                return;
            };
            let frame = self.up_in.message(n);
            if let Ok(env) = Envelope::response(frame) {
                if let Err(e) = self.record_outcome(&env, frame) {
                    warn!(conn = self.id, "{e}");
                }
                let done = self.state.inflight().response(env.msgid, env.op);
                if let Some(req) = done {
                    self.state.forget(&req);
                    self.state.signal_completed();
                    self.engine.completed();
                }
            }
            self.up_in.skip(n);
        }
    }

    /// Feeds a PDU once the session is over, unless a Notice of
    /// Disconnection (the proxy's or the server's) already went.
    async fn feed_last(&mut self, pdu: Bytes) {
        if self.told || self.state.upstream_noticed.load(Ordering::Relaxed) {
            return;
        }
        self.told = Envelope::response(&pdu).is_ok_and(|env| is_notice(&env, &pdu));
        let _ = self.client_out.send(&pdu).await;
    }

    fn can_read(&self) -> bool {
        self.held
            .below(self.engine.config().held_response_bytes_per_conn)
    }

    /// Whether a session whose upstream connection just ended (`end`) can
    /// be carried to a new one (see [`Responses::may_carry`]).
    fn carriable(&self, end: &End) -> Result<(), Option<&'static str>> {
        let lost = matches!(
            end,
            End::UpstreamClosed | End::Io(IoAt::Read(Side::Upstream), _)
        );
        if !lost || self.state.upstream_noticed.load(Ordering::Relaxed) {
            return Err(None);
        }
        self.may_carry()
    }

    /// Whether this session could be carried to a new upstream connection
    /// if the server closed its own now: `Err(None)` when carrying does not
    /// apply (off, no stop freeze and no `upstream_reconnect`, the client
    /// gone), `Err(Some(why))` when it applies but the session holds what
    /// cannot be carried.
    fn may_carry(&self) -> Result<(), Option<&'static str>> {
        if !self.carry_sessions
            || !(self.engine.stop_frozen() || self.reconnect)
            || self.state.client_gone.load(Ordering::Relaxed)
        {
            return Err(None);
        }
        if let Some(why) = lock(&self.state.carry).refusal() {
            return Err(Some(why));
        }
        let table = self.state.inflight();
        if table.iter().any(|(_, e)| e.persistent) {
            return Err(Some(
                "a persistent search was open on the connection that closed (it lives only \
                 there: search again)",
            ));
        }
        if !table.is_empty() {
            return Err(Some(
                "requests were in flight when the connection closed (the server may have run \
                 them or not)",
            ));
        }
        Ok(())
    }

    /// Waits, writing what the proxy authors meanwhile, until the requests
    /// loop hands over a new upstream connection that holds the session's
    /// identity (see `Requests::reestablish`).
    async fn await_new_upstream(&mut self) -> Result<UpIn, End> {
        let mut rx = match self.pending.take() {
            Some(rx) => rx,
            None => self.state.await_upstream(),
        };
        info!(
            conn = self.id,
            "the server closed the connection: the session waits to be \
             carried to a new connection"
        );
        loop {
            tokio::select! {
                biased;
                Some(l) = self.local.recv() => self.on_local(l).await?,
                r = &mut rx => return r.map_err(|_| End::Closed),
                _ = self.close.cancelled() => return Err(End::Closed),
            }
            flush_waiting(&mut self.client_out, &self.close, TO_CLIENT).await?;
        }
    }

    /// What the proxy authored for the client.
    async fn on_local(&mut self, l: Local) -> Result<(), End> {
        match l {
            Local::Pdu(pdu) => {
                let notice = Envelope::response(&pdu).is_ok_and(|env| is_notice(&env, &pdu));
                self.write(&pdu).await?;
                if notice {
                    // The session is over: nothing may follow.
                    self.told = true;
                    return Err(End::Closed);
                }
                Ok(())
            }
            Local::StartTls {
                pdu,
                flushed,
                resume,
            } => self.start_tls(pdu, flushed, resume).await,
            Local::ClientGone => {
                let dropped = self.held.clear();
                if dropped > 0 {
                    debug!(
                        conn = self.id,
                        dropped, "client gone: held persistent-search responses dropped"
                    );
                }
                Ok(())
            }
            Local::Close => Err(End::Closed),
        }
    }

    async fn pump(&mut self) -> End {
        loop {
            let can_read = self.can_read();
            let holding = !self.held.is_empty();
            if self.close.is_cancelled() {
                return End::Closed;
            }
            let woke = if holding || !can_read {
                tokio::select! {
                    biased;
                    Some(l) = self.local.recv() => Woke::Local(l),
                    Ok(()) = self.epoch.changed(), if holding => Woke::Epoch,
                    next = self.up_in.next_message(), if can_read => Woke::Read(next),
                }
            } else {
                // The usual turn: the same two sources in the same order
                // as above, polled by hand (no `select!` built per turn).
                let (local, up_in) = (&mut self.local, &mut self.up_in);
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(Some(l)) = local.poll_recv(cx) {
                        return Poll::Ready(Woke::Local(l));
                    }
                    up_in.poll_message(cx).map(Woke::Read)
                })
                .await
            };
            let turn = match woke {
                Woke::Local(l) => self.on_local(l).await,
                Woke::Epoch => self.release_held().await,
                Woke::Read(next) => match self.forward_read_now(next) {
                    Ok(None) => Ok(()),
                    Ok(Some(rest)) => self.forward_read_rest(rest).await,
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = turn {
                return e;
            }
            let flushed = match flush_now(&mut self.client_out, TO_CLIENT) {
                Some(r) => r,
                None => flush_waiting(&mut self.client_out, &self.close, TO_CLIENT).await,
            };
            if let Err(e) = flushed {
                return e;
            }
        }
    }

    /// Forwards a response just read, then the others already read (a
    /// batch at most): the part that needs no waiting (the usual case),
    /// without building [`Responses::forward_read_rest`]'s future; `Some`:
    /// what is left for it.
    #[inline]
    fn forward_read_now(&mut self, next: Next) -> Result<Option<Rest>, End> {
        if let Forwarded::Later(n, route) = self.forward_now(next)? {
            return Ok(Some(Rest {
                left: BATCH,
                later: Some((n, route)),
            }));
        }
        let mut left = BATCH;
        if let Some(later) = self.forward_buffered_now(&mut left)? {
            return Ok(Some(Rest {
                left,
                later: Some(later),
            }));
        }
        if self.partial && self.can_read() {
            return Ok(Some(Rest { left, later: None }));
        }
        Ok(None)
    }

    /// The rest of [`Responses::forward_read_now`]: a response that waits
    /// for something, the batch's others after it, and the yield after a
    /// search entry.
    async fn forward_read_rest(&mut self, rest: Rest) -> Result<(), End> {
        let mut left = rest.left;
        if let Some((n, route)) = rest.later {
            self.forward_later(n, route).await?;
            while let Some((n, route)) = self.forward_buffered_now(&mut left)? {
                self.forward_later(n, route).await?;
            }
        }
        if self.partial && self.can_read() {
            // A search entry went last: its searchResultDone is usually on
            // its way. One yield (the runtime polls its sockets) lets it
            // join the entry in one write to the client, instead of two
            // writes and two wake-ups of the client; it never waits for
            // data. Measured at one connection: 0.69 -> 0.74 of direct
            // throughput, client CPU per search 22.5 -> 17.1 µs.
            tokio::task::yield_now().await;
            if let Some(next) = self.up_in.next_message().now_or_never() {
                self.forward(next).await?;
                self.forward_buffered().await?;
            }
        }
        Ok(())
    }

    /// Forwards the whole responses already in the read buffer (a batch at
    /// most).
    async fn forward_buffered(&mut self) -> Result<(), End> {
        let mut left = BATCH;
        while let Some((n, route)) = self.forward_buffered_now(&mut left)? {
            self.forward_later(n, route).await?;
        }
        Ok(())
    }

    /// The part of [`Responses::forward_buffered`] that needs no waiting:
    /// forwards the responses in the read buffer until one needs
    /// [`Responses::forward_later`] (returned: response `n`, routed), none
    /// is left or the client cannot take more, or `left` (counted down
    /// here) reaches 0.
    #[inline]
    fn forward_buffered_now(&mut self, left: &mut usize) -> Result<Option<(usize, Route)>, End> {
        while *left > 0 {
            *left -= 1;
            if !self.can_read() {
                break;
            }
            match buffered_frame(&self.up_in) {
                Some(next) => {
                    if let Forwarded::Later(n, route) = self.forward_now(next)? {
                        return Ok(Some((n, route)));
                    }
                }
                None => break,
            }
        }
        *left = 0;
        Ok(None)
    }

    /// Writes the StartTLS response in clear, then waits while the
    /// requests loop turns the connection to TLS.
    async fn start_tls(
        &mut self,
        pdu: Bytes,
        flushed: oneshot::Sender<()>,
        resume: oneshot::Receiver<()>,
    ) -> Result<(), End> {
        self.write(&pdu).await?;
        flush_waiting(&mut self.client_out, &self.close, TO_CLIENT).await?;
        let _ = flushed.send(());
        tokio::select! {
            r = resume => r.map_err(|_| End::Closed),
            _ = self.close.cancelled() => Err(End::Closed),
        }
    }

    /// Hands the server's answer to a forwarded StartTLS to the requests
    /// loop and reads nothing more from the upstream until it says so: on
    /// success it runs the TLS handshake on this connection meanwhile. The
    /// server sends nothing after the answer until the handshake starts.
    async fn upstream_tls(
        &mut self,
        answer: Bytes,
        tx: oneshot::Sender<TlsAnswer>,
    ) -> Result<(), End> {
        if !self.up_in.read_buffer().is_empty() {
            return Err(End::UpstreamProtocol(
                "the server sent data after its StartTLS response".into(),
            ));
        }
        let (resume_tx, resume_rx) = oneshot::channel();
        if tx.send((answer, resume_tx)).is_err() {
            return Err(End::Closed);
        }
        tokio::select! {
            r = resume_rx => r.map_err(|_| End::Closed),
            _ = self.close.cancelled() => Err(End::Closed),
        }
    }

    async fn write(&mut self, pdu: &[u8]) -> Result<(), End> {
        if self.client_out.append(pdu) {
            return Ok(());
        }
        feed_waiting(&mut self.client_out, pdu, &self.close, TO_CLIENT).await
    }

    /// Sends held persistent-search responses once no freeze holds them.
    async fn release_held(&mut self) -> Result<(), End> {
        if self.engine.holds_any_responses() {
            return Ok(());
        }
        while let Some(f) = self.held.pop_front() {
            self.write(&f).await?;
        }
        Ok(())
    }

    /// Forwards one response read from the server.
    async fn forward(&mut self, next: Next) -> Result<(), End> {
        match self.forward_now(next)? {
            Forwarded::Done => Ok(()),
            Forwarded::Later(n, route) => self.forward_later(n, route).await,
        }
    }

    /// The part of forwarding that needs no waiting: a
    /// response that only goes to the client's buffer, which has room (the
    /// usual case), is done here without building the async path's future;
    /// anything else (a journal to wait for, a full buffer, a rewrite, a
    /// hold, TLS) is left to [`Responses::forward_later`].
    #[inline]
    fn forward_now(&mut self, next: Next) -> Result<Forwarded, End> {
        let n = match next {
            Ok(None) => return Err(End::UpstreamClosed),
            Ok(Some(n)) => n,
            Err(FrameError::Io(e)) => return Err(End::Io(IoAt::Read(Side::Upstream), e)),
            Err(FrameError::TruncatedAtEof(_)) => return Err(End::UpstreamClosed),
            Err(e) => {
                if self.state.sasl_bound.load(Ordering::Relaxed) {
                    return Err(End::SaslLayer(Side::Upstream));
                }
                return Err(End::UpstreamProtocol(e.to_string()));
            }
        };
        count(&self.state.responses);
        if let Some(m) = &self.metrics {
            m.response(n);
        }
        let frame = self.up_in.message(n);
        // Search entries and references, most of a search's responses, are
        // tracked only while a root DSE read or a persistent search is in
        // flight (`track`) or answers are suppressed: else their tag is all
        // the proxy reads.
        let entry = matches!(
            Envelope::op_of(frame),
            Some(op::SEARCH_RESULT_ENTRY | op::SEARCH_RESULT_REFERENCE)
        );
        self.partial = entry;
        let route = if entry
            && self.state.specials.load(Ordering::Relaxed) == 0
            && !self.state.suppressed.any()
        {
            Route::Forward
        } else {
            match Envelope::response(frame) {
                Ok(env) => self.track(&env, frame),
                // Framed but not a response we can read: still the server's
                // answer, so it goes to the client untouched.
                Err(e) => {
                    debug!(conn = self.id, "unreadable response envelope: {e}");
                    Route::Forward
                }
            }
        };
        if let Some(e) = self.outcome_failed.take() {
            return Err(End::Journal(e.to_string()));
        }
        if self.outcome.get().1 != 0 && !matches!(route, Route::Drop) {
            return Ok(Forwarded::Later(n, route));
        }
        let done = match &route {
            Route::Forward => self.client_out.append(frame),
            Route::Drop => true,
            _ => false,
        };
        if !done {
            return Ok(Forwarded::Later(n, route));
        }
        // Forward or Drop: nothing in it to drop (no call to its drop glue
        // per response).
        std::mem::forget(route);
        self.outcome.set((0, 0));
        self.up_in.skip(n);
        Ok(Forwarded::Done)
    }

    /// The rest of forwarding response `n` of the read buffer, routed
    /// `route` (see [`Responses::forward_now`]).
    async fn forward_later(&mut self, n: usize, route: Route) -> Result<(), End> {
        let frame = self.up_in.message(n);
        let (intent, outcome) = self.outcome.replace((0, 0));
        if outcome != 0 && !matches!(route, Route::Drop) {
            // `ack`, `request`: the client sees a write's result only once
            // the journal holds it.
            if let Some(j) = &self.journal {
                if let Err(e) = j.durable(intent, outcome).await {
                    return Err(End::Journal(e.to_string()));
                }
            }
        }
        // The response is copied to the client's buffer, then leaves the
        // read buffer; only a held one is kept as its own `Bytes`.
        let r = match route {
            Route::Forward => {
                if self.client_out.append(frame) {
                    Ok(())
                } else {
                    feed_waiting(&mut self.client_out, frame, &self.close, TO_CLIENT).await
                }
            }
            Route::Rewrite(f) => self.write(&f).await,
            Route::Drop => Ok(()),
            Route::UpstreamTls(tx) => {
                let answer = self.up_in.take(n);
                return self.upstream_tls(answer, tx).await;
            }
            Route::Hold if self.state.client_gone.load(Ordering::Relaxed) => {
                // No one to hold it for (see `Local::ClientGone`).
                self.held.clear();
                Ok(())
            }
            Route::Hold => {
                let f = self.up_in.take(n);
                self.held.push(f);
                return Ok(());
            }
        };
        self.up_in.skip(n);
        r
    }

    fn track(&self, env: &Envelope, frame: &[u8]) -> Route {
        // Only the notice is unsolicited: a client that broke RFC 4511 by
        // sending a request with messageID 0 gets its response tracked like
        // any other (else it stayed in flight for ever and held up every
        // drain).
        if env.msgid == 0 && is_notice(env, frame) {
            let carry = self.may_carry();
            if carry.is_ok() {
                // The server is going away (a stop freeze, or reconnection
                // is on): the session may be carried to its next run, so
                // the client is not told.
                info!(
                    conn = self.id,
                    code = env.result_code,
                    "upstream sent a Notice of Disconnection: not forwarded (the session may \
                     be carried)"
                );
                return Route::Drop;
            }
            if let Err(Some(why)) = carry {
                // Carrying applied, but this session holds what cannot be
                // carried: counted here, as the close that follows is the
                // server's own (noticed) one.
                self.engine.carried(Carried::Cannot);
                info!(
                    conn = self.id,
                    "the server is closing the connection: session not carried: {why}"
                );
            }
            warn!(
                conn = self.id,
                code = env.result_code,
                "upstream sent a Notice of Disconnection"
            );
            self.state.upstream_noticed.store(true, Ordering::Relaxed);
            return Route::Forward;
        }
        let final_response = op::is_final_response(env.op);
        if self.state.suppressed.drops(env.msgid, final_response) {
            return Route::Drop;
        }
        // Only root DSE reads and persistent searches need a look at the
        // in-flight table for their non-final responses.
        if !final_response {
            if self.state.specials.load(Ordering::Relaxed) > 0
                && (env.op == op::SEARCH_RESULT_ENTRY
                    || self.engine.stop_frozen()
                    || !self.held.is_empty())
            {
                let table = self.state.inflight();
                if let Some(req) = table.get(env.msgid) {
                    if req.persistent
                        && (!self.held.is_empty()
                            || self.engine.holds_responses(self.engine.class_of(req, None)))
                    {
                        return Route::Hold;
                    }
                    if req.root_dse {
                        if let Some(f) = rootdse::add_supported_extensions(frame, self.extensions) {
                            return Route::Rewrite(f);
                        }
                    }
                }
            }
            return Route::Forward;
        }
        if self.journal.is_some() {
            match self.record_outcome(env, frame) {
                Ok(seqs) => self.outcome.set(seqs),
                Err(e) => self.outcome_failed.set(Some(e)),
            }
        }
        let done = self.state.inflight().response(env.msgid, env.op);
        if let Some(req) = done {
            if let Some(m) = &self.metrics {
                m.completed(req.op, env.result_code, req.age().unwrap_or_default());
            }
            if req.op == op::BIND_REQUEST {
                // Before a bind the server completes or abandons every
                // operation of the connection (RFC 4511 section 4.2.1):
                // reads abandoned at a drain's time limit are done.
                self.state.suppressed.clear();
                // The identity comes from this bind's own response (message
                // IDs are unique among outstanding requests), set before
                // the requests waiting for the bind are released.
                let ok = env.op == op::BIND_RESPONSE && env.result_code == Some(0);
                self.state
                    .sasl_bound
                    .store(ok && req.sasl_bind, Ordering::Relaxed);
                let named = req.bind_dn().filter(|dn| !dn.is_empty());
                self.state
                    .set_authenticated(ok && (req.sasl_bind || named.is_some()));
                self.state.set_bound_dn(named.filter(|_| ok));
                if self.carry_sessions {
                    let mut carry = lock(&self.state.carry);
                    match (ok, req.sasl_bind, req.request.as_deref()) {
                        (true, false, Some(request)) if named.is_some() => carry.simple(request),
                        (true, true, _) => carry.cannot("a SASL bind cannot be replayed"),
                        // RFC 4511 saslBindInProgress.
                        (false, true, _) if env.result_code == Some(14) => {
                            carry.cannot("a SASL bind was in progress")
                        }
                        // Anonymous, unauthenticated or failed: slapd and
                        // 389 DS leave the connection anonymous.
                        _ => carry.anonymous(),
                    }
                }
            }
            if req.op == op::SEARCH_REQUEST && env.has_controls() && self.carry_sessions {
                self.note_search_state(env, frame);
            }
            self.state.forget(&req);
            debug!(
                conn = self.id,
                msgid = env.msgid,
                op = op::name(req.op),
                result = env.result_code,
                elapsed_us = req.age().map(|d| d.as_micros() as u64),
                "response"
            );
            self.state.signal_completed();
            self.engine.completed();
            if req.op == op::EXTENDED_REQUEST {
                if let Some(tx) = self.state.take_upstream_starttls(env.msgid) {
                    return Route::UpstreamTls(tx);
                }
            }
            if req.abandoned {
                // The client abandoned it and expects no response.
                return Route::Drop;
            }
        }
        Route::Forward
    }

    /// Appends the outcome record of a journaled write's final response
    /// while its request is still in flight (so that a drain, which waits
    /// for the request, ends after the outcome); the intent's and the
    /// outcome's sequence numbers, `(0, 0)` when the request is not a
    /// journaled write.
    fn record_outcome(&self, env: &Envelope, frame: &[u8]) -> Result<(u64, u64), JournalError> {
        let Some(j) = &self.journal else {
            return Ok((0, 0));
        };
        if !op::is_final_response(env.op) {
            return Ok((0, 0));
        }
        let intent = match self.state.inflight().get(env.msgid) {
            Some(req) if req.journal != 0 => req.journal,
            _ => return Ok((0, 0)),
        };
        let body = JournalBody::Outcome {
            intent,
            result: env.result_code.map_or(-1, |c| c as i32),
            response: frame.to_vec(),
        };
        Ok((intent, j.append(self.id, body)?))
    }

    /// A search's final response handed out a paged-results cookie or a
    /// VLV context: the session cannot be carried while the client may
    /// hand it back.
    fn note_search_state(&self, env: &Envelope, frame: &[u8]) {
        let mut held = None;
        for c in env.controls(frame) {
            if let Some(state) = paging::search_state(&c, true) {
                held = Some(lock(&self.state.carry).handed_out(state));
            }
        }
        if let Some(yes) = held {
            self.state.search_state.store(yes, Ordering::SeqCst);
        }
    }
}

/// What woke the responses loop.
enum Woke {
    /// Something the proxy authored.
    Local(Local),
    /// A freeze ended: held responses may go.
    Epoch,
    /// A response (or the end of the upstream).
    Read(Next),
}

/// What [`Responses::forward_read_now`] left to
/// [`Responses::forward_read_rest`]: the batch's count, and the response
/// that waits (none: only the yield after a search entry).
struct Rest {
    left: usize,
    later: Option<(usize, Route)>,
}

/// What [`Responses::forward_now`] did.
enum Forwarded {
    Done,
    /// Response `n` of the read buffer, routed, still to be forwarded.
    Later(usize, Route),
}

/// What to do with one response frame.
pub(super) enum Route {
    Forward,
    Rewrite(Bytes),
    Hold,
    Drop,
    /// The server's answer to a client's StartTLS forwarded to it
    /// (`tls.upstream_mirror`): for the requests loop.
    UpstreamTls(oneshot::Sender<TlsAnswer>),
}
