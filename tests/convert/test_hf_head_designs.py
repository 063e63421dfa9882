"""Every head design (``mtp.head_type``) through the Hugging Face export: ours -> folder -> ours is exact, tensor for
tensor; ``LlamaMTPHeads`` gives our per-head outputs (logits; the marginal log-probabilities for cp rank > 1) in
fp32 within 1e-4; and a plain ``LlamaForCausalLM.from_pretrained(folder)`` either gives our next-token logits or
does not load (linear, cp rank > 1: no Llama computes their head 1), never something else.

A tiny model per design (2 trunk layers, n=3 heads, hidden 64, grouped-query attention, the byte tokenizer's 259
ids padded to 384 rows), random weights larger than the initialisation so that the heads differ and the cp mixture
weights are far from uniform.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtp_megatron.convert import hf, native
from tests.convert.test_convert import REPO, _convert, our_head_logits

N = 3
VOCAB = 259  # the byte tokenizer's ids; 384 rows
DESIGNS = {
    "transformer": ["mtp.head_type=transformer"],
    "linear": ["mtp.head_type=linear"],
    "causal": ["mtp.head_type=causal"],
    "anticausal": ["mtp.head_type=anticausal"],
    "cp1": ["mtp.head_type=cp", "mtp.cp_rank=1"],
    "cp2": ["mtp.head_type=cp", "mtp.cp_rank=2"],
}
NOT_A_LLAMA = ("linear", "cp2")  # next-token logits are no Llama's: the folder must not load as one


def _model(design: str):
    """(config, dense state) of a tiny model of ``design``, random weights (std 0.1, norms around 1)."""
    from mtp_megatron.model.builder import build_model
    from mtp_megatron.train import load_run_config

    cfg = load_run_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "model.num_layers=3", "model.num_query_groups=2", "model.seq_length=64", "model.vocab_size=null",
        f"mtp.n_heads={N}", "logging.tensorboard=false", *DESIGNS[design]])
    with native.single_process() as env:
        model = build_model(native.dense_config(cfg, "fp32"), env)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    gen = torch.Generator().manual_seed(7)
    for key, value in dense.items():
        noise = 0.1 * torch.randn(value.shape, generator=gen)
        dense[key] = 1 + noise if "norm" in key else noise
    return cfg, dense


@pytest.fixture(scope="module", params=list(DESIGNS))
def exported(request, tmp_path_factory):
    """(design, config, dense state, Hugging Face folder written by convert/hf.py, our per-head outputs)."""
    cfg, dense = _model(request.param)
    folder = str(tmp_path_factory.mktemp(f"hf_{request.param}") / "hf")
    hf.write_folder(cfg, dense, folder)
    return request.param, cfg, dense, folder, our_head_logits(cfg, dense, _tokens())


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(11))


def _meta(folder: str) -> dict:
    with open(os.path.join(folder, hf.HEADS_CONFIG)) as f:
        return json.load(f)


def test_round_trip_is_exact(exported):
    design, cfg, dense, folder, _ = exported
    meta = _meta(folder)
    assert (meta["head_type"], meta["cp_rank"], meta["n_heads"]) == (
        cfg.mtp.head_type, cfg.mtp.cp_rank if cfg.mtp.head_type == "cp" else None, N)
    llama, heads, hf_config, meta = hf.read_folder(folder)
    back_cfg = hf.config_for_folder(hf_config, meta, None)
    back = hf.from_llama(back_cfg, llama, heads)
    assert back.keys() == dense.keys()
    assert [k for k in dense if not torch.equal(back[k], dense[k])] == []
    assert back_cfg.mtp == cfg.mtp
    # Our decoder (generate.py) reads the folder as the model it is.
    from mtp_megatron.inference.decoder import KVCache, MTPDecoder

    cfg_read, dense_read = hf.read_llama(folder)
    decoded = MTPDecoder(cfg_read, dense_read).forward(_tokens(), KVCache())
    assert torch.equal(decoded, MTPDecoder(cfg, dense).forward(_tokens(), KVCache()))
    if design != "cp2":  # the decoder's cp marginals are normalised over the real ids only, ours over all rows
        ours = exported[4][..., :VOCAB]
        assert torch.allclose(decoded, ours, atol=1e-4, rtol=0), (decoded - ours).abs().max()
    # Every tensor of the folder is one of ours, once: nothing is stored twice or left over.
    stored = sum(t.numel() for t in llama.values()) + sum(t.numel() for t in (heads or {}).values())
    assert stored == sum(t.numel() for t in dense.values())


def test_cli_round_trip_through_hugging_face_is_exact(exported, tmp_path):
    """Our checkpoint -> tools/convert_checkpoint.py --to hf -> --to megatron -> our checkpoint, per design."""
    design, cfg, dense, _, _ = exported
    native.write_checkpoint(cfg, dense, str(tmp_path / "ours"))
    for source, out, to in (("ours", "hf", "hf"), ("hf", "back", "megatron")):
        result = _convert("--input", str(tmp_path / source), "--output", str(tmp_path / out), "--to", to)
        assert result.returncode == 0, result.stderr[-3000:]
    back_cfg, back = native.read_checkpoint(str(tmp_path / "back"))
    assert back.keys() == dense.keys()
    assert [k for k in dense if not torch.equal(back[k], dense[k])] == []
    assert back_cfg.mtp == cfg.mtp


def test_llama_mtp_heads_give_our_per_head_outputs(exported):
    from mtp_megatron.convert.hf_heads import LlamaMTPHeads

    design, cfg, _, folder, ours = exported
    heads = LlamaMTPHeads.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    tokens = _tokens()
    theirs = heads(tokens)
    assert theirs.shape == ours.shape == (N, 2, 20, 384)
    worst = (theirs - ours).abs().amax(dim=(1, 2, 3))
    print(f"{design}: max |LlamaMTPHeads - ours| per head {worst.tolist()}")
    assert (worst < 1e-4).all(), worst
    next_token = heads.next_token_logits(tokens)
    assert torch.allclose(next_token, theirs[0], atol=1e-5, rtol=0)
    for k in range(1, N):  # each head really is its own
        assert not torch.allclose(ours[k], ours[0], atol=1e-2)
    if design == "cp2":  # marginal log-probabilities
        assert torch.allclose(ours.logsumexp(-1), torch.zeros(()), atol=1e-4)


@pytest.mark.parametrize("loader", ["LlamaForCausalLM", "AutoModelForCausalLM"])
def test_a_plain_llama_load_is_right_or_fails(exported, loader):
    """A plain transformers load of the folder gives our head-1 logits (transformer, causal, anticausal, cp rank 1)
    or raises (linear, cp rank > 1), never other logits."""
    import transformers

    design, cfg, _, folder, ours = exported
    load = getattr(transformers, loader).from_pretrained
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if design in NOT_A_LLAMA:
        assert config["architectures"] == [hf.HF_CLASS] and config["num_hidden_layers"] == cfg.trunk_num_layers()
        assert not os.path.exists(os.path.join(folder, "model.safetensors"))
        with pytest.raises(OSError, match="model.safetensors"):
            load(folder, dtype=torch.float32)
        return
    model = load(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=_tokens()).logits
    assert torch.allclose(logits, ours[0], atol=1e-4, rtol=0), (logits - ours[0]).abs().max()


def test_the_trunk_alone_would_be_wrong_and_loses_nothing_silently(exported, tmp_path):
    """For linear and cp rank > 1 the folder's Llama is the trunk: its own logits are no head's (what a loader that
    found its weights would serve). Without mtp_heads.json our loaders refuse the folder, naming why."""
    from mtp_megatron.convert.hf_heads import load_llama

    design, cfg, _, folder, ours = exported
    if design not in NOT_A_LLAMA:
        pytest.skip("the folder is a plain Llama computing head 1")
    trunk = load_llama(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = trunk(input_ids=_tokens()).logits
    assert (logits - ours[0]).abs().max() > 1e-2
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for name in os.listdir(folder):
        if name != hf.HEADS_CONFIG:
            os.link(os.path.join(folder, name), stripped / name)
    with pytest.raises(ValueError, match="names LlamaMTPHeads"):
        hf.read_folder(str(stripped))


def test_heads_of_dependent_designs_cannot_be_renumbered(exported):
    design, cfg, _, folder, _ = exported
    llama, heads, hf_config, meta = hf.read_folder(folder)
    if hf.layout_of(cfg) == hf.LLAMA:  # transformer, causal, cp rank 1: extra heads start as copies of head 1
        grown = hf.from_llama(hf.config_for_folder(hf_config, meta, N + 1), llama, heads)
        assert all(torch.equal(grown[k.replace("layers.0.", f"layers.{N}.")], v)
                   for k, v in grown.items() if k.startswith("mtp_heads.layers.0."))
        return
    with pytest.raises(ValueError, match="--n-heads 4"):
        hf.config_for_folder(hf_config, meta, N + 1)
