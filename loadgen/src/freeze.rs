//! The Allow-Backup section (`freeze` in the workload list), its own table:
//! ON/OFF answer times idle and under search+modify load, and the release
//! of a backlog of queued modifies against the same burst sent straight to
//! slapd and through an unfrozen abproxy. Also what the freeze-reads
//! section shares: the admin connection ([`Admin`]) and the pre-encoded
//! requests ([`FreezeOps`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abproxy::wire::op;
use abproxy_proto::{
    AllowBackupRequest, AllowBackupStatus, FreezeState, ALLOW_BACKUP_OID, ALLOW_BACKUP_STATUS_OID,
};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use ldap3_proto::proto::{LdapExtendedRequest, LdapOp};
use testkit::{ADMIN_DN, ADMIN_PW};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::codec::Decoder;

use crate::client::{Conn, REQUEST_TIMEOUT, SETUP_TIMEOUT};
use crate::opts::Opts;
use crate::stats::{fmt_opt, median, pct_us};
use crate::workload::{op_tlv, simple_bind, Kind, Workload};

/// The proxy's drain limit (`freeze.max_drain_secs`) in this benchmark.
pub const FREEZE_MAX_DRAIN_SECS: u64 = 10;
/// Longest wait for the answer to ON (the drain limit plus slack).
pub const ON_TIMEOUT: Duration = Duration::from_secs(FREEZE_MAX_DRAIN_SECS + 5);
/// How long each ON/OFF cycle stays frozen between ON's answer and OFF.
pub const FREEZE_HOLD: Duration = Duration::from_millis(20);
/// Pause after OFF's answer before the next cycle.
pub const FREEZE_GAP: Duration = Duration::from_millis(50);
/// Longest wait for the backlog to be queued, and for a burst to be answered.
pub const BACKLOG_TIMEOUT: Duration = Duration::from_secs(30);

/// The abproxy settings of the freeze section: the admin may freeze, and
/// the queue limits hold the whole backlog without backpressure.
pub fn freeze_config(opts: &Opts) -> toml::Table {
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
pub struct FreezeOps {
    pub bind: Vec<u8>,
    pub on: Vec<u8>,
    pub off: Vec<u8>,
    pub status: Vec<u8>,
    pub search: Vec<Vec<u8>>,
    pub modify: Vec<Vec<u8>>,
}

pub fn exop_tlv(oid: &str, value: Option<Vec<u8>>) -> Vec<u8> {
    op_tlv(LdapOp::ExtendedRequest(LdapExtendedRequest {
        name: oid.into(),
        value,
    }))
}

impl FreezeOps {
    pub fn new(users: usize) -> FreezeOps {
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
    pub fn user(&self, idx: usize, conns: usize, i: usize) -> usize {
        let n = self.modify.len();
        let per_client = (n / conns).max(1);
        (idx + conns * (i % per_client)) % n
    }
}

/// The diagnostic message of a response (for error reports).
pub fn diagnostic(frame: &[u8]) -> String {
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

pub fn status_summary(s: &AllowBackupStatus) -> String {
    format!(
        "state {:?}, queued_requests {}, queued_bytes {}, in_flight {}, freeze_id {:?}",
        s.state, s.queued_requests, s.queued_bytes, s.in_flight, s.freeze_id
    )
}

/// A connection bound as the admin, which sends ON, OFF and status.
pub struct Admin {
    pub c: Conn,
    pub ops: Arc<FreezeOps>,
}

impl Admin {
    pub async fn connect(addr: SocketAddr, ops: Arc<FreezeOps>) -> Result<Admin> {
        let c = Conn::connect_bound(addr, Some(&ops.bind))
            .await
            .context("admin connection")?;
        Ok(Admin { c, ops })
    }

    /// Sends ON (`on`) or OFF; returns the time from sending it to its
    /// answer, which must be success.
    pub async fn switch(&mut self, on: bool) -> Result<Duration> {
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

    pub async fn status(&mut self) -> Result<AllowBackupStatus> {
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
pub async fn status_then_thaw(addr: SocketAddr, ops: &Arc<FreezeOps>) -> String {
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
pub async fn on_off_cycles(
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
pub struct MixedResult {
    pub searches: u64,
    pub modifies: u64,
    pub max_lat: Duration,
    pub error: Option<String>,
}

/// A closed-loop client alternating a search and a modify of its own users,
/// bound as the admin, until `stop`.
pub async fn mixed_client(
    addr: SocketAddr,
    ops: Arc<FreezeOps>,
    (idx, conns): (usize, usize),
    ready: tokio::sync::mpsc::Sender<()>,
    stop: watch::Receiver<bool>,
) -> MixedResult {
    let mut res = MixedResult::default();
    let mut c = match Conn::connect_bound(addr, Some(&ops.bind)).await {
        Ok(c) => c,
        Err(e) => {
            res.error = Some(format!("{e:#}"));
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
pub async fn loaded_cycles(
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
pub enum Burst {
    /// Queued by a frozen abproxy, released by OFF.
    Release,
    /// Sent straight to slapd.
    Direct,
    /// Sent through abproxy, not frozen.
    Unfrozen,
}

impl Burst {
    pub fn name(self) -> &'static str {
        match self {
            Burst::Release => "release",
            Burst::Direct => "direct",
            Burst::Unfrozen => "abproxy-unfrozen",
        }
    }
}

/// One burst's timing.
pub struct BurstResult {
    /// From OFF sent (release) or the requests sent (others) to the last
    /// response.
    pub elapsed: Duration,
    /// Release: from the start of sending to the proxy reporting the whole
    /// backlog queued.
    pub fill: Option<Duration>,
    /// Release: OFF's own answer time.
    pub off: Option<Duration>,
}

/// One client of a burst: on `start`, writes its batch of `m` pipelined
/// modifies in one go and reads `m` successful modify responses (IDs
/// `first_id..first_id+m`, each once). Returns when the first and the last
/// arrived.
pub async fn burst_client(
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
pub async fn burst(
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
        let mut c = Conn::connect_bound(addr, Some(&ops.bind))
            .await
            .with_context(|| format!("burst client {idx}"))?;
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
pub struct FreezeResults {
    pub on_idle: Vec<u64>,
    pub off_idle: Vec<u64>,
    pub on_loaded: Vec<u64>,
    pub off_loaded: Vec<u64>,
    pub bursts: BTreeMap<Burst, Vec<BurstResult>>,
    /// Per repetition: rate / direct rate.
    pub ratios: BTreeMap<Burst, Vec<f64>>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
}

pub async fn run_freeze(
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
    pub fn table(&self, opts: &Opts) -> String {
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

    pub fn explanations(&self, opts: &Opts) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent clients cycle over disjoint users.
    #[test]
    fn clients_own_their_users() {
        let ops = FreezeOps::new(10);
        for conns in [1, 3, 4, 10, 32] {
            let mut owner = BTreeMap::new();
            for idx in 0..conns {
                for i in 0..25 {
                    let k = ops.user(idx, conns, i);
                    assert!(k < 10);
                    let o = *owner.entry(k).or_insert(idx);
                    // More clients than users: they share (k = idx % n).
                    assert!(
                        o == idx || conns > 10,
                        "user {k}: clients {o} and {idx} of {conns}"
                    );
                }
            }
        }
        assert_eq!(
            (0..3).map(|i| ops.user(1, 3, i)).collect::<Vec<_>>(),
            [1, 4, 7]
        );
    }

    #[test]
    fn table() {
        let mut opts = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        (opts.backlog_conns, opts.backlog_depth, opts.freeze_conns) = (2, 10, 3);
        let ms = Duration::from_millis;
        let burst = |elapsed: u64| BurstResult {
            elapsed: ms(elapsed),
            fill: None,
            off: None,
        };
        let mut r = FreezeResults {
            on_idle: vec![1_000_000, 3_000_000],
            off_loaded: vec![500_000],
            ..Default::default()
        };
        r.bursts.insert(Burst::Direct, vec![burst(10), burst(20)]);
        r.bursts.insert(
            Burst::Release,
            vec![BurstResult {
                elapsed: ms(40),
                fill: Some(ms(5)),
                off: Some(Duration::from_micros(1500)),
            }],
        );
        r.ratios.insert(Burst::Direct, vec![1.0, 1.0]);
        r.ratios.insert(Burst::Release, vec![0.25]);
        let t = r.table(&opts);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(
            rows[0],
            "| freeze measurement | samples | p50 ms | p99 ms | requests/s | ratio to direct |"
        );
        assert_eq!(rows[2], "| ON, idle | 2 | 1.00 | 3.00 | - | - |");
        assert_eq!(rows[3], "| OFF, idle | 0 | - | - | - | - |");
        assert_eq!(rows[4], "| ON, loaded (3 clients) | 0 | - | - | - | - |");
        assert_eq!(
            rows[5],
            "| OFF, loaded (3 clients) | 1 | 0.50 | 0.50 | - | - |"
        );
        assert_eq!(
            rows[6],
            "| backlog release, 2x10 queued modifies | 1 | 40.00 | 40.00 | 500 | 0.250 |"
        );
        assert_eq!(
            rows[7],
            "| 2x10 pipelined modifies, direct | 2 | 10.00 | 20.00 | 1500 | 1.000 |"
        );
        assert_eq!(
            rows[8],
            "| 2x10 pipelined modifies, abproxy not frozen | 0 | - | - | - | - |"
        );
        assert_eq!(rows.len(), 9);
        let e = r.explanations(&opts);
        assert!(
            e.contains("queued in 5.00 ms (p50, from the first request sent to the status reporting all 20 queued); OFF answered in 1.50 ms"),
            "{e}"
        );
    }
}
