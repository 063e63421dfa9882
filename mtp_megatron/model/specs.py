"""megatron-core layer specs: Transformer Engine when it is installed (GPU clusters), local modules otherwise."""

from __future__ import annotations

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec

from mtp_megatron.config import ModelConfig


def use_transformer_engine(impl: str) -> bool:
    if impl == "transformer_engine" and not gpt_layer_specs.HAVE_TE:
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not installed. "
            "Fix: install it (pip install -e .[gpu]) or set model.transformer_impl=local (or auto)."
        )
    return impl == "transformer_engine" or (impl == "auto" and gpt_layer_specs.HAVE_TE)


def layer_and_norm_specs(model: ModelConfig, explicit_attention_mask: bool = False) -> tuple[ModuleSpec, ModuleSpec]:
    """The spec of one transformer layer (trunk and heads alike) and of the heads' shared final norm.

    ``explicit_attention_mask`` (document masks) needs the local attention, which applies the mask it is given;
    Transformer Engine's causal attention ignores it (the config refuses an explicit transformer_engine then).
    """
    if use_transformer_engine(model.transformer_impl) and not explicit_attention_mask:
        from megatron.core.extensions.transformer_engine import TENorm

        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(), ModuleSpec(module=TENorm)
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)
    # LNImpl is Apex's fused norm when Apex is installed, torch's norm otherwise.
    return layer, ModuleSpec(module=gpt_layer_specs.LNImpl)
