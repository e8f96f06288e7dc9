"""Blaxel dialect (/process...): what the SDK cannot reach. Request validation (400/422 with
JSON bodies), identifiers and names, answer shapes and types, the NDJSON exec stream and the
text logs/stream at the byte level, waitForPorts edge cases, restarts, keepAlive, and one
process table shared with the Tensorlake dialect.

Expectations: shared/spec/blaxel-process-api.md, README.md "Compatibility notes (Blaxel)"
(where sandboxd deliberately differs from Blaxel's Go server), docs/decisions.md."""

import calendar
import email.utils
import json
import os
import re
import shutil
import socket
import tempfile
import time

import harness
from harness import Daemon, ProcRef, assert_error, slack, wait_until

DAEMON = {}

STATUSES = ("running", "completed", "failed", "stopped", "killed")
RFC1123 = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
                     r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                     r"\d{2}:\d{2}:\d{2} GMT$")
NO_SUCH_PID = "2147483000"
NDJSON_ACCEPT = {"Accept": "text/event-stream"}
_seq = [0]


def uname(base):
    _seq[0] += 1
    return "%s-%d-%d" % (base, os.getpid(), _seq[0])


# ---- helpers -------------------------------------------------------------------------------

def assert_json(r, status=200):
    assert r.status == status, "expected %d, got %d %s" % (status, r.status, r.text[:300])
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/json"), \
        "answer %d has Content-Type %r, want application/json" % (r.status, ctype)
    return r.json()


def rfc1123_ms(v, label):
    assert isinstance(v, str) and RFC1123.match(v), "%s is not RFC 1123 GMT: %r" % (label, v)
    t = calendar.timegm(email.utils.parsedate(v)) * 1000
    assert abs(t - harness.now_ms()) < 120000, "%s is not now-ish: %r" % (label, v)
    return t


def check_response(j, label="response"):
    """ProcessResponse shape and types (spec §2; README: strings, never null)."""
    assert isinstance(j, dict), "%s is not an object: %r" % (label, j)
    assert isinstance(j.get("pid"), str) and re.match(r"^[1-9]\d*$", j["pid"]), \
        "%s.pid is not a decimal string: %r" % (label, j.get("pid"))
    for k in ("name", "command", "workingDir", "stdout", "stderr", "logs", "startedAt",
              "completedAt"):
        assert isinstance(j.get(k), str), "%s.%s is not a string: %r" % (label, k, j)
    for k in ("exitCode", "maxRestarts", "restartCount"):
        assert isinstance(j.get(k), int) and not isinstance(j[k], bool), \
            "%s.%s is not an int: %r" % (label, k, j)
    for k in ("restartOnFailure", "keepAlive"):
        assert isinstance(j.get(k), bool), "%s.%s is not a bool: %r" % (label, k, j)
    assert j["status"] in STATUSES, "%s.status: %r" % (label, j["status"])
    started = rfc1123_ms(j["startedAt"], label + ".startedAt")
    if j["status"] == "running":
        assert j["completedAt"] == "", "%s: completedAt while running: %r" % (label, j)
        assert j["exitCode"] == 0, "%s: exitCode while running: %r" % (label, j)
    else:
        assert rfc1123_ms(j["completedAt"], label + ".completedAt") >= started, j
    assert j["logs"] == j["stdout"] + j["stderr"], "%s: logs != stdout + stderr: %r" % (label, j)
    return j


def bl_start(d, command, **fields):
    body = dict(fields)
    body["command"] = command
    r = d.post("/process", body, timeout_s=30)
    return check_response(assert_json(r, 200), "POST %r" % (body,))


def bl_get(d, ident):
    return check_response(assert_json(d.get("/process/%s" % ident), 200), "GET %s" % ident)


def bl_logs(d, ident):
    j = assert_json(d.get("/process/%s/logs" % ident), 200)
    assert set(j) >= {"stdout", "stderr", "logs"}, j
    for k in ("stdout", "stderr", "logs"):
        assert isinstance(j[k], str), j
    assert j["logs"] == j["stdout"] + j["stderr"], j
    return j


def bl_list(d):
    j = assert_json(d.get("/process"), 200)
    assert isinstance(j, list), j
    return j


def bl_settled(d, ident, timeout_s=10):
    last = {}

    def done():
        last["j"] = bl_get(d, ident)
        return last["j"] if last["j"]["status"] != "running" else None
    try:
        return wait_until(done, slack(timeout_s), 0.03, "process %s to end" % ident)
    except harness.Timeout:
        raise harness.Timeout("process %s still running: %r" % (ident, last.get("j")))


def wait_stdout(d, ident, pred, timeout_s=5):
    def ok():
        out = bl_logs(d, ident)["stdout"]
        return out if pred(out) else None
    return wait_until(ok, slack(timeout_s), 0.03, "stdout of %s" % ident)


def count_procs(d):
    return len(bl_list(d))


def free_port():
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def can_connect(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def need_python():
    if shutil.which("python3") is None:
        raise harness.Skip("python3 not installed")


class BodyStream:
    """A response read incrementally, line by line (for the chunked text and NDJSON streams).
    If the answer is not a 200 the whole body is read and kept as .response."""

    def __init__(self, d, method, path, json_body=None, headers=None, timeout_s=10):
        self.conn = d.conn(timeout_s)
        c = self.conn
        c.send(c.build_request(method, path, json_body=json_body, headers=headers))
        deadline = time.monotonic() + slack(timeout_s)
        self.status, reason, self.headers, raw = c.read_head(deadline)
        self.response = None
        self.ended = False
        self.raw = bytearray()
        self._buf = bytearray()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if self.status != 200:
            body = c.read_body(method, self.status, self.headers, deadline)
            self.response = harness.Response(self.status, reason, self.headers, body, raw)
            self.ended = True
            return
        assert self.chunked, "stream answer is not chunked: %r" % self.headers
        self._reader = harness.ChunkedReader(c)

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def next_line(self, timeout_s=10):
        """(line bytes without '\\n', monotonic arrival time), or None at the end of the body."""
        deadline = time.monotonic() + slack(timeout_s)
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                return line, time.monotonic()
            if self.ended:
                return None
            data = self._reader.read_some(deadline)
            if data is None:
                self.ended = True
                continue
            self.raw += data
            self._buf += data

    def collect(self, timeout_s=30):
        """Every remaining line and the unterminated tail; asserts the body ended properly."""
        deadline = time.monotonic() + slack(timeout_s)
        out = []
        while True:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise harness.Timeout("stream did not end within %.1fs (%d lines so far: %r)"
                                      % (timeout_s, len(out), out[-3:]))
            got = self.next_line(rem / max(harness.TIME_SCALE, 1))
            if got is None:
                return out, bytes(self._buf)
            out.append(got)


def logs_stream(d, ident, timeout_s=10):
    return BodyStream(d, "GET", "/process/%s/logs/stream" % ident, timeout_s=timeout_s)


def text_lines(d, ident, timeout_s=15):
    """The whole logs/stream body as a list of str lines; asserts the contract."""
    with logs_stream(d, ident, timeout_s) as s:
        assert s.status == 200, (s.status, s.response)
        assert s.headers.get("content-type", "").startswith("text/plain"), s.headers
        lines, tail = s.collect(timeout_s)
        assert tail == b"", "logs/stream body does not end with a newline: %r" % tail
    return [ln.decode("utf-8", "replace") for ln, _ in lines]


def ndjson_exec(d, body, timeout_s=20):
    """POST /process as the SDK's streaming exec does; returns (events, result, response)."""
    r = d.post("/process", body, headers=NDJSON_ACCEPT, timeout_s=timeout_s)
    assert r.status == 200, "streaming exec: %d %s" % (r.status, r.text[:300])
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/x-ndjson"), "streaming exec Content-Type %r" % ctype
    assert "chunked" in r.headers.get("transfer-encoding", "").lower(), r.headers
    raw = r.body.decode("utf-8")
    assert raw.endswith("\n"), "NDJSON body does not end with a newline: %r" % raw[-200:]
    lines = raw[:-1].split("\n")
    assert all(ln.strip() for ln in lines), "blank line in NDJSON: %r" % raw[:500]
    events = []
    for ln in lines:
        try:
            events.append(json.loads(ln))
        except ValueError:
            raise AssertionError("NDJSON line is not JSON: %r" % ln)
    assert all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in events), events
    results = [e for e in events if e["type"] == "result"]
    assert len(results) == 1, "want exactly one result event, got %d: %r" % (len(results), events)
    assert events[-1] is results[0], "result is not the last event: %r" % events[-3:]
    assert isinstance(results[0].get("data"), str), \
        "result.data must be a JSON *string*: %r" % results[0]
    result = check_response(json.loads(results[0]["data"]), "NDJSON result")
    return events, result, r


def ndjson_text(events, typ):
    return "".join(e["data"] for e in events if e["type"] == typ)


# ---- request validation --------------------------------------------------------------------

def test_bad_json_400(d):
    before = count_procs(d)
    for body in (b"{not json", b"", b'{"command": "true"', b"\xff\xfe{}", b"{'command': 'x'}"):
        for hdrs in ({"Content-Type": "application/json"},
                     {"Content-Type": "application/json", "Accept": "text/event-stream"}):
            r = d.request("POST", "/process", body=body, headers=hdrs)
            assert_error(r, 400)
    assert count_procs(d) == before, "a refused request left a record"


def test_body_not_an_object_400(d):
    # Spec §2: invalid JSON, an empty body or a wrong JSON type is 400 "invalid request body".
    for body in (b"[]", b'["echo hi"]', b'"echo hi"', b"42"):
        r = d.request("POST", "/process", body=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400)


def test_wrong_field_types_400(d):
    before = count_procs(d)
    cases = [
        {"command": 5}, {"command": ["echo", "hi"]}, {"command": None, "name": "x"},
        {"command": "true", "name": 5},
        {"command": "true", "workingDir": 1},
        {"command": "true", "env": "A=1"}, {"command": "true", "env": {"A": 1}},
        {"command": "true", "env": ["A=1"]},
        {"command": "true", "waitForCompletion": "yes"},
        {"command": "true", "restartOnFailure": 1},
        {"command": "true", "keepAlive": "true"},
        {"command": "true", "timeout": "5"},
        {"command": "true", "restartOnFailure": True, "maxRestarts": 1.5},
        {"command": "true", "restartOnFailure": True, "maxRestarts": "2"},
        {"command": "true", "waitForPorts": 8080}, {"command": "true", "waitForPorts": ["8080"]},
        {"command": "true", "waitForPorts": [0]}, {"command": "true", "waitForPorts": [70000]},
    ]
    for body in cases:
        j = assert_error(d.post("/process", body), 400)
        assert j["error"], body
        assert_error(d.post("/process", body, headers=NDJSON_ACCEPT), 400)
    assert count_procs(d) == before, "a refused request left a record"


def test_missing_command_400(d):
    for body in ({}, {"command": ""}, {"name": uname("nocmd")}, {"command": None}):
        j = assert_error(d.post("/process", body), 400)
        assert "command" in j["error"], j


def test_timeout_must_be_an_integer_400(d):
    for t in (2.5, 2.0, "2", True, [2]):
        assert_error(d.post("/process", {"command": "true", "timeout": t}), 400)
    j = bl_start(d, "true", timeout=2)
    assert j["status"] in STATUSES


def test_bad_names_400(d):
    before = count_procs(d)
    for name in ("../../etc/x", "a/b", "/abs", "12345", "-5", "+7", "", ".", "..",
                 "x" * 129, "a b", "caf\u00e9", "a\nb", "semi;colon", "$(id)"):
        j = assert_error(d.post("/process", {"command": "true", "name": name}), 400)
        assert j["error"], name
    assert count_procs(d) == before, "a refused name left a record"


def test_good_names_resolve(d):
    long_name = ("n%d-" % os.getpid() + "x" * 128)[:128]
    for name in (uname("My.proc_1"), long_name, uname("1") + "a"):
        j = bl_start(d, "echo named", name=name, waitForCompletion=True)
        assert j["name"] == name, j
        g = bl_get(d, name)
        assert g["pid"] == j["pid"] and g["name"] == name, (j, g)
    # Percent-encoded identifiers are decoded (the SDK encodes them).
    name = uname("enc.name")
    j = bl_start(d, "true", name=name, waitForCompletion=True)
    enc = "".join("%%%02X" % ord(c) if c in ".-" else c for c in name)
    assert bl_get(d, enc)["pid"] == j["pid"]
    assert bl_logs(d, enc)["logs"] == ""


def test_max_restarts_needs_restart_on_failure_400(d):
    for body in ({"command": "true", "maxRestarts": 2},
                 {"command": "true", "maxRestarts": -1},
                 {"command": "true", "maxRestarts": 2, "restartOnFailure": False}):
        j = assert_error(d.post("/process", body), 400)
        assert "restartOnFailure" in j["error"], j
    j = bl_start(d, "true", maxRestarts=0)
    assert j["maxRestarts"] == 0 and j["restartOnFailure"] is False, j


def test_name_running_conflict_and_newest_wins(d):
    name = uname("dup")
    old = bl_start(d, "echo old-out; sleep 30", name=name)
    wait_stdout(d, name, lambda s: "old-out" in s)
    j = assert_error(d.post("/process", {"command": "true", "name": name}), 400)
    assert "already exists and is running" in j["error"], j
    assert_error(d.post("/process", {"command": "true", "name": name}, headers=NDJSON_ACCEPT),
                 400)
    assert bl_get(d, name)["pid"] == old["pid"]
    assert_json(d.delete("/process/%s/kill" % old["pid"]))
    new = bl_start(d, "echo new-out", name=name, waitForCompletion=True)
    assert new["pid"] != old["pid"], (old, new)
    assert bl_get(d, name)["pid"] == new["pid"], "a name resolves to its newest process"
    assert bl_logs(d, name)["stdout"] == "new-out\n"
    # README: the ended namesake keeps its output, and stays addressable by pid.
    o = bl_get(d, old["pid"])
    assert o["status"] == "killed" and o["name"] == name, o
    assert bl_logs(d, old["pid"])["stdout"] == "old-out\n"


def test_name_conflict_between_concurrent_execs(d):
    # Two execs with one name at once: a start still waiting for its exec holds the name too,
    # so exactly one of the two runs and the other gets the running-name 400.
    for _ in range(6):
        name = uname("race")
        gate = __import__("threading").Barrier(2)

        def go():
            gate.wait(5)
            return d.post("/process", {"command": "sleep 30", "name": name})
        boxes = [harness.threaded(go) for _ in range(2)]
        rs = []
        for t, box in boxes:
            t.join(slack(10))
            assert "value" in box, box.get("error")
            rs.append(box["value"])
        assert sorted(r.status for r in rs) == [200, 400], [(r.status, r.text) for r in rs]
        ok = [r for r in rs if r.status == 200][0].json()
        assert bl_get(d, name)["pid"] == ok["pid"]
        assert_json(d.delete("/process/%s/kill" % ok["pid"]))


def test_working_dir_missing_422(d):
    before = count_procs(d)
    tmp = tempfile.mkdtemp(prefix="sandboxd-bl-")
    try:
        f = os.path.join(tmp, "file")
        open(f, "w").close()
        for wd in (os.path.join(tmp, "nope"), f):
            j = assert_error(d.post("/process", {"command": "true", "workingDir": wd}), 422)
            assert j["error"].startswith("failed to start process"), j
            assert_error(d.post("/process", {"command": "true", "workingDir": wd,
                                             "waitForCompletion": True},
                                headers=NDJSON_ACCEPT), 422)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert count_procs(d) == before, "a failed start left a record"


def test_working_dir_normalised(d):
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="sandboxd-bl-wd-"))
    try:
        j = bl_start(d, "pwd -P", workingDir=tmp.replace("/", "//") + "//",
                     waitForCompletion=True)
        assert j["stdout"] == tmp + "\n", j
        assert j["workingDir"] == tmp + "/", "// collapses to /: %r" % j["workingDir"]
        home = os.environ.get("HOME")
        if home and os.path.isdir(home):
            j = bl_start(d, "pwd -P", workingDir="~", waitForCompletion=True)
            assert j["stdout"] == os.path.realpath(home) + "\n", j
            assert j["workingDir"] == home, j
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_env_and_shell(d):
    j = bl_start(d, 'echo "$BL_A|$SANDBOXD_IT_MARK|$BL_EMPTY|"; cat; echo $((2+3))',
                 env={"BL_A": "x y", "BL_EMPTY": ""}, waitForCompletion=True)
    assert j["stdout"] == "x y|daemon-env||\n5\n", j
    assert j["status"] == "completed", j


# ---- identifiers, routes, shapes -------------------------------------------------------------

def test_unknown_identifiers_404(d):
    for ident in (NO_SUCH_PID, "0", "-1", "no-such-name-%d" % os.getpid(), "a%2Fb"):
        assert_error(d.get("/process/%s" % ident), 404)
        assert_error(d.get("/process/%s/logs" % ident), 404)
        assert_error(d.delete("/process/%s" % ident), 404)
        assert_error(d.delete("/process/%s/kill" % ident), 404)
        with logs_stream(d, ident) as s:
            assert s.response is not None, "logs/stream of an unknown id gave a stream"
            assert_error(s.response, 404)


def test_wrong_method_and_unknown_subroute(d):
    p = bl_start(d, "true", waitForCompletion=True)["pid"]
    for method, path, status in (("PUT", "/process", 405), ("DELETE", "/process", 405),
                                 ("POST", "/process/%s" % p, 405),
                                 ("POST", "/process/%s/logs" % p, 405),
                                 ("GET", "/process/%s/kill" % p, 405),
                                 ("GET", "/process/%s/nope" % p, 404),
                                 ("GET", "/process/%s/logs/nope" % p, 404)):
        r = d.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        assert_error(r, status)


def test_post_and_get_shapes_before_output(d):
    name = uname("shape")
    j = bl_start(d, "sleep 30", name=name)
    assert j["status"] == "running" and j["name"] == name and j["command"] == "sleep 30", j
    assert j["stdout"] == "" and j["stderr"] == "" and j["logs"] == "", \
        "logs is \"\", never null, before output: %r" % j
    assert j["workingDir"] == "" and j["restartOnFailure"] is False, j
    assert j["maxRestarts"] == 0 and j["restartCount"] == 0 and j["keepAlive"] is False, j
    assert ProcRef(int(j["pid"])).alive(), "pid is the OS pid of the shell"
    g = bl_get(d, name)
    for k in ("pid", "name", "command", "startedAt", "status"):
        assert g[k] == j[k], (k, j, g)
    lg = bl_logs(d, name)
    assert (lg["stdout"], lg["stderr"], lg["logs"]) == ("", "", ""), lg
    assert_json(d.delete("/process/%s/kill" % j["pid"]))


def test_list_shape_and_types(d):
    ended = bl_start(d, "echo e; exit 2", name=uname("ended"), waitForCompletion=True)
    running = bl_start(d, "sleep 30", name=uname("running"))
    lst = bl_list(d)
    for e in lst:
        check_response(e, "list entry")
    by_pid = {e["pid"]: e for e in lst}
    assert len(by_pid) == len(lst), "duplicate pids in the list"
    e = by_pid.get(ended["pid"])
    assert e and e["status"] == "failed" and e["exitCode"] == 2 and e["stdout"] == "e\n", e
    assert e["name"] == ended["name"], e
    rn = by_pid.get(running["pid"])
    assert rn and rn["status"] == "running" and rn["completedAt"] == "", rn
    r2 = d.get("/process/")
    assert {x["pid"] for x in assert_json(r2)} >= {ended["pid"], running["pid"]}, \
        "/process/ is the list"
    assert_json(d.delete("/process/%s/kill" % running["pid"]))


def test_output_tail_is_cut_with_a_note(d):
    # 100 KiB on stdout: GET inlines the last 64 KiB after a line saying how much was cut;
    # /logs (4 MiB per stream) has it all.
    j = bl_start(d, "i=0; while [ $i -lt 1600 ]; do printf '%063d\\n' $i; i=$((i+1)); done",
                 waitForCompletion=True)
    assert len(j["stdout"]) == 1600 * 64, len(j["stdout"])
    g = bl_get(d, j["pid"])
    first, _, rest = g["stdout"].partition("\n")
    assert "trunc" in first.lower() and re.search(r"\d", first), \
        "cut answer does not start with a note: %r" % first[:200]
    assert len(rest) <= 64 * 1024, len(rest)
    assert rest.endswith("%063d\n" % 1599), rest[-100:]
    assert j["stdout"].endswith(rest), "the inlined tail is the end of the output"
    assert bl_logs(d, j["pid"])["stdout"] == j["stdout"]


# ---- stop and kill ---------------------------------------------------------------------------

def test_stop_and_kill_answers(d):
    a = bl_start(d, "sleep 30")
    ra = ProcRef(int(a["pid"]))
    r = d.delete("/process/%s" % a["pid"])
    assert assert_json(r) == {"message": "Process stopped successfully"}, r.text
    assert not ra.alive(), "stop answered while the process is still alive"
    g = bl_get(d, a["pid"])
    assert g["status"] == "stopped" and g["exitCode"] == -1, g
    j = assert_error(d.delete("/process/%s" % a["pid"]), 404)
    assert "not running" in j["error"], j
    assert_error(d.delete("/process/%s/kill" % a["pid"]), 404)

    b = bl_start(d, "trap '' TERM; sleep 30 & wait", name=uname("kill"))
    rb = ProcRef(int(b["pid"]))
    r = d.delete("/process/%s/kill" % b["name"])
    assert assert_json(r) == {"message": "Process killed successfully"}, r.text
    assert not rb.alive()
    g = bl_get(d, b["name"])
    assert g["status"] == "killed" and g["exitCode"] == -1, g

    c = bl_start(d, "exit 0", waitForCompletion=True)
    assert_error(d.delete("/process/%s" % c["pid"]), 404)
    assert_error(d.delete("/process/%s/kill" % c["pid"]), 404)
    assert bl_get(d, c["pid"])["status"] == "completed", "refused stop/kill changed nothing"


def test_keepalive_flag(d):
    j = bl_start(d, "sleep 30", keepAlive=True)
    assert j["keepAlive"] is True, j
    assert bl_get(d, j["pid"])["keepAlive"] is True
    assert_json(d.delete("/process/%s" % j["pid"]))
    g = bl_get(d, j["pid"])
    assert g["status"] == "stopped" and g["keepAlive"] is False, g


def test_keepalive_disabled_by_env():
    with Daemon(env={"BL_DISABLE_KEEPALIVE": "true"}) as dd:
        j = assert_error(dd.post("/process", {"command": "true", "keepAlive": True}), 400)
        assert "keepAlive" in j["error"], j
        assert bl_start(dd, "true", keepAlive=False, waitForCompletion=True)["status"] == \
            "completed"


# ---- one table, two dialects -----------------------------------------------------------------

def test_cross_dialect_blaxel_to_tensorlake(d):
    name = uname("cross")
    j = bl_start(d, "echo from-blaxel; sleep 30", name=name)
    pid = int(j["pid"])
    wait_stdout(d, name, lambda s: "from-blaxel" in s)
    lst = d.list()
    tl = [p for p in lst if p["pid"] == pid]
    assert len(tl) == 1, "Blaxel process not in /api/v1/processes: %r" % lst[-3:]
    assert tl[0]["status"] == "running", tl
    assert d.info(pid)["pid"] == pid
    assert d.info(name)["pid"] == pid, "Tensorlake looks names up too"
    assert d.lines(pid, "stdout") == ["from-blaxel"]
    r = d.kill_proc(pid)
    assert r.status in (200, 204), r
    g = wait_until(lambda: (lambda x: x if x["status"] != "running" else None)(bl_get(d, pid)),
                   slack(5), what="kill through Tensorlake to show in Blaxel")
    assert g["status"] == "killed" and g["exitCode"] == -1, g
    assert not ProcRef(pid).alive()
    assert d.info(pid)["status"] == "signaled"


def test_cross_dialect_tensorlake_to_blaxel(d):
    p = d.sh("echo from-tensorlake; sleep 30")
    pid = p["pid"]
    g = bl_get(d, pid)
    assert g["pid"] == str(pid) and g["status"] == "running", g
    assert g["command"] == "sh -c echo from-tensorlake; sleep 30", g
    assert str(pid) in {e["pid"] for e in bl_list(d)}
    wait_stdout(d, pid, lambda s: s == "from-tensorlake\n")
    assert_json(d.delete("/process/%d/kill" % pid))
    assert bl_get(d, pid)["status"] == "killed"
    i = d.info(pid)
    assert i["status"] == "signaled" and i["signal"] == 9, i


# ---- logs/stream (text) ----------------------------------------------------------------------

PREFIXED = re.compile(r"^(stdout|stderr):")


def test_logs_stream_prefixes_every_line(d):
    # Each printf is one write() holding many lines: every line gets its own prefix.
    script = ("printf 'a1\\na2\\na3\\n'; printf 'b1\\nb2\\nb3\\n' >&2; seq 1 300; "
              "printf 'tail-no-newline'")
    j = bl_start(d, script, waitForCompletion=True)
    lines = text_lines(d, j["pid"])
    assert all(PREFIXED.match(ln) for ln in lines), \
        "unprefixed lines: %r" % [ln for ln in lines if not PREFIXED.match(ln)][:5]
    out = [ln[7:] for ln in lines if ln.startswith("stdout:")]
    err = [ln[7:] for ln in lines if ln.startswith("stderr:")]
    assert out == ["a1", "a2", "a3"] + [str(i) for i in range(1, 301)] + ["tail-no-newline"], \
        out[:6] + out[-3:]
    assert err == ["b1", "b2", "b3"], err

    # Live: the stream attaches first, then multi-line writes arrive.
    name = uname("live-prefix")
    bl_start(d, "sleep 0.5; printf 'x1\\nx2\\nx3\\n'; printf 'y1\\ny2\\n' >&2; sleep 0.2; "
                "seq 1 200", name=name)
    lines = text_lines(d, name)
    assert all(PREFIXED.match(ln) for ln in lines), \
        "unprefixed live lines: %r" % [ln for ln in lines if not PREFIXED.match(ln)][:5]
    assert [ln for ln in lines if ln.startswith("stdout:")][:3] == \
        ["stdout:x1", "stdout:x2", "stdout:x3"], lines[:6]
    assert [ln for ln in lines if ln.startswith("stderr:")] == ["stderr:y1", "stderr:y2"]
    assert len(lines) == 205, len(lines)


def test_logs_stream_is_live_and_ends_at_exit(d):
    j = bl_start(d, "echo one; sleep 1.2; echo two >&2; sleep 0.3")
    with logs_stream(d, j["pid"]) as s:
        assert s.status == 200, s.response
        assert s.headers.get("content-type", "").startswith("text/plain"), s.headers
        t0 = time.monotonic()
        first = s.next_line(5)
        assert first and first[0] == b"stdout:one", first
        assert first[1] - t0 < 1.0, "first line came late: not live"
        second = s.next_line(5)
        assert second and second[0] == b"stderr:two", second
        assert second[1] - first[1] > 0.8, "second line did not wait for the process"
        end = s.next_line(5)
        assert end is None, "stream went on after the last line: %r" % (end,)
        assert s.ended
    assert bl_get(d, j["pid"])["status"] == "completed", "stream ended before the process"


@harness.timeout(60)
def test_logs_stream_keepalive_is_its_own_line(d):
    # Text keepalives are sent every 15 s while the process runs; the SDK drops lines that
    # start with "[keepalive]", so they must never be glued to or inside content lines.
    j = bl_start(d, "echo first; sleep 16.5; printf 'last\\nfinal-partial'")
    lines = text_lines(d, j["pid"], timeout_s=30)
    ka = [ln for ln in lines if "keepalive" in ln]
    assert ka, "no keepalive in a 16.5 s stream: %r" % lines
    assert all(ln == "[keepalive]" for ln in ka), ka
    assert [ln for ln in lines if ln not in ka] == \
        ["stdout:first", "stdout:last", "stdout:final-partial"], lines


def test_logs_stream_restart_markers_unprefixed_and_waits_for_last_run(d):
    name = uname("restart-stream")
    bl_start(d, "echo run; exit 4", name=name, restartOnFailure=True, maxRestarts=1)
    lines = text_lines(d, name, timeout_s=15)
    g = bl_get(d, name)
    assert g["status"] == "failed" and g["restartCount"] == 1, \
        "stream ended before the last run: %r" % g
    assert [ln for ln in lines if ln.startswith("stdout:")] == ["stdout:run", "stdout:run"], lines
    markers = [ln for ln in lines if not PREFIXED.match(ln) and ln.strip()]
    assert len(markers) == 1 and "restart" in markers[0].lower(), lines


# ---- NDJSON exec stream ----------------------------------------------------------------------

def test_ndjson_shape(d):
    name = uname("nd")
    events, res, r = ndjson_exec(d, {
        "command": "echo o1; echo e1 >&2; printf 'a\\nb\\nc\\n'; printf 'q\\n\\nr\\n' >&2; exit 2",
        "name": name})
    assert r.headers.get("cache-control", "").lower() == "no-cache", r.headers
    assert res["status"] == "failed" and res["exitCode"] == 2 and res["name"] == name, res
    assert res["stdout"] == "o1\na\nb\nc\n" and res["stderr"] == "e1\nq\n\nr\n", res
    assert ndjson_text(events, "stdout") == "o1\na\nb\nc\n", events
    assert ndjson_text(events, "stderr") == "e1\nq\n\nr\n", events
    for e in events:
        assert e["type"] in ("stdout", "stderr", "keepalive", "result"), e
        if e["type"] in ("stdout", "stderr"):
            assert isinstance(e.get("data"), str) and e["data"], e
    # waitForCompletion is implied, and the record is the same one GET sees.
    assert bl_get(d, name)["pid"] == res["pid"]


def test_ndjson_no_output_and_success(d):
    events, res, _ = ndjson_exec(d, {"command": "true", "waitForCompletion": True})
    assert res["status"] == "completed" and res["exitCode"] == 0, res
    assert [e["type"] for e in events] == ["result"], events


def test_ndjson_keepalive_events(d):
    events, res, _ = ndjson_exec(d, {"command": "echo a; sleep 5.7; echo b"}, timeout_s=20)
    ka = [e for e in events if e["type"] == "keepalive"]
    assert ka, "no keepalive in a 5.7 s NDJSON stream: %r" % events
    assert all(e == {"type": "keepalive"} for e in ka), ka
    assert ndjson_text(events, "stdout") == "a\nb\n", events
    assert res["stdout"] == "a\nb\n", res


def test_ndjson_client_gone_process_goes_on(d):
    # The streaming exec is not request-scoped: a client that goes away leaves the process.
    name = uname("nd-gone")
    with d.conn() as c:
        c.send(c.build_request("POST", "/process", json_body={
            "command": "echo started; sleep 1; echo finished", "name": name},
            headers=NDJSON_ACCEPT))
        status, _, hdrs, _ = c.read_head(time.monotonic() + slack(5))
        assert status == 200, status
        assert hdrs.get("content-type", "").startswith("application/x-ndjson"), hdrs
        wait_stdout(d, name, lambda s: "started" in s)
    assert bl_get(d, name)["status"] == "running", "closing the stream ended the process"
    g = bl_settled(d, name, timeout_s=5)
    assert g["status"] == "completed" and g["stdout"] == "started\nfinished\n", g


def test_ndjson_waits_for_last_run(d):
    events, res, _ = ndjson_exec(d, {"command": "echo run; exit 5", "restartOnFailure": True,
                                     "maxRestarts": 1}, timeout_s=20)
    assert res["status"] == "failed" and res["exitCode"] == 5 and res["restartCount"] == 1, res
    out = [e["data"] for e in events if e["type"] == "stdout"]
    assert out.count("run\n") == 2, out
    assert any("restart" in x.lower() for x in out), "no restart marker: %r" % out


# ---- waitForPorts ----------------------------------------------------------------------------

def test_wait_for_ports_listened_by_a_descendant(d):
    need_python()
    port = free_port()
    t0 = time.monotonic()
    j = bl_start(d, "sleep 0.5; python3 -m http.server %d --bind 0.0.0.0 & wait" % port,
                 waitForPorts=[port], timeout=20)
    try:
        assert j["status"] == "running", j
        assert time.monotonic() - t0 >= 0.45, "answered before the port could listen"
        assert can_connect(port), "port not accepting right after the answer"
    finally:
        assert_json(d.delete("/process/%s/kill" % j["pid"]))
    assert not can_connect(port), "server survived the kill of its tree"


def test_wait_for_ports_loopback_only_does_not_count(d):
    need_python()
    port = free_port()
    t0 = time.monotonic()
    r = d.post("/process", {"command": "exec python3 -m http.server %d --bind 127.0.0.1" % port,
                            "waitForPorts": [port], "timeout": 2, "name": uname("lo")},
               timeout_s=15)
    j = assert_error(r, 422)
    assert "timed out waiting for ports after 2 seconds" in j["error"], j
    assert time.monotonic() - t0 >= 1.8
    # README: timeout is enforced by the daemon; the tree was killed.
    lst = [e for e in bl_list(d) if e["command"].startswith("exec python3 -m http.server %d "
                                                                % port)]
    assert len(lst) == 1 and lst[0]["status"] == "killed", lst
    assert not can_connect(port)


def test_wait_for_ports_of_another_process_do_not_count(d):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        r = d.post("/process", {"command": "sleep 30", "waitForPorts": [port], "timeout": 1},
                   timeout_s=10)
        j = assert_error(r, 422)
        assert "timed out waiting for ports" in j["error"], j
    finally:
        s.close()


def test_wait_for_ports_process_ends_first_422(d):
    t0 = time.monotonic()
    r = d.post("/process", {"command": "exit 0", "waitForPorts": [free_port()]}, timeout_s=10)
    assert_error(r, 422)
    assert time.monotonic() - t0 < slack(3), "waitForPorts kept waiting after the process ended"


# ---- timeout and restarts --------------------------------------------------------------------

def test_timeout_kills_and_wait_answers_422(d):
    name = uname("to")
    t0 = time.monotonic()
    r = d.post("/process", {"command": "sleep 30 & echo $!; wait", "name": name, "timeout": 1,
                            "waitForCompletion": True}, timeout_s=10)
    j = assert_error(r, 422)
    assert j["error"] == "process timed out after 1 seconds", j
    assert 0.9 <= time.monotonic() - t0 < slack(4)
    g = bl_get(d, name)
    assert g["status"] == "killed" and g["exitCode"] == -1, g
    child = int(g["stdout"].strip())
    assert not harness.wait_gone([child], slack(3)), "the background child survived the timeout"


def test_death_by_signal_is_failed_minus_one(d):
    j = bl_start(d, "echo bye; kill -KILL $$", waitForCompletion=True)
    assert j["status"] == "failed" and j["exitCode"] == -1 and j["stdout"] == "bye\n", j


def test_timeout_zero_is_none(d):
    j = bl_start(d, "sleep 0.3; echo ok", timeout=0, waitForCompletion=True)
    assert j["status"] == "completed" and j["stdout"] == "ok\n", j


def test_restart_pid_stable_env_same_and_stop_in_backoff(d):
    name = uname("unlimited")
    j = bl_start(d, 'echo "run $$ $BL_MARK"; exit 1', name=name, env={"BL_MARK": "m"},
                 restartOnFailure=True, maxRestarts=-1)
    assert j["maxRestarts"] == -1 and j["restartOnFailure"] is True, j
    first = j["pid"]
    # Between runs (the 1 s back-off) the status reads failed, with the run's exit code.
    g = wait_until(lambda: (lambda x: x if x["status"] == "failed" else None)(bl_get(d, name)),
                   slack(3), 0.01, what="the back-off after the first failure")
    assert g["exitCode"] == 1 and g["restartCount"] >= 1 and g["pid"] == first, g
    g = wait_until(lambda: (lambda x: x if x["restartCount"] >= 1 else None)(bl_get(d, name)),
                   slack(5), what="a restart")
    assert g["pid"] == first, "pid changed across restarts: %r" % g
    runs = wait_stdout(d, name, lambda s: s.count(" m\n") >= 2)
    g = bl_get(d, name)
    assert rfc1123_ms(g["startedAt"], "startedAt") > rfc1123_ms(j["startedAt"], "startedAt"), \
        "startedAt is not reset by a restart: %r then %r" % (j["startedAt"], g["startedAt"])
    shells = re.findall(r"^run (\d+) m$", runs, re.M)
    assert len(shells) >= 2 and shells[0] == first, runs
    assert shells[1] != shells[0], "a restart is a new process"
    assert "\n[Process failed with exit code 1. Attempting restart 1/unlimited...]\n" in runs, runs
    r = d.delete("/process/%s" % name)
    assert_json(r)
    g = bl_get(d, name)
    assert g["status"] == "stopped", g
    n = g["restartCount"]
    time.sleep(2.5)
    g2 = bl_get(d, name)
    assert g2["status"] == "stopped" and g2["restartCount"] == n, "restarted after stop: %r" % g2


def test_kill_during_backoff_ends_at_once(d):
    name = uname("kill-backoff")
    bl_start(d, "exit 1", name=name, restartOnFailure=True, maxRestarts=-1)
    wait_until(lambda: bl_get(d, name)["status"] == "failed", slack(3), 0.01,
               "the back-off after the first failure")
    t0 = time.monotonic()
    assert assert_json(d.delete("/process/%s/kill" % name)) == \
        {"message": "Process killed successfully"}
    assert time.monotonic() - t0 < slack(1)
    g = bl_get(d, name)
    assert g["status"] == "killed" and g["restartCount"] == 1, g
    time.sleep(1.3)
    g2 = bl_get(d, name)
    assert g2["status"] == "killed" and g2["restartCount"] == 1, "restarted after kill: %r" % g2


def test_restart_marker_and_final_state(d):
    j = bl_start(d, "echo run; echo oops >&2; exit 9", restartOnFailure=True, maxRestarts=1,
                 waitForCompletion=True)
    assert j["status"] == "failed" and j["exitCode"] == 9 and j["restartCount"] == 1, j
    lines = [ln for ln in j["stdout"].split("\n") if ln]
    assert lines[0] == "run" and lines[-1] == "run" and len(lines) == 3, lines
    assert lines[1] == "[Process failed with exit code 9. Attempting restart 1/1...]", lines
    assert j["stderr"] == "oops\noops\n", j


def test_list_inlined_output_is_bounded():
    # GET /process inlines each record's output tail (64 KiB per stream); the answer is
    # capped at about 16 MiB (newest records first), so it never grows without bound.
    # 300 processes x 128 KiB of stdout: only the newest ~250 tails fit.
    with Daemon() as dm:
        pids = []
        for i in range(300):
            r = bl_start(dm, "head -c 131072 /dev/zero | tr '\\0' a", name="big-%d" % i,
                         waitForCompletion=True)
            assert r["status"] == "completed", r
            pids.append(r["pid"])
        r = dm.get("/process")
        assert r.status == 200
        assert len(r.body) < (17 << 20), "list answer of %d bytes" % len(r.body)
        by_pid = {e["pid"]: e for e in r.json()}
        newest, oldest = by_pid[pids[-1]], by_pid[pids[0]]
        assert newest["stdout"].endswith("a" * 65536), newest["stdout"][:200]
        assert oldest["stdout"].startswith("[... truncated: 131072 earlier bytes"), \
            oldest["stdout"][:200]
        # The record itself still has everything.
        assert len(bl_logs(dm, pids[0])["stdout"]) == 131072
