"""The planner's pipeline balance (issue 16): per-stage training FLOPs with the heads, unembeddings and
cross-entropies on the last stage, ``parallel.layers_per_stage=auto`` and the 13B config's split.

Pure arithmetic on the configs (no processes): the even 13B split leaves the first stage waiting, auto and
configs/13b.yaml meet slowest / mean <= 1.05, and tools/plan.py prints each stage's share and the balance.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mtp_megatron.config import load_config
from mtp_megatron.distributed.pipeline_split import (
    balanced_split, pipeline_balance, resolve_layers_per_stage, stage_flops,
)
from mtp_megatron.planner.estimate import Hardware, estimate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C13B = os.path.join(REPO, "configs", "13b.yaml")


def _13b(*overrides: str):
    cfg = load_config(C13B, ["model.vocab_size=32000", *overrides])
    resolve_layers_per_stage(cfg)
    return cfg


def test_the_even_13b_split_is_unbalanced_and_auto_balances_it():
    even = _13b("parallel.layers_per_stage=null")
    flops = stage_flops(even, [18, 18])
    assert flops[1] / flops[0] > 1.3  # the last stage's heads and unembeddings: ~1.32x the first stage's work
    assert pipeline_balance(flops) > 1.12

    cfg = _13b()
    assert cfg.parallel.layers_per_stage == balanced_split(cfg) == [21, 15]
    assert sum(cfg.parallel.layers_per_stage) == cfg.trunk_num_layers()
    plan = estimate(cfg, 128, Hardware(gpu_memory_gib=80))
    assert plan.balance <= 1.05 and plan.fits
    # No other split is better: auto picks the one whose slowest stage does the least.
    best = min(max(stage_flops(cfg, [k, 36 - k])) for k in range(1, 36))
    assert max(stage_flops(cfg, [21, 15])) == best


def test_stage_flops_add_up_to_the_model_and_the_heads_sit_on_the_last_stage():
    cfg = _13b()
    one_head = _13b("mtp.n_heads=1")
    assert sum(stage_flops(cfg, [21, 15])) > sum(stage_flops(one_head, [21, 15]))
    # Moving a trunk layer between stages moves FLOPs, not their sum.
    assert abs(sum(stage_flops(cfg, [20, 16])) - sum(stage_flops(cfg, [21, 15]))) < 1e-6 * sum(
        stage_flops(cfg, [21, 15]))


def test_plan_cli_prints_stage_shares_balance_and_the_save_line():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan.py"), "--config", C13B, "--nodes", "16",
                          "--gpus-per-node", "8", "--gpu-memory-gb", "80"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "slowest stage / mean stage = 1.004" in out.stdout
    assert "embed + 21 layers" in out.stdout and "15 layers + 4 heads + unembed" in out.stdout
    assert "Checkpoint save: no extra GPU memory" in out.stdout
