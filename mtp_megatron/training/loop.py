"""The training loop: steps, periodic validation, metrics."""

from __future__ import annotations

import os
import time

import torch

from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_model_config

from mtp_megatron.checkpoint.weights import save_weights
from mtp_megatron.config import Config
from mtp_megatron.data.loader import microbatches
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.training.metrics import MetricsLogger
from mtp_megatron.training.state import TrainState
from mtp_megatron.training.step import StepResult, eval_step, train_step


def connect_schedule_hooks(model, optimizer, cfg: Config) -> None:
    """Hand the pipeline schedules the DDP and optimizer callbacks they drive (as Megatron-LM's training does)."""
    config = get_model_config(model)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        config.grad_sync_func = model.start_grad_sync
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = model.start_param_sync


def fit(cfg: Config, env: ParallelEnv, model, optimizer, scheduler, train_data, valid_data,
        logger: MetricsLogger, state: TrainState | None = None) -> list[StepResult]:
    """Train from ``state`` (a fresh run by default) to ``cfg.train.iters``, updating ``state`` in place; returns
    every step's result (for tests and callers)."""
    state = state if state is not None else TrainState()
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    data = microbatches(train_data, state.consumed_samples, cfg, env)
    history = []
    while state.step < cfg.train.iters:
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        start = time.perf_counter()
        result = train_step([model], optimizer, scheduler, data, num_microbatches, cfg, env)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        state.advance(cfg.train.global_batch_size)
        step, last = state.step, state.step == cfg.train.iters
        history.append(result)
        if step % cfg.logging.log_interval == 0 or last:
            logger.log(step, {**result.as_dict(), "lr": lr,
                              "grad_norm": result.grad_norm, "update_skipped": result.update_skipped,
                              "consumed_samples": state.consumed_samples,
                              "step_time_s": elapsed, **logger.throughput(tokens_per_step, elapsed)},
                       total_steps=cfg.train.iters)
        # Every rank joins the evaluation, also those that read no data (valid_data None on them).
        if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or last):
            logger.log(step, evaluate(cfg, env, model, valid_data).as_dict(prefix="val/"))
        if cfg.checkpoint.interval and (step % cfg.checkpoint.interval == 0 or last):
            save_weights(model, os.path.join(cfg.run.dir, "checkpoints", f"iter_{step:07d}"),
                         train_state=state.state_dict())
    return history


def evaluate(cfg: Config, env: ParallelEnv, model, valid_data) -> StepResult:
    """Per-head loss and accuracy over the first ``eval_iters`` global batches of the validation split.

    Collective over the whole job: ranks that read no data pass ``valid_data=None``.
    """
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    data = microbatches(valid_data, 0, cfg, env)
    results = [eval_step([model], data, num_microbatches, cfg, env) for _ in range(cfg.train.eval_iters)]
    return StepResult.merge(results)
