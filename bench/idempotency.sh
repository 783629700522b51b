#!/usr/bin/env bash
# Idempotency benchmark (issue 21): through the kernel gateway, in one run and
# alternating rounds, the same POST with the same body two ways:
#   1. proxied: no Idempotency-Key, so every call reaches the cell (nginx
#      `return 200`, the gateway benchmarks' fixed upstream);
#   2. replayed: one Idempotency-Key on a route with `idempotency: optional`;
#      the first call (made before the rounds) executes and stores the answer,
#      every call after it is a replay served from the kernel's cache.
# Prints medians of requests/s, p50 and p99, and the ratios replay / proxied
# (paired per round), with the kernel's CPU time per call.
#
#   bench/idempotency.sh              # ROUNDS=5 SECONDS_PER_ROUND=10 CONNECTIONS=64
#
# Target: replayed >= 1.0x proxied requests/s (a replay must be cheaper than
# calling the cell).
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONNECTIONS=${CONNECTIONS:-64}

ensure_packages wrk:wrk nginx:nginx-light curl:curl python3:python3
build_release

work=$(mktemp -d)
cleanup() {
  [ -n "${kernel_pid:-}" ] && kill "$kernel_pid" 2>/dev/null || true
  stop_nginx "$work/upstream"
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_fixed_upstream "$work/upstream"
gateway_canon "$work/kernel" "$upstream_port"
base=${gateway_url%/api/gateway/*}
auth=(-H "Authorization: Bearer $gateway_token" -H 'content-type: application/json')
canon_id=$(curl -fsS "$base/api/kernel/canons" "${auth[@]}" | json_field '["items"][0]["id"]')
curl -fsS "$base/api/kernel/routes" "${auth[@]}" \
  -d "{\"canon_id\":\"$canon_id\",\"method\":\"POST\",\"path\":\"/pay\",\"required_permissions\":[\"bench.ping.read\"],\"idempotency\":\"optional\"}" >/dev/null
url="$base/api/gateway/bench/pay"
body='{"amount_minor":1250,"currency":"EUR","reference":"bench"}'
key="bench-replay-$(date +%s)"

# wrk sends the same POST on every call.
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
LUA

# The one execution of the key; afterwards every call with it is a replay.
first=$(curl -sS -o /dev/null -w '%{http_code}' "$url" "${auth[@]}" -H "Idempotency-Key: $key" -d "$body")
replayed=$(curl -sS -D - -o /dev/null "$url" "${auth[@]}" -H "Idempotency-Key: $key" -d "$body" | tr -d '\r' | awk -F': ' 'tolower($1) == "idempotent-replayed" { print $2 }')
[ "$first" = 200 ] && [ "$replayed" = true ] || { echo "set-up failed: first $first, replayed '$replayed'" >&2; exit 1; }

# wrk_p50 URL [wrk args…]: "<requests/s> <p50 ms> <p99 ms> <kernel CPU clock ticks>".
wrk_p50() {
  local target=$1 before after
  shift
  before=$(cpu_ticks "$kernel_pid")
  wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_ROUND}s" --latency -s "$work/post.lua" "$@" "$target" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec:/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx responses/ { bad = $NF }
    END { if (bad > 0) { print "non-2xx responses: " bad > "/dev/stderr" }; printf "%.0f %.3f %.3f", rps, p50, p99 }'
  after=$(cpu_ticks "$kernel_pid")
  echo " $((after - before))"
}

proxied() { wrk_p50 "$url" -H "Authorization: Bearer $gateway_token"; }
replay() { wrk_p50 "$url" -H "Authorization: Bearer $gateway_token" -H "Idempotency-Key: $key"; }

# Warm-up.
SECONDS_PER_ROUND=2 proxied >/dev/null
SECONDS_PER_ROUND=2 replay >/dev/null

: >"$work/proxied.txt"; : >"$work/replayed.txt"
steal_before=$(steal_ticks) rounds_started=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  proxied >>"$work/proxied.txt"
  replay >>"$work/replayed.txt"
  echo "round $round: proxied $(tail -n1 "$work/proxied.txt")  replayed $(tail -n1 "$work/replayed.txt")  (rps p50_ms p99_ms cpu_ticks)" >&2
done
steal_share=$(steal_share "$steal_before" "$(steal_ticks)" $((SECONDS - rounds_started)))

hz=$(getconf CLK_TCK)
col() { cut -d' ' -f"$1" "$2" | median; }
# CPU µs per call from the ticks column.
cpu_per_call() { awk -v hz="$hz" -v s="$SECONDS_PER_ROUND" '{ printf "%.1f\n", $4 / hz * 1e6 / ($1 * s) }' "$1" | median; }
ratio() { paste -d' ' "$work/replayed.txt" "$work/proxied.txt" | awk -v c="$1" '{ printf "%.3f\n", $c / $(c + NF / 2) }' | median; }

echo
echo "idempotency  ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $ROUNDS rounds x ${SECONDS_PER_ROUND}s, wrk -c$CONNECTIONS, medians; ratios paired per round)"
printf '%-44s %10s %10s %10s %14s\n' "" "req/s" "p50" "p99" "CPU per call"
row() { printf '%-44s %10s %8sms %8sms %12sus\n' "$1" "$(col 1 "$2")" "$(col 2 "$2")" "$(col 3 "$2")" "$(cpu_per_call "$2")"; }
row "POST proxied to the cell (no key)" "$work/proxied.txt"
row "POST replayed (same key, same body)" "$work/replayed.txt"
printf '%-44s %10s\n' "replayed / proxied rps (target >= 1.0)" "$(ratio 1)x"
printf '%-44s %10s\n' "replayed / proxied p99" "$(ratio 3)x"
printf '%-44s %10s\n' "host steal during the rounds" "$steal_share"
