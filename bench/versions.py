#!/usr/bin/env python3
"""Versions of page-store images: what snapshots, clones and transactions cost, side by side
with the usual alternative, a qcow2 overlay on a backing file served by qemu-nbd.

Run through bench/versions.sh, which builds Strata first. On one image of SIZE written full:

  1. snapshot, then clone: wall time of each CLI call (median of ROUNDS); for qcow2,
     `qemu-img create -b` of an overlay (its snapshot is the backing file: a full copy, timed
     too: `cp` of the base)
  2. WRITES distinct 4k pages written at random, qd32, on a fresh clone / overlay (the same
     pages on both): IOPS (first writes: the copy-on-write case), then bytes stored per page
     written (clone: its objects in the store after a checkpoint; overlay: its file)
  3. 4k random writes, qd32, on the image with no transaction open, then with one open on
     another connection (the undo log's cost): IOPS and ratio
  4. 16-page transactions committed per second (raw NBD, one connection), next to the same
     16 pages written plainly and flushed

Environment: SIZE (1G), RUNTIME (15), ROUNDS (5), WRITES (50000), KEEP=1 keeps the work
directory.
"""

import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

STRATA = sys.argv[1]
RUNTIME = int(os.environ.get("RUNTIME", "15"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
WRITES = int(os.environ.get("WRITES", "50000"))
SAME_PAGES = (f"--number_ios={WRITES}", "--randrepeat=1", "--randseed=42")
SIZE_TEXT = os.environ.get("SIZE", "1G")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
SIZE = int(SIZE_TEXT[:-1]) * UNITS[SIZE_TEXT[-1].upper()] if SIZE_TEXT[-1].isalpha() else int(SIZE_TEXT)
WORK = tempfile.mkdtemp(prefix="strata-bench-versions.", dir="/var/tmp")
PAGE = 4096
SPAWNED = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def fio(uri, extra=("--time_based", f"--runtime={RUNTIME}")):
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--iodepth=32", "--output-format=json", *extra],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]


def timed(cmd):
    t = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - t


# --- a raw NBD client for the transaction rows -------------------------------------------

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def connect(port, export):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if kind == 1:
            return s
        if kind & (1 << 31):
            sys.exit("export refused")


def request(s, command, offset=0, data=b""):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, command, 1, offset, len(data)) + data)
    _, error, _ = struct.unpack(">IIQ", recv_exact(s, 16))
    return error


def rate(port, txn):
    s = connect(port, "vm")
    n, end = 0, time.monotonic() + RUNTIME
    page = b"x" * PAGE
    while time.monotonic() < end:
        if txn:
            request(s, 64)
        for p in range(16):
            assert request(s, 1, (n * 16 + p) % (SIZE // PAGE) * PAGE, page) == 0
        assert request(s, 65 if txn else 3) == 0
        n += 1
    s.close()
    return n / RUNTIME


def main():
    try:
        run()
    finally:
        for p in SPAWNED:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(WORK, ignore_errors=True)


def run():
    port = free_port()
    conf = os.path.join(WORK, "strata.toml")
    with open(conf, "w") as f:
        f.write(f'data_dir = "{WORK}/data"\n[nbd]\nlisten = ["127.0.0.1:{port}"]\n'
                f'[[volume]]\nname = "vm"\nuri = "image://local/vm?size={SIZE}"\n')
    server = subprocess.Popen([STRATA, "serve", "-c", conf], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(WORK, "strata.log"), "w"))
    SPAWNED.append(server)
    wait_port(port)
    cli = [STRATA, "--endpoint", f"unix://{WORK}/data/api.sock"]
    uri = f"nbd://127.0.0.1:{port}"
    subprocess.run(["nbdcopy", "--", "[", "nbdkit", "random", str(SIZE), "]",
                    f"{uri}/vm"], check=True)

    # qcow2 peer: the base as a raw file, overlays on it.
    base = os.path.join(WORK, "base.raw")
    subprocess.run(["nbdcopy", f"{uri}/vm", base], check=True)

    snap_t, clone_t, cp_t, overlay_t = [], [], [], []
    for i in range(ROUNDS):
        snap_t.append(timed(cli + ["snapshot", "create", "vm", f"s{i}"]))
        clone_t.append(timed(cli + ["clone", f"vm@s{i}", f"c{i}"]))
        cp_t.append(timed(["cp", "--sparse=never", base, os.path.join(WORK, f"copy{i}.raw")]))
        os.remove(os.path.join(WORK, f"copy{i}.raw"))
        overlay_t.append(timed(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                                base, os.path.join(WORK, f"o{i}.qcow2")]))
    med = lambda xs: statistics.median(xs) * 1000
    print(f"snapshot: strata {med(snap_t):.1f} ms | full copy (cp) {med(cp_t):.1f} ms")
    print(f"clone:    strata {med(clone_t):.1f} ms | qcow2 overlay {med(overlay_t):.1f} ms")

    # First writes on a clone vs on a qcow2 overlay (qemu-nbd, writeback cache like Strata's).
    clone_iops = fio(f"{uri}/local/c0", SAME_PAGES)
    qport = free_port()
    qnbd = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-p", str(qport), "-b", "127.0.0.1",
                             "-x", "o", "--cache=writeback", "--aio=threads", "-t",
                             os.path.join(WORK, "o0.qcow2")])
    SPAWNED.append(qnbd)
    wait_port(qport)
    overlay_iops = fio(f"nbd://127.0.0.1:{qport}/o", SAME_PAGES)
    qnbd.send_signal(signal.SIGTERM)
    qnbd.wait()
    print(f"4k randwrite qd32 on a new clone: strata {clone_iops:.0f} IOPS | qcow2 overlay "
          f"{overlay_iops:.0f} IOPS | ratio {clone_iops / overlay_iops:.2f}x")
    # Space per page written (the same WRITES distinct pages on both).
    subprocess.run(cli + ["snapshot", "create", "local/c0", "settle"], check=True,
                   capture_output=True)
    written = segment_pages(f"{WORK}/data/objects/images/c0")
    stored = dir_bytes(f"{WORK}/data/objects/images/c0")
    overlay_stored = os.stat(os.path.join(WORK, "o0.qcow2")).st_blocks * 512
    print(f"bytes stored per 4k page written: strata clone {stored / written:.0f} "
          f"({written} pages) | qcow2 overlay {overlay_stored / written:.0f} | ratio "
          f"{overlay_stored / stored:.1f}x")

    # The undo log's cost to plain writes while a transaction is open elsewhere.
    plain = fio(f"{uri}/vm")
    holder = connect(port, "vm")
    assert request(holder, 64) == 0
    with_txn = fio(f"{uri}/vm")
    request(holder, 66)
    holder.close()
    print(f"4k randwrite qd32 on the image: no transaction {plain:.0f} IOPS | one open "
          f"{with_txn:.0f} IOPS | ratio {with_txn / plain:.2f}x")

    tx = rate(port, True)
    fl = rate(port, False)
    print(f"16-page units per second: transactions {tx:.0f} | writes + FLUSH {fl:.0f} | "
          f"ratio {tx / fl:.2f}x")


def dir_bytes(d):
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def segment_pages(d):
    """Distinct pages in a clone's segments, from their indexes (footer: entry count)."""
    pages = set()
    for root, _, files in os.walk(d):
        for f in files:
            if not f.endswith(".seg"):
                continue
            data = open(os.path.join(root, f), "rb").read()
            footer = data[-40:]
            count, index_offset = struct.unpack("<QQ", footer[16:32])
            for i in range(count):
                page, = struct.unpack_from("<Q", data, index_offset + 16 * i)
                pages.add(page)
    return len(pages)


if __name__ == "__main__":
    main()
