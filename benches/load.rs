//! `cargo bench --bench load`: the load benchmark of the `loadgen` crate
//! (`loadgen/`, documented there), run against the current code built as
//! the Debian package builds it (`testkit::product`; not this bench's
//! `CARGO_BIN_EXE_abproxy`, which has the dev-dependencies' features).
//! Options as `loadgen`'s, after `--`:
//!
//! ```text
//! cargo bench --bench load -- --quick
//! LOAD_ROUNDS=3 cargo bench --bench load -- --workloads search,modify --conns 1,8
//! ```
//!
//! The same as `cargo run -p loadgen --release -- ...`. The load
//! generator's tests are `cargo test -p loadgen`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // Not run by `cargo bench` (e.g. `cargo test --benches`).
        println!("load: benchmark skipped (use `cargo bench --bench load`)");
        return;
    }
    if let Err(e) = loadgen::run(&args) {
        eprintln!("load benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
