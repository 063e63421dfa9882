"""The sequential head backward gives the naive order's losses and gradients, under TP, PP, TP x PP and DP.

Each case builds one model, runs megatron-core's forward-backward schedule over 2+ microbatches twice on the
same weights and batches (naive, then sequential), with a loss scale of 1024 in the schedule, and compares
every parameter's gradient (trunk, heads, shared norm, unembedding) as held in megatron DDP's grad buffers.
"""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import unwrap_model

from mtp_megatron.config import load_config
from mtp_megatron.distributed.parallel import init_distributed
from mtp_megatron.engines.megatron import wrap_model
from mtp_megatron.model.builder import build_model
from mtp_megatron.testing.batches import random_microbatches
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.engines.step import reduce_head_stats, run_forward_backward

GRAD_RTOL = 1e-5
# bf16 keeps 8 significant bits (unit roundoff u = 2**-8 = 3.9e-3). The naive order sums the n heads' dL/dz in
# bf16, rounding after each of its n - 1 additions; the sequential one sums in fp32 and rounds once. That
# difference, a few u, then runs through the trunk's bf16 backward: measured worst 8.8e-3 (n=4, TP2; 7.5e-3 at PP2), so
# 2e-2 (about 5u). A wrong scale or a missing head is off by O(1/n) or more.
GRAD_RTOL_BF16 = 2e-2
LOSS_RTOL = 1e-6
LOSS_SCALE = 1024.0


def _case_overrides(tp: int, pp: int, n: int, sharding: str, world: int, extra: tuple = ()) -> list[str]:
    dp = world // (tp * pp)
    return [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"mtp.n_heads={n}", f"parallel.sharding={sharding}",
        "model.num_layers=5", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "model.vocab_size=512", "model.seq_length=32", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        "train.micro_batch_size=2", f"train.global_batch_size={2 * 3 * dp}",  # 3 microbatches per DP rank
        "train.device=cpu", "train.precision=fp32", *extra,
    ]


def scheduled_model(cfg, loss_scale: float):
    """A fresh model of ``cfg`` under megatron DDP, with the schedule callbacks a training step uses (no
    optimizer: gradients stay in DDP's buffers) and a fixed loss scale; and its ParallelEnv."""
    env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
    model = wrap_model(build_model(cfg, env), cfg, env)
    config = model.config
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = lambda loss: loss * loss_scale
    return model, env


def _gradients(overrides: list[str], sequential: bool):
    """Build a fresh model (the same seed gives the same weights) and run one forward-backward in one order.

    Each order gets its own model, as in training: megatron DDP records in the first iteration how often each
    parameter's gradient hook fires (once per head for the shared norm and unembedding in the sequential order)
    and expects the same count afterwards.
    """
    cfg = load_config(None, [*overrides, f"mtp.sequential_backward={str(sequential).lower()}"])
    model, env = scheduled_model(cfg, LOSS_SCALE)
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    batches = random_microbatches(num_microbatches, cfg.train.micro_batch_size, cfg.model.seq_length,
                                  cfg.model.vocab_size, seed=100 + env.dp_rank)
    model.zero_grad_buffer()
    losses = run_forward_backward([model], iter(batches), num_microbatches, cfg, forward_only=False)
    stats = reduce_head_stats(losses, cfg.mtp, env).stats
    grads = {name: p.main_grad.detach().clone() for name, p in model.named_parameters()}
    is_last_stage = env.is_last_stage
    parallel_state.destroy_model_parallel()
    return grads, stats, is_last_stage


def compare_orders(cases: list[tuple]) -> list[dict]:
    """Per rank: for each (tp, pp, n, sharding[, extra overrides]), the worst gradient and loss relative errors."""
    world = int(os.environ["WORLD_SIZE"])
    report = []
    for tp, pp, n, sharding, *extra in cases:
        overrides = _case_overrides(tp, pp, n, sharding, world, *extra)
        naive_grads, naive_stats, has_heads = _gradients(overrides, sequential=False)
        seq_grads, seq_stats, _ = _gradients(overrides, sequential=True)
        grad_errors = {
            name: ((seq_grads[name] - g).norm() / g.norm().clamp(min=1e-30)).item() for name, g in naive_grads.items()
        }
        report.append(
            {
                "case": (tp, pp, n, sharding, *extra),
                "grad_errors": grad_errors,
                "zero_grads": [name for name, g in naive_grads.items() if g.norm() == 0],
                "loss_error": ((seq_stats - naive_stats).abs().max() / naive_stats.abs().max()).item(),
                "head_tokens": naive_stats[:, 2].tolist(),
                "has_heads": has_heads,
            }
        )
    return report


def _check(reports: list[list[dict]]) -> None:
    for rank, rank_reports in enumerate(reports):
        for r in rank_reports:
            worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
            tolerance = GRAD_RTOL_BF16 if "train.precision=bf16" in str(r["case"]) else GRAD_RTOL
            assert worst[1] < tolerance, f"rank {rank} case {r['case']}: gradient of {worst[0]} off by {worst[1]:.2e}"
            assert r["loss_error"] < LOSS_RTOL, f"rank {rank} case {r['case']}: losses off by {r['loss_error']:.2e}"
            # A case that computed no gradient would compare zeros with zeros.
            assert not r["zero_grads"], f"rank {rank} case {r['case']}: zero gradients for {r['zero_grads']}"
            if r["has_heads"]:
                names = r["grad_errors"]
                n = r["case"][2]
                assert sum(".mtp_heads.layers." in k and k.endswith("linear_qkv.weight") for k in names) == n
                assert any("output_layer" in k for k in names)
            # Head i has i-1 fewer target positions per sample than head 1 (masked tail).
            tokens = r["head_tokens"]
            assert all(tokens[i] < tokens[i - 1] for i in range(1, len(tokens)))


@pytest.mark.distributed
def test_sequential_equals_naive_tp2_pp2_dp2():
    """World 2: TP=2, PP=2 and DP=2 (the last with megatron's distributed optimizer), n = 1, 2, 4; plus overlapped
    gradient reduction under PP, full and selective activation recomputation, sequence parallelism and dropout
    (both orders draw the same masks: the heads consume the RNG streams in the same order), and bf16."""
    dropout = ("model.hidden_dropout=0.1", "model.attention_dropout=0.1")
    cases = [(2, 1, n, "none") for n in (1, 2, 4)]
    cases += [(1, 2, n, "none") for n in (1, 2, 4)]
    cases += [(1, 1, n, "distributed_optimizer") for n in (1, 2, 4)]
    # Overlapped grad reduce under PP: head gradient hooks must fire in backward, where 1F1B expects them.
    cases += [(1, 2, 4, "distributed_optimizer", ("parallel.overlap_grad_reduce=true",))]
    cases += [(2, 1, 4, "none", ("train.recompute=full",))]
    cases += [(2, 1, 4, "none", ("train.recompute=selective",))]
    cases += [(2, 1, 4, "none", ("parallel.sequence_parallel=true", *dropout))]
    cases += [(1, 1, 4, "distributed_optimizer", dropout)]
    cases += [(2, 1, 4, "distributed_optimizer", ("train.precision=bf16",))]
    _check(run_distributed(compare_orders, 2, cases))


@pytest.mark.distributed
def test_sequential_equals_naive_tp2xpp2():
    """World 4: TP=2 x PP=2, n = 1, 2, 4."""
    _check(run_distributed(compare_orders, 4, [(2, 2, n, "distributed_optimizer") for n in (1, 2, 4)]))


def head_dropout_masks(overrides: list[str]) -> list[torch.Tensor]:
    """This rank's dropout masks drawn inside the head layers during one sequential forward-backward."""
    cfg = load_config(None, overrides)
    env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
    model = wrap_model(build_model(cfg, env), cfg, env)
    model.config.no_sync_func = model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    in_heads, masks = [False], []
    for layer in unwrap_model(model).mtp_heads.layers:
        layer.register_forward_pre_hook(lambda *_: in_heads.__setitem__(0, True))
        layer.register_forward_hook(lambda *_: in_heads.__setitem__(0, False))
    dropout = torch.nn.functional.dropout

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        out = dropout(x, p=p, training=training, inplace=False)
        if in_heads[0] and training and p > 0:
            masks.append(out == 0)
        return out

    torch.nn.functional.dropout = recording_dropout
    try:
        num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        batches = random_microbatches(num_microbatches, cfg.train.micro_batch_size, cfg.model.seq_length,
                                      cfg.model.vocab_size, seed=7)
        run_forward_backward([model], iter(batches), num_microbatches, cfg, forward_only=False)
    finally:
        torch.nn.functional.dropout = dropout
        parallel_state.destroy_model_parallel()
    return masks


@pytest.mark.distributed
def test_heads_draw_their_own_dropout_per_tp_rank_under_sequence_parallelism():
    """Under sequence parallelism each TP rank holds a different slice of the sequence (and of the attention
    heads): the same mask on both ranks would be correlated noise, not dropout."""
    overrides = _case_overrides(2, 1, 2, "none", 2, ("parallel.sequence_parallel=true", "model.hidden_dropout=0.5",
                                                     "model.attention_dropout=0.5", "train.global_batch_size=2"))
    rank0, rank1 = run_distributed(head_dropout_masks, 2, overrides)
    assert len(rank0) == len(rank1) == 2 * 3  # per head layer: attention probabilities, both residual branches
    for a, b in zip(rank0, rank1):
        assert a.shape == b.shape and a.any() and not a.all()
        assert not torch.equal(a, b), "both TP ranks drew the same dropout mask"
