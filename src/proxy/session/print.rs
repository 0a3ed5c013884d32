//! Whether the server a session is carried to is the one it left: its
//! print (the naming contexts of its root DSE and the unique ID of each
//! one's entry) against the one the proxy knew. A server that comes back
//! without a naming context it had, or with another database under one
//! (another `entryUUID` / `nsUniqueId`: a fresh or a foreign database, not
//! a restored copy of the same one), is not the same server: the sessions
//! that knew the old one end with the reason instead of going on against
//! other data. A naming context added meanwhile (a database created during
//! the maintenance) is no difference.

use std::sync::Mutex;

use ldap3_proto::proto::{LdapMsg, LdapOp};

use super::carry::Refused;
use super::{lock, UpIn, UpOut};
use crate::freeze::dn::NormDn;
use crate::wire::{op, pdu, Envelope};

/// Message IDs of the proxy's searches on a new connection (below the
/// Who am I?'s; nothing of the client's is outstanding there yet).
const ROOT_DSE_ID: i32 = i32::MAX - 2;
/// The first naming context's search; the others count down from it.
const CONTEXT_ID: i32 = i32::MAX - 3;
/// Naming contexts read per print (a server lists a handful).
const MAX_CONTEXTS: usize = 64;
/// Largest entry read for a print.
const MAX_ENTRY: usize = 1 << 20;

/// What identifies a server's data: its naming contexts, each with the
/// unique ID of its entry when the reader could see one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerPrint {
    /// (normalised naming context as written by the server, unique ID).
    contexts: Vec<(String, Option<String>)>,
}

impl ServerPrint {
    /// Why `now` is not the server `self` was, if it is not.
    fn differs(&self, now: &ServerPrint) -> Option<String> {
        for (nc, id) in &self.contexts {
            let want = norm(nc);
            let Some((_, id_now)) = now.contexts.iter().find(|(n, _)| norm(n) == want) else {
                return Some(format!("its naming context {nc} is gone"));
            };
            if let (Some(a), Some(b)) = (id, id_now) {
                if !a.eq_ignore_ascii_case(b) {
                    return Some(format!(
                        "another database holds {nc} (its entry's unique ID was {a}, now {b})"
                    ));
                }
            }
        }
        None
    }

    /// Adds what `now` saw and `self` did not (naming contexts added, IDs
    /// another reader could see).
    fn merge(&mut self, now: ServerPrint) {
        for (nc, id) in now.contexts {
            let n = norm(&nc);
            match self.contexts.iter_mut().find(|(m, _)| norm(m) == n) {
                Some((_, known)) if known.is_none() => *known = id,
                Some(_) => {}
                None => self.contexts.push((nc, id)),
            }
        }
    }
}

fn norm(dn: &str) -> String {
    NormDn::parse(dn.as_bytes())
        .map(|d| d.to_string())
        .unwrap_or_else(|| dn.to_ascii_lowercase())
}

/// The print of the server the proxy knows, and how many times it has seen
/// it change: a session carried to a server whose print is of another
/// generation than the one it started on is not carried.
#[derive(Debug, Default)]
pub(crate) struct Prints {
    inner: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    generation: u64,
    print: Option<ServerPrint>,
    /// Why the print last changed.
    why: String,
}

impl Prints {
    /// The generation of the server sessions starting now talk to.
    pub(crate) fn generation(&self) -> u64 {
        lock(&self.inner).generation
    }

    /// A print read from the server just now: its generation, and why it
    /// differs from the last one, if it does.
    pub(crate) fn observe(&self, now: ServerPrint) -> (u64, String) {
        let mut k = lock(&self.inner);
        match k.print.as_mut() {
            None => k.print = Some(now),
            Some(known) => match known.differs(&now) {
                None => known.merge(now),
                Some(why) => {
                    k.generation += 1;
                    k.print = Some(now);
                    k.why = why;
                }
            },
        }
        (k.generation, k.why.clone())
    }
}

/// Reads the server's print on a connection (as whoever it is bound as):
/// its root DSE's naming contexts, then each one's entry, pipelined.
pub(super) async fn read(up_in: &mut UpIn, up_out: &mut UpOut) -> Result<ServerPrint, Refused> {
    let root = pdu::base_search(ROOT_DSE_ID, "", &["namingContexts"]);
    up_out.append_always(&root);
    flush(up_out).await?;
    let (entry, code) = answers(up_in, &[ROOT_DSE_ID]).await?.remove(0);
    if code != 0 {
        return Err(Refused::Differs(format!(
            "the server refused to show its root DSE (result {code}): it cannot be told from \
             another"
        )));
    }
    let contexts: Vec<String> = entry
        .into_iter()
        .filter(|(a, _)| a.eq_ignore_ascii_case("namingContexts"))
        .flat_map(|(_, v)| v)
        .take(MAX_CONTEXTS)
        .collect();
    let ids: Vec<i32> = (0..contexts.len()).map(|i| CONTEXT_ID - i as i32).collect();
    for (nc, id) in contexts.iter().zip(&ids) {
        up_out.append_always(&pdu::base_search(*id, nc, &["entryUUID", "nsUniqueId"]));
    }
    flush(up_out).await?;
    let found = answers(up_in, &ids).await?;
    let mut print = ServerPrint::default();
    for (nc, (entry, code)) in contexts.into_iter().zip(found) {
        // An entry the reader may not see, or that does not exist (a
        // context whose entry was never added): no ID to compare.
        let id = (code == 0)
            .then(|| {
                ["entryUUID", "nsUniqueId"].iter().find_map(|want| {
                    entry
                        .iter()
                        .find(|(a, _)| a.eq_ignore_ascii_case(want))
                        .and_then(|(_, v)| v.first().cloned())
                })
            })
            .flatten();
        print.contexts.push((nc, id));
    }
    Ok(print)
}

async fn flush(up_out: &mut UpOut) -> Result<(), Refused> {
    up_out
        .flush()
        .await
        .map_err(|e| Refused::Lost(e.to_string()))
}

/// Attributes of an entry, by name.
type Attrs = Vec<(String, Vec<String>)>;

/// The answers of the base searches `ids` (sent together: the server may
/// answer them in any order), in the order of `ids`: the attributes of each
/// one's entry (none if it returned none) and its result code.
async fn answers(up_in: &mut UpIn, ids: &[i32]) -> Result<Vec<(Attrs, i64)>, Refused> {
    let mut found: Vec<(Attrs, Option<i64>)> = ids.iter().map(|_| (Vec::new(), None)).collect();
    while found.iter().any(|(_, code)| code.is_none()) {
        let n = match up_in.next_message().await {
            Ok(Some(n)) => n,
            Ok(None) => return Err(Refused::Lost("the server closed the connection".into())),
            Err(e) => return Err(Refused::Lost(e.to_string())),
        };
        let frame = up_in.take(n);
        let env = Envelope::response(&frame).map_err(|e| Refused::Lost(e.to_string()))?;
        let Some(i) = ids.iter().position(|id| *id == env.msgid) else {
            return Err(Refused::Lost(format!(
                "unexpected message (ID {}, {}) on the new connection",
                env.msgid,
                op::name(env.op)
            )));
        };
        match env.op {
            op::SEARCH_RESULT_ENTRY if frame.len() <= MAX_ENTRY => {
                if let Ok(LdapMsg {
                    op: LdapOp::SearchResultEntry(e),
                    ..
                }) = decode(&frame)
                {
                    found[i].0.extend(e.attributes.into_iter().map(|a| {
                        let vals = a
                            .vals
                            .iter()
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .collect();
                        (a.atype, vals)
                    }));
                }
            }
            op::SEARCH_RESULT_DONE => found[i].1 = Some(env.result_code.unwrap_or(-1)),
            // References, oversized entries: nothing to read.
            _ => {}
        }
    }
    Ok(found
        .into_iter()
        .map(|(attrs, code)| (attrs, code.unwrap_or(-1)))
        .collect())
}

fn decode(frame: &[u8]) -> Result<LdapMsg, String> {
    use tokio_util::codec::Decoder;
    let mut buf = bytes::BytesMut::from(frame);
    ldap3_proto::LdapCodec::new(Some(MAX_ENTRY), None)
        .decode(&mut buf)
        .map_err(|e| format!("{e:?}"))?
        .ok_or_else(|| "incomplete entry".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(contexts: &[(&str, Option<&str>)]) -> ServerPrint {
        ServerPrint {
            contexts: contexts
                .iter()
                .map(|(n, id)| (n.to_string(), id.map(str::to_string)))
                .collect(),
        }
    }

    #[test]
    fn the_same_data_restored_or_a_context_added_is_the_same_server() {
        let before = print(&[
            ("dc=example,dc=org", Some("uuid-1")),
            ("dc=other,dc=org", None),
        ]);
        // Spelled otherwise, an ID now visible, a context added.
        let after = print(&[
            ("DC=Example, DC=Org", Some("UUID-1")),
            ("dc=other,dc=org", Some("uuid-2")),
            ("dc=new,dc=org", Some("uuid-3")),
        ]);
        assert_eq!(before.differs(&after), None);
    }

    #[test]
    fn another_database_or_a_context_gone_is_another_server() {
        let before = print(&[
            ("dc=example,dc=org", Some("uuid-1")),
            ("dc=other,dc=org", None),
        ]);
        let why = before
            .differs(&print(&[
                ("dc=example,dc=org", Some("uuid-9")),
                ("dc=other,dc=org", None),
            ]))
            .unwrap();
        assert!(
            why.contains("another database holds dc=example,dc=org"),
            "{why}"
        );
        let why = before
            .differs(&print(&[("dc=example,dc=org", Some("uuid-1"))]))
            .unwrap();
        assert!(why.contains("dc=other,dc=org is gone"), "{why}");
    }

    #[test]
    fn generations_count_changes_and_what_is_learnt_is_kept() {
        let p = Prints::default();
        assert_eq!(p.generation(), 0);
        // The first print read is the known one.
        assert_eq!(p.observe(print(&[("dc=a", None)])).0, 0);
        // Learnt: the ID another reader sees.
        assert_eq!(p.observe(print(&[("dc=a", Some("u1"))])).0, 0);
        // Then another database under dc=a: a new generation, with why.
        let (g, why) = p.observe(print(&[("dc=a", Some("u2"))]));
        assert_eq!(g, 1);
        assert!(why.contains("was u1, now u2"), "{why}");
        assert_eq!(p.observe(print(&[("dc=a", Some("u2"))])).0, 1);
    }
}
