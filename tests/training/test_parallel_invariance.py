"""The same initial weights and batches give the same per-head losses under TP1PP1, TP2PP1, TP1PP2 and TP2PP2.

All layouts run in one 4-process job (so DP is 4, 2, 2 and 1 respectively, with the distributed optimizer and
the same global batches). The TP1PP1 model saves its initial weights as a distributed checkpoint, and every
other layout loads them resharded (``checkpoint.finetune``), then trains a few real steps through the full loop (data, schedule, DDP,
optimizer, LR schedule), reading a real two-dataset blend through GPTDataset, broadcast over TP.
"""

from __future__ import annotations

import os

import pytest
from megatron.core import parallel_state

from mtp_megatron.checkpoint.checkpointer import Checkpointer, save_weights
from mtp_megatron.config import load_config
from mtp_megatron.data.datasets import build_datasets
from mtp_megatron.distributed.parallel import init_distributed
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.training.loop import fit
from mtp_megatron.training.metrics import MetricsLogger
from mtp_megatron.training.setup import setup_model_and_optimizer

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
STEPS = 4
RTOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_each_layout(tmp: str, data_paths: list[str], extra: list[str]) -> dict:
    losses = {}
    initial_weights = f"{tmp}/initial_weights"
    for tp, pp in LAYOUTS:
        reference = (tp, pp) == LAYOUTS[0]
        cfg = load_config(
            os.path.join(REPO, "configs/tiny.yaml"),
            [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.iters={STEPS}", "model.seq_length=64",
             f"run.dir={tmp}/run_tp{tp}pp{pp}", "logging.tensorboard=false", f"data.cache_dir={tmp}/cache",
             f"data.paths=[{','.join(data_paths)}]", *extra,
             "checkpoint.save=false", f"checkpoint.load={'null' if reference else initial_weights}",
             f"checkpoint.finetune={'false' if reference else 'true'}"],
        )
        env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
        model, optimizer, scheduler = setup_model_and_optimizer(cfg, env)
        if reference:
            save_weights(model, env, cfg, initial_weights)
        else:
            Checkpointer(cfg, env, model, optimizer, scheduler).restore()
        train_data, _ = build_datasets(cfg, env)
        os.makedirs(cfg.run.dir, exist_ok=True)
        logger = MetricsLogger(cfg, cfg.run.dir, env.rank, env.dims.world_size)
        history = fit(cfg, env, model, optimizer, scheduler, train_data, None, logger)
        logger.close()
        losses[(tp, pp)] = [r.head_loss for r in history]
        parallel_state.destroy_model_parallel()
    return losses


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [[], ["data.reset_attention_mask=true", "data.eod_mask_loss=true"]],
                         ids=["causal", "document_masks"])
def test_losses_match_across_tp_pp_layouts(tmp_path, byte_datasets, extra):
    losses = run_distributed(train_each_layout, 4, str(tmp_path), byte_datasets, extra)[0]
    reference = losses[LAYOUTS[0]]
    assert len(reference) == STEPS and len(reference[0]) == 4  # n=4 heads in tiny.yaml
    for layout in LAYOUTS[1:]:
        for step, (ref_heads, heads) in enumerate(zip(reference, losses[layout])):
            for head, (a, b) in enumerate(zip(ref_heads, heads), start=1):
                assert abs(a - b) <= RTOL * abs(a), f"{layout} step {step} head {head}: {b} vs TP1PP1 {a}"
    # The steps did train: the loss moved beyond the tolerance between the first and last step.
    assert abs(reference[-1][0] - reference[0][0]) > 100 * RTOL * reference[0][0]
