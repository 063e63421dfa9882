"""Tokenizers: a sentencepiece model, or raw UTF-8 bytes.

Both expose what megatron-core's datasets read from a tokenizer (``vocab_size``, ``eod``, ``pad``,
``unique_identifiers``, which enters the dataset cache's hash) plus ``tokenize`` / ``detokenize``.

They are written here rather than taken from ``megatron.core.tokenizers`` for two reasons: that package's
byte-level tokenizer gives EOD and PAD the ids of bytes 0 and 1 and cannot detokenize its own special ids, and
importing it pulls in all of megatron-core (about 6 s), which every preprocessing worker and every config check
would pay. This module imports only sentencepiece, and only when a sentencepiece model is used.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable, List, Optional, Union

import numpy as np

if TYPE_CHECKING:
    from mtp_megatron.config.schema import DataConfig, TokenizerConfig

# Special ids of the sentencepiece models tools/train_tokenizer.py trains (models from elsewhere keep their own).
SPM_PAD_ID, SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message names the file and the fix."""


class SentencePieceTokenizer:
    """A sentencepiece model file. EOD (the document separator in the data) is the model's end-of-sequence id."""

    kind = "sentencepiece"

    def __init__(self, model_path: str):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise TokenizerError(f"tokenizer model {model_path!r} does not exist")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"tokenizer model {model_path!r} is not a sentencepiece model: {e}") from e
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                f"tokenizer model {model_path!r} has no end-of-sequence piece, which the data uses to separate "
                "documents; train one with tools/train_tokenizer.py (it reserves <s>, </s>, <pad>, <unk>)"
            )
        self.model_path = model_path
        self.vocab_size: int = self._sp.get_piece_size()
        self.eod: int = self._sp.eos_id()
        self.bos: int = self._sp.bos_id()
        self.pad: int = self._sp.pad_id()  # -1 when the model has none (never matches a token)
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", self.vocab_size), ("sha256", digest)]
        )

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOD (256), BOS (257) and PAD (258): 259 ids, for multi-byte prediction.

    Every byte keeps its own id, so any input round-trips exactly and no special id collides with a byte.
    """

    kind = "byte"
    eod, bos, pad = 256, 257, 258
    vocab_size = 259

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("vocab_size", self.vocab_size)])

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        # Special ids are dropped; bytes cut mid-character (a truncated sample) become U+FFFD.
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


Tokenizer = Union[SentencePieceTokenizer, ByteTokenizer]


def resolve_tokenizer_type(kind: Optional[str], model: Optional[str]) -> str:
    """The tokenizer type a config means: ``kind`` when given, else sentencepiece with a model file, else bytes."""
    if kind is not None:
        return kind
    return "sentencepiece" if model else "byte"


def build_tokenizer(kind: Optional[str], model: Optional[str] = None) -> Tokenizer:
    """The tokenizer of a ``tokenizer`` config section (``kind`` = its ``type``, ``model`` = its ``model``)."""
    kind = resolve_tokenizer_type(kind, model)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if not model:
            raise TokenizerError("a sentencepiece tokenizer needs tokenizer.model=PATH (a .model file)")
        return SentencePieceTokenizer(model)
    raise TokenizerError(f"unknown tokenizer type {kind!r}; choose sentencepiece or byte")


def document_eod(tokenizer: "TokenizerConfig", data: "DataConfig") -> Optional[int]:
    """The id that ends each document, when documents are masked from each other (``data.reset_attention_mask``),
    else None: what ``build_model(cfg, env, document_eod=...)`` needs so a head skips targets in a later document.
    Read here, in the data package, because the model package opens no tokenizer."""
    if not data.reset_attention_mask:
        return None
    return build_tokenizer(tokenizer.type, tokenizer.model).eod


def tokenizer_identity(kind: Optional[str], model: Optional[str] = None) -> dict:
    """What identifies a tokenizer: its type and, for sentencepiece, the model file's content hash. Recorded with
    checkpoints and preprocessed datasets, and compared on load."""
    kind = resolve_tokenizer_type(kind, model)
    identity = {"type": kind, "sha256": None}
    if kind == "sentencepiece":
        with open(model, "rb") as f:
            identity["sha256"] = hashlib.sha256(f.read()).hexdigest()
    return identity


def token_dtype(vocab_size: int) -> type:
    """The on-disk token dtype for a vocabulary, as Megatron's ``DType.optimal_dtype``: uint16 below 65500."""
    return np.uint16 if vocab_size < 65500 else np.int32
