//! A session's part in a freeze. What it shares with the engine: its
//! in-flight table (which requests have been sent upstream and not yet
//! answered with a final response; the engine reads it to know when a drain
//! is complete) and its identity (the bound DN, by which the engine
//! classifies and authorises). What it keeps for the freeze: the queue of
//! requests a freeze (or the session's own order) holds, accounted in the
//! engine's totals, and the persistent-search responses a stop-mode freeze
//! holds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Class, Engine};
use crate::sync::lock;
use crate::wire::{op, Envelope};

/// One outstanding request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// protocolOp identifier octet of the request.
    pub op: u8,
    /// When it was sent upstream, when someone measures it (the metrics'
    /// latency histogram, debug logs): a clock read per request otherwise
    /// bought nothing.
    pub started: Option<Instant>,
    /// A SASL bind (its success may install a security layer).
    pub sasl_bind: bool,
    /// A persistent search (syncrepl refreshAndPersist or the persistent
    /// search control): never completes by itself.
    pub persistent: bool,
    /// A base search of the root DSE (its entry gets the proxy's OIDs).
    pub root_dse: bool,
    /// Where the name of a simple bind is in `request` (it becomes the
    /// session's identity on success), `0..0` for none (no field of a
    /// message starts at 0): see [`InFlight::bind_dn`]. Not an `Option`:
    /// eight bytes less in an entry moved into and out of the table once
    /// per request.
    pub bind_dn_span: std::ops::Range<u32>,
    /// The gate's classification, when a freeze was active as it passed.
    pub class: Option<Class>,
    /// The client abandoned it, but the server may still be running it (a
    /// write, which the server does not stop once started): the Abandon was
    /// not forwarded, the entry stays until the server's final response,
    /// which the client does not get.
    pub abandoned: bool,
    /// The request itself, kept (a reference-counted view, no copy) to be
    /// classified only if a freeze starts while it is in flight, and for a
    /// simple bind's name.
    pub request: Option<Bytes>,
    /// The journal's intent record of this write (0: not journaled).
    pub journal: u64,
}

impl InFlight {
    /// A request of operation `op` starting now.
    pub fn new(op: u8, class: Option<Class>) -> Self {
        InFlight {
            op,
            started: None,
            sasl_bind: false,
            persistent: false,
            root_dse: false,
            bind_dn_span: 0..0,
            class,
            abandoned: false,
            request: None,
            journal: 0,
        }
    }

    /// The name of a simple bind.
    pub fn bind_dn(&self) -> Option<&[u8]> {
        let r = &self.bind_dn_span;
        if r.end == 0 {
            return None;
        }
        self.request
            .as_deref()?
            .get(r.start as usize..r.end as usize)
    }

    /// Time since it was sent, if that was recorded.
    pub fn age(&self) -> Option<Duration> {
        self.started.map(|s| s.elapsed())
    }
}

/// Outstanding requests of one client connection, by message ID. Hashed
/// with foldhash (seeded per process) rather than SipHash: an insert and a
/// remove per request, where SipHash cost about 3 % of all the proxy's
/// instructions per operation (callgrind); a client choosing colliding IDs
/// only slows its own table, which `max_outstanding_per_conn` bounds.
#[derive(Debug, Default)]
pub struct InFlightTable {
    /// A request that started while nothing else was in flight: kept here,
    /// not hashed. Most connections have one request outstanding at a
    /// time, each then one store and one take instead of a hash insert and
    /// remove. Its ID is never in `ops` too.
    first: Option<(i32, InFlight)>,
    ops: HashMap<i32, InFlight, foldhash::fast::RandomState>,
    /// Message IDs of reads whose Abandon went to the server, which may
    /// still answer them (it had sent their responses, or did, before it
    /// read the Abandon): the ID is not free for another request until the
    /// read's final response, or the response to a later bind (RFC 4511
    /// section 4.2.1: before a bind, the server completes or abandons every
    /// operation of the connection). Else that response would end the
    /// entry of the request that reused the ID, while the server still runs
    /// it: a drain would not wait for it, a bind would overlap it.
    abandoned: std::collections::HashSet<i32, foldhash::fast::RandomState>,
}

/// What [`InFlightTable::abandon_read`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum AbandonedRead {
    /// The read left the table; its ID stays taken until the server is
    /// done with it.
    Gone(InFlight),
    /// Nothing with that ID is in flight.
    NotInFlight,
    /// As many abandoned reads' IDs as allowed are taken already: the read
    /// stays in flight (the caller keeps the Abandon and drops its
    /// response, as for a write).
    Full,
}

impl InFlightTable {
    /// Records a request sent upstream. A request reusing the ID of an
    /// outstanding one (RFC 4511 section 4.1.1.1 forbids it) is refused and
    /// handed back: the older entry stays, so nothing the server may still
    /// be running leaves the table (the drain counts it) and no identity is
    /// taken from a response meant for another request.
    /// So is one reusing the ID of an abandoned read the server may still
    /// answer (see `abandoned`).
    pub fn start(&mut self, msgid: i32, entry: InFlight) -> Result<(), InFlight> {
        if !self.abandoned.is_empty() && self.abandoned.contains(&msgid) {
            return Err(entry);
        }
        match &self.first {
            None if self.ops.is_empty() => {
                self.first = Some((msgid, entry));
                return Ok(());
            }
            Some((id, _)) if *id == msgid => return Err(entry),
            _ => {}
        }
        match self.ops.entry(msgid) {
            std::collections::hash_map::Entry::Occupied(_) => Err(entry),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
                Ok(())
            }
        }
    }

    /// Takes the request with this ID out of the table.
    #[inline]
    fn take(&mut self, msgid: i32) -> Option<InFlight> {
        if matches!(&self.first, Some((id, _)) if *id == msgid) {
            return self.first.take().map(|(_, e)| e);
        }
        if self.ops.is_empty() {
            return None;
        }
        self.ops.remove(&msgid)
    }

    /// Handles a response: a final response ends its request, which is
    /// returned. Entries, references and intermediate responses do not.
    /// A bind's frees the IDs of the reads abandoned before it; an
    /// abandoned read's own frees its ID.
    #[inline]
    pub fn response(&mut self, msgid: i32, response_op: u8) -> Option<InFlight> {
        if !op::is_final_response(response_op) {
            return None;
        }
        match self.take(msgid) {
            Some(e) => {
                if e.op == op::BIND_REQUEST && !self.abandoned.is_empty() {
                    self.abandoned.clear();
                }
                Some(e)
            }
            None => {
                if !self.abandoned.is_empty() {
                    self.abandoned.remove(&msgid);
                }
                None
            }
        }
    }

    /// The client's Abandon of a read goes to the server: the read leaves
    /// the table and its ID stays taken (see `abandoned`), at most `max`
    /// such IDs at a time.
    pub fn abandon_read(&mut self, msgid: i32, max: usize) -> AbandonedRead {
        if self.abandoned.len() >= max && self.get(msgid).is_some() {
            return AbandonedRead::Full;
        }
        match self.take(msgid) {
            Some(e) => {
                self.abandoned.insert(msgid);
                AbandonedRead::Gone(e)
            }
            None => AbandonedRead::NotInFlight,
        }
    }

    /// IDs of abandoned reads the server may still answer.
    pub fn abandoned_reads(&self) -> usize {
        self.abandoned.len()
    }

    /// An abandon request: the abandoned operation gets no response.
    pub fn abandon(&mut self, msgid: i32) -> Option<InFlight> {
        self.take(msgid)
    }

    /// A request with this ID would be refused by [`InFlightTable::start`]:
    /// one with the ID is outstanding, or it is the ID of an abandoned read
    /// the server may still answer.
    pub fn taken(&self, msgid: i32) -> bool {
        (!self.abandoned.is_empty() && self.abandoned.contains(&msgid)) || self.get(msgid).is_some()
    }

    /// The request with this ID, if outstanding.
    pub fn get(&self, msgid: i32) -> Option<&InFlight> {
        match &self.first {
            Some((id, e)) if *id == msgid => Some(e),
            _ => self.ops.get(&msgid),
        }
    }

    /// The request with this ID, to mark it.
    pub fn get_mut(&mut self, msgid: i32) -> Option<&mut InFlight> {
        match &mut self.first {
            Some((id, e)) if *id == msgid => Some(e),
            _ => self.ops.get_mut(&msgid),
        }
    }

    /// Number of outstanding requests.
    pub fn len(&self) -> usize {
        self.ops.len() + usize::from(self.first.is_some())
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.ops.is_empty()
    }

    /// Outstanding requests, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &InFlight)> {
        self.first
            .iter()
            .map(|(k, v)| (*k, v))
            .chain(self.ops.iter().map(|(k, v)| (*k, v)))
    }
}

/// The part of a session's state the freeze engine reads (through its
/// [`SessionHandle`](super::SessionHandle)): the in-flight table and the
/// bound DN. The session keeps the rest of its state and updates these.
#[derive(Debug, Default)]
pub struct Participant {
    inflight: Mutex<InFlightTable>,
    /// The identity of the last successful simple bind (bytes as sent:
    /// made a string only when asked for).
    bound_dn: Mutex<BoundDn>,
    /// A bind was received and has not been answered: the session has no
    /// identity meanwhile (`bound_dn` is then ignored).
    bind_received: AtomicBool,
}

impl Participant {
    /// The in-flight table (a short critical section; never held across await).
    pub fn inflight(&self) -> MutexGuard<'_, InFlightTable> {
        lock(&self.inflight)
    }

    /// The session's bound DN, if a simple bind succeeded.
    pub fn bound_dn(&self) -> Option<String> {
        self.bound_dn_bytes()
            .map(|dn| String::from_utf8_lossy(&dn).into_owned())
    }

    /// The session's bound DN, copied out of the lock; `None` from the
    /// moment a bind is received until its response.
    pub fn bound_dn_bytes(&self) -> Option<Vec<u8>> {
        if self.bind_received.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.bound_dn).get().map(<[u8]>::to_vec)
    }

    /// A bind was received: no identity until its response (a flag, not
    /// the lock: once per bind on the requests loop).
    pub fn unbind_for_bind(&self) {
        self.bind_received.store(true, Ordering::Release);
    }

    /// A bind ended: `dn` (a successful simple bind's name) is the
    /// session's identity from now on.
    pub fn set_bound_dn(&self, dn: Option<&[u8]>) {
        lock(&self.bound_dn).set(dn);
        self.bind_received.store(false, Ordering::Release);
    }
}

/// Extended operations about the freeze that the proxy answers itself and
/// that depend on the session's identity (so they wait behind a pending
/// bind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOp {
    /// Allow-Backup ON/OFF.
    AllowBackup,
    /// The freeze's status.
    Status,
}

/// A request held by a freeze, or for the session's own order (behind a
/// bind, or a bind behind the connection's outstanding requests).
#[derive(Debug)]
pub struct Queued {
    /// The request's bytes as the client sent them.
    pub frame: Bytes,
    /// Its envelope.
    pub env: Envelope,
    /// Its class at the gate ([`Class::NEVER`] for one the proxy answers).
    pub class: Class,
    /// Answered by the proxy itself once released (an Allow-Backup or
    /// status request behind a bind: it needs the bind's identity).
    pub local: Option<LocalOp>,
}

/// One connection's held requests, oldest first, with the counts its
/// limits (`queue_max_*_per_conn`) and the engine's totals
/// (`queue_max_*_total`) are checked against. Every change goes through
/// here, so the engine's totals always equal the sum of the queues.
#[derive(Debug, Default)]
pub struct Queue {
    items: VecDeque<Queued>,
    bytes: usize,
    binds: usize,
}

impl Queue {
    /// Adds a request at the back.
    pub fn push(&mut self, q: Queued, engine: &Engine) {
        if q.env.op == op::BIND_REQUEST {
            self.binds += 1;
        }
        self.bytes += q.frame.len();
        engine.queue_add(q.frame.len());
        self.items.push_back(q);
    }

    /// Takes the oldest request out.
    pub fn pop_front(&mut self, engine: &Engine) -> Option<Queued> {
        let q = self.items.pop_front()?;
        self.taken(&q, engine);
        Some(q)
    }

    /// Takes the request with this message ID out.
    pub fn remove(&mut self, msgid: i32, engine: &Engine) -> Option<Queued> {
        let pos = self.items.iter().position(|q| q.env.msgid == msgid)?;
        let q = self.items.remove(pos)?;
        self.taken(&q, engine);
        Some(q)
    }

    /// Empties the queue (nothing of it is ever sent); how many there were.
    pub fn clear(&mut self, engine: &Engine) -> usize {
        let n = self.items.len();
        self.items.clear();
        engine.queue_sub(n, self.bytes);
        self.bytes = 0;
        self.binds = 0;
        n
    }

    fn taken(&mut self, q: &Queued, engine: &Engine) {
        if q.env.op == op::BIND_REQUEST {
            self.binds -= 1;
        }
        self.bytes -= q.frame.len();
        engine.queue_sub(1, q.frame.len());
    }

    /// The oldest request.
    pub fn front(&self) -> Option<&Queued> {
        self.items.front()
    }

    /// A request with this message ID waits here.
    pub fn contains(&self, msgid: i32) -> bool {
        self.items.iter().any(|q| q.env.msgid == msgid)
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Binds waiting.
    pub fn binds(&self) -> usize {
        self.binds
    }

    /// Room for another request: the per-connection limits, and the
    /// engine's totals for a queue that already holds requests (one with
    /// nothing queued always has room, so an operator can still send OFF
    /// or ask the status; it queues at most one request over the total).
    pub fn has_room(&self, engine: &Engine) -> bool {
        let cfg = engine.config();
        self.items.len() < cfg.queue_max_requests_per_conn
            && self.bytes < cfg.queue_max_bytes_per_conn
            && (self.items.is_empty() || engine.queue_has_room())
    }
}

/// Persistent-search responses held while a stop-mode freeze lasts (the
/// server may send changes of a frozen backend to a syncrepl consumer),
/// bounded by `held_response_bytes_per_conn`: at the bound the session
/// stops reading its upstream.
#[derive(Debug, Default)]
pub struct HeldResponses {
    items: VecDeque<Bytes>,
    bytes: usize,
}

impl HeldResponses {
    /// Holds a response.
    pub fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.items.push_back(frame);
    }

    /// The oldest held response.
    pub fn pop_front(&mut self) -> Option<Bytes> {
        let f = self.items.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Drops everything held (its client is gone); returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.items.len();
        self.items.clear();
        self.bytes = 0;
        n
    }

    /// Below `limit` bytes: the session may read more from its upstream.
    pub fn below(&self, limit: usize) -> bool {
        self.bytes < limit
    }
}

/// Message IDs of reads the drain's time limit abandoned and answered
/// itself: their server responses must not reach the client any more, and
/// no request goes upstream with such an ID (the server may still answer
/// the old read) until the server is known to be done with it: the read's
/// final response, a bind's response (RFC 4511 section 4.2.1), or a new
/// upstream connection. Checked without the lock while empty.
#[derive(Debug, Default)]
pub struct Suppressed {
    ids: Mutex<std::collections::HashSet<i32>>,
    any: AtomicBool,
}

impl Suppressed {
    /// Some ID is suppressed (a relaxed load: the hot path's only cost).
    #[inline]
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Suppresses the responses to `msgid`.
    pub fn insert(&self, msgid: i32) {
        lock(&self.ids).insert(msgid);
        self.any.store(true, Ordering::Relaxed);
    }

    /// Responses to `msgid` are suppressed: the server may still answer it.
    /// (Inlined: the usual answer, nothing suppressed, is one load.)
    #[inline(always)]
    pub fn contains(&self, msgid: i32) -> bool {
        self.any() && self.holds(msgid)
    }

    #[inline(never)]
    fn holds(&self, msgid: i32) -> bool {
        lock(&self.ids).contains(&msgid)
    }

    /// The server is done with every suppressed ID (it answered a bind, or
    /// the connection is a new one).
    pub fn clear(&self) {
        if self.any() {
            lock(&self.ids).clear();
            self.any.store(false, Ordering::Relaxed);
        }
    }

    /// Whether a response to `msgid` is dropped; a final one ends the
    /// suppression of its ID. (Inlined: the usual answer, nothing
    /// suppressed, is one load.)
    #[inline(always)]
    pub fn drops(&self, msgid: i32, final_response: bool) -> bool {
        self.any() && self.take(msgid, final_response)
    }

    #[inline(never)]
    fn take(&self, msgid: i32, final_response: bool) -> bool {
        let mut s = lock(&self.ids);
        if !s.contains(&msgid) {
            return false;
        }
        if final_response {
            s.remove(&msgid);
            self.any.store(!s.is_empty(), Ordering::Relaxed);
        }
        true
    }
}

/// A session's bound DN. One buffer for the session's life: a connection
/// that binds as one user after another (a pool re-binding per request)
/// costs no allocation per bind.
#[derive(Debug, Default)]
struct BoundDn {
    dn: Vec<u8>,
    bound: bool,
}

impl BoundDn {
    fn get(&self) -> Option<&[u8]> {
        self.bound.then_some(&self.dn[..])
    }

    /// `None` only marks the session unbound: the bytes stay, so a bind
    /// as the same DN again (cleared when it was sent) copies nothing.
    fn set(&mut self, dn: Option<&[u8]>) {
        self.bound = dn.is_some();
        if let Some(dn) = dn {
            if self.dn != dn {
                self.dn.clear();
                self.dn.extend_from_slice(dn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::{BackendMap, FreezeConfig, Mode};
    use crate::wire::pdu::encode;
    use ldap3_proto::proto::{LdapBindCred, LdapBindRequest, LdapMsg, LdapOp};

    fn engine(cfg: FreezeConfig) -> Engine {
        let map = BackendMap::new([("dc=example,dc=org".to_string(), Mode::Readonly)]).unwrap();
        Engine::new(cfg, map)
    }

    fn queued(msgid: i32, op: LdapOp) -> Queued {
        let frame = encode(LdapMsg::new(msgid, op));
        let env = Envelope::request(&frame).unwrap();
        Queued {
            frame,
            env,
            class: Class::NEVER,
            local: None,
        }
    }

    fn bind(msgid: i32) -> Queued {
        queued(
            msgid,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: "cn=a".into(),
                cred: LdapBindCred::Simple("pw".into()),
            }),
        )
    }

    fn del(msgid: i32) -> Queued {
        queued(msgid, LdapOp::DelRequest("cn=a,dc=example,dc=org".into()))
    }

    #[test]
    fn a_queue_keeps_the_engines_totals_and_its_order() {
        let e = engine(FreezeConfig::default());
        let mut a = Queue::default();
        let mut b = Queue::default();
        a.push(del(1), &e);
        a.push(bind(2), &e);
        a.push(del(3), &e);
        b.push(del(1), &e);
        let bytes = a.bytes() + b.bytes();
        assert_eq!(e.queued(), (4, bytes));
        assert_eq!(a.binds(), 1);
        assert!(a.contains(2) && !a.contains(4));
        // Out of the middle (an abandon or a cancel), then in order.
        let two = a.remove(2, &e).unwrap();
        assert_eq!(two.env.msgid, 2);
        assert_eq!(a.binds(), 0);
        assert!(a.remove(2, &e).is_none());
        assert_eq!(a.pop_front(&e).unwrap().env.msgid, 1);
        assert_eq!(a.front().unwrap().env.msgid, 3);
        assert_eq!(e.queued(), (2, a.bytes() + b.bytes()));
        // A session's end discards its queue from the totals.
        assert_eq!(b.clear(&e), 1);
        assert_eq!(a.clear(&e), 1);
        assert_eq!(e.queued(), (0, 0));
        assert!(a.is_empty() && a.bytes() == 0 && a.binds() == 0);
    }

    #[test]
    fn queue_room_per_connection_and_in_total() {
        let e = engine(FreezeConfig {
            queue_max_requests_per_conn: 2,
            queue_max_requests_total: 3,
            ..FreezeConfig::default()
        });
        let mut a = Queue::default();
        a.push(del(1), &e);
        assert!(a.has_room(&e));
        a.push(del(2), &e);
        assert!(!a.has_room(&e), "per connection");
        let mut b = Queue::default();
        b.push(del(1), &e);
        // The total is reached: a session holding requests stops reading,
        // one with nothing queued still reads (an operator's OFF).
        assert!(!b.has_room(&e));
        let c = Queue::default();
        assert!(c.has_room(&e));
        a.pop_front(&e);
        assert!(b.has_room(&e));
        // Bytes per connection.
        let e = engine(FreezeConfig {
            queue_max_bytes_per_conn: 10,
            ..FreezeConfig::default()
        });
        let mut a = Queue::default();
        a.push(del(1), &e);
        assert!(a.bytes() >= 10 && !a.has_room(&e));
    }

    #[test]
    fn suppressed_ids_drop_responses_until_the_final_one_or_reuse() {
        let s = Suppressed::default();
        assert!(!s.any() && !s.drops(1, true));
        s.insert(1);
        s.insert(2);
        assert!(s.drops(1, false), "an entry of the abandoned search");
        assert!(s.drops(1, true), "its final response");
        assert!(!s.drops(1, true), "then the ID is the client's again");
        assert!(!s.contains(1) && s.contains(2) && s.any());
        s.clear();
        assert!(!s.drops(2, false) && !s.contains(2) && !s.any());
    }

    #[test]
    fn held_responses_count_their_bytes() {
        let mut h = HeldResponses::default();
        assert!(h.is_empty() && h.below(1));
        h.push(Bytes::from_static(b"12345"));
        h.push(Bytes::from_static(b"678"));
        assert!(!h.below(8) && h.below(9));
        assert_eq!(&h.pop_front().unwrap()[..], b"12345");
        assert!(h.below(4) && !h.below(3));
        h.pop_front();
        assert!(h.is_empty() && h.pop_front().is_none());
    }

    #[test]
    fn search_ends_with_done_not_entries() {
        let mut t = InFlightTable::default();
        t.start(1, InFlight::new(op::SEARCH_REQUEST, None)).unwrap();
        t.start(2, InFlight::new(op::MODIFY_REQUEST, None)).unwrap();
        assert!(t.response(1, op::SEARCH_RESULT_ENTRY).is_none());
        assert!(t.response(1, op::SEARCH_RESULT_REFERENCE).is_none());
        assert!(t.response(1, op::INTERMEDIATE_RESPONSE).is_none());
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.response(1, op::SEARCH_RESULT_DONE).unwrap().op,
            op::SEARCH_REQUEST
        );
        assert!(t.get(2).is_some());
        assert!(t.abandon(2).is_some());
        assert!(t.is_empty());
        // A late response to an abandoned request is harmless.
        assert!(t.response(2, op::MODIFY_RESPONSE).is_none());
    }

    /// The server may still answer a read whose Abandon it got: until it
    /// is known to be done (the read's final response, or a later bind's),
    /// the ID cannot start another request, whose entry that late response
    /// would otherwise end while the server runs it.
    #[test]
    fn an_abandoned_reads_id_stays_taken_until_the_server_is_done_with_it() {
        let mut t = InFlightTable::default();
        let add = || InFlight::new(op::ADD_REQUEST, None);
        t.start(1, InFlight::new(op::COMPARE_REQUEST, None))
            .unwrap();
        assert_eq!(t.abandon_read(7, 4), AbandonedRead::NotInFlight);
        match t.abandon_read(1, 4) {
            AbandonedRead::Gone(e) => assert_eq!(e.op, op::COMPARE_REQUEST),
            other => panic!("{other:?}"),
        }
        assert!(t.is_empty(), "not outstanding: a bind need not wait for it");
        assert_eq!(t.abandoned_reads(), 1);
        assert!(t.start(1, add()).is_err(), "its ID is still taken");
        assert!(t.taken(1) && !t.taken(7));
        // The compare's late answer: no entry ends, the ID is free again.
        assert!(t.response(1, op::COMPARE_RESPONSE).is_none());
        assert_eq!(t.abandoned_reads(), 0);
        assert!(!t.taken(1));
        t.start(1, add()).unwrap();
        assert!(t.taken(1), "in flight");
        assert_eq!(t.response(1, op::ADD_RESPONSE).unwrap().op, op::ADD_REQUEST);

        // A bind's response frees the IDs of reads abandoned before it.
        t.start(2, InFlight::new(op::SEARCH_REQUEST, None)).unwrap();
        assert!(matches!(t.abandon_read(2, 4), AbandonedRead::Gone(_)));
        t.start(3, InFlight::new(op::BIND_REQUEST, None)).unwrap();
        assert!(t.response(2, op::SEARCH_RESULT_ENTRY).is_none());
        assert_eq!(t.abandoned_reads(), 1, "an entry is not the end");
        assert!(t.response(3, op::BIND_RESPONSE).is_some());
        assert_eq!(t.abandoned_reads(), 0);
        t.start(2, add()).unwrap();

        // At most `max` taken IDs: then the read stays in flight.
        let mut t = InFlightTable::default();
        for id in 1..=3 {
            t.start(id, InFlight::new(op::SEARCH_REQUEST, None))
                .unwrap();
        }
        assert!(matches!(t.abandon_read(1, 2), AbandonedRead::Gone(_)));
        assert!(matches!(t.abandon_read(2, 2), AbandonedRead::Gone(_)));
        assert_eq!(t.abandon_read(3, 2), AbandonedRead::Full);
        assert!(t.get(3).is_some(), "kept in flight, its ID its own");
        assert_eq!(t.abandoned_reads(), 2);
    }

    #[test]
    fn an_entry_is_small() {
        // Moved into the table and out of it once per request.
        assert!(std::mem::size_of::<InFlight>() <= 88);
    }

    /// The first request is kept outside the hash map: every operation
    /// finds it there as in the map, whatever the order.
    #[test]
    fn the_first_request_and_the_others_are_one_table() {
        let mut t = InFlightTable::default();
        let s = || InFlight::new(op::SEARCH_REQUEST, None);
        t.start(1, s()).unwrap();
        t.start(2, s()).unwrap();
        t.start(3, s()).unwrap();
        assert!(t.start(1, s()).is_err() && t.start(3, s()).is_err());
        assert_eq!(t.len(), 3);
        let mut ids: Vec<i32> = t.iter().map(|(id, _)| id).collect();
        ids.sort();
        assert_eq!(ids, [1, 2, 3]);
        t.get_mut(1).unwrap().abandoned = true;
        assert!(t.get(1).unwrap().abandoned);
        assert!(t.response(1, op::SEARCH_RESULT_DONE).is_some());
        assert!(t.get(1).is_none() && t.len() == 2);
        // The first place is free, the map is not empty: 1 goes to the map,
        // and is still refused a second time.
        t.start(1, s()).unwrap();
        assert!(t.start(1, s()).is_err());
        assert!(t.abandon(2).is_some() && t.abandon(2).is_none());
        assert!(matches!(t.abandon_read(3, 4), AbandonedRead::Gone(_)));
        assert!(t.response(1, op::SEARCH_RESULT_DONE).is_some());
        assert!(t.is_empty());
        assert_eq!(t.iter().count(), 0);
        t.start(4, s()).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().next().map(|(id, _)| id), Some(4));
    }

    #[test]
    fn a_reused_id_is_refused_and_the_older_request_stays() {
        let mut t = InFlightTable::default();
        t.start(7, InFlight::new(op::ADD_REQUEST, None)).unwrap();
        let again = t.start(7, InFlight::new(op::SEARCH_REQUEST, None));
        assert_eq!(again.unwrap_err().op, op::SEARCH_REQUEST);
        assert_eq!(t.get(7).unwrap().op, op::ADD_REQUEST, "the write stays");
        assert_eq!(t.len(), 1);
        // Once answered, the ID is free again.
        assert!(t.response(7, op::ADD_RESPONSE).is_some());
        t.start(7, InFlight::new(op::SEARCH_REQUEST, None)).unwrap();
    }
}
