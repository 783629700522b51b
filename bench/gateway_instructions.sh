#!/usr/bin/env bash
# Instructions per proxied call, counted by valgrind (callgrind), for one or
# more kernel builds: the same gateway set-up as bench/gateway_ab.sh (a canon,
# a route requiring a permission, a token holding it, nginx `return 200` as the
# upstream), one event loop, wrk at 16 connections.
#
# Why: on these shared 2-core machines requests per second and CPU time per
# call move by ±10–20 % from round to round, more than a change to the hot path
# of a few per cent does. An instruction count moves by ±0.5 % between runs of
# one build. It counts user space only (the Linux kernel's socket work, about
# half of the CPU, is not in it) and weighs every instruction alike, so it
# judges a change to our code, not the whole: confirm with gateway_ab.sh and
# gateway.sh. Valgrind's CPU has no SHA extensions, so SHA-256 runs in
# software there (about 31 k instructions per call, against a few hundred
# cycles on the real machine); it is reported apart.
#
#   bench/gateway_instructions.sh target/dist/aibos /tmp/aibos-before   # ~1 min per build
#
# KEEP_PROFILES=DIR keeps each build's callgrind profile there (DIR/<n>.callgrind,
# in argument order) for callgrind_annotate --inclusive=yes.
source "$(dirname "$0")/lib.sh"

SECONDS_COUNTED=${SECONDS_COUNTED:-10}
[ $# -gt 0 ] || set -- "$AIBOS_BIN"
ensure_packages wrk:wrk nginx:nginx-light curl:curl python3:python3 valgrind:valgrind

work=$(mktemp -d)
vg_pid=
cleanup() {
  [ -n "$vg_pid" ] && kill "$vg_pid" 2>/dev/null || true
  stop_nginx "$work/upstream"
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_fixed_upstream "$work/upstream"

# count BIN: prints "<calls> <instructions per call> <of which SHA-256>".
count() {
  local bin dir port out calls total sha
  bin=$(realpath "$1") dir=$(mktemp -d "$work/kernel.XXXX")
  # Set up at full speed, then restarted under valgrind on the same database.
  AIBOS_BIN=$bin gateway_canon "$dir" "$upstream_port" AIBOS_SERVER__EVENT_LOOPS=1 >/dev/null
  port=${gateway_url#http://127.0.0.1:} port=${port%%/*}
  kill "$kernel_pid"; wait "$kernel_pid" 2>/dev/null || true
  (cd "$dir" && exec env AIBOS_SERVER__BIND="127.0.0.1:$port" AIBOS_LOG__FORMAT=json AIBOS_SERVER__EVENT_LOOPS=1 $(never_refusing_limits "$bin") \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out" \
    "$bin" serve 2>"$dir/kernel.log") &
  vg_pid=$!
  for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/api/health" 2>/dev/null && break
    sleep 0.1
  done
  local load=(-t1 -c16 -H "Authorization: Bearer $gateway_token" "$gateway_url")
  wrk -d3s "${load[@]}" >/dev/null # warm, uncounted
  callgrind_control -i on "$vg_pid" >/dev/null 2>&1
  wrk -d3s "${load[@]}" >/dev/null # instrumented, not yet counted
  callgrind_control -z "$vg_pid" >/dev/null 2>&1
  out=$(wrk -d"${SECONDS_COUNTED}s" "${load[@]}")
  callgrind_control -d "$vg_pid" >/dev/null 2>&1
  kill "$vg_pid"; wait "$vg_pid" 2>/dev/null || true
  vg_pid=
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx responses from $1" >&2; return 1; fi
  calls=$(echo "$out" | awk '/requests in/ { print $1 }')
  total=$(awk '/^summary:/ { print $2 }' "$dir/callgrind.out.1")
  sha=$(callgrind_annotate --auto=no --inclusive=no "$dir/callgrind.out.1" |
    awk '/sha2::sha256::compress256/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')
  if [ -n "${KEEP_PROFILES:-}" ]; then
    mkdir -p "$KEEP_PROFILES"
    cp "$dir/callgrind.out.1" "$KEEP_PROFILES/$profile_number.callgrind"
  fi
  echo "$calls $((total / calls)) $((sha / calls))"
}

echo "gateway instructions per call ($(date -u +%Y-%m-%dT%H:%MZ), callgrind, ${SECONDS_COUNTED}s counted, wrk -c16, one event loop)"
printf '%-40s %8s %14s %14s %16s\n' build calls "instr/call" "of it SHA-256" "without SHA-256"
profile_number=0
for bin in "$@"; do
  profile_number=$((profile_number + 1))
  count "$bin" >"$work/counted"
  read -r calls per_call sha_per_call <"$work/counted"
  printf '%-40s %8s %14s %14s %16s\n' "$bin" "$calls" "$per_call" "$sha_per_call" "$((per_call - sha_per_call))"
done
