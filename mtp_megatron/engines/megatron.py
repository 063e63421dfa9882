"""megatron-core's engine (``parallel.sharding=none|distributed_optimizer``): the model under megatron's mixed
precision wrapper and DDP, megatron-core's AdamW (distributed or not) and its pipeline schedules; TP x PP x DP.

The optimizer state is part of the distributed checkpoint, each DP rank writing its own range of every parameter
with no gather, and loads at any other layout (engines/distributed_optimizer_checkpoint.py); checkpoints written
in megatron-core's ``fully_reshardable`` form (before that) load as before.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines import distributed_optimizer_checkpoint as optimizer_checkpoint
from mtp_megatron.engines.base import Engine, adam_state, storage_bytes
from mtp_megatron.engines.megatron_workarounds import keep_adam_step_on_load, prime_adam_state
from mtp_megatron.engines.optim import build_scheduler
from mtp_megatron.engines.step import run_forward_backward


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg: Config, env: ParallelEnv, module):
        """``module``: this stage's bare model (``MTPGPTModel``; the benchmarks also pass megatron's GPTModel)."""
        model = wrap_model(module, cfg, env)
        optimizer = build_optimizer(cfg, [model], env.groups)
        super().__init__(cfg, env, model, module, optimizer, build_scheduler(cfg, optimizer))
        connect_schedule_hooks(model, optimizer, cfg)
        self._load_targets = None  # between sharded_state(is_loading=True) and load_optimizer

    def _update(self, losses_finite: bool) -> tuple[Optional[float], Optional[str]]:
        return step_if_finite(self.optimizer, losses_finite)

    def forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        return run_forward_backward([self.model], data_iterator, num_microbatches, self.cfg, forward_only)

    def sync_parameters(self) -> None:
        """With ``parallel.overlap_param_gather`` the distributed optimizer updates only this DP rank's shard of
        the weights in ``optimizer.step()`` and leaves the all-gather of the other shards to the next forward's
        pre-hooks, so until then every rank holds a mix of this step's and the previous step's weights.
        Megatron-LM forces the gather before every save (``force_param_sync`` in its training loop); so do we."""
        if getattr(self.model, "use_forward_hook", False):
            self.model.start_param_sync(force_sync=True)

    @contextlib.contextmanager
    def gathered_parameters(self):
        """No overlapped gather during forward-only passes, as Megatron-LM's ``disable_forward_pre_hook`` /
        ``enable_forward_pre_hook`` around its evaluation."""
        if not getattr(self.model, "use_forward_hook", False):
            yield
            return
        self.model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            self.model.enable_forward_pre_hook()

    def sharded_state(self, metadata: dict, is_loading: bool, with_optimizer: bool) -> dict:
        state = super().sharded_state(metadata, is_loading, with_optimizer)
        if with_optimizer:
            # Loading, and saving before the first update (a run started from weights only), both read every
            # parameter's Adam step, which torch's Adam creates only at its first update.
            prime_adam_state(self.optimizer)
            if metadata.get("distrib_optim_sharding_type") == optimizer_checkpoint.FORMAT:
                state["optimizer"] = optimizer_checkpoint.sharded_optimizer_state(
                    self.optimizer, state["model"], is_loading, dict(metadata))
                if is_loading:
                    self._load_targets = optimizer_checkpoint.load_targets(self.optimizer, state["optimizer"])
            else:  # checkpoints written in megatron-core's fully_reshardable form
                state["optimizer"] = self.optimizer.sharded_state_dict(state["model"], is_loading=is_loading,
                                                                       metadata=dict(metadata))
        return state

    def after_weights_loaded(self) -> None:
        if self.optimizer is not None:
            self.optimizer.reload_model_params()  # mixed precision: refresh the fp32 main copy

    def load_optimizer(self, loaded: dict, path: str) -> None:
        targets, self._load_targets = self._load_targets, None
        with keep_adam_step_on_load(self.optimizer):
            if targets is not None:
                optimizer_checkpoint.load_optimizer_state(self.optimizer, loaded["optimizer"], targets)
            else:
                self.optimizer.load_state_dict(loaded["optimizer"])

    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        """DDP's ``main_grad``s. The distributed optimizer reduce-scatters each bucket, so a rank's buffer is valid
        only in its own shard: the shards are all-gathered back into the buffer first (the update reads its own
        shard only, which this leaves as it was)."""
        if self.cfg.parallel.sharding == "distributed_optimizer":
            dp, rank = self.env.dims.dp, self.env.dp_rank
            for buffer in self.model.buffers:
                for bucket in buffer.buckets:
                    own = bucket.grad_data.view(dp, -1)[rank].clone()
                    torch.distributed.all_gather_into_tensor(bucket.grad_data, own, group=self.env.groups.dp)
        return {name: p.main_grad.float().clone() for name, p in self.module.named_parameters()}

    def state_bytes(self) -> dict[str, int]:
        """Measured after the backward: megatron's gradient buffers live throughout. An optimizer's "master" copy
        counts only where it is a separate storage (fp32 training updates the weights in place)."""
        params = storage_bytes(self.model.parameters())
        grads = storage_bytes(buffer.grad_data for buffer in self.model.buffers)  # DDP's flat gradient buffers
        moments, masters = [], []
        for part in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            moments += adam_state(part.optimizer)
            for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups", "shard_fp32_groups"):
                masters += [p for group in getattr(part, name, []) for p in group]
        state = {k: v for k, v in storage_bytes([*moments, *masters]).items() if k not in params}
        return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(state.values())}


def wrap_model(model, cfg: Config, env: ParallelEnv) -> DistributedDataParallel:
    """Mixed-precision wrapper (bf16/fp16 weights, fp32 main params in the optimizer) and megatron DDP."""
    config = model.config
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.sharding == "distributed_optimizer",
        # Heads see every sample of the microbatch, so the gradient is a per-DP-rank mean; average in DDP.
        average_in_collective=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, pg_collection=env.groups)


def build_optimizer(cfg: Config, model_chunks: list, pg_collection) -> MegatronOptimizer:
    """megatron-core's AdamW: distributed (sharded over DP) with ``sharding=distributed_optimizer``."""
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


@torch.no_grad()
def step_if_finite(optimizer, losses_finite: bool) -> tuple[float | None, str | None]:
    """megatron-core's optimizer step (``ChainedOptimizer.step``: prepare grads, norm, clip, update), except that a
    non-finite loss or gradient norm skips the update. Megatron only skips on fp16 overflow; in fp32 and bf16 a
    NaN norm makes the clip factor NaN, which fails ``< 1`` and so lets NaN gradients into the update.

    Returns (grad norm or None, why the update was skipped or None).
    """
    if optimizer.prepare_grads():  # fp16: the loss scaler found inf/NaN and has already backed off
        return None, "fp16 loss-scale overflow"
    grad_norm = optimizer.get_grad_norm()
    if not losses_finite:
        return grad_norm, "non-finite loss"
    if not math.isfinite(grad_norm):
        return grad_norm, "non-finite gradient norm"
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(part, "is_stub_optimizer", False) else part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    if not optimizer.step_with_ready_grads():
        return grad_norm, "optimizer reported an unsuccessful update"
    return grad_norm, None
