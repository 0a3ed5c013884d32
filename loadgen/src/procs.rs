//! abproxy as its own process, and what starting the proxies (abproxy,
//! HAProxy) shares: free ports, waiting for a child to listen.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::freeze::freeze_config;
use crate::opts::Opts;

/// Waits until a proxy child accepts connections on every address; an
/// error with its log when it exits first, or when it does not listen
/// within `limit` (then it is killed).
pub fn wait_listening(
    child: &mut Child,
    addrs: &[SocketAddr],
    log: &Path,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            let out = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{name} exited ({status}):\n{out}");
        }
        let up = |a: &SocketAddr| {
            std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
        };
        if addrs.iter().all(up) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not listen on {addrs:?} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// abproxy as its own process, as a deployment runs it and as haproxy runs
/// here: the binary of [`abproxy_binary`], `serve --config` with the bench's
/// settings (`--proxy-threads`, the freeze
/// section's limits, the TLS section's certificate). A proxy inside the
/// bench's own process shared it with the load generator (allocator, page
/// tables, scheduler accounting) and measured a few points lower than the
/// same binary on its own. Stopped with SIGTERM (graceful shutdown) on drop.
pub struct AbproxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The `ldaps://` listener when TLS is measured.
    pub ldaps: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl AbproxyProcess {
    pub fn start(
        bin: &Path,
        upstream: &str,
        opts: &Opts,
        tls: Option<&(PathBuf, PathBuf)>,
    ) -> Result<AbproxyProcess> {
        AbproxyProcess::start_with(bin, upstream, opts, tls, None)
    }

    /// [`AbproxyProcess::start`] with a `[journal]` table (the journal
    /// section, [`crate::journal`]).
    pub fn start_with(
        bin: &Path,
        upstream: &str,
        opts: &Opts,
        tls: Option<&(PathBuf, PathBuf)>,
        journal: Option<&toml::Table>,
    ) -> Result<AbproxyProcess> {
        let tables: Vec<(&str, toml::Table)> = journal
            .map(|j| ("journal", j.clone()))
            .into_iter()
            .collect();
        AbproxyProcess::start_with_tables(bin, upstream, opts, tls, &tables)
    }

    /// [`AbproxyProcess::start`] with more tables in its configuration
    /// (`[journal]`, `[metrics]`).
    pub fn start_with_tables(
        bin: &Path,
        upstream: &str,
        opts: &Opts,
        tls: Option<&(PathBuf, PathBuf)>,
        tables: &[(&str, toml::Table)],
    ) -> Result<AbproxyProcess> {
        AbproxyProcess::start_edited(bin, upstream, opts, tls, |cfg| {
            for (name, t) in tables {
                cfg.insert((*name).into(), toml::Value::Table(t.clone()));
            }
        })
    }

    /// [`AbproxyProcess::start`] with `tls.upstream_mirror` (the TLS
    /// section's `mirror` target): each session's connection to slapd as
    /// its client's, TLS clients' to slapd's `ldaps` (trusting `ca`).
    pub fn start_mirror(
        bin: &Path,
        upstream: &str,
        opts: &Opts,
        tls: &(PathBuf, PathBuf),
        ldaps: &str,
        ca: &Path,
    ) -> Result<AbproxyProcess> {
        AbproxyProcess::start_edited(bin, upstream, opts, Some(tls), |cfg| {
            if let Some(toml::Value::Table(t)) = cfg.get_mut("tls") {
                t.insert("upstream_mirror".into(), true.into());
                t.insert("upstream_ldaps".into(), ldaps.into());
                t.insert("upstream_ca_file".into(), ca.display().to_string().into());
            }
        })
    }

    /// Starts abproxy with [`abproxy_config`] changed by `edit` (the
    /// threads section, [`crate::threads`], removes or sets `threads`).
    pub fn start_edited(
        bin: &Path,
        upstream: &str,
        opts: &Opts,
        tls: Option<&(PathBuf, PathBuf)>,
        edit: impl Fn(&mut toml::Table),
    ) -> Result<AbproxyProcess> {
        let dir = tempfile::Builder::new()
            .prefix("abproxy-load-abproxy")
            .tempdir()?;
        let mut last_err = anyhow!("not started");
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let ldaps = match tls {
                Some(_) => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?))),
                None => None,
            };
            let mut cfg = abproxy_config((addr, ldaps), upstream, opts, tls);
            edit(&mut cfg);
            let file = dir.path().join("abproxy.toml");
            std::fs::write(&file, toml::to_string(&cfg)?)?;
            let log = std::fs::File::create(dir.path().join("abproxy.log"))?;
            let mut child = Command::new(bin)
                .arg("serve")
                .arg("--config")
                .arg(&file)
                .env("ABPROXY_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting the abproxy binary {}", bin.display()))?;
            let addrs: Vec<SocketAddr> = std::iter::once(addr).chain(ldaps).collect();
            let log = dir.path().join("abproxy.log");
            match wait_listening(&mut child, &addrs, &log, "abproxy", Duration::from_secs(10)) {
                Ok(()) => {
                    return Ok(AbproxyProcess {
                        child,
                        addr,
                        ldaps,
                        dir,
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// SIGTERM, then waits for the graceful shutdown (killed after 10 s);
    /// says so if it was not clean.
    pub fn stop(mut self) {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(status)) => {
                    let log = std::fs::read_to_string(self.dir.path().join("abproxy.log"))
                        .unwrap_or_default();
                    eprintln!("load: abproxy exited with {status}:\n{log}");
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!("load: abproxy did not shut down within 10 s");
                    return;
                }
            }
        }
    }
}

impl Drop for AbproxyProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> Result<u16> {
    let l = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// The configuration abproxy runs with: its listeners, slapd, `threads`,
/// the freeze section's limits ([`freeze_config`]) and the TLS section's
/// certificate and key.
pub fn abproxy_config(
    (addr, ldaps): (SocketAddr, Option<SocketAddr>),
    upstream: &str,
    opts: &Opts,
    tls: Option<&(PathBuf, PathBuf)>,
) -> toml::Table {
    let mut listen = vec![toml::Value::from(format!("ldap://{addr}"))];
    listen.extend(ldaps.map(|a| toml::Value::from(format!("ldaps://{a}"))));
    let mut cfg = toml::Table::new();
    cfg.insert("listen".into(), toml::Value::Array(listen));
    cfg.insert("upstream".into(), upstream.into());
    cfg.insert("shutdown_grace_secs".into(), 1.into());
    cfg.insert("threads".into(), (opts.proxy_threads as i64).into());
    cfg.insert("freeze".into(), toml::Value::Table(freeze_config(opts)));
    if let Some((cert, key)) = tls {
        let mut t = toml::Table::new();
        t.insert("cert_file".into(), cert.display().to_string().into());
        t.insert("key_file".into(), key.display().to_string().into());
        cfg.insert("tls".into(), toml::Value::Table(t));
    }
    cfg
}

/// The abproxy binary a run starts: `--abproxy` (`LOAD_ABPROXY`), else
/// the product, built for the run as the Debian package builds it
/// ([`testkit::product::binary`]; not the bench's `CARGO_BIN_EXE_abproxy`,
/// which has the dev-dependencies' features).
pub fn abproxy_binary(opts: &Opts) -> Result<PathBuf> {
    match &opts.abproxy {
        Some(p) => Ok(p.clone()),
        None => testkit::product::binary().context("building the abproxy binary to measure"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// abproxy accepts the configuration the benchmark writes (its keys
    /// are checked: unknown ones are refused), with the freeze limits
    /// above the backlog.
    #[test]
    fn abproxy_accepts_the_config() {
        let opts = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        let addr: SocketAddr = "127.0.0.1:3890".parse().unwrap();
        let ldaps: SocketAddr = "127.0.0.1:6360".parse().unwrap();
        let pair = (PathBuf::from("/x/cert.pem"), PathBuf::from("/x/key.pem"));
        let cfg = abproxy_config(
            (addr, Some(ldaps)),
            "ldap://127.0.0.1:389",
            &opts,
            Some(&pair),
        );
        let text = toml::to_string(&cfg).unwrap();
        abproxy::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(
            text.contains(r#"listen = ["ldap://127.0.0.1:3890", "ldaps://127.0.0.1:6360"]"#),
            "{text}"
        );
        assert!(text.contains("threads = 1"), "{text}");
        let f = &cfg["freeze"];
        assert_eq!(f["allowed"][0].as_str(), Some(testkit::ADMIN_DN));
        assert_eq!(f["max_drain_secs"].as_integer(), Some(10));
        // 32 x 200 queued: 2 x max(200, 1000) per connection, 4 x 6400 in all.
        assert_eq!(f["queue_max_requests_per_conn"].as_integer(), Some(2000));
        assert_eq!(f["queue_max_requests_total"].as_integer(), Some(25_600));
        let cfg = abproxy_config((addr, None), "ldap://127.0.0.1:389", &opts, None);
        let text = toml::to_string(&cfg).unwrap();
        abproxy::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(
            !text.contains("ldaps") && !text.contains("cert_file"),
            "{text}"
        );
    }

    #[test]
    fn an_explicit_abproxy_binary_wins() {
        let mut opts = Opts::parse_with(&["--haproxy=0".to_string()], |_| None).unwrap();
        opts.abproxy = Some(PathBuf::from("/given/abproxy"));
        assert_eq!(abproxy_binary(&opts).unwrap(), Path::new("/given/abproxy"));
    }
}
