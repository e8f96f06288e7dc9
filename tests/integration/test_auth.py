"""Bearer-token auth (decisions: 401 UNAUTHORIZED on every route but /api/v1/health) and
secret hygiene (req 23): the token never shows up in the daemon's logs."""

import time

import harness
from harness import Daemon, assert_error

TOKEN = "s3cr3t-T0KEN-a9f1c2e4d5b6"
WRONG = "wr0ng-T0KEN-77aa88bb99cc"
DAEMON = {"token": TOKEN, "verbose": True}


def routes(pid):
    base = "/api/v1/processes/%d" % pid
    return [("GET", "/api/v1/info", None), ("GET", "/api/v1/processes", None),
            ("POST", "/api/v1/processes", b'{"command":"true"}'),
            ("POST", "/api/v1/processes/run", b'{"command":"true"}'),
            ("GET", base, None), ("DELETE", base, None),
            ("POST", base + "/signal", b'{"signal":15}'),
            ("POST", base + "/stdin", b"x"), ("POST", base + "/stdin/close", b""),
            ("GET", base + "/stdout", None), ("GET", base + "/stderr", None),
            ("GET", base + "/output", None), ("GET", base + "/stdout/follow", None),
            ("GET", base + "/stderr/follow", None), ("GET", base + "/output/follow", None)]


def test_health_needs_no_token(d):
    r = d.get("/api/v1/health", token=None)
    assert r.status == 200 and r.json() == {"healthy": True}, r
    r = d.get("/api/v1/health", token=WRONG)
    assert r.status == 200, r


def test_every_route_needs_token(d):
    p = d.start("sleep", ["300"], stdin_mode="pipe")
    n = len(d.list())
    bad_auth = [None, WRONG, TOKEN[:-1], TOKEN + "x", "", TOKEN.upper()]
    for method, path, body in routes(p["pid"]):
        for tok in bad_auth:
            r = d.request(method, path, body=body, token=tok,
                          headers={"Content-Type": "application/json"} if body else None)
            assert_error(r, 401, "UNAUTHORIZED")
            assert TOKEN not in r.text and WRONG not in r.text, r.text
    # Other schemes and places are not accepted either.
    for hdr in ({"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN},
                {"Authorization": "Token " + TOKEN}, {"X-Api-Key": TOKEN}):
        assert_error(d.get("/api/v1/info", token=None, headers=hdr), 401, "UNAUTHORIZED")
    assert_error(d.get("/api/v1/info?token=" + TOKEN, token=None), 401, "UNAUTHORIZED")
    assert_error(d.get("/api/v1/info?access_token=" + TOKEN, token=None), 401, "UNAUTHORIZED")
    # Nothing happened: the process runs, no record was added, stdin untouched.
    i = d.info(p["pid"])
    assert i["status"] == "running" and i["stdin_writable"] is True, i
    assert len(d.list()) == n
    d.kill_proc(p["pid"])


def test_unknown_route_without_token(d):
    r = d.get("/api/v1/nope", token=None)
    assert r.status in (401, 404), r
    assert_error(r, r.status)


def test_correct_token_works(d):
    assert d.get("/api/v1/info").status == 200
    res = d.run("echo", ["authed"])
    assert res.lines() == ["authed"]
    p = d.start("sh", ["-c", "echo x"])
    d.wait_ended(p["pid"])
    assert d.lines(p["pid"]) == ["x"]


def test_token_not_in_logs(d):
    # Wrong, right and query-string tokens, failing requests, a command mentioning none.
    for tok in (WRONG, TOKEN, None):
        d.get("/api/v1/info", token=tok)
        d.post("/api/v1/processes", {"command": "no-such-cmd"}, token=tok)
    d.get("/api/v1/info?token=" + WRONG, token=None)
    d.request("GET", "/api/v1/info", token=None,
              headers={"Authorization": "Basic " + WRONG})
    d.run("true")
    time.sleep(0.2)
    log = d.stderr_text()
    for secret in (TOKEN, WRONG):
        assert secret not in log, "secret %r appears in the daemon's stderr" % secret[:6]
    assert TOKEN.encode() not in d.stdout_rest


def test_token_not_in_child_env(d):
    res = d.run("env")
    assert not [ln for ln in res.lines() if TOKEN in ln], "children see the daemon's token"


def test_env_token():
    with Daemon(env_token=TOKEN) as dm:
        assert dm.get("/api/v1/health", token=None).status == 200
        assert_error(dm.get("/api/v1/info", token=None), 401, "UNAUTHORIZED")
        assert_error(dm.get("/api/v1/info", token=WRONG), 401, "UNAUTHORIZED")
        assert dm.get("/api/v1/info", token=TOKEN).status == 200
        res = dm.run("env")
        assert not [ln for ln in res.lines() if TOKEN in ln], \
            "SANDBOXD_TOKEN leaked into a child's environment"
        assert TOKEN not in dm.stderr_text()


def test_flag_token_wins_over_env():
    with Daemon(token=TOKEN, env_token=WRONG) as dm:
        assert dm.get("/api/v1/info", token=TOKEN).status == 200
        assert_error(dm.get("/api/v1/info", token=WRONG), 401, "UNAUTHORIZED")


def test_no_token_configured_allows_all():
    with Daemon() as dm:
        assert dm.get("/api/v1/info", token=None).status == 200
        assert dm.get("/api/v1/info", token="anything").status == 200
