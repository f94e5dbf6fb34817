#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors header parser with clang (ASan + UBSan) and
# runs it for a bounded time. Exits non-zero when the fuzzer finds a crash; the input that
# caused it is left in $BUILD/fuzz-artifacts/.
#   LEMA_FUZZ_SECONDS  run time (default 60)
#   LEMA_FUZZ_BUILD    build directory (default <repo>/build-fuzz)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${LEMA_FUZZ_BUILD:-$root/build-fuzz}"
seconds="${LEMA_FUZZ_SECONDS:-60}"

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DLEMA_BUILD_FUZZERS=ON -DLEMA_BUILD_TESTS=OFF -DLEMA_BUILD_BENCHMARKS=OFF \
  -DLEMA_WITH_TORCH=OFF >/dev/null
ninja -C "$build" header_fuzzer

corpus="$build/fuzz-corpus/header"
artifacts="$build/fuzz-artifacts"
mkdir -p "$corpus" "$artifacts"

# A seed is 8 bytes of data-section size (little-endian) followed by the header.
seed() {
  local name="$1" data_bytes="$2" header="$3" le="" i
  for ((i = 0; i < 8; i++)); do
    le+="$(printf '\\x%02x' $(((data_bytes >> (8 * i)) & 0xff)))"
  done
  printf "$le" >"$corpus/seed-$name"
  printf '%s' "$header" >>"$corpus/seed-$name"
}
seed empty 0 '{}      '
seed one 16 '{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
seed two 10 '{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}'
seed scalar 4 '  {"s":{"dtype":"I32","shape":[],"data_offsets":[0,4]}}   '
seed subbyte 4 '{"f4":{"dtype":"F4","shape":[2],"data_offsets":[0,1]},"f6":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[1,4]},"z":{"dtype":"F8_E8M0","shape":[0,5],"data_offsets":[4,4]}}'

echo "fuzzing header_fuzzer for ${seconds}s (corpus $corpus, log $build/fuzz.log)"
if ! "$build/fuzz/header_fuzzer" "$corpus" \
  -dict="$root/fuzz/header.dict" \
  -max_total_time="$seconds" -timeout=10 -max_len=4096 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 >"$build/fuzz.log" 2>&1; then
  tail -n 60 "$build/fuzz.log"
  echo "fuzz: header_fuzzer found a failure; the input is in $artifacts/" >&2
  exit 1
fi
runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$build/fuzz.log" | grep -o '[0-9]*$' || true)
echo "fuzz: header_fuzzer ran ${runs:-?} inputs in ${seconds}s without a failure"
