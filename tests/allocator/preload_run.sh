#!/bin/sh
# preload_run.sh LINES PATTERN PROGRAM [ARGS...]
# Runs PROGRAM with LD_PRELOAD=$LEMA_PRELOAD (only the program: not this shell) and checks that
# it exits 0, that its stderr holds exactly LINES lines from the hook ("lema preload: ..."), and
# that stderr matches PATTERN (an extended regular expression; empty: anything).
lines=$1
pattern=$2
shift 2
err=$(mktemp)
trap 'rm -f "$err"' EXIT
env LD_PRELOAD="$LEMA_PRELOAD" "$@" 2>"$err"
rc=$?
cat "$err" >&2
if [ "$rc" -ne 0 ]; then
  echo "FAIL: $* exited $rc" >&2
  exit 1
fi
got=$(grep -c '^lema preload: ' "$err")
if [ "$got" -ne "$lines" ]; then
  echo "FAIL: $got lines from the hook on stderr, expected $lines" >&2
  exit 1
fi
if [ -n "$pattern" ] && ! grep -Eq -- "$pattern" "$err"; then
  echo "FAIL: stderr does not match '$pattern'" >&2
  exit 1
fi
echo "ok"
