#!/usr/bin/env bash
# What snapshots, clones and transactions cost, beside a qcow2 overlay served by qemu-nbd.
# See bench/versions.py for the rows.
#
#   bench/versions.sh
#   SIZE=4G RUNTIME=30 WRITES=200000 bench/versions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio nbdinfo nbdcopy nbdkit qemu-img qemu-nbd python3; do
  command -v "$tool" >/dev/null || {
    echo "bench needs $tool (apt-get install fio libnbd-bin nbdkit qemu-utils)" >&2
    exit 1
  }
done
cargo build --release -q -p strata
exec python3 bench/versions.py "$PWD/target/release/strata"
