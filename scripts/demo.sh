#!/usr/bin/env bash
# The demo: generate a synthetic Llama checkpoint, inspect it, and read it back.
# Usage: scripts/demo.sh BUILD_DIR
set -euo pipefail

BUILD=${1:?usage: scripts/demo.sh BUILD_DIR}
LEMA="$BUILD/tools/lema"
MODEL=./demo/model

heading() { printf '\n==== %s ====\n' "$*"; }

if [[ ! -x "$LEMA" ]]; then
  echo "demo: $LEMA not found; build first (cmake --build $BUILD)" >&2
  exit 1
fi

heading "1. Generate the 'small' preset into $MODEL"
"$LEMA" gen --preset small --out "$MODEL" --force --seed 1
ls -l "$MODEL"

heading "2. Inspect it (headers only; table abbreviated)"
table=$("$LEMA" inspect "$MODEL")
lines=$(wc -l <<<"$table")
if ((lines > 30)); then
  head -n 12 <<<"$table"
  echo "   ... ($((lines - 24)) lines omitted) ..."
  tail -n 12 <<<"$table"
else
  echo "$table"
fi

heading "3. Read every tensor through the pager under a quarter of the model's size"
# 19 MiB of weights, a 6 MiB budget (three 2 MiB pages): the trace policy learns the access
# sequence in the first passes and then fetches what Belady's optimum fetches.
out=$("$LEMA" verify "$MODEL" --budget 6MiB --policy trace --passes 4)
head -n 5 <<<"$out"
echo "   ... (one CRC32 per tensor) ..."
tail -n 4 <<<"$out"

heading "4. The same with userfaultfd demand paging: plain reads, no hooks"
"$LEMA" verify "$MODEL" --budget 6MiB --mode fault | tail -n 3

heading "Done"
echo "checkpoint in $MODEL"
