//! A throwaway certificate authority for tests, benchmarks and the README's
//! TLS examples, made with Debian's `openssl` command (package `openssl`):
//! EC P-256 keys, certificates for `localhost` and `127.0.0.1`.
//!
//! The commands are the ones the README shows ([`TestCa::new`] and
//! [`TestCa::issue`] print nothing and run exactly these):
//!
//! ```sh
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
//!   -keyout ca.key -out ca.pem -days 3650 -subj "/CN=abproxy test CA" \
//!   -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
//! openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
//!   -keyout server.key -out server.csr -subj "/CN=localhost"
//! printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n' > server.ext
//! openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 0x1001 \
//!   -days 365 -extfile server.ext -out server.pem
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

/// A CA key and self-signed certificate in a directory.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
    name: String,
}

static SERIAL: AtomicU64 = AtomicU64::new(0x1000);

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (apt-get install -y openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl TestCa {
    /// Creates `NAME.key` and `NAME.pem` (subject `CN=abproxy test CA NAME`
    /// unless NAME is `ca`) in `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa> {
        let subject = if name == "ca" {
            "/CN=abproxy test CA".to_string()
        } else {
            format!("/CN=abproxy test CA {name}")
        };
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "3650",
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        )?;
        Ok(TestCa {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        })
    }

    /// The CA certificate (PEM), for `LDAPTLS_CACERT` and the CA options.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// Issues `STEM.pem` and `STEM.key` for `subject` (openssl's
    /// `/CN=x/O=y` form) with the given subjectAltName (e.g.
    /// `DNS:localhost,IP:127.0.0.1`), valid for `days` days; returns
    /// (certificate, key).
    pub fn issue(
        &self,
        stem: &str,
        subject: &str,
        san: &str,
        days: u32,
    ) -> Result<(PathBuf, PathBuf)> {
        let dir = &self.dir;
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{stem}.key"),
                "-out",
                &format!("{stem}.csr"),
                "-subj",
                subject,
            ],
            dir,
        )?;
        std::fs::write(
            dir.join(format!("{stem}.ext")),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .context("writing the extensions file")?;
        let serial = format!("0x{:x}", SERIAL.fetch_add(1, Ordering::Relaxed));
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{stem}.csr"),
                "-CA",
                &format!("{}.pem", self.name),
                "-CAkey",
                &format!("{}.key", self.name),
                "-set_serial",
                &serial,
                "-days",
                &days.to_string(),
                "-extfile",
                &format!("{stem}.ext"),
                "-out",
                &format!("{stem}.pem"),
            ],
            dir,
        )?;
        Ok((
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        ))
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, stem: &str) -> Result<(PathBuf, PathBuf)> {
        self.issue(stem, "/CN=localhost", "DNS:localhost,IP:127.0.0.1", 365)
    }
}
