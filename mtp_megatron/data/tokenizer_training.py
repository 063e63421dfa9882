"""Train a sentencepiece BPE model that suits code as well as prose, from a seeded sample of the input documents.

The settings are chosen so that every input round-trips exactly (``decode(encode(x)) == x``), which code needs:
no normalization (``identity``), no dummy prefix, runs of spaces and newlines kept and learnable as pieces
(indentation becomes a few tokens instead of one per space), digits split one per token (numbers are not merged
into arbitrary pieces), and byte fallback, so a character outside the vocabulary becomes its UTF-8 bytes instead
of ``<unk>``. Special ids are fixed to ``mtp_megatron.data.tokenizer``'s ``SPM_*`` constants.

The sample is drawn in one pass with bounded memory: each document gets a key from a seeded RNG and the sample
keeps the lowest-keyed documents that fit in ``sample_bytes``, so the same input and seed always give the same
model. Documents reach sentencepiece as chunks cut at line ends (``CHUNK_CHARS``), so newlines and indentation
inside a chunk are learned while no chunk exceeds sentencepiece's ``max_sentence_length``.
"""

from __future__ import annotations

import heapq
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from mtp_megatron.data.sources import DataError, DocumentReader, SkipLog
from mtp_megatron.data.tokenizer import (SPM_BOS_ID, SPM_EOS_ID, SPM_PAD_ID, SPM_UNK_ID,
                                         SentencePieceTokenizer)

DEFAULT_SAMPLE_BYTES = 200 * 10**6
CHUNK_CHARS = 2048
ROUNDTRIP_DOCUMENTS = 20  # sampled documents checked for decode(encode(x)) == x after training
FIXED_PIECES = 4 + 256  # the special pieces and the byte-fallback pieces every model holds
MIN_VOCAB_SIZE = FIXED_PIECES + 1  # plus at least one character: anything smaller cannot be trained

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    normalization_rule_name="identity",
    character_coverage=0.9995,  # rarer characters are left to byte fallback
    pad_id=SPM_PAD_ID,
    unk_id=SPM_UNK_ID,
    bos_id=SPM_BOS_ID,
    eos_id=SPM_EOS_ID,
    max_sentence_length=4 * CHUNK_CHARS,  # in bytes: a chunk of CHUNK_CHARS characters always fits
    minloglevel=2,  # errors only: sentencepiece's INFO lines and its .vocab escaping warnings are noise here
)


class TokenizerTrainingError(DataError):
    """Training cannot run or sentencepiece refused; the message says why and what to change."""


@dataclass
class TrainSummary:
    model_path: str
    vocab_path: str
    vocab_size: int
    documents_read: int  # texts read from the input (one per document and JSON key)
    documents_sampled: int
    sample_bytes: int  # UTF-8 bytes of the sampled texts
    seconds: float
    roundtrip_checked: int
    roundtrip_failed: List[str] = field(default_factory=list)  # origins (file:line) of texts that did not round-trip
    skipped: SkipLog = field(default_factory=SkipLog)
    empty: SkipLog = field(default_factory=SkipLog)  # empty documents, dropped

    def format(self) -> str:
        checked_ok = self.roundtrip_checked - len(self.roundtrip_failed)
        lines = [
            f"tokenizer: {self.model_path} (+ {os.path.basename(self.vocab_path)}), {self.vocab_size} pieces",
            f"sample: {self.documents_sampled:,} of {self.documents_read:,} documents, "
            f"{self.sample_bytes / 1e6:.1f} MB",
            f"round trip decode(encode(x)) == x: {checked_ok}/{self.roundtrip_checked} sampled documents",
            *(f"  differs: {origin}" for origin in self.roundtrip_failed),
            f"time: {self.seconds:.1f} s",
            self.skipped.format(),
            self.empty.format("empty documents dropped"),
        ]
        return "\n".join(lines)


def train_tokenizer(inputs: Sequence[str], model_prefix: str, vocab_size: int, *,
                    sample_bytes: int = DEFAULT_SAMPLE_BYTES, json_keys: Sequence[str] = ("text",),
                    suffixes: Optional[Sequence[str]] = None, seed: int = 1234, on_error: str = "fail",
                    overwrite: bool = False) -> TrainSummary:
    """Train ``{model_prefix}.model`` and ``.vocab`` on a sample of the documents of ``inputs``.

    Both files appear together or not at all: sentencepiece writes them under a temporary prefix in the same
    folder, and they are renamed into place once training succeeded.
    """
    start = time.perf_counter()
    model_path, vocab_path = f"{model_prefix}.model", f"{model_prefix}.vocab"
    for path in (model_path, vocab_path):
        if os.path.exists(path) and not overwrite:
            raise TokenizerTrainingError(f"{path} exists; pass --overwrite to replace it")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerTrainingError(
            f"--vocab-size {vocab_size} is too small: a model holds 4 special and 256 byte pieces plus the "
            "sample's characters (about 100 for English text or code); use 512 or more")
    reader = DocumentReader(inputs, json_keys, suffixes, on_error)
    sample, read = sample_texts(_texts(reader), sample_bytes, seed)
    if not sample:
        raise TokenizerTrainingError(f"no document fits in --sample-bytes {sample_bytes}; raise it")

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    _train_atomically([text for _, text in sample], model_prefix, vocab_size)

    tokenizer = SentencePieceTokenizer(model_path)
    checked = sample[:ROUNDTRIP_DOCUMENTS]
    failed = [origin for origin, text in checked if tokenizer.detokenize(tokenizer.tokenize(text)) != text]
    return TrainSummary(
        model_path=model_path, vocab_path=vocab_path, vocab_size=tokenizer.vocab_size, documents_read=read,
        documents_sampled=len(sample), sample_bytes=sum(_utf8_len(text) for _, text in sample),
        seconds=time.perf_counter() - start, roundtrip_checked=len(checked), roundtrip_failed=failed,
        skipped=reader.skipped, empty=reader.empty)


def sample_texts(texts: Iterable[Tuple[str, str]], max_bytes: int, seed: int) -> Tuple[List[Tuple[str, str]], int]:
    """A seeded random sample of ``(origin, text)`` pairs of at most ``max_bytes`` UTF-8 bytes, in input order,
    and the number of texts read.

    One pass, holding no more than the sample: every text draws a key, the sample keeps the lowest keys that fit,
    and the highest-keyed text leaves first whenever the budget is exceeded.
    """
    rng = random.Random(seed)
    heap: List[Tuple[float, int, int, str, str]] = []  # (-key, position, size, origin, text): max key on top
    total = read = 0
    for position, (origin, text) in enumerate(texts):
        read += 1
        size = _utf8_len(text)
        heapq.heappush(heap, (-rng.random(), position, size, origin, text))
        total += size
        while total > max_bytes:
            total -= heapq.heappop(heap)[2]
    return [(origin, text) for _, _, _, origin, text in sorted(heap, key=lambda item: item[1])], read


def chunk_text(text: str, limit: int = CHUNK_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, cut after a newline where the piece has one."""
    start = 0
    while start < len(text):
        end = min(start + limit, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= 0:
                end = newline + 1
        yield text[start:end]
        start = end


def _texts(reader: DocumentReader) -> Iterator[Tuple[str, str]]:
    for document in reader:
        for text in document.texts:
            yield document.origin, text


def _train_atomically(texts: List[str], model_prefix: str, vocab_size: int) -> None:
    import sentencepiece

    tmp_prefix = f"{model_prefix}.tmp-{os.getpid()}"
    sentences = (chunk for text in texts for chunk in chunk_text(text))
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_prefix=tmp_prefix, vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1, **TRAINER_OPTIONS)
        for suffix in (".vocab", ".model"):  # the model last: its presence means the pair is complete
            os.replace(tmp_prefix + suffix, model_prefix + suffix)
    except RuntimeError as e:
        raise TokenizerTrainingError(
            f"sentencepiece cannot train a {vocab_size}-piece model on this sample: {_spm_reason(e)}") from e
    finally:
        for suffix in (".vocab", ".model"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)


def _spm_reason(error: RuntimeError) -> str:
    """Sentencepiece's message without its source location and failed check, e.g. ``Vocabulary size too high
    (5000). Please set it to a value <= 4556.``; its too-few-pieces message is restated in our flag's terms."""
    reason = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", str(error)).strip() or str(error)
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
    if too_small:
        needed = int(too_small.group(1))
        return (f"the sample has {needed - FIXED_PIECES} characters to cover besides the special and byte pieces; "
                f"pass --vocab-size {needed} or more")
    return reason


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))
