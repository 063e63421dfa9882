"""Decoding every head design (``mtp.head_type``): the KV-cached decoder computes the training model's per-head
logits (CP at rank > 1: its marginal log-probabilities), cached steps equal one forward, ``heads=1`` equals head 1
of the full forward, and speculative decoding gives exactly greedy's tokens. The transformer design is
test_decoding.py's. Untrained tiny models (fp32 weights): drafts are mostly rejected, which is fine, as the
output must be identical either way."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.convert import native
from mtp_megatron.inference.decoder import KVCache, MTPDecoder
from mtp_megatron.inference.decoding import greedy, speculative
from tests.inference.conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DESIGNS = {  # name -> overrides
    "linear": ["mtp.head_type=linear", "mtp.n_heads=3"],
    "causal": ["mtp.head_type=causal", "mtp.n_heads=3"],
    "anticausal": ["mtp.head_type=anticausal", "mtp.n_heads=4"],
    "cp2": ["mtp.head_type=cp", "mtp.cp_rank=2", "mtp.n_heads=4"],
    "cp1": ["mtp.head_type=cp", "mtp.cp_rank=1", "mtp.n_heads=3"],
    # 1000 real ids padded to 1024 rows: each factor's softmax runs over the padding rows too, as in training.
    "cp2_padded": ["mtp.head_type=cp", "mtp.cp_rank=2", "mtp.n_heads=3", "model.vocab_size=1000"],
}
PROMPT = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these forwards are tiny, and on shared cores more threads made them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(DESIGNS), ids=list(DESIGNS))
def design(request):
    """(name, cfg, fp32 dense dict, the training model's per-head logits [n, b, t, V] on PROMPT), one model build
    per design."""
    from mtp_megatron.model.builder import build_model

    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), TINY + DESIGNS[request.param])
    with native.single_process() as env, torch.no_grad():
        model = build_model(native.dense_config(cfg, "fp32"), env).eval()
        if request.param.startswith("cp2"):  # at init w is nearly uniform and the factors nearly alike: make both matter
            model.mtp_heads.cp_mixture.weight.mul_(30)
            for expand in model.mtp_heads.cp_expand:
                expand.weight.mul_(10)
        ours = model.head_logits(PROMPT, torch.arange(PROMPT.shape[1]).expand_as(PROMPT)).transpose(1, 2)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return request.param, cfg, dense, ours[..., : cfg.model.vocab_size].clone()


def test_decoder_computes_the_training_models_per_head_outputs(design):
    name, cfg, dense, ours = design
    decoded = MTPDecoder(cfg, dense).forward(PROMPT, KVCache())
    assert decoded.shape == (cfg.mtp.n_heads, *PROMPT.shape, cfg.model.vocab_size)
    worst = (decoded - ours).abs().max().item()
    assert worst < 1e-4, (name, worst)
    if name == "cp2":  # log-probabilities: each position's marginal sums to 1
        assert torch.allclose(decoded.exp().sum(-1), torch.ones(()), atol=1e-4)


def test_cached_steps_equal_one_forward(design):
    name, cfg, dense, _ = design
    decoder = MTPDecoder(cfg, dense, torch.float64)
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    whole = decoder.forward(tokens, KVCache())
    cache = KVCache()
    pieces = [decoder.forward(tokens[:, :5], cache), decoder.forward(tokens[:, 5:9], cache)]
    pieces += [decoder.forward(tokens[:, i:i + 1], cache) for i in range(9, 17)]
    assert torch.allclose(torch.cat(pieces, dim=2), whole, atol=1e-10, rtol=0), name
    trunk, n = cfg.trunk_num_layers(), cfg.mtp.n_heads
    head_layers = {"linear": 0, "causal": n, "anticausal": n}.get(name, 1)  # cp: the stacked layer
    assert len(cache.keys) == trunk + head_layers, name
    cache.crop(12)  # forget positions 12.. and recompute them
    assert torch.allclose(decoder.forward(tokens[:, 12:], cache), whole[:, :, 12:], atol=1e-10, rtol=0), name
    # Head 1 alone (plain next-token decoding), cached step by step, is head 1 of the full forward.
    cache = KVCache()
    first = [decoder.forward(tokens[:, :9], cache, heads=1)]
    first += [decoder.forward(tokens[:, i:i + 1], cache, heads=1) for i in range(9, 17)]
    first = torch.cat(first, dim=2)
    assert first.shape[0] == 1 and torch.allclose(first[0], whole[0], atol=1e-10, rtol=0), name
    alone = {"linear": 0, "causal": 1, "anticausal": n}.get(name, 1)  # anticausal: head 1 needs the whole chain
    assert len(cache.keys) == trunk + alone, name
    if name == "causal":  # a chain layer the cache was not filled for is refused, not read as zeros
        with pytest.raises(ValueError, match="fill one cache with one forward"):
            decoder.forward(tokens[:, :1], cache)
    with pytest.raises(ValueError, match=f"heads={n + 1}: give 1 to {n}"):
        decoder.forward(tokens[:, :1], KVCache(), heads=n + 1)


def test_heads_at_chosen_positions_equal_the_full_forward(design):
    """``MTPDecoder.step`` then ``DecoderStep.hidden`` at a few positions per row, of a range of heads, is the full
    forward there, logits included (CP's heads 2..n read their own expansion weights: ``logits(first=1)``)."""
    name, cfg, dense, _ = design
    decoder, n = MTPDecoder(cfg, dense, torch.float64), cfg.mtp.n_heads
    whole = decoder.forward(PROMPT, KVCache())  # [n, b, t, V]
    step = decoder.step(PROMPT, KVCache())
    positions = torch.tensor([[29, 3], [0, 17]])  # row r's tokens positions[r]
    rows = torch.arange(2)[:, None]
    for first, last in ((0, n), (0, 1), (1, n), (n - 1, n)):
        hidden = step.hidden(positions, first, last)
        assert hidden.shape == (last - first, 2, 2, cfg.model.hidden_size), (name, first, last)
        logits = decoder.logits(hidden, step.trunk_at(positions), first=first)
        assert torch.allclose(logits, whole[first:last, rows, positions], atol=1e-10, rtol=0), (name, first, last)
    assert torch.allclose(decoder.logits(step.hidden(), step.trunk), whole, atol=1e-10, rtol=0), name
    with pytest.raises(ValueError, match=f"heads 2..1: this forward serves heads 1..{n}"):
        step.hidden(positions, 1, 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_equals_greedy(design, batch):
    name, cfg, dense, _ = design
    decoder = MTPDecoder(cfg, dense, torch.float64)
    gen = torch.Generator().manual_seed(batch)
    for prompt_len, new in ((1, 1), (3, 7), (9, 25)):
        prompt = torch.randint(0, 256, (batch, prompt_len), generator=gen)
        plain, _ = greedy(decoder, prompt, new)
        fast, stats = speculative(decoder, prompt, new)
        assert torch.equal(fast, plain), (name, batch, prompt_len, new)
        assert stats.tokens_per_forward >= 1.0
    if batch > 1:
        # A longer run. This seed's anticausal greedy path falls into a repeated token, where its heads' drafts
        # agree: accepted drafts crop the chain's cache layers back by less than the block.
        prompt = torch.randint(0, 256, (batch, 9), generator=torch.Generator().manual_seed(3))
        plain, _ = greedy(decoder, prompt, 60)
        fast, stats = speculative(decoder, prompt, 60)
        assert torch.equal(fast, plain), (name, batch, 60)
        if name == "anticausal":
            assert sum(hit for hit, _ in stats.accepted) > 0, stats.accepted
        # Rows of different lengths, two decoding at once (the third joins when one leaves).
        lengths = [9, 2, 5][:batch]
        plain, _ = greedy(decoder, prompt, 20, prompt_lengths=lengths)
        fast, _ = speculative(decoder, prompt, 20, prompt_lengths=lengths, batch_size=2)
        assert torch.equal(fast, plain), (name, lengths)
        for row, length in enumerate(lengths):  # each row is what it decodes alone
            alone, _ = greedy(decoder, prompt[row:row + 1, :length], 20)
            assert torch.equal(plain[row], alone[0]), (name, row)


def test_unknown_design_or_missing_weights_are_named(design):
    name, cfg, dense, _ = design
    bogus = copy.deepcopy(cfg)
    bogus.mtp.head_type = "mixture"
    with pytest.raises(ValueError, match="mtp.head_type='mixture'"):
        MTPDecoder(bogus, dense)
    n = cfg.mtp.n_heads
    missing = {"linear": f"mtp_heads.layers.{n - 1}.weight", "cp2": f"mtp_heads.cp_expand.{n - 1}.weight",
               "cp2_padded": f"mtp_heads.cp_expand.{n - 1}.weight"}.get(name,
                                                                f"mtp_heads.layers.{n - 1}.mlp.linear_fc2.weight")
    with pytest.raises(ValueError, match=f"no '{missing}'.*head_type={cfg.mtp.head_type}"):
        MTPDecoder(cfg, {k: v for k, v in dense.items() if k != missing})
    if name == "cp2":
        with pytest.raises(ValueError, match="no 'mtp_heads.cp_mixture.weight'"):
            MTPDecoder(cfg, {k: v for k, v in dense.items() if k != "mtp_heads.cp_mixture.weight"})
    # Another design's weights: linear heads have no transformer layers, the others no linear maps.
    other = copy.deepcopy(cfg)
    other.mtp.head_type = "causal" if name == "linear" else "linear"
    key = "mtp_heads.layers.0.input_layernorm.weight" if name == "linear" else "mtp_heads.layers.0.weight"
    with pytest.raises(ValueError, match=f"no '{key}'"):
        MTPDecoder(other, dense)
