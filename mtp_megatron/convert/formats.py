"""Which checkpoint format a folder holds, and reading any of them into our config and dense state dict."""

from __future__ import annotations

import os
from typing import Optional

FORMATS = ("megatron", "hf", "meta")


def detect_format(path: str) -> str:
    """megatron (ours: a dist checkpoint's metadata.json), hf (config.json) or meta (params.json)."""
    for marker, name in (("metadata.json", "megatron"), ("config.json", "hf"), ("params.json", "meta")):
        if os.path.exists(os.path.join(path, marker)):
            return name
    raise ValueError(f"{path} is none of the formats: no metadata.json (ours), config.json (Hugging Face) or "
                     "params.json (Meta). Fix: point at the checkpoint folder itself, or name the format")


def read_any(path: str, source: Optional[str] = None, n_heads: Optional[int] = None, seq_length: int = 4096,
             untie_embeddings: bool = False, device: str = "cpu"):
    """(our config, dense state dict, tokenizer .model path or None) of the checkpoint at ``path``. A Hugging Face
    Llama with tied embeddings is refused unless ``untie_embeddings`` (convert/hf.py ``read_llama``).

    ``device`` is where ours is read: a process that will use the GPU must read on "cuda" (convert/native.py:
    reading on "cpu" applies the CPU patches process-wide). Hugging Face and Meta checkpoints load on the CPU
    whatever ``device``; their consumer moves the tensors."""
    from mtp_megatron.convert import hf, meta, native

    source = source or detect_format(path)
    if n_heads is not None and source != "hf":
        raise ValueError(f"--n-heads {n_heads}: {'our' if source == 'megatron' else 'Meta'} checkpoints record "
                         "their heads, and the converter keeps them. Fix: drop --n-heads (it sets the heads of a "
                         "Hugging Face Llama's conversion)")
    if source == "megatron":
        cfg, dense = native.read_checkpoint(path, device)
        tokenizer = cfg.tokenizer.model
    elif source == "hf":
        cfg, dense = hf.read_llama(path, n_heads, untie_embeddings)
        tokenizer = os.path.join(path, "tokenizer.model")
    else:
        cfg, dense = meta.read_meta_folder(path, seq_length)
        tokenizer = os.path.join(path, "tokenizer.model")
    return cfg, dense, tokenizer if tokenizer and os.path.exists(tokenizer) else None
