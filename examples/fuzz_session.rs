//! Runs the session fuzz check (`abproxy::fuzzing::check_session`) over a
//! corpus without libFuzzer, and prints executions per second: where its
//! time goes can be profiled on stable (perf, callgrind) with this.
//!
//! ```text
//! cargo run --release --features fuzzing --example fuzz_session -- [DIR] [ROUNDS]
//! ```
//!
//! DIR defaults to `fuzz/seeds/session`, ROUNDS (passes over it) to 10.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/session").into());
    let rounds: usize = args.next().map_or(10, |r| r.parse().expect("ROUNDS"));
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let inputs: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
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
    let mut slow: Vec<_> = per_input.iter().zip(&paths).collect();
    slow.sort_by(|a, b| b.0.cmp(a.0));
    for (t, p) in slow.iter().take(5) {
        println!(
            "{:>9.1} us  {}",
            t.as_secs_f64() * 1e6 / rounds as f64,
            p.display()
        );
    }
}
