#!/usr/bin/env bash
# Full-rebuild rate of the nexus against cp: a fully written (non-sparse, incompressible) SIZE
# file is copied by `cp --sparse=never` and rebuilt through a nexus onto a new file by the
# `rebuild_rate` example, each followed by an fsync of the copy. The page cache is dropped
# before every timed run, runs are interleaved over ROUNDS rounds (alternating which goes first),
# and each cell is the median, because this machine is shared. Both are timed by the same wall
# clock, process start to the end of the fsync. The rebuilt file is compared with the source
# once.
#
#   bench/nexus-rebuild.sh                                    # 4 GiB, 3 rounds
#   SIZE=1G ROUNDS=5 bench/nexus-rebuild.sh
#   REBUILD_ARGS="--segment 4M --parallel 8" bench/nexus-rebuild.sh
#   BENCH_DIR=/mnt/disk bench/nexus-rebuild.sh                # where the files go
#
# Needs: cp and sync (coreutils), cmp, numfmt, python3; root to drop the page cache (without
# it, runs read a warm cache and a warning says so); openssl makes the source faster than
# /dev/urandom.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-4G}
ROUNDS=${ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
REBUILD_ARGS=${REBUILD_ARGS:-}
BYTES=$(numfmt --from=iec "$SIZE")
WORK=$(mktemp -d "$BENCH_DIR/strata-rebuild.XXXXXX")
RESULTS=$WORK/results.tsv
trap 'rm -rf "$WORK"' EXIT

for tool in cp sync cmp numfmt python3; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool" >&2; exit 1; }
done

cargo build --release -q -p strata-nexus --example rebuild_rate
REBUILD=$PWD/target/release/examples/rebuild_rate

# The source, fully written with incompressible data so that neither side can skip or shrink
# anything.
SRC=$WORK/source.img
echo "preparing a $SIZE ($BYTES bytes) source in $WORK ($(df --output=fstype "$WORK" | tail -1))" >&2
if command -v openssl >/dev/null; then
  # An AES-CTR keystream: incompressible, and several times faster than /dev/urandom.
  { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass pass:strata </dev/zero 2>/dev/null || true; } |
    head -c "$BYTES" >"$SRC"
else
  head -c "$BYTES" /dev/urandom >"$SRC"
fi
[ "$(stat -c %s "$SRC")" = "$BYTES" ] || { echo "could not write $BYTES bytes to $SRC" >&2; exit 1; }
sync "$SRC"

DST=$WORK/target.img
CP_CMD=(cp --sparse=never "$SRC" "$DST")
# shellcheck disable=SC2206 # REBUILD_ARGS is a list of flags
REBUILD_CMD=("$REBUILD" "$SRC" "$DST" $REBUILD_ARGS)

warned=""
drop_caches() {
  sync
  if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
    [ -n "$warned" ] || echo "warning: cannot drop the page cache; runs read a warm cache" >&2
    warned=1
  fi
}

# Run one timed copy ($1: cp or strata) and append its row to the results.
TIMEFORMAT='%3R %3U %3S'
run() {
  local what=$1 round=$2 line="" times
  rm -f "$DST"
  drop_caches
  case $what in
    cp) times=$({ time { "${CP_CMD[@]}" && sync "$DST"; } 2>"$WORK/err"; } 2>&1) ;;
    strata) times=$({ time "${REBUILD_CMD[@]}" >"$WORK/out" 2>"$WORK/err"; } 2>&1) ;;
  esac || { echo "$what failed:" >&2; cat "$WORK/err" >&2; exit 1; }
  [ "$what" = strata ] && line=$(grep '^rebuild ' "$WORK/out")
  read -r real user sys <<<"$times"
  python3 - "$round" "$what" "$BYTES" "$real" "$user" "$sys" "$line" >>"$RESULTS" <<'PY'
import sys
rnd, what, size, real, user, sys_, line = sys.argv[1:]
fields = dict(f.split("=", 1) for f in line.split()[1:])
mibs = int(size) / 2**20 / float(real)
print(f"{rnd}\t{what}\t{mibs:.1f}\t{real}\t{user}\t{sys_}\t{fields.get('rate_mib_s', '-')}\t{fields.get('copied', '-')}\t{fields.get('zeroed', '-')}")
PY
  tail -1 "$RESULTS" >&2
}

printf 'round\twhat\tmibs\treal_s\tuser_s\tsys_s\tinner_mibs\tcopied\tzeroed\n' >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="cp strata"; else order="strata cp"; fi
  for what in $order; do
    run "$what" "$round"
    if [ "$what" = strata ] && [ "$round" = 1 ]; then
      cmp "$SRC" "$DST" || { echo "the rebuilt $DST differs from $SRC" >&2; exit 1; }
      echo "rebuilt target is identical to the source" >&2
    fi
  done
done
rm -f "$DST"
cp "$RESULTS" "${BENCH_RESULTS:-/dev/null}" 2>/dev/null || true

python3 - "$RESULTS" "$SIZE" "${CP_CMD[*]} && sync $DST" "${REBUILD_CMD[*]}" "$(grep '^rebuild ' "$WORK/out")" <<'PY'
import csv, statistics, sys
path, size, cp_cmd, rebuild_cmd, last = sys.argv[1:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
def med(what, field):
    return statistics.median(float(r[field]) for r in rows if r["what"] == what)
cp, strata = med("cp", "mibs"), med("strata", "mibs")
print(f"{size} fully written file, medians of {len(rows) // 2} rounds, page cache dropped before each run")
print()
print("| copy | MiB/s (wall) | seconds | CPU user+sys s | strata/cp |")
print("|---|---|---|---|---|")
for what, mibs in (("cp", cp), ("strata", strata)):
    cpu = med(what, "user_s") + med(what, "sys_s")
    print(f"| {what} | {mibs:.0f} | {med(what, 'real_s'):.2f} | {cpu:.2f} | {mibs / cp:.2f}x |")
inner = med("strata", "inner_mibs")
print()
print(f"strata, timed inside (add_child to the end of the fsync): {inner:.0f} MiB/s")
print(f"cp:     {cp_cmd}")
print(f"strata: {rebuild_cmd}")
settings = {k: v for k, v in (f.split("=", 1) for f in last.split()[1:])}
print("rebuild settings: " + " ".join(f"{k}={settings[k]}" for k in ("segment", "parallel", "granularity", "direct")))
PY
