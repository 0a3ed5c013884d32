//! The listener side: bind every configured listener, accept clients, run one
//! [`session`] per client, and shut down gracefully.

pub mod discover;
pub mod exops;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod pool;
pub mod runtime;
pub mod session;

pub use runtime::runtime;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, DriverSettings, Settings};
use crate::endpoint::{self, BoxRead, BoxWrite, Endpoint};
use crate::freeze::drivers::ds389::Ds389Driver;
use crate::freeze::drivers::openldap::OpenLdapDriver;
use crate::freeze::drivers::recorded::Recorded;
use crate::freeze::drivers::CommandDriver;
use crate::freeze::state::StateFile;
use crate::freeze::{Driver, Engine};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::tls::{ClientSecurity, Mirror, ServerTls, UpstreamTls};
use metrics::{ProxyMetrics, Refusal};

/// What every session of one proxy shares.
#[derive(Debug)]
pub struct Shared {
    /// The settings it was started with.
    pub settings: Settings,
    /// The freeze engine.
    pub engine: Arc<Engine>,
    /// Client-facing TLS (`ldaps://` listeners, StartTLS), when configured.
    pub server_tls: Option<Arc<ServerTls>>,
    /// How to reach a TLS upstream (`ldaps://` or `upstream_starttls`).
    pub upstream_tls: Option<Arc<UpstreamTls>>,
    /// `tls.upstream_mirror`: each session's upstream connection takes its
    /// client's security.
    pub mirror: Option<Arc<Mirror>>,
    /// Open client connections against their limits.
    pub limits: Arc<limits::ConnLimits>,
    /// Tasks other than sessions that shutdown waits for: Allow-Backup
    /// requests (which outlive the request loop that read them), the TLS
    /// file watcher.
    pub tasks: TaskTracker,
    /// What identifies the upstream's data, to tell a server that comes
    /// back different after a restart.
    pub(crate) prints: session::print::Prints,
    /// The roll-forward journal, when on.
    pub journal: Option<Arc<Journal>>,
    /// The proxy's counters, when the metrics endpoint is on.
    pub metrics: Option<Arc<ProxyMetrics>>,
    /// Where the sessions run.
    pub(crate) pools: pool::Pools,
    next_conn: AtomicU64,
}

impl Shared {
    /// Why a client's SASL EXTERNAL bind would authenticate the proxy
    /// instead of the client, if it would: over `ldapi://` the server takes
    /// the proxy's uid, over TLS with `upstream_cert_file` its certificate.
    pub(crate) fn external_is_the_proxy(&self) -> Option<&'static str> {
        if matches!(self.settings.upstream, Endpoint::Unix(_)) {
            return Some(
                "the upstream is ldapi://, where the server would authenticate EXTERNAL as \
                 abproxy's own uid",
            );
        }
        if (self.upstream_tls.is_some() || self.mirror.is_some())
            && self.settings.tls.upstream_cert_file.is_some()
        {
            return Some(
                "abproxy presents its own client certificate to the upstream, which the \
                 server would authenticate EXTERNAL as",
            );
        }
        None
    }

    /// What the sessions of a proxy with these settings share (no TLS:
    /// `Server::bind` adds it).
    pub(crate) fn new(settings: Settings, engine: Arc<Engine>) -> Shared {
        let limits = Arc::new(limits::ConnLimits::new(
            settings.limits.max_connections,
            settings.limits.max_connections_per_source,
        ));
        let pools = pool::Pools::new(settings.session_tasks_per_thread);
        Shared {
            settings,
            engine,
            server_tls: None,
            upstream_tls: None,
            mirror: None,
            limits,
            tasks: TaskTracker::new(),
            prints: Default::default(),
            journal: None,
            metrics: None,
            pools,
            next_conn: AtomicU64::new(1),
        }
    }

    /// A new connection to the upstream, with TLS when configured.
    pub async fn connect_upstream(&self) -> std::io::Result<(BoxRead, BoxWrite)> {
        crate::tls::connect_upstream(&self.settings.upstream, self.upstream_tls.as_deref()).await
    }

    /// A new upstream connection for a session whose client has this
    /// security: with `upstream_mirror` as secure as the client's (and,
    /// for a clear client, a stream its StartTLS can upgrade), else as
    /// [`Shared::connect_upstream`].
    pub(crate) async fn connect_session_upstream(
        &self,
        client: ClientSecurity,
    ) -> std::io::Result<(BoxRead, BoxWrite, Option<crate::tls::UpstreamStream>)> {
        match &self.mirror {
            Some(m) => m.connect(client).await,
            None => {
                let (r, w) = self.connect_upstream().await?;
                Ok((r, w, None))
            }
        }
    }
}

/// An accepted client connection, before any TLS.
pub(crate) enum Incoming {
    /// From an `ldap://` (`ldaps == false`) or `ldaps://` listener.
    Tcp(TcpStream, bool),
    Unix(UnixStream),
}

impl Incoming {
    /// The halves of a clear connection (`None` for `ldaps://`).
    fn into_clear_halves(self) -> Option<(BoxRead, BoxWrite)> {
        match self {
            Incoming::Tcp(_, true) => None,
            Incoming::Tcp(s, false) => Some(endpoint::tcp_halves(s)),
            Incoming::Unix(s) => Some(endpoint::unix_halves(s)),
        }
    }
}

enum Listener {
    /// `ldap://` or, with `true`, `ldaps://`.
    Tcp(TcpListener, bool),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// A new client: the connection, a name for logs and, on a unix socket,
    /// its credentials (uid, gid).
    async fn accept(&self) -> std::io::Result<(Incoming, String, Option<(u32, u32)>)> {
        match self {
            Listener::Tcp(l, ldaps) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Incoming::Tcp(s, *ldaps), peer.to_string(), None))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred().ok().map(|c| (c.uid(), c.gid()));
                let peer = match cred {
                    Some((uid, _)) => format!("ldapi:{} uid={uid}", path.display()),
                    None => format!("ldapi:{}", path.display()),
                };
                Ok((Incoming::Unix(s), peer, cred))
            }
        }
    }

    fn endpoint(&self) -> Endpoint {
        match self {
            Listener::Tcp(l, ldaps) => {
                let a = l
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "?".into());
                if *ldaps {
                    Endpoint::Tls(a)
                } else {
                    Endpoint::Tcp(a)
                }
            }
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A proxy with its listeners bound, ready to [`run`](Server::run).
pub struct Server {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    /// The metrics endpoint, bound, when on.
    metrics: Option<(tokio::net::TcpListener, Arc<Metrics>)>,
}

/// What `/healthz` and `/readyz` see of a running proxy.
struct Health {
    shared: Arc<Shared>,
    /// The accept loops run (cleared at shutdown).
    accepting: Arc<AtomicBool>,
}

impl crate::metrics::Health for Health {
    fn ready(&self) -> Result<(), String> {
        match self.accepting.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err("not accepting clients: abproxy is shutting down".into()),
        }
    }

    fn healthy(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.ready()?;
            let upstream = &self.shared.settings.upstream;
            let deadline = crate::metrics::HEALTH_UPSTREAM_DEADLINE;
            match tokio::time::timeout(deadline, self.shared.connect_upstream()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("the LDAP server {upstream} is not reachable: {e}")),
                Err(_) => Err(format!(
                    "the LDAP server {upstream} did not accept a connection within {} s",
                    deadline.as_secs()
                )),
            }
        })
    }
}

impl Server {
    /// Binds every listener of `settings` (see [`Config::settings`]). An upstream
    /// that cannot be reached now is only a warning: each client connection
    /// tries again.
    pub async fn bind(settings: Settings) -> anyhow::Result<Server> {
        let upstream = settings.upstream.clone();
        let server_tls = ServerTls::load(&settings.tls).map_err(|e| anyhow::anyhow!("{e}"))?;
        let upstream_tls = UpstreamTls::load(&settings.tls, &upstream)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map(Arc::new);
        let mirror = Mirror::load(&settings.tls, &upstream)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map(Arc::new);
        let mut listeners = Vec::new();
        for ep in &settings.listen {
            let l = match ep {
                Endpoint::Tcp(addr) | Endpoint::Tls(addr) => Listener::Tcp(
                    TcpListener::bind(addr.as_str())
                        .await
                        .with_context(|| format!("cannot listen on {ep}"))?,
                    matches!(ep, Endpoint::Tls(_)),
                ),
                Endpoint::Unix(path) => {
                    // A stale socket from a previous run would make bind fail;
                    // refuse to remove anything that is not a socket.
                    if let Ok(meta) = std::fs::symlink_metadata(path) {
                        use std::os::unix::fs::FileTypeExt;
                        if meta.file_type().is_socket() {
                            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                                anyhow::bail!("cannot listen on {ep}: another server is using it");
                            }
                            std::fs::remove_file(path).ok();
                        } else {
                            anyhow::bail!("cannot listen on {ep}: path exists and is not a socket");
                        }
                    }
                    Listener::Unix(
                        UnixListener::bind(path)
                            .with_context(|| format!("cannot listen on {ep}"))?,
                        path.clone(),
                    )
                }
            };
            info!(listen = %l.endpoint(), "listening");
            listeners.push(l);
        }
        let map = settings.backend_map.clone();
        let auto_backends = map.is_empty();
        let probe = crate::tls::connect_upstream(&upstream, upstream_tls.as_deref());
        match tokio::time::timeout(settings.upstream_connect_timeout, probe).await {
            Ok(Ok(_)) => info!(%upstream, "upstream reachable"),
            Ok(Err(e)) => {
                warn!(%upstream, "upstream not reachable at start-up (will retry per connection): {e}")
            }
            Err(_) => {
                warn!(%upstream, "upstream connect timed out at start-up (will retry per connection)")
            }
        }
        // The engine first, so that the root DSE read can tell it whether
        // binds are writes; the backends it finds replace the empty map.
        let engine = Arc::new(Engine::new(settings.freeze.clone(), map));
        engine.set_discovery(
            Arc::new(discover::Upstream {
                endpoint: upstream.clone(),
                tls: upstream_tls.clone(),
                timeout: settings.upstream_connect_timeout,
            }),
            auto_backends,
            settings.upstream_retry,
        );
        engine.refresh(true).await;
        let map = engine.backends();
        let suffixes: Vec<_> = map
            .backends()
            .iter()
            .map(|b| format!("{} ({:?})", b.suffix, b.mode))
            .collect();
        info!(backends = ?suffixes, auto = auto_backends, "backends");
        for w in engine.operator_bind_warnings() {
            warn!("{w}");
        }
        // Under systemd with StateDirectory=, $STATE_DIRECTORY names it.
        let state_path = settings.state_file.clone().or_else(|| {
            let dirs = std::env::var_os("STATE_DIRECTORY")?;
            let first = std::env::split_paths(&dirs).next()?;
            Some(first.join("state.json"))
        });
        let state = match &state_path {
            Some(path) => {
                info!(state_file = %path.display(), "driver state file");
                StateFile::open(path).map_err(anyhow::Error::msg)?
            }
            None => {
                if settings
                    .backends
                    .iter()
                    .any(|b| !matches!(b.driver, DriverSettings::None))
                {
                    warn!("no state_file configured: if abproxy is killed while a backend driver has a backend prepared for a backup, the next start cannot undo it");
                }
                StateFile::memory()
            }
        };
        let mut recorded = Vec::new();
        for b in &settings.backends {
            let (name, driver): (&'static str, Arc<dyn Driver>) = match &b.driver {
                DriverSettings::None => continue,
                DriverSettings::Command { prepare, done } => (
                    "command",
                    Arc::new(CommandDriver::new(prepare.clone(), done.clone())),
                ),
                DriverSettings::Openldap(c) => (
                    "openldap",
                    Arc::new(OpenLdapDriver::new(c.url.clone(), c.bind.clone())),
                ),
                DriverSettings::Ds389(c) => (
                    "389ds",
                    Arc::new(Ds389Driver::new(c.url.clone(), c.bind.clone())),
                ),
            };
            driver.attach_state(state.clone(), name);
            let driver = Arc::new(Recorded::new(name, driver, state.clone()));
            let deadline = b.deadline;
            engine.set_driver(&b.suffix, driver.clone(), deadline);
            recorded.push((driver, deadline));
        }
        // Undo what a previous run's drivers left (it was killed while frozen).
        let configured = settings.backend_map.backends().to_vec();
        for (d, deadline) in &recorded {
            d.recover(&configured, *deadline).await;
        }
        for e in state.entries() {
            error!(
                backend = %e.suffix,
                driver = %e.driver,
                freeze_id = e.freeze_id,
                "a previous run left this backend prepared for a backup and it is still not undone (driver not configured for it any more, or its DONE failed): undo it by hand, then remove the entry from the state file"
            );
        }
        let journal = match &settings.journal {
            Some(j) => {
                let journal = Journal::open(j)?;
                engine.set_cut_log(journal.clone());
                Some(journal)
            }
            None => None,
        };
        let mut metrics = None;
        let mut proxy_metrics = None;
        if let Some(addr) = settings.metrics_listen {
            let l = crate::metrics::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics)"))?;
            let p = Arc::new(ProxyMetrics::new(
                listeners.iter().map(|l| l.endpoint().url()),
            ));
            let mut m = Metrics::new();
            m.register(p.clone());
            m.register(crate::metrics::collect::Freeze(engine.clone()));
            if let Some(j) = &journal {
                m.register(crate::metrics::collect::JournalCollector(j.clone()));
            }
            proxy_metrics = Some(p);
            metrics = Some((l, Arc::new(m)));
        }
        let shared = Arc::new(Shared {
            server_tls,
            upstream_tls,
            mirror,
            journal,
            metrics: proxy_metrics,
            ..Shared::new(settings, engine)
        });
        if shared.settings.carry_sessions {
            // Before the first client: what a server that comes back after
            // a restart is compared with.
            session::learn_server_print(shared.clone()).await;
        }
        Ok(Server {
            listeners,
            shared,
            metrics,
        })
    }

    /// Where the metrics endpoint listens (with the real port when 0 was
    /// asked for), when on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The client-facing TLS settings, for reloading on SIGHUP (`None`:
    /// no certificate configured).
    pub fn server_tls(&self) -> Option<Arc<ServerTls>> {
        self.shared.server_tls.clone()
    }

    /// The bound listeners (with the real port when 0 was asked for).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.listeners.iter().map(Listener::endpoint).collect()
    }

    /// Accepts clients until `shutdown` completes, then stops accepting, lets
    /// in-flight operations finish for up to the configured grace period,
    /// sends each remaining client a Notice of Disconnection and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let tasks = &self.shared.tasks;
        if let Some(tls) = &self.shared.server_tls {
            tasks.spawn(tls.clone().watch(stop.clone()));
        }
        let accepting = Arc::new(AtomicBool::new(true));
        let metrics_stop = CancellationToken::new();
        let endpoint = self.metrics.map(|(listener, metrics)| {
            let health = Arc::new(Health {
                shared: self.shared.clone(),
                accepting: accepting.clone(),
            });
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics,
                health,
                crate::metrics::Limits::default(),
                metrics_stop.clone(),
            ))
        });
        let mut acceptors = Vec::new();
        let listeners: Vec<Arc<Listener>> = self.listeners.into_iter().map(Arc::new).collect();
        for (i, l) in listeners.iter().enumerate() {
            acceptors.push(tokio::spawn(accept_loop(
                i,
                l.clone(),
                self.shared.clone(),
                tracker.clone(),
                stop.clone(),
                abort.clone(),
            )));
        }
        shutdown.await;
        let grace = self.shared.settings.shutdown_grace;
        info!(
            sessions = tracker.len(),
            grace_s = grace.as_secs(),
            "shutting down: no new connections, waiting for in-flight operations"
        );
        accepting.store(false, Ordering::Relaxed);
        stop.cancel();
        self.shared.engine.shutdown_sessions();
        for a in acceptors {
            let _ = a.await;
        }
        drop(listeners);
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                sessions = tracker.len(),
                "grace period over: closing remaining sessions"
            );
            abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        // An Allow-Backup request still running finishes its steps (each
        // bounded by its driver's deadline), so that the freeze ends below.
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!(
                tasks = tasks.len(),
                "grace period over: an Allow-Backup request is still running"
            );
        }
        self.shared.engine.end_at_shutdown().await;
        if let Some(j) = &self.shared.journal {
            j.close();
        }
        metrics_stop.cancel();
        if let Some(e) = endpoint {
            let _ = e.await;
        }
        info!("stopped");
        Ok(())
    }
}

async fn accept_loop(
    index: usize,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((incoming, peer, cred)) => {
                backoff = Duration::from_millis(10);
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let source = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
                let metrics = shared.metrics.clone();
                if let Some(m) = &metrics {
                    m.accepted(index);
                }
                match shared.limits.admit(source) {
                    Ok(admitted) => {
                        if let Some(m) = &metrics {
                            m.open(index, true);
                        }
                        let seat = shared.pools.seat();
                        let place = seat.place();
                        let session = session::serve(
                            id,
                            peer,
                            cred,
                            incoming,
                            shared.clone(),
                            stop.clone(),
                            abort.clone(),
                            place.clone(),
                        );
                        place.spawn(tracker.track_future(async move {
                            session.await;
                            drop((admitted, seat));
                            if let Some(m) = &metrics {
                                m.open(index, false);
                            }
                        }));
                    }
                    Err(why) => {
                        if let Some(m) = &metrics {
                            m.refused(match why {
                                limits::Refused::Total(_) => Refusal::Limit,
                                limits::Refused::Source(..) => Refusal::Source,
                            });
                        }
                        warn!(conn = id, %peer, "connection refused: {why}");
                        // An ldaps:// client could not read a notice before
                        // a handshake, which an overload should not pay for:
                        // it is just closed.
                        if let Some((r, w)) = incoming.into_clear_halves() {
                            tracker.spawn(session::refuse_connection(r, w, why.to_string()));
                        }
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: back off, never stop listening.
                error!(listen = %listener.endpoint(), "accept failed: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A proxy running on the current tokio runtime (for tests, the demo and
/// benchmarks).
pub struct ProxyHandle {
    endpoints: Vec<Endpoint>,
    metrics_addr: Option<SocketAddr>,
    engine: Arc<Engine>,
    limits: Arc<limits::ConnLimits>,
    server_tls: Option<Arc<ServerTls>>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ProxyHandle {
    /// Binds and starts a proxy in a background task.
    pub async fn spawn(config: Config) -> anyhow::Result<ProxyHandle> {
        let server = Server::bind(config.settings()?).await?;
        let endpoints = server.endpoints();
        let metrics_addr = server.metrics_addr();
        let engine = server.shared.engine.clone();
        let limits = server.shared.limits.clone();
        let server_tls = server.server_tls();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { server.run(s.cancelled_owned()).await });
        Ok(ProxyHandle {
            endpoints,
            metrics_addr,
            engine,
            limits,
            server_tls,
            stop,
            task,
        })
    }

    /// The listeners, in configuration order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Where the metrics endpoint listens, when on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The proxy's freeze engine.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Client connections open now (what `max_connections` counts): a
    /// session's place is free once this has gone down.
    pub fn open_connections(&self) -> usize {
        self.limits.open()
    }

    /// Re-reads the TLS certificate and key, as SIGHUP does.
    pub fn reload_tls(&self) -> Result<(), String> {
        match &self.server_tls {
            Some(t) => t.reload(),
            None => Err("no TLS certificate configured".into()),
        }
    }

    /// URL of the first listener.
    pub fn url(&self) -> String {
        self.endpoints[0].url()
    }

    /// Graceful shutdown, as on SIGTERM; returns when the proxy has stopped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}
