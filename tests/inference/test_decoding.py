"""Decoding: the KV-cached decoder computes our model's per-head logits, and self-speculative decoding with the
heads gives exactly plain greedy's tokens, on a model whose heads have learned something (so drafts are accepted)
and on an untrained one (so they are rejected)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.convert import native
from mtp_megatron.inference.decoder import KVCache, MTPDecoder
from mtp_megatron.inference.decoding import greedy, speculative
from tests.inference.conftest import TINY, periodic_documents

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def untrained():
    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), TINY)
    from mtp_megatron.model.builder import build_model

    with native.single_process() as env:
        model = build_model(native.dense_config(cfg, "fp32"), env)
        return cfg, {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_decoder_computes_our_models_per_head_logits(untrained):
    cfg, dense = untrained
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with native.dense_model(cfg, dense) as (model, _), torch.no_grad():
        ours = model.head_logits(tokens, torch.arange(30).expand_as(tokens)).transpose(1, 2)
    decoded = MTPDecoder(cfg, dense).forward(tokens, KVCache())
    assert decoded.shape == (4, 2, 30, cfg.model.vocab_size)
    assert torch.allclose(decoded, ours[..., : cfg.model.vocab_size], atol=1e-4, rtol=0)


def test_cached_steps_equal_one_forward(untrained):
    cfg, dense = untrained
    decoder = MTPDecoder(cfg, dense, torch.float64)
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    whole = decoder.forward(tokens, KVCache())
    cache = KVCache()
    pieces = [decoder.forward(tokens[:, :5], cache), decoder.forward(tokens[:, 5:9], cache)]
    pieces += [decoder.forward(tokens[:, i:i + 1], cache) for i in range(9, 17)]
    assert torch.allclose(torch.cat(pieces, dim=2), whole, atol=1e-10, rtol=0)
    cache.crop(12)  # forget positions 12.. and recompute them
    assert torch.allclose(decoder.forward(tokens[:, 12:], cache), whole[:, :, 12:], atol=1e-10, rtol=0)


def test_stacked_heads_run_only_where_asked(untrained):
    """After ``step`` has cached every head's keys and values, the heads' attention and MLP run at the positions
    asked for only: speculative decoding's prefill runs them at each prompt's last position (all it drafts from),
    so their cost does not grow with the prompt."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, dense = untrained
    decoder = MTPDecoder(cfg, dense, torch.float64)
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    step = decoder.step(tokens, KVCache())
    flops = []
    for positions in (torch.tensor([[19], [4], [11]]), None):  # one position per row, then all 20
        with FlopCounterMode(display=False) as counter:
            step.hidden(positions)
        flops.append(counter.get_total_flops())
    assert 0 < flops[0] and flops[1] == 20 * flops[0], flops
    heads_cost = []
    for length in (10, 20):  # the prefill, less its trunk and keys/values: its heads' layers and unembedding
        costs = []
        for run in (lambda: speculative(decoder, tokens[:, :length], 1), lambda: decoder.step(tokens[:, :length],
                                                                                             KVCache())):
            with FlopCounterMode(display=False) as counter:
                run()
            costs.append(counter.get_total_flops())
        heads_cost.append(costs[0] - costs[1])
    # Twice the prompt: nothing of it grows but the heads' one query per row attending over twice the keys (which
    # torch's counter does not count for the CPU attention kernel); at every position it would cost twice as much.
    assert 0 < heads_cost[0] <= heads_cost[1] < 1.1 * heads_cost[0], heads_cost


@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_equals_greedy(trained, untrained, batch):
    cfg, dense = native.read_checkpoint(trained)
    for name, (model_cfg, weights) in {"trained": (cfg, dense), "untrained": untrained}.items():
        decoder = MTPDecoder(model_cfg, weights, torch.float64)
        gen = torch.Generator().manual_seed(batch)
        per_forward = []
        for prompt_len, new in ((1, 1), (3, 7), (8, 30), (20, 45)):
            docs = periodic_documents(batch + prompt_len, 256)
            prompt = torch.tensor([d[:prompt_len] for d in docs[:batch]])
            if name == "untrained":
                prompt = torch.randint(0, 256, (batch, prompt_len), generator=gen)
            plain, plain_stats = greedy(decoder, prompt, new)
            fast, stats = speculative(decoder, prompt, new)
            assert torch.equal(fast, plain), (name, prompt_len, new)
            assert plain_stats.tokens_per_forward == pytest.approx(1.0)
            per_forward.append(stats.tokens_per_forward)
        if name == "trained":  # the heads learned the cycles: most drafts are accepted
            assert per_forward[-1] > 2.0, per_forward
            assert stats.acceptance()[0] > 0.5, stats.acceptance()



def test_speculative_with_one_head_is_greedy():
    """n=1 is a plain GPT: nothing to draft, so speculative decoding takes one token per forward and gives greedy's
    tokens, with rows joining and leaving (batch_size below the prompts)."""
    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), [*TINY, "mtp.n_heads=1"])
    from mtp_megatron.model.builder import build_model

    with native.single_process() as env:
        model = build_model(native.dense_config(cfg, "fp32"), env)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    decoder = MTPDecoder(cfg, dense, torch.float64)
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(2))
    plain, _ = greedy(decoder, prompt, 7)
    fast, stats = speculative(decoder, prompt, 7, batch_size=2)
    assert torch.equal(fast, plain)
    assert stats.tokens_per_forward == pytest.approx(1.0) and stats.accepted == []

def test_generate_cli_compares_and_reports(trained):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mtp_megatron.generate", "--checkpoint", trained, "--prompt",
                             "abcabcab", "--max-new-tokens", "24", "--compare"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["greedy/tokens_per_forward"] == pytest.approx(1.0)
    assert report["speculative/tokens_per_forward"] >= 1.0 and len(report["speculative/acceptance"]) == 3
    assert report["speedup"] > 0
