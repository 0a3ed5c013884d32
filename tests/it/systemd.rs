//! `abproxy serve` under systemd's `Type=notify`: READY=1 once it accepts
//! clients, STOPPING=1 on SIGTERM, sent to the socket `$NOTIFY_SOCKET`
//! names (a path or an abstract `@name`); and the shipped unit uses it.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use testkit::{Slapd, SlapdOptions};

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

/// Kills the proxy if the test fails half-way.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next datagram on `sock` (at most 20 s), as text.
fn next_state(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Runs the proxy with NOTIFY_SOCKET=`notify_env` in front of `slapd`,
/// listening on an ldapi socket, and checks the two notifications.
async fn serve_notifies(slapd: &Slapd, sock: &UnixDatagram, notify_env: &str) {
    let dir = tempfile::tempdir().unwrap();
    let listen = dir.path().join("abp.sock");
    let listen_url = format!("ldapi://{}", listen.display());
    // As ldapsearch wants it: the path percent-encoded.
    let client_url = format!(
        "ldapi://{}",
        listen.display().to_string().replace('/', "%2F")
    );
    let child = Command::new(BIN)
        .args(["serve", "--listen", &listen_url, "--upstream", &slapd.url()])
        .env("NOTIFY_SOCKET", notify_env)
        .env("ABPROXY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let child = &mut child.0;

    let state = tokio::task::block_in_place(|| next_state(sock));
    assert_eq!(state, "READY=1");
    // At READY the listener is there and serves: no retry, no wait.
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &client_url,
            "-b",
            "",
            "-s",
            "base",
            "namingContexts",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("namingContexts: dc=example,dc=org"),
        "{out:?}"
    );
    // Nothing else was sent meanwhile.
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        sock.recv(&mut buf).is_err(),
        "one notification before SIGTERM"
    );
    sock.set_nonblocking(false).unwrap();

    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let state = tokio::task::block_in_place(|| next_state(sock));
    assert_eq!(state, "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sends_ready_and_stopping_to_notify_socket() {
    let slapd = start_slapd(SlapdOptions::default()).await;

    // A path, as systemd passes it (/run/systemd/notify).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    serve_notifies(&slapd, &sock, path.to_str().unwrap()).await;

    // An abstract name, as systemd-run --user and containers pass it.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("abproxy-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    serve_notifies(&slapd, &sock, &format!("@{name}")).await;
}

#[test]
fn the_unit_is_type_notify() {
    let unit = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/abproxy.service"
    ));
    let service: Vec<&str> = unit
        .lines()
        .skip_while(|l| *l != "[Service]")
        .take_while(|l| !l.starts_with("[Install]"))
        .collect();
    assert!(service.contains(&"Type=notify"), "{unit}");
    assert!(
        !service.iter().any(|l| l.starts_with("NotifyAccess=")),
        "only the main process notifies (the default NotifyAccess=main)"
    );
}
