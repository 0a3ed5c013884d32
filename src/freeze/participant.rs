//! What a session shares with the freeze engine: its in-flight table (which
//! requests have been sent upstream and not yet answered with a final
//! response; the engine reads it to know when a drain is complete) and its
//! identity (the bound DN, by which the engine classifies and authorises).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Class;
use crate::wire::op;

/// One outstanding request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// protocolOp identifier octet of the request.
    pub op: u8,
    /// When it was sent upstream.
    pub started: Instant,
    /// A SASL bind (its success may install a security layer).
    pub sasl_bind: bool,
    /// A persistent search (syncrepl refreshAndPersist or the persistent
    /// search control): never completes by itself.
    pub persistent: bool,
    /// A base search of the root DSE (its entry gets the proxy's OIDs).
    pub root_dse: bool,
    /// Where the name of a simple bind is in `request` (it becomes the
    /// session's identity on success): see [`InFlight::bind_dn`].
    pub bind_dn_span: Option<std::ops::Range<u32>>,
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
}

impl InFlight {
    /// A request of operation `op` starting now.
    pub fn new(op: u8, class: Option<Class>) -> Self {
        InFlight {
            op,
            started: Instant::now(),
            sasl_bind: false,
            persistent: false,
            root_dse: false,
            bind_dn_span: None,
            class,
            abandoned: false,
            request: None,
        }
    }

    /// The name of a simple bind.
    pub fn bind_dn(&self) -> Option<&[u8]> {
        let r = self.bind_dn_span.as_ref()?;
        self.request
            .as_deref()?
            .get(r.start as usize..r.end as usize)
    }

    /// Time since it was sent.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Outstanding requests of one client connection, by message ID. Hashed
/// with foldhash (seeded per process) rather than SipHash: an insert and a
/// remove per request, where SipHash cost about 3 % of all the proxy's
/// instructions per operation (callgrind); a client choosing colliding IDs
/// only slows its own table, which `max_outstanding_per_conn` bounds.
#[derive(Debug, Default)]
pub struct InFlightTable {
    ops: HashMap<i32, InFlight, foldhash::fast::RandomState>,
}

impl InFlightTable {
    /// Records a request sent upstream. A request reusing the ID of an
    /// outstanding one (RFC 4511 section 4.1.1.1 forbids it) is refused and
    /// handed back: the older entry stays, so nothing the server may still
    /// be running leaves the table (the drain counts it) and no identity is
    /// taken from a response meant for another request.
    pub fn start(&mut self, msgid: i32, entry: InFlight) -> Result<(), InFlight> {
        match self.ops.entry(msgid) {
            std::collections::hash_map::Entry::Occupied(_) => Err(entry),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
                Ok(())
            }
        }
    }

    /// Handles a response: a final response ends its request, which is
    /// returned. Entries, references and intermediate responses do not.
    pub fn response(&mut self, msgid: i32, response_op: u8) -> Option<InFlight> {
        if op::is_final_response(response_op) {
            self.ops.remove(&msgid)
        } else {
            None
        }
    }

    /// An abandon request: the abandoned operation gets no response.
    pub fn abandon(&mut self, msgid: i32) -> Option<InFlight> {
        self.ops.remove(&msgid)
    }

    /// The request with this ID, if outstanding.
    pub fn get(&self, msgid: i32) -> Option<&InFlight> {
        self.ops.get(&msgid)
    }

    /// The request with this ID, to mark it.
    pub fn get_mut(&mut self, msgid: i32) -> Option<&mut InFlight> {
        self.ops.get_mut(&msgid)
    }

    /// Number of outstanding requests.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Outstanding requests, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &InFlight)> {
        self.ops.iter().map(|(k, v)| (*k, v))
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
