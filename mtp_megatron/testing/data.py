"""Small Megatron indexed datasets for tests, written with megatron-core's ``IndexedDatasetBuilder``."""

from __future__ import annotations

import json
import random
from typing import Optional, Sequence

import numpy as np
import torch

from mtp_megatron.data.index_file import write_tokenizer_record
from mtp_megatron.data.tokenizer import token_dtype, tokenizer_identity


def write_token_dataset(prefix: str, documents: Sequence[Sequence[int]], vocab_size: int,
                        tokenizer: Optional[tuple] = ("byte", None)) -> str:
    """Write ``documents`` (lists of token ids) as ``prefix``.bin/.idx in the dtype preprocessing would use, with
    the tokenizer record tools/preprocess_data.py writes (``tokenizer`` = (type, model path); None: no record,
    as Megatron-LM's tool)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(vocab_size))
    for document in documents:
        builder.add_document(torch.tensor(document, dtype=torch.int64), [len(document)])
    builder.finalize(f"{prefix}.idx")
    if tokenizer is not None:
        write_tokenizer_record(prefix, tokenizer_identity(*tokenizer), model=tokenizer[1])
    return prefix


def random_documents(count: int, low: int, high: int, eod: int, seed: int, min_len: int = 20, max_len: int = 300):
    """``count`` documents of random ids in [low, high) (keep special ids out), each ending with ``eod``."""
    rng = np.random.default_rng(seed)
    return [[*rng.integers(low, high, size=int(length)).tolist(), eod]
            for length in rng.integers(min_len, max_len, size=count)]


_WORDS = "the model reads data and writes tokens for each file in order while training runs fast".split()


def make_documents(n: int, seed: int = 0) -> list:
    """Small Python-like files with prose docstrings, indentation, blank lines and numbers (a corpus for
    tokenizer training and preprocessing tests)."""
    rng = random.Random(seed)
    documents = []
    for i in range(n):
        lines = [f'"""{" ".join(rng.choices(_WORDS, k=12)).capitalize()}."""', ""]
        for j in range(rng.randint(1, 4)):
            name = "_".join(rng.choices(_WORDS, k=2))
            lines += [f"def {name}_{j}(x, y={rng.randint(0, 99999)}):",
                      f"    # {' '.join(rng.choices(_WORDS, k=6))}",
                      "    if x > y:",
                      f"        return x * {rng.randint(0, 999)}",
                      "    return [y, 'é', \"ü\"]", "", ""]
        documents.append("\n".join(lines))
    return documents


def write_jsonl(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)
