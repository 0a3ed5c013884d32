#!/usr/bin/env bash
# RUSTC_WRAPPER for the session target (fuzz/run.sh): cargo-fuzz puts its
# coverage instrumentation (SanitizerCoverage: edge counters, comparison
# tracing, stack depth) in RUSTFLAGS, so every crate gets it; this keeps it
# in the crates named in FUZZ_INSTRUMENT (crate names, space-separated;
# default: abproxy, whose code the target checks) and builds every other
# crate (tokio, bytes, ldap3_proto, ...) without it, the fuzz target's own
# among them: the session harness's functions are #[inline], so they are
# compiled there, uninstrumented (src/fuzzing/session.rs). See
# docs/fuzzing.md.
rustc=$1
shift
crate=
prev=
for a in "$@"; do
  [ "$prev" = --crate-name ] && crate=$a
  prev=$a
done
case " ${FUZZ_INSTRUMENT:-abproxy} " in
  *" $crate "*) exec "$rustc" "$@" ;;
esac
args=()
for a in "$@"; do
  case $a in
    -Cpasses=sancov-module | -Cllvm-args=-sanitizer-coverage-* | -Cllvm-args=-simplifycfg-branch-fold-threshold=*) ;;
    *) args+=("$a") ;;
  esac
done
exec "$rustc" "${args[@]}"
