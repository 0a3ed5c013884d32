//! Collectors read at each scrape: the process, the freeze engine's
//! [`Snapshot`](crate::freeze::stats::Snapshot), the journal's counters.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::encode::{counter, counters, gauge, gauges, histogram, histograms};
use crate::freeze::stats::{Outcome, STEPS};
use crate::freeze::Engine;
use crate::journal::Journal;

type R = Result<(), std::fmt::Error>;

/// Build information, start time, and the standard `process_*` metrics
/// (from `/proc/self`).
#[derive(Debug)]
pub struct Process {
    start: f64,
}

impl Process {
    pub(super) fn new() -> Process {
        Process {
            start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

/// The commit abproxy was built from, when the build said
/// (`ABPROXY_COMMIT` in the build's environment).
pub const COMMIT: &str = match option_env!("ABPROXY_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

impl Collector for Process {
    fn encode(&self, mut e: DescriptorEncoder) -> R {
        e.encode_descriptor(
            "abproxy_build",
            "abproxy's version and the commit it was built from.",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)])?;
        gauge(
            &mut e,
            "abproxy_start_time_seconds",
            "When abproxy started, in seconds since the Unix epoch.",
            self.start,
        )?;
        gauge(
            &mut e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start,
        )?;
        if let Some(p) = proc_stat() {
            counter_f64(
                &mut e,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                p.cpu_seconds,
            )?;
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.rss_bytes,
            )?;
            gauge(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.vsize_bytes,
            )?;
            gauge(
                &mut e,
                "process_threads",
                "Number of OS threads in the process.",
                p.threads,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut e,
                "process_open_fds",
                "Number of open file descriptors.",
                fds.count() as f64,
            )?;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            gauge(
                &mut e,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                lim.rlim_cur as f64,
            )?;
        }
        Ok(())
    }
}

fn counter_f64(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> R {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

struct ProcStat {
    cpu_seconds: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    threads: f64,
}

/// `/proc/self/stat`'s CPU times, memory and threads.
fn proc_stat() -> Option<ProcStat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name (in parentheses, which may hold spaces):
    // fields 3 onwards.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3)?.parse::<f64>().ok();
    // SAFETY: sysconf only reads configuration.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    Some(ProcStat {
        cpu_seconds: (num(14)? + num(15)?) / ticks as f64,
        threads: num(20)?,
        vsize_bytes: num(23)?,
        rss_bytes: num(24)? * page as f64,
    })
}

/// The freeze engine's state and counters, and the carried sessions.
#[derive(Debug)]
pub struct Freeze(pub Arc<Engine>);

/// Freeze states, in label order.
const STATES: [&str; 4] = ["thawed", "draining", "frozen", "releasing"];

impl Collector for Freeze {
    fn encode(&self, mut e: DescriptorEncoder) -> R {
        let s = self.0.snapshot();
        gauges(
            &mut e,
            "abproxy_freeze_state",
            "The freeze's state: 1 for the current one.",
            "state",
            STATES.map(|st| (st, f64::from(u8::from(st == s.state)))),
        )?;
        gauge(
            &mut e,
            "abproxy_freeze_age_seconds",
            "Time since the current freeze's ON; 0 when thawed.",
            s.age.as_secs_f64(),
        )?;
        counters(
            &mut e,
            "abproxy_freezes",
            "Allow-Backup ON requests by how they ended: refused, drain_timeout, \
             driver_failure, failed (ON failed); success (released by OFF), expired \
             (the lease ran out), holder_gone, shutdown.",
            "outcome",
            Outcome::ALL.map(|o| (o.label(), s.outcomes[o as usize])),
        )?;
        histogram(
            &mut e,
            "abproxy_freeze_drain_duration_seconds",
            "Time ON waited for in-flight requests (successful drains).",
            &s.drain,
        )?;
        histogram(
            &mut e,
            "abproxy_freeze_frozen_duration_seconds",
            "Time from ON to the release of each freeze that took effect.",
            &s.frozen,
        )?;
        gauge(
            &mut e,
            "abproxy_freeze_held_requests",
            "Requests held in the per-connection queues now.",
            s.held_requests as f64,
        )?;
        gauge(
            &mut e,
            "abproxy_freeze_held_bytes",
            "Bytes of the requests held now.",
            s.held_bytes as f64,
        )?;
        gauge(
            &mut e,
            "abproxy_freeze_oldest_held_seconds",
            "Age of the oldest held request (time since the queues last were empty); 0 \
             when none is held.",
            s.oldest_held.as_secs_f64(),
        )?;
        counter(
            &mut e,
            "abproxy_freeze_holds",
            "Requests that were held (by a freeze, or behind a bind).",
            s.held_total,
        )?;
        counter(
            &mut e,
            "abproxy_freeze_released_requests",
            "Held requests sent to the server once released.",
            s.released_total,
        )?;
        counter(
            &mut e,
            "abproxy_freeze_lease_expiries",
            "Freezes ended by their lease.",
            s.lease_expiries,
        )?;
        histograms(
            &mut e,
            "abproxy_freeze_driver_step_duration_seconds",
            "Time each backend driver step took.",
            "step",
            STEPS.iter().copied().zip(s.steps.iter()),
        )?;
        counters(
            &mut e,
            "abproxy_freeze_driver_step_failures",
            "Backend driver steps that failed (or missed their deadline).",
            "step",
            STEPS.iter().copied().zip(s.step_failures),
        )?;
        gauge(
            &mut e,
            "abproxy_operations_in_flight",
            "Requests sent to the server and not answered yet (persistent searches \
             included).",
            s.in_flight as f64,
        )?;
        let (waiting, carried, not_carried) = s.carry;
        gauge(
            &mut e,
            "abproxy_sessions_waiting_for_server",
            "Sessions whose server closed their connection, waiting to be carried to its \
             next run.",
            waiting as f64,
        )?;
        counters(
            &mut e,
            "abproxy_sessions_carried",
            "Sessions whose server closed their connection, by whether they were carried \
             to a new one.",
            "result",
            [
                ("carried", carried as u64),
                ("not_carried", not_carried as u64),
            ],
        )
    }
}

/// The roll-forward journal's counters.
#[derive(Debug)]
pub struct JournalCollector(pub Arc<Journal>);

impl Collector for JournalCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> R {
        let s = self.0.stats();
        counter(
            &mut e,
            "abproxy_journal_appends",
            "Records appended to the journal.",
            s.appends,
        )?;
        counter(
            &mut e,
            "abproxy_journal_append_bytes",
            "Bytes appended to the journal.",
            s.append_bytes,
        )?;
        counter(
            &mut e,
            "abproxy_journal_append_failures",
            "Appends that failed (the write was refused or answered unavailable).",
            s.append_failures,
        )?;
        histogram(
            &mut e,
            "abproxy_journal_append_duration_seconds",
            "Time each append took.",
            &s.append_latency,
        )?;
        counter(
            &mut e,
            "abproxy_journal_syncs",
            "fdatasync calls of the journal's sync thread (group commits).",
            s.syncs,
        )?;
        counter(
            &mut e,
            "abproxy_journal_sync_failures",
            "Failed syncs (the journal then records nothing more until restarted).",
            s.sync_failures,
        )?;
        histogram(
            &mut e,
            "abproxy_journal_sync_duration_seconds",
            "Time each sync took.",
            &s.sync_latency,
        )?;
        gauge(
            &mut e,
            "abproxy_journal_failed",
            "1 when the journal has failed and records nothing more.",
            f64::from(u8::from(s.failed)),
        )
    }
}
