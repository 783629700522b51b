# Shared helpers of the benchmark scripts. Source it; do not run it.
# Every script measures the kernel beside an anchor in the same run and prints ratios.

set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The shipped build: the `dist` profile (fat LTO, one code unit; Cargo.toml).
AIBOS_BIN="$BENCH_ROOT/target/dist/aibos"

# Installs Debian packages that are missing (the benchmarks need wrk and nginx).
ensure_packages() {
  local missing=()
  for pair in "$@"; do
    local cmd=${pair%%:*} pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# build_release [examples]: the shipped (`dist`) binary, and the kernel's
# example programs when a script runs one (each is a whole-program LTO link of
# its own), under target/dist/. AIBOS_BENCH_NO_BUILD=1 uses the binary as it is
# (to measure a build made earlier while the tree moved on).
build_release() {
  [ -n "${AIBOS_BENCH_NO_BUILD:-}" ] && [ -x "$AIBOS_BIN" ] && return 0
  (cd "$BENCH_ROOT" && cargo build --profile dist -q -p aibos)
  if [ "${1:-}" = examples ]; then
    (cd "$BENCH_ROOT" && cargo build --profile dist -q -p aibos-kernel --examples)
  fi
}

# Rate limits that are decided on every request but never refuse one (a load
# generator is one user from one address): the limiter's cost is measured, not
# its 429s. A script's own AIBOS_RATE_LIMIT__* arguments come later and win.
RATE_LIMITS_NEVER_REFUSE=(AIBOS_RATE_LIMIT__USER_PER_MINUTE=100000000 AIBOS_RATE_LIMIT__USER_BURST=100000000
  AIBOS_RATE_LIMIT__TENANT_PER_MINUTE=100000000 AIBOS_RATE_LIMIT__TENANT_BURST=100000000
  AIBOS_RATE_LIMIT__ADDRESS_PER_MINUTE=100000000 AIBOS_RATE_LIMIT__ADDRESS_BURST=100000000)

# never_refusing_limits BIN: prints, one per line, those of RATE_LIMITS_NEVER_REFUSE
# that BIN's configuration knows (a build from before a key was added refuses to
# start on it), so that older builds can be measured beside newer ones.
never_refusing_limits() {
  local known
  known=$("$1" config show 2>/dev/null) || { printf '%s\n' "${RATE_LIMITS_NEVER_REFUSE[@]}"; return; }
  local setting key
  for setting in "${RATE_LIMITS_NEVER_REFUSE[@]}"; do
    key=${setting%%=*} key=${key#AIBOS_RATE_LIMIT__}
    grep -qi "^${key} = " <<<"$known" && echo "$setting"
  done
  return 0
}

# start_kernel DIR PORT [ENV=VALUE…]: the release kernel on its embedded default
# database in DIR, logging JSON to DIR/kernel.log; sets kernel_pid.
start_kernel() {
  local dir=$1 port=$2
  shift 2
  mkdir -p "$dir"
  local limits
  mapfile -t limits < <(never_refusing_limits "$AIBOS_BIN")
  (cd "$dir" && exec env AIBOS_SERVER__BIND="127.0.0.1:$port" AIBOS_LOG__FORMAT=json "${limits[@]}" "$@" "$AIBOS_BIN" serve 2>"$dir/kernel.log") &
  kernel_pid=$!
  wait_http "http://127.0.0.1:$port/api/health"
}


free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL: polls until the URL answers 200 (bounded: 10 s).
wait_http() {
  for _ in $(seq 1 1000); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.01
  done
  echo "no answer from $1" >&2
  return 1
}

# wrk_run URL CONNECTIONS SECONDS [extra wrk args…]: prints "<requests/s> <p99 ms>".
wrk_run() {
  local url=$1 conns=$2 secs=$3
  shift 3
  wrk -t2 -c"$conns" -d"${secs}s" --latency "$@" "$url" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec:/ { rps = $2 }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx responses/ { bad = $NF }
    END { if (bad > 0) { print "non-2xx responses: " bad > "/dev/stderr" }; printf "%.0f %.3f\n", rps, p99 }'
}

median() {
  sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# start_nginx DIR HTTP_BLOCK: an nginx instance of its own in DIR (pid in
# DIR/nginx.pid, stopped by stop_nginx DIR): as many workers as cores, no access
# log, long keep-alive; HTTP_BLOCK goes inside `http { … }`.
start_nginx() {
  local dir=$1 block=$2
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<CONF
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir;
  uwsgi_temp_path $dir; scgi_temp_path $dir;
  $block
}
CONF
  nginx -c "$dir/nginx.conf" -p "$dir"
}

stop_nginx() {
  [ -f "$1/nginx.pid" ] && kill "$(cat "$1/nginx.pid")" 2>/dev/null || true
}

# fixed_upstream PORT: the `http` block of the gateway benchmarks' cell, a tiny
# fixed response.
fixed_upstream() {
  echo "server { listen 127.0.0.1:$1; location / { default_type application/json; return 200 '{\"ok\":true}'; } }"
}

# start_fixed_upstream DIR: nginx serving the fixed upstream from DIR, once it
# answers; sets upstream_port.
start_fixed_upstream() {
  upstream_port=$(free_port)
  start_nginx "$1" "$(fixed_upstream "$upstream_port")"
  wait_http "http://127.0.0.1:$upstream_port/"
}

# gateway_canon DIR UPSTREAM_PORT [ENV=VALUE…]: in the kernel started with
# start_kernel in DIR (created there with `admin create` first; ENV passed to
# it), registers canon `bench` in front of the upstream with route GET /ping
# requiring `bench.ping.read`, grants it to the admin, and sets gateway_url and
# gateway_token.
gateway_canon() {
  local dir=$1 upstream_port=$2 port
  shift 2
  local password="correct horse battery staple"
  port=$(free_port)
  mkdir -p "$dir"
  (cd "$dir" && echo "$password" | "$AIBOS_BIN" admin create --email bench@example.com --password-stdin >/dev/null)
  start_kernel "$dir" "$port" "$@"
  local base="http://127.0.0.1:$port" token canon_id role_id user_id
  token=$(curl -fsS "$base/api/kernel/auth/login" -H 'content-type: application/json' \
    -d "{\"tenant\":\"system\",\"email\":\"bench@example.com\",\"password\":\"$password\"}" | json_field '["access_token"]')
  local auth=(-H "Authorization: Bearer $token" -H 'content-type: application/json')
  canon_id=$(curl -fsS "$base/api/kernel/canons" "${auth[@]}" -d "{\"name\":\"bench\",\"base_url\":\"http://127.0.0.1:$upstream_port\",\"permissions\":[{\"name\":\"bench.ping.read\",\"description\":\"Benchmark route\"}]}" | json_field '["id"]')
  curl -fsS "$base/api/kernel/routes" "${auth[@]}" -d "{\"canon_id\":\"$canon_id\",\"method\":\"GET\",\"path\":\"/ping\",\"required_permissions\":[\"bench.ping.read\"]}" >/dev/null
  role_id=$(curl -fsS "$base/api/kernel/roles" "${auth[@]}" -d '{"name":"bench","permissions":["bench.ping.read"]}' | json_field '["id"]')
  user_id=$(curl -fsS "$base/api/kernel/auth/me" "${auth[@]}" | json_field '["subject"]["id"]')
  curl -fsS "$base/api/kernel/users/$user_id/roles" "${auth[@]}" -d "{\"role_id\":\"$role_id\"}" >/dev/null
  gateway_url="$base/api/gateway/bench/ping"
  gateway_token=$token
  local status
  status=$(curl -s -o /dev/null -w '%{http_code}' "$gateway_url" -H "Authorization: Bearer $token")
  [ "$status" = 200 ] || { echo "the gateway answered $status" >&2; return 1; }
}

# json_field PATH: prints a field of the JSON document on stdin (PATH like '["id"]').
json_field() {
  python3 -c "import json,sys; print(json.load(sys.stdin)$1)"
}

# cpu_ticks PID…: user + system clock ticks of all the processes' threads so far.
cpu_ticks() {
  for pid in "$@"; do cat /proc/"$pid"/task/*/stat 2>/dev/null; done | awk '{ s += $14 + $15 } END { print s + 0 }'
}
# measured FILE "PID…" URL [wrk args…]: one round of $SECONDS_PER_ROUND s at
# $CONNECTIONS connections against URL, appending
# "<requests/s> <p99 ms> <CPU µs per call of PID…>" to FILE.
measured() {
  local file=$1 pids=$2 url=$3 before after line
  shift 3
  # shellcheck disable=SC2086 # a list of pids
  before=$(cpu_ticks $pids)
  line=$(wrk_run "$url" "$CONNECTIONS" "$SECONDS_PER_ROUND" "$@")
  # shellcheck disable=SC2086
  after=$(cpu_ticks $pids)
  echo "$line" | awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v secs="$SECONDS_PER_ROUND" \
    '{ printf "%s %s %.1f\n", $1, $2, ticks / hz * 1e6 / ($1 * secs) }' >>"$file"
}

# steal_ticks: the CPU time the hypervisor gave to others so far (all cores,
# clock ticks; /proc/stat's 8th cpu field). A shared host's steal stalls a busy
# event loop and moves requests per second far more than most changes do.
steal_ticks() {
  awk '/^cpu / { print $9 }' /proc/stat
}
# steal_share BEFORE AFTER SECONDS: the share of the machine's CPU stolen over
# SECONDS of wall time, e.g. "3.1 %".
steal_share() {
  awk -v d=$(($2 - $1)) -v hz="$(getconf CLK_TCK)" -v s="$3" -v n="$(nproc)" \
    'BEGIN { printf "%.1f %%", 100 * d / (hz * s * n) }'
}
