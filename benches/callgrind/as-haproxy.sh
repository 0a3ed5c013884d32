#!/bin/bash
# Stands in for haproxy in `cargo bench --bench load` (LOAD_HAPROXY=this
# script): the load bench starts "haproxy -db -f CFG", and this runs abproxy
# (or, with CG_TARGET=haproxy, the real haproxy) under callgrind instead, in
# the background, so the profile survives the bench killing this script.
# Used by run.sh; see there.
set -u
if [ "${1:-}" = "-v" ]; then
  echo "callgrind ${CG_TARGET:-abproxy}"
  exit 0
fi
cfg=$3
listen=$(awk '$1=="bind"{print $2}' "$cfg")
upstream=$(awk '$1=="server"{print $3}' "$cfg")
out=${CG_OUT:-/tmp/abproxy-callgrind}
if [ "${CG_TARGET:-abproxy}" = haproxy ]; then
  valgrind --tool=callgrind --callgrind-out-file="$out/haproxy.%p.out" \
    "${HAPROXY:-/usr/sbin/haproxy}" "$@" &
else
  valgrind --tool=callgrind --callgrind-out-file="$out/abproxy.%p.out" \
    "$ABPROXY_BIN" serve --listen "ldap://$listen" --upstream "ldap://$upstream" --threads 1 \
    ${CG_ABPROXY_ARGS:-} &
fi
# run.sh stops this valgrind, and no other, by its pid.
echo $! >>"$out/valgrind.pids"
wait
