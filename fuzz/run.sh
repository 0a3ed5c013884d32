#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), one after another on
# one core, from the committed seeds (fuzz/seeds/<target>, read only) and the
# local corpus (fuzz/corpus/<target>, ignored by git, where new inputs go),
# then prints per target: executions, executions per second, coverage
# (libFuzzer's cov: and ft:), corpus size and the result. A crash, a time-out
# or a leak leaves its input in fuzz/artifacts/<target>/ and makes the script
# exit 1 (copy the input to fuzz/seeds/<target>/ with the fix, so `cargo test`
# replays it).
#
#   fuzz/run.sh [SECONDS]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and libFuzzer's nightly
# flags: a nightly toolchain, or the stable one with RUSTC_BOOTSTRAP=1.
# Exits 2 when either is missing.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-30}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 64 ;; esac
targets=(frame envelope allow_backup session)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
  exit 2
fi
# The active toolchain (nightly, or stable with RUSTC_BOOTSTRAP=1 as the
# README's command does, which keeps its build cache warm), else rustup's
# nightly.
fuzz=(cargo fuzz)
if rustc --version | grep -q nightly; then
  :
elif RUSTC_BOOTSTRAP=1 rustc -Z unstable-options --version >/dev/null 2>&1; then
  export RUSTC_BOOTSTRAP=1
elif command -v rustup >/dev/null 2>&1 && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  echo "fuzz/run.sh: no nightly toolchain and rustc refuses RUSTC_BOOTSTRAP" >&2
  exit 2
fi

log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT
"${fuzz[@]}" build -O >/dev/null 2>"$log_dir/build" || {
  cat "$log_dir/build" >&2
  exit 1
}
# The session target without AddressSanitizer (its code has no `unsafe`;
# ASan's allocator made it 6 to 10 times slower) and with libFuzzer's
# coverage instrumentation in abproxy only, not in tokio and the other
# dependencies (instrument-only.sh; docs/fuzzing.md says why), in a target
# directory of its own so the builds keep their caches; and without
# comparison tracing (`--no-trace-compares`: its callbacks were half of an
# execution's instructions; docs/fuzzing.md has the trade); and with
# link-time optimisation across crates (tokio's task and I/O code inlined
# into the session's loops, as the release build of the proxy has it: 6 %
# fewer instructions an execution, a longer build).
session_build=(env RUSTC_WRAPPER="$PWD/instrument-only.sh"
  CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 "${fuzz[@]}")
session_flags=(-O -s none --no-trace-compares --target-dir target/only)
"${session_build[@]}" build "${session_flags[@]}" session >/dev/null 2>"$log_dir/build" || {
  cat "$log_dir/build" >&2
  exit 1
}

failed=0
rows=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log="$log_dir/$t"
  echo "== $t: ${secs} s" >&2
  status=ok
  how=("${fuzz[@]}" run -O)
  [ "$t" = session ] && how=("${session_build[@]}" run "${session_flags[@]}")
  if ! "${how[@]}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -max_len=4096 -timeout=20 -print_final_stats=1 \
      >"$log" 2>&1; then
    status="FAILED (see fuzz/artifacts/$t)"
    failed=1
    grep -E '^(==[0-9]+==|thread|SUMMARY|artifact_prefix|Test unit written)' "$log" >&2 || tail -n 30 "$log" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  last=$(grep -E '^#[0-9]+[[:space:]].* cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  rows+=("$(printf '%-13s %6s %12s %8s %7s %7s %7s  %s' "$t" "${secs}s" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$status")")
done

printf '%-13s %6s %12s %8s %7s %7s %7s  %s\n' target time executions 'exec/s' cov ft corpus result
printf '%s\n' "${rows[@]}"
exit "$failed"
