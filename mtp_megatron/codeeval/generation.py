"""Completions of the tasks' prompts from our KV-cached decoder (mtp_megatron/inference/decoding.py): greedy,
sampled, or greedy with the heads' speculative drafts (the same tokens as greedy).

Prompts are decoded in batches of similar length (right-padded, each row at its own length); speculative
decoding takes them all and keeps ``batch_size`` rows decoding (continuous batching). A prompt longer than
the model's context leaves room for the new tokens by dropping its oldest tokens (counted in the summary as
``truncated_prompts``: a model trained at a short context, like the CPU quickstart's, sees the end of the
docstring; the room left for the speculative drafts is left in greedy decoding too, so both see the same
prompt). A completion is the text the new tokens add to the prompt's text (decoding prompt and new tokens
together, so a token that merges with the prompt's last character reads right), up to the end-of-document token,
then cut at the task's first stop sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_megatron.codeeval.tasks import Problem, truncate
from mtp_megatron.inference.decoding import greedy, sample, speculative


@dataclass
class GenerationTotals:
    tokens: int = 0
    """Tokens decoded, over all rows (``max_new_tokens`` per row: a row runs on past its end of document)."""
    row_forwards: int = 0
    """Forward passes each row took part in, summed over rows."""
    seconds: float = 0.0
    truncated_prompts: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.row_forwards, 1)


def prompt_room(context: int, max_new_tokens: int, drafts: int) -> int:
    """The most prompt tokens that fit the context with ``max_new_tokens`` and the speculative ``drafts``."""
    room = context - max_new_tokens + 1 - drafts
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}{f' with {drafts} drafts' if drafts else ''} leaves no "
                         f"room for a prompt in the model's context of {context} positions: give "
                         f"--max-new-tokens {context - drafts - 1} or less")
    return room


def generate_completions(decoder, tokenizer, problems: list[Problem], samples_per_task: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 512,
                         speculative_drafts: bool = False, batch_size: int = 8, context: int = 2048,
                         seed: int = 1234) -> tuple[list[dict], GenerationTotals]:
    """One record per sample, in task then sample order: ``{"task_id", "completion", "prompt_tokens"`` (those the
    model saw), ``"new_tokens"}`` (up to the end of document)."""
    # Room for the drafts either way, so greedy and speculative decoding see the same (truncated) prompts.
    room = prompt_room(context, max_new_tokens, decoder.n_heads - 1)
    totals = GenerationTotals()
    prompts = []
    for problem in problems:
        ids = tokenizer.tokenize(problem.prompt)
        totals.truncated_prompts += len(ids) > room
        prompts.append(ids[-room:])
    jobs = sorted(((p, s) for p in range(len(problems)) for s in range(samples_per_task)),
                  key=lambda job: len(prompts[job[0]]))
    generator = torch.Generator(device=decoder.device).manual_seed(seed)
    out: dict[tuple, dict] = {}
    # Speculative decoding takes every job at once and keeps batch_size rows decoding, a waiting prompt joining as
    # a row finishes (continuous batching: in fixed batches each batch runs as long as its slowest row).
    step = len(jobs) if speculative_drafts else batch_size
    for start in range(0, len(jobs), step):
        batch = jobs[start : start + step]
        rows = [prompts[p] for p, _ in batch]
        width = max(len(ids) for ids in rows)
        padded = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows], device=decoder.device)
        lengths = [len(ids) for ids in rows]
        if speculative_drafts:
            new, stats = speculative(decoder, padded, max_new_tokens, prompt_lengths=lengths, batch_size=batch_size)
        elif temperature > 0:
            new, stats = sample(decoder, padded, max_new_tokens, temperature, top_p, generator,
                                vocab_size=tokenizer.vocab_size, prompt_lengths=lengths)
        else:
            new, stats = greedy(decoder, padded, max_new_tokens, prompt_lengths=lengths)
        totals.seconds += stats.seconds
        totals.row_forwards += sum(stats.row_forwards)
        totals.tokens += stats.tokens * len(batch)
        for (p, s), ids, tokens in zip(batch, rows, new.tolist()):
            if tokenizer.eod in tokens:
                tokens = tokens[: tokens.index(tokenizer.eod)]
            out[p, s] = {"task_id": problems[p].task_id,
                         "completion": truncate(added_text(tokenizer, ids, tokens), problems[p].stops),
                         "prompt_tokens": len(ids), "new_tokens": len(tokens)}
    return [out[p, s] for p in range(len(problems)) for s in range(samples_per_task)], totals


def added_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds after ``prompt``."""
    before, after = tokenizer.detokenize(prompt), tokenizer.detokenize(prompt + new)
    return after[len(before):] if after.startswith(before) else tokenizer.detokenize(new)
