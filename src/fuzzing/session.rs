//! The session-level fuzz check: one real session (`proxy::session`, the
//! real gate and freeze engine) on a current-thread runtime, its client and
//! upstream connections in-memory pipes. The client side writes what the
//! input says; a scripted upstream answers every request with a well-formed
//! final response of the right type (a search gets one entry first); the
//! input also says when the upstream answers (at once, when told, out of
//! order), when it closes the connection, and when an operator turns a
//! freeze ON or OFF (engine calls).
//!
//! Speed (it must run tens of thousands of inputs a second): the runtime is
//! built once per thread and kept while inputs leave nothing running on it
//! (each input still gets a fresh engine, session and pipes); its clock is
//! paused, so a drain's time limit or a lease costs no real time; a settle
//! is one timer of the paused clock, which fires once every task waits.
//!
//! Input: a 4-byte header, then commands in one of two formats.
//!
//! ```text
//! header[0] flags: 1 dc=example,dc=org in stop mode (else readonly)
//!                  2 dc=other,dc=org in stop mode
//!                  4 bind_is_write
//!                  8 the upstream refuses binds (invalidCredentials)
//!                 16 the upstream answers only when told (else at once)
//!                128 structured commands (below), else raw ones
//! header[1] queue_max_requests_per_conn = 1 + b % 16
//! header[2] queue_max_bytes_per_conn    = 256 * (1 + b % 32)
//! header[3] max_outstanding_per_conn    = 1 + b % 16
//! ```
//!
//! Raw commands (the recorded seeds: client bytes as they were sent):
//!
//! ```text
//! command 0x30: an LDAPMessage follows; its whole TLV (by its BER length,
//!               or the rest of the input if that cannot be read) is written
//!               to the proxy as client bytes
//! otherwise by command % 8:
//!   0  client bytes: 2-byte big-endian length, then that many bytes
//!   1  the upstream answers (next byte % 16) + 1 of its pending requests
//!   2  ON by the operator; next byte: 1 dc=example, 2 dc=other (none: all),
//!      4 timeLimit 0, 8 holdUntilUnbind on the session's connection
//!   3  OFF by the operator
//!   4  settle (let every task run until each waits) and check
//!   5  the upstream answers at once from now on (command & 8) or only
//!      when told
//!   6  client bytes: 1-byte length, then that many bytes
//!   7  settle
//! ```
//!
//! Structured commands (`script.rs`): a grammar of LDAP message sequences,
//! every message whole and well formed, so that the gate, not the framer,
//! sees nearly every input. By command & 15, parameters in the next bytes
//! (message IDs from a set of eight, 0 included, so they collide; DNs in
//! either backend, a suffix, oddly spelled, in none, cn=config, the root;
//! with command & 128, request controls: ManageDsaIT, unknown critical or
//! not, proxied authorization as the operator, relax, two at once):
//!
//! ```text
//!   0  bind: anonymous, a user of either backend, the operator (two
//!      spellings), empty password, SASL EXTERNAL or DIGEST-MD5
//!   1  add           2  delete        3  modify (description or
//!   4  modDN (newSuperior maybe another backend)  userPassword)
//!   5  compare       6  search (the root DSE among them)
//!   7  persistent search (sync request or persistent search control)
//!   8  abandon of an ID
//!   9  WhoAmI; unbind when command & 0x70 is 0x70
//!  10  Allow-Backup ON from the client: dnSet (none, one, both, empty,
//!      unknown), timeLimit (none, 0, 1, maxInt), holdUntilUnbind
//!  11  Allow-Backup OFF from the client (dnSet, freezeId), or status
//!  12  password modify (own or an entry's), Cancel, StartTLS, unknown
//!  13  the operator (engine): ON (as raw 2) or, command & 16, OFF with
//!      maybe a freezeId
//!  14  the upstream, by command >> 4: answer 1-4 oldest; answer one out of
//!      order; answer at once from now on; only when told; close
//!  15  settle (command & 16: and check); command & 0xf0 = 0xf0: raw
//!      client bytes, 1-byte length
//! ```
//! Messages follow each other with no settle between them: pipelined.
//!
//! At the end the upstream answers everything, then the client closes its
//! connection and the session must end; only if it waits with a full queue
//! (backpressure: it does not read the client) does an operator end the
//! freeze first.
//!
//! Invariants (a panic names the broken one): no panic in any task; the
//! upstream receives only whole frames, each byte-identical to a client
//! frame (or the proxy's own abandon of a read cut by the drain time limit),
//! never a frame after the first one the proxy must refuse or after an
//! unbind, never one the proxy answers itself; without a freeze in the
//! client order, with one in client order within the held kinds and within
//! the never-held kinds; every response the client gets is a readable
//! LDAPMessage, at most one Notice of Disconnection and nothing after it;
//! queued requests and bytes stay within the configured bounds; the
//! in-flight table empties when every request has its final response; the
//! session ends when the client closes (once a freeze holding a full queue
//! ends), and then nothing stays queued or in flight.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use abproxy_proto::{AllowBackupRequest, AllowBackupStatus, FreezeState};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;

use super::script::{self, Step, UpCmd, OPERATOR};
use crate::config::{Config, Settings};
use crate::freeze::{BackendMap, Class, Engine, FreezeError, Granted, Kind, Mode, Requester};
use crate::proxy::session::{serve_connected, Client};
use crate::proxy::Shared;
use crate::wire::ber::{put_tlv, tlv_len, write_len};
use crate::wire::envelope::oid;
use crate::wire::{codec, op, Envelope, FrameCodec};

/// Request size limits of the session (authenticated, anonymous).
const MAX_PDU: usize = 8192;
const MAX_PDU_ANONYMOUS: usize = 2048;
/// In-memory pipe capacities: small towards the proxy's readers' peers so
/// that backpressure happens.
const PIPE: usize = 4096;
/// The session's connection number.
const CONN: u64 = 1;
/// ONs with a zero drain time limit at most (each waits for the timer).
const MAX_TIMED_ONS: usize = 2;
/// The virtual time a settle waits (the timer wheel's resolution).
const SETTLE: Duration = Duration::from_millis(1);

thread_local! {
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

/// A panic in any task of the runtime (they all run on this thread) is
/// noted here: tokio turns a spawned task's panic into a `JoinError`, which
/// the session only logs.
#[inline]
fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.with(|p| p.set(true));
            previous(info);
        }));
    });
}

/// Virtual time a kept runtime may run ahead of (or behind) the real clock
/// before it is replaced: the engine sets its lease from the real clock
/// (`std::time::Instant`), which the runtime's paused clock must not pass.
const MAX_DRIFT: Duration = Duration::from_secs(60);

thread_local! {
    /// The runtime the inputs run on, kept from one input to the next: see
    /// [`runtime`].
    static RUNTIME: std::cell::RefCell<Option<tokio::runtime::Runtime>> =
        const { std::cell::RefCell::new(None) };
}

/// A current-thread runtime whose clock is paused (it advances only when
/// every task waits, to the next timer: a drain's time limit or a lease
/// costs no real time), built once per thread and kept while an input
/// leaves nothing behind: no task alive (a panic, or anything still
/// running, makes the next input build a fresh one) and a clock within
/// [`MAX_DRIFT`] of the real one. So every input starts from an empty
/// runtime, a fresh engine and session.
#[inline]
fn with_runtime<T>(f: impl FnOnce(&tokio::runtime::Runtime) -> T) -> T {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let stale = slot
            .as_ref()
            .is_some_and(|rt| rt.metrics().num_alive_tasks() > 0 || drift(rt) > MAX_DRIFT);
        if stale {
            // Dropping it drops its tasks.
            *slot = None;
        }
        let rt = slot.get_or_insert_with(|| {
            RUNTIMES_BUILT.with(|n| n.set(n.get() + 1));
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a current-thread runtime")
        });
        f(rt)
    })
}

thread_local! {
    static RUNTIMES_BUILT: Cell<usize> = const { Cell::new(0) };
}

/// How many runtimes [`check_session`] has built on this thread (one, and
/// one more after each input that left something running, or when the
/// clock drifted): how well the runtime is reused.
#[inline]
pub fn session_runtimes_built() -> usize {
    RUNTIMES_BUILT.with(Cell::get)
}

/// How far the runtime's clock is from the real one.
#[inline]
fn drift(rt: &tokio::runtime::Runtime) -> Duration {
    let virtual_now = rt
        .block_on(async { tokio::time::Instant::now() })
        .into_std();
    let real_now = std::time::Instant::now();
    virtual_now
        .saturating_duration_since(real_now)
        .max(real_now.saturating_duration_since(virtual_now))
}

/// Session invariants: see the module documentation.
///
/// The harness's functions (here and in `script.rs`) are `#[inline]`, so
/// they are compiled in the crate that calls this one: the fuzz target,
/// which `fuzz/instrument-only.sh` leaves without libFuzzer's
/// instrumentation, so that libFuzzer's feedback (and its cost after
/// every run) is the product's code only, not the generator's or the
/// checks'. The product's futures are created, spawned or boxed out of
/// line ([`spawn_session`], [`allow_backup`]): an `async fn`'s body is
/// compiled where it is first polled, and the product's must stay in
/// abproxy, instrumented.
#[inline]
pub fn check_session(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    watch_panics();
    PANICKED.with(|p| p.set(false));
    with_runtime(|rt| rt.block_on(Harness::new(data).run()));
    assert!(
        !PANICKED.with(|p| p.get()),
        "a task panicked (see the message above)"
    );
}

/// A session input, one line a step: the header's settings, then each
/// step, the client's messages decoded (`ldap3_proto`'s reading of them;
/// bytes it cannot read shown as they are). To read what a finding did:
/// `cargo run --features fuzzing --example fuzz_session -- --explain FILE`.
pub fn describe_session_input(data: &[u8]) -> Vec<String> {
    let Some(header) = data.first_chunk::<4>() else {
        return vec![format!(
            "{} bytes: shorter than the 4-byte header, not run",
            data.len()
        )];
    };
    let h = Harness::new(data);
    let f = h.flags;
    let mode = |bit| if f & bit != 0 { "stop" } else { "readonly" };
    let mut out = vec![format!(
        "header {header:02x?}: {} format; dc=example,dc=org {}, dc=other,dc=org {}; \
         bind_is_write {}; the upstream {} binds and answers {}; \
         queue_max_requests_per_conn {}, queue_max_bytes_per_conn {}, max_outstanding_per_conn {}",
        if f & script::STRUCTURED != 0 {
            "structured"
        } else {
            "raw"
        },
        mode(STOP_EXAMPLE),
        mode(STOP_OTHER),
        f & BIND_IS_WRITE != 0,
        if f & REFUSE_BINDS != 0 {
            "refuses"
        } else {
            "accepts"
        },
        if f & ANSWER_WHEN_TOLD != 0 {
            "only when told"
        } else {
            "at once"
        },
        h.limits.queue_requests,
        h.limits.queue_bytes,
        h.limits.outstanding,
    )];
    for step in script::steps(f, h.data) {
        let Step::Client(bytes) = step else {
            out.push(format!("{step:?}"));
            continue;
        };
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let mut codec = ldap3_proto::LdapCodec::new(Some(codec::DEFAULT_MAX_PDU), None);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(format!("client {m:?}")),
                Ok(None) if buf.is_empty() => break,
                Ok(None) => {
                    out.push(format!("client, incomplete: {:02x?}", &buf[..]));
                    break;
                }
                Err(e) => {
                    out.push(format!("client, unreadable ({e}): {:02x?}", &buf[..]));
                    break;
                }
            }
        }
    }
    out
}

/// What the scripted upstream saw.
#[derive(Default)]
struct UpLog {
    /// Every frame the proxy sent, in order.
    frames: Vec<Bytes>,
    /// The requests not answered yet (checked when ON succeeds).
    pending: VecDeque<Req>,
    /// The connection is over: the proxy closed its side, or the server
    /// closed it (`UpCmd::Close`).
    eof: bool,
    violation: Option<String>,
}

/// What the client side saw.
#[derive(Default)]
struct ClientLog {
    frames: usize,
    notices: usize,
    after_notice: bool,
    eof: bool,
    violation: Option<String>,
}

/// Header flags (`header[0]`, the table at the top; `script::STRUCTURED`
/// selects the format).
const STOP_EXAMPLE: u8 = 1;
const STOP_OTHER: u8 = 2;
const BIND_IS_WRITE: u8 = 4;
const REFUSE_BINDS: u8 = 8;
const ANSWER_WHEN_TOLD: u8 = 16;

#[derive(Clone, Copy)]
struct Limits {
    queue_requests: usize,
    queue_bytes: usize,
    outstanding: usize,
}

struct Harness<'a> {
    data: &'a [u8],
    flags: u8,
    limits: Limits,
}

/// Appends the scripted server's answers to a request (none to an abandon
/// or an unbind) to `out`, encoded by hand: cheaper than building
/// `ldap3_proto` messages, at every answer of every input. Each message is
/// written once, in place, its lengths computed first (building each
/// element in a vector of its own was a hundred vectors grown per input).
#[inline]
fn answers(frame: &[u8], refuse_binds: bool, out: &mut Vec<u8>) -> Result<(), String> {
    let env = Envelope::request(frame)
        .map_err(|e| format!("upstream received a frame whose envelope does not decode: {e}"))?;
    let id = i64::from(env.msgid).to_be_bytes();
    let id = &id[script::int_skip(&id)..];
    // An LDAPMessage: the ID, then the operation `tag` whose contents are
    // `parts`, one after the other.
    let message = |out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]| {
        let op_len = parts.iter().map(|p| p.len()).sum();
        let body_len = tlv_len(id.len()) + tlv_len(op_len);
        out.reserve(tlv_len(body_len));
        out.push(0x30);
        write_len(out, body_len);
        put_tlv(out, 0x02, id);
        out.push(tag);
        write_len(out, op_len);
        for p in parts {
            out.extend_from_slice(p);
        }
    };
    // LDAPResult: resultCode, an empty matchedDN and diagnosticMessage.
    let result = |code: u8| [0x0a, 0x01, code, 0x04, 0x00, 0x04, 0x00];
    const SUCCESS: u8 = 0;
    const INVALID_CREDENTIALS: u8 = 49;
    match env.op {
        op::ABANDON_REQUEST | op::UNBIND_REQUEST => {}
        op::BIND_REQUEST => {
            let code = if refuse_binds {
                INVALID_CREDENTIALS
            } else {
                SUCCESS
            };
            message(out, op::BIND_RESPONSE, &[&result(code)]);
        }
        op::SEARCH_REQUEST => {
            // An entry named as the base (the root DSE's is what the proxy
            // rewrites), then the result.
            let dn = String::from_utf8_lossy(env.dn_bytes(frame).unwrap_or_default());
            let mut dn_header = Vec::with_capacity(10);
            dn_header.push(0x04);
            write_len(&mut dn_header, dn.len());
            message(
                out,
                op::SEARCH_RESULT_ENTRY,
                &[&dn_header, dn.as_bytes(), entry_attributes()],
            );
            message(out, op::SEARCH_RESULT_DONE, &[&result(SUCCESS)]);
        }
        other => {
            let tag = match other {
                op::MODIFY_REQUEST => op::MODIFY_RESPONSE,
                op::ADD_REQUEST => op::ADD_RESPONSE,
                op::DEL_REQUEST => op::DEL_RESPONSE,
                op::MODDN_REQUEST => op::MODDN_RESPONSE,
                op::COMPARE_REQUEST => op::COMPARE_RESPONSE,
                _ => op::EXTENDED_RESPONSE,
            };
            message(out, tag, &[&result(SUCCESS)]);
        }
    }
    Ok(())
}

/// The attributes of the scripted server's search entries, encoded once:
/// `objectClass: top` and `supportedExtension: ` the Who am I? OID.
#[inline]
fn entry_attributes() -> &'static [u8] {
    static ATTRIBUTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ATTRIBUTES.get_or_init(|| {
        let attribute = |atype: &[u8], val: &[u8]| {
            let (mut a, mut vals, mut out) = (Vec::new(), Vec::new(), Vec::new());
            put_tlv(&mut vals, 0x04, val);
            put_tlv(&mut a, 0x04, atype);
            put_tlv(&mut a, 0x31, &vals);
            put_tlv(&mut out, 0x30, &a);
            out
        };
        let mut attrs = attribute(b"objectClass", b"top");
        attrs.extend(attribute(b"supportedExtension", oid::WHOAMI));
        let mut list = Vec::new();
        put_tlv(&mut list, 0x30, &attrs);
        list
    })
}

/// A request at the scripted server: its envelope's operation, ID and
/// abandon target read once, its class at most once (the first time a
/// freeze is established: the engine's backends and classification
/// settings do not change during an input).
struct Req {
    frame: Bytes,
    op: Option<u8>,
    msgid: i32,
    abandon_id: Option<i32>,
    /// The gate's class, once read (`None` inside: never frozen).
    class: Option<Option<Class>>,
}

impl Req {
    #[inline]
    fn new(frame: Bytes) -> Req {
        let env = Envelope::request(&frame).ok();
        Req {
            op: env.as_ref().map(|e| e.op),
            msgid: env.as_ref().map_or(-1, |e| e.msgid),
            abandon_id: env.and_then(|e| e.abandon_id),
            class: None,
            frame,
        }
    }

    /// A read the server stops when it is abandoned or the connection
    /// closes.
    #[inline]
    fn is_read(&self) -> bool {
        matches!(self.op, Some(op::SEARCH_REQUEST | op::COMPARE_REQUEST))
    }

    /// A write the current freeze holds (its backends as the status shows
    /// them), if a freeze is established. A password modify of the bound
    /// identity is left out: the session classifies it with an identity
    /// this check does not know.
    #[inline]
    fn frozen_write(&mut self, engine: &Engine) -> bool {
        let Some(frozen) = engine.established() else {
            return false;
        };
        let class = *self.class.get_or_insert_with(|| {
            let env = Envelope::request(&self.frame).ok()?;
            if env.op == op::EXTENDED_REQUEST
                && env.oid_bytes(&self.frame) == Some(oid::PASSWORD_MODIFY)
            {
                return None;
            }
            Some(engine.classify(&env, &self.frame, None))
        });
        class.is_some_and(|c| c.kind == Kind::Write && !c.backends.and(frozen).is_empty())
    }
}

/// The scripted upstream: reads whole frames, answers them at once or when
/// told, closes when the proxy closes. Like slapd, it drops what it has not
/// answered of a request that is abandoned, and the persistent searches of
/// a connection that binds. It checks what the freeze promises the server:
/// no bind overlaps an outstanding operation (RFC 4511 section 4.2.1: slapd
/// would drop it, and the proxy would wait for it for ever), and while a
/// freeze is established no write of a frozen backend arrives or is still
/// being run (answered). What it has not answered is in the log, where the
/// check of a successful ON reads it.
#[inline]
async fn upstream(
    from_proxy: DuplexStream,
    to_proxy: DuplexStream,
    mut cmds: mpsc::UnboundedReceiver<UpCmd>,
    log: Arc<Mutex<UpLog>>,
    engine: Arc<Engine>,
    refuse_binds: bool,
    mut auto: bool,
) {
    let mut input = FramedRead::new(from_proxy, FrameCodec::new(codec::DEFAULT_MAX_PDU));
    let mut output = to_proxy;
    let mut out = Vec::new();
    let mut cmds_open = true;
    let mut input_open = true;
    loop {
        let mut answer = 0;
        let mut out_of_order = None;
        tokio::select! {
            next = input.next(), if input_open => {
                let mut guard = log.lock().unwrap();
                let l = &mut *guard;
                match next {
                    None => {
                        // Like slapd at EOF: what has not started is dropped,
                        // reads stop, a running write finishes; then it closes.
                        input_open = false;
                        l.pending.retain(|p| !p.is_read());
                        if auto || !cmds_open {
                            answer = l.pending.len();
                        }
                    }
                    Some(Ok(frame)) => {
                        l.frames.push(frame.clone());
                        let mut req = Req::new(frame);
                        if req.frozen_write(&engine) {
                            l.violation = Some(format!(
                                "a write of a frozen backend reached the server during the freeze: {:02x?}",
                                req.frame
                            ));
                            break;
                        }
                        match req.op {
                            Some(op::ABANDON_REQUEST) => {
                                // A read stops; a write the server has started
                                // runs to its end (slapd does not stop it).
                                let target = req.abandon_id;
                                l.pending
                                    .retain(|p| !(Some(p.msgid) == target && p.is_read()));
                            }
                            Some(op::BIND_REQUEST) => {
                                l.pending.retain(|p| !is_persistent(&p.frame));
                                let overlapped = l
                                    .pending
                                    .iter()
                                    .filter(|p| {
                                        !matches!(
                                            p.op,
                                            Some(op::ABANDON_REQUEST | op::UNBIND_REQUEST)
                                        )
                                    })
                                    .count();
                                if overlapped > 0 {
                                    l.violation = Some(format!(
                                        "a bind overlapped {overlapped} outstanding operation(s) of its connection"
                                    ));
                                    break;
                                }
                                l.pending.push_back(req);
                            }
                            _ => l.pending.push_back(req),
                        }
                        if auto {
                            answer = l.pending.len();
                        }
                    }
                    Some(Err(e)) => {
                        l.violation = Some(format!("upstream received a broken stream: {e}"));
                        break;
                    }
                }
            },
            c = cmds.recv(), if cmds_open => match c {
                Some(UpCmd::Answer(n)) => answer = n,
                Some(UpCmd::AnswerAt(i)) => {
                    let n = log.lock().unwrap().pending.len();
                    if n > 0 {
                        out_of_order = Some(i % n);
                        answer = 1;
                    }
                }
                Some(UpCmd::Auto(a)) => {
                    auto = a;
                    if auto {
                        answer = log.lock().unwrap().pending.len();
                    }
                }
                Some(UpCmd::Close) => {
                    // What was not answered never is; a write the server
                    // ran is over with the connection.
                    log.lock().unwrap().pending.clear();
                    break;
                }
                None => cmds_open = false,
            },
        }
        let done = {
            let mut guard = log.lock().unwrap();
            let l = &mut *guard;
            for _ in 0..answer {
                let next = match out_of_order.take() {
                    Some(i) => l.pending.remove(i),
                    None => l.pending.pop_front(),
                };
                let Some(mut req) = next else {
                    break;
                };
                if req.frozen_write(&engine) {
                    l.violation = Some(format!(
                        "the server was still running a write of a frozen backend during the freeze: {:02x?}",
                        req.frame
                    ));
                    break;
                }
                if let Err(v) = answers(&req.frame, refuse_binds, &mut out) {
                    l.violation = Some(v);
                    break;
                }
            }
            !input_open && (l.pending.is_empty() || !cmds_open)
        };
        if !out.is_empty() {
            // The proxy may be gone: then nobody reads.
            let _ = output.write_all(&out).await;
            out.clear();
        }
        if done {
            break;
        }
    }
    // Like slapd: the proxy closed, so close too (or the server closes
    // first: both directions, so the proxy's writes fail).
    let _ = output.shutdown().await;
    log.lock().unwrap().eof = true;
}

/// The real session (`serve_connected`) between in-memory pipes: the
/// client's (read, write) and the upstream's (read, write), as the proxy
/// sees them.
fn spawn_session(
    shared: Arc<Shared>,
    client: (DuplexStream, DuplexStream),
    upstream: (DuplexStream, DuplexStream),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve_connected(
        CONN,
        "fuzz".into(),
        None,
        Client::plain(Box::new(client.0), Box::new(client.1)),
        Some((Box::new(upstream.0), Box::new(upstream.1))),
        shared,
        CancellationToken::new(),
        CancellationToken::new(),
    ))
}

/// The engine's Allow-Backup call (an operator's ON or OFF), its future
/// boxed here, out of line: see [`check_session`] for why.
fn allow_backup(
    engine: &Arc<Engine>,
    who: Requester,
    value: Vec<u8>,
) -> Pin<Box<dyn Future<Output = Result<Granted, FreezeError>> + Send>> {
    let engine = engine.clone();
    Box::pin(async move { engine.allow_backup(who, Some(&value)).await })
}

/// The harness operator's plain OFF.
#[inline]
fn operator_off(
    engine: &Arc<Engine>,
) -> Pin<Box<dyn Future<Output = Result<Granted, FreezeError>> + Send>> {
    allow_backup(
        engine,
        operator(),
        abproxy_proto::encode_request(&AllowBackupRequest::off()),
    )
}

/// A persistent search, as the session tells one (a search with the sync
/// request or the persistent search control: it stays in flight). The
/// operation's tag is peeked first: most frames are no search.
#[inline]
fn is_persistent_search(frame: &[u8]) -> bool {
    Envelope::op_of(frame) == Some(op::SEARCH_REQUEST) && is_persistent(frame)
}

/// A request with a persistent search's control (it stays pending at the
/// server).
#[inline]
fn is_persistent(frame: &[u8]) -> bool {
    Envelope::request(frame).is_ok_and(|e| {
        e.controls(frame)
            .any(|c| c.oid == oid::SYNC_REQUEST || c.oid == oid::PERSISTENT_SEARCH)
    })
}

/// The client's reader: every response must be a readable LDAPMessage; at
/// most one Notice of Disconnection, and nothing after it.
#[inline]
async fn client_reader(from_proxy: DuplexStream, log: Arc<Mutex<ClientLog>>) {
    let mut input = FramedRead::new(from_proxy, FrameCodec::new(codec::DEFAULT_MAX_PDU));
    while let Some(next) = input.next().await {
        let mut l = log.lock().unwrap();
        let frame = match next {
            Ok(f) => f,
            Err(e) => {
                l.violation = Some(format!("the client received a broken stream: {e}"));
                return;
            }
        };
        l.frames += 1;
        if l.notices > 0 {
            l.after_notice = true;
        }
        match Envelope::response(&frame) {
            Ok(env) => {
                if env.msgid == 0
                    && env.op == op::EXTENDED_RESPONSE
                    && env.oid_bytes(&frame) == Some(oid::NOTICE_OF_DISCONNECTION)
                {
                    l.notices += 1;
                }
            }
            Err(e) => {
                l.violation = Some(format!("the client received an unreadable response: {e}"));
                return;
            }
        }
    }
    log.lock().unwrap().eof = true;
}

/// The client's writer: writes what it is given, in order, until aborted
/// (the client closing; whatever it had not written is lost).
#[inline]
async fn client_writer(mut to_proxy: DuplexStream, mut chunks: mpsc::UnboundedReceiver<Bytes>) {
    while let Some(c) = chunks.recv().await {
        if to_proxy.write_all(&c).await.is_err() {
            return;
        }
    }
}

/// Lets every task run until each waits (for a pipe, a channel or a
/// timer): the runtime's clock is paused, so a sleep ends only once no task
/// can run, after the timers due before it (a drain's time limit of 0).
#[inline]
async fn settle() {
    tokio::time::sleep(SETTLE).await;
}

/// The uid of a local (ldapi) client allowed to freeze: the operator of the
/// harness (its ON, OFF and status reads) is one, which spares a DN's
/// parsing and comparison with the allowed identities at each call (no
/// client of the session has a uid; a client that binds as [`OPERATOR`]
/// freezes by its DN).
const OPERATOR_UID: u32 = 4242;

#[inline]
fn operator() -> Requester {
    Requester {
        conn: 0,
        bound_dn: None,
        peer_uid: Some((OPERATOR_UID, OPERATOR_UID)),
        cert_subject: None,
    }
}

/// The engine's status, as a client reads it (encoded and decoded).
#[inline]
fn status(engine: &Engine) -> AllowBackupStatus {
    let st = engine
        .status(&operator())
        .expect("the operator may read the status");
    abproxy_proto::decode_status(&crate::proxy::exops::status_value(&st))
        .expect("the status value decodes")
}

/// What the bounds checked after every settle are about: the requests and
/// bytes queued and the requests in flight, the same counts the status
/// reports (read without building the rest of it: the holder's name, the
/// backends' list).
struct Counts {
    queued_requests: usize,
    queued_bytes: usize,
    in_flight: usize,
}

#[inline]
fn counts(engine: &Engine) -> Counts {
    let (queued_requests, queued_bytes) = engine.queued();
    Counts {
        queued_requests,
        queued_bytes,
        in_flight: engine.in_flight(),
    }
}

/// The client frames of a byte stream, as the session's codec cuts them
/// (with its larger limit), up to the first that cannot be framed.
#[inline]
fn client_frames(stream: &[u8]) -> Vec<Bytes> {
    let mut codec = FrameCodec::new(MAX_PDU);
    let mut buf = BytesMut::from(stream);
    let mut out = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut buf) {
        out.push(f);
    }
    out
}

/// The client stream so far, framed as it grows.
struct ClientStream {
    codec: FrameCodec,
    buf: BytesMut,
    broken: bool,
    frames: Vec<Bytes>,
    /// Persistent searches among the frames (they stay in flight).
    persistent: usize,
}

impl ClientStream {
    #[inline]
    fn new() -> Self {
        ClientStream {
            codec: FrameCodec::new(MAX_PDU),
            buf: BytesMut::new(),
            broken: false,
            frames: Vec::new(),
            persistent: 0,
        }
    }

    /// Frames the stream with `bytes` added (one whole frame after a
    /// frame boundary, as the generator's messages are, is taken as it
    /// is: what the codec would cut, without copying it).
    #[inline]
    fn extend(&mut self, bytes: &Bytes) {
        if self.broken {
            return;
        }
        if self.buf.is_empty()
            && codec::frame_len(bytes, MAX_PDU).is_ok_and(|n| n == Some(bytes.len()))
        {
            if is_persistent_search(bytes) {
                self.persistent += 1;
            }
            self.frames.push(bytes.clone());
            return;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => {
                    if is_persistent_search(&f) {
                        self.persistent += 1;
                    }
                    self.frames.push(f);
                }
                Ok(None) => return,
                Err(_) => {
                    self.broken = true;
                    self.buf.clear();
                    return;
                }
            }
        }
    }
}

/// The configuration of the proxy under test, but for the values the
/// header sets ([`Harness::settings`]), built once per thread.
#[inline]
fn base_settings() -> Settings {
    thread_local! {
        static BASE: Settings = {
            let mut c = Config {
                upstream: "ldap://in-memory.invalid:389".into(),
                max_pdu_bytes: MAX_PDU,
                max_pdu_bytes_anonymous: MAX_PDU_ANONYMOUS,
                max_response_pdu_bytes: codec::DEFAULT_MAX_PDU,
                client_buffer_bytes: 4096,
                idle_timeout_secs: 0,
                // The in-memory upstream cannot be dialled again: a session
                // the scripted server closes ends, as it does without
                // carrying.
                carry_sessions: false,
                ..Config::default()
            };
            let f = &mut c.freeze;
            f.allowed = vec![OPERATOR.into()];
            f.allowed_uids = vec![OPERATOR_UID];
            f.max_drain_secs = 3600;
            f.lease_secs = 3600;
            f.held_response_bytes_per_conn = 1024;
            c.build().expect("the harness's configuration parses")
        };
    }
    BASE.with(Settings::clone)
}

impl<'a> Harness<'a> {
    #[inline]
    fn new(data: &'a [u8]) -> Self {
        Harness {
            data: &data[4..],
            flags: data[0],
            limits: Limits {
                queue_requests: 1 + data[1] as usize % 16,
                queue_bytes: 256 * (1 + data[2] as usize % 32),
                outstanding: 1 + data[3] as usize % 16,
            },
        }
    }

    /// The settings of the proxy under test (the upstream is the
    /// in-memory pipe: its URL is never dialled): the configuration is
    /// built once per thread ([`base_settings`]) and the header's values
    /// set in a copy. Building it for each input (its defaults, the URL's
    /// parsing) ran a hundred-odd edges of the product's configuration
    /// code that are the same in every input: libFuzzer's work after each
    /// run grows with the edges an input runs, and these tell it nothing.
    #[inline]
    fn settings(&self) -> Settings {
        let mut s = base_settings();
        s.limits.max_outstanding_per_conn = self.limits.outstanding;
        let f = &mut s.freeze;
        f.bind_is_write = (self.flags & BIND_IS_WRITE != 0).into();
        f.queue_max_requests_per_conn = self.limits.queue_requests;
        f.queue_max_bytes_per_conn = self.limits.queue_bytes;
        s
    }

    /// The two backends in the modes the header says: built once per
    /// thread and mode pair, then cloned (parsing the suffixes was a few
    /// per cent of an input's instructions).
    #[inline]
    fn backends(&self) -> BackendMap {
        thread_local! {
            static MAPS: std::cell::RefCell<[Option<BackendMap>; 4]> =
                const { std::cell::RefCell::new([None, None, None, None]) };
        }
        let flags = self.flags;
        MAPS.with(|maps| {
            maps.borrow_mut()[usize::from(flags & (STOP_EXAMPLE | STOP_OTHER))]
                .get_or_insert_with(|| {
                    let mode = |bit| {
                        if flags & bit != 0 {
                            Mode::Stop
                        } else {
                            Mode::Readonly
                        }
                    };
                    BackendMap::new([
                        ("dc=example,dc=org".to_string(), mode(STOP_EXAMPLE)),
                        ("dc=other,dc=org".to_string(), mode(STOP_OTHER)),
                    ])
                    .expect("valid suffixes")
                })
                .clone()
        })
    }

    /// The bounds on what one session may hold.
    #[inline]
    fn check_bounds(&self, engine: &Engine, persistent: usize) {
        let st = counts(engine);
        let l = self.limits;
        // At a release a session that had stopped reading reads what its
        // client sent meanwhile (to see whether it left) before sending its
        // queue: up to another byte limit and `catch_up_frames` requests.
        let catch_up = crate::proxy::session::catch_up_frames(l.queue_requests);
        assert!(
            st.queued_requests <= l.queue_requests + catch_up,
            "{} requests queued, limit {} (+ {catch_up} at a release)",
            st.queued_requests,
            l.queue_requests
        );
        // Room is checked before a request is read: at most one request
        // past the limit, twice the limit after a release's catch-up.
        assert!(
            st.queued_bytes < 2 * l.queue_bytes + MAX_PDU,
            "{} bytes queued, limit {} (twice at a release, + one request)",
            st.queued_bytes,
            l.queue_bytes
        );
        // Released queues do not wait for the outstanding limit: what a
        // queue held at its release, a catch-up's requests included.
        assert!(
            st.in_flight <= l.outstanding + l.queue_requests + catch_up + persistent,
            "{} requests in flight, limits {} outstanding + {} queued (+ {catch_up} at a release)",
            st.in_flight,
            l.outstanding,
            l.queue_requests
        );
    }

    #[inline]
    async fn run(self) {
        let settings = self.settings();
        let engine = Arc::new(Engine::new(settings.freeze.clone(), self.backends()));
        let shared = Arc::new(Shared::new(settings, engine.clone()));
        let (client_w, proxy_from_client) = tokio::io::duplex(PIPE);
        let (proxy_to_client, client_r) = tokio::io::duplex(64 * 1024);
        let (proxy_to_up, up_from_proxy) = tokio::io::duplex(PIPE);
        let (up_to_proxy, proxy_from_up) = tokio::io::duplex(64 * 1024);

        let up_log = Arc::new(Mutex::new(UpLog::default()));
        let client_log = Arc::new(Mutex::new(ClientLog::default()));
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let manual = self.flags & ANSWER_WHEN_TOLD != 0;
        tokio::spawn(upstream(
            up_from_proxy,
            up_to_proxy,
            up_rx,
            up_log.clone(),
            engine.clone(),
            self.flags & REFUSE_BINDS != 0,
            !manual,
        ));
        tokio::spawn(client_reader(client_r, client_log.clone()));
        let (chunk_tx, chunk_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(client_writer(client_w, chunk_rx));
        let session = spawn_session(
            shared,
            (proxy_from_client, proxy_to_client),
            (proxy_from_up, proxy_to_up),
        );

        // Run the steps.
        let mut stream = ClientStream::new();
        // The client's messages, one after the other: each a slice of it.
        let mut arena = BytesMut::with_capacity(2 * self.data.len() + 512);
        let mut froze = false;
        let mut timed_ons = 0;
        for step in script::steps(self.flags, self.data) {
            // Once the session has ended, what is left of the input can
            // reach neither the proxy nor the server: it is not read.
            if session.is_finished() {
                break;
            }
            match step {
                Step::Client(b) => {
                    // Shared with the stream's frames: a slice of the
                    // arena, not a buffer (and its header) of its own.
                    arena.extend_from_slice(&b);
                    let b = arena.split().freeze();
                    stream.extend(&b);
                    let _ = chunk_tx.send(b);
                }
                Step::Up(cmd) => {
                    let _ = up_tx.send(cmd);
                }
                Step::On(p) => {
                    let mut req = AllowBackupRequest::on();
                    let mut dns = Vec::new();
                    if p & 1 != 0 {
                        dns.push("dc=example,dc=org");
                    }
                    if p & 2 != 0 {
                        dns.push("dc=other,dc=org");
                    }
                    if !dns.is_empty() {
                        req = req.with_dn_set(dns);
                    }
                    let timed = p & 4 != 0 && timed_ons < MAX_TIMED_ONS;
                    if timed {
                        req = req.with_time_limit(0);
                        timed_ons += 1;
                    }
                    let mut who = operator();
                    if p & 8 != 0 {
                        req = req.with_hold_until_unbind(true);
                        who.conn = CONN;
                    }
                    froze = true;
                    let engine = engine.clone();
                    let value = abproxy_proto::encode_request(&req);
                    let log = up_log.clone();
                    tokio::spawn(async move {
                        // The drain is over: nothing of a frozen backend
                        // may still be running at the server. (The answer
                        // is a success exactly when the engine grants the
                        // ON: `exops::allow_backup_answer`.)
                        if let Ok(granted) = allow_backup(&engine, who, value).await {
                            let mut l = log.lock().unwrap();
                            let running = l
                                .pending
                                .iter_mut()
                                .filter_map(|p| p.frozen_write(&engine).then_some(()))
                                .count();
                            if running > 0 && l.violation.is_none() {
                                l.violation = Some(format!(
                                    "ON succeeded ({granted}) while the server still ran {running} write(s) of a frozen backend"
                                ));
                            }
                        }
                    });
                    if timed {
                        // Let the drain time limit pass.
                        settle().await;
                    }
                }
                Step::Off(id) => {
                    let engine = engine.clone();
                    let mut req = AllowBackupRequest::off();
                    if let Some(id) = id {
                        req = req.with_freeze_id(id);
                    }
                    let value = abproxy_proto::encode_request(&req);
                    tokio::spawn(async move { allow_backup(&engine, operator(), value).await });
                }
                Step::Settle { check } => {
                    settle().await;
                    if check {
                        self.check_bounds(&engine, stream.persistent);
                    }
                }
            }
        }

        // The upstream answers everything: nothing may stay in flight.
        let _ = up_tx.send(UpCmd::Auto(true));
        settle().await;
        self.check_bounds(&engine, stream.persistent);
        let up_done = {
            let u = up_log.lock().unwrap();
            u.eof || !u.pending.is_empty()
        };
        if !session.is_finished() && !up_done {
            let mut offs = 0;
            while engine.in_flight() != 0 && engine.stop_frozen() && stream.persistent > 0 {
                // A `stop` freeze holds persistent-search responses up to
                // `held_response_bytes_per_conn`; at that bound the session
                // stops reading the upstream (backpressure,
                // docs/configuration.md), so an answer behind them waits for
                // the freeze's end. End it (what it releases may hold the
                // client's own ON, which freezes again: each round ends the
                // freeze in place, and the client's ONs are fewer than its
                // bytes); then the answers must come.
                assert!(
                    offs < self.data.len(),
                    "requests still in flight after {offs} freezes ended and the upstream answered every request"
                );
                let _ = operator_off(&engine).await;
                settle().await;
                offs += 1;
            }
            assert_eq!(
                engine.in_flight(),
                0,
                "requests still in flight after the upstream answered every request"
            );
        }

        // The client closes (what it had not written is lost).
        writer.abort();
        drop(chunk_tx);
        settle().await;
        // A session that does not read cannot see the close: the freeze
        // must end first. It stops reading when its queue is full, or when
        // `max_outstanding_per_conn` requests are in flight and their
        // answers wait behind persistent-search responses a `stop` freeze
        // holds at their bound (the session then stops reading the
        // upstream). What the OFF releases may hold the client's own ON
        // (bound as an operator), which freezes again and can fill the
        // queue again: each round ends the freeze in place, and the
        // client's ONs are fewer than its bytes.
        let mut offs = 0;
        while !session.is_finished() {
            let st = status(&engine);
            let full = st.queued_requests as usize >= self.limits.queue_requests
                || st.queued_bytes as usize >= self.limits.queue_bytes;
            let no_room = engine.stop_frozen()
                && stream.persistent > 0
                && st.in_flight as usize >= self.limits.outstanding;
            assert!(
                full || no_room,
                "the session did not end after the client closed (queued {} requests, {} bytes; state {:?}; after {offs} OFF)",
                st.queued_requests, st.queued_bytes, st.state
            );
            assert!(
                st.state != FreezeState::Thawed,
                "a session that does not read without a freeze"
            );
            assert!(
                offs < self.data.len(),
                "the session did not end after the client closed and {offs} freezes ended"
            );
            tokio::spawn(operator_off(&engine));
            settle().await;
            offs += 1;
        }
        let st = counts(&engine);
        assert_eq!(
            (st.queued_requests, st.queued_bytes, st.in_flight),
            (0, 0, 0),
            "queued requests, queued bytes, in flight after the session ended"
        );

        {
            let up = up_log.lock().unwrap();
            if let Some(v) = &up.violation {
                panic!("{v}");
            }
            assert!(up.eof, "the upstream connection was not closed");
            let client = client_log.lock().unwrap();
            if let Some(v) = &client.violation {
                panic!("{v}");
            }
            assert!(client.eof, "the client connection was not closed");
            assert!(
                client.notices <= 1 && !client.after_notice,
                "{} notices of disconnection, something after one: {}",
                client.notices,
                client.after_notice
            );
            self.check_upstream_frames(&stream.frames, &up.frames, froze);
        }

        // Nothing stays behind for the next input on this runtime (see
        // `with_runtime`): a freeze still on ends, and its lease timer with
        // it. Its status, as a client reads it, decodes.
        if !engine.thawed() {
            assert_ne!(status(&engine).state, FreezeState::Thawed);
            let _ = operator_off(&engine).await;
            settle().await;
        }
    }

    /// Every upstream frame is a client frame the proxy may forward, in an
    /// order the gate allows.
    #[inline]
    fn check_upstream_frames(&self, frames: &[Bytes], up: &[Bytes], froze: bool) {
        // Frames past the first the proxy must refuse (or an unbind) are
        // never read. Any Allow-Backup request may have frozen. One reading
        // of each frame for both.
        let mut cut = None;
        let mut froze = froze;
        for (i, f) in frames.iter().enumerate() {
            if cut.is_some() && froze {
                break;
            }
            match Envelope::request(f) {
                Err(_) => {
                    cut.get_or_insert(i);
                }
                Ok(env) => {
                    if env.op == op::UNBIND_REQUEST {
                        cut.get_or_insert(i + 1);
                    }
                    froze |= env.op == op::EXTENDED_REQUEST
                        && env.oid_bytes(f) == Some(abproxy_proto::ALLOW_BACKUP_OID.as_bytes());
                }
            }
        }
        let cut = cut.unwrap_or(frames.len());
        let mut last_any = None;
        let mut last_abandon = None;
        for f in up {
            let env = Envelope::request(f).expect("checked by the upstream");
            if env.op == op::ABANDON_REQUEST && env.msgid == i32::MAX {
                // The proxy's own abandon (drain time limit).
                assert!(froze, "the proxy abandoned a request without a freeze");
                continue;
            }
            // In the client's order, absolutely (a freeze or a bind holds a
            // connection's later requests behind the held one): after the
            // last frame sent. Abandons are never held, so they may overtake
            // held requests: in order among themselves. Of identical frames,
            // the first that fits: a queued one may have been abandoned or
            // cancelled.
            let last = if env.op == op::ABANDON_REQUEST {
                &mut last_abandon
            } else {
                &mut last_any
            };
            let after = *last;
            let from = after.map_or(0, |l: usize| l + 1);
            let Some(i) = (from..frames.len()).find(|&i| frames[i] == *f) else {
                assert!(
                    frames.contains(f),
                    "the upstream received a frame the client did not send: {f:02x?}"
                );
                panic!(
                    "a frame reached the upstream out of order (after frame {after:?}): {f:02x?}"
                );
            };
            *last = Some(i);
            assert!(
                i < cut,
                "frame {i} reached the upstream after frame {cut} ended the session"
            );
            if env.op == op::EXTENDED_REQUEST {
                let name = env.oid_bytes(f).unwrap_or_default();
                assert!(
                    name != oid::START_TLS
                        && name != abproxy_proto::ALLOW_BACKUP_OID.as_bytes()
                        && name != abproxy_proto::ALLOW_BACKUP_STATUS_OID.as_bytes(),
                    "frame {i}, answered by the proxy, reached the upstream"
                );
            }
        }
    }
}

/// A `check_session` input from a recorded client stream: `flags` as the
/// first header byte (roomy queues), every whole LDAPMessage sent as one
/// command, an operator's ON before the first write (add, delete, modify,
/// modDN, extended) and OFF three messages later, then the rest. `None`
/// when the stream holds no whole message.
#[inline]
pub fn session_seed(stream: &[u8], flags: u8) -> Option<Vec<u8>> {
    let frames = client_frames(stream);
    if frames.is_empty() {
        return None;
    }
    let mut out = vec![flags, 15, 31, 15];
    let mut on_at = None;
    for (i, f) in frames.iter().enumerate() {
        let write = Envelope::request(f).is_ok_and(|e| {
            matches!(
                e.op,
                op::ADD_REQUEST
                    | op::DEL_REQUEST
                    | op::MODIFY_REQUEST
                    | op::MODDN_REQUEST
                    | op::EXTENDED_REQUEST
            )
        });
        if write && on_at.is_none() {
            on_at = Some(i);
            out.extend_from_slice(&[2, 0, 4]); // ON (all backends), settle
        }
        if on_at.is_some_and(|at| i == at + 3) {
            out.extend_from_slice(&[4, 3, 4]); // settle, OFF, settle
        }
        out.extend_from_slice(f);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pdu::encode;
    use ldap3_proto::proto::{LdapAddRequest, LdapAttribute, LdapMsg, LdapOp};

    #[test]
    fn an_input_is_described_a_step_a_line() {
        use ldap3_proto::proto::{LdapMsg, LdapOp};
        let unbind = crate::wire::pdu::encode(LdapMsg::new(3, LdapOp::UnbindRequest));
        // Raw: the header (dc=example in stop mode, answers when told), an
        // unbind, half of it again, OFF, a settle and check.
        let mut input = vec![0x11, 0, 0, 0];
        input.extend_from_slice(&unbind);
        input.extend_from_slice(&[6, 2, 0x30, 0x05, 3, 4]);
        let lines = super::describe_session_input(&input);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[0].contains("raw format; dc=example,dc=org stop, dc=other,dc=org readonly"));
        assert!(lines[0].contains("answers only when told"));
        assert!(
            lines[1].contains("msgid: 3") && lines[1].contains("UnbindRequest"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("client, incomplete: [30, 05]"),
            "{}",
            lines[2]
        );
        assert_eq!(lines[3], "Off(None)");
        assert_eq!(lines[4], "Settle { check: true }");
        assert_eq!(super::describe_session_input(&[1, 2]).len(), 1);
    }

    #[test]
    fn the_operator_is_the_labs_admin() {
        assert_eq!(OPERATOR, testkit::ADMIN_DN);
    }

    fn add(msgid: i32, dn: &str) -> Bytes {
        encode(LdapMsg::new(
            msgid,
            LdapOp::AddRequest(LdapAddRequest {
                dn: dn.into(),
                attributes: vec![LdapAttribute {
                    atype: "objectClass".into(),
                    vals: vec![b"organizationalRole".to_vec()],
                }],
            }),
        ))
    }

    #[test]
    fn writes_held_by_a_freeze_and_released() {
        // Readonly backends, answers at once, roomy queues.
        let mut input = vec![0, 15, 31, 15];
        input.extend_from_slice(&add(1, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&[2, 0, 4]); // ON (all), settle
        input.extend_from_slice(&add(2, "cn=b,dc=example,dc=org"));
        input.extend_from_slice(&add(3, "cn=c,dc=other,dc=org"));
        input.extend_from_slice(&[4, 3, 4]); // settle, OFF, settle
        input.extend_from_slice(&add(4, "cn=d,dc=example,dc=org"));
        check_session(&input);
    }

    #[test]
    fn a_full_queue_ends_with_the_freeze_after_the_client_closes() {
        let mut input = vec![0, 0, 0, 0]; // one queued request at most
        input.extend_from_slice(&[2, 0, 4]);
        for i in 1..5 {
            input.extend_from_slice(&add(i, "cn=a,dc=example,dc=org"));
        }
        check_session(&input);
    }

    #[test]
    fn message_id_zero() {
        let mut input = vec![0, 15, 31, 15];
        input.extend_from_slice(&add(0, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&[4]);
        check_session(&input);
    }

    #[test]
    fn garbage_ends_the_session() {
        let mut input = vec![16, 3, 3, 3];
        input.extend_from_slice(&add(1, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&[6, 5, 0x30, 0x03, 0x02, 0x01, 0x01]);
        input.extend_from_slice(&add(2, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&[1, 15]);
        check_session(&input);
    }

    fn msg(msgid: i32, op: LdapOp) -> Bytes {
        encode(LdapMsg::new(msgid, op))
    }

    fn bind(msgid: i32, dn: &str) -> Bytes {
        msg(
            msgid,
            LdapOp::BindRequest(ldap3_proto::proto::LdapBindRequest {
                version: 3,
                dn: dn.into(),
                cred: ldap3_proto::proto::LdapBindCred::Simple("secret".into()),
            }),
        )
    }

    fn root_dse(msgid: i32) -> Bytes {
        base_search(msgid, "")
    }

    /// A base-scope search of `base` for any entry.
    fn base_search(msgid: i32, base: &str) -> Bytes {
        msg(
            msgid,
            LdapOp::SearchRequest(ldap3_proto::proto::LdapSearchRequest {
                base: base.into(),
                scope: ldap3_proto::proto::LdapSearchScope::Base,
                aliases: ldap3_proto::proto::LdapDerefAliases::Never,
                sizelimit: 0,
                timelimit: 0,
                typesonly: false,
                filter: ldap3_proto::proto::LdapFilter::Present("objectClass".into()),
                attrs: vec![],
            }),
        )
    }

    /// The scripted server's answers, written in place, are the messages
    /// `ldap3_proto` reads: a bind's and a modify's result, and a search's
    /// entry (named as the base, long enough for a long-form length) and
    /// result, each with the request's ID.
    #[test]
    fn the_scripted_answers_decode() {
        use ldap3_proto::proto::LdapResultCode;
        let long = format!("cn={},dc=example,dc=org", "x".repeat(300));
        let decoded = |frame: &Bytes, refuse: bool| {
            let mut out = Vec::new();
            answers(frame, refuse, &mut out).unwrap();
            let mut buf = BytesMut::from(&out[..]);
            let mut codec = ldap3_proto::LdapCodec::default();
            let mut msgs = Vec::new();
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                msgs.push(m);
            }
            assert!(buf.is_empty(), "bytes left after the answers");
            msgs
        };
        let code = |op: &LdapOp| match op {
            LdapOp::BindResponse(r) => r.res.code.clone(),
            LdapOp::ModifyResponse(r) | LdapOp::SearchResultDone(r) => r.code.clone(),
            other => panic!("not a result: {other:?}"),
        };
        for (refuse, want) in [
            (false, LdapResultCode::Success),
            (true, LdapResultCode::InvalidCredentials),
        ] {
            let m = decoded(&bind(300, "cn=a"), refuse);
            assert_eq!((m.len(), m[0].msgid), (1, 300));
            assert_eq!(code(&m[0].op), want);
        }
        let modify = msg(
            65535,
            LdapOp::ModifyRequest(ldap3_proto::proto::LdapModifyRequest {
                dn: "dc=example,dc=org".into(),
                changes: vec![],
            }),
        );
        let m = decoded(&modify, false);
        assert_eq!((m.len(), m[0].msgid), (1, 65535));
        assert_eq!(code(&m[0].op), LdapResultCode::Success);
        for base in [long, String::new()] {
            let m = decoded(&base_search(i32::MAX, &base), false);
            assert_eq!(m.len(), 2);
            assert!(m.iter().all(|m| m.msgid == i32::MAX));
            match &m[0].op {
                LdapOp::SearchResultEntry(e) => {
                    assert_eq!(e.dn, base);
                    let names: Vec<_> = e.attributes.iter().map(|a| a.atype.as_str()).collect();
                    assert_eq!(names, ["objectClass", "supportedExtension"]);
                }
                other => panic!("not an entry: {other:?}"),
            }
            assert_eq!(code(&m[1].op), LdapResultCode::Success);
        }
    }

    /// The upstream answers only when told (header flag 16).
    const MANUAL: [u8; 4] = [16, 15, 31, 15];

    /// The hostile sequences of the hardening issue, as inputs: each a
    /// test below and a seed of the session fuzz target
    /// (`fuzz/seeds/session/hostile-*`, written by `write_hostile_seeds`).
    fn hostile_inputs() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        // A running write, then a request reusing its ID, during a drain.
        let mut input = MANUAL.to_vec();
        input.extend_from_slice(&add(5, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&[7, 2, 0, 7]); // settle, ON (all), settle
        input.extend_from_slice(&root_dse(5));
        input.extend_from_slice(&[7]);
        out.push(("reused-id-of-a-running-write", input));
        // A running write abandoned, then ON.
        let mut input = MANUAL.to_vec();
        input.extend_from_slice(&add(5, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&[7]);
        input.extend_from_slice(&msg(6, LdapOp::AbandonRequest(5)));
        input.extend_from_slice(&[7, 2, 0, 7]);
        out.push(("abandoned-running-write", input));
        // A write, a bind and a write pipelined; answers one at a time.
        let mut input = MANUAL.to_vec();
        input.extend_from_slice(&add(1, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&bind(2, "cn=u,dc=example,dc=org"));
        input.extend_from_slice(&add(3, "cn=b,dc=example,dc=org"));
        input.extend_from_slice(&[7, 1, 0, 7, 1, 0, 7, 1, 0, 7]);
        out.push(("pipelined-bind", input));
        // An operator's bind behind a held write.
        let mut input = vec![0, 15, 31, 15];
        input.extend_from_slice(&[2, 0, 7]);
        input.extend_from_slice(&add(1, "cn=a,dc=example,dc=org"));
        input.extend_from_slice(&bind(2, OPERATOR));
        input.extend_from_slice(&[7, 3, 7]);
        out.push(("operator-bind-behind-held-write", input));
        // Two binds with one ID, the second as the operator, then ON.
        let mut input = MANUAL.to_vec();
        input.extend_from_slice(&bind(7, ""));
        input.extend_from_slice(&bind(7, OPERATOR));
        input.extend_from_slice(&[1, 0, 7, 2, 0, 7]);
        out.push(("reused-bind-id", input));
        out
    }

    #[test]
    fn hostile_sequences_keep_the_invariants() {
        for (name, input) in hostile_inputs() {
            let r = std::panic::catch_unwind(|| check_session(&input));
            assert!(r.is_ok(), "{name}");
        }
    }

    /// Writes [`hostile_inputs`] to the fuzz seed corpus:
    /// `cargo test --lib -- --ignored write_hostile_seeds`.
    #[test]
    #[ignore = "writes fuzz/seeds/session/hostile-*"]
    fn write_hostile_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/session");
        for (name, input) in hostile_inputs() {
            std::fs::write(dir.join(format!("hostile-{name}")), input).unwrap();
        }
    }

    /// After a successful SASL bind, non-LDAP bytes are a negotiated SASL
    /// security layer the proxy cannot read: the session ends with no
    /// notice (a notice in clear would be garbage to a client in a layer).
    #[test]
    fn a_sasl_security_layer_ends_the_session_quietly() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let h = Harness::new(&MANUAL);
            let settings = h.settings();
            let engine = Arc::new(Engine::new(settings.freeze.clone(), h.backends()));
            let shared = Arc::new(Shared::new(settings, engine.clone()));
            let (mut client_w, proxy_from_client) = tokio::io::duplex(PIPE);
            let (proxy_to_client, client_r) = tokio::io::duplex(PIPE);
            let (proxy_to_up, up_from_proxy) = tokio::io::duplex(PIPE);
            let (up_to_proxy, proxy_from_up) = tokio::io::duplex(PIPE);
            let (_up_tx, up_rx) = mpsc::unbounded_channel();
            let up_log = Arc::new(Mutex::new(UpLog::default()));
            tokio::spawn(upstream(
                up_from_proxy,
                up_to_proxy,
                up_rx,
                up_log.clone(),
                engine.clone(),
                false,
                true,
            ));
            let session = spawn_session(
                shared,
                (proxy_from_client, proxy_to_client),
                (proxy_from_up, proxy_to_up),
            );
            let sasl = msg(
                1,
                LdapOp::BindRequest(ldap3_proto::proto::LdapBindRequest {
                    version: 3,
                    dn: String::new(),
                    cred: ldap3_proto::proto::LdapBindCred::SASL(
                        ldap3_proto::proto::SaslCredentials {
                            mechanism: "DIGEST-MD5".into(),
                            credentials: b"response".to_vec(),
                        },
                    ),
                }),
            );
            let mut from_proxy = FramedRead::new(client_r, FrameCodec::default());
            client_w.write_all(&sasl).await.unwrap();
            let bound = from_proxy.next().await.unwrap().unwrap();
            assert_eq!(Envelope::response(&bound).unwrap().result_code, Some(0));
            client_w
                .write_all(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])
                .await
                .unwrap();
            assert!(
                from_proxy.next().await.is_none(),
                "closed with nothing after the bind response"
            );
            session.await.unwrap();
            assert_eq!(
                up_log.lock().unwrap().frames.len(),
                1,
                "only the bind went upstream"
            );
        });
    }

    /// Structured inputs from a seeded generator (random bytes after a
    /// header with the structured flag): nearly every one sends the gate a
    /// whole write request (the same bytes as raw commands nearly never
    /// do), and all keep the invariants.
    #[test]
    fn structured_inputs_reach_the_gate_and_keep_the_invariants() {
        let writes = |input: &[u8], flags: u8| {
            script::steps(flags, &input[4..]).any(|s| {
                matches!(s, Step::Client(b) if Envelope::request(&b).is_ok_and(|e| matches!(
                    e.op,
                    op::ADD_REQUEST | op::DEL_REQUEST | op::MODIFY_REQUEST | op::MODDN_REQUEST
                )))
            })
        };
        let (mut structured, mut raw) = (0, 0);
        let rounds = 300;
        for (round, input) in script::generated_inputs(rounds, 100)
            .into_iter()
            .enumerate()
        {
            structured += usize::from(writes(&input, input[0]));
            raw += usize::from(writes(&input, input[0] & !script::STRUCTURED));
            let r = std::panic::catch_unwind(|| check_session(&input));
            assert!(r.is_ok(), "round {round}: input {input:02x?}");
        }
        assert!(
            structured * 10 >= rounds * 9,
            "{structured} of {rounds} structured inputs send a write (raw: {raw})"
        );
        assert!(
            raw * 10 < rounds,
            "{raw} of {rounds} raw inputs send a write"
        );
    }

    /// The runtime is kept from one input to the next: the hostile
    /// sequences (freezes left on, held writes, a full queue) leave nothing
    /// running behind them.
    #[test]
    fn the_runtime_is_kept_across_inputs() {
        let before = session_runtimes_built();
        let mut n = 0;
        for _ in 0..3 {
            for (_, input) in hostile_inputs() {
                check_session(&input);
                n += 1;
            }
        }
        let built = session_runtimes_built() - before;
        assert!(built <= 2, "{built} runtimes built for {n} inputs");
    }

    /// A small generator of hostile sequences (IDs from a range of four, so
    /// they collide; binds anonymous, as a user and as the operator; writes
    /// in and out of the backends, spelled oddly; abandons; ON and OFF; the
    /// upstream answering when told), run through the invariants. Seeded:
    /// the same sequences every run.
    #[test]
    fn generated_hostile_sequences_keep_the_invariants() {
        let mut rng = script::Seeded::new(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: u64| rng.below(n);
        const DNS: [&str; 5] = [
            "cn=a,dc=example,dc=org",
            "cn=b,dc=other,dc=org",
            "cn=c,dc=\"example\",dc=org",
            "olcDatabase={1}mdb,cn=config",
            "cn=d,dc=nowhere",
        ];
        for round in 0..300 {
            let flags = [0u8, 16, 1 | 16, 4 | 16, 2, 4][next(6) as usize];
            let mut input = vec![flags, 15, 31, 15];
            for _ in 0..(4 + next(20)) {
                let id = 1 + next(4) as i32;
                match next(10) {
                    0 | 1 => input.extend_from_slice(&add(id, DNS[next(5) as usize])),
                    2 => input.extend_from_slice(&bind(
                        id,
                        ["", "cn=u,dc=example,dc=org", OPERATOR][next(3) as usize],
                    )),
                    3 => input.extend_from_slice(&root_dse(id)),
                    4 => input
                        .extend_from_slice(&msg(id, LdapOp::AbandonRequest(1 + next(4) as i32))),
                    5 => input.extend_from_slice(&[2, next(16) as u8 & !4]), // ON, untimed
                    6 => input.push(3),                                      // OFF
                    7 => input.extend_from_slice(&[1, next(4) as u8]),       // answer some
                    8 => input.push(if next(2) == 0 { 5 } else { 13 }),      // manual/auto
                    _ => input.push(7),                                      // settle
                }
            }
            let r = std::panic::catch_unwind(|| check_session(&input));
            assert!(r.is_ok(), "round {round}: input {input:02x?}");
        }
    }
}
