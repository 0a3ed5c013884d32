#!/bin/bash
# Instructions per LDAP operation executed by abproxy in user space, counted
# by callgrind: deterministic where throughput and CPU time on a shared
# machine are not. The load bench drives the binary (release build,
# `threads = 1`) in place of haproxy; instructions per operation = the
# profile's total / the calls of InFlightTable::start (one per request;
# start-up included, a few percent), or half the calls of send(2) (the
# request upstream, the response to the client) where link-time
# optimisation inlined that function.
#
#   benches/callgrind/run.sh [WORKLOAD] [CONNS]     # default: bind 32
#   CG_ABPROXY_ARGS="--metrics-listen 127.0.0.1:0" benches/callgrind/run.sh search 32
#                                  # the same with the metrics endpoint on
#   CG_TARGET=haproxy benches/callgrind/run.sh search 32
#                                  # HAProxy (mode tcp, nbthread 1) in its place
#   CG_SECS=9 benches/callgrind/run.sh search 32   # a longer point (default 3 s)
#   benches/callgrind/compare.sh   # both proxies, start-up excluded (see there)
#   callgrind_annotate /tmp/abproxy-callgrind/abproxy.*.out | head -40
#
# Needs valgrind and slapd (as the load bench); builds the product into
# target/product ($CARGO_TARGET_DIR/product when set). CG_OUT: where the
# profiles go.
set -eu
cd "$(dirname "$0")/../.."
workload=${1:-bind}
conns=${2:-32}
out=${CG_OUT:-/tmp/abproxy-callgrind}
mkdir -p "$out"
rm -f "$out"/abproxy.*.out "$out"/haproxy.*.out "$out/valgrind.pids"
target=${CARGO_TARGET_DIR:-$PWD/target}
# The product, as the Debian package builds it, in a target directory of its
# own (as testkit::product builds it for the load bench): `cargo bench`
# builds the package's binary with the dev-dependencies' features (tokio's
# test-util clock, the fuzzing entry points) into target/release, which is
# not what users run.
cargo build --release --no-default-features --package abproxy --bin abproxy --quiet \
  --target-dir "$target/product"
export ABPROXY_BIN=$target/product/release/abproxy CG_OUT=$out CG_TARGET=${CG_TARGET:-abproxy}
LOAD_HAPROXY=$PWD/benches/callgrind/as-haproxy.sh LOAD_WORKLOADS=$workload \
  LOAD_CONNS=$conns LOAD_SECS=${CG_SECS:-3} LOAD_ROUNDS=1 cargo bench --quiet --bench load \
  >"$out/bench.log" 2>&1 || true
# The bench killed the wrapper; callgrind writes its profile when abproxy
# exits on SIGTERM.
# Only the valgrind this run started (as-haproxy.sh noted its pid), not a
# colleague's run on the same machine.
pids=$(cat "$out/valgrind.pids" 2>/dev/null || true)
for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
for _ in $(seq 1 30); do
  alive=
  for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ -z "$alive" ] && break
  sleep 1
done
profile=$(ls -S "$out"/"${CG_TARGET:-abproxy}".*.out | head -1)
python3 - "$profile" <<'PY'
import collections, re, sys
names, calls, cur, total = {}, collections.Counter(), None, 0
for line in open(sys.argv[1]):
    s = line.strip()
    m = re.match(r'^(fn|cfn)=\((\d+)\)(?: (.*))?$', s)
    if m:
        kind, idx, name = m.groups()
        if name:
            names[idx] = name
        if kind == 'cfn':
            cur = idx
        continue
    m = re.match(r'^calls=(\d+)', s)
    if m and cur:
        calls[cur] += int(m.group(1))
    if s.startswith(('totals:', 'summary:')):
        total = int(s.split()[1])
ops = max((c for i, c in calls.items() if 'InFlightTable::start' in names.get(i, '')), default=0)
if not ops:
    ops = max((c for i, c in calls.items() if names.get(i, '') == 'send'), default=0) // 2
if not ops:
    sys.exit(f"no operation counted in {sys.argv[1]}")
print(f"{sys.argv[1]}: {ops} operations, {total} instructions, {total / ops:.0f} per operation")
PY
