//! `cargo bench --bench backup`: what `abproxy backup`, `abproxy restore`
//! (and `abproxy verify`, when the binary has it) cost on a directory of
//! 100,000 entries, next to slapd's own `slapcat` and a plain paged
//! `ldapsearch` of the same data.
//!
//! ```text
//! cargo bench --bench backup                          # 100,000 users, 3 rounds
//! BACKUP_USERS=20000 BACKUP_ROUNDS=5 cargo bench --bench backup
//! ```
//!
//! One throwaway slapd (`testkit`, `BACKUP_USERS` users, no fsync) and, in
//! front of it, abproxy as its own process (the binary built with this
//! bench, `serve --config` with a file the bench writes: the backend
//! `dc=example,dc=org` in `readonly` mode, the root DN allowed to freeze).
//! Each round runs every step once, as its own process, one after the
//! other; the first step rotates from round to round (round-robin), so no
//! step always runs first or after the same one:
//!
//! * `backup`: `abproxy backup --to DIR` through the proxy, bound as the
//!   root DN (`ABPROXY_URL`, `ABPROXY_BIND_DN`, `ABPROXY_PASSWORD`): the
//!   freeze, the paged export of every entry (`*` and `+`) with its digest,
//!   the release and the files. From the backup's `manifest.json` and
//!   `backup.log`: the time frozen (`freeze.frozen_from` .. `frozen_to`),
//!   the drain (`freeze.drained_ms`) and the export's own duration (the
//!   `export SUFFIX` step). The bench fails when the time frozen exceeds
//!   the export plus the drain plus [`FREEZE_MARGIN`].
//! * `verify`: `abproxy verify DIR` on the latest backup, only if
//!   `abproxy verify --help` succeeds (otherwise one `skipped` line).
//! * `restore`: `abproxy restore DIR --to WORK --slapd-config
//!   SLAPD_DIR/slapd.d` on the latest backup: slapadd into a new back-mdb
//!   database, slapcat back, count, digest and contextCSN checked.
//! * `slapcat`: `slapcat -F SLAPD_DIR/slapd.d -b dc=example,dc=org -l
//!   FILE` (the database read offline, beside the running slapd).
//! * `ldapsearch`: `ldapsearch -x -H ldap://SLAPD -D ROOTDN -w PW -b
//!   dc=example,dc=org -E pr=500/noprompt '*' + > FILE` directly against
//!   slapd (no proxy, no freeze).
//!
//! Per step: the wall time of the process (spawn to exit), median and
//! minimum over the rounds, and the ratios of each against `slapcat` and
//! `ldapsearch` of the same run; the backup's size (bytes of its LDIF) and
//! entries per second; per backup round the freeze's figures.
//!
//! Settings (environment): `BACKUP_USERS` (100000), `BACKUP_ROUNDS` (3),
//! `BACKUP_STEP_LIMIT_SECS` (600: each external step is killed, with its
//! process group, past it, and the bench fails).
//!
//! Everything is written under one temporary directory, removed at the
//! end (each round's outputs as soon as they are no longer needed).

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use abproxy::backup::manifest::Manifest;
use anyhow::{anyhow, bail, Context, Result};
use loadgen::procs::{free_port, wait_listening};
use loadgen::stats::median;
use testkit::{Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW, SLAPCAT, SUFFIX};

/// How much longer than the export plus the drain the freeze may last.
/// Between `frozen_from` (taken when ON has answered, so after the drain)
/// and `frozen_to` (taken when OFF has answered) the backup does, besides
/// the export, three exchanges with the proxy on loopback: the status
/// request, the root DSE search and OFF (0-5 ms together on this machine
/// under its usual load, 68 ms once with other work keeping both cores
/// busy); and the four times involved are truncated to whole milliseconds
/// (up to 2 ms off). 250 ms covers those with room for the scheduling
/// delays of a shared two-core machine, and is small next to the export at
/// the default size (about 9 s): a freeze that goes on after the export
/// (files written, fsyncs) by more than that fails.
const FREEZE_MARGIN: Duration = Duration::from_millis(250);

/// The longest wait for `abproxy verify --help`.
const HELP_LIMIT: Duration = Duration::from_secs(30);

const LDAPSEARCH: &str = "/usr/bin/ldapsearch";

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

struct Settings {
    users: usize,
    rounds: usize,
    limit: Duration,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let s = Settings {
            users: env_u64("BACKUP_USERS", 100_000)? as usize,
            rounds: env_u64("BACKUP_ROUNDS", 3)? as usize,
            limit: Duration::from_secs(env_u64("BACKUP_STEP_LIMIT_SECS", 600)?),
        };
        if s.rounds == 0 || s.users == 0 || s.limit.is_zero() {
            bail!("BACKUP_USERS, BACKUP_ROUNDS and BACKUP_STEP_LIMIT_SECS must be at least 1");
        }
        Ok(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Backup,
    Verify,
    Restore,
    Slapcat,
    Ldapsearch,
}

impl Step {
    const ALL: [Step; 5] = [
        Step::Backup,
        Step::Verify,
        Step::Restore,
        Step::Slapcat,
        Step::Ldapsearch,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::Backup => "abproxy backup",
            Step::Verify => "abproxy verify",
            Step::Restore => "abproxy restore",
            Step::Slapcat => "slapcat",
            Step::Ldapsearch => "ldapsearch direct",
        }
    }
}

/// Runs `cmd` as its own process group, its standard output to `stdout`
/// and its standard error to `log`, and returns its wall time (spawn to
/// exit). Past `limit` the whole group is killed (SIGKILL) and this fails;
/// so does a non-zero exit, with the tail of `log`.
fn run_timed(
    what: &str,
    cmd: &mut Command,
    stdout: Stdio,
    log: &Path,
    limit: Duration,
) -> Result<Duration> {
    let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(err)
        .process_group(0);
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id() as libc::pid_t;
    // The wait blocks in a thread of its own: the exit is seen when it
    // happens, not at the next poll.
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut child: Child = child;
        let r = child.wait();
        let _ = tx.send((r, Instant::now()));
    });
    let (status, end) = match rx.recv_timeout(limit) {
        Ok((r, end)) => (r.with_context(|| format!("waiting for {what}"))?, end),
        Err(_) => {
            // SAFETY: kill(2) on the process group of a child this process
            // spawned (process_group(0): its pid is the group's id) and
            // has not reaped: the waiter thread reaps it after this.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = waiter.join();
            bail!(
                "{what}: still running after {limit:?}, killed\n{}",
                tail(log, 20)
            );
        }
    };
    let _ = waiter.join();
    if !status.success() {
        bail!("{what} exited with {status}:\n{}", tail(log, 20));
    }
    Ok(end - start)
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Entries in an LDIF file: lines starting `dn:` (`dn::` when base64).
fn count_entries(path: &Path) -> Result<u64> {
    let mut n = 0;
    for line in BufReader::new(File::open(path)?).split(b'\n') {
        if line?.starts_with(b"dn:") {
            n += 1;
        }
    }
    Ok(n)
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn parse_utc_ms(s: &str) -> Result<i64> {
    let bad = || anyhow!("not a UTC time with milliseconds: {s:?}");
    let b = s.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[10] != b'T' || b[19] != b'.' || b[23] != b'Z' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        s.get(r).and_then(|x| x.parse().ok()).ok_or_else(bad)
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms)
}

/// The "(N ms)" at the end of a `backup.log` line.
fn step_ms(line: &str) -> Option<u64> {
    let inner = line.strip_suffix(" ms)")?;
    let open = inner.rfind('(')?;
    inner[open + 1..].parse().ok()
}

/// The milliseconds of the `backup.log` steps whose name starts with
/// `prefix` (after the line's UTC time), summed; None if there is none.
fn log_ms(log: &str, prefix: &str) -> Option<u64> {
    let mut found = None;
    for line in log.lines() {
        let Some((_, rest)) = line.split_once(' ') else {
            continue;
        };
        if rest.starts_with(prefix) {
            *found.get_or_insert(0) += step_ms(line)?;
        }
    }
    found
}

/// One backup's figures, from its manifest and log.
struct Freeze {
    frozen_ms: i64,
    export_ms: u64,
    drained_ms: u64,
    /// status + root DSE + release (OFF), as the log gives them.
    others_ms: u64,
    entries: u64,
    ldif_bytes: u64,
}

fn read_backup(dir: &Path) -> Result<Freeze> {
    let text = fs::read_to_string(dir.join("manifest.json")).context("reading manifest.json")?;
    let m: Manifest = serde_json::from_str(&text).context("parsing manifest.json")?;
    let log = fs::read_to_string(dir.join("backup.log")).context("reading backup.log")?;
    let frozen_ms = parse_utc_ms(&m.freeze.frozen_to)? - parse_utc_ms(&m.freeze.frozen_from)?;
    let export_ms = log_ms(&log, "export ")
        .ok_or_else(|| anyhow!("no \"export ...\" step in backup.log:\n{log}"))?;
    let drained_ms = m
        .freeze
        .drained_ms
        .ok_or_else(|| anyhow!("no drained_ms in the manifest: {:?}", m.freeze.message))?;
    let others_ms = ["status:", "root DSE:", "release (OFF):"]
        .iter()
        .filter_map(|p| log_ms(&log, p))
        .sum();
    let mut entries = 0;
    let mut ldif_bytes = 0;
    for b in &m.backends {
        entries += b.entries;
        let path = dir.join(&b.file);
        ldif_bytes += fs::metadata(&path)
            .with_context(|| path.display().to_string())?
            .len();
    }
    Ok(Freeze {
        frozen_ms,
        export_ms,
        drained_ms,
        others_ms,
        entries,
        ldif_bytes,
    })
}

/// abproxy as its own process: `serve --config` in front of slapd, the
/// backend in `readonly` mode, the root DN allowed to freeze.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &Path, upstream: &str) -> Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("abproxy-backup-bench")
            .tempdir()?;
        let mut last = anyhow!("not started");
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let config = format!(
                "listen = [\"ldap://{addr}\"]\n\
                 upstream = \"{upstream}\"\n\
                 shutdown_grace_secs = 1\n\
                 [freeze]\n\
                 allowed = [\"{ADMIN_DN}\"]\n\
                 root_dns = [\"{ADMIN_DN}\"]\n\
                 max_drain_secs = 10\n\
                 lease_secs = 3600\n\
                 [[backends]]\n\
                 suffix = \"{SUFFIX}\"\n\
                 mode = \"readonly\"\n"
            );
            let file = dir.path().join("abproxy.toml");
            fs::write(&file, config)?;
            let log_path = dir.path().join("abproxy.log");
            let log = File::create(&log_path)?;
            let mut child = Command::new(bin)
                .arg("serve")
                .arg("--config")
                .arg(&file)
                .env("ABPROXY_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            match wait_listening(
                &mut child,
                &[addr],
                &log_path,
                "abproxy",
                Duration::from_secs(10),
            ) {
                Ok(()) => return Ok(Proxy { child, addr, dir }),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("abproxy.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits (10 s at most) for the graceful shutdown.
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on the pid of a child this process spawned and
        // has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait()? {
                Some(s) if s.success() => return Ok(()),
                Some(s) => bail!("abproxy exited with {s}:\n{}", self.log()),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                None => bail!("abproxy did not shut down within 10 s"),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the run shares: the programs, slapd, the proxy, the scratch
/// directory, and the latest backup.
struct Bench<'a> {
    s: &'a Settings,
    bin: &'a Path,
    slapd: &'a Slapd,
    proxy: &'a Proxy,
    scratch: &'a Path,
    has_verify: bool,
    latest: Option<PathBuf>,
    /// Backups no longer the latest, removed once nothing uses them.
    old: Vec<PathBuf>,
    times: Vec<(Step, Duration)>,
    freezes: Vec<Freeze>,
    /// Bytes and entries of slapcat's and ldapsearch's outputs (first round).
    slapcat_out: Option<(u64, u64)>,
    ldapsearch_out: Option<(u64, u64)>,
}

impl Bench<'_> {
    fn slapd_d(&self) -> PathBuf {
        self.slapd.dir().join("slapd.d")
    }

    /// The latest backup, made now if there is none yet.
    fn backup_dir(&mut self, round: usize) -> Result<PathBuf> {
        if self.latest.is_none() {
            self.step(Step::Backup, round)?;
        }
        Ok(self.latest.clone().expect("a backup"))
    }

    fn step(&mut self, step: Step, round: usize) -> Result<()> {
        let limit = self.s.limit;
        let log = self.scratch.join(format!("r{round}-{step:?}.log"));
        let took = match step {
            Step::Backup => {
                // Numbered by the backups made so far: never a directory that
                // exists (abproxy backup refuses one).
                let dir = self.scratch.join(format!("backup-{}", self.freezes.len()));
                let took = run_timed(
                    step.name(),
                    Command::new(self.bin)
                        .arg("backup")
                        .arg("--to")
                        .arg(&dir)
                        .env("ABPROXY_URL", format!("ldap://{}", self.proxy.addr))
                        .env("ABPROXY_BIND_DN", ADMIN_DN)
                        .env("ABPROXY_PASSWORD", ADMIN_PW)
                        .env("NO_COLOR", "1"),
                    Stdio::null(),
                    &log,
                    limit,
                )?;
                let f = read_backup(&dir).with_context(|| format!("backup {}", dir.display()))?;
                let allowed =
                    f.export_ms as i64 + f.drained_ms as i64 + FREEZE_MARGIN.as_millis() as i64;
                eprintln!(
                    "backup: round {round}: {:.2} s, frozen {} ms = export {} ms + drain {} ms \
                     + {} ms (status, root DSE and OFF: {} ms by the log), {} entries, {} bytes",
                    took.as_secs_f64(),
                    f.frozen_ms,
                    f.export_ms,
                    f.drained_ms,
                    f.frozen_ms - f.export_ms as i64 - f.drained_ms as i64,
                    f.others_ms,
                    f.entries,
                    f.ldif_bytes
                );
                if f.frozen_ms > allowed {
                    bail!(
                        "round {round}: frozen {} ms, more than the export ({} ms) + the drain \
                         ({} ms) + {} ms\n{}",
                        f.frozen_ms,
                        f.export_ms,
                        f.drained_ms,
                        FREEZE_MARGIN.as_millis(),
                        fs::read_to_string(dir.join("backup.log")).unwrap_or_default()
                    );
                }
                self.freezes.push(f);
                if let Some(prev) = self.latest.replace(dir) {
                    self.old.push(prev);
                }
                took
            }
            Step::Verify => {
                if !self.has_verify {
                    return Ok(());
                }
                let dir = self.backup_dir(round)?;
                run_timed(
                    step.name(),
                    Command::new(self.bin).arg("verify").arg(&dir),
                    Stdio::null(),
                    &log,
                    limit,
                )?
            }
            Step::Restore => {
                let dir = self.backup_dir(round)?;
                let work = self.scratch.join(format!("restore-r{round}"));
                let took = run_timed(
                    step.name(),
                    Command::new(self.bin)
                        .arg("restore")
                        .arg(&dir)
                        .arg("--to")
                        .arg(&work)
                        .arg("--slapd-config")
                        .arg(self.slapd_d()),
                    Stdio::null(),
                    &log,
                    limit,
                )?;
                fs::remove_dir_all(&work)
                    .with_context(|| format!("removing {}", work.display()))?;
                took
            }
            Step::Slapcat => {
                let out = self.scratch.join(format!("slapcat-r{round}.ldif"));
                let took = run_timed(
                    step.name(),
                    Command::new(SLAPCAT)
                        .arg("-F")
                        .arg(self.slapd_d())
                        .arg("-b")
                        .arg(SUFFIX)
                        .arg("-l")
                        .arg(&out),
                    Stdio::null(),
                    &log,
                    limit,
                )?;
                if self.slapcat_out.is_none() {
                    self.slapcat_out = Some((fs::metadata(&out)?.len(), count_entries(&out)?));
                }
                fs::remove_file(&out)?;
                took
            }
            Step::Ldapsearch => {
                let out = self.scratch.join(format!("ldapsearch-r{round}.ldif"));
                let file = File::create(&out)?;
                let took = run_timed(
                    step.name(),
                    Command::new(LDAPSEARCH)
                        .args(["-x", "-H"])
                        .arg(self.slapd.url())
                        .args(["-D", ADMIN_DN, "-w", ADMIN_PW, "-b", SUFFIX])
                        .args(["-E", "pr=500/noprompt", "*", "+"]),
                    Stdio::from(file),
                    &log,
                    limit,
                )?;
                if self.ldapsearch_out.is_none() {
                    self.ldapsearch_out = Some((fs::metadata(&out)?.len(), count_entries(&out)?));
                }
                fs::remove_file(&out)?;
                took
            }
        };
        let _ = fs::remove_file(&log);
        eprintln!(
            "backup: round {round}: {} {:.2} s",
            step.name(),
            took.as_secs_f64()
        );
        self.times.push((step, took));
        // Older backups are not needed once a newer one exists.
        for old in self.old.drain(..) {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    fn secs(&self, step: Step) -> Vec<f64> {
        self.times
            .iter()
            .filter(|(s, _)| *s == step)
            .map(|(_, d)| d.as_secs_f64())
            .collect()
    }

    fn print(&self) {
        let stat = |step: Step| -> Option<(f64, f64, usize)> {
            let mut v = self.secs(step);
            let n = v.len();
            let med = median(&mut v)?;
            Some((med, v[0], n))
        };
        let slapcat = stat(Step::Slapcat);
        let ldapsearch = stat(Step::Ldapsearch);
        let ratio = |a: f64, b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}", a / b));
        println!(
            "\n{} users, {} round(s), abproxy {}\n",
            self.s.users,
            self.s.rounds,
            self.bin.display()
        );
        println!(
            "| step | runs | median s | min s | median / slapcat | median / ldapsearch | min / slapcat | min / ldapsearch |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for step in Step::ALL {
            let Some((med, min, n)) = stat(step) else {
                println!("| {} | 0 | skipped | | | | | |", step.name());
                continue;
            };
            println!(
                "| {} | {n} | {med:.2} | {min:.2} | {} | {} | {} | {} |",
                step.name(),
                ratio(med, slapcat.map(|s| s.0)),
                ratio(med, ldapsearch.map(|s| s.0)),
                ratio(min, slapcat.map(|s| s.1)),
                ratio(min, ldapsearch.map(|s| s.1)),
            );
        }
        if let (Some(f), Some((med, min, _))) = (self.freezes.last(), stat(Step::Backup)) {
            println!(
                "\nbackup: {} entries, LDIF {} bytes ({:.1} MB); {:.0} entries/s at the median \
                 wall time, {:.0} at the best",
                f.entries,
                f.ldif_bytes,
                f.ldif_bytes as f64 / 1e6,
                f.entries as f64 / med,
                f.entries as f64 / min
            );
        }
        for (name, out) in [
            ("slapcat", self.slapcat_out),
            ("ldapsearch", self.ldapsearch_out),
        ] {
            if let Some((bytes, entries)) = out {
                println!(
                    "{name}: {entries} entries, {bytes} bytes ({:.1} MB)",
                    bytes as f64 / 1e6
                );
            }
        }
        if !self.freezes.is_empty() {
            let col = |g: fn(&Freeze) -> f64| -> (f64, f64) {
                let mut v: Vec<f64> = self.freezes.iter().map(g).collect();
                let max = v.iter().copied().fold(f64::MIN, f64::max);
                (median(&mut v).unwrap_or(0.0), max)
            };
            let frozen = col(|f| f.frozen_ms as f64);
            let export = col(|f| f.export_ms as f64);
            let drain = col(|f| f.drained_ms as f64);
            let rest = col(|f| (f.frozen_ms - f.export_ms as i64 - f.drained_ms as i64) as f64);
            let others = col(|f| f.others_ms as f64);
            println!(
                "\nfreeze, median (max) over {} backups: frozen {:.0} ms ({:.0}), export {:.0} ms \
                 ({:.0}), drain {:.0} ms ({:.0}); frozen - export - drain {:.0} ms ({:.0}), \
                 allowed {} ms; status + root DSE + OFF by the log {:.0} ms ({:.0})",
                self.freezes.len(),
                frozen.0,
                frozen.1,
                export.0,
                export.1,
                drain.0,
                drain.1,
                rest.0,
                rest.1,
                FREEZE_MARGIN.as_millis(),
                others.0,
                others.1
            );
            let mut share: Vec<f64> = self
                .freezes
                .iter()
                .zip(self.secs(Step::Backup))
                .map(|(f, s)| f.frozen_ms as f64 / 1000.0 / s)
                .collect();
            if let Some(m) = median(&mut share) {
                println!("frozen / backup wall time, median: {m:.2}");
            }
        }
    }
}

/// Whether the binary has `abproxy verify` (another change adds it).
fn has_verify(bin: &Path, scratch: &Path) -> Result<bool> {
    let log = scratch.join("verify-help.log");
    let r = run_timed(
        "abproxy verify --help",
        Command::new(bin).args(["verify", "--help"]),
        Stdio::null(),
        &log,
        HELP_LIMIT,
    );
    let _ = fs::remove_file(&log);
    Ok(r.is_ok())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // Not run by `cargo bench` (e.g. `cargo test --benches`).
        println!("backup: benchmark skipped (use `cargo bench --bench backup`)");
        return;
    }
    if let Err(e) = main_inner() {
        eprintln!("backup benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

fn main_inner() -> Result<()> {
    let s = Settings::from_env()?;
    let bin = Path::new(env!("CARGO_BIN_EXE_abproxy"));
    for tool in [LDAPSEARCH, SLAPCAT] {
        if !Path::new(tool).exists() {
            bail!("{tool} not found: apt-get install slapd ldap-utils");
        }
    }
    let t = Instant::now();
    let slapd = Slapd::start(SlapdOptions {
        users: s.users,
        nosync: true,
        ..Default::default()
    })
    .context("starting slapd")?;
    let setup = t.elapsed();
    eprintln!(
        "backup: slapd at {} ({} users) ready in {:.1} s",
        slapd.url(),
        s.users,
        setup.as_secs_f64()
    );
    let proxy = Proxy::start(bin, &slapd.url())?;
    let scratch = tempfile::Builder::new()
        .prefix("abproxy-backup-bench-")
        .tempdir()?;
    let verify = has_verify(bin, scratch.path())?;
    if !verify {
        println!(
            "abproxy verify: skipped (`{} verify --help` failed: the binary has no verify)",
            bin.display()
        );
    }
    let mut b = Bench {
        s: &s,
        bin,
        slapd: &slapd,
        proxy: &proxy,
        scratch: scratch.path(),
        has_verify: verify,
        latest: None,
        old: Vec::new(),
        times: Vec::new(),
        freezes: Vec::new(),
        slapcat_out: None,
        ldapsearch_out: None,
    };
    for round in 0..s.rounds {
        // Each round starts with the next step.
        let mut order = Step::ALL.to_vec();
        order.rotate_left(round % Step::ALL.len());
        for step in order {
            b.step(step, round)
                .with_context(|| format!("round {round}: {}", step.name()))?;
        }
    }
    b.print();
    println!(
        "\nslapd set-up (slapadd of {} users) {:.1} s; run time {:.1} s",
        s.users,
        setup.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let log = proxy.log();
    proxy.stop()?;
    if !log.trim().is_empty() {
        eprintln!("abproxy's log:\n{log}");
    }
    Ok(())
}
