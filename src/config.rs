//! Configuration: a TOML file (serde) with defaults, overridden by CLI flags.
//!
//! ```toml
//! listen = ["ldap://127.0.0.1:3389", "ldapi:///run/abproxy/ldapi"]
//! upstream = "ldap://127.0.0.1:389"
//! max_pdu_bytes = 16777216
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::endpoint::Endpoint;
use crate::freeze::backend::{BackendMap, Mode};
use crate::freeze::drivers::DriverKind;
use crate::freeze::settings::FreezeConfig;
use crate::secret::{Credentials, Password};

/// A configuration problem, reported before anything starts.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything `abproxy serve` needs. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client-facing listeners: `ldap://HOST:PORT` or `ldapi://PATH`
    /// (percent-encoded like OpenLDAP's, or a plain absolute path).
    pub listen: Vec<String>,
    /// The LDAP server behind the proxy: `ldap://HOST:PORT` or `ldapi://PATH`.
    pub upstream: String,
    /// Largest request PDU accepted from a client, in bytes (header included).
    pub max_pdu_bytes: usize,
    /// Largest response PDU accepted from the upstream, in bytes.
    pub max_response_pdu_bytes: usize,
    /// Largest request PDU accepted before a successful bind (anonymous
    /// sessions), like slapd's `sockbuf_max_incoming`.
    pub max_pdu_bytes_anonymous: usize,
    /// Client connections over all listeners; more are told `unavailable`
    /// (Notice of Disconnection) and closed at once. 0: no limit.
    pub max_connections: usize,
    /// Client connections from one source IP address (TCP listeners). 0: no limit.
    pub max_connections_per_source: usize,
    /// A session with nothing in flight and nothing received for this many
    /// seconds is closed with a Notice of Disconnection. 0: never.
    pub idle_timeout_secs: u64,
    /// Requests in flight upstream per connection (persistent searches not
    /// counted); when reached, the proxy stops reading that client.
    pub max_outstanding_per_conn: usize,
    /// Response bytes buffered for a client that does not read; when
    /// reached, the proxy stops reading that client's upstream connection.
    pub client_buffer_bytes: usize,
    /// Time allowed to connect to the upstream for a new client, in seconds.
    pub upstream_connect_timeout_secs: u64,
    /// On SIGTERM/SIGINT: time allowed to in-flight operations to finish.
    pub shutdown_grace_secs: u64,
    /// Carry sessions to a new upstream connection when the server closes
    /// theirs during a `stop`-mode freeze (a cold backup, a restore, an
    /// upgrade): the proxy keeps each session's last simple bind request
    /// in memory to replay it. false: such sessions end as the server ends
    /// them, and no bind request is kept.
    pub carry_sessions: bool,
    /// How long a session being carried tries to reach the server again
    /// (with backoff) before it ends, in seconds.
    pub upstream_retry_secs: u64,
    /// Carry sessions across a restart of the server outside freezes too
    /// (an unannounced restart): a session whose connection the server
    /// closed gets a new one at its next request (with `carry_sessions`).
    pub upstream_reconnect: bool,
    /// Threads of the proxy (0: auto, see `proxy::runtime::plan`: half the
    /// CPUs with the server on this host, one per CPU in front of another;
    /// 1: one thread runs everything).
    pub threads: usize,
    /// Sessions per thread that run as tasks of their own; the sessions
    /// opened beyond that share one pool task per thread, whose wake-up
    /// serves every one of them that is ready (fewer instructions per
    /// operation under load, a few more with one session alone). 0: every
    /// session in a pool.
    pub session_tasks_per_thread: usize,
    /// Where backend drivers record what they changed on the servers until
    /// it is undone, so a restart after a crash undoes it. None: memory only.
    pub state_file: Option<PathBuf>,
    /// Backends by suffix. Empty: the upstream's namingContexts (rootDSE),
    /// all in `readonly` mode, read at start-up and again at each freeze.
    pub backends: Vec<BackendConfig>,
    /// The Allow-Backup freeze.
    pub freeze: FreezeConfig,
    /// TLS to clients and to the upstream.
    pub tls: crate::tls::TlsConfig,
    /// The roll-forward journal of every write (off unless `dir` is set).
    pub journal: crate::journal::JournalConfig,
    /// The Prometheus endpoint (off unless `listen` is set).
    pub metrics: MetricsConfig,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` of the HTTP endpoint serving `/metrics`, `/healthz`
    /// and `/readyz` (e.g. `127.0.0.1:9330`). None: no endpoint.
    pub listen: Option<String>,
}

/// One `[[backends]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend's suffix DN.
    pub suffix: String,
    /// `readonly` (hold writes), `stop` (hold everything) or `unimplemented`.
    #[serde(default)]
    pub mode: Mode,
    /// `none` (proxy-level freeze only), `command`, `openldap` or `389ds`.
    #[serde(default)]
    pub driver: DriverKind,
    /// `command` driver: argv run after the drain (PREPARE).
    #[serde(default)]
    pub prepare: Vec<String>,
    /// `command` driver: argv run on OFF and after any failure (DONE).
    #[serde(default)]
    pub done: Vec<String>,
    /// `command` driver: time limit of each command, in seconds.
    #[serde(default = "default_driver_timeout")]
    pub driver_timeout_secs: u64,
    /// `openldap`/`389ds` drivers: the server's cn=config, `ldapi://...`
    /// (SASL EXTERNAL) or `ldap://...` with `config_bind_dn`.
    #[serde(default)]
    pub config_url: Option<String>,
    /// `openldap` driver: simple bind DN for cn=config (else SASL EXTERNAL).
    #[serde(default)]
    pub config_bind_dn: Option<String>,
    /// `openldap` driver: file holding the password of `config_bind_dn`.
    #[serde(default)]
    pub config_password_file: Option<PathBuf>,
}

fn default_driver_timeout() -> u64 {
    60
}

impl BackendConfig {
    /// A backend with this suffix and mode, no driver.
    pub fn new(suffix: &str, mode: Mode) -> Self {
        BackendConfig {
            suffix: suffix.into(),
            mode,
            driver: DriverKind::None,
            prepare: Vec::new(),
            done: Vec::new(),
            driver_timeout_secs: default_driver_timeout(),
            config_url: None,
            config_bind_dn: None,
            config_password_file: None,
        }
    }
}

impl BackendConfig {
    /// This backend as the proxy runs it: its driver typed, its cn=config
    /// URL parsed and password file read.
    fn settings(&self) -> Result<BackendSettings, ConfigError> {
        let suffix = &self.suffix;
        let invalid = |m: String| ConfigError::Invalid(format!("backend {suffix}: {m}"));
        let cmds = !self.prepare.is_empty() || !self.done.is_empty();
        let driver = match self.driver {
            DriverKind::None if cmds => {
                return Err(invalid(
                    "prepare/done commands need driver = \"command\"".into(),
                ))
            }
            DriverKind::None => DriverSettings::None,
            DriverKind::Command if !cmds => {
                return Err(invalid(
                    "driver \"command\" needs prepare and/or done commands".into(),
                ))
            }
            DriverKind::Command => DriverSettings::Command {
                prepare: self.prepare.clone(),
                done: self.done.clone(),
            },
            DriverKind::Openldap | DriverKind::Ds389 => {
                let Some(url) = &self.config_url else {
                    let (name, example) = if self.driver == DriverKind::Ds389 {
                        ("389ds", "ldapi:///run/slapd-INSTANCE.socket")
                    } else {
                        ("openldap", "ldapi:///var/run/slapd/ldapi")
                    };
                    return Err(invalid(format!(
                        "driver \"{name}\" needs config_url (e.g. {example})"
                    )));
                };
                Endpoint::parse(url).map_err(|e| invalid(format!("config_url: {e}")))?;
                let bind = match (&self.config_bind_dn, &self.config_password_file) {
                    (None, None) => None,
                    (Some(dn), Some(file)) => {
                        let pw = std::fs::read_to_string(file).map_err(|e| {
                            invalid(format!("config_password_file {}: {e}", file.display()))
                        })?;
                        Some(Credentials {
                            dn: dn.clone(),
                            password: Password::new(pw.lines().next().unwrap_or("")),
                        })
                    }
                    _ => {
                        return Err(invalid(
                            "config_bind_dn and config_password_file go together".into(),
                        ))
                    }
                };
                let access = ConfigAccess {
                    url: url.clone(),
                    bind,
                };
                if self.driver == DriverKind::Ds389 {
                    DriverSettings::Ds389(access)
                } else {
                    DriverSettings::Openldap(access)
                }
            }
        };
        if self.driver_timeout_secs == 0 {
            return Err(invalid("driver_timeout_secs must be positive".into()));
        }
        Ok(BackendSettings {
            suffix: self.suffix.clone(),
            mode: self.mode,
            driver,
            deadline: Duration::from_secs(self.driver_timeout_secs),
        })
    }
}

/// The configuration the proxy runs with: built once from the file's
/// [`Config`] by [`Config::settings`], every value checked, parsed and
/// typed. The proxy reads nothing else.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Client-facing listeners.
    pub listen: Vec<Endpoint>,
    /// The LDAP server behind the proxy.
    pub upstream: Endpoint,
    /// Sizes and counts.
    pub limits: Limits,
    /// A session idle this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Time allowed to connect to the upstream.
    pub upstream_connect_timeout: Duration,
    /// On SIGTERM/SIGINT: time allowed to in-flight operations to finish.
    pub shutdown_grace: Duration,
    /// Carry sessions across a server restart during a `stop` freeze.
    pub carry_sessions: bool,
    /// How long a session being carried tries to reach the server again.
    pub upstream_retry: Duration,
    /// Carry sessions across restarts outside freezes too.
    pub upstream_reconnect: bool,
    /// Threads (0: auto, see `proxy::runtime::plan`).
    pub threads: usize,
    /// Sessions per thread that run as tasks of their own (see
    /// `proxy::pool`).
    pub session_tasks_per_thread: usize,
    /// The drivers' state file, if configured.
    pub state_file: Option<PathBuf>,
    /// The configured backends by suffix (empty: from the root DSE).
    pub backend_map: BackendMap,
    /// The configured backends with their drivers, in file order.
    pub backends: Vec<BackendSettings>,
    /// The freeze.
    pub freeze: FreezeConfig,
    /// TLS to clients and to the upstream.
    pub tls: crate::tls::TlsConfig,
    /// The roll-forward journal, when on.
    pub journal: Option<crate::journal::JournalSettings>,
    /// Where the metrics endpoint listens, when on.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Sizes and counts a session and the listeners are held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request after a successful bind.
    pub max_pdu_bytes: usize,
    /// Largest request before a successful bind (at most `max_pdu_bytes`).
    pub max_pdu_bytes_anonymous: usize,
    /// Largest response from the upstream.
    pub max_response_pdu_bytes: usize,
    /// Client connections over all listeners (0: no limit).
    pub max_connections: usize,
    /// Client connections from one source address (0: no limit).
    pub max_connections_per_source: usize,
    /// Requests in flight upstream per connection.
    pub max_outstanding_per_conn: usize,
    /// Response bytes buffered for a client that does not read.
    pub client_buffer_bytes: usize,
}

impl Limits {
    /// The request size limit of a session, before and after a bind.
    pub fn pdu_limit(&self, authenticated: bool) -> usize {
        if authenticated {
            self.max_pdu_bytes
        } else {
            self.max_pdu_bytes_anonymous
        }
    }
}

/// One configured backend as the proxy runs it.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Its suffix DN, as configured.
    pub suffix: String,
    /// What a freeze holds.
    pub mode: Mode,
    /// Its driver.
    pub driver: DriverSettings,
    /// The deadline of each driver step.
    pub deadline: Duration,
}

/// A backend's driver and what it needs.
#[derive(Debug, Clone)]
pub enum DriverSettings {
    /// The proxy-level freeze only.
    None,
    /// Commands run after the drain (PREPARE) and on OFF (DONE).
    Command {
        /// argv of PREPARE.
        prepare: Vec<String>,
        /// argv of DONE.
        done: Vec<String>,
    },
    /// OpenLDAP's cn=config.
    Openldap(ConfigAccess),
    /// 389 DS's cn=config.
    Ds389(ConfigAccess),
}

/// How a driver reaches the server's cn=config.
#[derive(Debug, Clone)]
pub struct ConfigAccess {
    /// `ldapi://...` (SASL EXTERNAL) or `ldap://...`.
    pub url: String,
    /// A simple bind, else SASL EXTERNAL.
    pub bind: Option<Credentials>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec!["ldap://127.0.0.1:3389".into()],
            upstream: "ldap://127.0.0.1:389".into(),
            max_pdu_bytes: crate::wire::DEFAULT_MAX_PDU,
            max_response_pdu_bytes: 64 * 1024 * 1024,
            max_pdu_bytes_anonymous: 262_143,
            max_connections: 10_000,
            max_connections_per_source: 0,
            idle_timeout_secs: 0,
            max_outstanding_per_conn: 1000,
            client_buffer_bytes: 256 * 1024,
            upstream_connect_timeout_secs: 5,
            shutdown_grace_secs: 10,
            carry_sessions: true,
            upstream_retry_secs: 60,
            upstream_reconnect: false,
            threads: 0,
            session_tasks_per_thread: 2,
            state_file: None,
            backends: Vec::new(),
            freeze: FreezeConfig::default(),
            tls: crate::tls::TlsConfig::default(),
            journal: crate::journal::JournalConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks every value and builds the settings the proxy runs with
    /// (endpoints parsed, backends and their drivers typed, the password
    /// files of cn=config binds read). Done once, at start-up or by
    /// `abproxy serve --check-config`.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid("no listener configured".into()));
        }
        // Smallest useful PDU: an unbind request is 7 bytes; anything below
        // a few hundred bytes would refuse ordinary binds.
        if self.max_pdu_bytes < 512 || self.max_response_pdu_bytes < 512 {
            return Err(ConfigError::Invalid(
                "max_pdu_bytes and max_response_pdu_bytes must be at least 512".into(),
            ));
        }
        if self.max_pdu_bytes > u32::MAX as usize || self.max_response_pdu_bytes > u32::MAX as usize
        {
            return Err(ConfigError::Invalid(
                "PDU size limits must fit in 4 BER length octets (< 4 GiB)".into(),
            ));
        }
        if self.max_pdu_bytes_anonymous < 512 {
            return Err(ConfigError::Invalid(
                "max_pdu_bytes_anonymous must be at least 512 (binds must fit)".into(),
            ));
        }
        if self.max_outstanding_per_conn == 0 || self.client_buffer_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "max_outstanding_per_conn must be positive and client_buffer_bytes at least 4096"
                    .into(),
            ));
        }
        let settings = self.build()?;
        self.tls
            .validate(&settings.listen, &settings.upstream)
            .map_err(ConfigError::Invalid)?;
        self.freeze
            .validate(self.max_pdu_bytes, self.tls.client_ca_file.is_some())
            .map_err(ConfigError::Invalid)?;
        Ok(settings)
    }

    /// Builds the settings, parsing what must be parsed but without the
    /// range checks of [`Config::settings`]: the fuzz harness runs sessions
    /// with limits far below what a deployment may configure.
    pub(crate) fn build(&self) -> Result<Settings, ConfigError> {
        let listen = self
            .listen
            .iter()
            .map(|u| Endpoint::parse(u).map_err(|e| ConfigError::Invalid(format!("listen: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let upstream = Endpoint::parse(&self.upstream)
            .map_err(|e| ConfigError::Invalid(format!("upstream: {e}")))?;
        let backend_map = BackendMap::new(self.backends.iter().map(|b| (b.suffix.clone(), b.mode)))
            .map_err(|e| ConfigError::Invalid(format!("backends: {e}")))?;
        let backends = self
            .backends
            .iter()
            .map(BackendConfig::settings)
            .collect::<Result<Vec<_>, _>>()?;
        let secs = Duration::from_secs;
        Ok(Settings {
            listen,
            upstream,
            limits: Limits {
                max_pdu_bytes: self.max_pdu_bytes,
                max_pdu_bytes_anonymous: self.max_pdu_bytes_anonymous.min(self.max_pdu_bytes),
                max_response_pdu_bytes: self.max_response_pdu_bytes,
                max_connections: self.max_connections,
                max_connections_per_source: self.max_connections_per_source,
                max_outstanding_per_conn: self.max_outstanding_per_conn,
                client_buffer_bytes: self.client_buffer_bytes,
            },
            idle_timeout: (self.idle_timeout_secs > 0).then(|| secs(self.idle_timeout_secs)),
            upstream_connect_timeout: secs(self.upstream_connect_timeout_secs),
            shutdown_grace: secs(self.shutdown_grace_secs),
            carry_sessions: self.carry_sessions,
            upstream_retry: secs(self.upstream_retry_secs),
            upstream_reconnect: self.carry_sessions && self.upstream_reconnect,
            threads: self.threads,
            session_tasks_per_thread: self.session_tasks_per_thread,
            state_file: self.state_file.clone(),
            backend_map,
            backends,
            freeze: self.freeze.clone(),
            tls: self.tls.clone(),
            journal: self.journal.settings().map_err(ConfigError::Invalid)?,
            metrics_listen: match &self.metrics.listen {
                None => None,
                Some(a) => Some(a.parse().map_err(|e| {
                    ConfigError::Invalid(format!(
                        "metrics listen {a:?}: {e} (expected IP:PORT, e.g. 127.0.0.1:9330)"
                    ))
                })?),
            },
        })
    }

    /// Checks every value (see [`Config::settings`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.settings().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_files() {
        let c = Config::from_toml("upstream = \"ldapi:///tmp/x\"").unwrap();
        assert_eq!(c.upstream, "ldapi:///tmp/x");
        assert_eq!(c.max_pdu_bytes, 16 * 1024 * 1024);
        assert_eq!(c.listen, Config::default().listen);
        c.validate().unwrap();
    }

    #[test]
    fn sessions_as_tasks_per_thread_reach_the_settings() {
        let c = Config::from_toml("upstream = \"ldapi:///tmp/x\"").unwrap();
        assert_eq!(c.settings().unwrap().session_tasks_per_thread, 2);
        let c = Config::from_toml("upstream = \"ldapi:///tmp/x\"\nsession_tasks_per_thread = 0")
            .unwrap();
        assert_eq!(c.settings().unwrap().session_tasks_per_thread, 0);
    }

    #[test]
    fn backends_and_freeze_tables() {
        let c = Config::from_toml(
            r#"
            [[backends]]
            suffix = "dc=example,dc=org"
            [[backends]]
            suffix = "dc=other,dc=org"
            mode = "stop"
            [freeze]
            allowed = ["cn=admin,dc=example,dc=org"]
            max_drain_secs = 5
            "#,
        )
        .unwrap();
        let map = c.settings().unwrap().backend_map;
        assert_eq!(map.len(), 2);
        assert_eq!(map.backends()[0].mode, Mode::Readonly);
        assert_eq!(map.backends()[1].mode, Mode::Stop);
        assert_eq!(c.freeze.max_drain_secs, 5);
        assert_eq!(c.freeze.lease_secs, 600);
        assert!(Config::from_toml("[[backends]]\nsuffix = \"x\"\nmode = \"frozen\"").is_err());
        let bad = Config::from_toml("[[backends]]\nsuffix = \"nodn\"").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("backends"));
        let bad = Config::from_toml("[freeze]\nallowed = [\"\"]").unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::from_toml("lisen = []").is_err());
        assert!(Config::from_toml("max_pdu_bytes = -1").is_err());
        let c = Config {
            max_pdu_bytes: 10,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            upstream: "http://x".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("upstream"));
        let c = Config {
            listen: vec![],
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_parsed() {
        assert_eq!(Config::default().settings().unwrap().metrics_listen, None);
        let c = Config::from_toml("[metrics]\nlisten = \"127.0.0.1:9330\"").unwrap();
        let addr = c.settings().unwrap().metrics_listen.unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:9330");
        let bad = Config::from_toml("[metrics]\nlisten = \"localhost\"").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("metrics"));
        assert!(Config::from_toml("[metrics]\nlistn = \"x\"").is_err());
    }

    #[test]
    fn settings_are_typed_once() {
        let dir = std::env::temp_dir().join(format!("abproxy-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\nignored second line\n").unwrap();
        let text = format!(
            r#"
            listen = ["ldap://127.0.0.1:3389", "ldapi:///tmp/x"]
            upstream = "ldap://127.0.0.1:389"
            idle_timeout_secs = 30
            max_pdu_bytes = 4096
            max_pdu_bytes_anonymous = 100000
            [[backends]]
            suffix = "dc=example,dc=org"
            driver = "openldap"
            config_url = "ldap://127.0.0.1:389"
            config_bind_dn = "cn=admin,cn=config"
            config_password_file = "{}"
            driver_timeout_secs = 7
            [[backends]]
            suffix = "dc=other,dc=org"
            mode = "stop"
            driver = "command"
            prepare = ["true"]
            "#,
            pw.display()
        );
        let s = Config::from_toml(&text).unwrap().settings().unwrap();
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.upstream, Endpoint::parse("ldap://127.0.0.1:389").unwrap());
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(30)));
        // The anonymous limit never exceeds the authenticated one.
        assert_eq!(s.limits.pdu_limit(false), 4096);
        assert_eq!(s.backend_map.len(), 2);
        match &s.backends[0].driver {
            DriverSettings::Openldap(c) => {
                let bind = c.bind.as_ref().unwrap();
                assert_eq!(bind.dn, "cn=admin,cn=config");
                assert_eq!(bind.password.expose(), "s3cret");
                // Printed, the password is not.
                assert!(!format!("{:?}", s.backends[0]).contains("s3cret"));
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(s.backends[0].deadline, Duration::from_secs(7));
        assert!(matches!(
            &s.backends[1].driver,
            DriverSettings::Command { prepare, done } if prepare == &["true"] && done.is_empty()
        ));
        assert_eq!(s.backends[1].mode, Mode::Stop);
        // A password file that cannot be read is a configuration error,
        // found before anything starts.
        std::fs::remove_file(&pw).unwrap();
        let e = Config::from_toml(&text).unwrap().settings().unwrap_err();
        assert!(e.to_string().contains("config_password_file"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
