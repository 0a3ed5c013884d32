//! Why a session ended, typed by the side it happened on.

use std::time::Duration;

/// The side of a session something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Client,
    Upstream,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "server",
        }
    }
}

/// Where an I/O error ended a session: reading or writing which side, or
/// the session's own task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IoAt {
    Read(Side),
    Write(Side),
    /// The responses task itself failed (a panic).
    Task,
}

impl IoAt {
    pub(super) fn describe(self) -> &'static str {
        match self {
            IoAt::Read(Side::Client) => "reading from client",
            IoAt::Read(Side::Upstream) => "reading from upstream",
            IoAt::Write(Side::Client) => "writing to client",
            IoAt::Write(Side::Upstream) => "writing to upstream",
            IoAt::Task => "responses task failed",
        }
    }
}

/// Why a session ended, for the close log line.
#[derive(Debug)]
pub(super) enum End {
    ClientClosed,
    Unbind,
    Shutdown,
    UpstreamClosed,
    ClientProtocol(String),
    UpstreamProtocol(String),
    SaslLayer(Side),
    Tls(String),
    /// TLS with the LDAP server failed for a client that has TLS
    /// (`tls.upstream_mirror`).
    UpstreamTls(String),
    Io(IoAt, std::io::Error),
    Idle(Duration),
    /// The upstream connection closed during a stop freeze and the session
    /// could not be carried to a new one: why.
    NotCarried(String),
    /// The journal could not record a write's outcome: its response was
    /// not forwarded.
    Journal(String),
    Closed,
}

impl End {
    pub(super) fn describe(&self) -> String {
        match self {
            End::ClientClosed => "client closed the connection".into(),
            End::Unbind => "client unbound".into(),
            End::Shutdown => "proxy shutting down".into(),
            End::Idle(d) => format!("idle for {} s (idle_timeout_secs)", d.as_secs()),
            End::UpstreamClosed => "upstream closed the connection".into(),
            End::ClientProtocol(m) => format!("client protocol error: {m}"),
            End::UpstreamProtocol(m) => format!("upstream protocol error: {m}"),
            End::SaslLayer(side) => format!(
                "{} sent non-LDAP bytes after a successful SASL bind: a SASL security layer \
                 (integrity/confidentiality) was negotiated, which abproxy cannot inspect; use \
                 TLS instead of a SASL layer (e.g. maxssf=0)",
                side.name()
            ),
            End::Tls(m) => format!("StartTLS: {m}"),
            End::UpstreamTls(m) => m.clone(),
            End::Io(at, e) => format!("{}: {e}", at.describe()),
            End::Closed => "closed by the other side of the session".into(),
            End::NotCarried(why) => format!("not carried to a new upstream connection: {why}"),
            End::Journal(why) => format!("the journal could not record a write's outcome: {why}"),
        }
    }
}

/// A request reusing the message ID of an outstanding one: the session ends
/// with a protocolError notice (what is still running upstream is still
/// waited for: see `Responses::linger`).
pub(super) fn reused_id(msgid: i32) -> End {
    End::ClientProtocol(format!(
        "message ID {msgid} reused while the request with that ID is outstanding, or \
         abandoned and perhaps still answered (RFC 4511 section 4.1.1.1)"
    ))
}
