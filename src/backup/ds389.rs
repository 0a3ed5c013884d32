//! 389 Directory Server's own backups, read with 389's own tool.
//!
//! A 389 DS online backup (a task under `cn=backup,cn=tasks,cn=config`,
//! what `dsconf INSTANCE backup create` starts) is a directory of Berkeley
//! DB files: one folder per backend (`userroot/id2entry.db`, the entries,
//! and its indexes), the transaction log and `DBVERSION`. `dsctl INSTANCE
//! bak2db DIR` restores it into a stopped instance.
//!
//! Its entries are counted and digested from `id2entry.db` as 389's
//! `dbscan -f` prints it, read-only, without a server: the same digest
//! ([`super::Digest`]) an LDAP export of the backend gives, so a backup taken
//! with this method is compared with the manifest like any other. `dbscan`
//! prints each entry as `id N` and its stored attributes, one tab in front
//! (values folded as in LDIF), with `rdn:` (the entry's own RDN; the suffix
//! entry's is the whole suffix) and `parentid:` in place of a DN: the DN is
//! the chain of RDNs up to the entry without a parent. Tombstones (deleted
//! entries a replica keeps, and the replica update vector's entry) are not
//! entries an LDAP search returns and are left out.
//!
//! Only the Berkeley DB implementation (`nsslapd-backend-implement: bdb`,
//! the default of 389 DS 2.x); an LMDB instance keeps one `data.mdb` and is
//! said to be unsupported here.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::digest::Digester;
use super::ldif::{self, Entry};
use super::slapd::{run, Contents, Error};
use crate::freeze::dn::NormDn;

/// The archive's file in a backup directory (`--method 389`): the
/// server's backup directory as a tar archive, names relative to it.
pub const ARCHIVE: &str = "389-backup.tar";

/// 389's database dump tool.
pub const DBSCAN: &str = "/usr/bin/dbscan";

/// The `id2entry.db` of a backend in a 389 backup or database directory:
/// `DIR/<backend name in lower case>/id2entry.db`.
pub fn id2entry(dir: &Path, backend: &str) -> PathBuf {
    dir.join(backend.to_ascii_lowercase()).join("id2entry.db")
}

/// Counts and digests the entries of `suffix` in a backend's `id2entry.db`
/// (`dbscan -f`, its output kept in `scratch`), within `limit`.
pub async fn contents(
    id2entry: &Path,
    suffix: &str,
    scratch: &Path,
    limit: Duration,
) -> Result<Contents, Error> {
    if !id2entry.is_file() {
        return Err(Error::Config(format!(
            "{} not found: not a 389 DS backup of this backend, or an LMDB instance (only \
             Berkeley DB backends are read here)",
            id2entry.display()
        )));
    }
    if !Path::new(DBSCAN).exists() {
        return Err(Error::Config(format!(
            "{DBSCAN} not found: reading a 389 DS database takes 389's dbscan (Debian: \
             389-ds-base)"
        )));
    }
    let out_path = scratch.join("dbscan.out");
    let out = File::create(&out_path).map_err(|source| Error::Io {
        path: out_path.clone(),
        source,
    })?;
    let mut cmd = Command::new(DBSCAN);
    cmd.arg("-f").arg(id2entry);
    run(
        cmd,
        &format!("dbscan -f {}", id2entry.display()),
        limit,
        Some(out),
    )
    .await?;
    let open = || {
        File::open(&out_path)
            .map(BufReader::new)
            .map_err(|source| Error::Io {
                path: out_path.clone(),
                source,
            })
    };
    contents_of_dump(open()?, open()?, suffix)
        .map_err(|e| Error::Config(format!("dbscan -f {}: {e}", id2entry.display())))
}

/// Where 389 DS's instance configurations live (`slapd-NAME/dse.ldif`).
pub const CONFIG_ROOT: &str = "/etc/dirsrv";
/// Where a running instance keeps its pid file (`slapd-NAME.pid`).
pub const RUN_DIR: &str = "/run/dirsrv";
/// 389's server binary (its `archive2db` mode restores an archive offline).
pub const NS_SLAPD: &str = "/usr/sbin/ns-slapd";

/// What a restore needs to know of a 389 DS instance, from its
/// `dse.ldif` (read as the file, the server may be stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    /// `CONFIG_ROOT/slapd-NAME`.
    pub config_dir: PathBuf,
    /// `nsslapd-directory` of the ldbm database plugin: every backend's
    /// database below it.
    pub db_dir: PathBuf,
    /// `nsslapd-bakdir` of `cn=config`.
    pub bak_dir: PathBuf,
    /// `RUN_DIR/slapd-NAME.pid`.
    pub pid_file: PathBuf,
    /// Its databases: (backend name, suffix), as `dse.ldif` lists them.
    pub backends: Vec<(String, String)>,
    /// Its LDAPI socket (`nsslapd-ldapifilepath` with `nsslapd-ldapilisten:
    /// on`).
    pub ldapi: Option<PathBuf>,
}

impl Instance {
    /// The instance `name` under `config_root`.
    pub fn read(config_root: &Path, name: &str) -> Result<Instance, String> {
        let config_dir = config_root.join(format!("slapd-{name}"));
        let dse = config_dir.join("dse.ldif");
        let f = File::open(&dse).map_err(|e| {
            format!(
                "{}: {e} (no 389 DS instance {name} here: see `dsctl -l`)",
                dse.display()
            )
        })?;
        let norm = |s: &str| NormDn::parse(s.as_bytes());
        let config = norm("cn=config");
        let ldbm = norm("cn=config,cn=ldbm database,cn=plugins,cn=config");
        let plugin = norm("cn=ldbm database,cn=plugins,cn=config");
        let (mut db_dir, mut bak_dir, mut backends) = (None, None, Vec::new());
        let mut ldapi = None;
        for e in ldif::Reader::new(BufReader::new(f)) {
            let e = e.map_err(|e| format!("{}: {e}", dse.display()))?;
            let dn = norm(&e.dn);
            if dn.is_some() && dn == config {
                bak_dir = single(&e, "nsslapd-bakdir");
                if single(&e, "nsslapd-ldapilisten").is_some_and(|v| v.eq_ignore_ascii_case("on")) {
                    ldapi = single(&e, "nsslapd-ldapifilepath").map(PathBuf::from);
                }
            } else if dn.is_some() && dn == ldbm {
                db_dir = single(&e, "nsslapd-directory");
            } else if let (Some(dn), Some(plugin)) = (&dn, &plugin) {
                let backend = e.attrs.iter().any(|(n, v)| {
                    n.eq_ignore_ascii_case("objectClass")
                        && v.iter()
                            .any(|v| v.eq_ignore_ascii_case(b"nsBackendInstance"))
                });
                if backend && dn.depth() == plugin.depth() + 1 && dn.is_within(plugin) {
                    if let (Some(name), Some(suffix)) =
                        (single(&e, "cn"), single(&e, "nsslapd-suffix"))
                    {
                        backends.push((name, suffix));
                    }
                }
            }
        }
        let missing = |what: &str| format!("{}: no {what}", dse.display());
        Ok(Instance {
            name: name.into(),
            db_dir: db_dir.ok_or_else(|| missing("nsslapd-directory"))?.into(),
            bak_dir: bak_dir.ok_or_else(|| missing("nsslapd-bakdir"))?.into(),
            pid_file: Path::new(RUN_DIR).join(format!("slapd-{name}.pid")),
            config_dir,
            backends,
            ldapi,
        })
    }

    /// The backend holding `suffix` (DNs compared normalised).
    pub fn backend_of(&self, suffix: &str) -> Option<&str> {
        let want = NormDn::parse(suffix.as_bytes())?;
        self.backends
            .iter()
            .find(|(_, s)| NormDn::parse(s.as_bytes()).as_ref() == Some(&want))
            .map(|(name, _)| name.as_str())
    }
}

/// `ns-slapd archive2db -D CONFIG -a ARCHIVE`: 389's offline restore of a
/// backup archive (what `dsctl NAME bak2db` runs), not yet started.
pub fn archive2db(config: &Path, archive: &Path) -> Command {
    let mut cmd = Command::new(NS_SLAPD);
    cmd.arg("archive2db")
        .arg("-D")
        .arg(config)
        .arg("-a")
        .arg(archive);
    cmd
}

/// `ns-slapd ldif2db -D CONFIG -n BACKEND -i FILE`: 389's offline import
/// of one backend's LDIF (what `dsctl NAME ldif2db` runs), not yet started.
pub fn ldif2db(config: &Path, backend: &str, file: &Path) -> Command {
    let mut cmd = Command::new(NS_SLAPD);
    cmd.arg("ldif2db")
        .arg("-D")
        .arg(config)
        .arg("-n")
        .arg(backend)
        .arg("-i")
        .arg(file);
    cmd
}

/// The names of the 389 DS instances configured under `config_root`
/// (`slapd-NAME` folders with a `dse.ldif`), sorted.
pub fn instances(config_root: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(config_root) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let inst = name.strip_prefix("slapd-")?;
            e.path()
                .join("dse.ldif")
                .is_file()
                .then(|| inst.to_string())
        })
        .collect();
    out.sort();
    out
}

/// `ldapi://` URL of a socket path (percent-encoded).
pub fn ldapi_url(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let mut s = String::from("ldapi://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Where a throwaway 389 DS keeps everything (`abproxy verify
/// --restore-test --ds-instance NAME`): one temporary directory, nothing
/// of the live instance's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    /// `-D` of ns-slapd: the rewritten `dse.ldif`, the copied schema.
    pub fn config(&self) -> PathBuf {
        self.root.join("config")
    }
    /// Every backend's database (`db/<backend>`), the transaction log.
    pub fn db(&self) -> PathBuf {
        self.root.join("db")
    }
    /// The error, access, audit and security logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The unpacked archive `archive2db` reads.
    pub fn archive(&self) -> PathBuf {
        self.root.join("archive")
    }
    /// Lock, run (pid, stats, ldapi), tmp, bak and ldif directories.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// The directories ns-slapd needs, in creation order.
    pub fn dirs(&self) -> Vec<PathBuf> {
        [
            "config", "db", "logs", "archive", "lock", "run", "tmp", "bak", "ldif",
        ]
        .iter()
        .map(|d| self.root.join(d))
        .collect()
    }
    /// ns-slapd's pid file (`-i`).
    pub fn pid_file(&self) -> PathBuf {
        self.dir("run").join("ns-slapd.pid")
    }
}

/// A live instance's `dse.ldif` made into a throwaway's, and what the
/// throwaway needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrowawayDse {
    /// The rewritten entries, in the live file's order.
    pub entries: Vec<Entry>,
    /// `nsslapd-localuser`: the user ns-slapd runs as and owns the files.
    pub user: String,
    /// `nsslapd-rootdn` (Directory Manager), whose password is replaced.
    pub root_dn: String,
    /// The ldbm backends (`cn` of each `nsBackendInstance`), lower case.
    pub backends: Vec<String>,
}

/// `{SSHA512}` of `password` with `salt`, a scheme 389 DS accepts for
/// `nsslapd-rootpw` in `dse.ldif` (clear text it refuses).
pub fn ssha512(password: &str, salt: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::{Digest as _, Sha512};
    let mut h = Sha512::new();
    h.update(password.as_bytes());
    h.update(salt);
    let mut bytes = h.finalize().to_vec();
    bytes.extend_from_slice(salt);
    format!(
        "{{SSHA512}}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The configuration of a throwaway 389 DS made from a live instance's
/// `dse.ldif` (`live`, as read from `live_config_dir`): the same schema,
/// plugins, backends and indexes, but
///
/// * in `cn=config`: LDAP on `127.0.0.1:port` only (no TLS port, no
///   `nsslapd-security`, no ldapi), Directory Manager's password
///   `rootpw` (hashed), every log, lock, run, tmp, bak, ldif, cert and
///   schema directory in `layout`;
/// * the ldbm database's `nsslapd-directory`, `nsslapd-db-home-directory`
///   and `nsslapd-db-logdirectory` in `layout.db()`, each backend's
///   `nsslapd-directory` in `layout.db()/<backend>`;
/// * replication left out: `cn=changelog5,cn=config`, every
///   `nsDS5Replica` and replication agreement (and what is below them),
///   each backend's `cn=changelog`;
/// * any other value naming a file under the live instance's database,
///   log, lock, bak, ldif or configuration directory moved to the
///   throwaway's (a plugin's log file).
pub fn throwaway_dse(
    live: &[Entry],
    live_config_dir: &Path,
    layout: &Layout,
    port: u16,
    rootpw: &str,
) -> Result<ThrowawayDse, String> {
    let norm = |s: &str| NormDn::parse(s.as_bytes());
    let config_dn = norm("cn=config").expect("a DN");
    let ldbm_dn = norm("cn=ldbm database,cn=plugins,cn=config").expect("a DN");
    let ldbm_config_dn = norm("cn=config,cn=ldbm database,cn=plugins,cn=config").expect("a DN");
    let changelog5 = norm("cn=changelog5,cn=config").expect("a DN");
    let find = |dn: &NormDn| {
        live.iter()
            .find(|e| norm(&e.dn).as_ref() == Some(dn))
            .ok_or_else(|| format!("dse.ldif has no {dn} entry"))
    };
    let config = find(&config_dn)?;
    let ldbm_config = find(&ldbm_config_dn)?;
    let need = |e: &Entry, attr: &str| {
        single(e, attr).ok_or_else(|| format!("dse.ldif: {} has no single {attr}", e.dn))
    };
    let user = need(config, "nsslapd-localuser")?;
    let root_dn = single(config, "nsslapd-rootdn").unwrap_or_else(|| "cn=Directory Manager".into());
    let live_db = need(ldbm_config, "nsslapd-directory")?;
    let live_logs = need(config, "nsslapd-errorlog")?;
    let live_logs = Path::new(&live_logs)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // Live directory -> the throwaway's, longest first (the db directory
    // may lie below another).
    let mut moves: Vec<(String, PathBuf)> = vec![
        (live_db.clone(), layout.db()),
        (live_logs, layout.logs()),
        (live_config_dir.display().to_string(), layout.config()),
    ];
    for (attr, dir) in [
        ("nsslapd-lockdir", "lock"),
        ("nsslapd-bakdir", "bak"),
        ("nsslapd-ldifdir", "ldif"),
    ] {
        if let Some(v) = single(config, attr) {
            moves.push((v, layout.dir(dir)));
        }
    }
    moves.retain(|(from, _)| from.len() > 1 && from.starts_with('/'));
    moves.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    let moved = |v: &[u8]| -> Option<Vec<u8>> {
        let s = std::str::from_utf8(v).ok()?;
        moves.iter().find_map(|(from, to)| {
            let rest = s.strip_prefix(from.trim_end_matches('/'))?;
            if rest.is_empty() {
                Some(to.display().to_string().into_bytes())
            } else {
                let rest = rest.strip_prefix('/')?;
                Some(to.join(rest).display().to_string().into_bytes())
            }
        })
    };

    // What is left out: replication, and everything below it.
    let mut dropped: Vec<NormDn> = Vec::new();
    let mut entries = Vec::new();
    let mut backends = Vec::new();
    for e in live {
        let dn = norm(&e.dn).ok_or_else(|| format!("dse.ldif: bad DN {}", e.dn))?;
        let replication = has_class(e, "nsDS5Replica")
            || has_class(e, "nsDS5ReplicationAgreement")
            || has_class(e, "nsDSWindowsReplicationAgreement")
            || dn.is_within(&changelog5)
            // A backend's changelog: cn=changelog,cn=BACKEND,cn=ldbm database,...
            || (dn.depth() == ldbm_dn.depth() + 2
                && dn.is_within(&ldbm_dn)
                && dn.to_string().starts_with("cn=changelog,"));
        if replication || dropped.iter().any(|d| !dn.is_root() && dn.is_within(d)) {
            if !dn.is_root() {
                dropped.push(dn);
            }
            continue;
        }
        let mut e = e.clone();
        for (_, values) in &mut e.attrs {
            for v in values.iter_mut() {
                if let Some(m) = moved(v) {
                    *v = m;
                }
            }
        }
        if dn == config_dn {
            let logs = layout.logs();
            for attr in [
                "nsslapd-securePort",
                "nsslapd-securelistenhost",
                "nsslapd-listenhost",
                "nsslapd-port",
                "nsslapd-security",
                "nsslapd-ldapilisten",
                "nsslapd-ldapifilepath",
                "nsslapd-ldapiautobind",
                "nsslapd-rootpw",
            ] {
                remove(&mut e, attr);
            }
            e.push("nsslapd-port", port.to_string());
            e.push("nsslapd-listenhost", "127.0.0.1");
            e.push("nsslapd-security", "off");
            e.push("nsslapd-ldapilisten", "off");
            e.push(
                "nsslapd-ldapifilepath",
                layout.dir("run").join("ldapi").display().to_string(),
            );
            e.push("nsslapd-ldapiautobind", "off");
            e.push("nsslapd-rootpw", rootpw);
            for (attr, to) in [
                ("nsslapd-errorlog", logs.join("errors")),
                ("nsslapd-accesslog", logs.join("access")),
                ("nsslapd-auditlog", logs.join("audit")),
                ("nsslapd-auditfaillog", logs.join("audit-failure")),
                ("nsslapd-securitylog", logs.join("security")),
                ("nsslapd-lockdir", layout.dir("lock")),
                ("nsslapd-tmpdir", layout.dir("tmp")),
                ("nsslapd-bakdir", layout.dir("bak")),
                ("nsslapd-ldifdir", layout.dir("ldif")),
                ("nsslapd-rundir", layout.dir("run")),
                ("nsslapd-certdir", layout.config()),
                ("nsslapd-schemadir", layout.config().join("schema")),
            ] {
                set(&mut e, attr, to.display().to_string());
            }
        } else if dn.is_within(&ldbm_dn) && dn != ldbm_dn {
            if dn == ldbm_config_dn {
                set(
                    &mut e,
                    "nsslapd-directory",
                    layout.db().display().to_string(),
                );
            }
            for attr in ["nsslapd-db-home-directory", "nsslapd-db-logdirectory"] {
                if single(&e, attr).is_some() {
                    set(&mut e, attr, layout.db().display().to_string());
                }
            }
            if has_class(&e, "nsBackendInstance") && dn.depth() == ldbm_dn.depth() + 1 {
                let name = single(&e, "cn")
                    .ok_or_else(|| format!("dse.ldif: backend {} has no single cn", e.dn))?
                    .to_ascii_lowercase();
                set(
                    &mut e,
                    "nsslapd-directory",
                    layout.db().join(&name).display().to_string(),
                );
                backends.push(name);
            }
        }
        entries.push(e);
    }
    Ok(ThrowawayDse {
        entries,
        user,
        root_dn,
        backends,
    })
}

/// The archive's own record of its backends (`dse_instance.ldif`) with
/// each `nsslapd-directory` in `db` (`db/<backend>`), so that nothing
/// `archive2db` reads names a live directory.
pub fn throwaway_archive_instances(entries: &mut [Entry], db: &Path) {
    for e in entries {
        if single(e, "nsslapd-directory").is_some() {
            if let Some(cn) = single(e, "cn") {
                set(
                    e,
                    "nsslapd-directory",
                    db.join(cn.to_ascii_lowercase()).display().to_string(),
                );
            }
        }
    }
}

fn has_class(e: &Entry, class: &str) -> bool {
    e.attrs.iter().any(|(name, values)| {
        name.eq_ignore_ascii_case("objectClass")
            && values
                .iter()
                .any(|v| v.eq_ignore_ascii_case(class.as_bytes()))
    })
}

fn remove(e: &mut Entry, attr: &str) {
    e.attrs.retain(|(n, _)| !n.eq_ignore_ascii_case(attr));
}

/// `attr` set to the one value `value` (in place when it is there).
fn set(e: &mut Entry, attr: &str, value: String) {
    match e
        .attrs
        .iter_mut()
        .find(|(n, _)| n.eq_ignore_ascii_case(attr))
    {
        Some((_, values)) => *values = vec![value.into_bytes()],
        None => e.push(attr, value),
    }
}

/// What one `id N` block says of the tree.
struct Node {
    rdn: String,
    parent: Option<u64>,
}

/// Counts and digests a `dbscan -f` dump of `suffix`'s backend, read twice
/// (`first` and `second` are the same dump): once for the tree (RDN and
/// parent of each id, all a DN needs), once for the entries, so that only
/// the tree is held in memory.
pub fn contents_of_dump<R: BufRead>(first: R, second: R, suffix: &str) -> Result<Contents, String> {
    let mut tree: HashMap<u64, Node> = HashMap::new();
    blocks(first, |id, e| {
        let rdn = single(&e, "rdn").ok_or_else(|| format!("id {id} has no single rdn"))?;
        let parent = match single(&e, "parentid") {
            Some(p) => Some(
                p.parse()
                    .map_err(|_| format!("id {id}: parentid {p:?} is not a number"))?,
            ),
            None => None,
        };
        if tree.insert(id, Node { rdn, parent }).is_some() {
            return Err(format!("id {id} appears twice"));
        }
        Ok(())
    })?;
    let want = NormDn::parse(suffix.as_bytes()).ok_or_else(|| format!("bad suffix {suffix}"))?;
    let mut dns: HashMap<u64, String> = HashMap::new();
    let mut digester = Digester::default();
    let mut entries = 0u64;
    let mut suffix_uuid = None;
    blocks(second, |id, mut e| {
        let dn = dn_of(id, &tree, &mut dns)?;
        if tombstone(&e) {
            return Ok(());
        }
        let norm = NormDn::parse(dn.as_bytes()).ok_or_else(|| format!("id {id}: bad DN {dn}"))?;
        if !norm.is_within(&want) {
            return Err(format!("id {id}: {dn} is not under {suffix}"));
        }
        if norm == want {
            suffix_uuid = single(&e, "entryUUID").or_else(|| single(&e, "nsUniqueId"));
        }
        e.dn = dn;
        e.attrs
            .retain(|(name, _)| !name.eq_ignore_ascii_case("rdn"));
        let e = without_state(e);
        digester.add(&e).map_err(|err| format!("id {id}: {err}"))?;
        entries += 1;
        Ok(())
    })?;
    Ok(Contents {
        entries,
        digest: digester.finish().to_string(),
        context_csn: Vec::new(),
        suffix_uuid,
    })
}

/// The DN of `id`: its RDN, then its parent's DN (memoised in `dns`).
fn dn_of(
    id: u64,
    tree: &HashMap<u64, Node>,
    dns: &mut HashMap<u64, String>,
) -> Result<String, String> {
    if let Some(dn) = dns.get(&id) {
        return Ok(dn.clone());
    }
    // Up to the first id whose DN is known or that has no parent.
    let mut chain = vec![id];
    let mut at = id;
    let base = loop {
        let node = tree
            .get(&at)
            .ok_or_else(|| format!("id {at} is missing (a parent of id {id})"))?;
        match node.parent {
            None => break node.rdn.clone(),
            Some(p) => {
                if let Some(dn) = dns.get(&p) {
                    break dn.clone();
                }
                if chain.len() > tree.len() {
                    return Err(format!("id {id}: its parents form a loop"));
                }
                chain.push(p);
                at = p;
            }
        }
    };
    // `base` is the DN of the last id in `chain` when it has no parent,
    // else of its parent.
    let mut dn = base;
    let last = *chain.last().expect("not empty");
    if tree[&last].parent.is_none() {
        dns.insert(last, dn.clone());
        chain.pop();
    }
    for &i in chain.iter().rev() {
        dn = format!("{},{dn}", tree[&i].rdn);
        dns.insert(i, dn.clone());
    }
    Ok(dn)
}

/// An entry as LDAP serves it, from one stored by a replica: each value's
/// replication state (options `adcsn-CSN`, `vucsn-CSN`, `vdcsn-CSN`,
/// `mdcsn-CSN`) dropped from the attribute's name, and the values and
/// attributes the replica keeps as deleted (`deleted`,
/// `deletedattribute`) left out. Other options (`lang-de`, `binary`)
/// stay.
fn without_state(e: Entry) -> Entry {
    let mut out = Entry::new(e.dn);
    for (name, values) in e.attrs {
        let mut parts = name.split(';');
        let mut kept = parts.next().unwrap_or_default().to_string();
        let mut deleted = false;
        for opt in parts {
            let lower = opt.to_ascii_lowercase();
            if lower == "deleted" || lower == "deletedattribute" {
                deleted = true;
            } else if !["adcsn-", "vucsn-", "vdcsn-", "mdcsn-"]
                .iter()
                .any(|p| lower.starts_with(p))
            {
                kept.push(';');
                kept.push_str(opt);
            }
        }
        if deleted {
            continue;
        }
        for v in values {
            out.push(&kept, v);
        }
    }
    out
}

/// A deleted entry a replica keeps, or the replica update vector's entry.
fn tombstone(e: &Entry) -> bool {
    e.attrs.iter().any(|(name, values)| {
        name.eq_ignore_ascii_case("objectClass")
            && values
                .iter()
                .any(|v| v.eq_ignore_ascii_case(b"nsTombstone"))
    })
}

/// The one value of `attr`, as text.
fn single(e: &Entry, attr: &str) -> Option<String> {
    let (_, values) = e.attrs.iter().find(|(n, _)| n.eq_ignore_ascii_case(attr))?;
    match values.as_slice() {
        [v] => String::from_utf8(v.clone()).ok(),
        _ => None,
    }
}

/// Calls `each` with every `id N` block of a dump, parsed as an LDIF entry
/// (DN `entryid=N`, the block's lines without their tab).
fn blocks<R: BufRead>(
    mut input: R,
    mut each: impl FnMut(u64, Entry) -> Result<(), String>,
) -> Result<(), String> {
    let mut current: Option<(u64, Vec<u8>)> = None;
    let mut line = Vec::new();
    let mut number = 0u64;
    let finish = |block: Option<(u64, Vec<u8>)>,
                  each: &mut dyn FnMut(u64, Entry) -> Result<(), String>|
     -> Result<(), String> {
        let Some((id, text)) = block else {
            return Ok(());
        };
        let mut parsed = ldif::Reader::new(text.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("id {id}: {e}"))?;
        match (parsed.pop(), parsed.is_empty()) {
            (Some(e), true) => each(id, e),
            _ => Err(format!("id {id}: not one entry")),
        }
    };
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the dump: {e}"))?;
        if n == 0 {
            break;
        }
        number += 1;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if let Some(id) = text.strip_prefix(b"id ") {
            let id = std::str::from_utf8(id)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("line {number}: bad id line"))?;
            finish(current.take(), &mut each)?;
            current = Some((id, format!("dn: entryid={id}\n").into_bytes()));
        } else if let Some(rest) = text.strip_prefix(b"\t") {
            let Some((_, buf)) = current.as_mut() else {
                return Err(format!("line {number}: an attribute before the first id"));
            };
            if !rest.is_empty() {
                buf.extend_from_slice(rest);
                buf.push(b'\n');
            }
        } else if !text.is_empty() {
            return Err(format!(
                "line {number}: not a dbscan entry line: {}",
                String::from_utf8_lossy(&text[..text.len().min(60)])
            ));
        }
    }
    finish(current.take(), &mut each)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::Digest;

    /// As `dbscan -f id2entry.db` of 389 DS 2.3 prints it (abridged).
    const DUMP: &str = "id 1\n\trdn: dc=example,dc=org\n\tobjectClass: top\n\tobjectClass: domain\n\
\tdc: example\n\tnsUniqueId: 46de40bd-ef6211f1-b7a2fda2-6c25e0c7\n\tentryid: 1\n\tnumSubordinates: 1\n\
\tentryUUID: 16d5ab55-2708-4a3c-adcd-e99721409a1f\n\
\tdsEntryDN: dc=example,dc=org\n\t\n\
id 2\n\trdn: ou=people\n\tobjectClass: top\n\tobjectClass: organizationalUnit\n\tou: people\n\
\tparentid: 1\n\tentryid: 2\n\tdsEntryDN: ou=people,dc=example,dc=org\n\t\n\
id 4\n\trdn: uid=u2\n\tobjectClass: top\n\tobjectClass: person\n\tuid: u2\n\tcn: U 2\n\tsn: U\n\
\tuserPassword:: e1BCS0RGMi1TSEE1MTJ9MTAwMDAkQlljSGtZSDJLRXhuR215UXBuSVorb2VwL2F\n\
\t PQlk1RUo=\n\tparentid: 2\n\tentryid: 4\n\tdsEntryDN: uid=u2,ou=people,dc=example,dc=org\n\t\n\
id 3\n\trdn: nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff\n\tobjectClass: top\n\
\tobjectClass: nsTombstone\n\tparentid: 1\n\tentryid: 3\n\t\n";

    /// The same entries as an LDAP export (`*`, `+`) gives them.
    const EXPORT: &str =
        "dn: dc=example,dc=org\nobjectClass: top\nobjectClass: domain\ndc: example\n\
nsUniqueId: 46de40bd-ef6211f1-b7a2fda2-6c25e0c7\nentryid: 1\nnumSubordinates: 1\n\
entryUUID: 16d5ab55-2708-4a3c-adcd-e99721409a1f\n\
dsEntryDN: dc=example,dc=org\nentrydn: dc=example,dc=org\n\n\
dn: ou=people,dc=example,dc=org\nobjectClass: top\nobjectClass: organizationalUnit\nou: people\n\
parentid: 1\nentryid: 2\ndsEntryDN: ou=people,dc=example,dc=org\nhasSubordinates: TRUE\n\n\
dn: uid=u2,ou=people,dc=example,dc=org\nobjectClass: top\nobjectClass: person\nuid: u2\ncn: U 2\n\
sn: U\nuserPassword:: e1BCS0RGMi1TSEE1MTJ9MTAwMDAkQlljSGtZSDJLRXhuR215UXBuSVorb2VwL2FPQlk1RUo=\n\
dsEntryDN: uid=u2,ou=people,dc=example,dc=org\n\n";

    /// The digest of the entries of an LDIF text.
    fn digest_of(export: &str) -> String {
        Digest::of_entries(ldif::read(export).unwrap())
            .unwrap()
            .to_string()
    }

    fn of(dump: &str) -> Result<Contents, String> {
        contents_of_dump(dump.as_bytes(), dump.as_bytes(), "dc=example,dc=org")
    }

    #[test]
    fn a_dump_digests_as_the_ldap_export_of_the_same_entries() {
        let c = of(DUMP).unwrap();
        assert_eq!(c.entries, 3, "the tombstone is not an entry");
        assert_eq!(
            c.suffix_uuid.as_deref(),
            Some("16d5ab55-2708-4a3c-adcd-e99721409a1f")
        );
        assert_eq!(c.digest, digest_of(EXPORT));
    }

    #[test]
    fn a_changed_value_changes_the_digest() {
        let changed = DUMP.replace("\tcn: U 2\n", "\tcn: U 3\n");
        assert_ne!(of(&changed).unwrap().digest, of(DUMP).unwrap().digest);
    }

    #[test]
    fn a_replicas_value_states_and_deleted_values_are_not_served() {
        // As dbscan prints an entry of a replicated suffix after modifies.
        let dump = "id 1\n\trdn: dc=example,dc=org\n\tobjectClass: top\n\
\tsn;adcsn-6b11ed39000000010000;vucsn-6b11ed39000000010000: new\n\
\tsn;vucsn-6b11ed38000000010000;vdcsn-6b11ed39000000010000;deleted: old\n\
\tdescription;adcsn-6b11ed39000000010001;deletedattribute;deleted: gone\n\
\tcn;lang-de;vucsn-6b11ed39000000010002: Beispiel\n\tcn;adcsn-6b11ed39000000010002: x\n\t\n";
        let export = "dn: dc=example,dc=org\nobjectClass: top\nsn: new\ncn;lang-de: Beispiel\n\
cn: x\n\n";
        let c = of(dump).unwrap();
        assert_eq!(c.digest, digest_of(export));
    }

    #[test]
    fn children_before_parents_and_moved_entries_get_their_dn() {
        // An entry moved under a parent created after it has a lower id.
        let dump = "id 5\n\trdn: cn=x\n\tobjectClass: top\n\tparentid: 9\n\t\n\
id 1\n\trdn: dc=example,dc=org\n\tobjectClass: top\n\t\n\
id 9\n\trdn: ou=new\n\tobjectClass: top\n\tparentid: 1\n\t\n";
        let export = "dn: cn=x,ou=new,dc=example,dc=org\nobjectClass: top\nparentid: 9\n\n\
dn: dc=example,dc=org\nobjectClass: top\n\n\
dn: ou=new,dc=example,dc=org\nobjectClass: top\nparentid: 1\n\n";
        let c = of(dump).unwrap();
        assert_eq!(c.entries, 3);
        assert_eq!(c.digest, digest_of(export));
    }

    #[test]
    fn an_instance_is_read_from_its_dse_ldif() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("slapd-x1");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("dse.ldif"),
            "dn: cn=config\nobjectClass: top\nnsslapd-bakdir: /var/lib/dirsrv/slapd-x1/bak\n\
nsslapd-ldapilisten: on\nnsslapd-ldapifilepath: /run/slapd-x1.socket\n\n\
dn: cn=config,cn=ldbm database,cn=plugins,cn=config\nobjectClass: top\n\
nsslapd-directory: /var/lib/dirsrv/slapd-x1/db\n\n\
dn: cn=userRoot,cn=ldbm database,cn=plugins,cn=config\nobjectClass: top\n\
objectClass: extensibleObject\nobjectClass: nsBackendInstance\ncn: userRoot\n\
nsslapd-suffix: dc=example,dc=org\n\n\
dn: cn=index,cn=userRoot,cn=ldbm database,cn=plugins,cn=config\nobjectClass: top\n\
objectClass: nsBackendInstance\ncn: index\nnsslapd-suffix: dc=wrong\n\n",
        )
        .unwrap();
        let i = Instance::read(root.path(), "x1").unwrap();
        assert_eq!(i.db_dir, Path::new("/var/lib/dirsrv/slapd-x1/db"));
        assert_eq!(i.bak_dir, Path::new("/var/lib/dirsrv/slapd-x1/bak"));
        assert_eq!(i.pid_file, Path::new("/run/dirsrv/slapd-x1.pid"));
        assert_eq!(i.ldapi.as_deref(), Some(Path::new("/run/slapd-x1.socket")));
        assert_eq!(
            i.backends,
            [("userRoot".to_string(), "dc=example,dc=org".to_string())]
        );
        assert_eq!(i.backend_of("DC=Example, dc=org"), Some("userRoot"));
        assert_eq!(i.backend_of("dc=wrong"), None);
        let err = Instance::read(root.path(), "nope").unwrap_err();
        assert!(err.contains("no 389 DS instance nope"), "{err}");
        std::fs::write(dir.join("dse.ldif"), "dn: cn=config\nobjectClass: top\n\n").unwrap();
        let err = Instance::read(root.path(), "x1").unwrap_err();
        assert!(err.contains("no nsslapd-directory"), "{err}");
    }

    /// A live instance's dse.ldif, abridged: what the throwaway changes
    /// and what it leaves out.
    const LIVE_DSE: &str = "dn:\nobjectClass: top\n\n\
dn: cn=config\ncn: config\nobjectClass: nsslapdConfig\n\
nsslapd-schemadir: /etc/dirsrv/slapd-x1/schema\nnsslapd-lockdir: /run/lock/dirsrv/slapd-x1\n\
nsslapd-tmpdir: /tmp\nnsslapd-certdir: /etc/dirsrv/slapd-x1\n\
nsslapd-ldifdir: /var/lib/dirsrv/slapd-x1/ldif\nnsslapd-bakdir: /var/lib/dirsrv/slapd-x1/bak\n\
nsslapd-rundir: /run/dirsrv\nnsslapd-accesslog: /var/log/dirsrv/slapd-x1/access\n\
nsslapd-securitylog: /var/log/dirsrv/slapd-x1/security\nnsslapd-port: 389\n\
nsslapd-listenhost: 0.0.0.0\nnsslapd-localuser: dirsrv\n\
nsslapd-errorlog: /var/log/dirsrv/slapd-x1/errors\nnsslapd-auditlog: /var/log/dirsrv/slapd-x1/audit\n\
nsslapd-rootdn: cn=Directory Manager\nnsslapd-ldapilisten: on\n\
nsslapd-ldapifilepath: /run/slapd-x1.socket\nnsslapd-ldapiautobind: on\n\
nsslapd-securePort: 636\nnsslapd-security: on\nnsslapd-rootpw: {PBKDF2-SHA512}live-secret\n\n\
dn: cn=changelog5,cn=config\nobjectClass: top\nnsslapd-changelogdir: /var/lib/dirsrv/slapd-x1/changelogdb\n\n\
dn: cn=replica,cn=dc\\3Dexample\\2Cdc\\3Dorg,cn=mapping tree,cn=config\nobjectClass: nsds5Replica\n\
nsDS5ReplicaRoot: dc=example,dc=org\n\n\
dn: cn=to-peer,cn=replica,cn=dc\\3Dexample\\2Cdc\\3Dorg,cn=mapping tree,cn=config\n\
objectClass: nsds5replicationagreement\nnsDS5ReplicaHost: peer.example.org\n\n\
dn: cn=referential integrity postoperation,cn=plugins,cn=config\nobjectClass: nsSlapdPlugin\n\
referint-logfile: /var/log/dirsrv/slapd-x1/referint\n\n\
dn: cn=Internationalization Plugin,cn=plugins,cn=config\nobjectClass: nsSlapdPlugin\n\
nsslapd-pluginarg0: /etc/dirsrv/slapd-x1/slapd-collations.conf\n\n\
dn: cn=config,cn=ldbm database,cn=plugins,cn=config\nobjectClass: extensibleObject\n\
nsslapd-directory: /var/lib/dirsrv/slapd-x1/db\n\n\
dn: cn=userRoot,cn=ldbm database,cn=plugins,cn=config\nobjectClass: extensibleObject\n\
objectClass: nsBackendInstance\ncn: userRoot\nnsslapd-suffix: dc=example,dc=org\n\
nsslapd-directory: /var/lib/dirsrv/slapd-x1/db/userroot\n\n\
dn: cn=changelog,cn=userRoot,cn=ldbm database,cn=plugins,cn=config\nobjectClass: extensibleObject\n\
cn: changelog\nnsslapd-changelogmaxage: 7d\n\n\
dn: cn=uid,cn=index,cn=userRoot,cn=ldbm database,cn=plugins,cn=config\nobjectClass: nsIndex\n\
cn: uid\n\n\
dn: cn=bdb,cn=config,cn=ldbm database,cn=plugins,cn=config\nobjectClass: extensibleObject\n\
nsslapd-db-logdirectory: /var/lib/dirsrv/slapd-x1/db\n\
nsslapd-db-home-directory: /var/lib/dirsrv/slapd-x1/db\n\n";

    #[test]
    fn a_throwaway_dse_listens_on_loopback_and_keeps_everything_in_its_directory() {
        let live = ldif::read(LIVE_DSE).unwrap();
        let layout = Layout { root: "/t".into() };
        let t = throwaway_dse(
            &live,
            Path::new("/etc/dirsrv/slapd-x1"),
            &layout,
            40123,
            "{SSHA512}new",
        )
        .unwrap();
        assert_eq!(t.user, "dirsrv");
        assert_eq!(t.root_dn, "cn=Directory Manager");
        assert_eq!(t.backends, ["userroot"]);
        let dns: Vec<&str> = t.entries.iter().map(|e| e.dn.as_str()).collect();
        assert_eq!(
            dns,
            [
                "",
                "cn=config",
                "cn=referential integrity postoperation,cn=plugins,cn=config",
                "cn=Internationalization Plugin,cn=plugins,cn=config",
                "cn=config,cn=ldbm database,cn=plugins,cn=config",
                "cn=userRoot,cn=ldbm database,cn=plugins,cn=config",
                "cn=uid,cn=index,cn=userRoot,cn=ldbm database,cn=plugins,cn=config",
                "cn=bdb,cn=config,cn=ldbm database,cn=plugins,cn=config",
            ],
            "replication (changelog5, the replica, its agreement, the backend's changelog) \
             is left out, the order kept"
        );
        let get = |dn: &str, attr: &str| -> Vec<String> {
            let e = t.entries.iter().find(|e| e.dn == dn).unwrap();
            e.attrs
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(attr))
                .flat_map(|(_, v)| v.iter().map(|v| String::from_utf8(v.clone()).unwrap()))
                .collect()
        };
        for (attr, want) in [
            ("nsslapd-port", "40123"),
            ("nsslapd-listenhost", "127.0.0.1"),
            ("nsslapd-security", "off"),
            ("nsslapd-ldapilisten", "off"),
            ("nsslapd-ldapiautobind", "off"),
            ("nsslapd-ldapifilepath", "/t/run/ldapi"),
            ("nsslapd-rootpw", "{SSHA512}new"),
            ("nsslapd-rootdn", "cn=Directory Manager"),
            ("nsslapd-localuser", "dirsrv"),
            ("nsslapd-errorlog", "/t/logs/errors"),
            ("nsslapd-accesslog", "/t/logs/access"),
            ("nsslapd-auditlog", "/t/logs/audit"),
            ("nsslapd-auditfaillog", "/t/logs/audit-failure"),
            ("nsslapd-securitylog", "/t/logs/security"),
            ("nsslapd-lockdir", "/t/lock"),
            ("nsslapd-tmpdir", "/t/tmp"),
            ("nsslapd-bakdir", "/t/bak"),
            ("nsslapd-ldifdir", "/t/ldif"),
            ("nsslapd-rundir", "/t/run"),
            ("nsslapd-certdir", "/t/config"),
            ("nsslapd-schemadir", "/t/config/schema"),
        ] {
            assert_eq!(get("cn=config", attr), [want], "{attr}");
        }
        assert!(get("cn=config", "nsslapd-securePort").is_empty());
        let ldbm = "cn=config,cn=ldbm database,cn=plugins,cn=config";
        assert_eq!(get(ldbm, "nsslapd-directory"), ["/t/db"]);
        let bdb = "cn=bdb,cn=config,cn=ldbm database,cn=plugins,cn=config";
        assert_eq!(get(bdb, "nsslapd-db-logdirectory"), ["/t/db"]);
        assert_eq!(get(bdb, "nsslapd-db-home-directory"), ["/t/db"]);
        let user_root = "cn=userRoot,cn=ldbm database,cn=plugins,cn=config";
        assert_eq!(get(user_root, "nsslapd-directory"), ["/t/db/userroot"]);
        assert_eq!(get(user_root, "nsslapd-suffix"), ["dc=example,dc=org"]);
        assert_eq!(
            get(
                "cn=referential integrity postoperation,cn=plugins,cn=config",
                "referint-logfile"
            ),
            ["/t/logs/referint"]
        );
        assert_eq!(
            get(
                "cn=Internationalization Plugin,cn=plugins,cn=config",
                "nsslapd-pluginarg0"
            ),
            ["/t/config/slapd-collations.conf"]
        );
        let text = ldif::to_string(&t.entries);
        for live in [
            "slapd-x1",
            "live-secret",
            "636",
            "/run/dirsrv",
            "peer.example.org",
        ] {
            assert!(!text.contains(live), "{live} is still there:\n{text}");
        }
        // Read back as written, same entries.
        assert_eq!(ldif::read(&text).unwrap(), t.entries);
    }

    #[test]
    fn a_throwaway_dse_needs_the_server_user_and_the_database_directory() {
        let layout = Layout { root: "/t".into() };
        let dir = Path::new("/etc/dirsrv/slapd-x1");
        for (cut, says) in [
            ("nsslapd-localuser: dirsrv\n", "no single nsslapd-localuser"),
            (
                "nsslapd-directory: /var/lib/dirsrv/slapd-x1/db\n\n",
                "no single nsslapd-directory",
            ),
        ] {
            let text = LIVE_DSE.replacen(cut, if cut.ends_with("\n\n") { "\n" } else { "" }, 1);
            let live = ldif::read(&text).unwrap();
            let err = throwaway_dse(&live, dir, &layout, 1, "x").unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn the_archives_backends_point_into_the_throwaway() {
        let mut entries = ldif::read(
            "dn: cn=userRoot,cn=ldbm database,cn=plugins,cn=config\nobjectClass: nsBackendInstance\n\
cn: userRoot\nnsslapd-directory: /var/lib/dirsrv/slapd-x1/db/userroot\n\n\
dn: cn=uid,cn=index,cn=userRoot,cn=ldbm database,cn=plugins,cn=config\ncn: uid\n\n",
        )
        .unwrap();
        throwaway_archive_instances(&mut entries, Path::new("/t/db"));
        let text = ldif::to_string(&entries);
        assert!(
            text.contains("nsslapd-directory: /t/db/userroot\n") && !text.contains("slapd-x1"),
            "{text}"
        );
    }

    #[test]
    fn ssha512_is_the_hash_and_the_salt() {
        use base64::Engine as _;
        use sha2::{Digest as _, Sha512};
        let h = ssha512("pw", b"salt1234");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(h.strip_prefix("{SSHA512}").unwrap())
            .unwrap();
        assert_eq!(&raw[64..], b"salt1234");
        assert_eq!(&raw[..64], Sha512::digest(b"pwsalt1234").as_slice());
    }

    #[test]
    fn broken_dumps_are_errors_that_say_where() {
        for (dump, says) in [
            ("\trdn: x\n", "before the first id"),
            ("id one\n", "bad id line"),
            ("id 1\n\tobjectClass: top\n", "no single rdn"),
            ("id 2\n\trdn: cn=a\n\tparentid: 7\n", "id 7 is missing"),
            (
                "id 1\n\trdn: cn=a\n\tparentid: 2\nid 2\n\trdn: cn=b\n\tparentid: 1\n",
                "loop",
            ),
            (
                "id 1\n\trdn: dc=other,dc=org\n",
                "not under dc=example,dc=org",
            ),
            (
                "id 1\n\trdn: dc=example,dc=org\nid 1\n\trdn: dc=example,dc=org\n",
                "twice",
            ),
            ("id 1\n\trdn: dc=example,dc=org\ngarbage\n", "line 3"),
        ] {
            let err = of(dump).expect_err(dump);
            assert!(err.contains(says), "{dump:?}: {err}");
        }
    }
}
