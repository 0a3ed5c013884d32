//! The `command` driver: runs the configured commands of a backend (see
//! [`super`]).

use std::process::Stdio;

use futures::future::BoxFuture;
use tokio::io::AsyncReadExt;

use super::{Driver, DriverError, DriverErrorKind};
use crate::freeze::backend::{Backend, Mode};

/// How much of a failed command's stderr is reported.
const STDERR_TAIL: usize = 512;

/// The `command` driver. Its commands are killed when the engine drops a
/// step (its deadline).
#[derive(Debug, Clone)]
pub struct CommandDriver {
    prepare: Vec<String>,
    done: Vec<String>,
}

impl CommandDriver {
    /// A driver running `prepare` and `done` (argv lists, empty = nothing).
    pub fn new(prepare: Vec<String>, done: Vec<String>) -> Self {
        CommandDriver { prepare, done }
    }

    async fn run(
        &self,
        argv: &[String],
        step: &str,
        b: &Backend,
        freeze_id: u64,
    ) -> Result<(), DriverError> {
        let Some((prog, args)) = argv.split_first() else {
            return Ok(());
        };
        let mode = match b.mode {
            Mode::Readonly => "readonly",
            Mode::Stop => "stop",
            Mode::Unimplemented => "unimplemented",
        };
        let mut child = tokio::process::Command::new(prog)
            .args(args)
            .env("ABPROXY_BACKEND", &b.suffix)
            .env("ABPROXY_MODE", mode)
            .env("ABPROXY_STEP", step)
            .env("ABPROXY_FREEZE_ID", freeze_id.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                DriverError::with_source(
                    DriverErrorKind::Io,
                    format!("{step} command {prog:?} cannot start"),
                    e,
                )
            })?;
        let mut stderr = child.stderr.take().expect("piped stderr");
        let run = async {
            let mut err = Vec::new();
            // Read everything (a full pipe would block the command), keep the tail.
            let mut buf = [0u8; 4096];
            loop {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        err.extend_from_slice(&buf[..n]);
                        if err.len() > 4 * STDERR_TAIL {
                            err.drain(..err.len() - STDERR_TAIL);
                        }
                    }
                }
            }
            (child.wait().await, err)
        };
        match run.await {
            (Err(e), _) => Err(DriverError::with_source(
                DriverErrorKind::Io,
                format!("{step} command {prog:?}"),
                e,
            )),
            (Ok(status), err) if !status.success() => {
                let stderr_tail =
                    String::from_utf8_lossy(&err[err.len().saturating_sub(STDERR_TAIL)..])
                        .trim()
                        .to_string();
                Err(DriverError::new(
                    DriverErrorKind::CommandFailed {
                        status,
                        stderr_tail,
                    },
                    format!("{step} command {prog:?}"),
                ))
            }
            (Ok(_), _) => Ok(()),
        }
    }
}

impl Driver for CommandDriver {
    fn prepare<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.run(&self.prepare, "prepare", backend, freeze_id))
    }

    fn done<'a>(
        &'a self,
        backend: &'a Backend,
        freeze_id: u64,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.run(&self.done, "done", backend, freeze_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend::readonly("dc=example,dc=org")
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    /// A command outliving the engine's deadline is killed.
    #[tokio::test]
    async fn a_step_past_its_deadline_kills_its_command() {
        use crate::freeze::drivers::{run_step, DriverOp, Step};
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let slow = CommandDriver::new(
            sh(&format!("echo $$ > {}; exec sleep 30", pid.display())),
            vec![],
        );
        let err = run_step(
            &slow,
            Step::Prepare,
            &backend(),
            1,
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.kind(),
            &DriverErrorKind::TimedOut {
                op: DriverOp::Prepare,
                deadline: Duration::from_millis(500)
            }
        );
        assert!(
            err.to_string()
                .starts_with("the prepare step did not finish within 0.5 s"),
            "{err}"
        );
        let pid = std::fs::read_to_string(&pid).unwrap();
        let gone = || {
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
                || std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                    .is_ok_and(|s| s.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !gone() {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn environment_success_and_failure() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let d = CommandDriver::new(
            sh(&format!(
                "echo \"$ABPROXY_STEP $ABPROXY_BACKEND $ABPROXY_MODE $ABPROXY_FREEZE_ID\" > {}",
                out.display()
            )),
            sh("echo 'disk full' >&2; exit 3"),
        );
        d.prepare(&backend(), 7).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "prepare dc=example,dc=org readonly 7"
        );
        let err = d.done(&backend(), 7).await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                DriverErrorKind::CommandFailed { status, stderr_tail }
                    if status.code() == Some(3) && stderr_tail == "disk full"
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "done command \"sh\" failed (exit status: 3): disk full"
        );

        let missing = CommandDriver::new(vec!["/nonexistent/x".into()], vec![]);
        let err = missing.prepare(&backend(), 1).await.unwrap_err();
        assert_eq!(err.kind(), &DriverErrorKind::Io);
        assert!(
            err.to_string()
                .starts_with("prepare command \"/nonexistent/x\" cannot start: "),
            "{err}"
        );
        // Nothing configured: nothing to do.
        assert!(CommandDriver::new(vec![], vec![])
            .prepare(&backend(), 1)
            .await
            .is_ok());
    }
}
