//! The operator commands (`abproxy on|off|status|run|backup|hook`) as the binary
//! runs them: each takes what the command line said, prints what the user
//! sees, and returns the exit status (see [`super::exit`]). `main.rs` only
//! turns flags into these values.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::backup::{BackupSpec, Destination};
use super::hook::{self, HookRecord, HookState};
use super::{
    all_or_nothing, close_all, exit, on_each, run_frozen, with_session_tls, worst, ClientTls,
    ErrorKind, FreezeRequest, OpError, Progress, Released, RunSpec, Status, Target,
    ON_TIMEOUT_HINT, TIMEOUT_HINT,
};

/// Where an operator command connects: the proxies and identity (or why
/// the flags could not make them, reported by the command), TLS, and the
/// `--timeout` if given.
#[derive(Debug)]
pub struct Conn {
    /// The proxies (at least one; one per `--url`, the same identity for
    /// each) and who to bind as.
    pub targets: Result<Vec<Target>, OpError>,
    /// TLS to the proxy.
    pub tls: ClientTls,
    /// `--timeout`: the whole command's limit.
    pub timeout: Option<Duration>,
}

impl Conn {
    /// The first proxy (the only one, for most uses).
    fn target(&self) -> Result<&Target, OpError> {
        self.targets()?
            .first()
            .ok_or_else(|| OpError::usage("no --url given", "give --url URL"))
    }

    fn targets(&self) -> Result<&[Target], OpError> {
        self.targets.as_deref().map_err(Clone::clone)
    }

    /// `--timeout`, else 30 s.
    fn limit(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(30))
    }

    /// `--timeout`, else [`OFF_TIMEOUT`].
    fn off_limit(&self) -> Duration {
        self.timeout.unwrap_or(OFF_TIMEOUT)
    }
}

/// The default limit of an OFF: the proxy may answer it only once a server
/// stopped during the freeze answers again, waiting up to its
/// `upstream_retry_secs` (60 s by default) before it says it did not.
const OFF_TIMEOUT: Duration = Duration::from_secs(90);

/// Prints an error (a warning when the freeze had expired) and returns its
/// exit status.
pub fn fail(who: &str, e: &OpError) -> u8 {
    let word = if e.kind == ErrorKind::Expired {
        "warning"
    } else {
        "error"
    };
    eprintln!("{who}: {word}: {e}");
    e.exit_code()
}

/// `abproxy on`: through every proxy at once, all or nothing.
pub async fn on(conn: &Conn, req: &FreezeRequest, who: &str) -> u8 {
    let limit = conn.timeout.unwrap_or_else(|| req.default_timeout());
    match conn.targets() {
        Ok(targets) if targets.len() > 1 => {
            return on_several(conn, targets, req, limit, who).await
        }
        Err(e) => return fail(who, &e),
        Ok(_) => {}
    }
    let result = async {
        let target = conn.target()?;
        let progress = Progress::stderr(who);
        with_session_tls(target, &conn.tls, limit, ON_TIMEOUT_HINT, async |s| {
            let _waiting = progress.is_tty().then(|| progress.waiting("draining…"));
            s.on(req).await
        })
        .await
    }
    .await;
    match result {
        Ok(frozen) => {
            println!("{}", frozen.message);
            exit::OK
        }
        Err(e) => fail(who, &e),
    }
}

/// `abproxy on` with several proxies: ON through each at once (each
/// within `limit`); if one refuses or fails, OFF naming its freeze on each
/// that froze, and the first failure's status.
async fn on_several(
    conn: &Conn,
    targets: &[Target],
    req: &FreezeRequest,
    limit: Duration,
    who: &str,
) -> u8 {
    let progress = Progress::stderr(who);
    let results = {
        let _waiting = progress.is_tty().then(|| progress.waiting("draining…"));
        on_each(targets, &conn.tls, req, limit).await
    };
    let say = |m: String| eprintln!("{who}: {m}");
    let not_done = "do not take the backup now";
    match all_or_nothing(targets, results, conn.off_limit(), not_done, &say).await {
        Ok(held) => {
            for h in &held {
                println!("{}: {}", h.url, h.frozen.message);
            }
            close_all(held).await;
            exit::OK
        }
        Err(code) => code,
    }
}

/// `abproxy off` (`--freeze-id`: that freeze and no other; with several
/// proxies, one id per proxy in the same order, or none).
pub async fn off(conn: &Conn, freeze_ids: &[u64], who: &str) -> u8 {
    let targets = match conn.targets() {
        Ok(t) => t,
        Err(e) => return fail(who, &e),
    };
    let ids: Vec<Option<u64>> = match (freeze_ids.len(), targets.len()) {
        (0, n) => vec![None; n],
        (k, n) if k == n => freeze_ids.iter().copied().map(Some).collect(),
        (k, n) => {
            let e = OpError::usage(
                format!("{k} --freeze-id for {n} --url"),
                "give one --freeze-id per --url, in the same order, or none",
            );
            return fail(who, &e);
        }
    };
    if targets.len() > 1 {
        return off_several(conn, targets, &ids, who).await;
    }
    let freeze_id = ids[0];
    let result = async {
        let target = conn.target()?;
        with_session_tls(
            target,
            &conn.tls,
            conn.off_limit(),
            TIMEOUT_HINT,
            async |s| s.off_freeze(freeze_id).await,
        )
        .await
    }
    .await;
    match result {
        Ok(r @ Released::Released(_)) => released(&r),
        Ok(Released::NotFrozen) => {
            println!("not frozen (nothing to release)");
            exit::OK
        }
        Err(e) => fail(who, &e),
    }
}

/// `abproxy off` with several proxies: OFF through each at once, one line
/// per proxy; 0 only if each released (or had nothing to release), else
/// the most serious status.
async fn off_several(conn: &Conn, targets: &[Target], ids: &[Option<u64>], who: &str) -> u8 {
    let results = futures::future::join_all(targets.iter().zip(ids).map(|(t, id)| {
        with_session_tls(t, &conn.tls, conn.off_limit(), TIMEOUT_HINT, async |s| {
            s.off_freeze(*id).await
        })
    }))
    .await;
    let mut codes = Vec::new();
    for (t, r) in targets.iter().zip(results) {
        let url = &t.url;
        match r {
            Ok(r @ Released::Released(_)) => codes.push(released_at(url, &r)),
            Ok(Released::NotFrozen) => println!("{url}: not frozen (nothing to release)"),
            Err(e) => codes.push(fail(&format!("{who}: {url}"), &e)),
        }
    }
    worst(codes).unwrap_or(exit::OK)
}

/// Prints the answer to OFF of the proxy at `url` ("URL: message"); exit 7
/// when the server stopped during the freeze does not answer again yet.
fn released_at(url: &str, r: &Released) -> u8 {
    if let Released::Released(msg) = r {
        println!("{url}: {msg}");
    }
    if r.server_down() {
        exit::SERVER_DOWN
    } else {
        exit::OK
    }
}

/// Prints OFF's answer; exit 7 when the server stopped during the freeze
/// does not answer again yet.
fn released(r: &Released) -> u8 {
    if let Released::Released(msg) = r {
        println!("{msg}");
    }
    if r.server_down() {
        exit::SERVER_DOWN
    } else {
        exit::OK
    }
}

/// `abproxy status` (`json`: `--json`).
pub async fn status(conn: &Conn, json: bool) -> u8 {
    match conn.targets() {
        Ok(targets) if targets.len() > 1 => return status_several(conn, targets, json).await,
        Err(e) => return fail("abproxy status", &e),
        Ok(_) => {}
    }
    let result = async {
        let target = conn.target()?;
        with_session_tls(target, &conn.tls, conn.limit(), TIMEOUT_HINT, async |s| {
            s.status().await
        })
        .await
    }
    .await;
    match result {
        Ok(st) if json => {
            println!("{}", st.to_json());
            exit::OK
        }
        Ok(st) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            print!("{}", st.render(now));
            exit::OK
        }
        Err(e) => fail("abproxy status", &e),
    }
}

/// `abproxy status` with several proxies: one block per proxy, headed by
/// its URL (`--json`: an array of objects, each the one-proxy object with
/// `url`, or `url` and `error`); 0 only if each answered.
async fn status_several(conn: &Conn, targets: &[Target], json: bool) -> u8 {
    let results: Vec<Result<Status, OpError>> =
        futures::future::join_all(targets.iter().map(|t| {
            with_session_tls(t, &conn.tls, conn.limit(), TIMEOUT_HINT, async |s| {
                s.status().await
            })
        }))
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut codes = Vec::new();
    let mut array = Vec::new();
    for (i, (t, r)) in targets.iter().zip(results).enumerate() {
        match r {
            Ok(st) if json => {
                let mut v = serde_json::to_value(&st).expect("a Status always serialises");
                if let serde_json::Value::Object(map) = &mut v {
                    map.insert("url".into(), t.url.clone().into());
                }
                array.push(v);
            }
            Ok(st) => {
                if i > 0 {
                    println!();
                }
                println!("proxy:     {}", t.url);
                print!("{}", st.render(now));
            }
            Err(e) => {
                codes.push(fail(&format!("abproxy status: {}", t.url), &e));
                if json {
                    array.push(serde_json::json!({"url": t.url, "error": e.to_string()}));
                } else {
                    if i > 0 {
                        println!();
                    }
                    println!("proxy:     {}", t.url);
                    println!("error:     {e}");
                }
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&array).expect("JSON values serialise")
        );
    }
    worst(codes).unwrap_or(exit::OK)
}

/// `abproxy run -- CMD`.
pub async fn run(conn: Conn, req: &FreezeRequest, command: Vec<OsString>) -> u8 {
    let off_timeout = conn.off_limit();
    let targets = match conn.targets {
        Ok(t) => t,
        Err(e) => return fail("abproxy run", &e),
    };
    let request = req.clone().with_hold_until_unbind(true);
    let spec = RunSpec {
        targets,
        tls: conn.tls,
        on_timeout: conn.timeout.unwrap_or_else(|| request.default_timeout()),
        off_timeout,
        request,
        command,
    };
    run_frozen(spec, &Progress::stderr("abproxy run")).await
}

/// `abproxy backup --to DIR` or `--tar -`, with `--history FILE`.
pub async fn backup(
    conn: Conn,
    req: &FreezeRequest,
    dest: Destination,
    history: Option<PathBuf>,
    method: super::backup::Method,
) -> u8 {
    let off_timeout = conn.off_limit();
    let targets = conn.targets.and_then(|t| {
        if t.is_empty() {
            Err(OpError::usage("no --url given", "give --url URL"))
        } else {
            Ok(t)
        }
    });
    let mut targets = match targets {
        Ok(t) => t,
        Err(e) => {
            let code = fail("abproxy backup", &e);
            if let Some(path) = &history {
                let progress = Progress::stderr("abproxy backup");
                super::backup::record_early_failure(path, &dest, "arguments", &e, code, &progress);
            }
            return code;
        }
    };
    let request = req.clone().with_hold_until_unbind(true);
    let target = targets.remove(0);
    let spec = BackupSpec {
        target,
        more_targets: targets,
        tls: conn.tls,
        on_timeout: conn.timeout.unwrap_or_else(|| request.default_timeout()),
        off_timeout,
        request,
        dest,
        history,
        method,
        method_reason: None,
    };
    super::backup::backup(spec, &Progress::stderr("abproxy backup")).await
}

/// `abproxy hook`: where it connects, its state file (`--state-file`,
/// empty: the default), and (`--before`) the freeze.
#[derive(Debug)]
pub struct Hook {
    /// Where to connect.
    pub conn: Conn,
    /// `--state-file`.
    pub state_file: Option<PathBuf>,
    /// What `--before` freezes.
    pub request: FreezeRequest,
}

impl Hook {
    fn state(&self, targets: &[Target]) -> HookState {
        match self
            .state_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            Some(path) => HookState::new(path),
            None => HookState::default_for_all(targets, &self.conn.tls),
        }
    }
}

const BEFORE: &str = "abproxy hook --before";
const AFTER: &str = "abproxy hook --after";

/// `hook --before`: starts the holder (this program with `holder_args`:
/// `hook --before --hold` and the same flags) and waits for it to say the
/// freeze is set up (its first stdout line, `frozen\tMESSAGE`); a holder
/// that exits instead has printed why on stderr, and its status is this
/// command's.
pub async fn hook_before(h: &Hook, holder_args: Vec<OsString>) -> u8 {
    let limit = h
        .conn
        .timeout
        .unwrap_or_else(|| h.request.default_timeout());
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            let e = OpError::usage(format!("cannot find abproxy itself: {e}"), "");
            return fail(BEFORE, &e);
        }
    };
    let mut holder = match tokio::process::Command::new(exe)
        .args(holder_args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // Its own process group: a terminal's Ctrl-C after --before has
        // returned is not for it.
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let e = OpError::usage(format!("cannot start the holder: {e}"), "");
            return fail(BEFORE, &e);
        }
    };
    let Some(stdout) = holder.stdout.take() else {
        return fail(BEFORE, &OpError::usage("the holder has no stdout", ""));
    };
    let mut line = String::new();
    let told = tokio::time::timeout(
        limit + Duration::from_secs(5),
        tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(stdout), &mut line),
    )
    .await;
    match told {
        Ok(Ok(_)) if line.starts_with("frozen\t") => {
            // One freeze a tab (several proxies: "URL: MESSAGE" each).
            print!("{}", line["frozen\t".len()..].replace('\t', "\n"));
            exit::OK
        }
        Ok(_) => match tokio::time::timeout(Duration::from_secs(10), holder.wait()).await {
            Ok(Ok(st)) => st
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(exit::FAILED),
            _ => {
                let _ = holder.start_kill();
                let e = OpError::usage("the holder neither froze nor exited", "");
                fail(BEFORE, &e)
            }
        },
        Err(_) => {
            // Killed before it could record anything: its connection ends,
            // and the freeze with it (holdUntilUnbind).
            let _ = holder.start_kill();
            let e = OpError::new(
                ErrorKind::Timeout,
                format!(
                    "timed out after {} s waiting for the freeze",
                    limit.as_secs() + 5
                ),
                ON_TIMEOUT_HINT,
            );
            fail(BEFORE, &e)
        }
    }
}

/// The holder (`hook --before --hold`): ON with holdUntilUnbind through
/// every proxy (all or nothing), the record and the socket, then
/// `frozen\tMESSAGE` on stdout (several proxies: `frozen\tURL: MESSAGE`
/// and one more `\tURL: MESSAGE` per proxy), then its standard streams on
/// /dev/null, and it waits for `hook --after` (see [`hook`]).
pub async fn hook_hold(h: &Hook) -> u8 {
    let req = h.request.clone().with_hold_until_unbind(true);
    let limit = h.conn.timeout.unwrap_or_else(|| req.default_timeout());
    let set_up = async {
        let targets = h.conn.targets()?;
        let state = h.state(targets);
        if let Ok(Some(HookRecord {
            holder: Some(pid), ..
        })) = state.read()
        {
            if hook::holder_alive(&state).await {
                // Another job's freeze: its --after must find its holder.
                return Err(OpError::new(
                    ErrorKind::Refused(51),
                    format!(
                        "busy (51): the freeze an earlier hook --before set up with {} is still \
                         held (holder process {pid})",
                        state.path().display()
                    ),
                    "run hook --after with that state file first, or give this job its own \
                     --state-file",
                ));
            }
        }
        state.clear()?;
        let listener = state.listen()?;
        let progress = Progress::stderr(BEFORE);
        let results = {
            let _waiting = progress.is_tty().then(|| progress.waiting("draining…"));
            on_each(targets, &h.conn.tls, &req, limit).await
        };
        let say = |m: String| eprintln!("{BEFORE}: {m}");
        let mut held = match all_or_nothing(
            targets,
            results,
            h.conn.off_limit(),
            "nothing is frozen",
            &say,
        )
        .await
        {
            Ok(held) => held,
            Err(code) => {
                let _ = std::fs::remove_file(state.socket_path());
                return Ok(Err(code));
            }
        };
        // The leases bound the wait for --after; a status that cannot be
        // read leaves a day.
        let leases = futures::future::join_all(held.iter_mut().map(|h| async {
            tokio::time::timeout(Duration::from_secs(10), h.session.status())
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|st| st.lease_expires)
        }))
        .await;
        let lease_end = leases.into_iter().flatten().min();
        let record = HookRecord {
            freeze: held[0].frozen.id(),
            holder: Some(std::process::id()),
            proxies: if held.len() > 1 {
                held.iter()
                    .map(|h| (h.url.clone(), h.frozen.id()))
                    .collect()
            } else {
                Vec::new()
            },
        };
        if let Err(e) = state.write(&record) {
            // Unrecorded, --after could not end it: ending the connection
            // ends the freeze (holdUntilUnbind).
            close_all(held).await;
            let _ = std::fs::remove_file(state.socket_path());
            return Err(OpError {
                message: format!("{}; the freeze was released again", e.message),
                ..e
            });
        }
        Ok(Ok((state, listener, held, lease_end)))
    }
    .await;
    let (state, listener, mut held, lease_end) = match set_up {
        Ok(Ok(v)) => v,
        // all_or_nothing has said why.
        Ok(Err(code)) => return code,
        Err(e) => return fail(BEFORE, &e),
    };
    let message = if held.len() > 1 {
        let each: Vec<String> = held
            .iter()
            .map(|h| format!("{}: {}", h.url, h.frozen.message.replace('\t', " ")))
            .collect();
        each.join("\t")
    } else {
        held[0].frozen.message.clone()
    };
    let gone = |state: &HookState| {
        let _ = state.clear();
        let _ = std::fs::remove_file(state.socket_path());
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let told = writeln!(out, "frozen\t{message}").and_then(|()| out.flush());
        if told.is_err() {
            // --before is gone: nobody knows of this freeze.
            close_all(held).await;
            gone(&state);
            return exit::FAILED;
        }
    }
    detach_stdio();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let left = lease_end.map_or(Duration::from_secs(86_400), |end| {
        Duration::from_secs(end.saturating_sub(now))
    });
    let until = tokio::time::Instant::now() + left + hook::HOLDER_GRACE;
    let answered = hook::hold(listener, &mut held, h.conn.off_limit(), until).await;
    close_all(held).await;
    let _ = std::fs::remove_file(state.socket_path());
    match answered {
        Some(results) => worst(
            results
                .iter()
                .filter_map(|r| r.as_ref().err().map(OpError::exit_code)),
        )
        .unwrap_or(exit::OK),
        None => exit::FAILED,
    }
}

/// Standard input, output and error on /dev/null: a backup tool waiting
/// for the end of `hook --before`'s output must not wait for the holder.
fn detach_stdio() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open
            // for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// `hook --after`: OFF of the freeze `hook --before` recorded, and only
/// that one: by its holder when it has one, else on a new connection;
/// nothing sent when none is recorded.
pub async fn hook_after(h: &Hook) -> u8 {
    let limit = h.conn.off_limit();
    let targets = match h.conn.targets() {
        Ok(t) => t,
        Err(e) => return fail(AFTER, &e),
    };
    let state = h.state(targets);
    let record = match state.read() {
        Ok(Some(r)) => r,
        Ok(None) => {
            println!(
                "nothing to release: no freeze recorded in {} (hook --before failed, or ran \
                 with another --state-file); OFF not sent, it could end another job's freeze",
                state.path().display()
            );
            return exit::OK;
        }
        Err(e) => return fail(AFTER, &e),
    };
    let results: Vec<Result<Released, OpError>> = if let Some(pid) = record.holder {
        match hook::ask_holder(&state, limit).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                // No holder: its connection, and the freeze, have ended.
                if let Err(e) = state.clear() {
                    eprintln!("{AFTER}: warning: {e}");
                }
                eprintln!(
                    "{AFTER}: warning: the freeze hook --before set up has ended: its holder \
                     (process {pid}) is gone (killed, or its lease ended long ago), and with \
                     its connection the freeze; the backup may be inconsistent"
                );
                return exit::FAILED;
            }
            Err(e) => vec![Err(e)],
        }
    } else {
        // A record without a holder (an older --before): one proxy.
        let target = &targets[0];
        vec![
            with_session_tls(target, &h.conn.tls, limit, TIMEOUT_HINT, async |s| {
                s.off_freeze(record.freeze).await
            })
            .await,
        ]
    };
    // The proxies have answered about these freezes: the record is spent.
    // Kept when one may not have (unreachable, timeout) or asked for a
    // retry (busy), so that running --after again works.
    let answered = results.iter().all(|r| match r {
        Ok(_) => true,
        Err(e) => matches!(e.kind, ErrorKind::Failed | ErrorKind::Expired),
    });
    if answered {
        if let Err(e) = state.clear() {
            eprintln!("{AFTER}: warning: {e}");
        }
    }
    if results.len() > 1 {
        return after_several(&record, targets, results);
    }
    let Some(result) = results.into_iter().next() else {
        return exit::FAILED;
    };
    match result {
        Ok(r @ Released::Released(_)) => released(&r),
        Ok(Released::NotFrozen) => {
            // Only a proxy that ignores freezeId says so after a freeze.
            eprintln!(
                "{AFTER}: warning: not frozen: the freeze hook --before set up had already ended \
                 (lease, or another OFF); the backup may be inconsistent"
            );
            exit::FAILED
        }
        Err(e) => fail(AFTER, &e),
    }
}

/// `hook --after`'s report with several proxies: one line per proxy (the
/// record's URLs, else the command line's), and the most serious status.
fn after_several(
    record: &HookRecord,
    targets: &[Target],
    results: Vec<Result<Released, OpError>>,
) -> u8 {
    let mut codes = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let url = record
            .proxies
            .get(i)
            .map(|(u, _)| u.as_str())
            .or_else(|| targets.get(i).map(|t| t.url.as_str()))
            .unwrap_or("?");
        match r {
            Ok(r @ Released::Released(_)) => codes.push(released_at(url, &r)),
            Ok(Released::NotFrozen) => {
                eprintln!(
                    "{AFTER}: {url}: warning: not frozen: the freeze hook --before set up had \
                     already ended (lease, or another OFF); the backup may be inconsistent"
                );
                codes.push(exit::FAILED);
            }
            Err(e) => codes.push(fail(&format!("{AFTER}: {url}"), &e)),
        }
    }
    worst(codes).unwrap_or(exit::OK)
}
