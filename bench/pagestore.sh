#!/usr/bin/env bash
# Page-store images on a real S3 server (s3s-fs on loopback), measured with fio over NBD, and a
# peer server side by side when one is given. See bench/pagestore.py for what each row does.
#
#   bench/pagestore.sh                                   # Strata alone
#   MVPS_TE=/path/to/mvps-te bench/pagestore.sh          # and the MVPS transaction engine
#   RUNTIME=30 SIZE=2G RSS_WRITE=4G REPLAY=1G IDLE=60 bench/pagestore.sh
#
# Needs: fio (with the nbd engine), nbdinfo (libnbd-bin), python3, s3s-fs
# (cargo install s3s-fs@0.14.1 --features binary --locked). Nothing of a peer is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio nbdinfo python3 s3s-fs; do
  command -v "$tool" >/dev/null || {
    echo "bench needs $tool (apt-get install fio libnbd-bin; s3s-fs: see above)" >&2
    exit 1
  }
done
cargo build --release -q -p strata
exec python3 bench/pagestore.py "$PWD/target/release/strata"
