//! One client session: the client connection and its own upstream
//! connection, and two loops between them.
//!
//! ```text
//! client --frames--> requests loop --envelope, classify, gate-----------> upstream
//!                        |  held by a freeze: per-connection queue (FIFO)
//! client <--frames-- responses loop <--envelope, close in-flight entries-- upstream
//!                          ^ PDUs the proxy authors (local channel)
//! ```
//! Client bytes are forwarded as framed, never re-encoded; message IDs are
//! unchanged. Either loop can end the session through the `close` token.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use ldap3_proto::proto::{LdapMsg, LdapOp, LdapResultCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::mailbox::Inbox;
use super::metrics::{Handshake, Refusal};
use super::pool::Place;
use super::{Incoming, Shared};
use crate::endpoint::{self, BoxRead, BoxWrite};
use crate::freeze::participant::{HeldResponses, Queue};
use crate::freeze::{Control, SessionHandle};
use crate::sync::lock;
use crate::tls::{ClientSecurity, ClientStream, UpstreamStream};
use crate::wire::envelope::oid;
use crate::wire::{op, pdu, Envelope, FrameCodec, FrameError, FrameReader, FrameWriter};

mod carry;
mod decide;
mod end;
pub(crate) mod print;
mod requests;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use requests::catch_up_frames;
mod responses;
mod state;

use end::{End, IoAt, Side};
use requests::Requests;
use responses::Responses;
use state::SessionState;

/// Frames handled before a flush, so one busy direction cannot starve the
/// flush of what it already wrote.
const BATCH: usize = 64;
/// How long to wait for the upstream to close after the client went away.
const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long a session whose client is gone keeps waiting for requests the
/// server may still be running (see `Responses::linger`).
const LINGER_MAX: Duration = Duration::from_secs(300);
/// Locally authored responses waiting to be written to the client.
const LOCAL_QUEUE: usize = 16;
/// Message ID of the abandon requests the proxy authors (abandon has no
/// response, so the ID is only a label in the server's log).
const PROXY_ABANDON_ID: i32 = i32::MAX;

/// What the requests loop (and Allow-Backup tasks) hand the responses loop.
#[derive(Debug)]
enum Local {
    /// A PDU the proxy authored, for the client.
    Pdu(Bytes),
    /// The StartTLS success response: write and flush it, say so on
    /// `flushed`, then write nothing until `resume` (the requests loop runs
    /// the TLS handshake meanwhile; dropped: the handshake failed).
    StartTls {
        pdu: Bytes,
        flushed: oneshot::Sender<()>,
        resume: oneshot::Receiver<()>,
    },
    /// The client closed its side: nothing more reaches it. Responses a
    /// `stop` freeze held for it are dropped and reading the upstream goes
    /// on (at their bound it had stopped), so the answers to what the server
    /// still runs, and its close, are read without waiting for the freeze.
    ClientGone,
    /// End the session.
    Close,
}

/// Ends both loops of a session. The loops check the flag at every turn
/// (`CancellationToken::is_cancelled` takes a lock), and `cancelled()` is
/// a future that touches the token only when first polled, so the
/// `select!`s of the hot path, whose I/O branch is usually ready at once,
/// never create or drop a token waiter.
#[derive(Clone, Default)]
struct Close {
    token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl Close {
    fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    #[inline]
    fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once the session is closing.
    #[inline]
    async fn cancelled(&self) {
        self.token.cancelled().await
    }
}

/// Where one of the session's two loops sends its end, once the loop and
/// all it holds are dropped. Dropped unsent (the loop's future dropped
/// before its end: a panic, caught by the pool or the runtime) it closes
/// the session, so the other loop, and the session waiting for both, do
/// not go on without it; the session's receiver then sees the sender gone.
/// Passed into the loop rather than awaited around it: a wrapper future
/// would be one more state to go through at each of the loop's wake-ups.
struct LoopEnd {
    tx: Option<oneshot::Sender<End>>,
    close: Close,
}

impl LoopEnd {
    fn new(close: &Close) -> (LoopEnd, oneshot::Receiver<End>) {
        let (tx, rx) = oneshot::channel();
        let end = LoopEnd {
            tx: Some(tx),
            close: close.clone(),
        };
        (end, rx)
    }

    /// Sends the loop's end to the session.
    fn send(mut self, end: End) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(end);
        }
    }
}

impl Drop for LoopEnd {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.close.cancel();
        }
    }
}

/// Reads the upstream's print (anonymously, bounded, best effort) so that a
/// server that comes back different after a restart can be told from the
/// one the sessions knew (`print.rs`).
pub(crate) async fn learn_server_print(shared: Arc<Shared>) {
    let read = async {
        let (mut up_in, mut up_out, _) = open_upstream(&shared, ClientSecurity::Fixed)
            .await
            .map_err(|e| e.to_string())?;
        let p = print::read(&mut up_in, &mut up_out)
            .await
            .map_err(|e| format!("{e:?}"))?;
        up_out.append_always(&pdu::encode(LdapMsg::new(1, LdapOp::UnbindRequest)));
        let _ = up_out.flush().await;
        Ok::<_, String>(p)
    };
    match tokio::time::timeout(shared.settings.upstream_connect_timeout, read).await {
        Ok(Ok(p)) => {
            debug!("upstream print: {p:?}");
            shared.prints.observe(p);
        }
        Ok(Err(e)) => debug!("upstream print not read: {e}"),
        Err(_) => debug!("upstream print not read: timed out"),
    }
}

/// A new connection to the upstream (TLS as configured, or as `client`'s
/// with `tls.upstream_mirror`), framed as a session's: its input and
/// output, and the stream StartTLS can upgrade.
async fn open_upstream(
    shared: &Shared,
    client: ClientSecurity,
) -> std::io::Result<(UpIn, UpOut, Option<UpstreamStream>)> {
    let (r, w, stream) = shared.connect_session_upstream(client).await?;
    let codec = FrameCodec::new(shared.settings.limits.max_response_pdu_bytes);
    Ok((
        FrameReader::new(r, codec),
        FrameWriter::new(w, UP_BUFFER),
        stream,
    ))
}

/// Either side's input (client or upstream).
type In = FrameReader<BoxRead>;
type ClientIn = In;
type UpIn = In;
/// Either side's output (client or upstream).
type Out = FrameWriter<BoxWrite>;
type ClientOut = Out;
type UpOut = Out;
/// What reading the next message gave: its length, `None` at a clean end.
type Next = Result<Option<usize>, FrameError>;
/// How much the upstream output buffers before the requests loop flushes
/// it first (as `FramedWrite`'s default).
const UP_BUFFER: usize = 8 * 1024;

/// Counts one more on a counter only one loop writes (the requests loop its
/// requests, the responses loop its responses): a plain load and store, no
/// locked read-modify-write per message.
#[inline]
fn count(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// A client connection ready for the session's loops.
pub(crate) struct Client {
    read: BoxRead,
    write: BoxWrite,
    /// The shared stream of a TCP client that is or may become TLS.
    stream: Option<ClientStream>,
    /// In TLS (`ldaps://`, or after StartTLS).
    tls: bool,
    /// A clear TCP connection (not ldapi), which `require_tls` refuses.
    tcp: bool,
    /// The verified client certificate's subject.
    cert_subject: Option<String>,
}

/// Turns an accepted connection into the session's halves, after the TLS
/// handshake on an `ldaps://` listener (`None`: the handshake failed).
async fn open_client(id: u64, peer: &str, incoming: Incoming, shared: &Shared) -> Option<Client> {
    let (stream, tls, cert_subject) = match (incoming, &shared.server_tls) {
        (Incoming::Unix(s), _) => {
            let (read, write) = endpoint::unix_halves(s);
            return Some(Client {
                read,
                write,
                stream: None,
                tls: false,
                tcp: false,
                cert_subject: None,
            });
        }
        (Incoming::Tcp(s, false), None) => {
            let (read, write) = endpoint::tcp_halves(s);
            return Some(Client {
                read,
                write,
                stream: None,
                tls: false,
                tcp: true,
                cert_subject: None,
            });
        }
        (Incoming::Tcp(s, false), Some(_)) => (ClientStream::clear(s), false, None),
        (Incoming::Tcp(s, true), Some(server)) => {
            let accepted = server.accept(s).await;
            if let Some(m) = &shared.metrics {
                m.handshake(Handshake::Ldaps, accepted.is_ok());
                if accepted.is_err() {
                    m.refused(Refusal::Tls);
                }
            }
            match accepted {
                Ok((tls, subject)) => (ClientStream::tls(tls), true, subject),
                Err(e) => {
                    info!(conn = id, %peer, "connection closed: ldaps: {e}");
                    return None;
                }
            }
        }
        (Incoming::Tcp(_, true), None) => {
            warn!(conn = id, %peer, "connection closed: ldaps listener without TLS settings");
            return None;
        }
    };
    if tls {
        info!(conn = id, %peer, subject = cert_subject.as_deref().unwrap_or("none"), "TLS established (ldaps)");
    }
    let (read, write) = stream.halves();
    Some(Client {
        read,
        write,
        stream: Some(stream),
        tls,
        tcp: true,
        cert_subject,
    })
}

impl Client {
    /// What a mirrored upstream connection must be for this client.
    fn security(&self) -> ClientSecurity {
        ClientSecurity::of(self.tls, self.stream.is_some())
    }

    /// A connection that is and stays clear (ldapi-like: `require_tls` does
    /// not apply), e.g. the fuzz harness's in-memory pipes.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn plain(read: BoxRead, write: BoxWrite) -> Client {
        Client {
            read,
            write,
            stream: None,
            tls: false,
            tcp: false,
            cert_subject: None,
        }
    }
}

/// Serves one accepted client connection until it ends: the TLS handshake
/// on an `ldaps://` listener, the upstream connection, then the session
/// ([`serve_connected`]), its futures run at `place`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    id: u64,
    peer: String,
    cred: Option<(u32, u32)>,
    incoming: Incoming,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    place: Place,
) {
    info!(conn = id, %peer, pooled = place.pooled(), "connection opened");
    let Some(client) = open_client(id, &peer, incoming, &shared).await else {
        return;
    };
    let connect = tokio::time::timeout(
        shared.settings.upstream_connect_timeout,
        shared.connect_session_upstream(client.security()),
    )
    .await;
    let why = match connect {
        Ok(Ok((r, w, stream))) => {
            let upstream = Upstream {
                halves: Some((r, w)),
                stream,
            };
            return serve_session(
                id, peer, cred, client, upstream, shared, shutdown, abort, place,
            )
            .await;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    };
    if let Some(m) = &shared.metrics {
        m.upstream_connect_failed();
    }
    // The server is down while a stop freeze lasts (a cold backup) or may
    // come back (`upstream_reconnect`): the session starts as one whose
    // connection the server closed, waiting to be carried to a new one.
    let settings = &shared.settings;
    if settings.carry_sessions && (shared.engine.stop_frozen() || settings.upstream_reconnect) {
        info!(
            conn = id,
            %peer,
            "the LDAP server is not reachable ({why}): the session waits for it"
        );
        let upstream = Upstream {
            halves: None,
            stream: None,
        };
        return serve_session(
            id, peer, cred, client, upstream, shared, shutdown, abort, place,
        )
        .await;
    }
    if let Some(m) = &shared.metrics {
        m.refused(Refusal::Upstream);
    }
    refuse(id, &peer, &shared, client.write, why).await
}

/// A session's upstream connection: its halves (`None`: none yet, the
/// session waits for the server), and the stream a client's StartTLS turns
/// to TLS (`tls.upstream_mirror`).
struct Upstream {
    halves: Option<(BoxRead, BoxWrite)>,
    stream: Option<UpstreamStream>,
}

/// Runs a session whose upstream connection is already open (`None`: that
/// waits for the server to be reachable, as after a restart), until it
/// ends. The fuzz harness (`crate::fuzzing`) calls it with in-memory pipes.
#[allow(clippy::too_many_arguments)]
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) async fn serve_connected(
    id: u64,
    peer: String,
    cred: Option<(u32, u32)>,
    client: Client,
    upstream: Option<(BoxRead, BoxWrite)>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let upstream = Upstream {
        halves: upstream,
        stream: None,
    };
    let place = Place::task();
    serve_session(
        id, peer, cred, client, upstream, shared, shutdown, abort, place,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve_session(
    id: u64,
    peer: String,
    cred: Option<(u32, u32)>,
    client: Client,
    upstream: Upstream,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    place: Place,
) {
    let started = Instant::now();
    let client_r = client.read;
    let lost = upstream.halves.is_none();
    let (up_r, up_w): (BoxRead, BoxWrite) = upstream
        .halves
        .unwrap_or_else(|| (Box::new(tokio::io::empty()), Box::new(tokio::io::sink())));
    // At most this much (plus one response) waits for a client that does not
    // read; then the responses loop stops reading the upstream.
    let client_out = FrameWriter::new(client.write, shared.settings.limits.client_buffer_bytes);

    let engine = shared.engine.clone();
    let state = Arc::new(SessionState::new(&shared.settings.limits));
    state
        .server_generation
        .store(shared.prints.generation(), Ordering::SeqCst);
    // A session without a connection yet waits from the start: nothing is
    // sent until the requests loop hands over a new one.
    let pending = lost.then(|| state.await_upstream());
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    engine.register(
        id,
        SessionHandle {
            state: state.participant.clone(),
            control: control_tx.clone(),
        },
    );
    // Registered after the shutdown broadcast: see it here.
    if shutdown.is_cancelled() {
        let _ = control_tx.send(Control::Shutdown);
    }
    let close = Close::default();
    let (local_tx, local_rx) = mpsc::channel(LOCAL_QUEUE);
    let requests = Requests {
        id,
        cred,
        client: client.stream,
        upstream_stream: upstream.stream,
        tls: client.tls,
        tcp: client.tcp,
        cert_subject: client.cert_subject,
        shared: shared.clone(),
        engine: engine.clone(),
        state: state.clone(),
        client_in: FrameReader::new(
            client_r,
            FrameCodec::with_shared_max(state.pdu_limit.clone()),
        ),
        up_out: FrameWriter::new(up_w, UP_BUFFER),
        local: local_tx,
        control: Inbox::new(control_rx),
        epoch: engine.epoch(),
        queue: Queue::default(),
        close: close.clone(),
        abort: abort.clone(),
        retry_spent: false,
    };
    let responses = Responses {
        id,
        engine: engine.clone(),
        state: state.clone(),
        up_in: FrameReader::new(
            up_r,
            FrameCodec::new(shared.settings.limits.max_response_pdu_bytes),
        ),
        client_out,
        local: Inbox::new(local_rx),
        control: control_tx,
        epoch: engine.epoch(),
        extensions: super::exops::listed(shared.server_tls.is_some()),
        held: HeldResponses::default(),
        close: close.clone(),
        told: false,
        partial: false,
        abort: abort.clone(),
        carry_sessions: shared.settings.carry_sessions,
        reconnect: shared.settings.upstream_reconnect,
        pending,
        journal: shared.journal.clone(),
        metrics: shared.metrics.clone(),
        outcome: Default::default(),
        outcome_failed: Default::default(),
    };
    // The two directions run as two tasks, or two futures of a pool (see
    // `proxy::pool`), so a wake-up for one polls only that one, and not
    // this future around them either (polled again only when they end: as
    // the requests loop's caller it cost about 80 instructions a request,
    // the layers of the session's future between the pool and the loop).
    let (resp_done, resp_rx) = LoopEnd::new(&close);
    place.spawn(responses.run(resp_done));
    let (req_done, req_rx) = LoopEnd::new(&close);
    place.spawn(requests.run(req_done));
    let ended = |loop_name: &str| {
        End::Io(
            IoAt::Task,
            std::io::Error::other(format!(
                "the {loop_name} loop ended without its result (a panic)"
            )),
        )
    };
    let req_end = req_rx.await.unwrap_or_else(|_| ended("requests"));
    let resp_end = resp_rx.await.unwrap_or_else(|_| ended("responses"));
    let end = match (&req_end, &resp_end) {
        (End::Closed, e) => e,
        (e, _) => e,
    };
    if let Some(j) = &shared.journal {
        // Writes whose response never came: the server may have run them
        // or not (`journal check` lists them). Recorded while the session
        // is registered, so a drain still counts them: a cut comes after.
        let lost: Vec<u64> = state
            .inflight()
            .iter()
            .map(|(_, e)| e.journal)
            .filter(|&seq| seq != 0)
            .collect();
        if !lost.is_empty() {
            let why = end.describe();
            for intent in lost {
                let why = why.clone();
                if let Err(e) = j.append(id, crate::journal::Body::Lost { intent, why }) {
                    warn!(
                        conn = id,
                        "journal: cannot record write {intent} as lost: {e}"
                    );
                }
            }
        }
    }
    engine.deregister(id).await;
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

/// A connection over a connection limit: tell the client why and close,
/// without reading from it or connecting upstream.
pub(crate) async fn refuse_connection(mut client_r: BoxRead, client_w: BoxWrite, why: String) {
    let mut out = FramedWrite::new(client_w, FrameCodec::default());
    let notice =
        pdu::notice_of_disconnection(LdapResultCode::Unavailable, &format!("abproxy: {why}"));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = out.send(notice).await;
        let _ = out.get_mut().shutdown().await;
        // Read (and drop) what the client already sent until it closes:
        // closing with unread bytes would reset the connection and could
        // destroy the notice before the client reads it.
        let mut sink = [0u8; 4096];
        while matches!(client_r.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The upstream could not be reached: tell the client and close.
async fn refuse(id: u64, peer: &str, shared: &Shared, client_w: BoxWrite, why: String) {
    let mut client_out = FramedWrite::new(client_w, FrameCodec::default());
    warn!(conn = id, %peer, upstream = %shared.settings.upstream, "cannot connect to upstream: {why}");
    let notice = pdu::notice_of_disconnection(
        LdapResultCode::Unavailable,
        &format!(
            "abproxy cannot reach the LDAP server {}: {why}",
            shared.settings.upstream
        ),
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = client_out.send(notice).await;
        let _ = client_out.get_mut().shutdown().await;
    })
    .await;
    info!(conn = id, %peer, "connection closed: upstream unreachable");
}

/// A failed write to the upstream.
const TO_UPSTREAM: IoAt = IoAt::Write(Side::Upstream);
/// A failed write to the client.
const TO_CLIENT: IoAt = IoAt::Write(Side::Client);

/// Feeds a message to an output once its socket has taken what the buffer
/// holds (the buffer was at its boundary: [`FrameWriter::append`] refused
/// it), unless the session closes first.
async fn feed_waiting(out: &mut Out, msg: &[u8], close: &Close, what: IoAt) -> Result<(), End> {
    flush_waiting(out, close, what).await?;
    out.append_always(msg);
    Ok(())
}

/// Flushes an output if that needs no waiting, the usual case (polled
/// without a waker to leave behind, no `select!` built); `None`: then
/// [`flush_waiting`].
#[inline]
fn flush_now(out: &mut Out, what: IoAt) -> Option<Result<(), End>> {
    let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
    match out.poll_flush(&mut cx) {
        std::task::Poll::Ready(r) => Some(r.map_err(|e| End::Io(what, e))),
        std::task::Poll::Pending => None,
    }
}

/// Flushes an output, waiting for its socket, unless the session closes
/// first. Biased, I/O first: the cancellation future is only polled (and
/// registered) when the write really has to wait.
async fn flush_waiting(out: &mut Out, close: &Close, what: IoAt) -> Result<(), End> {
    tokio::select! {
        biased;
        r = out.flush() => r.map_err(|e| End::Io(what, e)),
        _ = close.cancelled() => Err(End::Closed),
    }
}

/// The next message if it needs no read: a whole message (or a framing
/// error) is in the input's buffer. `None`: the loops go back to their
/// `select!`, which reads with the task's own waker (a poll with a no-op
/// waker here would only register it with the reactor in vain). The
/// buffer's own answer, not a poll of `next_message`: no future made and
/// the message measured once.
#[inline]
fn buffered_frame(input: &In) -> Option<Next> {
    match input.buffered() {
        Ok(None) => None,
        next => Some(next),
    }
}

/// True for a Notice of Disconnection.
fn is_notice(env: &Envelope, frame: &[u8]) -> bool {
    env.msgid == 0
        && env.op == op::EXTENDED_RESPONSE
        && env.oid_bytes(frame) == Some(oid::NOTICE_OF_DISCONNECTION)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that panics (its future dropped before its end, by the
    /// runtime or by a pool) closes the session, and the session learns it
    /// ended without its result; a loop that ends sends its end and leaves
    /// closing to the loop itself.
    #[tokio::test]
    async fn a_loop_that_panics_closes_the_session_and_one_that_ends_does_not() {
        let pools = super::super::pool::Pools::new(0);
        let seat = pools.seat();
        for place in [Place::task(), seat.place()] {
            let close = Close::default();
            let (done, rx) = LoopEnd::new(&close);
            place.spawn(async move { done.send(End::Closed) });
            assert!(matches!(rx.await, Ok(End::Closed)), "{place:?}");
            assert!(!close.is_cancelled(), "{place:?}");

            let (done, rx) = LoopEnd::new(&close);
            place.spawn(async move {
                let _held = done;
                panic!("a loop's bug");
            });
            assert!(rx.await.is_err(), "{place:?}");
            assert!(close.is_cancelled(), "{place:?}");
        }
    }
}
