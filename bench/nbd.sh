#!/usr/bin/env bash
# Side-by-side NBD benchmark: the same fio jobs (nbd engine, one job, a 512 MiB region) against
# the embedded default's page-store image (`strata serve` with no configuration: the volume
# `demo`, image://local/demo in the data directory), Strata `file://`, nbdkit's `file` plugin
# and qemu-nbd, all on the same disk (optionally nbd-server, and Strata and nbdkit on memory).
# Prints IOPS, MiB/s, p50/p99 completion latency, server CPU microseconds per request, and each
# Strata backend's ratio to nbdkit `file`. One server runs at a time; backends are interleaved
# over ROUNDS rounds and each cell is the median, because this machine is shared and single
# runs swing by 30%.
#
#   bench/nbd.sh                      # defaults: 3 rounds of 10 s per job
#   RUNTIME=30 bench/nbd.sh           # longer runs
#   JOBS="randread randwrite" bench/nbd.sh
#   BACKENDS="strata-image nbdkit-file" bench/nbd.sh
#   BACKENDS="strata-file nbdkit-file qemu-nbd-file nbd-server-file strata-mem nbdkit-mem" bench/nbd.sh
#
# Needs: fio (with the nbd engine), nbdkit, qemu-nbd, python3 (nbd-server for its backend).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
RAMP=${RAMP:-2}
SIZE_MB=${SIZE_MB:-512}
JOBS=${JOBS:-"randwrite randread seqwrite seqread"}
BACKENDS=${BACKENDS:-"strata-image nbdkit-file qemu-nbd-file strata-file"}
PORT=${PORT:-10899}
WORK=$(mktemp -d /var/tmp/strata-bench.XXXXXX)
RESULTS=$WORK/results.tsv
trap 'kill_server; rm -rf "$WORK"' EXIT

tools="fio nbdkit qemu-nbd python3"
[[ " $BACKENDS " == *" nbd-server-file "* ]] && tools="$tools nbd-server"
for tool in $tools; do
  PATH="/usr/sbin:/sbin:$PATH" command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install fio nbdkit qemu-utils nbd-server)" >&2; exit 1; }
done

cargo build --release -q -p strata
STRATA=$PWD/target/release/strata

# The backing file, fully written so reads hit data, shared by every file backend.
FILE=$WORK/disk.img
echo "preparing ${SIZE_MB} MiB backing file in $WORK" >&2
dd if=/dev/urandom of="$FILE" bs=1M count="$SIZE_MB" status=none
sync

SERVER_PID=""
kill_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
  # nbd-server daemonizes and forks a process per client.
  pkill -f "nbd-server -C $WORK/nbd-server.conf" 2>/dev/null || true
}

# The processes serving the benchmark: the server and, for nbd-server, its per-client children.
server_pids() {
  if [ -n "$SERVER_PID" ]; then echo "$SERVER_PID"; else pgrep -f "nbd-server -C $WORK/nbd-server.conf"; fi
}

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "server did not listen on $PORT" >&2
  exit 1
}

# The export each backend serves.
export_of() { if [ "$1" = strata-image ]; then echo demo; else echo bench; fi; }

start_server() {
  local backend=$1
  case $backend in
    strata-image)
      # The embedded default, as a new user meets it: no configuration file at all.
      "$STRATA" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/strata-image" \
        --no-nvmf --metrics-listen 127.0.0.1:0 >/dev/null 2>"$WORK/strata-image.log" &
      ;;
    strata-file)
      "$STRATA" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/strata" \
        --config /dev/null --volume "bench=file://$FILE" >/dev/null 2>"$WORK/strata.log" &
      ;;
    strata-mem)
      "$STRATA" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/strata" \
        --config /dev/null --volume "bench=mem://bench?size=${SIZE_MB}M" >/dev/null 2>"$WORK/strata.log" &
      ;;
    nbdkit-file)
      nbdkit -f -i 127.0.0.1 -p "$PORT" -e bench file "$FILE" &
      ;;
    nbdkit-mem)
      nbdkit -f -i 127.0.0.1 -p "$PORT" -e bench memory "${SIZE_MB}M" &
      ;;
    qemu-nbd-file)
      qemu-nbd -t -f raw -b 127.0.0.1 -p "$PORT" -x bench --cache=writeback --aio=threads "$FILE" &
      ;;
    nbd-server-file)
      cat >"$WORK/nbd-server.conf" <<EOF
[generic]
    listenaddr = 127.0.0.1
    port = $PORT
    allowlist = false
[bench]
    exportname = $FILE
EOF
      nbd-server -C "$WORK/nbd-server.conf" 2>/dev/null
      wait_port
      return
      ;;
    *) echo "unknown backend $backend" >&2; exit 1 ;;
  esac
  SERVER_PID=$!
  wait_port
}

fio_job() {
  local job=$1 out=$2 export=$3
  local rw bs depth
  case $job in
    randread) rw=randread bs=4k depth=32 ;;
    randwrite) rw=randwrite bs=4k depth=32 ;;
    seqread) rw=read bs=1M depth=8 ;;
    seqwrite) rw=write bs=1M depth=8 ;;
  esac
  fio --name="$job" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/$export" \
    --rw="$rw" --bs="$bs" --iodepth="$depth" --numjobs=1 --size="${SIZE_MB}M" \
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json >"$out"
}

# CPU time (user+system, in clock ticks) the serving processes have used.
cpu_ticks() {
  local total=0 pid
  for pid in $(server_pids); do
    # utime + stime, plus the time of children already reaped (nbd-server's per-client ones).
    total=$((total + $(awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

printf 'round\tbackend\tjob\tiops\tmibs\tcpu_us_per_req\tp50_us\tp99_us\n' >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for backend in $BACKENDS; do
    start_server "$backend"
    export=$(export_of "$backend")
    if [[ $backend == *-mem || ( $backend == strata-image && $round == 1 ) ]]; then
      # Fill the device so reads see data, as on the file (the image keeps its data across
      # rounds: its data directory stays).
      fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/$export" --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_MB}M" --output-format=terse >/dev/null
    fi
    for job in $JOBS; do
      before=$(cpu_ticks)
      fio_job "$job" "$WORK/$backend-$job.json" "$export"
      after=$(cpu_ticks)
      python3 - "$WORK/$backend-$job.json" "$backend" "$job" "$((after - before))" "$(getconf CLK_TCK)" "$RUNTIME" "$RAMP" "$round" >>"$RESULTS" <<'PY'
import json, sys
path, backend, job, ticks, hz, runtime, ramp, rnd = sys.argv[1:]
text = open(path).read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
iops = side["iops"]
mibs = side["bw_bytes"] / 2**20
ios = iops * (float(runtime) + float(ramp))  # the server worked through the ramp too
cpu_us = int(ticks) / int(hz) * 1e6 / ios if ios else 0
pct = side["clat_ns"].get("percentile", {})
p50 = pct.get("50.000000", 0) / 1000
p99 = pct.get("99.000000", 0) / 1000
print(f"{rnd}\t{backend}\t{job}\t{iops:.0f}\t{mibs:.1f}\t{cpu_us:.1f}\t{p50:.0f}\t{p99:.0f}")
PY
      tail -1 "$RESULTS" >&2
      if [ "$backend" = strata-image ]; then
        # Replaced segments stay until garbage collection (not scheduled by default); collect
        # them between jobs so that the disk holds about the live data, as the file does.
        "$STRATA" gc --data-dir "$WORK/strata-image" --grace-secs 20 >/dev/null 2>&1
      fi
    done
    kill_server
  done
done
cp "$RESULTS" "${BENCH_RESULTS:-/dev/null}" 2>/dev/null || true

python3 - "$RESULTS" <<'PY'
import csv, sys
import statistics
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cells = {}
for r in rows:
    cells.setdefault((r["backend"], r["job"]), []).append(r)
res = {}
for key, rs in cells.items():
    med = lambda f: statistics.median(float(r[f]) for r in rs)
    res[key] = {f: med(f) for f in ("iops", "mibs", "cpu_us_per_req", "p50_us", "p99_us")}
jobs = list(dict.fromkeys(r["job"] for r in rows))
backends = list(dict.fromkeys(r["backend"] for r in rows))
names = {"randwrite": "4k randwrite qd32", "randread": "4k randread qd32",
         "seqwrite": "1M write qd8", "seqread": "1M read qd8"}
print(f"medians of {len(next(iter(cells.values())))} rounds; cells: IOPS (MiB/s; p50/p99 µs; server µs CPU/req)")
print()
head = ["job"] + backends
peer = "nbdkit-file" if "nbdkit-file" in backends else None
ratios = [b for b in backends if b.startswith("strata") and peer and b.endswith(("-image", "-file"))]
head += [f"{b} / {peer}" for b in ratios]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for job in jobs:
    out = [names.get(job, job)]
    for b in backends:
        r = res.get((b, job))
        out.append(f"{r['iops']:.0f} ({r['mibs']:.0f}; {r['p50_us']:.0f}/{r['p99_us']:.0f}; {r['cpu_us_per_req']:.1f})" if r else "-")
    for b in ratios:
        a, p = res.get((b, job)), res.get((peer, job))
        out.append(f"{a['iops'] / max(p['iops'], 1):.2f}x" if a and p else "-")
    print("| " + " | ".join(out) + " |")
PY
