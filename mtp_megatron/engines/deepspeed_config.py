"""The DeepSpeed config of a ZeRO run, generated from ours (no DeepSpeed import: train.py's resolve_run_inputs also
checks a user's JSON with it before anything starts).

Our config owns what must agree with the rest of the trainer: the batch shape (the data loader's microbatches),
precision, gradient clipping and the ZeRO stage. A user's ``parallel.deepspeed_config`` JSON is merged on top
for everything else (bucket sizes, ``overlap_comm``, offload, ...); setting an owned key there is an error, so
the two can never silently disagree.
"""

from __future__ import annotations

import json
from typing import Any, List

from mtp_megatron.config.schema import Config

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}

# (path in the DeepSpeed config, the field of ours that sets it)
OWNED_KEYS = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.global_batch_size / (micro_batch_size * dp)",
    ("gradient_clipping",): "optim.clip_grad",
    ("bf16",): "train.precision",
    ("fp16",): "train.precision",
    ("optimizer",): "optim.* (the trainer builds AdamW with megatron-core's parameter groups)",
    ("scheduler",): "optim.* (megatron-core's OptimizerParamScheduler)",
    ("zero_optimization", "stage"): "parallel.sharding",
}


def generated_config(cfg: Config, dp: int, precision: str) -> dict:
    """What our config implies for DeepSpeed, before the user's file."""
    micro_batches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling, as megatron's fp16 optimizer does (initial scale 2^32, window 1000).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 32,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {"stage": ZERO_STAGES[cfg.parallel.sharding]},
        # The trainer hands DeepSpeed torch's (or Apex's) AdamW, not one of DeepSpeed's fused ones, whose CPU build
        # is a slow just-in-time compile.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }


def read_user_config(path: str) -> dict:
    """The user's JSON, ValueError naming the problem."""
    try:
        with open(path) as f:
            user = json.load(f)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(user, dict):
        raise ValueError(f"{path} holds a {type(user).__name__}, not a JSON object")
    return user


def owned_keys_in(user: dict) -> List[str]:
    """The keys of ``user`` that our config owns, as 'a.b (set by our.field)'."""
    found = []
    for path, ours in OWNED_KEYS.items():
        node: Any = user
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            found.append(f"{'.'.join(path)} (set by {ours})")
    return found


def merge(base: dict, extra: dict) -> dict:
    """``extra`` on top of ``base``, recursively for nested objects."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, dp: int, precision: str) -> dict:
    config = generated_config(cfg, dp, precision)
    if cfg.parallel.deepspeed_config:
        config = merge(config, read_user_config(cfg.parallel.deepspeed_config))
    return config


def deepspeed_config_problems(cfg: Config) -> List[str]:
    """Load-time check of ``parallel.deepspeed_config`` (the file exists, is a JSON object, owns nothing of ours)."""
    path = cfg.parallel.deepspeed_config
    if not path:
        return []
    try:
        user = read_user_config(path)
    except ValueError as error:
        return [f"parallel.deepspeed_config: {error}. Fix: point it at a DeepSpeed JSON config file"]
    owned = owned_keys_in(user)
    if owned:
        return [f"parallel.deepspeed_config: {path} sets {', '.join(owned)}, which this trainer's config decides. "
                "Fix: remove them from the file and set the fields named instead"]
    return []
