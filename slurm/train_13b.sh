#!/bin/bash
# The 13B MTP run: 16 nodes x 8 GPUs, exclusive, requeued after a time limit or preemption until it finishes.
#
#   sbatch slurm/train_13b.sh                                        # configs/13b.yaml as it is
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=proj sbatch slurm/train_13b.sh  # sbatch reads these two itself
#   OVERRIDES="train.iters=1000 data.paths=[/d/code_text_document]" sbatch slurm/train_13b.sh
#   CONFIG=configs/tiny.yaml RANKS_PER_NODE=2 sbatch --nodes=2 --gpus-per-node=0 slurm/train_13b.sh  # CPU test
#
# Site settings are variables (defaults in brackets); sbatch options on the command line override the header:
#   CONFIG          the run's config [configs/13b.yaml]
#   DATA_PATHS      the training blend, Megatron's format, comma separated: "0.7,/d/code_text_document,0.3,/d/web_text_document"
#                   or unweighted prefixes (mixed by token count) [the config's data.paths]
#   TOKENIZER       the sentencepiece .model the data was tokenized with [the config's tokenizer.model]
#   OVERRIDES       space-separated section.key=value overrides, applied last [none]
#   RUN_DIR         run folder: checkpoints, metrics, TensorBoard, logs [runs/13b]
#   RANKS_PER_NODE  training processes per node [the GPUs Slurm gave the node, else 8]
#   SETUP           shell commands run first on every node: module loads, conda/venv activation, env exports []
#   REPO            the repository on a shared file system [the submit directory]
#   MAX_REQUEUES    requeues after a clean stop before giving up [50]
#   RDZV_PORT       rendezvous port [20000 + job id mod 20000] (not MASTER_PORT: a stale one in the submitting
#                   shell's environment would travel with the job); the launcher also uses the port above it
#   RDZV_TIMEOUT    seconds every node waits for the others at start before failing, naming the missing ones [900]
#
# Stops and requeues: 10 minutes before the time limit Slurm signals this script (USR1, --signal=B:...); it
# creates RUN_DIR/STOP, every rank saves a checkpoint at the next step boundary and exits 0, run_state.json says
# "stopped", and the job requeues itself; the requeued job resumes from that checkpoint (checkpoint.resume=auto).
# Preemption (SIGTERM to every process) ends the same way. A run that failed (a crash, a bad config) is not
# requeued: the job fails with the training's exit code.
#
#SBATCH --job-name=mtp-13b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

# Outside a job there is no node list, no srun step and no requeue: say so before touching anything.
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: slurm/train_13b.sh runs as a Slurm batch job: submit it with sbatch slurm/train_13b.sh" \
       "(single machine: python launcher/torchrun.py -- --config CONFIG, or torchrun -m mtp_megatron.train)" >&2
  exit 2
fi

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
export REPO SETUP="${SETUP:-}"
export CONFIG=${CONFIG:-configs/13b.yaml}
data_overrides=""
[ -n "${DATA_PATHS:-}" ] && data_overrides+="data.paths=[${DATA_PATHS}] "
[ -n "${TOKENIZER:-}" ] && data_overrides+="tokenizer.model=${TOKENIZER} "
export OVERRIDES="${data_overrides}${OVERRIDES:-}"
export RUN_DIR=${RUN_DIR:-runs/13b}
export RANKS_PER_NODE=${RANKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTARTS=${SLURM_RESTART_COUNT:-0}

# The rendezvous host: the first node, by the address Slurm knows it at (NodeAddr: a hostname on most clusters).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$(scontrol show node "$first_node" | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2)
export MASTER_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor parallelism) is exported by launcher/torchrun.py, which slurm/entrypoint.sh
# runs on every node (mtp_megatron/distributed/cuda_env.py); one exported in SETUP wins, with a warning at start.

mkdir -p "$RUN_DIR"
echo "[slurm] job $SLURM_JOB_ID (restart $RESTARTS): $SLURM_JOB_NUM_NODES nodes x $RANKS_PER_NODE ranks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, run $RUN_DIR"

# USR1 (time limit ahead): ask the run to save and stop. SIGTERM (preemption, scancel): the ranks get it
# themselves; this shell only waits for them.
trap 'echo "[slurm] USR1: asking the run to checkpoint and stop"; touch "$RUN_DIR/STOP"' USR1
trap 'echo "[slurm] SIGTERM: the ranks save and stop"' TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash slurm/entrypoint.sh &
step=$!
status=0
while true; do  # a trapped signal interrupts wait; wait again until srun itself is done
  wait "$step" && status=0 || status=$?
  kill -0 "$step" 2>/dev/null || break
done

state=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["state"])' "$RUN_DIR/run_state.json" \
        2>/dev/null || echo unknown)
echo "[slurm] training exited with $status, run state: $state"
if [ "$status" -ne 0 ] && [ "$state" = running ]; then
  # A rank died without a word (SIGKILL, the OOM killer, a lost node): say so where launchers and people look.
  python -c 'import json, sys, time
path, status = sys.argv[1], sys.argv[2]
record = json.load(open(path))
record.update(state="failed", time=time.strftime("%Y-%m-%dT%H:%M:%S"),
              reason=f"the job step ended with status {status} while the run was running (a rank was killed?)")
json.dump(record, open(path + ".tmp", "w"), indent=1)' "$RUN_DIR/run_state.json" "$status" \
    && mv "$RUN_DIR/run_state.json.tmp" "$RUN_DIR/run_state.json" && state=failed
  echo "[slurm] run state set to failed: see the training output above"
fi
if [ "$status" -eq 0 ] && [ "$state" = stopped ]; then
  if [ "$RESTARTS" -lt "$MAX_REQUEUES" ]; then
    echo "[slurm] requeueing job $SLURM_JOB_ID to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "[slurm] stopped $RESTARTS times already (MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
  fi
  exit 0
fi
exit "$status"
