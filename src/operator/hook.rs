//! `abproxy hook --before` / `--after`: a freeze that outlives the command
//! that set it up, for backup tools that run one command before the backup
//! and another after it.
//!
//! `--before` leaves a *holder*: a process of its own (`hook --before
//! --hold`, started by `--before`, in its own process group, with its
//! standard streams on `/dev/null` once the freeze is set up) that keeps the
//! connection the freeze was set up on, with holdUntilUnbind. `--after` asks
//! the holder, over a Unix socket beside the state file, to send OFF on
//! that connection, and prints what the proxy answered. So:
//! - `--after` needs no bind: an operator whose entry lies in a frozen
//!   backend could not bind on a new connection while binds count as writes
//!   (`bind_is_write`, a server with a password policy), and needs no
//!   password at all;
//! - a holder that dies (killed, machine rebooted) ends the freeze with its
//!   connection (holdUntilUnbind), never leaving one behind; `--after` then
//!   says the freeze ended early (exit 6);
//! - the holder waits at most until its freeze's lease has ended (plus
//!   [`HOLDER_GRACE`]), then ends its connection and exits.
//!
//! The holder answers only processes of its own user (the socket is mode
//! 0600 in a directory of that user, and the peer's uid is checked).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{ClientTls, ErrorKind, Held, OpError, Released, Target};

/// How long the holder stays after its freeze's lease has ended (an
/// `--after` run then still hears how the freeze ended).
pub const HOLDER_GRACE: Duration = Duration::from_secs(60);

/// How long `--after` waits to connect to the holder and the holder waits
/// for `--after`'s request line.
const SOCKET_STEP: Duration = Duration::from_secs(5);

/// Where `abproxy hook --before` records the freeze it set up, for `hook
/// --after` to end that freeze and no other.
///
/// The file holds `freeze-id N` (`freeze-id unknown` from a proxy that does
/// not report ids) and, when a holder keeps the freeze's connection,
/// `holder PID`; with several proxies, then one `proxy N URL` line per
/// proxy (its freeze id, `unknown` if not said), in the order given, the
/// first line's id being the first proxy's. The holder's socket is the file's path with `.sock`
/// appended. `--before` removes the record first, and writes it once ON
/// succeeded; `--after` removes it once the proxy has answered its OFF. No
/// record: `--after` sends nothing (a plain OFF could end another job's
/// freeze).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookState {
    path: PathBuf,
}

/// What a [`HookState`] file records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRecord {
    /// The freeze `hook --before` set up (`None`: the proxy did not say
    /// its id); with several proxies, the first one's.
    pub freeze: Option<u64>,
    /// The process keeping the freeze's connection(s), if one does.
    pub holder: Option<u32>,
    /// With several proxies: each one's URL and freeze id, in the order
    /// given; empty with one.
    pub proxies: Vec<(String, Option<u64>)>,
}

fn id_text(id: Option<u64>) -> String {
    id.map_or_else(|| "unknown".to_owned(), |i| i.to_string())
}

impl HookRecord {
    fn to_text(&self) -> String {
        let mut text = format!("freeze-id {}\n", id_text(self.freeze));
        if let Some(pid) = self.holder {
            text.push_str(&format!("holder {pid}\n"));
        }
        for (url, id) in &self.proxies {
            text.push_str(&format!("proxy {} {url}\n", id_text(*id)));
        }
        text
    }

    fn parse(text: &str) -> Result<HookRecord, &'static str> {
        let id = |v: &str| -> Result<Option<u64>, ()> {
            match v.trim() {
                "unknown" => Ok(None),
                v => v.parse().map(Some).map_err(|_| ()),
            }
        };
        let mut lines = text.lines();
        let freeze = match lines.next().and_then(|l| l.strip_prefix("freeze-id ")) {
            Some(v) => id(v).map_err(|()| "no `freeze-id N` line")?,
            None => return Err("no `freeze-id N` line"),
        };
        let mut holder = None;
        let mut proxies = Vec::new();
        for line in lines {
            if let Some(v) = line.strip_prefix("holder ") {
                holder = Some(v.trim().parse().map_err(|_| "a bad `holder PID` line")?);
            } else if let Some(v) = line.strip_prefix("proxy ") {
                let (n, url) = v.trim().split_once(' ').ok_or("a bad `proxy N URL` line")?;
                let n = id(n).map_err(|()| "a bad `proxy N URL` line")?;
                proxies.push((url.trim().to_owned(), n));
            } else if !line.trim().is_empty() {
                return Err("an unknown line (written by a newer abproxy?)");
            }
        }
        Ok(HookRecord {
            freeze,
            holder,
            proxies,
        })
    }
}

impl HookState {
    /// A state file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> HookState {
        HookState { path: path.into() }
    }

    /// The default state file of this user for this proxy and identity:
    /// `$XDG_RUNTIME_DIR/abproxy-hook-HASH`, else
    /// `$TMPDIR/abproxy-hook-UID-HASH` (`/tmp` by default), HASH a digest
    /// of the URL, the bind DN and the client certificate file. Jobs that
    /// may overlap need a state file each (`--state-file`).
    pub fn default_for(target: &Target, tls: &ClientTls) -> HookState {
        Self::default_for_all(std::slice::from_ref(target), tls)
    }

    /// [`HookState::default_for`] several proxies frozen together (the
    /// same identity for each): HASH of their URLs, in order (one URL: the
    /// same file as [`HookState::default_for`]).
    pub fn default_for_all(targets: &[Target], tls: &ClientTls) -> HookState {
        let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
        let urls = urls.join(" ");
        let bind_dn = targets.first().and_then(|t| t.bind_dn.as_deref());
        // FNV-1a, 64 bits: a stable name, not a secret.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let cert = tls
            .cert_file
            .as_deref()
            .map(|p| p.to_string_lossy().into_owned());
        for part in [Some(urls.as_str()), bind_dn, cert.as_deref()] {
            for b in part.unwrap_or("").bytes().chain([0]) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        let path = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            Some(dir) if dir.is_absolute() => dir.join(format!("abproxy-hook-{hash:016x}")),
            _ => std::env::temp_dir().join(format!("abproxy-hook-{}-{hash:016x}", euid())),
        };
        HookState { path }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The holder's socket: the file's path with `.sock` appended.
    pub fn socket_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".sock");
        PathBuf::from(p)
    }

    fn error(&self, what: &str, e: impl fmt::Display) -> OpError {
        OpError::usage(
            format!(
                "cannot {what} the hook state file {}: {e}",
                self.path.display()
            ),
            "give --state-file FILE (ABPROXY_HOOK_STATE) in a directory this user can write, \
             the same for hook --before and hook --after",
        )
    }

    /// The record, `None` if there is none.
    ///
    /// # Errors
    ///
    /// A usage error if the file cannot be read, is not a regular file
    /// owned by this user, or does not hold a record.
    pub fn read(&self) -> Result<Option<HookRecord>, OpError> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error("read", e)),
        };
        let uid = euid();
        if !meta.file_type().is_file() || meta.uid() != uid {
            return Err(self.error(
                "trust",
                format!("not a regular file owned by uid {uid} (someone else's, or a link)"),
            ));
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| self.error("read", e))?;
        HookRecord::parse(&text)
            .map(Some)
            .map_err(|e| self.error("use", e))
    }

    /// Records `record` (mode 0600, replacing the file atomically).
    ///
    /// # Errors
    ///
    /// A usage error if the file cannot be written.
    pub fn write(&self, record: &HookRecord) -> Result<(), OpError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(record.to_text().as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.error("write", e));
        }
        Ok(())
    }

    /// Removes the record (nothing to do if there is none).
    ///
    /// # Errors
    ///
    /// A usage error if an existing file cannot be removed.
    pub fn clear(&self) -> Result<(), OpError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error("remove", e)),
        }
    }

    /// The holder's listening socket (a stale one removed first), mode 0600.
    ///
    /// # Errors
    ///
    /// A usage error if it cannot be made.
    pub fn listen(&self) -> Result<UnixListener, OpError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.socket_path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.error("replace the holder socket beside", e)),
        }
        let listener =
            UnixListener::bind(&path).map_err(|e| self.error("make a holder socket beside", e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| self.error("restrict the holder socket beside", e))?;
        Ok(listener)
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// What the holder answers `--after` (one line).
fn reply_line(result: &Result<Released, OpError>) -> String {
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    match result {
        Ok(Released::Released(msg)) => format!("released\t{}\n", clean(msg)),
        Ok(Released::NotFrozen) => "not-frozen\n".to_owned(),
        Err(e) => {
            let kind = match e.kind {
                ErrorKind::Usage => "usage".to_owned(),
                ErrorKind::Refused(rc) => format!("refused {rc}"),
                ErrorKind::Unreachable => "unreachable".to_owned(),
                ErrorKind::Timeout => "timeout".to_owned(),
                ErrorKind::Failed => "failed".to_owned(),
                ErrorKind::Expired => "expired".to_owned(),
            };
            format!("error\t{kind}\t{}\t{}\n", clean(&e.message), clean(&e.hint))
        }
    }
}

/// Reads the holder's answer back.
fn parse_reply(line: &str) -> Option<Result<Released, OpError>> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let mut parts = line.split('\t');
    match parts.next()? {
        "released" => Some(Ok(Released::Released(parts.next()?.to_owned()))),
        "not-frozen" => Some(Ok(Released::NotFrozen)),
        "error" => {
            let kind = match parts.next()? {
                "usage" => ErrorKind::Usage,
                "unreachable" => ErrorKind::Unreachable,
                "timeout" => ErrorKind::Timeout,
                "failed" => ErrorKind::Failed,
                "expired" => ErrorKind::Expired,
                other => ErrorKind::Refused(other.strip_prefix("refused ")?.parse().ok()?),
            };
            let message = parts.next()?.to_owned();
            let hint = parts.next().unwrap_or("").to_owned();
            Some(Err(OpError {
                kind,
                message,
                hint,
            }))
        }
        _ => None,
    }
}

/// The holder's side: waits (until `until`) for an `--after` of this user,
/// sends OFF of each freeze of `held` on its own connection, all at once
/// (each within `off_limit`), answers one line per freeze, in order, and
/// returns what it answered (`None`: nobody asked in time).
pub(crate) async fn hold(
    listener: UnixListener,
    held: &mut [Held],
    off_limit: Duration,
    until: tokio::time::Instant,
) -> Option<Vec<Result<Released, OpError>>> {
    loop {
        let mut stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, say: try again a little later.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tokio::time::sleep_until(until) => return None,
        };
        if !stream.peer_cred().is_ok_and(|c| c.uid() == euid()) {
            continue;
        }
        let mut line = String::new();
        let (read, mut write) = stream.split();
        let asked = tokio::time::timeout(SOCKET_STEP, BufReader::new(read).read_line(&mut line))
            .await
            .is_ok_and(|r| r.is_ok());
        if !asked || line.trim_end() != "off" {
            continue;
        }
        let results: Vec<Result<Released, OpError>> =
            futures::future::join_all(held.iter_mut().map(|h| {
                super::within(
                    off_limit,
                    &h.url,
                    super::TIMEOUT_HINT,
                    h.session.off_freeze(h.frozen.id()),
                )
            }))
            .await;
        let reply: String = results.iter().map(reply_line).collect();
        let _ = tokio::time::timeout(SOCKET_STEP, write.write_all(reply.as_bytes())).await;
        return Some(results);
    }
}

/// Whether the holder of `state`'s record still listens (a job whose
/// `--after` has not run yet).
pub async fn holder_alive(state: &HookState) -> bool {
    matches!(
        tokio::time::timeout(SOCKET_STEP, UnixStream::connect(state.socket_path())).await,
        Ok(Ok(_))
    )
}

/// `--after`'s side: asks the holder at `state`'s socket to release, and
/// waits up to `limit` for its answer (one per proxy, in order). `Ok(None)`:
/// no holder listens there (it has ended, and its freeze with it).
///
/// # Errors
///
/// A timeout, or the holder going away without answering.
pub async fn ask_holder(
    state: &HookState,
    limit: Duration,
) -> Result<Option<Vec<Result<Released, OpError>>>, OpError> {
    let path = state.socket_path();
    let gone = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        )
    };
    let mut stream =
        match tokio::time::timeout(SOCKET_STEP, UnixStream::connect(&path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if gone(&e) => return Ok(None),
            Ok(Err(e)) => return Err(OpError::new(
                ErrorKind::Unreachable,
                format!(
                    "cannot reach the freeze's holder at {}: {e}",
                    path.display()
                ),
                "run hook --after as the user that ran hook --before, with the same --state-file",
            )),
            Err(_) => {
                return Err(OpError::new(
                    ErrorKind::Timeout,
                    format!("the freeze's holder at {} did not answer", path.display()),
                    "check the process named in the state file",
                ))
            }
        };
    super::within(limit, "the freeze's holder", super::TIMEOUT_HINT, async {
        stream
            .write_all(b"off\n")
            .await
            .map_err(|e| lost(&path, e))?;
        // One line per proxy, then the holder closes.
        let mut reader = BufReader::new(&mut stream);
        let mut answers = Vec::new();
        loop {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .await
                .map_err(|e| lost(&path, e))?;
            if line.is_empty() {
                break;
            }
            match parse_reply(&line) {
                Some(r) => answers.push(r),
                None => return Err(lost(&path, format!("unreadable answer {line:?}"))),
            }
        }
        if answers.is_empty() {
            return Err(lost(&path, "closed without an answer"));
        }
        Ok(Some(answers))
    })
    .await
}

fn lost(path: &Path, e: impl fmt::Display) -> OpError {
    OpError::new(
        ErrorKind::Unreachable,
        format!("the freeze's holder at {} failed: {e}", path.display()),
        "check with abproxy status whether the freeze is still in place",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written() {
        for r in [
            HookRecord {
                freeze: Some(7),
                holder: Some(4242),
                proxies: vec![],
            },
            HookRecord {
                freeze: None,
                holder: Some(1),
                proxies: vec![],
            },
            HookRecord {
                freeze: Some(3),
                holder: None,
                proxies: vec![],
            },
            HookRecord {
                freeze: Some(3),
                holder: Some(9),
                proxies: vec![
                    ("ldap://a:389".into(), Some(3)),
                    ("ldapi:///run/b.sock".into(), None),
                ],
            },
        ] {
            assert_eq!(HookRecord::parse(&r.to_text()), Ok(r));
        }
        // The format of a --before without a holder (older versions).
        assert_eq!(
            HookRecord::parse("freeze-id 12\n"),
            Ok(HookRecord {
                freeze: Some(12),
                holder: None,
                proxies: vec![],
            })
        );
        // And of one proxy with a holder: read as before.
        assert_eq!(
            HookRecord::parse("freeze-id 12\nholder 5\n"),
            Ok(HookRecord {
                freeze: Some(12),
                holder: Some(5),
                proxies: vec![],
            })
        );
        assert!(HookRecord::parse("freeze-id 1\nholder 2\nproxy x\n").is_err());
        assert!(HookRecord::parse("freeze-id 1\nsomething new\n").is_err());
        assert!(HookRecord::parse("").is_err());
        assert!(HookRecord::parse("freeze-id x\n").is_err());
        assert!(HookRecord::parse("freeze-id 1\nholder x\n").is_err());
    }

    #[test]
    fn replies_read_back_as_written() {
        let cases = [
            Ok(Released::Released("released after 2 s; freeze id 4".into())),
            Ok(Released::NotFrozen),
            Err(OpError::new(
                ErrorKind::Expired,
                "freeze 4 is not the current freeze\tit ended",
                "see lease_secs",
            )),
            Err(OpError::new(ErrorKind::Refused(51), "busy", "")),
            Err(OpError::new(ErrorKind::Timeout, "timed out", "wait longer")),
        ];
        for r in cases {
            let back = parse_reply(&reply_line(&r)).expect("readable");
            let clean = |r: &Result<Released, OpError>| match r {
                Err(e) => Err(OpError {
                    message: e.message.replace('\t', " "),
                    ..e.clone()
                }),
                Ok(v) => Ok(v.clone()),
            };
            assert_eq!(back, clean(&r));
        }
        assert!(parse_reply("").is_none());
        assert!(parse_reply("error\tnonsense\tx\n").is_none());
    }

    #[tokio::test]
    async fn no_holder_listening_is_no_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = HookState::new(dir.path().join("state"));
        assert!(matches!(
            ask_holder(&state, Duration::from_secs(1)).await,
            Ok(None)
        ));
        // A socket file left by a holder that died: nobody accepts.
        drop(state.listen().unwrap());
        assert!(state.socket_path().exists());
        assert!(matches!(
            ask_holder(&state, Duration::from_secs(1)).await,
            Ok(None)
        ));
    }

    #[test]
    fn hook_state_records_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let state = HookState::new(dir.path().join("s"));
        assert_eq!(state.read().unwrap(), None);
        state
            .write(&HookRecord {
                freeze: Some(7),
                holder: Some(9),
                proxies: vec![],
            })
            .unwrap();
        assert_eq!(
            state.read().unwrap(),
            Some(HookRecord {
                freeze: Some(7),
                holder: Some(9),
                proxies: vec![],
            })
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        state
            .write(&HookRecord {
                freeze: None,
                holder: None,
                proxies: vec![],
            })
            .unwrap();
        assert_eq!(
            state.read().unwrap(),
            Some(HookRecord {
                freeze: None,
                holder: None,
                proxies: vec![],
            })
        );
        state.clear().unwrap();
        state.clear().unwrap();
        assert_eq!(state.read().unwrap(), None);
        // A link is not trusted.
        std::os::unix::fs::symlink("/etc/passwd", state.path()).unwrap();
        assert_eq!(
            state.read().unwrap_err().exit_code(),
            super::super::exit::USAGE
        );
        // One file per URL and identity.
        let t = |dn: &str| Target {
            url: super::super::DEFAULT_URL.into(),
            bind_dn: Some(dn.into()),
            password: None,
        };
        let tls = ClientTls::default();
        assert_eq!(
            HookState::default_for(&t("cn=a"), &tls),
            HookState::default_for(&t("cn=a"), &tls)
        );
        assert_ne!(
            HookState::default_for(&t("cn=a"), &tls),
            HookState::default_for(&t("cn=b"), &tls)
        );
        // One file per set of proxies; one proxy: as before.
        assert_eq!(
            HookState::default_for_all(&[t("cn=a")], &tls),
            HookState::default_for(&t("cn=a"), &tls)
        );
        let other = Target {
            url: "ldap://127.0.0.2:3389".into(),
            ..t("cn=a")
        };
        assert_ne!(
            HookState::default_for_all(&[t("cn=a"), other.clone()], &tls),
            HookState::default_for(&t("cn=a"), &tls)
        );
        assert_ne!(
            HookState::default_for_all(&[t("cn=a"), other.clone()], &tls),
            HookState::default_for_all(&[other, t("cn=a")], &tls)
        );
    }
}
