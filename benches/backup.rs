//! `cargo bench --bench backup`: what `abproxy backup`, `abproxy restore`
//! (and `abproxy verify`, when the binary has it) cost on a directory of
//! 100,000 entries, next to the server's own tools and a plain paged
//! `ldapsearch` of the same data: on OpenLDAP's slapd (`slapcat`), then on
//! 389 Directory Server (`dsconf backup create`, and abproxy's `--method
//! 389`, which runs 389's own backup task while frozen).
//!
//! ```text
//! cargo bench --bench backup                          # 100,000 users, 3 rounds, both servers
//! BACKUP_USERS=20000 BACKUP_ROUNDS=5 cargo bench --bench backup
//! BACKUP_SERVERS=389 cargo bench --bench backup      # the 389 DS lab only
//! ```
//!
//! The 389 DS lab's set-up is slow at 100,000 users: 389's import of them
//! took over 5 minutes on a shared two-core machine (testkit gives each
//! `ns-slapd ldif2db` 180 s plus 6 ms an entry).
//!
//! Each lab is one throwaway server with `BACKUP_USERS` users in
//! `dc=example,dc=org` and, in front of it, abproxy as its own process (the
//! binary built with this bench, `serve --config` with a file the bench
//! writes: the backends in `readonly` mode, the root DN allowed to
//! freeze). Each round runs every step of the lab once, as its own
//! process, one after the other; the first step rotates from round to round
//! (round-robin), so no step always runs first or after the same one.
//!
//! ## slapd
//!
//! `testkit`'s slapd, no fsync; the proxy's backend `dc=example,dc=org`,
//! the root DN `cn=admin,dc=example,dc=org` allowed to freeze. Steps, one
//! backup, verify and restore per method (`ldif`, `slapcat`, `files`):
//!
//! * `backup-ldif`: `abproxy backup --to DIR --method ldif` through the
//!   proxy, bound as the root DN (`ABPROXY_URL`, `ABPROXY_BIND_DN`,
//!   `ABPROXY_PASSWORD`): the freeze, the paged export of every entry (`*`
//!   and `+`) with its digest, the release and the files. From the
//!   backup's `manifest.json` and `backup.log`: the time frozen
//!   (`freeze.frozen_from` .. `frozen_to`), the drain
//!   (`freeze.drained_ms`) and the copy's own duration (the `export
//!   SUFFIX` step). The bench fails when the time frozen exceeds the copy
//!   plus the drain plus [`FREEZE_MARGIN`].
//! * `backup-slapcat`: `abproxy backup --to DIR --method slapcat
//!   --slapd-config SLAPD_DIR/slapd.d`, bound as the root DN: the
//!   configuration read, the freeze, `slapcat` of the live database (the `export
//!   SUFFIX` step, the copy), the release. The same figures and the same
//!   check.
//! * `backup-files`: `abproxy backup --to DIR --method files
//!   --slapd-config SLAPD_DIR/slapd.d`, bound as the root DN: the
//!   configuration read, the freeze, `mdb_copy -c` of the live database (the
//!   `export SUFFIX` step, the copy), the release; then each copy built
//!   into a throwaway database and read back with slapcat to count and
//!   digest it (the `count SUFFIX` steps, after the release, reported
//!   apart). The same figures and the same check.
//! * `verify (METHOD)`: `abproxy verify DIR` on the latest backup of that
//!   method, only if `abproxy verify --help` succeeds (otherwise one
//!   `skipped` line).
//! * `restore (METHOD)`: `abproxy restore DIR --to WORK --slapd-config
//!   SLAPD_DIR/slapd.d` on the latest backup of that method: slapadd of the
//!   LDIF (a `files` backup: the copied database put in place) into a new
//!   back-mdb database, slapcat back, count, digest and contextCSN checked;
//!   WORK removed after it.
//! * `slapcat`: `slapcat -F SLAPD_DIR/slapd.d -b dc=example,dc=org -l
//!   FILE` (the database read offline, beside the running slapd).
//! * `ldapsearch`: `ldapsearch -x -H ldap://SLAPD -D ROOTDN -w PW -b
//!   dc=example,dc=org -E pr=500/noprompt '*' + > FILE` directly against
//!   slapd (no proxy, no freeze).
//!
//! A verify or restore whose method has no backup yet (the round's
//! rotation put it first) makes one first, counted as that method's
//! backup step.
//!
//! Ratios against `slapcat` and `ldapsearch`.
//!
//! ## 389 DS
//!
//! `testkit::ds389`'s instance (root only; skipped with one line when
//! [`testkit::ds389::available`] says it cannot run): `BACKUP_USERS` users
//! in `dc=example,dc=org` (backend `userroot`) and [`OTHER_USERS`] in
//! `dc=other,dc=org` (`otherroot`), on `ldap://127.0.0.1:PORT` and its
//! ldapi socket. The proxy's backends are both suffixes, `readonly`, with
//! the default driver (none: the proxy holds the writes, 389 is not told);
//! `cn=Directory Manager` (DM) allowed to freeze. Steps:
//!
//! * `backup-ldif`: `abproxy backup --to DIR --method ldif` through the
//!   proxy, bound as DM, as the slapd `backup-ldif` (the export of both
//!   suffixes); the same figures and the same check against the `export
//!   SUFFIX` steps.
//! * `backup-389`: `abproxy backup --to DIR --method 389 --server
//!   LDAPI_URL`, bound as DM: ON through the proxy, 389's own backup task
//!   (`cn=abproxy-ID,cn=backup,cn=tasks,cn=config`, added over the ldapi
//!   socket, polled until its exit code) while frozen, OFF, then each
//!   backend counted and digested from the archive with `dbscan` and the
//!   archive made `389-backup.tar`. The figures as for the export, the
//!   copy being the `389 backup task` step: the bench fails when the time
//!   frozen exceeds that step plus the drain plus [`FREEZE_MARGIN`] (the
//!   freeze also holds the `389 server` step, the direct connection and
//!   two searches of `cn=config`, which the margin covers). Also the steps
//!   after the release (`count SUFFIX`, `389 archive`).
//! * `verify-389`: `abproxy verify DIR` on the latest `backup-389` (the
//!   files' SHA-256, each backend read back out of the tar with `dbscan`),
//!   only if the binary has `verify`.
//! * `restore-389`: the instance stopped (`Ds389::stop`, SIGTERM), then
//!   `abproxy restore DIR --ds-instance NAME` on the latest `backup-389`
//!   (the backup checked, the archive unpacked, the database moved aside,
//!   `ns-slapd archive2db`, each backend read back with `dbscan`), then
//!   `Ds389::restart`. Only the `abproxy restore` process is timed (the
//!   stop and the start are printed per round). The database moved aside
//!   (`/var/lib/dirsrv/slapd-NAME/db.before-restore-ID`) is removed after
//!   each restore.
//! * `dsconf-backup`: `dsconf NAME backup create BAKDIR/bench-rN`, 389's
//!   own tool alone (its online backup task, no freeze), run as testkit's
//!   `Ds389::dsconf` runs it (root over the ldapi socket; lib389 looks at the
//!   task every 2 s until it ends); the archive is
//!   removed after it.
//! * `ldapsearch`: `ldapsearch -x -H ldap://389 -D DM -w PW -b SUFFIX -E
//!   pr=500/noprompt '*' +` for `dc=example,dc=org`, then for
//!   `dc=other,dc=org`, directly against 389 (no proxy, no freeze); the
//!   two processes' times summed.
//!
//! Ratios against `dsconf-backup` and `ldapsearch`.
//!
//! ## What is reported
//!
//! Per step: the wall time of the process (spawn to exit), median and
//! minimum over the rounds, and the ratios of each against the lab's two
//! reference steps of the same run; the backups' sizes and entries per
//! second; per backup the freeze's figures, and their medians and maxima.
//!
//! Settings (environment): `BACKUP_USERS` (100000), `BACKUP_ROUNDS` (3),
//! `BACKUP_SERVERS` (`slapd,389`: which labs, in that order),
//! `BACKUP_STEP_LIMIT_SECS` (600: each external step is killed, with its
//! process group, past it, and the bench fails).
//!
//! Everything is written under one temporary directory, removed at the
//! end (each round's outputs as soon as they are no longer needed), but
//! for 389's own files, under `/var/lib/dirsrv/slapd-NAME` (removed with
//! the instance).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use abproxy::backup::manifest::Manifest;
use abproxy::backup::slapd::MDB_COPY as MDB_COPY_BIN;
use anyhow::{anyhow, bail, Context, Result};
use loadgen::procs::{free_port, wait_listening};
use loadgen::stats::median;
use testkit::ds389::{self, Ds389, Ds389Options, DM_DN, DM_PW, DSCONF, OTHER_SUFFIX};
use testkit::{Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW, SLAPCAT, SUFFIX};

/// How much longer than the copy (the export, or 389's backup task) plus
/// the drain the freeze may last. Between `frozen_from` (taken when ON has
/// answered, so after the drain) and `frozen_to` (taken when OFF has
/// answered) the backup does, besides the copy, three exchanges with the
/// proxy on loopback: the status request, the root DSE search and OFF
/// (0-5 ms together on this machine under its usual load, 68 ms once with
/// other work keeping both cores busy; with `--method
/// 389` also the connection to 389's ldapi socket, its bind and two
/// searches of `cn=config`; on 389 DS also the `389 position` searches
/// after the copy); and the four times involved are truncated to whole
/// milliseconds (up to 2 ms off). 250 ms covers those with room for the
/// scheduling delays of a shared two-core machine, and is small next to
/// the ldif export at the default size (5-10 s): a freeze that goes on
/// after the copy (files written, fsyncs) by more than that fails.
const FREEZE_MARGIN: Duration = Duration::from_millis(250);

/// The longest wait for `abproxy verify --help`.
const HELP_LIMIT: Duration = Duration::from_secs(30);

const LDAPSEARCH: &str = "/usr/bin/ldapsearch";

/// Users in 389's second backend (`dc=other,dc=org`): small, the backup
/// covers it as the ldif export and 389's archive do.
const OTHER_USERS: usize = 100;

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

/// A lab: the server the steps run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Slapd,
    Ds389,
}

struct Settings {
    users: usize,
    rounds: usize,
    limit: Duration,
    servers: Vec<Server>,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let list = std::env::var("BACKUP_SERVERS").unwrap_or_else(|_| "slapd,389".into());
        let mut servers = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let server = match name {
                "slapd" => Server::Slapd,
                "389" | "389ds" => Server::Ds389,
                _ => bail!("BACKUP_SERVERS={list}: {name:?} is neither slapd nor 389"),
            };
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
        if servers.is_empty() {
            bail!("BACKUP_SERVERS={list:?} names no server (slapd, 389)");
        }
        let s = Settings {
            users: env_u64("BACKUP_USERS", 100_000)? as usize,
            rounds: env_u64("BACKUP_ROUNDS", 3)? as usize,
            limit: Duration::from_secs(env_u64("BACKUP_STEP_LIMIT_SECS", 600)?),
            servers,
        };
        if s.rounds == 0 || s.users == 0 || s.limit.is_zero() {
            bail!("BACKUP_USERS, BACKUP_ROUNDS and BACKUP_STEP_LIMIT_SECS must be at least 1");
        }
        Ok(s)
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

/// When the last `backup.log` step whose name starts with `prefix` ended
/// (its UTC time plus its milliseconds), in milliseconds since the epoch.
fn log_end_ms(log: &str, prefix: &str) -> Option<i64> {
    let mut end = None;
    for line in log.lines() {
        let Some((at, rest)) = line.split_once(' ') else {
            continue;
        };
        if rest.starts_with(prefix) {
            let e = parse_utc_ms(at).ok()? + step_ms(line)? as i64;
            end = end.max(Some(e));
        }
    }
    end
}

/// How a backup copies the data while frozen: the `backup.log` steps that
/// are the copy, and those of the freeze's other exchanges.
struct CopySteps {
    /// What the report calls the copy.
    name: &'static str,
    /// Prefix of the copy's steps in `backup.log` (summed).
    prefix: &'static str,
    /// The other steps inside the freeze that the log times (not OFF:
    /// see [`Freeze::tail_ms`]).
    others: &'static [&'static str],
    /// The steps after the release that still read the copy, and what the
    /// report calls them.
    after: &'static [&'static str],
    after_name: &'static str,
}

/// `--method ldif`: the paged export of each frozen suffix.
const EXPORT: CopySteps = CopySteps {
    name: "export",
    prefix: "export ",
    others: &["status:", "root DSE:", "389 position:"],
    after: &[],
    after_name: "",
};

/// `--method slapcat --slapd-config`: slapcat of each frozen suffix's
/// live database (the `export SUFFIX` step); the configuration is read
/// before the freeze.
const SLAPCAT_LIVE: CopySteps = CopySteps {
    name: "slapcat",
    prefix: "export ",
    others: &["status:", "root DSE:"],
    after: &[],
    after_name: "",
};

/// `--method files --slapd-config`: `mdb_copy -c` of each frozen suffix's
/// database (the `export SUFFIX` step); after the release each copy is
/// built into a throwaway slapd database and read back with slapcat (the
/// `count SUFFIX` steps).
const MDB_COPY: CopySteps = CopySteps {
    name: "mdb_copy",
    prefix: "export ",
    others: &["status:", "root DSE:"],
    after: &["count "],
    after_name: "each copy counted: built and read back with slapcat",
};

/// `--method 389`: 389's backup task, then `dbscan` and the tar.
const TASK_389: CopySteps = CopySteps {
    name: "389 backup task",
    prefix: "389 backup task:",
    others: &["status:", "root DSE:", "389 server:", "389 position:"],
    after: &["count ", "389 archive:"],
    after_name: "the dbscan counts and the tar",
};

/// One backup's figures, from its manifest and log.
struct Freeze {
    frozen_ms: i64,
    /// The copy's steps ([`CopySteps::prefix`]).
    copy_ms: u64,
    drained_ms: u64,
    /// The other steps inside the freeze, as the log gives them.
    others_ms: u64,
    /// From the end of the copy (the last copy step's time plus its
    /// milliseconds) to `frozen_to`: what the backup does after the copy
    /// until OFF has answered (OFF itself, and on 389 DS the `389
    /// position` searches of an ldif export), from the manifest's own
    /// time rather than `backup.log`'s `release (OFF)` step.
    tail_ms: i64,
    /// The steps after the release ([`CopySteps::after`]), if any.
    after_ms: Option<u64>,
    entries: u64,
    /// Bytes of the backends' files (each file once).
    bytes: u64,
}

impl Freeze {
    /// Frozen minus the copy and the drain.
    fn rest_ms(&self) -> i64 {
        self.frozen_ms - self.copy_ms as i64 - self.drained_ms as i64
    }
}

fn read_backup(dir: &Path, copy: &CopySteps) -> Result<Freeze> {
    let text = fs::read_to_string(dir.join("manifest.json")).context("reading manifest.json")?;
    let m: Manifest = serde_json::from_str(&text).context("parsing manifest.json")?;
    let log = fs::read_to_string(dir.join("backup.log")).context("reading backup.log")?;
    let frozen_ms = parse_utc_ms(&m.freeze.frozen_to)? - parse_utc_ms(&m.freeze.frozen_from)?;
    let copy_ms = log_ms(&log, copy.prefix)
        .ok_or_else(|| anyhow!("no \"{}...\" step in backup.log:\n{log}", copy.prefix))?;
    let drained_ms = m
        .freeze
        .drained_ms
        .ok_or_else(|| anyhow!("no drained_ms in the manifest: {:?}", m.freeze.message))?;
    let others_ms = copy.others.iter().filter_map(|p| log_ms(&log, p)).sum();
    let copy_end = log_end_ms(&log, copy.prefix)
        .ok_or_else(|| anyhow!("no time on the \"{}...\" steps:\n{log}", copy.prefix))?;
    let tail_ms = parse_utc_ms(&m.freeze.frozen_to)? - copy_end;
    let after: Vec<u64> = copy.after.iter().filter_map(|p| log_ms(&log, p)).collect();
    let after_ms = (!after.is_empty()).then(|| after.iter().sum());
    let mut entries = 0;
    let mut bytes = 0;
    // With --method 389 every backend names the same archive.
    let mut files = BTreeSet::new();
    for b in &m.backends {
        entries += b.entries;
        if files.insert(b.file.as_str()) {
            let path = dir.join(&b.file);
            bytes += fs::metadata(&path)
                .with_context(|| path.display().to_string())?
                .len();
        }
    }
    Ok(Freeze {
        frozen_ms,
        copy_ms,
        drained_ms,
        others_ms,
        tail_ms,
        after_ms,
        entries,
        bytes,
    })
}

/// Reads the backup in `dir` and prints its freeze's figures. A time
/// frozen longer than the copy plus the drain plus [`FREEZE_MARGIN`] is
/// added to `failures` (with the backup's log), printed now, and fails the
/// bench once every lab has reported.
fn check_backup(
    dir: &Path,
    copy: &CopySteps,
    what: &str,
    round: usize,
    took: Duration,
    failures: &mut Vec<String>,
) -> Result<Freeze> {
    let f = read_backup(dir, copy).with_context(|| format!("backup {}", dir.display()))?;
    let allowed = f.copy_ms as i64 + f.drained_ms as i64 + FREEZE_MARGIN.as_millis() as i64;
    let after = f
        .after_ms
        .map_or(String::new(), |ms| format!(", after the release {ms} ms"));
    eprintln!(
        "backup: round {round}: {what} {:.2} s, frozen {} ms = {} {} ms + drain {} ms \
         + {} ms (by the log: the other steps inside the freeze {} ms, from the end of the \
         copy to OFF answered {} ms){after}, {} entries, {} bytes",
        took.as_secs_f64(),
        f.frozen_ms,
        copy.name,
        f.copy_ms,
        f.drained_ms,
        f.rest_ms(),
        f.others_ms,
        f.tail_ms,
        f.entries,
        f.bytes
    );
    if f.frozen_ms > allowed {
        let failure = format!(
            "round {round}: {what}: frozen {} ms, more than the {} ({} ms) + the drain ({} ms) \
             + {} ms\n{}",
            f.frozen_ms,
            copy.name,
            f.copy_ms,
            f.drained_ms,
            FREEZE_MARGIN.as_millis(),
            fs::read_to_string(dir.join("backup.log")).unwrap_or_default()
        );
        eprintln!("backup: FAILED: {failure}");
        failures.push(failure);
    }
    Ok(f)
}

/// The freezes' medians and maxima, and the share of the wall time frozen.
fn print_freezes(what: &str, copy: &CopySteps, freezes: &[Freeze], walls: &[f64]) {
    if freezes.is_empty() {
        return;
    }
    let col = |g: &dyn Fn(&Freeze) -> f64| -> (f64, f64) {
        let mut v: Vec<f64> = freezes.iter().map(g).collect();
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        (median(&mut v).unwrap_or(0.0), max)
    };
    let frozen = col(&|f| f.frozen_ms as f64);
    let copied = col(&|f| f.copy_ms as f64);
    let drain = col(&|f| f.drained_ms as f64);
    let rest = col(&|f| f.rest_ms() as f64);
    let others = col(&|f| f.others_ms as f64);
    let tail = col(&|f| f.tail_ms as f64);
    println!(
        "\n{what} freeze, median (max) over {} backups: frozen {:.0} ms ({:.0}), {} {:.0} ms \
         ({:.0}), drain {:.0} ms ({:.0}); frozen - {} - drain {:.0} ms ({:.0}), allowed {} ms; \
         by the log, the other steps inside the freeze {:.0} ms ({:.0}) and from the end of \
         the {} to OFF answered {:.0} ms ({:.0})",
        freezes.len(),
        frozen.0,
        frozen.1,
        copy.name,
        copied.0,
        copied.1,
        drain.0,
        drain.1,
        copy.name,
        rest.0,
        rest.1,
        FREEZE_MARGIN.as_millis(),
        others.0,
        others.1,
        copy.name,
        tail.0,
        tail.1
    );
    if freezes.iter().all(|f| f.after_ms.is_some()) {
        let after = col(&|f| f.after_ms.unwrap_or(0) as f64);
        println!(
            "{what} after the release ({}), median (max): {:.0} ms ({:.0})",
            copy.after_name, after.0, after.1
        );
    }
    let mut share: Vec<f64> = freezes
        .iter()
        .zip(walls)
        .map(|(f, s)| f.frozen_ms as f64 / 1000.0 / s)
        .collect();
    if let Some(m) = median(&mut share) {
        println!("{what}: frozen / wall time, median: {m:.2}");
    }
    let f = &freezes[freezes.len() - 1];
    let mut w = walls.to_vec();
    if let Some(med) = median(&mut w) {
        println!(
            "{what}: {} entries, {} bytes ({:.1} MB); {:.0} entries/s at the median wall time, \
             {:.0} at the best",
            f.entries,
            f.bytes,
            f.bytes as f64 / 1e6,
            f.entries as f64 / med,
            f.entries as f64 / w[0]
        );
    }
}

/// The table of steps: per step the runs, the median and the minimum of
/// the wall times, and their ratios against the two reference steps
/// `refs` (row name, label).
fn print_table(rows: &[(&str, Vec<f64>)], refs: [(&str, &str); 2]) {
    let stat = |v: &[f64]| -> Option<(f64, f64, usize)> {
        let mut v = v.to_vec();
        let med = median(&mut v)?;
        Some((med, v[0], v.len()))
    };
    let find = |name: &str| {
        rows.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| stat(v))
    };
    let (a, b) = (find(refs[0].0), find(refs[1].0));
    let ratio = |x: f64, r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.2}", x / r));
    let (la, lb) = (refs[0].1, refs[1].1);
    println!(
        "| step | runs | median s | min s | median / {la} | median / {lb} | min / {la} | min / {lb} |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, v) in rows {
        let Some((med, min, n)) = stat(v) else {
            println!("| {name} | 0 | skipped | | | | | |");
            continue;
        };
        println!(
            "| {name} | {n} | {med:.2} | {min:.2} | {} | {} | {} | {} |",
            ratio(med, a.map(|s| s.0)),
            ratio(med, b.map(|s| s.0)),
            ratio(min, a.map(|s| s.1)),
            ratio(min, b.map(|s| s.1)),
        );
    }
}

/// abproxy as its own process: `serve --config` in front of `upstream`,
/// the `suffixes` as backends in `readonly` mode (default driver), `admin`
/// allowed to freeze.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &Path, upstream: &str, admin: &str, suffixes: &[&str]) -> Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("abproxy-backup-bench")
            .tempdir()?;
        let mut backends = String::new();
        for suffix in suffixes {
            backends.push_str(&format!(
                "[[backends]]\nsuffix = \"{suffix}\"\nmode = \"readonly\"\n"
            ));
        }
        let mut last = anyhow!("not started");
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let config = format!(
                "listen = [\"ldap://{addr}\"]\n\
                 upstream = \"{upstream}\"\n\
                 shutdown_grace_secs = 1\n\
                 [freeze]\n\
                 allowed = [\"{admin}\"]\n\
                 root_dns = [\"{admin}\"]\n\
                 max_drain_secs = 10\n\
                 lease_secs = 3600\n\
                 {backends}"
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

    fn url(&self) -> String {
        format!("ldap://{}", self.addr)
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

    /// Stops the proxy and prints its log if it wrote anything.
    fn finish(self) -> Result<()> {
        let log = self.log();
        self.stop()?;
        if !log.trim().is_empty() {
            eprintln!("abproxy's log:\n{log}");
        }
        Ok(())
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

/// `abproxy backup --to DIR` through `proxy`, bound as `dn`.
fn backup_command(bin: &Path, proxy: &Proxy, dn: &str, pw: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("backup")
        .arg("--to")
        .arg(dir)
        .env("ABPROXY_URL", proxy.url())
        .env("ABPROXY_BIND_DN", dn)
        .env("ABPROXY_PASSWORD", pw)
        .env("NO_COLOR", "1");
    cmd
}

/// A backup method of the slapd lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `--method ldif`: the paged export through the proxy.
    Ldif,
    /// `--method slapcat --slapd-config`: slapcat of the live database.
    Slapcat,
    /// `--method files --slapd-config`: `mdb_copy -c` of the live database.
    Files,
}

impl Method {
    const ALL: [Method; 3] = [Method::Ldif, Method::Slapcat, Method::Files];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Method::Ldif => "ldif",
            Method::Slapcat => "slapcat",
            Method::Files => "files",
        }
    }

    fn copy(self) -> &'static CopySteps {
        match self {
            Method::Ldif => &EXPORT,
            Method::Slapcat => &SLAPCAT_LIVE,
            Method::Files => &MDB_COPY,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Backup(Method),
    Verify(Method),
    Restore(Method),
    Slapcat,
    Ldapsearch,
}

impl Step {
    const ALL: [Step; 11] = [
        Step::Backup(Method::Ldif),
        Step::Backup(Method::Slapcat),
        Step::Backup(Method::Files),
        Step::Verify(Method::Ldif),
        Step::Verify(Method::Slapcat),
        Step::Verify(Method::Files),
        Step::Restore(Method::Ldif),
        Step::Restore(Method::Slapcat),
        Step::Restore(Method::Files),
        Step::Slapcat,
        Step::Ldapsearch,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::Backup(Method::Ldif) => "abproxy backup-ldif",
            Step::Backup(Method::Slapcat) => "abproxy backup-slapcat",
            Step::Backup(Method::Files) => "abproxy backup-files",
            Step::Verify(Method::Ldif) => "abproxy verify (ldif)",
            Step::Verify(Method::Slapcat) => "abproxy verify (slapcat)",
            Step::Verify(Method::Files) => "abproxy verify (files)",
            Step::Restore(Method::Ldif) => "abproxy restore (ldif)",
            Step::Restore(Method::Slapcat) => "abproxy restore (slapcat)",
            Step::Restore(Method::Files) => "abproxy restore (files)",
            Step::Slapcat => "slapcat",
            Step::Ldapsearch => "ldapsearch direct",
        }
    }

    /// A short name for file names.
    fn file_part(self) -> String {
        match self {
            Step::Backup(m) => format!("backup-{}", m.name()),
            Step::Verify(m) => format!("verify-{}", m.name()),
            Step::Restore(m) => format!("restore-{}", m.name()),
            Step::Slapcat => "slapcat".into(),
            Step::Ldapsearch => "ldapsearch".into(),
        }
    }
}

/// One method's backups in the slapd lab.
#[derive(Default)]
struct Backups {
    /// The latest backup (what verify and restore read).
    latest: Option<PathBuf>,
    /// Backups no longer the latest, removed once nothing uses them.
    old: Vec<PathBuf>,
    freezes: Vec<Freeze>,
}

/// What the slapd lab shares: the programs, slapd, the proxy, the scratch
/// directory, and each method's latest backup.
struct Bench<'a> {
    s: &'a Settings,
    bin: &'a Path,
    slapd: &'a Slapd,
    proxy: &'a Proxy,
    scratch: &'a Path,
    has_verify: bool,
    /// Backups made so far (names every backup directory).
    made: usize,
    /// Per [`Method`], in [`Method::ALL`]'s order.
    backups: [Backups; 3],
    times: Vec<(Step, Duration)>,
    /// Bytes and entries of slapcat's and ldapsearch's outputs (first round).
    slapcat_out: Option<(u64, u64)>,
    ldapsearch_out: Option<(u64, u64)>,
    /// Freezes longer than allowed ([`check_backup`]).
    failures: Vec<String>,
}

impl Bench<'_> {
    fn slapd_d(&self) -> PathBuf {
        self.slapd.dir().join("slapd.d")
    }

    /// The latest backup of `method`, made now if there is none yet.
    fn backup_dir(&mut self, method: Method, round: usize) -> Result<PathBuf> {
        if self.backups[method.index()].latest.is_none() {
            self.step(Step::Backup(method), round)?;
        }
        Ok(self.backups[method.index()]
            .latest
            .clone()
            .expect("a backup"))
    }

    fn step(&mut self, step: Step, round: usize) -> Result<()> {
        let limit = self.s.limit;
        let log = self
            .scratch
            .join(format!("r{round}-{}.log", step.file_part()));
        let took = match step {
            Step::Backup(method) => {
                // Numbered by the backups made so far: never a directory that
                // exists (abproxy backup refuses one).
                self.made += 1;
                let dir = self
                    .scratch
                    .join(format!("backup-{}-{}", method.name(), self.made));
                let mut cmd = backup_command(self.bin, self.proxy, ADMIN_DN, ADMIN_PW, &dir);
                cmd.args(["--method", method.name()]);
                if method != Method::Ldif {
                    cmd.arg("--slapd-config").arg(self.slapd_d());
                }
                let took = run_timed(step.name(), &mut cmd, Stdio::null(), &log, limit)?;
                let f = check_backup(
                    &dir,
                    method.copy(),
                    &format!("backup-{}", method.name()),
                    round,
                    took,
                    &mut self.failures,
                )?;
                let b = &mut self.backups[method.index()];
                b.freezes.push(f);
                if let Some(prev) = b.latest.replace(dir) {
                    b.old.push(prev);
                }
                took
            }
            Step::Verify(method) => {
                if !self.has_verify {
                    return Ok(());
                }
                let dir = self.backup_dir(method, round)?;
                run_timed(
                    step.name(),
                    Command::new(self.bin).arg("verify").arg(&dir),
                    Stdio::null(),
                    &log,
                    limit,
                )?
            }
            Step::Restore(method) => {
                let dir = self.backup_dir(method, round)?;
                let work = self
                    .scratch
                    .join(format!("restore-{}-r{round}", method.name()));
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
        for b in &mut self.backups {
            for old in b.old.drain(..) {
                fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
            }
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
        println!(
            "\nslapd: {} users, {} round(s), abproxy {}\n",
            self.s.users,
            self.s.rounds,
            self.bin.display()
        );
        let rows: Vec<(&str, Vec<f64>)> = Step::ALL
            .iter()
            .map(|&step| (step.name(), self.secs(step)))
            .collect();
        print_table(
            &rows,
            [
                (Step::Slapcat.name(), "slapcat"),
                (Step::Ldapsearch.name(), "ldapsearch"),
            ],
        );
        for method in Method::ALL {
            print_freezes(
                &format!("backup-{}", method.name()),
                method.copy(),
                &self.backups[method.index()].freezes,
                &self.secs(Step::Backup(method)),
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
    }
}

/// The slapd lab: slapd and the proxy started, the rounds, the report.
fn run_slapd(s: &Settings, bin: &Path, scratch: &Path, has_verify: bool) -> Result<Vec<String>> {
    for tool in [LDAPSEARCH, SLAPCAT, MDB_COPY_BIN] {
        if !Path::new(tool).exists() {
            bail!("{tool} not found: apt-get install slapd ldap-utils lmdb-utils");
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
    let proxy = Proxy::start(bin, &slapd.url(), ADMIN_DN, &[SUFFIX])?;
    let mut b = Bench {
        s,
        bin,
        slapd: &slapd,
        proxy: &proxy,
        scratch,
        has_verify,
        made: 0,
        backups: Default::default(),
        times: Vec::new(),
        slapcat_out: None,
        ldapsearch_out: None,
        failures: Vec::new(),
    };
    for round in 0..s.rounds {
        // Each round starts with the next step.
        let mut order = Step::ALL.to_vec();
        order.rotate_left(round % Step::ALL.len());
        for step in order {
            b.step(step, round)
                .with_context(|| format!("slapd: round {round}: {}", step.name()))?;
        }
    }
    b.print();
    println!(
        "\nslapd set-up (slapadd of {} users) {:.1} s; run time {:.1} s",
        s.users,
        setup.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    for backups in &mut b.backups {
        if let Some(latest) = backups.latest.take() {
            fs::remove_dir_all(&latest)
                .with_context(|| format!("removing {}", latest.display()))?;
        }
    }
    let failures = std::mem::take(&mut b.failures);
    drop(b);
    proxy.finish()?;
    Ok(failures)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step389 {
    BackupLdif,
    Backup389,
    Verify389,
    Restore389,
    DsconfBackup,
    Ldapsearch,
}

impl Step389 {
    const ALL: [Step389; 6] = [
        Step389::BackupLdif,
        Step389::Backup389,
        Step389::Verify389,
        Step389::Restore389,
        Step389::DsconfBackup,
        Step389::Ldapsearch,
    ];

    fn name(self) -> &'static str {
        match self {
            Step389::BackupLdif => "abproxy backup (ldif)",
            Step389::Backup389 => "abproxy backup --method 389",
            Step389::Verify389 => "abproxy verify (389)",
            Step389::Restore389 => "abproxy restore --ds-instance",
            Step389::DsconfBackup => "dsconf backup create",
            Step389::Ldapsearch => "ldapsearch direct",
        }
    }
}

/// What the 389 lab shares: the instance (stopped and started by the
/// restore), the proxy, the scratch directory, the latest `--method 389`
/// backup.
struct Lab389<'a> {
    s: &'a Settings,
    bin: &'a Path,
    ds: Ds389,
    proxy: &'a Proxy,
    scratch: &'a Path,
    has_verify: bool,
    /// Backups made so far (names every backup directory).
    made: usize,
    latest: Option<PathBuf>,
    /// `--method 389` backups no longer the latest.
    old: Vec<PathBuf>,
    times: Vec<(Step389, Duration)>,
    ldif_freezes: Vec<Freeze>,
    task_freezes: Vec<Freeze>,
    /// Per restore: the stop and the start of ns-slapd around it.
    restarts: Vec<(Duration, Duration)>,
    /// Bytes of `dsconf backup create`'s archive (first round).
    dsconf_bytes: Option<u64>,
    /// Bytes and entries of ldapsearch's outputs (first round).
    ldapsearch_out: Option<(u64, u64)>,
    /// Freezes longer than allowed ([`check_backup`]).
    failures: Vec<String>,
}

/// Bytes of the files under `dir`.
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        n += if meta.is_dir() {
            tree_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(n)
}

/// lib389's tool `tool` for instance `name`, as testkit's
/// `Ds389::dsconf` runs it (Debian's python, no user site).
fn lib389_command(tool: &str, name: &str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.arg(name)
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONSTARTUP")
        .env_remove("PYTHONUSERBASE")
        .env("PYTHONNOUSERSITE", "1");
    cmd
}

impl Lab389<'_> {
    fn next_dir(&mut self, kind: &str) -> PathBuf {
        self.made += 1;
        self.scratch.join(format!("389-{kind}-{}", self.made))
    }

    /// The latest `--method 389` backup, made now if there is none yet.
    fn backup_dir(&mut self, round: usize) -> Result<PathBuf> {
        if self.latest.is_none() {
            self.step(Step389::Backup389, round)?;
        }
        Ok(self.latest.clone().expect("a backup"))
    }

    /// Removes what a restore moved aside: `db.before-restore-*` beside
    /// the database directory.
    fn remove_aside(&self) -> Result<usize> {
        let db = self.ds.db_dir();
        let parent = db
            .parent()
            .context("the database directory has no parent")?;
        let prefix = format!(
            "{}.before-restore-",
            db.file_name().and_then(|n| n.to_str()).unwrap_or("db")
        );
        let mut n = 0;
        for entry in
            fs::read_dir(parent).with_context(|| format!("reading {}", parent.display()))?
        {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn step(&mut self, step: Step389, round: usize) -> Result<()> {
        let limit = self.s.limit;
        let log = self.scratch.join(format!("389-r{round}-{step:?}.log"));
        let took = match step {
            Step389::BackupLdif => {
                let dir = self.next_dir("ldif");
                let took = run_timed(
                    step.name(),
                    backup_command(self.bin, self.proxy, DM_DN, DM_PW, &dir)
                        .args(["--method", "ldif"]),
                    Stdio::null(),
                    &log,
                    limit,
                )?;
                let f = check_backup(
                    &dir,
                    &EXPORT,
                    "backup-ldif",
                    round,
                    took,
                    &mut self.failures,
                )?;
                self.ldif_freezes.push(f);
                // Nothing reads it again.
                fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                took
            }
            Step389::Backup389 => {
                let dir = self.next_dir("task");
                let took = run_timed(
                    step.name(),
                    backup_command(self.bin, self.proxy, DM_DN, DM_PW, &dir)
                        .args(["--method", "389", "--server"])
                        .arg(self.ds.ldapi_url()),
                    Stdio::null(),
                    &log,
                    limit,
                )?;
                let f = check_backup(
                    &dir,
                    &TASK_389,
                    "backup-389",
                    round,
                    took,
                    &mut self.failures,
                )?;
                self.task_freezes.push(f);
                if let Some(prev) = self.latest.replace(dir) {
                    self.old.push(prev);
                }
                took
            }
            Step389::Verify389 => {
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
            Step389::Restore389 => {
                let dir = self.backup_dir(round)?;
                let t = Instant::now();
                self.ds
                    .stop()
                    .context("stopping ns-slapd before the restore")?;
                let stopped = t.elapsed();
                let restored = run_timed(
                    step.name(),
                    Command::new(self.bin)
                        .arg("restore")
                        .arg(&dir)
                        .arg("--ds-instance")
                        .arg(self.ds.name()),
                    Stdio::null(),
                    &log,
                    limit,
                );
                // Started again whatever the restore did.
                let t = Instant::now();
                let started = self.ds.restart();
                let start = t.elapsed();
                let took = restored?;
                started.context("starting ns-slapd after the restore")?;
                let aside = self.remove_aside()?;
                eprintln!(
                    "backup: round {round}: ns-slapd stopped in {:.2} s, started again in {:.2} s \
                     after the restore; {aside} database(s) moved aside by it removed",
                    stopped.as_secs_f64(),
                    start.as_secs_f64()
                );
                if aside == 0 {
                    eprintln!(
                        "backup: round {round}: no {}.before-restore-* after the restore",
                        self.ds.db_dir().display()
                    );
                }
                self.restarts.push((stopped, start));
                took
            }
            Step389::DsconfBackup => {
                // Written by ns-slapd (user dirsrv): in the instance's bakdir.
                let dir = self.ds.bak_dir().join(format!("bench-r{round}"));
                let took = run_timed(
                    step.name(),
                    lib389_command(DSCONF, self.ds.name())
                        .args(["backup", "create"])
                        .arg(&dir),
                    Stdio::null(),
                    &log,
                    limit,
                )?;
                if self.dsconf_bytes.is_none() {
                    self.dsconf_bytes = Some(tree_bytes(&dir)?);
                }
                fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                took
            }
            Step389::Ldapsearch => {
                let out = self.scratch.join(format!("389-ldapsearch-r{round}.ldif"));
                let mut took = Duration::ZERO;
                for suffix in [SUFFIX, OTHER_SUFFIX] {
                    let file = fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&out)
                        .with_context(|| format!("opening {}", out.display()))?;
                    took += run_timed(
                        step.name(),
                        Command::new(LDAPSEARCH)
                            .args(["-x", "-H"])
                            .arg(self.ds.url())
                            .args(["-D", DM_DN, "-w", DM_PW, "-b", suffix])
                            .args(["-E", "pr=500/noprompt", "*", "+"]),
                        Stdio::from(file),
                        &log,
                        limit,
                    )?;
                }
                if self.ldapsearch_out.is_none() {
                    self.ldapsearch_out = Some((fs::metadata(&out)?.len(), count_entries(&out)?));
                }
                fs::remove_file(&out)?;
                took
            }
        };
        let _ = fs::remove_file(&log);
        eprintln!(
            "backup: 389 round {round}: {} {:.2} s",
            step.name(),
            took.as_secs_f64()
        );
        self.times.push((step, took));
        for old in self.old.drain(..) {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    fn secs(&self, step: Step389) -> Vec<f64> {
        self.times
            .iter()
            .filter(|(s, _)| *s == step)
            .map(|(_, d)| d.as_secs_f64())
            .collect()
    }

    fn print(&self) {
        println!(
            "\n389 DS: {} users (+ {OTHER_USERS} in {OTHER_SUFFIX}), {} round(s), abproxy {}\n",
            self.s.users,
            self.s.rounds,
            self.bin.display()
        );
        let rows: Vec<(&str, Vec<f64>)> = Step389::ALL
            .iter()
            .map(|&step| (step.name(), self.secs(step)))
            .collect();
        print_table(
            &rows,
            [
                (Step389::DsconfBackup.name(), "dsconf-backup"),
                (Step389::Ldapsearch.name(), "ldapsearch"),
            ],
        );
        print_freezes(
            "backup-ldif",
            &EXPORT,
            &self.ldif_freezes,
            &self.secs(Step389::BackupLdif),
        );
        print_freezes(
            "backup-389",
            &TASK_389,
            &self.task_freezes,
            &self.secs(Step389::Backup389),
        );
        if let Some(bytes) = self.dsconf_bytes {
            println!(
                "dsconf backup create: archive of {bytes} bytes ({:.1} MB)",
                bytes as f64 / 1e6
            );
        }
        if let Some((bytes, entries)) = self.ldapsearch_out {
            println!(
                "ldapsearch: {entries} entries, {bytes} bytes ({:.1} MB)",
                bytes as f64 / 1e6
            );
        }
        if !self.restarts.is_empty() {
            let mut stop: Vec<f64> = self.restarts.iter().map(|r| r.0.as_secs_f64()).collect();
            let mut start: Vec<f64> = self.restarts.iter().map(|r| r.1.as_secs_f64()).collect();
            println!(
                "around each restore (not timed in it), median: ns-slapd stopped in {:.2} s, \
                 started in {:.2} s",
                median(&mut stop).unwrap_or(0.0),
                median(&mut start).unwrap_or(0.0)
            );
        }
    }
}

/// The 389 DS lab: the instance and the proxy started, the rounds, the
/// report; one line and nothing else when 389 DS cannot run here.
fn run_389(s: &Settings, bin: &Path, scratch: &Path, has_verify: bool) -> Result<Vec<String>> {
    if let Err(why) = ds389::available() {
        println!("389 DS: skipped ({why})");
        return Ok(Vec::new());
    }
    let t = Instant::now();
    let ds = Ds389::start(Ds389Options {
        users: s.users,
        other_users: OTHER_USERS,
        tls: None,
    })
    .context("starting 389 DS")?;
    let setup = t.elapsed();
    eprintln!(
        "backup: 389 DS instance {} at {} ({} users) ready in {:.1} s",
        ds.name(),
        ds.url(),
        s.users,
        setup.as_secs_f64()
    );
    let proxy = Proxy::start(bin, &ds.url(), DM_DN, &[SUFFIX, OTHER_SUFFIX])?;
    let mut lab = Lab389 {
        s,
        bin,
        ds,
        proxy: &proxy,
        scratch,
        has_verify,
        made: 0,
        latest: None,
        old: Vec::new(),
        times: Vec::new(),
        ldif_freezes: Vec::new(),
        task_freezes: Vec::new(),
        restarts: Vec::new(),
        dsconf_bytes: None,
        ldapsearch_out: None,
        failures: Vec::new(),
    };
    for round in 0..s.rounds {
        let mut order = Step389::ALL.to_vec();
        order.rotate_left(round % Step389::ALL.len());
        for step in order {
            lab.step(step, round)
                .with_context(|| format!("389 DS: round {round}: {}", step.name()))?;
        }
    }
    lab.print();
    println!(
        "\n389 DS set-up (instance created, ldif2db of {} users) {:.1} s; run time {:.1} s",
        s.users,
        setup.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    // The lab's borrow of the proxy ends here; the instance is stopped
    // (and its files removed, on drop) after the proxy.
    let Lab389 {
        ds,
        latest,
        failures,
        ..
    } = lab;
    if let Some(latest) = latest {
        fs::remove_dir_all(&latest).with_context(|| format!("removing {}", latest.display()))?;
    }
    proxy.finish()?;
    drop(ds);
    Ok(failures)
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
    let bin = testkit::product::binary()?;
    let bin = bin.as_path();
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
    let mut failures = Vec::new();
    for &server in &s.servers {
        let (name, failed) = match server {
            Server::Slapd => ("slapd", run_slapd(&s, bin, scratch.path(), verify)?),
            Server::Ds389 => ("389 DS", run_389(&s, bin, scratch.path(), verify)?),
        };
        failures.extend(failed.into_iter().map(|f| format!("{name}: {f}")));
    }
    if !failures.is_empty() {
        bail!(
            "{} backup(s) frozen longer than the copy + the drain + {} ms:\n{}",
            failures.len(),
            FREEZE_MARGIN.as_millis(),
            failures.join("\n")
        );
    }
    Ok(())
}
