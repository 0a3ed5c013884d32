//! A backend's LDIF made into an OpenLDAP database again, offline, with
//! slapd's own tools: what `abproxy restore` builds and what
//! `abproxy verify --restore-test` serves.
//!
//! The configuration comes from the server the backup is for: its
//! cn=config read with `slapcat -n 0` (a `slapd.d` directory or a
//! `slapd.conf` file), so the schema, modules and overlays are the ones
//! its data needs. Of it a *throwaway configuration* is made in a work
//! directory: only the backend's own database (renumbered `{1}`), its
//! files in `WORK/db`, a root DN and password of its own, and nothing that
//! would reach out (no TLS, no replication, no security or log-file
//! settings). `slapadd -n 0` writes it to `WORK/slapd.d`; `slapadd -q`
//! loads the backup's entries without the attributes slapd computes on
//! read ([`NOT_STORED`]); `slapcat` reads them back to count and digest.
//!
//! Every tool runs with a deadline and is killed when it passes.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::ldif::{self, Entry};
use super::Digester;
use crate::freeze::dn::NormDn;

/// Attributes slapd returns on read but does not store; `slapadd` refuses
/// them. A backup's LDIF has them (it was read with `+`).
pub const NOT_STORED: &[&str] = &[
    "entrydn",
    "subschemasubentry",
    "hassubordinates",
    "numsubordinates",
];

/// Attributes of the server's configuration the throwaway one leaves out:
/// what needs files or peers of the live server, or would refuse the
/// throwaway server's own clear-text bind.
const DROPPED: &[&str] = &[
    "olcsyncrepl",
    "olcmultiprovider",
    "olcmirrormode",
    "olcupdateref",
    "olcsecurity",
    "olcrequires",
    "olclogfile",
    "olcsaslsecprops",
];

/// Overlays the throwaway configuration leaves out: they name another
/// database (which is not there).
const DROPPED_OVERLAYS: &[&str] = &["olcaccesslogconfig"];

/// The root DN of the throwaway database: `cn=abproxy-restore,SUFFIX`.
pub fn root_dn(suffix: &str) -> String {
    format!("cn=abproxy-restore,{suffix}")
}

/// A random password for the throwaway database's root DN.
pub fn random_password() -> String {
    let mut b = [0u8; 18];
    if getrandom(&mut b).is_err() {
        // The throwaway server listens on loopback only, for seconds.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b[..16].copy_from_slice(&t.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    File::open("/dev/urandom")?.read_exact(buf)
}

/// Where slapd's tools are.
#[derive(Debug, Clone)]
pub struct Tools {
    pub slapd: PathBuf,
    pub slapadd: PathBuf,
    pub slapcat: PathBuf,
}

impl Default for Tools {
    fn default() -> Tools {
        Tools {
            slapd: "/usr/sbin/slapd".into(),
            slapadd: "/usr/sbin/slapadd".into(),
            slapcat: "/usr/sbin/slapcat".into(),
        }
    }
}

/// How long each step may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Reading the configuration, loading it.
    pub config: Duration,
    /// Loading the entries and reading them back (scales with the data).
    pub data: Duration,
    /// A throwaway slapd answering.
    pub start: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            config: Duration::from_secs(60),
            data: Duration::from_secs(3600),
            start: Duration::from_secs(30),
        }
    }
}

/// What failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} {args} exited with {status}: {stderr}")]
    Tool {
        tool: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("{step} did not finish within {} s (killed)", .limit.as_secs())]
    Timeout { step: String, limit: Duration },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    /// The backup's entries do not load (slapd refuses them, or the LDIF
    /// does not parse): the backup does not restore with this
    /// configuration.
    #[error("the entries do not load: {0}")]
    Load(Box<Error>),
    #[error("{}: {source}", .path.display())]
    Ldif {
        path: PathBuf,
        #[source]
        source: ldif::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `cmd` to its end within `limit` (killed past it), stdout to
/// `stdout` when given; fails unless it exits 0.
pub(crate) async fn run(
    mut cmd: Command,
    step: &str,
    limit: Duration,
    stdout: Option<File>,
) -> Result<(), Error> {
    let std = cmd.as_std();
    let tool = std.get_program().to_string_lossy().into_owned();
    let args = std
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    cmd.stdin(Stdio::null())
        .stdout(match stdout {
            Some(f) => Stdio::from(f),
            None => Stdio::null(),
        })
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| Error::Io {
        path: tool.clone().into(),
        source,
    })?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| Error::Timeout {
            step: step.into(),
            limit,
        })?
        .map_err(|source| Error::Io {
            path: tool.clone().into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The end says why; keep it short.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(6)..].join(" / ");
    Err(Error::Tool {
        tool,
        args,
        status: out.status.to_string(),
        stderr: tail,
    })
}

/// The server's configuration as LDIF entries: `slapcat -n 0` of a
/// `slapd.d` directory (`-F`) or a `slapd.conf` file (`-f`).
pub async fn read_config(
    tools: &Tools,
    source: &Path,
    limit: Duration,
    work: &Path,
) -> Result<Vec<Entry>, Error> {
    let mut cmd = Command::new(&tools.slapcat);
    cmd.arg(if source.is_dir() { "-F" } else { "-f" })
        .arg(source)
        .arg("-n")
        .arg("0")
        .arg("-o")
        .arg("ldif_wrap=no");
    let path = work.join("server-config.ldif");
    let out = File::create(&path).map_err(io(&path))?;
    run(
        cmd,
        &format!("slapcat -n 0 of {}", source.display()),
        limit,
        Some(out),
    )
    .await?;
    let f = File::open(&path).map_err(io(&path))?;
    ldif::Reader::new(BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Ldif { path, source })
}

fn values<'a>(e: &'a Entry, attr: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    e.attrs
        .iter()
        .filter(move |(k, _)| k.eq_ignore_ascii_case(attr))
        .flat_map(|(_, v)| v.iter().map(Vec::as_slice))
}

fn has_class(e: &Entry, class: &str) -> bool {
    values(e, "objectClass").any(|v| v.eq_ignore_ascii_case(class.as_bytes()))
}

/// The `olcDatabase={N}TYPE` RDN an entry's DN ends in (the database
/// entry's own or an overlay's parent), with N.
fn database_of(dn: &str) -> Option<(i64, &str)> {
    let lower = dn.to_ascii_lowercase();
    let at = lower.find("olcdatabase={")?;
    let rest = &dn[at..];
    let rdn = rest.split(',').next()?;
    let n = rdn.split_once('{')?.1.split_once('}')?.0.parse().ok()?;
    Some((n, rdn))
}

/// The live database of `suffix` in a server configuration: its
/// `olcDatabase` RDN and `olcDbDirectory`.
pub fn database_for<'a>(config: &'a [Entry], suffix: &str) -> Result<(&'a Entry, PathBuf), Error> {
    let want = NormDn::parse(suffix.as_bytes())
        .ok_or_else(|| Error::Config(format!("`{suffix}` is not a DN")))?;
    let db = config
        .iter()
        .find(|e| {
            has_class(e, "olcDatabaseConfig")
                && values(e, "olcSuffix").any(|s| NormDn::parse(s).is_some_and(|s| s == want))
        })
        .ok_or_else(|| {
            Error::Config(format!(
                "the server's configuration has no database with olcSuffix {suffix}"
            ))
        })?;
    let dir = values(db, "olcDbDirectory").next().ok_or_else(|| {
        Error::Config(format!(
            "{} has no olcDbDirectory: only back-mdb databases are restored",
            db.dn
        ))
    })?;
    Ok((db, PathBuf::from(String::from_utf8_lossy(dir).into_owned())))
}

/// The throwaway configuration for `suffix` (see the module's text), as
/// LDIF for `slapadd -n 0`.
pub fn throwaway_config(
    config: &[Entry],
    suffix: &str,
    work: &Path,
    root_pw: &str,
) -> Result<String, Error> {
    let (db, _) = database_for(config, suffix)?;
    let (_, db_rdn) = database_of(&db.dn)
        .ok_or_else(|| Error::Config(format!("{} is not a database entry", db.dn)))?;
    let db_rdn = db_rdn.to_string();
    let kind = db_rdn
        .split_once('}')
        .map(|(_, t)| t.to_string())
        .unwrap_or_default();
    let new_rdn = format!("olcDatabase={{1}}{kind}");
    let w = work.display();
    let mut out = Vec::new();
    for e in config {
        // Other databases (not the frontend {-1} or cn=config {0}) and
        // what is under them are left out.
        let in_db = database_of(&e.dn);
        let ours = match in_db {
            Some((n, rdn)) if n >= 1 => {
                if !rdn.eq_ignore_ascii_case(&db_rdn) {
                    continue;
                }
                true
            }
            _ => false,
        };
        if ours && DROPPED_OVERLAYS.iter().any(|c| has_class(e, c)) {
            continue;
        }
        let mut e2 = Entry::new(if ours {
            e.dn.replacen(&db_rdn, &new_rdn, 1)
        } else {
            e.dn.clone()
        });
        let is_db = ours && e.dn.eq_ignore_ascii_case(&db.dn);
        for (name, vals) in &e.attrs {
            let lower = name.to_ascii_lowercase();
            if DROPPED.contains(&lower.as_str()) || lower.starts_with("olctls") {
                continue;
            }
            let vals: Vec<Vec<u8>> = match lower.as_str() {
                "olcpidfile" => vec![format!("{w}/slapd.pid").into_bytes()],
                "olcargsfile" => vec![format!("{w}/slapd.args").into_bytes()],
                "olcdatabase" if is_db => vec![format!("{{1}}{kind}").into_bytes()],
                "olcdbdirectory" if is_db => vec![format!("{w}/db").into_bytes()],
                "olcrootdn" if is_db => vec![root_dn(suffix).into_bytes()],
                "olcrootpw" if is_db => continue,
                _ => vals.clone(),
            };
            e2.attrs.push((name.clone(), vals));
        }
        if is_db {
            if !e2
                .attrs
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("olcRootDN"))
            {
                e2.push("olcRootDN", root_dn(suffix));
            }
            e2.push("olcRootPW", root_pw);
        }
        out.push(e2);
    }
    Ok(ldif::to_string(&out))
}

/// What a built database holds, read back with `slapcat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub entries: u64,
    /// [`super::Digest`] as 64 hex digits.
    pub digest: String,
    /// The suffix entry's `contextCSN` values, sorted.
    pub context_csn: Vec<String>,
    /// The suffix entry's `entryUUID` (389 DS: `nsUniqueId` where it has
    /// none): which database this is (copies and replicas of it keep it; a
    /// database created on its own has another).
    pub suffix_uuid: Option<String>,
}

/// Counts and digests LDIF entries, keeping the suffix entry's contextCSN.
pub fn contents_of(path: &Path, suffix: &str) -> Result<Contents, Error> {
    let f = File::open(path).map_err(io(path))?;
    let want = NormDn::parse(suffix.as_bytes());
    let mut digester = Digester::default();
    let mut entries = 0u64;
    let mut context_csn = Vec::new();
    let mut suffix_uuid = None;
    for e in ldif::Reader::new(BufReader::new(f)) {
        let e = e.map_err(|source| Error::Ldif {
            path: path.to_path_buf(),
            source,
        })?;
        if want.is_some() && NormDn::parse(e.dn.as_bytes()) == want {
            context_csn = values(&e, "contextCSN")
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            context_csn.sort();
            suffix_uuid = values(&e, "entryUUID")
                .chain(values(&e, "nsUniqueId"))
                .next()
                .map(|v| String::from_utf8_lossy(v).into_owned());
        }
        digester
            .add(&e)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        entries += 1;
    }
    Ok(Contents {
        entries,
        digest: digester.finish().to_string(),
        context_csn,
        suffix_uuid,
    })
}

/// A database built in a work directory.
#[derive(Debug, Clone)]
pub struct Built {
    pub work: PathBuf,
    /// `WORK/db`: the database files (`data.mdb`).
    pub db: PathBuf,
    pub contents: Contents,
}

/// What a backend's data is in a backup.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// LDIF (the `ldif` and `slapcat` methods): loaded with `slapadd`.
    Ldif(&'a Path),
    /// A copy of the database file `data.mdb` (the `files` method): copied.
    Mdb(&'a Path),
}

/// Builds the database of `suffix` from a backup's data in `work` (which
/// must exist and be empty): the throwaway configuration, the entries
/// loaded (or the database file copied), read back.
pub async fn build(
    tools: &Tools,
    config: &[Entry],
    suffix: &str,
    data: Source<'_>,
    work: &Path,
    root_pw: &str,
    limits: &Limits,
) -> Result<Built, Error> {
    let text = throwaway_config(config, suffix, work, root_pw)?;
    let slapd_d = work.join("slapd.d");
    let db = work.join("db");
    for d in [&slapd_d, &db] {
        fs::create_dir(d).map_err(io(d))?;
    }
    let cfg = work.join("config.ldif");
    write_private(&cfg, text.as_bytes())?;
    let mut cmd = Command::new(&tools.slapadd);
    cmd.arg("-n")
        .arg("0")
        .arg("-F")
        .arg(&slapd_d)
        .arg("-l")
        .arg(&cfg);
    run(
        cmd,
        "slapadd -n 0 (the throwaway configuration)",
        limits.config,
        None,
    )
    .await?;

    match data {
        // The entries, without what slapd computes.
        Source::Ldif(data) => load(tools, suffix, data, work, &slapd_d, limits)
            .await
            .map_err(|e| Error::Load(Box::new(e)))?,
        Source::Mdb(file) => copy_sparse(file, &db.join("data.mdb"), limits.data).await?,
    }

    let contents = slapcat(tools, work, suffix, limits).await?;
    Ok(Built {
        work: work.to_path_buf(),
        db,
        contents,
    })
}

async fn load(
    tools: &Tools,
    suffix: &str,
    data: &Path,
    work: &Path,
    slapd_d: &Path,
    limits: &Limits,
) -> Result<(), Error> {
    let load = work.join("load.ldif");
    {
        let f = File::open(data).map_err(io(data))?;
        let out = File::create(&load).map_err(io(&load))?;
        let mut out = BufWriter::new(out);
        for e in ldif::Reader::new(BufReader::new(f)) {
            let mut e = e.map_err(|source| Error::Ldif {
                path: data.to_path_buf(),
                source,
            })?;
            e.attrs
                .retain(|(k, _)| !NOT_STORED.contains(&k.to_ascii_lowercase().as_str()));
            ldif::write(&mut out, [&e]).map_err(io(&load))?;
        }
        out.flush().map_err(io(&load))?;
    }
    let mut cmd = Command::new(&tools.slapadd);
    cmd.arg("-q")
        .arg("-F")
        .arg(slapd_d)
        .arg("-b")
        .arg(suffix)
        .arg("-l")
        .arg(&load);
    run(cmd, &format!("slapadd of {suffix}"), limits.data, None).await?;
    fs::remove_file(&load).map_err(io(&load))
}

/// Copies a database file with `cp --sparse=always` (`data.mdb` is as large
/// as `olcDbMaxSize`, mostly holes), within `limit`.
pub async fn copy_sparse(from: &Path, to: &Path, limit: Duration) -> Result<(), Error> {
    let mut cmd = Command::new("cp");
    cmd.arg("--sparse=always").arg(from).arg(to);
    run(cmd, &format!("copying {}", from.display()), limit, None).await
}

/// Where `mdb_copy` is (Debian: lmdb-utils).
pub const MDB_COPY: &str = "/usr/bin/mdb_copy";

/// A compacted copy of the LMDB environment in `live_dir` (`mdb_copy -c`:
/// only the pages in use, from one read transaction, registered in the
/// environment's own lock table as slapd's readers are) as the file `to`.
/// Returns the command line.
pub async fn mdb_copy(live_dir: &Path, to: &Path, limit: Duration) -> Result<String, Error> {
    let mut name = to.as_os_str().to_owned();
    name.push(".copy");
    let dir = PathBuf::from(name);
    fs::create_dir(&dir).map_err(io(&dir))?;
    let mut cmd = Command::new(MDB_COPY);
    cmd.arg("-c").arg(live_dir).arg(&dir);
    let line = command_line(&cmd);
    let r = run(
        cmd,
        &format!("mdb_copy of {}", live_dir.display()),
        limit,
        None,
    )
    .await;
    let r = r.and_then(|()| fs::rename(dir.join("data.mdb"), to).map_err(io(to)));
    let _ = fs::remove_dir_all(&dir);
    r.map(|()| line)
}

/// `slapcat -b SUFFIX -l OUT` with the live server's configuration (a
/// `slapd.d` directory or a `slapd.conf`): back-mdb reads a consistent
/// snapshot while slapd runs.
pub async fn slapcat_live(
    tools: &Tools,
    config: &Path,
    suffix: &str,
    out: &Path,
    limit: Duration,
) -> Result<String, Error> {
    let mut cmd = Command::new(&tools.slapcat);
    cmd.arg(if config.is_dir() { "-F" } else { "-f" })
        .arg(config)
        .arg("-b")
        .arg(suffix)
        .arg("-o")
        .arg("ldif_wrap=no")
        .arg("-l")
        .arg(out);
    let line = command_line(&cmd);
    run(cmd, &format!("slapcat of {suffix}"), limit, None).await?;
    Ok(line)
}

/// The suffix entry's `entryUUID` in the local database of `suffix`
/// (`slapcat -H ldap:///SUFFIX??base`: that entry only, read-only beside
/// the running slapd), its output kept in `scratch`. `None` when the
/// entry is not there or has none.
pub async fn suffix_uuid(
    tools: &Tools,
    config: &Path,
    suffix: &str,
    scratch: &Path,
    limit: Duration,
) -> Result<Option<String>, Error> {
    let mut url = String::from("ldap:///");
    for b in suffix.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~,=".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url.push_str("??base");
    let path = scratch.join("suffix-entry.ldif");
    let mut cmd = Command::new(&tools.slapcat);
    cmd.arg(if config.is_dir() { "-F" } else { "-f" })
        .arg(config)
        .arg("-b")
        .arg(suffix)
        .arg("-H")
        .arg(&url)
        .arg("-o")
        .arg("ldif_wrap=no")
        .arg("-l")
        .arg(&path);
    run(cmd, &format!("slapcat of {suffix}'s entry"), limit, None).await?;
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let entries = ldif::read(&text).map_err(|source| Error::Ldif {
        path: path.clone(),
        source,
    })?;
    Ok(entries.iter().find_map(|e| {
        values(e, "entryUUID")
            .chain(values(e, "nsUniqueId"))
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }))
}

/// A command as a shell would show it (for the manifest and the log).
pub fn command_line(cmd: &Command) -> String {
    let std = cmd.as_std();
    std::iter::once(std.get_program())
        .chain(std.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@".contains(c))
            {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `slapcat -b SUFFIX` of a built work directory, counted and digested.
pub async fn slapcat(
    tools: &Tools,
    work: &Path,
    suffix: &str,
    limits: &Limits,
) -> Result<Contents, Error> {
    let out_path = work.join("slapcat.ldif");
    let out = File::create(&out_path).map_err(io(&out_path))?;
    let mut cmd = Command::new(&tools.slapcat);
    cmd.arg("-F")
        .arg(work.join("slapd.d"))
        .arg("-b")
        .arg(suffix)
        .arg("-o")
        .arg("ldif_wrap=no");
    run(cmd, &format!("slapcat of {suffix}"), limits.data, Some(out)).await?;
    let contents = contents_of(&out_path, suffix)?;
    fs::remove_file(&out_path).map_err(io(&out_path))?;
    Ok(contents)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// A slapd serving a built work directory on a loopback port, stopped
/// when dropped.
pub struct Throwaway {
    child: Child,
    pub url: String,
}

impl Throwaway {
    /// Starts slapd on `WORK/slapd.d` on a free 127.0.0.1 port and waits
    /// until it accepts connections (within `limits.start`).
    pub async fn start(tools: &Tools, work: &Path, limits: &Limits) -> Result<Throwaway, Error> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port().map_err(io(Path::new("127.0.0.1")))?;
            let url = format!("ldap://127.0.0.1:{port}/");
            let log = work.join("slapd.log");
            let out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(io(&log))?;
            let err = out.try_clone().map_err(io(&log))?;
            let child = Command::new(&tools.slapd)
                .arg("-d")
                .arg("none")
                .arg("-F")
                .arg(work.join("slapd.d"))
                .arg("-h")
                .arg(&url)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(io(&tools.slapd))?;
            let mut t = Throwaway {
                child,
                url: url.trim_end_matches('/').to_string(),
            };
            match t.ready(port, limits.start, &log).await {
                Ok(()) => return Ok(t),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    async fn ready(&mut self, port: u16, limit: Duration, log: &Path) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let text = fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(6).collect();
                return Err(Error::Tool {
                    tool: "slapd".into(),
                    args: format!("(throwaway on port {port})"),
                    status: status.to_string(),
                    stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
                });
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.start_kill();
                return Err(Error::Timeout {
                    step: "the throwaway slapd starting".into(),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Vec<Entry> {
        ldif::read(
            "dn: cn=config\nobjectClass: olcGlobal\ncn: config\nolcPidFile: /run/slapd/slapd.pid\n\
             olcTLSCertificateFile: /etc/ssl/x.pem\nolcSecurity: tls=1\n\n\
             dn: olcDatabase={-1}frontend,cn=config\nobjectClass: olcDatabaseConfig\n\
             olcDatabase: {-1}frontend\n\n\
             dn: olcDatabase={1}mdb,cn=config\nobjectClass: olcDatabaseConfig\nobjectClass: olcMdbConfig\n\
             olcDatabase: {1}mdb\nolcSuffix: dc=other\nolcDbDirectory: /var/lib/ldap/other\n\n\
             dn: olcOverlay={0}syncprov,olcDatabase={1}mdb,cn=config\nobjectClass: olcOverlayConfig\n\
             olcOverlay: {0}syncprov\n\n\
             dn: olcDatabase={2}mdb,cn=config\nobjectClass: olcDatabaseConfig\nobjectClass: olcMdbConfig\n\
             olcDatabase: {2}mdb\nolcSuffix: DC=Example, DC=org\nolcDbDirectory: /var/lib/ldap\n\
             olcRootDN: cn=admin,dc=example,dc=org\nolcRootPW: live-secret\n\
             olcSyncrepl: {0}rid=1 provider=ldap://peer\n\n\
             dn: olcOverlay={0}accesslog,olcDatabase={2}mdb,cn=config\nobjectClass: olcOverlayConfig\n\
             objectClass: olcAccessLogConfig\nolcOverlay: {0}accesslog\nolcAccessLogDB: cn=log\n\n\
             dn: olcOverlay={1}ppolicy,olcDatabase={2}mdb,cn=config\nobjectClass: olcOverlayConfig\n\
             olcOverlay: {1}ppolicy\n",
        )
        .unwrap()
    }

    #[test]
    fn restore_finds_the_database_by_normalised_suffix() {
        let c = config();
        let (db, dir) = database_for(&c, "dc=example,dc=org").unwrap();
        assert_eq!(db.dn, "olcDatabase={2}mdb,cn=config");
        assert_eq!(dir, PathBuf::from("/var/lib/ldap"));
        let e = database_for(&c, "dc=nowhere").unwrap_err().to_string();
        assert!(e.contains("no database with olcSuffix dc=nowhere"), "{e}");
    }

    #[test]
    fn restore_throwaway_config_keeps_only_the_backend_and_reaches_nothing() {
        let text =
            throwaway_config(&config(), "dc=example,dc=org", Path::new("/w"), "pw1").unwrap();
        let got = ldif::read(&text).unwrap();
        let dns: Vec<&str> = got.iter().map(|e| e.dn.as_str()).collect();
        assert_eq!(
            dns,
            [
                "cn=config",
                "olcDatabase={-1}frontend,cn=config",
                "olcDatabase={1}mdb,cn=config",
                "olcOverlay={1}ppolicy,olcDatabase={1}mdb,cn=config",
            ]
        );
        let global = &got[0];
        assert_eq!(
            values(global, "olcPidFile").next(),
            Some(&b"/w/slapd.pid"[..])
        );
        assert!(
            !text.contains("olcTLS") && !text.contains("olcSecurity"),
            "{text}"
        );
        let db = &got[2];
        let one = |a| String::from_utf8(values(db, a).next().unwrap().to_vec()).unwrap();
        assert_eq!(one("olcDatabase"), "{1}mdb");
        assert_eq!(one("olcDbDirectory"), "/w/db");
        assert_eq!(one("olcRootDN"), "cn=abproxy-restore,dc=example,dc=org");
        assert_eq!(one("olcRootPW"), "pw1");
        assert!(
            !text.contains("live-secret") && !text.contains("olcSyncrepl"),
            "{text}"
        );
    }
}
