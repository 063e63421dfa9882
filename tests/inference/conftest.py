"""A small model trained on cyclic byte sequences, which every head learns: shared by the decoding tests."""

from __future__ import annotations

import os

import pytest

from mtp_megatron.config import load_config
from mtp_megatron.data.tokenizer import ByteTokenizer
from mtp_megatron.testing.data import write_token_dataset
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.num_query_groups=2", "model.seq_length=64", "logging.tensorboard=false"]


def periodic_documents(count: int, eod: int) -> list:
    """Documents cycling through the same 11 byte ids from different starting points: each token determines the
    next ones, so every head learns its target within a few dozen steps."""
    cycle = list(range(40, 51))
    return [[cycle[(start + i) % len(cycle)] for i in range(200)] + [eod]
            for start in (d % len(cycle) for d in range(count))]


def _train(run_dir: str, data: str) -> None:
    train(load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        *TINY, "train.iters=30", f"run.dir={run_dir}", f"data.paths=[{data}]", "data.synthetic=false",
        f"data.cache_dir={run_dir}/cache"]))


@pytest.fixture(scope="session")
def cycles_dataset(tmp_path_factory) -> str:
    tok = ByteTokenizer()
    folder = tmp_path_factory.mktemp("cycles")
    return write_token_dataset(str(folder / "cycles_text_document"), periodic_documents(300, tok.eod), tok.vocab_size)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cycles_dataset):
    folder = tmp_path_factory.mktemp("decoding")
    run_distributed(_train, 1, str(folder / "run"), cycles_dataset)
    return f"{folder}/run/checkpoints/iter_0000030"


