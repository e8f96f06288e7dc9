// Drives sandboxd's Blaxel dialect (/process...) with Blaxel's real TypeScript SDK, npm
// `@blaxel/core` 0.3.21, the way a Blaxel user would. Run through tests/sdk/run.sh, which sets
// SANDBOXD_BIN and uses the pinned Node 22 runtime.
//
// How the SDK is pointed at the daemon:
//
//   new SandboxInstance({ metadata: { name: "local" }, forceUrl: "http://127.0.0.1:PORT" })
//
// With `forceUrl` every process call (the generated client and the raw fetches of exec-streaming
// and streamLogs) goes to that base URL with only `headers` from the same object (none here), and
// the control plane (api.blaxel.ai) is never contacted: no BL_WORKSPACE, BL_API_KEY or login is
// needed to construct it or to use `.process`. DO_NOT_TRACK=1 is set before the SDK is loaded so
// its opt-in error reporting can never start. A token-protected daemon is reached with
// `headers: { Authorization: "Bearer T" }` (or the session form, X-Blaxel-Preview-Token).
//
// Expectations come from shared/spec/blaxel-process-api.md (§4: how the SDK calls and reads),
// README.md "Compatibility notes (Blaxel)" (where sandboxd deliberately differs from Blaxel's Go
// server) and docs/decisions.md.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { isAlive, sleep, startDaemon, waitFor } from "./lib/daemon.mjs";

process.env.DO_NOT_TRACK = "1";

// Every HTTP exchange the SDK makes, as the SDK saw it (the generated client reads
// globalThis.fetch at call time; exec-streaming and streamLogs call it directly).
const exchanges = [];
const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const req = input instanceof Request ? input : null;
  const rec = {
    url: String(req ? req.url : input),
    method: (init && init.method) || (req ? req.method : "GET"),
    accept: new Headers((init && init.headers) || (req ? req.headers : undefined)).get("accept"),
  };
  const res = await realFetch(input, init);
  rec.status = res.status;
  rec.contentType = res.headers.get("content-type");
  exchanges.push(rec);
  return res;
};

const { SandboxInstance, ResponseError } = await import("@blaxel/core");

const T = { timeout: 30000 };
const ENV_MARK = "sandboxd-blaxel-sdk-env-mark";
const STATUSES = ["running", "completed", "failed", "stopped", "killed"];
const RFC1123 = /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$/;

let d; // the daemon under test (no token)
let sb; // SandboxInstance on it
let bp; // sb.process
let workDir; // a real directory for workingDir tests
const toKill = new Set(); // pids (strings) to kill at the end, so a failing test leaves nothing

let seq = 0;
/** A process name unique to this run: [A-Za-z0-9._-], not only digits. */
const uname = (base) => `${base}-${process.pid}-${++seq}`;

before(async () => {
  d = await startDaemon({ env: { SANDBOXD_SDK_MARK: ENV_MARK } });
  sb = new SandboxInstance({ metadata: { name: "local" }, forceUrl: d.url });
  bp = sb.process;
  workDir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), "sandboxd-blaxel-wd-")));
});

after(async () => {
  for (const pid of toKill) {
    try {
      await bp.kill(pid);
    } catch {}
  }
  if (d && !d.exited()) {
    const r = await d.stop();
    if (r.code !== 0) console.error(`daemon exit: ${JSON.stringify(r)}\n${d.stderrTail()}`);
  }
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

/** exec through the SDK; remembers the pid for cleanup. */
async function exec(req) {
  const r = await bp.exec(req);
  if (r && r.pid) toKill.add(r.pid);
  return r;
}

/** Polls get() until status is not "running" (no wait(): it sleeps 1 s between polls). */
async function settled(id, timeoutMs = 10000) {
  return waitFor(
    async () => {
      const p = await bp.get(id);
      return p.status !== "running" ? p : null;
    },
    { timeoutMs, what: `process ${id} to end` },
  );
}

/** Asserts `promise` rejects with the SDK's ResponseError carrying `status`; returns it. */
async function rejectsWithStatus(promise, status, label = "") {
  let err;
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof ResponseError, `${label} expected ResponseError, got ${e?.constructor?.name}: ${e?.message}`);
    assert.equal(e.status, status, `${label} status (message: ${e.message})`);
    err = e;
    return true;
  });
  return err;
}

function assertTime(v, label) {
  assert.match(v, RFC1123, `${label} is RFC 1123 GMT`);
  const ms = Date.parse(v);
  assert.ok(Math.abs(Date.now() - ms) < 120000, `${label} is now-ish (got ${v})`);
  return ms;
}

/** Checks a ProcessResponse's fields and types (spec §2; README: strings, never null). */
function checkResponse(r, label = "response") {
  assert.equal(typeof r, "object", `${label} is an object`);
  assert.match(r.pid, /^[1-9]\d*$/, `${label}.pid is a decimal string (got ${JSON.stringify(r.pid)})`);
  for (const k of ["name", "command", "workingDir", "stdout", "stderr", "logs"])
    assert.equal(typeof r[k], "string", `${label}.${k} is a string (got ${JSON.stringify(r[k])})`);
  assert.ok(STATUSES.includes(r.status), `${label}.status ${r.status}`);
  assert.ok(Number.isInteger(r.exitCode), `${label}.exitCode is an integer (got ${r.exitCode})`);
  for (const k of ["restartOnFailure", "keepAlive"]) assert.equal(typeof r[k], "boolean", `${label}.${k}`);
  for (const k of ["maxRestarts", "restartCount"]) assert.ok(Number.isInteger(r[k]), `${label}.${k}`);
  const started = assertTime(r.startedAt, `${label}.startedAt`);
  if (r.status === "running") {
    assert.equal(r.completedAt, "", `${label}.completedAt is "" while running`);
    assert.equal(r.exitCode, 0, `${label}.exitCode is 0 while running`);
  } else {
    const ended = assertTime(r.completedAt, `${label}.completedAt`);
    assert.ok(ended >= started, `${label}: completedAt >= startedAt`);
  }
  assert.equal(r.logs, r.stdout + r.stderr, `${label}.logs is stdout then stderr`);
  return r;
}

/** A TCP port that was free a moment ago. */
async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "0.0.0.0", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Resolves true if a TCP connect to host:port succeeds within timeoutMs. */
function canConnect(port, host = "127.0.0.1", timeoutMs = 1000) {
  return new Promise((resolve) => {
    const s = net.connect({ port, host });
    const t = setTimeout(() => {
      s.destroy();
      resolve(false);
    }, timeoutMs);
    s.on("connect", () => {
      clearTimeout(t);
      s.end();
      resolve(true);
    });
    s.on("error", () => {
      clearTimeout(t);
      resolve(false);
    });
  });
}

function hasPython() {
  try {
    execFileSync("python3", ["-c", "pass"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** Races `promise` against a deadline. */
async function within(promise, ms, what) {
  let timer;
  try {
    return await Promise.race([
      promise,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

describe("exec, get, list, logs", () => {
  test("exec without waiting answers running; get by pid and by name; wait gives the final state", T, async () => {
    const name = uname("plain");
    const t0 = Date.now();
    const r = await exec({ command: "echo hello; sleep 0.6; echo bye >&2", name });
    assert.ok(Date.now() - t0 < 500, "exec without waitForCompletion answers at once");
    checkResponse(r, "exec");
    assert.equal(r.status, "running");
    assert.equal(r.name, name);
    assert.equal(r.command, "echo hello; sleep 0.6; echo bye >&2");
    assert.equal(r.workingDir, "");
    assert.equal(r.restartOnFailure, false);
    assert.equal(r.restartCount, 0);
    assert.equal(r.keepAlive, false);
    assert.ok("hello\n".startsWith(r.stdout), `stdout so far (got ${JSON.stringify(r.stdout)})`);
    assert.ok(isAlive(Number(r.pid)), "pid is the live OS process");

    const byPid = checkResponse(await bp.get(r.pid), "get(pid)");
    assert.equal(byPid.name, name);
    assert.equal(byPid.status, "running");
    const byName = checkResponse(await bp.get(name), "get(name)");
    assert.equal(byName.pid, r.pid);

    const fin = checkResponse(await bp.wait(name, { interval: 100, maxWait: 10000 }), "wait");
    assert.equal(fin.pid, r.pid);
    assert.equal(fin.status, "completed");
    assert.equal(fin.exitCode, 0);
    assert.equal(fin.stdout, "hello\n");
    assert.equal(fin.stderr, "bye\n");
    assert.equal(fin.logs, "hello\nbye\n");
    assert.ok(Date.parse(fin.completedAt) - Date.parse(fin.startedAt) >= 0);
    assert.ok(!isAlive(Number(r.pid)), "OS process gone after completion");
  });

  test("exec without a name gets a generated one (proc- + 8 chars) that resolves", T, async () => {
    const r = await exec({ command: "true", waitForCompletion: true });
    assert.match(r.name, /^proc-[a-z0-9]{8}$/);
    assert.equal((await bp.get(r.name)).pid, r.pid);
  });

  test("exec waitForCompletion: final status, exit code, output, env and workingDir", T, async () => {
    const r = checkResponse(
      await exec({
        command: 'echo "$BL_FOO"; pwd; echo "$SANDBOXD_SDK_MARK"; echo oops >&2; exit 3',
        env: { BL_FOO: "bar baz" },
        workingDir: workDir,
        waitForCompletion: true,
        name: uname("wfc"),
      }),
      "exec",
    );
    assert.equal(r.status, "failed");
    assert.equal(r.exitCode, 3);
    assert.equal(r.stdout, `bar baz\n${workDir}\n${ENV_MARK}\n`, "env merged over the daemon's, cwd applied");
    assert.equal(r.stderr, "oops\n");
    assert.equal(r.logs, r.stdout + r.stderr);
    assert.equal(r.workingDir, workDir);

    const ok = checkResponse(await exec({ command: "printf 'a\\nb'", waitForCompletion: true }), "exec ok");
    assert.equal(ok.status, "completed");
    assert.equal(ok.exitCode, 0);
    assert.equal(ok.stdout, "a\nb", "a last line without newline is kept as is");
  });

  test("command is a shell command line; stdin is empty", T, async () => {
    const r = await exec({ command: "x=$((6*7)); echo $x | tr 4 Q; cat; echo after-cat", waitForCompletion: true });
    assert.equal(r.status, "completed");
    assert.equal(r.stdout, "Q2\nafter-cat\n");
  });

  test("exec waitForCompletion + callbacks streams NDJSON live; keepalives never reach callbacks", { timeout: 30000 }, async () => {
    const name = uname("ndjson");
    const out = [], err = [], log = [];
    const t0 = Date.now();
    const mark = exchanges.length;
    const r = await exec({
      command: "echo one; echo err1 >&2; sleep 5.6; echo two; exit 4",
      name,
      waitForCompletion: true,
      onStdout: (s) => out.push({ s, t: Date.now() - t0 }),
      onStderr: (s) => err.push({ s, t: Date.now() - t0 }),
      onLog: (s) => log.push(s),
    });
    const tEnd = Date.now() - t0;
    checkResponse(r, "result");
    assert.equal(typeof r.close, "function", "streaming exec returns close()");
    assert.equal(r.name, name);
    assert.equal(r.status, "failed");
    assert.equal(r.exitCode, 4);
    assert.equal(r.stdout, "one\ntwo\n");
    assert.equal(r.stderr, "err1\n");

    // It really was the NDJSON path (spec §4.2), not the JSON fallback.
    const x = exchanges.slice(mark).find((e) => e.method === "POST" && e.url.endsWith("/process"));
    assert.ok(x, "a POST /process was made");
    assert.match(x.accept ?? "", /text\/event-stream/);
    assert.equal(x.status, 200);
    assert.match(x.contentType ?? "", /^application\/x-ndjson/);

    assert.equal(out.map((o) => o.s).join(""), "one\ntwo\n", "onStdout got stdout exactly (no keepalive)");
    assert.equal(err.map((o) => o.s).join(""), "err1\n", "onStderr got stderr exactly");
    assert.deepEqual([...log].sort(), [...out.map((o) => o.s), ...err.map((o) => o.s)].sort(), "onLog got both, nothing else");
    assert.ok(!log.some((s) => /keepalive/.test(s)), "no keepalive reached onLog");
    // Live: "one" arrived long before the process ended, "two" near the end.
    const tOne = out.find((o) => o.s.includes("one")).t;
    const tTwo = out.find((o) => o.s.includes("two")).t;
    assert.ok(tOne < 2500, `first line arrived at ${tOne} ms`);
    assert.ok(tTwo - tOne > 4500, `second line ${tTwo - tOne} ms after the first`);
    assert.ok(tEnd - tOne > 4500, `exec ended ${tEnd} ms, first line at ${tOne} ms`);
  });

  test("exec with callbacks but no waitForCompletion returns at once, then streams the logs", T, async () => {
    const out = [], log = [];
    const t0 = Date.now();
    const r = await exec({
      command: "echo first; sleep 0.8; echo second; echo third >&2",
      onStdout: (s) => out.push(s),
      onLog: (s) => log.push(s),
    });
    assert.ok(Date.now() - t0 < 700, "answered before the process ended");
    assert.equal(r.status, "running");
    assert.equal(typeof r.close, "function");
    try {
      await waitFor(() => log.length >= 3, { timeoutMs: 5000, what: "three log lines" });
      assert.deepEqual(out, ["first", "second"]);
      assert.deepEqual([...log].sort(), ["first", "second", "third"]);
    } finally {
      r.close();
    }
  });

  test("list holds running and ended processes with the right shapes", T, async () => {
    const ended = await exec({ command: "echo done-one", name: uname("ended"), waitForCompletion: true });
    const running = await exec({ command: "sleep 30", name: uname("running") });
    const list = await bp.list();
    assert.ok(Array.isArray(list));
    for (const p of list) checkResponse(p, `list entry ${p.pid}`);
    const pids = list.map((p) => p.pid);
    assert.equal(new Set(pids).size, pids.length, "pids are unique in the list");
    const e = list.find((p) => p.pid === ended.pid);
    assert.ok(e, "ended process listed");
    assert.equal(e.status, "completed");
    assert.equal(e.stdout, "done-one\n");
    assert.equal(e.name, ended.name);
    const rn = list.find((p) => p.pid === running.pid);
    assert.ok(rn, "running process listed");
    assert.equal(rn.status, "running");
    assert.equal(rn.completedAt, "");
    await bp.kill(running.pid);
  });

  test("logs: all, stdout and stderr, by pid and by name", T, async () => {
    const name = uname("logs");
    const r = await exec({ command: "echo o1; echo e1 >&2; echo o2; echo e2 >&2", name, waitForCompletion: true });
    for (const id of [r.pid, name]) {
      assert.equal(await bp.logs(id), "o1\no2\ne1\ne2\n", `all (${id})`);
      assert.equal(await bp.logs(id, "all"), "o1\no2\ne1\ne2\n");
      assert.equal(await bp.logs(id, "stdout"), "o1\no2\n");
      assert.equal(await bp.logs(id, "stderr"), "e1\ne2\n");
    }
    const quiet = await exec({ command: "sleep 30" });
    assert.equal(await bp.logs(quiet.pid), "");
    await bp.kill(quiet.pid);
  });

  test("errors surface as ResponseError with the status and the server's message", T, async () => {
    const e1 = await rejectsWithStatus(bp.get("sandboxd-no-such-process"), 404, "get unknown name");
    assert.match(e1.message, /not found/);
    await rejectsWithStatus(bp.get("2147483000"), 404, "get unknown pid");
    await rejectsWithStatus(bp.logs("sandboxd-no-such-process"), 404, "logs unknown");
    await rejectsWithStatus(bp.stop("sandboxd-no-such-process"), 404, "stop unknown");
    await rejectsWithStatus(bp.kill("sandboxd-no-such-process"), 404, "kill unknown");
    await rejectsWithStatus(bp.exec({ command: "" }), 400, "empty command");
    await rejectsWithStatus(bp.exec({ command: "true", name: "../../etc/x" }), 400, "bad name");
    const e2 = await rejectsWithStatus(bp.exec({ command: "true", workingDir: path.join(workDir, "nope") }), 422, "missing workingDir");
    assert.match(e2.message, /failed to start process/);

    const name = uname("dup");
    const first = await exec({ command: "sleep 30", name });
    const e3 = await rejectsWithStatus(bp.exec({ command: "true", name }), 400, "name in use");
    assert.match(e3.message, /already exists and is running/);
    await bp.kill(first.pid);
    // Once it has ended the name may be reused; the name then resolves to the newest process.
    const second = await exec({ command: "echo second", name, waitForCompletion: true });
    assert.notEqual(second.pid, first.pid);
    assert.equal((await bp.get(name)).pid, second.pid);
    assert.equal((await bp.get(first.pid)).status, "killed", "the old one stays addressable by pid");
  });

  test("a streaming exec that is refused throws the SDK's plain Error", T, async () => {
    await assert.rejects(
      bp.exec({ command: "true", name: "a/b", waitForCompletion: true, onLog: () => {} }),
      (e) => {
        assert.match(e.message, /^Failed to execute process: /);
        assert.match(e.message, /invalid name/);
        return true;
      },
    );
  });
});

describe("streamLogs and wait", () => {
  test("streamLogs delivers lines live while the process runs and ends when it exits", T, async () => {
    const r = await exec({
      command: "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.7; done",
      name: uname("stream"),
    });
    const out = [], err = [], log = [], errors = [];
    const t0 = Date.now();
    const s = bp.streamLogs(r.pid, {
      onStdout: (l) => out.push({ l, t: Date.now() - t0 }),
      onStderr: (l) => err.push(l),
      onLog: (l) => log.push(l),
      onError: (e) => errors.push(e),
    });
    try {
      await within(s.wait(), 10000, "streamLogs");
    } finally {
      s.close();
    }
    const tEnd = Date.now() - t0;
    assert.deepEqual(errors, []);
    assert.deepEqual(out.map((o) => o.l), ["out1", "out2", "out3"]);
    assert.deepEqual(err, ["err1", "err2", "err3"]);
    assert.equal(log.length, 6);
    assert.deepEqual([...log].sort(), ["err1", "err2", "err3", "out1", "out2", "out3"]);
    assert.ok(out[0].t < 1000, `first line came at ${out[0].t} ms`);
    assert.ok(tEnd - out[0].t > 1000, `stream ended ${tEnd} ms, first line at ${out[0].t} ms: it was live`);
    // The stream ends when the process has ended.
    const fin = await bp.get(r.pid);
    assert.equal(fin.status, "completed", "stream ended only once the process had ended");
    assert.ok(tEnd < 5000, `stream ended ${tEnd} ms after start (process runs ~2.1 s)`);
  });

  test("streamLogs of an ended process replays everything and ends; unknown id calls onError", T, async () => {
    const name = uname("replay");
    await exec({ command: "echo a; echo b >&2; echo c", name, waitForCompletion: true });
    const out = [], err = [], errors = [];
    const s = bp.streamLogs(name, { onStdout: (l) => out.push(l), onStderr: (l) => err.push(l), onError: (e) => errors.push(e) });
    await within(s.wait(), 5000, "replay stream");
    assert.deepEqual(errors, []);
    assert.deepEqual(out, ["a", "c"]);
    assert.deepEqual(err, ["b"]);

    const errs = [], logs = [];
    const u = bp.streamLogs("sandboxd-no-such-process", { onLog: (l) => logs.push(l), onError: (e) => errs.push(e) });
    await within(u.wait(), 5000, "unknown stream");
    assert.equal(errs.length, 1, "onError called once");
    assert.match(errs[0].message, /^Failed to stream logs: /);
    assert.match(errs[0].message, /not found/);
    assert.deepEqual(logs, [], "no log line for an unknown process");
  });

  test("wait gives up after maxWait on a process that keeps running", T, async () => {
    const r = await exec({ command: "sleep 30" });
    await assert.rejects(bp.wait(r.pid, { maxWait: 300, interval: 100 }), /Process did not finish in time/);
    assert.equal((await bp.get(r.pid)).status, "running");
    await bp.kill(r.pid);
  });
});

describe("stop, kill, timeout", () => {
  test("stop: a tree that ignores SIGTERM gets SIGKILL after the grace period; status stopped", T, async () => {
    const name = uname("stubborn");
    const r = await exec({
      command: "sh -c 'trap \"\" TERM; echo armed; sleep 1000' & echo child=$!; trap 'echo got-term' TERM; echo ready; while :; do sleep 0.1; done",
      name,
    });
    // Both shells have set their traps ("ready" alone raced the background shell's start:
    // a SIGTERM before its trap killed it, about one run in eight).
    const logs = await waitFor(async () => {
      const l = await bp.logs(name, "stdout");
      return l.includes("ready") && l.includes("armed") ? l : null;
    }, { what: "ready and armed" });
    const child = Number(/child=(\d+)/.exec(logs)[1]);
    assert.ok(isAlive(child) && isAlive(Number(r.pid)));

    const t0 = Date.now();
    const stopping = bp.stop(name);
    // During the grace period the tree is still alive, so the status does not say stopped yet.
    await sleep(1500);
    const mid = await bp.get(name);
    assert.equal(mid.status, "running", "status while SIGTERM is being ignored");
    assert.ok(isAlive(Number(r.pid)) && isAlive(child), "tree still alive during the grace period");
    const res = await stopping;
    const ms = Date.now() - t0;
    assert.equal(typeof res, "object");
    assert.ok(res && Object.keys(res).length > 0, "stop answers a non-empty JSON object");
    assert.ok(ms >= 4000, `stop answered after ${ms} ms: before the grace period`);
    assert.ok(ms < 10000, `stop took ${ms} ms`);

    // The answer comes once nothing of the tree is left: status is final at once.
    const fin = checkResponse(await bp.get(name), "after stop");
    assert.equal(fin.status, "stopped");
    assert.equal(fin.exitCode, -1, "ended by a signal (SIGKILL)");
    assert.ok(!isAlive(Number(r.pid)), "leader gone");
    assert.ok(!isAlive(child), "TERM-ignoring grandchild gone");
    assert.match(fin.stdout, /got-term/, "SIGTERM was delivered first");
    await rejectsWithStatus(bp.stop(name), 404, "stop of a stopped process");
  });

  test("stop: a process that exits on SIGTERM ends quickly and is stopped, whatever its exit code", T, async () => {
    const a = await exec({ command: "sleep 30" });
    const b = await exec({ command: "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done" });
    await waitFor(async () => (await bp.logs(b.pid)).includes("ready"), { what: "ready" });
    for (const [p, code] of [[a, -1], [b, 0]]) {
      const t0 = Date.now();
      await bp.stop(p.pid);
      assert.ok(Date.now() - t0 < 3000, "no grace period needed");
      const fin = await bp.get(p.pid);
      assert.equal(fin.status, "stopped", `status of ${p.command}`);
      assert.equal(fin.exitCode, code, `exitCode of ${p.command}`);
      assert.ok(!isAlive(Number(p.pid)));
    }
  });

  test("kill: SIGKILL to the whole tree; status killed", T, async () => {
    const r = await exec({ command: "sleep 1000 & echo child=$!; trap '' TERM; wait", keepAlive: true });
    assert.equal(r.keepAlive, true, "keepAlive is accepted and reported");
    const logs = await waitFor(async () => {
      const l = await bp.logs(r.pid);
      return /child=\d+/.test(l) ? l : null;
    }, { what: "child pid" });
    const child = Number(/child=(\d+)/.exec(logs)[1]);
    const t0 = Date.now();
    const res = await bp.kill(r.pid);
    assert.ok(Date.now() - t0 < 3000);
    assert.ok(res && Object.keys(res).length > 0, "kill answers a non-empty JSON object");
    const fin = checkResponse(await bp.get(r.pid), "after kill");
    assert.equal(fin.status, "killed");
    assert.equal(fin.exitCode, -1);
    assert.equal(fin.keepAlive, false, "keepAlive is false after a kill through the API");
    assert.ok(!isAlive(Number(r.pid)) && !isAlive(child), "the whole tree is gone");
    await rejectsWithStatus(bp.kill(r.pid), 404, "kill of an ended process");
  });

  test("timeout kills the tree (status killed); waitForCompletion then answers 422", T, async () => {
    const t0 = Date.now();
    const r = await exec({ command: "sleep 1000 & echo child=$!; wait", timeout: 1 });
    assert.equal(r.status, "running");
    const fin = await settled(r.pid, 6000);
    const ms = Date.now() - t0;
    assert.equal(fin.status, "killed");
    assert.equal(fin.exitCode, -1);
    assert.ok(ms >= 900 && ms < 5000, `killed after ${ms} ms`);
    const child = Number(/child=(\d+)/.exec(fin.stdout)[1]);
    assert.ok(!isAlive(child), "background child killed too");

    const name = uname("timeout");
    const t1 = Date.now();
    const e = await rejectsWithStatus(
      bp.exec({ command: "echo started; sleep 30", name, timeout: 1, waitForCompletion: true }),
      422,
      "waitForCompletion past the timeout",
    );
    assert.match(e.message, /process timed out after 1 seconds/);
    assert.ok(Date.now() - t1 < 5000);
    const g = await bp.get(name);
    toKill.add(g.pid);
    assert.equal(g.status, "killed");
    assert.equal(g.stdout, "started\n");
  });
});

describe("restartOnFailure", () => {
  test("maxRestarts: same pid and env on every run, markers in the logs, final status failed", T, async () => {
    const name = uname("restart");
    const t0 = Date.now();
    const r = checkResponse(
      await exec({
        command: 'echo "run $BL_RUN_MARK"; echo "err run" >&2; exit 3',
        env: { BL_RUN_MARK: "m1" },
        name,
        restartOnFailure: true,
        maxRestarts: 2,
        waitForCompletion: true,
      }),
      "exec",
    );
    const ms = Date.now() - t0;
    assert.equal(r.status, "failed");
    assert.equal(r.exitCode, 3);
    assert.equal(r.restartOnFailure, true);
    assert.equal(r.maxRestarts, 2);
    assert.equal(r.restartCount, 2);
    assert.ok(ms >= 2500, `three runs with a growing back-off (1 s, 2 s) took only ${ms} ms`);
    const g = await bp.get(name);
    assert.equal(g.pid, r.pid, "the pid is stable across restarts");
    assert.equal(g.restartCount, 2);

    const lines = (await bp.logs(name, "stdout")).split("\n").filter((l) => l !== "");
    const runs = lines.filter((l) => l === "run m1");
    const markers = lines.filter((l) => /restart/i.test(l));
    assert.equal(runs.length, 3, `three runs with the same env: ${JSON.stringify(lines)}`);
    assert.equal(markers.length, 2, `a marker at each restart: ${JSON.stringify(lines)}`);
    assert.deepEqual(lines.filter((l) => l === "run m1" || /restart/i.test(l)), ["run m1", markers[0], "run m1", markers[1], "run m1"]);
    // Blaxel's marker text (spec §5.5).
    assert.deepEqual(markers, [
      "[Process failed with exit code 3. Attempting restart 1/2...]",
      "[Process failed with exit code 3. Attempting restart 2/2...]",
    ]);
    assert.equal(await bp.logs(name, "stderr"), "err run\nerr run\nerr run\n");
  });

  test("a run that succeeds after a restart ends completed", T, async () => {
    const f = path.join(workDir, `count-${process.pid}-${++seq}`);
    const r = await exec({
      command: `n=$(cat ${f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > ${f}; echo run$n; [ $n -ge 2 ]`,
      restartOnFailure: true,
      maxRestarts: 5,
      waitForCompletion: true,
    });
    assert.equal(r.status, "completed");
    assert.equal(r.exitCode, 0);
    assert.equal(r.restartCount, 1);
    assert.match(r.stdout, /^run1\n[\s\S]*run2\n$/);
  });

  test("streaming exec and streamLogs wait for the last run; back-off grows; markers go to onLog only", T, async () => {
    const name = uname("restart-stream");
    const out = [], log = [];
    const t0 = Date.now();
    const execP = exec({
      command: "echo run; exit 7",
      name,
      restartOnFailure: true,
      maxRestarts: 2,
      waitForCompletion: true,
      onStdout: (s) => out.push({ s, t: Date.now() - t0 }),
    });
    // streamLogs attached meanwhile (the process is addressable by name at once).
    await waitFor(async () => {
      try {
        return (await bp.get(name)).pid;
      } catch {
        return null;
      }
    }, { what: "process to exist" });
    const sOut = [];
    const s = bp.streamLogs(name, { onStdout: (l) => sOut.push(l), onLog: (l) => log.push(l) });
    const r = await execP;
    await within(s.wait(), 5000, "streamLogs after the last run");
    s.close();

    assert.equal(r.status, "failed");
    assert.equal(r.exitCode, 7);
    assert.equal(r.restartCount, 2, "the NDJSON result is the last run's");
    const runTimes = out.filter((o) => o.s === "run\n").map((o) => o.t);
    assert.equal(runTimes.length, 3, `three runs seen live: ${JSON.stringify(out)}`);
    const gap1 = runTimes[1] - runTimes[0], gap2 = runTimes[2] - runTimes[1];
    assert.ok(gap1 >= 800, `first back-off ${gap1} ms`);
    assert.ok(gap2 >= gap1 + 500, `back-off grows: ${gap1} ms then ${gap2} ms`);

    assert.deepEqual(sOut, ["run", "run", "run"], "onStdout gets only the runs' lines");
    const markers = log.filter((l) => /restart/i.test(l));
    assert.equal(markers.length, 2, `markers reach onLog: ${JSON.stringify(log)}`);
  });
});

describe("waitForPorts", () => {
  test("exec answers once the port listens on a non-loopback address", { timeout: 30000 }, async (t) => {
    if (!hasPython()) return t.skip("python3 not installed");
    const port = await freePort();
    assert.equal(await canConnect(port), false, "nothing listens yet");
    const t0 = Date.now();
    const r = await exec({
      command: `sleep 1; exec python3 -m http.server ${port} --bind 0.0.0.0`,
      name: uname("http"),
      waitForPorts: [port],
      timeout: 20,
    });
    const ms = Date.now() - t0;
    try {
      assert.equal(r.status, "running");
      assert.ok(ms >= 900, `answered after ${ms} ms, before the server could listen`);
      assert.equal(await canConnect(port, "127.0.0.1", 500), true, "port accepts connections right after exec returned");
      const res = await realFetch(`http://127.0.0.1:${port}/`);
      assert.equal(res.status, 200);
      await res.text();
    } finally {
      await bp.kill(r.pid);
    }
    assert.equal(await canConnect(port, "127.0.0.1", 500), false, "server gone after kill");
  });
});

describe("auth", () => {
  test("a token-protected daemon: headers carry the token (Bearer or preview token)", T, async () => {
    const token = "blaxel-sdk-secret";
    const td = await startDaemon({ token });
    try {
      const bare = new SandboxInstance({ metadata: { name: "local" }, forceUrl: td.url }).process;
      await rejectsWithStatus(bare.list(), 401, "no token");
      const wrong = new SandboxInstance({ metadata: { name: "local" }, forceUrl: td.url, headers: { Authorization: "Bearer nope" } }).process;
      await rejectsWithStatus(wrong.exec({ command: "true" }), 401, "wrong token");

      for (const headers of [{ Authorization: `Bearer ${token}` }, { "X-Blaxel-Preview-Token": token }]) {
        const p = new SandboxInstance({ metadata: { name: "local" }, forceUrl: td.url, headers }).process;
        const r = await p.exec({ command: "echo authed", waitForCompletion: true });
        assert.equal(r.stdout, "authed\n");
        const lines = [];
        const s = p.streamLogs(r.pid, { onStdout: (l) => lines.push(l), onError: (e) => lines.push(`error: ${e.message}`) });
        await within(s.wait(), 5000, "authed stream");
        assert.deepEqual(lines, ["authed"]);
        const log = [];
        const st = await p.exec({ command: "echo live", waitForCompletion: true, onLog: (l) => log.push(l) });
        assert.equal(st.status, "completed");
        assert.deepEqual(log, ["live\n"]);
      }
    } finally {
      await td.stop();
    }
  });
});
