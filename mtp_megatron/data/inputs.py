"""Resolve and check what a config's data section reads from disk: the tokenizer and the data files.

``load_config`` reads only the YAML; ``resolve_inputs`` is the explicit next step (with the DeepSpeed JSON check,
in ``mtp_megatron.train.resolve_run_inputs``, which the command line and the launchers run before anything
starts). So a missing prefix, a corrupt ``.bin``, a blend whose weights do not match its paths, a tokenizer
larger than the model's vocabulary or a split that leaves the validation set empty stop the launch with a config
error, before any process group or model exists. It also fills ``model.vocab_size`` from the tokenizer when the
config leaves it null, so the resolved config saved with the run names the exact shape. Calling it again on a
resolved config checks the same files and changes nothing.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.schema import Config
from mtp_megatron.data.index_file import DataFileError, inspect_indexed_dataset, read_tokenizer_record
from mtp_megatron.data.tokenizer import TokenizerError, build_tokenizer, tokenizer_identity

SPLIT_NAMES = ("train", "valid", "test")


def parse_blend(paths: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's blend list: ``[prefix, ...]`` or ``[weight, prefix, weight, prefix, ...]``.

    Raises ``ValueError`` for a list that mixes the two forms or has a weight without a prefix.
    """
    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    numeric = [is_number(p) for p in paths]
    if not any(numeric):
        return list(paths), None
    if len(paths) % 2 or numeric[0::2] != [True] * (len(paths) // 2) or any(numeric[1::2]):
        raise ValueError(
            f"{paths} mixes weights and prefixes; weighted blends alternate weight, prefix "
            "(e.g. [0.7, /d/a_text_document, 0.3, /d/b_text_document])")
    weights = [float(w) for w in paths[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {weights} must be >= 0 with a positive sum")
    return list(paths[1::2]), weights


def split_document_counts(split: str, num_documents: int) -> List[int]:
    """Documents in the train, valid and test parts of one dataset, rounded as megatron-core's builder does."""
    weights = [float(w) for w in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    return [int(round(hi * num_documents)) - int(round(lo * num_documents)) for lo, hi in zip(bounds, bounds[1:])]


def resolve_inputs(cfg: Config) -> None:
    """Load the tokenizer, fill a null ``model.vocab_size`` from it and check the data; ``ConfigError`` if bad.
    Cheap (the tokenizer and each dataset's index, not its tokens) and idempotent."""
    try:
        tokenizer = build_tokenizer(cfg.tokenizer.type, cfg.tokenizer.model)
    except TokenizerError as e:
        raise ConfigError.from_problems([f"tokenizer.model: {e}. Fix: train one with tools/train_tokenizer.py"])
    problems = []
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        problems.append(
            f"model.vocab_size: the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{cfg.model.vocab_size}. Fix: set model.vocab_size=null (the tokenizer's size, padded for TP) or "
            f">= {tokenizer.vocab_size}")
    if cfg.data.paths:
        problems += _data_problems(cfg, tokenizer.vocab_size)
        problems += _tokenizer_problems(cfg)
    if problems:
        raise ConfigError.from_problems(problems)


def _tokenizer_problems(cfg: Config) -> List[str]:
    """Datasets tokenized with another tokenizer than the run's (their ``PREFIX.tokenizer.json``, written by
    tools/preprocess_data.py). A dataset without the record (Megatron-LM's tool) cannot be checked: a notice,
    printed once (rank 0)."""
    try:
        prefixes, _ = parse_blend(cfg.data.paths)
        ours = tokenizer_identity(cfg.tokenizer.type, cfg.tokenizer.model)
    except (ValueError, OSError):
        return []  # reported by the other checks
    problems, unchecked = [], []
    for prefix in prefixes:
        try:
            record = read_tokenizer_record(prefix)
        except DataFileError as e:
            problems.append(f"data.paths: {e}")
            continue
        if record is None:
            unchecked.append(prefix)
        elif {k: record.get(k) for k in ours} != ours:
            made_with = record.get("model") or record.get("type")
            problems.append(
                f"data.paths: {prefix} was tokenized with {record.get('type')} tokenizer {made_with} (sha256 "
                f"{record.get('sha256')}), this run uses {ours['type']} {cfg.tokenizer.model or ''} (sha256 "
                f"{ours['sha256']}). Fix: set tokenizer.model to the tokenizer the data was made with, or "
                "preprocess the data again with this one")
    if unchecked and os.environ.get("RANK", "0") == "0":
        print(f"note: {', '.join(unchecked)} carr{'ies' if len(unchecked) == 1 else 'y'} no tokenizer record "
              f"(not made by tools/preprocess_data.py): cannot check that it was tokenized with this run's "
              "tokenizer", file=sys.stderr)
    return problems


def _data_problems(cfg: Config, vocab_size: int) -> List[str]:
    try:
        prefixes, weights = parse_blend(cfg.data.paths)
    except ValueError as e:
        return [f"data.paths: {e}"]
    problems = []
    for prefix in prefixes:
        try:
            info = inspect_indexed_dataset(prefix, vocab_size)
        except DataFileError as e:
            problems.append(f"data.paths: {e}")
            continue
        counts = split_document_counts(cfg.data.split, info.num_documents)
        needed = ["train"] + (["valid"] if cfg.train.eval_interval > 0 else [])
        for name in needed:
            if counts[SPLIT_NAMES.index(name)] == 0:
                problems.append(
                    f"data.split: {cfg.data.split!r} leaves the {name} part of {prefix} ({info.num_documents} "
                    f"documents) empty. Fix: give {name} a larger share, or add documents")
    return problems
