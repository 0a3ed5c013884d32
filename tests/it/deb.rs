//! The Debian package, as `contrib/build-deb.sh` builds it (with the
//! faster `deb-test` profile, in a target directory of its own), installed
//! with `dpkg -i` on this machine: its fields and exact contents, every file
//! where it should be with its owner and mode, the user and the state
//! directory postinst makes, the unit installed but not enabled, `--version`,
//! the man pages and completions working, the configuration checking (as
//! the service's user too); then `dpkg -r` (the conffile stays) and
//! `dpkg --purge` (nothing stays but the `abproxy` user, as Debian policy
//! wants). Root, dpkg, man-db and cargo-deb, or it skips.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PKG: &str = "abproxy";
const SRC: &str = env!("CARGO_MANIFEST_DIR");
const CONFFILE: &str = "/etc/abproxy/abproxy.toml";
const STATE_DIR: &str = "/var/lib/abproxy";
const UNIT: &str = "/usr/lib/systemd/system/abproxy.service";
const MAN_DIR: &str = "/usr/share/man/man1";
const DOC_DIR: &str = "/usr/share/doc/abproxy";
const BASH: &str = "/usr/share/bash-completion/completions/abproxy";
const ZSH: &str = "/usr/share/zsh/vendor-completions/_abproxy";
const FISH: &str = "/usr/share/fish/vendor_completions.d/abproxy.fish";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`; its output, whatever the exit status.
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// Runs `cmd`, which must succeed; its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        describe(cmd),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What dpkg knows of the package: "install ok installed", "deinstall ok
/// config-files", or None when it knows nothing (never installed, purged).
fn status() -> Option<String> {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", PKG]));
    let s = text(&out.stdout);
    (out.status.success() && !s.is_empty() && !s.ends_with("not-installed")).then_some(s)
}

fn user_exists(name: &str) -> bool {
    succeeds("getent", &["passwd", name])
}

/// Purges the package whatever happens to the test, and removes the
/// `abproxy` user and group if the test made them (postrm keeps them).
struct Purge {
    user_was_there: bool,
    group_was_there: bool,
}

impl Drop for Purge {
    fn drop(&mut self) {
        if status().is_some() {
            let _ = Command::new("dpkg").args(["--purge", PKG]).output();
        }
        if !self.user_was_there {
            let _ = Command::new("userdel").arg(PKG).output();
        }
        if !self.group_was_there {
            let _ = Command::new("groupdel").arg(PKG).output();
        }
    }
}

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: dpkg -i needs it".into());
    }
    for tool in ["dpkg", "dpkg-deb", "dpkg-query"] {
        if !succeeds(tool, &["--version"]) {
            return Some(format!("{tool} is missing: not a Debian machine"));
        }
    }
    if !Path::new("/usr/bin/man").exists() {
        return Some("man is missing: apt-get install man-db".into());
    }
    if !succeeds("cargo", &["deb", "--version"]) {
        return Some("cargo-deb is missing: cargo install cargo-deb --locked".into());
    }
    // Never replace (and then purge) a real installation.
    if let Some(s) = status() {
        return Some(format!(
            "the {PKG} package is on this machine ({s}): the test would replace and purge it"
        ));
    }
    for p in ["/usr/bin/abproxy", "/etc/abproxy", STATE_DIR] {
        if Path::new(p).exists() {
            return Some(format!(
                "{p} exists: the test would take it over, then remove it"
            ));
        }
    }
    None
}

/// The subcommands `bin ARGS --help` lists (but `help`), each with the
/// ones it has in turn, as man page names: abproxy-journal-show.
fn subcommand_pages(bin: &str, path: &[&str], pages: &mut BTreeSet<String>) {
    let mut args = path.to_vec();
    args.push("--help");
    let help = ok(Command::new(bin).args(&args));
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A name at two spaces; deeper: a description's next line.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n != "help")
        .collect();
    for name in names {
        let mut sub = path.to_vec();
        sub.push(&name);
        pages.insert(format!("{PKG}-{}.1.gz", sub.join("-")));
        subcommand_pages(bin, &sub, pages);
    }
}

/// `path` is gone.
fn gone(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

fn id(kind: &str, name: &str, field: usize) -> u32 {
    let entry = ok(Command::new("getent").args([kind, name]));
    entry.trim().split(':').nth(field).unwrap().parse().unwrap()
}

#[test]
fn the_package_installs_works_and_purges_clean() {
    if let Some(why) = unavailable() {
        testkit::skip(why);
        return;
    }
    let _purge = Purge {
        user_was_there: user_exists(PKG),
        group_was_there: succeeds("getent", &["group", PKG]),
    };
    let version = env!("CARGO_PKG_VERSION");
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    let arch = arch.trim();

    // Built by the release script, niced: the other tests run alongside.
    // Its own target directory: the one `cargo test` holds is locked.
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deb-test");
    let out_dir = tempfile::tempdir().unwrap();
    let mut build = Command::new("nice");
    build
        .args(["-n", "19"])
        .arg(Path::new(SRC).join("contrib/build-deb.sh"))
        // Quicker compression; where to.
        .args(["--fast", "--output"])
        .arg(out_dir.path())
        .env("CARGO_TARGET_DIR", &target)
        .env("ABPROXY_DEB_PROFILE", "deb-test")
        .current_dir(out_dir.path());
    // Not the variables `cargo test` gives this process (build.rs's
    // ABPROXY_COMMIT among them): build scripts watch some (ring's
    // CARGO_MANIFEST_DIR), and with them every run would rebuild.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
                "ABPROXY_COMMIT",
            ]
            .contains(&&*key)
        {
            build.env_remove(&*key);
        }
    }
    let built = output(&mut build);
    let stderr = text(&built.stderr);
    assert!(
        built.status.success(),
        "contrib/build-deb.sh failed: {}\n{stderr}",
        built.status
    );
    let deb = text(&built.stdout).lines().last().unwrap_or("").to_string();
    let deb_version = format!("{version}-1");
    assert_eq!(
        Path::new(&deb),
        out_dir
            .path()
            .join(format!("{PKG}_{deb_version}_{arch}.deb")),
        "the script prints the package's path last:\n{stderr}"
    );

    // The control fields.
    let field = |name: &str| ok(Command::new("dpkg-deb").args(["--field", &deb, name]));
    assert_eq!(field("Package").trim(), PKG);
    assert_eq!(field("Version").trim(), deb_version);
    assert_eq!(field("Architecture").trim(), arch);
    let depends = field("Depends");
    assert!(
        depends.contains("libc6") && depends.contains("adduser"),
        "Depends: the C library (from the binary) and adduser (postinst): {depends}"
    );
    // The maintainer scripts, and the one conffile.
    let control = tempfile::tempdir().unwrap();
    let control_dir = control.path().join("DEBIAN");
    ok(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control_dir));
    for script in ["postinst", "prerm", "postrm"] {
        ok(Command::new("sh").arg("-n").arg(control_dir.join(script)));
    }
    let conffiles = std::fs::read_to_string(control_dir.join("conffiles")).unwrap();
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), [CONFFILE]);

    // The files, exactly: those below plus one man page per subcommand.
    let contents = ok(Command::new("dpkg-deb").args(["--contents", &deb]));
    let packaged: BTreeSet<String> = contents
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let path = l.split_whitespace().nth(5).unwrap();
            path.trim_start_matches('.').to_string()
        })
        .collect();
    let mut expected: BTreeSet<String> = [
        "/usr/bin/abproxy",
        CONFFILE,
        UNIT,
        BASH,
        ZSH,
        FISH,
        "/usr/share/doc/abproxy/README.md",
        "/usr/share/doc/abproxy/copyright",
        "/usr/share/doc/abproxy/changelog.Debian.gz",
        "/usr/share/man/man1/abproxy.1.gz",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for doc in std::fs::read_dir(Path::new(SRC).join("docs")).unwrap() {
        let name = doc.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            expected.insert(format!("{DOC_DIR}/docs/{name}"));
        }
    }
    // The man pages follow the subcommands the packaged binary has, which
    // the installation below shows; here, only that they are man pages.
    let man_pages: BTreeSet<String> = packaged
        .iter()
        .filter(|p| p.starts_with(MAN_DIR))
        .cloned()
        .collect();
    expected.extend(man_pages.iter().cloned());
    assert_eq!(packaged, expected, "dpkg-deb --contents:\n{contents}");
    assert!(
        man_pages.iter().all(|p| p.ends_with(".1.gz")),
        "{man_pages:?}"
    );

    // Installed: no systemd runs here, so this also proves postinst gets
    // by without it.
    let installed = output(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(
        installed.status.success(),
        "dpkg -i:\n{}\n{}",
        text(&installed.stdout),
        text(&installed.stderr)
    );
    assert_eq!(status().as_deref(), Some("install ok installed"));
    let listed = ok(Command::new("dpkg").args(["-L", PKG]));
    for path in &packaged {
        assert!(
            listed.lines().any(|l| l == path),
            "dpkg -L lists {path}:\n{listed}"
        );
        assert!(Path::new(path).is_file(), "{path} is installed");
    }
    let dpkg_conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PKG]));
    assert!(
        dpkg_conffiles.trim().starts_with(CONFFILE),
        "{dpkg_conffiles}"
    );

    // The man pages: one per subcommand the packaged binary lists (its
    // `--help`), `demo` not among them (no test lab in the product).
    let bin = "/usr/bin/abproxy";
    assert_eq!(mode(bin), 0o755);
    let mut pages = BTreeSet::from([format!("{PKG}.1.gz")]);
    subcommand_pages(bin, &[], &mut pages);
    let pages: BTreeSet<String> = pages.iter().map(|p| format!("{MAN_DIR}/{p}")).collect();
    assert_eq!(man_pages, pages, "a man page per subcommand");
    for sub in ["serve", "backup", "journal", "journal-show", "completions"] {
        assert!(
            pages.contains(&format!("{MAN_DIR}/{PKG}-{sub}.1.gz")),
            "{sub}: {pages:?}"
        );
    }
    assert!(!pages
        .iter()
        .any(|p| p.contains("demo") || p.contains("manpages")));
    let demo = output(Command::new(bin).args(["demo"]));
    assert!(
        !demo.status.success() && text(&demo.stderr).contains("without the `demo` feature"),
        "{demo:?}"
    );

    // `--version`: the version and the commit built.
    let shown = ok(Command::new(bin).arg("--version"));
    match Command::new("git")
        .args(["-C", SRC, "rev-parse", "--short", "HEAD"])
        .output()
    {
        Ok(o) if o.status.success() => assert_eq!(
            shown,
            format!("{PKG} {version} (commit {})\n", text(&o.stdout).trim())
        ),
        _ => assert!(
            shown.starts_with(&format!("{PKG} {version} (commit ")),
            "{shown}"
        ),
    }

    // The user, the state directory, the configuration's owner and mode.
    let passwd = ok(Command::new("getent").args(["passwd", PKG]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[5], STATE_DIR, "home: {passwd}");
    assert!(fields[6].ends_with("nologin"), "no login: {passwd}");
    let (uid, gid) = (id("passwd", PKG, 2), id("group", PKG, 2));
    assert!(uid < 1000, "a system user: {passwd}");
    assert_eq!(fields[3].parse::<u32>().unwrap(), gid, "its own group");
    let state = std::fs::metadata(STATE_DIR).unwrap();
    assert!(state.is_dir());
    assert_eq!(
        (state.uid(), state.gid(), mode(STATE_DIR)),
        (uid, gid, 0o700)
    );
    let conf = std::fs::metadata(CONFFILE).unwrap();
    assert_eq!((conf.uid(), conf.gid(), mode(CONFFILE)), (0, gid, 0o640));
    assert_eq!(
        std::fs::read(CONFFILE).unwrap(),
        std::fs::read(Path::new(SRC).join("contrib/abproxy.toml")).unwrap()
    );

    // The configuration checks, as root and as the service's user (who
    // reads it through its group).
    let checked = ok(Command::new(bin).args(["serve", "--config", CONFFILE, "--check-config"]));
    assert_eq!(
        checked.lines().next(),
        Some("configuration OK"),
        "{checked}"
    );
    assert!(checked.contains("threads = 0 (auto): "), "{checked}");
    let as_user = ok(Command::new("runuser").args([
        "-u",
        PKG,
        "--",
        bin,
        "serve",
        "--config",
        CONFFILE,
        "--check-config",
    ]));
    assert_eq!(as_user, checked);

    // The unit: contrib's, on /usr/bin; installed, not enabled (systemctl
    // reads the unit files without a running systemd), not started.
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let contrib = std::fs::read_to_string(Path::new(SRC).join("contrib/abproxy.service")).unwrap();
    let execs: Vec<&str> = unit.lines().filter(|l| l.starts_with("Exec")).collect();
    assert!(execs.len() >= 2, "{unit}");
    assert!(
        execs.iter().filter(|l| l.contains("abproxy ")).all(|l| l
            .split_once('=')
            .unwrap()
            .1
            .starts_with("/usr/bin/abproxy ")),
        "{execs:?}"
    );
    assert_eq!(
        unit,
        contrib
            .lines()
            .map(|l| match l.split_once("=/usr/local/bin/abproxy ") {
                Some((key, rest)) if l.starts_with("Exec") =>
                    format!("{key}=/usr/bin/abproxy {rest}\n"),
                _ => format!("{l}\n"),
            })
            .collect::<String>(),
        "the packaged unit is contrib's, Exec lines on /usr/bin"
    );
    if Path::new("/usr/bin/systemd-analyze").exists() {
        ok(Command::new("systemd-analyze").args(["verify", UNIT]));
    }
    if Path::new("/usr/bin/systemctl").exists() {
        let enabled = output(Command::new("systemctl").args(["is-enabled", "abproxy.service"]));
        assert_eq!(text(&enabled.stdout).trim(), "disabled", "{enabled:?}");
    }
    assert!(gone(
        "/etc/systemd/system/multi-user.target.wants/abproxy.service"
    ));
    if Path::new("/run/systemd/system").exists() {
        let active = output(Command::new("systemctl").args(["is-active", "abproxy.service"]));
        assert_ne!(text(&active.stdout).trim(), "active", "not started");
    }

    // `man abproxy` renders, and a nested subcommand's page too.
    let man = |page: &str| {
        let shown = ok(Command::new("man")
            .args(["-P", "cat", page])
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8"));
        // Without a terminal man may still overstrike (x\bx) for bold.
        let mut plain = String::new();
        for c in shown.chars() {
            if c == '\u{8}' {
                plain.pop();
            } else {
                plain.push(c);
            }
        }
        plain
    };
    let top = man(PKG);
    assert!(
        top.contains("Transparent LDAP proxy that lets a live directory be backed up"),
        "{top}"
    );
    assert!(
        top.contains("abproxy-serve(1)") && top.contains("journal"),
        "{top}"
    );
    assert!(
        top.contains(&format!("abproxy {version} (commit ")),
        "{top}"
    );
    let show = man("abproxy-journal-show");
    assert!(
        show.contains("abproxy journal show") && show.contains("--ldif"),
        "{show}"
    );

    // Completions: each names the subcommands; bash's loads.
    for (file, start) in [(BASH, "_abproxy()"), (ZSH, "#compdef abproxy"), (FISH, "")] {
        let script = std::fs::read_to_string(file).unwrap();
        assert!(script.contains(start), "{file}: {script}");
        for word in ["serve", "journal", "check-config"] {
            assert!(script.contains(word), "{file} names {word}");
        }
    }
    ok(Command::new("bash").args(["-n", BASH]));
    let loaded = ok(Command::new("bash").args(["-c", &format!(". {BASH} && complete -p abproxy")]));
    assert!(loaded.contains("abproxy"), "{loaded}");
    let fish = std::fs::read_to_string(FISH).unwrap();
    assert!(fish.contains("complete -c abproxy"), "{fish}");

    // The documentation.
    assert_eq!(
        std::fs::read(format!("{DOC_DIR}/README.md")).unwrap(),
        std::fs::read(Path::new(SRC).join("README.md")).unwrap()
    );
    let copyright = std::fs::read_to_string(format!("{DOC_DIR}/copyright")).unwrap();
    assert!(copyright.contains("Apache-2.0"), "{copyright}");
    let changelog = ok(Command::new("zcat").arg(format!("{DOC_DIR}/changelog.Debian.gz")));
    assert!(
        changelog.starts_with(&format!("{PKG} ({deb_version}) ")),
        "{changelog}"
    );

    // Removed: everything but the conffile (and the state, the user).
    ok(Command::new("dpkg").args(["-r", PKG]));
    assert_eq!(status().as_deref(), Some("deinstall ok config-files"));
    for path in packaged.iter().filter(|p| *p != CONFFILE) {
        assert!(gone(path), "{path} removed by dpkg -r");
    }
    assert!(Path::new(CONFFILE).is_file(), "dpkg -r keeps the conffile");
    if Path::new("/usr/bin/deb-systemd-helper").exists() {
        // As dh_installsystemd's postrm: masked while the unit is gone.
        let mask = std::fs::read_link("/etc/systemd/system/abproxy.service");
        assert_eq!(mask.ok(), Some(PathBuf::from("/dev/null")), "masked");
    }
    assert!(user_exists(PKG));

    // Purged: nothing of the package, but the user (Debian policy).
    ok(Command::new("dpkg").args(["--purge", PKG]));
    assert_eq!(status(), None);
    assert!(!succeeds("dpkg", &["-L", PKG]), "dpkg forgot the package");
    for path in &packaged {
        assert!(gone(path), "{path} purged");
    }
    for path in [
        "/etc/abproxy",
        STATE_DIR,
        "/etc/systemd/system/abproxy.service",
        "/var/lib/systemd/deb-systemd-helper-masked/abproxy.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/abproxy.service.dsh-also",
    ] {
        assert!(gone(path), "{path} left after the purge");
    }
    assert!(
        user_exists(PKG),
        "postrm keeps the abproxy user on purge (Debian policy)"
    );
}
