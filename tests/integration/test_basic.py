"""Health, info, start/list/get, process fields (env, cwd, user, modes), the command line."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import harness
from harness import Daemon, check_process_info, find_in_list

DAEMON = {}


def wait_exit(d, pid):
    return check_process_info(d.wait_ended(pid))


# ---- health / info ---------------------------------------------------------------------------

def test_health(d):
    r = d.get("/api/v1/health")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    assert r.json() == {"healthy": True}, r.json()


def test_info_counts(d):
    r = d.get("/api/v1/info")
    assert r.status == 200, r
    i = r.json()
    assert isinstance(i.get("version"), str) and i["version"], i
    for k in ("uptime_secs", "running_processes", "total_processes"):
        assert isinstance(i.get(k), int) and i[k] >= 0, (k, i)
    p = d.start("sleep", ["30"])
    i2 = d.get("/api/v1/info").json()
    assert i2["total_processes"] == i["total_processes"] + 1, (i, i2)
    assert i2["running_processes"] == i["running_processes"] + 1, (i, i2)
    assert d.kill_proc(p["pid"]).status == 204
    d.wait_ended(p["pid"])
    i3 = d.get("/api/v1/info").json()
    assert i3["running_processes"] == i["running_processes"], (i, i3)
    assert i3["total_processes"] == i2["total_processes"], "ended records still count: %r" % i3


def test_info_uptime_advances(d):
    u1 = d.get("/api/v1/info").json()["uptime_secs"]
    time.sleep(1.1)
    u2 = d.get("/api/v1/info").json()["uptime_secs"]
    assert u2 >= u1 + 1, (u1, u2)


def test_ignores_host_and_client_headers(d):
    hdrs = {"traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
            "User-Agent": "tensorlake-rust-sdk/0.5.113",
            "X-Tensorlake-Request-Timeout-Ms": "30000",
            "X-Tensorlake-Sandbox-Id": "sbx123",
            "X-Forwarded-Organization-Id": "org"}
    r = d.request("GET", "/api/v1/health", headers=hdrs, host="sbx123.local")
    assert r.status == 200 and r.json() == {"healthy": True}, r
    r = d.request("GET", "/api/v1/processes", headers=hdrs, host="sbx123.local")
    assert r.status == 200 and "processes" in r.json(), r


def test_keepalive_connection_reuse(d):
    with d.conn() as c:
        for _ in range(5):
            r = c.request("GET", "/api/v1/health")
            assert r.status == 200 and r.json() == {"healthy": True}, r
        r = c.request("POST", "/api/v1/processes", json_body={"command": "true"})
        assert r.status == 201, r
        r = c.request("GET", "/api/v1/processes/%d" % r.json()["pid"])
        assert r.status == 200, r


def test_pipelined_requests(d):
    with d.conn() as c:
        c.send(c.build_request("GET", "/api/v1/health") + c.build_request("GET", "/api/v1/info"))
        r1 = c.read_response()
        r2 = c.read_response()
    assert r1.json() == {"healthy": True}, r1
    assert "uptime_secs" in r2.json(), r2


# ---- start / get / list ------------------------------------------------------------------------

def test_start_process_info(d):
    t0 = harness.now_ms()
    r = d.post("/api/v1/processes", {"command": "sleep", "args": ["30"]})
    assert r.status == 201, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    p = check_process_info(r.json())
    assert p["status"] == "running", p
    assert p["command"] == "sleep" and p["args"] == ["30"], p
    assert p["stdin_writable"] is False, p
    assert p["oom_killed"] is False and p["exit_code"] is None and p["signal"] is None, p
    assert abs(p["started_at"] - t0) < 5000, (p["started_at"], t0)
    st = harness.proc_stat(p["pid"])
    assert st is not None and st["comm"] == "sleep", "pid %d is not our sleep: %r" % (p["pid"], st)
    g = check_process_info(d.info(p["pid"]))
    for k in ("handle", "pid", "status", "command", "args", "started_at"):
        assert g[k] == p[k], (k, g, p)
    assert d.kill_proc(p["pid"]).status == 204


def test_handles_increase(d):
    a = d.start("true")
    b = d.start("true")
    assert b["handle"] > a["handle"] >= 1, (a, b)
    assert a["pid"] != b["pid"]


def test_args_default_empty(d):
    p = d.start("true")
    assert p["args"] == [], p


def test_list_has_running_and_ended(d):
    a = d.start("sleep", ["30"])
    b = d.start("sh", ["-c", "exit 4"])
    wait_exit(d, b["pid"])
    procs = d.list()
    for x in procs:
        check_process_info(x)
    ra, rb = find_in_list(procs, a["pid"]), find_in_list(procs, b["pid"])
    assert len(ra) == 1 and ra[0]["status"] == "running", ra
    assert len(rb) == 1 and rb[0]["status"] == "exited" and rb[0]["exit_code"] == 4, rb
    handles = [x["handle"] for x in procs]
    assert len(handles) == len(set(handles)), "duplicate handles in list"
    d.kill_proc(a["pid"])


def test_get_after_exit(d):
    p = d.start("sh", ["-c", "sleep 0.2; exit 7"])
    i = wait_exit(d, p["pid"])
    assert i["status"] == "exited" and i["exit_code"] == 7 and i["signal"] is None, i
    assert i["ended_at"] - i["started_at"] >= 150, i
    assert i["handle"] == p["handle"], i


def test_exit_zero_reported_as_zero(d):
    p = d.start("true")
    i = wait_exit(d, p["pid"])
    assert i["status"] == "exited" and i["exit_code"] == 0, i


# ---- command / args / env / cwd ----------------------------------------------------------------

def test_path_lookup_and_absolute_command(d):
    p = d.start("echo", ["via", "path"])
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == ["via path"]
    p = d.start("/bin/echo", ["absolute"])
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == ["absolute"]


def test_no_shell_interpretation(d):
    p = d.start("echo", ["$HOME", "*", "a;b", "`id`", "x > y"])
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == ["$HOME * a;b `id` x > y"], d.lines(p["pid"])


def test_args_with_spaces_quotes_and_unicode(d):
    args = ["a b", "'q'", '"dq"', "ünï€😀", "", "-n"]
    p = d.start("python3", ["-c", "import sys, json; print(json.dumps(sys.argv[1:]))"] + args)
    i = wait_exit(d, p["pid"])
    assert i["exit_code"] == 0, (i, d.lines(p["pid"], "output"))
    import json
    assert json.loads(d.lines(p["pid"])[0]) == args
    assert i["args"][2:] == args, i


def test_env_merged_over_daemon_env(d):
    p = d.start("sh", ["-c", 'echo "$FOO|$SANDBOXD_IT_MARK|$BAR"; echo "$PATH"'],
                env={"FOO": "foo value", "BAR": "ü=x"})
    wait_exit(d, p["pid"])
    out = d.lines(p["pid"])
    assert out[0] == "foo value|daemon-env|ü=x", out
    assert out[1] == os.environ["PATH"], "PATH not inherited from the daemon: %r" % out


def test_env_overrides_daemon_var(d):
    p = d.start("sh", ["-c", 'echo "$SANDBOXD_IT_MARK"'], env={"SANDBOXD_IT_MARK": "override"})
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == ["override"]


def test_env_path_used_for_lookup(d):
    tmp = tempfile.mkdtemp(prefix="sbx-path-")
    try:
        exe = os.path.join(tmp, "only-here-cmd")
        with open(exe, "w") as f:
            f.write("#!/bin/sh\necho found-it\n")
        os.chmod(exe, 0o755)
        p = d.start("only-here-cmd", env={"PATH": tmp + ":/usr/bin:/bin"})
        wait_exit(d, p["pid"])
        assert d.lines(p["pid"]) == ["found-it"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_working_dir(d):
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="sbx-cwd-"))
    try:
        p = d.start("pwd", working_dir=tmp)
        wait_exit(d, p["pid"])
        assert d.lines(p["pid"]) == [tmp]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_default_working_dir_is_daemons(d):
    p = d.start("pwd")
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == [os.readlink("/proc/%d/cwd" % d.pid)]


# ---- modes ---------------------------------------------------------------------------------------

def test_stdout_discard(d):
    p = d.start("sh", ["-c", "echo out; echo err >&2"], stdout_mode="discard")
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"], "stdout") == []
    assert d.lines(p["pid"], "stderr") == ["err"]
    assert d.lines(p["pid"], "output") == ["err"]


def test_stderr_discard(d):
    p = d.start("sh", ["-c", "echo out; echo err >&2"], stderr_mode="discard")
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"], "stdout") == ["out"]
    assert d.lines(p["pid"], "stderr") == []


def test_discard_is_dev_null(d):
    p = d.start("sleep", ["30"], stdout_mode="discard", stderr_mode="capture")
    fds = harness.fd_list(p["pid"])
    assert fds.get(0) == "/dev/null", fds
    assert fds.get(1) == "/dev/null", fds
    assert fds.get(2, "").startswith("pipe:"), fds
    d.kill_proc(p["pid"])


def test_explicit_default_modes(d):
    p = d.start("sh", ["-c", "echo x"], stdin_mode="closed", stdout_mode="capture",
                stderr_mode="capture")
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == ["x"]


# ---- user ------------------------------------------------------------------------------------------

def _id_of(d, user):
    p = d.start("sh", ["-c", 'id -u; id -g; echo "$HOME|$USER|$LOGNAME"'], user=user)
    i = wait_exit(d, p["pid"])
    out = d.lines(p["pid"], "output")
    assert i["exit_code"] == 0, (user, i, out)
    return out


def test_user_forms(d):
    if os.getuid() != 0:
        raise harness.Skip("user switching needs root")
    nobody = "65534"
    for form in ("nobody", "65534", "65534:65534", {"uid": 65534, "gid": 65534},
                 {"name": "nobody"}):
        out = _id_of(d, form)
        assert out[0] == nobody and out[1] == nobody, (form, out)
    # A user in passwd gets HOME/USER/LOGNAME.
    out = _id_of(d, "nobody")
    assert out[2] == "/nonexistent|nobody|nobody", out


def test_user_numeric_not_in_passwd(d):
    if os.getuid() != 0:
        raise harness.Skip("user switching needs root")
    out = _id_of(d, "23456:34567")
    assert out[:2] == ["23456", "34567"], out


def test_user_env_given_wins(d):
    if os.getuid() != 0:
        raise harness.Skip("user switching needs root")
    p = d.start("sh", ["-c", 'echo "$HOME"'], user="nobody", env={"HOME": "/tmp"})
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == ["/tmp"]


def test_user_switch_drops_groups(d):
    if os.getuid() != 0:
        raise harness.Skip("user switching needs root")
    p = d.start("sleep", ["30"], user="nobody")
    st = harness.proc_status(p["pid"])
    d.kill_proc(p["pid"])
    assert st["Uid"].split() == ["65534"] * 4, st["Uid"]
    assert st["Gid"].split() == ["65534"] * 4, st["Gid"]
    assert "0" not in st["Groups"].split(), "root group kept: %r" % st["Groups"]


def test_default_user_is_daemons(d):
    p = d.start("id", ["-u"])
    wait_exit(d, p["pid"])
    assert d.lines(p["pid"]) == [str(os.getuid())]


# ---- command line ------------------------------------------------------------------------------

def test_cli_help():
    r = subprocess.run([harness.DAEMON_PATH, "--help"], capture_output=True, timeout=10)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    text = (r.stdout + r.stderr).decode("utf-8", "replace")
    for opt in ("--listen", "--token", "--state-dir"):
        assert opt in text, "--help does not mention %s: %r" % (opt, text[:500])


def test_cli_unknown_option():
    r = subprocess.run([harness.DAEMON_PATH, "--no-such-option"], capture_output=True,
                       timeout=10)
    assert r.returncode != 0, r
    assert b"listening on" not in r.stdout, r.stdout
    assert r.stderr.strip(), "no message on stderr for an unknown option"


def test_cli_option_forms_and_bad_values():
    # "--name VALUE" and "--name=VALUE" both work; a missing value, a stray argument, a value
    # given to a flag and a bad port are refused with exit 2 and a message, never a listener.
    tmp = tempfile.mkdtemp(prefix="sbx-cli-")
    try:
        p = subprocess.Popen([harness.DAEMON_PATH, "--listen=127.0.0.1:0", "--state-dir=" + tmp],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = p.stdout.readline()
            assert re.fullmatch(rb"listening on 127\.0\.0\.1:\d+\n", line), line
        finally:
            p.terminate()
            p.communicate(timeout=10)
        assert p.returncode == 0, p.returncode
        for argv in (["--listen"], ["--state-dir", tmp, "stray"], ["--verbose=1"],
                     ["--listen", "127.0.0.1:65536"], ["--listen", "127.0.0.1:"],
                     ["--listen", "127.0.0.1:80x"], ["--"]):
            r = subprocess.run([harness.DAEMON_PATH, *argv], capture_output=True, timeout=10)
            assert r.returncode == 2, (argv, r.returncode, r.stderr[-300:])
            assert b"listening on" not in r.stdout, (argv, r.stdout)
            assert r.stderr.strip(), "no message for %r" % (argv,)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_cli_listening_line_exactly_once():
    with Daemon() as dm:
        assert re.fullmatch(r"listening on 127\.0\.0\.1:\d+", dm.listen_line), dm.listen_line
        assert 0 < dm.port < 65536
        assert dm.get("/api/v1/health").status == 200
        rc = dm.stop()
        assert rc == 0, rc
        assert dm.stdout_rest.strip() == b"", "more stdout after the listening line: %r" \
            % dm.stdout_rest[:300]


def test_cli_refuses_nonloopback_without_token():
    tmp = tempfile.mkdtemp(prefix="sbx-cli-")
    try:
        env = dict(os.environ)
        env.pop("SANDBOXD_TOKEN", None)
        r = subprocess.run([harness.DAEMON_PATH, "--listen", "0.0.0.0:0", "--state-dir", tmp],
                           capture_output=True, timeout=10, env=env)
        assert r.returncode == 2, (r.returncode, r.stderr[-500:])
        assert b"listening on" not in r.stdout, r.stdout
        assert r.stderr.strip(), "refusal without a message on stderr"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_cli_nonloopback_with_token():
    with Daemon(listen="0.0.0.0:0", token="tok-nonloop") as dm:
        assert dm.listen_line.startswith("listening on 0.0.0.0:"), dm.listen_line
        dm.host = "127.0.0.1"
        assert dm.get("/api/v1/health", token=None).status == 200
        assert dm.get("/api/v1/info", token=None).status == 401
        assert dm.get("/api/v1/info").status == 200


def test_cli_nonloopback_with_env_token():
    with Daemon(listen="0.0.0.0:0", env_token="tok-from-env") as dm:
        dm.host = "127.0.0.1"
        assert dm.get("/api/v1/info", token=None).status == 401
        assert dm.get("/api/v1/info", token="tok-from-env").status == 200


def test_cli_sigint_exits_zero():
    with Daemon() as dm:
        assert dm.get("/api/v1/health").status == 200
        assert dm.stop(signal.SIGINT) == 0


def test_cli_listen_port_in_use():
    with Daemon() as dm:
        tmp = tempfile.mkdtemp(prefix="sbx-cli-")
        try:
            r = subprocess.run([harness.DAEMON_PATH, "--listen", "127.0.0.1:%d" % dm.port,
                                "--state-dir", tmp], capture_output=True, timeout=10)
            assert r.returncode != 0, r
            assert b"listening on" not in r.stdout, r.stdout
            assert r.stderr.strip(), "no message when the port is taken"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert dm.get("/api/v1/health").status == 200


def test_state_dir_created_if_missing():
    tmp = tempfile.mkdtemp(prefix="sbx-cli-")
    try:
        sd = os.path.join(tmp, "state")
        with Daemon(state_dir=sd) as dm:
            p = dm.start("echo", ["hi"])
            dm.wait_ended(p["pid"])
            assert dm.lines(p["pid"]) == ["hi"]
            assert os.path.isdir(sd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_max_records_evicts_oldest_ended():
    # --max-records bounds the memory of history: beyond it the oldest ended records are
    # forgotten (404), with their output; running ones never are.
    with Daemon(args=["--max-records", "3"]) as dm:
        keep = dm.start("sleep", ["30"])
        pids = []
        for i in range(6):
            p = dm.start("sh", ["-c", "echo rec%d" % i])
            dm.wait_ended(p["pid"])
            pids.append(p["pid"])
        listed = [q["pid"] for q in dm.list()]
        assert keep["pid"] in listed, listed
        ended = [pid for pid in pids if pid in listed]
        assert ended == pids[-3:], (ended, pids)
        assert dm.get("/api/v1/processes/%d" % pids[0]).status == 404
        assert dm.output(pids[-1], "stdout")["lines"] == ["rec5"]
        dm.kill_proc(keep["pid"])
