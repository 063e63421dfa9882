"""Small Megatron indexed datasets for tests, written with megatron-core's ``IndexedDatasetBuilder``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mtp_megatron.data.tokenizer import token_dtype


def write_token_dataset(prefix: str, documents: Sequence[Sequence[int]], vocab_size: int) -> str:
    """Write ``documents`` (lists of token ids) as ``prefix``.bin/.idx in the dtype preprocessing would use."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(vocab_size))
    for document in documents:
        builder.add_document(torch.tensor(document, dtype=torch.int64), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def random_documents(count: int, low: int, high: int, eod: int, seed: int, min_len: int = 20, max_len: int = 300):
    """``count`` documents of random ids in [low, high) (keep special ids out), each ending with ``eod``."""
    rng = np.random.default_rng(seed)
    return [[*rng.integers(low, high, size=int(length)).tolist(), eod]
            for length in rng.integers(min_len, max_len, size=count)]
