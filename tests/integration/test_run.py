"""POST /api/v1/processes/run: the SSE run stream (spec §5.2, decisions "Run")."""

import os
import time

import harness
from harness import ProcRef, assert_error, check_process_info, find_in_list, slack

DAEMON = {}


def test_run_echo_stream_shape(d):
    t0 = harness.now_ms()
    with d.stream("POST", "/api/v1/processes/run",
                  json_body={"command": "echo", "args": ["hello"]}) as s:
        assert s.status == 200, (s.status, s.response)
        assert s.headers.get("content-type", "").startswith("text/event-stream"), s.headers
        events, comments = s.collect(slack(10))
        res = harness.RunResult(events, comments, s).check_shape()
    st = res.started
    assert isinstance(st["pid"], int) and st["pid"] > 0, st
    assert isinstance(st["handle"], int) and st["handle"] >= 1, st
    assert isinstance(st["started_at"], int) and abs(st["started_at"] - t0) < 5000, st
    assert res.outputs == [dict(res.outputs[0], line="hello", stream="stdout")], res.outputs
    ts = res.outputs[0]["timestamp"]
    assert st["started_at"] - 1000 <= ts <= harness.now_ms() + 1000, (st, ts)
    assert res.exit.get("exit_code") == 0 and res.exit.get("signal") is None, res.exit


def test_run_exit_code(d):
    res = d.run_sh("echo before; exit 3")
    assert res.lines() == ["before"]
    assert res.exit["exit_code"] == 3 and res.exit.get("signal") is None, res.exit
    assert not res.exit.get("timed_out"), res.exit


def test_run_signal_death(d):
    res = d.run_sh("echo x; kill -SEGV $$")
    assert res.exit.get("signal") == 11 and res.exit.get("exit_code") is None, res.exit
    i = check_process_info(d.info(res.pid))
    assert i["status"] == "signaled" and i["signal"] == 11 and i["exit_code"] is None, i


def test_run_stderr_tagged(d):
    res = d.run_sh("echo out; sleep 0.1; echo err >&2; sleep 0.1; echo out2")
    assert [(o["stream"], o["line"]) for o in res.outputs] == \
        [("stdout", "out"), ("stderr", "err"), ("stdout", "out2")], res.outputs
    assert res.lines("stderr") == ["err"]


def test_run_timestamps_monotonic(d):
    res = d.run_sh("for i in 1 2 3 4 5; do echo $i; sleep 0.05; done")
    ts = [o["timestamp"] for o in res.outputs]
    assert len(ts) == 5 and ts == sorted(ts), ts
    assert ts[-1] - ts[0] >= 150, "timestamps are not capture times: %r" % ts
    assert ts[0] >= res.started["started_at"] - 50, (ts, res.started)


def test_run_many_lines_in_order(d):
    res = d.run("seq", ["1", "20000"])
    lines = res.lines()
    assert len(lines) == 20000 and lines[0] == "1" and lines[-1] == "20000", len(lines)
    assert lines == [str(i) for i in range(1, 20001)]
    assert res.exit["exit_code"] == 0


def test_run_partial_last_line_and_cr(d):
    res = d.run("printf", ["a\\r\\nb\\n\\nc"])
    assert res.lines() == ["a", "b", "", "c"], res.lines()


def test_run_no_output(d):
    res = d.run("true")
    assert res.outputs == [] and res.exit["exit_code"] == 0, res.events


def test_run_stdin_forced_closed(d):
    # stdin_mode in the body is ignored: cat reads /dev/null and ends at once.
    t = time.monotonic()
    res = d.run("cat", stdin_mode="pipe", timeout_s=slack(5))
    assert res.exit["exit_code"] == 0, res.exit
    assert time.monotonic() - t < slack(3)


def test_run_output_modes_forced_capture(d):
    res = d.run_sh("echo o; echo e >&2", stdout_mode="discard", stderr_mode="discard")
    assert sorted(res.lines()) == ["e", "o"], res.lines()


def test_run_env_cwd_args(d):
    res = d.run("sh", ["-c", 'echo "$X"; pwd', "ignored"], env={"X": "y z"}, working_dir="/tmp")
    assert res.lines() == ["y z", "/tmp"], res.lines()


def test_run_user(d):
    if os.getuid() != 0:
        raise harness.Skip("needs root")
    res = d.run("id", ["-u"], user="nobody")
    assert res.lines() == ["65534"], res.lines()


def test_run_record_listed(d):
    res = d.run_sh("echo listed; exit 5")
    mine = find_in_list(d.list(), res.pid)
    assert len(mine) == 1, mine
    i = check_process_info(mine[0])
    assert i["status"] == "exited" and i["exit_code"] == 5, i
    assert i["handle"] == res.started["handle"], (i, res.started)
    assert d.lines(res.pid) == ["listed"]


def test_run_timeout(d):
    t = time.monotonic()
    res = d.run_sh("echo started; sleep 30", timeout=1)
    el = time.monotonic() - t
    assert res.exit.get("signal") == 9 and res.exit.get("exit_code") is None, res.exit
    assert res.exit.get("timed_out") is True, res.exit
    assert 0.8 <= el <= 1 + slack(0.7), "timeout fired after %.2fs" % el
    assert res.lines() == ["started"], "output before the timeout lost: %r" % res.lines()
    i = check_process_info(d.info(res.pid))
    assert i["status"] == "signaled" and i["signal"] == 9, i


def test_run_fractional_timeout(d):
    t = time.monotonic()
    res = d.run("sleep", ["30"], timeout=0.5)
    el = time.monotonic() - t
    assert res.exit.get("timed_out") is True and res.exit.get("signal") == 9, res.exit
    assert 0.35 <= el <= 0.5 + slack(0.7), el


def test_run_timeout_not_hit(d):
    res = d.run_sh("sleep 0.2; echo done", timeout=5)
    assert res.exit["exit_code"] == 0 and not res.exit.get("timed_out"), res.exit
    assert res.lines() == ["done"]


def test_run_timeout_zero_is_none(d):
    res = d.run_sh("sleep 1.2; echo survived", timeout=0)
    assert res.exit["exit_code"] == 0, res.exit
    assert res.lines() == ["survived"]


def test_run_timeout_kills_tree(d):
    with d.stream("POST", "/api/v1/processes/run", json_body={
            "command": "sh", "args": ["-c", "sleep 300 & echo $!; sh -c 'sleep 301 & echo $!; wait' & wait"],
            "timeout": 1.5}) as s:
        events, _ = s.collect(slack(10))
        res = harness.RunResult(events, [], s).check_shape()
    assert res.exit.get("timed_out") is True, res.exit
    pids = [int(x) for x in res.lines()]
    assert len(pids) == 2, res.lines()
    # Pids are captured after the fact, so check the whole tree is gone by name too.
    left = harness.wait_gone([res.pid] + pids, slack(1.0))
    assert not left, "tree survived the timeout: %r" % left


def test_run_spawn_failure_is_json(d):
    before = len(d.list())
    with d.stream("POST", "/api/v1/processes/run",
                  json_body={"command": "no-such-command-xyz"}) as s:
        assert s.response is not None, "spawn failure answered with an SSE stream"
        assert_error(s.response, 400, "COMMAND_NOT_FOUND")
    with d.stream("POST", "/api/v1/processes/run",
                  json_body={"command": "true", "working_dir": "/no/such/dir"}) as s:
        assert s.response is not None
        assert_error(s.response, 400, "WORKING_DIR_NOT_FOUND")
    assert len(d.list()) == before, "failed run left a record"


def test_run_invalid_timeout(d):
    for bad in (-1, "5", [1], {"s": 1}):
        r = d.post("/api/v1/processes/run", {"command": "true", "timeout": bad})
        assert_error(r, 422, "INVALID_REQUEST")


def test_run_missing_command(d):
    assert_error(d.post("/api/v1/processes/run", {"args": ["x"]}), 422, "INVALID_REQUEST")
    assert_error(d.post("/api/v1/processes/run", body=b"{nope",
                        headers={"Content-Type": "application/json"}), 400, "INVALID_JSON")


def test_run_client_disconnect_kills_tree(d):
    s = d.stream("POST", "/api/v1/processes/run", json_body={
        "command": "sh", "args": ["-c", "sleep 300 & echo $!; sleep 300"]})
    first = s.next_event(slack(5))
    pid = first.json["pid"]
    line = s.next_event(slack(5))
    child = int(line.json["line"])
    refs = [ProcRef(pid), ProcRef(child)]
    assert all(r.alive() for r in refs), refs
    s.close()
    left = harness.wait_gone(refs, slack(2.5))
    assert not left, "run processes survived the client's disconnect: %r" % left
    i = d.wait_ended(pid, 5)
    assert i["status"] == "signaled" and i["signal"] == 9, i


def test_run_stream_closes_after_exit(d):
    # The run stream ends (terminating chunk) right after the exit event.
    with d.stream("POST", "/api/v1/processes/run", json_body={"command": "true"}) as s:
        t = time.monotonic()
        events, _ = s.collect(slack(5))
        assert s.ended and not s.eof_abrupt
        assert time.monotonic() - t < slack(2)
        assert harness.is_exit_obj(events[-1].json), events


def test_run_concurrent(d):
    boxes = []
    for i in range(8):
        boxes.append(harness.threaded(d.run_sh, "seq 1 2000; exit %d" % i))
    for i, (t, box) in enumerate(boxes):
        t.join(slack(30))
        assert "value" in box, box.get("error")
        res = box["value"]
        assert res.exit["exit_code"] == i, res.exit
        assert res.lines() == [str(n) for n in range(1, 2001)]


def test_run_grandchild_holding_pipe(d):
    # Exit is reported at most ~2 s after the leader ends even if a grandchild keeps stdout.
    t = time.monotonic()
    res = d.run_sh("sleep 600 & echo hi; exit 0", timeout_s=slack(10))
    el = time.monotonic() - t
    assert res.exit["exit_code"] == 0, res.exit
    assert res.lines() == ["hi"], res.lines()
    assert el < 2 + slack(1), "exit reported after %.2fs" % el


# ---- back-pressure: the run's own answer paces the child ------------------------------------------

# 64 MiB of numbered 1000-byte lines, as fast as the pipe takes them.
BIG_WRITER = ("import sys\nw = sys.stdout.write\nl = 'p' * 991 + '\\n'\n"
              "for i in range(65536): w('%08d ' % i + l)\n")


def _read_run_lines(s, first, timeout_s):
    """Reads a run stream to its end; checks every numbered line from `first` on; returns the
    exit event."""
    k = first
    deadline = time.monotonic() + slack(timeout_s)
    while True:
        ev = s.next_event(max(0.01, deadline - time.monotonic()))
        assert ev is not None, "run stream ended without an exit event after line %d" % k
        o = ev.json
        if "line" in o:
            assert o["line"][:8] == "%08d" % k, (k, o["line"][:20])
            k += 1
        elif harness.is_exit_obj(o):
            assert k == 65536, "%d lines of 65536" % k
            assert s.next(slack(5)) is None, "events after the exit event"
            return o


@harness.timeout(120)
def test_run_stream_paces_the_child(d):
    """A run client that reads slowly keeps the child blocked in write(2) a few MiB ahead of
    it, as a terminal would, instead of the child racing ahead into the log (decisions:
    "Back-pressure"). Alone, the child writes its 64 MiB in well under a second."""
    with d.stream("POST", "/api/v1/processes/run", timeout_s=30, rcvbuf=65536,
                  json_body={"command": "python3", "args": ["-c", BIG_WRITER]}) as s:
        pid = s.next_event(slack(10)).json["pid"]
        k = 0
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:      # ~1.6 MB/s for 2 s
            for _ in range(16):
                o = s.next_event(slack(10)).json
                assert o["line"][:8] == "%08d" % k, (k, o)
                k += 1
            time.sleep(0.01)
        assert k < 8000, "the slow reader read %d lines" % k
        i = d.info(pid)
        assert i["status"] == "running", "child ran ahead of its run client: %r" % i
        ex = _read_run_lines(s, k, 60)
    assert ex.get("exit_code") == 0, ex


@harness.timeout(120)
def test_run_stream_stalled_client_does_not_stop_the_child(d):
    """A run client that stops reading holds the child for at most about a second: then the
    child runs to its end, and the client, reading again, still gets every line."""
    with d.stream("POST", "/api/v1/processes/run", timeout_s=30, rcvbuf=4096,
                  json_body={"command": "python3", "args": ["-c", BIG_WRITER]}) as s:
        pid = s.next_event(slack(10)).json["pid"]
        i = d.wait_ended(pid, 15)
        assert i["status"] == "exited" and i["exit_code"] == 0, i
        ex = _read_run_lines(s, 0, 60)
    assert ex.get("exit_code") == 0, ex
