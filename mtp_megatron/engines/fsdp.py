"""torch FSDP2's engine (``parallel.sharding=fsdp``): ``fully_shard`` over the data-parallel mesh around the
megatron-core model, composed with megatron-core's tensor parallelism; TP x DP, no pipeline stages.

Sharding: each trunk layer is one FSDP unit (its parameters all-gathered just before its forward and backward,
freed after them with ``parallel.fsdp_reshard_after_forward``); the root unit holds the rest: the embedding and
the last stage's MTP heads with their shared final norm and unembedding, as megatron-core's own
``TorchFullyShardedDataParallel`` groups a GPT. The root's gradients are reduce-scattered once, when the whole
backward is done (FSDP2's root post-backward), so the shared norm and unembedding, which receive one gradient
per head in the sequential backward (model/heads/sequential.py), are reduced once per microbatch after the last head.
Under tensor parallelism every parameter is this TP rank's megatron-core shard, itself sharded over DP (dim 0).

Precision: the sharded parameters and AdamW's state are fp32; bf16 runs compute in bf16 through FSDP2's
``MixedPrecisionPolicy`` and reduce gradients in fp32. fp16 (loss scaling) is not offered.

Step: megatron-core's schedule without pipelining runs the microbatches (the loss scaled by 1/num_microbatches
as for every engine; FSDP2 averages over DP), then the gradient norm (megatron-core's ``get_grad_norm_fp32``,
which sums DTensor shards over DP and then over TP, counting TP-replicated parameters once), the clip and torch's
AdamW over megatron-core's parameter groups; a non-finite loss or norm skips the update.

Checkpoints: the model goes into the reshardable distributed checkpoint as every engine writes it, so it loads
into every engine at any layout and they into it. Each rank writes and reads only its own DP shard of every
weight, a block of whole rows of the TP shard and so a contiguous range of it flattened (engines/flat_shards.py):
nothing is gathered. megatron-core's own DTensor support is not used for this: its swiglu ``linear_fc1`` factory
splits the local tensor into gate and up halves, which under FSDP2 is a DP shard, not the TP shard, and the
weights come back permuted (measured: 8 of 51 tensors wrong, no error); flat_shards.py splits each rank's range at
the halves' boundary instead.
The optimizer state is written by torch distributed checkpoint (``get_optimizer_state_dict``) into ``fsdp/``,
one folder per TP rank, and loads at the layout it was saved with.

Transformer Engine's layers are not used under FSDP2 (``model.transformer_impl=auto`` gives megatron-core's
local layers; ``transformer_engine`` is refused when the config is loaded).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines.base import Engine, EngineStateError, adam_state, storage_bytes
from mtp_megatron.engines.flat_shards import FlatShard, ShardedModelState
from mtp_megatron.engines.optim import build_scheduler, param_groups, torch_adamw
from mtp_megatron.engines.step import run_forward_backward


class FSDP2Engine(Engine):
    name = "fsdp"
    private_folder = "fsdp"
    optimizer_reshards = False

    def __init__(self, cfg: Config, env: ParallelEnv, module, precision: str):
        module.float()  # fp32 sharded parameters; compute dtype from the mixed precision policy
        attributes = {name: dict(vars(param)) for name, param in module.named_parameters()}
        mesh = DeviceMesh.from_group(env.groups.dp, env.device.type)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward)
        for layer in module.decoder.layers:
            fully_shard(layer, **options)
        fully_shard(module, **options)
        # FSDP2 replaces each parameter by a DTensor; megatron-core's attributes (tensor_model_parallel,
        # partition_dim, ...) that the norm, the parameter groups and the checkpoint read go back on it.
        for name, param in module.named_parameters():
            for key, value in attributes[name].items():
                setattr(param, key, value)
        optimizer = torch_adamw(cfg, param_groups(cfg, module))
        super().__init__(cfg, env, module, module, optimizer, build_scheduler(cfg, optimizer))
        self._model_state = ShardedModelState(cfg, env, module)  # checkpoints of its DP shards

    # -- steps

    def forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        if not forward_only:
            self.optimizer.zero_grad(set_to_none=True)
        return run_forward_backward([self.model], data_iterator, num_microbatches, self.cfg, forward_only)

    @torch.no_grad()
    def _update(self, losses_finite: bool) -> tuple[float, Optional[str]]:
        params = [p for p in self.module.parameters() if p.grad is not None]
        grad_norm = get_grad_norm_fp32([p.grad for p in params if param_is_not_tensor_parallel_duplicate(p)],
                                       grad_stats_parallel_group=self.env.groups.tp)
        if not losses_finite:
            return grad_norm, "non-finite loss"
        if not math.isfinite(grad_norm):
            return grad_norm, "non-finite gradient norm"
        clip = self.cfg.optim.clip_grad
        coefficient = clip / (grad_norm + 1.0e-6)  # megatron-core's clip_grad_by_total_norm_fp32
        if clip > 0 and coefficient < 1.0:
            torch._foreach_mul_([_local(p.grad) for p in params], coefficient)
        self.optimizer.step()
        return grad_norm, None

    # -- parameters and checkpoints

    def local_parameters(self):
        return (_local(param).detach() for param in self.module.parameters())

    def sharded_state(self, metadata: dict, is_loading: bool, with_optimizer: bool) -> dict:
        """The model from each rank's DP shard of every parameter (engines/flat_shards.py), nothing gathered; the
        optimizer state is written beside it (``save_private``)."""
        return self._model_state.sharded_state(row_block_shards(self.module), metadata, is_loading)

    def load_model_state(self, state_dict: dict) -> list[str]:
        """Into this rank's shards, from which FSDP2 all-gathers each unit's weights at its next forward."""
        return self._model_state.load(state_dict)

    def _optimizer_folder(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, self.private_folder, f"tp_rank_{self.env.tp_rank:02d}")

    def save_private(self, folder: str) -> None:
        """The sharded AdamW state, one torch distributed checkpoint per TP rank, written by its DP group."""
        state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save({"optimizer": state}, checkpoint_id=self._optimizer_folder(folder), process_group=self.env.groups.dp)

    def load_optimizer(self, loaded: dict, path: str) -> None:
        folder = self._optimizer_folder(path)
        if not os.path.isdir(folder):
            raise EngineStateError(f"{folder} is missing: checkpoint {path} has no FSDP2 optimizer state for this "
                                   "layout. Fix: checkpoint.finetune=true to start from its weights.")
        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}  # the structure to load into
        dcp.load(state, checkpoint_id=folder, process_group=self.env.groups.dp)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        return {name: p.grad.full_tensor().float() for name, p in self.module.named_parameters()}

    # -- memory

    def state_bytes(self) -> dict[str, int]:
        """Local shards only: between steps FSDP2 holds no unsharded parameter or gradient."""
        params = storage_bytes(_local(p) for p in self.module.parameters())
        grads = storage_bytes(_local(p.grad) for p in self.module.parameters() if p.grad is not None)
        state = storage_bytes(_local(t) for t in adam_state(self.optimizer))
        return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(state.values())}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def row_block_shards(module) -> dict[str, FlatShard]:
    """This rank's FSDP2 shard of each parameter, by name: ``Shard(0)`` over the DP mesh gives each rank a block of
    whole rows of the (TP-local) parameter, possibly none."""
    shards = {}
    for name, param in module.named_parameters():
        if tuple(param.placements) != (Shard(0),):
            raise RuntimeError(f"{name}: FSDP2 placement {param.placements}, and checkpoints expect Shard(0)")
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        shards[name] = FlatShard(offset[0] * math.prod(param.shape[1:]), param.to_local().view(-1))
    return shards
