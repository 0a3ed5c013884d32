//! A fault-injecting TCP shim between the proxy and a real slapd (loopback
//! only). It forwards whole LDAPMessages both ways, unchanged, and can stall
//! the responses, delay them, refuse new connections or cut every open one.
//! It counts requests and final responses, so a test can see how many
//! requests the proxy had outstanding at most.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abproxy::wire::{op, Envelope, FrameCodec};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_util::codec::FramedRead;

#[derive(Default)]
pub struct Counters {
    /// Requests forwarded that expect a response (not abandon or unbind).
    pub requests: AtomicUsize,
    /// Final responses forwarded.
    pub finals: AtomicUsize,
    /// Most requests outstanding at once (over all connections).
    pub max_outstanding: AtomicUsize,
    /// Connections accepted and forwarded.
    pub accepted: AtomicUsize,
    /// Connections open now.
    pub open: AtomicUsize,
    /// Request bytes from the proxy that are not a whole LDAPMessage whose
    /// envelope reads (what the proxy must never forward).
    pub malformed: AtomicUsize,
}

pub struct Shim {
    pub addr: String,
    pub counters: Arc<Counters>,
    stall: watch::Sender<bool>,
    refuse: Arc<AtomicBool>,
    delay: Arc<Mutex<Duration>>,
    kill: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Shim {
    /// A shim on a free loopback port forwarding to `upstream` (HOST:PORT).
    pub async fn start(upstream: &str) -> Shim {
        Self::start_observed(upstream, Arc::new(|_: &[u8]| {})).await
    }

    /// The same, calling `observe` with every request frame, in the order
    /// the server receives them (per connection).
    pub async fn start_observed(upstream: &str, observe: Observer) -> Shim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let counters = Arc::new(Counters::default());
        let (stall, stall_rx) = watch::channel(false);
        let refuse = Arc::new(AtomicBool::new(false));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let kill = Arc::new(Notify::new());
        let upstream = upstream.to_string();
        let task = {
            let (counters, refuse, delay, kill) = (
                counters.clone(),
                refuse.clone(),
                delay.clone(),
                kill.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if refuse.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    counters.accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(pipe(
                        client,
                        server,
                        observe.clone(),
                        counters.clone(),
                        stall_rx.clone(),
                        delay.clone(),
                        kill.clone(),
                    ));
                }
            })
        };
        Shim {
            addr,
            counters,
            stall,
            refuse,
            delay,
            kill,
            task,
        }
    }

    /// `ldap://` URL of the shim.
    pub fn url(&self) -> String {
        format!("ldap://{}", self.addr)
    }

    /// Holds (true) or releases (false) every response.
    pub fn stall_responses(&self, on: bool) {
        self.stall.send_replace(on);
    }

    /// Delays each response by `d`.
    pub fn delay_responses(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    /// New connections are accepted and closed at once (true), or served.
    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }

    /// Cuts every open connection (both sides), as a server crash would.
    pub fn kill_all(&self) {
        self.kill.notify_waiters();
    }

    pub fn outstanding(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst) - self.counters.finals.load(Ordering::SeqCst)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.task.abort();
        self.kill_all();
    }
}

/// Sees each request frame the shim forwards.
pub type Observer = Arc<dyn Fn(&[u8]) + Send + Sync>;

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    observe: Observer,
    c: Arc<Counters>,
    mut stall: watch::Receiver<bool>,
    delay: Arc<Mutex<Duration>>,
    kill: Arc<Notify>,
) {
    c.open.fetch_add(1, Ordering::SeqCst);
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let mut requests = FramedRead::new(cr, FrameCodec::new(1 << 30));
    let mut responses = FramedRead::new(sr, FrameCodec::new(1 << 30));
    let up = async {
        while let Some(next) = requests.next().await {
            let Ok(f) = next else {
                c.malformed.fetch_add(1, Ordering::SeqCst);
                break;
            };
            let Ok(env) = Envelope::request(&f) else {
                c.malformed.fetch_add(1, Ordering::SeqCst);
                break;
            };
            observe(&f);
            let expects_answer = env.op != op::UNBIND_REQUEST && env.op != op::ABANDON_REQUEST;
            if expects_answer {
                let n = c.requests.fetch_add(1, Ordering::SeqCst) + 1;
                let out = n - c.finals.load(Ordering::SeqCst);
                c.max_outstanding.fetch_max(out, Ordering::SeqCst);
            }
            if sw.write_all(&f).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async {
        while let Some(Ok(f)) = responses.next().await {
            let _ = stall.wait_for(|s| !s).await;
            let d = *delay.lock().unwrap();
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            if Envelope::response(&f).is_ok_and(|e| op::is_final_response(e.op)) {
                c.finals.fetch_add(1, Ordering::SeqCst);
            }
            if cw.write_all(&f).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    let killed = kill.notified();
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = killed => {}
    }
    c.open.fetch_sub(1, Ordering::SeqCst);
}
