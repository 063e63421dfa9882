#!/bin/bash
# Tokenize a corpus into Megatron .bin/.idx on one CPU node (tools/preprocess_data.py, one worker per CPU).
#
#   INPUT="/data/raw/*.jsonl.gz" OUTPUT_PREFIX=/data/tok/code TOKENIZER_MODEL=/data/tok/spm.model \
#     sbatch slurm/preprocess.sh
#
# Variables (defaults in brackets): INPUT (files, folders or globs; required), OUTPUT_PREFIX (required),
# TOKENIZER_MODEL (a sentencepiece .model; required unless TOKENIZER_TYPE=ByteTokenizer),
# TOKENIZER_TYPE [SentencePieceTokenizer], WORKERS [the CPUs Slurm gave the task], EXTRA (more flags, e.g.
# "--on-error skip --json-keys text") [], SETUP (module loads, env activation) [], REPO [the submit directory].
# The output appears only when complete (written under temporary names, renamed at the end).
#
#SBATCH --job-name=mtp-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
if [ -n "${SETUP:-}" ]; then
  eval "$SETUP"
fi
: "${INPUT:?set INPUT to the files, folders or globs to tokenize}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX, e.g. /data/tok/code (writes PREFIX_text_document.bin/.idx)}"
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
tokenizer=()
if [ "$TOKENIZER_TYPE" != ByteTokenizer ]; then
  : "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the sentencepiece .model (tools/train_tokenizer.py makes one)}"
  tokenizer=(--tokenizer-model "$TOKENIZER_MODEL")
fi
# shellcheck disable=SC2086  # INPUT may hold several paths or globs, EXTRA several flags
exec python tools/preprocess_data.py --input $INPUT --output-prefix "$OUTPUT_PREFIX" \
  --tokenizer-type "$TOKENIZER_TYPE" "${tokenizer[@]}" --append-eod --workers "$WORKERS" ${EXTRA:-}
