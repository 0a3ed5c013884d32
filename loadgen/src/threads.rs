//! The threads section of the load benchmark (`--workloads threads`): what
//! abproxy's `threads` setting does to throughput, latency and CPU per
//! operation, to choose its default from measurements.
//!
//! The `search` and `modify` workloads (their clients and points,
//! [`run_point`]) against the run's slapd, straight (`direct`) and through
//! abproxy processes that differ only in `threads`: `default` (no `threads`
//! key in its configuration file at all, what users run; whatever the
//! proxy's automatic rule makes of it), `threads=1` (a current-thread
//! runtime), `threads=N` (N =
//! [`available_parallelism`](std::thread::available_parallelism), a
//! multi-thread runtime with one worker per core) and `threads=2N`
//! (oversubscribed); targets with the same `threads` are measured once
//! (with N = 1, `threads=N` is `threads=1`). Each proxy's OS thread count
//! is read from `/proc/PID/task` once it listens, so the table's reader
//! sees what `default` resolved to.
//!
//! The connection counts are the run's `--conns` and `--threads-many`
//! (many more clients than cores). For each round x workload x connection
//! count, the targets run back to back in the order of [`latin_order`]:
//! over as many rounds as there are targets, each runs once in each
//! position. The table gives each target's median ops/s over rounds, the
//! medians of the per-round ratios to `direct` and to `threads=1` at the
//! same point, latencies and the proxy's CPU per operation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use testkit::Slapd;

use crate::opts::Opts;
use crate::order::latin_order;
use crate::point::{run_point, LOADGEN_THREAD};
use crate::probe::CpuProbe;
use crate::procs::AbproxyProcess;
use crate::report::Rounds;
use crate::stats::{fmt_opt, median, pct_us};
use crate::workload::{Kind, Workload};

/// The workloads of the section.
pub const WORKLOADS: [Kind; 2] = [Kind::Search, Kind::Modify];

/// A target of the section: slapd itself, or abproxy with its `threads`
/// absent from the configuration (`Default`) or set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Direct,
    Default,
    Threads(usize),
}

impl Target {
    pub fn name(self) -> String {
        match self {
            Target::Direct => "direct".into(),
            Target::Default => "default".into(),
            Target::Threads(n) => format!("threads={n}"),
        }
    }

    /// Makes abproxy's configuration (from [`crate::procs::abproxy_config`],
    /// which sets `threads` from `--proxy-threads`) this target's: the key
    /// removed for `Default`, set for `Threads`.
    pub fn edit(self, cfg: &mut toml::Table) {
        match self {
            Target::Direct => {}
            Target::Default => {
                cfg.remove("threads");
            }
            Target::Threads(n) => {
                cfg.insert("threads".into(), (n as i64).into());
            }
        }
    }
}

/// The section's targets on a machine with `cores` cores: direct, default,
/// `threads` = 1, `cores` and 2 x `cores`, each `threads` once.
pub fn targets(cores: usize) -> Vec<Target> {
    let cores = cores.max(1);
    let mut t = vec![Target::Direct, Target::Default];
    for n in [1, cores, 2 * cores] {
        let target = Target::Threads(n);
        if !t.contains(&target) {
            t.push(target);
        }
    }
    t
}

/// The section's connection counts: the run's, then `many` (if not there).
pub fn section_conns(conns: &[usize], many: usize) -> Vec<usize> {
    let mut v = conns.to_vec();
    if !v.contains(&many) {
        v.push(many);
    }
    v
}

/// The number of OS threads of a process (`/proc/PID/task`).
pub fn os_threads(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .map(|d| d.count())
}

/// The section's results, per (workload, conns, target).
pub struct ThreadsResults {
    /// `available_parallelism` of the machine.
    pub cores: usize,
    pub targets: Vec<Target>,
    pub conns: Vec<usize>,
    /// Each proxy's OS threads once it listened.
    pub os_threads: BTreeMap<Target, Option<usize>>,
    /// Ratios to direct and to `threads=1`, per round.
    pub rounds: Rounds<Kind, Target>,
}

impl Default for ThreadsResults {
    fn default() -> Self {
        ThreadsResults {
            cores: 0,
            targets: Vec::new(),
            conns: Vec::new(),
            os_threads: BTreeMap::new(),
            rounds: Rounds::new(&[Target::Direct, Target::Threads(1)]),
        }
    }
}

impl ThreadsResults {
    pub fn ratio_to_direct(&self, k: (Kind, usize, Target)) -> Option<f64> {
        self.rounds.ratio(Target::Direct, k)
    }

    pub fn ratio_to_one(&self, k: (Kind, usize, Target)) -> Option<f64> {
        self.rounds.ratio(Target::Threads(1), k)
    }

    /// The lines under the section's title: the machine's N, what ran, and
    /// each proxy's OS threads.
    pub fn header(&self, opts: &Opts) -> String {
        let threads = self
            .targets
            .iter()
            .filter(|&&t| t != Target::Direct)
            .map(|&t| {
                let n = self.os_threads.get(&t).copied().flatten();
                format!("{} {}", t.name(), n.map_or("-".into(), |n| n.to_string()))
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "N = available_parallelism = {}; {}; {} round(s), {:.2} s per point after {} ms, \
             targets in a balanced order per round; {} users; load generator {} threads\n\
             abproxy OS threads once listening: {threads}\n",
            self.cores,
            WORKLOADS.map(Kind::name).join(" and "),
            opts.rounds,
            opts.secs,
            opts.warmup.as_millis(),
            opts.users,
            opts.client_threads,
        )
    }

    /// One row per workload x conns x target.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| workload | conns | target | ops/s | /direct | /threads=1 | p50 / p99 µs | proxy CPU µs/op |"
        );
        let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|---:|");
        for k in WORKLOADS {
            for &c in &self.conns {
                for &t in &self.targets {
                    let key = (k, c, t);
                    let Some(a) = self.rounds.cells.get(&key) else {
                        continue;
                    };
                    let p = |q| pct_us(&a.lat, q);
                    let _ = writeln!(
                        s,
                        "| {} | {c} | {} | {} | {} | {} | {} / {} | {} |",
                        k.name(),
                        t.name(),
                        fmt_opt(self.rounds.ops(key), 0),
                        fmt_opt(self.ratio_to_direct(key), 3),
                        fmt_opt(self.ratio_to_one(key), 3),
                        fmt_opt(p(50.0), 0),
                        fmt_opt(p(99.0), 0),
                        fmt_opt(median(&mut a.cpu.clone()), 1),
                    );
                }
            }
        }
        s
    }

    /// The errors of the points, one line each.
    pub fn errors(&self) -> Vec<String> {
        self.rounds
            .errors(|k, c, t| format!("threads {} conns={c} {}", k.name(), t.name()))
    }
}

/// Runs the section against `slapd`: starts its proxies, measures every
/// round, stops them.
pub fn run(
    opts: &Opts,
    bin: &Path,
    slapd: &Slapd,
    rt: &tokio::runtime::Runtime,
    res: &mut ThreadsResults,
) -> Result<()> {
    let secs = Duration::from_secs_f64(opts.secs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all = targets(cores);
    let conns_list = section_conns(&opts.conns, opts.threads_many);
    res.cores = cores;
    res.targets = all.clone();
    res.conns = conns_list.clone();
    let mut proxies: Vec<(Target, AbproxyProcess)> = Vec::new();
    for &t in all.iter().filter(|&&t| t != Target::Direct) {
        eprintln!("load: threads: starting abproxy ({})...", t.name());
        let p = AbproxyProcess::start_edited(bin, &slapd.url(), opts, None, |cfg| t.edit(cfg))
            .with_context(|| format!("starting abproxy ({})", t.name()))?;
        let n = os_threads(p.child.id());
        eprintln!(
            "load: threads: abproxy ({}) has {} OS threads",
            t.name(),
            fmt_opt(n.map(|n| n as f64), 0)
        );
        res.os_threads.insert(t, n);
        proxies.push((t, p));
    }
    let target = |t: Target| match proxies.iter().find(|(x, _)| *x == t) {
        Some((_, p)) => (p.addr, Some(p.child.id())),
        None => (slapd.addr(), None),
    };
    let workloads = WORKLOADS.map(|k| Arc::new(Workload::new(k, opts.users)));
    for round in 0..opts.rounds {
        for w in &workloads {
            for &conns in &conns_list {
                let mut points = Vec::new();
                for t in latin_order(&all, round) {
                    let (addr, pid) = target(t);
                    let probes = vec![
                        pid.map(CpuProbe::Process),
                        Some(CpuProbe::Process(slapd.pid())),
                        Some(CpuProbe::Threads(LOADGEN_THREAD)),
                    ];
                    let p =
                        rt.block_on(run_point(addr, w.clone(), conns, opts.warmup, secs, probes));
                    let at = |i: usize| p.cpu_us_per_op.get(i).copied().flatten();
                    eprintln!(
                        "load: round {} threads {:>6} conns={:<4} {:>10}: {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs  CPU µs/op proxy {:>5} slapd {:>5} loadgen {:>5}{}",
                        round + 1,
                        w.kind.name(),
                        conns,
                        t.name(),
                        p.ops_per_sec,
                        fmt_opt(pct_us(&p.lat, 50.0), 0),
                        fmt_opt(pct_us(&p.lat, 99.0), 0),
                        fmt_opt(at(0), 1),
                        fmt_opt(at(1), 1),
                        fmt_opt(at(2), 1),
                        if p.errors.is_empty() {
                            String::new()
                        } else {
                            format!("  ({} errors: {})", p.errors.len(), p.errors[0])
                        }
                    );
                    points.push((t, p));
                }
                res.rounds.add_round((w.kind, conns), points);
            }
        }
    }
    for (_, p) in proxies {
        p.stop();
    }
    res.rounds.finish();
    Ok(())
}

/// What the table's columns are, printed under it.
pub fn explanations() -> String {
    "default: abproxy with no `threads` key in its configuration file (what users run; its OS \
     threads above show what it resolved to); threads=1: a current-thread runtime; threads=N \
     (N > 1): a multi-thread runtime with N workers. Every abproxy is otherwise configured alike, \
     all in front of the same slapd. /direct and /threads=1: medians of the per-round ratios of \
     ops/s to the target at the same point in the same round. p50 / p99 over all rounds' \
     samples; proxy CPU µs/op: median over rounds of the abproxy process's CPU time (user + \
     system) per operation.\n"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::point;
    use std::net::SocketAddr;

    /// Five distinct targets on a multi-core machine; on one core
    /// `threads=N` is `threads=1`, measured once.
    #[test]
    fn targets_are_distinct() {
        use Target::*;
        assert_eq!(
            targets(2),
            [Direct, Default, Threads(1), Threads(2), Threads(4)]
        );
        assert_eq!(
            targets(8),
            [Direct, Default, Threads(1), Threads(8), Threads(16)]
        );
        assert_eq!(targets(1), [Direct, Default, Threads(1), Threads(2)]);
        assert_eq!(targets(0), targets(1));
        assert_eq!(Threads(16).name(), "threads=16");
        assert_eq!(Default.name(), "default");
        // Over as many rounds as targets, each target once in each position.
        for cores in [1, 2] {
            let t = targets(cores);
            let orders: Vec<Vec<Target>> = (0..t.len()).map(|r| latin_order(&t, r)).collect();
            for &x in &t {
                for pos in 0..t.len() {
                    let n = orders.iter().filter(|o| o[pos] == x).count();
                    assert_eq!(n, 1, "{x:?} at {pos}: {orders:?}");
                }
            }
        }
    }

    #[test]
    fn the_many_clients_point_comes_last_once() {
        assert_eq!(section_conns(&[1, 8, 32], 128), [1, 8, 32, 128]);
        assert_eq!(section_conns(&[1, 8], 8), [1, 8]);
    }

    /// abproxy accepts each target's configuration; `default`'s has no
    /// `threads` key at all, the others theirs.
    #[test]
    fn abproxy_accepts_the_threads_configs() {
        let opts = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        let addr: SocketAddr = "127.0.0.1:3890".parse().unwrap();
        for t in targets(2).into_iter().filter(|&t| t != Target::Direct) {
            let mut cfg =
                crate::procs::abproxy_config((addr, None), "ldap://127.0.0.1:389", &opts, None);
            t.edit(&mut cfg);
            let text = toml::to_string(&cfg).unwrap();
            let c = abproxy::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            match t {
                Target::Default => assert!(!text.contains("threads"), "{text}"),
                Target::Threads(n) => {
                    assert!(text.contains(&format!("threads = {n}\n")), "{text}");
                    assert_eq!(c.threads, n);
                }
                Target::Direct => unreachable!(),
            }
        }
    }

    /// This process has at least its main thread.
    #[test]
    fn counts_os_threads() {
        assert!(os_threads(std::process::id()).is_some_and(|n| n >= 1));
    }

    /// Ratios are medians of per-round ratios to direct and to threads=1
    /// in the same round; a point without operations gives no ratio.
    #[test]
    fn ratios_and_table() {
        use Target::*;
        let mut r = ThreadsResults {
            cores: 2,
            targets: targets(2),
            conns: vec![1, 8],
            ..ThreadsResults::default()
        };
        let k = (Kind::Modify, 8);
        let rounds = [
            vec![
                (Threads(4), point(90.0, &[200, 400], Some(12.0))),
                (Direct, point(200.0, &[100, 200], None)),
                (Threads(1), point(100.0, &[150, 300], Some(10.0))),
                (Default, point(95.0, &[160, 320], Some(11.0))),
                (Threads(2), point(120.0, &[140, 280], Some(13.0))),
            ],
            vec![
                (Direct, point(400.0, &[100, 200], None)),
                (Threads(1), point(200.0, &[150, 300], Some(10.0))),
                (Threads(4), point(200.0, &[200, 400], Some(14.0))),
                (Default, point(0.0, &[], Some(11.0))),
                (Threads(2), point(220.0, &[140, 280], Some(13.0))),
            ],
        ];
        for round in rounds {
            r.rounds.add_round(k, round);
        }
        r.rounds.finish();
        let close = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-12;
        assert!(close(r.ratio_to_one((k.0, k.1, Threads(4))), 0.95));
        assert!(close(r.ratio_to_direct((k.0, k.1, Threads(4))), 0.475));
        assert!(close(r.ratio_to_direct((k.0, k.1, Threads(1))), 0.5));
        assert!(close(r.ratio_to_one((k.0, k.1, Threads(1))), 1.0));
        // Default completed nothing in round 2: one ratio only.
        assert_eq!(r.rounds.ratios(Threads(1), (k.0, k.1, Default)).len(), 1);
        assert_eq!(r.rounds.ops((k.0, k.1, Direct)), Some(300.0));
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        // The header, its rule and five rows: nothing else was measured.
        assert_eq!(lines.len(), 7, "{t}");
        assert_eq!(
            lines[2],
            "| modify | 8 | direct | 300 | 1.000 | 2.000 | 100 / 200 | - |"
        );
        assert_eq!(
            lines[3],
            "| modify | 8 | default | 95 | 0.475 | 0.950 | 160 / 320 | 11.0 |"
        );
        assert_eq!(
            lines[6],
            "| modify | 8 | threads=4 | 145 | 0.475 | 0.950 | 200 / 400 | 13.0 |"
        );
        assert!(r.errors().is_empty());
        r.os_threads.insert(Default, Some(3));
        r.os_threads.insert(Threads(1), Some(1));
        let opts = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        let h = r.header(&opts);
        assert!(h.starts_with("N = available_parallelism = 2;"), "{h}");
        assert!(
            h.contains(
                "abproxy OS threads once listening: default 3, threads=1 1, threads=2 -, threads=4 -"
            ),
            "{h}"
        );
    }
}
