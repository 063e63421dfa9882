"""AdamW and the LR schedule from megatron-core: the optimizer (distributed or not) and OptimizerParamScheduler."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mtp_megatron.config import Config


def build_optimizer(cfg: Config, model_chunks: list, pg_collection) -> MegatronOptimizer:
    o, model_config = cfg.optim, model_chunks[0].config
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        decoupled_weight_decay=True,  # AdamW, as in the paper
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        # fp16 gets megatron's dynamic loss scaler (initial_loss_scale etc. keep megatron's defaults).
        use_distributed_optimizer=cfg.parallel.sharding == "distributed_optimizer",
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    # Extra gloo groups only serve megatron's legacy (non-distributed) checkpoint format, which we do not use.
    return get_megatron_optimizer(
        optimizer_config, model_chunks, use_gloo_process_groups=False, pg_collection=pg_collection
    )


def build_scheduler(cfg: Config, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
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
