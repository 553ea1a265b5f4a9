#!/usr/bin/env bash
# vhost-user-blk benchmark without a VM: a front-end on the `vhost` crate drives 4k random
# reads and writes at depth 32 and 1M sequential reads and writes at depth 8 against Strata's
# target (in the benchmark's process, over a file device) and against qemu-storage-daemon's
# vhost-user-blk export, on the same filled file, one back end at a time, ROUNDS interleaved
# rounds; prints IOPS, MiB/s, p50/p99 latency, back-end CPU per request and Strata/qsd ratios
# (median of rounds).
#
#   bench/vhost-user.sh                   # defaults: 3 rounds of 5 s per job, 1 GiB file
#   SECONDS_PER_JOB=10 ROUNDS=5 bench/vhost-user.sh
#   ARGS=--direct bench/vhost-user.sh     # O_DIRECT for both (qsd: cache.direct=on, io_uring)
#   ARGS=--strata-mem bench/vhost-user.sh # Strata on a memory device (the target's own cost)
#
# Needs: qemu-storage-daemon (qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v qemu-storage-daemon >/dev/null || { echo "bench needs qemu-storage-daemon (apt-get install qemu-utils)" >&2; exit 1; }
cargo build --release -q -p strata-vhost-user-blk --features frontend --example vhost-user-bench
exec target/release/examples/vhost-user-bench \
  --seconds "${SECONDS_PER_JOB:-5}" --rounds "${ROUNDS:-3}" --size-mib "${SIZE_MIB:-1024}" \
  --dir "${WORKDIR:-/var/tmp}" ${ARGS:-}
