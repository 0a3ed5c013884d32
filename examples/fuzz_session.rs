//! Runs the session fuzz check (`abproxy::fuzzing::check_session`) over a
//! corpus without libFuzzer, and prints executions per second: where its
//! time goes can be profiled on stable (perf, callgrind) with this.
//!
//! ```text
//! cargo run --release --features fuzzing --example fuzz_session -- [DIR] [ROUNDS]
//! ```
//!
//! DIR defaults to `fuzz/seeds/session`, ROUNDS (passes over it) to 10.
//! `--explain FILE` instead: one input's steps, a line each (the client's
//! messages decoded), then the input run once with the proxy's log at
//! `debug` (`RUST_LOG` for another filter): what a finding did.
//! `gen:N` instead of a directory: N structured inputs from a seeded
//! generator (random bodies of 16 to 400 bytes after a header with the
//! structured flag), the same every run: a corpus to compare builds with
//! when there is no fuzz corpus at hand.

use std::time::Instant;

/// `n` random structured inputs, the same every run.
fn generated(n: usize) -> (Vec<String>, Vec<Vec<u8>>) {
    let inputs = abproxy::fuzzing::generated_inputs(n, 385);
    ((0..n).map(|i| format!("gen:{i}")).collect(), inputs)
}

/// Prints `path`'s steps, then runs it with the proxy's log on.
fn explain(path: &str) {
    let input = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for line in abproxy::fuzzing::describe_session_input(&input) {
        println!("{line}");
    }
    println!("-- the run:");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "abproxy=debug".into()),
        )
        .init();
    abproxy::fuzzing::check_session(&input);
    println!("-- the checks passed");
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.next_if(|a| a == "--explain").is_some() {
        let path = args.next().expect("--explain FILE");
        return explain(&path);
    }
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/session").into());
    let rounds: usize = args.next().map_or(10, |r| r.parse().expect("ROUNDS"));
    let (names, inputs) = match dir.strip_prefix("gen:") {
        Some(n) => generated(n.parse().expect("gen:N")),
        None => {
            let mut paths: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{dir}: {e}"))
                .map(|e| e.unwrap().path())
                .collect();
            paths.sort();
            let inputs = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
            (
                paths.iter().map(|p| p.display().to_string()).collect(),
                inputs,
            )
        }
    };
    let mut per_input = vec![std::time::Duration::ZERO; inputs.len()];
    let start = Instant::now();
    for _ in 0..rounds {
        for (i, input) in inputs.iter().enumerate() {
            let t = Instant::now();
            abproxy::fuzzing::check_session(input);
            per_input[i] += t.elapsed();
        }
    }
    let n = rounds * inputs.len();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} executions in {secs:.3} s: {:.0} per second ({} inputs x {rounds})",
        n as f64 / secs,
        inputs.len()
    );
    println!(
        "{} runtimes built",
        abproxy::fuzzing::session_runtimes_built()
    );
    // The slowest inputs (wall time per execution).
    let mut slow: Vec<_> = per_input.iter().zip(&names).collect();
    slow.sort_by(|a, b| b.0.cmp(a.0));
    for (t, name) in slow.iter().take(5) {
        println!("{:>9.1} us  {name}", t.as_secs_f64() * 1e6 / rounds as f64,);
    }
}
