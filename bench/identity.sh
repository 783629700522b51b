#!/usr/bin/env bash
# Identity benchmarks, each beside its anchor in one run:
#  1. login throughput (POST /api/kernel/auth/login, real Argon2id verify + session
#     + audit entry) vs the raw Argon2id verify rate of the same parameters on as
#     many threads as cores. Target >= 0.9x.
#  2. authenticated GET /api/kernel/auth/me (token check + session + permissions)
#     vs GET /api/health/live, same wrk settings, paired rounds. Target >= 0.7x.
#
#   bench/identity.sh                  # ROUNDS=5 SECONDS_PER_ROUND=10
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONNECTIONS=${CONNECTIONS:-64}
CORES=$(nproc)

ensure_packages wrk:wrk curl:curl
build_release examples

work=$(mktemp -d)
cleanup() {
  [ -n "${kernel_pid:-}" ] && kill "$kernel_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(free_port)
password="correct horse battery staple"
# One account per round, and one for /auth/me: the requests wrk leaves in
# flight when a round ends are hang-ups, which the login throttle counts as
# failures (a client that hangs up learns nothing, and must not get more
# guesses for it), so after one round an account is throttled for 15 minutes.
for n in $(seq 0 "$ROUNDS"); do
  (cd "$work" && echo "$password" | "$AIBOS_BIN" admin create --email "bench$n@example.com" --password-stdin >/dev/null)
done
start_kernel "$work" "$port"
base="http://127.0.0.1:$port"

# --- 1. login vs raw Argon2id ---------------------------------------------------
login_script() { # login_script N: the wrk script logging in as bench<N>
  cat >"$work/login.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"tenant":"system","email":"bench$1@example.com","password":"$password"}'
LUA
}
: >"$work/login.txt"
: >"$work/argon2.txt"
for round in $(seq 1 "$ROUNDS"); do
  # Four connections per core: the kernel hashes at most one password per core,
  # and the other requests do their database work (a durable SQLite commit each)
  # while the cores hash. With one connection per core the cores idle during commits.
  login_script "$round"
  wrk_run "$base/api/kernel/auth/login" "$((CORES * 4))" "$SECONDS_PER_ROUND" -s "$work/login.lua" | cut -d' ' -f1 >>"$work/login.txt"
  "$BENCH_ROOT/target/dist/examples/argon2_rate" "$CORES" "$SECONDS_PER_ROUND" >>"$work/argon2.txt"
  echo "round $round: login $(tail -n1 "$work/login.txt")/s  argon2 $(tail -n1 "$work/argon2.txt")/s" >&2
done
login_rps=$(median <"$work/login.txt")
argon2_rps=$(median <"$work/argon2.txt")
login_ratio=$(paste -d' ' "$work/login.txt" "$work/argon2.txt" | awk '{ printf "%.3f\n", $1 / $2 }' | median)

# --- 2. /auth/me vs /health/live --------------------------------------------------
token=$(curl -fsS "$base/api/kernel/auth/login" -H 'content-type: application/json' \
  -d "{\"tenant\":\"system\",\"email\":\"bench0@example.com\",\"password\":\"$password\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
wrk_run "$base/api/kernel/auth/me" "$CONNECTIONS" 2 -H "Authorization: Bearer $token" >/dev/null
wrk_run "$base/api/health/live" "$CONNECTIONS" 2 >/dev/null
: >"$work/me.txt"
: >"$work/live.txt"
for round in $(seq 1 "$ROUNDS"); do
  wrk_run "$base/api/health/live" "$CONNECTIONS" "$SECONDS_PER_ROUND" >>"$work/live.txt"
  wrk_run "$base/api/kernel/auth/me" "$CONNECTIONS" "$SECONDS_PER_ROUND" -H "Authorization: Bearer $token" >>"$work/me.txt"
  echo "round $round: live $(tail -n1 "$work/live.txt")  me $(tail -n1 "$work/me.txt")  (rps p99_ms)" >&2
done
me_rps=$(cut -d' ' -f1 "$work/me.txt" | median)
live_rps=$(cut -d' ' -f1 "$work/live.txt" | median)
me_ratio=$(paste -d' ' "$work/me.txt" "$work/live.txt" | awk '{ printf "%.3f\n", $1 / $3 }' | median)
me_p99=$(cut -d' ' -f2 "$work/me.txt" | median)
live_p99=$(cut -d' ' -f2 "$work/live.txt" | median)

echo
echo "identity  ($(date -u +%Y-%m-%dT%H:%MZ), $CORES cores, $ROUNDS rounds x ${SECONDS_PER_ROUND}s, medians; ratios are paired per round)"
printf '%-44s %12s\n' "login (wrk -c$((CORES * 4))), logins/s" "$login_rps"
printf '%-44s %12s\n' "raw Argon2id verify ($CORES threads), hashes/s" "$argon2_rps"
printf '%-44s %12s\n' "login / raw Argon2id" "${login_ratio}x"
printf '%-44s %12s %8s\n' "GET /api/health/live (wrk -c$CONNECTIONS)" "$live_rps" "p99 ${live_p99}ms"
printf '%-44s %12s %8s\n' "GET /api/kernel/auth/me, authenticated" "$me_rps" "p99 ${me_p99}ms"
printf '%-44s %12s\n' "me / live" "${me_ratio}x"
