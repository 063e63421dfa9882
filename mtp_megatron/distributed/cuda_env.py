"""Environment variables a CUDA run needs before its CUDA context exists.

``CUDA_DEVICE_MAX_CONNECTIONS=1`` for tensor parallelism: megatron-core's tensor-parallel linears
(``megatron.core.tensor_parallel.layers``, ``LinearWithGradAccumulationAndAsyncCommunication``) start the TP
communication of the backward pass (the input gradient's all-reduce, or under sequence parallelism the input's
all-gather and the gradient's reduce-scatter) asynchronously and then launch the weight-gradient GEMM, relying on
the GPU to run kernels in launch order so that the communication is scheduled first and overlaps the GEMM. With
several hardware queues (the default) the GEMM can go first and the overlap is lost; megatron warns about it at
the first such linear. Megatron-LM's launch scripts set it, and its argument check insists on it for TP > 1
(before Blackwell). megatron DDP groups its gradient buckets with the same setting in mind.

The CUDA runtime reads it when the process creates its CUDA context (``init_distributed`` selects the device
later), so it must be in the environment before: launcher/torchrun.py sets it for its workers, launcher/mpirun.py
in its own process before MPI starts, and ``mtp_megatron.train`` before it starts any run (under any launcher, or
none). A value set to anything else is left as the user's choice, with a warning.

No torch import here: the launchers use this module before torch is loaded.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

from mtp_megatron.config import Config

DEVICE_MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def may_use_cuda(cfg: Config) -> bool:
    """The run may be on CUDA: ``train.device`` cuda, or auto (cuda wherever a GPU is visible)."""
    return cfg.train.device in ("cuda", "auto")


def launch_variables(cfg: Config) -> dict[str, str]:
    """The variables a run of ``cfg`` needs in its environment before it starts (empty when none)."""
    if may_use_cuda(cfg) and cfg.parallel.tp > 1:
        return {DEVICE_MAX_CONNECTIONS: "1"}
    return {}


def _cuda_context_exists() -> bool:
    torch = sys.modules.get("torch")  # only a process that has imported torch can have one
    return torch is not None and torch.cuda.is_initialized()


def apply_launch_variables(cfg: Config, environ: Optional[MutableMapping[str, str]] = None,
                           rank: Optional[int] = None) -> Optional[str]:
    """Put what ``cfg`` needs into ``environ`` (``os.environ``) where it is unset; where it is set to another
    value, or CUDA is already initialised in this process (too late to set it), warn on rank 0 (``rank``, default
    the launcher's RANK) saying what to change. Returns the warning, None if there is none."""
    environ = os.environ if environ is None else environ
    rank = int(environ.get("RANK", "0")) if rank is None else rank
    problems = []
    for name, value in launch_variables(cfg).items():
        if name not in environ:
            if _cuda_context_exists():
                problems.append(f"{name} is unset and CUDA is already initialised in this process, so setting "
                                f"it now has no effect. Fix: export {name}={value} before starting the run")
            else:
                environ[name] = value
        elif environ[name] != value:
            problems.append(f"{name}={environ[name]}, and parallel.tp={cfg.parallel.tp} wants {value} (megatron's "
                            "tensor-parallel linears rely on kernels running in launch order to overlap their "
                            f"communication). Fix: export {name}={value}, or unset it and the run sets it")
    if not problems:
        return None
    message = "; ".join(problems)
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return message
