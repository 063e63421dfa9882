"""The data loader: a resumed loader reads exactly the uninterrupted one's batches, and TP rank 0's batches reach
its tensor-parallel peers, each pipeline stage getting what it consumes."""

import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.data.datasets import build_datasets
from mtp_megatron.data.loader import microbatches
from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed
from mtp_megatron.testing.distributed import run_distributed

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
STEPS, RESUME_AT = 6, 4


def _setup(tmp: str, paths, overrides=()):
    cfg = load_config(TINY, [f"data.paths=[{','.join(paths)}]", "data.synthetic=false", f"train.iters={STEPS}", "model.seq_length=32",
                             f"run.dir={tmp}", *overrides])
    env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
    train, _ = build_datasets(cfg, env)
    return cfg, env, train


def _read(cfg, env, train, consumed_samples: int, steps: int) -> list[dict]:
    per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * env.dims.dp)
    data = microbatches(train, consumed_samples, cfg, env)
    return [next(data) for _ in range(steps * per_step)] if data is not None else []


def resume_reads(tmp: str, paths) -> tuple:
    cfg, env, train = _setup(tmp, paths, ["data.num_workers=1"])  # a worker process, as on GPU runs
    try:
        uninterrupted = _read(cfg, env, train, 0, STEPS)
        resumed = _read(cfg, env, train, RESUME_AT * cfg.train.global_batch_size, STEPS - RESUME_AT)
        return uninterrupted, resumed, env.dims.dp
    finally:
        destroy_distributed()


@pytest.mark.distributed
def test_a_resumed_loader_reads_the_same_batches(tmp_path, byte_datasets):
    results = run_distributed(resume_reads, 2, str(tmp_path), byte_datasets)
    per_step = 8 // (2 * 2)
    for uninterrupted, resumed, dp in results:
        assert dp == 2 and len(resumed) == (STEPS - RESUME_AT) * per_step
        for a, b in zip(uninterrupted[RESUME_AT * per_step:], resumed):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The two DP ranks read different samples.
    assert not torch.equal(results[0][0][0]["tokens"], results[1][0][0]["tokens"])


def stage_reads(tmp: str, paths, reset: bool) -> dict:
    cfg, env, train = _setup(tmp, paths, ["parallel.tp=2", "parallel.pp=2", f"data.reset_attention_mask={reset}",
                                          f"data.eod_mask_loss={reset}"])
    try:
        batches = _read(cfg, env, train, 0, STEPS)
        # What TP rank 0 read for itself, straight from the dataset, for comparison.
        direct = [train[i] for i in range(len(batches) * cfg.train.micro_batch_size)] if train is not None else None
        return dict(rank=env.rank, stage=env.dims.rank_coords(env.rank), tp_rank=env.tp_rank,
                    first=env.is_first_stage, last=env.is_last_stage, batches=batches, direct=direct)
    finally:
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("reset", [False, True], ids=["causal", "document_masks"])
def test_tp_peers_receive_rank_0s_batches(tmp_path, byte_datasets, reset):
    results = run_distributed(stage_reads, 4, str(tmp_path), byte_datasets, reset)
    by_stage = {}
    for r in results:
        by_stage.setdefault((r["first"], r["last"]), []).append(r)
    assert sorted(by_stage) == [(False, True), (True, False)]  # pp=2: a first and a last stage, 2 TP ranks each
    for (first, last), ranks in by_stage.items():
        expected = {"tokens", "position_ids"} if first else {"labels", "loss_mask"}
        if reset:
            expected.add("attention_mask")
        source = next(r for r in ranks if r["tp_rank"] == 0)
        for r in ranks:
            assert len(r["batches"]) == 4 * STEPS  # 4 microbatches a step (global batch 8, micro batch 2, dp 1)
            for got, sent in zip(r["batches"], source["batches"]):
                assert set(got) == expected
                assert all(torch.equal(got[k], sent[k]) and got[k].dtype == sent[k].dtype for k in expected)
        # TP rank 0 sent the dataset's samples in the sampler's order (dp = 1: 0, 1, 2, ...).
        for m, batch in enumerate(source["batches"]):
            for key in expected:
                direct = torch.stack([source["direct"][2 * m + j][key] for j in range(2)])
                assert torch.equal(batch[key], direct.to(batch[key].dtype))
        if reset and first:
            # A sample's mask differs from the causal one exactly when an EOD ends a document inside it.
            causal = torch.triu(torch.ones(32, 32, dtype=torch.bool), 1)
            has_eod = [bool((b["tokens"][j, :-1] == 256).any()) for b in source["batches"] for j in range(2)]
            reset_mask = [not torch.equal(b["attention_mask"][j, 0], causal) for b in source["batches"] for j in range(2)]
            assert has_eod == reset_mask and any(has_eod)
