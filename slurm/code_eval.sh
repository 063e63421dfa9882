#!/bin/bash
# Code evaluation of a run's checkpoints in a job of its own: HumanEval (and MBPP with MBPP_FILE) pass@k of every
# checkpoint of RUN_DIR that has none yet, logged at its step to RUN_DIR/metrics.jsonl and RUN_DIR/tensorboard,
# next to the training losses (python -m mtp_megatron.evaluate_code --run-dir). With WATCH=1 it keeps watching
# for new checkpoints until the run's run_state.json says finished or failed: submit it next to the training job,
#
#   sbatch slurm/train_13b.sh
#   RUN_DIR=runs/13b WATCH=1 sbatch slurm/code_eval.sh
#   RUN_DIR=runs/13b MBPP_FILE=/d/mbpp.jsonl EVAL_ARGS="--samples-per-task 20 --temperature 0.8" \
#     sbatch slurm/code_eval.sh
#   RUN_DIR=runs/quickstart EVAL_ARGS="--max-new-tokens 64 --device cpu" sbatch --gpus-per-node=0 slurm/code_eval.sh
#
# so the 128 training GPUs never wait for decoding. A checkpoint is evaluated once: its samples file,
# RUN_DIR/code_eval/<iter_N>_<task>.jsonl, is the record that it was (delete it to evaluate again). Only complete
# checkpoints are seen (iter_N folders; a save in progress is iter_N.tmp). Variables (defaults in brackets):
#   RUN_DIR     the training run's folder [runs/13b]
#   MBPP_FILE   the official mbpp.jsonl; MBPP is evaluated too when it is set []
#   EVAL_ARGS   more evaluate_code arguments (sampling, --max-new-tokens, --speculative, --device) []
#   WATCH       1: poll for new checkpoints every POLL seconds until the run ends [0]
#   POLL        seconds between polls [600]
#   SETUP       shell commands run first (module loads, venv activation) []
#   REPO        the repository on a shared file system [the submit directory]
#
#SBATCH --job-name=mtp-code-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

RUN_DIR=${RUN_DIR:-runs/13b}
WATCH=${WATCH:-0}
POLL=${POLL:-600}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
eval "${SETUP:-}"
if [[ ! -d "$RUN_DIR/checkpoints" ]]; then
  echo "error: RUN_DIR=$RUN_DIR has no checkpoints folder: set RUN_DIR to the training run's folder" >&2
  exit 2
fi
mkdir -p "$RUN_DIR/code_eval"
TASKS=(humaneval)
[[ -n "${MBPP_FILE:-}" ]] && TASKS+=(mbpp)

FAILED=0
evaluate_new() {  # every checkpoint not evaluated yet; a failed evaluation is reported and the next one runs
  local checkpoint name task output status
  for checkpoint in "$RUN_DIR"/checkpoints/iter_[0-9]*; do
    [[ -d "$checkpoint" && "$checkpoint" != *.tmp ]] || continue
    name=$(basename "$checkpoint")
    for task in "${TASKS[@]}"; do
      output="$RUN_DIR/code_eval/${name}_${task}.jsonl"
      [[ -e "$output" ]] && continue
      echo "== $name: $task"
      status=0
      # shellcheck disable=SC2086  # EVAL_ARGS is a list of arguments
      python -m mtp_megatron.evaluate_code --checkpoint "$checkpoint" --task "$task" --output "$output" \
        --run-dir "$RUN_DIR" ${MBPP_FILE:+--mbpp-file "$MBPP_FILE"} ${EVAL_ARGS:-} || status=$?
      if [[ $status -eq 2 ]]; then
        exit 2  # bad arguments: every checkpoint would fail the same way
      elif [[ $status -ne 0 ]]; then
        echo "error: evaluating $checkpoint on $task failed (exit $status); it is retried on the next poll" >&2
        FAILED=1
      fi
    done
  done
}

run_over() {
  python - "$RUN_DIR/run_state.json" <<'PY'
import json, sys
try:
    state = json.load(open(sys.argv[1]))["state"]
except (OSError, ValueError, KeyError):
    sys.exit(1)  # not started yet, or being rewritten: not over
sys.exit(0 if state in ("finished", "failed") else 1)
PY
}

evaluate_new
while [[ "$WATCH" == 1 ]] && ! run_over; do
  sleep "$POLL"
  evaluate_new
done
if [[ "$WATCH" == 1 ]]; then
  evaluate_new  # the checkpoint the run saved as it ended
fi
exit $FAILED
