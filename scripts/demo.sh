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

heading "3. Read it back"
if "$LEMA" verify --help >/dev/null 2>&1; then
  "$LEMA" verify "$MODEL" --budget 4MiB
else
  echo "skipped: this build has no 'lema verify' yet"
  echo "reading the headers back as JSON instead:"
  "$LEMA" inspect "$MODEL" --json | head -c 600
  echo
  echo "   ..."
fi

heading "Done"
echo "checkpoint in $MODEL"
