"""The training objective is, per head, the mean over every target token of the global batch, summed over heads.

So the gradient must not depend on how the global batch is cut into microbatches and data-parallel ranks. With
document masks and EOD loss masking, microbatches hold different numbers of targets per head (heads >= 2 also
drop targets in a later document), which is where a mean of per-microbatch means would differ. Each variant is a
one-step run of the public ``train()`` on the same global batch of real data, from the same seed; the step-1
gradient of every parameter (read from megatron DDP's buffers, or through DeepSpeed's ``safe_get_full_grad``
just before its update) and the gradient norm are compared across 1 x 4 microbatches, 4 x 1, and DP=2, in the
sequential and the naive order.
"""

from __future__ import annotations

import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 1e-6


def _config(tmp: str, name: str, data: list[str], *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "train.iters=1", "model.seq_length=64", "train.global_batch_size=4", f"run.dir={tmp}/{name}",
        "logging.tensorboard=false", "checkpoint.save=false", f"data.paths=[{','.join(data)}]", "data.synthetic=false",
        f"data.cache_dir={tmp}/cache", "data.reset_attention_mask=true", "data.eod_mask_loss=true",
        "optim.clip_grad=0", *overrides])


def step_one_gradients(tmp: str, data: list[str], variants: dict[str, list[str]]) -> dict:
    """Per variant, trained through ``train()``: step 1's per-head stats, gradient norm and every parameter's
    gradient, gathered by the engine (``Engine.gathered_gradients``) between the backward and the update."""
    import mtp_megatron.engines as engines

    captured = {}
    build = engines.build_engine

    def capturing_build(cfg, env, module=None):
        engine = build(cfg, env, module)
        train_step = engine.train_step

        def capturing_train_step(data_iterator, num_microbatches, after_backward=None, **kwargs):
            def capture(final: bool) -> None:
                if final:
                    captured.update(engine.gathered_gradients())
            return train_step(data_iterator, num_microbatches, after_backward=capture, **kwargs)

        engine.train_step = capturing_train_step
        return engine

    engines.build_engine = capturing_build
    out = {}
    try:
        for name, overrides in variants.items():
            captured.clear()
            result = train(_config(tmp, name, data, *overrides))[0]
            out[name] = {"stats": result.stats, "loss": result.loss, "grad_norm": result.grad_norm,
                         "grads": dict(captured)}
    finally:
        engines.build_engine = build
    return out


def _variants(dp: int, order: str) -> dict[str, list[str]]:
    sequential = f"mtp.sequential_backward={'true' if order == 'sequential' else 'false'}"
    if dp == 1:
        return {f"dp1_mbs{mbs}_{order}": [f"train.micro_batch_size={mbs}", sequential, "parallel.sharding=none"]
                for mbs in (1, 4)}
    return {f"dp2_{sharding}_{order}": ["train.micro_batch_size=1", sequential, f"parallel.sharding={sharding}"]
            for sharding in ("none", "distributed_optimizer", "zero2")}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.distributed
def test_gradients_do_not_depend_on_microbatches_or_data_parallelism(tmp_path, byte_datasets):
    orders = ("sequential", "naive")
    runs = run_distributed(step_one_gradients, 1, str(tmp_path), byte_datasets,
                           {k: v for order in orders for k, v in _variants(1, order).items()})[0]
    runs.update(run_distributed(step_one_gradients, 2, str(tmp_path), byte_datasets,
                                {k: v for order in orders for k, v in _variants(2, order).items()})[0])
    for order in orders:
        _assert_same_objective({name: run for name, run in runs.items() if name.endswith(order)},
                               runs[f"dp1_mbs4_{order}"])  # one microbatch: the whole batch at once


def _assert_same_objective(runs: dict, reference: dict) -> None:
    tokens = reference["stats"][:, 2]
    assert (tokens[1:] < tokens[:-1]).all(), tokens  # heads >= 2 lose cross-document targets: uneven masks
    for name, run in runs.items():
        assert torch.equal(run["stats"][:, 2], tokens), name  # the same global batch
        assert run["loss"] == pytest.approx(reference["loss"], rel=RTOL), name  # logged loss = the objective
        assert run["grad_norm"] == pytest.approx(reference["grad_norm"], rel=RTOL), name
        assert run["grads"].keys() == reference["grads"].keys(), name
        worst = max((_relative(run["grads"][k], g), k) for k, g in reference["grads"].items())
        assert worst[0] <= RTOL, f"{name}: gradient of {worst[1]} differs by {worst[0]:.2e} (relative)"
