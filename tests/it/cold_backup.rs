//! Cold backups and restores behind the proxy: during a `stop`-mode freeze
//! slapd is stopped (SIGTERM), its database copied, or an older copy put
//! back, and started again on the same URL, while clients keep their
//! connections and see nothing of it. And the cold-backup, restart and
//! restore recipes of docs/recipes.md, run as written through the real
//! `abproxy` binary.
//!
//! No SASL EXTERNAL client takes part: the proxy refuses a client's SASL
//! EXTERNAL wherever the server would authenticate the proxy itself (its
//! own TCP or TLS connection, not the client's), so there is no EXTERNAL
//! session through the proxy to carry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::Mode;
use abproxy::wire::{op, Envelope};
use abproxy_proto::AllowBackupRequest;
use bytes::BytesMut;
use ldap3_proto::proto::{LdapMsg, LdapOp};
use testkit::{user_dn, user_pw, SlapdOptions, ADMIN_DN, ADMIN_PW};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::pipe;
use tokio::task::{block_in_place, JoinHandle};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::support::freeze::*;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");
const SUFFIX: &str = "dc=example,dc=org";
/// Where the writers add their entries (users may add there).
const CONTAINER: &str = "ou=cold,dc=example,dc=org";
const WHOAMI: &str = "1.3.6.1.4.1.4203.1.11.3";
/// Clients bound as users 1..=WRITERS, each writing and reading back.
const WRITERS: usize = 12;
/// Anonymous clients, reading.
const READERS: usize = 4;
const CLIENTS: usize = WRITERS + READERS;
/// Loops every client completes before and after each freeze.
const LOOPS: usize = 5;
/// The operator the recipes bind as.
const BACKUP_DN: &str = "cn=backup,dc=example,dc=org";
const BACKUP_PW: &str = "backup-secret";

/// slapd (NoSync) with `dc=example,dc=org` in `stop` mode behind the proxy
/// (sessions carried, the default); `ou=cold` where users may add entries,
/// and the operator `cn=backup`.
async fn cold_lab() -> Lab {
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c: &mut Config| {
            c.freeze.allowed = vec![ADMIN_DN.into(), BACKUP_DN.into()];
            c.backends = vec![BackendConfig::new(SUFFIX, Mode::Stop)];
            c.upstream_retry_secs = 20;
        },
    )
    .await;
    // Users may add and change entries under the container (slapd's own
    // rules let them write only their own entry).
    let acl = format!(
        "dn: olcDatabase={{1}}mdb,cn=config\nchangetype: modify\nadd: olcAccess\n\
         olcAccess: {{1}}to dn.subtree=\"{CONTAINER}\" by users write by * read\n"
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
        Some(&acl),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let ldif = format!(
        "dn: {CONTAINER}\nobjectClass: organizationalUnit\nou: cold\n\n\
         dn: {BACKUP_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n\
         cn: backup\nuserPassword: {BACKUP_PW}\n"
    );
    let out = ldap_tool(
        "ldapadd",
        &["-x", "-H", &lab.direct(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    lab
}

/// A frame decoded with ldap3_proto.
fn decode(frame: &[u8]) -> LdapMsg {
    ldap3_proto::LdapCodec::new(Some(1 << 24), None)
        .decode(&mut BytesMut::from(frame))
        .unwrap()
        .expect("a whole message")
}

/// What a frame the client did not expect is (a notice, another answer).
fn describe(frame: &[u8]) -> String {
    let env = Envelope::response(frame).unwrap();
    if op::is_final_response(env.op) {
        format!("message {}: {:?}", env.msgid, outcome(frame))
    } else {
        format!("message {}: {:?}", env.msgid, decode(frame).op)
    }
}

/// Sends `msg` and reads its answer, which must be a success with nothing
/// else in between (no notice, nothing for another message); the search
/// entries before the final response.
async fn answered(c: &mut RawConn, msg: LdapMsg, who: &str) -> Vec<LdapMsg> {
    let id = msg.msgid;
    c.send_msg(msg).await;
    let mut entries = Vec::new();
    loop {
        let frame = c
            .recv()
            .await
            .unwrap_or_else(|| panic!("{who}: the connection closed before answer {id}"));
        let env = Envelope::response(&frame).unwrap();
        assert_eq!(env.msgid, id, "{who}: unexpected {}", describe(&frame));
        if op::is_final_response(env.op) {
            assert_eq!(env.result_code, Some(0), "{who}: {}", describe(&frame));
            return entries;
        }
        entries.push(decode(&frame));
    }
}

/// Who the server says this connection is, asked through the proxy.
async fn whoami(c: &mut RawConn, id: i32, who: &str) -> String {
    c.send_msg(exop(id, WHOAMI, None)).await;
    let frame = c.recv().await.expect("a Who am I? answer");
    let env = Envelope::response(&frame).unwrap();
    assert_eq!(env.msgid, id, "{who}: unexpected {}", describe(&frame));
    assert_eq!(env.result_code, Some(0), "{who}: {}", describe(&frame));
    String::from_utf8_lossy(env.value_bytes(&frame).unwrap_or_default()).into_owned()
}

/// The values of `attr` in the search entries `entries`.
fn values(entries: &[LdapMsg], attr: &str) -> Vec<String> {
    entries
        .iter()
        .filter_map(|m| match &m.op {
            LdapOp::SearchResultEntry(e) => Some(e),
            _ => None,
        })
        .flat_map(|e| &e.attributes)
        .filter(|a| a.atype.eq_ignore_ascii_case(attr))
        .flat_map(|a| &a.vals)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// One acknowledged write of a writer: its `description` set to `w-K-N`,
/// or `cn=cK-N` added under the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Desc(u32),
    Add(u32),
}

/// What a client did.
struct Report {
    /// Bound as this user; None: anonymous.
    user: Option<usize>,
    /// Who am I? before the freeze and at the end.
    before: String,
    after: String,
    /// Its acknowledged writes, in order.
    writes: Vec<Write>,
    /// A writer's reads of its own entry that did not return the value it
    /// had just written: (N, the value read). Only a restore between the
    /// write and the read explains one.
    stale_reads: Vec<(u32, String)>,
}

/// One client's loop, until `stop`: a writer sets its description, adds an
/// entry and reads its own entry back (the new value); a reader reads a
/// user's entry. Every request must succeed; panics otherwise.
async fn client(
    addr: String,
    user: Option<usize>,
    slot: usize,
    done: Arc<Vec<AtomicUsize>>,
    stop: CancellationToken,
) -> Report {
    let who = match user {
        Some(k) => format!("writer {k}"),
        None => format!("anonymous reader {slot}"),
    };
    let mut c = match user {
        Some(k) => bound_at(&addr, &user_dn(k), &user_pw(k)).await,
        None => RawConn::connect(&addr).await,
    };
    let mut id = 1;
    let mut next = || {
        id += 1;
        id
    };
    let before = whoami(&mut c, next(), &who).await;
    let mut writes = Vec::new();
    let mut stale_reads = Vec::new();
    let mut n = 0u32;
    while !stop.is_cancelled() {
        n += 1;
        match user {
            Some(k) => {
                let value = format!("w-{k}-{n}");
                answered(
                    &mut c,
                    modify(next(), &user_dn(k), "description", &value),
                    &who,
                )
                .await;
                writes.push(Write::Desc(n));
                let cn = format!("c{k}-{n}");
                answered(
                    &mut c,
                    add(next(), &format!("cn={cn},{CONTAINER}"), &cn),
                    &who,
                )
                .await;
                writes.push(Write::Add(n));
                let read = search(next(), &user_dn(k), 0, "(objectClass=*)", &["description"]);
                let entries = answered(&mut c, read, &who).await;
                let got = values(&entries, "description");
                assert_eq!(got.len(), 1, "{who}: {got:?}");
                if got[0] != value {
                    stale_reads.push((n, got[0].clone()));
                }
            }
            None => {
                let u = n as usize % 100 + 1;
                let read = search(next(), &user_dn(u), 0, "(objectClass=*)", &["uid"]);
                let entries = answered(&mut c, read, &who).await;
                assert_eq!(values(&entries, "uid"), [format!("user{u}")], "{who}");
            }
        }
        done[slot].fetch_add(1, Ordering::SeqCst);
    }
    let after = whoami(&mut c, next(), &who).await;
    Report {
        user,
        before,
        after,
        writes,
        stale_reads,
    }
}

/// The 16 clients, each on its own connection through the proxy.
struct Clients {
    stop: CancellationToken,
    /// Loops each client completed.
    done: Arc<Vec<AtomicUsize>>,
    handles: Vec<JoinHandle<Report>>,
}

impl Clients {
    fn start(addr: &str) -> Clients {
        let stop = CancellationToken::new();
        let done: Arc<Vec<AtomicUsize>> =
            Arc::new((0..CLIENTS).map(|_| AtomicUsize::new(0)).collect());
        let handles = (0..CLIENTS)
            .map(|slot| {
                let user = (slot < WRITERS).then_some(slot + 1);
                tokio::spawn(client(
                    addr.to_string(),
                    user,
                    slot,
                    done.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Clients {
            stop,
            done,
            handles,
        }
    }

    fn counts(&self) -> Vec<usize> {
        self.done.iter().map(|d| d.load(Ordering::SeqCst)).collect()
    }

    /// Waits (at most 30 s) until every client completed `more` loops after
    /// `from` (an earlier [`Clients::counts`]); a client that failed fails
    /// the test with its own message.
    async fn progress(&mut self, from: &[usize], more: usize, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.counts();
            if now.iter().zip(from).all(|(n, f)| *n >= f + more) {
                return;
            }
            if let Some(h) = self.handles.iter_mut().find(|h| h.is_finished()) {
                h.await.expect("a client failed");
                panic!("a client stopped early");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress {what}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients; their reports.
    async fn finish(self) -> Vec<Report> {
        self.stop.cancel();
        let mut out = Vec::new();
        for h in self.handles {
            out.push(
                tokio::time::timeout(Duration::from_secs(30), h)
                    .await
                    .expect("clients stop")
                    .expect("no client saw an error"),
            );
        }
        out
    }
}

/// slapcat of `dc=example,dc=org` (off the runtime: it blocks).
fn dump(lab: &Lab) -> String {
    block_in_place(|| lab.slapd.slapcat(SUFFIX)).expect("slapcat")
}

/// The entries of an LDIF dump: first line (`dn: ...`) -> whole entry.
fn entries(ldif: &str) -> BTreeMap<&str, &str> {
    ldif.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| (e.lines().next().unwrap(), e))
        .collect()
}

/// The value of `attr` in an LDIF entry (one plain value).
fn attr<'a>(entry: &'a str, name: &str) -> Option<&'a str> {
    entry
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// Writer `k`'s data in a dump: its added entries (N -> entryCSN), its
/// description and its entry's entryCSN.
struct Written {
    adds: BTreeMap<u32, String>,
    desc: String,
    desc_csn: String,
}

fn written(ldif: &str, k: usize) -> Written {
    let all = entries(ldif);
    let prefix = format!("dn: cn=c{k}-");
    let suffix = format!(",{CONTAINER}");
    let adds = all
        .iter()
        .filter_map(|(dn, e)| {
            let n = dn.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            Some((n.parse().unwrap(), attr(e, "entryCSN").unwrap().to_string()))
        })
        .collect();
    let me = all[format!("dn: {}", user_dn(k)).as_str()];
    Written {
        adds,
        desc: attr(me, "description").unwrap().to_string(),
        desc_csn: attr(me, "entryCSN").unwrap().to_string(),
    }
}

/// Every writer's acknowledged writes are on the live server once and in
/// its order, and nothing else of it: its added entries are exactly the
/// acknowledged ones but `lost` (taken back by a restore), in the order
/// acknowledged (entryCSN); its description is the last acknowledged one,
/// written between the adds acknowledged around it. Every client has the
/// identity it had before.
fn check(reports: &[Report], live: &str, lost: &BTreeMap<usize, BTreeSet<u32>>) {
    assert_eq!(reports.len(), CLIENTS);
    for r in reports {
        assert_eq!(r.before, r.after, "the same identity before and after");
        if lost.is_empty() {
            assert_eq!(r.stale_reads, [], "{:?} reads its own writes", r.user);
        }
        let Some(k) = r.user else {
            assert_eq!(r.before, "", "anonymous");
            continue;
        };
        assert_eq!(r.before, format!("dn:{}", user_dn(k)));
        let w = written(live, k);
        let none = BTreeSet::new();
        let lost = lost.get(&k).unwrap_or(&none);
        let adds: Vec<u32> = r
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Add(n) if !lost.contains(n) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(
            w.adds.keys().copied().collect::<Vec<_>>(),
            adds.iter()
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            "writer {k}: the entries added are the acknowledged ones"
        );
        for pair in adds.windows(2) {
            assert!(
                w.adds[&pair[0]] < w.adds[&pair[1]],
                "writer {k}: cn=c{k}-{} applied before cn=c{k}-{}",
                pair[1],
                pair[0]
            );
        }
        let m = r
            .writes
            .iter()
            .rev()
            .find_map(|w| match w {
                Write::Desc(n) => Some(*n),
                _ => None,
            })
            .expect("a write");
        assert_eq!(w.desc, format!("w-{k}-{m}"), "writer {k}: the last write");
        if let Some(csn) = w.adds.get(&(m - 1)) {
            assert!(
                w.desc_csn > *csn,
                "writer {k}: w-{k}-{m} before c{k}-{}",
                m - 1
            );
        }
        if let Some(csn) = w.adds.get(&m) {
            assert!(w.desc_csn < *csn, "writer {k}: w-{k}-{m} after c{k}-{m}");
        }
    }
}

/// A copy of `dc=example,dc=org`'s database directory, started as a slapd
/// of its own: its dump.
async fn dump_of_copy(db: &Path) -> String {
    let copy = start_slapd(SlapdOptions {
        restore_example: Some(db.to_path_buf()),
        nosync: true,
        users: 1,
        ..Default::default()
    })
    .await;
    let out = block_in_place(|| copy.slapcat(SUFFIX)).expect("slapcat of the copy");
    block_in_place(|| drop(copy));
    out
}

/// Two dumps are the same, byte for byte.
fn assert_same_dump(expected: &str, got: &str, what: &str) {
    assert!(expected == got, "{what}:\n{}", diff(expected, got));
}

/// A cold copy holds exactly the data the live server held at the freeze:
/// `at_freeze` is slapcat's dump taken during the freeze while slapd ran,
/// `served_csn` the suffix's contextCSN slapd served then. One value
/// legitimately differs: syncprov keeps the suffix's contextCSN in memory
/// and writes it into the suffix entry when slapd stops (otherwise only
/// every `olcSpCheckpoint` 100 writes or 10 minutes), so the database of a
/// stopped slapd holds the contextCSN it served, which the dump of the
/// running one may not have had on disk yet. Everything else is equal byte
/// for byte, and the copy's contextCSN is the one served at the freeze.
fn assert_cold_copy(at_freeze: &str, served_csn: &str, copy: &str) {
    let suffix = format!("dn: {SUFFIX}\n");
    let without_csn = |ldif: &str| -> String {
        ldif.split("\n\n")
            .map(|e| {
                if e.starts_with(&suffix) {
                    let kept: Vec<&str> = e
                        .lines()
                        .filter(|l| !l.starts_with("contextCSN:"))
                        .collect();
                    kept.join("\n")
                } else {
                    e.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n\n")
    };
    assert_same_dump(
        &without_csn(at_freeze),
        &without_csn(copy),
        "the copy differs from the data at the freeze",
    );
    let suffix_entry = entries(copy)[suffix.trim_end()];
    let copy_csn: Vec<&str> = suffix_entry
        .lines()
        .filter(|l| l.starts_with("contextCSN:"))
        .collect();
    assert_eq!(copy_csn.join("\n"), served_csn, "the copy's contextCSN");
}

/// The entries that differ between two dumps, for failure messages.
fn diff(a: &str, b: &str) -> String {
    let (a, b) = (entries(a), entries(b));
    let dns: BTreeSet<&str> = a.keys().chain(b.keys()).copied().collect();
    dns.into_iter()
        .filter(|dn| a.get(dn) != b.get(dn))
        .map(|dn| format!("-{:?}\n+{:?}", a.get(dn), b.get(dn)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cp -a FROM TO` (a database directory, while slapd is stopped).
fn cp_a(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "cp -a: {out:?}");
}

fn db_dir(lab: &Lab) -> PathBuf {
    lab.slapd.dir().join("db-example")
}

/// Every session waits for the server after slapd stopped (none told).
async fn wait_sessions_waiting(lab: &Lab, n: usize) {
    let engine = lab.proxy.engine();
    let what = format!("{n} sessions waiting for the server");
    wait_until(&what, 10, || engine.carry_counts().0 == n).await;
}

/// ON through the proxy on `op`; then every client's next request is held.
async fn freeze(lab: &Lab, op: &mut RawConn, id: i32) {
    let (code, text) = call(op, ab(id, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{text}");
    let engine = lab.proxy.engine();
    wait_until("every client held", 20, || engine.queued().0 == CLIENTS).await;
}

/// OFF on `op`: the proxy answers once slapd answers again, and every
/// session (the clients' and the operator's) goes on.
async fn release(op: &mut RawConn, id: i32) {
    let (code, text) = call(op, ab(id, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    let go_on = format!("answers again: {} session(s) go on", CLIENTS + 1);
    assert!(text.contains(&go_on), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_backup_under_sixteen_clients_shows_them_nothing() {
    let mut lab = cold_lab().await;
    let engine = lab.proxy.engine();
    let backup = tempfile::tempdir().unwrap();
    let mut clients = Clients::start(&lab.proxy_addr());
    clients
        .progress(&[0; CLIENTS], LOOPS, "before the freeze")
        .await;

    // The operator freezes; the data at the freeze.
    let mut op = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    freeze(&lab, &mut op, 2).await;
    let at_freeze = dump(&lab);
    let served_csn = context_csn(&lab, SUFFIX).await;
    assert!(written(&at_freeze, 1).adds.len() >= LOOPS);

    // slapd stops (SIGTERM): every connection to it closes, every session
    // waits; the database is copied; slapd starts again on the same URL.
    let held = clients.counts();
    block_in_place(|| lab.slapd.stop()).unwrap();
    wait_sessions_waiting(&lab, CLIENTS + 1).await;
    let copy = backup.path().join("db");
    cp_a(&db_dir(&lab), &copy);
    block_in_place(|| lab.slapd.restart()).expect("slapd starts again");
    assert_eq!(clients.counts(), held, "nothing answered during the freeze");
    assert_eq!(engine.carry_counts(), (CLIENTS + 1, 0, 0));

    // OFF: every client goes on, on a new connection with its identity.
    release(&mut op, 3).await;
    clients.progress(&held, LOOPS, "after the freeze").await;
    let reports = clients.finish().await;
    assert_eq!(
        whoami(&mut op, 4, "operator").await,
        format!("dn:{ADMIN_DN}")
    );
    let counts = lab.proxy.engine();
    let what = format!("every session carried ({:?})", engine.carry_counts());
    wait_until(&what, 10, || counts.carry_counts() == (0, CLIENTS + 1, 0)).await;
    check(&reports, &dump(&lab), &BTreeMap::new());

    // The copy, started as a slapd of its own, holds the data at the freeze.
    assert_cold_copy(&at_freeze, &served_csn, &dump_of_copy(&copy).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_under_sixteen_clients_takes_back_what_came_after_the_copy() {
    let mut lab = cold_lab().await;
    let backup = tempfile::tempdir().unwrap();
    let mut clients = Clients::start(&lab.proxy_addr());
    clients
        .progress(&[0; CLIENTS], LOOPS, "before the first freeze")
        .await;
    let mut op = bound(&lab, ADMIN_DN, ADMIN_PW).await;

    // An older copy: in a first freeze, slapd's data.mdb copied while it
    // runs (nothing reaches it in a stop freeze).
    freeze(&lab, &mut op, 2).await;
    let at_copy = dump(&lab);
    let older = backup.path().join("older");
    cp_a(&db_dir(&lab), &older);
    let (code, text) = call(&mut op, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    let from = clients.counts();
    clients.progress(&from, LOOPS, "after the copy").await;

    // Later, the restore: in a second freeze slapd stops, the older copy
    // is put back in its place, slapd starts again.
    freeze(&lab, &mut op, 4).await;
    let at_restore = dump(&lab);
    let held = clients.counts();
    block_in_place(|| lab.slapd.stop()).unwrap();
    wait_sessions_waiting(&lab, CLIENTS + 1).await;
    let db = db_dir(&lab);
    std::fs::remove_file(db.join("lock.mdb")).unwrap();
    let out = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(older.join("data.mdb"))
        .arg(db.join("data.mdb"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    block_in_place(|| lab.slapd.restart()).expect("slapd starts again");
    // What slapd serves now is the older copy.
    assert_same_dump(&at_copy, &dump(&lab), "slapd serves the older copy");
    assert_eq!(clients.counts(), held, "nothing answered during the freeze");

    release(&mut op, 5).await;
    clients.progress(&held, LOOPS, "after the restore").await;
    let reports = clients.finish().await;
    let live = dump(&lab);

    // Taken back: what was added between the copy and the restore.
    let mut lost = BTreeMap::new();
    for k in 1..=WRITERS {
        let (then, now) = (written(&at_copy, k), written(&at_restore, k));
        let gone: BTreeSet<u32> = now
            .adds
            .keys()
            .filter(|n| !then.adds.contains_key(n))
            .copied()
            .collect();
        assert!(!gone.is_empty(), "writer {k} added entries after the copy");
        let live_adds = written(&live, k).adds;
        for n in &gone {
            assert!(
                !live_adds.contains_key(n),
                "cn=c{k}-{n} (after the copy) survived the restore"
            );
        }
        lost.insert(k, gone);
    }
    // A writer whose read of its own entry was held across the restore
    // read the older copy's value (its write came after the copy), once.
    for r in &reports {
        if let Some(k) = r.user {
            let older = written(&at_copy, k).desc;
            assert!(r.stale_reads.len() <= 1, "writer {k}: {:?}", r.stale_reads);
            for (n, got) in &r.stale_reads {
                assert_eq!(*got, older, "writer {k}: read {n}");
            }
        }
    }
    check(&reports, &live, &lost);
}

/// The `systemctl` the recipes find first on PATH: it asks the test (over
/// a FIFO) to do what it was asked to the test's slapd, and exits with the
/// test's answer.
struct Systemctl {
    dir: tempfile::TempDir,
    requests: Lines<BufReader<pipe::Receiver>>,
}

impl Systemctl {
    fn new() -> Systemctl {
        let dir = tempfile::Builder::new()
            .prefix("abp-ctl")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display();
        for fifo in ["request", "reply"] {
            let out = std::process::Command::new("mkfifo")
                .arg(dir.path().join(fifo))
                .output()
                .unwrap();
            assert!(out.status.success(), "mkfifo: {out:?}");
        }
        // The reply FIFO is opened (read and write: no wait) before the
        // request is written, so the test's answer cannot be missed.
        let script = format!(
            "#!/bin/sh\nexec 3<>'{d}/reply'\necho \"$*\" > '{d}/request'\n\
             answer=$(timeout 30 head -n 1 <&3) || exit 1\nexit \"$answer\"\n"
        );
        let path = dir.path().join("systemctl");
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Read and write: the FIFO never reads as closed between requests.
        let rx = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(dir.path().join("request"))
            .unwrap();
        Systemctl {
            dir,
            requests: BufReader::new(rx).lines(),
        }
    }

    async fn reply(&self, ok: bool) {
        let mut tx = pipe::OpenOptions::new()
            .open_sender(self.dir.path().join("reply"))
            .expect("systemctl waits for its answer");
        tx.write_all(if ok { b"0\n" } else { b"1\n" })
            .await
            .unwrap();
    }
}

/// The recipes' variables (docs/recipes.md's `settings`) for this lab, and
/// PATH with the test's `systemctl` first, then `abproxy`.
fn recipe_env(lab: &Lab, backup: &Path, systemctl: &Systemctl) -> Vec<(String, String)> {
    let bin_dir = Path::new(BIN).parent().unwrap().display();
    let path = format!(
        "{}:{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        systemctl.dir.path().display()
    );
    [
        ("ABPROXY_URL", lab.proxied()),
        ("ABPROXY_BIND_DN", BACKUP_DN.to_string()),
        ("ABPROXY_PASSWORD", BACKUP_PW.to_string()),
        (
            "SLAPD_D",
            lab.slapd.dir().join("slapd.d").display().to_string(),
        ),
        ("DB", db_dir(lab).display().to_string()),
        ("BACKUP", backup.display().to_string()),
        ("PATH", path),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What a recipe run did.
struct Ran {
    out: ToolOutput,
    /// What it asked systemctl, in order.
    asked: Vec<String>,
    /// The data when it first stopped slapd, and the contextCSN slapd
    /// served then.
    at_stop: String,
    served_csn: String,
}

/// Runs `script` with `sh -c` and `env`, doing to the lab's slapd what its
/// `systemctl` asks (`stop`: SIGTERM; `start`: on the same URL; `restart`:
/// both). Before the first stop, `client` sends `write`, which the freeze
/// must hold.
async fn run_recipe(
    lab: &mut Lab,
    systemctl: &mut Systemctl,
    script: &str,
    env: &[(String, String)],
    client: &mut RawConn,
    write: LdapMsg,
) -> Ran {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = child.wait_with_output();
    tokio::pin!(output);
    let deadline = tokio::time::sleep(Duration::from_secs(45));
    tokio::pin!(deadline);
    let engine = lab.proxy.engine();
    let mut write = Some(write);
    let mut asked = Vec::new();
    let mut at_stop = None;
    let mut served_csn = String::new();
    loop {
        tokio::select! {
            out = &mut output => {
                return Ran {
                    out: ToolOutput::from(out.unwrap()),
                    asked,
                    at_stop: at_stop.unwrap_or_default(),
                    served_csn,
                };
            }
            line = systemctl.requests.next_line() => {
                let line = line.unwrap().expect("the request FIFO stays open");
                asked.push(line.clone());
                let (stop, start) = match line.as_str() {
                    "stop slapd" => (true, false),
                    "start slapd" => (false, true),
                    "restart slapd" => (true, true),
                    _ => (false, false),
                };
                if stop {
                    if let Some(w) = write.take() {
                        assert!(engine.established().is_some(), "frozen when slapd stops");
                        let queued = engine.queued().0;
                        client.send_msg(w).await;
                        wait_until("the client's write held", 10, || {
                            engine.queued().0 == queued + 1
                        })
                        .await;
                        at_stop = Some(dump(lab));
                        served_csn = context_csn(lab, SUFFIX).await;
                    }
                }
                let ok = (stop || start)
                    && (!stop || block_in_place(|| lab.slapd.stop()).is_ok())
                    && (!start || block_in_place(|| lab.slapd.restart()).is_ok());
                systemctl.reply(ok).await;
            }
            _ = &mut deadline => panic!("the recipe did not finish in 45 s (asked: {asked:?})"),
        }
    }
}

/// The answer to the client's held write: a success, nothing before it.
async fn held_write_answered(client: &mut RawConn, id: i32) {
    let frame = client.recv().await.expect("the held write's answer");
    let env = Envelope::response(&frame).unwrap();
    assert_eq!(env.msgid, id, "unexpected {}", describe(&frame));
    assert_eq!(env.result_code, Some(0), "{}", describe(&frame));
}

/// The description of user `k` at slapd itself.
async fn description(lab: &Lab, k: usize) -> String {
    let out = base_direct(lab, &user_dn(k), "description").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("description: "))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_backup_restart_and_restore_recipes_run_as_written() {
    let mut lab = cold_lab().await;
    let backup = tempfile::tempdir().unwrap();
    let mut systemctl = Systemctl::new();
    let env = recipe_env(&lab, backup.path(), &systemctl);
    let me = format!("dn:{}", user_dn(7));
    let mut client = bound(&lab, &user_dn(7), &user_pw(7)).await;
    assert_eq!(whoami(&mut client, 2, "client").await, me);
    let released = "the server was restarted and answers again: 2 session(s) go on";

    // The cold backup: slapd stopped, its directory copied, started again.
    let write = modify(3, &user_dn(7), "description", "held by the cold backup");
    let ran = run_recipe(
        &mut lab,
        &mut systemctl,
        recipe("cold-backup"),
        &env,
        &mut client,
        write,
    )
    .await;
    assert_eq!(ran.out.code, Some(0), "{:?}", ran.out);
    assert_eq!(ran.asked, ["stop slapd", "start slapd"], "{:?}", ran.out);
    assert!(ran.out.stderr.contains(released), "{:?}", ran.out);
    held_write_answered(&mut client, 3).await;
    assert_eq!(whoami(&mut client, 4, "client").await, me);
    assert_eq!(description(&lab, 7).await, "held by the cold backup");
    let copies: Vec<String> = std::fs::read_dir(backup.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        copies.len() == 1 && copies[0].starts_with("ldap."),
        "{copies:?}"
    );
    let copy = backup.path().join(&copies[0]);
    let in_copy = dump_of_copy(&copy).await;
    assert_cold_copy(&ran.at_stop, &ran.served_csn, &in_copy);

    // A restart (an upgrade, a setting read at start-up).
    let pid = lab.slapd.pid();
    let write = modify(5, &user_dn(7), "description", "held by the restart");
    let ran = run_recipe(
        &mut lab,
        &mut systemctl,
        recipe("cold-restart"),
        &env,
        &mut client,
        write,
    )
    .await;
    assert_eq!(ran.out.code, Some(0), "{:?}", ran.out);
    assert_eq!(ran.asked, ["restart slapd"], "{:?}", ran.out);
    assert_ne!(lab.slapd.pid(), pid, "slapd was restarted");
    assert!(ran.out.stderr.contains(released), "{:?}", ran.out);
    held_write_answered(&mut client, 5).await;
    assert_eq!(whoami(&mut client, 6, "client").await, me);
    assert_eq!(description(&lab, 7).await, "held by the restart");

    // The restore of the cold backup's copy, named in the recipe: an entry
    // added after the copy is gone, the write held meanwhile lands on the
    // restored data.
    let after = format!("cn=after-the-copy,{CONTAINER}");
    answered(&mut client, add(7, &after, "after-the-copy"), "client").await;
    let script = recipe("cold-restore").replace("ldap.2026-12-03.031500", &copies[0]);
    assert_ne!(script, recipe("cold-restore"), "the recipe names a copy");
    let write = modify(8, &user_dn(7), "description", "held by the restore");
    let ran = run_recipe(&mut lab, &mut systemctl, &script, &env, &mut client, write).await;
    assert_eq!(ran.out.code, Some(0), "{:?}", ran.out);
    assert_eq!(ran.asked, ["stop slapd", "start slapd"], "{:?}", ran.out);
    assert!(ran.out.stderr.contains(released), "{:?}", ran.out);
    held_write_answered(&mut client, 8).await;
    assert_eq!(whoami(&mut client, 9, "client").await, me);
    assert_eq!(description(&lab, 7).await, "held by the restore");
    let gone = base_direct(&lab, &after, "cn").await;
    assert_eq!(gone.code, Some(32), "{gone:?}");
    // Apart from the held write, the server holds the copy's entries.
    let live = dump(&lab);
    assert_eq!(
        entries(&live).keys().collect::<Vec<_>>(),
        entries(&in_copy).keys().collect::<Vec<_>>()
    );
}

/// A client that connects while slapd is stopped during a `stop` freeze
/// starts out waiting for the server, as the sessions connected before the
/// stop do: its requests are held and answered after OFF (before, it was
/// refused at once with a Notice of Disconnection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connecting_while_slapd_is_stopped_waits_too() {
    let mut lab = cold_lab().await;
    let mut op = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let (code, text) = call(&mut op, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{text}");
    block_in_place(|| lab.slapd.stop()).unwrap();
    wait_sessions_waiting(&lab, 1).await;
    // New clients, while slapd is stopped: an anonymous read of the frozen
    // backend, and a bind into it (held: slapd has ppolicy).
    let mut anon = RawConn::connect(&lab.proxy_addr()).await;
    anon.send_msg(search(1, &user_dn(1), 0, "(objectClass=*)", &["uid"]))
        .await;
    let mut user = RawConn::connect(&lab.proxy_addr()).await;
    user.send_msg(bind(1, &user_dn(2), &user_pw(2))).await;
    // Both wait, their requests held (an early answer would be the first
    // frame each reads after OFF, and fail there).
    wait_sessions_waiting(&lab, 3).await;
    let engine = lab.proxy.engine();
    wait_until("both new clients' requests held", 10, || {
        engine.queued().0 == 2
    })
    .await;
    block_in_place(|| lab.slapd.restart()).expect("slapd starts again");
    let (code, text) = call(&mut op, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{text}");
    let entries = answered_after_off(&mut anon, 1).await;
    assert_eq!(entries, 1, "the entry read");
    answered_after_off(&mut user, 1).await;
    assert_eq!(
        whoami(&mut user, 2, "new client").await,
        format!("dn:{}", user_dn(2))
    );
}

/// The answer to request `id` sent earlier: a success with nothing else in
/// between; the number of search entries before it.
async fn answered_after_off(c: &mut RawConn, id: i32) -> usize {
    let mut n = 0;
    loop {
        let frame = c.recv().await.expect("an answer");
        let env = Envelope::response(&frame).unwrap();
        assert_eq!(env.msgid, id, "unexpected {}", describe(&frame));
        if op::is_final_response(env.op) {
            assert_eq!(env.result_code, Some(0), "{}", describe(&frame));
            return n;
        }
        n += 1;
    }
}

/// The LDIF backup and restore recipes, as written: `abproxy backup` (the
/// backup DN given read on everything by the `backup-acl` recipe), then
/// `abproxy restore` builds the database offline and `--apply` puts it in
/// place while slapd is stopped inside a freeze. The restored server holds
/// the backup's entries (its digest is the manifest's), an entry added after
/// the backup is gone, the write held during the restore lands, and the
/// client bound through the proxy all along sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldif_backup_and_restore_recipes_run_as_written() {
    let mut lab = cold_lab().await;
    let backup = tempfile::tempdir().unwrap();
    let mut systemctl = Systemctl::new();
    let env = recipe_env(&lab, backup.path(), &systemctl);
    let me = format!("dn:{}", user_dn(7));
    let mut client = bound(&lab, &user_dn(7), &user_pw(7)).await;
    assert_eq!(whoami(&mut client, 2, "client").await, me);

    let acl = recipe("backup-acl").replace("ldapi:///", &lab.slapd.ldapi_url());
    let out = run_sh(&acl, &env).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = run_sh(recipe("ldif-backup"), &env).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = run_sh(recipe("ldif-verify"), &env).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("restore test {SUFFIX}: a throwaway slapd served")),
        "{out:?}"
    );
    let dir = backup.path().join("ldif-1");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let b = &manifest["backends"][0];
    assert_eq!(b["suffix"], SUFFIX, "{manifest}");
    let in_backup = std::fs::read_to_string(dir.join(b["file"].as_str().unwrap())).unwrap();
    assert!(
        in_backup.contains("userPassword"),
        "the backup DN reads passwords"
    );
    let backup_dns: BTreeSet<String> = abproxy::backup::ldif::read(&in_backup)
        .unwrap()
        .into_iter()
        .map(|e| e.dn)
        .collect();

    // After the backup: an entry, which the restore takes back.
    let after = format!("cn=after-the-backup,{CONTAINER}");
    answered(&mut client, add(3, &after, "after-the-backup"), "client").await;

    let write = modify(4, &user_dn(7), "description", "held by the restore");
    let ran = run_recipe(
        &mut lab,
        &mut systemctl,
        recipe("ldif-restore"),
        &env,
        &mut client,
        write,
    )
    .await;
    assert_eq!(ran.out.code, Some(0), "{:?}", ran.out);
    assert_eq!(ran.asked, ["stop slapd", "start slapd"], "{:?}", ran.out);
    assert!(
        ran.out.stderr.contains("as in the manifest"),
        "{:?}",
        ran.out
    );
    held_write_answered(&mut client, 4).await;
    assert_eq!(whoami(&mut client, 5, "client").await, me);
    assert_eq!(description(&lab, 7).await, "held by the restore");
    let gone = base_direct(&lab, &after, "cn").await;
    assert_eq!(gone.code, Some(32), "{gone:?}");

    // The server holds the backup's entries; without the held write (user
    // 7's description) its digest is the manifest's.
    let live = abproxy::backup::ldif::read(&lab.slapd.slapcat(SUFFIX).unwrap()).unwrap();
    let live_dns: BTreeSet<String> = live.iter().map(|e| e.dn.clone()).collect();
    assert_eq!(live_dns, backup_dns);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(backup.path().join("restore-1/restore.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["backends"][0]["digest"], b["digest"], "{record}");
    let mut backed = abproxy::backup::ldif::read(&in_backup).unwrap();
    let user7 = |e: &abproxy::backup::Entry| e.dn == user_dn(7);
    backed.retain(|e| !user7(e));
    let mut live_rest = live;
    live_rest.retain(|e| !user7(e));
    assert_eq!(
        abproxy::backup::Digest::of_entries(live_rest).unwrap(),
        abproxy::backup::Digest::of_entries(backed).unwrap(),
        "the restored entries are the backup's"
    );
    let aside = format!(
        "{}.before-restore-{}",
        db_dir(&lab).display(),
        manifest["backup_id"].as_str().unwrap()
    );
    assert!(
        Path::new(&aside).join("data.mdb").is_file(),
        "the previous database kept in {aside}"
    );
}

/// `sh -c script` with `env`, within 60 s.
async fn run_sh(script: &str, env: &[(String, String)]) -> ToolOutput {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    ToolOutput::from(
        tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("the recipe finishes within 60 s")
            .unwrap(),
    )
}
