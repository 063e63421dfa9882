"""DeepSpeed ZeRO stages 1-3 around the MTP model (``parallel.sharding=zero1|zero2|zero3``; TP x DP, pp=1).

The model is the same megatron-core ``MTPGPTModel`` (tensor-parallel layers, vocab-parallel heads), handed to
``deepspeed.initialize`` with torch's AdamW (Apex's FusedAdam when Apex is installed) over megatron-core's own
parameter groups, and megatron-core's LR schedule, so the optimisation is the one the megatron path runs.
DeepSpeed learns the tensor-parallel layout through ``MegatronMPU``: it reduces gradients over the DP group
only and counts each TP-replicated parameter once in the gradient norm (megatron-core marks the split ones
``tensor_model_parallel``, which DeepSpeed reads).

A step is ``gradient_accumulation_steps`` microbatches of ``engine(...)`` and ``engine.backward(loss)``, then
``engine.step()``, which DeepSpeed turns into one update at the accumulation boundary. The MTP heads' sequential
backward runs inside ``engine.backward`` (see model/heads.py); the shared norm and unembedding tell ZeRO to
reduce their gradient once, after the last head (``ds_grad_is_ready``).

Non-finite steps: ZeRO skips any update whose gradient norm is not finite (a non-finite head loss makes the
gradients non-finite too), and the trainer reads that back as a skipped step.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.training.deepspeed_config import deepspeed_config


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface answered from megatron-core's process groups (DeepSpeed's "model parallel"
    is tensor parallel here: ZeRO runs without pipeline stages)."""

    def __init__(self, env: ParallelEnv):
        self.tp, self.dp = env.groups.tp, env.groups.dp

    def get_model_parallel_group(self):
        return self.tp

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.tp)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.tp, 0)

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def is_deepspeed_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "zero_optimization_stage")


def _adamw(cfg: Config, param_groups: list[dict]):
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    if torch.cuda.is_available():
        try:  # optional: Apex's fused AdamW (GPU clusters build Apex from source)
            from apex.optimizers import FusedAdam

            return FusedAdam(param_groups, adam_w_mode=True, **kwargs)
        except ImportError:
            pass
    return torch.optim.AdamW(param_groups, **kwargs)


def _param_groups(cfg: Config, model) -> list[dict]:
    """megatron-core's parameter groups (no weight decay on biases and norms; the schedule's max/min lr per
    group), exactly as the megatron path's optimizer gets them."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    o = cfg.optim
    groups = _get_param_groups([model], OptimizerConfig(lr=o.lr, min_lr=o.lr * o.min_lr_ratio,
                                                        weight_decay=o.weight_decay), None)
    for group in groups:
        group["weight_decay"] = o.weight_decay * group["wd_mult"]
    return [group for group in groups if group["params"]]


def build_engine(cfg: Config, env: ParallelEnv, model, precision: str):
    """(engine, its optimizer) for ``model``; writes the DeepSpeed config used to ``<run.dir>``."""
    import deepspeed

    if env.device.type == "cpu":
        # A just-in-time C++ build of DeepSpeed's shared-memory collectives takes ~40 s at the first init; gloo
        # does the same job on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = deepspeed_config(cfg, env.dims.dp, precision)
    if env.rank == 0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, "deepspeed_config.json"), "w") as f:
            json.dump(config, f, indent=1)
    # DeepSpeed joins the process group that already exists (torch.distributed under the hood).
    deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=_adamw(cfg, _param_groups(cfg, model)), config=config, mpu=MegatronMPU(env),
        dist_init_required=False)
    return engine, optimizer


def forward_backward(engine, data_iterator, num_microbatches: int, forward_only: bool,
                     after_backward: Optional[Callable[[], None]] = None) -> list[dict]:
    """The microbatches of one step on this rank; the per-microbatch statistics in the schedules' format.
    ``after_backward`` runs after each microbatch's backward, before any update (memory measurements)."""
    from mtp_megatron.training.step import forward_step

    out = []
    for _ in range(num_microbatches):
        (loss, stats), _ = forward_step(data_iterator, engine)
        if not forward_only:
            engine.backward(loss)  # scales by 1/gradient_accumulation_steps (and the fp16 loss scale)
            if after_backward is not None:
                after_backward()
            engine.step()  # an update only at the accumulation boundary, the last microbatch
        out.append({"mtp_stats": stats})
    return out


def update_result(engine) -> tuple[float | None, str | None]:
    """(gradient norm, why the update was skipped or None) of the step ``forward_backward`` just finished."""
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    if getattr(engine.optimizer, "overflow", False):
        if engine.fp16_enabled():
            return None, "fp16 loss-scale overflow"
        return norm, "non-finite gradient norm"
    return norm, None
