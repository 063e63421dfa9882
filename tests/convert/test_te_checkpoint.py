"""A checkpoint saved by a Transformer Engine run reads into the converters' local TP1 x PP1 model, and a local
one into a TE model: their tensors have the same keys (model/specs.py) and only ``_extra_state`` objects differ,
which the load skips (checkpoint/checkpointer.py); anything else that does not match is an error.

Transformer Engine is not installed here. Its checkpoints are written by our own model with its sharded state
dict changed as megatron's TE layers change it (megatron/core/extensions/transformer_engine.py: each TE linear's
``_extra_state`` holds its FP8 metadata, serialised as a uint8 tensor, where a local linear's is None; TE's norm
adds an ``_extra_state`` of its own, made a ShardedObject by ``make_sharded_tensors_for_checkpoint``)."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle

import pytest
import torch
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config import load_config
from mtp_megatron.convert import native
from mtp_megatron.model.builder import build_model
from mtp_megatron.model.gpt import MTPGPTModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["model.num_layers=3", "mtp.n_heads=2", "model.seq_length=32", "model.num_query_groups=2"]


def _te_payload() -> torch.Tensor:
    """What a TE module's ``get_extra_state`` returns with FP8 on: its scaling metadata, pickled into bytes."""
    meta = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.rand(16, 3), "recipe": "DelayedScaling"}
    return torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)


def _te_style(state: dict) -> dict:
    """A sharded state dict as the TE spec's model saves it."""
    for key, value in state.items():
        if isinstance(value, ShardedObject) and value.key.endswith("_extra_state"):
            state[key] = dataclasses.replace(value, data=_te_payload())
    state.update(make_sharded_tensors_for_checkpoint({"_extra_state": _te_payload()}, "mtp_heads.final_norm."))
    return state


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(config, dense state with random values everywhere, a local-spec checkpoint of it)."""
    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), SMALL)
    with native.single_process() as env:
        model = build_model(native.dense_config(cfg, "fp32"), env)
        generator = torch.Generator().manual_seed(0)
        state = {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()
                 if torch.is_tensor(v)}  # distinct norms too: a swapped pair would show
    path = str(tmp_path_factory.mktemp("local") / "iter_0000000")
    native.write_checkpoint(cfg, state, path)
    return cfg, state, path


def _write_with(monkeypatch, change, cfg, state, path) -> str:
    original = MTPGPTModel.sharded_state_dict
    monkeypatch.setattr(MTPGPTModel, "sharded_state_dict", lambda self, *a, **k: change(original(self, *a, **k)))
    native.write_checkpoint(cfg, state, path)
    monkeypatch.setattr(MTPGPTModel, "sharded_state_dict", original)
    return path


def _assert_same(read: dict, state: dict) -> None:
    assert read.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(read[key], tensor), key


def test_a_transformer_engine_checkpoint_reads_into_the_local_model(source, tmp_path, monkeypatch):
    cfg, state, _ = source
    path = _write_with(monkeypatch, _te_style, cfg, state, str(tmp_path / "iter_0000000"))
    saved = {value.key for value in load_sharded_metadata(path).values()}
    assert "mtp_heads.final_norm._extra_state" in saved  # an object the local model has no place for
    _, read = native.read_checkpoint(path)
    _assert_same(read, state)


def test_a_local_checkpoint_reads_into_a_model_with_more_extra_state(source, monkeypatch):
    """What a TE model asks a local (CPU-made, or converter-written) checkpoint for: TE's norm's extra state too,
    which the checkpoint does not have; the module keeps its own."""
    cfg, state, path = source
    original = MTPGPTModel.sharded_state_dict
    asked = []

    def with_te_norm_state(self, *args, **kwargs):
        sharded = original(self, *args, **kwargs)
        asked.append(True)
        return {**sharded, **make_sharded_tensors_for_checkpoint({"_extra_state": io.BytesIO()}, "mtp_heads.final_norm.")}

    monkeypatch.setattr(MTPGPTModel, "sharded_state_dict", with_te_norm_state)
    _, read = native.read_checkpoint(path)
    assert asked
    _assert_same(read, state)


def test_a_weight_the_model_does_not_have_is_an_error_not_skipped(source, tmp_path, monkeypatch):
    cfg, state, _ = source

    def with_a_stray_bias(sharded: dict) -> dict:
        bias = torch.zeros(cfg.model.hidden_size)
        sharded["mtp_heads.final_norm.bias"] = make_tp_sharded_tensor_for_checkpoint(bias, "mtp_heads.final_norm.bias")
        return _te_style(sharded)

    path = _write_with(monkeypatch, with_a_stray_bias, cfg, state, str(tmp_path / "iter_0000000"))
    with pytest.raises(CheckpointError, match=r"does not hold this model's weights:\n  - mtp_heads.final_norm.bias: "
                                              r"in the checkpoint, and nothing in this run loads it\nFix"):
        native.read_checkpoint(path)


def test_what_a_load_may_and_may_not_leave_out():
    from mtp_megatron.checkpoint.state import key_mismatches

    in_checkpoint = {"optimizer.state.exp_avg.embedding.word_embeddings.weight", "rng_state",
                     "mtp_heads.final_norm._extra_state"}
    assert key_mismatches(in_checkpoint, set(), optimizer_requested=False, rng_requested=False) == []
    assert key_mismatches(in_checkpoint, set(), optimizer_requested=True, rng_requested=True) == [
        "optimizer.state.exp_avg.embedding.word_embeddings.weight: in the checkpoint, and nothing in this run "
        "loads it", "rng_state: in the checkpoint, and nothing in this run loads it"]
    assert key_mismatches(set(), {"mtp_heads.final_norm._extra_state", "decoder.layers.mlp.linear_fc1.weight"},
                          optimizer_requested=False, rng_requested=False) == [
        "decoder.layers.mlp.linear_fc1.weight: this model's, and not in the checkpoint"]
