//! One client session: the client connection and its own upstream
//! connection, and two loops between them.
//!
//! ```text
//! client --frames--> requests loop --(envelope, gate, in-flight)--> upstream
//! client <--frames-- responses loop <--(envelope, in-flight)------- upstream
//!                          ^ PDUs the proxy authors (local channel)
//! ```
//! Client bytes are forwarded as framed, never re-encoded; message IDs are
//! unchanged. Either loop can end the session through the `close` token.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use ldap3_proto::proto::LdapResultCode;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::inflight::{InFlight, InFlightTable};
use super::Shared;
use crate::endpoint::{BoxRead, BoxWrite};
use crate::freeze::Verdict;
use crate::wire::envelope::{auth, oid};
use crate::wire::{op, pdu, Envelope, FrameCodec, FrameError};

/// Frames handled before a flush, so one busy direction cannot starve the
/// flush of what it already wrote.
const BATCH: usize = 64;
/// How long to wait for the upstream to close after the client went away.
const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Locally authored responses waiting to be written to the client.
const LOCAL_QUEUE: usize = 16;

type ClientIn = FramedRead<BoxRead, FrameCodec>;
type ClientOut = FramedWrite<BoxWrite, FrameCodec>;
type UpIn = FramedRead<BoxRead, FrameCodec>;
type UpOut = FramedWrite<BoxWrite, FrameCodec>;

/// State both loops of a session share.
#[derive(Debug, Default)]
pub struct SessionState {
    inflight: Mutex<InFlightTable>,
    /// Signalled whenever a request leaves the in-flight table.
    completed: Notify,
    /// A SASL bind succeeded: later non-LDAP bytes are probably a SASL
    /// security layer.
    sasl_bound: AtomicBool,
    /// The client went away (EOF or unbind): no notice on upstream close.
    client_gone: AtomicBool,
    /// The upstream sent its own Notice of Disconnection.
    upstream_noticed: AtomicBool,
    requests: AtomicU64,
    responses: AtomicU64,
}

impl SessionState {
    /// The in-flight table (a short critical section; never held across await).
    pub fn inflight(&self) -> MutexGuard<'_, InFlightTable> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no request is in flight.
    async fn wait_drained(&self) {
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a session ended, for the close log line.
#[derive(Debug)]
enum End {
    ClientClosed,
    Unbind,
    Shutdown,
    UpstreamClosed,
    ClientProtocol(String),
    UpstreamProtocol(String),
    SaslLayer(&'static str),
    Io(&'static str, std::io::Error),
    Closed,
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::ClientClosed => "client closed the connection".into(),
            End::Unbind => "client unbound".into(),
            End::Shutdown => "proxy shutting down".into(),
            End::UpstreamClosed => "upstream closed the connection".into(),
            End::ClientProtocol(m) => format!("client protocol error: {m}"),
            End::UpstreamProtocol(m) => format!("upstream protocol error: {m}"),
            End::SaslLayer(side) => format!(
                "{side} sent non-LDAP bytes after a successful SASL bind: a SASL security layer \
                 (integrity/confidentiality) was negotiated, which abproxy cannot inspect; use \
                 TLS instead of a SASL layer (e.g. maxssf=0)"
            ),
            End::Io(what, e) => format!("{what}: {e}"),
            End::Closed => "closed by the other side of the session".into(),
        }
    }
}

/// Serves one accepted client connection until it ends.
pub(crate) async fn serve(
    id: u64,
    peer: String,
    client: (BoxRead, BoxWrite),
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let (client_r, client_w) = client;
    let client_out = FramedWrite::new(client_w, FrameCodec::default());
    info!(conn = id, %peer, "connection opened");

    let connect = tokio::time::timeout(
        shared.config.upstream_connect_timeout(),
        shared.upstream.connect(),
    )
    .await;
    let (up_r, up_w) = match connect {
        Ok(Ok(halves)) => halves,
        Ok(Err(e)) => return refuse(id, &peer, &shared, client_out, e.to_string()).await,
        Err(_) => return refuse(id, &peer, &shared, client_out, "timed out".into()).await,
    };

    let state = Arc::new(SessionState::default());
    let close = CancellationToken::new();
    let (local_tx, local_rx) = mpsc::channel(LOCAL_QUEUE);
    let requests = Requests {
        id,
        shared: &shared,
        state: &state,
        client_in: FramedRead::new(client_r, FrameCodec::new(shared.config.max_pdu_bytes)),
        up_out: FramedWrite::new(up_w, FrameCodec::default()),
        local: local_tx,
        close: &close,
        shutdown: &shutdown,
        abort: &abort,
    };
    let responses = Responses {
        id,
        state: &state,
        up_in: FramedRead::new(up_r, FrameCodec::new(shared.config.max_response_pdu_bytes)),
        client_out,
        local: local_rx,
        close: &close,
    };
    let (req_end, resp_end) = tokio::join!(requests.run(), responses.run());
    let end = match (&req_end, &resp_end) {
        (End::Closed, e) => e,
        (e, _) => e,
    };
    let leftover = state.inflight().len();
    info!(
        conn = id,
        %peer,
        requests = state.requests.load(Ordering::Relaxed),
        responses = state.responses.load(Ordering::Relaxed),
        unanswered = leftover,
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed: {}",
        end.describe()
    );
}

/// The upstream could not be reached: tell the client and close.
async fn refuse(id: u64, peer: &str, shared: &Shared, mut client_out: ClientOut, why: String) {
    warn!(conn = id, %peer, upstream = %shared.upstream, "cannot connect to upstream: {why}");
    let notice = pdu::notice_of_disconnection(
        LdapResultCode::Unavailable,
        &format!(
            "abproxy cannot reach the LDAP server {}: {why}",
            shared.upstream
        ),
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = client_out.send(notice).await;
        let _ = client_out.get_mut().shutdown().await;
    })
    .await;
    info!(conn = id, %peer, "connection closed: upstream unreachable");
}

struct Requests<'a> {
    id: u64,
    shared: &'a Shared,
    state: &'a SessionState,
    client_in: ClientIn,
    up_out: UpOut,
    local: mpsc::Sender<Bytes>,
    close: &'a CancellationToken,
    shutdown: &'a CancellationToken,
    abort: &'a CancellationToken,
}

/// What happened to one request frame.
enum Step {
    Continue,
    End(End),
}

impl Requests<'_> {
    async fn run(mut self) -> End {
        let end = self.pump().await;
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
                    self.close.cancel();
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
                let _ = self.local.try_send(notice);
                self.close.cancel();
            }
            End::Shutdown => {
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    "abproxy is shutting down",
                );
                let _ = self.local.try_send(notice);
                self.close.cancel();
            }
            _ => self.close.cancel(),
        }
        end
    }

    async fn pump(&mut self) -> End {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.close.cancelled() => return End::Closed,
                _ = self.shutdown.cancelled() => return self.drain_for_shutdown().await,
                f = self.client_in.next() => f,
            };
            if let Step::End(e) = self.handle(next).await {
                return e;
            }
            for _ in 0..BATCH {
                match self.client_in.next().now_or_never() {
                    Some(next) => {
                        if let Step::End(e) = self.handle(next).await {
                            return e;
                        }
                    }
                    None => break,
                }
            }
            if let Step::End(e) = self.flush().await {
                return e;
            }
        }
    }

    async fn flush(&mut self) -> Step {
        tokio::select! {
            _ = self.close.cancelled() => Step::End(End::Closed),
            r = self.up_out.flush() => match r {
                Ok(()) => Step::Continue,
                Err(e) => Step::End(End::Io("writing to upstream", e)),
            }
        }
    }

    async fn handle(&mut self, next: Option<Result<Bytes, FrameError>>) -> Step {
        let frame = match next {
            None => return Step::End(End::ClientClosed),
            Some(Ok(f)) => f,
            Some(Err(FrameError::Io(e))) => return Step::End(End::Io("reading from client", e)),
            Some(Err(FrameError::TruncatedAtEof(n))) => {
                debug!(conn = self.id, "client closed inside a message ({n} bytes)");
                return Step::End(End::ClientClosed);
            }
            Some(Err(e)) => {
                if self.state.sasl_bound.load(Ordering::Relaxed) {
                    return Step::End(End::SaslLayer("client"));
                }
                return Step::End(End::ClientProtocol(e.to_string()));
            }
        };
        let env = match Envelope::request(&frame) {
            Ok(env) => env,
            Err(e) => return Step::End(End::ClientProtocol(e.to_string())),
        };
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        debug!(
            conn = self.id,
            msgid = env.msgid,
            op = op::name(env.op),
            dn = %String::from_utf8_lossy(env.dn_bytes(&frame).unwrap_or_default()),
            "request"
        );

        if env.op == op::EXTENDED_REQUEST && env.oid_bytes(&frame) == Some(oid::START_TLS) {
            // A forwarded StartTLS would turn the stream into TLS records the
            // proxy cannot read: answer it here.
            let resp = pdu::extended_response(
                env.msgid,
                LdapResultCode::Unavailable,
                "StartTLS is not available through abproxy: TLS is not configured on the proxy",
                Some(std::str::from_utf8(oid::START_TLS).expect("ASCII OID")),
                None,
            );
            return self.reply_locally(resp).await;
        }

        match self.shared.gate.admit(&env, &frame) {
            Verdict::Forward => {}
        }

        match env.op {
            op::ABANDON_REQUEST => {
                if let Some(target) = env.abandon_id {
                    if self.state.inflight().abandon(target).is_some() {
                        self.state.completed.notify_waiters();
                    }
                }
            }
            op::UNBIND_REQUEST => {}
            _ => {
                let mut entry = InFlight::new(env.op);
                entry.sasl_bind = env.op == op::BIND_REQUEST && env.bind_auth == Some(auth::SASL);
                entry.persistent = env.op == op::SEARCH_REQUEST
                    && (env.has_control(&frame, oid::SYNC_REQUEST)
                        || env.has_control(&frame, oid::PERSISTENT_SEARCH));
                self.state.inflight().start(env.msgid, entry);
            }
        }
        let unbind = env.op == op::UNBIND_REQUEST;
        let fed = tokio::select! {
            _ = self.close.cancelled() => return Step::End(End::Closed),
            r = self.up_out.feed(frame) => r,
        };
        if let Err(e) = fed {
            return Step::End(End::Io("writing to upstream", e));
        }
        if unbind {
            return Step::End(End::Unbind);
        }
        Step::Continue
    }

    async fn reply_locally(&mut self, pdu: Bytes) -> Step {
        tokio::select! {
            _ = self.close.cancelled() => Step::End(End::Closed),
            r = self.local.send(pdu) => match r {
                Ok(()) => Step::Continue,
                Err(_) => Step::End(End::Closed),
            }
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
        tokio::select! {
            _ = self.close.cancelled() => return End::Closed,
            _ = self.abort.cancelled() => {}
            _ = self.state.wait_drained() => {}
        }
        End::Shutdown
    }
}

struct Responses<'a> {
    id: u64,
    state: &'a SessionState,
    up_in: UpIn,
    client_out: ClientOut,
    local: mpsc::Receiver<Bytes>,
    close: &'a CancellationToken,
}

impl Responses<'_> {
    async fn run(mut self) -> End {
        let end = self.pump().await;
        // Whatever the proxy still has to say (a notice), then close.
        while let Ok(pdu) = self.local.try_recv() {
            let _ = self.client_out.feed(pdu).await;
        }
        match &end {
            End::UpstreamClosed
                if !self.state.client_gone.load(Ordering::Relaxed)
                    && !self.state.upstream_noticed.load(Ordering::Relaxed) =>
            {
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    "abproxy: the LDAP server closed the connection",
                );
                let _ = self.client_out.feed(notice).await;
            }
            End::UpstreamProtocol(m) => {
                warn!(conn = self.id, "upstream protocol error: {m}");
                let notice = pdu::notice_of_disconnection(
                    LdapResultCode::Unavailable,
                    &format!("abproxy: the LDAP server sent an invalid message: {m}"),
                );
                let _ = self.client_out.feed(notice).await;
            }
            _ => {}
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.client_out.flush().await;
            let _ = self.client_out.get_mut().shutdown().await;
        })
        .await;
        self.close.cancel();
        end
    }

    async fn pump(&mut self) -> End {
        loop {
            tokio::select! {
                biased;
                _ = self.close.cancelled() => return End::Closed,
                Some(pdu) = self.local.recv() => {
                    if let Err(e) = self.write(pdu).await {
                        return e;
                    }
                }
                next = self.up_in.next() => {
                    if let Err(e) = self.forward(next).await {
                        return e;
                    }
                    for _ in 0..BATCH {
                        match self.up_in.next().now_or_never() {
                            Some(next) => {
                                if let Err(e) = self.forward(next).await {
                                    return e;
                                }
                            }
                            None => break,
                        }
                    }
                }
            }
            let flushed = tokio::select! {
                _ = self.close.cancelled() => return End::Closed,
                r = self.client_out.flush() => r,
            };
            if let Err(e) = flushed {
                return End::Io("writing to client", e);
            }
        }
    }

    async fn write(&mut self, pdu: Bytes) -> Result<(), End> {
        tokio::select! {
            _ = self.close.cancelled() => Err(End::Closed),
            r = self.client_out.feed(pdu) => r.map_err(|e| End::Io("writing to client", e)),
        }
    }

    async fn forward(&mut self, next: Option<Result<Bytes, FrameError>>) -> Result<(), End> {
        let frame = match next {
            None => return Err(End::UpstreamClosed),
            Some(Ok(f)) => f,
            Some(Err(FrameError::Io(e))) => return Err(End::Io("reading from upstream", e)),
            Some(Err(FrameError::TruncatedAtEof(_))) => return Err(End::UpstreamClosed),
            Some(Err(e)) => {
                if self.state.sasl_bound.load(Ordering::Relaxed) {
                    return Err(End::SaslLayer("server"));
                }
                return Err(End::UpstreamProtocol(e.to_string()));
            }
        };
        match Envelope::response(&frame) {
            Ok(env) => self.track(&env, &frame),
            // Framed but not a response we can read: still the server's
            // answer, so it goes to the client untouched.
            Err(e) => debug!(conn = self.id, "unreadable response envelope: {e}"),
        }
        self.state.responses.fetch_add(1, Ordering::Relaxed);
        self.write(frame).await
    }

    fn track(&self, env: &Envelope, frame: &[u8]) {
        if env.msgid == 0 {
            if env.op == op::EXTENDED_RESPONSE
                && env.oid_bytes(frame) == Some(oid::NOTICE_OF_DISCONNECTION)
            {
                warn!(
                    conn = self.id,
                    code = env.result_code,
                    "upstream sent a Notice of Disconnection"
                );
                self.state.upstream_noticed.store(true, Ordering::Relaxed);
            }
            return;
        }
        let done = self.state.inflight().response(env.msgid, env.op);
        if let Some(req) = done {
            if req.sasl_bind && env.result_code == Some(0) {
                self.state.sasl_bound.store(true, Ordering::Relaxed);
            }
            debug!(
                conn = self.id,
                msgid = env.msgid,
                op = op::name(req.op),
                result = env.result_code,
                elapsed_us = req.age().as_micros() as u64,
                "response"
            );
            self.state.completed.notify_waiters();
        }
    }
}
