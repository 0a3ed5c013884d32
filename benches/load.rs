//! End-to-end load benchmark: what does putting abproxy in front of slapd
//! cost, compared with talking to slapd directly and with a plain TCP proxy
//! (haproxy in `mode tcp`, when installed)?
//!
//! ```text
//! cargo bench --bench load                           # 3 s per point
//! LOAD_SECS=2 cargo bench --bench load               # 2 s per point
//! cargo bench --bench load -- --quick                # smoke run, ~0.5 s per point
//! cargo bench --bench load -- --secs 5 --rounds 3 --conns 1,8 --workloads search,modify
//! ```
//!
//! One run starts a throwaway slapd (`abproxy::lab`, 1000 users, no fsync),
//! abproxy **in-process** (`ProxyHandle::spawn` on its own multi-thread tokio
//! runtime, threads named `abproxy`), and, if `haproxy` is on `PATH`, a
//! haproxy with `nbthread 1`, `mode tcp`, no logging, config in a temporary
//! directory. The load generator runs on a separate tokio runtime (threads
//! named `loadgen`). Everything shares the machine's cores, so on a small
//! machine the numbers are "what the whole box does", and the ratios to
//! `direct` are what matter.
//!
//! For each workload x connection count (x round), the targets run back to
//! back (direct, abproxy, haproxy; the order rotates each round) to reduce
//! drift. Each connection is a closed-loop client: it sends one request
//! (pre-encoded protocolOp, fresh message ID) and waits for its final
//! response before the next; the requests of one connection go to users
//! `conn+1, conn+1+conns, ...` so concurrent clients never touch the same
//! entry. Workloads:
//! * `search`: anonymous base-scope search of `uid=userK,...`, all user
//!   attributes (one entry + done);
//! * `bind`: simple bind as `userK` / `passK` (the same connection rebinds);
//! * `modify`: replace `description` of `userK`, on a connection bound once as
//!   the root DN.
//!
//! Options (arguments override environment variables):
//! | argument           | environment           | default              |
//! |--------------------|-----------------------|----------------------|
//! | `--secs S`         | `LOAD_SECS`           | 3 (quick: 0.5)       |
//! | `--warmup-ms MS`   | `LOAD_WARMUP_MS`      | 500 (quick: 100)     |
//! | `--conns 1,8,32`   | `LOAD_CONNS`          | 1,8,32               |
//! | `--workloads LIST` | `LOAD_WORKLOADS`      | search,bind,modify   |
//! | `--rounds N`       | `LOAD_ROUNDS`         | 1                    |
//! | `--quick`          | `LOAD_QUICK=1`        | off                  |
//! | `--proxy-threads N`| `LOAD_PROXY_THREADS`  | 2                    |
//! | `--client-threads N`| `LOAD_CLIENT_THREADS`| 2                    |
//! | `--users N`        | `LOAD_USERS`          | 1000                 |
//! | `--haproxy PATH\|0` | `LOAD_HAPROXY`       | `haproxy` on `PATH`  |
//!
//! With several rounds, ops/s is the median over rounds, the ratios are the
//! medians of the per-round ratios, and percentiles are over all rounds'
//! samples. Every loop is time-limited (5 s per request, a deadline per
//! point): the benchmark always ends by itself. Under `cargo test
//! --all-targets` (no `--bench` argument) it does nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abproxy::endpoint::Endpoint;
use abproxy::lab::{user_dn, user_pw, Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW};
use abproxy::wire::ber::{read_header, write_len};
use abproxy::wire::{op, pdu, Envelope, FrameCodec};
use abproxy::{Config, ProxyHandle};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindRequest, LdapDerefAliases, LdapFilter, LdapModify, LdapModifyRequest,
    LdapModifyType, LdapMsg, LdapOp, LdapPartialAttribute, LdapSearchRequest, LdapSearchScope,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::codec::Decoder;

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
    rounds: usize,
    proxy_threads: usize,
    client_threads: usize,
    users: usize,
    /// `None`: no haproxy column.
    haproxy: Option<PathBuf>,
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

fn parse_workloads(s: &str) -> Result<Vec<Kind>> {
    let v = parse_list(s, |p| match p {
        "search" => Ok(Kind::Search),
        "bind" => Ok(Kind::Bind),
        "modify" => Ok(Kind::Modify),
        _ => bail!("unknown workload {p:?} (search, bind, modify)"),
    })?;
    if v.is_empty() {
        bail!("no workload");
    }
    Ok(v)
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
        let workloads = parse_workloads(
            kv.get("workloads")
                .map_or("search,bind,modify", String::as_str),
        )?;
        let rounds = (num("rounds", 1.0)? as usize).clamp(1, 100);
        let proxy_threads = (num("proxy-threads", 2.0)? as usize).clamp(1, 64);
        let client_threads = (num("client-threads", 2.0)? as usize).clamp(1, 64);
        let users = (num("users", 1000.0)? as usize).clamp(1, 1_000_000);
        let (haproxy, haproxy_note) = match kv.get("haproxy").map(String::as_str) {
            Some("0") | Some("off") | Some("no") => {
                (None, Some("disabled (LOAD_HAPROXY=0)".into()))
            }
            Some(p) => {
                let p = if p.contains('/') {
                    Some(PathBuf::from(p)).filter(|p| is_executable(p))
                } else {
                    find_on_path(p)
                };
                match p {
                    Some(p) => (Some(p), None),
                    None => (None, Some("the given haproxy is not executable".into())),
                }
            }
            None => match find_on_path("haproxy") {
                Some(p) => (Some(p), None),
                None => (None, Some("haproxy not found on PATH".into())),
            },
        };
        Ok(Opts {
            secs,
            warmup,
            conns,
            workloads,
            rounds,
            proxy_threads,
            client_threads,
            users,
            haproxy,
            haproxy_note,
        })
    }
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
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        frame_into(&mut self.out, id, op_tlv);
        self.stream.write_all(&self.out).await?;
        loop {
            while let Some(frame) = self.codec.decode(&mut self.buf)? {
                let env = Envelope::response(&frame)?;
                if env.msgid != id {
                    bail!(
                        "response {} for message {} while waiting for {id}",
                        op::name(env.op),
                        env.msgid
                    );
                }
                if op::is_final_response(env.op) {
                    return match env.result_code {
                        Some(0) => Ok(()),
                        code => Err(anyhow!("{} result code {code:?}", op::name(env.op))),
                    };
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the server");
            }
        }
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

/// One measurement: one target, one workload, one connection count.
struct Point {
    ops_per_sec: f64,
    lat: Vec<u64>,
    errors: Vec<String>,
}

async fn run_point(
    addr: SocketAddr,
    w: Arc<Workload>,
    conns: usize,
    warmup: Duration,
    secs: Duration,
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
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(status) = child.try_wait()? {
                    let out =
                        std::fs::read_to_string(dir.path().join("haproxy.out")).unwrap_or_default();
                    last_err = anyhow!("haproxy exited ({status}):\n{out}");
                    break;
                }
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(Haproxy {
                        child,
                        addr,
                        version,
                        _dir: dir,
                    });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = anyhow!("haproxy did not listen on {addr} within 5 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(last_err)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
            Target::Haproxy => "haproxy",
        }
    }
}

/// All rounds of one target at one (workload, conns).
#[derive(Default)]
struct Agg {
    ops: Vec<f64>,
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

struct Results {
    /// (workload, conns, target) -> aggregate.
    cells: BTreeMap<(Kind, usize, Target), Agg>,
    /// (workload, conns, target) -> per-round ratio to direct.
    ratios: BTreeMap<(Kind, usize, Target), Vec<f64>>,
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

    fn ratio(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.ratios
            .get(&(k, c, t))
            .and_then(|v| median(&mut v.clone()))
    }

    fn table(&self, opts: &Opts, haproxy: bool) -> String {
        let mut s = String::new();
        let h = |x: &str| if haproxy { x.to_string() } else { "n/a".into() };
        let _ = writeln!(
            s,
            "| workload | conns | direct ops/s | abproxy ops/s | haproxy ops/s | abproxy/direct | haproxy/direct \
             | direct p50/p99 µs | abproxy p50/p99 µs | haproxy p50/p99 µs | abproxy +p99 µs |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
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
                let _ = writeln!(
                    s,
                    "| {} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {added} |",
                    k.name(),
                    ops(Target::Direct),
                    ops(Target::Abproxy),
                    h(&ops(Target::Haproxy)),
                    ratio(Target::Abproxy),
                    h(&ratio(Target::Haproxy)),
                    lat(Target::Direct),
                    lat(Target::Abproxy),
                    h(&lat(Target::Haproxy)),
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
                let _ = write!(p, ", haproxy {}", both(Target::Haproxy));
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
        // `cargo test --all-targets` runs bench targets without `--bench`.
        println!("load: skipped (not run by `cargo bench`; use `cargo bench --bench load`)");
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
    let slapd = Slapd::start(SlapdOptions {
        users: opts.users,
        nosync: true,
        ..Default::default()
    })
    .context("starting slapd (needs the slapd package)")?;
    let direct = slapd.addr();

    let haproxy = match &opts.haproxy {
        Some(bin) => match Haproxy::start(bin, direct) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("load: haproxy column skipped: {e:#}");
                None
            }
        },
        None => None,
    };
    let haproxy_note = match (&haproxy, &opts.haproxy_note) {
        (Some(_), _) => None,
        (None, Some(n)) => Some(n.clone()),
        (None, None) => Some("haproxy failed to start".into()),
    };

    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.proxy_threads)
        .thread_name("abproxy")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads)
        .thread_name("loadgen")
        .enable_all()
        .build()?;

    let proxy = proxy_rt.block_on(ProxyHandle::spawn(Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: slapd.url(),
        shutdown_grace_secs: 1,
        ..Config::default()
    }))?;
    let abproxy_addr: SocketAddr = match &proxy.endpoints()[0] {
        Endpoint::Tcp(a) => a.parse().context("abproxy listener address")?,
        other => bail!("unexpected abproxy listener {other}"),
    };

    let mut targets = vec![(Target::Direct, direct), (Target::Abproxy, abproxy_addr)];
    if let Some(h) = &haproxy {
        targets.push((Target::Haproxy, h.addr));
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut header = String::new();
    let _ = writeln!(
        header,
        "## abproxy load benchmark\n\n\
         - {:.2} s per point after {} ms warm-up, {} round(s); closed-loop clients, one connection each\n\
         - slapd {} (`{}` users, nosync); abproxy in-process ({} worker threads); load generator {} threads; {} cores\n\
         - haproxy: {}",
        opts.secs,
        opts.warmup.as_millis(),
        opts.rounds,
        direct,
        opts.users,
        opts.proxy_threads,
        opts.client_threads,
        cores,
        match (&haproxy, &haproxy_note) {
            (Some(h), _) => format!("{} (nbthread 1, mode tcp, no logging)", h.version),
            (None, Some(n)) => format!("n/a: {n}"),
            (None, None) => "n/a".into(),
        }
    );
    eprintln!("{header}");

    let mut results = Results {
        cells: BTreeMap::new(),
        ratios: BTreeMap::new(),
    };
    let workloads: Vec<Arc<Workload>> = opts
        .workloads
        .iter()
        .map(|&k| Arc::new(Workload::new(k, opts.users)))
        .collect();

    for round in 0..opts.rounds {
        for w in &workloads {
            for &conns in &opts.conns {
                let mut order = targets.clone();
                let n = order.len();
                order.rotate_left(round % n);
                let mut round_ops = BTreeMap::new();
                for &(t, addr) in &order {
                    let p =
                        client_rt.block_on(run_point(addr, w.clone(), conns, opts.warmup, secs));
                    eprintln!(
                        "load: round {} {:>6} conns={:<3} {:>8}: {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs{}",
                        round + 1,
                        w.kind.name(),
                        conns,
                        t.name(),
                        p.ops_per_sec,
                        fmt_opt(pct_us(&p.lat, 50.0), 0),
                        fmt_opt(pct_us(&p.lat, 99.0), 0),
                        if p.errors.is_empty() {
                            String::new()
                        } else {
                            format!("  ({} errors: {})", p.errors.len(), p.errors[0])
                        }
                    );
                    let agg = results.cells.entry((w.kind, conns, t)).or_default();
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
            }
        }
    }
    for agg in results.cells.values_mut() {
        agg.lat.sort_unstable();
    }

    let shutdown = proxy_rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), proxy.shutdown()).await });
    match shutdown {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("load: abproxy shutdown: {e:#}"),
        Err(_) => eprintln!("load: abproxy did not shut down within 10 s"),
    }
    proxy_rt.shutdown_timeout(Duration::from_secs(2));
    client_rt.shutdown_timeout(Duration::from_secs(2));
    drop(haproxy);
    drop(slapd);

    let has_haproxy = targets.iter().any(|(t, _)| *t == Target::Haproxy);
    println!("{header}");
    print!("{}", results.table(&opts, has_haproxy));
    println!();
    println!(
        "Added p99 latency at 1 connection (target p99 - direct p99): {}",
        results.added_latency_at_1(&opts, has_haproxy)
    );
    if let Some(n) = &haproxy_note {
        println!("haproxy columns skipped: {n}");
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
