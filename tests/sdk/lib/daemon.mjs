// Shared helpers for the SDK tests: start a sandboxd on a free loopback port, stop it, and a few
// small polling utilities. The daemon binary comes from $SANDBOXD_BIN (tests/sdk/run.sh sets it).
//
//   const d = await startDaemon({ token: "secret" });
//   d.url            "http://127.0.0.1:PORT"
//   await d.stop()   SIGTERM, wait for the exit; resolves { code, signal, ms }
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

export const DAEMON_BIN = process.env.SANDBOXD_BIN;

/**
 * Starts `DAEMON --listen 127.0.0.1:0 --state-dir <tmp> [--token T]` and waits for its
 * `listening on HOST:PORT` line (decisions.md: exactly one such line on stdout, flushed).
 */
export async function startDaemon({ token, extraArgs = [], env = {}, readyTimeoutMs = 15000 } = {}) {
  if (!DAEMON_BIN) throw new Error("SANDBOXD_BIN is not set (run the tests through tests/sdk/run.sh)");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "sandboxd-sdk-"));
  const stateDir = path.join(dir, "state");
  fs.mkdirSync(stateDir);
  const stderrPath = path.join(dir, "daemon.stderr");
  const stderrFd = fs.openSync(stderrPath, "w");
  const args = ["--listen", "127.0.0.1:0", "--state-dir", stateDir, ...extraArgs];
  if (token) args.push("--token", token);
  const childEnv = { ...process.env, ...env };
  delete childEnv.SANDBOXD_TOKEN; // only --token decides here
  const proc = spawn(DAEMON_BIN, args, { stdio: ["ignore", "pipe", stderrFd], env: childEnv });
  fs.closeSync(stderrFd);

  let exited = null;
  const exitPromise = new Promise((resolve) => {
    proc.on("exit", (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    });
  });

  let stdout = "";
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`daemon printed no "listening on" line within ${readyTimeoutMs} ms; stdout=${JSON.stringify(stdout)}\n${tail(stderrPath)}`)),
      readyTimeoutMs,
    );
    proc.stdout.setEncoding("utf8");
    proc.stdout.on("data", (chunk) => {
      stdout += chunk;
      const m = /^listening on (\S+):(\d+)\r?\n/m.exec(stdout);
      if (m) {
        clearTimeout(timer);
        resolve({ host: m[1], port: Number(m[2]) });
      }
    });
    proc.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    exitPromise.then((x) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited before listening (code ${x.code}, signal ${x.signal})\n${tail(stderrPath)}`));
    });
  });
  let addr;
  try {
    addr = await ready;
  } catch (e) {
    if (!exited) proc.kill("SIGKILL");
    // The error message already carries the daemon's stderr.
    if (!process.env.SDK_KEEP_TMP) fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }

  let stopped = null;
  const d = {
    proc,
    pid: proc.pid,
    host: addr.host,
    port: addr.port,
    url: `http://${addr.host}:${addr.port}`,
    dir,
    stateDir,
    stderrPath,
    stdout: () => stdout,
    stderrTail: (n) => tail(stderrPath, n),
    exited: () => exited,
    /** SIGTERM, then SIGKILL after `killAfterMs`; resolves { code, signal, ms, killed }. */
    async stop({ killAfterMs = 10000 } = {}) {
      if (stopped) return stopped;
      stopped = (async () => {
        const t0 = Date.now();
        let killed = false;
        if (!exited) {
          proc.kill("SIGTERM");
          const timer = setTimeout(() => {
            killed = true;
            proc.kill("SIGKILL");
          }, killAfterMs);
          await exitPromise;
          clearTimeout(timer);
        }
        const res = { ...exited, ms: Date.now() - t0, killed, sanitizer: sanitizerReport(d) };
        // Keep the state dir and the daemon's stderr when something looks wrong.
        if (res.code === 0 && !killed && !res.sanitizer && !process.env.SDK_KEEP_TMP) fs.rmSync(dir, { recursive: true, force: true });
        else console.error(`sandboxd (pid ${proc.pid}) exit ${JSON.stringify(res)}; files kept in ${dir}`);
        return res;
      })();
      return stopped;
    },
  };
  return d;
}

/** The first sanitizer report (ASan/UBSan/LSan) in the daemon's stderr, or null. */
export function sanitizerReport(d) {
  let text;
  try {
    text = fs.readFileSync(d.stderrPath, "utf8");
  } catch {
    return null;
  }
  const m = /(ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|WARNING: .*Sanitizer)/.exec(text);
  return m ? text.slice(Math.max(0, m.index - 200), m.index + 3000) : null;
}

export function tail(file, n = 40) {
  try {
    const lines = fs.readFileSync(file, "utf8").split("\n");
    return `--- ${file} (last ${n} lines) ---\n` + lines.slice(-n - 1).join("\n");
  } catch {
    return `--- ${file}: unreadable ---`;
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value; returns that value or throws after timeoutMs. */
export async function waitFor(fn, { timeoutMs = 10000, intervalMs = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** True while `pid` exists and is not a zombie (reads /proc, so it works for any process). */
export function isAlive(pid) {
  let stat;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return false;
  }
  const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  return state !== "Z" && state !== "X";
}

/** Collects every item of an async iterable, with an overall time limit. */
export async function collect(iterable, { timeoutMs = 20000 } = {}) {
  const out = [];
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`stream did not end within ${timeoutMs} ms (got ${out.length} items: ${JSON.stringify(out.slice(-5))})`)),
      timeoutMs,
    );
  });
  try {
    const it = iterable[Symbol.asyncIterator]();
    for (;;) {
      const next = await Promise.race([it.next(), expired]);
      if (next.done) break;
      out.push(next.value);
    }
  } finally {
    clearTimeout(timer);
  }
  return out;
}
