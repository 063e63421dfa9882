#!/usr/bin/env bash
# Quickstart on real code, CPU only, a few minutes: the running Python's standard library as the corpus ->
# a sentencepiece tokenizer -> Megatron .bin/.idx (several workers) -> configs/tiny.yaml with n=4 heads on
# TP=2 x PP=2 (4 gloo processes) -> per-head validation loss. Everything lands in one run folder:
#
#   $RUN_DIR/tokenizer/spm.model       the tokenizer           $RUN_DIR/config.yaml     the resolved config
#   $RUN_DIR/data/stdlib_text_document the dataset (.bin/.idx) $RUN_DIR/metrics.jsonl   every logged value
#   $RUN_DIR/data_cache/               megatron's indices      $RUN_DIR/tensorboard/    TensorBoard events
#
# Steps whose output exists are skipped, so a rerun only trains. Variables (defaults): RUN_DIR
# (runs/quickstart), ITERS (200), WORKERS (2, preprocessing processes), NPROC (4), VOCAB (1024).
# Extra arguments are passed to the trainer as overrides, e.g.: bash tools/quickstart.sh train.iters=20
set -euo pipefail

RUN_DIR=${RUN_DIR:-runs/quickstart}
ITERS=${ITERS:-200}
WORKERS=${WORKERS:-2}
NPROC=${NPROC:-4}
VOCAB=${VOCAB:-1024}
cd "$(dirname "$0")/.."

# The corpus: every .py file of the standard library, without the installed third-party packages.
STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
CORPUS=("$STDLIB"/*.py)
for dir in "$STDLIB"/*/; do
  [[ "$dir" == */site-packages/ ]] || CORPUS+=("$dir")
done

TOKENIZER="$RUN_DIR/tokenizer/spm"
DATA="$RUN_DIR/data/stdlib"
mkdir -p "$RUN_DIR/tokenizer" "$RUN_DIR/data"

if [[ ! -f "$TOKENIZER.model" ]]; then
  echo "== 1/3 train a $VOCAB-token sentencepiece BPE tokenizer on a sample of $STDLIB"
  python tools/train_tokenizer.py --input "${CORPUS[@]}" --suffixes .py --on-error skip \
    --vocab-size "$VOCAB" --sample-bytes 10000000 --model-prefix "$TOKENIZER"
fi

if [[ ! -f "${DATA}_text_document.idx" ]]; then
  echo "== 2/3 tokenize the corpus into ${DATA}_text_document.bin/.idx with $WORKERS workers"
  # The test suite holds a few deliberately broken files (bad encodings): skip them and list them.
  python tools/preprocess_data.py --input "${CORPUS[@]}" --suffixes .py --on-error skip \
    --tokenizer-model "$TOKENIZER.model" --append-eod --workers "$WORKERS" --output-prefix "$DATA"
fi

echo "== 3/3 train configs/tiny.yaml (n=4 heads) on TP=2 x PP=2, $NPROC CPU processes, $ITERS steps"
torchrun --nproc_per_node="$NPROC" -m mtp_megatron.train --config configs/tiny.yaml \
  parallel.tp=2 parallel.pp=2 run.dir="$RUN_DIR" run.name=quickstart \
  tokenizer.model="$TOKENIZER.model" data.synthetic=false data.paths="[${DATA}_text_document]" \
  train.iters="$ITERS" train.eval_interval=50 train.eval_iters=4 logging.log_interval=10 "$@"
