"""The distributed optimizer's checkpoint form: each DP rank writes its own ranges, with no gather
(engines/distributed_optimizer_checkpoint.py), yet the checkpoint holds the same tensors as megatron-core's
``fully_reshardable`` form, and checkpoints written in that form still resume exactly.

Resharding in the new form across TP x PP x DP is tests/checkpoint/test_resume.py's
``test_checkpoint_reshards_between_tp2_pp2_and_tp1_pp1``; the save's memory is bench/checkpoint_io.py's.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mtp_megatron.checkpoint import checkpointer as checkpointer_module
from mtp_megatron.checkpoint.state import LEGACY_SHARDING_METADATA, SHARDING_METADATA, read_meta
from mtp_megatron.config import load_config
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = 2


def _config(tmp: str, name: str, data: list[str], *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        f"train.iters={2 * K}", "model.seq_length=64", f"run.dir={tmp}/{name}", "logging.tensorboard=false",
        f"data.paths=[{','.join(data)}]", "data.synthetic=false", f"data.cache_dir={tmp}/cache",
        "parallel.sharding=distributed_optimizer", "model.hidden_dropout=0.1", *overrides])


def save_in_both_forms_and_resume(tmp: str, data: list[str], layout: list[str]) -> dict:
    """K steps saved in each form (the same training), then K more from each checkpoint."""
    stats = {}
    for form, metadata in (("new", SHARDING_METADATA), ("legacy", LEGACY_SHARDING_METADATA)):
        checkpointer_module.SHARDING_METADATA = metadata  # what a save writes (a load reads the checkpoint's)
        try:
            train(_config(tmp, form, data, *layout, f"train.stop_at_step={K}"))
        finally:
            checkpointer_module.SHARDING_METADATA = SHARDING_METADATA
        stats[form] = [result.stats for result in train(_config(tmp, form, data, *layout))]
    return stats


def _optimizer_tensors(folder: str, out: str) -> dict:
    dcp_to_torch_save(folder, out)
    state = torch.load(out, weights_only=False)
    return {key: value for key, value in state.items() if key.startswith("optimizer.state.")}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"]], ids=["dp2", "tp2_dp2"])
def test_checkpoint_holds_what_fully_reshardable_holds_and_both_resume_alike(tmp_path, byte_datasets, layout):
    ranks = 2 if layout == ["parallel.tp=1"] else 4
    stats = run_distributed(save_in_both_forms_and_resume, ranks, str(tmp_path), byte_datasets, layout)[0]
    # Both resumed runs continue identically (the legacy checkpoint is read in its own form).
    assert len(stats["new"]) == len(stats["legacy"]) == K
    for a, b in zip(stats["new"], stats["legacy"]):
        assert torch.equal(a, b)

    folders = {form: f"{tmp_path}/{form}/checkpoints/iter_{K:07d}" for form in ("new", "legacy")}
    assert read_meta(folders["new"])["sharding_metadata"] == SHARDING_METADATA
    assert read_meta(folders["legacy"])["sharding_metadata"] == LEGACY_SHARDING_METADATA
    new = _optimizer_tensors(folders["new"], str(tmp_path / "new.pt"))
    legacy = _optimizer_tensors(folders["legacy"], str(tmp_path / "legacy.pt"))
    # Every Adam moment and main weight, whole, with the parameter's global shape, bit for bit.
    assert sorted(new) == sorted(legacy) and any(".exp_avg_sq." in key for key in new)
    for key in legacy:
        assert new[key].shape == legacy[key].shape, key
        assert torch.equal(new[key], legacy[key]), key
