"""With ``parallel.overlap_param_gather`` (configs/7b.yaml and 13b.yaml) checkpoints, validation and resumes see
the same weights as without it.

The distributed optimizer updates only each DP rank's shard in ``optimizer.step()`` and, with the overlap, leaves
gathering the other shards to the next forward, so a save or an evaluation right after a step must first force
that gather. megatron-core overlaps only from the second iteration on (the first counts the gradient hooks), so
the runs are several steps long, saving at step 3 and 6 and validating at steps 2, 4 and 6 (a validation's
forward gathers the weights too, so the step-3 save follows a training step directly).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.convert import native
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, SAVE_EVERY, EVAL_EVERY = 6, 3, 2
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]


def _config(tmp: str, name: str, data: list[str], *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        f"train.iters={STEPS}", "model.seq_length=64", f"run.dir={tmp}/{name}", "logging.tensorboard=false",
        f"data.paths=[{','.join(data)}]", "data.synthetic=false", f"data.cache_dir={tmp}/cache", "parallel.sharding=distributed_optimizer",
        f"checkpoint.interval={SAVE_EVERY}", f"train.eval_interval={EVAL_EVERY}", "train.eval_iters=2",
        "mtp.n_heads=2", *overrides])


def runs_with_and_without_overlap(tmp: str, data: list[str]) -> dict:
    out = {
        "off": train(_config(tmp, "off", data)),
        "on": train(_config(tmp, "on", data, *OVERLAP)),
        "first": train(_config(tmp, "split", data, *OVERLAP, f"train.stop_at_step={SAVE_EVERY}")),
        "second": train(_config(tmp, "split", data, *OVERLAP)),
    }
    return {name: [r.stats for r in history] for name, history in out.items()}


def _validation(run_dir: str) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in row.items() if k.startswith("val/") or k == "step"}
            for row in rows if any(k.startswith("val/") for k in row)]


@pytest.mark.distributed
def test_overlapped_param_gather_saves_validates_and_resumes_the_real_weights(tmp_path, byte_datasets):
    tmp = str(tmp_path)
    stats = run_distributed(runs_with_and_without_overlap, 2, tmp, byte_datasets)[0]
    for step, (off, on) in enumerate(zip(stats["off"], stats["on"]), start=1):
        assert torch.equal(off, on), f"step {step}: training differs with the overlap"
    for step, (on, resumed) in enumerate(zip(stats["on"], stats["first"] + stats["second"]), start=1):
        assert torch.equal(on, resumed), f"step {step}: the resumed run differs from the uninterrupted one"

    validation = {name: _validation(f"{tmp}/{name}") for name in ("off", "on")}
    assert [row["step"] for row in validation["off"]] == [2, 4, 6]
    assert validation["on"] == validation["off"]

    for step in (SAVE_EVERY, STEPS):
        folder = f"checkpoints/iter_{step:07d}"
        _, off = native.read_checkpoint(f"{tmp}/off/{folder}")
        _, on = native.read_checkpoint(f"{tmp}/on/{folder}")
        assert off.keys() == on.keys()
        differing = [key for key in off if not torch.equal(off[key], on[key])]
        assert not differing, f"step {step}: saved weights differ with the overlap: {differing[:4]}"
