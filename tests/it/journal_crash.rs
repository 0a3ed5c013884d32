//! The journal when things go wrong: the proxy killed (SIGKILL) under
//! load, again and again, with `ack` durability; a torn tail left in the
//! last segment; a full disk. What a client saw succeed is always in the
//! journal with its own bytes and its answer, the sequence stays
//! continuous, and no write reaches the server that the journal does not
//! hold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use abproxy::journal::reader::{read_segment, segments};
use abproxy::journal::{Body, Record};
use bytes::Bytes;
use ldap3_proto::proto::*;
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW, SUFFIX};
use tokio::io::AsyncWriteExt;

use crate::journal::{journal_lab, records};
use crate::support::freeze::outcome;
use crate::support::process::*;
use crate::support::*;

/// splitmix64: a small deterministic generator, so a failing round can be
/// run again from its printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// `DIR/abproxy.toml` for a proxy in front of `upstream` journaling into
/// `journal` with ack durability, on a new loopback port: (config, addr).
fn journal_config(dir: &Path, upstream: &str, journal: &Path) -> (String, String) {
    journal_config_with(dir, upstream, journal, "ack")
}

/// The same with `durability`.
fn journal_config_with(
    dir: &Path,
    upstream: &str,
    journal: &Path,
    durability: &str,
) -> (String, String) {
    write_config(
        dir,
        upstream,
        &format!(
            "[journal]\ndir = \"{}\"\ndurability = \"{durability}\"\n",
            journal.display()
        ),
    )
}

/// An `abproxy serve` started on `config`, once its journal is open (it
/// logs "listening" before that, as it binds its listeners first).
fn serve(config: &str) -> Running {
    let mut p = Running::start(&["serve", "--config", config]);
    p.wait_for("journal open");
    p
}

/// A write a writer sent: the entry, the request's bytes (encoded once),
/// and the result code the client saw (None: no answer came).
struct Sent {
    dn: String,
    bytes: Bytes,
    code: Option<i64>,
}

/// Binds as the rootdn at `addr` and adds `cn=kR-wW-I` entries one at a
/// time until the connection is gone (the proxy was killed); each success
/// is counted in `acked`.
async fn writer(
    addr: String,
    round: u32,
    w: u32,
    acked: Arc<tokio::sync::watch::Sender<usize>>,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    let Ok(stream) = tokio::net::TcpStream::connect(&addr).await else {
        return sent;
    };
    let mut c = RawConn::from_stream(stream);
    if c.stream
        .write_all(&encode(bind(1, ADMIN_DN, ADMIN_PW)))
        .await
        .is_err()
    {
        return sent;
    }
    match c.recv().await {
        Some(f) => assert_eq!(result_code(&f), Some(0), "bind"),
        None => return sent,
    }
    for i in 0u32.. {
        let cn = format!("k{round}-w{w}-{i}");
        let dn = format!("cn={cn},{SUFFIX}");
        let bytes = encode(add(i as i32 + 2, &dn, &cn));
        sent.push(Sent {
            dn,
            bytes: bytes.clone(),
            code: None,
        });
        if c.stream.write_all(&bytes).await.is_err() {
            break;
        }
        let Some(f) = c.recv().await else { break };
        let code = result_code(&f);
        sent.last_mut().unwrap().code = code;
        assert_eq!(code, Some(0), "add {i} of writer {w}: {:?}", outcome(&f));
        acked.send_modify(|n| *n += 1);
    }
    sent
}

/// The DNs of the entries named `cn=k*` on the server itself.
async fn k_entries(url: &str) -> BTreeSet<String> {
    let out = admin_search(url, &["(cn=k*)", "1.1"]).await;
    out.lines()
        .filter_map(|l| l.strip_prefix("dn: "))
        .map(|d| d.to_ascii_lowercase())
        .collect()
}

/// `abproxy journal check --dir DIR`: exit status and stdout.
fn journal_check(dir: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(BIN)
        .args(["journal", "check", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

const ROUNDS: u32 = 6;
const WRITERS: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_write() {
    sigkill_rounds("ack").await
}

/// The same with `request` durability: what a client saw succeed has its
/// request and its outcome in the journal too (a killed proxy loses
/// nothing it wrote; only a power loss could leave an outcome unsynced).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_write_with_request_durability() {
    sigkill_rounds("request").await
}

async fn sigkill_rounds(durability: &str) {
    let slapd = start_slapd(SlapdOptions {
        nosync: true,
        ..Default::default()
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journal");
    // A failing run is repeated with JOURNAL_CRASH_SEED=<its base seed>
    // (the kill points, not the exact timing).
    let base = std::env::var("JOURNAL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(time_seed);
    println!("journal_crash: base seed {base}");

    let mut all: Vec<Sent> = Vec::new();
    for round in 0..ROUNDS {
        let seed = base.wrapping_add(round as u64);
        let mut rng = Rng(seed);
        let target = rng.range(20, 200) as usize;
        // Then up to 3 ms more, so the kill lands at any stage of a write
        // (sent, journaled, answered upstream, waiting for the sync), not
        // only right after an answer.
        let jitter = Duration::from_micros(rng.range(0, 3000));
        println!(
            "journal_crash: round {round}: seed {seed}, SIGKILL {jitter:?} after {target} acknowledged adds"
        );
        let (config, addr) = journal_config_with(tmp.path(), &slapd.url(), &jdir, durability);
        let proxy = serve(&config);
        let (tx, mut rx) = tokio::sync::watch::channel(0usize);
        let tx = Arc::new(tx);
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(writer(addr.clone(), round, w, tx.clone())))
            .collect();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|n| *n >= target))
            .await
            .unwrap_or_else(|_| panic!("round {round}: {target} adds not acknowledged in 60 s"))
            .unwrap();
        // Not a wait for an event: the jitter itself (the writers run on
        // the other workers meanwhile).
        std::thread::sleep(jitter);
        proxy.kill9();
        for t in tasks {
            let sent = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("a writer ends once the proxy is gone")
                .unwrap();
            all.extend(sent);
        }
    }
    // One more start (it cuts any torn tail and records that the writes
    // left unanswered can no longer be), then a clean stop.
    let (config, _) = journal_config_with(tmp.path(), &slapd.url(), &jdir, durability);
    let proxy = serve(&config);
    assert_eq!(proxy.sigterm_and_wait(), 0);

    let acked: Vec<&Sent> = all.iter().filter(|s| s.code == Some(0)).collect();
    assert!(acked.len() >= 20 * ROUNDS as usize);
    let by_bytes: HashMap<&[u8], &Sent> = all.iter().map(|s| (&s.bytes[..], s)).collect();
    assert_eq!(by_bytes.len(), all.len(), "every request is distinct");

    let recs = records(&jdir);
    let starts: Vec<u64> = recs
        .iter()
        .filter(|r| matches!(r.body, Body::Start { .. }))
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        starts.len(),
        ROUNDS as usize + 1,
        "a start record per start"
    );
    assert_eq!(starts[0], 1);
    let mut intents: BTreeMap<u64, &Record> = BTreeMap::new();
    let mut intent_of: HashMap<&[u8], u64> = HashMap::new();
    let mut outcomes: HashMap<u64, Vec<&Record>> = HashMap::new();
    for r in &recs {
        match &r.body {
            Body::Intent { identity, request } => {
                assert_eq!(identity, ADMIN_DN);
                assert!(
                    by_bytes.contains_key(&request[..]),
                    "intent {}: a request some writer sent",
                    r.seq
                );
                assert!(
                    intent_of.insert(request, r.seq).is_none(),
                    "intent {}: one intent per request",
                    r.seq
                );
                intents.insert(r.seq, r);
            }
            Body::Outcome { intent, .. } => {
                assert!(
                    intents.contains_key(intent),
                    "outcome {}: after its intent",
                    r.seq
                );
                outcomes.entry(*intent).or_default().push(r);
            }
            Body::Lost { .. } => panic!("record {}: a killed proxy records no loss", r.seq),
            Body::Start { .. } | Body::Cut { .. } => {}
        }
    }
    for (intent, outs) in &outcomes {
        assert_eq!(
            outs.len(),
            1,
            "intent {intent}: one outcome, not {}",
            outs.len()
        );
        assert!(
            matches!(outs[0].body, Body::Outcome { result: 0, .. }),
            "intent {intent}: {:?}",
            outs[0].body
        );
    }
    // Every write the client saw succeed: its bytes, and its success.
    for s in &acked {
        let seq = intent_of
            .get(&s.bytes[..])
            .unwrap_or_else(|| panic!("{}: acknowledged, and no intent record", s.dn));
        assert!(
            outcomes.contains_key(seq),
            "{}: acknowledged, and intent {seq} has no outcome",
            s.dn
        );
    }
    // Every write left without an answer in the journal is one the client
    // did not see succeed; at most one per writer and round.
    let unanswered: Vec<u64> = intents
        .keys()
        .filter(|s| !outcomes.contains_key(s))
        .copied()
        .collect();
    for seq in &unanswered {
        let Body::Intent { request, .. } = &intents[seq].body else {
            unreachable!()
        };
        let s = by_bytes[&request[..]];
        assert_eq!(
            s.code, None,
            "{}: intent {seq} has no outcome, the client saw it succeed",
            s.dn
        );
    }
    assert!(unanswered.len() <= (ROUNDS * WRITERS) as usize);
    // No write reached the server that the journal does not hold; every
    // acknowledged one is there.
    let journaled: BTreeSet<String> = intent_of
        .keys()
        .map(|b| by_bytes[b].dn.to_ascii_lowercase())
        .collect();
    let on_server = k_entries(&slapd.url()).await;
    for dn in &on_server {
        assert!(
            journaled.contains(dn),
            "{dn} is on the server, not in the journal"
        );
    }
    for s in &acked {
        assert!(on_server.contains(&s.dn.to_ascii_lowercase()), "{}", s.dn);
    }

    // `journal check` agrees: the unanswered writes are indeterminate.
    let (code, text) = journal_check(&jdir);
    let want = if unanswered.is_empty() { 0 } else { 14 };
    assert_eq!(code, Some(want), "{text}");
    assert!(
        text.contains(&format!(
            "writes: {} succeeded, 0 failed (never replayed), {} indeterminate, 0 in flight",
            outcomes.len(),
            unanswered.len()
        )),
        "{text}"
    );
    let listed: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("indeterminate: "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(listed, unanswered, "{text}");

    // Replay after resolution: the whole journal onto a copy of the
    // starting data, each indeterminate write read back on the server that
    // ran it, gives the server's data.
    let copy = start_slapd(SlapdOptions {
        nosync: true,
        ..Default::default()
    })
    .await;
    let args = ["--dir", jdir.to_str().unwrap(), "--resolve", &slapd.url()];
    let out = crate::journal::replay_as(&copy.url(), (ADMIN_DN, ADMIN_PW), &args).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let stdout = &out.stdout;
    let ran = unanswered
        .iter()
        .filter(|seq| stdout.contains(&format!("write {seq}: indeterminate, ran on")))
        .count();
    let not_run = unanswered
        .iter()
        .filter(|seq| stdout.contains(&format!("write {seq}: indeterminate, did not run on")))
        .count();
    assert_eq!(ran + not_run, unanswered.len(), "each resolved: {stdout}");
    assert_eq!(k_entries(&copy.url()).await, on_server);
    println!("journal_crash: resolved {ran} indeterminate write(s) as run, {not_run} as not run");
    println!(
        "journal_crash: {} adds sent, {} acknowledged, {} journaled with a success, {} indeterminate, {} records",
        all.len(),
        acked.len(),
        outcomes.len(),
        unanswered.len(),
        recs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_at_the_next_start() {
    let slapd = start_slapd(SlapdOptions {
        nosync: true,
        ..Default::default()
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let jdir = tmp.path().join("journal");
    let (config, addr) = journal_config(tmp.path(), &slapd.url(), &jdir);
    let proxy = serve(&config);
    let mut c = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
    for i in 0..3 {
        let dn = format!("cn=torn{i},{SUFFIX}");
        c.send_msg(add(i + 2, &dn, &format!("torn{i}"))).await;
        assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    }
    proxy.kill9();

    // Half of a record, as a crash in the middle of its write leaves it.
    let (_, last) = segments(&jdir).unwrap().pop().unwrap();
    let seg = read_segment(&last).unwrap();
    assert!(seg.damage.is_none());
    // The segment was open: preallocated zeros follow its records.
    assert!(seg.unused > 0, "{seg:?}");
    let intact = seg.good_len;
    let file_len = seg.file_len;
    let last_seq = seg.records.last().unwrap().seq;
    let torn = Record {
        seq: last_seq + 1,
        time_us: abproxy::journal::record::now_us(),
        conn: 9,
        body: Body::Intent {
            identity: ADMIN_DN.into(),
            request: encode(add(9, &format!("cn=never,{SUFFIX}"), "never")).to_vec(),
        },
    }
    .encode();
    let half = &torn[..torn.len() / 2];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
        f.write_all_at(half, intact).unwrap();
    }
    let seg = read_segment(&last).unwrap();
    assert!(
        seg.damage.is_some(),
        "half a record is damage, not unused space"
    );
    assert_eq!(seg.good_len, intact);

    let (config, addr) = journal_config(tmp.path(), &slapd.url(), &jdir);
    let mut proxy = serve(&config);
    assert!(
        proxy.saw("cutting a torn tail"),
        "the start-up log says it cut a torn tail"
    );
    assert!(
        proxy.saw(&format!("bytes={}", file_len - intact)),
        "it names the bytes cut"
    );
    assert_eq!(
        std::fs::metadata(&last).unwrap().len(),
        intact,
        "cut back to the last intact record"
    );

    let mut c = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
    let after = encode(add(2, &format!("cn=after-torn,{SUFFIX}"), "after-torn"));
    c.send(&after).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    assert_eq!(proxy.sigterm_and_wait(), 0);

    let recs = records(&jdir);
    let at = |seq: u64| &recs[seq as usize - 1];
    assert!(
        matches!(at(last_seq + 1).body, Body::Start { .. }),
        "{:?}",
        at(last_seq + 1)
    );
    match &at(last_seq + 2).body {
        Body::Intent { request, .. } => assert_eq!(&request[..], &after[..]),
        b => panic!("record {}: {b:?}", last_seq + 2),
    }
    assert!(
        matches!(at(last_seq + 3).body, Body::Outcome { intent, result: 0, .. } if intent == last_seq + 2),
        "{:?}",
        at(last_seq + 3)
    );
    let (code, text) = journal_check(&jdir);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("torn tail"), "{text}");
}

/// A tmpfs mounted on a directory, unmounted when dropped (lazily if
/// something still holds it open).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test mounts a tmpfs and must run as root");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Bytes free for an unprivileged writer.
    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a struct to fill.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

/// An add of a `device` entry with a description of `size` bytes.
fn big_add(msgid: i32, cn: &str, size: usize) -> LdapMsg {
    let attr = |t: &str, v: Vec<u8>| LdapAttribute {
        atype: t.into(),
        vals: vec![v],
    };
    LdapMsg::new(
        msgid,
        LdapOp::AddRequest(LdapAddRequest {
            dn: format!("cn={cn},{SUFFIX}"),
            attributes: vec![
                attr("objectClass", b"device".to_vec()),
                attr("cn", cn.as_bytes().to_vec()),
                attr("description", vec![b'x'; size]),
            ],
        }),
    )
}

#[tokio::test]
async fn a_full_disk_refuses_writes_unsent_and_they_resume_when_there_is_room() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(tmp.path(), "2M");
    let jdir = tmp.path().join("journal");
    let lab = journal_lab(&jdir, |_| {}).await;
    // Leave room for one 100 KB write and its answer, not for two (and the
    // space the journal preallocated before the filler).
    let filler = tmp.path().join("filler");
    let room = 150 * 1024;
    let free = fs.free();
    assert!(
        free > room + 512 * 1024,
        "{free} bytes free on a new 2 MB tmpfs"
    );
    std::fs::write(&filler, vec![0u8; (free - room) as usize]).unwrap();
    assert!(fs.free() <= room + 8192, "{} bytes free", fs.free());

    let mut c = bound_at(&lab.proxy_addr(), ADMIN_DN, ADMIN_PW).await;
    let mut succeeded = Vec::new();
    let mut refused = None;
    // The journal's segment has up to 1 MiB of preallocated space that
    // the filler cannot take: the disk is full some writes later.
    for i in 0..40 {
        let cn = format!("big{i}");
        let bytes = encode(big_add(i + 2, &cn, 100 * 1024));
        c.send(&bytes).await;
        let (code, text) = outcome(c.recv_until_final(i + 2).await.last().unwrap());
        match code {
            0 => succeeded.push(bytes),
            52 => {
                assert!(text.contains("not sent to the server"), "{text}");
                refused = Some(cn);
                break;
            }
            _ => panic!("add {cn}: {code} {text}"),
        }
    }
    let refused = refused.expect("an add answered unavailable once the disk is full");
    assert!(!succeeded.is_empty(), "the first add fits");

    // Not on the server.
    let mut direct = bound_at(&lab.direct_addr(), ADMIN_DN, ADMIN_PW).await;
    direct
        .send_msg(search(
            2,
            &format!("cn={refused},{SUFFIX}"),
            0,
            "(objectClass=*)",
            &["1.1"],
        ))
        .await;
    let r = direct.recv_until_final(2).await;
    assert_eq!(
        result_code(r.last().unwrap()),
        Some(32),
        "{refused} never reached the server"
    );
    // The failed append was cut back: the segment holds whole records.
    for (_, p) in segments(&jdir).unwrap() {
        let s = read_segment(&p).unwrap();
        assert!(s.damage.is_none(), "{}: {:?}", p.display(), s.damage);
        assert_eq!(s.good_len, s.file_len);
    }
    // The connection goes on.
    c.send_msg(search(50, SUFFIX, 0, "(objectClass=*)", &["dc"]))
        .await;
    let r = c.recv_until_final(50).await;
    assert_eq!(result_code(r.last().unwrap()), Some(0));

    // Room again: the next write goes through, journaled.
    std::fs::remove_file(&filler).unwrap();
    let again = encode(big_add(51, "big-again", 100 * 1024));
    c.send(&again).await;
    let (code, text) = outcome(c.recv_until_final(51).await.last().unwrap());
    assert_eq!(code, 0, "{text}");
    succeeded.push(again);

    let recs = records(&jdir);
    let writes = crate::journal::journaled_writes(&recs);
    let got: Vec<&[u8]> = writes.iter().map(|(req, _)| *req).collect();
    let want: Vec<&[u8]> = succeeded.iter().map(|b| &b[..]).collect();
    assert_eq!(got, want, "the successful writes, and only them, in order");
    assert!(writes.iter().all(|(_, result)| *result == 0));
    let (code, text) = journal_check(&jdir);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("writes: {} succeeded, 0 failed", succeeded.len())),
        "{text}"
    );
    assert!(!text.contains("torn tail"), "{text}");

    let Lab { proxy, .. } = lab;
    proxy.shutdown().await.unwrap();
    drop(fs);
}
