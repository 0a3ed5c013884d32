//! The freeze settings: the `[freeze]` table of the configuration file.
//! The configuration (`Config`, whose `freeze` field this is) composes them;
//! the engine reads them.

use serde::Deserialize;

use super::dn::NormDn;

/// Whether binds count as writes for a freeze (`[freeze] bind_is_write`):
/// `true`, `false`, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindIsWrite {
    /// Binds are writes when the server says it has a password policy (its
    /// root DSE lists the password policy control,
    /// 1.3.6.1.4.1.42.2.27.8.5.1: slapd with the ppolicy module, 389 DS),
    /// read at start-up and before each freeze; when the root DSE cannot be
    /// read, they are. The default.
    #[default]
    Auto,
    /// Always writes.
    Yes,
    /// Never writes (the server records nothing on a bind); a start-up
    /// warning says when the server has a password policy.
    No,
}

impl From<bool> for BindIsWrite {
    fn from(b: bool) -> Self {
        if b {
            BindIsWrite::Yes
        } else {
            BindIsWrite::No
        }
    }
}

impl<'de> Deserialize<'de> for BindIsWrite {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(b.into()),
            Raw::Text(t) if t == "auto" => Ok(BindIsWrite::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "bind_is_write: expected true, false or \"auto\", got {t:?}"
            ))),
        }
    }
}

/// The `[freeze]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FreezeConfig {
    /// Bound DNs allowed to freeze, resume and query the status.
    pub allowed: Vec<String>,
    /// Local users (uids) allowed to, without binding, when they connect to
    /// an ldapi listener (the kernel reports their uid).
    pub allowed_uids: Vec<u32>,
    /// Subjects of client certificates (verified against `tls.client_ca_file`)
    /// allowed to, without binding.
    pub allowed_cert_subjects: Vec<String>,
    /// Longest drain an ON may wait for (the request's timeLimit can only
    /// shorten it), in seconds.
    pub max_drain_secs: u64,
    /// Lease: a freeze not ended by OFF ends by itself after this many seconds.
    pub lease_secs: u64,
    /// Treat binds as writes (servers that write on bind: ppolicy, lastbind).
    pub bind_is_write: BindIsWrite,
    /// DNs whose binds the server records nothing for, so that they pass a
    /// freeze even when binds count as writes: the rootdn of each slapd
    /// database (`olcRootDN`; slapd's ppolicy skips it, "Root bypasses
    /// policy"). An operator listed here can connect during a freeze.
    pub root_dns: Vec<String>,
    /// Extended operations known to be read-only (held only in `stop` mode).
    pub read_only_extended: Vec<String>,
    /// Queued requests per connection; when reached, the proxy stops reading
    /// that client (TCP backpressure).
    pub queue_max_requests_per_conn: usize,
    /// Queued bytes per connection (same backpressure).
    pub queue_max_bytes_per_conn: usize,
    /// Queued requests over all connections.
    pub queue_max_requests_total: usize,
    /// Queued bytes over all connections.
    pub queue_max_bytes_total: usize,
    /// Responses of persistent searches held per connection in `stop` mode;
    /// when reached, the proxy stops reading that upstream connection.
    pub held_response_bytes_per_conn: usize,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig {
            allowed: Vec::new(),
            allowed_uids: Vec::new(),
            allowed_cert_subjects: Vec::new(),
            max_drain_secs: 30,
            lease_secs: 600,
            bind_is_write: BindIsWrite::Auto,
            root_dns: Vec::new(),
            read_only_extended: Vec::new(),
            queue_max_requests_per_conn: 1000,
            queue_max_bytes_per_conn: 4 * 1024 * 1024,
            queue_max_requests_total: 100_000,
            queue_max_bytes_total: 256 * 1024 * 1024,
            held_response_bytes_per_conn: 16 * 1024 * 1024,
        }
    }
}

impl FreezeConfig {
    /// Checks the `[freeze]` values: `max_pdu_bytes` is the configured
    /// request size limit, `client_ca` whether `tls.client_ca_file` is set.
    /// The error is the message of `ConfigError::Invalid`.
    pub fn validate(&self, max_pdu_bytes: usize, client_ca: bool) -> Result<(), String> {
        let f = self;
        for dn in &f.allowed_cert_subjects {
            if NormDn::parse(dn.as_bytes()).is_none_or(|n| n.is_root()) {
                return Err(format!("freeze.allowed_cert_subjects: {dn:?} is not a DN"));
            }
        }
        if !f.allowed_cert_subjects.is_empty() && !client_ca {
            return Err(
                "freeze.allowed_cert_subjects needs tls.client_ca_file (client certificates \
                 are only verified against it)"
                    .into(),
            );
        }
        for dn in &f.root_dns {
            if NormDn::parse(dn.as_bytes()).is_none_or(|n| n.is_root()) {
                return Err(format!("freeze.root_dns: {dn:?} is not a DN"));
            }
        }
        for dn in &f.allowed {
            if NormDn::parse(dn.as_bytes()).is_none_or(|n| n.is_root()) {
                return Err(format!("freeze.allowed: {dn:?} is not a DN"));
            }
        }
        if f.lease_secs == 0
            || f.queue_max_requests_per_conn == 0
            || f.queue_max_bytes_per_conn < max_pdu_bytes.min(1 << 20)
            || f.queue_max_requests_total < f.queue_max_requests_per_conn
            || f.queue_max_bytes_total < f.queue_max_bytes_per_conn
        {
            return Err(
                "freeze: lease_secs and queue limits must be positive; per-connection byte \
                 limit at least min(max_pdu_bytes, 1 MiB); totals at least the per-connection limits"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages_name_the_freeze_keys() {
        let max_pdu = 16 * 1024 * 1024;
        FreezeConfig::default().validate(max_pdu, false).unwrap();
        let certs = FreezeConfig {
            allowed_cert_subjects: vec!["cn=backup,dc=example,dc=org".into()],
            ..FreezeConfig::default()
        };
        assert!(certs
            .validate(max_pdu, false)
            .unwrap_err()
            .starts_with("freeze.allowed_cert_subjects needs tls.client_ca_file"));
        certs.validate(max_pdu, true).unwrap();
        let root = FreezeConfig {
            root_dns: vec!["".into()],
            ..FreezeConfig::default()
        };
        assert_eq!(
            root.validate(max_pdu, false).unwrap_err(),
            "freeze.root_dns: \"\" is not a DN"
        );
        let small = FreezeConfig {
            queue_max_bytes_per_conn: 1000,
            ..FreezeConfig::default()
        };
        assert!(small.validate(max_pdu, false).is_err());
        assert!(
            small.validate(512, false).is_ok(),
            "min(max_pdu_bytes, 1 MiB)"
        );
    }
}
