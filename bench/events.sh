#!/usr/bin/env bash
# Event bus benchmark (issue 20), each figure beside its anchor in one run,
# rounds alternating:
#  1. POST /api/kernel/events/publish at $CONNECTIONS connections on PostgreSQL
#     vs pgbench inserting the same row (the events table's shape, a seq from a
#     sequence) one per transaction at the same number of clients, on the same
#     server. Target >= 0.7x.
#  2. The same publish on the embedded SQLite vs raw one-row-per-commit inserts
#     into the same table in WAL with the kernel's `synchronous = FULL` (Python's
#     sqlite3, one writer: SQLite has one). Target >= 5x: what group commit is for.
#  3. p99 of publish (wrk), the kernel's CPU time per publish, and its idle RSS.
#  4. Webhook deliveries per second to a local receiver (nginx answering 204),
#     when the kernel has webhook subscriptions (bench/events.sh measures it
#     after the publish rounds: a backlog of $DELIVERIES events drained by one
#     subscription). Target >= 2,000/s.
#
#   bench/events.sh             # ROUNDS=5 SECONDS_PER_ROUND=10 CONNECTIONS=64
#   AIBOS_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432 bench/events.sh
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONNECTIONS=${CONNECTIONS:-64}
DELIVERIES=${DELIVERIES:-20000}
PG=${AIBOS_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
CORES=$(nproc)

ensure_packages wrk:wrk curl:curl pgbench:postgresql-client nginx:nginx-light python3:python3
build_release

work=$(mktemp -d)
db_name="aibos_bench_events_$$"
kernel_pids=()
cleanup() {
  for pid in "${kernel_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_nginx "$work/receiver"
  wait 2>/dev/null || true
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $db_name WITH (FORCE)" >/dev/null 2>&1 || true
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS ${db_name}_hooks WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

password="correct horse battery staple"
event='{"type":"finance.payment.processed","subject":"payment/0197a1b2","payload":{"payment_id":"0197a1b2-0000-7000-8000-000000000042","amount_minor":125000,"currency":"EUR","debtor":"DE89370400440532013000","status":"processed"}}'
cat >"$work/publish.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '$event'
LUA

# start_publisher DIR [ENV=VALUE…]: a kernel in DIR with an administrator; sets
# base, token and kernel_pid.
start_publisher() {
  local dir=$1 port
  shift
  port=$(free_port)
  mkdir -p "$dir"
  (cd "$dir" && echo "$password" | env "$@" "$AIBOS_BIN" admin create --email bench@example.com --password-stdin >/dev/null)
  start_kernel "$dir" "$port" "$@"
  kernel_pids+=("$kernel_pid")
  base="http://127.0.0.1:$port"
  # Idle: started, migrated, nothing served yet (a login's Argon2id alone
  # takes 19 MiB, which the allocator keeps for the next one).
  sleep 1
  started_rss_kib=$(rss_kib "$kernel_pid")
  token=$(curl -fsS "$base/api/kernel/auth/login" -H 'content-type: application/json' \
    -d "{\"tenant\":\"system\",\"email\":\"bench@example.com\",\"password\":\"$password\"}" | json_field '["access_token"]')
}

# --- the kernels -------------------------------------------------------------------
psql -q "$PG/postgres" -c "CREATE DATABASE $db_name" >/dev/null
start_publisher "$work/sqlite"
sqlite_base=$base sqlite_token=$token sqlite_pid=$kernel_pid
idle_rss_kib=$started_rss_kib
start_publisher "$work/pg" AIBOS_DATABASE__URL="$PG/$db_name"
pg_base=$base pg_token=$token pg_pid=$kernel_pid

# --- the anchors -------------------------------------------------------------------
# pgbench: the same row into a table of the events table's shape, in the same
# database, one INSERT per transaction.
psql -q "$PG/$db_name" >/dev/null <<'SQL'
CREATE TABLE bench_events (LIKE events INCLUDING ALL);
CREATE SEQUENCE bench_seq;
SQL
cat >"$work/pgbench.sql" <<SQL
INSERT INTO bench_events (id, tenant_id, seq, event_type, version, source, subject, actor_type, actor_id, correlation_id, occurred_at, payload)
VALUES (gen_random_uuid()::text, '00000000-0000-7000-8000-000000000001', nextval('bench_seq'), 'finance.payment.processed', 1, 'user', 'payment/0197a1b2', 'user', gen_random_uuid()::text, gen_random_uuid()::text, '2026-12-06T10:00:00.000Z', '{"payment_id":"0197a1b2-0000-7000-8000-000000000042","amount_minor":125000,"currency":"EUR","debtor":"DE89370400440532013000","status":"processed"}');
SQL
pgbench_run() {
  pgbench -n -c "$CONNECTIONS" -j "$CORES" -T "$SECONDS_PER_ROUND" -f "$work/pgbench.sql" "$PG/$db_name" 2>/dev/null |
    awk '/^tps = / { printf "%.0f\n", $3 }'
}
# Raw SQLite: one writer, one row per commit, WAL, synchronous=FULL, in a copy
# of the kernel's events table on the same file system.
cat >"$work/sqlite_rate.py" <<'PY'
import sqlite3, sys, time, uuid
path, seconds = sys.argv[1], float(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS bench_events (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, seq INTEGER NOT NULL, event_type TEXT NOT NULL, version INTEGER NOT NULL, source TEXT NOT NULL, subject TEXT, actor_type TEXT NOT NULL, actor_id TEXT, correlation_id TEXT, occurred_at TEXT NOT NULL, payload TEXT NOT NULL, UNIQUE (tenant_id, seq))")
seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM bench_events").fetchone()[0]
payload = '{"payment_id":"0197a1b2-0000-7000-8000-000000000042","amount_minor":125000,"currency":"EUR","debtor":"DE89370400440532013000","status":"processed"}'
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    seq += 1
    db.execute("BEGIN")
    db.execute("INSERT INTO bench_events VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
               (str(uuid.uuid4()), "t", seq, "finance.payment.processed", 1, "user", "payment/0197a1b2", "user", str(uuid.uuid4()), str(uuid.uuid4()), "2026-12-06T10:00:00.000Z", payload))
    db.execute("COMMIT")
    n += 1
print(round(n / seconds))
PY

# --- warm-up ---------------------------------------------------------------------
wrk_run "$pg_base/api/kernel/events/publish" "$CONNECTIONS" 2 -s "$work/publish.lua" -H "Authorization: Bearer $pg_token" >/dev/null
wrk_run "$sqlite_base/api/kernel/events/publish" "$CONNECTIONS" 2 -s "$work/publish.lua" -H "Authorization: Bearer $sqlite_token" >/dev/null

# --- rounds ----------------------------------------------------------------------
: >"$work/pg.txt"; : >"$work/pgbench.txt"; : >"$work/sqlite.txt"; : >"$work/raw.txt"
steal_before=$(steal_ticks) rounds_started=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  measured "$work/pg.txt" "$pg_pid" "$pg_base/api/kernel/events/publish" -s "$work/publish.lua" -H "Authorization: Bearer $pg_token"
  pgbench_run >>"$work/pgbench.txt"
  measured "$work/sqlite.txt" "$sqlite_pid" "$sqlite_base/api/kernel/events/publish" -s "$work/publish.lua" -H "Authorization: Bearer $sqlite_token"
  python3 "$work/sqlite_rate.py" "$work/raw.db" "$SECONDS_PER_ROUND" >>"$work/raw.txt"
  echo "round $round: kernel/pg $(tail -n1 "$work/pg.txt" | cut -d' ' -f1)/s  pgbench $(tail -n1 "$work/pgbench.txt")/s  kernel/sqlite $(tail -n1 "$work/sqlite.txt" | cut -d' ' -f1)/s  raw sqlite $(tail -n1 "$work/raw.txt")/s" >&2
done
steal=$(steal_share "$steal_before" "$(steal_ticks)" $((SECONDS - rounds_started)))

col() { cut -d' ' -f"$1" "$2" | median; }
pg_ratio=$(paste -d' ' "$work/pg.txt" "$work/pgbench.txt" | awk '{ printf "%.3f\n", $1 / $4 }' | median)
sqlite_ratio=$(paste -d' ' "$work/sqlite.txt" "$work/raw.txt" | awk '{ printf "%.3f\n", $1 / $4 }' | median)

# --- webhook deliveries ------------------------------------------------------------
delivery_line="webhook deliveries: not measured (this kernel has no /api/kernel/subscriptions)"
if [ "$(curl -s -o /dev/null -w '%{http_code}' "$sqlite_base/api/kernel/subscriptions" -H "Authorization: Bearer $sqlite_token")" = 200 ]; then
  receiver_port=$(free_port)
  start_nginx "$work/receiver" "server { listen 127.0.0.1:$receiver_port; location / { return 204; } }"
  wait_http "http://127.0.0.1:$receiver_port/" || true
  # measure_deliveries NAME DIR RECEIVER_PORT [ENV=VALUE…]: a kernel of its
  # own, a backlog of $DELIVERIES events, then one subscription replayed from
  # the start; prints the deliveries per second until its cursor is at the end.
  measure_deliveries() {
    local name=$1 dir=$2 port receiver=$3
    shift 3
    port=$(free_port)
    mkdir -p "$dir"
    (cd "$dir" && echo "$password" | env "$@" "$AIBOS_BIN" admin create --email bench@example.com --password-stdin >/dev/null)
    start_kernel "$dir" "$port" AIBOS_EVENTS__WEBHOOK_ALLOW_PRIVATE_NETWORKS=true "$@"
    kernel_pids+=("$kernel_pid")
    local b="http://127.0.0.1:$port" t head
    t=$(curl -fsS "$b/api/kernel/auth/login" -H 'content-type: application/json' \
      -d "{\"tenant\":\"system\",\"email\":\"bench@example.com\",\"password\":\"$password\"}" | json_field '["access_token"]')
    # The backlog first: $DELIVERIES events published as fast as the kernel takes them.
    head=$(python3 - "$b" "$t" "$DELIVERIES" <<'PY'
import concurrent.futures, json, sys, urllib.request
base, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = json.dumps({"type": "finance.payment.processed", "payload": {"amount_minor": 125000, "currency": "EUR"}}).encode()
def publish(_):
    req = urllib.request.Request(f"{base}/api/kernel/events/publish", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())["seq"]
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    print(max(pool.map(publish, range(n))))
PY
)
    local id start_ms
    start_ms=$(date +%s%3N)
    id=$(curl -fsS "$b/api/kernel/subscriptions" -H "Authorization: Bearer $t" -H 'content-type: application/json' \
      -d "{\"url\":\"http://127.0.0.1:$receiver/hook\",\"event_types\":[\"finance.*\"],\"description\":\"bench\"}" | json_field '["id"]')
    curl -fsS "$b/api/kernel/subscriptions/$id/replay" -H "Authorization: Bearer $t" -H 'content-type: application/json' -d '{"since_seq":0}' >/dev/null
    while :; do
      local done_seq
      done_seq=$(curl -fsS "$b/api/kernel/subscriptions/$id" -H "Authorization: Bearer $t" | json_field '.get("delivered_seq", 0)')
      [ "$done_seq" -ge "$head" ] && break
      sleep 0.05
    done
    local elapsed_ms=$(( $(date +%s%3N) - start_ms ))
    kill "$kernel_pid" 2>/dev/null || true
    echo "$DELIVERIES $elapsed_ms" | awk -v name="$name" '{ printf "%-58s %10.0f   (%d in %.2f s; target >= 2000/s)\n", name, $1 / ($2 / 1000), $1, $2 / 1000 }'
  }
  psql -q "$PG/postgres" -c "CREATE DATABASE ${db_name}_hooks" >/dev/null
  delivery_line=$(measure_deliveries "webhook deliveries/s, SQLite kernel, one subscription" "$work/deliveries" "$receiver_port")
  delivery_line+=$'\n'$(measure_deliveries "webhook deliveries/s, PostgreSQL kernel, one subscription" "$work/deliveries-pg" "$receiver_port" AIBOS_DATABASE__URL="$PG/${db_name}_hooks")
fi

echo
echo "events  ($(date -u +%Y-%m-%dT%H:%MZ), $CORES cores, $ROUNDS rounds x ${SECONDS_PER_ROUND}s at $CONNECTIONS connections, medians; ratios paired per round; steal $steal)"
printf '%-58s %10s %12s %14s\n' "" "per s" "p99" "CPU us/call"
printf '%-58s %10s %12s %14s\n' "kernel publish, PostgreSQL" "$(col 1 "$work/pg.txt")" "$(col 2 "$work/pg.txt") ms" "$(col 3 "$work/pg.txt")"
printf '%-58s %10s\n' "pgbench, one-row INSERT per transaction" "$(median <"$work/pgbench.txt")"
printf '%-58s %10s\n' "kernel / pgbench (target >= 0.7x)" "${pg_ratio}x"
printf '%-58s %10s %12s %14s\n' "kernel publish, SQLite (synchronous=FULL)" "$(col 1 "$work/sqlite.txt")" "$(col 2 "$work/sqlite.txt") ms" "$(col 3 "$work/sqlite.txt")"
printf '%-58s %10s\n' "raw SQLite, one row per commit (WAL, FULL)" "$(median <"$work/raw.txt")"
printf '%-58s %10s\n' "kernel / raw SQLite (target >= 5x)" "${sqlite_ratio}x"
printf '%-58s %10s\n' "kernel idle RSS after start (target < 30 MiB)" "$((idle_rss_kib / 1024)) MiB"
printf '%-58s %10s\n' "kernel RSS after the publish rounds (SQLite)" "$(($(rss_kib "$sqlite_pid") / 1024)) MiB"
echo "$delivery_line"
