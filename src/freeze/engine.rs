//! The freeze state machine: Allow-Backup ON (authorise, resolve backends,
//! install the freeze, drain, prepare) and OFF (done, release), the lease, the
//! admission check every request passes, and the status ([`Status`]).
//!
//! ```text
//!          ON ok          drained + prepared
//! Thawed ------> Draining -----------------> Frozen
//!    ^              | time limit with a write    | OFF, lease expiry,
//!    |              | in flight, prepare failed  | holder gone (holdUntilUnbind)
//!    +--------------+----------------------------+
//! ```
//! Admission and the in-flight insert happen under the state's read lock and
//! ON installs a freeze under its write lock, so once ON has installed its
//! freeze every request either is in some in-flight table (and the drain
//! waits for it) or meets the freeze (and is queued).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use abproxy_proto::AllowBackupRequest;
use futures::future::BoxFuture;

use super::discover::Discover;
use crate::backoff::Backoff;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::backend::{Backend, BackendMap, BackendSet, Class, ClassifyOptions, Kind, Mode};
use super::dn::NormDn;
use super::drivers::{
    run_step, with_deadline, Driver, DriverError, DriverOp, NoopDriver, Step,
    DEFAULT_DRIVER_DEADLINE,
};
use super::error::{
    BadRequest, Busy, DrainError, FreezeError, NotAuthorised, OnStage, PastFreeze, StepFailure,
    Suffixes,
};
use super::participant::{InFlight, Participant};
use super::settings::{BindIsWrite, FreezeConfig};
use super::stats::{FreezeStats, Outcome, Snapshot};
use super::status::{BackendStatus, CurrentFreeze, Phase, Status};
use crate::wire::Envelope;

/// What the engine asks a session to do.
#[derive(Debug)]
pub enum Control {
    /// Drain time limit: abandon these in-flight reads upstream and answer
    /// their clients with timeLimitExceeded.
    AbandonReads(Vec<i32>),
    /// The proxy is shutting down: stop reading, drain, say goodbye.
    Shutdown,
    /// The other half of the session ended it.
    Close,
}

/// The engine's handle on one session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Shared with the session's loops.
    pub state: Arc<Participant>,
    /// Commands to its requests loop.
    pub control: mpsc::UnboundedSender<Control>,
}

/// Who is asking (for authorisation and holdUntilUnbind).
#[derive(Debug, Clone)]
pub struct Requester {
    /// Connection number.
    pub conn: u64,
    /// Bound DN (None: anonymous or not a simple bind).
    pub bound_dn: Option<String>,
    /// (uid, gid) of a client on a unix-socket (ldapi) listener.
    pub peer_uid: Option<(u32, u32)>,
    /// Subject of the client's TLS certificate, verified against
    /// `tls.client_ca_file`.
    pub cert_subject: Option<String>,
}

impl Requester {
    /// The identity: the bound DN, else the client certificate's subject,
    /// else, on ldapi, the peer credentials in slapd's form
    /// `gidNumber=G+uidNumber=U,cn=peercred,cn=external,cn=auth`.
    fn identity(&self) -> Option<String> {
        self.bound_dn
            .clone()
            .or_else(|| self.cert_subject.clone())
            .or_else(|| {
                self.peer_uid.map(|(uid, gid)| {
                    format!("gidNumber={gid}+uidNumber={uid},cn=peercred,cn=external,cn=auth")
                })
            })
    }

    fn name(&self) -> String {
        match self.identity() {
            Some(d) => format!("{d} (conn {})", self.conn),
            None => format!("anonymous (conn {})", self.conn),
        }
    }
}

#[derive(Debug, Clone)]
struct Freeze {
    id: u64,
    phase: Phase,
    /// Frozen backends.
    backends: BackendSet,
    /// Frozen backends in stop mode.
    stop: BackendSet,
    holder: Requester,
    hold_until_unbind: bool,
    since: SystemTime,
    started: Instant,
    lease_until: Option<Instant>,
    /// Cancelled when the freeze ends (its lease timer stops with it).
    ended: CancellationToken,
    /// Sessions not carried (`carry_counts().2`) when it began: those it
    /// saw end are the difference at OFF.
    not_carried_before: usize,
}

impl Freeze {
    fn holds(&self, class: Class) -> bool {
        match class.kind {
            Kind::Never => false,
            Kind::Read => !class.backends.and(self.stop).is_empty(),
            Kind::Write => !class.backends.and(self.backends).is_empty(),
        }
    }
}

/// A backend's driver and the deadline of each of its steps.
type Installed = (Arc<dyn Driver>, Duration);

/// What an Allow-Backup request that succeeded did (its response's
/// message is this value's `Display`; its result code is success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    /// ON: the backends are frozen.
    Frozen {
        /// The freeze's id (for OFF's freezeId).
        id: u64,
        /// The frozen backends.
        backends: Suffixes,
        /// How long the drain took.
        drained: Duration,
        /// How long the freeze lasts unless released.
        lease: Duration,
        /// The journal's cut record of this freeze, when the journal is on.
        cut: Option<u64>,
    },
    /// OFF: the freeze is released.
    Released {
        /// The freeze's id.
        id: u64,
        /// How long it lasted.
        after: Duration,
        /// How many held requests it released.
        queued: usize,
        /// The server closed sessions during the freeze (it was stopped
        /// behind the proxy): whether it answers again.
        restart: Option<Restart>,
    },
    /// A plain OFF with nothing frozen.
    NotFrozen,
}

impl std::fmt::Display for Granted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Granted::Frozen {
                id,
                backends,
                drained,
                lease,
                cut,
            } => {
                write!(
                    f,
                    "frozen: {backends}; drained in {} ms; lease {} s; freeze id {id}",
                    drained.as_millis(),
                    lease.as_secs()
                )?;
                match cut {
                    Some(seq) => write!(f, "; journal cut {seq}"),
                    None => Ok(()),
                }
            }
            Granted::Released {
                id,
                after,
                queued,
                restart,
            } => {
                write!(
                    f,
                    "released after {:.1} s; {queued} queued request(s) resumed; freeze id {id}",
                    after.as_secs_f64()
                )?;
                match restart {
                    None => return Ok(()),
                    Some(r) if r.sessions == 0 && r.answers => {}
                    Some(r) if r.answers => write!(
                        f,
                        "; the server was restarted and answers again: {} session(s) go on, \
                         each on a new connection",
                        r.sessions
                    )?,
                    Some(r) => write!(
                        f,
                        "; the server was stopped during the freeze and {SERVER_NOT_BACK} \
                         (waited {:.0} s): {} session(s) wait for it, their requests \
                         answered unavailable until it does",
                        r.waited.as_secs_f64(),
                        r.sessions
                    )?,
                }
                match restart.as_ref().map_or(0, |r| r.ended) {
                    0 => Ok(()),
                    n => write!(
                        f,
                        "; {n} session(s) ended, as they could not be carried to a new \
                         connection (the proxy's log says why)"
                    ),
                }
            }
            Granted::NotFrozen => f.write_str("not frozen"),
        }
    }
}

/// How the engine reads the server about itself.
#[derive(Clone)]
struct Discovery {
    discover: Arc<dyn Discover>,
    /// The backends come from the server's `namingContexts`.
    auto_backends: bool,
    /// How long an OFF waits for a restarted server.
    retry: Duration,
}

/// What OFF found of a server that closed sessions during the freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// Sessions waiting to be carried to it.
    pub sessions: usize,
    /// It answered again (its root DSE could be read) before OFF released.
    pub answers: bool,
    /// How long OFF waited for it.
    pub waited: Duration,
    /// Sessions that ended during the freeze because they could not be
    /// carried (a SASL bind, a paged-results cookie, requests in flight,
    /// another server...; the log says why for each).
    pub ended: usize,
}

/// How many ended freezes the engine remembers (for an OFF naming one).
const ENDED_KEPT: usize = 64;

/// Why a requester may not freeze.
fn authorise(
    allowed: &[NormDn],
    allowed_uids: &[u32],
    allowed_certs: &[NormDn],
    who: &Requester,
) -> Result<(), NotAuthorised> {
    // A local client of an ldapi listener, by the uid the kernel reports.
    if let Some((uid, _)) = who.peer_uid {
        if who.bound_dn.is_none() && allowed_uids.contains(&uid) {
            return Ok(());
        }
    }
    // A TLS client by its verified certificate.
    if let Some(subject) = &who.cert_subject {
        if who.bound_dn.is_none()
            && NormDn::parse(subject.as_bytes()).is_some_and(|n| allowed_certs.contains(&n))
        {
            return Ok(());
        }
    }
    let Some(dn) = &who.bound_dn else {
        return Err(match &who.cert_subject {
            Some(s) => NotAuthorised::Certificate { subject: s.clone() },
            None => NotAuthorised::Anonymous,
        });
    };
    let norm = NormDn::parse(dn.as_bytes());
    if norm.is_some_and(|n| allowed.contains(&n)) {
        Ok(())
    } else {
        Err(NotAuthorised::Dn { dn: dn.clone() })
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The freeze engine of one proxy.
pub struct Engine {
    cfg: FreezeConfig,
    classify: ClassifyOptions,
    allowed: Vec<NormDn>,
    allowed_certs: Vec<NormDn>,
    backends: RwLock<Arc<BackendMap>>,
    drivers: RwLock<HashMap<String, Installed>>,
    state: RwLock<Option<Freeze>>,
    epoch: watch::Sender<u64>,
    sessions: Mutex<HashMap<u64, SessionHandle>>,
    draining: AtomicBool,
    completed: Notify,
    /// The id of the next accepted ON (ids of refused ONs are not used up).
    next_id: AtomicU64,
    /// The last freeze the lease ended (the next plain OFF answers that it
    /// expired): its id and how long it lasted, in seconds.
    expired: Mutex<Option<(u64, u64)>>,
    /// How the most recent freezes ended (at most [`ENDED_KEPT`]), for an
    /// OFF that names one of them.
    ended: Mutex<VecDeque<(u64, String)>>,
    queued_requests: AtomicUsize,
    queued_bytes: AtomicUsize,
    stop_frozen: AtomicBool,
    /// How the engine reads the server's root DSE before each freeze, and
    /// whether the backends come from it (none configured).
    discover: RwLock<Option<Discovery>>,
    /// Sessions whose upstream connection the server closed during a stop
    /// freeze, waiting to be carried to a new one; carried; not carried.
    carry: [AtomicUsize; 3],
    /// Where every freeze's cut is recorded (the roll-forward journal).
    journal: std::sync::OnceLock<Arc<dyn CutLog>>,
    /// What monitoring reads ([`Engine::snapshot`]).
    stats: FreezeStats,
}

/// Why a freeze ends ([`Engine::end_freeze`]), for its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Off,
    Lease,
    HolderGone,
    Shutdown,
}

/// Where the engine records each freeze's cut once its backends are
/// drained and prepared, before ON answers: the roll-forward journal
/// (`crate::journal`), kept apart so the freeze knows nothing of its files.
pub trait CutLog: Send + Sync + std::fmt::Debug {
    /// Records freeze `freeze_id` of `suffixes` durably; its position.
    fn cut<'a>(
        &'a self,
        freeze_id: u64,
        suffixes: &'a [String],
    ) -> BoxFuture<'a, Result<u64, String>>;
}

/// What OFF's answer says when a server stopped during the freeze does
/// not answer again (the operator CLI exits 7 on it).
pub const SERVER_NOT_BACK: &str = "does not answer again yet";

/// What happened to a session whose upstream connection the server closed
/// during a `stop` freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// It waits for the server to be back.
    Waiting,
    /// It goes on, on a new connection with the same identity.
    Yes,
    /// It waited, then ended: the server came back different or not at
    /// all.
    No,
    /// It waited, then its client left.
    Left,
    /// It held what cannot be carried (a SASL bind, requests in flight):
    /// it ended at once.
    Cannot,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine with these settings and backends.
    pub fn new(cfg: FreezeConfig, backends: BackendMap) -> Engine {
        let allowed = cfg
            .allowed
            .iter()
            .filter_map(|d| NormDn::parse(d.as_bytes()))
            .collect();
        let allowed_certs = cfg
            .allowed_cert_subjects
            .iter()
            .filter_map(|d| NormDn::parse(d.as_bytes()))
            .collect();
        let classify = ClassifyOptions {
            // `auto` starts as writes: until the server's root DSE says
            // otherwise, the proxy cannot tell.
            bind_is_write: (cfg.bind_is_write != BindIsWrite::No).into(),
            root_dns: cfg
                .root_dns
                .iter()
                .filter_map(|d| NormDn::parse(d.as_bytes()))
                .collect(),
            read_only_extended: cfg.read_only_extended.clone(),
        };
        Engine {
            cfg,
            classify,
            allowed,
            allowed_certs,
            backends: RwLock::new(Arc::new(backends)),
            drivers: RwLock::new(HashMap::new()),
            state: RwLock::new(None),
            epoch: watch::channel(0).0,
            sessions: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            completed: Notify::new(),
            next_id: AtomicU64::new(1),
            expired: Mutex::new(None),
            ended: Mutex::new(VecDeque::new()),
            queued_requests: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            stop_frozen: AtomicBool::new(false),
            discover: RwLock::new(None),
            carry: Default::default(),
            journal: std::sync::OnceLock::new(),
            stats: FreezeStats::default(),
        }
    }

    /// Records a cut in `log` at every freeze from now on (once).
    pub fn set_cut_log(&self, log: Arc<dyn CutLog>) {
        let _ = self.journal.set(log);
    }

    /// Records freeze `id`'s cut in the cut log, if there is one: a backup
    /// taken during the freeze names it.
    async fn cut(&self, id: u64, backends: &Suffixes) -> Result<Option<u64>, String> {
        match self.journal.get() {
            Some(log) => log.cut(id, &backends.0).await.map(Some),
            None => Ok(None),
        }
    }

    /// The current backend map.
    pub fn backends(&self) -> Arc<BackendMap> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the backend map (rootDSE refresh). Ignored while frozen, so
    /// backend indices stay valid for the freeze.
    pub fn set_backends(&self, map: BackendMap) {
        if self.read_state().is_none() {
            *self.backends.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        }
    }

    /// How to read the server's root DSE (`auto_backends`: the backends
    /// come from its `namingContexts`, none being configured). Read then
    /// and again inside each ON ([`Engine::refresh`]).
    /// `retry`: how long an OFF waits for a server that closed sessions
    /// during the freeze to answer again ([`Engine::off`]).
    pub fn set_discovery(&self, discover: Arc<dyn Discover>, auto_backends: bool, retry: Duration) {
        *self.discover.write().unwrap_or_else(|e| e.into_inner()) = Some(Discovery {
            discover,
            auto_backends,
            retry,
        });
    }

    fn discovery(&self) -> Option<Discovery> {
        self.discover
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits, up to the discovery's retry bound, until the server's root
    /// DSE can be read again (backoff 50 ms to 1 s).
    async fn server_answers(&self) -> Restart {
        let Some(d) = self.discovery() else {
            return Restart {
                sessions: self.carry_counts().0,
                answers: false,
                waited: Duration::ZERO,
                ended: 0,
            };
        };
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), d.retry);
        loop {
            let answers = match d.discover.server_facts().await {
                Ok(_) => true,
                Err(e) => match backoff.next_pause() {
                    Some(pause) => {
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    None => {
                        warn!(
                            "OFF: the server closed sessions during the freeze and does not \
                             answer again: {e}"
                        );
                        false
                    }
                },
            };
            return Restart {
                // Counted now: sessions may see their connection close
                // while OFF waits.
                sessions: self.carry_counts().0,
                answers,
                waited: backoff.elapsed(),
                ended: 0,
            };
        }
    }

    /// Reads the server's root DSE again (when there is something to learn
    /// from it): the backends when none are configured, and with
    /// `bind_is_write = "auto"` whether binds may write. `startup`: also
    /// warn when `bind_is_write = false` meets a password policy. A root DSE
    /// that cannot be read leaves the backends as they were and counts
    /// binds as writes.
    pub async fn refresh(&self, startup: bool) {
        let Some(Discovery {
            discover,
            auto_backends,
            ..
        }) = self.discovery()
        else {
            return;
        };
        let binds = self.cfg.bind_is_write;
        let for_binds = binds == BindIsWrite::Auto || (startup && binds == BindIsWrite::No);
        if !auto_backends && !for_binds {
            return;
        }
        let facts = match discover.server_facts().await {
            Ok(facts) => facts,
            Err(e) => {
                warn!("cannot read the upstream's root DSE: {e}");
                self.set_password_policy(None);
                return;
            }
        };
        self.set_password_policy(Some(facts.password_policy));
        if binds == BindIsWrite::No && facts.password_policy {
            warn!(
                "the server lists the password policy control (1.3.6.1.4.1.42.2.27.8.5.1) and \
                 freeze.bind_is_write is false: \
                 a bind during a freeze (a failed one above all) may write into a frozen backend \
                 (ppolicy's pwdFailureTime); set bind_is_write = \"auto\" or true to hold binds \
                 into frozen backends"
            );
        }
        if !auto_backends {
            return;
        }
        match BackendMap::new(
            facts
                .naming_contexts
                .into_iter()
                .map(|s| (s, Mode::Readonly)),
        ) {
            Ok(m) => self.set_backends(m),
            Err(e) => warn!("upstream namingContexts unusable as backends: {e}"),
        }
    }

    /// Installs a driver for the backend with this suffix (normalised
    /// match); each of its steps gets `deadline` (the backend's
    /// `driver_timeout_secs`), after which the engine drops it and reports
    /// the step as failed.
    pub fn set_driver(&self, suffix: &str, driver: Arc<dyn Driver>, deadline: Duration) {
        let key = NormDn::parse(suffix.as_bytes())
            .map(|n| n.to_string())
            .unwrap_or_default();
        self.drivers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (driver, deadline));
    }

    /// `b`'s driver and the deadline of each of its steps.
    fn installed(&self, b: &Backend) -> Installed {
        self.drivers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&b.norm.to_string())
            .cloned()
            .unwrap_or_else(|| (Arc::new(NoopDriver), DEFAULT_DRIVER_DEADLINE))
    }

    /// Runs `step` of `b`'s driver under its deadline.
    async fn step(&self, step: Step, b: &Backend, freeze_id: u64) -> Result<(), DriverError> {
        let (driver, deadline) = self.installed(b);
        let i = usize::from(step != Step::Prepare);
        let started = Instant::now();
        let r = run_step(&*driver, step, b, freeze_id, deadline).await;
        self.stats.steps[i].observe(started.elapsed());
        if r.is_err() {
            crate::counters::inc(&self.stats.step_failures[i]);
        }
        r
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, Option<Freeze>> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, Option<Freeze>> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the journal records this request (see
    /// [`ClassifyOptions::journals`]).
    pub fn journals(&self, env: &Envelope, frame: &[u8]) -> bool {
        self.classify.journals(env, frame)
    }

    /// Classifies a request against the current backends. Binds of the
    /// identities allowed to use Allow-Backup are never held while binds
    /// count as reads, so an operator can always connect to end a freeze
    /// (even in `stop` mode). With `bind_is_write` they are held like any
    /// bind into a frozen backend (a bind with a wrong password would write
    /// ppolicy's `pwdFailureTime` into it, and anyone can send one), unless
    /// they are in `root_dns` (the server records nothing for them). See
    /// [`Engine::operator_bind_warnings`].
    pub fn classify(&self, env: &Envelope, frame: &[u8], bound_dn: Option<&[u8]>) -> Class {
        if env.op == crate::wire::op::BIND_REQUEST
            && env
                .dn_bytes(frame)
                .and_then(NormDn::parse)
                .is_some_and(|n| {
                    self.allowed.contains(&n)
                        && (!self.binds_are_writes() || self.classify.root_dns.contains(&n))
                })
        {
            return Class::NEVER;
        }
        self.backends()
            .classify(env, frame, &self.classify, bound_dn)
    }

    /// Operators whose binds a freeze would hold: with `bind_is_write`, an
    /// operator DN under a backend can bind only while that backend is not
    /// frozen, so it must end a freeze on the connection that started it
    /// (as `abproxy run` does) or be authorised another way. One line each,
    /// for the start-up log.
    pub fn operator_bind_warnings(&self) -> Vec<String> {
        if self.cfg.bind_is_write == BindIsWrite::No {
            return Vec::new();
        }
        let map = self.backends();
        self.cfg
            .allowed
            .iter()
            .filter_map(|dn| {
                let n = NormDn::parse(dn.as_bytes())?;
                if self.classify.root_dns.contains(&n) {
                    return None;
                }
                let i = map.holding(&n)?;
                Some(format!(
                    "freeze.allowed {dn} lies under backend {} and binds may count as writes \
                     (bind_is_write true, or auto with a server that has a password policy): its binds \
                     are held while that backend is frozen (a bind with a wrong password would \
                     write into it): abproxy run and hook keep the connection that started the \
                     freeze and end it there, but abproxy status, off and ldapexop on a new \
                     connection wait for the freeze to end; authorise operators that must \
                     connect during a freeze by freeze.allowed_uids (ldapi), \
                     freeze.allowed_cert_subjects (TLS), a DN outside the backends (such as a \
                     rootdn under cn=config) or the backend's rootdn listed in freeze.root_dns",
                    map.backends()[i].suffix
                ))
            })
            .collect()
    }

    /// With `bind_is_write = "auto"` and binds counting as reads (the root
    /// DSE lists no password policy): asks the drivers of the backends
    /// about to be frozen whether a bind writes there (slapd's
    /// `olcLastBind`, a `lastbind` overlay: the root DSE shows neither).
    /// Any yes, or a driver that cannot tell (its error, its deadline),
    /// makes binds writes. Before the drain, while no freeze is in place.
    async fn binds_from_drivers(&self, map: &BackendMap, set: BackendSet) {
        if self.cfg.bind_is_write != BindIsWrite::Auto
            || self.binds_are_writes()
            || self.read_state().is_some()
        {
            return;
        }
        for i in set.iter(map.len()) {
            let b = &map.backends()[i];
            let (driver, deadline) = self.installed(b);
            let asked = with_deadline(DriverOp::BindWrites, deadline, driver.bind_writes(b));
            let why = match asked.await {
                Ok(None) => continue,
                Ok(Some(why)) => why,
                Err(e) => format!("its driver cannot tell ({e})"),
            };
            self.classify.bind_is_write.store(true, Ordering::Relaxed);
            info!(
                backend = %b.suffix,
                "bind_is_write = auto: a bind writes into {}: {why}; binds into a frozen backend are held",
                b.suffix
            );
            return;
        }
    }

    /// Binds count as writes now.
    pub fn binds_are_writes(&self) -> bool {
        self.classify.bind_is_write.load(Ordering::Relaxed)
    }

    /// With `bind_is_write = "auto"`: what the server's root DSE says
    /// (`has_password_policy`: it lists the password policy control;
    /// `None`: it could not be read, so binds count as writes). Ignored
    /// while a freeze is in place, and with `true` or `false`.
    pub fn set_password_policy(&self, has_password_policy: Option<bool>) {
        if self.cfg.bind_is_write != BindIsWrite::Auto {
            return;
        }
        let st = self.read_state();
        if st.is_some() {
            return;
        }
        let writes = has_password_policy.unwrap_or(true);
        if self.classify.bind_is_write.swap(writes, Ordering::Relaxed) != writes {
            info!(
                binds_are_writes = writes,
                "bind_is_write = auto: {}",
                match has_password_policy {
                    Some(true) => "the server has a password policy (its root DSE lists the password policy control): binds into a frozen backend are held",
                    Some(false) => "no password policy on the server: binds pass a readonly freeze",
                    None => "the server's root DSE could not be read: binds into a frozen backend are held",
                }
            );
        }
    }

    /// The gate. With no freeze, runs `insert(None)` (the in-flight insert;
    /// the request is classified later, only if a freeze needs to know).
    /// Under a freeze, classifies the request: if the freeze holds it,
    /// returns its class; otherwise runs `insert(Some(class))`. All under the
    /// state lock, so ON never misses a request it should drain. Returns
    /// what `insert` returned.
    ///
    /// `reader`: the connection's number when the request is a search or a
    /// compare. The freeze holder's own searches and compares pass a `stop`
    /// freeze (reads change nothing; `abproxy backup` exports through its
    /// freeze connection); everyone else's are held.
    #[inline]
    pub fn admit<R>(
        &self,
        reader: Option<u64>,
        classify: impl FnOnce() -> Class,
        insert: impl FnOnce(Option<Class>) -> R,
    ) -> Result<R, Class> {
        let st = self.read_state();
        match st.as_ref() {
            None => Ok(insert(None)),
            Some(f) => {
                let class = classify();
                let holders_read = class.kind == Kind::Read && reader == Some(f.holder.conn);
                if f.holds(class) && !holders_read {
                    return Err(class);
                }
                Ok(insert(Some(class)))
            }
        }
    }

    /// The class of an in-flight request (classified now if it passed the
    /// gate while nothing was frozen).
    pub fn class_of(&self, e: &InFlight, bound_dn: Option<&str>) -> Class {
        if let Some(c) = e.class {
            return c;
        }
        match e.request.as_ref().map(|f| (f, Envelope::request(f))) {
            Some((f, Ok(env))) => self.classify(&env, f, bound_dn.map(str::as_bytes)),
            // Cannot happen (it was read once); count it as a write to all.
            _ => Class {
                kind: Kind::Write,
                backends: BackendSet::ALL,
            },
        }
    }

    /// True when no freeze is in place (none draining, frozen or
    /// releasing).
    pub fn thawed(&self) -> bool {
        self.read_state().is_none()
    }

    /// The backends of the freeze in place once its ON has succeeded
    /// (frozen, or releasing); `None` while thawed or draining.
    pub fn established(&self) -> Option<BackendSet> {
        self.with_established(|f| f.backends)
    }

    /// `what` of the freeze in place once its ON has succeeded; `None`
    /// while thawed or draining.
    fn with_established<R>(&self, what: impl FnOnce(&Freeze) -> R) -> Option<R> {
        self.read_state()
            .as_ref()
            .filter(|f| f.phase != Phase::Draining)
            .map(what)
    }

    /// True while a freeze holds `class`.
    pub fn holds(&self, class: Class) -> bool {
        self.read_state().as_ref().is_some_and(|f| f.holds(class))
    }

    /// True while an established freeze (its drain over) holds `class`:
    /// persistent-search responses of a `stop` backend are held from then
    /// on. During the drain they flow, as the reads the drain waits for do:
    /// held, they could reach their bound and stop the session reading the
    /// very answers the drain waits for.
    pub fn holds_responses(&self, class: Class) -> bool {
        self.with_established(|f| f.holds(class)) == Some(true)
    }

    /// An established freeze (its drain over) has `stop` backends: held
    /// persistent-search responses stay held. A freeze that is only
    /// draining does not keep them: they go, and the session reads again
    /// (its answers may be what that drain waits for).
    pub fn holds_any_responses(&self) -> bool {
        self.with_established(|f| !f.stop.is_empty()) == Some(true)
    }

    /// Changes whenever a freeze ends (sessions release their queues).
    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn bump(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Called by sessions when an in-flight request completes.
    #[inline]
    pub fn completed(&self) {
        if self.draining.load(Ordering::Relaxed) {
            self.completed.notify_waiters();
        }
    }

    /// Registers a session.
    pub fn register(&self, conn: u64, handle: SessionHandle) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn, handle);
    }

    /// Tells every session the proxy is shutting down.
    pub fn shutdown_sessions(&self) {
        for s in self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = s.control.send(Control::Shutdown);
        }
    }

    /// Forgets a session; ends a holdUntilUnbind freeze it holds.
    pub async fn deregister(&self, conn: u64) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn);
        let held = self
            .read_state()
            .as_ref()
            .is_some_and(|f| f.hold_until_unbind && f.holder.conn == conn);
        if held {
            let ended = self
                .end_freeze(
                    Ending::HolderGone,
                    |f| f.holder.conn == conn,
                    |_| "its holder's connection closed (holdUntilUnbind)".into(),
                )
                .await;
            if let Some((f, _)) = ended {
                info!(
                    freeze = f.id,
                    holder = %f.holder.name(),
                    frozen_ms = f.started.elapsed().as_millis() as u64,
                    "freeze released: holder connection ended (holdUntilUnbind)"
                );
            }
        }
        self.completed();
    }

    /// True while the total queue limits leave room (sessions stop reading
    /// their clients otherwise).
    pub fn queue_has_room(&self) -> bool {
        self.queued_requests.load(Ordering::Acquire) < self.cfg.queue_max_requests_total
            && self.queued_bytes.load(Ordering::Acquire) < self.cfg.queue_max_bytes_total
    }

    /// A session's upstream connection closed during a stop freeze
    /// ([`Carried::Waiting`]), then it was carried or not.
    pub fn carried(&self, what: Carried) {
        match what {
            Carried::Waiting => {
                self.carry[0].fetch_add(1, Ordering::SeqCst);
            }
            Carried::Yes | Carried::No => {
                self.carry[0].fetch_sub(1, Ordering::SeqCst);
                self.carry[if what == Carried::Yes { 1 } else { 2 }].fetch_add(1, Ordering::SeqCst);
            }
            Carried::Left => {
                self.carry[0].fetch_sub(1, Ordering::SeqCst);
            }
            Carried::Cannot => {
                self.carry[2].fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Sessions waiting to be carried, carried, and not carried (since
    /// start).
    pub fn carry_counts(&self) -> (usize, usize, usize) {
        (
            self.carry[0].load(Ordering::SeqCst),
            self.carry[1].load(Ordering::SeqCst),
            self.carry[2].load(Ordering::SeqCst),
        )
    }

    /// Requests and bytes held in all sessions' queues.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.queued_requests.load(Ordering::Acquire),
            self.queued_bytes.load(Ordering::Acquire),
        )
    }

    /// Accounts for one more queued request.
    pub fn queue_add(&self, bytes: usize) {
        let before = self.queued_requests.fetch_add(1, Ordering::AcqRel);
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.stats.held(before);
    }

    /// Accounts for `n` requests leaving the queues; wakes sessions waiting
    /// for room if the totals were full.
    pub fn queue_sub(&self, n: usize, bytes: usize) {
        let full = !self.queue_has_room();
        let before = self.queued_requests.fetch_sub(n, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.stats.unheld(before.saturating_sub(n));
        if full && n > 0 {
            self.bump();
        }
    }

    /// Requests in flight upstream over all sessions, as [`Engine::status`]
    /// counts them, without building the rest of the status (the session
    /// fuzz check reads it after every step).
    pub fn in_flight(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.state.inflight().len())
            .sum()
    }

    /// `n` queued requests were sent upstream once no longer held.
    pub fn released(&self, n: usize) {
        self.stats.released(n);
    }

    /// What the engine counts, now (for monitoring: reads the freeze state
    /// and, for the requests in flight, every session's table, briefly).
    pub fn snapshot(&self) -> Snapshot {
        let state = match self.read_state().as_ref() {
            None => ("thawed", Duration::ZERO),
            Some(f) => (
                match f.phase {
                    Phase::Draining => "draining",
                    Phase::Frozen => "frozen",
                    Phase::Releasing => "releasing",
                },
                f.started.elapsed(),
            ),
        };
        let sessions = self.session_handles();
        let in_flight = sessions
            .iter()
            .map(|s| s.state.inflight().iter().count())
            .sum();
        self.stats
            .snapshot(state, self.queued(), in_flight, self.carry_counts())
    }

    /// True while some frozen backend is in stop mode (persistent search
    /// responses may have to be held).
    #[inline]
    pub fn stop_frozen(&self) -> bool {
        self.stop_frozen.load(Ordering::Relaxed)
    }

    /// The freeze settings.
    pub fn config(&self) -> &FreezeConfig {
        &self.cfg
    }

    /// Handles an Allow-Backup request: what it did, or why it failed
    /// (the proxy makes the response of either).
    pub async fn allow_backup(
        self: &Arc<Self>,
        who: Requester,
        value: Option<&[u8]>,
    ) -> Result<Granted, FreezeError> {
        let value = value.ok_or(BadRequest::NoValue)?;
        let req = abproxy_proto::decode_request(value).map_err(BadRequest::Undecodable)?;
        if req.dns().is_some_and(|dns| dns.is_empty()) {
            return Err(BadRequest::EmptyDnSet.into());
        }
        if req.mode && req.freeze_id.is_some() {
            return Err(BadRequest::FreezeIdInOn.into());
        }
        if let Err(refusal) = authorise(
            &self.allowed,
            &self.cfg.allowed_uids,
            &self.allowed_certs,
            &who,
        ) {
            warn!(who = %who.name(), on = req.mode, "Allow-Backup refused: {refusal}");
            if req.mode {
                self.stats.outcome(Outcome::Refused);
            }
            return Err(refusal.into());
        }
        if req.mode {
            let r = self.on(who, req).await;
            if let Err(e) = &r {
                self.stats.outcome(match e {
                    FreezeError::Drain(_) => Outcome::DrainTimeout,
                    FreezeError::PrepareFailed(_) => Outcome::DriverFailure,
                    FreezeError::Journal(_) | FreezeError::EndedDuringOn(_) => Outcome::Failed,
                    _ => Outcome::Refused,
                });
            }
            r
        } else {
            self.off(who, req).await
        }
    }

    async fn on(
        self: &Arc<Self>,
        who: Requester,
        req: AllowBackupRequest,
    ) -> Result<Granted, FreezeError> {
        // The backends (when they come from the server) and whether binds
        // write, as the server says now.
        self.refresh(false).await;
        let map = self.backends();
        if map.is_empty() {
            return Err(FreezeError::NoBackends);
        }
        // Resolve dnSet.
        let mut set = BackendSet::EMPTY;
        match req.dns() {
            None => set = map.all(),
            Some(dns) => {
                for dn in dns {
                    let shown = String::from_utf8_lossy(dn).into_owned();
                    match NormDn::parse(dn).and_then(|n| map.holding(&n)) {
                        Some(i) => set.insert(i),
                        None => {
                            warn!(who = %who.name(), dn = %shown, "Allow-Backup ON refused: no such backend");
                            return Err(FreezeError::UnknownBackend {
                                dn: shown,
                                known: suffixes(&map, map.all()),
                                off: false,
                            });
                        }
                    }
                }
            }
        }
        let unimpl: Vec<_> = set
            .iter(map.len())
            .filter(|&i| map.backends()[i].mode == Mode::Unimplemented)
            .map(|i| map.backends()[i].suffix.clone())
            .collect();
        if !unimpl.is_empty() {
            warn!(who = %who.name(), "Allow-Backup ON refused: unimplemented backends {unimpl:?}");
            return Err(FreezeError::Unimplemented { backends: unimpl });
        }
        // A partial freeze: every backend's driver checks that the server
        // cannot change a frozen backend by itself when another is written
        // (overlays linking databases). Before anything is installed, so a
        // refusal changes nothing and uses no freeze id; under the driver's
        // step deadline, so a hanging server cannot hang ON.
        if set != map.all() {
            let frozen: Vec<Backend> = set
                .iter(map.len())
                .map(|i| map.backends()[i].clone())
                .collect();
            for b in map.backends() {
                let (driver, deadline) = self.installed(b);
                let check = driver.check_partial(b, &frozen, map.backends());
                let checked = with_deadline(DriverOp::CheckPartial, deadline, check)
                    .await
                    .map_err(|e| match e.is_timeout() {
                        true => e.context(format_args!("the driver of {}", b.suffix)),
                        false => e,
                    });
                if let Err(source) = checked {
                    let e = FreezeError::PartialFreezeRefused {
                        backend: b.suffix.clone(),
                        source,
                    };
                    warn!(who = %who.name(), backend = %b.suffix, "Allow-Backup ON refused: {e}");
                    return Err(e);
                }
            }
        }
        self.binds_from_drivers(&map, set).await;
        let mut stop = BackendSet::EMPTY;
        for i in set.iter(map.len()) {
            if map.backends()[i].mode == Mode::Stop {
                stop.insert(i);
            }
        }
        let mut freeze = Freeze {
            // Set below, once no freeze is in the way: a refused ON uses up
            // no id, so that ids count the freezes that were set up.
            id: 0,
            phase: Phase::Draining,
            backends: set,
            stop,
            holder: who.clone(),
            hold_until_unbind: req.hold_until_unbind,
            since: SystemTime::now(),
            started: Instant::now(),
            lease_until: None,
            ended: CancellationToken::new(),
            not_carried_before: self.carry_counts().2,
        };
        let id = {
            let mut st = self.write_state();
            if let Some(f) = st.as_ref() {
                let since = epoch_secs(f.since);
                warn!(who = %who.name(), holder = %f.holder.name(), "Allow-Backup ON refused: busy");
                return Err(Busy::AlreadyFrozen {
                    draining: f.phase == Phase::Draining,
                    holder: f.holder.name(),
                    since,
                    secs: f.started.elapsed().as_secs(),
                    id: f.id,
                }
                .into());
            }
            freeze.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let id = freeze.id;
            self.stop_frozen
                .store(!freeze.stop.is_empty(), Ordering::Relaxed);
            *st = Some(freeze);
            self.draining.store(true, Ordering::Relaxed);
            id
        };
        self.expired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let names = suffixes(&map, set);
        info!(freeze = id, who = %who.name(), backends = %names, "Allow-Backup ON: draining");

        let max = Duration::from_secs(self.cfg.max_drain_secs);
        let limit = req
            .time_limit
            .map(|s| Duration::from_secs(s as u64).min(max))
            .unwrap_or(max);
        let drain = self.drain(id, limit, &map).await;
        self.draining.store(false, Ordering::Relaxed);
        let drained = match drain {
            Ok(d) => {
                self.stats.drain.observe(d);
                d
            }
            Err(e) => {
                self.abort_freeze(id, &e).await;
                warn!(freeze = id, who = %who.name(), "Allow-Backup ON failed: {e}; freeze undone");
                return Err(e);
            }
        };

        // Prepare, in backend order; on failure undo what was prepared.
        let mut prepared = Vec::new();
        for i in set.iter(map.len()) {
            let b = &map.backends()[i];
            if let Err(source) = self.step(Step::Prepare, b, id).await {
                for j in prepared.iter().rev() {
                    let pb: &Backend = &map.backends()[*j];
                    if let Err(e2) = self.step(Step::Done, pb, id).await {
                        tracing::error!(backend = %pb.suffix, "done step failed after a failed prepare: {e2}");
                    }
                }
                let e = FreezeError::PrepareFailed(StepFailure {
                    backend: b.suffix.clone(),
                    step: Step::Prepare,
                    source,
                });
                self.abort_freeze(id, &e).await;
                warn!(freeze = id, who = %who.name(), "Allow-Backup ON failed: {e}");
                return Err(e);
            }
            prepared.push(i);
        }
        // The journal's cut: every write whose intent is before it was
        // drained (the server answered it), every later one waited.
        let cut = match self.cut(id, &names).await {
            Ok(cut) => cut,
            Err(source) => {
                for j in prepared.iter().rev() {
                    let pb: &Backend = &map.backends()[*j];
                    if let Err(e2) = self.step(Step::Done, pb, id).await {
                        tracing::error!(backend = %pb.suffix, "done step failed after the journal failed: {e2}");
                    }
                }
                let e = FreezeError::Journal(source);
                self.abort_freeze(id, &e).await;
                warn!(freeze = id, who = %who.name(), "Allow-Backup ON failed: {e}");
                return Err(e);
            }
        };

        let lease = Duration::from_secs(self.cfg.lease_secs);
        {
            let mut st = self.write_state();
            match st.as_mut() {
                Some(f) if f.id == id => {
                    f.phase = Phase::Frozen;
                    f.lease_until = Some(Instant::now() + lease);
                }
                _ => return Err(FreezeError::EndedDuringOn(OnStage::Preparing)),
            }
        }
        if let Some(timer) = self.lease_timer() {
            tokio::spawn(timer);
        }
        info!(
            freeze = id,
            who = %who.name(),
            backends = %names,
            drain_ms = drained.as_millis() as u64,
            lease_s = lease.as_secs(),
            "Allow-Backup ON: frozen"
        );
        Ok(Granted::Frozen {
            id,
            backends: names,
            drained,
            lease,
            cut,
        })
    }

    /// The lease timer of the current freeze, as a future to spawn.
    fn lease_timer(self: &Arc<Self>) -> Option<BoxFuture<'static, ()>> {
        let (id, until, ended) = {
            let st = self.read_state();
            let f = st.as_ref()?;
            (f.id, f.lease_until?, f.ended.clone())
        };
        let engine = Arc::downgrade(self);
        Some(Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                // The freeze ended first: so does its timer.
                _ = ended.cancelled() => return,
            }
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let ended = engine
                .end_freeze(
                    Ending::Lease,
                    |f| f.id == id && f.phase == Phase::Frozen,
                    |f| {
                        format!(
                            "its lease expired after {} s",
                            f.started.elapsed().as_secs()
                        )
                    },
                )
                .await;
            if let Some((f, _)) = ended {
                let secs = f.started.elapsed().as_secs();
                let e = FreezeError::Expired { id, secs };
                warn!(freeze = id, holder = %f.holder.name(), "lease expired: {e}; operations resumed");
                *engine.expired.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, secs));
            }
        }))
    }

    /// Waits until no in-flight request that freeze `id` holds is left.
    async fn drain(
        &self,
        id: u64,
        limit: Duration,
        map: &BackendMap,
    ) -> Result<Duration, FreezeError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(freeze) = self.read_state().clone().filter(|f| f.id == id) else {
                return Err(FreezeError::EndedDuringOn(OnStage::Draining));
            };
            let pending = self.pending(&freeze);
            if pending.writes == 0 && pending.reads.is_empty() {
                return Ok(start.elapsed());
            }
            let timed_out = tokio::select! {
                _ = notified => false,
                _ = tokio::time::sleep_until(deadline) => true,
            };
            if !timed_out {
                continue;
            }
            let pending = self.pending(&freeze);
            if pending.writes > 0 {
                return Err(DrainError::WritesInFlight {
                    limit,
                    writes: pending.writes,
                    backends: suffixes(map, freeze.backends),
                }
                .into());
            }
            // Only reads (stop mode): abandon them, answer timeLimitExceeded.
            let n: usize = pending.reads.iter().map(|(_, v)| v.len()).sum();
            warn!(
                freeze = id,
                reads = n,
                "drain time limit: abandoning in-flight reads"
            );
            for (handle, ids) in pending.reads {
                let _ = handle.control.send(Control::AbandonReads(ids));
            }
            // The sessions answer at once; wait for them without a new
            // limit of our own beyond a short bound.
            let settle = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let notified = self.completed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let p = self.pending(&freeze);
                if p.writes > 0 {
                    return Err(DrainError::WriteWhileAbandoning.into());
                }
                if p.reads.is_empty() {
                    return Ok(start.elapsed());
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(settle) => {
                        return Err(DrainError::ReadsNotAbandoned.into());
                    }
                }
            }
        }
    }

    /// The registered sessions' handles, copied out of the registry's lock.
    fn session_handles(&self) -> Vec<SessionHandle> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn pending(&self, f: &Freeze) -> Pending {
        let sessions = self.session_handles();
        let mut p = Pending::default();
        for s in sessions {
            let bound = s.state.bound_dn();
            let table = s.state.inflight();
            let mut reads = Vec::new();
            for (msgid, e) in table.iter() {
                if e.persistent {
                    continue;
                }
                let class = self.class_of(e, bound.as_deref());
                if !f.holds(class) {
                    continue;
                }
                if class.kind == Kind::Write {
                    p.writes += 1;
                } else {
                    reads.push(msgid);
                }
            }
            drop(table);
            if !reads.is_empty() {
                p.reads.push((s.clone(), reads));
            }
        }
        p
    }

    /// Undoes a freeze that failed before it was complete (`why`: the
    /// failure its ON answered with).
    async fn abort_freeze(&self, id: u64, why: &FreezeError) {
        let mut st = self.write_state();
        if let Some(f) = st.as_ref().filter(|f| f.id == id) {
            f.ended.cancel();
            *st = None;
            self.stop_frozen.store(false, Ordering::Relaxed);
            self.record_end(id, format!("it never took effect: its ON failed ({why})"));
        }
        drop(st);
        self.bump();
    }

    /// Remembers how freeze `id` ended, for an OFF that names it.
    fn record_end(&self, id: u64, how: String) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        if ended.len() >= ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back((id, how));
    }

    /// How freeze `id` ended, if it is one of the last [`ENDED_KEPT`].
    fn how_ended(&self, id: u64) -> Option<String> {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, how)| how.clone())
    }

    /// Ends the current freeze if `pred` holds: runs the done steps, clears
    /// the state, wakes the sessions, and remembers how it ended (`how`, for
    /// an OFF naming it later). Returns the freeze and the done errors.
    async fn end_freeze(
        &self,
        ending: Ending,
        pred: impl FnOnce(&Freeze) -> bool,
        how: impl FnOnce(&Freeze) -> String,
    ) -> Option<(Freeze, Vec<StepFailure>)> {
        // While the done steps run, the freeze stays in place (Releasing): a
        // write arriving now is still held, instead of reaching a server
        // that a driver has not yet made writable again.
        let f = {
            let mut st = self.write_state();
            let cur = st.as_mut()?;
            if cur.phase == Phase::Releasing || !pred(cur) {
                return None;
            }
            let snapshot = cur.clone();
            cur.phase = Phase::Releasing;
            snapshot
        };
        let map = self.backends();
        let mut errors = Vec::new();
        if f.phase == Phase::Frozen {
            for i in f.backends.iter(map.len()) {
                let b = &map.backends()[i];
                if let Err(source) = self.step(Step::Done, b, f.id).await {
                    tracing::error!(freeze = f.id, backend = %b.suffix, "done step failed: {source}");
                    errors.push(StepFailure {
                        backend: b.suffix.clone(),
                        step: Step::Done,
                        source,
                    });
                }
            }
        }
        {
            let mut st = self.write_state();
            if st.as_ref().is_some_and(|c| c.id == f.id) {
                f.ended.cancel();
                *st = None;
                self.stop_frozen.store(false, Ordering::Relaxed);
                self.record_end(f.id, how(&f));
            }
        }
        if f.phase == Phase::Frozen {
            self.stats.frozen.observe(f.started.elapsed());
        }
        self.stats.outcome(match ending {
            Ending::Off if errors.is_empty() => Outcome::Success,
            Ending::Off => Outcome::DriverFailure,
            Ending::Lease => Outcome::Expired,
            Ending::HolderGone => Outcome::HolderGone,
            Ending::Shutdown => Outcome::Shutdown,
        });
        if ending == Ending::Lease {
            crate::counters::inc(&self.stats.lease_expiries);
        }
        self.bump();
        Some((f, errors))
    }

    /// The proxy is stopping and its sessions have ended (queued requests
    /// discarded, never sent): a freeze still in place ends here, so the
    /// drivers' DONE steps run and no backend stays read-only.
    pub async fn end_at_shutdown(&self) {
        let ended = self
            .end_freeze(
                Ending::Shutdown,
                |f| f.phase == Phase::Frozen,
                |_| "abproxy shut down".into(),
            )
            .await;
        if let Some((f, errors)) = ended {
            warn!(
                freeze = f.id,
                holder = %f.holder.name(),
                frozen_ms = f.started.elapsed().as_millis() as u64,
                done_errors = errors.len(),
                "freeze ended: abproxy is shutting down"
            );
        } else if self.read_state().is_some() {
            warn!("shutting down while a freeze is being set up or released: its drivers' steps may not finish (the state file lets the next start undo them)");
        }
    }

    /// OFF: ends the current freeze, if it is the one `req` names (its
    /// freezeId) and `req`'s dnSet, when given, names exactly its backends.
    async fn off(&self, who: Requester, req: AllowBackupRequest) -> Result<Granted, FreezeError> {
        let map = self.backends();
        // The backends dnSet names (None: all of those frozen).
        let mut named = None;
        if let Some(dns) = req.dns() {
            let mut set = BackendSet::EMPTY;
            for dn in dns {
                match NormDn::parse(dn).and_then(|n| map.holding(&n)) {
                    Some(i) => set.insert(i),
                    None => {
                        let shown = String::from_utf8_lossy(dn).into_owned();
                        warn!(who = %who.name(), dn = %shown, "Allow-Backup OFF refused: no such backend");
                        return Err(FreezeError::UnknownBackend {
                            dn: shown,
                            known: suffixes(&map, map.all()),
                            off: true,
                        });
                    }
                }
            }
            named = Some(set);
        }
        let (current, not_carried_before, stop) = {
            let st = self.read_state();
            let f = st.as_ref();
            (
                f.map(|f| (f.id, f.phase, f.backends)),
                f.map_or(0, |f| f.not_carried_before),
                f.is_some_and(|f| !f.stop.is_empty()),
            )
        };
        if let Some(n) = req.freeze_id {
            if current.map(|(id, ..)| id) != Some(n) {
                return self.not_current(&who, n, current.map(|(id, ..)| id));
            }
        }
        let Some((id, phase, frozen)) = current else {
            return self.not_frozen(&who);
        };
        match phase {
            Phase::Releasing => return Err(Busy::Releasing.into()),
            Phase::Draining => return Err(Busy::Draining.into()),
            Phase::Frozen => {}
        }
        if let Some(named) = named.filter(|&s| s != frozen) {
            let not_frozen = BackendSet(named.0 & !frozen.0);
            let e = if not_frozen.is_empty() {
                FreezeError::PartialRelease {
                    named: suffixes(&map, named),
                    frozen: suffixes(&map, frozen),
                    id,
                }
            } else {
                FreezeError::BackendsNotFrozen {
                    not_frozen: suffixes(&map, not_frozen),
                    frozen: suffixes(&map, frozen),
                    id,
                }
            };
            warn!(freeze = id, who = %who.name(), "Allow-Backup OFF refused: {e}");
            return Err(e);
        }
        // The server closed sessions during the freeze (stopped for a cold
        // backup): its DONE steps and the sessions resuming need it back.
        // In stop mode the server may have been stopped even if no session
        // has seen its connection close yet (a backup command that does not
        // wait for the server to exit): look.
        let (waiting, _, not_carried) = self.carry_counts();
        let ended = not_carried.saturating_sub(not_carried_before);
        let look = waiting > 0 || (stop && self.discovery().is_some());
        let restart = match (look, ended) {
            (false, 0) => None,
            (false, _) => Some(Restart {
                sessions: 0,
                answers: true,
                waited: Duration::ZERO,
                ended,
            }),
            (true, _) => Some(Restart {
                ended,
                ..self.server_answers().await
            }),
        };
        let queued = self.queued_requests.load(Ordering::Relaxed);
        let by = who.name();
        let how = |_: &Freeze| match req.freeze_id {
            Some(_) => format!("released by {by}"),
            None => format!("released by {by} with an OFF that named no freeze"),
        };
        let ended = self
            .end_freeze(Ending::Off, |f| f.id == id && f.phase == Phase::Frozen, how)
            .await;
        let Some((f, errors)) = ended else {
            // It ended (or began releasing) since we looked.
            return match req.freeze_id {
                Some(n) => self.not_current(&who, n, None),
                None => self.not_frozen(&who),
            };
        };
        let after = f.started.elapsed();
        info!(
            freeze = f.id,
            who = %who.name(),
            holder = %f.holder.name(),
            frozen_ms = after.as_millis() as u64,
            queued,
            "Allow-Backup OFF: released"
        );
        if errors.is_empty() {
            Ok(Granted::Released {
                id: f.id,
                after,
                queued,
                restart,
            })
        } else {
            Err(FreezeError::DoneFailed(errors))
        }
    }

    /// A plain OFF with nothing frozen: "not frozen", or once after the
    /// lease ended a freeze, that it expired.
    fn not_frozen(&self, who: &Requester) -> Result<Granted, FreezeError> {
        let expired = self
            .expired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match expired {
            Some((id, secs)) => {
                let e = FreezeError::Expired { id, secs };
                warn!(who = %who.name(), "Allow-Backup OFF after lease expiry: {e}");
                Err(e)
            }
            None => Ok(Granted::NotFrozen),
        }
    }

    /// The refusal of an OFF naming freeze `n`, which is not the current
    /// one (`current`): nothing is released; says how `n` ended, if known.
    fn not_current(
        &self,
        who: &Requester,
        n: u64,
        current: Option<u64>,
    ) -> Result<Granted, FreezeError> {
        let ended = if n >= self.next_id.load(Ordering::Relaxed) {
            PastFreeze::NeverSetUp
        } else {
            self.how_ended(n)
                .map_or(PastFreeze::Forgotten, PastFreeze::Ended)
        };
        let e = FreezeError::NotCurrent {
            id: n,
            current,
            ended,
        };
        // This OFF has told its client about the expiry: a later plain OFF
        // need not.
        let mut expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
        if expired.as_ref().is_some_and(|(id, _)| *id == n) {
            *expired = None;
        }
        drop(expired);
        warn!(who = %who.name(), freeze = n, "Allow-Backup OFF refused: {e}");
        Err(e)
    }

    /// The status query (refused unless `who` may use Allow-Backup).
    pub fn status(&self, who: &Requester) -> Result<Status, FreezeError> {
        authorise(
            &self.allowed,
            &self.cfg.allowed_uids,
            &self.allowed_certs,
            who,
        )?;
        let map = self.backends();
        let st = self.read_state().clone();
        let frozen = st.as_ref().map(|f| f.backends).unwrap_or_default();
        let in_flight = self.in_flight();
        Ok(Status {
            backends: map
                .backends()
                .iter()
                .enumerate()
                .map(|(i, b)| BackendStatus {
                    suffix: b.suffix.clone(),
                    mode: b.mode,
                    frozen: frozen.contains(i),
                })
                .collect(),
            freeze: st.map(|f| CurrentFreeze {
                id: f.id,
                phase: f.phase,
                holder: f.holder.identity(),
                holder_name: f.holder.name(),
                since: f.since,
                age: f.started.elapsed(),
                lease_expires: f
                    .lease_until
                    .map(|u| SystemTime::now() + u.saturating_duration_since(Instant::now())),
            }),
            queued_requests: self.queued_requests.load(Ordering::Relaxed) as u64,
            queued_bytes: self.queued_bytes.load(Ordering::Relaxed) as u64,
            in_flight: in_flight as u64,
            carry: {
                let (w, y, n) = self.carry_counts();
                (w as u64, y as u64, n as u64)
            },
        })
    }
}

#[derive(Default)]
struct Pending {
    writes: usize,
    reads: Vec<(SessionHandle, Vec<i32>)>,
}

fn suffixes(map: &BackendMap, set: BackendSet) -> Suffixes {
    Suffixes(
        set.iter(map.len())
            .map(|i| map.backends()[i].suffix.clone())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3_proto::proto::LdapResultCode;

    fn engine(bind_is_write: bool) -> Engine {
        let cfg = FreezeConfig {
            allowed: vec![
                "cn=admin,dc=example,dc=org".into(),
                "cn=admin,cn=config".into(),
            ],
            bind_is_write: bind_is_write.into(),
            ..FreezeConfig::default()
        };
        let map = BackendMap::new([("dc=example,dc=org".to_string(), Mode::Readonly)]).unwrap();
        Engine::new(cfg, map)
    }

    /// A driver whose steps never return when told to hang.
    struct Hung {
        prepare: bool,
        done: bool,
    }
    impl Driver for Hung {
        fn prepare<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), DriverError>> {
            let hang = self.prepare;
            Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        }
        fn done<'a>(&'a self, _: &'a Backend, _: u64) -> BoxFuture<'a, Result<(), DriverError>> {
            let hang = self.done;
            Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        }
    }

    /// `in_flight` counts every registered session's table, as the
    /// status does.
    #[test]
    fn in_flight_sums_the_sessions_tables() {
        let e = engine(false);
        assert_eq!(e.in_flight(), 0);
        let mut handles = Vec::new();
        for (conn, n) in [(1u64, 2i32), (2, 3)] {
            let state = Arc::new(Participant::default());
            for id in 0..n {
                state
                    .inflight()
                    .start(id, InFlight::new(crate::wire::op::SEARCH_REQUEST, None))
                    .unwrap();
            }
            let (control, rx) = mpsc::unbounded_channel();
            handles.push(rx);
            e.register(conn, SessionHandle { state, control });
        }
        assert_eq!(e.in_flight(), 5);
        assert_eq!(e.status(&admin()).unwrap().in_flight, 5);
    }

    /// The identity a requester is known by: the bound DN first, then the
    /// certificate's subject, then the peer credentials in slapd's form.
    #[test]
    fn identities_and_names() {
        let mut r = Requester {
            conn: 7,
            bound_dn: None,
            peer_uid: None,
            cert_subject: None,
        };
        assert_eq!(
            (r.identity(), r.name()),
            (None, "anonymous (conn 7)".into())
        );
        r.peer_uid = Some((1000, 100));
        let cred = "gidNumber=100+uidNumber=1000,cn=peercred,cn=external,cn=auth";
        assert_eq!(r.identity().as_deref(), Some(cred));
        assert_eq!(r.name(), format!("{cred} (conn 7)"));
        r.cert_subject = Some("CN=op,O=x".into());
        assert_eq!(r.identity().as_deref(), Some("CN=op,O=x"));
        r.bound_dn = Some("cn=admin,dc=example,dc=org".into());
        assert_eq!(r.identity().as_deref(), Some("cn=admin,dc=example,dc=org"));
        assert_eq!(r.name(), "cn=admin,dc=example,dc=org (conn 7)");
    }

    fn admin() -> Requester {
        Requester {
            conn: 1,
            bound_dn: Some("cn=admin,dc=example,dc=org".into()),
            peer_uid: None,
            cert_subject: None,
        }
    }

    async fn request(
        engine: &Arc<Engine>,
        req: AllowBackupRequest,
    ) -> Result<Granted, FreezeError> {
        let value = abproxy_proto::encode_request(&req);
        engine.allow_backup(admin(), Some(&value)).await
    }

    fn status(engine: &Engine) -> Status {
        engine.status(&admin()).unwrap()
    }

    fn hung_engine(prepare: bool, done: bool) -> Arc<Engine> {
        let engine = Arc::new(engine(false));
        let hung = Arc::new(Hung { prepare, done });
        engine.set_driver("dc=example,dc=org", hung, Duration::from_secs(2));
        engine
    }

    /// A driver that says what a bind records (`Ok(None)`: nothing), or
    /// never answers.
    struct BindSays(Option<Result<Option<String>, String>>);
    impl Driver for BindSays {
        fn bind_writes<'a>(
            &'a self,
            _: &'a Backend,
        ) -> BoxFuture<'a, Result<Option<String>, DriverError>> {
            let said = self.0.clone();
            Box::pin(async move {
                match said {
                    Some(r) => r.map_err(DriverError::other),
                    None => std::future::pending().await,
                }
            })
        }
    }

    /// dc=example,dc=org in `stop` mode, `admin()` allowed to freeze.
    fn stop_engine() -> Arc<Engine> {
        let cfg = FreezeConfig {
            allowed: vec!["cn=admin,dc=example,dc=org".into()],
            ..FreezeConfig::default()
        };
        let map = BackendMap::new([("dc=example,dc=org".to_string(), Mode::Stop)]).unwrap();
        Arc::new(Engine::new(cfg, map))
    }

    /// The gate under a `stop` freeze: the holder's own reads (admit's
    /// `reader` is its connection) pass; another connection's reads, and
    /// the holder's writes, are held.
    #[tokio::test(start_paused = true)]
    async fn a_stop_freeze_passes_only_its_holders_reads() {
        let engine = stop_engine();
        request(&engine, AllowBackupRequest::on()).await.unwrap();
        let read = Class {
            kind: Kind::Read,
            backends: BackendSet::ALL,
        };
        let write = Class {
            kind: Kind::Write,
            backends: BackendSet::ALL,
        };
        let holder = admin().conn;
        let admit = |reader: Option<u64>, class: Class| engine.admit(reader, || class, |_| ());
        assert!(admit(Some(holder), read).is_ok(), "the holder's search");
        assert_eq!(admit(Some(holder + 1), read), Err(read), "another's search");
        assert_eq!(admit(None, read), Err(read), "a read that is not a search");
        assert_eq!(admit(Some(holder), write), Err(write), "the holder's write");
        request(&engine, AllowBackupRequest::off()).await.unwrap();
        assert!(admit(Some(holder + 1), read).is_ok(), "thawed");
    }

    /// Persistent-search responses of a `stop` backend are held only once
    /// the freeze is established: during its drain they flow (held, at
    /// their bound they would stop the session reading the answers the
    /// drain waits for), and a freeze that is only draining does not keep
    /// those an earlier freeze held.
    #[tokio::test(start_paused = true)]
    async fn a_stop_freeze_holds_persistent_search_responses_only_once_established() {
        let engine = stop_engine();
        let read = Class {
            kind: Kind::Read,
            backends: BackendSet::ALL,
        };
        // A search in flight on another connection: the drain waits for it.
        let state = Arc::new(Participant::default());
        state
            .inflight()
            .start(1, InFlight::new(crate::wire::op::SEARCH_REQUEST, None))
            .unwrap();
        let (control, _rx) = mpsc::unbounded_channel();
        engine.register(
            7,
            SessionHandle {
                state: state.clone(),
                control,
            },
        );
        let on = tokio::spawn({
            let engine = engine.clone();
            async move { request(&engine, AllowBackupRequest::on()).await }
        });
        while !engine.stop_frozen() {
            tokio::task::yield_now().await;
        }
        assert!(
            engine.holds(read),
            "the gate holds new reads during the drain"
        );
        assert!(!engine.holds_responses(read) && !engine.holds_any_responses());
        state
            .inflight()
            .response(1, crate::wire::op::SEARCH_RESULT_DONE);
        engine.completed();
        assert!(matches!(on.await.unwrap(), Ok(Granted::Frozen { .. })));
        assert!(engine.holds_responses(read) && engine.holds_any_responses());
        request(&engine, AllowBackupRequest::off()).await.unwrap();
        assert!(!engine.holds_responses(read) && !engine.holds_any_responses());
    }

    #[tokio::test(start_paused = true)]
    async fn auto_asks_the_drivers_whether_a_bind_writes_before_a_freeze() {
        let cases = [
            (Some(Ok(None)), false),
            (Some(Ok(Some("olcLastBind: TRUE".to_string()))), true),
            (Some(Err("cannot read cn=config".to_string())), true),
            (None, true),
        ];
        for (said, writes) in cases {
            let cfg = FreezeConfig {
                allowed: vec!["cn=admin,dc=example,dc=org".into()],
                bind_is_write: BindIsWrite::Auto,
                ..FreezeConfig::default()
            };
            let map = BackendMap::new([("dc=example,dc=org".to_string(), Mode::Readonly)]).unwrap();
            let engine = Arc::new(Engine::new(cfg, map));
            // The root DSE listed no password policy.
            engine.set_password_policy(Some(false));
            assert!(!engine.binds_are_writes());
            let hangs = said.is_none();
            engine.set_driver(
                "dc=example,dc=org",
                Arc::new(BindSays(said.clone())),
                Duration::from_secs(2),
            );
            let started = tokio::time::Instant::now();
            let on = request(&engine, AllowBackupRequest::on()).await;
            assert!(matches!(on, Ok(Granted::Frozen { id: 1, .. })), "{on:?}");
            // A driver that never answers costs its deadline, no more.
            let waited = if hangs {
                Duration::from_secs(2)
            } else {
                Duration::ZERO
            };
            assert_eq!(started.elapsed(), waited, "{said:?}");
            assert_eq!(engine.binds_are_writes(), writes, "{said:?}");
            let off = request(&engine, AllowBackupRequest::off()).await;
            assert!(
                matches!(off, Ok(Granted::Released { id: 1, .. })),
                "{off:?}"
            );
        }
    }

    /// A server whose root DSE lists these naming contexts; counts reads.
    struct Facts(Vec<&'static str>, std::sync::atomic::AtomicUsize);
    impl Discover for Facts {
        fn server_facts(&self) -> BoxFuture<'_, Result<super::super::ServerFacts, String>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let contexts = self.0.iter().map(|s| s.to_string()).collect();
            Box::pin(async move {
                Ok(super::super::ServerFacts {
                    naming_contexts: contexts,
                    password_policy: false,
                })
            })
        }
    }

    /// A server that is down for its first `down` reads (`None`: always).
    struct DownFor(Option<usize>, std::sync::atomic::AtomicUsize);
    impl Discover for DownFor {
        fn server_facts(&self) -> BoxFuture<'_, Result<super::super::ServerFacts, String>> {
            let n = self.1.fetch_add(1, Ordering::SeqCst);
            let up = self.0.is_some_and(|down| n >= down);
            Box::pin(async move {
                if up {
                    Ok(super::super::ServerFacts::default())
                } else {
                    Err("connection refused".into())
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn off_waits_for_a_restarted_server_within_its_bound() {
        for down in [Some(0), Some(4), None] {
            let engine = Arc::new(engine(false));
            let server = Arc::new(DownFor(down, Default::default()));
            engine.set_discovery(server.clone(), false, Duration::from_secs(10));
            assert!(request(&engine, AllowBackupRequest::on()).await.is_ok());
            // No session lost its connection: OFF asks nothing.
            let off = request(&engine, AllowBackupRequest::off()).await.unwrap();
            assert!(matches!(off, Granted::Released { restart: None, .. }));
            assert_eq!(server.1.load(Ordering::SeqCst), 0);
            // Two sessions wait for the server, stopped during the freeze.
            assert!(request(&engine, AllowBackupRequest::on()).await.is_ok());
            engine.carried(Carried::Waiting);
            engine.carried(Carried::Waiting);
            let started = tokio::time::Instant::now();
            let off = request(&engine, AllowBackupRequest::off()).await.unwrap();
            let Granted::Released {
                restart: Some(r), ..
            } = &off
            else {
                panic!("{off:?}")
            };
            assert_eq!(r.sessions, 2);
            assert_eq!(r.answers, down.is_some(), "{down:?}");
            match down {
                // Up at once, or after four reads 50+100+200+400 ms apart.
                Some(0) => assert_eq!(started.elapsed(), Duration::ZERO),
                Some(_) => assert_eq!(started.elapsed(), Duration::from_millis(750)),
                // Never: OFF still releases, within the bound.
                None => {
                    assert!(started.elapsed() <= Duration::from_secs(10));
                    assert!(off.to_string().contains(SERVER_NOT_BACK), "{off}");
                }
            }
            assert!(engine.read_state().is_none(), "released in every case");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn on_reads_the_servers_backends_again_once_authorised() {
        let cfg = FreezeConfig {
            allowed: vec!["cn=admin,dc=example,dc=org".into()],
            ..FreezeConfig::default()
        };
        let engine = Arc::new(Engine::new(cfg, BackendMap::new([]).unwrap()));
        let server = Arc::new(Facts(
            vec!["dc=example,dc=org", "dc=other,dc=org"],
            Default::default(),
        ));
        engine.set_discovery(server.clone(), true, Duration::from_secs(60));
        // Someone who may not freeze makes the proxy read nothing upstream.
        let stranger = Requester {
            bound_dn: Some("uid=x,dc=example,dc=org".into()),
            ..admin()
        };
        let on = abproxy_proto::encode_request(&AllowBackupRequest::on());
        let e = engine.allow_backup(stranger, Some(&on)).await.unwrap_err();
        assert_eq!(e.result_code(), LdapResultCode::InsufficentAccessRights);
        assert_eq!(server.1.load(Ordering::SeqCst), 0);
        assert!(engine.backends().is_empty());
        // An operator's ON freezes what the server has now.
        assert!(request(&engine, AllowBackupRequest::on()).await.is_ok());
        assert_eq!(server.1.load(Ordering::SeqCst), 1);
        let suffixes: Vec<_> = engine
            .backends()
            .backends()
            .iter()
            .map(|b| b.suffix.clone())
            .collect();
        assert_eq!(suffixes, ["dc=example,dc=org", "dc=other,dc=org"]);
        assert!(status(&engine).backends.iter().all(|b| b.frozen));
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepare_that_never_returns_fails_on_at_its_deadline() {
        let engine = hung_engine(true, false);
        let started = tokio::time::Instant::now();
        let e = request(&engine, AllowBackupRequest::on())
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(e.result_code(), LdapResultCode::Other);
        assert!(
            matches!(
                &e,
                FreezeError::PrepareFailed(StepFailure { backend, step: Step::Prepare, source })
                    if backend == "dc=example,dc=org" && source.is_timeout()
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "prepare failed for backend dc=example,dc=org: the prepare step did not finish \
                 within 2 s (driver_timeout_secs)"
            ),
            "{msg}"
        );
        assert!(engine.read_state().is_none(), "the freeze is undone");
        assert_eq!(status(&engine).freeze, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_done_that_never_returns_still_ends_the_freeze_at_its_deadline() {
        let engine = hung_engine(false, true);
        assert!(request(&engine, AllowBackupRequest::on()).await.is_ok());
        let off = tokio::spawn({
            let engine = engine.clone();
            async move { request(&engine, AllowBackupRequest::off()).await }
        });
        // While the done step runs, the status says releasing.
        while status(&engine).phase() != Some(Phase::Releasing) {
            tokio::task::yield_now().await;
        }
        let s = status(&engine);
        assert_eq!(s.freeze.as_ref().map(|f| f.id), Some(1));
        assert!(s.to_string().starts_with("releasing by "), "{s}");
        let started = tokio::time::Instant::now();
        let e = off.await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(e.result_code(), LdapResultCode::Other);
        let FreezeError::DoneFailed(failures) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].step, Step::Done);
        assert!(failures[0].source.is_timeout());
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "released, but done steps failed: dc=example,dc=org: the done step did not \
                 finish within 2 s"
            ),
            "{msg}"
        );
        assert!(engine.read_state().is_none(), "released");
        assert_eq!(status(&engine).phase(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_timer_ends_with_its_freeze() {
        let engine = Arc::new(engine(false));
        assert!(request(&engine, AllowBackupRequest::on()).await.is_ok());
        assert!(request(&engine, AllowBackupRequest::off()).await.is_ok());
        // Let the timer task see the end of its freeze.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            (Arc::strong_count(&engine), Arc::weak_count(&engine)),
            (1, 0),
            "no timer task left holding the engine"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_still_ends_a_freeze_nobody_releases() {
        let engine = Arc::new(engine(false));
        assert!(request(&engine, AllowBackupRequest::on()).await.is_ok());
        let lease = Duration::from_secs(engine.config().lease_secs);
        tokio::time::sleep(lease - Duration::from_secs(1)).await;
        assert!(engine.read_state().is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(engine.read_state().is_none(), "expired");
        let e = request(&engine, AllowBackupRequest::off())
            .await
            .unwrap_err();
        assert!(matches!(e, FreezeError::Expired { id: 1, .. }), "{e:?}");
        assert_eq!(e.result_code(), LdapResultCode::Other);
        let msg = e.to_string();
        assert!(msg.starts_with("freeze expired after"), "{msg}");
    }

    #[test]
    fn operators_under_a_backend_are_warned_about_when_binds_are_writes() {
        assert!(engine(false).operator_bind_warnings().is_empty());
        let w = engine(true).operator_bind_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with(
            "freeze.allowed cn=admin,dc=example,dc=org lies under backend dc=example,dc=org"
        ));
    }

    #[test]
    fn operator_binds_are_held_only_while_binds_are_reads() {
        use ldap3_proto::proto::{LdapBindCred, LdapBindRequest, LdapMsg, LdapOp};
        let bind = crate::wire::pdu::encode(LdapMsg::new(
            1,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: "cn=admin,dc=example,dc=org".into(),
                cred: LdapBindCred::Simple("x".into()),
            }),
        ));
        let env = Envelope::request(&bind).unwrap();
        assert_eq!(engine(false).classify(&env, &bind, None), Class::NEVER);
        let c = engine(true).classify(&env, &bind, None);
        assert_eq!((c.kind, c.backends), (Kind::Write, BackendSet(1)));
    }

    #[test]
    fn binds_to_root_dns_write_nothing_and_operators_among_them_are_never_held() {
        use ldap3_proto::proto::{LdapBindCred, LdapBindRequest, LdapMsg, LdapOp};
        let bind = |dn: &str| {
            crate::wire::pdu::encode(LdapMsg::new(
                1,
                LdapOp::BindRequest(LdapBindRequest {
                    version: 3,
                    dn: dn.into(),
                    cred: LdapBindCred::Simple("wrong".into()),
                }),
            ))
        };
        let cfg = FreezeConfig {
            allowed: vec![
                "cn=admin,dc=example,dc=org".into(),
                "cn=backup,dc=example,dc=org".into(),
            ],
            bind_is_write: BindIsWrite::Yes,
            // Another spelling of the same DNs.
            root_dns: vec![
                "CN=Admin, DC=Example,dc=org".into(),
                "cn=Manager,dc=example,dc=org".into(),
            ],
            ..FreezeConfig::default()
        };
        let map = BackendMap::new([("dc=example,dc=org".to_string(), Mode::Readonly)]).unwrap();
        let e = Engine::new(cfg, map);
        let class = |dn: &str| {
            let frame = bind(dn);
            let env = Envelope::request(&frame).unwrap();
            e.classify(&env, &frame, None)
        };
        // An operator that is a rootdn: never held, even in stop mode.
        assert_eq!(class("cn=admin,dc=example,dc=org"), Class::NEVER);
        // A rootdn that is no operator: a read of its backend.
        let c = class("cn=manager,dc=example,dc=org");
        assert_eq!((c.kind, c.backends), (Kind::Read, BackendSet(1)));
        // An operator that is no rootdn, and anyone else: writes.
        for dn in ["cn=backup,dc=example,dc=org", "uid=u1,dc=example,dc=org"] {
            let c = class(dn);
            assert_eq!((c.kind, c.backends), (Kind::Write, BackendSet(1)), "{dn}");
        }
        // Only the operator that is no rootdn is warned about.
        let w = e.operator_bind_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("freeze.allowed cn=backup,dc=example,dc=org "),
            "{w:?}"
        );
    }

    #[test]
    fn auto_binds_are_writes_until_the_server_says_it_has_no_password_policy() {
        let mut cfg = FreezeConfig {
            bind_is_write: BindIsWrite::Auto,
            ..FreezeConfig::default()
        };
        let map = || BackendMap::new([("dc=example,dc=org".to_string(), Mode::Readonly)]).unwrap();
        let e = Engine::new(cfg.clone(), map());
        assert!(e.binds_are_writes(), "unknown: writes");
        e.set_password_policy(Some(false));
        assert!(!e.binds_are_writes());
        e.set_password_policy(Some(true));
        assert!(e.binds_are_writes());
        e.set_password_policy(Some(false));
        e.set_password_policy(None);
        assert!(e.binds_are_writes(), "unreadable root DSE: writes");
        // Explicit settings are kept.
        for (set, want) in [(BindIsWrite::Yes, true), (BindIsWrite::No, false)] {
            cfg.bind_is_write = set;
            let e = Engine::new(cfg.clone(), map());
            e.set_password_policy(Some(!want));
            assert_eq!(e.binds_are_writes(), want, "{set:?}");
        }
    }
}
