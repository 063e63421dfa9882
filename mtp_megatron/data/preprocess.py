"""Tokenize documents into megatron-core indexed datasets (``.bin``/``.idx``), the files training reads.

The output is what Megatron-LM's ``tools/preprocess_data.py`` writes: for each JSON key one dataset
``{output_prefix}_{key}_document``, one sequence per document (sentences are not split), with the tokenizer's EOD
after each document when ``append_eod`` is set, byte for byte what megatron-core's ``IndexedDatasetBuilder`` writes
(``_DatasetWriter`` below writes that format itself: see its docstring for why).

Three properties matter more than raw speed:

* The output bytes do not depend on the worker count: a pool of workers tokenizes, ``Pool.imap`` hands the results
  back in input order, and the main process alone writes.
* A run that fails or is interrupted leaves nothing behind: the datasets are written under temporary names in the
  output folder and renamed into place only after every document was written; an existing output is replaced only
  with ``overwrite``, and it stays intact if the new run fails.
* Bad input stops the run naming the file and line, or is skipped and listed (see ``mtp_megatron.data.sources``).

The main process reads the input and writes the output; neither it nor the workers import megatron-core or torch
(workers load only the tokenizer: sentencepiece or nothing), so a run starts in well under a second. ``Pool.imap`` pulls documents from the reader in a feeder thread that blocks once the
pipe to the workers is full, so reading never runs far ahead of tokenization, and an ``InputError`` raised while
reading comes back out of ``imap`` at its place in the input order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mtp_megatron.data.index_file import DTYPE_CODES, INDEX_MAGIC, INDEX_VERSION, write_tokenizer_record
from mtp_megatron.data.sources import DataError, DocumentReader, SkipLog
from mtp_megatron.data.tokenizer import build_tokenizer, token_dtype, tokenizer_identity

# --tokenizer-type: ours, and Megatron-LM's names for the same tokenization of a sentencepiece model, to
# (the kind ``build_tokenizer`` takes, whether each document starts with BOS). Megatron-LM's
# GPTSentencePieceTokenizer encodes with the model as is; its Llama2Tokenizer puts the model's BOS first in every
# document (its ``tokenize(text, bos=True)``), as Llama-2's training data has it.
TOKENIZER_TYPES = {
    "sentencepiece": ("sentencepiece", False),
    "SentencePieceTokenizer": ("sentencepiece", False),
    "GPTSentencePieceTokenizer": ("sentencepiece", False),
    "Llama2Tokenizer": ("sentencepiece", True),
    "byte": ("byte", False),
    "ByteTokenizer": ("byte", False),
}
CHUNKSIZE = 32  # documents per task sent to a worker: amortizes the pickling round trip
# The .idx header: magic, version, dtype code, sequence count, document count (the layout index_file.py reads).
INDEX_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
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
    empty: SkipLog = field(default_factory=SkipLog)  # empty documents, dropped

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
            self.empty.format("empty documents dropped"),
        ])


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's output naming: ``{output_prefix}_{key}_document`` (+ ``.bin`` / ``.idx``)."""
    return f"{output_prefix}_{key}_document"


def tokenizer_kind(tokenizer_type: str) -> tuple[str, bool]:
    """(``sentencepiece`` or ``byte``, whether documents start with BOS) for a ``--tokenizer-type`` name."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)} "
                        "(Megatron-LM's GPT2BPETokenizer, HuggingFaceTokenizer and others are not supported here)")
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
    kind, prepend_bos = tokenizer_kind(tokenizer_type)
    tokenizer = build_tokenizer(kind, tokenizer_model)  # fails here, before any work, on a bad model file
    if prepend_bos and tokenizer.bos < 0:
        raise DataError(f"--tokenizer-type {tokenizer_type} starts every document with BOS, but "
                        f"{tokenizer_model} has no BOS piece. Fix: --tokenizer-type GPTSentencePieceTokenizer")
    dtype = token_dtype(tokenizer.vocab_size)
    reader = DocumentReader(inputs, json_keys, suffixes, on_error)
    prefixes = {key: dataset_prefix(output_prefix, key) for key in reader.json_keys}
    _check_outputs(prefixes.values(), overwrite)
    for prefix in prefixes.values():
        _remove_stale_temporaries(prefix)

    meter = _Progress(log_interval, enabled=progress)
    writers: List[_DatasetWriter] = []
    try:
        with _pool(workers, kind, tokenizer_model, append_eod, prepend_bos) as pool:
            # Opened after the fork, so that no worker inherits an open output file.
            writers = [_DatasetWriter(prefix, dtype) for prefix in prefixes.values()]
            records = ((document.texts, document.nbytes) for document in reader)
            for token_arrays, nbytes in pool.imap(_encode, records, chunksize=CHUNKSIZE):
                for writer, tokens in zip(writers, token_arrays):
                    writer.add(tokens)
                meter.update(nbytes, sum(len(tokens) for tokens in token_arrays))
        if meter.documents == 0:
            raise DataError(f"no documents to write: {', '.join(inputs)} held none "
                            f"({reader.empty.total} empty dropped, {reader.skipped.total} skipped). Fix: check "
                            "--input, --json-keys and --suffixes")
        for writer in writers:
            writer.finalize()
        for writer in writers:
            writer.commit()
            write_tokenizer_record(writer.prefix, tokenizer_identity(kind, tokenizer_model),
                                   model=os.path.abspath(tokenizer_model) if kind == "sentencepiece" else None,
                                   tokenizer_type=tokenizer_type, bos_per_document=prepend_bos,
                                   eod_appended=append_eod)
        return PreprocessSummary(prefixes=prefixes, documents=meter.documents, tokens=meter.tokens,
                                 input_bytes=meter.input_bytes, seconds=meter.seconds, workers=workers,
                                 dtype=np.dtype(dtype).name, skipped=reader.skipped, empty=reader.empty)
    except BaseException:  # KeyboardInterrupt included: no temporary file may outlive the run
        for writer in writers:
            writer.discard()
        raise
    finally:
        meter.close()


def _remove_stale_temporaries(prefix: str) -> None:
    """Remove ``{prefix}.tmp-{pid}.bin/.idx`` left by a run that was killed (its pid no longer runs here); name
    those of a pid that still runs (another run, or a killed run's pid on another host of a shared file system)."""
    folder = os.path.dirname(os.path.abspath(prefix))
    stem = os.path.basename(prefix) + ".tmp-"
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        pid, _, suffix = name[len(stem):].partition(".")
        if not (name.startswith(stem) and pid.isdigit() and suffix in ("bin", "idx")):
            continue
        path = os.path.join(folder, name)
        if int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            os.remove(path)
            print(f"removed {path}: left by a preprocessing run that did not finish (pid {pid})", file=sys.stderr)
        elif int(pid) != os.getpid():
            print(f"note: {path} belongs to process {pid}, which is running: another preprocessing run into the "
                  "same output? It is left alone", file=sys.stderr)


def _check_outputs(prefixes, overwrite: bool) -> None:
    for prefix in prefixes:
        for path in (f"{prefix}.bin", f"{prefix}.idx"):
            if os.path.exists(path) and not overwrite:
                raise DataError(f"{path} exists; pass --overwrite to replace it")


class _DatasetWriter:
    """One key's dataset, written under ``{prefix}.tmp-{pid}.bin/.idx`` and renamed to ``{prefix}.bin/.idx``.

    The files are byte for byte those of megatron-core's ``IndexedDatasetBuilder`` after ``add_document(tokens,
    [len(tokens)])`` per document and ``finalize``: the ``.bin`` is the documents' tokens back to back, the ``.idx``
    the header, int32 sequence lengths, int64 byte offsets and int64 document boundaries (one sequence per
    document, so 0..n). They are written here rather than by the builder because importing megatron-core costs
    about 4 CPU-seconds before the first document (most of a small run, and taken from the tokenizing workers on a
    busy node); tests/data/test_preprocess_speedups.py compares the two byte for byte.
    """

    def __init__(self, prefix: str, dtype: type):
        self.prefix = prefix
        self.tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        self.dtype = np.dtype(dtype)
        self.lengths: List[int] = []
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(f"{self.tmp_prefix}.bin", "wb")

    def add(self, tokens: np.ndarray) -> None:
        """Append one document: ``tokens``, a 1-d array of the dataset's dtype (written without a copy)."""
        if tokens.dtype != self.dtype:  # a wrong dtype would silently misalign every later document
            raise TypeError(f"tokens of dtype {tokens.dtype} for a dataset of {self.dtype}")
        self._bin.write(np.ascontiguousarray(tokens).data)
        self.lengths.append(len(tokens))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.array(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)  # byte offset of each sequence in the .bin
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        boundaries = np.arange(len(lengths) + 1, dtype=np.int64)  # document i is sequence i
        with open(f"{self.tmp_prefix}.idx", "wb") as f:
            f.write(INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, DTYPE_CODE[self.dtype], len(lengths),
                                      len(boundaries)))
            for array in (lengths, pointers, boundaries):
                f.write(array.tobytes())

    def commit(self) -> None:
        for suffix in (".bin", ".idx"):  # the index last: megatron-core reads a dataset through its index
            os.replace(self.tmp_prefix + suffix, self.prefix + suffix)
        stale = self.prefix + ".tokenizer.json"  # an overwritten dataset's record is rewritten next
        if os.path.exists(stale):
            os.remove(stale)

    def discard(self) -> None:
        self._bin.close()
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

# (tokenizer, dtype, eod or None, bos or None)
_worker_state: Optional[Tuple[object, type, Optional[int], Optional[int]]] = None


def _pool(workers: int, kind: str, model: Optional[str], append_eod: bool, prepend_bos: bool):
    # fork starts workers at once and shares the loaded modules; elsewhere spawn works as well, since the
    # workers need nothing but this module and the tokenizer.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                    initargs=(kind, model, append_eod, prepend_bos))


def _init_worker(kind: str, model: Optional[str], append_eod: bool, prepend_bos: bool) -> None:
    global _worker_state
    # Ctrl-C is the main process's to handle (it stops the pool); the pool stops a worker with SIGTERM, which must
    # kill it even where the parent installed a handler of its own (tools/preprocess_data.py does).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer = build_tokenizer(kind, model)
    _worker_state = (tokenizer, token_dtype(tokenizer.vocab_size), tokenizer.eod if append_eod else None,
                     tokenizer.bos if prepend_bos else None)


def _encode(record: Tuple[Tuple[str, ...], int]) -> Tuple[Tuple[np.ndarray, ...], int]:
    """One document's texts -> one token array per text (EOD appended if asked); its size passes through."""
    texts, nbytes = record
    tokenizer, dtype, eod, bos = _worker_state
    arrays = []
    for text in texts:
        ids = tokenizer.tokenize(text)
        if bos is not None:
            ids.insert(0, bos)
        if eod is not None:
            ids.append(eod)
        arrays.append(np.array(ids, dtype=dtype))
    return tuple(arrays), nbytes
