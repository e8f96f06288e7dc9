#!/usr/bin/env python3
"""Runs sandboxd's black-box integration tests.

    python3 tests/integration/run.py --daemon build/sandboxd [-k SUBSTR]... [--slow]

Discovers test_* functions in tests/integration/test_*.py (in file order). Each test runs in
a forked process of its own with a timeout; a test that takes an argument `d` gets the daemon
shared by its file (started with the module's DAEMON options, restarted if a test killed it).
After every test the daemons it used are checked: a daemon that died, or whose stderr shows a
sanitizer report, fails the test that was running. Prints `ok NAME`, `FAIL NAME: reason` or
`skip NAME: reason` per test and the closing line `integration: N passed, N failed`; exits 1
if anything failed.
"""

import argparse
import importlib
import inspect
import json
import os
import select
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

DEFAULT_TIMEOUT = 60.0


def discover(selected, with_slow):
    out = []
    for fname in sorted(os.listdir(HERE)):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        mod = importlib.import_module(fname[:-3])
        tests = []
        for name, fn in vars(mod).items():
            if name.startswith("test_") and inspect.isfunction(fn) and \
                    fn.__module__ == mod.__name__:
                tests.append((fn.__code__.co_firstlineno, name, fn))
        tests.sort()
        chosen = []
        for _, name, fn in tests:
            full = "%s.%s" % (mod.__name__, name)
            if selected and not any(k in full for k in selected):
                continue
            chosen.append((full, fn))
        if chosen:
            out.append((mod, chosen))
    return out


def wants_daemon(fn):
    return "d" in inspect.signature(fn).parameters


def describe_failure(exc):
    """One-line reason plus the innermost test-file frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where, src = "", ""
    for fr in reversed(tb):
        if os.path.basename(fr.filename).startswith("test_"):
            where = "%s:%d: " % (os.path.basename(fr.filename), fr.lineno)
            src = fr.line or ""
            break
    if not where and tb:
        fr = tb[-1]
        where = "%s:%d: " % (os.path.basename(fr.filename), fr.lineno)
        src = fr.line or ""
    msg = str(exc) or ("failed: " + src.strip() if src else exc.__class__.__name__)
    if not isinstance(exc, AssertionError):
        msg = "%s: %s" % (exc.__class__.__name__, msg)
    return where + msg


def child_main(fn, shared, wfd):
    harness._started.clear()
    result = {"status": "ok", "reason": ""}
    try:
        if wants_daemon(fn):
            fn(shared)
        else:
            fn()
    except harness.Skip as e:
        result = {"status": "skip", "reason": str(e)}
    except BaseException as e:  # noqa: B902 - every failure is reported
        result = {"status": "fail", "reason": describe_failure(e)}
    # Daemons the test started itself: stop them and scan their stderr.
    for dm in harness._started:
        if dm is shared:
            continue
        try:
            if dm.alive():
                dm.stop()
            dm.cleanup()
        except BaseException as e:  # noqa: B902
            if result["status"] == "ok":
                result = {"status": "fail", "reason": "stopping a test daemon: %s" % e}
        if dm.leftovers and dm.returncode == 0 and result["status"] == "ok":
            result = {"status": "fail", "reason": "processes outlived a test daemon's "
                      "shutdown (killed now): %s" % ", ".join(dm.leftovers)}
        rep = dm.sanitizer_report(from_start=True)
        if rep:
            result = {"status": "fail",
                      "reason": "sanitizer report in a test daemon's stderr:\n" + rep}
    data = json.dumps(result).encode()
    while data:
        n = os.write(wfd, data)
        data = data[n:]
    os.close(wfd)


def run_one(fn, shared, timeout_s):
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            child_main(fn, shared, w)
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    buf = b""
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while True:
        rem = deadline - time.monotonic()
        if rem <= 0:
            timed_out = True
            break
        rd, _, _ = select.select([r], [], [], min(rem, 1.0))
        if rd:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    os.close(r)
    if timed_out:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
                time.sleep(0.05)
            else:
                continue
            break
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return {"status": "fail", "reason": "timed out after %.0fs" % timeout_s}
    _, st = os.waitpid(pid, 0)
    try:
        return json.loads(buf)
    except ValueError:
        return {"status": "fail", "reason": "test process died (wait status %d) without a "
                                            "result" % st}


def cleanup_shared(d):
    """Kills whatever a test left running in the shared daemon."""
    try:
        for p in d.list():
            if p.get("status") == "running":
                d.kill_proc(p["pid"])
    except BaseException:  # noqa: B902 - best effort
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", required=True, help="path to the sandboxd binary")
    ap.add_argument("-k", action="append", default=[], metavar="SUBSTR",
                    help="run only tests whose module.name contains SUBSTR (repeatable)")
    ap.add_argument("--slow", action="store_true", help="also run tests tagged slow")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help="per-test timeout in seconds before scaling (default 60)")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="timing tolerance factor (default 1, or 3 for a sanitizer build)")
    args = ap.parse_args()

    path = os.path.abspath(args.daemon)
    if not os.access(path, os.X_OK):
        print("run.py: daemon %s is not executable" % path, file=sys.stderr)
        print("integration: 0 passed, 1 failed")
        return 1
    harness.DAEMON_PATH = path
    harness.IS_ASAN = harness.is_asan_binary(path)
    harness.TIME_SCALE = args.time_scale or (3.0 if harness.IS_ASAN else 1.0)
    os.environ["SANDBOXD"] = path
    os.environ["SANDBOXD_IT_TIME_SCALE"] = str(harness.TIME_SCALE)

    passed = failed = skipped = 0
    t0 = time.monotonic()
    for mod, tests in discover(args.k, args.slow):
        shared = None
        opts = getattr(mod, "DAEMON", {})
        for name, fn in tests:
            if getattr(fn, "slow", False) and not args.slow:
                print("skip %s: slow (run with --slow)" % name, flush=True)
                skipped += 1
                continue
            if wants_daemon(fn) and (shared is None or not shared.alive()):
                try:
                    shared = harness.Daemon(**opts)
                except BaseException as e:  # noqa: B902
                    print("FAIL %s: could not start the shared daemon: %s" % (name, e),
                          flush=True)
                    failed += 1
                    shared = None
                    continue
            tmo = getattr(fn, "timeout", args.timeout) * harness.TIME_SCALE
            t1 = time.monotonic()
            res = run_one(fn, shared if wants_daemon(fn) else None, tmo)
            if shared is not None and wants_daemon(fn):
                if not shared.alive():
                    rc = shared.proc.poll()
                    res = {"status": "fail",
                           "reason": "shared daemon died during the test (status %s); "
                                     "stderr tail:\n%s" % (rc, shared.stderr_tail())}
                rep = shared.sanitizer_report()
                if rep:
                    res = {"status": "fail", "reason": "sanitizer report in daemon stderr:\n"
                                                       + rep}
                if shared.alive():
                    cleanup_shared(shared)
                else:
                    shared.kill()     # reaps it and kills what it left behind
                    shared.cleanup()
                    shared = None
            dt = time.monotonic() - t1
            if res["status"] == "ok":
                passed += 1
                print("ok %s (%.1fs)" % (name, dt), flush=True)
            elif res["status"] == "skip":
                skipped += 1
                print("skip %s: %s" % (name, res["reason"]), flush=True)
            else:
                failed += 1
                reason = res["reason"].rstrip().replace("\n", "\n    ")
                print("FAIL %s: %s" % (name, reason), flush=True)
        if shared is not None:
            rc = shared.stop()
            rep = shared.sanitizer_report(from_start=True)
            problem = None
            if rc != 0:
                problem = "shared daemon exited with %s on SIGTERM (want 0); stderr tail:\n%s" \
                          % (rc, shared.stderr_tail())
            elif shared.leftovers:
                problem = "processes outlived the daemon's shutdown (killed now): %s" \
                          % ", ".join(shared.leftovers)
            elif rep:
                problem = "sanitizer report in daemon stderr at shutdown:\n" + rep
            if problem:
                failed += 1
                print("FAIL %s.<shared daemon shutdown>: %s"
                      % (mod.__name__, problem.replace("\n", "\n    ")), flush=True)
            shared.cleanup()
    print("# %d skipped, %.1fs" % (skipped, time.monotonic() - t0))
    print("integration: %d passed, %d failed" % (passed, failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
