"""Tokenize documents into megatron-core indexed datasets (``.bin``/``.idx``), the files training reads.

The output is what Megatron-LM's ``tools/preprocess_data.py`` writes: for each JSON key one dataset
``{output_prefix}_{key}_document``, one sequence per document (sentences are not split), with the tokenizer's EOD
after each document when ``append_eod`` is set, written by megatron-core's ``IndexedDatasetBuilder``.

Three properties matter more than raw speed:

* The output bytes do not depend on the worker count: a pool of workers tokenizes, ``Pool.imap`` hands the results
  back in input order, and the main process alone writes.
* A run that fails or is interrupted leaves nothing behind: the datasets are written under temporary names in the
  output folder and renamed into place only after every document was written; an existing output is replaced only
  with ``overwrite``, and it stays intact if the new run fails.
* Bad input stops the run naming the file and line, or is skipped and listed (see ``mtp_megatron.data.sources``).

The main process reads the input and writes the output; workers load only the tokenizer (sentencepiece or
nothing), never megatron-core. ``Pool.imap`` pulls documents from the reader in a feeder thread that blocks once the
pipe to the workers is full, so reading never runs far ahead of tokenization, and an ``InputError`` raised while
reading comes back out of ``imap`` at its place in the input order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mtp_megatron.data.sources import DataError, DocumentReader, SkipLog
from mtp_megatron.data.tokenizer import build_tokenizer, token_dtype

# Megatron-LM's --tokenizer-type names and ours, to the kinds ``build_tokenizer`` takes.
TOKENIZER_TYPES = {
    "SentencePieceTokenizer": "sentencepiece",
    "sentencepiece": "sentencepiece",
    "ByteTokenizer": "byte",
    "byte": "byte",
}
CHUNKSIZE = 32  # documents per task sent to a worker: amortizes the pickling round trip
PROGRESS_SECONDS = 1.0
MB = 1e6


@dataclass
class PreprocessSummary:
    """What a run wrote and how fast; ``format()`` is the summary the CLI prints."""

    prefixes: Dict[str, str]  # JSON key -> dataset prefix (the path without .bin/.idx)
    documents: int
    tokens: int  # over all keys, EOD included
    input_bytes: int  # raw size of the records written (JSONL lines or files)
    seconds: float
    workers: int
    dtype: str
    skipped: SkipLog = field(default_factory=SkipLog)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / MB / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def format(self) -> str:
        written = ", ".join(f"{prefix}.bin/.idx" for prefix in self.prefixes.values())
        return "\n".join([
            f"wrote {written}: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype})",
            f"input: {self.input_bytes / MB:.1f} MB in {self.seconds:.1f} s with {self.workers} workers: "
            f"{self.mb_per_s:.2f} MB/s, {self.tokens_per_s:,.0f} tokens/s, "
            f"{self.documents / self.seconds:,.0f} documents/s",
            self.skipped.format(),
        ])


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's output naming: ``{output_prefix}_{key}_document`` (+ ``.bin`` / ``.idx``)."""
    return f"{output_prefix}_{key}_document"


def tokenizer_kind(tokenizer_type: str) -> str:
    """``SentencePieceTokenizer`` / ``sentencepiece`` -> ``sentencepiece``; ``ByteTokenizer`` / ``byte`` -> ``byte``."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    return TOKENIZER_TYPES[tokenizer_type]


def preprocess(inputs: Sequence[str], output_prefix: str, *, tokenizer_type: str = "sentencepiece",
               tokenizer_model: Optional[str] = None, json_keys: Sequence[str] = ("text",),
               append_eod: bool = False, workers: int = 1, on_error: str = "fail", overwrite: bool = False,
               suffixes: Optional[Sequence[str]] = None, log_interval: int = 1000,
               progress: bool = True) -> PreprocessSummary:
    """Tokenize the documents of ``inputs`` into one indexed dataset per JSON key (see the module docstring).

    ``workers`` tokenizing processes run beside this one, which reads the input and writes the output. A progress
    line goes to stderr every ``log_interval`` documents or every second, unless ``progress`` is False.
    """
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    kind = tokenizer_kind(tokenizer_type)
    tokenizer = build_tokenizer(kind, tokenizer_model)  # fails here, before any work, on a bad model file
    dtype = token_dtype(tokenizer.vocab_size)
    reader = DocumentReader(inputs, json_keys, suffixes, on_error)
    prefixes = {key: dataset_prefix(output_prefix, key) for key in reader.json_keys}
    _check_outputs(prefixes.values(), overwrite)
    IndexedDatasetBuilder = _import_builder()

    meter = _Progress(log_interval, enabled=progress)
    writers: List[_DatasetWriter] = []
    try:
        with _pool(workers, kind, tokenizer_model, append_eod) as pool:
            # Opened after the fork, so that no worker inherits an open output file.
            writers = [_DatasetWriter(IndexedDatasetBuilder, prefix, dtype) for prefix in prefixes.values()]
            records = ((document.texts, document.nbytes) for document in reader)
            for token_arrays, nbytes in pool.imap(_encode, records, chunksize=CHUNKSIZE):
                for writer, tokens in zip(writers, token_arrays):
                    writer.add(tokens)
                meter.update(nbytes, sum(len(tokens) for tokens in token_arrays))
        for writer in writers:
            writer.finalize()
        for writer in writers:
            writer.commit()
        return PreprocessSummary(prefixes=prefixes, documents=meter.documents, tokens=meter.tokens,
                                 input_bytes=meter.input_bytes, seconds=meter.seconds, workers=workers,
                                 dtype=np.dtype(dtype).name, skipped=reader.skipped)
    except BaseException:  # KeyboardInterrupt included: no temporary file may outlive the run
        for writer in writers:
            writer.discard()
        raise
    finally:
        meter.close()


def _import_builder():
    """megatron-core's ``IndexedDatasetBuilder``, imported on first use: the import takes ~4 s, which workers and
    ``--help`` need not pay. Its warnings about optional GPU packages (Apex, Transformer Engine) are irrelevant to
    writing files and are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def _check_outputs(prefixes, overwrite: bool) -> None:
    for prefix in prefixes:
        for path in (f"{prefix}.bin", f"{prefix}.idx"):
            if os.path.exists(path) and not overwrite:
                raise DataError(f"{path} exists; pass --overwrite to replace it")


class _DatasetWriter:
    """One key's dataset, written under ``{prefix}.tmp-{pid}.bin/.idx`` and renamed to ``{prefix}.bin/.idx``."""

    def __init__(self, builder_class, prefix: str, dtype: type):
        self.prefix = prefix
        self.tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builder = builder_class(f"{self.tmp_prefix}.bin", dtype=dtype)

    def add(self, tokens: np.ndarray) -> None:
        self.builder.add_document(tokens, [len(tokens)])

    def finalize(self) -> None:
        self.builder.finalize(f"{self.tmp_prefix}.idx")

    def commit(self) -> None:
        for suffix in (".bin", ".idx"):  # the index last: megatron-core reads a dataset through its index
            os.replace(self.tmp_prefix + suffix, self.prefix + suffix)

    def discard(self) -> None:
        self.builder.data_file.close()  # the builder keeps its .bin open until finalize
        for suffix in (".bin", ".idx"):
            if os.path.exists(self.tmp_prefix + suffix):
                os.remove(self.tmp_prefix + suffix)


class _Progress:
    """Counts what was written; redraws one stderr line every ``log_interval`` documents or every second."""

    def __init__(self, log_interval: int, enabled: bool):
        self.log_interval = max(1, log_interval)
        self.enabled = enabled
        self.documents = self.tokens = self.input_bytes = 0
        self.start = self._last_time = time.perf_counter()
        self._last_documents = 0
        self._drawn = False

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def update(self, nbytes: int, ntokens: int) -> None:
        self.documents += 1
        self.tokens += ntokens
        self.input_bytes += nbytes
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.documents - self._last_documents >= self.log_interval or now - self._last_time >= PROGRESS_SECONDS:
            self._draw()
            self._last_documents, self._last_time = self.documents, now

    def close(self) -> None:
        if self._drawn:
            self._draw()
            sys.stderr.write("\n")
            self._drawn = False

    def _draw(self) -> None:
        seconds = self.seconds
        sys.stderr.write(f"\r{self.documents:,} documents, {self.input_bytes / MB:,.1f} MB, {self.tokens:,} tokens "
                         f"| {self.documents / seconds:,.0f} documents/s, {self.input_bytes / MB / seconds:.2f} MB/s")
        sys.stderr.flush()
        self._drawn = True


# ---------------------------------------------------------------------------------------------------------------
# Worker side: top-level functions and a per-process tokenizer, importing nothing beyond the tokenizer.

_worker_state: Optional[Tuple[object, type, Optional[int]]] = None  # (tokenizer, dtype, eod or None)


def _pool(workers: int, kind: str, model: Optional[str], append_eod: bool):
    # fork starts workers at once and shares the loaded modules; elsewhere spawn works as well, since the
    # workers need nothing but this module and the tokenizer.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                    initargs=(kind, model, append_eod))


def _init_worker(kind: str, model: Optional[str], append_eod: bool) -> None:
    global _worker_state
    # Ctrl-C is the main process's to handle (it stops the pool); the pool stops a worker with SIGTERM, which must
    # kill it even where the parent installed a handler of its own (tools/preprocess_data.py does).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer = build_tokenizer(kind, model)
    _worker_state = (tokenizer, token_dtype(tokenizer.vocab_size), tokenizer.eod if append_eod else None)


def _encode(record: Tuple[Tuple[str, ...], int]) -> Tuple[Tuple[np.ndarray, ...], int]:
    """One document's texts -> one token array per text (EOD appended if asked); its size passes through."""
    texts, nbytes = record
    tokenizer, dtype, eod = _worker_state
    arrays = []
    for text in texts:
        ids = tokenizer.tokenize(text)
        if eod is not None:
            ids.append(eod)
        arrays.append(np.array(ids, dtype=dtype))
    return tuple(arrays), nbytes
