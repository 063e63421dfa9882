"""Integrity checks of a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) before training opens it.

megatron-core's ``IndexedDataset`` trusts its files: a truncated ``.bin`` or an ``.idx`` from another dataset
surfaces as an index error or garbage tokens hours into a run. ``inspect_indexed_dataset`` reads only the index
header and the last entry (constant time, whatever the dataset's size) plus the first tokens, and raises
``DataFileError`` naming the file and what is wrong. The ``.idx`` layout is megatron-core's
(``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter``): magic, version, dtype code, sequence count,
document count, then int32 sequence lengths, int64 byte pointers and int64 document boundaries.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron-core's DType codes.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# Tokens read from the start of the .bin to check they fit the tokenizer (bounded, so the check stays cheap).
_TOKEN_SCAN = 1 << 20


class DataFileError(ValueError):
    """An indexed dataset that cannot be trained on; the message names the file and the fix."""


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What the index says about a dataset."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def inspect_indexed_dataset(prefix: str, vocab_size: int | None = None) -> IndexedDatasetInfo:
    """Check ``prefix``.idx/.bin against each other (and against a tokenizer's ``vocab_size``); return the facts."""
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    _check_exists(prefix, idx_path, bin_path)
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size or not raw.startswith(INDEX_MAGIC):
            raise DataFileError(
                f"{idx_path}: not a Megatron indexed-dataset index (bad header). Fix: regenerate it with "
                "tools/preprocess_data.py, or give the prefix of the matching .bin/.idx pair")
        _, version, code, num_sequences, num_documents = _HEADER.unpack(raw)
        if version != INDEX_VERSION:
            raise DataFileError(f"{idx_path}: index version {version}, expected {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise DataFileError(f"{idx_path}: unknown token dtype code {code}; the index is corrupt")
        dtype = DTYPE_CODES[code]
        expected_idx = _HEADER.size + num_sequences * (4 + 8) + num_documents * 8
        # Multimodal datasets append one int8 mode per sequence.
        if idx_size not in (expected_idx, expected_idx + num_sequences):
            raise DataFileError(
                f"{idx_path}: {idx_size} bytes, but its header ({num_sequences} sequences, {num_documents - 1} "
                f"documents) needs {expected_idx}; the file is truncated or corrupt. Fix: re-run preprocessing")
        if num_sequences == 0 or num_documents < 2:
            raise DataFileError(f"{prefix}: the dataset holds no documents. Fix: check the preprocessing input "
                                "and its summary of skipped records")
        lengths_at = _HEADER.size
        pointers_at = lengths_at + num_sequences * 4
        last_length = _read(f, lengths_at + (num_sequences - 1) * 4, "<i")
        last_pointer = _read(f, pointers_at + (num_sequences - 1) * 8, "<q")
        num_tokens = (last_pointer // np.dtype(dtype).itemsize) + last_length

    expected_bin = last_pointer + last_length * np.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        raise DataFileError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} indexes {expected_bin} bytes of {np.dtype(dtype).name} "
            f"tokens; the .bin is {'truncated' if bin_size < expected_bin else 'longer than its index'} or the pair "
            "does not belong together. Fix: re-run preprocessing for this prefix")
    if vocab_size is not None:
        _check_fits_vocab(bin_path, dtype, num_tokens, vocab_size)
    return IndexedDatasetInfo(prefix, dtype, num_sequences, num_documents - 1, num_tokens)


def _check_exists(prefix: str, idx_path: str, bin_path: str) -> None:
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            raise DataFileError(f"{prefix}: give the dataset prefix without {ext}. Fix: use {prefix[:-len(ext)]}")
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        folder = os.path.dirname(prefix) or "."
        near = sorted({f[:-4] for f in os.listdir(folder) if f.endswith(".idx")}) if os.path.isdir(folder) else []
        hint = f" Prefixes in {folder}: {', '.join(near[:5])}" if near else ""
        raise DataFileError(f"{prefix}: no {' or '.join(missing)}. Fix: give the prefix tools/preprocess_data.py "
                            f"printed (it ends in _text_document).{hint}")


def _read(f, offset: int, fmt: str) -> int:
    f.seek(offset)
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _check_fits_vocab(bin_path: str, dtype: type, num_tokens: int, vocab_size: int) -> None:
    """The dtype must hold every id of the tokenizer, and the first tokens must be ids it knows."""
    if np.issubdtype(dtype, np.floating):
        raise DataFileError(f"{bin_path}: tokens stored as {np.dtype(dtype).name}; token ids must be integers")
    if np.iinfo(dtype).max < vocab_size - 1:
        raise DataFileError(
            f"{bin_path}: tokens stored as {np.dtype(dtype).name} (max {np.iinfo(dtype).max}) cannot hold the "
            f"tokenizer's {vocab_size} ids: it was made with another tokenizer. Fix: set tokenizer.model to the "
            "one used for preprocessing, or re-run preprocessing with this one")
    head = np.memmap(bin_path, dtype=dtype, mode="r", shape=(min(num_tokens, _TOKEN_SCAN),))
    if head.size and (int(head.max()) >= vocab_size or int(head.min()) < 0):
        raise DataFileError(
            f"{bin_path}: holds token id {int(head.max())} but the tokenizer has {vocab_size} ids: it was made "
            "with another tokenizer. Fix: set tokenizer.model to the one used for preprocessing, or re-run "
            "preprocessing with this one")


# -- the tokenizer a dataset was made with ----------------------------------------------------------------------

TOKENIZER_RECORD_SUFFIX = ".tokenizer.json"


def write_tokenizer_record(prefix: str, identity: dict, **details) -> str:
    """``PREFIX.tokenizer.json``: the tokenizer ``identity`` (type, model hash) the dataset was tokenized with,
    plus ``details`` (the model's path, BOS/EOD use), beside the ``.bin/.idx`` (which Megatron-LM ignores)."""
    import json

    path = prefix + TOKENIZER_RECORD_SUFFIX
    with open(path + ".tmp", "w") as f:
        json.dump({**identity, **details}, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def read_tokenizer_record(prefix: str):
    """The record ``write_tokenizer_record`` wrote, or None for a dataset without one (Megatron-LM's tool)."""
    import json

    path = prefix + TOKENIZER_RECORD_SUFFIX
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataFileError(f"{path} is unreadable ({e}). Fix: preprocess the data again, or delete the file to "
                            "skip the tokenizer check") from e
