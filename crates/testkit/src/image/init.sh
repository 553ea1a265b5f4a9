#!/bin/sh
# PID 1 of the Strata test VM (busybox sh). Mounts the pseudo filesystems, loads the kernel
# modules listed in /etc/strata/modules, sets up the network as qemu's user-mode network
# expects (10.0.2.15/24, gateway 10.0.2.2 = the host's 127.0.0.1), then serves commands from
# the serial console: see console.rs for the protocol.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
export HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /root
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
# Only emergencies on the console from now on: it carries the command protocol.
dmesg -n 1
hostname strata-vm

kver=$(uname -r)
while read -r module params; do
  [ -n "$module" ] || continue
  insmod "/lib/modules/$kver/$module" $params || echo "@@MODFAIL $module"
done </etc/strata/modules

mount -t configfs configfs /sys/kernel/config || echo "@@SETUPFAIL configfs"
ip link set lo up || echo "@@SETUPFAIL loopback"
{ ip link set eth0 up &&
  ip addr add 10.0.2.15/24 dev eth0 &&
  ip route add default via 10.0.2.2; } || echo "@@SETUPFAIL network"
mkdir -p /etc/nvme
{ nvme gen-hostnqn >/etc/nvme/hostnqn &&
  cat /proc/sys/kernel/random/uuid >/etc/nvme/hostid; } || echo "@@SETUPFAIL nvme host identity"

mkdir -p /run/strata
stty -echo -onlcr || echo "@@SETUPFAIL stty"
echo "@@STRATA READY"

set -f
while IFS= read -r line; do
  set -- $line
  case "$1" in
  @@PART)
    printf '%s' "$3" >>"/run/strata/$2.b64"
    ;;
  @@RUN)
    base64 -d "/run/strata/$2.b64" >"/run/strata/$2.sh"
    rm -f "/run/strata/$2.b64"
    printf '@@BEGIN %s\n' "$2"
    (cd /root && sh "/run/strata/$2.sh" </dev/null 2>&1)
    status=$?
    printf '\n@@END %s %s\n' "$2" "$status"
    rm -f "/run/strata/$2.sh"
    ;;
  @@POWEROFF)
    sync
    poweroff -f
    ;;
  esac
done
sync
poweroff -f
