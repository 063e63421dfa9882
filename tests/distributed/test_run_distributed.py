"""The test helper that starts real ranks (mtp_megatron/testing/distributed.py): ranks are forked from a
forkserver started once, so what the caller sets must still reach each call's ranks."""

from __future__ import annotations

import os

import pytest

from mtp_megatron.testing.distributed import run_distributed


def what_the_rank_sees(name: str) -> tuple:
    import torch.distributed as dist

    return os.environ.get(name), os.getcwd(), dist.get_rank(), dist.get_world_size(), os.getpid()


@pytest.mark.distributed
def test_each_call_gets_the_callers_environment_and_fresh_ranks(monkeypatch, tmp_path):
    name = "MTP_TEST_RUN_DISTRIBUTED"
    monkeypatch.setenv(name, "first")
    first = run_distributed(what_the_rank_sees, 2, name)
    monkeypatch.setenv(name, "second")  # set after the forkserver has started
    monkeypatch.chdir(tmp_path)
    second = run_distributed(what_the_rank_sees, 2, name)
    here = os.getcwd()
    assert here == str(tmp_path)
    assert [r[0] for r in first] == ["first", "first"]
    assert [(r[0], r[1]) for r in second] == [("second", here), ("second", here)]
    assert [r[2:4] for r in first + second] == [(0, 2), (1, 2)] * 2
    assert len({r[4] for r in first + second} | {os.getpid()}) == 5  # four new processes, none of them this one
