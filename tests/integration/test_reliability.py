"""Fault injection from shared/reliability.md section 3, scaled for a 2-core machine and a
few-minute budget. Scaling versus the document is noted on each test ("scaled: ...").

Not here: req 4 (test_output: split UTF-8 + 4 MiB random via base64), 10 (test_lifecycle:
exit statuses, OOM), 16 (test_lifecycle: clean child), 17 (test_stdin), 23 (test_auth),
26's SSE half (test_output). Not feasible: req 27's fork bomb (the API has no pids cap to
contain it and this machine is shared).
"""

import os
import random
import resource
import socket
import tempfile
import threading
import time

import harness
from harness import Daemon, ProcRef, assert_error, check_process_info, slack

DAEMON = {}

PY = "python3"


def follow_lines(d, pid, which="stdout", timeout_s=60, rcvbuf=None):
    """All output lines of a follow stream plus the eof data; asserts framing."""
    with d.follow(pid, which, rcvbuf=rcvbuf) as s:
        assert s.status == 200, (s.status, s.response)
        events, _ = s.collect(slack(timeout_s))
        assert s.ended and not s.eof_abrupt
    assert events and events[-1].name == "eof", events[-2:]
    assert sum(1 for e in events if e.name == "eof") == 1
    return [e.json for e in events[:-1]], events[-1].json


# ---- req 1: drain before exit ---------------------------------------------------------------------

@harness.timeout(120)
def test_req01_drain_before_exit_run(d):
    # scaled: 20 runs of seq 1 30000 (+1 of 500000), not 200 of 500000.
    want = [str(i) for i in range(1, 30001)]
    for n in range(20):
        res = d.run_sh("seq 1 30000; exit 3", timeout_s=60)
        assert res.exit["exit_code"] == 3, (n, res.exit)
        got = res.lines()
        assert got == want, "run %d: %d lines, last %r" % (n, len(got), got[-1:] if got else None)
    for n in range(1):
        res = d.run_sh("seq 1 500000; exit 3", timeout_s=60)
        got = res.lines()
        assert len(got) == 500000 and got[-1] == "500000" and got[0] == "1", (n, len(got))
        assert res.exit["exit_code"] == 3


@harness.timeout(120)
def test_req01_random_base64_sha(d):
    # scaled: 3 runs of 8 MiB (base64 of /dev/urandom), not 200.
    import base64
    import hashlib
    data = os.urandom(8 << 20)
    want = hashlib.sha256(data).hexdigest()
    fd, path = tempfile.mkstemp(prefix="sbx-r1-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        for n in range(3):
            res = d.run_sh("base64 %s; exit 3" % path, timeout_s=60)
            assert res.exit["exit_code"] == 3
            got = hashlib.sha256(base64.b64decode("".join(res.lines()))).hexdigest()
            assert got == want, "run %d: sha256 differs" % n
    finally:
        os.unlink(path)


@harness.timeout(180)
def test_req01_big_log_reads_back_live_late_and_after(d):
    # 48 MiB of output: past a few MiB the daemon writes the log with O_DIRECT (docs/
    # decisions.md); a follower from the start, one that attaches late (its replay comes from
    # the disk and from chunks still in flight) and a replay after the end all get every byte.
    import base64
    import hashlib
    data = os.urandom(36 << 20)
    want = hashlib.sha256(data).hexdigest()
    fd, path = tempfile.mkstemp(prefix="sbx-r1big-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        p = d.sh("sleep 0.2; base64 %s; sleep 0.5; exit 4" % path)
        live = d.follow(p["pid"])
        time.sleep(0.6)  # the writer is well past the start by now
        late = d.follow(p["pid"])
        for name, st in (("live", live), ("late", late)):
            events, _ = st.collect(120)
            st.close()
            lines = [e.json["line"] for e in events if isinstance(e.json, dict) and "line" in e.json]
            assert events[-1].name == "eof" and events[-1].json["exit_code"] == 4, (name, events[-1])
            got = hashlib.sha256(base64.b64decode("".join(lines))).hexdigest()
            assert got == want, "%s follower: sha256 differs (%d lines)" % (name, len(lines))
        after = d.follow(p["pid"])
        events, _ = after.collect(120)
        after.close()
        lines = [e.json["line"] for e in events if isinstance(e.json, dict) and "line" in e.json]
        assert hashlib.sha256(base64.b64decode("".join(lines))).hexdigest() == want, "replay"
    finally:
        os.unlink(path)


@harness.timeout(90)
def test_req01_status_implies_complete_output(d):
    # Once GET says the process ended, every byte is retrievable (scaled: 15 runs).
    for n in range(15):
        p = d.sh("seq 1 100000; exit 3")
        i = d.wait_ended(p["pid"], 20)
        assert i["exit_code"] == 3, i
        j = d.output(p["pid"], "stdout")
        assert j["line_count"] == 100000 and j["lines"][-1] == "100000", \
            "run %d: ended with %d lines" % (n, j["line_count"])


# ---- req 2: exit is not pipe EOF ------------------------------------------------------------------

def test_req02_exit_not_pipe_eof(d):
    t = time.monotonic()
    p = d.sh("sleep 600 & echo $!; echo hi; exit 0")
    i = d.wait_ended(p["pid"], 10)
    el = time.monotonic() - t
    assert i["status"] == "exited" and i["exit_code"] == 0, i
    assert el <= 2 + slack(1), "exit reported after %.1fs (grace 2 s + 1 s)" % el
    lines = d.lines(p["pid"])
    assert lines[1:] == ["hi"], lines
    assert not harness.wait_gone([ProcRef(int(lines[0]))], slack(1)), "straggler survived"


# ---- req 3: gapless attach ----------------------------------------------------------------------

@harness.timeout(120)
def test_req03_gapless_attach_50_followers(d):
    # scaled: 4000 lines at ~1 ms; 50 followers at random times. The Tensorlake API has no
    # byte offset, so the "10 with an offset" variant does not apply: every follower must
    # see the full replay, contiguous, no duplicates, then exactly one eof.
    n = 4000
    code = ("import time, sys\nfor i in range(%d):\n sys.stdout.write('%%d\\n' %% i)\n"
            " sys.stdout.flush()\n time.sleep(0.001)\n" % n)
    p = d.start(PY, ["-c", code])
    want = [str(i) for i in range(n)]
    rnd = random.Random(7)
    delays = sorted(rnd.uniform(0, 4.0) for _ in range(50))
    boxes = []
    t0 = time.monotonic()
    for k, delay in enumerate(delays):
        wait = delay - (time.monotonic() - t0)
        if wait > 0:
            time.sleep(wait)
        which = "stdout" if k % 2 else "output"
        boxes.append(harness.threaded(follow_lines, d, p["pid"], which, 90))
    for k, (t, box) in enumerate(boxes):
        t.join(slack(90))
        assert "value" in box, "follower %d: %r" % (k, box.get("error"))
        outs, eof = box["value"]
        got = [o["line"] for o in outs]
        if got != want:
            first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), n))
            raise AssertionError("follower %d (attached at %.2fs): %d lines, first "
                                 "divergence at %d: %r" % (k, delays[k], len(got), first,
                                                           got[first:first + 3]))
        assert eof.get("exit_code") == 0, eof


# ---- req 5: no line limit -------------------------------------------------------------------------

@harness.timeout(120)
def test_req05_64mib_without_newline(d):
    size = 64 << 20
    base = d.rss_kb()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            v = d.rss_kb()
            if v:
                peak[0] = max(peak[0], v)
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    total = 0
    chunks = 0
    try:
        with d.stream("POST", "/api/v1/processes/run", json_body={
                "command": "sh", "args": ["-c", "head -c %d /dev/zero | tr '\\0' a" % size]}) as s:
            assert s.status == 200, s.response
            exit_ev = None
            while True:
                ev = s.next_event(slack(30))
                if ev is None:
                    break
                o = ev.json
                assert isinstance(o, dict), ev
                if "line" in o:
                    ln = o["line"]
                    assert len(ln) <= 65536, "chunk of %d bytes" % len(ln)
                    assert ln.count("a") == len(ln), "unexpected bytes in the chunk"
                    total += len(ln)
                    chunks += 1
                elif harness.is_exit_obj(o):
                    exit_ev = o
            assert s.ended and not s.eof_abrupt
    finally:
        stop.set()
        th.join()
    assert total == size, "got %d of %d bytes" % (total, size)
    assert chunks >= size // 65536, chunks
    assert exit_ev and exit_ev.get("exit_code") == 0, exit_ev
    growth = (peak[0] - base) / 1024.0
    if harness.IS_ASAN:
        assert growth < 256, "daemon RSS grew %.0f MiB (ASan build)" % growth
    else:
        assert growth < 16, "daemon RSS grew %.1f MiB while streaming 64 MiB" % growth


# ---- req 6: truncation is visible -------------------------------------------------------------------

@harness.timeout(90)
def test_req06_truncation_visible():
    cap = 2 << 20
    nlines = (6 << 20) // 8           # 8 bytes per line ("%07d\n"): 6 MiB = 3x the cap
    total = nlines * 8
    with Daemon(args=["--max-output", str(cap)]) as dm:
        p = dm.start("seq", ["-f", "%07g", "1", str(nlines)])
        dm.wait_ended(p["pid"], 30)
        j = dm.output(p["pid"], "stdout")
        assert j.get("truncated") is True, "no truncated flag: %r" % {k: v for k, v in j.items()
                                                                     if k != "lines"}
        dropped = j.get("dropped_bytes")
        assert isinstance(dropped, int) and 0 < dropped < total, \
            "dropped_bytes %r for %d bytes written (must count output bytes)" % (dropped, total)
        lines = j["lines"]
        assert lines and lines[-1] == "%07d" % nlines, lines[-1:]
        first = int(lines[1])
        assert first > 1, "nothing was dropped from the front"
        assert lines[1:] == ["%07d" % k for k in range(first, nlines + 1)], "retained gap"
        assert ("%07d" % (first - 1)).endswith(lines[0]), "bad first retained line %r" % lines[0]
        retained = sum(len(x) + 1 for x in lines)
        assert retained <= cap + (1 << 20), "retained %d bytes over a %d cap" % (retained, cap)
        assert dropped + retained == total, \
            "dropped_bytes %d + retained %d != %d bytes written" % (dropped, retained, total)
        # A follower from the start gets one gap event first, then the same lines.
        outs, eof = follow_lines(dm, p["pid"], "stdout")
        gap = outs[0]
        assert gap.get("truncated") is True and gap.get("dropped_bytes") == dropped, gap
        assert "%d bytes of earlier output were dropped" % dropped in gap["line"], gap
        assert isinstance(gap.get("timestamp"), int), gap
        assert [o["line"] for o in outs[1:]] == lines, "follow differs from GET after the gap"
        assert sum(1 for o in outs if o.get("truncated")) == 1
        assert eof.get("exit_code") == 0
        # An untouched process says nothing about truncation.
        q = dm.start("echo", ["small"])
        dm.wait_ended(q["pid"])
        jq = dm.output(q["pid"], "stdout")
        assert not jq.get("truncated") and not jq.get("dropped_bytes"), jq


# ---- req 7 / 8: kill takes the whole tree -----------------------------------------------------------

PORT_HOLDER = r"""
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(5)
print("%d %d" % (__import__("os").getpid(), s.getsockname()[1]), flush=True)
while True: time.sleep(1)
"""


def test_req07_kill_tree_with_term_ignoring_grandchild(d):
    # The API's kill is SIGKILL to the tree (no graceful stop with a grace period).
    p = d.start("sh", ["-c", "trap 'echo term' TERM; python3 -c \"$0\" & wait; wait",
                       PORT_HOLDER])
    line = harness.wait_until(lambda: d.lines(p["pid"]), slack(10), what="port line")[0]
    gpid, port = map(int, line.split())
    refs = [ProcRef(p["pid"]), ProcRef(gpid)]
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    t = time.monotonic()
    assert d.kill_proc(p["pid"]).status == 204
    left = harness.wait_gone(refs, slack(2.5))
    assert not left, "survivors after kill: %r" % left
    i = check_process_info(d.wait_ended(p["pid"], 5))
    assert i["status"] == "signaled" and i["signal"] == 9, i
    assert time.monotonic() - t < 2 + slack(0.5)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        raise AssertionError("port %d still accepts after the kill" % port)
    except ConnectionRefusedError:
        pass


def test_req08_escapees_die_on_timeout(d):
    script = ("setsid sh -c 'echo $$; exec sleep 1000' & "
              "(setsid sh -c 'echo $$; exec sleep 1001' &) ; sleep 300")
    with d.stream("POST", "/api/v1/processes/run",
                  json_body={"command": "sh", "args": ["-c", script], "timeout": 1}) as s:
        events, _ = s.collect(slack(15))
        res = harness.RunResult(events, [], s).check_shape()
    assert res.exit.get("timed_out") is True, res.exit
    pids = [int(x) for x in res.lines()]
    assert len(pids) == 2, res.lines()
    left = harness.wait_gone(pids, slack(2))
    assert not left, "escapees survived the timeout: %r" % left


# ---- req 9: no zombies, no stolen statuses -------------------------------------------------------------

@harness.timeout(120)
def test_req09_no_zombies_no_stolen_statuses(d):
    # scaled: 150 orphan-making runs (not 1000) while 30 processes exit with distinct codes.
    managed = [(d.sh("sleep 0.%d; exit %d" % (k % 9 + 1, 10 + k))["pid"], 10 + k)
               for k in range(30)]
    errors = []

    def churn(n):
        for _ in range(n):
            try:
                r = d.run_sh("(sleep 0.1 &) &", timeout_s=30)
                if r.exit.get("exit_code") != 0:
                    errors.append(r.exit)
            except AssertionError as e:
                errors.append(str(e))
    ths = [threading.Thread(target=churn, args=(50,)) for _ in range(3)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(slack(100))
    assert not errors, errors[:3]
    for pid, code in managed:
        i = check_process_info(d.wait_ended(pid, 10))
        assert i["status"] == "exited" and i["exit_code"] == code, (code, i)
    time.sleep(2)
    assert not d.zombies(), "zombies 2 s later: %r" % d.zombies()
    harness.wait_until(lambda: not d.descendants(), slack(3), what="no leftover processes")


# ---- req 11: timeout enforced by the daemon -------------------------------------------------------------

def test_req11_timeout_precise(d):
    t = time.monotonic()
    res = d.run_sh("echo kept; sleep 30", timeout=2)
    el = time.monotonic() - t
    assert res.exit == dict(res.exit, exit_code=None, signal=9, timed_out=True), res.exit
    tol = 0.2 if not harness.IS_ASAN else 0.6
    assert abs(el - 2.0) <= tol + 0.1, "timeout fired at %.2fs, want 2 +- %.1f" % (el, tol)
    i = d.info(res.pid)
    assert abs((i["ended_at"] - i["started_at"]) / 1000.0 - 2.0) <= tol, i
    assert d.lines(res.pid) == ["kept"], "output lost on timeout"


def test_req11_disconnect_before_timeout(d):
    s = d.stream("POST", "/api/v1/processes/run",
                 json_body={"command": "sleep", "args": ["30"], "timeout": 2})
    pid = s.next_event(slack(5)).json["pid"]
    time.sleep(1)
    t = time.monotonic()
    s.close()
    assert not harness.wait_gone([pid], slack(1.5)), "process survived its client"
    assert time.monotonic() - t < 1.0 + slack(0.5)
    i = d.wait_ended(pid, 5)
    assert i["status"] == "signaled" and i["signal"] == 9, i


# ---- req 12 / 13: stalled and slow followers ---------------------------------------------------------------

WRITER = ("import sys\nl = 'x' * 990\nw = sys.stdout.write\n"
          "for i in range(20000): w('%08d ' % i + l + '\\n')\n")


def _runtime(info):
    return (info["ended_at"] - info["started_at"]) / 1000.0


@harness.timeout(120)
def test_req12_13_stalled_and_slow_followers(d):
    # scaled: 20 MB written as fast as possible, not 200 MB/s for minutes.
    base = d.warm_up()
    p0 = d.start(PY, ["-c", WRITER])
    baseline = _runtime(d.wait_ended(p0["pid"], 30))

    p = d.start("sh", ["-c", "sleep 0.5; exec python3 -c \"$0\"", WRITER])
    # A stalled client: tiny receive buffer, never reads.
    stalled = d.follow(p["pid"], "stdout", rcvbuf=4096)
    # A slow client: ~10 KB/s until the process ended.
    slow = d.follow(p["pid"], "stdout", rcvbuf=8192)
    got_slow = []
    slow_done = threading.Event()

    def slow_reader():
        while not slow_done.is_set():
            ev = slow.next(slack(30))
            if ev is None:
                return
            if not ev.is_comment and ev.name != "eof":
                got_slow.append(ev.json["line"][:8])
            time.sleep(0.1)
        while True:
            ev = slow.next(slack(30))
            if ev is None:
                return
            if not ev.is_comment and ev.name != "eof":
                got_slow.append(ev.json["line"][:8])
    ts, bs = harness.threaded(slow_reader)
    tn, bn = harness.threaded(follow_lines, d, p["pid"], "stdout", 60)
    i = d.wait_ended(p["pid"], 30)
    rt = _runtime(i)
    assert rt <= 3 * baseline + 1.0 + 0.5, \
        "child took %.2fs with slow followers vs %.2fs alone" % (rt, baseline)
    tn.join(slack(60))
    assert "value" in bn, bn.get("error")
    outs, _ = bn["value"]
    assert len(outs) == 20000 and [o["line"][:8] for o in outs] == ["%08d" % k for k in range(20000)]
    slow_done.set()
    ts.join(slack(60))
    assert "error" not in bs, bs.get("error")
    assert got_slow == ["%08d" % k for k in range(20000)], \
        "slow follower lost lines: %d received" % len(got_slow)
    assert d.get("/api/v1/health").status == 200
    slow.close()
    stalled.close()
    last = d.settle_fds(base, 2, 5)
    assert abs(last - base) <= 2, "daemon fds %d, baseline %d" % (last, base)


@harness.slow
@harness.timeout(120)
def test_req12_stalled_follower_dropped_by_write_deadline(d):
    d.warm_up()
    p = d.start(PY, ["-c", "import sys, time\nl = 'y' * 1000 + '\\n'\n"
                           "for i in range(60):\n sys.stdout.write(l * 1000); sys.stdout.flush();"
                           " time.sleep(1)\n"])
    time.sleep(0.5)
    base = d.fd_count()          # includes the running process's pipes
    stalled = d.follow(p["pid"], "stdout", rcvbuf=4096)
    try:
        harness.wait_until(lambda: d.fd_count() > base, slack(2), what="connection fd")
        # The daemon has a write deadline (30 s in the http layer); within ~45 s it must drop
        # the stalled connection on its own while the process keeps running.
        dropped = None
        t = time.monotonic()
        while time.monotonic() - t < 50:
            time.sleep(1)
            if d.fd_count() <= base:
                dropped = time.monotonic() - t
                break
        assert dropped is not None, "stalled follower still held after 50 s (fds %d, base %d)" \
            % (d.fd_count(), base)
        assert d.info(p["pid"])["status"] == "running"
        assert d.get("/api/v1/health").status == 200
    finally:
        stalled.close()
        d.kill_proc(p["pid"])


# ---- req 14: bounded daemon memory and disk --------------------------------------------------------------

def _disk_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


@harness.timeout(120)
def test_req14_bounded_memory_and_disk():
    # scaled: 4 writers for ~4 s with a 4 MiB/process, 12 MiB total budget (not 20 x yes for
    # 5 min); 4 clients poll GET output meanwhile. The OOM-hog part needs a memory cap the API
    # does not offer (see test_lifecycle.test_oom_killed).
    per, tot = 4 << 20, 12 << 20
    with Daemon(args=["--max-output", str(per), "--max-total-output", str(tot)]) as dm:
        base = dm.rss_kb()
        line = "z" * 100
        ps = [dm.start("yes", [line]) for _ in range(4)]
        peak = [base]
        disk_peak = [0]
        health_max = [0.0]
        stop = threading.Event()
        errs = []

        def poll(pid):
            while not stop.is_set():
                try:
                    j = dm.output(pid, "stdout")
                    assert j["line_count"] == len(j["lines"])
                except BaseException as e:  # noqa: B902
                    errs.append(e)
                    return

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], dm.rss_kb() or 0)
                disk_peak[0] = max(disk_peak[0], _disk_bytes(dm.state_dir))
                t = time.monotonic()
                if dm.get("/api/v1/health").status != 200:
                    errs.append("health failed")
                health_max[0] = max(health_max[0], time.monotonic() - t)
                time.sleep(0.1)
        ths = [threading.Thread(target=poll, args=(p["pid"],), daemon=True) for p in ps]
        ths.append(threading.Thread(target=sample, daemon=True))
        for t in ths:
            t.start()
        time.sleep(4)
        stop.set()
        for t in ths:
            t.join(slack(30))
        for p in ps:
            dm.kill_proc(p["pid"])
        assert not errs, errs[:3]
        growth = (peak[0] - base) / 1024.0
        limit = 64 if not harness.IS_ASAN else 512
        assert growth < limit, "daemon RSS grew %.0f MiB" % growth
        # Per process: up to one 1 MiB segment over its share before a drop, the write-behind
        # buffer, and the filesystem's block allocation slack.
        assert disk_peak[0] <= tot + 4 * (3 << 20), \
            "output logs used %.1f MiB on disk, budget %d MiB" % (disk_peak[0] / 2**20, tot >> 20)
        assert health_max[0] < slack(0.5), "health took %.2fs under load" % health_max[0]
        for p in ps:
            dm.wait_ended(p["pid"])
            j = dm.output(p["pid"], "stdout")
            assert j.get("truncated") is True and j.get("dropped_bytes", 0) > 0, \
                {k: v for k, v in j.items() if k != "lines"}
            # The last line may be cut where SIGKILL stopped the writer (a final partial line is
            # kept, by design); every other retained line must be whole.
            n = len(j["lines"])
            bad = [(i, x[:120]) for i, x in enumerate(j["lines"])
                   if 0 < i and x != line and not (i == n - 1 and line.startswith(x))]
            assert not bad, "corrupt retained lines (of %d): %r" % (len(j["lines"]), bad[:3])
            assert sum(len(x) + 1 for x in j["lines"]) <= per + (1 << 20)


# ---- req 15: no fd leaks ----------------------------------------------------------------------------------

@harness.timeout(150)
def test_req15_no_fd_leaks():
    # scaled: 200 short runs, 100 run streams and 100 follows cut mid-flight, 100 start
    # failures, 100 started-and-ended processes (not 10k/1k/1k).
    # The baseline is taken after a warm-up: a bounded pool of spare per-process resources
    # (the daemon keeps up to 40 spare cgroups, 5 fds each) is not a leak; growth past it is.
    with Daemon() as dm:
        base = dm.warm_up()
        for _ in range(200):
            dm.run("true")
        for _ in range(100):
            s = dm.stream("POST", "/api/v1/processes/run",
                          json_body={"command": "sh", "args": ["-c", "echo x; sleep 30"]})
            s.next_event(slack(5))
            s.close()
        holder = dm.start("sh", ["-c", "while :; do echo tick; sleep 0.01; done"])
        for _ in range(100):
            s = dm.follow(holder["pid"], "output")
            s.next_event(slack(5))
            s.close()
        dm.kill_proc(holder["pid"])
        for k in range(100):
            r = dm.post("/api/v1/processes", {"command": "no-such-cmd"} if k % 2 else
                        {"command": "true", "working_dir": "/no/such"})
            assert r.status == 400, r
        pids = [dm.start("true")["pid"] for _ in range(100)]
        for pid in pids:
            dm.wait_ended(pid)
        harness.wait_until(lambda: not dm.descendants(), slack(5), what="all children gone")
        last = dm.settle_fds(base, 2, 8)
        # Fewer is fine: pooled cgroup dirs (4 fds each) are dropped rather than reused once
        # a tree was killed in them. A leak shows as growth.
        assert last <= base + 2, \
            "daemon fd count %d after the churn, baseline %d:\n%s" % (
                last, base, "\n".join(sorted(set(dm.fds().values())))[:1500])
        assert not dm.zombies()


# ---- req 22: no phantom states ----------------------------------------------------------------------------

@harness.timeout(90)
def test_req22_kill_vs_exit_races(d):
    # scaled: 200 races, not 1000.
    with d.conn() as c:
        pids = []
        for k in range(200):
            r = c.request("POST", "/api/v1/processes",
                          json_body={"command": "sh", "args": ["-c", "exit %d" % (k % 3)]})
            assert r.status == 201, r
            pid = r.json()["pid"]
            r = c.request("DELETE", "/api/v1/processes/%d" % pid)
            assert r.status == 204, "DELETE racing exit: %r" % r
            pids.append((pid, k % 3))
    time.sleep(0.5)
    for pid, code in pids:
        i = check_process_info(d.wait_ended(pid, 5))
        assert (i["status"], i["exit_code"], i["signal"]) in (
            ("exited", code, None), ("signaled", None, 9)), i
    assert not [p for p in d.list() if p["status"] == "running"]


@harness.timeout(90)
def test_req22_emfile_at_spawn():
    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    with Daemon(preexec_fn=low_nofile) as dm, dm.conn(timeout_s=10) as c:
        ok, failure = [], None
        for _ in range(200):
            r = c.request("POST", "/api/v1/processes",
                          json_body={"command": "sleep", "args": ["300"]})
            if r.status != 201:
                failure = r
                break
            ok.append(r.json()["pid"])
        if failure is None:
            raise harness.Skip("200 processes started under RLIMIT_NOFILE 48: no EMFILE")
        assert failure.status in (500, 429), failure
        assert_error(failure, failure.status,
                     "SPAWN_FAILED" if failure.status == 500 else "TOO_MANY_PROCESSES")
        r = c.request("GET", "/api/v1/processes")
        assert r.status == 200
        listed = [p for p in r.json()["processes"] if p["status"] == "running"]
        assert sorted(p["pid"] for p in listed) == sorted(ok), "phantom record after EMFILE"
        kids = {s["pid"] for s in harness.children_of(dm.pid) if s["state"] != "Z"}
        assert kids <= set(ok), "a failed spawn left a process: %r" % (kids - set(ok))
        for pid in ok:
            assert c.request("DELETE", "/api/v1/processes/%d" % pid).status == 204
        time.sleep(0.5)
        r = c.request("POST", "/api/v1/processes", json_body={"command": "echo", "args": ["ok"]})
        assert r.status == 201, "no recovery after EMFILE: %r" % r
        assert c.request("GET", "/api/v1/health").status == 200


# ---- req 26: log injection --------------------------------------------------------------------------------

def test_req26_log_lines_escaped():
    with Daemon(verbose=True) as dm:
        evil = "x\n[INFO] fake entry \x1b[31mred\x1b[0m"
        dm.post("/api/v1/processes", {"command": evil})
        dm.post("/api/v1/processes", {"command": "true", "working_dir": evil})
        res = dm.run("echo", [evil])
        assert res.lines() == ["x", "[INFO] fake entry \x1b[31mred\x1b[0m"], res.lines()
        dm.get("/api/v1/" + "%0A%5BINFO%5D%20fake%20path")
        time.sleep(0.2)
        log = dm.stderr_text()
        bad = [ln for ln in log.splitlines() if ln.startswith("[INFO] fake")]
        assert not bad, "forged log line: %r" % bad
        assert "\x1b" not in log, "raw escape sequence in the daemon log"


# ---- req 27: limits hold under abuse ------------------------------------------------------------------------

@harness.timeout(120)
def test_req27_many_streams_and_slowloris():
    # scaled: 300 follow connections and 100 slowloris connections, not 10k.
    with Daemon() as dm:
        base = dm.warm_up()
        p = dm.start("sh", ["-c", "while :; do echo t; sleep 0.2; done"])
        worst = 0.0
        follows = []
        for k in range(300):
            follows.append(dm.follow(p["pid"], "stdout"))
            if k % 25 == 0:
                t = time.monotonic()
                assert dm.get("/api/v1/health").status == 200
                worst = max(worst, time.monotonic() - t)
        lorises = []
        for _ in range(100):
            s = socket.create_connection((dm.host, dm.port), timeout=5)
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
            lorises.append(s)
        for _ in range(20):
            t = time.monotonic()
            assert dm.get("/api/v1/health").status == 200
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.05)
        # Every follower still gets live lines.
        for f in follows[::30]:
            ev = f.next_event(slack(5))
            assert ev is not None and ev.json.get("line") == "t", ev
        assert worst < slack(0.1) + 0.05, "health took %.3fs under 400 idle connections" % worst
        for f in follows:
            f.close()
        for s in lorises:
            s.close()
        dm.kill_proc(p["pid"])
        dm.wait_ended(p["pid"])
        last = dm.settle_fds(base, 2, 8)
        assert last <= base + 2, "fds %d after closing everything, baseline %d" % (last, base)
