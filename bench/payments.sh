#!/usr/bin/env bash
# Payments benchmark (issue 22), seed 000's load scenario: log in once, then
# CONNECTIONS concurrent clients post payments for SECONDS_PER_RUN s, each with
# an Idempotency-Key of its own, between random accounts of ACCOUNTS funded
# ones, on each engine of ENGINES (the kernel's and the hub's databases both
# on it):
#   1. direct:  straight to the payment hub, each request carrying a
#      pre-signed x-kernel-assertion (what the gateway would send);
#   2. gateway: through the kernel (token, route permission, rate limits,
#      idempotency record and the gateway.call audit entry, assertion, proxy).
# Prints payments per second, p50/p95/p99 and errors of each, the ratio
# gateway / direct, the kernel's CPU time per payment, and checks that the
# hub's trial balance still balances afterwards.
#
#   bench/payments.sh        # ENGINES="sqlite postgres" SECONDS_PER_RUN=30 CONNECTIONS=100 ACCOUNTS=100
#
# PostgreSQL: AIBOS_BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres),
# on which the script creates two databases and drops them afterwards.
# Targets (issue 22): gateway >= 1,000 payments/s with p95 < 100 ms and no
# error on both engines, and >= 0.7x direct.
source "$(dirname "$0")/lib.sh"

ENGINES=${ENGINES:-"sqlite postgres"}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-30}
CONNECTIONS=${CONNECTIONS:-100}
ACCOUNTS=${ACCOUNTS:-100}
POSTGRES_URL=${AIBOS_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
HUB_BIN="$BENCH_ROOT/target/dist/payment-hub"
# Pre-signed assertions per second of the direct run: above what the hub serves.
ASSERTIONS_PER_SECOND=${ASSERTIONS_PER_SECOND:-8000}
WRK_THREADS=2

ensure_packages wrk:wrk curl:curl python3:python3 psql:postgresql-client
build_release
if [ -z "${AIBOS_BENCH_NO_BUILD:-}" ] || [ ! -x "$HUB_BIN" ]; then
  (cd "$BENCH_ROOT" && cargo build --profile dist -q -p payment-hub)
fi

work=$(mktemp -d)
databases=()
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for db in "${databases[@]}"; do psql "$POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

post() { # post URL TOKEN BODY [curl args…]: the answer's body; fails on an error status
  local url=$1 token=$2 body=$3
  shift 3
  curl -fsS "$url" -H "Authorization: Bearer $token" -H 'content-type: application/json' -d "$body" "$@"
}

# deploy DIR ENGINE: the kernel and the hub on ENGINE, seeded; sets base,
# hub_base, token, tenant_id, user_id, canon_secret, kernel_pid, hub_pid and
# writes DIR/accounts (one funded account id per line).
deploy() {
  local dir=$1 engine=$2 kernel_port hub_port kernel_db=() hub_db="sqlite://$1/hub/payment-hub.db"
  kernel_port=$(free_port)
  hub_port=$(free_port)
  mkdir -p "$dir/hub"
  if [ "$engine" = postgres ]; then
    local suffix="${RANDOM}_$$"
    psql "$POSTGRES_URL" -qc "CREATE DATABASE aibos_bench_kernel_$suffix" >/dev/null
    psql "$POSTGRES_URL" -qc "CREATE DATABASE aibos_bench_hub_$suffix" >/dev/null
    databases+=("aibos_bench_kernel_$suffix" "aibos_bench_hub_$suffix")
    kernel_db=("AIBOS_DATABASE__URL=${POSTGRES_URL%/*}/aibos_bench_kernel_$suffix")
    hub_db="${POSTGRES_URL%/*}/aibos_bench_hub_$suffix"
  fi
  local bootstrap_key="payments-bench-bootstrap-key" password="payments bench passphrase"
  start_kernel "$dir/kernel" "$kernel_port" AIBOS_AUTH__BOOTSTRAP_KEY="$bootstrap_key" \
    AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS=1 AIBOS_LOG__LEVEL=warn "${kernel_db[@]}"
  pids+=("$kernel_pid")
  base="http://127.0.0.1:$kernel_port"
  curl -fsS "$base/api/kernel/bootstrap" -H "x-bootstrap-key: $bootstrap_key" -H 'content-type: application/json' \
    -d "{\"email\":\"root@bench.example\",\"password\":\"$password\",\"name\":\"Root\"}" >/dev/null
  local root canon tenant client
  root=$(post "$base/api/kernel/auth/login" "" "{\"tenant\":\"system\",\"email\":\"root@bench.example\",\"password\":\"$password\"}" | json_field '["access_token"]')
  canon=$(post "$base/api/kernel/canons" "$root" "{\"name\":\"payment-hub\",\"base_url\":\"http://127.0.0.1:$hub_port\",\"health_path\":\"/ping\",\"permissions\":[{\"name\":\"finance.payment.execute\",\"description\":\"Pay\"},{\"name\":\"finance.ledger.manage\",\"description\":\"Open accounts\"},{\"name\":\"finance.payment.read\",\"description\":\"Read\"}]}")
  canon_secret=$(json_field '["assertion_secret"]["secret"]' <<<"$canon")
  local canon_id
  canon_id=$(json_field '["id"]' <<<"$canon")
  post "$base/api/kernel/routes" "$root" "{\"canon_id\":\"$canon_id\",\"method\":\"POST\",\"path\":\"/payments/process\",\"required_permissions\":[\"finance.payment.execute\"],\"idempotency\":\"required\",\"audit_calls\":true}" >/dev/null
  post "$base/api/kernel/routes" "$root" "{\"canon_id\":\"$canon_id\",\"method\":\"POST\",\"path\":\"/ledger/accounts\",\"required_permissions\":[\"finance.ledger.manage\"],\"idempotency\":\"optional\"}" >/dev/null
  post "$base/api/kernel/routes" "$root" "{\"canon_id\":\"$canon_id\",\"method\":\"GET\",\"path\":\"/ledger/trial-balance\",\"required_permissions\":[\"finance.payment.read\"]}" >/dev/null
  tenant_id=$(post "$base/api/kernel/tenants" "$root" '{"slug":"bench","name":"Bench"}' | json_field '["id"]')
  post "$base/api/kernel/tenants/$tenant_id/admins" "$root" "{\"email\":\"admin@bench.example\",\"name\":\"Admin\",\"password\":\"$password\"}" >/dev/null
  # The one login of the scenario: the tenant's administrator holds every finance permission.
  token=$(post "$base/api/kernel/auth/login" "" "{\"tenant\":\"bench\",\"email\":\"admin@bench.example\",\"password\":\"$password\"}" | json_field '["access_token"]')
  user_id=$(curl -fsS "$base/api/kernel/auth/me" -H "Authorization: Bearer $token" | json_field '["subject"]["id"]')
  local role
  role=$(post "$base/api/kernel/roles" "$token" '{"name":"publisher","permissions":["kernel.event.publish"]}' | json_field '["id"]')
  client=$(post "$base/api/kernel/service-accounts" "$token" "{\"name\":\"payment-hub\",\"role_ids\":[\"$role\"]}")
  (cd "$dir" && exec env PAYMENT_HUB_BIND="127.0.0.1:$hub_port" PAYMENT_HUB_DATABASE_URL="$hub_db" \
    AIBOS_CANON_NAME=payment-hub AIBOS_ASSERTION_SECRETS="$canon_secret" AIBOS_KERNEL_URL="$base" \
    AIBOS_CLIENT_ID="$(json_field '["client_id"]' <<<"$client")" AIBOS_CLIENT_SECRET="$(json_field '["client_secret"]' <<<"$client")" \
    RUST_LOG=warn "$HUB_BIN" 2>"$dir/hub.log") &
  hub_pid=$!
  pids+=("$hub_pid")
  hub_base="http://127.0.0.1:$hub_port"
  wait_http "$hub_base/ping"
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/api/gateway/payment-hub/ledger/trial-balance" -H "Authorization: Bearer $token")" = 200 ] && break
    sleep 0.1
  done
  : >"$dir/accounts"
  for i in $(seq 1 "$ACCOUNTS"); do
    post "$base/api/gateway/payment-hub/ledger/accounts" "$token" \
      "{\"name\":\"account $i\",\"currency\":\"EUR\",\"opening_balance_minor\":1000000000000}" | json_field '["id"]' >>"$dir/accounts"
  done
}

# sign_assertions FILE COUNT: COUNT assertions for POST /payments/process as
# the kernel signs them (HS256 over the claims, kid in the header), one
# "<jwt> <correlation id>" per line; valid for 60 s.
sign_assertions() {
  python3 - "$1" "$2" "$canon_secret" "$tenant_id" "$user_id" <<'PY'
import base64, hashlib, hmac, json, sys, time, uuid
path, count, secret, tenant, user = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=")
header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": secret.split("_")[1]}, separators=(",", ":")).encode())
key, now = secret.encode(), int(time.time())
with open(path, "w") as out:
    for _ in range(count):
        cid = str(uuid.uuid4())
        claims = {"iss": "aibos-kernel", "aud": "payment-hub", "tid": tenant, "sub": user, "act": "user", "cid": cid,
                  "htm": "POST", "htu": "/payments/process", "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
        signing_input = header + b"." + b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = b64(hmac.new(key, signing_input, hashlib.sha256).digest())
        out.write((signing_input + b"." + signature).decode() + " " + cid + "\n")
PY
}

# load MODE URL: one wrk run; prints "<payments/s> <p50> <p95> <p99> <errors> <requests>".
load() {
  local mode=$1 url=$2 path=${2#http://*/}
  PAYMENTS_MODE=$mode PAYMENTS_PATH="/$path" PAYMENTS_TOKEN="$token" PAYMENTS_TENANT="$tenant_id" \
    PAYMENTS_USER="$user_id" PAYMENTS_ACCOUNTS="$work/$engine/accounts" PAYMENTS_ASSERTIONS="$work/assertions" \
    PAYMENTS_THREADS=$WRK_THREADS \
    wrk -t$WRK_THREADS -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" -s "$BENCH_ROOT/bench/payments.lua" "$url" |
    awk '/^RESULT/ { printf "%.0f %s %s %s %d %d\n", $2 / ($3 / 1e6), $6, $7, $8, $4, $2 }'
}

results=()
cpu_lines=()
steal_before=$(steal_ticks)
started=$(date +%s)
for engine in $ENGINES; do
  deploy "$work/$engine" "$engine"
  sign_assertions "$work/assertions" $((SECONDS_PER_RUN * ASSERTIONS_PER_SECOND))
  # CPU per payment of the kernel, the hub and PostgreSQL's processes (all of
  # the server user's: backends, WAL writer, checkpointer), through the run.
  postgres_pids() { pgrep -u postgres -d ' ' postgres || true; }
  per_payment() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v n="$2" 'BEGIN { printf "%.0f", t / hz * 1e6 / (n > 0 ? n : 1) }'; }
  hub_before=$(cpu_ticks "$hub_pid")
  # shellcheck disable=SC2046
  pg_before=$(cpu_ticks $(postgres_pids))
  direct=$(load direct "$hub_base/payments/process")
  hub_mid=$(cpu_ticks "$hub_pid")
  # shellcheck disable=SC2046
  pg_mid=$(cpu_ticks $(postgres_pids))
  cpu_before=$(cpu_ticks "$kernel_pid")
  gateway=$(load gateway "$base/api/gateway/payment-hub/payments/process")
  cpu_after=$(cpu_ticks "$kernel_pid")
  hub_after=$(cpu_ticks "$hub_pid")
  # shellcheck disable=SC2046
  pg_after=$(cpu_ticks $(postgres_pids))
  read -r g_rps _ _ _ _ g_requests <<<"$gateway"
  read -r _ _ _ _ _ d_requests <<<"$direct"
  kernel_us=$(per_payment $((cpu_after - cpu_before)) "$g_requests")
  cpu_lines+=("$engine direct: hub $(per_payment $((hub_mid - hub_before)) "$d_requests") µs, postgres $(per_payment $((pg_mid - pg_before)) "$d_requests") µs per payment")
  cpu_lines+=("$engine gateway: kernel $kernel_us µs, hub $(per_payment $((hub_after - hub_mid)) "$g_requests") µs, postgres $(per_payment $((pg_after - pg_mid)) "$g_requests") µs per payment")
  balanced=$(curl -fsS "$base/api/gateway/payment-hub/ledger/trial-balance" -H "Authorization: Bearer $token" | json_field '["balanced"]')
  read -r d_rps _ <<<"$direct"
  ratio=$(awk -v g="$g_rps" -v d="$d_rps" 'BEGIN { printf "%.2f", (d > 0 ? g / d : 0) }')
  results+=("$engine direct $direct - - -" "$engine gateway $gateway $ratio $kernel_us $balanced")
  for pid in "$kernel_pid" "$hub_pid"; do kill "$pid" 2>/dev/null || true; done
  wait "$kernel_pid" "$hub_pid" 2>/dev/null || true
done
steal=$(steal_share "$steal_before" "$(steal_ticks)" $(($(date +%s) - started)))

echo
echo "payments: $CONNECTIONS connections, $SECONDS_PER_RUN s per run, $ACCOUNTS accounts, $(nproc) cores, steal $steal"
printf '%-9s %-8s %11s %8s %8s %8s %7s %9s %8s %14s %9s\n' engine path payments/s p50_ms p95_ms p99_ms errors requests ratio kernel_us/pay balanced
for line in "${results[@]}"; do
  # shellcheck disable=SC2086 # fields
  printf '%-9s %-8s %11s %8s %8s %8s %7s %9s %8s %14s %9s\n' $line
done
printf '%s\n' "${cpu_lines[@]}"
echo "targets: gateway >= 1000 payments/s, p95 < 100 ms, 0 errors, ratio gateway/direct >= 0.70"
