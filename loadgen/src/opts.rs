//! The options: `--name value` (or `--name=value`) arguments over `LOAD_*`
//! environment variables over defaults, as listed in the crate's
//! documentation. Unknown arguments (`--bench`, filters passed by `cargo
//! bench`) are ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::workload::Kind;

#[derive(Debug, Clone)]
pub struct Opts {
    pub secs: f64,
    pub warmup: Duration,
    pub conns: Vec<usize>,
    pub workloads: Vec<Kind>,
    /// The freeze section (`freeze` in the workload list).
    pub freeze: bool,
    /// The TLS section (`tls` in the workload list).
    pub tls: bool,
    /// The reads-during-a-freeze section (`freeze-reads`).
    pub freeze_reads: bool,
    /// The journal section (`journal`): modify throughput with the
    /// journal off, `interval` and `ack`.
    pub journal: bool,
    /// The threads section (`threads`): abproxy's `threads` setting,
    /// default, 1, N and 2N, at `conns` and `threads_many` connections.
    pub threads_section: bool,
    /// The threads section's connection count above the run's: many more
    /// clients than cores.
    pub threads_many: usize,
    /// Its readers, writers, and modifies per second per writer.
    pub read_conns: usize,
    pub read_writers: usize,
    pub write_rate: f64,
    /// Measured ON/OFF cycles per scenario (idle, loaded).
    pub freeze_cycles: usize,
    /// Closed-loop search+modify clients during the loaded cycles.
    pub freeze_conns: usize,
    /// Backlog: clients, modifies pipelined by each, repetitions.
    pub backlog_conns: usize,
    pub backlog_depth: usize,
    pub backlog_reps: usize,
    pub rounds: usize,
    pub proxy_threads: usize,
    pub client_threads: usize,
    pub users: usize,
    /// `None`: no haproxy column.
    pub haproxy: Option<Reference>,
    /// Why there is no haproxy column.
    pub haproxy_note: Option<String>,
    /// The abproxy binary to start (`--abproxy`, `LOAD_ABPROXY`); `None`:
    /// the caller's default (see [`crate::procs::abproxy_binary`]).
    pub abproxy: Option<PathBuf>,
}

/// Every `--name` taking a value, and its environment variable.
pub const OPTIONS: [(&str, &str); 19] = [
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
    ("threads-many", "LOAD_THREADS_MANY"),
    ("abproxy", "LOAD_ABPROXY"),
];

pub fn parse_list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(f)
        .collect()
}

pub fn parse_conns(s: &str) -> Result<Vec<usize>> {
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
pub enum Section {
    Freeze,
    Tls,
    FreezeReads,
    Journal,
    Threads,
}

/// The throughput workloads, and the sections in the list.
pub fn parse_workloads(s: &str) -> Result<(Vec<Kind>, Vec<Section>)> {
    let v = parse_list(s, |p| {
        match p {
        "search" => Ok(Ok(Kind::Search)),
        "bind" => Ok(Ok(Kind::Bind)),
        "modify" => Ok(Ok(Kind::Modify)),
        "freeze" => Ok(Err(Section::Freeze)),
        "tls" => Ok(Err(Section::Tls)),
        "freeze-reads" => Ok(Err(Section::FreezeReads)),
        "journal" => Ok(Err(Section::Journal)),
        "threads" => Ok(Err(Section::Threads)),
        _ => bail!(
            "unknown workload {p:?} (search, bind, modify, freeze, tls, freeze-reads, journal, threads)"
        ),
    }
    })?;
    if v.is_empty() {
        bail!("no workload");
    }
    let sections = v.iter().filter_map(|x| x.err()).collect();
    Ok((v.into_iter().flatten().collect(), sections))
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// What runs in the reference column.
#[derive(Debug, Clone)]
pub enum Reference {
    /// HAProxy in TCP mode (this binary).
    Haproxy(PathBuf),
    /// `--haproxy self`: a second abproxy process, started exactly as the
    /// first. An A/A control: the two columns differ only by chance and by
    /// any bias of the benchmark itself, so the head-to-head table shows how
    /// far apart two equal proxies measure on this machine.
    Itself,
    /// `--haproxy self-metrics`: a second abproxy started as the first, with
    /// its metrics endpoint on (`[metrics] listen`, not scraped): the cost
    /// of counting, measured in the same run.
    ItselfWithMetrics,
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Opts {
    /// Environment first, then arguments (which win). Unknown arguments
    /// (`--bench`, filters passed by `cargo bench`) are ignored.
    pub fn parse(args: &[String]) -> Result<Opts> {
        Opts::parse_with(args, |k| std::env::var(k).ok())
    }

    /// [`Opts::parse`] with the environment variables read by `env`.
    pub fn parse_with(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Opts> {
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let mut kv: BTreeMap<&str, String> = BTreeMap::new();
        for (key, var) in OPTIONS {
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
            if let Some(&(key, _)) = OPTIONS.iter().find(|(k, _)| *k == name) {
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
        let journal = sections.contains(&Section::Journal);
        let threads_section = sections.contains(&Section::Threads);
        let threads_many = (num("threads-many", 128.0)? as usize).clamp(1, 1024);
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
            Some("self-metrics") => (Some(Reference::ItselfWithMetrics), None),
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
            journal,
            threads_section,
            threads_many,
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
            abproxy: kv.get("abproxy").map(PathBuf::from),
        })
    }
}

/// `loadgen --help`.
pub const USAGE: &str = "\
usage: loadgen [--quick] [--NAME VALUE | --NAME=VALUE]...
Arguments override the environment variables; unknown arguments are ignored.
  --secs S              LOAD_SECS            3 (quick: 0.5)
  --warmup-ms MS        LOAD_WARMUP_MS       500 (quick: 100)
  --conns 1,8,32        LOAD_CONNS           1,8,32
  --workloads LIST      LOAD_WORKLOADS       search,bind,modify,freeze (also tls,
                                             freeze-reads, journal, threads)
  --rounds N            LOAD_ROUNDS          1
  --quick               LOAD_QUICK=1         off
  --proxy-threads N     LOAD_PROXY_THREADS   1
  --client-threads N    LOAD_CLIENT_THREADS  2
  --users N             LOAD_USERS           1000
  --haproxy PATH|0|self LOAD_HAPROXY         haproxy on PATH (self: a second abproxy;
                                             self-metrics: one with [metrics] on)
  --freeze-cycles N     LOAD_FREEZE_CYCLES   20 (quick: 5)
  --freeze-conns K      LOAD_FREEZE_CONNS    8
  --backlog-conns C     LOAD_BACKLOG_CONNS   32
  --backlog-depth M     LOAD_BACKLOG_DEPTH   200
  --backlog-reps R      LOAD_BACKLOG_REPS    3 (quick: 1)
  --read-conns N        LOAD_READ_CONNS      8
  --read-writers W      LOAD_READ_WRITERS    2
  --write-rate R        LOAD_WRITE_RATE      100 (per writer, /s)
  --threads-many N      LOAD_THREADS_MANY    128 (the threads section's last conns)
  --abproxy PATH        LOAD_ABPROXY         the product build (target/product)";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    /// No environment; no HAProxy (`--haproxy 0`, so PATH does not matter).
    fn parse(a: &[&str]) -> Result<Opts> {
        let mut a = args(a);
        a.extend(args(&["--haproxy", "0"]));
        Opts::parse_with(&a, |_| None)
    }

    #[test]
    fn defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.secs, 3.0);
        assert_eq!(o.warmup, Duration::from_millis(500));
        assert_eq!(o.conns, [1, 8, 32]);
        assert_eq!(o.workloads, [Kind::Search, Kind::Bind, Kind::Modify]);
        assert!(o.freeze && !o.tls && !o.freeze_reads && !o.journal && !o.threads_section);
        assert_eq!(o.threads_many, 128);
        assert_eq!((o.rounds, o.proxy_threads, o.client_threads), (1, 1, 2));
        assert_eq!(o.users, 1000);
        assert_eq!((o.freeze_cycles, o.freeze_conns), (20, 8));
        assert_eq!(
            (o.backlog_conns, o.backlog_depth, o.backlog_reps),
            (32, 200, 3)
        );
        assert_eq!((o.read_conns, o.read_writers, o.write_rate), (8, 2, 100.0));
        assert!(o.haproxy.is_none());
        assert_eq!(o.haproxy_note.as_deref(), Some("disabled (LOAD_HAPROXY=0)"));
        assert_eq!(o.abproxy, None);
    }

    #[test]
    fn quick_changes_the_quick_defaults_only() {
        let o = parse(&["--quick"]).unwrap();
        assert_eq!(o.secs, 0.5);
        assert_eq!(o.warmup, Duration::from_millis(100));
        assert_eq!((o.freeze_cycles, o.backlog_reps), (5, 1));
        assert_eq!((o.freeze_conns, o.backlog_depth), (8, 200));
        // An explicit value wins over quick's default.
        let o = parse(&["--quick", "--secs", "2"]).unwrap();
        assert_eq!(o.secs, 2.0);
        let quick = |v: &str| {
            let v = v.to_string();
            Opts::parse_with(&args(&["--haproxy=0"]), move |k| {
                (k == "LOAD_QUICK").then(|| v.clone())
            })
            .unwrap()
            .secs
        };
        assert_eq!(quick("1"), 0.5);
        assert_eq!(quick("0"), 3.0);
        assert_eq!(quick(""), 3.0);
    }

    #[test]
    fn every_option_by_argument() {
        let o = parse(&[
            "--secs",
            "1.5",
            "--warmup-ms",
            "250",
            "--conns",
            "2, 4",
            "--workloads",
            "modify,tls,freeze-reads,journal,threads",
            "--rounds",
            "6",
            "--proxy-threads",
            "2",
            "--client-threads",
            "3",
            "--users",
            "50",
            "--freeze-cycles",
            "7",
            "--freeze-conns",
            "4",
            "--backlog-conns",
            "5",
            "--backlog-depth",
            "9",
            "--backlog-reps",
            "2",
            "--read-conns",
            "3",
            "--read-writers",
            "1",
            "--write-rate",
            "20",
            "--threads-many",
            "64",
            "--abproxy",
            "/opt/abproxy",
        ])
        .unwrap();
        assert_eq!(o.secs, 1.5);
        assert_eq!(o.warmup, Duration::from_millis(250));
        assert_eq!(o.conns, [2, 4]);
        assert_eq!(o.workloads, [Kind::Modify]);
        assert!(!o.freeze && o.tls && o.freeze_reads && o.journal && o.threads_section);
        assert_eq!(o.threads_many, 64);
        assert_eq!(
            (o.rounds, o.proxy_threads, o.client_threads, o.users),
            (6, 2, 3, 50)
        );
        assert_eq!((o.freeze_cycles, o.freeze_conns), (7, 4));
        assert_eq!(
            (o.backlog_conns, o.backlog_depth, o.backlog_reps),
            (5, 9, 2)
        );
        assert_eq!((o.read_conns, o.read_writers, o.write_rate), (3, 1, 20.0));
        assert_eq!(o.abproxy, Some(PathBuf::from("/opt/abproxy")));
    }

    /// Each variable is read, an argument overrides it, `--name=value`
    /// works, and unknown arguments (`--bench`, a filter) are ignored.
    #[test]
    fn environment_then_arguments() {
        let env = |k: &str| match k {
            "LOAD_SECS" => Some("4".to_string()),
            "LOAD_CONNS" => Some("16".to_string()),
            "LOAD_WORKLOADS" => Some("bind".to_string()),
            "LOAD_ROUNDS" => Some("5".to_string()),
            "LOAD_HAPROXY" => Some("0".to_string()),
            "LOAD_ABPROXY" => Some("/env/abproxy".to_string()),
            "LOAD_THREADS_MANY" => Some("256".to_string()),
            _ => None,
        };
        let o = Opts::parse_with(&args(&["--bench", "load", "--conns=1"]), env).unwrap();
        assert_eq!(o.secs, 4.0);
        assert_eq!(o.conns, [1]);
        assert_eq!(o.workloads, [Kind::Bind]);
        assert!(!o.freeze);
        assert_eq!(o.rounds, 5);
        assert!(o.haproxy.is_none());
        assert_eq!(o.abproxy, Some(PathBuf::from("/env/abproxy")));
        assert_eq!(o.threads_many, 256);
        let o = Opts::parse_with(&args(&["--threads-many=16"]), env).unwrap();
        assert_eq!(o.threads_many, 16);
        // Every variable the documentation names is one of the options.
        for (name, var) in OPTIONS {
            assert_eq!(
                var,
                format!("LOAD_{}", name.to_uppercase().replace('-', "_"))
            );
            assert!(USAGE.contains(&format!("--{name} ")), "{name} in USAGE");
            assert!(USAGE.contains(var), "{var} in USAGE");
        }
    }

    #[test]
    fn the_reference_column() {
        let o = Opts::parse_with(&args(&["--haproxy", "self"]), |_| None).unwrap();
        assert!(matches!(o.haproxy, Some(Reference::Itself)));
        let o = Opts::parse_with(&args(&["--haproxy", "self-metrics"]), |_| None).unwrap();
        assert!(matches!(o.haproxy, Some(Reference::ItselfWithMetrics)));
        assert_eq!(o.haproxy_note, None);
        for off in ["0", "off", "no"] {
            let o = Opts::parse_with(&args(&["--haproxy", off]), |_| None).unwrap();
            assert!(o.haproxy.is_none(), "{off}");
        }
        let o = Opts::parse_with(&args(&["--haproxy", "/nonexistent/haproxy"]), |_| None).unwrap();
        assert!(o.haproxy.is_none());
        assert_eq!(
            o.haproxy_note.as_deref(),
            Some("the given haproxy is not executable")
        );
        // A path that is an executable file.
        let sh = Path::new("/bin/sh");
        if is_executable(sh) {
            let o = Opts::parse_with(&args(&["--haproxy", "/bin/sh"]), |_| None).unwrap();
            assert!(matches!(o.haproxy, Some(Reference::Haproxy(p)) if p == sh));
        }
    }

    #[test]
    fn bad_values() {
        let err = |a: &[&str]| parse(a).unwrap_err().to_string();
        assert!(err(&["--conns", "0"]).contains("out of 1..=1024"));
        assert!(err(&["--conns", "1,x"]).contains("bad connection count"));
        assert!(err(&["--conns", ","]).contains("no connection count"));
        assert!(err(&["--workloads", "search,delete"]).contains("unknown workload \"delete\""));
        assert!(err(&["--workloads", ""]).contains("no workload"));
        assert!(err(&["--secs", "-1"]).contains("bad value for secs"));
        assert!(err(&["--secs", "0.01"]).contains("secs must be in"));
        assert!(err(&["--rounds", "NaN"]).contains("bad value for rounds"));
        let e = Opts::parse_with(&args(&["--rounds"]), |_| None).unwrap_err();
        assert_eq!(e.to_string(), "--rounds needs a value");
        // Out-of-range counts are clamped, not refused.
        let o = parse(&["--rounds", "1000", "--users", "0", "--write-rate", "0"]).unwrap();
        assert_eq!((o.rounds, o.users, o.write_rate), (100, 1, 0.1));
        let o = parse(&["--threads-many", "0"]).unwrap();
        assert_eq!(o.threads_many, 1);
        let o = parse(&["--threads-many", "5000"]).unwrap();
        assert_eq!(o.threads_many, 1024);
        assert!(err(&["--threads-many", "x"]).contains("bad value for threads-many"));
    }

    /// A section alone: no throughput workload.
    #[test]
    fn sections_alone() {
        let o = parse(&["--workloads", "freeze"]).unwrap();
        assert!(o.workloads.is_empty() && o.freeze);
        let o = parse(&["--workloads", "tls,search,tls"]).unwrap();
        assert_eq!(o.workloads, [Kind::Search]);
        assert!(o.tls);
        let o = parse(&["--workloads", "threads"]).unwrap();
        assert!(o.workloads.is_empty() && o.threads_section);
        assert!(!o.freeze && !o.journal && !o.tls && !o.freeze_reads);
    }
}
