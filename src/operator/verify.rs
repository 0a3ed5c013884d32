//! `abproxy verify DIR [--json]` as the binary runs it: checks a backup
//! directory ([`crate::backup::verify`]), prints one line per check and the
//! verdict (or one JSON object), and returns the exit status.

use std::path::Path;

use super::exit;
use crate::backup::verify::{self, Class, Report};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::verify::Check;

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
