"""Data-parallel sharding (plain DDP, megatron-core's distributed optimizer, DeepSpeed ZeRO-1/2/3), sequence
parallelism and precision, on real gloo processes through the real ``train`` entry point.

Every sharding choice must train the same model: n=4 heads with the sequential backward, fp32, the same global
batches, so the per-head losses of each step agree with plain DDP to float rounding. What differs is what each
rank holds, measured from the tensors' storage.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train
from mtp_megatron.training.memory import state_bytes_in_a_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4
SHARDINGS = ["none", "distributed_optimizer", "zero1", "zero2", "zero3"]
RTOL = 1e-6  # fp32; measured differences are below 1e-7


def _config(tmp: str, name: str, *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        f"train.iters={STEPS}", "model.seq_length=64", f"run.dir={tmp}/{name}", "logging.tensorboard=false",
        "checkpoint.save=false", "optim.warmup_iters=1", *overrides])


def _head_losses(history) -> torch.Tensor:
    """[steps, heads] mean loss per head."""
    return torch.stack([r.stats[:, 0] / r.stats[:, 2] for r in history])


def train_each(tmp: str, variants: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    return {name: _head_losses(train(_config(tmp, name, *overrides))) for name, overrides in variants.items()}


def _assert_same_losses(losses: dict, reference: str, rtol: float = RTOL) -> None:
    ref = losses[reference]
    assert ref.shape == (STEPS, 4) and torch.isfinite(ref).all()
    assert (ref[0] - ref[-1]).min() > 1e-3  # the steps trained: a frozen model would match trivially
    for name, value in losses.items():
        worst = ((value - ref).abs() / ref).max().item()
        assert worst <= rtol, f"{name}: per-head losses differ from {reference} by {worst:.2e} (relative)"


@pytest.mark.distributed
def test_every_sharding_trains_the_same_model_at_dp2(tmp_path):
    variants = {s: [f"parallel.sharding={s}"] for s in SHARDINGS}
    _assert_same_losses(run_distributed(train_each, 2, str(tmp_path), variants)[0], "none")


@pytest.mark.distributed
def test_every_sharding_trains_the_same_model_at_tp2_dp2(tmp_path):
    """With TP the gradient norm and DeepSpeed's reductions must count TP-split and replicated parameters right
    (ZeRO-1 shares ZeRO-2's code path there, and the distributed optimizer runs at TP2 in most other tests)."""
    variants = {s: ["parallel.tp=2", f"parallel.sharding={s}"] for s in ("none", "zero2", "zero3")}
    _assert_same_losses(run_distributed(train_each, 4, str(tmp_path), variants)[0], "none")


# -- what each rank holds -----------------------------------------------------------------------------------------

def bytes_in_a_step(tmp: str, shardings: list[str]) -> dict[str, dict[str, int]]:
    """Per sharding, the most parameter, gradient and optimizer bytes this rank holds in a training step."""
    out = {}
    for sharding in shardings:
        cfg = _config(tmp, sharding, f"parallel.sharding={sharding}", "train.iters=2")
        env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
        try:
            out[sharding] = state_bytes_in_a_step(cfg, env)
        finally:
            destroy_distributed()
    return out


@pytest.mark.distributed
def test_each_rank_holds_its_share_of_the_training_state(tmp_path):
    """At DP=2, optimizer state halves under every sharding choice, gradients also under ZeRO-2/3, parameters
    also under ZeRO-3 (within the padding that aligns partitions)."""
    per_rank = run_distributed(bytes_in_a_step, 2, str(tmp_path), SHARDINGS)
    for rank, measured in enumerate(per_rank):
        full = measured["none"]
        # fp32 Adam: two moments per parameter; megatron updates fp32 weights in place (no master copy).
        assert full["optimizer"] == pytest.approx(2 * full["params"], rel=0.01), full
        assert full["grads"] == pytest.approx(full["params"], rel=0.01)

        def share(sharding: str, kind: str) -> float:
            return measured[sharding][kind] / full[kind]

        # DeepSpeed keeps its own fp32 partition of the weights beside the moments: 3 instead of 2 per parameter.
        expected_optimizer = {"distributed_optimizer": 0.5, "zero1": 0.75, "zero2": 0.75, "zero3": 0.75}
        for sharding, expected in expected_optimizer.items():
            assert share(sharding, "optimizer") == pytest.approx(expected, rel=0.02), (rank, sharding, measured)
        for sharding in ("distributed_optimizer", "zero1", "zero2"):
            assert share(sharding, "params") == pytest.approx(1.0, rel=0.01), (rank, sharding)
        assert share("zero3", "params") == pytest.approx(0.5, rel=0.02), (rank, measured["zero3"])
        for sharding, expected in {"distributed_optimizer": 1.0, "zero1": 1.0, "zero2": 0.5, "zero3": 0.5}.items():
            assert share(sharding, "grads") == pytest.approx(expected, rel=0.02), (rank, sharding, measured)


# -- sequence parallelism, precision ------------------------------------------------------------------------------

@pytest.mark.distributed
def test_sequence_parallelism_gives_the_same_losses(tmp_path):
    """TP=2 with and without sequence parallelism, at DP=2 and at PP=2 (the norms' gradients are summed over the
    TP ranks, each of which normalised half of the sequence)."""
    variants = {
        "tp2_dp2": ["parallel.tp=2"],
        "tp2_dp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"],
        "tp2_pp2_sp": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"],
    }
    losses = run_distributed(train_each, 4, str(tmp_path), variants)[0]
    # Measured: identical bits. Without summing the norms' gradients over TP they differ by ~4e-6 after 3 steps.
    _assert_same_losses({k: losses[k] for k in ("tp2_dp2", "tp2_dp2_sp")}, "tp2_dp2", rtol=1e-7)
    _assert_same_losses({k: losses[k] for k in ("tp2_pp2", "tp2_pp2_sp")}, "tp2_pp2", rtol=1e-7)


@pytest.mark.distributed
def test_bf16_trains_close_to_fp32_under_megatron_and_deepspeed(tmp_path):
    variants = {f"{s}_{p}": [f"parallel.sharding={s}", f"train.precision={p}"]
                for s in ("distributed_optimizer", "zero2") for p in ("fp32", "bf16")}
    losses = run_distributed(train_each, 2, str(tmp_path), variants)[0]
    for sharding in ("distributed_optimizer", "zero2"):
        fp32, bf16 = losses[f"{sharding}_fp32"], losses[f"{sharding}_bf16"]
        assert torch.isfinite(bf16).all() and not torch.equal(fp32, bf16)  # bf16 really ran
        assert ((bf16 - fp32).abs() / fp32).max() < 2e-2, (sharding, bf16, fp32)


@pytest.mark.distributed
def test_deepspeed_config_is_generated_and_merged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345, "overlap_comm": True}}))
    variants = {"merged": ["parallel.sharding=zero2", f"parallel.deepspeed_config={user}", "train.iters=2"]}
    run_distributed(train_each, 2, str(tmp_path), variants)
    written = json.loads((tmp_path / "merged" / "deepspeed_config.json").read_text())
    assert written["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345, "overlap_comm": True}
    assert (written["train_batch_size"], written["train_micro_batch_size_per_gpu"],
            written["gradient_accumulation_steps"]) == (8, 2, 2)


def finetune_into_each(tmp: str, shardings: list[str]) -> dict[str, torch.Tensor]:
    """Train a TP=2 source with the distributed optimizer, then start a run from its weights under each sharding
    at TP=1 x DP=2 (weights resharded, fresh optimizer)."""
    train(_config(tmp, "source", "parallel.tp=2", "train.iters=2", "checkpoint.save=true"))
    source = f"{tmp}/source/checkpoints/iter_0000002"
    return train_each(tmp, {s: [f"parallel.sharding={s}", f"checkpoint.load={source}", "checkpoint.finetune=true"]
                            for s in shardings})


@pytest.mark.distributed
def test_weights_load_into_every_sharding(tmp_path):
    """The same weights with a fresh optimizer train identically under every engine: ZeRO's fp32 master partitions
    must be refreshed from the loaded weights, or the first update would start from the initial ones."""
    losses = run_distributed(finetune_into_each, 2, str(tmp_path), ["none", "zero3"])[0]
    _assert_same_losses(losses, "none")


def test_untested_deepspeed_releases_are_refused_by_name():
    from mtp_megatron.config import ConfigError
    from mtp_megatron.training.deepspeed_engine import check_deepspeed_version

    check_deepspeed_version("0.19.8")
    for version in ("0.19.7", "0.20.0", "0.16.4"):
        with pytest.raises(ConfigError, match=f"DeepSpeed {version} is installed.*>=0.19.8,<0.20"):
            check_deepspeed_version(version)
