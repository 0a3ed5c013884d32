//! Records real client traffic for the fuzz seed corpus. With
//! `ABPROXY_RECORD_DIR` set, [`Lab`](super::Lab) puts this TCP forwarder in
//! front of the proxy: it forwards both ways unchanged and appends what each
//! client sends (its first [`MAX_RECORDED`] bytes) to
//! `$ABPROXY_RECORD_DIR/<pid>-<n>.bin`.
//! `tests/it/fuzz_seeds.rs` (`import_recorded_seeds`) turns the files into
//! seeds. Nothing in the proxy knows about it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes recorded per connection at most.
pub const MAX_RECORDED: usize = 64 * 1024;

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct Recorder {
    pub addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    /// A recorder in front of `target` (HOST:PORT) when
    /// `ABPROXY_RECORD_DIR` is set.
    pub async fn from_env(target: &str) -> Option<Recorder> {
        let dir = PathBuf::from(std::env::var_os("ABPROXY_RECORD_DIR")?);
        std::fs::create_dir_all(&dir).ok()?;
        let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = listener.local_addr().ok()?.to_string();
        let target = target.to_string();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, dir) = (target.clone(), dir.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        forward(client, server, dir).await;
                    }
                });
            }
        });
        Some(Recorder { addr, task })
    }
}

async fn forward(client: TcpStream, server: TcpStream, dir: PathBuf) {
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let path = dir.join(format!(
        "{}-{}.bin",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let up = async move {
        let mut recorded = 0;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Appended as it comes: a test may end without closing.
                    let keep = n.min(MAX_RECORDED - recorded);
                    if keep > 0 {
                        recorded += keep;
                        let file = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path);
                        if let Ok(mut f) = file {
                            let _ = std::io::Write::write_all(&mut f, &buf[..keep]);
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}
