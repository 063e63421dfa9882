"""Resuming from checkpoints: bitwise-exact continuation, resharding across layouts, clear errors, NaN policy.

Every run is the real ``train(cfg)`` entry point on real gloo processes, reading a real two-dataset blend, so the
checkpoint carries the data position (consumed samples) as well as model, optimizer, LR schedule and RNG.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config import load_config
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = 3  # steps before the interruption; runs are 2K steps long


def _config(tmp: str, name: str, data: list[str], *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        f"train.iters={2 * K}", "model.seq_length=64", f"run.dir={tmp}/{name}", "logging.tensorboard=false",
        f"data.paths=[{','.join(data)}]", "data.synthetic=false", f"data.cache_dir={tmp}/cache", *overrides])


def _stats(history) -> list[torch.Tensor]:
    return [result.stats for result in history]


def _iter(tmp: str, name: str, step: int) -> str:
    return f"{tmp}/{name}/checkpoints/iter_{step:07d}"


# -- exact resume -------------------------------------------------------------------------------------------------

def uninterrupted_and_resumed(tmp: str, data: list[str], overrides: list[str]) -> dict:
    """2K steps in one go; and K steps, stop, K more from the checkpoint (same run folder, resume=auto)."""
    full = train(_config(tmp, "full", data, *overrides))
    first = train(_config(tmp, "split", data, *overrides, f"train.stop_at_step={K}"))
    second = train(_config(tmp, "split", data, *overrides))
    return {"full": _stats(full), "first": _stats(first), "second": _stats(second)}


def _assert_bitwise_continuation(runs: dict) -> None:
    assert len(runs["first"]) == K and len(runs["second"]) == K
    for step, (a, b) in enumerate(zip(runs["full"], runs["first"] + runs["second"]), start=1):
        assert torch.equal(a, b), f"step {step}: per-head stats {b[:, 0].tolist()} != {a[:, 0].tolist()}"
    # The resumed steps moved the model (a run that reloaded nothing would not match, a frozen one neither).
    assert not torch.equal(runs["full"][K][:, 0], runs["full"][-1][:, 0])


@pytest.mark.distributed
def test_resume_is_bitwise_exact_under_tp2_pp2(tmp_path, byte_datasets):
    """TP2 x PP2 with dropout on: continuing needs the optimizer, LR schedule, data position and RNG streams."""
    runs = run_distributed(uninterrupted_and_resumed, 4, str(tmp_path), byte_datasets,
                           ["parallel.tp=2", "parallel.pp=2", "model.hidden_dropout=0.1"])[0]
    _assert_bitwise_continuation(runs)


@pytest.mark.distributed
@pytest.mark.parametrize("sharding", ["distributed_optimizer", "none", "zero1", "zero2", "zero3", "fsdp"])
def test_resume_is_bitwise_exact_under_data_parallelism(tmp_path, byte_datasets, sharding):
    """DP=2: under the distributed optimizer, ZeRO and FSDP2 the optimizer state is sharded over the two ranks
    (megatron-core gathers and re-splits it; DeepSpeed writes and reads each rank's partition; FSDP2's goes
    through torch distributed checkpoint)."""
    runs = run_distributed(uninterrupted_and_resumed, 2, str(tmp_path), byte_datasets,
                           [f"parallel.sharding={sharding}", "model.hidden_dropout=0.1"])[0]
    _assert_bitwise_continuation(runs)


# -- resharding ---------------------------------------------------------------------------------------------------

def resume_at_other_layouts(tmp: str, data: list[str]) -> dict:
    """From each layout's step-K checkpoint, continue at the same layout and at the other one."""
    layouts = {"tp2pp2": ["parallel.tp=2", "parallel.pp=2"], "tp1pp1": ["parallel.tp=1", "parallel.pp=1"]}
    out = {}
    for name, layout in layouts.items():
        train(_config(tmp, name, data, *layout, f"train.stop_at_step={K}"))
        out[name] = _stats(train(_config(tmp, name, data, *layout)))  # same layout: the reference
        other = next(o for o in layouts if o != name)
        out[f"{name}->{other}"] = _stats(
            train(_config(tmp, f"{name}_to_{other}", data, *layouts[other], f"checkpoint.load={_iter(tmp, name, K)}")))
    return out


@pytest.mark.distributed
def test_checkpoint_reshards_between_tp2_pp2_and_tp1_pp1(tmp_path, byte_datasets):
    """TP2 x PP2 x DP1 <-> TP1 x PP1 x DP4 (distributed optimizer): model and optimizer state reshard."""
    runs = run_distributed(resume_at_other_layouts, 4, str(tmp_path), byte_datasets)[0]
    for source, target in (("tp2pp2", "tp1pp1"), ("tp1pp1", "tp2pp2")):
        reference, resharded = runs[source], runs[f"{source}->{target}"]
        assert len(reference) == len(resharded) == K
        for step, (a, b) in enumerate(zip(reference, resharded), start=K + 1):
            loss_a, loss_b = a[:, 0] / a[:, 2], b[:, 0] / b[:, 2]
            assert torch.allclose(loss_b, loss_a, rtol=1e-5, atol=0), f"{source}->{target} step {step}"


# -- errors -------------------------------------------------------------------------------------------------------

def load_errors(tmp: str, data: list[str]) -> dict:
    """Save one checkpoint, then try to start from it in ways that must fail; return the error messages."""
    train(_config(tmp, "source", data, "train.iters=2"))
    source = _iter(tmp, "source", 2)
    attempts = {
        "shape": ["model.hidden_size=128", "mtp.n_heads=2"],
        "optimizer": ["parallel.sharding=none"],
        "never": [],
    }
    messages = {}
    for name, overrides in attempts.items():
        run = "source" if name == "never" else name
        extra = ["checkpoint.resume=never"] if name == "never" else [f"checkpoint.load={source}"]
        try:
            train(_config(tmp, run, data, *overrides, *extra))
        except CheckpointError as error:
            messages[name] = str(error)
    # Weights only, into another optimizer setup, is what finetune is for: it starts at step 0.
    finetuned = train(_config(tmp, "finetune", data, "parallel.sharding=none", "train.iters=1",
                              f"checkpoint.load={source}", "checkpoint.finetune=true"))
    messages["finetune_steps"] = len(finetuned)
    shard = next(name for name in sorted(os.listdir(source)) if name.endswith(".distcp"))
    os.remove(os.path.join(source, shard))
    try:
        train(_config(tmp, "missing", data, f"checkpoint.load={source}"))
    except CheckpointError as error:
        messages["missing"] = str(error)
    messages["shard"] = shard
    return messages


@pytest.mark.distributed
def test_wrong_checkpoints_fail_with_the_reason_and_the_fix(tmp_path, byte_datasets):
    messages = run_distributed(load_errors, 1, str(tmp_path), byte_datasets)[0]
    shape = messages["shape"]
    assert "model.hidden_size: checkpoint 64, this run 128" in shape
    assert "mtp.n_heads: checkpoint 4, this run 2" in shape
    assert "model.num_layers" not in shape  # only the fields that differ
    assert "sharding: checkpoint 'distributed_optimizer', this run 'none'" in messages["optimizer"]
    assert "checkpoint.finetune=true" in messages["optimizer"]
    assert "checkpoint.resume=never" in messages["never"] and "new run.dir" in messages["never"]
    assert messages["finetune_steps"] == 1
    assert messages["shard"] in messages["missing"] and "is missing" in messages["missing"]


def test_shape_mismatch_exits_2_from_the_command_line(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "train.iters=1",
            "model.seq_length=32", "logging.tensorboard=false"]
    first = subprocess.run([*base, f"run.dir={tmp_path}/a"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*base, f"run.dir={tmp_path}/b", "model.num_layers=6",
                             f"checkpoint.load={tmp_path}/a/checkpoints/iter_0000001"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "model.num_layers: checkpoint 5, this run 6" in second.stderr
    assert "Traceback" not in second.stderr


# -- non-finite steps ---------------------------------------------------------------------------------------------

def train_with_nan_in_head(tmp: str, data: list[str], head: int, steps: set, overrides: list[str],
                           deepspeed_blind: bool = False):
    """Train with the output of head ``head``'s transformer layer turned to NaN during the given steps.
    ``deepspeed_blind``: switch off ZeRO's own overflow check, as some DeepSpeed releases have it for bf16."""
    import mtp_megatron.engines as engines

    current = {"step": 0}
    build = engines.build_engine

    def build_with_poison(cfg, env, module=None):
        engine = build(cfg, env, module)
        train_step = engine.train_step

        def counting_train_step(*args, **kwargs):
            current["step"] += 1
            return train_step(*args, **kwargs)

        engine.train_step = counting_train_step
        if env.is_last_stage:
            def poison(module, args, output):
                if current["step"] in steps:
                    return (output[0] * float("nan"), *output[1:])
            engine.module.mtp_heads.layers[head - 1].register_forward_hook(poison)
        if deepspeed_blind:
            engine.model.optimizer.check_grad_overflow = False
        return engine

    engines.build_engine = build_with_poison
    cfg = _config(tmp, "nan", data, "parallel.pp=2", "checkpoint.interval=1", *overrides)
    try:
        history = train(cfg)
    except Exception as error:  # the caller inspects it
        return {"error": f"{type(error).__name__}: {error}", "checkpoints": sorted(os.listdir(f"{cfg.run.dir}/checkpoints"))}
    finally:
        engines.build_engine = build
    metrics = [json.loads(line) for line in open(f"{cfg.run.dir}/metrics.jsonl")]
    return {"history": history, "metrics": metrics}


@pytest.mark.distributed
@pytest.mark.parametrize("engine", [[], ["parallel.pp=1", "parallel.sharding=zero2"],
                                    ["parallel.pp=1", "parallel.sharding=zero2", "train.precision=bf16", "blind"],
                                    ["parallel.pp=1", "parallel.sharding=fsdp"]],
                         ids=["megatron_pp2", "zero2", "zero2_bf16_without_deepspeeds_own_check", "fsdp"])
def test_nan_policy_skip_drops_the_update_and_goes_on(tmp_path, byte_datasets, engine):
    """Under DeepSpeed the trainer's own check must drop the update even where ZeRO would apply it."""
    blind = "blind" in engine
    overrides = [o for o in engine if o != "blind"]
    out = run_distributed(train_with_nan_in_head, 2, str(tmp_path), byte_datasets, 2, {3}, overrides, blind)[0]
    history, metrics = out["history"], out["metrics"]
    assert [r.update_skipped for r in history] == [False, False, True, False, False, False]
    assert history[2].nonfinite_heads == [2]  # head 2 only; the others' losses stayed finite
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    # The LR schedule did not advance on the skipped step, and the following steps trained on finite weights
    # (the final checkpoint was written, which is refused for non-finite weights).
    assert metrics[3]["lr"] == metrics[2]["lr"]
    assert all(torch.isfinite(r.stats).all() for i, r in enumerate(history) if i != 2)


@pytest.mark.distributed
def test_nan_policy_stop_names_step_and_head_and_saves_nothing(tmp_path, byte_datasets):
    out = run_distributed(train_with_nan_in_head, 2, str(tmp_path), byte_datasets, 2, {3},
                          ["train.nan_policy=stop"])[0]
    assert out["error"].startswith("NonFiniteStepError: step 3: the loss of head 2 (nan) is not finite")
    assert "nothing was saved" in out["error"] and "iter_0000002" in out["error"]
    assert out["checkpoints"] == ["iter_0000001", "iter_0000002", "latest"]


@pytest.mark.distributed
def test_nan_skip_limit_stops_a_diverging_run(tmp_path, byte_datasets):
    out = run_distributed(train_with_nan_in_head, 2, str(tmp_path), byte_datasets, 1, {3, 4, 5, 6},
                          ["train.nan_skip_limit=2"])[0]
    assert out["error"].startswith("NonFiniteStepError: step 5: the loss of head 1 (nan) is not finite, 3 skipped")
    assert out["checkpoints"][-2:] == ["iter_0000004", "latest"]


def _torchrun(run_dir: str, *overrides: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "mtp_megatron.train",
         "data.synthetic=true", "parallel.pp=2", "train.iters=8", "logging.tensorboard=false", f"run.dir={run_dir}",
         *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [[], ["parallel.pp=1", "parallel.sharding=fsdp", "model.hidden_dropout=0.1"]],
                         ids=["megatron_pp2", "fsdp_dp2"])
def test_resume_on_synthetic_data_is_bitwise_through_the_cli(tmp_path, layout):
    """Fresh torchrun processes, PP=2 (or FSDP2 at DP=2, with dropout), the default config (two DataLoader
    workers, byte vocabulary, whose padding id the mock data contains): the stopped and resumed run logs every
    step's per-head losses and gradient norm exactly as the uninterrupted one (megatron-core's loss-mask cache
    once made step 7 differ)."""
    _torchrun(f"{tmp_path}/full", *layout)
    _torchrun(f"{tmp_path}/split", *layout, "train.stop_at_step=6")
    _torchrun(f"{tmp_path}/split", *layout)
    full, split = _metrics(f"{tmp_path}/full"), _metrics(f"{tmp_path}/split")
    assert [m["step"] for m in split] == [m["step"] for m in full] == list(range(1, 9))
    keys = ["loss", *(f"loss/head_{i}" for i in range(1, 5)), "grad_norm"]
    for a, b in zip(full, split):
        assert [a[k] for k in keys] == [b[k] for k in keys], f"step {a['step']}"
