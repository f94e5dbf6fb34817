#!/usr/bin/env bash
# The LD_PRELOAD hook's cost on a program that is not under budget pressure: the run time of
# tests' preload_program (one 4 MiB and four 64 KiB allocations written and freed per iteration,
# against the fake CUDA runtime) with the hook against without it, alternating, median of RUNS.
# SCENARIO bench_calls leaves the memory unwritten: the calls' cost alone. With the hook, also
# with LEMA_PRELOAD_PROFILE: once with LEMA_PRELOAD_EVENTS=0 (the summary alone) and once with a
# ring that holds every call (10 per iteration) and is saved at exit: the per-call events' cost.
#   benchmarks/preload_overhead.sh BUILD_DIR [ITERATIONS] [RUNS] [SCENARIO]
set -euo pipefail
build=${1:?usage: preload_overhead.sh BUILD_DIR [ITERATIONS] [RUNS]}
iterations=${2:-20000}
runs=${3:-9}
scenario=${4:-bench}
program=$build/tests/preload_program
hook=$build/allocator/preload/liblema_preload.so
[[ -x $program && -f $hook ]] || { echo "build preload_program and lema_preload in $build" >&2; exit 1; }

seconds() {  # command... → wall seconds
  local t0 t1
  t0=$(date +%s%N)
  "$@" > /dev/null
  t1=$(date +%s%N)
  echo "scale=6; ($t1 - $t0) / 1000000000" | bc
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
events=$((iterations * 10))
(( events <= 67108864 )) || { echo "at most 6710886 iterations (the ring's limit)" >&2; exit 1; }
plain=() hooked=() summary=() evented=()
for ((i = 0; i < runs; ++i)); do
  plain+=("$(seconds env "$program" "$scenario" "$iterations")")
  hooked+=("$(seconds env LD_PRELOAD="$hook" LEMA_BUDGET=64G "$program" "$scenario" "$iterations")")
  summary+=("$(seconds env LD_PRELOAD="$hook" LEMA_BUDGET=64G LEMA_PRELOAD_PROFILE="$tmp/s.lprof" \
    LEMA_PRELOAD_EVENTS=0 "$program" "$scenario" "$iterations")")
  evented+=("$(seconds env LD_PRELOAD="$hook" LEMA_BUDGET=64G LEMA_PRELOAD_PROFILE="$tmp/e.lprof" \
    LEMA_PRELOAD_EVENTS="$events" "$program" "$scenario" "$iterations")")
done
p=$(printf '%s\n' "${plain[@]}" | median)
h=$(printf '%s\n' "${hooked[@]}" | median)
s=$(printf '%s\n' "${summary[@]}" | median)
e=$(printf '%s\n' "${evented[@]}" | median)
pct() { echo "scale=2; 100 * ($1 - $2) / $2" | bc; }
echo "$scenario: iterations $iterations, runs $runs (median)"
echo "without the hook: $p s"
echo "with the hook:    $h s ($(pct "$h" "$p") %)"
echo "+ profile, no events: $s s ($(pct "$s" "$p") % over no hook)"
echo "+ profile, $events events: $e s ($(pct "$e" "$s") % over the summary alone)"
