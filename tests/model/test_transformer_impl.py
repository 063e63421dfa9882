"""model.transformer_impl: auto means Transformer Engine only for CUDA builds, and both layer kinds save the same
checkpoint names (model/specs.py). Transformer Engine is not installed here: its presence is faked where megatron
looks for it (``gpt_layer_specs.HAVE_TE``), which is all that the choice reads."""

from __future__ import annotations

import os

import pytest
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel import ColumnParallelLinear

from mtp_megatron.config import ConfigError, load_config
from mtp_megatron.convert import native
from mtp_megatron.model.builder import build_model
from mtp_megatron.model.specs import Norm, layer_and_norm_specs, use_transformer_engine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["model.num_layers=3", "mtp.n_heads=2", "model.seq_length=32"]


def _cfg(*overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [*SMALL, *overrides])


@pytest.fixture
def te_installed(monkeypatch):
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)


def test_auto_is_transformer_engine_only_for_cuda_builds(te_installed):
    assert use_transformer_engine("auto", cuda=True)
    assert not use_transformer_engine("auto", cuda=False)
    assert not use_transformer_engine("local", cuda=True)
    assert use_transformer_engine("transformer_engine", cuda=True)


def test_auto_without_transformer_engine_is_local_everywhere(monkeypatch):
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)
    assert not use_transformer_engine("auto", cuda=True)


def test_explicit_transformer_engine_on_cpu_is_a_config_error(te_installed):
    with pytest.raises(ConfigError, match="transformer_engine builds Transformer Engine layers, which run on CUDA "
                                          "only.*Fix: set model.transformer_impl=auto"):
        use_transformer_engine("transformer_engine", cuda=False)
    with pytest.raises(ConfigError, match="model.transformer_impl: transformer_engine layers run on CUDA only, and "
                                          "train.device=cpu. Fix"):
        _cfg("model.transformer_impl=transformer_engine", "train.device=cpu")
    _cfg("model.transformer_impl=transformer_engine", "train.device=cuda")  # valid: a GPU run


def test_cpu_build_with_auto_gets_the_local_layers_where_te_is_installed(te_installed):
    """The converters, evaluation and generation build this model on the CPU of a node that may have TE."""
    cfg = _cfg("model.transformer_impl=auto")
    with native.single_process() as env:  # the converters' CPU world
        model = build_model(native.dense_config(cfg, "fp32"), env)
    assert type(model.decoder.layers[0].input_layernorm).__module__.startswith("torch.nn")
    assert isinstance(model.mtp_heads.layers[0].self_attention.linear_qkv, ColumnParallelLinear)
    layer, norm = layer_and_norm_specs(cfg.model, cuda=False)
    assert norm.module is Norm and layer.submodules.self_attention.submodules.linear_qkv is ColumnParallelLinear
    layer, _ = layer_and_norm_specs(cfg.model)  # no device named: a CPU build
    assert layer.submodules.input_layernorm.module is Norm


def test_local_layers_save_under_transformer_engine_names():
    """megatron's local spec maps its norms onto TE's fused-linear names; our norm replacement keeps that map, and
    the heads and the shared final norm follow the same naming, so either kind of checkpoint loads into the other."""
    cfg = _cfg()
    layer, _ = layer_and_norm_specs(cfg.model, cuda=False)
    megatron_map = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert layer.submodules.sharded_state_dict_keys_map == megatron_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    with native.single_process() as env:
        model = build_model(native.dense_config(cfg, "fp32"), env)
        keys = {value.key for value in model.sharded_state_dict().values()}
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys), sorted(keys)
    for prefix in ("decoder.layers.", "mtp_heads.layers.0.", "mtp_heads.layers.1."):
        assert f"{prefix}self_attention.linear_qkv.layer_norm_weight" in keys
        assert f"{prefix}mlp.linear_fc1.layer_norm_weight" in keys
    assert "mtp_heads.final_norm.weight" in keys  # TENorm's parameter has the same name
