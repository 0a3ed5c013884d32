//! End-to-end load benchmark: what does putting abproxy in front of slapd
//! cost, compared with talking to slapd directly and with a plain TCP proxy
//! (haproxy in `mode tcp`, when installed)?
//!
//! ```text
//! cargo bench --bench load                           # 3 s per point
//! LOAD_SECS=2 cargo bench --bench load               # 2 s per point
//! cargo bench --bench load -- --quick                # smoke run, ~0.5 s per point
//! cargo bench --bench load -- --secs 5 --rounds 3 --conns 1,8 --workloads search,modify
//! cargo bench --bench load -- --workloads freeze     # the freeze section alone
//! cargo bench --bench load -- --workloads tls        # the TLS section alone
//! cargo bench --bench load -- --workloads freeze-reads --rounds 6  # reads during a freeze
//! ```
//!
//! One run starts a throwaway slapd (`testkit`, 1000 users, no fsync),
//! abproxy as its own process (the binary built with this bench, `serve
//! --config` with `threads` = `--proxy-threads`; see [`AbproxyProcess`]),
//! and, if `haproxy` is on `PATH`, a haproxy with `nbthread 1`, `mode tcp`,
//! no logging; both configs in temporary directories. The load generator runs on a separate tokio runtime (threads
//! named `loadgen`). Everything shares the machine's cores, so on a small
//! machine the numbers are "what the whole box does", and the ratios to
//! `direct` are what matter. Each point also reports the CPU time per
//! operation of the proxy (abproxy's process, haproxy's process), slapd and
//! the load generator, read from `/proc` (user + system time): steadier than
//! throughput on a noisy machine, and what a proxy costs.
//!
//! For each workload x connection count (x round), the targets run back to
//! back (direct, abproxy, haproxy; each round takes the next permutation of
//! the three, see [`round_order`]) to reduce drift. Each connection is a
//! closed-loop client: it sends one request (pre-encoded protocolOp, fresh
//! message ID) and waits for its final response before the next; the requests of one connection go to users
//! `conn+1, conn+1+conns, ...` so concurrent clients never touch the same
//! entry. Workloads:
//! * `search`: anonymous base-scope search of `uid=userK,...`, all user
//!   attributes (one entry + done);
//! * `bind`: simple bind as `userK` / `passK` (the same connection rebinds);
//! * `modify`: replace `description` of `userK`, on a connection bound once as
//!   the root DN.
//!
//! `freeze` (last in the default list) is not a throughput point but the
//! Allow-Backup section, printed as a second table. abproxy runs with
//! `freeze.allowed = [ADMIN_DN]`, `max_drain_secs` 10 and queue limits above
//! the backlog; backends come from slapd's rootDSE (readonly mode: writes are
//! held, searches and binds pass). ON, OFF and status are sent on a
//! connection bound as the admin.
//! * ON/OFF cycles, idle: `--freeze-cycles` cycles (+1 unmeasured) of ON,
//!   20 ms frozen, OFF, 50 ms pause; p50/p99 of ON's and OFF's answer times.
//! * The same cycles while `--freeze-conns` closed-loop clients (bound as the
//!   admin) alternate a base search and a modify of their own users through
//!   abproxy: ON then waits for the in-flight modifies to drain.
//! * Backlog release: ON, then `--backlog-conns` clients each pipeline
//!   `--backlog-depth` modifies of their own users in one write; once the
//!   status value reports them all queued, OFF; the time from sending OFF to
//!   the last modify response gives the release rate. The same burst is sent
//!   straight to slapd (`direct`, the ratio's reference) and through abproxy
//!   unfrozen, `--backlog-reps` times in rotating order. Every response is
//!   checked (a modify response, success, each message ID once); a response
//!   before OFF, a backlog never fully queued, or a missing response is
//!   reported as an error, with the proxy's status at that time.
//!
//! `freeze-reads` (not in the default list) is the reads-during-a-freeze
//! section, its own table: `--read-conns` closed-loop readers (anonymous
//! base searches) through abproxy, measured in interleaved phases, an
//! unfrozen one before each of three frozen ones (readonly, set by a raw
//! admin connection; the same with `--read-writers` writers pipelining
//! modifies at `--write-rate`/s each, held by the proxy; the same with the
//! freeze set by an `abproxy::ops::Session` with holdUntilUnbind, as
//! `abproxy run` does); each phase `--secs` after `--warmup-ms`, one such
//! sequence per round. p50/p99 of the reads per kind of phase and their
//! ratios to unfrozen; see `load_freeze_reads/section.rs`.
//!
//! `tls` (not in the default list) is the TLS section, a third table: slapd's
//! own TLS (`ldaps://`) against abproxy terminating TLS (`ldaps://`, clear to
//! slapd), new TLS connections per second and searches over TLS; see
//! `load_tls/section.rs`. slapd and abproxy then get certificates from a
//! throwaway CA (`openssl`).
//!
//! Options (arguments override environment variables):
//! | argument           | environment           | default              |
//! |--------------------|-----------------------|----------------------|
//! | `--secs S`         | `LOAD_SECS`           | 3 (quick: 0.5)       |
//! | `--warmup-ms MS`   | `LOAD_WARMUP_MS`      | 500 (quick: 100)     |
//! | `--conns 1,8,32`   | `LOAD_CONNS`          | 1,8,32               |
//! | `--workloads LIST` | `LOAD_WORKLOADS`      | search,bind,modify,freeze |
//! | `--rounds N`       | `LOAD_ROUNDS`         | 1                    |
//! | `--quick`          | `LOAD_QUICK=1`        | off                  |
//! | `--proxy-threads N`| `LOAD_PROXY_THREADS`  | 1 (as haproxy nbthread 1) |
//! | `--client-threads N`| `LOAD_CLIENT_THREADS`| 2                    |
//! | `--users N`        | `LOAD_USERS`          | 1000                 |
//! | `--haproxy PATH\|0\|self` | `LOAD_HAPROXY` | `haproxy` on `PATH` |
//! | `--freeze-cycles N`| `LOAD_FREEZE_CYCLES`  | 20 (quick: 5)        |
//! | `--freeze-conns K` | `LOAD_FREEZE_CONNS`   | 8                    |
//! | `--backlog-conns C`| `LOAD_BACKLOG_CONNS`  | 32                   |
//! | `--backlog-depth M`| `LOAD_BACKLOG_DEPTH`  | 200                  |
//! | `--backlog-reps R` | `LOAD_BACKLOG_REPS`   | 3 (quick: 1)         |
//! | `--read-conns N`   | `LOAD_READ_CONNS`     | 8                    |
//! | `--read-writers W` | `LOAD_READ_WRITERS`   | 2                    |
//! | `--write-rate R`   | `LOAD_WRITE_RATE`     | 100 (per writer, /s) |
//!
//! With several rounds, ops/s is the median over rounds, the ratios are the
//! medians of the per-round ratios, and percentiles are over all rounds'
//! samples (the freeze section runs once per round too). With HAProxy, a
//! second table pairs abproxy with HAProxy round by round (the two run
//! seconds apart, so a slow phase of the machine hits both): the median of
//! abproxy/HAProxy, a distribution-free confidence interval for it (needs 5
//! rounds or more), and the rounds abproxy was ahead. `--haproxy self` puts
//! a second abproxy process (started as the first) in HAProxy's place, as
//! `abproxy2`: an A/A control that shows how far apart two equal proxies
//! measure on this machine. Every loop is
//! time-limited (5 s per request, 15 s per ON, 30 s per backlog, a deadline
//! per point): the benchmark always ends by itself. Under `cargo test`
//! (no `--bench` argument) it only checks [`round_order`] and measures
//! nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abproxy::wire::ber::{read_header, write_len};
use abproxy::wire::{op, pdu, Envelope, FrameCodec};
use abproxy_proto::{
    AllowBackupRequest, AllowBackupStatus, FreezeState, ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID,
};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ldap3_proto::proto::{
    LdapBindCred, LdapBindRequest, LdapDerefAliases, LdapExtendedRequest, LdapFilter, LdapModify,
    LdapModifyRequest, LdapModifyType, LdapMsg, LdapOp, LdapPartialAttribute, LdapSearchRequest,
    LdapSearchScope,
};
use testkit::{user_dn, user_pw, Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::codec::Decoder;

#[path = "load_freeze_reads/section.rs"]
mod freeze_reads;
#[path = "load_tls/section.rs"]
mod tls_section;

/// Longest wait for one response before the client gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time to open (and bind) the connections of one point.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- options

#[derive(Debug, Clone)]
struct Opts {
    secs: f64,
    warmup: Duration,
    conns: Vec<usize>,
    workloads: Vec<Kind>,
    /// The freeze section (`freeze` in the workload list).
    freeze: bool,
    /// The TLS section (`tls` in the workload list).
    tls: bool,
    /// The reads-during-a-freeze section (`freeze-reads`).
    freeze_reads: bool,
    /// Its readers, writers, and modifies per second per writer.
    read_conns: usize,
    read_writers: usize,
    write_rate: f64,
    /// Measured ON/OFF cycles per scenario (idle, loaded).
    freeze_cycles: usize,
    /// Closed-loop search+modify clients during the loaded cycles.
    freeze_conns: usize,
    /// Backlog: clients, modifies pipelined by each, repetitions.
    backlog_conns: usize,
    backlog_depth: usize,
    backlog_reps: usize,
    rounds: usize,
    proxy_threads: usize,
    client_threads: usize,
    users: usize,
    /// `None`: no haproxy column.
    haproxy: Option<Reference>,
    /// Why there is no haproxy column.
    haproxy_note: Option<String>,
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(f)
        .collect()
}

fn parse_conns(s: &str) -> Result<Vec<usize>> {
    let v = parse_list(s, |p| {
        let n: usize = p
            .parse()
            .with_context(|| format!("bad connection count {p:?}"))?;
        if n == 0 || n > 1024 {
            bail!("connection count {n} out of 1..=1024");
        }
        Ok(n)
    })?;
    if v.is_empty() {
        bail!("no connection count");
    }
    Ok(v)
}

/// The sections other than the throughput workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Freeze,
    Tls,
    FreezeReads,
}

/// The throughput workloads, and the sections in the list.
fn parse_workloads(s: &str) -> Result<(Vec<Kind>, Vec<Section>)> {
    let v = parse_list(s, |p| match p {
        "search" => Ok(Ok(Kind::Search)),
        "bind" => Ok(Ok(Kind::Bind)),
        "modify" => Ok(Ok(Kind::Modify)),
        "freeze" => Ok(Err(Section::Freeze)),
        "tls" => Ok(Err(Section::Tls)),
        "freeze-reads" => Ok(Err(Section::FreezeReads)),
        _ => bail!("unknown workload {p:?} (search, bind, modify, freeze, tls, freeze-reads)"),
    })?;
    if v.is_empty() {
        bail!("no workload");
    }
    let sections = v.iter().filter_map(|x| x.err()).collect();
    Ok((v.into_iter().flatten().collect(), sections))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Opts {
    /// Environment first, then arguments (which win). Unknown arguments
    /// (`--bench`, filters passed by `cargo bench`) are ignored.
    fn parse(args: &[String]) -> Result<Opts> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut kv: BTreeMap<&str, String> = BTreeMap::new();
        for (key, var) in [
            ("secs", "LOAD_SECS"),
            ("warmup-ms", "LOAD_WARMUP_MS"),
            ("conns", "LOAD_CONNS"),
            ("workloads", "LOAD_WORKLOADS"),
            ("rounds", "LOAD_ROUNDS"),
            ("proxy-threads", "LOAD_PROXY_THREADS"),
            ("client-threads", "LOAD_CLIENT_THREADS"),
            ("users", "LOAD_USERS"),
            ("haproxy", "LOAD_HAPROXY"),
            ("freeze-cycles", "LOAD_FREEZE_CYCLES"),
            ("freeze-conns", "LOAD_FREEZE_CONNS"),
            ("backlog-conns", "LOAD_BACKLOG_CONNS"),
            ("backlog-depth", "LOAD_BACKLOG_DEPTH"),
            ("backlog-reps", "LOAD_BACKLOG_REPS"),
            ("read-conns", "LOAD_READ_CONNS"),
            ("read-writers", "LOAD_READ_WRITERS"),
            ("write-rate", "LOAD_WRITE_RATE"),
        ] {
            if let Some(v) = env(var) {
                kv.insert(key, v);
            }
        }
        let mut quick = env("LOAD_QUICK").is_some_and(|v| v != "0");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let a = a.as_str();
            if a == "--quick" {
                quick = true;
                continue;
            }
            let Some(name) = a.strip_prefix("--") else {
                continue;
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            let known = [
                "secs",
                "warmup-ms",
                "conns",
                "workloads",
                "rounds",
                "proxy-threads",
                "client-threads",
                "users",
                "haproxy",
                "freeze-cycles",
                "freeze-conns",
                "backlog-conns",
                "backlog-depth",
                "backlog-reps",
                "read-conns",
                "read-writers",
                "write-rate",
            ];
            if let Some(&key) = known.iter().find(|k| **k == name) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| anyhow!("--{name} needs a value"))?,
                };
                kv.insert(key, v);
            }
        }
        let num = |key: &str, default: f64| -> Result<f64> {
            match kv.get(key) {
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| anyhow!("bad value for {key}: {v:?}")),
                None => Ok(default),
            }
        };
        let secs = num("secs", if quick { 0.5 } else { 3.0 })?;
        if !(0.05..=3600.0).contains(&secs) {
            bail!("secs must be in 0.05..=3600");
        }
        let warmup =
            Duration::from_millis(num("warmup-ms", if quick { 100.0 } else { 500.0 })? as u64);
        let conns = parse_conns(kv.get("conns").map_or("1,8,32", String::as_str))?;
        let (workloads, sections) = parse_workloads(
            kv.get("workloads")
                .map_or("search,bind,modify,freeze", String::as_str),
        )?;
        let freeze = sections.contains(&Section::Freeze);
        let tls = sections.contains(&Section::Tls);
        let freeze_reads = sections.contains(&Section::FreezeReads);
        let read_conns = (num("read-conns", 8.0)? as usize).clamp(1, 1024);
        let read_writers = (num("read-writers", 2.0)? as usize).clamp(0, 64);
        let write_rate = num("write-rate", 100.0)?.clamp(0.1, 100_000.0);
        let freeze_cycles =
            (num("freeze-cycles", if quick { 5.0 } else { 20.0 })? as usize).clamp(1, 10_000);
        let freeze_conns = (num("freeze-conns", 8.0)? as usize).clamp(1, 1024);
        let backlog_conns = (num("backlog-conns", 32.0)? as usize).clamp(1, 1024);
        let backlog_depth = (num("backlog-depth", 200.0)? as usize).clamp(1, 100_000);
        let backlog_reps =
            (num("backlog-reps", if quick { 1.0 } else { 3.0 })? as usize).clamp(1, 100);
        let rounds = (num("rounds", 1.0)? as usize).clamp(1, 100);
        let proxy_threads = (num("proxy-threads", 1.0)? as usize).clamp(1, 64);
        let client_threads = (num("client-threads", 2.0)? as usize).clamp(1, 64);
        let users = (num("users", 1000.0)? as usize).clamp(1, 1_000_000);
        let (haproxy, haproxy_note) = match kv.get("haproxy").map(String::as_str) {
            Some("0") | Some("off") | Some("no") => {
                (None, Some("disabled (LOAD_HAPROXY=0)".into()))
            }
            Some("self") => (Some(Reference::Itself), None),
            Some(p) => {
                let p = if p.contains('/') {
                    Some(PathBuf::from(p)).filter(|p| is_executable(p))
                } else {
                    find_on_path(p)
                };
                match p {
                    Some(p) => (Some(Reference::Haproxy(p)), None),
                    None => (None, Some("the given haproxy is not executable".into())),
                }
            }
            None => match find_on_path("haproxy") {
                Some(p) => (Some(Reference::Haproxy(p)), None),
                None => (None, Some("haproxy not found on PATH".into())),
            },
        };
        Ok(Opts {
            secs,
            warmup,
            conns,
            workloads,
            freeze,
            tls,
            freeze_reads,
            read_conns,
            read_writers,
            write_rate,
            freeze_cycles,
            freeze_conns,
            backlog_conns,
            backlog_depth,
            backlog_reps,
            rounds,
            proxy_threads,
            client_threads,
            users,
            haproxy,
            haproxy_note,
        })
    }
}

/// What runs in the reference column.
#[derive(Debug, Clone)]
enum Reference {
    /// HAProxy in TCP mode (this binary).
    Haproxy(PathBuf),
    /// `--haproxy self`: a second abproxy process, started exactly as the
    /// first. An A/A control: the two columns differ only by chance and by
    /// any bias of the benchmark itself, so the head-to-head table shows how
    /// far apart two equal proxies measure on this machine.
    Itself,
}

/// The reference column's name in the log lines and tables: `haproxy`, or
/// `abproxy2` for the A/A control. Set once, before the first point.
static REFERENCE_NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn reference_name() -> &'static str {
    REFERENCE_NAME.get().copied().unwrap_or("haproxy")
}

// ---------------------------------------------------------------- requests

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Search,
    Bind,
    Modify,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Search => "search",
            Kind::Bind => "bind",
            Kind::Modify => "modify",
        }
    }
}

/// The pre-encoded protocolOp TLVs of one workload, one per user, and the
/// connection set-up (a bind) if it needs one.
struct Workload {
    kind: Kind,
    ops: Vec<Vec<u8>>,
    setup: Option<Vec<u8>>,
}

/// The protocolOp TLV of an encoded message without controls.
fn op_tlv(op: LdapOp) -> Vec<u8> {
    let msg = pdu::encode(LdapMsg::new(1, op));
    let outer = read_header(&msg).unwrap().unwrap();
    let inner = &msg[outer.header_len..outer.total_len()];
    let id = read_header(inner).unwrap().unwrap();
    inner[id.total_len()..].to_vec()
}

fn simple_bind(dn: &str, pw: &str) -> Vec<u8> {
    op_tlv(LdapOp::BindRequest(LdapBindRequest {
        version: 3,
        dn: dn.to_string(),
        cred: LdapBindCred::Simple(pw.to_string()),
    }))
}

impl Workload {
    fn new(kind: Kind, users: usize) -> Workload {
        let op = |k: usize| match kind {
            Kind::Search => op_tlv(LdapOp::SearchRequest(LdapSearchRequest {
                base: user_dn(k),
                scope: LdapSearchScope::Base,
                aliases: LdapDerefAliases::Never,
                sizelimit: 0,
                timelimit: 0,
                typesonly: false,
                filter: LdapFilter::Present("objectClass".into()),
                attrs: Vec::new(),
            })),
            Kind::Bind => simple_bind(&user_dn(k), &user_pw(k)),
            Kind::Modify => op_tlv(LdapOp::ModifyRequest(LdapModifyRequest {
                dn: user_dn(k),
                changes: vec![LdapModify {
                    operation: LdapModifyType::Replace,
                    modification: LdapPartialAttribute {
                        atype: "description".into(),
                        vals: vec![format!("load test user{k}").into_bytes()],
                    },
                }],
            })),
        };
        Workload {
            kind,
            ops: (1..=users).map(op).collect(),
            setup: (kind == Kind::Modify).then(|| simple_bind(ADMIN_DN, ADMIN_PW)),
        }
    }
}

/// `SEQUENCE { messageID, protocolOp }` into `out`.
fn frame_into(out: &mut Vec<u8>, msgid: i32, op: &[u8]) {
    let be = msgid.to_be_bytes();
    // Shortest two's complement form of a non-negative INTEGER.
    let mut skip = 0;
    while skip < 3 && be[skip] == 0 && be[skip + 1] & 0x80 == 0 {
        skip += 1;
    }
    let id = &be[skip..];
    out.clear();
    out.push(0x30);
    write_len(out, 2 + id.len() + op.len());
    out.push(0x02);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(op);
}

// ---------------------------------------------------------------- client

/// A raw LDAP connection: pre-encoded requests out, frames in.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
    out: Vec<u8>,
    next_id: i32,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            codec: FrameCodec::default(),
            out: Vec::with_capacity(512),
            next_id: 1,
        })
    }

    /// Sends one request and reads up to its final response, which must be
    /// a success.
    async fn call(&mut self, op_tlv: &[u8]) -> Result<()> {
        let (env, _) = self.call_final(op_tlv).await?;
        match env.result_code {
            Some(0) => Ok(()),
            code => Err(anyhow!("{} result code {code:?}", op::name(env.op))),
        }
    }

    /// Sends one request and returns its final response, whatever its
    /// result code.
    async fn call_final(&mut self, op_tlv: &[u8]) -> Result<(Envelope, Bytes)> {
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        frame_into(&mut self.out, id, op_tlv);
        self.stream.write_all(&self.out).await?;
        loop {
            let (env, frame) = self.recv().await?;
            if env.msgid != id {
                bail!(
                    "response {} for message {} while waiting for {id}",
                    op::name(env.op),
                    env.msgid
                );
            }
            if op::is_final_response(env.op) {
                return Ok((env, frame));
            }
        }
    }

    /// Reads the next response frame.
    async fn recv(&mut self) -> Result<(Envelope, Bytes)> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok((Envelope::response(&frame)?, frame));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the server");
            }
        }
    }

    /// Appends a request with the next message ID to `batch` (to be sent
    /// with others in one write); returns its ID.
    fn push_request(&mut self, batch: &mut Vec<u8>, op_tlv: &[u8]) -> i32 {
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        frame_into(&mut self.out, id, op_tlv);
        batch.extend_from_slice(&self.out);
        id
    }

    async fn unbind(mut self) {
        frame_into(&mut self.out, self.next_id, &[op::UNBIND_REQUEST, 0x00]);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.stream.write_all(&self.out).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// What one closed-loop client measured.
#[derive(Default)]
struct ClientResult {
    /// Latencies (ns) of the requests sent after the warm-up.
    lat: Vec<u64>,
    /// When its last measured request completed.
    last_done: Option<Instant>,
    error: Option<String>,
}

/// What one client of a point does.
struct ClientSpec {
    addr: SocketAddr,
    w: Arc<Workload>,
    /// Client number, 0..conns.
    idx: usize,
    conns: usize,
    warmup: Duration,
    secs: Duration,
}

async fn client(
    spec: ClientSpec,
    ready: tokio::sync::mpsc::Sender<()>,
    mut start: watch::Receiver<Option<Instant>>,
) -> ClientResult {
    let ClientSpec {
        addr,
        w,
        idx,
        conns,
        warmup,
        secs,
    } = spec;
    let mut res = ClientResult::default();
    let setup = async {
        let mut c = Conn::connect(addr).await?;
        if let Some(b) = &w.setup {
            c.call(b).await.context("set-up bind")?;
        }
        anyhow::Ok(c)
    };
    let mut c = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            res.error = Some(format!("{e:#}"));
            return res;
        }
        Err(_) => {
            res.error = Some("connection set-up timed out".into());
            return res;
        }
    };
    let _ = ready.send(()).await;
    drop(ready);
    let t0 = match start.wait_for(Option::is_some).await {
        Ok(t) => t.expect("checked"),
        Err(_) => return res, // point abandoned
    };
    let warm_end = t0 + warmup;
    let end = warm_end + secs;
    res.lat.reserve(65_536);
    let n = w.ops.len();
    let mut i = 0usize;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        // Users idx+1, idx+1+conns, ...: disjoint between clients.
        let k = (idx + i * conns) % n;
        i += 1;
        match tokio::time::timeout(REQUEST_TIMEOUT, c.call(&w.ops[k])).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                res.error = Some(format!("{} request: {e:#}", w.kind.name()));
                return res;
            }
            Err(_) => {
                res.error = Some(format!("no response within {REQUEST_TIMEOUT:?}"));
                return res;
            }
        }
        let done = Instant::now();
        if t >= warm_end {
            res.lat.push((done - t).as_nanos() as u64);
            res.last_done = Some(done);
        }
    }
    c.unbind().await;
    res
}

/// The name of the load generator's threads.
const LOADGEN_THREAD: &str = "loadgen";

/// One measurement: one target, one workload, one connection count.
struct Point {
    ops_per_sec: f64,
    lat: Vec<u64>,
    errors: Vec<String>,
    /// CPU time per measured operation, in µs, of each probe given to
    /// [`run_point`] (the proxy's, slapd's, the load generator's).
    cpu_us_per_op: Vec<Option<f64>>,
    /// Context switches per measured operation of each probe.
    switches_per_op: Vec<Option<f64>>,
    /// Time each probe spent runnable, waiting for a CPU, per operation (µs).
    run_delay_us_per_op: Vec<Option<f64>>,
    /// CPU migrations per measured operation of each probe.
    migrations_per_op: Vec<Option<f64>>,
    /// TCP segments sent per measured operation, by every socket of the
    /// machine's network namespace (this benchmark's traffic, over
    /// loopback: both directions of both hops).
    segments_per_op: Option<f64>,
}

/// `OutSegs` of `/proc/net/snmp`: TCP segments sent so far in this network
/// namespace.
fn tcp_out_segments() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Where CPU time and scheduler counts are read (the proxy's, slapd's, the
/// load generator's): the threads' counters in `/proc`. CPU per operation is
/// steadier than throughput on a noisy shared machine and says directly what
/// a proxy costs.
#[derive(Clone, Copy)]
enum CpuProbe {
    /// This process's threads with this name (the load generator's).
    Threads(&'static str),
    /// Every thread of another process (abproxy, haproxy, slapd).
    Process(u32),
}

/// What the scheduler has counted for a probe's threads so far.
#[derive(Clone, Copy, Default)]
struct SchedSample {
    /// CPU time (user + system).
    cpu: Duration,
    /// Context switches, voluntary and involuntary.
    switches: u64,
    /// Time runnable but waiting for a CPU (`schedstat` run_delay): on two
    /// cores shared by the load generator, the proxy and slapd, time an
    /// operation's next step waits for its turn. `None` without
    /// `schedstat` (a kernel without CONFIG_SCHED_INFO).
    run_delay: Option<Duration>,
    /// Moves from one CPU to another (`se.nr_migrations`). `None` without
    /// `/proc/*/sched` (a kernel without CONFIG_SCHED_DEBUG).
    migrations: Option<u64>,
}

impl CpuProbe {
    /// The scheduler's counters for the probe's threads. CPU time comes from
    /// `schedstat` (nanoseconds) where it exists, else from `stat` (clock
    /// ticks, usually 10 ms).
    fn read(self) -> Option<SchedSample> {
        let (dir, name) = match self {
            CpuProbe::Threads(n) => ("/proc/self/task".to_string(), Some(n)),
            CpuProbe::Process(pid) => (format!("/proc/{pid}/task"), None),
        };
        let tick = 1.0 / clock_ticks_per_sec();
        let mut s = SchedSample::default();
        for t in std::fs::read_dir(dir).ok()?.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            // "tid (comm) state ...": fields after the comm, which may hold
            // spaces, start at the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if name.is_some_and(|n| head.split_once('(').map(|(_, c)| c) != Some(n)) {
                continue;
            }
            let schedstat = std::fs::read_to_string(t.path().join("schedstat")).ok();
            let ns: Vec<u64> = schedstat
                .iter()
                .flat_map(|l| l.split_whitespace())
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [exec, delay, ..] = ns[..] {
                s.cpu += Duration::from_nanos(exec);
                s.run_delay = Some(s.run_delay.unwrap_or_default() + Duration::from_nanos(delay));
            } else {
                // utime and stime are fields 14 and 15 of stat: 12th and
                // 13th after the comm.
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                s.cpu += Duration::from_secs_f64((ticks(11) + ticks(12)) * tick);
            }
            let field = |text: &str, key: &str| -> u64 {
                text.lines()
                    .filter(|l| l.split(':').next().map(str::trim) == Some(key))
                    .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                    .sum()
            };
            if let Ok(status) = std::fs::read_to_string(t.path().join("status")) {
                s.switches += field(&status, "voluntary_ctxt_switches")
                    + field(&status, "nonvoluntary_ctxt_switches");
            }
            if let Ok(sched) = std::fs::read_to_string(t.path().join("sched")) {
                s.migrations = Some(s.migrations.unwrap_or(0) + field(&sched, "se.nr_migrations"));
            }
        }
        Some(s)
    }
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

async fn run_point(
    addr: SocketAddr,
    w: Arc<Workload>,
    conns: usize,
    warmup: Duration,
    secs: Duration,
    probes: Vec<Option<CpuProbe>>,
) -> Point {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(conns);
    let (start_tx, start_rx) = watch::channel(None);
    let mut tasks = tokio::task::JoinSet::new();
    for idx in 0..conns {
        let spec = ClientSpec {
            addr,
            w: w.clone(),
            idx,
            conns,
            warmup,
            secs,
        };
        tasks.spawn(client(spec, ready_tx.clone(), start_rx.clone()));
    }
    drop(ready_tx);
    // Wait until every client is connected (or has failed: its sender is
    // dropped, so the channel closes when no client is left to report).
    let mut n_ready = 0;
    let _ = tokio::time::timeout(SETUP_TIMEOUT + Duration::from_secs(1), async {
        while n_ready < conns && ready_rx.recv().await.is_some() {
            n_ready += 1;
        }
    })
    .await;
    let t0 = Instant::now();
    let _ = start_tx.send(Some(t0));
    let warm_end = t0 + warmup;
    let read_all = |probes: &[Option<CpuProbe>]| -> Vec<Option<SchedSample>> {
        probes.iter().map(|p| p.and_then(CpuProbe::read)).collect()
    };
    let at_warm_end = {
        let probes = probes.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(warm_end.into()).await;
            (read_all(&probes), tcp_out_segments())
        })
    };
    let deadline = warmup + secs + REQUEST_TIMEOUT + Duration::from_secs(5);
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    let mut last_done: Option<Instant> = None;
    let collected = tokio::time::timeout(deadline, async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(r) => {
                    lat.extend_from_slice(&r.lat);
                    last_done = last_done.max(r.last_done);
                    errors.extend(r.error);
                }
                Err(e) => errors.push(format!("client task: {e}")),
            }
        }
    })
    .await;
    if collected.is_err() {
        errors.push("point deadline exceeded; clients aborted".into());
        tasks.abort_all();
    }
    drop(start_tx);
    // The clients are done: the processes measured are idle from here on.
    let (start, start_segments) = at_warm_end.await.unwrap_or_default();
    let end = read_all(&probes);
    let n = lat.len() as f64;
    let segments_per_op = match (start_segments, tcp_out_segments()) {
        (Some(a), Some(b)) if n > 0.0 => Some(b.saturating_sub(a) as f64 / n),
        _ => None,
    };
    let per_op = |f: &dyn Fn(SchedSample, SchedSample) -> Option<f64>| -> Vec<Option<f64>> {
        end.iter()
            .enumerate()
            .map(|(i, end)| match (start.get(i).copied().flatten(), *end) {
                (Some(a), Some(b)) if n > 0.0 => f(a, b).map(|v| v / n),
                _ => None,
            })
            .collect()
    };
    let us = |a: Duration, b: Duration| b.saturating_sub(a).as_secs_f64() * 1e6;
    let cpu_us_per_op = per_op(&|a, b| Some(us(a.cpu, b.cpu)));
    let switches_per_op = per_op(&|a, b| Some(b.switches.saturating_sub(a.switches) as f64));
    let run_delay_us_per_op = per_op(&|a, b| Some(us(a.run_delay?, b.run_delay?)));
    let migrations_per_op =
        per_op(&|a, b| Some(b.migrations?.saturating_sub(a.migrations?) as f64));
    lat.sort_unstable();
    let elapsed = last_done.map_or(0.0, |d| d.saturating_duration_since(warm_end).as_secs_f64());
    let ops_per_sec = if elapsed > 0.0 {
        lat.len() as f64 / elapsed
    } else {
        0.0
    };
    Point {
        ops_per_sec,
        lat,
        errors,
        cpu_us_per_op,
        switches_per_op,
        run_delay_us_per_op,
        migrations_per_op,
        segments_per_op,
    }
}

// ---------------------------------------------------------------- freeze

/// The proxy's drain limit (`freeze.max_drain_secs`) in this benchmark.
const FREEZE_MAX_DRAIN_SECS: u64 = 10;
/// Longest wait for the answer to ON (the drain limit plus slack).
const ON_TIMEOUT: Duration = Duration::from_secs(FREEZE_MAX_DRAIN_SECS + 5);
/// How long each ON/OFF cycle stays frozen between ON's answer and OFF.
const FREEZE_HOLD: Duration = Duration::from_millis(20);
/// Pause after OFF's answer before the next cycle.
const FREEZE_GAP: Duration = Duration::from_millis(50);
/// Longest wait for the backlog to be queued, and for a burst to be answered.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(30);

/// The abproxy settings of the freeze section: the admin may freeze, and
/// the queue limits hold the whole backlog without backpressure.
fn freeze_config(opts: &Opts) -> toml::Table {
    let backlog = opts.backlog_conns * opts.backlog_depth;
    let per_conn = 2 * opts.backlog_depth.max(1000);
    let mut f = toml::Table::new();
    f.insert("allowed".into(), toml::Value::Array(vec![ADMIN_DN.into()]));
    f.insert(
        "max_drain_secs".into(),
        (FREEZE_MAX_DRAIN_SECS as i64).into(),
    );
    // A freeze left behind by a failed run ends by itself.
    f.insert("lease_secs".into(), 120.into());
    f.insert(
        "queue_max_requests_per_conn".into(),
        (per_conn as i64).into(),
    );
    f.insert("queue_max_bytes_per_conn".into(), (64i64 << 20).into());
    f.insert(
        "queue_max_requests_total".into(),
        ((4 * backlog).max(per_conn) as i64).into(),
    );
    f.insert("queue_max_bytes_total".into(), (1i64 << 30).into());
    f
}

/// The pre-encoded requests of the freeze section.
struct FreezeOps {
    bind: Vec<u8>,
    on: Vec<u8>,
    off: Vec<u8>,
    status: Vec<u8>,
    search: Vec<Vec<u8>>,
    modify: Vec<Vec<u8>>,
}

fn exop_tlv(oid: &str, value: Option<Vec<u8>>) -> Vec<u8> {
    op_tlv(LdapOp::ExtendedRequest(LdapExtendedRequest {
        name: oid.into(),
        value,
    }))
}

impl FreezeOps {
    fn new(users: usize) -> FreezeOps {
        let on = abproxy_proto::encode_request(&AllowBackupRequest::on());
        let off = abproxy_proto::encode_request(&AllowBackupRequest::off());
        FreezeOps {
            bind: simple_bind(ADMIN_DN, ADMIN_PW),
            on: exop_tlv(ALLOW_BACKUP_OID, Some(on)),
            off: exop_tlv(ALLOW_BACKUP_OID, Some(off)),
            status: exop_tlv(ALLOW_BACKUP_STATUS_OID, None),
            search: Workload::new(Kind::Search, users).ops,
            modify: Workload::new(Kind::Modify, users).ops,
        }
    }

    /// The user index of request `i` of client `idx` of `conns`: each client
    /// cycles over its own users (`idx+1, idx+1+conns, ...`), so concurrent
    /// clients never modify the same entry.
    fn user(&self, idx: usize, conns: usize, i: usize) -> usize {
        let n = self.modify.len();
        let per_client = (n / conns).max(1);
        (idx + conns * (i % per_client)) % n
    }
}

/// The diagnostic message of a response (for error reports).
fn diagnostic(frame: &[u8]) -> String {
    let mut buf = BytesMut::from(frame);
    match ldap3_proto::LdapCodec::new(Some(1 << 26), None).decode(&mut buf) {
        Ok(Some(m)) => match m.op {
            LdapOp::ExtendedResponse(r) => r.res.message,
            LdapOp::ModifyResponse(r) | LdapOp::SearchResultDone(r) => r.message,
            LdapOp::BindResponse(r) => r.res.message,
            other => format!("{other:?}"),
        },
        _ => "(undecodable response)".into(),
    }
}

fn status_summary(s: &AllowBackupStatus) -> String {
    format!(
        "state {:?}, queued_requests {}, queued_bytes {}, in_flight {}, freeze_id {:?}",
        s.state, s.queued_requests, s.queued_bytes, s.in_flight, s.freeze_id
    )
}

/// A connection bound as the admin, which sends ON, OFF and status.
struct Admin {
    c: Conn,
    ops: Arc<FreezeOps>,
}

impl Admin {
    async fn connect(addr: SocketAddr, ops: Arc<FreezeOps>) -> Result<Admin> {
        let setup = async {
            let mut c = Conn::connect(addr).await?;
            c.call(&ops.bind).await.context("admin bind")?;
            anyhow::Ok(c)
        };
        let c = tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .map_err(|_| anyhow!("admin connection set-up timed out"))??;
        Ok(Admin { c, ops })
    }

    /// Sends ON (`on`) or OFF; returns the time from sending it to its
    /// answer, which must be success.
    async fn switch(&mut self, on: bool) -> Result<Duration> {
        let what = if on { "ON" } else { "OFF" };
        let limit = if on { ON_TIMEOUT } else { REQUEST_TIMEOUT };
        let op = if on { &self.ops.on } else { &self.ops.off };
        let t = Instant::now();
        let (env, frame) = match tokio::time::timeout(limit, self.c.call_final(op)).await {
            Ok(r) => r.with_context(|| format!("Allow-Backup {what}"))?,
            Err(_) => bail!("Allow-Backup {what}: no answer within {limit:?}"),
        };
        let dt = t.elapsed();
        if env.result_code != Some(0) {
            bail!(
                "Allow-Backup {what} failed: result code {:?}: {}",
                env.result_code,
                diagnostic(&frame)
            );
        }
        Ok(dt)
    }

    async fn status(&mut self) -> Result<AllowBackupStatus> {
        let (env, frame) = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.c.call_final(&self.ops.status),
        )
        .await
        {
            Ok(r) => r.context("status request")?,
            Err(_) => bail!("status request: no answer within {REQUEST_TIMEOUT:?}"),
        };
        if env.result_code != Some(0) {
            bail!(
                "status request failed: result code {:?}: {}",
                env.result_code,
                diagnostic(&frame)
            );
        }
        let v = env
            .value_bytes(&frame)
            .ok_or_else(|| anyhow!("status response without a value"))?;
        Ok(abproxy_proto::decode_status(v)?)
    }
}

/// After a failure: the proxy's status on a fresh connection (evidence),
/// then a best-effort OFF so that the next measurement starts thawed.
async fn status_then_thaw(addr: SocketAddr, ops: &Arc<FreezeOps>) -> String {
    let r = tokio::time::timeout(SETUP_TIMEOUT + REQUEST_TIMEOUT * 2, async {
        let mut a = Admin::connect(addr, ops.clone()).await?;
        let s = a.status().await?;
        let off = a.switch(false).await;
        anyhow::Ok((s, off))
    })
    .await;
    match r {
        Ok(Ok((s, Ok(_)))) => format!("proxy status then: {}; OFF sent", status_summary(&s)),
        Ok(Ok((s, Err(e)))) => {
            format!("proxy status then: {}; OFF: {e:#}", status_summary(&s))
        }
        Ok(Err(e)) => format!("proxy status unavailable: {e:#}"),
        Err(_) => "proxy status unavailable: timed out".into(),
    }
}

/// Measured ON/OFF cycles (after one unmeasured warm-up cycle): ON, wait for
/// its answer, stay frozen [`FREEZE_HOLD`], OFF, wait, pause [`FREEZE_GAP`].
async fn on_off_cycles(
    admin: &mut Admin,
    n: usize,
    on: &mut Vec<u64>,
    off: &mut Vec<u64>,
) -> Result<()> {
    for i in 0..=n {
        let t_on = admin
            .switch(true)
            .await
            .with_context(|| format!("cycle {i}"))?;
        tokio::time::sleep(FREEZE_HOLD).await;
        let t_off = admin
            .switch(false)
            .await
            .with_context(|| format!("cycle {i}"))?;
        if i > 0 {
            on.push(t_on.as_nanos() as u64);
            off.push(t_off.as_nanos() as u64);
        }
        tokio::time::sleep(FREEZE_GAP).await;
    }
    Ok(())
}

/// What one search+modify client of the loaded cycles did.
#[derive(Default)]
struct MixedResult {
    searches: u64,
    modifies: u64,
    max_lat: Duration,
    error: Option<String>,
}

/// A closed-loop client alternating a search and a modify of its own users,
/// bound as the admin, until `stop`.
async fn mixed_client(
    addr: SocketAddr,
    ops: Arc<FreezeOps>,
    (idx, conns): (usize, usize),
    ready: tokio::sync::mpsc::Sender<()>,
    stop: watch::Receiver<bool>,
) -> MixedResult {
    let mut res = MixedResult::default();
    let setup = async {
        let mut c = Conn::connect(addr).await?;
        c.call(&ops.bind).await.context("set-up bind")?;
        anyhow::Ok(c)
    };
    let mut c = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            res.error = Some(format!("{e:#}"));
            return res;
        }
        Err(_) => {
            res.error = Some("connection set-up timed out".into());
            return res;
        }
    };
    let _ = ready.send(()).await;
    drop(ready);
    let mut i = 0;
    while !*stop.borrow() {
        let k = ops.user(idx, conns, i);
        i += 1;
        for (is_modify, op) in [(false, &ops.search[k]), (true, &ops.modify[k])] {
            let t = Instant::now();
            match tokio::time::timeout(REQUEST_TIMEOUT, c.call(op)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    res.error = Some(format!("{e:#}"));
                    return res;
                }
                Err(_) => {
                    let what = if is_modify { "modify" } else { "search" };
                    res.error = Some(format!("{what}: no response within {REQUEST_TIMEOUT:?}"));
                    return res;
                }
            }
            res.max_lat = res.max_lat.max(t.elapsed());
            if is_modify {
                res.modifies += 1;
            } else {
                res.searches += 1;
            }
        }
    }
    c.unbind().await;
    res
}

/// The ON/OFF cycles while `conns` search+modify clients load the proxy.
/// Returns a note on the load.
async fn loaded_cycles(
    addr: SocketAddr,
    ops: &Arc<FreezeOps>,
    opts: &Opts,
    on: &mut Vec<u64>,
    off: &mut Vec<u64>,
) -> Result<String> {
    let conns = opts.freeze_conns;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(conns);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for idx in 0..conns {
        tasks.spawn(mixed_client(
            addr,
            ops.clone(),
            (idx, conns),
            ready_tx.clone(),
            stop_rx.clone(),
        ));
    }
    drop(ready_tx);
    let mut n_ready = 0;
    let _ = tokio::time::timeout(SETUP_TIMEOUT + Duration::from_secs(1), async {
        while n_ready < conns && ready_rx.recv().await.is_some() {
            n_ready += 1;
        }
    })
    .await;
    // Let the load settle before the first cycle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let cycles = async {
        let mut admin = Admin::connect(addr, ops.clone()).await?;
        on_off_cycles(&mut admin, opts.freeze_cycles, on, off).await
    }
    .await;
    let elapsed = t0.elapsed();
    let _ = stop_tx.send(true);
    let mut res = MixedResult::default();
    let mut errors = Vec::new();
    let collected = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(r) => {
                    res.searches += r.searches;
                    res.modifies += r.modifies;
                    res.max_lat = res.max_lat.max(r.max_lat);
                    errors.extend(r.error);
                }
                Err(e) => errors.push(format!("client task: {e}")),
            }
        }
    })
    .await;
    if collected.is_err() {
        errors.push("load clients did not stop in time; aborted".into());
        tasks.abort_all();
    }
    cycles?;
    if n_ready < conns || !errors.is_empty() {
        bail!(
            "{} of {conns} load clients ready; load errors: {}",
            n_ready,
            errors.join("; ")
        );
    }
    Ok(format!(
        "{conns} clients completed {} searches + {} modifies in {:.1} s of cycles \
         ({:.0} ops/s, frozen part of the time); slowest request {:.1} ms",
        res.searches,
        res.modifies,
        elapsed.as_secs_f64(),
        (res.searches + res.modifies) as f64 / elapsed.as_secs_f64(),
        res.max_lat.as_secs_f64() * 1000.0
    ))
}

/// The ways the backlog burst is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Burst {
    /// Queued by a frozen abproxy, released by OFF.
    Release,
    /// Sent straight to slapd.
    Direct,
    /// Sent through abproxy, not frozen.
    Unfrozen,
}

impl Burst {
    fn name(self) -> &'static str {
        match self {
            Burst::Release => "release",
            Burst::Direct => "direct",
            Burst::Unfrozen => "abproxy-unfrozen",
        }
    }
}

/// One burst's timing.
struct BurstResult {
    /// From OFF sent (release) or the requests sent (others) to the last
    /// response.
    elapsed: Duration,
    /// Release: from the start of sending to the proxy reporting the whole
    /// backlog queued.
    fill: Option<Duration>,
    /// Release: OFF's own answer time.
    off: Option<Duration>,
}

/// One client of a burst: on `start`, writes its batch of `m` pipelined
/// modifies in one go and reads `m` successful modify responses (IDs
/// `first_id..first_id+m`, each once). Returns when the first and the last
/// arrived.
async fn burst_client(
    mut c: Conn,
    batch: Vec<u8>,
    (first_id, m): (i32, usize),
    mut start: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) -> Result<(Instant, Instant)> {
    if start.wait_for(|s| *s).await.is_err() {
        bail!("burst abandoned");
    }
    c.stream
        .write_all(&batch)
        .await
        .context("sending the batch")?;
    let mut seen = vec![false; m];
    let mut first = None;
    let mut last = Instant::now();
    for got in 0..m {
        let (env, frame) = match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(r) => r.with_context(|| format!("after {got} of {m} responses"))?,
            Err(_) => bail!("only {got} of {m} modify responses by the deadline"),
        };
        last = Instant::now();
        first.get_or_insert(last);
        let slot = env
            .msgid
            .checked_sub(first_id)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < m && !seen[i]);
        match slot {
            Some(i) if env.op == op::MODIFY_RESPONSE && env.result_code == Some(0) => {
                seen[i] = true
            }
            _ => bail!(
                "unexpected response {} to message {} (result code {:?}: {}) after {got} of {m}",
                op::name(env.op),
                env.msgid,
                env.result_code,
                diagnostic(&frame)
            ),
        }
    }
    c.unbind().await;
    Ok((first.unwrap_or(last), last))
}

/// `conns` clients each pipeline `depth` modifies of their own users,
/// sent the `kind` way; times until every response is in.
async fn burst(
    kind: Burst,
    (direct, proxy): (SocketAddr, SocketAddr),
    ops: &Arc<FreezeOps>,
    conns: usize,
    depth: usize,
) -> Result<BurstResult> {
    let addr = if kind == Burst::Direct { direct } else { proxy };
    // Connect and bind every client, and encode its batch, before anything
    // is timed.
    let mut clients = Vec::with_capacity(conns);
    for idx in 0..conns {
        let setup = async {
            let mut c = Conn::connect(addr).await?;
            c.call(&ops.bind).await.context("set-up bind")?;
            anyhow::Ok(c)
        };
        let mut c = tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .map_err(|_| anyhow!("burst client {idx}: set-up timed out"))??;
        let mut batch = Vec::with_capacity(depth * 96);
        let first_id = c.next_id;
        for i in 0..depth {
            c.push_request(&mut batch, &ops.modify[ops.user(idx, conns, i)]);
        }
        clients.push((c, batch, first_id));
    }
    let mut admin = match kind {
        Burst::Release => {
            let mut a = Admin::connect(proxy, ops.clone()).await?;
            a.switch(true).await.context("ON before the backlog")?;
            Some(a)
        }
        _ => None,
    };
    let (start_tx, start_rx) = watch::channel(false);
    let deadline = tokio::time::Instant::now() + BACKLOG_TIMEOUT;
    let mut tasks = tokio::task::JoinSet::new();
    for (idx, (c, batch, first_id)) in clients.into_iter().enumerate() {
        let start = start_rx.clone();
        tasks.spawn(async move {
            let r = burst_client(c, batch, (first_id, depth), start, deadline).await;
            r.with_context(|| format!("client {idx}"))
        });
    }
    let t_start = Instant::now();
    let _ = start_tx.send(true);
    let (t0, fill, off) = match &mut admin {
        None => (t_start, None, None),
        Some(a) => {
            let want = (conns * depth) as u64;
            let mut polls = 0u64;
            let mut last;
            loop {
                last = a.status().await?;
                polls += 1;
                if last.queued_requests >= want || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if last.queued_requests != want || last.state != FreezeState::Frozen {
                bail!(
                    "backlog not queued as expected: want {want} queued requests, \
                     proxy reports {} after {polls} status polls",
                    status_summary(&last)
                );
            }
            let fill = t_start.elapsed();
            let t0 = Instant::now();
            let off = a.switch(false).await.context("OFF releasing the backlog")?;
            (t0, Some(fill), Some(off))
        }
    };
    let mut first = None::<Instant>;
    let mut last = t0;
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((f, l))) => {
                first = Some(first.map_or(f, |x| x.min(f)));
                last = last.max(l);
            }
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    if !errors.is_empty() {
        bail!(
            "{} of {conns} clients failed: {}",
            errors.len(),
            errors.join("; ")
        );
    }
    if let (Some(a), Some(f)) = (&mut admin, first) {
        if f < t0 {
            bail!(
                "a queued modify was answered {:?} before OFF was sent",
                t0 - f
            );
        }
        let s = a.status().await?;
        if s.queued_requests != 0 || s.state != FreezeState::Thawed {
            bail!("after the release: {}", status_summary(&s));
        }
    }
    if let Some(a) = admin {
        a.c.unbind().await;
    }
    Ok(BurstResult {
        elapsed: last - t0,
        fill,
        off,
    })
}

/// Everything the freeze section measured.
#[derive(Default)]
struct FreezeResults {
    on_idle: Vec<u64>,
    off_idle: Vec<u64>,
    on_loaded: Vec<u64>,
    off_loaded: Vec<u64>,
    bursts: BTreeMap<Burst, Vec<BurstResult>>,
    /// Per repetition: rate / direct rate.
    ratios: BTreeMap<Burst, Vec<f64>>,
    notes: Vec<String>,
    errors: Vec<String>,
}

async fn run_freeze(
    opts: &Opts,
    (direct, proxy): (SocketAddr, SocketAddr),
    res: &mut FreezeResults,
) {
    let ops = Arc::new(FreezeOps::new(opts.users));
    for round in 0..opts.rounds {
        eprintln!("load: round {} freeze: idle ON/OFF cycles...", round + 1);
        let idle = async {
            let mut admin = Admin::connect(proxy, ops.clone()).await?;
            on_off_cycles(
                &mut admin,
                opts.freeze_cycles,
                &mut res.on_idle,
                &mut res.off_idle,
            )
            .await
        }
        .await;
        if let Err(e) = idle {
            let st = status_then_thaw(proxy, &ops).await;
            res.errors.push(format!("idle cycles: {e:#}; {st}"));
        }

        eprintln!(
            "load: round {} freeze: ON/OFF cycles under {} search+modify clients...",
            round + 1,
            opts.freeze_conns
        );
        match loaded_cycles(proxy, &ops, opts, &mut res.on_loaded, &mut res.off_loaded).await {
            Ok(note) => res.notes.push(format!("round {}: {note}", round + 1)),
            Err(e) => {
                let st = status_then_thaw(proxy, &ops).await;
                res.errors.push(format!("loaded cycles: {e:#}; {st}"));
            }
        }

        for rep in 0..opts.backlog_reps {
            let mut order = [Burst::Release, Burst::Direct, Burst::Unfrozen];
            order.rotate_left((round * opts.backlog_reps + rep) % 3);
            let mut rates = BTreeMap::new();
            for kind in order {
                let r = burst(
                    kind,
                    (direct, proxy),
                    &ops,
                    opts.backlog_conns,
                    opts.backlog_depth,
                )
                .await;
                match r {
                    Ok(b) => {
                        let n = (opts.backlog_conns * opts.backlog_depth) as f64;
                        let rate = n / b.elapsed.as_secs_f64().max(1e-9);
                        eprintln!(
                            "load: round {} freeze: backlog {}x{} {:>16}: {:>9.0} req/s ({:.1} ms){}",
                            round + 1,
                            opts.backlog_conns,
                            opts.backlog_depth,
                            kind.name(),
                            rate,
                            b.elapsed.as_secs_f64() * 1000.0,
                            match (b.fill, b.off) {
                                (Some(f), Some(o)) => format!(
                                    "; queued in {:.1} ms, OFF answered in {:.2} ms",
                                    f.as_secs_f64() * 1000.0,
                                    o.as_secs_f64() * 1000.0
                                ),
                                _ => String::new(),
                            }
                        );
                        rates.insert(kind, rate);
                        res.bursts.entry(kind).or_default().push(b);
                    }
                    Err(e) => {
                        let st = status_then_thaw(proxy, &ops).await;
                        res.errors
                            .push(format!("backlog burst {}: {e:#}; {st}", kind.name()));
                    }
                }
            }
            if let Some(&d) = rates.get(&Burst::Direct) {
                for (&k, &r) in &rates {
                    res.ratios.entry(k).or_default().push(r / d);
                }
            }
        }
    }
    for v in [
        &mut res.on_idle,
        &mut res.off_idle,
        &mut res.on_loaded,
        &mut res.off_loaded,
    ] {
        v.sort_unstable();
    }
}

impl FreezeResults {
    fn table(&self, opts: &Opts) -> String {
        let ms = |v: Option<f64>| fmt_opt(v.map(|us| us / 1000.0), 2);
        let (c, m) = (opts.backlog_conns, opts.backlog_depth);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| freeze measurement | samples | p50 ms | p99 ms | requests/s | ratio to direct |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        let k = opts.freeze_conns;
        for (name, v) in [
            ("ON, idle".to_string(), &self.on_idle),
            ("OFF, idle".to_string(), &self.off_idle),
            (format!("ON, loaded ({k} clients)"), &self.on_loaded),
            (format!("OFF, loaded ({k} clients)"), &self.off_loaded),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | - | - |",
                v.len(),
                ms(pct_us(v, 50.0)),
                ms(pct_us(v, 99.0))
            );
        }
        for (kind, name) in [
            (
                Burst::Release,
                format!("backlog release, {c}x{m} queued modifies"),
            ),
            (Burst::Direct, format!("{c}x{m} pipelined modifies, direct")),
            (
                Burst::Unfrozen,
                format!("{c}x{m} pipelined modifies, abproxy not frozen"),
            ),
        ] {
            let runs = self.bursts.get(&kind).map_or(&[][..], Vec::as_slice);
            let mut el: Vec<u64> = runs.iter().map(|b| b.elapsed.as_nanos() as u64).collect();
            el.sort_unstable();
            let mut rates: Vec<f64> = runs
                .iter()
                .map(|b| (c * m) as f64 / b.elapsed.as_secs_f64().max(1e-9))
                .collect();
            let ratio = self.ratios.get(&kind).and_then(|v| median(&mut v.clone()));
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} |",
                runs.len(),
                ms(pct_us(&el, 50.0)),
                ms(pct_us(&el, 99.0)),
                fmt_opt(median(&mut rates), 0),
                fmt_opt(ratio, 3)
            );
        }
        s
    }

    fn explanations(&self, opts: &Opts) -> String {
        let (c, m, k) = (opts.backlog_conns, opts.backlog_depth, opts.freeze_conns);
        let release = self
            .bursts
            .get(&Burst::Release)
            .map_or(&[][..], Vec::as_slice);
        let mut fill: Vec<u64> = release
            .iter()
            .filter_map(|b| b.fill.map(|d| d.as_nanos() as u64))
            .collect();
        fill.sort_unstable();
        let mut off: Vec<u64> = release
            .iter()
            .filter_map(|b| b.off.map(|d| d.as_nanos() as u64))
            .collect();
        off.sort_unstable();
        let ms = |v: Option<f64>| fmt_opt(v.map(|us| us / 1000.0), 2);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "- ON, idle: time from sending Allow-Backup ON (all backends, as the admin) to its success \
             answer, no other traffic; includes the proxy's rootDSE re-read and the (empty) drain."
        );
        let _ = writeln!(
            s,
            "- OFF, idle: time from sending OFF (after {} ms frozen) to its success answer, no other traffic.",
            FREEZE_HOLD.as_millis()
        );
        let _ = writeln!(
            s,
            "- ON, loaded: ON while {k} closed-loop clients (bound as the admin) alternate a base search and \
             a modify of their own entries through abproxy; ON waits for the in-flight modifies to drain."
        );
        let _ = writeln!(
            s,
            "- OFF, loaded: OFF under the same load, after {} ms frozen (the clients' modifies queue meanwhile; \
             OFF answers without waiting for their release).",
            FREEZE_HOLD.as_millis()
        );
        let _ = writeln!(
            s,
            "- backlog release: ON, then {c} clients each pipeline {m} modifies (queued, until the status \
             reports {} queued), then OFF; time and rate from sending OFF to the last modify response; \
             ratio = release rate / direct rate of the same repetition (median).",
            c * m
        );
        let _ = writeln!(
            s,
            "- direct: the same {c}x{m} pipelined modifies (same entries, connections bound beforehand) sent \
             straight to slapd; time from sending to the last response."
        );
        let _ = writeln!(
            s,
            "- abproxy not frozen: the same burst through abproxy with no freeze (the proxying cost alone, \
             for comparison with the release)."
        );
        let _ = writeln!(
            s,
            "\nBacklog: queued in {} ms (p50, from the first request sent to the status reporting all {} queued); \
             OFF answered in {} ms (p50) while releasing it.",
            ms(pct_us(&fill, 50.0)),
            c * m,
            ms(pct_us(&off, 50.0)),
        );
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nLoad during the loaded cycles:");
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }
}

// ---------------------------------------------------------------- proxies

/// Waits until a proxy child accepts connections on every address; an
/// error with its log when it exits first, or when it does not listen
/// within `limit` (then it is killed).
fn wait_listening(
    child: &mut Child,
    addrs: &[SocketAddr],
    log: &Path,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            let out = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{name} exited ({status}):\n{out}");
        }
        let up = |a: &SocketAddr| {
            std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
        };
        if addrs.iter().all(up) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not listen on {addrs:?} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- abproxy

/// abproxy as its own process, as a deployment runs it and as haproxy runs
/// here: the binary this bench was built with (`CARGO_BIN_EXE_abproxy`),
/// `serve --config` with the bench's settings (`--proxy-threads`, the freeze
/// section's limits, the TLS section's certificate). A proxy inside the
/// bench's own process shared it with the load generator (allocator, page
/// tables, scheduler accounting) and measured a few points lower than the
/// same binary on its own. Stopped with SIGTERM (graceful shutdown) on drop.
struct AbproxyProcess {
    child: Child,
    addr: SocketAddr,
    /// The `ldaps://` listener when TLS is measured.
    ldaps: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

impl AbproxyProcess {
    fn start(
        upstream: &str,
        opts: &Opts,
        tls: Option<&(PathBuf, PathBuf)>,
    ) -> Result<AbproxyProcess> {
        let dir = tempfile::Builder::new()
            .prefix("abproxy-load-abproxy")
            .tempdir()?;
        let mut last_err = anyhow!("not started");
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let ldaps = match tls {
                Some(_) => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?))),
                None => None,
            };
            let mut listen = vec![toml::Value::from(format!("ldap://{addr}"))];
            listen.extend(ldaps.map(|a| toml::Value::from(format!("ldaps://{a}"))));
            let mut cfg = toml::Table::new();
            cfg.insert("listen".into(), toml::Value::Array(listen));
            cfg.insert("upstream".into(), upstream.into());
            cfg.insert("shutdown_grace_secs".into(), 1.into());
            cfg.insert("threads".into(), (opts.proxy_threads as i64).into());
            cfg.insert("freeze".into(), toml::Value::Table(freeze_config(opts)));
            if let Some((cert, key)) = tls {
                let mut t = toml::Table::new();
                t.insert("cert_file".into(), cert.display().to_string().into());
                t.insert("key_file".into(), key.display().to_string().into());
                cfg.insert("tls".into(), toml::Value::Table(t));
            }
            let file = dir.path().join("abproxy.toml");
            std::fs::write(&file, toml::to_string(&cfg)?)?;
            let log = std::fs::File::create(dir.path().join("abproxy.log"))?;
            let mut child = Command::new(env!("CARGO_BIN_EXE_abproxy"))
                .arg("serve")
                .arg("--config")
                .arg(&file)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting the abproxy binary")?;
            let addrs: Vec<SocketAddr> = std::iter::once(addr).chain(ldaps).collect();
            let log = dir.path().join("abproxy.log");
            match wait_listening(&mut child, &addrs, &log, "abproxy", Duration::from_secs(10)) {
                Ok(()) => {
                    return Ok(AbproxyProcess {
                        child,
                        addr,
                        ldaps,
                        dir,
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// SIGTERM, then waits for the graceful shutdown (killed after 10 s);
    /// says so if it was not clean.
    fn stop(mut self) {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(status)) => {
                    let log = std::fs::read_to_string(self.dir.path().join("abproxy.log"))
                        .unwrap_or_default();
                    eprintln!("load: abproxy exited with {status}:\n{log}");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!("load: abproxy did not shut down within 10 s");
                    return;
                }
            }
        }
    }
}

impl Drop for AbproxyProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- haproxy

/// A haproxy child process in TCP mode in front of slapd; killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    version: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    let l = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

impl Haproxy {
    fn start(bin: &Path, upstream: SocketAddr) -> Result<Haproxy> {
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "haproxy (unknown version)".into());
        let dir = tempfile::Builder::new()
            .prefix("abproxy-load-haproxy")
            .tempdir()?;
        let mut last_err = anyhow!("not started");
        for _ in 0..5 {
            let port = free_port()?;
            let cfg = dir.path().join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n    nbthread 1\n    maxconn 4096\n\n\
                     defaults\n    mode tcp\n    timeout connect 5s\n    \
                     timeout client 5m\n    timeout server 5m\n\n\
                     frontend ldap\n    bind 127.0.0.1:{port}\n    default_backend slapd\n\n\
                     backend slapd\n    server slapd {upstream}\n"
                ),
            )?;
            let log = std::fs::File::create(dir.path().join("haproxy.out"))?;
            let mut child = Command::new(bin)
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let log = dir.path().join("haproxy.out");
            match wait_listening(&mut child, &[addr], &log, "haproxy", Duration::from_secs(5)) {
                Ok(()) => {
                    return Ok(Haproxy {
                        child,
                        addr,
                        version,
                        _dir: dir,
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }
}

/// The running reference column: HAProxy, or a second abproxy (A/A).
enum RefProcess {
    Haproxy(Haproxy),
    Abproxy(AbproxyProcess),
}

impl RefProcess {
    fn addr(&self) -> SocketAddr {
        match self {
            RefProcess::Haproxy(h) => h.addr,
            RefProcess::Abproxy(a) => a.addr,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            RefProcess::Haproxy(h) => h.child.id(),
            RefProcess::Abproxy(a) => a.child.id(),
        }
    }

    fn describe(&self) -> String {
        match self {
            RefProcess::Haproxy(h) => format!("{} (nbthread 1, mode tcp, no logging)", h.version),
            RefProcess::Abproxy(_) => "a second abproxy process started as the first \
                 (A/A control: the columns differ only by chance and by the benchmark's own bias)"
                .into(),
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The order of the targets in round `round`: every permutation in turn
/// (six for three targets), so over 6k rounds each target runs in each
/// position, and right after each other target, equally often. A rotation
/// (`direct, abproxy, haproxy`, then shifted) put abproxy right before
/// HAProxy in two rounds of three.
fn round_order<T: Clone>(targets: &[T], round: usize) -> Vec<T> {
    let n = targets.len();
    let count: usize = (1..=n).product();
    // The `round % n!`-th permutation in lexicographic order of positions
    // (factorial number system).
    let mut k = round % count;
    let mut left: Vec<T> = targets.to_vec();
    let mut out = Vec::with_capacity(n);
    for i in (1..=n).rev() {
        let block: usize = (1..i).product();
        out.push(left.remove(k / block));
        k %= block;
    }
    out
}

/// Run by `cargo test`: the orders of [`round_order`] are balanced. Over
/// six rounds of three targets, six different orders, each target twice in
/// each position and each ordered pair twice next to each other; round 6
/// starts again; two targets alternate.
fn check_round_order() {
    let t = [0usize, 1, 2];
    let orders: Vec<Vec<usize>> = (0..6).map(|r| round_order(&t, r)).collect();
    let mut distinct = orders.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 6, "six different orders: {orders:?}");
    for target in t {
        for pos in 0..3 {
            let n = orders.iter().filter(|o| o[pos] == target).count();
            assert_eq!(n, 2, "target {target} at position {pos}: {orders:?}");
        }
        for next in t.iter().filter(|&&x| x != target) {
            let n = orders
                .iter()
                .filter(|o| o.windows(2).any(|w| w == [target, *next]))
                .count();
            assert_eq!(n, 2, "{target} right before {next}: {orders:?}");
        }
    }
    assert_eq!(round_order(&t, 6), orders[0]);
    assert_eq!(round_order(&[7, 8], 0), [7, 8]);
    assert_eq!(round_order(&[7, 8], 1), [8, 7]);
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    Abproxy,
    Haproxy,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Abproxy => "abproxy",
            Target::Haproxy => reference_name(),
        }
    }
}

/// All rounds of one target at one (workload, conns).
#[derive(Default)]
struct Agg {
    ops: Vec<f64>,
    /// The proxy's CPU µs per operation, per round.
    cpu: Vec<f64>,
    lat: Vec<u64>,
    errors: Vec<String>,
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A distribution-free confidence interval for the median of `sorted`
/// (ascending): the order statistics x(k) .. x(n+1-k) for the largest k whose
/// coverage, 1 - 2 P(Binomial(n, 1/2) < k), is still at least `conf`.
/// Returns the bounds and their exact coverage; None when even the whole
/// range (k = 1) covers less than `conf` (too few rounds).
fn median_interval(sorted: &[f64], conf: f64) -> Option<(f64, f64, f64)> {
    let n = sorted.len();
    // P(Binomial(n, 1/2) <= j) for j = 0..n.
    let mut cdf = Vec::with_capacity(n + 1);
    let (mut pmf, mut acc) = (0.5f64.powi(n as i32), 0.0);
    for j in 0..=n {
        acc += pmf;
        cdf.push(acc);
        pmf *= (n - j) as f64 / (j + 1) as f64;
    }
    let coverage = |k: usize| 1.0 - 2.0 * cdf[k - 1];
    let k = (1..=n / 2).take_while(|&k| coverage(k) >= conf).last()?;
    Some((sorted[k - 1], sorted[n - k], coverage(k)))
}

/// Percentile `p` (0..=100) of sorted nanoseconds, in µs.
fn pct_us(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0)
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

/// One value per probe (proxy, slapd, load generator), each right-aligned
/// in 4 columns, for a point's log line.
fn per_probe(v: &[Option<f64>], prec: usize) -> String {
    (0..3)
        .map(|i| format!("{:>4}", fmt_opt(v.get(i).copied().flatten(), prec)))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Results {
    /// (workload, conns, target) -> aggregate.
    cells: BTreeMap<(Kind, usize, Target), Agg>,
    /// (workload, conns, target) -> per-round ratio to direct.
    ratios: BTreeMap<(Kind, usize, Target), Vec<f64>>,
    /// (workload, conns) -> per round, abproxy against HAProxy measured in
    /// the same round: ops/s ratio and proxy CPU µs/op difference.
    head_to_head: BTreeMap<(Kind, usize), Vec<Paired>>,
}

/// One round of abproxy against HAProxy at one point.
struct Paired {
    /// abproxy's ops/s / HAProxy's.
    ops_ratio: f64,
    /// abproxy's proxy CPU µs/op - HAProxy's.
    cpu_diff: Option<f64>,
}

impl Results {
    fn p(&self, k: Kind, c: usize, t: Target, p: f64) -> Option<f64> {
        self.cells.get(&(k, c, t)).and_then(|a| pct_us(&a.lat, p))
    }

    fn ops(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.cells
            .get(&(k, c, t))
            .and_then(|a| median(&mut a.ops.clone()))
    }

    /// Median proxy CPU µs per operation.
    fn cpu(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.cells
            .get(&(k, c, t))
            .and_then(|a| median(&mut a.cpu.clone()))
    }

    fn ratio(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.ratios
            .get(&(k, c, t))
            .and_then(|v| median(&mut v.clone()))
    }

    fn table(&self, opts: &Opts, haproxy: bool) -> String {
        let mut s = String::new();
        let h = |x: &str| if haproxy { x.to_string() } else { "n/a".into() };
        let r = reference_name();
        let _ = writeln!(
            s,
            "| workload | conns | direct ops/s | abproxy ops/s | {r} ops/s | abproxy/direct | {r}/direct \
             | direct p50/p99 µs | abproxy p50/p99 µs | {r} p50/p99 µs | abproxy +p99 µs \
             | abproxy CPU µs/op | {r} CPU µs/op |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for &k in &opts.workloads {
            for &c in &opts.conns {
                let ops = |t| fmt_opt(self.ops(k, c, t), 0);
                let ratio = |t| fmt_opt(self.ratio(k, c, t), 3);
                let lat = |t| {
                    format!(
                        "{} / {}",
                        fmt_opt(self.p(k, c, t, 50.0), 0),
                        fmt_opt(self.p(k, c, t, 99.0), 0)
                    )
                };
                let added = match (
                    self.p(k, c, Target::Abproxy, 99.0),
                    self.p(k, c, Target::Direct, 99.0),
                ) {
                    (Some(a), Some(d)) => format!("{:+.0}", a - d),
                    _ => "-".into(),
                };
                let cpu = |t| fmt_opt(self.cpu(k, c, t), 1);
                let _ = writeln!(
                    s,
                    "| {} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {added} | {} | {} |",
                    k.name(),
                    ops(Target::Direct),
                    ops(Target::Abproxy),
                    h(&ops(Target::Haproxy)),
                    ratio(Target::Abproxy),
                    h(&ratio(Target::Haproxy)),
                    lat(Target::Direct),
                    lat(Target::Abproxy),
                    h(&lat(Target::Haproxy)),
                    cpu(Target::Abproxy),
                    h(&cpu(Target::Haproxy)),
                );
            }
        }
        s
    }

    /// abproxy against HAProxy, paired by round (both measured within
    /// seconds of each other, so slow phases of a shared machine hit both):
    /// the median of the per-round ops/s ratios with a distribution-free
    /// confidence interval for that median, the rounds abproxy was ahead,
    /// and the median difference in proxy CPU per operation.
    fn head_to_head_table(&self, opts: &Opts) -> String {
        let mut s = String::new();
        let r = reference_name();
        let _ = writeln!(
            s,
            "| workload | conns | abproxy/{r} ops/s, median of rounds | interval (confidence) | rounds abproxy ahead | proxy CPU µs/op, abproxy - {r} |\n\
             |---|---:|---:|---:|---:|---:|"
        );
        for &k in &opts.workloads {
            for &c in &opts.conns {
                let Some(rounds) = self.head_to_head.get(&(k, c)) else {
                    continue;
                };
                let mut r: Vec<f64> = rounds.iter().map(|x| x.ops_ratio).collect();
                let mut cpu: Vec<f64> = rounds.iter().filter_map(|x| x.cpu_diff).collect();
                r.sort_by(f64::total_cmp);
                let ahead = r.iter().filter(|&&x| x > 1.0).count();
                let m = median(&mut r);
                let interval = median_interval(&r, 0.9).map_or_else(
                    || "- (too few rounds)".to_string(),
                    |(lo, hi, conf)| format!("{lo:.3} .. {hi:.3} ({:.0} %)", conf * 100.0),
                );
                let _ = writeln!(
                    s,
                    "| {} | {c} | {} | {interval} | {ahead} of {} | {} |",
                    k.name(),
                    fmt_opt(m, 3),
                    r.len(),
                    median(&mut cpu).map_or_else(|| "-".into(), |d| format!("{d:+.1}")),
                );
            }
        }
        s
    }

    /// Added latency at 1 connection, per workload: p99 (and p50, which is
    /// far less sensitive to scheduling noise) of a target minus direct's.
    fn added_latency_at_1(&self, opts: &Opts, haproxy: bool) -> String {
        if !opts.conns.contains(&1) {
            return "(no 1-connection point measured)".into();
        }
        let mut parts = Vec::new();
        for &k in &opts.workloads {
            let delta = |t, p| match (self.p(k, 1, t, p), self.p(k, 1, Target::Direct, p)) {
                (Some(x), Some(d)) => format!("{:+.0}", x - d),
                _ => "-".into(),
            };
            let both = |t| format!("{} µs (p50 {} µs)", delta(t, 99.0), delta(t, 50.0));
            let mut p = format!("{} abproxy {}", k.name(), both(Target::Abproxy));
            if haproxy {
                let _ = write!(p, ", {} {}", reference_name(), both(Target::Haproxy));
            }
            parts.push(p);
        }
        parts.join("; ")
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test` runs this target (`test = true`) without `--bench`.
        check_round_order();
        println!(
            "load: round order checked; benchmark skipped (not run by `cargo bench`; use `cargo bench --bench load`)"
        );
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("load benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let opts = Opts::parse(args)?;
    let secs = Duration::from_secs_f64(opts.secs);

    eprintln!("load: starting slapd with {} users...", opts.users);
    let pki = if opts.tls {
        Some(tls_section::pki().context("making the TLS certificates (needs openssl)")?)
    } else {
        None
    };
    let slapd = Slapd::start(SlapdOptions {
        users: opts.users,
        nosync: true,
        tls: pki.as_ref().map(|p| p.slapd.clone()),
        ..Default::default()
    })
    .context("starting slapd (needs the slapd package)")?;
    let direct = slapd.addr();

    let haproxy = match &opts.haproxy {
        // Only the throughput table has a haproxy column.
        Some(_) if opts.workloads.is_empty() => None,
        Some(Reference::Haproxy(bin)) => match Haproxy::start(bin, direct) {
            Ok(h) => Some(RefProcess::Haproxy(h)),
            Err(e) => {
                eprintln!("load: haproxy column skipped: {e:#}");
                None
            }
        },
        Some(Reference::Itself) => {
            let _ = REFERENCE_NAME.set("abproxy2");
            let p = AbproxyProcess::start(&slapd.url(), &opts, None)
                .context("starting the second abproxy (--haproxy self)")?;
            Some(RefProcess::Abproxy(p))
        }
        None => None,
    };
    let haproxy_note = match (&haproxy, &opts.haproxy_note) {
        (Some(_), _) => None,
        (None, _) if opts.workloads.is_empty() => Some("no throughput workload".into()),
        (None, Some(n)) => Some(n.clone()),
        (None, None) => Some("haproxy failed to start".into()),
    };

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads)
        .thread_name(LOADGEN_THREAD)
        .enable_all()
        .build()?;
    let proxy = AbproxyProcess::start(&slapd.url(), &opts, pki.as_ref().map(|p| &p.proxy))
        .context("starting abproxy")?;
    let abproxy_addr = proxy.addr;

    let mut targets = vec![(Target::Direct, direct), (Target::Abproxy, abproxy_addr)];
    if let Some(h) = &haproxy {
        targets.push((Target::Haproxy, h.addr()));
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut header = String::new();
    let _ = writeln!(
        header,
        "## abproxy load benchmark\n\n\
         - {:.2} s per point after {} ms warm-up, {} round(s); closed-loop clients, one connection each\n\
         - slapd {} (`{}` users, nosync); abproxy `serve`, own process (threads = {}); load generator {} threads; {} cores\n\
         - {}: {}",
        opts.secs,
        opts.warmup.as_millis(),
        opts.rounds,
        direct,
        opts.users,
        opts.proxy_threads,
        opts.client_threads,
        cores,
        reference_name(),
        match (&haproxy, &haproxy_note) {
            (Some(h), _) => h.describe(),
            (None, Some(n)) => format!("n/a: {n}"),
            (None, None) => "n/a".into(),
        }
    );
    eprintln!("{header}");

    let mut results = Results {
        cells: BTreeMap::new(),
        ratios: BTreeMap::new(),
        head_to_head: BTreeMap::new(),
    };
    let workloads: Vec<Arc<Workload>> = opts
        .workloads
        .iter()
        .map(|&k| Arc::new(Workload::new(k, opts.users)))
        .collect();

    for round in 0..opts.rounds {
        for w in &workloads {
            for &conns in &opts.conns {
                let order = round_order(&targets, round);
                let mut round_ops = BTreeMap::new();
                let mut round_cpu = BTreeMap::new();
                for &(t, addr) in &order {
                    let probe = match t {
                        Target::Direct => None,
                        Target::Abproxy => Some(CpuProbe::Process(proxy.child.id())),
                        Target::Haproxy => haproxy.as_ref().map(|h| CpuProbe::Process(h.pid())),
                    };
                    let probes = vec![
                        probe,
                        Some(CpuProbe::Process(slapd.pid())),
                        Some(CpuProbe::Threads(LOADGEN_THREAD)),
                    ];
                    let p = client_rt.block_on(run_point(
                        addr,
                        w.clone(),
                        conns,
                        opts.warmup,
                        secs,
                        probes,
                    ));
                    let cpu = |i: usize| p.cpu_us_per_op.get(i).copied().flatten();
                    eprintln!(
                        "load: round {} {:>6} conns={:<3} {:>8}: {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs  CPU µs/op proxy {:>5} slapd {:>5} loadgen {:>5}  switches/op {}  run-queue wait µs/op {}  migrations/op {}  TCP segments/op {:>4}{}",
                        round + 1,
                        w.kind.name(),
                        conns,
                        t.name(),
                        p.ops_per_sec,
                        fmt_opt(pct_us(&p.lat, 50.0), 0),
                        fmt_opt(pct_us(&p.lat, 99.0), 0),
                        fmt_opt(cpu(0), 1),
                        fmt_opt(cpu(1), 1),
                        fmt_opt(cpu(2), 1),
                        per_probe(&p.switches_per_op, 2),
                        per_probe(&p.run_delay_us_per_op, 1),
                        per_probe(&p.migrations_per_op, 3),
                        fmt_opt(p.segments_per_op, 2),
                        if p.errors.is_empty() {
                            String::new()
                        } else {
                            format!("  ({} errors: {})", p.errors.len(), p.errors[0])
                        }
                    );
                    let agg = results.cells.entry((w.kind, conns, t)).or_default();
                    agg.cpu.extend(cpu(0));
                    if let Some(c) = cpu(0) {
                        round_cpu.insert(t, c);
                    }
                    if p.ops_per_sec > 0.0 {
                        agg.ops.push(p.ops_per_sec);
                        round_ops.insert(t, p.ops_per_sec);
                    }
                    agg.lat.extend_from_slice(&p.lat);
                    agg.errors.extend(p.errors);
                }
                if let Some(&d) = round_ops.get(&Target::Direct) {
                    for (&t, &o) in &round_ops {
                        results
                            .ratios
                            .entry((w.kind, conns, t))
                            .or_default()
                            .push(o / d);
                    }
                }
                if let (Some(a), Some(h)) = (
                    round_ops.get(&Target::Abproxy),
                    round_ops.get(&Target::Haproxy),
                ) {
                    let cpu = match (
                        round_cpu.get(&Target::Abproxy),
                        round_cpu.get(&Target::Haproxy),
                    ) {
                        (Some(a), Some(h)) => Some(a - h),
                        _ => None,
                    };
                    results
                        .head_to_head
                        .entry((w.kind, conns))
                        .or_default()
                        .push(Paired {
                            ops_ratio: a / h,
                            cpu_diff: cpu,
                        });
                }
            }
        }
    }
    for agg in results.cells.values_mut() {
        agg.lat.sort_unstable();
    }

    let mut freeze = FreezeResults::default();
    if opts.freeze {
        client_rt.block_on(run_freeze(&opts, (direct, abproxy_addr), &mut freeze));
    }

    let mut reads = freeze_reads::ReadsResults::default();
    let reads_opts = freeze_reads::ReadsOpts {
        rounds: opts.rounds,
        warmup: opts.warmup,
        secs,
        readers: opts.read_conns,
        writers: opts.read_writers,
        write_rate: opts.write_rate,
    };
    if opts.freeze_reads {
        client_rt.block_on(freeze_reads::run(
            &reads_opts,
            (abproxy_addr, proxy.child.id()),
            Arc::new(FreezeOps::new(opts.users)),
            &mut reads,
        ));
    }

    let mut tls = tls_section::TlsResults::default();
    if let Some(p) = &pki {
        let slapd_ldaps: SocketAddr = slapd
            .ldaps_url()
            .context("slapd's ldaps listener")?
            .trim_start_matches("ldaps://")
            .parse()?;
        let proxy_ldaps = proxy.ldaps.context("abproxy's ldaps listener")?;
        for round in 0..opts.rounds {
            client_rt.block_on(tls_section::run_round(
                round,
                &opts.conns,
                opts.users,
                opts.warmup,
                secs,
                &p.ca,
                [slapd_ldaps, proxy_ldaps],
                &mut tls,
            ))?;
        }
    }

    proxy.stop();
    client_rt.shutdown_timeout(Duration::from_secs(2));
    drop(haproxy);
    drop(slapd);

    let has_haproxy = targets.iter().any(|(t, _)| *t == Target::Haproxy);
    println!("{header}");
    if !opts.workloads.is_empty() {
        print!("{}", results.table(&opts, has_haproxy));
        println!();
        println!(
            "Added p99 latency at 1 connection (target p99 - direct p99): {}",
            results.added_latency_at_1(&opts, has_haproxy)
        );
        if has_haproxy {
            println!();
            print!("{}", results.head_to_head_table(&opts));
        }
        if let Some(n) = &haproxy_note {
            println!("haproxy columns skipped: {n}");
        }
    }
    if opts.freeze {
        if !opts.workloads.is_empty() {
            println!();
        }
        println!(
            "### Allow-Backup freeze\n\n\
             {} ON/OFF cycles per scenario (+1 warm-up), {} ms frozen per cycle, {} ms between cycles; \
             backlog {} clients x {} modifies, {} repetition(s) per round; all backends readonly \
             (from the rootDSE), freeze.max_drain_secs {}, queue limits above the backlog\n",
            opts.freeze_cycles,
            FREEZE_HOLD.as_millis(),
            FREEZE_GAP.as_millis(),
            opts.backlog_conns,
            opts.backlog_depth,
            opts.backlog_reps,
            FREEZE_MAX_DRAIN_SECS,
        );
        print!("{}", freeze.table(&opts));
        println!();
        print!("{}", freeze.explanations(&opts));
        if !freeze.errors.is_empty() {
            println!("\nFreeze errors (each stopped its measurement):");
            for e in &freeze.errors {
                println!("- {e}");
            }
        }
    }
    if opts.freeze_reads {
        if !opts.workloads.is_empty() || opts.freeze {
            println!();
        }
        println!(
            "### Reads during a freeze\n\n\
             {} round(s) of an unfrozen phase before each frozen one, {:.2} s per phase after {} ms; \
             {} readers, {} writers at {} modifies/s each in the phases with writers\n",
            opts.rounds,
            opts.secs,
            opts.warmup.as_millis(),
            opts.read_conns,
            opts.read_writers,
            opts.write_rate,
        );
        print!("{}", reads.table());
        println!();
        print!("{}", reads.explanations(&reads_opts));
    }
    if opts.tls {
        println!(
            "\n### TLS\n\nslapd's own TLS (ldaps://) vs abproxy terminating TLS (ldaps://, clear to slapd); \
             TLS 1.3, EC P-256 certificates, no session resumption; `connect` = TCP connect, full \
             handshake, anonymous bind, unbind, close; `search` = the search workload on one TLS \
             connection per client\n"
        );
        print!("{}", tls.table(&opts.conns));
    }
    let mut errs: Vec<String> = Vec::new();
    for ((k, c, t), a) in &results.cells {
        if !a.errors.is_empty() {
            errs.push(format!(
                "{} conns={c} {}: {} error(s), first: {}",
                k.name(),
                t.name(),
                a.errors.len(),
                a.errors[0]
            ));
        }
    }
    if !errs.is_empty() {
        println!("\nErrors (points with errors stopped those clients early):");
        for e in errs {
            println!("- {e}");
        }
    }
    Ok(())
}
