//! A test that cannot run on this machine (389-ds not installed, not root,
//! no loop device, ...): a developer's `cargo test` skips it with a visible
//! line, CI fails it, so that a green CI run means every test ran.

use std::fmt::Display;
use std::io::Write as _;

/// The environment variable that makes every test required: set to `1`
/// (or `true`, `yes`), a test that would skip panics instead. `.ci/run`
/// sets it. Without it, `CI=true` (or `CI=1`, as CI services set) does the
/// same; `ABPROXY_REQUIRE_ALL=0` skips even under `CI`.
pub const REQUIRE_ALL: &str = "ABPROXY_REQUIRE_ALL";

/// What happens to a test that cannot run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Skip it, printing this line.
    Skip(String),
    /// Fail it with this message.
    Fail(String),
}

fn yes(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes"
    )
}

/// The decision, from the values of `ABPROXY_REQUIRE_ALL` and `CI` (`None`
/// when unset) and the reason the test cannot run.
pub fn verdict(require_all: Option<&str>, ci: Option<&str>, reason: &str) -> Verdict {
    let required = match require_all {
        Some(v) if !v.trim().is_empty() => yes(v),
        _ => ci.is_some_and(yes),
    };
    if required {
        Verdict::Fail(format!(
            "cannot run here: {reason} (not skipped: {REQUIRE_ALL}=1 or CI=true requires every test; \
             {REQUIRE_ALL}=0 skips)"
        ))
    } else {
        Verdict::Skip(format!(
            "skipped: {reason} (set {REQUIRE_ALL}=1 to fail instead)"
        ))
    }
}

/// Called by a test that cannot run here, before it returns early: prints
/// one `skipped: ...` line (to the process's stderr directly, so `cargo
/// test` shows it even for a passing test) and returns, or, when
/// [`REQUIRE_ALL`] or `CI` asks for every test, panics with `reason`.
///
/// ```no_run
/// if let Err(why) = testkit::ds389::available() {
///     testkit::skip(why);
///     return;
/// }
/// ```
#[track_caller]
pub fn skip(reason: impl Display) {
    let require_all = std::env::var(REQUIRE_ALL).ok();
    let ci = std::env::var("CI").ok();
    match verdict(require_all.as_deref(), ci.as_deref(), &reason.to_string()) {
        Verdict::Skip(line) => {
            // Not eprintln!: the test harness captures that for passing tests.
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        Verdict::Fail(message) => panic!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skips(v: &Verdict) -> bool {
        matches!(v, Verdict::Skip(_))
    }

    #[test]
    fn a_developer_run_skips_with_the_reason() {
        let v = verdict(None, None, "389-ds not installed");
        assert_eq!(
            v,
            Verdict::Skip(
                "skipped: 389-ds not installed (set ABPROXY_REQUIRE_ALL=1 to fail instead)".into()
            )
        );
        assert!(skips(&verdict(None, Some("false"), "r")));
        assert!(skips(&verdict(None, Some(""), "r")));
        assert!(skips(&verdict(Some(""), None, "r")));
    }

    #[test]
    fn require_all_or_ci_fails_with_the_reason() {
        for (require_all, ci) in [
            (Some("1"), None),
            (Some("true"), None),
            (Some(" YES "), None),
            (Some("1"), Some("false")),
            (None, Some("true")),
            (None, Some("1")),
            (Some(""), Some("true")),
        ] {
            match verdict(require_all, ci, "needs root") {
                Verdict::Fail(m) => assert!(m.starts_with("cannot run here: needs root"), "{m}"),
                v => panic!("{require_all:?} {ci:?}: {v:?}"),
            }
        }
    }

    #[test]
    fn require_all_zero_overrides_ci() {
        assert!(skips(&verdict(Some("0"), Some("true"), "r")));
        assert!(skips(&verdict(Some("no"), Some("true"), "r")));
    }
}
