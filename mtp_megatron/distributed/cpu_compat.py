"""Make megatron-core 0.16 run on CPU with the gloo backend.

This module exists for CPU tests and laptops only. ``init_distributed`` imports it when the run's device is
CPU; a GPU run never imports it, so none of these patches can change GPU behaviour.

megatron-core assumes CUDA in a handful of places (docs/platform.md). Each patch below maps one of them to its
CPU equivalent:

* ``torch.cuda.current_device()`` (grad buffers, p2p communication, mappings): returns ``"cpu"``.
* Hard-coded ``device="cuda"`` / ``Tensor.cuda()`` (schedules, optimizer, clip_grads): a ``TorchFunctionMode``
  rewrites CUDA devices to CPU.
* ``param.type() == 'torch.cuda.FloatTensor'`` checks (distributed optimizer, mixed-precision optimizer): the
  same mode reports CPU tensors under their CUDA type name.
* The CUDA RNG (``model_parallel_cuda_manual_seed``, the RNG tracker that dropout forks inside TP regions):
  routed to the CPU generator.
* ``torch.cuda.synchronize()`` (p2p communication, checkpoint save): a no-op.
* ``get_default_causal_mask`` (attention without an explicit mask) allocates on ``device="cuda"``. The mode above
  would rewrite that, but torch function modes are not active inside autograd's backward, where the MTP heads run
  their forward in the sequential order: the function is replaced by a CPU one.

The mode is active from ``apply`` (``init_distributed``) to ``release_mode`` (``destroy_distributed``), the life of
a megatron-core world; the other patches stay for the life of the process. Left on after a checkpoint read, the
mode's Python hook on every torch call made plain CPU decoding 1.3-1.9x slower (docs/benchmarks.md section 6) and
turned a later ``device="cuda"`` into a CPU tensor without a word.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_mode = None
"""The ``_CudaToCpuMode`` while it is active."""


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA device index (megatron passes ``torch.cuda.current_device()`` around).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizers accept only 'torch.cuda.{Float,Half,BFloat16}Tensor'.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def apply() -> None:
    """Install the CPU patches once per process, and enter the mode if it is not active. Idempotent."""
    global _applied, _mode
    if not _applied:
        _applied = True
        _patch()
    if _mode is None:
        _mode = _CudaToCpuMode()
        _mode.__enter__()


def release_mode() -> None:
    """Leave the mode (the world that needed it is gone). A mode entered after ours and still open is on top of the
    stack, and leaving ours would pop that one instead: then ours stays on, as it always did before (CUDA devices
    still mapped to the CPU; a CUDA world is refused either way, distributed/parallel.py)."""
    global _mode
    if _mode is not None and torch.overrides._get_current_function_mode() is _mode:
        _mode.__exit__(None, None, None)
        _mode = None


def _patch() -> None:
    """The patches other than the mode, for the life of the process."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    from megatron.core.fusions import fused_softmax

    @functools.lru_cache(maxsize=None)
    def causal_mask_on_cpu(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    fused_softmax.get_default_causal_mask = causal_mask_on_cpu


def transformer_config_overrides() -> dict:
    """TransformerConfig fields that must be set for CPU: the fused CUDA kernels they enable do not exist."""
    return dict(
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_sync=False,
    )
