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
