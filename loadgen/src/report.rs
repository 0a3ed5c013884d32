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

/// The sections that compare several targets at each point (`A`: the
/// workload or the slapd, with a connection count; `T`: the target), round
/// by round: each target's aggregate and, per round, its ops/s over each
/// reference target's in the same round.
pub struct Rounds<A, T> {
    pub cells: BTreeMap<(A, usize, T), Agg>,
    /// Per reference: (point, target) -> per-round ratios.
    ratios: BTreeMap<T, PerRound<A, T>>,
    refs: Vec<T>,
}

/// (point, target) -> one value per round.
type PerRound<A, T> = BTreeMap<(A, usize, T), Vec<f64>>;

impl<A: Ord + Copy, T: Ord + Copy> Rounds<A, T> {
    /// Ratios are kept to each of `refs`.
    pub fn new(refs: &[T]) -> Self {
        Rounds {
            cells: BTreeMap::new(),
            ratios: BTreeMap::new(),
            refs: refs.to_vec(),
        }
    }

    /// Adds one round at one point: each target's measurement. Probe 0 of
    /// a point is the proxy.
    pub fn add_round(&mut self, (a, c): (A, usize), points: Vec<(T, Point)>) {
        let mut ops = BTreeMap::new();
        for (t, p) in points {
            let agg = self.cells.entry((a, c, t)).or_default();
            agg.cpu.extend(p.cpu_us_per_op.first().copied().flatten());
            if p.ops_per_sec > 0.0 {
                agg.ops.push(p.ops_per_sec);
                ops.insert(t, p.ops_per_sec);
            }
            agg.lat.extend_from_slice(&p.lat);
            agg.errors.extend(p.errors);
        }
        for (&t, &o) in &ops {
            for &r in &self.refs {
                if let Some(&base) = ops.get(&r) {
                    let per = self.ratios.entry(r).or_default();
                    per.entry((a, c, t)).or_default().push(o / base);
                }
            }
        }
    }

    /// After the last round: sorts the latencies for the percentiles.
    pub fn finish(&mut self) {
        for agg in self.cells.values_mut() {
            agg.lat.sort_unstable();
        }
    }

    /// The median ops/s over rounds.
    pub fn ops(&self, k: (A, usize, T)) -> Option<f64> {
        self.cells.get(&k).and_then(|a| median(&mut a.ops.clone()))
    }

    /// The median over rounds of the ratio to `reference`.
    pub fn ratio(&self, reference: T, k: (A, usize, T)) -> Option<f64> {
        median(&mut self.ratios(reference, k).to_vec())
    }

    /// The points that had errors, one line each: `name` of the point,
    /// then how many and the first.
    pub fn errors(&self, name: impl Fn(&A, usize, &T) -> String) -> Vec<String> {
        self.cells
            .iter()
            .filter(|(_, a)| !a.errors.is_empty())
            .map(|((x, c, t), a)| {
                let n = a.errors.len();
                format!("{}: {n} error(s), first: {}", name(x, *c, t), a.errors[0])
            })
            .collect()
    }

    /// The per-round ratios to `reference`.
    pub fn ratios(&self, reference: T, k: (A, usize, T)) -> &[f64] {
        self.ratios
            .get(&reference)
            .and_then(|per| per.get(&k))
            .map_or(&[], Vec::as_slice)
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A measured point for the report tests (the sections' too).
    pub(crate) fn point(ops: f64, lat_us: &[u64], proxy_cpu: Option<f64>) -> Point {
        Point {
            ops_per_sec: ops,
            lat: lat_us.iter().map(|us| us * 1000).collect(),
            errors: Vec::new(),
            cpu_us_per_op: vec![proxy_cpu, Some(20.0), Some(30.0)],
            switches_per_op: Vec::new(),
            run_delay_us_per_op: Vec::new(),
            migrations_per_op: Vec::new(),
            segments_per_op: None,
        }
    }

    fn opts(conns: &[usize]) -> Opts {
        let mut o = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        o.workloads = vec![Kind::Search];
        o.conns = conns.to_vec();
        o
    }

    /// Two rounds of search at 1 connection, direct, abproxy and the
    /// reference column, measured in different orders.
    fn two_rounds() -> Results {
        let mut r = Results::default();
        let k = (Kind::Search, 1);
        let rounds = [
            [
                (Target::Direct, point(1000.0, &[100, 200], None)),
                (Target::Abproxy, point(800.0, &[150, 300], Some(10.0))),
                (Target::Haproxy, point(900.0, &[120, 250], Some(5.0))),
            ],
            [
                (Target::Haproxy, point(1600.0, &[120, 250], Some(6.0))),
                (Target::Abproxy, point(1000.0, &[150, 300], Some(12.0))),
                (Target::Direct, point(2000.0, &[100, 200], None)),
            ],
        ];
        for round in rounds {
            let mut this = Round::default();
            for (t, p) in round {
                r.add_point((k.0, k.1, t), &mut this, p);
            }
            r.end_round(k, this);
        }
        r.finish();
        r
    }

    /// ops/s: median over rounds; ratios: median of the per-round ratios
    /// (not the ratio of the medians); percentiles over all rounds' samples;
    /// CPU: median of the proxy's per-round values.
    #[test]
    fn medians_ratios_percentiles() {
        let r = two_rounds();
        let (k, c) = (Kind::Search, 1);
        assert_eq!(r.ops(k, c, Target::Direct), Some(1500.0));
        assert_eq!(r.ops(k, c, Target::Abproxy), Some(900.0));
        assert_eq!(r.ratio(k, c, Target::Direct), Some(1.0));
        let close = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-12;
        assert!(close(r.ratio(k, c, Target::Abproxy), 0.65));
        assert!(close(r.ratio(k, c, Target::Haproxy), 0.85));
        // Not the ratio of the medians (900 / 1500 = 0.6).
        assert!(!close(r.ratio(k, c, Target::Abproxy), 0.6));
        assert_eq!(r.p(k, c, Target::Abproxy, 50.0), Some(150.0));
        assert_eq!(r.p(k, c, Target::Abproxy, 99.0), Some(300.0));
        assert_eq!(r.cpu(k, c, Target::Abproxy), Some(11.0));
        assert_eq!(r.cpu(k, c, Target::Direct), None);
        let h = &r.head_to_head[&(k, c)];
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].ops_ratio, 1000.0 / 1600.0);
        assert_eq!(h[1].cpu_diff, Some(6.0));
    }

    #[test]
    fn tables() {
        let r = two_rounds();
        let o = opts(&[1]);
        let t = r.table(&o, true);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0]
            .starts_with("| workload | conns | direct ops/s | abproxy ops/s | haproxy ops/s |"));
        assert_eq!(
            lines[1],
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        assert_eq!(
            lines[2],
            "| search | 1 | 1500 | 900 | 1250 | 0.650 | 0.850 | 100 / 200 | 150 / 300 | 120 / 250 | +100 | 11.0 | 5.5 |"
        );
        // Without the reference column its cells say n/a.
        let t = r.table(&o, false);
        assert_eq!(
            t.lines().nth(2).unwrap(),
            "| search | 1 | 1500 | 900 | n/a | 0.650 | n/a | 100 / 200 | 150 / 300 | n/a | +100 | 11.0 | n/a |"
        );
        let t = r.head_to_head_table(&o);
        assert_eq!(
            t.lines().nth(2).unwrap(),
            "| search | 1 | 0.757 | - (too few rounds) | 0 of 2 | +5.5 |",
            "{t}"
        );
        assert_eq!(
            r.added_latency_at_1(&o, true),
            "search abproxy +100 µs (p50 +50 µs), haproxy +50 µs (p50 +20 µs)"
        );
        assert_eq!(
            r.added_latency_at_1(&o, false),
            "search abproxy +100 µs (p50 +50 µs)"
        );
        assert_eq!(
            r.added_latency_at_1(&opts(&[8]), true),
            "(no 1-connection point measured)"
        );
        // A point never measured prints dashes.
        let t = r.table(&opts(&[8]), true);
        assert_eq!(
            t.lines().nth(2).unwrap(),
            "| search | 8 | - | - | - | - | - | - / - | - / - | - / - | - | - | - |"
        );
    }

    /// Five rounds give an interval; the rounds abproxy was ahead count.
    #[test]
    fn head_to_head_interval() {
        let mut r = Results::default();
        let k = (Kind::Bind, 8);
        for (a, h) in [
            (90.0, 100.0),
            (110.0, 100.0),
            (95.0, 100.0),
            (105.0, 100.0),
            (120.0, 100.0),
        ] {
            let mut this = Round::default();
            r.add_point(
                (k.0, k.1, Target::Direct),
                &mut this,
                point(200.0, &[1], None),
            );
            r.add_point((k.0, k.1, Target::Abproxy), &mut this, point(a, &[1], None));
            r.add_point((k.0, k.1, Target::Haproxy), &mut this, point(h, &[1], None));
            r.end_round(k, this);
        }
        let mut o = opts(&[8]);
        o.workloads = vec![Kind::Bind];
        let t = r.head_to_head_table(&o);
        assert_eq!(
            t.lines().nth(2).unwrap(),
            "| bind | 8 | 1.050 | 0.900 .. 1.200 (94 %) | 3 of 5 | - |",
            "{t}"
        );
    }

    /// A point without operations (its clients failed) adds no ops/s and no
    /// ratio, but its errors; a round without direct has no ratios.
    #[test]
    fn failed_points() {
        let mut r = Results::default();
        let k = (Kind::Modify, 1);
        let mut failed = point(0.0, &[], Some(1.0));
        failed
            .errors
            .push("modify request: result code Some(53)".into());
        let mut this = Round::default();
        r.add_point((k.0, k.1, Target::Direct), &mut this, failed);
        r.add_point(
            (k.0, k.1, Target::Abproxy),
            &mut this,
            point(500.0, &[10], Some(3.0)),
        );
        r.end_round(k, this);
        assert_eq!(r.ops(k.0, k.1, Target::Direct), None);
        assert_eq!(r.ratio(k.0, k.1, Target::Abproxy), None);
        assert!(r.head_to_head.is_empty());
        assert_eq!(r.cells[&(k.0, k.1, Target::Direct)].errors.len(), 1);
        assert_eq!(r.cpu(k.0, k.1, Target::Direct), Some(1.0));
    }
}
