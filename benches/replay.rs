//! `cargo bench --bench replay`: how fast `abproxy journal replay` puts
//! journaled writes back on a server, next to `ldapmodify` fed the same
//! changes (`abproxy journal show --ldif`).
//!
//! ```text
//! cargo bench --bench replay                        # 4,000 writes, 3 rounds
//! REPLAY_WRITES=20000 REPLAY_ROUNDS=5 cargo bench --bench replay
//! ```
//!
//! A throwaway slapd (testkit, 1,000 users, no fsync) with abproxy in
//! front of it in this process, its journal in a temporary directory
//! (`durability = "interval"`: the writes are made only to be replayed).
//! `ldapmodify` through the proxy makes `REPLAY_WRITES` writes, one at a
//! time: adds of `cn=rN` entries and replaces of users' `description`,
//! alternately. Then, each round, two fresh slapds with the same starting
//! data: one gets `abproxy journal replay --dir JOURNAL`, the other
//! `ldapmodify` of `journal show --ldif`, each timed from spawn to exit;
//! which goes first alternates from round to round. Both must end with the
//! entries the live server holds (counted), or the bench fails.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW, SUFFIX};

const USERS: usize = 1000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn slapd() -> Slapd {
    Slapd::start(SlapdOptions {
        users: USERS,
        nosync: true,
        ..Default::default()
    })
    .expect("start slapd (needs the slapd package)")
}

/// The changes the bench makes through the proxy, as LDIF.
fn workload(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i % 2 == 0 {
            s.push_str(&format!(
                "dn: cn=r{i},{SUFFIX}\nchangetype: add\nobjectClass: device\ncn: r{i}\n\n"
            ));
        } else {
            s.push_str(&format!(
                "dn: {}\nchangetype: modify\nreplace: description\ndescription: r{i}\n-\n\n",
                testkit::user_dn(i % USERS + 1)
            ));
        }
    }
    s
}

fn ldapmodify(url: &str, ldif: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new("ldapmodify")
        .args(["-x", "-H", url, "-D", ADMIN_DN, "-w", ADMIN_PW])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("ldapmodify (ldap-utils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ldif.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "ldapmodify failed: {status}");
    t.elapsed()
}

fn replay(bin: &Path, journal: &Path, url: &str) -> Duration {
    let t = Instant::now();
    let out = Command::new(bin)
        .args(["journal", "replay", "--dir"])
        .arg(journal)
        .args(["--to", url, "--bind-dn", ADMIN_DN])
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .env_remove("ABPROXY_LOG")
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "journal replay failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Entries under the suffix: what both copies must end with.
fn count(url: &str) -> usize {
    let out = Command::new("ldapsearch")
        .args(["-x", "-LLL", "-H", url, "-D", ADMIN_DN, "-w", ADMIN_PW])
        .args(["-b", SUFFIX, "(objectClass=*)", "1.1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("dn: "))
        .count()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let writes = env_usize("REPLAY_WRITES", 4000);
    let rounds = env_usize("REPLAY_ROUNDS", 3).max(1);
    let bin = testkit::product::binary().expect("the abproxy binary to measure");
    let bin = bin.as_path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let live = slapd();
    let tmp = tempfile::tempdir().unwrap();
    let journal = tmp.path().join("journal");
    let mut config = abproxy::config::Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: live.url(),
        ..Default::default()
    };
    config.journal.dir = Some(journal.clone());
    config.journal.durability = abproxy::journal::DurabilityName::Interval;
    let proxy = rt
        .block_on(abproxy::ProxyHandle::spawn(config))
        .expect("start abproxy");
    eprintln!("replay: {writes} writes through abproxy...");
    ldapmodify(&proxy.url(), &workload(writes));
    let want = count(&live.url());
    let show = Command::new(bin)
        .args(["journal", "show", "--ldif", "--dir"])
        .arg(&journal)
        .output()
        .unwrap();
    assert!(show.status.success());
    let ldif = String::from_utf8(show.stdout).unwrap();
    assert_eq!(ldif.matches("changetype:").count(), writes);

    let (mut by_replay, mut by_ldapmodify) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = (slapd(), slapd());
        let mut run = |first_replay: bool| {
            if first_replay {
                by_replay.push(replay(bin, &journal, &a.url()).as_secs_f64());
            } else {
                by_ldapmodify.push(ldapmodify(&b.url(), &ldif).as_secs_f64());
            }
        };
        let replay_first = round % 2 == 0;
        run(replay_first);
        run(!replay_first);
        assert_eq!(count(&a.url()), want, "the replayed copy");
        assert_eq!(count(&b.url()), want, "the ldapmodify copy");
        eprintln!(
            "replay: round {}: journal replay {:.2} s, ldapmodify {:.2} s",
            round + 1,
            by_replay[round],
            by_ldapmodify[round]
        );
    }
    let (r, l) = (median(by_replay), median(by_ldapmodify));
    println!("\n| writes | journal replay s | ldapmodify s | replay/ldapmodify time | replay writes/s | ldapmodify writes/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {writes} | {r:.2} | {l:.2} | {:.2} | {:.0} | {:.0} |",
        r / l,
        writes as f64 / r,
        writes as f64 / l
    );
    println!("(medians over {rounds} round(s); slapd without fsync, 1,000 users, fresh per run)");
    rt.block_on(async { drop(proxy) });
}
