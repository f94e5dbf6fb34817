#!/usr/bin/env bash
# The device run: builds LEMA against the local PyTorch's libtorch and the CUDA toolkit, runs the
# gpu-labelled tests and the device benchmarks, and writes the results into OUT_DIR:
#   OUT_DIR/environment.txt     card, driver, date, toolkit, torch
#   OUT_DIR/ctest_gpu.log       the gpu-labelled tests (they skip, naming the reason, without GPU)
#   OUT_DIR/device_bench.json   H2D bandwidth (driver baseline vs the backend's pipeline) and
#   OUT_DIR/device_bench.md     map / set-access / unmap cost per chunk size (2, 8, 32, 64 MiB),
#                               Pager passes without and with the host cache tier
#   OUT_DIR/train_steps.md      `lema train --device cuda` step time: weights resident, half of
#                               them under the budget (vmm, vmm + host cache, managed), plain
#                               unified memory oversubscribed alike; small steps vs PCIe floor
#
#   benchmarks/device/run.sh OUT_DIR                    # on the GPU machine
#   benchmarks/device/run.sh --cpu-rehearsal OUT_DIR    # here: system packages, the fake driver
#
# The GPU machine has no network and no Debian packages: the .debs fetched beforehand by
# fetch_debs.sh (benchmarks/device/debs/) are unpacked into a prefix. The rehearsal builds the
# same targets against the system's packages and runs the same steps against the fake CUDA
# driver (tests/fakes/): its figures are host memcpy and mmap costs, NOT GPU figures.
set -euo pipefail

rehearsal=0
if [[ "${1:-}" == "--cpu-rehearsal" ]]; then rehearsal=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--cpu-rehearsal] OUT_DIR" >&2
  exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${LEMA_DEVICE_BUILD_DIR:-$repo/build-device}"
jobs="${LEMA_DEVICE_JOBS:-$(nproc)}"
python="${LEMA_PYTHON:-python3}"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*"; }

# ---- dependencies ----
# -O2 (the project default): GCC 12 at -O3 reports a false -Wrestrict in libstdc++ string code.
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLEMA_WITH_CUDA=ON -DLEMA_PYTHON="$python")
if [[ $rehearsal -eq 0 ]]; then
  prefix="$build/deps"
  shopt -s nullglob
  debs=("$here"/debs/*.deb)
  if [[ ${#debs[@]} -eq 0 ]]; then
    echo "no .deb files in $here/debs: run benchmarks/device/fetch_debs.sh on a machine with network first" >&2
    exit 2
  fi
  mkdir -p "$prefix"
  for deb in "${debs[@]}"; do
    if command -v dpkg-deb > /dev/null; then
      dpkg-deb -x "$deb" "$prefix"
    else  # no dpkg: a .deb is an ar archive holding data.tar.*
      "$python" - "$deb" "$prefix" <<'PY'
import io, sys, tarfile
deb, dest = sys.argv[1], sys.argv[2]
data = open(deb, "rb").read()
assert data[:8] == b"!<arch>\n", deb
pos = 8
while pos < len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58].decode().strip())
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(body)).extractall(dest)
    pos += 60 + size + (size & 1)
PY
    fi
  done
  # Debian's absolute symlinks (libz.so -> /lib/...) would point outside the prefix.
  find "$prefix" -type l | while read -r l; do
    t="$(readlink "$l")"
    if [[ "$t" == /* && -e "$prefix$t" ]]; then ln -sfn "$prefix$t" "$l"; fi
  done
  multiarch="$prefix/usr/lib/x86_64-linux-gnu"
  export LD_LIBRARY_PATH="$multiarch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cmake_args+=(-DCMAKE_PREFIX_PATH="$prefix/usr;$multiarch/cmake"
               -DCMAKE_INCLUDE_PATH="$prefix/usr/include" -DCMAKE_LIBRARY_PATH="$multiarch")
  log "unpacked ${#debs[@]} packages into $prefix"
else
  # The fake driver stands in for libcuda.so.1 in every step below.
  export LEMA_CUDA_DRIVER="$build/tests/libfake_cuda_driver.so"
  cmake_args+=(-DLEMA_WITH_TORCH=OFF)  # the rehearsal proves the CUDA parts, not the torch build
fi

# ---- build ----
cmake -S "$repo" -B "$build" "${cmake_args[@]}" > "$out/configure.log" 2>&1 ||
  { tail -30 "$out/configure.log"; exit 1; }
log "configured ($build)"
targets=(runtime_cuda_gpu_test device_bench)
if [[ $rehearsal -eq 1 ]]; then
  targets+=(fake_cuda_driver runtime_cuda_backend_test runtime_backend_test)
else
  targets+=(torch_cuda_weights_test lema lema-trainer)
fi
ninja -C "$build" -j"$jobs" "${targets[@]}" > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
log "built ${targets[*]}"

# ---- environment ----
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  if [[ $rehearsal -eq 1 ]]; then
    echo "mode: CPU rehearsal against the fake CUDA driver ($LEMA_CUDA_DRIVER): NOT GPU figures"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  fi
  nvcc --version 2>/dev/null | tail -1 || true
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 || true
} > "$out/environment.txt"

# ---- tests ----
(cd "$build" && ctest -L gpu --output-on-failure -j1) > "$out/ctest_gpu.log" 2>&1 || {
  tail -40 "$out/ctest_gpu.log"; echo "gpu tests failed (log: $out/ctest_gpu.log)" >&2; exit 1; }
grep -E "tests passed|Skipped" "$out/ctest_gpu.log" | head -20 || true
log "gpu-labelled tests done"
if [[ $rehearsal -eq 1 ]]; then
  (cd "$build" && ctest -R "BackendConformance|CudaBackend|CudaPager|ManagedPager|FakeMisuse" \
     --output-on-failure -j"$jobs") > "$out/ctest_fake_driver.log" 2>&1 ||
    { tail -40 "$out/ctest_fake_driver.log"; exit 1; }
  log "fake-driver suite passed"
fi

# ---- benchmarks ----
if [[ $rehearsal -eq 1 ]]; then bench_args=(--total 256MiB --reps 10 --pager-model 64MiB); else bench_args=(--total 8GiB --reps 100 --pager-model 4GiB); fi
"$build/benchmarks/device/device_bench" "$out" "${bench_args[@]}" > "$out/device_bench.log" 2>&1 ||
  { tail -20 "$out/device_bench.log"; exit 1; }
if [[ $rehearsal -eq 1 ]]; then
  sed -i '1i **CPU rehearsal against the fake CUDA driver: these are host memcpy/mmap costs, not GPU figures; the GPU figures are still to be measured.**\n' "$out/device_bench.md"
fi
cat "$out/device_bench.md"

# ---- LoRA step time on the GPU (needs torch with CUDA: not in the rehearsal) ----
# A 1.3B-parameter Llama (5 GiB of f32 weights), bf16 compute. At 16k tokens per step: every
# weight resident, then half of them under the budget with each way of keeping them (vmm, vmm
# with the host cache, managed) and plain unified memory oversubscribed to the same device
# memory. At 512 tokens per step, where the transfers cannot hide: resident and vmm at half.
# The paged runs get the same --device-memory-cap: half the weights plus what the resident
# run used beyond its weights (activations, workspace, context), sampled with nvidia-smi.
if [[ $rehearsal -eq 0 ]]; then
  scratch="${LEMA_DEVICE_SCRATCH:-/tmp/lema-device-train}"
  rm -rf "$scratch" && mkdir -p "$scratch"
  "$build/tools/lema" gen --out "$scratch/model" --hidden 2048 --layers 16 --heads 16 \
    --kv-heads 8 --intermediate 5632 --vocab 32000 > "$out/train_gen.log" 2>&1
  model_bytes=$(du -sb "$scratch/model" | cut -f1)
  half=$((model_bytes / 2))
  run_train() {  # name, steps, seq-len, batch, options...
    local name=$1 steps=$2 seq=$3 batch=$4
    shift 4
    timeout "${LEMA_DEVICE_TRAIN_TIMEOUT:-150}" "$build/tools/lema" train --model "$scratch/model" \
      --out "$scratch/$name" --steps "$steps" --seq-len "$seq" --batch "$batch" --dtype bf16 \
      --log-json "$out/train_$name.jsonl" "$@" > "$out/train_$name.log" 2>&1 ||
      { echo "lema train ($name) failed or timed out:"; tail -5 "$out/train_$name.log"; }
  }
  used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1; }
  idle=$(used_mib || true)
  peak_file="$out/train_resident_used_mib.txt"
  if [[ -n "$idle" ]]; then
    (while true; do used_mib; sleep 0.2; done) > "$peak_file" 2>/dev/null &
    sampler=$!
  fi
  run_train resident 6 2048 8 --device cuda --budget unlimited
  if [[ -n "$idle" ]]; then kill "$sampler" 2> /dev/null || true; wait "$sampler" 2> /dev/null || true; fi
  cap_mib=$(( (half >> 20) + 16384 ))  # without nvidia-smi: 16 GiB beyond the half
  if [[ -n "$idle" && -s "$peak_file" ]]; then
    peak=$(sort -n "$peak_file" | tail -1)
    cap_mib=$(( (half >> 20) + peak - idle - (model_bytes >> 20) ))
  fi
  echo "device memory cap for the paged runs: ${cap_mib} MiB (half the weights: $((half >> 20)) MiB)" > "$out/train_cap.txt"
  cap="${cap_mib}MiB"
  run_train half 6 2048 8 --device cuda --budget "$half" --device-memory-cap "$cap"
  run_train half_cached 6 2048 8 --device cuda --budget "$half" --host-cache "$model_bytes" \
    --device-memory-cap "$cap"
  run_train half_managed 6 2048 8 --device cuda --gpu-memory managed --budget "$half" \
    --device-memory-cap "$cap"
  run_train unified 4 2048 8 --device cuda --gpu-memory unified --budget unlimited \
    --device-memory-cap "$cap"
  run_train resident_small 6 512 1 --device cuda --budget unlimited
  run_train half_small 6 512 1 --device cuda --budget "$half" --host-cache "$model_bytes" \
    --device-memory-cap "$cap"
  "$python" "$here/train_table.py" "$out" > "$out/train_steps.md"
  cat "$out/train_cap.txt" "$out/train_steps.md"
  rm -rf "$scratch"
  log "LoRA step times done"
fi
log "done: results in $out"
