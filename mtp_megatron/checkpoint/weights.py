"""Model weights as a megatron-core distributed checkpoint.

The model's ``sharded_state_dict`` names every tensor by its global identity (layer index across pipeline
stages, slice across tensor-parallel ranks; the MTP heads shard themselves, see model/heads.py), so weights
saved under one TP x PP layout load into any other. Optimizer state, schedule and data position are not here:
this is the weights-only part that a seed checkpoint, ``checkpoint.load`` and the conversion tools share.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model


def save_weights(model, path: str) -> None:
    """Collective: every rank writes its shards of ``model`` into the folder ``path``."""
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    # Keys are the bare model's: DDP and the mixed-precision wrapper are not part of a checkpoint's identity.
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), path)


def load_weights(model, path: str) -> None:
    """Collective: fill ``model`` (any layout) from a checkpoint saved by ``save_weights`` (any layout)."""
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a distributed checkpoint (no metadata.json). Fix: point checkpoint.load at a folder "
            "written by mtp-megatron (e.g. <run.dir>/checkpoints/iter_0000100)."
        )
    model = unwrap_model(model)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
