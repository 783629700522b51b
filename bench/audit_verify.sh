#!/usr/bin/env bash
# Audit verification speed: `aibos audit verify` over a chain of N entries (default
# one million) vs `sha256sum` over the same canonical bytes, in one run.
# Target: verify entries/s >= 0.5x sha256sum's entries/s.
#
#   bench/audit_verify.sh                 # N=1000000 RUNS=3, on SQLite
#   N=200000 DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench bench/audit_verify.sh
source "$(dirname "$0")/lib.sh"

N=${N:-1000000}
RUNS=${RUNS:-3}

build_release examples
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
url=${DATABASE_URL:-sqlite://$work/audit.db}

echo "filling $N entries into $url ..." >&2
fill_started=$(date +%s.%N)
"$BENCH_ROOT/target/dist/examples/audit_fill" "$url" "$N" "$work/canonical.txt" >/dev/null
fill_seconds=$(awk -v s="$fill_started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
bytes=$(stat -c %s "$work/canonical.txt")

time_cmd() {
  local started ended
  started=$(date +%s.%N)
  "$@" >/dev/null
  ended=$(date +%s.%N)
  awk -v s="$started" -v e="$ended" 'BEGIN { printf "%.3f\n", e - s }'
}

: >"$work/verify.txt"
: >"$work/sha.txt"
for run in $(seq 1 "$RUNS"); do
  # Read the file once so both measure from the page cache.
  cat "$work/canonical.txt" >/dev/null
  time_cmd sha256sum "$work/canonical.txt" >>"$work/sha.txt"
  (cd "$work" && AIBOS_DATABASE__URL="$url" time_cmd "$AIBOS_BIN" audit verify --tenant system) >>"$work/verify.txt"
  echo "run $run: verify $(tail -n1 "$work/verify.txt") s, sha256sum $(tail -n1 "$work/sha.txt") s" >&2
done
verify_s=$(median <"$work/verify.txt")
sha_s=$(median <"$work/sha.txt")

echo
echo "audit_verify  ($(date -u +%Y-%m-%dT%H:%MZ), $N entries, $((bytes / 1024 / 1024)) MiB canonical JSON, $RUNS runs, medians)"
printf '%-40s %10s s %14s entries/s\n' "aibos audit verify --tenant system" "$verify_s" "$(awk -v n="$N" -v t="$verify_s" 'BEGIN { printf "%.0f", n / t }')"
printf '%-40s %10s s %14s entries/s\n' "sha256sum (same bytes)" "$sha_s" "$(awk -v n="$N" -v t="$sha_s" 'BEGIN { printf "%.0f", n / t }')"
printf '%-40s %10sx\n' "verify / sha256sum (entries/s)" "$(awk -v a="$sha_s" -v b="$verify_s" 'BEGIN { printf "%.2f", a / b }')"
echo "(filling the chain took ${fill_seconds} s)"
