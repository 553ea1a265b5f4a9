#!/usr/bin/env bash
# NVMe/TCP vs NBD on the same memory volume, both driven by Strata's own clients (NvmfDevice and
# NbdDevice) in one run: 4 KiB random read/write at queue depth 32, 1 MiB sequential read/write
# at depth 8. The servers (Strata's NBD server and NVMe/TCP target over one MemDevice) run in a
# child process whose CPU time is read from /proc around every job. Prints IOPS, MiB/s, p50/p99
# latency, server and client CPU per request, and the NVMe/TCP : NBD ratios; each cell is the
# median of ROUNDS interleaved rounds (this machine is shared; single runs swing by 30%).
#
#   bench/nvmf.sh                                  # RUNTIME=10 ROUNDS=5 SIZE_MB=1024
#   RUNTIME=5 ROUNDS=1 bench/nvmf.sh               # a quick look
#   JOBS=4k PROTOCOLS=nvmf bench/nvmf.sh           # some cells only
#   NVMF_QUEUES=2 bench/nvmf.sh                    # more I/O queues for the NVMe/TCP host
#   # user-space instructions per request in the server (stable on a busy machine):
#   SERVER_WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p" SIZE_MB=64 RUNTIME=8 ROUNDS=1 bench/nvmf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RUNTIME=${RUNTIME:-10} ROUNDS=${ROUNDS:-5} SIZE_MB=${SIZE_MB:-1024} RAMP=${RAMP:-2}
cargo build --release -q -p strata-nvmf --example nvmf-bench
exec target/release/examples/nvmf-bench
