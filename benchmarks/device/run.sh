#!/usr/bin/env bash
# The device run: builds LEMA against the machine's PyTorch (libtorch) and CUDA toolkit, runs the
# gpu- and conformance-labelled tests and the device benchmarks, and leaves in OUT_DIR at most
# seven files (the device returns eight, at most two folders down):
#   summary.md, summary.json   each phase: ok / failed / timed out / skipped, why, seconds;
#                              the environment (card, driver, g++, toolkit, torch)
#   device_bench.json, .md     H2D bandwidth (driver baseline vs the backend's pipeline), map /
#                              set-access / unmap cost per chunk size, Pager passes
#   train_steps.md, .json      `lema train --device cuda` step times, resident and paged
#                              (train_ranks: tokens/s over NCCL, 1 rank and one per GPU, is its
#                              phase's note in the summary)
#   logs.tar.gz                every phase's log, the build's, the runs' --log-json files
# and prints the tables and the summary last on stdout (the device returns its tail).
#
#   benchmarks/device/run.sh --budget 450 OUT_DIR                  # on the GPU machine (README)
#   benchmarks/device/run.sh --cpu-rehearsal --budget 300 OUT_DIR  # here: the fake CUDA driver
#
# Options:
#   --budget S        seconds the whole run may take (the device call's limit less a margin); a
#                     phase starts only if its minimum fits, and is cut off where the budget ends
#   --cpu-rehearsal   no GPU: the CUDA phases run against the fake driver (tests/fakes/), two
#                     training runs run on the CPU, the others are "skipped: no GPU"
#   --build-dir DIR   an existing, built folder: configure and build are skipped (the ctest
#                     rehearsal reuses the main build); otherwise DIR is configured and built
#   --debs DIR        the .debs to unpack into a prefix and build against (default: debs/ beside
#                     this script on the GPU machine; none in a rehearsal without this option)
#   --phases A,B      run only these phases
#   --resume          run again what the last call on this build folder did not finish (failed,
#                     timed out, skipped for the deadline or a failed input, never reached), and
#                     the table: the second call on the same warm machine. The build, the model,
#                     the runs' step logs and the bandwidth figures of the first call are reused
#   --list-phases     print the phase names and exit
#   --nproc N         every `lema train` run trains with N local ranks (lema train --nproc N,
#                     NCCL on the GPUs; rank r on GPU r): for a machine with N GPUs. Default 1
#                     (train_ranks measures 1 rank against one per GPU whatever this is)
# Environment: LEMA_PYTHON (default: `command -v python3`, made absolute), LEMA_DEVICE_JOBS,
# LEMA_DEVICE_BUILD_CMD (a command taking BUILD_DIR TARGET... in place of ninja).
#
# Note [Phases]: the device machine is lent rarely and briefly, so one failure must not lose
# the rest: there is no `set -e`; each phase runs in its own process group under `timeout`,
# records its status and the next one starts. Phases are ordered by value (tests and bandwidth
# first, the oversubscribed unified-memory run last with a short cut-off); a phase whose inputs
# failed is skipped naming them. The summary is rewritten and the logs repacked after every
# phase, so a run killed from outside still leaves a well-formed summary of what ran.
set -uo pipefail

PHASES=(environment deps configure build_core ctest_gpu bandwidth cuda_alloc build_torch ctest_torch
        gen_model train_resident train_half train_ranks train_half_cached train_resident_small
        train_half_small train_half_managed pager_passes preload_oversubscribe train_unified
        train_table)

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
rehearsal=0 build_given="" debs_dir="" budget=540 only="" out_arg="" resume=0 nproc=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-rehearsal) rehearsal=1 ;;
    --build-dir) build_given="${2:?--build-dir needs a folder}"; shift ;;
    --debs) debs_dir="${2:?--debs needs a folder}"; shift ;;
    --budget) budget="${2:?--budget needs seconds}"; shift ;;
    --phases) only=",${2:?--phases needs a list},"; shift ;;
    --resume) resume=1 ;;
    --nproc) nproc="${2:?--nproc needs a count of ranks}"; shift ;;
    --list-phases) printf '%s\n' "${PHASES[@]}"; exit 0 ;;
    -*) echo "run.sh: unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
    *) [[ -z "$out_arg" ]] || { echo "run.sh: one OUT_DIR only" >&2; exit 2; }; out_arg="$1" ;;
  esac
  shift
done
if [[ -z "$out_arg" || ! "$budget" =~ ^[0-9]+$ || ! "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--cpu-rehearsal] [--budget SECONDS] [--build-dir DIR] [--debs DIR] [--phases A,B | --resume] [--nproc N] OUT_DIR" >&2
  exit 2
fi
if [[ -n "$only" ]]; then
  for p in ${only//,/ }; do
    [[ " ${PHASES[*]} " == *" $p "* ]] || { echo "run.sh: no phase '$p' (--list-phases)" >&2; exit 2; }
  done
fi
out="$(mkdir -p "$out_arg" && cd "$out_arg" && pwd)"
start=$(date +%s)
deadline=$((start + budget))
reserve=$(( budget >= 120 ? 20 : 5 ))  # kept for the table, the summary and the archive
work="$(mktemp -d "${TMPDIR:-/tmp}/lema-device-run.XXXXXX")"  # logs; packed into OUT_DIR
if [[ $rehearsal -eq 0 && -z "$debs_dir" ]]; then debs_dir="$here/debs"; fi

# An absolute interpreter: CMake keeps LEMA_PYTHON as a FILEPATH, so a bare python3 would become
# <cwd>/python3 and torch would not be found.
python="${LEMA_PYTHON:-python3}"
[[ "$python" == /* ]] || python="$(command -v "$python" || echo "$python")"
if [[ -n "$build_given" ]]; then
  build="$(cd "$build_given" && pwd)" || exit 2
  cached="$(sed -n 's/^LEMA_PYTHON:[A-Z]*=//p' "$build/CMakeCache.txt" 2>/dev/null)"
  [[ -z "${LEMA_PYTHON:-}" && -n "$cached" ]] && python="$cached"
else
  build="${LEMA_DEVICE_BUILD_DIR:-$repo/build-device}"
fi
jobs="${LEMA_DEVICE_JOBS:-$(nproc)}"
if ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if [[ $rehearsal -eq 1 ]]; then
  # The fake driver stands in for libcuda.so.1 in every CUDA phase below.
  export LEMA_CUDA_DRIVER="$build/tests/libfake_cuda_driver.so"
fi
# The generated model, the runs' step logs and the bandwidth figures stay in the build folder,
# which a warm device machine keeps between calls (--resume); a fresh call starts them anew.
model="$build/device-model"
runs="$build/device-runs"
declare -A last
if [[ $resume -eq 1 ]]; then
  if [[ ! -f "$runs/status" ]]; then
    echo "run.sh: --resume: no earlier call recorded in $runs" >&2
    exit 2
  fi
  while IFS=$'\t' read -r p st; do last[$p]="$st"; done < "$runs/status"
  only=","
  for p in "${PHASES[@]}"; do
    case "${last[$p]:-not reached}" in
      ok|"skipped: no GPU"|"skipped: build folder given"|"skipped: the system's packages"*) ;;
      *) only+="$p," ;;
    esac
  done
  [[ "$only" == *",train_table,"* ]] || only+="train_table,"
else
  rm -rf "$runs"
fi
mkdir -p "$runs"
export out work build repo here python jobs rehearsal model runs debs_dir build_given nproc
export LEMA_DEVICE_BUILD_CMD="${LEMA_DEVICE_BUILD_CMD:-}"
log() { echo "[$(( $(date +%s) - start ))s] $*"; }

# ---- phase bookkeeping ----
declare -A status secs note
for p in "${PHASES[@]}"; do status[$p]="not reached"; secs[$p]=0; note[$p]=""; done

json_str() {  # a JSON string of $1
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/ }
  s=${s//$'\n'/ }
  s=${s//$'\r'/ }
  printf '"%s"' "$s"
}

write_summary() {
  local p mode="device" sep
  [[ $rehearsal -eq 1 ]] && mode="CPU rehearsal against the fake CUDA driver: NOT GPU figures"
  {
    echo "# Device run: $mode"
    echo
    echo "budget ${budget}s, elapsed $(( $(date +%s) - start ))s, build folder $build"
    echo
    echo '```'
    cat "$work/environment.txt" 2> /dev/null || echo "(environment not recorded)"
    echo '```'
    echo
    echo "| phase | status | s | note |"
    echo "|---|---|---|---|"
    for p in "${PHASES[@]}"; do
      echo "| $p | ${status[$p]} | ${secs[$p]} | ${note[$p]//|//} |"
    done
    echo
    echo "Files: $(cd "$out" && ls | grep -v '\.tmp$' | tr '\n' ' ')"
  } > "$out/summary.md.tmp" && mv "$out/summary.md.tmp" "$out/summary.md"
  {
    echo "{"
    echo "  \"mode\": $(json_str "$mode"), \"budget_s\": $budget,"
    echo "  \"elapsed_s\": $(( $(date +%s) - start )), \"build_dir\": $(json_str "$build"),"
    local lines=() line
    [[ -f "$work/environment.txt" ]] && mapfile -t lines < "$work/environment.txt"
    printf '  "environment": ['
    sep=""
    for line in "${lines[@]}"; do printf '%s%s' "$sep" "$(json_str "$line")"; sep=", "; done
    printf '],\n'
    echo "  \"phases\": ["
    sep=""
    for p in "${PHASES[@]}"; do
      printf '%s    {"name": %s, "status": %s, "seconds": %s, "note": %s}' "$sep" \
        "$(json_str "$p")" "$(json_str "${status[$p]}")" "${secs[$p]}" "$(json_str "${note[$p]}")"
      sep=$',\n'
    done
    printf '\n  ]\n}\n'
  } > "$out/summary.json.tmp" && mv "$out/summary.json.tmp" "$out/summary.json"
}

pack_logs() {  # every log of this run in one archive (only eight files come back)
  tar -czf "$out/logs.tar.gz.tmp" -C "$work" . -C "$build" device-runs 2> /dev/null &&
    mv "$out/logs.tar.gz.tmp" "$out/logs.tar.gz"
}

record() {  # phase status seconds note
  status[$1]="$2" secs[$1]="$3" note[$1]="$4"
  log "$1: $2${4:+ ($4)}"
  if [[ "$2" != "skipped: not selected" ]]; then  # what --resume reads
    last[$1]="$2"
    for p in "${PHASES[@]}"; do
      [[ -n "${last[$p]:-}" ]] && printf '%s\t%s\n' "$p" "${last[$p]}"
    done > "$runs/status"
  fi
  write_summary
  pack_logs
}

usable() {  # whether phase $1's output can be used: it ran ok, or not in this call by choice
  case "${status[$1]}" in
    ok|"skipped: not selected"*|"skipped: build folder given"*) return 0 ;;
    *) return 1 ;;
  esac
}

# phase NAME MIN_S CAP_S DEPS FUNCTION [ARGS...]: runs FUNCTION in its own process group, cut
# off at CAP_S or where the budget ends; skipped if fewer than MIN_S remain or a DEP is unusable.
phase() {
  local name=$1 need=$2 cap=$3 deps=$4 d
  shift 4
  if [[ -n "$only" && "$only" != *",$name,"* ]]; then record "$name" "skipped: not selected" 0 ""; return 1; fi
  for d in ${deps//,/ }; do
    if ! usable "$d"; then record "$name" "skipped: needs $d" 0 "$d: ${status[$d]}"; return 1; fi
  done
  local left=$(( deadline - $(date +%s) - reserve ))
  if (( left < need || left < 1 )); then
    record "$name" "skipped: deadline" 0 "${left}s left of the budget, needs ${need}s"
    return 1
  fi
  local limit=$(( cap < left ? cap : left )) t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" > "$work/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  local said
  said="$(grep -v '^[[:space:]]*$' "$work/$name.log" | tail -1 | cut -c1-300)"
  if [[ $rc -eq 0 ]]; then
    record "$name" ok "$took" "$said"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    record "$name" "timed out" "$took" "cut off after ${limit}s: $said"
  else
    record "$name" failed "$took" "exit $rc: $said"
  fi
  [[ $rc -eq 0 ]]
}

skip() {  # phase reason
  if [[ -n "$only" && "$only" != *",$1,"* ]]; then record "$1" "skipped: not selected" 0 ""; return; fi
  record "$1" "skipped: $2" 0 ""
}

finish() {
  trap - EXIT TERM INT
  write_summary
  pack_logs
  [[ -f "$runs/cuda_alloc.md" ]] && { echo; echo "==== cuda_alloc.md"; cat "$runs/cuda_alloc.md"; }
  for f in device_bench.md train_steps.md summary.md; do
    [[ -f "$out/$f" ]] && { echo; echo "==== $f"; cat "$out/$f"; }
  done
  rm -rf "$work"
}
trap finish EXIT
trap 'log "terminated"; exit 143' TERM INT

# ---- phase bodies (each runs under timeout in a child bash, hence exported) ----
environment_body() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm), $(nproc) cores, $(free -g 2> /dev/null | awk '/Mem:/ {print $2 " GiB"}') memory"
    echo "g++: $(g++ --version 2>&1 | head -1)"
    echo "cmake: $(cmake --version 2>&1 | head -1), ninja $(ninja --version 2>&1)"
    if command -v nvidia-smi > /dev/null; then
      echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2)"
    else
      echo "gpu: none seen (no nvidia-smi)"
    fi
    echo "nvcc: $(nvcc --version 2>&1 | tail -1)"
    echo "python: $python"
    echo "torch: $("$python" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" 2>&1 | tail -1)"
    echo "free in ${TMPDIR:-/tmp}: $(df -h "${TMPDIR:-/tmp}" 2> /dev/null | awk 'NR==2 {print $4}')"
    if [[ $rehearsal -eq 1 ]]; then echo "mode: CPU rehearsal, CUDA driver $LEMA_CUDA_DRIVER"; fi
  } > "$work/environment.txt"
  cat "$work/environment.txt"
}

deps_body() {
  # The GPU machine has no network and no Debian packages: the .debs fetched beforehand by
  # fetch_debs.sh are unpacked into a prefix the configure step points at.
  local prefix="$build/deps" debs=() deb
  shopt -s nullglob
  debs=("$debs_dir"/*.deb)
  if [[ ${#debs[@]} -eq 0 ]]; then
    echo "no .deb files in $debs_dir: run benchmarks/device/fetch_debs.sh where there is network, and carry benchmarks/device/debs"
    return 1
  fi
  # The same packages unpacked by an earlier call are kept: fresh files would rebuild everything.
  local stamp
  stamp="$(cd "$debs_dir" && ls -l ./*.deb | awk '{print $5, $NF}')"
  if [[ -f "$prefix/.debs" && "$(cat "$prefix/.debs")" == "$stamp" ]]; then
    echo "reused the ${#debs[@]} packages unpacked in $prefix"
    return 0
  fi
  rm -rf "$prefix" && mkdir -p "$prefix"
  for deb in "${debs[@]}"; do
    if command -v dpkg-deb > /dev/null && [[ -z "${LEMA_DEVICE_NO_DPKG:-}" ]]; then
      dpkg-deb -x "$deb" "$prefix" || return 1
    else  # no dpkg: a .deb is an ar archive holding data.tar.*
      "$python" "$here/unpack_deb.py" "$deb" "$prefix" || return 1
    fi
  done
  # Debian's absolute symlinks (libz.so -> /lib/...) would point outside the prefix.
  find "$prefix" -type l | while read -r l; do
    t="$(readlink "$l")"
    if [[ "$t" == /* && -e "$prefix$t" ]]; then ln -sfn "$prefix$t" "$l"; fi
  done
  echo "$stamp" > "$prefix/.debs"
  echo "unpacked ${#debs[@]} packages into $prefix"
}

configure_body() {
  local prefix="$build/deps" args
  args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLEMA_WITH_CUDA=ON -DLEMA_WITH_TORCH=ON
        -DLEMA_PYTHON="$python" -DLEMA_WERROR=OFF -DLEMA_BUILD_FUZZERS=OFF)
  if [[ -d "$prefix/usr" ]]; then
    local multiarch="$prefix/usr/lib/x86_64-linux-gnu"
    # Header-only Boost has no package to find: its include folder goes on every compile line.
    args+=(-DCMAKE_PREFIX_PATH="$prefix/usr;$multiarch/cmake"
           -DCMAKE_LIBRARY_PATH="$multiarch" -DCMAKE_INCLUDE_PATH="$prefix/usr/include"
           -DCMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES="$prefix/usr/include")
    export PKG_CONFIG_PATH="$multiarch/pkgconfig:$prefix/usr/share/pkgconfig"
    # The rehearsal proves the prefix is what is found: find_package, find_library and
    # find_path ignore the system's /usr (the compiler's own /usr/include cannot be).
    if [[ $rehearsal -eq 1 ]]; then
      args+=(-DCMAKE_IGNORE_PREFIX_PATH=/usr -DCMAKE_SYSTEM_IGNORE_PREFIX_PATH=/usr)
    fi
  fi
  echo "cmake ${args[*]}"
  cmake -S "$repo" -B "$build" "${args[@]}" || return 1
  echo "libtorch: $(sed -n 's/^Torch_DIR:PATH=//p' "$build/CMakeCache.txt")"
}

build_targets() {
  if [[ -n "$LEMA_DEVICE_BUILD_CMD" ]]; then
    $LEMA_DEVICE_BUILD_CMD "$build" "$@"
  else
    ninja -C "$build" -j"$jobs" "$@"
  fi
}
build_core_body() {
  build_targets runtime_cuda_gpu_test runtime_backend_test fake_cuda_driver device_bench lema \
    lema_cuda_alloc allocator_conformance_test lema_preload
}
build_torch_body() { build_targets torch_cuda_weights_test lema_trainer_cli; }

ctest_body() {  # ctest arguments...
  local dir="$build" f log rc
  if [[ -n "$build_given" ]]; then
    # A build folder shared with a running ctest (the rehearsal test): this ctest reads a copy of
    # its test files (they name everything by absolute path) and writes its own Testing/ there.
    dir="$work/ctest_view"
    rm -rf "$dir"
    (cd "$build" && find . -name CTestTestfile.cmake) | while read -r f; do
      mkdir -p "$dir/$(dirname "$f")" && cp "$build/$f" "$dir/$f"
    done
  fi
  cd "$dir" || return 1
  # --timeout: a stuck managed-memory test must not eat the call.
  log="$(ctest --output-on-failure -j1 --timeout 120 --no-tests=error "$@" 2>&1)"
  rc=$?
  echo "$log"
  [[ -n "$build_given" ]] && rm -rf "$dir"
  echo "$(grep "tests passed" <<< "$log" | tail -1); $(grep -c '\*\*\*Skipped' <<< "$log") skipped"
  return $rc
}

bench_body() {  # parts, device_bench arguments...
  local parts=$1 dir="$runs/bench_${1//,/_}"
  shift
  rm -rf "$dir" && mkdir -p "$dir"
  "$build/benchmarks/device/device_bench" "$dir" --only "$parts" "$@" || return 1
  "$python" "$here/merge_bench.py" "$runs" "$out" "$rehearsal"
}

gen_body() {  # lema gen arguments...
  # A complete model of the same shape from an earlier call on this machine is reused.
  if [[ -f "$model/.complete" && "$(cat "$model/.complete")" == "$*" ]]; then
    echo "reused $model ($(du -sh "$model" | cut -f1))"
    return 0
  fi
  rm -rf "$model"
  "$build/tools/lema" gen --out "$model" "$@" || return 1
  echo "$*" > "$model/.complete"
  echo "generated $model, $(du -sh "$model" | cut -f1)"
}

train_body() {  # name, lema train arguments...
  local name=$1 adapter="$work/adapter"
  shift
  rm -f "$runs/train_$name.jsonl"
  "$build/tools/lema" train --model "$model" --out "$adapter" \
    --log-json "$runs/train_$name.jsonl" --nproc "$nproc" "$@"
  local rc=$?
  rm -rf "$adapter"
  [[ $rc -eq 0 ]] && grep -h "^done:" "$work/train_$name.log" | tail -1
  return $rc
}

# Note [Ranks phase]: `lema train --nproc G --dist-backend nccl` on the G GPUs torch sees, against
# 1 rank through the same NCCL path (a group of one), resident, each rank --batch sequences: the
# tokens/s of all ranks together (median of the steps after the first) and their ratio. With one
# GPU only the 1-rank run, which proves the path (every step logged as nccl). The rehearsal runs
# the same on the CPU with two Gloo ranks. The figures are the phase's note (summary.md) and
# device-runs/ranks.json (logs.tar.gz); train_resident, when it ran, is the run without a group.
ranks_body() {  # lema train arguments...
  local gpus backend=nccl n
  if [[ $rehearsal -eq 1 ]]; then
    gpus=2 backend=gloo
  else
    gpus=$("$python" -c "import torch; print(torch.cuda.device_count())" 2> /dev/null | tail -1)
  fi
  if ! [[ "$gpus" =~ ^[0-9]+$ ]] || (( gpus < 1 )); then
    echo "torch sees no GPU ('$gpus'): no NCCL run"
    return 1
  fi
  local counts=(1)
  (( gpus >= 2 )) && counts+=("$gpus")
  for n in "${counts[@]}"; do
    rm -f "$runs/ranks_$n.jsonl"
    echo "lema train --nproc $n --dist-backend $backend $*"
    "$build/tools/lema" train --model "$model" --out "$work/adapter_ranks" \
      --log-json "$runs/ranks_$n.jsonl" --nproc "$n" --dist-backend "$backend" "$@" || return 1
    rm -rf "$work/adapter_ranks"
  done
  "$python" "$here/ranks_table.py" "$runs" "$backend" "${counts[@]}"
}

cuda_alloc_body() {  # PyTorch with liblema_cuda_alloc.so against its own allocator
  "$python" "$here/cuda_alloc_bench.py" --library "$build/allocator/pluggable/liblema_cuda_alloc.so" \
    --out "$runs/cuda_alloc.md"
}

table_body() {
  # A resumed call has the first call's bandwidth in the build folder, not yet in OUT_DIR.
  if compgen -G "$runs/bench_*/device_bench.json" > /dev/null; then
    "$python" "$here/merge_bench.py" "$runs" "$out" "$rehearsal" || return 1
  fi
  "$python" "$here/train_table.py" "$runs" --bench "$out/device_bench.json" \
    --json "$out/train_steps.json" > "$out/train_steps.md" || return 1
  if [[ $rehearsal -eq 1 ]]; then
    sed -i '1i **CPU rehearsal: these runs ran on the CPU, not a GPU.**\n' "$out/train_steps.md"
  fi
  echo "wrote train_steps.md and train_steps.json"
}
preload_body() {  # the LD_PRELOAD hook against plain unified memory, oversubscribed
  "$python" "$here/preload_oversubscribe.py" --out "$runs" --timeout 100 \
    --preload "$build/allocator/preload/liblema_preload.so"
}
export -f environment_body deps_body configure_body build_targets build_core_body \
  build_torch_body ctest_body bench_body gen_body train_body table_body cuda_alloc_body \
  preload_body ranks_body

# ---- the run ----
if [[ $rehearsal -eq 1 ]]; then
  need() { echo $(( $1 / 4 )); }  # the rehearsal's steps are small
  bench_h2d=(--total 256MiB --reps 10)
  bench_pager=(--pager-model 64MiB --passes 2)
  shape=(--hidden 256 --layers 2 --heads 4 --kv-heads 2 --intermediate 1024 --vocab 2048)
  train=(--steps 3 --dtype f32 --device cpu)
  big=(--seq-len 64 --batch 2)
  small=(--seq-len 32 --batch 1)
else
  need() { echo "$1"; }
  bench_h2d=(--total 8GiB --reps 100)
  bench_pager=(--pager-model 4GiB --passes 3)
  # A Llama of 0.89B parameters, 3.3 GiB of f32 weights (bf16 compute): 16 layers of hidden 2048,
  # MLP 5632, 16 heads (8 key/value), a 32000 vocabulary with an untied output head.
  shape=(--hidden 2048 --layers 16 --heads 16 --kv-heads 8 --intermediate 5632 --vocab 32000)
  train=(--steps 6 --dtype bf16 --device cuda)
  big=(--seq-len 2048 --batch 8)
  small=(--seq-len 512 --batch 1)
fi

phase environment 0 60 "" environment_body
if [[ -n "$build_given" ]]; then
  for p in deps configure build_core; do record "$p" "skipped: build folder given" 0 "$build"; done
else
  if [[ -n "$debs_dir" ]]; then
    phase deps "$(need 10)" 120 "" deps_body
  else
    skip deps "the system's packages (a rehearsal without --debs)"
  fi
  # A build cannot hang: its cut-off is the budget (a loaded machine builds slowly).
  # The unpacked spdlog and fmt libraries, for the built tools and tests to load at run time.
  multiarch="$build/deps/usr/lib/x86_64-linux-gnu"
  if [[ -d "$multiarch" ]]; then export LD_LIBRARY_PATH="$multiarch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  phase configure "$(need 20)" 300 "" configure_body
  phase build_core "$(need 60)" "$budget" configure build_core_body
fi
phase ctest_gpu "$(need 20)" 300 build_core ctest_body -L 'gpu|conformance' -LE torch
phase bandwidth "$(need 30)" 180 build_core bench_body h2d,vmm "${bench_h2d[@]}"
if [[ $rehearsal -eq 1 ]]; then
  skip cuda_alloc "no GPU"
else
  phase cuda_alloc "$(need 30)" 150 build_core cuda_alloc_body
fi
if [[ -n "$build_given" ]]; then
  record build_torch "skipped: build folder given" 0 "$build"
else
  phase build_torch "$(need 120)" "$budget" configure build_torch_body
fi
phase ctest_torch "$(need 20)" 300 build_torch ctest_body -L torch -L gpu
phase gen_model "$(need 30)" 300 build_core gen_body "${shape[@]}"

model_bytes=$(du -sb --exclude=.complete "$model" 2> /dev/null | cut -f1)
half=$(( ${model_bytes:-0} / 2 ))
run() {  # phase, cut-off s, lema train arguments...
  local name=$1 cap=$2
  shift 2
  phase "$name" "$(need 40)" "$cap" build_torch,gen_model train_body "${name#train_}" "${train[@]}" "$@"
}
gpu_run() {  # the runs that need a GPU's memory: none in the rehearsal
  if [[ $rehearsal -eq 1 ]]; then skip "$1" "no GPU"; else run "$@"; fi
}

# The paged runs get one --device-memory-cap: half the weights plus what the resident run used
# beyond its weights (activations, workspace, context), sampled with nvidia-smi.
used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2> /dev/null | head -1; }
idle="" sampler=""
if [[ $rehearsal -eq 0 && ( -z "$only" || "$only" == *",train_resident,"* ) ]]; then
  idle=$(used_mib || true)
fi
if [[ "$idle" =~ ^[0-9]+$ ]]; then  # the first line is the idle figure
  (echo "$idle"; while true; do used_mib; sleep 0.2; done) > "$runs/train_resident_used_mib.txt" 2> /dev/null &
  sampler=$!
fi
run train_resident 150 "${big[@]}" --budget unlimited
if [[ -n "$sampler" ]]; then kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null; fi
extra_mib=16384 cap_why="no nvidia-smi sample of the resident run: 16 GiB assumed"
samples="$runs/train_resident_used_mib.txt"
if usable train_resident && [[ -s "$samples" && "$(head -1 "$samples")" =~ ^[0-9]+$ ]]; then
  idle=$(head -1 "$samples")
  peak=$(grep -E '^[0-9]+$' "$samples" | sort -n | tail -1)
  extra_mib=$(( peak - idle - (${model_bytes:-0} >> 20) ))
  cap_why="resident run peaked at ${peak} MiB, ${idle} MiB idle"
fi
if (( extra_mib < 1024 )); then  # a failed or odd resident run must not make the cap negative
  cap_why="$cap_why; ${extra_mib} MiB beyond the weights clamped to 1024"
  extra_mib=1024
fi
cap="$(( (half >> 20) + extra_mib ))MiB"
echo "device memory cap for the paged runs: $cap (half the weights $((half >> 20)) MiB; $cap_why)" |
  tee "$runs/train_cap.txt"

run train_half 150 "${big[@]}" --budget "$half" \
  $([[ $rehearsal -eq 0 ]] && echo --device-memory-cap "$cap")
phase train_ranks "$(need 60)" 300 build_torch,gen_model ranks_body "${train[@]}" "${big[@]}" \
  --budget unlimited
gpu_run train_half_cached 150 "${big[@]}" --budget "$half" --host-cache "${model_bytes:-0}" \
  --device-memory-cap "$cap"
gpu_run train_resident_small 120 "${small[@]}" --budget unlimited
gpu_run train_half_small 120 "${small[@]}" --budget "$half" --host-cache "${model_bytes:-0}" \
  --device-memory-cap "$cap"
gpu_run train_half_managed 150 "${big[@]}" --gpu-memory managed --budget "$half" \
  --device-memory-cap "$cap"
phase pager_passes "$(need 40)" 180 build_core bench_body pager "${bench_pager[@]}"
if [[ $rehearsal -eq 1 ]]; then
  skip preload_oversubscribe "no GPU"
else
  phase preload_oversubscribe "$(need 60)" 240 build_core preload_body
fi
# Plain unified memory oversubscribed to the same cap: the driver pages, often slowly; last, and
# cut off early, so it cannot take the time of anything above.
gpu_run train_unified 60 "${big[@]}" --gpu-memory unified --budget unlimited \
  --device-memory-cap "$cap"
reserve=0  # the table runs in the time kept for it
phase train_table 0 30 "" table_body

failed=0
for p in "${PHASES[@]}"; do [[ "${status[$p]}" == failed || "${status[$p]}" == "timed out" ]] && failed=1; done
log "done: results in $out"
exit $failed
