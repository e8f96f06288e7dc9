"""Black-box integration harness for sandboxd (stdlib only).

Starts the real daemon on 127.0.0.1 port 0 with a temporary state dir, talks raw HTTP/1.1
over sockets (so malformed requests, chunked framing and connection closes are visible),
parses SSE streams event by event with deadlines, and inspects the daemon and its children
through /proc.

Tests are plain functions in test_*.py; run.py discovers and runs them. A test that takes an
argument named `d` gets the daemon shared by its file (options from the module's `DAEMON`
dict); tests that need a fresh daemon start one with `Daemon(...)` as a context manager.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

DAEMON_PATH = os.environ.get("SANDBOXD", "build/sandboxd")
# Multiplies every timing tolerance; run.py raises it for sanitizer builds.
TIME_SCALE = float(os.environ.get("SANDBOXD_IT_TIME_SCALE", "1"))
IS_ASAN = False

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                     "ERROR: UndefinedBehaviorSanitizer")

_started = []   # every Daemon started in this process (run.py checks them after a test)


def slack(seconds):
    """A timing tolerance scaled for slow (sanitizer) builds."""
    return seconds * TIME_SCALE


class Skip(Exception):
    """Raised by a test that cannot run here; run.py prints `skip name: reason`."""


class Timeout(AssertionError):
    pass


class ConnectionClosed(AssertionError):
    pass


class ProtocolError(AssertionError):
    pass


def slow(fn):
    """Tags a test as slow: run.py runs it only with --slow."""
    fn.slow = True
    return fn


def timeout(seconds):
    """Overrides run.py's per-test timeout (seconds, before TIME_SCALE)."""
    def deco(fn):
        fn.timeout = seconds
        return fn
    return deco


def now_ms():
    return int(time.time() * 1000)


def wait_until(pred, timeout_s, interval=0.02, what="condition"):
    """Polls pred() until it returns a truthy value; returns it. Raises Timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Timeout("timed out after %.1fs waiting for %s" % (timeout_s, what))
        time.sleep(interval)


def is_asan_binary(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return b"__asan_init" in data or b"AddressSanitizer" in data


# ---------------------------------------------------------------------------------------------
# /proc helpers

def proc_stat(pid):
    """Fields of /proc/pid/stat as a dict, or None if the pid does not exist."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read().decode("latin-1")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    rp = raw.rfind(")")
    rest = raw[rp + 2:].split()
    return {
        "pid": pid,
        "comm": raw[raw.find("(") + 1:rp],
        "state": rest[0],
        "ppid": int(rest[1]),
        "pgrp": int(rest[2]),
        "session": int(rest[3]),
        "starttime": int(rest[19]),
    }


def proc_status(pid):
    """/proc/pid/status as a dict of strings (None if gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for ln in lines:
        k, _, v = ln.partition(":")
        out[k] = v.strip()
    return out


def all_pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def all_stats():
    out = {}
    for p in all_pids():
        st = proc_stat(p)
        if st:
            out[p] = st
    return out


def children_of(pid, stats=None):
    stats = stats if stats is not None else all_stats()
    return [s for s in stats.values() if s["ppid"] == pid]


def descendants(pid, stats=None):
    stats = stats if stats is not None else all_stats()
    kids = {}
    for s in stats.values():
        kids.setdefault(s["ppid"], []).append(s["pid"])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, ()):
            out.append(c)
            todo.append(c)
    return out


def zombies_of(pid):
    return [s["pid"] for s in children_of(pid) if s["state"] == "Z"]


class ProcRef:
    """A pid pinned to its start time, so pid reuse never makes a dead process look alive."""

    def __init__(self, pid):
        self.pid = int(pid)
        st = proc_stat(self.pid)
        self.starttime = st["starttime"] if st else None

    def alive(self):
        """True while the process exists, is the same process, and is not a zombie."""
        if self.starttime is None:
            return False
        st = proc_stat(self.pid)
        return bool(st and st["starttime"] == self.starttime and st["state"] not in "ZX")

    def exists(self):
        """True while the pid entry exists (zombie included)."""
        st = proc_stat(self.pid)
        return bool(self.starttime is not None and st and st["starttime"] == self.starttime)

    def __repr__(self):
        return "ProcRef(%d)" % self.pid


def wait_gone(refs, timeout_s):
    """Waits until none of refs (ProcRef or pid) is alive; returns the survivors."""
    refs = [r if isinstance(r, ProcRef) else ProcRef(r) for r in refs]
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [r for r in refs if r.alive()]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def fd_list(pid):
    out = {}
    d = "/proc/%d/fd" % pid
    for n in os.listdir(d):
        try:
            out[int(n)] = os.readlink(os.path.join(d, n))
        except OSError:
            pass
    return out


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def rss_kb(pid):
    st = proc_status(pid)
    if not st or "VmRSS" not in st:
        return None
    return int(st["VmRSS"].split()[0])


def kill_quietly(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# HTTP over raw sockets

class Response:
    def __init__(self, status, reason, headers, body, raw_headers):
        self.status = status
        self.reason = reason
        self.headers = headers          # lower-case name -> last value
        self.raw_headers = raw_headers  # list of (name, value) as received
        self.body = body
        self._json = None

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        if self._json is None:
            try:
                self._json = json.loads(self.body)
            except ValueError as e:
                raise AssertionError("response %d body is not JSON (%s): %r"
                                     % (self.status, e, self.body[:300]))
        return self._json

    def __repr__(self):
        return "<Response %d %r>" % (self.status, self.body[:200])


class Conn:
    """One HTTP/1.1 connection. Requests can be pipelined by hand via send()/read_response()."""

    def __init__(self, host, port, timeout_s=10, rcvbuf=None):
        self.host, self.port = host, port
        if rcvbuf is not None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(timeout_s)
            s.connect((host, port))
            self.sock = s
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed_by_peer = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # -- low level
    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise Timeout("timed out reading from daemon")
        self.sock.settimeout(rem)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            raise Timeout("timed out reading from daemon")
        except ConnectionResetError:
            self.closed_by_peer = True
            raise ConnectionClosed("connection reset by daemon")
        if not data:
            self.closed_by_peer = True
            raise ConnectionClosed("connection closed by daemon")
        self.buf += data

    def readline(self, deadline, limit=1 << 20):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > limit:
                raise ProtocolError("line too long")
            self._fill(deadline)

    def read_exact(self, n, deadline):
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_some(self, n, deadline):
        if not self.buf:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_close(self, deadline):
        while True:
            try:
                self._fill(deadline)
            except ConnectionClosed:
                break
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def is_closed(self, timeout_s=1.0):
        """True if the peer closes the connection (EOF or reset) within timeout_s; data that
        arrives meanwhile is kept in the buffer."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self._fill(deadline)
        except ConnectionClosed:
            return True
        except Timeout:
            return False

    # -- requests
    def build_request(self, method, path, body=None, headers=None, token=None,
                      json_body=None, host=None):
        if json_body is not None:
            body = json.dumps(json_body).encode()
        if isinstance(body, str):
            body = body.encode()
        hdrs = [("Host", host or "%s:%d" % (self.host, self.port))]
        if token is not None:
            hdrs.append(("Authorization", "Bearer " + token))
        if json_body is not None:
            hdrs.append(("Content-Type", "application/json"))
        user = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in user}
        if body is not None and "content-length" not in names and \
                "transfer-encoding" not in names:
            hdrs.append(("Content-Length", str(len(body))))
        elif body is None and method in ("POST", "PUT", "PATCH") and \
                "content-length" not in names and "transfer-encoding" not in names:
            hdrs.append(("Content-Length", "0"))
        hdrs += user
        head = "%s %s HTTP/1.1\r\n" % (method, path)
        head += "".join("%s: %s\r\n" % (k, v) for k, v in hdrs) + "\r\n"
        return head.encode("latin-1") + (body or b"")

    def read_head(self, deadline):
        while True:
            line = self.readline(deadline)
            if line.strip():
                break
        m = re.match(rb"HTTP/1\.[01] (\d{3})(?: (.*))?\r?\n$", line)
        if not m:
            raise ProtocolError("bad status line %r" % line)
        status = int(m.group(1))
        reason = (m.group(2) or b"").decode("latin-1").strip()
        raw, headers = [], {}
        nbytes = 0
        while True:
            ln = self.readline(deadline)
            nbytes += len(ln)
            if nbytes > 65536:
                raise ProtocolError("response header section too large")
            if ln in (b"\r\n", b"\n"):
                break
            k, sep, v = ln.decode("latin-1").partition(":")
            if not sep:
                raise ProtocolError("bad header line %r" % ln)
            raw.append((k.strip(), v.strip()))
            headers[k.strip().lower()] = v.strip()
        if status == 100:
            return self.read_head(deadline)
        return status, reason, headers, raw

    def read_body(self, method, status, headers, deadline):
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
        te = headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            out = bytearray()
            reader = ChunkedReader(self)
            while True:
                part = reader.read_some(deadline)
                if part is None:
                    return bytes(out)
                out += part
        if "content-length" in headers:
            return self.read_exact(int(headers["content-length"]), deadline)
        return self.read_to_close(deadline)

    def read_response(self, method="GET", timeout_s=10):
        deadline = time.monotonic() + timeout_s
        status, reason, headers, raw = self.read_head(deadline)
        body = self.read_body(method, status, headers, deadline)
        return Response(status, reason, headers, body, raw)

    def request(self, method, path, body=None, headers=None, token=None, json_body=None,
                timeout_s=10, host=None):
        self.send(self.build_request(method, path, body, headers, token, json_body, host))
        return self.read_response(method, timeout_s)


class ChunkedReader:
    """Incremental, strict decoder of a chunked body. read_some() returns bytes, or None once
    the terminating zero-size chunk (and trailers) were read."""

    def __init__(self, conn):
        self.c = conn
        self.left = 0
        self.need_crlf = False
        self.done = False

    def read_some(self, deadline):
        if self.done:
            return None
        c = self.c
        if self.left == 0:
            if self.need_crlf:
                ln = c.readline(deadline)
                if ln not in (b"\r\n", b"\n"):
                    raise ProtocolError("chunk not followed by CRLF: %r" % ln[:80])
                self.need_crlf = False
            ln = c.readline(deadline, limit=1024)
            try:
                size = int(ln.split(b";")[0].strip(), 16)
            except ValueError:
                raise ProtocolError("bad chunk size line %r" % ln[:80])
            if size == 0:
                while True:
                    t = c.readline(deadline)
                    if t in (b"\r\n", b"\n"):
                        break
                self.done = True
                return None
            self.left = size
        data = c.read_some(min(self.left, 262144), deadline)
        self.left -= len(data)
        if self.left == 0:
            self.need_crlf = True
        return data


# ---------------------------------------------------------------------------------------------
# SSE

class Event:
    """One SSE item: either a comment (comment is not None) or an event with a name, the raw
    data string and its parsed JSON (json is None when data is not valid JSON)."""

    __slots__ = ("name", "data", "json", "comment", "t")

    def __init__(self, name=None, data=None, comment=None):
        self.name = name
        self.data = data
        self.comment = comment
        self.json = None
        self.t = time.monotonic()
        if data is not None:
            try:
                self.json = json.loads(data)
            except ValueError:
                self.json = None

    @property
    def is_comment(self):
        return self.comment is not None

    def __repr__(self):
        if self.is_comment:
            return "<comment %r>" % self.comment
        return "<event %s %r>" % (self.name, (self.data or "")[:120])


class Stream:
    """An HTTP response being read as SSE. If the status is not 200 (or the body is not
    chunked/SSE), the whole body is read at once and available as .response."""

    def __init__(self, conn, method, timeout_s=10):
        self.conn = conn
        deadline = time.monotonic() + timeout_s
        self.status, self.reason, self.headers, self.raw_headers = conn.read_head(deadline)
        self.response = None
        self.ended = False           # the body ended properly (zero chunk or Content-Length)
        self.eof_abrupt = False      # the connection closed without a proper body end
        self._pending = bytearray()
        self._queue = []
        self._name = None
        self._data = []
        self._reader = None
        self._left = None
        ctype = self.headers.get("content-type", "")
        if self.status != 200 or not ctype.startswith("text/event-stream"):
            body = conn.read_body(method, self.status, self.headers, deadline)
            self.response = Response(self.status, self.reason, self.headers, body,
                                     self.raw_headers)
            self.ended = True
            return
        te = self.headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            self._reader = ChunkedReader(conn)
        elif "content-length" in self.headers:
            self._left = int(self.headers["content-length"])

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _more(self, deadline):
        """Reads more body bytes into _pending; returns False at the end of the body."""
        if self.ended:
            return False
        try:
            if self._reader is not None:
                data = self._reader.read_some(deadline)
                if data is None:
                    self.ended = True
                    return False
            elif self._left is not None:
                if self._left == 0:
                    self.ended = True
                    return False
                data = self.conn.read_some(min(self._left, 262144), deadline)
                self._left -= len(data)
            else:
                data = self.conn.read_some(262144, deadline)
        except ConnectionClosed:
            if self._reader is None and self._left is None:
                self.ended = True       # close-delimited body: EOF is the end
            else:
                self.eof_abrupt = True
                self.ended = True
            return False
        self._pending += data
        return True

    def _parse(self):
        buf = self._pending
        start = 0
        while True:
            i = buf.find(b"\n", start)
            if i < 0:
                break
            line = bytes(buf[start:i])
            start = i + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data or self._name is not None:
                    data = "\n".join(self._data) if self._data else None
                    self._queue.append(Event(self._name, data))
                self._name, self._data = None, []
                continue
            s = line.decode("utf-8", "surrogateescape")
            if s.startswith(":"):
                self._queue.append(Event(comment=s[1:].lstrip(" ")))
                continue
            field, _, value = s.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "event":
                self._name = value
            elif field == "data":
                self._data.append(value)
        del buf[:start]

    def next(self, timeout_s=10):
        """The next Event, or None at the end of the stream. Raises Timeout."""
        deadline = time.monotonic() + timeout_s
        while not self._queue:
            if not self._more(deadline):
                self._parse()
                if self._queue:
                    break
                return None
            self._parse()
        return self._queue.pop(0)

    def next_event(self, timeout_s=10):
        """Like next() but skips comments."""
        deadline = time.monotonic() + timeout_s
        while True:
            ev = self.next(max(0.001, deadline - time.monotonic()))
            if ev is None or not ev.is_comment:
                return ev

    def collect(self, timeout_s=30):
        """Reads to the end of the stream; returns (events, comments)."""
        deadline = time.monotonic() + timeout_s
        events, comments = [], []
        while True:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise Timeout("stream did not end within %.1fs (%d events so far)"
                              % (timeout_s, len(events)))
            ev = self.next(rem)
            if ev is None:
                return events, comments
            (comments if ev.is_comment else events).append(ev)


def is_exit_obj(o):
    return isinstance(o, dict) and "line" not in o and ("exit_code" in o or "signal" in o) \
        and not ("pid" in o and "started_at" in o)


class RunResult:
    """A parsed run stream: started event, output lines, final exit event."""

    def __init__(self, events, comments, stream):
        self.events = events
        self.comments = comments
        self.stream = stream
        self.bad = [e for e in events if not isinstance(e.json, dict)]
        objs = [e.json for e in events if isinstance(e.json, dict)]
        self.started = next((o for o in objs if "pid" in o and "started_at" in o), None)
        self.outputs = [o for o in objs if "line" in o]
        self.exits = [o for o in objs if is_exit_obj(o)]
        self.exit = self.exits[-1] if self.exits else None
        self.pid = self.started["pid"] if self.started else None

    def lines(self, stream=None):
        return [o["line"] for o in self.outputs if stream is None or o.get("stream") == stream]

    def check_shape(self):
        """Asserts the run stream's contract: every event JSON, started first, exactly one
        exit event and it is the last, body properly terminated."""
        assert not self.bad, "non-JSON data events: %r" % self.bad[:3]
        assert self.started is not None, "no started event: %r" % self.events[:3]
        assert self.events[0].json is self.started, \
            "first event is not the started event: %r" % self.events[0]
        assert len(self.exits) == 1, "expected exactly one exit event, got %r" % self.exits
        assert self.events[-1].json is self.exit, \
            "exit event is not the last event: last=%r" % self.events[-1]
        assert self.stream.ended and not self.stream.eof_abrupt, "stream not properly ended"
        for o in self.outputs:
            assert isinstance(o["line"], str), o
            assert isinstance(o.get("timestamp"), int), "output event without int timestamp: %r" % o
            assert o.get("stream") in ("stdout", "stderr"), "bad stream field: %r" % o
        return self


# ---------------------------------------------------------------------------------------------
# The daemon

class Daemon:
    """A sandboxd under test. Use as a context manager for a fresh daemon."""

    def __init__(self, token=None, env_token=None, args=(), env=None, listen="127.0.0.1:0",
                 preexec_fn=None, binary=None, state_dir=None, launch=True, dirty_signals=False,
                 verbose=False, start_timeout=10):
        self.binary = os.path.abspath(binary or DAEMON_PATH)
        self.token = token
        self.env_token = env_token
        self.args = list(args)
        if verbose:
            self.args.append("--verbose")
        self.listen = listen
        self.preexec_fn = preexec_fn
        self.dirty_signals = dirty_signals
        self.tmp = tempfile.mkdtemp(prefix="sandboxd-it-")
        self.state_dir = state_dir or os.path.join(self.tmp, "state")
        os.makedirs(self.state_dir, exist_ok=True)
        self.stderr_path = os.path.join(self.tmp, "stderr.log")
        self.env = dict(os.environ)
        self.env.pop("SANDBOXD_TOKEN", None)
        self.env.pop("SANDBOXD_STATE_DIR", None)
        self.env["SANDBOXD_IT_MARK"] = "daemon-env"
        # Inherited by every child (env is merged over the daemon's): finds what a dead
        # daemon left behind.
        self.tag = "%d-%d-%s" % (os.getpid(), id(self), os.path.basename(self.tmp))
        self.env["SANDBOXD_IT_DAEMON"] = self.tag
        self.leftovers = []
        if env_token is not None:
            self.env["SANDBOXD_TOKEN"] = env_token
        if env:
            self.env.update(env)
        self.proc = None
        self.owner = os.getpid()
        self.host = None
        self.port = None
        self.pid = None
        self.stdout_rest = b""
        self.returncode = None
        self._stderr_off = 0
        self._final_report = None
        self.start_timeout = start_timeout
        if launch:
            self.launch()

    def cmdline(self):
        cmd = [self.binary, "--listen", self.listen, "--state-dir", self.state_dir]
        if self.token is not None:
            cmd += ["--token", self.token]
        return cmd + self.args

    def _preexec(self):
        if self.dirty_signals:
            # What a careless parent leaves behind; children must not inherit it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGALRM,
                                                      signal.SIGCHLD})
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            # Ignored SIGCHLD makes the kernel reap children itself: exit codes would be lost.
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        if self.preexec_fn:
            self.preexec_fn()

    def launch(self):
        errf = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.cmdline(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=errf, env=self.env,
                                     preexec_fn=self._preexec, close_fds=True)
        errf.close()
        self.pid = self.proc.pid
        _started.append(self)
        line = self._read_stdout_line(slack(self.start_timeout))
        m = re.match(r"^listening on (\S+):(\d+)$", line)
        if not m:
            self.kill()
            raise AssertionError("daemon did not print 'listening on HOST:PORT' (got %r); "
                                 "stderr: %s" % (line, self.stderr_tail()))
        self.host = m.group(1).strip("[]")
        self.port = int(m.group(2))
        self.listen_line = line
        return self

    def _read_stdout_line(self, timeout_s):
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in buf:
            rem = deadline - time.monotonic()
            if rem <= 0:
                return buf.decode("latin-1") + "<timeout>"
            r, _, _ = select.select([fd], [], [], rem)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return buf.decode("latin-1") + "<eof rc=%s>" % self.proc.poll()
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        self.stdout_rest = rest
        return line.decode("latin-1")

    # -- lifecycle
    def alive(self):
        if self.proc is None:
            return False
        if os.getpid() != self.owner:
            # A forked test process sees the shared daemon but is not its parent.
            st = proc_stat(self.pid)
            return bool(st and st["state"] not in "ZX")
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout_s=20):
        """Signals the daemon and waits; returns its exit status (Popen convention)."""
        if self.proc is None:
            return self.returncode
        assert os.getpid() == self.owner, "only the process that started a daemon may stop it"
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=slack(timeout_s))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = "timeout"
                self._finish()
                return "timeout"
        self.returncode = self.proc.returncode
        self._finish()
        return self.returncode

    def kill(self):
        if os.getpid() != self.owner:
            kill_quietly(self.pid)
            return
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.returncode = self.proc.returncode if self.proc else None
        self._finish()

    def find_leftovers(self):
        """Live processes (other than the daemon) carrying this daemon's env tag."""
        needle = ("SANDBOXD_IT_DAEMON=%s\0" % self.tag).encode()
        out = []
        for pid in all_pids():
            if pid in (self.pid, os.getpid()):
                continue
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    if needle not in f.read():
                        continue
            except OSError:
                continue
            r = ProcRef(pid)
            if r.alive():
                out.append(r)
        return out

    def kill_leftovers(self):
        """SIGKILLs what the (exited) daemon left alive; returns descriptions of them."""
        found = []
        for _ in range(3):
            refs = self.find_leftovers()
            if not refs:
                break
            for r in refs:
                st = proc_stat(r.pid)
                found.append("%d(%s)" % (r.pid, st["comm"] if st else "?"))
                kill_quietly(r.pid)
            time.sleep(0.05)
        return sorted(set(found))

    def _finish(self):
        if os.getpid() == self.owner and self.proc is not None and \
                self.proc.poll() is not None:
            self.leftovers = self.kill_leftovers()
        if self.proc and self.proc.stdout and not self.proc.stdout.closed:
            try:
                self.stdout_rest += self.proc.stdout.read()
            except (OSError, ValueError):
                pass
            self.proc.stdout.close()

    def cleanup(self):
        """Stops the daemon if needed and removes its temp dir; the stderr log's sanitizer
        findings stay available through sanitizer_report(from_start=True)."""
        if self.alive():
            self.stop()
        if self._final_report is None:
            self._final_report = self.sanitizer_report(from_start=True) or ""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.cleanup()

    # -- logs
    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, n=2000):
        return self.stderr_text()[-n:]

    def sanitizer_report(self, from_start=False):
        """New sanitizer findings in stderr since the last call (or from the start)."""
        if self._final_report is not None:
            return self._final_report or None
        try:
            with open(self.stderr_path, "rb") as f:
                if not from_start:
                    f.seek(self._stderr_off)
                data = f.read()
                self._stderr_off = f.tell()
        except OSError:
            return None
        text = data.decode("utf-8", "replace")
        for m in SANITIZER_MARKERS:
            i = text.find(m)
            if i >= 0:
                return text[max(0, i - 200):i + 1500]
        return None

    # -- HTTP
    def conn(self, timeout_s=10, rcvbuf=None):
        return Conn(self.host, self.port, timeout_s, rcvbuf=rcvbuf)

    def request(self, method, path, body=None, headers=None, token="default", json_body=None,
                timeout_s=10, host=None):
        if token == "default":
            token = self.token if self.token is not None else self.env_token
        with self.conn(timeout_s) as c:
            return c.request(method, path, body, headers, token, json_body, slack(timeout_s),
                             host)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def post(self, path, json_body=None, **kw):
        return self.request("POST", path, json_body=json_body, **kw)

    def stream(self, method, path, json_body=None, body=None, headers=None, token="default",
               timeout_s=10, rcvbuf=None):
        if token == "default":
            token = self.token if self.token is not None else self.env_token
        c = self.conn(timeout_s, rcvbuf=rcvbuf)
        hdrs = [("Accept", "text/event-stream")] + list((headers or {}).items())
        c.send(c.build_request(method, path, body, hdrs, token, json_body))
        try:
            return Stream(c, method, slack(timeout_s))
        except BaseException:
            c.close()
            raise

    def follow(self, pid, which="output", **kw):
        return self.stream("GET", "/api/v1/processes/%s/%s/follow" % (pid, which), **kw)

    # -- API conveniences (assert success)
    def start(self, command=None, args=None, **fields):
        """POST /processes; asserts 201 and returns the ProcessInfo."""
        body = dict(fields)
        if command is not None:
            body["command"] = command
        if args is not None:
            body["args"] = args
        r = self.post("/api/v1/processes", body)
        assert r.status == 201, "start %r: expected 201, got %d %s" % (body, r.status, r.text)
        return r.json()

    def sh(self, script, **fields):
        return self.start("sh", ["-c", script], **fields)

    def info(self, pid):
        r = self.get("/api/v1/processes/%s" % pid)
        assert r.status == 200, "GET process %s: %d %s" % (pid, r.status, r.text)
        return r.json()

    def list(self):
        r = self.get("/api/v1/processes")
        assert r.status == 200, "list: %d %s" % (r.status, r.text)
        return r.json()["processes"]

    def wait_ended(self, pid, timeout_s=10):
        """Polls GET /processes/{pid} until the status is not running; returns the info."""
        last = {}

        def done():
            last["i"] = self.info(pid)
            return last["i"] if last["i"]["status"] != "running" else None
        try:
            return wait_until(done, slack(timeout_s), 0.02, "process %s to end" % pid)
        except Timeout:
            raise Timeout("process %s still running after %.1fs: %r"
                          % (pid, slack(timeout_s), last.get("i")))

    def output(self, pid, which="output"):
        r = self.get("/api/v1/processes/%s/%s" % (pid, which))
        assert r.status == 200, "GET %s of %s: %d %s" % (which, pid, r.status, r.text)
        return r.json()

    def lines(self, pid, which="stdout"):
        return self.output(pid, which)["lines"]

    def kill_proc(self, pid):
        return self.delete("/api/v1/processes/%s" % pid)

    def run(self, command, args=None, timeout_s=30, check=True, **fields):
        """POST /processes/run and read the whole stream. Returns RunResult (check: asserts
        the stream shape)."""
        body = dict(fields)
        body["command"] = command
        if args is not None:
            body["args"] = args
        with self.stream("POST", "/api/v1/processes/run", json_body=body) as s:
            if s.response is not None:
                raise AssertionError("run %r: expected an SSE stream, got %d %s"
                                     % (body, s.status, s.response.text[:300]))
            events, comments = s.collect(slack(timeout_s))
            res = RunResult(events, comments, s)
        if check:
            res.check_shape()
        return res

    def run_sh(self, script, **kw):
        return self.run("sh", ["-c", script], **kw)

    # -- /proc views of the daemon
    def fd_count(self):
        return fd_count(self.pid)

    def fds(self):
        return fd_list(self.pid)

    def children(self):
        return children_of(self.pid)

    def zombies(self):
        return zombies_of(self.pid)

    def descendants(self):
        return descendants(self.pid)

    def rss_kb(self):
        return rss_kb(self.pid)

    def warm_up(self, n=48):
        """Brings the daemon to its steady state before an fd baseline is taken: n processes
        at once (fills any bounded pool of spare per-process resources, e.g. cgroups), a run
        and a follow. Returns the settled fd count."""
        ps = [self.start("sleep", ["0.3"])["pid"] for _ in range(n)]
        for pid in ps:
            self.wait_ended(pid)
        self.run("true")
        with self.follow(ps[0], "output") as s:
            s.collect(slack(5))
        last, stable = None, 0
        deadline = time.monotonic() + slack(3)
        while stable < 5 and time.monotonic() < deadline:
            c = self.fd_count()
            stable = stable + 1 if c == last else 0
            last = c
            time.sleep(0.05)
        return last

    def settle_fds(self, baseline, tolerance=2, timeout_s=5):
        """Waits for the daemon's fd count to come back to baseline +- tolerance; returns
        the last count."""
        last = [None]

        def ok():
            last[0] = self.fd_count()
            return abs(last[0] - baseline) <= tolerance
        try:
            wait_until(ok, slack(timeout_s), 0.05)
        except Timeout:
            pass
        return last[0]


def assert_error(r, status, code=None):
    """Asserts an error response: status, JSON {"error": str, "code": code}."""
    assert r.status == status, "expected %d %s, got %d %s" % (status, code or "", r.status,
                                                               r.text[:300])
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/json"), \
        "error %d has Content-Type %r, want application/json" % (r.status, ctype)
    j = r.json()
    assert isinstance(j, dict) and isinstance(j.get("error"), str) and j["error"], \
        "error body lacks an 'error' message: %r" % j
    if code is not None:
        assert j.get("code") == code, "expected code %s, got %r (body %r)" % (code, j.get("code"), j)
    return j


PROCESS_INFO_KEYS = ("handle", "pid", "status", "exit_code", "signal", "oom_killed",
                     "stdin_writable", "command", "args", "started_at", "ended_at")


def check_process_info(i):
    """Asserts the ProcessInfo shape (spec §2) and internal consistency."""
    for k in PROCESS_INFO_KEYS:
        assert k in i, "ProcessInfo lacks %r: %r" % (k, i)
    assert isinstance(i["handle"], int) and i["handle"] >= 1, i
    assert isinstance(i["pid"], int) and i["pid"] > 0, i
    assert i["status"] in ("running", "exited", "signaled", "oom_killed"), i
    assert isinstance(i["command"], str), i
    assert isinstance(i["args"], list) and all(isinstance(a, str) for a in i["args"]), i
    assert isinstance(i["started_at"], int) and i["started_at"] > 1e12, i
    assert isinstance(i["oom_killed"], bool), i
    assert isinstance(i["stdin_writable"], bool), i
    st = i["status"]
    if st == "running":
        assert i["exit_code"] is None and i["signal"] is None and i["ended_at"] is None, i
    else:
        assert isinstance(i["ended_at"], int) and i["ended_at"] >= i["started_at"], i
        assert i["stdin_writable"] is False, i
    if st == "exited":
        assert isinstance(i["exit_code"], int) and i["signal"] is None, i
    if st == "signaled":
        assert i["exit_code"] is None and isinstance(i["signal"], int), i
    if st == "oom_killed":
        assert i["oom_killed"] is True and i["signal"] == 9, i
    else:
        assert i["oom_killed"] is False, i
    return i


def find_in_list(procs, pid):
    return [p for p in procs if p["pid"] == pid]


def threaded(fn, *args):
    """Runs fn(*args) in a daemon thread; returns (thread, result_box) where result_box is a
    dict with 'value' or 'error' once the thread ended."""
    box = {}

    def body():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: B902 - reported to the test
            box["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box
