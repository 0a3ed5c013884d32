//! Soak run (a benchmark binary, not a test): mixed read/write load from
//! many clients through the proxy (the real binary) to a real slapd, with a
//! freeze/thaw cycle every few hundred milliseconds. At the end it checks
//! that every acknowledged write is present exactly once and reached slapd
//! in its client's order, and prints cycles, operations, lost, duplicated,
//! reordered, the proxy's peak resident memory and the deepest queue.
//!
//! ```text
//! cargo bench --bench soak                      # 100 cycles, 64 clients
//! SOAK_CYCLES=1000 cargo bench --bench soak     # the long configuration
//! ```
//! Settings (environment): `SOAK_CYCLES` (100), `SOAK_CLIENTS` (64),
//! `SOAK_HOLD_MS` (frozen time per cycle, 50), `SOAK_GAP_MS` (thawed time
//! between cycles, 100).
//!
//! Between the proxy and slapd sits the tests' TCP shim, which sees the
//! order in which slapd receives each client's adds.

// The integration tests' support module; this bench uses part of it.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abproxy::wire::{op, Envelope};
use abproxy_proto::{AllowBackupRequest, ALLOW_BACKUP_STATUS_OID};
use support::freeze::*;
use support::process::*;
use support::shim::Shim;
use support::*;
use testkit::{user_dn, Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (client, n) of an add of `cn=s{client}-{n},...`.
fn add_id(frame: &[u8]) -> Option<(usize, u64)> {
    let env = Envelope::request(frame).ok()?;
    if env.op != op::ADD_REQUEST {
        return None;
    }
    let dn = std::str::from_utf8(env.dn_bytes(frame)?).ok()?;
    let (c, n) = dn
        .strip_prefix("cn=s")?
        .split(',')
        .next()?
        .split_once('-')?;
    Some((c.parse().ok()?, n.parse().ok()?))
}

#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
    duplicated: AtomicU64,
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks every bench target
    }
    let cycles = env("SOAK_CYCLES", 100);
    let clients = env("SOAK_CLIENTS", 64) as usize;
    let hold = Duration::from_millis(env("SOAK_HOLD_MS", 50));
    let gap = Duration::from_millis(env("SOAK_GAP_MS", 100));

    let slapd = tokio::task::spawn_blocking(|| {
        Slapd::start(SlapdOptions {
            nosync: true,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("start slapd");
    // Arrival order at slapd: the last n seen per client, and reorderings.
    let last_seen: Arc<Mutex<HashMap<usize, u64>>> = Arc::default();
    let reordered = Arc::new(AtomicU64::new(0));
    let shim = {
        let (last_seen, reordered) = (last_seen.clone(), reordered.clone());
        Shim::start_observed(
            &slapd.addr().to_string(),
            Arc::new(move |f: &[u8]| {
                if let Some((c, n)) = add_id(f) {
                    let mut m = last_seen.lock().unwrap();
                    let last = m.entry(c).or_insert(0);
                    if n <= *last {
                        reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    *last = n;
                }
            }),
        )
        .await
    };
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = write_config(
        dir.path(),
        &shim.url(),
        &format!("[freeze]\nallowed = [\"{ADMIN_DN}\"]\nmax_drain_secs = 10\n"),
    );
    let mut proxy = Running::start(&["serve", "--config", &config]);
    proxy.wait_for("listening");
    let pid = proxy.child.id();

    // The clients: each pipelines an add of its next entry and a search,
    // then waits for both answers.
    let stop = tokio_util::sync::CancellationToken::new();
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (addr, stop, tally) = (addr.clone(), stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConn::connect(&addr).await;
            conn.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
            assert_eq!(result_code(&conn.recv().await.unwrap()), Some(0));
            let mut acked = Vec::new();
            let mut n: u64 = 0;
            let mut id: i32 = 1;
            while !stop.is_cancelled() {
                n += 1;
                let dn = format!("cn=s{c}-{n},dc=example,dc=org");
                let mut both = encode(add(id + 1, &dn, &format!("s{c}-{n}"))).to_vec();
                let base = user_dn(1 + (c + n as usize) % 100);
                both.extend_from_slice(&encode(search(
                    id + 2,
                    &base,
                    0,
                    "(objectClass=*)",
                    &["uid"],
                )));
                conn.send(&both).await;
                let (_, codes) = recv_finals(&mut conn, &[id + 1, id + 2]).await;
                id += 2;
                tally.ops.fetch_add(2, Ordering::Relaxed);
                match codes[0] {
                    0 => acked.push(dn),
                    68 => {
                        tally.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if codes[1] != 0 {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            acked
        }));
    }

    // The freeze cycles.
    let mut admin = RawConn::connect(&addr).await;
    admin.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&admin.recv().await.unwrap()), Some(0));
    let started = Instant::now();
    let (mut msgid, mut max_queue, mut failed_cycles) = (2, 0u64, 0u64);
    for _ in 0..cycles {
        let (code, msg) = call(&mut admin, ab(msgid, &AllowBackupRequest::on())).await;
        msgid += 1;
        if code != 0 {
            eprintln!("ON failed: {code} {msg}");
            failed_cycles += 1;
            continue;
        }
        tokio::time::sleep(hold).await;
        admin
            .send_msg(exop(msgid, ALLOW_BACKUP_STATUS_OID, None))
            .await;
        let f = admin.recv_until_final(msgid).await.pop().unwrap();
        msgid += 1;
        let env = Envelope::response(&f).unwrap();
        if let Some(v) = env.value_bytes(&f) {
            let s = abproxy_proto::decode_status(v).unwrap();
            max_queue = max_queue.max(s.queued_requests);
        }
        let (code, msg) = call(&mut admin, ab(msgid, &AllowBackupRequest::off())).await;
        msgid += 1;
        if code != 0 {
            eprintln!("OFF failed: {code} {msg}");
            failed_cycles += 1;
        }
        tokio::time::sleep(gap).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("a client failed"));
    }
    let peak = peak_rss_kib(pid);

    // Present exactly once: read every cn=s* entry straight from slapd.
    let mut direct = RawConn::connect(&slapd.addr().to_string()).await;
    direct.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
    assert_eq!(result_code(&direct.recv().await.unwrap()), Some(0));
    direct
        .send_msg(search(2, "dc=example,dc=org", 1, "(cn=s*)", &["1.1"]))
        .await;
    let mut present = HashSet::new();
    for f in direct.recv_until_final(2).await {
        let env = Envelope::response(&f).unwrap();
        if env.op == op::SEARCH_RESULT_ENTRY {
            let dn = String::from_utf8_lossy(env.dn_bytes(&f).unwrap()).to_lowercase();
            present.insert(dn);
        }
    }
    let acked: HashSet<String> = acked.into_iter().map(|d| d.to_lowercase()).collect();
    let lost = acked.difference(&present).count();
    let unacknowledged = present.difference(&acked).count();
    let ops = tally.ops.load(Ordering::Relaxed);
    let dup = tally.duplicated.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let reordered = reordered.load(Ordering::Relaxed);

    println!("| cycles | clients | ops | ops/s | writes acked | lost | duplicated | reordered | errors | proxy peak RSS | deepest queue |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {clients} | {ops} | {:.0} | {} | {lost} | {dup} | {reordered} | {errors} | {} MiB | {max_queue} |",
        cycles - failed_cycles,
        ops as f64 / elapsed.as_secs_f64(),
        acked.len(),
        peak / 1024,
    );
    assert_eq!(proxy.sigterm_and_wait(), 0);
    assert!(
        lost == 0
            && unacknowledged == 0
            && dup == 0
            && reordered == 0
            && errors == 0
            && failed_cycles == 0,
        "soak found a problem: lost {lost}, applied but unacknowledged {unacknowledged}, \
         duplicated {dup}, reordered {reordered}, errors {errors}, failed cycles {failed_cycles}"
    );
}
