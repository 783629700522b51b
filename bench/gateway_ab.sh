#!/usr/bin/env bash
# A/B of two kernel builds on the gateway path: the same upstream (nginx
# `return 200`), both kernels set up alike (a canon, a route requiring a
# permission, a token holding it), wrk rounds alternating A and B. Prints each
# round and the median B/A ratios of requests per second and of the kernel's
# CPU time per call (user + system; steadier than requests per second when the
# machine is shared). For judging a change to the hot path on a noisy machine,
# where two runs of bench/gateway.sh minutes apart differ more than the change
# does.
#
#   git stash; cargo build --profile dist -p aibos; cp target/dist/aibos /tmp/aibos-a
#   git stash pop; cargo build --profile dist -p aibos; cp target/dist/aibos /tmp/aibos-b
#   A=/tmp/aibos-a B=/tmp/aibos-b bench/gateway_ab.sh     # ROUNDS=6 SECONDS_PER_ROUND=8
#
# EVENT_LOOPS=1 runs both kernels with one event loop: on 2 shared cores its
# rounds spread ±4 % against ±20 % with the default two, so a change of a few
# per cent shows (docs/performance.md, gateway).
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-6}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-8}
CONNECTIONS=${CONNECTIONS:-64}
: "${A:?A=path of the first aibos binary}" "${B:?B=path of the second aibos binary}"
A=$(realpath "$A") B=$(realpath "$B")
ensure_packages wrk:wrk nginx:nginx-light curl:curl python3:python3

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_nginx "$work/upstream"
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_fixed_upstream "$work/upstream"

# Both kernels set up alike; each warmed up for 2 s.
loops=(${EVENT_LOOPS:+"AIBOS_SERVER__EVENT_LOOPS=$EVENT_LOOPS"})
AIBOS_BIN=$A gateway_canon "$work/a" "$upstream_port" "${loops[@]}"
pids+=("$kernel_pid"); pid_a=$kernel_pid url_a=$gateway_url token_a=$gateway_token
AIBOS_BIN=$B gateway_canon "$work/b" "$upstream_port" "${loops[@]}"
pids+=("$kernel_pid"); pid_b=$kernel_pid url_b=$gateway_url token_b=$gateway_token
wrk_run "$url_a" "$CONNECTIONS" 2 -H "Authorization: Bearer $token_a" >/dev/null
wrk_run "$url_b" "$CONNECTIONS" 2 -H "Authorization: Bearer $token_b" >/dev/null

: >"$work/a.txt"; : >"$work/b.txt"; : >"$work/ratios.txt"; : >"$work/cpu_ratios.txt"
steal_before=$(steal_ticks) rounds_started=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  measured "$work/a.txt" "$pid_a" "$url_a" -H "Authorization: Bearer $token_a"
  measured "$work/b.txt" "$pid_b" "$url_b" -H "Authorization: Bearer $token_b"
  a=$(tail -n1 "$work/a.txt") b=$(tail -n1 "$work/b.txt")
  echo "$a $b" | awk '{ printf "%.3f\n", $4 / $1 }' >>"$work/ratios.txt"
  echo "$a $b" | awk '{ printf "%.3f\n", $6 / $3 }' >>"$work/cpu_ratios.txt"
  echo "round $round: A $a  B $b  (rps p99_ms cpu_us_per_call)  B/A rps $(tail -n1 "$work/ratios.txt") cpu $(tail -n1 "$work/cpu_ratios.txt")"
done
echo "gateway A/B ($(date -u +%Y-%m-%dT%H:%MZ), $ROUNDS rounds x ${SECONDS_PER_ROUND}s, wrk -c$CONNECTIONS${EVENT_LOOPS:+, event loops $EVENT_LOOPS}): median B/A rps $(median <"$work/ratios.txt")x, CPU per call $(median <"$work/cpu_ratios.txt")x; host steal $(steal_share "$steal_before" "$(steal_ticks)" $((SECONDS - rounds_started)))"
