"""Our tokenizers as transformers tokenizers: files ``AutoTokenizer.from_pretrained`` loads, encoding and decoding
id for id as ``mtp_megatron.data.tokenizer`` does.

- sentencepiece: transformers' own converter (``SentencePieceExtractor`` reads the model proto,
  ``SpmConverter.build_tokenizer_from_spm_proto`` builds a ``tokenizers`` BPE following the model's settings: merges
  ranked by piece score, byte fallback, whitespace escaped as U+2581 with no dummy prefix for ours, decoding
  through ``ByteFallback`` and ``Fuse``). The .model file is copied alongside (our own readers load it).
- byte (``tokenizer.type=byte``): a ``tokenizers`` BPE with no merges over the 256 byte pieces ``<0x00>`` ..
  ``<0xFF>`` with byte fallback, so every UTF-8 byte is its own id 0..255, then EOD, BOS and PAD (256, 257, 258).

Both add no BOS/EOS (our data has none) and treat the special pieces' text (``</s>`` in source code) as text, as
sentencepiece does (``split_special_tokens``). A fixed probe text is encoded both ways before anything is written;
if transformers' tokenizer disagrees, only the .model file is written and the converter says so.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from mtp_megatron.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

# Code and prose with the cases that break tokenizer conversions: leading and repeated spaces, tabs, newlines,
# digits, characters outside a small vocabulary (byte fallback), special pieces' text.
PROBE = ["def f(x):\n    return x  # 12345\n\n\tpass\n", "  two leading spaces", " one", "", "end   ",
         "naïve café — 東京 😀", "<s> </s> <pad> <unk> <0x41> ▁ literal", "\r\n\x00\x7f"]
BYTE_SPECIALS = {"eos": "<|eod|>", "bos": "<|bos|>", "pad": "<|pad|>"}


def special_ids(tokenizer) -> dict:
    """config.json's ``bos_token_id`` / ``eos_token_id`` (our EOD) / ``pad_token_id`` of one of our tokenizers."""
    ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}
    return {key: (value if value is not None and value >= 0 else None) for key, value in ids.items()}


def _sentencepiece_backend(model_file: str):
    """(tokenizers backend, {role: piece}) built by transformers' sentencepiece converter."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(model_file).proto
    if proto.trainer_spec.model_type == 2:  # BPE: the converter ranks merges by the pieces' scores
        vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    else:  # unigram
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    # legacy=True is sentencepiece's own behaviour for models with a dummy prefix (one "▁" before the whole text,
    # even when it starts with a space); ours have none, which the converter reads from the proto.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    spec = proto.trainer_spec
    roles = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id, "unk": spec.unk_id}
    return backend, {role: proto.pieces[i].piece for role, i in roles.items() if 0 <= i < len(proto.pieces)}


def _byte_backend():
    """(tokenizers backend, {role: piece}) of ``ByteTokenizer``: byte b is id b, then EOD, BOS, PAD."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    tok = ByteTokenizer()
    vocab.update({BYTE_SPECIALS["eos"]: tok.eod, BYTE_SPECIALS["bos"]: tok.bos, BYTE_SPECIALS["pad"]: tok.pad})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return backend, dict(BYTE_SPECIALS)


def _first_difference(ours, theirs) -> Optional[str]:
    """Where ``theirs`` (transformers) encodes or decodes a probe text differently from ``ours``, if anywhere."""
    for text in PROBE:
        ids = ours.tokenize(text)
        got = theirs(text)["input_ids"]
        if got != ids:
            return f"{text!r}: ours {ids}, transformers {got}"
        if theirs.decode(ids) != ours.detokenize(ids):
            return f"decoding {ids}: ours {ours.detokenize(ids)!r}, transformers {theirs.decode(ids)!r}"
    return None


def write_tokenizer(kind: str, model_file: Optional[str], folder: str, vocab_size: int) -> Optional[dict]:
    """Write the tokenizer files into ``folder``; the special ids for config.json, or None when there is no
    tokenizer to write (a sentencepiece model whose file is missing, or a model too small for the byte tokenizer's
    ids). Prints what it wrote."""
    from transformers import PreTrainedTokenizerFast

    if kind == "byte" and vocab_size < ByteTokenizer.vocab_size:
        # A config naming no tokenizer file means bytes for a run of ours; an imported model may simply not say.
        print(f"[convert] no tokenizer exported: the config names no sentencepiece model and model.vocab_size "
              f"{vocab_size} is too small for the byte tokenizer's {ByteTokenizer.vocab_size} ids")
        return None
    if kind == "sentencepiece":
        if not model_file or not os.path.isfile(model_file):
            print(f"[convert] no tokenizer exported: the sentencepiece model {model_file!r} is not here; copy it in "
                  "as tokenizer.model and rerun to get tokenizer.json and the special ids")
            return None
        ours = SentencePieceTokenizer(model_file)
        shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
        backend, pieces = _sentencepiece_backend(model_file)
    else:
        ours = ByteTokenizer()
        backend, pieces = _byte_backend()
    theirs = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{f"{role}_token": piece for role, piece in pieces.items()},
        split_special_tokens=True,  # "</s>" in a text is text, as sentencepiece and our byte tokenizer read it
        clean_up_tokenization_spaces=False)
    difference = _first_difference(ours, theirs)
    if difference:
        print(f"[convert] tokenizer.json not written: transformers' conversion of the {kind} tokenizer differs "
              f"from ours ({difference}); tokenizer.model is there for sentencepiece")
    else:
        theirs.save_pretrained(folder)
        print(f"[convert] tokenizer: {kind}, {ours.vocab_size} ids, tokenizer.json for AutoTokenizer (checked "
              "against ours on a probe text)")
    return special_ids(ours)
