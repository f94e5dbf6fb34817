#!/usr/bin/env bash
# Installs the build into a scratch prefix, builds examples/libtorch_consumer against it with
# find_package(lema), and runs it over a generated checkpoint under a budget: what a libtorch
# user does with an installed LEMA.
#   check_install.sh SOURCE_DIR BUILD_DIR SCRATCH_DIR
set -euo pipefail
src=$1 build=$2 scratch=$3
rm -rf "$scratch" && mkdir -p "$scratch"
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
cmake -S "$src/examples/libtorch_consumer" -B "$scratch/consumer" -G Ninja \
  -DCMAKE_PREFIX_PATH="$scratch/prefix" -DCMAKE_BUILD_TYPE=Release >"$scratch/configure.log" 2>&1 \
  || { cat "$scratch/configure.log"; exit 1; }
cmake --build "$scratch/consumer" >"$scratch/build.log" 2>&1 || { cat "$scratch/build.log"; exit 1; }
"$scratch/prefix/bin/lema" gen --preset tiny --out "$scratch/model" >/dev/null
budget=$((4 << 20))
out=$("$scratch/consumer/sum_weights" "$scratch/model" "$budget" | grep '^sum ')
echo "$out"
peak=$(awk '{print $4}' <<<"$out")
if ((peak == 0 || peak > budget)); then
  echo "peak resident bytes $peak outside (0, $budget]" >&2
  exit 1
fi
