#!/usr/bin/env bash
# Gateway benchmark (issue 5): the same tiny fixed-response upstream (nginx
# `return 200`), the same load tool (wrk), the same connections, reached three
# ways in one run, alternating rounds:
#   1. direct to the upstream;
#   2. through nginx `proxy_pass` with upstream keep-alive (the anchor);
#   3. through the kernel gateway, with a valid token and a route that requires a
#      permission (authentication, authorization, breaker, signed assertion).
# Prints medians and the kernel/nginx ratios of rps and p99.
#
#   bench/gateway.sh                  # ROUNDS=5 SECONDS_PER_ROUND=10 CONNECTIONS=64
#
# Targets: kernel >= 0.6x nginx rps (aim 0.8x); p99 at 64 connections <= 1.5x nginx.
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONNECTIONS=${CONNECTIONS:-64}

ensure_packages wrk:wrk nginx:nginx-light curl:curl python3:python3
build_release

work=$(mktemp -d)
cleanup() {
  [ -n "${kernel_pid:-}" ] && kill "$kernel_pid" 2>/dev/null || true
  stop_nginx "$work/proxy"
  stop_nginx "$work/upstream"
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
[ -n "${BENCH_HOLD:-}" ] && trap - EXIT

# --- nginx, twice: the upstream, and the anchor proxy in an instance of its own,
# so that both proxies (nginx and the kernel) reach the upstream in another
# process. (In one instance nginx could proxy to itself on the same worker
# without a context switch, which no real deployment of a gateway does.)
upstream_port=$(free_port)
proxy_port=$(free_port)
start_nginx "$work/upstream" "$(fixed_upstream "$upstream_port")"
start_nginx "$work/proxy" "upstream cell { server 127.0.0.1:$upstream_port; keepalive 128; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / { proxy_pass http://cell; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
wait_http "http://127.0.0.1:$upstream_port/"
wait_http "http://127.0.0.1:$proxy_port/"

# --- the kernel on its embedded default: a canon in front of the upstream. ---
gateway_canon "$work/kernel" "$upstream_port"
token=$gateway_token

direct="http://127.0.0.1:$upstream_port/ping"
proxied="http://127.0.0.1:$proxy_port/ping"
gateway=$gateway_url
for url in "$direct" "$proxied"; do wrk_run "$url" "$CONNECTIONS" 2 >/dev/null; done
wrk_run "$gateway" "$CONNECTIONS" 2 -H "Authorization: Bearer $token" >/dev/null

: >"$work/direct.txt"; : >"$work/nginx.txt"; : >"$work/kernel.txt"
for round in $(seq 1 "$ROUNDS"); do
  wrk_run "$direct" "$CONNECTIONS" "$SECONDS_PER_ROUND" >>"$work/direct.txt"
  wrk_run "$proxied" "$CONNECTIONS" "$SECONDS_PER_ROUND" >>"$work/nginx.txt"
  wrk_run "$gateway" "$CONNECTIONS" "$SECONDS_PER_ROUND" -H "Authorization: Bearer $token" >>"$work/kernel.txt"
  echo "round $round: direct $(tail -n1 "$work/direct.txt")  nginx $(tail -n1 "$work/nginx.txt")  kernel $(tail -n1 "$work/kernel.txt")  (rps p99_ms)" >&2
done

col() { cut -d' ' -f"$1" "$2" | median; }
rps_ratio=$(paste -d' ' "$work/kernel.txt" "$work/nginx.txt" | awk '{ printf "%.3f\n", $1 / $3 }' | median)
p99_ratio=$(paste -d' ' "$work/kernel.txt" "$work/nginx.txt" | awk '{ printf "%.3f\n", $2 / $4 }' | median)
rss_kib=$(awk '/VmRSS/ { print $2 }' "/proc/$kernel_pid/status")

echo
echo "gateway  ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $ROUNDS rounds x ${SECONDS_PER_ROUND}s, wrk -c$CONNECTIONS, medians; ratios paired per round)"
printf '%-46s %10s %12s\n' "" "req/s" "p99"
printf '%-46s %10s %10sms\n' "direct to the upstream" "$(col 1 "$work/direct.txt")" "$(col 2 "$work/direct.txt")"
printf '%-46s %10s %10sms\n' "nginx proxy_pass (keep-alive)" "$(col 1 "$work/nginx.txt")" "$(col 2 "$work/nginx.txt")"
printf '%-46s %10s %10sms\n' "kernel gateway (token + permission + assertion)" "$(col 1 "$work/kernel.txt")" "$(col 2 "$work/kernel.txt")"
printf '%-46s %10s\n' "kernel / nginx rps" "${rps_ratio}x"
printf '%-46s %10s\n' "kernel / nginx p99" "${p99_ratio}x"
printf '%-46s %10s\n' "kernel RSS after the load" "$((rss_kib / 1024)) MiB"
