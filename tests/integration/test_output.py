"""Captured output: GET stdout/stderr/output, the follow streams (replay then live), line
splitting, long lines, UTF-8 handling, keepalive."""

import hashlib
import os
import tempfile
import time

import harness
from harness import ProcRef, assert_error, slack

DAEMON = {}

CHUNK = 64 * 1024
PY = "python3"


def follow_all(d, pid, which="output", timeout_s=30):
    """Reads a whole follow stream and checks its contract; returns (outputs, eof_data)."""
    with d.follow(pid, which) as s:
        assert s.status == 200, (s.status, s.response)
        assert s.headers.get("content-type", "").startswith("text/event-stream"), s.headers
        events, _ = s.collect(slack(timeout_s))
        assert s.ended and not s.eof_abrupt, "follow stream not properly terminated"
    bad = [e for e in events if not isinstance(e.json, dict)]
    assert not bad, "non-JSON data on follow stream: %r" % bad[:3]
    eofs = [e for e in events if e.name == "eof"]
    assert len(eofs) == 1 and events[-1] is eofs[0], \
        "want exactly one final eof event, got %r" % events[-3:]
    outs = [e.json for e in events[:-1]]
    for o in outs:
        assert isinstance(o.get("line"), str), o
        assert isinstance(o.get("timestamp"), int) and o["timestamp"] > 1e12, o
        assert o.get("stream") in ("stdout", "stderr"), o
    return outs, eofs[0].json


def lines_of(outs):
    return [o["line"] for o in outs]


def ended(d, script, **kw):
    p = d.sh(script, **kw)
    d.wait_ended(p["pid"])
    return p["pid"]


# ---- GET ------------------------------------------------------------------------------------------

def test_get_output_shapes(d):
    pid = ended(d, "echo o1; sleep 0.05; echo e1 >&2; sleep 0.05; echo o2")
    for which, want in (("stdout", ["o1", "o2"]), ("stderr", ["e1"]),
                        ("output", ["o1", "e1", "o2"])):
        j = d.output(pid, which)
        assert j.get("pid") == pid, j
        assert j["lines"] == want, (which, j)
        assert j["line_count"] == len(want), (which, j)


def test_small_logs_in_memory_big_ones_on_disk(d):
    """A command that prints little leaves no file in the state dir (its log stays in the
    daemon's memory, 16 KiB at most); one that prints more gets its file. Both read back
    whole, live (follow) and after the end (GET)."""
    out_dir = os.path.join(d.state_dir, "out")
    before = set(os.listdir(out_dir))
    small = ended(d, "for i in $(seq 1 50); do echo small-$i; done")
    assert set(os.listdir(out_dir)) == before, sorted(set(os.listdir(out_dir)) - before)
    assert d.lines(small) == ["small-%d" % i for i in range(1, 51)]
    outs, eof = follow_all(d, small, "stdout")
    assert lines_of(outs) == ["small-%d" % i for i in range(1, 51)] and eof.get("exit_code") == 0

    big = ended(d, "seq 1 5000")  # 23,893 bytes: past the 16 KiB kept in memory
    assert len(set(os.listdir(out_dir)) - before) == 1, sorted(os.listdir(out_dir))
    assert d.lines(big) == [str(i) for i in range(1, 5001)]
    outs, _ = follow_all(d, big, "stdout")
    assert lines_of(outs) == [str(i) for i in range(1, 5001)]


def test_line_splitting(d):
    pid = ended(d, r"printf 'a\r\nb\n\nc\r\r\nlast'")
    assert d.lines(pid) == ["a", "b", "", "c\r", "last"], d.lines(pid)


def test_lone_cr_kept(d):
    pid = ended(d, r"printf 'x\ry\n'")
    assert d.lines(pid) == ["x\ry"], d.lines(pid)


def test_get_while_running(d):
    p = d.sh("echo early; sleep 30")
    harness.wait_until(lambda: d.lines(p["pid"]) == ["early"], slack(5), what="early line")
    d.kill_proc(p["pid"])


def test_get_unknown_pid_404(d):
    for which in ("stdout", "stderr", "output"):
        assert_error(d.get("/api/v1/processes/999999999/%s" % which), 404, "NOT_FOUND")
        with d.follow(999999999, which) as s:
            assert s.response is not None, "follow of an unknown pid gave a stream"
            assert_error(s.response, 404, "NOT_FOUND")


# ---- follow -----------------------------------------------------------------------------------------

def test_follow_after_exit_replays_and_ends(d):
    pid = ended(d, "echo a; echo b >&2; echo c; exit 6")
    outs, eof = follow_all(d, pid, "output", timeout_s=5)
    assert sorted(lines_of(outs)) == ["a", "b", "c"], outs
    assert [o["line"] for o in outs if o["stream"] == "stdout"] == ["a", "c"], outs
    assert eof.get("exit_code") == 6 and eof.get("signal") is None, eof


def test_follow_eof_reports_signal(d):
    p = d.start("sleep", ["30"])
    d.kill_proc(p["pid"])
    d.wait_ended(p["pid"])
    _, eof = follow_all(d, p["pid"], "stdout", timeout_s=5)
    assert eof.get("signal") == 9 and eof.get("exit_code") is None, eof


def test_follow_filters_streams(d):
    pid = ended(d, "echo o1; echo e1 >&2; echo o2; echo e2 >&2")
    outs, _ = follow_all(d, pid, "stdout")
    assert lines_of(outs) == ["o1", "o2"], outs
    assert all(o["stream"] == "stdout" for o in outs)
    outs, _ = follow_all(d, pid, "stderr")
    assert lines_of(outs) == ["e1", "e2"], outs
    assert all(o["stream"] == "stderr" for o in outs)


def test_follow_live(d):
    p = d.sh("echo 1; sleep 1.5; echo 2; sleep 1.5; echo 3")
    with d.follow(p["pid"], "stdout") as s:
        t0 = time.monotonic()
        e1 = s.next_event(slack(5))
        assert e1.json["line"] == "1", e1
        assert time.monotonic() - t0 < 1.4, "first line came late: the stream is not live"
        e2 = s.next_event(slack(5))
        assert e2.json["line"] == "2", e2
        t2 = time.monotonic()
        e3 = s.next_event(slack(5))
        assert e3.json["line"] == "3", e3
        assert time.monotonic() - t2 > 1.0, "line 3 before it was printed?"
        eof = s.next_event(slack(5))
        assert eof.name == "eof" and eof.json.get("exit_code") == 0, eof
        assert s.next(slack(3)) is None and s.ended and not s.eof_abrupt


def test_follow_replay_then_live_no_gap(d):
    code = "import time\nfor i in range(3000):\n print(i, flush=True)\n time.sleep(0.001)\n"
    p = d.start(PY, ["-c", code])
    results = []
    for delay in (0.0, 0.3, 1.0, 2.0):
        time.sleep(delay)
        results.append(harness.threaded(follow_all, d, p["pid"], "stdout", 60))
    for t, box in results:
        t.join(slack(60))
        assert "value" in box, box.get("error")
        outs, eof = box["value"]
        got = lines_of(outs)
        assert got == [str(i) for i in range(3000)], \
            "gap/dup: %d lines, first diff at %r" % (len(got), next(
                (k for k, (a, b) in enumerate(zip(got, map(str, range(3000)))) if a != b), None))
        assert eof.get("exit_code") == 0, eof


def test_follow_replay_timestamps_are_real(d):
    p = d.sh("echo a; sleep 0.3; echo b")
    live, _ = follow_all(d, p["pid"], "stdout")
    replay, _ = follow_all(d, p["pid"], "stdout")
    assert [o["timestamp"] for o in live] == [o["timestamp"] for o in replay], (live, replay)
    assert replay[1]["timestamp"] - replay[0]["timestamp"] >= 250, replay
    info = d.info(p["pid"])
    assert info["started_at"] - 50 <= replay[0]["timestamp"] <= info["ended_at"] + 50, \
        (info, replay)


def test_follow_connection_reusable_after_eof(d):
    pid = ended(d, "echo x")
    s = d.follow(pid, "stdout")
    try:
        s.collect(slack(5))
        assert s.ended and not s.eof_abrupt
        r = s.conn.request("GET", "/api/v1/health")
        assert r.status == 200 and r.json() == {"healthy": True}, r
    finally:
        s.close()


def test_follow_discarded_stream_is_empty(d):
    pid = ended(d, "echo o; echo e >&2", stdout_mode="discard")
    outs, eof = follow_all(d, pid, "stdout")
    assert outs == [] and eof.get("exit_code") == 0, outs
    outs, _ = follow_all(d, pid, "output")
    assert lines_of(outs) == ["e"], outs


def test_many_followers_same_output(d):
    p = d.sh("for i in $(seq 1 300); do echo line-$i; echo err-$i >&2; done; sleep 0.5")
    boxes = [harness.threaded(follow_all, d, p["pid"], w, 30)
             for w in ("output", "stdout", "stderr") * 4]
    want_out = ["line-%d" % i for i in range(1, 301)]
    want_err = ["err-%d" % i for i in range(1, 301)]
    for n, (t, box) in enumerate(boxes):
        t.join(slack(30))
        assert "value" in box, box.get("error")
        outs, _ = box["value"]
        w = ("output", "stdout", "stderr")[n % 3]
        if w == "stdout":
            assert lines_of(outs) == want_out
        elif w == "stderr":
            assert lines_of(outs) == want_err
        else:
            assert [o["line"] for o in outs if o["stream"] == "stdout"] == want_out
            assert [o["line"] for o in outs if o["stream"] == "stderr"] == want_err


# ---- long lines ------------------------------------------------------------------------------------

def _emit(d, text, newline=True):
    """Starts a python child writing text (UTF-8) and waits for it."""
    fd, path = tempfile.mkstemp(prefix="sbx-out-")
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        if newline:
            f.write(b"\n")
    try:
        p = d.start("cat", [path])
        d.wait_ended(p["pid"])
    finally:
        os.unlink(path)
    return p["pid"]


def _check_chunks(chunks, text):
    assert "".join(chunks) == text, "chunks do not join to the line (%d vs %d chars)" % (
        len("".join(chunks)), len(text))
    for c in chunks:
        assert len(c.encode("utf-8")) <= CHUNK, "chunk of %d bytes" % len(c.encode("utf-8"))
        assert "\ufffd" not in c, "a character was cut"


def test_long_line_chunked(d):
    text = "".join(chr(ord("a") + i % 26) for i in range(200000))
    pid = _emit(d, text + "\n" + "tail")
    outs, _ = follow_all(d, pid, "stdout")
    chunks = lines_of(outs)
    assert chunks[-1] == "tail", chunks[-1][:50]
    _check_chunks(chunks[:-1], text)
    assert len(chunks) - 1 == 4, "200000 bytes should be 4 chunks, got %d" % (len(chunks) - 1)
    got = d.lines(pid)
    assert "".join(got[:-1]) == text and got[-1] == "tail"


def test_line_of_exactly_64k_is_one_event(d):
    text = "x" * CHUNK
    pid = _emit(d, text)
    outs, _ = follow_all(d, pid, "stdout")
    assert lines_of(outs) == [text], [len(o["line"]) for o in outs]
    text = "y" * (CHUNK + 1)
    pid = _emit(d, text)
    outs, _ = follow_all(d, pid, "stdout")
    assert [len(x) for x in lines_of(outs)] == [CHUNK, 1], [len(o["line"]) for o in outs]


def test_long_multibyte_line_cut_at_char_boundary(d):
    text = "a" + "😀" * 20000 + "é" * 40000
    pid = _emit(d, text)
    outs, _ = follow_all(d, pid, "stdout")
    _check_chunks(lines_of(outs), text)


def test_long_line_in_run_stream(d):
    res = d.run(PY, ["-c", "import sys; sys.stdout.write('z' * 150000)"])
    _check_chunks(res.lines(), "z" * 150000)
    assert res.exit["exit_code"] == 0


# ---- encoding ---------------------------------------------------------------------------------------

def test_invalid_utf8_replaced(d):
    pid = _emit(d, b"\xff\xfeabc\nnext\n\xc3(\n", newline=False)
    for lines in (d.lines(pid), lines_of(follow_all(d, pid, "stdout")[0])):
        assert len(lines) == 3, lines
        assert "\ufffd" in lines[0] and lines[0].replace("\ufffd", "") == "abc", lines
        assert lines[1] == "next", lines
        assert lines[2].replace("\ufffd", "") == "(" and "\ufffd" in lines[2], lines


def test_utf8_split_across_writes(d):
    res = d.run_sh(r"printf '\342\202'; sleep 0.4; printf '\254 euro\n'")
    assert res.lines() == ["€ euro"], res.lines()


def test_utf8_passthrough(d):
    s = "ünïcödé 😀 中文 \u200b tab\there"
    res = d.run("printf", ["%s\\n", s])
    assert res.lines() == [s], res.lines()


def test_binary_output_keeps_framing(d):
    fd, path = tempfile.mkstemp(prefix="sbx-bin-")
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1 << 20))
    try:
        res = d.run_sh("cat %s; echo; echo marker-after" % path, timeout_s=60)
        assert res.exit["exit_code"] == 0, res.exit
        assert res.lines()[-1] == "marker-after", res.lines()[-3:]
        for o in res.outputs:
            assert len(o["line"].encode("utf-8", "surrogatepass")) <= 3 * CHUNK, len(o["line"])
    finally:
        os.unlink(path)


def test_base64_random_bytes_survive(d):
    data = os.urandom(4 << 20)
    fd, path = tempfile.mkstemp(prefix="sbx-b64-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        res = d.run("base64", [path], timeout_s=60)
        import base64
        got = base64.b64decode("".join(res.lines()))
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), \
            "4 MiB round trip differs (%d bytes back)" % len(got)
    finally:
        os.unlink(path)


def test_sse_injection_is_data(d):
    res = d.run("printf", ["x\\n\\nevent: exit\\ndata: {\"exit_code\":0}\\n\\n: c\\ny\\n"])
    assert res.lines() == ["x", "", "event: exit", 'data: {"exit_code":0}', "", ": c", "y"], \
        res.lines()
    assert len(res.exits) == 1 and res.comments == [], (res.exits, res.comments)


# ---- keepalive (slow) ---------------------------------------------------------------------------------

@harness.slow
@harness.timeout(60)
def test_keepalive_comments(d):
    p = d.start("sleep", ["40"])

    def watch(stream):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 17.5:
            ev = stream.next(20)
            if ev is None:
                return ("ended", time.monotonic() - t0)
            if ev.is_comment:
                return (ev.comment, time.monotonic() - t0)
        return (None, time.monotonic() - t0)

    f = d.follow(p["pid"], "output", timeout_s=30)
    r = d.stream("POST", "/api/v1/processes/run",
                 json_body={"command": "sleep", "args": ["30"]}, timeout_s=30)
    try:
        assert r.next_event(5).json.get("pid"), "no started event"
        tf, bf = harness.threaded(watch, f)
        tr, br = harness.threaded(watch, r)
        tf.join(25)
        tr.join(25)
        for name, box in (("follow", bf), ("run", br)):
            assert "value" in box, (name, box.get("error"))
            comment, at = box["value"]
            assert comment is not None and "keepalive" in comment, \
                "%s: no keepalive comment within %.1fs (got %r)" % (name, at, comment)
            assert 10 <= at <= 16.5, "%s: keepalive after %.1fs, want ~15s" % (name, at)
        assert ProcRef(p["pid"]).alive()
    finally:
        f.close()
        r.close()
        d.kill_proc(p["pid"])


# ---- when stream bytes leave -----------------------------------------------------------------------

def test_stream_head_of_silent_process_not_held(d):
    """The head of a stream waits a few ms for company (the first chunk, or the end), never
    for output that does not come."""
    p = d.start("sleep", ["30"])
    try:
        t0 = time.monotonic()
        with d.follow(p["pid"]) as s:
            took = time.monotonic() - t0
            assert s.status == 200, (s.status, s.response)
            assert took < slack(0.5), "head of a silent stream held %.3f s" % took
    finally:
        d.kill_proc(p["pid"])


def test_short_run_answered_in_one_piece(d):
    """A command that ends at once gets its head, its events and the end of the body in one
    write: the first read of the answer already holds the terminating chunk. Timing-dependent
    (the command must end within the head's few ms), so one whole answer in ten suffices; the
    old behaviour (head written at spawn) never gives one."""
    body = b'{"command":"true"}'
    whole = 0
    for _ in range(10):
        with d.conn(slack(10)) as c:
            c.send(c.build_request("POST", "/api/v1/processes/run", body,
                                   [("Accept", "text/event-stream"),
                                    ("Content-Type", "application/json")], d.token, None))
            first = c.read_some(1 << 20, time.monotonic() + slack(10))
            rest = bytearray(first)
            while not rest.endswith(b"0\r\n\r\n"):
                rest += c.read_some(1 << 20, time.monotonic() + slack(10))
            assert b'"exit_code":0' in rest, rest
            whole += first.endswith(b"0\r\n\r\n")
    assert whole >= 1, "no short run arrived in one piece"
