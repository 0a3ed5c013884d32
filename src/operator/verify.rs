//! `abproxy verify DIR [--json]` as the binary runs it: checks a backup
//! directory ([`crate::backup::verify`]), prints one line per check and the
//! verdict (or one JSON object), and returns the exit status.

use std::path::Path;

use super::exit;
use crate::backup::manifest::Manifest;
use crate::backup::verify::{self, Check, Class, Report};

/// The exit status of a verdict: 0, or [`exit::VERIFY_DAMAGED`],
/// [`exit::VERIFY_MISMATCH`], [`exit::VERIFY_CANNOT_CHECK`].
pub fn exit_code(verdict: Option<Class>) -> u8 {
    match verdict {
        None => exit::OK,
        Some(Class::Damaged) => exit::VERIFY_DAMAGED,
        Some(Class::Mismatch) => exit::VERIFY_MISMATCH,
        Some(Class::CannotCheck) => exit::VERIFY_CANNOT_CHECK,
    }
}

/// The report as `abproxy verify` prints it: one line per check, then the
/// verdict line.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    for c in &report.checks {
        s.push_str(&c.to_string());
        s.push('\n');
    }
    s.push_str(&report.verdict_line());
    s.push('\n');
    s
}

/// `abproxy verify DIR` (`json`: `--json`): everything on stdout, the
/// exit status returned. A caller that adds checks of its own (a restore
/// test) runs [`verify::verify`], pushes them, and prints the report the
/// same way.
pub fn verify(dir: &Path, json: bool) -> u8 {
    let report = verify::verify(dir);
    print(&report, json)
}

/// What `--restore-test` restores into: a throwaway slapd with the
/// configuration at `slapd_config` (backups of the ldif, slapcat and files
/// methods), a throwaway 389 DS built from the local instance
/// `ds_instance` (backups of the 389 method).
#[derive(Debug, Clone, Copy)]
pub struct RestoreTest<'a> {
    pub slapd_config: &'a Path,
    pub ds_instance: Option<&'a str>,
}

/// `abproxy verify DIR [--restore-test] [--against URL]`:
/// [`verify::verify`], then the restore test ([`restore_checks`]) and the
/// comparison with a live server ([`against_checks`]) when asked.
///
/// The restore test: unless the backup is damaged, each backend restored
/// into a throwaway server on a loopback port and read back over LDAP,
/// each by its own method: a slapd with the configuration at
/// `slapd_config` ([`super::restore::restore_test`]), or for a `389`
/// backup a 389 DS built from the instance `ds_instance`'s configuration
/// ([`super::restore::ds389::restore_test`]). What it serves must be the
/// manifest's entry count, digest (and `contextCSN`, slapd) else "does
/// not match"; a backend that cannot be built or served cannot be
/// checked.
pub async fn verify_with(
    dir: &Path,
    json: bool,
    restore_test: Option<RestoreTest<'_>>,
    files_config: Option<&Path>,
    against: Option<&super::Target>,
) -> u8 {
    let mut report = verify::verify(dir);
    incremental_checks(&mut report, dir);
    ds389_checks(&mut report, dir).await;
    if let Some(config) = files_config {
        files_checks(&mut report, dir, config).await;
    }
    if let Some(test) = restore_test {
        restore_checks(&mut report, dir, test).await;
    }
    if let Some(target) = against {
        against_checks(&mut report, dir, target).await;
    }
    print(&report, json)
}

/// The content of each `files` backend: its database copy opened
/// read-only (copied into a scratch directory with a configuration
/// generated from the server's at `config`, read with `slapcat`: what the
/// backup did after its release), count, digest and `contextCSN` compared
/// with the manifest.
pub async fn files_checks(report: &mut Report, dir: &Path, config: &Path) {
    use crate::backup::slapd;
    let Ok(manifest) = Manifest::read(dir) else {
        return;
    };
    let files: Vec<_> = manifest
        .backends
        .iter()
        .filter(|b| b.method == "files")
        .collect();
    if files.is_empty() {
        return;
    }
    let tools = slapd::Tools::default();
    let limits = slapd::Limits::default();
    let scratch = match tempfile::tempdir() {
        Ok(s) => s,
        Err(e) => {
            report.push(Check::fail("open files", Class::CannotCheck, e.to_string()));
            return;
        }
    };
    let entries = match slapd::read_config(&tools, config, limits.config, scratch.path()).await {
        Ok(e) => e,
        Err(e) => {
            report.push(Check::fail(
                "open files",
                Class::CannotCheck,
                format!("reading the configuration {}: {e}", config.display()),
            ));
            return;
        }
    };
    for (i, b) in files.iter().enumerate() {
        let name = format!("open {}", b.suffix);
        if report.verdict() == Some(Class::Damaged) {
            report.push(Check::fail(
                name,
                Class::CannotCheck,
                "not opened: the backup is damaged",
            ));
            continue;
        }
        let work = scratch.path().join(format!("{}", i + 1));
        if let Err(e) = std::fs::create_dir(&work) {
            report.push(Check::fail(name, Class::CannotCheck, e.to_string()));
            continue;
        }
        let built = slapd::build(
            &tools,
            &entries,
            &b.suffix,
            slapd::Source::Mdb(&dir.join(&b.file)),
            &work,
            &slapd::random_password(),
            &limits,
        )
        .await;
        if let Ok(built) = &built {
            report.entries += built.contents.entries;
        }
        report.push(match built {
            Err(slapd::Error::Load(e)) => Check::fail(
                name,
                Class::Mismatch,
                format!("{} does not open: {e}", b.file),
            ),
            Err(e) => Check::fail(name, Class::CannotCheck, e.to_string()),
            Ok(built) => {
                let c = built.contents;
                if c.entries == b.entries
                    && c.digest == b.digest
                    && (b.context_csn.is_empty() || c.context_csn == b.context_csn)
                {
                    Check::pass(
                        name,
                        format!(
                            "{} opened read-only with slapcat: {} entries, digest and contextCSN \
                             as in the manifest",
                            b.file, c.entries
                        ),
                    )
                } else {
                    Check::fail(
                        name,
                        Class::Mismatch,
                        format!(
                            "{} opened with slapcat: {} entries, digest {}, contextCSN {:?}; the \
                             manifest says {} entries, digest {}, contextCSN {:?}",
                            b.file,
                            c.entries,
                            c.digest,
                            c.context_csn,
                            b.entries,
                            b.digest,
                            b.context_csn
                        ),
                    )
                }
            }
        });
    }
}

/// How long 389's `dbscan` may take over one backend of an archive.
const DBSCAN_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The content of each backend of a 389 DS archive (`--method 389`): its
/// `id2entry.db` taken out of the archive and read with 389's `dbscan`
/// ([`crate::backup::ds389`]), counted and digested, compared with the
/// manifest. Without `dbscan` here: cannot check, said so.
pub async fn ds389_checks(report: &mut Report, dir: &Path) {
    use crate::backup::ds389;
    let Ok(manifest) = Manifest::read(dir) else {
        // verify::verify has said why.
        return;
    };
    for b in &manifest.backends {
        let Some(d) = &b.ds389 else { continue };
        let name = format!("content {}", b.suffix);
        if report.verdict() == Some(Class::Damaged) {
            report.push(Check::fail(
                name,
                Class::CannotCheck,
                "not read: the backup is damaged",
            ));
            continue;
        }
        let member = format!("{}/id2entry.db", d.backend.to_ascii_lowercase());
        let result = async {
            let scratch = tempfile::tempdir().map_err(|e| (Class::CannotCheck, e.to_string()))?;
            let to = scratch.path().join("id2entry.db");
            let archive = dir.join(&b.file);
            extract(&archive, &member, &to).map_err(|e| {
                (
                    Class::Damaged,
                    format!("{}: {member}: {e}", archive.display()),
                )
            })?;
            ds389::contents(&to, &b.suffix, scratch.path(), DBSCAN_LIMIT)
                .await
                .map_err(|e| (Class::CannotCheck, e.to_string()))
        }
        .await;
        if let Ok(c) = &result {
            // Entries read from the backup's files, as the LDIF checks count them.
            report.entries += c.entries;
        }
        report.push(match result {
            Err((class, e)) => Check::fail(name, class, e),
            Ok(c) if c.entries == b.entries && c.digest == b.digest => Check::pass(
                name,
                format!(
                    "389 DS archive, {member} read with dbscan: {} entries, digest as in the \
                     manifest",
                    c.entries
                ),
            ),
            Ok(c) => Check::fail(
                name,
                Class::Mismatch,
                format!(
                    "389 DS archive, {member} read with dbscan: {} entries, digest {}; the \
                     manifest says {} entries, digest {}",
                    c.entries, c.digest, b.entries, b.digest
                ),
            ),
        });
    }
}

/// Copies the archive member `name` (a regular file) of the tar file at
/// `archive` to `to`.
fn extract(archive: &Path, name: &str, to: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(f));
    for entry in tar.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == std::ffi::OsStr::new(name)
            && entry.header().entry_type().is_file()
        {
            let mut out = std::fs::File::create(to)?;
            std::io::copy(&mut entry, &mut out)?;
            return Ok(());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "not in the archive",
    ))
}

/// Appends the restore test's checks to `report`: each backend by its
/// own method (see [`verify_with`]).
pub async fn restore_checks(report: &mut Report, dir: &Path, test: RestoreTest<'_>) {
    if report.verdict() == Some(Class::Damaged) {
        report.push(Check::fail(
            "restore test",
            Class::CannotCheck,
            "not run: the backup is damaged",
        ));
        return;
    }
    let manifest = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e) => {
            report.push(Check::fail("restore test", Class::CannotCheck, e));
            return;
        }
    };
    // A 389 archive, and an LDIF of a 389 DS, open in a throwaway 389 DS;
    // the rest in a throwaway slapd.
    let of_389 = manifest
        .server
        .vendor_name
        .as_deref()
        .is_some_and(|v| v.contains("389"));
    let on_389 = |b: &crate::backup::manifest::BackendRecord| b.ds389.is_some() || of_389;
    let mut slapd_part = manifest.clone();
    slapd_part.backends.retain(|b| !on_389(b));
    if !slapd_part.backends.is_empty() || manifest.backends.is_empty() {
        let served = super::restore::restore_test(dir, &slapd_part, test.slapd_config).await;
        push_served(report, &slapd_part, served, "slapd", true);
    }
    let mut ds389_part = manifest;
    ds389_part.backends.retain(on_389);
    if ds389_part.backends.is_empty() {
        return;
    }
    match test.ds_instance {
        None => {
            for b in &ds389_part.backends {
                report.push(Check::fail(
                    format!("restore test {}", b.suffix),
                    Class::CannotCheck,
                    "a backup of a 389 DS is restore-tested in a throwaway 389 DS built from a \
                     local instance's configuration: give --ds-instance NAME",
                ));
            }
        }
        Some(name) => {
            let served = super::restore::ds389::restore_test(
                dir,
                &ds389_part,
                std::path::Path::new(crate::backup::ds389::CONFIG_ROOT),
                name,
            )
            .await;
            push_served(report, &ds389_part, served, "389 DS", false);
        }
    }
}

/// One check per backend a throwaway `server` served (or did not).
fn push_served(
    report: &mut Report,
    manifest: &Manifest,
    served: Vec<super::restore::Served>,
    server: &str,
    with_csn: bool,
) {
    for served in served {
        let name = format!("restore test {}", served.suffix);
        let Some(b) = manifest.backends.iter().find(|b| b.suffix == served.suffix) else {
            // Not one backend's: the configuration could not be read.
            if let Err(e) = served.result {
                report.push(Check::fail(
                    "restore test",
                    Class::CannotCheck,
                    e.to_string(),
                ));
            }
            continue;
        };
        let what = if with_csn {
            "digest and contextCSN"
        } else {
            "digest"
        };
        report.push(match served.result {
            Err(super::restore::TestFail::DoesNotLoad(e)) => Check::fail(
                name,
                Class::Mismatch,
                format!("the backup does not restore: {e}"),
            ),
            Err(e) => Check::fail(name, Class::CannotCheck, e.to_string()),
            // A backup without a contextCSN (slapd had not written one yet)
            // gets a new one from syncprov when served.
            Ok(c)
                if c.entries == b.entries
                    && c.digest == b.digest
                    && (!with_csn
                        || b.context_csn.is_empty()
                        || c.context_csn == b.context_csn) =>
            {
                Check::pass(
                    name,
                    format!(
                        "a throwaway {server} served {} entries, {what} as in the manifest",
                        c.entries
                    ),
                )
            }
            Ok(c) if with_csn => Check::fail(
                name,
                Class::Mismatch,
                format!(
                    "a throwaway {server} served {} entries, digest {}, contextCSN {:?}; the \
                     manifest says {} entries, digest {}, contextCSN {:?}",
                    c.entries, c.digest, c.context_csn, b.entries, b.digest, b.context_csn
                ),
            ),
            Ok(c) => Check::fail(
                name,
                Class::Mismatch,
                format!(
                    "a throwaway {server} served {} entries, digest {}; the manifest says {} \
                     entries, digest {}",
                    c.entries, c.digest, b.entries, b.digest
                ),
            ),
        });
    }
}

/// `abproxy verify DIR --against URL`: how far the live server (directly,
/// or through the proxy) has moved since the backup. For each backend of
/// the backup: its entries read now as the backup read them (a paged
/// search for `*` and `+`), counted and digested; its `contextCSN`; how
/// many entries were added or modified since the backup started
/// (`modifyTimestamp`, which slapd and 389 DS both keep). Information,
/// not a verdict: a server that moved on is what a live server does.
/// The server unreachable or a search refused: cannot check.
pub async fn against_checks(report: &mut Report, dir: &Path, target: &super::Target) {
    let manifest = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e) => {
            report.push(Check::fail("against", Class::CannotCheck, e));
            return;
        }
    };
    let mut session =
        match tokio::time::timeout(AGAINST_LIMIT, super::Session::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                report.push(Check::fail("against", Class::CannotCheck, e.to_string()));
                return;
            }
            Err(_) => {
                report.push(Check::fail(
                    "against",
                    Class::CannotCheck,
                    format!(
                        "{}: no answer within {} s",
                        target.url,
                        AGAINST_LIMIT.as_secs()
                    ),
                ));
                return;
            }
        };
    let since = manifest
        .started
        .split('.')
        .next()
        .unwrap_or_default()
        .replace(['-', ':', 'T'], "");
    for b in &manifest.backends {
        let name = format!("against {}", b.suffix);
        let check = tokio::time::timeout(AGAINST_LIMIT, compare_live(&mut session, b, &since))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", AGAINST_LIMIT.as_secs())));
        report.push(match check {
            Ok(text) => Check::pass(name, text),
            Err(e) => Check::fail(name, Class::CannotCheck, e),
        });
    }
    session.close().await;
}

/// Limit of each backend's comparison with a live server.
const AGAINST_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

async fn compare_live(
    session: &mut super::Session,
    b: &crate::backup::manifest::BackendRecord,
    since: &str,
) -> Result<String, String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let csn = super::backup::context_csn(session, &b.suffix)
        .await
        .map_err(|f| f.to_string())?;
    let (entries, digest) =
        super::backup::export(session, &b.suffix, &scratch.path().join("live.ldif"))
            .await
            .map_err(|(m, _)| m)?;
    if digest == b.digest {
        return Ok(format!(
            "the server holds exactly the backup's {entries} entries (same digest)"
        ));
    }
    // Changed since: after the backup's last USN (389 DS with the USN
    // plugin: every write numbered), or its contextCSN (slapd: to the
    // microsecond), else after the second it started.
    // (A positive filter: entries 389 holds without a USN, those from
    // before the plugin was on, match no `!(entryusn<=N)` reliably.)
    let last_usn = b.last_usn.as_deref().and_then(|u| u.parse::<i64>().ok());
    let (filter, after) = match (last_usn, b.context_csn.iter().max()) {
        (Some(usn), _) => (
            format!("(entryusn>={})", usn + 1),
            format!("its last USN {usn}"),
        ),
        (None, Some(csn)) => (
            format!("(!(entryCSN<={csn}))"),
            "its contextCSN".to_string(),
        ),
        (None, None) => (
            format!("(!(modifyTimestamp<={since}Z))"),
            format!("{since}Z"),
        ),
    };
    let changed = super::backup::count(session, &b.suffix, &filter)
        .await
        .map_err(|(m, _)| m)?;
    let csn_text = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    };
    let position = match last_usn {
        Some(usn) => {
            let name = super::backup::ds389_backend_of(session, &b.suffix).await;
            let (_, now) = super::backup::ds389_position(session, &b.suffix, name.as_deref())
                .await
                .map_err(|f| f.to_string())?;
            format!(
                "last USN {} (the backup: {usn})",
                now.as_deref().unwrap_or("none")
            )
        }
        None => format!(
            "contextCSN {} (the backup: {})",
            csn_text(&csn),
            csn_text(&b.context_csn)
        ),
    };
    Ok(format!(
        "moved since the backup: {entries} entries now (the backup: {}), {changed} added or \
         modified after {after}, {position}",
        b.entries,
    ))
}

/// Prints a report (lines, or one JSON object with `exit_code` added) and
/// returns its exit status.
pub fn print(report: &Report, json: bool) -> u8 {
    let code = exit_code(report.verdict());
    if json {
        let mut j = report.to_json();
        j["exit_code"] = code.into();
        println!("{j}");
    } else {
        print!("{}", render(report));
    }
    code
}

/// An incremental backup's journal (`backup --incremental`): checked when
/// the manifest says it is one.
pub fn incremental_checks(report: &mut Report, dir: &Path) {
    let Ok(m) = Manifest::read(dir) else {
        return;
    };
    if let Some(inc) = &m.incremental {
        report.push(check_increment(dir, &m, inc));
    }
}

/// An incremental backup's journal segments: every record intact, no gap,
/// the base's cut and this backup's cut (of its freeze) both there, the
/// last record this backup's cut.
fn check_increment(dir: &Path, m: &Manifest, inc: &crate::backup::manifest::Incremental) -> Check {
    use crate::journal::reader::read_segment;
    use crate::journal::record::Body;
    let name = "journal";
    let Some(cut) = m.freeze.journal_cut else {
        return Check::fail(
            name,
            Class::Mismatch,
            "an incremental backup without its journal cut",
        );
    };
    let mut expect: Option<u64> = None;
    let (mut base_seen, mut cut_seen, mut last) = (false, false, 0);
    for file in &inc.segments {
        if !verify::plain_name(file) {
            return Check::fail(name, Class::Damaged, format!("segment name {file:?}"));
        }
        let seg = match read_segment(&dir.join(file)) {
            Ok(s) => s,
            Err(e) => return Check::fail(name, Class::Damaged, e.to_string()),
        };
        if let Some(d) = &seg.damage {
            return Check::fail(
                name,
                Class::Damaged,
                format!("{file}: damaged at byte {} ({d})", seg.good_len),
            );
        }
        for r in &seg.records {
            if expect.is_some_and(|e| e != r.seq) {
                return Check::fail(
                    name,
                    Class::Damaged,
                    format!(
                        "{file}: record {} where {} was due (a gap)",
                        r.seq,
                        expect.unwrap_or(0)
                    ),
                );
            }
            expect = Some(r.seq + 1);
            last = r.seq;
            match &r.body {
                Body::Cut { .. } if r.seq == inc.base_cut => base_seen = true,
                Body::Cut { freeze_id, .. } if r.seq == cut => {
                    cut_seen = m.freeze.id.is_none_or(|id| id == *freeze_id)
                }
                _ => {}
            }
        }
    }
    if !base_seen || !cut_seen || last != cut {
        return Check::fail(
            name,
            Class::Mismatch,
            format!(
                "the segments do not run from the base's cut {} to this backup's cut {cut} \
                 (last record {last})",
                inc.base_cut
            ),
        );
    }
    Check::pass(
        name,
        format!(
            "{} segment(s), records {}..{cut} intact, {} write(s) after {}",
            inc.segments.len(),
            inc.base_cut,
            inc.writes,
            inc.base_backup_id
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_exit_codes_and_lines() {
        let mut r = Report::new("/x");
        r.backup_id = Some("B".into());
        r.push(Check::pass("manifest", "fine"));
        assert_eq!(exit_code(r.verdict()), 0);
        assert_eq!(
            render(&r),
            "ok            manifest: fine\nverify: OK: backup B, 0 backends, 0 entries\n"
        );
        r.push(Check::fail("x", Class::CannotCheck, "method"));
        assert_eq!(exit_code(r.verdict()), 12);
        r.push(Check::fail("count", Class::Mismatch, "3, not 4"));
        assert_eq!(exit_code(r.verdict()), 11);
        r.push(Check::fail("file a", Class::Damaged, "a is missing"));
        assert_eq!(exit_code(r.verdict()), 10);
        let text = render(&r);
        assert!(text.contains("\nMISMATCH      count: 3, not 4\n"), "{text}");
        assert!(
            text.ends_with("verify: DAMAGED: file a: a is missing (3 problems in all)\n"),
            "{text}"
        );
    }
}
