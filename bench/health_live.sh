#!/usr/bin/env bash
# Foundation benchmark: GET /api/health/live on the kernel against nginx answering
# `return 200`, same load tool (wrk), same connections, alternating rounds in one run;
# then the kernel's time from exec to its first healthy answer, and its idle RSS.
#
#   bench/health_live.sh            # 5 rounds of 10 s at 64 connections
#   ROUNDS=5 SECONDS_PER_ROUND=15 bench/health_live.sh
#
# Targets (issue 3): rps >= 0.8x nginx, p99 <= 1.5x nginx, ready < 200 ms, idle RSS < 30 MiB.
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONNECTIONS=${CONNECTIONS:-64}
STARTS=${STARTS:-15}

ensure_packages wrk:wrk nginx:nginx-light curl:curl
build_release

work=$(mktemp -d)
cleanup() {
  [ -n "${kernel_pid:-}" ] && kill "$kernel_pid" 2>/dev/null || true
  stop_nginx "$work/nginx"
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- nginx: the anchor. As many workers as cores, no access log, keep-alive. ---
nginx_port=$(free_port)
start_nginx "$work/nginx" "server {
    listen 127.0.0.1:$nginx_port;
    location / { default_type application/json; return 200 '{\"status\":\"alive\"}'; }
  }"
wait_http "http://127.0.0.1:$nginx_port/"

# --- the kernel, on its embedded default database, logging at its default level. ---
kernel_port=$(free_port)
mkdir -p "$work/kernel"
(cd "$work/kernel" && AIBOS_SERVER__BIND="127.0.0.1:$kernel_port" AIBOS_LOG__FORMAT=json exec "$AIBOS_BIN" serve 2>"$work/kernel.log") &
kernel_pid=$!
wait_http "http://127.0.0.1:$kernel_port/api/health"
sleep 2
idle_rss_kib=$(rss_kib "$kernel_pid")

# Warm both up (connections, caches) before measuring.
wrk_run "http://127.0.0.1:$nginx_port/" "$CONNECTIONS" 2 >/dev/null
wrk_run "http://127.0.0.1:$kernel_port/api/health/live" "$CONNECTIONS" 2 >/dev/null

: >"$work/nginx.txt"
: >"$work/kernel.txt"
for round in $(seq 1 "$ROUNDS"); do
  wrk_run "http://127.0.0.1:$nginx_port/" "$CONNECTIONS" "$SECONDS_PER_ROUND" >>"$work/nginx.txt"
  wrk_run "http://127.0.0.1:$kernel_port/api/health/live" "$CONNECTIONS" "$SECONDS_PER_ROUND" >>"$work/kernel.txt"
  echo "round $round: nginx $(tail -n1 "$work/nginx.txt")  kernel $(tail -n1 "$work/kernel.txt")  (rps p99_ms)" >&2
done
loaded_rss_kib=$(rss_kib "$kernel_pid")
kill "$kernel_pid"
wait "$kernel_pid" 2>/dev/null || true
kernel_pid=

nginx_rps=$(cut -d' ' -f1 "$work/nginx.txt" | median)
nginx_p99=$(cut -d' ' -f2 "$work/nginx.txt" | median)
kernel_rps=$(cut -d' ' -f1 "$work/kernel.txt" | median)
kernel_p99=$(cut -d' ' -f2 "$work/kernel.txt" | median)

# --- exec → first 200 from /api/health (a real database round trip), fresh database each time. ---
python3 - "$AIBOS_BIN" "$STARTS" >"$work/starts.txt" <<'PY'
import os, socket, subprocess, sys, tempfile, time
binary, starts = sys.argv[1], int(sys.argv[2])
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
request = b"GET /api/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
for _ in range(starts):
    with tempfile.TemporaryDirectory() as cwd:
        port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "AIBOS_SERVER__BIND": f"127.0.0.1:{port}"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([binary, "serve"], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = None
        while time.perf_counter() - t0 < 10:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(request)
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        ready = (time.perf_counter() - t0) * 1000
                        break
            except OSError:
                time.sleep(0.001)
        proc.terminate(); proc.wait()
        print(f"{ready:.1f}" if ready is not None else "nan")
PY
ready_ms=$(median <"$work/starts.txt")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# Paired ratios: each round's kernel figure over the nginx figure measured just before
# it, then the median. The machine's noise moves both within a round.
rps_ratio=$(paste -d' ' "$work/kernel.txt" "$work/nginx.txt" | awk '{ printf "%.3f\n", $1 / $3 }' | median)
p99_ratio=$(paste -d' ' "$work/kernel.txt" "$work/nginx.txt" | awk '{ printf "%.3f\n", $2 / $4 }' | median)
echo
echo "health_live  ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, wrk -t2 -c$CONNECTIONS, $ROUNDS rounds x ${SECONDS_PER_ROUND}s, medians)"
printf '%-28s %12s %10s\n' "" "requests/s" "p99 ms"
printf '%-28s %12s %10s\n' "nginx return 200" "$nginx_rps" "$nginx_p99"
printf '%-28s %12s %10s\n' "kernel /api/health/live" "$kernel_rps" "$kernel_p99"
printf '%-28s %12s %10s\n' "kernel / nginx (paired)" "${rps_ratio}x" "${p99_ratio}x"
echo
echo "exec -> first healthy /api/health (fresh SQLite, migrations included): median ${ready_ms} ms over $STARTS starts"
echo "RSS idle after start: $((idle_rss_kib / 1024)) MiB ($idle_rss_kib KiB); after the load: $((loaded_rss_kib / 1024)) MiB"
