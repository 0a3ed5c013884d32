//! One tiny run of each throughput workload against a throwaway slapd
//! through an in-process proxy (`abproxy::ProxyHandle`, configured as the
//! benchmark configures its abproxy process), and one Allow-Backup ON/OFF
//! cycle: every request must get a successful answer. Nothing is timed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use loadgen::freeze::{on_off_cycles, Admin, FreezeOps};
use loadgen::point::run_point;
use loadgen::procs::abproxy_config;
use loadgen::workload::{Kind, Workload};
use loadgen::Opts;
use testkit::{Slapd, SlapdOptions};

const USERS: usize = 20;

#[test]
fn tiny_workloads_through_an_in_process_proxy() {
    let slapd = match Slapd::start(SlapdOptions {
        users: USERS,
        nosync: true,
        ..Default::default()
    }) {
        Ok(s) => s,
        Err(e) => return testkit::skip(format_args!("no slapd: {e:#}")),
    };
    let opts = Opts::parse_with(
        &["--haproxy=0".to_string(), format!("--users={USERS}")],
        |_| None,
    )
    .unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = abproxy_config((listen, None), &slapd.url(), &opts, None);
    let config = abproxy::Config::from_toml(&toml::to_string(&cfg).unwrap()).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
        let url = proxy.endpoints()[0].url();
        let addr: SocketAddr = url.trim_start_matches("ldap://").parse().unwrap();
        for kind in [Kind::Search, Kind::Bind, Kind::Modify] {
            let w = Arc::new(Workload::new(kind, USERS));
            let p = run_point(
                addr,
                w,
                2,
                Duration::ZERO,
                Duration::from_millis(150),
                Vec::new(),
            )
            .await;
            // A client stops at its first failed or unanswered request.
            assert!(p.errors.is_empty(), "{kind:?}: {:?}", p.errors);
            assert!(!p.lat.is_empty(), "{kind:?}: no request completed");
            assert!(p.ops_per_sec > 0.0, "{kind:?}");
        }
        // The freeze section's admin: one measured ON/OFF cycle.
        let ops = Arc::new(FreezeOps::new(USERS));
        let mut admin = Admin::connect(addr, ops).await.unwrap();
        let (mut on, mut off) = (Vec::new(), Vec::new());
        on_off_cycles(&mut admin, 1, &mut on, &mut off)
            .await
            .unwrap();
        assert_eq!((on.len(), off.len()), (1, 1));
        admin.c.unbind().await;
    });
}
