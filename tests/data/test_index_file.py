"""A corrupt or mismatched .bin/.idx is refused when the dataset is checked, naming the file."""

import os
import shutil

import numpy as np
import pytest

from mtp_megatron.data.index_file import DataFileError, inspect_indexed_dataset
from mtp_megatron.testing.data import random_documents, write_token_dataset

DOCS = random_documents(30, 0, 256, 256, seed=3)


@pytest.fixture
def prefix(tmp_path):
    return write_token_dataset(str(tmp_path / "d_text_document"), DOCS, vocab_size=259)


def test_a_good_dataset_is_described(prefix):
    info = inspect_indexed_dataset(prefix, vocab_size=259)
    assert (info.num_documents, info.num_sequences) == (30, 30)
    assert info.num_tokens == sum(len(d) for d in DOCS) and info.dtype == np.uint16


def test_truncated_bin(prefix):
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(os.path.getsize(f"{prefix}.bin") - 2)
    with pytest.raises(DataFileError, match=r"d_text_document\.bin: .* bytes, but .*\.idx indexes .* truncated"):
        inspect_indexed_dataset(prefix)


def test_bin_of_another_dataset(prefix, tmp_path):
    other = write_token_dataset(str(tmp_path / "other"), DOCS[:10], vocab_size=259)
    shutil.copy(f"{other}.bin", f"{prefix}.bin")
    with pytest.raises(DataFileError, match="does not belong together"):
        inspect_indexed_dataset(prefix)


def test_wrong_header(prefix):
    with open(f"{prefix}.idx", "r+b") as f:
        f.write(b"NOTANIDX")
    with pytest.raises(DataFileError, match=r"d_text_document\.idx: not a Megatron indexed-dataset index"):
        inspect_indexed_dataset(prefix)


def test_truncated_idx(prefix):
    with open(f"{prefix}.idx", "r+b") as f:
        f.truncate(os.path.getsize(f"{prefix}.idx") - 8)
    with pytest.raises(DataFileError, match=r"\.idx: .* bytes, but its header .* truncated or corrupt"):
        inspect_indexed_dataset(prefix)


def test_dtype_too_small_for_the_tokenizer(prefix):
    # uint16 tokens cannot come from a 100k-token tokenizer.
    with pytest.raises(DataFileError, match="cannot hold the tokenizer's 100000 ids"):
        inspect_indexed_dataset(prefix, vocab_size=100_000)


def test_token_ids_beyond_the_tokenizer(prefix):
    with pytest.raises(DataFileError, match="holds token id 256 but the tokenizer has 200 ids"):
        inspect_indexed_dataset(prefix, vocab_size=200)


def test_missing_files_and_suffixes(prefix, tmp_path):
    with pytest.raises(DataFileError, match=r"give the dataset prefix without \.bin"):
        inspect_indexed_dataset(f"{prefix}.bin")
    with pytest.raises(DataFileError, match=r"no .*nope\.idx or .*nope\.bin.*Prefixes in .*d_text_document"):
        inspect_indexed_dataset(str(tmp_path / "nope"))


def test_empty_dataset(tmp_path):
    prefix = write_token_dataset(str(tmp_path / "empty"), [], vocab_size=259)
    with pytest.raises(DataFileError, match="holds no documents"):
        inspect_indexed_dataset(prefix)
