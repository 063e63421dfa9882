"""DeepSpeed's engine: ZeRO stages 1-3 around the MTP model (``parallel.sharding=zero1|zero2|zero3``; TP x DP, pp=1).

The model is the same megatron-core ``MTPGPTModel`` (tensor-parallel layers, vocab-parallel heads), handed to
``deepspeed.initialize`` with torch's AdamW (Apex's FusedAdam when Apex is installed) over megatron-core's own
parameter groups, and megatron-core's LR schedule, so the optimisation is the one the megatron path runs.
DeepSpeed learns the tensor-parallel layout through ``MegatronMPU``: it reduces gradients over the DP group
only and counts each TP-replicated parameter once in the gradient norm (megatron-core marks the split ones
``tensor_model_parallel``, which DeepSpeed reads).

A step is ``gradient_accumulation_steps`` microbatches of ``engine(...)`` and ``engine.backward(loss)``, then
``engine.step()``, which DeepSpeed turns into one update at the accumulation boundary. The MTP heads' sequential
backward runs inside ``engine.backward`` (see model/heads/sequential.py); the shared norm and unembedding tell ZeRO to
reduce their gradient once, after the last head (``ds_grad_is_ready``).

Non-finite steps are checked here, not left to DeepSpeed, whose own skip has changed between releases (for a
while only fp16 runs set its ``overflow`` flag): the torch optimizer that ZeRO drives is wrapped in a
``FiniteUpdateGuard`` that drops the update when any head's loss in the step, or any gradient the update would
apply, is not finite on any rank. DeepSpeed's own skip (0.19.8 skips a non-finite gradient norm in fp32, bf16
and fp16) is read back too. Tested with DeepSpeed 0.19.8 (``TESTED_DEEPSPEED``); another release is refused.

Checkpoints: the model is written into the distributed checkpoint like every engine's, so it reshards and tools
read it alike; under ZeRO-3 each rank writes and reads only its own partition of every parameter
(engines/flat_shards.py), no parameter is gathered. DeepSpeed writes its optimizer partitions beside it in
``deepspeed/``, loadable at the layout they were saved with.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mtp_megatron.config import Config, ConfigError
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines.base import Engine, EngineStateError, adam_state, storage_bytes
from mtp_megatron.engines.deepspeed_config import deepspeed_config
from mtp_megatron.engines.flat_shards import FlatShard, ShardedModelState
from mtp_megatron.engines.optim import build_scheduler, param_groups, torch_adamw
from mtp_megatron.engines.step import StepResult, forward_step, reduce_head_stats


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
    step by ``_begin_update``) is false. Collective: every rank calls ``step`` the same number of times.
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


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    private_folder = "deepspeed"  # DeepSpeed's engine writes its optimizer partitions here (its "tag")
    optimizer_reshards = False

    def __init__(self, cfg: Config, env: ParallelEnv, module, precision: str):
        import deepspeed

        check_deepspeed_version(deepspeed.__version__)
        if env.device.type == "cpu":
            # A just-in-time C++ build of DeepSpeed's shared-memory collectives takes ~40 s at the first init;
            # gloo does the same job on CPU.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.config = deepspeed_config(cfg, env.dims.dp, precision)
        # DeepSpeed joins the process group that already exists (torch.distributed under the hood).
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        adamw = torch_adamw(cfg, param_groups(cfg, module), apex=True)
        self.guard = FiniteUpdateGuard(adamw, env.device)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=adamw, config=self.config, mpu=MegatronMPU(env), dist_init_required=False)
        super().__init__(cfg, env, engine, module, optimizer, build_scheduler(cfg, optimizer))
        self._model_state = ShardedModelState(cfg, env, module)  # ZeRO-3's checkpoints of its partitions

    @property
    def zero3(self) -> bool:
        return self.model.zero_optimization_stage() == 3

    # -- steps

    def _forward_backward_update(self, data_iterator, num_microbatches: int,
                                 after_backward: Optional[Callable[[bool], None]]) -> StepResult:
        """DeepSpeed's engine applies the update (or, for a non-finite norm, skips it) at the last microbatch."""
        losses = self._microbatches(data_iterator, num_microbatches, forward_only=False,
                                    after_backward=after_backward)
        result = reduce_head_stats(losses, self.cfg.mtp, self.env)
        result.grad_norm, result.skip_reason = self._update_result()
        if result.skip_reason and result.nonfinite_heads:
            result.skip_reason = "non-finite loss"
        return result

    def forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        if not forward_only:  # a backward without its engine.step() would leave ZeRO mid-accumulation
            raise NotImplementedError("DeepSpeed's engine reduces and updates inside its backward/step loop: "
                                      "run a training step with train_step")
        return self._microbatches(data_iterator, num_microbatches, forward_only=True)

    def _microbatches(self, data_iterator, num_microbatches: int, forward_only: bool,
                      after_backward: Optional[Callable[[bool], None]] = None) -> list[dict]:
        """``engine(...)``, and unless ``forward_only`` ``engine.backward(loss)`` and ``engine.step()`` per
        microbatch, which DeepSpeed turns into one update at the accumulation boundary. ``after_backward`` runs
        after each microbatch's backward (ZeRO-1 accumulates full gradients until the last, ZeRO-1/2 hold the
        step's reduced ones only between the last and the update), told whether it is the last."""
        out = []
        for index in range(num_microbatches):
            (loss, stats), _ = forward_step(data_iterator, self.model)
            out.append({"mtp_stats": stats})
            if forward_only:
                continue
            self.model.backward(loss)  # scales by 1/gradient_accumulation_steps (and the fp16 loss scale)
            last = index == num_microbatches - 1  # the accumulation boundary
            if after_backward is not None:
                after_backward(last)
            if last:  # the losses of the whole step are known now
                self._begin_update(out)
            self.model.step()  # an update only at the accumulation boundary, the last microbatch
        return out

    def _begin_update(self, microbatch_stats: list[dict]) -> None:
        """Tell the update guard whether every head's loss was finite on every rank in this step (collective)."""
        bad = torch.zeros(1, device=microbatch_stats[0]["mtp_stats"].device)
        if not all(torch.isfinite(m["mtp_stats"]).all() for m in microbatch_stats):
            bad.fill_(1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.guard.begin_step(loss_finite=not bad.item())

    def _update_result(self) -> tuple[float | None, str | None]:
        """(gradient norm, why the update was skipped or None) of the step just finished."""
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        ours = self.guard.skip_reason()
        if ours is not None:
            return norm, ours
        if getattr(self.model.optimizer, "overflow", False):
            if self.model.fp16_enabled():
                return None, "fp16 loss-scale overflow"
            return norm, "non-finite gradient norm"
        return norm, None

    # -- parameters and checkpoints

    def local_parameters(self):
        if not self.zero3:
            return super().local_parameters()
        return (shard.data for shard in zero3_shards(self.module).values())

    def sharded_state(self, metadata: dict, is_loading: bool, with_optimizer: bool) -> dict:
        """ZeRO-3: the model from each rank's partition of every parameter (engines/flat_shards.py), nothing
        gathered; the optimizer state is DeepSpeed's own (``save_private``)."""
        if not self.zero3:
            return super().sharded_state(metadata, is_loading, with_optimizer)
        return self._model_state.sharded_state(zero3_shards(self.module), metadata, is_loading)

    def load_model_state(self, state_dict: dict) -> list[str]:
        """ZeRO-3: into this rank's partitions; the parameters DeepSpeed keeps gathered (its persistent small
        ones) are released, so that the next forward gathers them from the loaded partitions."""
        if not self.zero3:
            return super().load_model_state(state_dict)
        problems = self._model_state.load(state_dict)
        release_gathered(self.module)
        return problems

    def after_weights_loaded(self) -> None:
        self.optimizer.refresh_fp32_params()  # ZeRO's fp32 master partitions from the loaded weights

    def save_private(self, folder: str) -> None:
        if self.zero3:
            # DeepSpeed's module file holds what each parameter's ``data`` is: nothing for a released parameter,
            # the whole of one kept gathered. Released, they match what a load leaves (``load_model_state``), which
            # DeepSpeed's load of that file requires; the weights are in the distributed checkpoint.
            release_gathered(self.module)
        self.model.save_checkpoint(folder, tag=self.private_folder, save_latest=False)

    def load_optimizer(self, loaded: dict, path: str) -> None:
        folder = os.path.join(path, self.private_folder)
        if not os.path.isdir(folder):
            raise EngineStateError(f"{folder} is missing: checkpoint {path} has no DeepSpeed optimizer state. "
                                    "Fix: checkpoint.finetune=true to start from its weights.")
        found, _ = self.model.load_checkpoint(path, tag=self.private_folder, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if found is None:
            raise EngineStateError(f"DeepSpeed could not read its optimizer state from {folder}. Fix: "
                                    "checkpoint.finetune=true to start from the checkpoint's weights.")

    def write_run_files(self, run_dir: str) -> None:
        """``<run_dir>/deepspeed_config.json``: the DeepSpeed config this run uses."""
        path = os.path.join(run_dir, "deepspeed_config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.config, f, indent=1)
        os.replace(path + ".tmp", path)

    def gathered_gradients(self) -> dict[str, torch.Tensor]:
        """DeepSpeed's own accessor for ZeRO's reduced fp32 gradient partitions, all-gathered."""
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).float().clone() for name, p in self.module.named_parameters()}

    # -- memory

    def state_bytes(self) -> dict[str, int]:
        module, optimizer = self.module, self.optimizer
        if self.zero3:  # each rank keeps its partition of every parameter
            params = storage_bytes(p.ds_tensor for p in module.parameters())
            grads = storage_bytes([optimizer.grad_partitions_flat_buffer])
            masters = list(optimizer.fp32_partitioned_groups_flat)
        else:
            params = storage_bytes(module.parameters())
            masters = list(optimizer.single_partition_of_fp32_groups)
            # The reduced partition, plus what the parameters still hold: ZeRO-1 accumulates full gradients
            # (``grad_accum``) over the microbatches and reduces them at the last, ZeRO-2 reduces them as they
            # arrive.
            partition = [t for value in optimizer.averaged_gradients.values() if value is not None
                         for t in (value if isinstance(value, (list, tuple)) else [value])]
            grads = storage_bytes([*partition, *(p.grad for p in module.parameters()),
                                   *(getattr(p, "grad_accum", None) for p in module.parameters())])
        state = storage_bytes([*adam_state(optimizer.optimizer), *masters])
        return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(state.values())}


def zero3_shards(module) -> dict[str, FlatShard]:
    """This rank's ZeRO-3 partition of each parameter, by name. DeepSpeed pads the flattened parameter to equal
    partitions, one per rank of its DP group in rank order (``ds_tensor``); the padding at the end is left out."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    shards = {}
    for name, param in module.named_parameters():
        partition = param.ds_tensor
        if partition.final_location == OffloadDeviceEnum.nvme:  # swapped out: not in memory between steps
            raise NotImplementedError(f"{name}: ZeRO-3 parameters offloaded to NVMe are not checkpointed here. "
                                      "Fix: offload_param device cpu or none")
        size = partition.ds_numel
        start = size * param.ds_zero_partition_rank
        shards[name] = FlatShard(start, partition.view(-1).narrow(0, 0, max(0, min(size, param.ds_numel - start))))
    return shards


def release_gathered(module) -> None:
    """Release the ZeRO-3 parameters that are gathered now (DeepSpeed keeps its small "persistent" ones so between
    steps) as DeepSpeed releases them: their partitions are current, the gathered copy is dropped."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        gathered[0].partition(param_list=gathered, has_been_updated=False)
