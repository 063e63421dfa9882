"""megatron-core's fused kernels for a CUDA run: which ``TransformerConfig`` fusions to turn on, and why.

megatron-core leaves every fusion off by default. ``cuda_fusions`` turns on each one that is installed on this
machine, valid for this model (megatron's ``TransformerConfig.__post_init__`` rules) and computes the same
function as the unfused path:

* ``bias_dropout_fusion``: each layer's two bias-dropout-residual adds as one compiled function (megatron-core's
  ``jit_fuser``: ``torch.compile`` on torch >= 2.2, which needs Triton on CUDA; no extension module).
* ``bias_activation_fusion``: swiglu's silu(a) * b (plus the bias, if any) as one compiled function, the same
  math. Not for gelu: megatron's fused gelu is the tanh approximation, where this model (and its CPU and
  evaluation paths, and the converters) computes the exact erf form; megatron also refuses it without
  ``model.add_bias_linear``.
* ``masked_softmax_fusion``: megatron's fused scale-mask-softmax CUDA kernels
  (``scaled_upper_triang_masked_softmax_cuda``, ``scaled_masked_softmax_cuda``, built by Apex or Megatron-LM),
  used by the local attention in bf16/fp16 where the shape suits them. megatron checks shapes but not whether they import, so a missing kernel
  would fail at the first forward: on only when both import. Never with document masks
  (``data.reset_attention_mask``): for causal attention the fused kernel applies its own causal mask and ignores
  the one it is given.
* ``apply_rope_fusion``: Transformer Engine's fused rotary embedding (megatron's
  ``rope_utils.fused_apply_rotary_pos_emb``, None without TE), for rotary models. RoPE scaling changes the
  frequencies only, which the fused kernel takes as given.
* ``gradient_accumulation_fusion``: the weight-gradient GEMM accumulates straight into megatron DDP's fp32
  ``main_grad``. Needs Apex's ``fused_weight_gradient_mlp_cuda`` even with Transformer Engine layers (the heads'
  unembedding is megatron's own ColumnParallelLinear, which refuses the setting without it), and megatron DDP
  (``parallel.sharding`` none or distributed_optimizer): under DeepSpeed ZeRO and FSDP2 parameters have no ``main_grad``
  and the fused backward would fail.

``train.fused_kernels=false`` keeps them all off (to measure without them); CPU runs never use them
(distributed/cpu_compat.py turns them off).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Dict, List

from mtp_megatron.config import Config

SOFTMAX_KERNELS = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")
MEGATRON_DDP_SHARDING = ("none", "distributed_optimizer")
FUSIONS = ("bias_dropout_fusion", "bias_activation_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion")


@dataclass(frozen=True)
class FusionChoice:
    """The TransformerConfig fusion fields for a CUDA run, and why each one that is off is off."""

    kwargs: Dict[str, bool] = field(default_factory=dict)
    why_off: Dict[str, str] = field(default_factory=dict)

    def notes(self) -> List[str]:
        """One line per fusion: ``name on`` or ``name off: why``."""
        return [f"{name} off: {self.why_off[name]}" if name in self.why_off else f"{name} on" for name in self.kwargs]

    def summary(self) -> str:
        """One line for the run's start-up log."""
        on = [name for name, value in self.kwargs.items() if value]
        off = [f"{name} ({why})" for name, why in self.why_off.items()]
        return f"on: {', '.join(on) or 'none'}; off: {'; '.join(off) or 'none'}"


# ---------------------------------------------------------------------------------------------------------------
# What is installed (each read where megatron-core itself looks, so tests can fake either answer)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:  # absent, or an extension that does not load here
        return False


def jit_fuser_usable() -> bool:
    """megatron-core's ``jit_fuser`` works on CUDA: ``torch.compile`` needs Triton there; the other forms
    (torch.jit.script, no-op) need nothing."""
    import torch
    from megatron.core import jit

    return jit.jit_fuser is not torch.compile or importlib.util.find_spec("triton") is not None


def softmax_kernels_available() -> bool:
    return all(_importable(name) for name in SOFTMAX_KERNELS)


def fused_rope_available() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def grad_accumulation_kernel_available() -> bool:
    """Apex's ``fused_weight_gradient_mlp_cuda``, as megatron's linears found it when they were imported."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


# ---------------------------------------------------------------------------------------------------------------


def cuda_fusions(cfg: Config) -> FusionChoice:
    """The fusions for a CUDA run of ``cfg`` (all off with ``train.fused_kernels=false``)."""
    why_off = {}  # fusion -> why it stays off; "" = on
    if not cfg.train.fused_kernels:
        why_off = dict.fromkeys(FUSIONS, "train.fused_kernels=false")
        return FusionChoice(dict.fromkeys(FUSIONS, False), why_off)

    jit = "" if jit_fuser_usable() else "megatron's jit_fuser is torch.compile, which needs Triton (not installed)"
    why_off["bias_dropout_fusion"] = jit
    why_off["bias_activation_fusion"] = jit if cfg.model.activation == "swiglu" else (
        "megatron's fused gelu is the tanh approximation; this model's gelu (and its CPU, evaluation and converted "
        "forms) is the exact one")
    if cfg.data.reset_attention_mask:
        why_off["masked_softmax_fusion"] = ("document masks (data.reset_attention_mask): the fused causal kernel "
                                            "ignores the mask it is given")
    elif not softmax_kernels_available():
        why_off["masked_softmax_fusion"] = (f"megatron's fused softmax CUDA kernels ({', '.join(SOFTMAX_KERNELS)}) "
                                            "are not installed")
    if cfg.model.position_embedding != "rope":
        why_off["apply_rope_fusion"] = f"no rotary embedding (model.position_embedding={cfg.model.position_embedding})"
    elif not fused_rope_available():
        why_off["apply_rope_fusion"] = "Transformer Engine's fused RoPE is not installed"
    if cfg.parallel.sharding not in MEGATRON_DDP_SHARDING:
        why_off["gradient_accumulation_fusion"] = (f"parallel.sharding={cfg.parallel.sharding} (not megatron's DDP) "
                                                   "keeps no main_grad to accumulate into")
    elif not grad_accumulation_kernel_available():
        why_off["gradient_accumulation_fusion"] = "Apex's fused_weight_gradient_mlp_cuda is not installed"
    why_off = {name: why_off[name] for name in FUSIONS if why_off.get(name)}
    return FusionChoice({name: name not in why_off for name in FUSIONS}, why_off)
