#!/usr/bin/env bash
# Runs every test suite of sandboxd in order and ends with one line "N passed, N failed" (the
# sum over the suites). `make test` builds the binaries first and then calls this script.
#
#   1. unit              build/test_unit
#   2. unit (asan)       build/asan/test_unit                      (ASan + UBSan, LeakSanitizer)
#   3. integration       tests/integration/run.py --daemon build/sandboxd
#   4. integration(asan) tests/integration/run.py --daemon build/asan/sandboxd
#   5. sdk               tests/sdk/run.sh build/sandboxd           (real vendor SDKs, node:test)
#
# Each suite prints its own closing line "<suite>: N passed, N failed"; this script reads the
# last such line of each. A suite that crashes, times out, prints no closing line, or exits
# non-zero while claiming no failure counts as (at least) one failure.
#
# Environment:
#   SUITES="unit asan-unit integration asan-integration sdk"   run only these (this order)
#   BUILD=build                                                build directory
#   T_UNIT T_ASAN_UNIT T_INTEGRATION T_ASAN_INTEGRATION T_SDK  per-suite time limits (s)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BUILD="${BUILD:-build}"
SUITES="${SUITES:-unit asan-unit integration asan-integration sdk}"
# Per-suite limits; together at most 30 minutes even if every suite hangs.
T_UNIT="${T_UNIT:-120}"
T_ASAN_UNIT="${T_ASAN_UNIT:-300}"
T_INTEGRATION="${T_INTEGRATION:-420}"
T_ASAN_INTEGRATION="${T_ASAN_INTEGRATION:-540}"
T_SDK="${T_SDK:-420}"

LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/sandboxd-tests.XXXXXX")"
trap 'rm -rf "$LOGDIR"' EXIT

total_pass=0
total_fail=0
summary=()

# LeakSanitizer needs ptrace-like access to the process (it stops the threads and scans
# memory); some sandboxes forbid that, and then every sanitized run would die at exit. Probe
# once with a tiny program: a known leak must be reported and a clean program must exit 0.
lsan_probe() {
    local cc="${CC:-cc}" d="$LOGDIR/lsan-probe"
    mkdir -p "$d"
    printf '#include <stdlib.h>\nvoid *volatile keep;\nint main(void){ keep = malloc(33); keep = 0; return 0; }\n' >"$d/leak.c"
    printf '#include <stdlib.h>\nint main(void){ void *volatile p = malloc(33); free(p); return 0; }\n' >"$d/clean.c"
    "$cc" -fsanitize=address -g -o "$d/leak" "$d/leak.c" >/dev/null 2>&1 || return 1
    "$cc" -fsanitize=address -g -o "$d/clean" "$d/clean.c" >/dev/null 2>&1 || return 1
    ASAN_OPTIONS=detect_leaks=1 "$d/clean" >/dev/null 2>&1 || return 1
    ASAN_OPTIONS=detect_leaks=1 "$d/leak" >"$d/leak.out" 2>&1 # exits non-zero when it works
    grep -q "LeakSanitizer: detected memory leaks" "$d/leak.out"
}
if lsan_probe; then
    DETECT_LEAKS=1
    echo "run-tests: LeakSanitizer works here: sanitized suites run with detect_leaks=1"
else
    DETECT_LEAKS=0
    echo "run-tests: LeakSanitizer does not work in this environment (probe failed):" \
        "sanitized suites run with detect_leaks=0, leaks are NOT checked"
fi
SAN_ENV=(
    "ASAN_OPTIONS=detect_leaks=$DETECT_LEAKS:halt_on_error=1:abort_on_error=0"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
    "LSAN_OPTIONS=report_objects=1"
)

# run_suite LABEL PREFIX LIMIT_SECONDS [VAR=VALUE...] -- COMMAND...
#   LABEL names the suite in this script's output; PREFIX is the word before the colon of the
#   closing line the suite prints ("unit", "integration", "sdk").
run_suite() {
    local label="$1" prefix="$2" limit="$3"
    shift 3
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        envs+=("$1")
        shift
    done
    shift # --
    local log="$LOGDIR/$label.log"
    echo
    echo "=== $label: $* (limit ${limit}s)"
    local t0 t1 rc
    t0=$(date +%s)
    env "${envs[@]}" timeout -k 10 "$limit" "$@" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s)

    local line p f note=""
    line="$(grep -aE "^${prefix}: [0-9]+ passed, [0-9]+ failed" "$log" | tail -n1)"
    if [ -z "$line" ]; then
        p=0
        f=1
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            note="timed out after ${limit}s, no closing line: counted as 1 failed"
        else
            note="exit status $rc, no closing line: counted as 1 failed"
        fi
    else
        p="$(sed -E 's/^[^:]+: ([0-9]+) passed, ([0-9]+) failed.*/\1/' <<<"$line")"
        f="$(sed -E 's/^[^:]+: ([0-9]+) passed, ([0-9]+) failed.*/\2/' <<<"$line")"
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
            f=1
            note="exit status $rc though it reported no failure (crash or sanitizer report at exit?): counted as 1 failed"
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            note="timed out after ${limit}s"
        fi
    fi
    [ -n "$note" ] && echo "=== $label: $note"
    echo "=== $label: $p passed, $f failed in $((t1 - t0))s"
    summary+=("$(printf '%-18s %5d passed %5d failed %6ss%s' "$label" "$p" "$f" "$((t1 - t0))" "${note:+  ($note)}")")
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}

# missing_suite LABEL WHY: a suite that cannot run counts as one failure.
missing_suite() {
    echo
    echo "=== $1: $2: counted as 1 failed"
    summary+=("$(printf '%-18s %5d passed %5d failed %6ss  (%s)' "$1" 0 1 0 "$2")")
    total_fail=$((total_fail + 1))
}

need_exe() { [ -x "$1" ] || { missing_suite "$2" "$1 not built"; return 1; }; }

t_all=$(date +%s)
for s in $SUITES; do
    case "$s" in
        unit)
            need_exe "$BUILD/test_unit" unit &&
                run_suite unit unit "$T_UNIT" -- "$BUILD/test_unit"
            ;;
        asan-unit)
            need_exe "$BUILD/asan/test_unit" asan-unit &&
                run_suite asan-unit unit "$T_ASAN_UNIT" "${SAN_ENV[@]}" -- "$BUILD/asan/test_unit"
            ;;
        integration | asan-integration)
            bin="$BUILD/sandboxd" limit="$T_INTEGRATION" envs=()
            if [ "$s" = asan-integration ]; then
                bin="$BUILD/asan/sandboxd" limit="$T_ASAN_INTEGRATION" envs=("${SAN_ENV[@]}")
            fi
            if [ ! -f tests/integration/run.py ]; then
                missing_suite "$s" "tests/integration/run.py does not exist"
            elif need_exe "$bin" "$s"; then
                run_suite "$s" integration "$limit" "${envs[@]}" -- python3 tests/integration/run.py --daemon "$bin"
            fi
            ;;
        sdk)
            need_exe "$BUILD/sandboxd" sdk &&
                run_suite sdk sdk "$T_SDK" -- tests/sdk/run.sh "$BUILD/sandboxd"
            ;;
        *)
            missing_suite "$s" "unknown suite name"
            ;;
    esac
done

echo
echo "=== summary (leak detection: $([ "$DETECT_LEAKS" = 1 ] && echo on || echo OFF), total $(($(date +%s) - t_all))s)"
for l in "${summary[@]}"; do echo "  $l"; done
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
