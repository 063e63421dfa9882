"""Greedy decoding, plain or self-speculative with the MTP heads (blockwise parallel decoding, Stern et al. 2018).

Speculative: after a forward, head 1's argmax at the last position is the next token (certain) and heads 2..n
draft the n-1 after it. The next forward runs that block of n tokens at once; head 1's argmax at each block
position is what plain greedy decoding would produce there, so the drafts are accepted up to the first one that
differs, and head 1's prediction after the last accepted token comes with it: 1 to n tokens per forward, the
same tokens as plain greedy. The cache is cropped back to the accepted positions, and the heads' outputs at the
last accepted position draft the next block. With a batch, all rows accept the smallest count among them, so
their caches stay the same length (each row's output is still exactly its greedy output).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mtp_megatron.inference.decoder import KVCache, MTPDecoder


@dataclass
class DecodeStats:
    tokens: int = 0
    """New tokens per row."""
    forwards: int = 0
    """Forward passes, the prompt's included (it yields the first token)."""
    seconds: float = 0.0
    accepted: list = field(default_factory=list)
    """Per draft position (heads 2..n): how often its draft was accepted, and how often it was tried."""

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    def acceptance(self) -> list[float]:
        return [hit / max(tried, 1) for hit, tried in self.accepted]


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start``, once the GPU has finished what was queued (CUDA kernels run asynchronously, and
    greedy decoding never waits for them on its own)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def greedy(decoder: MTPDecoder, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, DecodeStats]:
    """[b, max_new_tokens] next-token greedy continuation of ``prompt`` [b, p], one token per forward."""
    start, cache, stats = time.perf_counter(), KVCache(), DecodeStats(forwards=1)
    logits = decoder.forward(prompt, cache)
    out = [logits[0, :, -1].argmax(-1)]
    while len(out) < max_new_tokens:
        logits = decoder.forward(out[-1][:, None], cache)
        out.append(logits[0, :, -1].argmax(-1))
        stats.forwards += 1
    stats.tokens, stats.seconds = len(out), _elapsed(start, prompt.device)
    return torch.stack(out, dim=1), stats


def speculative(decoder: MTPDecoder, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, DecodeStats]:
    """The same continuation as ``greedy``, drafting n-1 tokens per forward with heads 2..n."""
    n = decoder.n_heads
    start, cache = time.perf_counter(), KVCache()
    stats = DecodeStats(forwards=1, accepted=[[0, 0] for _ in range(n - 1)])
    logits = decoder.forward(prompt, cache)[:, :, -1]  # [n, b, V] at the last prompt position
    out = [logits[0].argmax(-1)]
    drafts = logits[1:].argmax(-1)  # [n-1, b]
    while len(out) < max_new_tokens:
        block = torch.cat([out[-1][:, None], drafts.T], dim=1)  # [b, n]: the certain token, then the drafts
        block_logits = decoder.forward(block, cache)  # [n heads, b, n positions, V]
        stats.forwards += 1
        greedy_next = block_logits[0].argmax(-1)  # [b, n]: plain greedy's token after block[:, :j+1]
        matches = (block[:, 1:] == greedy_next[:, :-1]).long().cumprod(dim=1)  # [b, n-1]
        accepted = int(matches.sum(dim=1).min())  # drafts every row accepts
        for j in range(n - 1):
            stats.accepted[j][1] += 1 if j <= accepted else 0
            stats.accepted[j][0] += 1 if j < accepted else 0
        out += [block[:, j] for j in range(1, accepted + 1)] + [greedy_next[:, accepted]]
        cache.crop(cache.length - (n - 1 - accepted))  # keep block positions 0..accepted
        drafts = block_logits[1:, :, accepted].argmax(-1)
    stats.tokens, stats.seconds = max_new_tokens, _elapsed(start, prompt.device)
    return torch.stack(out[:max_new_tokens], dim=1), stats
