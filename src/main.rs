//! The `abproxy` command line. Only argument handling lives here; the work is
//! in the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use abproxy::config::{Config, Settings};
use abproxy::operator::backup::Destination as BackupDest;
use abproxy::operator::{self, commands, ClientTls, FreezeRequest, OpError, Password, Target};
use abproxy::proxy::runtime;
use abproxy::Server;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, ArgGroup, Args, CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// `abproxy --version`: the version and the commit it was built from
/// (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ABPROXY_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "abproxy",
    version = VERSION,
    about = "Transparent LDAP proxy that lets a live directory be backed up (Allow-Backup extended operation)",
    after_help = "The operator commands (on, off, status, run, backup, hook) talk to a running proxy and \
                  exit 0 when done, 2 on bad arguments, 3 when the proxy refuses, 4 when it cannot be \
                  reached or bound to, 5 on timeout, 6 when the freeze failed or had expired, 8 when a backup failed; \
                  `abproxy verify DIR` exits 10 when a backup is damaged, 11 when its content is not what its \
                  manifest says, 12 when it cannot be checked; `abproxy help on` has the details."
)]
struct Cli {
    /// Log filter (tracing env-filter syntax); the ABPROXY_LOG variable works
    /// too. Default: info for serve and demo, warnings only for the operator
    /// commands.
    #[arg(long, global = true, env = "ABPROXY_LOG", value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Start a throwaway slapd with sample data and the proxy in front of it.
    // Hidden (no help line, man page or completion) where it cannot run.
    #[command(hide = cfg!(not(feature = "demo")))]
    Demo(DemoArgs),
    /// Freeze a running proxy for a backup (Allow-Backup ON): wait for the
    /// operations in progress, then hold writes until `abproxy off`.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    On(OnArgs),
    /// End the freeze (Allow-Backup OFF): release the held operations.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Off(OffArgs),
    /// Show the freeze state: holder, backends, queued requests, lease.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Status(StatusArgs),
    /// Freeze, run CMD, release: always, also when CMD fails or on
    /// SIGINT/SIGTERM (forwarded to CMD); a killed wrapper releases too.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Back up the frozen backends to a new directory (or as a tar stream
    /// on stdout): freeze, export every entry as LDIF through the proxy,
    /// release, write a manifest.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Backup(Box<BackupArgs>),
    /// Build the databases of a backup offline with slapd's own tools and
    /// check them against its manifest (`--to WORK`); then, with slapd
    /// stopped, put them in place (`--apply WORK`).
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Restore(RestoreArgs),
    /// Pre/post script for backup tools (Bacula RunBeforeJob/RunAfterJob,
    /// borgmatic before/after hooks): --before freezes, --after releases.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Hook(HookArgs),
    /// Check a backup directory that `abproxy backup` wrote, by itself (no
    /// server): every file's size and SHA-256 against the manifest and
    /// SHA256SUMS, nothing extra, and each LDIF's entries (well formed,
    /// under the suffix, parents first, no DN twice, count and digest).
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Verify(VerifyArgs),
    /// Read the roll-forward journal (`[journal]` in the configuration):
    /// its records, the successful writes as LDIF, or a check of it.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Print the completion script of a shell on stdout.
    ///
    /// The Debian package installs bash's, zsh's and fish's.
    #[command(after_help = "By hand, e.g.: abproxy completions bash > \
                            /usr/share/bash-completion/completions/abproxy")]
    Completions {
        #[arg(value_enum)]
        shell: abproxy::docgen::Shell,
    },
    /// Write the man pages (abproxy.1, abproxy-SUBCOMMAND.1) into DIR
    /// (for packaging: contrib/build-deb.sh).
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Where the journal is.
#[derive(Args)]
struct JournalAt {
    /// The journal directory (`[journal] dir`).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The proxy's configuration file, whose `[journal] dir` is read.
    #[arg(long, value_name = "FILE", conflicts_with = "dir")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Every record in the range, one line each; with --ldif, the writes
    /// that succeeded as LDIF change records for ldapmodify, in the order
    /// the server answered them.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Show {
        #[command(flatten)]
        at: JournalAt,
        /// From this record on: a sequence number or a UTC time
        /// (2026-12-04T03:30:00Z).
        #[arg(long, value_name = "SEQ|TIME")]
        from: Option<operator::journal::Bound>,
        /// Up to this record: a sequence number or a UTC time.
        #[arg(long, value_name = "SEQ|TIME")]
        until: Option<operator::journal::Bound>,
        /// LDIF change records of the successful writes (answered in the
        /// range) instead of the records.
        #[arg(long)]
        ldif: bool,
    },
    /// Send the writes that succeeded again, in the order the server
    /// answered them, to a server restored from a backup (--after DIR: the
    /// writes after its journal cut), each result compared with the
    /// journal's; stops at the first difference and says where to resume.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Replay {
        #[command(flatten)]
        at: JournalAt,
        /// Instead of a journal: incremental backups (`backup --incremental`),
        /// oldest first, each replayed after its base (the first one's base
        /// is the backup restored); the chain is checked first.
        #[arg(long, value_name = "DIR", num_args = 1.., conflicts_with_all = ["dir", "config", "after"])]
        increments: Vec<PathBuf>,
        /// The server: ldap://HOST:PORT, ldaps://HOST:PORT or ldapi://PATH.
        #[arg(long, value_name = "URL")]
        to: String,
        /// DN to bind as (simple bind), one that may make every write
        /// (slapd's rootdn, 389's Directory Manager).
        #[arg(long, value_name = "DN")]
        bind_dn: Option<String>,
        /// File whose first line is the bind password (or set ABPROXY_PASSWORD).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// StartTLS on an ldap:// URL.
        #[arg(long)]
        starttls: bool,
        /// PEM CA certificates for the server's certificate (default: the system's).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// A backup directory (`abproxy backup`): the writes after its journal cut.
        #[arg(long, value_name = "DIR")]
        after: Option<PathBuf>,
        /// From this position on (the one a previous replay printed).
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Up to this position or UTC time (2026-12-04T03:30:00Z): the
        /// writes answered by then.
        #[arg(long, value_name = "SEQ|TIME")]
        until: Option<operator::journal::Bound>,
        /// Go on after a difference or an indeterminate write (each reported).
        #[arg(long = "continue")]
        keep_going: bool,
        /// The server the journaled writes were sent to, still running
        /// (bound as --bind-dn): each indeterminate write (its answer never
        /// came) is read back there, replayed if it ran, skipped if not.
        #[arg(long, value_name = "URL")]
        resolve: Option<String>,
        /// Seconds to wait for the server: connecting, and each answer.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
    },
    /// Remove the journal's segments a backup makes unneeded: those whose
    /// every record comes before its journal cut (never the last one).
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Prune {
        #[command(flatten)]
        at: JournalAt,
        /// The backup directory (`abproxy backup`) whose cut to prune before.
        #[arg(long, value_name = "DIR")]
        before: PathBuf,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the journal: no gap in its sequence numbers, every record
    /// intact, its cuts, and the writes whose result is unknown.
    #[command(after_help = operator::EXIT_STATUS_HELP)]
    Check {
        #[command(flatten)]
        at: JournalAt,
    },
}

impl JournalAt {
    fn dir(&self) -> Result<PathBuf, String> {
        match (&self.dir, &self.config) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(c)) => operator::journal::dir_of_config(c),
            (None, None) => Err("--dir or --config is needed".into()),
        }
    }
}

/// How to reach and bind to the proxy.
#[derive(Args)]
struct ConnArgs {
    /// The proxy, ldap://HOST:PORT, ldaps://HOST:PORT or ldapi://PATH.
    /// Repeatable (at most 16; in ABPROXY_URL: separated by spaces or
    /// commas): every proxy is frozen together, all or nothing, with the
    /// same identity and TLS options.
    #[arg(
        long = "url",
        visible_alias = "proxy",
        env = "ABPROXY_URL",
        default_value = operator::DEFAULT_URL,
        value_name = "URL",
        action = ArgAction::Append
    )]
    urls: Vec<String>,
    /// DN to bind as (simple bind); it must be in the proxy's [freeze] allowed.
    #[arg(long, env = "ABPROXY_BIND_DN", value_name = "DN")]
    bind_dn: Option<String>,
    /// File whose first line is the bind password (or set ABPROXY_PASSWORD).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// The bind password. Discouraged: other users can read it with `ps`;
    /// prefer --password-file or ABPROXY_PASSWORD.
    #[arg(long, value_name = "PW", conflicts_with = "password_file")]
    password: Option<String>,
    /// Issue StartTLS on an ldap:// URL before binding (TLS from the start:
    /// an ldaps:// URL).
    #[arg(long, env = "ABPROXY_STARTTLS", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    starttls: bool,
    /// PEM CA certificate(s) the proxy's TLS certificate must chain to
    /// [default: the system store].
    #[arg(long, env = "ABPROXY_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Accept a proxy certificate that does not name the URL's host (its
    /// chain is still checked).
    #[arg(long, env = "ABPROXY_NO_VERIFY_HOSTNAME", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    no_verify_hostname: bool,
    /// PEM client certificate to present over TLS: the proxy can allow its
    /// subject to freeze ([freeze] allowed_cert_subjects) without a bind.
    #[arg(
        long,
        env = "ABPROXY_CERT_FILE",
        value_name = "FILE",
        requires = "key_file"
    )]
    cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(
        long,
        env = "ABPROXY_KEY_FILE",
        value_name = "FILE",
        requires = "cert_file"
    )]
    key_file: Option<PathBuf>,
    /// Seconds allowed to the whole operation [default: the drain time limit
    /// plus 30 for ON, 90 for OFF (it may wait for a server stopped during
    /// the freeze), 30 otherwise].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    timeout: Option<Duration>,
}

/// What to freeze.
#[derive(Args)]
struct FreezeArgs {
    /// Suffix of a backend to freeze (repeatable) [default: all backends].
    #[arg(long = "backend", value_name = "DN")]
    backends: Vec<String>,
    /// Seconds the operations in progress may take to finish before the
    /// freeze is in place [default: the proxy's max_drain_secs, 30].
    #[arg(long, value_name = "SECONDS")]
    time_limit: Option<u32>,
}

#[derive(Args)]
struct OnArgs {
    #[command(flatten)]
    freeze: FreezeArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
struct OffArgs {
    /// Release only this freeze (the id `abproxy on` printed); if it is not
    /// the current freeze, nothing is released and the exit status is 6
    /// [default: whatever freeze is current]. With several --url, one per
    /// --url in the same order.
    #[arg(long = "freeze-id", value_name = "N")]
    freeze_ids: Vec<u64>,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
struct StatusArgs {
    /// Print a JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    freeze: FreezeArgs,
    #[command(flatten)]
    conn: ConnArgs,
    /// The backup command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// How `backup` reads the data.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Method {
    /// Chosen before the freeze: `389` when the proxy's server is a 389 DS
    /// instance on this host, `files` (or `slapcat` without mdb_copy) when
    /// it is a slapd whose databases are here (--slapd-config), else
    /// `ldif`; a local database counts only when its suffix entries'
    /// entryUUIDs are the ones the proxy's server serves.
    Auto,
    /// Export every entry (`*` and `+`) through the proxy as LDIF.
    Ldif,
    /// Local slapd: `slapcat -b SUFFIX` with its configuration
    /// (--slapd-config), while frozen.
    Slapcat,
    /// Local slapd (back-mdb): a compacted copy of each backend's
    /// database (mdb_copy -c), while frozen; counted and digested after
    /// the release.
    Files,
    /// Your command after `--`, run once while frozen in the backup
    /// directory (ABPROXY_BACKUP_DIR; the frozen suffixes in
    /// ABPROXY_BACKENDS): the plain files it leaves there are the backup.
    Command,
    /// 389 DS's own online backup (a backup task, as `dsconf INSTANCE
    /// backup create`), added over a direct connection to the server
    /// (--server) while frozen; run on the server's host: the archive is
    /// counted with 389's dbscan and kept as 389-backup.tar.
    #[value(name = "389")]
    Ds389,
}

#[derive(Args)]
#[command(group(ArgGroup::new("dest").required(true).args(["to", "tar"])))]
struct BackupArgs {
    /// The backup directory to create (must not exist; written as
    /// DIR.partial-PID and renamed once whole). This or --tar.
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,
    /// Write the backup as one tar stream instead: `-` (stdout, the only
    /// value for now; refused on a terminal), e.g. `| borg import-tar ...`
    /// or `| restic backup --stdin`. One top-level directory named after
    /// the backup id, with the files a --to backup has. Staged in a
    /// temporary directory first; the freeze is released before the
    /// stream starts.
    #[arg(long, value_name = "-", value_parser = parse_tar_dest)]
    tar: Option<String>,
    /// Where --tar stages the backup before streaming it (a directory
    /// abproxy-backup.partial-PID in it, always removed). Default: $TMPDIR
    /// or /tmp.
    #[arg(long, value_name = "DIR", requires = "tar")]
    tmp_dir: Option<PathBuf>,
    /// Append one JSON line per attempt, success or failure, to FILE
    /// (created 0644): time, backup_id, result, exit, failed_step,
    /// destination, backends, bytes, frozen_ms, duration_ms. A failure to
    /// write it makes a successful backup exit 8 (the backup is kept).
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
    /// How the data is read.
    #[arg(long, value_enum, default_value = "auto")]
    method: Method,
    /// For --method slapcat, files and auto: the local slapd's configuration, a
    /// slapd.d directory or a slapd.conf file.
    #[arg(long, value_name = "PATH", default_value = "/etc/ldap/slapd.d")]
    slapd_config: PathBuf,
    /// For --method 389: the 389 DS server itself (not the proxy), e.g.
    /// ldapi:///run/slapd-NAME.socket or ldap://127.0.0.1:389, bound as
    /// --bind-dn (Directory Manager: the task is added under cn=config,
    /// which the proxy holds during a freeze).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// With --method command: the command and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
    /// An incremental backup: no data, the proxy's roll-forward journal
    /// since the --base backup's journal cut, up to this backup's own cut
    /// (the proxy keeps a journal: `[journal] dir`; this command runs on
    /// its host and reads it: --journal or --config).
    #[arg(long, requires = "base", conflicts_with_all = ["method", "command"])]
    incremental: bool,
    /// With --incremental: the backup it follows (a full backup, or the
    /// previous incremental one).
    #[arg(long, value_name = "DIR", requires = "incremental")]
    base: Option<PathBuf>,
    /// With --incremental: the proxy's journal directory.
    #[arg(
        long,
        value_name = "DIR",
        requires = "incremental",
        conflicts_with = "config"
    )]
    journal: Option<PathBuf>,
    /// With --incremental: the proxy's configuration file, whose
    /// `[journal] dir` is read.
    #[arg(long, value_name = "FILE", requires = "incremental")]
    config: Option<PathBuf>,
    #[command(flatten)]
    freeze: FreezeArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `--tar`: only `-` (stdout) for now.
fn parse_tar_dest(s: &str) -> Result<String, String> {
    if s == "-" {
        Ok(s.into())
    } else {
        Err("only `-` (stdout) is accepted for now; pipe it to a file or a program".into())
    }
}

#[derive(Args)]
#[command(group(ArgGroup::new("step").required(true).args(["to", "apply", "ds_instance"])))]
struct RestoreArgs {
    /// The backup directory (`abproxy backup --to DIR`).
    #[arg(value_name = "DIR", conflicts_with = "apply")]
    backup: Option<PathBuf>,
    /// Build here (a new directory, written as WORK.partial-PID and renamed
    /// once every database matches the manifest).
    #[arg(long, value_name = "WORK", requires = "backup")]
    to: Option<PathBuf>,
    /// Only this backend (repeatable; default: every backend of the backup).
    #[arg(long = "backend", value_name = "DN", requires = "to")]
    backends: Vec<String>,
    /// The server's configuration: a slapd.d directory or a slapd.conf file
    /// (schema, modules, overlays and the databases' directories come from it).
    #[arg(long, value_name = "PATH", default_value = "/etc/ldap/slapd.d")]
    slapd_config: PathBuf,
    /// With slapd stopped: move each live database aside and the one built
    /// in WORK into its place.
    #[arg(long, value_name = "WORK")]
    apply: Option<PathBuf>,
    /// Restore into this stopped 389 DS instance, with 389's offline
    /// tools: a --method 389 backup with ns-slapd archive2db (the database
    /// moved aside to DB.before-restore-ID), an ldif or slapcat backup with
    /// ns-slapd ldif2db per backend (the database copied aside); each
    /// backend then checked against the manifest with dbscan; all or
    /// nothing.
    #[arg(long, value_name = "NAME", requires = "backup", conflicts_with = "to")]
    ds_instance: Option<String>,
}

#[derive(Args)]
struct VerifyArgs {
    /// The backup directory.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Print one JSON object (verdict, backup_id, each check's name, ok,
    /// detail and class) instead of the lines.
    #[arg(long)]
    json: bool,
    /// Also restore each backend into a throwaway server on a loopback port
    /// (a slapd with the server's configuration, --slapd-config; for a
    /// --method 389 backup a 389 DS copied from --ds-instance) and compare
    /// what it serves with the manifest: the proof that the backup opens.
    #[arg(long)]
    restore_test: bool,
    /// The slapd server's configuration (a slapd.d directory or a slapd.conf
    /// file; default for --restore-test: /etc/ldap/slapd.d). Given, it also
    /// opens a `files` backup's database copies read-only (slapcat with a
    /// configuration generated from it) and compares count, digest and
    /// contextCSN with the manifest.
    #[arg(long, value_name = "PATH")]
    slapd_config: Option<PathBuf>,
    /// For --restore-test of a backup taken with --method 389: the local
    /// 389 DS instance (slapd-NAME under /etc/dirsrv) whose configuration
    /// a throwaway 389 DS copies, on its own loopback port and directories;
    /// the instance itself is only read (it may be running).
    #[arg(long, value_name = "NAME", requires = "restore_test")]
    ds_instance: Option<String>,
    /// Also compare with a live server, directly or through the proxy
    /// (ldap://, ldaps://, ldapi://): how far it has moved since the backup
    /// (entries now, added or modified since, contextCSN). Information only.
    #[arg(long, value_name = "URL")]
    against: Option<String>,
    /// DN to bind as for --against (it must read everything, as the
    /// backup's did); ignored without --against (so that an exported
    /// ABPROXY_BIND_DN does not get in the way).
    #[arg(long, env = "ABPROXY_BIND_DN", value_name = "DN")]
    bind_dn: Option<String>,
    /// File whose first line is the password for --against (or set
    /// ABPROXY_PASSWORD).
    #[arg(long, value_name = "FILE", requires = "against")]
    password_file: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("when").required(true).args(["before", "after"])))]
struct HookArgs {
    /// Before the backup: freeze. The freeze stays after this command
    /// exits, kept by a holder process (on the freeze's connection, with
    /// holdUntilUnbind) until `hook --after` or the lease ends.
    #[arg(long)]
    before: bool,
    /// Internal: be the holder `--before` starts.
    #[arg(long, hide = true, requires = "before")]
    hold: bool,
    /// After the backup: release the freeze --before recorded in the state
    /// file, and no other. Exits 0 when none is recorded (after a failed
    /// --before: OFF is not sent); 6 if that freeze ended early (lease,
    /// another OFF), the backup may be inconsistent.
    #[arg(long, conflicts_with_all = ["backends", "time_limit"])]
    after: bool,
    /// Where --before records the id of its freeze for --after [default:
    /// $XDG_RUNTIME_DIR/abproxy-hook-HASH, else /tmp/abproxy-hook-UID-HASH,
    /// one per URL and bind identity]. Jobs that may run at the same time
    /// need one each.
    #[arg(long, env = "ABPROXY_HOOK_STATE", value_name = "FILE")]
    state_file: Option<PathBuf>,
    #[command(flatten)]
    freeze: FreezeArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file; flags given here override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Client-facing listener, ldap://HOST:PORT or ldapi://PATH (repeatable).
    #[arg(long = "listen", value_name = "URL")]
    listen: Vec<String>,
    /// The LDAP server behind the proxy, ldap://HOST:PORT or ldapi://PATH.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Largest request PDU accepted from a client, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_pdu_bytes: Option<usize>,
    /// Seconds allowed to in-flight operations on SIGTERM/SIGINT.
    #[arg(long, value_name = "SECONDS")]
    shutdown_grace: Option<u64>,
    /// Threads (0: auto, from the CPUs and where the server runs; 1: one
    /// thread runs everything).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Serve /metrics, /healthz and /readyz over HTTP here (IP:PORT).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Port of the proxy's listener.
    #[arg(long, default_value_t = 3389)]
    port: u16,
    /// Number of sample users in dc=example,dc=org.
    #[arg(long, default_value_t = 1000)]
    users: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            let out = &mut std::io::stdout().lock();
            return generated(abproxy::docgen::write_completions(
                Cli::command(),
                *shell,
                "abproxy",
                out,
            ));
        }
        Command::Manpages { dir } => {
            return generated(abproxy::docgen::write_manpages(Cli::command(), dir).map(drop));
        }
        _ => {}
    }
    let operator = !matches!(cli.command, Command::Serve(_) | Command::Demo(_));
    let default_log = if operator { "warn,ldap3=error" } else { "info" };
    let log = cli.log.as_deref().unwrap_or(default_log);
    let filter = match EnvFilter::try_new(log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("abproxy: bad --log filter {log:?}: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: not in files, pipes or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if operator {
        return operator_main(cli.command);
    }
    // The runtime's size comes from the configuration, so read it first
    // (once: `serve` runs with these settings).
    let settings = match &cli.command {
        Command::Serve(args) => match serve_config(args) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("abproxy: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let threads = match &settings {
        Some(s) => runtime::plan(s.threads, &s.upstream),
        // The demo's slapd runs on this host.
        None => runtime::decide(0, runtime::cores(), runtime::Upstream::Local),
    };
    let rt = match runtime::runtime(threads.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("abproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                serve(args, settings.expect("read before the runtime"), threads).await
            }
            Command::Demo(args) => demo(args, threads).await,
            _ => unreachable!("operator commands run in operator_main"),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("abproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit status of `completions` and `manpages`.
fn generated(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("abproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file with the command line's overrides, checked and
/// built into settings once.
fn serve_config(args: &ServeArgs) -> anyhow::Result<Settings> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if let Some(u) = &args.upstream {
        config.upstream = u.clone();
    }
    if let Some(n) = args.max_pdu_bytes {
        config.max_pdu_bytes = n;
    }
    if let Some(s) = args.shutdown_grace {
        config.shutdown_grace_secs = s;
    }
    if let Some(t) = args.threads {
        config.threads = t;
    }
    if let Some(a) = &args.metrics_listen {
        config.metrics.listen = Some(a.clone());
    }
    Ok(config.settings()?)
}

async fn serve(
    args: ServeArgs,
    settings: Settings,
    threads: runtime::Threads,
) -> anyhow::Result<ExitCode> {
    if args.check_config {
        // The TLS files are read too.
        abproxy::tls::ServerTls::load(&settings.tls).map_err(|e| anyhow::anyhow!("{e}"))?;
        abproxy::tls::UpstreamTls::load(&settings.tls, &settings.upstream)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("configuration OK");
        println!("{}", threads.why);
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!("{}", threads.why);
    // Handled from before the listeners are bound: a SIGTERM once the
    // proxy says it listens (or is READY) stops it gracefully, journal
    // closed, rather than killing it.
    let shutdown = shutdown_signal();
    let server = Server::bind(settings).await?;
    tokio::spawn(reload_on_sighup(server.server_tls()));
    // The listeners are bound: from now on the kernel queues connections
    // that the accept loops take. systemd (Type=notify) may start the units
    // ordered after this one.
    abproxy::notify::notify_logged("READY=1");
    server
        .run(async {
            shutdown.await;
            abproxy::notify::notify_logged("STOPPING=1");
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP re-reads the TLS certificate and key; sessions are not touched,
/// and a bad new pair keeps the old one.
async fn reload_on_sighup(tls: Option<std::sync::Arc<abproxy::tls::ServerTls>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler: no TLS reload on SIGHUP");
        return;
    };
    while hup.recv().await.is_some() {
        match &tls {
            None => {
                tracing::info!("SIGHUP received: no TLS certificate configured, nothing to reload")
            }
            Some(t) => match t.reload() {
                Ok(()) => tracing::info!("SIGHUP received: TLS certificate and key reloaded"),
                Err(e) => tracing::error!(
                    "SIGHUP received: TLS reload failed, keeping the previous certificate: {e}"
                ),
            },
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when
/// this is called, not when the future is first polled: a signal that
/// comes in between is not lost (nor does it kill the process).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[cfg(feature = "demo")]
async fn demo(args: DemoArgs, threads: runtime::Threads) -> anyhow::Result<ExitCode> {
    use testkit::{Slapd, SlapdOptions};
    let users = args.users;
    let slapd = tokio::task::spawn_blocking(move || {
        Slapd::start(SlapdOptions {
            users,
            ..SlapdOptions::default()
        })
    })
    .await??;
    let listen = format!("ldap://127.0.0.1:{}", args.port);
    let mut config = Config {
        listen: vec![listen.clone()],
        upstream: slapd.url(),
        ..Config::default()
    };
    config.freeze.allowed = vec![testkit::ADMIN_DN.to_string()];
    // The lab's rootdn: its binds write nothing (slapd's ppolicy skips it),
    // so the operator can connect during a freeze to read the status and
    // end it.
    config.freeze.root_dns = vec![testkit::ADMIN_DN.to_string()];
    tracing::info!("{}", threads.why);
    let server = Server::bind(config.settings()?).await?;
    let (admin, pw, user1, pw1) = (
        testkit::ADMIN_DN,
        testkit::ADMIN_PW,
        testkit::user_dn(1),
        testkit::user_pw(1),
    );
    println!(
        "\nabproxy demo: slapd (pid {pid}) at {direct} with {users} users, data in {dir}\n\
         abproxy listens on {listen} ({why})\n\n\
         Try (through the proxy):\n\
         \x20 ldapsearch -x -H {listen} -b dc=example,dc=org '(uid=user1)'\n\
         \x20 ldapwhoami -x -H {listen} -D {user1} -w {pw1}\n\
         \x20 printf 'dn: {user1}\\nchangetype: modify\\nreplace: description\\ndescription: via abproxy\\n' \\\n\
         \x20     | ldapmodify -x -H {listen} -D {admin} -w {pw}\n\
         \x20 ldapsearch -x -H {listen} -D {admin} -w {pw} -b dc=example,dc=org -E pr=100/noprompt '(objectClass=person)' dn | tail -3\n\
         Freeze for a backup (writes are held, not refused), look, resume:\n\
         \x20 ldapexop -x -H {listen} -D {admin} -w {pw} {oid}::MAMBAf8=\n\
         \x20 ldapexop -x -H {listen} -D {admin} -w {pw} {status}\n\
         \x20 ldapexop -x -H {listen} -D {admin} -w {pw} {oid}::MAMBAQA=\n\
         Compare with the server directly: replace {listen} by {direct}\n\n\
         Ctrl-C stops the proxy and slapd and removes the data.\n",
        pid = slapd.pid(),
        why = threads.why,
        direct = slapd.url(),
        dir = slapd.dir().display(),
        oid = abproxy_proto::ALLOW_BACKUP_OID,
        status = abproxy_proto::ALLOW_BACKUP_STATUS_OID,
    );
    server.run(shutdown_signal()).await?;
    drop(slapd);
    Ok(ExitCode::SUCCESS)
}

/// Built without the `demo` feature (`--no-default-features`): no test lab
/// in the binary.
#[cfg(not(feature = "demo"))]
async fn demo(args: DemoArgs, _threads: runtime::Threads) -> anyhow::Result<ExitCode> {
    let DemoArgs { port: _, users: _ } = args;
    anyhow::bail!("this abproxy was built without the `demo` feature (cargo's default features)")
}

/// The operator commands: one small single-threaded runtime, a client of a
/// running proxy.
fn operator_main(command: Command) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("abproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        match command {
            Command::On(a) => {
                commands::on(&conn(&a.conn), &freeze_request(&a.freeze), "abproxy on").await
            }
            Command::Off(a) => commands::off(&conn(&a.conn), &a.freeze_ids, "abproxy off").await,
            Command::Status(a) => commands::status(&conn(&a.conn), a.json).await,
            Command::Run(a) => {
                commands::run(conn(&a.conn), &freeze_request(&a.freeze), a.command).await
            }
            Command::Backup(a) => {
                let method = match a.method {
                    Method::Auto => operator::backup::Method::Auto {
                        slapd_config: a.slapd_config,
                    },
                    Method::Ldif => operator::backup::Method::Ldif,
                    Method::Slapcat => operator::backup::Method::Slapcat {
                        config: a.slapd_config,
                    },
                    Method::Files => operator::backup::Method::Files {
                        config: a.slapd_config,
                    },
                    Method::Command => operator::backup::Method::Command {
                        argv: a.command.clone(),
                    },
                    Method::Ds389 => match &a.server {
                        Some(server) => operator::backup::Method::Ds389 {
                            server: server.clone(),
                        },
                        None => {
                            eprintln!(
                                "abproxy backup: error: --method 389 needs --server URL (the 389 \
                                 DS server itself, not the proxy)"
                            );
                            return operator::exit::USAGE;
                        }
                    },
                };
                let method = match (a.incremental, &a.base) {
                    (true, Some(base)) => {
                        let journal = match (&a.journal, &a.config) {
                            (Some(j), _) => j.clone(),
                            (None, Some(c)) => match operator::journal::dir_of_config(c) {
                                Ok(d) => d,
                                Err(e) => {
                                    eprintln!("abproxy backup: error: {e}");
                                    return operator::exit::USAGE;
                                }
                            },
                            (None, None) => {
                                eprintln!(
                                    "abproxy backup: error: --incremental needs the journal: \
                                     --journal DIR or --config FILE"
                                );
                                return operator::exit::USAGE;
                            }
                        };
                        operator::backup::Method::Incremental {
                            journal,
                            base: base.clone(),
                        }
                    }
                    _ => method,
                };
                if a.server.is_some() && !matches!(a.method, Method::Ds389) {
                    eprintln!("abproxy backup: error: --server goes with --method 389 only");
                    return operator::exit::USAGE;
                }
                if matches!(a.method, Method::Command) == a.command.is_empty() {
                    eprintln!(
                        "abproxy backup: error: a command after `--` goes with --method command, \
                         and only with it"
                    );
                    return operator::exit::USAGE;
                }
                let dest = match a.to {
                    Some(dir) => BackupDest::Dir(dir),
                    None => BackupDest::TarStdout {
                        tmp_dir: a.tmp_dir.unwrap_or_else(std::env::temp_dir),
                    },
                };
                commands::backup(
                    conn(&a.conn),
                    &freeze_request(&a.freeze),
                    dest,
                    a.history,
                    method,
                )
                .await
            }
            Command::Restore(a) => match (a.apply, a.backup, a.to) {
                (None, Some(backup), None) if a.ds_instance.is_some() => {
                    let name = a.ds_instance.as_deref().unwrap_or_default();
                    operator::restore::ds389::restore(
                        &backup,
                        name,
                        &operator::Progress::stderr("abproxy restore"),
                    )
                    .await
                }
                (Some(work), _, _) => {
                    operator::restore::apply(&work, &operator::Progress::stderr("abproxy restore"))
                }
                (None, Some(backup), Some(to)) => {
                    let spec = operator::restore::BuildSpec {
                        backup,
                        to,
                        backends: a.backends,
                        slapd_config: a.slapd_config,
                    };
                    operator::restore::build(spec, &operator::Progress::stderr("abproxy restore"))
                        .await
                }
                _ => operator::exit::USAGE,
            },
            Command::Hook(a) if a.hold => commands::hook_hold(&hook(&a)).await,
            Command::Hook(a) if a.before => {
                // The holder: this command again, with --hold.
                let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
                args.push("--hold".into());
                commands::hook_before(&hook(&a), args).await
            }
            Command::Hook(a) => commands::hook_after(&hook(&a)).await,
            Command::Verify(a) => {
                let against = match a.against {
                    None => None,
                    Some(url) => {
                        let password = match &a.password_file {
                            Some(f) => match Password::from_file(f) {
                                Ok(p) => Some(p),
                                Err(e) => return commands::fail("abproxy verify", &e),
                            },
                            None => std::env::var("ABPROXY_PASSWORD")
                                .ok()
                                .filter(|p| !p.is_empty())
                                .map(Password::new),
                        };
                        Some(Target {
                            url,
                            bind_dn: a.bind_dn.filter(|d| !d.is_empty()),
                            password,
                        })
                    }
                };
                let default_config = PathBuf::from("/etc/ldap/slapd.d");
                let restore_test = a.restore_test.then_some(operator::verify::RestoreTest {
                    slapd_config: a.slapd_config.as_deref().unwrap_or(&default_config),
                    ds_instance: a.ds_instance.as_deref(),
                });
                // Without --restore-test (which opens them too), a given
                // configuration opens the files backups' copies.
                let files_config = a.slapd_config.as_deref().filter(|_| !a.restore_test);
                operator::verify::verify_with(
                    &a.dir,
                    a.json,
                    restore_test,
                    files_config,
                    against.as_ref(),
                )
                .await
            }
            Command::Journal(j) => journal(j).await,
            Command::Serve(_)
            | Command::Demo(_)
            | Command::Completions { .. }
            | Command::Manpages { .. } => unreachable!("not an operator command"),
        }
    });
    ExitCode::from(code)
}

/// `abproxy journal ...`: files only, no proxy.
async fn journal(command: JournalCommand) -> u8 {
    let at = match &command {
        JournalCommand::Show { at, .. }
        | JournalCommand::Check { at }
        | JournalCommand::Replay { at, .. }
        | JournalCommand::Prune { at, .. } => at,
    };
    let chain =
        matches!(&command, JournalCommand::Replay { increments, .. } if !increments.is_empty());
    let dir = match at.dir() {
        Ok(d) => d,
        Err(_) if chain => PathBuf::new(),
        Err(e) => {
            eprintln!("abproxy journal: {e}");
            return operator::exit::USAGE;
        }
    };
    let (out, err) = (std::io::stdout(), std::io::stderr());
    let mut out = std::io::BufWriter::new(out.lock());
    let code = match command {
        JournalCommand::Show {
            from, until, ldif, ..
        } => {
            let opts = operator::journal::ShowOptions { from, until, ldif };
            operator::journal::show(&dir, &opts, &mut out, &mut err.lock())
        }
        JournalCommand::Check { .. } => operator::journal::check(&dir, &mut out),
        JournalCommand::Prune {
            before, dry_run, ..
        } => operator::journal::prune(&dir, &before, dry_run, &mut out),
        JournalCommand::Replay {
            to,
            bind_dn,
            password_file,
            starttls,
            ca_file,
            after,
            from,
            until,
            keep_going,
            resolve,
            timeout,
            increments,
            ..
        } => {
            let password = match &password_file {
                Some(f) => match Password::from_file(f) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eprintln!("abproxy journal replay: {e}");
                        return operator::exit::USAGE;
                    }
                },
                None => std::env::var("ABPROXY_PASSWORD")
                    .ok()
                    .filter(|p| !p.is_empty())
                    .map(Password::new),
            };
            let target = operator::journal::ReplayTarget {
                url: to,
                bind_dn: bind_dn.filter(|d| !d.is_empty()),
                password,
                starttls,
                ca_file,
                timeout: std::time::Duration::from_secs(timeout.max(1)),
            };
            let opts = operator::journal::ReplayOptions {
                after,
                after_cut: None,
                from,
                until,
                keep_going,
                resolve,
            };
            if increments.is_empty() {
                operator::journal::replay(&dir, &target, &opts, &mut out, &mut err.lock()).await
            } else {
                operator::journal::replay_chain(
                    &increments,
                    &target,
                    &opts,
                    &mut out,
                    &mut err.lock(),
                )
                .await
            }
        }
    };
    match std::io::Write::flush(&mut out) {
        Ok(()) => code,
        Err(_) => operator::exit::FAILED,
    }
}

/// The proxies' URLs: every --url (or ABPROXY_URL), each split at spaces
/// and commas; at most [`operator::MAX_PROXIES`], none twice.
fn urls(conn: &ConnArgs) -> Result<Vec<String>, OpError> {
    let urls: Vec<String> = conn
        .urls
        .iter()
        .flat_map(|u| u.split([' ', ',', '\t', '\n']))
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect();
    if urls.is_empty() {
        return Err(OpError::usage(
            "no proxy URL given",
            "give --url URL (or ABPROXY_URL)",
        ));
    }
    if urls.len() > operator::MAX_PROXIES {
        return Err(OpError::usage(
            format!(
                "{} proxy URLs given; at most {} can be frozen together",
                urls.len(),
                operator::MAX_PROXIES
            ),
            "give fewer --url (or fewer URLs in ABPROXY_URL)",
        ));
    }
    if let Some(u) = urls
        .iter()
        .enumerate()
        .find_map(|(i, u)| urls[..i].contains(u).then_some(u))
    {
        return Err(OpError::usage(
            format!("the proxy {u} is given twice"),
            "give each proxy's --url once",
        ));
    }
    Ok(urls)
}

/// The connection targets from the flags and the environment, one per
/// proxy URL. The password: --password-file, else --password, else
/// ABPROXY_PASSWORD.
fn targets(conn: &ConnArgs) -> Result<Vec<Target>, OpError> {
    let urls = urls(conn)?;
    let target = target(conn)?;
    Ok(urls
        .into_iter()
        .map(|url| Target {
            url,
            ..target.clone()
        })
        .collect())
}

/// The identity from the flags and the environment (its `url` empty).
fn target(conn: &ConnArgs) -> Result<Target, OpError> {
    let password = match (&conn.password_file, &conn.password) {
        (Some(file), _) => Some(Password::from_file(file)?),
        (None, Some(pw)) if pw.is_empty() => return Err(Password::empty_error()),
        (None, Some(pw)) => Some(Password::new(pw.clone())),
        (None, None) => std::env::var("ABPROXY_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
            .map(Password::new),
    };
    Ok(Target {
        url: String::new(),
        bind_dn: conn.bind_dn.clone().filter(|d| !d.is_empty()),
        password,
    })
}

/// TLS to the proxy from the flags and the environment.
fn client_tls(conn: &ConnArgs) -> ClientTls {
    ClientTls {
        starttls: conn.starttls,
        ca_file: conn.ca_file.clone().filter(|p| !p.as_os_str().is_empty()),
        no_verify_hostname: conn.no_verify_hostname,
        cert_file: conn.cert_file.clone().filter(|p| !p.as_os_str().is_empty()),
        key_file: conn.key_file.clone().filter(|p| !p.as_os_str().is_empty()),
    }
}

fn freeze_request(f: &FreezeArgs) -> FreezeRequest {
    FreezeRequest {
        backends: f.backends.clone(),
        time_limit: f.time_limit,
        hold_until_unbind: false,
    }
}

/// Where an operator command connects, from its flags.
fn conn(c: &ConnArgs) -> commands::Conn {
    commands::Conn {
        targets: targets(c),
        tls: client_tls(c),
        timeout: c.timeout,
    }
}

fn hook(a: &HookArgs) -> commands::Hook {
    commands::Hook {
        conn: conn(&a.conn),
        state_file: a.state_file.clone(),
        request: freeze_request(&a.freeze),
    }
}
