#!/usr/bin/env bash
# The gateway on a busy host (issue 21): does the kernel's ratio to nginx hold
# when another process keeps a core busy? In one run, alternating rounds, the
# same set-up as bench/gateway.sh (nginx `return 200` as the cell, nginx
# `proxy_pass` as the anchor, the kernel's gateway with a token, a permission
# and its per-user rate limit on), measured twice:
#   quiet  nothing else running;
#   hog    a busy loop pinned to the last core (`taskset`), at normal priority,
#          the whole round long, for nginx and the kernel alike.
# Prints the medians, the paired kernel/nginx ratios of both conditions, and
# how the kernel's CPU split between its event loops in each.
#
#   bench/gateway_busy_host.sh        # ROUNDS=4 SECONDS_PER_ROUND=10 CONNECTIONS=64
#
# Target: the hog's ratio within the noise (±0.1) of the quiet one.
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-4}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONNECTIONS=${CONNECTIONS:-64}

ensure_packages wrk:wrk nginx:nginx-light curl:curl python3:python3 taskset:util-linux
build_release

work=$(mktemp -d)
kernel_pids=()
hog_pid=
cleanup() {
  [ -n "$hog_pid" ] && kill "$hog_pid" 2>/dev/null || true
  for pid in "${kernel_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_nginx "$work/proxy"
  stop_nginx "$work/upstream"
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_fixed_upstream "$work/upstream"
proxy_port=$(free_port)
start_nginx "$work/proxy" "upstream cell { server 127.0.0.1:$upstream_port; keepalive 128; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / { proxy_pass http://cell; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
wait_http "http://127.0.0.1:$proxy_port/"

# The rate limits stay on, high enough never to refuse (lib.sh, start_kernel):
# every call pays for its decision, none is turned away.
gateway_canon "$work/kernel" "$upstream_port"
kernel_pids+=("$kernel_pid")
proxy_pids=$(pgrep -P "$(cat "$work/proxy/nginx.pid")" | tr '\n' ' ')
proxied="http://127.0.0.1:$proxy_port/ping"
wrk_run "$proxied" "$CONNECTIONS" 2 >/dev/null
wrk_run "$gateway_url" "$CONNECTIONS" 2 -H "Authorization: Bearer $gateway_token" >/dev/null

last_core=$(($(nproc) - 1))
hog_on() { taskset -c "$last_core" sh -c 'while :; do :; done' & hog_pid=$!; }
hog_off() { kill "$hog_pid" 2>/dev/null || true; wait "$hog_pid" 2>/dev/null || true; hog_pid=; }
# loop_ticks: CPU ticks of each of the kernel's event loops so far, space-separated.
loop_ticks() {
  for task in /proc/"$kernel_pid"/task/*; do
    if [[ $(cat "$task/comm") == aibos-http-* ]]; then awk '{ printf "%s ", $14 + $15 }' "$task/stat"; fi
  done
}
# shares BEFORE AFTER: each loop's share of the CPU added between two loop_ticks.
shares() {
  paste -d' ' <(tr ' ' '\n' <<<"$1" | sed '/^$/d') <(tr ' ' '\n' <<<"$2" | sed '/^$/d') |
    awk '{ d[NR] = $2 - $1; s += d[NR] } END { for (i = 1; i <= NR; i++) printf "%s%.0f%%", (i > 1 ? "/" : ""), (s ? 100 * d[i] / s : 0) }'
}

for condition in quiet hog; do : >"$work/nginx.$condition"; : >"$work/kernel.$condition"; : >"$work/loops.$condition"; done
steal_before=$(steal_ticks) started=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  for condition in quiet hog; do
    [ "$condition" = hog ] && hog_on
    measured "$work/nginx.$condition" "$proxy_pids" "$proxied"
    before=$(loop_ticks)
    measured "$work/kernel.$condition" "$kernel_pid" "$gateway_url" -H "Authorization: Bearer $gateway_token"
    shares "$before" "$(loop_ticks)" >>"$work/loops.$condition"; echo >>"$work/loops.$condition"
    [ "$condition" = hog ] && hog_off
    echo "round $round $condition: nginx $(tail -n1 "$work/nginx.$condition")  kernel $(tail -n1 "$work/kernel.$condition")  (rps p99_ms cpu_us_per_call)  loops $(tail -n1 "$work/loops.$condition")" >&2
  done
done

col() { cut -d' ' -f"$1" "$2" | median; }
ratio() { paste -d' ' "$work/kernel.$1" "$work/nginx.$1" | awk -v c="$2" '{ printf "%.3f\n", $c / $(c + NF / 2) }' | median; }
echo
echo "gateway on a busy host  ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $ROUNDS rounds x ${SECONDS_PER_ROUND}s per condition, wrk -c$CONNECTIONS, medians; ratios paired per round; hog pinned to core $last_core)"
printf '%-10s %12s %12s %12s %12s %10s %10s  %s\n' "" "nginx req/s" "kernel req/s" "nginx p99" "kernel p99" "rps ratio" "p99 ratio" "kernel CPU by loop (per round)"
for condition in quiet hog; do
  printf '%-10s %12s %12s %10sms %10sms %9sx %9sx  %s\n' "$condition" \
    "$(col 1 "$work/nginx.$condition")" "$(col 1 "$work/kernel.$condition")" \
    "$(col 2 "$work/nginx.$condition")" "$(col 2 "$work/kernel.$condition")" \
    "$(ratio "$condition" 1)" "$(ratio "$condition" 2)" "$(tr '\n' ' ' <"$work/loops.$condition")"
done
echo "host steal during the rounds: $(steal_share "$steal_before" "$(steal_ticks)" $((SECONDS - started)))"
