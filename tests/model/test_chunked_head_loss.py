"""Chunked head cross-entropy (``mtp.loss_chunk_size``, model/heads/base.py): the same gradients and per-head statistics
as the unchunked order, with one chunk's logits formed at a time.

Each case builds the model twice on the same seed (unchunked, ``loss_chunk_size=0``, then chunked), runs
megatron-core's forward-backward schedule over 2 microbatches with a loss scale of 1024 twice (megatron DDP
records in its first iteration how often each gradient hook fires and checks the count in the next; the second
iteration's gradients are compared), then once forward-only (evaluation), and compares every parameter's gradient
as held in megatron DDP's grad buffers, the per-head statistics, and the positions of the largest logits tensor
the unembedding produced (a forward hook): the chunk, not the sequence. DeepSpeed ZeRO reads the heads'
``ds_grad_is_ready`` flag; ``test_deepspeed_and_fsdp_train_steps_are_unchanged_by_chunking`` runs those engines'
train step.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from mtp_megatron.config import ConfigError, load_config
from mtp_megatron.engines.step import reduce_head_stats, run_forward_backward
from mtp_megatron.testing.batches import random_microbatches
from mtp_megatron.testing.distributed import run_distributed
from tests.model.test_sequential_backward import scheduled_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 32
# fp32: a chunk's unembedding gradient is a partial sum of the whole sequence's, added into the fp32 grad buffer
# chunk by chunk, and a head's loss sum adds chunk sums: float rounding only, measured below 3e-7.
RTOL = 1e-6
# bf16: each chunk's bf16 weight gradient is rounded before it is added into the fp32 buffer, where unchunked
# rounds the whole sequence's once: a few bf16 units (u = 2**-8) on the shared unembedding and norm.
RTOL_BF16 = 2e-2
LOSS_SCALE = 1024.0


def _overrides(tp: int, sharding: str, world: int, extra: tuple) -> list[str]:
    dp = world // tp
    return [
        f"parallel.tp={tp}", f"parallel.sharding={sharding}", "mtp.n_heads=4",
        "model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "model.vocab_size=512", f"model.seq_length={SEQ}", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        "train.micro_batch_size=2", f"train.global_batch_size={2 * 2 * dp}",  # 2 microbatches per DP rank
        "train.device=cpu", "train.precision=fp32", *extra,
    ]


def _record_logit_positions(model) -> list[int]:
    """Positions (first dimension) of every logits tensor the shared unembedding produces from now on."""
    positions = []
    unwrap_model(model).mtp_heads.output_layer.register_forward_hook(
        lambda _module, _args, output: positions.append(output[0].shape[0]))
    return positions


def run_one(overrides: list[str], chunk: int) -> dict:
    """One fresh model at ``loss_chunk_size=chunk``: its gradients after a second training forward-backward, the
    statistics of that and of a forward-only pass, and the largest logits' positions in each."""
    cfg = load_config(None, [*overrides, f"mtp.loss_chunk_size={chunk}"])
    model, env = scheduled_model(cfg, LOSS_SCALE)
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    batches = random_microbatches(num_microbatches, cfg.train.micro_batch_size, SEQ, cfg.model.vocab_size,
                                  seed=100 + env.dp_rank)
    positions = _record_logit_positions(model)

    def run(forward_only: bool) -> torch.Tensor:
        model.zero_grad_buffer()
        # Evaluation runs forward-only without autograd (engines/base.py ``eval_step``).
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            losses = run_forward_backward([model], iter(batches), num_microbatches, cfg, forward_only=forward_only)
        return reduce_head_stats(losses, cfg.mtp, env).stats

    run(forward_only=False)
    train_stats = run(forward_only=False)
    grads = {name: p.main_grad.detach().clone() for name, p in model.named_parameters()}
    train_positions = max(positions)
    positions.clear()
    eval_stats = run(forward_only=True)
    parallel_state.destroy_model_parallel()
    return {"grads": grads, "train_stats": train_stats, "eval_stats": eval_stats,
            "train_positions": train_positions, "eval_positions": max(positions)}


def compare_chunked(cases: list[tuple]) -> list[dict]:
    """Per rank, for each (name, tp, sharding, chunk, extra overrides): unchunked and chunked results."""
    world = int(os.environ["WORLD_SIZE"])
    return [{"case": (name, chunk, extra), "unchunked": run_one(_overrides(tp, sharding, world, extra), 0),
             "chunked": run_one(_overrides(tp, sharding, world, extra), chunk)}
            for name, tp, sharding, chunk, extra in cases]


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


def _assert_same_stats(stats: torch.Tensor, reference: torch.Tensor, rtol: float, what: str) -> None:
    """Loss sums within ``rtol`` per head; top-1 correct counts and token counts exactly equal."""
    assert (reference[:, 0] > 0).all() and (reference[:, 2] > 0).all(), what
    worst = ((stats[:, 0] - reference[:, 0]).abs() / reference[:, 0]).max().item()
    assert worst <= rtol, f"{what}: per-head loss sums differ by {worst:.2e} (relative)"
    assert torch.equal(stats[:, 1:], reference[:, 1:]), f"{what}: correct/token counts {stats} vs {reference}"


def _check(reports: list[list[dict]]) -> None:
    for rank, rank_reports in enumerate(reports):
        for r in rank_reports:
            name, chunk, extra = r["case"]
            what = f"rank {rank} case {name}"
            ref, got = r["unchunked"], r["chunked"]
            rtol = RTOL_BF16 if "train.precision=bf16" in extra else RTOL
            # The chunked run formed no logits wider than a chunk (the unchunked one: the whole sequence).
            assert ref["train_positions"] == ref["eval_positions"] == SEQ, what
            assert got["train_positions"] == got["eval_positions"] == chunk, what
            _assert_same_stats(got["train_stats"], ref["train_stats"], RTOL, f"{what} (train)")
            _assert_same_stats(got["eval_stats"], ref["eval_stats"], RTOL, f"{what} (eval)")
            assert got["grads"].keys() == ref["grads"].keys()
            zero = [p for p, g in ref["grads"].items() if g.norm() == 0]
            assert not zero, f"{what}: zero gradients for {zero}"
            errors = {p: _relative(got["grads"][p], g) for p, g in ref["grads"].items()}
            worst = max(errors, key=errors.get)
            assert errors[worst] <= rtol, f"{what}: gradient of {worst} off by {errors[worst]:.2e}"


@pytest.mark.distributed
def test_chunked_equals_unchunked_tp2_and_dp2():
    """World 2. TP=2 with a chunk that does not divide the sequence (32 = 12 + 12 + 8); TP=2 with sequence
    parallelism (each rank takes 5 of its 16 positions per chunk: 5 + 5 + 5 + 1) and dropout; TP=2 with selective
    recompute; TP=1 x DP=2 with the distributed optimizer and overlapped gradient reduction (DDP's hooks fire
    once per chunk); the naive order; bf16."""
    dropout = ("model.hidden_dropout=0.1", "model.attention_dropout=0.1")
    cases = [
        ("tp2", 2, "none", 12, ()),
        ("tp2_sequence_parallel_dropout", 2, "none", 10, ("parallel.sequence_parallel=true", *dropout)),
        ("tp2_selective_recompute", 2, "none", 16, ("train.recompute=selective",)),
        ("dp2_overlap_grad_reduce", 1, "distributed_optimizer", 7, ("parallel.overlap_grad_reduce=true",)),
        ("tp2_naive", 2, "none", 12, ("mtp.sequential_backward=false",)),
        ("tp2_bf16", 2, "distributed_optimizer", 12, ("train.precision=bf16",)),
    ]
    _check(run_distributed(compare_chunked, 2, cases))


@pytest.mark.parametrize("overrides, expected", [
    (["mtp.loss_chunk_size=-1"], "mtp.loss_chunk_size: must be >= 0, got -1"),
    (["mtp.loss_chunk_size=255", "parallel.tp=2", "parallel.sequence_parallel=true"],
     "mtp.loss_chunk_size: 255 positions cannot be split over parallel.tp=2 ranks"),
])
def test_bad_chunk_sizes_are_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides)
    assert expected in str(error.value) and "Fix:" in str(error.value)
