"""The head designs (model/heads/): linear, causal, anticausal and the rank-r CP mixture.

* The sequential backward gives the naive order's gradients and statistics for every design, under TP, PP, DP
  (distributed optimizer) and sequence parallelism, with the training step's global normalisers and loss weights.
* CP at rank 1 is the transformer design (same weights, same gradients once the normalisers are matched).
* The CP mixture's joint distribution, enumerated on a tiny vocabulary, sums to 1 and its loss is the module's.
* The CP load-balance term moves the mean component weights toward uniform.
* The heads' loss weights: a weight of 0 removes a head's gradient, 2 doubles it; the weight schedule and its
  validation.

Everything distributed runs in one spawn of two ranks (``_world2_results``, shared by the tests through a module
fixture): each spawn costs seconds on a small machine.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from megatron.core import parallel_state

from mtp_megatron.config import load_config
from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.schema import MTPConfig
from mtp_megatron.distributed.parallel import init_distributed
from mtp_megatron.engines.step import loss_weights_at, reduce_head_stats, run_forward_backward, with_head_weights
from mtp_megatron.model.builder import build_model
from mtp_megatron.model.heads import HeadInputs
from mtp_megatron.model.targets import head_target_counts, shift_targets
from mtp_megatron.testing.batches import random_microbatches
from mtp_megatron.testing.distributed import run_distributed
from tests.model.test_sequential_backward import _case_overrides, scheduled_model

GRAD_RTOL = 1e-5
STATS_RTOL = 1e-6
LOSS_SCALE = 1024.0
WORLD = 2
TINY = ("model.num_layers=3",)  # a 2-layer trunk (num_layers counts head 1): short, and splits over PP=2
CHUNK = ("mtp.loss_chunk_size=8",)  # smaller than seq_length=32: four chunks per head
CP2, CP1 = ("mtp.head_type=cp", "mtp.cp_rank=2"), ("mtp.head_type=cp", "mtp.cp_rank=1")


# ---------------------------------------------------------------------------------------------- helpers (per rank)

def _run(overrides: list[str], sequential: bool, loss_weights=None, masked_fraction: float = 0.1) -> dict:
    """A fresh model (same seed, same weights) under megatron DDP; one training step's forward-backward with the
    step's global normalisers and ``loss_weights`` (as ``Engine.train_step`` feeds them), no update."""
    cfg = load_config(None, [*overrides, f"mtp.sequential_backward={str(sequential).lower()}"])
    model, env = scheduled_model(cfg, LOSS_SCALE)
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    batches = random_microbatches(num_microbatches, cfg.train.micro_batch_size, cfg.model.seq_length,
                                  cfg.model.vocab_size, seed=100 + env.dp_rank, masked_fraction=masked_fraction)
    counts = sum(head_target_counts(b["labels"], b["loss_mask"], cfg.mtp.n_heads) for b in batches)
    torch.distributed.all_reduce(counts, group=env.groups.dp)
    data = with_head_weights(iter(batches), num_microbatches, cfg.mtp.n_heads, None, env, loss_weights)
    model.zero_grad_buffer()
    losses = run_forward_backward([model], data, num_microbatches, cfg, forward_only=False)
    result = reduce_head_stats(losses, cfg.mtp, env, loss_weights)
    out = {
        "grads": {name: p.main_grad.detach().clone() for name, p in model.named_parameters()},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "stats": result.stats, "result": result, "counts": counts,
        "has_heads": env.is_last_stage,
    }
    parallel_state.destroy_model_parallel()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (0 when both are 0)."""
    denom = b.norm()
    return 0.0 if denom == 0 and a.norm() == 0 else ((a - b).norm() / denom.clamp(min=1e-30)).item()


def _compare_orders(case: tuple) -> dict:
    """One design and layout: sequential vs naive, every parameter's gradient and the statistics."""
    tp, pp, n, sharding, extra, weights = case
    overrides = _case_overrides(tp, pp, n, sharding, WORLD, (*TINY, *extra))
    naive = _run(overrides, sequential=False, loss_weights=weights)
    seq = _run(overrides, sequential=True, loss_weights=weights)
    return {
        "case": case,
        "grad_errors": {name: _rel(seq["grads"][name], g) for name, g in naive["grads"].items()},
        "zero_grads": [name for name, g in naive["grads"].items() if g.norm() == 0],
        "stats_error": ((seq["stats"] - naive["stats"]).abs().max() / naive["stats"].abs().max()).item(),
        "shapes": {name: tuple(w.shape) for name, w in naive["weights"].items()},
        "has_heads": naive["has_heads"],
        "extras": naive["result"].extras,
    }


def _cp1_vs_transformer() -> dict:
    """CP rank 1 against the transformer design whose loss weights are N_s / N_1 (TP2, n=4, chunked), both orders.
    No masked positions: CP counts a position where head 1 has a target, the transformer design counts each head
    where it has one, which agree when only the sequence's tail is missing (head s: its last s-1 positions)."""
    base = _case_overrides(2, 1, 4, "none", WORLD, (*TINY, *CHUNK))
    out = {}
    for sequential in (False, True):
        cp = _run([*base, *CP1], sequential, masked_fraction=0.0)
        counts = cp["counts"]
        weights = (counts / counts[0]).tolist()
        tf = _run(base, sequential, loss_weights=weights, masked_fraction=0.0)
        out[sequential] = {
            "weights_equal": all(torch.equal(cp["weights"][k], tf["weights"][k]) for k in tf["weights"])
                             and cp["weights"].keys() == tf["weights"].keys(),
            "grad_errors": {k: _rel(cp["grads"][k], g) for k, g in tf["grads"].items()},
            "zero_grads": [k for k, g in tf["grads"].items() if g.norm() == 0],
            "cp_stats": cp["stats"], "tf_stats": tf["stats"],
            "cp_loss": cp["result"].loss, "tf_loss": tf["result"].loss, "loss_weights": weights,
        }
    return out


def _loss_weight_runs() -> dict:
    """n=4 under TP2: transformer unweighted, [1, 0, 1, 1] and [1, 2, 1, 1] (sequential); causal unweighted and
    [1, 0, 1, 1] in both orders."""
    base = _case_overrides(2, 1, 4, "none", WORLD, (*TINY, *CHUNK))
    keep = lambda r: {"grads": r["grads"], "head_loss": r["result"].head_loss, "loss": r["result"].loss,
                      "loss_weights": r["result"].loss_weights}
    out = {}
    for name, overrides in (("transformer", base), ("causal", [*base, "mtp.head_type=causal"])):
        out[name, None, True] = keep(_run(overrides, True))
        out[name, (1, 0, 1, 1), True] = keep(_run(overrides, True, [1.0, 0.0, 1.0, 1.0]))
    out["transformer", (1, 2, 1, 1), True] = keep(_run(base, True, [1.0, 2.0, 1.0, 1.0]))
    out["causal", (1, 0, 1, 1), False] = keep(_run([*base, "mtp.head_type=causal"], False, [1.0, 0.0, 1.0, 1.0]))
    return out


def _single_stage_model(overrides: list[str]):
    cfg = load_config(None, overrides)
    env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
    return cfg, env, build_model(cfg, env)


def _cp_joint_enumeration() -> dict:
    """n=2, vocabulary 11 (no padding rows), rank 3, no balance term: the joint distribution of (x_{t+1}, x_{t+2})
    from the module's pieces against the module's own loss and statistics (one microbatch, evaluation
    normalisation: the mixture's loss summed over head 1's positions over their count)."""
    overrides = _case_overrides(1, 1, 2, "none", WORLD, (
        *TINY, *CP2, "mtp.cp_rank=3", "mtp.cp_balance_coef=0", "model.vocab_size=11",
        "model.make_vocab_size_divisible_by=1", "model.seq_length=8", "mtp.sequential_backward=false",
        "mtp.loss_chunk_size=0"))
    cfg, env, model = _single_stage_model(overrides)
    vocab = cfg.model.padded_vocab_size(cfg.parallel.tp)
    batch = random_microbatches(1, 2, cfg.model.seq_length, 11, seed=5, masked_fraction=0.0)[0]
    loss, stats = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                        loss_mask=batch["loss_mask"])
    heads = model.mtp_heads
    with torch.no_grad():
        decoder_input, rotary, *_ = model._preprocess(input_ids=batch["tokens"], position_ids=batch["position_ids"])
        z = model.decoder(hidden_states=decoder_input, attention_mask=batch["attention_mask"], rotary_pos_emb=rotary)
        labels, masks = shift_targets(batch["labels"], batch["loss_mask"], 2)
        inputs = HeadInputs(labels, masks, batch["attention_mask"], rotary)
        hidden = heads.hidden_states([0, 1], z, inputs)
        w = heads.log_weights(hidden).exp().double()  # [s, b, r]
        probs = [torch.stack([torch.softmax(heads.unembed(f).double(), -1) for f in heads.factor_states(s, hidden[s])],
                             dim=-2) for s in range(2)]  # [s, b, r, V]
        joint = torch.einsum("tba,tbav,tbaw->tbvw", w, probs[0], probs[1])  # P(x1 = v, x2 = w) at each position
        y1, y2 = labels[0].t(), labels[1].t()  # [s, b]
        has2 = masks[1].t().bool()
        pair = joint.gather(2, y1[..., None, None].expand(-1, -1, 1, vocab)).squeeze(2)  # P(y1, x2) [s, b, V]
        marginal1 = pair.sum(-1)  # P(y1)
        p_targets = torch.where(has2, pair.gather(-1, y2[..., None]).squeeze(-1), marginal1)
        mix1 = (w * probs[0].gather(-1, y1[..., None, None].expand(-1, -1, w.size(-1), 1)).squeeze(-1)).sum(-1)
        marginal2 = joint.sum(2).gather(-1, y2[..., None]).squeeze(-1)  # P(x2 = y2)
        mix2 = (w * probs[1].gather(-1, y2[..., None, None].expand(-1, -1, w.size(-1), 1)).squeeze(-1)).sum(-1)
    n1 = masks[0].sum().double()
    out = {
        "vocab": vocab, "positions": tuple(joint.shape[:2]),
        "total_error": (joint.sum((-2, -1)) - 1).abs().max().item(),
        "expected_loss": (-p_targets.log().sum() / n1).item(), "loss": loss.item(),
        "expected_joint_sum": (-p_targets.log().sum()).item(), "joint_row": stats[2].tolist(),
        "expected_head1_sum": (-marginal1.log().sum()).item(), "head1_row": stats[0].tolist(),
        "expected_head2_sum": (-(marginal2.log() * has2).sum()).item(), "head2_row": stats[1].tolist(),
        "marginal_vs_mixture": max((marginal1 - mix1).abs().max().item(), (marginal2 - mix2).abs().max().item()),
        "last_position_has_head2": bool(has2[-1].any()),
        "last_position_marginal_error": (p_targets[-1] - marginal1[-1]).abs().max().item(),
        "head_weight_sums": stats[4:, 0].sum().item() / stats[4, 2].item(),
    }
    parallel_state.destroy_model_parallel()
    return out


def _cp_balance_training() -> dict:
    """A rank-2 CP model whose mixture starts unbalanced (component 1 favoured along the trunk output's mean);
    SGD on only ``cp_mixture.weight`` with the module's sequential backward, balance coefficient 10 vs 0: the
    largest mean component weight (the ``cp/weight_a`` rows) after each step."""
    overrides = _case_overrides(1, 1, 2, "none", WORLD, (*TINY, *CP2, "model.seq_length=16", "mtp.loss_chunk_size=0"))
    cfg, env, model = _single_stage_model(overrides)
    heads = model.mtp_heads
    batch = random_microbatches(1, 2, cfg.model.seq_length, cfg.model.vocab_size, seed=9)[0]
    with torch.no_grad():
        decoder_input, rotary, *_ = model._preprocess(input_ids=batch["tokens"], position_ids=batch["position_ids"])
        z = model.decoder(hidden_states=decoder_input, attention_mask=batch["attention_mask"], rotary_pos_emb=rotary)
        direction = z.mean((0, 1))
        heads.cp_mixture.weight[0] += 4.0 * direction / direction.square().sum()
    initial = heads.cp_mixture.weight.detach().clone()  # the only weight that trains
    n = heads.n_heads
    out = {}
    for coef in (10.0, 0.0):
        with torch.no_grad():
            heads.cp_mixture.weight.copy_(initial)
        heads.balance_coef = coef
        opt = torch.optim.SGD([heads.cp_mixture.weight], lr=200.0)
        trace = []
        for _ in range(6):
            model.zero_grad(set_to_none=True)
            loss, stats = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                                labels=batch["labels"], loss_mask=batch["loss_mask"])
            loss.backward()  # the sequential backward: fills the statistics
            mean_w = (stats[n + 2 :, 0] / stats[n + 2 :, 2]).tolist()
            trace.append(max(mean_w))
            opt.step()
        out[coef] = trace
    parallel_state.destroy_model_parallel()
    return out


# Sequential vs naive: (tp, pp, n, sharding, extra overrides, loss weights). Every design at n = 4 and at n = 1
# and 2 somewhere; chunking (8 < seq 32) in some; CP under sequence parallelism once; loss weights through CP once.
ORDER_CASES = [
    # TP = 2
    (2, 1, 1, "none", ("mtp.head_type=linear",), None),
    (2, 1, 4, "none", ("mtp.head_type=linear", *CHUNK), None),
    (2, 1, 4, "none", ("mtp.head_type=causal", *CHUNK), None),
    (2, 1, 4, "none", ("mtp.head_type=anticausal", *CHUNK), None),
    (2, 1, 4, "none", (*CP2, *CHUNK), None),
    (2, 1, 2, "none", CP1, None),
    (2, 1, 4, "none", (*CP2, *CHUNK), [1.0, 0.5, 0.5, 0.25]),
    (2, 1, 4, "none", (*CP2, *CHUNK, "parallel.sequence_parallel=true"), None),
    # PP = 2
    (1, 2, 2, "none", ("mtp.head_type=linear",), None),
    (1, 2, 1, "none", ("mtp.head_type=causal",), None),
    (1, 2, 2, "none", ("mtp.head_type=anticausal", *CHUNK), None),
    (1, 2, 1, "none", CP2, None),
    (1, 2, 4, "none", CP1, None),
    # DP = 2, distributed optimizer
    (1, 1, 4, "distributed_optimizer", ("mtp.head_type=linear", *CHUNK), None),
    (1, 1, 2, "distributed_optimizer", ("mtp.head_type=causal",), None),
    (1, 1, 1, "distributed_optimizer", ("mtp.head_type=anticausal",), None),
    (1, 1, 2, "distributed_optimizer", (*CP2, *CHUNK), None),
    (1, 1, 1, "distributed_optimizer", CP1, None),
]


def _world2_results() -> dict:
    """Every distributed part on one pair of ranks; a part's failure is returned as its traceback."""
    parts = {
        "orders": lambda: [_compare_orders(case) for case in ORDER_CASES],
        "cp1": _cp1_vs_transformer,
        "loss_weights": _loss_weight_runs,
        "joint": _cp_joint_enumeration,
        "balance": _cp_balance_training,
    }
    out = {}
    for name, part in parts.items():
        try:
            out[name] = part()
        except Exception:
            out[name] = traceback.format_exc()
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_world2_results, WORLD)


def _part(results: list[dict], name: str) -> list:
    for rank, r in enumerate(results):
        assert not isinstance(r[name], str), f"rank {rank}, {name}:\n{r[name]}"
    return [r[name] for r in results]


def _design(case: tuple) -> str:
    extra = " ".join(case[4])
    if "head_type=cp" in extra:
        return "cp2" if "cp_rank=2" in extra else "cp1"
    return extra.split("head_type=")[1].split()[0]


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.distributed
def test_designs_sequential_equals_naive(world2):
    """linear, causal, anticausal, CP rank 2 and 1 under TP2, PP2, DP2 (distributed optimizer), sequence
    parallelism, chunked losses and CP loss weights: every gradient and statistic, and the design's parameters."""
    covered = set()
    for rank, reports in enumerate(_part(world2, "orders")):
        for r in reports:
            case, label = r["case"], f"rank {rank} case {r['case']}"
            worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] < GRAD_RTOL, f"{label}: gradient of {worst[0]} off by {worst[1]:.2e}"
            assert r["stats_error"] < STATS_RTOL, f"{label}: statistics off by {r['stats_error']:.2e}"
            assert not r["zero_grads"], f"{label}: zero gradients for {r['zero_grads']}"
            covered.add((_design(case), case[2]))
            print(f"{label}: worst gradient error {worst[1]:.1e} ({worst[0]}), statistics {r['stats_error']:.1e}")
            if not r["has_heads"]:
                assert not any(".mtp_heads." in k for k in r["shapes"]), label
                continue
            n, shapes, design = case[2], r["shapes"], _design(case)
            head = {k.split(".mtp_heads.")[1]: v for k, v in shapes.items() if ".mtp_heads." in k}
            assert head["output_layer.weight"] == (512 // case[0], 64), label
            qkv = [k for k in head if k.endswith("linear_qkv.weight")]
            if design == "linear":
                assert not qkv, label
                assert {k for k in head if k.startswith("layers.")} == {f"layers.{k}.weight" for k in range(n)}
                assert all(head[f"layers.{k}.weight"] == (64, 64) for k in range(n)), label
            else:
                assert sorted(qkv) == sorted(f"layers.{k}.self_attention.linear_qkv.weight" for k in range(n)), label
            if design == "cp2":
                assert head["cp_mixture.weight"] == (2, 64), label
                assert {k for k in head if k.startswith("cp_expand.")} == {f"cp_expand.{k}.weight" for k in range(n)}
                assert all(head[f"cp_expand.{k}.weight"] == (2 * 64, 64) for k in range(n)), label
                # cp/joint, cp/balance, cp/weight_1, cp/weight_2 rows; the mean weights sum to 1.
                assert sum(r["extras"][f"cp/weight_{a}"] for a in (1, 2)) == pytest.approx(1.0, abs=1e-6)
            else:
                assert not any(k.startswith(("cp_mixture", "cp_expand")) for k in head), label
    for design in ("linear", "causal", "anticausal", "cp2", "cp1"):
        assert {(design, n) for n in (1, 2, 4)} <= covered, f"{design}: n=1, 2 and 4 not all covered"


@pytest.mark.distributed
def test_cp_rank1_is_the_transformer_design(world2):
    """Same weights; with transformer loss weights N_s / N_1 the same gradients (both orders), per-head statistics
    and objective (CP divides every position's mixture loss by head 1's count)."""
    for rank, parts in enumerate(_part(world2, "cp1")):
        for sequential, r in parts.items():
            label = f"rank {rank} sequential={sequential}"
            assert r["weights_equal"], label
            # Head s has s - 1 fewer targets per sample (no masking): the weights are not all 1.
            assert r["loss_weights"][0] == 1.0 and r["loss_weights"][3] < 0.95, r["loss_weights"]
            worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] < GRAD_RTOL, f"{label}: gradient of {worst[0]} off by {worst[1]:.2e}"
            assert not r["zero_grads"], label
            print(f"cp1 vs transformer {label}: worst gradient error {worst[1]:.1e} ({worst[0]})")
            n = 4
            head_rows_error = ((r["cp_stats"][:n] - r["tf_stats"]).abs().max() / r["tf_stats"].abs().max()).item()
            assert head_rows_error < STATS_RTOL, f"{label}: per-head statistics off by {head_rows_error:.2e}"
            assert r["cp_loss"] == pytest.approx(r["tf_loss"], rel=1e-6), label


@pytest.mark.distributed
def test_cp_joint_distribution_by_enumeration(world2):
    """n=2, V=11, rank 3: sum_{x1, x2} P(x1, x2) = 1 at every position; the module's loss is the mean over head 1's
    positions of -log P(targets), the marginal over x2 where head 2 has no target (the last position); the per-head
    rows are the marginals' losses."""
    for rank, r in enumerate(_part(world2, "joint")):
        assert r["vocab"] == 11 and r["positions"] == (8, 2)
        assert r["total_error"] < 1e-5, r["total_error"]
        assert r["marginal_vs_mixture"] < 1e-6, r["marginal_vs_mixture"]
        assert not r["last_position_has_head2"] and r["last_position_marginal_error"] == 0
        assert r["loss"] == pytest.approx(r["expected_loss"], rel=1e-5, abs=1e-6), rank
        assert r["joint_row"][0] == pytest.approx(r["expected_joint_sum"], rel=1e-5)
        assert r["joint_row"][2] == 16  # head 1's targets: 2 samples x 8 positions
        assert r["head1_row"][0] == pytest.approx(r["expected_head1_sum"], rel=1e-5)
        assert r["head2_row"][0] == pytest.approx(r["expected_head2_sum"], rel=1e-5)
        assert r["head2_row"][2] == 14
        assert r["head_weight_sums"] == pytest.approx(1.0, abs=1e-6)  # fp32 weights


@pytest.mark.distributed
def test_cp_balance_term_evens_the_components(world2):
    """From an unbalanced mixture (largest mean weight near 1), steps with a large balance coefficient bring the
    largest mean weight toward 1/r = 0.5; without the term it barely moves."""
    for rank, r in enumerate(_part(world2, "balance")):
        on, off = r[10.0], r[0.0]
        assert on[0] == off[0] > 0.8, (on, off)  # the same unbalanced start
        assert on[-1] < on[0] - 0.2 and on[-1] >= 0.5 - 1e-6, on
        assert all(b < a for a, b in zip(on, on[1:])), on  # every step evens them further
        assert abs(off[-1] - off[0]) < 0.25 * (on[0] - on[-1]), (on, off)


@pytest.mark.distributed
def test_loss_weights_scale_head_gradients(world2):
    """Transformer heads: weight 0 makes head 2's layer gradient exactly 0 and leaves heads 1, 3, 4's as in the
    unweighted run; weight 2 doubles head 2's. Causal heads with [1, 0, 1, 1]: layers 3 and 4 (which head 2's loss
    does not reach) unchanged, layers 1 and 2 changed, both orders agree. The logged losses stay unweighted and the
    objective is sum_i w_i head_loss_i."""
    for rank, runs in enumerate(_part(world2, "loss_weights")):
        plain = runs["transformer", None, True]
        zero = runs["transformer", (1, 0, 1, 1), True]
        double = runs["transformer", (1, 2, 1, 1), True]
        layer = lambda name: int(name.split(".mtp_heads.layers.")[1].split(".")[0]) if ".layers." in name and \
            ".mtp_heads." in name else None
        head_params = [k for k in plain["grads"] if layer(k) is not None]
        assert len({layer(k) for k in head_params}) == 4, head_params
        for k in head_params:
            if layer(k) == 1:
                assert torch.count_nonzero(zero["grads"][k]) == 0, f"rank {rank}: {k} not zero with weight 0"
                assert plain["grads"][k].norm() > 0
                err = _rel(double["grads"][k], 2 * plain["grads"][k])
                assert err < GRAD_RTOL, f"rank {rank}: {k} with weight 2 off by {err:.2e}"
            else:
                err = _rel(zero["grads"][k], plain["grads"][k])
                assert err < GRAD_RTOL, f"rank {rank}: {k} with head 2 weighted 0 off by {err:.2e}"
                assert _rel(double["grads"][k], plain["grads"][k]) < GRAD_RTOL, k
        shared = next(k for k in plain["grads"] if k.endswith("mtp_heads.output_layer.weight"))
        assert _rel(zero["grads"][shared], plain["grads"][shared]) > 1e-3
        c_plain, c_zero = runs["causal", None, True], runs["causal", (1, 0, 1, 1), True]
        c_naive = runs["causal", (1, 0, 1, 1), False]
        for k in (k for k in c_plain["grads"] if layer(k) is not None):
            err = _rel(c_zero["grads"][k], c_plain["grads"][k])
            if layer(k) in (2, 3):
                assert err < GRAD_RTOL, f"rank {rank}: causal {k} off by {err:.2e}"
            elif c_plain["grads"][k].norm() > 0:
                assert err > 1e-4, f"rank {rank}: causal {k} unchanged ({err:.2e}) although head 2's loss reaches it"
        for k, g in c_naive["grads"].items():
            assert _rel(c_zero["grads"][k], g) < GRAD_RTOL, f"rank {rank}: causal weighted orders differ at {k}"
        for name, r in (("plain", plain), ("zero", zero), ("double", double), ("causal", c_zero)):
            weights = r["loss_weights"] or [1.0] * 4
            assert r["loss"] == pytest.approx(sum(w * x for w, x in zip(weights, r["head_loss"])), rel=1e-12), name
        assert zero["head_loss"] == pytest.approx(plain["head_loss"], rel=1e-6)  # logged losses unweighted
        assert zero["loss"] < plain["loss"] - 0.5 * plain["head_loss"][1]


def test_loss_weights_at_follows_the_schedule():
    mtp = MTPConfig(n_heads=4, loss_weights=[1, 0.3, 0.3, 0.3],
                    loss_weight_schedule=[[10, 1, 0.1, 0.1, 0.1], [20, 0, 0, 0, 1]])
    expected = {1: [1, 0.3, 0.3, 0.3], 9: [1, 0.3, 0.3, 0.3], 10: [1, 0.1, 0.1, 0.1], 19: [1, 0.1, 0.1, 0.1],
                20: [0, 0, 0, 1], 1000: [0, 0, 0, 1]}
    for step, weights in expected.items():
        assert loss_weights_at(mtp, step) == weights, step
    assert loss_weights_at(MTPConfig(n_heads=4), 5) is None
    only_schedule = MTPConfig(n_heads=2, loss_weight_schedule=[[3, 1, 0.5]])
    assert loss_weights_at(only_schedule, 2) is None and loss_weights_at(only_schedule, 3) == [1, 0.5]


@pytest.mark.parametrize("overrides, field, words", [
    (["mtp.loss_weights=[1,1]"], "mtp.loss_weights", "2 entries"),
    (["mtp.loss_weights=[1,-0.5,1,1]"], "mtp.loss_weights", "negative"),
    (["mtp.loss_weight_schedule=[[10,1,1,1,1],[10,1,0,0,0]]"], "mtp.loss_weight_schedule[1]", "increasing"),
    (["mtp.loss_weight_schedule=[[10,1,1,1,1],[5,1,0,0,0]]"], "mtp.loss_weight_schedule[1]", "increasing"),
    (["mtp.loss_weight_schedule=[[10,1,1,1]]"], "mtp.loss_weight_schedule[0]", "entries"),
    (["mtp.loss_weight_schedule=[[10,1,-1,1,1]]"], "mtp.loss_weight_schedule[0]", "negative"),
])
def test_loss_weight_validation(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["mtp.n_heads=4", *overrides])
    assert field in str(info.value) and words in str(info.value), str(info.value)
    load_config(None, ["mtp.n_heads=4", "mtp.loss_weights=[1,0,0.3,0.3]",
                       "mtp.loss_weight_schedule=[[10,1,0.1,0.1,0.1],[20,1,0,0,0]]"])
