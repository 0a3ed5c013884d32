//! The reads-during-a-freeze section of the load benchmark (`--workloads
//! freeze-reads`): what a `readonly` freeze costs the readers. An online
//! backup should cost them nothing: searches pass a frozen proxy, only
//! writes are held.
//!
//! `--read-conns` closed-loop readers (one connection each, anonymous base
//! searches of their own users, as the `search` workload) run through
//! abproxy for the whole section, on connections opened once. A controller
//! takes the proxy through phases, each measured for `--secs` after
//! `--warmup-ms` of settling: per round, an unfrozen phase before each of
//! the three frozen ones (their order rotates with the round), so every
//! frozen phase has an unfrozen neighbour measured seconds before it:
//! * `frozen`: Allow-Backup ON (all backends, readonly) sent by an admin
//!   connection kept open for the section, OFF on it after the phase;
//! * `frozen, writers held`: the same, while `--read-writers` writers (bound
//!   as the admin) pipeline modifies of their own users at `--write-rate`
//!   per second each, from ON's answer to the end of the phase: the proxy
//!   holds them, and the queue grows while the readers read. After OFF the
//!   next phase waits until every held modify is answered (success, none
//!   before OFF was sent: checked);
//! * `frozen via operator::Session, writers held`: the freeze set up as `abproxy
//!   run` does, ON with holdUntilUnbind on an `abproxy::operator::Session` (the
//!   operator client, `ldap3`) connected and bound for the phase, OFF naming
//!   the freeze on the same session, then closed; the writers as above.
//!
//! A read counts for a phase when it was sent and answered inside the
//! phase's measured window. Before each frozen window the proxy's status must
//! say frozen, before each unfrozen window thawed with nothing queued. The
//! table pools each kind of phase over the rounds (p50/p99, the ratio of
//! the frozen percentile to the unfrozen one), and gives the median over
//! rounds of the per-pair p99 ratio (each frozen phase against the unfrozen
//! phase just before it), the proxy's CPU per read (its process, from
//! `/proc`, writers' work included) and the modifies held per phase.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abproxy::operator::{FreezeRequest, Password, Session, Target};
use abproxy::wire::op;
use abproxy_proto::FreezeState;
use anyhow::{anyhow, bail, Context, Result};
use testkit::{ADMIN_DN, ADMIN_PW};
use tokio::io::AsyncWriteExt;

use crate::client::{Conn, REQUEST_TIMEOUT, SETUP_TIMEOUT};
use crate::freeze::{diagnostic, status_summary, status_then_thaw, Admin, FreezeOps};
use crate::probe::CpuProbe;
use crate::stats::{fmt_opt, median, pct_us};
use crate::workload::frame_into;

/// Longest wait, after OFF, for the held modifies to be answered.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// The section's settings.
pub struct ReadsOpts {
    pub rounds: usize,
    pub warmup: Duration,
    pub secs: Duration,
    pub readers: usize,
    pub writers: usize,
    /// Modifies per second per writer during the frozen phases with writers.
    pub write_rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Unfrozen,
    Frozen,
    FrozenWriters,
    FrozenSession,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Unfrozen => "unfrozen",
            Phase::Frozen => "frozen",
            Phase::FrozenWriters => "frozen, writers held",
            Phase::FrozenSession => "frozen via operator::Session, writers held",
        }
    }

    fn writes(self) -> bool {
        matches!(self, Phase::FrozenWriters | Phase::FrozenSession)
    }
}

/// One measured phase.
struct PhaseResult {
    kind: Phase,
    /// Read latencies (ns), sorted.
    lat: Vec<u64>,
    /// The measured window.
    secs: f64,
    /// The proxy's CPU time per read in the window (µs).
    cpu_us_per_read: Option<f64>,
    /// Modifies the proxy reported queued just before OFF.
    queued_at_off: Option<u64>,
    /// The p99 of the unfrozen phase just before this one (frozen phases).
    p99_before: Option<f64>,
}

/// Everything the section measured.
#[derive(Default)]
pub struct ReadsResults {
    phases: Vec<PhaseResult>,
    notes: Vec<String>,
    errors: Vec<String>,
}

/// What the readers, the writers and the controller share.
#[derive(Default)]
struct Shared {
    /// 0: no window open; n: phase n-1's window is open.
    window: AtomicUsize,
    /// Readers and writers stop.
    stop: AtomicBool,
    /// The proxy is frozen (from ON's answer to just before OFF is sent): a
    /// modify answered meanwhile is an error.
    frozen: AtomicBool,
    /// Writers send while set.
    write: AtomicBool,
    /// Writers inside their sending loop.
    writing: AtomicUsize,
    sent: AtomicU64,
    acked: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }
}

/// A closed-loop reader until `stop`: its latencies per phase.
async fn reader(
    addr: SocketAddr,
    ops: Arc<FreezeOps>,
    (idx, conns): (usize, usize),
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Vec<Vec<u64>> {
    let mut per_phase: Vec<Vec<u64>> = Vec::new();
    let mut c = match tokio::time::timeout(SETUP_TIMEOUT, Conn::connect(addr)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.error(format!("reader {idx}: {e:#}"));
            return per_phase;
        }
        Err(_) => {
            shared.error(format!("reader {idx}: connect timed out"));
            return per_phase;
        }
    };
    let _ = ready.send(()).await;
    drop(ready);
    let n = ops.search.len();
    let mut i = 0usize;
    while !shared.stop.load(Relaxed) {
        let k = (idx + i * conns) % n;
        i += 1;
        let w = shared.window.load(Relaxed);
        let t = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, c.call(&ops.search[k])).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.error(format!("reader {idx}: search: {e:#}"));
                return per_phase;
            }
            Err(_) => {
                shared.error(format!(
                    "reader {idx}: search: no response within {REQUEST_TIMEOUT:?}"
                ));
                return per_phase;
            }
        }
        let dt = t.elapsed();
        if w != 0 && shared.window.load(Relaxed) == w {
            if per_phase.len() < w {
                per_phase.resize_with(w, Vec::new);
            }
            per_phase[w - 1].push(dt.as_nanos() as u64);
        }
    }
    c.unbind().await;
    per_phase
}

/// A writer: while `write` is set, pipelines a modify of its own users
/// every 1/rate s without waiting for the answers, which a second task
/// reads and checks (a success modify response, none while frozen).
async fn writer(
    addr: SocketAddr,
    ops: Arc<FreezeOps>,
    (idx, writers): (usize, usize),
    rate: f64,
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    let c = match Conn::connect_bound(addr, Some(&ops.bind)).await {
        Ok(c) => c,
        Err(e) => return shared.error(format!("writer {idx}: {e:#}")),
    };
    let Conn {
        stream,
        mut buf,
        mut codec,
        mut out,
        mut next_id,
    } = c;
    let (mut rd, mut wr) = stream.into_split();
    let responses = {
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            use tokio_util::codec::Decoder;
            loop {
                let frame = match codec.decode(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    },
                    Err(e) => return shared.error(format!("writer {idx}: {e}")),
                };
                let env = match abproxy::wire::Envelope::response(&frame) {
                    Ok(e) => e,
                    Err(e) => return shared.error(format!("writer {idx}: {e}")),
                };
                if env.op != op::MODIFY_RESPONSE || env.result_code != Some(0) {
                    return shared.error(format!(
                        "writer {idx}: {} result code {:?}: {}",
                        op::name(env.op),
                        env.result_code,
                        diagnostic(&frame)
                    ));
                }
                if shared.frozen.load(Relaxed) {
                    shared.error(format!(
                        "writer {idx}: modify {} answered while frozen",
                        env.msgid
                    ));
                }
                shared.acked.fetch_add(1, Relaxed);
            }
        })
    };
    let _ = ready.send(()).await;
    drop(ready);
    let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut i = 0usize;
    'outer: while !shared.stop.load(Relaxed) {
        if !shared.write.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        shared.writing.fetch_add(1, Relaxed);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shared.write.load(Relaxed) && !shared.stop.load(Relaxed) {
            tick.tick().await;
            if !shared.write.load(Relaxed) {
                break;
            }
            let k = ops.user(idx, writers, i);
            i += 1;
            let id = next_id;
            next_id = if id == i32::MAX { 1 } else { id + 1 };
            frame_into(&mut out, id, &ops.modify[k]);
            shared.sent.fetch_add(1, Relaxed);
            if let Err(e) = wr.write_all(&out).await {
                shared.error(format!("writer {idx}: sending a modify: {e}"));
                shared.writing.fetch_sub(1, Relaxed);
                break 'outer;
            }
        }
        shared.writing.fetch_sub(1, Relaxed);
    }
    frame_into(&mut out, next_id, &[op::UNBIND_REQUEST, 0x00]);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = wr.write_all(&out).await;
        let _ = wr.shutdown().await;
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), responses).await;
}

/// Opens phase `n`'s window after the warm-up, keeps it open `secs`; the
/// window's length and the proxy's CPU time in it.
async fn window(
    shared: &Shared,
    n: usize,
    o: &ReadsOpts,
    proxy_pid: u32,
) -> (Duration, Option<Duration>) {
    tokio::time::sleep(o.warmup).await;
    let probe = CpuProbe::Process(proxy_pid);
    let cpu0 = probe.read();
    shared.window.store(n + 1, Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(o.secs).await;
    shared.window.store(0, Relaxed);
    let dt = t0.elapsed();
    let cpu = match (cpu0, probe.read()) {
        (Some(a), Some(b)) => Some(b.cpu.saturating_sub(a.cpu)),
        _ => None,
    };
    (dt, cpu)
}

/// After OFF: waits until every modify sent is answered.
async fn wait_released(shared: &Shared) -> Result<()> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    while shared.writing.load(Relaxed) != 0 {
        if Instant::now() >= deadline {
            bail!("writers did not stop sending");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        let (s, a) = (shared.sent.load(Relaxed), shared.acked.load(Relaxed));
        if a >= s {
            return Ok(());
        }
        if !shared.errors.lock().unwrap().is_empty() {
            bail!("{a} of {s} modifies answered, writer errors");
        }
        if Instant::now() >= deadline {
            bail!("{a} of {s} modifies answered {RELEASE_TIMEOUT:?} after OFF");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One phase; returns its window, the proxy's CPU in it, and the queue at
/// OFF (frozen phases).
async fn phase(
    kind: Phase,
    n: usize,
    (proxy, proxy_pid): (SocketAddr, u32),
    admin: &mut Admin,
    shared: &Shared,
    o: &ReadsOpts,
) -> Result<(Duration, Option<Duration>, Option<u64>)> {
    if kind == Phase::Unfrozen {
        let s = admin.status().await?;
        if s.state != FreezeState::Thawed || s.queued_requests != 0 {
            bail!("before an unfrozen phase: {}", status_summary(&s));
        }
        let (dt, cpu) = window(shared, n, o, proxy_pid).await;
        return Ok((dt, cpu, None));
    }
    let mut session = None;
    if kind == Phase::FrozenSession {
        let target = Target {
            url: format!("ldap://{proxy}"),
            bind_dn: Some(ADMIN_DN.into()),
            password: Some(Password::new(ADMIN_PW)),
        };
        let mut s = Session::connect(&target)
            .await
            .map_err(|e| anyhow!("operator::Session connect: {e}"))?;
        let f = s
            .on(&FreezeRequest::default().with_hold_until_unbind(true))
            .await
            .map_err(|e| anyhow!("operator::Session ON: {e}"))?;
        session = Some((s, f.id()));
    } else {
        admin.switch(true).await?;
    }
    shared.frozen.store(true, Relaxed);
    if kind.writes() {
        shared.write.store(true, Relaxed);
    }
    let s = admin.status().await?;
    let (dt, cpu) = if s.state == FreezeState::Frozen {
        window(shared, n, o, proxy_pid).await
    } else {
        (Duration::ZERO, None)
    };
    shared.write.store(false, Relaxed);
    while shared.writing.load(Relaxed) != 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let queued = admin.status().await?;
    shared.frozen.store(false, Relaxed);
    match session {
        Some((mut s, id)) => {
            let r = s.off_freeze(id).await;
            s.close().await;
            r.map_err(|e| anyhow!("operator::Session OFF: {e}"))?;
        }
        None => {
            admin.switch(false).await?;
        }
    }
    if s.state != FreezeState::Frozen {
        bail!("after ON: {}", status_summary(&s));
    }
    wait_released(shared).await?;
    Ok((dt, cpu, Some(queued.queued_requests)))
}

/// The section: readers and writers connected once, then `rounds` rounds of
/// an unfrozen phase before each frozen kind.
pub async fn run(
    o: &ReadsOpts,
    (proxy, proxy_pid): (SocketAddr, u32),
    ops: Arc<FreezeOps>,
    res: &mut ReadsResults,
) {
    let shared = Arc::new(Shared::default());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(o.readers + o.writers);
    let mut readers = tokio::task::JoinSet::new();
    for idx in 0..o.readers {
        readers.spawn(reader(
            proxy,
            ops.clone(),
            (idx, o.readers),
            shared.clone(),
            ready_tx.clone(),
        ));
    }
    let mut writers = tokio::task::JoinSet::new();
    for idx in 0..o.writers {
        writers.spawn(writer(
            proxy,
            ops.clone(),
            (idx, o.writers),
            o.write_rate,
            shared.clone(),
            ready_tx.clone(),
        ));
    }
    drop(ready_tx);
    let mut n_ready = 0;
    let _ = tokio::time::timeout(SETUP_TIMEOUT + Duration::from_secs(1), async {
        while n_ready < o.readers + o.writers && ready_rx.recv().await.is_some() {
            n_ready += 1;
        }
    })
    .await;

    let mut kinds: Vec<Phase> = Vec::new();
    let mut measured: Vec<(Duration, Option<Duration>, Option<u64>)> = Vec::new();
    let controller = async {
        if n_ready < o.readers + o.writers {
            bail!("{n_ready} of {} clients ready", o.readers + o.writers);
        }
        let mut admin = Admin::connect(proxy, ops.clone()).await?;
        for round in 0..o.rounds {
            let mut frozen = [Phase::Frozen, Phase::FrozenWriters, Phase::FrozenSession];
            frozen.rotate_left(round % 3);
            for f in frozen {
                for kind in [Phase::Unfrozen, f] {
                    let n = kinds.len();
                    let r = phase(kind, n, (proxy, proxy_pid), &mut admin, &shared, o)
                        .await
                        .with_context(|| format!("round {} {}", round + 1, kind.name()))?;
                    eprintln!(
                        "load: round {} freeze-reads {:>38}: {:.2} s{}",
                        round + 1,
                        kind.name(),
                        r.0.as_secs_f64(),
                        r.2.map_or(String::new(), |q| format!(", {q} modifies held at OFF"))
                    );
                    kinds.push(kind);
                    measured.push(r);
                    let errs = shared.errors.lock().unwrap();
                    if !errs.is_empty() {
                        bail!("client errors: {}", errs.join("; "));
                    }
                }
            }
        }
        admin.c.unbind().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = controller {
        let st = status_then_thaw(proxy, &ops).await;
        res.errors.push(format!("{e:#}; {st}"));
    }
    shared.write.store(false, Relaxed);
    shared.stop.store(true, Relaxed);
    let mut per_phase: Vec<Vec<u64>> = vec![Vec::new(); kinds.len()];
    let collected = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), async {
        while let Some(r) = readers.join_next().await {
            match r {
                Ok(v) => {
                    for (i, lat) in v.into_iter().enumerate() {
                        if let Some(p) = per_phase.get_mut(i) {
                            p.extend(lat);
                        }
                    }
                }
                Err(e) => res.errors.push(format!("reader task: {e}")),
            }
        }
        while writers.join_next().await.is_some() {}
    })
    .await;
    if collected.is_err() {
        res.errors
            .push("clients did not stop in time; aborted".into());
        readers.abort_all();
        writers.abort_all();
    }
    res.errors.extend(shared.errors.lock().unwrap().drain(..));
    let mut p99_before = None;
    for ((kind, lat), (dt, cpu, queued)) in kinds.into_iter().zip(per_phase).zip(measured) {
        let mut lat = lat;
        lat.sort_unstable();
        let p99 = pct_us(&lat, 99.0);
        let n = lat.len() as f64;
        res.phases.push(PhaseResult {
            kind,
            secs: dt.as_secs_f64(),
            cpu_us_per_read: cpu.filter(|_| n > 0.0).map(|c| c.as_secs_f64() * 1e6 / n),
            queued_at_off: queued,
            p99_before: if kind == Phase::Unfrozen {
                None
            } else {
                p99_before
            },
            lat,
        });
        if kind == Phase::Unfrozen {
            p99_before = p99;
        }
    }
    res.notes.push(format!(
        "{} modifies sent by the writers, {} answered",
        shared.sent.load(Relaxed),
        shared.acked.load(Relaxed)
    ));
}

impl ReadsResults {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| reads during | phases | reads | reads/s | p50 µs | p99 µs | p50 / unfrozen | p99 / unfrozen \
             | p99 / unfrozen before, median of pairs (range) | proxy CPU µs/read | modifies held at OFF (median) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let pooled = |k: Phase| -> Vec<u64> {
            let mut v: Vec<u64> = self
                .phases
                .iter()
                .filter(|p| p.kind == k)
                .flat_map(|p| p.lat.iter().copied())
                .collect();
            v.sort_unstable();
            v
        };
        let base = pooled(Phase::Unfrozen);
        let (b50, b99) = (pct_us(&base, 50.0), pct_us(&base, 99.0));
        for k in [
            Phase::Unfrozen,
            Phase::Frozen,
            Phase::FrozenWriters,
            Phase::FrozenSession,
        ] {
            let ph: Vec<&PhaseResult> = self.phases.iter().filter(|p| p.kind == k).collect();
            if ph.is_empty() {
                continue;
            }
            let v = pooled(k);
            let secs: f64 = ph.iter().map(|p| p.secs).sum();
            let (p50, p99) = (pct_us(&v, 50.0), pct_us(&v, 99.0));
            let rel = |x: Option<f64>, b: Option<f64>| match (x, b) {
                (Some(x), Some(b)) if b > 0.0 && k != Phase::Unfrozen => format!("{:.3}", x / b),
                _ => "-".into(),
            };
            let mut pairs: Vec<f64> = ph
                .iter()
                .filter_map(|p| Some(pct_us(&p.lat, 99.0)? / p.p99_before?))
                .collect();
            let pairs = match median(&mut pairs) {
                Some(m) => format!(
                    "{m:.3} ({:.2} .. {:.2})",
                    pairs.first().copied().unwrap_or(m),
                    pairs.last().copied().unwrap_or(m)
                ),
                None => "-".into(),
            };
            let mut cpu: Vec<f64> = ph.iter().filter_map(|p| p.cpu_us_per_read).collect();
            let mut held: Vec<f64> = ph
                .iter()
                .filter_map(|p| p.queued_at_off.map(|q| q as f64))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {pairs} | {} | {} |",
                k.name(),
                ph.len(),
                v.len(),
                fmt_opt((secs > 0.0).then(|| v.len() as f64 / secs), 0),
                fmt_opt(p50, 0),
                fmt_opt(p99, 0),
                rel(p50, b50),
                rel(p99, b99),
                fmt_opt(median(&mut cpu), 1),
                if k.writes() {
                    fmt_opt(median(&mut held), 0)
                } else {
                    "-".into()
                },
            );
        }
        s
    }

    pub fn explanations(&self, o: &ReadsOpts) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "- {} readers: closed-loop anonymous base searches of their own users through abproxy, \
             connections opened once for the section; a read counts for a phase when sent and \
             answered inside its {:.2} s window (after {} ms of settling).",
            o.readers,
            o.secs.as_secs_f64(),
            o.warmup.as_millis()
        );
        let _ = writeln!(
            s,
            "- frozen: Allow-Backup ON (all backends, readonly) from an admin connection open for the \
             section; OFF after the window. writers held: {} writers pipeline modifies at {} /s each \
             from ON's answer to the window's end (held; released by OFF, all answered before the next \
             phase). via operator::Session: ON with holdUntilUnbind on an `abproxy::operator::Session` bound as \
             the admin (as `abproxy run`), OFF on it.",
            o.writers, o.write_rate
        );
        let _ = writeln!(
            s,
            "- ratios: the frozen pooled percentile / the unfrozen pooled one; pairs: each frozen \
             phase's p99 / the p99 of the unfrozen phase just before it, median over rounds."
        );
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "\nFreeze-reads errors (each stopped the section):");
            for e in &self.errors {
                let _ = writeln!(s, "- {e}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(
        kind: Phase,
        lat_us: &[u64],
        p99_before: Option<f64>,
        queued: Option<u64>,
    ) -> PhaseResult {
        PhaseResult {
            kind,
            lat: lat_us.iter().map(|us| us * 1000).collect(),
            secs: 1.0,
            cpu_us_per_read: Some(2.0),
            queued_at_off: queued,
            p99_before,
        }
    }

    /// Pooled percentiles per kind of phase, ratios to the unfrozen pool,
    /// and the median of the per-pair p99 ratios with its range.
    #[test]
    fn table() {
        let r = ReadsResults {
            phases: vec![
                phase(Phase::Unfrozen, &[100, 200], None, None),
                phase(Phase::Frozen, &[110, 220], Some(200.0), Some(0)),
                phase(Phase::Unfrozen, &[100, 100], None, None),
                phase(Phase::FrozenWriters, &[150, 300], Some(100.0), Some(40)),
                phase(Phase::Unfrozen, &[100, 200], None, None),
                phase(Phase::Frozen, &[100, 180], Some(200.0), Some(0)),
            ],
            ..Default::default()
        };
        let t = r.table();
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 5, "{t}");
        assert_eq!(
            rows[2],
            "| unfrozen | 3 | 6 | 2 | 100 | 200 | - | - | - | 2.0 | - |"
        );
        assert_eq!(
            rows[3],
            "| frozen | 2 | 4 | 2 | 110 | 220 | 1.100 | 1.100 | 1.000 (0.90 .. 1.10) | 2.0 | - |"
        );
        assert_eq!(
            rows[4],
            "| frozen, writers held | 1 | 2 | 2 | 150 | 300 | 1.500 | 1.500 | 3.000 (3.00 .. 3.00) | 2.0 | 40 |"
        );
    }
}
