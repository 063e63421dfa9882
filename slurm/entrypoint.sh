#!/bin/bash
# Started by srun once per node (slurm/train_13b.sh): runs the site's SETUP, then execs the multi-node torchrun
# launcher, which takes this node's rank and the node count from Slurm's environment (SLURM_NODEID,
# SLURM_NNODES) and the rendezvous from MASTER_ADDR/MASTER_PORT set by the batch script.
set -euo pipefail
cd "$REPO"
if [ -n "${SETUP:-}" ]; then
  eval "$SETUP"
fi
# shellcheck disable=SC2086  # OVERRIDES is a space-separated list of key=value words
exec python launcher/torchrun.py --nproc-per-node "$RANKS_PER_NODE" --rdzv-id "$SLURM_JOB_ID" \
  -- --config "$CONFIG" "run.dir=$RUN_DIR" $OVERRIDES
