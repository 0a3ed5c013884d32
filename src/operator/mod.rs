//! The operator side of Allow-Backup: a small client that talks to a running
//! proxy over LDAP (the `ldap3` crate) and what the `abproxy on|off|status|
//! run|hook` commands are made of.
//!
//! - [`Target`] says where the proxy is and who to bind as; [`Session::connect`]
//!   connects and binds; [`Session::connect_tls`] does the same over
//!   `ldaps://` or StartTLS with a [`ClientTls`] (CA file, client
//!   certificate, which can stand in for the bind);
//! - [`Session::on`], [`Session::off`] and [`Session::status`] send the
//!   Allow-Backup operations and return typed results; every failure is an
//!   [`OpError`] whose [`OpError::exit_code`] is the command's exit status
//!   (see [`exit`]) and whose message says what to do next;
//! - [`run_frozen`] is `abproxy run`: ON with holdUntilUnbind on a connection
//!   kept open while a command runs, then OFF on the same connection;
//! - several proxies (`--url` repeated, at most [`MAX_PROXIES`]) are frozen
//!   together, all or nothing: ON through each at once, and if one refuses
//!   or fails, OFF on each that froze; a release reports the [`worst`]
//!   status.
//!
//! ```no_run
//! # async fn f() -> Result<(), abproxy::operator::OpError> {
//! use abproxy::operator::{FreezeRequest, Password, Session, Target};
//!
//! let target = Target {
//!     url: "ldap://127.0.0.1:3389".into(),
//!     bind_dn: Some("cn=backup,dc=example,dc=org".into()),
//!     password: Some(Password::new("secret")),
//! };
//! let mut s = Session::connect(&target).await?;
//! let frozen = s.on(&FreezeRequest::default().with_time_limit(30)).await?;
//! println!("{}", frozen.message);
//! // ... copy the database files ...
//! s.off().await?;
//! s.close().await;
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use abproxy_proto::{
    AllowBackupRequest, AllowBackupStatus, BackendMode, FreezeState, ALLOW_BACKUP_OID,
    ALLOW_BACKUP_STATUS_OID,
};
use ldap3::exop::Exop;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, StdStream};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::endpoint::Endpoint;
use crate::tls::describe_io;

pub mod backup;
pub mod commands;
pub mod hook;
pub mod journal;
pub mod restore;
pub mod verify;
pub use hook::{HookRecord, HookState};

/// Exit statuses of the operator commands.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Bad arguments (clap's own status for usage errors).
    pub const USAGE: u8 = 2;
    /// Refused by the proxy: busy, unwillingToPerform, noSuchObject,
    /// insufficientAccessRights, protocolError (or another refusal).
    pub const REFUSED: u8 = 3;
    /// Cannot reach or bind to the proxy: connection failed or lost, TLS
    /// failed, invalid credentials.
    pub const UNREACHABLE: u8 = 4;
    /// No answer within `--timeout`.
    pub const TIMEOUT: u8 = 5;
    /// The freeze failed (result `other`: write in progress, prepare failed),
    /// or had expired before OFF (the backup may be inconsistent).
    pub const FAILED: u8 = 6;
    /// Released, but the server stopped during the freeze does not answer
    /// again yet (its clients' sessions wait for it).
    pub const SERVER_DOWN: u8 = 7;
    /// `backup`: the backup itself failed (cannot write the backup
    /// directory, the export search failed, a backend frozen in a mode the
    /// method cannot read); released, nothing written at DIR.
    pub const BACKUP_FAILED: u8 = 8;
    /// `restore`: the restore failed (the backup's file differs from its
    /// manifest, a tool failed, the built database does not hold what the
    /// manifest says, slapd still running for `--apply`).
    pub const RESTORE_FAILED: u8 = 9;
    /// `verify`: the backup is damaged (a file missing, extra, of the
    /// wrong size or SHA-256; the manifest or `SHA256SUMS` unreadable; an
    /// LDIF not well formed).
    pub const VERIFY_DAMAGED: u8 = 10;
    /// `verify`: the files are intact but their content is not what the
    /// manifest says (entry count, digest, a DN outside the suffix, a
    /// child before its parent, a DN twice, no suffix entry).
    pub const VERIFY_MISMATCH: u8 = 11;
    /// `verify`: cannot check (DIR missing or unreadable, an unknown
    /// manifest format_version, a backup method verify does not know).
    pub const VERIFY_CANNOT_CHECK: u8 = 12;
    /// `journal`: the journal is damaged (a gap in its sequence numbers,
    /// a damaged record before its end, an unreadable segment) or missing.
    pub const JOURNAL_DAMAGED: u8 = 13;
    /// `journal`: writes whose result is unknown (indeterminate), or, for
    /// `show --ldif`, writes LDIF cannot express; the rest was written.
    pub const JOURNAL_INCOMPLETE: u8 = 14;
    /// `journal replay`: a write the server answered with success then is
    /// answered otherwise now: stopped there (or, with `--continue`, went on).
    pub const REPLAY_MISMATCH: u8 = 15;
}

/// The default `--url`.
pub const DEFAULT_URL: &str = "ldap://127.0.0.1:3389";

/// The exit-status table, as `--help` and the documentation show it.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  done
  2  bad arguments
  3  refused by the proxy: busy (already frozen), unwillingToPerform,
     no such backend, insufficient access rights, protocol error
  4  cannot reach or bind to the proxy (connection failed or lost, TLS
     failed, invalid credentials)
  5  timed out (--timeout)
  6  the freeze failed (write in progress, prepare failed); for `off` and
     `hook --after`: the freeze had expired, or (naming their freeze: `hook
     --after`, `off --freeze-id`) had been ended by someone else; the backup
     may be inconsistent
  7  released, but the LDAP server stopped during the freeze does not
     answer again yet (its clients wait for it; see the proxy's log)
  8  `backup`: the backup failed (cannot write it, the export failed, a
     backend that cannot be frozen); released, nothing written at DIR
  9  `restore`: the restore failed (the backup's file is not the one its
     manifest lists, a slapd tool failed, the database built does not hold
     what the manifest says, slapd is running for --apply); nothing built
  10 `verify`: the backup is damaged (a file missing, extra, of the wrong
     size or SHA-256; manifest.json or SHA256SUMS unreadable; an LDIF
     not well formed)
  11 `verify`: the files are intact but the content is not what the
     manifest says (entry count, digest, a DN outside the suffix, a child
     before its parent, a DN twice, no suffix entry)
  12 `verify`: cannot check (DIR missing or unreadable, an unknown
     format_version, a backup method verify does not know)
  13 `journal`: the journal is damaged (a gap in its sequence, a damaged
     record before its end, an unreadable segment) or missing
  14 `journal`: writes whose result is unknown (indeterminate), or, for
     `show --ldif`, writes LDIF cannot express; the rest was written;
     `replay` stopped at an indeterminate write
  15 `journal replay`: the server answered a write otherwise than the
     journal says it did; stopped there (the position to resume is shown)
`verify` exits with the worst it found: 10, else 11, else 12.
`backup` exits 2 if DIR exists, 2-7 as above if the freeze could not be
set up or did not last, 8 otherwise; a failed backup leaves nothing at DIR.
With several --url (at most 16), every proxy is frozen together, all or
nothing: the first failure's status, and those already frozen released;
a release exits with the most serious status (6, 5, 4, 3, then 7).
`run` exits with the status of CMD (128+N if CMD died of signal N), or
2-6 as above if the freeze could not be set up (CMD is then not run), 6 if
CMD succeeded but the freeze did not last until it ended, 7 if CMD
succeeded but the server it stopped does not answer again, 126/127 if CMD
could not be started.";

pub use crate::secret::Password;

/// What the operator commands read passwords from.
impl Password {
    /// The first line of `path` (without its line ending).
    ///
    /// # Errors
    ///
    /// A usage error if the file cannot be read or its first line is empty.
    pub fn from_file(path: &Path) -> Result<Password, OpError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            OpError::usage(
                format!("cannot read the password file {}: {e}", path.display()),
                "check --password-file (the file's first line is the password)",
            )
        })?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(OpError::usage(
                format!("the password file {} is empty", path.display()),
                "write the password on its first line",
            ));
        }
        Ok(Password::new(line))
    }

    /// The usage error for an empty password: a simple bind with a DN and
    /// an empty password is unauthenticated (RFC 4513 5.1.2), never sent.
    pub fn empty_error() -> OpError {
        OpError::usage(
            "the password is empty: a bind with an empty password is unauthenticated \
             (anonymous), so it is not sent",
            "give the bind DN's password with --password-file FILE, ABPROXY_PASSWORD or \
             (discouraged) --password",
        )
    }
}

/// Where the proxy is and who to bind as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `ldap://HOST:PORT`, `ldaps://HOST:PORT` or `ldapi://PATH`
    /// (percent-encoded or plain).
    pub url: String,
    /// DN for a simple bind; `None`: anonymous (which the proxy refuses).
    pub bind_dn: Option<String>,
    /// Password of `bind_dn` (required with it).
    pub password: Option<Password>,
}

/// TLS to the proxy: `ldaps://` URLs, or StartTLS on `ldap://`.
///
/// The default: no StartTLS, the system's CA store, the name checked, no
/// client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Issue StartTLS on an `ldap://` URL before anything else.
    pub starttls: bool,
    /// PEM CA certificates the proxy's certificate must chain to; `None`:
    /// the system store ([`crate::tls::SYSTEM_CA_FILE`]).
    pub ca_file: Option<PathBuf>,
    /// Accept a proxy certificate that does not name the URL's host (the
    /// chain is still checked).
    pub no_verify_hostname: bool,
    /// PEM client certificate chain to present (with `key_file`): the proxy
    /// can authorise its subject (`[freeze] allowed_cert_subjects`) without
    /// a bind.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl ClientTls {
    fn any_option(&self) -> bool {
        self.starttls
            || self.ca_file.is_some()
            || self.no_verify_hostname
            || self.cert_file.is_some()
            || self.key_file.is_some()
    }

    /// The rustls configuration, and the subject of the client certificate.
    fn config(&self) -> Result<(rustls::ClientConfig, Option<String>), OpError> {
        let cert_key = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(OpError::usage(
                    "--cert-file and --key-file go together",
                    "give both (or ABPROXY_CERT_FILE and ABPROXY_KEY_FILE), or neither",
                ))
            }
        };
        let config = crate::tls::client_config(
            self.ca_file.as_deref(),
            cert_key,
            !self.no_verify_hostname,
            ["--ca-file", "--cert-file", "--key-file"],
        )
        .map_err(|e| {
            OpError::usage(
                e,
                "check the TLS options (--ca-file, --cert-file, --key-file)",
            )
        })?;
        let subject = match &self.cert_file {
            Some(c) => {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::pem_file_iter(c)
                    .ok()
                    .and_then(|mut it| it.next())
                    .and_then(Result::ok)
                    .and_then(|der| crate::tls::cert_subject(&der))
            }
            None => None,
        };
        Ok((config, subject))
    }
}

/// What an Allow-Backup ON asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreezeRequest {
    /// Suffixes (or DNs under them) of the backends to freeze; empty: all.
    pub backends: Vec<String>,
    /// Seconds allowed to the operations in progress; `None`: the proxy's
    /// `max_drain_secs`.
    pub time_limit: Option<u32>,
    /// Release the freeze when this connection ends.
    pub hold_until_unbind: bool,
}

impl FreezeRequest {
    /// Sets the drain time limit.
    #[must_use]
    pub fn with_time_limit(mut self, seconds: u32) -> Self {
        self.time_limit = Some(seconds);
        self
    }

    /// Sets the backends.
    #[must_use]
    pub fn with_backends<I: IntoIterator<Item = S>, S: Into<String>>(mut self, dns: I) -> Self {
        self.backends = dns.into_iter().map(Into::into).collect();
        self
    }

    /// Sets holdUntilUnbind.
    #[must_use]
    pub fn with_hold_until_unbind(mut self, hold: bool) -> Self {
        self.hold_until_unbind = hold;
        self
    }

    /// The protocol value.
    pub fn to_proto(&self) -> AllowBackupRequest {
        let mut req = AllowBackupRequest::on().with_hold_until_unbind(self.hold_until_unbind);
        if let Some(s) = self.time_limit {
            req = req.with_time_limit(s);
        }
        if !self.backends.is_empty() {
            req = req.with_dn_set(&self.backends);
        }
        req
    }

    /// The default `--timeout` of an ON: its time limit (30 s, the proxy's
    /// default, when not given) plus 30 s.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.time_limit.unwrap_or(30)) + 30)
    }
}

/// A successful ON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    /// The proxy's message: "frozen: SUFFIXES; drained in N ms; lease N s;
    /// freeze id N".
    pub message: String,
}

impl Frozen {
    /// The id of the freeze this ON set up, from the message's "freeze id
    /// N" (`None` from a proxy that does not say it): what
    /// [`Session::off_freeze`] names so as to end this freeze and no other.
    pub fn id(&self) -> Option<u64> {
        let (_, tail) = self.message.rsplit_once("freeze id ")?;
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        tail[..digits].parse().ok()
    }
}

/// A successful OFF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// A freeze was ended; the proxy's message ("released after N s; N
    /// queued request(s) resumed; freeze id N").
    Released(String),
    /// Nothing was frozen (and no freeze had expired since the last OFF).
    NotFrozen,
}

impl Released {
    /// The proxy released the freeze, but the server stopped during it
    /// does not answer again yet (the proxy's message says so).
    pub fn server_down(&self) -> bool {
        matches!(self, Released::Released(m) if m.contains(crate::freeze::SERVER_NOT_BACK))
    }
}

/// Overall freeze state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not frozen.
    Thawed,
    /// ON in progress: new blocked operations are held, those in progress
    /// are being waited for.
    Draining,
    /// Frozen: the backup may be taken.
    Frozen,
}

/// How a backend is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendModeName {
    /// Writes are held, reads go on.
    Readonly,
    /// Everything is held.
    Stop,
    /// Cannot be frozen.
    Unimplemented,
}

/// One backend in a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendState {
    /// Its suffix.
    pub suffix: String,
    /// How it is frozen.
    pub mode: BackendModeName,
    /// Whether the freeze is in effect on it now.
    pub frozen: bool,
}

/// The proxy's Allow-Backup status (what `abproxy status --json` prints).
/// Times are seconds since the epoch (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// thawed, draining or frozen.
    pub state: State,
    /// DN holding the freeze.
    pub holder: Option<String>,
    /// When the freeze was requested.
    pub since: Option<u64>,
    /// When the freeze ends by itself unless OFF comes first.
    pub lease_expires: Option<u64>,
    /// Identifies the current freeze.
    pub freeze_id: Option<u64>,
    /// With state frozen: the freeze is being released (done steps
    /// running, requests still held).
    #[serde(default)]
    pub releasing: bool,
    /// Requests held by the freeze.
    pub queued_requests: u64,
    /// Their total size in octets.
    pub queued_bytes: u64,
    /// Operations forwarded and not yet answered.
    pub in_flight: u64,
    /// Every backend the proxy knows.
    pub backends: Vec<BackendState>,
    /// Sessions waiting for a restarted server, carried, not carried.
    #[serde(default)]
    pub sessions_waiting: u64,
    /// Sessions carried to a new connection since the proxy started.
    #[serde(default)]
    pub sessions_carried: u64,
    /// Sessions that could not be carried since the proxy started.
    #[serde(default)]
    pub sessions_not_carried: u64,
}

impl From<AllowBackupStatus> for Status {
    fn from(s: AllowBackupStatus) -> Status {
        Status {
            state: match s.state {
                FreezeState::Thawed => State::Thawed,
                FreezeState::Draining => State::Draining,
                FreezeState::Frozen => State::Frozen,
            },
            holder: s.holder.map(|h| String::from_utf8_lossy(&h).into_owned()),
            since: s.since,
            lease_expires: s.lease_expires,
            freeze_id: s.freeze_id,
            releasing: s.releasing,
            queued_requests: s.queued_requests,
            queued_bytes: s.queued_bytes,
            in_flight: s.in_flight,
            sessions_waiting: s.sessions_waiting,
            sessions_carried: s.sessions_carried,
            sessions_not_carried: s.sessions_not_carried,
            backends: s
                .backends
                .into_iter()
                .map(|b| BackendState {
                    suffix: String::from_utf8_lossy(&b.suffix).into_owned(),
                    mode: match b.mode {
                        BackendMode::Readonly => BackendModeName::Readonly,
                        BackendMode::Stop => BackendModeName::Stop,
                        BackendMode::Unimplemented => BackendModeName::Unimplemented,
                    },
                    frozen: b.frozen,
                })
                .collect(),
        }
    }
}

impl State {
    /// Its name as in the protocol and the JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Thawed => "thawed",
            State::Draining => "draining",
            State::Frozen => "frozen",
        }
    }
}

impl BackendModeName {
    /// Its name as in the configuration and the JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendModeName::Readonly => "readonly",
            BackendModeName::Stop => "stop",
            BackendModeName::Unimplemented => "unimplemented",
        }
    }
}

impl Status {
    /// The human summary, relative times computed against `now` (seconds
    /// since the epoch).
    pub fn render(&self, now: u64) -> String {
        let mut out = String::new();
        let id = self
            .freeze_id
            .map(|i| format!(" (freeze id {i})"))
            .unwrap_or_default();
        let releasing = if self.releasing { ", releasing" } else { "" };
        out.push_str(&format!(
            "state:     {}{releasing}{id}\n",
            self.state.as_str()
        ));
        out.push_str(&format!(
            "holder:    {}\n",
            self.holder.as_deref().unwrap_or("-")
        ));
        let since = match self.since {
            Some(t) => format!("{} ({} s ago)", format_utc(t), now.saturating_sub(t)),
            None => "-".into(),
        };
        out.push_str(&format!("since:     {since}\n"));
        let lease = match self.lease_expires {
            Some(t) if t >= now => format!("{} (in {} s)", format_utc(t), t - now),
            Some(t) => format!("{} ({} s ago)", format_utc(t), now - t),
            None => "-".into(),
        };
        out.push_str(&format!("lease:     {lease}\n"));
        out.push_str(&format!(
            "queued:    {} request(s), {} byte(s)\n",
            self.queued_requests, self.queued_bytes
        ));
        out.push_str(&format!("in flight: {}\n", self.in_flight));
        if self.sessions_waiting + self.sessions_carried + self.sessions_not_carried > 0 {
            out.push_str(&format!(
                "sessions:  {} waiting for the server, {} carried, {} not carried (across \
                 server restarts)\n",
                self.sessions_waiting, self.sessions_carried, self.sessions_not_carried
            ));
        }
        out.push_str("backends:\n");
        let width = self
            .backends
            .iter()
            .map(|b| b.suffix.len())
            .max()
            .unwrap_or(0);
        for b in &self.backends {
            out.push_str(&format!(
                "  {:width$}  {:13}  {}\n",
                b.suffix,
                b.mode.as_str(),
                if b.frozen { "frozen" } else { "not frozen" }
            ));
        }
        if self.backends.is_empty() {
            out.push_str("  (none known)\n");
        }
        out
    }

    /// The JSON form (one object, the fields of [`Status`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a Status always serialises")
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What went wrong, as the exit status tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad arguments ([`exit::USAGE`]).
    Usage,
    /// The proxy refused, with this LDAP result code ([`exit::REFUSED`]).
    Refused(u32),
    /// Cannot reach or bind to the proxy ([`exit::UNREACHABLE`]).
    Unreachable,
    /// No answer in time ([`exit::TIMEOUT`]).
    Timeout,
    /// The freeze failed ([`exit::FAILED`]).
    Failed,
    /// OFF found that the freeze had expired ([`exit::FAILED`]).
    Expired,
}

/// A failed operator command: what happened and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What happened (the proxy's own message where there is one).
    pub message: String,
    /// What to do next.
    pub hint: String,
}

impl OpError {
    fn new(kind: ErrorKind, message: impl Into<String>, hint: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> OpError {
        Self::new(ErrorKind::Usage, message, hint)
    }

    /// The exit status for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::Refused(_) => exit::REFUSED,
            ErrorKind::Unreachable => exit::UNREACHABLE,
            ErrorKind::Timeout => exit::TIMEOUT,
            ErrorKind::Failed | ErrorKind::Expired => exit::FAILED,
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if !self.hint.is_empty() {
            write!(f, "; {}", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for OpError {}

/// Runs `fut` for at most `limit`; a timeout becomes an [`ErrorKind::Timeout`]
/// error about `what`, with `hint`.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    hint: &str,
    fut: impl Future<Output = Result<T, OpError>>,
) -> Result<T, OpError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(OpError::new(
            ErrorKind::Timeout,
            format!("timed out after {} waiting for {what}", secs_text(limit)),
            hint,
        )),
    }
}

fn secs_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The hint of a timeout while ON was (or may have been) in progress.
pub const ON_TIMEOUT_HINT: &str =
    "the proxy may still complete the freeze: check with `abproxy status` \
     and release it with `abproxy off`; give --timeout to wait longer";
/// The hint of any other timeout.
pub const TIMEOUT_HINT: &str =
    "is the proxy overloaded or stuck? check its log; give --timeout to wait longer";

/// The name of an LDAP result code.
pub fn code_name(rc: u32) -> &'static str {
    match rc {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        10 => "referral",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        16 => "noSuchAttribute",
        17 => "undefinedAttributeType",
        19 => "constraintViolation",
        20 => "attributeOrValueExists",
        21 => "invalidAttributeSyntax",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        64 => "namingViolation",
        65 => "objectClassViolation",
        66 => "notAllowedOnNonLeaf",
        67 => "notAllowedOnRDN",
        68 => "entryAlreadyExists",
        69 => "objectClassModsProhibited",
        80 => "other",
        _ => "error",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    On,
    Off,
    Status,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::On => "ON",
            Op::Off => "OFF",
            Op::Status => "status",
        }
    }
}

/// A connection to the proxy, bound (or anonymous).
pub struct Session {
    ldap: Ldap,
    driver: Option<JoinHandle<Result<(), LdapError>>>,
    url: String,
    who: String,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("url", &self.url)
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closes the connection (and so ends a holdUntilUnbind freeze).
        if let Some(d) = self.driver.take() {
            d.abort();
        }
    }
}

fn reach_hint(url: &str) -> String {
    format!(
        "is the proxy running (`abproxy serve`) and listening on {url}? set --url or ABPROXY_URL"
    )
}

/// A failed connection setup: TLS (handshake, StartTLS) or plain.
fn connect_error(url: &str, tls: bool, e: LdapError) -> OpError {
    let message = match &e {
        LdapError::Io { source } if tls => {
            format!("TLS with {url} failed: {}", describe_io(source))
        }
        LdapError::LdapResult { result } => format!(
            "the proxy at {url} refused StartTLS: {} ({}){}",
            code_name(result.rc),
            result.rc,
            text_suffix(&result.text)
        ),
        e if tls => format!("TLS with {url} failed: {e}"),
        e => format!("cannot connect to {url}: {e}"),
    };
    let hint = match &e {
        LdapError::LdapResult { .. } => {
            "does that listener have TLS (the proxy's [tls] cert_file)? or use its ldaps:// URL"
                .into()
        }
        _ if tls => {
            "check --ca-file (ABPROXY_CA_FILE): the CA that signed the proxy's certificate; \
                     the URL's host must be a name in that certificate"
                .into()
        }
        _ => reach_hint(url),
    };
    OpError::new(ErrorKind::Unreachable, message, hint)
}

impl Session {
    /// Connects to `target.url` and binds (simple bind) as `target.bind_dn`
    /// when given. Must run inside a tokio runtime. An `ldaps://` URL uses
    /// the system's CA store; see [`Session::connect_tls`] for more.
    ///
    /// # Errors
    ///
    /// Usage (bad URL, DN without password), unreachable (connection
    /// failed, TLS failed, bind refused: invalid credentials and the like).
    pub async fn connect(target: &Target) -> Result<Session, OpError> {
        Self::connect_tls(target, &ClientTls::default()).await
    }

    /// [`Session::connect`] with TLS settings: `ldaps://`, or StartTLS on
    /// `ldap://` (`tls.starttls`), the proxy's certificate checked against
    /// `tls.ca_file`, a client certificate presented when given. Without a
    /// bind DN, the session is anonymous, or authorised by the client
    /// certificate's subject.
    ///
    /// # Errors
    ///
    /// Those of [`Session::connect`]; TLS options with a clear URL, or
    /// unreadable TLS files, are usage errors; a failed TLS handshake or a
    /// refused StartTLS is unreachable, its message says what failed.
    pub async fn connect_tls(target: &Target, tls: &ClientTls) -> Result<Session, OpError> {
        let endpoint = Endpoint::parse(&target.url).map_err(|e| {
            let hint = if e.contains("ldap://HOST") || e.contains("use ldap://") {
                ""
            } else {
                "use ldap://HOST:PORT or ldapi://PATH"
            };
            OpError::usage(format!("bad --url: {e}"), hint)
        })?;
        if target.bind_dn.is_some() && target.password.is_none() {
            return Err(OpError::usage(
                "--bind-dn is given without a password",
                "give --password-file FILE, set ABPROXY_PASSWORD, or (discouraged) --password",
            ));
        }
        if target.password.as_ref().is_some_and(Password::is_empty) {
            // RFC 4513 5.1.2: a DN with an empty password is an
            // unauthenticated bind, anonymous at the server.
            return Err(Password::empty_error());
        }
        let url = target.url.clone();
        let unreachable = |e: std::io::Error| {
            OpError::new(
                ErrorKind::Unreachable,
                format!("cannot connect to {url}: {e}"),
                reach_hint(&url),
            )
        };
        let use_tls = match &endpoint {
            Endpoint::Tls(_) if tls.starttls => {
                return Err(OpError::usage(
                    format!(
                        "--starttls with {url}: an ldaps:// connection is in TLS from the start"
                    ),
                    "use ldap://HOST:PORT with --starttls, or ldaps://HOST:PORT without it",
                ))
            }
            Endpoint::Tls(_) => true,
            Endpoint::Tcp(_) => tls.starttls,
            Endpoint::Unix(_) => false,
        };
        if !use_tls && tls.any_option() {
            let hint = match &endpoint {
                Endpoint::Unix(_) => "TLS is pointless on ldapi://: leave out the TLS options \
                                     (--starttls, --ca-file, --cert-file, --key-file and their ABPROXY_ variables)",
                _ => "use an ldaps:// URL, or --starttls (ABPROXY_STARTTLS=1) on ldap://",
            };
            return Err(OpError::usage(
                format!("TLS options given but {url} is not a TLS connection"),
                hint,
            ));
        }
        let (tls_config, cert_subject) = if use_tls {
            let (c, s) = tls.config()?;
            (Some(c), s)
        } else {
            (None, None)
        };
        let (stream, ldap_url) = match &endpoint {
            Endpoint::Tcp(addr) | Endpoint::Tls(addr) => {
                let s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(unreachable)?;
                let _ = s.set_nodelay(true);
                let s = s.into_std().map_err(unreachable)?;
                let scheme = if matches!(endpoint, Endpoint::Tls(_)) {
                    "ldaps"
                } else {
                    "ldap"
                };
                (StdStream::Tcp(s), format!("{scheme}://{addr}"))
            }
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(unreachable)?;
                let s = s.into_std().map_err(unreachable)?;
                (StdStream::Unix(s), "ldapi:///".to_string())
            }
        };
        let mut settings = LdapConnSettings::new().set_std_stream(stream);
        if let Some(c) = tls_config {
            settings = settings
                .set_config(std::sync::Arc::new(c))
                .set_starttls(tls.starttls);
        }
        let (conn, ldap) = LdapConnAsync::with_settings(settings, &ldap_url)
            .await
            .map_err(|e| connect_error(&url, use_tls, e))?;
        let driver = tokio::spawn(conn.drive());
        let mut session = Session {
            ldap,
            driver: Some(driver),
            url: url.clone(),
            who: match (&target.bind_dn, cert_subject) {
                (Some(dn), _) => dn.clone(),
                (None, Some(subject)) => format!("the certificate subject {subject}"),
                (None, None) => "anonymous".into(),
            },
        };
        if let (Some(dn), Some(pw)) = (&target.bind_dn, &target.password) {
            let res = session.ldap.simple_bind(dn, pw.expose()).await;
            let res = match res {
                Ok(r) => r,
                Err(e) => return Err(session.lost_error("bind", e).await),
            };
            match res.rc {
                0 => {}
                49 => {
                    return Err(OpError::new(
                        ErrorKind::Unreachable,
                        format!("cannot bind to {url} as {dn}: invalid credentials (49)"),
                        "check --bind-dn and the password (--password-file, ABPROXY_PASSWORD or --password)",
                    ))
                }
                13 => {
                    return Err(OpError::new(
                        ErrorKind::Unreachable,
                        format!(
                            "cannot bind to {url} as {dn}: confidentialityRequired (13){}",
                            text_suffix(&res.text)
                        ),
                        "the proxy requires TLS (require_tls): use its ldaps:// URL, or --starttls \
                         (ABPROXY_STARTTLS=1) with --ca-file",
                    ))
                }
                rc => {
                    return Err(OpError::new(
                        ErrorKind::Unreachable,
                        format!(
                            "cannot bind to {url} as {dn}: {} ({rc}){}",
                            code_name(rc),
                            text_suffix(&res.text)
                        ),
                        "check --bind-dn and the password, and the LDAP server's log",
                    ))
                }
            }
        }
        Ok(session)
    }

    /// The LDAP connection itself (the backup's export reads through it).
    pub(crate) fn ldap(&mut self) -> &mut Ldap {
        &mut self.ldap
    }

    /// The URL this session is connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Allow-Backup ON.
    ///
    /// # Errors
    ///
    /// Refused (busy, unwilling, no such backend, access, protocol error),
    /// failed (`other`: write in progress, prepare failed), unreachable
    /// (connection lost).
    pub async fn on(&mut self, req: &FreezeRequest) -> Result<Frozen, OpError> {
        let value = abproxy_proto::encode_request(&req.to_proto());
        let (rc, text, _) = self.exop(Op::On, ALLOW_BACKUP_OID, Some(value)).await?;
        match rc {
            0 => Ok(Frozen { message: text }),
            80 => {
                let hint = if text.contains("write in progress") {
                    "nothing is frozen, do not take the backup now; try again later, \
                     or with a longer --time-limit (up to the proxy's max_drain_secs)"
                } else if text.contains("prepare failed") {
                    "nothing is frozen, do not take the backup now; see the proxy's log \
                     for the backend driver's error"
                } else {
                    "nothing is frozen, do not take the backup now; see the proxy's log"
                };
                Err(OpError::new(
                    ErrorKind::Failed,
                    format!("freeze failed: {text}"),
                    hint,
                ))
            }
            rc => Err(self.refusal(Op::On, rc, text)),
        }
    }

    /// Allow-Backup OFF of whatever freeze is current (an operator's manual
    /// release; a backup job ends its own freeze with
    /// [`Session::off_freeze`]).
    ///
    /// # Errors
    ///
    /// Expired (the freeze had ended by its lease before this OFF: the
    /// backup may be inconsistent), failed (done steps failed), refused
    /// (busy while draining, access), unreachable.
    pub async fn off(&mut self) -> Result<Released, OpError> {
        self.off_freeze(None).await
    }

    /// Allow-Backup OFF naming freeze `id` (the freezeId of the request):
    /// the proxy releases only that freeze. `None`: like [`Session::off`].
    ///
    /// # Errors
    ///
    /// Those of [`Session::off`]; and, when freeze `id` is not the current
    /// one (it ended early: the lease, another OFF, its holder's connection
    /// closing), expired or failed, with the proxy's account of how it
    /// ended: nothing was released, the backup may be inconsistent.
    pub async fn off_freeze(&mut self, id: Option<u64>) -> Result<Released, OpError> {
        let mut request = AllowBackupRequest::off();
        if let Some(id) = id {
            request = request.with_freeze_id(id);
        }
        let value = abproxy_proto::encode_request(&request);
        let (rc, text, _) = self.exop(Op::Off, ALLOW_BACKUP_OID, Some(value)).await?;
        match rc {
            0 if text == "not frozen" => Ok(Released::NotFrozen),
            0 => Ok(Released::Released(text)),
            80 if text.contains("is not the current freeze") => {
                let kind = if text.contains("expired") {
                    ErrorKind::Expired
                } else {
                    ErrorKind::Failed
                };
                Err(OpError::new(
                    kind,
                    text,
                    "this job's freeze ended before its OFF, and writes may have reached the \
                     directory during the backup: take the backup again (and raise [freeze] \
                     lease_secs if backups take longer than the lease)",
                ))
            }
            80 if text.contains("expired") => Err(OpError::new(
                ErrorKind::Expired,
                text,
                "the proxy's lease (lease_secs) ran out before OFF and writes resumed during \
                 the backup: take the backup again, and raise [freeze] lease_secs if backups take longer",
            )),
            80 => Err(OpError::new(
                ErrorKind::Failed,
                text,
                "operations have resumed; see the proxy's log for the backend driver's error",
            )),
            rc => Err(self.refusal(Op::Off, rc, text)),
        }
    }

    /// The Allow-Backup status.
    ///
    /// # Errors
    ///
    /// Refused (access, protocol error), unreachable.
    pub async fn status(&mut self) -> Result<Status, OpError> {
        let (rc, text, value) = self.exop(Op::Status, ALLOW_BACKUP_STATUS_OID, None).await?;
        if rc != 0 {
            return Err(self.refusal(Op::Status, rc, text));
        }
        let Some(value) = value else {
            return Err(OpError::new(
                ErrorKind::Refused(rc),
                format!("the status answer from {} has no value", self.url),
                "is --url the abproxy proxy (not the LDAP server itself)?",
            ));
        };
        abproxy_proto::decode_status(&value)
            .map(Status::from)
            .map_err(|e| {
                OpError::new(
                    ErrorKind::Refused(2),
                    format!("bad status answer from {}: {e}", self.url),
                    "is --url the abproxy proxy, and of a version this client knows?",
                )
            })
    }

    /// Resolves when the connection to the proxy has ended (closed by the
    /// proxy or lost), with the reason; pending forever once reported.
    pub async fn lost(&mut self) -> String {
        let Some(driver) = self.driver.as_mut() else {
            return std::future::pending().await;
        };
        let reason = match driver.await {
            Ok(Ok(())) => "connection closed by the proxy".to_string(),
            Ok(Err(e)) => format!("connection lost: {e}"),
            Err(e) => format!("connection task ended: {e}"),
        };
        self.driver = None;
        reason
    }

    /// Unbinds and closes the connection (bounded to 5 s).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.ldap.unbind().await;
            if let Some(d) = self.driver.as_mut() {
                let _ = d.await;
            }
        })
        .await;
    }

    async fn exop(
        &mut self,
        op: Op,
        oid: &str,
        value: Option<Vec<u8>>,
    ) -> Result<(u32, String, Option<Vec<u8>>), OpError> {
        let res = self
            .ldap
            .extended(Exop {
                name: Some(oid.into()),
                val: value,
            })
            .await;
        match res {
            Ok(res) => Ok((res.1.rc, res.1.text, res.0.val)),
            Err(e) => Err(self.lost_error(op.name(), e).await),
        }
    }

    async fn lost_error(&mut self, what: &str, e: LdapError) -> OpError {
        // ldap3 tells the waiting operation only that the connection is
        // gone (a closed channel); why (a TLS alert, a reset) is the result
        // of its connection task, which has ended or is ending.
        let cause = match (&e, self.driver.as_mut()) {
            (LdapError::Io { source }, _) => describe_io(source),
            (_, Some(driver)) => match tokio::time::timeout(Duration::from_secs(1), driver).await {
                Ok(ended) => {
                    self.driver = None;
                    match ended {
                        Ok(Err(LdapError::Io { source })) => describe_io(&source),
                        Ok(Err(why)) => why.to_string(),
                        _ => e.to_string(),
                    }
                }
                Err(_) => e.to_string(),
            },
            (_, None) => e.to_string(),
        };
        let hint = if cause.contains("TLS alert") {
            "the proxy ended the TLS session: does it trust the client certificate \
             (--cert-file, signed by a CA in its [tls] client_ca_file)? see its log"
                .to_string()
        } else if what == "ON" {
            "check with `abproxy status` whether the freeze took effect; is the proxy still running? see its log".to_string()
        } else {
            reach_hint(&self.url)
        };
        OpError::new(
            ErrorKind::Unreachable,
            format!("connection to {} lost during {what}: {cause}", self.url),
            hint,
        )
    }

    fn refusal(&self, op: Op, rc: u32, text: String) -> OpError {
        let text = readable_since(&text);
        let what = format!(
            "{} refused: {} ({rc}){}",
            op.name(),
            code_name(rc),
            text_suffix(&text)
        );
        let hint: String = match rc {
            51 if op == Op::On => {
                "wait for that backup to finish, or run `abproxy off` if the freeze was left behind"
                    .into()
            }
            51 => "a freeze is still draining: retry once its ON has answered".into(),
            53 if op == Op::Off => "nothing was released: name every frozen backend, or none \
                   (`abproxy status` lists them)"
                .into(),
            53 => "leave that backend out (--backend SUFFIX for the others), or change its mode \
                   in the proxy's [[backends]] configuration"
                .into(),
            32 => "give --backend the suffix of a backend the proxy knows (`abproxy status` lists them)"
                .into(),
            50 if self.who == "anonymous" => "bind as an operator: --bind-dn DN with --password-file, \
                 ABPROXY_PASSWORD or --password"
                .into(),
            50 => match self.who.strip_prefix("the certificate subject ") {
                Some(subject) => format!(
                    "add {subject} to [freeze] allowed_cert_subjects in the proxy's configuration \
                     (and its CA to [tls] client_ca_file), or bind as an allowed operator"
                ),
                None => format!(
                    "add {} to [freeze] allowed in the proxy's configuration, or bind as an allowed operator",
                    self.who
                ),
            },
            2 => format!(
                "is {} the abproxy proxy, not the LDAP server itself? (the server does not know Allow-Backup)",
                self.url
            ),
            52 => return OpError::new(
                ErrorKind::Unreachable,
                what,
                "the proxy or its LDAP server is unavailable (shutting down?); see the proxy's log",
            ),
            _ => "see the proxy's log".into(),
        };
        OpError::new(ErrorKind::Refused(rc), what, hint)
    }
}

/// The proxy's busy message gives "since SECONDS (unix time, N s ago; ...)":
/// shown as "since YYYY-MM-DDTHH:MM:SSZ (N s ago; ...)".
fn readable_since(text: &str) -> String {
    const MARK: &str = "since ";
    let Some(at) = text.find(MARK) else {
        return text.to_owned();
    };
    let rest = &text[at + MARK.len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after = &rest[digits..];
    match (
        rest[..digits].parse::<u64>(),
        after.strip_prefix(" (unix time, "),
    ) {
        (Ok(secs), Some(tail)) => format!("{}{MARK}{} ({tail}", &text[..at], format_utc(secs)),
        _ => text.to_owned(),
    }
}

fn text_suffix(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Connects, binds and runs `f` on the session, then closes it; all within
/// `limit` (the whole operation's `--timeout`).
///
/// # Errors
///
/// Those of [`Session::connect`], of `f`, and a timeout (with `timeout_hint`).
pub async fn with_session<T>(
    target: &Target,
    limit: Duration,
    timeout_hint: &str,
    f: impl AsyncFnOnce(&mut Session) -> Result<T, OpError>,
) -> Result<T, OpError> {
    with_session_tls(target, &ClientTls::default(), limit, timeout_hint, f).await
}

/// [`with_session`] with TLS settings (see [`Session::connect_tls`]).
///
/// # Errors
///
/// Those of [`Session::connect_tls`], of `f`, and a timeout.
pub async fn with_session_tls<T>(
    target: &Target,
    tls: &ClientTls,
    limit: Duration,
    timeout_hint: &str,
    f: impl AsyncFnOnce(&mut Session) -> Result<T, OpError>,
) -> Result<T, OpError> {
    within(limit, &target.url, timeout_hint, async {
        let mut session = Session::connect_tls(target, tls).await?;
        let r = f(&mut session).await;
        session.close().await;
        r
    })
    .await
}

/// Progress and log lines on stderr: on a terminal, lines that a waiting
/// step redraws in place; otherwise plain lines with a UTC timestamp.
#[derive(Debug, Clone)]
pub struct Progress {
    prefix: String,
    tty: bool,
}

/// A step being waited for (see [`Progress::waiting`]); dropping it ends
/// the redrawing.
#[derive(Debug)]
pub struct Waiting {
    task: Option<JoinHandle<()>>,
    tty: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

impl Progress {
    /// Progress for stderr, `prefix` before every line (e.g. "abproxy run").
    pub fn stderr(prefix: impl Into<String>) -> Progress {
        Progress {
            prefix: prefix.into(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Whether stderr is a terminal.
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// One line.
    pub fn line(&self, msg: impl fmt::Display) {
        if self.tty {
            eprintln!("\r\x1b[K{}: {msg}", self.prefix);
        } else {
            eprintln!("{} {}: {msg}", format_utc(now_secs()), self.prefix);
        }
    }

    /// A step that takes a while: on a terminal, "MSG N s" redrawn every
    /// second until the returned guard is dropped; otherwise one line.
    /// Must run inside a tokio runtime.
    pub fn waiting(&self, msg: impl fmt::Display) -> Waiting {
        if !self.tty {
            self.line(msg);
            return Waiting {
                task: None,
                tty: false,
            };
        }
        let text = format!("{}: {msg}", self.prefix);
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                eprint!("\r\x1b[K{text} {} s", start.elapsed().as_secs());
            }
        });
        Waiting {
            task: Some(task),
            tty: true,
        }
    }
}

/// `abproxy run`: what to freeze and what to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The proxies (at least one, at most [`MAX_PROXIES`]), frozen together.
    pub targets: Vec<Target>,
    /// TLS to the proxy.
    pub tls: ClientTls,
    /// The freeze (holdUntilUnbind is set whatever this says).
    pub request: FreezeRequest,
    /// Limit for connecting, binding and ON.
    pub on_timeout: Duration,
    /// Limit for OFF.
    pub off_timeout: Duration,
    /// The command and its arguments (not empty).
    pub command: Vec<OsString>,
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        n => format!("signal {n}"),
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught.
pub(crate) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(crate) async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// The exit status `run` reports for the command: its own, or 128+N if it
/// died of signal N.
fn exit_status_code(
    status: std::io::Result<std::process::ExitStatus>,
    shown: &str,
    progress: &Progress,
) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(0), _) => 0,
            (Some(c), _) => {
                progress.line(format!("{shown} exited with status {c}"));
                (c & 0xff) as u8
            }
            (None, Some(sig)) => {
                progress.line(format!("{shown} was killed by {}", signal_name(sig)));
                128u8.wrapping_add(sig as u8)
            }
            (None, None) => 1,
        },
        Err(e) => {
            progress.line(format!("cannot wait for {shown}: {e}"));
            1
        }
    }
}

fn shell_words(cmd: &[OsString]) -> String {
    cmd.iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `abproxy run`: freezes (ON with holdUntilUnbind on a connection kept
/// open, so that the freeze ends if this process dies) through every proxy
/// of the spec, all or nothing, runs the command with inherited stdio, then
/// always sends OFF on each same connection: also when the command fails,
/// and on SIGINT/SIGTERM/SIGHUP, which are forwarded to the command (then
/// waited for). Returns the exit status (see [`EXIT_STATUS_HELP`]).
pub async fn run_frozen(spec: RunSpec, progress: &Progress) -> u8 {
    let Some((program, args)) = spec.command.split_first() else {
        progress.line("no command given");
        return exit::USAGE;
    };
    let shown = shell_words(&spec.command);
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            progress.line(format!("cannot catch signals: {e}"));
            return 1;
        }
    };
    let mut held = match freeze_held(
        &spec.targets,
        &spec.tls,
        &spec.request,
        spec.on_timeout,
        spec.off_timeout,
        &mut signals,
        &format!("{shown} was not run"),
        progress,
    )
    .await
    {
        Ok(v) => v,
        Err(code) => return code,
    };
    let several = held.len() > 1;
    for h in &held {
        progress.line(format!(
            "{}{}; running {shown}",
            h.prefix(several),
            h.frozen.message
        ));
    }

    // The command.
    let cmd_code: u8 = match tokio::process::Command::new(program).args(args).spawn() {
        Err(e) => {
            progress.line(format!("cannot run {shown}: {e}"));
            // The shell's convention: 127 not found, 126 found but not run.
            if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
        Ok(mut child) => {
            let pid = child.id();
            let status = loop {
                tokio::select! {
                    st = child.wait() => break st,
                    sig = signals.recv() => {
                        progress.line(format!(
                            "{} received: forwarding it to {shown} and waiting for it to end",
                            signal_name(sig)
                        ));
                        if let Some(pid) = pid {
                            // SAFETY: kill(2) on our own child's pid, not yet reaped.
                            unsafe { libc::kill(pid as libc::pid_t, sig) };
                        }
                    }
                    (i, reason) = any_lost(&mut held) => {
                        progress.line(format!(
                            "warning: {}{reason} while {shown} runs: the proxy has dropped the freeze \
                             (holdUntilUnbind), the backup may be inconsistent",
                            held[i].prefix(several)
                        ));
                        held[i].lost = true;
                    }
                }
            };
            exit_status_code(status, &shown, progress)
        }
    };

    // OFF, always, on the same connections.
    let freeze_problem = release_held(
        &mut held,
        spec.off_timeout,
        &format!("{shown} finished"),
        progress,
    )
    .await;
    close_all(held).await;
    match (cmd_code, freeze_problem) {
        (0, Some(code)) => code,
        (code, _) => code,
    }
}

/// The most proxies one command may freeze together.
pub const MAX_PROXIES: usize = 16;

/// One proxy's freeze, on the connection it was set up on.
#[derive(Debug)]
pub(crate) struct Held {
    /// The proxy.
    pub(crate) url: String,
    /// The connection the freeze was set up on (holdUntilUnbind, for the
    /// freezes that must end if this process dies).
    pub(crate) session: Session,
    /// Its ON's answer.
    pub(crate) frozen: Frozen,
    /// The connection was lost: the proxy has dropped the freeze.
    pub(crate) lost: bool,
    /// OFF's answer, once released ("released after N s; M queued
    /// request(s) resumed; ...").
    pub(crate) released: Option<String>,
}

impl Held {
    /// "URL: " before a line about this proxy when there are several.
    pub(crate) fn prefix(&self, several: bool) -> String {
        if several {
            format!("{}: ", self.url)
        } else {
            String::new()
        }
    }
}

/// The most serious of several exit statuses, `None` if there is none:
/// a freeze that failed or did not last (6), then a timeout (5), a proxy
/// not reached (4), a refusal (3), then any other (7: released, the server
/// not back yet).
pub fn worst(codes: impl IntoIterator<Item = u8>) -> Option<u8> {
    let rank = |c: u8| match c {
        exit::FAILED => 10,
        exit::TIMEOUT => 9,
        exit::UNREACHABLE => 8,
        exit::REFUSED => 7,
        exit::USAGE => 6,
        _ => 0,
    };
    codes.into_iter().max_by_key(|&c| (rank(c), c))
}

/// ON through every proxy of `targets` at once, each on a new connection
/// and within `limit` of its own; in `targets`' order, each freeze (its
/// connection kept open) or why it failed.
pub(crate) async fn on_each(
    targets: &[Target],
    tls: &ClientTls,
    request: &FreezeRequest,
    limit: Duration,
) -> Vec<Result<Held, OpError>> {
    futures::future::join_all(targets.iter().map(|target| async move {
        let what = format!("the freeze (ON) at {}", target.url);
        let on = within(limit, &what, ON_TIMEOUT_HINT, async {
            let mut session = Session::connect_tls(target, tls).await?;
            let frozen = session.on(request).await?;
            Ok(Held {
                url: target.url.clone(),
                session,
                frozen,
                lost: false,
                released: None,
            })
        })
        .await;
        on.map_err(|e| {
            if e.kind == ErrorKind::Timeout && request.hold_until_unbind {
                // A timed-out ON closes its connection: with holdUntilUnbind
                // the proxy then drops the freeze, whatever stage it was in.
                OpError {
                    hint: "the connection was closed, so the proxy drops the freeze \
                           (holdUntilUnbind); give --timeout to wait longer"
                        .into(),
                    ..e
                }
            } else {
                e
            }
        })
    }))
    .await
}

/// OFF naming each freeze of `held` on its own connection, all at once,
/// each within `limit`; `None` for a freeze whose connection was lost.
pub(crate) async fn off_each(
    held: &mut [Held],
    limit: Duration,
) -> Vec<Option<Result<Released, OpError>>> {
    futures::future::join_all(held.iter_mut().map(|h| async move {
        if h.lost {
            return None;
        }
        let what = format!("the release (OFF) at {}", h.url);
        // Naming the freeze: if it ended early (the lease) and another job
        // froze since, this OFF must not end that job's freeze.
        Some(
            within(
                limit,
                &what,
                TIMEOUT_HINT,
                h.session.off_freeze(h.frozen.id()),
            )
            .await,
        )
    }))
    .await
}

/// The results of [`on_each`], all or nothing: every freeze, or (when
/// one proxy refused or failed) those that were set up released again by
/// an OFF naming each, every step told with `say`, and the exit status of
/// the first failure in `targets`' order. `not_done`: what is therefore
/// not done (with one proxy, said on its error's line as before).
pub(crate) async fn all_or_nothing(
    targets: &[Target],
    results: Vec<Result<Held, OpError>>,
    off_limit: Duration,
    not_done: &str,
    say: &impl Fn(String),
) -> Result<Vec<Held>, u8> {
    let several = results.len() > 1;
    if !several {
        return match results.into_iter().next() {
            Some(Ok(h)) => Ok(vec![h]),
            Some(Err(e)) => {
                say(format!("error: {e}; {not_done}"));
                Err(e.exit_code())
            }
            None => Err(exit::USAGE),
        };
    }
    let total = results.len();
    let mut first_failure = None;
    let mut frozen = Vec::new();
    let mut failed = Vec::new();
    for (t, r) in targets.iter().zip(results) {
        match r {
            Ok(h) => frozen.push(h),
            Err(e) => {
                first_failure.get_or_insert(e.exit_code());
                failed.push((&t.url, e));
            }
        }
    }
    let Some(code) = first_failure else {
        return Ok(frozen);
    };
    for (url, e) in &failed {
        say(format!("{url}: error: {e}"));
    }
    let offs = off_each(&mut frozen, off_limit).await;
    for (h, off) in frozen.iter().zip(offs) {
        let url = &h.url;
        match off {
            Some(Ok(Released::Released(msg))) => {
                say(format!("{url}: released again (all or nothing): {msg}"))
            }
            Some(Ok(Released::NotFrozen)) => say(format!(
                "{url}: released again (all or nothing): its freeze had already ended"
            )),
            Some(Err(e)) => say(format!(
                "{url}: error: releasing it again failed: {e}; its connection is closed, so \
                 the proxy drops the freeze (holdUntilUnbind) if it was asked for; check with \
                 `abproxy status --url {url}`"
            )),
            None => {}
        }
    }
    close_all(frozen).await;
    say(format!(
        "error: the freeze failed at {} of {total} proxies (all or nothing: none is left \
         frozen); {not_done}",
        failed.len()
    ));
    Err(code)
}

/// Unbinds and closes every connection of `held`.
pub(crate) async fn close_all(held: Vec<Held>) {
    futures::future::join_all(held.into_iter().map(|h| h.session.close())).await;
}

/// Resolves when the connection of one of `held` (not already lost) ends:
/// its index and the reason; pending forever when all are lost.
async fn any_lost(held: &mut [Held]) -> (usize, String) {
    let waits: Vec<_> = held
        .iter_mut()
        .enumerate()
        .filter(|(_, h)| !h.lost)
        .map(|(i, h)| Box::pin(async move { (i, h.session.lost().await) }))
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(waits).await.0
}

/// ON with holdUntilUnbind through every proxy of `targets` at once, each
/// on a new connection that the caller keeps for as long as the freeze
/// must last (so the freeze ends if this process dies), with a "draining…"
/// progress line; all or nothing (see [`all_or_nothing`]: a freeze set up
/// while another failed is released again, within `off_timeout`). On
/// failure, or a signal before the freezes are in place, prints why
/// (`not_done`: what was therefore not done) and returns the exit status.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn freeze_held(
    targets: &[Target],
    tls: &ClientTls,
    request: &FreezeRequest,
    on_timeout: Duration,
    off_timeout: Duration,
    signals: &mut Signals,
    not_done: &str,
    progress: &Progress,
) -> Result<Vec<Held>, u8> {
    let request = request.clone().with_hold_until_unbind(true);
    let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
    let waiting = progress.waiting(format!(
        "draining… (freeze requested at {})",
        urls.join(", ")
    ));
    let results = tokio::select! {
        r = on_each(targets, tls, &request, on_timeout) => r,
        sig = signals.recv() => {
            drop(waiting);
            let (closed, drops) = if targets.len() > 1 {
                ("connections are", "each proxy drops its freeze")
            } else {
                ("connection is", "the proxy drops the freeze")
            };
            progress.line(format!(
                "{} received before the freeze was in place: {not_done}; \
                 the {closed} closed, so {drops}",
                signal_name(sig)
            ));
            return Err(128 + sig as u8);
        }
    };
    drop(waiting);
    all_or_nothing(targets, results, off_timeout, not_done, &|m| {
        progress.line(m)
    })
    .await
}

/// OFF naming each freeze of `held`, on its own connection, all at once,
/// each within `off_timeout`; prints the answers (each line after its
/// proxy's URL when there are several). `None` when every freeze was
/// released, else the most serious exit status (see [`worst`]) that tells
/// what went wrong (a freeze whose connection was lost: 6; `until`: what
/// the freeze had to last until, for the message when it had already
/// ended).
pub(crate) async fn release_held(
    held: &mut [Held],
    off_timeout: Duration,
    until: &str,
    progress: &Progress,
) -> Option<u8> {
    let several = held.len() > 1;
    let offs = off_each(held, off_timeout).await;
    let mut codes = Vec::new();
    let mut released = vec![None; held.len()];
    for (i, (h, off)) in held.iter().zip(offs).enumerate() {
        let p = h.prefix(several);
        match off {
            None => codes.push(exit::FAILED),
            Some(Ok(r @ Released::Released(_))) => {
                if r.server_down() {
                    codes.push(exit::SERVER_DOWN);
                }
                if let Released::Released(msg) = r {
                    progress.line(format!("{p}{msg}"));
                    released[i] = Some(msg);
                }
            }
            Some(Ok(Released::NotFrozen)) => {
                progress.line(format!(
                    "{p}warning: the freeze had already ended before {until} \
                     (released by another `abproxy off`?), the backup may be inconsistent"
                ));
                codes.push(exit::FAILED);
            }
            Some(Err(e)) => {
                let word = if e.kind == ErrorKind::Expired {
                    "warning"
                } else {
                    "error"
                };
                progress.line(format!("{p}{word}: OFF: {e}"));
                codes.push(e.exit_code());
            }
        }
    }
    for (h, msg) in held.iter_mut().zip(released) {
        h.released = msg;
    }
    worst(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_and_busy_text() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_491_163), "2026-11-24T03:32:43Z");
        assert_eq!(
            readable_since(
                "already frozen by X (conn 2) since 0 (unix time, 3 s ago; freeze id 1)"
            ),
            "already frozen by X (conn 2) since 1970-01-01T00:00:00Z (3 s ago; freeze id 1)"
        );
        assert_eq!(readable_since("since when"), "since when");
    }

    #[test]
    fn the_summary_names_sessions_carried_only_when_there_are_some() {
        let mut st = Status::from(AllowBackupStatus::thawed(vec![]));
        assert!(!st.render(0).contains("sessions:"));
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["sessions_waiting"], 0);
        st.sessions_waiting = 2;
        st.sessions_carried = 7;
        assert!(
            st.render(0).contains(
                "sessions:  2 waiting for the server, 7 carried, 0 not carried (across server \
                 restarts)"
            ),
            "{}",
            st.render(0)
        );
    }

    #[test]
    fn the_worst_of_several_statuses() {
        assert_eq!(worst([]), None);
        assert_eq!(worst([exit::SERVER_DOWN]), Some(exit::SERVER_DOWN));
        assert_eq!(
            worst([exit::SERVER_DOWN, exit::REFUSED, exit::UNREACHABLE]),
            Some(exit::UNREACHABLE)
        );
        assert_eq!(
            worst([exit::TIMEOUT, exit::FAILED, exit::SERVER_DOWN]),
            Some(exit::FAILED)
        );
    }

    #[test]
    fn freeze_id_of_an_on_message() {
        let id = |m: &str| Frozen { message: m.into() }.id();
        assert_eq!(
            id("frozen: dc=example,dc=org; drained in 0 ms; lease 600 s; freeze id 42"),
            Some(42)
        );
        assert_eq!(id("frozen: dc=example,dc=org"), None);
    }

    #[test]
    fn password_is_never_shown() {
        let t = Target {
            url: DEFAULT_URL.into(),
            bind_dn: Some("cn=x".into()),
            password: Some(Password::new("hunter2")),
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn request_values() {
        let r = FreezeRequest::default()
            .with_backends(["dc=example,dc=org"])
            .with_time_limit(5)
            .with_hold_until_unbind(true);
        assert_eq!(
            r.to_proto(),
            AllowBackupRequest::on()
                .with_time_limit(5)
                .with_dn_set(["dc=example,dc=org"])
                .with_hold_until_unbind(true)
        );
        assert_eq!(r.default_timeout(), Duration::from_secs(35));
        assert_eq!(
            FreezeRequest::default().to_proto(),
            AllowBackupRequest::on()
        );
    }
}
