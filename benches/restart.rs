//! `cargo bench --bench restart`: a server restart under load, through
//! abproxy and without it (issue 20, "server restarts without client
//! errors").
//!
//! ```text
//! cargo bench --bench restart                   # about a minute
//! RESTART_CONNS=32 RESTART_DOWN_MS=5000 RESTART_ROUNDS=2 cargo bench --bench restart
//! ```
//!
//! A throwaway slapd (`testkit`, 1000 users, no fsync) and, for each
//! time slapd stays down, connection count and target, `N` closed-loop
//! clients, each on its own connection bound as its own user (`user1` ..
//! `userN`), alternating a base search of one of its users and a modify
//! (replace `description`) of its own entry. After a warm-up and
//! `RESTART_BEFORE_SECS`, slapd is stopped (SIGTERM), left down for the
//! time given (a cold backup's copy; 0: a plain restart), started again on
//! the same port and data and waited for (`testkit::Slapd::restart`), then
//! the clients run `RESTART_AFTER_SECS` more:
//!
//! * `direct`: the clients talk to slapd. The restart closes their
//!   connections: each failed request counts as a client error; the client
//!   reconnects (the first try at once, then pauses doubling from 10 ms up
//!   to 160 ms while slapd refuses), binds again and sends the request again
//!   (the modify is idempotent, so sending it twice is harmless here).
//! * `abproxy`: the clients talk to abproxy (the binary built with this
//!   bench, its own process started afresh for each run, `threads = 1`, the
//!   backend in `stop` mode, `carry_sessions` on, as by default). An
//!   operator connection, bound as the root DN and allowed to freeze, sends
//!   Allow-Backup ON (a `stop` freeze: every request is held from then on),
//!   slapd is restarted, and the operator sends OFF: the proxy carries each
//!   session to a new connection (replays its bind, checks Who am I?) and
//!   sends its held request. Any client error or reconnection here fails
//!   the bench, and so does a session the proxy's status reports it could
//!   not carry.
//! * `abproxy-unannounced` (not run by default): the same proxy with
//!   `upstream_reconnect = true` and no freeze: slapd restarts under its
//!   clients. A session with a request in flight at the server when its
//!   connection closes cannot be carried (the request may or may not have
//!   been carried out) and ends with a Notice of Disconnection; its client
//!   reconnects as a direct one does. Errors are expected and reported
//!   here, not a failure.
//!
//! The restart window runs from the first step (ON, or the stop) to the
//! server serving again (OFF answered, or slapd ready). Per run: successful
//! operations per second before it (after the warm-up), during it and
//! after it (answers counted when they arrive; "after" includes the
//! clients' recovery); the operations in flight at some time in the
//! window, each from its first send to its successful answer (held by the
//! proxy, or failed, reconnected and sent again): how many, their p99 and
//! the longest; how long after the window the last client had its first
//! answer; client errors, reconnections, failed connection attempts. Each
//! run also prints the answers per `RESTART_BIN_MS` over the whole run, and
//! the ratios abproxy/direct of the pairs run back to back.
//!
//! Settings (environment): `RESTART_DOWN_MS` (`0,1000`), `RESTART_CONNS`
//! (`8,32`), `RESTART_BEFORE_SECS` (3), `RESTART_AFTER_SECS` (3),
//! `RESTART_WARMUP_MS` (500), `RESTART_TARGETS` (`direct,abproxy`; also
//! `abproxy-unannounced`), `RESTART_ROUNDS` (1; each round runs every
//! target at each point, starting with the next target from round to
//! round), `RESTART_USERS` (1000), `RESTART_BIN_MS` (250),
//! `RESTART_PROXY_THREADS` (1). With several rounds a summary follows the
//! table: each point's medians over its rounds (and the worst), and
//! abproxy/direct paired round by round.
//!
//! Every wait has a time limit: a request 30 s (so slapd stays down 20 s
//! at most), a reconnection 30 s, an operation with its retries 60 s,
//! slapd's stop and its start 10 s each, a run's clients 60 s after the
//! end of the run.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abproxy_proto::AllowBackupStatus;
use anyhow::{anyhow, bail, Context, Result};
use loadgen::client::{Conn, SETUP_TIMEOUT};
use loadgen::freeze::{diagnostic, Admin, FreezeOps};
use loadgen::procs::{free_port, wait_listening};
use loadgen::stats::{median, pct_us};
use loadgen::workload::simple_bind;
use testkit::{user_dn, user_pw, Slapd, SlapdOptions, ADMIN_DN};
use tokio::sync::{mpsc, watch};

/// Longest wait for one answer (a held request waits for the whole window).
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// Longest time slapd may stay down: a held request must be answered
/// within [`REQUEST_LIMIT`].
const MAX_DOWN: Duration = Duration::from_secs(20);
/// Longest a client tries one operation, retries included.
const OPERATION_LIMIT: Duration = Duration::from_secs(60);
/// Longest a client tries to reconnect before it gives up.
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);
/// A direct client's pauses between connection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(160);
/// The proxy's wait for the restarted server (`upstream_retry_secs`).
const UPSTREAM_RETRY_SECS: i64 = 30;
/// Client errors kept as text per client (the rest are counted).
const KEEP_ERRORS: usize = 3;

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

struct Settings {
    conns: Vec<usize>,
    /// How long slapd stays stopped in each restart (a cold backup's copy).
    downs: Vec<Duration>,
    targets: Vec<Target>,
    before: Duration,
    after: Duration,
    warmup: Duration,
    rounds: usize,
    users: usize,
    bin: Duration,
    proxy_threads: u64,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let conns = match std::env::var("RESTART_CONNS") {
            Ok(v) => {
                loadgen::opts::parse_conns(&v).with_context(|| format!("RESTART_CONNS={v}"))?
            }
            Err(_) => vec![8, 32],
        };
        let downs = match std::env::var("RESTART_DOWN_MS") {
            Ok(v) => loadgen::opts::parse_list(&v, |x| {
                Ok(Duration::from_millis(
                    x.parse().with_context(|| format!("{x:?}"))?,
                ))
            })
            .with_context(|| format!("RESTART_DOWN_MS={v}"))?,
            Err(_) => vec![Duration::ZERO, Duration::from_secs(1)],
        };
        let targets = match std::env::var("RESTART_TARGETS") {
            Ok(v) => loadgen::opts::parse_list(&v, Target::parse)
                .with_context(|| format!("RESTART_TARGETS={v}"))?,
            Err(_) => vec![Target::Direct, Target::Abproxy],
        };
        let s = Settings {
            conns,
            downs,
            targets,
            before: Duration::from_secs(env_u64("RESTART_BEFORE_SECS", 3)?),
            after: Duration::from_secs(env_u64("RESTART_AFTER_SECS", 3)?),
            warmup: Duration::from_millis(env_u64("RESTART_WARMUP_MS", 500)?),
            rounds: env_u64("RESTART_ROUNDS", 1)? as usize,
            users: env_u64("RESTART_USERS", 1000)? as usize,
            bin: Duration::from_millis(env_u64("RESTART_BIN_MS", 250)?.max(1)),
            proxy_threads: env_u64("RESTART_PROXY_THREADS", 1)?,
        };
        if s.targets.is_empty() {
            bail!("RESTART_TARGETS: no target");
        }
        if s.before.is_zero() || s.after.is_zero() || s.rounds == 0 {
            bail!("RESTART_BEFORE_SECS, RESTART_AFTER_SECS and RESTART_ROUNDS must be at least 1");
        }
        if s.downs.iter().any(|&d| d > MAX_DOWN) {
            bail!("RESTART_DOWN_MS: at most {} ms", MAX_DOWN.as_millis());
        }
        if s.conns.iter().any(|&c| c > s.users) {
            bail!("more connections than users ({})", s.users);
        }
        Ok(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Abproxy,
    /// abproxy with `upstream_reconnect`, the restart without a freeze.
    Unannounced,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Abproxy => "abproxy",
            Target::Unannounced => "abproxy-unannounced",
        }
    }

    fn parse(s: &str) -> Result<Target> {
        [Target::Direct, Target::Abproxy, Target::Unannounced]
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| anyhow!("unknown target {s:?}"))
    }
}

/// What one client did. Times are nanoseconds since the run's base.
#[derive(Default)]
struct ClientOut {
    /// (first send, successful answer) of each operation.
    ops: Vec<(u64, u64)>,
    /// Requests that failed: the connection was lost, or the answer was not
    /// a success.
    errors: u64,
    /// New connections after a failure.
    reconnects: u64,
    /// Failed connection attempts (refused, or the bind failed).
    refused: u64,
    notes: Vec<String>,
    /// Why the client stopped early.
    fatal: Option<String>,
}

impl ClientOut {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.notes.len() < KEEP_ERRORS {
            self.notes.push(what);
        }
    }
}

fn ns_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// Connects and binds, trying again (with doubling pauses) until it works
/// or [`RECONNECT_LIMIT`] has passed.
async fn reconnect(addr: SocketAddr, bind: &[u8], out: &mut ClientOut) -> Result<Conn> {
    let deadline = Instant::now() + RECONNECT_LIMIT;
    let mut pause = Duration::ZERO;
    loop {
        match Conn::connect_bound(addr, Some(bind)).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                out.refused += 1;
                if Instant::now() >= deadline {
                    bail!("could not reconnect within {RECONNECT_LIMIT:?}: {e:#}");
                }
            }
        }
        pause = (pause * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        tokio::time::sleep(pause).await;
    }
}

struct ClientCtx {
    addr: SocketAddr,
    ops: Arc<FreezeOps>,
    idx: usize,
    conns: usize,
    base: Instant,
}

/// A closed-loop client: bound as its own user, it alternates a search of
/// one of its users and a modify of its own entry until `stop`. A failed
/// request is sent again (after a reconnection if the connection was
/// lost); the operation's time runs from its first send to its success.
async fn client(
    cx: ClientCtx,
    ready: mpsc::Sender<()>,
    mut go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> ClientOut {
    let mut out = ClientOut::default();
    let bind = simple_bind(&user_dn(cx.idx + 1), &user_pw(cx.idx + 1));
    let mut conn = match Conn::connect_bound(cx.addr, Some(&bind)).await {
        Ok(c) => c,
        Err(e) => {
            out.fatal = Some(format!("set-up: {e:#}"));
            return out;
        }
    };
    let _ = ready.send(()).await;
    drop(ready);
    if go.wait_for(|g| *g).await.is_err() {
        return out;
    }
    let mut i = 0usize;
    while !*stop.borrow() {
        let (what, op) = if i % 2 == 0 {
            let k = cx.ops.user(cx.idx, cx.conns, i / 2);
            ("search", &cx.ops.search[k])
        } else {
            ("modify", &cx.ops.modify[cx.idx])
        };
        i += 1;
        let start = ns_since(cx.base);
        loop {
            let lost = match tokio::time::timeout(REQUEST_LIMIT, conn.call_final(op)).await {
                Ok(Ok((env, _))) if env.result_code == Some(0) => break,
                Ok(Ok((env, frame))) => {
                    out.error(format!(
                        "{what}: result code {:?}: {}",
                        env.result_code,
                        diagnostic(&frame)
                    ));
                    false
                }
                Ok(Err(e)) => {
                    out.error(format!("{what}: {e:#}"));
                    true
                }
                Err(_) => {
                    out.error(format!("{what}: no answer within {REQUEST_LIMIT:?}"));
                    true
                }
            };
            if Duration::from_nanos(ns_since(cx.base) - start) > OPERATION_LIMIT {
                out.fatal = Some(format!("{what}: no success within {OPERATION_LIMIT:?}"));
                return out;
            }
            if lost {
                drop(conn);
                conn = match reconnect(cx.addr, &bind, &mut out).await {
                    Ok(c) => c,
                    Err(e) => {
                        out.fatal = Some(format!("{e:#}"));
                        return out;
                    }
                };
                out.reconnects += 1;
            } else {
                // An error answer on a live connection: as a client would,
                // pause a little before asking again.
                tokio::time::sleep(BACKOFF_FIRST).await;
            }
        }
        out.ops.push((start, ns_since(cx.base)));
    }
    conn.unbind().await;
    out
}

/// abproxy as its own process: `serve --config` in front of slapd, the
/// backend in `stop` mode, the admin allowed to freeze.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &Path, upstream: &str, threads: u64, reconnect: bool) -> Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("abproxy-restart-bench")
            .tempdir()?;
        let mut last = anyhow!("not started");
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let config = format!(
                "listen = [\"ldap://{addr}\"]\n\
                 upstream = \"{upstream}\"\n\
                 threads = {threads}\n\
                 shutdown_grace_secs = 1\n\
                 carry_sessions = true\n\
                 upstream_reconnect = {reconnect}\n\
                 upstream_retry_secs = {UPSTREAM_RETRY_SECS}\n\
                 [freeze]\n\
                 allowed = [\"{ADMIN_DN}\"]\n\
                 root_dns = [\"{ADMIN_DN}\"]\n\
                 max_drain_secs = 10\n\
                 lease_secs = 120\n\
                 [[backends]]\n\
                 suffix = \"{}\"\n\
                 mode = \"stop\"\n",
                testkit::SUFFIX
            );
            let file = dir.path().join("abproxy.toml");
            std::fs::write(&file, config)?;
            let log_path = dir.path().join("abproxy.log");
            let log = std::fs::File::create(&log_path)?;
            let mut child = Command::new(bin)
                .arg("serve")
                .arg("--config")
                .arg(&file)
                .env("ABPROXY_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            match wait_listening(
                &mut child,
                &[addr],
                &log_path,
                "abproxy",
                Duration::from_secs(10),
            ) {
                Ok(()) => return Ok(Proxy { child, addr, dir }),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("abproxy.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits (10 s at most) for the graceful shutdown.
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on the pid of a child this process spawned and
        // has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait()? {
                Some(s) if s.success() => return Ok(()),
                Some(s) => bail!("abproxy exited with {s}:\n{}", self.log()),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                None => bail!("abproxy did not shut down within 10 s"),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A log line without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Restarts slapd off the runtime: stops it, leaves it stopped for `down`
/// (the copy of a cold backup; nothing to wait for but that time), starts
/// it again on the same port and data and returns once it is ready.
async fn restart(slapd: Slapd, down: Duration) -> (Slapd, Result<()>) {
    tokio::task::spawn_blocking(move || {
        let mut slapd = slapd;
        let r = slapd.stop().and_then(|()| {
            std::thread::sleep(down);
            slapd.restart()
        });
        (slapd, r)
    })
    .await
    .expect("the restart task")
}

/// One run's figures.
struct Run {
    target: Target,
    conns: usize,
    down: Duration,
    /// ops/s before, during and after the window.
    rates: [f64; 3],
    /// The window (ON to OFF answered, or the restart), s.
    window: f64,
    /// Operations in flight across the window, their p99 and longest (ms).
    held: usize,
    held_p99: f64,
    held_max: f64,
    /// The last client's first answer after the window, ms after its end.
    last_back: f64,
    errors: u64,
    reconnects: u64,
    refused: u64,
    /// Per bin: operations answered.
    bins: Vec<u64>,
    note: String,
    /// Why this run does not meet its requirement.
    failures: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run_one(
    (target, conns, down): (Target, usize, Duration),
    s: &Settings,
    slapd: Slapd,
    ops: &Arc<FreezeOps>,
    bin: &Path,
) -> (Slapd, Result<Run>) {
    let proxy = match target {
        Target::Direct => None,
        Target::Abproxy | Target::Unannounced => {
            let reconnect = target == Target::Unannounced;
            match Proxy::start(bin, &slapd.url(), s.proxy_threads, reconnect) {
                Ok(p) => Some(p),
                Err(e) => return (slapd, Err(e)),
            }
        }
    };
    let addr = proxy.as_ref().map_or(slapd.addr(), |p| p.addr);
    let mut admin = match &proxy {
        Some(p) => match Admin::connect(p.addr, ops.clone()).await {
            Ok(a) => Some(a),
            Err(e) => return (slapd, Err(e)),
        },
        None => None,
    };

    let base = Instant::now();
    let (ready_tx, mut ready_rx) = mpsc::channel(conns);
    let (go_tx, go_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for idx in 0..conns {
        let cx = ClientCtx {
            addr,
            ops: ops.clone(),
            idx,
            conns,
            base,
        };
        tasks.spawn(client(cx, ready_tx.clone(), go_rx.clone(), stop_rx.clone()));
    }
    drop(ready_tx);
    let mut ready = 0;
    let _ = tokio::time::timeout(SETUP_TIMEOUT, async {
        while ready < conns && ready_rx.recv().await.is_some() {
            ready += 1;
        }
    })
    .await;
    if ready < conns {
        tasks.abort_all();
        return (slapd, Err(anyhow!("{ready} of {conns} clients connected")));
    }

    // The load, then the restart window.
    let started = ns_since(base);
    let _ = go_tx.send(true);
    tokio::time::sleep(s.warmup + s.before).await;
    let t0 = ns_since(base);
    let mut note = String::new();
    let mut failures = Vec::new();
    let mut steps = Ok(());
    let freezer = admin.as_mut().filter(|_| target == Target::Abproxy);
    let slapd = match freezer {
        None => {
            let (slapd, r) = restart(slapd, down).await;
            note = format!(
                "restart {:.0} ms",
                ms(Duration::from_nanos(ns_since(base) - t0))
            );
            steps = r.context("restarting slapd");
            slapd
        }
        Some(admin) => {
            let on = admin.switch(true).await;
            let t_on = Instant::now();
            let (slapd, r) = restart(slapd, down).await;
            let t_restart = t_on.elapsed();
            let off = match (&on, &r) {
                (Ok(_), Ok(())) => admin.switch(false).await,
                _ => Err(anyhow!("not sent")),
            };
            match (on, r, off) {
                (Ok(on), Ok(()), Ok(off)) => {
                    note = format!(
                        "ON {:.1} ms, restart {:.0} ms, OFF {:.0} ms",
                        ms(on),
                        ms(t_restart),
                        ms(off)
                    )
                }
                (on, r, off) => {
                    steps = Err(anyhow!(
                        "ON: {:?}; restart: {:?}; OFF: {:?}",
                        on.err(),
                        r.err(),
                        off.err()
                    ))
                }
            }
            slapd
        }
    };
    let t1 = ns_since(base);
    tokio::time::sleep(s.after).await;
    let end = ns_since(base);
    let _ = stop_tx.send(true);

    let mut outs = Vec::new();
    let joined = tokio::time::timeout(REQUEST_LIMIT + RECONNECT_LIMIT, async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(o) => outs.push(o),
                Err(e) => failures.push(format!("client task: {e}")),
            }
        }
    })
    .await;
    if joined.is_err() {
        tasks.abort_all();
        failures.push("clients did not stop in time".into());
    }

    // The proxy's account of the sessions it carried.
    let status: Option<Result<AllowBackupStatus>> = match admin.as_mut() {
        Some(a) => Some(a.status().await),
        None => None,
    };
    if let Some(a) = admin {
        a.c.unbind().await;
    }
    // Sessions the proxy ended with slapd's own Notice of Disconnection
    // (forwarded when the session cannot be carried; warned in its log).
    // Its other warnings, for the note.
    let (forwarded, warnings) = match &proxy {
        Some(p) => {
            let log = p.log();
            let (notices, other): (Vec<&str>, Vec<&str>) = log
                .lines()
                .filter(|l| l.contains("WARN"))
                .partition(|l| l.contains("upstream sent a Notice of Disconnection"));
            (
                Some(notices.len()),
                other.first().map(|w| (other.len(), strip_ansi(w))),
            )
        }
        None => (None, None),
    };
    if let Some(p) = proxy {
        if let Err(e) = tokio::task::block_in_place(|| p.stop()) {
            failures.push(format!("{e:#}"));
        }
    }
    if let Err(e) = steps {
        return (slapd, Err(e));
    }

    let times = Times {
        warm: started + s.warmup.as_nanos() as u64,
        started,
        t0,
        t1,
        end,
    };
    let mut run = summarise((target, conns, down), &outs, &times, s.bin);
    run.note = note;
    run.failures.extend(failures);
    if let Some(st) = status {
        match st {
            Ok(st) => {
                run.note.push_str(&format!(
                    "; sessions carried {}, not carried {}, waiting {}",
                    st.sessions_carried, st.sessions_not_carried, st.sessions_waiting
                ));
                if st.sessions_not_carried > 0 && target == Target::Abproxy {
                    run.failures.push(format!(
                        "{} session(s) not carried",
                        st.sessions_not_carried
                    ));
                }
            }
            Err(e) => run.failures.push(format!("status: {e:#}")),
        }
    }
    if let Some(n) = forwarded.filter(|&n| n > 0) {
        run.note.push_str(&format!(
            "; slapd's Notice of Disconnection forwarded to {n} session(s)"
        ));
    }
    if let Some((n, first)) = warnings {
        run.note.push_str(&format!(
            "; {n} other warning(s) in the proxy's log, first: {first}"
        ));
    }
    if target != Target::Abproxy {
        if let Some(n) = outs.iter().flat_map(|o| o.notes.first()).next() {
            run.note.push_str(&format!("; a client's first error: {n}"));
        }
    }
    (slapd, Ok(run))
}

/// A run's instants, in nanoseconds since its base: the clients start,
/// the warm-up ends, the window starts (`t0`) and ends (`t1`), the clients
/// are told to stop.
struct Times {
    started: u64,
    warm: u64,
    t0: u64,
    t1: u64,
    end: u64,
}

/// The figures of one run from what its clients did.
fn summarise(
    (target, conns, down): (Target, usize, Duration),
    outs: &[ClientOut],
    t: &Times,
    bin: Duration,
) -> Run {
    let bin = bin.as_nanos() as u64;
    let mut counts = [0u64; 3];
    let mut bins = vec![0u64; ((t.end - t.started) / bin + 1) as usize];
    let mut held = Vec::new();
    let mut last_back = 0u64;
    let (mut errors, mut reconnects, mut refused) = (0, 0, 0);
    let mut failures = Vec::new();
    for o in outs {
        errors += o.errors;
        reconnects += o.reconnects;
        refused += o.refused;
        if let Some(f) = &o.fatal {
            failures.push(format!("a client stopped: {f}"));
        }
        if target == Target::Abproxy {
            failures.extend(o.notes.iter().map(|n| format!("client error: {n}")));
        }
        let mut back = None;
        for &(a, b) in &o.ops {
            if b >= t.started && b < t.end {
                bins[((b - t.started) / bin) as usize] += 1;
            }
            if b >= t.warm && b < t.t0 {
                counts[0] += 1;
            } else if b >= t.t0 && b < t.t1 {
                counts[1] += 1;
            } else if b >= t.t1 && b < t.end {
                counts[2] += 1;
            }
            // In flight at some point of the window.
            if a <= t.t1 && b >= t.t0 {
                held.push(b - a);
            }
            if b >= t.t1 && back.is_none() {
                back = Some(b - t.t1);
            }
        }
        last_back = last_back.max(back.unwrap_or(t.end - t.t1));
    }
    held.sort_unstable();
    if target == Target::Abproxy && (errors > 0 || reconnects > 0) {
        failures.push(format!(
            "{errors} client error(s), {reconnects} reconnection(s) through abproxy"
        ));
    }
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    let rate = |n: u64, a: u64, b: u64| match secs(a, b) {
        d if d > 0.0 => n as f64 / d,
        _ => 0.0,
    };
    Run {
        target,
        conns,
        down,
        rates: [
            rate(counts[0], t.warm, t.t0),
            rate(counts[1], t.t0, t.t1),
            rate(counts[2], t.t1, t.end),
        ],
        window: secs(t.t0, t.t1),
        held: held.len(),
        held_p99: pct_us(&held, 99.0).unwrap_or(0.0) / 1000.0,
        held_max: held.last().map_or(0.0, |&n| n as f64 / 1e6),
        last_back: last_back as f64 / 1e6,
        errors,
        reconnects,
        refused,
        bins,
        note: String::new(),
        failures,
    }
}

fn print_table(runs: &[Run], s: &Settings) {
    println!(
        "| slapd down | conns | target | window s | before ops/s | during ops/s | after ops/s | \
         after/before | ops across the window | their p99 ms | longest ms | \
         last client back ms | client errors | reconnections |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} ms | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.3} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.down.as_millis(),
            r.conns,
            r.target.name(),
            r.window,
            r.rates[0],
            r.rates[1],
            r.rates[2],
            r.rates[2] / r.rates[0],
            r.held,
            r.held_p99,
            r.held_max,
            r.last_back,
            r.errors,
            r.reconnects,
        );
    }
    println!();
    for r in runs {
        println!(
            "{} ms down, {} conns, {}: {}; failed connection attempts {}; answers per {} ms: {}",
            r.down.as_millis(),
            r.conns,
            r.target.name(),
            r.note,
            r.refused,
            s.bin.as_millis(),
            r.bins
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!();
    // Within one run of the machine, round by round: abproxy next to direct.
    for &down in &s.downs {
        for &conns in &s.conns {
            let by = |t: Target| {
                runs.iter()
                    .filter(move |r| r.target == t && r.conns == conns && r.down == down)
            };
            for (d, p) in by(Target::Direct).zip(by(Target::Abproxy)) {
                println!(
                    "{} ms down, {conns} conns: abproxy/direct ops/s before {:.3}, after {:.3}; \
                     longest operation across the window {:.2}x direct's",
                    down.as_millis(),
                    p.rates[0] / d.rates[0],
                    p.rates[2] / d.rates[2],
                    p.held_max / d.held_max
                );
            }
        }
    }
}

/// With several rounds: each point's medians over its rounds (and the
/// worst), and abproxy/direct paired round by round.
fn print_summary(runs: &[Run], s: &Settings) {
    let med = |v: Vec<f64>| median(&mut v.clone()).unwrap_or(0.0);
    let max = |v: Vec<f64>| v.into_iter().fold(0.0, f64::max);
    println!(
        "\nMedians over {} rounds (worst in brackets):\n\n\
         | slapd down | conns | target | before ops/s | after/before | longest ms | \
         last client back ms | client errors | reconnections |",
        s.rounds
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for &down in &s.downs {
        for &conns in &s.conns {
            for &target in &s.targets {
                let rs: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.target == target && r.conns == conns && r.down == down)
                    .collect();
                let f = |g: fn(&Run) -> f64| rs.iter().map(|r| g(r)).collect::<Vec<f64>>();
                println!(
                    "| {} ms | {conns} | {} | {:.0} | {:.3} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.0} ({:.0}) |",
                    down.as_millis(),
                    target.name(),
                    med(f(|r| r.rates[0])),
                    med(f(|r| r.rates[2] / r.rates[0])),
                    med(f(|r| r.held_max)),
                    max(f(|r| r.held_max)),
                    med(f(|r| r.last_back)),
                    max(f(|r| r.last_back)),
                    med(f(|r| r.errors as f64)),
                    max(f(|r| r.errors as f64)),
                    med(f(|r| r.reconnects as f64)),
                    max(f(|r| r.reconnects as f64)),
                );
            }
        }
    }
    println!();
    for &down in &s.downs {
        for &conns in &s.conns {
            let by = |t: Target| {
                runs.iter()
                    .filter(move |r| r.target == t && r.conns == conns && r.down == down)
            };
            let pairs: Vec<(&Run, &Run)> = by(Target::Direct).zip(by(Target::Abproxy)).collect();
            if pairs.is_empty() {
                continue;
            }
            let ratio = |g: fn(&Run) -> f64| med(pairs.iter().map(|(d, p)| g(p) / g(d)).collect());
            println!(
                "{} ms down, {conns} conns, abproxy/direct paired by round, median of {}: \
                 ops/s before {:.3}, after {:.3}; longest operation across the window {:.2}",
                down.as_millis(),
                pairs.len(),
                ratio(|r| r.rates[0]),
                ratio(|r| r.rates[2]),
                ratio(|r| r.held_max)
            );
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // Not run by `cargo bench` (e.g. `cargo test --benches`).
        println!("restart: benchmark skipped (use `cargo bench --bench restart`)");
        return;
    }
    if let Err(e) = main_inner().await {
        eprintln!("restart benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

async fn main_inner() -> Result<()> {
    let s = Settings::from_env()?;
    let bin = testkit::product::binary()?;
    let bin = bin.as_path();
    let t = Instant::now();
    let users = s.users;
    let mut slapd = tokio::task::spawn_blocking(move || {
        Slapd::start(SlapdOptions {
            users,
            nosync: true,
            ..Default::default()
        })
    })
    .await?
    .context("starting slapd")?;
    let ops = Arc::new(FreezeOps::new(s.users));
    eprintln!(
        "restart: slapd at {} ({} users), abproxy {}",
        slapd.url(),
        s.users,
        bin.display()
    );
    let mut runs = Vec::new();
    for round in 0..s.rounds {
        for &down in &s.downs {
            for &conns in &s.conns {
                // Each round starts with the next target.
                let mut order = s.targets.clone();
                order.rotate_left(round % s.targets.len());
                for target in order {
                    let what = format!(
                        "{} with {conns} clients, slapd down {} ms",
                        target.name(),
                        down.as_millis()
                    );
                    eprintln!("restart: round {round}: {what}");
                    let (back, r) = run_one((target, conns, down), &s, slapd, &ops, bin).await;
                    slapd = back;
                    let run = r.context(what)?;
                    eprintln!(
                        "restart:   {:.0} / {:.0} / {:.0} ops/s, window {:.2} s, longest {:.0} ms, \
                         errors {}, reconnections {}; {}",
                        run.rates[0],
                        run.rates[1],
                        run.rates[2],
                        run.window,
                        run.held_max,
                        run.errors,
                        run.reconnects,
                        run.note
                    );
                    runs.push(run);
                }
            }
        }
    }
    print_table(&runs, &s);
    if s.rounds > 1 {
        print_summary(&runs, &s);
    }
    println!("\nrun time {:.1} s", t.elapsed().as_secs_f64());
    let failures: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            r.failures.iter().map(move |f| {
                format!(
                    "{} with {} clients, slapd down {} ms: {f}",
                    r.target.name(),
                    r.conns,
                    r.down.as_millis()
                )
            })
        })
        .collect();
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
