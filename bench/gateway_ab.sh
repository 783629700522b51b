#!/usr/bin/env bash
# A/B of two kernel builds on the gateway path: the same upstream (nginx
# `return 200`), both kernels set up alike (a canon, a route requiring a
# permission, a token holding it), wrk rounds alternating A and B. Prints each
# round and the median B/A ratio of requests per second. For judging a change to
# the hot path on a noisy machine, where two runs of bench/gateway.sh minutes
# apart differ more than the change does.
#
#   git stash; cargo build --release -p aibos; cp target/release/aibos /tmp/aibos-a
#   git stash pop; cargo build --release -p aibos; cp target/release/aibos /tmp/aibos-b
#   A=/tmp/aibos-a B=/tmp/aibos-b bench/gateway_ab.sh     # ROUNDS=6 SECONDS_PER_ROUND=8
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-6}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-8}
CONNECTIONS=${CONNECTIONS:-64}
: "${A:?A=path of the first aibos binary}" "${B:?B=path of the second aibos binary}"
ensure_packages wrk:wrk nginx:nginx-light curl:curl python3:python3

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/upstream.pid" ] && kill "$(cat "$work/upstream.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

upstream_port=$(free_port)
mkdir -p "$work/upstream"
cat >"$work/upstream.conf" <<CONF
worker_processes auto;
pid $work/upstream.pid;
error_log $work/upstream/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/upstream; proxy_temp_path $work/upstream; fastcgi_temp_path $work/upstream;
  uwsgi_temp_path $work/upstream; scgi_temp_path $work/upstream;
  server {
    listen 127.0.0.1:$upstream_port;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
CONF
nginx -c "$work/upstream.conf" -p "$work/upstream"
wait_http "http://127.0.0.1:$upstream_port/"

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
password="correct horse battery staple"
# kernel BIN NAME: starts BIN in its own directory, configures the bench canon;
# sets url_NAME and token_NAME.
kernel() {
  local bin=$1 name=$2 dir="$work/$2" port
  port=$(free_port)
  mkdir -p "$dir"
  (cd "$dir" && echo "$password" | "$bin" admin create --email bench@example.com --password-stdin >/dev/null)
  AIBOS_BIN=$bin start_kernel "$dir" "$port"
  pids+=("$kernel_pid")
  local base="http://127.0.0.1:$port" token canon_id role_id user_id
  token=$(curl -fsS "$base/api/kernel/auth/login" -H 'content-type: application/json' \
    -d "{\"tenant\":\"system\",\"email\":\"bench@example.com\",\"password\":\"$password\"}" | json '["access_token"]')
  local auth=(-H "Authorization: Bearer $token" -H 'content-type: application/json')
  canon_id=$(curl -fsS "$base/api/kernel/canons" "${auth[@]}" -d "{\"name\":\"bench\",\"base_url\":\"http://127.0.0.1:$upstream_port\",\"permissions\":[{\"name\":\"bench.ping.read\",\"description\":\"Benchmark route\"}]}" | json '["id"]')
  curl -fsS "$base/api/kernel/routes" "${auth[@]}" -d "{\"canon_id\":\"$canon_id\",\"method\":\"GET\",\"path\":\"/ping\",\"required_permissions\":[\"bench.ping.read\"]}" >/dev/null
  role_id=$(curl -fsS "$base/api/kernel/roles" "${auth[@]}" -d '{"name":"bench","permissions":["bench.ping.read"]}' | json '["id"]')
  user_id=$(curl -fsS "$base/api/kernel/auth/me" "${auth[@]}" | json '["subject"]["id"]')
  curl -fsS "$base/api/kernel/users/$user_id/roles" "${auth[@]}" -d "{\"role_id\":\"$role_id\"}" >/dev/null
  printf -v "url_$name" '%s' "$base/api/gateway/bench/ping"
  printf -v "token_$name" '%s' "$token"
  wrk_run "$base/api/gateway/bench/ping" "$CONNECTIONS" 2 -H "Authorization: Bearer $token" >/dev/null
}
kernel "$A" a
kernel "$B" b

: >"$work/ratios.txt"
for round in $(seq 1 "$ROUNDS"); do
  a=$(wrk_run "$url_a" "$CONNECTIONS" "$SECONDS_PER_ROUND" -H "Authorization: Bearer $token_a")
  b=$(wrk_run "$url_b" "$CONNECTIONS" "$SECONDS_PER_ROUND" -H "Authorization: Bearer $token_b")
  echo "$a $b" | awk '{ printf "%.3f\n", $3 / $1 }' >>"$work/ratios.txt"
  echo "round $round: A $a  B $b  (rps p99_ms)  B/A $(tail -n1 "$work/ratios.txt")"
done
echo "gateway A/B ($(date -u +%Y-%m-%dT%H:%MZ), $ROUNDS rounds x ${SECONDS_PER_ROUND}s, wrk -c$CONNECTIONS): median B/A rps $(median <"$work/ratios.txt")x"
