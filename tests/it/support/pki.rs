//! The TLS test PKI (a throwaway CA, slapd's, the proxy's and a client
//! certificate, made with `testkit::ca`) and a lab with TLS on both
//! sides, shared by `tests/it/tls.rs` and `tests/it/cli_tls.rs`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use abproxy::config::Config;
use abproxy::endpoint::Endpoint;
use testkit::ca::TestCa;
use testkit::{SlapdOptions, SlapdTls};

use super::Lab;

/// The test PKI: a CA, slapd's and the proxy's certificates, a client
/// certificate, and a second CA that signed none of them.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub other_ca: TestCa,
    pub slapd: (PathBuf, PathBuf),
    pub proxy: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("abp-pki-")
            .tempdir_in("/tmp")
            .unwrap();
        let ca = TestCa::new(dir.path(), "ca").unwrap();
        let other_ca = TestCa::new(dir.path(), "other-ca").unwrap();
        let slapd = ca.server("slapd").unwrap();
        let proxy = ca.server("proxy").unwrap();
        let client = ca
            .issue(
                "backup",
                "/O=Example/CN=backup",
                "DNS:backup.example.org",
                365,
            )
            .unwrap();
        Pki {
            dir,
            ca,
            other_ca,
            slapd,
            proxy,
            client,
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.ca.ca_file()
    }

    pub fn slapd_tls(&self) -> SlapdTls {
        SlapdTls {
            cert_file: self.slapd.0.clone(),
            key_file: self.slapd.1.clone(),
            ca_file: self.ca_file(),
        }
    }

    /// The proxy's client-facing TLS: its certificate, ldap:// and ldaps://
    /// listeners.
    pub fn proxy_tls(&self, c: &mut Config) {
        c.listen = vec!["ldap://127.0.0.1:0".into(), "ldaps://127.0.0.1:0".into()];
        c.tls.cert_file = Some(self.proxy.0.clone());
        c.tls.key_file = Some(self.proxy.1.clone());
    }
}

/// slapd with TLS, the proxy in front with TLS on its side (clear upstream
/// unless `tweak` says otherwise).
pub async fn tls_lab(pki: &Pki, tweak: impl FnOnce(&mut Config)) -> Lab {
    let opts = SlapdOptions {
        nosync: true,
        tls: Some(pki.slapd_tls()),
        stats_log: true,
        ..Default::default()
    };
    Lab::with(opts, |c| {
        pki.proxy_tls(c);
        tweak(c)
    })
    .await
}

pub fn ldaps_of(lab: &Lab) -> String {
    lab.proxy
        .endpoints()
        .iter()
        .find(|e| matches!(e, Endpoint::Tls(_)))
        .expect("an ldaps listener")
        .url()
}

/// An ldap-utils tool with `LDAPTLS_CACERT` (and nothing from ldap.conf).
pub async fn tool(ca: &Path, tool: &str, args: &[&str]) -> super::ToolOutput {
    tool_env(ca, &[], tool, args).await
}

/// The same with more environment (`LDAPTLS_CERT`, `LDAPTLS_KEY`).
pub async fn tool_env(
    ca: &Path,
    env: &[(&str, &Path)],
    tool: &str,
    args: &[&str],
) -> super::ToolOutput {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .env("LDAPCONF", "/dev/null")
        .env("LDAPRC", "/dev/null")
        .env("LDAPTLS_CACERT", ca)
        .env("LDAPTLS_REQCERT", "demand")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("tool finished within 60 s")
        .unwrap();
    super::ToolOutput::from(out)
}
