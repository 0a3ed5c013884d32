//! Throwaway OpenLDAP `slapd` instances for integration tests, benchmarks and
//! the `abproxy demo` command.
//!
//! [`Slapd::start`] builds a complete, private directory server from scratch
//! (Debian's slapd 2.5 package: `/usr/sbin/slapd`, `slapadd`, `slapcat`):
//!
//! * `DIR/slapd.d/` — the `cn=config` tree, built offline with `slapadd -n0`;
//! * `DIR/db-example/` — back-mdb for `dc=example,dc=org` (sample users,
//!   ppolicy overlay with a default policy in `ou=policies`);
//! * `DIR/db-other/` — back-mdb for `dc=other,dc=org`;
//! * `DIR/ldapi` — the `ldapi://` socket; `DIR/slapd.log` — slapd's output.
//!
//! Both databases carry the syncprov and sssvlv overlays. slapd runs in the
//! foreground as a child process of the caller and listens only on
//! `ldap://127.0.0.1:PORT/` and the ldapi socket.
//!
//! Credentials: [`ADMIN_DN`] / [`ADMIN_PW`] (rootdn of `dc=example,dc=org`),
//! [`OTHER_ADMIN_DN`] and [`CONFIG_ADMIN_DN`] (same password), root over ldapi
//! with SASL EXTERNAL (manage on everything), and the sample users
//! [`user_dn`]`(k)` / [`user_pw`]`(k)` for `k` in `1..=users`.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Path of the slapd binary (Debian package `slapd`).
pub const SLAPD: &str = "/usr/sbin/slapd";
/// Path of slapadd (Debian package `slapd`).
pub const SLAPADD: &str = "/usr/sbin/slapadd";
/// Path of slapcat (Debian package `slapd`).
pub const SLAPCAT: &str = "/usr/sbin/slapcat";

/// Suffix of the main database (sample users, password policy).
pub const SUFFIX: &str = "dc=example,dc=org";
/// Suffix of the second database.
pub const OTHER_SUFFIX: &str = "dc=other,dc=org";
/// Root DN of `dc=example,dc=org`.
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
/// Password of every root DN ([`ADMIN_DN`], [`OTHER_ADMIN_DN`], [`CONFIG_ADMIN_DN`]).
pub const ADMIN_PW: &str = "secret";
/// Root DN of `dc=other,dc=org` (password [`ADMIN_PW`]).
pub const OTHER_ADMIN_DN: &str = "cn=admin,dc=other,dc=org";
/// Root DN of `cn=config` (password [`ADMIN_PW`]).
pub const CONFIG_ADMIN_DN: &str = "cn=admin,cn=config";

/// The identity that SASL EXTERNAL over ldapi maps to for uid 0 / gid 0.
const ROOTCRED: &str = "dn.exact=gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth";
/// Readiness / shutdown polling interval.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for slapd to become ready, and for it to exit on SIGTERM.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How many times to try binding slapd to a (new) port.
const BIND_ATTEMPTS: usize = 5;
const INSTALL_HINT: &str = "install OpenLDAP with `apt-get install -y slapd ldap-utils`";

/// DN of sample user `k` in `dc=example,dc=org` (`uid=userK,ou=people,dc=example,dc=org`).
pub fn user_dn(k: usize) -> String {
    format!("uid=user{k},ou=people,{SUFFIX}")
}

/// Password of sample user `k` (`passK`); the same for users of both suffixes.
pub fn user_pw(k: usize) -> String {
    format!("pass{k}")
}

/// DN of sample user `k` in `dc=other,dc=org` (`uid=userK,ou=people,dc=other,dc=org`).
pub fn other_user_dn(k: usize) -> String {
    format!("uid=user{k},ou=people,{OTHER_SUFFIX}")
}

/// How to build a [`Slapd`].
#[derive(Debug, Clone)]
pub struct SlapdOptions {
    /// Number of sample users in `dc=example,dc=org` (default 100).
    pub users: usize,
    /// Number of sample users in `dc=other,dc=org` (default 10).
    pub other_users: usize,
    /// Set `olcDbNoSync: TRUE` on both databases (faster writes, not durable).
    pub nosync: bool,
    /// Run slapd with `-d stats` (every operation logged to `DIR/slapd.log`)
    /// instead of `-d none` (only errors and start/stop messages).
    pub stats_log: bool,
    /// Directory for everything (config, databases, socket, log). `None`
    /// (default): a fresh directory under `/tmp`, removed when the [`Slapd`]
    /// is dropped. A given directory is created if needed, an old instance
    /// started in it is stopped, and the generated files are replaced; the
    /// directory is kept on drop. Its path must be short enough for the
    /// `DIR/ldapi` socket (< 100 bytes).
    pub dir: Option<PathBuf>,
    /// Restore `dc=example,dc=org` from a copy of a `db-example` directory
    /// (its `data.mdb`) instead of loading sample data: how an admin restores
    /// a file-level backup into a configured server.
    pub restore_example: Option<PathBuf>,
    /// TLS: an `ldaps://127.0.0.1:PORT2/` listener too, and StartTLS on the
    /// ldap:// one ([`Slapd::ldaps_url`]).
    pub tls: Option<SlapdTls>,
}

/// slapd's TLS files (`olcTLSCertificateFile`, `olcTLSCertificateKeyFile`,
/// `olcTLSCACertificateFile`; clients' certificates are asked for and
/// checked when presented: `olcTLSVerifyClient: try`).
#[derive(Debug, Clone)]
pub struct SlapdTls {
    /// PEM certificate.
    pub cert_file: PathBuf,
    /// PEM key.
    pub key_file: PathBuf,
    /// PEM CA certificate(s).
    pub ca_file: PathBuf,
}

impl Default for SlapdOptions {
    fn default() -> Self {
        SlapdOptions {
            users: 100,
            other_users: 10,
            nosync: false,
            stats_log: false,
            dir: None,
            restore_example: None,
            tls: None,
        }
    }
}

/// A running throwaway slapd, a child process of this one.
///
/// Stopped (and its temporary directory removed, if [`Slapd::start`] created
/// one) on drop.
#[derive(Debug)]
pub struct Slapd {
    dir: PathBuf,
    ldapi: PathBuf,
    port: u16,
    /// The ldaps:// port, with TLS.
    ldaps_port: Option<u16>,
    pid: u32,
    stats_log: bool,
    /// Sample users in `dc=example,dc=org`.
    users: usize,
    child: Option<Child>,
    // Declared last: dropped (removed) after `Drop::drop` has stopped slapd.
    _tmp: Option<tempfile::TempDir>,
}

/// Why one launch attempt failed.
enum LaunchError {
    /// slapd exited because its TCP address was taken: worth retrying.
    AddrInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl Slapd {
    /// Builds the configuration and sample data, starts slapd on a free
    /// loopback port and waits until it answers LDAP on TCP and its ldapi
    /// socket is up.
    ///
    /// Fails if OpenLDAP is not installed, if a setup tool fails, or if slapd
    /// exits or does not become ready within 10 s (the error then includes the
    /// tail of `DIR/slapd.log`). If slapd cannot bind the chosen port it is
    /// retried with a new one, up to 5 times.
    pub fn start(opts: SlapdOptions) -> Result<Slapd> {
        for tool in [SLAPD, SLAPADD, SLAPCAT] {
            if !Path::new(tool).exists() {
                bail!("{tool} not found: {INSTALL_HINT}");
            }
        }
        let t0 = Instant::now();
        let (tmp, dir) = match &opts.dir {
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("abp-slapd-")
                    .tempdir_in("/tmp")
                    .context("creating a temporary directory under /tmp")?;
                let dir = tmp.path().to_path_buf();
                (Some(tmp), dir)
            }
            Some(d) => {
                fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                let dir =
                    fs::canonicalize(d).with_context(|| format!("resolving {}", d.display()))?;
                (None, dir)
            }
        };
        let ldapi = dir.join("ldapi");
        if ldapi.as_os_str().len() >= 100 {
            bail!(
                "{} is too long for a unix socket path (must be < 100 bytes)",
                ldapi.display()
            );
        }
        if opts.dir.is_some() {
            stop_stale_instance(&dir);
            for name in ["slapd.d", "db-example", "db-other"] {
                remove_path(&dir.join(name))?;
            }
            for name in [
                "config.ldif",
                "example.ldif",
                "other.ldif",
                "slapd.log",
                "slapd.pid",
                "slapd.args",
                "ldapi",
            ] {
                remove_path(&dir.join(name))?;
            }
        }
        for name in ["slapd.d", "db-example", "db-other"] {
            fs::create_dir_all(dir.join(name))
                .with_context(|| format!("creating {}/{name}", dir.display()))?;
        }

        // cn=config, built offline.
        let config = dir.join("config.ldif");
        fs::write(&config, config_ldif(&dir, opts.nosync, opts.tls.as_ref()))
            .with_context(|| format!("writing {}", config.display()))?;
        let slapd_d = dir.join("slapd.d");
        run_tool(
            Command::new(SLAPADD)
                .arg("-n0")
                .arg("-F")
                .arg(&slapd_d)
                .arg("-l")
                .arg(&config),
        )?;

        // Sample data, loaded offline (`slapadd -q` with one tool thread,
        // olcToolThreads: 1: with two, a CI run saw slapadd fail on a fresh
        // database with MDB_KEYEXIST in id2entry).
        for (suffix, n, policy, file) in [
            (SUFFIX, opts.users, true, "example.ldif"),
            (OTHER_SUFFIX, opts.other_users, false, "other.ldif"),
        ] {
            if suffix == SUFFIX {
                if let Some(backup) = &opts.restore_example {
                    // data.mdb is a sparse file as large as olcDbMaxSize:
                    // cp keeps the holes, std::fs::copy may not.
                    run_tool(
                        Command::new("cp")
                            .arg("--sparse=always")
                            .arg(backup.join("data.mdb"))
                            .arg(dir.join("db-example").join("data.mdb")),
                    )
                    .context("restoring data.mdb")?;
                    continue;
                }
            }
            let path = dir.join(file);
            write_data_ldif(&path, suffix, n, policy)
                .with_context(|| format!("writing {}", path.display()))?;
            run_tool(
                Command::new(SLAPADD)
                    .arg("-q")
                    .arg("-F")
                    .arg(&slapd_d)
                    .arg("-b")
                    .arg(suffix)
                    .arg("-l")
                    .arg(&path),
            )?;
        }
        tracing::debug!(dir = %dir.display(), elapsed = ?t0.elapsed(), "slapd config and data ready");

        let mut slapd = Slapd {
            dir,
            ldapi,
            port: 0,
            ldaps_port: None,
            pid: 0,
            stats_log: opts.stats_log,
            users: opts.users,
            child: None,
            _tmp: tmp,
        };
        let mut last = None;
        for _ in 0..BIND_ATTEMPTS {
            let port = free_port()?;
            if opts.tls.is_some() {
                slapd.ldaps_port = Some(free_port()?);
            }
            match slapd.launch(port) {
                Ok(()) => {
                    tracing::debug!(pid = slapd.pid, port, elapsed = ?t0.elapsed(), "slapd started");
                    return Ok(slapd);
                }
                Err(LaunchError::AddrInUse(e)) => {
                    tracing::debug!(
                        port,
                        "slapd could not bind its port, retrying with another one"
                    );
                    last = Some(e);
                }
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "slapd could not bind a free port in {BIND_ATTEMPTS} attempts"
            )))
    }

    /// TCP port slapd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ldap://127.0.0.1:PORT` URL of the server.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// Loopback socket address of the server (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Path of the ldapi (unix domain) socket, `DIR/ldapi`.
    pub fn ldapi_path(&self) -> &Path {
        &self.ldapi
    }

    /// `ldaps://127.0.0.1:PORT` URL of the server (started with TLS).
    pub fn ldaps_url(&self) -> Option<String> {
        self.ldaps_port.map(|p| format!("ldaps://127.0.0.1:{p}"))
    }

    /// `ldapi://` URL of the server, with the socket path percent-encoded
    /// (`ldapi://%2Ftmp%2F...%2Fldapi`). Root may bind over it with
    /// `-Y EXTERNAL` and gets manage access on all databases and cn=config.
    pub fn ldapi_url(&self) -> String {
        format!(
            "ldapi://{}",
            percent_encode(self.ldapi.as_os_str().as_bytes())
        )
    }

    /// Directory holding the config, databases, socket and `slapd.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of slapd's output log, `DIR/slapd.log`.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("slapd.log")
    }

    /// Process id of the (most recently started) slapd.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether slapd is (still) running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Dumps a database as LDIF with `slapcat -F DIR/slapd.d -b SUFFIX`. Works
    /// while slapd is running (back-mdb readers don't block) and while it is
    /// stopped.
    pub fn slapcat(&self, suffix: &str) -> Result<String> {
        let out = Command::new(SLAPCAT)
            .arg("-F")
            .arg(self.dir.join("slapd.d"))
            .arg("-b")
            .arg(suffix)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {SLAPCAT}"))?;
        if !out.status.success() {
            bail!(
                "slapcat -b {suffix} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).context("slapcat output is not UTF-8")
    }

    /// Stops slapd: SIGTERM, wait up to 10 s for it to exit, then SIGKILL.
    /// Does nothing if it is not running; safe to call repeatedly.
    pub fn stop(&mut self) -> Result<()> {
        stop_child(&mut self.child, "slapd", TIMEOUT)
    }

    /// Kills slapd with SIGKILL immediately (no clean shutdown), for fault
    /// tests, and reaps it. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
            tracing::debug!(pid = self.pid, "slapd killed");
        }
    }

    /// Stops slapd, replaces `dc=example,dc=org` by another database with
    /// the same sample users (as a server rebuilt from scratch: every entry
    /// gets a new entryUUID), and starts it again on the same port.
    pub fn replace_example_data(&mut self) -> Result<()> {
        self.stop()?;
        let db = self.dir.join("db-example");
        remove_path(&db)?;
        fs::create_dir_all(&db).with_context(|| format!("creating {}", db.display()))?;
        let path = self.dir.join("example.ldif");
        write_data_ldif(&path, SUFFIX, self.users, true)
            .with_context(|| format!("writing {}", path.display()))?;
        run_tool(
            Command::new(SLAPADD)
                .arg("-q")
                .arg("-F")
                .arg(self.dir.join("slapd.d"))
                .arg("-b")
                .arg(SUFFIX)
                .arg("-l")
                .arg(&path),
        )?;
        self.restart()
    }

    /// Starts slapd again (stopping it first if it is running) on the same
    /// port, with the same configuration and data, and waits until it is
    /// ready. Retries a few times if the port is briefly unavailable.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let mut last = None;
        for attempt in 0..BIND_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match self.launch(self.port) {
                Ok(()) => {
                    tracing::debug!(pid = self.pid, port = self.port, "slapd restarted");
                    return Ok(());
                }
                Err(LaunchError::AddrInUse(e)) => last = Some(e),
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "slapd could not bind port {} in {BIND_ATTEMPTS} attempts",
                self.port
            )))
    }

    /// Spawns slapd on `port` and waits until it is ready.
    fn launch(&mut self, port: u16) -> std::result::Result<(), LaunchError> {
        let other = LaunchError::Other;
        let log_path = self.log_path();
        // A socket left by a killed slapd would fake readiness; slapd
        // recreates it.
        if let Err(e) = remove_path(&self.ldapi) {
            return Err(other(e));
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))
            .map_err(other)?;
        let _ = writeln!(
            log,
            "--- abproxy lab: starting slapd on 127.0.0.1:{port} ---"
        );
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .context("duplicating the log file handle")
            .map_err(other)?;

        let url = format!("ldap://127.0.0.1:{port}/");
        let child = Command::new(SLAPD)
            .arg("-d")
            // `-d` keeps slapd in the foreground. `none` rather than `0`: with
            // `-d 0` slapd logs nothing at all, not even why it failed to start.
            .arg(if self.stats_log { "stats" } else { "none" })
            .arg("-F")
            .arg(self.dir.join("slapd.d"))
            .arg("-h")
            .arg(match self.ldaps_url() {
                Some(ldaps) => format!("{url} {ldaps}/ {}", self.ldapi_url()),
                None => format!("{url} {}", self.ldapi_url()),
            })
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Like `setsid` in slapd-up.sh: a terminal's Ctrl-C goes to us,
            // and we stop slapd in Drop.
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {SLAPD}"))
            .map_err(other)?;
        self.pid = child.id();
        self.port = port;
        self.child = Some(child);

        let deadline = Instant::now() + TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    self.child = None;
                    let fresh = read_from(&log_path, offset);
                    let err = anyhow!(
                        "slapd exited during startup ({status}); tail of {}:\n{}",
                        log_path.display(),
                        log_tail(&log_path, 20, 8192)
                    );
                    let in_use = fresh.contains("Address already in use")
                        || fresh.contains("errno=98")
                        || TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err();
                    return Err(if in_use {
                        LaunchError::AddrInUse(err)
                    } else {
                        other(err)
                    });
                }
                Err(e) => return Err(other(anyhow!(e).context("checking slapd"))),
            }
            if self.ldapi.exists() && probe_ldap(port) && UnixStream::connect(&self.ldapi).is_ok() {
                // Still ours? (Another process could hold the port while
                // slapd is failing to bind it.)
                if let Ok(None) = self.child.as_mut().expect("child").try_wait() {
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(other(anyhow!(
                    "slapd did not become ready within {TIMEOUT:?}; tail of {}:\n{}",
                    log_path.display(),
                    log_tail(&log_path, 20, 8192)
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(pid = self.pid, "stopping slapd: {e:#}");
            self.kill();
        }
        // `_tmp` (if any) is removed after this.
    }
}

/// Stops a server run as our child: SIGTERM, wait up to `timeout` for it
/// to exit, then SIGKILL. Does nothing if there is none or it has exited.
pub(crate) fn stop_child(child: &mut Option<Child>, name: &str, timeout: Duration) -> Result<()> {
    let Some(mut child) = child.take() else {
        return Ok(());
    };
    if child
        .try_wait()
        .with_context(|| format!("checking {name}"))?
        .is_some()
    {
        return Ok(());
    }
    let pid = child.id();
    // The child has not been reaped, so its pid cannot have been reused.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child
            .try_wait()
            .with_context(|| format!("waiting for {name}"))?
            .is_some()
        {
            tracing::debug!(pid, "{name} stopped");
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!(
        pid,
        "{name} ignored SIGTERM for {timeout:?}; sending SIGKILL"
    );
    child.kill().with_context(|| format!("killing {name}"))?;
    child
        .wait()
        .with_context(|| format!("waiting for {name}"))?;
    Ok(())
}

/// A loopback TCP port that was free a moment ago, for a server started
/// later on it.
///
/// Taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`) when there is room: a port the kernel
/// hands out for `bind(0)` is also one it gives outgoing connections as
/// their source port, and a busy test run (clients of other servers) can
/// take it between this check and the server's own bind; 389-ds then dies
/// after detaching with nothing but a missing pid file to show. Candidates
/// are spread by process id and a per-process counter so that parallel
/// tests and test binaries do not try the same ones, and a port given out
/// once is not given out again by this process.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = ephemeral_low().unwrap_or(0);
    if high > LOW + 1_000 {
        let span = high - LOW;
        let seed = std::process::id().wrapping_mul(2_654_435_761);
        for _ in 0..span.min(2_000) {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            // 7919 is a prime that does not divide the span: successive
            // candidates walk all of it before one comes back.
            let port = LOW + (seed.wrapping_add(k.wrapping_mul(7_919))) % span;
            let port = port as u16;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> Option<u32> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Anonymous LDAPv3 simple bind over TCP; true if a BindResponse comes back.
pub(crate) fn probe_ldap(port: u16) -> bool {
    // SEQUENCE { messageID 1, [APPLICATION 0] { version 3, name "", simple "" } }
    const BIND: [u8; 14] = [
        0x30, 0x0c, 0x02, 0x01, 0x01, 0x60, 0x07, 0x02, 0x01, 0x03, 0x04, 0x00, 0x80, 0x00,
    ];
    // SEQUENCE { messageID 2, [APPLICATION 2] NULL }
    const UNBIND: [u8; 7] = [0x30, 0x05, 0x02, 0x01, 0x02, 0x42, 0x00];
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(&BIND).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    // Expect 30 0c 02 01 01 61 ... (BindResponse for message 1).
    while n < 6 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    let ok = buf[0] == 0x30 && buf[5] == 0x61;
    let _ = s.write_all(&UNBIND);
    ok
}

/// Runs a setup tool (slapadd), failing with its output if it fails.
fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Removes a file, socket or directory tree if it exists.
fn remove_path(p: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(p) {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    };
    match res {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow!(e).context(format!("removing {}", p.display())))
        }
        _ => Ok(()),
    }
}

/// Stops a slapd left running in `dir` (as slapd-down.sh does), found by
/// `dir/slapd.pid`; only if that process is a slapd using `dir/slapd.d`.
fn stop_stale_instance(dir: &Path) {
    let Ok(text) = fs::read_to_string(dir.join("slapd.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<libc::pid_t>() else {
        return;
    };
    if pid <= 1 {
        return;
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let conf = dir.join("slapd.d");
    let conf = conf.as_os_str().as_bytes();
    if !comm.contains("slapd") || !cmdline.windows(conf.len()).any(|w| w == conf) {
        return;
    }
    tracing::info!(pid, dir = %dir.display(), "stopping a slapd left running in the lab directory");
    // A zombie (exited, not yet reaped by its parent) counts as stopped.
    let alive = || {
        // SAFETY: kill(2) with signal 0 only checks for existence.
        let exists = unsafe { libc::kill(pid, 0) } == 0;
        exists
            && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
    };
    // SAFETY: kill(2) on a pid verified above to be a slapd of this directory.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + TIMEOUT;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    if alive() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }
}

/// The file from byte `offset` on (lossy, for error classification).
pub(crate) fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `lines` lines (at most `max_bytes`) of a log.
pub(crate) fn log_tail(path: &Path, lines: usize, max_bytes: u64) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let text = read_from(path, len.saturating_sub(max_bytes));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

/// The cn=config LDIF of slapd-up.sh (plaintext root passwords).
fn config_ldif(dir: &Path, nosync: bool, tls: Option<&SlapdTls>) -> String {
    let d = dir.display();
    let nosync = if nosync { "TRUE" } else { "FALSE" };
    let tls = match tls {
        Some(t) => format!(
            "olcTLSCertificateFile: {}\nolcTLSCertificateKeyFile: {}\nolcTLSCACertificateFile: {}\n\
             olcTLSVerifyClient: try\n",
            t.cert_file.display(),
            t.key_file.display(),
            t.ca_file.display()
        ),
        None => String::new(),
    };
    let mut s = format!(
        "dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {d}/slapd.pid
olcArgsFile: {d}/slapd.args
olcLogLevel: none
olcToolThreads: 1
{tls}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: {{0}}back_mdb
olcModuleLoad: {{1}}syncprov
olcModuleLoad: {{2}}sssvlv
olcModuleLoad: {{3}}ppolicy

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif

include: file:///etc/ldap/schema/cosine.ldif

include: file:///etc/ldap/schema/nis.ldif

include: file:///etc/ldap/schema/inetorgperson.ldif

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcAccess: {{0}}to * by {ROOTCRED} manage by * break
olcAccess: {{1}}to dn.exact=\"\" by * read
olcAccess: {{2}}to dn.base=\"cn=Subschema\" by * read

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcRootDN: {CONFIG_ADMIN_DN}
olcRootPW: {ADMIN_PW}
olcAccess: {{0}}to * by {ROOTCRED} manage by * break

"
    );
    let mdb_db = |s: &mut String, idx: u32, suffix: &str, dbdir: &str| {
        let _ = write!(
            s,
            "dn: olcDatabase={{{idx}}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{{idx}}}mdb
olcSuffix: {suffix}
olcRootDN: cn=admin,{suffix}
olcRootPW: {ADMIN_PW}
olcDbDirectory: {d}/{dbdir}
olcDbMaxSize: 4294967296
olcDbNoSync: {nosync}
olcDbIndex: objectClass eq
olcDbIndex: uid,uidNumber,gidNumber eq
olcDbIndex: cn,sn,mail eq,sub
olcDbIndex: member eq
olcDbIndex: entryCSN,entryUUID eq
olcAccess: {{0}}to * by {ROOTCRED} manage by * break
olcAccess: {{1}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{2}}to * by self write by * read

dn: olcOverlay={{0}}syncprov,olcDatabase={{{idx}}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: {{0}}syncprov
olcSpCheckpoint: 100 10
olcSpSessionlog: 10000

dn: olcOverlay={{1}}sssvlv,olcDatabase={{{idx}}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSssVlvConfig
olcOverlay: {{1}}sssvlv

"
        );
    };
    mdb_db(&mut s, 1, SUFFIX, "db-example");
    let _ = write!(
        s,
        "dn: olcOverlay={{2}}ppolicy,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{2}}ppolicy
olcPPolicyDefault: cn=default,ou=policies,{SUFFIX}
olcPPolicyHashCleartext: TRUE

"
    );
    mdb_db(&mut s, 2, OTHER_SUFFIX, "db-other");
    s
}

/// Writes the sample data of gen-ldif.sh (plaintext `passK` passwords).
fn write_data_ldif(path: &Path, suffix: &str, n: usize, policy: bool) -> std::io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    write_data(&mut w, suffix, n, policy)?;
    w.flush()
}

/// Sample data: `suffix`, ou=people, ou=groups, `n` users, groups of ~100
/// members, cn=admins (user1), and with `policy` ou=policies + cn=default.
pub(crate) fn write_data(
    w: &mut impl Write,
    suffix: &str,
    n: usize,
    policy: bool,
) -> std::io::Result<()> {
    let dc = suffix
        .split(',')
        .next()
        .and_then(|r| r.split_once('='))
        .map_or(suffix, |(_, v)| v);
    write!(w, "dn: {suffix}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\ndc: {dc}\no: {dc}\n\n")?;
    let ous: &[&str] = if policy {
        &["people", "groups", "policies"]
    } else {
        &["people", "groups"]
    };
    for ou in ous {
        write!(
            w,
            "dn: ou={ou},{suffix}\nobjectClass: top\nobjectClass: organizationalUnit\nou: {ou}\n\n"
        )?;
    }
    if policy {
        write!(
            w,
            "dn: cn=default,ou=policies,{suffix}\nobjectClass: device\nobjectClass: pwdPolicy\n\
             cn: default\npwdAttribute: userPassword\npwdMaxFailure: 0\npwdLockout: FALSE\n\
             pwdAllowUserChange: TRUE\n\n"
        )?;
    }
    for k in 1..=n {
        write!(
            w,
            "dn: uid=user{k},ou=people,{suffix}\nobjectClass: top\nobjectClass: person\n\
             objectClass: organizationalPerson\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n\
             uid: user{k}\ncn: User {k}\nsn: User{k}\ngivenName: Test\nmail: user{k}@{dc}.org\n\
             uidNumber: {}\ngidNumber: 10000\nhomeDirectory: /home/user{k}\n\
             loginShell: /bin/bash\ndescription: initial\nuserPassword: pass{k}\n\n",
            10000 + k
        )?;
    }
    for g in 1..=n.div_ceil(100).max(1) {
        write!(w, "dn: cn=group{g},ou=groups,{suffix}\nobjectClass: top\nobjectClass: groupOfNames\ncn: group{g}\n")?;
        let (first, last) = ((g - 1) * 100 + 1, n.min(g * 100));
        if first > last {
            // groupOfNames needs a member.
            writeln!(w, "member: uid=user1,ou=people,{suffix}")?;
        }
        for m in first..=last {
            writeln!(w, "member: uid=user{m},ou=people,{suffix}")?;
        }
        writeln!(w)?;
    }
    write!(
        w,
        "dn: cn=admins,ou=groups,{suffix}\nobjectClass: top\nobjectClass: groupOfNames\ncn: admins\n\
         member: uid=user1,ou=people,{suffix}\n\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ldif_shape() {
        let mut v = Vec::new();
        write_data(&mut v, OTHER_SUFFIX, 0, false).unwrap();
        let s = String::from_utf8(v).unwrap();
        assert!(s.starts_with("dn: dc=other,dc=org\n"));
        assert!(s.contains("dc: other\n"));
        assert!(s.contains("cn: group1\nmember: uid=user1,ou=people,dc=other,dc=org\n\n"));
        assert!(!s.contains("ou=policies"));
        assert_eq!(percent_encode(b"/tmp/a b/ldapi"), "%2Ftmp%2Fa%20b%2Fldapi");
    }

    #[test]
    fn slapd_lab_end_to_end() {
        let mut slapd = Slapd::start(SlapdOptions {
            users: 50,
            ..Default::default()
        })
        .expect("start slapd");
        let url = slapd.url();
        assert!(slapd.ldapi_url().starts_with("ldapi://%2Ftmp%2F"));

        let out = Command::new("ldapsearch")
            .args(["-x", "-LLL", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW])
            .args([
                "-b",
                "ou=people,dc=example,dc=org",
                "(objectClass=inetOrgPerson)",
                "1.1",
            ])
            .output()
            .expect("run ldapsearch (apt-get install -y ldap-utils)");
        assert!(
            out.status.success(),
            "ldapsearch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dns = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("dn:"))
            .count();
        assert_eq!(dns, 50);

        let out = Command::new("ldapwhoami")
            .args(["-x", "-H", &url, "-D", &user_dn(1), "-w", &user_pw(1)])
            .output()
            .expect("run ldapwhoami");
        assert!(
            out.status.success(),
            "ldapwhoami: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("uid=user1,ou=people,dc=example,dc=org")
        );

        let dump = slapd.slapcat(SUFFIX).expect("slapcat");
        assert!(dump.contains("uid=user50,ou=people,dc=example,dc=org"));

        let addr = slapd.addr();
        slapd.stop().expect("stop");
        slapd.stop().expect("second stop is a no-op");
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "port still open after stop"
        );
    }
}
