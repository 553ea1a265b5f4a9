#!/usr/bin/env bash
# Run every Strata test. On a fresh Debian machine this first installs the programs the tests
# drive (qemu-utils, libnbd-bin, nbdkit, fio, fuse3, e2fsprogs, openssl, systemd, etcd-server, tgt,
# and the S3 server s3s-fs through cargo), then builds once and runs the whole suite.
#
# Tests of the kernel's own clients (nbd-client, NVMe/TCP, virtio-blk over vhost-user) boot a
# VM through crates/testkit: qemu-system-x86 (below) and xz-utils here. The guest itself is
# built on first use from Debian packages fetched with `apt-get download` (the kernel that
# linux-image-amd64 names, busybox-static, nbd-client, nvme-cli, e2fsprogs, util-linux,
# coreutils and their libraries), cached in target/vm-cache/.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p strata  # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# program -> Debian package that provides it
required=(
  nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin
  nbdkit:nbdkit fio:fio fusermount3:fuse3
  mkfs.ext4:e2fsprogs e2fsck:e2fsprogs losetup:mount
  openssl:openssl systemd-socket-activate:systemd timeout:coreutils
  etcd:etcd-server
  xz:xz-utils
  tgtd:tgt tgtadm:tgt
)
missing=()
for pair in "${required[@]}"; do
  prog=${pair%%:*} pkg=${pair#*:}
  if ! PATH="/usr/sbin:/sbin:$PATH" command -v "$prog" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing test tools: ${missing[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# qemu 10.0 from bookworm-backports: Debian 12's own qemu (7.2) is older than what the tests are
# written against. The suite is added to APT's sources when it is missing.
qemu_version() { qemu-img --version 2>/dev/null | sed -n 's/^qemu-img version \([0-9]*\).*/\1/p'; }
if [ "$(qemu_version)" = "" ] || [ "$(qemu_version)" -lt 10 ] || ! command -v qemu-system-x86_64 >/dev/null; then
  echo "installing test tools: qemu-utils, qemu-system-x86 (10.0, bookworm-backports)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' |
      $sudo tee /etc/apt/sources.list.d/strata-backports.list >/dev/null
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-utils qemu-system-x86
fi

# The page-store tests run an S3 server: s3s-fs, a small one that keeps objects in a directory.
# `cargo install` puts it in ~/.cargo/bin, which the tests find on PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "installing test tools: s3s-fs"
  cargo install s3s-fs@0.14.1 --features binary --locked
fi

# The CSI driver's conformance test runs the kubernetes-csi project's csi-sanity, built with Go
# into the target directory's tools/bin (where the tests look for it).
tools="${CARGO_TARGET_DIR:-$PWD/target}/tools/bin"
if [ ! -x "$tools/csi-sanity" ]; then
  echo "installing test tools: csi-sanity v5.4.0"
  GOBIN="$tools" go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.4.0
fi

# The Kubernetes manifests are checked against the Kubernetes schemas (kubernetes-validate
# ships them, so no network is needed when the tests run).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing test tools: kubernetes-validate (Python)"
  python3 -m pip --version >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -qq --no-install-recommends python3-pip
  python3 -m pip install -q kubernetes-validate==1.37.0 ||
    python3 -m pip install -q --break-system-packages kubernetes-validate==1.37.0
fi

# The metrics test checks the exposition with the Prometheus project's own Python parser.
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
  echo "installing test tools: prometheus-client (Python)"
  python3 -m pip install -q prometheus-client ||
    DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -qq python3-prometheus-client
fi

# The filesystem test needs FUSE and loop devices, which need root.
if [ "$(id -u)" != 0 ]; then
  echo "warning: not root; the ext4-through-nbdfuse test needs root for losetup and mount" >&2
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

# One build, shared by every test binary: the `ci` profile is optimized (the tests push
# hundreds of MiB through the server) and keeps overflow checks and debug assertions in
# Strata's own crates. Examples are built too: tests run them. Every test binary runs even when
# one fails (--no-fail-fast), so one failure never hides another.
cargo test --profile ci --workspace --no-run
exec cargo test --profile ci --workspace --no-fail-fast "$@"
