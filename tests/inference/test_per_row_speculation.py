"""Speculative decoding at batch > 1 accepts per row: each row takes the forwards it would take alone (the batch
runs as long as its slowest row, not at the pace of the row that rejects most), its output is its greedy output,
and the acceptance counts are the rows' own. Rows of different prompt lengths share one right-padded batch.

The model: the trained cycles model (conftest.py) blended with an untrained one, so that random prompts accept
different counts of drafts (a fully trained model accepts nearly every draft, an untrained one almost none)."""

from __future__ import annotations

import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.convert import native
from mtp_megatron.inference.decoder import KVCache, MTPDecoder
from mtp_megatron.inference.decoding import greedy, speculative
from tests.inference.conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENGTHS = [1, 4, 9, 16, 2, 7]  # one prompt per row
NEW_TOKENS = 30


@pytest.fixture(scope="module")
def half_trained(trained):
    """fp64 decoder of 0.3 x trained + 0.7 x untrained weights: drafts accepted sometimes, per prompt differently."""
    from mtp_megatron.model.builder import build_model

    cfg, dense = native.read_checkpoint(trained)
    with native.single_process() as env:
        model = build_model(native.dense_config(load_config(os.path.join(REPO, "configs/tiny.yaml"), TINY), "fp32"),
                            env)
        untrained = {k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    blended = {k: 0.3 * v + 0.7 * untrained[k] for k, v in dense.items()}
    return MTPDecoder(cfg, blended, torch.float64)


def _prompts(lengths: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, length), generator=gen) for length in lengths]


def _right_padded(prompts: list[torch.Tensor]) -> torch.Tensor:
    width = max(p.shape[1] for p in prompts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=0) for p in prompts])


def _alone(decoder, prompts):
    """Each prompt decoded at batch 1: greedy's tokens, and speculative decoding's stats."""
    return [(greedy(decoder, p, NEW_TOKENS)[0][0], speculative(decoder, p, NEW_TOKENS)[1]) for p in prompts]


def test_each_row_takes_the_forwards_it_takes_alone(half_trained):
    prompts = _prompts([9] * 6)  # one width: what decoding before per-row acceptance took too
    alone = _alone(half_trained, prompts)
    alone_forwards = [stats.forwards for _, stats in alone]
    assert len(set(alone_forwards)) > 2, alone_forwards  # the rows do accept differently
    out, stats = speculative(half_trained, torch.cat(prompts), NEW_TOKENS)
    assert torch.equal(out, torch.stack([tokens for tokens, _ in alone]))
    assert stats.row_forwards == alone_forwards
    assert stats.forwards == max(alone_forwards)  # the slowest row's count (min-over-rows acceptance: far more)
    per_row = sum(NEW_TOKENS for _ in alone) / sum(alone_forwards)
    assert stats.tokens_per_forward == pytest.approx(per_row, rel=1e-12)
    assert stats.accepted == [[sum(s.accepted[j][0] for _, s in alone), sum(s.accepted[j][1] for _, s in alone)]
                              for j in range(half_trained.n_heads - 1)]


def test_prompts_of_different_lengths_in_one_batch(half_trained):
    prompts = _prompts(LENGTHS)
    alone = _alone(half_trained, prompts)
    padded = _right_padded(prompts)
    out, stats = speculative(half_trained, padded, NEW_TOKENS, prompt_lengths=LENGTHS)
    plain, plain_stats = greedy(half_trained, padded, NEW_TOKENS, prompt_lengths=LENGTHS)
    reference = torch.stack([tokens for tokens, _ in alone])
    assert torch.equal(out, reference) and torch.equal(plain, reference)
    assert stats.row_forwards == [s.forwards for _, s in alone]
    assert plain_stats.forwards == NEW_TOKENS and plain_stats.tokens_per_forward == 1.0


def test_rows_of_different_lengths_in_one_forward_see_only_their_own_positions(half_trained):
    """The cache after a ragged prefill and per-row crops gives each row the logits of decoding it alone: the
    stale slots (padding, cropped positions) after a row's length change nothing."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (3, 12), generator=gen)
    cache = KVCache()
    half_trained.forward(tokens[:, :10], cache)
    cache.crop([3, 10, 6])
    ragged = half_trained.forward(tokens[:, 10:], cache)  # row r's two new tokens at positions lengths[r], +1
    assert cache.lengths == [5, 12, 8]
    for row, length in enumerate([3, 10, 6]):
        sequence = torch.cat([tokens[row, :length], tokens[row, 10:]])[None]
        expected = half_trained.forward(sequence, KVCache())[:, :, length:]
        assert torch.allclose(ragged[:, row: row + 1], expected, atol=1e-10, rtol=0), row


def test_prompt_lengths_must_fit_the_padded_prompt(half_trained):
    padded = _right_padded(_prompts([2, 5]))
    for bad in ([2], [0, 5], [2, 6]):
        with pytest.raises(ValueError, match="prompt_lengths .*one per prompt row \\(2\\), each from 1 to"):
            speculative(half_trained, padded, 4, prompt_lengths=bad)


def test_waiting_prompts_join_as_rows_finish(half_trained):
    """``batch_size`` rows at once: a waiting prompt is prefilled and joins the running batch (its cache appended
    with ``KVCache.extend``) as soon as a row leaves. Every row still decodes exactly as alone, and the batch takes
    fewer forwards than running the prompts in chunks of ``batch_size``, each chunk as long as its slowest row."""
    prompts = _prompts([1, 4, 9, 16, 2, 7, 5, 3])
    alone = _alone(half_trained, prompts)
    out, stats = speculative(half_trained, _right_padded(prompts), NEW_TOKENS,
                             prompt_lengths=[p.shape[1] for p in prompts], batch_size=3)
    assert torch.equal(out, torch.stack([tokens for tokens, _ in alone]))
    assert stats.row_forwards == [s.forwards for _, s in alone]
    chunked = sum(max(s.forwards for _, s in alone[i: i + 3]) for i in range(0, len(alone), 3))
    assert stats.forwards < chunked, (stats.forwards, chunked)
    first, _ = speculative(half_trained, _right_padded(prompts), 1, prompt_lengths=[p.shape[1] for p in prompts],
                           batch_size=3)  # rows that finish at their prompt's forward: prefilled ones still join
    assert torch.equal(first, out[:, :1])
    with pytest.raises(ValueError, match="batch_size 0: give at least 1 row"):
        speculative(half_trained, prompts[0], 4, batch_size=0)


def test_greedy_runs_head_one_alone(trained):
    """Plain decoding is the baseline speculation must beat: it does the FLOPs of the same model with n=1 (trunk,
    head 1, one unembedding), not all n heads', and gives the same tokens."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    cfg, dense = native.read_checkpoint(trained)
    one_head = copy.deepcopy(cfg)
    one_head.mtp.n_heads = 1
    decoders = [MTPDecoder(c, dense, torch.float64) for c in (cfg, one_head)]
    prompt = _prompts([9])[0]
    flops, tokens = [], []
    for decoder in decoders:
        with FlopCounterMode(display=False) as counter:
            tokens.append(greedy(decoder, prompt, 8)[0])
        flops.append(counter.get_total_flops())
    assert torch.equal(tokens[0], tokens[1])
    assert flops[0] == flops[1] > 0, flops
    cache_all, cache_one = KVCache(), KVCache()
    everything = decoders[0].forward(prompt, cache_all)
    assert torch.allclose(decoders[0].forward(prompt, cache_one, heads=1), everything[:1], atol=1e-12, rtol=0)
