# Shared helpers of the benchmark scripts. Source it; do not run it.
# Every script measures the kernel beside an anchor in the same run and prints ratios.

set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AIBOS_BIN="$BENCH_ROOT/target/release/aibos"

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

build_release() {
  (cd "$BENCH_ROOT" && cargo build --release -q -p aibos && cargo build --release -q -p aibos-kernel --examples)
}

# start_kernel DIR PORT [ENV=VALUE…]: the release kernel on its embedded default
# database in DIR, logging JSON to DIR/kernel.log; sets kernel_pid.
start_kernel() {
  local dir=$1 port=$2
  shift 2
  mkdir -p "$dir"
  (cd "$dir" && exec env AIBOS_SERVER__BIND="127.0.0.1:$port" AIBOS_LOG__FORMAT=json "$@" "$AIBOS_BIN" serve 2>"$dir/kernel.log") &
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
