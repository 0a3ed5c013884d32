//! `abproxy verify DIR`: checks a backup directory by itself, files only
//! (no server, no network), and returns a [`Report`].
//!
//! Integrity: `manifest.json` parses and its `format_version` is known;
//! `SHA256SUMS` parses, its line for `manifest.json` matches that file and
//! its other lines agree with the manifest's `files`; every file the
//! manifest lists (and each backend's `file`) is there with the recorded
//! size and SHA-256; nothing else is in DIR.
//!
//! Content, per backend exported with the `ldif` method, reading its file
//! as a stream (only one key per DN is kept, and the digest's one hash per
//! entry): the LDIF parses to its end, every DN is the suffix or under it,
//! each entry's parent comes before it, no DN appears twice, the suffix
//! entry is there, and the entry count and content digest are the
//! manifest's. DNs are compared normalised ([`NormDn`] to place a DN under
//! the suffix and find its parent, the digest's canonical DN as the key
//! of the set of DNs seen).
//!
//! Each finding is a [`Check`]; a failed one has a [`Class`]: the verdict
//! is the worst class found. A caller may [`Report::push`] checks of its
//! own (a restore test, a comparison with a live server).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, ErrorKind};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ldif::{self, Entry};
use super::manifest::{file_sha256, Manifest, FORMAT_VERSION, MANIFEST, SHA256SUMS};
use super::{Digest, Digester};
use crate::freeze::dn::NormDn;

/// What a failed check means for the backup, from the least to the most
/// serious ([`Report::verdict`] is the greatest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Verify could not tell: DIR missing or unreadable, a manifest format
    /// or a backup method it does not know.
    CannotCheck,
    /// The files are intact but their content is not what the manifest
    /// says (entry count, digest, DNs outside the suffix, parents after
    /// children, a DN twice, no suffix entry).
    Mismatch,
    /// A file missing, extra, of the wrong size or SHA-256; the manifest
    /// or `SHA256SUMS` unreadable; an LDIF not well formed.
    Damaged,
}

impl Class {
    /// The verdict's words: `DAMAGED`, `DOES NOT MATCH`, `CANNOT CHECK`.
    pub fn word(self) -> &'static str {
        match self {
            Class::CannotCheck => "CANNOT CHECK",
            Class::Mismatch => "DOES NOT MATCH",
            Class::Damaged => "DAMAGED",
        }
    }

    /// The tag of a failed check's line.
    fn tag(self) -> &'static str {
        match self {
            Class::CannotCheck => "CANNOT CHECK",
            Class::Mismatch => "MISMATCH",
            Class::Damaged => "DAMAGED",
        }
    }
}

/// One check: what was checked (`name`), whether it passed, what was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// `None` when it passed.
    pub class: Option<Class>,
}

impl Check {
    /// A check that passed.
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            class: None,
        }
    }

    /// A check that failed.
    pub fn fail(name: impl Into<String>, class: Class, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            class: Some(class),
        }
    }
}

impl fmt::Display for Check {
    /// `ok            NAME: DETAIL` or `DAMAGED       NAME: DETAIL`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = self.class.map_or("ok", Class::tag);
        write!(f, "{tag:<13} {}: {}", self.name, self.detail)
    }
}

/// What verify found in one backup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub dir: PathBuf,
    /// The manifest's `backup_id`, once read.
    pub backup_id: Option<String>,
    /// Backends in the manifest.
    pub backends: usize,
    /// Entries read from the backends' files.
    pub entries: u64,
    /// In the order done.
    pub checks: Vec<Check>,
}

impl Report {
    /// An empty report for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Report {
        Report {
            dir: dir.into(),
            backup_id: None,
            backends: 0,
            entries: 0,
            checks: Vec::new(),
        }
    }

    /// Appends a check (the caller's own ones too).
    pub fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    /// The worst class among the failed checks; `None`: all passed.
    pub fn verdict(&self) -> Option<Class> {
        self.checks.iter().filter_map(|c| c.class).max()
    }

    /// The failed checks.
    pub fn problems(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }

    /// The first failed check of the verdict's class.
    pub fn first_problem(&self) -> Option<&Check> {
        let worst = self.verdict()?;
        self.checks.iter().find(|c| c.class == Some(worst))
    }

    /// The one-line verdict: `verify: OK: backup ID, N backends, M
    /// entries`, or `verify: DAMAGED: NAME: DETAIL` (the first problem of
    /// the worst class; `(N problems in all)` when there are more).
    pub fn verdict_line(&self) -> String {
        match self.first_problem() {
            None => format!(
                "verify: OK: backup {}, {} backend{}, {}",
                self.backup_id.as_deref().unwrap_or("(no id)"),
                self.backends,
                if self.backends == 1 { "" } else { "s" },
                entries(self.entries),
            ),
            Some(first) => {
                let n = self.problems().count();
                let more = if n > 1 {
                    format!(" ({n} problems in all)")
                } else {
                    String::new()
                };
                format!(
                    "verify: {}: {}: {}{more}",
                    first.class.map_or("?", Class::word),
                    first.name,
                    first.detail
                )
            }
        }
    }

    /// The report as one JSON object: `verdict` (`OK`, `DAMAGED`, `DOES
    /// NOT MATCH`, `CANNOT CHECK`), `summary` (the verdict line),
    /// `backup_id`, `dir`, `backends`, `entries`, `checks` (each `name`,
    /// `ok`, `detail`, `class`: null, `damaged`, `mismatch` or
    /// `cannot_check`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "verdict": self.verdict().map_or("OK", Class::word),
            "summary": self.verdict_line(),
            "backup_id": self.backup_id,
            "dir": self.dir.to_string_lossy(),
            "backends": self.backends,
            "entries": self.entries,
            "checks": self.checks,
        })
    }
}

/// `1 entry`, `N entries`.
fn entries(n: u64) -> String {
    if n == 1 {
        "1 entry".into()
    } else {
        format!("{n} entries")
    }
}

/// Problems of one kind, counted, the first few kept for the detail.
#[derive(Default)]
struct Found {
    count: u64,
    examples: Vec<String>,
}

impl Found {
    const KEEP: usize = 5;

    fn add(&mut self, what: String) {
        self.count += 1;
        if self.examples.len() < Self::KEEP {
            self.examples.push(what);
        }
    }

    fn detail(&self) -> String {
        let mut s = self.examples.join("; ");
        if self.count > self.examples.len() as u64 {
            s.push_str(&format!(
                "; and {} more",
                self.count - self.examples.len() as u64
            ));
        }
        s
    }
}

/// A file name of the backup: one plain name, nothing that leaves DIR.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// `SHA256SUMS`: (SHA-256 in lower case, name) per line.
fn parse_sums(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let (hex, rest) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {n}: not `SHA256  NAME`"))?;
        // `sha256sum`: two spaces (text mode) or ` *` (binary mode).
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(|| format!("line {n}: not `SHA256  NAME`"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {n}: `{hex}` is not a SHA-256"));
        }
        if !plain_name(name) {
            return Err(format!("line {n}: `{name}` is not a file name of DIR"));
        }
        if out.iter().any(|(_, m)| m == name) {
            return Err(format!("line {n}: {name} listed twice"));
        }
        out.push((hex.to_ascii_lowercase(), name.to_string()));
    }
    Ok(out)
}

/// A whole small file (the manifest, SHA256SUMS): the bytes, or the check
/// that failed (missing: damaged; otherwise unreadable: cannot check).
fn read_small(dir: &Path, name: &str, check: &str) -> Result<Vec<u8>, Check> {
    std::fs::read(dir.join(name)).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Check::fail(check, Class::Damaged, format!("{name} is missing")),
        _ => Check::fail(
            check,
            Class::CannotCheck,
            format!("cannot read {name}: {e}"),
        ),
    })
}

/// What a file should be: its size (when the manifest says) and SHA-256.
struct Expected {
    size: Option<u64>,
    sha256: String,
    /// Where that comes from, for the detail.
    from: &'static str,
}

/// Checks the backup directory `dir`.
pub fn verify(dir: &Path) -> Report {
    let mut r = Report::new(dir);
    let listing = match list_dir(dir) {
        Ok(l) => l,
        Err(c) => {
            r.push(c);
            return r;
        }
    };
    r.push(Check::pass(
        "directory",
        format!("{}: {} names", dir.display(), listing.len()),
    ));

    // manifest.json
    let manifest = match read_manifest(dir) {
        Ok(m) => Some(m),
        Err(c) => {
            let stop = c.class == Some(Class::CannotCheck);
            r.push(c);
            if stop {
                return r;
            }
            None
        }
    };
    if let Some(m) = &manifest {
        r.backup_id = Some(m.backup_id.clone());
        r.backends = m.backends.len();
        r.push(Check::pass(
            "manifest",
            format!(
                "{MANIFEST}: format {}, backup {}, {} backend(s), {} file(s)",
                m.format_version,
                m.backup_id,
                m.backends.len(),
                m.files.len()
            ),
        ));
    }

    // SHA256SUMS, and its line for manifest.json.
    let sums = match read_small(dir, SHA256SUMS, "SHA256SUMS") {
        Err(c) => {
            r.push(c);
            None
        }
        Ok(bytes) => match parse_sums(&String::from_utf8_lossy(&bytes)) {
            Err(e) => {
                r.push(Check::fail(
                    "SHA256SUMS",
                    Class::Damaged,
                    format!("{SHA256SUMS}: {e}"),
                ));
                None
            }
            Ok(s) => {
                r.push(Check::pass(
                    "SHA256SUMS",
                    format!("{} lines, each `SHA256  NAME`", s.len()),
                ));
                Some(s)
            }
        },
    };
    if let Some(sums) = &sums {
        r.push(manifest_sum(dir, sums));
    }

    // What each file should be: the manifest's files[] (and the backends'
    // files), else SHA256SUMS.
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    match (&manifest, &sums) {
        (Some(m), _) => {
            for f in &m.files {
                expected.insert(
                    f.name.clone(),
                    Expected {
                        size: Some(f.size),
                        sha256: f.sha256.to_ascii_lowercase(),
                        from: "the manifest's",
                    },
                );
            }
            let mut unlisted = Found::default();
            // A command's files are the manifest's files; its backends
            // name none.
            for b in m.backends.iter().filter(|b| b.method != "command") {
                if !expected.contains_key(&b.file) {
                    let there = plain_name(&b.file)
                        && std::fs::symlink_metadata(dir.join(&b.file)).is_ok_and(|m| m.is_file());
                    unlisted.add(format!(
                        "backend {}'s file {} is not in the manifest's files{}",
                        b.suffix,
                        b.file,
                        if there { "" } else { ", and is missing" }
                    ));
                }
            }
            if unlisted.count > 0 {
                r.push(Check::fail(
                    "manifest files",
                    Class::Damaged,
                    unlisted.detail(),
                ));
            }
            if let Some(sums) = &sums {
                r.push(sums_agree(m, sums));
            }
        }
        (None, Some(sums)) => {
            for (sha, name) in sums.iter().filter(|(_, n)| n != MANIFEST) {
                expected.insert(
                    name.clone(),
                    Expected {
                        size: None,
                        sha256: sha.clone(),
                        from: "SHA256SUMS's",
                    },
                );
            }
        }
        (None, None) => {}
    }
    for (name, want) in &expected {
        r.push(check_file(dir, name, want));
    }

    // Nothing else in DIR.
    let mut known: BTreeSet<&str> = BTreeSet::from([MANIFEST, SHA256SUMS]);
    known.extend(expected.keys().map(String::as_str));
    if let Some(m) = &manifest {
        known.extend(m.backends.iter().map(|b| b.file.as_str()));
    }
    if let Some(sums) = &sums {
        known.extend(sums.iter().map(|(_, n)| n.as_str()));
    }
    let mut extra = Found::default();
    for (name, is_dir) in &listing {
        if !known.contains(name.as_str()) {
            let kind = if *is_dir { "directory" } else { "file" };
            extra.add(format!("unexpected {kind} {name}"));
        }
    }
    r.push(if extra.count == 0 {
        Check::pass("extra files", "none")
    } else {
        Check::fail("extra files", Class::Damaged, extra.detail())
    });

    // The content of each backend.
    if let Some(m) = &manifest {
        for b in &m.backends {
            if b.method == "command" {
                r.push(Check::pass(
                    format!("content {}", b.suffix),
                    format!(
                        "written by a command ({}): its files are checked by size and SHA-256, \
                         their content is the command's",
                        b.commands.first().map_or("?", String::as_str)
                    ),
                ));
                continue;
            }
            if b.method == "files" {
                // Its SHA-256 (checked above) is the one of the file the
                // backup counted and digested; opening it takes slapd.
                r.push(Check::pass(
                    format!("content {}", b.suffix),
                    format!(
                        "{} is a database file: its count and digest were taken from it at backup \
                         time; --slapd-config or --restore-test opens it",
                        b.file
                    ),
                ));
                continue;
            }
            if b.method == "389" && b.ds389.is_some() {
                // Read with 389's dbscan by the caller
                // (`operator::verify::ds389_checks`): that takes a process.
                continue;
            }
            if b.method != "ldif" && b.method != "slapcat" {
                r.push(Check::fail(
                    format!("backend {}", b.suffix),
                    Class::CannotCheck,
                    format!(
                        "method `{}`: verify checks the content of the `ldif`, `slapcat`, \
                         `files` and `389` methods only",
                        b.method
                    ),
                ));
                continue;
            }
            let is_file = std::fs::symlink_metadata(dir.join(&b.file)).is_ok_and(|m| m.is_file());
            if !plain_name(&b.file) || !is_file {
                // Already reported as a missing file.
                continue;
            }
            check_ldif(&mut r, dir, b);
        }
    }
    r
}

/// DIR's names, each with whether it is a directory; or why DIR cannot be
/// checked.
fn list_dir(dir: &Path) -> Result<Vec<(String, bool)>, Check> {
    let cannot = |what: String| Check::fail("directory", Class::CannotCheck, what);
    let meta = std::fs::metadata(dir).map_err(|e| cannot(format!("{}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(cannot(format!("{} is not a directory", dir.display())));
    }
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| cannot(format!("{}: {e}", dir.display())))?;
    for e in rd {
        let e = e.map_err(|e| cannot(format!("{}: {e}", dir.display())))?;
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push((e.file_name().to_string_lossy().into_owned(), is_dir));
    }
    out.sort();
    Ok(out)
}

/// `manifest.json`, parsed, of a format this verify knows.
fn read_manifest(dir: &Path) -> Result<Manifest, Check> {
    let bytes = read_small(dir, MANIFEST, "manifest")?;
    let damaged = |e: serde_json::Error| {
        Check::fail(
            "manifest",
            Class::Damaged,
            format!("{MANIFEST} does not parse: {e}"),
        )
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(damaged)?;
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(Check::fail(
                "manifest",
                Class::CannotCheck,
                format!(
                    "{MANIFEST}: format_version {v} is unknown to this abproxy ({}), which \
                     reads format {FORMAT_VERSION}: use a newer abproxy",
                    env!("CARGO_PKG_VERSION")
                ),
            ))
        }
        None => {
            return Err(Check::fail(
                "manifest",
                Class::Damaged,
                format!("{MANIFEST}: no numeric format_version"),
            ))
        }
    }
    serde_json::from_value(value).map_err(damaged)
}

/// SHA256SUMS's line for `manifest.json` against that file.
fn manifest_sum(dir: &Path, sums: &[(String, String)]) -> Check {
    let name = "SHA256SUMS manifest.json";
    let Some((want, _)) = sums.iter().find(|(_, n)| n == MANIFEST) else {
        return Check::fail(
            name,
            Class::Damaged,
            format!("{SHA256SUMS} has no line for {MANIFEST}"),
        );
    };
    match file_sha256(&dir.join(MANIFEST)) {
        Ok((_, got)) if got == *want => {
            Check::pass(name, format!("{MANIFEST}'s SHA-256 is {SHA256SUMS}'s"))
        }
        Ok((_, got)) => Check::fail(
            name,
            Class::Damaged,
            format!(
                "{MANIFEST} has SHA-256 {got}, {SHA256SUMS} says {want}: the manifest was changed"
            ),
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Check::fail(name, Class::Damaged, format!("{MANIFEST} is missing"))
        }
        Err(e) => Check::fail(
            name,
            Class::CannotCheck,
            format!("cannot read {MANIFEST}: {e}"),
        ),
    }
}

/// SHA256SUMS's other lines against the manifest's files.
fn sums_agree(m: &Manifest, sums: &[(String, String)]) -> Check {
    let mut found = Found::default();
    for f in &m.files {
        match sums.iter().find(|(_, n)| *n == f.name) {
            None => found.add(format!("{} is not in {SHA256SUMS}", f.name)),
            Some((sha, _)) if !sha.eq_ignore_ascii_case(&f.sha256) => found.add(format!(
                "{}: {SHA256SUMS} says {sha}, the manifest {}",
                f.name, f.sha256
            )),
            Some(_) => {}
        }
    }
    for (_, n) in sums {
        if n != MANIFEST && !m.files.iter().any(|f| f.name == *n) {
            found.add(format!("{n} is in {SHA256SUMS} but not in the manifest"));
        }
    }
    let name = "SHA256SUMS list";
    if found.count == 0 {
        Check::pass(
            name,
            format!("{SHA256SUMS} lists the manifest's files with the same SHA-256"),
        )
    } else {
        Check::fail(name, Class::Damaged, found.detail())
    }
}

/// One file: there, its size and SHA-256 as recorded.
fn check_file(dir: &Path, name: &str, want: &Expected) -> Check {
    let check = format!("file {name}");
    if !plain_name(name) {
        return Check::fail(
            check,
            Class::Damaged,
            format!("`{name}` is not a file name of DIR"),
        );
    }
    let path = dir.join(name);
    // A symbolic link is not a file of the backup, wherever it points.
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Check::fail(check, Class::Damaged, format!("{name} is missing"))
        }
        Err(e) => {
            return Check::fail(
                check,
                Class::CannotCheck,
                format!("cannot read {name}: {e}"),
            )
        }
        Ok(m) if !m.is_file() => {
            return Check::fail(
                check,
                Class::Damaged,
                format!("{name} is not a regular file"),
            )
        }
        Ok(_) => {}
    }
    match file_sha256(&path) {
        Err(e) => Check::fail(
            check,
            Class::CannotCheck,
            format!("cannot read {name}: {e}"),
        ),
        Ok((size, _)) if want.size.is_some_and(|s| s != size) => Check::fail(
            check,
            Class::Damaged,
            format!(
                "{name} has {size} bytes, {} size is {}",
                want.from,
                want.size.unwrap_or_default()
            ),
        ),
        Ok((_, sha)) if sha != want.sha256 => Check::fail(
            check,
            Class::Damaged,
            format!("{name} has SHA-256 {sha}, {} is {}", want.from, want.sha256),
        ),
        Ok((size, _)) => Check::pass(check, format!("{size} bytes, SHA-256 as recorded")),
    }
}

/// The key of a DN in the set of DNs seen: the content digest of an entry
/// with that DN alone, that is of the digest's canonical DN (each AVA
/// normalised, RDNs and AVAs kept apart). `None`: not a valid DN.
fn dn_key(dn: &str) -> Option<[u8; 32]> {
    Digest::of_entries([Entry::new(dn)])
        .ok()
        .map(|d| *d.as_bytes())
}

/// The parent of `dn` (normalised `n`, not the root): the text after the
/// separator that ends its first RDN, found as the tail of `dn` that is a
/// DN one RDN shorter with `n` under it.
fn parent_of<'a>(dn: &'a str, n: &NormDn) -> Option<&'a str> {
    let want = n.depth().checked_sub(1)?;
    dn.char_indices()
        .filter(|&(_, c)| c == ',' || c == ';')
        .map(|(i, _)| &dn[i + 1..])
        .find(|tail| {
            NormDn::parse(tail.as_bytes()).is_some_and(|p| p.depth() == want && n.is_within(&p))
        })
        .map(str::trim)
}

/// The content checks of one `ldif` backend.
fn check_ldif(r: &mut Report, dir: &Path, b: &super::manifest::BackendRecord) {
    let file = &b.file;
    let suffix = &b.suffix;
    let Some(norm_suffix) = NormDn::parse(suffix.as_bytes()) else {
        r.push(Check::fail(
            format!("backend {suffix}"),
            Class::Damaged,
            format!("the manifest's suffix `{suffix}` is not a valid DN"),
        ));
        return;
    };
    let input = match File::open(dir.join(file)) {
        Ok(f) => BufReader::new(f),
        Err(e) => {
            r.push(Check::fail(
                format!("ldif {file}"),
                Class::CannotCheck,
                format!("cannot read {file}: {e}"),
            ));
            return;
        }
    };
    let mut digester = Digester::default();
    // Normalised DN -> its entry's number (from 1).
    let mut seen: HashMap<[u8; 32], u64> = HashMap::new();
    let mut count = 0u64;
    let mut suffix_entry = false;
    let mut bad_dn = Found::default();
    let mut outside = Found::default();
    let mut twice = Found::default();
    // Entries whose parent was not seen before them: (number, DN, parent).
    let mut orphans: Vec<(u64, String, String)> = Vec::new();
    let mut orphan_count = 0u64;
    let mut parse_error = None;
    for entry in ldif::Reader::new(input) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                parse_error = Some(e);
                break;
            }
        };
        count += 1;
        let dn = entry.dn.as_str();
        let (Some(n), Some(key), Ok(())) = (
            NormDn::parse(dn.as_bytes()),
            dn_key(dn),
            digester.add(&entry),
        ) else {
            bad_dn.add(format!("entry {count}: `{dn}` is not a valid DN"));
            continue;
        };
        if !n.is_within(&norm_suffix) {
            outside.add(format!("entry {count} `{dn}`"));
        } else if n.depth() == norm_suffix.depth() {
            suffix_entry = true;
        } else {
            let parent = parent_of(dn, &n);
            if !parent
                .and_then(dn_key)
                .is_some_and(|k| seen.contains_key(&k))
            {
                orphan_count += 1;
                if orphans.len() < Found::KEEP {
                    orphans.push((count, dn.to_string(), parent.unwrap_or("?").to_string()));
                }
            }
        }
        if let Some(first) = seen.insert(key, count) {
            twice.add(format!("entry {count} `{dn}` has the DN of entry {first}"));
            // The first one stays the one named.
            seen.insert(key, first);
        }
    }
    r.entries += count;

    let ldif_check = format!("ldif {suffix}");
    match &parse_error {
        Some(e) => r.push(Check::fail(
            ldif_check,
            Class::Damaged,
            format!("{file}: {e} (after {})", entries(count)),
        )),
        None if bad_dn.count > 0 => r.push(Check::fail(
            ldif_check,
            Class::Damaged,
            format!("{file}: {}", bad_dn.detail()),
        )),
        None => r.push(Check::pass(
            ldif_check,
            format!("{file}: {}, well formed", entries(count)),
        )),
    }
    if parse_error.is_some() && bad_dn.count > 0 {
        r.push(Check::fail(
            format!("DNs {suffix}"),
            Class::Damaged,
            format!("{file}: {}", bad_dn.detail()),
        ));
    }

    r.push(if outside.count == 0 {
        Check::pass(
            format!("under suffix {suffix}"),
            format!("every DN is {suffix} or under it"),
        )
    } else {
        Check::fail(
            format!("under suffix {suffix}"),
            Class::Mismatch,
            format!(
                "{file}: {} not under {suffix}: {}",
                entries(outside.count),
                outside.detail()
            ),
        )
    });

    let order = format!("parents first {suffix}");
    if orphan_count == 0 {
        r.push(Check::pass(order, "each entry's parent comes before it"));
    } else {
        let mut found = Found::default();
        for (k, dn, parent) in &orphans {
            let later = dn_key(parent).is_some_and(|p| seen.contains_key(&p));
            let why = if later {
                "comes after it"
            } else if parse_error.is_some() {
                "is not before it"
            } else {
                "is not in the backup"
            };
            found.add(format!("entry {k} `{dn}`: its parent `{parent}` {why}"));
        }
        found.count = orphan_count;
        r.push(Check::fail(
            order,
            Class::Mismatch,
            format!("{file}: {}", found.detail()),
        ));
    }

    r.push(if twice.count == 0 {
        Check::pass(format!("unique DNs {suffix}"), "no DN twice")
    } else {
        Check::fail(
            format!("unique DNs {suffix}"),
            Class::Mismatch,
            format!("{file}: {}", twice.detail()),
        )
    });

    if parse_error.is_some() {
        // The rest needs the whole file.
        return;
    }
    r.push(if suffix_entry {
        Check::pass(format!("suffix entry {suffix}"), "present")
    } else {
        Check::fail(
            format!("suffix entry {suffix}"),
            Class::Mismatch,
            format!("{file}: no entry for the suffix {suffix}"),
        )
    });
    r.push(if count == b.entries {
        Check::pass(
            format!("count {suffix}"),
            format!("{}, as recorded", entries(count)),
        )
    } else {
        Check::fail(
            format!("count {suffix}"),
            Class::Mismatch,
            format!(
                "{file} has {}, the manifest says {}",
                entries(count),
                b.entries
            ),
        )
    });
    if bad_dn.count == 0 {
        let digest = digester.finish().to_string();
        r.push(if digest.eq_ignore_ascii_case(&b.digest) {
            Check::pass(format!("digest {suffix}"), format!("{digest}, as recorded"))
        } else {
            Check::fail(
                format!("digest {suffix}"),
                Class::Mismatch,
                format!(
                    "{file}'s content digest is {digest}, the manifest says {}",
                    b.digest
                ),
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::{BackendRecord, FileRecord, FreezeInfo, ServerInfo};

    const SUFFIX: &str = "dc=example,dc=org";
    const FILE1: &str = "1-dc_example_dc_org.ldif";
    const OTHER: &str = "dc=other,dc=org";

    fn people() -> Vec<Entry> {
        let mut v = vec![
            Entry::new(SUFFIX)
                .with("objectClass", "dcObject")
                .with("dc", "example")
                .with("entryDN", SUFFIX)
                .with("contextCSN", "20261203171143.752128Z#000000#000#000000"),
            Entry::new("ou=people,dc=example,dc=org")
                .with("objectClass", "organizationalUnit")
                .with("ou", "people"),
        ];
        for i in 1..=3 {
            v.push(
                Entry::new(format!("uid=u{i},ou=people,dc=example,dc=org"))
                    .with("uid", format!("u{i}"))
                    .with("cn", format!("User {i}"))
                    .with("jpegPhoto", vec![0u8, 255, i]),
            );
        }
        v
    }

    fn others() -> Vec<Entry> {
        vec![
            Entry::new(OTHER).with("dc", "other"),
            Entry::new("cn=a,dc=other,dc=org").with("cn", "a"),
        ]
    }

    /// Writes `manifest` and a SHA256SUMS for it into `dir`, the files'
    /// sizes and SHA-256 taken from the disk.
    fn seal(dir: &Path, manifest: &mut Manifest) {
        for f in &mut manifest.files {
            let (size, sha) = file_sha256(&dir.join(&f.name)).unwrap();
            f.size = size;
            f.sha256 = sha;
        }
        let json = serde_json::to_string_pretty(&manifest).unwrap();
        std::fs::write(dir.join(MANIFEST), format!("{json}\n")).unwrap();
        write_sums(dir, manifest);
    }

    fn write_sums(dir: &Path, manifest: &Manifest) {
        let mut sums = String::new();
        for f in &manifest.files {
            sums.push_str(&format!("{}  {}\n", f.sha256, f.name));
        }
        let (_, sha) = file_sha256(&dir.join(MANIFEST)).unwrap();
        sums.push_str(&format!("{sha}  {MANIFEST}\n"));
        std::fs::write(dir.join(SHA256SUMS), sums).unwrap();
    }

    /// A backup of `backends` (suffix, entries) in `dir`, as `abproxy
    /// backup` writes it, count and digest from the entries given.
    fn build(dir: &Path, backends: &[(&str, Vec<Entry>)]) {
        let mut records = Vec::new();
        let mut files = Vec::new();
        for (i, (suffix, entries)) in backends.iter().enumerate() {
            let file = format!("{}-{}.ldif", i + 1, suffix.replace([',', '='], "_"));
            let mut out = Vec::new();
            ldif::write(&mut out, entries).unwrap();
            std::fs::write(dir.join(&file), out).unwrap();
            records.push(BackendRecord {
                suffix: suffix.to_string(),
                mode: "readonly".into(),
                method: "ldif".into(),
                entries: entries.len() as u64,
                context_csn: vec![],
                digest: Digest::of_entries(entries.clone()).unwrap().to_string(),
                file: file.clone(),
                commands: vec![],
                suffix_uuid: None,
                ruv: Vec::new(),
                last_usn: None,
                ds389: None,
            });
            files.push(file);
        }
        std::fs::write(dir.join("HEADER.txt"), "abproxy backup\n").unwrap();
        std::fs::write(dir.join("backup.log"), "freeze (ON): frozen\n").unwrap();
        files.push("HEADER.txt".into());
        files.push("backup.log".into());
        let mut m = Manifest {
            format_version: FORMAT_VERSION,
            backup_id: "20261203T172711Z-f3".into(),
            abproxy_version: "0.1.0".into(),
            proxy_url: "ldap://127.0.0.1:3389".into(),
            server: ServerInfo::default(),
            started: "2026-12-03T17:27:11.042Z".into(),
            ended: "2026-12-03T17:27:12.042Z".into(),
            freeze: FreezeInfo {
                id: Some(3),
                drained_ms: Some(1),
                requested: "2026-12-03T17:27:11.090Z".into(),
                frozen_from: "2026-12-03T17:27:11.100Z".into(),
                frozen_to: "2026-12-03T17:27:11.900Z".into(),
                message: "frozen".into(),
                released: String::new(),
                requests_resumed: None,
                journal_cut: None,
            },
            backends: records,
            files: files
                .into_iter()
                .map(|name| FileRecord {
                    name,
                    size: 0,
                    sha256: String::new(),
                })
                .collect(),
            proxies: vec![],
            incremental: None,
        };
        seal(dir, &mut m);
    }

    fn good() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        build(t.path(), &[(SUFFIX, people()), (OTHER, others())]);
        t
    }

    fn manifest(dir: &Path) -> Manifest {
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap()
    }

    /// The manifest's files re-recorded from the disk (a consistent edit).
    fn reseal(dir: &Path) {
        let mut m = manifest(dir);
        seal(dir, &mut m);
    }

    /// The verdict is `class`, its first problem is check `name` and its
    /// detail holds each of `words`.
    fn expect(r: &Report, class: Class, name: &str, words: &[&str]) {
        let all: Vec<String> = r.checks.iter().map(ToString::to_string).collect();
        assert_eq!(r.verdict(), Some(class), "{all:#?}");
        let first = r.first_problem().unwrap();
        assert!(first.name.starts_with(name), "{all:#?}");
        for w in words {
            assert!(first.detail.contains(w), "`{w}` not in {first}");
        }
        assert!(
            r.verdict_line()
                .starts_with(&format!("verify: {}: {name}", class.word())),
            "{}",
            r.verdict_line()
        );
    }

    /// A failed check of `class` whose name starts with `name` and whose
    /// detail holds `word`.
    fn has(r: &Report, class: Class, name: &str, word: &str) {
        assert!(
            r.checks.iter().any(|c| c.class == Some(class)
                && c.name.starts_with(name)
                && c.detail.contains(word)),
            "no {class:?} {name} with `{word}`: {:#?}",
            r.checks.iter().map(ToString::to_string).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_whole_backup_is_ok() {
        let t = good();
        let r = verify(t.path());
        assert_eq!(r.verdict(), None, "{:#?}", r.checks);
        assert_eq!(
            r.verdict_line(),
            "verify: OK: backup 20261203T172711Z-f3, 2 backends, 7 entries"
        );
        for name in [
            "manifest",
            "SHA256SUMS manifest.json",
            "SHA256SUMS list",
            "file 1-dc_example_dc_org.ldif",
            "file backup.log",
            "extra files",
            "digest dc=example,dc=org",
            "count dc=other,dc=org",
            "parents first dc=example,dc=org",
            "unique DNs dc=example,dc=org",
            "suffix entry dc=other,dc=org",
            "under suffix dc=other,dc=org",
        ] {
            assert!(r.checks.iter().any(|c| c.ok && c.name == name), "{name}");
        }
        let j = r.to_json();
        assert_eq!(j["verdict"], "OK");
        assert_eq!(j["backup_id"], "20261203T172711Z-f3");
        assert_eq!(j["checks"][0]["ok"], true);
        assert!(j["checks"][0]["class"].is_null());
        // A caller's own check counts in the verdict.
        let mut r = r;
        r.push(Check::fail("restore test", Class::Mismatch, "differs"));
        assert_eq!(r.verdict(), Some(Class::Mismatch));
        assert_eq!(r.to_json()["verdict"], "DOES NOT MATCH");
        assert_eq!(
            r.to_json()["checks"][r.checks.len() - 1]["class"],
            "mismatch"
        );
    }

    #[test]
    fn a_flipped_byte_is_damage() {
        let t = good();
        let path = t.path().join(FILE1);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.windows(6).position(|w| w == b"User 2").unwrap();
        bytes[i] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
        let r = verify(t.path());
        expect(
            &r,
            Class::Damaged,
            "file 1-dc_example_dc_org.ldif",
            &[FILE1, "SHA-256"],
        );
        // Its content is reported too.
        has(&r, Class::Mismatch, "digest dc=example,dc=org", FILE1);
    }

    #[test]
    fn a_truncated_ldif_is_damage() {
        let t = good();
        let path = t.path().join(FILE1);
        let bytes = std::fs::read(&path).unwrap();
        // Cut inside an attribute name: the last record does not parse.
        let i = bytes.windows(7).rposition(|w| w == b"\njpegPh").unwrap();
        std::fs::write(&path, &bytes[..i + 5]).unwrap();
        let r = verify(t.path());
        expect(
            &r,
            Class::Damaged,
            "file 1-dc_example_dc_org.ldif",
            &[FILE1, "bytes"],
        );
        has(&r, Class::Damaged, "ldif dc=example,dc=org", "line 2");
    }

    #[test]
    fn an_entry_deleted_and_resealed_is_a_mismatch() {
        let t = good();
        let mut entries = people();
        entries.remove(4);
        let mut out = Vec::new();
        ldif::write(&mut out, &entries).unwrap();
        std::fs::write(t.path().join(FILE1), out).unwrap();
        reseal(t.path());
        let r = verify(t.path());
        expect(
            &r,
            Class::Mismatch,
            "count dc=example,dc=org",
            &[FILE1, "has 4 entries, the manifest says 5"],
        );
        has(
            &r,
            Class::Mismatch,
            "digest dc=example,dc=org",
            "content digest",
        );
        assert!(r.checks.iter().all(|c| c.class != Some(Class::Damaged)));
    }

    #[test]
    fn a_manifest_edited_by_hand_is_damage() {
        let t = good();
        let path = t.path().join(MANIFEST);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"entries\": 5,"));
        std::fs::write(&path, text.replace("\"entries\": 5,", "\"entries\": 6,")).unwrap();
        let r = verify(t.path());
        expect(
            &r,
            Class::Damaged,
            "SHA256SUMS manifest.json",
            &["manifest.json has SHA-256", "SHA256SUMS says"],
        );
        has(
            &r,
            Class::Mismatch,
            "count dc=example,dc=org",
            "manifest says 6",
        );
    }

    #[test]
    fn a_missing_file_is_damage() {
        let t = good();
        std::fs::remove_file(t.path().join("backup.log")).unwrap();
        expect(
            &verify(t.path()),
            Class::Damaged,
            "file backup.log",
            &["backup.log is missing"],
        );
        std::fs::remove_file(t.path().join(FILE1)).unwrap();
        let r = verify(t.path());
        has(
            &r,
            Class::Damaged,
            "file 1-dc_example_dc_org.ldif",
            "missing",
        );
        std::fs::remove_file(t.path().join(SHA256SUMS)).unwrap();
        has(
            &verify(t.path()),
            Class::Damaged,
            "SHA256SUMS",
            "SHA256SUMS is missing",
        );
        std::fs::remove_file(t.path().join(MANIFEST)).unwrap();
        expect(
            &verify(t.path()),
            Class::Damaged,
            "manifest",
            &["manifest.json is missing"],
        );
    }

    #[test]
    fn a_symlink_in_place_of_a_file_is_damage() {
        let t = good();
        let other = tempfile::tempdir().unwrap();
        let log = t.path().join("backup.log");
        std::fs::rename(&log, other.path().join("backup.log")).unwrap();
        std::os::unix::fs::symlink(other.path().join("backup.log"), &log).unwrap();
        expect(
            &verify(t.path()),
            Class::Damaged,
            "file backup.log",
            &["backup.log is not a regular file"],
        );
    }

    #[test]
    fn an_extra_file_is_damage() {
        let t = good();
        std::fs::write(t.path().join("notes.txt"), "x").unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        let r = verify(t.path());
        expect(
            &r,
            Class::Damaged,
            "extra files",
            &["unexpected file notes.txt", "unexpected directory sub"],
        );
        assert_eq!(r.problems().count(), 1);
    }

    #[test]
    fn a_child_before_its_parent_is_a_mismatch() {
        let t = tempfile::tempdir().unwrap();
        let mut entries = people();
        entries.swap(1, 2);
        build(t.path(), &[(SUFFIX, entries)]);
        let r = verify(t.path());
        expect(
            &r,
            Class::Mismatch,
            "parents first dc=example,dc=org",
            &[
                FILE1,
                "entry 2 `uid=u1,ou=people,dc=example,dc=org`",
                "`ou=people,dc=example,dc=org` comes after it",
            ],
        );
        assert_eq!(r.problems().count(), 1);
        // A parent that is not there at all.
        let t = tempfile::tempdir().unwrap();
        let mut entries = people();
        entries.remove(1);
        build(t.path(), &[(SUFFIX, entries)]);
        expect(
            &verify(t.path()),
            Class::Mismatch,
            "parents first",
            &[
                "is not in the backup",
                "entry 4 `uid=u3,ou=people,dc=example,dc=org`",
            ],
        );
    }

    #[test]
    fn a_dn_twice_in_another_spelling_is_a_mismatch() {
        let t = tempfile::tempdir().unwrap();
        let mut entries = people();
        entries.push(Entry::new("cn=a,dc=example,dc=org").with("cn", "a"));
        entries.push(Entry::new("CN=A, dc=Example,DC=org").with("cn", "A"));
        build(t.path(), &[(SUFFIX, entries)]);
        let r = verify(t.path());
        expect(
            &r,
            Class::Mismatch,
            "unique DNs dc=example,dc=org",
            &[
                FILE1,
                "entry 7 `CN=A, dc=Example,DC=org` has the DN of entry 6",
            ],
        );
        assert_eq!(r.problems().count(), 1);
    }

    #[test]
    fn a_dn_outside_the_suffix_is_a_mismatch() {
        let t = tempfile::tempdir().unwrap();
        let mut entries = people();
        entries.push(Entry::new("cn=z,dc=elsewhere").with("cn", "z"));
        build(t.path(), &[(SUFFIX, entries)]);
        let r = verify(t.path());
        expect(
            &r,
            Class::Mismatch,
            "under suffix dc=example,dc=org",
            &[FILE1, "1 entry not under", "entry 6 `cn=z,dc=elsewhere`"],
        );
        assert_eq!(r.problems().count(), 1);
        // And no suffix entry.
        let t = tempfile::tempdir().unwrap();
        build(t.path(), &[(OTHER, vec![others()[1].clone()])]);
        let r = verify(t.path());
        has(
            &r,
            Class::Mismatch,
            "suffix entry dc=other,dc=org",
            "no entry for the suffix",
        );
        has(
            &r,
            Class::Mismatch,
            "parents first",
            "`dc=other,dc=org` is not in the backup",
        );
    }

    #[test]
    fn ldif_that_does_not_parse_names_its_line() {
        let t = good();
        let path = t.path().join(FILE1);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("ou: people\n", "ou people\n")).unwrap();
        reseal(t.path());
        expect(
            &verify(t.path()),
            Class::Damaged,
            "ldif dc=example,dc=org",
            &[FILE1, "line 9: no `:`"],
        );
    }

    #[test]
    fn what_cannot_be_checked_says_so() {
        let t = good();
        let mut m = manifest(t.path());
        m.format_version = 2;
        seal(t.path(), &mut m);
        let r = verify(t.path());
        expect(
            &r,
            Class::CannotCheck,
            "manifest",
            &["format_version 2", "unknown"],
        );
        assert_eq!(r.to_json()["verdict"], "CANNOT CHECK");

        let t = good();
        let mut m = manifest(t.path());
        m.backends[1].method = "mdb-copy".into();
        seal(t.path(), &mut m);
        expect(
            &verify(t.path()),
            Class::CannotCheck,
            "backend dc=other,dc=org",
            &["method `mdb-copy`"],
        );

        let missing = t.path().join("nothing-here");
        // A backend's file the manifest's files do not list.
        let t = good();
        let mut m = manifest(t.path());
        m.files.retain(|f| f.name != FILE1);
        seal(t.path(), &mut m);
        std::fs::remove_file(t.path().join(FILE1)).unwrap();
        expect(
            &verify(t.path()),
            Class::Damaged,
            "manifest files",
            &["backend dc=example,dc=org's file 1-dc_example_dc_org.ldif is not in the manifest's files, and is missing"],
        );
        expect(
            &verify(&missing),
            Class::CannotCheck,
            "directory",
            &["nothing-here"],
        );
    }

    #[test]
    fn the_worst_class_is_the_verdict() {
        let t = good();
        let mut m = manifest(t.path());
        m.backends[1].method = "mdb-copy".into();
        m.backends[0].entries = 9;
        seal(t.path(), &mut m);
        std::fs::write(t.path().join("stray"), "").unwrap();
        let r = verify(t.path());
        expect(&r, Class::Damaged, "extra files", &["stray"]);
        assert_eq!(r.problems().count(), 3);
        assert!(r.verdict_line().ends_with("(3 problems in all)"));
    }
}
