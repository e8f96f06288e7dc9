#!/usr/bin/env bash
# Vendor SDK tests: runs every tests/sdk/*.test.mjs (node:test) against a sandboxd binary, with
# the pinned Node 22 runtime from tests/sdk/node_modules (installed by scripts/sdk-deps.sh when
# missing). Each test file starts its own daemon(s) on free loopback ports (lib/daemon.mjs).
#
#   tests/sdk/run.sh DAEMON_BINARY [TEST_FILE...]
#   SDK_TEST_PATTERN=regex tests/sdk/run.sh build/sandboxd     only tests whose name matches
#   SDK_KEEP_TMP=1 ...                                         keep daemons' state dirs/stderr
#
# Ends with the line "sdk: N passed, N failed". A file whose run crashes, times out or prints no
# summary counts as one failure. Exit status is non-zero when anything failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SDK="$ROOT/tests/sdk"
FILE_TIMEOUT="${SDK_FILE_TIMEOUT:-600}"

if [ $# -lt 1 ]; then
    echo "usage: $0 DAEMON_BINARY [TEST_FILE...]" >&2
    echo "sdk: 0 passed, 1 failed"
    exit 2
fi
daemon="$1"
shift
case "$daemon" in /*) ;; *) daemon="$PWD/$daemon" ;; esac
if [ ! -x "$daemon" ]; then
    echo "sdk: daemon binary $daemon is missing or not executable" >&2
    echo "sdk: 0 passed, 1 failed"
    exit 1
fi

if ! NODE="$("$ROOT/scripts/sdk-deps.sh" --node)"; then
    echo "sdk: installing the SDKs failed (scripts/sdk-deps.sh)" >&2
    echo "sdk: 0 passed, 1 failed"
    exit 1
fi

if [ $# -gt 0 ]; then
    files=("$@")
else
    shopt -s nullglob
    files=("$SDK"/*.test.mjs)
    shopt -u nullglob
fi
if [ ${#files[@]} -eq 0 ]; then
    echo "sdk: no test files in $SDK" >&2
    echo "sdk: 0 passed, 1 failed"
    exit 1
fi

export SANDBOXD_BIN="$daemon"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/sandboxd-sdk-run.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

pattern_args=()
[ -n "${SDK_TEST_PATTERN:-}" ] && pattern_args=(--test-name-pattern="$SDK_TEST_PATTERN")

total_pass=0
total_fail=0
for f in "${files[@]}"; do
    case "$f" in /*) ;; *) f="$PWD/$f" ;; esac
    name="$(basename "$f")"
    tap="$tmp/$name.tap"
    echo "== sdk: $name ($("$NODE" --version), daemon $daemon)"
    t0=$(date +%s)
    # spec reporter for people, TAP to a file for the counts. Files run one at a time; tests
    # inside a file run in order. cwd tests/sdk so bare imports resolve from its node_modules.
    (cd "$SDK" && timeout -k 10 "$FILE_TIMEOUT" "$NODE" --test --test-concurrency=1 \
        "${pattern_args[@]}" \
        --test-reporter=spec --test-reporter-destination=stdout \
        --test-reporter=tap --test-reporter-destination="$tap" \
        "$f" </dev/null)
    rc=$?
    p="$(sed -n 's/^# pass \([0-9][0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -n1)"
    x="$(sed -n 's/^# fail \([0-9][0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -n1)"
    c="$(sed -n 's/^# cancelled \([0-9][0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -n1)"
    if [ -z "$p" ] || [ -z "$x" ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "sdk: $name timed out after ${FILE_TIMEOUT}s" >&2
        else
            echo "sdk: $name ended (status $rc) without a test summary" >&2
        fi
        p=0
        x=1
        c=0
    else
        x=$((x + ${c:-0}))
        if [ "$rc" -ne 0 ] && [ "$x" -eq 0 ]; then
            echo "sdk: $name exited with status $rc though no test failed" >&2
            x=1
        fi
    fi
    echo "== sdk: $name: $p passed, $x failed ($(( $(date +%s) - t0 ))s)"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + x))
done

echo "sdk: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
