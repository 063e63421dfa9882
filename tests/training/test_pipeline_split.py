"""Uneven pipeline splits (``parallel.layers_per_stage``) train the same model as the even split.

configs/tiny.yaml's 4-layer trunk at TP1 x PP2 x DP1 (two gloo processes), split [2, 2] (null, the even split),
[3, 1], [1, 3] and ``auto`` (the FLOP-balanced split, [3, 1] for tiny: its 4 heads and unembeddings make the
last stage the heavy one). Every layer starts from the stream of its global index (model/initialization.py), so
every split starts from the same weights; the per-head losses and gradient norms of a few real steps through
``train`` match within 1e-5, and so does every parameter's first-step gradient, keyed by its global name. A
checkpoint saved at [3, 1] resumes at [2, 2] and at PP1 with the same next-step losses, one saved at [2, 2]
resumes at [1, 3], and tools/convert_checkpoint.py reads a [3, 1] checkpoint. Bad splits exit 2 before any work.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from mtp_megatron.config import ConfigError, load_config, validate
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 1e-5
STEPS = 3
SPLITS = {"even": "null", "3_1": "[3,1]", "1_3": "[1,3]", "auto": "auto"}


def _config(tmp: str, name: str, data: list[str], *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "parallel.pp=2", f"train.iters={STEPS}", "model.seq_length=64", f"run.dir={tmp}/{name}",
        "logging.tensorboard=false", f"data.paths=[{','.join(data)}]", "data.synthetic=false",
        f"data.cache_dir={tmp}/cache", *overrides])


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# -- training through train() ------------------------------------------------------------------------------------

def train_each_split(tmp: str, data: list[str]) -> dict:
    """Per split: every step's per-head losses and gradient norm, and the split the run's config.yaml records."""
    out = {}
    for name, split in SPLITS.items():
        history = train(_config(tmp, name, data, f"parallel.layers_per_stage={split}", "checkpoint.save=false"))
        with open(os.path.join(tmp, name, "config.yaml")) as f:
            saved = yaml.safe_load(f)["parallel"]["layers_per_stage"]
        out[name] = {"losses": [r.head_loss for r in history], "grad_norms": [r.grad_norm for r in history],
                     "saved": saved}
    return out


@pytest.mark.distributed
def test_uneven_splits_train_like_the_even_split(tmp_path, byte_datasets):
    runs = run_distributed(train_each_split, 2, str(tmp_path), byte_datasets)[0]
    even = runs["even"]
    assert len(even["losses"]) == STEPS and len(even["losses"][0]) == 4
    for name in ("3_1", "1_3", "auto"):
        for step in range(STEPS):
            for head, (a, b) in enumerate(zip(runs[name]["losses"][step], even["losses"][step]), start=1):
                assert _relative(a, b) <= RTOL, f"{name} step {step + 1} head {head}: {a} vs even {b}"
            assert _relative(runs[name]["grad_norms"][step], even["grad_norms"][step]) <= RTOL, (name, step)
    # auto is resolved before the run starts: its config.yaml records the list it trained with.
    assert runs["auto"]["saved"] == [3, 1] and runs["3_1"]["saved"] == [3, 1] and even["saved"] is None
    # The steps did train.
    assert abs(even["losses"][-1][0] - even["losses"][0][0]) > 100 * RTOL * even["losses"][0][0]


# -- the first step's gradients, parameter by parameter -----------------------------------------------------------

def _global_name(name: str, first_layer: int) -> str:
    """``decoder.layers.<local>.`` -> ``decoder.layers.<global>.``; the embedding and heads keep their names."""
    return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + first_layer}.", name)


def first_step_gradients(tmp: str, data: list[str]) -> dict:
    """Per split, on this rank: the trunk layers its stage built and step 1's gradient of each of its parameters
    (``Engine.gathered_gradients`` after the last backward), by global name."""
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.data.loader import microbatches
    from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed
    from mtp_megatron.distributed.pipeline_split import layers_per_stage
    from mtp_megatron.engines import build_engine

    out = {}
    for name, split in SPLITS.items():
        cfg = _config(tmp, name, data, f"parallel.layers_per_stage={split}", "checkpoint.save=false")
        env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
        try:
            engine = build_engine(cfg, env)
            batches = microbatches(build_datasets(cfg, env)[0], 0, cfg, env)
            grads = {}
            engine.train_step(batches, env.dims.num_microbatches(cfg.train.global_batch_size,
                                                                  cfg.train.micro_batch_size),
                              after_backward=lambda final: final and grads.update(engine.gathered_gradients()))
            first_layer = sum(layers_per_stage(cfg)[:env.pp_rank])
            out[name] = {"built": len(engine.module.decoder.layers),
                         "grads": {_global_name(k, first_layer): v for k, v in grads.items()}}
        finally:
            destroy_distributed()
    return out


@pytest.mark.distributed
def test_uneven_splits_compute_the_same_first_gradients(tmp_path, byte_datasets):
    per_rank = run_distributed(first_step_gradients, 2, str(tmp_path), byte_datasets)
    expected = {"even": [2, 2], "3_1": [3, 1], "1_3": [1, 3], "auto": [3, 1]}
    merged = {}
    for name in SPLITS:
        assert [rank[name]["built"] for rank in per_rank] == expected[name], name
        merged[name] = {k: v for rank in per_rank for k, v in rank[name]["grads"].items()}
    reference = merged["even"]
    assert sum(k.startswith("decoder.layers.3.") for k in reference) > 0 and len(reference) > 40
    for name in ("3_1", "1_3", "auto"):
        assert merged[name].keys() == reference.keys(), name
        for param, grad in reference.items():
            worst = (merged[name][param] - grad).abs().max().item() / grad.abs().max().clamp(min=1e-30).item()
            assert worst <= RTOL, f"{name}: {param}'s gradient differs from the even split's by {worst:.2e}"


# -- checkpoints ----------------------------------------------------------------------------------------------------

K = 2  # steps before the checkpoint; the runs continue for K more


def _iter(tmp: str, name: str) -> str:
    return f"{tmp}/{name}/checkpoints/iter_{K:07d}"


def _losses(history) -> list[torch.Tensor]:
    return [r.stats[:, 0] / r.stats[:, 2] for r in history]


def resume_across_splits(tmp: str, data: list[str]) -> dict:
    """A [3, 1] run and an even run stop at step K (saving) and continue (the references); each checkpoint is
    also loaded at other splits and pp sizes and trained on to step 2K."""
    steps = f"train.iters={2 * K}"
    out = {}
    for source, split in (("3_1", "[3,1]"), ("even", "null")):
        train(_config(tmp, source, data, steps, f"parallel.layers_per_stage={split}", f"train.stop_at_step={K}"))
        out[source] = _losses(train(_config(tmp, source, data, steps, f"parallel.layers_per_stage={split}")))
    targets = [("3_1", "even", ["parallel.layers_per_stage=null"]),
               ("3_1", "pp1", ["parallel.pp=1", "parallel.layers_per_stage=null"]),
               ("even", "1_3", ["parallel.layers_per_stage=[1,3]"])]
    for source, target, overrides in targets:
        out[f"{source}->{target}"] = _losses(train(_config(
            tmp, f"{source}_to_{target}", data, steps, *overrides, f"checkpoint.load={_iter(tmp, source)}")))
    return out


@pytest.mark.distributed
def test_checkpoints_reshard_between_even_and_uneven_splits(tmp_path, byte_datasets):
    runs = run_distributed(resume_across_splits, 2, str(tmp_path), byte_datasets)[0]
    for key in ("3_1->even", "3_1->pp1", "even->1_3"):
        reference = runs[key.split("->")[0]]
        assert len(runs[key]) == len(reference) == K
        for step, (a, b) in enumerate(zip(runs[key], reference), start=K + 1):
            assert torch.allclose(a, b, rtol=RTOL, atol=0), f"{key} step {step}: {a.tolist()} vs {b.tolist()}"
    # The resumed steps are not the first steps again (the checkpoint's weights were loaded).
    assert not torch.allclose(runs["3_1"][0], runs["3_1"][-1], rtol=100 * RTOL, atol=0)

    # tools/convert_checkpoint.py reads the [3, 1] checkpoint (in one process, as TP1 x PP1) and writes it back
    # for PP1: the same weights.
    from mtp_megatron.convert.native import read_checkpoint

    source = _iter(str(tmp_path), "3_1")
    converted = str(tmp_path / "converted")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools/convert_checkpoint.py"), "--input", source,
                           "--output", converted, "--to", "megatron"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cfg, weights = read_checkpoint(source)
    converted_cfg, converted_weights = read_checkpoint(converted)
    assert cfg.parallel.layers_per_stage == [3, 1] and converted_cfg.parallel.layers_per_stage is None
    assert converted_weights.keys() == weights.keys()
    assert all(torch.equal(converted_weights[k], weights[k]) for k in weights)


# -- bad splits ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,expected", [
    ("[3,2]", "[3, 2] sums to 5, but the trunk has 4 layers"),
    ("[4]", "[4] has 1 entry, but parallel.pp=2"),
    ("[4,0]", "[4, 0] leaves a stage without trunk layers"),
])
def test_a_bad_split_names_the_field_and_the_nearest_valid_split(split, expected):
    with pytest.raises(ConfigError) as error:
        validate(load_config(os.path.join(REPO, "configs/tiny.yaml"),
                             ["parallel.pp=2", f"parallel.layers_per_stage={split}"]))
    (problem,) = error.value.problems
    assert problem.startswith(f"parallel.layers_per_stage: {expected}") and "Fix: use [" in problem


def test_middle_stages_must_be_even_and_auto_needs_a_layer_per_stage():
    tiny = os.path.join(REPO, "configs/tiny.yaml")
    with pytest.raises(ConfigError) as error:  # 8-layer trunk at pp=4: megatron-core splits the middle evenly
        validate(load_config(tiny, ["model.num_layers=9", "parallel.pp=4", "parallel.layers_per_stage=[1,3,2,2]"]))
    assert "must be equal. Fix: use [1, 2, 2, 3]" in error.value.problems[0]
    validate(load_config(tiny, ["model.num_layers=9", "parallel.pp=4", "parallel.layers_per_stage=[3,1,1,3]"]))
    validate(load_config(tiny, ["parallel.pp=3", "parallel.layers_per_stage=[1,2,1]"]))  # no even split exists
    with pytest.raises(ConfigError, match="auto' cannot give each of the pp=8 stages"):
        validate(load_config(tiny, ["parallel.pp=8", "parallel.layers_per_stage=auto"]))


def test_the_command_line_exits_2_before_any_work(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "parallel.pp=2",
         "parallel.layers_per_stage=[3,2]", f"run.dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "parallel.layers_per_stage: [3, 2] sums to 5" in done.stderr and "Fix: use [2, 2]" in done.stderr
    assert not os.path.exists(tmp_path / "run")
