#!/usr/bin/env bash
# iSCSI initiators side by side, on one tgt-served file (tgtd started here, a 1 GiB LUN):
#
#   strata         fio (nbd engine) → strata serve → iscsi:// volume (Strata's initiator) → tgt
#   qemu-nbd       fio (nbd engine) → qemu-nbd → libiscsi (qemu's iscsi driver)          → tgt
#   strata-direct  crates/iscsi/examples/iscsi_perf.rs: an IscsiDevice driven directly → tgt
#   iscsi-perf     libiscsi's own benchmark tool, straight to tgt (it only reads)
#
# The two fio paths cross the same NBD hop, so they compare the initiators under a real
# client; the two direct tools compare them with nothing in between. Jobs: 4k random read/write at depth 32, 1M sequential read/write at depth 8.
# Backends are interleaved over ROUNDS rounds and each cell is the median (this machine is
# shared). CPU is the initiator process's (strata serve, qemu-nbd, the tools) per request.
#
#   bench/iscsi.sh                 # 3 rounds of 10 s per job
#   RUNTIME=20 ROUNDS=5 bench/iscsi.sh
#   BACKENDS="strata qemu-nbd" JOBS="randwrite" bench/iscsi.sh
#
# Needs: tgt, fio (nbd engine), qemu-nbd with the iscsi block driver (qemu-block-extra),
# libiscsi-bin (iscsi-perf), python3.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
RAMP=${RAMP:-2}
SIZE_MB=${SIZE_MB:-1024}
JOBS=${JOBS:-"randread randwrite seqread seqwrite"}
BACKENDS=${BACKENDS:-"strata qemu-nbd strata-direct iscsi-perf"}
WORK=$(mktemp -d /var/tmp/strata-iscsi-bench.XXXXXX)
RESULTS=$WORK/results.tsv

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ISCSI_PORT=$(free_port)
NBD_PORT=$(free_port)
CONTROL=$((ISCSI_PORT % 32768))
IQN=iqn.2024-01.io.strata.bench:disk
LUN_URI="iscsi://127.0.0.1:$ISCSI_PORT/$IQN/1"

TGTD_PID=""
SERVER_PID=""
kill_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
cleanup() {
  kill_server
  if [ -n "$TGTD_PID" ]; then kill -9 "$TGTD_PID" 2>/dev/null || true; wait "$TGTD_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

export PATH="/usr/sbin:/sbin:$PATH"
for tool in tgtd tgtadm fio qemu-nbd iscsi-perf python3; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install tgt fio qemu-utils qemu-block-extra libiscsi-bin)" >&2; exit 1; }
done

cargo build --release -q -p strata
cargo build --release -q -p strata-iscsi --example iscsi_perf
STRATA=$PWD/target/release/strata
PERF=$PWD/target/release/examples/iscsi_perf

FILE=$WORK/disk.img
echo "preparing a ${SIZE_MB} MiB backing file in $WORK" >&2
dd if=/dev/urandom of="$FILE" bs=1M count="$SIZE_MB" status=none
sync

tgtd -f -C "$CONTROL" --iscsi "portal=127.0.0.1:$ISCSI_PORT" >"$WORK/tgtd.log" 2>&1 &
TGTD_PID=$!
tgtadm_() { tgtadm -C "$CONTROL" --lld iscsi "$@"; }
for _ in $(seq 1 200); do tgtadm_ --mode target --op show >/dev/null 2>&1 && break; sleep 0.05; done
tgtadm_ --op new --mode target --tid 1 -T "$IQN"
tgtadm_ --op new --mode logicalunit --tid 1 --lun 1 -b "$FILE"
tgtadm_ --op bind --mode target --tid 1 -I ALL

wait_port() {
  for _ in $(seq 1 400); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  exit 1
}

start_server() {
  case $1 in
    strata)
      "$STRATA" serve --listen "127.0.0.1:$NBD_PORT" --data-dir "$WORK/strata" \
        --config /dev/null --volume "bench=$LUN_URI" >/dev/null 2>"$WORK/strata.log" &
      ;;
    qemu-nbd)
      qemu-nbd -t -f raw -b 127.0.0.1 -p "$NBD_PORT" -x bench "$LUN_URI" 2>"$WORK/qemu-nbd.log" &
      ;;
  esac
  SERVER_PID=$!
  wait_port "$NBD_PORT"
}

job_shape() {
  case $1 in
    randread) echo "randread 4k 32" ;;
    randwrite) echo "randwrite 4k 32" ;;
    seqread) echo "read 1M 8" ;;
    seqwrite) echo "write 1M 8" ;;
  esac
}

cpu_ticks() {
  local pid=$1
  awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0
}

record() { # round backend job iops mibs ticks requests
  python3 -c '
import sys
rnd, backend, job, iops, mibs, ticks, ios, hz = sys.argv[1:]
cpu = float(ticks) / int(hz) * 1e6 / float(ios) if float(ios) else 0
print(f"{rnd}\t{backend}\t{job}\t{float(iops):.0f}\t{float(mibs):.1f}\t{cpu:.1f}")
' "$@" "$(getconf CLK_TCK)" >>"$RESULTS"
  tail -1 "$RESULTS" >&2
}

printf 'round\tbackend\tjob\tiops\tmibs\tcpu_us_per_req\n' >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for backend in $BACKENDS; do
    if [ "$backend" = iscsi-perf ] || [ "$backend" = strata-direct ]; then
      for job in $JOBS; do
        read -r rw bs depth <<<"$(job_shape "$job")"
        bytes=$( [ "$bs" = 4k ] && echo 4096 || echo 1048576 )
        if [ "$backend" = iscsi-perf ]; then
          # libiscsi's tool only reads.
          case $rw in randread|read) ;; *) continue ;; esac
          random=""; [ "$rw" = randread ] && random="-r"
          iscsi-perf -m "$depth" -b "$((bytes / 512))" $random -t "$((RUNTIME + RAMP))" "$LUN_URI" \
            >"$WORK/perf.out" 2>&1 &
        else
          "$PERF" "$LUN_URI" "$rw" "$bytes" "$depth" "$((RUNTIME + RAMP))" >"$WORK/perf.out" 2>&1 &
        fi
        pid=$!
        before=$(cpu_ticks "$pid")
        # Its own CPU, read just before it exits.
        ticks=0
        while kill -0 "$pid" 2>/dev/null; do t=$(cpu_ticks "$pid"); [ "$t" -gt 0 ] && ticks=$t; sleep 0.2; done
        wait "$pid" || true
        iops=$(tr '\r' '\n' <"$WORK/perf.out" | sed -n 's/^ *iops average \([0-9]*\).*/\1/p' | tail -1)
        mibs=$(python3 -c "print($iops * $bytes / 2**20)")
        record "$round" "$backend" "$job" "$iops" "$mibs" "$((ticks - before))" "$((iops * (RUNTIME + RAMP)))"
      done
      continue
    fi
    start_server "$backend"
    for job in $JOBS; do
      read -r rw bs depth <<<"$(job_shape "$job")"
      before=$(cpu_ticks "$SERVER_PID")
      fio --name="$job" --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT/bench" \
        --rw="$rw" --bs="$bs" --iodepth="$depth" --numjobs=1 --size="${SIZE_MB}M" \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json >"$WORK/fio.json"
      after=$(cpu_ticks "$SERVER_PID")
      read -r iops mibs <<<"$(python3 -c '
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
print(side["iops"], side["bw_bytes"] / 2**20)
' "$WORK/fio.json")"
      record "$round" "$backend" "$job" "$iops" "$mibs" "$((after - before))" \
        "$(python3 -c "print($iops * ($RUNTIME + $RAMP))")"
    done
    kill_server
  done
done
cp "$RESULTS" "${BENCH_RESULTS:-/dev/null}" 2>/dev/null || true

python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cells = {}
for r in rows:
    cells.setdefault((r["backend"], r["job"]), []).append(r)
res = {k: {f: statistics.median(float(r[f]) for r in rs) for f in ("iops", "mibs", "cpu_us_per_req")}
       for k, rs in cells.items()}
jobs = list(dict.fromkeys(r["job"] for r in rows))
backends = list(dict.fromkeys(r["backend"] for r in rows))
others = [b for b in backends if not b.startswith("strata")]
print(f"medians of {max(len(v) for v in cells.values())} rounds\n")
head = ["job"] + backends + ["best Strata / best other"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for job in jobs:
    line = [job]
    for b in backends:
        r = res.get((b, job))
        line.append(f"{r['iops']:.0f} IOPS, {r['mibs']:.0f} MiB/s, {r['cpu_us_per_req']:.1f} µs CPU/req" if r else "-")
    mine = [b for b in backends if b.startswith("strata") and (b, job) in res]
    theirs = [b for b in others if (b, job) in res]
    if mine and theirs:
        m = max(mine, key=lambda b: res[(b, job)]["iops"])
        t = max(theirs, key=lambda b: res[(b, job)]["iops"])
        line.append(f"{res[(m, job)]['iops'] / max(res[(t, job)]['iops'], 1):.2f}x ({m} / {t})")
    else:
        line.append("-")
    print("| " + " | ".join(line) + " |")
PY
