#!/usr/bin/env bash
# Rate-limit decisions (issue 21): one in-process decision in ns (target < 200 ns),
# and one decision on Redis against a PING on the same connection in the same run
# (one round trip each; a decision also runs the GCRA script), one at a time and
# 64 at once (pipelined on one multiplexed connection), plus redis-benchmark's
# own PING as an outside anchor.
#
#   bench/ratelimit.sh                           # Redis at redis://127.0.0.1:6379 if it answers
#   REDIS_URL=redis://10.0.0.5:6379 bench/ratelimit.sh
source "$(dirname "$0")/lib.sh"

REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
REDIS_HOST=${REDIS_URL#redis://}; REDIS_HOST=${REDIS_HOST%%/*}
REDIS_PORT=${REDIS_HOST##*:}; REDIS_HOST=${REDIS_HOST%%:*}

(cd "$BENCH_ROOT" && cargo build --profile dist -q -p aibos-kernel --example ratelimit_decision)
example="$BENCH_ROOT/target/dist/examples/ratelimit_decision"

if redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  out=$("$example" "$REDIS_URL")
  echo "$out"
  if command -v redis-benchmark >/dev/null 2>&1; then
    # One client, one request at a time: the plain round trip.
    rps=$(redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" -t ping_mbulk -n 50000 -c 1 -q | tr '\r' '\n' | grep 'requests per second' | tail -1 | awk '{print $2}')
    awk -v rps="$rps" -v out="$out" 'BEGIN {
      split(out, lines, "\n")
      for (i in lines) { split(lines[i], f, " "); v[f[1]] = f[2] }
      ping = 1e6 / rps
      printf "redis_benchmark_ping_round_trip_us %.1f\n", ping
      printf "redis_decision_over_redis_benchmark_ping %.2f\n", v["redis_decision_round_trip_us"] / ping
    }'
  fi
else
  echo "Redis at $REDIS_URL does not answer: in-process figure only" >&2
  "$example"
fi
