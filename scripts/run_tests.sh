#!/usr/bin/env bash
# `make test`: the suite as two pytest processes side by side on this machine's cores.
#
# The lifecycle group (marker `lifecycle`: the session's demo lifecycle run, with its 1,200-step fine-tune on one
# core, and the tests that read it) runs in the background at a lower CPU priority, followed there by the tests
# marked `background` (self-contained modules, moved out of the foreground so that both processes end at about the
# same time: in stop 27's CI the foreground took 1,455 s and the lifecycle group 723 s); every other test runs in the
# foreground at normal priority. The fine-tune leaves the second core idle and the other tests leave gaps on both,
# so the background soaks up what the foreground does not use, while the foreground's load and timing tests keep
# the CPU they would have alone. Each process has its own session (state dir, MLflow, Prefect harness, servers).
# `pytest` on its own still runs everything in one process. Exit status: the foreground's if it failed, else the
# background's (so 5, "no tests collected", fails either way).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NICE=${LLMHOST_TEST_BACKGROUND_NICE:-10}
logs=.llmhost/test-logs
mkdir -p "$logs"
bg_log="$logs/background.log"

start=$(date +%s)
setsid -w nice -n "$NICE" "$PYTHON" -m pytest -m "lifecycle or background" --durations=20 -p no:cacheprovider "$@" >"$bg_log" 2>&1 &
bg=$!
trap 'kill -TERM -- -"$bg" 2>/dev/null' INT TERM
echo "make test: the lifecycle group, then the background-marked tests, run in the background (nice $NICE, pid $bg), output in $bg_log"

"$PYTHON" -m pytest -m "not lifecycle and not background" --durations=30 "$@"
fg_rc=$?
echo "make test: foreground exit $fg_rc after $(( $(date +%s) - start ))s; waiting for the background process"
wait "$bg"
bg_rc=$?
echo "================ the background process (lifecycle group, then background-marked; nice $NICE): $bg_log ================"
cat "$bg_log"
echo "make test: foreground exit $fg_rc, background exit $bg_rc, $(( $(date +%s) - start ))s in all"
if [ "$fg_rc" -ne 0 ]; then exit "$fg_rc"; fi
exit "$bg_rc"
