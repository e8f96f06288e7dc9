"""How bench.py speaks to a daemon: raw requests for bin/httpload, plus a small
keep-alive JSON client for control calls (start, kill, status).

Adapted from the team's side-by-side harness (shared/bench/dialects.py).

  TensorlakeDialect    sandboxd (/api/v1/processes...): the daemon under test.
  SandboxAgentDialect  rivet sandbox-agent 0.4.x (/v1/processes...): the peer, only
                       used with `bench.py --peer`.

Everything here talks to loopback only (Target refuses any other host).
"""
import http.client
import json
import socket
import time

LOOPBACK = {"127.0.0.1", "localhost"}


class Target:
    """host:port (loopback only) + optional bearer token, with a keep-alive JSON client."""

    def __init__(self, host, port, token=None):
        if host not in LOOPBACK and not host.startswith("127."):
            raise SystemExit(f"refusing non-loopback target {host!r}: the benchmark only runs on this machine")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = int(port)
        self.token = token
        self._conn = None

    def raw_request(self, method, path, body=None, accept="application/json"):
        """The exact bytes of one HTTP/1.1 request, for bin/httpload."""
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Accept: {accept}"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if body is not None:
            lines.append("Content-Type: application/json")
            lines.append(f"Content-Length: {len(data)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + data

    def call(self, method, path, body=None, timeout=30, ok=(200, 201, 204)):
        """-> (status, decoded JSON or text or None); one retry on a dropped keep-alive."""
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            headers = {"Accept": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            try:
                self._conn.request(method, path, data, headers)
                r = self._conn.getresponse()
                raw = r.read()
            except (http.client.HTTPException, ConnectionError, socket.timeout):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = raw.decode(errors="replace")
            if ok and r.status not in ok:
                raise RuntimeError(f"{method} {path} -> {r.status}: {str(doc)[:300]}")
            return r.status, doc

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class TensorlakeDialect:
    """sandboxd's Tensorlake-style API (docs/decisions.md, shared/spec §4-5):
      POST /api/v1/processes/run {command,args[,timeout]} -> SSE: {"handle","pid","started_at"},
            {"line","timestamp","stream"}..., final {"exit_code":N,"signal":null,...}
      POST /api/v1/processes {command,args} -> 201 ProcessInfo {"pid",...}
      GET  /api/v1/processes/{pid}/output/follow -> SSE lines (replay, then live), then
            `event: eof` + {"exit_code",...}
      GET  /api/v1/processes/{pid} -> {"status":"running"|"exited"|"signaled"|"oom_killed",...}
      DELETE /api/v1/processes/{pid} -> SIGKILL, 204
    Lines are sent without their newline (httpload's sse-line mode detects this)."""

    name = "sandboxd"
    run_ok_marker = '"exit_code":0'

    def __init__(self, target):
        self.t = target

    def run_request(self, command, args):
        return self.t.raw_request("POST", "/api/v1/processes/run", {"command": command, "args": args},
                                  accept="text/event-stream")

    def stream_run(self, script):
        body = {"command": "sh", "args": ["-c", script], "timeout": 300}
        return self.t.raw_request("POST", "/api/v1/processes/run", body, accept="text/event-stream"), "sse-line"

    def start_follow(self, script):
        """-> (start request, follow request with {PID}, httpload mode): httpload sends both on one
        connection, so the figure counts from the process's creation."""
        start = self.t.raw_request("POST", "/api/v1/processes", {"command": "sh", "args": ["-c", script]})
        follow = self.t.raw_request("GET", "/api/v1/processes/{PID}/output/follow", accept="text/event-stream")
        return start, follow, "sse-line"

    def start(self, command, args):
        _, d = self.t.call("POST", "/api/v1/processes", {"command": command, "args": args})
        return d["pid"], d["pid"]

    def kill(self, handle):
        self.t.call("DELETE", f"/api/v1/processes/{handle}", ok=(200, 204, 400, 404, 500))

    def status(self, handle):
        st, d = self.t.call("GET", f"/api/v1/processes/{handle}", ok=None)
        if st != 200:
            return f"http-{st}"
        s = d.get("status")
        return "exited" if s in ("exited", "signaled", "oom_killed") else s

    def forget(self, handle):
        return False  # the API keeps ended records (decisions.md)

    def ready(self):
        st, _ = self.t.call("GET", "/api/v1/processes", ok=None, timeout=5)
        return st == 200

    def prepare(self):
        return None

    def restore(self):
        pass


class SandboxAgentDialect:
    """rivet sandbox-agent 0.4.x (the peer; see shared/bench/peer-sandbox-agent-api.md).
    Its /run answers one JSON document (no streaming); its follow stream never ends on its own
    (httpload stops after 5 s without data), and it drops entries under load."""

    name = "sandbox-agent"
    run_ok_marker = '"exitCode":0'
    BIG = 512 << 20

    def __init__(self, target):
        self.t = target
        self._saved = None

    def run_request(self, command, args):
        return self.t.raw_request("POST", "/v1/processes/run", {"command": command, "args": args})

    def stream_run(self, script):
        body = {"command": "sh", "args": ["-c", script], "timeoutMs": 300000, "maxOutputBytes": self.BIG}
        return self.t.raw_request("POST", "/v1/processes/run", body), "jsonstr:stdout"

    def start_follow(self, script):
        return None  # ids are strings: start through start(), then follow

    def follow_request(self, handle):
        return (self.t.raw_request("GET", f"/v1/processes/{handle}/logs?follow=true&stream=stdout",
                                   accept="text/event-stream"), "sse-b64")

    def start(self, command, args):
        _, d = self.t.call("POST", "/v1/processes", {"command": command, "args": args})
        return d["id"], d.get("pid")

    def kill(self, handle):
        self.t.call("POST", f"/v1/processes/{handle}/kill", ok=(200, 409))

    def status(self, handle):
        st, d = self.t.call("GET", f"/v1/processes/{handle}", ok=None)
        return d.get("status") if st == 200 else f"http-{st}"

    def forget(self, handle):
        st, _ = self.t.call("DELETE", f"/v1/processes/{handle}", ok=None)
        return st == 204

    def ready(self):
        st, _ = self.t.call("GET", "/v1/health", ok=None, timeout=5)
        return st == 200

    def prepare(self):
        _, cur = self.t.call("GET", "/v1/processes/config")
        if self._saved is None:
            self._saved = cur
        new = dict(cur, maxConcurrentProcesses=max(256, cur["maxConcurrentProcesses"]),
                   maxOutputBytes=self.BIG, maxLogBytesPerProcess=self.BIG,
                   maxRunTimeoutMs=max(600000, cur["maxRunTimeoutMs"]))
        self.t.call("POST", "/v1/processes/config", new)
        return {"default_config": cur, "bench_config": new}

    def restore(self):
        if self._saved:
            self.t.call("POST", "/v1/processes/config", self._saved)


def wait_exited(dialect, handles, timeout=30):
    """Poll until none of handles is running; -> the handles still running at the deadline."""
    end = time.time() + timeout
    left = list(handles)
    while left and time.time() < end:
        left = [h for h in left if dialect.status(h) == "running"]
        if left:
            time.sleep(0.05)
    return left
