#!/usr/bin/env bash
# side_by_side.sh CMD...: run the commands at the same time (each through bash -c), each one's output to
# its own log, printed whole, in the order given, once it has ended; exits 1 if any failed. The README's
# test command runs scripts/test_oldest.sh (the CPU busy with tests) and scripts/test_wheel.sh (mostly
# installing) this way, which saves most of the wheel test's minute and a half; neither writes into the
# checkout while the other runs (test_wheel.sh builds from a copy).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: side_by_side.sh CMD..." >&2; exit 2; }
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/side_by_side.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    rm -rf "$LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cmds=("$@")
for i in "${!cmds[@]}"; do
    bash -c "${cmds[$i]}" > "$LOGS/$i.log" 2>&1 &
    pids+=($!)
done
echo "side by side: ${#cmds[@]} commands (each one's output follows when it ends)"
failed=0
for i in "${!cmds[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    echo "=== ${cmds[$i]}: exit $rc ==="
    cat "$LOGS/$i.log"
    [ "$rc" = 0 ] || failed=1
done
pids=()
exit $failed
