#!/usr/bin/env bash
# The demo: generate a small Llama checkpoint, fine-tune a LoRA adapter on a tiny corpus with a
# memory budget under a third of the weights, and generate text with the adapter.
# Usage: scripts/demo.sh BUILD_DIR
set -euo pipefail

BUILD=${1:?usage: scripts/demo.sh BUILD_DIR}
LEMA="$BUILD/tools/lema"
WORK=./demo
MODEL=$WORK/model
BUDGET=6MiB

heading() { printf '\n==== %s ====\n' "$*"; }

if [[ ! -x "$LEMA" ]]; then
  echo "demo: $LEMA not found; build first (cmake --build $BUILD)" >&2
  exit 1
fi

heading "1. Generate the 'small' preset (a 19 MiB Llama with 4 layers) into $MODEL"
"$LEMA" gen --preset small --out "$MODEL" --force --seed 1
ls -l "$MODEL"

heading "2. Read every tensor through the pager with a $BUDGET budget"
"$LEMA" verify "$MODEL" --budget "$BUDGET" --policy trace --passes 2 | tail -n 3

if [[ ! -x "$BUILD/tools/lema-trainer" ]]; then
  echo "demo: this build has no libtorch, so training is skipped (configure with -DLEMA_PYTHON=...)"
  exit 0
fi

heading "3. A tiny corpus"
mkdir -p "$WORK"
for animal in cat dog fox owl; do
  for colour in red green blue; do
    echo "the $colour $animal sat on the mat and looked at the moon."
    echo "a $animal is not a $colour bird, said the old $animal to the young one."
  done
done >"$WORK/corpus.txt"
head -n 4 "$WORK/corpus.txt"
echo "... ($(wc -l <"$WORK/corpus.txt") lines, byte-level tokens: this model has no tokenizer.model)"

heading "4. Fine-tune a LoRA adapter: 150 steps, $BUDGET budget for 19 MiB of weights"
rm -rf "$WORK/adapter"
"$LEMA" train --model "$MODEL" --data "$WORK/corpus.txt" --out "$WORK/adapter" --budget "$BUDGET" \
  --steps 150 --seq-len 64 --batch 4 --lr 3e-3 --warmup-steps 4 --lora-rank 16 --lora-alpha 32 \
  --seed 1 --save-every 50 \
  --log-json "$WORK/train.jsonl"

heading "5. Generate with the adapter (greedy)"
"$LEMA" generate --model "$MODEL" --adapter "$WORK/adapter" --prompt "the red" \
  --max-new-tokens 48 --greedy --ignore-eos --budget "$BUDGET"

heading "Done"
echo "model in $MODEL, adapter (PEFT layout) in $WORK/adapter, per-step log in $WORK/train.jsonl"
