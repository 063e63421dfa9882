"""model/fusions.py: which of megatron-core's fused kernels a CUDA run turns on, and why the others stay off.

None of the kernels is installed here (no CUDA, no Apex, no Transformer Engine, no Triton): each is faked where
megatron-core itself looks for it, and megatron's own TransformerConfig validation (which needs no GPU) checks
the result."""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.tensor_parallel import layers
from megatron.core.transformer.transformer_config import TransformerConfig

from mtp_megatron.config import load_config
from mtp_megatron.model import fusions
from mtp_megatron.model.builder import transformer_config
from mtp_megatron.training.run_folder import record_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(*overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), ["train.device=cuda", *overrides])


def _fake_module(monkeypatch, name: str) -> None:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def kernels(monkeypatch):
    """Every kernel present: Triton (torch.compile on CUDA), megatron's fused softmax, TE's fused RoPE, Apex's
    fused weight-gradient accumulation."""
    for name in ("triton", *fusions.SOFTMAX_KERNELS):
        _fake_module(monkeypatch, name)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda t, freqs, **kwargs: t)
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)


def test_everything_off_where_nothing_is_installed():
    choice = fusions.cuda_fusions(_cfg())
    assert choice.kwargs == dict.fromkeys(fusions.FUSIONS, False)
    assert choice.why_off == {
        "bias_dropout_fusion": "megatron's jit_fuser is torch.compile, which needs Triton (not installed)",
        "bias_activation_fusion": "megatron's jit_fuser is torch.compile, which needs Triton (not installed)",
        "masked_softmax_fusion": "megatron's fused softmax CUDA kernels (scaled_upper_triang_masked_softmax_cuda, "
                                 "scaled_masked_softmax_cuda) are not installed",
        "apply_rope_fusion": "Transformer Engine's fused RoPE is not installed",
        "gradient_accumulation_fusion": "Apex's fused_weight_gradient_mlp_cuda is not installed",
    }


def test_everything_on_where_installed_and_valid(kernels):
    choice = fusions.cuda_fusions(_cfg())
    assert choice.kwargs == dict.fromkeys(fusions.FUSIONS, True) and choice.why_off == {}
    assert choice.notes() == [f"{name} on" for name in fusions.FUSIONS]


@pytest.mark.parametrize("sharding, on", [("distributed_optimizer", True), ("none", True), ("zero1", False),
                                          ("zero2", False), ("zero3", False), ("fsdp", False)])
def test_gradient_accumulation_fusion_needs_megatron_ddp_main_grad(kernels, sharding, on):
    choice = fusions.cuda_fusions(_cfg(f"parallel.sharding={sharding}"))
    assert choice.kwargs["gradient_accumulation_fusion"] is on
    if not on:
        assert "(not megatron's DDP) keeps no main_grad" in choice.why_off["gradient_accumulation_fusion"]


def test_swiglu_fuses_gelu_does_not(kernels):
    assert fusions.cuda_fusions(_cfg("model.activation=swiglu")).kwargs["bias_activation_fusion"]
    for bias in ("false", "true"):
        choice = fusions.cuda_fusions(_cfg("model.activation=gelu", f"model.add_bias_linear={bias}"))
        assert not choice.kwargs["bias_activation_fusion"]
        assert "tanh approximation" in choice.why_off["bias_activation_fusion"]
    # gelu without biases is invalid for megatron besides:
    with pytest.raises(ValueError, match="add_bias_linear must also be True"):
        TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, activation_func=torch.nn.functional.gelu,
                          add_bias_linear=False, bias_activation_fusion=True)


def test_document_masks_and_learned_positions_keep_their_fusions_off(kernels):
    choice = fusions.cuda_fusions(_cfg("data.reset_attention_mask=true", "model.transformer_impl=local"))
    assert not choice.kwargs["masked_softmax_fusion"] and "ignores the mask" in choice.why_off["masked_softmax_fusion"]
    choice = fusions.cuda_fusions(_cfg("model.position_embedding=learned_absolute"))
    assert not choice.kwargs["apply_rope_fusion"] and "learned_absolute" in choice.why_off["apply_rope_fusion"]


def test_fused_kernels_false_turns_them_all_off(kernels):
    choice = fusions.cuda_fusions(_cfg("train.fused_kernels=false"))
    assert choice.kwargs == dict.fromkeys(fusions.FUSIONS, False)
    assert set(choice.why_off.values()) == {"train.fused_kernels=false"}


@pytest.mark.parametrize("overrides", [[], ["model.activation=gelu", "model.add_bias_linear=true"],
                                       ["parallel.tp=2", "parallel.sequence_parallel=true"],
                                       ["model.rope_scaling_type=llama3", "model.rope_scaling_factor=8"]])
def test_the_cuda_transformer_config_passes_megatron_validation(kernels, overrides):
    """builder.transformer_config for a CUDA device (TransformerConfig validates on construction, no GPU needed):
    the fusions are in it; CPU keeps cpu_compat's, all off."""
    cfg = _cfg(*overrides)
    config = transformer_config(cfg, torch.device("cuda"))
    expected = fusions.cuda_fusions(cfg).kwargs
    assert {name: getattr(config, name) for name in fusions.FUSIONS} == expected
    assert expected["gradient_accumulation_fusion"] and expected["apply_rope_fusion"]
    cpu = transformer_config(cfg, torch.device("cpu"))
    assert not any(getattr(cpu, name) for name in fusions.FUSIONS)


def test_a_cuda_run_logs_its_fusions_once(kernels, tmp_path, capsys):
    cfg = _cfg("parallel.sharding=zero2", f"run.dir={tmp_path}")
    engine = types.SimpleNamespace(write_run_files=lambda run_dir: None)  # record_run's one call on the engine
    record_run(cfg, engine, rank=0, device=torch.device("cuda", 0))
    record_run(cfg, engine, rank=1, device=torch.device("cuda", 1))
    lines = [line for line in capsys.readouterr().out.splitlines() if "fused kernels" in line]
    assert lines == ["[run] fused kernels: on: bias_dropout_fusion, bias_activation_fusion, masked_softmax_fusion, "
                     "apply_rope_fusion; off: gradient_accumulation_fusion (parallel.sharding=zero2 (not "
                     "megatron's DDP) keeps no main_grad to accumulate into)"]
    record_run(cfg, engine, rank=0, device=torch.device("cpu"))
    assert "fused kernels" not in capsys.readouterr().out
