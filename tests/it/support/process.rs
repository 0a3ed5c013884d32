//! A running `abproxy` binary (`abproxy serve ...`) whose log is read line
//! by line, for tests of the process itself: flags, signals, crashes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

/// A running `abproxy serve` whose stderr is collected line by line.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        Self::start_with_nofile(args, None)
    }

    /// Starts with at most `nofile` open files (RLIMIT_NOFILE), if given.
    pub fn start_with_nofile(args: &[&str], nofile: Option<u64>) -> Running {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("ABPROXY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // Runs in the child between fork and exec: only the syscall.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 20 s) for a log line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// A log line already written that contains `needle`, without waiting.
    pub fn saw(&mut self, needle: &str) -> bool {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.iter().any(|l| l.contains(needle))
    }

    pub fn sigterm_and_wait(mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        status.code().unwrap_or(-1)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago, outside the ephemeral range
/// ([`testkit::free_port`]).
pub fn free_port() -> u16 {
    testkit::free_port().expect("a free loopback port")
}

impl Running {
    /// SIGKILL, as a crash or the OOM killer would; waits for the process.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Writes `DIR/abproxy.toml`: a listener on a free loopback port, `upstream`,
/// then `body` (more TOML). Returns the file's path and the listener's
/// HOST:PORT.
pub fn write_config(dir: &std::path::Path, upstream: &str, body: &str) -> (String, String) {
    let port = free_port();
    let path = dir.join("abproxy.toml");
    std::fs::write(
        &path,
        format!("listen = [\"ldap://127.0.0.1:{port}\"]\nupstream = \"{upstream}\"\n{body}"),
    )
    .unwrap();
    (
        path.to_str().unwrap().to_string(),
        format!("127.0.0.1:{port}"),
    )
}
