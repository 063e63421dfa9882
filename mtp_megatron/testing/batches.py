"""Deterministic random microbatches in the format the training step reads (see data/loader.py)."""

from __future__ import annotations

import torch


def random_microbatches(count: int, micro_batch_size: int, seq_length: int, vocab_size: int, seed: int,
                        masked_fraction: float = 0.1) -> list[dict]:
    """``count`` microbatches of random tokens; a fraction of loss-mask positions is 0, so masking is exercised."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        text = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=generator)
        loss_mask = (torch.rand(micro_batch_size, seq_length, generator=generator) >= masked_fraction).float()
        batches.append(
            {
                "tokens": text[:, :-1].contiguous(),
                "labels": text[:, 1:].contiguous(),
                "loss_mask": loss_mask,
                # megatron convention: True = masked out (future positions)
                "attention_mask": torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), 1)[None, None],
                "position_ids": torch.arange(seq_length).expand(micro_batch_size, -1).contiguous(),
            }
        )
    return batches
