//! TLS, terminated at the proxy (rustls with the *ring* provider, no OpenSSL).
//!
//! * Client side: `ldaps://` listeners and StartTLS on `ldap://` listeners
//!   share one [`ServerTls`], whose certificate and key are reloaded on
//!   SIGHUP (a bad new pair keeps the old one). A client connection that may
//!   turn to TLS is a [`ClientStream`]: its two halves share the socket, so
//!   StartTLS can swap the clear socket for a TLS stream under them while the
//!   session's framed reader and writer stay as they are.
//! * Upstream side: [`UpstreamTls`] connects over `ldaps://` or issues
//!   StartTLS itself on a clear `ldap://` connection, verifying the server's
//!   certificate (CA file or the system store) and, by default, its name.
//!
//! The proxy must read every request (to hold writes during a freeze), so it
//! never forwards a client's TLS stream: each side has its own TLS session.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ldap3_proto::proto::{LdapExtendedRequest, LdapMsg, LdapOp};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::endpoint::{BoxRead, BoxWrite, Endpoint};
use crate::wire::envelope::oid;
use crate::wire::{op, pdu, Envelope, FrameCodec};

/// Debian's bundle of the system's trusted CAs, used for the upstream when
/// no `upstream_ca_file` is given.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The `[tls]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (server certificate first) for `ldaps://`
    /// listeners and StartTLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates: clients presenting a certificate must chain to
    /// one of them; its subject is logged and can be named in
    /// `freeze.allowed_cert_subjects`.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse TLS clients without a certificate.
    pub require_client_cert: bool,
    /// Refuse everything but StartTLS and the root DSE read on clear TCP
    /// sessions with confidentialityRequired (13).
    pub require_tls: bool,
    /// Issue StartTLS on each new `ldap://` upstream connection.
    pub upstream_starttls: bool,
    /// Each session's upstream connection as secure as its client's: clear
    /// for a clear client, StartTLS on it when the client's StartTLS
    /// succeeds, TLS from the start for an `ldaps://` client (see
    /// `upstream_ldaps`). The server's confidentiality rules then decide
    /// as they would for the client itself.
    pub upstream_mirror: bool,
    /// With `upstream_mirror`: the server's `ldaps://HOST:PORT`, for the
    /// sessions of `ldaps://` clients (default: StartTLS on a new
    /// connection to `upstream`).
    pub upstream_ldaps: Option<String>,
    /// PEM CA certificates the upstream's certificate must chain to
    /// (default: the system store, [`SYSTEM_CA_FILE`]).
    pub upstream_ca_file: Option<PathBuf>,
    /// Check that the upstream's certificate names the host of `upstream`
    /// (or `upstream_server_name`).
    pub upstream_verify_hostname: bool,
    /// The name to verify (and send as SNI) instead of the host of `upstream`.
    pub upstream_server_name: Option<String>,
    /// PEM client certificate chain the proxy presents to the upstream.
    pub upstream_cert_file: Option<PathBuf>,
    /// PEM private key of `upstream_cert_file`.
    pub upstream_key_file: Option<PathBuf>,
    /// Time allowed to a TLS handshake (client or upstream), in seconds.
    pub handshake_timeout_secs: u64,
    /// Check `cert_file`, `key_file` and `client_ca_file` for changes every
    /// this many seconds and reload them once they stop changing (0: only
    /// on SIGHUP).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            require_tls: false,
            upstream_starttls: false,
            upstream_mirror: false,
            upstream_ldaps: None,
            upstream_ca_file: None,
            upstream_verify_hostname: true,
            upstream_server_name: None,
            upstream_cert_file: None,
            upstream_key_file: None,
            handshake_timeout_secs: 10,
            reload_check_secs: 0,
        }
    }
}

impl TlsConfig {
    /// Handshake time limit.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// Consistency with the endpoints (files are read by [`ServerTls::load`]
    /// and [`UpstreamTls::load`]).
    pub fn validate(&self, listen: &[Endpoint], upstream: &Endpoint) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("tls.cert_file and tls.key_file go together".into());
        }
        if self.cert_file.is_none() {
            if let Some(l) = listen.iter().find(|e| matches!(e, Endpoint::Tls(_))) {
                return Err(format!("listener {l} needs tls.cert_file and tls.key_file"));
            }
            if self.require_tls {
                return Err(
                    "tls.require_tls needs tls.cert_file and tls.key_file (clients could never \
                     get TLS)"
                        .into(),
                );
            }
            if self.client_ca_file.is_some() {
                return Err("tls.client_ca_file needs tls.cert_file and tls.key_file".into());
            }
        }
        if self.require_client_cert && self.client_ca_file.is_none() {
            return Err("tls.require_client_cert needs tls.client_ca_file".into());
        }
        if self.upstream_cert_file.is_some() != self.upstream_key_file.is_some() {
            return Err("tls.upstream_cert_file and tls.upstream_key_file go together".into());
        }
        if self.upstream_starttls && !matches!(upstream, Endpoint::Tcp(_)) {
            return Err(format!(
                "tls.upstream_starttls needs an ldap:// upstream (not {upstream})"
            ));
        }
        if self.upstream_mirror {
            if !matches!(upstream, Endpoint::Tcp(_)) {
                return Err(format!(
                    "tls.upstream_mirror needs an ldap:// upstream (not {upstream}): each \
                     session's connection starts clear and turns to TLS with its client"
                ));
            }
            if self.upstream_starttls {
                return Err(
                    "tls.upstream_mirror and tls.upstream_starttls exclude each other \
                     (mirror: TLS where the client has it; starttls: TLS for every session)"
                        .into(),
                );
            }
        }
        if let Some(u) = &self.upstream_ldaps {
            if !self.upstream_mirror {
                return Err("tls.upstream_ldaps goes with tls.upstream_mirror".into());
            }
            match Endpoint::parse(u) {
                Ok(Endpoint::Tls(_)) => {}
                _ => {
                    return Err(format!(
                        "tls.upstream_ldaps {u:?} is not an ldaps://HOST:PORT URL"
                    ))
                }
            }
        }
        if let Some(n) = &self.upstream_server_name {
            ServerName::try_from(n.as_str())
                .map_err(|_| format!("tls.upstream_server_name {n:?} is not a host name"))?;
        }
        if self.handshake_timeout_secs == 0 {
            return Err("tls.handshake_timeout_secs must be positive".into());
        }
        Ok(())
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let (good, bad) = roots.add_parsable_certificates(read_certs(path, what)?);
    if good == 0 {
        return Err(format!(
            "{what} {}: none of its {bad} certificate(s) is usable as a CA",
            path.display()
        ));
    }
    Ok(roots)
}

/// The client-facing TLS configuration, reloadable.
#[derive(Debug)]
pub struct ServerTls {
    cfg: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' stamps when last (re)loaded, or tried.
    loaded: Mutex<Stamp>,
}

/// Modification time and size of each TLS file.
type Stamp = Vec<Option<(std::time::SystemTime, u64)>>;

impl ServerTls {
    /// Reads the certificate, key and client CA; `None` when no certificate
    /// is configured (no `ldaps://`, StartTLS answered `unavailable`).
    pub fn load(cfg: &TlsConfig) -> Result<Option<Arc<ServerTls>>, String> {
        if cfg.cert_file.is_none() {
            return Ok(None);
        }
        let stamp = stamp(cfg);
        let config = Self::build(cfg)?;
        Ok(Some(Arc::new(ServerTls {
            cfg: cfg.clone(),
            current: RwLock::new(config),
            loaded: Mutex::new(stamp),
        })))
    }

    fn build(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
        let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
            return Err("tls.cert_file and tls.key_file go together".into());
        };
        let chain = read_certs(cert, "tls.cert_file")?;
        let key_der = read_key(key, "tls.key_file")?;
        let builder = ServerConfig::builder();
        let builder = match &cfg.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(read_roots(ca, "tls.client_ca_file")?);
                let v = WebPkiClientVerifier::builder(roots);
                let v = if cfg.require_client_cert {
                    v
                } else {
                    v.allow_unauthenticated()
                };
                let v = v
                    .build()
                    .map_err(|e| format!("tls.client_ca_file {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(v)
            }
        };
        let config = builder.with_single_cert(chain, key_der).map_err(|e| {
            format!(
                "tls.cert_file {} with tls.key_file {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(Arc::new(config))
    }

    /// The acceptor for the next handshake (the configuration in place now).
    pub fn acceptor(&self) -> TlsAcceptor {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(c.clone())
    }

    /// Re-reads the files. On success, new handshakes use them (sessions
    /// already in TLS keep theirs); on error the configuration in place is
    /// kept and the reason returned.
    pub fn reload(&self) -> Result<(), String> {
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&self.cfg);
        let config = Self::build(&self.cfg)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// With `reload_check_secs`: checks the files at that interval and
    /// reloads them once a change has settled (the same on two checks in a
    /// row), until `stop`. A failed reload keeps the previous pair, is
    /// logged, and is tried again on the next change.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let secs = self.cfg.reload_check_secs;
        if secs == 0 {
            return;
        }
        let every = Duration::from_secs(secs);
        let mut seen = stamp(&self.cfg);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = stamp(&self.cfg);
            let loaded = self
                .loaded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if now != loaded && now == seen {
                match self.reload() {
                    Ok(()) => tracing::info!("TLS files changed: certificate and key reloaded"),
                    Err(e) => tracing::error!(
                        "TLS files changed but cannot be loaded, keeping the previous \
                         certificate: {e}"
                    ),
                }
            }
            seen = now;
        }
    }

    /// Server handshake on a new TCP connection (`ldaps://`), within the
    /// configured time limit; returns the stream and the client
    /// certificate's subject, if one was presented.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Option<String>), String> {
        let tls = tokio::time::timeout(self.cfg.handshake_timeout(), self.acceptor().accept(tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake failed: {}", describe_io(&e)))?;
        let subject = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| cert_subject(c));
        Ok((tls, subject))
    }
}

/// Size and modification time of the server-side TLS files, to notice a
/// change.
fn stamp(cfg: &TlsConfig) -> Stamp {
    [&cfg.cert_file, &cfg.key_file, &cfg.client_ca_file]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The subject of a DER certificate as an RFC 4514 string, the form slapd
/// shows (`cn=backup,o=Example`: last RDN first, attribute names in lower
/// case).
pub fn cert_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let mut avas = Vec::new();
        for ava in rdn.iter() {
            let oid = ava.attr_type().to_id_string();
            let name = match oid.as_str() {
                "2.5.4.3" => "cn".to_string(),
                "2.5.4.6" => "c".into(),
                "2.5.4.7" => "l".into(),
                "2.5.4.8" => "st".into(),
                "2.5.4.10" => "o".into(),
                "2.5.4.11" => "ou".into(),
                "2.5.4.5" => "serialNumber".into(),
                "0.9.2342.19200300.100.1.25" => "dc".into(),
                "0.9.2342.19200300.100.1.1" => "uid".into(),
                "1.2.840.113549.1.9.1" => "emailAddress".into(),
                other => other.to_string(),
            };
            let value = ava.as_str().ok()?;
            avas.push(format!("{name}={}", escape_dn_value(value)));
        }
        rdns.push(avas.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

/// A readable account of a TLS failure: expired, unknown CA, wrong name...
pub fn describe_io(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => describe(r),
        None => e.to_string(),
    }
}

fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "certificate signed by an unknown CA (not in the configured CA file)".into()
            }
            CertificateError::ExpiredContext { time, not_after } => format!(
                "certificate expired {} s ago",
                time.as_secs().saturating_sub(not_after.as_secs())
            ),
            CertificateError::Expired => "certificate expired".into(),
            CertificateError::NotValidYetContext { time, not_before } => format!(
                "certificate not valid yet (for another {} s)",
                not_before.as_secs().saturating_sub(time.as_secs())
            ),
            CertificateError::NotValidYet => "certificate not valid yet".into(),
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "certificate not valid for the server's name: expected {}, the certificate \
                 names {}",
                expected.to_str(),
                presented
                    .iter()
                    .map(|p| presented_name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CertificateError::NotValidForName => {
                "certificate not valid for the server's name".into()
            }
            CertificateError::Revoked => "certificate revoked".into(),
            CertificateError::BadSignature => "certificate has a bad signature".into(),
            other => format!("invalid certificate: {other:?}"),
        },
        E::NoCertificatesPresented => "no certificate presented".into(),
        E::AlertReceived(a) => format!("the peer sent the TLS alert {a:?}"),
        other => other.to_string(),
    }
}

/// rustls lists a certificate's names as `DnsName("x")` / `IpAddress(1.2.3.4)`:
/// just the name.
fn presented_name(p: &str) -> &str {
    p.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            p.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(p)
}

/// Checks the chain like the WebPKI verifier, but accepts a certificate
/// whose names do not match (`upstream_verify_hostname = false`).
#[derive(Debug)]
struct NoHostnameCheck(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for NoHostnameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name: a name error means the
        // chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TLS client configuration (the proxy's upstream side, the operator
/// commands): trusts the CA certificates of `ca_file` (the system store,
/// [`SYSTEM_CA_FILE`], when `None`), checks the server's name unless
/// `verify_hostname` is false, and presents the certificate chain and key
/// of `cert_key` when given. `names` are the options naming the CA file, the
/// certificate and the key, for the error messages.
pub fn client_config(
    ca_file: Option<&Path>,
    cert_key: Option<(&Path, &Path)>,
    verify_hostname: bool,
    names: [&str; 3],
) -> Result<ClientConfig, String> {
    let [ca_name, cert_name, key_name] = names;
    let roots = match ca_file {
        Some(p) => read_roots(p, ca_name)?,
        None => read_roots(Path::new(SYSTEM_CA_FILE), "system CA store")
            .map_err(|e| format!("{e}; set {ca_name} (Debian: apt-get install ca-certificates)"))?,
    };
    let roots = Arc::new(roots);
    let builder = if verify_hostname {
        ClientConfig::builder().with_root_certificates(roots)
    } else {
        let v = rustls::client::WebPkiServerVerifier::builder(roots)
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
        ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoHostnameCheck(v)))
    };
    match cert_key {
        Some((c, k)) => builder
            .with_client_auth_cert(read_certs(c, cert_name)?, read_key(k, key_name)?)
            .map_err(|e| {
                format!(
                    "{cert_name} {} with {key_name} {}: {e}",
                    c.display(),
                    k.display()
                )
            }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// How the proxy reaches a TLS upstream.
pub struct UpstreamTls {
    connector: TlsConnector,
    name: ServerName<'static>,
    starttls: bool,
    timeout: Duration,
}

impl UpstreamTls {
    /// The upstream TLS settings; `None` for a clear `ldap://` upstream
    /// without `upstream_starttls`, and for `ldapi://`.
    pub fn load(cfg: &TlsConfig, upstream: &Endpoint) -> Result<Option<UpstreamTls>, String> {
        let host = match upstream {
            Endpoint::Tls(hp) => host_of(hp),
            Endpoint::Tcp(hp) if cfg.upstream_starttls => host_of(hp),
            _ => return Ok(None),
        };
        UpstreamTls::build(cfg, host, cfg.upstream_starttls).map(Some)
    }

    /// The settings for a server named `host` (unless
    /// `upstream_server_name`), with StartTLS on new connections or not.
    fn build(cfg: &TlsConfig, host: String, starttls: bool) -> Result<UpstreamTls, String> {
        let name = cfg.upstream_server_name.clone().unwrap_or(host);
        let name = ServerName::try_from(name.clone())
            .map_err(|_| format!("upstream TLS: {name:?} is not a host name or address"))?;
        let config = client_config(
            cfg.upstream_ca_file.as_deref(),
            cfg.upstream_cert_file
                .as_deref()
                .zip(cfg.upstream_key_file.as_deref()),
            cfg.upstream_verify_hostname,
            [
                "tls.upstream_ca_file",
                "tls.upstream_cert_file",
                "tls.upstream_key_file",
            ],
        )?;
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            starttls,
            timeout: cfg.handshake_timeout(),
        })
    }

    /// TLS on a fresh TCP connection to the upstream (after StartTLS when
    /// configured); errors say what failed.
    async fn wrap(&self, tcp: TcpStream) -> io::Result<(BoxRead, BoxWrite)> {
        let tls = self.secure(tcp, self.starttls).await?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }

    /// StartTLS (when `starttls`) and the handshake on a fresh connection.
    async fn secure(&self, mut tcp: TcpStream, starttls: bool) -> io::Result<UpstreamTlsStream> {
        if starttls {
            tokio::time::timeout(self.timeout, upstream_starttls(&mut tcp))
                .await
                .map_err(|_| io::Error::other("StartTLS timed out"))??;
        }
        self.handshake(tcp).await.map_err(io::Error::other)
    }

    /// The TLS handshake with the server on a connection whose StartTLS it
    /// has just accepted (or an `ldaps://` one), within the time limit.
    pub async fn handshake(&self, tcp: TcpStream) -> Result<UpstreamTlsStream, String> {
        tokio::time::timeout(self.timeout, self.connector.connect(self.name.clone(), tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake failed: {}", describe_io(&e)))
    }

    /// The time allowed to StartTLS and to a handshake.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A TLS connection to the upstream.
pub type UpstreamTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// `tls.upstream_mirror`: how each session's upstream connection gets the
/// security of its client's.
#[derive(Debug)]
pub struct Mirror {
    /// The handshakes (the upstream's certificate checked as configured).
    pub tls: UpstreamTls,
    /// Where an `ldaps://` client's session connects (`upstream_ldaps`);
    /// `None`: StartTLS on a new connection to the upstream.
    ldaps: Option<Endpoint>,
    /// The `ldap://` upstream.
    upstream: Endpoint,
}

/// The security of a client connection, which a mirrored upstream
/// connection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSecurity {
    /// In TLS (`ldaps://`).
    Tls,
    /// Clear TCP that may turn to TLS (StartTLS).
    Clear,
    /// A unix socket, or a clear connection that can never turn to TLS.
    Fixed,
}

impl ClientSecurity {
    /// A client in TLS (`tls`), or in clear on a stream StartTLS can turn
    /// to TLS (`upgradable`), or neither.
    pub fn of(tls: bool, upgradable: bool) -> ClientSecurity {
        match (tls, upgradable) {
            (true, _) => ClientSecurity::Tls,
            (false, true) => ClientSecurity::Clear,
            (false, false) => ClientSecurity::Fixed,
        }
    }
}

impl Mirror {
    /// The mirror settings, `None` unless `tls.upstream_mirror`.
    pub fn load(cfg: &TlsConfig, upstream: &Endpoint) -> Result<Option<Mirror>, String> {
        if !cfg.upstream_mirror {
            return Ok(None);
        }
        let Endpoint::Tcp(hp) = upstream else {
            return Err(format!(
                "tls.upstream_mirror needs an ldap:// upstream, not {upstream}"
            ));
        };
        let ldaps = cfg
            .upstream_ldaps
            .as_deref()
            .map(Endpoint::parse)
            .transpose()?;
        let tls = UpstreamTls::build(cfg, host_of(hp), true)?;
        Ok(Some(Mirror {
            tls,
            ldaps,
            upstream: upstream.clone(),
        }))
    }

    /// A session's upstream connection for a client of this security: TLS
    /// for a TLS client; clear otherwise, and then (for a client that may
    /// still turn to TLS) as a stream StartTLS can upgrade in place.
    pub async fn connect(
        &self,
        client: ClientSecurity,
    ) -> io::Result<(BoxRead, BoxWrite, Option<UpstreamStream>)> {
        match client {
            ClientSecurity::Tls => {
                let (addr, starttls) = match &self.ldaps {
                    Some(Endpoint::Tls(a)) => (a, false),
                    _ => match &self.upstream {
                        Endpoint::Tcp(a) => (a, true),
                        other => return Err(io::Error::other(format!("not TCP: {other}"))),
                    },
                };
                let tcp = TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                let tls = self.tls.secure(tcp, starttls).await?;
                let (r, w) = tokio::io::split(tls);
                Ok((Box::new(r), Box::new(w), None))
            }
            ClientSecurity::Clear => {
                let Endpoint::Tcp(addr) = &self.upstream else {
                    return Err(io::Error::other("the mirrored upstream is not TCP"));
                };
                let tcp = TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                let stream = UpstreamStream::clear(tcp);
                let (r, w) = stream.halves();
                Ok((r, w, Some(stream)))
            }
            ClientSecurity::Fixed => {
                let (r, w) = self.upstream.connect().await?;
                Ok((r, w, None))
            }
        }
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .field("starttls", &self.starttls)
            .finish_non_exhaustive()
    }
}

fn host_of(hostport: &str) -> String {
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) if !h.is_empty() => h,
        _ => hostport,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Sends StartTLS on a new upstream connection and checks the answer. Reads
/// only the response PDU, so the handshake starts on a clean stream.
async fn upstream_starttls(tcp: &mut TcpStream) -> io::Result<()> {
    let (r, w) = tcp.split();
    let mut out = FramedWrite::new(w, FrameCodec::default());
    let req = LdapMsg::new(
        1,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: std::str::from_utf8(oid::START_TLS)
                .expect("ASCII OID")
                .to_string(),
            value: None,
        }),
    );
    out.send(pdu::encode(req)).await?;
    let mut inp = FramedRead::new(r, FrameCodec::new(64 * 1024));
    let frame = match inp.next().await {
        Some(Ok(f)) => f,
        Some(Err(e)) => return Err(io::Error::other(format!("StartTLS: {e}"))),
        None => {
            return Err(io::Error::other(
                "StartTLS: the server closed the connection",
            ))
        }
    };
    if !inp.read_buffer().is_empty() {
        return Err(io::Error::other(
            "StartTLS: the server sent data after its response",
        ));
    }
    let env = Envelope::response(&frame).map_err(|e| io::Error::other(format!("StartTLS: {e}")))?;
    if env.msgid != 1 || env.op != op::EXTENDED_RESPONSE {
        return Err(io::Error::other(format!(
            "StartTLS: unexpected answer (message {}, operation {})",
            env.msgid,
            op::name(env.op)
        )));
    }
    match env.result_code {
        Some(0) => Ok(()),
        code => Err(io::Error::other(format!(
            "the server refused StartTLS (result code {}: {})",
            code.map_or("?".to_string(), |c| c.to_string()),
            diagnostic(&frame)
        ))),
    }
}

/// The diagnostic message of an LDAP result PDU (empty if unreadable).
fn diagnostic(frame: &[u8]) -> String {
    use tokio_util::codec::Decoder;
    let mut buf = bytes::BytesMut::from(frame);
    match ldap3_proto::LdapCodec::default().decode(&mut buf) {
        Ok(Some(LdapMsg {
            op: LdapOp::ExtendedResponse(r),
            ..
        })) => r.res.message,
        _ => String::new(),
    }
}

/// Connects to the upstream: TCP (then TLS, or StartTLS then TLS, when
/// configured) or a unix socket.
pub async fn connect_upstream(
    ep: &Endpoint,
    tls: Option<&UpstreamTls>,
) -> io::Result<(BoxRead, BoxWrite)> {
    match (ep, tls) {
        (Endpoint::Tcp(addr) | Endpoint::Tls(addr), Some(tls)) => {
            let s = TcpStream::connect(addr.as_str()).await?;
            s.set_nodelay(true)?;
            tls.wrap(s).await
        }
        (Endpoint::Tls(_), None) => Err(io::Error::other("ldaps:// upstream without TLS settings")),
        _ => ep.connect().await,
    }
}

enum Inner<T> {
    Clear(TcpStream),
    Tls(Box<T>),
    /// Between taking the clear socket and putting the TLS stream back, or
    /// after a failed handshake.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection unusable (TLS handshake in progress or failed)",
    )
}

/// A TCP connection that may be in clear or in TLS, shared by a session's
/// two halves; StartTLS upgrades it in place. `T` is the TLS stream: the
/// server side of one for a client ([`ClientStream`]), the client side for
/// the upstream ([`UpstreamStream`]).
pub struct Upgradable<T>(Arc<Mutex<Inner<T>>>);

impl<T> Clone for Upgradable<T> {
    fn clone(&self) -> Self {
        Upgradable(Arc::clone(&self.0))
    }
}

/// A client connection StartTLS can turn to TLS.
pub type ClientStream = Upgradable<tokio_rustls::server::TlsStream<TcpStream>>;
/// A mirrored upstream connection that turns to TLS with its client.
pub type UpstreamStream = Upgradable<UpstreamTlsStream>;

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Upgradable<T> {
    /// A clear connection (StartTLS possible).
    pub fn clear(tcp: TcpStream) -> Self {
        Upgradable(Arc::new(Mutex::new(Inner::Clear(tcp))))
    }

    /// A connection already in TLS.
    pub fn tls(tls: T) -> Self {
        Upgradable(Arc::new(Mutex::new(Inner::Tls(Box::new(tls)))))
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the connection is in TLS.
    pub fn is_tls(&self) -> bool {
        matches!(*self.lock(), Inner::Tls(_))
    }

    /// The read and write halves for the session.
    pub fn halves(&self) -> (BoxRead, BoxWrite) {
        (
            Box::new(ReadSide(self.clone())),
            Box::new(WriteSide(self.clone())),
        )
    }

    /// Runs `handshake` on the clear socket and puts the TLS stream it
    /// gives in its place. The caller guarantees neither half is in use
    /// (nothing buffered, nothing being written). On error the connection
    /// is unusable.
    async fn upgrade<X, F>(&self, handshake: impl FnOnce(TcpStream) -> F) -> Result<X, String>
    where
        F: std::future::Future<Output = Result<(T, X), String>>,
    {
        let tcp = {
            let mut g = self.lock();
            match std::mem::replace(&mut *g, Inner::Gone) {
                Inner::Clear(s) => s,
                other => {
                    *g = other;
                    return Err("the connection is not in clear".into());
                }
            }
        };
        let (tls, x) = handshake(tcp).await?;
        *self.lock() = Inner::Tls(Box::new(tls));
        Ok(x)
    }
}

impl ClientStream {
    /// StartTLS: the server handshake on the clear socket. Returns the
    /// client certificate's subject, if any.
    pub async fn start_tls(&self, server: &ServerTls) -> Result<Option<String>, String> {
        self.upgrade(|tcp| server.accept(tcp)).await
    }
}

impl UpstreamStream {
    /// StartTLS, once the server accepted it: the handshake with the server.
    pub async fn start_tls(&self, tls: &UpstreamTls) -> Result<(), String> {
        self.upgrade(|tcp| async move { tls.handshake(tcp).await.map(|t| (t, ())) })
            .await
    }
}

struct ReadSide<T>(Upgradable<T>);
struct WriteSide<T>(Upgradable<T>);

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for ReadSide<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut *self.0.lock() {
            Inner::Clear(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for WriteSide<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match &mut *self.0.lock() {
            Inner::Clear(s) => Pin::new(s).poll_write(cx, b),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
            Inner::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut *self.0.lock() {
            Inner::Clear(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self.0.lock() {
            Inner::Clear(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self.0.lock() {
            Inner::Clear(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Inner::Gone => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
        assert_eq!(escape_dn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_dn_value("#1"), "\\#1");
        assert_eq!(escape_dn_value("plain"), "plain");
    }

    #[test]
    fn host_of_host_port() {
        assert_eq!(host_of("127.0.0.1:636"), "127.0.0.1");
        assert_eq!(host_of("ldap.example.org:636"), "ldap.example.org");
        assert_eq!(host_of("[::1]:636"), "::1");
    }

    #[test]
    fn validate_ties_options_to_endpoints() {
        let ldaps = Endpoint::Tls("127.0.0.1:636".into());
        let tcp = Endpoint::Tcp("127.0.0.1:389".into());
        let (tcp_l, ldaps_l) = ([tcp.clone()], [ldaps.clone()]);
        let c = TlsConfig::default();
        assert!(c.validate(&tcp_l, &tcp).is_ok());
        assert!(c
            .validate(&ldaps_l, &tcp)
            .unwrap_err()
            .contains("cert_file"));
        let c = TlsConfig {
            require_tls: true,
            ..TlsConfig::default()
        };
        assert!(c.validate(&tcp_l, &tcp).is_err());
        let c = TlsConfig {
            upstream_starttls: true,
            ..TlsConfig::default()
        };
        assert!(c.validate(&tcp_l, &tcp).is_ok());
        assert!(c.validate(&tcp_l, &ldaps).is_err());
        let mirror = TlsConfig {
            upstream_mirror: true,
            ..TlsConfig::default()
        };
        assert!(mirror.validate(&tcp_l, &tcp).is_ok());
        assert!(mirror.validate(&tcp_l, &ldaps).is_err());
        let unix = Endpoint::Unix("/run/slapd/ldapi".into());
        assert!(mirror.validate(&tcp_l, &unix).is_err());
        let both = TlsConfig {
            upstream_starttls: true,
            ..mirror.clone()
        };
        assert!(both.validate(&tcp_l, &tcp).unwrap_err().contains("exclude"));
        let ldaps_url = |u: &str| TlsConfig {
            upstream_ldaps: Some(u.into()),
            ..mirror.clone()
        };
        assert!(ldaps_url("ldaps://127.0.0.1:636")
            .validate(&tcp_l, &tcp)
            .is_ok());
        assert!(ldaps_url("ldap://127.0.0.1:389")
            .validate(&tcp_l, &tcp)
            .is_err());
        let alone = TlsConfig {
            upstream_ldaps: Some("ldaps://127.0.0.1:636".into()),
            ..TlsConfig::default()
        };
        assert!(alone
            .validate(&tcp_l, &tcp)
            .unwrap_err()
            .contains("upstream_mirror"));
        let c = TlsConfig {
            cert_file: Some("/x".into()),
            ..TlsConfig::default()
        };
        assert!(c.validate(&tcp_l, &tcp).unwrap_err().contains("key_file"));
        let c = TlsConfig {
            upstream_server_name: Some("not a name!".into()),
            ..TlsConfig::default()
        };
        assert!(c.validate(&tcp_l, &tcp).is_err());
    }

    #[test]
    fn certificate_subjects_read_as_slapd_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = testkit::ca::TestCa::new(dir.path(), "ca").unwrap();
        let (cert, key) = ca
            .issue("c", "/DC=org/O=Example, Inc./CN=backup", "DNS:x", 1)
            .unwrap();
        let der = CertificateDer::from_pem_file(&cert).unwrap();
        assert_eq!(
            cert_subject(&der).as_deref(),
            Some("cn=backup,o=Example\\, Inc.,dc=org")
        );
        assert_eq!(cert_subject(b"junk"), None);
        // A server configuration loads from these files; a mismatched key
        // is refused.
        let (cert2, _) = ca.server("s").unwrap();
        let ok = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ..TlsConfig::default()
        };
        let t = ServerTls::load(&ok).unwrap().unwrap();
        t.reload().unwrap();
        let bad = TlsConfig {
            cert_file: Some(cert2),
            key_file: Some(key),
            ..TlsConfig::default()
        };
        assert!(ServerTls::load(&bad).is_err());
    }

    #[test]
    fn missing_and_bad_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let c = TlsConfig {
            cert_file: Some(junk.clone()),
            key_file: Some(junk.clone()),
            ..TlsConfig::default()
        };
        let e = ServerTls::load(&c).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let c = TlsConfig {
            cert_file: Some(dir.path().join("absent.pem")),
            key_file: Some(junk),
            ..TlsConfig::default()
        };
        let e = ServerTls::load(&c).unwrap_err();
        assert!(e.contains("absent.pem"), "{e}");
        assert!(ServerTls::load(&TlsConfig::default()).unwrap().is_none());
    }
}
