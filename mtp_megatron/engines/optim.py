"""What every engine's optimisation shares: megatron-core's parameter groups and LR schedule, and the torch
AdamW that the DeepSpeed and FSDP2 engines drive (megatron's own engine uses megatron-core's optimizer)."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, _get_param_groups
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mtp_megatron.config import Config


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0, then cosine (or linear) decay to lr * min_lr_ratio; constant weight decay.

    Megatron counts scheduler steps in samples; we step once per iteration, so all lengths are iterations.
    """
    o = cfg.optim
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=o.resolved_decay_iters(cfg.train.iters),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.iters,
        wd_incr_style="constant",
    )
    # Megatron's schedule gives lr 0 at step 0; advance once so the first update uses lr/warmup_iters.
    scheduler.step(increment=1)
    return scheduler


def param_groups(cfg: Config, model) -> list[dict]:
    """megatron-core's parameter groups (no weight decay on biases and norms; the schedule's max/min lr per
    group), exactly as megatron's own optimizer gets them."""
    o = cfg.optim
    groups = _get_param_groups([model], OptimizerConfig(lr=o.lr, min_lr=o.lr * o.min_lr_ratio,
                                                        weight_decay=o.weight_decay), None)
    for group in groups:
        group["weight_decay"] = o.weight_decay * group["wd_mult"]
    return [group for group in groups if group["params"]]


def torch_adamw(cfg: Config, groups: list[dict], apex: bool = False):
    """torch's AdamW over ``groups``; with ``apex`` on CUDA, Apex's fused AdamW where installed (GPU clusters
    build Apex from source; it takes plain tensors, not DTensors)."""
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    if apex and torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            pass
    return torch.optim.AdamW(groups, **kwargs)
