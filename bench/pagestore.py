#!/usr/bin/env python3
"""Page-store images on a real S3 server, through NBD, side by side with a peer.

Run through bench/pagestore.sh, which builds Strata first. One s3s-fs server (loopback, bucket
`bench`) holds every server's images under its own prefix; each server gets the same fio jobs
(nbd engine) in the same order:

  1. 1M sequential write, qd8, over SIZE               (MiB/s)
  2. 4k random write, qd32, RUNTIME seconds            (IOPS)
  3. the same with an fsync every 32 writes            (IOPS)
     -> wait until everything is checkpointed: PUT requests per GiB written (rows 1-3)
  4. IDLE seconds without I/O: object-store requests per minute (target 0)
  5. restart (empty cache); 4k random read, qd32       (IOPS, cold; GETs per GiB read)
  6. restart; 1M sequential read, qd8, over SIZE       (MiB/s, cold; GETs per GiB read)
  7. 4k random read, qd32, everything cached           (IOPS, warm)
  8. the objects the server made: count and sizes
  9. restart; RSS_WRITE of 4k random writes, qd32, over an image twice that size; after the
     checkpoint: resident memory (VmRSS) and its peak (VmHWM)
 10. REPLAY of 1M writes to a fresh image with checkpoints off, fsync, kill -9; restart and
     time until the export answers (nbdinfo): write-buffer replay

Requests are counted from the S3 server's own request log, the same way for every server.
The peer is the MVPS transaction engine when MVPS_TE names its binary (export names are JWTs
signed here with MVPS_TE_JWT_SECRET). It refuses NBD FLUSH, so its jobs run without fsync and
the fsync row is not run for it. Ratios are Strata / peer (peer / Strata for times and
memory). Target: >= 2x the peer's IOPS and MiB/s on every row.

Environment: RUNTIME (20), SIZE (1G), RSS_WRITE (4G), REPLAY (1G), IDLE (60), RAMP (2),
MVPS_TE (unset: Strata alone), KEEP=1 keeps the work directory.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

STRATA = sys.argv[1]
RUNTIME = int(os.environ.get("RUNTIME", "20"))
RAMP = int(os.environ.get("RAMP", "2"))
IDLE = int(os.environ.get("IDLE", "60"))
PEER = os.environ.get("MVPS_TE")


def size_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


SIZE = size_bytes(os.environ.get("SIZE", "1G"))
RSS_WRITE = size_bytes(os.environ.get("RSS_WRITE", "4G"))
REPLAY = size_bytes(os.environ.get("REPLAY", "1G"))
CACHE = 2 * SIZE  # both servers may cache everything the warm read touches
BUCKET = "bench"
ACCESS, SECRET = "strata-bench", "strata-bench-secret"
WORK = tempfile.mkdtemp(prefix="strata-bench-pagestore.", dir="/var/tmp")


SPAWNED = []  # every server started, killed at exit whatever happens


def spawn(*args, **kwargs):
    p = subprocess.Popen(*args, **kwargs)
    SPAWNED.append(p)
    return p


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def gib(n):
    return n / (1 << 30)


class S3:
    """s3s-fs with a request log: every request's method and URI."""

    REQ = re.compile(r"req: Request \{ method: (\w+), uri: (\S+),")

    def __init__(self):
        self.root = os.path.join(WORK, "s3")
        os.makedirs(os.path.join(self.root, BUCKET))
        self.port = free_port()
        self.log_path = os.path.join(WORK, "s3s-fs.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["RUST_LOG"] = "warn,s3s::service=debug"
        self.proc = spawn(
            ["s3s-fs", "--host", "127.0.0.1", "--port", str(self.port),
             "--access-key", ACCESS, "--secret-key", SECRET, self.root],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env)
        wait_for("s3s-fs", lambda: port_open(self.port))
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def requests(self, prefix):
        """Requests so far for objects under `prefix`, by method."""
        counts = {}
        with open(self.log_path, errors="replace") as f:
            for line in f:
                m = self.REQ.search(line)
                if not m:
                    continue
                method, uri = m.groups()
                if uri.startswith(f"/{BUCKET}/{prefix}/") or f"prefix={prefix}%2F" in uri \
                        or f"prefix={prefix}/" in uri:
                    counts[method] = counts.get(method, 0) + 1
        return counts

    def wait_quiet(self, prefix, seconds):
        """Until no request for `prefix` has come for `seconds`."""
        last, since = None, time.monotonic()
        while True:
            now = sum(self.requests(prefix).values())
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return
            time.sleep(0.5)

    def objects(self, prefix):
        sizes = []
        for dirpath, dirs, files in os.walk(os.path.join(self.root, BUCKET, prefix)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            sizes += [os.path.getsize(os.path.join(dirpath, f)) for f in files
                      if not f.startswith(".")]
        return sizes


class Strata:
    name = "strata"
    flush = True

    def __init__(self, s3, tag, pagestore):
        self.s3, self.prefix = s3, f"strata-{tag}"
        self.dir = os.path.join(WORK, self.prefix)
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "strata.toml")
        self.endpoint = "unix://" + os.path.join(self.dir, "data", "api.sock")
        settings = "\n".join(f"{k} = {json.dumps(v)}" for k, v in pagestore.items())
        with open(self.config, "w") as f:
            f.write(f"""data_dir = "{self.dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[[store]]
name = "s3"
type = "s3"
endpoint = "{s3.endpoint}"
region = "us-east-1"
bucket = "{BUCKET}"
prefix = "{self.prefix}"
access_key_id = "{ACCESS}"
secret_access_key = "{SECRET}"
[pagestore]
{settings}
""")
        self.volumes = []
        self.proc = None

    def volume(self, name, size):
        with open(self.config, "a") as f:
            f.write(f'[[volume]]\nname = "{name}"\nuri = "image://s3/{name}?size={size}"\n')

    def command(self):
        return [STRATA, "serve", "-c", self.config]

    def start(self):
        out = os.path.join(self.dir, "strata.out")
        self.proc = spawn(
            self.command(), stdout=open(out, "w"),
            stderr=open(os.path.join(self.dir, "strata.log"), "a"))

        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"strata exited; see {self.dir}/strata.log")
            return "ready\n" in open(out).read()
        wait_for("strata to be ready", ready)
        addr = re.search(r"^listening: nbd://(\S+)$", open(out).read(), re.M).group(1)
        self.addr = addr

    def uri(self, volume, _size):
        return f"nbd://{self.addr}/{volume}"

    def status(self):
        out = subprocess.run([STRATA, "--endpoint", self.endpoint, "status", "--json"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def wait_checkpointed(self):
        def done():
            return all(v["image"]["buffered_bytes"] == 0 for v in self.status() if v["image"])
        wait_for("the checkpoints", done, timeout=3600)
        self.s3.wait_quiet(self.prefix, 3)

    def kill(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait()

    def pid(self):
        return self.proc.pid


class Mvps:
    name = "mvps-te"
    flush = False  # NBD_CMD_FLUSH is refused (EINVAL): there is no durability point

    def __init__(self, s3, tag, cache, checkpoint_ms):
        self.s3, self.prefix = s3, f"mvps-{tag}"
        self.dir = os.path.join(WORK, self.prefix)
        os.makedirs(os.path.join(self.dir, "buffer"))
        self.secret = "strata-bench-jwt"
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update({
            "MVPS_TE_JWT_SECRET": self.secret,
            "AWS_ACCESS_KEY_ID": ACCESS,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1",
            "S3_ENDPOINT": s3.endpoint,
            "MVPS_TE_CHECKPOINT_INTERVAL_MS": str(checkpoint_ms),
            "MVPS_TE_CHECKPOINT_INTERVAL_JITTER_MS": "1000",
            "MVPS_TE_IMAGE_CACHE_SIZE_BYTES": str(cache),
            "RUST_LOG": "info",
        })
        self.checkpoint_ms = checkpoint_ms
        self.proc = None

    def volume(self, name, size):
        pass  # images are named by the export's JWT

    def command(self):
        return [PEER, "--listen", f"127.0.0.1:{self.port}", "--image-store", "s3",
                "--image-store-s3-bucket", BUCKET, "--image-store-s3-prefix", self.prefix + "/",
                "--buffer-store-path", os.path.join(self.dir, "buffer")]

    def start(self):
        self.proc = spawn(
            self.command(), env=self.env, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "mvps-te.log"), "a"))

        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"mvps-te exited; see {self.dir}/mvps-te.log")
            return port_open(self.port)
        wait_for("mvps-te to listen", ready)

    def uri(self, volume, size):
        def b64(b):
            return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64(json.dumps({
            "image_id": f"{volume}.mvps-image", "image_size": size, "page_size_bits": 12,
            "exp": int(time.time()) + 86400 * 30,
            "client_id": str(uuid.uuid5(uuid.NAMESPACE_URL, volume)),
        }).encode())
        sig = hmac.new(self.secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
        return f"nbd://127.0.0.1:{self.port}/{header}.{payload}.{b64(sig.digest())}"

    def wait_checkpointed(self):
        # No status to ask: wait until its requests stop for two checkpoint intervals.
        self.s3.wait_quiet(self.prefix, 2 * (self.checkpoint_ms + 1000) / 1000)

    def kill(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait()

    def pid(self):
        return self.proc.pid


def fio(name, uri, *args):
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
           *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / (1 << 20),
            "bytes": side["io_bytes"], "cmd": " ".join(cmd)}


def rand(rw, depth=32, extra=()):
    return [f"--rw={rw}", "--bs=4k", f"--iodepth={depth}", f"--size={SIZE}", "--time_based",
            f"--runtime={RUNTIME}", f"--ramp_time={RAMP}", "--randrepeat=0", *extra]


def seq(rw, size):
    return [f"--rw={rw}", "--bs=1M", "--iodepth=8", f"--size={size}"]


def memory(pid):
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            fields[k] = int(v.split()[0]) * 1024
    return fields


def run(server_factory, s3):
    r, cmds = {}, {}
    srv = server_factory("main", CACHE)
    srv.volume("bench", SIZE)
    srv.volume("rss", 2 * RSS_WRITE)
    srv.start()
    uri = srv.uri("bench", SIZE)
    before = s3.requests(srv.prefix)
    written = 0
    log(f"{srv.name}: 1M sequential write")
    sync = ["--end_fsync=1"] if srv.flush else []
    x = fio("seqwrite", uri, *seq("write", SIZE), *sync)
    r["seqwrite"], cmds["seqwrite"] = x["mibs"], x["cmd"]
    written += x["bytes"]
    for row, extra in (("randwrite", ()), ("randwrite-fsync", ("--fsync=32",))):
        if extra and not srv.flush:
            r[row] = None
            continue
        log(f"{srv.name}: {row}")
        x = fio(row, uri, *rand("randwrite", extra=extra))
        r[row], cmds[row] = x["iops"], x["cmd"]
        written += x["bytes"] / RUNTIME * (RUNTIME + RAMP)  # the ramp wrote too
    log(f"{srv.name}: waiting for checkpoints")
    srv.wait_checkpointed()
    after = s3.requests(srv.prefix)
    r["put_per_gib"] = (after.get("PUT", 0) - before.get("PUT", 0)) / gib(written)
    log(f"{srv.name}: idle {IDLE} s")
    idle0 = sum(after.values())
    time.sleep(IDLE)
    r["idle_per_min"] = (sum(s3.requests(srv.prefix).values()) - idle0) * 60 / IDLE

    srv.kill()
    srv.start()
    uri = srv.uri("bench", SIZE)
    log(f"{srv.name}: randread cold")
    g0 = s3.requests(srv.prefix).get("GET", 0)
    x = fio("randread-cold", uri, *rand("randread"))
    r["randread-cold"], cmds["randread-cold"] = x["iops"], x["cmd"]
    read = x["bytes"] / RUNTIME * (RUNTIME + RAMP)
    r["get_per_gib_rand"] = (s3.requests(srv.prefix).get("GET", 0) - g0) / gib(read)
    srv.kill()
    srv.start()
    uri = srv.uri("bench", SIZE)
    log(f"{srv.name}: 1M sequential read cold")
    g0 = s3.requests(srv.prefix).get("GET", 0)
    x = fio("seqread", uri, *seq("read", SIZE))
    r["seqread"], cmds["seqread"] = x["mibs"], x["cmd"]
    r["get_per_gib_seq"] = (s3.requests(srv.prefix).get("GET", 0) - g0) / gib(x["bytes"])
    log(f"{srv.name}: randread warm")
    x = fio("randread-warm", uri, *rand("randread"))
    r["randread-warm"], cmds["randread-warm"] = x["iops"], x["cmd"]
    sizes = s3.objects(srv.prefix)
    r["objects"] = (len(sizes), sum(sizes), statistics.median(sizes) if sizes else 0,
                    max(sizes, default=0))

    srv.kill()
    srv.start()
    log(f"{srv.name}: {RSS_WRITE >> 20} MiB of 4k random writes")
    x = fio("rss", srv.uri("rss", 2 * RSS_WRITE), "--rw=randwrite", "--bs=4k", "--iodepth=32",
            f"--size={2 * RSS_WRITE}", f"--io_size={RSS_WRITE}", "--randrepeat=0")
    r["rss-write"], cmds["rss"] = x["iops"], x["cmd"]
    srv.wait_checkpointed()
    r["memory"] = memory(srv.pid())
    srv.kill()

    srv = server_factory("replay", 64 << 20)
    srv.volume("replay", REPLAY)
    srv.start()
    log(f"{srv.name}: {REPLAY >> 20} MiB into the write buffer, then kill -9")
    fio("replay", srv.uri("replay", REPLAY), *seq("write", REPLAY), *sync)
    srv.kill(signal.SIGKILL)
    t0 = time.monotonic()
    srv.start()
    probe = ["nbdinfo", "--size", srv.uri("replay", REPLAY)]
    wait_for("the replayed export",
             lambda: subprocess.run(probe, capture_output=True).returncode == 0, timeout=600)
    r["replay_s"] = time.monotonic() - t0
    srv.kill()
    return r, cmds, srv.command()


def strata_factory(s3):
    def make(tag, cache):
        ps = {"cache_bytes": str(cache)}
        if tag == "replay":
            ps.update(checkpoint_bytes="8G", checkpoint_secs=86400, max_buffered_bytes="8G")
        else:
            ps.update(checkpoint_secs=5)
        return Strata(s3, tag, ps)
    return make


def mvps_factory(s3):
    def make(tag, cache):
        return Mvps(s3, tag, cache, 86400000 if tag == "replay" else 5000)
    return make


ROWS = [
    ("seqwrite", "1M sequential write, qd8 (MiB/s)", True),
    ("randwrite", "4k random write, qd32 (IOPS)", True),
    ("randwrite-fsync", "4k random write, qd32, fsync every 32 (IOPS)", True),
    ("randread-cold", "4k random read, qd32, cold cache (IOPS)", True),
    ("seqread", "1M sequential read, qd8, cold cache (MiB/s)", True),
    ("randread-warm", "4k random read, qd32, warm cache (IOPS)", True),
    ("rss-write", f"4k random write, qd32, {RSS_WRITE >> 30} GiB (IOPS)", True),
]


def main():
    s3 = S3()
    results = {}
    try:
        results["strata"] = run(strata_factory(s3), s3)
        if PEER:
            results["peer"] = run(mvps_factory(s3), s3)
    finally:
        for p in SPAWNED:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            log(f"kept {WORK}")
    st, cmds, command = results["strata"]
    print(f"s3s-fs 0.14.1 on loopback; image {SIZE >> 20} MiB, {RUNTIME} s per timed job "
          f"(+{RAMP} s ramp); caches {CACHE >> 20} MiB")
    print(f"strata: {' '.join(command)}")
    if PEER:
        print(f"peer: {' '.join(results['peer'][2])}")
    for k, c in cmds.items():
        print(f"  {k}: {c}")
    print()
    pe = results.get("peer", (None,))[0]
    print("| row | Strata | " + ("mvps-te | Strata/mvps-te | target |" if pe else ""))
    print("|---|---|" + ("---|---|---|" if pe else ""))
    failed = []
    for key, label, better_high in ROWS:
        line = f"| {label} | {st[key]:,.0f} |"
        if pe and pe[key] is None:
            line += " no FLUSH | | |"
        elif pe:
            ratio = st[key] / max(pe[key], 1e-9) if better_high else pe[key] / st[key]
            ok = ratio >= 2
            if not ok:
                failed.append(key)
            line += f" {pe[key]:,.0f} | {ratio:.2f}x | {'pass' if ok else 'FAIL'} (≥ 2x) |"
        print(line)

    def other(label, fmt, key):
        line = f"| {label} | {fmt(st[key])} |"
        if pe:
            line += f" {fmt(pe[key])} | | |"
        print(line)
    other("PUT requests per GiB written (rows 1-3, after checkpoints)", "{:,.1f}".format,
          "put_per_gib")
    other("GET requests per GiB read, 4k random cold", "{:,.0f}".format, "get_per_gib_rand")
    other("GET requests per GiB read, 1M sequential cold", "{:,.1f}".format, "get_per_gib_seq")
    other("object-store requests per minute, idle", "{:.1f}".format, "idle_per_min")
    other("objects after rows 1-7: count, total MiB, median and largest KiB",
          lambda o: f"{o[0]}, {o[1] / (1 << 20):,.0f}, {o[2] / 1024:,.0f}, {o[3] / 1024:,.0f}",
          "objects")
    other(f"resident memory after {RSS_WRITE >> 30} GiB of 4k random writes (MiB; peak)",
          lambda m: f"{m['VmRSS'] / (1 << 20):,.0f}; {m['VmHWM'] / (1 << 20):,.0f}", "memory")
    other(f"write-buffer replay of {REPLAY >> 20} MiB: start to serving (s)", "{:.2f}".format,
          "replay_s")
    print()
    if pe:
        print("result: " + ("FAIL (" + ", ".join(failed) + ")" if failed else "pass"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
