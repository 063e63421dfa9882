"""Process start and megatron-core parallel state.

Reads the launcher's environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a plain
``python -m mtp_megatron.train`` runs as a single process), picks NCCL on GPU and gloo on CPU, and creates the
TP x PP x DP groups once. The groups are handed down explicitly as a ``ParallelEnv``.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from mtp_megatron.config import ParallelConfig
from mtp_megatron.distributed.topology import ParallelDims


@dataclass
class ParallelEnv:
    """Where this process sits in the job, and the process groups it talks to."""

    rank: int
    local_rank: int
    dims: ParallelDims
    device: torch.device
    groups: ProcessGroupCollection

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.groups.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.groups.pp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.groups.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def resolve_device(preference: str) -> torch.device:
    """'auto' is CUDA when a GPU is visible, CPU otherwise."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no GPU is visible. Fix: train.device=cpu (or auto).")
    return torch.device(preference)


def _refuse_cuda_after_cpu_compat() -> None:
    """RuntimeError if this process has applied the CPU patches (distributed/cpu_compat.py): their torch function
    mode rewrites every CUDA device to CPU while a CPU world lives, and the rest (``torch.cuda.current_device``
    returning "cpu", the CUDA RNG routed to the CPU generator) stay for the process, so a CUDA run would silently
    run wrong. Checked without importing cpu_compat (importing it is harmless, but a GPU run never does)."""
    compat = sys.modules.get("mtp_megatron.distributed.cpu_compat")
    if compat is not None and getattr(compat, "_applied", False):
        raise RuntimeError("the CPU compatibility patches (mtp_megatron/distributed/cpu_compat.py) are active in "
                           "this process, so CUDA tensors would silently be created on the CPU. A process must not "
                           "mix a CPU run and a CUDA run: start the CUDA run in a fresh process (or read "
                           "checkpoints with device='cuda' from the start)")


# Whether init_distributed created the world process group. A group the caller created (a test harness running
# several jobs in one process, a notebook) is the caller's to destroy: re-creating it would reuse the launcher's
# MASTER_PORT while a slower rank still serves the old rendezvous store, and gloo would read stale addresses.
_owns_world_group = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, device_preference: str, seed: int) -> ParallelEnv:
    """Start torch.distributed from the launcher's environment and build megatron-core's parallel state."""
    device = resolve_device(device_preference)
    if device.type == "cuda":
        _refuse_cuda_after_cpu_compat()
    if device.type == "cpu":
        from mtp_megatron.distributed import cpu_compat  # never imported on GPU runs

        cpu_compat.apply()

    if "RANK" not in os.environ:  # a plain single-process run
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    dims = ParallelDims(world_size=world_size, tp=parallel.tp, pp=parallel.pp)
    dims.validate()

    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    global _owns_world_group
    if not dist.is_initialized():
        _owns_world_group = True
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=int(os.environ.get("MTP_DIST_TIMEOUT_MINUTES", "30"))),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp
    )
    # The streams dropout draws from, as Megatron-LM seeds them: one per pipeline stage (seed + 100 x stage), the
    # same on every DP replica; megatron derives each TP rank's stream for TP regions from it. Initial weights
    # do not come from these: each layer has a stream of its own (model/initialization.py).
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    # Python's and numpy's global generators too (as Megatron-LM's _set_random_seed): checkpoints save their states,
    # so an unseeded process would save its own OS entropy and a resumed run would not match an uninterrupted one.
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)
    return ParallelEnv(
        rank=rank,
        local_rank=local_rank,
        dims=dims,
        device=device,
        groups=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_distributed() -> None:
    """Undo ``init_distributed``: megatron's parallel state, the world group if it created that, and the CPU
    patches' torch function mode (distributed/cpu_compat.py), which is for megatron-core's code only."""
    global _owns_world_group
    compat = sys.modules.get("mtp_megatron.distributed.cpu_compat")  # never imported on GPU runs
    if compat is not None:
        compat.release_mode()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and _owns_world_group:
        dist.destroy_process_group()
        _owns_world_group = False
