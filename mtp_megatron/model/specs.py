"""megatron-core layer specs: Transformer Engine for CUDA builds where it is installed (GPU clusters), local modules
otherwise (CPU runs; the converters, evaluation and generation, whose TP1 x PP1 model always has the local layers,
convert/native.py ``dense_config``).

Both hold the same tensors under the same checkpoint keys: the local spec maps its norms onto Transformer Engine's
names (``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``, ``pre_mlp_layernorm.`` ->
``mlp.linear_fc1.layer_norm_``, megatron-core's ``sharded_state_dict_keys_map``, which ``layer_and_norm_specs``
keeps), so a checkpoint of either loads into the other; what only Transformer Engine saves, its ``_extra_state``
objects (FP8 scaling metadata), is skipped by checkpoint/checkpointer.py.

The local spec's norms are replaced by ``Norm``: megatron-core's torch-norm wrapper refuses sequence
parallelism, because it cannot mark its parameters for the all-reduce over TP that their gradients need (each TP
rank normalises only its slice of the sequence). ``Norm`` marks them, and uses NVIDIA Apex's fused kernels when
Apex is installed (GPU clusters build it from source; never from PyPI, whose ``apex`` is another project).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mtp_megatron.config import ConfigError, ModelConfig
from mtp_megatron.model.initialization import SeededTransformerLayer

try:  # optional: Apex's fused norms (CUDA only)
    from apex.normalization import FusedLayerNorm as ApexLayerNorm, FusedRMSNorm as ApexRMSNorm

    HAVE_APEX = True
except ImportError:
    HAVE_APEX = False


class Norm:
    """The model's norm (``config.normalization``) with its parameters marked ``sequence_parallel``, so megatron's
    ``finalize_model_grads`` sums their gradients over TP when sequence parallelism is on. Apex's fused kernel on
    GPU when Apex is installed, torch's otherwise; both hold the same ``weight`` (and ``bias``) parameters."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
        rms = config.normalization == "RMSNorm"
        # Built on the CPU (model/builder.py initialises there) and moved; Apex's kernels fall back to plain torch
        # for CPU inputs, so a CPU run on a GPU node computes the same.
        if HAVE_APEX and torch.cuda.is_available():
            norm = (ApexRMSNorm if rms else ApexLayerNorm)(hidden_size, eps=eps)
        else:
            norm = (torch.nn.RMSNorm if rms else torch.nn.LayerNorm)(hidden_size, eps=eps)
        norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def use_transformer_engine(impl: str, cuda: bool) -> bool:
    """Whether ``model.transformer_impl`` gives Transformer Engine layers for a model built for CUDA (``cuda``) or
    for the CPU. auto: TE where it is installed and the model runs on CUDA, local otherwise; TE's fused modules
    run on CUDA only, and a node with TE installed also runs CPU builds (converters, evaluation, generation)."""
    if impl == "transformer_engine" and not cuda:
        raise ConfigError.from_problems([
            "model.transformer_impl: transformer_engine builds Transformer Engine layers, which run on CUDA only, "
            "and this model is built for the CPU. Fix: set model.transformer_impl=auto (Transformer Engine on GPU "
            "runs, local layers on CPU; their checkpoints load into each other) or local, or train.device=cuda"])
    if impl == "transformer_engine" and not gpt_layer_specs.HAVE_TE:
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not installed. "
            "Fix: install it (pip install -e .[gpu]) or set model.transformer_impl=local (or auto)."
        )
    return impl == "transformer_engine" or (impl == "auto" and cuda and gpt_layer_specs.HAVE_TE)


def layer_and_norm_specs(model: ModelConfig, explicit_attention_mask: bool = False,
                         init_seed: Optional[int] = None, cuda: bool = False) -> tuple[ModuleSpec, ModuleSpec]:
    """The spec of one transformer layer (trunk and heads alike) and of the norm the heads share.

    ``cuda``: whether the model is built for a CUDA run (model/builder.py says so from the run's device).

    ``explicit_attention_mask`` (document masks) needs the local attention, which applies the mask it is given;
    Transformer Engine's causal attention ignores it (the config refuses an explicit transformer_engine then).
    With ``init_seed`` each layer initialises from a stream of its own global index (model/initialization.py).
    """
    if use_transformer_engine(model.transformer_impl, cuda) and not explicit_attention_mask:
        from megatron.core.extensions.transformer_engine import TENorm

        layer, norm = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(), ModuleSpec(module=TENorm)
    else:
        layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)
        norm = ModuleSpec(module=Norm)
        # replace() keeps the other submodules, sharded_state_dict_keys_map included: the norms keep Transformer
        # Engine's checkpoint names.
        layer.submodules = dataclasses.replace(layer.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
    if init_seed is not None:
        layer = dataclasses.replace(layer, module=SeededTransformerLayer,
                                    params={**layer.params, "init_seed": init_seed})
    return layer, norm
