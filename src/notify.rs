//! systemd's readiness protocol (`Type=notify`), without libsystemd: one
//! datagram per state change to the unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name written with a leading `@`).
//!
//! `abproxy serve` sends `READY=1` once its listeners are bound (clients
//! connecting from then on are accepted) and `STOPPING=1` when SIGTERM or
//! SIGINT starts the graceful shutdown. Without `$NOTIFY_SOCKET` (not
//! started by systemd) nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where `$NOTIFY_SOCKET` points: None when the variable is unset or empty.
pub fn socket_addr(value: Option<&str>) -> io::Result<Option<SocketAddr>> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Some(name) = v.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name.as_bytes()).map(Some);
    }
    if !v.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET}={v}: neither an absolute path nor an @abstract name"),
        ));
    }
    SocketAddr::from_pathname(v).map(Some)
}

/// Sends `state` (e.g. `READY=1`) to `$NOTIFY_SOCKET`; Ok(false) when the
/// variable is not set.
pub fn notify(state: &str) -> io::Result<bool> {
    let value = std::env::var(NOTIFY_SOCKET).ok();
    let Some(addr) = socket_addr(value.as_deref())? else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// [`notify`], with a failure logged as a warning (systemd then reports the
/// start-up as timed out, which the log line explains).
pub fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "sent to $NOTIFY_SOCKET"),
        Ok(false) => {}
        Err(e) => tracing::warn!(state, "cannot notify $NOTIFY_SOCKET: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_is_nothing() {
        assert!(socket_addr(None).unwrap().is_none());
        assert!(socket_addr(Some("")).unwrap().is_none());
    }

    #[test]
    fn paths_and_abstract_names() {
        let a = socket_addr(Some("/run/systemd/notify")).unwrap().unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        use std::os::linux::net::SocketAddrExt;
        let a = socket_addr(Some("@abp/notify")).unwrap().unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"abp/notify"[..]));
        assert!(socket_addr(Some("relative/path")).is_err());
    }
}
