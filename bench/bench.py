#!/usr/bin/env python3
"""sandboxd benchmark: the machine's floor and the daemon on the same workloads, in one run.

    python3 bench/bench.py --daemon build/sandboxd            # full run, a few minutes
    python3 bench/bench.py --daemon build/sandboxd --quick    # smoke run, about 30 s
    make bench [BENCH_ARGS="--quick"]                         # builds daemon + tools, runs this

It starts the daemon itself (`--listen 127.0.0.1:0 --state-dir <temp dir>`), measures:
  floor       posix_spawn+wait of /bin/true, bare spawns/s with 2 workers, the stream
              producers' own rate, the HTTP client's own floor against bin/floorsrv
  latency     sequential POST /api/v1/processes/run of /bin/true on one keep-alive
              connection: p50/p90/p99, daemon CPU per run (/proc)
  throughput  completed runs/s with 8 and 32 connections
  stream      256 MiB of stdout (100-byte and 64 KiB lines) through the run SSE and through
              output/follow, every byte checked: MB/s, time to first byte, peak RSS
  memory      idle RSS, RSS with 200 `sleep` processes, after they ended; binary size
and writes bench/results/latest.json, latest.md and plot.svg, then prints the table with each
target, its ratio and PASS/MISS, next to the peer's published figures.

Only 127.0.0.1 is used.  Every loop is bounded in count and time.  Python 3 stdlib only.
"""
import argparse
import contextlib
import json
import math
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.join(HERE, "bin")
sys.path.insert(0, HERE)
from dialects import SandboxAgentDialect, Target, TensorlakeDialect, wait_exited  # noqa: E402

MIB = 1 << 20
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
PEER_JSON = os.path.join(SHARED, "results", "sandbox-agent-0.4.2.json")
PEER_MD = os.path.join(SHARED, "results", "sandbox-agent-0.4.2.md")
PEER_START = os.path.join(SHARED, "start_peer.sh")

PROFILES = {
    # reps: repetitions of every figure (median [min-max]); sizes as the issue asks
    "full": dict(reps=3, spawn_n=2000, spawnpar_s=3.0, client_n=2000, lat_n=2000, warmup=100,
                 tput_s=5.0, client_tput_s=2.0, stream_mib=256, sleepers=200, settle_s=2.0, tcp_mib=1024, idle_starts=5),
    # smoke run: same code paths, small sizes (targets are indicative only)
    "quick": dict(reps=2, spawn_n=300, spawnpar_s=1.0, client_n=500, lat_n=300, warmup=50,
                  tput_s=1.5, client_tput_s=1.0, stream_mib=16, sleepers=40, settle_s=0.5, tcp_mib=128, idle_starts=3),
}

# targets (from the issue)
T_RUN_P50 = 1.08        # run p50 <= 1.08 x (spawn p50 + client p50)
T_CPU_US = 40.0         # daemon CPU per sequential run
T_TPUT = 0.90           # runs/s at 8 conns >= 0.90 x bare spawns/s (2 workers)
T_STREAM = {"100B": 0.75, "64KiB": 0.85}   # x producer rate, run and follow
T_TTFB_MS = 5.0
T_IDLE_MIB = 2.0
T_PER_PROC_KIB = 8.0
T_PEAK_MIB = 16.0
T_BINARY_KIB = 512.0

SHAPES = {"100B": 100, "64KiB": 65536}
SHAPE_LABEL = {"100B": "100 B lines", "64KiB": "64 KiB lines"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def producer_script(shape, nbytes):
    """sh script writing exactly nbytes of ('a' * (L-1) + '\\n') lines; the line is a literal
    so the shell starts no extra subshell."""
    return f"yes {'a' * (SHAPES[shape] - 1)} | head -c {nbytes}"


def run_json(cmd, timeout):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} {cmd[1]} failed ({p.returncode}): {p.stderr.strip()[:400]}")
    if p.stderr.strip():
        log("    stderr:", p.stderr.strip()[:300])
    docs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if not docs:
        raise RuntimeError(f"{os.path.basename(cmd[0])} printed no result")
    return docs[0]


def summarize(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def med(s):
    return s["median"] if isinstance(s, dict) else s


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def read_samples(path, limit=100000):
    try:
        with open(path) as f:
            return [float(x) for x, _ in zip(f, range(limit)) if x.strip()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# /proc accounting of the daemon

class Proc:
    def __init__(self, pid):
        self.pid = pid
        self.hz = os.sysconf("SC_CLK_TCK")

    def alive(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def cpu(self):
        """-> (schedstat seconds summed over the threads or None, utime+stime seconds from ticks,
        reaped children's seconds).  schedstat has ns resolution; ticks are 10 ms."""
        sched = 0
        try:
            for t in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{t}/schedstat") as f:
                    sched += int(f.read().split()[0])
            sched_s = sched / 1e9
        except (OSError, ValueError, IndexError):
            sched_s = None
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        ut, st, cut, cst = (int(x) for x in rest[11:15])
        return sched_s, (ut + st) / self.hz, (cut + cst) / self.hz

    def status(self):
        d = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize"):
                    d[k + "_kib"] = int(v.split()[0])
                elif k == "Threads":
                    d["threads"] = int(v)
        try:
            d["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            d["fds"] = None
        d["children"] = self.children()
        return d

    def rss_kib(self):
        return self.status()["VmRSS_kib"]

    def children(self):
        kids = {"total": 0, "zombie": 0}
        for e in os.listdir("/proc"):
            if not e.isdigit():
                continue
            try:
                with open(f"/proc/{e}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(rest[1]) == self.pid:
                kids["total"] += 1
                kids["zombie"] += rest[0] == "Z"
        return kids

    def reset_peak(self):
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def system_cpu():
    """-> (busy seconds of all CPUs, wall seconds) from /proc/stat's first line: busy is every
    state but idle and iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / hz, time.monotonic()


class CpuDelta:
    def __init__(self, proc):
        self.proc = proc

    def __enter__(self):
        self.c0 = self.proc.cpu() if self.proc else None
        self.s0 = system_cpu()
        return self

    def __exit__(self, *exc):
        self.c1 = self.proc.cpu() if self.proc else None
        self.s1 = system_cpu()
        return False

    def cpus_busy(self):
        """How many CPUs the whole machine kept busy in between (everyone: daemon, children,
        client), from /proc/stat ticks."""
        dt = self.s1[1] - self.s0[1]
        return (self.s1[0] - self.s0[0]) / dt if dt > 0 else None

    def per(self, ops):
        """-> (daemon CPU µs per op [schedstat, else ticks], ticks-based µs per op, children µs per op)"""
        if not self.c0 or not ops:
            return None, None, None
        d_ticks = self.c1[1] - self.c0[1]
        d_sched = None if self.c0[0] is None or self.c1[0] is None else self.c1[0] - self.c0[0]
        # schedstat misses threads that exited in between; the tick count (10 ms) does not
        if d_sched is None or d_ticks - d_sched > 2.0 / self.proc.hz:
            d_sched = d_ticks
        return d_sched / ops * 1e6, d_ticks / ops * 1e6, (self.c1[2] - self.c0[2]) / ops * 1e6


# ---------------------------------------------------------------------------------------------
# the daemon under test

class Daemon:
    """Starts `DAEMON --listen 127.0.0.1:0 --state-dir TMP` and waits for `listening on H:P`."""

    def __init__(self, path, workdir, extra=()):
        self.path = os.path.abspath(path)
        self.state = tempfile.mkdtemp(prefix="state-", dir=workdir)
        self.logpath = os.path.join(workdir, "daemon.log")
        self.logf = open(self.logpath, "wb")
        self.p = subprocess.Popen([self.path, "--listen", "127.0.0.1:0", "--state-dir", self.state, *extra],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.logf)
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        buf, deadline, self.host, self.port = b"", time.time() + 15, None, None
        while time.time() < deadline and self.p.poll() is None:
            if not sel.select(timeout=0.2):
                continue
            chunk = os.read(self.p.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+)\s*\n", buf)
            if m:
                self.host, self.port = m.group(1).decode(), int(m.group(2))
                break
        sel.close()
        if self.port is None:
            self.stop()
            raise RuntimeError(f"daemon did not print 'listening on HOST:PORT' within 15 s "
                               f"(exit {self.p.returncode}); log: {self.tail_log()}")
        if self.host not in ("127.0.0.1", "localhost"):
            self.stop()
            raise RuntimeError(f"daemon listens on {self.host}, not loopback")
        # keep draining stdout so the daemon never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()
        self.proc = Proc(self.p.pid)

    def _drain(self):
        try:
            while self.p.stdout.read(65536):
                pass
        except (OSError, ValueError):
            pass

    def tail_log(self, n=600):
        try:
            with open(self.logpath, "rb") as f:
                return f.read()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.logf.close()
        shutil.rmtree(self.state, ignore_errors=True)
        return self.p.returncode


# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.a = args
        self.cfg = dict(PROFILES["quick" if args.quick else "full"])
        if args.reps:
            self.cfg["reps"] = args.reps
        if args.stream_mib:
            self.cfg["stream_mib"] = args.stream_mib
        self.tmp = tempfile.mkdtemp(prefix="sandboxd-bench-")
        self.samples = {}
        self.work = None  # the floor-of-work servers while sandboxd is measured (work_floor)
        self.res = {"meta": {
            "mode": "quick" if args.quick else "full", "config": self.cfg,
            "daemon": os.path.relpath(os.path.abspath(args.daemon), REPO) if args.daemon else None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "nproc": os.cpu_count(),
            "uname": " ".join(os.uname()), "loadavg_start": os.getloadavg(),
            "git": self._git(), "note": args.note,
        }}

    @staticmethod
    def _git():
        try:
            rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, timeout=5).stdout.strip()
            # the bench's own results and the docs do not change what is measured
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--",
                                    ".", ":!bench/results", ":!*.md"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            return None

    def path(self, name):
        return os.path.join(self.tmp, name)

    def reqfile(self, name, raw):
        p = self.path(name + ".http")
        with open(p, "wb") as f:
            f.write(raw)
        return p

    def paired_floor(self, cmd):
        """The floor of one workload measured again right before a daemon repetition (the VM's
        speed drifts within minutes: the producer alone ran at 370-1,036 MB/s in one run). None
        with --no-floor."""
        if self.a.no_floor:
            return None
        try:
            return run_json(cmd, timeout=300)
        except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
            log(f"  paired floor failed: {e}")
            return None

    @contextlib.contextmanager
    def work_floor(self):
        """The floors of the work itself, served while sandboxd is measured, so that each of its
        repetitions can be paired with the same work done by the least program that does it,
        measured right before (the VM's speed drifts within minutes, and the floor section runs
        minutes earlier): `floorsrv PORT` for the SSE relay keeping every byte in a file, and
        `floorsrv PORT spawn` for the HTTP run floor and the pre-fork reference. Not with
        --no-floor, nor if they do not start (the daemon is then measured unpaired)."""
        if self.a.no_floor:
            yield
            return
        srvs, ports = [], []
        try:
            for extra in ([], ["spawn"]):
                port = free_port()
                srvs.append(subprocess.Popen([os.path.join(BIN, "floorsrv"), str(port), *extra],
                                             stdin=subprocess.DEVNULL))
                ports.append(port)
            try:
                for port in ports:
                    self._wait_port(port, 5)
            except RuntimeError as e:  # the daemon is still measured, unpaired
                log(f"  floor-of-work servers did not start: {e}")
            else:
                t = TensorlakeDialect(Target("127.0.0.1", ports[1]))
                self.work = {"relay_port": ports[0], "spawn_port": ports[1], "t": Target("127.0.0.1", ports[0]),
                             "run_req": self.reqfile("work-run", t.run_request("/bin/true", []))}
            yield
        finally:
            self.work = None
            for srv in srvs:
                srv.terminate()
                srv.wait(10)

    def work_paired(self, what, measure):
        """measure() against a floor-of-work server (see work_floor), or None."""
        if self.work is None:
            return None
        try:
            return measure(self.work)
        except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
            log(f"  paired {what} failed: {e}")
            return None

    def httpload(self, mode, port, req, *opts, timeout=600):
        return run_json([os.path.join(BIN, "httpload"), mode, "--port", str(port), "--req", req,
                         *map(str, opts)], timeout=timeout)

    # -- 1. floor ---------------------------------------------------------------------------
    def floor(self):
        c, reps, pl = self.cfg, self.cfg["reps"], os.path.join(BIN, "physlimits")
        out = {}

        def rep(name, mk, keys):
            runs = []
            for i in range(reps):
                runs.append(run_json(mk(i), timeout=300))
            out[name] = {"runs": runs, **{k: summarize([r[k] for r in runs]) for k in keys}}
            log(f"  {name}: " + ", ".join(f"{k} {fmt_s(out[name][k], 4 if k.endswith('_s') else 0)}" for k in keys))

        def paired_runs(measure, shape):
            """reps runs of measure(), each right after a producer-alone run of its own (the VM's
            speed drifts): -> (runs, summary of the pairs' rate ratios)."""
            runs = []
            for _ in range(reps):
                pr = run_json([pl, "producer", str(nb), producer_script(shape, nb)], timeout=300)
                r = measure()
                r.pop("meta", None)
                r["paired_producer_mb_per_s"] = pr["mb_per_s"]
                runs.append(r)
            return runs, summarize([r["mb_per_s"] / r["paired_producer_mb_per_s"] for r in runs
                                    if r.get("complete", r.get("ok")) and r["paired_producer_mb_per_s"]])

        rep("spawn", lambda i: [pl, "spawn", str(c["spawn_n"]), self.path("spawn.samples")],
            ["p50_us", "p90_us", "p99_us", "parent_cpu_us", "children_cpu_us"])
        self.samples["spawn"] = read_samples(self.path("spawn.samples"))
        rep("spawn_pipes", lambda i: [pl, "spawnpipe", str(c["spawn_n"] // 2)],
            ["p50_us", "p99_us", "parent_cpu_us"])
        rep("spawnpar2", lambda i: [pl, "spawnpar", "2", str(c["spawnpar_s"])],
            ["per_s", "cpu_us_per_spawn", "cpus_busy"])
        rep("spawnpar2_pipes", lambda i: [pl, "spawnparpipe", "2", str(c["spawnpar_s"])],
            ["per_s", "cpu_us_per_spawn", "cpus_busy"])
        nb = c["stream_mib"] * MIB
        for shape in SHAPES:
            rep(f"producer_{shape}", lambda i, s=shape: [pl, "producer", str(nb), producer_script(s, nb)],
                ["mb_per_s", "ttfb_s"])
            bad = [r for r in out[f"producer_{shape}"]["runs"] if not r["ok"]]
            if bad:
                raise RuntimeError(f"producer {shape} wrote {bad[0]['bytes']} bytes, expected {nb}")
            # The least a streaming daemon does: relay the pipe to a TCP socket, nothing more.
            pairs, ratio = paired_runs(
                lambda s=shape: run_json([pl, "relay", str(nb), producer_script(s, nb)], timeout=300), shape)
            out[f"relay_{shape}"] = {"runs": pairs, **{k: summarize([r[k] for r in pairs]) for k in
                                                      ("mb_per_s", "relay_cpu_s", "sink_cpu_s", "producer_cpu_s")},
                                     "ratio": ratio}
            log(f"  relay_{shape}: mb_per_s {fmt_s(out[f'relay_{shape}']['mb_per_s'])}, "
                f"x producer {fmt_s(out[f'relay_{shape}']['ratio'], 2)}")
        rep("tcp", lambda i: [pl, "tcp", str(c["tcp_mib"])], ["mb_per_s"])

        # the client's own floor: the same request bytes against a trivial server
        port = free_port()
        srv = subprocess.Popen([os.path.join(BIN, "floorsrv"), str(port)], stdin=subprocess.DEVNULL)
        try:
            t = Target("127.0.0.1", port)
            self._wait_port(port, 5)
            req = self.reqfile("floor-run", TensorlakeDialect(t).run_request("/bin/true", []))
            lat = []
            for i in range(reps):
                lat.append(self.httpload("lat", port, req, "--n", c["client_n"], "--warmup", 100, "--expect",
                                         TensorlakeDialect.run_ok_marker, "--samples",
                                         self.path("client.samples"), timeout=120))
            self.samples["client"] = read_samples(self.path("client.samples"))
            cl = {"runs": lat, **{q: summarize([r["latency"][q] for r in lat]) for q in ("p50_us", "p90_us", "p99_us")},
                  "bad": sum(r["bad"] for r in lat)}
            for conns in (8, 32):
                tr = [self.httpload("tput", port, req, "--conns", conns, "--duration", c["client_tput_s"],
                                    "--expect", TensorlakeDialect.run_ok_marker, timeout=120) for _ in range(reps)]
                cl[f"c{conns}"] = {"runs": tr, "per_s": summarize([r["per_s"] for r in tr])}
            out["client"] = cl
            log(f"  client floor: p50 {fmt_s(cl['p50_us'])} µs, c8 {fmt_s(cl['c8']['per_s'])} req/s")
            for shape, L in SHAPES.items():
                sreq = self.reqfile(f"floor-sse-{shape}", t.raw_request("GET", f"/sse/{L}/{nb}",
                                                                         accept="text/event-stream"))
                runs = [self.httpload("stream", port, sreq, "--mode", "sse-line", "--expect-bytes", nb,
                                      "--line-len", L, "--idle-timeout", 5, "--timeout", 120, timeout=180)
                        for _ in range(reps)]
                for r in runs:
                    r.pop("meta", None)
                out[f"client_sse_{shape}"] = {"runs": runs, "mb_per_s": summarize([r["mb_per_s"] for r in runs]),
                                              "complete_runs": sum(bool(r["complete"]) for r in runs)}
                log(f"  client SSE decode ceiling {shape}: {fmt_s(out[f'client_sse_{shape}']['mb_per_s'])} MB/s")
                # The wire format's floor: the producer's lines relayed as SSE events by a
                # minimal server (no log) to the same decoding client; and the same relay
                # keeping every byte it read in a file, as a daemon that keeps all output with
                # bounded memory must.
                for key, path, what in (("sserelay", "relay", "SSE relay floor"),
                                        ("sserelaylog", "relaylog", "SSE relay keeping the log")):
                    rreq = self.reqfile(f"floor-{path}-{shape}", t.raw_request("GET", f"/{path}/{L}/{nb}",
                                                                                accept="text/event-stream"))
                    runs, ratio = paired_runs(
                        lambda L=L, rreq=rreq: self.httpload("stream", port, rreq, "--mode", "sse-line",
                                                             "--expect-bytes", nb, "--line-len", L,
                                                             "--idle-timeout", 5, "--timeout", 120, timeout=180),
                        shape)
                    out[f"{key}_{shape}"] = {
                        "runs": runs, "mb_per_s": summarize([r["mb_per_s"] for r in runs]),
                        "ttfb_ms": summarize([r["ttfb_s"] * 1e3 for r in runs if r.get("ttfb_s") is not None]),
                        "complete_runs": sum(bool(r["complete"]) for r in runs), "ratio": ratio}
                    log(f"  {what} {shape}: {fmt_s(out[f'{key}_{shape}']['mb_per_s'])} MB/s, "
                        f"x producer {fmt_s(out[f'{key}_{shape}']['ratio'], 2)}")
        finally:
            srv.terminate()
            srv.wait(10)
        out["runfloor"] = self.run_floor(out["client"])
        return out

    def run_floor(self, client):
        """The floor of the run workloads: /bin/true with the plumbing behind HTTP (`floorsrv
        PORT spawn`: a process per connection, no JSON, no records, no cgroup), sequential and
        at 8 connections, each repetition paired with the bare floor measured right before it."""
        c, reps, pl = self.cfg, self.cfg["reps"], os.path.join(BIN, "physlimits")
        cl50 = med(client["p50_us"])
        port = free_port()
        srv = subprocess.Popen([os.path.join(BIN, "floorsrv"), str(port), "spawn"], stdin=subprocess.DEVNULL)
        out = {"lat": [], "c8": []}
        try:
            self._wait_port(port, 5)
            req = self.reqfile("floor-run", TensorlakeDialect(Target("127.0.0.1", port)).run_request("/bin/true", []))
            for _ in range(reps):
                sp = run_json([pl, "spawn", str(c["spawn_n"] // 2)], timeout=300)
                r = self.httpload("lat", port, req, "--n", c["lat_n"], "--warmup", c["warmup"], "--expect",
                                  TensorlakeDialect.run_ok_marker, timeout=300)
                out["lat"].append({"p50_us": r["latency"]["p50_us"], "bad": r["bad"],
                                   "paired_spawn_p50_us": sp["p50_us"]})
                par = run_json([pl, "spawnpar", "2", str(c["spawnpar_s"])], timeout=300)
                r = self.httpload("tput", port, req, "--conns", 8, "--duration", c["spawnpar_s"], "--expect",
                                  TensorlakeDialect.run_ok_marker, timeout=120)
                out["c8"].append({"per_s": r["per_s"], "bad": r["bad"] + r["conn_errors"],
                                  "paired_spawnpar2_per_s": par["per_s"]})
        finally:
            srv.terminate()
            srv.wait(10)
        out["p50_us"] = summarize([x["p50_us"] for x in out["lat"]])
        out["p50_ratio"] = summarize([x["p50_us"] / (x["paired_spawn_p50_us"] + cl50) for x in out["lat"]])
        out["c8_per_s"] = summarize([x["per_s"] for x in out["c8"]])
        out["c8_ratio"] = summarize([x["per_s"] / x["paired_spawnpar2_per_s"] for x in out["c8"]])
        out["bad"] = sum(x["bad"] for x in out["lat"] + out["c8"])
        log(f"  HTTP run floor / pre-fork reference: p50 {fmt_s(out['p50_us'])} µs = {fmt_s(out['p50_ratio'], 2)} x (spawn + client); "
            f"c8 {fmt_s(out['c8_per_s'])}/s = {fmt_s(out['c8_ratio'], 2)} x bare spawns/s; bad {out['bad']}")
        return out

    @staticmethod
    def _wait_port(port, timeout):
        end = time.time() + timeout
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")

    # -- 2. sequential latency ----------------------------------------------------------------
    def latency(self, d, proc, tag):
        c = self.cfg
        req = self.reqfile(f"{tag}-run-true", d.run_request("/bin/true", []))
        runs = []
        for i in range(c["reps"]):
            # the same runs through the HTTP run floor (the plumbing behind HTTP, no more), first:
            # the target's own pairing stays right before the daemon's repetition
            wf = self.work_paired("HTTP run floor", lambda w: self.httpload(
                "lat", w["spawn_port"], w["run_req"], "--n", c["lat_n"], "--warmup", c["warmup"], "--expect",
                TensorlakeDialect.run_ok_marker, timeout=300))
            # the target's paired floor: bare spawn measured right before this repetition (see evaluate)
            sp = self.paired_floor([os.path.join(BIN, "physlimits"), "spawn", str(c["spawn_n"] // 2)])
            with CpuDelta(proc) as cd:
                r = self.httpload("lat", d.t.port, req, "--n", c["lat_n"], "--warmup", c["warmup"], "--expect",
                                  d.run_ok_marker, "--samples", self.path(f"{tag}-lat.samples"), timeout=300)
            r["daemon_cpu_us_per_run"], r["daemon_cpu_us_per_run_ticks"], r["children_cpu_us_per_run"] = \
                cd.per(c["lat_n"] + c["warmup"])
            r["paired_spawn_p50_us"] = sp["p50_us"] if sp else None
            r["paired_runfloor_p50_us"] = wf["latency"]["p50_us"] if wf and not wf["bad"] else None
            runs.append(r)
            log(f"  latency: p50 {r['latency']['p50_us']} p90 {r['latency']['p90_us']} p99 {r['latency']['p99_us']} µs,"
                f" bad {r['bad']}, reconnects {r['reconnects']}, daemon CPU/run {fmt(r['daemon_cpu_us_per_run'])} µs")
        self.samples[f"{tag}_lat"] = read_samples(self.path(f"{tag}-lat.samples"))
        out = {"runs": runs, "bad": sum(r["bad"] for r in runs), "reconnects": sum(r["reconnects"] for r in runs)}
        for q in ("p50_us", "p90_us", "p99_us", "mean_us"):
            out[q] = summarize([r["latency"][q] for r in runs])
        for k in ("daemon_cpu_us_per_run", "daemon_cpu_us_per_run_ticks", "children_cpu_us_per_run"):
            out[k] = summarize([r[k] for r in runs])
        return out

    # -- 3. throughput ----------------------------------------------------------------------------
    def throughput(self, d, proc, tag):
        c = self.cfg
        req = self.reqfile(f"{tag}-run-true", d.run_request("/bin/true", []))
        out = {}
        for conns in (8, 32):
            runs = []
            for i in range(c["reps"]):
                wf = self.work_paired("pre-fork reference", lambda w: self.httpload(
                    "tput", w["spawn_port"], w["run_req"], "--conns", conns, "--duration", c["tput_s"], "--expect",
                    TensorlakeDialect.run_ok_marker, timeout=c["tput_s"] + 120)) if conns == 8 else None
                with CpuDelta(proc) as cd:
                    r = self.httpload("tput", d.t.port, req, "--conns", conns, "--duration", c["tput_s"],
                                      "--max-requests", 500000, "--expect", d.run_ok_marker, timeout=c["tput_s"] + 120)
                r["daemon_cpu_us_per_run"], _, r["children_cpu_us_per_run"] = cd.per(r["completed"])
                r["cpus_busy"] = cd.cpus_busy()
                r["paired_prefork_per_s"] = wf["per_s"] if wf and not (wf["bad"] or wf["conn_errors"]) else None
                runs.append(r)
                log(f"  throughput c{conns}: {r['per_s']}/s, bad {r['bad']}, conn errors {r['conn_errors']}, "
                    f"p99 {r['latency']['p99_us']} µs, daemon CPU/run {fmt(r['daemon_cpu_us_per_run'])} µs, "
                    f"children {fmt(r['children_cpu_us_per_run'])} µs, CPUs busy {fmt(r['cpus_busy'], 2)}")
                time.sleep(0.5)
            out[f"c{conns}"] = {"runs": runs, "per_s": summarize([r["per_s"] for r in runs]),
                                "p50_us": summarize([r["latency"]["p50_us"] for r in runs]),
                                "p99_us": summarize([r["latency"]["p99_us"] for r in runs]),
                                "daemon_cpu_us_per_run": summarize([r["daemon_cpu_us_per_run"] for r in runs]),
                                "children_cpu_us_per_run": summarize([r["children_cpu_us_per_run"] for r in runs]),
                                "cpus_busy": summarize([r["cpus_busy"] for r in runs]),
                                "bad": sum(r["bad"] + r["conn_errors"] + r["unfinished"] for r in runs)}
        return out

    # -- 4. streaming ---------------------------------------------------------------------------
    def stream(self, d, proc, tag):
        c = self.cfg
        nb = c["stream_mib"] * MIB
        out = {}
        for kind in ("run", "follow"):
            for shape, L in SHAPES.items():
                script = producer_script(shape, nb)
                runs = []
                for i in range(c["reps"]):
                    rss0 = proc.rss_kib() / 1024 if proc else None
                    peak_ok = proc.reset_peak() if proc else False
                    opts = ["--mode", None, "--expect-bytes", nb, "--line-len", L, "--idle-timeout", 5,
                            "--timeout", 300]
                    handle = None
                    if kind == "run":
                        raw, opts[1] = d.stream_run(script)
                        req = self.reqfile(f"{tag}-stream", raw)
                    else:
                        sf = d.start_follow(script)
                        if sf:
                            start, follow, opts[1] = sf
                            opts += ["--start-req", self.reqfile(f"{tag}-start", start)]
                            req = self.reqfile(f"{tag}-follow", follow)
                        else:  # the peer: start through the control client, then follow
                            handle, _ = d.start("sh", ["-c", script])
                            raw, opts[1] = d.follow_request(handle)
                            req = self.reqfile(f"{tag}-follow", raw)
                    # the floor of the work first: the target's own pairing (the producer alone)
                    # stays right before the daemon's run
                    wf = self.work_paired("SSE relay keeping the log", lambda w: self.httpload(
                        "stream", w["relay_port"],
                        self.reqfile(f"work-relaylog-{shape}", w["t"].raw_request(
                            "GET", f"/relaylog/{L}/{nb}", accept="text/event-stream")),
                        "--mode", "sse-line", "--expect-bytes", nb, "--line-len", L, "--idle-timeout", 5,
                        "--timeout", 120, timeout=180))
                    pf = self.paired_floor([os.path.join(BIN, "physlimits"), "producer", str(nb), script])
                    with CpuDelta(proc) as cd:
                        r = self.httpload("stream", d.t.port, req, *opts, timeout=400)
                    r.pop("meta", None)
                    r["paired_producer_mb_per_s"] = pf["mb_per_s"] if pf and pf.get("ok") else None
                    r["paired_relaylog_mb_per_s"] = wf["mb_per_s"] if wf and wf["complete"] else None
                    r["daemon_cpu_s"] = cd.per(1)[0] / 1e6 if proc else None
                    r["cpus_busy"] = cd.cpus_busy()
                    if proc:
                        st = proc.status()
                        r["daemon_peak_rss_mib"] = st["VmHWM_kib"] / 1024 if peak_ok else None
                        r["daemon_rss_before_mib"] = rss0
                        r["daemon_peak_over_before_mib"] = r["daemon_peak_rss_mib"] - rss0 if peak_ok else None
                        r["daemon_rss_after_mib"] = st["VmRSS_kib"] / 1024
                    h = r.get("pid") if handle is None else handle
                    if kind == "follow" and h not in (None, -1):
                        wait_exited(d, [h], timeout=30)
                        d.forget(h)
                    runs.append(r)
                    log(f"  stream {kind} {shape}: {r['mb_per_s']} MB/s, {r['stdout_bytes']}/{nb} bytes, "
                        f"complete={r['complete']} end={r['end']}, first byte {fmt(r['ttfb_s'] * 1e3, 2)} ms, "
                        f"peak RSS {fmt(r.get('daemon_peak_rss_mib'), 1)} MiB")
                    time.sleep(0.3)
                out[f"{kind}_{shape}"] = {
                    "runs": runs, "mb_per_s": summarize([r["mb_per_s"] for r in runs]),
                    "ttfb_ms": summarize([r["ttfb_s"] * 1e3 for r in runs if r["ttfb_s"] >= 0]),
                    "complete_runs": sum(bool(r["complete"]) for r in runs), "n_runs": len(runs),
                    "peak_rss_mib": summarize([r.get("daemon_peak_rss_mib") for r in runs]),
                    "peak_over_before_mib": summarize([r.get("daemon_peak_over_before_mib") for r in runs]),
                    "daemon_cpu_s": summarize([r["daemon_cpu_s"] for r in runs]),
                    "cpus_busy": summarize([r["cpus_busy"] for r in runs]),
                    "paired_producer_mb_per_s": summarize([r["paired_producer_mb_per_s"] for r in runs])}
        return out

    # -- 5. memory --------------------------------------------------------------------------------
    def memory(self, d, proc, tag):
        c = self.cfg
        k = c["sleepers"]
        out = {"cycles": []}
        for cyc in range(c["reps"]):
            cy, handles, pids = {}, [], []
            try:
                cy["before"] = proc.status()
                t0 = time.time()
                for _ in range(k):
                    h, pid = d.start("sleep", ["600"])
                    handles.append(h)
                    pids.append(pid)
                cy["start_s"] = time.time() - t0
                time.sleep(c["settle_s"])
                cy["running"] = proc.status()
                t0 = time.time()
                for h in handles:
                    d.kill(h)
                left = wait_exited(d, handles, timeout=60)
                cy["kill_s"] = time.time() - t0
                cy["still_running"] = len(left)
                time.sleep(c["settle_s"])
                cy["ended"] = proc.status()
                cy["forgot"] = sum(bool(d.forget(h)) for h in handles)
            finally:
                for pid in pids:  # last resort, only for sleepers this run started
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            if f.read().split(b"\0")[:2] == [b"sleep", b"600"]:
                                os.kill(pid, signal.SIGKILL)
                    except (OSError, TypeError):
                        pass
            cy["per_proc_kib"] = (cy["running"]["VmRSS_kib"] - cy["before"]["VmRSS_kib"]) / k
            out["cycles"].append(cy)
            log(f"  cycle {cyc}: RSS {cy['before']['VmRSS_kib']} -> {cy['running']['VmRSS_kib']} KiB with {k} "
                f"sleepers ({cy['per_proc_kib']:.1f} KiB each, fds {cy['running']['fds']}), "
                f"{cy['ended']['VmRSS_kib']} KiB after they ended; children left {cy['ended']['children']}")
        cyc = out["cycles"]
        out["sleepers"] = k
        out["rss_before_mib"] = summarize([x["before"]["VmRSS_kib"] / 1024 for x in cyc])
        out["rss_running_mib"] = summarize([x["running"]["VmRSS_kib"] / 1024 for x in cyc])
        out["rss_ended_mib"] = summarize([x["ended"]["VmRSS_kib"] / 1024 for x in cyc])
        out["per_proc_kib"] = summarize([x["per_proc_kib"] for x in cyc])
        out["ended_growth_kib"] = cyc[-1]["ended"]["VmRSS_kib"] - cyc[0]["ended"]["VmRSS_kib"]
        out["children_left"] = cyc[-1]["ended"]["children"]
        return out

    # -- the daemon's run -------------------------------------------------------------------------
    def run_daemon(self):
        out = {"errors": {}}
        dm = Daemon(self.a.daemon, self.tmp, self.a.daemon_arg)
        self.daemon = dm
        log(f"  daemon pid {dm.p.pid} on 127.0.0.1:{dm.port}")
        d = TensorlakeDialect(Target("127.0.0.1", dm.port, None))
        proc = dm.proc
        try:
            d.ready()
            time.sleep(0.5)
            out["idle"] = proc.status()
            log(f"  idle: RSS {out['idle']['VmRSS_kib']} KiB (anon {out['idle'].get('RssAnon_kib')}, "
                f"file {out['idle'].get('RssFile_kib')}), threads {out['idle']['threads']}, fds {out['idle']['fds']}")
            out["rss_after_mib"] = {"idle": out["idle"]["VmRSS_kib"] / 1024}
            # Idle RSS is mostly libc and binary text mapped by the kernel's 64 KiB fault-around
            # windows, whose alignment against the code moves with the random load address:
            # one start varies by +-60 KiB. The target takes the median over several starts.
            starts = [out["idle"]]
            for _ in range(self.cfg["idle_starts"] - 1):
                extra = Daemon(self.a.daemon, self.tmp, self.a.daemon_arg)
                try:
                    et = TensorlakeDialect(Target("127.0.0.1", extra.port, None))
                    et.ready()
                    time.sleep(0.5)
                    starts.append(extra.proc.status())
                    et.t.close()
                finally:
                    extra.stop()
            out["idle_starts"] = {k: summarize([x[k] for x in starts]) for k in ("VmRSS_kib", "RssAnon_kib", "RssFile_kib")}
            log(f"  idle over {len(starts)} starts: RSS {fmt_s(out['idle_starts']['VmRSS_kib'])} KiB")
            for name in ("memory", "latency", "throughput", "stream"):
                if self.a.only and name not in self.a.only:
                    continue
                if not proc.alive():
                    out["errors"][name] = "daemon not running"
                    continue
                log(f"== {name}")
                t0 = time.time()
                try:
                    if self.a.perf and name in ("latency", "throughput", "stream"):
                        with Perf(proc.pid, self.path(f"perf-{name}.data"), self.res, name, self.a.out_dir):
                            out[name] = getattr(self, name)(d, proc, "d")
                    else:
                        out[name] = getattr(self, name)(d, proc, "d")
                    out[name]["_seconds"] = round(time.time() - t0, 1)
                    if proc.alive():
                        out["rss_after_mib"][name] = proc.rss_kib() / 1024
                except Exception as e:  # keep going: report what could be measured
                    out["errors"][name] = f"{type(e).__name__}: {e}"
                    log(f"  {name} FAILED: {out['errors'][name]}")
            if proc.alive():
                time.sleep(self.cfg["settle_s"])
                out["final"] = proc.status()
        finally:
            d.t.close()
            rc = dm.stop()
            out["exit_status"] = rc
            out["log_tail"] = dm.tail_log(2000)
        if not out["errors"]:
            del out["errors"]
        return out

    def binary(self):
        path = os.path.abspath(self.a.daemon)
        stripped = self.path("sandboxd.stripped")
        p = subprocess.run(["strip", "-o", stripped, path], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            return {"bytes": os.path.getsize(path), "error": f"strip failed: {p.stderr.strip()[:200]}"}
        libs = []
        try:
            ldd = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30).stdout
            libs = [line.split()[0] for line in ldd.splitlines() if "=>" in line]
        except (OSError, subprocess.SubprocessError):
            pass
        return {"bytes": os.path.getsize(path), "stripped_bytes": os.path.getsize(stripped), "shared_libs": libs}

    # -- the peer (optional) ------------------------------------------------------------------------
    def run_peer(self):
        if not os.path.exists(PEER_START):
            return {"error": f"{PEER_START} not found"}
        port = free_port()
        env = dict(os.environ, PEER_PORT=str(port))
        p = subprocess.run(["sh", PEER_START], capture_output=True, text=True, timeout=600, env=env)
        m = re.search(r"(\d+)\s*$", p.stdout)
        if p.returncode or not m:
            return {"error": f"start_peer.sh failed: {p.stderr.strip()[-300:]}"}
        pid = int(m.group(1))
        out = {"pid": pid, "port": port}
        d = SandboxAgentDialect(Target("127.0.0.1", port))
        proc = Proc(pid)
        try:
            out["prepare"] = d.prepare()
            time.sleep(0.5)
            out["idle"] = proc.status()
            for name in ("memory", "latency", "throughput", "stream"):
                if self.a.only and name not in self.a.only:
                    continue
                log(f"== peer {name}")
                try:
                    out[name] = getattr(self, name)(d, proc, "peer")
                except Exception as e:
                    out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                    log(f"  peer {name} FAILED: {e}")
        finally:
            try:
                d.restore()
            except Exception:
                pass
            d.t.close()
            try:
                os.kill(pid, signal.SIGTERM)  # the peer this run started
            except OSError:
                pass
        return out


class Perf:
    """perf record (software cpu-clock, call graphs) of the daemon during one workload."""

    def __init__(self, pid, path, res, name, outdir):
        self.pid, self.path, self.res, self.name, self.outdir = pid, path, res, name, outdir

    def __enter__(self):
        self.p = None
        if shutil.which("perf"):
            self.p = subprocess.Popen(["perf", "record", "-q", "--no-inherit", "-e", "cpu-clock", "-F", "4999", "-g",
                                       "-p", str(self.pid), "-o", self.path],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if not self.p:
            return False
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
        rep = subprocess.run(["perf", "report", "-i", self.path, "--no-children", "--stdio", "--sort",
                              "dso,sym", "-g", "none", "--percent-limit", "0.7"],
                             capture_output=True, text=True, timeout=120).stdout
        lines = [ln for ln in rep.splitlines() if ln.strip() and not ln.startswith("#")]
        self.res.setdefault("profile", {})[self.name] = lines[:60]
        # The same samples by where the daemon entered the kernel: each syscall's share
        # including everything under it (scheduling, softirqs run on its way out), and the
        # share spent in user space (the daemon's code and its libraries).
        inc = subprocess.run(["perf", "report", "-i", self.path, "--children", "--stdio", "--sort", "sym",
                              "-g", "none", "--percent-limit", "0.3"],
                             capture_output=True, text=True, timeout=120).stdout
        by_sys = []
        for ln in inc.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[k\]\s+(?:__x64_sys_|__do_sys_|ksys_)(\w+)", ln)
            name = m.group(3).removesuffix("_64") if m else None  # ksys_fadvise64_64 is fadvise64
            if m and not any(n == name for _, n in by_sys):
                by_sys.append((float(m.group(1)), name))
        user = subprocess.run(["perf", "report", "-i", self.path, "--no-children", "--stdio", "--sort", "dso",
                               "-g", "none"], capture_output=True, text=True, timeout=120).stdout
        user_pct = sum(float(m.group(1)) for m in re.finditer(r"^\s*([\d.]+)%\s+(\S+)", user, re.M)
                       if not m.group(2).startswith("[kernel"))
        summary = [f"{pct:5.1f}%  {name}" for pct, name in sorted(by_sys, reverse=True)]
        summary.append(f"{user_pct:5.1f}%  user space (the daemon's code, libc)")
        summary.append(f"{max(0.0, 100 - user_pct - sum(p for p, _ in by_sys)):5.1f}%  the rest of the kernel "
                       f"(faults, interrupts, syscalls under 0.3 %)")
        self.res["profile"][self.name + "_by_syscall"] = summary
        os.makedirs(self.outdir, exist_ok=True)
        with open(os.path.join(self.outdir, f"profile-{self.name}.txt"), "w") as f:
            f.write("# by syscall (inclusive), then user space\n" + "\n".join(summary) + "\n\n" + rep)
        return False


# ---------------------------------------------------------------------------------------------
# formatting, targets, peer figures

def fmt(x, nd=0):
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "–"
    return f"{x:,.{nd}f}"


def fmt_s(s, nd=0):
    if s is None:
        return "–"
    if not isinstance(s, dict):
        return fmt(s, nd)
    if s.get("n", 1) == 1 or s["min"] == s["max"]:
        return fmt(s["median"], nd)
    return f"{fmt(s['median'], nd)} [{fmt(s['min'], nd)}–{fmt(s['max'], nd)}]"


def dig(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def peer_published(path_json, path_md):
    """The peer's published medians, mapped onto this benchmark's figures."""
    try:
        with open(path_json) as f:
            pj = json.load(f)
    except (OSError, ValueError):
        return None
    g = lambda *p: med(dig(pj, *p))  # noqa: E731
    out = {"source": os.path.relpath(path_json, REPO) if path_json.startswith(os.path.dirname(REPO)) else path_json,
           "spawn_p50_us": g("physical", "posix_spawn_wait", "p50_us"),
           "spawn_p90_us": None, "spawn_p99_us": g("physical", "posix_spawn_wait", "p99_us"),
           "spawnpar2": g("physical", "posix_spawn_parallel_2workers", "per_s"),
           "producer_100B": g("physical", "producer_100B-lines", "mb_per_s"),
           "producer_64KiB": g("physical", "producer_64KiB-lines", "mb_per_s"),
           "tcp": g("physical", "tcp_loopback_1conn", "mb_per_s"),
           "client_p50_us": g("floor", "floorsrv", "p50_us"),
           "client_p99_us": g("floor", "floorsrv", "p99_us"),
           "client_c8": g("floor", "floorsrv", "tput_c8_per_s"),
           "lat_p50_us": g("latency", "p50_us"), "lat_p90_us": g("latency", "p90_us"),
           "lat_p99_us": g("latency", "p99_us"), "cpu_us": g("latency", "daemon_cpu_us_per_run"),
           "c8": g("throughput", "c8", "per_s"), "c32": g("throughput", "c32", "per_s"),
           "c8_p99_us": g("throughput", "c8", "p99_us"), "c32_p99_us": g("throughput", "c32", "p99_us"),
           "c8_cpu_us": g("throughput", "c8", "daemon_cpu_us_per_run"),
           "idle_mib": g("memory", "rss_mib", "idle"), "running_mib": g("memory", "rss_mib", "running"),
           "ended_mib": g("memory", "rss_mib", "after_kill")}
    if out["idle_mib"] is not None and out["running_mib"] is not None:
        out["per_proc_kib"] = (out["running_mib"] - out["idle_mib"]) * 1024 / 200
    peaks = []
    for kind in ("run", "follow"):
        for shape, pk in (("100B", "100B-lines"), ("64KiB", "64KiB-lines")):
            s = dig(pj, "stream", f"{kind}_{pk}")
            if not s:
                continue
            runs = s.get("runs", [])
            out[f"{kind}_{shape}_mb_per_s"] = med(s.get("mb_per_s"))
            out[f"{kind}_{shape}_complete"] = f"{s.get('complete_runs')}/{len(runs)}"
            tt = [r["ttfb_s"] * 1e3 for r in runs if r.get("ttfb_s") is not None and r["ttfb_s"] >= 0]
            out[f"{kind}_{shape}_ttfb_ms"] = statistics.median(tt) if tt else None
            rcv = [100.0 * r["stdout_bytes"] / r["expected_bytes"] for r in runs if r.get("expected_bytes")]
            out[f"{kind}_{shape}_received_pct"] = statistics.median(rcv) if rcv else None
            pk_ = med(s.get("daemon_peak_rss_mib"))
            if pk_ is not None:
                peaks.append(pk_)
    out["peak_mib"] = max(peaks) if peaks else None
    try:
        with open(path_md) as f:
            m = re.search(r"binary is ([\d,]+) bytes(, [^.]*)?", f.read())
        if m:
            out["binary_bytes"] = int(m.group(1).replace(",", ""))
            out["binary_note"] = (m.group(2) or "").strip(", ")
    except OSError:
        pass
    return out


def paired(runs, value, floor):
    """-> (median of the runs' value/floor, median floor) when every run has its paired floor
    (measured right before it), else None."""
    if not runs or not all(floor(x) for x in runs):
        return None
    return statistics.median(value(x) / floor(x) for x in runs), statistics.median(floor(x) for x in runs)


def work_row(runs, value, key):
    """-> (the paired floor-of-work cell, the ratio cell) for runs paired by work_floor, or
    ("–", "") when they were not (--no-floor)."""
    pr = paired(runs or [], value, lambda x: x.get(key))
    if not pr:
        return "–", ""
    return fmt(pr[1]), fmt(pr[0], 2) + "× (paired)"


def evaluate(res):
    """-> list of target dicts: name, value, limit, ratio, target text, pass (True/False/None)."""
    fl, dm = res.get("floor", {}), res.get("daemon", {})
    T = []

    def add(key, name, value, ref, ratio, text, ok):
        T.append({"key": key, "name": name, "value": value, "ref": ref, "ratio": ratio, "target": text,
                  "pass": ok})

    sp, cl = med(dig(fl, "spawn", "p50_us")), med(dig(fl, "client", "p50_us"))
    p50 = med(dig(dm, "latency", "p50_us"))
    ref = sp + cl if sp is not None and cl is not None else None
    bad = dig(dm, "latency", "bad")
    r = p50 / ref if p50 is not None and ref else None
    # Paired: each repetition against the spawn floor measured right before it (median of the
    # per-repetition ratios); the client floor is the floor section's.
    pr = paired(dig(dm, "latency", "runs"), lambda x: x["latency"]["p50_us"],
                lambda x: x["paired_spawn_p50_us"] + cl if x.get("paired_spawn_p50_us") else None) \
        if cl is not None else None
    if pr:
        r, ref = pr
    add("run_p50", "run /bin/true p50", p50, ref, r, f"≤ {T_RUN_P50} × (spawn + client floor)",
        None if r is None else (r <= T_RUN_P50 and not bad))
    cpu = med(dig(dm, "latency", "daemon_cpu_us_per_run"))
    add("cpu", "daemon CPU per run", cpu, T_CPU_US, None if cpu is None else cpu / T_CPU_US, f"≤ {T_CPU_US:.0f} µs",
        None if cpu is None else cpu <= T_CPU_US)
    c8, sp2 = med(dig(dm, "throughput", "c8", "per_s")), med(dig(fl, "spawnpar2", "per_s"))
    r = c8 / sp2 if c8 is not None and sp2 else None
    add("c8", "runs/s at 8 connections", c8, sp2, r, f"≥ {T_TPUT} × bare spawns/s",
        None if r is None else (r >= T_TPUT and not dig(dm, "throughput", "c8", "bad")))
    all_complete, n_all = True, 0
    for kind in ("run", "follow"):
        for shape in SHAPES:
            s = dig(dm, "stream", f"{kind}_{shape}")
            prod = med(dig(fl, f"producer_{shape}", "mb_per_s"))
            v = med(dig(s, "mb_per_s")) if s else None
            complete = bool(s) and s["complete_runs"] == s["n_runs"]
            if s:
                n_all += s["n_runs"]
                all_complete &= complete
            else:
                all_complete = False
            r = v / prod if v is not None and prod else None
            pr = paired(dig(s, "runs"), lambda x: x["mb_per_s"], lambda x: x.get("paired_producer_mb_per_s"))
            if pr:
                r, prod = pr
            add(f"{kind}_{shape}", f"{kind} SSE, {SHAPE_LABEL[shape]}", v, prod, r,
                f"≥ {T_STREAM[shape]} × producer, all bytes", None if r is None else (r >= T_STREAM[shape] and complete))
    add("complete", "every stdout byte delivered", sum(dig(dm, "stream", k, "complete_runs") or 0 for k in
        [f"{a}_{b}" for a in ("run", "follow") for b in SHAPES]), n_all, None, "all runs complete",
        None if not dig(dm, "stream") else all_complete)
    tt = [med(dig(dm, "stream", f"{a}_{b}", "ttfb_ms")) for a in ("run", "follow") for b in SHAPES]
    tt = [x for x in tt if x is not None]
    worst = max(tt) if tt else None
    add("ttfb", "first stdout byte (worst variant)", worst, T_TTFB_MS, None if worst is None else worst / T_TTFB_MS,
        f"≤ {T_TTFB_MS:.0f} ms", None if worst is None else worst <= T_TTFB_MS)
    idle = med(dig(dm, "idle_starts", "VmRSS_kib")) or dig(dm, "idle", "VmRSS_kib")
    idle = idle / 1024 if idle is not None else None
    add("idle", "idle RSS", idle, T_IDLE_MIB, None if idle is None else idle / T_IDLE_MIB, f"≤ {T_IDLE_MIB:.0f} MiB",
        None if idle is None else idle <= T_IDLE_MIB)
    pp = med(dig(dm, "memory", "per_proc_kib"))
    add("per_proc", "RSS per sleeping process", pp, T_PER_PROC_KIB, None if pp is None else pp / T_PER_PROC_KIB,
        f"≤ {T_PER_PROC_KIB:.0f} KiB", None if pp is None else pp <= T_PER_PROC_KIB)
    peaks = [dig(dm, "stream", f"{a}_{b}", "peak_rss_mib", "max") for a in ("run", "follow") for b in SHAPES]
    peaks = [x for x in peaks if x is not None]
    pk = max(peaks) if peaks else None
    add("peak", "peak RSS while streaming (worst)", pk, T_PEAK_MIB, None if pk is None else pk / T_PEAK_MIB,
        f"≤ {T_PEAK_MIB:.0f} MiB", None if pk is None else pk <= T_PEAK_MIB)
    b = dig(res, "binary", "stripped_bytes")
    b = b / 1024 if b is not None else None
    add("binary", "binary, stripped", b, T_BINARY_KIB, None if b is None else b / T_BINARY_KIB,
        f"≤ {T_BINARY_KIB:.0f} KiB", None if b is None else b <= T_BINARY_KIB)
    return T


def add_floor(fl, q):
    a, b = med(dig(fl, "spawn", q)), med(dig(fl, "client", q))
    return a + b if a is not None and b is not None else None


def verdict(ok):
    return "–" if ok is None else ("PASS" if ok else "**MISS**")


def build_table(res):
    """-> (markdown table lines, targets)"""
    fl, dm, pp = res.get("floor", {}), res.get("daemon", {}), res.get("peer_published") or {}
    live = res.get("peer_live")
    T = {t["key"]: t for t in evaluate(res)}
    has_live = bool(live) and "error" not in live
    hdr = ["figure", "sandboxd", "floor", "ratio", "target", "result", "peer (published)"]
    if has_live:
        hdr.append("peer (this run)")
    rows = []

    def row(label, val="", floor="", ratio="", target="", result="", peer="", live_v=""):
        cells = [label, val, floor, ratio, target, result, peer]
        if has_live:
            cells.append(live_v)
        rows.append(cells)

    def tgt(key, nd_ratio=2):
        t = T.get(key)
        if not t:
            return "", "", ""
        return (fmt(t["ratio"], nd_ratio) + "×" if t["ratio"] is not None else "–"), t["target"], verdict(t["pass"])

    L = live or {}
    row("**floor: the machine and the client**")
    row("posix_spawn+wait /bin/true, p50 µs", "", fmt_s(dig(fl, "spawn", "p50_us")), peer=fmt(pp.get("spawn_p50_us")))
    row("posix_spawn+wait /bin/true, p99 µs", "", fmt_s(dig(fl, "spawn", "p99_us")), peer=fmt(pp.get("spawn_p99_us")))
    row("posix_spawn+wait, the spawner's own CPU µs per spawn (info)", "", fmt_s(dig(fl, "spawn", "parent_cpu_us"), 1))
    row("spawn + 2 pipes + setsid + read to EOF, p50 µs (info)", "", fmt_s(dig(fl, "spawn_pipes", "p50_us")))
    row("spawn + 2 pipes + setsid + read to EOF, the spawner's CPU µs per run (info)", "",
        fmt_s(dig(fl, "spawn_pipes", "parent_cpu_us"), 1))
    row("bare spawns/s, 2 workers", "", fmt_s(dig(fl, "spawnpar2", "per_s")), peer=fmt(pp.get("spawnpar2")))
    bare_cpu = (f"{fmt_s(dig(fl, 'spawnpar2', 'cpu_us_per_spawn'))}, {fmt_s(dig(fl, 'spawnpar2', 'cpus_busy'), 2)}"
                if dig(fl, "spawnpar2", "cpus_busy") else "")
    row("bare spawns/s: CPU µs per spawn (workers + children), CPUs busy (info)", "", bare_cpu or "–")
    spp, sp2 = med(dig(fl, "spawnpar2_pipes", "per_s")), med(dig(fl, "spawnpar2", "per_s"))
    row("spawns/s with 2 pipes + setsid + read to EOF, 2 workers (info)", "",
        f"{fmt_s(dig(fl, 'spawnpar2_pipes', 'per_s'))}; CPU µs per spawn "
        f"{fmt_s(dig(fl, 'spawnpar2_pipes', 'cpu_us_per_spawn'))}" if spp else "–",
        (fmt(spp / sp2, 2) + "× bare") if spp and sp2 else "")
    rf = dig(fl, "runfloor")
    row("HTTP run floor: the same behind HTTP (no JSON, no records, no cgroup), "
        "sequential p50 µs (info)", "", fmt_s(rf["p50_us"]) if rf else "–",
        (fmt_s(rf["p50_ratio"], 2) + "× (spawn + client), paired") if rf else "")
    row("the same server at 8 connections, a process each (a reference, not a floor), runs/s (info)", "", fmt_s(rf["c8_per_s"]) if rf else "–",
        (fmt_s(rf["c8_ratio"], 2) + "× bare spawns/s, paired") if rf else "")
    for shape in SHAPES:
        row(f"producer alone, {SHAPE_LABEL[shape]}, MB/s", "", fmt_s(dig(fl, f"producer_{shape}", "mb_per_s")),
            peer=fmt(pp.get(f"producer_{shape}")))
        t = dig(fl, f"producer_{shape}", "ttfb_s")
        row(f"producer alone, {SHAPE_LABEL[shape]}, first byte ms", "",
            fmt_s({k: (v * 1e3 if k != "n" else v) for k, v in t.items()}, 2) if t else "–")
    for shape in SHAPES:
        rl = dig(fl, f"relay_{shape}")
        row(f"producer → bare relay → TCP sink, {SHAPE_LABEL[shape]}, MB/s (info)", "",
            (f"{fmt_s(rl['mb_per_s'])}; CPU s: producer {fmt(med(rl['producer_cpu_s']), 2)}, relay "
             f"{fmt(med(rl['relay_cpu_s']), 2)}, sink {fmt(med(rl['sink_cpu_s']), 2)}") if rl else "–",
            (fmt_s(rl["ratio"], 2) + "× producer (paired)") if rl and rl.get("ratio") else "")
    for shape in SHAPES:
        rl = dig(fl, f"sserelay_{shape}")
        row(f"producer → minimal SSE relay (no log) → decoding client, {SHAPE_LABEL[shape]}, MB/s (info)", "",
            (f"{fmt_s(rl['mb_per_s'])}, {rl['complete_runs']}/{len(rl['runs'])} complete") if rl else "–",
            (fmt_s(rl["ratio"], 2) + "× producer (paired)") if rl and rl.get("ratio") else "")
    for shape in SHAPES:
        rl = dig(fl, f"sserelaylog_{shape}")
        row(f"producer → SSE relay keeping every byte in a file → decoding client, {SHAPE_LABEL[shape]}, "
            f"MB/s; first byte ms (info)", "",
            (f"{fmt_s(rl['mb_per_s'])}, {rl['complete_runs']}/{len(rl['runs'])} complete; "
             f"{fmt_s(rl['ttfb_ms'], 2)}") if rl else "–",
            (fmt_s(rl["ratio"], 2) + "× producer (paired)") if rl and rl.get("ratio") else "")
    row("loopback TCP, 1 connection, MB/s", "", fmt_s(dig(fl, "tcp", "mb_per_s")), peer=fmt(pp.get("tcp")))
    row("client vs trivial server, p50 µs", "", fmt_s(dig(fl, "client", "p50_us"), 1),
        peer=fmt(pp.get("client_p50_us"), 1))
    row("client vs trivial server, p99 µs", "", fmt_s(dig(fl, "client", "p99_us"), 1),
        peer=fmt(pp.get("client_p99_us"), 1))
    row("client vs trivial server, req/s at 8 conns", "", fmt_s(dig(fl, "client", "c8", "per_s")),
        peer=fmt(pp.get("client_c8")))
    for shape in SHAPES:
        row(f"client SSE decode ceiling, {SHAPE_LABEL[shape]}, MB/s", "",
            fmt_s(dig(fl, f"client_sse_{shape}", "mb_per_s")))

    row("**run to completion: POST /api/v1/processes/run of /bin/true**")
    t = T.get("run_p50")
    row("sequential, one keep-alive connection, p50 µs", fmt_s(dig(dm, "latency", "p50_us")),
        fmt(t["ref"]) + " (spawn, paired, + client)" if t and t["ref"] else "–", *tgt("run_p50"),
        fmt(pp.get("lat_p50_us")), fmt_s(dig(L, "latency", "p50_us")))
    row("the same against the HTTP run floor (the plumbing behind HTTP) measured right before each "
        "repetition, p50 µs (info)", fmt_s(dig(dm, "latency", "p50_us")),
        *work_row(dig(dm, "latency", "runs"), lambda x: x["latency"]["p50_us"], "paired_runfloor_p50_us"))
    row("sequential, p90 µs", fmt_s(dig(dm, "latency", "p90_us")),
        fmt(add_floor(fl, "p90_us")),
        peer=fmt(pp.get("lat_p90_us")), live_v=fmt_s(dig(L, "latency", "p90_us")))
    row("sequential, p99 µs", fmt_s(dig(dm, "latency", "p99_us")),
        fmt(add_floor(fl, "p99_us")),
        peer=fmt(pp.get("lat_p99_us")), live_v=fmt_s(dig(L, "latency", "p99_us")))
    row("bad answers / reconnects (sequential)",
        f"{dig(dm, 'latency', 'bad')} / {dig(dm, 'latency', 'reconnects')}" if dig(dm, "latency") else "–")
    pcpu = med(dig(fl, "spawn_pipes", "parent_cpu_us"))
    row("daemon CPU µs per run (sequential)", fmt_s(dig(dm, "latency", "daemon_cpu_us_per_run"), 1),
        f"{fmt(pcpu, 1)} (spawn + pipes, spawner's own)" if pcpu else "",
        *tgt("cpu"), fmt(pp.get("cpu_us")), fmt_s(dig(L, "latency", "daemon_cpu_us_per_run"), 1))
    row("children's CPU µs per run (info)", fmt_s(dig(dm, "latency", "children_cpu_us_per_run")))
    row("runs/s, 8 connections", fmt_s(dig(dm, "throughput", "c8", "per_s")),
        fmt_s(dig(fl, "spawnpar2", "per_s")) + " (spawns/s)", *tgt("c8"), fmt(pp.get("c8")),
        fmt_s(dig(L, "throughput", "c8", "per_s")))
    row("the same against the pre-fork reference measured right before each repetition, runs/s (info)",
        fmt_s(dig(dm, "throughput", "c8", "per_s")),
        *work_row(dig(dm, "throughput", "c8", "runs"), lambda x: x["per_s"], "paired_prefork_per_s"))
    sp2 = med(dig(fl, "spawnpar2", "per_s"))
    c32 = med(dig(dm, "throughput", "c32", "per_s"))
    row("runs/s, 32 connections", fmt_s(dig(dm, "throughput", "c32", "per_s")),
        fmt_s(dig(fl, "spawnpar2", "per_s")), (fmt(c32 / sp2, 2) + "×") if c32 and sp2 else "",
        peer=fmt(pp.get("c32")), live_v=fmt_s(dig(L, "throughput", "c32", "per_s")))
    for conns in (8, 32):
        row(f"p99 µs under {conns} connections", fmt_s(dig(dm, "throughput", f"c{conns}", "p99_us")),
            peer=fmt(pp.get(f"c{conns}_p99_us")), live_v=fmt_s(dig(L, "throughput", f"c{conns}", "p99_us")))
    row("daemon CPU µs per run, 8 connections", fmt_s(dig(dm, "throughput", "c8", "daemon_cpu_us_per_run"), 1),
        peer=fmt(pp.get("c8_cpu_us")))
    row("children's CPU µs per run, CPUs busy (whole machine), 8 connections (info)",
        f"{fmt_s(dig(dm, 'throughput', 'c8', 'children_cpu_us_per_run'))}, "
        f"{fmt_s(dig(dm, 'throughput', 'c8', 'cpus_busy'), 2)}" if dig(dm, "throughput", "c8", "cpus_busy") else "–",
        bare_cpu + " (bare spawns: all CPU per spawn, CPUs busy)" if bare_cpu else "")
    row("bad answers + connection errors under load",
        str((dig(dm, "throughput", "c8", "bad") or 0) + (dig(dm, "throughput", "c32", "bad") or 0))
        if dig(dm, "throughput") else "–")

    mib = res["meta"]["config"]["stream_mib"]
    row(f"**streaming {mib} MiB of stdout (MB/s = stdout bytes ÷ time from request to last byte)**")
    for kind, what in (("run", "run SSE"), ("follow", "start + output/follow")):
        for shape in SHAPES:
            k = f"{kind}_{shape}"
            s = dig(dm, "stream", k)
            compl = f", {s['complete_runs']}/{s['n_runs']} complete" if s else ""
            row(f"{what}, {SHAPE_LABEL[shape]}, MB/s", fmt_s(dig(s, "mb_per_s")) + compl,
                (fmt_s(dig(s, "paired_producer_mb_per_s")) + " (producer, paired)"
                 if dig(s, "paired_producer_mb_per_s") else
                 fmt_s(dig(fl, f"producer_{shape}", "mb_per_s")) + " (producer)"), *tgt(k),
                (fmt(pp.get(f"{k}_mb_per_s")) + (f", {pp.get(f'{k}_complete')} complete, "
                                                  f"{fmt(pp.get(f'{k}_received_pct'), 1)} % received")
                 if pp.get(f"{k}_mb_per_s") is not None else ""),
                fmt_s(dig(L, "stream", k, "mb_per_s")))
            row(f"the same against the SSE relay keeping every byte in a file, measured right before each "
                f"repetition, MB/s (info)", fmt_s(dig(s, "mb_per_s")),
                *work_row(dig(s, "runs"), lambda x: x["mb_per_s"], "paired_relaylog_mb_per_s"))
    row("CPUs busy (whole machine) during the streams, run / follow (info)",
        " / ".join(", ".join(fmt(med(dig(dm, "stream", f"{kind}_{shape}", "cpus_busy")), 2) for shape in SHAPES)
                   for kind in ("run", "follow")) if dig(dm, "stream") else "–")
    row("every stdout byte delivered, checked", f"{T['complete']['value']}/{T['complete']['ref']} runs"
        if dig(dm, "stream") else "–", "", "", T["complete"]["target"], verdict(T["complete"]["pass"]))
    for kind, what in (("run", "run SSE"), ("follow", "follow")):
        for shape in SHAPES:
            k = f"{kind}_{shape}"
            pt = dig(fl, f"producer_{shape}", "ttfb_s")
            row(f"first stdout byte, {what}, {SHAPE_LABEL[shape]}, ms", fmt_s(dig(dm, "stream", k, "ttfb_ms"), 2),
                (fmt(med(pt) * 1e3, 2) + " (producer)") if pt else "", "", "", "",
                fmt(pp.get(f"{k}_ttfb_ms"), 1), fmt_s(dig(L, "stream", k, "ttfb_ms"), 2))
    row("first stdout byte, worst variant, ms", fmt(T["ttfb"]["value"], 2), "", *tgt("ttfb"))

    row("**memory and size**")
    idle = dig(dm, "idle")
    ist = dig(dm, "idle_starts")
    if ist:
        mib = {k: {q: (v / 1024 if q != "n" else v) for q, v in ist[k].items()} for k in ist}
        idle_txt = (f"{fmt_s(mib['VmRSS_kib'], 2)} over {ist['VmRSS_kib']['n']} starts (anon "
                    f"{fmt(med(mib['RssAnon_kib']), 2)}, file {fmt(med(mib['RssFile_kib']), 2)})")
    elif idle:
        idle_txt = (fmt(idle["VmRSS_kib"] / 1024, 2) + f" (anon {fmt(idle.get('RssAnon_kib', 0) / 1024, 2)}, "
                    f"file {fmt(idle.get('RssFile_kib', 0) / 1024, 2)})")
    else:
        idle_txt = "–"
    row("idle RSS MiB", idle_txt,
        "", *tgt("idle"), fmt(pp.get("idle_mib"), 1),
        fmt(dig(L, "idle", "VmRSS_kib") / 1024, 1) if dig(L, "idle", "VmRSS_kib") else "")
    k = dig(dm, "memory", "sleepers") or res["meta"]["config"]["sleepers"]
    row(f"RSS MiB with {k} sleeping processes", fmt_s(dig(dm, "memory", "rss_running_mib"), 2),
        peer=fmt(pp.get("running_mib"), 1) + " (200)" if pp.get("running_mib") else "",
        live_v=fmt_s(dig(L, "memory", "rss_running_mib"), 1))
    row("RSS KiB per sleeping process", fmt_s(dig(dm, "memory", "per_proc_kib"), 1), "", *tgt("per_proc"),
        fmt(pp.get("per_proc_kib"), 1), fmt_s(dig(L, "memory", "per_proc_kib"), 1))
    row("RSS MiB after they ended (leak check)", fmt_s(dig(dm, "memory", "rss_ended_mib"), 2),
        (f"growth over cycles {fmt(dig(dm, 'memory', 'ended_growth_kib'))} KiB, children left "
         f"{dig(dm, 'memory', 'children_left', 'total')}") if dig(dm, "memory") else "",
        peer=fmt(pp.get("ended_mib"), 1))
    incs = [dig(dm, "stream", f"{a}_{b}", "peak_over_before_mib", "max") for a in ("run", "follow") for b in SHAPES]
    incs = [x for x in incs if x is not None]
    row("peak RSS MiB while streaming (worst run)", fmt(T["peak"]["value"], 2),
        f"+{fmt(max(incs), 2)} over the RSS before the stream" if incs else "", *tgt("peak"),
        fmt(pp.get("peak_mib")))
    ra = dig(dm, "rss_after_mib") or {}
    row("RSS MiB after each workload (info)", ", ".join(f"{k} {fmt(v, 1)}" for k, v in ra.items()) or "–")
    fin = dig(dm, "final", "VmRSS_kib")
    row("RSS MiB at the end (after every workload)", fmt(fin / 1024, 2) if fin else "–")
    b = res.get("binary") or {}
    row("binary KiB, stripped (shared libraries excluded)", fmt(T["binary"]["value"]),
        (f"unstripped {fmt(b.get('bytes', 0) / 1024)} KiB; links {', '.join(os.path.basename(x) for x in b.get('shared_libs', []))}")
        if b else "", *tgt("binary"),
        (fmt(pp["binary_bytes"] / 1024) + " (" + (pp.get("binary_note") or "") + ")") if pp.get("binary_bytes") else "")

    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    lines += ["| " + " | ".join(c if c else "" for c in r) + " |" for r in rows]
    return lines, list(T.values())


# ---------------------------------------------------------------------------------------------
# the plot (SVG, stdlib only)

def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_plot(res, samples):
    W, H = 1160, 540
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
          f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
          f'<rect width="{W}" height="{H}" fill="white"/>',
          f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">sandboxd benchmark '
          f'({esc(res["meta"]["mode"])} run, {esc(res["meta"]["started"])}, {res["meta"]["nproc"]} CPUs)</text>']

    # left: latency CDF, log x
    x0, y0, pw, ph = 70, 60, 470, 360
    series = [("client vs trivial server", samples.get("client"), "#7f7f7f", "4,3"),
              ("posix_spawn+wait /bin/true", samples.get("spawn"), "#2ca02c", ""),
              ("sandboxd run /bin/true (SSE)", samples.get("d_lat"), "#1f77b4", "")]
    if samples.get("peer_lat"):
        series.append(("peer run /bin/true (this run)", samples.get("peer_lat"), "#ff7f0e", ""))
    allv = [v for _, s, _, _ in series if s for v in s if v > 0]
    el.append(f'<text x="{x0 + pw / 2}" y="{y0 - 14}" text-anchor="middle" font-size="13" font-weight="bold">'
              f'Latency distribution (CDF), last repetition</text>')
    if allv:
        allv.sort()
        lo = 10 ** math.floor(math.log10(max(1.0, allv[0])))
        hi_v = allv[min(len(allv) - 1, int(len(allv) * 0.999))]
        hi = 10 ** math.ceil(math.log10(hi_v * 1.05))
        lx = lambda v: x0 + (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * pw  # noqa
        ly = lambda q: y0 + ph - q * ph  # noqa: E731
        el.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        dec = lo
        mults = (1, 2, 5) if math.log10(hi / lo) <= 3.01 else (1, 3)
        while dec <= hi * 1.001:
            for m in mults:
                v = dec * m
                if lo <= v <= hi:
                    X = lx(v)
                    el.append(f'<line x1="{X:.1f}" y1="{y0}" x2="{X:.1f}" y2="{y0 + ph}" stroke="#ddd"/>')
                    lab = f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"
                    el.append(f'<text x="{X:.1f}" y="{y0 + ph + 16}" text-anchor="middle">{lab}</text>')
            dec *= 10
        for q in (0, .25, .5, .75, .9, 1):
            Y = ly(q)
            el.append(f'<line x1="{x0}" y1="{Y:.1f}" x2="{x0 + pw}" y2="{Y:.1f}" stroke="#eee"/>')
            el.append(f'<text x="{x0 - 6}" y="{Y + 4:.1f}" text-anchor="end">{q:g}</text>')
        el.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph + 34}" text-anchor="middle">µs per request / spawn '
                  f'(log scale)</text>')
        el.append(f'<text x="{x0 - 44}" y="{y0 + ph / 2}" text-anchor="middle" '
                  f'transform="rotate(-90 {x0 - 44} {y0 + ph / 2})">fraction of requests ≤ x</text>')
        for name, s, col, dash in series:
            if not s:
                continue
            v = sorted(s)
            n = len(v)
            step = max(1, n // 400)
            pts = [(lx(v[i]), ly((i + 1) / n)) for i in range(0, n, step)] + [(lx(v[-1]), ly(1))]
            el.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" '
                      f'{"stroke-dasharray=%s" % chr(34) + dash + chr(34) if dash else ""} points="' +
                      " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        t = next((t for t in evaluate(res) if t["key"] == "run_p50"), None)
        if t and t["ref"]:
            tv = t["ref"] * T_RUN_P50
            if lo <= tv <= hi:
                X = lx(tv)
                el.append(f'<line x1="{X:.1f}" y1="{ly(0.5) - 40:.1f}" x2="{X:.1f}" y2="{ly(0.5) + 40:.1f}" '
                          f'stroke="#d62728" stroke-width="2"/>')
                el.append(f'<text x="{X + 4:.1f}" y="{ly(0.5) - 30:.1f}" fill="#d62728">target p50 '
                          f'{tv:.0f} µs</text>')
        shown = [x for x in series if x[1]]
        lx0, ly0 = x0 + 10, y0 + ph + 56
        for i, (name, s, col, dash) in enumerate(shown):
            Y = ly0 + 17 * i
            el.append(f'<line x1="{lx0}" y1="{Y}" x2="{lx0 + 24}" y2="{Y}" stroke="{col}" stroke-width="2" '
                      f'{"stroke-dasharray=%s" % chr(34) + dash + chr(34) if dash else ""}/>')
            el.append(f'<text x="{lx0 + 30}" y="{Y + 4}" font-size="11">{esc(name)} (p50 '
                      f'{statistics.median(s):.0f} µs)</text>')
    else:
        el.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph / 2}" text-anchor="middle">no samples</text>')

    # right: stream throughput bars
    x1, pw2 = 690, 420
    fl, dm, pp = res.get("floor", {}), res.get("daemon", {}), res.get("peer_published") or {}
    el.append(f'<text x="{x1 + pw2 / 2}" y="{y0 - 14}" text-anchor="middle" font-size="13" font-weight="bold">'
              f'Stream throughput, {res["meta"]["config"]["stream_mib"]} MiB of stdout (MB/s)</text>')
    groups = []
    for kind, what in (("run", "run SSE"), ("follow", "follow")):
        for shape in SHAPES:
            k = f"{kind}_{shape}"
            s = dig(dm, "stream", k)
            groups.append((f"{what}, {SHAPE_LABEL[shape]}", dig(fl, f"producer_{shape}", "mb_per_s"),
                           dig(s, "mb_per_s"), pp.get(f"{k}_mb_per_s"), T_STREAM[shape],
                           dig(fl, f"client_sse_{shape}", "mb_per_s"),
                           bool(s) and s["complete_runs"] == s["n_runs"]))
    vmax = max([med(v) or 0 for g in groups for v in (g[1], g[2], g[3], g[5]) if v is not None] +
               [dig(v, "max") or 0 for g in groups for v in (g[1], g[2]) if isinstance(v, dict)] + [1])
    vmax = 10 ** math.floor(math.log10(vmax)) * math.ceil(vmax * 1.1 / 10 ** math.floor(math.log10(vmax)))
    sx = lambda v: x1 + v / vmax * pw2  # noqa: E731
    gh, bh = ph / len(groups), 16
    el.append(f'<rect x="{x1}" y="{y0}" width="{pw2}" height="{ph}" fill="none" stroke="#333"/>')
    for i in range(6):
        v = vmax * i / 5
        X = sx(v)
        el.append(f'<line x1="{X:.1f}" y1="{y0}" x2="{X:.1f}" y2="{y0 + ph}" stroke="#eee"/>')
        el.append(f'<text x="{X:.1f}" y="{y0 + ph + 16}" text-anchor="middle">{v:.0f}</text>')
    el.append(f'<text x="{x1 + pw2 / 2}" y="{y0 + ph + 34}" text-anchor="middle">MB/s (median, whisker = '
              f'min–max)</text>')
    for gi, (label, prod, ours, peer, frac, ceil_, complete) in enumerate(groups):
        gy = y0 + gi * gh + 8
        el.append(f'<text x="{x1 - 8}" y="{gy + gh / 2 - 4:.1f}" text-anchor="end" font-weight="bold">'
                  f'{esc(label.split(",")[0])}</text>')
        el.append(f'<text x="{x1 - 8}" y="{gy + gh / 2 + 10:.1f}" text-anchor="end">{esc(label.split(", ")[1])}</text>')
        bars = [("producer alone", prod, "#bbbbbb", None), ("sandboxd", ours, "#1f77b4", None),
                ("peer (published)", peer, "none", "#ff7f0e")]
        for bi, (bname, v, fill, stroke) in enumerate(bars):
            Y = gy + bi * (bh + 3)
            mv = med(v)
            if mv is None:
                el.append(f'<text x="{x1 + 4}" y="{Y + 12}" fill="#999">{esc(bname)}: –</text>')
                continue
            el.append(f'<rect x="{x1}" y="{Y}" width="{max(1, sx(mv) - x1):.1f}" height="{bh}" fill="{fill}" '
                      + (f'stroke="{stroke}" stroke-width="2"' if stroke else "") + '/>')
            if isinstance(v, dict) and v["min"] != v["max"]:
                el.append(f'<line x1="{sx(v["min"]):.1f}" y1="{Y + bh / 2}" x2="{sx(v["max"]):.1f}" '
                          f'y2="{Y + bh / 2}" stroke="#000"/>')
            note = ""
            if bname == "sandboxd" and not complete:
                note = " (INCOMPLETE)"
            if bname.startswith("peer") and "follow" in label:
                note = " (lost bytes)"
            el.append(f'<text x="{sx(mv) + 4:.1f}" y="{Y + 12}" font-size="11">{mv:.0f}{note}</text>')
            if bname == "sandboxd" and med(prod):
                tx = sx(med(prod) * frac)
                el.append(f'<line x1="{tx:.1f}" y1="{Y - 2}" x2="{tx:.1f}" y2="{Y + bh + 2}" stroke="#d62728" '
                          f'stroke-width="2.5"/>')
        if med(ceil_):
            cx = sx(min(med(ceil_), vmax))
            el.append(f'<line x1="{cx:.1f}" y1="{gy - 3}" x2="{cx:.1f}" y2="{gy + 3 * (bh + 3)}" stroke="#7f7f7f" '
                      f'stroke-dasharray="2,2"/>')
    legend = [("rect", "#bbbbbb", None, "producer alone (floor)"), ("rect", "#1f77b4", None, "sandboxd"),
              ("rect", "none", "#ff7f0e", "peer, published"), ("tick", "#d62728", None, "target (× producer)"),
              ("dash", "#7f7f7f", None, "client decode ceiling")]
    for i, (kind, col, stroke, name) in enumerate(legend):
        if i % 3 == 0:
            X, ly0 = x1 - 40, y0 + ph + 56 + 17 * (i // 3)
        if kind == "rect":
            el.append(f'<rect x="{X}" y="{ly0 - 10}" width="14" height="12" fill="{col}" '
                      + (f'stroke="{stroke}" stroke-width="2"' if stroke else "") + '/>')
        elif kind == "tick":
            el.append(f'<line x1="{X + 7}" y1="{ly0 - 12}" x2="{X + 7}" y2="{ly0 + 3}" stroke="{col}" stroke-width="2.5"/>')
        else:
            el.append(f'<line x1="{X + 7}" y1="{ly0 - 12}" x2="{X + 7}" y2="{ly0 + 3}" stroke="{col}" '
                      f'stroke-dasharray="2,2"/>')
        el.append(f'<text x="{X + 18}" y="{ly0}" font-size="11">{esc(name)}</text>')
        X += 30 + 6.3 * len(name)
    el.append("</svg>")
    return "\n".join(el) + "\n"


# ---------------------------------------------------------------------------------------------

def write_outputs(res, samples, outdir):
    os.makedirs(outdir, exist_ok=True)
    lines, targets = build_table(res)
    res["targets"] = targets
    with open(os.path.join(outdir, "latest.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(outdir, "plot.svg"), "w") as f:
        f.write(svg_plot(res, samples))
    m = res["meta"]
    passed = sum(1 for t in targets if t["pass"])
    missed = [t["name"] for t in targets if t["pass"] is False]
    unknown = [t["name"] for t in targets if t["pass"] is None]
    head = [f"# sandboxd benchmark: {m['mode']} run, {m['started']}", "",
            f"Daemon `{m['daemon']}` (git {m.get('git')}), {m['nproc']} CPUs, `{m['uname']}`, "
            f"load average {', '.join(f'{x:.2f}' for x in m['loadavg_start'])} at start, "
            f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', ()))} at the end; {m.get('seconds')} s. "
            f"{m['config']['reps']} repetitions per figure; cells are **median [min–max]**. "
            f"Floor and daemon were measured in the same run; the run p50 and stream targets are *paired*: "
            f"bare spawn and the producer alone are measured again right before each daemon repetition, and "
            f"the ratio is the median of the repetitions' ratios (the floor section shows the floor measured "
            f"first). The peer column is rivet sandbox-agent 0.4.2 as "
            f"published in `{(res.get('peer_published') or {}).get('source', 'n/a')}` (same kind of machine, "
            f"another day: compare ratios, not absolute µs).", ""]
    if m.get("note"):
        head += [f"**Note:** {m['note']}", ""]
    if m["mode"] == "quick":
        head += [f"**Quick run**: {m['config']['stream_mib']} MiB streams, {m['config']['sleepers']} sleepers, "
                 f"short durations; the targets are indicative only.", ""]
    tail = ["", f"Targets: {passed} of {len(targets)} pass" +
            (f"; miss: {', '.join(missed)}" if missed else "") +
            (f"; not measured: {', '.join(unknown)}" if unknown else "") + ".", "",
            "![latency distribution and stream throughput against the floor](plot.svg)", ""]
    errs = dig(res, "daemon", "errors") or {}
    if "daemon_error" in res:
        tail += [f"Daemon could not be measured: {res['daemon_error']}", ""]
    for k, v in errs.items():
        tail += [f"- workload `{k}` failed: {v}"]
    md = "\n".join(head + lines + tail) + "\n"
    with open(os.path.join(outdir, "latest.md"), "w") as f:
        f.write(md)
    return md, targets


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", default=os.path.join(REPO, "build", "sandboxd"), help="daemon binary")
    ap.add_argument("--quick", action="store_true", help="smoke run (~30 s, small sizes)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (full 3, quick 2)")
    ap.add_argument("--stream-mib", type=int, default=None, help="stdout volume per stream run (full 256)")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None,
                    help="comma list of daemon workloads: latency,throughput,memory,stream")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra daemon argument (repeatable), e.g. --daemon-arg=--max-output=2G")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor (its targets then cannot be judged)")
    ap.add_argument("--peer", action="store_true",
                    help=f"also run the peer via {os.path.relpath(PEER_START, REPO)} (installs it with npm)")
    ap.add_argument("--peer-json", default=PEER_JSON, help="the peer's published results")
    ap.add_argument("--perf", action="store_true", help="perf-record the daemon during latency, throughput and stream; "
                    "reports in results/profile-*.txt")
    ap.add_argument("--note", default=None, help="a line for the header of latest.md (e.g. how the daemon was built)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    a = ap.parse_args()

    subprocess.run(["make", "-s", "-C", HERE], check=True, stdout=sys.stderr, timeout=300)
    b = Bench(a)
    res, t_start, rc = b.res, time.time(), 0
    res["peer_published"] = peer_published(a.peer_json, os.path.splitext(a.peer_json)[0] + ".md")
    try:
        if not a.no_floor:
            log("== floor")
            t0 = time.time()
            res["floor"] = b.floor()
            res["floor"]["_seconds"] = round(time.time() - t0, 1)
        if a.daemon and os.path.exists(a.daemon):
            res["binary"] = b.binary()
            log(f"== daemon {a.daemon}: {res['binary'].get('stripped_bytes')} bytes stripped")
            try:
                with b.work_floor():
                    res["daemon"] = b.run_daemon()
            except Exception as e:
                res["daemon_error"] = f"{type(e).__name__}: {e}"
                log(f"  daemon FAILED: {res['daemon_error']}")
                rc = 1
        else:
            res["daemon_error"] = f"no daemon binary at {a.daemon}"
            log(res["daemon_error"])
            rc = 1
        if a.peer:
            log("== peer (live)")
            res["peer_live"] = b.run_peer()
    finally:
        res["meta"]["seconds"] = round(time.time() - t_start, 1)
        res["meta"]["loadavg_end"] = os.getloadavg()
        md, targets = write_outputs(res, b.samples, a.out_dir)
        shutil.rmtree(b.tmp, ignore_errors=True)
    print(md)
    log(f"results: {os.path.relpath(os.path.join(a.out_dir, 'latest.md'), os.getcwd())}, latest.json, plot.svg "
        f"({res['meta']['seconds']} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
