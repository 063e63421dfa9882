"""Every head design trains through the user's command (torchrun + ``python -m mtp_megatron.train``) under TP2 x PP2,
with loss weights and a weight schedule in the logged objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24
N = 4


def _train(run_dir, *overrides: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "-m", "mtp_megatron.train",
         "--config", "configs/tiny.yaml", "parallel.tp=2", "parallel.pp=2", f"train.iters={STEPS}",
         "model.seq_length=64", "logging.tensorboard=false", "checkpoint.save=false", f"run.dir={run_dir}",
         *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _falls(records: list[dict], key: str) -> tuple[float, float]:
    first = sum(r[key] for r in records[:4]) / 4
    last = sum(r[key] for r in records[-4:]) / 4
    return first, last


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("head_type, extra", [
    # Loss weights: the logged loss is the weighted objective, the per-head losses stay unweighted.
    ("linear", ("mtp.loss_weights=[1,0.5,0.5,0.5]",)),
    # A schedule: weights [1, 0.3, 0.3, 0.3] until step 12, then [1, 0.1, 0.1, 0.1] (DeepSeek-V3's form).
    ("causal", ("mtp.loss_weights=[1,0.3,0.3,0.3]", "mtp.loss_weight_schedule=[[13,1,0.1,0.1,0.1]]")),
    ("anticausal", ()),
    ("cp", ("mtp.cp_rank=2",)),
])
def test_every_design_trains_under_tp2_pp2(tmp_path, head_type, extra):
    records = _train(tmp_path / "run", f"mtp.head_type={head_type}", *extra)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for i in range(1, N + 1):
        first, last = _falls(records, f"loss/head_{i}")
        assert last < 0.8 * first, f"{head_type}: head {i}'s loss {first:.3f} -> {last:.3f}"
    if head_type == "cp":
        for r in records:
            assert r["loss"] == pytest.approx(r["cp/joint"] + 0.01 * r["cp/balance"], rel=1e-9)
            assert sum(r[f"cp/weight_{a}"] for a in (1, 2)) == pytest.approx(1.0, abs=1e-6)
            # The joint loss of n tokens is at least each single token's marginal loss.
            assert r["cp/joint"] >= max(r[f"loss/head_{i}"] for i in range(1, N + 1)) - 1e-6
        return
    weights = {"linear": lambda step: [1, 0.5, 0.5, 0.5],
               "causal": lambda step: [1, 0.3, 0.3, 0.3] if step < 13 else [1, 0.1, 0.1, 0.1],
               "anticausal": lambda step: [1, 1, 1, 1]}[head_type]
    for r in records:
        expected = sum(w * r[f"loss/head_{i}"] for i, w in enumerate(weights(r["step"]), start=1))
        assert r["loss"] == pytest.approx(expected, rel=1e-9), f"step {r['step']}"
