#!/usr/bin/env bash
# Backup and restore throughput (issue 23): `aibos backup run` and `aibos
# restore` beside the engines' own tools on the same data, in one run.
#   SQLite:     aibos backup run   vs  sqlite3 .backup (a page copy, the floor)
#   PostgreSQL: aibos backup run   vs  pg_dump -Fc
#               aibos restore      vs  pg_restore (into an empty database)
# and the restore time (RTO) of the whole database. The database holds
# AUDIT_ENTRIES audit entries (one hash chain) and EVENTS events, filled by the
# kernel's `backup_fill` example. Prints rows/s, MB/s (of the source
# database's size) and the ratios. Targets: backup >= 0.5x pg_dump -Fc,
# restore >= 0.5x pg_restore.
#
#   bench/backup.sh          # AUDIT_ENTRIES=1000000 EVENTS=1000000 RUNS=3 ENGINES="sqlite postgres"
source "$(dirname "$0")/lib.sh"

AUDIT_ENTRIES=${AUDIT_ENTRIES:-1000000}
EVENTS=${EVENTS:-1000000}
RUNS=${RUNS:-3}
ENGINES=${ENGINES:-"sqlite postgres"}
POSTGRES_URL=${AIBOS_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
MASTER_KEY="KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="
export PGOPTIONS="-c client_min_messages=warning"

ensure_packages sqlite3:sqlite3 pg_dump:postgresql-client psql:postgresql-client python3:python3
build_release examples
work=$(mktemp -d)
databases=()
cleanup() {
  for db in "${databases[@]}"; do psql "$POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

seconds_of() { # seconds_of CMD…: wall seconds of CMD (its output discarded)
  local started
  started=$(date +%s.%N)
  "$@" >/dev/null
  awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", e - s }'
}
new_pg_database() { # new_pg_database NAME: creates it, prints its URL
  psql "$POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null
  psql "$POSTGRES_URL" -qc "CREATE DATABASE $1" >/dev/null
  databases+=("$1")
  echo "${POSTGRES_URL%/*}/$1"
}
rate() { awk -v n="$1" -v t="$2" 'BEGIN { printf "%.0f", n / t }'; }
mbps() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.1f", b / 1048576 / t }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

rows_total=0
report=()
for engine in $ENGINES; do
  suffix="${RANDOM}_$$"
  if [ "$engine" = postgres ]; then
    source_url=$(new_pg_database "aibos_bench_backup_src_$suffix")
  else
    source_url="sqlite://$work/source.db"
  fi
  echo "filling $AUDIT_ENTRIES audit entries and $EVENTS events into $engine ..." >&2
  fill_s=$(seconds_of env AIBOS_AUTH__MASTER_KEY="$MASTER_KEY" "$BENCH_ROOT/target/dist/examples/backup_fill" "$source_url" "$AUDIT_ENTRIES" "$EVENTS")
  if [ "$engine" = postgres ]; then
    db_bytes=$(psql "$source_url" -Atc "SELECT pg_database_size(current_database())")
  else
    sqlite3 "$work/source.db" 'PRAGMA wal_checkpoint(TRUNCATE)' >/dev/null
    db_bytes=$(stat -c %s "$work/source.db")
  fi
  : >"$work/ours_backup.txt"; : >"$work/anchor_backup.txt"; : >"$work/ours_restore.txt"; : >"$work/anchor_restore.txt"
  for run in $(seq 1 "$RUNS"); do
    rm -rf "$work/backups" "$work/anchor.db" "$work/anchor.dump"
    started=$(date +%s.%N)
    line=$(cd "$work" && AIBOS_DATABASE__URL="$source_url" AIBOS_AUTH__MASTER_KEY="$MASTER_KEY" AIBOS_LOG__LEVEL=warn "$AIBOS_BIN" backup run --dir "$work/backups" --json | tail -n 1)
    awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", e - s }' >>"$work/ours_backup.txt"
    id=$(echo "$line" | json_field '["id"]')
    rows_total=$(echo "$line" | json_field '["rows"]')
    backup_bytes=$(echo "$line" | json_field '["bytes"]')
    if [ "$engine" = postgres ]; then
      seconds_of pg_dump -Fc -f "$work/anchor.dump" "$source_url" >>"$work/anchor_backup.txt"
      target_url=$(new_pg_database "aibos_bench_backup_ours_$suffix")
      started=$(date +%s.%N)
      (cd "$work" && AIBOS_AUTH__MASTER_KEY="$MASTER_KEY" AIBOS_LOG__LEVEL=warn "$AIBOS_BIN" restore --id "$id" --dir "$work/backups" --target-url "$target_url" --json >/dev/null)
      awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", e - s }' >>"$work/ours_restore.txt"
      (cd "$work" && AIBOS_DATABASE__URL="$target_url" AIBOS_AUTH__MASTER_KEY="$MASTER_KEY" "$AIBOS_BIN" audit verify >/dev/null) \
        || { echo "FAIL: the restored database's audit chains do not verify" >&2; exit 1; }
      anchor_url=$(new_pg_database "aibos_bench_backup_anchor_$suffix")
      seconds_of pg_restore -d "$anchor_url" "$work/anchor.dump" >>"$work/anchor_restore.txt"
    else
      seconds_of sqlite3 "$work/source.db" ".backup '$work/anchor.db'" >>"$work/anchor_backup.txt"
      rm -rf "$work/restored"
      started=$(date +%s.%N)
      (cd "$work" && AIBOS_AUTH__MASTER_KEY="$MASTER_KEY" AIBOS_LOG__LEVEL=warn "$AIBOS_BIN" restore --id "$id" --dir "$work/backups" --target-url "sqlite://$work/restored/aibos.db" --json >/dev/null)
      awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", e - s }' >>"$work/ours_restore.txt"
      (cd "$work" && AIBOS_DATABASE__URL="sqlite://$work/restored/aibos.db" AIBOS_AUTH__MASTER_KEY="$MASTER_KEY" "$AIBOS_BIN" audit verify >/dev/null) \
        || { echo "FAIL: the restored database's audit chains do not verify" >&2; exit 1; }
      rm -rf "$work/anchor_restored.db"
      seconds_of sqlite3 "$work/anchor_restored.db" ".restore '$work/anchor.db'" >>"$work/anchor_restore.txt"
    fi
    echo "$engine run $run: backup $(tail -n1 "$work/ours_backup.txt") s (anchor $(tail -n1 "$work/anchor_backup.txt") s), restore $(tail -n1 "$work/ours_restore.txt") s (anchor $(tail -n1 "$work/anchor_restore.txt") s)" >&2
  done
  ob=$(median <"$work/ours_backup.txt"); ab=$(median <"$work/anchor_backup.txt")
  orr=$(median <"$work/ours_restore.txt"); ar=$(median <"$work/anchor_restore.txt")
  if [ "$engine" = postgres ]; then anchors=("pg_dump -Fc" "pg_restore"); else anchors=("sqlite3 .backup" "sqlite3 .restore"); fi
  report+=("$(printf '%-9s %-26s %8s s %10s rows/s %8s MB/s' "$engine" "aibos backup run" "$ob" "$(rate "$rows_total" "$ob")" "$(mbps "$db_bytes" "$ob")")")
  report+=("$(printf '%-9s %-26s %8s s %10s rows/s %8s MB/s' "$engine" "${anchors[0]}" "$ab" "$(rate "$rows_total" "$ab")" "$(mbps "$db_bytes" "$ab")")")
  report+=("$(printf '%-9s %-26s %8s s %10s rows/s %8s MB/s   <- RTO' "$engine" "aibos restore" "$orr" "$(rate "$rows_total" "$orr")" "$(mbps "$db_bytes" "$orr")")")
  report+=("$(printf '%-9s %-26s %8s s %10s rows/s %8s MB/s' "$engine" "${anchors[1]}" "$ar" "$(rate "$rows_total" "$ar")" "$(mbps "$db_bytes" "$ar")")")
  report+=("$(printf '%-9s backup / %-17s %8sx   restore / %s %sx   (database %s MiB, backup %s MiB, fill %s s)' "$engine" "${anchors[0]}" "$(ratio "$ab" "$ob")" "${anchors[1]}" "$(ratio "$ar" "$orr")" "$((db_bytes / 1048576))" "$((backup_bytes / 1048576))" "$fill_s")")
done

echo
echo "backup  ($(date -u +%Y-%m-%dT%H:%MZ), $AUDIT_ENTRIES audit entries + $EVENTS events, $rows_total rows in all, $RUNS runs, medians, $(nproc) cores)"
printf '%s\n' "${report[@]}"
echo "targets: backup >= 0.5x pg_dump -Fc, restore >= 0.5x pg_restore (throughput, so the ratio is anchor time / our time)"
