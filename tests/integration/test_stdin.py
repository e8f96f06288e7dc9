"""stdin: closed by default, pipe mode writes/close, error codes, queueing (req 17)."""

import hashlib
import os
import time

import harness
from harness import assert_error, check_process_info, slack

DAEMON = {}


def stdin(d, pid, data):
    return d.request("POST", "/api/v1/processes/%d/stdin" % pid, body=data)


def close(d, pid):
    return d.request("POST", "/api/v1/processes/%d/stdin/close" % pid)


def test_default_stdin_closed_cat_exits(d):
    t = time.monotonic()
    p = d.start("cat")
    assert p["stdin_writable"] is False, p
    i = check_process_info(d.wait_ended(p["pid"], 3))
    assert i["status"] == "exited" and i["exit_code"] == 0, i
    assert time.monotonic() - t < slack(2)


def test_pipe_write_then_close(d):
    p = d.start("cat", stdin_mode="pipe")
    assert p["stdin_writable"] is True, p
    r = stdin(d, p["pid"], b"a\n")
    assert r.status == 204 and r.body == b"", r
    harness.wait_until(lambda: d.lines(p["pid"]) == ["a"], slack(3), what="echoed line")
    assert d.info(p["pid"])["status"] == "running"
    assert d.info(p["pid"])["stdin_writable"] is True
    r = close(d, p["pid"])
    assert r.status == 204, r
    i = check_process_info(d.wait_ended(p["pid"], 3))
    assert i["status"] == "exited" and i["exit_code"] == 0 and i["stdin_writable"] is False, i
    assert d.lines(p["pid"]) == ["a"]


def test_stdin_writable_false_after_close(d):
    p = d.start("sleep", ["30"], stdin_mode="pipe")
    assert close(d, p["pid"]).status == 204
    assert d.info(p["pid"])["stdin_writable"] is False
    assert_error(stdin(d, p["pid"], b"x"), 400, "STDIN_NOT_WRITABLE")
    assert close(d, p["pid"]).status == 204, "closing twice is a no-op"
    d.kill_proc(p["pid"])


def test_ordered_chunks(d):
    p = d.start("cat", stdin_mode="pipe")
    for i in range(200):
        assert stdin(d, p["pid"], b"%d\n" % i).status == 204
    assert close(d, p["pid"]).status == 204
    d.wait_ended(p["pid"])
    assert d.lines(p["pid"]) == [str(i) for i in range(200)]


def test_partial_lines_joined(d):
    p = d.start("cat", stdin_mode="pipe")
    for part in (b"hel", b"lo wo", b"rld\nsec", b"ond"):
        assert stdin(d, p["pid"], part).status == 204
    close(d, p["pid"])
    d.wait_ended(p["pid"])
    assert d.lines(p["pid"]) == ["hello world", "second"]


def test_binary_stdin_exact(d):
    data = os.urandom(1 << 20)
    p = d.start("sha256sum", stdin_mode="pipe")
    for off in range(0, len(data), 256 << 10):
        r = stdin(d, p["pid"], data[off:off + (256 << 10)])
        assert r.status == 204, r
    assert close(d, p["pid"]).status == 204
    d.wait_ended(p["pid"])
    assert d.lines(p["pid"])[0].split()[0] == hashlib.sha256(data).hexdigest()


def test_one_mib_body_accepted(d):
    data = b"z" * (1 << 20)
    p = d.start("wc", ["-c"], stdin_mode="pipe")
    r = stdin(d, p["pid"], data)
    assert r.status == 204, "a body of exactly 1 MiB: %r" % r
    close(d, p["pid"])
    d.wait_ended(p["pid"])
    assert d.lines(p["pid"]) == [str(1 << 20)]


def test_write_closed_mode(d):
    p = d.start("sleep", ["30"])
    assert_error(stdin(d, p["pid"], b"x"), 400, "STDIN_NOT_WRITABLE")
    assert_error(close(d, p["pid"]), 400, "STDIN_NOT_PIPE")
    d.kill_proc(p["pid"])


def test_write_after_exit(d):
    p = d.start("sh", ["-c", "exit 0"], stdin_mode="pipe")
    i = d.wait_ended(p["pid"])
    assert i["stdin_writable"] is False, i
    t = time.monotonic()
    assert_error(stdin(d, p["pid"], b"late\n"), 400, "STDIN_NOT_WRITABLE")
    assert time.monotonic() - t < slack(2)


def test_unknown_pid(d):
    assert_error(stdin(d, 999999999, b"x"), 404, "NOT_FOUND")
    assert_error(close(d, 999999999), 404, "NOT_FOUND")


def test_writes_never_block_and_cap(d):
    # The child never reads: writes are queued (204 at once) until more than 1 MiB waits,
    # then 409 STDIN_BUFFER_FULL; the process and the daemon are unaffected.
    p = d.start("sleep", ["300"], stdin_mode="pipe")
    chunk = b"q" * (256 << 10)
    statuses = []
    for _ in range(12):
        t = time.monotonic()
        r = stdin(d, p["pid"], chunk)
        assert time.monotonic() - t < slack(1), "a stdin write blocked"
        statuses.append(r.status)
        if r.status != 204:
            assert_error(r, 409, "STDIN_BUFFER_FULL")
            break
    assert 409 in statuses, "never reported a full buffer: %r" % statuses
    accepted = statuses.count(204) * len(chunk)
    assert (1 << 20) <= accepted <= (1 << 20) + (1 << 20), \
        "accepted %d bytes before 409" % accepted
    assert d.get("/api/v1/health").status == 200
    assert d.info(p["pid"])["stdin_writable"] is True
    d.kill_proc(p["pid"])


def test_queued_bytes_delivered_before_close(d):
    # Close after a large queued write: the child still gets every byte, then EOF.
    data = os.urandom(900 << 10)
    p = d.start("sh", ["-c", "sleep 0.5; sha256sum"], stdin_mode="pipe")
    assert stdin(d, p["pid"], data).status == 204
    assert close(d, p["pid"]).status == 204
    i = d.wait_ended(p["pid"], 10)
    assert i["exit_code"] == 0, i
    assert d.lines(p["pid"])[0].split()[0] == hashlib.sha256(data).hexdigest()


def test_child_exit_with_unread_stdin(d):
    p = d.start("sh", ["-c", "sleep 0.3; exit 4"], stdin_mode="pipe")
    assert stdin(d, p["pid"], b"x" * (512 << 10)).status == 204
    i = d.wait_ended(p["pid"], 5)
    assert i["status"] == "exited" and i["exit_code"] == 4, i
    assert d.get("/api/v1/health").status == 200


def test_stdin_interactive_roundtrip(d):
    p = d.start("sh", ["-c", "while read l; do echo \"got:$l\"; done; echo bye"],
                stdin_mode="pipe")
    for i in range(5):
        assert stdin(d, p["pid"], b"m%d\n" % i).status == 204
        harness.wait_until(lambda: len(d.lines(p["pid"])) == i + 1, slack(3),
                           what="reply %d" % i)
    close(d, p["pid"])
    d.wait_ended(p["pid"])
    assert d.lines(p["pid"]) == ["got:m%d" % i for i in range(5)] + ["bye"]
