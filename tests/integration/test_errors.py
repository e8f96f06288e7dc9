"""Bad input and limits: JSON errors, validation, spawn failures without records, routing,
malformed HTTP, body/header limits, slow headers (decisions.md "Errors")."""

import json
import os
import shutil
import socket
import tempfile
import time

import harness
from harness import Daemon, assert_error, slack, wait_until

DAEMON = {}

START = "/api/v1/processes"


def count(d):
    return len(d.list()), d.get("/api/v1/info").json()["total_processes"]


def raw(d, data, timeout_s=5, check_close=True):
    """Sends raw bytes on a new connection; returns (response or None, closed_after)."""
    c = d.conn(timeout_s)
    try:
        c.send(data)
        try:
            r = c.read_response(timeout_s=slack(timeout_s))
        except harness.ConnectionClosed:
            return None, True
        return r, (c.is_closed(slack(2)) if check_close else None)
    finally:
        c.close()


# ---- JSON / validation ------------------------------------------------------------------------------

def test_malformed_json(d):
    before = count(d)
    for body in (b"{", b"{\"command\": }", b"not json", b"{\"command\":\"true\"", b"\xff\xfe",
                 b"{\"command\":\"true\"} trailing"):
        r = d.request("POST", START, body=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400, "INVALID_JSON")
    r = d.request("POST", START, body=b"", headers={"Content-Type": "application/json"})
    assert r.status in (400, 422), r
    assert_error(r, r.status)
    assert count(d) == before, "a bad request created a record"


def test_json_not_object(d):
    # Valid JSON that is not an object is a validation error (422), not a parse error.
    wrong = []
    for body in (b"[]", b'"x"', b"1", b"null", b"true", b'["true"]'):
        r = d.request("POST", START, body=body, headers={"Content-Type": "application/json"})
        if r.status != 422 or r.json().get("code") != "INVALID_REQUEST":
            wrong.append("%s -> %d %s" % (body.decode(), r.status, r.json().get("code")))
    assert not wrong, "want 422 INVALID_REQUEST: " + "; ".join(wrong)


def test_field_validation(d):
    before = count(d)
    bad = [
        {},
        {"args": ["x"]},
        {"command": 123},
        {"command": None},
        {"command": ["echo"]},
        {"command": "echo", "args": "x"},
        {"command": "echo", "args": [1]},
        {"command": "echo", "args": [None]},
        {"command": "echo", "env": ["A=1"]},
        {"command": "echo", "env": {"A": 1}},
        {"command": "echo", "env": "A=1"},
        {"command": "echo", "working_dir": 5},
        {"command": "echo", "stdin_mode": "bogus"},
        {"command": "echo", "stdin_mode": 1},
        {"command": "echo", "stdout_mode": "bogus"},
        {"command": "echo", "stderr_mode": "file"},
        {"command": "echo", "user": 1000},
        {"command": "echo", "user": {}},
        {"command": "echo", "user": {"name": "nobody", "uid": 65534}},
        {"command": "echo", "user": {"uid": "x"}},
        {"command": "echo", "user": {"uid": -5}},
        {"command": "echo", "user": ["nobody"]},
    ]
    for body in bad:
        r = d.post(START, body)
        assert r.status == 422, "%r: expected 422, got %d %s" % (body, r.status, r.text[:200])
        assert_error(r, 422, "INVALID_REQUEST")
    assert count(d) == before, "a rejected request created a record"


def test_empty_command_or_user_rejected(d):
    before = count(d)
    for body in ({"command": ""}, {"command": "true", "user": ""}):
        r = d.post(START, body)
        assert r.status in (400, 422), (body, r)
        assert_error(r, r.status)
    assert count(d) == before


def test_unknown_fields_ignored(d):
    r = d.post(START, {"command": "true", "bogus": 1, "nested": {"a": [1]}, "timeout_ms": 5})
    assert r.status == 201, r


def test_utf8_escapes_in_json(d):
    r = d.post(START, {"command": "echo", "args": ["\u00e9\ud83d\ude00\\n\u0001"]})
    assert r.status == 201, r
    pid = r.json()["pid"]
    d.wait_ended(pid)
    assert d.lines(pid) == ["\u00e9\U0001F600\\n\u0001"], d.lines(pid)


def test_nul_in_strings_rejected(d):
    before = count(d)
    for body in ({"command": "ech\u0000o"}, {"command": "echo", "args": ["a\u0000b"]},
                 {"command": "echo", "env": {"A\u0000": "1"}}):
        r = d.post(START, body)
        assert 400 <= r.status < 500, "%r: %d" % (body, r.status)
        assert_error(r, r.status)
    assert count(d) == before


# ---- spawn failures -----------------------------------------------------------------------------------

def test_command_not_found(d):
    before = count(d)
    assert_error(d.post(START, {"command": "no-such-command-xyz"}), 400, "COMMAND_NOT_FOUND")
    assert_error(d.post(START, {"command": "/no/such/binary"}), 400, "COMMAND_NOT_FOUND")
    assert count(d) == before


def test_command_not_executable(d):
    tmp = tempfile.mkdtemp(prefix="sbx-err-")
    try:
        path = os.path.join(tmp, "notexec")
        with open(path, "w") as f:
            f.write("#!/bin/sh\necho hi\n")
        os.chmod(path, 0o644)
        before = count(d)
        assert_error(d.post(START, {"command": path}), 400, "PERMISSION_DENIED")
        assert_error(d.post(START, {"command": tmp}), 400)
        assert count(d) == before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def not_a_program(tmp):
    """A file in tmp, executable by its mode but neither ELF nor "#!"."""
    path = os.path.join(tmp, "garbage")
    with open(path, "wb") as f:
        f.write(b"\x00\x01\x02 not a program\n")
    os.chmod(path, 0o755)
    return path


def test_exec_format_error(d):
    # Executable by its mode but neither ELF nor "#!": only execve itself can say so (in the
    # child, after the parent's checks passed). 400, no record, nothing left behind.
    tmp = tempfile.mkdtemp(prefix="sbx-err-")
    try:
        path = not_a_program(tmp)
        before = count(d)
        kids = set(d.descendants())
        for route in (START, "/api/v1/processes/run"):
            j = assert_error(d.post(route, {"command": path}), 400, "EXEC_FORMAT_ERROR")
            assert "Exec format error" in j["error"], j
        assert count(d) == before
        time.sleep(0.2)
        assert not d.zombies(), "zombies after failed execs: %r" % d.zombies()
        assert set(d.descendants()) - kids == set(), "failed execs left processes"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_concurrent_starts_failed_and_good(d):
    # Starts in flight at once (the daemon does not wait for each exec): every good one gets
    # its record and its own exit code, every failed exec its 400 and no record.
    tmp = tempfile.mkdtemp(prefix="sbx-err-")
    try:
        bad = not_a_program(tmp)
        before = count(d)

        def worker(k):
            out = []
            for i in range(10):
                if (k + i) % 3 == 0:
                    r = d.post(START, {"command": bad})
                    out.append(("bad", r.status, r.json().get("code")))
                else:
                    code = (k * 10 + i) % 100
                    r = d.post(START, {"command": "sh", "args": ["-c", "exit %d" % code]})
                    out.append(("good", r.status, code, r.json().get("pid")))
            return out
        boxes = [harness.threaded(worker, k) for k in range(12)]
        results = []
        for t, box in boxes:
            t.join(slack(60))
            assert "value" in box, box.get("error")
            results += box["value"]
        goods = [x for x in results if x[0] == "good"]
        assert all(x[1] == 201 for x in goods), [x for x in goods if x[1] != 201][:5]
        bads = [x for x in results if x[0] == "bad"]
        assert all(x[1] == 400 and x[2] == "EXEC_FORMAT_ERROR" for x in bads), bads[:5]
        for _, _, code, pid in goods:
            info = d.wait_ended(pid)
            assert info["exit_code"] == code, (code, info)
        assert count(d)[1] == before[1] + len(goods)
        assert len({x[3] for x in goods}) == len(goods), "two starts answered with one pid"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_client_gone_while_starting(d):
    # The connection closes right after the request is sent, so the start may still be
    # waiting for its exec: the daemon stays well and nothing is left behind. A run is
    # request-scoped (its tree is killed when its client goes, decisions.md), a start is not.
    before = count(d)[1]
    token = d.token if d.token is not None else d.env_token
    for route, n in (("/api/v1/processes/run", 10), (START, 10)):
        body = json.dumps({"command": "sh", "args": ["-c", "sleep 0.3; exit 7"]})
        # Something else live, so the starts do not wait for their exec in the loop.
        bg = d.post(START, {"command": "sleep", "args": ["5"]}).json()
        for _ in range(n):
            c = d.conn()
            c.send(c.build_request("POST", route, body, {"Content-Type": "application/json"},
                                   token))
            c.close()
        wait_until(lambda: count(d)[1] >= before + n + 1, slack(10), what="records")
        for p in d.list()[-n:]:
            info = d.wait_ended(p["pid"], timeout_s=slack(10))
            if route == START:
                assert info["exit_code"] == 7, info
            else:
                assert info["exit_code"] == 7 or info["signal"] == 9, info
        d.delete("/api/v1/processes/%d" % bg["pid"])
        before = count(d)[1]
    assert d.get("/api/v1/health").status == 200
    time.sleep(0.2)
    assert not d.zombies(), d.zombies()


def test_working_dir_missing(d):
    before = count(d)
    assert_error(d.post(START, {"command": "true", "working_dir": "/no/such/dir"}),
                 400, "WORKING_DIR_NOT_FOUND")
    assert_error(d.post(START, {"command": "true", "working_dir": "/etc/passwd"}),
                 400, "WORKING_DIR_NOT_FOUND")
    assert count(d) == before


def test_unknown_user(d):
    before = count(d)
    for u in ("no-such-user-xyz", {"name": "no-such-user-xyz"}):
        assert_error(d.post(START, {"command": "true", "user": u}), 400, "USER_NOT_FOUND")
    assert count(d) == before


def test_failed_start_leaves_no_process(d):
    before = set(d.descendants())
    for _ in range(20):
        d.post(START, {"command": "true", "working_dir": "/no/such/dir"})
        d.post(START, {"command": "no-such-command-xyz"})
    time.sleep(0.2)
    assert not d.zombies(), "zombies after failed spawns: %r" % d.zombies()
    assert set(d.descendants()) - before == set(), "failed spawns left processes"


def test_user_switch_without_root():
    if os.getuid() != 0:
        raise harness.Skip("needs root to start the daemon as nobody")
    tmp = tempfile.mkdtemp(prefix="sbx-nobody-")
    try:
        os.chmod(tmp, 0o755)
        binary = os.path.join(tmp, "sandboxd")
        shutil.copy(harness.DAEMON_PATH, binary)
        os.chmod(binary, 0o755)
        sd = os.path.join(tmp, "state")
        os.mkdir(sd)
        os.chown(sd, 65534, 65534)

        def drop():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        with Daemon(binary=binary, state_dir=sd, preexec_fn=drop, env={"HOME": "/tmp"}) as dm:
            n = len(dm.list())
            assert_error(dm.post(START, {"command": "true", "user": "root"}), 403,
                         "PERMISSION_DENIED")
            assert_error(dm.post(START, {"command": "true", "user": "0:0"}), 403,
                         "PERMISSION_DENIED")
            assert len(dm.list()) == n
            p = dm.start("id", ["-u"])
            dm.wait_ended(p["pid"])
            assert dm.lines(p["pid"]) == ["65534"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- routing ----------------------------------------------------------------------------------------------

def test_unknown_routes(d):
    for path in ("/", "/api/v1", "/api/v1/nope", "/api/v2/health", "/api/v1/processes/1/bogus",
                 "/api/v1/processes/1/stdout/follow/x", "/api/v1/healthz"):
        assert_error(d.get(path), 404, "NOT_FOUND")


def test_wrong_methods(d):
    for method, path in (("POST", "/api/v1/health"), ("DELETE", "/api/v1/info"),
                         ("PUT", "/api/v1/processes"), ("DELETE", "/api/v1/processes"),
                         ("GET", "/api/v1/processes/1/signal"),
                         ("GET", "/api/v1/processes/1/stdin"),
                         ("POST", "/api/v1/processes/1/stdout"),
                         ("PATCH", "/api/v1/processes/1")):
        r = d.request(method, path, body=b"" if method in ("POST", "PUT", "PATCH") else None)
        assert_error(r, 405, "METHOD_NOT_ALLOWED")


def test_unknown_pid_everywhere(d):
    for pid in ("999999999", "0", "2147483648", "99999999999999999999999", "abc", "-1", "1.5"):
        base = "/api/v1/processes/" + pid
        assert_error(d.get(base), 404, "NOT_FOUND")
        assert_error(d.delete(base), 404, "NOT_FOUND")
        assert_error(d.post(base + "/signal", {"signal": 15}), 404, "NOT_FOUND")
        assert_error(d.request("POST", base + "/stdin", body=b"x"), 404, "NOT_FOUND")
        assert_error(d.request("POST", base + "/stdin/close"), 404, "NOT_FOUND")
        for w in ("stdout", "stderr", "output"):
            assert_error(d.get(base + "/" + w), 404, "NOT_FOUND")
            assert_error(d.get(base + "/" + w + "/follow"), 404, "NOT_FOUND")


def test_query_string_and_trailing_slash(d):
    r = d.get("/api/v1/health?x=1")
    assert r.status == 200 and r.json() == {"healthy": True}, r
    p = d.start("true")
    assert d.get("/api/v1/processes/%d?verbose=1" % p["pid"]).status == 200


def test_percent_encoded_path(d):
    p = d.start("true")
    r = d.get("/api/v1/%70rocesses/" + str(p["pid"]))
    assert r.status == 200 and r.json()["pid"] == p["pid"], r
    r = d.get("/api/v1/processes/%zz")
    assert r.status in (400, 404), "bad escape answered %d" % r.status
    assert_error(r, r.status)


# ---- HTTP layer ------------------------------------------------------------------------------------------

def test_malformed_http_400_and_close(d):
    for data in (b"GARBAGE\r\n\r\n", b"GET /api/v1/health HTTP/9.9\r\nHost: x\r\n\r\n",
                 b"GET /api/v1/health HTTP/1.1\r\nBad Header Line\r\n\r\n",
                 b"POST /api/v1/processes HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        r, closed = raw(d, data)
        if r is not None:
            assert r.status in (400, 505), (data, r)
            assert closed, "connection left open after malformed request %r" % data
    assert d.get("/api/v1/health").status == 200


def test_body_too_large_413(d):
    before = count(d)
    big = b'{"command":"true","args":["' + b"a" * (1 << 20) + b'"]}'
    r, closed = raw(d, b"POST /api/v1/processes HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    if r is not None:
        assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert closed, "connection not closed after 413"
    assert count(d) == before


def test_body_too_large_announced(d):
    # Content-Length alone decides: answer without waiting for the body.
    c = d.conn()
    try:
        t = time.monotonic()
        c.send(b"POST /api/v1/processes/1/stdin HTTP/1.1\r\nHost: x\r\n"
               b"Content-Length: 104857600\r\n\r\n" + b"x" * 1000)
        r = c.read_response(timeout_s=slack(5))
        assert_error(r, 413, "PAYLOAD_TOO_LARGE")
        assert time.monotonic() - t < slack(2)
        assert c.is_closed(slack(2)), "connection not closed after 413"
    finally:
        c.close()


def test_chunked_body_too_large(d):
    c = d.conn()
    try:
        c.send(b"POST /api/v1/processes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/json\r\n\r\n")
        piece = b"a" * 65536
        got = None
        try:
            for _ in range(40):
                c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            pass
        try:
            got = c.read_response(timeout_s=slack(5))
        except (harness.ConnectionClosed, harness.Timeout):
            got = None
        if got is not None:
            assert_error(got, 413, "PAYLOAD_TOO_LARGE")
    finally:
        c.close()
    assert d.get("/api/v1/health").status == 200


def test_chunked_request_body_accepted(d):
    body = b'{"command":"echo","args":["chunked"]}'
    c = d.conn()
    try:
        c.send(b"POST /api/v1/processes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/json\r\n\r\n"
               + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n0\r\n\r\n"
               % (len(body) - 10, body[10:]))
        r = c.read_response(timeout_s=slack(5))
    finally:
        c.close()
    assert r.status == 201, r
    d.wait_ended(r.json()["pid"])
    assert d.lines(r.json()["pid"]) == ["chunked"]


def test_too_many_headers_431(d):
    hdrs = b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    r, closed = raw(d, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + hdrs + b"\r\n")
    if r is not None:
        assert_error(r, 431)
    assert closed, "connection not closed after too many headers"


def test_header_section_too_large_431(d):
    r, closed = raw(d, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 +
                    b"\r\n\r\n")
    if r is not None:
        assert_error(r, 431)
    assert closed, "connection not closed after a 20 KB header"


def test_headers_within_limits_ok(d):
    hdrs = b"".join(b"X-H%d: v\r\n" % i for i in range(40))
    r, _ = raw(d, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Mid: " + b"m" * 8000 +
               b"\r\n" + hdrs + b"\r\n", check_close=False)
    assert r is not None and r.status == 200, r


@harness.timeout(40)
def test_slow_headers_closed(d):
    s = socket.create_connection((d.host, d.port), timeout=20)
    try:
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        t = time.monotonic()
        closed_at = None
        s.settimeout(0.5)
        while time.monotonic() - t < 10 + slack(4):
            # Health on other connections stays fast meanwhile.
            t1 = time.monotonic()
            assert d.get("/api/v1/health").status == 200
            assert time.monotonic() - t1 < slack(0.5)
            try:
                s.sendall(b"X-Drip: 1\r\n")
                data = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                closed_at = time.monotonic() - t
                break
            closed_at = time.monotonic() - t
            assert data == b"" or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 4"), data
            break
        assert closed_at is not None, "slow header connection still open after %.0fs" \
            % (10 + slack(4))
        assert closed_at >= 8, "closed after %.1fs, before the 10 s header timeout" % closed_at
    finally:
        s.close()


def test_error_bodies_are_json_everywhere(d):
    for r in (d.get("/nope"), d.request("PUT", "/api/v1/processes", body=b""),
              d.get("/api/v1/processes/999999999"),
              d.request("POST", START, body=b"{", headers={"Content-Type": "application/json"})):
        j = assert_error(r, r.status)
        assert isinstance(j.get("code"), str) and j["code"].isupper(), j
