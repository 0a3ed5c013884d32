//! The `abproxy` command line. Only argument handling lives here; the work is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use abproxy::config::Config;
use abproxy::lab::{self, Slapd, SlapdOptions};
use abproxy::Server;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "abproxy",
    version,
    about = "Transparent LDAP proxy that lets a live directory be backed up (Allow-Backup extended operation)"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax); the ABPROXY_LOG variable works too.
    #[arg(long, global = true, env = "ABPROXY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Start a throwaway slapd with sample data and the proxy in front of it.
    Demo(DemoArgs),
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
    /// Worker threads (0: one per CPU).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
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
    let filter = match EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("abproxy: bad --log filter {:?}: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // The runtime's size comes from the configuration, so read it first.
    let threads = match &cli.command {
        Command::Serve(args) => match serve_config(args) {
            Ok(c) => c.threads,
            Err(e) => {
                eprintln!("abproxy: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        Command::Demo(_) => 0,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("abproxy");
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("abproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Demo(args) => demo(args).await,
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

fn serve_config(args: &ServeArgs) -> anyhow::Result<Config> {
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
    config.validate()?;
    Ok(config)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = serve_config(&args)?;
    if args.check_config {
        println!("configuration OK");
        return Ok(ExitCode::SUCCESS);
    }
    let server = Server::bind(config).await?;
    server.run(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
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
    config.freeze.allowed = vec![lab::ADMIN_DN.to_string()];
    let server = Server::bind(config).await?;
    let (admin, pw, user1, pw1) = (
        lab::ADMIN_DN,
        lab::ADMIN_PW,
        lab::user_dn(1),
        lab::user_pw(1),
    );
    println!(
        "\nabproxy demo: slapd (pid {pid}) at {direct} with {users} users, data in {dir}\n\
         abproxy listens on {listen}\n\n\
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
        direct = slapd.url(),
        dir = slapd.dir().display(),
        oid = abproxy_proto::ALLOW_BACKUP_OID,
        status = abproxy_proto::ALLOW_BACKUP_STATUS_OID,
    );
    server.run(shutdown_signal()).await?;
    drop(slapd);
    Ok(ExitCode::SUCCESS)
}
