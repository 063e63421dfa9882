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

Non-finite steps are checked here, not left to DeepSpeed, whose own skip has changed between releases (for a
while only fp16 runs set its ``overflow`` flag): the torch optimizer that ZeRO drives is wrapped in a
``FiniteUpdateGuard`` that drops the update when any head's loss in the step, or any gradient the update would
apply, is not finite on any rank. DeepSpeed's own skip (0.19.8 skips a non-finite gradient norm in fp32, bf16
and fp16) is read back too. Tested with DeepSpeed 0.19.8 (``TESTED_DEEPSPEED``); another release is refused.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mtp_megatron.config import Config, ConfigError
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


TESTED_DEEPSPEED = ("0.19.8", "0.20")  # [first tested, first untested): setup.py and constraints.txt pin the same


def check_deepspeed_version(version: str) -> None:
    """Refuse a DeepSpeed release outside the range this engine was tested with (its ZeRO internals that the
    skip, the checkpoints and the sequential head backward rely on change between releases)."""
    from packaging.version import Version

    low, high = TESTED_DEEPSPEED
    if not Version(low) <= Version(version) < Version(high):
        raise ConfigError(f"parallel.sharding: DeepSpeed {version} is installed; this trainer is tested with "
                          f">={low},<{high}. Fix: pip install -c constraints.txt 'deepspeed>={low},<{high}', or "
                          "use parallel.sharding=distributed_optimizer")


class FiniteUpdateGuard:
    """Drops a ZeRO update that would apply a non-finite loss's gradients or any non-finite gradient.

    Wraps ``step`` of the torch optimizer that DeepSpeed's ZeRO optimizer calls on its fp32 partitions (once per
    parameter group, after reducing, unscaling and clipping): every rank reports whether the gradients it is about
    to apply are finite, and the update is skipped everywhere if one is not, or if ``loss_finite`` (set for the
    step by ``forward_backward``) is false. Collective: every rank calls ``step`` the same number of times.
    """

    def __init__(self, optimizer, device: torch.device):
        self.optimizer, self.device = optimizer, device
        self._step = optimizer.step
        optimizer.step = self._guarded_step
        self.begin_step(loss_finite=True)

    def begin_step(self, loss_finite: bool) -> None:
        self.loss_finite, self.calls, self.skipped = loss_finite, 0, 0

    def _guarded_step(self, *args, **kwargs):
        self.calls += 1
        bad = torch.tensor([0.0 if self.loss_finite else 1.0], device=self.device)
        if self.loss_finite:
            for group in self.optimizer.param_groups:
                if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in group["params"]):
                    bad.fill_(1.0)
                    break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.skipped += 1
            return None
        return self._step(*args, **kwargs)

    def skip_reason(self) -> Optional[str]:
        """Why this step's update was dropped here (None: it was applied, or never reached the optimizer)."""
        if not self.skipped:
            return None
        if self.skipped < self.calls:  # DeepSpeed checks all groups' norm first: a partial update means it did not
            raise RuntimeError(f"DeepSpeed applied {self.calls - self.skipped} of {self.calls} parameter groups' "
                               "update and the rest had non-finite gradients; the weights are now inconsistent. "
                               f"Restart from the newest checkpoint. (DeepSpeed {_deepspeed_version()})")
        return "non-finite loss" if not self.loss_finite else "non-finite gradient"


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


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
    """(engine, its optimizer) for ``model``; ``write_engine_config`` writes the DeepSpeed config it used."""
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)
    if env.device.type == "cpu":
        # A just-in-time C++ build of DeepSpeed's shared-memory collectives takes ~40 s at the first init; gloo
        # does the same job on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = deepspeed_config(cfg, env.dims.dp, precision)
    # DeepSpeed joins the process group that already exists (torch.distributed under the hood).
    deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    adamw = _adamw(cfg, _param_groups(cfg, model))
    guard = FiniteUpdateGuard(adamw, env.device)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=adamw, config=config, mpu=MegatronMPU(env), dist_init_required=False)
    engine.mtp_update_guard = guard
    engine.mtp_config = config  # written next to the run by write_engine_config, once the run is accepted
    return engine, optimizer


def write_engine_config(model, run_dir: str) -> None:
    """``<run_dir>/deepspeed_config.json``: the DeepSpeed config a ZeRO run uses (nothing for other engines)."""
    config = getattr(model, "mtp_config", None)
    if config is None:
        return
    path = os.path.join(run_dir, "deepspeed_config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=1)
    os.replace(path + ".tmp", path)


def forward_backward(engine, data_iterator, num_microbatches: int, forward_only: bool,
                     after_backward: Optional[Callable[[], None]] = None) -> list[dict]:
    """The microbatches of one step on this rank; the per-microbatch statistics in the schedules' format.
    ``after_backward`` runs after each microbatch's backward, before any update (memory measurements)."""
    from mtp_megatron.training.step import forward_step

    out = []
    for index in range(num_microbatches):
        (loss, stats), _ = forward_step(data_iterator, engine)
        out.append({"mtp_stats": stats})
        if not forward_only:
            engine.backward(loss)  # scales by 1/gradient_accumulation_steps (and the fp16 loss scale)
            if after_backward is not None:
                after_backward()
            if index == num_microbatches - 1:  # the boundary: the losses of the whole step are known now
                _begin_update(engine, out)
            engine.step()  # an update only at the accumulation boundary, the last microbatch
    return out


def _begin_update(engine, microbatch_stats: list[dict]) -> None:
    """Tell the update guard whether every head's loss was finite on every rank in this step (collective)."""
    guard = getattr(engine, "mtp_update_guard", None)
    if guard is None:
        return
    bad = torch.zeros(1, device=microbatch_stats[0]["mtp_stats"].device)
    if not all(torch.isfinite(m["mtp_stats"]).all() for m in microbatch_stats):
        bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    guard.begin_step(loss_finite=not bad.item())


def update_result(engine) -> tuple[float | None, str | None]:
    """(gradient norm, why the update was skipped or None) of the step ``forward_backward`` just finished."""
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    guard = getattr(engine, "mtp_update_guard", None)
    ours = guard.skip_reason() if guard is not None else None
    if ours is not None:
        return norm, ours
    if getattr(engine.optimizer, "overflow", False):
        if engine.fp16_enabled():
            return None, "fp16 loss-scale overflow"
        return norm, "non-finite gradient norm"
    return norm, None
