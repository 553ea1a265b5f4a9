#!/usr/bin/env python3
"""What the control plane costs.

1. The data path: every volume now sits behind a StatsDevice (request, byte and error counters,
   latency histograms) for the API's node stats and /metrics. fio (nbd engine, 4 KiB random
   I/O at queue depth 32, on a memory volume) runs against this build and against a baseline
   build without the accounting (STRATA_BASELINE: a `strata` binary built from an earlier
   commit), alternating which goes first each round; prints median IOPS and the ratio.
2. The control plane: time to apply a spec of N volumes and to re-apply it (a no-op), a
   `strata volume list`, and a /metrics scrape with N volumes (median of many; the exposition's
   size too).

    STRATA_BASELINE=/path/to/old/strata bench/control.py
    ROUNDS=5 RUNTIME=10 VOLUMES=100 bench/control.py

Needs: fio (with the nbd engine), python3. Results go in docs/BENCHMARKS.md by hand.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
BASELINE = os.environ.get("STRATA_BASELINE")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "10"))
VOLUMES = int(os.environ.get("VOLUMES", "100"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, binary, work, volumes_toml="", new=True):
        self.work = work
        self.port = free_port()
        self.metrics = free_port()
        conf = os.path.join(work, "strata.toml")
        with open(conf, "w") as f:
            f.write(f'data_dir = "{work}/data"\n[nbd]\nlisten = ["127.0.0.1:{self.port}"]\n')
            if new:
                f.write(f'[api]\nlisten = []\n[metrics]\nlisten = ["127.0.0.1:{self.metrics}"]\n')
            f.write(volumes_toml)
        self.proc = subprocess.Popen([binary, "serve", "-c", conf], stdout=subprocess.PIPE,
                                     stderr=open(os.path.join(work, "strata.log"), "w"), text=True)
        for line in self.proc.stdout:
            if line.strip() == "ready":
                break
        else:
            sys.exit(f"{binary} did not start; see {work}/strata.log")
        self.endpoint = f"unix://{work}/data/api.sock"

    def cli(self, *args):
        return subprocess.run([STRATA, "--endpoint", self.endpoint, *args], check=True,
                              capture_output=True, text=True).stdout

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def fio(uri, rw):
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         "--iodepth=32", "--size=1G", "--time_based", f"--runtime={RUNTIME}", "--ramp_time=2",
         "--output-format=json"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]  # fio may print notes first
    return job["read" if "read" in rw else "write"]["iops"]


def data_path():
    if not BASELINE:
        print("data path: skipped (set STRATA_BASELINE to a strata binary without accounting)")
        return
    vol = '[[volume]]\nname = "m"\nuri = "mem://m?size=1G"\n'
    results = {}
    for rw in ("randwrite", "randread"):
        ratios, new_iops, old_iops = [], [], []
        for r in range(ROUNDS):
            order = [("new", STRATA), ("old", BASELINE)]
            if r % 2:
                order.reverse()
            got = {}
            for name, binary in order:
                work = tempfile.mkdtemp(prefix="strata-bench-control.", dir="/var/tmp")
                d = Daemon(binary, work, vol, new=(name == "new"))
                try:
                    # Fill first so reads hit data, not holes.
                    if rw == "randread":
                        subprocess.run(["fio", "--name=fill", "--ioengine=nbd",
                                        f"--uri=nbd://127.0.0.1:{d.port}/m", "--rw=write",
                                        "--bs=1M", "--iodepth=4", "--size=1G"],
                                       check=True, capture_output=True)
                    got[name] = fio(f"nbd://127.0.0.1:{d.port}/m", rw)
                finally:
                    d.stop()
                    shutil.rmtree(work, ignore_errors=True)
            new_iops.append(got["new"])
            old_iops.append(got["old"])
            ratios.append(got["new"] / got["old"])
        results[rw] = (statistics.median(new_iops), statistics.median(old_iops),
                       statistics.median(ratios))
    print(f"{'job':<12} {'with stats':>12} {'baseline':>12} {'ratio':>7}")
    for rw, (n, o, ratio) in results.items():
        print(f"{rw:<12} {n:>12,.0f} {o:>12,.0f} {ratio:>7.3f}")


def control_plane():
    work = tempfile.mkdtemp(prefix="strata-bench-control.", dir="/var/tmp")
    d = Daemon(STRATA, work)
    try:
        spec = os.path.join(work, "spec.yaml")
        with open(spec, "w") as f:
            f.write("volumes:\n")
            for i in range(VOLUMES):
                f.write(f"  - name: v{i}\n    device: mem://v{i}\n    size: 16M\n")
        t = time.perf_counter()
        d.cli("apply", "-f", spec)
        apply_s = time.perf_counter() - t
        t = time.perf_counter()
        out = d.cli("apply", "-f", spec)
        reapply_s = time.perf_counter() - t
        assert "no changes" in out, out
        lists = []
        for _ in range(20):
            t = time.perf_counter()
            d.cli("volume", "list")
            lists.append(time.perf_counter() - t)
        scrapes, size = [], 0
        for _ in range(50):
            t = time.perf_counter()
            body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics}/metrics").read()
            scrapes.append(time.perf_counter() - t)
            size = len(body)
        print(f"apply {VOLUMES} volumes: {apply_s * 1000:.0f} ms; re-apply (no-op): "
              f"{reapply_s * 1000:.0f} ms")
        print(f"strata volume list ({VOLUMES} volumes, CLI process included): "
              f"{statistics.median(lists) * 1000:.1f} ms median")
        print(f"/metrics with {VOLUMES} volumes: {statistics.median(scrapes) * 1000:.1f} ms "
              f"median, {size / 1024:.0f} KiB")
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "strata"], cwd=ROOT, check=True)
    data_path()
    control_plane()
