//! The load generator: an end-to-end load benchmark. What does putting abproxy in front of slapd
//! cost, compared with talking to slapd directly and with a plain TCP proxy
//! (haproxy in `mode tcp`, when installed)?
//!
//! ```text
//! cargo run -p loadgen --release                     # 3 s per point
//! LOAD_SECS=2 cargo run -p loadgen --release         # 2 s per point
//! cargo run -p loadgen --release -- --quick          # smoke run, ~0.5 s per point
//! cargo run -p loadgen --release -- --secs 5 --rounds 3 --conns 1,8 --workloads search,modify
//! cargo run -p loadgen --release -- --workloads freeze     # the freeze section alone
//! cargo run -p loadgen --release -- --workloads tls        # the TLS section alone
//! cargo run -p loadgen --release -- --workloads freeze-reads --rounds 6  # reads during a freeze
//! cargo run -p loadgen --release -- --workloads journal --rounds 3  # what the journal costs writes
//! cargo run -p loadgen --release -- --workloads threads --rounds 5  # choosing `threads`
//! cargo bench --bench load -- --quick                # the same, as a bench of abproxy
//! cargo bench --bench load -- --workloads threads    # the threads section alone
//! ```
//!
//! The abproxy binary it starts is `--abproxy PATH` (`LOAD_ABPROXY`), else
//! the product, built for the run as the Debian package builds it (`cargo
//! build --release --no-default-features` into `target/product`, see
//! `testkit::product`); it says which one it runs. Not the binary `cargo
//! bench` builds with the bench, nor `target/release/abproxy`: those have
//! the dev-dependencies' features (tokio's `test-util` clock, the fuzzing
//! entry points), which cost the proxy instructions the product does not
//! spend. `cargo bench --bench load` is a thin bench of the abproxy package
//! (`benches/load.rs`) around the same run.
//!
//! The crate, by section:
//! * [`opts`]: the options (arguments and `LOAD_*` environment variables);
//! * [`workload`]: the throughput workloads' pre-encoded requests;
//! * [`client`]: the raw LDAP connection of every client;
//! * [`point`]: one measured point, closed-loop clients and their timing;
//! * [`probe`]: CPU time and scheduler counts per operation, from `/proc`;
//! * [`order`]: the order of the targets in each round;
//! * [`procs`]: abproxy as its own process;
//! * [`reference`](mod@reference): the reference column, HAProxy or the A/A control;
//! * [`freeze`]: the Allow-Backup section;
//! * [`freeze_reads`]: the reads-during-a-freeze section;
//! * [`tls`]: the TLS section;
//! * [`journal`](mod@journal): the journal section;
//! * [`threads`](mod@threads): the threads section;
//! * [`stats`]: medians, percentiles, the median's confidence interval;
//! * [`report`]: the throughput tables;
//! * [`run`](mod@run): one whole run, from the options to the printed tables.
//!
//! One run starts a throwaway slapd (`testkit`, 1000 users, no fsync),
//! abproxy as its own process (`serve --config` with `threads` =
//! `--proxy-threads`; see [`procs::AbproxyProcess`]),
//! and, if `haproxy` is on `PATH`, a haproxy with `nbthread 1`, `mode tcp`,
//! no logging; both configs in temporary directories. The load generator runs on a separate tokio runtime (threads
//! named `loadgen`). Everything shares the machine's cores, so on a small
//! machine the numbers are "what the whole box does", and the ratios to
//! `direct` are what matter. Each point also reports the CPU time per
//! operation of the proxy (abproxy's process, haproxy's process), slapd and
//! the load generator, read from `/proc` (user + system time): steadier than
//! throughput on a noisy machine, and what a proxy costs.
//!
//! For each workload x connection count (x round), the targets run back to
//! back (direct, abproxy, haproxy; each round takes the next permutation of
//! the three, see [`order::round_order`]) to reduce drift. Each connection is a
//! closed-loop client: it sends one request (pre-encoded protocolOp, fresh
//! message ID) and waits for its final response before the next; the requests of one connection go to users
//! `conn+1, conn+1+conns, ...` so concurrent clients never touch the same
//! entry. Workloads:
//! * `search`: anonymous base-scope search of `uid=userK,...`, all user
//!   attributes (one entry + done);
//! * `bind`: simple bind as `userK` / `passK` (the same connection rebinds);
//! * `modify`: replace `description` of `userK`, on a connection bound once as
//!   the root DN.
//!
//! `freeze` (last in the default list) is not a throughput point but the
//! Allow-Backup section, printed as a second table. abproxy runs with
//! `freeze.allowed = [ADMIN_DN]`, `max_drain_secs` 10 and queue limits above
//! the backlog; backends come from slapd's rootDSE (readonly mode: writes are
//! held, searches and binds pass). ON, OFF and status are sent on a
//! connection bound as the admin.
//! * ON/OFF cycles, idle: `--freeze-cycles` cycles (+1 unmeasured) of ON,
//!   20 ms frozen, OFF, 50 ms pause; p50/p99 of ON's and OFF's answer times.
//! * The same cycles while `--freeze-conns` closed-loop clients (bound as the
//!   admin) alternate a base search and a modify of their own users through
//!   abproxy: ON then waits for the in-flight modifies to drain.
//! * Backlog release: ON, then `--backlog-conns` clients each pipeline
//!   `--backlog-depth` modifies of their own users in one write; once the
//!   status value reports them all queued, OFF; the time from sending OFF to
//!   the last modify response gives the release rate. The same burst is sent
//!   straight to slapd (`direct`, the ratio's reference) and through abproxy
//!   unfrozen, `--backlog-reps` times in rotating order. Every response is
//!   checked (a modify response, success, each message ID once); a response
//!   before OFF, a backlog never fully queued, or a missing response is
//!   reported as an error, with the proxy's status at that time.
//!
//! `freeze-reads` (not in the default list) is the reads-during-a-freeze
//! section, its own table: `--read-conns` closed-loop readers (anonymous
//! base searches) through abproxy, measured in interleaved phases, an
//! unfrozen one before each of three frozen ones (readonly, set by a raw
//! admin connection; the same with `--read-writers` writers pipelining
//! modifies at `--write-rate`/s each, held by the proxy; the same with the
//! freeze set by an `abproxy::operator::Session` with holdUntilUnbind, as
//! `abproxy run` does); each phase `--secs` after `--warmup-ms`, one such
//! sequence per round. p50/p99 of the reads per kind of phase and their
//! ratios to unfrozen; see [`freeze_reads`].
//!
//! `tls` (not in the default list) is the TLS section, a third table: slapd's
//! own TLS (`ldaps://`) against abproxy terminating TLS (`ldaps://`, clear to
//! slapd), new TLS connections per second and searches over TLS; see
//! [`tls`]. slapd and abproxy then get certificates from a
//! throwaway CA (`openssl`).
//!
//! `journal` (not in the default list) is the journal section, its own
//! table: the `modify` workload straight to slapd and through three abproxy
//! processes (journal off, `interval` at 100 ms, `ack`), against a slapd that
//! syncs its database and one that does not (both started for the section,
//! each journal in a fresh directory on slapd's filesystem), at every
//! `--conns`, the four targets in a balanced order per round; ratios to
//! journal off and to direct; see [`journal`](mod@journal).
//!
//! `threads` (not in the default list) is the threads section, its own
//! table, to choose abproxy's default `threads` from measurements: the
//! `search` and `modify` workloads straight to the run's slapd and through
//! abproxy processes that differ only in `threads`: `default` (no `threads`
//! key in the configuration file, what users run), `threads=1` (a
//! current-thread runtime), `threads=N` and `threads=2N` (multi-thread, N =
//! `available_parallelism`; each value once, so four targets on one core),
//! at every `--conns` and `--threads-many` (many more clients than cores),
//! the targets in a balanced order per round (`--rounds` a multiple of the
//! target count balances the positions); ratios to direct and to
//! `threads=1`, and each proxy's OS threads once it listens (what
//! `default` resolved to); see [`threads`](mod@threads).
//!
//! Options (arguments override environment variables):
//! | argument           | environment           | default              |
//! |--------------------|-----------------------|----------------------|
//! | `--secs S`         | `LOAD_SECS`           | 3 (quick: 0.5)       |
//! | `--warmup-ms MS`   | `LOAD_WARMUP_MS`      | 500 (quick: 100)     |
//! | `--conns 1,8,32`   | `LOAD_CONNS`          | 1,8,32               |
//! | `--workloads LIST` | `LOAD_WORKLOADS`      | search,bind,modify,freeze (also tls, freeze-reads, journal, threads) |
//! | `--rounds N`       | `LOAD_ROUNDS`         | 1                    |
//! | `--quick`          | `LOAD_QUICK=1`        | off                  |
//! | `--proxy-threads N`| `LOAD_PROXY_THREADS`  | 1 (as haproxy nbthread 1) |
//! | `--client-threads N`| `LOAD_CLIENT_THREADS`| 2                    |
//! | `--users N`        | `LOAD_USERS`          | 1000                 |
//! | `--haproxy PATH\|0\|self` | `LOAD_HAPROXY` | `haproxy` on `PATH` |
//! | `--freeze-cycles N`| `LOAD_FREEZE_CYCLES`  | 20 (quick: 5)        |
//! | `--freeze-conns K` | `LOAD_FREEZE_CONNS`   | 8                    |
//! | `--backlog-conns C`| `LOAD_BACKLOG_CONNS`  | 32                   |
//! | `--backlog-depth M`| `LOAD_BACKLOG_DEPTH`  | 200                  |
//! | `--backlog-reps R` | `LOAD_BACKLOG_REPS`   | 3 (quick: 1)         |
//! | `--read-conns N`   | `LOAD_READ_CONNS`     | 8                    |
//! | `--read-writers W` | `LOAD_READ_WRITERS`   | 2                    |
//! | `--write-rate R`   | `LOAD_WRITE_RATE`     | 100 (per writer, /s) |
//! | `--threads-many N` | `LOAD_THREADS_MANY`   | 128 (the threads section's conns after `--conns`) |
//! | `--abproxy PATH`   | `LOAD_ABPROXY`        | `abproxy` next to the binary |
//!
//! With several rounds, ops/s is the median over rounds, the ratios are the
//! medians of the per-round ratios, and percentiles are over all rounds'
//! samples (the freeze section runs once per round too). With HAProxy, a
//! second table pairs abproxy with HAProxy round by round (the two run
//! seconds apart, so a slow phase of the machine hits both): the median of
//! abproxy/HAProxy, a distribution-free confidence interval for it (needs 5
//! rounds or more), and the rounds abproxy was ahead. `--haproxy self` puts
//! a second abproxy process (started as the first) in HAProxy's place, as
//! `abproxy2`: an A/A control that shows how far apart two equal proxies
//! measure on this machine. Every loop is
//! time-limited (5 s per request, 15 s per ON, 30 s per backlog, a deadline
//! per point): the benchmark always ends by itself.
//!
//! `cargo test -p loadgen` measures nothing: its tests check the logic
//! without timing (round order, options, medians and percentiles, the
//! tables) and run one tiny workload through an in-process proxy
//! (`tests/smoke.rs`).

pub mod client;
pub mod freeze;
pub mod freeze_reads;
pub mod journal;
pub mod opts;
pub mod order;
pub mod point;
pub mod probe;
pub mod procs;
pub mod reference;
pub mod report;
pub mod run;
pub mod stats;
pub mod threads;
pub mod tls;
pub mod workload;

pub use opts::Opts;
pub use run::run;
