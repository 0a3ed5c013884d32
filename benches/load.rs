//! `cargo bench --bench load`: the load benchmark of the `loadgen` crate
//! (`loadgen/`, documented there), run against the abproxy binary built
//! with this bench (`CARGO_BIN_EXE_abproxy`), so that what is measured is
//! always the current code. Options as `loadgen`'s, after `--`:
//!
//! ```text
//! cargo bench --bench load -- --quick
//! LOAD_ROUNDS=3 cargo bench --bench load -- --workloads search,modify --conns 1,8
//! ```
//!
//! The same as `cargo build --release -p abproxy && cargo run -p loadgen
//! --release -- ...`. The load generator's tests are `cargo test -p loadgen`.

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // Not run by `cargo bench` (e.g. `cargo test --benches`).
        println!("load: benchmark skipped (use `cargo bench --bench load`)");
        return;
    }
    let abproxy = Path::new(env!("CARGO_BIN_EXE_abproxy"));
    if let Err(e) = loadgen::run(&args, Some(abproxy)) {
        eprintln!("load benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
