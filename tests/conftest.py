"""Fixtures shared across test packages."""

import pytest

from mtp_megatron.data.tokenizer import ByteTokenizer
from mtp_megatron.testing.data import random_documents, write_token_dataset


@pytest.fixture(scope="session")
def byte_datasets(tmp_path_factory):
    """Two indexed datasets of byte-tokenizer ids (200 and 120 documents): their prefixes."""
    folder = tmp_path_factory.mktemp("datasets")
    tok = ByteTokenizer()
    return [
        write_token_dataset(str(folder / f"{name}_text_document"),
                            random_documents(count, 0, 256, tok.eod, seed), tok.vocab_size)
        for name, count, seed in (("a", 200, 1), ("b", 120, 2))
    ]


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_launcher_environment():
    """A test that starts a single-process job in the pytest process leaves torchrun's variables set (that is how
    ``init_distributed`` runs without a launcher); the jobs later tests launch (sbatch, mpirun, subprocesses)
    would inherit its stale MASTER_PORT. Restore them after every test."""
    import os

    before = {key: os.environ.get(key) for key in _LAUNCHER_VARIABLES}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
