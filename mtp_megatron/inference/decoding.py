"""Greedy decoding, plain or self-speculative with the MTP heads (blockwise parallel decoding, Stern et al. 2018).

Speculative: after a forward, head 1's argmax at the last position is the next token (certain) and heads 2..n
draft the n-1 after it. The next forward runs that block of n tokens at once; head 1's argmax at each block
position is what plain greedy decoding would produce there, so the drafts are accepted up to the first one that
differs, and head 1's prediction after the last accepted token comes with it: 1 to n tokens per forward, the
same tokens as plain greedy. The cache is cropped back to the accepted positions, and the heads' outputs at the
last accepted position draft the next block.

With a batch, each row accepts its own count: the cache holds a length per row (mtp_megatron/inference/decoder.py
``KVCache``), so a row takes as many tokens per forward as it would alone, and it leaves the batch as soon as it
has its tokens (the rest run on without it). With ``batch_size`` below the number of prompts, at most that many
rows decode at once and a waiting prompt joins as soon as a row leaves (continuous batching): a batch then runs at
its rows' mean pace, not its slowest row's, which at batch 8 cost a third of the forwards. Waiting prompts are
prefilled ``batch_size`` at a time, in one forward that runs the heads at each prompt's last position only, and
join one by one from there (a prefill per joining row cost a fifth of the time at batch 8), each taking a finished
row's place in the cache (``KVCache.replace_rows``: only its own rows are copied). Prompts of different lengths
come right-padded, with ``prompt_lengths``. Each row's output is its greedy output; in fp32 the batch's matrix
shapes differ from a lone row's, so a near-tie may round to another argmax (as it may for plain greedy at another
batch size).
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
    """Forward passes of the batch, the prompt's included (it yields the first token)."""
    row_forwards: list = field(default_factory=list)
    """Per row: the forward passes it took part in until it had its tokens."""
    seconds: float = 0.0
    accepted: list = field(default_factory=list)
    """Per draft position (heads 2..n): how often its draft was accepted, and how often it was tried, summed over
    rows. A draft is tried when every earlier draft of its block was accepted."""

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per forward a row took part in, over all rows (at batch 1: tokens / forwards)."""
        row_forwards = self.row_forwards or [self.forwards]
        return self.tokens * len(row_forwards) / max(sum(row_forwards), 1)

    def acceptance(self) -> list[float]:
        return [hit / max(tried, 1) for hit, tried in self.accepted]


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start``, once the GPU has finished what was queued (CUDA kernels run asynchronously, and
    greedy decoding never waits for them on its own)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _prompt_lengths(prompt: torch.Tensor, prompt_lengths) -> list[int]:
    """Each row's prompt length: the whole width of ``prompt`` [b, p], or ``prompt_lengths`` (rows right-padded)."""
    b, p = prompt.shape
    if prompt_lengths is None:
        return [p] * b
    lengths = [int(length) for length in prompt_lengths]
    if len(lengths) != b or not all(1 <= length <= p for length in lengths):
        raise ValueError(f"prompt_lengths {lengths}: give one per prompt row ({b}), each from 1 to the padded "
                         f"prompt's width {p}")
    return lengths


def _prefill(decoder: MTPDecoder, prompt: torch.Tensor, lengths: list[int], slots: int, heads: int | None = None):
    """Run the prompts; return the heads' logits at each row's last prompt position [n, b, V] and the cache (of
    ``slots`` positions per row, as many as the decoding will fill)."""
    cache = KVCache(reserved=slots)
    step = decoder.step(prompt, cache, heads)
    cache.crop(lengths)  # a shorter prompt's padding is stale
    last = torch.tensor(lengths, device=prompt.device)[:, None] - 1  # the heads run there alone
    return decoder.logits(step.hidden(last), step.trunk_at(last))[:, :, 0], cache


def greedy(decoder: MTPDecoder, prompt: torch.Tensor, max_new_tokens: int,
           prompt_lengths=None) -> tuple[torch.Tensor, DecodeStats]:
    """[b, max_new_tokens] next-token greedy continuation of ``prompt`` [b, p], one token per forward: head 1's
    path only, as a plain GPT decodes (the baseline that speculative decoding has to beat)."""
    start = time.perf_counter()
    lengths = _prompt_lengths(prompt, prompt_lengths)
    logits, cache = _prefill(decoder, prompt, lengths, prompt.shape[1] + max_new_tokens - 1, heads=1)
    out = [logits[0].argmax(-1)]
    while len(out) < max_new_tokens:
        out.append(decoder.forward(out[-1][:, None], cache, heads=1)[0, :, -1].argmax(-1))
    forwards = len(out)
    stats = DecodeStats(tokens=len(out), forwards=forwards, row_forwards=[forwards] * prompt.shape[0],
                        seconds=_elapsed(start, prompt.device))
    return torch.stack(out, dim=1), stats


def sample(decoder: MTPDecoder, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, generator: torch.Generator | None = None, vocab_size: int | None = None,
           prompt_lengths=None) -> tuple[torch.Tensor, DecodeStats]:
    """[b, max_new_tokens] sampled continuation of ``prompt``: head 1's distribution at ``temperature``, cut to its
    nucleus ``top_p`` (the fewest most likely tokens whose probability reaches top_p, Holtzman et al. 2020), one
    token per forward. ``vocab_size``: draw only ids below it (the tokenizer's; the padded rows past it are never
    trained targets). Temperature 0 is ``greedy``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} (give >= 0) or top_p {top_p} (give 0 < top_p <= 1) is invalid")
    if temperature == 0:
        return greedy(decoder, prompt, max_new_tokens, prompt_lengths)
    start = time.perf_counter()

    def draw(logits: torch.Tensor) -> torch.Tensor:  # [b, V] -> [b]
        logits = logits.float()[:, :vocab_size] / temperature
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1:
            ranked, order = probs.sort(dim=-1, descending=True)
            ranked[ranked.cumsum(-1) - ranked >= top_p] = 0  # the mass before a token already reaches top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    lengths = _prompt_lengths(prompt, prompt_lengths)
    logits, cache = _prefill(decoder, prompt, lengths, prompt.shape[1] + max_new_tokens - 1, heads=1)
    out = [draw(logits[0])]
    while len(out) < max_new_tokens:
        out.append(draw(decoder.forward(out[-1][:, None], cache, heads=1)[0, :, -1]))
    stats = DecodeStats(tokens=len(out), forwards=len(out), row_forwards=[len(out)] * prompt.shape[0],
                        seconds=_elapsed(start, prompt.device))
    return torch.stack(out, dim=1), stats


@dataclass
class _Active:
    """The rows still decoding, in the cache's order."""

    rows: list
    """Their indices in the batch."""
    row_index: torch.Tensor
    """The same on the device."""
    produced: list
    """How many new tokens each has."""
    token: torch.Tensor
    """[a] each one's last token, not yet in the cache: the next block starts with it."""
    drafts: torch.Tensor
    """[a, n-1] heads 2..n's drafts of the tokens after it."""

    @classmethod
    def none(cls, drafts: int, device: torch.device) -> "_Active":
        """No rows yet."""
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return cls([], empty, [], empty, empty.view(0, drafts))

    def join(self, rows: list[int], first: torch.Tensor, drafts: torch.Tensor) -> None:
        """Rows ``rows`` of the batch join (their caches appended by the caller), with their first tokens and
        drafts."""
        self.rows, self.produced = self.rows + rows, self.produced + [1] * len(rows)
        self.row_index = torch.cat([self.row_index, torch.tensor(rows, device=self.row_index.device)])
        self.token, self.drafts = torch.cat([self.token, first]), torch.cat([self.drafts, drafts])

    def replace(self, indices: list[int], other: "_Active") -> None:
        """``other``'s first rows (their caches put in place by the caller) take the places ``indices`` of finished
        rows."""
        index, count = torch.tensor(indices, dtype=torch.long, device=self.token.device), len(indices)
        self.row_index[index], self.token[index] = other.row_index[:count], other.token[:count]
        self.drafts[index] = other.drafts[:count]
        for i, row, produced in zip(indices, other.rows, other.produced):
            self.rows[i], self.produced[i] = row, produced

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (their cache rows are the caller's to keep)."""
        index = torch.tensor(indices, dtype=torch.long, device=self.token.device)
        self.row_index, self.token, self.drafts = self.row_index[index], self.token[index], self.drafts[index]
        self.rows, self.produced = [self.rows[i] for i in indices], [self.produced[i] for i in indices]


def speculative(decoder: MTPDecoder, prompt: torch.Tensor, max_new_tokens: int, prompt_lengths=None,
                batch_size: int | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """The same continuation as ``greedy``, drafting n-1 tokens per forward with heads 2..n; each row accepts its
    own drafts and leaves the batch once it has ``max_new_tokens``. ``batch_size``: at most this many rows decode
    at once, the next prompt joining when a row leaves (default: every row at once)."""
    n, b, device = decoder.n_heads, prompt.shape[0], prompt.device
    batch_size = b if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: give at least 1 row at once (or None for every row)")
    start = time.perf_counter()
    lengths = _prompt_lengths(prompt, prompt_lengths)
    # A row's last forward starts after its prompt and all but one of at most max_new_tokens - 1 tokens.
    slots = prompt.shape[1] + max_new_tokens + n - 2
    # Each forward writes a row's whole block of head-1 tokens after what it has; only the accepted ones stay.
    out = torch.zeros(b, max_new_tokens + n - 1, dtype=torch.long, device=device)
    active, cache = _Active.none(n - 1, device), KVCache()
    ready, ready_cache = _Active.none(n - 1, device), KVCache()  # prefilled, waiting to join
    waiting = list(range(b))
    row_forwards, forwards = [1] * b, 0
    tried = torch.zeros(n - 1, dtype=torch.long, device=device)
    hits = torch.zeros(n - 1, dtype=torch.long, device=device)
    draft_position = torch.arange(n - 1, device=device)
    block_position = torch.arange(n, device=device)
    while active.produced or ready.rows or waiting:
        if (waiting or ready.rows) and len(active.produced) < batch_size:
            if not ready.rows:  # one forward prefills the next batch_size prompts; they join as rows leave
                rows, waiting = waiting[:batch_size], waiting[batch_size:]
                index = torch.tensor(rows, device=device)
                width = max(lengths[r] for r in rows)
                logits, ready_cache = _prefill(decoder, prompt[index, :width], [lengths[r] for r in rows], slots)
                forwards += 1
                out[index, 0] = logits[0].argmax(-1)  # the prompt's forward yields a row's first token
                ready = _Active(rows, index, [1] * len(rows), out[index, 0], logits[1:].argmax(-1).T)
            count = min(batch_size - len(active.produced), len(ready.rows))
            active.join(ready.rows[:count], ready.token[:count], ready.drafts[:count])
            cache.extend(ready_cache.take_first(count))
            ready.keep(list(range(count, len(ready.rows))))
            _retire_finished(active, cache, max_new_tokens, ready, ready_cache)
            continue
        block = torch.cat([active.token[:, None], active.drafts], dim=1)  # [a, n]: the certain token, the drafts
        # Every head at every block position in one pass: heads 2..n at the accepted position alone (a second pass
        # after head 1, DecoderStep.hidden) measured no faster at batch 8 on the CPU (its extra ops cost what its
        # smaller attention and MLP save; docs/benchmarks.md section 6).
        hidden, trunk = decoder.hidden_states(block, cache)  # [n heads, a, n positions, d], [a, n, d]
        forwards += 1
        greedy_next = decoder.logits(hidden[:1], trunk)[0].argmax(-1)  # [a, n]: greedy's token after block[:, :j+1]
        accepted = (block[:, 1:] == greedy_next[:, :-1]).long().cumprod(dim=1).sum(dim=1)  # [a]
        # The accepted drafts are greedy's tokens, so the row's new tokens are greedy_next[:, :accepted + 1].
        positions = torch.tensor(active.produced, device=device)[:, None] + block_position
        out[active.row_index[:, None], positions] = greedy_next
        tried += (accepted[:, None] >= draft_position).sum(dim=0)
        hits += (accepted[:, None] > draft_position).sum(dim=0)
        rows = torch.arange(len(active.produced), device=device)
        active.token = greedy_next[rows, accepted]
        # Only the accepted position's drafts are read: heads 2..n are unembedded there alone.
        at_accepted = decoder.logits(hidden[1:, rows, accepted, None], trunk[rows, accepted, None], first=1)
        active.drafts = at_accepted[:, :, 0].argmax(-1).T
        counts = accepted.tolist()  # the one wait per forward: the host places the next block
        cache.crop([length - (n - 1 - count) for length, count in zip(cache.lengths, counts)])
        active.produced = [produced + count + 1 for produced, count in zip(active.produced, counts)]
        for row in active.rows:
            row_forwards[row] += 1
        _retire_finished(active, cache, max_new_tokens, ready, ready_cache)
    stats = DecodeStats(tokens=max_new_tokens, forwards=forwards, row_forwards=row_forwards,
                        accepted=[list(pair) for pair in zip(hits.tolist(), tried.tolist())],
                        seconds=_elapsed(start, device))
    return out[:, :max_new_tokens], stats


def _retire_finished(active: _Active, cache: KVCache, max_new_tokens: int, ready: _Active,
                     ready_cache: KVCache) -> None:
    """Rows with all their tokens leave the batch: prefilled rows waiting to join take their places (their cache
    rows copied into the finished ones'), and the places left over are dropped, so that the others' forwards do not
    carry them."""
    while True:
        finished = [i for i, produced in enumerate(active.produced) if produced >= max_new_tokens]
        count = min(len(finished), len(ready.rows))
        if not count:
            break
        active.replace(finished[:count], ready)
        cache.replace_rows(finished[:count], ready_cache.take_first(count))
        ready.keep(list(range(count, len(ready.rows))))
    unfinished = [i for i, produced in enumerate(active.produced) if produced < max_new_tokens]
    if len(unfinished) < len(active.produced):
        active.keep(unfinished)
        cache.keep_rows(unfinished)
