//! The reference column of the throughput table: HAProxy in `mode tcp`
//! (`nbthread 1`, no logging), what a plain TCP proxy costs, or, with
//! `--haproxy self`, the A/A control: a second abproxy process started as
//! the first, named `abproxy2` in the log lines and tables.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::procs::{free_port, wait_listening, AbproxyProcess};

pub use crate::opts::Reference;

/// The reference column's name in the log lines and tables: `haproxy`, or
/// `abproxy2` for the A/A control. Set once, before the first point.
pub static REFERENCE_NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

pub fn reference_name() -> &'static str {
    REFERENCE_NAME.get().copied().unwrap_or("haproxy")
}
/// A haproxy child process in TCP mode in front of slapd; killed on drop.
pub struct Haproxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub version: String,
    pub _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(bin: &Path, upstream: SocketAddr) -> Result<Haproxy> {
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "haproxy (unknown version)".into());
        let dir = tempfile::Builder::new()
            .prefix("abproxy-load-haproxy")
            .tempdir()?;
        let mut last_err = anyhow!("not started");
        for _ in 0..5 {
            let port = free_port()?;
            let cfg = dir.path().join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n    nbthread 1\n    maxconn 4096\n\n\
                     defaults\n    mode tcp\n    timeout connect 5s\n    \
                     timeout client 5m\n    timeout server 5m\n\n\
                     frontend ldap\n    bind 127.0.0.1:{port}\n    default_backend slapd\n\n\
                     backend slapd\n    server slapd {upstream}\n"
                ),
            )?;
            let log = std::fs::File::create(dir.path().join("haproxy.out"))?;
            let mut child = Command::new(bin)
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let log = dir.path().join("haproxy.out");
            match wait_listening(&mut child, &[addr], &log, "haproxy", Duration::from_secs(5)) {
                Ok(()) => {
                    return Ok(Haproxy {
                        child,
                        addr,
                        version,
                        _dir: dir,
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }
}

/// The running reference column: HAProxy, or a second abproxy (A/A).
pub enum RefProcess {
    Haproxy(Haproxy),
    Abproxy(AbproxyProcess),
}

impl RefProcess {
    pub fn addr(&self) -> SocketAddr {
        match self {
            RefProcess::Haproxy(h) => h.addr,
            RefProcess::Abproxy(a) => a.addr,
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            RefProcess::Haproxy(h) => h.child.id(),
            RefProcess::Abproxy(a) => a.child.id(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RefProcess::Haproxy(h) => format!("{} (nbthread 1, mode tcp, no logging)", h.version),
            RefProcess::Abproxy(_) if reference_name() == "abproxy+metrics" => {
                "a second abproxy process started as the first, with its metrics endpoint \
                 on ([metrics] listen; not scraped)"
                    .into()
            }
            RefProcess::Abproxy(_) => "a second abproxy process started as the first \
                 (A/A control: the columns differ only by chance and by the benchmark's own bias)"
                .into(),
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
