"""Model weights as a megatron-core distributed checkpoint.

The model's ``sharded_state_dict`` names every tensor by its global identity (layer index across pipeline
stages, slice across tensor-parallel ranks; the MTP heads shard themselves, see model/heads.py), so weights
saved under one TP x PP layout load into any other. Optimizer state and schedule are not here yet (the data position is, as ``train_state``):
this is the weights-only part that a seed checkpoint, ``checkpoint.load`` and the conversion tools share.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

TRAIN_STATE_KEY = "train_state"


def save_weights(model, path: str, train_state: Optional[dict] = None) -> None:
    """Collective: every rank writes its shards of ``model`` into the folder ``path``, with ``train_state`` (step,
    consumed samples) in the checkpoint's common part."""
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    # Keys are the bare model's: DDP and the mixed-precision wrapper are not part of a checkpoint's identity.
    state_dict = unwrap_model(model).sharded_state_dict()
    if train_state is not None:
        state_dict[TRAIN_STATE_KEY] = train_state
    dist_checkpointing.save(state_dict, path)


def read_train_state(path: str) -> Optional[dict]:
    """The ``train_state`` saved with a checkpoint, or None (read on any rank, no collective)."""
    return dist_checkpointing.load_common_state_dict(path).get(TRAIN_STATE_KEY)


def load_weights(model, path: str) -> None:
    """Collective: fill ``model`` (any layout) from a checkpoint saved by ``save_weights`` (any layout)."""
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a distributed checkpoint (no metadata.json). Fix: point checkpoint.load at a folder "
            "written by mtp-megatron (e.g. <run.dir>/checkpoints/iter_0000100)."
        )
    model = unwrap_model(model)
    state_dict = dist_checkpointing.load(model.sharded_state_dict(), path)
    state_dict.pop(TRAIN_STATE_KEY, None)  # the common part comes back too
    model.load_state_dict(state_dict)
