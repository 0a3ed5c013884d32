#!/bin/bash
# abproxy against HAProxy in user-space instructions per operation, counted
# by callgrind (run.sh) with the same driver, start-up excluded: each proxy
# runs each point twice, SHORT and LONG seconds, and the figure is the slope
# (instructions of the long run - the short run's) / (operations of the long
# run - the short run's). A total divided by its operations also counts the
# start-up (HAProxy's reads its configuration and seeds its random numbers
# through libcrypto: tens of millions of instructions), which a short run
# spreads over fewer operations.
#
#   benches/callgrind/compare.sh                     # search bind modify x 1 32
#   CG_WORKLOADS="search" CG_CONNLIST="32" benches/callgrind/compare.sh
#   CG_SHORT=3 CG_LONG=9 (the defaults)
#
# Prints a Markdown table. Needs what run.sh needs, and haproxy.
set -eu
cd "$(dirname "$0")"
short=${CG_SHORT:-3}
long=${CG_LONG:-9}
base=${CG_OUT:-/tmp/abproxy-callgrind-compare}
echo "| workload | conns | abproxy | HAProxy | abproxy / HAProxy |"
echo "|---|---:|---:|---:|---:|"
for w in ${CG_WORKLOADS:-search bind modify}; do
  for c in ${CG_CONNLIST:-1 32}; do
    declare -A per=()
    for t in abproxy haproxy; do
      line() {
        CG_TARGET=$t CG_SECS=$1 CG_OUT="$base/$t-$w-$c-$1" ./run.sh "$w" "$c" | tail -1
      }
      a=$(line "$short")
      b=$(line "$long")
      per[$t]=$(python3 - "$a" "$b" <<'PY'
import re, sys
def nums(s):
    m = re.search(r'(\d+) operations, (\d+) instructions', s)
    if not m:
        sys.exit(f"no count in: {s}")
    return int(m.group(1)), int(m.group(2))
(o1, i1), (o2, i2) = nums(sys.argv[1]), nums(sys.argv[2])
if o2 <= o1:
    sys.exit(f"the long run made no more operations: {sys.argv[1:]}")
print(round((i2 - i1) / (o2 - o1)))
PY
)
    done
    ratio=$(python3 -c "print(f'{${per[abproxy]} / ${per[haproxy]}:.2f}')")
    printf '| %s | %s | %s | %s | %s |\n' "$w" "$c" "${per[abproxy]}" "${per[haproxy]}" "$ratio"
  done
done
