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
    """The rows still decoding, in the cache's order, kept on the host: each forward's counts, tokens and drafts
    come back in one copy, and the bookkeeping between forwards is Python on short lists. That is about 10 device
    ops between two forwards instead of about 22 (each a kernel launch on a GPU); on the CPU both measured the same
    speed."""

    rows: list = field(default_factory=list)
    """Their indices in the batch."""
    token: list = field(default_factory=list)
    """Each one's last token, not yet in the cache: the next block starts with it."""
    drafts: list = field(default_factory=list)
    """Each one's n-1 drafts (heads 2..n) of the tokens after it."""

    def block(self, device: torch.device) -> torch.Tensor:
        """[a, n] each row's certain token, then its drafts: the next forward's tokens."""
        return torch.tensor([[token, *drafts] for token, drafts in zip(self.token, self.drafts)], device=device)

    def join(self, rows: list[int], token: list, drafts: list) -> None:
        """Rows ``rows`` of the batch join (their caches appended by the caller), with their first tokens and
        drafts."""
        self.rows, self.token, self.drafts = self.rows + rows, self.token + token, self.drafts + drafts

    def take_first(self, count: int) -> "_Active":
        """Remove the first ``count`` rows and return them."""
        taken = _Active(self.rows[:count], self.token[:count], self.drafts[:count])
        self.rows, self.token, self.drafts = self.rows[count:], self.token[count:], self.drafts[count:]
        return taken

    def replace(self, indices: list[int], other: "_Active") -> None:
        """``other``'s rows (their caches put in place by the caller) take the places ``indices`` of finished
        rows."""
        for i, row, token, drafts in zip(indices, other.rows, other.token, other.drafts):
            self.rows[i], self.token[i], self.drafts[i] = row, token, drafts

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (their cache rows are the caller's to keep)."""
        self.rows = [self.rows[i] for i in indices]
        self.token, self.drafts = [self.token[i] for i in indices], [self.drafts[i] for i in indices]


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
    out = [[] for _ in range(b)]  # each row's new tokens
    active, cache = _Active(), KVCache()
    ready, ready_cache = _Active(), KVCache()  # prefilled, waiting to join
    waiting = list(range(b))
    row_forwards, forwards = [1] * b, 0
    tried, hits = [0] * (n - 1), [0] * (n - 1)
    while active.rows or ready.rows or waiting:
        if (waiting or ready.rows) and len(active.rows) < batch_size:
            if not ready.rows:  # one forward prefills the next batch_size prompts; they join as rows leave
                rows, waiting = waiting[:batch_size], waiting[batch_size:]
                index = torch.tensor(rows, device=device)
                width = max(lengths[r] for r in rows)
                logits, ready_cache = _prefill(decoder, prompt[index, :width], [lengths[r] for r in rows], slots)
                forwards += 1
                first = logits.argmax(-1).T.tolist()  # [rows][n]: head 1's token, heads 2..n's drafts after it
                for row, tokens in zip(rows, first):
                    out[row].append(tokens[0])  # the prompt's forward yields a row's first token
                ready = _Active(rows, [tokens[0] for tokens in first], [tokens[1:] for tokens in first])
            joining = ready.take_first(min(batch_size - len(active.rows), len(ready.rows)))
            active.join(joining.rows, joining.token, joining.drafts)
            cache.extend(ready_cache.take_first(len(joining.rows)))
            _retire_finished(active, cache, out, max_new_tokens, ready, ready_cache)
            continue
        block = active.block(device)  # [a, n]: the certain token, the drafts
        # Every head at every block position in one pass: heads 2..n at the accepted position alone (a second pass
        # after head 1, DecoderStep.hidden) measured no faster at batch 8 on the CPU (its extra ops cost what its
        # smaller attention and MLP save; docs/benchmarks.md section 6).
        hidden, trunk = decoder.hidden_states(block, cache)  # [n heads, a, n positions, d], [a, n, d]
        forwards += 1
        greedy_next = decoder.logits(hidden[:1], trunk)[0].argmax(-1)  # [a, n]: greedy's token after block[:, :j+1]
        accepted = (block[:, 1:] == greedy_next[:, :-1]).cumprod(dim=1).sum(dim=1)  # [a]
        # Only the accepted position's drafts are read: heads 2..n are unembedded there alone.
        at = accepted.view(-1, 1, 1).expand(-1, 1, trunk.shape[-1])  # [a, 1, d]: each row's accepted position
        drafts = decoder.logits(hidden[1:].gather(2, at.expand(n - 1, -1, -1, -1)), trunk.gather(1, at),
                                first=1)[:, :, 0].argmax(-1)  # [n-1, a]
        # The one wait per forward: each row's count, greedy's tokens and the next drafts come back in one copy.
        counts = []
        for i, (count, *tokens) in enumerate(torch.cat([accepted[:, None], greedy_next, drafts.T], dim=1).tolist()):
            # The accepted drafts are greedy's tokens, so the row's new tokens are greedy_next[i, :count + 1].
            out[active.rows[i]].extend(tokens[:count + 1])
            active.token[i], active.drafts[i] = tokens[count], tokens[n:]
            for position in range(min(count + 1, n - 1)):  # draft position p is tried once drafts before it hit
                tried[position] += 1
                hits[position] += position < count
            counts.append(count)
            row_forwards[active.rows[i]] += 1
        cache.crop([length - (n - 1 - count) for length, count in zip(cache.lengths, counts)])
        _retire_finished(active, cache, out, max_new_tokens, ready, ready_cache)
    stats = DecodeStats(tokens=max_new_tokens, forwards=forwards, row_forwards=row_forwards,
                        accepted=[list(pair) for pair in zip(hits, tried)], seconds=_elapsed(start, device))
    return torch.tensor([row[:max_new_tokens] for row in out], dtype=torch.long, device=device), stats


def _retire_finished(active: _Active, cache: KVCache, out: list, max_new_tokens: int, ready: _Active,
                     ready_cache: KVCache) -> None:
    """Rows with all their tokens (``out``: each row's so far) leave the batch: prefilled rows waiting to join take
    their places (their cache rows copied into the finished ones'), and the places left over are dropped, so that
    the others' forwards do not carry them."""
    while True:
        finished = [i for i, row in enumerate(active.rows) if len(out[row]) >= max_new_tokens]
        count = min(len(finished), len(ready.rows))
        if not count:
            break
        active.replace(finished[:count], ready.take_first(count))
        cache.replace_rows(finished[:count], ready_cache.take_first(count))
    unfinished = [i for i, row in enumerate(active.rows) if len(out[row]) < max_new_tokens]
    if len(unfinished) < len(active.rows):
        active.keep(unfinished)
        cache.keep_rows(unfinished)
