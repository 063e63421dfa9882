"""This rank's model, optimizer and LR schedule, wired to megatron-core's pipeline schedules."""

from __future__ import annotations

from mtp_megatron.config import Config
from mtp_megatron.config.validate import DEEPSPEED_SHARDING
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.model.builder import build_model, resolve_precision, wrap_model
from mtp_megatron.training.loop import connect_schedule_hooks
from mtp_megatron.training.optimizer import build_optimizer, build_scheduler


def setup_model_and_optimizer(cfg: Config, env: ParallelEnv):
    """(model, optimizer, scheduler): the stage's model wrapped for mixed precision and DDP, freshly initialised
    (a checkpoint is loaded into all three by checkpoint.Checkpointer), and its AdamW and LR schedule.

    With DeepSpeed sharding the model is a DeepSpeed engine and the optimizer its ZeRO optimizer
    (training/deepspeed_engine.py); megatron-core's schedules are not used then (pp=1).
    """
    if cfg.parallel.sharding in DEEPSPEED_SHARDING:
        from mtp_megatron.training.deepspeed_engine import build_engine

        engine, optimizer = build_engine(cfg, env, build_model(cfg, env), resolve_precision(cfg, env.device))
        return engine, optimizer, build_scheduler(cfg, optimizer)
    model = wrap_model(build_model(cfg, env), cfg, env)
    optimizer = build_optimizer(cfg, [model], env.groups)
    scheduler = build_scheduler(cfg, optimizer)
    connect_schedule_hooks(model, optimizer, cfg)
    return model, optimizer, scheduler
