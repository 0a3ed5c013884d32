//! Throwaway 389 Directory Server instances for integration tests, the
//! counterpart of [`crate::slapd`] (OpenLDAP).
//!
//! [`Ds389::start`] creates a complete, private instance `slapd-NAME` of
//! Debian's `389-ds-base` (2.3) from scratch, without systemd:
//!
//! * Debian's `dscreate` always calls `systemctl`, so the instance is created
//!   by driving lib389's `SetupDs` from Debian's python (`/usr/bin/python3`,
//!   where lib389 lives) with systemd forced off. Its `dse.ldif` carries
//!   `nsslapd-listenhost: 127.0.0.1` from the start, so the server never
//!   listens on anything but loopback (and its ldapi socket), not even during
//!   the install;
//! * backends `userroot` ([`SUFFIX`]) and `otherroot` ([`OTHER_SUFFIX`]),
//!   loaded offline with `ns-slapd ldif2db` with the same sample data as the
//!   OpenLDAP lab (plus ACIs: anyone reads everything but `userPassword`,
//!   users write their own entry);
//! * `ns-slapd -d 0` then runs in the foreground as a child process of the
//!   caller, on `ldap://127.0.0.1:PORT` (a free port) and
//!   `ldapi:///run/slapd-NAME.socket`, where root autobinds (SASL EXTERNAL)
//!   as `cn=Directory Manager`.
//!
//! With [`Ds389Options::tls`] (a [`TestCa`]), the CA and a server
//! certificate it issues for `localhost` and `127.0.0.1` are imported into
//! the instance's NSS database with `dsctl NAME tls import-ca` and
//! `dsctl NAME tls import-server-key-cert`, and `cn=config` gets
//! `nsslapd-security: on`, `nsslapd-securePort` (a second free port) and
//! `nsslapd-securelistenhost: 127.0.0.1` before the first start: LDAPS on
//! [`Ds389::ldaps_url`], StartTLS on the plain port.
//!
//! The instance's files live where 389-ds puts them (`/etc/dirsrv/slapd-NAME`,
//! `/var/lib/dirsrv/slapd-NAME`, `/var/log/dirsrv/slapd-NAME`, ...), which
//! needs root. NAME is `abp<pid>-<random>`, unique per instance; dropping the
//! [`Ds389`] stops ns-slapd and removes every file of the instance. Instances
//! left behind by a process that died without dropping them (SIGKILL) are
//! removed by the next [`Ds389::start`].
//!
//! [`Ds389::dsconf`] and [`Ds389::dsctl`] run lib389's tools for the
//! instance (online export and backup tasks; `bak2db` once
//! [`Ds389::stop`]ped, then [`Ds389::restart`]).
//!
//! Credentials: [`DM_DN`] / [`DM_PW`], and the sample users
//! [`user_dn`]`(k)` / [`user_pw`]`(k)` for `k` in `1..=users` (their
//! passwords are stored as given: 389 compares a value without a `{SCHEME}`
//! prefix as clear text).
//!
//! 389 defaults that differ from slapd: password changes need TLS
//! ("Confidentiality required", 13), the anonymous size limit is 2000,
//! server-side sort works without an ordering rule, and the content sync
//! plugin is off.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::ca::TestCa;
use crate::slapd::{free_port, log_tail, probe_ldap, read_from, stop_child};
pub use crate::slapd::{other_user_dn, user_dn, user_pw, OTHER_SUFFIX, SUFFIX};

/// Path of the 389-ds server binary (Debian package `389-ds-base`).
pub const NS_SLAPD: &str = "/usr/sbin/ns-slapd";
/// The python that has lib389 (Debian package `python3-lib389`, a dependency
/// of `389-ds-base`); not whatever `python3` is first in `PATH`.
pub const PYTHON: &str = "/usr/bin/python3";
/// Where Debian installs lib389.
const LIB389: &str = "/usr/lib/python3/dist-packages/lib389/__init__.py";
/// lib389's command-line tools (Debian package `389-ds-base`): `dsconf`
/// talks to a running instance (over its ldapi socket, where root
/// autobinds), `dsctl` works on its files.
pub const DSCONF: &str = "/usr/sbin/dsconf";
/// See [`DSCONF`].
pub const DSCTL: &str = "/usr/sbin/dsctl";
/// The root DN.
pub const DM_DN: &str = "cn=Directory Manager";
/// Password of [`DM_DN`].
pub const DM_PW: &str = "secret";
/// Backend (ldbm instance) of [`SUFFIX`].
pub const USERROOT: &str = "userroot";
/// Backend (ldbm instance) of [`OTHER_SUFFIX`].
pub const OTHERROOT: &str = "otherroot";

/// Prefix of instance names (`abp<pid>-<16 hex digits>`).
const NAME_PREFIX: &str = "abp";
const INSTALL_HINT: &str = "install 389 Directory Server with `apt-get install -y 389-ds-base`";
/// Readiness / shutdown polling interval.
const POLL: Duration = Duration::from_millis(20);
/// How long ns-slapd may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long ns-slapd may take to stop on SIGTERM (it flushes its caches).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit of the instance creation and of each setup tool (imports:
/// [`import_limit`]).
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);
/// Time limit of importing `users` entries with `ns-slapd ldif2db`:
/// [`TOOL_TIMEOUT`] plus 6 ms an entry (389's import of 100,000 sample
/// users takes about 6 minutes on a loaded two-core machine, mostly
/// waiting on its transaction log).
fn import_limit(users: usize) -> Duration {
    TOOL_TIMEOUT + Duration::from_millis(6 * users as u64)
}

/// How many ports to try (creation and start).
const BIND_ATTEMPTS: usize = 5;

/// Creates the instance with lib389 (argv: NAME PORT INF_PATH ROOT_DN
/// ROOT_PW SUFFIX OTHER_SUFFIX; it writes the install options to INF_PATH);
/// lib389 removes a failed install itself.
const SETUP_PY: &str = r#"
import base64, hashlib, io, logging, os, sys
import lib389.paths
# dscreate's code path always calls `systemctl`: start ns-slapd directly.
lib389.paths.Paths.with_systemd = property(lambda self: False)
import lib389.instance.setup as setup_mod
from lib389.instance.setup import SetupDs

name, port, inf_path, root_dn, root_clear, suffix, other_suffix = sys.argv[1:8]
# Given pre-hashed: lib389 refuses a clear-text root password under 8 characters.
salt = os.urandom(8)
root_pw = "{SSHA}" + base64.b64encode(hashlib.sha1(root_clear.encode() + salt).digest() + salt).decode()
with open(inf_path, "w") as f:
    f.write(f"""[general]
full_machine_name = localhost
start = False
strict_host_checking = False
selinux = False
systemd = False
[slapd]
instance_name = {name}
port = {port}
self_sign_cert = False
root_dn = {root_dn}
root_password = {root_pw}
[backend-userroot]
suffix = {suffix}
[backend-otherroot]
suffix = {other_suffix}
""")

# Loopback only, from the first start on: add nsslapd-listenhost to the
# dse.ldif template as SetupDs reads it.
_open = open
def _open_template(path, *args, **kwargs):
    if str(path).endswith("template-dse.ldif"):
        with _open(path, *args, **kwargs) as t:
            text = t.read()
        marker = "nsslapd-port: %ds_port%\n"
        if marker not in text:
            sys.exit("template-dse.ldif has no 'nsslapd-port: %ds_port%' line")
        return io.StringIO(text.replace(marker, marker + "nsslapd-listenhost: 127.0.0.1\n", 1))
    return _open(path, *args, **kwargs)
setup_mod.open = _open_template

# A failed install is removed with its logs: show ns-slapd's error log
# first (a port taken after the check says so only there).
_remove = SetupDs._remove_failed_install
def _remove_failed_install(self, serverid):
    try:
        with _open(f"/var/log/dirsrv/slapd-{serverid}/errors") as log:
            for line in log.readlines()[-20:]:
                print(f"ns-slapd: {line.rstrip()}", file=sys.stderr)
    except OSError as e:
        print(f"ns-slapd: no error log ({e})", file=sys.stderr)
    return _remove(self, serverid)
SetupDs._remove_failed_install = _remove_failed_install

logging.basicConfig(level=logging.INFO, format="dscreate: %(message)s")
try:
    ok = SetupDs(verbose=False, dryrun=False, log=logging.getLogger("dscreate")).create_from_inf(inf_path)
except Exception as e:
    print(f"dscreate: {e}", file=sys.stderr)
    ok = False
sys.exit(0 if ok else 1)
"#;

/// Whether 389 Directory Server can run here: its binary and lib389 are
/// installed and this process is root (instances live under `/etc/dirsrv`).
/// The error says what is missing, in one line, for a test to give
/// [`crate::skip`].
pub fn available() -> std::result::Result<(), String> {
    for (path, what) in [
        (NS_SLAPD, "ns-slapd"),
        (PYTHON, "python3"),
        (LIB389, "lib389"),
    ] {
        if !Path::new(path).exists() {
            return Err(format!(
                "389-ds unavailable: {what} ({path}) not found; {INSTALL_HINT}"
            ));
        }
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "389-ds unavailable: instances need root (files under /etc/dirsrv, /var/lib/dirsrv)"
                .into(),
        );
    }
    Ok(())
}

/// How to build a [`Ds389`].
#[derive(Debug, Clone)]
pub struct Ds389Options {
    /// Number of sample users in `dc=example,dc=org` (default 100).
    pub users: usize,
    /// Number of sample users in `dc=other,dc=org` (default 10).
    pub other_users: usize,
    /// With a CA: TLS on, with a certificate for `localhost` and `127.0.0.1`
    /// issued by it, LDAPS on a second free loopback port
    /// ([`Ds389::ldaps_url`]); StartTLS on the plain port too (default
    /// none).
    pub tls: Option<TestCa>,
}

impl Default for Ds389Options {
    fn default() -> Self {
        Ds389Options {
            users: 100,
            other_users: 10,
            tls: None,
        }
    }
}

/// A running throwaway 389-ds instance; ns-slapd is a child process of this
/// one.
///
/// Stopped, and the instance removed, on drop.
#[derive(Debug)]
pub struct Ds389 {
    name: String,
    port: u16,
    /// LDAPS port, 0 without TLS.
    secure_port: u16,
    ldapi: PathBuf,
    pid: u32,
    child: Option<Child>,
}

/// Why a step failed.
enum StepError {
    /// The TCP port was taken (or the install's server never started):
    /// worth retrying with another port.
    Retry(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StepError {
    fn from(e: anyhow::Error) -> Self {
        StepError::Other(e)
    }
}

impl Ds389 {
    /// Creates the instance, imports the sample data, starts ns-slapd on a
    /// free loopback port and waits until it answers LDAP on TCP and on its
    /// ldapi socket.
    ///
    /// Takes several seconds (lib389 starts and stops the server during the
    /// install). Fails if 389-ds cannot run here ([`available`]), if a setup
    /// step fails (the error carries its output), or if ns-slapd exits or
    /// does not become ready within 60 s (with the tail of its error log). A
    /// port that turns out to be taken is replaced, up to 5 times. Whatever
    /// was created is removed on failure.
    ///
    /// Blocking: from async code, call it in `spawn_blocking`.
    pub fn start(opts: Ds389Options) -> Result<Ds389> {
        available().map_err(|e| anyhow!(e))?;
        remove_stale_instances();
        let t0 = Instant::now();
        let name = unique_name();
        let mut ds = Ds389 {
            ldapi: PathBuf::from(format!("/run/slapd-{name}.socket")),
            name,
            port: 0,
            secure_port: 0,
            pid: 0,
            child: None,
        };
        // From here on, dropping `ds` (on any error) removes the instance.
        let work = tempfile::Builder::new()
            .prefix("abp-ds389-")
            .tempdir()
            .context("creating a temporary directory")?;

        let mut last = None;
        for _ in 0..BIND_ATTEMPTS {
            let port = free_port()?;
            match ds.create(port, work.path()) {
                Ok(()) => {
                    ds.port = port;
                    break;
                }
                Err(StepError::Retry(e)) => {
                    tracing::debug!(port, "389-ds could not bind its port during the install, retrying with another one");
                    remove_instance_files(&ds.name);
                    last = Some(e);
                }
                Err(StepError::Other(e)) => return Err(e),
            }
        }
        if ds.port == 0 {
            return Err(last
                .unwrap_or_else(|| anyhow!("no attempt made"))
                .context(format!(
                    "389-ds could not bind a free port in {BIND_ATTEMPTS} attempts"
                )));
        }
        if let Some(p) = dse_value(&ds.conf_dir().join("dse.ldif"), "nsslapd-ldapifilepath") {
            ds.ldapi = PathBuf::from(p);
        }
        let t1 = Instant::now();
        ds.import(&opts, work.path())?;
        if let Some(ca) = &opts.tls {
            ds.setup_tls(ca)?;
        }
        let t2 = Instant::now();

        let mut last = None;
        for attempt in 0..BIND_ATTEMPTS {
            if attempt > 0 {
                let port = free_port()?;
                ds.set_port(port)?;
                if ds.secure_port != 0 {
                    let port = free_port()?;
                    ds.set_secure_port(port)?;
                }
            }
            match ds.launch() {
                Ok(()) => {
                    tracing::debug!(
                        name = %ds.name,
                        port = ds.port,
                        create = ?(t1 - t0),
                        import = ?(t2 - t1),
                        start = ?t2.elapsed(),
                        "389-ds instance ready"
                    );
                    return Ok(ds);
                }
                Err(StepError::Retry(e)) => {
                    tracing::debug!(
                        port = ds.port,
                        "ns-slapd could not bind its port, retrying with another one"
                    );
                    last = Some(e);
                }
                Err(StepError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "ns-slapd could not bind a free port in {BIND_ATTEMPTS} attempts"
            )))
    }

    /// The instance name (`slapd-NAME` is what 389-ds tools call it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP port ns-slapd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ldap://127.0.0.1:PORT` URL of the server.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:PORT` URL of the server's LDAPS port (its
    /// certificate names `localhost` and `127.0.0.1`); `None` unless
    /// started with [`Ds389Options::tls`].
    pub fn ldaps_url(&self) -> Option<String> {
        (self.secure_port != 0).then(|| format!("ldaps://127.0.0.1:{}", self.secure_port))
    }

    /// Loopback socket address of the server (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Path of the ldapi socket (`/run/slapd-NAME.socket`).
    pub fn ldapi_path(&self) -> &Path {
        &self.ldapi
    }

    /// `ldapi://` URL of the server, the socket path percent-encoded. Root
    /// binding with SASL EXTERNAL over it is `cn=Directory Manager`.
    pub fn ldapi_url(&self) -> String {
        let mut s = String::from("ldapi://");
        for &b in self.ldapi.as_os_str().as_encoded_bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                s.push(b as char);
            } else {
                let _ = write!(s, "%{b:02X}");
            }
        }
        s
    }

    /// The instance's configuration directory (`/etc/dirsrv/slapd-NAME`,
    /// with `dse.ldif`).
    pub fn conf_dir(&self) -> PathBuf {
        PathBuf::from(format!("/etc/dirsrv/slapd-{}", self.name))
    }

    /// The instance's database directory (`/var/lib/dirsrv/slapd-NAME/db`).
    pub fn db_dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/lib/dirsrv/slapd-{}/db", self.name))
    }

    /// ns-slapd's error log (`/var/log/dirsrv/slapd-NAME/errors`).
    pub fn errors_log_path(&self) -> PathBuf {
        self.log_dir().join("errors")
    }

    /// ns-slapd's access log (`/var/log/dirsrv/slapd-NAME/access`; buffered
    /// by the server, so it lags).
    pub fn access_log_path(&self) -> PathBuf {
        self.log_dir().join("access")
    }

    /// Process id of the (most recently started) ns-slapd.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether ns-slapd is (still) running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops ns-slapd: SIGTERM, wait up to 30 s for it to exit, then SIGKILL.
    /// Does nothing if it is not running; safe to call repeatedly. The
    /// instance stays (see [`Ds389::restart`]).
    pub fn stop(&mut self) -> Result<()> {
        stop_child(&mut self.child, "ns-slapd", STOP_TIMEOUT)
    }

    /// Starts ns-slapd again (stopping it first if it is running) on the
    /// same port, and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let mut last = None;
        for attempt in 0..BIND_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(StepError::Retry(e)) => last = Some(e),
                Err(StepError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "ns-slapd could not bind port {} in {BIND_ATTEMPTS} attempts",
                self.port
            )))
    }

    /// `/var/lib/dirsrv/slapd-NAME/ldif`, where ns-slapd (running as
    /// `dirsrv`) may write LDIF exports.
    pub fn ldif_dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/lib/dirsrv/slapd-{}/ldif", self.name))
    }

    /// `/var/lib/dirsrv/slapd-NAME/bak`, where ns-slapd may write backups.
    pub fn bak_dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/lib/dirsrv/slapd-{}/bak", self.name))
    }

    /// Runs `dsconf NAME ARGS...` against the running instance (root
    /// autobinds as Directory Manager over ldapi), e.g. `backend export` or
    /// `backup create`, which start a task in `cn=tasks,cn=config` and wait
    /// for its exit code. Returns the tool's output; fails with it when the
    /// tool fails or takes more than 3 minutes.
    ///
    /// Blocking: from async code, call it in `spawn_blocking`.
    pub fn dsconf(&self, args: &[&str]) -> Result<String> {
        self.lib389_tool(DSCONF, args)
    }

    /// Runs `dsctl NAME ARGS...`, e.g. `bak2db DIR` on a stopped instance
    /// ([`Ds389::stop`] first, [`Ds389::restart`] after). `dsctl` asks
    /// systemd whether the instance runs, which fails here (no systemd) and
    /// reads as "not running": do not use it on a running instance. Returns
    /// the tool's output, as [`Ds389::dsconf`].
    pub fn dsctl(&self, args: &[&str]) -> Result<String> {
        self.lib389_tool(DSCTL, args)
    }

    fn lib389_tool(&self, tool: &str, args: &[&str]) -> Result<String> {
        let log = tempfile::NamedTempFile::new().context("creating a temporary file")?;
        let mut cmd = Command::new(tool);
        cmd.arg(&self.name)
            .args(args)
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env_remove("PYTHONSTARTUP")
            .env_remove("PYTHONUSERBASE")
            .env("PYTHONNOUSERSITE", "1");
        let result = run_tool(&mut cmd, log.path(), TOOL_TIMEOUT);
        let out = fs::read_to_string(log.path()).unwrap_or_default();
        result.map(|()| out)
    }

    fn log_dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/dirsrv/slapd-{}", self.name))
    }

    fn pid_file(&self) -> PathBuf {
        PathBuf::from(format!("/run/dirsrv/slapd-{}.pid", self.name))
    }

    /// Creates the instance with lib389 on `port` (stopped afterwards).
    fn create(&self, port: u16, work: &Path) -> std::result::Result<(), StepError> {
        let script = work.join("setup.py");
        fs::write(&script, SETUP_PY).with_context(|| format!("writing {}", script.display()))?;
        let log = work.join("setup.log");
        let mut cmd = Command::new(PYTHON);
        cmd.arg(&script)
            .arg(&self.name)
            .arg(port.to_string())
            .arg(work.join("ds.inf"))
            .args([DM_DN, DM_PW, SUFFIX, OTHER_SUFFIX])
            // Debian's python with its own dist-packages, nothing else.
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env_remove("PYTHONSTARTUP")
            .env_remove("PYTHONUSERBASE")
            .env("PYTHONNOUSERSITE", "1")
            .current_dir(work);
        match run_tool(&mut cmd, &log, TOOL_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(e) => {
                let text = fs::read_to_string(&log).unwrap_or_default();
                if addr_in_use(&text) {
                    Err(StepError::Retry(e))
                } else if text.contains("Unable to find pid") {
                    // ns-slapd detached and then never wrote its pid file;
                    // the error log printed above the failure says why.
                    // Seen once on a loaded CI machine: worth another try
                    // (a fresh port), with the reason kept in the output.
                    eprintln!("389-ds did not start during the install, retrying:\n{text}");
                    Err(StepError::Retry(e))
                } else {
                    Err(StepError::Other(
                        e.context("creating the 389-ds instance with lib389"),
                    ))
                }
            }
        }
    }

    /// Loads the sample data into both backends with `ns-slapd ldif2db`
    /// (the server is stopped).
    fn import(&self, opts: &Ds389Options, work: &Path) -> Result<()> {
        let ldif_dir = self.ldif_dir();
        let owner =
            fs::metadata(&ldif_dir).with_context(|| format!("reading {}", ldif_dir.display()))?;
        for (backend, suffix, n, file) in [
            (USERROOT, SUFFIX, opts.users, "example.ldif"),
            (OTHERROOT, OTHER_SUFFIX, opts.other_users, "other.ldif"),
        ] {
            let path = ldif_dir.join(file);
            fs::write(&path, data_ldif(suffix, n)?)
                .with_context(|| format!("writing {}", path.display()))?;
            // ns-slapd reads it as the instance's user.
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))
                .with_context(|| format!("chown {}", path.display()))?;
            run_tool(
                Command::new(NS_SLAPD)
                    .arg("ldif2db")
                    .arg("-D")
                    .arg(self.conf_dir())
                    .arg("-n")
                    .arg(backend)
                    .arg("-i")
                    .arg(&path),
                &work.join(format!("import-{backend}.log")),
                import_limit(n),
            )
            .with_context(|| format!("importing {suffix} into backend {backend}"))?;
        }
        Ok(())
    }

    /// Writes a new port into dse.ldif (ns-slapd stopped).
    fn set_port(&mut self, port: u16) -> Result<()> {
        let path = self.conf_dir().join("dse.ldif");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let old = format!("\nnsslapd-port: {}\n", self.port);
        if !text.contains(&old) {
            bail!("{} has no line {:?}", path.display(), old.trim());
        }
        let text = text.replacen(&old, &format!("\nnsslapd-port: {port}\n"), 1);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.port = port;
        Ok(())
    }

    /// Writes a new LDAPS port into dse.ldif (ns-slapd stopped).
    fn set_secure_port(&mut self, port: u16) -> Result<()> {
        let path = self.conf_dir().join("dse.ldif");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let text = set_config_attr(&text, "nsslapd-securePort", &port.to_string())?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.secure_port = port;
        Ok(())
    }

    /// Imports `ca` and a server certificate and key issued by it (for
    /// `localhost` and `127.0.0.1`) into the instance's NSS database with
    /// `dsctl NAME tls import-ca` / `import-server-key-cert`, and turns
    /// security on, with LDAPS on a free port on 127.0.0.1 only (ns-slapd
    /// stopped).
    fn setup_tls(&mut self, ca: &TestCa) -> Result<()> {
        let (cert, key) = ca
            .server(&format!("ds389-{}", self.name))
            .context("issuing the 389-ds server certificate")?;
        let ca_file = ca.ca_file();
        let ca_file = ca_file.to_str().context("CA path is not UTF-8")?;
        self.dsctl(&["tls", "import-ca", ca_file, "abproxy test CA"])
            .context("importing the test CA into the instance's NSS database")?;
        self.dsctl(&[
            "tls",
            "import-server-key-cert",
            cert.to_str().context("certificate path is not UTF-8")?,
            key.to_str().context("key path is not UTF-8")?,
        ])
        .context("importing the server certificate and key into the instance's NSS database")?;
        let path = self.conf_dir().join("dse.ldif");
        let mut text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let port = free_port()?;
        for (attr, value) in [
            ("nsslapd-security", "on"),
            ("nsslapd-securelistenhost", "127.0.0.1"),
            ("nsslapd-securePort", &port.to_string()),
        ] {
            text = set_config_attr(&text, attr, value)?;
        }
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.secure_port = port;
        Ok(())
    }

    /// Spawns ns-slapd in the foreground and waits until it is ready.
    fn launch(&mut self) -> std::result::Result<(), StepError> {
        let errors = self.errors_log_path();
        let offset = fs::metadata(&errors).map(|m| m.len()).unwrap_or(0);
        // A socket left by a killed server would fake readiness.
        let _ = fs::remove_file(&self.ldapi);
        let out_path = self.log_dir().join("ns-slapd.out");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .with_context(|| format!("opening {}", out_path.display()))?;
        let out_err = out.try_clone().context("duplicating a file handle")?;
        let child = Command::new(NS_SLAPD)
            .arg("-D")
            .arg(self.conf_dir())
            .arg("-i")
            .arg(self.pid_file())
            // Any -d keeps ns-slapd in the foreground; 0 adds no logging.
            .arg("-d")
            .arg("0")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(out_err)
            // A terminal's Ctrl-C goes to us; we stop it in Drop.
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {NS_SLAPD}"))?;
        self.pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    self.child = None;
                    let fresh = read_from(&errors, offset) + &read_from(&out_path, 0);
                    let err = anyhow!(
                        "ns-slapd exited during startup ({status}); tail of {}:\n{}",
                        errors.display(),
                        log_tail(&errors, 30, 16384)
                    );
                    let in_use = addr_in_use(&fresh)
                        || TcpListener::bind((Ipv4Addr::LOCALHOST, self.port)).is_err()
                        || (self.secure_port != 0
                            && TcpListener::bind((Ipv4Addr::LOCALHOST, self.secure_port)).is_err());
                    return Err(if in_use {
                        StepError::Retry(err)
                    } else {
                        StepError::Other(err)
                    });
                }
                Err(e) => return Err(anyhow!(e).context("checking ns-slapd").into()),
            }
            if UnixStream::connect(&self.ldapi).is_ok()
                && probe_ldap(self.port)
                && (self.secure_port == 0
                    || std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.secure_port))
                        .is_ok())
            {
                if let Ok(None) = self.child.as_mut().expect("child").try_wait() {
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                let _ = self.stop();
                return Err(anyhow!(
                    "ns-slapd did not become ready within {READY_TIMEOUT:?}; tail of {}:\n{}",
                    errors.display(),
                    log_tail(&errors, 30, 16384)
                )
                .into());
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Ds389 {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(pid = self.pid, "stopping ns-slapd: {e:#}");
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        remove_instance_files(&self.name);
    }
}

/// `abp<pid>-<16 hex digits>`: the pid says which process owns it (see
/// [`remove_stale_instances`]), the rest makes it unique.
fn unique_name() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{NAME_PREFIX}{}-{:016x}", std::process::id(), h.finish())
}

/// The owner pid of a lab instance name, if it is one.
fn owner_pid(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, random) = rest.split_once('-')?;
    if random.len() != 16 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether a process exists and is not a zombie.
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
            st.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
}

/// Removes lab instances whose owner process is gone (killed before it could
/// drop them), stopping their ns-slapd first.
fn remove_stale_instances() {
    let Ok(dir) = fs::read_dir("/etc/dirsrv") else {
        return;
    };
    for entry in dir.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix("slapd-")) else {
            continue;
        };
        let Some(owner) = owner_pid(name) else {
            continue;
        };
        if owner == std::process::id() as libc::pid_t || alive(owner) {
            continue;
        }
        tracing::info!(
            instance = name,
            "removing a 389-ds lab instance left by a dead process"
        );
        stop_by_pid_file(name);
        remove_instance_files(name);
    }
}

/// Stops the ns-slapd of instance `name` found by its pid file (only if that
/// process is an ns-slapd of this instance).
fn stop_by_pid_file(name: &str) {
    let Ok(text) = fs::read_to_string(format!("/run/dirsrv/slapd-{name}.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<libc::pid_t>() else {
        return;
    };
    if pid <= 1 {
        return;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let conf = format!("/etc/dirsrv/slapd-{name}\0");
    if !cmdline.starts_with(NS_SLAPD.as_bytes())
        || !cmdline.windows(conf.len()).any(|w| w == conf.as_bytes())
    {
        return;
    }
    // SAFETY: kill(2) on a pid verified above to be this instance's ns-slapd.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }
}

/// Deletes every file of instance `name` (config, databases, logs, lock
/// directory, socket, pid and stats files), as `dsctl NAME remove` would;
/// ns-slapd must be stopped.
fn remove_instance_files(name: &str) {
    for dir in [
        format!("/etc/dirsrv/slapd-{name}"),
        format!("/var/lib/dirsrv/slapd-{name}"),
        format!("/var/log/dirsrv/slapd-{name}"),
        format!("/run/lock/dirsrv/slapd-{name}"),
        format!("/dev/shm/slapd-{name}"),
    ] {
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {dir}: {e}");
            }
        }
    }
    for file in [
        format!("/run/slapd-{name}.socket"),
        format!("/run/dirsrv/slapd-{name}.pid"),
        format!("/run/dirsrv/slapd-{name}.stats"),
        format!("/dev/shm/sem.slapd-{name}.stats"),
    ] {
        let _ = fs::remove_file(file);
    }
}

/// The sample data of [`crate::slapd`] for `suffix` with `n` users (no
/// password policy entries), plus the harness ACIs on the suffix entry.
fn data_ldif(suffix: &str, n: usize) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    crate::slapd::write_data(&mut data, suffix, n, false)?;
    // The suffix entry comes first and ends at the first empty line.
    let end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or_else(|| anyhow!("sample data without an entry"))?;
    let acis = "\naci: (targetattr!=\"userPassword\")(version 3.0; acl \"lab anyone read\"; \
                allow (read,search,compare) userdn=\"ldap:///anyone\";)\n\
                aci: (targetattr=\"*\")(version 3.0; acl \"lab self write\"; \
                allow (write) userdn=\"ldap:///self\";)";
    data.splice(end..end, acis.bytes());
    Ok(data)
}

/// A value of the first `attr:` line of an LDIF file (unfolded lines only).
fn dse_value(path: &Path, attr: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let prefix = format!("{attr}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// `text` (a dse.ldif) with `attr: value` in its `cn=config` entry:
/// an existing `attr:` line (any case) replaced, otherwise added after its
/// `nsslapd-port:` line.
fn set_config_attr(text: &str, attr: &str, value: &str) -> Result<String> {
    let start = if text.starts_with("dn: cn=config\n") {
        0
    } else {
        text.find("\ndn: cn=config\n")
            .ok_or_else(|| anyhow!("dse.ldif has no cn=config entry"))?
            + 1
    };
    let end = text[start..].find("\n\n").map_or(text.len(), |e| start + e);
    let (head, rest) = text.split_at(end);
    let (before, first) = head.split_at(start);
    let prefix = format!("{}:", attr.to_ascii_lowercase());
    let mut lines: Vec<String> = first.lines().map(str::to_string).collect();
    let line = format!("{attr}: {value}");
    if let Some(l) = lines
        .iter_mut()
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
    {
        *l = line;
    } else {
        let at = lines
            .iter()
            .position(|l| l.to_ascii_lowercase().starts_with("nsslapd-port:"))
            .ok_or_else(|| anyhow!("dse.ldif: cn=config has no nsslapd-port"))?;
        lines.insert(at + 1, line);
    }
    Ok(format!("{before}{}{rest}", lines.join("\n")))
}

/// Whether a log says a TCP port was taken.
fn addr_in_use(text: &str) -> bool {
    text.contains("already in use")
        || text.contains("address is in use")
        || text.contains("Address already in use")
}

/// Runs a setup tool with its output going to `log`, killing it after
/// `timeout`; fails with the tail of the output if it fails.
fn run_tool(cmd: &mut Command, log: &Path, timeout: Duration) -> Result<()> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating a file handle")?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {cmd:?}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} did not finish within {timeout:?}; its output:\n{}",
                log_tail(log, 30, 16384)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        bail!("{cmd:?} failed ({status}):\n{}", log_tail(log, 30, 16384));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_data() {
        let name = unique_name();
        assert_eq!(owner_pid(&name), Some(std::process::id() as libc::pid_t));
        assert!(name.len() <= 80, "lib389 limit");
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_ne!(unique_name(), name);
        assert_eq!(owner_pid("lab"), None);
        assert_eq!(owner_pid("abp12-xyz"), None);
        assert_eq!(owner_pid("abp12-0123456789abcdef"), Some(12));

        let s = String::from_utf8(data_ldif(OTHER_SUFFIX, 2).unwrap()).unwrap();
        assert!(s.starts_with(
            "dn: dc=other,dc=org\nobjectClass: top\nobjectClass: dcObject\n\
             objectClass: organization\ndc: other\no: other\naci: (targetattr!=\"userPassword\")"
        ));
        assert!(s.contains("userdn=\"ldap:///self\";)\n\ndn: ou=people,dc=other,dc=org\n"));
        assert_eq!(s.matches("aci: ").count(), 2);
        assert!(s.contains("dn: uid=user2,ou=people,dc=other,dc=org\n"));
    }

    #[test]
    fn config_attrs_go_into_cn_config() {
        let dse = "# header\n\ndn: cn=config\ncn: config\nnsslapd-port: 389\n\
                   nsslapd-security: off\n\ndn: cn=encryption,cn=config\ncn: encryption\n";
        let out = set_config_attr(dse, "nsslapd-Security", "on").unwrap();
        let out = set_config_attr(&out, "nsslapd-securePort", "636").unwrap();
        assert_eq!(
            out,
            "# header\n\ndn: cn=config\ncn: config\nnsslapd-port: 389\n\
             nsslapd-securePort: 636\nnsslapd-Security: on\n\n\
             dn: cn=encryption,cn=config\ncn: encryption\n"
        );
        assert!(set_config_attr("dn: cn=other\n", "a", "b").is_err());
    }
}
