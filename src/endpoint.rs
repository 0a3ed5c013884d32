//! Where to listen or connect: `ldap://HOST:PORT` (TCP), `ldaps://HOST:PORT`
//! (TCP with TLS, see [`crate::tls`]) or `ldapi://PATH` (unix socket), and
//! the boxed byte streams they turn into.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Read half of a client or upstream connection.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// Write half of a client or upstream connection.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The boxed halves of a TCP connection (see [`Unvectored`] for the writes).
pub fn tcp_halves(s: TcpStream) -> (BoxRead, BoxWrite) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(Unvectored(w)))
}

/// The boxed halves of a unix-socket connection.
pub fn unix_halves(s: UnixStream) -> (BoxRead, BoxWrite) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(Unvectored(w)))
}

/// A socket write half that declines vectored writes, so the codecs'
/// one-buffer flushes go out with send(2)/write(2) instead of writev(2)
/// with a single iovec: the kernel then skips copying and checking an iovec
/// array, which is measurable at one write per LDAP message (`cargo bench
/// --bench load`, proxy CPU per operation).
///
/// A write first tries the socket as it is (`try_write`: the readiness the
/// runtime already knows, then the system call), and only when that would
/// block goes through `poll_write`, which registers the task's waker. The
/// same system call either way; the usual write, to a socket with room,
/// skips the runtime's cooperative budget and its readiness future (about a
/// hundred instructions per LDAP operation at two writes each, callgrind).
struct Unvectored<W>(W);

/// A write half that can write without a task context.
trait TryWrite {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

impl TryWrite for tokio::net::tcp::OwnedWriteHalf {
    #[inline]
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write(self, buf)
    }
}

impl TryWrite for tokio::net::unix::OwnedWriteHalf {
    #[inline]
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write(self, buf)
    }
}

impl<W: AsyncWrite + TryWrite + Unpin> AsyncWrite for Unvectored<W> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.0.try_write(buf) {
            // (A would-block cleared the readiness: the poll registers the
            // waker, or finds the socket writable again meanwhile.)
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Pin::new(&mut self.0).poll_write(cx, buf)
            }
            r => Poll::Ready(r),
        }
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A TCP or unix-socket LDAP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `ldap://host:port` (port 389 when absent).
    Tcp(String),
    /// `ldapi://path`.
    Unix(PathBuf),
    /// `ldaps://host:port` (port 636 when absent): TLS from the first byte.
    Tls(String),
}

impl Endpoint {
    /// Parses an LDAP URL.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let lower = url.to_ascii_lowercase();
        let tcp = if lower.starts_with("ldap://") {
            Some((&url[7..], 389))
        } else if lower.starts_with("ldaps://") {
            Some((&url[8..], 636))
        } else {
            None
        };
        if let Some((rest, default_port)) = tcp {
            let hostport = rest.split('/').next().unwrap_or("");
            if hostport.is_empty() {
                return Err(format!("{url}: missing host"));
            }
            let hostport = if hostport.starts_with('[') {
                // [v6]:port or [v6]
                if hostport.ends_with(']') {
                    format!("{hostport}:{default_port}")
                } else {
                    hostport.to_string()
                }
            } else if hostport.contains(':') {
                hostport.to_string()
            } else {
                format!("{hostport}:{default_port}")
            };
            let port = hostport.rsplit(':').next().unwrap_or("");
            port.parse::<u16>()
                .map_err(|_| format!("{url}: bad port {port:?}"))?;
            Ok(if default_port == 636 {
                Endpoint::Tls(hostport)
            } else {
                Endpoint::Tcp(hostport)
            })
        } else if lower.starts_with("ldapi://") {
            let rest = &url[8..];
            let path = if rest.starts_with('/') {
                rest.trim_end_matches('/').to_string()
            } else {
                percent_decode(rest.trim_end_matches('/'))
                    .ok_or_else(|| format!("{url}: bad percent-encoding"))?
            };
            if !path.starts_with('/') {
                return Err(format!("{url}: ldapi path must be absolute"));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else {
            Err(format!(
                "{url}: expected ldap://HOST:PORT, ldaps://HOST:PORT or ldapi://PATH"
            ))
        }
    }

    /// Opens a clear connection, split into boxed halves; TCP gets
    /// TCP_NODELAY. `ldaps://` needs TLS settings: see
    /// [`crate::tls::connect_upstream`].
    pub async fn connect(&self) -> std::io::Result<(BoxRead, BoxWrite)> {
        match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str()).await?;
                s.set_nodelay(true)?;
                Ok(tcp_halves(s))
            }
            Endpoint::Unix(path) => Ok(unix_halves(UnixStream::connect(path).await?)),
            Endpoint::Tls(_) => Err(std::io::Error::other(format!(
                "{self}: ldaps:// needs the proxy's TLS settings"
            ))),
        }
    }

    /// The URL form, `ldap://HOST:PORT` or `ldapi://%2F...`.
    pub fn url(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "ldap://{a}"),
            Endpoint::Tls(a) => write!(f, "ldaps://{a}"),
            Endpoint::Unix(p) => {
                write!(f, "ldapi://")?;
                for b in p.as_os_str().as_encoded_bytes() {
                    match b {
                        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                            write!(f, "{}", *b as char)?
                        }
                        _ => write!(f, "%{b:02X}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldap_and_ldapi_urls() {
        assert_eq!(
            Endpoint::parse("ldap://127.0.0.1:3389").unwrap(),
            Endpoint::Tcp("127.0.0.1:3389".into())
        );
        assert_eq!(
            Endpoint::parse("LDAP://localhost/").unwrap(),
            Endpoint::Tcp("localhost:389".into())
        );
        assert_eq!(
            Endpoint::parse("ldap://[::1]:1389").unwrap(),
            Endpoint::Tcp("[::1]:1389".into())
        );
        let u = Endpoint::parse("ldapi://%2Ftmp%2Fa%20b%2Fldapi").unwrap();
        assert_eq!(u, Endpoint::Unix("/tmp/a b/ldapi".into()));
        assert_eq!(u.to_string(), "ldapi://%2Ftmp%2Fa%20b%2Fldapi");
        assert_eq!(Endpoint::parse(&u.to_string()).unwrap(), u);
        assert_eq!(
            Endpoint::parse("ldaps://localhost").unwrap(),
            Endpoint::Tls("localhost:636".into())
        );
        assert_eq!(
            Endpoint::parse("LDAPS://127.0.0.1:3636/")
                .unwrap()
                .to_string(),
            "ldaps://127.0.0.1:3636"
        );
        assert_eq!(
            Endpoint::parse("ldapi:///run/x.sock").unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
    }

    #[test]
    fn refuses_bad_urls() {
        for bad in [
            "ldap://",
            "ldap://h:99999",
            "ldap://h:x",
            "http://h",
            "ldaps://",
            "ldaps://h:x",
            "ldapi://rel%2Fpath",
            "ldapi://%zz",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
