//! Client floods against a real slapd: 10,000 idle connections (the
//! default `max_connections`), and 1,000 clients pipelining writes during a
//! freeze until the queue caps hold them by backpressure.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::support::freeze::*;
use crate::support::process::*;
use crate::support::*;
use abproxy_proto::AllowBackupRequest;
use futures::future::join_all;
use ldap3_proto::proto::LdapResultCode;
use testkit::{SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN};

/// The open-file limit both tests need: the proxy (its own process) needs
/// two descriptors per connection (client and upstream side), this process
/// one per client, slapd one per connection.
const NOFILE: u64 = 30_000;

/// Raises this process's open-file limit to [`NOFILE`] once (slapd and the
/// proxy, started afterwards, inherit it), for every test of the binary:
/// the limit is process-wide, and two tests raising it side by side could
/// each read the old value and the second set it lower again. Only raises.
/// Returns the limit in force.
fn raised_nofile() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| raise_nofile(NOFILE))
}

fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    let target = libc::rlimit {
        rlim_cur: want.max(r.rlim_cur),
        rlim_max: want.max(r.rlim_max),
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &target) } == 0 {
        return target.rlim_cur;
    }
    // Not allowed to raise the hard limit: as far as it goes.
    let soft = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    r.rlim_max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections() {
    let limit = raised_nofile() as usize;
    let n = 10_000.min((limit - 200) / 2);
    if n < 10_000 {
        println!(
            "open-file limit {limit} (cannot be raised here): {n} connections instead of 10,000"
        );
    }
    let slapd = start_slapd(SlapdOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = write_config(
        dir.path(),
        &slapd.url(),
        &format!("max_connections = {n}\n"),
    );
    let mut proxy = Running::start(&["serve", "--config", &config]);
    proxy.wait_for("listening");
    let pid = proxy.child.id();
    let mut first = RawConn::connect(&addr).await;
    round_trip(&mut first, 1).await;
    let rss_before = rss_kib(pid);

    // n - 2 more idle clients, each with one round trip (so its upstream
    // connection exists), opened 250 at a time.
    let mut idle = vec![first];
    while idle.len() < n - 1 {
        let k = 250.min(n - 1 - idle.len());
        let conns = join_all((0..k).map(|_| {
            let addr = addr.clone();
            async move {
                let mut c = RawConn::connect(&addr).await;
                round_trip(&mut c, 1).await;
                c
            }
        }))
        .await;
        idle.extend(conns);
    }
    let per_conn = (rss_kib(pid).saturating_sub(rss_before)) * 1024 / (n as u64 - 2);
    println!("proxy memory per idle connection: {per_conn} bytes");
    assert!(
        per_conn < 128 * 1024,
        "{per_conn} bytes per idle connection"
    );

    // The last one allowed is served at once, one more is told why not.
    let last = bound_at(&addr, ADMIN_DN, ADMIN_PW).await;
    let mut over = RawConn::connect(&addr).await;
    let frames = over.recv_all().await;
    assert_eq!(frames.len(), 1);
    let msg = assert_notice(&frames[0], LdapResultCode::Unavailable as i64);
    assert!(msg.contains("max_connections"), "{msg}");

    // Idle ones still work, spread over the whole set.
    for c in idle.iter_mut().step_by(97) {
        round_trip(c, 2).await;
    }
    // All closed: every upstream connection goes with its client.
    drop(idle);
    drop(last);
    let port = slapd.port();
    wait_until("all upstream connections to close", 60, || {
        !kernel_sockets()
            .iter()
            .any(|s| s.established && s.remote_port == port)
    })
    .await;
    assert_eq!(proxy.sigterm_and_wait(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_pipelining_during_a_freeze_are_held_by_the_caps() {
    const CLIENTS: usize = 1000;
    const WRITES: usize = 12;
    const TOTAL_CAP: usize = 2000;
    raised_nofile();
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            stats_log: true,
            ..Default::default()
        },
        |c| {
            c.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
            c.freeze.queue_max_requests_per_conn = 5;
            c.freeze.queue_max_requests_total = TOTAL_CAP;
        },
    )
    .await;
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    // Writers bind before the freeze (binds are not writes here anyway).
    let mut writers = join_all((0..CLIENTS).map(|_| bound(&lab, ADMIN_DN, ADMIN_PW))).await;
    assert_eq!(
        call(&mut admin, ab(2, &AllowBackupRequest::on())).await.0,
        0
    );

    // Everyone pipelines all its writes in one go.
    let dn = |c: usize, n: usize| format!("cn=fl-{c}-{n},dc=example,dc=org");
    join_all(writers.iter_mut().enumerate().map(|(c, w)| async move {
        let mut all = Vec::new();
        for n in 0..WRITES {
            all.extend_from_slice(&encode(add(
                2 + n as i32,
                &dn(c, n),
                &format!("fl-{c}-{n}"),
            )));
        }
        w.send(&all).await;
    }))
    .await;
    // The total cap holds: sessions holding queued requests stop reading,
    // the rest waits in the kernel, nothing is refused and nothing reaches
    // slapd. (A session with nothing queued still reads one request, so the
    // total may be passed by at most one request per connection.)
    let s = wait_status(&lab, "the total queue cap", |s| {
        s.queued_requests >= TOTAL_CAP as u64
    })
    .await;
    assert!(s.queued_requests <= (TOTAL_CAP + CLIENTS) as u64, "{s:?}");
    assert!(s.queued_requests < (CLIENTS * WRITES) as u64);
    assert_eq!(s.in_flight, 0);
    assert_nothing_pending(&mut writers[0]).await;

    assert_eq!(
        call(&mut admin, ab(3, &AllowBackupRequest::off())).await.0,
        0
    );
    // Every write answered once, successfully (a duplicate add would get
    // alreadyExists).
    join_all(writers.iter_mut().map(|w| async move {
        let ids: Vec<i32> = (2..2 + WRITES as i32).collect();
        let (_, codes) = recv_finals(w, &ids).await;
        assert!(codes.iter().all(|&c| c == 0), "{codes:?}");
    }))
    .await;
    // slapd received each client's writes in the client's order: its
    // operation numbers per connection grow with n.
    let needle = format!("ADD dn=\"cn=fl-{}-{}", CLIENTS - 1, WRITES - 1);
    wait_until("slapd to log the last add", 30, || {
        std::fs::read_to_string(lab.slapd.log_path()).is_ok_and(|l| l.contains(&needle))
    })
    .await;
    let log = std::fs::read_to_string(lab.slapd.log_path()).unwrap();
    let mut seen: HashMap<usize, Vec<(u64, usize)>> = HashMap::new();
    for line in log.lines() {
        let Some(rest) = line.split(" op=").nth(1) else {
            continue;
        };
        let Some((op, dn)) = rest.split_once(" ADD dn=\"cn=fl-") else {
            continue;
        };
        let (c, n) = dn.split_once(',').unwrap().0.split_once('-').unwrap();
        let (c, n): (usize, usize) = (c.parse().unwrap(), n.parse().unwrap());
        seen.entry(c).or_default().push((op.parse().unwrap(), n));
    }
    assert_eq!(seen.len(), CLIENTS);
    for (c, mut ops) in seen {
        assert_eq!(
            ops.len(),
            WRITES,
            "client {c}: each write reached slapd once"
        );
        ops.sort();
        let order: Vec<usize> = ops.iter().map(|&(_, n)| n).collect();
        assert_eq!(
            order,
            (0..WRITES).collect::<Vec<_>>(),
            "client {c} reordered"
        );
    }
}
