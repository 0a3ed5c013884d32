//! What the processes measured cost: CPU time, context switches, run-queue
//! wait and migrations of a process's (or this process's named) threads,
//! and the TCP segments sent, all read from `/proc`.

use std::time::Duration;

/// `OutSegs` of `/proc/net/snmp`: TCP segments sent so far in this network
/// namespace.
pub fn tcp_out_segments() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Where CPU time and scheduler counts are read (the proxy's, slapd's, the
/// load generator's): the threads' counters in `/proc`. CPU per operation is
/// steadier than throughput on a noisy shared machine and says directly what
/// a proxy costs.
#[derive(Clone, Copy)]
pub enum CpuProbe {
    /// This process's threads with this name (the load generator's).
    Threads(&'static str),
    /// Every thread of another process (abproxy, haproxy, slapd).
    Process(u32),
    /// The threads of another process with this name (abproxy's journal
    /// sync thread, `abproxy-journal`).
    ProcessThreads(u32, &'static str),
}

/// What the scheduler has counted for a probe's threads so far.
#[derive(Clone, Copy, Default)]
pub struct SchedSample {
    /// CPU time (user + system).
    pub cpu: Duration,
    /// Context switches, voluntary and involuntary.
    pub switches: u64,
    /// Time runnable but waiting for a CPU (`schedstat` run_delay): on two
    /// cores shared by the load generator, the proxy and slapd, time an
    /// operation's next step waits for its turn. `None` without
    /// `schedstat` (a kernel without CONFIG_SCHED_INFO).
    pub run_delay: Option<Duration>,
    /// Moves from one CPU to another (`se.nr_migrations`). `None` without
    /// `/proc/*/sched` (a kernel without CONFIG_SCHED_DEBUG).
    pub migrations: Option<u64>,
}

impl CpuProbe {
    /// The scheduler's counters for the probe's threads. CPU time comes from
    /// `schedstat` (nanoseconds) where it exists, else from `stat` (clock
    /// ticks, usually 10 ms).
    pub fn read(self) -> Option<SchedSample> {
        let (dir, name) = match self {
            CpuProbe::Threads(n) => ("/proc/self/task".to_string(), Some(n)),
            CpuProbe::Process(pid) => (format!("/proc/{pid}/task"), None),
            CpuProbe::ProcessThreads(pid, n) => (format!("/proc/{pid}/task"), Some(n)),
        };
        let tick = 1.0 / clock_ticks_per_sec();
        let mut s = SchedSample::default();
        for t in std::fs::read_dir(dir).ok()?.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            // "tid (comm) state ...": fields after the comm, which may hold
            // spaces, start at the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if name.is_some_and(|n| head.split_once('(').map(|(_, c)| c) != Some(n)) {
                continue;
            }
            let schedstat = std::fs::read_to_string(t.path().join("schedstat")).ok();
            let ns: Vec<u64> = schedstat
                .iter()
                .flat_map(|l| l.split_whitespace())
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [exec, delay, ..] = ns[..] {
                s.cpu += Duration::from_nanos(exec);
                s.run_delay = Some(s.run_delay.unwrap_or_default() + Duration::from_nanos(delay));
            } else {
                // utime and stime are fields 14 and 15 of stat: 12th and
                // 13th after the comm.
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                s.cpu += Duration::from_secs_f64((ticks(11) + ticks(12)) * tick);
            }
            let field = |text: &str, key: &str| -> u64 {
                text.lines()
                    .filter(|l| l.split(':').next().map(str::trim) == Some(key))
                    .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                    .sum()
            };
            if let Ok(status) = std::fs::read_to_string(t.path().join("status")) {
                s.switches += field(&status, "voluntary_ctxt_switches")
                    + field(&status, "nonvoluntary_ctxt_switches");
            }
            if let Ok(sched) = std::fs::read_to_string(t.path().join("sched")) {
                s.migrations = Some(s.migrations.unwrap_or(0) + field(&sched, "se.nr_migrations"));
            }
        }
        Some(s)
    }
}

/// Clock ticks per second of `/proc/*/stat` times.
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
