"""ZeRO-3 and FSDP2 checkpoint each rank's shard of every parameter (engines/flat_shards.py), never a whole one.

On real gloo processes with the tiny model: the checkpoint ``Checkpointer.save`` writes holds exactly the tensors
that a save of the gathered parameters (what both engines did before) writes, at layouts where the ranks' shards
cut rows, SwiGLU's fc1 halves and padding; a save allocates about the rank's shard, not the model; a ZeRO-3
checkpoint loads into megatron-core's engine, FSDP2 and ZeRO-3 at another TP x DP with the same weights; and a ZeRO-3
run whose every parameter is partitioned resumes bitwise.

ZeRO-3 keeps parameters under ``stage3_param_persistence_threshold`` (1e5 elements: all of the tiny model's)
gathered between steps; most tests set it to 0 so that every parameter is partitioned, as a 7B model's are.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtp_megatron.testing.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp: str, name: str, *overrides: str):
    from mtp_megatron.train import load_run_config

    return load_run_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "model.seq_length=32", f"run.dir={tmp}/{name}", "logging.tensorboard=false", "optim.warmup_iters=1",
        *overrides])


def _partitioned_zero3(tmp: str) -> list[str]:
    """ZeRO-3 with every parameter partitioned between steps (none kept gathered as "persistent")."""
    path = os.path.join(tmp, "zero3_partitioned.json")
    with open(path, "w") as f:
        json.dump({"zero_optimization": {"stage3_param_persistence_threshold": 0}}, f)
    return ["parallel.sharding=zero3", f"parallel.deepspeed_config={path}"]


def _engine(cfg, steps: int):
    """``cfg``'s engine (engines.build_engine) after ``steps`` training steps, and its ParallelEnv."""
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.data.loader import microbatches
    from mtp_megatron.distributed.parallel import init_distributed
    from mtp_megatron.engines import build_engine

    env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
    engine = build_engine(cfg, env)
    data = microbatches(build_datasets(cfg, env)[0], 0, cfg, env)
    for _ in range(steps):
        engine.train_step(data, env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size))
    return engine, env


def _save(cfg, env, engine, path: str, step: int = 1) -> None:
    from mtp_megatron.checkpoint.checkpointer import Checkpointer
    from mtp_megatron.training.state import TrainState

    Checkpointer(cfg, env, engine).save(TrainState(step=step), path)


def _gathered_save(cfg, env, engine, path: str) -> None:
    """What ZeRO-3 and FSDP2 saved before (their ``full_parameters``): every parameter gathered whole (its TP
    shard) on every rank, then megatron-core's sharded state dict of the bare model."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mtp_megatron.checkpoint.state import SHARDING_METADATA
    from mtp_megatron.engines.flat_shards import model_on_meta

    if env.rank == 0:
        os.makedirs(path)
    dist.barrier()
    if engine.name == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            state = engine.module.sharded_state_dict(metadata=dict(SHARDING_METADATA))
            dist_checkpointing.save({"model": state}, path)
        return
    plain = model_on_meta(cfg, env, None).to_empty(device=env.device)
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            plain.get_parameter(name).copy_(param.full_tensor())
    dist_checkpointing.save({"model": plain.sharded_state_dict(metadata=dict(SHARDING_METADATA))}, path)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a distributed checkpoint, whole, read by torch distributed checkpoint in this process
    (whatever chunks the ranks wrote)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    state = {key: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _assert_same_model_tensors(path: str, reference: str) -> None:
    ours, theirs = read_tensors(path), read_tensors(reference)
    model = {key for key in theirs if not key.startswith("optimizer.")}
    assert len(model) > 30, sorted(model)
    missing = model - ours.keys()
    assert not missing, f"{path} lacks {sorted(missing)}"
    for key in sorted(model):
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), f"{key}: {path} differs from {reference}"


# -- what a save writes -------------------------------------------------------------------------------------------

def save_both_ways(tmp: str, overrides: list[str]) -> None:
    """One training step, then the engine's checkpoint and the gathered one, of the same weights."""
    cfg = _config(tmp, "run", *overrides)
    engine, env = _engine(cfg, steps=1)
    _save(cfg, env, engine, f"{tmp}/sharded")
    _gathered_save(cfg, env, engine, f"{tmp}/gathered")


LAYOUTS = {
    # DP=3: partitions cut rows, fc1's gate/up boundary and, on the last rank, end in padding.
    "zero3_dp3": (3, ["train.global_batch_size=6", "PARTITIONED"]),
    "fsdp_dp3": (3, ["train.global_batch_size=6", "parallel.sharding=fsdp"]),
    "zero3_tp2_dp2": (4, ["parallel.tp=2", "PARTITIONED"]),
    "zero3_persistent_tp2_dp2": (4, ["parallel.tp=2", "parallel.sharding=zero3"]),
    "fsdp_tp2_dp2": (4, ["parallel.tp=2", "parallel.sharding=fsdp"]),
}


def _overrides(tmp: str, overrides: list[str]) -> list[str]:
    return [o for item in overrides for o in (_partitioned_zero3(tmp) if item == "PARTITIONED" else [item])]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_sharded_save_writes_the_tensors_a_gathered_save_wrote(tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    run_distributed(save_both_ways, world, str(tmp_path), _overrides(str(tmp_path), overrides))
    _assert_same_model_tensors(f"{tmp_path}/sharded", f"{tmp_path}/gathered")


def save_with_one_group_slow(tmp: str) -> None:
    """FSDP2 at TP=2 x DP=2 writes one optimizer checkpoint per TP rank, each by its own DP group: the TP-rank-1
    group's coordinator writes its metadata two seconds late (a slow shared file system), after rank 0's group has
    finished its own."""
    import time

    from torch.distributed.checkpoint import FileSystemWriter

    cfg = _config(tmp, "run", "parallel.tp=2", "parallel.sharding=fsdp")
    engine, env = _engine(cfg, steps=1)
    finish = FileSystemWriter.finish

    def slow_finish(self, *args, **kwargs):
        if env.tp_rank == 1:
            time.sleep(2)
        return finish(self, *args, **kwargs)

    FileSystemWriter.finish = slow_finish
    _save(cfg, env, engine, f"{tmp}/slow")


@pytest.mark.distributed
def test_the_manifest_waits_for_every_groups_files(tmp_path):
    """The save checksums the folder's files once every rank has finished writing, not when rank 0's own group
    has: otherwise the late group's metadata goes unchecksummed (or is missed, or its temporary name is read just
    as it is renamed, which failed the save)."""
    from mtp_megatron.checkpoint import store

    run_distributed(save_with_one_group_slow, 4, str(tmp_path))
    folder = f"{tmp_path}/slow"
    files = store.read_manifest(folder)["files"]
    assert sorted(files) == store.list_files(folder) and "fsdp/tp_rank_01/.metadata" in files
    unchecked = [name for name, entry in files.items() if "crc32" not in entry]
    assert not unchecked, f"saved without a checksum: {unchecked}"
    assert store.problems(folder, checksums=True) == []


# -- what a save allocates ----------------------------------------------------------------------------------------

def _allocated_peak(fn) -> int:
    """The peak of the bytes torch's CPU allocator hands out (net of what it frees) on this thread while ``fn``
    runs, from the profiler's memory events (the checkpoint writer's own threads are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def save_allocations(tmp: str, variants: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Per variant, after a step: the bytes of the whole (TP-local) model, of this rank's shard of it, and the
    allocation peak of ``Checkpointer.save``."""
    from mtp_megatron.distributed.parallel import destroy_distributed

    out = {}
    for name, overrides in variants.items():
        cfg = _config(tmp, name, *overrides)
        engine, env = _engine(cfg, steps=1)
        try:
            model = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()) * 4
            shard = sum(t.numel() for t in engine.local_parameters()) * 4
            peak = _allocated_peak(lambda: _save(cfg, env, engine, f"{tmp}/{name}_checkpoint"))
            out[name] = {"model": model, "shard": shard, "peak": peak}
        finally:
            destroy_distributed()
    return out


@pytest.mark.distributed
def test_a_save_allocates_about_the_rank_shard_not_the_model(tmp_path):
    """At DP=2 a rank holds half of the model; gathering it for the save (as ZeRO-3 and FSDP2 did) allocated the
    whole model again (measured: 1.0x its bytes and more). Now the save allocates about the rank's own shard."""
    variants = {"zero3": _partitioned_zero3(str(tmp_path)), "fsdp": ["parallel.sharding=fsdp"]}
    for rank, measured in enumerate(run_distributed(save_allocations, 2, str(tmp_path), variants)):
        for name, m in measured.items():
            assert m["shard"] == pytest.approx(m["model"] / 2, rel=0.01), (rank, name, m)
            # DeepSpeed's own optimizer file (engines save_private) serialises about a shard's worth; a gather
            # would add the whole model (2 shards) on top.
            assert m["peak"] < 1.5 * m["shard"], f"rank {rank} {name}: the save allocated {m}"


# -- loading elsewhere --------------------------------------------------------------------------------------------

def load_elsewhere(tmp: str, source: list[str], targets: dict[str, list[str]]) -> None:
    """Train and save under ``source``; start each target (another seed: other initial weights) from its weights
    and save it again."""
    from mtp_megatron.checkpoint.checkpointer import Checkpointer
    from mtp_megatron.distributed.parallel import destroy_distributed

    cfg = _config(tmp, "source", *source)
    engine, env = _engine(cfg, steps=2)
    _save(cfg, env, engine, f"{tmp}/source_checkpoint")
    destroy_distributed()
    for name, overrides in targets.items():
        cfg = _config(tmp, name, *overrides, "train.seed=7")
        engine, env = _engine(cfg, steps=0)
        try:
            Checkpointer(cfg, env, engine).load(f"{tmp}/source_checkpoint", weights_only=True)
            _save(cfg, env, engine, f"{tmp}/{name}_checkpoint", step=0)
        finally:
            destroy_distributed()


@pytest.mark.distributed
def test_a_zero3_checkpoint_loads_into_other_engines_and_layouts(tmp_path):
    """ZeRO-3 at TP1 x DP4 into megatron-core's distributed optimizer, FSDP2 and ZeRO-3 at TP2 x DP2 (weights
    only: DeepSpeed's and FSDP2's optimizer state loads at its own layout): each holds the source's weights,
    bit for bit, when it saves them again."""
    tmp = str(tmp_path)
    targets = {"megatron": ["parallel.tp=2", "parallel.sharding=distributed_optimizer"],
               "fsdp": ["parallel.tp=2", "parallel.sharding=fsdp"],
               "zero3": ["parallel.tp=2", *_partitioned_zero3(tmp)]}
    run_distributed(load_elsewhere, 4, tmp, _partitioned_zero3(tmp), targets)
    for name in targets:
        _assert_same_model_tensors(f"{tmp}/{name}_checkpoint", f"{tmp}/source_checkpoint")


# -- resuming -----------------------------------------------------------------------------------------------------

@pytest.mark.distributed
def test_zero3_resume_is_bitwise_exact_with_every_parameter_partitioned(tmp_path, byte_datasets):
    """tests/checkpoint/test_resume.py resumes ZeRO-3 with the tiny model's parameters all kept gathered; here
    every one is partitioned, so the load must refill the partitions themselves."""
    from tests.checkpoint.test_resume import _assert_bitwise_continuation, uninterrupted_and_resumed

    runs = run_distributed(uninterrupted_and_resumed, 2, str(tmp_path), byte_datasets,
                           [*_partitioned_zero3(str(tmp_path)), "model.hidden_dropout=0.1"])[0]
    _assert_bitwise_continuation(runs)
