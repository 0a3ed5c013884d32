//! One measured point (one target, one workload, one connection count):
//! closed-loop clients, each on its own connection, sending a request and
//! waiting for its final response before the next; latencies after the
//! warm-up, throughput over the measured window, and the probes' CPU time
//! and scheduler counts per operation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::client::{Conn, REQUEST_TIMEOUT, SETUP_TIMEOUT};
use crate::probe::{tcp_out_segments, CpuProbe, SchedSample};
use crate::workload::Workload;

/// What one closed-loop client measured.
#[derive(Default)]
pub struct ClientResult {
    /// Latencies (ns) of the requests sent after the warm-up.
    pub lat: Vec<u64>,
    /// When its last measured request completed.
    pub last_done: Option<Instant>,
    pub error: Option<String>,
}

/// What one client of a point does.
pub struct ClientSpec {
    pub addr: SocketAddr,
    pub w: Arc<Workload>,
    /// Client number, 0..conns.
    pub idx: usize,
    pub conns: usize,
    pub warmup: Duration,
    pub secs: Duration,
}

pub async fn client(
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
    let mut c = match Conn::connect_bound(addr, w.setup.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            res.error = Some(format!("{e:#}"));
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
pub const LOADGEN_THREAD: &str = "loadgen";

/// One measurement: one target, one workload, one connection count.
pub struct Point {
    pub ops_per_sec: f64,
    pub lat: Vec<u64>,
    pub errors: Vec<String>,
    /// CPU time per measured operation, in µs, of each probe given to
    /// [`run_point`] (the proxy's, slapd's, the load generator's).
    pub cpu_us_per_op: Vec<Option<f64>>,
    /// Context switches per measured operation of each probe.
    pub switches_per_op: Vec<Option<f64>>,
    /// Time each probe spent runnable, waiting for a CPU, per operation (µs).
    pub run_delay_us_per_op: Vec<Option<f64>>,
    /// CPU migrations per measured operation of each probe.
    pub migrations_per_op: Vec<Option<f64>>,
    /// TCP segments sent per measured operation, by every socket of the
    /// machine's network namespace (this benchmark's traffic, over
    /// loopback: both directions of both hops).
    pub segments_per_op: Option<f64>,
}

pub async fn run_point(
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
