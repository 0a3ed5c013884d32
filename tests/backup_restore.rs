//! End to end: a file-level backup of a live slapd taken with
//! `abproxy run -- cp ...` while clients keep writing through the proxy,
//! restored into a second slapd.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use abproxy::lab::{Slapd, SlapdOptions, ADMIN_DN, ADMIN_PW};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");
const WRITERS: usize = 8;

/// DN -> entryCSN of every `cn=w...` entry in an LDIF dump.
fn written(ldif: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for entry in ldif.split("\n\n") {
        let dn = entry.lines().find_map(|l| l.strip_prefix("dn: cn=w"));
        let csn = entry.lines().find_map(|l| l.strip_prefix("entryCSN: "));
        if let (Some(dn), Some(csn)) = (dn, csn) {
            assert!(
                out.insert(format!("cn=w{dn}"), csn.to_string()).is_none(),
                "cn=w{dn} twice"
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abproxy_run_copies_a_consistent_live_database_that_restores() {
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c| c.freeze.allowed = vec![ADMIN_DN.into()],
    )
    .await;
    let addr = lab.proxy_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (addr, stop) = (addr.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut c = RawConn::connect(&addr).await;
            c.send_msg(bind(1, ADMIN_DN, ADMIN_PW)).await;
            assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
            let mut acked = Vec::new();
            let mut n: i32 = 0;
            while !stop.is_cancelled() {
                n += 1;
                let dn = format!("cn=w{w}-{n},dc=example,dc=org");
                c.send_msg(add(1 + n, &dn, &format!("w{w}-{n}"))).await;
                let frame = c.recv().await.expect("answer");
                assert_eq!(result_code(&frame), Some(0), "writer {w} write {n} failed");
                acked.push(dn);
            }
            acked
        }));
    }
    let live_count = |lab: &Lab| written(&lab.slapd.slapcat("dc=example,dc=org").unwrap()).len();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while live_count(&lab) < 2 * WRITERS {
        assert!(
            std::time::Instant::now() < deadline,
            "writers make no progress"
        );
    }

    // The backup: wait until writes are held, copy the database files and
    // dump the live server, all while frozen.
    let backup = tempfile::Builder::new()
        .prefix("abp-bak")
        .tempdir_in("/tmp")
        .unwrap();
    let script = format!(
        "set -e
         n=0
         until {bin} status --json | grep -Eq '\"queued_requests\": ?[1-9]'; do
           n=$((n+1)); [ $n -lt 400 ] || {{ echo 'no write was held' >&2; exit 9; }}; sleep 0.05
         done
         cp -a {src} {dst}/db-example
         slapcat -F {cfg} -b dc=example,dc=org -l {dst}/live.ldif",
        bin = BIN,
        src = lab.slapd.dir().join("db-example").display(),
        dst = backup.path().display(),
        cfg = lab.slapd.dir().join("slapd.d").display(),
    );
    let out = tokio::process::Command::new(BIN)
        .args([
            "run",
            "--url",
            &lab.proxied(),
            "--bind-dn",
            ADMIN_DN,
            "--backend",
            "dc=example,dc=org",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .env("ABPROXY_URL", lab.proxied())
        .env("ABPROXY_BIND_DN", ADMIN_DN)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Writers go on after the backup, then stop.
    let at_backup = std::fs::read_to_string(backup.path().join("live.ldif")).unwrap();
    let frozen = written(&at_backup);
    assert!(frozen.len() >= 2 * WRITERS);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while live_count(&lab) < frozen.len() + 2 * WRITERS {
        assert!(
            std::time::Instant::now() < deadline,
            "writers make no progress after the backup"
        );
    }
    stop.cancel();
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.expect("no writer saw an error"));
    }

    // The copy opens in a second slapd and holds exactly what the live
    // server held during the freeze.
    let restored = tokio::task::spawn_blocking({
        let from = backup.path().join("db-example");
        move || {
            Slapd::start(SlapdOptions {
                restore_example: Some(from),
                ..Default::default()
            })
        }
    })
    .await
    .unwrap()
    .expect("the copied database opens");
    let restored_dump = restored.slapcat("dc=example,dc=org").unwrap();
    assert!(
        restored_dump == at_backup,
        "the restored database differs from the live one at the freeze"
    );
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &restored.url(),
            "-b",
            "ou=people,dc=example,dc=org",
            "(uid=user7)",
            "uid",
        ],
        None,
    )
    .await;
    assert!(
        out.stdout.contains("uid: user7"),
        "the restored server serves: {out:?}"
    );

    // Every acknowledged write is on the live server exactly once, in each
    // writer's order.
    let live = written(&lab.slapd.slapcat("dc=example,dc=org").unwrap());
    for (w, dns) in acked.iter().enumerate() {
        let mut last = String::new();
        for dn in dns {
            let csn = live
                .get(dn)
                .unwrap_or_else(|| panic!("acknowledged {dn} is missing"));
            assert!(*csn > last, "writer {w}: {dn} applied out of order");
            last = csn.clone();
        }
    }
    assert_eq!(
        live.len(),
        acked.iter().map(Vec::len).sum::<usize>(),
        "nothing more, nothing less"
    );
}
