"""tools/convert_checkpoint.py: our checkpoints <-> Hugging Face Llama (+ heads), Meta's MTP format -> ours.

The source checkpoint is a real one: configs/tiny.yaml with grouped-query attention, n=4 heads, trained a few
steps at TP2 x PP2 (so the conversion has to reshard it), fp32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.convert import hf, meta, native
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py")]


def _train_tp2_pp2(run_dir: str) -> None:
    train(load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "parallel.tp=2", "parallel.pp=2", "model.num_query_groups=2", "train.iters=3", "model.seq_length=64",
        f"run.dir={run_dir}", "logging.tensorboard=false"]))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("source") / "run")
    run_distributed(_train_tp2_pp2, 4, run_dir)
    return f"{run_dir}/checkpoints/iter_0000003"


def _convert_process(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CONVERT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _convert(*args: str) -> subprocess.CompletedProcess:
    """The command's ``main`` in this process (no second megatron-core import); stdout and stderr captured."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("convert_checkpoint", CONVERT[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def hf_folder(source, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hf") / "model")
    result = _convert_process("--input", source, "--output", out, "--to", "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _tokens(vocab: int, batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def our_head_logits(cfg, dense: dict, tokens: torch.Tensor) -> torch.Tensor:
    """[n, b, s, V] from our model (TP1 x PP1) holding ``dense``."""
    with native.dense_model(cfg, dense) as (model, _), torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model.head_logits(tokens, positions).transpose(1, 2).float()


def test_round_trip_is_bitwise(source, hf_folder, tmp_path):
    cfg, original = native.read_checkpoint(source)
    llama, heads, hf_config, heads_meta = hf.read_folder(hf_folder)
    back = hf.from_llama(hf.config_for_folder(hf_config, heads_meta, None), llama, heads)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    # ... and on into our format at another layout, and read again.
    result = _convert("--input", hf_folder, "--output", str(tmp_path / "tp1"), "--to", "megatron")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg2, again = native.read_checkpoint(str(tmp_path / "tp1"))
    assert all(torch.equal(again[k], original[k]) for k in original)
    assert cfg2.mtp == cfg.mtp and cfg2.model.vocab_size == cfg.model.vocab_size


def test_transformers_loads_the_folder_and_gives_our_logits(source, hf_folder):
    from transformers import LlamaForCausalLM

    from mtp_megatron.convert.hf_heads import LlamaMTPHeads

    cfg, dense = native.read_checkpoint(source)
    tokens = _tokens(cfg.model.vocab_size)
    ours = our_head_logits(cfg, dense, tokens)

    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        next_token = model(input_ids=tokens).logits
    assert next_token.shape == ours[0].shape
    assert torch.allclose(next_token, ours[0], atol=1e-4, rtol=0), (next_token - ours[0]).abs().max()
    heads = LlamaMTPHeads.from_pretrained(hf_folder, model)
    theirs = heads(tokens)
    assert theirs.shape == ours.shape == (4, *next_token.shape)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().amax(dim=(1, 2, 3))
    assert not torch.allclose(ours[1], ours[0], atol=1e-2)  # the heads differ: each was really loaded


def test_tp2_pp2_to_hf_to_tp1_pp1_gives_the_same_losses(source, hf_folder, tmp_path):
    """Per-head losses of the TP2 x PP2 checkpoint (resharded to TP1 on load) and of its conversion through
    Hugging Face into a TP1 x PP1 checkpoint, on the same tokens."""
    assert _convert("--input", hf_folder, "--output", str(tmp_path / "back"), "--to", "megatron").returncode == 0
    losses = []
    for path in (source, str(tmp_path / "back")):
        cfg, dense = native.read_checkpoint(path)
        tokens = _tokens(cfg.model.vocab_size, seq=40, seed=1)
        logits = our_head_logits(cfg, dense, tokens[:, :-4])
        losses.append([torch.nn.functional.cross_entropy(logits[k, :, : 36 - k].flatten(0, 1),
                                                         tokens[:, k + 1: 37].flatten()).item() for k in range(4)])
    assert all(math.isfinite(x) for x in losses[0])
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_hf_llama_becomes_an_n_head_model_with_heads_from_the_last_layer(hf_folder, tmp_path):
    """A plain Llama folder (no mtp_heads files) with --n-heads 3: heads 2 and 3 start as copies of head 1."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in os.listdir(hf_folder):
        if not name.startswith("mtp_heads"):
            os.link(os.path.join(hf_folder, name), plain / name)
    out = tmp_path / "ours"
    result = _convert("--input", str(plain), "--output", str(out), "--to", "megatron", "--n-heads", "3",
                      "--target-tp", "2", "--target-pp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg, dense = native.read_checkpoint(str(out))
    assert cfg.mtp.n_heads == 3 and (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    for key in [k for k in dense if k.startswith("mtp_heads.layers.0.")]:
        for head in (1, 2):
            assert torch.equal(dense[key.replace("layers.0.", f"layers.{head}.")], dense[key])


# -- Meta's format ------------------------------------------------------------------------------------------------

META_PARAMS = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96, "multiple_of": 32,
               "norm_eps": 1e-5, "rope_theta": 10000.0, "n_future_tokens": 3}


def _meta_checkpoint(folder) -> dict:
    """Random weights under Meta's key names and shapes (facebook/multi-token-prediction's Llama code)."""
    p, gen = META_PARAMS, torch.Generator().manual_seed(3)
    d, hd = p["dim"], p["dim"] // p["n_heads"]
    ffn = 192

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    def layer(prefix):
        return {f"{prefix}attention.wq.weight": w(p["n_heads"] * hd, d),
                f"{prefix}attention.wk.weight": w(p["n_kv_heads"] * hd, d),
                f"{prefix}attention.wv.weight": w(p["n_kv_heads"] * hd, d),
                f"{prefix}attention.wo.weight": w(d, p["n_heads"] * hd),
                f"{prefix}feed_forward.w1.weight": w(ffn, d), f"{prefix}feed_forward.w2.weight": w(d, ffn),
                f"{prefix}feed_forward.w3.weight": w(ffn, d),
                f"{prefix}attention_norm.weight": 1 + w(d), f"{prefix}ffn_norm.weight": 1 + w(d)}

    state = {"tok_embeddings.weight": w(p["vocab_size"], d), "norm.weight": 1 + w(d),
             "output.weight": w(p["vocab_size"], d)}
    for i in range(p["n_layers"]):
        state.update(layer(f"layers.{i}."))
    for k in range(p["n_future_tokens"] - 1):
        state.update(layer(f"extra_heads.{k}."))
    folder.mkdir()
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(p))
    return state


def meta_forward(state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's forward, written from that code: complex rotary on adjacent pairs, trunk = layers[:-1], heads =
    [layers[-1], *extra_heads] on the trunk output, shared norm and output. [n, b, s, V]."""
    p = META_PARAMS
    hd, n_rep = p["dim"] // p["n_heads"], p["n_heads"] // p["n_kv_heads"]
    seq = tokens.shape[1]
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs_cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["norm_eps"]) * weight

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def block(x, prefix):
        b = x.shape[0]
        h = norm(x, state[prefix + "attention_norm.weight"])
        q = (h @ state[prefix + "attention.wq.weight"].T).view(b, seq, p["n_heads"], hd)
        k = (h @ state[prefix + "attention.wk.weight"].T).view(b, seq, p["n_kv_heads"], hd)
        v = (h @ state[prefix + "attention.wv.weight"].T).view(b, seq, p["n_kv_heads"], hd)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores + torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, seq, -1)
        x = x + attn @ state[prefix + "attention.wo.weight"].T
        h = norm(x, state[prefix + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ state[prefix + "feed_forward.w1.weight"].T)
        return x + (gate * (h @ state[prefix + "feed_forward.w3.weight"].T)) @ state[prefix + "feed_forward.w2.weight"].T

    x = state["tok_embeddings.weight"][tokens]
    for i in range(p["n_layers"] - 1):
        x = block(x, f"layers.{i}.")
    heads = [f"layers.{p['n_layers'] - 1}."] + [f"extra_heads.{k}." for k in range(p["n_future_tokens"] - 1)]
    return torch.stack([norm(block(x, prefix), state["norm.weight"]) @ state["output.weight"].T for prefix in heads])


def test_meta_format_converts_to_the_same_per_head_logits(tmp_path):
    state = _meta_checkpoint(tmp_path / "meta")
    cfg, dense = meta.read_meta_folder(str(tmp_path / "meta"), seq_length=32)
    assert (cfg.mtp.n_heads, cfg.trunk_num_layers(), cfg.model.num_query_groups) == (3, 2, 2)
    tokens = _tokens(META_PARAMS["vocab_size"], seq=20, seed=2)
    with torch.no_grad():
        expected = meta_forward(state, tokens)
    ours = our_head_logits(cfg, dense, tokens)[..., : META_PARAMS["vocab_size"]]
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().amax(dim=(1, 2, 3))
    # The CLI writes it as our checkpoint.
    result = _convert("--input", str(tmp_path / "meta"), "--output", str(tmp_path / "ours"), "--to", "megatron",
                      "--seq-length", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    _, written = native.read_checkpoint(str(tmp_path / "ours"))
    assert all(torch.equal(written[k][: v.shape[0]], v) for k, v in dense.items())


def test_bad_inputs_are_named(tmp_path, source):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _convert("--input", str(empty), "--output", str(tmp_path / "x"), "--to", "hf")
    assert result.returncode == 2 and "none of the formats" in result.stderr
    result = _convert("--input", source, "--output", str(empty), "--to", "hf")
    assert result.returncode == 2 and "exists" in result.stderr
    result = _convert("--input", source, "--output", str(tmp_path / "y"), "--to", "megatron", "--target-tp", "3")
    assert result.returncode == 2 and "cannot be split over parallel.tp=3" in result.stderr
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.tmp").exists()


def _train_each_sharding(tmp: str) -> None:
    for sharding in ("none", "zero3"):
        train(load_config(os.path.join(REPO, "configs/tiny.yaml"), [
            f"parallel.sharding={sharding}", "train.iters=2", "model.seq_length=64", f"run.dir={tmp}/{sharding}",
            "logging.tensorboard=false"]))


def test_deepspeed_checkpoints_read_like_megatron_ones(tmp_path):
    """The same training under plain DDP and DeepSpeed ZeRO-3 (which partitions the parameters) at DP=2: the
    converter reads the same model from both checkpoints. Compared by the per-head logits: Adam turns float
    rounding in near-zero gradients into updates of up to the learning rate, element by element."""
    run_distributed(_train_each_sharding, 2, str(tmp_path))
    cfg, ddp = native.read_checkpoint(f"{tmp_path}/none/checkpoints/iter_0000002")
    _, zero3 = native.read_checkpoint(f"{tmp_path}/zero3/checkpoints/iter_0000002")
    assert ddp.keys() == zero3.keys()
    assert max((zero3[k] - ddp[k]).abs().max().item() for k in ddp) < 1e-2  # at most a couple of updates' size
    tokens = _tokens(cfg.model.vocab_size)
    a, b = our_head_logits(cfg, ddp, tokens), our_head_logits(cfg, zero3, tokens)
    assert torch.allclose(a, b, atol=1e-3, rtol=0), (a - b).abs().max()
    assert not torch.allclose(a[1], a[2], atol=1e-2)
