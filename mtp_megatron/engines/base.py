"""The engine interface: everything above the engines (the loop, the checkpointer, memory accounting, the
benchmarks) talks to an ``Engine`` and never asks which one runs.

An engine owns the wrapped model, its optimizer and LR schedule, and knows how its data parallelism keeps them:

* a step: ``train_step`` (zero the gradients, forward and backward over the step's microbatches, finiteness
  checks, clip, update, schedule step) and ``eval_step``;
* checkpoints: the model's (and where the engine's optimizer is megatron-core's, the optimizer's) part of the
  reshardable distributed checkpoint, ``sharded_state``; the engine's own files beside it (``private_folder``,
  ``save_private`` / ``load_optimizer``); how loaded weights go back into the model (``load_model_state``);
* parameter sync before the weights are read (``sync_parameters``, ``gathered_parameters``: the distributed
  optimizer's overlapped all-gather); engines that shard parameters over DP (ZeRO-3, FSDP2) checkpoint each rank's
  shard and gather nothing for it (engines/flat_shards.py);
* the bytes of parameters, gradients and optimizer state this rank holds (``state_bytes``).

The engines: ``MegatronEngine`` (engines/megatron.py: DDP or megatron-core's distributed optimizer, TP x PP x DP),
``DeepSpeedEngine`` (engines/deepspeed.py: ZeRO-1/2/3, TP x DP) and ``FSDP2Engine`` (engines/fsdp.py: torch's
``fully_shard``, TP x DP); ``engines.build_engine`` picks one from ``parallel.sharding``. ``ModelOnly`` holds a bare
model without an optimizer (the converters' weights-only checkpoints).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Iterator, Optional

import torch

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines.step import (StepResult, loss_weights_at, reduce_head_stats, run_forward_backward,
                                       with_head_weights)


class EngineStateError(RuntimeError):
    """A checkpoint's engine-private state is missing or unreadable (the checkpointer reports it as a bad
    checkpoint)."""


class Engine(ABC):
    """One rank's model, optimizer and LR schedule, and the data-parallel engine that trains them."""

    name: str = ""
    """Recorded in checkpoint manifests and metadata: megatron, deepspeed, fsdp or model_only."""

    private_folder: Optional[str] = None
    """The subfolder of a checkpoint with the engine's own files (its optimizer state), or None."""

    optimizer_reshards: bool = True
    """Whether the optimizer state it saves loads at another TP x PP x DP layout (megatron-core's does)."""

    def __init__(self, cfg: Config, env: ParallelEnv, model, module, optimizer=None, scheduler=None):
        self.cfg, self.env = cfg, env
        self.model = model
        """What the schedules run: the wrapped model (megatron DDP, DeepSpeed's engine, the FSDP2 module)."""
        self.module = module
        """The bare ``MTPGPTModel`` (its ``sharded_state_dict`` is the checkpoint's model part)."""
        self.optimizer, self.scheduler = optimizer, scheduler

    # -- steps --------------------------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, data_iterator, num_microbatches: int,
                   after_backward: Optional[Callable[[bool], None]] = None, step: int = 1) -> StepResult:
        """One optimizer step over ``num_microbatches`` microbatches; the update is skipped (and the schedule
        not advanced) on a non-finite loss or gradient norm. ``after_backward(final)`` runs after the backward,
        before the update, for measurements: once with ``final`` true when the step's gradients are complete
        (``gathered_gradients`` reads them then), and where the engine accumulates microbatch by microbatch
        (DeepSpeed) also after each earlier microbatch's backward, with ``final`` false. ``step``: the step's
        number as logged (1 = the first), which picks the heads' loss weights (``mtp.loss_weight_schedule``)."""
        loss_weights = loss_weights_at(self.cfg.mtp, step)
        data = with_head_weights(data_iterator, num_microbatches, self.cfg.mtp.n_heads, self.module.document_eod,
                                 self.env, loss_weights)
        result = self._forward_backward_update(data, num_microbatches, after_backward)
        result.loss_weights = loss_weights
        result.update_skipped = result.skip_reason is not None
        if not result.update_skipped:
            self.scheduler.step(increment=1)
        return result

    def _forward_backward_update(self, data_iterator, num_microbatches: int,
                                 after_backward: Optional[Callable[[bool], None]]) -> StepResult:
        """The step's forward-backward, then its update (``_update``): a StepResult with ``grad_norm`` and
        ``skip_reason`` set. DeepSpeed's engine updates inside its microbatch loop and overrides this."""
        losses = self.forward_backward(data_iterator, num_microbatches, forward_only=False)
        if after_backward is not None:
            after_backward(True)  # the step's gradients are complete
        # The losses first: every rank must know whether any head's loss was finite before anyone steps.
        result = reduce_head_stats(losses, self.cfg.mtp, self.env)
        result.grad_norm, result.skip_reason = self._update(losses_finite=not result.nonfinite_heads)
        return result

    def _update(self, losses_finite: bool) -> tuple[Optional[float], Optional[str]]:
        """Norm, clip and update unless a loss or the norm is not finite: (grad norm, why skipped or None)."""
        raise TypeError(f"{type(self).__name__} has no optimizer: build the run's engine with "
                        "engines.build_engine to train")

    @abstractmethod
    def forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        """The microbatches of a step on this rank, no update (gradients zeroed first unless ``forward_only``);
        the per-microbatch statistics in megatron-core's schedule format. DeepSpeed's engine runs only
        ``forward_only`` here: its backward belongs to a step (``train_step``)."""

    @torch.no_grad()
    def eval_step(self, data_iterator, num_microbatches: int) -> StepResult:
        """Per-head statistics of forward passes over ``num_microbatches`` microbatches, the model in eval mode.
        Call it inside ``gathered_parameters``."""
        self.model.eval()
        try:
            losses = self.forward_backward(data_iterator, num_microbatches, forward_only=True)
        finally:
            self.model.train()
        return reduce_head_stats(losses, self.cfg.mtp, self.env)

    # -- parameters ---------------------------------------------------------------------------------------------

    def sync_parameters(self) -> None:
        """Bring every rank's weights up to date before anything reads them (a save, an export). Collective."""

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        """Current weights on every rank for forward-only passes (evaluation)."""
        return contextlib.nullcontext()

    def local_parameters(self) -> Iterator[torch.Tensor]:
        """The parameter data this rank holds (its shard where parameters are sharded, without padding): what the
        checkpointer checks for finiteness before a save."""
        return (param.detach() for param in self.module.parameters())

    # -- checkpoints --------------------------------------------------------------------------------------------

    def sharded_state(self, metadata: dict, is_loading: bool, with_optimizer: bool) -> dict:
        """The engine's part of the distributed checkpoint: ``model``, and ``optimizer`` where megatron-core's
        optimizer keeps it; the same global tensors from every engine (ZeRO-3 and FSDP2 give only this rank's
        shard of each). For a load (``is_loading``) it is followed by ``load_model_state`` with what was read."""
        return {"model": self.module.sharded_state_dict(metadata=dict(metadata))}

    def load_model_state(self, state_dict: dict) -> list[str]:
        """Put loaded weights into the model; the keys that did not fit (``_extra_state`` aside)."""
        result = self.module.load_state_dict(state_dict, strict=False)  # a missing _extra_state keeps the module's
        return [f"{key}: not loaded into this model" for key in [*result.missing_keys, *result.unexpected_keys]
                if not key.endswith("_extra_state")]

    def after_weights_loaded(self) -> None:
        """Refresh what is derived from the weights (fp32 master copies) after a weights-only load."""

    def load_optimizer(self, loaded: dict, path: str) -> None:
        """Restore the optimizer state: from ``loaded`` (the dist checkpoint's part) or the engine's own files."""

    def save_private(self, folder: str) -> None:
        """Write the engine's own files into the checkpoint being saved at ``folder`` (collective)."""

    def write_run_files(self, run_dir: str) -> None:
        """Rank 0, once the run is accepted: the engine's own files in the run folder (DeepSpeed's JSON)."""

    @abstractmethod
    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter's gradient as the update will apply it (averaged over DP, not clipped),
        whole on every DP rank (each TP rank's own shard), fp32, by parameter name. Valid between a step's last
        backward and its update (``train_step``'s ``after_backward``); for checks and debugging, not for
        training (it all-gathers what the engine keeps sharded)."""

    # -- memory -------------------------------------------------------------------------------------------------

    @abstractmethod
    def state_bytes(self) -> dict[str, int]:
        """{"params", "grads", "optimizer"}: bytes this rank holds for each now (measure between a step's backward
        and its update: some engines hold gradients only then)."""


class ModelOnly(Engine):
    """A bare model without optimizer or data parallelism: what the converters save and load weights with."""

    name = "model_only"

    def __init__(self, cfg: Config, env: ParallelEnv, module):
        super().__init__(cfg, env, module, module)

    def forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        return run_forward_backward([self.model], data_iterator, num_microbatches, self.cfg, forward_only)

    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        return {name: p.grad.float() for name, p in self.module.named_parameters() if p.grad is not None}

    def state_bytes(self) -> dict[str, int]:
        return {"params": sum(storage_bytes(self.module.parameters()).values()), "grads": 0, "optimizer": 0}


def storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{storage address: bytes} of the non-empty tensors given: views into one flat buffer count once."""
    found = {}
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def adam_state(torch_optimizer) -> list[torch.Tensor]:
    """Every tensor of a torch optimizer's per-parameter state (Adam's moments and steps)."""
    return [value for state in torch_optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
