"""torch FSDP2's engine (``parallel.sharding=fsdp``): ``fully_shard`` over the data-parallel mesh around the
megatron-core model, composed with megatron-core's tensor parallelism; TP x DP, no pipeline stages.

Sharding: each trunk layer is one FSDP unit (its parameters all-gathered just before its forward and backward,
freed after them with ``parallel.fsdp_reshard_after_forward``); the root unit holds the rest: the embedding and
the last stage's MTP heads with their shared final norm and unembedding, as megatron-core's own
``TorchFullyShardedDataParallel`` groups a GPT. The root's gradients are reduce-scattered once, when the whole
backward is done (FSDP2's root post-backward), so the shared norm and unembedding, which receive one gradient
per head in the sequential backward (model/heads.py), are reduced once per microbatch after the last head.
Under tensor parallelism every parameter is this TP rank's megatron-core shard, itself sharded over DP (dim 0).

Precision: the sharded parameters and AdamW's state are fp32; bf16 runs compute in bf16 through FSDP2's
``MixedPrecisionPolicy`` and reduce gradients in fp32. fp16 (loss scaling) is not offered.

Step: megatron-core's schedule without pipelining runs the microbatches (the loss scaled by 1/num_microbatches
as for every engine; FSDP2 averages over DP), then the gradient norm (megatron-core's ``get_grad_norm_fp32``,
which sums DTensor shards over DP and then over TP, counting TP-replicated parameters once), the clip and torch's
AdamW over megatron-core's parameter groups; a non-finite loss or norm skips the update.

Checkpoints: the model goes into the reshardable distributed checkpoint as every engine writes it, so it loads
into every engine at any layout and they into it. megatron-core's own DTensor support is not used for this: its
swiglu ``linear_fc1`` factory splits the local tensor into gate and up halves, which under FSDP2 is a DP shard,
not the TP shard, and the weights come back permuted (measured: 8 of 51 tensors wrong, no error). Instead,
inside ``full_parameters`` the DP shards are gathered into a plain copy of the bare model (built on the meta
device, materialised for the save or load and freed after it: the full TP shard of the weights, as ZeRO-3's
gather), whose ``sharded_state_dict`` is the one every engine writes; a load scatters it back into the shards.
The optimizer state is written by torch distributed checkpoint (``get_optimizer_state_dict``) into ``fsdp/``,
one folder per TP rank, and loads at the layout it was saved with.

Transformer Engine's layers are not used under FSDP2 (``model.transformer_impl=auto`` gives megatron-core's
local layers; ``transformer_engine`` is refused when the config is loaded).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines.base import Engine, EngineStateError, adam_state, storage_bytes
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
        self._plain: Optional[torch.nn.Module] = None  # the gathered copy, inside full_parameters only

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

    @contextlib.contextmanager
    def full_parameters(self, modified: bool = False):
        """A plain copy of the bare model, its weights gathered from the DP shards (unless ``modified``: a load
        fills it, and ``load_model_state`` scatters it back), for the checkpoint to read or fill. Collective."""
        plain = _plain_copy(self.cfg, self.env, self.module)
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                if not modified:
                    plain.get_parameter(name).copy_(param.full_tensor())
            for name, buffer in self.module.named_buffers():
                plain.get_buffer(name).copy_(buffer)
        self._plain = plain
        try:
            yield
        finally:
            self._plain = None

    def sharded_state(self, metadata: dict, is_loading: bool, with_optimizer: bool) -> dict:
        return {"model": self._plain.sharded_state_dict(metadata=dict(metadata))}

    def load_model_state(self, state_dict: dict) -> list[str]:
        """Load into the plain copy as every engine loads, then give each DP rank its shard of every weight."""
        result = self._plain.load_state_dict(state_dict, strict=False)
        problems = [f"{key}: not loaded into this model" for key in [*result.missing_keys, *result.unexpected_keys]
                    if not key.endswith("_extra_state")]
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                full = self._plain.get_parameter(name)
                param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                         src_data_rank=None).to_local())
        return problems

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


def local_layers(cfg: Config) -> Config:
    """``cfg`` with megatron-core's local layers (the module docstring says why)."""
    local = copy.deepcopy(cfg)
    local.model.transformer_impl = "local"
    return local


def _plain_copy(cfg: Config, env: ParallelEnv, module) -> torch.nn.Module:
    """The bare model's twin with plain tensors (uninitialised), built on the meta device and then allocated."""
    from mtp_megatron.model.builder import construct_model, transformer_config

    cfg = local_layers(cfg)
    config = transformer_config(cfg, env.device)
    config.params_dtype = torch.float32  # FSDP2 keeps fp32 weights (module docstring)
    with torch.device("meta"):
        plain = construct_model(cfg, config, env.groups, env.is_first_stage, env.is_last_stage,
                                cuda=env.device.type == "cuda", document_eod=module.document_eod)
    return plain.to_empty(device=env.device)
