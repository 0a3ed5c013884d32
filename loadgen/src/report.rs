//! The throughput section's results and tables: per (workload, connection
//! count, target) the ops/s over rounds, latencies, the proxy's CPU per
//! operation and the per-round ratios to `direct`; the main table, the
//! head-to-head table of abproxy against the reference column (HAProxy or
//! the A/A control), and the added latency at one connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::opts::Opts;
use crate::point::Point;
use crate::reference::reference_name;
use crate::stats::{fmt_opt, median, median_interval, pct_us};
use crate::workload::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Direct,
    Abproxy,
    Haproxy,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Abproxy => "abproxy",
            Target::Haproxy => reference_name(),
        }
    }
}

/// All rounds of one target at one (workload, conns).
#[derive(Default)]
pub struct Agg {
    pub ops: Vec<f64>,
    /// The proxy's CPU µs per operation, per round.
    pub cpu: Vec<f64>,
    pub lat: Vec<u64>,
    pub errors: Vec<String>,
}
#[derive(Default)]
pub struct Results {
    /// (workload, conns, target) -> aggregate.
    pub cells: BTreeMap<(Kind, usize, Target), Agg>,
    /// (workload, conns, target) -> per-round ratio to direct.
    pub ratios: BTreeMap<(Kind, usize, Target), Vec<f64>>,
    /// (workload, conns) -> per round, abproxy against HAProxy measured in
    /// the same round: ops/s ratio and proxy CPU µs/op difference.
    pub head_to_head: BTreeMap<(Kind, usize), Vec<Paired>>,
}

/// One round of abproxy against HAProxy at one point.
pub struct Paired {
    /// abproxy's ops/s / HAProxy's.
    pub ops_ratio: f64,
    /// abproxy's proxy CPU µs/op - HAProxy's.
    pub cpu_diff: Option<f64>,
}

/// One round of one (workload, conns): what each target measured, for the
/// per-round ratios.
#[derive(Default)]
pub struct Round {
    /// ops/s of each target that completed operations.
    pub ops: BTreeMap<Target, f64>,
    /// The proxy's CPU µs per operation, where measured.
    pub cpu: BTreeMap<Target, f64>,
}

impl Results {
    /// Adds one point of `round` (one target at one workload and conns).
    pub fn add_point(&mut self, (k, conns, t): (Kind, usize, Target), round: &mut Round, p: Point) {
        let cpu = |i: usize| p.cpu_us_per_op.get(i).copied().flatten();
        let agg = self.cells.entry((k, conns, t)).or_default();
        agg.cpu.extend(cpu(0));
        if let Some(c) = cpu(0) {
            round.cpu.insert(t, c);
        }
        if p.ops_per_sec > 0.0 {
            agg.ops.push(p.ops_per_sec);
            round.ops.insert(t, p.ops_per_sec);
        }
        agg.lat.extend_from_slice(&p.lat);
        agg.errors.extend(p.errors);
    }

    /// Ends a round of one (workload, conns): each target's ratio to
    /// direct, and abproxy against the reference column.
    pub fn end_round(&mut self, (k, conns): (Kind, usize), round: Round) {
        let Round {
            ops: round_ops,
            cpu: round_cpu,
        } = round;
        if let Some(&d) = round_ops.get(&Target::Direct) {
            for (&t, &o) in &round_ops {
                self.ratios.entry((k, conns, t)).or_default().push(o / d);
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
            self.head_to_head
                .entry((k, conns))
                .or_default()
                .push(Paired {
                    ops_ratio: a / h,
                    cpu_diff: cpu,
                });
        }
    }

    /// After the last round: sorts the latencies for the percentiles.
    pub fn finish(&mut self) {
        for agg in self.cells.values_mut() {
            agg.lat.sort_unstable();
        }
    }

    pub fn p(&self, k: Kind, c: usize, t: Target, p: f64) -> Option<f64> {
        self.cells.get(&(k, c, t)).and_then(|a| pct_us(&a.lat, p))
    }

    pub fn ops(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.cells
            .get(&(k, c, t))
            .and_then(|a| median(&mut a.ops.clone()))
    }

    /// Median proxy CPU µs per operation.
    pub fn cpu(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.cells
            .get(&(k, c, t))
            .and_then(|a| median(&mut a.cpu.clone()))
    }

    pub fn ratio(&self, k: Kind, c: usize, t: Target) -> Option<f64> {
        self.ratios
            .get(&(k, c, t))
            .and_then(|v| median(&mut v.clone()))
    }

    pub fn table(&self, opts: &Opts, haproxy: bool) -> String {
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
    pub fn head_to_head_table(&self, opts: &Opts) -> String {
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
    pub fn added_latency_at_1(&self, opts: &Opts, haproxy: bool) -> String {
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
