// Drives sandboxd with Tensorlake's real TypeScript SDK (npm `tensorlake`, a thin shim over the
// Rust core shipped as a napi binary), the way a Tensorlake user would. Run through
// tests/sdk/run.sh, which sets SANDBOXD_BIN and uses the pinned Node 22 runtime.
//
// How the SDK is pointed at the daemon: `new Sandbox({ sandboxId, proxyUrl })` with proxyUrl
// "http://127.0.0.1:PORT". Because the host is 127.0.0.1 the Rust core sends
// `Host: <sandboxId>.local` and no X-Tensorlake-Sandbox-Id header (spec §1); with `apiKey`
// it adds `Authorization: Bearer <apiKey>`. No lifecycle API (api.tensorlake.ai) is contacted.
//
// Expectations come from shared/spec/tensorlake-sandbox-api.md and docs/decisions.md.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { OutputMode, ProcessStatus, RemoteAPIError, Sandbox, StdinMode } from "tensorlake";
import { collect, isAlive, sleep, startDaemon, waitFor } from "./lib/daemon.mjs";

const SANDBOX_ID = "sbx-sdk-test";
const NO_SUCH_PID = 2147483000; // all digits, int32, never a real pid here
const T = { timeout: 30000 };
const ENV_MARK = "sandboxd-sdk-env-mark";

let d; // the daemon under test (no token)
let sb; // SDK handle on it
let workDir; // a real directory for working_dir tests
const toKill = new Set();

before(async () => {
  d = await startDaemon({ env: { SANDBOXD_SDK_MARK: ENV_MARK } });
  sb = new Sandbox({ sandboxId: SANDBOX_ID, proxyUrl: d.url });
  workDir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), "sandboxd-sdk-wd-")));
});

after(async () => {
  for (const pid of toKill) {
    try {
      await sb.killProcess(pid);
    } catch {}
  }
  sb?.close();
  if (d && !d.exited()) {
    const r = await d.stop();
    if (r.code !== 0) console.error(`daemon exit: ${JSON.stringify(r)}\n${d.stderrTail()}`);
  }
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

/** Starts a process and remembers it, so a failing test leaves nothing running. */
async function start(command, options) {
  const p = await sb.startProcess(command, options);
  toKill.add(p.pid);
  return p;
}

/** Polls getProcess until the process is no longer running; returns the final ProcessInfo. */
async function waitExit(pid, timeoutMs = 10000) {
  return waitFor(
    async () => {
      const p = await sb.getProcess(pid);
      return p.status !== ProcessStatus.RUNNING ? p : null;
    },
    { timeoutMs, what: `process ${pid} to end` },
  );
}

/** Polls getStdout until `pred(lines)` holds; returns the lines. */
async function waitStdout(pid, pred, timeoutMs = 10000) {
  return waitFor(
    async () => {
      const r = await sb.getStdout(pid);
      return pred(r.lines) ? r.lines : null;
    },
    { timeoutMs, what: `stdout of ${pid}` },
  );
}

/** Asserts `promise` rejects with the SDK's RemoteAPIError carrying `status`. */
async function rejectsWithStatus(promise, status, label = "") {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof RemoteAPIError, `${label} expected RemoteAPIError, got ${e?.constructor?.name}: ${e?.message}`);
    assert.equal(e.statusCode, status, `${label} status (message: ${e.message})`);
    return true;
  });
}

function assertRecentDate(v, label) {
  assert.ok(v instanceof Date, `${label} is a Date (got ${v})`);
  assert.ok(Math.abs(Date.now() - v.getTime()) < 120000, `${label} is now-ish in ms (got ${v.toISOString()})`);
}

describe("daemon basics", () => {
  test("health reports healthy", T, async () => {
    const h = await sb.health();
    assert.equal(h.healthy, true);
  });

  test("daemonInfo reports version and process counts", T, async () => {
    const info = await sb.daemonInfo();
    assert.equal(typeof info.version, "string");
    assert.ok(info.version.length > 0, "version is not empty");
    assert.equal(typeof info.uptimeSecs, "number");
    assert.ok(info.uptimeSecs >= 0);
    assert.equal(typeof info.runningProcesses, "number");
    assert.equal(typeof info.totalProcesses, "number");
    assert.ok(info.totalProcesses >= info.runningProcesses);
  });
});

describe("run", () => {
  test("run returns stdout and exit code 0", T, async () => {
    const r = await sb.run("echo", { args: ["hello", "sdk world"] });
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, "hello sdk world");
    assert.equal(r.stderr, "");
  });

  test("run separates stdout and stderr lines, keeps a final partial line", T, async () => {
    const r = await sb.run("sh", {
      args: ["-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2; printf 'no-newline'"],
    });
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, "out1\nout2\nno-newline");
    assert.equal(r.stderr, "err1\nerr2");
  });

  test("run passes env and working_dir, merged over the daemon's environment", T, async () => {
    const r = await sb.run("sh", {
      args: ["-c", 'echo "$SDK_FOO"; pwd; echo "$SANDBOXD_SDK_MARK"'],
      env: { SDK_FOO: "bar baz" },
      workingDir: workDir,
    });
    assert.equal(r.exitCode, 0, r.stderr);
    assert.deepEqual(r.stdout.split("\n"), ["bar baz", workDir, ENV_MARK]);
  });

  test("run reports a non-zero exit code", T, async () => {
    const r = await sb.run("sh", { args: ["-c", "echo before; echo oops >&2; exit 7"] });
    assert.equal(r.exitCode, 7);
    assert.equal(r.stdout, "before");
    assert.equal(r.stderr, "oops");
  });

  test("run: death by signal is a negative exit code", T, async () => {
    const r = await sb.run("sh", { args: ["-c", "echo dying; kill -TERM $$; sleep 5"] });
    assert.equal(r.exitCode, -15);
    assert.equal(r.stdout, "dying");
  });

  test("run: timeout kills the process (SIGKILL, -9) and keeps earlier output", T, async () => {
    const t0 = Date.now();
    const r = await sb.run("sh", { args: ["-c", "echo started; sleep 30"], timeout: 1 });
    const ms = Date.now() - t0;
    assert.equal(r.exitCode, -9);
    assert.equal(r.stdout, "started");
    assert.ok(ms >= 900, `returned before the timeout (${ms} ms)`);
    assert.ok(ms < 8000, `timeout of 1 s took ${ms} ms`);
  });

  test("run: fractional timeout kills the whole process tree", T, async () => {
    const t0 = Date.now();
    const r = await sb.run("sh", { args: ["-c", "sleep 30 & echo $!; wait"], timeout: 0.5 });
    assert.equal(r.exitCode, -9);
    assert.ok(Date.now() - t0 < 8000);
    const child = Number(r.stdout.trim());
    assert.ok(Number.isInteger(child) && child > 1, `background pid printed (got ${JSON.stringify(r.stdout)})`);
    await waitFor(() => !isAlive(child), { timeoutMs: 5000, what: `background sleep ${child} to be killed` });
  });

  test("run: unknown command is an API error (400), not a stream", T, async () => {
    await rejectsWithStatus(sb.run("sandboxd-no-such-command-xyz"), 400, "run unknown command");
  });

  test("run: missing working_dir is an API error (400)", T, async () => {
    await rejectsWithStatus(sb.run("true", { workingDir: path.join(workDir, "does-not-exist") }), 400, "run bad cwd");
  });

  test("run delivers large output completely and in order", T, async () => {
    const r = await sb.run("seq", { args: ["1", "20000"] });
    assert.equal(r.exitCode, 0);
    const lines = r.stdout.split("\n");
    assert.equal(lines.length, 20000);
    assert.equal(lines[0], "1");
    assert.equal(lines[9999], "10000");
    assert.equal(lines[19999], "20000");
  });

  test("run: a line longer than 64 KiB arrives whole once the SDK joins the pieces", T, async () => {
    // decisions.md: such a line is sent as consecutive events of <= 64 KiB; the SDK joins
    // stdout lines with "\n", so we only check that no byte is lost.
    const r = await sb.run("sh", { args: ["-c", "head -c 100000 /dev/zero | tr '\\0' x; echo; echo tail"] });
    assert.equal(r.exitCode, 0);
    const parts = r.stdout.split("\n");
    assert.equal(parts[parts.length - 1], "tail");
    assert.equal(parts.slice(0, -1).join("").length, 100000);
    assert.ok(parts.slice(0, -1).every((p) => /^x+$/.test(p) && p.length <= 65536));
  });
});

describe("start, get, list", () => {
  let exited; // an ended process, for the list test

  test("startProcess with args, env and working_dir; output captured; exit recorded", T, async () => {
    const args = ["-c", 'echo "$SDK_FOO"; pwd; sleep 0.2; echo to-err >&2; sleep 0.3'];
    const p = await start("sh", { args, env: { SDK_FOO: "bar baz" }, workingDir: workDir });
    assert.ok(Number.isInteger(p.pid) && p.pid > 1, `pid ${p.pid}`);
    assert.equal(p.status, ProcessStatus.RUNNING);
    assert.equal(p.command, "sh");
    assert.deepEqual(p.args, args);
    assert.equal(p.stdinWritable, false);
    assert.ok(Number.isInteger(p.handle) && p.handle >= 1, `handle ${p.handle}`);
    assertRecentDate(p.startedAt, "startedAt");
    assert.equal(p.endedAt, undefined);
    assert.equal(p.exitCode, undefined);

    const got = await sb.getProcess(p.pid);
    assert.equal(got.pid, p.pid);
    assert.equal(got.handle, p.handle);
    assert.equal(got.command, "sh");

    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.EXITED);
    assert.equal(fin.exitCode, 0);
    assert.equal(fin.signal, undefined);
    assertRecentDate(fin.endedAt, "endedAt");
    assert.ok(fin.endedAt.getTime() >= fin.startedAt.getTime(), "endedAt >= startedAt");
    assert.ok(fin.endedAt.getTime() - fin.startedAt.getTime() >= 400, "ran for about 0.5 s");

    const out = await sb.getStdout(p.pid);
    assert.equal(out.pid, p.pid);
    assert.deepEqual(out.lines, ["bar baz", workDir]);
    assert.equal(out.lineCount, 2);
    const err = await sb.getStderr(p.pid);
    assert.deepEqual(err.lines, ["to-err"]);
    assert.equal(err.lineCount, 1);
    const both = await sb.getOutput(p.pid);
    assert.deepEqual(both.lines, ["bar baz", workDir, "to-err"], "output in capture order");
    assert.equal(both.lineCount, 3);
    exited = fin;
  });

  test("getProcess reports a non-zero exit code", T, async () => {
    const p = await start("sh", { args: ["-c", "exit 5"] });
    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.EXITED);
    assert.equal(fin.exitCode, 5);
    assert.equal(fin.signal, undefined);
  });

  test("listProcesses lists running and ended processes", T, async () => {
    const running = await start("sleep", { args: ["30"] });
    const list = await sb.listProcesses();
    assert.ok(Array.isArray(list));
    const r = list.find((x) => x.pid === running.pid);
    assert.ok(r, "running process listed");
    assert.equal(r.status, ProcessStatus.RUNNING);
    assert.deepEqual(r.args, ["30"]);
    if (exited) {
      const e = list.find((x) => x.pid === exited.pid);
      assert.ok(e, "ended process still listed");
      assert.equal(e.status, ProcessStatus.EXITED);
      assert.equal(e.exitCode, 0);
    }
    const handles = list.map((x) => x.handle);
    assert.equal(new Set(handles).size, handles.length, "handles are unique");
    const info = await sb.daemonInfo();
    assert.ok(info.runningProcesses >= 1);
    assert.ok(info.totalProcesses >= list.length);
    await sb.killProcess(running.pid);
    await waitExit(running.pid);
  });

  test("getProcess of an unknown pid is 404", T, async () => {
    await rejectsWithStatus(sb.getProcess(NO_SUCH_PID), 404, "get");
  });

  test("startProcess of an unknown command is 400 and leaves no record", T, async () => {
    const before = (await sb.listProcesses()).length;
    await rejectsWithStatus(sb.startProcess("sandboxd-no-such-command-xyz"), 400, "start unknown command");
    const list = await sb.listProcesses();
    assert.equal(list.length, before);
    assert.ok(!list.some((x) => x.command === "sandboxd-no-such-command-xyz"));
  });

  test("startProcess with a missing working_dir is 400", T, async () => {
    await rejectsWithStatus(
      sb.startProcess("true", { workingDir: path.join(workDir, "nope") }),
      400,
      "start bad cwd",
    );
  });

  test("stdoutMode discard records no stdout but keeps stderr", T, async () => {
    const p = await start("sh", {
      args: ["-c", "echo hidden; echo shown >&2"],
      stdoutMode: OutputMode.DISCARD,
    });
    const fin = await waitExit(p.pid);
    assert.equal(fin.exitCode, 0);
    assert.deepEqual((await sb.getStdout(p.pid)).lines, []);
    assert.deepEqual((await sb.getStderr(p.pid)).lines, ["shown"]);
    assert.deepEqual((await sb.getOutput(p.pid)).lines, ["shown"]);
  });

  test("stdout/stderr/output of an unknown pid are 404", T, async () => {
    await rejectsWithStatus(sb.getStdout(NO_SUCH_PID), 404, "stdout");
    await rejectsWithStatus(sb.getStderr(NO_SUCH_PID), 404, "stderr");
    await rejectsWithStatus(sb.getOutput(NO_SUCH_PID), 404, "output");
  });
});

describe("signals and kill", () => {
  test("sendSignal SIGTERM ends the process as signaled 15", T, async () => {
    const p = await start("sleep", { args: ["30"] });
    const r = await sb.sendSignal(p.pid, 15);
    assert.equal(r.success, true);
    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.SIGNALED);
    assert.equal(fin.signal, 15);
    assert.equal(fin.exitCode, undefined);
    assertRecentDate(fin.endedAt, "endedAt");
  });

  test("sendSignal delivers a handled signal without ending the process", T, async () => {
    const p = await start("sh", {
      args: ["-c", "trap 'echo got-usr1' USR1; echo ready; while :; do sleep 0.1; done"],
    });
    await waitStdout(p.pid, (l) => l.includes("ready"));
    const r = await sb.sendSignal(p.pid, 10); // SIGUSR1
    assert.equal(r.success, true);
    await waitStdout(p.pid, (l) => l.includes("got-usr1"));
    assert.equal((await sb.getProcess(p.pid)).status, ProcessStatus.RUNNING);
    await sb.killProcess(p.pid);
    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.SIGNALED);
    assert.equal(fin.signal, 9);
  });

  test("sendSignal to an ended process is 400, to an unknown pid 404, bad signal 400", T, async () => {
    const p = await start("true");
    await waitExit(p.pid);
    await rejectsWithStatus(sb.sendSignal(p.pid, 15), 400, "signal ended");
    await rejectsWithStatus(sb.sendSignal(NO_SUCH_PID, 15), 404, "signal unknown");
    const q = await start("sleep", { args: ["30"] });
    await rejectsWithStatus(sb.sendSignal(q.pid, 12345), 400, "invalid signal number");
    assert.equal((await sb.getProcess(q.pid)).status, ProcessStatus.RUNNING);
    await sb.killProcess(q.pid);
    await waitExit(q.pid);
  });

  test("killProcess ends the process with SIGKILL; killing again is a no-op", T, async () => {
    const p = await start("sleep", { args: ["30"] });
    await sb.killProcess(p.pid);
    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.SIGNALED);
    assert.equal(fin.signal, 9);
    assert.ok(!isAlive(p.pid), "OS process gone");
    await sb.killProcess(p.pid); // decisions.md: 204 on an ended process
    const again = await sb.getProcess(p.pid);
    assert.equal(again.status, ProcessStatus.SIGNALED, "record kept after kill");
  });

  test("killProcess of an unknown pid is 404", T, async () => {
    await rejectsWithStatus(sb.killProcess(NO_SUCH_PID), 404, "kill unknown");
  });

  test("killProcess takes the whole process tree down", T, async () => {
    const p = await start("sh", { args: ["-c", "sleep 30 & echo $!; wait"] });
    const lines = await waitStdout(p.pid, (l) => l.length >= 1);
    const child = Number(lines[0]);
    assert.ok(Number.isInteger(child) && child > 1, `background pid (got ${lines[0]})`);
    assert.ok(isAlive(child));
    await sb.killProcess(p.pid);
    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.SIGNALED);
    await waitFor(() => !isAlive(child), { timeoutMs: 5000, what: `grandchild ${child} to be killed` });
  });
});

describe("stdin", () => {
  test("stdin pipe: write, close, output comes back, process exits", T, async () => {
    const p = await start("cat", { stdinMode: StdinMode.PIPE });
    assert.equal(p.stdinWritable, true);
    assert.equal((await sb.getProcess(p.pid)).stdinWritable, true);
    const enc = new TextEncoder();
    await sb.writeStdin(p.pid, enc.encode("hello\n"));
    await sb.writeStdin(p.pid, enc.encode("wor"));
    await sb.writeStdin(p.pid, enc.encode("ld\npartial"));
    await waitStdout(p.pid, (l) => l.includes("world"));
    assert.equal((await sb.getProcess(p.pid)).status, ProcessStatus.RUNNING, "cat waits for more input");
    await sb.closeStdin(p.pid);
    const fin = await waitExit(p.pid);
    assert.equal(fin.status, ProcessStatus.EXITED);
    assert.equal(fin.exitCode, 0);
    assert.equal(fin.stdinWritable, false);
    assert.deepEqual((await sb.getStdout(p.pid)).lines, ["hello", "world", "partial"]);
  });

  test("stdin: large writes are queued and delivered in order", T, async () => {
    const p = await start("sha256sum", { stdinMode: StdinMode.PIPE });
    const chunk = Buffer.alloc(256 * 1024);
    const { createHash } = await import("node:crypto");
    const h = createHash("sha256");
    for (let i = 0; i < 3; i++) {
      chunk.fill(97 + i);
      h.update(chunk);
      await sb.writeStdin(p.pid, new Uint8Array(chunk));
    }
    await sb.closeStdin(p.pid);
    const fin = await waitExit(p.pid, 15000);
    assert.equal(fin.exitCode, 0);
    const lines = (await sb.getStdout(p.pid)).lines;
    assert.equal(lines.length, 1);
    assert.equal(lines[0].split(/\s+/)[0], h.digest("hex"), "all 768 KiB arrived in order");
  });

  test("stdin write without a pipe is 400; close without a pipe is 400", T, async () => {
    const p = await start("sleep", { args: ["30"] });
    assert.equal(p.stdinWritable, false);
    await rejectsWithStatus(sb.writeStdin(p.pid, new TextEncoder().encode("x")), 400, "write closed-mode stdin");
    await rejectsWithStatus(sb.closeStdin(p.pid), 400, "close closed-mode stdin");
    await sb.killProcess(p.pid);
    await waitExit(p.pid);
  });

  test("stdin write after close is 400; closing twice is fine", T, async () => {
    const p = await start("sh", { args: ["-c", "cat; sleep 30"], stdinMode: StdinMode.PIPE });
    await sb.closeStdin(p.pid);
    assert.equal((await sb.getProcess(p.pid)).stdinWritable, false);
    await sb.closeStdin(p.pid);
    await rejectsWithStatus(sb.writeStdin(p.pid, new TextEncoder().encode("late\n")), 400, "write after close");
    await rejectsWithStatus(sb.writeStdin(NO_SUCH_PID, new TextEncoder().encode("x")), 404, "write unknown");
    await sb.killProcess(p.pid);
    await waitExit(p.pid);
  });
});

describe("follow", () => {
  test("followStdout replays earlier lines, streams live ones, ends after exit", T, async () => {
    const p = await start("sh", {
      args: ["-c", "echo one; echo two; sleep 1; echo three; echo err >&2; sleep 0.5; echo four; sleep 0.3"],
    });
    await waitStdout(p.pid, (l) => l.length >= 2);
    const evs = await collect(sb.followStdout(p.pid));
    assert.deepEqual(
      evs.map((e) => e.line),
      ["one", "two", "three", "four"],
    );
    for (const e of evs) {
      assertRecentDate(e.timestamp, "event timestamp");
      if (e.stream !== undefined) assert.equal(e.stream, "stdout");
    }
    const gap = evs[2].timestamp.getTime() - evs[1].timestamp.getTime();
    assert.ok(gap >= 700, `timestamps are capture times (two -> three: ${gap} ms)`);
    const fin = await sb.getProcess(p.pid);
    assert.equal(fin.status, ProcessStatus.EXITED, "follow ended only after the exit");
    assert.equal(fin.exitCode, 0);
  });

  test("followOutput carries both streams in capture order with stream tags", T, async () => {
    const p = await start("sh", {
      args: ["-c", "echo a; sleep 0.2; echo b >&2; sleep 0.2; echo c; sleep 0.2; echo d >&2; sleep 0.3"],
    });
    const evs = await collect(sb.followOutput(p.pid));
    assert.deepEqual(
      evs.map((e) => [e.line, e.stream]),
      [
        ["a", "stdout"],
        ["b", "stderr"],
        ["c", "stdout"],
        ["d", "stderr"],
      ],
    );
    const ts = evs.map((e) => e.timestamp.getTime());
    assert.deepEqual([...ts].sort((x, y) => x - y), ts, "timestamps do not go backwards");
  });

  test("followStderr carries only stderr", T, async () => {
    const p = await start("sh", { args: ["-c", "echo o1; echo e1 >&2; sleep 0.2; echo o2; echo e2 >&2; sleep 0.3"] });
    const evs = await collect(sb.followStderr(p.pid));
    assert.deepEqual(
      evs.map((e) => e.line),
      ["e1", "e2"],
    );
    for (const e of evs) if (e.stream !== undefined) assert.equal(e.stream, "stderr");
  });

  test("follow of an ended process replays everything and ends promptly", T, async () => {
    // 100 lines, not thousands: tensorlake 0.5.89's follow iterator (nativeEventStream) stops
    // once the Rust call's promise settles, and that promise can settle before the last queued
    // napi emit callbacks have run, so the last events of a burst that ends the stream are
    // dropped by the client (measured: 1000-line replays lost the last line in 8 of 10 runs
    // while the Rust core had delivered all 1000, and curl saw all 1000). For the same reason
    // the live tests below sleep a little after their last line before exiting.
    const p = await start("seq", { args: ["1", "100"] });
    await waitExit(p.pid);
    const want = Array.from({ length: 100 }, (_, i) => String(i + 1));
    const t0 = Date.now();
    const evs = await collect(sb.followStdout(p.pid));
    assert.ok(Date.now() - t0 < 5000, "did not wait for anything");
    assert.deepEqual(
      evs.map((e) => e.line),
      want,
    );
    const both = await collect(sb.followOutput(p.pid));
    assert.deepEqual(
      both.map((e) => e.line),
      want,
    );
    assert.ok(both.every((e) => e.stream === "stdout"));
  });

  test("two followers of the same live process both see every line", T, async () => {
    const p = await start("sh", { args: ["-c", "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done; sleep 0.3"] });
    const [a, b] = await Promise.all([collect(sb.followStdout(p.pid)), collect(sb.followOutput(p.pid))]);
    const want = ["line1", "line2", "line3", "line4", "line5"];
    assert.deepEqual(
      a.map((e) => e.line),
      want,
    );
    assert.deepEqual(
      b.map((e) => e.line),
      want,
    );
  });

  test("follow ends when the process is killed", T, async () => {
    const p = await start("sh", { args: ["-c", "echo alive; sleep 30"] });
    await waitStdout(p.pid, (l) => l.includes("alive"));
    const pending = collect(sb.followOutput(p.pid), { timeoutMs: 15000 });
    await sleep(200);
    await sb.killProcess(p.pid);
    const evs = await pending;
    assert.deepEqual(
      evs.map((e) => e.line),
      ["alive"],
    );
    assert.equal((await sb.getProcess(p.pid)).status, ProcessStatus.SIGNALED);
  });

  test("follow of an unknown pid is 404", T, async () => {
    await rejectsWithStatus(collect(sb.followStdout(NO_SUCH_PID)), 404, "followStdout");
    await rejectsWithStatus(collect(sb.followOutput(NO_SUCH_PID)), 404, "followOutput");
  });

  test("non-UTF-8 output becomes U+FFFD, CRLF loses the CR", T, async () => {
    const p = await start("sh", { args: ["-c", "printf 'bad\\377byte\\nwin\\r\\n'"] });
    await waitExit(p.pid);
    assert.deepEqual((await sb.getStdout(p.pid)).lines, ["bad\uFFFDbyte", "win"]);
    const evs = await collect(sb.followStdout(p.pid));
    assert.deepEqual(
      evs.map((e) => e.line),
      ["bad\uFFFDbyte", "win"],
    );
  });
});

describe("daemon with --token", () => {
  const TOKEN = "sdk-test-token-3f9a";
  let dt;
  before(async () => {
    dt = await startDaemon({ token: TOKEN });
  });
  after(async () => {
    await dt?.stop();
  });

  test("the SDK with the matching apiKey can run, start, get and follow", T, async () => {
    const s = new Sandbox({ sandboxId: SANDBOX_ID, proxyUrl: dt.url, apiKey: TOKEN });
    const r = await s.run("echo", { args: ["authorized"] });
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, "authorized");
    const p = await s.startProcess("sh", { args: ["-c", "echo via-start; sleep 0.3"] });
    const evs = await collect(s.followStdout(p.pid));
    assert.deepEqual(
      evs.map((e) => e.line),
      ["via-start"],
    );
    const fin = await s.getProcess(p.pid);
    assert.equal(fin.status, ProcessStatus.EXITED);
    assert.ok((await s.listProcesses()).some((x) => x.pid === p.pid));
    s.close();
  });

  test("no apiKey or a wrong one is 401; health needs no token", T, async () => {
    const none = new Sandbox({ sandboxId: SANDBOX_ID, proxyUrl: dt.url });
    const wrong = new Sandbox({ sandboxId: SANDBOX_ID, proxyUrl: dt.url, apiKey: TOKEN + "x" });
    await rejectsWithStatus(none.listProcesses(), 401, "list without key");
    await rejectsWithStatus(wrong.listProcesses(), 401, "list with wrong key");
    await rejectsWithStatus(none.run("echo", { args: ["x"] }), 401, "run without key");
    await rejectsWithStatus(wrong.startProcess("true"), 401, "start with wrong key");
    await rejectsWithStatus(none.daemonInfo(), 401, "info without key");
    const h = await none.health();
    assert.equal(h.healthy, true);
    const good = new Sandbox({ sandboxId: SANDBOX_ID, proxyUrl: dt.url, apiKey: TOKEN });
    const list = await good.listProcesses();
    assert.ok(!list.some((x) => x.command === "true"), "rejected start left no record");
  });

  test("the token daemon exits 0 on SIGTERM with a clean stderr", T, async () => {
    const r = await dt.stop();
    assert.equal(r.sanitizer, null, `sanitizer report:\n${r.sanitizer}`);
    assert.equal(r.killed, false, "needed SIGKILL");
    assert.equal(r.code, 0);
  });
});

describe("shutdown", () => {
  test("SIGTERM: the daemon ends its processes and exits 0", T, async () => {
    const p = await start("sleep", { args: ["300"] });
    const q = await start("sh", { args: ["-c", "sleep 300 & echo $!; wait"] });
    const child = Number((await waitStdout(q.pid, (l) => l.length >= 1))[0]);
    assert.ok(isAlive(p.pid) && isAlive(child));
    const r = await d.stop({ killAfterMs: 9000 });
    assert.equal(r.sanitizer, null, `sanitizer report:\n${r.sanitizer}`);
    assert.equal(r.killed, false, `daemon needed SIGKILL\n${d.stderrTail()}`);
    assert.equal(r.signal, null);
    assert.equal(r.code, 0);
    toKill.clear();
    await waitFor(() => !isAlive(p.pid) && !isAlive(child), { timeoutMs: 3000, what: "processes to be gone" });
  });
});
