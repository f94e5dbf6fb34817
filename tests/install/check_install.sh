#!/usr/bin/env bash
# Installs the build into a scratch prefix, builds examples/libtorch_consumer against it with
# find_package(lema), and runs it over a generated checkpoint under a budget: what a libtorch
# user does with an installed LEMA. Then runs the installed `lema train|merge|generate` in a
# clean environment (no LD_LIBRARY_PATH: their RUNPATH must find libtorch) and checks that
# RUNPATH names nothing but $ORIGIN-relative and existing directories (Note [Installed RPATH]).
#   check_install.sh SOURCE_DIR BUILD_DIR SCRATCH_DIR
set -euo pipefail
src=$1 build=$2 scratch=$3
rm -rf "$scratch" && mkdir -p "$scratch"
prefix=$scratch/prefix
cmake --install "$build" --prefix "$prefix" >/dev/null
cmake -S "$src/examples/libtorch_consumer" -B "$scratch/consumer" -G Ninja \
  -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >"$scratch/configure.log" 2>&1 \
  || { cat "$scratch/configure.log"; exit 1; }
cmake --build "$scratch/consumer" >"$scratch/build.log" 2>&1 || { cat "$scratch/build.log"; exit 1; }
"$prefix/bin/lema" gen --preset tiny --out "$scratch/model" >/dev/null
budget=$((4 << 20))
out=$("$scratch/consumer/sum_weights" "$scratch/model" "$budget" | grep '^sum ')
echo "$out"
peak=$(awk '{print $4}' <<<"$out")
if ((peak == 0 || peak > budget)); then
  echo "peak resident bytes $peak outside (0, $budget]" >&2
  exit 1
fi

# Every installed file that links libtorch: a RUNPATH without junk.
for file in "$prefix/bin/lema-trainer" "$prefix"/lib*/liblema_torch_ops.so; do
  [[ -e $file ]] || { echo "$file was not installed" >&2; exit 1; }
  runpath=$(readelf -d "$file" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]$/\1/p')
  if [[ -z $runpath || $runpath == :* || $runpath == *: || $runpath == *::* ]]; then
    echo "$file: RUNPATH '$runpath' is missing or has an empty entry (the working directory)" >&2
    exit 1
  fi
  IFS=: read -ra entries <<<"$runpath"
  for entry in "${entries[@]}"; do
    if [[ $entry != '$ORIGIN'* && ! -d $entry ]]; then
      echo "$file: RUNPATH entry '$entry' (of '$runpath') is no directory" >&2
      exit 1
    fi
  done
  echo "RUNPATH $(basename "$file"): $runpath"
done

# The installed commands that need libtorch, with nothing from this shell's environment.
clean() { env -i PATH=/usr/bin:/bin "$@"; }
clean "$prefix/bin/lema" train --help >/dev/null
clean "$prefix/bin/lema" train --model "$scratch/model" --out "$scratch/adapter" --steps 1 \
  --seq-len 16 --batch 1 --budget unlimited --threads 1 >"$scratch/train.log" 2>&1 \
  || { cat "$scratch/train.log"; exit 1; }
[[ -f $scratch/adapter/adapter_model.safetensors ]] \
  || { echo "lema train wrote no adapter" >&2; cat "$scratch/train.log"; exit 1; }
clean "$prefix/bin/lema" merge --model "$scratch/model" --adapter "$scratch/adapter" \
  --out "$scratch/merged" >"$scratch/merge.log" 2>&1 || { cat "$scratch/merge.log"; exit 1; }
clean "$prefix/bin/lema" generate --model "$scratch/model" --adapter "$scratch/adapter" \
  --prompt-ids 1,40,41 --max-new-tokens 2 --greedy --json >"$scratch/generate.log" 2>&1 \
  || { cat "$scratch/generate.log"; exit 1; }
echo "installed lema train, merge and generate ran in a clean environment"

# The LD_PRELOAD hook: installed beside the libraries, needing nothing but libc, and harmless in
# a program that never calls CUDA.
hook=("$prefix"/lib*/liblema_preload.so)
[[ -e ${hook[0]} ]] || { echo "liblema_preload.so was not installed" >&2; exit 1; }
for lib in $(readelf -d "${hook[0]}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
  [[ $lib == libc.so.6 || $lib == libdl.so.2 ]] \
    || { echo "liblema_preload.so needs $lib: it must need only libc (and libdl)" >&2; exit 1; }
done
[[ -z $(clean env LD_PRELOAD="${hook[0]}" /bin/echo 2>&1 >/dev/null) ]] \
  || { echo "liblema_preload.so wrote to stderr in a program without CUDA" >&2; exit 1; }
echo "installed liblema_preload.so needs only libc"

