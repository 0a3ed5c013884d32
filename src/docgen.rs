//! Man pages and shell completions, generated from the command line's clap
//! definition: the binary's `abproxy manpages DIR` (hidden) and `abproxy
//! completions SHELL`, which `contrib/build-deb.sh` packages.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes the man page of `cmd` (`NAME.1`) and one per visible subcommand,
/// nested ones named after their path (`NAME-journal-show.1`), into `dir`;
/// returns the files written, the top page first. No `help` pages, nothing
/// for hidden subcommands.
pub fn write_manpages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Gives every subcommand its display name (abproxy-journal-show) and
    // usage line (abproxy journal show).
    cmd.build();
    // The same footer on every page: the program and its version (the
    // subcommands have no version of their own).
    let source = match cmd.get_version() {
        Some(v) => format!("{} {v}", cmd.get_name()),
        None => cmd.get_name().to_string(),
    };
    let mut written = Vec::new();
    write_tree(&cmd, &source, dir, &mut written)?;
    Ok(written)
}

fn write_tree(
    cmd: &clap::Command,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).source(source);
    let path = dir.join(man.get_filename());
    let mut out = io::BufWriter::new(std::fs::File::create(&path)?);
    man.render(&mut out)?;
    out.flush()?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub, source, dir, written)?;
    }
    Ok(())
}

/// Writes `shell`'s completion script for `cmd`, run as `bin_name`.
pub fn write_completions(
    mut cmd: clap::Command,
    shell: Shell,
    bin_name: &str,
    out: &mut dyn Write,
) -> io::Result<()> {
    // clap_complete writes through `Write` but panics on an error; a
    // buffer first, so that a closed pipe is an error, not a panic.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, bin_name, &mut buf);
    out.write_all(&buf)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cli() -> Command {
        Command::new("tool")
            .version("1.2.3 (commit abc1234)")
            .about("A tool")
            .subcommand(
                Command::new("run")
                    .about("Run it")
                    .arg(Arg::new("fast").long("fast")),
            )
            .subcommand(Command::new("secret").hide(true))
            .subcommand(
                Command::new("journal")
                    .about("The journal")
                    .subcommand(Command::new("show").about("Show it")),
            )
    }

    #[test]
    fn one_page_per_visible_subcommand_named_after_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_manpages(cli(), dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "tool.1",
                "tool-run.1",
                "tool-journal.1",
                "tool-journal-show.1"
            ]
        );
        let mut on_disk: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(on_disk, sorted, "nothing else written (no help page)");

        let show = std::fs::read_to_string(dir.path().join("tool-journal-show.1")).unwrap();
        assert!(show.starts_with(".ie"), "roff: {show}");
        assert!(show.contains(".TH tool-journal-show 1 "), "{show}");
        assert!(
            show.contains("tool 1.2.3 (commit abc1234)"),
            "the footer: {show}"
        );
        assert!(show.contains("Show it"), "{show}");
        let top = std::fs::read_to_string(dir.path().join("tool.1")).unwrap();
        assert!(top.contains("tool\\-run(1)"), "subcommands listed: {top}");
        assert!(!top.contains("secret"), "hidden stays hidden: {top}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            write_completions(cli(), shell, "tool", &mut out).unwrap();
            let script = String::from_utf8(out).unwrap();
            assert!(script.contains("journal"), "{shell}: {script}");
            assert!(script.contains("fast"), "{shell}: {script}");
        }
    }
}
