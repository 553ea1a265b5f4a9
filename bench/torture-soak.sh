#!/usr/bin/env bash
# Crash-torture soak: the page-store crash test (crates/strata/tests/torture.rs) with many more
# cycles than CI runs. Each cycle writes through NBD, flushes at random points, has the daemon
# die (SIGKILL at a random moment, or an armed failpoint aborting it mid-checkpoint or
# mid-compaction), restarts it and checks every page of the image. ROUNDS > 1 repeats the whole
# run with fresh seeds; the first failure stops the soak and its report names the seed, the
# cycle, the page and where the data directory and daemon logs were kept.
#
#   bench/torture-soak.sh                        # 1000 cycles, one round
#   CYCLES=5000 bench/torture-soak.sh
#   ROUNDS=10 CYCLES=500 bench/torture-soak.sh   # ten runs with different seeds
#   SEED=1234 CYCLES=200 bench/torture-soak.sh   # repeat a failing run's workload
#   TMPDIR=/mnt/disk bench/torture-soak.sh       # where the data directories go
set -euo pipefail
cd "$(dirname "$0")/.."

CYCLES=${CYCLES:-1000}
ROUNDS=${ROUNDS:-1}
SEED=${SEED:-}

cargo test --release -p strata --test torture --no-run
for ((round = 1; round <= ROUNDS; round++)); do
  seed=${SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
  echo "round $round of $ROUNDS: $CYCLES cycles, seed $seed" >&2
  STRATA_TORTURE_CYCLES=$CYCLES STRATA_TORTURE_SEED=$seed \
    cargo test --release -p strata --test torture -- --nocapture
done
