//! The journal section of the load benchmark (`--workloads journal`): what
//! the roll-forward journal (`[journal]`, `docs/journal.md`) costs writes.
//!
//! The `modify` workload (its clients and points, [`run_point`]) against
//! two throwaway slapds started for the section, one syncing its own
//! database (`nosync: false`, as a production slapd) and one not (`nosync:
//! true`, as the rest of the benchmark), each with three abproxy processes
//! in front of it: the journal off, `interval` ([`INTERVAL_MS`] ms) and
//! `ack`. Each journal is in a fresh directory on the same filesystem as
//! its slapd's database (a temporary directory next to slapd's own), so the
//! two share the disk as they would on one host.
//!
//! For each round x slapd x connection count, the four targets (direct,
//! off, interval, ack) run back to back in the order of
//! [`latin_order`]: over four rounds each runs once in each position; a
//! `sync(2)` before each point leaves it no dirty pages of the one before. The
//! table gives each target's median ops/s over rounds and the medians of
//! the per-round ratios to journal off (and to direct) at the same point,
//! latencies, the proxy's CPU per operation and the context switches of
//! the journal's sync thread per operation, a relative measure of the syncs
//! per write (a sync is a wait for new records and one or more waits for
//! the disk: about four switches on the development machine; far fewer per
//! operation means one sync covers many writes, the group commit).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testkit::{Slapd, SlapdOptions};

use crate::opts::Opts;
use crate::order::latin_order;
use crate::point::{run_point, Point, LOADGEN_THREAD};
use crate::probe::CpuProbe;
use crate::procs::AbproxyProcess;
use crate::report::Rounds;
use crate::stats::{fmt_opt, median, pct_us};
use crate::workload::{Kind, Workload};

/// `sync_interval_ms` of the `interval` proxies.
pub const INTERVAL_MS: u64 = 100;

/// The name of abproxy's journal sync thread.
pub const SYNC_THREAD: &str = "abproxy-journal";

/// Whether slapd syncs its own database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SlapdSync {
    Fsync,
    Nosync,
}

impl SlapdSync {
    pub const ALL: [SlapdSync; 2] = [SlapdSync::Fsync, SlapdSync::Nosync];

    pub fn name(self) -> &'static str {
        match self {
            SlapdSync::Fsync => "fsync",
            SlapdSync::Nosync => "nosync",
        }
    }
}

/// A target of the section: slapd itself, or abproxy with its journal off,
/// `interval` or `ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Direct,
    Off,
    Interval,
    Request,
    Ack,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Off,
        Mode::Interval,
        Mode::Request,
        Mode::Ack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Off => "off",
            Mode::Interval => "interval",
            Mode::Request => "request",
            Mode::Ack => "ack",
        }
    }

    /// abproxy's `[journal]` table in this mode, its segments in `dir`;
    /// `None` without a journal.
    pub fn journal_table(self, dir: &Path) -> Option<toml::Table> {
        let durability = match self {
            Mode::Interval => "interval",
            Mode::Request => "request",
            Mode::Ack => "ack",
            Mode::Direct | Mode::Off => return None,
        };
        let mut t = toml::Table::new();
        t.insert("dir".into(), dir.display().to_string().into());
        t.insert("durability".into(), durability.into());
        if matches!(self, Mode::Interval | Mode::Request) {
            t.insert("sync_interval_ms".into(), (INTERVAL_MS as i64).into());
        }
        Some(t)
    }
}

/// One slapd and its three proxies.
struct Bed {
    sync: SlapdSync,
    // The proxies before slapd: stopped first.
    proxies: Vec<(Mode, AbproxyProcess)>,
    /// The journals' temporary directories (next to slapd's), removed
    /// after the proxies stop.
    _journals: Vec<tempfile::TempDir>,
    slapd: Slapd,
}

impl Bed {
    fn start(sync: SlapdSync, opts: &Opts, bin: &Path) -> Result<Bed> {
        eprintln!(
            "load: journal: starting slapd ({}) with {} users...",
            sync.name(),
            opts.users
        );
        let slapd = Slapd::start(SlapdOptions {
            users: opts.users,
            nosync: sync == SlapdSync::Nosync,
            ..Default::default()
        })
        .context("starting slapd (needs the slapd package)")?;
        let parent = slapd
            .dir()
            .parent()
            .context("slapd's directory has no parent")?
            .to_path_buf();
        let dev = std::fs::metadata(slapd.dir())?.dev();
        let mut proxies = Vec::new();
        let mut journals = Vec::new();
        for mode in [Mode::Off, Mode::Interval, Mode::Request, Mode::Ack] {
            let table = match mode {
                Mode::Off | Mode::Direct => None,
                _ => {
                    let tmp = tempfile::Builder::new()
                        .prefix("abp-journal-")
                        .tempdir_in(&parent)
                        .with_context(|| format!("a journal directory in {}", parent.display()))?;
                    if std::fs::metadata(tmp.path())?.dev() != dev {
                        bail!(
                            "{} is not on slapd's filesystem ({})",
                            tmp.path().display(),
                            slapd.dir().display()
                        );
                    }
                    let t = mode.journal_table(&tmp.path().join("journal"));
                    journals.push(tmp);
                    t
                }
            };
            let p = AbproxyProcess::start_with(bin, &slapd.url(), opts, None, table.as_ref())
                .with_context(|| format!("starting abproxy (journal {})", mode.name()))?;
            proxies.push((mode, p));
        }
        Ok(Bed {
            sync,
            proxies,
            _journals: journals,
            slapd,
        })
    }

    /// The target's address and, for a proxy, its process id.
    fn target(&self, mode: Mode) -> (SocketAddr, Option<u32>) {
        match self.proxies.iter().find(|(m, _)| *m == mode) {
            Some((_, p)) => (p.addr, Some(p.child.id())),
            None => (self.slapd.addr(), None),
        }
    }

    fn stop(self) {
        for (_, p) in self.proxies {
            p.stop();
        }
    }
}

/// The section's results, per (slapd, conns, target).
pub struct JournalResults {
    /// Ratios to journal off and to direct, per round.
    pub rounds: Rounds<SlapdSync, Mode>,
    /// Per round: the journal sync thread's context switches per operation.
    pub sync_switches: BTreeMap<(SlapdSync, usize, Mode), Vec<f64>>,
}

impl Default for JournalResults {
    fn default() -> Self {
        JournalResults {
            rounds: Rounds::new(&[Mode::Off, Mode::Direct]),
            sync_switches: BTreeMap::new(),
        }
    }
}

impl JournalResults {
    /// Adds one round of one (slapd, conns): each target's point. Probe 0
    /// of a point is the proxy, probe 3 the journal's sync thread.
    pub fn add_round(&mut self, (s, c): (SlapdSync, usize), points: Vec<(Mode, Point)>) {
        for (m, p) in &points {
            if let Some(sw) = p.switches_per_op.get(3).copied().flatten() {
                self.sync_switches.entry((s, c, *m)).or_default().push(sw);
            }
        }
        self.rounds.add_round((s, c), points);
    }

    pub fn ratio_to_off(&self, k: (SlapdSync, usize, Mode)) -> Option<f64> {
        self.rounds.ratio(Mode::Off, k)
    }

    pub fn ratio_to_direct(&self, k: (SlapdSync, usize, Mode)) -> Option<f64> {
        self.rounds.ratio(Mode::Direct, k)
    }

    pub fn table(&self, conns: &[usize]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| slapd | conns | direct ops/s | off ops/s | interval ops/s | request ops/s | ack ops/s \
             | off/direct | interval/off | request/off | ack/off | ack/direct \
             | p50/p99 µs off | interval | request | ack \
             | proxy CPU µs/op off / interval / request / ack | sync-thread switches/op interval / request / ack |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for sync in SlapdSync::ALL {
            for &c in conns {
                let k = |m| (sync, c, m);
                if !Mode::ALL
                    .iter()
                    .any(|&m| self.rounds.cells.contains_key(&k(m)))
                {
                    continue;
                }
                let ops = |m| fmt_opt(self.rounds.ops(k(m)), 0);
                let lat = |m| {
                    let a = self.rounds.cells.get(&k(m));
                    let p = |q| a.and_then(|a| pct_us(&a.lat, q));
                    format!("{} / {}", fmt_opt(p(50.0), 0), fmt_opt(p(99.0), 0))
                };
                let cpu = |m| {
                    fmt_opt(
                        self.rounds
                            .cells
                            .get(&k(m))
                            .and_then(|a| median(&mut a.cpu.clone())),
                        1,
                    )
                };
                let sw = |m| {
                    let v = self.sync_switches.get(&k(m));
                    fmt_opt(v.and_then(|v| median(&mut v.clone())), 2)
                };
                let _ = writeln!(
                    s,
                    "| {} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} / {} | {} / {} / {} |",
                    sync.name(),
                    ops(Mode::Direct),
                    ops(Mode::Off),
                    ops(Mode::Interval),
                    ops(Mode::Request),
                    ops(Mode::Ack),
                    fmt_opt(self.ratio_to_direct(k(Mode::Off)), 3),
                    fmt_opt(self.ratio_to_off(k(Mode::Interval)), 3),
                    fmt_opt(self.ratio_to_off(k(Mode::Request)), 3),
                    fmt_opt(self.ratio_to_off(k(Mode::Ack)), 3),
                    fmt_opt(self.ratio_to_direct(k(Mode::Ack)), 3),
                    lat(Mode::Off),
                    lat(Mode::Interval),
                    lat(Mode::Request),
                    lat(Mode::Ack),
                    cpu(Mode::Off),
                    cpu(Mode::Interval),
                    cpu(Mode::Request),
                    cpu(Mode::Ack),
                    sw(Mode::Interval),
                    sw(Mode::Request),
                    sw(Mode::Ack),
                );
            }
        }
        s
    }

    /// The errors of the points, one line each.
    pub fn errors(&self) -> Vec<String> {
        self.rounds
            .errors(|s, c, m| format!("journal slapd {} conns={c} {}", s.name(), m.name()))
    }
}

/// Runs the section: starts its slapds and proxies, measures every round,
/// stops them.
pub fn run(
    opts: &Opts,
    bin: &Path,
    rt: &tokio::runtime::Runtime,
    res: &mut JournalResults,
) -> Result<()> {
    let secs = Duration::from_secs_f64(opts.secs);
    let beds = SlapdSync::ALL
        .iter()
        .map(|&s| Bed::start(s, opts, bin))
        .collect::<Result<Vec<_>>>()?;
    let w = Arc::new(Workload::new(Kind::Modify, opts.users));
    for round in 0..opts.rounds {
        for bed in &beds {
            for &conns in &opts.conns {
                let mut points = Vec::new();
                for mode in latin_order(&Mode::ALL, round) {
                    // Each point starts with no dirty pages: what the
                    // point before wrote (the nosync slapd's pages) would
                    // otherwise be written out by this point's syncs.
                    // SAFETY: sync(2) takes no arguments and cannot fail.
                    unsafe { libc::sync() };
                    let (addr, pid) = bed.target(mode);
                    let probes = vec![
                        pid.map(CpuProbe::Process),
                        Some(CpuProbe::Process(bed.slapd.pid())),
                        Some(CpuProbe::Threads(LOADGEN_THREAD)),
                        pid.map(|p| CpuProbe::ProcessThreads(p, SYNC_THREAD)),
                    ];
                    let p =
                        rt.block_on(run_point(addr, w.clone(), conns, opts.warmup, secs, probes));
                    let at = |v: &[Option<f64>], i: usize| v.get(i).copied().flatten();
                    eprintln!(
                        "load: round {} journal slapd {:<6} conns={:<3} {:>8}: {:>8.0} ops/s  p50 {:>6} µs  p99 {:>6} µs  CPU µs/op proxy {:>5} slapd {:>5}  sync-thread switches/op {}{}",
                        round + 1,
                        bed.sync.name(),
                        conns,
                        mode.name(),
                        p.ops_per_sec,
                        fmt_opt(pct_us(&p.lat, 50.0), 0),
                        fmt_opt(pct_us(&p.lat, 99.0), 0),
                        fmt_opt(at(&p.cpu_us_per_op, 0), 1),
                        fmt_opt(at(&p.cpu_us_per_op, 1), 1),
                        fmt_opt(at(&p.switches_per_op, 3), 2),
                        if p.errors.is_empty() {
                            String::new()
                        } else {
                            format!("  ({} errors: {})", p.errors.len(), p.errors[0])
                        }
                    );
                    points.push((mode, p));
                }
                res.add_round((bed.sync, conns), points);
            }
        }
    }
    for bed in beds {
        bed.stop();
    }
    res.rounds.finish();
    Ok(())
}

/// What the table's columns are, printed under it.
pub fn explanations() -> String {
    format!(
        "off/interval/request/ack: abproxy with the journal off, `durability = \"interval\"` \
         (synced every {INTERVAL_MS} ms), `\"request\"` (a write's request synced before the \
         client sees its result, the sync running alongside slapd's work; its outcome within \
         {INTERVAL_MS} ms) and `\"ack\"` (a write's outcome synced before the client sees it), each journal in a fresh directory on slapd's filesystem. slapd \
         `fsync`: slapd syncs its own database at every write (`olcDbNoSync` off); `nosync`: it \
         does not. Ratios are medians of per-round ratios to the target at the same point in the \
         same round. sync-thread switches/op: context switches of the journal's sync thread per \
         write, a relative measure of the syncs per write (several switches per sync; group \
         commit: far fewer per write).\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(ops: f64, lat_us: &[u64], proxy_cpu: Option<f64>, sync_sw: Option<f64>) -> Point {
        Point {
            ops_per_sec: ops,
            lat: lat_us.iter().map(|us| us * 1000).collect(),
            errors: Vec::new(),
            cpu_us_per_op: vec![proxy_cpu, Some(20.0), Some(30.0), Some(1.0)],
            switches_per_op: vec![None, None, None, sync_sw],
            run_delay_us_per_op: Vec::new(),
            migrations_per_op: Vec::new(),
            segments_per_op: None,
        }
    }

    /// abproxy accepts the `[journal]` tables the section writes.
    #[test]
    fn abproxy_accepts_the_journal_tables() {
        let opts = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        let addr: SocketAddr = "127.0.0.1:3890".parse().unwrap();
        let dir = Path::new("/tmp/abp-journal-x/journal");
        assert!(Mode::Off.journal_table(dir).is_none());
        assert!(Mode::Direct.journal_table(dir).is_none());
        for (mode, want) in [
            (Mode::Interval, abproxy::journal::DurabilityName::Interval),
            (Mode::Request, abproxy::journal::DurabilityName::Request),
            (Mode::Ack, abproxy::journal::DurabilityName::Ack),
        ] {
            let mut cfg =
                crate::procs::abproxy_config((addr, None), "ldap://127.0.0.1:389", &opts, None);
            cfg.insert(
                "journal".into(),
                toml::Value::Table(mode.journal_table(dir).unwrap()),
            );
            let text = toml::to_string(&cfg).unwrap();
            let c = abproxy::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(c.journal.dir.as_deref(), Some(dir));
            assert_eq!(c.journal.durability, want);
            if matches!(mode, Mode::Interval | Mode::Request) {
                assert_eq!(c.journal.sync_interval_ms, INTERVAL_MS);
            }
        }
    }

    /// Ratios are medians of per-round ratios to off (and direct) in the
    /// same round; a point without operations gives no ratio.
    #[test]
    fn ratios_and_table() {
        let mut r = JournalResults::default();
        let k = (SlapdSync::Fsync, 8);
        let rounds = [
            [
                (Mode::Ack, point(90.0, &[200, 400], Some(12.0), Some(0.5))),
                (Mode::Direct, point(200.0, &[100, 200], None, None)),
                (Mode::Off, point(100.0, &[150, 300], Some(10.0), None)),
                (
                    Mode::Interval,
                    point(95.0, &[160, 320], Some(11.0), Some(0.01)),
                ),
            ],
            [
                (Mode::Direct, point(400.0, &[100, 200], None, None)),
                (Mode::Off, point(200.0, &[150, 300], Some(10.0), None)),
                (Mode::Ack, point(200.0, &[200, 400], Some(14.0), Some(0.3))),
                (Mode::Interval, point(0.0, &[], Some(11.0), Some(0.01))),
            ],
        ];
        for round in rounds {
            r.add_round(k, round.into_iter().collect());
        }
        r.rounds.finish();
        let close = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-12;
        assert!(close(r.ratio_to_off((k.0, k.1, Mode::Ack)), 0.95));
        assert!(close(r.ratio_to_direct((k.0, k.1, Mode::Ack)), 0.475));
        assert!(close(r.ratio_to_direct((k.0, k.1, Mode::Off)), 0.5));
        // Interval completed nothing in round 2: one ratio only.
        assert_eq!(
            r.rounds.ratios(Mode::Off, (k.0, k.1, Mode::Interval)).len(),
            1
        );
        assert_eq!(r.rounds.ops((k.0, k.1, Mode::Direct)), Some(300.0));
        let t = r.table(&[1, 8]);
        let lines: Vec<&str> = t.lines().collect();
        // The header, its rule and one row: nothing was measured at 1.
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(
            lines[2],
            "| fsync | 8 | 300 | 150 | 95 | - | 145 | 0.500 | 0.950 | - | 0.950 | 0.475 | 150 / 300 | 160 / 320 | - / - | 200 / 400 | 10.0 / 11.0 / - / 13.0 | 0.01 / - / 0.40 |"
        );
        assert!(r.errors().is_empty());
    }
}
