//! One whole run: starts slapd, abproxy (and the reference column), runs
//! the throughput points round by round in [`round_order`], then the
//! freeze, freeze-reads, TLS, journal and threads sections, and prints the
//! tables (to stdout; progress goes to stderr).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use testkit::{Slapd, SlapdOptions};

use crate::freeze::{
    run_freeze, FreezeOps, FreezeResults, FREEZE_GAP, FREEZE_HOLD, FREEZE_MAX_DRAIN_SECS,
};
use crate::opts::Opts;
use crate::order::round_order;
use crate::point::{run_point, LOADGEN_THREAD};
use crate::probe::CpuProbe;
use crate::procs::{abproxy_binary, AbproxyProcess};
use crate::reference::{reference_name, Haproxy, RefProcess, Reference, REFERENCE_NAME};
use crate::report::{Results, Round, Target};
use crate::stats::{fmt_opt, pct_us, per_probe};
use crate::workload::Workload;
use crate::{freeze_reads, journal, threads, tls};

/// Runs the benchmark with the options in `args` (and the environment) and
/// prints its tables. The proxy it starts is the product build unless
/// `--abproxy` (`LOAD_ABPROXY`) names a binary; see [`abproxy_binary`].
pub fn run(args: &[String]) -> Result<()> {
    let opts = Opts::parse(args)?;
    let abproxy_bin = abproxy_binary(&opts)?;
    eprintln!("load: abproxy binary {}", abproxy_bin.display());
    let secs = Duration::from_secs_f64(opts.secs);

    eprintln!("load: starting slapd with {} users...", opts.users);
    let pki = if opts.tls {
        Some(tls::pki().context("making the TLS certificates (needs openssl)")?)
    } else {
        None
    };
    let slapd = Slapd::start(SlapdOptions {
        users: opts.users,
        nosync: true,
        tls: pki.as_ref().map(|p| p.slapd.clone()),
        ..Default::default()
    })
    .context("starting slapd (needs the slapd package)")?;
    let direct = slapd.addr();

    let haproxy = match &opts.haproxy {
        // Only the throughput table has a haproxy column.
        Some(_) if opts.workloads.is_empty() => None,
        Some(Reference::Haproxy(bin)) => match Haproxy::start(bin, direct) {
            Ok(h) => Some(RefProcess::Haproxy(h)),
            Err(e) => {
                eprintln!("load: haproxy column skipped: {e:#}");
                None
            }
        },
        Some(Reference::Itself) => {
            let _ = REFERENCE_NAME.set("abproxy2");
            let p = AbproxyProcess::start(&abproxy_bin, &slapd.url(), &opts, None)
                .context("starting the second abproxy (--haproxy self)")?;
            Some(RefProcess::Abproxy(p))
        }
        Some(Reference::ItselfWithMetrics) => {
            let _ = REFERENCE_NAME.set("abproxy+metrics");
            let mut metrics = toml::Table::new();
            metrics.insert("listen".into(), "127.0.0.1:0".into());
            let p = AbproxyProcess::start_with_tables(
                &abproxy_bin,
                &slapd.url(),
                &opts,
                None,
                &[("metrics", metrics)],
            )
            .context("starting the second abproxy (--haproxy self-metrics)")?;
            Some(RefProcess::Abproxy(p))
        }
        None => None,
    };
    let haproxy_note = match (&haproxy, &opts.haproxy_note) {
        (Some(_), _) => None,
        (None, _) if opts.workloads.is_empty() => Some("no throughput workload".into()),
        (None, Some(n)) => Some(n.clone()),
        (None, None) => Some("haproxy failed to start".into()),
    };

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads)
        .thread_name(LOADGEN_THREAD)
        .enable_all()
        .build()?;
    let proxy = AbproxyProcess::start(
        &abproxy_bin,
        &slapd.url(),
        &opts,
        pki.as_ref().map(|p| &p.proxy),
    )
    .context("starting abproxy")?;
    let abproxy_addr = proxy.addr;

    let mut targets = vec![(Target::Direct, direct), (Target::Abproxy, abproxy_addr)];
    if let Some(h) = &haproxy {
        targets.push((Target::Haproxy, h.addr()));
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut header = String::new();
    let _ = writeln!(
        header,
        "## abproxy load benchmark\n\n\
         - {:.2} s per point after {} ms warm-up, {} round(s); closed-loop clients, one connection each\n\
         - slapd {} (`{}` users, nosync); abproxy `serve`, own process (threads = {}); load generator {} threads; {} cores\n\
         - {}: {}",
        opts.secs,
        opts.warmup.as_millis(),
        opts.rounds,
        direct,
        opts.users,
        opts.proxy_threads,
        opts.client_threads,
        cores,
        reference_name(),
        match (&haproxy, &haproxy_note) {
            (Some(h), _) => h.describe(),
            (None, Some(n)) => format!("n/a: {n}"),
            (None, None) => "n/a".into(),
        }
    );
    eprintln!("{header}");

    let mut results = Results::default();
    let workloads: Vec<Arc<Workload>> = opts
        .workloads
        .iter()
        .map(|&k| Arc::new(Workload::new(k, opts.users)))
        .collect();

    for round in 0..opts.rounds {
        for w in &workloads {
            for &conns in &opts.conns {
                let order = round_order(&targets, round);
                let mut this_round = Round::default();
                for &(t, addr) in &order {
                    let probe = match t {
                        Target::Direct => None,
                        Target::Abproxy => Some(CpuProbe::Process(proxy.child.id())),
                        Target::Haproxy => haproxy.as_ref().map(|h| CpuProbe::Process(h.pid())),
                    };
                    let probes = vec![
                        probe,
                        Some(CpuProbe::Process(slapd.pid())),
                        Some(CpuProbe::Threads(LOADGEN_THREAD)),
                    ];
                    let p = client_rt.block_on(run_point(
                        addr,
                        w.clone(),
                        conns,
                        opts.warmup,
                        secs,
                        probes,
                    ));
                    let cpu = |i: usize| p.cpu_us_per_op.get(i).copied().flatten();
                    eprintln!(
                        "load: round {} {:>6} conns={:<3} {:>8}: {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs  CPU µs/op proxy {:>5} slapd {:>5} loadgen {:>5}  switches/op {}  run-queue wait µs/op {}  migrations/op {}  TCP segments/op {:>4}{}",
                        round + 1,
                        w.kind.name(),
                        conns,
                        t.name(),
                        p.ops_per_sec,
                        fmt_opt(pct_us(&p.lat, 50.0), 0),
                        fmt_opt(pct_us(&p.lat, 99.0), 0),
                        fmt_opt(cpu(0), 1),
                        fmt_opt(cpu(1), 1),
                        fmt_opt(cpu(2), 1),
                        per_probe(&p.switches_per_op, 2),
                        per_probe(&p.run_delay_us_per_op, 1),
                        per_probe(&p.migrations_per_op, 3),
                        fmt_opt(p.segments_per_op, 2),
                        if p.errors.is_empty() {
                            String::new()
                        } else {
                            format!("  ({} errors: {})", p.errors.len(), p.errors[0])
                        }
                    );
                    results.add_point((w.kind, conns, t), &mut this_round, p);
                }
                results.end_round((w.kind, conns), this_round);
            }
        }
    }
    results.finish();

    let mut freeze = FreezeResults::default();
    if opts.freeze {
        client_rt.block_on(run_freeze(&opts, (direct, abproxy_addr), &mut freeze));
    }

    let mut reads = freeze_reads::ReadsResults::default();
    let reads_opts = freeze_reads::ReadsOpts {
        rounds: opts.rounds,
        warmup: opts.warmup,
        secs,
        readers: opts.read_conns,
        writers: opts.read_writers,
        write_rate: opts.write_rate,
    };
    if opts.freeze_reads {
        client_rt.block_on(freeze_reads::run(
            &reads_opts,
            (abproxy_addr, proxy.child.id()),
            Arc::new(FreezeOps::new(opts.users)),
            &mut reads,
        ));
    }

    let mut tls = tls::TlsResults::default();
    if let Some(p) = &pki {
        let slapd_ldaps: SocketAddr = slapd
            .ldaps_url()
            .context("slapd's ldaps listener")?
            .trim_start_matches("ldaps://")
            .parse()?;
        let proxy_ldaps = proxy.ldaps.context("abproxy's ldaps listener")?;
        // A second abproxy in the mirror mode: TLS clients' sessions are
        // TLS to slapd too (two TLS hops).
        let mirror = AbproxyProcess::start_mirror(
            &abproxy_bin,
            &slapd.url(),
            &opts,
            &p.proxy,
            &format!("ldaps://{slapd_ldaps}"),
            &p.ca,
        )
        .context("starting abproxy with tls.upstream_mirror")?;
        let mirror_ldaps = mirror
            .ldaps
            .context("the mirror abproxy's ldaps listener")?;
        for round in 0..opts.rounds {
            client_rt.block_on(tls::run_round(
                round,
                &opts.conns,
                opts.users,
                opts.warmup,
                secs,
                &p.ca,
                [slapd_ldaps, proxy_ldaps, mirror_ldaps],
                &mut tls,
            ))?;
        }
        mirror.stop();
    }

    let mut journal_res = journal::JournalResults::default();
    if opts.journal {
        journal::run(&opts, &abproxy_bin, &client_rt, &mut journal_res)
            .context("the journal section")?;
    }

    let mut threads_res = threads::ThreadsResults::default();
    if opts.threads_section {
        threads::run(&opts, &abproxy_bin, &slapd, &client_rt, &mut threads_res)
            .context("the threads section")?;
    }

    proxy.stop();
    client_rt.shutdown_timeout(Duration::from_secs(2));
    drop(haproxy);
    drop(slapd);

    let has_haproxy = targets.iter().any(|(t, _)| *t == Target::Haproxy);
    println!("{header}");
    if !opts.workloads.is_empty() {
        print!("{}", results.table(&opts, has_haproxy));
        println!();
        println!(
            "Added p99 latency at 1 connection (target p99 - direct p99): {}",
            results.added_latency_at_1(&opts, has_haproxy)
        );
        if has_haproxy {
            println!();
            print!("{}", results.head_to_head_table(&opts));
        }
        if let Some(n) = &haproxy_note {
            println!("haproxy columns skipped: {n}");
        }
    }
    if opts.freeze {
        if !opts.workloads.is_empty() {
            println!();
        }
        println!(
            "### Allow-Backup freeze\n\n\
             {} ON/OFF cycles per scenario (+1 warm-up), {} ms frozen per cycle, {} ms between cycles; \
             backlog {} clients x {} modifies, {} repetition(s) per round; all backends readonly \
             (from the rootDSE), freeze.max_drain_secs {}, queue limits above the backlog\n",
            opts.freeze_cycles,
            FREEZE_HOLD.as_millis(),
            FREEZE_GAP.as_millis(),
            opts.backlog_conns,
            opts.backlog_depth,
            opts.backlog_reps,
            FREEZE_MAX_DRAIN_SECS,
        );
        print!("{}", freeze.table(&opts));
        println!();
        print!("{}", freeze.explanations(&opts));
        if !freeze.errors.is_empty() {
            println!("\nFreeze errors (each stopped its measurement):");
            for e in &freeze.errors {
                println!("- {e}");
            }
        }
    }
    if opts.freeze_reads {
        if !opts.workloads.is_empty() || opts.freeze {
            println!();
        }
        println!(
            "### Reads during a freeze\n\n\
             {} round(s) of an unfrozen phase before each frozen one, {:.2} s per phase after {} ms; \
             {} readers, {} writers at {} modifies/s each in the phases with writers\n",
            opts.rounds,
            opts.secs,
            opts.warmup.as_millis(),
            opts.read_conns,
            opts.read_writers,
            opts.write_rate,
        );
        print!("{}", reads.table());
        println!();
        print!("{}", reads.explanations(&reads_opts));
    }
    if opts.tls {
        println!(
            "\n### TLS\n\nslapd's own TLS (ldaps://) vs abproxy terminating TLS (ldaps://, clear to slapd); \
             TLS 1.3, EC P-256 certificates, no session resumption; `connect` = TCP connect, full \
             handshake, anonymous bind, unbind, close; `search` = the search workload on one TLS \
             connection per client\n"
        );
        print!("{}", tls.table(&opts.conns));
    }
    if opts.journal {
        println!(
            "\n### Journal\n\nmodify, {} round(s), {:.2} s per point after {} ms, targets in a balanced \
             order per round; {} users per slapd; abproxy threads = {}\n",
            opts.rounds,
            opts.secs,
            opts.warmup.as_millis(),
            opts.users,
            opts.proxy_threads,
        );
        print!("{}", journal_res.table(&opts.conns));
        println!();
        print!("{}", journal::explanations());
    }
    if opts.threads_section {
        println!("\n### Threads\n\n{}", threads_res.header(&opts));
        print!("{}", threads_res.table());
        println!();
        print!("{}", threads::explanations());
    }
    let mut errs: Vec<String> = journal_res.errors();
    errs.extend(threads_res.errors());
    for ((k, c, t), a) in &results.cells {
        if !a.errors.is_empty() {
            errs.push(format!(
                "{} conns={c} {}: {} error(s), first: {}",
                k.name(),
                t.name(),
                a.errors.len(),
                a.errors[0]
            ));
        }
    }
    if !errs.is_empty() {
        println!("\nErrors (points with errors stopped those clients early):");
        for e in errs {
            println!("- {e}");
        }
    }
    Ok(())
}
