//! `loadgen`: the load benchmark (see the library's documentation for the
//! options). `cargo run -p loadgen --release -- --quick`; the abproxy binary
//! it starts is built for the run as the Debian package builds it, or given
//! with `--abproxy PATH`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", loadgen::opts::USAGE);
        return;
    }
    if let Err(e) = loadgen::run(&args) {
        eprintln!("load benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
