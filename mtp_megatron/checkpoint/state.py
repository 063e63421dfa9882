"""What a checkpoint holds besides the engine's tensors, and the checks a checkpoint must pass to be loaded.

* sharded: ``rng_state``, one object per (pp, tp, dp) rank, restored only at the same layout;
* common (rank 0 writes it once): ``train_state`` (step, consumed samples), ``scheduler`` and ``mtp_megatron``:
  the resolved config, the layout, the engine and optimizer setup and the tokenizer's identity, checked before
  anything is loaded so that a wrong checkpoint fails with the fields that differ rather than deep inside a
  collective (``shape_mismatches``, ``key_mismatches``).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config import Config, config_to_dict
from mtp_megatron.data.tokenizer import tokenizer_identity as data_tokenizer_identity
from mtp_megatron.distributed.parallel import ParallelEnv

META_KEY = "mtp_megatron"
TRAIN_STATE_KEY = "train_state"
# Megatron-LM's metadata for the sharded state. The distributed optimizer's state is written as
# ``fully_sharded_model_space``: each DP rank writes its own flat range of every parameter's Adam moments and main
# weights (the model-space tensor's ``flattened_range``), with no gather, and a load at any TP x PP x DP reads
# exactly the ranges its own shard covers. (``fully_reshardable``, the earlier choice, all-gathers every DP
# rank's state onto every rank while saving: +2x the state per GPU at 13B; ``dp_reshardable`` saves without a
# gather but reshards over DP only.) No prefix from ChainedOptimizer, so keys do not depend on grouping.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space", "chained_optim_avoid_prefix": True}
# What checkpoints without ``sharding_metadata`` in their metadata (written before it was recorded) used.
LEGACY_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

# Model fields that fix the tensors' shapes: a checkpoint loads only into a model that agrees on all of them.
SHAPE_FIELDS = {
    "model": ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size",
              "normalization", "activation", "position_embedding", "add_bias_linear"],
    "mtp": ["n_heads", "match_params"],
}


# What decides which samples a run reads, in which order: a resumed run that changes one reads other data.
DATA_FIELDS = {
    "data": ["paths", "synthetic", "split", "reset_attention_mask", "reset_position_ids", "eod_mask_loss"],
    "model": ["seq_length"],
    "train": ["seed", "global_batch_size"],
}


def tokenizer_identity(cfg: Config) -> dict:
    """The identity of the run's tokenizer (type, model hash: data/tokenizer.py)."""
    return data_tokenizer_identity(cfg.tokenizer.type, cfg.tokenizer.model)


def layout(env: ParallelEnv, layers_per_stage=None) -> dict:
    """Where each rank's state lives: TP x PP x DP, and an uneven pipeline split (``parallel.layers_per_stage``
    resolved to its list) when there is one, since each stage's RNG streams then serve other layers."""
    found = {"tp": env.dims.tp, "pp": env.dims.pp, "dp": env.dims.dp}
    if isinstance(layers_per_stage, (list, tuple)) and len(set(layers_per_stage)) > 1:
        found["layers_per_stage"] = list(layers_per_stage)
    return found


def optimizer_setup(cfg: Config) -> dict:
    """What the optimizer state's structure depends on (loading it into another setup is not possible)."""
    return {"sharding": cfg.parallel.sharding, "precision": cfg.train.precision}


def rng_state(env: ParallelEnv) -> ShardedObject:
    """This rank's random generators, as one object per (pp, tp, dp) position."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),  # megatron's TP-region streams (dropout)
    }
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    dims = env.dims
    return ShardedObject("rng_state", state, (dims.pp, dims.tp, dims.dp), (env.pp_rank, env.tp_rank, env.dp_rank),
                         replica_id=0)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def key_mismatches(in_checkpoint_only: set, requested_only: set, optimizer_requested: bool,
                   rng_requested: bool) -> list[str]:
    """What a load must not skip: the sharded keys the checkpoint holds and no rank requested (the parts of the
    checkpoint this load does not ask for aside: optimizer state, RNG states), and those requested but absent;
    ``_extra_state`` objects are not counted (see the module docstring)."""
    def not_asked_for(key: str) -> bool:
        return ((key.startswith("optimizer.") and not optimizer_requested)
                or (key == "rng_state" and not rng_requested))

    found = [f"{key}: in the checkpoint, and nothing in this run loads it" for key in sorted(in_checkpoint_only)
             if not is_extra_state(key) and not not_asked_for(key)]
    found += [f"{key}: this model's, and not in the checkpoint" for key in sorted(requested_only)
              if not is_extra_state(key)]
    return found


def read_meta(path: str) -> dict:
    """The ``mtp_megatron`` metadata and train state of a checkpoint (any rank, no collective)."""
    common = dist_checkpointing.load_common_state_dict(path)
    if META_KEY not in common:
        raise CheckpointError(f"{path} is a distributed checkpoint without mtp-megatron metadata. Fix: convert it "
                              "with tools/convert_checkpoint.py, or point checkpoint.load at one this trainer wrote.")
    return {**common[META_KEY], TRAIN_STATE_KEY: common.get(TRAIN_STATE_KEY)}


def shape_mismatches(saved_config: dict, saved_padded_vocab: int, cfg: Config) -> list[str]:
    """The model-shape fields on which a checkpoint's config and ``cfg`` disagree, as 'field: saved X, now Y'."""
    now = config_to_dict(cfg)
    found = [f"{section}.{name}: checkpoint {saved_config[section][name]!r}, this run {now[section][name]!r}"
             for section, names in SHAPE_FIELDS.items() for name in names
             if saved_config[section].get(name) != now[section][name]]
    padded = cfg.model.padded_vocab_size(cfg.parallel.tp)
    if saved_padded_vocab != padded:
        found.append(f"vocabulary rows (model.vocab_size padded to make_vocab_size_divisible_by * tp): checkpoint "
                     f"{saved_padded_vocab}, this run {padded}")
    return found
